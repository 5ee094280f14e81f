//! Structured outputs, tools, logprobs and `/v1/completions` over HTTP on the tiny Gemma-3n.
//!
//! The tiny model is random, so whatever it "wants" to write is noise: an answer that parses and
//! validates does so because every step was masked to what the grammar allows.

mod common;

use common::{collect_stream, metric, metrics_text, model, Server};
use futures::StreamExt;
use serde_json::{json, Value};

fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "order": {"type": "object", "properties": {
                "id": {"type": "integer", "minimum": 1, "maximum": 999},
                "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                    "type": "object", "properties": {
                        "sku": {"enum": ["a1", "b2", "c3"]},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["sku", "qty"], "additionalProperties": false}}},
              "required": ["id", "items"], "additionalProperties": false},
            "status": {"enum": ["new", "paid", "shipped"]}},
          "required": ["order", "status"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "title": {"type": "string", "maxLength": 6},
            "note": {"type": ["string", "null"], "maxLength": 4},
            "score": {"type": "integer", "minimum": -5, "maximum": 5}},
          "required": ["title"], "additionalProperties": false}),
        json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
               "minItems": 2, "maxItems": 4}),
        json!({"$defs": {"Point": {"type": "object", "properties": {
                "x": {"type": "integer", "minimum": 0, "maximum": 9},
                "y": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["x", "y"], "additionalProperties": false}},
          "type": "object", "properties": {
            "a": {"$ref": "#/$defs/Point"}, "b": {"$ref": "#/$defs/Point"},
            "label": {"type": "string", "enum": ["p", "q"]}},
          "required": ["a", "b", "label"], "additionalProperties": false}),
    ]
}

fn body(schema: &Value, seed: u64) -> Value {
    json!({
        "model": "tiny-gemma3n",
        "messages": [{"role": "user", "content": "Answer in JSON."}],
        "temperature": 1, "seed": seed, "max_tokens": 600,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "answer", "schema": schema, "strict": true}},
    })
}

