//! Shared helpers of the integration tests: fixture paths and goldens, loading the tiny model, and
//! starting the real server (front end + worker over the in-process bus) on 127.0.0.1:0.
#![allow(dead_code)]

pub mod hub;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use onnx_chat::models::loaded::{LoadOptions, LoadedModel};
use onnx_chat::models::resolve::{self, ModelSpec, ResolvedModel};
use onnx_chat::worker::WorkerConfig;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture_dir() -> PathBuf {
    root().join("tests/fixtures/tiny-gemma3n")
}

pub fn goldens_dir() -> PathBuf {
    root().join("tests/fixtures/goldens")
}

pub fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// One golden case: the request body and the expected outputs.
pub struct Golden {
    pub name: String,
    pub kind: String,
    pub request: Value,
    pub expected: Value,
    pub dir: PathBuf,
}

impl Golden {
    /// What greedy decoding must give for `quant`: the transformers golden for FP32; for the other
    /// variants the reference loop on this machine ([`ort_reference`]), with the golden's text where
    /// the ids agree and otherwise the tokenizer's decoding of the reference ids.
    pub fn expected_for(&self, quant: &str) -> Option<(Vec<u32>, String, String)> {
        let golden = self.generated(quant)?;
        if quant == "FP32" {
            return Some(golden);
        }
        let ids: Vec<u32> = ort_reference()[&self.name][quant]
            .as_array()?
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        if ids == golden.0 {
            return Some(golden);
        }
        eprintln!(
            "{} {quant}: this CPU's onnxruntime gives other ids than the committed golden (kernel rounding); comparing with the reference loop run here",
            self.name
        );
        let tok = tokenizers::Tokenizer::from_file(fixture_dir().join("tokenizer.json")).unwrap();
        let text = tok.decode(&ids, true).unwrap();
        let finish = if ids.last().is_some_and(|t| [1, 106].contains(t)) {
            "stop"
        } else {
            "length"
        };
        Some((ids, text, finish.to_string()))
    }

    pub fn generated(&self, quant: &str) -> Option<(Vec<u32>, String, String)> {
        let g = self.expected.get("generated")?.get(quant)?;
        let ids = g["ids"]
            .as_array()?
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        Some((
            ids,
            g["text"].as_str()?.to_string(),
            g["finish_reason"].as_str()?.to_string(),
        ))
    }

    pub fn prompt_ids(&self) -> Vec<u32> {
        self.expected["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    }
}

pub fn goldens() -> Vec<Golden> {
    goldens_in(&goldens_dir())
}

/// The cases of the goldens folder `root` (its `index.json` lists them).
pub fn goldens_in(root: &Path) -> Vec<Golden> {
    let index = read_json(&root.join("index.json"));
    let cases = index["cases"].as_array().expect("index.json has cases");
    cases
        .iter()
        .map(|c| {
            let name = c["case"]
                .as_str()
                .or_else(|| c["name"].as_str())
                .unwrap()
                .to_string();
            let dir = root.join(&name);
            let expected = read_json(&dir.join("expected.json"));
            Golden {
                kind: expected["kind"].as_str().unwrap_or("text").to_string(),
                request: read_json(&dir.join("request.json")),
                expected,
                dir,
                name,
            }
        })
        .collect()
}

/// Greedy ids of the Python onnxruntime reference loop (`tools/fixtures/ort_reference.py`) on this
/// machine, by case and quantization (FP16, QUANTIZED, Q4_MIXED, Q4), run once per test binary.
/// ONNX Runtime's int8/int4 kernels round differently on different CPUs (AVX2, AVX-512 VNNI), so
/// the quantized variants are compared with the reference run here, on the same CPU.
pub fn ort_reference() -> &'static Value {
    static REF: OnceLock<Value> = OnceLock::new();
    REF.get_or_init(|| {
        python_json(
            "tools/fixtures/ort_reference.py",
            &[root().join("tests/fixtures").into()],
        )
    })
}

/// Runs a script of the repository (`script`, relative to its root) with the project's `.venv`
/// Python and returns the JSON it prints; fails the test with the script's stderr otherwise.
pub fn python_json(script: &str, args: &[std::ffi::OsString]) -> Value {
    let out = std::process::Command::new(root().join(".venv/bin/python"))
        .arg(root().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {script} (make setup provisions .venv): {e}"));
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{script} prints JSON: {e}"))
}

/// [`python_json`] of `script BASE MODEL` (an SDK script driving the server at `base`), off the
/// async runtime (the script calls the server this runtime serves).
pub async fn sdk_json(script: &'static str, base: &str, model: &str) -> Value {
    let args: Vec<std::ffi::OsString> = vec![base.into(), model.into()];
    tokio::task::spawn_blocking(move || python_json(script, &args))
        .await
        .unwrap()
}

/// The Prometheus text of `{base}/metrics`.
pub async fn metrics_text(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of an unlabelled metric in Prometheus text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
        .parse()
        .unwrap()
}

/// Quantization names with goldens.
pub const QUANTS: &[&str] = &["FP32", "FP16", "QUANTIZED", "Q4_MIXED", "Q4"];

pub fn init_ort() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        onnx_chat::engine::runtime::init(None).expect("ONNX Runtime (run `make setup` first)");
    });
}

