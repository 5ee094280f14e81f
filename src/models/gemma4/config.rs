//! The values of a Gemma 4 snapshot's JSON files that serving needs (docs/gemma4.md §2–§4): the special
//! token ids, vocabulary and context sizes, the soft-cap, and where the processor settings are
//! (`processor_config.json`'s nested `image_processor` / `feature_extractor`, transformers 5's layout,
//! or a flat `preprocessor_config.json`). Generation defaults: [`GenerationDefaults`].

use std::path::Path;

use serde_json::Value;

pub use crate::models::config_util::GenerationDefaults;
use crate::models::config_util::{self, ids_of, read_json, read_json_opt};
use crate::models::ModelError;

/// Parsed `config.json` (+ the processor's sequence settings) of a Gemma 4 model.
#[derive(Debug, Clone)]
pub struct Gemma4Config {
    pub image_token_id: u32,
    pub audio_token_id: u32,
    /// `<|video|>`, when the config names one (embedded as `<pad>` like the other soft tokens).
    pub video_token_id: Option<u32>,
    pub boi_token_id: u32,
    pub eoi_token_id: u32,
    pub boa_token_id: u32,
    pub eoa_token_id: u32,
    /// What `embed_tokens` gets in place of soft tokens (`text_config.pad_token_id`).
    pub pad_token_id: u32,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub context_length: usize,
    pub final_logit_softcapping: Option<f32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Most audio soft tokens one clip may have (`audio_seq_length`, 750 = 30 s).
    pub audio_seq_length: usize,
    /// The image processor's settings (`processor_config.json` `image_processor`, or the flat file).
    pub image_processor: Value,
    /// The feature extractor's settings (`processor_config.json` `feature_extractor`, or the flat file).
    pub feature_extractor: Value,
}

fn u32_field(v: &Value, key: &str) -> Result<u32, ModelError> {
    config_util::u32_field(v, key, "config.json")
}

impl Gemma4Config {
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let cfg = read_json(&dir.join("config.json"))?;
        let text = cfg
            .get("text_config")
            .ok_or_else(|| ModelError::Config("config.json has no text_config".into()))?;
        if let Some(mode) = text
            .get("use_bidirectional_attention")
            .and_then(Value::as_str)
        {
            // Bidirectional attention inside image blocks needs each token's type, which the ONNX
            // decoder's 2-D attention_mask cannot carry (docs/gemma4.md §2).
            return Err(ModelError::Config(format!(
                "text_config.use_bidirectional_attention is {mode:?}; the ONNX decoder only runs causal attention"
            )));
        }
        let processor = read_json_opt(&dir.join("processor_config.json"))?.unwrap_or(Value::Null);
        let flat = read_json_opt(&dir.join("preprocessor_config.json"))?.unwrap_or(Value::Null);
        let part = |key: &str| -> Value {
            processor
                .get(key)
                .or_else(|| flat.get(key))
                .filter(|v| v.is_object())
                .cloned()
                .unwrap_or_else(|| flat.clone())
        };
        let usize_of =
            |v: &Value, key: &str| v.get(key).and_then(Value::as_u64).map(|x| x as usize);
        let mut eos = ids_of(cfg.get("eos_token_id"));
        if eos.is_empty() {
            eos = ids_of(text.get("eos_token_id"));
        }
        // transformers' config class spells it eoa_token_index; some copies say eoa_token_id.
        let eoa_key = match cfg.get("eoa_token_index") {
            Some(_) => "eoa_token_index",
            None => "eoa_token_id",
        };
        Ok(Self {
            image_token_id: u32_field(&cfg, "image_token_id")?,
            audio_token_id: u32_field(&cfg, "audio_token_id")?,
            video_token_id: cfg
                .get("video_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            boi_token_id: u32_field(&cfg, "boi_token_id")?,
            eoi_token_id: u32_field(&cfg, "eoi_token_id")?,
            boa_token_id: u32_field(&cfg, "boa_token_id")?,
            eoa_token_id: u32_field(&cfg, eoa_key)?,
            pad_token_id: text
                .get("pad_token_id")
                .and_then(Value::as_u64)
                .unwrap_or(0) as u32,
            vocab_size: usize_of(text, "vocab_size")
                .ok_or_else(|| ModelError::Config("text_config has no vocab_size".into()))?,
            hidden_size: usize_of(text, "hidden_size")
                .ok_or_else(|| ModelError::Config("text_config has no hidden_size".into()))?,
            context_length: usize_of(text, "max_position_embeddings").unwrap_or(131_072),
            final_logit_softcapping: text
                .get("final_logit_softcapping")
                .and_then(Value::as_f64)
                .map(|x| x as f32),
            bos_token_id: text
                .get("bos_token_id")
                .or_else(|| cfg.get("bos_token_id"))
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_ids: eos,
            audio_seq_length: usize_of(&processor, "audio_seq_length")
                .or_else(|| usize_of(&flat, "audio_seq_length"))
                .unwrap_or(750),
            image_processor: part("image_processor"),
            feature_extractor: part("feature_extractor"),
        })
    }

    /// Ids `embed_tokens` gets as `<pad>` (their rows come from the encoders).
    pub fn soft_token_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.image_token_id, self.audio_token_id];
        ids.extend(self.video_token_id);
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, v: Value) {
        std::fs::write(dir.join(name), serde_json::to_vec(&v).unwrap()).unwrap();
    }

    fn base() -> Value {
        serde_json::json!({
            "model_type": "gemma4", "image_token_id": 258880, "audio_token_id": 258881,
            "boi_token_id": 255999, "eoi_token_id": 258882, "boa_token_id": 256000,
            "eoa_token_index": 258883, "eos_token_id": [1, 106],
            "text_config": {"vocab_size": 262144, "hidden_size": 1536, "final_logit_softcapping": 30.0}
        })
    }

    #[test]
    fn reads_the_hub_spellings() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "config.json", base());
        write(
            dir.path(),
            "processor_config.json",
            serde_json::json!({"audio_seq_length": 750,
                "image_processor": {"max_soft_tokens": 280},
                "feature_extractor": {"frame_length": 320}}),
        );
        let c = Gemma4Config::load(dir.path()).unwrap();
        assert_eq!(
            (
                c.eoa_token_id,
                c.pad_token_id,
                c.context_length,
                c.audio_seq_length
            ),
            (258883, 0, 131_072, 750)
        );
        assert_eq!(c.image_processor["max_soft_tokens"], 280);
        assert_eq!(c.feature_extractor["frame_length"], 320);
        assert_eq!(c.soft_token_ids(), vec![258880, 258881]);

        // eoa_token_id (some copies of the config) and a flat preprocessor_config.json.
        let mut v = base();
        v.as_object_mut().unwrap().remove("eoa_token_index");
        v["eoa_token_id"] = serde_json::json!(7);
        write(dir.path(), "config.json", v);
        std::fs::remove_file(dir.path().join("processor_config.json")).unwrap();
        write(
            dir.path(),
            "preprocessor_config.json",
            serde_json::json!({"max_soft_tokens": 140, "frame_length": 320}),
        );
        let c = Gemma4Config::load(dir.path()).unwrap();
        assert_eq!(c.eoa_token_id, 7);
        assert_eq!(c.image_processor["max_soft_tokens"], 140);
        assert_eq!(c.feature_extractor["frame_length"], 320);
    }

    #[test]
    fn refuses_bidirectional_vision_attention() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = base();
        v["text_config"]["use_bidirectional_attention"] = serde_json::json!("vision");
        write(dir.path(), "config.json", v);
        let e = Gemma4Config::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("use_bidirectional_attention"), "{e}");
    }
}
