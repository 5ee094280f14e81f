//! Wire types between front ends and workers: serde types only, mirrored by the JSON Schemas in
//! `schemas/v1/`. Other programs may publish [`Job`]s and read [`Frame`]s directly, so these follow
//! the evolution rules: optional fields default and are skipped when absent, unknown fields are
//! ignored, renames keep an `alias`, and a changed field type means `v2`.

mod frame;
mod job;
pub mod prefix;
mod progress;
pub mod subjects;

pub use frame::{
    ChoiceEnd, CompletionTokensDetails, DoneBody, FinishReason, Frame, FrameBody,
    PromptTokensDetails, Timings, TokenLogprob, ToolCallFrame, TopLogprob, Usage, WireError,
};
pub use job::{
    CancelRequest, ChatMessage, ContentPart, Job, MediaSource, OfferReply, ResponseFormat, Role,
    SamplingOverrides, ToolCall, ToolChoice, ToolSpec, WorkerHeartbeat, WorkerModel, MAX_CHOICES,
    MAX_TOP_LOGPROBS,
};
pub use progress::{ChoiceProgress, Progress, ProgressRequest};

/// Version of the wire protocol; part of every subject.
pub const PROTOCOL_VERSION: &str = "v1";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
