//! Gemma-3n prompt building (model_interface.md §1.5): OpenAI-style parts → template items, the model's
//! own chat template, placeholder expansion as text, then the tokenizer without a second BOS.
//!
//! Expansion happens on text, not ids, as the reference processor does: the `\n\n` around each media
//! block can merge with neighbouring newlines into one piece, which id-level insertion would miss.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};
use tokenizers::Tokenizer;

use super::config::Gemma3nConfig;
use crate::error::ClassifiedError;
use crate::models::prompt::load_template;
use crate::models::{ModelError, Prompt};
use crate::pipeline::template::{ChatTemplate, TemplateError};
use crate::protocol::{ChatMessage, ContentPart};

pub struct Gemma3nPrompter {
    template: ChatTemplate,
    tokenizer: Arc<Tokenizer>,
    image_token: String,
    audio_token: String,
    image_block: String,
    audio_block: String,
    bos_id: Option<u32>,
}

impl Gemma3nPrompter {
    pub fn new(
        dir: &Path,
        cfg: &Gemma3nConfig,
        tokenizer: Arc<Tokenizer>,
    ) -> Result<Self, ModelError> {
        let template = load_template(dir)?;
        let tok = |id: u32, what: &str| {
            tokenizer.id_to_token(id).ok_or_else(|| {
                ModelError::Tokenizer(format!("the tokenizer has no {what} token (id {id})"))
            })
        };
        let image_token = tok(cfg.image_token_id, "image soft")?;
        let audio_token = tok(cfg.audio_token_id, "audio soft")?;
        let image_block = format!(
            "\n\n{}{}{}\n\n",
            tok(cfg.boi_token_id, "start-of-image")?,
            image_token.repeat(cfg.image_seq_length),
            tok(cfg.eoi_token_id, "end-of-image")?
        );
        let audio_block = format!(
            "\n\n{}{}{}\n\n",
            tok(cfg.boa_token_id, "start-of-audio")?,
            audio_token.repeat(cfg.audio_seq_length),
            tok(cfg.eoa_token_id, "end-of-audio")?
        );
        Ok(Self {
            template,
            tokenizer,
            image_token,
            audio_token,
            image_block,
            audio_block,
            bos_id: cfg.bos_token_id,
        })
    }

    /// Maps messages to what HF chat templates expect: a message that is one text part stays a string
    /// (as the client most likely sent it); otherwise a list of `text` / `image` / `audio` items in order.
    pub fn template_messages(messages: &[ChatMessage]) -> Value {
        crate::models::prompt::template_items(messages)
    }

    /// The template has its own tool syntax.
    pub fn native_tools(&self) -> bool {
        self.template.declares_tools()
    }

    pub fn build(&self, messages: &[ChatMessage]) -> Result<Prompt, ModelError> {
        self.build_with_tools(messages, None, None)
    }

    /// The prompt, with OpenAI's `tools` list given to a template that reads it and `kwargs` (the
    /// job's `chat_template_kwargs`) as extra template variables.
    pub fn build_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Value>,
        kwargs: Option<&Map<String, Value>>,
    ) -> Result<Prompt, ModelError> {
        let n_images = count_parts(messages, |p| matches!(p, ContentPart::Image { .. }));
        let n_audio = count_parts(messages, |p| matches!(p, ContentPart::Audio { .. }));
        let rendered = self
            .template
            .render_with(&Self::template_messages(messages), tools, kwargs, true)
            .map_err(|e| match e {
                TemplateError::Render(m) => {
                    ModelError::Request(ClassifiedError::invalid("messages", m))
                }
                other => ModelError::Config(other.to_string()),
            })?;
        let found_images = rendered.matches(&self.image_token).count();
        let found_audio = rendered.matches(&self.audio_token).count();
        if found_images != n_images || found_audio != n_audio {
            return Err(ModelError::Request(ClassifiedError::invalid(
                "messages",
                format!(
                    "the rendered prompt has {found_images} image and {found_audio} audio placeholders for {n_images} images and {n_audio} audio clips; message text must not contain the reserved tokens {} or {}",
                    self.image_token, self.audio_token
                ),
            )));
        }
        let expanded = rendered
            .replace(&self.image_token, &self.image_block)
            .replace(&self.audio_token, &self.audio_block);
        let enc = self
            .tokenizer
            .encode(expanded.as_str(), false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        // The template writes the BOS; a template without one still gets exactly one, as the tokenizer's
        // add_bos_token would give.
        if let Some(bos) = self.bos_id {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(Prompt {
            rendered,
            expanded,
            ids,
            n_images,
            n_audio,
        })
    }
}

fn count_parts(messages: &[ChatMessage], f: impl Fn(&ContentPart) -> bool) -> usize {
    messages
        .iter()
        .flat_map(|m| m.content.iter())
        .filter(|p| f(p))
        .count()
}
