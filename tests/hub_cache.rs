//! Model resolution through the Hugging Face cache and hub, on a fake cache built from the fixture and a
//! local mock of the hub's HTTP API: display names and quantizations resolve to the right files, only
//! the chosen quantization's files are downloaded, offline mode reads the cache only, and failures name
//! the file, the cache path and the local alternative.

mod common;

use std::collections::BTreeSet;

use common::fixture_dir;
use common::hub::{hub_config, HubCache, MockHub};
use onnx_chat::models::catalog::Component;
use onnx_chat::models::resolve::{self, ModelSpec};

const REPO: &str = "onnx-community/gemma-3n-E2B-it-ONNX";
const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

/// The fixture downloaded into a fresh cache by hf-hub (every set), as a user's cache holds it.
fn fake_cache() -> HubCache {
    HubCache::download(
        &fixture_dir(),
        REPO,
        &["FP32", "FP16", "QUANTIZED", "Q4_MIXED", "Q4"],
        &[],
    )
}

#[tokio::test]
async fn display_names_resolve_from_an_offline_cache() {
    let cache = fake_cache();
    let snap = cache.snapshot.clone();
    let h = hub_config(&cache.cache(), None);
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
    let h = hub_config(tmp.path(), None);
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
    let h = hub_config(tmp.path(), Some(&format!("http://127.0.0.1:{port}")));
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
    let cache = fake_cache();
    let h = hub_config(&cache.cache(), Some(&format!("http://127.0.0.1:{port}")));
    let m = resolve::resolve(&spec, None, &h).await.unwrap();
    assert!(m.root.ends_with(HASH));
}

