//! Continuous batching on the tiny models, through HTTP: sequences decoded together in one batched
//! decoder run give the greedy ids they give alone (every golden, both families, every quantization
//! whose batched arithmetic is exact), rows join and leave mid-batch (staggered starts, different
//! lengths), a cancelled row leaves the others exact, and a model that cannot batch says why and
//! decodes one sequence at a time, still exact.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{fixture_dir, goldens, init_ort, metric, metrics_text, resolve_dir, Server};
use futures::future::join_all;
use onnx_chat::models::generate::{BatchPolicy, DEFAULT_MAX_BATCH};
use onnx_chat::models::loaded::{LoadOptions, LoadedModel};
use serde_json::{json, Value};

fn smol_dir() -> PathBuf {
    common::root().join("tests/fixtures/tiny-smolvlm")
}

fn load(
    dir: &std::path::Path,
    name: &str,
    quant: &str,
    f: impl FnOnce(&mut LoadOptions),
) -> Arc<LoadedModel> {
    init_ort();
    let mut opts = LoadOptions::default();
    opts.session.intra_threads = 1;
    // No prefix cache: every request computes its whole prompt, as the goldens did.
    opts.kv_cache_bytes = 0;
    f(&mut opts);
    Arc::new(LoadedModel::load(&resolve_dir(dir, name, quant), &opts).expect("fixture loads"))
}

fn gemma(quant: &str) -> Arc<LoadedModel> {
    load(&fixture_dir(), "tiny-gemma3n", quant, |_| {})
}

/// The batched answer's ids are the ones decoded alone. Graphs whose batched kernels sum in another
/// order than their single-row ones (MatMulNBits: a GEMV for one row, a GEMM for several, about 1e-5
/// apart in the logits) may part from the alone ids late in an answer, where the tiny random model has
/// amplified that noise: for them (`exact_for` < the answer's length) the first `exact_for` ids must
/// agree (a batch that mixes rows up parts from the first tokens).
fn same_ids(choice: &Value, want: &[u32], exact_for: usize, what: &str) {
    let got = ids(choice);
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => assert_eq!(
            got.len(),
            want.len(),
            "{what}: batched ids differ from alone"
        ),
        Some(k) => {
            eprintln!("{what}: batched and alone part at step {k}");
            assert!(
                k >= exact_for,
                "{what}: batched ids differ from alone at step {k}:\n  batched {got:?}\n  alone   {want:?}"
            );
        }
    }
}

fn ids(choice: &Value) -> Vec<u32> {
    choice["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_ids in {choice}"))
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// `(name, request, expected ids)` for every Gemma golden that has ids for `quant`.
fn gemma_cases(quant: &str) -> Vec<(String, Value, Vec<u32>)> {
    goldens()
        .into_iter()
        .filter_map(|g| {
            let (want, _, _) = g.expected_for(quant)?;
            let mut body = g.request.clone();
            body["return_token_ids"] = json!(true);
            Some((g.name.clone(), body, want))
        })
        .collect()
}

/// Sends every case at once and checks each answer's ids; returns the worker's batch metrics
/// (runs, row steps).
async fn all_at_once(
    server: &Server,
    what: &str,
    cases: &[(String, Value, Vec<u32>)],
    exact_for: usize,
) -> (f64, f64) {
    assert!(cases.len() >= 2, "{what}: too few cases");
    let before = metrics_text(&server.base).await;
    let answers = join_all(cases.iter().map(|(_, body, _)| server.chat(body))).await;
    for ((name, _, want), (status, resp)) in cases.iter().zip(answers) {
        assert_eq!(status, 200, "{what} {name}: {resp}");
        same_ids(
            &resp["choices"][0],
            want,
            exact_for,
            &format!("{what} {name}"),
        );
    }
    let after = metrics_text(&server.base).await;
    let d = |m: &str| metric(&after, m) - metric(&before, m);
    (
        d("onnxchat_decode_batch_runs_total"),
        d("onnxchat_decode_batch_row_steps_total"),
    )
}

