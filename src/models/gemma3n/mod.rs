//! The Gemma-3n family (`model_type: gemma3n`): `config.json` values ([`config`]), prompt building
//! ([`prompt`]), media preprocessing ([`preprocess`]) and the four ONNX graphs ([`model`]).

pub mod config;
pub mod model;
pub mod preprocess;
pub mod prompt;

pub use config::{Gemma3nConfig, GenerationDefaults};
pub use model::Gemma3nModel;
pub use preprocess::{MediaDecoder, MediaLimits};
pub use prompt::{Gemma3nPrompter, Prompt};
