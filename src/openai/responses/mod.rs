//! OpenAI's Responses API as an adapter over the one internal request: [`request`] parses its wire
//! shapes (typed, every error naming its field) into [`crate::openai::ValidChatRequest`], the request
//! every API turns into a job; [`response`] is what the front end renders back; [`Stored`] is what
//! `store: true` keeps so that `previous_response_id` continues a conversation on any front end.

pub mod request;
pub mod response;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::protocol::{ChatMessage, ContentPart, Role, ToolCall, ToolCallFrame};
use response::{OutputItem, Response};

/// A stored response: the response object, the input items it was given (for
/// `GET /v1/responses/{id}/input_items`), and the conversation a continuation starts from (every
/// earlier turn, this input and this answer; instructions are not carried over, as OpenAI's).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    /// The prefix-cache scope of the key that stored it (`None` without keys): another key reads
    /// nothing.
    pub scope: Option<String>,
    pub response: Response,
    pub input_items: Vec<Value>,
    pub conversation: Vec<ChatMessage>,
}

/// The key of a response in the bus's store.
pub fn store_key(id: &str) -> String {
    format!("response.{id}")
}

/// The input items as OpenAI lists them: each with an `id` and a `type`, a message's string
/// content as one `input_text` part.
pub fn input_items(input: Option<&Value>, response_id: &str) -> Vec<Value> {
    let items: Vec<Value> = match input {
        None => Vec::new(),
        Some(Value::String(s)) => vec![json!({"role": "user", "content": s})],
        Some(Value::Array(a)) => a.clone(),
        Some(_) => Vec::new(),
    };
    let suffix = response_id.trim_start_matches("resp_");
    items
        .into_iter()
        .enumerate()
        .map(|(i, mut item)| {
            if let Value::Object(o) = &mut item {
                let kind = o
                    .entry("type")
                    .or_insert_with(|| json!("message"))
                    .as_str()
                    .unwrap_or("message")
                    .to_string();
                if kind == "message" {
                    if let Some(Value::String(text)) = o.get("content").cloned() {
                        let part = if o.get("role").and_then(Value::as_str) == Some("assistant") {
                            "output_text"
                        } else {
                            "input_text"
                        };
                        o.insert("content".into(), json!([{"type": part, "text": text}]));
                    }
                }
                let prefix = match kind.as_str() {
                    "message" => "msg",
                    "function_call" => "fc",
                    "function_call_output" => "fco",
                    "reasoning" => "rs",
                    _ => "item",
                };
                o.entry("id")
                    .or_insert_with(|| json!(format!("{prefix}_{suffix}_in{i}")));
            }
            item
        })
        .collect()
}

/// The answer as an assistant message for the stored conversation (reasoning is not carried over:
/// the templates drop past reasoning).
pub fn answer_message(text: &str, calls: &[ToolCallFrame]) -> ChatMessage {
    ChatMessage {
        role: Role::Assistant,
        content: if text.is_empty() {
            Vec::new()
        } else {
            vec![ContentPart::Text {
                text: text.to_string(),
            }]
        },
        tool_calls: calls
            .iter()
            .map(|c| ToolCall {
                id: c.id.clone(),
                name: c.name.clone(),
                arguments: c.arguments.clone(),
            })
            .collect(),
        tool_call_id: None,
    }
}

/// Item ids of a response (stable for it, so streamed and final items agree).
pub fn item_id(prefix: &str, response_id: &str) -> String {
    format!("{prefix}_{}", response_id.trim_start_matches("resp_"))
}

/// The output items of an answer: reasoning, the message (when there is text or no call), calls.
pub fn output_items(
    response_id: &str,
    reasoning: &str,
    text: &str,
    logprobs: Option<Vec<response::Logprob>>,
    calls: &[ToolCallFrame],
    status: &str,
) -> Vec<OutputItem> {
    let mut out = Vec::new();
    if !reasoning.is_empty() {
        out.push(OutputItem::Reasoning {
            id: item_id("rs", response_id),
            summary: Vec::new(),
            content: vec![response::ReasoningText::new(reasoning.to_string())],
            status: None,
        });
    }
    if !text.is_empty() || calls.is_empty() {
        out.push(OutputItem::Message {
            id: item_id("msg", response_id),
            status: status.to_string(),
            role: "assistant".into(),
            content: vec![response::OutputText::new(text.to_string(), logprobs)],
        });
    }
    out.extend(calls.iter().map(response::function_call));
    out
}
