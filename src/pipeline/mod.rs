//! The text stages around the model, independent of any model family and of ONNX Runtime:
//! prompt rendering before tokenization, and after each forward pass the choice of the next id,
//! its incremental detokenization, the reasoning split and stop-string matching. Each stage is
//! synchronous, owns no threads and never panics on request data, so the engine's owner thread can
//! call it per token.
//!
//! - [`template`]: Hugging Face chat templates rendered with transformers' Jinja semantics.
//! - [`sampling`]: penalties, greedy and seeded top-k / top-p / min-p sampling.
//! - [`grammar`]: constrained decoding (llguidance masks over the model's vocabulary).
//! - [`logprobs`]: log-softmax and top-k of the raw logits.
//! - [`detok`]: streaming detokenization whose deltas concatenate to the full decode.
//! - [`stop`]: stop strings matched on text across token boundaries.
//! - [`reasoning`]: a thinking model's reasoning split from its answer at marker tokens.
//! - [`prompt_size`]: cheap bounds that refuse a prompt too long for the context before the work.
//! - [`output`]: one sequence's text path through the three above, id by id.
//! - [`image`]: image decoding and Pillow-exact resizing; [`audio`]: audio decoding and log-mel features.

pub mod audio;
pub mod detok;
pub mod grammar;
pub mod image;
pub mod logprobs;
pub mod output;
pub mod prompt_size;
pub mod reasoning;
pub mod sampling;
pub mod stop;
pub mod template;
