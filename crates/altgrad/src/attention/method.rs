//! One place per attention method: its name, options, validation, cost, feasibility and the
//! dispatch of its forward and backward to the method's own file (MATH §2 exact, §3–4 poly, §5
//! altgrad; cost MATH §7).
//!
//! [`Method`] is a method's identity, what a flag, a JSON field or a Python argument names
//! (`"exact"`, `"poly"`, `"altgrad"`; [`Method::ALL`] is the registry). [`HeadPlan`] is a method
//! with its options, what one head runs; its arms call [`super::exact`], [`super::poly`] and
//! [`super::altgrad`]. [`Policy`] is the automatic per-head choice between exact and poly.
//!
//! Adding a method: a kernel file beside `exact.rs`/`poly.rs`/`altgrad.rs`, one arm in [`Method`]
//! (name, summary, cost, check) and one in [`HeadPlan`] (its forward and backward).

use super::bound::{eps_a, output_bound, ScoreBounds, MAX_AUTO_DEGREE};
use super::cost::{
    altgrad_flops, altgrad_state_bytes, exact_flops, exact_state_bytes, hybrid_flops, poly_flops, poly_state_bytes,
};
use super::estimate::ErrorEstimate;
use super::features::{feature_dim, FeatureMap, MAX_FEATURE_DIM};
use super::hybrid::{HybridOptions, HybridOutput};
use super::poly::{self, Head, PolyOptions, PolyOutput, State, DEFAULT_CHUNK};
use super::view::{Rows, RowsMut};
use super::workspace::Workspace;
use super::{altgrad, exact, AttnGrads, AttnOptions, AttnOutput, AttnShape, Qkv};
use crate::linalg::Scalar;
use crate::{Error, Result};

/// An attention method's identity (MATH §2, §4, §5): what `--attention`, a report's `method` field
/// and the Python `method=` argument name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Exact tiled softmax attention (MATH §2).
    Exact,
    /// Polynomial attention with its exact gradient (MATH §4).
    Poly,
    /// The paper's Algorithm 1 (MATH §5).
    AltGrad,
    /// Hybrid attention (MATH §4.1): exact softmax for a window and sinks, the polynomial for the
    /// far keys. A model's own attention (a layer of a model built for it, `attn`, Python), not a
    /// stand-in for softmax: outside [`Method::ALL`], so `grad --attention` and `auto` do not offer
    /// it; its window lives in [`HeadPlan::Hybrid`].
    Hybrid,
}

impl Method {
    /// The methods that stand in for a softmax head, in report order (exact first): the registry
    /// parsing and listings use ([`Method::Hybrid`], a model's own attention, is not among them).
    pub const ALL: [Method; 3] = [Method::Exact, Method::Poly, Method::AltGrad];

