//! Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) with the official
//! `anthropic` Python SDK, unchanged (installed into `.venv` by `make test`), and the shapes the SDK
//! does not show: auth headers, errors before and after a stream opens, what Claude Code sends.

mod common;

use common::{goldens, model, sdk_json, Server};
use futures::StreamExt;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn official_anthropic_sdk_works_unchanged() {
    let s = Server::start(vec![model("FP32")]).await;
    let v = sdk_json(
        "tests/python/anthropic_sdk_check.py",
        &s.base,
        "tiny-gemma3n",
    )
    .await;
    let golden = goldens()
        .into_iter()
        .find(|g| g.name == "text_basic")
        .unwrap();
    let (ids, text, finish) = golden.generated("FP32").unwrap();
    let c = &v["create"];
    assert_eq!(
        (c["type"].as_str(), c["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    assert_eq!(c["model"], "tiny-gemma3n");
    assert!(c["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(c["blocks"], json!(["text"]));
    assert_eq!(c["text"], text, "{v}");
    let want_stop = if finish == "length" {
        "max_tokens"
    } else {
        "end_turn"
    };
    assert_eq!(c["stop_reason"], want_stop);
    assert!(c["stop_sequence"].is_null());
    assert_eq!(c["usage"]["output_tokens"], ids.len());
    let prompt = golden.prompt_ids().len() as u64;
    let input = |u: &Value| {
        u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap()
    };
    assert_eq!(input(&c["usage"]), prompt);
    // Streamed through the SDK's accumulator: the same answer, and the event sequence.
    let st = &v["stream"];
    assert_eq!(st["text"], text);
    assert_eq!(st["stop_reason"], want_stop);
    assert_eq!(input(&st["usage"]), prompt);
    assert_eq!(st["usage"]["output_tokens"], ids.len());
    // The repeat reads its prompt from the prefix cache, and says so.
    assert!(
        st["usage"]["cache_read_input_tokens"].as_u64().unwrap() > 0,
        "{st}"
    );
    let events: Vec<&str> = st["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(events.first(), Some(&"message_start"));
    assert_eq!(events.last(), Some(&"message_stop"));
    assert!(events.contains(&"content_block_start") && events.contains(&"content_block_stop"));
    assert!(events.contains(&"message_delta"), "{events:?}");
    // A stop sequence: the text before it, and which one matched.
    let stopped = &v["stopped"];
    let asked = stopped["asked"].as_str().unwrap();
    assert_eq!(stopped["stop_reason"], "stop_sequence", "{stopped}");
    assert_eq!(stopped["stop_sequence"], asked);
    assert_eq!(stopped["text"], &text[..text.find(asked).unwrap()]);
    assert!(v["system_input_tokens"].as_u64().unwrap() > prompt);
    assert_eq!(v["count_tokens"], prompt);
    // Structured output: the grammar makes the random model write JSON that follows the schema.
    let st = &v["structured"];
    assert_eq!(st["stop_reason"], "end_turn", "{st}");
    let answer: Value = serde_json::from_str(st["text"].as_str().unwrap()).unwrap();
    assert!(
        answer["answer"].as_str().unwrap().chars().count() <= 12,
        "{answer}"
    );
    assert_eq!(answer.as_object().unwrap().len(), 1);
    // Tools: a named tool gives exactly one tool_use with an object input; its result goes back.
    let tool = &v["tool"];
    assert_eq!(tool["stop_reason"], "tool_use", "{tool}");
    let calls = tool["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{tool}");
    assert_eq!(calls[0]["name"], "get_weather");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("toolu_"));
    assert!(calls[0]["input"]["city"].is_string(), "{tool}");
    assert!(v["tool_result"]["input_tokens"].as_u64().unwrap() > 0);
    assert!(["end_turn", "max_tokens", "tool_use"]
        .contains(&v["tool_result"]["stop_reason"].as_str().unwrap()));
    let ts = &v["tool_stream"];
    assert_eq!(ts["stop_reason"], "tool_use", "{ts}");
    assert!(!ts["calls"].as_array().unwrap().is_empty());
    assert!(ts["calls"][0]["input"]["city"].is_string(), "{ts}");
    // Errors: the SDK's typed exceptions, Anthropic's types.
    let e = &v["errors"];
    assert_eq!(e["bad_temperature"]["status"], 400, "{e}");
    assert_eq!(e["bad_temperature"]["class"], "BadRequestError");
    assert_eq!(e["bad_temperature"]["type"], "invalid_request_error");
    assert!(e["bad_temperature"]["message"]
        .as_str()
        .unwrap()
        .contains("temperature"));
    assert_eq!(e["unknown_model"]["class"], "NotFoundError", "{e}");
    assert_eq!(e["unknown_model"]["type"], "not_found_error");
    assert_eq!(e["empty_messages"]["status"], 400);
    assert!(e["server_tool"]["message"]
        .as_str()
        .unwrap()
        .contains("tools[0].type"));
    s.shutdown().await;
}

/// Reads an SSE body into (event, data) pairs.
async fn sse_events(resp: reqwest::Response) -> Vec<(String, Value)> {
    let mut body = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        body.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let mut out = Vec::new();
    for block in body.split("\n\n") {
        let (mut name, mut data) = (String::new(), String::new());
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event:") {
                name = n.trim().to_string();
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            }
        }
        if !name.is_empty() {
            out.push((name, serde_json::from_str(&data).unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn what_claude_code_sends_is_honoured_or_ignored() {
    let cfg = onnx_chat::frontend::FrontendConfig {
        api_keys: vec!["sk-test".into()],
        ..Default::default()
    };
    let s = Server::start_with(vec![model("FP32")], cfg).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/messages?beta=true", s.base);
    let tools: Vec<Value> = (0..14)
        .map(|i| {
            json!({"name": format!("Tool{i}"), "description": "a tool",
            "input_schema": {"type": "object", "properties": {"arg": {"type": "string"}},
                             "$schema": "http://json-schema.org/draft-07/schema#"}})
        })
        .collect();
    // Claude Code's request: a huge max_tokens (clamped to the context), adaptive thinking, effort,
    // context management, metadata, cache_control everywhere, streaming.
    let body = json!({
        "model": "tiny-gemma3n", "max_tokens": 32000, "stream": true,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>x</system-reminder>"},
            {"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}}]}],
        "tools": tools, "tool_choice": {"type": "auto"},
        "thinking": {"type": "adaptive", "display": "omitted"},
        "output_config": {"effort": "high"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "metadata": {"user_id": "user_abc"}, "temperature": 1
    });
    let send = |headers: &[(&str, &str)], body: &Value| {
        let mut r = client.post(&url).json(body);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send()
    };
    let claude = [
        ("x-api-key", "sk-test"),
        ("anthropic-version", "2023-06-01"),
        (
            "anthropic-beta",
            "claude-code-20250219,interleaved-thinking-2025-05-14",
        ),
    ];
    let resp = send(&claude, &body).await.unwrap();
    assert_eq!(resp.status(), 200);
    let events = sse_events(resp).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&names[..2], ["message_start", "ping"], "{names:?}");
    assert_eq!(names.last(), Some(&"message_stop"));
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str(), "{data}");
    }
    let delta = &events.iter().find(|(n, _)| n == "message_delta").unwrap().1;
    let reason = delta["delta"]["stop_reason"].as_str().unwrap();
    assert!(
        ["end_turn", "max_tokens", "tool_use"].contains(&reason),
        "{delta}"
    );
    // Blocks open and close in order, each index once.
    let starts: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| d["index"].as_u64().unwrap())
        .collect();
    assert_eq!(starts, (0..starts.len() as u64).collect::<Vec<_>>());

    // Keys: Bearer works too; none or a wrong one is Anthropic's authentication_error.
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    plain["max_tokens"] = json!(4);
    let r = send(&[("authorization", "Bearer sk-test")], &plain)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "message");
    for headers in [&[][..], &[("x-api-key", "wrong")][..]] {
        let r = send(headers, &plain).await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": "authentication_error",
            "message": v["error"]["message"]}})
        );
    }
    // Bad bodies: Anthropic's envelope naming the field; not JSON at all names the body.
    for (b, param) in [
        (
            json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": "x"}]}),
            "max_tokens",
        ),
        (
            json!({"model": "tiny-gemma3n", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}]}),
            "messages[0].content[0].source.url",
        ),
        (
            json!({"model": "tiny-gemma3n", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "top_k": -1}),
            "top_k",
        ),
    ] {
        let r = send(&claude, &b).await.unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"].as_str().unwrap().starts_with(param),
            "{v}"
        );
    }
    let r = client
        .post(&url)
        .header("x-api-key", "sk-test")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    // A prompt longer than the context is a 400 before the stream opens.
    let long = json!({"model": "tiny-gemma3n", "max_tokens": 4, "stream": true,
        "messages": [{"role": "user", "content": "word ".repeat(40_000)}]});
    let r = send(&claude, &long).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    // count_tokens takes the same body without max_tokens.
    let r = client
        .post(format!("{}/v1/messages/count_tokens", s.base))
        .header("x-api-key", "sk-test")
        .json(
            &json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": "hello"}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["input_tokens"].as_u64().unwrap() > 10, "{v}");
    s.shutdown().await;
}
