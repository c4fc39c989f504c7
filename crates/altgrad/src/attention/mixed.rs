//! One attention layer whose heads use different methods (MATH §6: "only the attention core is
//! approximated, per head, with its own degree"; LSSSZ Lemma K.2: heads are independent).
//!
//! When every head uses the same method the whole layer goes through that method's multi-head
//! entry point (sharing GQA key/value work); otherwise each query head runs alone against its
//! key/value head and the key/value gradients are summed over each GQA group.

use super::features::FeatureMap;
use super::poly::{self, Head, PolyOptions, PolyOutput, State};
use super::workspace::Workspace;
use super::{altgrad, exact, query_head_grads, AttnGrads, AttnOptions, AttnOutput, AttnShape, Qkv};
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

/// What a layer's forward keeps for its backward.
#[derive(Clone, Debug)]
enum Saved<T> {
    /// Every head exact.
    Exact(AttnOutput<T>),
    /// Every head poly, one [`PolyOptions`].
    Poly(PolyOutput<T>),
    /// Every head ALTGrad, one [`PolyOptions`] (its forward is polynomial attention's).
    AltGrad(PolyOutput<T>),
    /// Heads of different plans: `lse`, `den` `[num_heads, seq_len]` (`den` of the approximate
    /// heads) and, per query head, `H'` of a non-causal approximate head (empty otherwise).
    PerHead { lse: Vec<T>, den: Vec<T>, kv_state: Vec<Vec<T>> },
}

/// Forward output of a mixed layer: `o [seq_len, num_heads, head_dim_v]` and what the backward
/// needs (once for the whole layer when all heads share a plan, else per head).
#[derive(Clone, Debug)]
pub struct MixedOutput<T> {
    /// Attention output.
    pub o: Vec<T>,
    saved: Saved<T>,
}

/// The polynomial kernel's head of an approximate head's plan `p`.
fn poly_head<'a, T: Scalar>(
    fm: &'a FeatureMap<T>,
    s: &AttnShape,
    opts: &AttnOptions,
    p: &PolyOptions,
    ws: &'a Workspace<T>,
) -> Head<'a, T> {
    Head { fm, dv: s.head_dim_v, scale: opts.scale, center: p.center, chunk: p.chunk, ws }
}

/// Checks the options for every plan of a layer (exact heads take any mask, approximate heads the
/// full or causal one, [`poly::poly_mask`]); returns whether the mask is causal.
///
/// Errors: [`Error::BadInput`] as [`AttnOptions::check`] and [`poly::poly_mask`].
fn check_mask(s: &AttnShape, opts: &AttnOptions, plans: &[HeadPlan]) -> Result<bool> {
    opts.check(s)?;
    if plans.iter().any(|p| *p != HeadPlan::Exact) {
        poly::poly_mask(opts, s, 0)?;
    }
    Ok(opts.is_causal())
}

/// Checks an approximate head's plan and builds its feature map.
fn feature_map<T: Scalar>(s: &AttnShape, plan: &HeadPlan) -> Result<Option<FeatureMap<T>>> {
    match plan {
        HeadPlan::Exact => Ok(None),
        HeadPlan::Poly(p) | HeadPlan::AltGrad(p) => {
            p.validate()?;
            if matches!(plan, HeadPlan::AltGrad(_)) {
                altgrad::check_kron_state(s, p)?;
            }
            Ok(Some(FeatureMap::new(s.head_dim, p.degree)?))
        }
    }
}

