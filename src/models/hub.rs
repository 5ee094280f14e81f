//! The Hugging Face hub and its local cache.
//!
//! Files are downloaded with `hf-hub` into the standard cache layout
//! (`$HF_HUB_CACHE/models--org--name/{blobs,refs,snapshots}`), with a progress bar and resumable
//! partial downloads. `hf-hub` itself ignores `HF_HUB_CACHE` and `HF_HUB_OFFLINE`, so the environment
//! is read here ([`HubConfig::from_env`]). When the hub cannot be reached, a complete cached snapshot is
//! used instead; with `HF_HUB_OFFLINE=1` the hub is never contacted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::tokio::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Repo, RepoType};

use crate::error::ErrorClass;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Hub settings, from the same environment variables the Python `huggingface_hub` reads.
#[derive(Clone)]
pub struct HubConfig {
    /// `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// `HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: String,
    /// `HF_TOKEN`, else the file `$HF_HOME/token`.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE` set to 1/true/yes/on: use the cache only.
    pub offline: bool,
    pub revision: String,
    /// Show download progress bars.
    pub progress: bool,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("cache_dir", &self.cache_dir)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .field("revision", &self.revision)
            .finish()
    }
}

impl HubConfig {
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Builds the config from a variable lookup (tests pass their own instead of the process env).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let nonempty = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let home = nonempty("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"));
        let hf_home = nonempty("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            nonempty("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache"))
                .join("huggingface")
        });
        let cache_dir = nonempty("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = nonempty("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(hf_home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = nonempty("HF_HUB_OFFLINE")
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
            .unwrap_or(false);
        Self {
            cache_dir,
            endpoint: nonempty("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token,
            offline,
            revision: "main".to_string(),
            progress: true,
        }
    }

    /// `models--org--name` under the cache.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache_dir
            .join(format!("models--{}", repo.replace('/', "--")))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "{repo} is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set.\n  Download it once with network access (unset HF_HUB_OFFLINE), or serve a local snapshot directory: --model /path/to/dir (e.g. `make run MODEL=tests/fixtures/tiny-gemma3n`)",
        cache.display()
    )]
    NotCachedOffline { repo: String, cache: PathBuf },
    #[error(
        "cannot reach the Hugging Face hub at {endpoint} for {repo} ({message}), and no cached snapshot is at {}.\n  Without a network, serve a local snapshot directory: --model /path/to/dir (e.g. `make run MODEL=tests/fixtures/tiny-gemma3n`), or set HF_HUB_OFFLINE=1 with a filled cache",
        cache.display()
    )]
    Unreachable {
        repo: String,
        endpoint: String,
        cache: PathBuf,
        message: String,
    },
    #[error(
        "{file} of {repo} is not in the cached snapshot {} (offline).\n  Download it with network access, or serve a local snapshot directory with --model /path/to/dir",
        snapshot.display()
    )]
    FileNotCached {
        repo: String,
        file: String,
        snapshot: PathBuf,
    },
    #[error("downloading {file} of {repo} from {endpoint} into {} failed: {message}", cache.display())]
    Download {
        repo: String,
        file: String,
        endpoint: String,
        cache: PathBuf,
        message: String,
    },
}

impl HubError {
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Unavailable
    }
}

/// One revision of a repo: its file list, and where its files are (or will be) on disk.
pub struct Snapshot {
    repo: String,
    root: PathBuf,
    files: BTreeSet<String>,
    api: Option<(ApiRepo, String)>,
    cache: PathBuf,
}

impl Snapshot {
    /// Lists the repo's files: from the hub, or from the cache when offline or unreachable.
    pub async fn open(cfg: &HubConfig, repo: &str) -> Result<Self, HubError> {
        if cfg.offline {
            return Self::cached(cfg, repo)?.ok_or_else(|| HubError::NotCachedOffline {
                repo: repo.to_string(),
                cache: cfg.cache_dir.clone(),
            });
        }
        let api = build_api(cfg).map_err(|e| HubError::Unreachable {
            repo: repo.to_string(),
            endpoint: cfg.endpoint.clone(),
            cache: cfg.cache_dir.clone(),
            message: e,
        })?;
        let api_repo = api.repo(Repo::with_revision(
            repo.to_string(),
            RepoType::Model,
            cfg.revision.clone(),
        ));
        match tokio::time::timeout(std::time::Duration::from_secs(30), api_repo.info()).await {
            Ok(Ok(info)) => {
                let root = cfg.repo_dir(repo).join("snapshots").join(&info.sha);
                let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
                Ok(Self {
                    repo: repo.to_string(),
                    root,
                    files,
                    api: Some((api_repo, cfg.endpoint.clone())),
                    cache: cfg.cache_dir.clone(),
                })
            }
            other => {
                let message = match other {
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out after 30 s".to_string(),
                    Ok(Ok(_)) => unreachable!(),
                };
                match Self::cached(cfg, repo)? {
                    Some(s) => {
                        tracing::warn!(repo, error = %message, snapshot = %s.root.display(), "hub unreachable; using the cached snapshot");
                        Ok(s)
                    }
                    None => Err(HubError::Unreachable {
                        repo: repo.to_string(),
                        endpoint: cfg.endpoint.clone(),
                        cache: cfg.cache_dir.clone(),
                        message,
                    }),
                }
            }
        }
    }

