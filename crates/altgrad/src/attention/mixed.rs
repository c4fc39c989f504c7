//! One attention layer whose heads use different methods (MATH §6: "only the attention core is
//! approximated, per head, with its own degree"; LSSSZ Lemma K.2: heads are independent).
//!
//! When every head uses the same method the whole layer goes through that method's multi-head
//! entry point (sharing GQA key/value work); otherwise each query head runs alone against its
//! key/value head and the key/value gradients are summed over each GQA group.

use super::poly::{PolyOptions, PolyOutput};
use super::{gather_head, scatter_heads, AttnGrads, AttnOptions, AttnOutput, AttnShape};
use crate::linalg::Scalar;
use crate::{Error, Result};
use rayon::prelude::*;

/// How one head's attention is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadPlan {
    /// Exact tiled softmax attention (MATH §2).
    Exact,
    /// Polynomial attention with its exact gradient (MATH §4).
    Poly(PolyOptions),
    /// The paper's Algorithm 1 (MATH §5).
    AltGrad(PolyOptions),
}

impl HeadPlan {
    /// `exact`, `poly` or `altgrad`.
    pub fn method_name(&self) -> &'static str {
        match self {
            HeadPlan::Exact => "exact",
            HeadPlan::Poly(_) => "poly",
            HeadPlan::AltGrad(_) => "altgrad",
        }
    }
    /// The degree, for the approximate methods.
    pub fn degree(&self) -> Option<usize> {
        match self {
            HeadPlan::Exact => None,
            HeadPlan::Poly(p) | HeadPlan::AltGrad(p) => Some(p.degree),
        }
    }
}

/// What a method's forward keeps for its backward.
#[derive(Clone, Debug)]
enum Saved<T> {
    Exact(AttnOutput<T>),
    Poly(PolyOutput<T>),
    AltGrad(AttnOutput<T>),
}

/// Forward output of a mixed layer: `o [seq_len, num_heads, head_dim_v]` and what the backward
/// needs (per head, or once for the whole layer when all heads share a method).
#[derive(Clone, Debug)]
pub struct MixedOutput<T> {
    /// Attention output.
    pub o: Vec<T>,
    saved: Vec<Saved<T>>,
    uniform: bool,
}

fn one_head_shape(s: &AttnShape) -> AttnShape {
    AttnShape { seq_len: s.seq_len, num_heads: 1, num_kv_heads: 1, head_dim: s.head_dim, head_dim_v: s.head_dim_v }
}

fn run_forward<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    s: &AttnShape,
    opts: &AttnOptions,
    plan: &HeadPlan,
) -> Result<(Vec<T>, Saved<T>)> {
    Ok(match plan {
        HeadPlan::Exact => {
            let f = super::forward_exact(q, k, v, s, opts)?;
            (f.o.clone(), Saved::Exact(f))
        }
        HeadPlan::Poly(p) => {
            let f = super::forward_poly(q, k, v, s, opts, p)?;
            (f.o.clone(), Saved::Poly(f))
        }
        HeadPlan::AltGrad(p) => {
            let f = super::forward_altgrad(q, k, v, s, opts, p)?;
            (f.o.clone(), Saved::AltGrad(f))
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn run_backward<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    saved: &Saved<T>,
    dout: &[T],
    s: &AttnShape,
    opts: &AttnOptions,
    plan: &HeadPlan,
) -> Result<AttnGrads<T>> {
    match (plan, saved) {
        (HeadPlan::Exact, Saved::Exact(f)) => super::backward_exact(q, k, v, f, dout, s, opts),
        (HeadPlan::Poly(p), Saved::Poly(f)) => super::backward_poly(q, k, v, f, dout, s, opts, p),
        (HeadPlan::AltGrad(p), Saved::AltGrad(f)) => super::backward_altgrad(q, k, v, f, dout, s, opts, p),
        _ => Err(Error::Internal("attention plan does not match the saved forward".into())),
    }
}

/// Forward of one layer with `plans[h]` for query head `h` (`plans.len() == num_heads`).
/// Shapes as [`super::forward_exact`].
///
/// Errors: [`Error::BadInput`] on shape mismatches or invalid plans (odd degree, …).
pub fn forward_mixed<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
    plans: &[HeadPlan],
) -> Result<MixedOutput<T>> {
    let s = *shape;
    s.validate()?;
    if plans.len() != s.num_heads {
        return Err(Error::bad("attention plan", format!("{} plans for {} heads", plans.len(), s.num_heads)));
    }
    if plans.iter().all(|p| *p == plans[0]) {
        let (o, saved) = run_forward(q, k, v, &s, opts, &plans[0])?;
        return Ok(MixedOutput { o, saved: vec![saved], uniform: true });
    }
    s.check_len("q", q, s.num_heads, s.head_dim)?;
    s.check_len("k", k, s.num_kv_heads, s.head_dim)?;
    s.check_len("v", v, s.num_kv_heads, s.head_dim_v)?;
    let n = s.seq_len;
    let hs = one_head_shape(&s);
    let per: Vec<(Vec<T>, Saved<T>)> = (0..s.num_heads)
        .into_par_iter()
        .map(|h| {
            let kv = h / s.group();
            let qh = gather_head(q, n, s.num_heads, s.head_dim, h);
            let kh = gather_head(k, n, s.num_kv_heads, s.head_dim, kv);
            let vh = gather_head(v, n, s.num_kv_heads, s.head_dim_v, kv);
            run_forward(&qh, &kh, &vh, &hs, opts, &plans[h])
        })
        .collect::<Result<_>>()?;
    let (os, saved): (Vec<_>, Vec<_>) = per.into_iter().unzip();
    Ok(MixedOutput { o: scatter_heads(&os, n, s.head_dim_v), saved, uniform: false })
}

/// Backward of [`forward_mixed`] with the same inputs and plans; `dout [seq_len, num_heads,
/// head_dim_v]`. Each head's gradient is its method's gradient (exact for exact heads, the
/// approximate model's for poly heads, the paper's formula for altgrad heads).
///
/// Errors: [`Error::BadInput`] on shape mismatches; [`Error::Internal`] if `fwd` came from
/// different plans.
#[allow(clippy::too_many_arguments)]
pub fn backward_mixed<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    fwd: &MixedOutput<T>,
    dout: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
    plans: &[HeadPlan],
) -> Result<AttnGrads<T>> {
    let s = *shape;
    if fwd.uniform {
        return run_backward(q, k, v, &fwd.saved[0], dout, &s, opts, &plans[0]);
    }
    if fwd.saved.len() != s.num_heads || plans.len() != s.num_heads {
        return Err(Error::Internal("mixed attention: saved state does not match the plans".into()));
    }
    s.check_len("do", dout, s.num_heads, s.head_dim_v)?;
    let n = s.seq_len;
    let hs = one_head_shape(&s);
    let per: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..s.num_heads)
        .into_par_iter()
        .map(|h| {
            let kv = h / s.group();
            let qh = gather_head(q, n, s.num_heads, s.head_dim, h);
            let kh = gather_head(k, n, s.num_kv_heads, s.head_dim, kv);
            let vh = gather_head(v, n, s.num_kv_heads, s.head_dim_v, kv);
            let gh = gather_head(dout, n, s.num_heads, s.head_dim_v, h);
            let g = run_backward(&qh, &kh, &vh, &fwd.saved[h], &gh, &hs, opts, &plans[h])?;
            Ok((g.dq, g.dk, g.dv))
        })
        .collect::<Result<_>>()?;
    Ok(super::combine_grads(per, &s))
}
