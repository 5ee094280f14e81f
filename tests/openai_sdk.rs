//! The official OpenAI Python SDK (installed into `.venv` by `make test`) works unchanged against the
//! server: model list, chat completion, streaming with usage, and its typed errors.

mod common;

use common::{goldens, model, root, Server};
use serde_json::Value;

/// Runs `tests/python/<script>` against the server at `base` and returns the JSON it prints.
async fn sdk_script(script: &str, base: &str) -> Value {
    sdk_script_with(script, base, &["tiny-gemma3n"]).await
}

/// [`sdk_script`] with other arguments after the base URL.
async fn sdk_script_with(script: &str, base: &str, args: &[&str]) -> Value {
    let python = root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run `make setup`",
        python.display()
    );
    let (script, base) = (root().join("tests/python").join(script), base.to_string());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .arg(base)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "SDK script failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn official_python_sdk_works_unchanged() {
    let s = Server::start(vec![model("FP32")]).await;
    let v = sdk_script("openai_sdk_check.py", &s.base).await;
    let golden = goldens()
        .into_iter()
        .find(|g| g.name == "text_basic")
        .unwrap();
    let (ids, text, finish) = golden.generated("FP32").unwrap();
    assert_eq!(v["models"], serde_json::json!(["tiny-gemma3n"]));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["text"], text);
    assert_eq!(v["finish_reason"], finish);
    assert_eq!(v["usage"]["completion_tokens"], ids.len());
    assert_eq!(v["usage"]["prompt_tokens"], golden.prompt_ids().len());
    assert_eq!(v["stream_text"], text);
    assert_eq!(v["stream_finish_reason"], finish);
    // The streamed request repeats the first: the SDK reads the prefix cache's share of it.
    let details = |u: &Value| {
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(details(&v["usage"]), 0);
    assert_eq!(
        details(&v["stream_usage"]),
        golden.prompt_ids().len() as u64 - 2
    );
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(v["stream_usage"][k], v["usage"][k], "{k}");
    }
    assert!(v["stream_chunks"].as_u64().unwrap() >= 3);
    assert_eq!(v["not_found"]["status"], 404);
    assert_eq!(v["not_found"]["code"], "model_not_found");
    assert_eq!(v["bad_request"]["status"], 400);
    assert_eq!(v["bad_request"]["param"], "temperature");
    s.shutdown().await;
}

/// The same SDK session against Granite Vision, the question carrying an image: the SDK's answers
/// (plain and streamed) are the server's greedy answer to that request.
#[tokio::test(flavor = "multi_thread")]
async fn official_python_sdk_works_against_granite_vision() {
    let dir = root().join("tests/fixtures/tiny-granite-vision");
    let name = "tiny-granite-vision";
    let m = common::load_with(
        &common::resolve_dir(&dir, name, "FP32"),
        common::EngineOpts::ONE_SHOT,
    );
    let s = Server::start(vec![m]).await;
    let image = root().join("tests/fixtures/goldens-granite-vision/media/wide_500x200.png");
    let v = sdk_script_with(
        "openai_sdk_check.py",
        &s.base,
        &[name, image.to_str().unwrap()],
    )
    .await;
    assert_eq!(v["models"], serde_json::json!([name]));
    assert_eq!(v["object"], "chat.completion");
    let data = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        std::fs::read(&image).unwrap(),
    );
    let body = serde_json::json!({"model": name, "temperature": 0, "max_tokens": 32, "messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{data}")}},
            {"type": "text", "text": "Write a haiku about the sea."}]}]});
    let (status, direct) = s.chat(&body).await;
    assert_eq!(status, 200, "{direct}");
    let text = &direct["choices"][0]["message"]["content"];
    assert_eq!(&v["text"], text);
    assert_eq!(&v["stream_text"], text);
    assert_eq!(v["finish_reason"], direct["choices"][0]["finish_reason"]);
    // More than the image's 1 884 <image> tokens.
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 1884, "{v}");
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(v["stream_usage"][k], v["usage"][k], "{k}");
    }
    assert_eq!(v["not_found"]["status"], 404);
    assert_eq!(v["bad_request"]["param"], "temperature");
    s.shutdown().await;
}

