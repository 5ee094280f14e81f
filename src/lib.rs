//! onnx-chat: an OpenAI-compatible server for multimodal chat models exported to ONNX.
//!
//! Layers point one way (see `shared/STYLE.md`):
//!
//! - [`openai`]: HTTP request/response bodies, validation into a `ValidChatRequest`, conversion to a job.
//! - [`frontend`]: the warp server; publishes jobs on the bus and answers from the frames that return.
//! - [`protocol`]: the wire types between front ends and workers (`Job`, `Frame`, …), mirrored by
//!   `schemas/v1/*.schema.json`.
//! - [`bus`]: the `Bus` trait with the in-process implementation (and NATS).
//! - [`worker`]: pulls jobs by capacity, runs them, publishes frames, handles cancellation.
//! - [`models`]: model resolution (local, HF cache, hub), the model families, and the generation loop.
//! - [`pipeline`]: model-independent stages: chat template, sampling, detokenization, the reasoning
//!   split, stop strings, image and audio preprocessing.
//! - [`engine`]: ONNX Runtime: library loading, sessions described by name, KV cache, owner thread.
//!
//! [`app`] wires them for each subcommand; [`config`] is the command line; [`error`] the error classes.

pub mod anthropic;
pub mod app;
pub mod bus;
pub mod config;
pub mod engine;
pub mod error;
pub mod frontend;
pub mod inspect;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod pipeline;
pub mod protocol;
pub mod shutdown;
pub mod telemetry;
pub mod wire;
pub mod worker;
