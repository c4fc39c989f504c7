//! Exact softmax attention for one head, tiled (MATH §2; FA2 Alg. 1–2).
//!
//! Forward: per query block, stream key blocks with a running row max `m` and sum `l` (online
//! softmax); save `O` and `lse = m + ln l`. Backward: per key block, stream query blocks,
//! recompute `P = exp(τ Q Kᵀ − lse)`, accumulate `dV += Pᵀ G`, `dS = P ∘ (G Vᵀ − δ)`,
//! `dQ += τ dS K`, `dK += τ dSᵀ Q`. Extra memory: one `BLOCK_Q × BLOCK_K` tile and O(n) vectors;
//! no n×n buffer. Tiles the [`Mask`] hides entirely are skipped; tiles it hides in part are masked
//! with `−∞` entry by entry. Row `i` is position `q_offset + i`; keys are positions `0..kv_len`.

use super::exact_simd::{self, Head, View, ViewMut};
use super::view::{Rows, RowsMut};
use super::workspace::{fit, Pooled, Workspace};
use super::{check_backward, query_head_grads, AttnGrads, AttnGradsMut, AttnOptions, AttnOutput, Mask, Qkv};
use crate::linalg::{is_f32, matmul, rm, rm_mut, Scalar};
use crate::simd::Level;
use crate::Result;
use faer::Par;
use rayon::prelude::*;

/// Query rows per tile.
pub const BLOCK_Q: usize = 64;
/// Key rows per tile.
pub const BLOCK_K: usize = 128;

/// Scratch of one head: two `BLOCK_Q × BLOCK_K` tiles and per-row vectors.
#[derive(Debug, Default)]
pub(crate) struct Tiles<T> {
    a: Vec<T>,
    b: Vec<T>,
    m: Vec<T>,
    l: Vec<T>,
    delta: Vec<T>,
}

impl<T: Scalar> Tiles<T> {
    /// Scratch from `ws` sized for a head of `n` query rows.
    fn get(ws: &Workspace<T>, n: usize) -> Pooled<'_, Tiles<T>> {
        Pooled::get(Some(&ws.exact), |t: &mut Tiles<T>| {
            fit(&mut t.a, BLOCK_Q * BLOCK_K);
            fit(&mut t.b, BLOCK_Q * BLOCK_K);
            fit(&mut t.m, BLOCK_Q);
            fit(&mut t.l, BLOCK_Q);
            fit(&mut t.delta, n);
        })
    }
}

/// How the mask covers a tile of query positions `p0..=p1` and keys `j0..j1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tile {
    /// No pair allowed: skip the tile.
    Empty,
    /// Every pair allowed.
    Full,
    /// Some pairs allowed: mask entry by entry.
    Partial,
}

pub(super) fn tile(mask: &Mask, p0: usize, p1: usize, j0: usize, j1: usize) -> Tile {
    match *mask {
        Mask::Full => Tile::Full,
        Mask::Causal { .. } if j0 > p1 => Tile::Empty,
        Mask::Causal { .. } if j1 - 1 <= p0 => Tile::Full,
        Mask::Causal { .. } => Tile::Partial,
        Mask::Window { window, sinks, .. } => {
            // the rows' windows cover keys (p0 − window, p1], the sinks keys [0, sinks)
            if j0 > p1 || (j1.saturating_add(window) <= p0 + 1 && j0 >= sinks) {
                Tile::Empty
            } else if j1 - 1 <= p0 && (p1 < j0.saturating_add(window) || j1 <= sinks) {
                Tile::Full
            } else {
                Tile::Partial
            }
        }
    }
}

/// Columns of the key tile starting at `j0` (keys up to `end`): `BLOCK_K`, except that a window
/// mask's sinks get tiles of their own (`[0, sinks)` in tiles of at most `BLOCK_K`), so the
/// sinks do not pull a whole tile of hidden keys into every row.
#[inline]
pub(super) fn key_block(mask: &Mask, j0: usize, end: usize) -> usize {
    key_block_of(mask, j0, end, BLOCK_K)
}

