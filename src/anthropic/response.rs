//! What `POST /v1/messages` answers, in Anthropic's shapes: the message object, the streaming events
//! and the error envelope.

use serde::Serialize;
use serde_json::Value;

use crate::error::{ClassifiedError, ErrorClass};
use crate::protocol::{DoneBody, FinishReason, ToolCallFrame, Usage};

/// The `message` object (the whole answer, or `message_start`'s empty one).
#[derive(Debug, Serialize)]
pub struct Message {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub role: &'static str,
    pub model: String,
    pub content: Vec<Block>,
    pub stop_reason: Option<&'static str>,
    pub stop_sequence: Option<String>,
    pub usage: MessageUsage,
}

/// An output content block.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    /// Reasoning. There is no signature to give (nothing is encrypted here): an empty string.
    Thinking {
        thinking: String,
        signature: String,
    },
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MessageUsage {
    /// Prompt tokens computed (not read from the prefix cache).
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cache_read_input_tokens: u32,
    /// Always 0: the prefix cache fills itself, nobody pays to write it.
    pub cache_creation_input_tokens: u32,
}

impl From<&Usage> for MessageUsage {
    fn from(u: &Usage) -> Self {
        let cached = u.prompt_tokens_details.map_or(0, |d| d.cached_tokens);
        Self {
            input_tokens: u.prompt_tokens.saturating_sub(cached),
            output_tokens: u.completion_tokens,
            cache_read_input_tokens: cached,
            cache_creation_input_tokens: 0,
        }
    }
}

/// `stop_reason` and `stop_sequence` from how the answer ended. `calls`: it holds tool calls.
pub fn stop_reason(done: &DoneBody, calls: bool) -> (&'static str, Option<String>) {
    match done.finish_reason {
        FinishReason::Length => ("max_tokens", None),
        FinishReason::ToolCalls => ("tool_use", None),
        FinishReason::Stop if calls => ("tool_use", None),
        FinishReason::Stop => match &done.stop_sequence {
            Some(s) => ("stop_sequence", Some(s.clone())),
            None => ("end_turn", None),
        },
    }
}

/// A call as a `tool_use` block: Anthropic's `toolu_` id prefix, arguments as an object.
pub fn tool_use(c: &ToolCallFrame) -> Block {
    Block::ToolUse {
        id: tool_use_id(&c.id),
        name: c.name.clone(),
        input: serde_json::from_str(&c.arguments)
            .unwrap_or_else(|_| Value::Object(Default::default())),
    }
}

pub fn tool_use_id(call_id: &str) -> String {
    match call_id.strip_prefix("call_") {
        Some(rest) => format!("toolu_{rest}"),
        None => call_id.to_string(),
    }
}

/// The streaming events (`event:` is the `type`).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    MessageStart {
        message: Message,
    },
    ContentBlockStart {
        index: u32,
        content_block: Block,
    },
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: MessageDeltaBody,
        usage: MessageUsage,
    },
    MessageStop {},
    Ping {},
    Error {
        error: ErrorDetail,
    },
}

impl StreamEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::MessageStart { .. } => "message_start",
            Self::ContentBlockStart { .. } => "content_block_start",
            Self::ContentBlockDelta { .. } => "content_block_delta",
            Self::ContentBlockStop { .. } => "content_block_stop",
            Self::MessageDelta { .. } => "message_delta",
            Self::MessageStop {} => "message_stop",
            Self::Ping {} => "ping",
            Self::Error { .. } => "error",
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockDelta {
    TextDelta { text: String },
    ThinkingDelta { thinking: String },
    InputJsonDelta { partial_json: String },
}

#[derive(Debug, Serialize)]
pub struct MessageDeltaBody {
    pub stop_reason: &'static str,
    pub stop_sequence: Option<String>,
}

/// `{"type": "error", "error": {"type", "message"}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub message: String,
}

/// Anthropic's error type and HTTP status for an error class.
pub fn error_kind(class: ErrorClass) -> (u16, &'static str) {
    match class {
        ErrorClass::InvalidRequest | ErrorClass::ContextLengthExceeded => {
            (400, "invalid_request_error")
        }
        ErrorClass::Unprocessable => (400, "invalid_request_error"),
        ErrorClass::Unauthorized => (401, "authentication_error"),
        ErrorClass::ModelNotFound | ErrorClass::NotFound => (404, "not_found_error"),
        ErrorClass::PayloadTooLarge => (413, "request_too_large"),
        ErrorClass::Overloaded => (429, "rate_limit_error"),
        ErrorClass::Unavailable => (529, "overloaded_error"),
        ErrorClass::Timeout => (504, "timeout_error"),
        ErrorClass::Cancelled | ErrorClass::Internal => (500, "api_error"),
    }
}

impl From<&ClassifiedError> for ErrorDetail {
    fn from(e: &ClassifiedError) -> Self {
        Self {
            kind: error_kind(e.class).1,
            message: e.message.clone(),
        }
    }
}

impl From<&ClassifiedError> for ErrorBody {
    fn from(e: &ClassifiedError) -> Self {
        Self {
            kind: "error",
            error: e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_splits_cached_tokens_and_stop_reasons_map() {
        let u = MessageUsage::from(&Usage::new(10, 3).with_cached(4));
        assert_eq!(
            (u.input_tokens, u.cache_read_input_tokens, u.output_tokens),
            (6, 4, 3)
        );
        let mut d = DoneBody {
            finish_reason: FinishReason::Stop,
            usage: Usage::new(1, 1),
            timings: Default::default(),
            choices: vec![],
            stop_sequence: Some("END".into()),
            heartbeat: None,
        };
        assert_eq!(
            stop_reason(&d, false),
            ("stop_sequence", Some("END".into()))
        );
        d.stop_sequence = None;
        assert_eq!(stop_reason(&d, false), ("end_turn", None));
        d.finish_reason = FinishReason::Length;
        assert_eq!(stop_reason(&d, true), ("max_tokens", None));
        d.finish_reason = FinishReason::ToolCalls;
        assert_eq!(stop_reason(&d, true), ("tool_use", None));
        assert_eq!(tool_use_id("call_ab"), "toolu_ab");
        let e = ErrorBody::from(&ClassifiedError::invalid("x", "bad"));
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}})
        );
    }
}
