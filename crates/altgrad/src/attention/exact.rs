//! Exact softmax attention for one head, tiled (MATH §2; FA2 Alg. 1–2).
//!
//! Forward: per query block, stream key blocks with a running row max `m` and sum `l` (online
//! softmax); save `O` and `lse = m + ln l`. Backward: per key block, stream query blocks,
//! recompute `P = exp(τ Q Kᵀ − lse)`, accumulate `dV += Pᵀ G`, `dS = P ∘ (G Vᵀ − δ)`,
//! `dQ += τ dS K`, `dK += τ dSᵀ Q`. Extra memory: one `BLOCK_Q × BLOCK_K` tile and O(n) vectors;
//! no n×n buffer. Causal blocks above the diagonal are skipped.

use super::AttnOptions;
use crate::linalg::{matmul, rm, rm_mut, Scalar};
use faer::Par;

/// Query rows per tile.
pub const BLOCK_Q: usize = 64;
/// Key rows per tile.
pub const BLOCK_K: usize = 128;

/// Masks `s [rows, cols]` (query rows from `i0`, key cols from `j0`) with −∞ where `j > i`.
#[inline]
fn mask_causal<T: Scalar>(s: &mut [T], rows: usize, cols: usize, i0: usize, j0: usize) {
    if j0 + cols <= i0 + 1 {
        return; // whole tile at or below the diagonal
    }
    for r in 0..rows {
        let i = i0 + r;
        let first_masked = (i + 1).saturating_sub(j0).min(cols);
        for x in &mut s[r * cols + first_masked..(r + 1) * cols] {
            *x = T::neg_infinity();
        }
    }
}

// Scratch tiles live on the heap (clippy would put them on the stack).
#[allow(clippy::useless_vec)]
/// Forward of one head. `q [n, d]`, `k [n, d]`, `v [n, dv]` contiguous row-major; returns
/// `(o [n, dv], lse [n])`.
pub fn forward_head<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    n: usize,
    d: usize,
    dv: usize,
    opts: &AttnOptions,
) -> (Vec<T>, Vec<T>) {
    let tau = T::from_f64(opts.scale);
    let mut o = vec![T::zero(); n * dv];
    let mut lse = vec![T::zero(); n];
    let mut s = vec![T::zero(); BLOCK_Q * BLOCK_K];
    let mut m = vec![T::zero(); BLOCK_Q];
    let mut l = vec![T::zero(); BLOCK_Q];
    let mut i0 = 0;
    while i0 < n {
        let br = BLOCK_Q.min(n - i0);
        let qb = rm(&q[i0 * d..(i0 + br) * d], br, d);
        let acc = &mut o[i0 * dv..(i0 + br) * dv];
        m[..br].fill(T::neg_infinity());
        l[..br].fill(T::zero());
        let kend = if opts.causal { i0 + br } else { n };
        let mut j0 = 0;
        while j0 < kend {
            let bc = BLOCK_K.min(kend - j0);
            let st = &mut s[..br * bc];
            matmul(rm_mut(st, br, bc), false, qb, rm(&k[j0 * d..(j0 + bc) * d], bc, d).transpose(), tau, Par::Seq);
            if opts.causal {
                mask_causal(st, br, bc, i0, j0);
            }
            for r in 0..br {
                let row = &mut st[r * bc..(r + 1) * bc];
                let rmax = row.iter().copied().fold(T::neg_infinity(), T::max);
                let m_new = m[r].max(rmax);
                // every row sees at least key 0 (causal keeps the diagonal), so m_new is finite
                for x in row.iter_mut() {
                    *x -= m_new;
                }
                T::exp_inplace(row);
                let rescale = (m[r] - m_new).exp();
                let sum: T = row.iter().copied().sum();
                l[r] = l[r] * rescale + sum;
                m[r] = m_new;
                if rescale != T::one() {
                    for x in &mut acc[r * dv..(r + 1) * dv] {
                        *x *= rescale;
                    }
                }
            }
            matmul(
                rm_mut(acc, br, dv),
                true,
                rm(st, br, bc),
                rm(&v[j0 * dv..(j0 + bc) * dv], bc, dv),
                T::one(),
                Par::Seq,
            );
            j0 += bc;
        }
        for r in 0..br {
            let inv = T::one() / l[r];
            for x in &mut acc[r * dv..(r + 1) * dv] {
                *x *= inv;
            }
            lse[i0 + r] = m[r] + l[r].ln();
        }
        i0 += br;
    }
    (o, lse)
}

#[allow(clippy::useless_vec)]
/// Backward of one head. Inputs as in [`forward_head`] plus `o [n, dv]`, `lse [n]` from it and
/// `g = dL/do [n, dv]`; returns `(dq [n, d], dk [n, d], dv [n, dv])`.
#[allow(clippy::too_many_arguments)]
pub fn backward_head<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    g: &[T],
    n: usize,
    d: usize,
    dv: usize,
    opts: &AttnOptions,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let tau = T::from_f64(opts.scale);
    // δ_i = Σ_c G_ic O_ic
    let delta: Vec<T> =
        g.chunks_exact(dv).zip(o.chunks_exact(dv)).map(|(a, b)| a.iter().zip(b).map(|(x, y)| *x * *y).sum()).collect();
    let mut dq = vec![T::zero(); n * d];
    let mut dk = vec![T::zero(); n * d];
    let mut dvv = vec![T::zero(); n * dv];
    let mut p = vec![T::zero(); BLOCK_Q * BLOCK_K];
    let mut dp = vec![T::zero(); BLOCK_Q * BLOCK_K];
    let mut j0 = 0;
    while j0 < n {
        let bc = BLOCK_K.min(n - j0);
        let kb = rm(&k[j0 * d..(j0 + bc) * d], bc, d);
        let vb = rm(&v[j0 * dv..(j0 + bc) * dv], bc, dv);
        let (dk_b, dv_b) = (&mut dk[j0 * d..(j0 + bc) * d], &mut dvv[j0 * dv..(j0 + bc) * dv]);
        // causal: query rows i ≥ j0 only; start at the query block containing j0
        let mut i0 = if opts.causal { (j0 / BLOCK_Q) * BLOCK_Q } else { 0 };
        while i0 < n {
            let br = BLOCK_Q.min(n - i0);
            let qb = rm(&q[i0 * d..(i0 + br) * d], br, d);
            let gb = rm(&g[i0 * dv..(i0 + br) * dv], br, dv);
            let pt = &mut p[..br * bc];
            let dpt = &mut dp[..br * bc];
            matmul(rm_mut(pt, br, bc), false, qb, kb.transpose(), tau, Par::Seq);
            if opts.causal {
                mask_causal(pt, br, bc, i0, j0);
            }
            for r in 0..br {
                let li = lse[i0 + r];
                let row = &mut pt[r * bc..(r + 1) * bc];
                for x in row.iter_mut() {
                    *x -= li;
                }
                T::exp_inplace(row);
            }
            // dV_j += Pᵀ G_i
            matmul(rm_mut(dv_b, bc, dv), true, rm(pt, br, bc).transpose(), gb, T::one(), Par::Seq);
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
            matmul(rm_mut(&mut dq[i0 * d..(i0 + br) * d], br, d), true, rm(dpt, br, bc), kb, tau, Par::Seq);
            matmul(rm_mut(dk_b, bc, d), true, rm(dpt, br, bc).transpose(), qb, tau, Par::Seq);
            i0 += br;
        }
        j0 += bc;
    }
    (dq, dk, dvv)
}
