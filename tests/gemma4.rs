//! The Gemma 4 family on the committed tiny export (tests/fixtures/tiny-gemma4, made by
//! tools/fixtures/gemma4/generate.sh from transformers' own Gemma4ForConditionalGeneration, in the
//! onnx-community layout) against the reference: prompts (rendered, expanded, ids, with and without
//! `enable_thinking`), the resized images' patches (bit for bit) and soft-token counts, the audio features
//! and frame masks equal what transformers' Gemma4Processor produced; greedy generations through HTTP equal
//! transformers (FP32) and the Python onnxruntime loop (FP16, QUANTIZED, Q4) token for token; the prefix
//! cache, chunked prefill and continuous batching keep them exact; the thought channel comes back as
//! `reasoning_content`; the OpenAI SDK test covers the family too (tests/openai_sdk.rs).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{load_with, npy, resolve_dir, root, EngineOpts, Golden, Server};
use onnx_chat::models::gemma4::{preprocess, Gemma4Config, ImageProcessing, MediaDecoder};
use onnx_chat::models::loaded::LoadedModel;
use serde_json::{json, Value};

const NAME: &str = "tiny-gemma4";
const QUANTS: &[&str] = &["FP32", "FP16", "QUANTIZED", "Q4"];

fn fixture() -> PathBuf {
    root().join("tests/fixtures/tiny-gemma4")
}

fn goldens_dir() -> PathBuf {
    root().join("tests/fixtures/goldens-gemma4")
}

