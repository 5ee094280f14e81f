//! The values of a Gemma-3n snapshot's JSON files that serving needs (model_interface.md §1.3–1.5):
//! special token ids, soft-token counts, vocabulary and context sizes (generation defaults:
//! [`crate::models::config_util::GenerationDefaults`]).

use std::path::Path;

use serde_json::Value;

pub use crate::models::config_util::GenerationDefaults;
use crate::models::config_util::{self, ids_of, read_json, SubConfig};
use crate::models::processor_config::ProcessorFiles;
use crate::models::ModelError;

/// Parsed `config.json` (+ the processor's counts in `processor_config.json`) of a Gemma-3n model.
#[derive(Debug, Clone)]
pub struct Gemma3nConfig {
    /// The decoder's attention for the load-time fusion, or why it is not fused.
    pub attention: Result<crate::engine::rewrite::AttentionSpec, String>,
    pub image_token_id: u32,
    pub audio_token_id: u32,
    pub boi_token_id: u32,
    pub eoi_token_id: u32,
    pub boa_token_id: u32,
    pub eoa_token_id: u32,
    /// `<image_soft_token>` per image (`processor_config.json` `image_seq_length`).
    pub image_seq_length: usize,
    /// `<audio_soft_token>` per clip (`processor_config.json` `audio_seq_length`).
    pub audio_seq_length: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub context_length: usize,
    pub final_logit_softcapping: Option<f32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn u32_field(v: &Value, key: &str) -> Result<u32, ModelError> {
    config_util::u32_field(v, key, "config.json")
}

impl Gemma3nConfig {
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let cfg = read_json(&dir.join("config.json"))?;
        let processor = ProcessorFiles::load(dir)?.processor();
        let text = SubConfig::of(&cfg, "text_config", "gemma3n_text")?;
        let mut eos = ids_of(cfg.get("eos_token_id"), "config.json eos_token_id")?;
        if eos.is_empty() {
            eos = text.ids("eos_token_id")?;
        }
        Ok(Self {
            attention: text.attention(),
            image_token_id: u32_field(&cfg, "image_token_id")?,
            audio_token_id: u32_field(&cfg, "audio_token_id")?,
            boi_token_id: u32_field(&cfg, "boi_token_id")?,
            eoi_token_id: u32_field(&cfg, "eoi_token_id")?,
            boa_token_id: u32_field(&cfg, "boa_token_id")?,
            eoa_token_id: u32_field(&cfg, "eoa_token_id")?,
            // The processor's own settings (Gemma3nProcessor's image_seq_length / audio_seq_length): only
            // processor_config.json states them, and the model loader checks them against the encoders.
            image_seq_length: processor.positive("image_seq_length")?,
            audio_seq_length: processor.positive("audio_seq_length")?,
            vocab_size: text.positive("vocab_size")?,
            hidden_size: text.positive("hidden_size")?,
            context_length: text.positive("max_position_embeddings")?,
            // Gemma3nTextConfig's default is 30.0 (a missing key soft-caps), `null` turns it off.
            final_logit_softcapping: text.optional_f32("final_logit_softcapping")?,
            bos_token_id: text.id_or_composite(&cfg, "bos_token_id")?,
            eos_token_ids: eos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::processor_config::{PREPROCESSOR_CONFIG, PROCESSOR_CONFIG};
    use serde_json::json;

    fn write(dir: &Path, name: &str, v: Value) {
        std::fs::write(dir.join(name), v.to_string()).unwrap();
    }

    fn base() -> Value {
        json!({"model_type": "gemma3n", "image_token_id": 262145, "audio_token_id": 262273,
               "boi_token_id": 255999, "eoi_token_id": 262144, "boa_token_id": 256000,
               "eoa_token_id": 262272,
               "text_config": {"model_type": "gemma3n_text", "vocab_size": 600, "hidden_size": 64}})
    }

    #[test]
    fn counts_come_from_processor_config() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "config.json", base());
        let e = Gemma3nConfig::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("\"image_seq_length\"") && e.contains(PROCESSOR_CONFIG),
            "{e}"
        );
        // A flat preprocessor_config.json is not where the processor's own settings are read.
        write(
            dir.path(),
            PREPROCESSOR_CONFIG,
            json!({"image_seq_length": 256, "audio_seq_length": 188}),
        );
        assert!(Gemma3nConfig::load(dir.path()).is_err());
        write(
            dir.path(),
            PROCESSOR_CONFIG,
            json!({"image_seq_length": 256, "audio_seq_length": 188,
                   "image_processor": {"size": {"height": 768, "width": 768}}}),
        );
        let c = Gemma3nConfig::load(dir.path()).unwrap();
        assert_eq!((c.image_seq_length, c.audio_seq_length), (256, 188));
    }

    #[test]
    fn text_config_keys_left_out_take_the_class_defaults() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            PROCESSOR_CONFIG,
            json!({"image_seq_length": 256, "audio_seq_length": 188}),
        );
        let mut v = base();
        v["text_config"] = json!({});
        write(dir.path(), "config.json", v);
        let c = Gemma3nConfig::load(dir.path()).unwrap();
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.context_length),
            (262_400, 2048, 32_768)
        );
        assert_eq!(c.final_logit_softcapping, Some(30.0));
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone()),
            (Some(2), vec![1])
        );
        let mut v = base();
        v["text_config"]["final_logit_softcapping"] = Value::Null;
        v["eos_token_id"] = json!([1, 106]);
        write(dir.path(), "config.json", v);
        let c = Gemma3nConfig::load(dir.path()).unwrap();
        assert_eq!(c.final_logit_softcapping, None);
        assert_eq!(c.eos_token_ids, vec![1, 106]);
        let mut v = base();
        v.as_object_mut().unwrap().remove("boa_token_id");
        write(dir.path(), "config.json", v);
        let e = Gemma3nConfig::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("boa_token_id"), "{e}");
    }
}
