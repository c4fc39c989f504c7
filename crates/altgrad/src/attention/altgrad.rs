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

use super::bound;
use super::features::{taylor, FeatureMap};
use super::poly::PolyOptions;
use super::{check_inputs, combine_grads, gather_head, scatter_heads, AttnGrads, AttnOptions, AttnOutput, AttnShape};
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

/// Degree and chunk checks shared by every entry point. Errors: [`Error::BadInput`] for an odd or
/// zero degree ([`bound::validate_degree`]) or a zero chunk.
fn check_popts(popts: &PolyOptions) -> Result<()> {
    bound::validate_degree(popts.degree)?;
    if popts.chunk == 0 {
        return Err(Error::bad("chunk", "must be at least 1"));
    }
    Ok(())
}

/// One head of an ALTGrad call: the feature map and sizes. Inputs of every method are contiguous
/// row-major `q [n, d]`, `k [n, d]`, `v [n, dv]`, `o [n, dv]`, `g = dL/do [n, dv]`, row shifts
/// `m [n]` (ignored when `!center`); `Y` matrices (`rmat`, `lmat`) are `[n, w]`.
#[derive(Clone, Copy, Debug)]
struct Kernel<'a, T> {
    fm: &'a FeatureMap<T>,
    n: usize,
    dv: usize,
    scale: f64,
    center: bool,
    chunk: usize,
}

/// Per-chunk scratch. Features are feature-major (`[r, rows]`, column `i` = row `i`).
struct Bufs<T> {
    xt: Vec<T>,
    phit: Vec<T>,
    psit: Vec<T>,
    w: Vec<T>,
    a: Vec<T>,
    pa: Vec<T>,
    ve: Vec<T>,
    ge: Vec<T>,
    kr: Vec<T>,
    big: Vec<T>,
    inv: Vec<T>,
}

