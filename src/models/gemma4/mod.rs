//! The Gemma 4 family (`model_type: gemma4`; onnx-community/gemma-4-E2B-it-ONNX and -E4B-it-ONNX,
//! docs/gemma4.md): `config.json` and processor values ([`config`]), prompt building with the template's
//! options such as `enable_thinking` ([`prompt`]), media preprocessing with per-item soft-token counts
//! ([`preprocess`]), the four ONNX graphs on the shared text decoder driver ([`model`]), and the backend
//! that wires them for serving ([`load`]). The thought channel (`<|channel>` … `<channel|>`) is what the
//! generation loop returns as `reasoning_content`.

pub mod config;
pub mod model;
pub mod preprocess;
pub mod prompt;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

pub use config::Gemma4Config;
pub use model::Gemma4Model;
pub use preprocess::{ImageProcessing, MediaDecoder};
pub use prompt::Gemma4Prompter;

use super::catalog::Quant;
use super::config_util::GenerationDefaults;
use super::encoder_cache::{CacheStats, EncoderCache};
use super::family::{
    load_tokenizer, FamilyBackend, FamilySpec, LoadOptions, LoadedFamily, PrefixShare, Runner,
};
use super::generate::{GenEvent, GenParams};
use super::resolve::ResolvedModel;
use super::{catalog::Component, AudioInput, ImageInput, ModelError, PreparedInput, Prompt};
use crate::error::ClassifiedError;
use crate::pipeline::reasoning::ReasoningMarkers;
use crate::protocol::{ChatMessage, ContentPart, Job};

/// The Gemma 4 family as the registry lists it. Quantizations: transformers.js' dtype names the
/// onnx-community exports use, `Q4` (known to exist for the text graphs) first.
pub static SPEC: FamilySpec = FamilySpec {
    name: "gemma4",
    model_types: &["gemma4"],
    components: &[
        Component::EmbedTokens,
        Component::DecoderModelMerged,
        Component::VisionEncoder,
        Component::AudioEncoder,
    ],
    quants: &[
        Quant::Q4,
        Quant::Q4F16,
        Quant::Quantized,
        Quant::Fp16,
        Quant::Fp32,
    ],
    fallbacks: |_| &["_q4", "_quantized", "_fp16", ""],
    catalog: &[
        ("gemma-4-E2B-it-ONNX", "onnx-community/gemma-4-E2B-it-ONNX"),
        ("gemma-4-E4B-it-ONNX", "onnx-community/gemma-4-E4B-it-ONNX"),
    ],
    load,
};

/// The tokens of Gemma 4's tool-call syntax: `<|tool_call>call:NAME{key:value,…}<tool_call|>`, strings
/// between `<|"|>` quotes (docs/gemma4.md §4).
const CALL_TOKENS: [&str; 3] = ["<|tool_call>", "<tool_call|>", "<|\"|>"];

/// The thought channel's markers and the label the model writes after the opening one.
const THOUGHT_OPEN: &str = "<|channel>";
const THOUGHT_CLOSE: &str = "<channel|>";
const THOUGHT_LABEL: &str = "thought\n";

struct Backend {
    prompter: Gemma4Prompter,
    media: MediaDecoder,
    runner: Runner<Gemma4Model>,
}

impl Backend {
    /// The media of `messages`, decoded and preprocessed in prompt order.
    fn media(
        &self,
        messages: &[ChatMessage],
    ) -> Result<(Vec<ImageInput>, Vec<AudioInput>), ClassifiedError> {
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
        Ok((images, audio))
    }

    fn build(
        &self,
        messages: &[ChatMessage],
        images: &[ImageInput],
        audio: &[AudioInput],
        job: Option<&Job>,
        tools: Option<&serde_json::Value>,
    ) -> Result<Prompt, ModelError> {
        let image_tokens: Vec<usize> = images
            .iter()
            .map(|i| i.patches.as_ref().map_or(0, |p| p.soft_tokens))
            .collect();
        let audio_tokens: Vec<usize> = audio
            .iter()
            .map(|a| preprocess::audio_soft_tokens(&a.mask))
            .collect();
        let kwargs = job.and_then(|j| j.chat_template_kwargs.as_ref());
        self.prompter
            .build(messages, &image_tokens, &audio_tokens, tools, kwargs)
    }
}

impl FamilyBackend for Backend {
    /// The prompt depends on each image's size and each clip's length, so the media are
    /// preprocessed here.
    fn prompt(&self, messages: &[ChatMessage]) -> Result<Prompt, ModelError> {
        let (images, audio) = self.media(messages).map_err(ModelError::Request)?;
        self.build(messages, &images, &audio, None, None)
    }

    fn prepare_input(
        &self,
        job: &Job,
        messages: &[ChatMessage],
    ) -> Result<PreparedInput, ClassifiedError> {
        let (images, audio) = self.media(messages)?;
        let tools = match self.native_tools() {
            true => crate::models::tools::template_tools(job)?,
            false => None,
        };
        let prompt = self
            .build(messages, &images, &audio, Some(job), tools.as_ref())
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

/// Loads a Gemma 4 snapshot: configs, tokenizer, template, media settings, and the graphs on their
/// owner thread.
pub fn load(
    model: &ResolvedModel,
    opts: &LoadOptions,
    stats: Arc<CacheStats>,
    prefix: &PrefixShare,
) -> Result<LoadedFamily, ModelError> {
    let dir = &model.root;
    let cfg = Gemma4Config::load(dir)?;
    let defaults = GenerationDefaults::load(dir, &cfg.eos_token_ids)?;
    let tokenizer = Arc::new(load_tokenizer(dir)?);
    let prompter = Gemma4Prompter::new(dir, &cfg, tokenizer.clone())?;
    let images = ImageProcessing::from_config(&cfg.image_processor)?;
    let mel = preprocess::mel_config(&cfg.feature_extractor);
    let media = MediaDecoder::new(images.clone(), &mel, opts.media.clone())?;
    let reasoning = match (
        tokenizer.token_to_id(THOUGHT_OPEN),
        tokenizer.token_to_id(THOUGHT_CLOSE),
    ) {
        (Some(start), Some(end)) => Some(ReasoningMarkers {
            start,
            end,
            label: THOUGHT_LABEL.into(),
        }),
        _ => None,
    };
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
            move || Gemma4Model::load(&model, cfg, &sess, cache, &images),
        )?
    };
    Ok(LoadedFamily {
        backend: Box::new(Backend {
            prompter,
            media,
            runner,
        }),
        tokenizer: tokenizer.clone(),
        defaults,
        context_length: cfg.context_length,
        media_ids: cfg.soft_token_ids(),
        vision: model.plan.graph(Component::VisionEncoder).is_some(),
        audio: model.plan.graph(Component::AudioEncoder).is_some(),
        reasoning,
        tool_call_tokens: CALL_TOKENS
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect(),
    })
}
