//! Loading one ONNX graph into an ORT session and describing its inputs and outputs.
//!
//! Everything downstream drives graphs by the names recorded here ([`IoSpec`]), never by position.
//! [`GraphSession::require`] turns a missing input or output into one error that lists what was
//! expected and what the graph declares.

use std::fmt;
use std::path::{Path, PathBuf};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

use super::rewrite::{
    external_data_folder, external_data_locations, rewrite_model, AttentionKernel, AttentionSpec,
    GraphEdits, RewriteReport,
};
use super::EngineError;

/// Default [`SessionOptions::weights_in_place_min_bytes`]: graph files of 64 MiB and more.
pub const WEIGHTS_IN_PLACE_MIN_BYTES: u64 = 64 << 20;

/// Element types the engine feeds or reads. Anything else is reported by name and rejected where used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    F32,
    F16,
    I64,
    I32,
    Bool,
    Other(TensorElementType),
}

impl ElemType {
    fn from_ort(t: TensorElementType) -> Self {
        match t {
            TensorElementType::Float32 => Self::F32,
            TensorElementType::Float16 => Self::F16,
            TensorElementType::Int64 => Self::I64,
            TensorElementType::Int32 => Self::I32,
            TensorElementType::Bool => Self::Bool,
            other => Self::Other(other),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Self::F32 => "float32".into(),
            Self::F16 => "float16".into(),
            Self::I64 => "int64".into(),
            Self::I32 => "int32".into(),
            Self::Bool => "bool".into(),
            Self::Other(t) => format!("{t}").to_lowercase(),
        }
    }

    pub fn is_float(&self) -> bool {
        matches!(self, Self::F32 | Self::F16)
    }

    /// Bytes per element (0 for types this crate does not size).
    pub fn byte_size(&self) -> usize {
        match self {
            Self::F32 | Self::I32 => 4,
            Self::F16 => 2,
            Self::I64 => 8,
            Self::Bool => 1,
            Self::Other(_) => 0,
        }
    }
}

impl fmt::Display for ElemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// One input or output of a graph: name, element type and shape (`None` = symbolic dimension).
#[derive(Debug, Clone)]
pub struct IoSpec {
    pub name: String,
    pub dtype: ElemType,
    pub dims: Vec<Option<i64>>,
    /// Symbolic names of the dimensions ("" where the graph gives none).
    pub symbols: Vec<String>,
}

impl IoSpec {
    fn from_outlet(name: &str, ty: &ValueType) -> Self {
        match ty {
            ValueType::Tensor {
                ty,
                shape,
                dimension_symbols,
            } => {
                let dims = shape
                    .iter()
                    .map(|&d| if d < 0 { None } else { Some(d) })
                    .collect();
                let symbols = dimension_symbols.iter().map(|s| s.to_string()).collect();
                Self {
                    name: name.to_string(),
                    dtype: ElemType::from_ort(*ty),
                    dims,
                    symbols,
                }
            }
            _ => Self {
                name: name.to_string(),
                dtype: ElemType::Other(TensorElementType::String),
                dims: vec![],
                symbols: vec![],
            },
        }
    }

    /// The shape as text, e.g. `[batch_size, sequence_length, 64]`.
    pub fn shape_string(&self) -> String {
        let parts: Vec<String> = self
            .dims
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Some(v) => v.to_string(),
                None => match self.symbols.get(i) {
                    Some(s) if !s.is_empty() => s.clone(),
                    _ => "?".into(),
                },
            })
            .collect();
        format!("[{}]", parts.join(", "))
    }
}

