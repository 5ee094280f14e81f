//! Media handling every family shares: the per-request limits, getting a media item's bytes out of a
//! job (inline base64), and decoding an image with its errors classified. What a family then does with
//! the pixels or samples (sizes, tiling, features) lives in its own `preprocess` module.

use ::image::RgbImage;
use base64::Engine as _;

use crate::error::{ClassifiedError, ErrorClass};
use crate::models::AudioInput;
use crate::pipeline::audio::{self, AudioError, MelExtractor};
use crate::pipeline::image::{self, ImageError, ImageLimits};
use crate::protocol::{ChatMessage, ContentPart, MediaSource};

/// Limits on media in one request.
#[derive(Debug, Clone)]
pub struct MediaLimits {
    pub image: ImageLimits,
    pub max_audio_bytes: usize,
    /// Longer clips are rejected (the encoder takes 30 s per clip).
    pub max_audio_seconds: f64,
}

impl Default for MediaLimits {
    fn default() -> Self {
        Self {
            image: ImageLimits::default(),
            max_audio_bytes: 25 * 1024 * 1024,
            max_audio_seconds: 30.0,
        }
    }
}

/// The bytes of media item `index` (`what` = "image", "audio clip"), at most `max` of them.
pub fn media_bytes(
    what: &str,
    index: usize,
    source: &MediaSource,
    max: usize,
) -> Result<Vec<u8>, ClassifiedError> {
    match source {
        MediaSource::Inline { data } => {
            // 4 base64 chars carry 3 bytes: reject oversized data before decoding it.
            if data.len() / 4 * 3 > max + 3 {
                return Err(ClassifiedError::new(
                    ErrorClass::PayloadTooLarge,
                    format!("{what} {index} is larger than the limit of {max} bytes"),
                )
                .with_param("messages"));
            }
            let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            base64::engine::general_purpose::STANDARD
                .decode(cleaned.as_bytes())
                .or_else(|_| {
                    base64::engine::general_purpose::STANDARD_NO_PAD.decode(cleaned.as_bytes())
                })
                .map_err(|e| {
                    ClassifiedError::invalid(
                        "messages",
                        format!("{what} {index} is not valid base64: {e}"),
                    )
                })
        }
        MediaSource::ObjectStore { bucket, key, .. } => Err(ClassifiedError::new(
            ErrorClass::Internal,
            format!(
                "{what} {index} is in object store {bucket}/{key}, which must be fetched before preprocessing"
            ),
        )),
    }
}

/// Decodes image number `index` of a request to RGB; too large → 413, unreadable → 400.
pub fn decode_image(
    index: usize,
    bytes: &[u8],
    limits: &ImageLimits,
) -> Result<RgbImage, ClassifiedError> {
    image::decode_rgb(bytes, limits).map_err(|e| {
        let class = match e {
            ImageError::TooLarge { .. } | ImageError::TooManyPixels { .. } => {
                ErrorClass::PayloadTooLarge
            }
            ImageError::Unsupported(_) | ImageError::Corrupt(_) => ErrorClass::InvalidRequest,
        };
        ClassifiedError::new(class, format!("image {index}: {e}")).with_param("messages")
    })
}

/// The image sources of a conversation, in prompt order.
pub fn image_sources(messages: &[ChatMessage]) -> impl Iterator<Item = &MediaSource> {
    messages
        .iter()
        .flat_map(|m| m.content.iter())
        .filter_map(|p| match p {
            ContentPart::Image { source } => Some(source),
            _ => None,
        })
}

/// Audio clip number `index` of a request (its encoded `bytes`): decoded, downmixed, resampled to the
/// extractor's rate, and featurised; too large or too long → 413, unreadable → 400.
pub fn audio_input(
    index: usize,
    bytes: &[u8],
    format: Option<&str>,
    mel: &MelExtractor,
    limits: &MediaLimits,
) -> Result<AudioInput, ClassifiedError> {
    let err = |e: AudioError| {
        ClassifiedError::new(e.class(), format!("audio clip {index}: {e}")).with_param("messages")
    };
    if bytes.len() > limits.max_audio_bytes {
        return Err(err(AudioError::TooLarge {
            bytes: bytes.len(),
            max: limits.max_audio_bytes,
        }));
    }
    let decoded = audio::decode(bytes, format, limits.max_audio_seconds).map_err(err)?;
    let rate = mel.config().sampling_rate;
    let samples = audio::resample(&decoded.samples, decoded.sample_rate, rate).map_err(err)?;
    let features = mel.extract(&samples);
    Ok(AudioInput {
        key: crate::models::encoder_cache::media_key("audio", bytes),
        features: features.features,
        frames: features.frames,
        mel_bins: mel.config().feature_size,
        mask: features.mask,
    })
}