/// The answers (text, finish reason) of one request, streamed or not.
async fn answers(s: &Server, b: &Value, stream: bool) -> Vec<(String, String)> {
    if stream {
        let mut b = b.clone();
        b["stream"] = json!(true);
        let (status, events) = s.chat_stream(&b).await;
        assert_eq!(status, 200, "{events:?}");
        // Per choice (with n > 1 the chunks of the choices interleave).
        let n = b["n"].as_u64().unwrap_or(1) as usize;
        let mut out = vec![(String::new(), String::new()); n];
        for c in events
            .iter()
            .filter_map(|e| e.get("choices")?.as_array())
            .flatten()
        {
            let o = &mut out[c["index"].as_u64().unwrap() as usize];
            o.0.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                o.1 = f.to_string();
            }
        }
        out
    } else {
        let (status, v) = s.chat(b).await;
        assert_eq!(status, 200, "{v}");
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["message"]["content"].as_str().unwrap().to_string(),
                    c["finish_reason"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn constrained_answers_always_parse_and_validate() {
    let s = Server::start(vec![model("FP32")]).await;
    let schemas = schemas();
    let validators: Vec<_> = schemas
        .iter()
        .map(|sc| jsonschema::validator_for(sc).unwrap())
        .collect();
    // 220 requests at temperature 1: every schema, some streamed, some with n = 2, some with
    // top-k / top-p, all at once (eight streams decode together in the batch).
    let requests: Vec<(usize, Value, bool)> = (0..220u64)
        .map(|i| {
            let k = i as usize % schemas.len();
            let mut b = body(&schemas[k], 1000 + i);
            if i % 7 == 3 {
                b["n"] = json!(2);
            }
            if i % 5 == 1 {
                b["top_k"] = json!(40);
                b["top_p"] = json!(0.9);
            }
            (k, b, i % 4 == 2)
        })
        .collect();
    let results: Vec<(usize, Vec<(String, String)>)> = futures::stream::iter(requests)
        .map(|(k, b, stream)| {
            let s = &s;
            async move { (k, answers(s, &b, stream).await) }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut count = 0;
    for (k, got) in results {
        for (text, finish) in got {
            assert_eq!(finish, "stop", "schema {k}: {text}");
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("schema {k}: {e}: {text}"));
            let errors: Vec<String> = validators[k]
                .iter_errors(&v)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "schema {k}: {text}: {errors:?}");
            count += 1;
        }
    }
    assert!(count >= 220, "{count}");
    let m = metrics_text(&s.base).await;
    assert!(
        metric(&m, "onnxchat_decode_batch_row_steps_total")
            > metric(&m, "onnxchat_decode_batch_runs_total"),
        "the masked rows decoded in shared runs"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_object_stop_strings_and_bad_schemas() {
    let s = Server::start(vec![model("FP32")]).await;
    let mut ended = 0;
    for seed in 0..12 {
        let b = json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": "json"}],
            "temperature": 1, "seed": seed, "max_tokens": 300, "response_format": {"type": "json_object"}});
        let (status, v) = s.chat(&b).await;
        assert_eq!(status, 200, "{v}");
        let c = &v["choices"][0];
        let text = c["message"]["content"].as_str().unwrap();
        assert!(text.starts_with('{'), "{text}");
        // An answer the grammar let end is a complete object; one cut by max_tokens is not.
        if c["finish_reason"] == "stop" {
            match serde_json::from_str::<Value>(text) {
                Ok(parsed) => assert!(parsed.is_object()),
                // Valid JSON (RFC 8259 sets no limit) with a number past f64, like `1e999`.
                Err(e) if e.to_string().contains("number out of range") => {}
                Err(e) => panic!("{e}: {text}"),
            }
            ended += 1;
        }
    }
    assert!(ended > 0);
    // A stop string ends a constrained answer early, as it ends any other.
    let mut b = body(&schemas()[0], 5);
    b["stop"] = json!(["\"age\""]);
    let (_, v) = s.chat(&b).await;
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with("{\"name\": \""), "{text}");
    assert!(
        text.ends_with("\", ") && !text.contains("age"),
        "ends before the stop string: {text}"
    );
    // Greedy (temperature 0) is constrained too.
    let mut b = body(&schemas()[4], 1);
    b["temperature"] = json!(0);
    let (_, v) = s.chat(&b).await;
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    serde_json::from_str::<Value>(text).unwrap();

    let bad = |rf: Value| {
        json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": "x"}],
            "response_format": rf})
    };
    for (rf, param) in [
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"type": "json_schema"}),
            "response_format.json_schema",
        ),
        (json!({"type": "yaml"}), "response_format.type"),
        (
            json!({"type": "grammar", "grammar": "start: %json {"}),
            "response_format.grammar",
        ),
    ] {
        let (status, v) = s.chat(&bad(rf.clone())).await;
        assert_eq!(status, 400, "{rf}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // The extensions: a regex and a Lark grammar.
    let mut b = bad(json!({"type": "regex", "pattern": "[0-9]{3}-[a-c]{2}"}));
    b["temperature"] = json!(1);
    b["seed"] = json!(3);
    let (_, v) = s.chat(&b).await;
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(text.len(), 6, "{text}");
    assert!(text[..3].bytes().all(|c| c.is_ascii_digit()) && &text[3..4] == "-");
    let mut b = bad(json!({"type": "grammar", "grammar": "start: (\"yes\" | \"no\") \"!\""}));
    b["temperature"] = json!(1);
    let (_, v) = s.chat(&b).await;
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text == "yes!" || text == "no!", "{text}");
    s.shutdown().await;
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["c", "f"]}},
              "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
              "required": ["city"], "additionalProperties": false}}}
    ])
}

