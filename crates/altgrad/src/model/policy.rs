//! Per-head choice of attention method for a whole model (MATH §3 "Bound and degree", §6), shared
//! by the decoder and the encoder.

use crate::attention::bound::{choose_degree, eps_a, output_bound, MAX_AUTO_DEGREE};
use crate::attention::estimate::{estimate_poly_error, ErrorEstimate, EstimateSpec};
use crate::attention::features::feature_dim;
use crate::attention::{
    head_score_bounds, AttnOptions, AttnShape, Budget, Decider, HeadPlan, Method, Policy, PolyOptions,
};
use crate::linalg::Scalar;
use crate::Result;
use rayon::prelude::*;

/// How the model chooses each head's attention method (MATH §3 "Bound and degree", §6).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttentionPolicy {
    /// Every head uses this plan (`--attention exact|poly|altgrad` with `--degree`).
    Fixed(HeadPlan),
    /// Per layer and head: the smallest even degree cheaper than exact at this `n` (`r ≤
    /// max_rank`) that the a-priori bound (`ε_A(R, g) ≤ tol`, `R` the smaller of the shifted and
    /// unshifted bounds) or the measured estimate (95% upper bound `≤ tol`) admits; otherwise
    /// exact ([`crate::attention::Policy::choose`], MATH §3 "Measured estimate").
    Auto {
        /// Tolerance on a head's relative error: `ε_A` for the bound, the measured relative error
        /// of the head's output (95% upper bound) for the estimate.
        tol: f64,
        /// Largest feature width `r` allowed (memory budget).
        max_rank: usize,
        /// Chunk size of the polynomial kernels.
        chunk: usize,
    },
    /// Every head uses `method` (poly or altgrad) with `degree`, or without one the smallest even
    /// degree whose `ε_A(R, g)` meets `tol` (capped at
    /// [`crate::attention::bound::MAX_AUTO_DEGREE`], in which case the predicted error says so) —
    /// `--attention poly|altgrad [--degree G]` — refused before any work when a layer's predicted
    /// cost exceeds `budget` ([`Budget::check`]).
    Forced {
        /// [`Method::Poly`] or [`Method::AltGrad`] (ALTGrad instead of the polynomial method's exact
        /// gradient).
        method: Method,
        /// The degree of every head; `None`: per head from `tol`.
        degree: Option<usize>,
        /// What the run may cost.
        budget: Budget,
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
            AttentionPolicy::Forced { method, .. } => method.as_str(),
        }
    }
}

/// The reason of a head whose layer is built with its attention ([`crate::model::BuiltInAttention`]):
/// no policy chose it, and the exact pass computes the same function.
pub const BUILT_IN_REASON: &str = "built into the model: its own attention, computed exactly";

/// One head's decision in a forward pass, for reports.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadDecision {
    /// The plan used.
    pub plan: HeadPlan,
    /// Score bound `R` (MATH §3) of the scores the plan approximates (auto: the smaller of the
    /// shifted and unshifted bounds), measured on this input.
    pub bound: f64,
    /// Feature width `r = C(d+g, g)` for approximate heads.
    pub rank: Option<usize>,
    /// Predicted bound on the relative error of the head's output, `2ε_A/(1−ε_A)` (0 for exact;
    /// ∞ when `ε_A ≥ 1`, i.e. no guarantee).
    pub predicted_rel_err: f64,
    /// Whether `bound` (and an estimate) refers to the shifted scores (MATH §3 row shift).
    pub center: bool,
    /// Measured error of the plan's degree, or of the degree auto considered (auto only).
    pub estimate: Option<ErrorEstimate>,
    /// What decided (auto only).
    pub decided_by: Option<Decider>,
    /// Why this plan (from the policy).
    pub reason: String,
}

impl HeadDecision {
    /// Whether the head is a layer's built-in attention ([`BUILT_IN_REASON`]): the model's own
    /// function, the same in every pass.
    pub fn is_built_in(&self) -> bool {
        self.reason == BUILT_IN_REASON
    }
}

