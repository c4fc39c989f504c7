//! Polynomial attention for one head, forward and backward in O(n·r·d_v) (MATH §3–4; AS23
//! Lemma 3.4; LSSSZ Lemma C.13, I.1, I.3).
//!
//! The model: `a_ij = T_g(s̃_ij)` with `s̃_ij = τ q_i·k_j − m_i` (masked `j ≤ i` when causal),
//! `O_i = Σ_j a_ij v_j / Σ_j a_ij`. With `q' = √τ q`, `k' = √τ k` and the feature map φ of
//! [`super::features`], `T_g(s − m) = Σ_t T_{g−t}(−m) sᵗ/t!`, so row `i` uses
//! `Ψ_i = w(i) ∘ φ(q'_i)` blockwise with `w_t(i) = T_{g−t}(−m_i)` and `a_ij = Ψ_i·φ(k'_j)`.
//! Values are augmented by a ones column, `V' = [V 1]` (`e = d_v + 1` columns), so the numerator
//! and the denominator come out of one product: `[num_i, den_i] = Σ_j a_ij V'_j`.
//!
//! - Non-causal: stream key chunks into `H' = Φ_Kᵀ V'` (`r × e`, i.e. `H` and `z` of MATH §4), then
//!   query chunks `Y = Ψ_Q H'`. Backward: `dY_i = [G_i/den_i, −δ_i/den_i]` (`δ_i = G_i·O_i`),
//!   `dΨ = dY H'ᵀ`, `dH' = Ψᵀ dY`, `dΦ_K = V' dH'ᵀ`, `dV = Φ_K dH'[:, :d_v]`.
//! - Causal: chunks of `C` rows. Inter-chunk through the running state `S' = Σ_{earlier} φ(k'_j) V'_jᵀ`,
//!   intra-chunk directly `a_ij = T_g(s̃_ij)` from one `C×C` product. Backward: a forward scan for
//!   `dQ` (and the intra-chunk terms), a reverse scan with `dS' = Σ_{later i} Ψ_i dY_iᵀ` for `dK`, `dV`.
//! - Row shift (`center`): the keys `k` the methods receive are relative to a reference point `c`
//!   (`k_j − c`, MATH §3 "Reference point") and `kbar` is `k̄_i − c`, so `m_i = τ q_i·(k̄_i − c)` is
//!   small and nothing cancels ([`super::bound::row_shift`]); the gradient flows
//!   through it: `dm_i = Σ_{t<g} −T_{g−t−1}(−m_i) ⟨φ_t(q'_i), dΨ_{i,t}⟩ − Σ_{j in chunk} dA_ij T_{g−1}(s̃_ij)`,
//!   `dq_i += τ k̄_i dm_i`, and `τ q_i dm_i` flows to the keys through `k̄_i` (every key gets `1/n`
//!   of the sum without a mask; key `j` gets `Σ_{i≥j} τ q_i dm_i/(i+1)` under the causal mask).
//!
//! Every hot loop is a GEMM of a `C×r` feature chunk with an `r×e` state. Working memory is
//! O(C·r + r·d_v) ([`super::bound::poly_state_bytes`]); no `n×r` matrix is ever formed.

use super::features::{simd, taylor, FeatureMap};
use crate::linalg::{matmul, rm, rm_mut, rm_strided, Scalar};
use crate::{Error, Result};
use faer::Par;

/// Default chunk (rows per streamed block; the causal intra-chunk block size).
pub const DEFAULT_CHUNK: usize = 64;

/// Options of polynomial attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolyOptions {
    /// Degree `g` of the truncated exponential `T_g`; must be even and ≥ 2 (MATH §3 "Positivity").
    pub degree: usize,
    /// Row shift `m_i = τ q_i·k̄_i` (MATH §3); `false` is the CLI's `--no-center` (`m_i = 0`).
    pub center: bool,
    /// Rows per chunk `C` (≥ 1): the streaming block, and under the causal mask the block whose
    /// interactions are computed directly. Memory is O(C·r); causal FLOPs grow by `O(n·C·d)`.
    pub chunk: usize,
}

impl Default for PolyOptions {
    /// Degree 2, centered, chunk [`DEFAULT_CHUNK`].
    fn default() -> Self {
        PolyOptions { degree: 2, center: true, chunk: DEFAULT_CHUNK }
    }
}

