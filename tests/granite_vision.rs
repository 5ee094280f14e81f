//! The Granite Vision family on the committed tiny export (tests/fixtures/tiny-granite-vision, made by
//! tools/export/granite_vision.py) against the reference: prompts (rendered, expanded, ids), the anyres
//! tiles' `pixel_values` (bit for bit: tolerance 0) and layouts, and the packed image features
//! (within 1e-4 of transformers' `get_image_features`) of every golden equal what transformers'
//! LlavaNextProcessor / LlavaNextModel produced; greedy generations through HTTP equal transformers
//! (FP32) and the Python onnxruntime loop (QUANTIZED, Q4, Q4_MIXED) token for token; the prefix cache,
//! chunked prefill and continuous batching keep them exact; structured outputs and tools work; the
//! export is served under the catalog names when it says where it came from.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::hub::HubCache;
use common::{init_ort, load_with, read_json, resolve_dir, root, EngineOpts, Golden, Server};
use onnx_chat::models::encoder_cache::{CacheStats, EncoderCache};
use onnx_chat::models::granite_vision::{
    GraniteVisionConfig, GraniteVisionMedia, GraniteVisionModel,
};
use onnx_chat::models::loaded::LoadedModel;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const NAME: &str = "tiny-granite-vision";
const QUANTS: &[&str] = &["FP32", "QUANTIZED", "Q4", "Q4_MIXED"];

/// A committed export and its goldens.
#[derive(Debug, Clone, Copy)]
struct Fixture {
    /// Folder under tests/fixtures, and the name it is served as.
    name: &'static str,
    goldens: &'static str,
}

/// The export of a checkpoint in the hub repo's flat layout (`preprocessor_config.json`; 384-px tiles,
/// patch 14, mean/std 0.5, BICUBIC).
const FLAT: Fixture = Fixture {
    name: NAME,
    goldens: "goldens-granite-vision",
};

/// The export, by the recipe (tools/export/export.sh), of a checkpoint saved by transformers 5 itself:
/// the image processor nested in `processor_config.json`, no `preprocessor_config.json`, and settings
/// that differ from every default (240-px tiles, patch 16, ImageNet mean/std, BILINEAR, 8 pinpoints).
const T5: Fixture = Fixture {
    name: "tiny-granite-vision-t5",
    goldens: "goldens-granite-vision-t5",
};

impl Fixture {
    fn dir(self) -> PathBuf {
        root().join("tests/fixtures").join(self.name)
    }

    fn goldens(self) -> Vec<Golden> {
        common::goldens_in(&root().join("tests/fixtures").join(self.goldens))
    }

    fn model(self, quant: &str) -> Arc<LoadedModel> {
        load_with(
            &resolve_dir(&self.dir(), self.name, quant),
            EngineOpts::ONE_SHOT,
        )
    }

    /// The reference image processor's tile side, rescale factor, mean and std, as the goldens'
    /// index.json records them (the flat goldens predate that record: the hub repo's settings).
    fn reference_pixels(self) -> Pixels {
        let s = read_json(
            &root()
                .join("tests/fixtures")
                .join(self.goldens)
                .join("index.json"),
        )["image_processor_settings"]
            .clone();
        if s.is_null() {
            return Pixels {
                tile: 384,
                rescale: 1.0 / 255.0,
                mean: [0.5; 3],
                std: [0.5; 3],
            };
        }
        let three = |k: &str| -> [f32; 3] {
            let v: Vec<f32> = s[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            v.try_into().unwrap()
        };
        Pixels {
            tile: s["crop_size"]["height"].as_u64().unwrap() as usize,
            rescale: s["rescale_factor"].as_f64().unwrap(),
            mean: three("image_mean"),
            std: three("image_std"),
        }
    }
}

/// How the reference turned 8-bit levels into `pixel_values`: `((k · rescale) − mean[c]) / std[c]`.
#[derive(Debug, Clone, Copy)]
struct Pixels {
    tile: usize,
    rescale: f64,
    mean: [f32; 3],
    std: [f32; 3],
}

impl Pixels {
    fn value(&self, k: u8, c: usize) -> f32 {
        ((k as f64 * self.rescale) as f32 - self.mean[c]) / self.std[c]
    }

