//! The official OpenAI Python SDK (installed into `.venv` by `make test`) works unchanged against the
//! server: model list, chat completion, streaming with usage, and its typed errors.

mod common;

use common::{goldens, model, root, Server};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn official_python_sdk_works_unchanged() {
    let python = root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run `make setup`",
        python.display()
    );
    let s = Server::start(vec![model("FP32")]).await;
    let base = s.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(root().join("tests/python/openai_sdk_check.py"))
            .args([base.as_str(), "tiny-gemma3n"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "SDK script failed:\n{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
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
        golden.prompt_ids().len() as u64 - 1
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