impl<T: Scalar> Kernel<'_, T> {
    fn d(&self) -> usize {
        self.fm.input_dim()
    }
    fn r(&self) -> usize {
        self.fm.dim()
    }
    fn e(&self) -> usize {
        self.dv + 1
    }
    fn c(&self) -> usize {
        self.chunk.max(1).min(self.n.max(1))
    }

    /// Scratch for Kronecker widths up to `ew` (`(d_v+1)·w`).
    fn bufs(&self, ew: usize) -> Bufs<T> {
        let (c, d, r, e) = (self.c(), self.d(), self.r(), self.e());
        let z = T::zero();
        Bufs {
            xt: vec![z; c * d],
            phit: vec![z; c * r],
            psit: vec![z; c * r],
            w: vec![z; c],
            a: vec![z; c * c],
            pa: vec![z; c * c],
            ve: vec![z; c * e],
            ge: vec![z; c * e],
            kr: vec![z; c * ew],
            big: vec![z; c * ew],
            inv: vec![z; c],
        }
    }

    /// Chunk starts and lengths covering `0..n`.
    fn chunks(&self) -> impl DoubleEndedIterator<Item = (usize, usize)> + '_ {
        let c = self.c();
        (0..self.n.div_ceil(c)).map(move |k| (k * c, c.min(self.n - k * c)))
    }

    /// `phit [r, rows] = φ(√τ x_i)` in column `i`, for `x [rows, d]` (`xt` is scratch).
    fn features(&self, x: &[T], rows: usize, xt: &mut [T], phit: &mut [T]) {
        let (d, r) = (self.d(), self.r());
        let st = T::from_f64(self.scale.sqrt());
        for (i, xr) in x[..rows * d].chunks_exact(d).enumerate() {
            for (c, v) in xr.iter().enumerate() {
                xt[c * rows + i] = *v * st;
            }
        }
        self.fm.apply_cols(&xt[..rows * d], rows, &mut phit[..rows * r]);
    }

    /// `b.psit [r, rows] = Ψᵀ`: `φ(√τ q_i)` with block `t` times `T_{g−t}(−m_i)` when centering
    /// (MATH §3 row shift), so that `ψ_i·φ(√τ k_j) = T_g(s_ij − m_i)`.
    fn query_features(&self, q: &[T], m: &[T], rows: usize, b: &mut Bufs<T>) {
        self.features(q, rows, &mut b.xt, &mut b.psit);
        if !self.center {
            return;
        }
        let g = self.fm.degree();
        for t in 0..=g {
            let w = &mut b.w[..rows];
            for (wi, mi) in w.iter_mut().zip(&m[..rows]) {
                *wi = taylor(g - t, -*mi);
            }
            let blk = self.fm.block(t);
            for row in b.psit[blk.start * rows..blk.end * rows].chunks_exact_mut(rows) {
                for (x, wi) in row.iter_mut().zip(w.iter()) {
                    *x *= *wi;
                }
            }
        }
    }

    /// Diagonal block: `b.a [rows, rows]` = `T_g(τ q_i·k_j − m_i)` for `j ≤ i`, 0 above.
    fn chunk_weights(&self, qc: &[T], kc: &[T], m: &[T], rows: usize, b: &mut Bufs<T>) {
        let (d, g) = (self.d(), self.fm.degree());
        let a = &mut b.a[..rows * rows];
        matmul(
            rm_mut(a, rows, rows),
            false,
            rm(&qc[..rows * d], rows, d),
            rm(&kc[..rows * d], rows, d).transpose(),
            T::from_f64(self.scale),
            Par::Seq,
        );
        for (i, row) in a.chunks_exact_mut(rows).enumerate() {
            let mi = if self.center { m[i] } else { T::zero() };
            for x in &mut row[..=i] {
                *x = taylor(g, *x - mi);
            }
            row[i + 1..].fill(T::zero());
        }
    }

    /// `b.ve [rows, e] = [V 1]`.
    fn aug_v(&self, v: &[T], rows: usize, b: &mut Bufs<T>) {
        let (dv, e) = (self.dv, self.e());
        for (dst, src) in b.ve[..rows * e].chunks_exact_mut(e).zip(v[..rows * dv].chunks_exact(dv)) {
            dst[..dv].copy_from_slice(src);
            dst[dv] = T::one();
        }
    }

    /// `b.ge [rows, e] = [G −δ]` with `δ_i = G_i·O_i` (LSSSZ Def D.16).
    fn aug_g(&self, g: &[T], o: &[T], rows: usize, b: &mut Bufs<T>) {
        let (dv, e) = (self.dv, self.e());
        for i in 0..rows {
            let (gi, oi) = (&g[i * dv..(i + 1) * dv], &o[i * dv..(i + 1) * dv]);
            let delta: T = gi.iter().zip(oi).map(|(a, b)| *a * *b).sum();
            let dst = &mut b.ge[i * e..(i + 1) * e];
            dst[..dv].copy_from_slice(gi);
            dst[dv] = -delta;
        }
    }

    /// `b.inv[i] = 1/den_i` and `b.psit` columns scaled by it (`Ψᵀ → (D̃⁻¹Ψ)ᵀ`).
    fn normalize_psi(&self, den: &[T], rows: usize, b: &mut Bufs<T>) {
        let inv = &mut b.inv[..rows];
        for (x, dn) in inv.iter_mut().zip(den) {
            *x = T::one() / *dn;
        }
        for row in b.psit[..self.r() * rows].chunks_exact_mut(rows) {
            for (x, s) in row.iter_mut().zip(inv.iter()) {
                *x *= *s;
            }
        }
    }

    /// Forward state `S' = Φ_Kᵀ [V 1]`, `[r, e]` (non-causal; one pass over key chunks).
    fn kv_state(&self, k: &[T], v: &[T]) -> Vec<T> {
        let (d, r, e, dv) = (self.d(), self.r(), self.e(), self.dv);
        let mut b = self.bufs(0);
        let mut s = vec![T::zero(); r * e];
        for (j0, cn) in self.chunks() {
            self.features(&k[j0 * d..(j0 + cn) * d], cn, &mut b.xt, &mut b.phit);
            self.aug_v(&v[j0 * dv..], cn, &mut b);
            let (phit, ve) = (rm(&b.phit[..r * cn], r, cn), rm(&b.ve[..cn * e], cn, e));
            matmul(rm_mut(&mut s, r, e), true, phit, ve, T::one(), Par::Seq);
        }
        s
    }

    /// `o_i = y_i[..dv] / y_i[dv]`, `den_i = y_i[dv]` for `y = big[..rows·e]`.
    fn finish(&self, y: &[T], rows: usize, o: &mut [T], den: &mut [T]) {
        let (dv, e) = (self.dv, self.e());
        for i in 0..rows {
            let dn = y[i * e + dv];
            den[i] = dn;
            let inv = T::one() / dn;
            for (x, yv) in o[i * dv..(i + 1) * dv].iter_mut().zip(&y[i * e..i * e + dv]) {
                *x = *yv * inv;
            }
        }
    }

    /// Non-causal forward of one query head from [`kv_state`](Self::kv_state):
    /// `Õ = D̃⁻¹ Φ_Q (Φ_Kᵀ V)`, `den = Φ_Q Φ_Kᵀ 1`. Returns `(o [n, dv], den [n])`.
    fn forward_queries(&self, q: &[T], m: &[T], state: &[T]) -> (Vec<T>, Vec<T>) {
        let (n, d, r, e, dv) = (self.n, self.d(), self.r(), self.e(), self.dv);
        let mut b = self.bufs(e);
        let (mut o, mut den) = (vec![T::zero(); n * dv], vec![T::zero(); n]);
        for (i0, cn) in self.chunks() {
            self.query_features(&q[i0 * d..(i0 + cn) * d], &m[i0..], cn, &mut b);
            let psi = rm(&b.psit[..r * cn], r, cn).transpose();
            matmul(rm_mut(&mut b.big[..cn * e], cn, e), false, psi, rm(state, r, e), T::one(), Par::Seq);
            self.finish(&b.big, cn, &mut o[i0 * dv..], &mut den[i0..]);
        }
        (o, den)
    }

    /// Causal forward of one head: prefix state `Σ_{earlier chunks} φ_j [v_j 1]ᵀ` plus the masked
    /// diagonal block. Returns `(o [n, dv], den [n])`.
    fn forward_causal(&self, q: &[T], k: &[T], v: &[T], m: &[T]) -> (Vec<T>, Vec<T>) {
        let (n, d, r, e, dv) = (self.n, self.d(), self.r(), self.e(), self.dv);
        let mut b = self.bufs(e);
        let mut state = vec![T::zero(); r * e];
        let (mut o, mut den) = (vec![T::zero(); n * dv], vec![T::zero(); n]);
        for (i0, cn) in self.chunks() {
            let (qc, kc) = (&q[i0 * d..(i0 + cn) * d], &k[i0 * d..(i0 + cn) * d]);
            self.query_features(qc, &m[i0..], cn, &mut b);
            let psi = rm(&b.psit[..r * cn], r, cn).transpose();
            matmul(rm_mut(&mut b.big[..cn * e], cn, e), false, psi, rm(&state, r, e), T::one(), Par::Seq);
            self.chunk_weights(qc, kc, &m[i0..], cn, &mut b);
            self.aug_v(&v[i0 * dv..], cn, &mut b);
            let (a, ve) = (rm(&b.a[..cn * cn], cn, cn), rm(&b.ve[..cn * e], cn, e));
            matmul(rm_mut(&mut b.big[..cn * e], cn, e), true, a, ve, T::one(), Par::Seq);
            self.finish(&b.big, cn, &mut o[i0 * dv..], &mut den[i0..]);
            self.features(kc, cn, &mut b.xt, &mut b.phit);
            let ve = rm(&b.ve[..cn * e], cn, e);
            matmul(rm_mut(&mut state, r, e), true, rm(&b.phit[..r * cn], r, cn), ve, T::one(), Par::Seq);
        }
        (o, den)
    }

    /// Key side of the non-causal backward, one key/value head: `z = Φ_Kᵀ 1` `[r]` and the Fact C.2
    /// state `W = (Φ_K ⊘ [V 1])ᵀ R` stored as `[r, e·wr]` (entry `[a, b·wr + c] = Σ_j φ_ja v'_jb r_jc`).
    fn key_kron(&self, k: &[T], v: &[T], rmat: &[T], wr: usize) -> (Vec<T>, Vec<T>) {
        let (d, r, e, dv) = (self.d(), self.r(), self.e(), self.dv);
        let ew = e * wr;
        let mut b = self.bufs(ew);
        let mut z = vec![T::zero(); r];
        let mut w = vec![T::zero(); r * ew];
        for (j0, cn) in self.chunks() {
            self.features(&k[j0 * d..(j0 + cn) * d], cn, &mut b.xt, &mut b.phit);
            self.aug_v(&v[j0 * dv..], cn, &mut b);
            kron_rows(&b.ve, e, &rmat[j0 * wr..(j0 + cn) * wr], wr, cn, &mut b.kr);
            let phit = rm(&b.phit[..r * cn], r, cn);
            matmul(rm_mut(&mut w, r, ew), true, phit, rm(&b.kr[..cn * ew], cn, ew), T::one(), Par::Seq);
            add_row_sums(&b.phit[..r * cn], cn, &mut z);
        }
        (z, w)
    }

    /// Query side of the non-causal backward, one query head, given [`key_kron`](Self::key_kron)'s
    /// `z` and `wk` (for `R [n, wr]`) and `L [n, wl]`. Returns
    /// `(p R [n, wr], Z = (D̃⁻¹Φ_Q ⊘ [G −δ])ᵀ L [r, e·wl], U = (D̃⁻¹Φ_Q)ᵀ G [r, dv])`.
    #[allow(clippy::too_many_arguments)]
    fn backward_queries(
        &self,
        q: &[T],
        m: &[T],
        o: &[T],
        g: &[T],
        z: &[T],
        wk: &[T],
        wr: usize,
        lmat: &[T],
        wl: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (n, d, r, e, dv) = (self.n, self.d(), self.r(), self.e(), self.dv);
        let (ewr, ewl) = (e * wr, e * wl);
        let mut b = self.bufs(ewr.max(ewl));
        let mut pr = vec![T::zero(); n * wr];
        let mut zq = vec![T::zero(); r * ewl];
        let mut u = vec![T::zero(); r * dv];
        let mut den = vec![T::zero(); self.c()];
        for (i0, cn) in self.chunks() {
            self.query_features(&q[i0 * d..(i0 + cn) * d], &m[i0..], cn, &mut b);
            // den_i = ψ_i·z, then Ψ → D̃⁻¹Ψ
            let psi = rm(&b.psit[..r * cn], r, cn).transpose();
            matmul(rm_mut(&mut den[..cn], cn, 1), false, psi, rm(z, r, 1), T::one(), Par::Seq);
            self.normalize_psi(&den[..cn], cn, &mut b);
            self.aug_g(&g[i0 * dv..], &o[i0 * dv..], cn, &mut b);
            self.apply_left(&mut b, cn, wk, wr, &mut pr[i0 * wr..(i0 + cn) * wr]);
            self.accumulate_right(&mut b, cn, &lmat[i0 * wl..(i0 + cn) * wl], wl, &g[i0 * dv..], &mut zq, &mut u);
        }
        (pr, zq, u)
    }

    /// Key side of the non-causal backward, one key/value head, given the sums over its query heads
    /// of [`backward_queries`](Self::backward_queries)' `Z` and `U`. Returns `(pᵀL [n, wl], f̃ᵀG [n, dv])`.
    fn backward_keys(&self, k: &[T], v: &[T], zq: &[T], u: &[T], wl: usize) -> (Vec<T>, Vec<T>) {
        let (n, d, dv) = (self.n, self.d(), self.dv);
        let mut b = self.bufs(self.e() * wl);
        let mut ptl = vec![T::zero(); n * wl];
        let mut dvv = vec![T::zero(); n * dv];
        for (j0, cn) in self.chunks() {
            self.features(&k[j0 * d..(j0 + cn) * d], cn, &mut b.xt, &mut b.phit);
            self.aug_v(&v[j0 * dv..], cn, &mut b);
            self.apply_right(
                &mut b,
                cn,
                zq,
                u,
                wl,
                &mut ptl[j0 * wl..(j0 + cn) * wl],
                &mut dvv[j0 * dv..(j0 + cn) * dv],
            );
        }
        (ptl, dvv)
    }

    /// `out [rows, wr] += Σ_b G'_ib [(D̃⁻¹ψ_i)ᵀ W]_{b·wr..}` — rows of `p Y` through a state
    /// `W = (Φ_K ⊘ V')ᵀ Y` (Fact C.2). Needs `b.psit` normalized and `b.ge`.
    fn apply_left(&self, b: &mut Bufs<T>, rows: usize, w: &[T], wr: usize, out: &mut [T]) {
        let (r, e) = (self.r(), self.e());
        let ew = e * wr;
        let psi = rm(&b.psit[..r * rows], r, rows).transpose();
        matmul(rm_mut(&mut b.big[..rows * ew], rows, ew), false, psi, rm(w, r, ew), T::one(), Par::Seq);
        contract_rows(&b.big, &b.ge, e, wr, rows, out);
    }

    /// `Z += (D̃⁻¹Ψ)ᵀ (G' ⊘ L)`, `U += (D̃⁻¹Ψ)ᵀ G` for this chunk's rows. Needs `b.psit`
    /// normalized and `b.ge`; `l [rows, wl]`, `g [rows, dv]`.
    #[allow(clippy::too_many_arguments)]
    fn accumulate_right(&self, b: &mut Bufs<T>, rows: usize, l: &[T], wl: usize, g: &[T], zq: &mut [T], u: &mut [T]) {
        let (r, e, dv) = (self.r(), self.e(), self.dv);
        let ew = e * wl;
        kron_rows(&b.ge, e, l, wl, rows, &mut b.kr);
        let psit = rm(&b.psit[..r * rows], r, rows);
        matmul(rm_mut(zq, r, ew), true, psit, rm(&b.kr[..rows * ew], rows, ew), T::one(), Par::Seq);
        matmul(rm_mut(u, r, dv), true, psit, rm(&g[..rows * dv], rows, dv), T::one(), Par::Seq);
    }

    /// `ptl [rows, wl] += Σ_b V'_jb [φ_jᵀ Z]_{b·wl..}` and `dv [rows, dv] += φ_jᵀ U`: rows of `pᵀY`
    /// and `f̃ᵀG` through the states `Z`, `U`. Needs `b.phit` (keys) and `b.ve`.
    #[allow(clippy::too_many_arguments)]
    fn apply_right(&self, b: &mut Bufs<T>, rows: usize, zq: &[T], u: &[T], wl: usize, ptl: &mut [T], dv_out: &mut [T]) {
        let (r, e, dv) = (self.r(), self.e(), self.dv);
        let ew = e * wl;
        let phi = rm(&b.phit[..r * rows], r, rows).transpose();
        matmul(rm_mut(&mut b.big[..rows * ew], rows, ew), false, phi, rm(zq, r, ew), T::one(), Par::Seq);
        contract_rows(&b.big, &b.ve, e, wl, rows, ptl);
        matmul(rm_mut(dv_out, rows, dv), true, phi, rm(u, r, dv), T::one(), Par::Seq);
    }

    /// Causal backward of one head (Lemmas I.3–I.8): a forward scan with prefix states
    /// `z = Σ φ_j`, `W = Σ (φ_j ⊗ v'_j) r_jᵀ` gives `p R` and every diagonal-block term; a reverse
    /// scan with suffix states `Z = Σ (ψ̂_i ⊗ g'_i) l_iᵀ`, `U = Σ ψ̂_i g_iᵀ` over later chunks gives
    /// `pᵀ L` and `f̃ᵀ G`. Returns `(p R [n, wr], pᵀ L [n, wl], f̃ᵀ G [n, dv])`.
    #[allow(clippy::too_many_arguments)]
    fn backward_causal(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        m: &[T],
        o: &[T],
        g: &[T],
        rmat: &[T],
        wr: usize,
        lmat: &[T],
        wl: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (n, d, r, e, dv) = (self.n, self.d(), self.r(), self.e(), self.dv);
        let (ewr, ewl) = (e * wr, e * wl);
        let mut b = self.bufs(ewr.max(ewl));
        let mut pr = vec![T::zero(); n * wr];
        let mut ptl = vec![T::zero(); n * wl];
        let mut dvv = vec![T::zero(); n * dv];
        let mut den = vec![T::zero(); n];
        // Forward scan: prefix states.
        let mut z = vec![T::zero(); r];
        let mut w = vec![T::zero(); r * ewr];
        for (i0, cn) in self.chunks() {
            let (qc, kc) = (&q[i0 * d..(i0 + cn) * d], &k[i0 * d..(i0 + cn) * d]);
            self.query_features(qc, &m[i0..], cn, &mut b);
            self.chunk_weights(qc, kc, &m[i0..], cn, &mut b);
            // den_i = ψ_i·z + Σ_{j ≤ i in chunk} a_ij
            let psi = rm(&b.psit[..r * cn], r, cn).transpose();
            let dc = &mut den[i0..i0 + cn];
            matmul(rm_mut(dc, cn, 1), false, psi, rm(&z, r, 1), T::one(), Par::Seq);
            for (x, row) in dc.iter_mut().zip(b.a[..cn * cn].chunks_exact(cn)) {
                *x += row.iter().copied().sum::<T>();
            }
            self.normalize_psi(&den[i0..i0 + cn], cn, &mut b);
            // F = D̃⁻¹ A on the diagonal block
            for (row, s) in b.a[..cn * cn].chunks_exact_mut(cn).zip(&b.inv[..cn]) {
                for x in row {
                    *x *= *s;
                }
            }
            self.aug_g(&g[i0 * dv..], &o[i0 * dv..], cn, &mut b);
            self.aug_v(&v[i0 * dv..], cn, &mut b);
            // inter-chunk: rows of p R through the prefix state
            self.apply_left(&mut b, cn, &w, wr, &mut pr[i0 * wr..(i0 + cn) * wr]);
            // diagonal block: P = F ∘ (G' V'ᵀ) (masked through F)
            let (ge, ve) = (rm(&b.ge[..cn * e], cn, e), rm(&b.ve[..cn * e], cn, e));
            matmul(rm_mut(&mut b.pa[..cn * cn], cn, cn), false, ge, ve.transpose(), T::one(), Par::Seq);
            for (x, f) in b.pa[..cn * cn].iter_mut().zip(&b.a[..cn * cn]) {
                *x *= *f;
            }
            let (pm, fm) = (rm(&b.pa[..cn * cn], cn, cn), rm(&b.a[..cn * cn], cn, cn));
            let (rc, lc) = (rm(&rmat[i0 * wr..(i0 + cn) * wr], cn, wr), rm(&lmat[i0 * wl..(i0 + cn) * wl], cn, wl));
            matmul(rm_mut(&mut pr[i0 * wr..(i0 + cn) * wr], cn, wr), true, pm, rc, T::one(), Par::Seq);
            matmul(rm_mut(&mut ptl[i0 * wl..(i0 + cn) * wl], cn, wl), true, pm.transpose(), lc, T::one(), Par::Seq);
            let gc = rm(&g[i0 * dv..(i0 + cn) * dv], cn, dv);
            matmul(rm_mut(&mut dvv[i0 * dv..(i0 + cn) * dv], cn, dv), true, fm.transpose(), gc, T::one(), Par::Seq);
            // prefix states += this chunk's keys
            self.features(kc, cn, &mut b.xt, &mut b.phit);
            kron_rows(&b.ve, e, &rmat[i0 * wr..(i0 + cn) * wr], wr, cn, &mut b.kr);
            let phit = rm(&b.phit[..r * cn], r, cn);
            matmul(rm_mut(&mut w, r, ewr), true, phit, rm(&b.kr[..cn * ewr], cn, ewr), T::one(), Par::Seq);
            add_row_sums(&b.phit[..r * cn], cn, &mut z);
        }
        drop(w);
        // Reverse scan: suffix states over later chunks (MATH §5.4 correction 3).
        let mut zq = vec![T::zero(); r * ewl];
        let mut u = vec![T::zero(); r * dv];
        for (i0, cn) in self.chunks().rev() {
            self.features(&k[i0 * d..(i0 + cn) * d], cn, &mut b.xt, &mut b.phit);
            self.aug_v(&v[i0 * dv..], cn, &mut b);
            self.apply_right(
                &mut b,
                cn,
                &zq,
                &u,
                wl,
                &mut ptl[i0 * wl..(i0 + cn) * wl],
                &mut dvv[i0 * dv..(i0 + cn) * dv],
            );
            self.query_features(&q[i0 * d..(i0 + cn) * d], &m[i0..], cn, &mut b);
            self.normalize_psi(&den[i0..i0 + cn], cn, &mut b);
            self.aug_g(&g[i0 * dv..], &o[i0 * dv..], cn, &mut b);
            self.accumulate_right(&mut b, cn, &lmat[i0 * wl..(i0 + cn) * wl], wl, &g[i0 * dv..], &mut zq, &mut u);
        }
        (pr, ptl, dvv)
    }
}

