//! The serving engine on the tiny Gemma-3n, through HTTP: the prefix cache and chunked prefill give
//! the same greedy ids as one-shot prefill without a cache (every golden, every quantization; turn 2
//! of a conversation hitting turn 1's entry; a partial prefix; chunk boundaries inside image and
//! audio soft tokens), `n > 1`, isolation by API key and `cache_salt`, eviction under a small budget,
//! and the metrics.

mod common;

use std::sync::Arc;

use common::{
    fixture_dir, goldens, load_with, metric, metrics_text, resolve_dir, EngineOpts, Golden, Server,
};
use onnx_chat::models::loaded::LoadedModel;
use serde_json::{json, Value};

/// A chunk small enough that the image (256 soft tokens) and audio (188) blocks of the goldens are
/// split across several prefill steps.
const CHUNK: usize = 64;

fn model(quant: &str, e: EngineOpts) -> Arc<LoadedModel> {
    load_with(&resolve_dir(&fixture_dir(), "tiny-gemma3n", quant), e)
}

async fn post(server: &Server, body: &Value, key: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn ids(choice: &Value) -> Vec<u64> {
    choice["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

fn cached(resp: &Value) -> u64 {
    resp["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {resp}"))
}

/// The golden request, greedy, with ids returned.
fn request(g: &Golden) -> Value {
    let mut b = g.request.clone();
    b["return_token_ids"] = json!(true);
    b
}

/// The next turn: the answer as the assistant message, then a new question.
fn next_turn(body: &Value, answer: &str) -> Value {
    let mut b = body.clone();
    let msgs = b["messages"].as_array_mut().unwrap();
    msgs.push(json!({"role": "assistant", "content": answer}));
    msgs.push(json!({"role": "user", "content": "Say more about it."}));
    b
}

/// The same conversation with the last user message's text changed: a prefix up to that text
/// (media included) is shared.
fn changed_question(body: &Value) -> Value {
    let mut b = body.clone();
    let last = b["messages"].as_array_mut().unwrap().last_mut().unwrap();
    match &mut last["content"] {
        Value::String(s) => s.push_str(" Briefly, please."),
        Value::Array(parts) => {
            let t = parts
                .iter_mut()
                .rev()
                .find(|p| p["type"] == "text")
                .unwrap();
            let text = format!("{} Briefly, please.", t["text"].as_str().unwrap());
            t["text"] = json!(text);
        }
        other => panic!("content {other}"),
    }
    b
}

/// For one quantization: every golden, its next turn and a changed question, on a server with the
/// cache and chunked prefill and on one without either. Returns (requests, cached tokens seen).
async fn cache_on_off(quant: &str) -> (usize, u64) {
    let on = Server::start(vec![model(quant, EngineOpts::cached(CHUNK))]).await;
    let off = Server::start(vec![model(quant, EngineOpts::ONE_SHOT)]).await;
    let (mut n, mut cached_total) = (0, 0);
    for g in goldens() {
        let turn1 = request(&g);
        let (s_off, r_off) = post(&off, &turn1, None).await;
        let (s_on, r_on) = post(&on, &turn1, None).await;
        assert_eq!(
            (s_off, s_on),
            (200, 200),
            "{quant} {}: {r_off} {r_on}",
            g.name
        );
        let expected = g.expected_for(quant).unwrap().0;
        let expected: Vec<u64> = expected.into_iter().map(u64::from).collect();
        assert_eq!(
            ids(&r_off["choices"][0]),
            expected,
            "{quant} {}: one-shot",
            g.name
        );
        assert_eq!(
            ids(&r_on["choices"][0]),
            expected,
            "{quant} {}: chunked, cache on",
            g.name
        );
        let answer = r_on["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        for (what, body) in [
            ("turn 2", next_turn(&turn1, &answer)),
            ("changed question", changed_question(&turn1)),
        ] {
            let (s_off, r_off) = post(&off, &body, None).await;
            let (s_on, r_on) = post(&on, &body, None).await;
            assert_eq!((s_off, s_on), (200, 200), "{quant} {} {what}", g.name);
            assert_eq!(
                ids(&r_on["choices"][0]),
                ids(&r_off["choices"][0]),
                "{quant} {} {what}: ids with the cache on (cached_tokens {})",
                g.name,
                cached(&r_on)
            );
            assert_eq!(cached(&r_off), 0);
            cached_total += cached(&r_on);
            n += 1;
        }
    }
    on.shutdown().await;
    off.shutdown().await;
    (n, cached_total)
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_on_and_off_agree_fp32() {
    let (n, c) = cache_on_off("FP32").await;
    assert!(c > 0 && n == 14, "{n} requests, {c} cached tokens");
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_on_and_off_agree_fp16() {
    let (_, c) = cache_on_off("FP16").await;
    assert!(c > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_on_and_off_agree_q4_mixed() {
    let (_, c) = cache_on_off("Q4_MIXED").await;
    assert!(c > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_on_and_off_agree_q4() {
    let (_, c) = cache_on_off("Q4").await;
    assert!(c > 0);
}

/// Reuse is exact where the first token is chosen: ONNX
/// Runtime's kernels (MatMulNBits at accuracy levels 0 and 4, the fp32 GEMMs) give a row the same
/// bits whatever the number of rows beside it, except a row computed alone (M = 1 takes the GEMV
/// paths). A cache hit therefore recomputes the prompt's last two positions, never the last one
/// alone, and the first answer token's log-probabilities (the last prompt position's logits) are
/// bit for bit those of the cold run, every quantization at the default settings — also for
/// prompts longer than the window − 1 + 64 = 79 positions a stored entry keeps of the
/// sliding-window layers: the fused attention kernel gives a query row the same bits whatever the
/// buffer holds outside its keys (`src/engine/attention.rs`).
#[tokio::test(flavor = "multi_thread")]
async fn a_warm_prompt_chooses_its_first_token_from_the_cold_logits_bit_for_bit() {
    const UNTRIMMED: u64 = 15 + 64;
    let mut bodies: Vec<(String, Value)> = goldens()
        .into_iter()
        .map(|g| (g.name.clone(), request(&g)))
        .collect();
    for (i, q) in [
        "What is the capital of France?",
        "Write two lines about the sea, please, in plain words.",
        "List three prime numbers and say why each one is prime.",
    ]
    .iter()
    .enumerate()
    {
        bodies.push((format!("short_{i}"), text_body(q)));
    }
    let (mut exact, mut longer) = (0, 0);
    for quant in ["Q4_MIXED", "Q4", "FP16", "FP32"] {
        let server = Server::start(vec![model(quant, EngineOpts::cached(CHUNK))]).await;
        for (name, b) in &bodies {
            let mut body = b.clone();
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(5);
            body["max_tokens"] = json!(2);
            // A salt of its own per prompt and quantization: the first request is cold.
            body["cache_salt"] = json!(format!("{quant}-{name}"));
            let (s1, cold) = post(&server, &body, None).await;
            let (s2, warm) = post(&server, &body, None).await;
            assert_eq!((s1, s2), (200, 200), "{quant} {name}: {cold} {warm}");
            assert_eq!(cached(&cold), 0, "{quant} {name}");
            assert!(cached(&warm) > 0, "{quant} {name}: no reuse");
            let (c, w) = (
                &cold["choices"][0]["logprobs"]["content"][0],
                &warm["choices"][0]["logprobs"]["content"][0],
            );
            assert!(c.is_object(), "{cold}");
            let prompt = warm["usage"]["prompt_tokens"].as_u64().unwrap();
            eprintln!(
                "{quant} {name}: prompt {prompt}, cached {}: first-token logits {}",
                cached(&warm),
                if c == w { "bit-exact" } else { "differ" }
            );
            assert_eq!(c, w, "{quant} {name}: warm vs cold (prompt {prompt})");
            exact += 1;
            longer += usize::from(prompt > UNTRIMMED);
        }
        server.shutdown().await;
    }
    assert!(exact >= 4 * 8, "{exact} prompts checked");
    assert!(
        longer >= 4 * 4,
        "{longer} prompts past the stored window checked"
    );
}

/// The `_quantized` decoder quantizes activations per tensor and run: reuse would change its numbers,
/// so by default it runs every prompt in one piece without the cache (and stays exact).
#[tokio::test(flavor = "multi_thread")]
async fn dynamic_quantization_keeps_prompts_whole_by_default() {
    let (_, c) = cache_on_off("QUANTIZED").await;
    assert_eq!(c, 0, "no reuse on a dynamically quantized decoder");
    // With --allow-inexact-reuse the cache is used.
    let e = EngineOpts {
        allow_inexact: true,
        ..EngineOpts::cached(CHUNK)
    };
    let server = Server::start(vec![model("QUANTIZED", e)]).await;
    let g = &goldens()[0];
    let (_, r1) = post(&server, &request(g), None).await;
    let answer = r1["choices"][0]["message"]["content"].as_str().unwrap();
    let (s, r2) = post(&server, &next_turn(&request(g), answer), None).await;
    assert_eq!(s, 200);
    assert!(cached(&r2) > 0, "{r2}");
    server.shutdown().await;
}

fn text_body(text: &str) -> Value {
    json!({"model": "tiny-gemma3n", "temperature": 0, "max_tokens": 8, "return_token_ids": true,
           "messages": [{"role": "user", "content": text}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_tokens_count_the_reused_prefix_and_metrics_show_it() {
    let server = Server::start(vec![model("FP32", EngineOpts::cached(CHUNK))]).await;
    let body = text_body("Write a haiku about the sea.");
    let (_, r1) = post(&server, &body, None).await;
    assert_eq!(cached(&r1), 0);
    let prompt = r1["usage"]["prompt_tokens"].as_u64().unwrap();
    // The same request again: everything but the last two prompt tokens comes from the cache.
    let (_, r2) = post(&server, &body, None).await;
    assert_eq!(cached(&r2), prompt - 2);
    assert_eq!(ids(&r2["choices"][0]), ids(&r1["choices"][0]));
    let answer = r1["choices"][0]["message"]["content"].as_str().unwrap();
    let (_, r3) = post(&server, &next_turn(&body, answer), None).await;
    assert!(
        cached(&r3) >= prompt,
        "turn 2 reuses turn 1 and its answer: {r3}"
    );
    let m = metrics_text(&server.base).await;
    let value = |name: &str| metric(&m, name);
    assert!(value("onnxchat_prefix_cache_hit_tokens_total") >= (2 * prompt - 2) as f64);
    assert!(value("onnxchat_prefix_cache_miss_tokens_total") > 0.0);
    assert!(value("onnxchat_prefix_cache_bytes") > 0.0);
    assert!(value("onnxchat_prefix_cache_entries") >= 1.0);
    assert_eq!(value("onnxchat_prefix_cache_evictions_total"), 0.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_and_cache_salts_never_share_kv() {
    let cfg = onnx_chat::frontend::FrontendConfig {
        api_keys: vec!["key-one".into(), "key-two".into()],
        ..Default::default()
    };
    let server = Server::start_with(vec![model("FP32", EngineOpts::cached(CHUNK))], cfg).await;
    let body = text_body("Tell me a secret about the sea.");
    let with_salt = |salt: &str| {
        let mut b = body.clone();
        b["cache_salt"] = json!(salt);
        b
    };
    let (s, r) = post(&server, &body, Some("key-one")).await;
    assert_eq!((s, cached(&r)), (200, 0));
    let reference = ids(&r["choices"][0]);
    let (_, r) = post(&server, &body, Some("key-two")).await;
    assert_eq!(cached(&r), 0, "another API key must not see key-one's KV");
    assert_eq!(ids(&r["choices"][0]), reference);
    let (_, r) = post(&server, &body, Some("key-one")).await;
    assert!(cached(&r) > 0, "the same key reuses its own KV");
    let (_, r) = post(&server, &with_salt("tenant-a"), Some("key-one")).await;
    assert_eq!(cached(&r), 0, "a salt is a scope of its own");
    let (_, r) = post(&server, &with_salt("tenant-b"), Some("key-one")).await;
    assert_eq!(cached(&r), 0);
    let (_, r) = post(&server, &with_salt("tenant-a"), Some("key-one")).await;
    assert!(cached(&r) > 0);
    let (_, r) = post(&server, &with_salt("tenant-a"), Some("key-two")).await;
    assert_eq!(
        cached(&r),
        0,
        "the same salt under another key is another scope"
    );
    assert_eq!(ids(&r["choices"][0]), reference);
    let (s, r) = post(&server, &with_salt(""), Some("key-one")).await;
    assert_eq!(s, 400);
    assert_eq!(r["error"]["param"], "cache_salt");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_budget_evicts_without_errors_or_other_answers() {
    // About two conversations of the tiny model (512 bytes of KV per position).
    let e = EngineOpts {
        kv_cache_bytes: 48 * 1024,
        ..EngineOpts::cached(CHUNK)
    };
    let small = Server::start(vec![model("FP32", e)]).await;
    let off = Server::start(vec![model("FP32", EngineOpts::ONE_SHOT)]).await;
    for round in 0..2 {
        for (i, topic) in ["the sea", "a mountain", "the city", "a forest", "the moon"]
            .iter()
            .enumerate()
        {
            let body = text_body(&format!("Write a long poem about {topic}, number {i}."));
            let (s1, a) = post(&small, &body, None).await;
            let (s2, b) = post(&off, &body, None).await;
            assert_eq!((s1, s2), (200, 200), "round {round}: {a}");
            assert_eq!(ids(&a["choices"][0]), ids(&b["choices"][0]));
        }
    }
    let m = metrics_text(&small.base).await;
    let evictions = metric(&m, "onnxchat_prefix_cache_evictions_total");
    let bytes = metric(&m, "onnxchat_prefix_cache_bytes");
    assert!(evictions > 0.0, "{m}");
    assert!(bytes <= 48.0 * 1024.0);
    small.shutdown().await;
    off.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn n_choices_share_one_prefill_and_reproduce() {
    let server = Server::start(vec![model("FP32", EngineOpts::cached(CHUNK))]).await;
    let body = json!({"model": "tiny-gemma3n", "n": 3, "temperature": 1.0, "seed": 11,
        "max_tokens": 12, "return_token_ids": true,
        "messages": [{"role": "user", "content": "Write a haiku about the sea."}]});
    let (s, r) = post(&server, &body, None).await;
    assert_eq!(s, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let per: Vec<Vec<u64>> = choices.iter().map(ids).collect();
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i as u64);
        assert!(["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()));
    }
    assert!(
        per[0] != per[1] || per[1] != per[2],
        "three samples with their own seeds: {per:?}"
    );
    let total: usize = per.iter().map(Vec::len).sum();
    assert_eq!(r["usage"]["completion_tokens"], total as u64);
    // The same request gives the same n answers; choice 0 is what n = 1 gives with that seed.
    let (_, again) = post(&server, &body, None).await;
    let per2: Vec<Vec<u64>> = again["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    assert_eq!(per2, per);
    let mut one = body.clone();
    one["n"] = json!(1);
    let (_, single) = post(&server, &one, None).await;
    assert_eq!(ids(&single["choices"][0]), per[0]);
    // Streaming: every chunk names its choice; reassembled, the texts equal the JSON answer.
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let (s, events) = server.chat_stream(&stream).await;
    assert_eq!(s, 200);
    let mut texts = vec![String::new(); 3];
    let mut finishes = vec![None; 3];
    let mut roles = 0;
    let mut usage = None;
    for ev in &events {
        if let Some(u) = ev.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        for c in ev["choices"].as_array().into_iter().flatten() {
            let i = c["index"].as_u64().unwrap() as usize;
            if c["delta"]["role"] == "assistant" {
                roles += 1;
            }
            if let Some(t) = c["delta"]["content"].as_str() {
                texts[i].push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finishes[i] = Some(f.to_string());
            }
        }
    }
    assert_eq!(roles, 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(texts[i], c["message"]["content"].as_str().unwrap());
        assert_eq!(finishes[i].as_deref(), c["finish_reason"].as_str());
    }
    assert_eq!(usage.unwrap()["completion_tokens"], total as u64);
    // Bounded.
    let mut too_many = body.clone();
    too_many["n"] = json!(9);
    let (s, r) = post(&server, &too_many, None).await;
    assert_eq!((s, r["error"]["param"].as_str()), (400, Some("n")));
    server.shutdown().await;
}

/// Greedy n > 1 after a cached prefix: every choice equals the single greedy answer.
#[tokio::test(flavor = "multi_thread")]
async fn greedy_choices_equal_the_single_answer() {
    let server = Server::start(vec![model("Q4_MIXED", EngineOpts::cached(CHUNK))]).await;
    for g in goldens().iter().filter(|g| g.kind != "text").take(2) {
        let mut body = request(g);
        let (_, one) = post(&server, &body, None).await;
        body["n"] = json!(2);
        let (s, two) = post(&server, &body, None).await;
        assert_eq!(s, 200, "{two}");
        assert!(cached(&two) > 0);
        for c in two["choices"].as_array().unwrap() {
            assert_eq!(ids(c), ids(&one["choices"][0]), "{}", g.name);
        }
    }
    server.shutdown().await;
}
