//! Hugging Face caches built the way users get them: a local stand-in for the hub's HTTP API serves a
//! published model folder, and the server's own resolver downloads it with `hf-hub`, which writes the
//! standard cache (`blobs/<etag>`, `snapshots/<commit>/<file>` as relative symlinks into `blobs/`,
//! `refs/main`). Nothing here lays the cache out by hand.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use onnx_chat::models::hub::HubConfig;
use onnx_chat::models::resolve::{self, ModelSpec, ResolvedModel};
use sha2::{Digest, Sha256};
use warp::Filter;

/// The commit every mock hub reports.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A mock hub on 127.0.0.1: `GET /api/models/{org}/{name}/revision/{rev}` (file list) and
/// `GET /{org}/{name}/resolve/{rev}/{file}` (with `Range`), for the files of `root` under any repo id.
/// `log` records every file fetched (not the `bytes=0-0` probes).
pub struct MockHub {
    pub endpoint: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl MockHub {
    pub async fn serve(root: PathBuf) -> Self {
        let log = Arc::new(Mutex::new(Vec::new()));
        let files: Vec<String> = resolve::list_dir(&root).unwrap().into_iter().collect();
        let info = serde_json::json!({
            "sha": COMMIT,
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
                    let bytes = std::fs::read(root.join(&rel)).unwrap_or_default();
                    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes="))
                    {
                        Some(r) => {
                            let (a, b) = r.split_once('-').unwrap();
                            let a: usize = a.parse().unwrap();
                            let b = b
                                .parse::<usize>()
                                .unwrap_or(bytes.len().saturating_sub(1))
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
                    // The hub's etag of an LFS file is its sha256: hf-hub names the blob after it.
                    let etag = format!("{:x}", Sha256::digest(&bytes));
                    warp::http::Response::builder()
                        .status(206)
                        .header("x-repo-commit", COMMIT)
                        .header("etag", format!("\"{etag}\""))
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
        Self {
            endpoint: format!("http://{addr}"),
            log,
        }
    }
}

/// Hub settings over the cache folder `cache`: offline, or online against `endpoint`.
pub fn hub_config(cache: &Path, endpoint: Option<&str>) -> HubConfig {
    let mut c = HubConfig::from_vars(|_| None);
    c.cache_dir = cache.to_path_buf();
    c.offline = endpoint.is_none();
    c.progress = false;
    if let Some(e) = endpoint {
        c.endpoint = e.to_string();
    }
    c
}

/// `repo` resolved under `quant` through `hub` (downloading what is missing when online), served as
/// `name` when given (the goldens' requests name the fixture).
pub fn resolve_repo(hub: &HubConfig, repo: &str, quant: &str, name: Option<&str>) -> ResolvedModel {
    let spec = ModelSpec::parse(repo, Some(quant)).unwrap();
    let hub = hub.clone();
    let repo = repo.to_string();
    let name = name.map(str::to_string);
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(resolve::resolve(&spec, name.as_deref(), &hub))
            .unwrap_or_else(|e| panic!("{repo}: {e}"))
    })
    .join()
    .unwrap()
}

/// A model as a user downloads it: `fixture` copied to a "published" folder, the graphs in
/// `externalize` re-saved with their weights as external data by ONNX's own `save_model`
/// (`tests/python/externalize.py`), served by a [`MockHub`] and downloaded as `repo` under each of
/// `quants` into a fresh cache by the server's resolver. The cache is then used offline.
pub struct HubCache {
    pub dir: tempfile::TempDir,
    pub repo: String,
    pub snapshot: PathBuf,
}

impl HubCache {
    pub fn download(fixture: &Path, repo: &str, quants: &[&str], externalize: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let published = dir.path().join("published");
        copy_dir(fixture, &published);
        if !externalize.is_empty() {
            let mut args: Vec<std::ffi::OsString> = vec![published.clone().into()];
            args.extend(externalize.iter().map(|g| g.into()));
            super::python_json("tests/python/externalize.py", &args);
        }
        let cache = dir.path().join("hub");
        let (repo2, quants2): (String, Vec<String>) = (
            repo.to_string(),
            quants.iter().map(|q| q.to_string()).collect(),
        );
        let cache2 = cache.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let hub = MockHub::serve(published).await;
                    let online = hub_config(&cache2, Some(&hub.endpoint));
                    for q in &quants2 {
                        let spec = ModelSpec::parse(&repo2, Some(q)).unwrap();
                        resolve::resolve(&spec, None, &online)
                            .await
                            .unwrap_or_else(|e| panic!("download {repo2} {q}: {e}"));
                    }
                })
        })
        .join()
        .unwrap();
        let snapshot = cache
            .join(format!("models--{}", repo.replace('/', "--")))
            .join("snapshots")
            .join(COMMIT);
        let c = Self {
            dir,
            repo: repo.to_string(),
            snapshot,
        };
        c.assert_hf_hub_layout();
        c
    }

    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("hub")
    }

    /// Offline settings over this cache (`HF_HUB_OFFLINE=1`).
    pub fn offline(&self) -> HubConfig {
        hub_config(&self.cache(), None)
    }

    /// The repo resolved offline under `quant`, served as `name`.
    pub fn resolve(&self, quant: &str, name: &str) -> ResolvedModel {
        resolve_repo(&self.offline(), &self.repo, quant, Some(name))
    }

    /// Every file of the snapshot is a relative symlink into the repo's `blobs/`, as hf-hub writes it,
    /// and `refs/main` names the commit.
    fn assert_hf_hub_layout(&self) {
        let files = resolve::list_dir(&self.snapshot).unwrap();
        assert!(!files.is_empty());
        let blobs = std::fs::canonicalize(self.snapshot.join("../../blobs")).unwrap();
        for f in files {
            let p = self.snapshot.join(&f);
            let target = std::fs::read_link(&p)
                .unwrap_or_else(|e| panic!("{f} is not a symlink ({e}): not hf-hub's layout"));
            assert!(target.is_relative(), "{f} -> {}", target.display());
            assert_eq!(
                std::fs::canonicalize(&p).unwrap().parent().unwrap(),
                blobs,
                "{f}"
            );
        }
        let refs = self.snapshot.join("../../refs/main");
        assert_eq!(std::fs::read_to_string(refs).unwrap().trim(), COMMIT);
    }
}

/// The fp32 decoder of `m` reads its weights from `onnx/decoder_model_merged.onnx_data` (behind the
/// snapshot's link), so loading it exercises external data.
pub fn assert_decoder_has_external_data(m: &ResolvedModel) {
    let d = m
        .plan
        .graph(onnx_chat::models::catalog::Component::DecoderModelMerged)
        .unwrap();
    assert_eq!(d.data_files, ["onnx/decoder_model_merged.onnx_data"]);
    assert!(m.root.join(&d.data_files[0]).is_symlink());
}

pub fn copy_dir(src: &Path, dst: &Path) {
    for f in resolve::list_dir(src).unwrap() {
        let to = dst.join(&f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(src.join(&f), &to).unwrap();
    }
}
