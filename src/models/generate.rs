//! The generation loop, family-agnostic, as a [`StepTask`] on the model's owner thread.
//!
//! One step is one decoder run (or the encoders): first the prefix cache is asked for the longest
//! reusable prefix of the prompt and the media after it are encoded; then the rest of the prompt
//! runs in chunks of at most `--prefill-chunk` positions, each its own step, so other streams' decode
//! steps run between them. After the prompt, `n > 1` choices fork the KV (a copy each), and every
//! choice becomes a row of the model's decode batch ([`crate::engine::batch`]): one decoder run per
//! round feeds every row of every generation its last token ([`SharedStep`]), and each generation
//! then takes its rows' logits. Models that cannot batch (no usable attention mask, or dynamic
//! activation quantization without `--allow-inexact-batching`) decode each choice alone, one token a
//! round, as before; the load-time check [`check_batching`] decides. Each step samples the next id per choice,
//! checks the end-of-sequence ids, turns ids into text incrementally, matches stop strings, and
//! sends [`GenEvent`]s to whoever waits for them. When the generation ends (or is cancelled), each
//! choice's KV goes into the prefix cache for later requests.
//!
//! Conventions (model_interface.md §7): greedy is a pure argmax; the returned text skips special
//! tokens; `completion_tokens` counts every generated id including the end-of-sequence id that ended
//! generation; a stop string is never part of the text.
//!
//! Reasoning (models that declare [`ReasoningMarkers`]; chat jobs without a grammar): each choice's
//! text path ([`OutputText`]) splits its reasoning from its answer at the markers, so deltas carry
//! them apart; stop strings match both, in order. A choice's `text` (its answer digest for routing)
//! is the answer only, as a client sends it back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::{Batching, ChatModel, MediaRows, ModelError, PreparedInput};
use crate::engine::batch::{BatchStats, DecodeBatch, RowId};
use crate::engine::kv::{KvCache, KvLayout};
use crate::engine::prefix_cache::PrefixCache;
use crate::engine::schedule::PrefillPolicy;
use crate::engine::thread::{SharedStep, StepKind, StepTask, TaskState};
use crate::error::{ClassifiedError, ErrorClass};
use crate::pipeline::grammar::{Constraint, Vocab};
use crate::pipeline::logprobs;
use crate::pipeline::output::{OutputStep, OutputText};
use crate::pipeline::reasoning::{ReasoningMarkers, Routed};
use crate::pipeline::sampling::{greedy, Sampler, SamplingParams};
use crate::protocol::prefix::{self, ChainState};
use crate::protocol::{FinishReason, TokenLogprob, TopLogprob};

/// Everything about how to generate, resolved against the model's defaults.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub sampling: SamplingParams,
    /// Per choice.
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub eos_ids: Vec<u32>,
    /// Choices generated from the one prompt (≥ 1).
    pub n: usize,
    /// Prefix-cache scope ("" = shared).
    pub cache_scope: String,
    /// The conversation digest chain after the job's messages: the cache entries this generation
    /// leaves are tagged with the digests a front end routes by. `None` = no tags.
    pub conversation: Option<ChainState>,
    /// The grammar every choice's answer must match (each choice starts from its own copy).
    pub constraint: Option<Constraint>,
    /// Report each token's log-probability and this many alternatives (`None` = none).
    pub logprobs: Option<usize>,
    /// Added to the logits of these ids before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// The vocabulary's token bytes (for log-probabilities).
    pub vocab: Option<Vocab>,
    /// Split each choice's reasoning from its answer at these markers (`None`: all text is answer).
    pub reasoning: Option<ReasoningMarkers>,
    /// Special ids written out as their text, not skipped (a template's tool-call syntax).
    pub kept_specials: Vec<u32>,
    /// A continued job: per choice, the ids its answer already has (delivered by an earlier
    /// attempt). They are fed after the prompt and replayed through the sampler, grammar and text
    /// path without being sent again; sampling goes on from there.
    pub resume: Vec<Vec<u32>>,
}

/// What a generation reports, in order: deltas (of any choice), then one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    Delta {
        index: usize,
        /// Answer text.
        text: String,
        /// Reasoning text (only with [`GenParams::reasoning`]).
        reasoning: String,
        token_ids: Vec<u32>,
        /// One per id, when asked for.
        logprobs: Vec<TokenLogprob>,
    },
    /// Answer text of ids replayed for a continued job: already delivered, not to be sent again
    /// (the worker's tool-call parser still needs to see it).
    Replayed {
        index: usize,
        text: String,
    },
    Done {
        /// Per choice: why it ended and how many ids it generated.
        choices: Vec<(FinishReason, usize)>,
        /// Per choice: the stop string that ended it, if one did.
        stop_strings: Vec<Option<String>>,
        /// Generated ids inside reasoning blocks, markers included, over all choices.
        reasoning_tokens: usize,
        prompt_tokens: usize,
        /// Prompt positions served from the prefix cache.
        cached_tokens: usize,
        prefill_ms: f64,
        decode_ms: f64,
    },
    Error(ClassifiedError),
}

