//! Llama-family non-attention layers with hand-written backward (MATH §6): token embedding,
//! RMSNorm, rotary position embedding (RoPE), SwiGLU and residual adds.
//!
//! Every function works on row-major slices with the shape passed alongside (`[rows, dim]`), is
//! generic over [`Scalar`] (f32, f64), and is differentiated exactly: MATH §6 approximates only
//! the attention core. Reductions (RMSNorm's mean of squares, weight-gradient sums) accumulate in
//! f64. Rows are processed in parallel with rayon when `rows × dim` exceeds [`PAR_MIN_ELEMS`].

use super::config::RopeLayout;
use crate::linalg::Scalar;
use rayon::prelude::*;

/// Element count above which the row-wise kernels here (and in [`super::loss`]) split their work
/// over rayon's threads; below it they run as plain loops (thread start-up would dominate).
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

/// Elements per parallel task (a task holds whole rows, at least one).
const PAR_BLOCK_ELEMS: usize = 1 << 13;

/// Rows per parallel task for rows of `dim` elements.
#[inline]
fn block_rows(dim: usize) -> usize {
    (PAR_BLOCK_ELEMS / dim.max(1)).max(1)
}

/// Token embedding lookup (standard definition): `out[i, :] = table[ids[i], :]`.
///
/// Shapes: `ids [n]` (already validated `< vocab`), `table [vocab, hidden]`; returns `[n, hidden]`.
pub fn embedding_forward<T: Scalar>(ids: &[u32], table: &[T], hidden: usize) -> Vec<T> {
    debug_assert_eq!(table.len() % hidden.max(1), 0);
    let mut out = Vec::with_capacity(ids.len() * hidden);
    for &id in ids {
        let r = id as usize * hidden;
        out.extend_from_slice(&table[r..r + hidden]);
    }
    out
}

/// Backward of [`embedding_forward`]: accumulates `dtable[ids[i], :] += dx[i, :]` for every `i`
/// (repeated ids add up).
///
/// Shapes: `ids [n]`, `dx [n, hidden]`, `dtable [vocab, hidden]`.
pub fn embedding_backward<T: Scalar>(ids: &[u32], dx: &[T], hidden: usize, dtable: &mut [T]) {
    assert_eq!(dx.len(), ids.len() * hidden, "embedding_backward: dx must be [n, hidden]");
    for (&id, g) in ids.iter().zip(dx.chunks_exact(hidden.max(1))) {
        let r = id as usize * hidden;
        for (d, &v) in dtable[r..r + hidden].iter_mut().zip(g) {
            *d += v;
        }
    }
}

/// RMSNorm forward (Zhang & Sennrich 2019; the Llama / HF `LlamaRMSNorm` definition):
/// `y[r, j] = x[r, j] · inv_rms[r] · w[j]` with `inv_rms[r] = 1 / sqrt(mean_j x[r, j]² + eps)`.
///
/// Shapes: `x [rows, dim]`, `w [dim]`; returns `(y [rows, dim], inv_rms [rows])`. The mean of
/// squares and the reciprocal square root are computed in f64, then `inv_rms` is rounded to `T`;
/// `inv_rms` is what [`rmsnorm_backward`] needs besides `x` and `w`.
pub fn rmsnorm_forward<T: Scalar>(x: &[T], dim: usize, w: &[T], eps: f64) -> (Vec<T>, Vec<T>) {
    assert!(dim > 0 && x.len().is_multiple_of(dim), "rmsnorm_forward: x must be [rows, dim]");
    assert_eq!(w.len(), dim, "rmsnorm_forward: w must be [dim]");
    let rows = x.len() / dim;
    let mut y = vec![T::zero(); x.len()];
    let mut inv = vec![T::zero(); rows];
    let block = |(yb, (ib, xb)): (&mut [T], (&mut [T], &[T]))| {
        for ((yr, ir), xr) in yb.chunks_exact_mut(dim).zip(ib.iter_mut()).zip(xb.chunks_exact(dim)) {
            let ms = xr.iter().map(|v| v.as_f64() * v.as_f64()).sum::<f64>() / dim as f64;
            let r = T::from_f64(1.0 / (ms + eps).sqrt());
            *ir = r;
            for ((yj, &xj), &wj) in yr.iter_mut().zip(xr).zip(w) {
                *yj = xj * r * wj;
            }
        }
    };
    if x.len() > PAR_MIN_ELEMS {
        let br = block_rows(dim);
        y.par_chunks_mut(br * dim).zip(inv.par_chunks_mut(br).zip(x.par_chunks(br * dim))).for_each(block);
    } else {
        block((&mut y[..], (&mut inv[..], x)));
    }
    (y, inv)
}

