//! Model resolution through the Hugging Face cache and hub, on a fake cache built from the fixture and a
//! local mock of the hub's HTTP API: display names and quantizations resolve to the right files, only
//! the chosen quantization's files are downloaded, offline mode reads the cache only, and failures name
//! the file, the cache path and the local alternative.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::fixture_dir;
use onnx_chat::models::catalog::Component;
use onnx_chat::models::hub::HubConfig;
use onnx_chat::models::resolve::{self, ModelSpec};
use warp::Filter;

const REPO: &str = "onnx-community/gemma-3n-E2B-it-ONNX";
const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixture_files() -> Vec<String> {
    resolve::list_dir(&fixture_dir())
        .unwrap()
        .into_iter()
        .collect()
}

/// A cache with the fixture as the snapshot `refs/main` points at (symlinks, like the real cache).
fn fake_cache(dir: &Path) -> PathBuf {
    let repo = dir.join("models--onnx-community--gemma-3n-E2B-it-ONNX");
    let snap = repo.join("snapshots").join(HASH);
    for f in fixture_files() {
        let dst = snap.join(&f);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(fixture_dir().join(&f), &dst).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), HASH).unwrap();
    snap
}

fn hub(cache: &Path, offline: bool, endpoint: Option<&str>) -> HubConfig {
    let mut c = HubConfig::from_vars(|_| None);
    c.cache_dir = cache.to_path_buf();
    c.offline = offline;
    c.progress = false;
    if let Some(e) = endpoint {
        c.endpoint = e.to_string();
    }
    c
}

#[tokio::test]
async fn display_names_resolve_from_an_offline_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = fake_cache(tmp.path());
    let h = hub(tmp.path(), true, None);
    let spec = ModelSpec::parse("Gemma-3n-E2B-it-ONNX/FP32", None).unwrap();
    let m = resolve::resolve(&spec, None, &h).await.unwrap();
    assert_eq!(m.root, snap);
    assert_eq!(m.served_name, "Gemma-3n-E2B-it-ONNX");
    assert!(m.aliases.contains(&"Gemma-3n-E2B-it-ONNX/FP32".to_string()));
    let d = m.plan.graph(Component::DecoderModelMerged).unwrap();
    assert_eq!(d.rel_path, "onnx/decoder_model_merged.onnx");
    assert_eq!(d.data_files, vec!["onnx/decoder_model_merged.onnx_data"]);
    assert!(m.graph_path(Component::EmbedTokens).unwrap().exists());

    // Default quantization of the display name: Q4_MIXED, as the original server.
    let spec = ModelSpec::parse("Gemma-3n-E2B-it-ONNX", None).unwrap();
    let m = resolve::resolve(&spec, Some("gemma"), &h).await.unwrap();
    assert_eq!(m.plan.quant.name(), "Q4_MIXED");
    assert_eq!(m.served_name, "gemma");
    assert_eq!(
        m.plan
            .graph(Component::EmbedTokens)
            .unwrap()
            .data_files
            .len(),
        2
    );
    // The repo id and --quant work too.
    let spec = ModelSpec::parse(REPO, Some("QUANTIZED")).unwrap();
    let m = resolve::resolve(&spec, None, &h).await.unwrap();
    assert_eq!(
        m.plan.graph(Component::AudioEncoder).unwrap().rel_path,
        "onnx/audio_encoder_quantized.onnx"
    );

    // A variant missing from the cache falls back along the documented chain.
    std::fs::remove_file(snap.join("onnx/vision_encoder_quantized.onnx")).unwrap();
    let spec = ModelSpec::parse("Gemma-3n-E2B-it-ONNX/Q4_MIXED", None).unwrap();
    let m = resolve::resolve(&spec, None, &h).await.unwrap();
    let v = m.plan.graph(Component::VisionEncoder).unwrap();
    assert!(v.is_fallback());
    assert_eq!(v.rel_path, "onnx/vision_encoder_fp16.onnx");
}