    /// Lower-case name, as on the CLI, in JSON reports and in Python: `exact`, `poly`, `altgrad`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Exact => "exact",
            Method::Poly => "poly",
            Method::AltGrad => "altgrad",
            Method::Hybrid => "hybrid",
        }
    }

    /// One line saying what the method computes, without a final period (CLI help).
    pub fn summary(&self) -> &'static str {
        match self {
            Method::Exact => "Exact softmax attention (tiled, O(n²) time, O(n) memory)",
            Method::Poly => "Polynomial attention: degree-g Taylor softmax with its exact gradient, O(n·r·d)",
            Method::AltGrad => "The paper's Algorithm 1 (ALTGrad): the softmax gradient formula with the low-rank f̃",
            Method::Hybrid => {
                "Hybrid: exact softmax for a window and sinks, the polynomial for the far keys, one normalization"
            }
        }
    }

    /// The method named `name` (one of [`Method::ALL`]'s [`Method::as_str`]), or `None`.
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// The names of [`Method::ALL`] joined by `sep` (for messages: `exact, poly, altgrad`).
    pub fn names(sep: &str) -> String {
        Method::ALL.map(|m| m.as_str()).join(sep)
    }

    /// Sort key of a report's `method` string: its position in [`Method::ALL`] (exact first), an
    /// unknown name after every method.
    pub fn report_order(name: &str) -> usize {
        Method::ALL.iter().position(|m| m.as_str() == name).unwrap_or(Method::ALL.len())
    }

    /// Whether the method approximates softmax with the polynomial feature map (poly, altgrad) and
    /// so takes [`PolyOptions`].
    pub fn is_approximate(&self) -> bool {
        !matches!(self, Method::Exact)
    }

    /// This method with options `p` (ignored for exact): what one head runs. Hybrid gets no
    /// window and no sinks here (which is `poly`); build [`HeadPlan::Hybrid`] to give them.
    pub fn plan(self, p: PolyOptions) -> HeadPlan {
        match self {
            Method::Exact => HeadPlan::Exact,
            Method::Poly => HeadPlan::Poly(p),
            Method::AltGrad => HeadPlan::AltGrad(p),
            Method::Hybrid => HeadPlan::Hybrid(HybridOptions { window: 0, sinks: 0, poly: p }),
        }
    }

    /// FLOPs of forward + backward for one head (MATH §7; [`exact_flops`], [`poly_flops`],
    /// [`altgrad_flops`]): `n` rows, widths `d`, `d_v`, feature width `r` and `chunk` (both ignored
    /// for exact).
    pub fn flops(&self, n: usize, d: usize, dv: usize, r: usize, causal: bool, chunk: usize) -> f64 {
        match self {
            Method::Exact => exact_flops(n, d, dv, causal),
            Method::Poly => poly_flops(n, d, dv, r, causal, chunk),
            Method::AltGrad => altgrad_flops(n, d, dv, r, causal, chunk),
            // without its window ([`HeadPlan::flops`] adds it)
            Method::Hybrid => poly_flops(n, d, dv, r, causal, chunk),
        }
    }

    /// Working memory of one head in bytes beyond inputs and outputs ([`exact_state_bytes`],
    /// [`poly_state_bytes`], [`altgrad_state_bytes`]); `elem` = 4 for f32, 8 for f64.
    pub fn state_bytes(&self, d: usize, dv: usize, r: usize, chunk: usize, elem: usize) -> usize {
        match self {
            Method::Exact => exact_state_bytes(elem),
            Method::Poly | Method::Hybrid => poly_state_bytes(d, dv, r, chunk, elem),
            Method::AltGrad => altgrad_state_bytes(d, dv, r, chunk, elem),
        }
    }

    /// Whether degree `g` is feasible for a head of widths `d`, `d_v`: the feature width
    /// `r = C(d+g, g)` is at most [`MAX_FEATURE_DIM`] and, for ALTGrad, the Kronecker state
    /// `r·(d_v+1)·d` at most [`altgrad::MAX_KRON_STATE`]. Always true for exact.
    pub fn fits(&self, d: usize, dv: usize, g: usize) -> bool {
        match (self, feature_dim(d, g)) {
            (Method::Exact, _) => true,
            (Method::Poly | Method::Hybrid, Some(r)) => r <= MAX_FEATURE_DIM,
            (Method::AltGrad, Some(r)) => {
                r <= MAX_FEATURE_DIM && altgrad::kron_state_len(r, dv, d).is_some_and(|k| k <= altgrad::MAX_KRON_STATE)
            }
            (_, None) => false,
        }
    }

    /// Checks options `p` for this method on `shape` before any work: [`PolyOptions::validate`]
    /// for the approximate methods and, for ALTGrad, [`altgrad::check_kron_state`]. Exact takes
    /// any options.
    ///
    /// Errors: [`Error::BadInput`] naming `degree` or `chunk`.
    pub fn check(&self, shape: &AttnShape, p: &PolyOptions) -> Result<()> {
        match self {
            Method::Exact => Ok(()),
            Method::Poly | Method::Hybrid => p.validate(),
            Method::AltGrad => {
                p.validate()?;
                altgrad::check_kron_state(shape, p)
            }
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    /// Parses [`Method::as_str`]'s names.
    ///
    /// Errors: [`Error::BadInput`] (input `"attention"`) for any other string.
    fn from_str(s: &str) -> Result<Method> {
        Method::from_name(s)
            .ok_or_else(|| Error::bad("attention", format!("`{s}` is not one of {}", Method::names(", "))))
    }
}

/// How one head's attention is computed: a [`Method`] with its options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadPlan {
    /// Exact tiled softmax attention (MATH §2).
    Exact,
    /// Polynomial attention with its exact gradient (MATH §4).
    Poly(PolyOptions),
    /// The paper's Algorithm 1 (MATH §5).
    AltGrad(PolyOptions),
    /// Hybrid attention (MATH §4.1); only as every head of a layer (its own multi-head kernel).
    Hybrid(HybridOptions),
}

