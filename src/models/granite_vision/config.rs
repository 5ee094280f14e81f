//! The values of a Granite Vision (LLaVA-NeXT) snapshot's `config.json` and the processor's own
//! settings in `processor_config.json` that serving needs: the `<image>` id, the vision tower's tile and
//! patch (so the features per tile and the anyres grid), the pinpoints, the text model's sizes and end
//! ids. The image processor's settings are read by [`super::preprocess`].

use std::path::Path;

use serde_json::Value;

use crate::models::config_util::{ids_of, read_json, u32_field, SubConfig};
use crate::models::processor_config::ProcessorFiles;
use crate::models::ModelError;

/// Parsed configuration of a Granite Vision model.
#[derive(Debug, Clone)]
pub struct GraniteVisionConfig {
    /// The decoder's attention for the load-time fusion, or why it is not fused.
    pub attention: Result<crate::engine::rewrite::AttentionSpec, String>,
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
        // LlavaNextConfig's default text config is a LlamaConfig (Granite's says "granite").
        let text = SubConfig::of(&cfg, "text_config", "llama")?;
        let vision = SubConfig::of(&cfg, "vision_config", "clip_vision_model")?;
        let tile = vision.positive("image_size")?;
        let patch = vision.positive("patch_size")?;
        let strategy = match cfg
            .get("vision_feature_select_strategy")
            .and_then(Value::as_str)
        {
            Some(s @ ("full" | "default")) => s,
            Some(other) => {
                return Err(ModelError::Config(format!(
                    "config.json vision_feature_select_strategy {other:?} is not \"default\" or \"full\""
                )))
            }
            None => {
                return Err(ModelError::Config(
                    "config.json has no vision_feature_select_strategy (\"default\" or \"full\")"
                        .into(),
                ))
            }
        };
        let processor = ProcessorFiles::load(dir)?.processor();
        // LlavaNextProcessor counts an image's tokens with its own patch_size and strategy; processors
        // saved before transformers 4.45 have neither (nor num_additional_image_tokens), and the model's
        // own values then apply. Stated ones must be the model's, or the counts would not match the
        // encoder's rows.
        if let Some(p) = processor.get("patch_size").filter(|v| !v.is_null()) {
            if p.as_u64() != Some(patch as u64) {
                return Err(processor.invalid(
                    "patch_size",
                    format!("config.json vision_config.patch_size is {patch}"),
                ));
            }
        }
        if let Some(s) = processor
            .get("vision_feature_select_strategy")
            .filter(|v| !v.is_null())
        {
            if s.as_str() != Some(strategy) {
                return Err(processor.invalid(
                    "vision_feature_select_strategy",
                    format!("config.json says {strategy:?}"),
                ));
            }
        }
        // Extra image tokens per image (a CLS the processor counts); the exported encoder returns
        // (image_size / patch_size)² rows per tile, so only processors without any are served.
        // LlavaNextProcessor's default is 0, and older processors (above) leave it out.
        let extra = match processor.get("num_additional_image_tokens") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_i64().ok_or_else(|| {
                processor.invalid("num_additional_image_tokens", "expected an integer")
            })?,
        };
        let default = strategy == "default";
        if extra - default as i64 != 0 {
            return Err(ModelError::Config(format!(
                "processor_config.json num_additional_image_tokens {extra} with vision_feature_select_strategy {strategy:?} counts {} tokens per tile beyond the encoder's rows; not supported",
                extra - default as i64
            )));
        }
        let mut eos = ids_of(cfg.get("eos_token_id"), "config.json eos_token_id")?;
        if eos.is_empty() {
            eos = text.ids("eos_token_id")?;
        }
        let image_token_id = match cfg.get("image_token_index") {
            Some(_) => u32_field(&cfg, "image_token_index", "config.json")?,
            None => u32_field(&cfg, "image_token_id", "config.json")?,
        };
        Ok(Self {
            attention: text.attention(),
            image_token_id,
            tile,
            side: (tile / patch).max(1),
            pinpoints: pinpoints(cfg.get("image_grid_pinpoints"), tile, "config.json")?,
            hidden_size: text.positive("hidden_size")?,
            vocab_size: text.positive("vocab_size")?,
            context_length: text.positive("max_position_embeddings")?,
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
        let mut v = real();
        v.as_object_mut()
            .unwrap()
            .remove("vision_feature_select_strategy");
        assert!(err(v, None).contains("vision_feature_select_strategy"));
        // The processor's own counting settings must be the model's.
        let p = serde_json::json!({"patch_size": 16, "vision_feature_select_strategy": "full"});
        let e = err(real(), Some(p));
        assert!(
            e.contains("\"patch_size\"") && e.contains("processor_config.json"),
            "{e}"
        );
        let p = serde_json::json!({"patch_size": 14, "vision_feature_select_strategy": "default"});
        assert!(err(real(), Some(p)).contains("vision_feature_select_strategy"));
    }

    /// A processor saved by transformers 5 states its counting settings; they load when they agree.
    /// Keys transformers 4.x left out of the nested text config take GraniteConfig's defaults.
    #[test]
    fn processor_settings_and_left_out_keys() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "config.json", real());
        write(
            dir.path(),
            "processor_config.json",
            serde_json::json!({"num_additional_image_tokens": 0, "patch_size": 14,
                               "vision_feature_select_strategy": "full", "image_token": "<image>",
                               "image_processor": {"size": {"shortest_edge": 384}}}),
        );
        assert_eq!(GraniteVisionConfig::load(dir.path()).unwrap().side, 27);
        let mut v = real();
        v["text_config"]
            .as_object_mut()
            .unwrap()
            .remove("max_position_embeddings");
        write(dir.path(), "config.json", v);
        assert_eq!(
            GraniteVisionConfig::load(dir.path())
                .unwrap()
                .context_length,
            2048
        );
    }
}
