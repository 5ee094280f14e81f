//! Chat templates: finding a model's Hugging Face chat template in a snapshot directory and
//! rendering it with minijinja configured the way transformers' `apply_chat_template` configures
//! Jinja2 (trim/lstrip blocks, loop controls, lenient undefined, no auto-escaping, HF's `tojson`,
//! `raise_exception`, `strftime_now`, Python string methods), so that the prompt text we tokenize
//! is the one the model was trained on.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Serde, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior};

mod clock;
mod pyjson;
mod snapshot;

pub use snapshot::TEMPLATE_SOURCES;

/// Name under which the single compiled template lives in the environment.
const TEMPLATE_NAME: &str = "chat_template";

/// The variables the renderer itself sets (transformers' `apply_chat_template` arguments and the
/// four special tokens every template family uses): extra template variables
/// (`chat_template_kwargs`) may not use these names. The other special tokens
/// ([`SpecialTokens::other`]) give way to a kwarg of the same name, as in transformers.
pub const RESERVED_VARIABLES: &[&str] = &[
    "messages",
    "tools",
    "documents",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
];

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template source does not parse (or its files cannot be read/parsed).
    #[error("chat template does not compile: {0}")]
    Compile(String),
    /// Rendering failed; for `raise_exception(msg)` this is exactly `msg`.
    #[error("{0}")]
    Render(String),
}

/// The special-token strings transformers exposes to chat templates: its tokenizer's
/// `special_tokens_map` (where they come from: [`ChatTemplate::load_from_dir`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// The rest of the map by variable name: `sep_token`, `cls_token`, `mask_token` and the
    /// model-specific ones (`image_token`, `boi_token`, ...).
    pub other: BTreeMap<String, String>,
}

/// A compiled chat template plus the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

/// Carried as the source of the minijinja error raised by `raise_exception`, so that `render`
/// can hand back the template author's message verbatim instead of minijinja's decorated text.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

fn raise_exception(message: Value) -> Result<Value, Error> {
    // Jinja2 calls `str()` on whatever it is given; `to_string` is minijinja's equivalent.
    let message = match message.as_str() {
        Some(s) => s.to_owned(),
        None => message.to_string(),
    };
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedByTemplate(message)))
}

fn strftime_now(format: String) -> String {
    clock::strftime_utc_now(&format)
}

impl ChatTemplate {
    /// Compiles `source` once; rendering then only evaluates it.
    pub fn new(source: &str, tokens: SpecialTokens) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        // Prompts are plain text: HTML-escaping `<start_of_turn>` would corrupt them.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        // minijinja's own `tojson` escapes `<>&'` for HTML and formats differently from Python.
        env.add_filter("tojson", pyjson::tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        Ok(ChatTemplate { env, tokens })
    }

    /// The template of a snapshot dir and the special tokens it is rendered with, found as
    /// transformers 5 finds them (the rules, and the transformers functions they come from, are in
    /// `template/snapshot.rs`): `processor_config.json`'s `chat_template`, else
    /// `chat_template.json`, else `chat_template.jinja` (or `additional_chat_templates/default.jinja`),
    /// else `tokenizer_config.json`'s `chat_template`; of named templates only "default", never a
    /// guess. Tokens: `tokenizer_config.json`, overridden by `special_tokens_map.json` when the
    /// config has no `added_tokens_decoder`. `Ok(None)`: none of [`TEMPLATE_SOURCES`] has a template;
    /// a broken or ambiguous file is an error.
    pub fn load_from_dir(dir: &Path) -> Result<Option<(String, SpecialTokens)>, TemplateError> {
        snapshot::load(dir)
    }

    /// Renders `messages` (a JSON array of `{"role", "content"}`; content a string or a list of
    /// `{"type": "text"|"image"|"audio", ...}` parts) into the prompt text. Object keys reach
    /// the template in the order the request gave them (serde_json's `preserve_order`, which
    /// llguidance turns on), as a Python dict keeps them; only `tojson` of request objects can tell.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Whether the template reads `tools` (it has its own tool syntax).
    pub fn declares_tools(&self) -> bool {
        self.env
            .get_template(TEMPLATE_NAME)
            .map(|t| t.undeclared_variables(false).contains("tools"))
            .unwrap_or(false)
    }

    /// As [`Self::render`], with transformers' `tools` argument (OpenAI's `tools` list).
    pub fn render_with_tools(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_with(messages, tools, None, add_generation_prompt)
    }

