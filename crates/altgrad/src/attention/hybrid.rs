//! Hybrid attention (MATH §4.1; Based, Arora et al. 2024; LoLCATs, Zhang et al. 2024): exact
//! softmax weights for the keys near a row (a sliding window and attention sinks), polynomial
//! weights for the far keys, one normalization. Causal only.
//!
//! Row `i` (position `i`) sees keys `j ≤ i`; key `j` is *near* when `i − j < w` or `j < s`, else
//! *far* (`s ≤ j ≤ i − w`). Weights:
//!
//! - near: `a_ij = exp(τ q_i·k_j)`;
//! - far: `a_ij = T_g(τ q_i·(k_j − k̄_i))·exp(τ q_i·k̄_i)`, with `k̄_i` the mean of row `i`'s far
//!   keys (poly's causal row shift applied to the keys the polynomial weighs; `k̄_i = 0` without
//!   centering, where the far weight is `T_g(τ q_i·k_j)`);
//!
//! and `o_i = Σ_j a_ij v_j / Σ_j a_ij`. With `w = s = 0` every key is far and this is `poly`
//! (causal); with `w ≥ n` every key is near and this is exact causal attention.
//!
//! Computed as two kernels merged by log-sum-exp, each stable on its own:
//!
//! - near: exact tiled attention with the [`Mask::Window`] mask (max-subtracted), giving
//!   `o_near`, `lse_near`; O(n·(w + s)·d) (tiles outside the window are skipped).
//! - far: causal polynomial attention on the rows `w + s..n` against the keys `s..n − w`: row
//!   `i' = i − w − s` of the slice sees key `j' = j − s ≤ i'`, which is `j ≤ i − w`, so the slice
//!   is plain causal `poly` ([`super::poly::Head::forward_causal`]), O(n·r·d_v); its
//!   `lse_far = τ q_i·k̄_i + ln den_i` is the log of the far weights' sum.
//! - merge: `lse = ln(e^{lse_near} + e^{lse_far})`, `o = e^{lse_near − lse} o_near + e^{lse_far − lse} o_far`.
//!
//! The backward works from the merged `o` and `lse`: the exact kernel's backward with them gives
//! the near pairs' gradient (`P_ij = exp(s_ij − lse_i)`, `δ_i = G_i·o_i`), and the polynomial
//! kernel's backward with `o` and `den'_i = exp(lse_i − τ q_i·k̄_i)` (the merged normalizer in the
//! polynomial kernel's units) gives the far pairs'. The far weights' common factor
//! `exp(τ q_i·k̄_i)` does not cancel in the hybrid's normalization: its gradient
//! `dℓ_i = β_i G_i·(o_far,i − o_i)` (`β_i = e^{lse_far − lse}`) reaches `q_i` as `τ dℓ_i k̄_i` and the
//! far keys through the prefix mean.

use super::exact;
use super::features::FeatureMap;
use super::poly::{self, Head, PolyOptions, QueryBack, State};
use super::view::{Rows, RowsMut};
use super::workspace::Workspace;
use super::{query_head_grads, AttnGrads, AttnGradsMut, AttnOptions, AttnShape, Mask, Qkv};
use crate::linalg::Scalar;
use crate::{Error, Result};
use rayon::prelude::*;

/// Options of hybrid attention: the near keys (a window of `window` keys, diagonal included, and
/// `sinks` leading keys) and the polynomial of the far keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HybridOptions {
    /// Keys `w` of the sliding window (row `i` sees keys `i − w < j ≤ i` exactly); 0 with
    /// `sinks = 0` is `poly`.
    pub window: usize,
    /// Leading keys `s` every row sees exactly (attention sinks).
    pub sinks: usize,
    /// Degree, centering and chunk of the far keys' polynomial ([`PolyOptions`]).
    pub poly: PolyOptions,
}

impl HybridOptions {
    /// A window of `window` keys, `sinks` sinks, degree `degree`, centered, default chunk.
    pub fn new(window: usize, sinks: usize, degree: usize) -> Self {
        HybridOptions { window, sinks, poly: PolyOptions::new(degree) }
    }

    /// Errors: [`Error::BadInput`] as [`PolyOptions::validate`] (input `degree` or `chunk`).
    pub fn validate(&self) -> Result<()> {
        self.poly.validate()
    }

