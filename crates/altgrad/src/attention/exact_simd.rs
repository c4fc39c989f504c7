//! The f32 exact kernel with explicit SIMD (AVX-512F or AVX2+FMA, chosen at run time): the
//! algorithm of [`super::exact`] (MATH §2; FA2 Alg. 1–2, the same tiles, masks and skipping), with
//! the tile products done by [`crate::simd::gemm`] on cache-resident operands instead of one faer
//! call each, and the softmax passes on whole registers with the vectorized `exp`.
//!
//! The forward works in the transposed layout: per query block the queries are the vector lanes
//! (`Qᵀτ [d, queries]` packed once per block), `Sᵀ = K_j (Q_i τ)ᵀ` and `Oᵀ += V_jᵀ Pᵀ`, so the
//! online softmax runs down columns with no horizontal reductions and both products have the
//! query block as their wide side. The backward keeps the row layout (`S = Q_i (K_j τ)ᵀ`,
//! `dP = G_i V_jᵀ`, with `(K_j τ)ᵀ` and `V_jᵀ` packed once per key block) and forms `dV`, `dQ`,
//! `dK` from `P` and `dS` as FA2 does. Score tiles, the output accumulators of a query block and
//! the `dK`, `dV` accumulators of a key block live in per-head scratch (L1/L2-sized); nothing of
//! size `n²` exists. Inputs and outputs are the caller's strided head views.

use super::exact::{apply_mask, key_block_of, tile, Tile};
use super::workspace::{Pool, Pooled};
use super::Mask;
use crate::simd::{gemm, Level, Strided, Tiles, Vector};
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};

/// A read-only head: element `(i, c)` at `ptr + i·stride + c`.
#[derive(Clone, Copy, Debug)]
pub(super) struct View {
    pub ptr: *const f32,
    pub stride: usize,
}

/// A writable head: element `(i, c)` at `ptr + i·stride + c`.
#[derive(Clone, Copy, Debug)]
pub(super) struct ViewMut {
    pub ptr: *mut f32,
    pub stride: usize,
}

// SAFETY (Send, Sync of View, ViewMut, Head): they point into the caller's tensors, which outlive
// every call here; the parallel parts of one head ([`forward_parts`], [`backward_parts`]) read the
// inputs and write disjoint output rows or their own scratch.
unsafe impl Send for View {}
unsafe impl Sync for View {}
unsafe impl Send for ViewMut {}
unsafe impl Sync for ViewMut {}
unsafe impl Send for Head {}
unsafe impl Sync for Head {}

impl View {
    /// The rows from `rows` on.
    fn skip(self, rows: usize) -> View {
        // SAFETY (of later reads): callers skip at most the view's row count
        View { ptr: self.ptr.wrapping_add(rows * self.stride), ..self }
    }
}

impl ViewMut {
    /// The rows from `rows` on.
    fn skip(self, rows: usize) -> ViewMut {
        ViewMut { ptr: self.ptr.wrapping_add(rows * self.stride), ..self }
    }
}

/// One head's problem: `q [n, d]`, `k [n_k, d]`, `v [n_k, d_v]`, its mask and scale.
#[derive(Clone, Copy, Debug)]
pub(super) struct Head {
    pub q: View,
    pub k: View,
    pub v: View,
    pub n: usize,
    pub nk: usize,
    pub d: usize,
    pub dv: usize,
    pub mask: Mask,
    pub tau: f32,
}

/// Per-head scratch of the SIMD path (grown on demand, reused through the workspace).
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    s: Vec<f32>,
    dp: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    acc: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    delta: Vec<f32>,
    /// The backward's contiguous copies of `K_j` (per key block), `Q_i` and `G_i` (per query
    /// block), read as the `B` operand of the tile products: rows of a `[batch, seq, heads, dim]`
    /// tensor sit `heads·dim` floats apart, a power of two that maps a tile's rows onto a few L1
    /// sets and evicts them between the register strips that reuse them.
    kr: Vec<f32>,
    qi: Vec<f32>,
    gi: Vec<f32>,
    /// A split head's second part's key/value gradients ([`backward_parts`]).
    part: Vec<f32>,
}

