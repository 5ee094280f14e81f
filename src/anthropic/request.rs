//! `POST /v1/messages` (and `/v1/messages/count_tokens`) bodies: Anthropic's wire shapes as typed
//! structs, parsed with `serde_path_to_error` so a 400 names the exact field, then turned into the one
//! internal request every API runs ([`ValidChatRequest`]).
//!
//! Unknown fields are ignored (agents send new ones every release: Claude Code's `output_config`,
//! `context_management`, `container`…); fields that are known but cannot be honoured are a 400 naming
//! them (server tools, documents, `mcp_servers`).

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ClassifiedError;
use crate::openai::request::{check_grammar, checked_tool, count_media, image_source};
use crate::openai::{RequestLimits, ValidChatRequest};
use crate::pipeline::grammar::Grammar;
use crate::protocol::{
    ChatMessage, ContentPart, Role, SamplingOverrides, ToolCall, ToolChoice, ToolSpec,
};
use crate::tagged_enum;
use crate::wire::{in_range, invalid, unsupported, TextOrBlocks};

/// Most stop sequences one request may give.
pub const MAX_STOP_SEQUENCES: usize = 16;

/// The body of `POST /v1/messages`.
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    pub model: String,
    /// Required by Anthropic's API; `count_tokens` bodies go without it.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    pub messages: Vec<InputMessage>,
    #[serde(default)]
    pub system: Option<TextOrBlocks<SystemBlock>>,
    #[serde(default)]
    pub stop_sequences: Vec<String>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Extension (the chat API's `seed`): reproducible sampling.
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub tools: Vec<Tool>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoiceWire>,
    #[serde(default)]
    pub thinking: Option<Thinking>,
    /// `{"user_id": …}`: accepted and ignored.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// Remote MCP servers: not supported (a 400 when non-empty).
    #[serde(default)]
    pub mcp_servers: Option<Vec<Value>>,
    /// `effort` (ignored: no effort levels) and `format` (structured outputs).
    #[serde(default)]
    pub output_config: Option<OutputConfig>,
}

#[derive(Debug, Deserialize)]
pub struct OutputConfig {
    #[serde(default)]
    pub effort: Option<String>,
    #[serde(default)]
    pub format: Option<OutputFormat>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub schema: Value,
}

/// Extension (as the chat API's `response_format`): a Lark grammar the answer follows.
#[derive(Debug, Deserialize)]
pub struct GrammarFormat {
    pub grammar: String,
}

tagged_enum! {
    /// `output_config.format`: the answer follows a JSON schema (or, as an extension, a grammar).
    OutputFormat {
        "json_schema" => JsonSchema(JsonSchemaFormat),
        "grammar" => Grammar(GrammarFormat),
    }
}

#[derive(Debug, Deserialize)]
pub struct SystemBlock {
    #[serde(rename = "type")]
    pub kind: TextType,
    pub text: String,
}

/// The one block type `system` takes.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextType {
    Text,
}