    /// The exact part's mask ([`Mask::Window`]), `None` when no key is near (`w = s = 0`).
    pub fn near_mask(&self) -> Option<Mask> {
        (self.window > 0 || self.sinks > 0).then_some(Mask::Window {
            window: self.window,
            sinks: self.sinks,
            q_offset: 0,
        })
    }

    /// The first row with far keys, `w + s` (rows before it see only near keys).
    pub fn first_far_row(&self) -> usize {
        self.window.saturating_add(self.sinks)
    }

    /// Rows with far keys in a sequence of `n`: `n − w − s` (0 when `w + s ≥ n`).
    pub fn far_rows(&self, n: usize) -> usize {
        n.saturating_sub(self.first_far_row())
    }
}

/// Output of [`forward_hybrid`]: the merged tensors and the far part the backward needs.
#[derive(Clone, Debug)]
pub struct HybridOutput<T> {
    /// Attention output `o [batch, seq_len, num_heads, head_dim_v]`.
    pub o: Vec<T>,
    /// `lse_i = ln Σ_j a_ij` per head and row, `[batch, num_heads, seq_len]`.
    pub lse: Vec<T>,
    /// The far keys' normalized output `o_far [batch, seq_len, num_heads, head_dim_v]` (zero rows
    /// where a row has no far key, `i < w + s`).
    pub far_o: Vec<T>,
    /// `lse_far,i = ln Σ_{far j} a_ij`, `[batch, num_heads, seq_len]` (−∞ where a row has no far key).
    pub far_lse: Vec<T>,
    /// The shape of the inputs.
    pub shape: AttnShape,
    /// The options of the call.
    pub opts: AttnOptions,
    /// The hybrid options of the call.
    pub hopts: HybridOptions,
}

/// A hybrid forward's tensors as caller-owned slices (layouts as [`HybridOutput`]): what
/// [`backward_hybrid_into`] reads.
#[derive(Clone, Copy, Debug)]
pub struct HybridSaved<'a, T> {
    /// `o [batch, seq_len, num_heads, head_dim_v]`.
    pub o: &'a [T],
    /// `lse [batch, num_heads, seq_len]`.
    pub lse: &'a [T],
    /// `far_o [batch, seq_len, num_heads, head_dim_v]`.
    pub far_o: &'a [T],
    /// `far_lse [batch, num_heads, seq_len]`.
    pub far_lse: &'a [T],
}

/// Caller-owned output buffers of [`forward_hybrid_into`] (overwritten), layouts as
/// [`HybridOutput`].
#[derive(Debug)]
pub struct HybridBuffers<'a, T> {
    /// Attention output.
    pub o: &'a mut [T],
    /// Log-sum-exps.
    pub lse: &'a mut [T],
    /// The far part's output.
    pub far_o: &'a mut [T],
    /// The far part's log-sum-exps.
    pub far_lse: &'a mut [T],
}

/// Checks a hybrid call and builds the far part's feature map (`None` when no row has far keys).
///
/// Errors: [`Error::BadInput`] for a non-positive scale, a mask other than causal without query
/// offset (input `mask`), `kv_len ≠ seq_len`, or bad polynomial options / feature width.
fn prepare<T: Scalar>(s: &AttnShape, opts: &AttnOptions, h: &HybridOptions) -> Result<Option<FeatureMap<T>>> {
    opts.check(s)?;
    s.check_self("mask")?;
    if opts.mask != Mask::causal() {
        return Err(Error::bad(
            "mask",
            format!(
                "hybrid attention is causal, without a query offset (its window and sinks are the mask), got {:?}",
                opts.mask
            ),
        ));
    }
    h.validate()?;
    if h.far_rows(s.seq_len) == 0 {
        return Ok(None);
    }
    Ok(Some(FeatureMap::new(s.head_dim, h.poly.degree)?))
}

/// One query head's context: options, the far part's polynomial head (when some row has far keys).
struct Ctx<'a, T> {
    opts: &'a AttnOptions,
    h: &'a HybridOptions,
    far: Option<Head<'a, T>>,
    ws: &'a Workspace<T>,
}