/// Backward of [`rmsnorm_forward`]: returns `dx [rows, dim]` and accumulates `dw [dim]`.
///
/// With `r = inv_rms[row]` and `D = dim` (derivative of the definition above):
/// `dx_j = r · w_j · dy_j − (r³ / D) · x_j · Σ_k dy_k w_k x_k`, `dw_j += Σ_rows dy_j · x_j · r`.
/// Shapes: `x, dy [rows, dim]`, `w, dw [dim]`, `inv_rms [rows]` (from the forward). The row sums
/// and the `dw` sums over rows are accumulated in f64.
pub fn rmsnorm_backward<T: Scalar>(x: &[T], dim: usize, w: &[T], inv_rms: &[T], dy: &[T], dw: &mut [T]) -> Vec<T> {
    assert!(dim > 0 && x.len().is_multiple_of(dim), "rmsnorm_backward: x must be [rows, dim]");
    let rows = x.len() / dim;
    assert_eq!(w.len(), dim, "rmsnorm_backward: w must be [dim]");
    assert_eq!(dw.len(), dim, "rmsnorm_backward: dw must be [dim]");
    assert_eq!(inv_rms.len(), rows, "rmsnorm_backward: inv_rms must be [rows]");
    assert_eq!(dy.len(), x.len(), "rmsnorm_backward: dy must be [rows, dim]");
    let mut dx = vec![T::zero(); x.len()];
    // One block of rows: writes its dx rows, returns its partial dw in f64.
    let block = |dxb: &mut [T], ib: &[T], xb: &[T], dyb: &[T]| -> Vec<f64> {
        let mut dwp = vec![0.0f64; dim];
        for (((dxr, &ir), xr), dyr) in
            dxb.chunks_exact_mut(dim).zip(ib).zip(xb.chunks_exact(dim)).zip(dyb.chunks_exact(dim))
        {
            let r = ir.as_f64();
            let mut s = 0.0f64;
            for ((&xj, &wj), (&gj, dwj)) in xr.iter().zip(w).zip(dyr.iter().zip(dwp.iter_mut())) {
                let gx = gj.as_f64() * xj.as_f64();
                s += gx * wj.as_f64();
                *dwj += gx * r;
            }
            let rt = ir;
            let coef = T::from_f64(r * r * r * s / dim as f64);
            for ((dxj, &xj), (&wj, &gj)) in dxr.iter_mut().zip(xr).zip(w.iter().zip(dyr)) {
                *dxj = rt * wj * gj - coef * xj;
            }
        }
        dwp
    };
    let partials: Vec<Vec<f64>> = if x.len() > PAR_MIN_ELEMS {
        let br = block_rows(dim);
        dx.par_chunks_mut(br * dim)
            .zip(inv_rms.par_chunks(br).zip(x.par_chunks(br * dim).zip(dy.par_chunks(br * dim))))
            .map(|(dxb, (ib, (xb, dyb)))| block(dxb, ib, xb, dyb))
            .collect()
    } else {
        vec![block(&mut dx[..], inv_rms, x, dy)]
    };
    // Sum the blocks in order (deterministic), then add to dw once.
    let mut total = vec![0.0f64; dim];
    for p in &partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    for (d, t) in dw.iter_mut().zip(total) {
        *d += T::from_f64(t);
    }
    dx
}

/// Rotary position embedding tables (Su et al. 2021, RoFormer; Llama): `cos`/`sin` of
/// `angle(p, i) = p · θ^(−2i/head_dim)` for positions `p < seq_len` and pair indices
/// `i < head_dim/2` (the HF `inv_freq` convention), computed in f64 and rounded to `T`.
///
/// [`Rope::apply`] rotates each coordinate pair of every head by `+angle(p, i)`;
/// [`Rope::apply_inverse`] rotates by `−angle`, which is the transpose (a rotation is
/// orthogonal) and therefore the backward of `apply`. Which coordinates form pair `i` is set by
/// [`RopeLayout`].
#[derive(Clone, Debug)]
pub struct Rope<T> {
    /// `cos(angle(p, i))`, `[seq_len, head_dim/2]`.
    cos: Vec<T>,
    /// `sin(angle(p, i))`, `[seq_len, head_dim/2]`.
    sin: Vec<T>,
    /// Positions covered by the tables.
    seq_len: usize,
    /// Per-head width `d` (even).
    head_dim: usize,
}

