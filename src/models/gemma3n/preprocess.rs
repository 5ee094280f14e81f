//! Gemma-3n media preprocessing: the wiring of the generic image and audio stages with the values of
//! the model's `preprocessor_config.json` (model_interface.md §1.6–1.7). Errors name the media item by
//! its index in the request (images and clips counted separately, in message order).

use std::path::Path;

use serde_json::Value;

use crate::error::ClassifiedError;
use crate::models::config_util::read_json_opt;
use crate::models::media::{self, decode_image, media_bytes, MediaLimits};
use crate::models::{AudioInput, ImageInput, ModelError};
use crate::pipeline::audio::{MelConfig, MelExtractor};
use crate::pipeline::image::{self, Filter};
use crate::protocol::MediaSource;

/// Image settings of a SigLIP-style processor.
#[derive(Debug, Clone)]
struct ImageProcessing {
    width: u32,
    height: u32,
    filter: Filter,
    rescale: Option<f64>,
    normalize: Option<([f32; 3], [f32; 3])>,
}

impl ImageProcessing {
    fn from_config(v: &Value) -> Result<Self, ModelError> {
        let size = v.get("size");
        let dim = |k: &str| {
            size.and_then(|s| s.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(768) as u32
        };
        let resample = v.get("resample").and_then(Value::as_u64).unwrap_or(2);
        let filter = Filter::from_pil(resample).ok_or_else(|| {
            ModelError::Config(format!(
                "preprocessor_config.json: unsupported resample {resample}"
            ))
        })?;
        let flag = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
        let triple = |k: &str| -> Option<[f32; 3]> {
            let a = v.get(k)?.as_array()?;
            let f = |i: usize| {
                a.get(i)
                    .or(a.first())
                    .and_then(Value::as_f64)
                    .map(|x| x as f32)
            };
            Some([f(0)?, f(1)?, f(2)?])
        };
        let normalize = if flag("do_normalize", false) {
            Some((
                triple("image_mean").unwrap_or([0.5; 3]),
                triple("image_std").unwrap_or([0.5; 3]),
            ))
        } else {
            None
        };
        Ok(Self {
            width: dim("width"),
            height: dim("height"),
            filter,
            rescale: flag("do_rescale", true).then(|| {
                v.get("rescale_factor")
                    .and_then(Value::as_f64)
                    .unwrap_or(1.0 / 255.0)
            }),
            normalize,
        })
    }
}

/// Turns job media into encoder inputs.
pub struct MediaDecoder {
    image: ImageProcessing,
    mel: MelExtractor,
    limits: MediaLimits,
}

impl MediaDecoder {
    pub fn new(dir: &Path, limits: MediaLimits) -> Result<Self, ModelError> {
        let cfg = read_json_opt(&dir.join("preprocessor_config.json"))?.unwrap_or(Value::Null);
        // Processors saved by transformers nest the parts; older ones flatten them into one object.
        let image_cfg = cfg.get("image_processor").unwrap_or(&cfg);
        let audio_cfg = cfg.get("feature_extractor").unwrap_or(&cfg);
        let mel = MelConfig::from_preprocessor_config(audio_cfg, MelConfig::gemma3n_extractor());
        Ok(Self {
            image: ImageProcessing::from_config(image_cfg)?,
            mel: MelExtractor::new(&mel),
            limits,
        })
    }

    /// Decodes and preprocesses image number `index` of the request.
    pub fn image(&self, index: usize, source: &MediaSource) -> Result<ImageInput, ClassifiedError> {
        let bytes = media_bytes("image", index, source, self.limits.image.max_bytes)?;
        self.image_bytes(index, &bytes)
    }

    pub fn image_bytes(&self, index: usize, bytes: &[u8]) -> Result<ImageInput, ClassifiedError> {
        let rgb = decode_image(index, bytes, &self.limits.image)?;
        let p = &self.image;
        let resized = image::resize(&rgb, p.width, p.height, p.filter);
        let pixel_values = image::to_chw(&resized, p.rescale.unwrap_or(1.0), p.normalize);
        Ok(ImageInput {
            key: crate::models::encoder_cache::media_key("image", bytes),
            pixel_values,
            frames: 1,
            shape: [3, p.height as usize, p.width as usize],
            size: [rgb.height() as usize, rgb.width() as usize],
            patches: None,
        })
    }

    /// Decodes, resamples and featurises audio clip number `index` of the request.
    pub fn audio(
        &self,
        index: usize,
        source: &MediaSource,
        format: Option<&str>,
    ) -> Result<AudioInput, ClassifiedError> {
        let bytes = media_bytes("audio clip", index, source, self.limits.max_audio_bytes)?;
        self.audio_bytes(index, &bytes, format)
    }

    pub fn audio_bytes(
        &self,
        index: usize,
        bytes: &[u8],
        format: Option<&str>,
    ) -> Result<AudioInput, ClassifiedError> {
        media::audio_input(index, bytes, format, &self.mel, &self.limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny model's config states the reference defaults, and a model without a
    /// `preprocessor_config.json` (read as `null`) gets them unchanged.
    #[test]
    fn mel_defaults_are_the_reference_extractors() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-gemma3n/preprocessor_config.json");
        let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let d = format!("{:?}", MelConfig::gemma3n_extractor());
        let read = MelConfig::from_preprocessor_config(&v, MelConfig::gemma3n_extractor());
        assert_eq!(format!("{read:?}"), d);
        let none =
            MelConfig::from_preprocessor_config(&Value::Null, MelConfig::gemma3n_extractor());
        assert_eq!(format!("{none:?}"), d);
    }
}
