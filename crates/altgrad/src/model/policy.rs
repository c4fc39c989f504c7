//! Per-head choice of attention method for a whole model (MATH §3 "Bound and degree", §6), shared
//! by the decoder and the encoder.

use crate::attention::bound::{choose_degree, eps_a, output_bound, MAX_AUTO_DEGREE};
use crate::attention::features::feature_dim;
use crate::attention::{head_bounds, AttnOptions, AttnShape, HeadPlan, Method, Policy, PolyOptions};
use crate::linalg::Scalar;
use crate::Result;

/// How the model chooses each head's attention method (MATH §3 "Bound and degree", §6).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttentionPolicy {
    /// Every head uses this plan (`--attention exact|poly|altgrad` with `--degree`).
    Fixed(HeadPlan),
    /// Per layer and head: measure the score bound `R` after the row shift, take the smallest even
    /// degree with `ε_A(R, g) ≤ tol`, and use polynomial attention only where the cost model says
    /// it is cheaper than exact at this `n` and `r ≤ max_rank`; otherwise exact
    /// ([`crate::attention::Policy::choose`]).
    Auto {
        /// Tolerance on the entrywise relative error `ε_A` of the attention matrix.
        tol: f64,
        /// Largest feature width `r` allowed (memory budget).
        max_rank: usize,
        /// Chunk size of the polynomial kernels.
        chunk: usize,
    },
    /// Every head uses `method` (poly or altgrad), each with the smallest
    /// even degree whose `ε_A(R, g)` meets `tol` (capped at
    /// [`crate::attention::bound::MAX_AUTO_DEGREE`], in which case the predicted error says so).
    /// `--attention poly|altgrad --tol EPS` without `--degree`.
    PerHeadDegree {
        /// [`Method::Poly`] or [`Method::AltGrad`] (ALTGrad instead of the polynomial method's exact
        /// gradient).
        method: Method,
        /// Tolerance on `ε_A`.
        tol: f64,
        /// Chunk size.
        chunk: usize,
        /// Row shift on (MATH §3).
        center: bool,
    },
}

impl AttentionPolicy {
    /// Exact attention everywhere.
    pub const EXACT: AttentionPolicy = AttentionPolicy::Fixed(HeadPlan::Exact);

    /// Name for reports: `exact`, `poly`, `altgrad` or `auto`.
    pub fn name(&self) -> &'static str {
        match self {
            AttentionPolicy::Fixed(p) => p.method_name(),
            AttentionPolicy::Auto { .. } => "auto",
            AttentionPolicy::PerHeadDegree { method, .. } => method.as_str(),
        }
    }
}

/// One head's decision in a forward pass, for reports.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadDecision {
    /// The plan used.
    pub plan: HeadPlan,
    /// Score bound `R` after the row shift (MATH §3), measured on this input.
    pub bound: f64,
    /// Feature width `r = C(d+g, g)` for approximate heads.
    pub rank: Option<usize>,
    /// Predicted bound on the relative error of the head's output, `2ε_A/(1−ε_A)` (0 for exact;
    /// ∞ when `ε_A ≥ 1`, i.e. no guarantee).
    pub predicted_rel_err: f64,
    /// Why this plan (from the policy).
    pub reason: String,
}

/// Chooses every head's plan for one layer from its `q`, `k` (after RoPE for decoders).
///
/// Errors: shape mismatches.
pub fn decide<T: Scalar>(
    policy: &AttentionPolicy,
    q: &[T],
    k: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
) -> Result<Vec<HeadDecision>> {
    let center = match policy {
        AttentionPolicy::Fixed(plan) => plan.options().is_none_or(|p| p.center),
        AttentionPolicy::PerHeadDegree { center, .. } => *center,
        _ => true,
    };
    let bounds = head_bounds(q, k, shape, opts, center)?;
    let (d, dv, n) = (shape.head_dim, shape.head_dim_v, shape.seq_len);
    Ok(bounds
        .into_iter()
        .map(|r| match policy {
            AttentionPolicy::Fixed(plan) => {
                let (rank, pred, reason) = match plan.degree() {
                    Some(g) => (plan.rank(d), output_bound(r, g), "forced by --attention".to_string()),
                    None => (None, 0.0, "forced by --attention".to_string()),
                };
                HeadDecision { plan: *plan, bound: r, rank, predicted_rel_err: pred, reason }
            }
            AttentionPolicy::PerHeadDegree { method, tol, chunk, center } => {
                let chosen = choose_degree(r, *tol, MAX_AUTO_DEGREE);
                let wanted = chosen.unwrap_or(MAX_AUTO_DEGREE);
                // Largest even degree ≤ wanted whose state fits (feature width; ALTGrad's Kronecker state).
                let mut g = wanted;
                while g > 2 && !method.fits(d, dv, g) {
                    g -= 2;
                }
                let plan = method.plan(PolyOptions { degree: g, center: *center, chunk: *chunk });
                // Every number a reason states holds: the bound quoted is the one g actually has.
                let got = eps_a(r, g);
                let reason = match chosen {
                    Some(w) if g < w => format!(
                        "degree {w} would meet ε_A ≤ {tol:e} at R = {r:.3} but its state is too large; capped at g = {g}, \
                         whose bound is ε_A = {got:.1e}"
                    ),
                    Some(_) => format!("smallest even degree with ε_A(R = {r:.3}, g) ≤ {tol:e}"),
                    None if g < wanted => format!(
                        "no even degree ≤ {MAX_AUTO_DEGREE} meets ε_A ≤ {tol:e} at R = {r:.3}; g = {g}, the largest whose \
                         state fits (ε_A = {got:.1e})"
                    ),
                    None => format!(
                        "no even degree ≤ {MAX_AUTO_DEGREE} meets ε_A ≤ {tol:e} at R = {r:.3}; forced g = {g} (ε_A = \
                         {got:.1e})"
                    ),
                };
                HeadDecision { plan, bound: r, rank: feature_dim(d, g), predicted_rel_err: output_bound(r, g), reason }
            }
            AttentionPolicy::Auto { tol, max_rank, chunk } => {
                let p = Policy::choose(n, d, dv, opts.is_causal(), r, *tol, *max_rank);
                let plan = match p.degree {
                    Some(g) => p.method.plan(PolyOptions { degree: g, center: true, chunk: *chunk }),
                    None => HeadPlan::Exact,
                };
                HeadDecision { plan, bound: r, rank: p.rank, predicted_rel_err: p.predicted_rel_err, reason: p.reason }
            }
        })
        .collect())
}