pub fn resolve_fixture(quant: &str) -> ResolvedModel {
    let spec = ModelSpec::parse(fixture_dir().to_str().unwrap(), Some(quant)).unwrap();
    let hub = onnx_chat::models::hub::HubConfig::from_vars(|_| None);
    // Resolution is async (it may download); a local directory needs no I/O beyond listing, so run it on
    // a scratch runtime in its own thread, callable from sync and async tests alike.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(resolve::resolve(&spec, Some("tiny-gemma3n"), &hub))
            .unwrap()
    })
    .join()
    .unwrap()
}

/// A local snapshot directory resolved under `quant`, served as `name`.
pub fn resolve_dir(dir: &Path, name: &str, quant: &str) -> ResolvedModel {
    let spec = ModelSpec::parse(dir.to_str().unwrap(), Some(quant)).unwrap();
    let hub = onnx_chat::models::hub::HubConfig::from_vars(|_| None);
    let name = name.to_string();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(resolve::resolve(&spec, Some(&name), &hub))
            .unwrap()
    })
    .join()
    .unwrap()
}

/// Engine settings a test varies: prefix cache budget, prefill chunk, inexact reuse.
#[derive(Debug, Clone, Copy)]
pub struct EngineOpts {
    pub kv_cache_bytes: usize,
    pub prefill_chunk: usize,
    pub allow_inexact: bool,
}

impl EngineOpts {
    /// The reference way: no prefix cache, every prompt in one piece.
    pub const ONE_SHOT: Self = Self {
        kv_cache_bytes: 0,
        prefill_chunk: 1 << 20,
        allow_inexact: false,
    };

    pub fn cached(prefill_chunk: usize) -> Self {
        Self {
            kv_cache_bytes: 256 << 20,
            prefill_chunk,
            allow_inexact: false,
        }
    }
}

/// Loads a resolved model with `e` (one intra-op thread, like the other fixtures); not shared.
pub fn load_with(model: &ResolvedModel, e: EngineOpts) -> Arc<LoadedModel> {
    init_ort();
    let mut opts = LoadOptions::default();
    opts.session.intra_threads = 1;
    opts.kv_cache_bytes = e.kv_cache_bytes;
    opts.prefill_chunk = e.prefill_chunk;
    opts.allow_inexact_reuse = e.allow_inexact;
    Arc::new(LoadedModel::load(model, &opts).expect("fixture loads"))
}

/// Loads the fixture model once per quantization per test binary.
pub fn model(quant: &str) -> Arc<LoadedModel> {
    static MODELS: OnceLock<std::sync::Mutex<std::collections::HashMap<String, Arc<LoadedModel>>>> =
        OnceLock::new();
    init_ort();
    let map = MODELS.get_or_init(Default::default);
    let mut m = map.lock().unwrap();
    m.entry(quant.to_string())
        .or_insert_with(|| {
            let mut opts = LoadOptions::default();
            opts.session.intra_threads = 1;
            Arc::new(LoadedModel::load(&resolve_fixture(quant), &opts).expect("fixture loads"))
        })
        .clone()
}

/// A running `serve` (front end + worker, in-process bus) on an ephemeral port.
pub struct Server {
    pub base: String,
    pub stop: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    pub async fn start(models: Vec<Arc<LoadedModel>>) -> Self {
        Self::start_with(models, onnx_chat::frontend::FrontendConfig::default()).await
    }