impl GenEvent {
    /// Generated ids over all choices, for a `Done`.
    pub fn completion_tokens(choices: &[(FinishReason, usize)]) -> usize {
        choices.iter().map(|c| c.1).sum()
    }
}

/// How decode steps of concurrent sequences run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most rows one batched decoder run takes (≤ 1 = every sequence decodes alone, taking turns).
    pub max_rows: usize,
    /// Batch also on decoders whose rows' numbers depend on each other (dynamic activation
    /// quantization, the `_quantized` exports).
    pub allow_inexact: bool,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        Self {
            max_rows: DEFAULT_MAX_BATCH,
            allow_inexact: false,
        }
    }
}

/// `--max-batch` default.
pub const DEFAULT_MAX_BATCH: usize = 16;

/// What the owner thread holds for one model: the family's graphs, the prefix cache, how prompts
/// are split, and the rows that decode together.
pub struct ModelEngine<M> {
    pub model: M,
    pub prefix: PrefixCache,
    /// Prefill chunk size, and whether prompts are split (and prefixes reused) even where that
    /// changes the arithmetic (decoders with dynamic activation quantization).
    pub policy: PrefillPolicy,
    /// The decode batch (`max_rows` 1 when the model cannot batch or batching is off).
    pub batch: DecodeBatch,
    /// Why this model's sequences decode alone, when they do.
    pub unbatched: Option<String>,
    next_row: RowId,
}

impl<M: ChatModel> ModelEngine<M> {
    pub fn new(model: M, prefix: PrefixCache, prefill_chunk: usize, allow_inexact: bool) -> Self {
        Self::with_batching(
            model,
            prefix,
            prefill_chunk,
            allow_inexact,
            BatchPolicy::default(),
        )
    }

    pub fn with_batching(
        model: M,
        prefix: PrefixCache,
        prefill_chunk: usize,
        allow_inexact: bool,
        batching: BatchPolicy,
    ) -> Self {
        Self::with_stats(
            model,
            prefix,
            prefill_chunk,
            allow_inexact,
            batching,
            Arc::default(),
        )
    }

    /// As [`Self::with_batching`], reporting into `stats`.
    pub fn with_stats(
        mut model: M,
        prefix: PrefixCache,
        prefill_chunk: usize,
        allow_inexact: bool,
        batching: BatchPolicy,
        stats: Arc<BatchStats>,
    ) -> Self {
        let policy = PrefillPolicy::new(prefill_chunk, allow_inexact);
        if !model.split_exact() {
            if allow_inexact {
                tracing::warn!("the decoder quantizes activations dynamically: chunked prefill and prefix reuse are on (--allow-inexact-reuse), so outputs can differ from a one-shot prefill");
            } else {
                tracing::info!("the decoder quantizes activations dynamically (a _quantized export): prompts run in one piece and the prefix cache is off for this model, so outputs stay exact (--allow-inexact-reuse changes this)");
            }
        }
        let unbatched = batch_refusal(&mut model, batching);
        match &unbatched {
            Some(why) if batching.max_rows > 1 => tracing::warn!(
                reason = %why,
                "concurrent sequences decode one at a time, taking turns (no batched decoding for this model)"
            ),
            Some(_) => {}
            None => tracing::info!(
                max_rows = batching.max_rows,
                "batched decoding: one decoder run advances every decoding sequence"
            ),
        }
        let rows = if unbatched.is_some() {
            1
        } else {
            batching.max_rows
        };
        *stats.refused.lock().unwrap() = unbatched.clone();
        stats
            .fused_attention
            .store(model.kv_layout().fused.is_some(), Ordering::Relaxed);
        Self {
            model,
            prefix,
            policy,
            batch: DecodeBatch::with_stats(rows, stats),
            unbatched,
            next_row: 0,
        }
    }

    /// Whether prompts may be split and prefixes reused on this model.
    pub fn splits(&self) -> bool {
        self.policy.splits(self.model.split_exact())
    }

    fn row_id(&mut self) -> RowId {
        self.next_row += 1;
        self.next_row
    }
}

