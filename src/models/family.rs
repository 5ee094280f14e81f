//! The contract between the generic serving code and a model family (HOUSE.md move 1): what a family's
//! folder exports ([`FamilySpec`]: its model types, graphs, quantizations, catalog names and `load`),
//! what its `load` returns ([`LoadedFamily`] with a [`FamilyBackend`]), and the pieces it builds that
//! from ([`LoadOptions`], [`Runner`], [`PrefixShare`], [`load_tokenizer`]). Families import this
//! module, never [`super::loaded`], so the generic side can list them ([`super::registry`]) without a
//! circle.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::catalog::{Component, Quant};
use super::config_util::GenerationDefaults;
use super::encoder_cache::CacheStats;
use super::generate::{BatchPolicy, GenEvent, GenParams, Generation, ModelEngine};
use super::media::MediaLimits;
use super::resolve::ResolvedModel;
use super::{ChatModel, ModelError, PreparedInput, Prompt};
use crate::engine::batch::BatchStats;
use crate::engine::prefix_cache::{PrefixCache, PrefixCacheStats};
use crate::engine::session::SessionOptions;
use crate::engine::thread::EngineThread;
use crate::error::{ClassifiedError, ErrorClass};
pub use crate::pipeline::reasoning::ReasoningMarkers;
use crate::protocol::{ChatMessage, Job};

/// A family's `load`: configs, tokenizer, template, media processing, and the graphs on their owner
/// thread.
pub type LoadFn = fn(
    &ResolvedModel,
    &LoadOptions,
    Arc<CacheStats>,
    &PrefixShare,
) -> Result<LoadedFamily, ModelError>;

/// Everything the generic code knows of a family, exported by its folder as `SPEC` and listed in
/// [`super::registry::FAMILIES`].
#[derive(Debug)]
pub struct FamilySpec {
    /// Short name (`inspect`, logs).
    pub name: &'static str,
    /// The `config.json` `model_type`s that select the family.
    pub model_types: &'static [&'static str],
    /// Its graphs, required ones first.
    pub components: &'static [Component],
    /// The quantization names it accepts, its default first.
    pub quants: &'static [Quant],
    /// File suffixes to try, in order, when a component's preferred file is missing.
    pub fallbacks: fn(Component) -> &'static [&'static str],
    /// Display names and hub repos users know its models by.
    pub catalog: &'static [(&'static str, &'static str)],
    pub load: LoadFn,
}

/// Load-time settings.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub session: SessionOptions,
    pub media: MediaLimits,
    /// Longest prompt accepted, in tokens (`None` = the context length minus one).
    pub max_prompt_tokens: Option<usize>,
    /// Bytes of encoder outputs kept for reuse (0 = no cache).
    pub encoder_cache_bytes: usize,
    /// Bytes of finished sequences' KV kept for prefix reuse (0 = no prefix cache).
    pub kv_cache_bytes: usize,
    /// Most prompt positions one prefill step feeds (other streams decode between steps).
    pub prefill_chunk: usize,
    /// Chunk prompts and reuse prefixes also on decoders where that changes the numbers.
    pub allow_inexact_reuse: bool,
    /// How concurrent sequences share decoder runs.
    pub batch: BatchPolicy,
}

/// `--kv-cache-mb` default.
pub const DEFAULT_KV_CACHE_MB: usize = 2048;
/// `--prefill-chunk` default (BENCHMARKS.md, run E: about one-shot prefill speed, a ~4 s stall at most).
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            session: SessionOptions::default(),
            media: MediaLimits::default(),
            max_prompt_tokens: None,
            encoder_cache_bytes: 256 * 1024 * 1024,
            kv_cache_bytes: DEFAULT_KV_CACHE_MB * 1024 * 1024,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            allow_inexact_reuse: false,
            batch: BatchPolicy::default(),
        }
    }
}