    /// The snapshot `refs/<revision>` points at in the cache, if it exists.
    fn cached(cfg: &HubConfig, repo: &str) -> Result<Option<Self>, HubError> {
        let repo_dir = cfg.repo_dir(repo);
        let hash = match std::fs::read_to_string(repo_dir.join("refs").join(&cfg.revision)) {
            Ok(h) => h.trim().to_string(),
            Err(_) => return Ok(None),
        };
        let root = repo_dir.join("snapshots").join(&hash);
        let Ok(files) = super::resolve::list_dir(&root) else {
            return Ok(None);
        };
        Ok(Some(Self {
            repo: repo.to_string(),
            root,
            files,
            api: None,
            cache: cfg.cache_dir.clone(),
        }))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn files(&self) -> &BTreeSet<String> {
        &self.files
    }

    /// The local path of `rel`, downloading it first when it is not in the cache yet.
    pub async fn fetch(&self, rel: &str) -> Result<PathBuf, HubError> {
        let local = self.root.join(rel);
        if local.exists() {
            return Ok(local);
        }
        let Some((api, endpoint)) = &self.api else {
            return Err(HubError::FileNotCached {
                repo: self.repo.clone(),
                file: rel.to_string(),
                snapshot: self.root.clone(),
            });
        };
        tracing::info!(repo = %self.repo, file = rel, "downloading");
        let path = api.download(rel).await.map_err(|e| HubError::Download {
            repo: self.repo.clone(),
            file: rel.to_string(),
            endpoint: endpoint.clone(),
            cache: self.cache.clone(),
            message: e.to_string(),
        })?;
        if path != local && !local.exists() {
            // The hub moved on between listing and download: mirror the file into our snapshot.
            if let Some(parent) = local.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            std::fs::copy(&path, &local).map_err(|e| HubError::Download {
                repo: self.repo.clone(),
                file: rel.to_string(),
                endpoint: endpoint.clone(),
                cache: self.cache.clone(),
                message: e.to_string(),
            })?;
        }
        Ok(local)
    }
}

fn build_api(cfg: &HubConfig) -> Result<Api, String> {
    ApiBuilder::new()
        .with_cache_dir(cfg.cache_dir.clone())
        .with_endpoint(cfg.endpoint.clone())
        .with_token(cfg.token.clone())
        .with_progress(cfg.progress)
        .build()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn env_precedence() {
        let vars: HashMap<&str, &str> =
            [("HOME", "/h"), ("HF_HOME", "/hf"), ("HF_HUB_OFFLINE", "1")].into();
        let c = HubConfig::from_vars(|k| vars.get(k).map(|v| v.to_string()));
        assert_eq!(c.cache_dir, PathBuf::from("/hf/hub"));
        assert!(c.offline);
        assert_eq!(c.endpoint, DEFAULT_ENDPOINT);
        let vars: HashMap<&str, &str> = [
            ("HOME", "/h"),
            ("HF_HUB_CACHE", "/c"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_TOKEN", "secret"),
            ("HF_HUB_OFFLINE", "0"),
        ]
        .into();
        let c = HubConfig::from_vars(|k| vars.get(k).map(|v| v.to_string()));
        assert_eq!(c.cache_dir, PathBuf::from("/c"));
        assert_eq!(c.endpoint, "http://127.0.0.1:9");
        assert_eq!(c.token.as_deref(), Some("secret"));
        assert!(!c.offline);
        assert!(!format!("{c:?}").contains("secret"));
        let c = HubConfig::from_vars(|k| (k == "HOME").then(|| "/h".to_string()));
        assert_eq!(c.cache_dir, PathBuf::from("/h/.cache/huggingface/hub"));
    }
}
