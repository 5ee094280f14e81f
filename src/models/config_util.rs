//! What every family reads from a snapshot's JSON files: the file helpers and the generation defaults of
//! `generation_config.json`.

use std::path::Path;

use serde_json::Value;

use super::ModelError;

pub fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Config(format!("{}: invalid JSON: {e}", path.display())))
}

/// `Ok(None)` when the file does not exist.
pub fn read_json_opt(path: &Path) -> Result<Option<Value>, ModelError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// An id field that may be a number or a list of numbers.
pub fn ids_of(v: Option<&Value>) -> Vec<u32> {
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

/// A required integer field of `config.json` (or one of its sub-objects, named in `what`).
pub fn u32_field(v: &Value, key: &str, what: &str) -> Result<u32, ModelError> {
    v.get(key)
        .and_then(Value::as_u64)
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| ModelError::Config(format!("{what} has no integer {key:?}")))
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

    /// Adds end ids the model needs beyond its configuration (e.g. the end-of-turn token), keeping order.
    pub fn with_eos(mut self, extra: impl IntoIterator<Item = u32>) -> Self {
        for id in extra {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        self
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
        assert_eq!(g.clone().with_eos([106, 9]).eos_token_ids, vec![1, 106, 9]);
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

    #[test]
    fn fields() {
        let v: Value = serde_json::json!({"a": 3, "b": [1, 2], "c": "x", "big": 5_000_000_000u64});
        assert_eq!(ids_of(v.get("a")), vec![3]);
        assert_eq!(ids_of(v.get("b")), vec![1, 2]);
        assert!(ids_of(v.get("c")).is_empty());
        assert_eq!(u32_field(&v, "a", "config.json").unwrap(), 3);
        assert!(u32_field(&v, "big", "config.json").is_err());
        assert!(u32_field(&v, "zz", "config.json")
            .unwrap_err()
            .to_string()
            .contains("\"zz\""));
    }
}
