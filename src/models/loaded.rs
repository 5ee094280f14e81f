//! A loaded model as the worker uses it: [`LoadedModel::prepare`] turns a job into prompt ids, media
//! tensors and resolved generation parameters (CPU work the caller runs off the async runtime), and
//! [`LoadedModel::start`] hands the generation to the model's owner thread, which streams
//! [`GenEvent`]s back.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::catalog::Family;
use super::config_util::GenerationDefaults;
use super::encoder_cache::CacheStats;
pub use super::family::{
    load_tokenizer, FamilyBackend, LoadOptions, LoadedFamily, PrefixShare, Runner,
    DEFAULT_KV_CACHE_MB, DEFAULT_PREFILL_CHUNK,
};
use super::generate::{GenEvent, GenParams};
use super::resolve::ResolvedModel;
use super::tools;
use super::{ModelError, PreparedInput, Prompt};
use crate::error::{ClassifiedError, ErrorClass};
use crate::pipeline::grammar::{Constraint, Vocab};
use crate::pipeline::prompt_size;
use crate::pipeline::reasoning::ReasoningMarkers;
use crate::pipeline::sampling::SamplingParams;
use crate::pipeline::template::RESERVED_VARIABLES;
use crate::protocol::{
    prefix, ChatMessage, ContentPart, Job, WorkerModel, MAX_CHOICES, MAX_TOP_LOGPROBS,
};

/// What clients and the front end learn about a model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub aliases: Vec<String>,
    pub family: Family,
    pub quant: String,
    pub context_length: usize,
    pub vision: bool,
    pub audio: bool,
    /// Seconds since the epoch when the model was loaded.
    pub created: u64,
    /// The most bytes of text one token stands for (`None`: the tokenizer has no such bound).
    pub max_token_bytes: Option<u32>,
}

impl ModelInfo {
    pub fn wire(&self) -> WorkerModel {
        WorkerModel {
            name: self.name.clone(),
            aliases: self.aliases.clone(),
            context_length: self.context_length as u32,
            quant: Some(self.quant.clone()),
            vision: self.vision,
            audio: self.audio,
            created: self.created,
            prefixes: Vec::new(),
            max_token_bytes: self.max_token_bytes,
        }
    }
}

/// A job ready for the owner thread.
pub struct PreparedJob {
    pub input: PreparedInput,
    pub params: GenParams,
    pub preprocess_ms: f64,
}

pub struct LoadedModel {
    pub info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    defaults: GenerationDefaults,
    backend: Box<dyn FamilyBackend>,
    max_prompt_tokens: Option<usize>,
    media_ids: Vec<u32>,
    /// Encoder-cache hits and misses, for metrics.
    pub cache_stats: Arc<CacheStats>,
    /// The prefix cache's counters and the conversation digests it holds (for heartbeats).
    pub prefix: PrefixShare,
    /// The vocabulary for constrained decoding and token bytes (`Err`: why there is none).
    vocab: Result<Vocab, String>,
    /// The reasoning markers the family declared (checked against the tokenizer at load).
    reasoning: Option<ReasoningMarkers>,
    /// Special ids of the template's tool-call syntax, kept as text when tools are in play.
    tool_call_tokens: Vec<u32>,
}

