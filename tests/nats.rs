//! Scale-out over NATS with real processes: a `nats-server` from `.venv`, one `onnx-chat frontend` and
//! two `onnx-chat worker`s on the fixture model. Concurrent mixed requests give the single-process
//! answers, both workers take jobs, the work queue ends empty, a disconnect frees the slot, a job
//! published straight to NATS (the README's example) gets its frames, back-pressure answers 429
//! or 503 with Retry-After, and a stored response (the Responses API) is continued through another
//! front end.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

const MODEL: &str = "tiny-gemma3n";

struct Cluster {
    nats: NatsServer,
    frontend: Proc,
    workers: Vec<Proc>,
    /// Each worker's `--metrics-port`.
    metrics_ports: Vec<u16>,
    base: String,
    _dir: tempfile::TempDir,
}

fn start_cluster(workers: usize, extra_frontend: &[&str], extra_worker: &[&str]) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path());
    let port = free_port();
    let port_s = port.to_string();
    let mut fargs = vec![
        "frontend",
        "--nats-url",
        nats.url.as_str(),
        "--host",
        "127.0.0.1",
        "--port",
        port_s.as_str(),
    ];
    fargs.extend_from_slice(extra_frontend);
    let frontend = Proc::spawn("frontend", &bin(), &fargs, dir.path());
    let fixture = fixture_dir();
    let metrics_ports: Vec<u16> = (0..workers).map(|_| free_port()).collect();
    let metrics_port_s: Vec<String> = metrics_ports.iter().map(|p| p.to_string()).collect();
    let ids: Vec<String> = (0..workers).map(|i| format!("worker{i}")).collect();
    let workers = (0..workers)
        .map(|i| {
            let mut wargs = vec![
                "worker",
                "--worker-id",
                ids[i].as_str(),
                "--metrics-port",
                metrics_port_s[i].as_str(),
                "--nats-url",
                nats.url.as_str(),
                "--model",
                fixture.to_str().unwrap(),
                "--quant",
                "FP32",
                "--served-model-name",
                MODEL,
                "--threads",
                "1",
            ];
            wargs.extend_from_slice(extra_worker);
            Proc::spawn(&format!("worker{i}"), &bin(), &wargs, dir.path())
        })
        .collect();
    Cluster {
        nats,
        frontend,
        workers,
        metrics_ports,
        base: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

impl Cluster {
    async fn ready(&self, workers: u64) {
        let mut procs: Vec<&Proc> = vec![&self.frontend];
        procs.extend(self.workers.iter());
        wait_workers(&self.base, workers, &procs).await;
    }
}

/// Latest heartbeat of each worker, read straight from NATS.
async fn heartbeats(url: &str, wait: Duration) -> HashMap<String, Value> {
    let client = async_nats::connect(url).await.unwrap();
    let mut sub = client
        .subscribe("onnxchat.v1.workers.heartbeat")
        .await
        .unwrap();
    let mut out = HashMap::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        out.insert(v["worker_id"].as_str().unwrap().to_string(), v);
    }
    out
}

async fn stream_messages(url: &str) -> u64 {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut s = js.get_stream("ONNXCHAT_JOBS").await.unwrap();
    s.info().await.unwrap().state.messages
}

fn golden_requests() -> Vec<(Value, String, Vec<u32>)> {
    goldens()
        .into_iter()
        .filter_map(|g| {
            let (ids, text, _) = g.generated("FP32")?;
            let mut body = g.request.clone();
            body["return_token_ids"] = json!(true);
            Some((body, text, ids))
        })
        .collect()
}

async fn post(base: &str, body: &Value) -> (u16, Value, Option<String>) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        retry,
    )
}

async fn post_stream(base: &str, body: &Value) -> (String, Vec<u32>) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data:")))
        .map(|d| serde_json::from_str(d.trim()).unwrap_or(Value::String(d.trim().into())))
        .collect();
    assert_eq!(events.last().unwrap(), &json!("[DONE]"), "{text}");
    let (t, _, _, ids) = collect_stream(&events);
    (t, ids)
}

