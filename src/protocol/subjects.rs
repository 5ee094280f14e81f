//! Subject names. Model names are free text, so they are encoded into one subject token.

use super::PROTOCOL_VERSION;

pub const PREFIX: &str = "onnxchat";

/// `onnxchat.v1.jobs.<model-token>`: where jobs for a model are published.
pub fn jobs(model: &str) -> String {
    format!("{PREFIX}.{PROTOCOL_VERSION}.jobs.{}", token(model))
}

/// `onnxchat.v1.jobs.>`: every job subject (the work-queue stream's filter).
pub fn all_jobs() -> String {
    format!("{PREFIX}.{PROTOCOL_VERSION}.jobs.>")
}

/// `onnxchat.v1.frames.<job_id>`: where a job's frames go.
pub fn frames(job_id: &str) -> String {
    format!("{PREFIX}.{PROTOCOL_VERSION}.frames.{}", token(job_id))
}

/// `onnxchat.v1.progress.<job_id>`: where the reader of a job's frames answers progress requests
/// ([`super::ProgressRequest`]; the front end sets it as the job's `progress_to`).
pub fn progress(job_id: &str) -> String {
    format!("{PREFIX}.{PROTOCOL_VERSION}.progress.{}", token(job_id))
}

/// `onnxchat.v1.cancel`: cancellation requests for any job.
pub fn cancel() -> String {
    format!("{PREFIX}.{PROTOCOL_VERSION}.cancel")
}

/// `onnxchat.v1.workers.<worker-token>.jobs`: jobs offered to one worker (core NATS request; the
/// reply is an [`super::OfferReply`]).
pub fn worker_jobs(worker_id: &str) -> String {
    format!(
        "{PREFIX}.{PROTOCOL_VERSION}.workers.{}.jobs",
        token(worker_id)
    )
}

/// `onnxchat.v1.workers.heartbeat`.
pub fn heartbeat() -> String {
    format!("{PREFIX}.{PROTOCOL_VERSION}.workers.heartbeat")
}

/// One subject token for arbitrary text: `[A-Za-z0-9_-]` kept, every other byte as `~XX` (hex), so
/// different names never share a token and `.`, `*`, `>` and spaces cannot break the subject.
pub fn token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("~{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('~');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_safe_and_distinct() {
        assert_eq!(jobs("tiny-gemma3n"), "onnxchat.v1.jobs.tiny-gemma3n");
        assert_eq!(
            token("Gemma-3n-E2B-it-ONNX/Q4_MIXED"),
            "Gemma-3n-E2B-it-ONNX~2FQ4_MIXED"
        );
        assert_ne!(token("a.b"), token("a~2Eb"));
        assert!(!token("a b.*>").contains(['.', ' ', '*', '>']));
        assert_eq!(token(""), "~");
    }
}
