//! Model families and what they share.
//!
//! - [`catalog`]: families, display names, quantization → file suffixes.
//! - [`resolve`] and [`hub`]: from `--model` to files on disk (local snapshot, HF cache, download).
//! - [`gemma3n`]: the Gemma-3n family (config, prompt building, the four graphs).
//! - [`smolvlm`]: the SmolVLM / Idefics3 family (image splitting into tiles, the three graphs).
//! - [`granite_vision`]: the Granite Vision / LLaVA-NeXT family (anyres tiles, packed features).
//! - [`gemma4`]: the Gemma 4 family (aspect-preserving patch sequences, per-item soft-token counts,
//!   the thought channel; docs/gemma4.md).
//! - [`config_util`] and [`media`]: what families share: JSON helpers, generation defaults, media
//!   limits and decoding; [`processor_config`]: a snapshot's processor settings, found where
//!   transformers 5 looks (nested in `processor_config.json`, else `preprocessor_config.json`);
//!   [`decoder`] and [`prompt`]: the shared text decoder driver and prompt steps (used by Granite
//!   Vision; the older families still carry their own copies).
//! - [`generate`]: the family-agnostic generation loop (sampling, stop conditions, detokenization),
//!   run as a step task on the model's owner thread.
//! - [`loaded`]: a loaded model as the worker sees it: preprocess a job, then stream its generation.
//!
//! A family implements [`ChatModel`] (media encoding, cache keys, and a decoder step over any number
//! of positions, returning last-position logits); the loop does the rest: prefix reuse, chunked
//! prefill, `n` choices, sampling.

pub mod catalog;
pub mod config_util;
pub mod decoder;
pub mod encoder_cache;
pub mod encoders;
pub mod family;
pub mod gemma3n;
pub mod gemma4;
pub mod generate;
pub mod granite_vision;
pub mod hub;
pub mod loaded;
pub mod media;
pub mod processor_config;
pub mod prompt;
pub mod registry;
pub mod resolve;
pub mod smolvlm;
pub mod tool_syntax;
pub mod tools;

use crate::engine::batch::BatchKv;
use crate::engine::kv::{KvCache, KvLayout};
use crate::engine::rewrite::RewriteReport;
use crate::engine::session::{GraphSession, SessionOptions};
use crate::engine::tensor::FloatData;
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
    /// `[height, width]` of the decoded image, before any resizing (what anyres packing needs).
    pub size: [usize; 2],
    /// Patch-sequence processors (Gemma 4): `pixel_values` are patch rows, not a channel-first image.
    pub patches: Option<PatchGrid>,
}

/// Where the patch rows of a patch-sequence image come from, and what they become.
#[derive(Debug, Clone)]
pub struct PatchGrid {
    /// `(x, y)` grid cell of each patch row of `pixel_values`; `(−1, −1)` for padding rows.
    pub positions: Vec<[i64; 2]>,
    /// Values per patch row.
    pub patch_dim: usize,
    /// Soft tokens (encoder rows) the image becomes.
    pub soft_tokens: usize,
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

/// Whether the decode steps of different sequences can share one decoder run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Batching {
    /// Rows of a batch compute what they would alone (up to float summation order).
    Exact,
    /// The graph quantizes activations per run (dynamic int8): a row's numbers depend on the others.
    Inexact,
    /// The 4-bit matrix products compute with int8 activations (`--matmul-accuracy-level 4`): each
    /// row is quantized on its own, but one row and several take different kernels, whose int8
    /// roundings differ — which a deep random model amplifies far past float summation order.
    Int8,
    /// The graph cannot take left-padded rows (why).
    Unsupported(String),
}

