//! The OpenAI-compatible HTTP surface as data: request validation ([`request`]) into a
//! [`request::ValidChatRequest`], its conversion to a wire [`crate::protocol::Job`], and the response
//! bodies ([`response`]).

pub mod request;
pub mod response;

pub use request::{validate, RequestLimits, ValidChatRequest};

use crate::protocol::{subjects, Job};

impl ValidChatRequest {
    /// The job for this request. `seed` is assigned here when the client gave none, so the job is
    /// reproducible wherever (and however often) it runs.
    pub fn into_job(
        self,
        job_id: &str,
        served_model: &str,
        created_ms: u64,
        deadline_ms: Option<u64>,
    ) -> Job {
        let mut sampling = self.sampling;
        if sampling.seed.is_none() {
            sampling.seed = Some(rand_seed());
        }
        Job {
            job_id: job_id.to_string(),
            model: served_model.to_string(),
            reply_to: subjects::frames(job_id),
            created_ms,
            messages: self.messages,
            sampling,
            max_tokens: self.max_tokens,
            stop: self.stop,
            ignore_eos: self.ignore_eos,
            deadline_ms,
        }
    }
}

/// A random seed from a fresh UUID's bits (no extra RNG dependency needed).
fn rand_seed() -> u64 {
    let b = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}
