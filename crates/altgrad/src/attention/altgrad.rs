//! ALTGrad: LSSSZ's Algorithm 1 for one attention layer, in Q/K/V form and in the paper's W-form
//! (MATH §5; LSSSZ = Liang, Sha, Shi, Song, Zhou, arXiv 2408.13233 v2).
//!
//! The paper keeps the **exact** gradient formula of softmax attention and replaces the attention
//! matrix by its low-rank approximation `f̃ = D̃⁻¹ Φ_Q Φ_Kᵀ` (masked under the causal mask):
//!
//! ```text
//! Õ  = f̃ V                                  (forward, Lemma C.13 / I.1)
//! δ_i = G_i·Õ_i                              (Def D.16, LSSSZ's K)
//! p₁ = f̃ ∘ (G Vᵀ)                            (Def C.12; low rank r·d_v by Fact C.2)
//! p₂ = diag(δ) f̃                             (Lemma C.16; low rank r)
//! p  = p₁ − p₂
//! dQ = τ p K,  dK = τ pᵀ Q,  dV = f̃ᵀ G       (τ restored, MATH §5.4 correction 4;
//!                                              fᵀ in dV, correction 1)
//! ```
//!
//! `Φ_Q` rows are `ψ_i = w(i) ∘ φ(√τ q_i)` with the row shift of MATH §3 (block `t` weighted by
//! `T_{g−t}(−m_i)`, `m_i = τ q_i·(k̄_i − c)`) unless `center` is off, and `Φ_K` rows are
//! `φ(√τ (k_j − c))` with the reference point `c` of MATH §3 (0 without centering), so
//! `ψ_i·φ_j = T_g(τ q_i·(k_j − k̄_i))`. `dQ = τ p (K − 1cᵀ)`, which equals `τ p K` because the rows
//! of `p` sum to zero, without the cancellation of `τ p K` when the keys share a large vector. The shift is **not** differentiated: the formula is applied as
//! is (for exact softmax the shift has no effect, so its chain-rule term vanishes in the limit).
//!
//! **Fact C.2 without the n × r·d_v factor.** `p₁ Y = ((D̃⁻¹Φ_Q) ⊘ G)·((Φ_K ⊘ V)ᵀ Y)` where
//! `(Φ_K ⊘ V)ᵀ Y = Σ_j (φ_j ⊗ v_j) y_jᵀ` is an `(r·d_v) × w` matrix. Its entries
//! `[(a, b), c] = Σ_j φ_ja v_jb y_jc` are stored as the `r × (d_v·w)` matrix `Φ_Kᵀ (V ⊘ Y)`
//! (same numbers, index `(a,b),c ↔ a,(b,c)`), accumulated chunk by chunk with one GEMM of a
//! `C × r` feature chunk and the `C × d_v·w` Kronecker rows `V_c ⊘ Y_c`; row `i` of `p₁ Y` is then
//! `Σ_b G_ib [(ψ_i/den_i)ᵀ W]_{(b, ·)}`. No `n × r·d_v` (nor `C × r·d_v`) matrix is formed.
//! `p₂` rides in the same product: with `V' = [V 1]` and `G' = [G −δ]`, `G'_i·V'_j = G_i·v_j − δ_i`,
//! so `p = f̃ ∘ (G' V'ᵀ)` and the last block of `W = (Φ_K ⊘ V')ᵀ Y` is `Φ_Kᵀ Y`, i.e. exactly
//! `p₂ Y = diag(δ) D̃⁻¹Φ_Q (Φ_Kᵀ Y)` of Lemma C.16. The transposed product
//! `pᵀ Y = (Φ_K ⊘ V')·((D̃⁻¹Φ_Q ⊘ G')ᵀ Y)` is the same construction with the roles swapped.
//!
//! **Causal (Lemmas I.3–I.8; MATH §5.4 correction 3).** Chunks of `C` rows. `(M∘UVᵀ)Y` uses
//! prefix states over earlier chunks (a forward scan); `(M∘UVᵀ)ᵀY` uses **suffix** states over
//! later chunks (a reverse scan). The diagonal `C × C` block is computed directly and masked:
//! `a_ij = T_g(s_ij − m_i)`, `P = F ∘ (G' V'ᵀ)` with `F = D̃⁻¹A`.
//!
//! Cost per head: forward O(n·r·d_v); backward `8·n·r·(d_v+1)·w` FLOPs in four GEMMs (MATH §7's
//! `4·n·r·d_v·d` counts multiply-adds), `w = d` in Q/K/V form. Memory: two `r × (d_v+1)·w`
//! states ([`kron_state_len`], capped at [`MAX_KRON_STATE`]) plus `O(C·(r + (d_v+1)·w))` scratch.
//!
//! The forward is polynomial attention's ([`super::poly`]); this module is the Kronecker backward,
//! built on the polynomial kernel's feature, shift and intra-chunk pieces.

