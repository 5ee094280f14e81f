//! The Gemma-3n family (`model_type: gemma3n`): `config.json` values ([`config`]), prompt building
//! ([`prompt`]), media preprocessing ([`preprocess`]), the four ONNX graphs ([`model`]), and the
//! backend that wires them for serving ([`load`]).

pub mod config;
pub mod model;
pub mod preprocess;
pub mod prompt;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

pub use crate::models::config_util::GenerationDefaults;
pub use crate::models::media::MediaLimits;
pub use config::Gemma3nConfig;
pub use model::Gemma3nModel;
pub use preprocess::MediaDecoder;
pub use prompt::Gemma3nPrompter;

use super::catalog::Quant;
use super::encoder_cache::{CacheStats, EncoderCache};
use super::family::{
    load_tokenizer, FamilyBackend, FamilySpec, LoadOptions, LoadedFamily, PrefixShare, Runner,
};
use super::generate::{GenEvent, GenParams};
use super::resolve::ResolvedModel;
use super::{catalog::Component, ModelError, PreparedInput, Prompt};
use crate::error::ClassifiedError;
use crate::protocol::{ChatMessage, ContentPart, Job};

/// The Gemma-3n family as the registry lists it.
pub static SPEC: FamilySpec = FamilySpec {
    name: "gemma3n",
    model_types: &["gemma3n"],
    components: &[
        Component::EmbedTokens,
        Component::DecoderModelMerged,
        Component::VisionEncoder,
        Component::AudioEncoder,
    ],
    quants: &[
        Quant::Q4Mixed,
        Quant::Q4,
        Quant::Q4F16,
        Quant::Quantized,
        Quant::Int8,
        Quant::Uint8,
        Quant::Bnb4,
        Quant::Fp16,
        Quant::Fp32,
    ],
    fallbacks: |c| match c {
        Component::EmbedTokens => &["_quantized", "_fp16", ""],
        Component::VisionEncoder => &["_quantized", "_uint8", "_fp16", ""],
        Component::AudioEncoder | Component::DecoderModelMerged => {
            &["_q4", "_quantized", "_fp16", ""]
        }
    },
    catalog: &[(
        "Gemma-3n-E2B-it-ONNX",
        "onnx-community/gemma-3n-E2B-it-ONNX",
    )],
    load,
};

struct Backend {
    prompter: Gemma3nPrompter,
    media: MediaDecoder,
    runner: Runner<Gemma3nModel>,
}

impl FamilyBackend for Backend {
    fn prompt(&self, messages: &[ChatMessage]) -> Result<Prompt, ModelError> {
        self.prompter.build(messages)
    }

    fn prepare_input(
        &self,
        job: &Job,
        messages: &[ChatMessage],
    ) -> Result<PreparedInput, ClassifiedError> {
        let mut images = Vec::new();
        let mut audio = Vec::new();
        for part in messages.iter().flat_map(|m| m.content.iter()) {
            match part {
                ContentPart::Image { source } => {
                    images.push(self.media.image(images.len(), source)?)
                }
                ContentPart::Audio { source, format } => {
                    audio.push(self.media.audio(audio.len(), source, format.as_deref())?)
                }
                ContentPart::Text { .. } => {}
            }
        }
        let tools = match self.native_tools() {
            true => crate::models::tools::template_tools(job)?,
            false => None,
        };
        let prompt = self
            .prompter
            .build_with_tools(messages, tools.as_ref(), job.chat_template_kwargs.as_ref())
            .map_err(ModelError::into_classified)?;
        Ok(PreparedInput {
            ids: prompt.ids,
            images,
            audio,
        })
    }

    fn native_tools(&self) -> bool {
        self.prompter.native_tools()
    }

    fn start(
        &self,
        input: PreparedInput,
        params: GenParams,
        events: UnboundedSender<GenEvent>,
        cancel: Arc<AtomicBool>,
    ) -> Result<(), ClassifiedError> {
        self.runner.start(input, params, events, cancel)
    }
}

/// Loads a Gemma-3n snapshot: configs, tokenizer, template, media settings, and the graphs on their
/// owner thread.
pub fn load(
    model: &ResolvedModel,
    opts: &LoadOptions,
    stats: Arc<CacheStats>,
    prefix: &PrefixShare,
) -> Result<LoadedFamily, ModelError> {
    let dir = &model.root;
    let cfg = Gemma3nConfig::load(dir)?;
    let defaults = GenerationDefaults::load(dir, &cfg.eos_token_ids)?;
    let tokenizer = Arc::new(load_tokenizer(dir)?);
    let prompter = Gemma3nPrompter::new(dir, &cfg, tokenizer.clone())?;
    let media = MediaDecoder::new(dir, opts.media.clone())?;
    let runner = {
        let model = model.clone();
        let cfg = cfg.clone();
        let sess = opts.session.clone();
        let cache = EncoderCache::new(opts.encoder_cache_bytes, stats);
        Runner::spawn(
            &model.served_name.clone(),
            tokenizer.clone(),
            opts,
            prefix,
            move || Gemma3nModel::load(&model, cfg, &sess, cache),
        )?
    };
    Ok(LoadedFamily {
        backend: Box::new(Backend {
            prompter,
            media,
            runner,
        }),
        tokenizer,
        defaults,
        context_length: cfg.context_length,
        media_ids: vec![cfg.image_token_id, cfg.audio_token_id],
        vision: model.plan.graph(Component::VisionEncoder).is_some(),
        audio: model.plan.graph(Component::AudioEncoder).is_some(),
        reasoning: None,
        tool_call_tokens: Vec::new(),
    })
}