impl<T: Scalar> Rope<T> {
    /// Tables for positions `0..seq_len` and heads of width `head_dim` (even, > 0) with base
    /// `theta` (Llama: 10000; `rope_theta` in HF configs).
    pub fn new(seq_len: usize, head_dim: usize, theta: f64) -> Self {
        assert!(
            head_dim > 0 && head_dim.is_multiple_of(2),
            "Rope::new: head_dim ({head_dim}) must be even and positive"
        );
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half).map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64)).collect();
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for p in 0..seq_len {
            for &f in &inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(T::from_f64(c));
                sin.push(T::from_f64(s));
            }
        }
        Rope { cos, sin, seq_len, head_dim }
    }

    /// Number of positions the tables cover (the largest `seq_len` `apply` accepts).
    pub fn max_seq_len(&self) -> usize {
        self.seq_len
    }

    /// Per-head width `d` the tables were built for.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Rotates, in place, every pair of every head of `x [seq_len, num_heads, head_dim]` at
    /// position `p` (the row index, starting at 0) by `+angle(p, i)`:
    /// `(a, b) ↦ (a cos − b sin, b cos + a sin)`, where for pair `i` the coordinates `(a, b)` are
    /// `(i, i + d/2)` for [`RopeLayout::RotateHalf`] and `(2i, 2i+1)` for [`RopeLayout::Interleaved`].
    pub fn apply(&self, x: &mut [T], seq_len: usize, num_heads: usize, layout: RopeLayout) {
        self.rotate(x, seq_len, num_heads, layout, false);
    }

    /// Rotates by `−angle(p, i)`: `(a, b) ↦ (a cos + b sin, b cos − a sin)`. This is the inverse
    /// and the transpose of [`Rope::apply`], hence its backward: `dx = apply_inverse(dy)`.
    /// Shapes as in [`Rope::apply`].
    pub fn apply_inverse(&self, x: &mut [T], seq_len: usize, num_heads: usize, layout: RopeLayout) {
        self.rotate(x, seq_len, num_heads, layout, true);
    }

    fn rotate(&self, x: &mut [T], seq_len: usize, num_heads: usize, layout: RopeLayout, inverse: bool) {
        let d = self.head_dim;
        let half = d / 2;
        assert!(seq_len <= self.seq_len, "Rope: seq_len {seq_len} exceeds the table's {}", self.seq_len);
        assert_eq!(x.len(), seq_len * num_heads * d, "Rope: x must be [seq_len, num_heads, head_dim]");
        let row = num_heads * d;
        if row == 0 {
            return;
        }
        let one_pos = |(p, xr): (usize, &mut [T])| {
            let cs = &self.cos[p * half..(p + 1) * half];
            let sn = &self.sin[p * half..(p + 1) * half];
            for head in xr.chunks_exact_mut(d) {
                for i in 0..half {
                    let (ia, ib) = match layout {
                        RopeLayout::RotateHalf => (i, i + half),
                        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (c, s) = (cs[i], if inverse { -sn[i] } else { sn[i] });
                    let (a, b) = (head[ia], head[ib]);
                    head[ia] = a * c - b * s;
                    head[ib] = b * c + a * s;
                }
            }
        };
        if x.len() > PAR_MIN_ELEMS {
            x.par_chunks_mut(row).enumerate().with_min_len(block_rows(row)).for_each(one_pos);
        } else {
            x.chunks_mut(row).enumerate().for_each(one_pos);
        }
    }
}

/// Logistic sigmoid `1 / (1 + e^(−x))`, evaluated so that no `exp` overflows for large `|x|`.
#[inline]
fn sigmoid<T: Scalar>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

