//! From what the user typed (`--model`, `--quant`) to the files of one model on local disk.
//!
//! `--model` is a local snapshot directory, a hub repo id, or a display name (`Gemma-3n-E2B-it-ONNX`,
//! optionally `/QUANT`). Resolution first lists the files a snapshot has (a local directory, the Hugging
//! Face cache, or the hub's file list), then picks per component the file the quantization asks for,
//! falling back along [`Family::candidate_suffixes`] when it is missing, and keeps each graph's
//! `.onnx_data*` siblings beside it. Only the chosen files are fetched from the hub.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::catalog::{self, Component, Family, Quant};
use super::hub::{HubConfig, HubError};
use crate::error::ErrorClass;

/// Metadata files every family reads when present (`config.json` and `tokenizer.json` are required).
pub const METADATA_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
];
/// The folder of named chat templates (`<name>.jinja`) transformers reads beside `chat_template.jinja`.
pub const CHAT_TEMPLATES_DIR: &str = "additional_chat_templates/";
pub const REQUIRED_METADATA: &[&str] = &["config.json", "tokenizer.json"];

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0}")]
    Spec(String),
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("model {model}: {message}")]
    Files { model: String, message: String },
    #[error("model {model}: cannot read {}: {message}", path.display())]
    Read {
        model: String,
        path: PathBuf,
        message: String,
    },
}

impl ResolveError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Hub(e) => e.class(),
            _ => ErrorClass::InvalidRequest,
        }
    }
}

/// Where a model comes from, as parsed from `--model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub { repo: String },
}

/// `--model` and `--quant` parsed, before any file is looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub source: ModelSource,
    /// Explicit quantization (from `NAME/QUANT` or `--quant`); `None` = the family default.
    pub quant: Option<Quant>,
    /// The name clients use by default: the directory name, or the display name for hub models.
    pub default_served_name: String,
    /// The display name when the model came from the catalog (by display name or repo id).
    pub display: Option<&'static str>,
}

impl ModelSpec {
    pub fn parse(model: &str, quant: Option<&str>) -> Result<Self, ResolveError> {
        let model = model.trim();
        if model.is_empty() {
            return Err(ResolveError::Spec("--model is empty".into()));
        }
        let flag_quant = match quant.map(str::trim).filter(|q| !q.is_empty()) {
            Some(q) => Some(Quant::parse(q).ok_or_else(|| {
                ResolveError::Spec(format!(
                    "unknown quantization {q:?}; known: {}",
                    catalog::QUANT_NAMES.join(", ")
                ))
            })?),
            None => None,
        };
        let path = Path::new(model);
        if path.is_dir() {
            let name = std::fs::canonicalize(path)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| model.to_string());
            return Ok(Self {
                source: ModelSource::Local(path.to_path_buf()),
                quant: flag_quant,
                default_served_name: name,
                display: None,
            });
        }
        // `Display/QUANT`
        if let Some((head, tail)) = model.rsplit_once('/') {
            if let Some(entry) = catalog::by_display(head) {
                let q = Quant::parse(tail).ok_or_else(|| {
                    ResolveError::Spec(format!(
                        "unknown quantization {tail:?} in {model:?}; known: {}",
                        catalog::QUANT_NAMES.join(", ")
                    ))
                })?;
                if let Some(fq) = flag_quant.filter(|fq| *fq != q) {
                    return Err(ResolveError::Spec(format!(
                        "--model {model} names quantization {q} but --quant says {fq}"
                    )));
                }
                return Ok(Self {
                    source: ModelSource::Hub {
                        repo: entry.repo.to_string(),
                    },
                    quant: Some(q),
                    default_served_name: entry.display.to_string(),
                    display: Some(entry.display),
                });
            }
        }
        if let Some(entry) = catalog::by_display(model) {
            return Ok(Self {
                source: ModelSource::Hub {
                    repo: entry.repo.to_string(),
                },
                quant: flag_quant,
                default_served_name: entry.display.to_string(),
                display: Some(entry.display),
            });
        }
        if looks_like_repo_id(model) {
            let entry = catalog::by_repo(model);
            return Ok(Self {
                source: ModelSource::Hub {
                    repo: entry
                        .map(|e| e.repo.to_string())
                        .unwrap_or_else(|| model.to_string()),
                },
                quant: flag_quant,
                default_served_name: entry
                    .map(|e| e.display.to_string())
                    .unwrap_or_else(|| model.to_string()),
                display: entry.map(|e| e.display),
            });
        }
        Err(ResolveError::Spec(format!(
            "--model {model:?} is not a directory, a known model name ({}), or a hub repo id (org/name)",
            catalog::catalog().map(|e| e.display).collect::<Vec<_>>().join(", ")
        )))
    }
}

fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(org) && ok(name)
}

/// One graph chosen for a component.
#[derive(Debug, Clone, Serialize)]
pub struct ResolvedGraph {
    pub component: Component,
    /// The suffix found (`""` = fp32).
    pub suffix: String,
    /// The suffix the quantization asked for; differs from `suffix` after a fallback.
    pub preferred_suffix: String,
    /// Path relative to the snapshot root, e.g. `onnx/decoder_model_merged_q4.onnx`.
    pub rel_path: String,
    /// External-data siblings (`.onnx_data`, `.onnx_data_1`, …), relative to the root.
    pub data_files: Vec<String>,
}

impl ResolvedGraph {
    pub fn is_fallback(&self) -> bool {
        self.suffix != self.preferred_suffix
    }
}

/// The files chosen for one model; pure data, computed from a file listing.
#[derive(Debug, Clone, Serialize)]
pub struct FilePlan {
    pub family: Family,
    pub quant: Quant,
    pub graphs: Vec<ResolvedGraph>,
    pub metadata: Vec<String>,
    /// Optional components with no file under any candidate suffix.
    pub missing_optional: Vec<Component>,
}

impl Serialize for Family {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}
impl Serialize for Quant {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}
impl Serialize for Component {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.file_stem())
    }
}

impl FilePlan {
    /// Picks the files for `family`/`quant` among `files` (paths relative to the snapshot root).
    pub fn choose(
        model: &str,
        family: Family,
        quant: Quant,
        files: &BTreeSet<String>,
    ) -> Result<Self, ResolveError> {
        if !family.quants().contains(&quant) {
            return Err(ResolveError::Spec(format!(
                "model {model} ({} family) has no quantization {quant}; it has {}",
                family.name(),
                family
                    .quants()
                    .iter()
                    .map(|q| q.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        for req in REQUIRED_METADATA {
            if !files.contains(*req) {
                return Err(ResolveError::Files {
                    model: model.to_string(),
                    message: format!("{req} is missing"),
                });
            }
        }
        let metadata = METADATA_FILES
            .iter()
            .filter(|f| files.contains(**f))
            .map(|f| f.to_string())
            .chain(
                files
                    .iter()
                    .filter(|f| f.starts_with(CHAT_TEMPLATES_DIR) && f.ends_with(".jinja"))
                    .cloned(),
            )
            .collect();
        let mut graphs = Vec::new();
        let mut missing_optional = Vec::new();
        for &component in family.components() {
            let candidates = family.candidate_suffixes(quant, component);
            let found = candidates.iter().find_map(|suffix| {
                let rel = format!("onnx/{}{}.onnx", component.file_stem(), suffix);
                files.contains(&rel).then_some((*suffix, rel))
            });
            match found {
                Some((suffix, rel)) => {
                    let data_prefix = format!("{rel}_data");
                    let data_files = files
                        .iter()
                        .filter(|f| {
                            f.strip_prefix(&data_prefix)
                                .is_some_and(|rest| rest.is_empty() || is_chunk_suffix(rest))
                        })
                        .cloned()
                        .collect();
                    graphs.push(ResolvedGraph {
                        component,
                        suffix: suffix.to_string(),
                        preferred_suffix: candidates[0].to_string(),
                        rel_path: rel,
                        data_files,
                    });
                }
                None if component.required() => {
                    return Err(ResolveError::Files {
                        model: model.to_string(),
                        message: format!(
                            "no {} graph for quantization {quant}: looked for {}",
                            component,
                            candidates
                                .iter()
                                .map(|s| format!("onnx/{}{}.onnx", component.file_stem(), s))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    })
                }
                None => missing_optional.push(component),
            }
        }
        Ok(Self {
            family,
            quant,
            graphs,
            metadata,
            missing_optional,
        })
    }

    /// Every file the plan needs, relative to the root.
    pub fn all_files(&self) -> Vec<String> {
        let mut out = self.metadata.clone();
        for g in &self.graphs {
            out.push(g.rel_path.clone());
            out.extend(g.data_files.iter().cloned());
        }
        out
    }

    pub fn graph(&self, c: Component) -> Option<&ResolvedGraph> {
        self.graphs.iter().find(|g| g.component == c)
    }
}

/// `_1`, `_2`, … (external-data chunk numbers).
fn is_chunk_suffix(rest: &str) -> bool {
    rest.strip_prefix('_')
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// A model whose chosen files are all on local disk.
#[derive(Debug, Clone, Serialize)]
pub struct ResolvedModel {
    /// What the user asked for, for messages.
    pub spec: String,
    /// The snapshot directory holding `config.json` and `onnx/`.
    pub root: PathBuf,
    pub served_name: String,
    /// Other names requests may use for this model (e.g. `Display/QUANT`, the repo id).
    pub aliases: Vec<String>,
    pub plan: FilePlan,
}

impl ResolvedModel {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn graph_path(&self, c: Component) -> Option<PathBuf> {
        self.plan.graph(c).map(|g| self.root.join(&g.rel_path))
    }
}

/// Lists every file under `root`, as `/`-separated paths relative to it (following symlinks, as the
/// Hugging Face cache's snapshot directories are made of them).
pub fn list_dir(root: &Path) -> std::io::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let meta = std::fs::metadata(&path)?;
            if meta.is_dir() {
                // Only the layout's own folders: skip caches, VCS folders, hidden files.
                if !entry.file_name().to_string_lossy().starts_with('.') {
                    stack.push(path);
                }
            } else if let Ok(rel) = path.strip_prefix(root) {
                out.insert(
                    rel.components()
                        .map(|c| c.as_os_str().to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/"),
                );
            }
        }
    }
    Ok(out)
}

/// The catalog entry a snapshot was exported from: `config.json`'s `_name_or_path`, when it is a
/// catalog repo id.
fn exported_entry(config_path: &Path) -> Option<catalog::CatalogEntry> {
    let text = std::fs::read_to_string(config_path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    catalog::by_repo(v.get("_name_or_path")?.as_str()?)
}

/// Reads `config.json` and returns the family its `model_type` names.
pub fn detect_family(model: &str, config_path: &Path) -> Result<Family, ResolveError> {
    let text = std::fs::read_to_string(config_path).map_err(|e| ResolveError::Read {
        model: model.to_string(),
        path: config_path.to_path_buf(),
        message: e.to_string(),
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ResolveError::Read {
        model: model.to_string(),
        path: config_path.to_path_buf(),
        message: format!("invalid JSON: {e}"),
    })?;
    let mt = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
    Family::from_model_type(mt).ok_or_else(|| ResolveError::Files {
        model: model.to_string(),
        message: format!(
            "config.json has model_type {mt:?}; supported: {}",
            Family::all()
                .flat_map(|f| f.model_types())
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// Resolves a spec to local files, downloading from the hub when needed.
pub async fn resolve(
    spec: &ModelSpec,
    served_name: Option<&str>,
    hub: &HubConfig,
) -> Result<ResolvedModel, ResolveError> {
    let spec_text = match &spec.source {
        ModelSource::Local(p) => p.display().to_string(),
        ModelSource::Hub { repo } => repo.clone(),
    };
    // A local export of a catalog model (config.json `_name_or_path` names its repo, as
    // tools/export/ writes it) is served like the catalog entry.
    let mut exported_from: Option<catalog::CatalogEntry> = None;
    let (root, plan) = match &spec.source {
        ModelSource::Local(dir) => {
            let files = list_dir(dir).map_err(|e| ResolveError::Read {
                model: spec_text.clone(),
                path: dir.clone(),
                message: e.to_string(),
            })?;
            if !files.contains("config.json") {
                return Err(ResolveError::Files {
                    model: spec_text,
                    message: format!(
                        "{} has no config.json (expected a snapshot of the hub repo: config.json, tokenizer.json, onnx/*.onnx)",
                        dir.display()
                    ),
                });
            }
            let family = detect_family(&spec_text, &dir.join("config.json"))?;
            let quant = spec.quant.unwrap_or(family.default_quant());
            let plan = FilePlan::choose(&spec_text, family, quant, &files)?;
            exported_from = exported_entry(&dir.join("config.json"));
            (
                std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()),
                plan,
            )
        }
        ModelSource::Hub { repo } => {
            let snapshot = super::hub::Snapshot::open(hub, repo).await?;
            let config = snapshot.fetch("config.json").await?;
            let family = detect_family(&spec_text, &config)?;
            let quant = spec.quant.unwrap_or(family.default_quant());
            let plan = FilePlan::choose(&spec_text, family, quant, snapshot.files())?;
            for f in plan.all_files() {
                snapshot.fetch(&f).await?;
            }
            (snapshot.root().to_path_buf(), plan)
        }
    };
    for g in &plan.graphs {
        if g.is_fallback() {
            tracing::warn!(
                component = %g.component,
                wanted = %format!("{}{}.onnx", g.component.file_stem(), g.preferred_suffix),
                using = %g.rel_path,
                "preferred variant missing; using a fallback"
            );
        }
    }
    let display = spec.display.or(exported_from.map(|e| e.display));
    let served = served_name
        .map(str::to_string)
        .or(exported_from.map(|e| e.display.to_string()))
        .unwrap_or_else(|| spec.default_served_name.clone());
    let mut aliases = Vec::new();
    if let Some(d) = display {
        aliases.push(format!("{d}/{}", plan.quant));
        aliases.push(d.to_string());
    }
    match (&spec.source, exported_from) {
        (ModelSource::Hub { repo }, _) => aliases.push(repo.clone()),
        (ModelSource::Local(_), Some(e)) => aliases.push(e.repo.to_string()),
        (ModelSource::Local(_), None) => {}
    }
    aliases.retain(|a| a != &served);
    aliases.dedup();
    Ok(ResolvedModel {
        spec: spec_text,
        root,
        served_name: served,
        aliases,
        plan,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parse_names() {
        let s = ModelSpec::parse("Gemma-3n-E2B-it-ONNX/FP16", None).unwrap();
        assert_eq!(s.quant, Some(Quant::Fp16));
        assert_eq!(
            s.source,
            ModelSource::Hub {
                repo: "onnx-community/gemma-3n-E2B-it-ONNX".into()
            }
        );
        assert_eq!(s.default_served_name, "Gemma-3n-E2B-it-ONNX");
        let s = ModelSpec::parse("gemma-3n-e2b-it-onnx", Some("quantized")).unwrap();
        assert_eq!(s.quant, Some(Quant::Quantized));
        let s = ModelSpec::parse("onnx-community/gemma-3n-E2B-it-ONNX", None).unwrap();
        assert_eq!(s.quant, None);
        assert_eq!(s.display, Some("Gemma-3n-E2B-it-ONNX"));
        let s = ModelSpec::parse("someone/other-model", Some("FP32")).unwrap();
        assert_eq!(s.default_served_name, "someone/other-model");
        assert!(ModelSpec::parse("Gemma-3n-E2B-it-ONNX/Q9", None)
            .unwrap_err()
            .to_string()
            .contains("unknown quantization"));
        assert!(ModelSpec::parse("Gemma-3n-E2B-it-ONNX/FP16", Some("FP32"))
            .unwrap_err()
            .to_string()
            .contains("--quant"));
        assert!(ModelSpec::parse("no such thing", None).is_err());
        assert!(ModelSpec::parse("x", Some("Q7")).is_err());
    }

    #[test]
    fn plan_with_fallbacks_and_external_data() {
        let files = listing(&[
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "additional_chat_templates/tool_use.jinja",
            "additional_chat_templates/README.md",
            "onnx/embed_tokens_quantized.onnx",
            "onnx/embed_tokens_quantized.onnx_data",
            "onnx/embed_tokens_quantized.onnx_data_1",
            "onnx/embed_tokens_quantized.onnx_data_x",
            "onnx/decoder_model_merged_q4.onnx",
            "onnx/vision_encoder_fp16.onnx",
            "onnx/audio_encoder_q4.onnx",
        ]);
        let p = FilePlan::choose(
            "m",
            Family::of(&crate::models::gemma3n::SPEC),
            Quant::Q4Mixed,
            &files,
        )
        .unwrap();
        let e = p.graph(Component::EmbedTokens).unwrap();
        assert_eq!(
            e.data_files,
            vec![
                "onnx/embed_tokens_quantized.onnx_data",
                "onnx/embed_tokens_quantized.onnx_data_1"
            ]
        );
        let v = p.graph(Component::VisionEncoder).unwrap();
        assert!(v.is_fallback());
        assert_eq!(v.rel_path, "onnx/vision_encoder_fp16.onnx");
        assert!(p.missing_optional.is_empty());
        // Named chat templates are fetched with the rest of the metadata.
        assert_eq!(
            p.metadata,
            vec![
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "additional_chat_templates/tool_use.jinja"
            ]
        );

        let err = FilePlan::choose(
            "m",
            Family::of(&crate::models::smolvlm::SPEC),
            Quant::Q4Mixed,
            &files,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("no quantization Q4_MIXED"),
            "{err}"
        );

        let no_decoder = listing(&["config.json", "tokenizer.json", "onnx/embed_tokens.onnx"]);
        let err = FilePlan::choose(
            "m",
            Family::of(&crate::models::gemma3n::SPEC),
            Quant::Fp32,
            &no_decoder,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("onnx/decoder_model_merged.onnx"),
            "{err}"
        );
    }
}