fn grow(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// Query and key rows per tile: (query block, key block). Measured on AVX-512 (Intel Xeon, 4 heads,
/// n = 4096): at d = 128 query blocks of 48–96 rows and key blocks of 64 or 128 are within 3% in
/// the forward, and key blocks of 128 are 4–5% faster in the backward than 64; the same 64 × 128
/// serves d = 16–64.
fn blocks(d: usize, dv: usize) -> (usize, usize) {
    let _ = (d, dv);
    (64, 128)
}

impl Scratch {
    fn fit_forward(&mut self, h: &Head) {
        let (bq, bk) = blocks(h.d, h.dv);
        grow(&mut self.s, bq * bk);
        grow(&mut self.kt, h.d * bq);
        grow(&mut self.acc, bq * h.dv);
        grow(&mut self.m, bq);
        grow(&mut self.l, bq);
    }
    fn fit_backward(&mut self, h: &Head) {
        let (bq, bk) = blocks(h.d, h.dv);
        grow(&mut self.s, bq * bk);
        grow(&mut self.dp, bq * bk);
        grow(&mut self.kt, h.d * bk);
        grow(&mut self.vt, h.dv * bk);
        grow(&mut self.dk, bk * h.d);
        grow(&mut self.dv, bk * h.dv);
        grow(&mut self.delta, h.n);
        grow(&mut self.kr, bk * h.d);
        grow(&mut self.qi, bq * h.d);
        grow(&mut self.gi, bq * h.dv);
    }
}

impl Head {
    /// Query rows `a..b` (`a < b ≤ n`): positions `a` later, and under a causal or window mask
    /// only the keys those rows can see.
    fn rows(&self, a: usize, b: usize) -> Head {
        let mask = self.mask.skip_rows(a);
        let nk = mask.kv_len(b - a).unwrap_or(self.nk);
        Head { q: self.q.skip(a), n: b - a, nk, mask, ..*self }
    }

    /// Where to cut the query rows into two parts of equal work (a multiple of the query block),
    /// when the head is worth splitting over threads: rows × keys above 2¹⁸ and more than one
    /// thread. Causal work grows with the position, so the cut is where `(offset + s)²` is the
    /// mean of `offset²` and `(offset + n)²`.
    fn split_point(&self) -> Option<usize> {
        const QB: usize = 64;
        if rayon::current_num_threads() < 2 || self.n < 4 * QB || self.n * self.nk < 1 << 18 {
            return None;
        }
        let s = match self.mask {
            Mask::Causal { q_offset } => {
                let (o, n) = (q_offset as f64, self.n as f64);
                (((o + n) * (o + n) + o * o) / 2.0).sqrt() - o
            }
            _ => self.n as f64 / 2.0,
        };
        Some(((s / QB as f64).round() as usize * QB).clamp(QB, self.n - QB))
    }
}

/// Splits of a head over threads: `log2(threads)` levels (2 parts on 2 threads), so a layer's
/// heads spread evenly over the threads whatever their number.
fn split_depth() -> usize {
    rayon::current_num_threads().next_power_of_two().trailing_zeros() as usize
}

/// [`forward_head`] with the head cut into parts of equal work run in parallel ([`Head::rows`]:
/// rows are independent in the forward), scratch from `pool`. Returns `false`, touching nothing,
/// without a SIMD level.
///
/// # Safety
/// As [`forward_head`].
pub(super) unsafe fn forward_parts(level: Level, h: &Head, o: ViewMut, lse: &mut [f32], pool: &Pool<Scratch>) -> bool {
    if level == Level::Generic {
        return false;
    }
    forward_split(level, h, o, lse, pool, split_depth());
    true
}

unsafe fn forward_split(level: Level, h: &Head, o: ViewMut, lse: &mut [f32], pool: &Pool<Scratch>, depth: usize) {
    match h.split_point().filter(|_| depth > 0) {
        None => {
            let mut sc = Pooled::get(Some(pool), |_| {});
            forward_head(level, h, o, lse, &mut sc);
        }
        Some(s) => {
            let (h1, h2) = (h.rows(0, s), h.rows(s, h.n));
            let (l1, l2) = lse.split_at_mut(s);
            rayon::join(
                || forward_split(level, &h1, o, l1, pool, depth - 1),
                || forward_split(level, &h2, o.skip(s), l2, pool, depth - 1),
            );
        }
    }
}

/// [`backward_head`] with the head cut into parts of equal work run in parallel: each part's
/// rows of `dq` directly, its key/value gradients into its own scratch (added afterwards) for
/// every part but the first. Returns `false`, touching nothing, without a SIMD level.
///
/// # Safety
/// As [`backward_head`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn backward_parts(
    level: Level,
    h: &Head,
    o: View,
    lse: &[f32],
    g: View,
    dq: ViewMut,
    dk: ViewMut,
    dv: ViewMut,
    pool: &Pool<Scratch>,
) -> bool {
    if level == Level::Generic {
        return false;
    }
    backward_split(level, h, o, lse, g, dq, dk, dv, pool, split_depth());
    true
}

#[allow(clippy::too_many_arguments)]
unsafe fn backward_split(
    level: Level,
    h: &Head,
    o: View,
    lse: &[f32],
    g: View,
    dq: ViewMut,
    dk: ViewMut,
    dv: ViewMut,
    pool: &Pool<Scratch>,
    depth: usize,
) {
    match h.split_point().filter(|_| depth > 0) {
        None => {
            let mut sc = Pooled::get(Some(pool), |_| {});
            backward_head(level, h, o, lse, g, dq, dk, dv, &mut sc);
        }
        Some(s) => {
            let (h1, h2) = (h.rows(0, s), h.rows(s, h.n));
            let (d, dvw) = (h.d, h.dv);
            // the second part's key/value gradients: zeroed scratch, added below
            let mut part = Pooled::get(Some(pool), |sc: &mut Scratch| grow(&mut sc.part, h2.nk * (d + dvw)));
            let buf = &mut part.part[..h2.nk * (d + dvw)];
            buf.fill(0.0);
            let (pk, pv) = buf.split_at_mut(h2.nk * d);
            let dk2 = ViewMut { ptr: pk.as_mut_ptr(), stride: d };
            let dv2 = ViewMut { ptr: pv.as_mut_ptr(), stride: dvw };
            rayon::join(
                || backward_split(level, &h1, o, &lse[..s], g, dq, dk, dv, pool, depth - 1),
                || backward_split(level, &h2, o.skip(s), &lse[s..], g.skip(s), dq.skip(s), dk2, dv2, pool, depth - 1),
            );
            add_to(pk, h2.nk, d, dk);
            add_to(pv, h2.nk, dvw, dv);
        }
    }
}

