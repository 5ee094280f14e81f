//! Gemma 4 media preprocessing (docs/gemma4.md §3): the processor's settings read from the snapshot and the
//! generic image and audio stages wired with them.
//!
//! Images keep their aspect ratio: resized (Pillow bicubic) to the largest size whose sides are multiples of
//! `pooling_kernel_size · patch_size` within `max_soft_tokens · pooling_kernel_size²` patches, rescaled, cut
//! into patches, padded to that many patch rows; an image becomes `patches / pooling_kernel_size²` soft
//! tokens. Audio: the semicausal log-mel front end; a clip becomes as many soft tokens as its frame mask
//! keeps valid entries after the encoder's two stride-2 subsamplings.

use crate::error::ClassifiedError;
use crate::models::media::{self, decode_image, media_bytes, MediaLimits};
use crate::models::processor_config::Settings;
use crate::models::{AudioInput, ImageInput, ModelError, PatchGrid};
use crate::pipeline::audio::{MelConfig, MelExtractor};
use crate::pipeline::image::{self, Filter};
use crate::protocol::MediaSource;

/// The soft-token counts transformers accepts for `max_soft_tokens`.
const SUPPORTED_SOFT_TOKENS: [usize; 5] = [70, 140, 280, 560, 1120];

/// `Gemma4ImageProcessor`'s settings.
#[derive(Debug, Clone)]
pub struct ImageProcessing {
    pub patch_size: usize,
    pub max_soft_tokens: usize,
    pub pooling_kernel_size: usize,
    filter: Filter,
    rescale: Option<f64>,
    normalize: Option<([f32; 3], [f32; 3])>,
}

impl ImageProcessing {
    /// From the image processor's settings (`Gemma4ImageProcessor`'s keys, each required).
    pub fn from_config(s: &Settings) -> Result<Self, ModelError> {
        if !s.flag("do_resize")? {
            return Err(s.invalid(
                "do_resize",
                "images are always resized to fit the patch budget here",
            ));
        }
        let p = Self {
            patch_size: s.positive("patch_size")?,
            max_soft_tokens: s.positive("max_soft_tokens")?,
            pooling_kernel_size: s.positive("pooling_kernel_size")?,
            filter: s.resample()?,
            rescale: s.rescale()?,
            normalize: s.normalize()?,
        };
        if !SUPPORTED_SOFT_TOKENS.contains(&p.max_soft_tokens) {
            return Err(s.invalid(
                "max_soft_tokens",
                format!("transformers accepts {SUPPORTED_SOFT_TOKENS:?}"),
            ));
        }
        Ok(p)
    }

    /// Patch rows every image is padded to.
    pub fn max_patches(&self) -> usize {
        self.max_soft_tokens * self.pooling_kernel_size.pow(2)
    }

    /// Values per patch row.
    pub fn patch_dim(&self) -> usize {
        self.patch_size * self.patch_size * 3
    }

    /// `get_aspect_ratio_preserving_size`: the `(height, width)` an `h × w` image is resized to, `None`
    /// when both sides round to nothing.
    pub fn target_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let max_patches = self.max_patches();
        let target_px = (max_patches * self.patch_size * self.patch_size) as f64;
        let factor = (target_px / (h as f64 * w as f64)).sqrt();
        let side = self.pooling_kernel_size * self.patch_size;
        let round_down = |x: f64| (x / side as f64).floor() as usize * side;
        let (th, tw) = (round_down(factor * h as f64), round_down(factor * w as f64));
        let max_side = max_patches / self.pooling_kernel_size.pow(2) * side;
        match (th, tw) {
            (0, 0) => None,
            (0, _) => Some((
                side,
                ((w as f64 / h as f64).floor() as usize * side).min(max_side),
            )),
            (_, 0) => Some((
                ((h as f64 / w as f64).floor() as usize * side).min(max_side),
                side,
            )),
            size => Some(size),
        }
    }
}

/// The snapshot's feature extractor settings over [`MelConfig::gemma4_extractor`]; settings that
/// [`super::Gemma4Config::load`] checked (it refuses a snapshot whose keys are missing or invalid).
pub fn mel_config(feature_extractor: &Settings) -> MelConfig {
    MelConfig::from_preprocessor_config(
        &feature_extractor.to_value(),
        MelConfig::gemma4_extractor(),
    )
}

/// Soft tokens of a clip with frame mask `mask`: the valid entries left after two `[::2]` subsamplings
/// (the audio encoder's stride-2 convolutions), as `Gemma4Processor.replace_audio_token` counts them.
pub fn audio_soft_tokens(mask: &[bool]) -> usize {
    mask.iter().step_by(4).filter(|&&m| m).count()
}

/// Turns job media into encoder inputs.
pub struct MediaDecoder {
    image: ImageProcessing,
    mel: MelExtractor,
    limits: MediaLimits,
}

