//! The generation loop, family-agnostic, as a [`StepTask`] on the model's owner thread.
//!
//! One step is one decoder run (or the encoders): first the prefix cache is asked for the longest
//! reusable prefix of the prompt and the media after it are encoded; then the rest of the prompt
//! runs in chunks of at most `--prefill-chunk` positions, each its own step, so other streams' decode
//! steps run between them; then each step feeds every unfinished choice its last token. After the
//! prompt, `n > 1` choices fork the KV (a copy each). Each step samples the next id per choice,
//! checks the end-of-sequence ids, turns ids into text incrementally, matches stop strings, and
//! sends [`GenEvent`]s to whoever waits for them. When the generation ends (or is cancelled), each
//! choice's KV goes into the prefix cache for later requests.
//!
//! Conventions (model_interface.md §7): greedy is a pure argmax; the returned text skips special
//! tokens; `completion_tokens` counts every generated id including the end-of-sequence id that ended
//! generation; a stop string is never part of the text.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::{ChatModel, MediaRows, ModelError, PreparedInput};
use crate::engine::kv::KvCache;
use crate::engine::prefix_cache::PrefixCache;
use crate::engine::schedule::PrefillPolicy;
use crate::engine::thread::{StepTask, TaskState};
use crate::error::{ClassifiedError, ErrorClass};
use crate::pipeline::detok::IncrementalDecoder;
use crate::pipeline::sampling::{Sampler, SamplingParams};
use crate::pipeline::stop::{StopMatcher, StopOutcome};
use crate::protocol::prefix::{self, ChainState};
use crate::protocol::FinishReason;

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
}