impl<T: Scalar> Ctx<'_, T> {
    fn near_opts(&self) -> Option<AttnOptions> {
        self.h.near_mask().map(|m| self.opts.with_mask(m))
    }

    /// The far keys `s..n − w` of `k`, `v` as a polynomial key/value head.
    fn far_kv<'b>(&self, head: &Head<'_, T>, k: Rows<'b, T>, v: Rows<'b, T>, nf: usize) -> poly::KvHead<'b, T> {
        let s = self.h.sinks;
        poly::kv_head(k.sub(s, nf), v.sub(s, nf), true, head.center, head.chunk, None, None, 0, Vec::new())
    }

    /// Forward of one query head: writes `o`, `lse`, `fo`, `fl` (rows `[n, ·]`).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        (q, k, v): (Rows<'_, T>, Rows<'_, T>, Rows<'_, T>),
        o: &mut RowsMut<'_, T>,
        lse: &mut [T],
        fo: &mut RowsMut<'_, T>,
        fl: &mut [T],
    ) {
        let n = q.rows();
        let near = self.near_opts();
        if let Some(no) = &near {
            exact::forward_head(q, k, v, no, o, lse, self.ws);
        }
        fo.fill_zero();
        fl.fill(T::neg_infinity());
        let (i0, nf) = (self.h.first_far_row().min(n), self.h.far_rows(n));
        let Some(head) = self.far.as_ref().filter(|_| nf > 0) else { return };
        let kv = self.far_kv(head, k, v, nf);
        let mut scan = vec![T::zero(); head.r() * head.e()];
        let mut den = vec![T::zero(); nf];
        let qf = q.sub(i0, nf);
        poly::forward_one(
            head,
            qf,
            &kv,
            State::Scan(&mut scan),
            &mut fo.sub_mut(i0, nf),
            &mut fl[i0..],
            &mut den,
            None,
        );
        for i in i0..n {
            if near.is_none() {
                lse[i] = fl[i];
                o.row_mut(i).copy_from_slice(fo.row_mut(i));
                continue;
            }
            let (a, b) = (lse[i].as_f64(), fl[i].as_f64());
            let m = a.max(b);
            let l = m + ((a - m).exp() + (b - m).exp()).ln();
            let (wa, wb) = (T::from_f64((a - l).exp()), T::from_f64((b - l).exp()));
            for (x, y) in o.row_mut(i).iter_mut().zip(fo.row_mut(i).iter()) {
                *x = wa * *x + wb * *y;
            }
            lse[i] = T::from_f64(l);
        }
    }

    /// Backward of one query head from the merged `o`, `lse` and the far part `fo`, `fl`; adds into
    /// `dq [n, d]`, `dk`, `dv`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        (q, k, v): (Rows<'_, T>, Rows<'_, T>, Rows<'_, T>),
        (o, lse, fo, fl): (Rows<'_, T>, &[T], Rows<'_, T>, &[T]),
        g: Rows<'_, T>,
        dq: &mut RowsMut<'_, T>,
        dk: &mut RowsMut<'_, T>,
        dv: &mut RowsMut<'_, T>,
    ) {
        let n = q.rows();
        let near = self.near_opts();
        if let Some(no) = &near {
            exact::backward_head(q, k, v, o, lse, g, no, dq, dk, dv, self.ws);
        }
        let (i0, nf, s) = (self.h.first_far_row().min(n), self.h.far_rows(n), self.h.sinks);
        let Some(head) = self.far.as_ref().filter(|_| nf > 0) else { return };
        let kv = self.far_kv(head, k, v, nf);
        let (qf, of, gf) = (q.sub(i0, nf), o.sub(i0, nf), g.sub(i0, nf));
        let m = poly::row_shifts(qf, &kv.kbar, head.scale, head.center);
        // base_i = τ q_i·k̄_i = τ q_i·c + m_i; den'_i = exp(lse_i − base_i)
        let base: Vec<f64> = (0..nf)
            .map(|i| {
                let qc: f64 = qf.row(i).iter().zip(&kv.c).map(|(a, b)| a.as_f64() * b.as_f64()).sum();
                head.scale * qc + m[i].as_f64()
            })
            .collect();
        let den: Vec<T> = (0..nf).map(|i| T::from_f64((lse[i0 + i].as_f64() - base[i]).exp())).collect();
        let (len, d) = (head.r() * head.e(), q.cols());
        let (mut scan, mut dscan, mut dks) = (vec![T::zero(); len], vec![T::zero(); len], vec![0.0f64; d]);
        let x = QueryBack { q: qf, m: &m, o: of, den: &den, g: gf };
        let (mut dqf, mut dkf, mut dvf) = (dq.sub_mut(i0, nf), dk.sub_mut(s, nf), dv.sub_mut(s, nf));
        head.backward_causal(&x, &kv, &mut scan, None, &mut dscan, &mut dqf, &mut dkf, &mut dvf, &mut dks);
        if near.is_none() || !head.center {
            return; // no near keys: the factor cancels; no centering: there is none
        }
        // through exp(τ q_i·k̄_i): dℓ_i = β_i G_i·(o_far,i − o_i); dq_i += τ dℓ_i k̄_i, and far key
        // j' gets Σ_{i' ≥ j'} τ dℓ_i q_i/(i' + 1) through the prefix mean
        let fof = fo.sub(i0, nf);
        let mut acc = vec![0.0f64; d];
        for i in (0..nf).rev() {
            let beta = (fl[i0 + i].as_f64() - lse[i0 + i].as_f64()).exp();
            let gi = gf.row(i);
            let dot: f64 = gi
                .iter()
                .zip(fof.row(i).iter().zip(of.row(i)))
                .map(|(g, (a, b))| g.as_f64() * (a.as_f64() - b.as_f64()))
                .sum();
            let dl = head.scale * beta * dot;
            let kb = &kv.kbar[i * d..(i + 1) * d];
            let inv = 1.0 / (i + 1) as f64;
            for (((x, kbv), cv), (a, qv)) in
                dqf.row_mut(i).iter_mut().zip(kb).zip(&kv.c).zip(acc.iter_mut().zip(qf.row(i)))
            {
                *x += T::from_f64(dl * (kbv.as_f64() + cv.as_f64()));
                *a += dl * qv.as_f64() * inv;
            }
            for (x, a) in dkf.row_mut(i).iter_mut().zip(&acc) {
                *x += T::from_f64(*a);
            }
        }
    }
}