/// SwiGLU activation (Shazeer 2020, "GLU Variants"; the Llama MLP): `h = silu(gate) ⊙ up` with
/// `silu(x) = x · sigmoid(x)`, elementwise; stable for large `|gate|` (no overflow, no NaN).
///
/// Shapes: `gate, up [rows, inter]` (any equal lengths); returns `h` of the same shape.
pub fn swiglu_forward<T: Scalar>(gate: &[T], up: &[T]) -> Vec<T> {
    assert_eq!(gate.len(), up.len(), "swiglu_forward: gate and up must have the same shape");
    let mut h = vec![T::zero(); gate.len()];
    let block = |(hb, (gb, ub)): (&mut [T], (&[T], &[T]))| {
        for ((hj, &g), &u) in hb.iter_mut().zip(gb).zip(ub) {
            *hj = g * sigmoid(g) * u;
        }
    };
    if gate.len() > PAR_MIN_ELEMS {
        h.par_chunks_mut(PAR_BLOCK_ELEMS)
            .zip(gate.par_chunks(PAR_BLOCK_ELEMS).zip(up.par_chunks(PAR_BLOCK_ELEMS)))
            .for_each(block);
    } else {
        block((&mut h[..], (gate, up)));
    }
    h
}

/// Backward of [`swiglu_forward`]: returns `(dgate, dup)` with, `s = sigmoid(gate)`,
/// `dgate = dh ⊙ up ⊙ s (1 + gate (1 − s))` (the derivative of silu) and `dup = dh ⊙ silu(gate)`.
///
/// Shapes: `gate, up, dh` equal; both outputs have that shape.
pub fn swiglu_backward<T: Scalar>(gate: &[T], up: &[T], dh: &[T]) -> (Vec<T>, Vec<T>) {
    assert_eq!(gate.len(), up.len(), "swiglu_backward: gate and up must have the same shape");
    assert_eq!(gate.len(), dh.len(), "swiglu_backward: dh must have the shape of gate");
    let mut dgate = vec![T::zero(); gate.len()];
    let mut dup = vec![T::zero(); gate.len()];
    let block = |dgb: &mut [T], dub: &mut [T], gb: &[T], ub: &[T], hb: &[T]| {
        for ((dg, du), (&g, (&u, &d))) in dgb.iter_mut().zip(dub.iter_mut()).zip(gb.iter().zip(ub.iter().zip(hb))) {
            let s = sigmoid(g);
            *du = d * g * s;
            *dg = d * u * s * (T::one() + g * (T::one() - s));
        }
    };
    if gate.len() > PAR_MIN_ELEMS {
        let b = PAR_BLOCK_ELEMS;
        dgate
            .par_chunks_mut(b)
            .zip(dup.par_chunks_mut(b))
            .zip(gate.par_chunks(b).zip(up.par_chunks(b).zip(dh.par_chunks(b))))
            .for_each(|((dgb, dub), (gb, (ub, hb)))| block(dgb, dub, gb, ub, hb));
    } else {
        block(&mut dgate[..], &mut dup[..], gate, up, dh);
    }
    (dgate, dup)
}