use super::features::FeatureMap;
use super::poly::{self, taylor_coefs, Bufs, Head, KvHead, PolyOptions, PolyOutput, PolySaved, QueryBack};
use super::view::{Rows, RowsMut};
use super::workspace::{fit, Pooled, Workspace};
use super::{query_head_grads, sum_groups, AttnGrads, AttnGradsMut, AttnOptions, AttnShape, Qkv};
use crate::linalg::{matmul, par_all, rm, rm_mut, Scalar};
use crate::{Error, Result};
use faer::Par;
use rayon::prelude::*;

/// Largest Kronecker state `r·(d_v+1)·w` (values) the backward accepts: `2²⁵` ≈ 33.5 million
/// values, 256 MiB in f64 per state (each head holds two).
pub const MAX_KRON_STATE: usize = 1 << 25;

/// Number of values in one Kronecker state `(Φ_K ⊘ [V 1])ᵀ Y` of the backward: `r·(d_v+1)·w`
/// for feature width `r`, value width `d_v` and `w` columns of `Y` (`w = head_dim` in Q/K/V form,
/// the hidden width in the W-form). `None` on overflow.
pub fn kron_state_len(r: usize, dv: usize, w: usize) -> Option<usize> {
    r.checked_mul(dv.checked_add(1)?)?.checked_mul(w)
}

/// Errors: [`Error::BadInput`] (input `"degree"`) when [`kron_state_len`] exceeds [`MAX_KRON_STATE`].
fn check_kron(r: usize, dv: usize, w: usize, g: usize) -> Result<()> {
    match kron_state_len(r, dv, w) {
        Some(len) if len <= MAX_KRON_STATE => Ok(()),
        len => Err(Error::bad(
            "degree",
            format!(
                "altgrad's Kronecker state r·(d_v+1)·w = {r}·{}·{w} = {} values (degree {g}) is above the limit \
                 {MAX_KRON_STATE}: use a lower degree, the poly method or exact attention",
                dv + 1,
                len.map_or_else(|| "overflow".to_string(), |l| l.to_string())
            ),
        )),
    }
}

/// The Kronecker backward of one head, on the polynomial kernel's [`Head`]. Inputs are views:
/// `q [n, d]`, `o [n, dv]`, `g = dL/do [n, dv]`, row shifts `m [n]` (zeros when `!center`);
/// `Y` matrices (`rmat`, `lmat`) are `[n, w]`.
#[derive(Clone, Copy)]
struct Kron<'h, 'a, T> {
    head: &'h Head<'a, T>,
}

/// Per-chunk scratch: the polynomial kernel's plus the Fact C.2 rows.
#[derive(Debug, Default)]
pub(crate) struct KBufs<T> {
    p: Bufs<T>,
    pa: Vec<T>,
    ge: Vec<T>,
    kr: Vec<T>,
    big: Vec<T>,
    inv: Vec<T>,
}

impl<T: Scalar> Kron<'_, '_, T> {
    fn r(&self) -> usize {
        self.head.r()
    }
    fn e(&self) -> usize {
        self.head.e()
    }