/// One (sequence, head) pair of a layer as [`HeadPlan::forward_head`] and
/// [`HeadPlan::backward_head`] see it: its `q [n, d]`, `k`, `v` views, the feature map of an
/// approximate plan ([`HeadPlan::feature_map`]), the layer's shape and options, the scratch, and
/// whether the mask is causal ([`super::poly::poly_mask`], for approximate heads).
pub(crate) struct HeadCtx<'a, T> {
    pub(crate) x: (Rows<'a, T>, Rows<'a, T>, Rows<'a, T>),
    pub(crate) fm: Option<&'a FeatureMap<T>>,
    pub(crate) shape: &'a AttnShape,
    pub(crate) opts: &'a AttnOptions,
    pub(crate) ws: &'a Workspace<T>,
    pub(crate) causal: bool,
}

impl<'a, T: Scalar> HeadCtx<'a, T> {
    /// The polynomial kernel's head and key/value side for options `p` (approximate plans).
    fn poly(&self, p: &PolyOptions) -> (Head<'a, T>, poly::KvHead<'a, T>) {
        let fm = self.fm.expect("feature map of an approximate head");
        let head = Head {
            fm,
            dv: self.shape.head_dim_v,
            scale: self.opts.scale,
            center: p.center,
            chunk: p.chunk,
            ws: self.ws,
        };
        (head, poly::kv_head(self.x.1, self.x.2, self.causal, p.center, p.chunk, None, None, 0, Vec::new()))
    }
}

/// What one (sequence, head) pair's forward left for [`HeadPlan::backward_head`]: its output
/// `o [n, d_v]`, the gradient `g = dL/do [n, d_v]`, `lse [n]` (exact), `den [n]` (approximate) and
/// the non-causal approximate head's state `H'` `[r, d_v+1]` (empty otherwise).
pub(crate) struct HeadSaved<'a, T> {
    pub(crate) o: Rows<'a, T>,
    pub(crate) g: Rows<'a, T>,
    pub(crate) lse: &'a [T],
    pub(crate) den: &'a [T],
    pub(crate) kv_state: &'a [T],
}

/// What a layer whose heads all share one plan keeps for its backward.
#[derive(Clone, Debug)]
pub(crate) enum LayerSaved<T> {
    /// The exact forward's output, `lse` included.
    Exact(AttnOutput<T>),
    /// The polynomial forward's output (ALTGrad's forward is polynomial attention's).
    Poly(Box<PolyOutput<T>>),
    /// The hybrid forward's output.
    Hybrid(Box<HybridOutput<T>>),
}

impl<T> LayerSaved<T> {
    /// The attention output `o [batch, seq_len, num_heads, head_dim_v]`.
    pub(crate) fn o(&self) -> &[T] {
        match self {
            LayerSaved::Exact(f) => &f.o,
            LayerSaved::Poly(f) => &f.o,
            LayerSaved::Hybrid(f) => &f.o,
        }
    }
}

impl HeadPlan {
    /// The plan's method.
    pub fn method(&self) -> Method {
        match self {
            HeadPlan::Exact => Method::Exact,
            HeadPlan::Poly(_) => Method::Poly,
            HeadPlan::AltGrad(_) => Method::AltGrad,
            HeadPlan::Hybrid(_) => Method::Hybrid,
        }
    }