/// A noisy PNG far above NATS's 1 MB payload limit once base64-encoded.
fn big_png() -> String {
    use base64::Engine;
    let mut state = 12345u32;
    let img = image::RgbImage::from_fn(1100, 1000, |_, _| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
    });
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    assert!(png.len() > 1_500_000);
    base64::engine::general_purpose::STANDARD.encode(png)
}

/// 29 s of a two-tone 16 kHz 16-bit mono WAV, base64 (over 1 MB).
fn big_wav() -> String {
    use base64::Engine;
    let n: u32 = 16000 * 29;
    let mut w = b"RIFF".to_vec();
    w.extend_from_slice(&(36 + 2 * n).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes()); // PCM
    w.extend_from_slice(&1u16.to_le_bytes()); // mono
    w.extend_from_slice(&16000u32.to_le_bytes());
    w.extend_from_slice(&32000u32.to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&(2 * n).to_le_bytes());
    for i in 0..n {
        let t = i as f64 / 16000.0;
        let x = 0.5 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()
            + 0.25 * (2.0 * std::f64::consts::PI * 1234.5 * t).sin();
        w.extend_from_slice(&((x * 32767.0).round() as i16).to_le_bytes());
    }
    let b = base64::engine::general_purpose::STANDARD.encode(w);
    assert!(b.len() > 1 << 20);
    b
}