fn check_call(call: &Value, tools: &Value) {
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    let name = call["function"]["name"].as_str().unwrap();
    let tool = tools
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == name)
        .unwrap_or_else(|| panic!("unknown function {name}"));
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    let v = jsonschema::validator_for(&tool["function"]["parameters"]).unwrap();
    assert!(v.is_valid(&args), "{args}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_are_constrained_parsed_and_streamed() {
    let s = Server::start(vec![model("FP32")]).await;
    let tools = weather_tools();
    let ask = |choice: Value, seed: u64| {
        json!({"model": "tiny-gemma3n", "temperature": 1, "seed": seed, "max_tokens": 400,
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": tools, "tool_choice": choice})
    };
    // required: always calls, arguments valid for the function called.
    for seed in 0..10 {
        let (status, v) = s.chat(&ask(json!("required"), seed)).await;
        assert_eq!(status, 200, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        assert!(c["message"]["content"].is_null());
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty());
        for call in calls {
            check_call(call, &tools);
        }
    }
    // A named function, no parallel calls.
    let mut b = ask(
        json!({"type": "function", "function": {"name": "get_time"}}),
        3,
    );
    b["parallel_tool_calls"] = json!(false);
    let (_, v) = s.chat(&b).await;
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "get_time");
    check_call(&calls[0], &tools);
    // auto: text or calls, and whichever it is, it is well formed.
    let (mut texts, mut called) = (0, 0);
    for seed in 0..16 {
        let (_, v) = s.chat(&ask(json!("auto"), seed)).await;
        let c = &v["choices"][0];
        match c["finish_reason"].as_str().unwrap() {
            "tool_calls" => {
                called += 1;
                for call in c["message"]["tool_calls"].as_array().unwrap() {
                    check_call(call, &tools);
                }
            }
            _ => {
                texts += 1;
                assert!(!c["message"]["content"].as_str().unwrap().starts_with('{'));
            }
        }
    }
    assert_eq!(texts + called, 16);
    // none: the tools are not shown, the answer is plain text.
    let (_, v) = s.chat(&ask(json!("none"), 1)).await;
    assert!(v["choices"][0]["message"]["tool_calls"].is_null());
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() < 40);
    // Streamed: the call arrives as a tool_calls delta with index, id, type, name and arguments.
    let mut b = ask(json!("required"), 4);
    b["stream"] = json!(true);
    let (status, events) = s.chat_stream(&b).await;
    assert_eq!(status, 200);
    let deltas: Vec<&Value> = events
        .iter()
        .filter_map(|e| e.get("choices")?.get(0))
        .filter(|c| c["delta"].get("tool_calls").is_some())
        .collect();
    assert!(!deltas.is_empty(), "{events:?}");
    let first = &deltas[0]["delta"]["tool_calls"][0];
    assert_eq!(first["index"], 0);
    assert!(first["id"].as_str().unwrap().starts_with("call_"));
    let (_, finish, _, _) = collect_stream(&events);
    assert_eq!(finish.as_deref(), Some("tool_calls"));

    // The round trip: the call and its result in the history, then an answer.
    let (_, v) = s.chat(&ask(json!("required"), 7)).await;
    let call = v["choices"][0]["message"]["tool_calls"][0].clone();
    let b = json!({"model": "tiny-gemma3n", "temperature": 0, "max_tokens": 8, "tools": tools,
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "{\"temp\": 21}"}]});
    let (status, v) = s.chat(&b).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 100);

    for (b, param) in [
        (
            ask(json!({"type": "function", "function": {"name": "nope"}}), 0),
            "tool_choice",
        ),
        (
            json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "retrieval"}]}),
            "tools[0].type",
        ),
        (
            json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"model": "tiny-gemma3n", "messages": [{"role": "tool", "content": "x"}]}),
            "messages[0].tool_call_id",
        ),
    ] {
        let (status, v) = s.chat(&b).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    s.shutdown().await;
}

/// Tool calls end (issue 28, point 5): on the random model, where calling until `max_tokens` is the
/// norm, a named function gives exactly one call, parallel calls are bounded, and an answer cut by
/// the token limit keeps its complete calls (never raw JSON in `content`).
#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_are_bounded_and_survive_the_token_limit() {
    let s = Server::start(vec![model("FP32")]).await;
    let tools = weather_tools();
    let ask = |choice: Value, seed: u64, max_tokens: u64| {
        json!({"model": "tiny-gemma3n", "temperature": 1, "seed": seed, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": tools, "tool_choice": choice})
    };
    // A named function with parallel calls allowed (the default): one call, then the answer ends.
    for seed in 0..6 {
        let b = ask(
            json!({"type": "function", "function": {"name": "get_weather"}}),
            seed,
            600,
        );
        let (status, v) = s.chat(&b).await;
        assert_eq!(status, 200, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{v}");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        check_call(&calls[0], &tools);
    }
    // Parallel calls: never more than the bound; find an answer with several.
    let mut several = None;
    for seed in 0..24 {
        let (_, v) = s.chat(&ask(json!("required"), seed, 1200)).await;
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert!((1..=8).contains(&calls.len()), "{v}");
        if calls.len() >= 2 && several.is_none() {
            several = Some((seed, v.clone()));
        }
    }
    let (seed, full) = several.expect("no answer with two calls in 24 seeds");
    // The same answer cut short inside its last call (one token short of it, or two when the
    // answer ended with an end id, which counts as a token): the calls before the cut one are
    // kept, content stays null and finish_reason says it was cut.
    let tokens = full["usage"]["completion_tokens"].as_u64().unwrap();
    let mut cut = None;
    for short in 1..=2 {
        let (status, v) = s.chat(&ask(json!("required"), seed, tokens - short)).await;
        assert_eq!(status, 200, "{v}");
        if v["choices"][0]["finish_reason"] == "length" {
            cut = Some((short, v));
            break;
        }
        // Only the end id was cut: every call is there.
        let calls = |v: &Value| {
            v["choices"][0]["message"]["tool_calls"]
                .as_array()
                .map(Vec::len)
        };
        assert_eq!(calls(&v), calls(&full), "{v}");
    }
    let (short, v) = cut.expect("no cut answer one or two tokens short");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "length", "{v}");
    assert!(c["message"]["content"].is_null(), "{v}");
    let want = full["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap();
    let got = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(got.len(), want.len() - 1, "{v}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g["function"], w["function"]);
        assert_eq!(
            g["id"].as_str().unwrap().len(),
            w["id"].as_str().unwrap().len()
        );
    }
    // Streamed, the same: the complete calls arrive, then finish_reason "length".
    let mut b = ask(json!("required"), seed, tokens - short);
    b["stream"] = json!(true);
    let (status, events) = s.chat_stream(&b).await;
    assert_eq!(status, 200);
    let streamed = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].as_array())
        .map(Vec::len)
        .sum::<usize>();
    assert_eq!(streamed, want.len() - 1, "{events:?}");
    let (text, finish, _, _) = collect_stream(&events);
    assert_eq!((text.as_str(), finish.as_deref()), ("", Some("length")));
    s.shutdown().await;
}

