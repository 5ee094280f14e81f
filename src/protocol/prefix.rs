//! Conversation digests: how a worker says which conversations its prefix cache holds (in its
//! heartbeats), and how a front end finds the worker holding the longest prefix of a request.
//!
//! A digest names a conversation prefix: messages `0..k` of a job for one model under one cache
//! scope. It is a chain, so a request's digests for every `k` cost one pass over its messages:
//!
//! ```text
//! d_0 = SHA-256("onnxchat-prefix-v1" 0x00 scope 0x00 model)
//! d_k = SHA-256(d_{k-1} ‖ JSON(messages[k-1]))      JSON: the job's wire form of the message
//! digest_k = the first 8 bytes of d_k as 16 lowercase hex digits
//! ```
//!
//! After a job a worker announces `digest_n` of the job's messages and, per choice, the digest of
//! the messages plus the answer as a client sends it back (`{"role": "assistant", "content":
//! [{"type": "text", "text": answer}]}`), for as long as its prefix cache holds that KV.

use sha2::{Digest, Sha256};

use super::{ChatMessage, Role};

/// One link of the chain.
pub type ChainState = [u8; 32];

pub fn chain_start(scope: &str, model: &str) -> ChainState {
    let mut h = Sha256::new();
    h.update(b"onnxchat-prefix-v1\0");
    h.update(scope.as_bytes());
    h.update([0]);
    h.update(model.as_bytes());
    h.finalize().into()
}

pub fn chain_next(prev: &ChainState, message: &ChatMessage) -> ChainState {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(serde_json::to_vec(message).unwrap_or_default());
    h.finalize().into()
}

/// The digest text of a chain state.
pub fn digest(state: &ChainState) -> String {
    state[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The chain state after all of `messages`.
pub fn chain(scope: &str, model: &str, messages: &[ChatMessage]) -> ChainState {
    messages
        .iter()
        .fold(chain_start(scope, model), |s, m| chain_next(&s, m))
}

/// `digest_k` for `k = 1 ..= messages.len()`, in that order.
pub fn digests(scope: &str, model: &str, messages: &[ChatMessage]) -> Vec<String> {
    let mut s = chain_start(scope, model);
    messages
        .iter()
        .map(|m| {
            s = chain_next(&s, m);
            digest(&s)
        })
        .collect()
}

/// The digest of the conversation after `state` continued by an assistant answer `text`.
pub fn answer_digest(state: &ChainState, text: &str) -> String {
    digest(&chain_next(
        state,
        &ChatMessage::text(Role::Assistant, text),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, text: &str) -> ChatMessage {
        ChatMessage::text(role, text)
    }

    #[test]
    fn the_next_turn_starts_with_the_answer_digest() {
        let turn1 = vec![msg(Role::User, "hi")];
        let s = chain("", "m", &turn1);
        let held = answer_digest(&s, "hello!");
        let mut turn2 = turn1.clone();
        turn2.push(msg(Role::Assistant, "hello!"));
        turn2.push(msg(Role::User, "more"));
        let d = digests("", "m", &turn2);
        assert_eq!(d.len(), 3);
        assert_eq!(d[0], digest(&s));
        assert_eq!(d[1], held);
        assert_ne!(d[2], held);
        assert_eq!(held.len(), 16);
        // Scope and model are part of the name.
        assert_ne!(digests("k", "m", &turn2)[1], held);
        assert_ne!(digests("", "m2", &turn2)[1], held);
    }
}