/// What a generation reports, in order: deltas (of any choice), then one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    Delta {
        index: usize,
        text: String,
        token_ids: Vec<u32>,
    },
    Done {
        /// Per choice: why it ended and how many ids it generated.
        choices: Vec<(FinishReason, usize)>,
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

/// What the owner thread holds for one model: the family's graphs, the prefix cache, and how
/// prompts are split.
pub struct ModelEngine<M> {
    pub model: M,
    pub prefix: PrefixCache,
    /// Prefill chunk size, and whether prompts are split (and prefixes reused) even where that
    /// changes the arithmetic (decoders with dynamic activation quantization).
    pub policy: PrefillPolicy,
}

impl<M: ChatModel> ModelEngine<M> {
    pub fn new(model: M, prefix: PrefixCache, prefill_chunk: usize, allow_inexact: bool) -> Self {
        let policy = PrefillPolicy::new(prefill_chunk, allow_inexact);
        if !model.split_exact() {
            if allow_inexact {
                tracing::warn!("the decoder quantizes activations dynamically: chunked prefill and prefix reuse are on (--allow-inexact-reuse), so outputs can differ from a one-shot prefill");
            } else {
                tracing::info!("the decoder quantizes activations dynamically (a _quantized export): prompts run in one piece and the prefix cache is off for this model, so outputs stay exact (--allow-inexact-reuse changes this)");
            }
        }
        Self {
            model,
            prefix,
            policy,
        }
    }

    /// Whether prompts may be split and prefixes reused on this model.
    pub fn splits(&self) -> bool {
        self.policy.splits(self.model.split_exact())
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

/// One choice's state after the prompt.
struct Choice {
    cache: KvCache,
    sampler: Sampler,
    detok: IncrementalDecoder,
    stop: StopMatcher,
    generated: Vec<u32>,
    unsent_ids: Vec<u32>,
    /// Everything emitted so far (the answer a client sees).
    text: String,
    finish: Option<FinishReason>,
}

enum Phase {
    Start,
    Prefill { cache: KvCache, media: MediaRows },
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
            // At least the last prompt token is computed: its logits choose the first token.
            if let Some(hit) =
                e.prefix
                    .lookup(&layout, &self.params.cache_scope, &self.keys, prompt - 1)?
            {
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
                cache,
                sampler: Sampler::new(sampling, &self.input.ids),
                detok: IncrementalDecoder::new(true),
                stop: StopMatcher::new(self.params.stop.clone()),
                generated: Vec::new(),
                unsent_ids: Vec::new(),
                text: String::new(),
                finish: None,
            });
        }
        for i in 0..self.choices.len() {
            let mut l = logits.clone();
            self.accept(i, &mut l)?;
        }
        self.first_token_at = Some(Instant::now());
        Ok(())
    }

    /// Feeds every unfinished choice its last token and samples the next.
    fn decode_step(&mut self, e: &mut ModelEngine<M>) -> Result<(), ModelError> {
        for i in 0..self.choices.len() {
            let c = &mut self.choices[i];
            if c.finish.is_some() {
                continue;
            }
            let last = *c.generated.last().expect("a token follows the prefill");
            let mut logits = e.model.forward(&[last], None, &mut c.cache)?;
            self.accept(i, &mut logits)?;
        }
        Ok(())
    }

    /// Samples choice `i`'s next token from `logits` and emits what it adds.
    fn accept(&mut self, i: usize, logits: &mut [f32]) -> Result<(), ModelError> {
        let max = self.params.max_new_tokens;
        let c = &mut self.choices[i];
        let token = c.sampler.sample(logits);
        c.generated.push(token);
        c.unsent_ids.push(token);
        if self.params.eos_ids.contains(&token) {
            return self.finish_choice(i, FinishReason::Stop, true);
        }
        let piece = c
            .detok
            .push(&self.tokenizer, token)
            .map_err(|e| internal(e.to_string()))?;
        match c.stop.push(&piece) {
            StopOutcome::Stopped { emit, .. } => {
                self.emit(i, emit);
                return self.finish_choice(i, FinishReason::Stop, false);
            }
            StopOutcome::Continue { emit } => self.emit(i, emit),
        }
        if self.choices[i].generated.len() >= max {
            return self.finish_choice(i, FinishReason::Length, true);
        }
        Ok(())
    }

    fn emit(&mut self, i: usize, text: String) {
        let c = &mut self.choices[i];
        let ids = std::mem::take(&mut c.unsent_ids);
        if !text.is_empty() || !ids.is_empty() {
            c.text.push_str(&text);
            let _ = self.events.send(GenEvent::Delta {
                index: i,
                text,
                token_ids: ids,
            });
        }
    }

    /// Ends choice `i`. `flush` = emit the text still held back (not after a stop string matched).
    fn finish_choice(
        &mut self,
        i: usize,
        reason: FinishReason,
        flush: bool,
    ) -> Result<(), ModelError> {
        let mut reason = reason;
        let mut text = String::new();
        let c = &mut self.choices[i];
        let rest = if flush {
            c.detok
                .flush(&self.tokenizer)
                .map_err(|e| internal(e.to_string()))?
        } else {
            String::new()
        };
        match c.stop.push(&rest) {
            StopOutcome::Continue { emit } => {
                text.push_str(&emit);
                if flush {
                    text.push_str(&c.stop.finish());
                }
            }
            StopOutcome::Stopped { emit, .. } => {
                text.push_str(&emit);
                reason = FinishReason::Stop;
            }
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
        // Into the cache before the answer leaves: the worker's next heartbeat (sent with the last
        // frame) then already lists the conversation, and its next turn can be routed here.
        self.store(e);
        self.send(GenEvent::Done {
            choices,
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
            let fed = c.cache.len.saturating_sub(prompt);
            let mut keys = self.keys.clone();
            keys.extend(c.generated.iter().take(fed).map(|&t| t as u64));
            let mut tags = Vec::new();
            if let Some(state) = &self.params.conversation {
                if c.finish.is_some() {
                    tags.push(prefix::answer_digest(state, &c.text));
                }
                tags.push(prefix::digest(state));
            }
            e.prefix
                .insert(&self.params.cache_scope, keys, c.cache, tags);
        }
    }
}

fn internal(message: String) -> ModelError {
    ModelError::Request(ClassifiedError::new(ErrorClass::Internal, message))
}

impl<M: ChatModel> StepTask<ModelEngine<M>> for Generation<M> {
    fn step(&mut self, e: &mut ModelEngine<M>) -> TaskState {
        if self.cancel.load(Ordering::Relaxed) || self.events.is_closed() {
            self.store(e);
            return TaskState::Done;
        }
        let result = match self.phase {
            Phase::Start => {
                self.started = Some(Instant::now());
                self.start(e)
            }
            Phase::Prefill { .. } => self.prefill_step(e),
            Phase::Decode => self.decode_step(e),
        };
        if let Err(err) = result {
            return self.fail(err.into_classified());
        }
        if self.all_finished() {
            return self.done(e);
        }
        TaskState::Continue
    }

    fn abort(&mut self, message: &str) {
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
