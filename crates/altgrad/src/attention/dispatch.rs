//! The per-layer dispatcher: one attention layer whose heads may use different methods (MATH §6:
//! "only the attention core is approximated, per head, with its own degree"; LSSSZ Lemma K.2:
//! heads are independent). Each head's method is a [`HeadPlan`] ([`super::method`]).
//!
//! When every head uses the same plan the whole layer goes through that method's multi-head
//! entry point (sharing GQA key/value work); otherwise each query head runs alone against its
//! key/value head and the key/value gradients are summed over each GQA group.

use super::features::FeatureMap;
use super::method::{HeadCtx, HeadPlan, HeadSaved, LayerSaved, Method};
use super::poly;
use super::workspace::Workspace;
use super::{query_head_grads, AttnGrads, AttnOptions, AttnShape, Qkv};
use crate::linalg::Scalar;
use crate::{Error, Result};
use rayon::prelude::*;

/// What a layer's forward keeps for its backward.
#[derive(Clone, Debug)]
enum Saved<T> {
    /// Every head uses one plan of this method: that method's multi-head forward output.
    Uniform(Method, LayerSaved<T>),
    /// Heads of different plans: `lse`, `den` `[num_heads, seq_len]` (`den` of the approximate
    /// heads) and, per query head, `H'` of a non-causal approximate head (empty otherwise).
    PerHead { lse: Vec<T>, den: Vec<T>, kv_state: Vec<Vec<T>> },
}

/// Forward output of a layer: `o [batch, seq_len, num_heads, head_dim_v]` and what the backward
/// needs (once for the whole layer when all heads share a plan, else per head).
#[derive(Clone, Debug)]
pub struct LayerOutput<T> {
    /// Attention output.
    pub o: Vec<T>,
    saved: Saved<T>,
}

/// Checks the options for every plan of a layer (exact heads take any mask, approximate heads the
/// full or causal one, [`poly::poly_mask`]) and each plan ([`HeadPlan::feature_map`]); returns
/// whether the mask is causal and each plan's feature map.
///
/// Errors: [`Error::BadInput`] as [`AttnOptions::check`], [`poly::poly_mask`] and
/// [`HeadPlan::check`].
#[allow(clippy::type_complexity)]
fn prepare<T: Scalar>(
    s: &AttnShape,
    opts: &AttnOptions,
    plans: &[HeadPlan],
) -> Result<(bool, Vec<Option<FeatureMap<T>>>)> {
    opts.check(s)?;
    if plans.iter().any(|p| matches!(p, HeadPlan::Hybrid(_))) {
        // its kernel runs whole layers (forward_hybrid): every head of the layer the same plan
        return Err(Error::bad("attention plan", "hybrid heads cannot share a layer with heads of other plans"));
    }
    if plans.iter().any(|p| *p != HeadPlan::Exact) {
        poly::poly_mask(opts, s, 0)?;
    }
    Ok((opts.is_causal(), plans.iter().map(|p| p.feature_map(s)).collect::<Result<_>>()?))
}

/// Forward of one layer with `plans[h]` for query head `h` of every sequence of the batch
/// (`plans.len() == num_heads`). Shapes as [`super::forward_exact`].
///
/// Errors: [`Error::BadInput`] on shape mismatches or invalid plans (odd degree, …).
pub fn forward_layer<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
    plans: &[HeadPlan],
) -> Result<LayerOutput<T>> {
    let s = *shape;
    s.validate()?;
    if plans.len() != s.num_heads {
        return Err(Error::bad("attention plan", format!("{} plans for {} heads", plans.len(), s.num_heads)));
    }
    let x = Qkv::new(q, k, v, &s)?;
    if plans.iter().all(|p| *p == plans[0]) {
        let f = plans[0].forward_layer(&x, opts)?;
        return Ok(LayerOutput { o: f.o().to_vec(), saved: Saved::Uniform(plans[0].method(), f) });
    }
    let (causal, fms) = prepare::<T>(&s, opts, plans)?;
    let (n, dv, hq) = (s.seq_len, s.head_dim_v, s.num_heads);
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
            let ctx = HeadCtx { x: x.head(h), fm: fms[h % hq].as_ref(), shape: &s, opts, ws: &ws, causal };
            plans[h % hq].forward_head(&ctx, &mut oh, lh, dh)
        })
        .collect();
    Ok(LayerOutput { o, saved: Saved::PerHead { lse, den, kv_state } })
}

/// Backward of [`forward_layer`] with the same inputs and plans; `dout [batch, seq_len, num_heads,
/// head_dim_v]`. Each head's gradient is its method's gradient (exact for exact heads, the
/// approximate model's for poly heads, the paper's formula for altgrad heads).
///
/// Errors: [`Error::BadInput`] on shape mismatches; [`Error::Internal`] if `fwd` came from
/// different plans.
#[allow(clippy::too_many_arguments)]
pub fn backward_layer<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    fwd: &LayerOutput<T>,
    dout: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
    plans: &[HeadPlan],
) -> Result<AttnGrads<T>> {
    let s = *shape;
    let x = Qkv::new(q, k, v, &s)?;
    let mismatch = || Error::Internal("mixed attention: saved state does not match the plans".into());
    let (lse, den, kv_state) = match &fwd.saved {
        Saved::Uniform(m, f) if *m == plans[0].method() => {
            return plans[0].backward_layer(&x, f, dout).unwrap_or_else(|| Err(mismatch()))
        }
        Saved::Uniform(..) => return Err(mismatch()),
        Saved::PerHead { lse, den, kv_state } => (lse, den, kv_state),
    };
    if kv_state.len() != s.heads() || plans.len() != s.num_heads {
        return Err(mismatch());
    }
    let (causal, fms) = prepare::<T>(&s, opts, plans)?;
    s.check_len("do", dout, s.num_heads, s.head_dim_v)?;
    let (n, hq) = (s.seq_len, s.num_heads);
    let ws = Workspace::new();
    let mut grads = AttnGrads::zeros(&s);
    query_head_grads(&s, &mut grads.as_mut(), |h, dq, dk, dvh| {
        let saved = HeadSaved {
            o: s.out(&fwd.o, h),
            g: s.out(dout, h),
            lse: &lse[h * n..(h + 1) * n],
            den: &den[h * n..(h + 1) * n],
            kv_state: kv_state[h].as_slice(),
        };
        let ctx = HeadCtx { x: x.head(h), fm: fms[h % hq].as_ref(), shape: &s, opts, ws: &ws, causal };
        if plans[h % hq].backward_head(&ctx, saved, dq, dk, dvh) {
            Ok(())
        } else {
            Err(mismatch())
        }
    })?;
    Ok(grads)
}
