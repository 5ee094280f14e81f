//! The SmolVLM family on the committed tiny SmolVLM (tests/fixtures/tiny-smolvlm) against the reference:
//! prompts (rendered, expanded, ids) and `pixel_values` of every golden equal what transformers'
//! Idefics3Processor produced (pixels bit for bit: tolerance 0); greedy generations through HTTP equal
//! transformers (FP32) and the Python onnxruntime loop (UINT8) token for token; and one process serves a
//! Gemma-3n and a SmolVLM model at once, routed by the request's `model`.
//!
//! The `image_nosplit` golden was made with `do_image_splitting: false`: its model is a copy of the
//! fixture with that override in `preprocessor_config.json` (`processor_overrides` in expected.json).

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use common::{init_ort, read_json, root, Server};
use onnx_chat::models::loaded::{LoadOptions, LoadedModel};
use onnx_chat::models::resolve::{self, ModelSpec};
use onnx_chat::models::smolvlm::{SmolVlmMedia, SmolVlmPrompter};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const NAME: &str = "tiny-smolvlm";

fn fixture() -> PathBuf {
    root().join("tests/fixtures/tiny-smolvlm")
}

fn goldens_dir() -> PathBuf {
    root().join("tests/fixtures/goldens-smolvlm")
}

struct Golden {
    name: String,
    request: Value,
    expected: Value,
    dir: PathBuf,
}

impl Golden {
    fn overrides(&self) -> &serde_json::Map<String, Value> {
        self.expected["processor_overrides"].as_object().unwrap()
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    fn messages(&self) -> Vec<onnx_chat::protocol::ChatMessage> {
        onnx_chat::openai::validate(&self.request, &Default::default())
            .unwrap()
            .messages
    }
}

fn goldens() -> Vec<Golden> {
    let index = read_json(&goldens_dir().join("index.json"));
    index["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["case"].as_str().unwrap().to_string();
            let dir = goldens_dir().join(&name);
            Golden {
                request: read_json(&dir.join("request.json")),
                expected: read_json(&dir.join("expected.json")),
                dir,
                name,
            }
        })
        .collect()
}

/// A snapshot directory for the golden's processor settings: the fixture itself, or a copy whose
/// `preprocessor_config.json` has the overrides applied (kept for the test binary's lifetime).
fn snapshot_for(overrides: &serde_json::Map<String, Value>) -> PathBuf {
    if overrides.is_empty() {
        return fixture();
    }
    static DIRS: OnceLock<Mutex<Vec<tempfile::TempDir>>> = OnceLock::new();
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("tiny-smolvlm-override");
    copy_dir(&fixture(), &dst);
    let path = dst.join("preprocessor_config.json");
    let mut cfg = read_json(&path);
    for (k, v) in overrides {
        cfg[k] = v.clone();
    }
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    DIRS.get_or_init(Default::default).lock().unwrap().push(tmp);
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// The model in `dir` under `quant`, served as "tiny-smolvlm"; loaded once per test binary.
fn model_at(dir: &Path, quant: &str) -> Arc<LoadedModel> {
    static MODELS: OnceLock<Mutex<std::collections::HashMap<String, Arc<LoadedModel>>>> =
        OnceLock::new();
    init_ort();
    let key = format!("{}|{quant}", dir.display());
    let mut map = MODELS.get_or_init(Default::default).lock().unwrap();
    map.entry(key)
        .or_insert_with(|| {
            let spec = ModelSpec::parse(dir.to_str().unwrap(), Some(quant)).unwrap();
            let hub = onnx_chat::models::hub::HubConfig::from_vars(|_| None);
            let resolved = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(resolve::resolve(&spec, Some(NAME), &hub))
                    .unwrap()
            })
            .join()
            .unwrap();
            let mut opts = LoadOptions::default();
            opts.session.intra_threads = 1;
            Arc::new(LoadedModel::load(&resolved, &opts).expect("tiny-smolvlm loads"))
        })
        .clone()
}

