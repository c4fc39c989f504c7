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

use super::bound::{choose_degree, eps_a, output_bound, MAX_AUTO_DEGREE};
use super::cost::{altgrad_flops, altgrad_state_bytes, exact_flops, exact_state_bytes, poly_flops, poly_state_bytes};
use super::features::{feature_dim, FeatureMap, MAX_FEATURE_DIM};
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
}

impl Method {
    /// Every method, in report order (exact first): the registry parsing and listings use.
    pub const ALL: [Method; 3] = [Method::Exact, Method::Poly, Method::AltGrad];

    /// Lower-case name, as on the CLI, in JSON reports and in Python: `exact`, `poly`, `altgrad`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Exact => "exact",
            Method::Poly => "poly",
            Method::AltGrad => "altgrad",
        }
    }

    /// One line saying what the method computes, without a final period (CLI help).
    pub fn summary(&self) -> &'static str {
        match self {
            Method::Exact => "Exact softmax attention (tiled, O(n²) time, O(n) memory)",
            Method::Poly => "Polynomial attention: degree-g Taylor softmax with its exact gradient, O(n·r·d)",
            Method::AltGrad => "The paper's Algorithm 1 (ALTGrad): the softmax gradient formula with the low-rank f̃",
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

    /// This method with options `p` (ignored for exact): what one head runs.
    pub fn plan(self, p: PolyOptions) -> HeadPlan {
        match self {
            Method::Exact => HeadPlan::Exact,
            Method::Poly => HeadPlan::Poly(p),
            Method::AltGrad => HeadPlan::AltGrad(p),
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
        }
    }

    /// Working memory of one head in bytes beyond inputs and outputs ([`exact_state_bytes`],
    /// [`poly_state_bytes`], [`altgrad_state_bytes`]); `elem` = 4 for f32, 8 for f64.
    pub fn state_bytes(&self, d: usize, dv: usize, r: usize, chunk: usize, elem: usize) -> usize {
        match self {
            Method::Exact => exact_state_bytes(elem),
            Method::Poly => poly_state_bytes(d, dv, r, chunk, elem),
            Method::AltGrad => altgrad_state_bytes(d, dv, r, chunk, elem),
        }
    }

    /// Whether degree `g` is feasible for a head of widths `d`, `d_v`: the feature width
    /// `r = C(d+g, g)` is at most [`MAX_FEATURE_DIM`] and, for ALTGrad, the Kronecker state
    /// `r·(d_v+1)·d` at most [`altgrad::MAX_KRON_STATE`]. Always true for exact.
    pub fn fits(&self, d: usize, dv: usize, g: usize) -> bool {
        match (self, feature_dim(d, g)) {
            (Method::Exact, _) => true,
            (Method::Poly, Some(r)) => r <= MAX_FEATURE_DIM,
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
            Method::Poly => p.validate(),
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
        (head, poly::kv_head(self.x.1, self.x.2, self.causal, p.center, p.chunk, None, None, 0))
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
}

impl<T> LayerSaved<T> {
    /// The attention output `o [batch, seq_len, num_heads, head_dim_v]`.
    pub(crate) fn o(&self) -> &[T] {
        match self {
            LayerSaved::Exact(f) => &f.o,
            LayerSaved::Poly(f) => &f.o,
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
        }
    }

    /// `exact`, `poly` or `altgrad` ([`Method::as_str`]).
    pub fn method_name(&self) -> &'static str {
        self.method().as_str()
    }

    /// The options of an approximate method.
    pub fn options(&self) -> Option<&PolyOptions> {
        match self {
            HeadPlan::Exact => None,
            HeadPlan::Poly(p) | HeadPlan::AltGrad(p) => Some(p),
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
                Ok(LayerSaved::Poly(Box::new(super::forward_poly(x, opts, p)?)))
            }
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
            poly::forward_one(&head, qh, &kv, State::Scan(&mut state), oh, lh, dh);
            return Vec::new();
        }
        head.kv_state(&kv, &mut state);
        poly::forward_one(&head, qh, &kv, State::Keys(&state), oh, lh, dh);
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
        poly::backward_one(&head, qh, &kv, state, oh, dh, gh, &mut dscan, dq, dk, dvh, &mut dks);
        true
    }
}

