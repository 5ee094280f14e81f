//! The values of a Gemma 4 snapshot's JSON files that serving needs (docs/gemma4.md §2–§4): the special
//! token ids, vocabulary and context sizes, the soft-cap, and the processor's settings, found where
//! transformers looks ([`crate::models::processor_config`]: `processor_config.json`'s nested
//! `image_processor` / `feature_extractor`, transformers 5's layout, else a flat
//! `preprocessor_config.json`). Generation defaults: [`GenerationDefaults`].

use std::path::Path;

use serde_json::Value;

pub use crate::models::config_util::GenerationDefaults;
use crate::models::config_util::{self, ids_of, read_json, SubConfig};
use crate::models::processor_config::{Part, ProcessorFiles, Settings};
use crate::models::ModelError;
use crate::pipeline::audio::MelConfig;

/// Parsed `config.json` (+ the processor's sequence settings) of a Gemma 4 model.
#[derive(Debug, Clone)]
pub struct Gemma4Config {
    /// The decoder's attention for the load-time fusion, or why it is not fused.
    pub attention: Result<crate::engine::rewrite::AttentionSpec, String>,
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
    /// Most audio soft tokens one clip may have (`processor_config.json` `audio_seq_length`, 750 = 30 s).
    pub audio_seq_length: usize,
    /// The image processor's settings (`processor_config.json` `image_processor`, or the flat file).
    pub image_processor: Settings,
    /// The feature extractor's settings (`processor_config.json` `feature_extractor`, or the flat file),
    /// checked at load to state every key the log-mel front end reads.
    pub feature_extractor: Settings,
}

fn u32_field(v: &Value, key: &str) -> Result<u32, ModelError> {
    config_util::u32_field(v, key, "config.json")
}

impl Gemma4Config {
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let cfg = read_json(&dir.join("config.json"))?;
        let text = SubConfig::of(&cfg, "text_config", "gemma4_text")?;
        if let Some(mode) = text
            .raw()
            .get("use_bidirectional_attention")
            .and_then(Value::as_str)
        {
            // Bidirectional attention inside image blocks needs each token's type, which the ONNX
            // decoder's 2-D attention_mask cannot carry (docs/gemma4.md §2).
            return Err(ModelError::Config(format!(
                "text_config.use_bidirectional_attention is {mode:?}; the ONNX decoder only runs causal attention"
            )));
        }
        let files = ProcessorFiles::load(dir)?;
        let feature_extractor = files.part(Part::FeatureExtractor)?;
        feature_extractor.mel(MelConfig::gemma4_extractor())?;
        let mut eos = ids_of(cfg.get("eos_token_id"), "config.json eos_token_id")?;
        if eos.is_empty() {
            eos = text.ids("eos_token_id")?;
        }
        // transformers' config class spells it eoa_token_index; some copies say eoa_token_id.
        let eoa_key = match cfg.get("eoa_token_index") {
            Some(_) => "eoa_token_index",
            None => "eoa_token_id",
        };
        Ok(Self {
            attention: text.attention(),
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
            // Gemma4TextConfig's default is 0; a stated null leaves nothing to embed soft tokens as.
            pad_token_id: text.optional_id("pad_token_id")?.ok_or_else(|| {
                ModelError::Config(
                    "config.json text_config pad_token_id is null; soft tokens are embedded as <pad>"
                        .into(),
                )
            })?,
            vocab_size: text.positive("vocab_size")?,
            hidden_size: text.positive("hidden_size")?,
            context_length: text.positive("max_position_embeddings")?,
            final_logit_softcapping: text.optional_f32("final_logit_softcapping")?,
            bos_token_id: text.id_or_composite(&cfg, "bos_token_id")?,
            eos_token_ids: eos,
            // Gemma4Processor's own setting: only processor_config.json states it.
            audio_seq_length: files.processor().positive("audio_seq_length")?,
            image_processor: files.part(Part::ImageProcessor)?,
            feature_extractor,
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
    use crate::models::processor_config::{PREPROCESSOR_CONFIG, PROCESSOR_CONFIG};
    use serde_json::json;

    fn write(dir: &Path, name: &str, v: Value) {
        std::fs::write(dir.join(name), serde_json::to_vec(&v).unwrap()).unwrap();
    }

    fn base() -> Value {
        json!({
            "model_type": "gemma4", "image_token_id": 258880, "audio_token_id": 258881,
            "boi_token_id": 255999, "eoi_token_id": 258882, "boa_token_id": 256000,
            "eoa_token_index": 258883, "eos_token_id": [1, 106],
            "text_config": {"vocab_size": 262144, "hidden_size": 1536, "final_logit_softcapping": 30.0}
        })
    }

    /// The committed fixture's transformers 5 `processor_config.json`.
    fn fixture_processor() -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-gemma4/processor_config.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn reads_the_hub_spellings() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "config.json", base());
        write(dir.path(), PROCESSOR_CONFIG, fixture_processor());
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
        assert_eq!(c.image_processor.get("max_soft_tokens"), Some(&json!(280)));
        assert_eq!(c.feature_extractor.get("frame_length"), Some(&json!(320)));
        assert_eq!(c.soft_token_ids(), vec![258880, 258881]);

        // eoa_token_id (some copies of the config).
        let mut v = base();
        v.as_object_mut().unwrap().remove("eoa_token_index");
        v["eoa_token_id"] = json!(7);
        write(dir.path(), "config.json", v);
        assert_eq!(Gemma4Config::load(dir.path()).unwrap().eoa_token_id, 7);
    }