impl MediaDecoder {
    pub fn new(
        image: ImageProcessing,
        mel: &MelConfig,
        limits: MediaLimits,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            image,
            mel: MelExtractor::new(mel),
            limits,
        })
    }

    pub fn image_processing(&self) -> &ImageProcessing {
        &self.image
    }

    /// Decodes and preprocesses image number `index` of the request.
    pub fn image(&self, index: usize, source: &MediaSource) -> Result<ImageInput, ClassifiedError> {
        let bytes = media_bytes("image", index, source, self.limits.image.max_bytes)?;
        self.image_bytes(index, &bytes)
    }

    pub fn image_bytes(&self, index: usize, bytes: &[u8]) -> Result<ImageInput, ClassifiedError> {
        let rgb = decode_image(index, bytes, &self.limits.image)?;
        let p = &self.image;
        let (h, w) = (rgb.height() as usize, rgb.width() as usize);
        let (th, tw) = p.target_size(h, w).ok_or_else(|| {
            ClassifiedError::invalid(
                "messages",
                format!(
                    "image {index}: a {w}x{h} image is too narrow to keep its aspect ratio in {} patches of {}x{} pixels",
                    p.max_patches(),
                    p.patch_size,
                    p.patch_size
                ),
            )
        })?;
        let resized = if (th, tw) == (h, w) {
            rgb
        } else {
            image::resize(&rgb, tw as u32, th as u32, p.filter)
        };
        let max_patches = p.max_patches();
        let (pixel_values, positions) = image::to_patches(
            &resized,
            p.patch_size,
            p.rescale.unwrap_or(1.0),
            p.normalize,
            max_patches,
        );
        let patches = (th / p.patch_size) * (tw / p.patch_size);
        Ok(ImageInput {
            key: crate::models::encoder_cache::media_key("image", bytes),
            pixel_values,
            frames: 1,
            shape: [3, th, tw],
            size: [h, w],
            patches: Some(PatchGrid {
                positions,
                patch_dim: p.patch_dim(),
                soft_tokens: patches / p.pooling_kernel_size.pow(2),
            }),
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
        media::audio_input(index, &bytes, format, &self.mel, &self.limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::processor_config::{Part, ProcessorFiles, PROCESSOR_CONFIG};
    use serde_json::{json, Value};

    fn fixture_processor() -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-gemma4/processor_config.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// `processor_config.json` holding `v` read back as the part's settings.
    fn settings(part: Part, v: Value) -> Settings {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PROCESSOR_CONFIG), v.to_string()).unwrap();
        ProcessorFiles::load(dir.path())
            .unwrap()
            .part(part)
            .unwrap()
    }

    fn image_settings(patch: Value) -> Settings {
        let mut v = fixture_processor();
        for (k, x) in patch.as_object().unwrap() {
            v["image_processor"][k] = x.clone();
        }
        settings(Part::ImageProcessor, v)
    }

    /// The fixture states `Gemma4ImageProcessor`'s defaults.
    fn default_processing() -> ImageProcessing {
        ImageProcessing::from_config(&image_settings(json!({}))).unwrap()
    }

    #[test]
    fn target_sizes_as_transformers() {
        let p = default_processing();
        assert_eq!(p.max_patches(), 2520);
        // Token counts of transformers.js' Gemma4ImageProcessor tests (from the Python processor).
        for ((h, w), tokens) in [
            ((480, 640), 266),
            ((408, 612), 260),
            ((224, 224), 256),
            ((640, 1280), 253),
        ] {
            let (th, tw) = p.target_size(h, w).unwrap();
            assert_eq!((th % 48, tw % 48), (0, 0));
            assert_eq!(th / 16 * (tw / 16) / 9, tokens, "{h}x{w} -> {th}x{tw}");
        }
        // One side rounds to nothing: it becomes one pooling cell, the other its ratio, capped.
        assert_eq!(p.target_size(1, 10_000), Some((48, 280 * 48)));
        assert_eq!(p.target_size(10_000, 3), Some((280 * 48, 48)));
        assert_eq!(p.target_size(1, 500), Some((48, 280 * 48)));
    }

    #[test]
    fn settings_are_checked() {
        let err = |patch: Value| {
            ImageProcessing::from_config(&image_settings(patch))
                .unwrap_err()
                .to_string()
        };
        assert!(err(json!({"max_soft_tokens": 100})).contains("max_soft_tokens"));
        assert!(err(json!({"resample": 9})).contains("resample"));
        assert!(err(json!({"do_resize": false})).contains("do_resize"));
        assert!(err(json!({"patch_size": 0})).contains("patch_size"));
        let mut v = fixture_processor();
        v["image_processor"]
            .as_object_mut()
            .unwrap()
            .remove("pooling_kernel_size");
        let e = ImageProcessing::from_config(&settings(Part::ImageProcessor, v))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"pooling_kernel_size\""), "{e}");
    }

    #[test]
    fn the_fixture_states_the_defaults() {
        let fe = settings(Part::FeatureExtractor, fixture_processor());
        assert_eq!(
            format!("{:?}", mel_config(&fe)),
            format!("{:?}", MelConfig::gemma4_extractor())
        );
        let p = default_processing();
        assert_eq!(
            (p.patch_size, p.max_soft_tokens, p.pooling_kernel_size),
            (16, 280, 3)
        );
        assert_eq!(
            (p.filter, p.rescale, p.normalize),
            (Filter::Bicubic, Some(1.0 / 255.0), None)
        );
    }

    #[test]
    fn audio_tokens_follow_the_subsampled_mask() {
        // 249 valid of 250 frames (a 2.5 s clip): [::2] twice keeps frames 0, 4, ..., 248.
        let mut mask = vec![true; 250];
        mask[249] = false;
        assert_eq!(audio_soft_tokens(&mask), 63);
        // 5 frames, the last invalid (50 ms): frames 0 and 4 are kept, one valid.
        assert_eq!(audio_soft_tokens(&[true, true, true, true, false]), 1);
        assert_eq!(audio_soft_tokens(&[]), 0);
    }
}