#[tokio::test]
async fn offline_without_cache_names_the_cache_and_the_local_alternative() {
    let tmp = tempfile::tempdir().unwrap();
    let h = hub(tmp.path(), true, None);
    let spec = ModelSpec::parse("Gemma-3n-E2B-it-ONNX/FP16", None).unwrap();
    let err = resolve::resolve(&spec, None, &h)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(REPO), "{err}");
    assert!(err.contains(tmp.path().to_str().unwrap()), "{err}");
    assert!(err.contains("--model /path/to/dir"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[tokio::test]
async fn unreachable_hub_without_cache_fails_fast_and_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let h = hub(tmp.path(), false, Some(&format!("http://127.0.0.1:{port}")));
    let spec = ModelSpec::parse("Gemma-3n-E2B-it-ONNX", None).unwrap();
    let t = std::time::Instant::now();
    let err = resolve::resolve(&spec, None, &h)
        .await
        .unwrap_err()
        .to_string();
    assert!(t.elapsed().as_secs() < 20);
    assert!(err.contains("cannot reach the Hugging Face hub"), "{err}");
    assert!(err.contains("--model /path/to/dir"), "{err}");
    // …but a filled cache is used when the hub is unreachable.
    fake_cache(tmp.path());
    let m = resolve::resolve(&spec, None, &h).await.unwrap();
    assert!(m.root.ends_with(HASH));
}

/// A minimal hub: the repo-info API and `resolve/main/<file>` with Range support, logging requests.
async fn mock_hub(log: Arc<Mutex<Vec<String>>>) -> String {
    let files: Vec<String> = fixture_files();
    let info = serde_json::json!({
        "sha": HASH,
        "siblings": files.iter().map(|f| serde_json::json!({"rfilename": f})).collect::<Vec<_>>(),
    });
    let api = warp::path!("api" / "models" / String / String / "revision" / String)
        .map(move |_: String, _: String, _: String| warp::reply::json(&info));
    let log2 = log.clone();
    let file = warp::path!(String / String / "resolve" / String / ..)
        .and(warp::path::tail())
        .and(warp::header::optional::<String>("range"))
        .map(
            move |_: String,
                  _: String,
                  _: String,
                  tail: warp::path::Tail,
                  range: Option<String>| {
                let rel = tail.as_str().to_string();
                let bytes = std::fs::read(fixture_dir().join(&rel)).unwrap_or_default();
                let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                    Some(r) => {
                        let (a, b) = r.split_once('-').unwrap();
                        let a: usize = a.parse().unwrap();
                        let b: usize = b
                            .parse::<usize>()
                            .unwrap_or(bytes.len() - 1)
                            .min(bytes.len().saturating_sub(1));
                        (a, b)
                    }
                    None => (0, bytes.len().saturating_sub(1)),
                };
                if range.as_deref() != Some("bytes=0-0") {
                    log2.lock().unwrap().push(rel.clone());
                }
                let body = if bytes.is_empty() {
                    vec![]
                } else {
                    bytes[start..=end].to_vec()
                };
                warp::http::Response::builder()
                    .status(206)
                    .header("x-repo-commit", HASH)
                    .header(
                        "etag",
                        format!("\"{:x}-{}\"", bytes.len(), rel.replace('/', "_")),
                    )
                    .header(
                        "content-range",
                        format!("bytes {start}-{end}/{}", bytes.len()),
                    )
                    .body(body)
                    .unwrap()
            },
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(api.or(file)).incoming(listener).run());
    let _ = log;
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread")]
async fn downloads_only_the_chosen_quantization_into_the_standard_cache() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let endpoint = mock_hub(log.clone()).await;
    let tmp = tempfile::tempdir().unwrap();
    let h = hub(tmp.path(), false, Some(&endpoint));
    let spec = ModelSpec::parse("Gemma-3n-E2B-it-ONNX/Q4_MIXED", None).unwrap();
    let m = resolve::resolve(&spec, None, &h).await.unwrap();
    let snap = tmp
        .path()
        .join("models--onnx-community--gemma-3n-E2B-it-ONNX/snapshots")
        .join(HASH);
    assert_eq!(m.root, snap);
    let fetched: BTreeSet<String> = log.lock().unwrap().iter().cloned().collect();
    let want: BTreeSet<String> = m.plan.all_files().into_iter().collect();
    assert_eq!(fetched, want, "exactly the plan's files");
    assert!(fetched.contains("onnx/embed_tokens_quantized.onnx_data_1"));
    assert!(!fetched
        .iter()
        .any(|f| f.contains("_fp16") || f.ends_with("decoder_model_merged.onnx")));
    for f in &want {
        let got = std::fs::read(snap.join(f)).unwrap();
        assert_eq!(got, std::fs::read(fixture_dir().join(f)).unwrap(), "{f}");
    }
    assert_eq!(
        std::fs::read_to_string(
            tmp.path()
                .join("models--onnx-community--gemma-3n-E2B-it-ONNX/refs/main")
        )
        .unwrap(),
        HASH
    );
    // A second resolve is served from the cache: nothing is downloaded again.
    log.lock().unwrap().clear();
    resolve::resolve(&spec, None, &h).await.unwrap();
    assert!(log.lock().unwrap().is_empty());
}