#[tokio::test(flavor = "multi_thread")]
async fn downloads_only_the_chosen_quantization_into_the_standard_cache() {
    let mock = MockHub::serve(fixture_dir()).await;
    let (log, endpoint) = (mock.log, mock.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let h = hub_config(tmp.path(), Some(&endpoint));
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

const QUANTS: &[&str] = &["FP32", "FP16", "QUANTIZED", "Q4_MIXED", "Q4"];

/// The goldens of `quant` through HTTP on `model` (transformers for FP32, the onnxruntime loop run
/// here for the other sets).
async fn goldens_on(model: std::sync::Arc<onnx_chat::models::loaded::LoadedModel>, quant: &str) {
    let goldens: Vec<common::Golden> = common::goldens()
        .into_iter()
        .filter(|g| g.expected_for(quant).is_some())
        .collect();
    assert!(goldens.len() >= 5, "{quant}: {} goldens", goldens.len());
    common::http_parity(model, &goldens, quant, |g| {
        let (ids, text, finish) = g.expected_for(quant).unwrap();
        (ids, text.into(), finish.into())
    })
    .await;
}

/// The fixture as a user downloads it — hf-hub's cache, every file a relative link into `blobs/`,
/// graphs with external data (`.onnx_data`, `.onnx_data_1`) among them — served by repo id offline
/// under every set with the default load-time rewrites (last-position logits, attention mask): the
/// goldens, as from the plain folder. ONNX Runtime ≥ 1.30 refused such links for a rewritten graph
/// ("External data path escapes model directory") until the loader resolved them.
#[tokio::test(flavor = "multi_thread")]
async fn every_set_serves_the_goldens_from_an_hf_hub_snapshot() {
    let cache = fake_cache();
    for quant in QUANTS {
        let m = cache.resolve(quant, "tiny-gemma3n");
        assert!(
            m.root.starts_with(cache.cache()),
            "{quant}: {}",
            m.root.display()
        );
        if *quant == "FP32" {
            common::hub::assert_decoder_has_external_data(&m);
        }
        let model = common::load_with(&m, common::EngineOpts::ONE_SHOT);
        // The attention-mask rewrite ran (gemma-3n is exported without one): batching is on, or off
        // only because a `_quantized` decoder's rows would not be exact.
        if let Err(e) = model.batching() {
            assert!(
                e.contains("quantizes activations dynamically"),
                "{quant}: {e}"
            );
        }
        goldens_on(model, quant).await;
    }
}

/// Inline weights read by ONNX Runtime from the graph file itself (`--weights-in-place-min-mb`; the
/// default applies from 64 MiB, so the fixture's small graphs are forced here with 0): through the
/// snapshot's links into `blobs/` and from the plain folder, every set serves the goldens, and the
/// rewrite did point the graphs with inline weights at their file.
#[tokio::test(flavor = "multi_thread")]
async fn weights_read_in_place_serve_the_goldens_from_a_snapshot_and_a_folder() {
    use onnx_chat::engine::session::{GraphSession, SessionOptions};
    common::init_ort();
    let cache = fake_cache();
    let opts = SessionOptions {
        intra_threads: 1,
        weights_in_place_min_bytes: 0,
        ..Default::default()
    };
    for quant in QUANTS {
        // Through the snapshot's links for every set; from the plain folder for the default set.
        let mut layouts = vec![cache.resolve(quant, "tiny-gemma3n")];
        if *quant == "Q4_MIXED" {
            layouts.push(common::resolve_fixture(quant));
        }
        for m in layouts {
            let linked = m.root.starts_with(cache.cache());
            // Graphs with external data are left alone; every inline one has weights of a page or
            // more, read from the file.
            for c in [Component::EmbedTokens, Component::DecoderModelMerged] {
                let g = m.plan.graph(c).unwrap();
                let path = m.graph_path(c).unwrap();
                let s = GraphSession::load(&c.to_string(), &path, &opts).unwrap();
                if g.data_files.is_empty() {
                    assert!(
                        s.rewrite.externalized > 0,
                        "{quant} {c} (linked: {linked}): {:?}",
                        s.rewrite
                    );
                } else {
                    assert_eq!(s.rewrite.externalized, 0, "{quant} {c}: {:?}", s.rewrite);
                }
            }
            let load = onnx_chat::models::family::LoadOptions {
                session: opts.clone(),
                kv_cache_bytes: 0,
                prefill_chunk: 1 << 20,
                ..Default::default()
            };
            let model = std::sync::Arc::new(
                onnx_chat::models::loaded::LoadedModel::load(&m, &load).expect("loads"),
            );
            goldens_on(model, quant).await;
        }
    }
}

/// `serve --model <repo id>` as a user runs it after a download: `HF_HUB_OFFLINE=1`, the cache under
/// `HF_HOME`, the binary's default flags (every load-time rewrite on), the FP32 set whose decoder and
/// embeddings have external data behind the cache's links.
#[tokio::test(flavor = "multi_thread")]
async fn serve_by_repo_id_offline_from_the_cache() {
    let cache = fake_cache();
    let port = common::free_port().to_string();
    let hf_home = cache.dir.path().as_os_str();
    let proc = common::Proc::spawn_env(
        "serve",
        &common::bin(),
        &[
            "serve",
            "--model",
            REPO,
            "--quant",
            "FP32",
            "--port",
            &port,
            "--threads",
            "1",
        ],
        cache.dir.path(),
        &[("HF_HUB_OFFLINE", "1".as_ref()), ("HF_HOME", hf_home)],
    );
    let base = format!("http://127.0.0.1:{port}");
    common::wait_workers(&base, 1, &[&proc]).await;
    let g = common::goldens()
        .into_iter()
        .find(|g| g.name == "image_one")
        .unwrap();
    let (want, text, _) = g.expected_for("FP32").unwrap();
    let mut body = g.request.clone();
    body["return_token_ids"] = true.into();
    body["model"] = REPO.into();
    let resp: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(common::token_ids(&resp["choices"][0]), want, "{resp}");
    assert_eq!(resp["choices"][0]["message"]["content"], text.as_str());
}

/// The snapshot folder served as a local folder, and through a folder that is itself a symlink to
/// it (`ln -s ~/.cache/huggingface/hub/models--…/snapshots/<rev> my-model`): FP32, rewrites on.
#[tokio::test(flavor = "multi_thread")]
async fn linked_folders_load_as_local_models() {
    let cache = fake_cache();
    let link = cache.dir.path().join("my-model");
    std::os::unix::fs::symlink(&cache.snapshot, &link).unwrap();
    for dir in [&cache.snapshot, &link] {
        let m = common::resolve_dir(dir, "tiny-gemma3n", "FP32");
        let model = common::load_with(&m, common::EngineOpts::ONE_SHOT);
        let g: Vec<common::Golden> = common::goldens()
            .into_iter()
            .filter(|g| g.name == "text_basic")
            .collect();
        common::http_parity(model, &g, "FP32", |g| {
            let (ids, text, finish) = g.expected_for("FP32").unwrap();
            (ids, text.into(), finish.into())
        })
        .await;
    }
}
