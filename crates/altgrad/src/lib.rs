//! # altgrad
//!
//! Loss and gradients of multi-layer transformers, with each attention head computed exactly
//! (tiled, O(n²) time, O(n) memory) or approximated by the polynomial method in almost linear
//! time, and a measured account of how far the approximation is from exact.
//!
//! ## Map
//!
//! - [`linalg`]: the [`linalg::Scalar`] trait (f32, f64) and thin helpers over `faer`.
//! - [`attention`]: the core. Exact tiled attention (MATH §2) with GQA, causal or not,
//!   forward saving `O` and `lse`, backward recomputing `P` block by block.
//! - [`model`]: the Llama-family decoder and the BERT encoder behind one interface,
//!   [`model::Network`] (config, named weights, layers with hand-written backward, the losses).
//! - [`io`]: loading HF directories (`config.json` + `model.safetensors`), token files, writing
//!   safetensors atomically (temporary file, then rename).
//! - [`report`]: the JSON report types shared by the CLI's subcommands.
//!
//! Rules: `attention` knows nothing of models, `model` nothing of files, `io` builds a model.
//! Formulas are cited by section of `MATH.md` (shipped in the design notes) and by the lemma
//! numbers of Liang, Sha, Shi, Song, Zhou (arXiv 2408.13233 v2).

pub mod attention;
pub mod bench;
pub mod chart;
pub mod error;
pub(crate) mod fastmath;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod job;
pub mod linalg;
pub mod model;
pub mod profile;
pub mod report;
pub mod simd;
pub mod train;

pub use error::{Error, Result};

/// One step of long work (a bench sweep, a training run), passed to the caller's progress
/// callback: `done` of `total` steps, and what the step was. The library never draws progress
/// itself; the CLI turns these into a progress bar.
#[derive(Clone, Copy, Debug)]
pub struct Progress<'a> {
    /// Steps finished so far (1-based after the first step).
    pub done: u64,
    /// Steps in all.
    pub total: u64,
    /// What the step was, or the latest loss for training.
    pub message: &'a str,
}