/// [`key_block`] with tiles of `block` keys.
#[inline]
pub(super) fn key_block_of(mask: &Mask, j0: usize, end: usize, block: usize) -> usize {
    match *mask {
        Mask::Window { sinks, .. } if j0 < sinks => block.min(sinks - j0).min(end - j0),
        _ => block.min(end - j0),
    }
}

/// Sets the entries of `s [rows, cols]` the mask hides to −∞ (query rows from position `p0`, key
/// columns from `j0`).
#[inline]
pub(super) fn apply_mask<T: Scalar>(mask: &Mask, s: &mut [T], rows: usize, cols: usize, p0: usize, j0: usize) {
    if let Mask::Causal { .. } = mask {
        // row r sees keys j0 + c ≤ p0 + r: the hidden ones are a suffix
        for (r, row) in s[..rows * cols].chunks_exact_mut(cols).enumerate() {
            let seen = (p0 + r + 1).saturating_sub(j0).min(cols);
            row[seen..].fill(T::neg_infinity());
        }
        return;
    }
    for (r, row) in s[..rows * cols].chunks_exact_mut(cols).enumerate() {
        for (c, x) in row.iter_mut().enumerate() {
            if !mask.allows(p0 + r, j0 + c) {
                *x = T::neg_infinity();
            }
        }
    }
}

/// The SIMD kernel's description of one f32 head (`T` must be f32: the pointers are cast).
fn simd_head<T: Scalar>(q: Rows<'_, T>, k: Rows<'_, T>, v: Rows<'_, T>, opts: &AttnOptions) -> Head {
    let view = |r: Rows<'_, T>| {
        let (p, s) = r.raw();
        View { ptr: p as *const f32, stride: s }
    };
    Head {
        q: view(q),
        k: view(k),
        v: view(v),
        n: q.rows(),
        nk: k.rows(),
        d: q.cols(),
        dv: v.cols(),
        mask: opts.mask,
        tau: opts.scale as f32,
    }
}