/// `chat.completions.parse` with a Pydantic model, a tool round trip, streamed tool calls
/// reassembled by the SDK's stream helper, logprobs, and `completions.create`.
#[tokio::test(flavor = "multi_thread")]
async fn sdk_structured_outputs_tools_logprobs_and_completions() {
    // Its own instance without a prefix cache: the other test counts cached prompt tokens.
    let own = common::load_with(
        &common::resolve_fixture("FP32"),
        common::EngineOpts::ONE_SHOT,
    );
    let s = Server::start(vec![own]).await;
    let v = sdk_script("openai_sdk_features.py", &s.base).await;
    let parsed = v["parsed"].as_array().unwrap();
    assert_eq!(parsed.len(), 6);
    for p in parsed {
        // The SDK parsed (and Pydantic validated) every answer into an `Order`.
        assert_eq!(p["type"], "Order", "{p}");
        assert_eq!(p["finish_reason"], "stop");
        let items = p["value"]["items"].as_array().unwrap();
        assert!((1..=3).contains(&items.len()));
    }
    assert_eq!(v["call"]["finish_reason"], "tool_calls");
    assert_eq!(v["call"]["name"], "GetWeather");
    assert!(v["call"]["id"].as_str().unwrap().starts_with("call_"));
    assert!(["c", "f"].contains(&v["call"]["args"]["unit"].as_str().unwrap()));
    assert_eq!(v["after_tool"]["content_is_str"], true);
    assert_eq!(v["stream_call"]["finish_reason"], "tool_calls");
    let calls = v["stream_call"]["calls"].as_array().unwrap();
    assert!(!calls.is_empty());
    for c in calls {
        assert_eq!(c["name"], "GetWeather");
        assert!(c["parsed"]["city"].is_string(), "{c}");
    }
    assert_eq!(v["logprobs"]["n"], 4);
    assert_eq!(v["logprobs"]["top"], serde_json::json!([3, 3, 3, 3]));
    assert!(v["logprobs"]["first"]["logprob"].as_f64().unwrap() <= 0.0);
    assert_eq!(v["completion"]["object"], "text_completion");
    assert_eq!(v["completion"]["tokens"], 5);
    assert_eq!(v["completion"]["usage"]["completion_tokens"], 5);
    assert_eq!(v["completion_stream_text"], v["completion"]["text"]);
    assert_eq!(v["model"]["id"], "tiny-gemma3n");
    s.shutdown().await;
}

/// The SDK against Gemma 4: the plain session with an image, and thinking turned on through
/// `extra_body` with the thoughts read from `reasoning_content` (plain and streamed).
#[tokio::test(flavor = "multi_thread")]
async fn official_python_sdk_works_against_gemma4() {
    let dir = root().join("tests/fixtures/tiny-gemma4");
    let name = "tiny-gemma4";
    let m = common::load_with(
        &common::resolve_dir(&dir, name, "FP32"),
        common::EngineOpts::ONE_SHOT,
    );
    let tok = m.tokenizer().clone();
    let s = Server::start(vec![m]).await;
    let image = root().join("tests/fixtures/media/formula_320x240.png");
    let v = sdk_script_with(
        "openai_sdk_check.py",
        &s.base,
        &[name, image.to_str().unwrap()],
    )
    .await;
    assert_eq!(v["models"], serde_json::json!([name]));
    assert!(!v["text"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(v["stream_text"], v["text"]);
    // The image's 266 soft tokens and its begin/end markers.
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 268, "{v}");
    assert_eq!(v["bad_request"]["param"], "temperature");

    let (open, close) = (
        tok.token_to_id("<|channel>").unwrap(),
        tok.token_to_id("<channel|>").unwrap(),
    );
    let grammar = format!(
        "start: <[{open}]> \"thought\\n\" /[a-z]{{2,5}}( [a-z]{{2,5}}){{2,3}}/ <[{close}]> /[A-Z][a-z]{{1,5}}( [a-z]{{1,5}}){{1,2}}/"
    );
    let v = sdk_script_with("openai_sdk_reasoning.py", &s.base, &[name, &grammar]).await;
    let reasoning = v["reasoning"].as_str().unwrap();
    let content = v["content"].as_str().unwrap();
    assert!(
        reasoning.len() >= 5 && !reasoning.starts_with("thought"),
        "{v}"
    );
    assert!(content.starts_with(char::is_uppercase), "{v}");
    assert!(v["reasoning_tokens"].as_u64().unwrap() >= 4, "{v}");
    assert_eq!(
        (&v["stream_reasoning"], &v["stream_content"]),
        (&v["reasoning"], &v["content"])
    );
    s.shutdown().await;
}
