//! OpenAI's Responses API (`/v1/responses`) with the official `openai` Python SDK and the OpenAI Agents
//! SDK, unchanged (installed into `.venv` by `make test`), and what the SDKs do not show: the raw event
//! sequence, what Codex sends, compressed bodies, stored responses scoped by key. Over NATS with two
//! front ends: tests/nats.rs.

mod common;

use common::{goldens, model, sdk_json, Server};
use futures::StreamExt;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn official_sdks_work_unchanged() {
    let s = Server::start(vec![model("FP32")]).await;
    let v = sdk_json(
        "tests/python/openai_responses_check.py",
        &s.base,
        "tiny-gemma3n",
    )
    .await;
    let golden = goldens()
        .into_iter()
        .find(|g| g.name == "text_basic")
        .unwrap();
    let (ids, text, finish) = golden.generated("FP32").unwrap();
    let prompt = golden.prompt_ids().len() as u64;
    let c = &v["create"];
    assert_eq!(c["object"], "response");
    assert!(c["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(c["text"], text, "{v}");
    assert_eq!(c["items"], json!(["message"]));
    assert_eq!(c["usage"]["input_tokens"], prompt);
    assert_eq!(c["usage"]["output_tokens"], ids.len());
    assert_eq!(c["store"], true);
    // 32 tokens without an end: incomplete, as OpenAI says a cut answer is.
    if finish == "length" {
        assert_eq!(c["status"], "incomplete");
        assert_eq!(c["incomplete"]["reason"], "max_output_tokens");
    } else {
        assert_eq!(c["status"], "completed");
    }
    // Streamed, through the SDK's accumulator: the same answer, the event sequence in order.
    let st = &v["stream"];
    assert_eq!(st["text"], text);
    assert_eq!(st["status"], c["status"]);
    assert!(
        st["usage"]["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    let events: Vec<&str> = st["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    let end = if finish == "length" {
        "response.incomplete"
    } else {
        "response.completed"
    };
    assert_eq!(
        &events[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ],
        "{events:?}"
    );
    assert_eq!(
        &events[events.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            end
        ]
    );
    assert!(events.contains(&"response.output_text.delta"));
    // A continuation holds the first turn: more input tokens, most of them cached.
    let cont = &v["continued"];
    assert_eq!(cont["previous"], c["id"]);
    let input = cont["usage"]["input_tokens"].as_u64().unwrap();
    assert!(input > prompt + ids.len() as u64, "{cont}");
    assert!(
        cont["usage"]["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= prompt,
        "{cont}"
    );
    // Stored: retrieved as it was, its input items listed, then deleted; store: false is never kept.
    assert_eq!(v["retrieve"]["text"], text);
    assert_eq!(v["retrieve"]["input_items"], json!(["message"]));
    assert_eq!(v["retrieve"]["first_text"], "Write a haiku about the sea.");
    assert_eq!(v["after_delete"], 404);
    assert_eq!(v["unstored"], 404);
    // responses.parse: the Pydantic model validates the constrained answer.
    let p = &v["parse"];
    assert_eq!(p["status"], "completed", "{p}");
    assert!(
        p["parsed"]["city"].as_str().unwrap().chars().count() <= 10,
        "{p}"
    );
    // An int, possibly past i64.
    assert!(p["parsed"]["days"].is_number(), "{p}");
    // A named function gives exactly one call; its output goes back with it.
    let t = &v["tool"];
    assert_eq!(t["status"], "completed", "{t}");
    let calls = t["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{t}");
    assert_eq!(calls[0]["name"], "get_weather");
    assert!(calls[0]["arguments"]["city"].is_string());
    assert!(calls[0]["call_id"].as_str().unwrap().starts_with("call_"));
    assert!(v["tool_output"]["input_tokens"].as_u64().unwrap() > 0);
    let ts = &v["tool_stream"];
    assert_eq!(ts["calls"].as_array().unwrap().len(), 1, "{ts}");
    let tevents: Vec<&str> = ts["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        tevents.contains(&"response.function_call_arguments.delta"),
        "{tevents:?}"
    );
    assert!(tevents.contains(&"response.function_call_arguments.done"));
    // Errors: the SDK's typed exceptions naming the field.
    let e = &v["errors"];
    assert_eq!(e["built_in_tool"]["status"], 400, "{e}");
    assert_eq!(e["built_in_tool"]["param"], "tools[0].type");
    assert_eq!(e["unknown_previous"]["class"], "NotFoundError");
    assert_eq!(e["unknown_previous"]["param"], "previous_response_id");
    assert_eq!(e["unknown_model"]["class"], "NotFoundError");
    // The Agents SDK ran its agent to the end: the forced call, the tool, its output as the answer.
    let a = &v["agent"];
    assert_eq!(a["tool_calls"].as_array().unwrap().len(), 1, "{a}");
    assert!(
        a["final_output"].as_str().unwrap().starts_with("Sunny in "),
        "{a}"
    );
    assert!(a["items"]
        .as_array()
        .unwrap()
        .contains(&json!("tool_call_item")));
    s.shutdown().await;
}

/// The SSE events of a response: (event name, data).
async fn events(resp: reqwest::Response) -> Vec<(String, Value)> {
    let mut body = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        body.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    body.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = Some(n.trim().to_string());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            Some((name?, serde_json::from_str(&data).unwrap()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn codex_requests_compressed_bodies_and_keys() {
    let cfg = onnx_chat::frontend::FrontendConfig {
        api_keys: vec!["key-a".into(), "key-b".into()],
        ..Default::default()
    };
    let s = Server::start_with(vec![model("FP32")], cfg).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/responses", s.base);
    // What Codex CLI sends: store false, encrypted reasoning asked for, a cache key, client metadata,
    // function tools, reasoning items from earlier turns, streaming, a huge max_output_tokens.
    let codex = json!({
        "model": "tiny-gemma3n", "instructions": "You are Codex.", "stream": true, "store": false,
        "include": ["reasoning.encrypted_content"], "reasoning": {"effort": "medium", "summary": "auto"},
        "prompt_cache_key": "conv-1", "client_metadata": {"x-codex-turn": "1"},
        "tool_choice": "auto", "parallel_tool_calls": true, "max_output_tokens": 1_000_000,
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<env/>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files"}]},
            {"type": "reasoning", "id": "rs_0", "summary": [], "encrypted_content": "opaque"},
            {"type": "function_call", "call_id": "call_a", "name": "shell", "arguments": "{\"command\":[\"ls\"]}"},
            {"type": "function_call_output", "call_id": "call_a", "output": "README.md"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and now?"}]}],
        "tools": [{"type": "function", "name": "shell", "description": "Runs a command", "strict": false,
                   "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                                  "required": ["command"]}}]
    });
    let resp = client
        .post(&url)
        .bearer_auth("key-a")
        .json(&codex)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let evs = events(resp).await;
    // Every event's sequence_number counts up from 0; the type is the event name.
    for (i, (name, data)) in evs.iter().enumerate() {
        assert_eq!(data["sequence_number"], i as u64, "{data}");
        assert_eq!(data["type"], name.as_str());
    }
    let (last, data) = evs.last().unwrap();
    assert!(
        ["response.completed", "response.incomplete"].contains(&last.as_str()),
        "{last}"
    );
    let r = &data["response"];
    assert_eq!(r["store"], false);
    // The huge limit is clamped to the context: the answer ends, it is not refused.
    assert!(r["usage"]["output_tokens"].as_u64().unwrap() > 0);
    let id = r["id"].as_str().unwrap();
    let get = |id: String, key: &'static str| {
        client
            .get(format!("{}/v1/responses/{id}", s.base))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(get(id.to_string(), "key-a").await.unwrap().status(), 404);

    // Stored under key-a: key-b reads nothing, not even to continue it.
    let body = json!({"model": "tiny-gemma3n", "input": "hello", "max_output_tokens": 16, "temperature": 0});
    let v: Value = client
        .post(&url)
        .bearer_auth("key-a")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(get(id.clone(), "key-a").await.unwrap().status(), 200);
    let r = get(id.clone(), "key-b").await.unwrap();
    assert_eq!(r.status(), 404);
    let cont = json!({"model": "tiny-gemma3n", "input": "more", "previous_response_id": id, "max_output_tokens": 16});
    let r = client
        .post(&url)
        .bearer_auth("key-b")
        .json(&cont)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "previous_response_id", "{e}");

    // Compressed bodies: gzip and zstd give the same answer as plain JSON.
    let plain: Value = client
        .post(&url)
        .bearer_auth("key-a")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let raw = serde_json::to_vec(&body).unwrap();
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&raw).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd_frame(&raw);
    for (encoding, bytes) in [("gzip", gz), ("zstd", zst)] {
        let r = client
            .post(&url)
            .bearer_auth("key-a")
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{encoding}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["output"][0]["content"][0]["text"], plain["output"][0]["content"][0]["text"],
            "{encoding}"
        );
    }
    let r = client
        .post(&url)
        .bearer_auth("key-a")
        .header("content-encoding", "br")
        .body(raw.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    // Refused with the field named: truncation auto, background, the Conversations API.
    for (extra, param) in [
        (json!({"truncation": "auto"}), "truncation"),
        (json!({"background": true}), "background"),
        (json!({"conversation": "conv_1"}), "conversation"),
        (json!({"input": [{"type": "input_file"}]}), "input[0].type"),
    ] {
        let mut b = body.clone();
        for (k, val) in extra.as_object().unwrap() {
            b[k] = val.clone();
        }
        let r = client
            .post(&url)
            .bearer_auth("key-a")
            .json(&b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{b}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{e}");
    }
    s.shutdown().await;
}

/// A zstd frame holding `data` in one raw (uncompressed) block: what any zstd decoder must read,
/// written by hand so the test needs no encoder.
fn zstd_frame(data: &[u8]) -> Vec<u8> {
    assert!(data.len() < 1 << 17);
    let mut out = vec![0x28, 0xB5, 0x2F, 0xFD];
    // Frame header: single segment, 4-byte content size (FCS flag 2).
    out.push(0b1010_0000);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    // One last raw block: header = last(1) | type raw (0) << 1 | size << 3.
    let header = 1u32 | ((data.len() as u32) << 3);
    out.extend_from_slice(&header.to_le_bytes()[..3]);
    out.extend_from_slice(data);
    out
}
