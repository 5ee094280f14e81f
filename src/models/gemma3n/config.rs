//! The values of a Gemma-3n snapshot's JSON files that serving needs (model_interface.md §1.3–1.5):
//! special token ids, soft-token counts, vocabulary and context sizes, and generation defaults.

use std::path::Path;

use serde_json::Value;

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

pub(crate) fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Config(format!("{}: invalid JSON: {e}", path.display())))
}

pub(crate) fn read_json_opt(path: &Path) -> Result<Option<Value>, ModelError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// An id field that may be a number or a list of numbers.
pub(crate) fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

fn u32_field(v: &Value, key: &str) -> Result<u32, ModelError> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as u32)
        .ok_or_else(|| ModelError::Config(format!("config.json has no integer {key:?}")))
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

/// Sampling defaults from `generation_config.json`; a request's own values win.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationDefaults {
    /// `do_sample: false` → 0 (greedy).
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub eos_token_ids: Vec<u32>,
}

impl GenerationDefaults {
    /// Reads `generation_config.json` when present; `fallback_eos` comes from `config.json`.
    pub fn load(dir: &Path, fallback_eos: &[u32]) -> Result<Self, ModelError> {
        let g = read_json_opt(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let f = |k: &str, d: f64| g.get(k).and_then(Value::as_f64).unwrap_or(d) as f32;
        let do_sample = g.get("do_sample").and_then(Value::as_bool).unwrap_or(false);
        let mut eos = ids_of(g.get("eos_token_id"));
        if eos.is_empty() {
            eos = fallback_eos.to_vec();
        }
        Ok(Self {
            temperature: if do_sample {
                f("temperature", 1.0)
            } else {
                0.0
            },
            top_p: f("top_p", 1.0),
            top_k: g.get("top_k").and_then(Value::as_u64).unwrap_or(0) as u32,
            min_p: f("min_p", 0.0),
            repetition_penalty: f("repetition_penalty", 1.0),
            eos_token_ids: eos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"do_sample": true, "temperature": 1.0, "top_k": 64, "top_p": 0.95, "eos_token_id": [1, 106]}"#,
        )
        .unwrap();
        let g = GenerationDefaults::load(dir.path(), &[7]).unwrap();
        assert_eq!(g.top_k, 64);
        assert_eq!(g.eos_token_ids, vec![1, 106]);
        assert_eq!(g.temperature, 1.0);
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": 5}"#,
        )
        .unwrap();
        let g = GenerationDefaults::load(dir.path(), &[7]).unwrap();
        assert_eq!(g.temperature, 0.0);
        assert_eq!(g.eos_token_ids, vec![5]);
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            GenerationDefaults::load(empty.path(), &[7])
                .unwrap()
                .eos_token_ids,
            vec![7]
        );
    }
}
