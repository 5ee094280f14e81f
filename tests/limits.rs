//! Cheap refusals before expensive work: a prompt far longer than the context (a 30 MB message to
//! the tiny fixture, whose context is 4 096 tokens) is refused with a 400 from its byte count, by all
//! three HTTP APIs and by a worker taking the job straight from NATS, in well under a second and
//! without the memory a full tokenization takes (it used to cost 26 s of CPU and 3.7 GB on a
//! 2 048-token model). Times are the best of three sends, so a busy CI machine does not fail them;
//! memory is the server's peak (`VmHWM`, reset through `clear_refs` before each send) over its
//! resident size before.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const MODEL: &str = "tiny-gemma3n";

/// The two process tests time requests: one at a time, so that one's model load does not slow the
/// other's measurements.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// 6 million words: 30 MB.
const WORDS: usize = 6_000_000;

fn status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"))
}

/// Resets the process' peak resident size to its current one (Linux `clear_refs` 5).
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

fn huge_text() -> String {
    "word ".repeat(WORDS)
}

/// The four bodies, each carrying the huge text where its API keeps prompt text.
fn bodies(text: &str) -> Vec<(&'static str, Vec<u8>)> {
    let b = |v: Value| serde_json::to_vec(&v).unwrap();
    vec![
        (
            "/v1/chat/completions",
            b(json!({"model": MODEL, "max_tokens": 4,
                     "messages": [{"role": "user", "content": text}]})),
        ),
        (
            "/v1/completions",
            b(json!({"model": MODEL, "max_tokens": 4, "prompt": text})),
        ),
        (
            "/v1/responses",
            b(json!({"model": MODEL, "max_output_tokens": 4, "input": text})),
        ),
        (
            "/v1/messages",
            b(json!({"model": MODEL, "max_tokens": 4,
                     "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]})),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_mb_prompt_is_refused_at_once_by_every_api() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let port_s = port.to_string();
    let server = spawn_fixture(
        "serve",
        "serve",
        dir.path(),
        &["--quant", "FP32", "--host", "127.0.0.1", "--port", &port_s],
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_workers(&base, 1, &[&server]).await;
    let pid = server.child.id();
    let client = reqwest::Client::new();
    let text = huge_text();
    let bodies = bodies(&text);
    // One untimed send first: the process' first 30 MB buffers fault their pages in (~25 ms).
    let warm = client
        .post(format!("{base}{}", bodies[0].0))
        .header("content-type", "application/json")
        .body(bodies[0].1.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 400);
    for (path, body) in bodies {
        let size = body.len() as u64;
        let mut best = Duration::MAX;
        let mut growth_kb = 0;
        for _ in 0..3 {
            let rss = status_kb(pid, "VmRSS:");
            reset_peak(pid);
            let t = Instant::now();
            let r = client
                .post(format!("{base}{path}"))
                .header("content-type", "application/json")
                .header("anthropic-version", "2023-06-01")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            best = best.min(t.elapsed());
            growth_kb = growth_kb.max(status_kb(pid, "VmHWM:").saturating_sub(rss));
            assert_eq!(status, 400, "{path}: {v}");
            let message = v["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("at least"), "{path}: {v}");
            assert!(message.contains("context length 4096"), "{path}: {v}");
            if path == "/v1/messages" {
                assert_eq!(v["type"], "error", "{v}");
                assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            } else {
                assert_eq!(v["error"]["code"], "context_length_exceeded", "{path}: {v}");
                let param = if path == "/v1/completions" {
                    "prompt"
                } else if path == "/v1/responses" {
                    "input"
                } else {
                    "messages"
                };
                assert_eq!(v["error"]["param"], param, "{path}: {v}");
            }
        }
        eprintln!(
            "{path}: {size} bytes refused in {:.1} ms (best of 3), peak RSS growth {:.1} MB",
            best.as_secs_f64() * 1e3,
            growth_kb as f64 / 1024.0
        );
        assert!(
            best < Duration::from_millis(100),
            "{path}: refused in {best:?}"
        );
        assert!(
            growth_kb * 1024 < 2 * size,
            "{path}: peak RSS grew by {growth_kb} kB for a {size}-byte body"
        );
    }
    // The server is fine afterwards.
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": MODEL, "max_tokens": 2,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A job published to NATS directly (no front end to refuse it): the worker refuses it from its
/// byte count before rendering or tokenizing, and answers an error frame at once. Memory: the job
/// itself (payload and parsed text) and, for the first one, the client's read buffer growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_job_from_nats_is_refused_by_the_worker_at_once() {
    let _serial = SERIAL.lock().await;
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path());
    let worker = spawn_fixture(
        "worker",
        "worker",
        dir.path(),
        &["--quant", "FP32", "--nats-url", &nats.url],
    );
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut hb = client
        .subscribe(onnx_chat::protocol::subjects::heartbeat())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(120), hb.next())
        .await
        .unwrap_or_else(|_| panic!("no heartbeat:\n{}", worker.output()))
        .unwrap();
    let hb: onnx_chat::protocol::WorkerHeartbeat = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(hb.models[0].max_token_bytes, Some(18), "{hb:?}");
    let js = async_nats::jetstream::new(client.clone());
    let pid = worker.child.id();
    // Under NATS' default 1 MB payload limit, and still 12 times what the context can take.
    let text = "word ".repeat(180_000);
    let mut best = Duration::MAX;
    let mut growth_kb = 0;
    for i in 0..3 {
        let job_id = format!("oversized-{i}");
        let reply_to = onnx_chat::protocol::subjects::frames(&job_id);
        let job = json!({
            "job_id": job_id, "model": MODEL, "reply_to": reply_to,
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
            "max_tokens": 4,
        });
        let payload = serde_json::to_vec(&job).unwrap();
        let mut frames = client.subscribe(reply_to).await.unwrap();
        client.flush().await.unwrap();
        let rss = status_kb(pid, "VmRSS:");
        reset_peak(pid);
        let t = Instant::now();
        js.publish(
            onnx_chat::protocol::subjects::jobs(MODEL),
            payload.clone().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let m = tokio::time::timeout(Duration::from_secs(30), frames.next())
            .await
            .unwrap_or_else(|_| panic!("no frame:\n{}", worker.output()))
            .unwrap();
        best = best.min(t.elapsed());
        let g = status_kb(pid, "VmHWM:").saturating_sub(rss);
        eprintln!("attempt {i}: {:?}, peak RSS growth {g} kB", t.elapsed());
        growth_kb = growth_kb.max(g);
        let f: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(f["type"], "error", "{f}");
        assert_eq!(f["error"]["class"], "context_length_exceeded", "{f}");
        assert_eq!(f["error"]["param"], "messages", "{f}");
        if i == 2 {
            eprintln!(
                "NATS job of {} bytes refused in {:.1} ms (best of 3), peak RSS growth {:.1} MB",
                payload.len(),
                best.as_secs_f64() * 1e3,
                growth_kb as f64 / 1024.0
            );
            assert!(best < Duration::from_millis(100), "refused in {best:?}");
            // The first job grows the NATS client's read buffer once (~3 MB here); later ones
            // add next to nothing. No rendering or tokenizing buffers show up at all.
            assert!(
                growth_kb * 1024 < 4 * payload.len() as u64,
                "peak RSS grew by {growth_kb} kB for a {}-byte job",
                payload.len()
            );
        }
    }
}

/// Where no byte bound applies, the sliced count stops soon after the limit: a megabyte of text is
/// found to be over 4 095 tokens after tokenizing about that many, and a short text's count is
/// exact.
#[test]
fn the_sliced_count_stops_past_the_limit() {
    use onnx_chat::pipeline::prompt_size::tokens_at_least;
    let tok = tokenizers::Tokenizer::from_file(fixture_dir().join("tokenizer.json")).unwrap();
    let short = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let exact = tok.encode(short.as_str(), false).unwrap().len();
    assert_eq!(tokens_at_least(&tok, &short, 100_000), exact);
    let long = "word ".repeat(200_000);
    let t = Instant::now();
    let n = tokens_at_least(&tok, &long, 4095);
    let took = t.elapsed();
    assert!(n > 4095, "{n}");
    assert!(n < 4095 + 20_000, "counted far past the limit: {n}");
    eprintln!("1 MB counted past 4 095 tokens in {took:?} ({n} tokens)");
    let true_count = tok.encode(long.as_str(), false).unwrap().len();
    assert!(n <= true_count, "{n} > {true_count}");
}
