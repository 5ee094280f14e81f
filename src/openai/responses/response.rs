//! What `/v1/responses` answers, in OpenAI's shapes: the response object, its output items, and the
//! streaming events (each with its `sequence_number`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::protocol::{TokenLogprob, ToolCallFrame, Usage};

/// The response object (`GET /v1/responses/{id}` returns it as stored).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    /// `in_progress`, `completed`, `incomplete` or `failed`.
    pub status: String,
    pub error: Option<ResponseError>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u64>,
    pub model: String,
    pub output: Vec<OutputItem>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub reasoning: Value,
    pub store: bool,
    pub temperature: Option<f32>,
    pub text: Value,
    pub tool_choice: Value,
    pub tools: Vec<Value>,
    pub top_p: Option<f32>,
    pub truncation: String,
    pub usage: Option<ResponseUsage>,
    pub user: Option<String>,
    pub metadata: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncompleteDetails {
    pub reason: String,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ResponseUsage {
    pub input_tokens: u32,
    pub input_tokens_details: InputDetails,
    pub output_tokens: u32,
    pub output_tokens_details: OutputDetails,
    pub total_tokens: u32,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct InputDetails {
    pub cached_tokens: u32,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct OutputDetails {
    pub reasoning_tokens: u32,
}

impl From<&Usage> for ResponseUsage {
    fn from(u: &Usage) -> Self {
        Self {
            input_tokens: u.prompt_tokens,
            input_tokens_details: InputDetails {
                cached_tokens: u.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
            },
            output_tokens: u.completion_tokens,
            output_tokens_details: OutputDetails {
                reasoning_tokens: u
                    .completion_tokens_details
                    .map_or(0, |d| d.reasoning_tokens),
            },
            total_tokens: u.total_tokens,
        }
    }
}

/// An output item.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    Reasoning {
        id: String,
        summary: Vec<Value>,
        content: Vec<ReasoningText>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        status: Option<String>,
    },
    Message {
        id: String,
        status: String,
        role: String,
        content: Vec<OutputText>,
    },
    FunctionCall {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        status: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReasoningText {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
}

impl ReasoningText {
    pub fn new(text: String) -> Self {
        Self {
            kind: "reasoning_text".into(),
            text,
        }
    }
}

/// An `output_text` content part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputText {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
    pub annotations: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<Logprob>>,
}

impl OutputText {
    pub fn new(text: String, logprobs: Option<Vec<Logprob>>) -> Self {
        Self {
            kind: "output_text".into(),
            text,
            annotations: Vec::new(),
            logprobs,
        }
    }
}

/// One token's log-probability in the Responses shape (bytes as in the chat API).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Logprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl From<TokenLogprob> for Logprob {
    fn from(t: TokenLogprob) -> Self {
        Self {
            bytes: t.bytes,
            token: t.token,
            logprob: t.logprob,
            top_logprobs: t
                .top_logprobs
                .into_iter()
                .map(|a| TopLogprob {
                    bytes: a.bytes,
                    token: a.token,
                    logprob: a.logprob,
                })
                .collect(),
        }
    }
}

/// A call as a `function_call` item (`fc_` id; the call id is the worker's `call_…`).
pub fn function_call(c: &ToolCallFrame) -> OutputItem {
    OutputItem::FunctionCall {
        id: format!("fc_{}", c.id.trim_start_matches("call_")),
        call_id: c.id.clone(),
        name: c.name.clone(),
        arguments: c.arguments.clone(),
        status: "completed".into(),
    }
}

/// A streaming event: its `type`, then its fields; `sequence_number` is added when sent.
#[derive(Debug, Serialize)]
pub struct StreamEvent {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub sequence_number: u64,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}