/// Hybrid attention, forward (MATH §4.1): exact softmax weights for the window and the sinks,
/// polynomial weights `T_g(τ q_i·(k_j − k̄_i))·exp(τ q_i·k̄_i)` for the far keys, one
/// normalization; O(n·(w + s + r)·d) time per head, the (sequence, head) pairs in parallel.
/// `opts.mask` must be [`Mask::causal`] (the window and sinks are `hopts`').
///
/// Returns the merged `o`, `lse` and the far part (`far_o`, `far_lse`) the backward reuses.
///
/// Errors: [`Error::BadInput`] for a non-positive scale, another mask, `kv_len ≠ seq_len`, an
/// odd or zero degree, a zero chunk, or a feature width above
/// [`super::features::MAX_FEATURE_DIM`].
pub fn forward_hybrid<T: Scalar>(x: &Qkv<'_, T>, opts: &AttnOptions, hopts: &HybridOptions) -> Result<HybridOutput<T>> {
    let s = *x.shape();
    let (rows, dv) = (s.heads() * s.seq_len, s.head_dim_v);
    let (mut o, mut lse) = (vec![T::zero(); rows * dv], vec![T::zero(); rows]);
    let (mut far_o, mut far_lse) = (vec![T::zero(); rows * dv], vec![T::zero(); rows]);
    let out = HybridBuffers { o: &mut o, lse: &mut lse, far_o: &mut far_o, far_lse: &mut far_lse };
    forward_hybrid_into(x, opts, hopts, out, &Workspace::new())?;
    Ok(HybridOutput { o, lse, far_o, far_lse, shape: s, opts: *opts, hopts: *hopts })
}

