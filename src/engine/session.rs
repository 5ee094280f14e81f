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

use super::EngineError;

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
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            intra_threads: default_threads(),
        }
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
        let env = super::runtime::init(None).map_err(|e| EngineError::Runtime(e.to_string()))?;
        let session = build_session(env, path, opts).map_err(|e| EngineError::Load {
            component: component.to_string(),
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
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

fn build_session(
    env: &ort::environment::Environment,
    path: &Path,
    opts: &SessionOptions,
) -> ort::Result<Session> {
    let mut builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_memory_pattern(true)?;
    if opts.intra_threads > 0 {
        builder = builder.with_intra_threads(opts.intra_threads)?;
    }
    builder.commit_from_file(path)
}