/// Forward of one head: `q [n, d]`, `k [n_k, d]`, `v [n_k, dv]` (strided views; `n_k` as the mask
/// requires, [`Mask::kv_len`]); writes `o [n, dv]` and `lse [n]`; scratch from `ws`.
#[allow(clippy::too_many_arguments)]
pub fn forward_head<T: Scalar>(
    q: Rows<'_, T>,
    k: Rows<'_, T>,
    v: Rows<'_, T>,
    opts: &AttnOptions,
    o: &mut RowsMut<'_, T>,
    lse: &mut [T],
    ws: &Workspace<T>,
) {
    let (n, nk, mask) = (q.rows(), k.rows(), opts.mask);
    if is_f32::<T>() && exact_simd::available() {
        let h = simd_head(q, k, v, opts);
        let (op, os) = o.raw_mut();
        // SAFETY: T is f32 (is_f32), so the views and `lse` are f32 data of the sizes in `h`; `o`
        // is a distinct writable head.
        let lse = unsafe { std::slice::from_raw_parts_mut(lse.as_mut_ptr() as *mut f32, lse.len()) };
        let o = ViewMut { ptr: op as *mut f32, stride: os };
        let done = unsafe { exact_simd::forward_parts(Level::detect(), &h, o, lse, &ws.exact_simd) };
        if done {
            return;
        }
    }
    let off = mask.q_offset();
    let tau = T::from_f64(opts.scale);
    let mut tiles = Tiles::get(ws, n);
    let Tiles { a: s, m, l, .. } = &mut *tiles;
    let mut i0 = 0;
    while i0 < n {
        let br = BLOCK_Q.min(n - i0);
        let (p0, p1) = (off + i0, off + i0 + br - 1);
        let qb = q.sub(i0, br).mat();
        let mut acc = o.sub_mut(i0, br);
        m[..br].fill(T::neg_infinity());
        l[..br].fill(T::zero());
        let kend = if mask.is_causal() { nk.min(p1 + 1) } else { nk };
        let mut j0 = 0;
        while j0 < kend {
            if let Mask::Window { window, sinks, .. } = mask {
                // past the sinks, the block's windows start at key p0 + 1 − window: skip there
                if j0 >= sinks {
                    j0 = j0.max((p0 + 1).saturating_sub(window));
                    if j0 >= kend {
                        break;
                    }
                }
            }
            let bc = key_block(&mask, j0, kend);
            let t = tile(&mask, p0, p1, j0, j0 + bc);
            if t == Tile::Empty {
                j0 += bc;
                continue;
            }
            let st = &mut s[..br * bc];
            matmul(rm_mut(st, br, bc), false, qb, k.sub(j0, bc).mat().transpose(), tau, Par::Seq);
            if t == Tile::Partial {
                apply_mask(&mask, st, br, bc, p0, j0);
            }
            for r in 0..br {
                let row = &mut st[r * bc..(r + 1) * bc];
                let rmax = T::max_of(row);
                let m_new = m[r].max(rmax);
                if m_new == T::neg_infinity() {
                    // nothing this row sees yet (a window's keys lie in later tiles)
                    row.fill(T::zero());
                    continue;
                }
                let sum = T::exp_shift_sum(row, m_new);
                let rescale = (m[r] - m_new).exp();
                l[r] = l[r] * rescale + sum;
                m[r] = m_new;
                if rescale != T::one() {
                    for x in acc.row_mut(r) {
                        *x *= rescale;
                    }
                }
            }
            matmul(acc.mat_mut(), true, rm(st, br, bc), v.sub(j0, bc).mat(), T::one(), Par::Seq);
            j0 += bc;
        }
        // every row sees its own position (and key 0 when causal), so l > 0
        for r in 0..br {
            let inv = T::one() / l[r];
            for x in acc.row_mut(r) {
                *x *= inv;
            }
            lse[i0 + r] = m[r] + l[r].ln();
        }
        i0 += br;
    }
}