    /// `exact`, `poly`, `altgrad` or `hybrid` ([`Method::as_str`]).
    pub fn method_name(&self) -> &'static str {
        self.method().as_str()
    }

    /// The polynomial options of an approximate method (hybrid: its far keys').
    pub fn options(&self) -> Option<&PolyOptions> {
        match self {
            HeadPlan::Exact => None,
            HeadPlan::Poly(p) | HeadPlan::AltGrad(p) => Some(p),
            HeadPlan::Hybrid(h) => Some(&h.poly),
        }
    }

    /// The degree, for the approximate methods.
    pub fn degree(&self) -> Option<usize> {
        self.options().map(|p| p.degree)
    }

    /// Feature width `r = C(d+g, g)` of an approximate plan for head width `d` (MATH §3), `None`
    /// for exact or on overflow.
    pub fn rank(&self, d: usize) -> Option<usize> {
        self.degree().and_then(|g| feature_dim(d, g))
    }

    /// FLOPs of forward + backward of one head of `n` rows, widths `d`, `d_v` ([`Method::flops`]).
    pub fn flops(&self, n: usize, d: usize, dv: usize, causal: bool) -> f64 {
        let chunk = self.options().map_or(DEFAULT_CHUNK, |p| p.chunk);
        if let HeadPlan::Hybrid(h) = self {
            return hybrid_flops(n, d, dv, self.rank(d).unwrap_or(0), h.window, h.sinks, chunk);
        }
        self.method().flops(n, d, dv, self.rank(d).unwrap_or(0), causal, chunk)
    }

    /// Checks the plan's options for `shape` ([`Method::check`]).
    ///
    /// Errors: [`Error::BadInput`] naming `degree` or `chunk`.
    pub fn check(&self, shape: &AttnShape) -> Result<()> {
        self.method().check(shape, self.options().unwrap_or(&PolyOptions::new(2)))
    }

    /// Checks the plan and builds the feature map of an approximate head (`None` for exact).
    ///
    /// Errors: as [`HeadPlan::check`] and [`FeatureMap::new`].
    pub(crate) fn feature_map<T: Scalar>(&self, s: &AttnShape) -> Result<Option<FeatureMap<T>>> {
        self.check(s)?;
        match self.degree() {
            None => Ok(None),
            Some(g) => Ok(Some(FeatureMap::new(s.head_dim, g)?)),
        }
    }

    /// Forward of a whole layer whose heads all use this plan, through the method's multi-head
    /// entry point (shapes as [`super::forward_exact`]).
    ///
    /// Errors: [`Error::BadInput`] as the method's forward and [`HeadPlan::check`].
    pub(crate) fn forward_layer<T: Scalar>(&self, x: &Qkv<'_, T>, opts: &AttnOptions) -> Result<LayerSaved<T>> {
        match self {
            HeadPlan::Exact => Ok(LayerSaved::Exact(super::forward_exact(x, opts)?)),
            HeadPlan::Poly(p) => Ok(LayerSaved::Poly(Box::new(super::forward_poly(x, opts, p)?))),
            HeadPlan::AltGrad(p) => {
                altgrad::check_kron_state(x.shape(), p)?;
                let mut f = super::forward_poly(x, opts, p)?;
                f.block_states = Vec::new(); // ALTGrad's backward does not scan by blocks
                Ok(LayerSaved::Poly(Box::new(f)))
            }
            HeadPlan::Hybrid(h) => Ok(LayerSaved::Hybrid(Box::new(super::forward_hybrid(x, opts, h)?))),
        }
    }

    /// Backward of [`HeadPlan::forward_layer`]: `dout [batch, seq_len, num_heads, head_dim_v]`.
    /// Returns `None` when `fwd` came from a plan of another method.
    ///
    /// Errors: [`Error::BadInput`] as the method's backward.
    pub(crate) fn backward_layer<T: Scalar>(
        &self,
        x: &Qkv<'_, T>,
        fwd: &LayerSaved<T>,
        dout: &[T],
    ) -> Option<Result<AttnGrads<T>>> {
        match (self, fwd) {
            (HeadPlan::Exact, LayerSaved::Exact(f)) => Some(super::backward_exact(x, f, dout)),
            (HeadPlan::Poly(_), LayerSaved::Poly(f)) => Some(super::backward_poly(x, f, dout)),
            (HeadPlan::AltGrad(_), LayerSaved::Poly(f)) => Some(super::backward_altgrad(x, f, dout)),
            (HeadPlan::Hybrid(_), LayerSaved::Hybrid(f)) => Some(super::backward_hybrid(x, f, dout)),
            _ => None,
        }
    }

    /// Forward of one (sequence, head) pair `qh [n, d]`, `kh`, `vh` (in `ctx`) into `oh [n, d_v]`,
    /// `lh` (`lse`) and `dh` (denominators, approximate) `[n]`. Returns the non-causal approximate
    /// head's state `H'` `[r, d_v+1]` (empty otherwise).
    pub(crate) fn forward_head<T: Scalar>(
        &self,
        ctx: &HeadCtx<'_, T>,
        oh: &mut RowsMut<'_, T>,
        lh: &mut [T],
        dh: &mut [T],
    ) -> Vec<T> {
        let (qh, kh, vh) = ctx.x;
        let Some(p) = self.options() else {
            exact::forward_head(qh, kh, vh, ctx.opts, oh, lh, ctx.ws);
            return Vec::new();
        };
        let (head, kv) = ctx.poly(p);
        let mut state = vec![T::zero(); head.r() * head.e()];
        if ctx.causal {
            poly::forward_one(&head, qh, &kv, State::Scan(&mut state), oh, lh, dh, None);
            return Vec::new();
        }
        head.kv_state(&kv, &mut state);
        poly::forward_one(&head, qh, &kv, State::Keys(&state), oh, lh, dh, None);
        state
    }

    /// Backward of [`HeadPlan::forward_head`] for one (sequence, head) pair: the method's own
    /// gradient (exact; the approximate model's for poly; Algorithm 1 for altgrad) added into
    /// `dq [n, d]`, `dk`, `dvh`, from what the forward left ([`HeadSaved`]). Returns `false` when
    /// `kv_state` does not match the plan.
    pub(crate) fn backward_head<T: Scalar>(
        &self,
        ctx: &HeadCtx<'_, T>,
        saved: HeadSaved<'_, T>,
        dq: &mut RowsMut<'_, T>,
        dk: &mut RowsMut<'_, T>,
        dvh: &mut RowsMut<'_, T>,
    ) -> bool {
        let (qh, kh, vh) = ctx.x;
        let HeadSaved { o: oh, g: gh, lse: lh, den: dh, kv_state } = saved;
        let Some(p) = self.options() else {
            exact::backward_head(qh, kh, vh, oh, lh, gh, ctx.opts, dq, dk, dvh, ctx.ws);
            return true;
        };
        let (head, kv) = ctx.poly(p);
        if let HeadPlan::AltGrad(_) = self {
            altgrad::backward_one(&head, qh, &kv, ctx.causal, oh, dh, gh, dq, dk, dvh);
            return true;
        }
        let len = head.r() * head.e();
        let (mut scan, mut dscan, mut dks) =
            (vec![T::zero(); len], vec![T::zero(); len], vec![0.0f64; ctx.shape.head_dim]);
        let state = if ctx.causal {
            State::Scan(&mut scan)
        } else if kv_state.len() == len {
            State::Keys(kv_state)
        } else {
            return false;
        };
        poly::backward_one(&head, qh, &kv, state, oh, dh, gh, None, &mut dscan, dq, dk, dvh, &mut dks);
        true
    }
}