/// Why `model` may not batch under `policy` (`None` = it may). Runs the load-time check.
fn batch_refusal<M: ChatModel>(model: &mut M, policy: BatchPolicy) -> Option<String> {
    if policy.max_rows <= 1 {
        return Some("batching is off (--max-batch 1)".into());
    }
    let tolerance = match model.batching() {
        Batching::Unsupported(why) => return Some(why),
        Batching::Inexact if !policy.allow_inexact => {
            return Some("the decoder quantizes activations dynamically (a _quantized export), so a row's numbers would depend on the other rows; --allow-inexact-batching batches anyway".into())
        }
        Batching::Inexact | Batching::Int8 => INEXACT_TOLERANCE,
        Batching::Exact => EXACT_TOLERANCE,
    };
    match check_batching(model) {
        Ok(d) if d <= tolerance => {
            tracing::debug!(relative_difference = d, "batched decoding check passed");
            None
        }
        Ok(d) => Some(format!(
            "the load-time check found batched rows differing from the same sequences alone by {d:.3e} (relative; at most {tolerance:.0e} allowed)"
        )),
        Err(e) => Some(format!("the load-time batched run failed: {e}")),
    }
}

/// Largest relative logit difference, batched vs alone, accepted by the load-time check.
pub const EXACT_TOLERANCE: f32 = 1e-3;
/// The same for decoders with dynamic activation quantization (when batching them is allowed): the
/// tiny Gemma-3n `_quantized` decoder measured 0.124 on an AVX2 CPU (whose int8 products saturate in
/// pairs), under 0.1 on others; a mask that ignores the padding is off by far more. Also for 4-bit
/// decoders computing with int8 activations (level 4, [`Batching::Int8`]): the 15-layer random bench
/// model measured 4.1e-2 on an AVX2 EPYC (fused attention and as exported alike).
pub const INEXACT_TOLERANCE: f32 = 0.25;

/// Decodes two steps of two sequences of different lengths (9 and 1 positions) alone and as one
/// left-padded batch, and returns the largest logit difference relative to the largest logit.
/// A graph whose mask ignores the padding fails this by far.
pub fn check_batching<M: ChatModel>(model: &mut M) -> Result<f32, ModelError> {
    let layout: KvLayout = model.kv_layout().clone();
    let prompts: [Vec<u32>; 2] = [(2..11).collect(), vec![2]];
    let steps: [[u32; 2]; 2] = [[12, 13], [14, 15]];
    let mut alone = Vec::new();
    let mut batch = DecodeBatch::new(2);
    for (r, p) in prompts.iter().enumerate() {
        let mut cache = layout.empty()?;
        model.forward(p, None, &mut cache)?;
        batch.join(r as RowId, cache.prefix(&layout, cache.len)?, steps[0][r]);
        alone.push(cache);
    }
    let (mut diff, mut scale) = (0f32, 1f32);
    for (k, step) in steps.iter().enumerate() {
        if k > 0 {
            for (r, &next) in step.iter().enumerate() {
                batch.feed(r as RowId, next);
            }
        }
        let Some((kv, ids)) = batch.prepare(&layout)? else {
            return Err(internal("the check batch is empty".into()));
        };
        let rows = model.forward_rows(&ids, kv)?;
        for (r, cache) in alone.iter_mut().enumerate() {
            let own = model.forward(&[step[r]], None, cache)?;
            let got = rows
                .get(r)
                .ok_or_else(|| internal("the batched run returned too few rows".into()))?;
            for (a, b) in own.iter().zip(got) {
                diff = diff.max((a - b).abs());
                scale = scale.max(a.abs());
            }
            if !diff.is_finite() || own.len() != got.len() {
                return Ok(f32::INFINITY);
            }
        }
    }
    Ok(diff / scale)
}

impl<M: ChatModel> SharedStep for ModelEngine<M> {
    /// One decoder run over every row of the batch (after this round's joins and leaves).
    fn shared_step(&mut self) {
        let layout = self.model.kv_layout().clone();
        let before = self.batch.row_ids();
        match self.batch.prepare(&layout) {
            Ok(None) => {}
            Ok(Some((kv, ids))) => {
                let result = self.model.forward_rows(&ids, kv);
                self.batch
                    .finish(result.map_err(ModelError::into_classified));
            }
            Err(e) => self
                .batch
                .fail(&before, ModelError::from(e).into_classified()),
        }
        self.prefix.set_reserved(self.batch.bytes());
    }

