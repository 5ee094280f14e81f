//! Frames: what a worker publishes back for a job, in order (`seq` 0, 1, 2, …), ending with exactly one
//! `done` or `error`. A stream that stops without one of them is itself an error.

use serde::{Deserialize, Serialize};

use crate::error::{ClassifiedError, ErrorClass};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    pub job_id: String,
    /// Position of this frame in the job's stream, from 0, without gaps.
    pub seq: u64,
    /// Delivery attempt of the job that produced the frame (1 = first).
    #[serde(default = "one")]
    pub attempt: u32,
    #[serde(flatten)]
    pub body: FrameBody,
}

fn one() -> u32 {
    1
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FrameBody {
    /// Newly generated text and the ids that produced it. `text` may be empty when ids are held back
    /// (an incomplete UTF-8 sequence, or a possible stop string).
    Delta {
        /// Answer text (`content`).
        text: String,
        /// Reasoning text (`reasoning_content`): what a thinking model wrote between its reasoning
        /// markers, label stripped. Only from models that declare markers; absent = none.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reasoning: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        token_ids: Vec<u32>,
        /// The choice (`0 .. n`) the text belongs to; absent = 0.
        #[serde(default, skip_serializing_if = "is_zero")]
        index: u32,
        /// One per id in `token_ids`, when the job asked for log-probabilities.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        logprobs: Vec<TokenLogprob>,
        /// Calls the answer makes (the answer is a tool call, not text), each complete.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ToolCallFrame>,
    },
    Done(DoneBody),
    Error {
        error: WireError,
    },
}

/// A generated token's log-probability under the model (the log-softmax of its logits, before
/// temperature, penalties, biases and grammar masks), and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's bytes (UTF-8 pieces of one character can be split across tokens).
    pub bytes: Vec<u8>,
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One call of an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallFrame {
    /// Position among the answer's calls, from 0.
    pub index: u32,
    pub id: String,
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

impl FrameBody {
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Done(_) | Self::Error { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoneBody {
    /// Why choice 0 ended.
    pub finish_reason: FinishReason,
    /// Totals over all choices.
    pub usage: Usage,
    #[serde(default)]
    pub timings: Timings,
    /// How each choice ended, when the job asked for `n > 1`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<ChoiceEnd>,
    /// The stop string that ended choice 0 (`finish_reason` is then `stop`); absent when it ended
    /// otherwise (an end-of-sequence id, the token limit, calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequence: Option<String>,
    /// The worker's heartbeat as the job ends (what its prefix cache now holds, its free slots), so
    /// the front end's routing is current before the client can send its next turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<Box<super::WorkerHeartbeat>>,
}

/// How one choice of an `n > 1` job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChoiceEnd {
    pub index: u32,
    pub finish_reason: FinishReason,
    pub completion_tokens: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence id or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// The answer is a set of tool calls.
    ToolCalls,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
        }
    }
}

/// Token counts as OpenAI reports them. `completion_tokens` counts every generated id, including the
/// end-of-sequence id that ended generation (as transformers' `generate` returns it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// OpenAI's breakdown of the prompt: how many of its tokens came from the prefix cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// OpenAI's breakdown of the completion: present only when some of it was reasoning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV was reused rather than computed.
    #[serde(default)]
    pub cached_tokens: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionTokensDetails {
    /// Generated ids of reasoning blocks, their start and end markers included (part of
    /// `completion_tokens`).
    #[serde(default)]
    pub reasoning_tokens: u32,
}

impl Usage {
    pub fn new(prompt: u32, completion: u32) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: None,
            completion_tokens_details: None,
        }
    }

    /// With `completion_tokens_details.reasoning_tokens`, when there were any.
    pub fn with_reasoning(mut self, reasoning: u32) -> Self {
        self.completion_tokens_details = (reasoning > 0).then_some(CompletionTokensDetails {
            reasoning_tokens: reasoning,
        });
        self
    }

    pub fn with_cached(mut self, cached: u32) -> Self {
        self.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: cached,
        });
        self
    }
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From the front end accepting the job to a worker starting it.
    #[serde(default)]
    pub queued_ms: f64,
    /// Preprocessing (template, tokenizer, media decoding) on the worker.
    #[serde(default)]
    pub preprocess_ms: f64,
    /// Encoders plus the prefill decoder run, until the first token.
    #[serde(default)]
    pub prefill_ms: f64,
    /// All decode steps after the first token.
    #[serde(default)]
    pub decode_ms: f64,
}

/// An error as it travels: a closed class, a message for the client, and the request field concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub class: ErrorClass,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

impl From<ClassifiedError> for WireError {
    fn from(e: ClassifiedError) -> Self {
        Self {
            class: e.class,
            message: e.message,
            param: e.param,
        }
    }
}

impl From<WireError> for ClassifiedError {
    fn from(e: WireError) -> Self {
        Self {
            class: e.class,
            message: e.message,
            param: e.param,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_flat_and_tolerant() {
        let f = Frame {
            job_id: "j".into(),
            seq: 2,
            attempt: 1,
            body: FrameBody::Delta {
                text: "hi".into(),
                reasoning: String::new(),
                token_ids: vec![5],
                index: 0,
                logprobs: vec![],
                tool_calls: vec![],
            },
        };
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["type"], "delta");
        assert_eq!(v["text"], "hi");
        assert!(v.get("reasoning").is_none(), "no reasoning, no field");
        let old: Frame = serde_json::from_str(
            r#"{"job_id":"j","seq":0,"type":"delta","text":"x","future_field":1}"#,
        )
        .unwrap();
        assert_eq!(old.attempt, 1);
        let e: Frame = serde_json::from_str(
            r#"{"job_id":"j","seq":3,"attempt":2,"type":"error","error":{"class":"context_length_exceeded","message":"m"}}"#,
        )
        .unwrap();
        assert!(e.body.is_terminal());
    }
}