#[test]
fn prompts_match_the_reference_processor() {
    for g in goldens() {
        let m = model_at(&snapshot_for(g.overrides()), "FP32");
        let p = m.prompt(&g.messages()).unwrap();
        let e = &g.expected;
        assert_eq!(
            p.rendered,
            e["rendered_prompt"].as_str().unwrap(),
            "{}: rendered",
            g.name
        );
        assert_eq!(
            p.expanded,
            e["expanded_prompt"].as_str().unwrap(),
            "{}: expanded",
            g.name
        );
        assert_eq!(
            p.ids,
            Golden::ids(&e["prompt_ids"]),
            "{}: prompt ids",
            g.name
        );
        assert_eq!(p.n_images, e["media"].as_array().unwrap().len());
    }
    // A text-only message still reaches the template as a list of items (the template indexes
    // content[0]['type']); image parts keep their place.
    let g = goldens()
        .into_iter()
        .find(|g| g.name == "image_two")
        .unwrap();
    let items = SmolVlmPrompter::template_messages(&g.messages());
    let types: Vec<&str> = items[0]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["text", "image", "image"]);
}

/// The 8-bit level behind a normalised value: pixel = ((k / 255) − 0.5) / 0.5.
fn level(v: f32) -> u8 {
    ((v as f64 * 0.5 + 0.5) * 255.0).round().clamp(0.0, 255.0) as u8
}

fn from_level(k: u8) -> f32 {
    ((k as f64 / 255.0) as f32 - 0.5) / 0.5
}