    /// Scratch for `n` rows and Kronecker widths up to `ew` (`(d_v+1)·w`), from the workspace.
    fn bufs(&self, n: usize, ew: usize) -> Pooled<'_, KBufs<T>> {
        let c = self.head.c(n);
        Pooled::get(Some(&self.head.ws.kron), |b: &mut KBufs<T>| {
            self.head.fit_bufs(&mut b.p, n);
            for (v, len) in [
                (&mut b.pa, c * c),
                (&mut b.ge, c * self.e()),
                (&mut b.kr, c * ew),
                (&mut b.big, c * ew),
                (&mut b.inv, c),
            ] {
                fit(v, len);
            }
        })
    }

    /// `b.ge [rows, e] = [G −δ]` with `δ_i = G_i·O_i` (LSSSZ Def D.16).
    fn aug_g(&self, g: Rows<'_, T>, o: Rows<'_, T>, b: &mut KBufs<T>) {
        let (dv, e) = (self.head.dv, self.e());
        for i in 0..g.rows() {
            let (gi, oi) = (g.row(i), o.row(i));
            let delta: T = gi.iter().zip(oi).map(|(a, b)| *a * *b).sum();
            let dst = &mut b.ge[i * e..(i + 1) * e];
            dst[..dv].copy_from_slice(gi);
            dst[dv] = -delta;
        }
    }

    /// `b.inv[i] = 1/den_i` and `Ψᵀ` columns scaled by it (`Ψᵀ → (D̃⁻¹Ψ)ᵀ`).
    fn normalize_psi(&self, den: &[T], rows: usize, weighted: bool, b: &mut KBufs<T>) {
        let inv = &mut b.inv[..rows];
        for (x, dn) in inv.iter_mut().zip(den) {
            *x = T::one() / *dn;
        }
        for row in self.head.psi_mut(&mut b.p, rows, weighted).chunks_exact_mut(rows) {
            for (x, s) in row.iter_mut().zip(inv.iter()) {
                *x *= *s;
            }
        }
    }

    /// Key side of the non-causal backward, one key/value head: the Fact C.2 state
    /// `W = (Φ_K ⊘ [V 1])ᵀ R` stored as `[r, e·wr]` (entry `[a, b·wr + c] = Σ_j φ_ja v'_jb r_jc`).
    fn key_kron(&self, kv: &KvHead<'_, T>, rmat: Rows<'_, T>) -> Vec<T> {
        let (r, e, wr, n) = (self.r(), self.e(), rmat.cols(), kv.k.rows());
        let ew = e * wr;
        let mut pooled = self.bufs(n, ew);
        let b = &mut *pooled;
        let mut w = vec![T::zero(); r * ew];
        for (j0, cn) in self.head.chunks(n) {
            self.head.key_features(kv, j0, cn, &mut b.p);
            self.head.aug_v(kv.v.sub(j0, cn), &mut b.p.ve);
            kron_rows(&b.p.ve, e, rmat.sub(j0, cn), &mut b.kr);
            let phit = rm(&b.p.phit[..r * cn], r, cn);
            matmul(rm_mut(&mut w, r, ew), true, phit, rm(&b.kr[..cn * ew], cn, ew), T::one(), Par::Seq);
        }
        w
    }

    /// Query side of the non-causal backward, one query head `x`, given
    /// [`key_kron`](Self::key_kron)'s `wk` (for `R [n, wr]`) and `L [n, wl]`. Adds `p R` into
    /// `pr [n, wr]`; returns `(Z = (D̃⁻¹Φ_Q ⊘ [G −δ])ᵀ L [r, e·wl], U = (D̃⁻¹Φ_Q)ᵀ G [r, dv])`.
    fn backward_queries(
        &self,
        x: &QueryBack<'_, T>,
        wk: &[T],
        lmat: Rows<'_, T>,
        pr: &mut RowsMut<'_, T>,
    ) -> (Vec<T>, Vec<T>) {
        let QueryBack { q, m, o, den, g } = *x;
        let (n, r, e, dv) = (q.rows(), self.r(), self.e(), self.head.dv);
        let (wr, wl) = (wk.len() / (r * e), lmat.cols());
        let mut pooled = self.bufs(n, e * wr.max(wl));
        let b = &mut *pooled;
        let weighted = self.head.weighted(m);
        let mut zq = vec![T::zero(); r * e * wl];
        let mut u = vec![T::zero(); r * dv];
        for (i0, cn) in self.head.chunks(n) {
            self.head.query_features(q.sub(i0, cn), &m[i0..], weighted, &mut b.p);
            self.normalize_psi(&den[i0..i0 + cn], cn, weighted, b);
            self.aug_g(g.sub(i0, cn), o.sub(i0, cn), b);
            self.apply_left(b, cn, weighted, wk, wr, &mut pr.sub_mut(i0, cn));
            self.accumulate_right(b, cn, weighted, lmat.sub(i0, cn), g.sub(i0, cn), &mut zq, &mut u);
        }
        (zq, u)
    }

    /// Key side of the non-causal backward, one key/value head, given the sums over its query heads
    /// of [`backward_queries`](Self::backward_queries)' `Z` and `U`: adds `pᵀL` into `ptl [n, wl]`
    /// and `f̃ᵀG` into `dv [n, dv]`.
    fn backward_keys(&self, kv: &KvHead<'_, T>, zq: &[T], u: &[T], ptl: &mut RowsMut<'_, T>, dv: &mut RowsMut<'_, T>) {
        let n = kv.k.rows();
        let wl = zq.len() / (self.r() * self.e());
        let mut pooled = self.bufs(n, self.e() * wl);
        let b = &mut *pooled;
        for (j0, cn) in self.head.chunks(n) {
            self.head.key_features(kv, j0, cn, &mut b.p);
            self.head.aug_v(kv.v.sub(j0, cn), &mut b.p.ve);
            self.apply_right(b, cn, zq, u, wl, &mut ptl.sub_mut(j0, cn), &mut dv.sub_mut(j0, cn));
        }
    }

    /// `out [rows, wr] += Σ_b G'_ib [(D̃⁻¹ψ_i)ᵀ W]_{b·wr..}` — rows of `p Y` through a state
    /// `W = (Φ_K ⊘ V')ᵀ Y` (Fact C.2). Needs `Ψᵀ` normalized and `b.ge`.
    #[allow(clippy::too_many_arguments)]
    fn apply_left(&self, b: &mut KBufs<T>, rows: usize, weighted: bool, w: &[T], wr: usize, out: &mut RowsMut<'_, T>) {
        let (r, e) = (self.r(), self.e());
        let ew = e * wr;
        let psi = rm(self.head.psi(&b.p, rows, weighted), r, rows).transpose();
        matmul(rm_mut(&mut b.big[..rows * ew], rows, ew), false, psi, rm(w, r, ew), T::one(), Par::Seq);
        contract_rows(&b.big, &b.ge, e, wr, out);
    }

    /// `Z += (D̃⁻¹Ψ)ᵀ (G' ⊘ L)`, `U += (D̃⁻¹Ψ)ᵀ G` for this chunk's rows. Needs `Ψᵀ` normalized
    /// and `b.ge`; `l [rows, wl]`, `g [rows, dv]`.
    #[allow(clippy::too_many_arguments)]
    fn accumulate_right(
        &self,
        b: &mut KBufs<T>,
        rows: usize,
        weighted: bool,
        l: Rows<'_, T>,
        g: Rows<'_, T>,
        zq: &mut [T],
        u: &mut [T],
    ) {
        let (r, e, dv) = (self.r(), self.e(), self.head.dv);
        let ew = e * l.cols();
        kron_rows(&b.ge, e, l, &mut b.kr);
        let psit = rm(self.head.psi(&b.p, rows, weighted), r, rows);
        matmul(rm_mut(zq, r, ew), true, psit, rm(&b.kr[..rows * ew], rows, ew), T::one(), Par::Seq);
        matmul(rm_mut(u, r, dv), true, psit, g.mat(), T::one(), Par::Seq);
    }

    /// `ptl [rows, wl] += Σ_b V'_jb [φ_jᵀ Z]_{b·wl..}` and `dv [rows, dv] += φ_jᵀ U`: rows of `pᵀY`
    /// and `f̃ᵀG` through the states `Z`, `U`. Needs `b.p.phit` (keys) and `b.p.ve`.
    #[allow(clippy::too_many_arguments)]
    fn apply_right(
        &self,
        b: &mut KBufs<T>,
        rows: usize,
        zq: &[T],
        u: &[T],
        wl: usize,
        ptl: &mut RowsMut<'_, T>,
        dv: &mut RowsMut<'_, T>,
    ) {
        let (r, e, dvw) = (self.r(), self.e(), self.head.dv);
        let ew = e * wl;
        let phi = rm(&b.p.phit[..r * rows], r, rows).transpose();
        matmul(rm_mut(&mut b.big[..rows * ew], rows, ew), false, phi, rm(zq, r, ew), T::one(), Par::Seq);
        contract_rows(&b.big, &b.p.ve, e, wl, ptl);
        matmul(dv.mat_mut(), true, phi, rm(u, r, dvw), T::one(), Par::Seq);
    }

    /// Causal backward of one query head `x` (Lemmas I.3–I.8): a forward scan
    /// with the prefix state `W = Σ (φ_j ⊗ v'_j) r_jᵀ` gives `p R` and every diagonal-block term; a
    /// reverse scan with suffix states `Z = Σ (ψ̂_i ⊗ g'_i) l_iᵀ`, `U = Σ ψ̂_i g_iᵀ` over later
    /// chunks gives `pᵀ L` and `f̃ᵀ G`. Adds into `pr [n, wr]`, `ptl [n, wl]`, `dv [n, dv]`.
    #[allow(clippy::too_many_arguments)]
    fn backward_causal(
        &self,
        x: &QueryBack<'_, T>,
        kv: &KvHead<'_, T>,
        rmat: Rows<'_, T>,
        lmat: Rows<'_, T>,
        pr: &mut RowsMut<'_, T>,
        ptl: &mut RowsMut<'_, T>,
        dv: &mut RowsMut<'_, T>,
    ) {
        let QueryBack { q, m, o, den, g } = *x;
        let (n, d, r, e) = (q.rows(), self.head.d(), self.r(), self.e());
        let (wr, wl) = (rmat.cols(), lmat.cols());
        let (ewr, ewl) = (e * wr, e * wl);
        let weighted = self.head.weighted(m);
        let coef = taylor_coefs::<T>(self.head.fm.degree());
        let mut pooled = self.bufs(n, ewr.max(ewl));
        let b = &mut *pooled;
        // Forward scan: the prefix state.
        let mut w = vec![T::zero(); r * ewr];
        for (i0, cn) in self.head.chunks(n) {
            let qc = q.sub(i0, cn);
            self.head.query_features(qc, &m[i0..], weighted, &mut b.p);
            self.normalize_psi(&den[i0..i0 + cn], cn, weighted, b);
            // diagonal block: F = D̃⁻¹ A, a_ij = T_g(τ q_i·(k_j − c) − m_i) for j ≤ i
            self.head.transpose_scaled(kv.k.sub(i0, cn), kv.shift(), &mut b.p.xtk);
            self.head.intra_scores(qc, &b.p.xtk, &mut b.p.s);
            self.head.intra_weights(&coef, &m[i0..i0 + cn], cn, &mut b.p, None);
            for (row, s) in b.p.s[..cn * cn].chunks_exact_mut(cn).zip(&b.inv[..cn]) {
                for x in row {
                    *x *= *s;
                }
            }
            self.aug_g(g.sub(i0, cn), o.sub(i0, cn), b);
            self.head.aug_v(kv.v.sub(i0, cn), &mut b.p.ve);
            // inter-chunk: rows of p R through the prefix state
            self.apply_left(b, cn, weighted, &w, wr, &mut pr.sub_mut(i0, cn));
            // diagonal block: P = F ∘ (G' V'ᵀ) (masked through F)
            let (ge, ve) = (rm(&b.ge[..cn * e], cn, e), rm(&b.p.ve[..cn * e], cn, e));
            matmul(rm_mut(&mut b.pa[..cn * cn], cn, cn), false, ge, ve.transpose(), T::one(), Par::Seq);
            for (x, f) in b.pa[..cn * cn].iter_mut().zip(&b.p.s[..cn * cn]) {
                *x *= *f;
            }
            let (pm, fm) = (rm(&b.pa[..cn * cn], cn, cn), rm(&b.p.s[..cn * cn], cn, cn));
            matmul(pr.sub_mut(i0, cn).mat_mut(), true, pm, rmat.sub(i0, cn).mat(), T::one(), Par::Seq);
            matmul(ptl.sub_mut(i0, cn).mat_mut(), true, pm.transpose(), lmat.sub(i0, cn).mat(), T::one(), Par::Seq);
            matmul(dv.sub_mut(i0, cn).mat_mut(), true, fm.transpose(), g.sub(i0, cn).mat(), T::one(), Par::Seq);
            // prefix state += this chunk's keys
            self.head.fm.apply_cols(&b.p.xtk[..cn * d], cn, &mut b.p.phit[..cn * r]);
            kron_rows(&b.p.ve, e, rmat.sub(i0, cn), &mut b.kr);
            let phit = rm(&b.p.phit[..r * cn], r, cn);
            matmul(rm_mut(&mut w, r, ewr), true, phit, rm(&b.kr[..cn * ewr], cn, ewr), T::one(), Par::Seq);
        }
        drop(w);
        // Reverse scan: suffix states over later chunks (MATH §5.4 correction 3).
        let mut zq = vec![T::zero(); r * ewl];
        let mut u = vec![T::zero(); r * self.head.dv];
        for (i0, cn) in self.head.chunks(n).rev() {
            self.head.key_features(kv, i0, cn, &mut b.p);
            self.head.aug_v(kv.v.sub(i0, cn), &mut b.p.ve);
            self.apply_right(b, cn, &zq, &u, wl, &mut ptl.sub_mut(i0, cn), &mut dv.sub_mut(i0, cn));
            self.head.query_features(q.sub(i0, cn), &m[i0..], weighted, &mut b.p);
            self.normalize_psi(&den[i0..i0 + cn], cn, weighted, b);
            self.aug_g(g.sub(i0, cn), o.sub(i0, cn), b);
            self.accumulate_right(b, cn, weighted, lmat.sub(i0, cn), g.sub(i0, cn), &mut zq, &mut u);
        }
    }
}