/// [`forward_hybrid`] into caller-owned buffers (overwritten), with scratch from `ws`.
///
/// Errors: as [`forward_hybrid`], or [`Error::BadInput`] (input `o`, `lse`, `far_o` or `far_lse`)
/// for a buffer of the wrong length.
pub fn forward_hybrid_into<T: Scalar>(
    x: &Qkv<'_, T>,
    opts: &AttnOptions,
    hopts: &HybridOptions,
    out: HybridBuffers<'_, T>,
    ws: &Workspace<T>,
) -> Result<()> {
    let s = *x.shape();
    let fm = prepare::<T>(&s, opts, hopts)?;
    let (n, dv) = (s.seq_len, s.head_dim_v);
    s.check_len("o", out.o, s.num_heads, dv)?;
    s.check_len("far_o", out.far_o, s.num_heads, dv)?;
    s.check_rowwise("lse", out.lse)?;
    s.check_rowwise("far_lse", out.far_lse)?;
    let far = fm.as_ref().map(|fm| head_of(fm, &s, opts, hopts, ws));
    let ctx = Ctx { opts, h: hopts, far, ws };
    s.query_views(out.o, dv)
        .into_par_iter()
        .zip(s.query_views(out.far_o, dv))
        .zip(out.lse.par_chunks_mut(n).zip(out.far_lse.par_chunks_mut(n)))
        .enumerate()
        .for_each(|(h, ((mut oh, mut foh), (lh, flh)))| ctx.forward(x.head(h), &mut oh, lh, &mut foh, flh));
    Ok(())
}

fn head_of<'a, T: Scalar>(
    fm: &'a FeatureMap<T>,
    s: &AttnShape,
    opts: &AttnOptions,
    h: &HybridOptions,
    ws: &'a Workspace<T>,
) -> Head<'a, T> {
    Head { fm, dv: s.head_dim_v, scale: opts.scale, center: h.poly.center, chunk: h.poly.chunk, ws }
}

/// Hybrid attention, backward: the exact gradient of [`forward_hybrid`]'s function (near pairs
/// through the exact kernel, far pairs through the polynomial kernel, both from the merged output,
/// plus the far weights' common factor; MATH §4.1). `dout = dL/do [batch, seq_len, num_heads,
/// head_dim_v]`. Returns `dq`, `dk`, `dv` (GQA groups summed).
///
/// Errors: [`Error::BadInput`] when `fwd` was computed for another shape or the buffers have the
/// wrong sizes.
pub fn backward_hybrid<T: Scalar>(x: &Qkv<'_, T>, fwd: &HybridOutput<T>, dout: &[T]) -> Result<AttnGrads<T>> {
    super::check_backward(x, &fwd.shape, &fwd.o, dout)?;
    let mut grads = AttnGrads::zeros(x.shape());
    let saved = HybridSaved { o: &fwd.o, lse: &fwd.lse, far_o: &fwd.far_o, far_lse: &fwd.far_lse };
    backward_hybrid_into(x, &fwd.opts, &fwd.hopts, saved, dout, grads.as_mut(), &Workspace::new())?;
    Ok(grads)
}

/// [`backward_hybrid`] from caller-owned saved tensors (of [`forward_hybrid_into`] with the same
/// inputs and options), into caller-owned gradients (overwritten), with scratch from `ws`.
///
/// Errors: as [`forward_hybrid`] for the options, or [`Error::BadInput`] naming a buffer of the
/// wrong length.
pub fn backward_hybrid_into<T: Scalar>(
    x: &Qkv<'_, T>,
    opts: &AttnOptions,
    hopts: &HybridOptions,
    saved: HybridSaved<'_, T>,
    dout: &[T],
    mut grads: AttnGradsMut<'_, T>,
    ws: &Workspace<T>,
) -> Result<()> {
    let s = *x.shape();
    let fm = prepare::<T>(&s, opts, hopts)?;
    super::check_backward(x, &s, saved.o, dout)?;
    s.check_len("far_o", saved.far_o, s.num_heads, s.head_dim_v)?;
    s.check_rowwise("lse", saved.lse)?;
    s.check_rowwise("far_lse", saved.far_lse)?;
    grads.check(&s)?;
    let far = fm.as_ref().map(|fm| head_of(fm, &s, opts, hopts, ws));
    let ctx = Ctx { opts, h: hopts, far, ws };
    let n = s.seq_len;
    query_head_grads(&s, &mut grads, |h, dq, dk, dv| {
        let rows = h * n..(h + 1) * n;
        let sv = (s.out(saved.o, h), &saved.lse[rows.clone()], s.out(saved.far_o, h), &saved.far_lse[rows]);
        ctx.backward(x.head(h), sv, s.out(dout, h), dq, dk, dv);
        Ok(())
    })?;
    Ok(())
}