fn goldens() -> Vec<Golden> {
    common::goldens_in(&goldens_dir())
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list of ids: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// What this file reads of a golden beyond `common::Golden`.
trait GoldenExt {
    fn job(&self) -> onnx_chat::protocol::Job;
    fn body(&self) -> Value;
    fn media(&self, kind: &str) -> Vec<&Value>;
}

impl GoldenExt for Golden {
    fn job(&self) -> onnx_chat::protocol::Job {
        onnx_chat::openai::validate(&self.request, &Default::default())
            .unwrap()
            .into_job("golden", NAME, 0, None, None)
    }

    fn body(&self) -> Value {
        let mut b = self.request.clone();
        b["return_token_ids"] = json!(true);
        b
    }

    fn media(&self, kind: &str) -> Vec<&Value> {
        self.expected["media"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["kind"] == kind)
            .collect()
    }
}

fn model(quant: &str) -> Arc<LoadedModel> {
    load_with(&resolve_dir(&fixture(), NAME, quant), EngineOpts::ONE_SHOT)
}

fn media_bytes(m: &Value) -> Vec<u8> {
    std::fs::read(
        root()
            .join("tests/fixtures")
            .join(m["file"].as_str().unwrap()),
    )
    .unwrap()
}

fn decoder() -> MediaDecoder {
    let cfg = Gemma4Config::load(&fixture()).unwrap();
    MediaDecoder::new(
        ImageProcessing::from_config(&cfg.image_processor).unwrap(),
        &preprocess::mel_config(&cfg.feature_extractor),
        Default::default(),
    )
    .unwrap()
}

#[test]
fn prompts_match_the_reference_processor() {
    let m = model("FP32");
    let (mut images, mut clips, mut thinking) = (0, 0, 0);
    for g in goldens() {
        let e = &g.expected;
        let prepared = m.prepare(&g.job()).unwrap();
        assert_eq!(
            prepared.input.ids,
            ids(&e["prompt_ids"]),
            "{}: prompt ids",
            g.name
        );
        if e["chat_template_kwargs"]
            .as_object()
            .is_some_and(|k| !k.is_empty())
        {
            // The template's options only reach it through a job (above); the rendered text says so.
            assert!(
                e["rendered_prompt"].as_str().unwrap().contains("<|think|>"),
                "{}",
                g.name
            );
            thinking += 1;
            continue;
        }
        let p = m.prompt(&g.job().messages).unwrap();
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
        images += p.n_images;
        clips += p.n_audio;
    }
    assert!(
        images >= 4 && clips >= 2 && thinking >= 1,
        "{images} images, {clips} clips, {thinking} thinking prompts"
    );
}

/// Each image's patches against the reference's resized image: the same size, the same soft-token count,
/// and every patch value the reference's pixel (an 8-bit level / 255, exactly), in grid order, padded.
#[test]
fn image_patches_match_the_reference_processor() {
    let d = decoder();
    let mut checked = 0;
    for g in goldens() {
        for (n, m) in g.media("image").into_iter().enumerate() {
            let what = format!("{} image {n}", g.name);
            let got = d.image_bytes(n, &media_bytes(m)).unwrap();
            let (h, w) = (
                m["resized_height"].as_u64().unwrap() as usize,
                m["resized_width"].as_u64().unwrap() as usize,
            );
            assert_eq!(got.shape, [3, h, w], "{what}: resized size");
            let grid = got.patches.as_ref().unwrap();
            assert_eq!(
                grid.soft_tokens as u64,
                m["soft_tokens"].as_u64().unwrap(),
                "{what}: soft tokens"
            );
            let rows = m["max_patches"].as_u64().unwrap() as usize;
            assert_eq!((grid.positions.len(), grid.patch_dim), (rows, 768));
            let png = image::open(g.dir.join(m["resized"].as_str().unwrap()))
                .unwrap()
                .to_rgb8();
            assert_eq!((png.height() as usize, png.width() as usize), (h, w));
            let real = m["num_patches"].as_u64().unwrap() as usize;
            let mut differing = 0;
            for (k, pos) in grid.positions.iter().enumerate() {
                let values = &got.pixel_values[k * 768..(k + 1) * 768];
                if k >= real {
                    assert_eq!(*pos, [-1, -1], "{what}: padding row {k}");
                    assert!(values.iter().all(|&v| v == 0.0), "{what}: padding row {k}");
                    continue;
                }
                assert_eq!(*pos, [(k % (w / 16)) as i64, (k / (w / 16)) as i64]);
                for (j, &v) in values.iter().enumerate() {
                    let (dy, dx, c) = (j / 48, (j / 3) % 16, j % 3);
                    let level = png.get_pixel(
                        pos[0] as u32 * 16 + dx as u32,
                        pos[1] as u32 * 16 + dy as u32,
                    )[c];
                    if v != (level as f64 / 255.0) as f32 {
                        differing += 1;
                    }
                }
            }
            assert_eq!(
                differing, 0,
                "{what}: {differing} values differ from the reference"
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "{checked} images");
}

/// Each clip's log-mel features and frame mask against transformers' Gemma4AudioFeatureExtractor.
#[test]
fn audio_features_match_the_reference_extractor() {
    let d = decoder();
    let (mut clips, mut worst) = (0, 0f32);
    for g in goldens() {
        for (n, m) in g.media("audio").into_iter().enumerate() {
            let what = format!("{} clip {n}", g.name);
            let source = onnx_chat::protocol::MediaSource::Inline {
                data: base64_of(&media_bytes(m)),
            };
            let got = d.audio(n, &source, m["format"].as_str()).unwrap();
            let (shape, data, descr) = npy(&g.dir.join(m["input_features"].as_str().unwrap()));
            assert_eq!(descr, "<f4");
            assert_eq!(shape, [got.frames, got.mel_bins], "{what}: shape");
            for (a, b) in got.features.iter().zip(data.chunks_exact(4)) {
                let b = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                worst = worst.max((a - b).abs());
            }
            let (_, mask, _) = npy(&g.dir.join(m["input_features_mask"].as_str().unwrap()));
            let mask: Vec<bool> = mask.iter().map(|&b| b != 0).collect();
            assert_eq!(got.mask, mask, "{what}: frame mask");
            assert_eq!(
                preprocess::audio_soft_tokens(&got.mask) as u64,
                m["soft_tokens"].as_u64().unwrap(),
                "{what}: soft tokens"
            );
            clips += 1;
        }
    }
    eprintln!("audio features: max |Δ| {worst:.2e} over {clips} clips");
    assert!(clips >= 2 && worst < 1e-4, "{clips} clips, max |Δ| {worst}");
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Greedy ids of the Python onnxruntime loop (`tools/fixtures/gemma4/ort_reference.py`) on this machine
/// for the non-FP32 sets, by case (ONNX Runtime's int8/int4/fp16 kernels round differently per CPU).
fn ort_reference() -> &'static Value {
    static REF: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    REF.get_or_init(|| {
        let mut args = vec![root().join("tests/fixtures").into()];
        args.extend(QUANTS[1..].iter().map(Into::into));
        common::python_json("tools/fixtures/gemma4/ort_reference.py", &args)
    })
}

/// What a golden expects under `quant` (see `common::expected_under`).
fn expected(g: &Golden, quant: &str) -> (Vec<u32>, Value, Value) {
    let eos = ids(&g.expected["eos_token_ids"]);
    common::expected_under(
        g,
        quant,
        ort_reference(),
        &fixture().join("tokenizer.json"),
        &eos,
    )
}

async fn check_quant(quant: &str) {
    let goldens = goldens();
    let checked = common::http_parity(model(quant), &goldens, quant, |g| expected(g, quant)).await;
    assert!(checked >= 7, "{quant}: {checked} goldens");
}

#[tokio::test(flavor = "multi_thread")]
async fn http_parity_fp32_against_transformers() {
    check_quant("FP32").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_parity_other_sets_against_the_onnxruntime_loop() {
    for q in &QUANTS[1..] {
        check_quant(q).await;
    }
}

/// The prefix cache and chunked prefill: every golden, its next turn and the same again, with the cache on
/// (chunks of 64, so boundaries fall inside images' and clips' runs and across the sliding window) equal
/// one-shot prefill.
#[tokio::test(flavor = "multi_thread")]
async fn prefix_cache_and_chunked_prefill_are_exact() {
    let resolved = resolve_dir(&fixture(), NAME, "FP32");
    let bodies = goldens()
        .iter()
        .map(|g| (g.name.clone(), g.body()))
        .collect();
    let cached = common::prefix_cache_matches_one_shot(&resolved, 64, bodies).await;
    assert!(
        cached > 1000,
        "only {cached} prompt tokens came from the cache"
    );
}

/// All goldens at once: decoded together in batched runs (the decoder's own attention_mask), each gets
/// its ids alone.
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

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_before_inference() {
    let server = Server::start(vec![model("FP32")]).await;
    // The reserved placeholders in message text would shift every item's rows.
    for text in ["look: <|image|>", "listen: <|audio|>"] {
        let (status, v) = server
            .chat(&json!({"model": NAME, "messages": [{"role": "user", "content": text}]}))
            .await;
        assert_eq!(status, 400, "{text}: {v}");
        assert_eq!(v["error"]["param"], "messages", "{v}");
    }
    // Not an image; not audio.
    for part in [
        json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}),
        json!({"type": "input_audio", "input_audio": {"data": "aGVsbG8=", "format": "wav"}}),
    ] {
        let (status, v) = server
            .chat(&json!({"model": NAME, "messages": [{"role": "user", "content": [part]}]}))
            .await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["param"], "messages", "{v}");
    }
    server.shutdown().await;
}

#[test]
fn inspect_lists_the_four_graphs_and_their_variants() {
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
        "family       gemma4 (config.json model_type)",
        "quantization Q4",
        "graphs (16):",
        "decoder_model_merged: fp32, fp16, q4, quantized",
        "in  pixel_position_ids",
        "in  per_layer_inputs",
        "in  attention_mask",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
}

/// The catalog names through a Hugging Face cache as hf-hub writes it (the fixture published as
/// onnx-community/gemma-4-E2B-it-ONNX and -E4B-it-ONNX and downloaded by the server's resolver: every
/// file a relative link into `blobs/`, the fp32 graphs' `.onnx_data` among them): display names and
/// repo ids resolve offline, `Q4` is the default set, `/QUANT` picks another, and the snapshot serves
/// every golden under every set (FP32 with external data; default load-time rewrites), also by those
/// names.
#[tokio::test(flavor = "multi_thread")]
async fn catalog_names_resolve_through_the_hub_cache() {
    use common::hub::HubCache;
    use onnx_chat::models::resolve::{self, ModelSpec};
    let e2b = HubCache::download(
        &fixture(),
        "onnx-community/gemma-4-E2B-it-ONNX",
        QUANTS,
        &[],
    );
    let e4b = HubCache::download(
        &fixture(),
        "onnx-community/gemma-4-E4B-it-ONNX",
        &["FP16"],
        &[],
    );
    let files = |m: &resolve::ResolvedModel| -> Vec<String> {
        m.plan.graphs.iter().map(|g| g.rel_path.clone()).collect()
    };
    for (cache, name, served, suffix) in [
        (&e2b, "gemma-4-E2B-it-ONNX", "gemma-4-E2B-it-ONNX", "_q4"),
        (
            &e2b,
            "onnx-community/gemma-4-E2B-it-ONNX",
            "gemma-4-E2B-it-ONNX",
            "_q4",
        ),
        (
            &e4b,
            "gemma-4-E4B-it-ONNX/FP16",
            "gemma-4-E4B-it-ONNX",
            "_fp16",
        ),
        (
            &e2b,
            "gemma-4-E2B-it-ONNX/QUANTIZED",
            "gemma-4-E2B-it-ONNX",
            "_quantized",
        ),
    ] {
        let spec = ModelSpec::parse(name, None).unwrap();
        let m = resolve::resolve(&spec, None, &cache.offline())
            .await
            .unwrap();
        assert_eq!(m.root, cache.snapshot, "{name}");
        assert_eq!(m.served_name, served, "{name}");
        assert_eq!(
            files(&m),
            [
                format!("onnx/embed_tokens{suffix}.onnx"),
                format!("onnx/decoder_model_merged{suffix}.onnx"),
                format!("onnx/vision_encoder{suffix}.onnx"),
                format!("onnx/audio_encoder{suffix}.onnx"),
            ],
            "{name}"
        );
    }
    let spec = ModelSpec::parse("gemma-4-E2B-it-ONNX", None).unwrap();
    let m = resolve::resolve(&spec, None, &e2b.offline()).await.unwrap();
    let server = Server::start(vec![load_with(&m, EngineOpts::ONE_SHOT)]).await;
    let g = goldens()
        .into_iter()
        .find(|g| g.name == "image_one")
        .unwrap();
    for name in [
        "gemma-4-E2B-it-ONNX",
        "onnx-community/gemma-4-E2B-it-ONNX",
        "gemma-4-E2B-it-ONNX/Q4",
    ] {
        let mut body = g.body();
        body["model"] = json!(name);
        let (status, v) = server.chat(&body).await;
        assert_eq!(status, 200, "{name}: {v}");
        assert_eq!(
            ids(&v["choices"][0]["token_ids"]),
            expected(&g, "Q4").0,
            "{name}"
        );
    }
    server.shutdown().await;
    for &quant in QUANTS {
        let m = e2b.resolve(quant, NAME);
        if quant == "FP32" {
            common::hub::assert_decoder_has_external_data(&m);
        }
        let goldens = goldens();
        let checked =
            common::http_parity(load_with(&m, EngineOpts::ONE_SHOT), &goldens, quant, |g| {
                expected(g, quant)
            })
            .await;
        assert!(checked >= 7, "{quant}: {checked} goldens");
    }
}

/// The thought channel comes back as `reasoning_content`, not in `content` (JSON and streamed), with the
/// `thought\n` label stripped and `completion_tokens_details.reasoning_tokens` counted. The tiny random
/// model does not open a thought channel by itself, so a grammar that names the channel's special tokens
/// makes it write one (the split then runs on the real model's ids through the real detokenizer).
#[tokio::test(flavor = "multi_thread")]
async fn the_thought_channel_is_reasoning_content() {
    let server = Server::start(vec![model("FP32")]).await;
    let tok = tokenizers::Tokenizer::from_file(fixture().join("tokenizer.json")).unwrap();
    let (open, close) = (
        tok.token_to_id("<|channel>").unwrap(),
        tok.token_to_id("<channel|>").unwrap(),
    );
    let grammar = format!(
        "start: <[{open}]> \"thought\\n\" /[a-z]{{2,5}}( [a-z]{{2,5}}){{2,3}}/ <[{close}]> /[A-Z][a-z]{{1,5}}( [a-z]{{1,5}}){{1,2}}/"
    );
    let body = json!({"model": NAME, "temperature": 0, "max_tokens": 60, "return_token_ids": true,
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "chat_template_kwargs": {"enable_thinking": true},
        "response_format": {"type": "grammar", "grammar": grammar}});
    let (status, v) = server.chat(&body).await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    let got = ids(&choice["token_ids"]);
    let (at_open, at_close) = (
        got.iter().position(|&t| t == open).unwrap(),
        got.iter().position(|&t| t == close).unwrap(),
    );
    assert_eq!(at_open, 0, "{got:?}");
    let thought = tok.decode(&got[1..at_close], true).unwrap();
    let answer = tok.decode(&got[at_close + 1..], true).unwrap();
    let reasoning = thought.strip_prefix("thought\n").unwrap();
    assert!(
        reasoning.len() >= 5 && !answer.is_empty(),
        "{thought:?} {answer:?}"
    );
    assert_eq!(choice["message"]["reasoning_content"], reasoning, "{v}");
    assert_eq!(choice["message"]["content"], answer, "{v}");
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        at_close + 1,
        "{v}"
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, events) = server.chat_stream(&streamed).await;
    assert_eq!(status, 200);
    let (mut r, mut c) = (String::new(), String::new());
    for e in &events {
        let delta = &e["choices"][0]["delta"];
        r += delta["reasoning_content"].as_str().unwrap_or("");
        c += delta["content"].as_str().unwrap_or("");
    }
    assert_eq!((r.as_str(), c.as_str()), (reasoning, answer.as_str()));

    // Thinking off: the prompt closes an empty channel, and the same request without the grammar has
    // no reasoning at all.
    let plain = json!({"model": NAME, "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": "Why is the sky blue?"}]});
    let (_, v) = server.chat(&plain).await;
    assert!(
        v["choices"][0]["message"]
            .get("reasoning_content")
            .is_none(),
        "{v}"
    );
    assert!(v["usage"].get("completion_tokens_details").is_none(), "{v}");
    server.shutdown().await;
}