    /// As [`Self::render_with_tools`], with extra top-level variables: transformers'
    /// `apply_chat_template(..., **kwargs)`, which is what vLLM's `chat_template_kwargs` feeds (e.g.
    /// `enable_thinking`). A pair named like one of [`RESERVED_VARIABLES`] is skipped: the
    /// renderer's own value wins (callers refuse such names before they get here).
    pub fn render_with(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        kwargs: Option<&serde_json::Map<String, serde_json::Value>>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        // transformers passes `tools=None, documents=None` explicitly, so templates see them as
        // defined-but-none (`tools is not none` is false), not as undefined.
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from(Serde(messages))),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            (
                "tools",
                tools.map_or(Value::from(()), |t| Value::from(Serde(t))),
            ),
            ("documents", Value::from(())),
        ];
        let tokens = [
            ("bos_token", &self.tokens.bos_token),
            ("eos_token", &self.tokens.eos_token),
            ("pad_token", &self.tokens.pad_token),
            ("unk_token", &self.tokens.unk_token),
        ];
        for (name, token) in tokens {
            if let Some(token) = token {
                ctx.push((name, Value::from(token.as_str())));
            }
        }
        // transformers renders with `{**special_tokens_map, **kwargs}`: a kwarg wins.
        let kwarg_named = |name: &str| kwargs.is_some_and(|k| k.contains_key(name));
        for (name, token) in &self.tokens.other {
            if !kwarg_named(name) {
                ctx.push((name.as_str(), Value::from(token.as_str())));
            }
        }
        for (name, value) in kwargs.into_iter().flatten() {
            if !RESERVED_VARIABLES.contains(&name.as_str()) {
                ctx.push((name.as_str(), Value::from(Serde(value))));
            }
        }
        template
            .render(Value::from_pairs(ctx))
            .map_err(render_error)
    }
}

