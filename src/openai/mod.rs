//! The OpenAI-compatible HTTP surface as data: request validation ([`request`]) into a
//! [`request::ValidChatRequest`], its conversion to a wire [`crate::protocol::Job`], and the response
//! bodies ([`response`]); the Responses API ([`responses`]) parses into the same request.

pub mod completions;
pub mod request;
pub mod response;
pub mod responses;

pub use request::{validate, RequestLimits, ValidChatRequest};

use crate::protocol::{subjects, Job};

impl ValidChatRequest {
    /// The job for this request. `seed` is assigned here when the client gave none, so the job is
    /// reproducible wherever (and however often) it runs. `api_key` is the key the request was
    /// authenticated with: with `cache_salt` it makes the job's prefix-cache scope.
    pub fn into_job(
        self,
        job_id: &str,
        served_model: &str,
        created_ms: u64,
        deadline_ms: Option<u64>,
        api_key: Option<&str>,
    ) -> Job {
        let cache_scope = cache_scope(api_key, self.cache_salt.as_deref());
        let mut sampling = self.sampling;
        if sampling.seed.is_none() {
            sampling.seed = Some(rand_seed());
        }
        Job {
            job_id: job_id.to_string(),
            model: served_model.to_string(),
            reply_to: subjects::frames(job_id),
            // The bus sets it: it answers the progress requests.
            progress_to: None,
            created_ms,
            messages: self.messages,
            sampling,
            max_tokens: self.max_tokens,
            stop: self.stop,
            ignore_eos: self.ignore_eos,
            deadline_ms,
            n: (self.n > 1).then_some(self.n),
            cache_scope,
            prompt: None,
            prompt_token_ids: Vec::new(),
            response_format: self.response_format,
            tools: self.tools,
            tool_choice: self.tool_choice,
            parallel_tool_calls: self.parallel_tool_calls,
            logprobs: self.logprobs,
            logit_bias: self.logit_bias,
            chat_template_kwargs: self.chat_template_kwargs,
            clamp_max_tokens: false,
            count_only: false,
        }
    }
}

/// The prefix-cache scope of a request: none (shared) without key and salt, else a hash of both, so
/// neither travels in the clear and tenants (keys) and salts never share cached KV.
pub fn cache_scope(api_key: Option<&str>, salt: Option<&str>) -> Option<String> {
    use sha2::{Digest, Sha256};
    if api_key.is_none() && salt.is_none() {
        return None;
    }
    let mut h = Sha256::new();
    for part in [api_key, salt] {
        match part {
            Some(p) => {
                h.update([1]);
                h.update((p.len() as u64).to_le_bytes());
                h.update(p.as_bytes());
            }
            None => h.update([0]),
        }
    }
    Some(
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// A random seed from a fresh UUID's bits (no extra RNG dependency needed).
pub(crate) fn rand_seed() -> u64 {
    let b = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

#[cfg(test)]
mod tests {
    #[test]
    fn scopes_separate_keys_and_salts() {
        use super::cache_scope;
        assert_eq!(cache_scope(None, None), None);
        let a = cache_scope(Some("k1"), None);
        assert_eq!(a, cache_scope(Some("k1"), None));
        assert_ne!(a, cache_scope(Some("k2"), None));
        assert_ne!(a, cache_scope(None, Some("k1")));
        assert_ne!(a, cache_scope(Some("k1"), Some("s")));
        assert_ne!(
            cache_scope(Some("ab"), Some("c")),
            cache_scope(Some("a"), Some("bc"))
        );
    }
}
