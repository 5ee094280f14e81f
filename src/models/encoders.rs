//! Encoder pieces the families share: the audio encoder that takes one clip's log-mel features and
//! frame mask (Gemma-3n, Gemma 4), cutting a batched run's rows back into items, the refusal when a
//! model has no encoder for a modality, and the prefix-cache keys of a prompt with images and clips.

use std::borrow::Cow;

use crate::engine::session::{ElemType, GraphSession};
use crate::engine::tensor;
use crate::error::{ClassifiedError, ErrorClass};
use crate::models::decoder::{interface, only_known_inputs, width};
use crate::models::encoder_cache::{EncoderCache, MediaKey};
use crate::models::{cache_keys, AudioInput, ImageInput, ModelError};

const FEATURES: &str = "input_features";
const MASK: &str = "input_features_mask";
pub const AUDIO_OUT: &str = "audio_features";

/// The request asks for a modality the model has no encoder for (400 on `messages`).
pub fn no_encoder(encoder: &str, takes: &str) -> ModelError {
    ModelError::Request(ClassifiedError::invalid(
        "messages",
        format!("this model has no {encoder} encoder, so it cannot take {takes}"),
    ))
}

/// An encoder's output that does not fit the prompt: a bug or a graph unlike its config.
pub fn mismatch(message: String) -> ModelError {
    ModelError::Request(ClassifiedError::new(ErrorClass::Internal, message))
}

/// `rows` (flattened, `hidden` wide) of a batched run over items taking `counts[i]` rows each, cut
/// back into one `Vec` per item; fails when the run gave another number of rows.
pub fn split_rows(
    rows: Vec<f32>,
    counts: &[usize],
    hidden: usize,
    what: &str,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let want: usize = counts.iter().sum();
    if rows.len() != want * hidden {
        return Err(mismatch(format!(
            "the {what} encoder returned {} values for {} items; expected {want} rows of {hidden}",
            rows.len(),
            counts.len()
        )));
    }
    let mut at = 0;
    Ok(counts
        .iter()
        .map(|&n| {
            let part = rows[at..at + n * hidden].to_vec();
            at += n * hidden;
            part
        })
        .collect())
}

/// Prefix-cache keys of a prompt whose images take `image_positions` and clips `audio_positions`.
pub fn media_cache_keys(
    ids: &[u32],
    image_positions: &[Vec<usize>],
    images: &[ImageInput],
    audio_positions: &[Vec<usize>],
    audio: &[AudioInput],
) -> Vec<u64> {
    let media: Vec<(&[usize], &MediaKey)> = image_positions
        .iter()
        .zip(images)
        .map(|(p, i)| (p.as_slice(), &i.key))
        .chain(
            audio_positions
                .iter()
                .zip(audio)
                .map(|(p, a)| (p.as_slice(), &a.key)),
        )
        .collect();
    cache_keys(ids, &media)
}

/// An `audio_encoder` graph taking `input_features [1, frames, bins]` and `input_features_mask
/// [1, frames]` (true = valid) and returning `audio_features [.., hidden]`: run once per clip, since
/// clips differ in length.
pub struct ClipEncoder {
    session: GraphSession,
    features_type: ElemType,
}

impl ClipEncoder {
    /// Checks the graph's names, types and output width.
    pub fn new(session: GraphSession, hidden: usize, family: &str) -> Result<Self, ModelError> {
        session.require(&[FEATURES, MASK], &[AUDIO_OUT])?;
        only_known_inputs(&session, &[FEATURES, MASK], family)?;
        let features_type = session.input_type(FEATURES)?;
        if !features_type.is_float() {
            return Err(interface(
                &session,
                format!("{FEATURES} is {features_type}, expected a float type"),
            ));
        }
        if let Some(h) = width(session.output(AUDIO_OUT)).filter(|&h| h != hidden) {
            return Err(interface(
                &session,
                format!(
                    "{AUDIO_OUT} has width {h}; config.json text_config.hidden_size is {hidden}"
                ),
            ));
        }
        Ok(Self {
            session,
            features_type,
        })
    }

    pub fn session(&self) -> &GraphSession {
        &self.session
    }

    /// Rows for `clips`, in order: cached ones from `cache`, the rest one run each; clip `c` must
    /// give `rows(c)` rows of `hidden`.
    pub fn encode(
        &mut self,
        cache: &mut EncoderCache,
        clips: &[&AudioInput],
        hidden: usize,
        rows: impl Fn(&AudioInput) -> usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        cache.get_or_encode(
            clips,
            |c| c.key,
            |missing| {
                missing
                    .iter()
                    .map(|clip| {
                        let shape = [1, clip.frames as i64, clip.mel_bins as i64];
                        let feats =
                            tensor::float_value(self.features_type, &shape, clip.features.clone())?;
                        let mask = tensor::bool_value(&[1, clip.frames as i64], clip.mask.clone())?;
                        let out = self
                            .session
                            .run_output(
                                vec![
                                    (Cow::Borrowed(FEATURES), feats.into()),
                                    (Cow::Borrowed(MASK), mask.into()),
                                ],
                                AUDIO_OUT,
                            )?
                            .to_f32_vec();
                        let want = rows(clip);
                        if out.len() != want * hidden {
                            return Err(mismatch(format!(
                                "the audio encoder returned {} rows of {hidden} for a clip the prompt gives {want} audio soft tokens",
                                out.len() / hidden.max(1)
                            )));
                        }
                        Ok(out)
                    })
                    .collect()
            },
        )
    }
}