#[test]
fn pixel_values_match_the_reference_processor() {
    let mut report = Vec::new();
    for g in goldens() {
        let media = SmolVlmMedia::new(&snapshot_for(g.overrides()), Default::default()).unwrap();
        for (n, m) in g.expected["media"].as_array().unwrap().iter().enumerate() {
            let what = format!("{} image {n}", g.name);
            let bytes = std::fs::read(
                root()
                    .join("tests/fixtures")
                    .join(m["file"].as_str().unwrap()),
            )
            .unwrap();
            let got = media.image_bytes(n, &bytes).unwrap();
            assert_eq!(got.rows as u64, m["rows"].as_u64().unwrap(), "{what}: rows");
            assert_eq!(got.cols as u64, m["cols"].as_u64().unwrap(), "{what}: cols");
            let frames = m["frames"].as_u64().unwrap() as usize;
            assert_eq!(got.input.frames, frames, "{what}: frames");
            let shape: Vec<usize> = m["frame_shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(got.input.shape.to_vec(), shape, "{what}: frame shape");
            let size: usize = shape.iter().product();
            assert_eq!(got.input.pixel_values.len(), frames * size);
            // Our values are exactly the formula of an 8-bit level, so the levels describe them losslessly.
            assert!(
                got.input
                    .pixel_values
                    .iter()
                    .all(|&v| from_level(level(v)) == v),
                "{what}: values off the 8-bit grid"
            );
            let mut bad_frames = Vec::new();
            for (f, chunk) in got.input.pixel_values.chunks_exact(size).enumerate() {
                let levels: Vec<u8> = chunk.iter().map(|&v| level(v)).collect();
                let hash = format!("{:x}", Sha256::digest(&levels));
                if hash != m["frames_u8_sha256"][f].as_str().unwrap() {
                    bad_frames.push(f);
                }
                let sum: f64 = chunk.iter().map(|&v| v as f64).sum();
                let want = m["frames_sum"][f].as_f64().unwrap();
                assert!(
                    (sum - want).abs() < 1e-2,
                    "{what} frame {f}: sum {sum} vs {want}"
                );
            }
            let first: Vec<f32> = m["frame0_rows_0_1_first16"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|c| c.as_array().unwrap().iter())
                .flat_map(|r| r.as_array().unwrap().iter())
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let (h, w) = (shape[1], shape[2]);
            let mine: Vec<f32> = (0..3)
                .flat_map(|c| (0..2).flat_map(move |y| (0..16).map(move |x| (c, y, x))))
                .map(|(c, y, x)| got.input.pixel_values[(c * h + y) * w + x])
                .collect();
            for (a, b) in mine.iter().zip(&first) {
                assert!((a - b).abs() < 1e-5, "{what}: frame 0 slice {a} vs {b}");
            }
            // The global frame in full: per-element differences.
            let png = image::open(g.dir.join(m["global_frame_png"].as_str().unwrap()))
                .unwrap()
                .to_rgb8();
            let last = &got.input.pixel_values[(frames - 1) * size..];
            let (mut max, mut differing) = (0f32, 0usize);
            for (i, p) in png.pixels().enumerate() {
                for c in 0..3 {
                    let d = (last[c * h * w + i] - from_level(p.0[c])).abs();
                    max = max.max(d);
                    differing += (d > 0.0) as usize;
                }
            }
            report.push(format!(
                "{what} ({} frames): global frame max |Δ| {max:.2e}, {differing} values differ; frames with other levels: {bad_frames:?}",
                frames
            ));
            eprintln!("{}", report.last().unwrap());
            assert!(
                differing == 0 && bad_frames.is_empty(),
                "{}",
                report.last().unwrap()
            );
        }
    }
    assert!(report.len() >= 5, "{report:?}");
}

async fn check_quant(quant: &str) {
    let checked = check_goldens(quant, |g| {
        let dir = snapshot_for(g.overrides());
        Some((dir.display().to_string(), model_at(&dir, quant)))
    })
    .await;
    assert!(checked >= 6, "{quant}: only {checked} goldens");
}

/// The goldens of `quant` through HTTP, each on the model `model_for` gives it (keyed: one server per
/// key), skipping those it gives none. Returns how many were checked.
async fn check_goldens(
    quant: &str,
    model_for: impl Fn(&Golden) -> Option<(String, Arc<LoadedModel>)>,
) -> usize {
    let mut checked = 0;
    let mut servers: Vec<(String, Server)> = Vec::new();
    for g in goldens() {
        let Some(gen) = g.expected["generated"].get(quant) else {
            continue;
        };
        let Some((key, model)) = model_for(&g) else {
            continue;
        };
        if !servers.iter().any(|(k, _)| *k == key) {
            servers.push((key.clone(), Server::start(vec![model]).await));
        }
        let server = &servers.iter().find(|(k, _)| *k == key).unwrap().1;
        let mut body = g.request.clone();
        body["return_token_ids"] = Value::Bool(true);
        let (status, resp) = server.chat(&body).await;
        assert_eq!(status, 200, "{quant} {}: {resp}", g.name);
        let choice = &resp["choices"][0];
        assert_eq!(
            Golden::ids(&choice["token_ids"]),
            Golden::ids(&gen["ids"]),
            "{quant} {}: token ids",
            g.name
        );
        assert_eq!(
            choice["message"]["content"], gen["text"],
            "{quant} {}: text",
            g.name
        );
        assert_eq!(
            choice["finish_reason"], gen["finish_reason"],
            "{quant} {}",
            g.name
        );
        assert_eq!(
            resp["usage"]["prompt_tokens"].as_u64().unwrap(),
            g.expected["prompt_len"].as_u64().unwrap(),
            "{quant} {}: prompt tokens",
            g.name
        );
        assert_eq!(
            resp["usage"]["completion_tokens"].as_u64().unwrap() as usize,
            gen["ids"].as_array().unwrap().len()
        );
        checked += 1;
    }
    for (_, s) in servers {
        s.shutdown().await;
    }
    checked
}

/// The fixture as users download it: published as HuggingFaceTB/SmolVLM-256M-Instruct with the fp32
/// decoder's weights in external data, downloaded by the server's resolver into hf-hub's cache (every
/// file a relative link into `blobs/`), served by repo id offline with the default load-time rewrites:
/// the goldens of both sets (those without processor overrides), as from the folder.
#[tokio::test(flavor = "multi_thread")]
async fn an_hf_hub_snapshot_with_external_data_serves_the_goldens() {
    use common::hub::HubCache;
    init_ort();
    let cache = HubCache::download(
        &fixture(),
        "HuggingFaceTB/SmolVLM-256M-Instruct",
        &["FP32", "UINT8"],
        &["onnx/decoder_model_merged.onnx"],
    );
    for quant in ["FP32", "UINT8"] {
        let m = cache.resolve(quant, NAME);
        if quant == "FP32" {
            common::hub::assert_decoder_has_external_data(&m);
        }
        let mut opts = LoadOptions::default();
        opts.session.intra_threads = 1;
        let model = Arc::new(LoadedModel::load(&m, &opts).unwrap());
        let checked = check_goldens(quant, |g| {
            g.overrides()
                .is_empty()
                .then(|| ("hub".to_string(), model.clone()))
        })
        .await;
        assert!(checked >= 4, "{quant}: only {checked} goldens");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http_parity_fp32_against_transformers() {
    check_quant("FP32").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_parity_uint8_against_the_onnxruntime_loop() {
    check_quant("UINT8").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_before_inference() {
    let server = Server::start(vec![model_at(&fixture(), "UINT8")]).await;
    let g = goldens()
        .into_iter()
        .find(|g| g.name == "text_basic")
        .unwrap();
    let mut body = g.request.clone();
    body["messages"][0]["content"] = Value::from("a literal <image> in the text");
    let (status, resp) = server.chat(&body).await;
    assert_eq!(status, 400, "{resp}");
    assert!(resp["error"]["message"]
        .as_str()
        .unwrap()
        .contains("<image>"));
    let mut body = g.request.clone();
    body["messages"][0]["content"] = serde_json::json!([
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "text", "text": "hi"}
    ]);
    let (status, resp) = server.chat(&body).await;
    assert_eq!(status, 400, "{resp}");
    let mut body = g.request.clone();
    body["messages"][0]["content"] = serde_json::json!([
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "text", "text": "hi"}
    ]);
    let (status, resp) = server.chat(&body).await;
    assert_eq!(status, 400, "{resp}");
    server.shutdown().await;
}

fn golden_ids(expected: &Value, quant: &str) -> Vec<u32> {
    Golden::ids(&expected["generated"][quant]["ids"])
}

/// The request of a Gemma golden and its FP32 ids.
fn gemma_case(name: &str) -> (Value, Vec<u32>) {
    let dir = common::goldens_dir().join(name);
    (
        read_json(&dir.join("request.json")),
        golden_ids(&read_json(&dir.join("expected.json")), "FP32"),
    )
}

async fn ids_of(server: &str, body: &Value) -> Vec<u32> {
    let mut body = body.clone();
    body["return_token_ids"] = Value::Bool(true);
    let r = reqwest::Client::new()
        .post(format!("{server}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    Golden::ids(&v["choices"][0]["token_ids"])
}

#[tokio::test(flavor = "multi_thread")]
async fn one_server_serves_gemma_and_smolvlm_routed_by_model() {
    let smol = model_at(&fixture(), "UINT8");
    let server = Server::start(vec![common::model("FP32"), smol]).await;
    let models: Value = reqwest::get(server.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["tiny-gemma3n", "tiny-smolvlm"]);
    let (gemma_body, gemma_ids) = gemma_case("image_one");
    let smol_golden = goldens()
        .into_iter()
        .find(|g| g.name == "image_small")
        .unwrap();
    let smol_ids = golden_ids(&smol_golden.expected, "UINT8");
    // Both at once: each request reaches its own model.
    let (a, b) = tokio::join!(
        ids_of(&server.base, &gemma_body),
        ids_of(&server.base, &smol_golden.request)
    );
    assert_eq!(a, gemma_ids, "gemma through the two-model server");
    assert_eq!(b, smol_ids, "smolvlm through the two-model server");
    let mut other = smol_golden.request.clone();
    other["model"] = Value::from("no-such-model");
    let (status, resp) = server.chat(&other).await;
    assert_eq!(status, 404, "{resp}");
    server.shutdown().await;
}

/// The binary with two `--model` flags (one named with NAME=MODEL) and per-model quantizations.
#[tokio::test(flavor = "multi_thread")]
async fn serve_command_takes_several_models() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let gemma = common::fixture_dir();
    let smol = format!("smol={}", fixture().display());
    let port_s = port.to_string();
    let proc = common::Proc::spawn(
        "serve",
        &common::bin(),
        &[
            "serve",
            "--model",
            gemma.to_str().unwrap(),
            "--model",
            &smol,
            "--quant",
            "FP32,UINT8",
            "--port",
            &port_s,
            "--threads",
            "1",
        ],
        dir.path(),
    );
    let base = format!("http://127.0.0.1:{port}");
    common::wait_workers(&base, 1, &[&proc]).await;
    let (gemma_body, gemma_ids) = gemma_case("text_basic");
    assert_eq!(ids_of(&base, &gemma_body).await, gemma_ids);
    let g = goldens()
        .into_iter()
        .find(|g| g.name == "text_basic")
        .unwrap();
    let mut body = g.request.clone();
    body["model"] = Value::from("smol");
    assert_eq!(ids_of(&base, &body).await, golden_ids(&g.expected, "UINT8"));
    let models: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut names: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["smol", "tiny-gemma3n"], "{models}");
}

/// The prefix cache and chunked prefill on SmolVLM: for every golden, its next turn and a changed
/// question, the ids with the cache on (chunks of 48, so boundaries fall inside images' 64-token
/// blocks) equal one-shot prefill without a cache.
async fn cache_on_off(quant: &str) -> u64 {
    use common::{load_with, resolve_dir, EngineOpts};
    let mut cached = 0;
    let mut pairs: Vec<(String, Server, Server)> = Vec::new();
    for g in goldens() {
        let dir = snapshot_for(g.overrides());
        let key = dir.display().to_string();
        if !pairs.iter().any(|(k, _, _)| *k == key) {
            let resolved = resolve_dir(&dir, NAME, quant);
            let on = Server::start(vec![load_with(&resolved, EngineOpts::cached(48))]).await;
            let off = Server::start(vec![load_with(&resolved, EngineOpts::ONE_SHOT)]).await;
            pairs.push((key.clone(), on, off));
        }
        let (_, on, off) = pairs.iter().find(|(k, _, _)| *k == key).unwrap();
        let mut turn1 = g.request.clone();
        turn1["return_token_ids"] = Value::Bool(true);
        turn1["max_tokens"] = serde_json::json!(12);
        let (_, first) = on.chat(&turn1).await;
        let answer = first["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_else(|| panic!("{quant} {}: {first}", g.name))
            .to_string();
        let mut turn2 = turn1.clone();
        let msgs = turn2["messages"].as_array_mut().unwrap();
        msgs.push(serde_json::json!({"role": "assistant", "content": answer}));
        msgs.push(serde_json::json!({"role": "user", "content": "And then?"}));
        for (what, body) in [("turn 1", &turn1), ("turn 2", &turn2)] {
            let (s1, a) = on.chat(body).await;
            let (s2, b) = off.chat(body).await;
            assert_eq!((s1, s2), (200, 200), "{quant} {} {what}: {a}", g.name);
            assert_eq!(
                Golden::ids(&a["choices"][0]["token_ids"]),
                Golden::ids(&b["choices"][0]["token_ids"]),
                "{quant} {} {what}: cache on vs off",
                g.name
            );
            cached += a["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap();
        }
    }
    for (_, on, off) in pairs {
        on.shutdown().await;
        off.shutdown().await;
    }
    cached
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_cache_and_chunked_prefill_are_exact_fp32() {
    assert!(cache_on_off("FP32").await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_cache_and_chunked_prefill_are_exact_uint8() {
    cache_on_off("UINT8").await;
}

/// Structured outputs and tool calls on SmolVLM's byte-level BPE vocabulary (Gemma's is
/// SentencePiece with byte fallback): the answers parse and validate.
#[tokio::test(flavor = "multi_thread")]
async fn constrained_decoding_on_a_byte_level_vocabulary() {
    let server = Server::start(vec![model_at(&fixture(), "FP32")]).await;
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["x", "y"]}},
      "required": ["name", "n", "kind"], "additionalProperties": false});
    let validator = jsonschema::validator_for(&schema).unwrap();
    for seed in 0..12 {
        let b = json!({"model": NAME, "messages": [{"role": "user", "content": "JSON please"}],
            "temperature": 1, "seed": seed, "max_tokens": 400,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}});
        let (status, v) = server.chat(&b).await;
        assert_eq!(status, 200, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "stop", "{v}");
        let text = c["message"]["content"].as_str().unwrap();
        let parsed: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(validator.is_valid(&parsed), "{text}");
    }
    let b = json!({"model": NAME, "messages": [{"role": "user", "content": "call"}],
        "temperature": 1, "seed": 2, "max_tokens": 300, "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
            "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"], "additionalProperties": false}}}]});
    let (_, v) = server.chat(&b).await;
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    let args: Value = serde_json::from_str(
        c["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(args["k"] == "a" || args["k"] == "b");
    server.shutdown().await;
}