/// Chooses every head's plan for one layer from its `q`, `k` (after RoPE for decoders) and `v`,
/// heads in parallel; auto measures each head's error on sampled rows ([`estimate_poly_error`]).
///
/// Errors: shape mismatches; a forced plan whose predicted cost exceeds its budget
/// ([`Budget::check`], naming `attention`).
pub fn decide<T: Scalar>(
    policy: &AttentionPolicy,
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
) -> Result<Vec<HeadDecision>> {
    let bounds = head_score_bounds(q, k, shape, opts)?;
    let s = *shape;
    let (d, dv, n) = (s.head_dim, s.head_dim_v, s.seq_len);
    s.check_len("v", v, s.num_kv_heads, dv)?;
    let decisions: Vec<HeadDecision> = bounds
        .into_par_iter()
        .enumerate()
        .map(|(h, b)| match policy {
            AttentionPolicy::Fixed(plan) => {
                let r = b.for_center(plan.options().is_none_or(|p| p.center));
                let (rank, pred) = match plan.degree() {
                    Some(g) => (plan.rank(d), output_bound(r, g)),
                    None => (None, 0.0),
                };
                let reason = "forced by --attention".to_string();
                let center = plan.options().is_none_or(|p| p.center);
                HeadDecision { plan: *plan, bound: r, center, rank, predicted_rel_err: pred, estimate: None, decided_by: None, reason }
            }
            AttentionPolicy::Forced { method, degree: Some(g), chunk, center, .. } => {
                let plan = method.plan(PolyOptions { degree: *g, center: *center, chunk: *chunk });
                let r = b.for_center(*center);
                let reason = format!("forced by --attention {method} --degree {g}");
                let pred = output_bound(r, *g);
                HeadDecision { plan, bound: r, center: *center, rank: plan.rank(d), predicted_rel_err: pred, estimate: None, decided_by: None, reason }
            }
            AttentionPolicy::Forced { method, degree: None, tol, chunk, center, .. } => {
                let r = b.for_center(*center);
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
                let pred = output_bound(r, g);
                HeadDecision { plan, bound: r, center: *center, rank: feature_dim(d, g), predicted_rel_err: pred, estimate: None, decided_by: None, reason }
            }
            AttentionPolicy::Auto { tol, max_rank, chunk } => {
                let (qh, kh, vh) = (s.query(q, h), s.key(k, h / s.group()), s.value(v, h / s.group()));
                let mut measure = |gs: &[usize], center: bool| {
                    let spec = EstimateSpec::new(n, opts.scale, opts.is_causal(), center);
                    estimate_poly_error(&qh, &kh, &vh, &spec, gs)
                };
                let p = Policy::choose(n, d, dv, opts.is_causal(), b, *tol, *max_rank, &mut measure);
                let plan = match p.degree {
                    Some(g) => p.method.plan(PolyOptions { degree: g, center: p.center, chunk: *chunk }),
                    None => HeadPlan::Exact,
                };
                HeadDecision {
                    plan,
                    bound: p.bound,
                    center: p.center,
                    rank: p.rank,
                    predicted_rel_err: p.predicted_rel_err,
                    estimate: p.estimate,
                    decided_by: Some(p.decided_by),
                    reason: p.reason,
                }
            }
        })
        .collect();
    if let AttentionPolicy::Forced { budget, .. } = policy {
        let plans: Vec<HeadPlan> = decisions.iter().map(|x| x.plan).collect();
        // one sequence of the batch: the check is per layer and the ratio the same for every sequence
        let per_seq = &plans[..s.num_heads.min(plans.len())];
        budget.check(per_seq, n, d, dv, opts.is_causal(), std::mem::size_of::<T>(), rayon::current_num_threads())?;
    }
    Ok(decisions)
}