/// Row-wise Kronecker product (LSSSZ Fact C.2's `⊘`): `out [rows, ea·wb]` with
/// `out[i, b·wb + c] = a[i, b] · y[i, c]` for `a [rows, ea]`, `y [rows, wb]`.
fn kron_rows<T: Scalar>(a: &[T], ea: usize, y: &[T], wb: usize, rows: usize, out: &mut [T]) {
    for i in 0..rows {
        let (ai, yi) = (&a[i * ea..(i + 1) * ea], &y[i * wb..(i + 1) * wb]);
        for (blk, av) in out[i * ea * wb..(i + 1) * ea * wb].chunks_exact_mut(wb).zip(ai) {
            for (x, yv) in blk.iter_mut().zip(yi) {
                *x = *av * *yv;
            }
        }
    }
}

/// `out[i, c] += Σ_b a[i, b] · x[i, b·wb + c]` for `x [rows, ea·wb]`, `a [rows, ea]`, `out [rows, wb]`:
/// the contraction that finishes a Fact C.2 product.
fn contract_rows<T: Scalar>(x: &[T], a: &[T], ea: usize, wb: usize, rows: usize, out: &mut [T]) {
    for i in 0..rows {
        let (xi, ai) = (&x[i * ea * wb..(i + 1) * ea * wb], &a[i * ea..(i + 1) * ea]);
        let oi = &mut out[i * wb..(i + 1) * wb];
        for (blk, av) in xi.chunks_exact(wb).zip(ai) {
            for (o, xv) in oi.iter_mut().zip(blk) {
                *o += *av * *xv;
            }
        }
    }
}