/// Session options shared by every graph of a model.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Intra-op threads per session (0 = ONNX Runtime's default: one per physical core).
    pub intra_threads: usize,
    /// `accuracy_level` written into every MatMulNBits node at load ([`super::rewrite`]); `None`
    /// keeps the graph's own (the q4 exports leave it unset: fp32 compute, exact to the reference).
    pub matmul_accuracy_level: Option<i64>,
    /// Reduce the decoder's `logits` to the last position at load ([`super::rewrite`]).
    pub last_logits: bool,
    /// Give a decoder exported without an `attention_mask` input one at load ([`super::rewrite`]), so
    /// sequences of different lengths can share a batched run.
    pub add_attention_mask: bool,
    /// Let ONNX Runtime's intra-op threads spin between operators. Off by default: between decode
    /// steps the spinning threads take the cores the server's own threads (sampling, streaming,
    /// other requests) need; BENCHMARKS.md has the measurements.
    pub spin: bool,
    /// Whether the decoder's attention is fused at load ([`super::rewrite`]'s attention fusion).
    pub attention_mode: AttentionMode,
    /// The decoder's attention as its family declares it (set per decoder load): what the fusion
    /// needs to know that the graph does not say.
    pub attention: Option<AttentionSpec>,
    /// Which operator fused layers run (`--attention-kernel`).
    pub attention_kernel: AttentionKernel,
    /// Graph files of this many bytes or more are read through a memory map, and their inline
    /// weights of [`super::rewrite::EXTERNALIZE_MIN_BYTES`] or more handed to ONNX Runtime as external
    /// data of the same file ([`super::rewrite::GraphEdits::externalize`]): the load then holds each
    /// weight once (load peak 1.03 GB instead of 2.52 GB on the bench model). `u64::MAX` turns it off.
    pub weights_in_place_min_bytes: u64,
}

/// `--attention`: how the decoder's attention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionMode {
    /// Fused (one attention node per layer, KV cache written in place), checked at load against the graph
    /// as exported on a probe prompt; the exported graph is kept when they differ.
    #[default]
    Auto,
    /// Fused, without the load-time check (faster loads).
    Fused,
    /// The graph's attention as exported (the KV cache is copied every step).
    Unfused,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            intra_threads: default_threads(),
            matmul_accuracy_level: None,
            last_logits: true,
            add_attention_mask: true,
            spin: false,
            attention_mode: AttentionMode::Auto,
            attention: None,
            attention_kernel: AttentionKernel::Native,
            weights_in_place_min_bytes: WEIGHTS_IN_PLACE_MIN_BYTES,
        }
    }
}

/// The MatMulNBits accuracy level `auto` stands for: 4 (int8 compute) where ONNX Runtime has int8
/// dot-product kernels for it (x86-64 with AVX2 — AVX-VNNI, AVX-512 VNNI and AMX are faster still —
/// and ARM64), else `None` (as exported).
pub fn auto_matmul_accuracy_level() -> Option<i64> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            return Some(4);
        }
        None
    }
    #[cfg(target_arch = "aarch64")]
    {
        Some(4)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        None
    }
}

/// Intra-op threads when `--threads` is not given: every available core (ORT's own default), which is
/// what a single decode stream wants on CPU.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// An ORT session plus the I/O description read from it at load time.
pub struct GraphSession {
    /// Component name (e.g. `decoder_model_merged`), used in messages.
    pub component: String,
    pub path: PathBuf,
    pub session: Session,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
    /// What the load-time rewrite changed (empty when the graph runs as exported).
    pub rewrite: RewriteReport,
}

impl fmt::Debug for GraphSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GraphSession")
            .field("component", &self.component)
            .field("path", &self.path)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

impl GraphSession {
    /// Loads `path` with the process environment (see [`super::runtime::init`]).
    pub fn load(component: &str, path: &Path, opts: &SessionOptions) -> Result<Self, EngineError> {
        Self::load_with_logits(component, path, opts, None, false)
    }

    /// Loads a decoder: as [`Self::load`], and where `opts.last_logits` is set, the output named
    /// `logits` is reduced to the last position by a load-time rewrite (see [`super::rewrite`]).
    pub fn load_decoder(
        component: &str,
        path: &Path,
        opts: &SessionOptions,
        logits: &str,
    ) -> Result<Self, EngineError> {
        Self::load_with_logits(
            component,
            path,
            opts,
            Some(logits).filter(|_| opts.last_logits),
            true,
        )
    }