/// Row-wise Kronecker product (LSSSZ Fact C.2's `⊘`): `out [rows, ea·wb]` with
/// `out[i, b·wb + c] = a[i, b] · y[i, c]` for `a [rows, ea]`, `y [rows, wb]`.
fn kron_rows<T: Scalar>(a: &[T], ea: usize, y: Rows<'_, T>, out: &mut [T]) {
    let wb = y.cols();
    for i in 0..y.rows() {
        let (ai, yi) = (&a[i * ea..(i + 1) * ea], y.row(i));
        for (blk, av) in out[i * ea * wb..(i + 1) * ea * wb].chunks_exact_mut(wb).zip(ai) {
            for (x, yv) in blk.iter_mut().zip(yi) {
                *x = *av * *yv;
            }
        }
    }
}

/// `out[i, c] += Σ_b a[i, b] · x[i, b·wb + c]` for `x [rows, ea·wb]`, `a [rows, ea]`, `out [rows, wb]`:
/// the contraction that finishes a Fact C.2 product.
fn contract_rows<T: Scalar>(x: &[T], a: &[T], ea: usize, wb: usize, out: &mut RowsMut<'_, T>) {
    for i in 0..out.rows() {
        let (xi, ai) = (&x[i * ea * wb..(i + 1) * ea * wb], &a[i * ea..(i + 1) * ea]);
        let oi = out.row_mut(i);
        for (blk, av) in xi.chunks_exact(wb).zip(ai) {
            for (o, xv) in oi.iter_mut().zip(blk) {
                *o += *av * *xv;
            }
        }
    }
}

