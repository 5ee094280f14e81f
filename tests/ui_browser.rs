//! The chat page at `/` in a real browser: `tests/ui/e2e.mjs` drives Debian's headless chromium with
//! playwright-core against the real server on the tiny model, and this test checks what the page showed
//! against the goldens and the API. `make setup` installs both (`scripts/install-chromium.sh`).
//!
//! `UPDATE_SCREENSHOT=1 cargo test --test ui_browser` also rewrites `docs/chat-page.png`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{goldens, model, root, Golden, Server};
use serde_json::{json, Value};

const KEY: &str = "ui-test-key";

fn golden(name: &str) -> Golden {
    goldens()
        .into_iter()
        .find(|g| g.name == name)
        .unwrap_or_else(|| panic!("golden {name}"))
}

/// The text part of a golden's only user message.
fn prompt(g: &Golden) -> String {
    let content = &g.request["messages"][0]["content"];
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .find_map(|p| p["text"].as_str())
            .expect("a text part")
            .to_string(),
        _ => panic!("{}: unexpected content {content}", g.name),
    }
}

fn fp32_text(g: &Golden) -> String {
    g.generated("FP32").expect("an FP32 golden").1
}

fn media_file(g: &Golden) -> String {
    let file = g.expected["media"][0]["file"]
        .as_str()
        .expect("a media file");
    let p = root().join("tests/fixtures").join(file);
    assert!(p.exists(), "{}", p.display());
    p.to_str().unwrap().to_string()
}

