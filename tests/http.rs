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
        // all of its prompt but the last two tokens (never one row alone: bit-exact reuse).
        let mut usage = usage.unwrap();
        let cached = usage["prompt_tokens_details"]["cached_tokens"].take();
        assert_eq!(
            cached.as_u64().unwrap(),
            full["usage"]["prompt_tokens"].as_u64().unwrap() - 2
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

/// The tiny fixture with a chat template that appends `{{ suffix }}` to the prompt when the request's
/// `chat_template_kwargs` set it (every other file linked from the fixture).
fn suffix_template_model(
    dir: &std::path::Path,
) -> std::sync::Arc<onnx_chat::models::loaded::LoadedModel> {
    let fixture = common::fixture_dir();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name != "chat_template.jinja" {
            std::os::unix::fs::symlink(&path, dir.join(name)).unwrap();
        }
    }
    let template = std::fs::read_to_string(fixture.join("chat_template.jinja")).unwrap();
    std::fs::write(
        dir.join("chat_template.jinja"),
        format!("{template}{{%- if suffix is defined %}}{{{{ suffix }}}}{{% endif %}}"),
    )
    .unwrap();
    common::load_with(
        &common::resolve_dir(dir, "tiny-gemma3n", "FP32"),
        common::EngineOpts::ONE_SHOT,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_template_kwargs_reach_the_template() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(vec![suffix_template_model(dir.path())]).await;
    let mut body = basic();
    body["max_tokens"] = json!(4);
    let (status, plain) = s.chat(&body).await;
    assert_eq!(status, 200, "{plain}");
    // The variable reaches the worker's template: the prompt grows by the suffix's tokens.
    body["chat_template_kwargs"] = json!({"suffix": "Sure thing", "enable_thinking": true});
    let (status, r) = s.chat(&body).await;
    assert_eq!(status, 200, "{r}");
    let prompt = |r: &Value| r["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt(&r) > prompt(&plain), "{r} vs {plain}");
    // A model without reasoning markers answers as before: no reasoning fields.
    let message = &r["choices"][0]["message"];
    assert!(message["content"].is_string(), "{r}");
    assert!(message.get("reasoning_content").is_none(), "{r}");
    assert!(r["usage"].get("completion_tokens_details").is_none(), "{r}");
    body["stream"] = json!(true);
    let (status, events) = s.chat_stream(&body).await;
    assert_eq!(status, 200);
    let chunks = events.iter().filter(|e| e.is_object());
    assert!(chunks
        .flat_map(|e| e["choices"].as_array().unwrap())
        .all(|c| c["delta"].get("reasoning_content").is_none()));
    body["stream"] = json!(false);
    // Refused by the front end, naming the field.
    body["chat_template_kwargs"] = json!({"add_generation_prompt": false});
    expect_error(
        &s,
        body.clone(),
        400,
        Some("chat_template_kwargs.add_generation_prompt"),
    )
    .await;
    body["chat_template_kwargs"] = json!(["enable_thinking"]);
    expect_error(&s, body.clone(), 400, Some("chat_template_kwargs")).await;
    let (status, r) = s
        .post(
            "/v1/completions",
            &json!({"model": "tiny-gemma3n", "prompt": "Hi", "chat_template_kwargs": {"suffix": "x"}}),
        )
        .await;
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["error"]["param"], "chat_template_kwargs");
    s.shutdown().await;
}

#[test]
fn workers_refuse_reserved_template_kwargs() {
    // A job published directly (no front end) is checked by the worker too.
    let m = model("FP32");
    let job = onnx_chat::protocol::Job {
        job_id: "j".into(),
        model: "tiny-gemma3n".into(),
        messages: vec![onnx_chat::protocol::ChatMessage::text(
            onnx_chat::protocol::Role::User,
            "hi",
        )],
        chat_template_kwargs: json!({"bos_token": "<x>"}).as_object().cloned(),
        ..Default::default()
    };
    let e = m.prepare(&job).err().expect("refused");
    assert_eq!(e.param.as_deref(), Some("chat_template_kwargs.bos_token"));
    let ok = onnx_chat::protocol::Job {
        chat_template_kwargs: json!({"enable_thinking": true}).as_object().cloned(),
        ..job
    };
    assert!(m.prepare(&ok).is_ok());
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

/// A stand-in worker for a thinking model: answers every job with reasoning frames, then (unless the
/// last message says "cut", as if `max_tokens` ended the reasoning) an answer.
async fn thinking_worker(bus: std::sync::Arc<dyn onnx_chat::bus::Bus>) {
    use onnx_chat::protocol::*;
    let hb = WorkerHeartbeat {
        worker_id: "thinker-worker".into(),
        models: vec![WorkerModel {
            name: "thinker".into(),
            aliases: vec![],
            context_length: 4096,
            quant: None,
            vision: false,
            audio: false,
            created: 0,
            prefixes: vec![],
            max_token_bytes: None,
        }],
        max_concurrent: 4,
        active: 0,
        ttl_ms: 60_000,
        draining: false,
        version: None,
        completed: 0,
        started_ms: 0,
    };
    bus.announce(&hb).await.unwrap();
    let mut source = bus
        .job_source(&["thinker".into()], "thinker-worker")
        .await
        .unwrap();
    loop {
        let jobs = source.next(1, Duration::from_millis(100)).await.unwrap();
        for d in jobs {
            let cut = d.job.messages.last().is_some_and(|m| {
                m.content
                    .iter()
                    .any(|p| matches!(p, ContentPart::Text { text } if text == "cut"))
            });
            let delta = |text: &str, reasoning: &str, id: u32| FrameBody::Delta {
                text: text.into(),
                reasoning: reasoning.into(),
                token_ids: vec![id],
                index: 0,
                logprobs: vec![],
                tool_calls: vec![],
            };
            let mut bodies = vec![delta("", "Let me ", 1), delta("", "think.", 2)];
            if !cut {
                bodies.push(delta(" It is", "", 3));
                bodies.push(delta(" 4.", "", 4));
            }
            bodies.push(FrameBody::Done(DoneBody {
                finish_reason: if cut {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                },
                usage: Usage::new(5, 7).with_reasoning(4),
                timings: Timings::default(),
                choices: vec![],
                stop_sequence: None,
                heartbeat: None,
            }));
            for (seq, body) in bodies.into_iter().enumerate() {
                let frame = Frame {
                    job_id: d.job.job_id.clone(),
                    seq: seq as u64,
                    attempt: d.attempt,
                    body,
                };
                bus.publish_frame(&d.job.reply_to, &frame).await.unwrap();
            }
            d.ack.ack().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reasoning_comes_back_as_reasoning_content() {
    let bus: std::sync::Arc<dyn onnx_chat::bus::Bus> =
        std::sync::Arc::new(onnx_chat::bus::memory::MemoryBus::new());
    let worker = tokio::spawn(thinking_worker(bus.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn({
        let (bus, stop) = (bus.clone(), stop.clone());
        async move {
            onnx_chat::frontend::run(Default::default(), listener, bus, stop).await?;
            Ok(())
        }
    });
    let s = Server { base, stop, handle };
    s.wait_ready().await;
    let body = |text: &str| {
        json!({"model": "thinker", "messages": [{"role": "user", "content": text}],
               "chat_template_kwargs": {"enable_thinking": true}})
    };
    // Whole answer: reasoning apart from content, content as generated (leading space kept).
    let (status, r) = s.chat(&body("2+2?")).await;
    assert_eq!(status, 200, "{r}");
    let m = &r["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "Let me think.");
    assert_eq!(m["content"], " It is 4.");
    assert_eq!(
        r["usage"]["completion_tokens_details"]["reasoning_tokens"],
        4
    );
    // Cut off inside the reasoning: content null, as vLLM.
    let (status, r) = s.chat(&body("cut")).await;
    assert_eq!(status, 200, "{r}");
    let m = &r["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "Let me think.");
    assert!(m["content"].is_null(), "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    // Streaming: reasoning chunks carry delta.reasoning_content and no content.
    let mut b = body("2+2?");
    b["stream"] = json!(true);
    let (status, events) = s.chat_stream(&b).await;
    assert_eq!(status, 200);
    let deltas: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"].as_array())
        .flatten()
        .map(|c| &c["delta"])
        .collect();
    let reasoning: String = deltas
        .iter()
        .filter_map(|d| d["reasoning_content"].as_str())
        .collect();
    assert_eq!(reasoning, "Let me think.");
    for d in deltas
        .iter()
        .filter(|d| d.get("reasoning_content").is_some())
    {
        assert!(d.get("content").is_none(), "{d}");
    }
    let (content, finish, _, _) = collect_stream(&events);
    assert_eq!(content, " It is 4.");
    assert_eq!(finish.as_deref(), Some("stop"));
    worker.abort();
    s.shutdown().await;
}
