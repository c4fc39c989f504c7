//! JSON report types (serde) shared by the CLI's subcommands and the Python package. Key names
//! are the stable contract of ARCHITECTURE.md ("`grad --json` keys"); the reports are assembled
//! in [`crate::job`] ([`crate::job::grad_run`], [`crate::job::inspect_report`]), so the CLI and
//! the bindings produce the same objects.

use crate::attention::estimate::ErrorEstimate;
use serde::{Deserialize, Serialize};

/// One attention head's decision in a `grad` run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HeadReport {
    /// Layer index, from 0.
    pub layer: usize,
    /// Query head index within the layer, from 0.
    pub head: usize,
    /// `exact`, `poly` or `altgrad`.
    pub method: String,
    /// Score bound R after the row shift (MATH §3); `null` for exact heads that did not measure it.
    pub bound: Option<f64>,
    /// Polynomial degree g; `null` for exact heads.
    pub degree: Option<usize>,
    /// Feature width r = C(d+g, g); `null` for exact heads.
    pub rank: Option<usize>,
    /// Predicted relative error bound of this head's attention output (0 for exact).
    pub predicted_rel_err: f64,
    /// `auto`: the measured error of the degree used, or of the degree considered for an exact
    /// head ([`crate::attention::estimate`]); `null` otherwise.
    pub estimate: Option<ErrorEstimate>,
    /// `auto`: what decided (`bound`, `estimate`, `error` or `cost`); `null` otherwise.
    pub decided_by: Option<String>,
    /// With `--compare`, for heads with an estimate: the true `‖Õ − O‖_F/‖O‖_F` of the
    /// estimate's degree on this head's inputs (full polynomial and exact forwards); `null` otherwise.
    pub true_rel_err_o: Option<f64>,
    /// With `--compare`, for heads with an estimate: the true `‖dQ̃ − dQ‖_F/‖dQ‖_F` of the
    /// estimate's degree for a standard normal upstream gradient; `null` otherwise.
    pub true_rel_err_dq: Option<f64>,
}

/// Wall-clock seconds of each phase.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Timing {
    /// Forward pass (including the loss), seconds; with `--compare` the median of
    /// [`crate::job::COMPARE_REPS`] runs.
    pub forward: f64,
    /// Backward pass with the chosen attention methods, seconds (a median with `--compare`).
    pub backward: f64,
    /// Exact backward run for `--compare` (median of [`crate::job::COMPARE_REPS`] runs); `null`
    /// otherwise.
    pub exact_backward: Option<f64>,
}

/// Per-layer error against the exact backward.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerCompare {
    /// Layer index, from 0.
    pub layer: usize,
    /// Relative error of dL/d(layer input).
    pub rel_err_dx: f64,
    /// Relative error of the layer's weight gradients, concatenated.
    pub rel_err_dw: f64,
}

/// The `--compare` section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Compare {
    /// Loss of the exact model.
    pub loss_exact: f64,
    /// Exact backward time / approximate backward time (medians of [`crate::job::COMPARE_REPS`]
    /// interleaved runs each); `null` when every head ran exact attention on both sides.
    pub speedup: Option<f64>,
    /// Relative error over all parameter gradients, concatenated.
    pub rel_err_total: f64,
    /// Per-layer errors.
    pub layers: Vec<LayerCompare>,
}

/// The report of `altgrad grad --json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GradReport {
    /// Model source (path or `tiny`).
    pub model: String,
    /// Number of tokens.
    pub seq_len: usize,
    /// Number of transformer layers.
    pub n_layers: usize,
    /// Attention method requested (`exact`, `poly`, `altgrad`, `auto`), or `built-in` when every
    /// layer of the model is built with its own attention (which then ran whatever was requested).
    pub attention: String,
    /// Loss value (mean next-token cross-entropy, nats).
    pub loss: f64,
    /// Every head's decision.
    pub heads: Vec<HeadReport>,
    /// Phase timings.
    pub timing_s: Timing,
    /// Comparison with the exact backward, when requested.
    pub compare: Option<Compare>,
}

/// One head's census line (`altgrad inspect`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InspectHead {
    /// Layer index, from 0.
    pub layer: usize,
    /// Query head index.
    pub head: usize,
    /// Largest `|τ q_i·k_j|` over allowed pairs (measured exactly, O(n²d)).
    pub max_abs_score: f64,
    /// Score bound R after the row shift (MATH §3).
    pub bound: f64,
    /// Score bound R without the row shift.
    pub bound_unshifted: f64,
    /// Smallest even degree with `ε_A(R, g) ≤ tol`; `null` when none ≤ 8 does.
    pub degree: Option<usize>,
    /// Feature width `r = C(d+g, g)` of that degree.
    pub rank: Option<usize>,
    /// What `--attention auto` would use: `poly` or `exact`.
    pub method: String,
    /// The degree `auto` would use (`null` for exact).
    pub auto_degree: Option<usize>,
    /// The measured error of that degree, or of the degree considered for an exact head.
    pub estimate: Option<ErrorEstimate>,
    /// What decided: `bound`, `estimate`, `error` or `cost`.
    pub decided_by: String,
    /// Why.
    pub reason: String,
}

/// The report of `altgrad inspect --json`: the census of every head on one input.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InspectReport {
    /// Model source (path or `tiny`).
    pub model: String,
    /// Number of tokens.
    pub seq_len: usize,
    /// Tolerance on ε_A used for `degree` and `method`.
    pub tol: f64,
    /// One line per (layer, head), layer-major.
    pub heads: Vec<InspectHead>,
}