    fn load_with_logits(
        component: &str,
        path: &Path,
        opts: &SessionOptions,
        logits: Option<&str>,
        is_decoder: bool,
    ) -> Result<Self, EngineError> {
        let env = super::runtime::init(None).map_err(|e| EngineError::Runtime(e.to_string()))?;
        let load_err = |message: String| EngineError::Load {
            component: component.to_string(),
            path: path.to_path_buf(),
            message,
        };
        let edits = GraphEdits {
            accuracy_level: opts.matmul_accuracy_level,
            last_logits: logits.map(str::to_string),
            attention_mask: Some("attention_mask".to_string())
                .filter(|_| is_decoder && opts.add_attention_mask),
            relocate: Default::default(),
            attention: opts
                .attention
                .clone()
                .filter(|_| is_decoder && opts.attention_mode != AttentionMode::Unfused),
            attention_kernel: opts.attention_kernel,
            externalize: None,
        };
        let (session, rewrite) =
            build_session(env, path, opts, &edits, logits.is_some() || is_decoder)
                .map_err(load_err)?;
        if rewrite.changed()
            || rewrite.last_logits_skipped.is_some()
            || rewrite.attention_mask_skipped.is_some()
            || rewrite.attention_skipped.is_some()
        {
            tracing::info!(component, rewrite = %rewrite.describe(), "graph rewritten at load");
        }
        let inputs = session
            .inputs()
            .iter()
            .map(|o| IoSpec::from_outlet(o.name(), o.dtype()))
            .collect::<Vec<_>>();
        let outputs = session
            .outputs()
            .iter()
            .map(|o| IoSpec::from_outlet(o.name(), o.dtype()))
            .collect::<Vec<_>>();
        for io in inputs.iter() {
            tracing::debug!(component, name = %io.name, dtype = %io.dtype, shape = %io.shape_string(), "graph input");
        }
        for io in outputs.iter() {
            tracing::debug!(component, name = %io.name, dtype = %io.dtype, shape = %io.shape_string(), "graph output");
        }
        Ok(Self {
            component: component.to_string(),
            path: path.to_path_buf(),
            session,
            inputs,
            outputs,
            rewrite,
        })
    }

