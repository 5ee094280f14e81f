//! ONNX Runtime mechanics, independent of any model family: loading the library and environment
//! ([`runtime`]), sessions described by their I/O names ([`session`]), load-time graph rewrites ([`rewrite`]), the fused
//! layers' attention kernel, a custom operator ([`attention`]), host tensors and casts between
//! sessions ([`tensor`]), the decoder KV cache kept in ORT values ([`kv`]), the prefix cache of finished
//! sequences' KV ([`prefix_cache`]), the left-padded KV of the rows that decode together ([`batch`]), how prompts are split into prefill steps ([`schedule`]), and the owner thread that is the only place `Session::run` is called
//! from ([`thread`]).

pub mod attention;
pub mod batch;
pub mod kv;
pub mod prefix_cache;
pub mod rewrite;
pub mod runtime;
pub mod schedule;
pub mod session;
pub mod tensor;
pub mod thread;

use std::path::PathBuf;

use crate::error::ErrorClass;

/// Errors of the ONNX Runtime layer.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Runtime(String),
    #[error("failed to load {component} from {}: {message}", path.display())]
    Load {
        component: String,
        path: PathBuf,
        message: String,
    },
    #[error("{component} ({}) does not have the expected interface: {message}", path.display())]
    Interface {
        component: String,
        path: PathBuf,
        message: String,
    },
    #[error("inference failed in {component}: {message}")]
    Run { component: String, message: String },
    #[error("tensor error: {0}")]
    Tensor(String),
    #[error("the engine thread has stopped")]
    Stopped,
}

impl EngineError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Stopped => ErrorClass::Unavailable,
            _ => ErrorClass::Internal,
        }
    }

    pub fn run(component: &str, e: impl std::fmt::Display) -> Self {
        Self::Run {
            component: component.to_string(),
            message: e.to_string(),
        }
    }
}