fn render_error(err: Error) -> TemplateError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = cause {
        if let Some(raised) = e.downcast_ref::<RaisedByTemplate>() {
            return TemplateError::Render(raised.0.clone());
        }
        cause = e.source();
    }
    TemplateError::Render(err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The Gemma-3n template, byte for byte as `make_tokenizer_processor.py` writes it.
    const GEMMA3N: &str = include_str!("testdata/gemma3n_chat_template.jinja");

    fn gemma() -> ChatTemplate {
        let tokens = SpecialTokens {
            bos_token: Some("<bos>".into()),
            eos_token: Some("<eos>".into()),
            ..SpecialTokens::default()
        };
        ChatTemplate::new(GEMMA3N, tokens).expect("template compiles")
    }

    #[test]
    fn single_user_message_is_trimmed() {
        let out = gemma()
            .render(&json!([{"role": "user", "content": "  Hello \n"}]), true)
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn system_prefixes_first_user_turn_and_assistant_is_model() {
        let messages = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ]);
        let out = gemma().render(&messages, false).unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n\
             <start_of_turn>model\nHello!<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n"
        );
    }

    #[test]
    fn list_content_keeps_media_order() {
        let messages = json!([{"role": "user", "content": [
            {"type": "image"},
            {"type": "text", "text": " Describe this. "},
            {"type": "audio"},
        ]}]);
        let out = gemma().render(&messages, true).unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\n<image_soft_token>Describe this.<audio_soft_token>\
             <end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn raise_exception_message_is_verbatim() {
        let messages = json!([
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
        ]);
        match gemma().render(&messages, true) {
            Err(TemplateError::Render(msg)) => assert_eq!(
                msg,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            ),
            other => panic!("expected a render error, got {other:?}"),
        }
    }

    #[test]
    fn python_methods_and_hf_tojson() {
        let t = ChatTemplate::new(
            "{{ messages[0]['content'].strip() }}|{{ messages[0]['content'] | tojson }}\n",
            SpecialTokens::default(),
        )
        .unwrap();
        let out = t
            .render(
                &json!([{"role": "user", "content": " héllo <b> & 'x' ✓ "}]),
                false,
            )
            .unwrap();
        // Not ASCII-escaped, not HTML-escaped, and the template's trailing newline is dropped.
        assert_eq!(out, "héllo <b> & 'x' ✓|\" héllo <b> & 'x' ✓ \"");
        // Dict literals keep their order, as Python dicts do (minijinja's `preserve_order`).
        let t = ChatTemplate::new(
            "{{ {'b': 1, 'a': [2.0, none]} | tojson(separators=(',', ':')) }}",
            SpecialTokens::default(),
        )
        .unwrap();
        assert_eq!(
            t.render(&json!([]), false).unwrap(),
            r#"{"b":1,"a":[2.0,null]}"#
        );
    }

    #[test]
    fn context_matches_transformers() {
        let src = "{{ tools is none }} {{ documents is defined }} {{ pad_token is defined }} \
                   {{ eos_token }} {{ messages | length }} {{ add_generation_prompt }}";
        let tokens = SpecialTokens {
            eos_token: Some("<eos>".into()),
            ..SpecialTokens::default()
        };
        let out = ChatTemplate::new(src, tokens)
            .unwrap()
            .render(&json!([]), true)
            .unwrap();
        // Booleans print as Python spells them.
        assert_eq!(out, "True True False <eos> 0 True");
    }

    #[test]
    fn extra_variables_reach_the_template() {
        let src = "{% if enable_thinking is defined and enable_thinking %}think {% endif %}\
                   {% if style is defined %}{{ style.tone }}{% else %}plain{% endif %} {{ messages | length }} {{ bos_token }}";
        let tokens = SpecialTokens {
            bos_token: Some("<bos>".into()),
            ..SpecialTokens::default()
        };
        let t = ChatTemplate::new(src, tokens).unwrap();
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let kwargs = |v: serde_json::Value| v.as_object().unwrap().clone();
        assert_eq!(t.render(&msgs, true).unwrap(), "plain 1 <bos>");
        let on = kwargs(json!({"enable_thinking": true, "style": {"tone": "dry"}}));
        assert_eq!(
            t.render_with(&msgs, None, Some(&on), true).unwrap(),
            "think dry 1 <bos>"
        );
        let off = kwargs(json!({"enable_thinking": false}));
        assert_eq!(
            t.render_with(&msgs, None, Some(&off), true).unwrap(),
            "plain 1 <bos>"
        );
        // The renderer's own variables cannot be replaced.
        let reserved = kwargs(json!({"messages": [], "bos_token": "<x>"}));
        assert_eq!(
            t.render_with(&msgs, None, Some(&reserved), true).unwrap(),
            "plain 1 <bos>"
        );
    }

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn syntax_error_is_compile_error() {
        let err = ChatTemplate::new("{% for m in messages %}", SpecialTokens::default());
        assert!(matches!(err, Err(TemplateError::Compile(_))), "{err:?}");
    }

    #[test]
    fn other_render_failures_do_not_panic() {
        let t = ChatTemplate::new("{{ messages.x.y }}", SpecialTokens::default()).unwrap();
        assert!(matches!(
            t.render(&json!([]), true),
            Err(TemplateError::Render(_))
        ));
        let t = ChatTemplate::new("{{ raise_exception(42) }}", SpecialTokens::default()).unwrap();
        assert!(matches!(t.render(&json!(null), true), Err(TemplateError::Render(m)) if m == "42"));
    }

    #[test]
    fn other_special_tokens_reach_the_template_and_give_way_to_kwargs() {
        let tokens = SpecialTokens {
            bos_token: Some("<bos>".into()),
            other: [("image_token", "<img>"), ("mask_token", "<mask>")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ..SpecialTokens::default()
        };
        let t = ChatTemplate::new(
            "{{ bos_token }}|{{ image_token }}|{{ mask_token }}|{{ sep_token is defined }}",
            tokens,
        )
        .unwrap();
        assert_eq!(
            t.render(&json!([]), true).unwrap(),
            "<bos>|<img>|<mask>|False"
        );
        // `{**special_tokens_map, **kwargs}`: a kwarg replaces a model-specific token...
        let kwargs = json!({"image_token": "<IMG>"}).as_object().unwrap().clone();
        assert_eq!(
            t.render_with(&json!([]), None, Some(&kwargs), true)
                .unwrap(),
            "<bos>|<IMG>|<mask>|False"
        );
        // ...but not one of the reserved four (the front end refuses those names).
        let kwargs = json!({"bos_token": "<x>"}).as_object().unwrap().clone();
        assert_eq!(
            t.render_with(&json!([]), None, Some(&kwargs), true)
                .unwrap(),
            "<bos>|<img>|<mask>|False"
        );
    }
}