/// `dst[r] += src[r]` over `rows` rows of `width` (`src` contiguous).
unsafe fn add_to(src: &[f32], rows: usize, width: usize, dst: ViewMut) {
    for r in 0..rows {
        let d = dst.ptr.add(r * dst.stride);
        for (c, x) in src[r * width..(r + 1) * width].iter().enumerate() {
            *d.add(c) += *x;
        }
    }
}

/// Whether this CPU has a SIMD path (AVX-512F or AVX2+FMA, [`Level::detect`]).
pub(super) fn available() -> bool {
    Level::detect() != Level::Generic
}

/// Forward of one head (as [`super::exact::forward_head`]): writes `o [n, d_v]` and `lse [n]`.
/// Returns `false`, touching nothing, when the CPU has no SIMD path.
///
/// # Safety
/// The views must address valid `f32` heads of the sizes in `h` (`o` writable, not overlapping
/// the inputs), and `lse.len() ≥ h.n`.
pub(super) unsafe fn forward_head(level: Level, h: &Head, o: ViewMut, lse: &mut [f32], sc: &mut Scratch) -> bool {
    sc.fit_forward(h);
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => forward_avx512(h, o, lse, sc),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => forward_avx2(h, o, lse, sc),
        _ => return false,
    }
    true
}