/// Residual add, in place: `a += b` elementwise (any shape, equal lengths). Its backward is the
/// identity on both inputs (MATH §6, LSSSZ Lemma J.3).
pub fn add_inplace<T: Scalar>(a: &mut [T], b: &[T]) {
    assert_eq!(a.len(), b.len(), "add_inplace: length mismatch");
    let block = |(ab, bb): (&mut [T], &[T])| {
        for (x, &y) in ab.iter_mut().zip(bb) {
            *x += y;
        }
    };
    if a.len() > PAR_MIN_ELEMS {
        a.par_chunks_mut(PAR_BLOCK_ELEMS).zip(b.par_chunks(PAR_BLOCK_ELEMS)).for_each(block);
    } else {
        block((a, b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::rel_err;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::StandardNormal;

    fn randn(rng: &mut StdRng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.sample(StandardNormal)).collect()
    }

    fn to32(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }

    fn to64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    const H: f64 = 1e-6;

    /// Central finite-difference gradient of `f` at `x`, perturbing every entry by ±H.
    fn fd_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let mut xp = x.to_vec();
        (0..x.len())
            .map(|k| {
                let x0 = xp[k];
                xp[k] = x0 + H;
                let fp = f(&xp);
                xp[k] = x0 - H;
                let fm = f(&xp);
                xp[k] = x0;
                (fp - fm) / (2.0 * H)
            })
            .collect()
    }

    fn check(name: &str, fd: &[f64], an: &[f64], tol: f64) {
        let e = rel_err(an, fd);
        eprintln!("{name}: rel err {e:.3e}");
        assert!(e <= tol, "{name}: relative error {e:e} > {tol:e}");
    }

    #[test]
    fn embedding_forward_and_backward_with_repeats() {
        let mut rng = StdRng::seed_from_u64(1);
        let (vocab, hidden) = (6, 4);
        let table = randn(&mut rng, vocab * hidden);
        let ids = [2u32, 0, 2, 5, 2, 0];
        let y = embedding_forward(&ids, &table, hidden);
        for (i, &id) in ids.iter().enumerate() {
            for j in 0..hidden {
                assert_eq!(y[i * hidden + j], table[id as usize * hidden + j]);
            }
        }
        let r = randn(&mut rng, ids.len() * hidden);
        let fd = fd_grad(&table, |t| dot(&r, &embedding_forward(&ids, t, hidden)));
        // Accumulation: start from a non-zero dtable and subtract it afterwards.
        let pre = randn(&mut rng, vocab * hidden);
        let mut dt = pre.clone();
        embedding_backward(&ids, &r, hidden, &mut dt);
        let an: Vec<f64> = dt.iter().zip(&pre).map(|(a, b)| a - b).collect();
        check("embedding dtable", &fd, &an, 1e-7);
        // Rows never looked up get exactly zero.
        for id in [1usize, 3, 4] {
            assert!(an[id * hidden..(id + 1) * hidden].iter().all(|&v| v.abs() < 1e-12));
        }
        // f32 forward is an exact copy of the rounded table.
        let y32 = embedding_forward(&ids, &to32(&table), hidden);
        assert_eq!(y32, to32(&y));
    }

    /// Independent RMSNorm reference: straight from the definition, one element at a time.
    fn rmsnorm_ref(x: &[f64], dim: usize, w: &[f64], eps: f64) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        for r in 0..x.len() / dim {
            let mut ss = 0.0;
            for j in 0..dim {
                ss += x[r * dim + j].powi(2);
            }
            let rms = (ss / dim as f64 + eps).sqrt();
            for j in 0..dim {
                y[r * dim + j] = x[r * dim + j] / rms * w[j];
            }
        }
        y
    }

    #[test]
    fn rmsnorm_forward_matches_definition() {
        let mut rng = StdRng::seed_from_u64(2);
        let (rows, dim, eps) = (5, 8, 1e-5);
        let x = randn(&mut rng, rows * dim);
        let w = randn(&mut rng, dim);
        let (y, inv) = rmsnorm_forward(&x, dim, &w, eps);
        let e = rel_err(&y, &rmsnorm_ref(&x, dim, &w, eps));
        eprintln!("rmsnorm forward vs definition: {e:.3e}");
        assert!(e < 1e-14);
        for r in 0..rows {
            let ms: f64 = x[r * dim..(r + 1) * dim].iter().map(|v| v * v).sum::<f64>() / dim as f64;
            assert!((inv[r] - 1.0 / (ms + eps).sqrt()).abs() < 1e-14 * inv[r]);
        }
    }

    #[test]
    fn rmsnorm_backward_fd() {
        let mut rng = StdRng::seed_from_u64(3);
        let (rows, dim, eps) = (5, 8, 1e-5);
        let x = randn(&mut rng, rows * dim);
        let w = randn(&mut rng, dim);
        let r = randn(&mut rng, rows * dim);
        let (_, inv) = rmsnorm_forward(&x, dim, &w, eps);
        let pre = randn(&mut rng, dim);
        let mut dw = pre.clone();
        let dx = rmsnorm_backward(&x, dim, &w, &inv, &r, &mut dw);
        let dw: Vec<f64> = dw.iter().zip(&pre).map(|(a, b)| a - b).collect();
        let fdx = fd_grad(&x, |xx| dot(&r, &rmsnorm_forward(xx, dim, &w, eps).0));
        let fdw = fd_grad(&w, |ww| dot(&r, &rmsnorm_forward(&x, dim, ww, eps).0));
        check("rmsnorm dx", &fdx, &dx, 1e-7);
        check("rmsnorm dw", &fdw, &dw, 1e-7);
    }

    #[test]
    fn rmsnorm_parallel_path_matches_row_by_row() {
        // 64 × 1024 > PAR_MIN_ELEMS: the rayon path, checked against the (FD-verified) serial path
        // applied to one row at a time.
        let mut rng = StdRng::seed_from_u64(4);
        let (rows, dim, eps) = (64, 1024, 1e-6);
        assert!(rows * dim > PAR_MIN_ELEMS);
        let x = randn(&mut rng, rows * dim);
        let w = randn(&mut rng, dim);
        let dy = randn(&mut rng, rows * dim);
        let (y, inv) = rmsnorm_forward(&x, dim, &w, eps);
        let mut dw = vec![0.0; dim];
        let dx = rmsnorm_backward(&x, dim, &w, &inv, &dy, &mut dw);
        let mut dw_ref = vec![0.0; dim];
        for (r, &inv_r) in inv.iter().enumerate() {
            let s = r * dim..(r + 1) * dim;
            let (yr, ir) = rmsnorm_forward(&x[s.clone()], dim, &w, eps);
            assert_eq!(&y[s.clone()], &yr[..]);
            assert_eq!(inv_r, ir[0]);
            let dxr = rmsnorm_backward(&x[s.clone()], dim, &w, &ir, &dy[s.clone()], &mut dw_ref);
            assert_eq!(&dx[s], &dxr[..]);
        }
        let e = rel_err(&dw, &dw_ref);
        assert!(e < 1e-13, "dw parallel vs serial: {e:e}");
    }

    #[test]
    fn rmsnorm_f32_matches_f64() {
        let mut rng = StdRng::seed_from_u64(5);
        let (rows, dim, eps) = (7, 64, 1e-5);
        let x32 = to32(&randn(&mut rng, rows * dim));
        let w32 = to32(&randn(&mut rng, dim));
        let (y32, i32_) = rmsnorm_forward(&x32, dim, &w32, eps);
        let (y64, i64_) = rmsnorm_forward(&to64(&x32), dim, &to64(&w32), eps);
        let (ey, ei) = (rel_err(&y32, &y64), rel_err(&i32_, &i64_));
        eprintln!("rmsnorm f32 vs f64: y {ey:.3e}, inv_rms {ei:.3e}");
        assert!(ey < 1e-6 && ei < 1e-6);
        let dy32 = to32(&randn(&mut rng, rows * dim));
        let mut dw32 = vec![0.0f32; dim];
        let mut dw64 = vec![0.0f64; dim];
        let dx32 = rmsnorm_backward(&x32, dim, &w32, &i32_, &dy32, &mut dw32);
        let dx64 = rmsnorm_backward(&to64(&x32), dim, &to64(&w32), &i64_, &to64(&dy32), &mut dw64);
        let (edx, edw) = (rel_err(&dx32, &dx64), rel_err(&dw32, &dw64));
        eprintln!("rmsnorm backward f32 vs f64: dx {edx:.3e}, dw {edw:.3e}");
        assert!(edx < 1e-5 && edw < 1e-5);
    }

    /// Angles for p = 3, θ = 10000, d = 8, by hand: θ^(−2i/8) = 10000^(−i/4) = 1, 0.1, 0.01, 0.001.
    const HAND_ANGLES_P3: [f64; 4] = [3.0, 0.3, 0.03, 0.003];

    #[test]
    fn rope_matches_hand_computation() {
        let (seq, heads, d) = (4, 2, 8);
        let mut rng = StdRng::seed_from_u64(6);
        let x = randn(&mut rng, seq * heads * d);
        let rope = Rope::<f64>::new(seq, d, 10000.0);
        for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
            let mut y = x.clone();
            rope.apply(&mut y, seq, heads, layout);
            // Position 0: angle 0, identity.
            assert!(rel_err(&y[..heads * d], &x[..heads * d]) < 1e-15);
            for h in 0..heads {
                let base = 3 * heads * d + h * d;
                for (i, &ang) in HAND_ANGLES_P3.iter().enumerate() {
                    let (a, b) = match layout {
                        RopeLayout::RotateHalf => (base + i, base + i + 4),
                        RopeLayout::Interleaved => (base + 2 * i, base + 2 * i + 1),
                    };
                    let (c, s) = (ang.cos(), ang.sin());
                    let ea = x[a] * c - x[b] * s;
                    let eb = x[b] * c + x[a] * s;
                    assert!((y[a] - ea).abs() < 1e-14, "{layout:?} head {h} pair {i}: {} vs {ea}", y[a]);
                    assert!((y[b] - eb).abs() < 1e-14, "{layout:?} head {h} pair {i}: {} vs {eb}", y[b]);
                }
            }
        }
        // One literal value, so a wrong sign convention in both the code and `sin` use above fails:
        // x = e_1 (RotateHalf, pair 1 at p = 3) ↦ cos(0.3) e_1 + sin(0.3) e_5.
        let mut e1 = vec![0.0; seq * d];
        e1[3 * d + 1] = 1.0;
        rope.apply(&mut e1, seq, 1, RopeLayout::RotateHalf);
        assert!((e1[3 * d + 1] - 0.955_336_489_125_606).abs() < 1e-14);
        assert!((e1[3 * d + 5] - 0.295_520_206_661_339_6).abs() < 1e-14);
    }

    #[test]
    fn rope_interleaved_equals_permuted_rotate_half() {
        let (seq, heads, d) = (6, 3, 16);
        let mut rng = StdRng::seed_from_u64(7);
        let x = randn(&mut rng, seq * heads * d);
        let rope = Rope::<f64>::new(seq, d, 500000.0);
        let mut yi = x.clone();
        rope.apply(&mut yi, seq, heads, RopeLayout::Interleaved);
        // perm[k] = source index in the interleaved vector for rotate-half slot k.
        let half = d / 2;
        let perm: Vec<usize> = (0..d).map(|k| if k < half { 2 * k } else { 2 * (k - half) + 1 }).collect();
        let mut xp = vec![0.0; x.len()];
        for (hv, hx) in xp.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            for k in 0..d {
                hv[k] = hx[perm[k]];
            }
        }
        rope.apply(&mut xp, seq, heads, RopeLayout::RotateHalf);
        let mut back = vec![0.0; x.len()];
        for (hb, hp) in back.chunks_exact_mut(d).zip(xp.chunks_exact(d)) {
            for k in 0..d {
                hb[perm[k]] = hp[k];
            }
        }
        let e = rel_err(&yi, &back);
        eprintln!("interleaved vs permuted rotate-half: {e:.3e}");
        assert!(e < 1e-15);
    }

    #[test]
    fn rope_inverse_is_backward_and_inverse() {
        let (seq, heads, d) = (5, 2, 8);
        let mut rng = StdRng::seed_from_u64(8);
        let rope = Rope::<f64>::new(7, d, 10000.0);
        for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
            let x = randn(&mut rng, seq * heads * d);
            let r = randn(&mut rng, seq * heads * d);
            let fd = fd_grad(&x, |xx| {
                let mut y = xx.to_vec();
                rope.apply(&mut y, seq, heads, layout);
                dot(&r, &y)
            });
            let mut an = r.clone();
            rope.apply_inverse(&mut an, seq, heads, layout);
            check(&format!("rope {layout:?} backward"), &fd, &an, 1e-7);
            let mut y = x.clone();
            rope.apply(&mut y, seq, heads, layout);
            assert!(rel_err(&y, &x) > 0.1, "rope must move x");
            rope.apply_inverse(&mut y, seq, heads, layout);
            let e = rel_err(&y, &x);
            eprintln!("rope {layout:?} apply∘apply_inverse: {e:.3e}");
            assert!(e < 1e-14);
        }
    }

    #[test]
    fn rope_parallel_path_matches_per_head() {
        // 16 × 64 × 64 > PAR_MIN_ELEMS; each head extracted alone ([seq, 1, d]) takes the serial path.
        let (seq, heads, d) = (16, 64, 64);
        assert!(seq * heads * d > PAR_MIN_ELEMS && seq * d <= PAR_MIN_ELEMS);
        let mut rng = StdRng::seed_from_u64(9);
        let x = randn(&mut rng, seq * heads * d);
        let rope = Rope::<f64>::new(seq, d, 10000.0);
        for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
            let mut y = x.clone();
            rope.apply(&mut y, seq, heads, layout);
            for h in 0..heads {
                let mut xh: Vec<f64> = (0..seq).flat_map(|p| x[(p * heads + h) * d..][..d].to_vec()).collect();
                rope.apply(&mut xh, seq, 1, layout);
                for p in 0..seq {
                    assert_eq!(&y[(p * heads + h) * d..][..d], &xh[p * d..][..d]);
                }
            }
        }
    }

    #[test]
    fn rope_f32_matches_f64() {
        let (seq, heads, d) = (40, 4, 32);
        let mut rng = StdRng::seed_from_u64(10);
        let x32 = to32(&randn(&mut rng, seq * heads * d));
        for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
            let mut y32 = x32.clone();
            Rope::<f32>::new(seq, d, 10000.0).apply(&mut y32, seq, heads, layout);
            let mut y64 = to64(&x32);
            Rope::<f64>::new(seq, d, 10000.0).apply(&mut y64, seq, heads, layout);
            let e = rel_err(&y32, &y64);
            eprintln!("rope {layout:?} f32 vs f64: {e:.3e}");
            assert!(e < 1e-6);
        }
    }

    /// Independent silu: from the plain formula x / (1 + e^(−x)) (fine for moderate x).
    fn silu_ref(x: f64) -> f64 {
        x / (1.0 + (-x).exp())
    }

    #[test]
    fn swiglu_forward_matches_definition_and_backward_fd() {
        let mut rng = StdRng::seed_from_u64(11);
        let n = 5 * 8;
        let g: Vec<f64> = randn(&mut rng, n).iter().map(|v| 3.0 * v).collect();
        let u = randn(&mut rng, n);
        let h = swiglu_forward(&g, &u);
        let href: Vec<f64> = g.iter().zip(&u).map(|(&a, &b)| silu_ref(a) * b).collect();
        let e = rel_err(&h, &href);
        eprintln!("swiglu forward vs definition: {e:.3e}");
        assert!(e < 1e-14);
        let r = randn(&mut rng, n);
        let (dg, du) = swiglu_backward(&g, &u, &r);
        let fdg = fd_grad(&g, |gg| dot(&r, &swiglu_forward(gg, &u)));
        let fdu = fd_grad(&u, |uu| dot(&r, &swiglu_forward(&g, uu)));
        check("swiglu dgate", &fdg, &dg, 1e-7);
        check("swiglu dup", &fdu, &du, 1e-7);
    }

    #[test]
    fn swiglu_is_stable_for_large_gate() {
        let g = [1000.0f32, -1000.0, 88.0, -88.0, 200.0, -200.0];
        let u = [1.0f32; 6];
        let h = swiglu_forward(&g, &u);
        let (dg, du) = swiglu_backward(&g, &u, &u);
        for v in h.iter().chain(&dg).chain(&du) {
            assert!(v.is_finite(), "non-finite: h {h:?} dg {dg:?} du {du:?}");
        }
        assert_eq!(h[0], 1000.0);
        assert!(h[1].abs() < 1e-30);
        assert_eq!(dg[0], 1.0);
        assert!(dg[1].abs() < 1e-30);
        let g64 = [1000.0f64, -1000.0, 800.0, -800.0];
        let h64 = swiglu_forward(&g64, &[1.0; 4]);
        let (dg64, _) = swiglu_backward(&g64, &[1.0; 4], &[1.0; 4]);
        assert!(h64.iter().chain(&dg64).all(|v| v.is_finite()));
        assert_eq!(h64[0], 1000.0);
    }

    #[test]
    fn swiglu_f32_matches_f64_and_parallel_path() {
        let mut rng = StdRng::seed_from_u64(12);
        let n = 40_000; // > PAR_MIN_ELEMS: parallel path
        let g32 = to32(&randn(&mut rng, n));
        let u32_ = to32(&randn(&mut rng, n));
        let h32 = swiglu_forward(&g32, &u32_);
        let h64 = swiglu_forward(&to64(&g32), &to64(&u32_));
        let e = rel_err(&h32, &h64);
        eprintln!("swiglu f32 vs f64: {e:.3e}");
        assert!(e < 1e-6);
        // Parallel vs serial (small slices take the serial path).
        let dh = to64(&to32(&randn(&mut rng, n)));
        let (g, u) = (to64(&g32), to64(&u32_));
        let (dg, du) = swiglu_backward(&g, &u, &dh);
        for s in (0..n).step_by(1000) {
            let e = (s + 1000).min(n);
            assert_eq!(&h64[s..e], &swiglu_forward(&g[s..e], &u[s..e])[..]);
            let (dgs, dus) = swiglu_backward(&g[s..e], &u[s..e], &dh[s..e]);
            assert_eq!(&dg[s..e], &dgs[..]);
            assert_eq!(&du[s..e], &dus[..]);
        }
    }

    #[test]
    fn add_inplace_adds() {
        let mut rng = StdRng::seed_from_u64(13);
        for n in [10, 50_000] {
            let a = randn(&mut rng, n);
            let b = randn(&mut rng, n);
            let mut c = a.clone();
            add_inplace(&mut c, &b);
            assert!(c.iter().zip(a.iter().zip(&b)).all(|(c, (a, b))| *c == a + b));
        }
    }
}
