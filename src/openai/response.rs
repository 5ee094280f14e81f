//! Response bodies in OpenAI's exact shapes: `chat.completion`, `chat.completion.chunk`, the model list,
//! and the error envelope `{"error": {"message", "type", "param", "code"}}`.

use serde::Serialize;

use crate::error::ClassifiedError;
use crate::protocol::{Timings, TokenLogprob, ToolCallFrame, Usage};

#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
    /// Extension: where the time went (ms), as llama.cpp's server reports it.
    pub timings: Timings,
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: &'static str,
    /// Extension (as vLLM), only with `return_token_ids: true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// `null` when the answer is tool calls, or when a thinking model only reasoned (cut off by
    /// `max_tokens` inside its reasoning).
    pub content: Option<String>,
    /// Extension (as vLLM and llama.cpp): a thinking model's reasoning, apart from `content`; absent
    /// when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    pub refusal: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`.
#[derive(Debug, Default, Serialize)]
pub struct ChoiceLogprobs {
    pub content: Vec<TokenLogprob>,
    pub refusal: Option<Vec<TokenLogprob>>,
}

/// A call as OpenAI writes it: `{"id", "type": "function", "function": {"name", "arguments"}}`
/// (in stream deltas with the call's `index` too).
#[derive(Debug, Serialize)]
pub struct ToolCallOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut,
}

#[derive(Debug, Serialize)]
pub struct FunctionOut {
    pub name: String,
    pub arguments: String,
}

impl ToolCallOut {
    pub fn new(c: ToolCallFrame, streamed: bool) -> Self {
        Self {
            index: streamed.then_some(c.index),
            id: c.id,
            kind: "function",
            function: FunctionOut {
                name: c.name,
                arguments: c.arguments,
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChunkChoice>,
    /// Present (as `null` until the last chunk) only with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Extension (as vLLM and llama.cpp): reasoning text of this chunk, when it has some.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl From<&ClassifiedError> for ErrorBody {
    fn from(e: &ClassifiedError) -> Self {
        Self {
            error: ErrorDetail {
                message: e.message.clone(),
                kind: e.class.openai_type(),
                param: e.param.clone(),
                code: e.class.openai_code(),
            },
        }
    }
}

/// Shared fields of one response.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub fingerprint: String,
}

impl ResponseMeta {
    /// The fields of the response to job `job_id` (`prefix`: `chatcmpl` or `cmpl`) for the
    /// requested `model`, served in `quant`.
    pub fn new(
        prefix: &str,
        job_id: &str,
        created_ms: u64,
        model: &str,
        quant: Option<&str>,
    ) -> Self {
        Self {
            id: format!("{prefix}-{}", job_id.replace('-', "")),
            created: created_ms / 1000,
            model: model.to_string(),
            fingerprint: format!(
                "onnx-chat-{}-{}",
                env!("CARGO_PKG_VERSION"),
                quant.unwrap_or_default().to_lowercase()
            ),
        }
    }

    pub fn chunk(
        &self,
        choices: Vec<ChunkChoice>,
        usage: Option<Option<Usage>>,
    ) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.fingerprint.clone(),
            choices,
            usage,
        }
    }
}

/// `text_completion` (the legacy `/v1/completions`), whole or as one stream chunk.
#[derive(Debug, Serialize)]
pub struct TextCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<TextChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize)]
pub struct TextChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<LegacyLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// The legacy log-probability layout: parallel lists, `text_offset` in characters of the choice's
/// text (after an echoed prompt).
#[derive(Debug, Default, Serialize)]
pub struct LegacyLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    pub text_offset: Vec<usize>,
}

impl LegacyLogprobs {
    /// Appends the tokens of a delta whose `text_len` characters start at character `offset`;
    /// returns the offset after them. A token's offset is where its text starts, kept within the
    /// delta's text (special tokens and held-back bytes add no text).
    pub fn extend(&mut self, entries: Vec<TokenLogprob>, offset: usize, text_len: usize) -> usize {
        let end = offset + text_len;
        let mut at = offset;
        for e in entries {
            self.text_offset.push(at.min(end));
            at += e.token.chars().count();
            self.top_logprobs.push(
                e.top_logprobs
                    .into_iter()
                    .map(|t| (t.token, serde_json::json!(t.logprob)))
                    .collect(),
            );
            self.tokens.push(e.token);
            self.token_logprobs.push(e.logprob);
        }
        end
    }
}

impl ResponseMeta {
    pub fn text_completion(
        &self,
        choices: Vec<TextChoice>,
        usage: Option<Usage>,
    ) -> TextCompletion {
        TextCompletion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.fingerprint.clone(),
            choices,
            usage,
        }
    }
}