    fn reset_shared(&mut self) {
        let before = self.batch.row_ids();
        self.batch.fail(
            &before,
            ClassifiedError::new(ErrorClass::Internal, "the batched decoder step panicked"),
        );
    }
}

/// The seed of choice `i`: the request's seed for choice 0 (so `n = 1` is unchanged), and for
/// `i > 0` SplitMix64's finalizer of `seed + i · 0x9E3779B97F4A7C15`.
pub fn choice_seed(seed: u64, i: usize) -> u64 {
    if i == 0 {
        return seed;
    }
    let mut z = seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Where a choice's KV is.
enum ChoiceKv {
    /// Its own cache (decoding alone, or finished).
    Own(KvCache),
    /// A row of the model's decode batch.
    Row(RowId),
    /// Lost with a failed batched run.
    Lost,
}

/// One choice's state after the prompt.
struct Choice {
    kv: ChoiceKv,
    sampler: Sampler,
    /// Detokenization, reasoning split and stop strings.
    out: OutputText,
    generated: Vec<u32>,
    unsent_ids: Vec<u32>,
    unsent_logprobs: Vec<TokenLogprob>,
    constraint: Option<Constraint>,
    /// The answer emitted so far (what a client sends back as the assistant message).
    text: String,
    finish: Option<FinishReason>,
}

enum Phase {
    Start,
    Prefill {
        cache: KvCache,
        media: MediaRows,
    },
    /// A continued job's choices feeding the ids they already have: (choice, ids fed so far).
    CatchUp {
        pending: std::collections::VecDeque<(usize, usize)>,
    },
    Decode,
}

/// One request's generation.
pub struct Generation<M: ChatModel> {
    input: PreparedInput,
    params: GenParams,
    tokenizer: Arc<Tokenizer>,
    events: UnboundedSender<GenEvent>,
    cancel: Arc<AtomicBool>,
    phase: Phase,
    /// Prefix-cache keys of the prompt positions (empty when the cache is not used).
    keys: Vec<u64>,
    cached: usize,
    choices: Vec<Choice>,
    started: Option<Instant>,
    first_token_at: Option<Instant>,
    /// Replaying a continued job's delivered ids: text goes out as [`GenEvent::Replayed`].
    replaying: bool,
    _model: std::marker::PhantomData<fn() -> M>,
}

impl<M: ChatModel> Generation<M> {
    pub fn new(
        input: PreparedInput,
        params: GenParams,
        tokenizer: Arc<Tokenizer>,
        events: UnboundedSender<GenEvent>,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        Self {
            input,
            params,
            tokenizer,
            events,
            cancel,
            phase: Phase::Start,
            keys: Vec::new(),
            cached: 0,
            choices: Vec::new(),
            started: None,
            first_token_at: None,
            replaying: false,
            _model: std::marker::PhantomData,
        }
    }

    fn send(&self, ev: GenEvent) {
        // A closed channel means the requester is gone; the next step sees it and stops.
        let _ = self.events.send(ev);
    }

    fn fail(&mut self, e: ClassifiedError) -> TaskState {
        self.send(GenEvent::Error(e));
        TaskState::Done
    }

    /// Prefix lookup and media encoding.
    fn start(&mut self, e: &mut ModelEngine<M>) -> Result<(), ModelError> {
        let prompt = self.input.ids.len();
        if prompt == 0 {
            return Err(ModelError::Request(ClassifiedError::invalid(
                "messages",
                "the prompt is empty",
            )));
        }
        let layout = e.model.kv_layout().clone();
        let mut cache = layout.empty()?;
        if e.prefix.enabled() && e.splits() {
            self.keys = e.model.cache_keys(&self.input)?;
            // At least the last two prompt positions are computed: the last one's logits choose
            // the first token, and ONNX Runtime's kernels give a row computed alone (M = 1, the
            // GEMV paths) other bits than the same row among others, which is how a cold prompt
            // computes it (chunks are never a single row). With two, reuse is bit-exact.
            if let Some(hit) = e.prefix.lookup(
                &layout,
                &self.params.cache_scope,
                &self.keys,
                prompt.saturating_sub(2),
            )? {
                self.cached = hit.len;
                cache = hit.kv;
            }
            let stats = e.prefix.stats();
            stats
                .hit_tokens
                .fetch_add(self.cached as u64, Ordering::Relaxed);
            stats
                .miss_tokens
                .fetch_add((prompt - self.cached) as u64, Ordering::Relaxed);
        }
        let media = e.model.encode_media(&self.input, cache.len)?;
        self.phase = Phase::Prefill { cache, media };
        Ok(())
    }

    /// One prefill chunk; at the end of the prompt, the choices and their first tokens.
    fn prefill_step(&mut self, e: &mut ModelEngine<M>) -> Result<(), ModelError> {
        let Phase::Prefill { cache, media } = &mut self.phase else {
            unreachable!("prefill_step outside the prefill phase");
        };
        let prompt = self.input.ids.len();
        let done = cache.len;
        let n = e.policy.next_chunk(prompt - done, e.model.split_exact());
        let logits = e
            .model
            .forward(&self.input.ids[done..done + n], Some(media), cache)?;
        if cache.len < prompt {
            return Ok(());
        }
        let Phase::Prefill { cache, .. } = std::mem::replace(&mut self.phase, Phase::Decode) else {
            unreachable!()
        };
        let layout = e.model.kv_layout().clone();
        let mut caches = Vec::with_capacity(self.params.n);
        for _ in 1..self.params.n {
            caches.push(cache.prefix(&layout, cache.len)?);
        }
        caches.insert(0, cache);
        for (i, cache) in caches.into_iter().enumerate() {
            let mut sampling = self.params.sampling.clone();
            sampling.seed = choice_seed(sampling.seed, i);
            self.choices.push(Choice {
                kv: ChoiceKv::Own(cache),
                sampler: Sampler::new(sampling, &self.input.ids),
                out: OutputText::new(
                    self.params.stop.clone(),
                    self.params.reasoning.clone(),
                    &self.input.ids,
                )
                .keeping(self.params.kept_specials.clone()),
                generated: Vec::new(),
                unsent_ids: Vec::new(),
                unsent_logprobs: Vec::new(),
                constraint: self.params.constraint.clone(),
                text: String::new(),
                finish: None,
            });
        }
        let mut pending = std::collections::VecDeque::new();
        for i in 0..self.choices.len() {
            let given = self.params.resume.get(i).map_or(0, Vec::len);
            if given == 0 {
                let mut l = logits.clone();
                self.accept(i, &mut l)?;
            } else {
                self.replay(i)?;
                if self.choices[i].finish.is_none() {
                    pending.push_back((i, 0));
                }
            }
        }
        self.first_token_at = Some(Instant::now());
        if pending.is_empty() {
            self.join_batch(e);
        } else {
            self.phase = Phase::CatchUp { pending };
        }
        Ok(())
    }

    /// Replays choice `i`'s delivered ids (see [`GenParams::resume`]) through its sampler, grammar
    /// and text path; ids past the end of its answer (a shorter limit this time) are ignored.
    fn replay(&mut self, i: usize) -> Result<(), ModelError> {
        let ids = self.params.resume.get(i).cloned().unwrap_or_default();
        self.replaying = true;
        let mut result = Ok(());
        for token in ids {
            if self.choices[i].finish.is_some() {
                break;
            }
            let c = &mut self.choices[i];
            let mut grammar_done = false;
            if let Some(g) = &mut c.constraint {
                if let Err(e) = g.commit(token) {
                    result = Err(internal(format!(
                        "the continued answer's ids do not match its grammar: {e}"
                    )));
                    break;
                }
                grammar_done = g.is_stopped() && !self.params.eos_ids.contains(&token);
            }
            c.sampler.record(token);
            if let Err(e) = self.take(i, token, grammar_done) {
                result = Err(e);
                break;
            }
        }
        self.replaying = false;
        result
    }

    /// One chunk of a continued choice's delivered ids into its KV; after its last id, its next
    /// token is sampled as after a prompt. When no choice is left, decoding starts.
    fn catch_up_step(&mut self, e: &mut ModelEngine<M>) -> Result<(), ModelError> {
        let Phase::CatchUp { pending } = &mut self.phase else {
            unreachable!("catch_up_step outside the catch-up phase");
        };
        let Some(&(i, fed)) = pending.front() else {
            self.phase = Phase::Decode;
            self.join_batch(e);
            return Ok(());
        };
        let ids = &self.params.resume[i];
        let n = e.policy.next_chunk(ids.len() - fed, e.model.split_exact());
        let ChoiceKv::Own(cache) = &mut self.choices[i].kv else {
            return Err(internal(
                "a continued choice has no cache of its own".into(),
            ));
        };
        let mut logits = e.model.forward(&ids[fed..fed + n], None, cache)?;
        if fed + n < ids.len() {
            if let Some(front) = pending.front_mut() {
                front.1 = fed + n;
            }
            return Ok(());
        }
        pending.pop_front();
        let last = pending.is_empty();
        self.accept(i, &mut logits)?;
        if last {
            self.phase = Phase::Decode;
            self.join_batch(e);
        }
        Ok(())
    }

    /// Moves every unfinished choice into the model's decode batch when they all fit.
    fn join_batch(&mut self, e: &mut ModelEngine<M>) -> bool {
        let open = self.choices.iter().filter(|c| c.finish.is_none()).count();
        if open == 0 || !e.batch.has_room(open) {
            return false;
        }
        for c in self.choices.iter_mut().filter(|c| c.finish.is_none()) {
            if let ChoiceKv::Own(cache) = std::mem::replace(&mut c.kv, ChoiceKv::Lost) {
                let id = e.row_id();
                let last = *c.generated.last().expect("a token follows the prefill");
                e.batch.join(id, cache, last);
                c.kv = ChoiceKv::Row(id);
            }
        }
        true
    }

    /// Feeds every unfinished choice that decodes alone its last token and samples the next (or
    /// moves them into the batch, when it has room now).
    fn decode_step(&mut self, e: &mut ModelEngine<M>) -> Result<(), ModelError> {
        if self.join_batch(e) {
            return Ok(());
        }
        for i in 0..self.choices.len() {
            let c = &mut self.choices[i];
            if c.finish.is_some() {
                continue;
            }
            let ChoiceKv::Own(cache) = &mut c.kv else {
                continue;
            };
            let last = *c.generated.last().expect("a token follows the prefill");
            let mut logits = e.model.forward(&[last], None, cache)?;
            self.accept(i, &mut logits)?;
        }
        Ok(())
    }

    /// Takes this generation's rows' logits from the batched run, samples, and feeds the rows
    /// their next ids; finished choices leave the batch.
    fn batched_step(&mut self, e: &mut ModelEngine<M>) -> Result<(), ModelError> {
        for i in 0..self.choices.len() {
            let ChoiceKv::Row(id) = self.choices[i].kv else {
                continue;
            };
            if self.choices[i].finish.is_some() {
                continue;
            }
            let mut logits = match e.batch.take(id) {
                None => continue, // not in the last run
                Some(Err(err)) => {
                    self.choices[i].kv = ChoiceKv::Lost;
                    return Err(ModelError::Request(err));
                }
                Some(Ok(l)) => l,
            };
            self.accept(i, &mut logits)?;
            let c = &self.choices[i];
            if c.finish.is_some() {
                self.leave_row(e, i);
            } else {
                let last = *c.generated.last().expect("just sampled");
                e.batch.feed(id, last);
            }
        }
        Ok(())
    }

    /// Takes choice `i` out of the batch, back to a cache of its own.
    fn leave_row(&mut self, e: &mut ModelEngine<M>, i: usize) {
        let ChoiceKv::Row(id) = self.choices[i].kv else {
            return;
        };
        let layout = e.model.kv_layout().clone();
        self.choices[i].kv = match e.batch.leave(&layout, id) {
            Ok(cache) => ChoiceKv::Own(cache),
            Err(err) => {
                tracing::debug!(error = %err, "a row's KV could not be taken out of the batch");
                ChoiceKv::Lost
            }
        };
        if e.batch.rows() == 0 {
            // The last row left: free the batch now, not at the next batched run.
            e.batch.clear();
            e.prefix.set_reserved(0);
        }
    }

    /// Takes every choice out of the batch (cancel, failure, abort).
    fn leave_all(&mut self, e: &mut ModelEngine<M>) {
        for i in 0..self.choices.len() {
            self.leave_row(e, i);
        }
    }

    /// Samples choice `i`'s next token from `logits` and emits what it adds.
    fn accept(&mut self, i: usize, logits: &mut [f32]) -> Result<(), ModelError> {
        // The model's own distribution, before biases, masks and the sampler's changes.
        let raw = self.params.logprobs.map(|_| logits.to_vec());
        for &(id, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        let c = &mut self.choices[i];
        if let Some(g) = &mut c.constraint {
            g.apply(logits).map_err(|e| grammar_error(&e))?;
        }
        let mut token = c.sampler.sample(logits);
        let mut grammar_done = false;
        if let Some(g) = &mut c.constraint {
            if !g.allowed(token) {
                // Only reachable through rounding in the sampler's walk: the best allowed id.
                token = greedy(logits);
            }
            g.commit(token).map_err(|e| grammar_error(&e))?;
            grammar_done = g.is_stopped() && !self.params.eos_ids.contains(&token);
        }
        if let (Some(raw), Some(k)) = (raw, self.params.logprobs) {
            let entry = self.logprob_entry(&raw, token, k);
            self.choices[i].unsent_logprobs.push(entry);
        }
        self.take(i, token, grammar_done)
    }

    /// Adds the chosen `token` to choice `i`: end-of-sequence, text, stop strings, the grammar's end
    /// and the token limit. A token that ends the choice goes out in one delta with everything the
    /// end releases, so whoever has a token has all the text it leads to (a continued job relies on
    /// it).
    fn take(&mut self, i: usize, token: u32, grammar_done: bool) -> Result<(), ModelError> {
        let max = self.params.max_new_tokens;
        let c = &mut self.choices[i];
        c.generated.push(token);
        c.unsent_ids.push(token);
        if self.params.eos_ids.contains(&token) {
            return self.finish_choice(i, Routed::default(), FinishReason::Stop, true);
        }
        let step = c
            .out
            .push(&self.tokenizer, token)
            .map_err(|e| internal(e.to_string()))?;
        let full = c.generated.len() >= max;
        match step {
            OutputStep::Stopped(text) => self.finish_choice(i, text, FinishReason::Stop, false),
            // The grammar allows nothing more: the answer is complete.
            OutputStep::Continue(text) if grammar_done => {
                self.finish_choice(i, text, FinishReason::Stop, true)
            }
            OutputStep::Continue(text) if full => {
                self.finish_choice(i, text, FinishReason::Length, true)
            }
            OutputStep::Continue(text) => {
                self.emit(i, text);
                Ok(())
            }
        }
    }

    /// Token `id`'s log-probability and the `k` most likely ids, from the raw logits.
    fn logprob_entry(&self, raw: &[f32], id: u32, k: usize) -> TokenLogprob {
        let lse = logprobs::log_sum_exp(raw);
        let piece = |id: u32| -> (String, Vec<u8>) {
            let bytes = match &self.params.vocab {
                Some(v) => v.token_bytes(id),
                None => self
                    .tokenizer
                    .decode(&[id], false)
                    .unwrap_or_default()
                    .into_bytes(),
            };
            (String::from_utf8_lossy(&bytes).into_owned(), bytes)
        };
        let (token, bytes) = piece(id);
        TokenLogprob {
            token,
            logprob: logprobs::of(raw, lse, id),
            bytes,
            top_logprobs: logprobs::top(raw, lse, k)
                .into_iter()
                .map(|(t, logprob)| {
                    let (token, bytes) = piece(t);
                    TopLogprob {
                        token,
                        logprob,
                        bytes,
                    }
                })
                .collect(),
        }
    }

    /// Sends released answer and reasoning text with the ids not sent yet (replayed ids: only the
    /// answer text, as [`GenEvent::Replayed`]).
    fn emit(&mut self, i: usize, text: Routed) {
        let c = &mut self.choices[i];
        let ids = std::mem::take(&mut c.unsent_ids);
        if self.replaying {
            c.unsent_logprobs.clear();
            c.text.push_str(&text.content);
            if !text.content.is_empty() {
                let _ = self.events.send(GenEvent::Replayed {
                    index: i,
                    text: text.content,
                });
            }
            return;
        }
        if !text.content.is_empty() || !text.reasoning.is_empty() || !ids.is_empty() {
            c.text.push_str(&text.content);
            let logprobs = std::mem::take(&mut c.unsent_logprobs);
            let _ = self.events.send(GenEvent::Delta {
                index: i,
                text: text.content,
                reasoning: text.reasoning,
                token_ids: ids,
                logprobs,
            });
        }
    }

    /// Ends choice `i`, emitting `text` and (`flush`) the text still held back (not after a stop
    /// string matched) in one delta.
    fn finish_choice(
        &mut self,
        i: usize,
        mut text: Routed,
        reason: FinishReason,
        flush: bool,
    ) -> Result<(), ModelError> {
        let mut reason = reason;
        if flush {
            let step = self.choices[i]
                .out
                .finish(&self.tokenizer)
                .map_err(|e| internal(e.to_string()))?;
            let tail = match step {
                OutputStep::Continue(tail) => tail,
                OutputStep::Stopped(tail) => {
                    reason = FinishReason::Stop;
                    tail
                }
            };
            text.content.push_str(&tail.content);
            text.reasoning.push_str(&tail.reasoning);
        }
        self.emit(i, text);
        self.choices[i].finish = Some(reason);
        Ok(())
    }

    fn all_finished(&self) -> bool {
        !self.choices.is_empty() && self.choices.iter().all(|c| c.finish.is_some())
    }

    fn done(&mut self, e: &mut ModelEngine<M>) -> TaskState {
        let now = Instant::now();
        let started = self.started.unwrap_or(now);
        let first = self.first_token_at.unwrap_or(now);
        let choices = self
            .choices
            .iter()
            .map(|c| (c.finish.unwrap_or(FinishReason::Stop), c.generated.len()))
            .collect();
        let reasoning_tokens = self.choices.iter().map(|c| c.out.reasoning_tokens()).sum();
        let stop_strings = self
            .choices
            .iter()
            .map(|c| c.out.matched_stop().map(str::to_string))
            .collect();
        // Into the cache before the answer leaves: the worker's next heartbeat (sent with the last
        // frame) then already lists the conversation, and its next turn can be routed here.
        self.store(e);
        self.send(GenEvent::Done {
            choices,
            stop_strings,
            reasoning_tokens,
            prompt_tokens: self.input.ids.len(),
            cached_tokens: self.cached,
            prefill_ms: (first - started).as_secs_f64() * 1e3,
            decode_ms: (now - first).as_secs_f64() * 1e3,
        });
        TaskState::Done
    }

    /// Hands each choice's KV to the prefix cache (also for cancelled generations: the KV is valid).
    fn store(&mut self, e: &mut ModelEngine<M>) {
        if !e.prefix.enabled() || !e.splits() || self.keys.is_empty() {
            return;
        }
        let prompt = self.input.ids.len();
        for c in std::mem::take(&mut self.choices).into_iter().rev() {
            let ChoiceKv::Own(mut cache) = c.kv else {
                continue;
            };
            // In-place buffers keep room to grow: the cache keeps only what they hold.
            let layout = e.model.kv_layout();
            if cache.capacity(layout) > cache.len {
                match cache.prefix(layout, cache.len) {
                    Ok(compact) => cache = compact,
                    Err(err) => tracing::warn!(error = %err, "could not compact a cache for reuse"),
                }
            }
            let fed = cache.len.saturating_sub(prompt);
            let mut keys = self.keys.clone();
            keys.extend(c.generated.iter().take(fed).map(|&t| t as u64));
            let mut tags = Vec::new();
            if let Some(state) = &self.params.conversation {
                if c.finish.is_some() {
                    tags.push(prefix::answer_digest(state, &c.text));
                }
                tags.push(prefix::digest(state));
            }
            e.prefix.insert(&self.params.cache_scope, keys, cache, tags);
        }
    }
}

fn grammar_error(e: &str) -> ModelError {
    internal(format!("constrained decoding failed: {e}"))
}

fn internal(message: String) -> ModelError {
    ModelError::Request(ClassifiedError::new(ErrorClass::Internal, message))
}

impl<M: ChatModel> StepTask<ModelEngine<M>> for Generation<M> {
    fn kind(&self) -> StepKind {
        match self.phase {
            Phase::Start | Phase::Prefill { .. } | Phase::CatchUp { .. } => StepKind::Prefill,
            Phase::Decode => {
                let batched = self
                    .choices
                    .iter()
                    .any(|c| c.finish.is_none() && matches!(c.kv, ChoiceKv::Row(_)));
                if batched {
                    StepKind::Shared
                } else {
                    StepKind::Decode
                }
            }
        }
    }

    fn step(&mut self, e: &mut ModelEngine<M>) -> TaskState {
        if self.cancel.load(Ordering::Relaxed) || self.events.is_closed() {
            self.leave_all(e);
            self.store(e);
            return TaskState::Done;
        }
        let result = match self.phase {
            Phase::Start => {
                self.started = Some(Instant::now());
                self.start(e)
            }
            Phase::Prefill { .. } => self.prefill_step(e),
            Phase::CatchUp { .. } => self.catch_up_step(e),
            Phase::Decode if self.kind() == StepKind::Shared => self.batched_step(e),
            Phase::Decode => self.decode_step(e),
        };
        if let Err(err) = result {
            self.leave_all(e);
            return self.fail(err.into_classified());
        }
        if self.all_finished() {
            return self.done(e);
        }
        TaskState::Continue
    }

    fn abort(&mut self, e: &mut ModelEngine<M>, message: &str) {
        self.leave_all(e);
        self.send(GenEvent::Error(ClassifiedError::new(
            ErrorClass::Internal,
            message,
        )));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn choice_seeds_differ_and_choice_zero_keeps_the_seed() {
        use super::choice_seed;
        assert_eq!(choice_seed(42, 0), 42);
        let s: Vec<u64> = (0..8).map(|i| choice_seed(42, i)).collect();
        let mut d = s.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 8);
        assert_eq!(choice_seed(42, 3), choice_seed(42, 3));
    }
}