/// `z[a] += Σ_i phit[a, i]` for feature-major `phit [r, rows]`.
fn add_row_sums<T: Scalar>(phit: &[T], rows: usize, z: &mut [T]) {
    for (x, row) in z.iter_mut().zip(phit.chunks_exact(rows)) {
        *x += row.iter().copied().sum::<T>();
    }
}

/// Row shifts of one query head (`m_i = τ q_i·k̄_i`, MATH §3) or zeros without centering.
fn shifts<T: Scalar>(q: &[T], kbar: &[T], n: usize, d: usize, scale: f64, center: bool) -> Vec<T> {
    if center {
        bound::row_shift(q, kbar, n, d, scale)
    } else {
        vec![T::zero(); n]
    }
}

fn scale_in_place<T: Scalar>(x: &mut [T], s: T) {
    for v in x {
        *v *= s;
    }
}

/// Implementation of [`super::forward_altgrad`].
pub(crate) fn forward<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
    popts: &PolyOptions,
) -> Result<AttnOutput<T>> {
    check_inputs(q, k, v, shape, opts)?;
    check_popts(popts)?;
    let s = *shape;
    let n = s.seq_len;
    // Fail before any work when the backward's Kronecker state would be too large.
    if let Some(r) = crate::attention::features::feature_dim(s.head_dim, popts.degree) {
        check_kron(r, s.head_dim_v, s.head_dim, popts.degree)?;
    }
    let fm = FeatureMap::<T>::new(s.head_dim, popts.degree)?;
    let kern = Kernel { fm: &fm, n, dv: s.head_dim_v, scale: opts.scale, center: popts.center, chunk: popts.chunk };
    let kvs = super::poly_kv(k, v, &s, opts.causal, popts.center, popts.chunk);
    let states: Vec<Vec<T>> =
        if opts.causal { Vec::new() } else { kvs.par_iter().map(|kv| kern.kv_state(&kv.k, &kv.v)).collect() };
    let per_head: Vec<(Vec<T>, Vec<T>)> = (0..s.num_heads)
        .into_par_iter()
        .map(|h| {
            let kvh = h / s.group();
            let kv = &kvs[kvh];
            let qh = gather_head(q, n, s.num_heads, s.head_dim, h);
            let m = shifts(&qh, &kv.kbar, n, s.head_dim, opts.scale, popts.center);
            let (o, den) = if opts.causal {
                kern.forward_causal(&qh, &kv.k, &kv.v, &m)
            } else {
                kern.forward_queries(&qh, &m, &states[kvh])
            };
            let lse = super::poly_lse(&qh, &kv.c, &m, &den, s.head_dim, opts.scale);
            (o, lse)
        })
        .collect();
    let (os, lses): (Vec<_>, Vec<_>) = per_head.into_iter().unzip();
    Ok(AttnOutput { o: scatter_heads(&os, n, s.head_dim_v), lse: lses.concat() })
}