/// Backward of one head. Inputs as in [`forward_head`] plus `o [n, dv]`, `lse [n]` from it and
/// `g = dL/do [n, dv]`; adds into `dq [n, d]`, `dk [n_k, d]`, `dv [n_k, dv]`; scratch from `ws`.
#[allow(clippy::too_many_arguments)]
pub fn backward_head<T: Scalar>(
    q: Rows<'_, T>,
    k: Rows<'_, T>,
    v: Rows<'_, T>,
    o: Rows<'_, T>,
    lse: &[T],
    g: Rows<'_, T>,
    opts: &AttnOptions,
    dq: &mut RowsMut<'_, T>,
    dk: &mut RowsMut<'_, T>,
    dv: &mut RowsMut<'_, T>,
    ws: &Workspace<T>,
) {
    let n = q.rows();
    if is_f32::<T>() && exact_simd::available() {
        let h = simd_head(q, k, v, opts);
        let view = |r: Rows<'_, T>| {
            let (p, s) = r.raw();
            View { ptr: p as *const f32, stride: s }
        };
        let view_mut = |r: &mut RowsMut<'_, T>| {
            let (p, s) = r.raw_mut();
            ViewMut { ptr: p as *mut f32, stride: s }
        };
        let (dqv, dkv, dvv) = (view_mut(dq), view_mut(dk), view_mut(dv));
        // SAFETY: T is f32 (is_f32), so every view and `lse` hold f32 data of the sizes in `h`;
        // the gradient views are distinct writable heads.
        let lse = unsafe { std::slice::from_raw_parts(lse.as_ptr() as *const f32, lse.len()) };
        let (o, g) = (view(o), view(g));
        let done = unsafe { exact_simd::backward_parts(Level::detect(), &h, o, lse, g, dqv, dkv, dvv, &ws.exact_simd) };
        if done {
            return;
        }
    }
    let tau = T::from_f64(opts.scale);
    let mut tiles = Tiles::get(ws, n);
    let Tiles { a: p, b: dp, delta, .. } = &mut *tiles;
    // δ_i = Σ_c G_ic O_ic
    for (i, dl) in delta[..n].iter_mut().enumerate() {
        *dl = g.row(i).iter().zip(o.row(i)).map(|(x, y)| *x * *y).sum();
    }
    let (nk, mask) = (k.rows(), opts.mask);
    let off = mask.q_offset();
    let mut j0 = 0;
    while j0 < nk {
        let bc = key_block(&mask, j0, nk);
        let (kb, vb) = (k.sub(j0, bc).mat(), v.sub(j0, bc).mat());
        let (mut dk_b, mut dv_b) = (dk.sub_mut(j0, bc), dv.sub_mut(j0, bc));
        // causal: only positions p ≥ j0 see these keys; start at the query block holding j0
        let first = if mask.is_causal() { j0.saturating_sub(off) } else { 0 };
        let mut i0 = (first / BLOCK_Q) * BLOCK_Q;
        while i0 < n {
            let br = BLOCK_Q.min(n - i0);
            let (p0, p1) = (off + i0, off + i0 + br - 1);
            let t = tile(&mask, p0, p1, j0, j0 + bc);
            if t == Tile::Empty {
                if matches!(mask, Mask::Window { window, sinks, .. } if j0 >= sinks && p0 + 1 >= (j0 + bc).saturating_add(window))
                {
                    break; // every later row is past the window of these keys
                }
                i0 += br;
                continue;
            }
            let (qb, gb) = (q.sub(i0, br).mat(), g.sub(i0, br).mat());
            let pt = &mut p[..br * bc];
            let dpt = &mut dp[..br * bc];
            matmul(rm_mut(pt, br, bc), false, qb, kb.transpose(), tau, Par::Seq);
            if t == Tile::Partial {
                apply_mask(&mask, pt, br, bc, p0, j0);
            }
            for r in 0..br {
                let li = lse[i0 + r];
                T::exp_shift_sum(&mut pt[r * bc..(r + 1) * bc], li);
            }
            // dV_j += Pᵀ G_i
            matmul(dv_b.mat_mut(), true, rm(pt, br, bc).transpose(), gb, T::one(), Par::Seq);
            // dP = G_i V_jᵀ
            matmul(rm_mut(dpt, br, bc), false, gb, vb.transpose(), T::one(), Par::Seq);
            // dS = P ∘ (dP − δ)
            for r in 0..br {
                let dl = delta[i0 + r];
                for (ds, pv) in dpt[r * bc..(r + 1) * bc].iter_mut().zip(&pt[r * bc..(r + 1) * bc]) {
                    *ds = *pv * (*ds - dl);
                }
            }
            // dQ_i += τ dS K_j ;  dK_j += τ dSᵀ Q_i
            matmul(dq.sub_mut(i0, br).mat_mut(), true, rm(dpt, br, bc), kb, tau, Par::Seq);
            matmul(dk_b.mat_mut(), true, rm(dpt, br, bc).transpose(), qb, tau, Par::Seq);
            i0 += br;
        }
        j0 += bc;
    }
}

/// Exact softmax attention, forward (MATH §2, FA2 Alg. 1): tiled online softmax, O(n) extra
/// memory per head, the (sequence, head) pairs in parallel. Returns
/// `o [batch, seq_len, num_heads, head_dim_v]` and `lse [batch, num_heads, seq_len]`. Any
/// [`Mask`]: full, causal with a query offset (the keys are positions `0..q_offset + seq_len`), or
/// a sliding window with sinks; tiles the mask hides are skipped.
///
/// Errors: [`crate::Error::BadInput`] for a non-positive scale or a mask that does not fit the
/// shape ([`Mask::validate`]).
pub fn forward_exact<T: Scalar>(x: &Qkv<'_, T>, opts: &AttnOptions) -> Result<AttnOutput<T>> {
    let s = *x.shape();
    let mut o = vec![T::zero(); s.heads() * s.seq_len * s.head_dim_v];
    let mut lse = vec![T::zero(); s.heads() * s.seq_len];
    forward_exact_into(x, opts, &mut o, &mut lse, &Workspace::new())?;
    Ok(AttnOutput { o, lse, shape: s, opts: *opts })
}

