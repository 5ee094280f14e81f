//! The values of a SmolVLM (Idefics3) snapshot's JSON files that serving needs (model_interface.md §2.2):
//! the `<image>` id, the vision tower's geometry (and so the tokens per tile), vocabulary and context
//! sizes, and the end ids. The image processor's settings are read by [`super::preprocess`].

use std::path::Path;

use serde_json::Value;

use crate::models::config_util::{ids_of, read_json, u32_field, SubConfig};
use crate::models::processor_config::ProcessorFiles;
use crate::models::ModelError;

/// Parsed `config.json` (+ `processor_config.json`'s `image_seq_len`) of a SmolVLM model.
#[derive(Debug, Clone)]
pub struct SmolVlmConfig {
    /// The decoder's attention for the load-time fusion, or why it is not fused.
    pub attention: Result<crate::engine::rewrite::AttentionSpec, String>,
    pub image_token_id: u32,
    /// `<image>` tokens per frame: `processor_config.json` `image_seq_len`, which must equal what the
    /// vision tower gives per frame, ((image_size / patch_size)² / scale_factor²).
    pub image_seq_len: usize,
    /// Side of the square frames the vision tower was built for (`vision_config.image_size`).
    pub vision_image_size: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub context_length: usize,
    pub eos_token_ids: Vec<u32>,
}

impl SmolVlmConfig {
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let cfg = read_json(&dir.join("config.json"))?;
        // Idefics3Config and SmolVLMConfig nest a LlamaConfig and their own vision config.
        let vision_type = match cfg.get("model_type").and_then(Value::as_str) {
            Some("smolvlm") => "smolvlm_vision",
            _ => "idefics3_vision",
        };
        let text = SubConfig::of(&cfg, "text_config", "llama")?;
        let vision = SubConfig::of(&cfg, "vision_config", vision_type)?;
        let image_size = vision.positive("image_size")?;
        let patch_size = vision.positive("patch_size")?;
        let scale = u32_field(&cfg, "scale_factor", "config.json")? as usize;
        if scale == 0 {
            return Err(ModelError::Config("config.json scale_factor is 0".into()));
        }
        let per_frame = (image_size / patch_size).pow(2) / (scale * scale);
        let processor = ProcessorFiles::load(dir)?.processor();
        let image_seq_len = processor.positive("image_seq_len")?;
        if image_seq_len != per_frame {
            return Err(processor.invalid(
                "image_seq_len",
                format!(
                    "the vision tower gives {per_frame} rows per frame ((image_size {image_size} / patch_size {patch_size})² / scale_factor {scale}²)"
                ),
            ));
        }
        let mut eos = ids_of(cfg.get("eos_token_id"), "config.json eos_token_id")?;
        if eos.is_empty() {
            eos = text.ids("eos_token_id")?;
        }
        Ok(Self {
            attention: text.attention(),
            image_token_id: u32_field(&cfg, "image_token_id", "config.json")?,
            image_seq_len,
            vision_image_size: image_size,
            vocab_size: text.positive("vocab_size")?,
            hidden_size: text.positive("hidden_size")?,
            context_length: text.positive("max_position_embeddings")?,
            eos_token_ids: eos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::processor_config::PROCESSOR_CONFIG;

    fn write(dir: &Path, name: &str, v: Value) {
        std::fs::write(dir.join(name), v.to_string()).unwrap();
    }

    fn real() -> Value {
        serde_json::json!({
            "model_type": "idefics3", "image_token_id": 49190, "scale_factor": 4,
            "text_config": {"vocab_size": 49280, "hidden_size": 576, "max_position_embeddings": 8192,
                            "eos_token_id": 2},
            "vision_config": {"image_size": 512, "patch_size": 16}
        })
    }

    #[test]
    fn reads_the_real_layout() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "config.json", real());
        write(
            dir.path(),
            PROCESSOR_CONFIG,
            serde_json::json!({"image_seq_len": 64}),
        );
        let c = SmolVlmConfig::load(dir.path()).unwrap();
        assert_eq!(c.image_seq_len, 64); // (512/16)^2 / 4^2
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.context_length),
            (49280, 576, 8192)
        );
        let mut bad = real();
        bad["vision_config"]["patch_size"] = Value::from(0);
        write(dir.path(), "config.json", bad);
        let err = SmolVlmConfig::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("patch_size"), "{err}");
    }

    #[test]
    fn image_seq_len_is_the_processors_and_must_fit_the_tower() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "config.json", real());
        let err = SmolVlmConfig::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("\"image_seq_len\"") && err.contains(PROCESSOR_CONFIG),
            "{err}"
        );
        write(
            dir.path(),
            PROCESSOR_CONFIG,
            serde_json::json!({"image_seq_len": 81}),
        );
        let err = SmolVlmConfig::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("gives 64 rows"), "{err}");
    }

    /// Keys transformers 4.x left out of a nested config take the class defaults (LlamaConfig: 2048
    /// positions); top-level keys it always wrote must be there.
    #[test]
    fn left_out_keys() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            PROCESSOR_CONFIG,
            serde_json::json!({"image_seq_len": 64}),
        );
        let mut v = real();
        v["text_config"]
            .as_object_mut()
            .unwrap()
            .remove("max_position_embeddings");
        write(dir.path(), "config.json", v);
        assert_eq!(
            SmolVlmConfig::load(dir.path()).unwrap().context_length,
            2048
        );
        let mut v = real();
        v.as_object_mut().unwrap().remove("scale_factor");
        write(dir.path(), "config.json", v);
        let err = SmolVlmConfig::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("scale_factor"), "{err}");
    }
}