async fn gemma_batched(quant: &str) {
    let model = gemma(quant);
    assert_eq!(model.batching(), Ok(DEFAULT_MAX_BATCH), "{quant} batches");
    let server = Server::start(vec![model]).await;
    let cases = gemma_cases(quant);
    // q4 graphs: the first half of each answer exactly (see `same_ids`).
    let exact_for = if quant.starts_with("Q4") {
        16
    } else {
        usize::MAX
    };
    let (runs, rows) = all_at_once(&server, quant, &cases, exact_for).await;
    assert!(runs > 0.0, "{quant}: no batched runs");
    // Some run held several rows: each round runs one prompt step and one batched decode step, so a
    // stream decoding while the others prefill is joined by them within a few rounds.
    assert!(
        rows > runs,
        "{quant}: runs held {rows} rows in {runs} runs: not batched"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gemma_fp32_batched_equals_alone() {
    gemma_batched("FP32").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gemma_fp16_batched_equals_alone() {
    gemma_batched("FP16").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gemma_q4_batched_equals_alone() {
    gemma_batched("Q4").await;
    gemma_batched("Q4_MIXED").await;
}

/// SmolVLM's goldens (its decoder declares `attention_mask` itself).
fn smol_cases(quant: &str) -> Vec<(String, Value, Vec<u32>)> {
    let dir = common::root().join("tests/fixtures/goldens-smolvlm");
    let index = common::read_json(&dir.join("index.json"));
    let mut out = Vec::new();
    for case in index["cases"].as_array().expect("cases") {
        let name = case["case"].as_str().unwrap();
        let mut body = common::read_json(&dir.join(name).join("request.json"));
        let exp = common::read_json(&dir.join(name).join("expected.json"));
        if exp["processor_overrides"]
            .as_object()
            .is_some_and(|m| !m.is_empty())
        {
            continue; // needs another processor configuration (tests/smolvlm.rs covers it)
        }
        let Some(want) = exp["generated"][quant]["ids"].as_array() else {
            continue;
        };
        body["return_token_ids"] = json!(true);
        let want = want.iter().map(|v| v.as_u64().unwrap() as u32).collect();
        out.push((name.to_string(), body, want));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn smolvlm_batched_equals_alone() {
    let model = load(&smol_dir(), "tiny-smolvlm", "FP32", |_| {});
    assert_eq!(model.batching(), Ok(DEFAULT_MAX_BATCH));
    let server = Server::start(vec![model]).await;
    let cases = smol_cases("FP32");
    let (runs, rows) = all_at_once(&server, "smolvlm FP32", &cases, usize::MAX).await;
    assert!(
        rows > runs,
        "smolvlm: {rows} rows in {runs} runs: not batched"
    );
    server.shutdown().await;
}

/// Rows join and leave while others decode: requests start at different times and stop after
/// different numbers of tokens; each gets the first ids of its answer alone.
#[tokio::test(flavor = "multi_thread")]
async fn rows_join_and_leave_mid_batch() {
    let server = Server::start(vec![gemma("FP32")]).await;
    let cases = gemma_cases("FP32");
    let before = metrics_text(&server.base).await;
    let runs = cases.iter().enumerate().map(|(k, (name, body, want))| {
        let server = &server;
        async move {
            tokio::time::sleep(Duration::from_millis(40 * k as u64)).await;
            let max = [5, 32, 9, 17, 2, 24, 12][k % 7];
            let mut body = body.clone();
            body["max_tokens"] = json!(max);
            let (status, resp) = server.chat(&body).await;
            assert_eq!(status, 200, "{name}: {resp}");
            let n = want.len().min(max);
            assert_eq!(
                ids(&resp["choices"][0]),
                want[..n],
                "{name} (max_tokens {max})"
            );
        }
    });
    join_all(runs).await;
    let after = metrics_text(&server.base).await;
    let rebuilds = metric(&after, "onnxchat_decode_batch_rebuilds_total")
        - metric(&before, "onnxchat_decode_batch_rebuilds_total");
    assert!(
        rebuilds >= 3.0,
        "joins and leaves rebuilt the batch {rebuilds} times"
    );
    server.shutdown().await;
}

/// A client that goes away mid-stream takes its row out; the rows decoding beside it are unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn cancelling_one_row_leaves_the_others_exact() {
    let server = Server::start(vec![gemma("FP32")]).await;
    let cases: Vec<_> = gemma_cases("FP32")
        .into_iter()
        .filter(|c| c.0.starts_with("text"))
        .collect();
    assert!(cases.len() >= 2);
    // The one that goes away: a long answer, read for a few events, then dropped.
    let mut doomed = cases[0].1.clone();
    doomed["stream"] = json!(true);
    doomed["max_tokens"] = json!(400);
    doomed["ignore_eos"] = json!(true);
    let url = server.url("/v1/chat/completions");
    let cancel = async {
        let mut r = reqwest::Client::new()
            .post(&url)
            .json(&doomed)
            .send()
            .await
            .unwrap();
        for _ in 0..3 {
            r.chunk().await.unwrap();
        }
        drop(r);
    };
    let others = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        join_all(cases.iter().map(|(_, b, _)| server.chat(b))).await
    };
    let ((), answers) = tokio::join!(cancel, others);
    for ((name, _, want), (status, resp)) in cases.iter().zip(answers) {
        assert_eq!(status, 200, "{name}: {resp}");
        assert_eq!(
            &ids(&resp["choices"][0]),
            want,
            "{name} beside a cancelled row"
        );
    }
    server.shutdown().await;
}

/// A decoder whose mask is not recognised (here: the rewrite turned off, so Gemma-3n's graph has no
/// attention_mask) is not batched: the model says why, and concurrent requests take turns, exact.
#[tokio::test(flavor = "multi_thread")]
async fn a_graph_without_a_mask_falls_back_to_taking_turns() {
    let model = load(&fixture_dir(), "tiny-gemma3n", "FP32", |o| {
        o.session.add_attention_mask = false;
        // Fused attention takes row lengths instead of a mask: keep the graph as exported.
        o.session.attention_mode = onnx_chat::engine::session::AttentionMode::Unfused;
    });
    let why = model.batching().expect_err("no batching without a mask");
    assert!(why.contains("attention_mask"), "{why}");
    let server = Server::start(vec![model]).await;
    let (runs, _) = all_at_once(&server, "unbatched FP32", &gemma_cases("FP32"), usize::MAX).await;
    assert_eq!(runs, 0.0, "no batched runs");
    server.shutdown().await;
}

/// `_quantized` decoders (dynamic int8 activations) batch only when allowed; batching off by flag.
#[test]
fn inexact_graphs_batch_only_when_allowed() {
    let q = gemma("QUANTIZED");
    let why = q
        .batching()
        .expect_err("QUANTIZED is not batched by default");
    assert!(why.contains("--allow-inexact-batching"), "{why}");
    let allowed = load(&fixture_dir(), "tiny-gemma3n", "QUANTIZED", |o| {
        o.batch.allow_inexact = true;
    });
    assert_eq!(allowed.batching(), Ok(DEFAULT_MAX_BATCH));
    let off = load(&fixture_dir(), "tiny-gemma3n", "FP32", |o| {
        o.batch = BatchPolicy {
            max_rows: 1,
            allow_inexact: false,
        };
    });
    assert!(off.batching().unwrap_err().contains("--max-batch 1"));
    let smol = load(&smol_dir(), "tiny-smolvlm", "UINT8", |_| {});
    assert!(smol.batching().unwrap_err().contains("dynamically"));
}

/// The exported QUANTIZED goldens still hold while it decodes one sequence at a time, concurrently.
#[tokio::test(flavor = "multi_thread")]
async fn quantized_concurrent_stays_exact() {
    let server = Server::start(vec![gemma("QUANTIZED")]).await;
    let cases = gemma_cases("QUANTIZED");
    let (runs, _) = all_at_once(&server, "QUANTIZED", &cases, usize::MAX).await;
    assert_eq!(runs, 0.0);
    server.shutdown().await;
}