/// [`forward_exact`] into caller-owned buffers `o [batch, seq_len, num_heads, head_dim_v]` and
/// `lse [batch, num_heads, seq_len]` (overwritten), with scratch from `ws`.
///
/// Errors: as [`forward_exact`], or [`crate::Error::BadInput`] (input `o` or `lse`) for a wrong
/// length.
pub fn forward_exact_into<T: Scalar>(
    x: &Qkv<'_, T>,
    opts: &AttnOptions,
    o: &mut [T],
    lse: &mut [T],
    ws: &Workspace<T>,
) -> Result<()> {
    let s = *x.shape();
    opts.check(&s)?;
    s.check_len("o", o, s.num_heads, s.head_dim_v)?;
    s.check_rowwise("lse", lse)?;
    s.query_views(o, s.head_dim_v).into_par_iter().zip(lse.par_chunks_mut(s.seq_len)).enumerate().for_each(
        |(h, (mut oh, lh))| {
            let (qh, kh, vh) = x.head(h);
            forward_head(qh, kh, vh, opts, &mut oh, lh, ws);
        },
    );
    Ok(())
}

/// Exact softmax attention, backward (MATH §2, FA2 Alg. 2): recomputes `P` block by block from
/// `fwd.lse`; `dout` is `dL/do [batch, seq_len, num_heads, head_dim_v]`. The (sequence, head)
/// pairs in parallel; GQA gradients of `k`, `v` are summed over each group.
///
/// Errors: [`crate::Error::BadInput`] when `fwd` was computed for another shape or `fwd`/`dout`
/// have the wrong lengths.
pub fn backward_exact<T: Scalar>(x: &Qkv<'_, T>, fwd: &AttnOutput<T>, dout: &[T]) -> Result<AttnGrads<T>> {
    check_backward(x, &fwd.shape, &fwd.o, dout)?;
    let mut grads = AttnGrads::zeros(x.shape());
    backward_exact_into(x, &fwd.opts, &fwd.o, &fwd.lse, dout, grads.as_mut(), &Workspace::new())?;
    Ok(grads)
}

/// [`backward_exact`] from caller-owned `o`, `lse` (of [`forward_exact_into`] with the same
/// inputs and `opts`) and `dout`, into caller-owned gradients (overwritten), with scratch from
/// `ws`.
///
/// Errors: [`crate::Error::BadInput`] naming the buffer of a wrong length, or as
/// [`forward_exact`] for `opts`.
#[allow(clippy::too_many_arguments)]
pub fn backward_exact_into<T: Scalar>(
    x: &Qkv<'_, T>,
    opts: &AttnOptions,
    o: &[T],
    lse: &[T],
    dout: &[T],
    mut grads: AttnGradsMut<'_, T>,
    ws: &Workspace<T>,
) -> Result<()> {
    let s = *x.shape();
    opts.check(&s)?;
    check_backward(x, &s, o, dout)?;
    s.check_rowwise("lse", lse)?;
    grads.check(&s)?;
    let n = s.seq_len;
    query_head_grads(&s, &mut grads, |h, dq, dk, dv| {
        let (qh, kh, vh) = x.head(h);
        let lh = &lse[h * n..(h + 1) * n];
        backward_head(qh, kh, vh, s.out(o, h), lh, s.out(dout, h), opts, dq, dk, dv, ws);
        Ok(())
    })?;
    Ok(())
}
