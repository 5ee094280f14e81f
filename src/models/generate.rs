//! The generation loop, family-agnostic, as a [`StepTask`] on the model's owner thread: one step is the
//! prefill or one decode token. Each step samples the next id, checks the end-of-sequence ids, turns ids
//! into text incrementally, matches stop strings, and sends [`GenEvent`]s to whoever waits for them.
//!
//! Conventions (model_interface.md §7): greedy is a pure argmax; the returned text skips special
//! tokens; `completion_tokens` counts every generated id including the end-of-sequence id that ended
//! generation; a stop string is never part of the text.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::{ChatModel, PreparedInput};
use crate::engine::thread::{StepTask, TaskState};
use crate::error::{ClassifiedError, ErrorClass};
use crate::pipeline::detok::IncrementalDecoder;
use crate::pipeline::sampling::{Sampler, SamplingParams};
use crate::pipeline::stop::{StopMatcher, StopOutcome};
use crate::protocol::FinishReason;

/// Everything about how to generate, resolved against the model's defaults.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub eos_ids: Vec<u32>,
}

/// What a generation reports, in order: deltas, then one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    Delta {
        text: String,
        token_ids: Vec<u32>,
    },
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        prefill_ms: f64,
        decode_ms: f64,
    },
    Error(ClassifiedError),
}

/// One request's generation.
pub struct Generation<M: ChatModel> {
    input: PreparedInput,
    params: GenParams,
    tokenizer: Arc<Tokenizer>,
    events: UnboundedSender<GenEvent>,
    cancel: Arc<AtomicBool>,
    seq: Option<M::Seq>,
    sampler: Sampler,
    detok: IncrementalDecoder,
    stop: StopMatcher,
    generated: Vec<u32>,
    unsent_ids: Vec<u32>,
    started: Option<Instant>,
    first_token_at: Option<Instant>,
}

impl<M: ChatModel> Generation<M> {
    pub fn new(
        input: PreparedInput,
        params: GenParams,
        tokenizer: Arc<Tokenizer>,
        events: UnboundedSender<GenEvent>,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        let sampler = Sampler::new(params.sampling.clone(), &input.ids);
        let stop = StopMatcher::new(params.stop.clone());
        Self {
            input,
            params,
            tokenizer,
            events,
            cancel,
            seq: None,
            sampler,
            detok: IncrementalDecoder::new(true),
            stop,
            generated: Vec::new(),
            unsent_ids: Vec::new(),
            started: None,
            first_token_at: None,
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

    fn emit(&mut self, text: String) {
        let ids = std::mem::take(&mut self.unsent_ids);
        if !text.is_empty() || !ids.is_empty() {
            self.send(GenEvent::Delta {
                text,
                token_ids: ids,
            });
        }
    }

    /// Ends the generation. `flush` = emit the text still held back (not after a stop string matched).
    fn finish(&mut self, reason: FinishReason, flush: bool) -> TaskState {
        let mut reason = reason;
        let mut text = String::new();
        match if flush {
            self.detok.flush(&self.tokenizer)
        } else {
            Ok(String::new())
        } {
            Ok(rest) => match self.stop.push(&rest) {
                StopOutcome::Continue { emit } => {
                    text.push_str(&emit);
                    if flush {
                        text.push_str(&self.stop.finish());
                    }
                }
                StopOutcome::Stopped { emit, .. } => {
                    text.push_str(&emit);
                    reason = FinishReason::Stop;
                }
            },
            Err(e) => return self.fail(ClassifiedError::new(ErrorClass::Internal, e.to_string())),
        }
        self.emit(text);
        let now = Instant::now();
        let started = self.started.unwrap_or(now);
        let first = self.first_token_at.unwrap_or(now);
        self.send(GenEvent::Done {
            finish_reason: reason,
            prompt_tokens: self.input.ids.len(),
            completion_tokens: self.generated.len(),
            prefill_ms: (first - started).as_secs_f64() * 1e3,
            decode_ms: (now - first).as_secs_f64() * 1e3,
        });
        TaskState::Done
    }
}

impl<M: ChatModel> StepTask<M> for Generation<M> {
    fn step(&mut self, model: &mut M) -> TaskState {
        if self.cancel.load(Ordering::Relaxed) || self.events.is_closed() {
            return TaskState::Done;
        }
        let logits = match self.seq.as_mut() {
            None => {
                self.started = Some(Instant::now());
                match model.prefill(&self.input) {
                    Ok((seq, logits)) => {
                        self.seq = Some(seq);
                        logits
                    }
                    Err(e) => return self.fail(e.into_classified()),
                }
            }
            Some(seq) => {
                let last = *self.generated.last().expect("a token follows the prefill");
                match model.decode(seq, last) {
                    Ok(l) => l,
                    Err(e) => return self.fail(e.into_classified()),
                }
            }
        };
        let mut logits = logits;
        let token = self.sampler.sample(&mut logits);
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
        }
        self.generated.push(token);
        self.unsent_ids.push(token);
        if self.params.eos_ids.contains(&token) {
            return self.finish(FinishReason::Stop, true);
        }
        let piece = match self.detok.push(&self.tokenizer, token) {
            Ok(p) => p,
            Err(e) => return self.fail(ClassifiedError::new(ErrorClass::Internal, e.to_string())),
        };
        match self.stop.push(&piece) {
            StopOutcome::Stopped { emit, .. } => {
                self.emit(emit);
                return self.finish(FinishReason::Stop, false);
            }
            StopOutcome::Continue { emit } => self.emit(emit),
        }
        if self.generated.len() >= self.params.max_new_tokens {
            return self.finish(FinishReason::Length, true);
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