fn require(path: &Path, what: &str) {
    assert!(
        path.exists(),
        "{} is missing: the browser test needs {what}; `make setup` installs it (scripts/install-chromium.sh)",
        path.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_in_headless_chromium() {
    let chromium = std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "/usr/bin/chromium".into());
    require(
        Path::new(&chromium),
        "Debian's chromium (apt-get install chromium)",
    );
    require(
        &root().join("tests/ui/node_modules/playwright-core/package.json"),
        "playwright-core (cd tests/ui && npm ci)",
    );

    let (text, image, audio) = (
        golden("text_basic"),
        golden("image_one"),
        golden("audio_one"),
    );
    let server = Server::start(vec![model("FP32")]).await;
    // The keyed server is the binary, as a user starts it.
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let keyed_base = format!("http://127.0.0.1:{port}");
    let fixture = common::fixture_dir();
    let keyed = common::Proc::spawn(
        "serve-api-key",
        &common::bin(),
        &[
            "serve",
            "--model",
            fixture.to_str().unwrap(),
            "--quant",
            "FP32",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--api-key",
            KEY,
        ],
        dir.path(),
    );
    common::wait_workers(&keyed_base, 1, &[&keyed]).await;

    let shots = tempfile::tempdir().unwrap();
    let screenshot = if std::env::var_os("UPDATE_SCREENSHOT").is_some() {
        root().join("docs/chat-page.png")
    } else {
        shots.path().join("chat-page.png")
    };
    let spec = json!({
        "key_base": keyed_base,
        "key": KEY,
        "text": {"prompt": prompt(&text)},
        "image": {"prompt": prompt(&image), "file": media_file(&image)},
        "audio": {"prompt": prompt(&audio), "file": media_file(&audio)},
        "screenshot": screenshot,
    });
    let run = tokio::process::Command::new("node")
        .arg(root().join("tests/ui/e2e.mjs"))
        .arg(&server.base)
        .arg(spec.to_string())
        .env("CHROMIUM_BIN", &chromium)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the browser run finishes within 5 minutes")
        .expect("node runs (apt-get install nodejs npm)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let out: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no JSON from e2e.mjs ({})\n{stdout}\n{stderr}",
                output.status
            )
        });
    let ctx = format!("{out:#}\n--- stderr ---\n{stderr}");
    println!("{ctx}");
    assert!(out["error"].is_null(), "the browser run failed: {ctx}");
    assert_eq!(out["problems"], json!([]), "console errors: {ctx}");

    // The page and its policy.
    let csp = out["csp"].as_str().expect("a CSP header");
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(out["models"], json!(["tiny-gemma3n"]));
    assert_eq!(out["shift_enter_value"], "line one\nline two", "{ctx}");
    assert!(
        out["phone_overflow"].as_f64().unwrap() <= 0.0,
        "wider than a phone: {ctx}"
    );

    // (a) Text: the streamed answer is the golden's, and the API's for the same greedy request.
    let a = &out["text"];
    assert_eq!(a["state"], "done", "{ctx}");
    assert_eq!(a["text"].as_str().unwrap(), fp32_text(&text), "{ctx}");
    let mut req = text.request.clone();
    req["stream"] = json!(true);
    let (status, events) = server.chat_stream(&req).await;
    assert_eq!(status, 200);
    assert_eq!(
        a["text"].as_str().unwrap(),
        common::collect_stream(&events).0
    );
    let sent = &a["request"];
    assert_eq!(sent["messages"], text.request["messages"], "{ctx}");
    assert_eq!(sent["model"], "tiny-gemma3n");
    assert_eq!(sent["temperature"], 0);
    assert_eq!(sent["max_tokens"], 32);
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let meta = a["meta"].as_str().unwrap();
    for part in [
        "prompt + 32 tokens",
        "tokens/s",
        "first token",
        "max tokens",
    ] {
        assert!(meta.contains(part), "usage line {meta:?} lacks {part:?}");
    }
    assert_eq!(a["input_after"], "");
    let second = a["second_request"].as_array().unwrap();
    assert_eq!(second.len(), 3, "{ctx}");
    assert_eq!(
        second[1],
        json!({"role": "assistant", "content": fp32_text(&text)})
    );
    assert_eq!(
        second[2],
        json!({"role": "user", "content": "And another one?"})
    );
    assert_eq!(a["second"]["state"], "done", "{ctx}");

    // (b) Image: the golden's answer; thumbnails; paste and drop attach too.
    let b = &out["image"];
    assert_eq!(b["state"], "done", "{ctx}");
    assert_eq!(b["text"].as_str().unwrap(), fp32_text(&image), "{ctx}");
    let parts: Vec<&str> = b["request"]["messages"][0]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(parts, ["image_url", "text"]);
    assert_eq!(b["user_images"], json!([320]));
    assert_eq!(b["attachments_after"], 0);
    assert_eq!(
        out["paste_drop"],
        json!({"afterPaste": 1, "afterDrop": 2, "afterRemove": 0})
    );
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"));

    // Audio from a file: the golden's answer; a player. Microphone: a WAV the server accepts.
    let c = &out["audio"];
    assert_eq!(c["state"], "done", "{ctx}");
    assert_eq!(c["text"].as_str().unwrap(), fp32_text(&audio), "{ctx}");
    assert_eq!(c["user_players"], 1);
    assert_eq!(
        c["request"]["messages"][0]["content"][0]["input_audio"]["format"],
        "wav"
    );
    let rec = &out["record"];
    assert!(
        rec["attached"][0]
            .as_str()
            .unwrap()
            .starts_with("recording-"),
        "{ctx}"
    );
    let wav = &rec["sent"]["wav"];
    assert_eq!(rec["sent"]["format"], "wav", "{ctx}");
    assert_eq!(wav["riff"], "RIFFWAVE", "{ctx}");
    assert!(wav["seconds"].as_f64().unwrap() > 0.5, "{ctx}");
    assert!(
        wav["peak"].as_f64().unwrap() > 0.0,
        "silent recording: {ctx}"
    );
    assert_eq!(rec["answer"]["state"], "done", "{ctx}");

    // (c) Stop: the answer streamed in (several renders), the page keeps the partial answer, and the
    // server cancels the job: its slot is free again well before the 3000 tokens could have been made.
    let s = &out["stop"];
    assert_eq!(s["state_at_stop"], "streaming", "{ctx}");
    assert_eq!(s["answer"]["state"], "stopped", "{ctx}");
    assert!(s["answer"]["updates"].as_u64().unwrap() >= 3, "{ctx}");
    assert!(!s["answer"]["text"].as_str().unwrap().is_empty());
    let tokens = s["answer"]["tokens"].as_u64().unwrap();
    assert!(tokens > 0 && tokens < 3000, "{ctx}");
    assert!(s["answer"]["meta"]
        .as_str()
        .unwrap()
        .contains(&format!("{tokens} tokens")));
    assert!(
        s["free_during"].as_u64().unwrap() < s["free_before"].as_u64().unwrap(),
        "the job never took a slot: {ctx}"
    );
    assert_eq!(s["in_flight_during"], 1, "{ctx}");
    assert_eq!(s["free_after"], s["free_before"], "slot not freed: {ctx}");
    assert_eq!(s["in_flight_after"], 0, "{ctx}");
    assert!(s["freed_ms"].as_u64().unwrap() < 2000, "freed late: {ctx}");
    assert_eq!(
        s["completion_tokens_added"], 0,
        "the job ran to its end: {ctx}"
    );
    assert_eq!(s["send_visible"], true);
    assert_eq!(s["focused"], "input");

    // (d) --api-key: asked for, wrong key refused in the API's words, then the page works.
    let d = &out["api_key"];
    let api_msg = "Missing or invalid API key";
    assert!(d["reason"].as_str().unwrap().contains(api_msg), "{ctx}");
    assert!(d["reason2"].as_str().unwrap().contains(api_msg), "{ctx}");
    assert_eq!(d["models"], json!(["tiny-gemma3n"]));
    assert_eq!(d["answer"]["text"].as_str().unwrap(), fp32_text(&text));
    assert_eq!(d["stored"], KEY);
    assert_eq!(d["dialog_open_after"], false);
    assert_eq!(d["cancelled"]["state"], "error", "{ctx}");
    assert!(d["cancelled"]["text"].as_str().unwrap().contains(api_msg));

    drop(keyed);
    server.shutdown().await;
}
