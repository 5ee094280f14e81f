//! `POST /v1/responses` bodies: OpenAI's Responses API wire shapes as typed structs (read through
//! [`crate::wire`], so a 400 names the exact field), turned into the one internal request every API
//! runs ([`ValidChatRequest`]).
//!
//! Unknown fields are ignored (Codex sends `client_metadata`, `prompt_cache_key`…); fields that are
//! known but cannot be honoured are a 400 naming them (built-in tools, `background`, `conversation`,
//! `truncation: "auto"`, file inputs).

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ClassifiedError;
use crate::openai::request::{check_grammar, checked_tool, count_media, image_source};
use crate::openai::{RequestLimits, ValidChatRequest};
use crate::pipeline::grammar::Grammar;
use crate::protocol::{
    ChatMessage, ContentPart, MediaSource, ResponseFormat, Role, SamplingOverrides, ToolCall,
    ToolChoice, ToolSpec, MAX_TOP_LOGPROBS,
};
use crate::tagged_enum;
use crate::wire::{at, in_range, invalid, nested, unsupported, TextOrBlocks};

/// The body of `POST /v1/responses`.
#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    pub model: String,
    #[serde(default)]
    pub input: Option<TextOrBlocks<Item>>,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Extension (as vLLM).
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Extension: the sampling seed (the chat API's `seed`).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Extension: stop strings (up to 4), as the chat API's `stop`.
    #[serde(default)]
    pub stop: Option<TextOrBlocks<String>>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub tools: Vec<Tool>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoiceWire>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub text: Option<TextConfig>,
    #[serde(default)]
    pub reasoning: Option<ReasoningConfig>,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub truncation: Option<String>,
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub background: bool,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub conversation: Option<Value>,
    #[serde(default)]
    pub prompt: Option<Value>,
}

/// An input item. A message may leave out `type` (the "easy input message").
#[derive(Debug)]
pub enum Item {
    Message(MessageItem),
    FunctionCall(FunctionCallItem),
    FunctionCallOutput(FunctionCallOutputItem),
    /// Reasoning sent back (Codex sends every turn's): accepted, not shown to the model again.
    Reasoning(Value),
}