impl Batching {
    /// From what the decoder's load-time pass found: an attention mask (declared or added) makes
    /// batching possible; dynamic activation quantization makes it inexact.
    pub fn from_report(r: &RewriteReport) -> Self {
        // Fused attention takes each row's length (`seqlens_k`) instead of a mask.
        if !r.has_attention_mask() && r.attention.is_none() {
            return Self::Unsupported(r.attention_mask_skipped.clone().unwrap_or_else(|| {
                "the decoder takes no attention_mask and none was added".into()
            }));
        }
        if r.dynamic_quantize > 0 {
            Self::Inexact
        } else if r.accuracy_level == Some(4) {
            Self::Int8
        } else {
            Self::Exact
        }
    }
}

/// What a family implements for the generation loop. Runs on the owner thread only.
///
/// A sequence is its [`KvCache`]: the prompt goes through [`ChatModel::forward`] in one or more
/// chunks (after whatever prefix the prefix cache supplied), then one generated id per call.
pub trait ChatModel: Send + 'static {
    /// The decoder's cache layout (for empty caches and prefix copies).
    fn kv_layout(&self) -> &KvLayout;

    /// Whether a prompt's numbers are the same however it is split into runs. False for decoders that
    /// quantize activations dynamically per tensor (`_quantized` exports): their scale depends on
    /// every position of a run, so chunked prefill and reused prefixes change the output.
    fn split_exact(&self) -> bool;

    /// One key per prompt position for the prefix cache: the token id, or at media soft-token
    /// positions a value derived from the item's content hash.
    fn cache_keys(&self, input: &PreparedInput) -> Result<Vec<u64>, ModelError>;

    /// Encoder rows for the media items with soft tokens at positions `from..` (items wholly before
    /// `from` are already in a reused prefix and are not encoded).
    fn encode_media(&mut self, input: &PreparedInput, from: usize)
        -> Result<MediaRows, ModelError>;

    /// Feeds `ids` (never empty: the generation loop refuses empty prompts) at positions
    /// `cache.len ..`, extending `cache`; returns the logits of the last position. For prompt positions `media` holds the encoder rows, scattered at the soft-token
    /// positions (all of which must be covered); generated ids (`None`) are embedded as they are.
    fn forward(
        &mut self,
        ids: &[u32],
        media: Option<&MediaRows>,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, ModelError>;

    /// Whether [`ChatModel::forward_rows`] can run several sequences at once.
    fn batching(&self) -> Batching;

    /// One decoder run over every row of `batch`, feeding row r the generated id `ids[r]`; returns
    /// each row's logits, in row order.
    fn forward_rows(
        &mut self,
        ids: &[u32],
        batch: &mut BatchKv,
    ) -> Result<Vec<Vec<f32>>, ModelError>;
}

/// Encoder rows by absolute prompt position, for the items [`ChatModel::encode_media`] encoded.
#[derive(Debug, Default)]
pub struct MediaRows {
    /// Per item: its positions (ascending) and one row per position.
    items: Vec<(Vec<usize>, FloatData)>,
}

impl MediaRows {
    pub fn push(&mut self, positions: Vec<usize>, rows: FloatData) {
        self.items.push((positions, rows));
    }

    /// Writes the rows of positions `start .. start + n` into `embeds` (row `p - start`, each `hidden`
    /// wide); returns how many rows were written.
    pub fn scatter_into(
        &self,
        embeds: &mut FloatData,
        hidden: usize,
        start: usize,
        n: usize,
    ) -> Result<usize, ModelError> {
        let mut written = 0;
        for (positions, rows) in &self.items {
            let lo = positions.partition_point(|&p| p < start);
            let hi = positions.partition_point(|&p| p < start + n);
            if lo == hi {
                continue;
            }
            let local: Vec<usize> = positions[lo..hi].iter().map(|p| p - start).collect();
            let part = rows.rows(hidden, lo, hi)?;
            embeds.scatter_rows(hidden, &local, &part)?;
            written += hi - lo;
        }
        Ok(written)
    }
}