/// What decided a head's method in [`Policy::choose`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decider {
    /// The a-priori bound `ε_A(R, g) ≤ tol` (MATH §3) admitted the degree.
    Bound,
    /// The measured estimate ([`super::estimate`]) admitted the degree where the bound did not.
    Estimate,
    /// Neither admitted any degree that is cheaper than exact: exact.
    Error,
    /// No degree is cheaper than exact at this `n` within `max_rank`: exact, without error tests.
    Cost,
}

impl Decider {
    /// Lower-case name, as in JSON reports: `bound`, `estimate`, `error`, `cost`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Decider::Bound => "bound",
            Decider::Estimate => "estimate",
            Decider::Error => "error",
            Decider::Cost => "cost",
        }
    }
}

/// The method chosen for one head and why (MATH §3 "Bound and degree", "Measured estimate", §7).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Policy {
    /// [`Method::Poly`] or [`Method::Exact`].
    pub method: Method,
    /// Degree `g` (Poly only).
    pub degree: Option<usize>,
    /// Feature width `r = C(d+g, g)` (Poly only).
    pub rank: Option<usize>,
    /// The a-priori score bound `R` the choice used: the smaller of the shifted and unshifted
    /// bounds ([`ScoreBounds::best`]).
    pub bound: f64,
    /// Whether `bound` (and a Poly head) uses the row shift (MATH §3).
    pub center: bool,
    /// [`output_bound`]`(R, g)` for Poly (relative to `‖V‖_∞`); 0 for Exact.
    pub predicted_rel_err: f64,
    /// The measured error of the degree chosen (Poly), or of the cheapest degree considered
    /// (Exact by error or cost); `None` when nothing was measured.
    pub estimate: Option<ErrorEstimate>,
    /// What decided.
    pub decided_by: Decider,
    /// One sentence saying why this method was chosen; every number in it holds.
    pub reason: String,
}

