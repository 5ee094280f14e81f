//! Granite Vision prompt building: OpenAI-style parts → template items, the model's own chat template,
//! each `<image>` expanded as text into as many `<image>` tokens as the image has packed feature rows
//! (`LlavaNextProcessor.replace_image_token`), then the tokenizer without added special tokens (the
//! template writes every marker itself).
//!
//! Messages made only of text reach the template as a string, others as a list of `{"type": "text"}`
//! and `{"type": "image"}` items in order (the Granite template takes both).

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use super::config::GraniteVisionConfig;
use super::preprocess::FeatureLayout;
use crate::models::prompt::{count_images, expand, load_template, render, tokenize};
use crate::models::{ModelError, Prompt};
use crate::pipeline::template::ChatTemplate;
use crate::protocol::{ChatMessage, ContentPart};

pub struct GraniteVisionPrompter {
    template: ChatTemplate,
    tokenizer: Arc<Tokenizer>,
    image_token: String,
}

impl GraniteVisionPrompter {
    pub fn new(
        dir: &Path,
        cfg: &GraniteVisionConfig,
        tokenizer: Arc<Tokenizer>,
    ) -> Result<Self, ModelError> {
        let template = load_template(dir)?;
        let image_token = tokenizer.id_to_token(cfg.image_token_id).ok_or_else(|| {
            ModelError::Tokenizer(format!(
                "the tokenizer has no image token (config.json image_token_index {})",
                cfg.image_token_id
            ))
        })?;
        Ok(Self {
            template,
            tokenizer,
            image_token,
        })
    }

    /// The template's items for `messages`.
    pub fn template_messages(messages: &[ChatMessage]) -> Value {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                let text_only = m
                    .content
                    .iter()
                    .all(|p| matches!(p, ContentPart::Text { .. }));
                let content = if text_only {
                    Value::String(
                        m.content
                            .iter()
                            .filter_map(|p| match p {
                                ContentPart::Text { text } => Some(text.as_str()),
                                _ => None,
                            })
                            .collect(),
                    )
                } else {
                    m.content
                        .iter()
                        .map(|p| match p {
                            ContentPart::Text { text } => json!({"type": "text", "text": text}),
                            ContentPart::Image { .. } => json!({"type": "image"}),
                            ContentPart::Audio { .. } => json!({"type": "audio"}),
                        })
                        .collect()
                };
                let mut obj = json!({"role": m.role.as_str(), "content": content});
                crate::models::tools::add_template_fields(m, &mut obj);
                obj
            })
            .collect();
        Value::Array(msgs)
    }

    /// The template has its own tool syntax.
    pub fn native_tools(&self) -> bool {
        self.template.declares_tools()
    }

    /// The prompt for `messages` whose images (in order) have the feature layouts `layouts`; `tools`
    /// (OpenAI's list) goes to a template that reads it, `kwargs` (the job's
    /// `chat_template_kwargs`) to the template as extra variables.
    pub fn build(
        &self,
        messages: &[ChatMessage],
        layouts: &[FeatureLayout],
        tools: Option<&Value>,
        kwargs: Option<&Map<String, Value>>,
    ) -> Result<Prompt, ModelError> {
        let n_images = count_images(messages, layouts.len())?;
        let rendered = render(
            &self.template,
            &Self::template_messages(messages),
            tools,
            kwargs,
        )?;
        let blocks: Vec<String> = layouts
            .iter()
            .map(|l| self.image_token.repeat(l.tokens()))
            .collect();
        let expanded = expand(&rendered, &self.image_token, &blocks)?;
        let ids = tokenize(&self.tokenizer, &expanded)?;
        Ok(Prompt {
            rendered,
            expanded,
            ids,
            n_images,
            n_audio: 0,
        })
    }
}
