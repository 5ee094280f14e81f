//! Gemma 4 prompt building (docs/gemma4.md §4): OpenAI-style parts → template items, the model's own chat
//! template (with the request's `chat_template_kwargs`, e.g. `enable_thinking`), each image / audio
//! placeholder expanded as text into `begin + soft token · n + end` with that item's `n`, then the tokenizer
//! without a second BOS.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};
use tokenizers::Tokenizer;

use super::config::Gemma4Config;
use crate::error::{ClassifiedError, ErrorClass};
use crate::models::prompt::{expand, load_template, render, template_items, tokenize};
use crate::models::{ModelError, Prompt};
use crate::pipeline::template::ChatTemplate;
use crate::protocol::{ChatMessage, ContentPart};

pub struct Gemma4Prompter {
    template: ChatTemplate,
    tokenizer: Arc<Tokenizer>,
    image_token: String,
    audio_token: String,
    image_ends: (String, String),
    audio_ends: (String, String),
    bos_id: Option<u32>,
}

impl Gemma4Prompter {
    pub fn new(
        dir: &Path,
        cfg: &Gemma4Config,
        tokenizer: Arc<Tokenizer>,
    ) -> Result<Self, ModelError> {
        let tok = |id: u32, what: &str| {
            tokenizer.id_to_token(id).ok_or_else(|| {
                ModelError::Tokenizer(format!("the tokenizer has no {what} token (id {id})"))
            })
        };
        Ok(Self {
            template: load_template(dir)?,
            image_token: tok(cfg.image_token_id, "image")?,
            audio_token: tok(cfg.audio_token_id, "audio")?,
            image_ends: (
                tok(cfg.boi_token_id, "begin-of-image")?,
                tok(cfg.eoi_token_id, "end-of-image")?,
            ),
            audio_ends: (
                tok(cfg.boa_token_id, "begin-of-audio")?,
                tok(cfg.eoa_token_id, "end-of-audio")?,
            ),
            bos_id: cfg.bos_token_id,
            tokenizer,
        })
    }

    /// The template has its own tool syntax.
    pub fn native_tools(&self) -> bool {
        self.template.declares_tools()
    }

    /// The prompt of `messages` whose images become `image_tokens[i]` soft tokens each and clips
    /// `audio_tokens[j]`; `tools` and `kwargs` go to the template.
    pub fn build(
        &self,
        messages: &[ChatMessage],
        image_tokens: &[usize],
        audio_tokens: &[usize],
        tools: Option<&Value>,
        kwargs: Option<&Map<String, Value>>,
    ) -> Result<Prompt, ModelError> {
        let count = |f: fn(&ContentPart) -> bool| {
            messages
                .iter()
                .flat_map(|m| m.content.iter())
                .filter(|p| f(p))
                .count()
        };
        let n_images = count(|p| matches!(p, ContentPart::Image { .. }));
        let n_audio = count(|p| matches!(p, ContentPart::Audio { .. }));
        if (n_images, n_audio) != (image_tokens.len(), audio_tokens.len()) {
            return Err(ModelError::Request(ClassifiedError::new(
                ErrorClass::Internal,
                format!(
                    "{} image and {} audio token counts for {n_images} images and {n_audio} clips",
                    image_tokens.len(),
                    audio_tokens.len()
                ),
            )));
        }
        let rendered = render(&self.template, &template_items(messages), tools, kwargs)?;
        let block = |(begin, end): &(String, String), token: &str, n: usize| {
            format!("{begin}{}{end}", token.repeat(n))
        };
        let blocks: Vec<String> = image_tokens
            .iter()
            .map(|&n| block(&self.image_ends, &self.image_token, n))
            .collect();
        let expanded = expand(&rendered, &self.image_token, &blocks)?;
        let blocks: Vec<String> = audio_tokens
            .iter()
            .map(|&n| block(&self.audio_ends, &self.audio_token, n))
            .collect();
        // The image blocks hold no audio placeholder, so the audio placeholders left are the template's.
        let expanded = expand(&expanded, &self.audio_token, &blocks)?;
        let mut ids = tokenize(&self.tokenizer, &expanded)?;
        // The template writes the BOS; a template without one still gets exactly one.
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
