//! The HTTP API over the in-process bus on the tiny model: streaming vs non-streaming, seeded
//! sampling, stop strings, OpenAI-shaped errors with the right status, the side endpoints, auth and
//! cancellation on disconnect.

mod common;

use std::time::Duration;

use common::{collect_stream, goldens, model, Server};
use futures::StreamExt;
use serde_json::{json, Value};

fn basic() -> Value {
    goldens()
        .into_iter()
        .find(|g| g.name == "text_basic")
        .unwrap()
        .request
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_equals_non_streaming() {
    let s = Server::start(vec![model("FP32")]).await;
    for g in goldens().into_iter().filter(|g| g.kind == "text") {
        let (status, full) = s.chat(&g.request).await;
        assert_eq!(status, 200);
        let mut body = g.request.clone();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let (status, events) = s.chat_stream(&body).await;
        assert_eq!(status, 200);
        assert_eq!(events.last().unwrap(), &Value::String("[DONE]".into()));
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(events[0]["object"], "chat.completion.chunk");
        let (text, finish, usage, _) = collect_stream(&events);
        assert_eq!(
            text,
            full["choices"][0]["message"]["content"].as_str().unwrap(),
            "{}",
            g.name
        );
        assert_eq!(
            finish.as_deref(),
            full["choices"][0]["finish_reason"].as_str()
        );
        // Equal but for the prefix cache: the streamed request repeats the JSON one, so it reuses
        // all of its prompt but the last token.
        let mut usage = usage.unwrap();
        let cached = usage["prompt_tokens_details"]["cached_tokens"].take();
        assert_eq!(
            cached.as_u64().unwrap(),
            full["usage"]["prompt_tokens"].as_u64().unwrap() - 1
        );
        let mut want = full["usage"].clone();
        want["prompt_tokens_details"]["cached_tokens"] = Value::Null;
        assert_eq!(usage, want);
        // The usage chunk has no choices; the ones before it carry "usage": null.
        let usage_chunk = &events[events.len() - 2];
        assert_eq!(usage_chunk["choices"], json!([]));
        assert!(events[1]["usage"].is_null() && events[1].get("usage").is_some());
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn seeded_sampling_is_reproducible() {
    let s = Server::start(vec![model("FP32")]).await;
    let mut body = basic();
    body["temperature"] = json!(1.0);
    body["top_p"] = json!(0.9);
    body["max_tokens"] = json!(16);
    let mut outputs = Vec::new();
    for seed in [1, 1, 2, 3, 4] {
        body["seed"] = json!(seed);
        body["return_token_ids"] = json!(true);
        let (status, r) = s.chat(&body).await;
        assert_eq!(status, 200, "{r}");
        outputs.push(r["choices"][0]["token_ids"].clone());
    }
    assert_eq!(outputs[0], outputs[1], "same seed, same tokens");
    assert!(
        outputs[2..].iter().any(|o| o != &outputs[0]),
        "different seeds should differ"
    );
    // Streaming with the same seed gives the same ids too.
    body["seed"] = json!(1);
    body["stream"] = json!(true);
    let (_, events) = s.chat_stream(&body).await;
    let (_, _, _, ids) = collect_stream(&events);
    assert_eq!(json!(ids), outputs[0]);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_string_across_tokens() {
    let m = model("FP32");
    let s = Server::start(vec![m.clone()]).await;
    // Find a token boundary inside plain text in a golden's output and stop on the two characters
    // around it: the stop string spans two tokens.
    let mut found = None;
    'outer: for g in goldens().into_iter().filter(|g| g.kind == "text") {
        let (ids, text, _) = g.generated("FP32").unwrap();
        for i in 1..ids.len() {
            let prefix = m.tokenizer().decode(&ids[..i], true).unwrap();
            if prefix.is_empty() || !text.starts_with(&prefix) || prefix.len() >= text.len() {
                continue;
            }
            let before = prefix.chars().last().unwrap();
            let after = text[prefix.len()..].chars().next().unwrap();
            let plain = |c: char| c != '\u{FFFD}' && !c.is_whitespace();
            if plain(before) && plain(after) {
                found = Some((g.request.clone(), text.clone(), format!("{before}{after}")));
                break 'outer;
            }
        }
    }
    let (mut body, full_text, stop) =
        found.expect("a golden with a token boundary inside plain text");
    let cut = full_text.find(&stop).unwrap();
    body["stop"] = json!([stop.clone(), "never-appears"]);
    let (status, r) = s.chat(&body).await;
    assert_eq!(status, 200);
    assert_eq!(
        r["choices"][0]["message"]["content"].as_str().unwrap(),
        &full_text[..cut]
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let (_, events) = s.chat_stream(&body).await;
    let (text, finish, _, _) = collect_stream(&events);
    assert_eq!(text, &full_text[..cut]);
    assert_eq!(finish.as_deref(), Some("stop"));
    s.shutdown().await;
}

async fn expect_error(s: &Server, body: Value, status: u16, param: Option<&str>) -> Value {
    let (st, r) = s.chat(&body).await;
    assert_eq!(st, status, "{body} → {r}");
    let e = &r["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
    assert!(e["type"].is_string(), "{r}");
    assert!(e.get("code").is_some() && e.get("param").is_some(), "{r}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{r}");
    }
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_openai_errors() {
    let cfg = onnx_chat::frontend::FrontendConfig {
        max_body_bytes: 4096,
        ..Default::default()
    };
    let s = Server::start_with(vec![model("FP32")], cfg).await;
    let client = reqwest::Client::new();
    let raw = |b: &'static str| {
        client
            .post(s.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(b)
            .send()
    };
    let r = raw("{not json").await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "body");
    let m = |extra: Value| {
        let mut b =
            json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let r = expect_error(&s, m(json!({"model": "nope"})), 404, Some("model")).await;
    assert_eq!(r["error"]["code"], "model_not_found");
    expect_error(&s, m(json!({"messages": []})), 400, Some("messages")).await;
    expect_error(&s, m(json!({"messages": "hi"})), 400, Some("messages")).await;
    expect_error(&s, m(json!({"max_tokens": 0})), 400, Some("max_tokens")).await;
    expect_error(&s, m(json!({"max_tokens": "5"})), 400, Some("max_tokens")).await;
    expect_error(
        &s,
        m(json!({"temperature": -0.5})),
        400,
        Some("temperature"),
    )
    .await;
    expect_error(&s, m(json!({"top_p": 0})), 400, Some("top_p")).await;
    expect_error(&s, m(json!({"top_p": 1.01})), 400, Some("top_p")).await;
    expect_error(&s, m(json!({"stop": 3})), 400, Some("stop")).await;
    expect_error(
        &s,
        m(json!({"messages": [{"role": "user"}]})),
        400,
        Some("messages[0].content"),
    )
    .await;
    let r = expect_error(
        &s,
        m(json!({"max_tokens": 100000})),
        400,
        Some("max_tokens"),
    )
    .await;
    assert_eq!(r["error"]["code"], "context_length_exceeded");
    // The template's own rejection comes back as a 400 with its message.
    let r = expect_error(
        &s,
        m(json!({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]})),
        400,
        Some("messages"),
    )
    .await;
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Conversation roles must alternate"));
    // Oversized body → 413, with and without Content-Length.
    let big = json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    let r = client
        .post(s.url("/v1/chat/completions"))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "payload_too_large");
    let chunks = futures::stream::iter(vec![Ok::<_, std::io::Error>(
        serde_json::to_vec(&big).unwrap(),
    )]);
    let r = client
        .post(s.url("/v1/chat/completions"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // A streaming request whose first frame is an error gets a plain HTTP error.
    let mut b = m(json!({"max_tokens": 100000}));
    b["stream"] = json!(true);
    let (st, ev) = s.chat_stream(&b).await;
    assert_eq!(st, 400, "{ev:?}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn side_endpoints_and_auth() {
    let cfg = onnx_chat::frontend::FrontendConfig {
        api_keys: vec!["other".into(), "sekret".into()],
        ..Default::default()
    };
    let s = Server::start_with(vec![model("FP32")], cfg).await;
    let c = reqwest::Client::new();
    let r = c.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    let r = c
        .get(s.url("/v1/models"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny-gemma3n");
    assert_eq!(v["data"][0]["object"], "model");
    let r = c
        .get(s.url("/v1/models/tiny-gemma3n"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(s.url("/v1/models/other"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("wrong")
        .json(&basic())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("sekret")
        .json(&basic())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(c.get(s.url("/health")).send().await.unwrap().status(), 200);
    let r = c.get(s.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["models"], json!(["tiny-gemma3n"]));
    let m = c
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("onnxchat_chat_responses_total{status=\"200\"} 1"),
        "{m}"
    );
    assert!(m.contains("onnxchat_completion_tokens_total 32"), "{m}");
    // The series move: one request timed, one worker job succeeded, slots and queue reported.
    assert!(
        m.contains("onnxchat_request_duration_seconds_count 1"),
        "{m}"
    );
    assert!(
        m.contains("onnxchat_time_to_first_token_seconds_count 1"),
        "{m}"
    );
    assert!(m.contains("onnxchat_inter_token_seconds_count "), "{m}");
    assert!(m.contains("onnxchat_worker_jobs_succeeded_total 1"), "{m}");
    assert!(
        m.contains("onnxchat_worker_generated_tokens_total 32"),
        "{m}"
    );
    assert!(m.contains("onnxchat_worker_slots 8"), "{m}");
    assert!(m.contains("onnxchat_queue_depth 0"), "{m}");
    assert!(m.contains("onnxchat_encoder_cache_misses_total 0"), "{m}");
    assert!(m.contains("onnxchat_job_migrations_total 0"), "{m}");
    let r = c.get(s.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
    let r = c.get(s.url("/v1/chat/completions")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn disconnect_cancels_the_generation() {
    let s = Server::start(vec![model("FP32")]).await;
    let mut body = basic();
    body["max_tokens"] = json!(3000);
    body["stream"] = json!(true);
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let _ = stream.next().await;
    drop(stream);
    // The worker frees its slot long before 3000 tokens could be generated.
    let c = reqwest::Client::new();
    let mut freed = false;
    for _ in 0..100 {
        let m = c
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if m.contains("onnxchat_requests_in_flight 0") {
            let v: Value = c
                .get(s.url("/ready"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if v["free_slots"] == json!(8) {
                freed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "the slot was not freed after the client left");
    s.shutdown().await;
}
