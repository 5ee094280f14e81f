//! What every family reads from a snapshot's JSON files: the file helpers, the nested configs of
//! `config.json` with transformers' class defaults ([`SubConfig`]), and the generation defaults of
//! `generation_config.json`. Processor settings: [`super::processor_config`].

use std::path::Path;

use serde_json::Value;

use crate::engine::rewrite::AttentionSpec;

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

/// An id field that may be a number or a list of numbers (`null` or absent: none). Anything else —
/// a string, a negative or fractional number, an id past `u32` — is an error naming `what`: read as
/// "no id" it would silently change where generation stops.
pub fn ids_of(v: Option<&Value>, what: &str) -> Result<Vec<u32>, ModelError> {
    let id = |x: &Value| x.as_u64().and_then(|x| u32::try_from(x).ok());
    let bad = || {
        ModelError::Config(format!(
            "{what} must be a token id or a list of ids, found {}",
            v.map_or_else(String::new, Value::to_string)
        ))
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().map(|x| id(x).ok_or_else(bad)).collect(),
        Some(x) => id(x).map(|i| vec![i]).ok_or_else(bad),
    }
}

/// A required integer field of `config.json` (or one of its sub-objects, named in `what`).
pub fn u32_field(v: &Value, key: &str, what: &str) -> Result<u32, ModelError> {
    v.get(key)
        .and_then(Value::as_u64)
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| ModelError::Config(format!("{what} has no integer {key:?}")))
}

/// The class default of `key` in transformers' config class for `model_type`, for the nested configs the
/// families read. transformers 4.x saved a nested config as its difference from the class defaults
/// (`recursive_diff_dict`: a key whose value equalled both the class default and the composite's default
/// sub-config was left out), so in a real `config.json` a missing `text_config` / `vision_config` key
/// means this value. transformers 5 writes nested configs whole. `None`: no default known here, the key
/// must be stated. `Some(Value::Null)`: the default is `None`.
pub fn class_default(model_type: &str, key: &str) -> Option<Value> {
    let v = match (model_type, key) {
        // Gemma3nTextConfig
        ("gemma3n_text", "vocab_size") => Value::from(262_400),
        ("gemma3n_text", "hidden_size") => Value::from(2048),
        ("gemma3n_text", "max_position_embeddings") => Value::from(32_768),
        ("gemma3n_text", "final_logit_softcapping") => Value::from(30.0),
        // Gemma4TextConfig
        ("gemma4_text", "vocab_size") => Value::from(262_144),
        ("gemma4_text", "hidden_size") => Value::from(2304),
        ("gemma4_text", "max_position_embeddings") => Value::from(131_072),
        ("gemma4_text", "final_logit_softcapping") => Value::Null,
        ("gemma3n_text" | "gemma4_text", "pad_token_id") => Value::from(0),
        ("gemma3n_text" | "gemma4_text", "bos_token_id") => Value::from(2),
        ("gemma3n_text" | "gemma4_text", "eos_token_id") => Value::from(1),
        // LlamaConfig (SmolVLM's text model, and LLaVA-NeXT's default one) and GraniteConfig
        ("llama" | "granite", "vocab_size") => Value::from(32_000),
        ("llama" | "granite", "hidden_size") => Value::from(4096),
        ("llama" | "granite", "max_position_embeddings") => Value::from(2048),
        ("llama" | "granite", "bos_token_id") => Value::from(1),
        ("llama" | "granite", "eos_token_id") => Value::from(2),
        // Idefics3VisionConfig / SmolVLMVisionConfig
        ("idefics3_vision" | "smolvlm_vision", "image_size") => Value::from(224),
        ("idefics3_vision" | "smolvlm_vision", "patch_size") => Value::from(32),
        _ => return None,
    };
    Some(v)
}

/// A nested config of `config.json` (`text_config`, `vision_config`): its stated values, else the class
/// defaults of its `model_type` ([`class_default`]); the section's `model_type` itself may be left out
/// when it is the composite's default one, which the family names.
#[derive(Debug, Clone, Copy)]
pub struct SubConfig<'a> {
    name: &'static str,
    model_type: &'a str,
    v: &'a Value,
}

impl<'a> SubConfig<'a> {
    /// `cfg[name]`, whose `model_type` is `default_type` unless it says otherwise.
    pub fn of(
        cfg: &'a Value,
        name: &'static str,
        default_type: &'a str,
    ) -> Result<Self, ModelError> {
        let v = cfg
            .get(name)
            .filter(|v| v.is_object())
            .ok_or_else(|| ModelError::Config(format!("config.json has no {name}")))?;
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or(default_type);
        Ok(Self {
            name,
            model_type,
            v,
        })
    }

