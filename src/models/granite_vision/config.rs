//! The values of a Granite Vision (LLaVA-NeXT) snapshot's `config.json` and `processor_config.json`
//! that serving needs: the `<image>` id, the vision tower's tile and patch (so the features per tile and
//! the anyres grid), the pinpoints, the text model's sizes and end ids. The image processor's own
//! settings are read by [`super::preprocess`].

use std::path::Path;

use serde_json::Value;

use crate::models::config_util::{ids_of, read_json, read_json_opt, u32_field};
use crate::models::ModelError;

/// Parsed configuration of a Granite Vision model.
#[derive(Debug, Clone)]
pub struct GraniteVisionConfig {
    pub image_token_id: u32,
    /// `vision_config.image_size`: the side of a tile.
    pub tile: usize,
    /// Feature rows (and columns) per tile: `image_size / patch_size`, rounded down like the patch
    /// convolution (384 / 14 → 27).
    pub side: usize,
    /// `image_grid_pinpoints` as (height, width).
    pub pinpoints: Vec<(u32, u32)>,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub eos_token_ids: Vec<u32>,
}

fn positive(v: &Value, key: &str, what: &str) -> Result<usize, ModelError> {
    v.get(key)
        .and_then(Value::as_u64)
        .filter(|&x| x > 0)
        .map(|x| x as usize)
        .ok_or_else(|| ModelError::Config(format!("{what} has no positive integer {key:?}")))
}

/// `image_grid_pinpoints`: a non-empty list of [height, width] pairs, each a multiple of the tile.
pub fn pinpoints(
    v: Option<&Value>,
    tile: usize,
    what: &str,
) -> Result<Vec<(u32, u32)>, ModelError> {
    let bad = |why: String| ModelError::Config(format!("{what} image_grid_pinpoints {why}"));
    let list = v
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            bad("is missing or empty (an anyres model needs its grid resolutions)".into())
        })?;
    list.iter()
        .map(|p| {
            let pair = p.as_array().filter(|a| a.len() == 2);
            let dim = |i: usize| {
                pair.and_then(|a| a[i].as_u64())
                    .filter(|&d| d > 0 && d <= u32::MAX as u64)
            };
            match (dim(0), dim(1)) {
                (Some(h), Some(w))
                    if (h as usize).is_multiple_of(tile) && (w as usize).is_multiple_of(tile) =>
                {
                    Ok((h as u32, w as u32))
                }
                (Some(_), Some(_)) => Err(bad(format!(
                    "holds {p}, which is not a multiple of the {tile}-pixel tile"
                ))),
                _ => Err(bad(format!("holds {p}; expected [height, width]"))),
            }
        })
        .collect()
}

impl GraniteVisionConfig {
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let cfg = read_json(&dir.join("config.json"))?;
        let section = |k: &str| {
            cfg.get(k)
                .ok_or_else(|| ModelError::Config(format!("config.json has no {k}")))
        };
        let text = section("text_config")?;
        let vision = section("vision_config")?;
        let tile = positive(vision, "image_size", "vision_config")?;
        let patch = positive(vision, "patch_size", "vision_config")?;
        match cfg
            .get("vision_feature_select_strategy")
            .and_then(Value::as_str)
        {
            None | Some("full") | Some("default") => {}
            Some(other) => {
                return Err(ModelError::Config(format!(
                    "config.json vision_feature_select_strategy {other:?} is not \"default\" or \"full\""
                )))
            }
        }
        let processor = read_json_opt(&dir.join("processor_config.json"))?;
        // Extra image tokens per image (a CLS the processor counts); the exported encoder returns
        // (image_size / patch_size)² rows per tile, so only processors without any are served.
        let extra = processor
            .as_ref()
            .and_then(|p| p.get("num_additional_image_tokens"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let default = cfg
            .get("vision_feature_select_strategy")
            .and_then(Value::as_str)
            == Some("default");
        if extra - default as i64 != 0 {
            return Err(ModelError::Config(format!(
                "processor_config.json num_additional_image_tokens {extra} with vision_feature_select_strategy {:?} counts {} tokens per tile beyond the encoder's rows; not supported",
                if default { "default" } else { "full" },
                extra - default as i64
            )));
        }
        let mut eos = ids_of(cfg.get("eos_token_id"));
        if eos.is_empty() {
            eos = ids_of(text.get("eos_token_id"));
        }
        let image_token_id = match cfg.get("image_token_index") {
            Some(_) => u32_field(&cfg, "image_token_index", "config.json")?,
            None => u32_field(&cfg, "image_token_id", "config.json")?,
        };
        Ok(Self {
            image_token_id,
            tile,
            side: (tile / patch).max(1),
            pinpoints: pinpoints(cfg.get("image_grid_pinpoints"), tile, "config.json")?,
            hidden_size: positive(text, "hidden_size", "text_config")?,
            vocab_size: positive(text, "vocab_size", "text_config")?,
            context_length: text
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(8192) as usize,
            eos_token_ids: eos,
        })
    }

    /// Encoder rows per tile.
    pub fn features_per_tile(&self) -> usize {
        self.side * self.side
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, v: Value) {
        std::fs::write(dir.join(name), v.to_string()).unwrap();
    }

    fn real() -> Value {
        serde_json::json!({
            "model_type": "llava_next", "image_token_index": 49155,
            "image_grid_pinpoints": [[384, 384], [384, 768], [768, 384]],
            "vision_feature_select_strategy": "full", "vision_feature_layer": [-24, -20, -12, -1],
            "text_config": {"model_type": "granite", "vocab_size": 49156, "hidden_size": 2048,
                            "max_position_embeddings": 131072, "eos_token_id": 0},
            "vision_config": {"image_size": 384, "patch_size": 14}
        })
    }

    #[test]
    fn reads_the_real_layout() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "config.json", real());
        let c = GraniteVisionConfig::load(dir.path()).unwrap();
        assert_eq!(c.image_token_id, 49155);
        assert_eq!((c.tile, c.side, c.features_per_tile()), (384, 27, 729));
        assert_eq!(c.pinpoints, vec![(384, 384), (384, 768), (768, 384)]);
        assert_eq!(c.eos_token_ids, vec![0]);
        assert_eq!(
            (c.hidden_size, c.vocab_size, c.context_length),
            (2048, 49156, 131072)
        );
    }

    #[test]
    fn bad_configs_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let err = |v: Value, extra: Option<Value>| {
            write(dir.path(), "config.json", v);
            match extra {
                Some(p) => write(dir.path(), "processor_config.json", p),
                None => {
                    let _ = std::fs::remove_file(dir.path().join("processor_config.json"));
                }
            }
            GraniteVisionConfig::load(dir.path())
                .unwrap_err()
                .to_string()
        };
        let mut v = real();
        v["image_grid_pinpoints"] = serde_json::json!([[384, 500]]);
        assert!(err(v, None).contains("multiple of the 384-pixel tile"));
        let mut v = real();
        v["image_grid_pinpoints"] = serde_json::json!([]);
        assert!(err(v, None).contains("image_grid_pinpoints"));
        let mut v = real();
        v["vision_config"]["patch_size"] = Value::from(0);
        assert!(err(v, None).contains("patch_size"));
        let mut v = real();
        v["vision_feature_select_strategy"] = Value::from("cls");
        assert!(err(v, None).contains("vision_feature_select_strategy"));
        let extra = serde_json::json!({"num_additional_image_tokens": 1});
        assert!(err(real(), Some(extra)).contains("num_additional_image_tokens"));
    }
}