/// Multiplies every entry of `x` by `s`.
fn scale_rows<T: Scalar>(x: &mut RowsMut<'_, T>, s: T) {
    for i in 0..x.rows() {
        for v in x.row_mut(i) {
            *v *= s;
        }
    }
}

/// `k − c` of a key/value head, contiguous `[n, d]`: the `R` of `dQ = τ p (K − 1cᵀ)`.
fn shifted_keys<T: Scalar>(kv: &KvHead<'_, T>) -> Vec<T> {
    let mut out = kv.k.to_vec();
    for row in out.chunks_exact_mut(kv.k.cols()) {
        for (x, c) in row.iter_mut().zip(&kv.c) {
            *x -= *c;
        }
    }
    out
}

/// ALTGrad backward of one query head against its own key/value head (no GQA sharing of the key
/// side), given the forward's `den [n]`: `dq += τ p (K − c)`, `dk += τ pᵀ Q`, `dv += f̃ᵀ G`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_one<T: Scalar>(
    head: &Head<'_, T>,
    q: Rows<'_, T>,
    kv: &KvHead<'_, T>,
    causal: bool,
    o: Rows<'_, T>,
    den: &[T],
    g: Rows<'_, T>,
    dq: &mut RowsMut<'_, T>,
    dk: &mut RowsMut<'_, T>,
    dv: &mut RowsMut<'_, T>,
) {
    let kron = Kron { head };
    let m = poly::row_shifts(q, &kv.kbar, head.scale, head.center);
    let ks = shifted_keys(kv);
    let rk = Rows::contiguous(&ks, kv.k.rows(), kv.k.cols());
    if causal {
        kron.backward_causal(&QueryBack { q, m: &m, o, den, g }, kv, rk, q, dq, dk, dv);
    } else {
        let wk = kron.key_kron(kv, rk);
        let (zq, u) = kron.backward_queries(&QueryBack { q, m: &m, o, den, g }, &wk, q, dq);
        kron.backward_keys(kv, &zq, &u, dk, dv);
    }
    let tau = T::from_f64(head.scale);
    scale_rows(dq, tau);
    scale_rows(dk, tau);
}