    pub async fn start_with(
        models: Vec<Arc<LoadedModel>>,
        cfg: onnx_chat::frontend::FrontendConfig,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let handle = tokio::spawn(onnx_chat::app::serve(
            models,
            cfg,
            WorkerConfig::default(),
            listener,
            stop.clone(),
        ));
        let s = Self { base, stop, handle };
        s.wait_ready().await;
        s
    }

    pub async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = client.get(format!("{}/ready", self.base)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("server at {} never became ready", self.base);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn chat(&self, body: &Value) -> (u16, Value) {
        self.post("/v1/chat/completions", body).await
    }

    /// POSTs `body` to `path`: the status and the JSON answer.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A streaming request: the parsed `data:` payloads, in order (`[DONE]` as a string).
    pub async fn chat_stream(&self, body: &Value) -> (u16, Vec<Value>) {
        self.post_stream("/v1/chat/completions", body).await
    }

    /// A streaming POST to `path`: the parsed `data:` payloads, in order (`[DONE]` as a string).
    pub async fn post_stream(&self, path: &str, body: &Value) -> (u16, Vec<Value>) {
        let r = reqwest::Client::new()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        if status != 200 {
            return (
                status,
                vec![serde_json::from_str(&text).unwrap_or(Value::String(text))],
            );
        }
        let events = text
            .split("\n\n")
            .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data:")))
            .map(|d| {
                let d = d.trim();
                serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.to_string()))
            })
            .collect();
        (status, events)
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), self.handle).await;
    }
}

/// Concatenated content of streamed chunks, the finish reason, and the usage chunk if any.
pub fn collect_stream(events: &[Value]) -> (String, Option<String>, Option<Value>, Vec<u32>) {
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    let mut ids = Vec::new();
    for ev in events {
        if let Some(choices) = ev.get("choices").and_then(Value::as_array) {
            for c in choices {
                if let Some(t) = c["delta"]["content"].as_str() {
                    text.push_str(t);
                }
                if let Some(tids) = c["delta"]["token_ids"].as_array() {
                    ids.extend(tids.iter().map(|v| v.as_u64().unwrap() as u32));
                }
                if let Some(f) = c["finish_reason"].as_str() {
                    finish = Some(f.to_string());
                }
            }
        }
        if let Some(u) = ev.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
    }
    (text, finish, usage, ids)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped; its output goes to a log file shown on failure.
pub struct Proc {
    pub child: std::process::Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[&str], dir: &Path) -> Self {
        Self::spawn_env(name, program, args, dir, &[])
    }

    /// As [`Self::spawn`], with `env` added to the inherited environment.
    pub fn spawn_env(
        name: &str,
        program: &Path,
        args: &[&str],
        dir: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(program)
            .args(args)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .env("ONNX_CHAT_LOG", "info")
            .envs(env.iter().copied())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self {
            child,
            log,
            name: name.to_string(),
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as an orchestrator stops a service.
    pub fn terminate(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.name, self.output());
        }
        self.kill();
    }
}

/// A real nats-server (from `.venv`) with JetStream on a free port and a temporary store.
pub struct NatsServer {
    pub proc: Proc,
    pub url: String,
    pub port: u16,
    pub store: PathBuf,
    pub dir: PathBuf,
}

pub fn nats_server_bin() -> PathBuf {
    let p = std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/nats-server"));
    assert!(p.exists(), "{} missing: run `make setup`", p.display());
    p
}

impl NatsServer {
    pub fn start(dir: &Path) -> Self {
        Self::start_on(dir, free_port(), &dir.join("jetstream"))
    }

    /// (Re)starts on a given port and store, e.g. to restart with the same data.
    pub fn start_on(dir: &Path, port: u16, store: &Path) -> Self {
        let port_s = port.to_string();
        let proc = Proc::spawn(
            &format!("nats-{port}"),
            &nats_server_bin(),
            &[
                "-a",
                "127.0.0.1",
                "-p",
                &port_s,
                "-js",
                "-sd",
                store.to_str().unwrap(),
            ],
            dir,
        );
        let url = format!("nats://127.0.0.1:{port}");
        for _ in 0..200 {
            if nats_greets(port) {
                return Self {
                    proc,
                    url,
                    port,
                    store: store.to_path_buf(),
                    dir: dir.to_path_buf(),
                };
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!("nats-server did not start:\n{}", proc.output());
    }
}

/// Whether a NATS server answers on `port`: it must send its `INFO` greeting. A bare TCP connect is
/// not enough: it also succeeds against another test's short-lived `free_port` listener, or against
/// itself when the kernel picks the target port as the source port (TCP self-connect), and a test
/// then connected too early got "connection refused".
fn nats_greets(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(500)));
    let mut head = [0u8; 4];
    s.read_exact(&mut head).is_ok() && &head == b"INFO"
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_onnx-chat"))
}