/// The Messages API's `thinking` is Gemma 4's thinking switch: enabled renders the template's
/// thinking prompt (more input tokens), disabled and absent do not; the answer's reasoning would come
/// back as `thinking` blocks (the block rendering is unit-tested in `frontend::messages`; the random
/// model does not open a thought channel without a grammar, which this API cannot send).
#[tokio::test(flavor = "multi_thread")]
async fn messages_thinking_is_the_thinking_switch() {
    let server = Server::start(vec![model("FP32")]).await;
    let client = reqwest::Client::new();
    let count = |thinking: Value| {
        let mut b = json!({"model": NAME, "messages": [{"role": "user", "content": "Why is the sky blue?"}]});
        if !thinking.is_null() {
            b["thinking"] = thinking;
        }
        let r = client
            .post(format!("{}/v1/messages/count_tokens", server.base))
            .json(&b)
            .send();
        async move {
            let v: Value = r.await.unwrap().json().await.unwrap();
            v["input_tokens"].as_u64().unwrap_or_else(|| panic!("{v}"))
        }
    };
    let on = count(json!({"type": "enabled", "budget_tokens": 1024})).await;
    let off = count(json!({"type": "disabled"})).await;
    let default = count(Value::Null).await;
    let adaptive = count(json!({"type": "adaptive"})).await;
    assert!(on > off, "{on} {off}");
    assert_eq!((default, adaptive), (off, off));
    // The same through /v1/messages: the usage counts the thinking prompt.
    let r = client
        .post(format!("{}/v1/messages", server.base))
        .json(&json!({"model": NAME, "max_tokens": 4, "temperature": 0,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [{"role": "user", "content": "Why is the sky blue?"}]}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let u = &v["usage"];
    assert_eq!(
        u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap(),
        on,
        "{v}"
    );
    server.shutdown().await;
}

/// The thought channel through the two agent APIs: Anthropic `thinking` blocks (JSON and
/// `thinking_delta` events) and Responses `reasoning` items (`reasoning_text`, JSON and
/// `response.reasoning_text.delta` events), before the answer. As in the chat test above, a grammar
/// (these APIs' `grammar` format extension) makes the random model write a thought channel.
#[tokio::test(flavor = "multi_thread")]
async fn agent_apis_return_the_thought_channel_as_reasoning() {
    let server = Server::start(vec![model("FP32")]).await;
    let tok = tokenizers::Tokenizer::from_file(fixture().join("tokenizer.json")).unwrap();
    let (open, close) = (
        tok.token_to_id("<|channel>").unwrap(),
        tok.token_to_id("<channel|>").unwrap(),
    );
    let grammar = format!(
        "start: <[{open}]> \"thought\\n\" /[a-z]{{2,5}}( [a-z]{{2,5}}){{2,3}}/ <[{close}]> /[A-Z][a-z]{{1,5}}( [a-z]{{1,5}}){{1,2}}/"
    );
    let client = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        client
            .post(format!("{}{path}", server.base))
            .json(&body)
            .send()
    };
    let question = json!([{"role": "user", "content": "Why is the sky blue?"}]);
    // Anthropic: a thinking block, then the text.
    let body = json!({"model": NAME, "max_tokens": 60, "temperature": 0, "messages": question,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "output_config": {"format": {"type": "grammar", "grammar": grammar}}});
    let v: Value = post("/v1/messages", body.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let blocks = v["content"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(blocks.len(), 2, "{v}");
    assert_eq!(blocks[0]["type"], "thinking");
    let thinking = blocks[0]["thinking"].as_str().unwrap().to_string();
    assert!(
        thinking.len() >= 5 && !thinking.starts_with("thought"),
        "{v}"
    );
    assert_eq!(blocks[1]["type"], "text");
    let text = blocks[1]["text"].as_str().unwrap().to_string();
    assert!(text.starts_with(|c: char| c.is_ascii_uppercase()), "{v}");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let sse = post("/v1/messages", streamed)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (mut th, mut tx) = (String::new(), String::new());
    for line in sse.lines().filter_map(|l| l.strip_prefix("data:")) {
        let e: Value = serde_json::from_str(line.trim()).unwrap();
        th += e["delta"]["thinking"].as_str().unwrap_or("");
        tx += e["delta"]["text"].as_str().unwrap_or("");
    }
    assert_eq!(
        (th.as_str(), tx.as_str()),
        (thinking.as_str(), text.as_str())
    );
    // Responses: a reasoning item, then the message; reasoning tokens counted.
    let body = json!({"model": NAME, "max_output_tokens": 60, "temperature": 0, "input": question,
        "reasoning": {"effort": "high"}, "text": {"format": {"type": "grammar", "grammar": grammar}}});
    let v: Value = post("/v1/responses", body.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = v["output"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(items[0]["type"], "reasoning", "{v}");
    assert_eq!(items[0]["content"][0]["type"], "reasoning_text");
    assert_eq!(items[0]["content"][0]["text"], thinking.as_str());
    assert_eq!(items[1]["type"], "message");
    assert_eq!(items[1]["content"][0]["text"], text.as_str());
    assert!(
        v["usage"]["output_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let sse = post("/v1/responses", streamed)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut th = String::new();
    for line in sse.lines().filter_map(|l| l.strip_prefix("data:")) {
        let e: Value = serde_json::from_str(line.trim()).unwrap();
        if e["type"] == "response.reasoning_text.delta" {
            th += e["delta"].as_str().unwrap();
        }
    }
    assert_eq!(th, thinking);
    server.shutdown().await;
}

/// Tools through the template's own syntax: the declarations and the history's calls are rendered in
/// Gemma 4's `<|tool>` / `<|tool_call>` format, and an answer in that format comes back as OpenAI
/// `tool_calls` (JSON and streamed). The tiny random model does not call tools by itself, so a grammar
/// naming the call tokens makes it write one.
#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_in_the_templates_own_syntax() {
    let m = model("FP32");
    let tok = m.tokenizer().clone();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Weather of a city", "parameters": {"type": "object",
        "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]);
    // The history's call and its result, rendered by the template.
    let history = json!({"model": NAME, "tools": tools, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]});
    let job = onnx_chat::openai::validate(&history, &Default::default())
        .unwrap()
        .into_job("t", NAME, 0, None, None);
    let ids = m.prepare(&job).unwrap().input.ids;
    let text = tok.decode(&ids, false).unwrap();
    for want in [
        "<|tool>declaration:get_weather{description:<|\"|>Weather of a city<|\"|>,parameters:{properties:{location:{type:<|\"|>STRING<|\"|>}},required:[<|\"|>location<|\"|>],type:<|\"|>OBJECT<|\"|>}}<tool|>",
        "<|turn>model\n<|tool_call>call:get_weather{location:<|\"|>Paris<|\"|>}<tool_call|><turn|>",
        "<|turn>tool\nsunny<turn|>",
    ] {
        assert!(text.contains(want), "{want:?} not in {text:?}");
    }

    let server = Server::start(vec![m]).await;
    let grammar = format!(
        "start: <[{}]> \"call:get_weather{{location:\" <[{q}]> /[A-Z][a-z]{{2,6}}/ <[{q}]> \"}}\" <[{}]>",
        id("<|tool_call>"),
        id("<tool_call|>"),
        q = id("<|\"|>")
    );
    let body = json!({"model": NAME, "temperature": 0, "max_tokens": 40, "tools": tools,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "response_format": {"type": "grammar", "grammar": grammar}});
    let (status, v) = server.chat(&body).await;
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    assert!(c["message"]["content"].is_null(), "{v}");
    let call = &c["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{v}");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    let city = args["location"].as_str().unwrap().to_string();
    assert!(
        city.len() >= 3 && city.chars().all(char::is_alphabetic),
        "{args}"
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, events) = server.chat_stream(&streamed).await;
    assert_eq!(status, 200);
    let calls: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls.len(), 1, "{events:?}");
    assert_eq!(
        calls[0]["function"]["arguments"],
        call["function"]["arguments"]
    );
    assert!(events.iter().all(|e| e["choices"][0]["delta"]["content"]
        .as_str()
        .is_none_or(str::is_empty)));
    server.shutdown().await;
}
