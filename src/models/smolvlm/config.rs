//! The values of a SmolVLM (Idefics3) snapshot's JSON files that serving needs (model_interface.md §2.2):
//! the `<image>` id, the vision tower's geometry (and so the tokens per tile), vocabulary and context
//! sizes, and the end ids. The image processor's settings are read by [`super::preprocess`].

use std::path::Path;

use serde_json::Value;

use crate::models::config_util::{ids_of, read_json, read_json_opt, u32_field};
use crate::models::ModelError;

/// Parsed `config.json` (+ `processor_config.json`'s `image_seq_len`) of a SmolVLM model.
#[derive(Debug, Clone)]
pub struct SmolVlmConfig {
    pub image_token_id: u32,
    /// `<image>` tokens per frame: `processor_config.json` `image_seq_len`, else derived from the vision
    /// tower as ((image_size / patch_size)² / scale_factor²).
    pub image_seq_len: usize,
    /// Side of the square frames the vision tower was built for (`vision_config.image_size`).
    pub vision_image_size: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub context_length: usize,
    pub eos_token_ids: Vec<u32>,
}

fn usize_of(v: &Value, key: &str, what: &str) -> Result<usize, ModelError> {
    v.get(key)
        .and_then(Value::as_u64)
        .filter(|&x| x > 0)
        .map(|x| x as usize)
        .ok_or_else(|| ModelError::Config(format!("{what} has no positive integer {key:?}")))
}

impl SmolVlmConfig {
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let cfg = read_json(&dir.join("config.json"))?;
        let text = cfg
            .get("text_config")
            .ok_or_else(|| ModelError::Config("config.json has no text_config".into()))?;
        let vision = cfg
            .get("vision_config")
            .ok_or_else(|| ModelError::Config("config.json has no vision_config".into()))?;
        let image_size = usize_of(vision, "image_size", "vision_config")?;
        let patch_size = usize_of(vision, "patch_size", "vision_config")?;
        let scale = cfg
            .get("scale_factor")
            .and_then(Value::as_u64)
            .filter(|&x| x > 0)
            .unwrap_or(2) as usize;
        let derived = (image_size / patch_size).pow(2) / (scale * scale);
        let processor = read_json_opt(&dir.join("processor_config.json"))?;
        let image_seq_len = processor
            .as_ref()
            .and_then(|p| p.get("image_seq_len"))
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(derived);
        if image_seq_len == 0 {
            return Err(ModelError::Config(
                "processor_config.json image_seq_len is 0".into(),
            ));
        }
        let mut eos = ids_of(cfg.get("eos_token_id"));
        if eos.is_empty() {
            eos = ids_of(text.get("eos_token_id"));
        }
        Ok(Self {
            image_token_id: u32_field(&cfg, "image_token_id", "config.json")?,
            image_seq_len,
            vision_image_size: image_size,
            vocab_size: usize_of(text, "vocab_size", "text_config")?,
            hidden_size: usize_of(text, "hidden_size", "text_config")?,
            context_length: text
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(8192) as usize,
            eos_token_ids: eos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, v: Value) {
        std::fs::write(dir.join(name), v.to_string()).unwrap();
    }

    #[test]
    fn reads_the_real_layout() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({
            "model_type": "idefics3", "image_token_id": 49190, "scale_factor": 4,
            "text_config": {"vocab_size": 49280, "hidden_size": 576, "max_position_embeddings": 8192,
                            "eos_token_id": 2},
            "vision_config": {"image_size": 512, "patch_size": 16}
        });
        write(dir.path(), "config.json", cfg.clone());
        let c = SmolVlmConfig::load(dir.path()).unwrap();
        assert_eq!(c.image_seq_len, 64); // derived: (512/16)^2 / 4^2
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.context_length),
            (49280, 576, 8192)
        );
        write(
            dir.path(),
            "processor_config.json",
            serde_json::json!({"image_seq_len": 81}),
        );
        assert_eq!(SmolVlmConfig::load(dir.path()).unwrap().image_seq_len, 81);
        let mut bad = cfg;
        bad["vision_config"]["patch_size"] = Value::from(0);
        write(dir.path(), "config.json", bad);
        let err = SmolVlmConfig::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("patch_size"), "{err}");
    }
}