/// `onnx-chat <command>` serving the tiny fixture as `tiny-gemma3n` on one thread, with `args`
/// after (e.g. `--quant FP32`, `--nats-url …`); its log is `<name>.log` in `dir`.
pub fn spawn_fixture(name: &str, command: &str, dir: &Path, args: &[&str]) -> Proc {
    let fixture = fixture_dir();
    let mut all = vec![
        command,
        "--model",
        fixture.to_str().unwrap(),
        "--served-model-name",
        "tiny-gemma3n",
        "--threads",
        "1",
    ];
    all.extend_from_slice(args);
    Proc::spawn(name, &bin(), &all, dir)
}

/// Polls `/ready` until it reports `workers` live workers.
pub async fn wait_workers(base: &str, workers: u64, procs: &[&Proc]) {
    let c = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(r) = c.get(format!("{base}/ready")).send().await {
            if let Ok(v) = r.json::<Value>().await {
                if v["workers"].as_u64() == Some(workers) && v["status"] == "ready" {
                    return;
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let logs: Vec<String> = procs
        .iter()
        .map(|p| format!("--- {} ---\n{}", p.name, p.output()))
        .collect();
    panic!(
        "{workers} workers never became ready at {base}\n{}",
        logs.join("\n")
    );
}

/// A minimal `.npy` reader for the goldens: the shape, the raw little-endian data and the dtype string
/// (C order).
pub fn npy(path: &Path) -> (Vec<usize>, Vec<u8>, String) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY");
    let (hlen, start) = if b[6] == 1 {
        (u16::from_le_bytes([b[8], b[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
    };
    let header = std::str::from_utf8(&b[start..start + hlen])
        .unwrap()
        .to_string();
    let descr = header
        .split("'descr':")
        .nth(1)
        .unwrap()
        .split('\'')
        .nth(1)
        .unwrap()
        .to_string();
    let shape_txt = header.split("'shape':").nth(1).unwrap();
    let shape_txt = &shape_txt[shape_txt.find('(').unwrap() + 1..shape_txt.find(')').unwrap()];
    let shape = shape_txt
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    (shape, b[start + hlen..].to_vec(), descr)
}

/// The ids of a chat answer made with `return_token_ids`.
pub fn token_ids(choice: &Value) -> Vec<u32> {
    choice["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_ids in {choice}"))
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// The prefix cache and chunked prefill keep answers exact: every `(name, body)` (with
/// `return_token_ids`), its next turn and that turn again, served with the cache on (prompts fed in
/// chunks of `chunk`) and without (one-shot), give the same ids. Returns the prompt tokens served from
/// the cache.
pub async fn prefix_cache_matches_one_shot(
    model: &ResolvedModel,
    chunk: usize,
    bodies: Vec<(String, Value)>,
) -> u64 {
    let on = Server::start(vec![load_with(model, EngineOpts::cached(chunk))]).await;
    let off = Server::start(vec![load_with(model, EngineOpts::ONE_SHOT)]).await;
    let mut cached = 0;
    for (name, body) in bodies {
        let mut turn1 = body;
        turn1["max_tokens"] = Value::from(8);
        let (_, first) = on.chat(&turn1).await;
        let answer = first["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut turn2 = turn1.clone();
        let msgs = turn2["messages"].as_array_mut().unwrap();
        msgs.push(serde_json::json!({"role": "assistant", "content": answer}));
        msgs.push(serde_json::json!({"role": "user", "content": "And then?"}));
        for (what, body) in [
            ("turn 1", &turn1),
            ("turn 2", &turn2),
            ("turn 2 again", &turn2),
        ] {
            let (s1, a) = on.chat(body).await;
            let (s2, b) = off.chat(body).await;
            assert_eq!((s1, s2), (200, 200), "{name} {what}: {a}");
            assert_eq!(
                token_ids(&a["choices"][0]),
                token_ids(&b["choices"][0]),
                "{name} {what}: cache on vs off"
            );
            cached += a["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap();
        }
    }
    on.shutdown().await;
    off.shutdown().await;
    cached
}

/// Every `(name, body, ids)` sent at once to a server of `model`: decoded together in batched runs,
/// each answer has the ids it has alone; and the runs held several rows.
pub async fn batched_matches_alone(model: Arc<LoadedModel>, cases: Vec<(String, Value, Vec<u32>)>) {
    assert!(model.batching().is_ok(), "{:?}", model.batching());
    let server = Server::start(vec![model]).await;
    let before = metrics_text(&server.base).await;
    let answers = futures::future::join_all(cases.iter().map(|(_, b, _)| server.chat(b))).await;
    for ((name, _, want), (status, resp)) in cases.iter().zip(answers) {
        assert_eq!(status, 200, "{name}: {resp}");
        assert_eq!(
            &token_ids(&resp["choices"][0]),
            want,
            "{name}: batched ids differ from alone"
        );
    }
    let after = metrics_text(&server.base).await;
    let d = |name: &str| metric(&after, name) - metric(&before, name);
    let (runs, rows) = (
        d("onnxchat_decode_batch_runs_total"),
        d("onnxchat_decode_batch_row_steps_total"),
    );
    assert!(rows > runs, "{rows} rows in {runs} runs: not batched");
    server.shutdown().await;
}

/// What golden `g` expects under `quant`, as `(ids, text, finish_reason)`: the committed FP32 golden
/// (transformers); for the other sets the reference loop's ids on this machine (`reference[case][quant]`:
/// ONNX Runtime's int8/int4/fp16 kernels round differently on different CPUs), with the golden's text
/// where they agree, else `tokenizer`'s decoding and a finish reason from `eos`.
pub fn expected_under(
    g: &Golden,
    quant: &str,
    reference: &Value,
    tokenizer: &Path,
    eos: &[u32],
) -> (Vec<u32>, Value, Value) {
    let list = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap_or_else(|| panic!("{}: not a list of ids: {v}", g.name))
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let gen = &g.expected["generated"][quant];
    let golden = list(&gen["ids"]);
    if quant == "FP32" {
        return (golden, gen["text"].clone(), gen["finish_reason"].clone());
    }
    let here = list(&reference[&g.name][quant]);
    if here == golden {
        return (golden, gen["text"].clone(), gen["finish_reason"].clone());
    }
    eprintln!(
        "{} {quant}: this CPU's onnxruntime gives other ids than the committed golden (kernel rounding); comparing with the reference loop run here",
        g.name
    );
    let tok = tokenizers::Tokenizer::from_file(tokenizer).unwrap();
    let text = tok.decode(&here, true).unwrap();
    let finish = if here.last().is_some_and(|t| eos.contains(t)) {
        "stop"
    } else {
        "length"
    };
    (here, Value::from(text), Value::from(finish))
}

/// Every golden through HTTP on `model` (with `return_token_ids`): the ids, text, finish reason
/// `expected` gives and the golden's prompt length. Returns how many were checked.
pub async fn http_parity(
    model: Arc<LoadedModel>,
    goldens: &[Golden],
    what: &str,
    expected: impl Fn(&Golden) -> (Vec<u32>, Value, Value),
) -> usize {
    let server = Server::start(vec![model]).await;
    for g in goldens {
        let (want, text, finish) = expected(g);
        let mut body = g.request.clone();
        body["return_token_ids"] = Value::Bool(true);
        let (status, resp) = server.chat(&body).await;
        assert_eq!(status, 200, "{what} {}: {resp}", g.name);
        let choice = &resp["choices"][0];
        assert_eq!(token_ids(choice), want, "{what} {}: token ids", g.name);
        assert_eq!(choice["message"]["content"], text, "{what} {}", g.name);
        assert_eq!(choice["finish_reason"], finish, "{what} {}", g.name);
        assert_eq!(
            resp["usage"]["prompt_tokens"], g.expected["prompt_len"],
            "{what} {}: prompt tokens",
            g.name
        );
    }
    server.shutdown().await;
    goldens.len()
}

/// The id of the worker that announces a running job (`active == 1`) on the heartbeat subscription
/// `hb` within `wait`: the one serving the job a test just sent.
pub async fn busy_worker(hb: &mut async_nats::Subscriber, wait: std::time::Duration) -> String {
    use futures::StreamExt;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < wait {
        if let Ok(Some(m)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), hb.next()).await
        {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            if v["active"] == 1 {
                return v["worker_id"].as_str().unwrap().to_string();
            }
        }
    }
    panic!("no worker announced the job within {wait:?}");
}