    /// The 8-bit level behind a value of channel `c`.
    fn level(&self, v: f32, c: usize) -> u8 {
        ((v as f64 * self.std[c] as f64 + self.mean[c] as f64) / self.rescale)
            .round()
            .clamp(0.0, 255.0) as u8
    }
}

fn fixture() -> PathBuf {
    FLAT.dir()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list of ids: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn goldens() -> Vec<Golden> {
    FLAT.goldens()
}

/// What this file reads of a golden beyond `common::Golden`.
trait GoldenExt {
    fn messages(&self) -> Vec<onnx_chat::protocol::ChatMessage>;
    fn body(&self) -> Value;
}

impl GoldenExt for Golden {
    fn messages(&self) -> Vec<onnx_chat::protocol::ChatMessage> {
        onnx_chat::openai::validate(&self.request, &Default::default())
            .unwrap()
            .messages
    }

    fn body(&self) -> Value {
        let mut b = self.request.clone();
        b["return_token_ids"] = json!(true);
        b
    }
}

fn model(quant: &str) -> Arc<LoadedModel> {
    FLAT.model(quant)
}

fn media_bytes(m: &Value) -> Vec<u8> {
    std::fs::read(
        root()
            .join("tests/fixtures")
            .join(m["file"].as_str().unwrap()),
    )
    .unwrap()
}

fn check_prompts(f: Fixture) {
    let m = f.model("FP32");
    let mut images = 0;
    for g in f.goldens() {
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
        assert_eq!(p.ids, ids(&e["prompt_ids"]), "{}: prompt ids", g.name);
        assert_eq!(p.n_images, e["media"].as_array().unwrap().len());
        images += p.n_images;
    }
    assert!(images >= 4, "{}: {images} images in the goldens", f.name);
}

#[test]
fn prompts_match_the_reference_processor() {
    check_prompts(FLAT);
}

#[test]
fn prompts_match_the_reference_processor_transformers5() {
    check_prompts(T5);
}

fn check_tiles(f: Fixture) {
    let px = f.reference_pixels();
    let cfg = GraniteVisionConfig::load(&f.dir()).unwrap();
    let media = GraniteVisionMedia::new(&f.dir(), &cfg, Default::default()).unwrap();
    let mut checked = 0;
    for g in f.goldens() {
        for (n, m) in g.expected["media"].as_array().unwrap().iter().enumerate() {
            let what = format!("{} image {n}", g.name);
            let got = media.image_bytes(n, &media_bytes(m)).unwrap();
            let l = got.layout;
            assert_eq!(
                [l.rows, l.cols],
                [
                    m["grid"][0].as_u64().unwrap() as usize,
                    m["grid"][1].as_u64().unwrap() as usize
                ],
                "{what}: grid"
            );
            assert_eq!(
                [l.height, l.width, l.top, l.left],
                [
                    m["unpadded_features"][0].as_u64().unwrap() as usize,
                    m["unpadded_features"][1].as_u64().unwrap() as usize,
                    m["unpad_offset"][0].as_u64().unwrap() as usize,
                    m["unpad_offset"][1].as_u64().unwrap() as usize
                ],
                "{what}: unpadding"
            );
            assert_eq!(
                l.tokens() as u64,
                m["image_tokens"].as_u64().unwrap(),
                "{what}: tokens"
            );
            let tiles = m["tiles"].as_u64().unwrap() as usize;
            assert_eq!(got.input.frames, tiles, "{what}: tiles");
            let side = px.tile;
            assert_eq!(
                got.input.shape.to_vec(),
                vec![3, side, side],
                "{what}: tile shape"
            );
            let size = 3 * side * side;
            let channel = |i: usize| i / (side * side);
            assert_eq!(got.input.pixel_values.len(), tiles * size);
            for (t, chunk) in got.input.pixel_values.chunks_exact(size).enumerate() {
                let levels: Vec<u8> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| px.level(v, channel(i)))
                    .collect();
                let back: Vec<f32> = levels
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| px.value(k, channel(i)))
                    .collect();
                assert_eq!(back, chunk, "{what} tile {t}: values off the 8-bit grid");
                assert_eq!(
                    format!("{:x}", Sha256::digest(&levels)),
                    m["tiles_u8_sha256"][t].as_str().unwrap(),
                    "{what} tile {t}: pixels differ from the reference"
                );
                let sum: f64 = chunk.iter().map(|&v| v as f64).sum();
                let want = m["tiles_sum"][t].as_f64().unwrap();
                assert!(
                    (sum - want).abs() < 1e-2,
                    "{what} tile {t}: sum {sum} vs {want}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 4, "{}: {checked} images", f.name);
}

#[test]
fn tiles_and_layouts_match_the_reference_processor() {
    check_tiles(FLAT);
}

/// Tiles of 240 px normalised with ImageNet's mean/std after BILINEAR resizing, every setting read
/// from `processor_config.json`'s nested `image_processor`: bit for bit what transformers 5 made.
#[test]
fn tiles_and_layouts_match_the_reference_processor_transformers5() {
    check_tiles(T5);
}

/// Our vision encoder run plus packing (unpadding, newline rows, base tile first) against
/// transformers' packed features: every row's sum and a few whole rows, within 1e-4.
fn check_packed(f: Fixture) {
    init_ort();
    let cfg = GraniteVisionConfig::load(&f.dir()).unwrap();
    let media = GraniteVisionMedia::new(&f.dir(), &cfg, Default::default()).unwrap();
    let resolved = resolve_dir(&f.dir(), f.name, "FP32");
    let opts = onnx_chat::engine::session::SessionOptions {
        intra_threads: 1,
        ..Default::default()
    };
    let cache = EncoderCache::new(64 << 20, Arc::new(CacheStats::default()));
    let processing = media.processing().clone();
    let mut m = GraniteVisionModel::load(&resolved, cfg, &opts, cache, processing).unwrap();
    let (mut max_row, mut max_sum, mut checked) = (0f32, 0f64, 0);
    for g in f.goldens() {
        for (n, e) in g.expected["media"].as_array().unwrap().iter().enumerate() {
            let img = media.image_bytes(n, &media_bytes(e)).unwrap();
            let packed = m.encode_images(&[&img.input]).unwrap().remove(0);
            let hidden = e["packed_features_shape"][1].as_u64().unwrap() as usize;
            let rows = e["packed_features_shape"][0].as_u64().unwrap() as usize;
            assert_eq!(
                packed.len(),
                rows * hidden,
                "{} image {n}: packed shape",
                g.name
            );
            for (r, want) in e["packed_row_sums"].as_array().unwrap().iter().enumerate() {
                let sum: f64 = packed[r * hidden..(r + 1) * hidden]
                    .iter()
                    .map(|&v| v as f64)
                    .sum();
                max_sum = max_sum.max((sum - want.as_f64().unwrap()).abs());
            }
            for (r, want) in e["packed_rows"].as_object().unwrap() {
                let r: usize = r.parse().unwrap();
                for (a, b) in packed[r * hidden..(r + 1) * hidden]
                    .iter()
                    .zip(want.as_array().unwrap())
                {
                    max_row = max_row.max((a - b.as_f64().unwrap() as f32).abs());
                }
            }
            checked += 1;
        }
    }
    eprintln!(
        "{}: packed features: max |Δ| {max_row:.2e} in whole rows, {max_sum:.2e} in row sums",
        f.name
    );
    assert!(checked >= 4);
    assert!(
        max_row < 1e-4 && max_sum < 1e-3,
        "{}: rows {max_row}, sums {max_sum}",
        f.name
    );
}

#[test]
fn packed_features_match_transformers() {
    check_packed(FLAT);
}

#[test]
fn packed_features_match_transformers_transformers5() {
    check_packed(T5);
}

/// Greedy ids of the Python onnxruntime loop (`tools/fixtures/granite_vision/ort_reference.py`) on this
/// machine for the quantized sets, by case: ONNX Runtime's int8/int4 kernels round differently on
/// different CPUs, so those sets are compared with the loop run here, on the goldens' prompt ids and
/// our tiles (which `tiles_and_layouts_match_the_reference_processor` checks bit for bit).
fn ort_reference(f: Fixture) -> &'static Value {
    static REFS: std::sync::Mutex<Vec<(&str, &'static Value)>> = std::sync::Mutex::new(Vec::new());
    let mut refs = REFS.lock().unwrap();
    if let Some((_, v)) = refs.iter().find(|(n, _)| *n == f.name) {
        return v;
    }
    let v: &'static Value = Box::leak(Box::new({
        let tmp = tempfile::tempdir().unwrap();
        let cfg = GraniteVisionConfig::load(&f.dir()).unwrap();
        let media = GraniteVisionMedia::new(&f.dir(), &cfg, Default::default()).unwrap();
        let mut cases = Vec::new();
        for g in f.goldens() {
            let mut images = Vec::new();
            for (n, m) in g.expected["media"].as_array().unwrap().iter().enumerate() {
                let img = media.image_bytes(n, &media_bytes(m)).unwrap();
                let file = tmp.path().join(format!("{}_{n}.f32", g.name));
                let bytes: Vec<u8> = img
                    .input
                    .pixel_values
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                std::fs::write(&file, bytes).unwrap();
                images.push(json!({"file": file, "height": m["height"], "width": m["width"]}));
            }
            cases.push(json!({"case": g.name, "ids": g.expected["prompt_ids"], "images": images}));
        }
        let manifest = tmp.path().join("manifest.json");
        let max = f.goldens()[0].expected["max_new_tokens"].clone();
        std::fs::write(
            &manifest,
            json!({"max_new_tokens": max, "cases": cases}).to_string(),
        )
        .unwrap();
        common::python_json(
            "tools/fixtures/granite_vision/ort_reference.py",
            &[f.dir().into(), manifest.into()],
        )
    }));
    refs.push((f.name, v));
    v
}

/// What a golden of `f` expects under `quant` (see `common::expected_under`).
fn expected_of(f: Fixture, g: &Golden, quant: &str) -> (Vec<u32>, Value, Value) {
    let eos = [0u32];
    common::expected_under(
        g,
        quant,
        ort_reference(f),
        &f.dir().join("tokenizer.json"),
        &eos,
    )
}

fn expected(g: &Golden, quant: &str) -> (Vec<u32>, Value, Value) {
    expected_of(FLAT, g, quant)
}

/// Every golden of `f` through HTTP on `model`, served as `f.name`.
async fn check_on(f: Fixture, model: Arc<LoadedModel>, quant: &str) {
    let goldens = f.goldens();
    let checked = common::http_parity(model, &goldens, quant, |g| expected_of(f, g, quant)).await;
    assert!(checked >= 4, "{} {quant}: {checked} goldens", f.name);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_parity_fp32_against_transformers() {
    check_on(FLAT, FLAT.model("FP32"), "FP32").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_parity_quantized_sets_against_the_onnxruntime_loop() {
    for q in &QUANTS[1..] {
        check_on(FLAT, FLAT.model(q), q).await;
    }
}

/// The transformers-5 checkpoint's export: FP32 equals transformers 5, the quantized sets the
/// onnxruntime loop.
#[tokio::test(flavor = "multi_thread")]
async fn http_parity_transformers5_checkpoint_every_set() {
    for q in QUANTS {
        check_on(T5, T5.model(q), q).await;
    }
}

/// Both exports as users download them: hf-hub's cache (every file a relative link into `blobs/`),
/// the decoder's weights in external data (`decoder_model_merged.onnx_data`, as a 2B export has),
/// served by repo id offline with the default load-time rewrites: the goldens, as from the folder.
#[tokio::test(flavor = "multi_thread")]
async fn hf_hub_snapshots_with_external_data_serve_the_goldens() {
    for (f, repo) in [
        (FLAT, "onnx-community/granite-vision-tiny-ONNX"),
        (T5, "onnx-community/granite-vision-tiny-t5-ONNX"),
    ] {
        let cache = HubCache::download(&f.dir(), repo, QUANTS, &["onnx/decoder_model_merged.onnx"]);
        for q in QUANTS {
            let m = cache.resolve(q, f.name);
            if *q == "FP32" {
                common::hub::assert_decoder_has_external_data(&m);
            }
            check_on(f, load_with(&m, EngineOpts::ONE_SHOT), q).await;
        }
    }
}

/// The prefix cache and chunked prefill: every golden, its next turn and the same again, with the
/// cache on (chunks of 100, so boundaries fall inside images' runs) equal one-shot prefill.
#[tokio::test(flavor = "multi_thread")]
async fn prefix_cache_and_chunked_prefill_are_exact() {
    let resolved = resolve_dir(&fixture(), NAME, "FP32");
    let bodies = goldens()
        .iter()
        .map(|g| (g.name.clone(), g.body()))
        .collect();
    let cached = common::prefix_cache_matches_one_shot(&resolved, 100, bodies).await;
    assert!(
        cached > 1000,
        "only {cached} prompt tokens came from the cache"
    );
}

/// All goldens at once: decoded together in batched runs, each gets its ids alone.
#[tokio::test(flavor = "multi_thread")]
async fn batched_decoding_equals_alone() {
    let cases = goldens()
        .iter()
        .map(|g| {
            let want = ids(&g.expected["generated"]["FP32"]["ids"]);
            (g.name.clone(), g.body(), want)
        })
        .collect();
    common::batched_matches_alone(model("FP32"), cases).await;
}

/// Structured outputs and a required tool call, with an image in the prompt.
#[tokio::test(flavor = "multi_thread")]
async fn structured_outputs_and_tools_with_an_image() {
    let server = Server::start(vec![model("FP32")]).await;
    let image = goldens()
        .into_iter()
        .find(|g| g.name == "image_wide")
        .unwrap()
        .request["messages"][0]["content"][0]
        .clone();
    let schema = json!({"type": "object", "properties": {
        "label": {"type": "string", "maxLength": 6}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
      "required": ["label", "count"], "additionalProperties": false});
    let validator = jsonschema::validator_for(&schema).unwrap();
    for seed in 0..6 {
        let b = json!({"model": NAME, "temperature": 1, "seed": seed, "max_tokens": 200,
            "messages": [{"role": "user", "content": [image, {"type": "text", "text": "JSON"}]}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}});
        let (status, v) = server.chat(&b).await;
        assert_eq!(status, 200, "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        let parsed: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(validator.is_valid(&parsed), "{text}");
    }
    let b = json!({"model": NAME, "temperature": 1, "seed": 3, "max_tokens": 200,
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "call"}]}],
        "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "tag", "parameters": {"type": "object",
            "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"], "additionalProperties": false}}}]});
    let (_, v) = server.chat(&b).await;
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    let call = &c["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "tag");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(args["k"] == "a" || args["k"] == "b", "{args}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_before_inference() {
    let server = Server::start(vec![model("FP32")]).await;
    // The reserved token in message text would shift every image's rows.
    let (status, v) = server
        .chat(&json!({"model": NAME, "messages": [{"role": "user", "content": "look: <image>"}]}))
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("<image>"),
        "{v}"
    );
    // Not an image.
    let (status, v) = server
        .chat(
            &json!({"model": NAME, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "messages", "{v}");
    // Audio is not something this family takes.
    let (status, v) = server
        .chat(
            &json!({"model": NAME, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    server.shutdown().await;
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

/// An export that records its source repo (what the recipe writes for a hub checkpoint) is served as
/// the catalog's `granite-vision-3.2-2b`, with the repo id and `NAME/QUANT` as aliases; the graphs and
/// the default quantization are the family's.
#[tokio::test(flavor = "multi_thread")]
async fn an_export_of_the_real_repo_is_served_under_its_catalog_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("export");
    copy_dir(&fixture(), &dir);
    let cfg_path = dir.join("config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["_name_or_path"] = json!("ibm-granite/granite-vision-3.2-2b");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let spec = onnx_chat::models::resolve::ModelSpec::parse(dir.to_str().unwrap(), None).unwrap();
    let hub = onnx_chat::models::hub::HubConfig::from_vars(|_| None);
    let m = onnx_chat::models::resolve::resolve(&spec, None, &hub)
        .await
        .unwrap();
    assert_eq!(m.served_name, "granite-vision-3.2-2b");
    assert!(
        m.aliases
            .contains(&"ibm-granite/granite-vision-3.2-2b".to_string()),
        "{:?}",
        m.aliases
    );
    assert!(
        m.aliases
            .contains(&"granite-vision-3.2-2b/Q4_MIXED".to_string()),
        "{:?}",
        m.aliases
    );
    let files: Vec<String> = m.plan.graphs.iter().map(|g| g.rel_path.clone()).collect();
    assert_eq!(
        files,
        [
            "onnx/embed_tokens_quantized.onnx",
            "onnx/decoder_model_merged_q4.onnx",
            "onnx/vision_encoder_quantized.onnx"
        ]
    );
    let loaded = load_with(&m, EngineOpts::ONE_SHOT);
    let server = Server::start(vec![loaded]).await;
    let g = goldens()
        .into_iter()
        .find(|g| g.name == "image_wide")
        .unwrap();
    for name in ["granite-vision-3.2-2b", "ibm-granite/granite-vision-3.2-2b"] {
        let mut body = g.body();
        body["model"] = json!(name);
        let (status, v) = server.chat(&body).await;
        assert_eq!(status, 200, "{name}: {v}");
        assert_eq!(
            ids(&v["choices"][0]["token_ids"]),
            expected(&g, "Q4_MIXED").0,
            "{name}"
        );
    }
    server.shutdown().await;
}

#[test]
fn inspect_lists_the_three_graphs_and_their_variants() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-chat"))
        .args(["inspect", fixture().to_str().unwrap(), "--threads", "1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "family       granite_vision (config.json model_type)",
        "quantization Q4_MIXED",
        "graphs (8):",
        "decoder_model_merged: fp32, q4, quantized",
        "embed_tokens: fp32, quantized",
        "vision_encoder: fp32, q4, quantized",
        "out image_newline",
        "in  pixel_values",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
}

/// `inspect` on the transformers-5 export shows where each processor setting came from and that the
/// model loads as served; with a needed setting removed from the nested entry it fails, naming the
/// key and both files (what the export recipe relies on).
#[test]
fn inspect_reads_the_nested_processor_config_and_fails_on_a_missing_setting() {
    let run = |dir: &Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-chat"))
            .args(["inspect", dir.to_str().unwrap(), "--threads", "1"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = run(&T5.dir());
    assert!(ok, "{text}");
    for want in [
        "image processor    from processor_config.json \"image_processor\"",
        "[0.485,0.456,0.406]",
        "loads as served: ok",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    assert!(!T5.dir().join("preprocessor_config.json").exists());

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t5");
    copy_dir(&T5.dir(), &dir);
    let path = dir.join("processor_config.json");
    let mut pc = read_json(&path);
    pc["image_processor"]
        .as_object_mut()
        .unwrap()
        .remove("image_std");
    std::fs::write(&path, pc.to_string()).unwrap();
    let (ok, text) = run(&dir);
    assert!(!ok, "loaded without image_std:\n{text}");
    for want in [
        "\"image_std\"",
        "processor_config.json \"image_processor\"",
        "preprocessor_config.json",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
}