impl Policy {
    /// Chooses the method of one head of length `n`, widths `d`, `d_v`, with score bounds
    /// `bounds`, tolerance `tol` and largest acceptable feature width `max_rank`; `measure(gs,
    /// center)` returns the measured error of each degree in `gs` ([`super::estimate`]; called at
    /// most once).
    ///
    /// The candidates are the even degrees `g ≤ MAX_AUTO_DEGREE` whose width `r(d, g) ≤ max_rank`
    /// and whose [`poly_flops`] (chunk [`DEFAULT_CHUNK`]) is below [`exact_flops`]. Poly takes the
    /// smallest candidate admitted either by the bound (`ε_A(R, g) ≤ tol`, `R` the smaller of the
    /// shifted and unshifted bounds, which also fixes the row shift) or by the estimate (its 95%
    /// upper confidence bound on the relative Frobenius error of the head's output `≤ tol`; the
    /// query-gradient estimate is carried along for the report); otherwise Exact. Without candidates the cheapest degree is still measured, so the
    /// report shows how far the method would be.
    #[allow(clippy::too_many_arguments)]
    pub fn choose(
        n: usize,
        d: usize,
        dv: usize,
        causal: bool,
        bounds: ScoreBounds,
        tol: f64,
        max_rank: usize,
        measure: &mut dyn FnMut(&[usize], bool) -> Vec<ErrorEstimate>,
    ) -> Policy {
        let (bound, center) = bounds.best();
        let ef = exact_flops(n, d, dv, causal);
        let pf = |r: usize| poly_flops(n, d, dv, r, causal, DEFAULT_CHUNK);
        let rank = |g: usize| feature_dim(d, g).filter(|&r| r <= max_rank.min(MAX_FEATURE_DIM));
        let cands: Vec<usize> =
            (2..=MAX_AUTO_DEGREE).step_by(2).filter(|&g| rank(g).is_some_and(|r| pf(r) < ef)).collect();
        let exact = |decided_by, estimate, reason| Policy {
            method: Method::Exact,
            degree: None,
            rank: None,
            bound,
            center,
            predicted_rel_err: 0.0,
            estimate,
            decided_by,
            reason,
        };
        let shift = if center { "shifted" } else { "unshifted" };
        if cands.is_empty() {
            let est = measure(&[2], center).into_iter().next();
            let seen = est.map_or(String::new(), |e| {
                format!("; measured at g = 2: output error ≤ {:.1e}, dq error ≤ {:.1e} (95%)", e.upper, e.upper_dq)
            });
            let why = match rank(2) {
                None => format!(
                    "degree 2 needs feature width r = C({d}+2, 2) = {}, above max_rank = {max_rank}",
                    feature_dim(d, 2).map_or("overflow".to_string(), |r| r.to_string())
                ),
                Some(r) => {
                    format!("at n = {n} even degree 2 (r = {r}) would cost {:.3e} FLOP vs {ef:.3e} for exact", pf(r))
                }
            };
            return exact(Decider::Cost, est, format!("{why}{seen}"));
        }
        let by_bound = cands.iter().copied().find(|&g| eps_a(bound, g) <= tol);
        let ests = measure(&cands, center);
        let by_est = cands.iter().zip(&ests).find(|(_, e)| e.upper <= tol).map(|(&g, e)| (g, *e));
        let est_of = |g: usize| cands.iter().position(|&c| c == g).and_then(|i| ests.get(i).copied());
        let (g, decided_by) = match (by_bound, by_est) {
            (Some(b), Some((e, _))) if e < b => (e, Decider::Estimate),
            (Some(b), _) => (b, Decider::Bound),
            (None, Some((e, _))) => (e, Decider::Estimate),
            (None, None) => {
                let gmax = *cands.last().expect("non-empty");
                let worst = est_of(gmax);
                return exact(
                    Decider::Error,
                    worst,
                    format!(
                        "no degree cheaper than exact meets {tol:e}: at g = {gmax}, ε_A(R = {bound:.3} {shift}) = {:.1e} \
                         and the measured output error is ≤ {} (95%)",
                        eps_a(bound, gmax),
                        worst.map_or("unmeasured".to_string(), |e| format!("{:.1e}", e.upper))
                    ),
                );
            }
        };
        let r = rank(g).expect("candidate");
        let est = est_of(g);
        let measured =
            est.map_or("unmeasured".to_string(), |e| format!("{:.1e} (dq error ≤ {:.1e})", e.upper, e.upper_dq));
        let reason = match decided_by {
            Decider::Bound => format!(
                "R = {bound:.3} ({shift}): degree {g} gives ε_A = {:.2e} ≤ {tol:e} (measured output error ≤ {measured}), r = {r}, \
                 {:.1}× fewer FLOPs than exact",
                eps_a(bound, g),
                ef / pf(r)
            ),
            _ => format!(
                "measured output error at degree {g} ≤ {measured} (95%), within {tol:e}, where the bound gives ε_A(R = {bound:.3} \
                 {shift}) = {:.1e}; r = {r}, {:.1}× fewer FLOPs than exact",
                eps_a(bound, g),
                ef / pf(r)
            ),
        };
        Policy {
            method: Method::Poly,
            degree: Some(g),
            rank: Some(r),
            bound,
            center,
            predicted_rel_err: output_bound(bound, g),
            estimate: est,
            decided_by,
            reason,
        }
    }
}

