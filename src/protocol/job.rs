//! A job: one normalised chat request, as a front end (or any other program) publishes it for workers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One chat completion to run. Published on `onnxchat.v1.jobs.<model>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Unique id (UUID v4 text); frames and cancellations refer to it.
    pub job_id: String,
    /// Served model name the job is for.
    pub model: String,
    /// Subject the worker publishes [`super::Frame`]s to (the front end subscribes before publishing).
    pub reply_to: String,
    /// Where the reader of the frames answers progress requests ([`super::ProgressRequest`]): a
    /// worker asks there before running the job and continues from what was delivered. Absent =
    /// every attempt runs from the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_to: Option<String>,
    /// When the front end accepted the request (ms since epoch); used for queue timings and expiry.
    #[serde(default)]
    pub created_ms: u64,
    /// The conversation, already validated.
    pub messages: Vec<ChatMessage>,
    /// Sampling settings the request gave; the rest come from the model's `generation_config.json`.
    #[serde(default)]
    pub sampling: SamplingOverrides,
    /// Maximum number of tokens to generate; absent = up to the context limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Stop strings (at most 4), matched on the generated text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence ids (until `max_tokens` or a stop string), as vLLM's
    /// `ignore_eos`; for benchmarks and tests.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
    /// Time after which the job is no longer worth running (ms since epoch); absent = no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Answers to generate from the one prompt (1 ..= [`MAX_CHOICES`]); absent = 1. Choice `i > 0`
    /// samples with its own seed derived from `sampling.seed` and `i`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Isolation scope of the workers' prefix caches: a job reuses KV only from jobs with the same
    /// scope (absent = the shared scope). The front end derives it from the API key and the
    /// request's `cache_salt`; it is opaque to workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_scope: Option<String>,
    /// A text completion (`/v1/completions`): this raw text is the prompt, tokenized as it is
    /// (with the tokenizer's start-of-sequence id), and `messages` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// A text completion given as token ids: these ids are the prompt as they are (no
    /// start-of-sequence id added); `messages` is empty and `prompt` absent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_token_ids: Vec<u32>,
    /// Constrains the answer (structured outputs); absent = free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// Functions the model may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolSpec>,
    /// Whether and which tool to call (absent = `auto` when there are tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// Allow several calls in one answer (absent = true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// Report each generated token's log-probability and this many most likely alternatives
    /// (0 ..= 20); absent = no log-probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    /// Token id → bias added to its logit before sampling (-100 ..= 100).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub logit_bias: BTreeMap<u32, f32>,
    /// Extra top-level variables for the chat template (vLLM's `chat_template_kwargs`, transformers'
    /// `apply_chat_template(**kwargs)`), e.g. `{"enable_thinking": true}`. Never one of the names the
    /// renderer sets itself (`messages`, `tools`, `documents`, `add_generation_prompt`, the special
    /// tokens): workers refuse those. Ignored for text completions (no template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// A `max_tokens` larger than the room the context leaves after the prompt is lowered to that
    /// room (the answer then ends with `length`) instead of refused: agents send one large value
    /// whatever the model (the Messages and Responses APIs set this).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clamp_max_tokens: bool,
    /// Only count the prompt's tokens: the worker renders and tokenizes it, answers one `done`
    /// frame (`usage.prompt_tokens`, no completion) and generates nothing (Anthropic's
    /// `count_tokens`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub count_only: bool,
}

/// Most `top_logprobs` one token may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// What shape the answer must have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text (the default).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against `schema`.
    JsonSchema {
        schema: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Extension: text matching a Lark grammar in llguidance's dialect.
    Grammar { grammar: String },
    /// Extension: text matching a regular expression.
    Regex { pattern: String },
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the arguments object.
    #[serde(default = "empty_object_schema")]
    pub parameters: Value,
}

fn empty_object_schema() -> Value {
    serde_json::json!({"type": "object", "properties": {}})
}

/// Whether the model answers with text, tool calls, or either.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToolChoice {
    /// Text only; the tools are not shown to the model.
    None,
    /// The model chooses.
    Auto,
    /// At least one call.
    Required,
    /// A call of this function.
    Function { name: String },
}

/// A call an assistant message made (in the history) or an answer makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// Most choices (`n`) one job may ask for.
pub const MAX_CHOICES: u32 = 8;

/// A worker's answer to a job offered to it directly (`onnxchat.v1.workers.<id>.jobs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfferReply {
    /// True: the worker runs the job and publishes its frames; false: send it to the shared queue.
    pub accepted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Sampling parameters as the request gave them. `None` means "the model's default".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingOverrides {
    /// 0 = greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// 0 = no top-k filtering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// Random seed; the front end assigns one when the client gives none, so every job is reproducible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result (`tool_call_id` names the call).
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// One message: a role and its parts in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: Vec<ContentPart>,
    /// The calls an assistant message made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message of text parts only.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: vec![ContentPart::Text { text: text.into() }],
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A part of a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text {
        text: String,
    },
    Image {
        source: MediaSource,
    },
    Audio {
        source: MediaSource,
        /// The format the client named (`wav`, `mp3`, `flac`, `ogg`); the bytes are sniffed anyway.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        format: Option<String>,
    },
}

/// Where a media item's bytes are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MediaSource {
    /// Base64 of the file's bytes, inside the job.
    Inline { data: String },
    /// An object in a JetStream object store bucket (large media).
    ObjectStore {
        bucket: String,
        key: String,
        /// Length of the stored object (the base64 text), in bytes.
        #[serde(default)]
        size: u64,
        /// SHA-256 of the stored object, lowercase hex; workers verify it after fetching.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
}

/// Asks workers to stop a job. Published on `onnxchat.v1.cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub job_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A worker's periodic announcement. Published on `onnxchat.v1.workers.heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerHeartbeat {
    pub worker_id: String,
    pub models: Vec<WorkerModel>,
    /// Jobs the worker can take at once, and how many it runs now.
    pub max_concurrent: u32,
    #[serde(default)]
    pub active: u32,
    /// How long to consider the worker alive without a newer heartbeat (ms).
    pub ttl_ms: u64,
    /// The worker is draining (shutting down): do not count it as serving.
    #[serde(default)]
    pub draining: bool,
    /// onnx-chat version of the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Jobs the worker has finished since it started.
    #[serde(default)]
    pub completed: u64,
    /// When this worker process started (ms since epoch; 0 = not said). A worker restarted under
    /// the same id announces a new value: jobs routed to the old process died with it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub started_ms: u64,
}

/// A model a worker serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerModel {
    /// The served name (requests' `model`).
    pub name: String,
    /// Other names accepted for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Context length in tokens.
    #[serde(default)]
    pub context_length: u32,
    /// Quantization name (e.g. `Q4_MIXED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<String>,
    /// Whether the model takes images / audio.
    #[serde(default)]
    pub vision: bool,
    #[serde(default)]
    pub audio: bool,
    /// When the worker loaded the model (s since epoch), for `/v1/models`' `created`.
    #[serde(default)]
    pub created: u64,
    /// Conversation digests ([`super::prefix`]) whose KV the worker's prefix cache holds for this
    /// model, most recently used first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    /// The most bytes of text one token of the model's vocabulary stands for: a prompt of `B` bytes
    /// of text has at least `B / max_token_bytes` tokens, so front ends refuse one that cannot fit
    /// without sending it. Absent = the tokenizer gives no such bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_token_bytes: Option<u32>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