/// Checks that ALTGrad's backward can run for `shape` and `popts` before any work: the Kronecker
/// state `r·(d_v+1)·d` must not exceed [`MAX_KRON_STATE`] (policies and plans call this before
/// the forward, which is [`super::forward_poly`]).
///
/// Errors: [`Error::BadInput`] (input `"degree"`) above the limit.
pub fn check_kron_state(shape: &AttnShape, popts: &PolyOptions) -> Result<()> {
    match super::features::feature_dim(shape.head_dim, popts.degree) {
        Some(r) => check_kron(r, shape.head_dim_v, shape.head_dim, popts.degree),
        None => Ok(()), // the feature map reports the overflow
    }
}

/// ALTGrad backward, the paper's Algorithm 1 for one layer in Q/K/V form (MATH §5; LSSSZ Def C.12,
/// Fact C.2, Lemma C.16, Def D.16, Lemmas I.3–I.8, with MATH §5.4's corrections): the exact
/// softmax-gradient formula with `f̃` in place of softmax, `p = f̃ ∘ (G Vᵀ) − diag(δ) f̃`,
/// `dQ = τ p K` (formed as `τ p (K − 1cᵀ)`, equal since the rows of `p` sum to zero),
/// `dK = τ pᵀ Q`, `dV = f̃ᵀ G`, no chain rule through the row shift. It is **not** the gradient of
/// the forward (that is [`super::backward_poly`]); it tends to the exact gradient as the degree
/// rises. `fwd` must come from [`super::forward_poly`] on the same inputs (ALTGrad's forward is
/// polynomial attention's; its shape, options and denominators are used);
/// `dout = dL/do [seq_len, num_heads, head_dim_v]`. O(n·r·d_v·d) per head; GQA `dk`, `dv` summed
/// over each group.
///
/// Errors: [`Error::BadInput`] when `fwd` was computed for another shape, `fwd`/`dout` have the
/// wrong sizes, or the Kronecker state `r·(d_v+1)·d` exceeds [`MAX_KRON_STATE`] (checked first).
pub fn backward_altgrad<T: Scalar>(x: &Qkv<'_, T>, fwd: &PolyOutput<T>, dout: &[T]) -> Result<AttnGrads<T>> {
    let mut grads = AttnGrads::zeros(x.shape());
    backward_altgrad_into(x, &fwd.saved, &fwd.o, &fwd.den, dout, grads.as_mut(), &Workspace::new())?;
    Ok(grads)
}