    pub fn model_type(&self) -> &'a str {
        self.model_type
    }

    /// The section as stated.
    pub fn raw(&self) -> &'a Value {
        self.v
    }

    /// The stated value (a stated `null` included), else the class default.
    pub fn value(&self, key: &str) -> Option<Value> {
        self.v
            .get(key)
            .cloned()
            .or_else(|| class_default(self.model_type, key))
    }

    fn missing(&self, key: &str, what: &str) -> ModelError {
        ModelError::Config(format!(
            "config.json {} has no {what} {key:?} (and transformers' {:?} config has no default for it)",
            self.name, self.model_type
        ))
    }

    /// A positive integer.
    pub fn positive(&self, key: &str) -> Result<usize, ModelError> {
        self.value(key)
            .and_then(|v| v.as_u64())
            .filter(|&x| x > 0)
            .map(|x| x as usize)
            .ok_or_else(|| self.missing(key, "positive integer"))
    }

    /// A number that may be `null` (off).
    pub fn optional_f32(&self, key: &str) -> Result<Option<f32>, ModelError> {
        match self.value(key) {
            None => Err(self.missing(key, "number")),
            Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.missing(key, "number")),
        }
    }

    /// A token id that may be `null` (or unknown); any other non-id value is an error.
    pub fn optional_id(&self, key: &str) -> Result<Option<u32>, ModelError> {
        match self.value(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.missing(key, "token id")),
        }
    }

    /// A token id stated in this section (a `null` included), else the composite config's single id
    /// (`top[key]`), else the class default.
    pub fn id_or_composite(&self, top: &Value, key: &str) -> Result<Option<u32>, ModelError> {
        if self.v.get(key).is_none() {
            if let [id] = ids_of(top.get(key), &format!("config.json {key}"))?[..] {
                return Ok(Some(id));
            }
        }
        self.optional_id(key)
    }

    /// What the load-time attention fusion needs from a text config: the query heads and, per
    /// layer, its sliding window (`layer_types` with `sliding_window`). `None` (with the reason) when
    /// the config does not say it plainly; the decoder then runs as exported.
    pub fn attention(&self) -> Result<AttentionSpec, String> {
        let num_heads = self
            .positive("num_attention_heads")
            .map_err(|e| e.to_string())?;
        let layers = self
            .positive("num_hidden_layers")
            .map_err(|e| e.to_string())?;
        let window = self.value("sliding_window").and_then(|v| v.as_u64());
        let windows = match self.value("layer_types") {
            Some(Value::Array(types)) => {
                let mut w = Vec::with_capacity(types.len());
                for t in &types {
                    match (t.as_str(), window) {
                        (Some("full_attention"), _) => w.push(None),
                        (Some("sliding_attention"), Some(n)) if n > 0 => w.push(Some(n as usize)),
                        _ => return Err(format!("layer type {t} with sliding_window {window:?}")),
                    }
                }
                w
            }
            None | Some(Value::Null) if window.is_none() => vec![None; layers],
            _ => return Err("a sliding window without layer_types".into()),
        };
        if windows.len() != layers {
            return Err(format!("{} layer_types for {layers} layers", windows.len()));
        }
        Ok(AttentionSpec { num_heads, windows })
    }

    /// An id or list of ids (empty when `null` or unknown).
    pub fn ids(&self, key: &str) -> Result<Vec<u32>, ModelError> {
        ids_of(
            self.value(key).as_ref(),
            &format!("config.json {} {key}", self.name),
        )
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
        let mut eos = ids_of(g.get("eos_token_id"), "generation_config.json eos_token_id")?;
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
        assert_eq!(ids_of(v.get("a"), "a").unwrap(), vec![3]);
        assert_eq!(ids_of(v.get("b"), "b").unwrap(), vec![1, 2]);
        assert!(ids_of(v.get("zz"), "zz").unwrap().is_empty());
        for bad in ["c", "big"] {
            let e = ids_of(v.get(bad), &format!("config.json {bad}")).unwrap_err();
            assert!(e.to_string().contains(&format!("config.json {bad}")), "{e}");
        }
        let neg: Value = serde_json::json!([1, -2]);
        assert!(ids_of(Some(&neg), "eos_token_id").is_err());
        assert_eq!(u32_field(&v, "a", "config.json").unwrap(), 3);
        assert!(u32_field(&v, "big", "config.json").is_err());
        assert!(u32_field(&v, "zz", "config.json")
            .unwrap_err()
            .to_string()
            .contains("\"zz\""));
    }

    /// bos: the section's own (null = none), else the composite's, else the class default; a value
    /// that is not an id is an error.
    #[test]
    fn ids_from_section_composite_or_class() {
        let bos = |cfg: Value| {
            SubConfig::of(&cfg, "text_config", "gemma3n_text")
                .unwrap()
                .id_or_composite(&cfg, "bos_token_id")
        };
        assert_eq!(
            bos(serde_json::json!({"text_config": {"bos_token_id": 7}, "bos_token_id": 5}))
                .unwrap(),
            Some(7)
        );
        assert_eq!(
            bos(serde_json::json!({"text_config": {"bos_token_id": null}, "bos_token_id": 5}))
                .unwrap(),
            None
        );
        assert_eq!(
            bos(serde_json::json!({"text_config": {}, "bos_token_id": 5})).unwrap(),
            Some(5)
        );
        assert_eq!(
            bos(serde_json::json!({"text_config": {}})).unwrap(),
            Some(2)
        );
        assert!(bos(serde_json::json!({"text_config": {"bos_token_id": "<bos>"}})).is_err());
        assert!(bos(serde_json::json!({"text_config": {}, "bos_token_id": -1})).is_err());
    }
}