/// What a model family provides to serve requests; [`LoadedModel`] does the rest.
pub trait FamilyBackend: Send + Sync {
    /// The prompt of a conversation at each stage (for tests and debugging).
    fn prompt(&self, messages: &[ChatMessage]) -> Result<Prompt, ModelError>;
    /// Media decoding and preprocessing plus the prompt of `messages` (the job's, or what the tool
    /// prompt made of them): everything the prefill needs (blocking). With
    /// [`Self::native_tools`], the template also gets the job's tools.
    fn prepare_input(
        &self,
        job: &Job,
        messages: &[ChatMessage],
    ) -> Result<PreparedInput, ClassifiedError>;
    /// The chat template has its own tool syntax (reads `tools`).
    fn native_tools(&self) -> bool;
    /// Queues a generation on the family's owner thread.
    fn start(
        &self,
        input: PreparedInput,
        params: GenParams,
        events: UnboundedSender<GenEvent>,
        cancel: Arc<AtomicBool>,
    ) -> Result<(), ClassifiedError>;
}

/// The owner thread of a [`ChatModel`] and the tokenizer its generations detokenize with: the
/// family-independent half of a backend.
pub struct Runner<M: ChatModel> {
    engine: EngineThread<ModelEngine<M>>,
    tokenizer: Arc<Tokenizer>,
}

/// What the prefix cache of a loaded model shares with the worker: counters and the held tags.
#[derive(Clone, Default)]
pub struct PrefixShare {
    pub stats: Arc<PrefixCacheStats>,
    pub tags: Arc<std::sync::Mutex<Vec<String>>>,
    /// The decode batch's state and counters.
    pub batch: Arc<BatchStats>,
}

impl<M: ChatModel> Runner<M> {
    /// Spawns the owner thread, builds the model on it (with its prefix cache), and waits until it
    /// is loaded.
    pub fn spawn(
        name: &str,
        tokenizer: Arc<Tokenizer>,
        opts: &LoadOptions,
        share: &PrefixShare,
        make: impl FnOnce() -> Result<M, ModelError> + Send + 'static,
    ) -> Result<Self, ModelError> {
        let (budget, chunk, inexact, batch) = (
            opts.kv_cache_bytes,
            opts.prefill_chunk,
            opts.allow_inexact_reuse,
            opts.batch,
        );
        let share = share.clone();
        let make = move || -> Result<ModelEngine<M>, ModelError> {
            let mut prefix = PrefixCache::new(budget, share.stats.clone());
            prefix.share_tags(share.tags.clone());
            Ok(ModelEngine::with_stats(
                make()?,
                prefix,
                chunk,
                inexact,
                batch,
                share.batch.clone(),
            ))
        };
        let (engine, ready) = EngineThread::spawn(&format!("engine-{name}"), make)
            .map_err(|e| ModelError::Config(format!("cannot start the engine thread: {e}")))?;
        match ready.recv() {
            Ok(Ok(())) => Ok(Self { engine, tokenizer }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ModelError::Config(
                "the engine thread died while loading".into(),
            )),
        }
    }

    pub fn start(
        &self,
        input: PreparedInput,
        params: GenParams,
        events: UnboundedSender<GenEvent>,
        cancel: Arc<AtomicBool>,
    ) -> Result<(), ClassifiedError> {
        let task = Generation::<M>::new(input, params, self.tokenizer.clone(), events, cancel);
        self.engine.submit(Box::new(task)).map_err(|_| {
            ClassifiedError::new(
                ErrorClass::Unavailable,
                "the model's engine thread has stopped",
            )
        })
    }
}

/// What a family reports when it has loaded.
pub struct LoadedFamily {
    pub backend: Box<dyn FamilyBackend>,
    pub tokenizer: Arc<Tokenizer>,
    pub defaults: GenerationDefaults,
    pub context_length: usize,
    /// Placeholder ids the media embeddings replace (refused in raw text prompts).
    pub media_ids: Vec<u32>,
    pub vision: bool,
    pub audio: bool,
    /// The special ids around the model's reasoning (thinking) block: generated text between them is
    /// returned as `reasoning_content`, not `content` ([`crate::pipeline::reasoning`]). `None`: the
    /// model does not think in marked blocks; all text is content.
    pub reasoning: Option<ReasoningMarkers>,
    /// Special ids of the template's own tool-call syntax (Gemma 4: `<|tool_call>`, `<tool_call|>`,
    /// `<|"|>`) that a chat answer keeps as their text when tools are in play, so that the calls can
    /// be parsed from it ([`crate::models::tools`]); empty for families whose calls are plain text.
    pub tool_call_tokens: Vec<u32>,
}

pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer, ModelError> {
    let path = dir.join("tokenizer.json");
    Tokenizer::from_file(&path)
        .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))
}