/// Item types OpenAI defines that this server cannot take (they need OpenAI's own tools or storage).
const UNSUPPORTED_ITEMS: &[&str] = &[
    "item_reference",
    "file_search_call",
    "web_search_call",
    "computer_call",
    "computer_call_output",
    "image_generation_call",
    "code_interpreter_call",
    "local_shell_call",
    "local_shell_call_output",
    "shell_call",
    "shell_call_output",
    "apply_patch_call",
    "apply_patch_call_output",
    "mcp_list_tools",
    "mcp_approval_request",
    "mcp_approval_response",
    "mcp_call",
    "custom_tool_call",
    "custom_tool_call_output",
    "compaction",
];

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = Map::<String, Value>::deserialize(d)?;
        let kind = match map.get("type") {
            None => "message".to_string(),
            Some(Value::String(t)) => t.clone(),
            Some(_) => return Err(at::<D::Error>("type", "must be a string")),
        };
        let v = Value::Object(map);
        match kind.as_str() {
            "message" => nested(v).map(Item::Message),
            "function_call" => nested(v).map(Item::FunctionCall),
            "function_call_output" => nested(v).map(Item::FunctionCallOutput),
            "reasoning" => Ok(Item::Reasoning(v)),
            k if UNSUPPORTED_ITEMS.contains(&k) => Err(at::<D::Error>(
                "type",
                &format!("input items of type `{k}` are not supported by this server"),
            )),
            k => Err(at::<D::Error>(
                "type",
                &format!("unknown input item type `{k}`, expected one of `message`, `function_call`, `function_call_output`, `reasoning`"),
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemRole {
    User,
    Assistant,
    System,
    Developer,
}

#[derive(Debug, Deserialize)]
pub struct MessageItem {
    pub role: ItemRole,
    pub content: TextOrBlocks<Part>,
}

#[derive(Debug, Deserialize)]
pub struct TextPart {
    pub text: String,
}

#[derive(Debug, Deserialize)]
pub struct ImagePart {
    #[serde(default)]
    pub image_url: Option<String>,
    #[serde(default)]
    pub file_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct AudioData {
    pub data: String,
    #[serde(default)]
    pub format: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct AudioPart {
    pub input_audio: AudioData,
}

#[derive(Debug, Deserialize)]
pub struct RefusalPart {
    pub refusal: String,
}

#[derive(Debug, Deserialize)]
pub struct Unsupported {}

tagged_enum! {
    /// A content part of an input message (assistant turns carry `output_text` parts).
    Part {
        "input_text" => InputText(TextPart),
        "output_text" => OutputText(TextPart),
        "text" => Text(TextPart),
        "refusal" => Refusal(RefusalPart),
        "input_image" => InputImage(ImagePart),
        "input_audio" => InputAudio(AudioPart),
        "input_file" => InputFile(Unsupported),
    }
}

#[derive(Debug, Deserialize)]
pub struct FunctionCallItem {
    pub call_id: String,
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Deserialize)]
pub struct FunctionCallOutputItem {
    pub call_id: String,
    pub output: TextOrBlocks<Part>,
}

/// A tool: `function`, or one of OpenAI's built-in tools (refused by name).
#[derive(Debug, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
}

/// `tool_choice`: a mode string or an object.
#[derive(Debug)]
pub enum ToolChoiceWire {
    Mode(String),
    Object(Map<String, Value>),
}

impl<'de> Deserialize<'de> for ToolChoiceWire {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::Mode(s)),
            Value::Object(o) => Ok(Self::Object(o)),
            _ => Err(serde::de::Error::custom(
                "expected \"none\", \"auto\", \"required\" or an object",
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct TextConfig {
    #[serde(default)]
    pub format: Option<Format>,
    /// `low` / `medium` / `high`: accepted and ignored (use `max_output_tokens`).
    #[serde(default)]
    pub verbosity: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct SchemaFormat {
    #[serde(default)]
    pub name: Option<String>,
    pub schema: Value,
    #[serde(default)]
    pub strict: Option<bool>,
    #[serde(default)]
    pub description: Option<String>,
}

/// Extension (as the chat API's `response_format`): a Lark grammar the answer follows.
#[derive(Debug, Deserialize)]
pub struct GrammarFormat {
    pub grammar: String,
}

tagged_enum! {
    /// `text.format`.
    Format {
        "text" => Text(Unsupported),
        "json_object" => JsonObject(Unsupported),
        "json_schema" => JsonSchema(SchemaFormat),
        "grammar" => Grammar(GrammarFormat),
    }
}

#[derive(Debug, Deserialize)]
pub struct ReasoningConfig {
    /// `none` / `minimal` → thinking off; `low` / `medium` / `high` / `xhigh` → on; absent → the
    /// template's default.
    #[serde(default)]
    pub effort: Option<String>,
    /// `auto` / `concise` / `detailed`: reasoning comes back whole as `reasoning_text`, never
    /// summarised.
    #[serde(default)]
    pub summary: Option<String>,
}

/// Built-in tool types (refused by name).
const BUILT_IN_TOOLS: &[&str] = &[
    "web_search",
    "web_search_preview",
    "web_search_2025_08_26",
    "web_search_preview_2025_03_11",
    "file_search",
    "computer",
    "computer_use_preview",
    "code_interpreter",
    "image_generation",
    "mcp",
    "local_shell",
    "shell",
    "apply_patch",
    "custom",
];

/// The text of parts (a function output, a system message).
fn parts_text(p: &str, parts: &TextOrBlocks<Part>) -> Result<String, ClassifiedError> {
    match parts {
        TextOrBlocks::Text(t) => Ok(t.clone()),
        TextOrBlocks::Blocks(b) => {
            let mut out = Vec::new();
            for (k, part) in b.iter().enumerate() {
                match part {
                    Part::InputText(t) | Part::OutputText(t) | Part::Text(t) => {
                        out.push(t.text.as_str())
                    }
                    Part::Refusal(r) => out.push(r.refusal.as_str()),
                    _ => {
                        return Err(invalid(
                            &format!("{p}[{k}].type"),
                            format!("{p}[{k}]: only text parts are accepted here"),
                        ))
                    }
                }
            }
            Ok(out.join("\n"))
        }
    }
}

fn message_parts(
    p: &str,
    role: Role,
    parts: &TextOrBlocks<Part>,
    remote: bool,
) -> Result<Vec<ContentPart>, ClassifiedError> {
    let blocks = match parts {
        TextOrBlocks::Text(t) => return Ok(vec![ContentPart::Text { text: t.clone() }]),
        TextOrBlocks::Blocks(b) => b,
    };
    let mut out = Vec::with_capacity(blocks.len());
    for (k, part) in blocks.iter().enumerate() {
        let pp = format!("{p}[{k}]");
        let media_ok = role == Role::User;
        match part {
            Part::InputText(t) | Part::OutputText(t) | Part::Text(t) => {
                out.push(ContentPart::Text {
                    text: t.text.clone(),
                })
            }
            Part::Refusal(r) => out.push(ContentPart::Text {
                text: r.refusal.clone(),
            }),
            Part::InputImage(_) | Part::InputAudio(_) if !media_ok => {
                return Err(invalid(
                    &format!("{pp}.type"),
                    format!("{pp}: only user messages may hold images or audio"),
                ))
            }
            Part::InputImage(img) => {
                if img.file_id.is_some() {
                    return Err(unsupported(&format!("{pp}.file_id"), "the Files API"));
                }
                let url = img.image_url.as_deref().ok_or_else(|| {
                    invalid(
                        &format!("{pp}.image_url"),
                        format!("{pp}.image_url is required"),
                    )
                })?;
                out.push(ContentPart::Image {
                    source: image_source(&format!("{pp}.image_url"), url, remote)?,
                });
            }
            Part::InputAudio(a) => out.push(ContentPart::Audio {
                source: MediaSource::Inline {
                    data: a.input_audio.data.clone(),
                },
                format: a.input_audio.format.clone(),
            }),
            Part::InputFile(_) => return Err(unsupported(&format!("{pp}.type"), "input_file")),
        }
    }
    Ok(out)
}

/// The input items as messages (appended to `out`, which may hold a previous response's).
pub fn input_messages(
    input: &TextOrBlocks<Item>,
    remote: bool,
    out: &mut Vec<ChatMessage>,
) -> Result<(), ClassifiedError> {
    let items = match input {
        TextOrBlocks::Text(t) => {
            out.push(ChatMessage::text(Role::User, t.clone()));
            return Ok(());
        }
        TextOrBlocks::Blocks(items) => items,
    };
    for (i, item) in items.iter().enumerate() {
        let p = format!("input[{i}]");
        match item {
            Item::Message(m) => {
                let role = match m.role {
                    ItemRole::User => Role::User,
                    ItemRole::Assistant => Role::Assistant,
                    ItemRole::System | ItemRole::Developer => Role::System,
                };
                let content = message_parts(&format!("{p}.content"), role, &m.content, remote)?;
                out.push(ChatMessage {
                    role,
                    content,
                    tool_calls: Vec::new(),
                    tool_call_id: None,
                });
            }
            Item::FunctionCall(c) => {
                let call = ToolCall {
                    id: c.call_id.clone(),
                    name: c.name.clone(),
                    arguments: c.arguments.clone(),
                };
                // Consecutive calls (and the text before them) are one assistant turn.
                match out.last_mut() {
                    Some(last) if last.role == Role::Assistant => last.tool_calls.push(call),
                    _ => out.push(ChatMessage {
                        role: Role::Assistant,
                        content: Vec::new(),
                        tool_calls: vec![call],
                        tool_call_id: None,
                    }),
                }
            }
            Item::FunctionCallOutput(o) => {
                let text = parts_text(&format!("{p}.output"), &o.output)?;
                out.push(ChatMessage {
                    role: Role::Tool,
                    content: vec![ContentPart::Text { text }],
                    tool_calls: Vec::new(),
                    tool_call_id: Some(o.call_id.clone()),
                });
            }
            Item::Reasoning(_) => {}
        }
    }
    Ok(())
}

fn tools(req: &ResponsesRequest) -> Result<Vec<ToolSpec>, ClassifiedError> {
    let mut out = Vec::with_capacity(req.tools.len());
    for (i, t) in req.tools.iter().enumerate() {
        let p = format!("tools[{i}]");
        match t.kind.as_str() {
            "function" => {}
            k if BUILT_IN_TOOLS.contains(&k) || k.starts_with("web_search") => {
                return Err(invalid(
                    &format!("{p}.type"),
                    format!("{p}.type {k:?}: OpenAI's built-in tools are not supported by this server; declare a function tool"),
                ))
            }
            k => {
                return Err(invalid(
                    &format!("{p}.type"),
                    format!("{p}.type {k:?} is not a tool type this server knows (\"function\")"),
                ))
            }
        }
        out.push(checked_tool(
            &p,
            t.name.as_deref().unwrap_or_default(),
            t.description.clone(),
            t.parameters.as_ref(),
            "parameters",
            false,
        )?);
    }
    Ok(out)
}

fn tool_choice(c: &ToolChoiceWire, tools: &[ToolSpec]) -> Result<ToolChoice, ClassifiedError> {
    let choice = match c {
        ToolChoiceWire::Mode(m) => match m.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            m => {
                return Err(invalid(
                    "tool_choice",
                    format!("tool_choice must be \"none\", \"auto\" or \"required\", got {m:?}"),
                ))
            }
        },
        ToolChoiceWire::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("function") => match o.get("name").and_then(Value::as_str) {
                Some(name) => ToolChoice::Function {
                    name: name.to_string(),
                },
                None => {
                    return Err(invalid(
                        "tool_choice.name",
                        "tool_choice.name is required for a function choice",
                    ))
                }
            },
            Some(k) => {
                return Err(invalid(
                    "tool_choice.type",
                    format!(
                        "tool_choice.type {k:?} is not supported by this server (\"function\")"
                    ),
                ))
            }
            None => return Err(invalid("tool_choice.type", "tool_choice.type is required")),
        },
    };
    match &choice {
        ToolChoice::Function { name } if !tools.iter().any(|t| &t.name == name) => Err(invalid(
            "tool_choice.name",
            format!("tool_choice names the function {name:?}, which is not in tools"),
        )),
        ToolChoice::Required if tools.is_empty() => Err(invalid(
            "tool_choice",
            "tool_choice \"required\" needs tools",
        )),
        _ => Ok(choice),
    }
}

/// Consecutive system turns as one (`instructions`, then Codex's `developer` messages): chat
/// templates take one system turn, at the start.
fn merge_system_turns(messages: &mut Vec<ChatMessage>) {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    for m in messages.drain(..) {
        match out.last_mut() {
            Some(last) if last.role == Role::System && m.role == Role::System => {
                let text = [&last.content, &m.content]
                    .iter()
                    .flat_map(|c| c.iter())
                    .filter_map(|p| match p {
                        ContentPart::Text { text } => Some(text.as_str()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join("\n\n");
                last.content = vec![ContentPart::Text { text }];
            }
            _ => out.push(m),
        }
    }
    *messages = out;
}

impl ResponsesRequest {
    /// Checks what does not depend on stored state.
    pub fn check(&self) -> Result<(), ClassifiedError> {
        if self.background {
            return Err(unsupported("background", "background mode"));
        }
        if self.conversation.is_some() {
            return Err(unsupported(
                "conversation",
                "the Conversations API (use previous_response_id)",
            ));
        }
        if self.prompt.is_some() {
            return Err(unsupported("prompt", "a stored prompt template"));
        }
        match self.truncation.as_deref() {
            None | Some("disabled") => {}
            Some("auto") => {
                return Err(invalid(
                    "truncation",
                    "truncation \"auto\" is not supported by this server: a conversation longer than the context is refused, never cut (use \"disabled\")",
                ))
            }
            Some(t) => {
                return Err(invalid(
                    "truncation",
                    format!("truncation must be \"disabled\" or \"auto\", got {t:?}"),
                ))
            }
        }
        if self.input.is_none() && self.previous_response_id.is_none() {
            return Err(invalid("input", "input: field required"));
        }
        Ok(())
    }

    /// Whether output text logprobs are asked for (`include` or `top_logprobs`).
    pub fn logprobs(&self) -> Option<u32> {
        let asked = self
            .include
            .iter()
            .any(|i| i == "message.output_text.logprobs");
        match (asked, self.top_logprobs) {
            (_, Some(k)) => Some(k),
            (true, None) => Some(0),
            (false, None) => None,
        }
    }

    /// The internal request, after `history` (a previous response's conversation): instructions
    /// first, then the history, then this input.
    pub fn into_request(
        self,
        history: Vec<ChatMessage>,
        limits: &RequestLimits,
    ) -> Result<ValidChatRequest, ClassifiedError> {
        self.check()?;
        let max_tokens = match self.max_output_tokens {
            None => None,
            Some(m) if m < 16 => {
                return Err(invalid(
                    "max_output_tokens",
                    format!("max_output_tokens must be at least 16, got {m}"),
                ))
            }
            Some(m) => Some(m.min(limits.max_tokens as u64) as u32),
        };
        let logprobs = self.logprobs();
        if logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(invalid(
                "top_logprobs",
                format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            ));
        }
        let mut messages = Vec::new();
        if let Some(i) = self.instructions.as_deref().filter(|i| !i.is_empty()) {
            messages.push(ChatMessage::text(Role::System, i));
        }
        messages.extend(history);
        if let Some(input) = &self.input {
            input_messages(input, limits.allow_remote_media, &mut messages)?;
        }
        if messages.is_empty() {
            return Err(invalid("input", "input must not be empty"));
        }
        merge_system_turns(&mut messages);
        if messages.len() > limits.max_messages {
            return Err(invalid(
                "input",
                format!("at most {} input items are accepted", limits.max_messages),
            ));
        }
        count_media(&messages, limits)?;
        let tools = tools(&self)?;
        let tool_choice = self
            .tool_choice
            .as_ref()
            .map(|c| tool_choice(c, &tools))
            .transpose()?;
        let response_format = match self.text.as_ref().and_then(|t| t.format.as_ref()) {
            None | Some(Format::Text(_)) => None,
            Some(Format::JsonObject(_)) => Some(ResponseFormat::JsonObject),
            Some(Format::JsonSchema(f)) => {
                if !f.schema.is_object() {
                    return Err(invalid(
                        "text.format.schema",
                        "text.format.schema must be a JSON Schema object",
                    ));
                }
                check_grammar("text.format.schema", Grammar::JsonSchema(f.schema.clone()))?;
                Some(ResponseFormat::JsonSchema {
                    schema: f.schema.clone(),
                    name: f.name.clone(),
                })
            }
            Some(Format::Grammar(g)) => {
                check_grammar("text.format.grammar", Grammar::Lark(g.grammar.clone()))?;
                Some(ResponseFormat::Grammar {
                    grammar: g.grammar.clone(),
                })
            }
        };
        let stop: Vec<String> = match &self.stop {
            None => Vec::new(),
            Some(TextOrBlocks::Text(s)) => vec![s.clone()],
            Some(TextOrBlocks::Blocks(v)) if v.len() > 4 => {
                return Err(invalid("stop", "stop takes at most 4 strings"))
            }
            Some(TextOrBlocks::Blocks(v)) => v.clone(),
        };
        let mut kwargs = Map::new();
        if let Some(effort) = self.reasoning.as_ref().and_then(|r| r.effort.as_deref()) {
            let on = !matches!(effort, "none" | "minimal");
            kwargs.insert("enable_thinking".into(), Value::Bool(on));
        }
        Ok(ValidChatRequest {
            model: self.model,
            messages,
            sampling: SamplingOverrides {
                temperature: in_range("temperature", self.temperature, 2.0)?,
                top_p: in_range("top_p", self.top_p, 1.0)?,
                top_k: self.top_k,
                seed: self.seed,
                ..SamplingOverrides::default()
            },
            max_tokens,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            stream: self.stream,
            include_usage: true,
            return_token_ids: false,
            ignore_eos: false,
            n: 1,
            cache_salt: None,
            response_format,
            tools,
            tool_choice,
            parallel_tool_calls: self.parallel_tool_calls,
            logprobs,
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
        crate::wire::parse::<ResponsesRequest>(v.to_string().as_bytes())?
            .into_request(Vec::new(), &RequestLimits::default())
    }

    fn param(v: Value) -> String {
        req(v).unwrap_err().param.unwrap_or_default()
    }

    #[test]
    fn codexs_request_shape_is_accepted() {
        let r = req(json!({
            "model": "m", "stream": true, "store": false,
            "instructions": "You are Codex.",
            "input": [
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "env"}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "fix it"}]},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "xx"},
                {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": "{\"cmd\":[\"ls\"]}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "a.txt"},
                {"role": "user", "content": "now?"}],
            "tools": [{"type": "function", "name": "shell", "description": "run", "strict": false,
                       "parameters": {"type": "object", "properties": {"cmd": {"type": "array", "items": {"type": "string"}}}}}],
            "tool_choice": "auto", "parallel_tool_calls": true,
            "include": ["reasoning.encrypted_content"], "reasoning": {"effort": "medium", "summary": "auto"},
            "prompt_cache_key": "k", "client_metadata": {"x": 1}, "text": {"verbosity": "low"}
        }))
        .unwrap();
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
        // The instructions and the developer message: one system turn.
        assert_eq!(
            r.messages[0].content,
            [ContentPart::Text {
                text: "You are Codex.\n\nenv".into()
            }]
        );
        assert_eq!(r.messages[2].tool_calls[0].id, "call_1");
        assert_eq!(r.messages[3].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(r.tool_choice, Some(ToolChoice::Auto));
        assert_eq!(
            r.chat_template_kwargs.unwrap()["enable_thinking"],
            Value::Bool(true)
        );
        assert_eq!(r.logprobs, None);
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(param(json!({"input": "x"})), "model");
        assert_eq!(param(json!({"model": "m"})), "input");
        assert_eq!(
            param(json!({"model": "m", "input": [{"role": "robot", "content": "x"}]})),
            "input[0].role"
        );
        assert_eq!(
            param(json!({"model": "m", "input": [{"type": "web_search_call", "id": "x"}]})),
            "input[0].type"
        );
        assert_eq!(
            param(
                json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]})
            ),
            "input[0].content[0].image_url"
        );
        assert_eq!(
            param(
                json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text"}]}]})
            ),
            "input[0].content[0].text"
        );
        assert_eq!(
            param(json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]})),
            "tools[0].type"
        );
        assert_eq!(
            param(
                json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}],
                "tool_choice": {"type": "function", "name": "g"}})
            ),
            "tool_choice.name"
        );
        assert_eq!(
            param(json!({"model": "m", "input": "x", "truncation": "auto"})),
            "truncation"
        );
        assert_eq!(
            param(json!({"model": "m", "input": "x", "background": true})),
            "background"
        );
        assert_eq!(
            param(
                json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}})
            ),
            "text.format.schema"
        );
        assert_eq!(
            param(json!({"model": "m", "input": "x", "max_output_tokens": 3})),
            "max_output_tokens"
        );
        assert_eq!(
            param(json!({"model": "m", "input": "x", "temperature": 2.5})),
            "temperature"
        );
    }

    #[test]
    fn formats_choices_and_reasoning_map_to_the_internal_request() {
        let r = req(json!({"model": "m", "input": "x",
            "text": {"format": {"type": "json_schema", "name": "a", "strict": true,
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
            "reasoning": {"effort": "none"}, "include": ["message.output_text.logprobs"], "top_logprobs": 3}))
        .unwrap();
        assert!(matches!(
            r.response_format,
            Some(ResponseFormat::JsonSchema { .. })
        ));
        assert_eq!(
            r.chat_template_kwargs.unwrap()["enable_thinking"],
            Value::Bool(false)
        );
        assert_eq!(r.logprobs, Some(3));
        let r = req(json!({"model": "m", "input": "x",
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": false}))
        .unwrap();
        assert_eq!(
            r.tool_choice,
            Some(ToolChoice::Function { name: "f".into() })
        );
        assert_eq!(r.parallel_tool_calls, Some(false));
    }
}
