//! Model families and what they share.
//!
//! - [`catalog`]: families, display names, quantization → file suffixes.
//! - [`resolve`] and [`hub`]: from `--model` to files on disk (local snapshot, HF cache, download).
//! - [`gemma3n`]: the Gemma-3n family (config, prompt building, the four graphs).
//! - [`smolvlm`]: the SmolVLM / Idefics3 family (image splitting into tiles, the three graphs).
//! - [`config_util`] and [`media`]: what families share: JSON helpers, generation defaults, media
//!   limits and decoding.
//! - [`generate`]: the family-agnostic generation loop (sampling, stop conditions, detokenization),
//!   run as a step task on the model's owner thread.
//! - [`loaded`]: a loaded model as the worker sees it: preprocess a job, then stream its generation.
//!
//! A family implements [`ChatModel`] (prefill and one decode step, returning last-position logits);
//! the loop does the rest.

pub mod catalog;
pub mod config_util;
pub mod encoder_cache;
pub mod gemma3n;
pub mod generate;
pub mod hub;
pub mod loaded;
pub mod media;
pub mod resolve;
pub mod smolvlm;

use crate::engine::session::{GraphSession, SessionOptions};
use crate::engine::EngineError;
use crate::error::{ClassifiedError, ErrorClass};

/// Errors of the model layer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model configuration: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The request cannot be served as given (template rejection, unsupported media, too long).
    #[error("{0}")]
    Request(ClassifiedError),
}

impl ModelError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Config(_) | Self::Tokenizer(_) => ErrorClass::Internal,
            Self::Engine(e) => e.class(),
            Self::Request(e) => e.class,
        }
    }

    pub fn into_classified(self) -> ClassifiedError {
        match self {
            Self::Request(e) => e,
            other => ClassifiedError::new(other.class(), other.to_string()),
        }
    }
}

/// A decoded, preprocessed image: `pixel_values` for one image, channel-first.
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// Content hash of the encoded image bytes (the encoder-cache key).
    pub key: encoder_cache::MediaKey,
    /// `frames` frames of `shape`, one after the other.
    pub pixel_values: Vec<f32>,
    /// Frames the image became: 1, or its tiles plus the whole image for splitting processors (SmolVLM).
    pub frames: usize,
    /// `[channels, height, width]` of each frame.
    pub shape: [usize; 3],
}

/// Audio features for one clip.
#[derive(Debug, Clone)]
pub struct AudioInput {
    /// Content hash of the encoded audio bytes (the encoder-cache key).
    pub key: encoder_cache::MediaKey,
    /// `[frames, mel_bins]`, row-major.
    pub features: Vec<f32>,
    pub frames: usize,
    pub mel_bins: usize,
    /// `true` = a valid (not padded) frame.
    pub mask: Vec<bool>,
}

/// A prompt at each stage, kept for tests and debugging.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// The chat template's output.
    pub rendered: String,
    /// After placeholder expansion.
    pub expanded: String,
    pub ids: Vec<u32>,
    pub n_images: usize,
    pub n_audio: usize,
}

/// Everything a prefill needs: prompt ids and the media in prompt order.
#[derive(Debug, Clone, Default)]
pub struct PreparedInput {
    pub ids: Vec<u32>,
    pub images: Vec<ImageInput>,
    pub audio: Vec<AudioInput>,
}

/// What a family implements for the generation loop. Runs on the owner thread only.
pub trait ChatModel: Send + 'static {
    /// Per-sequence state (the KV cache and position).
    type Seq: Send;

    /// Runs the encoders and the prompt through the decoder; returns the state and the logits of the
    /// last prompt position.
    fn prefill(&mut self, input: &PreparedInput) -> Result<(Self::Seq, Vec<f32>), ModelError>;

    /// Feeds one generated token; returns the logits for the next position.
    fn decode(&mut self, seq: &mut Self::Seq, token: u32) -> Result<Vec<f32>, ModelError>;
}

/// Loads one graph of a resolved model, `None` when the model has no file for it. The decoder is
/// loaded with its `logits` reduced to the last position where `opts.last_logits` says so.
pub(crate) fn load_graph(
    model: &resolve::ResolvedModel,
    c: catalog::Component,
    opts: &SessionOptions,
) -> Result<Option<GraphSession>, ModelError> {
    let Some(p) = model.graph_path(c) else {
        return Ok(None);
    };
    Ok(Some(if c == catalog::Component::DecoderModelMerged {
        GraphSession::load_decoder(c.file_stem(), &p, opts, "logits")?
    } else {
        GraphSession::load(c.file_stem(), &p, opts)?
    }))
}
