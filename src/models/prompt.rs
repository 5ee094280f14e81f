//! Prompt steps every template-driven family shares (HOUSE.md move 2): finding and compiling a snapshot's
//! chat template, rendering it with the errors classified (a template's `raise_exception` is the
//! request's fault: 400 on `messages`), and expanding each media placeholder of the rendered text into
//! its soft-token run before tokenizing.

use std::path::Path;

use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use crate::error::{ClassifiedError, ErrorClass};
use crate::models::ModelError;
use crate::pipeline::template::{ChatTemplate, TemplateError, TEMPLATE_SOURCES};
use crate::protocol::{ChatMessage, ContentPart};

/// The chat template of snapshot `dir`, found where transformers looks for it
/// ([`ChatTemplate::load_from_dir`]) and compiled; every family's prompter starts here.
pub fn load_template(dir: &Path) -> Result<ChatTemplate, ModelError> {
    let (source, tokens) = ChatTemplate::load_from_dir(dir)
        .map_err(|e| ModelError::Config(e.to_string()))?
        .ok_or_else(|| {
            ModelError::Config(format!(
                "{} has no chat template (tried {TEMPLATE_SOURCES})",
                dir.display()
            ))
        })?;
    ChatTemplate::new(&source, tokens).map_err(|e| ModelError::Config(e.to_string()))
}

/// Renders `messages` (the template's items) with the generation prompt; `tools` goes to a template that
/// reads it, `kwargs` (the job's `chat_template_kwargs`, e.g. `enable_thinking`) to the template as
/// extra top-level variables.
pub fn render(
    template: &ChatTemplate,
    messages: &Value,
    tools: Option<&Value>,
    kwargs: Option<&Map<String, Value>>,
) -> Result<String, ModelError> {
    template
        .render_with(messages, tools, kwargs, true)
        .map_err(|e| match e {
            TemplateError::Render(m) => {
                ModelError::Request(ClassifiedError::invalid("messages", m))
            }
            other => ModelError::Config(other.to_string()),
        })
}

/// Messages as Hugging Face chat templates take them: a message that is one text part stays a string
/// (as the client most likely sent it); otherwise a list of `text` / `image` / `audio` items in the
/// order of the parts; plus the history's tool calls and call ids.
pub fn template_items(messages: &[ChatMessage]) -> Value {
    let msgs: Vec<Value> = messages
        .iter()
        .map(|m| {
            let content = match m.content.as_slice() {
                [ContentPart::Text { text }] => Value::String(text.clone()),
                parts => Value::Array(
                    parts
                        .iter()
                        .map(|p| match p {
                            ContentPart::Text { text } => json!({"type": "text", "text": text}),
                            ContentPart::Image { .. } => json!({"type": "image"}),
                            ContentPart::Audio { .. } => json!({"type": "audio"}),
                        })
                        .collect(),
                ),
            };
            let mut obj = json!({"role": m.role.as_str(), "content": content});
            crate::models::tools::add_template_fields(m, &mut obj);
            obj
        })
        .collect();
    Value::Array(msgs)
}

/// Image parts in `messages`; fails (internal) unless the preprocessing gave `layouts` as many.
pub fn count_images(messages: &[ChatMessage], layouts: usize) -> Result<usize, ModelError> {
    let n = messages
        .iter()
        .flat_map(|m| m.content.iter())
        .filter(|p| matches!(p, ContentPart::Image { .. }))
        .count();
    if layouts != n {
        return Err(ModelError::Request(ClassifiedError::new(
            ErrorClass::Internal,
            format!("{layouts} image layouts for {n} images"),
        )));
    }
    Ok(n)
}

/// `rendered` with the i-th `placeholder` replaced by `blocks[i]`; fails (400) when the text holds
/// another number of placeholders, which only message text spelling the reserved token can cause.
pub fn expand(rendered: &str, placeholder: &str, blocks: &[String]) -> Result<String, ModelError> {
    let pieces: Vec<&str> = rendered.split(placeholder).collect();
    if pieces.len() != blocks.len() + 1 {
        return Err(ModelError::Request(ClassifiedError::invalid(
            "messages",
            format!(
                "the rendered prompt has {} image placeholders for {} images; message text must not contain the reserved token {placeholder}",
                pieces.len() - 1,
                blocks.len()
            ),
        )));
    }
    let mut out =
        String::with_capacity(rendered.len() + blocks.iter().map(String::len).sum::<usize>());
    out.push_str(pieces[0]);
    for (block, piece) in blocks.iter().zip(&pieces[1..]) {
        out.push_str(block);
        out.push_str(piece);
    }
    Ok(out)
}

/// Token ids of `text` without added special tokens (the templates write their own).
pub fn tokenize(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, ModelError> {
    tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| ModelError::Tokenizer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_checks_the_placeholder_count() {
        let blocks = vec!["AA".to_string(), "B".to_string()];
        assert_eq!(expand("x<i>y<i>z", "<i>", &blocks).unwrap(), "xAAyBz");
        let err = expand("x<i>y", "<i>", &blocks).unwrap_err();
        assert!(
            err.to_string()
                .contains("1 image placeholders for 2 images"),
            "{err}"
        );
        assert_eq!(expand("plain", "<i>", &[]).unwrap(), "plain");
    }

    #[test]
    fn a_missing_template_names_every_file_tried() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
        let err = load_template(dir.path()).unwrap_err().to_string();
        for file in [
            "processor_config.json",
            "chat_template.json",
            "chat_template.jinja",
            "additional_chat_templates/default.jinja",
            "tokenizer_config.json",
        ] {
            assert!(err.contains(file), "{file} missing from: {err}");
        }
    }
}