/// Limits on what a forced polynomial or ALTGrad run may cost before it starts (never silently
/// slow): predicted attention FLOPs at most `max_slowdown` × exact's ([`Method::flops`], MATH §7),
/// predicted working memory of one layer's attention at most `max_memory` bytes
/// ([`Method::state_bytes`]). [`Budget::UNLIMITED`] is `--force`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// Largest ratio of predicted FLOPs to exact attention's.
    pub max_slowdown: f64,
    /// Largest predicted working memory, in bytes.
    pub max_memory: f64,
}

impl Budget {
    /// No limit (`--force`).
    pub const UNLIMITED: Budget = Budget { max_slowdown: f64::INFINITY, max_memory: f64::INFINITY };
    /// The CLI's defaults: 4× exact's FLOPs, 8 GiB.
    pub const DEFAULT: Budget = Budget { max_slowdown: 4.0, max_memory: 8.0 * (1u64 << 30) as f64 };

    /// Checks the plans of one layer's query heads against the budget: `n` rows, widths `d`, `d_v`,
    /// `elem` bytes per number (4 for f32, 8 for f64), `threads` heads running at once.
    ///
    /// Errors: [`Error::BadInput`] naming `attention`, with both predicted costs and what to do.
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        &self,
        plans: &[HeadPlan],
        n: usize,
        d: usize,
        dv: usize,
        causal: bool,
        elem: usize,
        threads: usize,
    ) -> Result<()> {
        let Some(worst) =
            plans.iter().filter(|p| p.options().is_some()).max_by_key(|p| p.rank(d).unwrap_or(usize::MAX))
        else {
            return Ok(());
        };
        let flops: f64 = plans.iter().map(|p| p.flops(n, d, dv, causal)).sum();
        let ef = plans.len() as f64 * exact_flops(n, d, dv, causal);
        let (g, r) = (worst.degree().unwrap_or(0), worst.rank(d).unwrap_or(usize::MAX));
        let p = worst.options().expect("approximate");
        let at_once = threads.clamp(1, plans.len().max(1));
        let mem = at_once as f64 * worst.method().state_bytes(d, dv, r, p.chunk, elem) as f64;
        let what = format!("{} with degree {g} (feature width r = {r}) at n = {n}", worst.method_name());
        let fix = "use a lower degree, auto or exact attention, or force (CLI --force, Python force=True) to run it \
                   anyway";
        if flops > self.max_slowdown * ef {
            return Err(Error::bad(
                "attention",
                format!(
                    "{what} would cost {flops:.2e} FLOP per layer against {ef:.2e} for exact attention ({:.1}× exact, \
                     above the limit max_slowdown = {}); {fix}",
                    flops / ef,
                    self.max_slowdown
                ),
            ));
        }
        if mem > self.max_memory {
            return Err(Error::bad(
                "attention",
                format!(
                    "{what} would need {:.2} GiB of working memory ({at_once} heads at once) against {:.1} MiB for \
                     exact attention, above the limit max_memory = {:.1} GiB; {fix}",
                    mem / (1u64 << 30) as f64,
                    at_once as f64 * exact_state_bytes(elem) as f64 / (1u64 << 20) as f64,
                    self.max_memory / (1u64 << 30) as f64
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for m in Method::ALL {
            assert_eq!(m.as_str().parse::<Method>().unwrap(), m);
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        }
        assert!("auto".parse::<Method>().unwrap_err().to_string().contains("exact, poly, altgrad"));
    }

    fn sb(r: f64) -> ScoreBounds {
        ScoreBounds { shifted: r, unshifted: 2.0 * r }
    }

    fn est(upper: f64) -> impl FnMut(&[usize], bool) -> Vec<ErrorEstimate> {
        move |gs: &[usize], _| {
            gs.iter()
                .map(|&g| ErrorEstimate {
                    degree: g,
                    rel_err_o: upper,
                    rel_err_dq: upper,
                    upper,
                    upper_dq: upper,
                    rows: 1,
                })
                .collect()
        }
    }

    #[test]
    fn policy_prefers_exact_when_short_or_unbounded() {
        let p = Policy::choose(128, 64, 64, true, sb(0.5), 1e-2, 1 << 20, &mut est(0.0));
        assert_eq!((p.method, p.decided_by), (Method::Exact, Decider::Cost), "{}", p.reason);
        let p = Policy::choose(32768, 16, 16, true, sb(0.5), 1e-1, 1 << 20, &mut est(1.0));
        assert_eq!((p.method, p.decided_by), (Method::Poly, Decider::Bound), "{}", p.reason);
        assert_eq!((p.degree, p.rank, p.center), (Some(2), Some(153), true));
        let p = Policy::choose(32768, 16, 16, true, sb(8.0), 1e-3, 1 << 20, &mut est(1.0));
        assert_eq!((p.method, p.decided_by), (Method::Exact, Decider::Error));
        let p = Policy::choose(32768, 16, 16, true, sb(0.5), 1e-1, 100, &mut est(0.0));
        assert_eq!(p.method, Method::Exact);
        assert!(p.reason.contains("max_rank"));
    }

    #[test]
    fn estimate_admits_where_bound_does_not() {
        // R = 8: ε_A ≥ 1 at every degree; a measured error of 1e-4 admits the cheapest degree.
        let p = Policy::choose(32768, 16, 16, true, sb(8.0), 1e-3, 1 << 20, &mut est(1e-4));
        assert_eq!((p.method, p.degree, p.decided_by), (Method::Poly, Some(2), Decider::Estimate), "{}", p.reason);
        assert!(p.reason.contains("measured output error at degree 2"), "{}", p.reason);
        // the unshifted bound is used when it is the smaller one
        let b = ScoreBounds { shifted: 3.0, unshifted: 0.5 };
        let p = Policy::choose(32768, 16, 16, true, b, 1e-1, 1 << 20, &mut est(1.0));
        assert_eq!((p.method, p.center, p.bound), (Method::Poly, false, 0.5));
    }

    #[test]
    fn budget_refuses_with_both_costs() {
        let plan = Method::Poly.plan(PolyOptions::new(6));
        let e = Budget::DEFAULT.check(&[plan; 4], 64, 32, 32, true, 4, 2).unwrap_err().to_string();
        assert!(e.contains("FLOP per layer against") && e.contains("--force"), "{e}");
        assert!(Budget::UNLIMITED.check(&[plan; 4], 64, 32, 32, true, 4, 2).is_ok());
        let cheap = Method::Poly.plan(PolyOptions::new(2));
        assert!(Budget::DEFAULT.check(&[cheap, HeadPlan::Exact], 65536, 16, 16, true, 4, 2).is_ok());
        let mem = Budget { max_slowdown: f64::INFINITY, max_memory: 1e6 };
        assert!(mem.check(&[plan], 64, 32, 32, true, 4, 2).unwrap_err().to_string().contains("GiB of working memory"));
    }
}
