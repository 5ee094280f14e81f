//! Gemma-3n media preprocessing: the wiring of the generic image and audio stages with the values of
//! the model's image processor and feature extractor settings (model_interface.md §1.6–1.7; where they
//! are read from: [`crate::models::processor_config`]). Errors name the media item by
//! its index in the request (images and clips counted separately, in message order).

use std::path::Path;

use crate::error::ClassifiedError;
use crate::models::media::{self, decode_image, media_bytes, MediaLimits};
use crate::models::processor_config::{Part, ProcessorFiles, Settings};
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
    /// `SiglipImageProcessor`'s settings: every image is resized to `size` (`height` × `width`).
    fn from_settings(s: &Settings) -> Result<Self, ModelError> {
        if !s.flag("do_resize")? {
            return Err(s.invalid(
                "do_resize",
                "the vision encoder takes images of `size` only",
            ));
        }
        let size = s.size("size")?;
        let (Some(height), Some(width)) = (size.height, size.width) else {
            return Err(s.invalid("size", "expected height and width"));
        };
        Ok(Self {
            width,
            height,
            filter: s.resample()?,
            rescale: s.rescale()?,
            normalize: s.normalize()?,
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
    /// The image processor's and the feature extractor's settings of snapshot `dir`, found where
    /// transformers looks ([`ProcessorFiles`]): hub snapshots merge both into one flat
    /// `preprocessor_config.json`, transformers 5 nests them in `processor_config.json`.
    pub fn new(dir: &Path, limits: MediaLimits) -> Result<Self, ModelError> {
        let files = ProcessorFiles::load(dir)?;
        let image = ImageProcessing::from_settings(&files.part(Part::ImageProcessor)?)?;
        let mel = files
            .part(Part::FeatureExtractor)?
            .mel(MelConfig::gemma3n_extractor())?;
        Ok(Self {
            image,
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
    use crate::models::processor_config::{PREPROCESSOR_CONFIG, PROCESSOR_CONFIG};
    use serde_json::{json, Value};

    fn fixture_flat() -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-gemma3n/preprocessor_config.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn write(dir: &Path, name: &str, v: &Value) {
        std::fs::write(dir.join(name), v.to_string()).unwrap();
    }

    /// The tiny model's flat file states the reference extractor's settings.
    #[test]
    fn mel_defaults_are_the_reference_extractors() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), PREPROCESSOR_CONFIG, &fixture_flat());
        let d = MediaDecoder::new(dir.path(), MediaLimits::default()).unwrap();
        assert_eq!(
            format!("{:?}", d.mel.config()),
            format!("{:?}", MelConfig::gemma3n_extractor())
        );
        assert_eq!((d.image.width, d.image.height), (768, 768));
        assert_eq!(d.image.normalize, None);
    }

    /// transformers 5's layout: the same settings nested; the nested entries win over a flat file.
    #[test]
    fn nested_parts_win() {
        let dir = tempfile::tempdir().unwrap();
        let flat = fixture_flat();
        let mut image = flat.clone();
        image["size"] = json!({"height": 512, "width": 384});
        image["resample"] = json!(3);
        let mut audio = flat.clone();
        audio["feature_size"] = json!(64);
        write(
            dir.path(),
            PROCESSOR_CONFIG,
            &json!({"image_processor": image, "feature_extractor": audio}),
        );
        let d = MediaDecoder::new(dir.path(), MediaLimits::default()).unwrap();
        assert_eq!((d.image.width, d.image.height), (384, 512));
        assert_eq!(d.image.filter, Filter::Bicubic);
        assert_eq!(d.mel.config().feature_size, 64);
        write(dir.path(), PREPROCESSOR_CONFIG, &flat);
        let d = MediaDecoder::new(dir.path(), MediaLimits::default()).unwrap();
        assert_eq!((d.image.width, d.mel.config().feature_size), (384, 64));
    }

    /// A setting in neither file is an error naming it and both files; so is one the nested entry
    /// leaves out even though the flat file has it (transformers does not merge them).
    #[test]
    fn missing_settings_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = |dir: &Path| {
            MediaDecoder::new(dir, MediaLimits::default())
                .err()
                .expect("an error")
                .to_string()
        };
        let e = err(dir.path());
        assert!(
            e.contains("\"do_resize\"")
                && e.contains(PREPROCESSOR_CONFIG)
                && e.contains("processor_config.json \"image_processor\""),
            "{e}"
        );
        let mut flat = fixture_flat();
        flat.as_object_mut().unwrap().remove("mel_floor");
        write(dir.path(), PREPROCESSOR_CONFIG, &flat);
        let e = err(dir.path());
        assert!(e.contains("feature extractor setting \"mel_floor\""), "{e}");
        write(dir.path(), PREPROCESSOR_CONFIG, &fixture_flat());
        let mut image = fixture_flat();
        image.as_object_mut().unwrap().remove("rescale_factor");
        write(
            dir.path(),
            PROCESSOR_CONFIG,
            &json!({"image_processor": image}),
        );
        let e = err(dir.path());
        assert!(e.contains("\"rescale_factor\""), "{e}");
    }
}
