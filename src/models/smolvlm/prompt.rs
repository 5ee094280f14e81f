//! SmolVLM prompt building (model_interface.md §2.4): OpenAI-style parts → template items, the model's
//! own chat template, `<image>` expansion as text (the Idefics3 processor's `replace_image_token`), then
//! the tokenizer without added special tokens (the template writes `<|im_start|>`).
//!
//! Each `<image>` becomes, for an image split into rows × cols tiles,
//! `(<fake_token_around_image><row_r_col_c>` + `<image>`×N`)` per tile with `\n` after each row, then
//! `\n<fake_token_around_image><global-img>` + `<image>`×N + `<fake_token_around_image>`; an image that was
//! not split gets only the global part without the leading `\n`. The expansion is text, so the row `\n`
//! before the global part's `\n` tokenizes as one `\n\n` piece where the vocabulary has one.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use super::config::SmolVlmConfig;
use crate::models::prompt::{count_images, expand, load_template, render, tokenize};
use crate::models::{ModelError, Prompt};
use crate::pipeline::template::ChatTemplate;
use crate::protocol::{ChatMessage, ContentPart};

pub const FAKE_TOKEN: &str = "<fake_token_around_image>";
pub const GLOBAL_TOKEN: &str = "<global-img>";
pub const END_OF_UTTERANCE: &str = "<end_of_utterance>";

pub struct SmolVlmPrompter {
    template: ChatTemplate,
    tokenizer: Arc<Tokenizer>,
    image_token: String,
    image_run: String,
}

impl SmolVlmPrompter {
    pub fn new(
        dir: &Path,
        cfg: &SmolVlmConfig,
        tokenizer: Arc<Tokenizer>,
    ) -> Result<Self, ModelError> {
        let template = load_template(dir)?;
        let image_token = tokenizer.id_to_token(cfg.image_token_id).ok_or_else(|| {
            ModelError::Tokenizer(format!(
                "the tokenizer has no image token (config.json image_token_id {})",
                cfg.image_token_id
            ))
        })?;
        for t in [FAKE_TOKEN, GLOBAL_TOKEN] {
            if tokenizer.token_to_id(t).is_none() {
                return Err(ModelError::Tokenizer(format!(
                    "the tokenizer has no {t} token, which the Idefics3 prompt layout needs"
                )));
            }
        }
        Ok(Self {
            template,
            tokenizer,
            image_run: image_token.repeat(cfg.image_seq_len),
            image_token,
        })
    }

    /// Maps messages to the items this template expects: every content is a list (the template reads
    /// `content[0]['type']` and iterates the items, so a plain string would render as nothing); text parts
    /// become `{"type": "text"}` items and images `{"type": "image"}`, in order.
    pub fn template_messages(messages: &[ChatMessage]) -> Value {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                let items: Vec<Value> = m
                    .content
                    .iter()
                    .map(|p| match p {
                        ContentPart::Text { text } => json!({"type": "text", "text": text}),
                        ContentPart::Image { .. } => json!({"type": "image"}),
                        ContentPart::Audio { .. } => json!({"type": "audio"}),
                    })
                    .collect();
                let mut obj = json!({"role": m.role.as_str(), "content": items});
                crate::models::tools::add_template_fields(m, &mut obj);
                obj
            })
            .collect();
        Value::Array(msgs)
    }

    /// The text an image of `rows` × `cols` tiles (0 × 0: not split) stands for.
    pub fn image_block(&self, rows: usize, cols: usize) -> String {
        let global = format!("{FAKE_TOKEN}{GLOBAL_TOKEN}{}{FAKE_TOKEN}", self.image_run);
        if rows == 0 || cols == 0 {
            return global;
        }
        let mut s = String::with_capacity((rows * cols + 1) * (self.image_run.len() + 40));
        for r in 1..=rows {
            for c in 1..=cols {
                s.push_str(FAKE_TOKEN);
                s.push_str(&format!("<row_{r}_col_{c}>"));
                s.push_str(&self.image_run);
            }
            s.push('\n');
        }
        s.push('\n');
        s.push_str(&global);
        s
    }

    /// The template has its own tool syntax.
    pub fn native_tools(&self) -> bool {
        self.template.declares_tools()
    }

    /// The prompt for `messages` whose images (in order) have the tile layouts `layouts`; `tools`
    /// (OpenAI's list) goes to a template that reads it, `kwargs` (the job's
    /// `chat_template_kwargs`) to the template as extra variables.
    pub fn build(
        &self,
        messages: &[ChatMessage],
        layouts: &[(usize, usize)],
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
            .map(|&(rows, cols)| self.image_block(rows, cols))
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