/// Forward of one layer with `plans[h]` for query head `h` of every sequence of the batch
/// (`plans.len() == num_heads`). Shapes as [`super::forward_exact`].
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
    let x = Qkv::new(q, k, v, &s)?;
    if plans.iter().all(|p| *p == plans[0]) {
        let (o, saved) = match &plans[0] {
            HeadPlan::Exact => {
                let f = super::forward_exact(&x, opts)?;
                (f.o.clone(), Saved::Exact(f))
            }
            HeadPlan::Poly(p) => {
                let f = super::forward_poly(&x, opts, p)?;
                (f.o.clone(), Saved::Poly(f))
            }
            HeadPlan::AltGrad(p) => {
                altgrad::check_kron_state(&s, p)?;
                let f = super::forward_poly(&x, opts, p)?;
                (f.o.clone(), Saved::AltGrad(f))
            }
        };
        return Ok(MixedOutput { o, saved });
    }
    let causal = check_mask(&s, opts, plans)?;
    let (n, dv, hq) = (s.seq_len, s.head_dim_v, s.num_heads);
    let fms: Vec<Option<FeatureMap<T>>> = plans.iter().map(|p| feature_map(&s, p)).collect::<Result<_>>()?;
    let ws = Workspace::new();
    let mut o = vec![T::zero(); n * s.heads() * dv];
    let (mut lse, mut den) = (vec![T::zero(); s.heads() * n], vec![T::zero(); s.heads() * n]);
    // head t of the batch is head t % num_heads of its sequence: plans[t % num_heads]
    let kv_state: Vec<Vec<T>> = s
        .query_views(&mut o, dv)
        .into_par_iter()
        .zip(lse.par_chunks_mut(n).zip(den.par_chunks_mut(n)))
        .enumerate()
        .map(|(h, (mut oh, (lh, dh)))| {
            let (qh, kh, vh) = x.head(h);
            let (HeadPlan::Poly(p) | HeadPlan::AltGrad(p)) = &plans[h % hq] else {
                exact::forward_head(qh, kh, vh, opts, &mut oh, lh, &ws);
                return Vec::new();
            };
            let head = poly_head(fms[h % hq].as_ref().expect("feature map of an approximate head"), &s, opts, p, &ws);
            let kv = poly::kv_head(kh, vh, causal, p.center, p.chunk, None, None, 0);
            let mut state = vec![T::zero(); head.r() * head.e()];
            if causal {
                poly::forward_one(&head, qh, &kv, State::Scan(&mut state), &mut oh, lh, dh);
                return Vec::new();
            }
            head.kv_state(&kv, &mut state);
            poly::forward_one(&head, qh, &kv, State::Keys(&state), &mut oh, lh, dh);
            state
        })
        .collect();
    Ok(MixedOutput { o, saved: Saved::PerHead { lse, den, kv_state } })
}

/// Backward of [`forward_mixed`] with the same inputs and plans; `dout [batch, seq_len, num_heads,
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
    let x = Qkv::new(q, k, v, &s)?;
    let mismatch = || Error::Internal("mixed attention: saved state does not match the plans".into());
    let (lse, den, kv_state) = match (&fwd.saved, &plans[0]) {
        (Saved::Exact(f), HeadPlan::Exact) => return super::backward_exact(&x, f, dout),
        (Saved::Poly(f), HeadPlan::Poly(_)) => return super::backward_poly(&x, f, dout),
        (Saved::AltGrad(f), HeadPlan::AltGrad(_)) => return super::backward_altgrad(&x, f, dout),
        (Saved::PerHead { lse, den, kv_state }, _) => (lse, den, kv_state),
        _ => return Err(mismatch()),
    };
    if kv_state.len() != s.heads() || plans.len() != s.num_heads {
        return Err(mismatch());
    }
    let causal = check_mask(&s, opts, plans)?;
    s.check_len("do", dout, s.num_heads, s.head_dim_v)?;
    let (n, hq) = (s.seq_len, s.num_heads);
    let fms: Vec<Option<FeatureMap<T>>> = plans.iter().map(|p| feature_map(&s, p)).collect::<Result<_>>()?;
    let ws = Workspace::new();
    let mut grads = AttnGrads::zeros(&s);
    query_head_grads(&s, &mut grads.as_mut(), |h, dq, dk, dvh| {
        let (qh, kh, vh) = x.head(h);
        let (oh, gh) = (s.out(&fwd.o, h), s.out(dout, h));
        let (lh, dh) = (&lse[h * n..(h + 1) * n], &den[h * n..(h + 1) * n]);
        let p = match &plans[h % hq] {
            HeadPlan::Exact => {
                exact::backward_head(qh, kh, vh, oh, lh, gh, opts, dq, dk, dvh, &ws);
                return Ok(());
            }
            HeadPlan::Poly(p) | HeadPlan::AltGrad(p) => p,
        };
        let head = poly_head(fms[h % hq].as_ref().expect("feature map of an approximate head"), &s, opts, p, &ws);
        let kv = poly::kv_head(kh, vh, causal, p.center, p.chunk, None, None, 0);
        if matches!(plans[h % hq], HeadPlan::AltGrad(_)) {
            altgrad::backward_one(&head, qh, &kv, causal, oh, dh, gh, dq, dk, dvh);
            return Ok(());
        }
        let len = head.r() * head.e();
        let (mut scan, mut dscan, mut dks) = (vec![T::zero(); len], vec![T::zero(); len], vec![0.0f64; s.head_dim]);
        let state = if causal {
            State::Scan(&mut scan)
        } else if kv_state[h].len() == len {
            State::Keys(&kv_state[h])
        } else {
            return Err(mismatch());
        };
        poly::backward_one(&head, qh, &kv, state, oh, dh, gh, &mut dscan, dq, dk, dvh, &mut dks);
        Ok(())
    })?;
    Ok(grads)
}
