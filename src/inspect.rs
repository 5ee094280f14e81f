//! `onnx-chat inspect MODEL`: the first thing to run on a new snapshot. Shows how the model name
//! resolved, which file each component uses under the chosen quantization (and whether that was a
//! fallback), and every ONNX graph's inputs and outputs with element types and shapes.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use serde::Serialize;

use crate::engine::kv::KvLayout;
use crate::engine::session::{GraphSession, IoSpec, SessionOptions};
use crate::models::catalog::Component;
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

#[derive(Debug, Serialize)]
pub struct Report {
    pub model: ResolvedModel,
    pub ort_library: Option<String>,
    pub graphs: Vec<GraphReport>,
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

/// Loads every graph (all variants in the snapshot, or only the selected ones) and reports their I/O.
pub fn inspect(model: ResolvedModel, selected_only: bool, opts: &SessionOptions) -> Report {
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