/// [`backward_altgrad`] from a polynomial forward's [`PolySaved`] and its caller-owned `o` and
/// `den`, into caller-owned gradients (overwritten), with scratch from `ws`.
///
/// Errors: as [`backward_altgrad`], or [`Error::BadInput`] naming a buffer of the wrong length.
pub fn backward_altgrad_into<T: Scalar>(
    x: &Qkv<'_, T>,
    fwd: &PolySaved<T>,
    o: &[T],
    den: &[T],
    dout: &[T],
    mut grads: AttnGradsMut<'_, T>,
    ws: &Workspace<T>,
) -> Result<()> {
    check_kron_state(&fwd.shape, &fwd.popts)?;
    let fm = poly::check_saved(x, fwd, o, den, dout)?;
    let (s, opts, popts) = (fwd.shape, fwd.opts, fwd.popts);
    grads.check(&s)?;
    let (n, d, dv) = (s.seq_len, s.head_dim, s.head_dim_v);
    let head = Head { fm: &fm, dv, scale: opts.scale, center: popts.center, chunk: popts.chunk, ws };
    if fwd.initial.is_some() {
        return Err(Error::bad(
            "fwd",
            "ALTGrad's backward does not continue a state: run the sequence in one call (or use backward_poly_state)",
        ));
    }
    let kvs = poly::kv_heads(x, opts.is_causal(), &popts, Some(&fwd.reference), None, None);
    let view = |h: usize| (s.query(x.q(), h), s.out(o, h), s.out(dout, h), &den[h * n..(h + 1) * n]);
    if opts.is_causal() {
        query_head_grads(&s, &mut grads, |h, dq, dk, dvh| {
            let (qh, oh, gh, dh) = view(h);
            backward_one(&head, qh, &kvs[h / s.group()], true, oh, dh, gh, dq, dk, dvh);
            Ok(())
        })?;
        return Ok(());
    }
    // Non-causal: key-side states per key/value head, then query heads, then one key pass per
    // key/value head with the group's summed states.
    grads.zero();
    let kron = Kron { head: &head };
    let tau = T::from_f64(opts.scale);
    let nk = s.kv_len;
    let shifted: Vec<Vec<T>> = kvs.par_iter().map(shifted_keys).collect();
    let key_states: Vec<Vec<T>> =
        kvs.par_iter().zip(&shifted).map(|(kv, ks)| kron.key_kron(kv, Rows::contiguous(ks, nk, d))).collect();
    let per_head: Vec<(Vec<T>, Vec<T>)> = s
        .query_views(grads.dq, d)
        .into_par_iter()
        .enumerate()
        .map(|(h, mut dqh)| {
            let (qh, oh, gh, dh) = view(h);
            let kv = &kvs[h / s.group()];
            let m = poly::row_shifts(qh, &kv.kbar, opts.scale, popts.center);
            let x = QueryBack { q: qh, m: &m, o: oh, den: dh, g: gh };
            let zu = kron.backward_queries(&x, &key_states[h / s.group()], qh, &mut dqh);
            scale_rows(&mut dqh, tau);
            zu
        })
        .collect();
    drop(key_states);
    let sums = sum_groups(per_head, s.group());
    let dks = s.kv_views(grads.dk, d);
    let dvs = s.kv_views(grads.dv, dv);
    dks.into_par_iter().zip(dvs).zip(kvs.par_iter().zip(sums.par_iter())).for_each(
        |((mut dkh, mut dvh), (kv, (zq, u)))| {
            kron.backward_keys(kv, zq, u, &mut dkh, &mut dvh);
            scale_rows(&mut dkh, tau);
        },
    );
    Ok(())
}

/// Gradients of one attention layer in the paper's W-form (LSSSZ Lemmas D.17, F.4, G.3, with
/// MATH §5.4's corrections), from [`one_layer_w_form`].
#[derive(Clone, Debug)]
pub struct WFormGrads<T> {
    /// The layer output `Õ = f̃ X W_V`, `[n, dv]`.
    pub o: Vec<T>,
    /// `dL/dW = τ Xᵀ p X` for `W = W_Q W_Kᵀ` (Lemma F.4 with τ restored), `[hdim, hdim]`.
    pub dw: Vec<T>,
    /// `dL/dW_V = Xᵀ f̃ᵀ G` (Lemma G.3 corrected: the paper prints `Xᵀ f G`), `[hdim, dv]`.
    pub dw_v: Vec<T>,
    /// `dL/dX = τ (p X Wᵀ + pᵀ X W) + f̃ᵀ G W_Vᵀ` (Lemma D.17 corrected), `[n, hdim]`.
    pub dx: Vec<T>,
}