/// Implementation of [`super::backward_altgrad`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    fwd: &AttnOutput<T>,
    dout: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
    popts: &PolyOptions,
) -> Result<AttnGrads<T>> {
    check_inputs(q, k, v, shape, opts)?;
    check_popts(popts)?;
    let s = *shape;
    let n = s.seq_len;
    s.check_len("o", &fwd.o, s.num_heads, s.head_dim_v)?;
    s.check_len("do", dout, s.num_heads, s.head_dim_v)?;
    if fwd.lse.len() != s.num_heads * n {
        return Err(Error::bad("lse", format!("expected {} values ([num_heads, seq_len])", s.num_heads * n)));
    }
    let fm = FeatureMap::<T>::new(s.head_dim, popts.degree)?;
    let (d, dv) = (s.head_dim, s.head_dim_v);
    check_kron(fm.dim(), dv, d, popts.degree)?;
    let kern = Kernel { fm: &fm, n, dv, scale: opts.scale, center: popts.center, chunk: popts.chunk };
    let tau = T::from_f64(opts.scale);
    let kvs = super::poly_kv(k, v, &s, opts.causal, popts.center, popts.chunk);
    let query = |h: usize| {
        let kv = &kvs[h / s.group()];
        let qh = gather_head(q, n, s.num_heads, d, h);
        let oh = gather_head(&fwd.o, n, s.num_heads, dv, h);
        let gh = gather_head(dout, n, s.num_heads, dv, h);
        let m = shifts(&qh, &kv.kbar, n, d, opts.scale, popts.center);
        (kv, qh, oh, gh, m)
    };
    if opts.causal {
        let per_head: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..s.num_heads)
            .into_par_iter()
            .map(|h| {
                let (kv, qh, oh, gh, m) = query(h);
                // p K, pᵀ Q, f̃ᵀ G; then dQ = τ p K, dK = τ pᵀ Q
                let (mut dq, mut dk, dvh) = kern.backward_causal(&qh, &kv.k, &kv.v, &m, &oh, &gh, &kv.k, d, &qh, d);
                scale_in_place(&mut dq, tau);
                scale_in_place(&mut dk, tau);
                (dq, dk, dvh)
            })
            .collect();
        return Ok(combine_grads(per_head, &s));
    }
    // Non-causal: key-side states per key/value head, then query heads, then one key pass per
    // key/value head with the group's summed states.
    let key_states: Vec<(Vec<T>, Vec<T>)> = kvs.par_iter().map(|kv| kern.key_kron(&kv.k, &kv.v, &kv.k, d)).collect();
    let per_head: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..s.num_heads)
        .into_par_iter()
        .map(|h| {
            let (_, qh, oh, gh, m) = query(h);
            let (z, wk) = &key_states[h / s.group()];
            let (mut dq, zq, u) = kern.backward_queries(&qh, &m, &oh, &gh, z, wk, d, &qh, d);
            scale_in_place(&mut dq, tau);
            (dq, zq, u)
        })
        .collect();
    drop(key_states);
    let g = s.group();
    let mut dqs = Vec::with_capacity(s.num_heads);
    let mut sums: Vec<(Vec<T>, Vec<T>)> = Vec::with_capacity(s.num_kv_heads);
    for (h, (dq, zq, u)) in per_head.into_iter().enumerate() {
        dqs.push(dq);
        if h % g == 0 {
            sums.push((zq, u));
        } else {
            let (zs, us) = sums.last_mut().expect("group leader pushed first");
            for (a, b) in zs.iter_mut().zip(&zq) {
                *a += *b;
            }
            for (a, b) in us.iter_mut().zip(&u) {
                *a += *b;
            }
        }
    }
    let kv_grads: Vec<(Vec<T>, Vec<T>)> = kvs
        .par_iter()
        .zip(sums.par_iter())
        .map(|(kv, (zq, u))| {
            let (mut dk, dvh) = kern.backward_keys(&kv.k, &kv.v, zq, u, d);
            scale_in_place(&mut dk, tau);
            (dk, dvh)
        })
        .collect();
    let (dks, dvs): (Vec<_>, Vec<_>) = kv_grads.into_iter().unzip();
    Ok(AttnGrads { dq: scatter_heads(&dqs, n, d), dk: scatter_heads(&dks, n, d), dv: scatter_heads(&dvs, n, dv) })
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
/// `opts.causal`), differentiated in the paper's W-form (LSSSZ Def 1.2, Lemmas D.17, F.4, G.3;
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
    if !(opts.scale.is_finite() && opts.scale > 0.0) {
        return Err(Error::bad("scale", format!("must be finite and positive, got {}", opts.scale)));
    }
    check_popts(popts)?;
    let fm = FeatureMap::<T>::new(d, popts.degree)?;
    check_kron(fm.dim(), dv, hdim, popts.degree)?;
    let par = par_all();
    let (one, zero) = (T::one(), T::zero());
    let proj = |w: &[T], width: usize| {
        let mut out = vec![zero; n * width];
        matmul(rm_mut(&mut out, n, width), false, rm(x, n, hdim), rm(w, hdim, width), one, par);
        out
    };
    let (q, mut k, v) = (proj(w_q, d), proj(w_k, d), proj(w_v, dv));
    let kern = Kernel { fm: &fm, n, dv, scale: opts.scale, center: popts.center, chunk: popts.chunk };
    let (kbar, _) = super::center_keys(&mut k, n, d, opts.causal, popts.center, popts.chunk);
    let m = shifts(&q, &kbar, n, d, opts.scale, popts.center);
    let (px, ptx, dvv, o) = if opts.causal {
        let (o, _) = kern.forward_causal(&q, &k, &v, &m);
        let (px, ptx, dvv) = kern.backward_causal(&q, &k, &v, &m, &o, g, x, hdim, x, hdim);
        (px, ptx, dvv, o)
    } else {
        let (o, _) = kern.forward_queries(&q, &m, &kern.kv_state(&k, &v));
        let (z, wk) = kern.key_kron(&k, &v, x, hdim);
        let (px, zq, u) = kern.backward_queries(&q, &m, &o, g, &z, &wk, hdim, x, hdim);
        drop(wk);
        let (ptx, dvv) = kern.backward_keys(&k, &v, &zq, &u, hdim);
        (px, ptx, dvv, o)
    };
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