#[tokio::test(flavor = "multi_thread")]
async fn frontend_and_two_workers_over_nats() {
    let cluster = start_cluster(2, &[], &[]);
    cluster.ready(2).await;
    let base = cluster.base.clone();

    // 40 concurrent requests: every golden (text, images, audio), streaming and not, in turn.
    let reqs = golden_requests();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (body, text, ids) = reqs[i % reqs.len()].clone();
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let (status, r, _) = post(&base, &body).await;
                assert_eq!(status, 200, "{r}");
                assert_eq!(r["choices"][0]["message"]["content"], text);
                assert_eq!(r["choices"][0]["token_ids"], json!(ids));
            } else {
                let mut b = body.clone();
                b["stream"] = json!(true);
                let (t, got_ids) = post_stream(&base, &b).await;
                assert_eq!(t, text);
                assert_eq!(got_ids, ids);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    // An image above the 1 MB payload limit travels through the object store and gives the same
    // answer as in one process.
    let big = json!({"model": MODEL, "temperature": 0, "max_tokens": 8, "return_token_ids": true,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", big_png())}},
            {"type": "text", "text": "What is this?"}]}]});
    let (status, over_nats, _) = post(&base, &big).await;
    assert_eq!(status, 200, "{over_nats}");
    let local = Server::start(vec![model("FP32")]).await;
    let (_, in_process) = local.chat(&big).await;
    local.shutdown().await;
    assert_eq!(
        over_nats["choices"][0]["token_ids"],
        in_process["choices"][0]["token_ids"]
    );

    // Likewise an audio clip above 1 MB (29 s of 16 kHz 16-bit WAV).
    let big_audio = json!({"model": MODEL, "temperature": 0, "max_tokens": 8, "return_token_ids": true,
        "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": big_wav(), "format": "wav"}},
            {"type": "text", "text": "What is this?"}]}]});
    let (status, over_nats, _) = post(&base, &big_audio).await;
    assert_eq!(status, 200, "{over_nats}");
    let local = Server::start(vec![model("FP32")]).await;
    let (_, in_process) = local.chat(&big_audio).await;
    local.shutdown().await;
    assert_eq!(
        over_nats["choices"][0]["token_ids"],
        in_process["choices"][0]["token_ids"]
    );

    // Both workers took jobs; the work queue is empty.
    let hbs = heartbeats(&cluster.nats.url, Duration::from_secs(3)).await;
    assert_eq!(hbs.len(), 2, "{hbs:?}");
    for (id, hb) in &hbs {
        assert!(
            hb["completed"].as_u64().unwrap() > 0,
            "worker {id} served nothing: {hb}"
        );
        assert_eq!(hb["active"], 0);
        assert!(hb["version"].is_string());
    }
    let total: u64 = hbs.values().map(|h| h["completed"].as_u64().unwrap()).sum();
    // Each worker's own /metrics agrees with its heartbeat.
    let mut succeeded = 0;
    for port in &cluster.metrics_ports {
        let m = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let line = m
            .lines()
            .find(|l| l.starts_with("onnxchat_worker_jobs_succeeded_total "))
            .unwrap();
        succeeded += line.split(' ').nth(1).unwrap().parse::<u64>().unwrap();
        assert!(m.contains("onnxchat_worker_slots 8"), "{m}");
    }
    assert_eq!(succeeded, total);
    assert_eq!(total, 42);
    assert_eq!(stream_messages(&cluster.nats.url).await, 0);

    // A client that disconnects mid-stream frees its worker slot at once.
    let mut body = reqs[0].0.clone();
    body["max_tokens"] = json!(3000);
    body["stream"] = json!(true);
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut s = r.bytes_stream();
    let _ = s.next().await;
    let _ = s.next().await;
    // Follow heartbeats (workers also announce right after each job) until both report no active job.
    let nc = async_nats::connect(cluster.nats.url.as_str())
        .await
        .unwrap();
    let mut sub = nc.subscribe("onnxchat.v1.workers.heartbeat").await.unwrap();
    drop(s);
    let t0 = std::time::Instant::now();
    let mut latest: HashMap<String, Value> = HashMap::new();
    let mut freed = false;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        latest.insert(v["worker_id"].as_str().unwrap().to_string(), v);
        if latest.len() == 2 && latest.values().all(|h| h["active"] == 0) {
            freed = true;
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    assert!(freed, "slot not freed after disconnect: {latest:?}");
    let done: u64 = heartbeats(&cluster.nats.url, Duration::from_secs(3))
        .await
        .values()
        .map(|h| h["completed"].as_u64().unwrap())
        .sum();
    assert_eq!(
        done, 43,
        "the cancelled job ended (and was acked, not redelivered)"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stream_messages(&cluster.nats.url).await, 0);

    // The README's example: a job published straight to NATS gets its frames.
    let python = root().join(".venv/bin/python");
    let url = cluster.nats.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(root().join("examples/publish_job.py"))
            .args([url.as_str(), MODEL, "Write a haiku about the sea."])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (_, text, ids) = reqs
        .iter()
        .find(|(b, _, _)| b["messages"][0]["content"] == "Write a haiku about the sea.")
        .unwrap();
    assert_eq!(v["text"], *text);
    assert_eq!(v["usage"]["completion_tokens"], ids.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn full_queue_is_429_and_no_worker_is_503() {
    // No worker at all: 503 with Retry-After.
    let cluster = start_cluster(0, &["--max-queued-jobs", "1"], &[]);
    let c = reqwest::Client::new();
    for _ in 0..200 {
        if c.get(format!("{}/health", cluster.base))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = c
        .get(format!("{}/ready", cluster.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let (status, r, retry) = post(&cluster.base, &body).await;
    assert_eq!(status, 503, "{r}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(r["error"]["type"], "server_error");

    // One single-slot worker and a queue of one job: while the first job runs (it stays in the
    // work queue until acked), the next request gets 429.
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture_dir();
    let w = Proc::spawn(
        "worker",
        &bin(),
        &[
            "worker",
            "--nats-url",
            &cluster.nats.url,
            "--model",
            fixture.to_str().unwrap(),
            "--quant",
            "FP32",
            "--served-model-name",
            MODEL,
            "--threads",
            "1",
            "--max-concurrent",
            "1",
            "--max-queued-jobs",
            "1",
        ],
        dir.path(),
    );
    wait_workers(&cluster.base, 1, &[&cluster.frontend, &w]).await;
    let long = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000,
        "temperature": 0});
    let base = cluster.base.clone();
    let first = tokio::spawn({
        let (b, l) = (base.clone(), long.clone());
        async move { post(&b, &l).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, r, retry) = post(&base, &long).await;
    assert_eq!(status, 429, "{r}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(r["error"]["type"], "rate_limit_error");
    assert_eq!(first.await.unwrap().0, 200);
}

/// A job that no worker finishes is given up by JetStream after `max_deliver` deliveries. Here a
/// stand-in worker takes it, sends one frame and drops it unacked each time, as a worker that crashes
/// on the job would. The client gets a 500 naming the deliveries as soon as JetStream gives up (not
/// after the 120 s idle timeout), and the job leaves the work queue instead of filling it.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_no_worker_finishes_fails_once_its_deliveries_are_used_up() {
    use onnx_chat::bus::nats::{NatsBus, NatsSettings};
    use onnx_chat::bus::Bus;
    use onnx_chat::protocol::{Frame, FrameBody, WorkerHeartbeat, WorkerModel};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    let cluster = start_cluster(0, &[], &[]);
    let settings = NatsSettings {
        url: cluster.nats.url.clone(),
        ack_wait: Duration::from_secs(1),
        max_deliver: 2,
        ..Default::default()
    };
    let bus = NatsBus::connect(settings, "stand-in").await.unwrap();
    let mut source = bus
        .job_source(&[MODEL.to_string()], "stand-in")
        .await
        .unwrap();
    let hb = WorkerHeartbeat {
        worker_id: "stand-in".into(),
        models: vec![WorkerModel {
            name: MODEL.into(),
            aliases: vec![],
            context_length: 4096,
            quant: None,
            vision: false,
            audio: false,
            created: 0,
            prefixes: vec![],
            max_token_bytes: None,
        }],
        max_concurrent: 1,
        active: 0,
        ttl_ms: 3000,
        draining: false,
        version: None,
        completed: 0,
        started_ms: 0,
    };
    let announcer = tokio::spawn({
        let bus = bus.clone();
        async move {
            loop {
                let _ = bus.announce(&hb).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    let deliveries = Arc::new(AtomicU32::new(0));
    let taker = tokio::spawn({
        let (bus, deliveries) = (bus.clone(), deliveries.clone());
        async move {
            loop {
                for d in source.next(1, Duration::from_millis(500)).await.unwrap() {
                    deliveries.fetch_add(1, Ordering::SeqCst);
                    let frame = Frame {
                        job_id: d.job.job_id.clone(),
                        seq: 0,
                        attempt: d.attempt,
                        body: FrameBody::Delta {
                            text: "partial".into(),
                            reasoning: String::new(),
                            token_ids: vec![1],
                            index: 0,
                            logprobs: vec![],
                            tool_calls: vec![],
                        },
                    };
                    bus.publish_frame(&d.job.reply_to, &frame).await.unwrap();
                    drop(d); // neither acked nor handed back: the worker "died"
                }
            }
        }
    });
    wait_workers(&cluster.base, 1, &[&cluster.frontend]).await;

    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let t0 = std::time::Instant::now();
    let (status, r, _) = post(&cluster.base, &body).await;
    let took = t0.elapsed();
    assert_eq!(status, 500, "{r}");
    assert_eq!(r["error"]["type"], "server_error", "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("given up after 2 deliveries"), "{msg}");
    assert_eq!(deliveries.load(Ordering::SeqCst), 2);
    assert!(took < Duration::from_secs(30), "{took:?}");
    // The given-up job was deleted from the work queue.
    let mut left = u64::MAX;
    for _ in 0..50 {
        left = stream_messages(&cluster.nats.url).await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "the given-up job is still queued");
    taker.abort();
    announcer.abort();
}

/// The worker process with id `worker_id` (`start_cluster` names them `worker<i>`, like the process).
fn proc_of<'a>(cluster: &'a mut Cluster, worker_id: &str) -> &'a mut Proc {
    cluster
        .workers
        .iter_mut()
        .find(|p| p.name == worker_id)
        .unwrap_or_else(|| panic!("no worker process {worker_id}"))
}

fn conversation(i: usize) -> Value {
    json!({"model": MODEL, "temperature": 0, "max_tokens": 12, "return_token_ids": true,
        "messages": [{"role": "user", "content": format!("Conversation {i}: describe the sea.")}]})
}

fn add_turn(body: &Value, answer: &str, question: &str) -> Value {
    let mut b = body.clone();
    let msgs = b["messages"].as_array_mut().unwrap();
    msgs.push(json!({"role": "assistant", "content": answer}));
    msgs.push(json!({"role": "user", "content": question}));
    b
}

/// Each next turn of a conversation goes to the worker whose prefix cache holds the previous one
/// (announced in its heartbeats), so it reuses that KV: `cached_tokens > 0` on every later turn,
/// with two workers that would otherwise take turns at random. The answers equal a cache-free run.
#[tokio::test(flavor = "multi_thread")]
async fn next_turns_are_routed_to_the_worker_holding_the_prefix() {
    let cluster = start_cluster(2, &[], &["--max-concurrent", "2"]);
    cluster.ready(2).await;
    let mut turns = 0;
    for i in 0..4 {
        let mut body = conversation(i);
        for turn in 0..3 {
            let (status, r, _) = post(&cluster.base, &body).await;
            assert_eq!(status, 200, "{r}");
            let cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap();
            if turn > 0 {
                assert!(
                    cached > 0,
                    "conversation {i} turn {turn}: not routed to its prefix ({r})"
                );
                turns += 1;
            }
            // The same turn in a scope of its own (no cache to reuse): the same ids.
            let mut fresh = body.clone();
            fresh["cache_salt"] = json!(format!("fresh-{i}-{turn}"));
            let (_, f, _) = post(&cluster.base, &fresh).await;
            assert_eq!(
                f["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
                "{f}"
            );
            assert_eq!(f["choices"][0]["token_ids"], r["choices"][0]["token_ids"]);
            let answer = r["choices"][0]["message"]["content"].as_str().unwrap();
            body = add_turn(&body, answer, "Go on.");
        }
    }
    let m = metrics_text(&cluster.base).await;
    assert!(
        metric(&m, "onnxchat_jobs_routed_total") >= turns as f64,
        "{m}"
    );
}

/// Killing the worker that holds a conversation's prefix while it streams the next turn costs the
/// client nothing: the front end sees its heartbeats stop, queues the job, and another worker
/// finishes it from the start (same tokens; frames already sent are dropped).
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_prefix_holder_mid_turn_still_gives_the_whole_answer() {
    let mut cluster = start_cluster(2, &["--idle-timeout", "60"], &["--max-concurrent", "2"]);
    cluster.ready(2).await;
    let turn1 = conversation(99);
    let (_, r, _) = post(&cluster.base, &turn1).await;
    let answer = r["choices"][0]["message"]["content"].as_str().unwrap();
    let mut turn2 = add_turn(&turn1, answer, "Now tell me a long story.");
    turn2["max_tokens"] = json!(600);
    turn2["ignore_eos"] = json!(true);
    // The reference: the same turn in its own cache scope.
    let mut reference = turn2.clone();
    reference["cache_salt"] = json!("reference");
    let (_, want, _) = post(&cluster.base, &reference).await;
    let want_text = want["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    // Jobs each worker had started before the streamed turn: the one whose count grows runs it.
    let started = |text: &str| metric(text, "onnxchat_worker_jobs_started_total");
    let mut before = Vec::new();
    for &p in &cluster.metrics_ports {
        before.push(started(
            &metrics_text(&format!("http://127.0.0.1:{p}")).await,
        ));
    }
    let mut body = turn2.clone();
    body["stream"] = json!(true);
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", cluster.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The worker running it, from the workers' own counters (a heartbeat, every 2 s, can miss a job
    // this tiny model finishes in well under a second).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let busy = 'found: loop {
        for (i, &p) in cluster.metrics_ports.iter().enumerate() {
            if started(&metrics_text(&format!("http://127.0.0.1:{p}")).await) > before[i] {
                break 'found format!("worker{i}");
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no worker started the job"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut stream = resp.bytes_stream();
    let mut raw = String::new();
    let mut killed = false;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(90), stream.next())
        .await
        .expect("the stream stalled")
    {
        raw.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        if !killed && raw.matches("\"content\"").count() > 20 {
            proc_of(&mut cluster, &busy).kill();
            killed = true;
        }
    }
    assert!(killed, "the answer ended before the kill");
    let events: Vec<Value> = raw
        .split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data:")))
        .map(|d| serde_json::from_str(d.trim()).unwrap_or(Value::String(d.trim().into())))
        .collect();
    assert_eq!(events.last().unwrap(), &json!("[DONE]"), "{raw}");
    let (text, finish, _, _) = collect_stream(&events);
    assert_eq!(finish.as_deref(), Some("length"));
    assert!(text == want_text, "the answer differs after the kill");
    let m = metrics_text(&cluster.base).await;
    assert!(
        metric(&m, "onnxchat_jobs_routed_total") >= 1.0,
        "turn 2 was routed"
    );
}

/// The Responses API's stored state over NATS: a response stored through one front end is read,
/// continued and deleted through another (the JetStream key-value bucket), and an answer larger
/// than the store takes is still answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_response_stored_by_one_frontend_is_continued_by_another() {
    let cluster = start_cluster(1, &[], &[]);
    cluster.ready(1).await;
    let port = free_port();
    let port_s = port.to_string();
    let dir = tempfile::tempdir().unwrap();
    let second = Proc::spawn(
        "frontend2",
        &bin(),
        &[
            "frontend",
            "--nats-url",
            cluster.nats.url.as_str(),
            "--host",
            "127.0.0.1",
            "--port",
            port_s.as_str(),
        ],
        dir.path(),
    );
    let base2 = format!("http://127.0.0.1:{port}");
    wait_workers(&base2, 1, &[&second]).await;
    let client = reqwest::Client::new();
    let first: Value = client
        .post(format!("{}/v1/responses", cluster.base))
        .json(
            &json!({"model": MODEL, "input": "Write a haiku about the sea.",
            "instructions": "Be brief.", "max_output_tokens": 16, "temperature": 0}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = first["id"].as_str().unwrap_or_else(|| panic!("{first}"));
    // Read through the other front end: the same response.
    let got: Value = client
        .get(format!("{base2}/v1/responses/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["output"], first["output"]);
    // Continued through the other front end: the first turn is in the prompt.
    let next: Value = client
        .post(format!("{base2}/v1/responses"))
        .json(
            &json!({"model": MODEL, "previous_response_id": id, "input": "Another.",
            "max_output_tokens": 16, "temperature": 0}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(next["previous_response_id"], id, "{next}");
    let (a, b) = (
        first["usage"]["input_tokens"].as_u64().unwrap(),
        next["usage"]["input_tokens"].as_u64().unwrap(),
    );
    // (The instructions are not carried over; the first answer's 16 tokens are.)
    assert!(b > a, "{a} {b}");
    // Its input items, and deletion seen by the first front end.
    let items: Value = client
        .get(format!(
            "{}/v1/responses/{}/input_items",
            cluster.base,
            next["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        items["data"][0]["content"][0]["text"], "Another.",
        "{items}"
    );
    let r = client
        .delete(format!("{base2}/v1/responses/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{}/v1/responses/{id}", cluster.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    drop(second);
}
