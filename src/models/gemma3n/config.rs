//! The values of a Gemma-3n snapshot's JSON files that serving needs (model_interface.md §1.3–1.5):
//! special token ids, soft-token counts, vocabulary and context sizes (generation defaults:
//! [`crate::models::config_util::GenerationDefaults`]).

use std::path::Path;

use serde_json::Value;

pub use crate::models::config_util::GenerationDefaults;
use crate::models::config_util::{self, ids_of, read_json, read_json_opt};
use crate::models::ModelError;

/// Parsed `config.json` (+ `processor_config.json` counts) of a Gemma-3n model.
#[derive(Debug, Clone)]
pub struct Gemma3nConfig {
    pub image_token_id: u32,
    pub audio_token_id: u32,
    pub boi_token_id: u32,
    pub eoi_token_id: u32,
    pub boa_token_id: u32,
    pub eoa_token_id: u32,
    /// `<image_soft_token>` per image (`image_seq_length`, else `vision_soft_tokens_per_image`).
    pub image_seq_length: usize,
    /// `<audio_soft_token>` per clip (`audio_seq_length`, else `audio_soft_tokens_per_image`).
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
        let processor = read_json_opt(&dir.join("processor_config.json"))?;
        let text = cfg
            .get("text_config")
            .ok_or_else(|| ModelError::Config("config.json has no text_config".into()))?;
        let count = |proc_key: &str, cfg_key: &str, default: usize| -> usize {
            processor
                .as_ref()
                .and_then(|p| p.get(proc_key))
                .and_then(Value::as_u64)
                .or_else(|| cfg.get(cfg_key).and_then(Value::as_u64))
                .map(|x| x as usize)
                .unwrap_or(default)
        };
        let mut eos = ids_of(cfg.get("eos_token_id"));
        if eos.is_empty() {
            eos = ids_of(text.get("eos_token_id"));
        }
        Ok(Self {
            image_token_id: u32_field(&cfg, "image_token_id")?,
            audio_token_id: u32_field(&cfg, "audio_token_id")?,
            boi_token_id: u32_field(&cfg, "boi_token_id")?,
            eoi_token_id: u32_field(&cfg, "eoi_token_id")?,
            boa_token_id: u32_field(&cfg, "boa_token_id")?,
            eoa_token_id: u32_field(&cfg, "eoa_token_id")?,
            image_seq_length: count("image_seq_length", "vision_soft_tokens_per_image", 256),
            audio_seq_length: count("audio_seq_length", "audio_soft_tokens_per_image", 188),
            vocab_size: text
                .get("vocab_size")
                .and_then(Value::as_u64)
                .ok_or_else(|| ModelError::Config("text_config has no vocab_size".into()))?
                as usize,
            hidden_size: text
                .get("hidden_size")
                .and_then(Value::as_u64)
                .ok_or_else(|| ModelError::Config("text_config has no hidden_size".into()))?
                as usize,
            context_length: text
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(32768) as usize,
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
        })
    }
}