/// Backward of one head (as [`super::exact::backward_head`]): adds into `dq [n, d]`,
/// `dk [n_k, d]`, `dv [n_k, d_v]`. Returns `false`, touching nothing, when the CPU has no SIMD path.
///
/// # Safety
/// As [`forward_head`]; `o`, `g` are `[n, d_v]` heads, `lse.len() ≥ h.n`, the gradient views are
/// writable and overlap nothing else.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn backward_head(
    level: Level,
    h: &Head,
    o: View,
    lse: &[f32],
    g: View,
    dq: ViewMut,
    dk: ViewMut,
    dv: ViewMut,
    sc: &mut Scratch,
) -> bool {
    sc.fit_backward(h);
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => backward_avx512(h, o, lse, g, dq, dk, dv, sc),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => backward_avx2(h, o, lse, g, dq, dk, dv, sc),
        _ => return false,
    }
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn forward_avx512(h: &Head, o: ViewMut, lse: &mut [f32], sc: &mut Scratch) {
    forward::<Avx512>(h, o, lse, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(h: &Head, o: ViewMut, lse: &mut [f32], sc: &mut Scratch) {
    forward::<Avx2>(h, o, lse, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_avx512(
    h: &Head,
    o: View,
    lse: &[f32],
    g: View,
    dq: ViewMut,
    dk: ViewMut,
    dv: ViewMut,
    sc: &mut Scratch,
) {
    backward::<Avx512>(h, o, lse, g, dq, dk, dv, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_avx2(
    h: &Head,
    o: View,
    lse: &[f32],
    g: View,
    dq: ViewMut,
    dk: ViewMut,
    dv: ViewMut,
    sc: &mut Scratch,
) {
    backward::<Avx2>(h, o, lse, g, dq, dk, dv, sc)
}

/// `dst [cols, rows]` (row-major, row stride `rows`) = `alpha · srcᵀ` for the `rows × cols` head `src`.
#[inline(always)]
unsafe fn pack_transposed(src: View, rows: usize, cols: usize, alpha: f32, dst: &mut [f32]) {
    // blocks of 16 rows keep the writes of each source row's columns in a few cache lines
    const B: usize = 16;
    let mut i0 = 0;
    while i0 < rows {
        let ib = B.min(rows - i0);
        for c in 0..cols {
            let out = &mut dst[c * rows + i0..c * rows + i0 + ib];
            for (r, x) in out.iter_mut().enumerate() {
                *x = alpha * *src.ptr.add((i0 + r) * src.stride + c);
            }
        }
        i0 += ib;
    }
}

/// `rows` rows of `src`, `cols` wide, as a row-major `[rows, cols]` block: the source itself when the
/// source is already contiguous (`stride == cols`), else a copy into `buf`.
unsafe fn contiguous(src: View, rows: usize, cols: usize, buf: &mut [f32]) -> *const f32 {
    if src.stride == cols {
        return src.ptr;
    }
    for r in 0..rows {
        std::ptr::copy_nonoverlapping(src.ptr.add(r * src.stride), buf.as_mut_ptr().add(r * cols), cols);
    }
    buf.as_ptr()
}

/// `v` as it is, or copied to `buf` with a row stride of an odd number of cache lines when its own
/// stride is a multiple of 1 KiB: the forward reads `V_j` down its columns (`MR` values of one row,
/// then the next row), and rows 1 KiB apart fall into a few L1 sets, which evict each other
/// before the next `MR` columns reuse them.
unsafe fn padded_copy(v: View, rows: usize, cols: usize, buf: &mut Vec<f32>) -> View {
    if !v.stride.is_multiple_of(256) {
        return v;
    }
    let lines = cols.div_ceil(16);
    let ld = 16 * (lines + 1 - lines % 2);
    grow(buf, rows * ld);
    for r in 0..rows {
        std::ptr::copy_nonoverlapping(v.ptr.add(r * v.stride), buf.as_mut_ptr().add(r * ld), cols);
    }
    View { ptr: buf.as_ptr(), stride: ld }
}

/// `row[j] = exp(row[j] − shift)`; returns their sum.
#[inline(always)]
unsafe fn exp_shift_sum<S: Vector>(row: &mut [f32], shift: f32) -> f32 {
    let l = S::LANES;
    let sh = S::splat(shift);
    let mut acc = S::splat(0.0);
    let p = row.as_mut_ptr();
    let mut j = 0;
    while j + l <= row.len() {
        let e = S::exp(S::sub(S::load(p.add(j)), sh));
        S::store(p.add(j), e);
        acc = S::add(acc, e);
        j += l;
    }
    if j < row.len() {
        let m = S::mask(row.len() - j);
        S::store_m(p.add(j), S::exp(S::sub(S::load_m(p.add(j), m), sh)), m);
    }
    let mut sum = S::hsum(acc);
    for x in &row[j..] {
        sum += *x;
    }
    sum
}

/// `ds[j] = p[j] · (ds[j] − δ)` over one row.
#[inline(always)]
unsafe fn softmax_grad_row<S: Vector>(p: &[f32], ds: &mut [f32], delta: f32) {
    let l = S::LANES;
    let dl = S::splat(delta);
    let (pp, dp) = (p.as_ptr(), ds.as_mut_ptr());
    let len = ds.len();
    let mut j = 0;
    while j + l <= len {
        S::store(dp.add(j), S::mul(S::load(pp.add(j)), S::sub(S::load(dp.add(j)), dl)));
        j += l;
    }
    if j < len {
        let m = S::mask(len - j);
        S::store_m(dp.add(j), S::mul(S::load_m(pp.add(j), m), S::sub(S::load_m(dp.add(j), m), dl)), m);
    }
}

/// Σ_c a[c]·b[c] for two rows of `len`.
#[inline(always)]
unsafe fn dot<S: Vector>(a: *const f32, b: *const f32, len: usize) -> f32 {
    let l = S::LANES;
    let mut acc = S::splat(0.0);
    let mut j = 0;
    while j + l <= len {
        acc = S::fma(S::load(a.add(j)), S::load(b.add(j)), acc);
        j += l;
    }
    if j < len {
        let m = S::mask(len - j);
        acc = S::fma(S::load_m(a.add(j), m), S::load_m(b.add(j), m), acc);
    }
    S::hsum(acc)
}

/// Key tiles `j0..j0 + bc` of query block `p0..=p1` in order, skipping what the mask hides
/// (the loop of [`super::exact::forward_head`]).
#[inline(always)]
fn next_key_tile(mask: &Mask, p0: usize, mut j0: usize, kend: usize) -> Option<usize> {
    if let Mask::Window { window, sinks, .. } = *mask {
        if j0 >= sinks {
            j0 = j0.max((p0 + 1).saturating_sub(window));
        }
    }
    (j0 < kend).then_some(j0)
}

/// A running maximum below every real score but finite: a column that has seen only masked
/// keys keeps it, so `exp(−∞ − M0) = 0` and `exp(M0 − M0) = 1` need no special case, and the
/// first real score rescales the (zero) accumulators by `exp(M0 − m) = 0`.
const M0: f32 = -1e30;

/// Sets the entries of the transposed score tile `st [bc, br]` that the mask hides to −∞ (row
/// `j` is key `j0 + j`, column `r` query position `p0 + r`).
#[inline(always)]
fn apply_mask_t(mask: &Mask, st: &mut [f32], bc: usize, br: usize, p0: usize, j0: usize) {
    if let Mask::Causal { .. } = mask {
        // key j0 + j is seen by positions p0 + r ≥ j0 + j: the hidden ones are a prefix
        for (j, row) in st[..bc * br].chunks_exact_mut(br).enumerate() {
            let hidden = (j0 + j).saturating_sub(p0).min(br);
            row[..hidden].fill(f32::NEG_INFINITY);
        }
        return;
    }
    for (j, row) in st[..bc * br].chunks_exact_mut(br).enumerate() {
        for (r, x) in row.iter_mut().enumerate() {
            if !mask.allows(p0 + r, j0 + j) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Forward in the transposed layout: per query block the queries are the vector lanes, so the
/// online softmax runs down the columns of `Sᵀ [keys, queries]` with no horizontal reductions,
/// and both products have the query block as their wide side: `Sᵀ = K_j (Q_i τ)ᵀ`,
/// `Oᵀ += V_jᵀ Pᵀ` (`Oᵀ [d_v, queries]` in scratch, written out transposed and normalized).
#[inline(always)]
unsafe fn forward<S: Tiles>(h: &Head, o: ViewMut, lse: &mut [f32], sc: &mut Scratch) {
    let Head { q, k, v, n, nk, d, dv, mask, tau } = *h;
    let off = mask.q_offset();
    let lanes = S::LANES;
    let Scratch { s, kt: qt, acc, m, l, vt: vbuf, .. } = sc;
    let v = padded_copy(v, nk, dv, vbuf);
    let (bq, bk) = blocks(d, dv);
    let mut i0 = 0;
    while i0 < n {
        let br = bq.min(n - i0);
        let (p0, p1) = (off + i0, off + i0 + br - 1);
        pack_transposed(View { ptr: q.ptr.add(i0 * q.stride), stride: q.stride }, br, d, tau, qt);
        acc[..dv * br].fill(0.0);
        m[..br].fill(M0);
        l[..br].fill(0.0);
        let kend = if mask.is_causal() { nk.min(p1 + 1) } else { nk };
        let mut j0 = 0;
        let mut first = true;
        while let Some(j) = next_key_tile(&mask, p0, j0, kend) {
            j0 = j;
            let bc = key_block_of(&mask, j0, kend, bk);
            let t = tile(&mask, p0, p1, j0, j0 + bc);
            if t == Tile::Empty {
                j0 += bc;
                continue;
            }
            let st = &mut s[..bc * br];
            let ka = Strided { ptr: k.ptr.add(j0 * k.stride), rs: k.stride, cs: 1 };
            gemm::<S>(bc, br, d, ka, qt.as_ptr(), br, st.as_mut_ptr(), br, 1.0, false);
            if t == Tile::Partial {
                apply_mask_t(&mask, st, bc, br, p0, j0);
            }
            // per register of query lanes: column max, exp, column sum, rescale of Oᵀ
            let mut r0 = 0;
            while r0 < br {
                let mk = S::mask(br - r0);
                let sp = st.as_mut_ptr().add(r0);
                let m_old = S::load_m(m.as_ptr().add(r0), mk);
                let mut m_new = m_old;
                for j in 0..bc {
                    m_new = S::max(m_new, S::load_m(sp.add(j * br), mk));
                }
                let mut sum = S::splat(0.0);
                for j in 0..bc {
                    let e = S::exp(S::sub(S::load_m(sp.add(j * br), mk), m_new));
                    S::store_m(sp.add(j * br), e, mk);
                    sum = S::add(sum, e);
                }
                let rescale = S::exp(S::sub(m_old, m_new));
                let l_new = S::fma(S::load_m(l.as_ptr().add(r0), mk), rescale, sum);
                S::store_m(l.as_mut_ptr().add(r0), l_new, mk);
                S::store_m(m.as_mut_ptr().add(r0), m_new, mk);
                // Oᵀ's columns need rescaling only when their max moved (m_new ≥ m_old, so the sum
                // of the differences is 0 exactly when none did: the rescale would be exp(0) = 1)
                // and not before the first tile has added anything
                if !first && S::hsum(S::sub(m_new, m_old)) != 0.0 {
                    for c in 0..dv {
                        let ap = acc.as_mut_ptr().add(c * br + r0);
                        S::store_m(ap, S::mul(S::load_m(ap, mk), rescale), mk);
                    }
                }
                r0 += lanes;
            }
            // Oᵀ += V_jᵀ Pᵀ: A(c, j) = V[j0 + j, c] (packing V_jᵀ per tile measured 25% slower)
            let va = Strided { ptr: v.ptr.add(j0 * v.stride), rs: 1, cs: v.stride };
            gemm::<S>(dv, br, bc, va, st.as_ptr(), br, acc.as_mut_ptr(), br, 1.0, true);
            first = false;
            j0 += bc;
        }
        // every row sees its own position (and key 0 when causal), so l > 0
        for r in 0..br {
            let inv = 1.0 / l[r];
            let dst = o.ptr.add((i0 + r) * o.stride);
            for c in 0..dv {
                *dst.add(c) = acc[c * br + r] * inv;
            }
            lse[i0 + r] = m[r] + l[r].ln();
        }
        i0 += br;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn backward<S: Tiles>(
    h: &Head,
    o: View,
    lse: &[f32],
    g: View,
    dq: ViewMut,
    dk: ViewMut,
    dv: ViewMut,
    sc: &mut Scratch,
) {
    let Head { q, k, v, n, nk, d, dv: dvw, mask, tau } = *h;
    let off = mask.q_offset();
    let Scratch { s: p, dp, kt, vt, dk: dk_acc, dv: dv_acc, delta, kr, qi, gi, .. } = sc;
    // δ_i = Σ_c G_ic O_ic
    for (i, dl) in delta[..n].iter_mut().enumerate() {
        *dl = dot::<S>(g.ptr.add(i * g.stride), o.ptr.add(i * o.stride), dvw);
    }
    let (bq, bk) = blocks(d, dvw);
    let mut j0 = 0;
    while j0 < nk {
        let bc = key_block_of(&mask, j0, nk, bk);
        // this key block's (Kτ)ᵀ [d, bc] and Vᵀ [d_v, bc], contiguous
        pack_transposed(View { ptr: k.ptr.add(j0 * k.stride), stride: k.stride }, bc, d, tau, kt);
        pack_transposed(View { ptr: v.ptr.add(j0 * v.stride), stride: v.stride }, bc, dvw, 1.0, vt);
        let kj = contiguous(View { ptr: k.ptr.add(j0 * k.stride), stride: k.stride }, bc, d, kr);
        dk_acc[..bc * d].fill(0.0);
        dv_acc[..bc * dvw].fill(0.0);
        // causal: only positions p ≥ j0 see these keys; start at the query block holding j0
        let first = if mask.is_causal() { j0.saturating_sub(off) } else { 0 };
        let mut i0 = (first / bq) * bq;
        while i0 < n {
            let br = bq.min(n - i0);
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
            let qp = contiguous(View { ptr: q.ptr.add(i0 * q.stride), stride: q.stride }, br, d, qi);
            let gp = contiguous(View { ptr: g.ptr.add(i0 * g.stride), stride: g.stride }, br, dvw, gi);
            let qa = Strided { ptr: qp, rs: d, cs: 1 };
            let ga = Strided { ptr: gp, rs: dvw, cs: 1 };
            let pt = &mut p[..br * bc];
            let dpt = &mut dp[..br * bc];
            // P = exp(τ Q Kᵀ − lse)
            gemm::<S>(br, bc, d, qa, kt.as_ptr(), bc, pt.as_mut_ptr(), bc, 1.0, false);
            if t == Tile::Partial {
                apply_mask(&mask, pt, br, bc, p0, j0);
            }
            for r in 0..br {
                exp_shift_sum::<S>(&mut pt[r * bc..(r + 1) * bc], lse[i0 + r]);
            }
            // dV_j += Pᵀ G_i
            let pta = Strided { ptr: pt.as_ptr(), rs: 1, cs: bc };
            gemm::<S>(bc, dvw, br, pta, gp, dvw, dv_acc.as_mut_ptr(), dvw, 1.0, true);
            // dP = G_i V_jᵀ, then dS = P ∘ (dP − δ)
            gemm::<S>(br, bc, dvw, ga, vt.as_ptr(), bc, dpt.as_mut_ptr(), bc, 1.0, false);
            for r in 0..br {
                softmax_grad_row::<S>(&pt[r * bc..(r + 1) * bc], &mut dpt[r * bc..(r + 1) * bc], delta[i0 + r]);
            }
            // dQ_i += τ dS K_j ;  dK_j += τ dSᵀ Q_i
            let dsa = Strided { ptr: dpt.as_ptr(), rs: bc, cs: 1 };
            let dq_i = dq.ptr.add(i0 * dq.stride);
            gemm::<S>(br, d, bc, dsa, kj, d, dq_i, dq.stride, tau, true);
            let dsta = Strided { ptr: dpt.as_ptr(), rs: 1, cs: bc };
            gemm::<S>(bc, d, br, dsta, qp, d, dk_acc.as_mut_ptr(), d, tau, true);
            i0 += br;
        }
        add_rows::<S>(dk_acc, bc, d, ViewMut { ptr: dk.ptr.add(j0 * dk.stride), stride: dk.stride });
        add_rows::<S>(dv_acc, bc, dvw, ViewMut { ptr: dv.ptr.add(j0 * dv.stride), stride: dv.stride });
        j0 += bc;
    }
}

/// `dst[r] += src[r]` for `rows` rows of `len` (`src` contiguous, `dst` strided).
#[inline(always)]
unsafe fn add_rows<S: Vector>(src: &[f32], rows: usize, len: usize, dst: ViewMut) {
    let l = S::LANES;
    for r in 0..rows {
        let (s, d) = (src.as_ptr().add(r * len), dst.ptr.add(r * dst.stride));
        let mut j = 0;
        while j + l <= len {
            S::store(d.add(j), S::add(S::load(d.add(j)), S::load(s.add(j))));
            j += l;
        }
        if j < len {
            let m = S::mask(len - j);
            S::store_m(d.add(j), S::add(S::load_m(d.add(j), m), S::load_m(s.add(j), m)), m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{naive, AttnShape, Qkv};

    fn randn(len: usize, seed: u64) -> Vec<f64> {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| r.random::<f64>() * 2.0 - 1.0).map(|x| 1.7 * x).collect()
    }

    fn rel(got: &[f32], want: &[f64]) -> f64 {
        let num: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
        // relative, with an absolute floor of 0.1 per element for gradients that vanish (one
        // visible key: dq = dk = 0 exactly, the kernels' rounding is ~1e-7)
        let den: f64 = want.iter().map(|b| b * b).sum::<f64>().max(1e-2 * want.len() as f64);
        (num / den).sqrt()
    }

    /// A head cut into parallel parts ([`forward_parts`], [`backward_parts`]; 2 threads, 2 levels
    /// of cuts) against the naive forms under every mask kind, with `q_offset` so the causal cut
    /// is not at the middle.
    #[test]
    fn split_heads_match_the_naive_forms() {
        if Level::detect() == Level::Generic {
            return; // no SIMD path on this CPU (the portable kernel is tested elsewhere)
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let (n, d, dv) = (600, 16, 24);
        for mask in [Mask::Full, Mask::Causal { q_offset: 90 }, Mask::Window { window: 200, sinks: 4, q_offset: 0 }] {
            let nk = mask.kv_len(n).unwrap_or(n + 7);
            let (q, k, v, g) = (randn(n * d, 1), randn(nk * d, 2), randn(nk * dv, 3), randn(n * dv, 4));
            let s = AttnShape::new(n, 1, 1, d).with_head_dim_v(dv).with_kv_len(nk);
            let x = Qkv::new(&q, &k, &v, &s).unwrap();
            let off = mask.q_offset();
            let allowed: Vec<Vec<bool>> = (0..n).map(|i| (0..nk).map(|j| mask.allows(off + i, j)).collect()).collect();
            let tau = 0.3;
            let o_ref = naive::forward_masked(&x, &allowed, tau);
            let (dq_ref, dk_ref, dv_ref) = naive::backward_masked(&x, &g, &allowed, tau);
            let f = |x: &[f64]| x.iter().map(|v| *v as f32).collect::<Vec<f32>>();
            let (qf, kf, vf, gf) = (f(&q), f(&k), f(&v), f(&g));
            let view = |x: &[f32], w: usize| View { ptr: x.as_ptr(), stride: w };
            let h = Head { q: view(&qf, d), k: view(&kf, d), v: view(&vf, dv), n, nk, d, dv, mask, tau: tau as f32 };
            let (mut o, mut lse) = (vec![0.0f32; n * dv], vec![0.0f32; n]);
            let (mut dq, mut dk, mut dvv) = (vec![0.0f32; n * d], vec![0.0f32; nk * d], vec![0.0f32; nk * dv]);
            let scratch = Pool::default();
            pool.install(|| {
                assert!(h.split_point().is_some(), "{mask:?}: the head must be cut");
                // SAFETY: every buffer has the size the head describes.
                unsafe {
                    let level = Level::detect();
                    assert!(forward_parts(level, &h, ViewMut { ptr: o.as_mut_ptr(), stride: dv }, &mut lse, &scratch));
                    let vm = |x: &mut [f32], w: usize| ViewMut { ptr: x.as_mut_ptr(), stride: w };
                    let (a, b, c) = (vm(&mut dq, d), vm(&mut dk, d), vm(&mut dvv, dv));
                    assert!(backward_parts(level, &h, view(&o, dv), &lse, view(&gf, dv), a, b, c, &scratch));
                }
            });
            for (name, got, want) in
                [("o", &o, &o_ref), ("dq", &dq, &dq_ref), ("dk", &dk, &dk_ref), ("dv", &dvv, &dv_ref)]
            {
                let e = rel(got, want);
                assert!(e < 2e-5, "{mask:?}: {name} rel err {e:e}");
            }
        }
    }

    /// Heads inside wider rows (as in `[batch, seq, heads, dim]`): a row stride that is a multiple
    /// of 1 KiB (the forward's padded copy of `V`) and one that is not (the backward's contiguous
    /// copies of `K_j`, `Q_i`, `G_i`), against the naive O(n²) forms in f64.
    #[test]
    fn strided_heads_match_the_naive_forms() {
        let level = Level::detect();
        if level == Level::Generic {
            return; // no SIMD path on this CPU (the portable kernel is tested elsewhere)
        }
        let (n, d, dv) = (150, 64, 40);
        for stride in [256, 100, 512] {
            for mask in [Mask::Full, Mask::Causal { q_offset: 0 }] {
                let (q, k, v, g) = (randn(n * d, 7), randn(n * d, 8), randn(n * dv, 9), randn(n * dv, 10));
                let s = AttnShape::new(n, 1, 1, d).with_head_dim_v(dv);
                let x = Qkv::new(&q, &k, &v, &s).unwrap();
                let allowed: Vec<Vec<bool>> = (0..n).map(|i| (0..n).map(|j| mask.allows(i, j)).collect()).collect();
                let tau = 0.125;
                let o_ref = naive::forward_masked(&x, &allowed, tau);
                let (dq_ref, dk_ref, dv_ref) = naive::backward_masked(&x, &g, &allowed, tau);
                // each row at `stride`, the gaps filled with NaN: a read outside the head shows
                let wide = |x: &[f64], w: usize| {
                    let mut out = vec![f32::NAN; n * stride];
                    for (i, row) in x.chunks_exact(w).enumerate() {
                        for (c, val) in row.iter().enumerate() {
                            out[i * stride + c] = *val as f32;
                        }
                    }
                    out
                };
                let (qw, kw, vw, gw) = (wide(&q, d), wide(&k, d), wide(&v, dv), wide(&g, dv));
                let view = |x: &[f32]| View { ptr: x.as_ptr(), stride };
                let h = Head { q: view(&qw), k: view(&kw), v: view(&vw), n, nk: n, d, dv, mask, tau: tau as f32 };
                let (mut o, mut lse) = (vec![0.0f32; n * dv], vec![0.0f32; n]);
                let (mut dq, mut dk, mut dvv) = (vec![0.0f32; n * d], vec![0.0f32; n * d], vec![0.0f32; n * dv]);
                let mut sc = Scratch::default();
                // SAFETY: every buffer has the size the head describes.
                unsafe {
                    assert!(forward_head(level, &h, ViewMut { ptr: o.as_mut_ptr(), stride: dv }, &mut lse, &mut sc));
                    let vm = |x: &mut [f32], w: usize| ViewMut { ptr: x.as_mut_ptr(), stride: w };
                    let (a, b, c) = (vm(&mut dq, d), vm(&mut dk, d), vm(&mut dvv, dv));
                    let ov = View { ptr: o.as_ptr(), stride: dv };
                    assert!(backward_head(level, &h, ov, &lse, view(&gw), a, b, c, &mut sc));
                }
                for (name, got, want) in
                    [("o", &o, &o_ref), ("dq", &dq, &dq_ref), ("dk", &dk, &dk_ref), ("dv", &dvv, &dv_ref)]
                {
                    let e = rel(got, want);
                    assert!(e < 2e-5, "stride {stride} {mask:?}: {name} rel err {e:e}");
                }
            }
        }
    }

    /// Every SIMD level this CPU has (not only the detected one), one head, against the naive
    /// O(n²) forward and backward in f64 under every mask kind: full, causal with a query offset,
    /// a window with sinks; widths that are not a multiple of the lanes; `n` not a multiple of the
    /// tiles.
    #[test]
    fn every_level_matches_the_naive_forms() {
        let masks = [
            Mask::Full,
            Mask::Causal { q_offset: 0 },
            Mask::Causal { q_offset: 37 },
            Mask::Window { window: 50, sinks: 3, q_offset: 0 },
            Mask::Window { window: 130, sinks: 0, q_offset: 11 },
        ];
        for level in Level::available().into_iter().filter(|l| *l != Level::Generic) {
            for (case, &(n, d, dv)) in
                [(1, 8, 8), (70, 16, 16), (200, 20, 12), (131, 64, 64), (150, 33, 40)].iter().enumerate()
            {
                for mask in masks {
                    let nk = mask.kv_len(n).unwrap_or(n + 5);
                    let seed = 100 * case as u64;
                    let (q, k, v, g) = (
                        randn(n * d, seed),
                        randn(nk * d, seed + 1),
                        randn(nk * dv, seed + 2),
                        randn(n * dv, seed + 3),
                    );
                    let s = AttnShape::new(n, 1, 1, d).with_head_dim_v(dv).with_kv_len(nk);
                    let x = Qkv::new(&q, &k, &v, &s).unwrap();
                    let off = mask.q_offset();
                    let allowed: Vec<Vec<bool>> =
                        (0..n).map(|i| (0..nk).map(|j| mask.allows(off + i, j)).collect()).collect();
                    let tau = 1.0 / (d as f64).sqrt();
                    let o_ref = naive::forward_masked(&x, &allowed, tau);
                    let (dq_ref, dk_ref, dv_ref) = naive::backward_masked(&x, &g, &allowed, tau);

                    let f = |x: &[f64]| x.iter().map(|v| *v as f32).collect::<Vec<f32>>();
                    let (qf, kf, vf, gf) = (f(&q), f(&k), f(&v), f(&g));
                    let view = |x: &[f32], w: usize| View { ptr: x.as_ptr(), stride: w };
                    let h = Head {
                        q: view(&qf, d),
                        k: view(&kf, d),
                        v: view(&vf, dv),
                        n,
                        nk,
                        d,
                        dv,
                        mask,
                        tau: tau as f32,
                    };
                    let (mut o, mut lse) = (vec![0.0f32; n * dv], vec![0.0f32; n]);
                    let mut sc = Scratch::default();
                    let (mut dq, mut dk, mut dvv) = (vec![0.0f32; n * d], vec![0.0f32; nk * d], vec![0.0f32; nk * dv]);
                    // SAFETY: every buffer has the size the head describes.
                    unsafe {
                        assert!(forward_head(
                            level,
                            &h,
                            ViewMut { ptr: o.as_mut_ptr(), stride: dv },
                            &mut lse,
                            &mut sc
                        ));
                        let vm = |x: &mut [f32], w: usize| ViewMut { ptr: x.as_mut_ptr(), stride: w };
                        let (a, b, c) = (vm(&mut dq, d), vm(&mut dk, d), vm(&mut dvv, dv));
                        assert!(backward_head(level, &h, view(&o, dv), &lse, view(&gf, dv), a, b, c, &mut sc));
                    }
                    let tag = format!("{level:?} n={n} d={d} dv={dv} {mask:?}");
                    for (name, got, want) in
                        [("o", &o, &o_ref), ("dq", &dq, &dq_ref), ("dk", &dk, &dk_ref), ("dv", &dvv, &dv_ref)]
                    {
                        let e = rel(got, want);
                        assert!(e < 2e-5, "{tag}: {name} rel err {e:e}");
                    }
                }
            }
        }
    }
}
