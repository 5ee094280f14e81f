//! The SmolVLM family (`model_type: idefics3` or `smolvlm`; HuggingFaceTB/SmolVLM-256M-Instruct):
//! `config.json` values ([`config`]), prompt building with the Idefics3 image layout ([`prompt`]), image
//! splitting into tiles plus a global frame ([`preprocess`]), the three ONNX graphs ([`model`]), and the
//! backend that wires them for serving ([`load`]).

pub mod config;
pub mod model;
pub mod preprocess;
pub mod prompt;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

pub use config::SmolVlmConfig;
pub use model::SmolVlmModel;
pub use preprocess::{SmolVlmMedia, SplitImage};
pub use prompt::SmolVlmPrompter;

use super::catalog::Quant;
use super::config_util::GenerationDefaults;
use super::encoder_cache::{CacheStats, EncoderCache};
use super::family::{
    load_tokenizer, FamilyBackend, FamilySpec, LoadOptions, LoadedFamily, PrefixShare, Runner,
};
use super::generate::{GenEvent, GenParams};
use super::media::image_sources;
use super::resolve::ResolvedModel;
use super::{catalog::Component, ModelError, PreparedInput, Prompt};
use crate::error::ClassifiedError;
use crate::protocol::{ChatMessage, Job};

/// The SmolVLM family as the registry lists it. Quantizations: the original server's SmolVLM names (no
/// Q4_MIXED), UINT8 first (its smallest-first default). Its exports do not have every suffix for every
/// graph (a public mirror has no `embed_tokens_quantized` and no `vision_encoder_uint8`): any 8-bit
/// variant, then fp16, fp32.
pub static SPEC: FamilySpec = FamilySpec {
    name: "smolvlm",
    model_types: &["idefics3", "smolvlm"],
    components: &[
        Component::EmbedTokens,
        Component::DecoderModelMerged,
        Component::VisionEncoder,
    ],
    quants: &[
        Quant::Uint8,
        Quant::Fp32,
        Quant::Fp16,
        Quant::Int8,
        Quant::Q4,
        Quant::Q4F16,
        Quant::Bnb4,
        Quant::Quantized,
    ],
    fallbacks: |_| &["_uint8", "_quantized", "_int8", "_fp16", ""],
    catalog: &[(
        "SmolVLM-256M-Instruct",
        "HuggingFaceTB/SmolVLM-256M-Instruct",
    )],
    load,
};

struct Backend {
    prompter: SmolVlmPrompter,
    media: SmolVlmMedia,
    runner: Runner<SmolVlmModel>,
}

impl FamilyBackend for Backend {
    /// The prompt depends on each image's tile layout, so the images are decoded (not resized) here.
    fn prompt(&self, messages: &[ChatMessage]) -> Result<Prompt, ModelError> {
        let layouts = image_sources(messages)
            .enumerate()
            .map(|(i, source)| self.media.layout(i, source))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ModelError::Request)?;
        self.prompter.build(messages, &layouts, None, None)
    }

    fn prepare_input(
        &self,
        job: &Job,
        messages: &[ChatMessage],
    ) -> Result<PreparedInput, ClassifiedError> {
        let images = image_sources(messages)
            .enumerate()
            .map(|(i, source)| self.media.image(i, source))
            .collect::<Result<Vec<SplitImage>, _>>()?;
        let layouts: Vec<(usize, usize)> = images.iter().map(|i| (i.rows, i.cols)).collect();
        let tools = match self.native_tools() {
            true => crate::models::tools::template_tools(job)?,
            false => None,
        };
        let prompt = self
            .prompter
            .build(
                messages,
                &layouts,
                tools.as_ref(),
                job.chat_template_kwargs.as_ref(),
            )
            .map_err(ModelError::into_classified)?;
        Ok(PreparedInput {
            ids: prompt.ids,
            images: images.into_iter().map(|i| i.input).collect(),
            audio: Vec::new(),
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

/// Loads a SmolVLM snapshot: configs, tokenizer, template, image processor, and the graphs on their
/// owner thread. Generation stops at the configured end ids and at `<end_of_utterance>` (every turn of
/// the chat template ends with it; the configs name only the text model's end id).
pub fn load(
    model: &ResolvedModel,
    opts: &LoadOptions,
    stats: Arc<CacheStats>,
    prefix: &PrefixShare,
) -> Result<LoadedFamily, ModelError> {
    let dir = &model.root;
    let cfg = SmolVlmConfig::load(dir)?;
    let tokenizer = Arc::new(load_tokenizer(dir)?);
    let eou = tokenizer
        .token_to_id(prompt::END_OF_UTTERANCE)
        .ok_or_else(|| {
            ModelError::Tokenizer(format!(
                "the tokenizer has no {} token, which ends every turn",
                prompt::END_OF_UTTERANCE
            ))
        })?;
    let defaults = GenerationDefaults::load(dir, &cfg.eos_token_ids)?.with_eos([eou]);
    let prompter = SmolVlmPrompter::new(dir, &cfg, tokenizer.clone())?;
    let media = SmolVlmMedia::new(dir, opts.media.clone())?;
    let tile = media.processing().tile as usize;
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
            move || SmolVlmModel::load(&model, cfg, tile, &sess, cache),
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
        media_ids: vec![cfg.image_token_id],
        vision: model.plan.graph(Component::VisionEncoder).is_some(),
        audio: false,
        reasoning: None,
        tool_call_tokens: Vec::new(),
    })
}
