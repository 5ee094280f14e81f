//! A loaded model as the worker uses it: [`LoadedModel::prepare`] turns a job into prompt ids, media
//! tensors and resolved generation parameters (CPU work the caller runs off the async runtime), and
//! [`LoadedModel::start`] hands the generation to the model's owner thread, which streams
//! [`GenEvent`]s back.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::catalog::Family;
use super::gemma3n::{Gemma3nConfig, Gemma3nModel, Gemma3nPrompter, GenerationDefaults};
use super::gemma3n::{MediaDecoder, MediaLimits};
use super::generate::{GenEvent, GenParams, Generation};
use super::resolve::ResolvedModel;
use super::{ModelError, PreparedInput};
use crate::engine::session::SessionOptions;
use crate::engine::thread::EngineThread;
use crate::error::{ClassifiedError, ErrorClass};
use crate::pipeline::sampling::SamplingParams;
use crate::protocol::{ContentPart, Job, WorkerModel};

/// Load-time settings.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub session: SessionOptions,
    pub media: MediaLimits,
    /// Longest prompt accepted, in tokens (`None` = the context length minus one).
    pub max_prompt_tokens: Option<usize>,
}

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
    prompter: Gemma3nPrompter,
    defaults: GenerationDefaults,
    media: MediaDecoder,
    max_prompt_tokens: Option<usize>,
    engine: EngineThread<Gemma3nModel>,
}

pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer, ModelError> {
    let path = dir.join("tokenizer.json");
    Tokenizer::from_file(&path)
        .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))
}

impl LoadedModel {
    /// Loads tokenizer, template and graphs (blocking: call it off the async runtime).
    pub fn load(model: &ResolvedModel, opts: &LoadOptions) -> Result<Self, ModelError> {
        let t0 = Instant::now();
        let dir = model.root.clone();
        match model.plan.family {
            Family::Gemma3n => {}
        }
        let cfg = Gemma3nConfig::load(&dir)?;
        let defaults = GenerationDefaults::load(&dir, &cfg.eos_token_ids)?;
        let tokenizer = Arc::new(load_tokenizer(&dir)?);
        let prompter = Gemma3nPrompter::new(&dir, &cfg, tokenizer.clone())?;
        let media = MediaDecoder::new(&dir, opts.media.clone())?;
        let (engine, ready) = {
            let model = model.clone();
            let cfg = cfg.clone();
            let sess = opts.session.clone();
            EngineThread::spawn(&format!("engine-{}", model.served_name), move || {
                Gemma3nModel::load(&model, cfg, &sess)
            })
            .map_err(|e| ModelError::Config(format!("cannot start the engine thread: {e}")))?
        };
        let (vision, audio) = match ready.recv() {
            Ok(Ok(())) => (
                model
                    .plan
                    .graph(super::catalog::Component::VisionEncoder)
                    .is_some(),
                model
                    .plan
                    .graph(super::catalog::Component::AudioEncoder)
                    .is_some(),
            ),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(ModelError::Config(
                    "the engine thread died while loading".into(),
                ))
            }
        };
        let info = ModelInfo {
            name: model.served_name.clone(),
            aliases: model.aliases.clone(),
            family: model.plan.family,
            quant: model.plan.quant.name().to_string(),
            context_length: cfg.context_length,
            vision,
            audio,
            created: crate::protocol::now_ms() / 1000,
        };
        tracing::info!(model = %info.name, quant = %info.quant, seconds = t0.elapsed().as_secs_f64(), "model loaded");
        Ok(Self {
            info,
            tokenizer,
            prompter,
            defaults,
            media,
            max_prompt_tokens: opts.max_prompt_tokens,
            engine,
        })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn prompter(&self) -> &Gemma3nPrompter {
        &self.prompter
    }

    /// Template, tokenizer, media decoding and parameter resolution (blocking CPU work).
    pub fn prepare(&self, job: &Job) -> Result<PreparedJob, ClassifiedError> {
        let t0 = Instant::now();
        let mut images = Vec::new();
        let mut audio = Vec::new();
        let mut n_image = 0usize;
        let mut n_audio = 0usize;
        for part in job.messages.iter().flat_map(|m| m.content.iter()) {
            match part {
                ContentPart::Image { source } => {
                    if !self.info.vision {
                        return Err(ClassifiedError::invalid(
                            "messages",
                            format!(
                                "model {} has no vision encoder and cannot take images",
                                self.info.name
                            ),
                        ));
                    }
                    images.push(self.media.image(n_image, source)?);
                    n_image += 1;
                }
                ContentPart::Audio { source, format } => {
                    if !self.info.audio {
                        return Err(ClassifiedError::invalid(
                            "messages",
                            format!(
                                "model {} has no audio encoder and cannot take audio",
                                self.info.name
                            ),
                        ));
                    }
                    audio.push(self.media.audio(n_audio, source, format.as_deref())?);
                    n_audio += 1;
                }
                ContentPart::Text { .. } => {}
            }
        }
        let prompt = self
            .prompter
            .build(&job.messages)
            .map_err(ModelError::into_classified)?;
        let params = self.resolve_params(job, prompt.ids.len())?;
        Ok(PreparedJob {
            input: PreparedInput {
                ids: prompt.ids,
                images,
                audio,
            },
            params,
            preprocess_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    fn resolve_params(&self, job: &Job, prompt_len: usize) -> Result<GenParams, ClassifiedError> {
        let ctx = self.info.context_length;
        let max_prompt = self
            .max_prompt_tokens
            .unwrap_or(ctx.saturating_sub(1))
            .min(ctx.saturating_sub(1));
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
        let s = &job.sampling;
        let d = &self.defaults;
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
            eos_ids: d.eos_token_ids.clone(),
        })
    }

    /// Queues the generation on the owner thread; events arrive on `events`.
    pub fn start(
        &self,
        job: PreparedJob,
        events: UnboundedSender<GenEvent>,
        cancel: Arc<AtomicBool>,
    ) -> Result<(), ClassifiedError> {
        let task = Generation::<Gemma3nModel>::new(
            job.input,
            job.params,
            self.tokenizer.clone(),
            events,
            cancel,
        );
        self.engine.submit(Box::new(task)).map_err(|_| {
            ClassifiedError::new(
                ErrorClass::Unavailable,
                "the model's engine thread has stopped",
            )
        })
    }
}

/// A stable seed for jobs published without one (FNV-1a of the job id), so redeliveries reproduce.
fn seed_from_id(id: &str) -> u64 {
    id.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}