#[derive(Debug, Deserialize)]
pub struct InputMessage {
    pub role: InputRole,
    pub content: TextOrBlocks<ContentBlock>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputRole {
    User,
    Assistant,
}

#[derive(Debug, Deserialize)]
pub struct TextBlock {
    pub text: String,
}

#[derive(Debug, Deserialize)]
pub struct ImageBlock {
    pub source: ImageSource,
}

#[derive(Debug, Deserialize)]
pub struct ToolUseBlock {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub input: Value,
}

#[derive(Debug, Deserialize)]
pub struct ToolResultBlock {
    pub tool_use_id: String,
    #[serde(default)]
    pub content: Option<TextOrBlocks<ResultBlock>>,
    #[serde(default)]
    pub is_error: bool,
}

/// Reasoning sent back by the client: accepted, not shown to the model again (the chat templates
/// drop past reasoning).
#[derive(Debug, Deserialize)]
pub struct ThinkingBlock {}

/// A block type that is known but not supported here.
#[derive(Debug, Deserialize)]
pub struct Unsupported {}

tagged_enum! {
    /// A content block of a message. `cache_control` and `citations` on any block are ignored.
    ContentBlock {
        "text" => Text(TextBlock),
        "image" => Image(ImageBlock),
        "tool_use" => ToolUse(ToolUseBlock),
        "tool_result" => ToolResult(ToolResultBlock),
        "thinking" => Thinking(ThinkingBlock),
        "redacted_thinking" => RedactedThinking(ThinkingBlock),
        "document" => Document(Unsupported),
        "search_result" => SearchResult(Unsupported),
        "server_tool_use" => ServerToolUse(Unsupported),
        "web_search_tool_result" => WebSearchToolResult(Unsupported),
        "container_upload" => ContainerUpload(Unsupported),
    }
}

#[derive(Debug, Deserialize)]
pub struct Base64Source {
    pub media_type: String,
    pub data: String,
}

#[derive(Debug, Deserialize)]
pub struct UrlSource {
    pub url: String,
}

tagged_enum! {
    ImageSource {
        "base64" => Base64(Base64Source),
        "url" => Url(UrlSource),
        "file" => File(Unsupported),
    }
}

tagged_enum! {
    /// A block of a `tool_result`'s content.
    ResultBlock {
        "text" => Text(TextBlock),
        "image" => Image(ImageBlock),
        "document" => Document(Unsupported),
        "search_result" => SearchResult(Unsupported),
    }
}

/// A tool: a client function (`type` absent or `custom`) or one of Anthropic's server or
/// client-executed built-in tools (refused: they need Anthropic's own implementations).
#[derive(Debug, Deserialize)]
pub struct Tool {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub input_schema: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChoiceOptions {
    #[serde(default)]
    pub disable_parallel_tool_use: bool,
}

#[derive(Debug, Deserialize)]
pub struct NamedChoice {
    pub name: String,
    #[serde(default)]
    pub disable_parallel_tool_use: bool,
}

tagged_enum! {
    ToolChoiceWire {
        "auto" => Auto(ChoiceOptions),
        "any" => Any(ChoiceOptions),
        "tool" => Tool(NamedChoice),
        "none" => None(Unsupported),
    }
}

#[derive(Debug, Deserialize)]
pub struct ThinkingBudget {
    /// Not enforced: the reasoning ends when the model ends it (or at `max_tokens`).
    #[serde(default)]
    pub budget_tokens: Option<u64>,
}

tagged_enum! {
    /// Extended thinking: the thinking switch of models that have one. `adaptive` (the model
    /// decides; Claude Code's default) leaves the template's default.
    Thinking {
        "enabled" => Enabled(ThinkingBudget),
        "disabled" => Disabled(Unsupported),
        "adaptive" => Adaptive(Unsupported),
    }
}

/// Parses a body.
pub fn parse(body: &[u8]) -> Result<MessagesRequest, ClassifiedError> {
    crate::wire::parse(body)
}

fn image_part(p: &str, s: &ImageSource, remote: bool) -> Result<ContentPart, ClassifiedError> {
    let source = match s {
        ImageSource::Base64(Base64Source { media_type, data }) => {
            if !media_type.starts_with("image/") {
                return Err(invalid(
                    &format!("{p}.media_type"),
                    format!("{p}.media_type must be an image type, got {media_type:?}"),
                ));
            }
            image_source(
                &format!("{p}.data"),
                &format!("data:{media_type};base64,{data}"),
                remote,
            )?
        }
        ImageSource::Url(UrlSource { url }) => image_source(&format!("{p}.url"), url, remote)?,
        ImageSource::File(_) => return Err(unsupported(&format!("{p}.type"), "the Files API")),
    };
    Ok(ContentPart::Image { source })
}

fn push_part(m: &mut Vec<ChatMessage>, role: Role, part: ContentPart) {
    match m.last_mut() {
        Some(last) if last.role == role && last.tool_call_id.is_none() => last.content.push(part),
        _ => m.push(ChatMessage {
            role,
            content: vec![part],
            tool_calls: Vec::new(),
            tool_call_id: None,
        }),
    }
}

/// A `tool_result` as a `tool` message (its text blocks joined; images are not accepted there).
fn tool_result(
    p: &str,
    id: &str,
    content: Option<&TextOrBlocks<ResultBlock>>,
    is_error: bool,
) -> Result<ChatMessage, ClassifiedError> {
    let mut text = match content {
        None => String::new(),
        Some(TextOrBlocks::Text(t)) => t.clone(),
        Some(TextOrBlocks::Blocks(blocks)) => {
            let mut parts = Vec::new();
            for (k, b) in blocks.iter().enumerate() {
                match b {
                    ResultBlock::Text(TextBlock { text }) => parts.push(text.as_str()),
                    _ => {
                        return Err(unsupported(
                            &format!("{p}.content[{k}].type"),
                            "a tool_result block other than text",
                        ))
                    }
                }
            }
            parts.join("\n")
        }
    };
    if is_error {
        text = format!("Error: {text}");
    }
    Ok(ChatMessage {
        role: Role::Tool,
        content: vec![ContentPart::Text { text }],
        tool_calls: Vec::new(),
        tool_call_id: Some(id.to_string()),
    })
}

fn messages(
    req: &MessagesRequest,
    remote: bool,
    limits: &RequestLimits,
) -> Result<Vec<ChatMessage>, ClassifiedError> {
    if req.messages.is_empty() {
        return Err(invalid("messages", "messages must not be empty"));
    }
    if req.messages.len() > limits.max_messages {
        return Err(invalid(
            "messages",
            format!("at most {} messages are accepted", limits.max_messages),
        ));
    }
    let mut out = Vec::new();
    match &req.system {
        None => {}
        Some(TextOrBlocks::Text(t)) if t.is_empty() => {}
        Some(TextOrBlocks::Text(t)) => out.push(ChatMessage::text(Role::System, t.clone())),
        Some(TextOrBlocks::Blocks(b)) => {
            let text: Vec<&str> = b.iter().map(|b| b.text.as_str()).collect();
            if !text.is_empty() {
                out.push(ChatMessage::text(Role::System, text.join("\n")));
            }
        }
    }
    for (i, m) in req.messages.iter().enumerate() {
        let p = format!("messages[{i}]");
        let role = match m.role {
            InputRole::User => Role::User,
            InputRole::Assistant => Role::Assistant,
        };
        let blocks = match &m.content {
            TextOrBlocks::Text(t) => {
                push_part(&mut out, role, ContentPart::Text { text: t.clone() });
                continue;
            }
            TextOrBlocks::Blocks(b) => b,
        };
        let start = out.len();
        let mut calls = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let bp = format!("{p}.content[{j}]");
            match (b, m.role) {
                (ContentBlock::Text(TextBlock { text }), _) => {
                    push_part(&mut out, role, ContentPart::Text { text: text.clone() })
                }
                (ContentBlock::Image(ImageBlock { source }), InputRole::User) => {
                    let part = image_part(&format!("{bp}.source"), source, remote)?;
                    push_part(&mut out, role, part)
                }
                (
                    ContentBlock::ToolResult(ToolResultBlock {
                        tool_use_id,
                        content,
                        is_error,
                    }),
                    InputRole::User,
                ) => out.push(tool_result(&bp, tool_use_id, content.as_ref(), *is_error)?),
                (ContentBlock::ToolUse(ToolUseBlock { id, name, input }), InputRole::Assistant) => {
                    let arguments = match input {
                        Value::Object(_) => input.to_string(),
                        Value::Null => "{}".to_string(),
                        v => {
                            return Err(invalid(
                                &format!("{bp}.input"),
                                format!("{bp}.input must be an object, got {v}"),
                            ))
                        }
                    };
                    calls.push(ToolCall {
                        id: id.clone(),
                        name: name.clone(),
                        arguments,
                    });
                }
                (ContentBlock::Thinking(_) | ContentBlock::RedactedThinking(_), _) => {}
                (ContentBlock::Image(_), InputRole::Assistant) => {
                    return Err(invalid(
                        &format!("{bp}.type"),
                        format!("{bp}: an assistant message cannot hold an image"),
                    ))
                }
                (ContentBlock::ToolResult(_), InputRole::Assistant) => {
                    return Err(invalid(
                        &format!("{bp}.type"),
                        format!("{bp}: tool_result blocks belong in user messages"),
                    ))
                }
                (ContentBlock::ToolUse(_), InputRole::User) => {
                    return Err(invalid(
                        &format!("{bp}.type"),
                        format!("{bp}: tool_use blocks belong in assistant messages"),
                    ))
                }
                (ContentBlock::Document(_), _) => {
                    return Err(unsupported(&format!("{bp}.type"), "a document block"))
                }
                (ContentBlock::SearchResult(_), _) => {
                    return Err(unsupported(&format!("{bp}.type"), "a search_result block"))
                }
                (
                    ContentBlock::ServerToolUse(_)
                    | ContentBlock::WebSearchToolResult(_)
                    | ContentBlock::ContainerUpload(_),
                    _,
                ) => return Err(unsupported(&format!("{bp}.type"), "a server tool block")),
            }
        }
        if !calls.is_empty() {
            // The calls belong to this turn's assistant message (made when it had no text).
            match out[start..].iter_mut().rfind(|m| m.role == Role::Assistant) {
                Some(m) => m.tool_calls.extend(calls),
                None => out.push(ChatMessage {
                    role: Role::Assistant,
                    content: Vec::new(),
                    tool_calls: calls,
                    tool_call_id: None,
                }),
            }
        }
    }
    count_media(&out, limits)?;
    Ok(out)
}

fn tools(req: &MessagesRequest) -> Result<Vec<ToolSpec>, ClassifiedError> {
    let mut out = Vec::with_capacity(req.tools.len());
    for (i, t) in req.tools.iter().enumerate() {
        let p = format!("tools[{i}]");
        match t.kind.as_deref() {
            None | Some("custom") => {}
            Some(kind) => {
                return Err(invalid(
                    &format!("{p}.type"),
                    format!("{p}.type {kind:?}: Anthropic's built-in tools are not supported by this server; declare a custom tool with an input_schema"),
                ))
            }
        }
        out.push(checked_tool(
            &p,
            &t.name,
            t.description.clone(),
            t.input_schema.as_ref(),
            "input_schema",
            true,
        )?);
    }
    Ok(out)
}

impl MessagesRequest {
    /// The internal request. `count_only`: a `count_tokens` body (no `max_tokens` needed).
    pub fn into_request(
        self,
        limits: &RequestLimits,
        count_only: bool,
    ) -> Result<ValidChatRequest, ClassifiedError> {
        let max_tokens = match (self.max_tokens, count_only) {
            (None, true) => None,
            (None, false) => return Err(invalid("max_tokens", "max_tokens: field required")),
            (Some(0), _) => {
                return Err(invalid(
                    "max_tokens",
                    "max_tokens must be at least 1, got 0",
                ))
            }
            // Larger than any context: lowered to the room the prompt leaves (the job clamps).
            (Some(m), _) => Some(m.min(limits.max_tokens as u64) as u32),
        };
        if self.mcp_servers.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported("mcp_servers", "the MCP connector"));
        }
        if self.stop_sequences.len() > MAX_STOP_SEQUENCES {
            return Err(invalid(
                "stop_sequences",
                format!(
                    "at most {MAX_STOP_SEQUENCES} stop_sequences are accepted, got {}",
                    self.stop_sequences.len()
                ),
            ));
        }
        let messages = messages(&self, limits.allow_remote_media, limits)?;
        let tools = tools(&self)?;
        let (tool_choice, parallel) = match &self.tool_choice {
            None => (None, None),
            Some(ToolChoiceWire::Auto(ChoiceOptions {
                disable_parallel_tool_use,
            })) => (Some(ToolChoice::Auto), Some(!disable_parallel_tool_use)),
            Some(ToolChoiceWire::Any(ChoiceOptions {
                disable_parallel_tool_use,
            })) => (Some(ToolChoice::Required), Some(!disable_parallel_tool_use)),
            Some(ToolChoiceWire::Tool(NamedChoice {
                name,
                disable_parallel_tool_use,
            })) => {
                if !tools.iter().any(|t| &t.name == name) {
                    return Err(invalid(
                        "tool_choice.name",
                        format!("tool_choice names the tool {name:?}, which is not in tools"),
                    ));
                }
                (
                    Some(ToolChoice::Function { name: name.clone() }),
                    Some(!disable_parallel_tool_use),
                )
            }
            Some(ToolChoiceWire::None(_)) => (Some(ToolChoice::None), None),
        };
        if matches!(tool_choice, Some(ToolChoice::Required)) && tools.is_empty() {
            return Err(invalid("tool_choice", "tool_choice \"any\" needs tools"));
        }
        let mut kwargs = Map::new();
        match &self.thinking {
            Some(Thinking::Enabled(_)) => {
                kwargs.insert("enable_thinking".into(), Value::Bool(true));
            }
            Some(Thinking::Disabled(_)) => {
                kwargs.insert("enable_thinking".into(), Value::Bool(false));
            }
            Some(Thinking::Adaptive(_)) | None => {}
        }
        let response_format = match self.output_config.as_ref().and_then(|o| o.format.as_ref()) {
            None => None,
            Some(OutputFormat::JsonSchema(f)) => {
                let param = "output_config.format.schema";
                if !f.schema.is_object() {
                    return Err(invalid(
                        param,
                        format!("{param} must be a JSON Schema object"),
                    ));
                }
                check_grammar(param, Grammar::JsonSchema(f.schema.clone()))?;
                Some(crate::protocol::ResponseFormat::JsonSchema {
                    schema: f.schema.clone(),
                    name: None,
                })
            }
            Some(OutputFormat::Grammar(g)) => {
                let param = "output_config.format.grammar";
                check_grammar(param, Grammar::Lark(g.grammar.clone()))?;
                Some(crate::protocol::ResponseFormat::Grammar {
                    grammar: g.grammar.clone(),
                })
            }
        };
        let sampling = SamplingOverrides {
            temperature: in_range("temperature", self.temperature, 1.0)?,
            top_p: in_range("top_p", self.top_p, 1.0)?,
            top_k: self.top_k,
            seed: self.seed,
            ..SamplingOverrides::default()
        };
        Ok(ValidChatRequest {
            model: self.model,
            messages,
            sampling,
            max_tokens,
            stop: self
                .stop_sequences
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
            stream: self.stream,
            include_usage: true,
            return_token_ids: false,
            ignore_eos: false,
            n: 1,
            cache_salt: None,
            response_format,
            tools,
            tool_choice,
            parallel_tool_calls: parallel,
            logprobs: None,
            logit_bias: Default::default(),
            chat_template_kwargs: (!kwargs.is_empty()).then_some(kwargs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(v: Value) -> Result<ValidChatRequest, ClassifiedError> {
        parse(v.to_string().as_bytes())?.into_request(&RequestLimits::default(), false)
    }

    fn param(v: Value) -> String {
        req(v).unwrap_err().param.unwrap_or_default()
    }

    #[test]
    fn claude_codes_request_shape_is_accepted() {
        let r = req(json!({
            "model": "m", "max_tokens": 32000, "stream": true,
            "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "list files"}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "x"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a.txt"}]},
                    {"type": "text", "text": "and now?"}]}],
            "tools": [{"name": "Bash", "description": "run", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}],
            "tool_choice": {"type": "auto"},
            "thinking": {"type": "adaptive", "display": "omitted"},
            "output_config": {"effort": "high"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
            "metadata": {"user_id": "u"}
        }))
        .unwrap();
        assert_eq!(r.max_tokens, Some(32000));
        let roles: Vec<Role> = r.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::User
            ]
        );
        assert_eq!(
            r.messages[2].tool_calls[0].arguments,
            "{\"command\":\"ls\"}"
        );
        assert_eq!(r.messages[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(r.tools[0].name, "Bash");
        assert_eq!(r.tool_choice, Some(ToolChoice::Auto));
        assert_eq!(r.chat_template_kwargs, None);
    }

    #[test]
    fn errors_name_the_field() {
        let base = |extra: Value| {
            let mut b = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            b
        };
        assert_eq!(param(json!({"model": "m", "messages": []})), "max_tokens");
        assert_eq!(param(json!({"max_tokens": 1, "messages": []})), "model");
        assert_eq!(param(base(json!({"messages": []}))), "messages");
        assert_eq!(
            param(base(
                json!({"messages": [{"role": "robot", "content": "x"}]})
            )),
            "messages[0].role"
        );
        assert_eq!(
            param(base(
                json!({"messages": [{"role": "user", "content": [{"type": "video"}]}]})
            )),
            "messages[0].content[0].type"
        );
        assert_eq!(
            param(base(json!({"messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png"}}]}]}))),
            "messages[0].content[0].source.data"
        );
        assert_eq!(
            param(base(
                json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]})
            )),
            "tools[0].type"
        );
        assert_eq!(
            param(base(
                json!({"tools": [{"name": "f", "input_schema": {"type": "nope"}}]})
            )),
            "tools[0].input_schema"
        );
        assert_eq!(
            param(base(
                json!({"tools": [{"name": "f", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "tool", "name": "g"}})
            )),
            "tool_choice.name"
        );
        assert_eq!(param(base(json!({"temperature": 1.5}))), "temperature");
        assert_eq!(param(base(json!({"max_tokens": "many"}))), "max_tokens");
        assert_eq!(
            param(base(json!({"system": [{"type": "image", "text": "x"}]}))),
            "system[0].type"
        );
    }

    #[test]
    fn tool_choice_and_thinking_map_to_the_internal_request() {
        let r = req(json!({"model": "m", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": true},
            "thinking": {"type": "enabled", "budget_tokens": 2048}}))
        .unwrap();
        assert_eq!(
            r.tool_choice,
            Some(ToolChoice::Function { name: "f".into() })
        );
        assert_eq!(r.parallel_tool_calls, Some(false));
        assert_eq!(
            r.chat_template_kwargs.unwrap()["enable_thinking"],
            Value::Bool(true)
        );
        let r = req(json!({"model": "m", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"}}))
        .unwrap();
        assert_eq!(r.tool_choice, Some(ToolChoice::Required));
        assert_eq!(r.parallel_tool_calls, Some(true));
        let r = req(json!({"model": "m", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "output_config": {"effort": "max", "format": {"type": "json_schema",
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}}))
        .unwrap();
        assert!(matches!(
            r.response_format,
            Some(crate::protocol::ResponseFormat::JsonSchema { .. })
        ));
        assert_eq!(
            param(
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                "output_config": {"format": {"type": "json_schema", "schema": {"type": "nope"}}}})
            ),
            "output_config.format.schema"
        );
    }
}