/// The method chosen for one head and why (MATH §3 "Bound and degree", §7).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Policy {
    /// [`Method::Poly`] or [`Method::Exact`].
    pub method: Method,
    /// Degree `g` (Poly only).
    pub degree: Option<usize>,
    /// Feature width `r = C(d+g, g)` (Poly only).
    pub rank: Option<usize>,
    /// The score bound `R` the choice used ([`score_bound`]).
    pub bound: f64,
    /// [`output_bound`]`(R, g)` for Poly (relative to `‖V‖_∞`); 0 for Exact.
    pub predicted_rel_err: f64,
    /// One sentence saying why this method was chosen.
    pub reason: String,
}

impl Policy {
    /// Chooses the method of one head of length `n`, widths `d`, `d_v`, with score bound `bound`
    /// (`R`), tolerance `tol` on `ε_A`, and largest acceptable feature width `max_rank`.
    ///
    /// Poly is chosen only when an even degree `g ≤ MAX_AUTO_DEGREE` reaches `ε_A(R, g) ≤ tol`
    /// ([`choose_degree`]), its width `r(d, g) ≤ max_rank`, and [`poly_flops`] (chunk
    /// [`DEFAULT_CHUNK`]) is below [`exact_flops`]; otherwise Exact, with the failed condition in
    /// `reason`.
    pub fn choose(n: usize, d: usize, dv: usize, causal: bool, bound: f64, tol: f64, max_rank: usize) -> Policy {
        let exact = |reason: String| Policy {
            method: Method::Exact,
            degree: None,
            rank: None,
            bound,
            predicted_rel_err: 0.0,
            reason,
        };
        let Some(g) = choose_degree(bound, tol, MAX_AUTO_DEGREE) else {
            return exact(format!(
                "no even degree ≤ {MAX_AUTO_DEGREE} reaches ε_A ≤ {tol:e} at score bound R = {bound:.3} \
                 (ε_A(R, {MAX_AUTO_DEGREE}) = {:.2e})",
                eps_a(bound, MAX_AUTO_DEGREE)
            ));
        };
        let Some(r) = feature_dim(d, g).filter(|&r| r <= max_rank) else {
            return exact(format!(
                "degree {g} needs feature width r = C({d}+{g}, {g}) = {}, above max_rank = {max_rank}",
                feature_dim(d, g).map_or("overflow".to_string(), |r| r.to_string())
            ));
        };
        let (pf, ef) = (poly_flops(n, d, dv, r, causal, DEFAULT_CHUNK), exact_flops(n, d, dv, causal));
        if pf >= ef {
            return exact(format!(
                "polynomial attention (g = {g}, r = {r}) would cost {:.3e} FLOP vs {:.3e} for exact at n = {n}",
                pf, ef
            ));
        }
        Policy {
            method: Method::Poly,
            degree: Some(g),
            rank: Some(r),
            bound,
            predicted_rel_err: output_bound(bound, g),
            reason: format!(
                "R = {bound:.3}: degree {g} gives ε_A = {:.2e} ≤ {tol:e}, r = {r}, {:.1}× fewer FLOPs than exact",
                eps_a(bound, g),
                ef / pf
            ),
        }
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

    #[test]
    fn policy_prefers_exact_when_short_or_unbounded() {
        let p = Policy::choose(128, 64, 64, true, 0.5, 1e-2, 1 << 20);
        assert_eq!(p.method, Method::Exact, "{}", p.reason);
        let p = Policy::choose(32768, 16, 16, true, 0.5, 1e-1, 1 << 20);
        assert_eq!(p.method, Method::Poly, "{}", p.reason);
        assert_eq!((p.degree, p.rank), (Some(2), Some(153)));
        let p = Policy::choose(32768, 16, 16, true, 8.0, 1e-3, 1 << 20);
        assert_eq!(p.method, Method::Exact);
        let p = Policy::choose(32768, 16, 16, true, 0.5, 1e-1, 100);
        assert_eq!(p.method, Method::Exact);
        assert!(p.reason.contains("max_rank"));
    }
}
