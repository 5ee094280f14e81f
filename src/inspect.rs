//! `onnx-chat inspect MODEL`: the first thing to run on a new snapshot. Shows how the model name
//! resolved, which file each component uses under the chosen quantization (and whether that was a
//! fallback), the processor settings and which file each came from (transformers 5's nested
//! `processor_config.json` entry, or the flat `preprocessor_config.json`), whether the model loads the
//! way `serve` loads it (the family's own loader: configs, tokenizer, template, processor settings,
//! graphs), and every ONNX graph's inputs and outputs with element types and shapes. It fails when a
//! graph or the model does not load (the export recipe, tools/export/export.sh, relies on that).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use serde::Serialize;

use crate::engine::kv::KvLayout;
use crate::engine::session::{GraphSession, IoSpec, SessionOptions};
use crate::models::catalog::Component;
use crate::models::family::LoadOptions;
use crate::models::loaded::LoadedModel;
use crate::models::processor_config::{Origin, Part, ProcessorFiles, PROCESSOR_CONFIG};
use crate::models::resolve::{self, ResolvedModel};

#[derive(Debug, Serialize)]
pub struct GraphReport {
    pub file: String,
    pub component: Option<String>,
    pub variant: String,
    pub bytes: u64,
    pub external_data: Vec<(String, u64)>,
    pub selected: bool,
    pub inputs: Vec<IoLine>,
    pub outputs: Vec<IoLine>,
    /// For a decoder: bytes of KV cache per position of context (what `--kv-cache-mb` holds).
    pub kv_bytes_per_token: Option<usize>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct IoLine {
    pub name: String,
    pub dtype: String,
    pub shape: String,
}

impl From<&IoSpec> for IoLine {
    fn from(s: &IoSpec) -> Self {
        Self {
            name: s.name.clone(),
            dtype: s.dtype.name(),
            shape: s.shape_string(),
        }
    }
}

/// One group of processor settings and the file (and entry) they were read from.
#[derive(Debug, Serialize)]
pub struct ProcessorReport {
    /// "image processor", "feature extractor", "video processor", or "processor" (its own settings).
    pub part: String,
    /// `processor_config.json "image_processor"`, `preprocessor_config.json`, `processor_config.json`.
    pub source: String,
    pub settings: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub model: ResolvedModel,
    pub ort_library: Option<String>,
    /// The processor settings found, by part (parts found nowhere are left out).
    pub processor: Vec<ProcessorReport>,
    /// Why the processor files could not be read, if they could not.
    pub processor_error: Option<String>,
    /// Why the model does not load as `serve` loads it (`None`: it loads).
    pub load_error: Option<String>,
    pub graphs: Vec<GraphReport>,
}

impl Report {
    /// What makes `inspect` fail: a graph or the model that does not load.
    pub fn failure(&self) -> Option<String> {
        if let Some(e) = &self.load_error {
            return Some(format!("the model does not load as `serve` loads it: {e}"));
        }
        if let Some(e) = &self.processor_error {
            return Some(format!("the processor settings cannot be read: {e}"));
        }
        self.graphs
            .iter()
            .find(|g| g.error.is_some())
            .map(|g| format!("{} failed to load", g.file))
    }
}

/// The snapshot's processor settings, read where the families read them
/// ([`crate::models::processor_config`]): each part's object and where it was found, then the
/// processor's own settings (the top level of `processor_config.json`).
fn processor_settings(dir: &Path) -> Result<Vec<ProcessorReport>, String> {
    let files = ProcessorFiles::load(dir).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for part in [
        Part::ImageProcessor,
        Part::FeatureExtractor,
        Part::VideoProcessor,
    ] {
        let s = files.part(part).map_err(|e| e.to_string())?;
        if s.origin() == Origin::Nowhere {
            continue;
        }
        // A flat file holding several parts (older snapshots) is listed once.
        let source = s.origin().to_string();
        if out.iter().any(|r: &ProcessorReport| r.source == source) {
            continue;
        }
        out.push(ProcessorReport {
            part: part.label().to_string(),
            source,
            settings: s.values().clone(),
        });
    }
    let own = files.processor();
    let top = crate::models::config_util::read_json_opt(&dir.join(PROCESSOR_CONFIG))
        .map_err(|e| e.to_string())?;
    if let Some(serde_json::Value::Object(top)) = top {
        let settings: serde_json::Map<_, _> = top
            .into_iter()
            .filter(|(k, _)| own.get(k).is_some())
            .collect();
        out.push(ProcessorReport {
            part: "processor".into(),
            source: PROCESSOR_CONFIG.into(),
            settings,
        });
    }
    Ok(out)
}

/// Loads the model the way `serve` does (the family's loader), then drops it.
fn load_as_served(model: &ResolvedModel, opts: &SessionOptions) -> Option<String> {
    let load = LoadOptions {
        session: opts.clone(),
        encoder_cache_bytes: 0,
        kv_cache_bytes: 0,
        ..LoadOptions::default()
    };
    LoadedModel::load(model, &load).err().map(|e| e.to_string())
}

fn variant_of(stem: &str) -> (Option<Component>, String) {
    for c in [
        Component::EmbedTokens,
        Component::DecoderModelMerged,
        Component::VisionEncoder,
        Component::AudioEncoder,
    ] {
        if let Some(rest) = stem.strip_prefix(c.file_stem()) {
            let v = rest.trim_start_matches('_');
            return (
                Some(c),
                if v.is_empty() {
                    "fp32".into()
                } else {
                    v.into()
                },
            );
        }
    }
    (None, String::new())
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Reads the processor settings, loads the model as `serve` does, and loads every graph (all variants
/// in the snapshot, or only the selected ones) and reports their I/O.
pub fn inspect(model: ResolvedModel, selected_only: bool, opts: &SessionOptions) -> Report {
    let (processor, processor_error) = match processor_settings(&model.root) {
        Ok(p) => (p, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let load_error = load_as_served(&model, opts);
    let files = resolve::list_dir(&model.root).unwrap_or_default();
    let selected: Vec<String> = model
        .plan
        .graphs
        .iter()
        .map(|g| g.rel_path.clone())
        .collect();
    let mut graphs = Vec::new();
    for rel in files.iter().filter(|f| f.ends_with(".onnx")) {
        let is_selected = selected.contains(rel);
        if selected_only && !is_selected {
            continue;
        }
        let path = model.root.join(rel);
        let stem = Path::new(rel)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("");
        let (component, variant) = variant_of(stem);
        let data_prefix = format!("{rel}_data");
        let external_data = files
            .iter()
            .filter(|f| f.starts_with(&data_prefix))
            .map(|f| (f.clone(), size(&model.root.join(f))))
            .collect();
        let mut report = GraphReport {
            file: rel.clone(),
            component: component.map(|c| c.file_stem().to_string()),
            variant,
            bytes: size(&path),
            external_data,
            selected: is_selected,
            inputs: vec![],
            outputs: vec![],
            kv_bytes_per_token: None,
            error: None,
        };
        match GraphSession::load(
            component.map(|c| c.file_stem()).unwrap_or(stem),
            &path,
            opts,
        ) {
            Ok(s) => {
                report.inputs = s.inputs.iter().map(IoLine::from).collect();
                report.outputs = s.outputs.iter().map(IoLine::from).collect();
                report.kv_bytes_per_token = KvLayout::from_decoder(&s)
                    .ok()
                    .filter(|l| !l.slots.is_empty())
                    .map(|l| l.bytes_per_position());
            }
            Err(e) => report.error = Some(e.to_string()),
        }
        graphs.push(report);
    }
    Report {
        ort_library: crate::engine::runtime::loaded_library().map(|p| p.display().to_string()),
        model,
        processor,
        processor_error,
        load_error,
        graphs,
    }
}

fn mb(b: u64) -> String {
    format!("{:.2} MB", b as f64 / 1e6)
}

/// The human-readable form.
pub fn render_text(r: &Report) -> String {
    let m = &r.model;
    let mut out = String::new();
    let _ = writeln!(out, "model        {}", m.spec);
    let _ = writeln!(out, "snapshot     {}", m.root.display());
    let _ = writeln!(
        out,
        "family       {} (config.json model_type)",
        m.plan.family.name()
    );
    let _ = writeln!(out, "quantization {}", m.plan.quant);
    let _ = writeln!(out, "served as    {}", m.served_name);
    if !m.aliases.is_empty() {
        let _ = writeln!(out, "aliases      {}", m.aliases.join(", "));
    }
    let _ = writeln!(out, "metadata     {}", m.plan.metadata.join(", "));
    if let Some(lib) = &r.ort_library {
        let _ = writeln!(out, "onnxruntime  {lib}");
    }
    let _ = writeln!(out, "\nselected for {}:", m.plan.quant);
    for g in &m.plan.graphs {
        let mut line = format!("  {:<22} {}", g.component.file_stem(), g.rel_path);
        if !g.data_files.is_empty() {
            let names: Vec<&str> = g
                .data_files
                .iter()
                .map(|f| f.rsplit('/').next().unwrap_or(f))
                .collect();
            let _ = write!(line, "  (+ {})", names.join(", "));
        }
        if g.is_fallback() {
            let _ = write!(
                line,
                "  [fallback: {}{}.onnx missing]",
                g.component.file_stem(),
                g.preferred_suffix
            );
        }
        let _ = writeln!(out, "{line}");
    }
    for c in &m.plan.missing_optional {
        let _ = writeln!(
            out,
            "  {:<22} (none: requests with this modality are rejected)",
            c.file_stem()
        );
    }
    let _ = writeln!(out, "\nprocessor settings:");
    if let Some(e) = &r.processor_error {
        let _ = writeln!(out, "  UNREADABLE: {e}");
    } else if r.processor.is_empty() {
        let _ = writeln!(
            out,
            "  (none: no processor_config.json or preprocessor_config.json)"
        );
    }
    for p in &r.processor {
        let _ = writeln!(out, "  {:<18} from {}", p.part, p.source);
        let width = p.settings.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in &p.settings {
            let _ = writeln!(out, "      {k:<width$}  {v}");
        }
    }
    match &r.load_error {
        None => {
            let _ = writeln!(
                out,
                "\nloads as served: ok ({} loader: configs, tokenizer, template, processor settings, {} graphs)",
                m.plan.family.name(),
                m.plan.quant
            );
        }
        Some(e) => {
            let _ = writeln!(out, "\nloads as served: LOAD FAILED: {e}");
        }
    }
    let mut by_component: BTreeMap<String, Vec<&GraphReport>> = BTreeMap::new();
    for g in &r.graphs {
        by_component
            .entry(g.component.clone().unwrap_or_else(|| "other".into()))
            .or_default()
            .push(g);
    }
    let _ = writeln!(out, "\ngraphs ({}):", r.graphs.len());
    for (component, graphs) in by_component {
        let variants: Vec<&str> = graphs.iter().map(|g| g.variant.as_str()).collect();
        let _ = writeln!(out, "\n{component}: {}", variants.join(", "));
        for g in graphs {
            let data: u64 = g.external_data.iter().map(|(_, s)| s).sum();
            let mut head = format!(
                "  {}{}  {}",
                if g.selected { "* " } else { "  " },
                g.file,
                mb(g.bytes)
            );
            if !g.external_data.is_empty() {
                let _ = write!(
                    head,
                    " + {} external data in {} file(s)",
                    mb(data),
                    g.external_data.len()
                );
            }
            if let Some(kv) = g.kv_bytes_per_token {
                let _ = write!(
                    head,
                    "; KV cache {:.1} KiB per token of context",
                    kv as f64 / 1024.0
                );
            }
            let _ = writeln!(out, "{head}");
            if let Some(e) = &g.error {
                let _ = writeln!(out, "      LOAD FAILED: {e}");
                continue;
            }
            let width = g
                .inputs
                .iter()
                .chain(g.outputs.iter())
                .map(|i| i.name.len())
                .max()
                .unwrap_or(0);
            for (dir, list) in [("in ", &g.inputs), ("out", &g.outputs)] {
                for io in list.iter() {
                    let _ = writeln!(
                        out,
                        "      {dir} {:<width$}  {:<8} {}",
                        io.name, io.dtype, io.shape
                    );
                }
            }
        }
    }
    let _ = writeln!(out, "\n* = selected for {}", m.plan.quant);
    out
}