/// The same token with the same log-probability, to float rounding (a repeated request reuses
/// the first one's cached prompt KV, whose sums ran in other chunks).
fn close(x: &Value, y: &Value) {
    assert_eq!(x["token"], y["token"]);
    assert_eq!(x["bytes"], y["bytes"]);
    let d = x["logprob"].as_f64().unwrap() - y["logprob"].as_f64().unwrap();
    assert!(d.abs() < 1e-4, "{x} vs {y}");
}

#[tokio::test(flavor = "multi_thread")]
async fn logprobs_are_the_models_distribution() {
    let s = Server::start(vec![model("FP32")]).await;
    let b = json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0, "max_tokens": 6, "logprobs": true, "top_logprobs": 5,
        "return_token_ids": true});
    let (status, v) = s.chat(&b).await;
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    let content = c["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), c["token_ids"].as_array().unwrap().len());
    for e in content {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(e["logprob"], top[0]["logprob"]);
        assert_eq!(e["bytes"], top[0]["bytes"]);
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]));
        assert!(lps[0] <= 0.0);
        assert!(lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-4);
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(e["token"], String::from_utf8_lossy(&bytes).as_ref());
    }
    // Against transformers: the first token's top-5 from the golden prefill logits. Log-softmax
    // only shifts logits, so differences of logprobs are differences of logits.
    let g = common::goldens()
        .into_iter()
        .find(|g| g.name == "text_basic")
        .unwrap();
    let mut gb = g.request.clone();
    gb["logprobs"] = json!(true);
    gb["top_logprobs"] = json!(5);
    gb["max_tokens"] = json!(1);
    let (_, gv) = s.chat(&gb).await;
    let top = gv["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        .as_array()
        .unwrap()
        .clone();
    let tok =
        tokenizers::Tokenizer::from_file(common::fixture_dir().join("tokenizer.json")).unwrap();
    let want_ids = g.expected["prefill_top5"].as_array().unwrap();
    let want_logits = g.expected["prefill_top5_logits"].as_array().unwrap();
    for (k, t) in top.iter().enumerate() {
        let id = want_ids[k].as_u64().unwrap() as u32;
        let bytes: Vec<u8> = t["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        let piece = tok.id_to_token(id).unwrap();
        let expect: Vec<u8> = match piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
            Some(h) => vec![u8::from_str_radix(h, 16).unwrap()],
            None => piece.replace('\u{2581}', " ").into_bytes(),
        };
        assert_eq!(bytes, expect, "top {k}");
        let d = t["logprob"].as_f64().unwrap() - top[0]["logprob"].as_f64().unwrap();
        let want = want_logits[k].as_f64().unwrap() - want_logits[0].as_f64().unwrap();
        assert!(
            (d - want).abs() < 2e-3,
            "top {k}: {d} vs transformers {want}"
        );
    }

    // Sampling, a bias and a grammar change what is chosen, not the reported distribution.
    let mut bent = b.clone();
    bent["logit_bias"] = json!({"5": -100});
    let (_, v2) = s.chat(&bent).await;
    let (bent_top, top) = (
        &v2["choices"][0]["logprobs"]["content"][0]["top_logprobs"],
        &content[0]["top_logprobs"],
    );
    for (x, y) in bent_top
        .as_array()
        .unwrap()
        .iter()
        .zip(top.as_array().unwrap())
    {
        close(x, y);
    }
    // Streamed: the same entries, spread over the chunks.
    let mut sb = b.clone();
    sb["stream"] = json!(true);
    let (_, events) = s.chat_stream(&sb).await;
    let streamed: Vec<Value> = events
        .iter()
        .filter_map(|e| e.get("choices")?.get(0)?.get("logprobs")?.get("content"))
        .flat_map(|c| c.as_array().unwrap().clone())
        .collect();
    assert_eq!(streamed.len(), content.len());
    for (x, y) in streamed.iter().zip(content) {
        close(x, y);
        for (tx, ty) in x["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(y["top_logprobs"].as_array().unwrap())
        {
            close(tx, ty);
        }
    }
    // Without logprobs the field is null; top_logprobs needs logprobs; at most 20.
    let (_, v) = s
        .chat(&json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        .await;
    assert!(v["choices"][0]["logprobs"].is_null());
    for (extra, param) in [
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"logit_bias": {"x": 1}}), "logit_bias"),
        (json!({"logit_bias": {"5": 101}}), "logit_bias"),
        (json!({"audio": {"voice": "alloy"}}), "audio"),
        (json!({"modalities": ["text", "audio"]}), "modalities"),
        (json!({"web_search_options": {}}), "web_search_options"),
    ] {
        let mut b =
            json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": "hi"}]});
        for (k, x) in extra.as_object().unwrap() {
            b[k] = x.clone();
        }
        let (status, v) = s.chat(&b).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param);
    }
    // Fields accepted and ignored.
    let (status, _) = s
        .chat(&json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "store": false, "metadata": {"a": "b"}, "user": "u", "service_tier": "auto",
            "modalities": ["text"], "prompt_cache_key": "k", "reasoning_effort": "low"}))
        .await;
    assert_eq!(status, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn text_completions() {
    let s = Server::start(vec![model("FP32")]).await;
    let (status, v) = s
        .post(
            "/v1/completions",
            &json!({"model": "tiny-gemma3n", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "length");
    assert!(c["logprobs"].is_null());
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let first = c["text"].as_str().unwrap().to_string();
    // Raw text: the template is not applied (`<bos>` plus the prompt's own tokens).
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() < 20);

    // A list of prompts, n, echo: choices prompt-major.
    let (_, v) = s
        .post(
            "/v1/completions",
            &json!({"model": "tiny-gemma3n", "prompt": ["Once upon a time", "Hello"], "n": 2,
                "max_tokens": 5, "temperature": 0, "echo": true}),
        )
        .await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    assert_eq!(
        choices[0]["text"].as_str().unwrap(),
        format!("Once upon a time{first}")
    );
    assert!(choices[2]["text"].as_str().unwrap().starts_with("Hello"));
    assert_eq!(v["usage"]["completion_tokens"], 20);

    // Legacy logprobs, streamed and not.
    let b = json!({"model": "tiny-gemma3n", "prompt": "Once upon a time", "max_tokens": 5,
        "temperature": 0, "logprobs": 2});
    let (_, v) = s.post("/v1/completions", &b).await;
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(lp["text_offset"][0], 0);
    assert!(lp["top_logprobs"][0].as_object().unwrap().len() <= 2);
    let mut sb = b.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let (status, events) = s.post_stream("/v1/completions", &sb).await;
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let text: String = events
        .iter()
        .filter_map(|e| e.get("choices")?.get(0)?.get("text")?.as_str())
        .collect();
    assert_eq!(text, first);
    let usage = events
        .iter()
        .rev()
        .find_map(|e| e.get("usage").filter(|u| !u.is_null()))
        .unwrap();
    assert_eq!(usage["completion_tokens"], 5);

    for (b, param) in [
        (
            json!({"model": "tiny-gemma3n", "prompt": "x", "suffix": "y"}),
            "suffix",
        ),
        (
            json!({"model": "tiny-gemma3n", "prompt": [[2, 99999]]}),
            "prompt",
        ),
        (
            json!({"model": "tiny-gemma3n", "prompt": [[2, 5]], "echo": true}),
            "echo",
        ),
        (json!({"model": "tiny-gemma3n"}), "prompt"),
        (
            json!({"model": "tiny-gemma3n", "prompt": "x", "echo": true, "logprobs": 1}),
            "echo",
        ),
        (
            json!({"model": "tiny-gemma3n", "prompt": "<image_soft_token>"}),
            "prompt",
        ),
        (json!({"model": "nope", "prompt": "x"}), "model"),
    ] {
        let (status, v) = s.post("/v1/completions", &b).await;
        assert!(status == 400 || status == 404, "{b}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // A prompt given as token ids is the same prompt as its text (the tokenizer's ids, `<bos>` included).
    let tok =
        tokenizers::Tokenizer::from_file(common::fixture_dir().join("tokenizer.json")).unwrap();
    let ids = tok
        .encode("Once upon a time", true)
        .unwrap()
        .get_ids()
        .to_vec();
    let (_, v) = s
        .post(
            "/v1/completions",
            &json!({"model": "tiny-gemma3n", "prompt": ids, "max_tokens": 5, "temperature": 0}),
        )
        .await;
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), first, "{v}");
    // Offsets stay inside the text even when special tokens (which add no text) are generated.
    let (_, v) = s
        .post(
            "/v1/completions",
            &json!({"model": "tiny-gemma3n", "prompt": "Hi", "max_tokens": 3, "temperature": 0,
                "logit_bias": {"45": 100}, "logprobs": 1}),
        )
        .await;
    let text_len = v["choices"][0]["text"].as_str().unwrap().chars().count() as u64;
    for o in v["choices"][0]["logprobs"]["text_offset"]
        .as_array()
        .unwrap()
    {
        assert!(o.as_u64().unwrap() <= text_len, "{v}");
    }
    // The model card.
    let r = reqwest::get(s.url("/v1/models/tiny-gemma3n"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let card: Value = r.json().await.unwrap();
    assert_eq!(card["id"], "tiny-gemma3n");
    assert_eq!(card["object"], "model");
    s.shutdown().await;
}

/// A model whose chat template has its own tool syntax gets the tools (and the calls and results
/// in the history) through the template, not the Gemma prompt; its calls are parsed afterwards.
#[test]
fn a_template_with_tool_syntax_renders_the_tools_itself() {
    let src = common::fixture_dir();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tool-template-model");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let to = dir.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::os::unix::fs::symlink(e.path(), to).unwrap();
        } else if e.file_name() != "chat_template.jinja" {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{{ bos_token }}{% if tools %}<start_of_turn>system\nTOOLS:{{ tools | tojson }}<end_of_turn>\n{% endif %}\
         {% for m in messages %}<start_of_turn>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}\
         <tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% elif m.role == 'tool' %}RESULT {{ m.tool_call_id }}: {{ m.content }}\
         {% else %}{{ m.content }}{% endif %}<end_of_turn>\n{% endfor %}<start_of_turn>model\n",
    )
    .unwrap();
    let resolved = common::resolve_dir(&dir, "tool-template", "FP32");
    let model = common::load_with(&resolved, common::EngineOpts::ONE_SHOT);
    let job: onnx_chat::protocol::Job = serde_json::from_value(json!({
        "job_id": "j", "model": "tool-template", "reply_to": "r",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "content": [], "tool_calls": [{"id": "c1", "name": "get_time", "arguments": "{\"city\": \"Oslo\"}"}]},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "noon"}]}],
        "tools": [{"name": "get_time", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "required"}
    }))
    .unwrap();
    let prepared = model.prepare(&job).unwrap();
    let text = model
        .tokenizer()
        .decode(&prepared.input.ids, false)
        .unwrap();
    assert!(
        text.contains("TOOLS:[{\"type\": \"function\", \"function\": {\"name\": \"get_time\""),
        "{text}"
    );
    assert!(
        text.contains(
            "<tool_call>{\"name\": \"get_time\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>"
        ),
        "{text}"
    );
    assert!(
        text.contains("RESULT c1: noon"),
        "the tool message reaches the template as it is: {text}"
    );
    assert!(!text.contains("You have access to functions"), "{text}");
    // The call format is the template's: parsed after the fact, not constrained.
    assert!(prepared.params.constraint.is_none());
}