impl PolyOptions {
    /// Degree `g`, centered, chunk [`DEFAULT_CHUNK`].
    pub fn new(degree: usize) -> Self {
        PolyOptions { degree, ..Default::default() }
    }

    /// Errors: [`Error::BadInput`] for an odd or zero degree ([`super::bound::validate_degree`]) or
    /// a zero chunk.
    pub fn validate(&self) -> Result<()> {
        super::bound::validate_degree(self.degree)?;
        if self.chunk == 0 {
            return Err(Error::bad("chunk", "must be at least 1"));
        }
        Ok(())
    }
}

/// Output of [`super::forward_poly`]: what [`super::backward_poly`] needs.
#[derive(Clone, Debug)]
pub struct PolyOutput<T> {
    /// Attention output `o [seq_len, num_heads, head_dim_v]`.
    pub o: Vec<T>,
    /// `lse_i = m_i + ln den_i` per head and row, `[num_heads, seq_len]`: the polynomial model's
    /// approximation of the exact log-sum-exp `ln Σ_j exp(s_ij)` (with `m_i` the row shift, 0
    /// without centering).
    pub lse: Vec<T>,
    /// Denominators `den_i = Σ_j T_g(s̃_ij) > 0`, `[num_heads, seq_len]`.
    pub den: Vec<T>,
    /// Non-causal: per key/value head the state `H' = Φ_Kᵀ [V 1]`, `[r, head_dim_v + 1]` row-major
    /// (reused by the backward); empty under the causal mask (the backward rescans).
    pub kv_state: Vec<Vec<T>>,
}

impl<T> PolyOutput<T> {
    /// The output and `lse` as an [`super::AttnOutput`] (drops `den` and the state).
    pub fn into_attn_output(self) -> super::AttnOutput<T> {
        super::AttnOutput { o: self.o, lse: self.lse }
    }
}

/// One head of a polynomial-attention call: the feature map and sizes. Inputs of every method are
/// contiguous row-major `q [n, d]`, `k [n, d]`, `v [n, dv]` (`d = fm.input_dim()`).
#[derive(Clone, Copy, Debug)]
pub struct Head<'a, T> {
    /// Feature map of degree `g` on `d` coordinates.
    pub fm: &'a FeatureMap<T>,
    /// Sequence length `n ≥ 1`.
    pub n: usize,
    /// Value width `d_v`.
    pub dv: usize,
    /// Score scale τ.
    pub scale: f64,
    /// Row shift on (`m` arguments are then used; otherwise they are ignored and may be zeros).
    pub center: bool,
    /// Chunk rows `C ≥ 1`.
    pub chunk: usize,
}

/// Per-chunk scratch buffers, sized once per call. Features are feature-major: `phit [r, rows]`
/// (column `i` = `φ` of the chunk's row `i`), inputs `xt [d, rows]`; value chunks are row-major.
struct Bufs<T> {
    xt: Vec<T>,
    dxt: Vec<T>,
    phit: Vec<T>,
    psit: Vec<T>,
    dphit: Vec<T>,
    w: Vec<T>,
    acc: Vec<T>,
    ve: Vec<T>,
    y: Vec<T>,
}