    pub fn input(&self, name: &str) -> Option<&IoSpec> {
        self.inputs.iter().find(|i| i.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&IoSpec> {
        self.outputs.iter().find(|i| i.name == name)
    }

    pub fn has_input(&self, name: &str) -> bool {
        self.input(name).is_some()
    }

    /// Checks that every named input and output exists; the error lists expected vs. found.
    pub fn require(&self, inputs: &[&str], outputs: &[&str]) -> Result<(), EngineError> {
        let missing_in: Vec<&str> = inputs
            .iter()
            .copied()
            .filter(|n| self.input(n).is_none())
            .collect();
        let missing_out: Vec<&str> = outputs
            .iter()
            .copied()
            .filter(|n| self.output(n).is_none())
            .collect();
        if missing_in.is_empty() && missing_out.is_empty() {
            return Ok(());
        }
        Err(EngineError::Interface {
            component: self.component.clone(),
            path: self.path.clone(),
            message: format!(
                "expected inputs {:?} and outputs {:?}; missing inputs {:?}, missing outputs {:?}; the graph declares inputs {:?} and outputs {:?}",
                inputs,
                outputs,
                missing_in,
                missing_out,
                self.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
                self.outputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>()
            ),
        })
    }

    /// The element type of a required input (after [`Self::require`]).
    pub fn input_type(&self, name: &str) -> Result<ElemType, EngineError> {
        self.input(name)
            .map(|i| i.dtype)
            .ok_or_else(|| EngineError::Interface {
                component: self.component.clone(),
                path: self.path.clone(),
                message: format!("no input named {name:?}"),
            })
    }

    /// Runs the graph on `inputs` and returns output `name`'s values (an encoder's one output).
    pub fn run_output(
        &mut self,
        inputs: super::kv::Feeds,
        name: &str,
    ) -> Result<super::tensor::FloatData, EngineError> {
        let mut out = self
            .session
            .run(inputs)
            .map_err(|e| EngineError::run(&self.component, e))?;
        let v = out
            .remove(name)
            .ok_or_else(|| EngineError::run(&self.component, format!("no {name} output")))?;
        Ok(super::tensor::extract_floats(&v)?.0)
    }

    pub fn output_type(&self, name: &str) -> Result<ElemType, EngineError> {
        self.output(name)
            .map(|i| i.dtype)
            .ok_or_else(|| EngineError::Interface {
                component: self.component.clone(),
                path: self.path.clone(),
                message: format!("no output named {name:?}"),
            })
    }
}

/// Builds the session; when `edits` change the graph, from the rewritten bytes in memory, with
/// external data (`*.onnx_data*`) read from the real folder of the files the graph names. A graph in a
/// Hugging Face snapshot (its files are links into the cache's `blobs/`) is always loaded that way,
/// with its external-data locations renamed to the files the links point at
/// ([`super::rewrite::external_data_folder`]): ONNX Runtime refuses data whose real path is outside
/// the model's folder.
fn build_session(
    env: &ort::environment::Environment,
    path: &Path,
    opts: &SessionOptions,
    edits: &GraphEdits,
    scan: bool,
) -> Result<(Session, RewriteReport), String> {
    let s = |e: ort::Error| e.to_string();
    let b = |e: ort::Error<ort::session::builder::SessionBuilder>| e.to_string();
    let mut builder = Session::builder(env)
        .map_err(s)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(b)?
        .with_memory_pattern(true)
        .map_err(b)?;
    if opts.intra_threads > 0 {
        builder = builder.with_intra_threads(opts.intra_threads).map_err(b)?;
    }
    builder = builder
        .with_config_entry(
            "session.intra_op.allow_spinning",
            if opts.spin { "1" } else { "0" },
        )
        .map_err(b)?;
    let linked = has_links(path);
    let read_err = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    // A large graph file holds its weights inline (an export under 2 GB): read through a map so the
    // rewriter can point ONNX Runtime at them in the file instead of handing over a copy.
    let inline_weights = len >= opts.weights_in_place_min_bytes;
    if edits.is_empty() && !scan && !linked && !inline_weights {
        return Ok((
            builder.commit_from_file(path).map_err(s)?,
            RewriteReport::default(),
        ));
    }
    // SAFETY: the map is only walked by the rewriter and dropped before the session is built (ONNX
    // Runtime then reads the weights from the file by path); a model file truncated meanwhile is
    // outside what a server can defend against (as for llama.cpp's maps).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(read_err)?;
    let bytes: &[u8] = &map;
    let mut edits = edits.clone();
    let mut folder = None;
    if linked {
        let locations = external_data_locations(bytes).map_err(|e| e.to_string())?;
        if !locations.is_empty() {
            let found = external_data_folder(path, &locations)?;
            edits.relocate = found.relocate;
            folder = Some(found.folder);
        }
    }
    if inline_weights {
        // The graph's own file as a location relative to the folder ONNX Runtime reads from: the
        // real file (a snapshot's link resolved), which must lie inside that folder.
        let real = std::fs::canonicalize(path).map_err(read_err)?;
        let real_dir = real.parent().unwrap_or(Path::new("/")).to_path_buf();
        let base = folder.get_or_insert(real_dir);
        edits.externalize = real
            .strip_prefix(base)
            .ok()
            .and_then(|rel| rel.to_str())
            .map(str::to_string);
    }
    let (rewritten, report) = rewrite_model(bytes, &edits).map_err(|e| e.to_string())?;
    let Some(rewritten) = rewritten else {
        drop(map);
        return Ok((builder.commit_from_file(path).map_err(s)?, report));
    };
    drop(map);
    if report.attention.as_ref().is_some_and(|f| f.native) {
        let domain = super::attention::domain().map_err(s)?;
        builder = builder.with_operators(domain).map_err(b)?;
    }
    let folder = match folder {
        Some(f) => f,
        None => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            std::fs::canonicalize(dir.unwrap_or(Path::new("."))).map_err(read_err)?
        }
    };
    builder = builder
        .with_config_entry(
            "session.model_external_initializers_file_folder_path",
            folder.to_string_lossy(),
        )
        .map_err(b)?;
    let session = builder.commit_from_memory(rewritten.model()).map_err(s)?;
    Ok((session, report))
}

/// Whether the graph or a file beside it is a symbolic link (a Hugging Face snapshot, or a folder
/// assembled from links): then its external data may live elsewhere.
fn has_links(path: &Path) -> bool {
    let is_link = |p: &Path| {
        std::fs::symlink_metadata(p)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false)
    };
    if is_link(path) {
        return true;
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    std::fs::read_dir(dir.unwrap_or(Path::new(".")))
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_type().map(|t| t.is_symlink()).unwrap_or(false))
        })
        .unwrap_or(false)
}
