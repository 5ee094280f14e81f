//! Fused attention with the KV cache written in place (issue 26), on prompts longer than the sliding
//! window (16 positions in the tiny Gemmas) and longer than a buffer's first capacity (so sliding-window
//! buffers are trimmed and full ones grow): the greedy ids equal the graph-as-exported's
//! (`--attention unfused`, whole prompt in one run, no prefix cache), cold (chunked prefill), with a
//! warm prefix cache (the same prompt again, and a follow-up turn), and decoded alone and in a batch.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{init_ort, metric, metrics_text, resolve_dir, Server};
use futures::future::join_all;
use onnx_chat::engine::session::AttentionMode;
use onnx_chat::models::loaded::{LoadOptions, LoadedModel};
use serde_json::{json, Value};

const NEW_TOKENS: u32 = 48;

fn load(
    dir: &Path,
    name: &str,
    mode: AttentionMode,
    cache: bool,
    max_batch: usize,
) -> Arc<LoadedModel> {
    init_ort();
    let mut opts = LoadOptions::default();
    opts.session.intra_threads = 1;
    opts.session.attention_mode = mode;
    if cache {
        opts.kv_cache_bytes = 256 << 20;
        opts.prefill_chunk = 96;
    } else {
        opts.kv_cache_bytes = 0;
        opts.prefill_chunk = 1 << 20;
    }
    opts.batch.max_rows = max_batch;
    Arc::new(LoadedModel::load(&resolve_dir(dir, name, "FP32"), &opts).expect("fixture loads"))
}

/// A user turn of about `words` words that no other prompt of the test starts with.
fn long_text(seed: usize, words: usize) -> String {
    let vocab = [
        "river", "stone", "light", "orbit", "maple", "signal", "harbor", "copper", "violet",
        "engine", "meadow", "quartz", "lantern", "pixel", "thunder", "saddle",
    ];
    let mut out = format!("Story {seed}:");
    for i in 0..words {
        out.push(' ');
        out.push_str(vocab[(i * 7 + seed * 3 + i / 5) % vocab.len()]);
    }
    out
}

fn request(name: &str, messages: Value) -> Value {
    json!({"model": name, "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0,
           "return_token_ids": true})
}

fn ids(resp: &Value) -> Vec<u64> {
    resp["choices"][0]["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_ids in {resp}"))
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

async fn answer(server: &Server, body: &Value) -> Value {
    let (status, resp) = server.chat(body).await;
    assert_eq!(status, 200, "{resp}");
    resp
}

async fn long_prompts_equal_the_exported_graph(dir: &Path, name: &str) {
    let reference = Server::start(vec![load(dir, name, AttentionMode::Unfused, false, 1)]).await;
    let fused_model = load(dir, name, AttentionMode::Auto, true, 4);
    assert!(fused_model.fused_attention(), "{name}: attention not fused");
    let fused = Server::start(vec![fused_model]).await;

    // Alone, cold: prompts past the window and past a first buffer (256 positions).
    let first = request(
        name,
        json!([{"role": "user", "content": long_text(1, 420)}]),
    );
    let want = ids(&answer(&reference, &first).await);
    let cold = answer(&fused, &first).await;
    let prompt_tokens = cold["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt_tokens > 300,
        "{name}: only {prompt_tokens} prompt tokens"
    );
    assert_eq!(
        ids(&cold),
        want,
        "{name}: fused cold differs from the exported graph"
    );

    // Warm: the same prompt again comes from the prefix cache (trimmed sliding-window buffers).
    let hits = |t: &str| metric(t, "onnxchat_prefix_cache_hit_tokens_total");
    let before = hits(&metrics_text(&fused.base).await);
    assert_eq!(
        ids(&answer(&fused, &first).await),
        want,
        "{name}: warm differs"
    );
    let reused = hits(&metrics_text(&fused.base).await) - before;
    assert!(
        reused >= (prompt_tokens - 2) as f64,
        "{name}: {reused} of {prompt_tokens} prompt positions from the prefix cache"
    );

    // A follow-up turn on top of the first answer: reuses the conversation so far (up to where the
    // template renders the first turn differently once it is not the last: a few positions).
    let text = cold["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let follow = request(
        name,
        json!([{"role": "user", "content": long_text(1, 420)},
               {"role": "assistant", "content": text},
               {"role": "user", "content": long_text(2, 60)}]),
    );
    let want_follow = ids(&answer(&reference, &follow).await);
    let before = hits(&metrics_text(&fused.base).await);
    let got = ids(&answer(&fused, &follow).await);
    assert_eq!(got, want_follow, "{name}: follow-up differs");
    let reused = hits(&metrics_text(&fused.base).await) - before;
    assert!(
        reused >= (prompt_tokens - 16) as f64,
        "{name}: the follow-up reused only {reused} positions of the conversation ({prompt_tokens} in the first prompt)"
    );

    // Batched: three different long prompts at once, each as the exported graph gives it alone.
    let bodies: Vec<Value> = (3..6)
        .map(|s| {
            request(
                name,
                json!([{"role": "user", "content": long_text(s, 300 + 40 * s)}]),
            )
        })
        .collect();
    let mut wants = Vec::new();
    for b in &bodies {
        wants.push(ids(&answer(&reference, b).await));
    }
    let rows = |t: &str| metric(t, "onnxchat_decode_batch_row_steps_total");
    let runs = |t: &str| metric(t, "onnxchat_decode_batch_runs_total");
    let before = metrics_text(&fused.base).await;
    let got = join_all(bodies.iter().map(|b| answer(&fused, b))).await;
    let after = metrics_text(&fused.base).await;
    for (i, (g, w)) in got.iter().zip(&wants).enumerate() {
        assert_eq!(&ids(g), w, "{name}: batched prompt {i} differs");
    }
    assert!(
        rows(&after) - rows(&before) > runs(&after) - runs(&before),
        "{name}: the prompts were not decoded in one batch"
    );
    reference.shutdown().await;
    fused.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gemma3n_long_prompts_fused_equal_exported() {
    long_prompts_equal_the_exported_graph(&common::fixture_dir(), "tiny-gemma3n").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gemma4_long_prompts_fused_equal_exported() {
    let dir = common::root().join("tests/fixtures/tiny-gemma4");
    long_prompts_equal_the_exported_graph(&dir, "tiny-gemma4").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn smolvlm_long_prompts_fused_equal_exported() {
    let dir = common::root().join("tests/fixtures/tiny-smolvlm");
    long_prompts_equal_the_exported_graph(&dir, "tiny-smolvlm").await;
}
