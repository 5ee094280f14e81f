//! The Granite Vision family (`model_type: llava_next`; ibm-granite/granite-vision-3.2-2b exported by
//! `tools/export/granite_vision.py`): `config.json` values ([`config`]), prompt building with `<image>`
//! runs as long as each image's packed features ([`prompt`]), anyres tiling and feature packing
//! ([`preprocess`]), the three ONNX graphs ([`model`]), and the backend that wires them for serving
//! ([`load`]).

pub mod config;
pub mod model;
pub mod preprocess;
pub mod prompt;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

pub use config::GraniteVisionConfig;
pub use model::GraniteVisionModel;
pub use preprocess::{AnyresImage, AnyresProcessing, FeatureLayout, GraniteVisionMedia};
pub use prompt::GraniteVisionPrompter;

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

/// The Granite Vision family as the registry lists it: the sets tools/export/granite_vision.py writes
/// (Q4_MIXED, its default: q4 decoder, int8 embeddings and vision encoder; INT8 and Q8 name its
/// `_quantized` set). The recipe has no `_q4` embedding table (no MatMul to quantize). No ONNX export is
/// published: the repo id names the checkpoint the recipe exports.
pub static SPEC: FamilySpec = FamilySpec {
    name: "granite_vision",
    model_types: &["llava_next"],
    components: &[
        Component::EmbedTokens,
        Component::DecoderModelMerged,
        Component::VisionEncoder,
    ],
    quants: &[
        Quant::Q4Mixed,
        Quant::Q4,
        Quant::Quantized,
        Quant::Int8,
        Quant::Fp32,
    ],
    fallbacks: |_| &["_quantized", "_int8", ""],
    catalog: &[("granite-vision-3.2-2b", "ibm-granite/granite-vision-3.2-2b")],
    load,
};

struct Backend {
    prompter: GraniteVisionPrompter,
    media: GraniteVisionMedia,
    runner: Runner<GraniteVisionModel>,
}

impl FamilyBackend for Backend {
    /// The prompt depends on each image's size, so the images are decoded (not resized) here.
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
            .collect::<Result<Vec<AnyresImage>, _>>()?;
        let layouts: Vec<FeatureLayout> = images.iter().map(|i| i.layout).collect();
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

/// Loads a Granite Vision snapshot: configs, tokenizer, template, image processor, and the graphs on
/// their owner thread. Generation stops at the configured end ids (`<|end_of_text|>`, which also ends
/// every assistant turn of the template).
pub fn load(
    model: &ResolvedModel,
    opts: &LoadOptions,
    stats: Arc<CacheStats>,
    prefix: &PrefixShare,
) -> Result<LoadedFamily, ModelError> {
    let dir = &model.root;
    let cfg = GraniteVisionConfig::load(dir)?;
    let tokenizer = Arc::new(load_tokenizer(dir)?);
    let defaults = GenerationDefaults::load(dir, &cfg.eos_token_ids)?;
    let prompter = GraniteVisionPrompter::new(dir, &cfg, tokenizer.clone())?;
    let media = GraniteVisionMedia::new(dir, &cfg, opts.media.clone())?;
    let processing = media.processing().clone();
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
            move || GraniteVisionModel::load(&model, cfg, &sess, cache, processing),
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