impl MediaRows {
    /// Adds the rows of the items (with their positions) that reach position `from` or later,
    /// encoding only those with `encode` (one row block per item, in order).
    pub fn add_needed<T>(
        &mut self,
        positions: Vec<Vec<usize>>,
        items: &[T],
        from: usize,
        encode: impl FnOnce(&[&T]) -> Result<Vec<Vec<f32>>, ModelError>,
    ) -> Result<(), ModelError> {
        let (pos, items): (Vec<_>, Vec<_>) = positions
            .into_iter()
            .zip(items)
            .filter(|(p, _)| p.last().is_some_and(|&l| l >= from))
            .unzip();
        if items.is_empty() {
            return Ok(());
        }
        for (p, r) in pos.into_iter().zip(encode(&items)?) {
            self.push(p, FloatData::F32(r));
        }
        Ok(())
    }
}

/// `inputs_embeds` of prompt positions `start .. start + ids.len()` with the media rows written at the
/// positions holding one of `soft_tokens`; every such position must have a row. Generated ids
/// (`media: None`) keep their embeddings.
pub fn with_media_rows(
    embeds: ort::value::DynValue,
    ids: &[u32],
    soft_tokens: &[u32],
    media: Option<&MediaRows>,
    hidden: usize,
    start: usize,
) -> Result<ort::value::DynValue, ModelError> {
    let soft = ids.iter().filter(|t| soft_tokens.contains(t)).count();
    let Some(media) = media.filter(|_| soft > 0) else {
        return Ok(embeds);
    };
    let (mut host, shape) = crate::engine::tensor::extract_floats(&embeds)?;
    let written = media.scatter_into(&mut host, hidden, start, ids.len())?;
    if written != soft {
        return Err(ModelError::Request(ClassifiedError::new(
            ErrorClass::Internal,
            format!(
                "{soft} media soft tokens at positions {start}..{} but encoder rows for {written}",
                start + ids.len()
            ),
        )));
    }
    Ok(host.into_value(&shape)?)
}

/// The positions of each media item of one kind: items take the positions holding `token`, in order,
/// `rows[i]` each. Fails when the prompt holds another number of soft tokens.
pub fn media_positions(
    ids: &[u32],
    token: u32,
    rows: &[usize],
    what: &str,
) -> Result<Vec<Vec<usize>>, ModelError> {
    let all: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == token)
        .map(|(i, _)| i)
        .collect();
    let want: usize = rows.iter().sum();
    if all.len() != want {
        return Err(ModelError::Request(ClassifiedError::new(
            ErrorClass::Internal,
            format!(
                "the prompt has {} {what} soft tokens; its {} {what} item(s) take {want}",
                all.len(),
                rows.len()
            ),
        )));
    }
    let mut at = 0;
    Ok(rows
        .iter()
        .map(|&n| {
            let p = all[at..at + n].to_vec();
            at += n;
            p
        })
        .collect())
}

/// Prefix-cache keys: token ids, with each media item's positions set to a key from its content
/// hash (top bit set, so it never equals a token id).
pub fn cache_keys(ids: &[u32], media: &[(&[usize], &encoder_cache::MediaKey)]) -> Vec<u64> {
    let mut keys: Vec<u64> = ids.iter().map(|&t| t as u64).collect();
    for (positions, key) in media {
        let mut b = [0u8; 8];
        b.copy_from_slice(&key[..8]);
        let k = u64::from_le_bytes(b) | 1 << 63;
        for &p in positions.iter() {
            if let Some(slot) = keys.get_mut(p) {
                *slot = k;
            }
        }
    }
    keys
}

/// [`cache_keys`] for a prompt whose images (in order) take `positions`.
pub fn image_cache_keys(ids: &[u32], positions: &[Vec<usize>], images: &[ImageInput]) -> Vec<u64> {
    let media: Vec<(&[usize], &encoder_cache::MediaKey)> = positions
        .iter()
        .zip(images)
        .map(|(p, i)| (p.as_slice(), &i.key))
        .collect();
    cache_keys(ids, &media)
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