/// One attention layer `L = ⟨G, f̃(X) X W_V⟩` with `f̃ ≈ softmax(τ X W_Q W_Kᵀ Xᵀ)` (masked when
/// `opts.mask` is causal), differentiated in the paper's W-form (LSSSZ Def 1.2, Lemmas D.17, F.4, G.3;
/// MATH §5 "Weights", §5.4): single head, `X·W` convention.
///
/// Shapes: `x [n, hdim]`, `w_q`, `w_k [hdim, d]`, `w_v [hdim, dv]`, `g = dL/dÕ [n, dv]`, all
/// row-major. `Q = X W_Q`, `K = X W_K`, `V = X W_V`; `f̃ = D̃⁻¹ Φ_Q Φ_Kᵀ` from the degree-`g`
/// features of `Q`, `K` (row shift when `popts.center`), exactly as [`super::forward_altgrad`].
/// `p = f̃ ∘ (G Vᵀ) − diag(δ) f̃` is applied to `X` through Fact C.2 (`p X`, and `pᵀ X` with
/// suffix sums when causal), never materialized. Cost O(n·r·dv·hdim + n·hdim²).
///
/// Errors: [`Error::BadInput`] on length mismatches, a zero size, a non-positive scale, an odd or
/// zero degree, a zero chunk, or a Kronecker state above [`MAX_KRON_STATE`].
#[allow(clippy::too_many_arguments)]
pub fn one_layer_w_form<T: Scalar>(
    x: &[T],
    w_q: &[T],
    w_k: &[T],
    w_v: &[T],
    g: &[T],
    n: usize,
    hdim: usize,
    d: usize,
    dv: usize,
    opts: &AttnOptions,
    popts: &PolyOptions,
) -> Result<WFormGrads<T>> {
    if n == 0 || hdim == 0 || d == 0 || dv == 0 {
        return Err(Error::bad(
            "w-form shape",
            format!("every size must be positive, got n={n} hdim={hdim} d={d} dv={dv}"),
        ));
    }
    for (name, data, want) in
        [("x", x, n * hdim), ("w_q", w_q, hdim * d), ("w_k", w_k, hdim * d), ("w_v", w_v, hdim * dv), ("g", g, n * dv)]
    {
        if data.len() != want {
            return Err(Error::bad(name, format!("expected {want} values, got {}", data.len())));
        }
    }
    opts.validate()?;
    popts.validate()?;
    let fm = FeatureMap::<T>::new(d, popts.degree)?;
    check_kron(fm.dim(), dv, hdim, popts.degree)?;
    let par = par_all();
    let (one, zero) = (T::one(), T::zero());
    let proj = |w: &[T], width: usize| {
        let mut out = vec![zero; n * width];
        matmul(rm_mut(&mut out, n, width), false, rm(x, n, hdim), rm(w, hdim, width), one, par);
        out
    };
    let (q, k, v) = (proj(w_q, d), proj(w_k, d), proj(w_v, dv));
    let ws = Workspace::new();
    let head = Head { fm: &fm, dv, scale: opts.scale, center: popts.center, chunk: popts.chunk, ws: &ws };
    let kron = Kron { head: &head };
    let (qr, xr) = (Rows::contiguous(&q, n, d), Rows::contiguous(x, n, hdim));
    let (kr, vr) = (Rows::contiguous(&k, n, d), Rows::contiguous(&v, n, dv));
    let causal = poly::poly_mask(opts, &AttnShape::new(n, 1, 1, d).with_head_dim_v(dv), 0)?;
    let kv = poly::kv_head(kr, vr, causal, popts.center, popts.chunk, None, None, 0, Vec::new());
    let m = poly::row_shifts(qr, &kv.kbar, opts.scale, popts.center);
    let (mut o, mut den, mut lse) = (vec![zero; n * dv], vec![zero; n], vec![zero; n]);
    let mut state = vec![zero; head.r() * head.e()];
    if !causal {
        head.kv_state(&kv, &mut state);
    }
    let st = if causal { poly::State::Scan(&mut state) } else { poly::State::Keys(&state) };
    poly::forward_one(&head, qr, &kv, st, &mut RowsMut::contiguous(&mut o, n, dv), &mut lse, &mut den, None);
    let (mut px, mut ptx, mut dvv) = (vec![zero; n * hdim], vec![zero; n * hdim], vec![zero; n * dv]);
    let (or, gr) = (Rows::contiguous(&o, n, dv), Rows::contiguous(g, n, dv));
    let mut pxm = RowsMut::contiguous(&mut px, n, hdim);
    let (mut ptxm, mut dvm) = (RowsMut::contiguous(&mut ptx, n, hdim), RowsMut::contiguous(&mut dvv, n, dv));
    if causal {
        let qb = QueryBack { q: qr, m: &m, o: or, den: &den, g: gr };
        kron.backward_causal(&qb, &kv, xr, xr, &mut pxm, &mut ptxm, &mut dvm);
    } else {
        let wk = kron.key_kron(&kv, xr);
        let qb = QueryBack { q: qr, m: &m, o: or, den: &den, g: gr };
        let (zq, u) = kron.backward_queries(&qb, &wk, xr, &mut pxm);
        drop(wk);
        kron.backward_keys(&kv, &zq, &u, &mut ptxm, &mut dvm);
    }
    let tau = T::from_f64(opts.scale);
    let xm = rm(x, n, hdim);
    // W = W_Q W_Kᵀ
    let mut w = vec![zero; hdim * hdim];
    matmul(rm_mut(&mut w, hdim, hdim), false, rm(w_q, hdim, d), rm(w_k, hdim, d).transpose(), one, par);
    let wm = rm(&w, hdim, hdim);
    let mut dw = vec![zero; hdim * hdim];
    matmul(rm_mut(&mut dw, hdim, hdim), false, xm.transpose(), rm(&px, n, hdim), tau, par);
    let mut dw_v = vec![zero; hdim * dv];
    matmul(rm_mut(&mut dw_v, hdim, dv), false, xm.transpose(), rm(&dvv, n, dv), one, par);
    let mut dx = vec![zero; n * hdim];
    matmul(rm_mut(&mut dx, n, hdim), false, rm(&px, n, hdim), wm.transpose(), tau, par);
    matmul(rm_mut(&mut dx, n, hdim), true, rm(&ptx, n, hdim), wm, tau, par);
    matmul(rm_mut(&mut dx, n, hdim), true, rm(&dvv, n, dv), rm(w_v, hdim, dv).transpose(), one, par);
    Ok(WFormGrads { o, dw, dw_v, dx })
}