impl<T: Scalar> Head<'_, T> {
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
    fn g(&self) -> usize {
        self.fm.degree()
    }
    fn tau(&self) -> T {
        T::from_f64(self.scale)
    }
    fn sqrt_tau(&self) -> T {
        T::from_f64(self.scale.sqrt())
    }

    fn bufs(&self) -> Bufs<T> {
        let (c, d, r, e, g) = (self.c(), self.d(), self.r(), self.e(), self.g());
        let z = T::zero();
        Bufs {
            xt: vec![z; c * d],
            dxt: vec![z; c * d],
            phit: vec![z; c * r],
            psit: if self.center { vec![z; c * r] } else { Vec::new() },
            dphit: vec![z; c * r],
            w: vec![z; c * (g + 1)],
            acc: vec![z; c],
            ve: vec![z; c * e],
            y: vec![z; c * e],
        }
    }

    /// Chunk starts and lengths `(0, C), (C, C), …` covering `0..n`.
    fn chunks(&self) -> impl DoubleEndedIterator<Item = (usize, usize)> + '_ {
        let c = self.c();
        (0..self.n.div_ceil(c)).map(move |k| (k * c, c.min(self.n - k * c)))
    }

    /// `xt = √τ xᵀ` (`[d, rows]`), `phit = φ(xt)` (`[r, rows]`) for `rows` rows of `x [rows, d]`.
    fn features(&self, x: &[T], rows: usize, xt: &mut [T], phit: &mut [T]) {
        let (d, r) = (self.d(), self.r());
        let st = self.sqrt_tau();
        simd(
            #[inline(always)]
            || {
                for (i, xr) in x[..rows * d].chunks_exact(d).enumerate() {
                    for (c, v) in xr.iter().enumerate() {
                        xt[c * rows + i] = *v * st;
                    }
                }
            },
        );
        self.fm.apply_cols(&xt[..rows * d], rows, &mut phit[..rows * r]);
    }

    /// Query features: `phit = φ(√τ q)ᵀ`, and when centering `w[t, i] = T_{g−t}(−m_i)` and
    /// `psit = w ∘ phit` blockwise (`Ψᵀ`).
    fn query_features(&self, q: &[T], m: &[T], rows: usize, b: &mut Bufs<T>) {
        self.features(q, rows, &mut b.xt, &mut b.phit);
        if !self.center {
            return;
        }
        let g = self.g();
        for t in 0..=g {
            for (wi, mi) in b.w[t * rows..(t + 1) * rows].iter_mut().zip(&m[..rows]) {
                *wi = taylor(g - t, -*mi);
            }
        }
        simd(
            #[inline(always)]
            || {
                for t in 0..=g {
                    let w = &b.w[t * rows..(t + 1) * rows];
                    let blk = self.fm.block(t);
                    let phi = &b.phit[blk.start * rows..blk.end * rows];
                    let psi = &mut b.psit[blk.start * rows..blk.end * rows];
                    for (pr, fr) in psi.chunks_exact_mut(rows).zip(phi.chunks_exact(rows)) {
                        for ((p, f), wi) in pr.iter_mut().zip(fr).zip(w) {
                            *p = *f * *wi;
                        }
                    }
                }
            },
        );
    }

    /// `Ψᵀ` of the chunk: `psit` when centering, else `phit`.
    fn psi<'b>(&self, b: &'b Bufs<T>, rows: usize) -> &'b [T] {
        let len = self.r() * rows;
        if self.center {
            &b.psit[..len]
        } else {
            &b.phit[..len]
        }
    }

    /// `ve = [v, 1]` for `rows` rows.
    fn aug_v(&self, v: &[T], rows: usize, ve: &mut [T]) {
        let (dv, e) = (self.dv, self.e());
        for (dst, src) in ve[..rows * e].chunks_exact_mut(e).zip(v[..rows * dv].chunks_exact(dv)) {
            dst[..dv].copy_from_slice(src);
            dst[dv] = T::one();
        }
    }

    /// `dy_i = [G_i/den_i, −(G_i·O_i)/den_i]` for `rows` rows.
    fn dy(&self, g: &[T], o: &[T], den: &[T], rows: usize, dy: &mut [T]) {
        let (dv, e) = (self.dv, self.e());
        for i in 0..rows {
            let (gi, oi) = (&g[i * dv..(i + 1) * dv], &o[i * dv..(i + 1) * dv]);
            let inv = T::one() / den[i];
            let delta: T = gi.iter().zip(oi).map(|(a, b)| *a * *b).sum();
            let row = &mut dy[i * e..(i + 1) * e];
            for (x, gv) in row[..dv].iter_mut().zip(gi) {
                *x = *gv * inv;
            }
            row[dv] = -delta * inv;
        }
    }

    /// `o_i = y_i[..dv] / y_i[dv]`, `den_i = y_i[dv]`.
    fn finish(&self, y: &[T], rows: usize, o: &mut [T], den: &mut [T]) {
        let (dv, e) = (self.dv, self.e());
        for i in 0..rows {
            let dn = y[i * e + dv];
            debug_assert!(
                dn > T::zero(),
                "polynomial attention denominator {dn:?} ≤ 0 (even degree keeps it positive)"
            );
            den[i] = dn;
            let inv = T::one() / dn;
            for (x, yv) in o[i * dv..(i + 1) * dv].iter_mut().zip(&y[i * e..i * e + dv]) {
                *x = *yv * inv;
            }
        }
    }

    /// Adds `√τ dxt` (`[d, rows]`) to the row-major `dx [rows, d]`.
    fn add_transposed(&self, dxt: &[T], rows: usize, dx: &mut [T]) {
        let d = self.d();
        let st = self.sqrt_tau();
        simd(
            #[inline(always)]
            || {
                for (i, row) in dx[..rows * d].chunks_exact_mut(d).enumerate() {
                    for (c, x) in row.iter_mut().enumerate() {
                        *x += dxt[c * rows + i] * st;
                    }
                }
            },
        );
    }

    /// Query-side chain rule once `b.dphit = dΨᵀ` is known for `rows` rows: adds the inter-chunk
    /// `dm_i` (when centering), turns `dΨ` into `dφ = w ∘ dΨ`, and adds `√τ J_φᵀ dφ_i` to `dq_i`.
    fn query_vjp(&self, rows: usize, b: &mut Bufs<T>, dm: &mut [T], dq: &mut [T]) {
        let (d, r) = (self.d(), self.r());
        if self.center {
            simd(
                #[inline(always)]
                || self.unweigh(rows, b, dm),
            );
        }
        self.fm.vjp_cols(
            &b.xt[..rows * d],
            &b.phit[..rows * r],
            &mut b.dphit[..rows * r],
            rows,
            &mut b.dxt[..rows * d],
        );
        self.add_transposed(&b.dxt, rows, dq);
    }

    /// `dm_i −= Σ_{t<g} w_{t+1}(i) ⟨φ_t(q'_i), dΨ_{i,t}⟩` (since `∂w_t/∂m = −T_{g−t−1}(−m) = −w_{t+1}`),
    /// then `dΨ ← w ∘ dΨ` blockwise (which is `dφ`).
    #[inline(always)]
    fn unweigh(&self, rows: usize, b: &mut Bufs<T>, dm: &mut [T]) {
        let g = self.g();
        for t in 0..=g {
            let blk = self.fm.block(t);
            let w = &b.w[t * rows..(t + 1) * rows];
            let phi = &b.phit[blk.start * rows..blk.end * rows];
            let dpsi = &mut b.dphit[blk.start * rows..blk.end * rows];
            if t < g {
                let acc = &mut b.acc[..rows];
                acc.fill(T::zero());
                for (fr, dr) in phi.chunks_exact(rows).zip(dpsi.chunks_exact(rows)) {
                    for ((a, f), dp) in acc.iter_mut().zip(fr).zip(dr) {
                        *a += *f * *dp;
                    }
                }
                let wn = &b.w[(t + 1) * rows..(t + 2) * rows];
                for ((x, a), wv) in dm[..rows].iter_mut().zip(acc.iter()).zip(wn) {
                    *x -= *wv * *a;
                }
            }
            for dr in dpsi.chunks_exact_mut(rows) {
                for (x, wi) in dr.iter_mut().zip(w) {
                    *x *= *wi;
                }
            }
        }
    }

    /// Key-side chain rule: adds `√τ J_φ(k'_j)ᵀ dφ_j` to `dk_j` for `rows` rows (`b.xt`, `b.phit`
    /// hold the keys, `b.dphit` the feature gradients).
    fn key_vjp(&self, rows: usize, b: &mut Bufs<T>, dk: &mut [T]) {
        let (d, r) = (self.d(), self.r());
        self.fm.vjp_cols(
            &b.xt[..rows * d],
            &b.phit[..rows * r],
            &mut b.dphit[..rows * r],
            rows,
            &mut b.dxt[..rows * d],
        );
        self.add_transposed(&b.dxt, rows, dk);
    }

    /// Non-causal key/value state `H' = Φ_Kᵀ [V 1]`, `[r, dv + 1]` row-major (one pass over key chunks).
    pub fn kv_state(&self, k: &[T], v: &[T]) -> Vec<T> {
        let (d, r, e, dv) = (self.d(), self.r(), self.e(), self.dv);
        let mut b = self.bufs();
        let mut h = vec![T::zero(); r * e];
        for (j0, cn) in self.chunks() {
            self.features(&k[j0 * d..(j0 + cn) * d], cn, &mut b.xt, &mut b.phit);
            self.aug_v(&v[j0 * dv..(j0 + cn) * dv], cn, &mut b.ve);
            let (phit, ve) = (rm(&b.phit[..r * cn], r, cn), rm(&b.ve[..cn * e], cn, e));
            matmul(rm_mut(&mut h, r, e), true, phit, ve, T::one(), Par::Seq);
        }
        h
    }

    /// Non-causal forward of one query head given the key/value state from [`kv_state`](Self::kv_state):
    /// `q [n, d]`, row shifts `m [n]`; returns `(o [n, dv], den [n])`.
    pub fn forward_queries(&self, q: &[T], m: &[T], state: &[T]) -> (Vec<T>, Vec<T>) {
        let (n, d, r, e, dv) = (self.n, self.d(), self.r(), self.e(), self.dv);
        let mut b = self.bufs();
        let (mut o, mut den) = (vec![T::zero(); n * dv], vec![T::zero(); n]);
        let mut y = std::mem::take(&mut b.y);
        for (i0, cn) in self.chunks() {
            self.query_features(&q[i0 * d..(i0 + cn) * d], &m[i0..i0 + cn], cn, &mut b);
            let psi = rm(self.psi(&b, cn), r, cn).transpose();
            matmul(rm_mut(&mut y[..cn * e], cn, e), false, psi, rm(state, r, e), T::one(), Par::Seq);
            self.finish(&y, cn, &mut o[i0 * dv..(i0 + cn) * dv], &mut den[i0..i0 + cn]);
        }
        (o, den)
    }

    /// Non-causal backward, query side, of one query head: `q [n, d]`, `o [n, dv]`, `den [n]`,
    /// `g = dL/do [n, dv]`, `m [n]`, global key mean `kbar [d]`, `state` from
    /// [`kv_state`](Self::kv_state). Returns `(dq [n, d], dstate [r, dv+1], dkbar [d])` where
    /// `dstate = Ψᵀ dY` feeds [`backward_keys`](Self::backward_keys) and `dkbar = τ Σ_i dm_i q_i`
    /// (f64) is the gradient reaching the key mean (zeros without centering).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_queries(
        &self,
        q: &[T],
        o: &[T],
        den: &[T],
        g: &[T],
        m: &[T],
        kbar: &[T],
        state: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<f64>) {
        let (n, d, r, e, dv) = (self.n, self.d(), self.r(), self.e(), self.dv);
        let mut b = self.bufs();
        let mut dq = vec![T::zero(); n * d];
        let mut dm = vec![T::zero(); n];
        let mut dstate = vec![T::zero(); r * e];
        for (i0, cn) in self.chunks() {
            self.query_features(&q[i0 * d..(i0 + cn) * d], &m[i0..i0 + cn], cn, &mut b);
            self.dy(&g[i0 * dv..], &o[i0 * dv..], &den[i0..], cn, &mut b.y);
            let dy = rm(&b.y[..cn * e], cn, e);
            // dΨᵀ = H' dYᵀ ;  dH' += Ψᵀ dY
            matmul(rm_mut(&mut b.dphit[..r * cn], r, cn), false, rm(state, r, e), dy.transpose(), T::one(), Par::Seq);
            matmul(rm_mut(&mut dstate, r, e), true, rm(self.psi(&b, cn), r, cn), dy, T::one(), Par::Seq);
            self.query_vjp(cn, &mut b, &mut dm[i0..i0 + cn], &mut dq[i0 * d..(i0 + cn) * d]);
        }
        let mut dkbar = vec![0.0f64; d];
        if self.center {
            let tau = self.tau();
            for i in 0..n {
                let s = tau * dm[i];
                for c in 0..d {
                    dq[i * d + c] += s * kbar[c];
                    dkbar[c] += (s * q[i * d + c]).as_f64();
                }
            }
        }
        (dq, dstate, dkbar)
    }

    /// Non-causal backward, key side, of one key/value head: `k [n, d]`, `v [n, dv]`, `dstate`
    /// (the sum of [`backward_queries`](Self::backward_queries)' `dstate` over the query heads
    /// sharing these keys) and `dkbar` (the same sum of their `dkbar`). Returns `(dk [n, d], dv [n, dv])`.
    pub fn backward_keys(&self, k: &[T], v: &[T], dstate: &[T], dkbar: &[f64]) -> (Vec<T>, Vec<T>) {
        let (n, d, r, e, dv) = (self.n, self.d(), self.r(), self.e(), self.dv);
        let mut b = self.bufs();
        let mut dk = vec![T::zero(); n * d];
        let mut dvv = vec![T::zero(); n * dv];
        let ds = rm(dstate, r, e);
        let ds_v = rm_strided(dstate, r, dv, e);
        for (j0, cn) in self.chunks() {
            self.features(&k[j0 * d..(j0 + cn) * d], cn, &mut b.xt, &mut b.phit);
            self.aug_v(&v[j0 * dv..(j0 + cn) * dv], cn, &mut b.ve);
            // dΦ_Kᵀ = dH' V'ᵀ ;  dV = Φ_K dH'[:, :dv]
            let ve = rm(&b.ve[..cn * e], cn, e);
            matmul(rm_mut(&mut b.dphit[..r * cn], r, cn), false, ds, ve.transpose(), T::one(), Par::Seq);
            let phi = rm(&b.phit[..r * cn], r, cn).transpose();
            matmul(rm_mut(&mut dvv[j0 * dv..(j0 + cn) * dv], cn, dv), false, phi, ds_v, T::one(), Par::Seq);
            self.key_vjp(cn, &mut b, &mut dk[j0 * d..(j0 + cn) * d]);
        }
        if self.center {
            let share: Vec<T> = dkbar.iter().map(|x| T::from_f64(x / n as f64)).collect();
            for row in dk.chunks_exact_mut(d) {
                for (x, s) in row.iter_mut().zip(&share) {
                    *x += *s;
                }
            }
        }
        (dk, dvv)
    }

    /// Intra-chunk scores `s = τ Q_c K_cᵀ` (`rows × rows`) into `s`.
    fn chunk_scores(&self, qc: &[T], kc: &[T], rows: usize, s: &mut [T]) {
        let d = self.d();
        matmul(
            rm_mut(&mut s[..rows * rows], rows, rows),
            false,
            rm(&qc[..rows * d], rows, d),
            rm(&kc[..rows * d], rows, d).transpose(),
            self.tau(),
            Par::Seq,
        );
    }

    /// Causal forward of one head (MATH §4, chunked): `q [n, d]`, `k [n, d]`, `v [n, dv]`, row
    /// shifts `m [n]` (prefix-mean shifts). Returns `(o [n, dv], den [n])`.
    pub fn forward_causal(&self, q: &[T], k: &[T], v: &[T], m: &[T]) -> (Vec<T>, Vec<T>) {
        let (n, d, r, e, dv, c) = (self.n, self.d(), self.r(), self.e(), self.dv, self.c());
        let coef = taylor_coefs::<T>(self.g());
        let mut b = self.bufs();
        let mut s = vec![T::zero(); c * c];
        let mut tmp = vec![T::zero(); c];
        let mut state = vec![T::zero(); r * e];
        let (mut o, mut den) = (vec![T::zero(); n * dv], vec![T::zero(); n]);
        let mut y = std::mem::take(&mut b.y);
        for (i0, cn) in self.chunks() {
            let (qc, kc) = (&q[i0 * d..(i0 + cn) * d], &k[i0 * d..(i0 + cn) * d]);
            // inter-chunk: Y = Ψ S'
            self.query_features(qc, &m[i0..i0 + cn], cn, &mut b);
            let psi = rm(self.psi(&b, cn), r, cn).transpose();
            matmul(rm_mut(&mut y[..cn * e], cn, e), false, psi, rm(&state, r, e), T::one(), Par::Seq);
            // intra-chunk: Y += A V', a_ij = T_g(s_ij − m_i) for j ≤ i
            self.chunk_scores(qc, kc, cn, &mut s);
            simd(
                #[inline(always)]
                || {
                    for il in 0..cn {
                        let mi = if self.center { m[i0 + il] } else { T::zero() };
                        let row = &mut s[il * cn..(il + 1) * cn];
                        let sh = &mut tmp[..=il];
                        for (a, x) in sh.iter_mut().zip(&row[..=il]) {
                            *a = *x - mi;
                        }
                        horner_into(&coef, sh, &mut row[..=il]);
                        row[il + 1..].fill(T::zero());
                    }
                },
            );
            self.aug_v(&v[i0 * dv..(i0 + cn) * dv], cn, &mut b.ve);
            let ve = rm(&b.ve[..cn * e], cn, e);
            matmul(rm_mut(&mut y[..cn * e], cn, e), true, rm(&s[..cn * cn], cn, cn), ve, T::one(), Par::Seq);
            self.finish(&y, cn, &mut o[i0 * dv..(i0 + cn) * dv], &mut den[i0..i0 + cn]);
            // S' += Φ_K,cᵀ V'_c
            self.features(kc, cn, &mut b.xt, &mut b.phit);
            matmul(rm_mut(&mut state, r, e), true, rm(&b.phit[..r * cn], r, cn), ve, T::one(), Par::Seq);
        }
        (o, den)
    }

    /// Causal backward of one head (MATH §4): inputs as in [`forward_causal`](Self::forward_causal)
    /// plus `o [n, dv]`, `den [n]` from it, `g = dL/do [n, dv]` and the prefix key means
    /// `kbar [n, d]`. Returns `(dq [n, d], dk [n, d], dv [n, dv])`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_causal(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        o: &[T],
        den: &[T],
        g: &[T],
        m: &[T],
        kbar: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (n, d, r, e, dv, deg, c) = (self.n, self.d(), self.r(), self.e(), self.dv, self.g(), self.c());
        let tau = self.tau();
        let coef = taylor_coefs::<T>(deg);
        let mut b = self.bufs();
        let mut s = vec![T::zero(); c * c];
        let mut da = vec![T::zero(); c * c];
        let (mut tmp, mut tmp2) = (vec![T::zero(); c], vec![T::zero(); c]);
        let mut dq = vec![T::zero(); n * d];
        let mut dk = vec![T::zero(); n * d];
        let mut dvv = vec![T::zero(); n * dv];
        let mut dm = vec![T::zero(); n];
        // Forward scan: dQ through the prefix state, and every intra-chunk term.
        let mut state = vec![T::zero(); r * e];
        for (i0, cn) in self.chunks() {
            let (qc, kc) = (&q[i0 * d..(i0 + cn) * d], &k[i0 * d..(i0 + cn) * d]);
            self.query_features(qc, &m[i0..i0 + cn], cn, &mut b);
            self.dy(&g[i0 * dv..], &o[i0 * dv..], &den[i0..], cn, &mut b.y);
            self.aug_v(&v[i0 * dv..(i0 + cn) * dv], cn, &mut b.ve);
            // dΨᵀ = S' dYᵀ
            let dy = rm(&b.y[..cn * e], cn, e);
            matmul(rm_mut(&mut b.dphit[..r * cn], r, cn), false, rm(&state, r, e), dy.transpose(), T::one(), Par::Seq);
            self.query_vjp(cn, &mut b, &mut dm[i0..i0 + cn], &mut dq[i0 * d..(i0 + cn) * d]);
            // intra: dA = dY V'ᵀ, A = T_g(s̃), dS̃ = dA ∘ T_{g−1}(s̃) (masked)
            let (dy, ve) = (rm(&b.y[..cn * e], cn, e), rm(&b.ve[..cn * e], cn, e));
            self.chunk_scores(qc, kc, cn, &mut s);
            matmul(rm_mut(&mut da[..cn * cn], cn, cn), false, dy, ve.transpose(), T::one(), Par::Seq);
            simd(
                #[inline(always)]
                || {
                    for il in 0..cn {
                        let mi = if self.center { m[i0 + il] } else { T::zero() };
                        let (srow, drow) = (&mut s[il * cn..(il + 1) * cn], &mut da[il * cn..(il + 1) * cn]);
                        let (sh, t1) = (&mut tmp[..=il], &mut tmp2[..=il]);
                        for (a, x) in sh.iter_mut().zip(&srow[..=il]) {
                            *a = *x - mi;
                        }
                        horner_into(&coef, sh, &mut srow[..=il]); // a = T_g(s̃)
                        horner_into(&coef[..deg], sh, t1); // T_{g−1}(s̃)
                        let mut dmi = T::zero();
                        for (dx, t) in drow[..=il].iter_mut().zip(t1.iter()) {
                            *dx *= *t;
                            dmi += *dx;
                        }
                        srow[il + 1..].fill(T::zero());
                        drow[il + 1..].fill(T::zero());
                        dm[i0 + il] -= dmi;
                    }
                },
            );
            let (sa, dsa) = (rm(&s[..cn * cn], cn, cn), rm(&da[..cn * cn], cn, cn));
            matmul(rm_mut(&mut dq[i0 * d..(i0 + cn) * d], cn, d), true, dsa, rm(kc, cn, d), tau, Par::Seq);
            matmul(rm_mut(&mut dk[i0 * d..(i0 + cn) * d], cn, d), true, dsa.transpose(), rm(qc, cn, d), tau, Par::Seq);
            let dy_v = rm_strided(&b.y[..cn * e], cn, dv, e);
            matmul(rm_mut(&mut dvv[i0 * dv..(i0 + cn) * dv], cn, dv), true, sa.transpose(), dy_v, T::one(), Par::Seq);
            // S' += Φ_K,cᵀ V'_c
            self.features(kc, cn, &mut b.xt, &mut b.phit);
            matmul(rm_mut(&mut state, r, e), true, rm(&b.phit[..r * cn], r, cn), ve, T::one(), Par::Seq);
        }
        // Reverse scan: dK, dV through the suffix state dS' = Σ_{later i} Ψ_i dY_iᵀ.
        let mut dstate = state;
        dstate.fill(T::zero());
        for (i0, cn) in self.chunks().rev() {
            let kc = &k[i0 * d..(i0 + cn) * d];
            self.features(kc, cn, &mut b.xt, &mut b.phit);
            self.aug_v(&v[i0 * dv..(i0 + cn) * dv], cn, &mut b.ve);
            // dΦ_Kᵀ = dS' V'ᵀ ;  dV += Φ_K dS'[:, :dv]
            let (ds, ds_v) = (rm(&dstate, r, e), rm_strided(&dstate, r, dv, e));
            let ve = rm(&b.ve[..cn * e], cn, e);
            matmul(rm_mut(&mut b.dphit[..r * cn], r, cn), false, ds, ve.transpose(), T::one(), Par::Seq);
            let phi = rm(&b.phit[..r * cn], r, cn).transpose();
            matmul(rm_mut(&mut dvv[i0 * dv..(i0 + cn) * dv], cn, dv), true, phi, ds_v, T::one(), Par::Seq);
            self.key_vjp(cn, &mut b, &mut dk[i0 * d..(i0 + cn) * d]);
            // dS' += Ψᵀ dY
            self.query_features(&q[i0 * d..(i0 + cn) * d], &m[i0..i0 + cn], cn, &mut b);
            self.dy(&g[i0 * dv..], &o[i0 * dv..], &den[i0..], cn, &mut b.y);
            let dy = rm(&b.y[..cn * e], cn, e);
            matmul(rm_mut(&mut dstate, r, e), true, rm(self.psi(&b, cn), r, cn), dy, T::one(), Par::Seq);
        }
        // Through the shift: dq_i += τ dm_i k̄_i; key j gets Σ_{i≥j} τ dm_i q_i/(i+1) (suffix sum).
        if self.center {
            let mut acc = vec![0.0f64; d];
            for i in (0..n).rev() {
                let s = tau * dm[i];
                let inv = 1.0 / (i + 1) as f64;
                for ch in 0..d {
                    dq[i * d + ch] += s * kbar[i * d + ch];
                    acc[ch] += (s * q[i * d + ch]).as_f64() * inv;
                    dk[i * d + ch] += T::from_f64(acc[ch]);
                }
            }
        }
        (dq, dk, dvv)
    }
}

/// `[1/0!, 1/1!, …, 1/g!]`: the coefficients of `T_g`.
fn taylor_coefs<T: Scalar>(g: usize) -> Vec<T> {
    let mut c = Vec::with_capacity(g + 1);
    let mut f = 1.0f64;
    for t in 0..=g {
        if t > 0 {
            f /= t as f64;
        }
        c.push(T::from_f64(f));
    }
    c
}

/// `out[j] = Σ_t coef[t] x[j]ᵗ` by Horner's rule, one vector pass per coefficient (`coef` from
/// [`taylor_coefs`], possibly truncated: `T_{len−1}`).
#[inline(always)]
fn horner_into<T: Scalar>(coef: &[T], x: &[T], out: &mut [T]) {
    let (last, rest) = coef.split_last().expect("at least one coefficient");
    out.fill(*last);
    for c in rest.iter().rev() {
        for (o, v) in out.iter_mut().zip(x) {
            *o = *o * *v + *c;
        }
    }
}