    /// Older layout: both parts merged in a flat preprocessor_config.json, the processor's own
    /// settings in a small processor_config.json; both layouts present: the nested entries win.
    #[test]
    fn flat_nested_and_both() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "config.json", base());
        let nested = fixture_processor();
        let mut flat = nested["image_processor"].clone();
        for (k, v) in nested["feature_extractor"].as_object().unwrap() {
            flat[k] = v.clone();
        }
        flat["max_soft_tokens"] = json!(140);
        write(dir.path(), PREPROCESSOR_CONFIG, flat);
        write(
            dir.path(),
            PROCESSOR_CONFIG,
            json!({"audio_seq_length": 750}),
        );
        let c = Gemma4Config::load(dir.path()).unwrap();
        assert_eq!(c.image_processor.get("max_soft_tokens"), Some(&json!(140)));
        assert_eq!(c.feature_extractor.get("frame_length"), Some(&json!(320)));
        write(dir.path(), PROCESSOR_CONFIG, fixture_processor());
        let c = Gemma4Config::load(dir.path()).unwrap();
        assert_eq!(c.image_processor.get("max_soft_tokens"), Some(&json!(280)));
    }

    #[test]
    fn missing_settings_name_the_key_and_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "config.json", base());
        // Neither file: the feature extractor's first key is reported with both files.
        let e = Gemma4Config::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("feature extractor setting")
                && e.contains(PREPROCESSOR_CONFIG)
                && e.contains("processor_config.json \"feature_extractor\""),
            "{e}"
        );
        let mut p = fixture_processor();
        p["feature_extractor"]
            .as_object_mut()
            .unwrap()
            .remove("mel_floor");
        write(dir.path(), PROCESSOR_CONFIG, p);
        let e = Gemma4Config::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("\"mel_floor\""), "{e}");
        let mut p = fixture_processor();
        p.as_object_mut().unwrap().remove("audio_seq_length");
        write(dir.path(), PROCESSOR_CONFIG, p);
        let e = Gemma4Config::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("\"audio_seq_length\"") && e.contains(PROCESSOR_CONFIG),
            "{e}"
        );
    }

    #[test]
    fn text_config_keys_left_out_take_the_class_defaults() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), PROCESSOR_CONFIG, fixture_processor());
        let mut v = base();
        v["text_config"] = json!({});
        v.as_object_mut().unwrap().remove("eos_token_id");
        write(dir.path(), "config.json", v);
        let c = Gemma4Config::load(dir.path()).unwrap();
        assert_eq!((c.vocab_size, c.hidden_size), (262_144, 2304));
        assert_eq!(c.final_logit_softcapping, None);
        assert_eq!((c.bos_token_id, c.eos_token_ids), (Some(2), vec![1]));
        let mut v = base();
        v["text_config"]["pad_token_id"] = Value::Null;
        write(dir.path(), "config.json", v);
        assert!(Gemma4Config::load(dir.path()).is_err());
    }

    #[test]
    fn refuses_bidirectional_vision_attention() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = base();
        v["text_config"]["use_bidirectional_attention"] = json!("vision");
        write(dir.path(), "config.json", v);
        let e = Gemma4Config::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("use_bidirectional_attention"), "{e}");
    }
}