impl LoadedModel {
    /// Loads tokenizer, template and graphs (blocking: call it off the async runtime).
    pub fn load(model: &ResolvedModel, opts: &LoadOptions) -> Result<Self, ModelError> {
        let t0 = Instant::now();
        let cache_stats = Arc::new(CacheStats::default());
        let prefix = PrefixShare::default();
        let loaded = (model.plan.family.loader())(model, opts, cache_stats.clone(), &prefix)?;
        if let Some(m) = &loaded.reasoning {
            check_markers(&loaded.tokenizer, m)?;
        }
        // Kept tokens are written as their text in place of the detokenizer's (skipped) output: a
        // normal token would come out twice.
        if let Some(id) = loaded.tool_call_tokens.iter().find(|&&id| {
            loaded
                .tokenizer
                .id_to_token(id)
                .is_none_or(|t| !loaded.tokenizer.get_added_vocabulary().is_special_token(&t))
        }) {
            return Err(ModelError::Tokenizer(format!(
                "the tool-call token id {id} is not a special token of the vocabulary"
            )));
        }
        let info = ModelInfo {
            name: model.served_name.clone(),
            aliases: model.aliases.clone(),
            family: model.plan.family,
            quant: model.plan.quant.name().to_string(),
            context_length: loaded.context_length,
            vision: loaded.vision,
            audio: loaded.audio,
            created: crate::protocol::now_ms() / 1000,
            max_token_bytes: prompt_size::max_text_bytes_per_token(&loaded.tokenizer),
        };
        let t1 = Instant::now();
        let n_vocab = loaded.tokenizer.get_vocab_size(true);
        let vocab = Vocab::new(
            loaded.tokenizer.clone(),
            &loaded.defaults.eos_token_ids,
            n_vocab,
        );
        match &vocab {
            Ok(v) => tracing::debug!(
                size = v.size(),
                seconds = t1.elapsed().as_secs_f64(),
                "constrained-decoding vocabulary built"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "no constrained decoding for this model (response_format and tools are refused)")
            }
        }
        // The load's transient buffers (graph bytes, the check's sessions) back to the system.
        crate::engine::runtime::release_freed_memory();
        tracing::info!(model = %info.name, quant = %info.quant, seconds = t0.elapsed().as_secs_f64(), "model loaded");
        Ok(Self {
            vocab,
            info,
            tokenizer: loaded.tokenizer,
            defaults: loaded.defaults,
            backend: loaded.backend,
            max_prompt_tokens: opts.max_prompt_tokens,
            media_ids: loaded.media_ids,
            cache_stats,
            prefix,
            reasoning: loaded.reasoning,
            tool_call_tokens: loaded.tool_call_tokens,
        })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Whether the decoder runs with fused attention and a KV cache written in place
    /// (`--attention`; the load-time check may have kept the graph as exported).
    pub fn fused_attention(&self) -> bool {
        self.prefix
            .batch
            .fused_attention
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Most sequences one decoder run advances, or why this model decodes them one at a time.
    pub fn batching(&self) -> Result<usize, String> {
        self.prefix.batch.status()
    }

    /// The prompt of a conversation (rendered, expanded, ids).
    pub fn prompt(&self, messages: &[ChatMessage]) -> Result<Prompt, ModelError> {
        self.backend.prompt(messages)
    }

    /// Template, tokenizer, media decoding and parameter resolution (blocking CPU work).
    pub fn prepare(&self, job: &Job) -> Result<PreparedJob, ClassifiedError> {
        let t0 = Instant::now();
        self.check_prompt_size(job)?;
        for part in job.messages.iter().flat_map(|m| m.content.iter()) {
            let (ok, what) = match part {
                ContentPart::Image { .. } => {
                    (self.info.vision, "vision encoder and cannot take images")
                }
                ContentPart::Audio { .. } => {
                    (self.info.audio, "audio encoder and cannot take audio")
                }
                ContentPart::Text { .. } => (true, ""),
            };
            if !ok {
                return Err(ClassifiedError::invalid(
                    "messages",
                    format!("model {} has no {what}", self.info.name),
                ));
            }
        }
        let input = match &job.prompt {
            Some(text) => self.raw_input(text)?,
            None if !job.prompt_token_ids.is_empty() => {
                self.raw_ids(job.prompt_token_ids.clone())?
            }
            None => {
                check_template_kwargs(job)?;
                let messages = tools::prompt_messages(job, self.backend.native_tools())?;
                self.backend.prepare_input(job, &messages)?
            }
        };
        let params = self.resolve_params(job, &input.ids)?;
        Ok(PreparedJob {
            input,
            params,
            preprocess_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Most prompt tokens a job may have.
    fn max_prompt(&self) -> usize {
        let ctx = self.info.context_length;
        self.max_prompt_tokens
            .unwrap_or(ctx.saturating_sub(1))
            .min(ctx.saturating_sub(1))
    }

    /// Refuses a prompt that cannot fit before rendering and tokenizing it: from its text's byte
    /// count where the tokenizer bounds the bytes per token, else (and for text more than 8 bytes a
    /// token) by counting its tokens a slice at a time, stopping past the limit. Only text that the
    /// templates always write out is counted (message text, trimmed; a completion's prompt), so a
    /// prompt that fits is never refused here; the exact check follows tokenization.
    fn check_prompt_size(&self, job: &Job) -> Result<(), ClassifiedError> {
        let max_prompt = self.max_prompt();
        let (texts, param): (Vec<&str>, &str) = match &job.prompt {
            Some(p) => (vec![p.as_str()], "prompt"),
            None => (
                job.messages
                    .iter()
                    .flat_map(|m| m.content.iter())
                    .filter_map(|p| match p {
                        ContentPart::Text { text } => Some(text.trim()),
                        _ => None,
                    })
                    .collect(),
                "messages",
            ),
        };
        let bytes: usize = texts.iter().map(|t| t.len()).sum();
        let too_long = |at_least: usize| {
            ClassifiedError::new(
                ErrorClass::ContextLengthExceeded,
                format!(
                    "the prompt has at least {at_least} tokens ({bytes} bytes of text); this model accepts at most {max_prompt} prompt tokens (context length {})",
                    self.info.context_length
                ),
            )
            .with_param(param)
        };
        if let Some(per_token) = self.info.max_token_bytes {
            let at_least = prompt_size::min_tokens(bytes, per_token);
            if at_least > max_prompt {
                return Err(too_long(at_least));
            }
        }
        if bytes > max_prompt.saturating_mul(8) {
            let mut at_least = 0;
            for t in texts {
                at_least += prompt_size::tokens_at_least(&self.tokenizer, t, max_prompt - at_least);
                if at_least > max_prompt {
                    return Err(too_long(at_least));
                }
            }
        }
        Ok(())
    }

    /// A text completion's prompt: the raw text through the tokenizer (special tokens included),
    /// no template and no media.
    fn raw_input(&self, text: &str) -> Result<PreparedInput, ClassifiedError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ClassifiedError::new(ErrorClass::Internal, format!("tokenizer: {e}")))?;
        let ids = enc.get_ids().to_vec();
        if ids.is_empty() {
            return Err(ClassifiedError::invalid("prompt", "the prompt is empty"));
        }
        self.raw_ids(ids)
    }

    /// A text completion's prompt as ids (checked against the vocabulary and media placeholders).
    fn raw_ids(&self, ids: Vec<u32>) -> Result<PreparedInput, ClassifiedError> {
        let size = self.tokenizer.get_vocab_size(true) as u32;
        if let Some(bad) = ids.iter().find(|&&id| id >= size) {
            return Err(ClassifiedError::invalid(
                "prompt",
                format!("token id {bad} is past the vocabulary ({size} ids)"),
            ));
        }
        if let Some(bad) = ids.iter().find(|id| self.media_ids.contains(id)) {
            let name = self.tokenizer.id_to_token(*bad).unwrap_or_default();
            return Err(ClassifiedError::invalid(
                "prompt",
                format!("the prompt holds the media placeholder {name}; text completions take text only (use /v1/chat/completions for images and audio)"),
            ));
        }
        Ok(PreparedInput {
            ids,
            images: Vec::new(),
            audio: Vec::new(),
        })
    }

    /// The grammar of a job compiled against this model's vocabulary.
    fn constraint(&self, job: &Job) -> Result<Option<Constraint>, ClassifiedError> {
        let Some(grammar) = tools::job_grammar(job, self.backend.native_tools())? else {
            return Ok(None);
        };
        let param = if tools::active_choice(job).is_some() {
            "tools"
        } else {
            "response_format"
        };
        let vocab = self.vocab.as_ref().map_err(|e| {
            ClassifiedError::invalid(
                param,
                format!("model {} cannot constrain its output: {e}", self.info.name),
            )
        })?;
        vocab.constraint(&grammar).map(Some).map_err(|e| {
            ClassifiedError::invalid(param, format!("{param}: the grammar does not compile: {e}"))
        })
    }

    fn resolve_params(&self, job: &Job, prompt: &[u32]) -> Result<GenParams, ClassifiedError> {
        let prompt_len = prompt.len();
        let ctx = self.info.context_length;
        let max_prompt = self.max_prompt();
        if prompt_len > max_prompt {
            return Err(ClassifiedError::new(
                ErrorClass::ContextLengthExceeded,
                format!(
                    "the prompt has {prompt_len} tokens; this model accepts at most {max_prompt} prompt tokens (context length {ctx})"
                ),
            )
            .with_param("messages"));
        }
        let room = ctx - prompt_len;
        let max_new = match job.max_tokens {
            Some(m) if m as usize > room && job.clamp_max_tokens => room,
            Some(m) if m as usize > room => {
                return Err(ClassifiedError::new(
                    ErrorClass::ContextLengthExceeded,
                    format!(
                        "max_tokens is {m} but the prompt has {prompt_len} tokens and the context length is {ctx}: at most {room} tokens can be generated"
                    ),
                )
                .with_param("max_tokens"))
            }
            Some(m) => m as usize,
            None => room,
        };
        let n = job.n.unwrap_or(1);
        if n == 0 || n > MAX_CHOICES {
            return Err(ClassifiedError::invalid(
                "n",
                format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
            ));
        }
        let s = &job.sampling;
        let d = &self.defaults;
        let constraint = self.constraint(job)?;
        // Text completions get the model's raw output. A grammar constrains the output from its first
        // token: where the prompt leaves a thinking block open that output must not count as
        // reasoning; otherwise a grammar only yields reasoning where it names the markers itself.
        let chat = job.prompt.is_none() && job.prompt_token_ids.is_empty();
        let reasoning = self
            .reasoning
            .clone()
            .filter(|m| chat && (constraint.is_none() || !m.opened_by(prompt)));
        Ok(GenParams {
            sampling: SamplingParams {
                temperature: s.temperature.unwrap_or(d.temperature),
                top_p: s.top_p.unwrap_or(d.top_p),
                top_k: s.top_k.unwrap_or(d.top_k),
                min_p: s.min_p.unwrap_or(d.min_p),
                presence_penalty: s.presence_penalty.unwrap_or(0.0),
                frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
                repetition_penalty: s.repetition_penalty.unwrap_or(d.repetition_penalty),
                seed: s.seed.unwrap_or_else(|| seed_from_id(&job.job_id)),
            },
            max_new_tokens: max_new,
            stop: job.stop.clone(),
            eos_ids: if job.ignore_eos {
                vec![]
            } else {
                d.eos_token_ids.clone()
            },
            n: n as usize,
            cache_scope: job.cache_scope.clone().unwrap_or_default(),
            conversation: (job.prompt.is_none() && job.prompt_token_ids.is_empty()).then(|| {
                prefix::chain(
                    job.cache_scope.as_deref().unwrap_or(""),
                    &job.model,
                    &job.messages,
                )
            }),
            constraint,
            logprobs: match job.logprobs {
                Some(k) if k > MAX_TOP_LOGPROBS => {
                    return Err(ClassifiedError::invalid(
                        "top_logprobs",
                        format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {k}"),
                    ))
                }
                k => k.map(|k| k as usize),
            },
            logit_bias: job.logit_bias.iter().map(|(&id, &b)| (id, b)).collect(),
            vocab: self.vocab.as_ref().ok().cloned(),
            reasoning,
            kept_specials: match tools::active_choice(job) {
                Some(_) if chat => self.tool_call_tokens.clone(),
                _ => Vec::new(),
            },
            // Set by the worker for a continued job.
            resume: Vec::new(),
        })
    }

    /// Queues the generation on the owner thread; events arrive on `events`.
    pub fn start(
        &self,
        job: PreparedJob,
        events: UnboundedSender<GenEvent>,
        cancel: Arc<AtomicBool>,
    ) -> Result<(), ClassifiedError> {
        self.backend.start(job.input, job.params, events, cancel)
    }
}

/// Reasoning markers must be special tokens the detokenizer skips (they add no text) and must differ.
fn check_markers(tokenizer: &Tokenizer, m: &ReasoningMarkers) -> Result<(), ModelError> {
    if m.start == m.end {
        return Err(ModelError::Config(format!(
            "the reasoning markers' start and end are the same id ({})",
            m.start
        )));
    }
    for id in [m.start, m.end] {
        let name = tokenizer.id_to_token(id).ok_or_else(|| {
            ModelError::Tokenizer(format!(
                "the reasoning marker id {id} is not in the vocabulary"
            ))
        })?;
        if !tokenizer.get_added_vocabulary().is_special_token(&name) {
            return Err(ModelError::Tokenizer(format!(
                "the reasoning marker {name} (id {id}) is not a special token: its text would stay in the answer"
            )));
        }
    }
    Ok(())
}

/// A job's `chat_template_kwargs` may not name a variable the renderer sets itself (the front end
/// refuses them too; jobs published directly are checked here).
fn check_template_kwargs(job: &Job) -> Result<(), ClassifiedError> {
    let names = job.chat_template_kwargs.iter().flat_map(|m| m.keys());
    for name in names {
        if RESERVED_VARIABLES.contains(&name.as_str()) {
            return Err(ClassifiedError::invalid(
                &format!("chat_template_kwargs.{name}"),
                format!("chat_template_kwargs cannot set {name}: the server sets it"),
            ));
        }
    }
    Ok(())
}

/// A stable seed for jobs published without one (FNV-1a of the job id), so redeliveries reproduce.
fn seed_from_id(id: &str) -> u64 {
    id.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}
