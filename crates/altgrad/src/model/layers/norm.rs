//! Normalization layers with hand-written backward (MATH §6): RMSNorm (Llama) and LayerNorm
//! (BERT), both over the last dimension of `[rows, dim]`, statistics and reductions in f64.

use super::{block_rows, PAR_MIN_ELEMS};
use crate::linalg::Scalar;
use crate::model::param::Param;
use rayon::prelude::*;

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

/// Per-row statistics of a [`layernorm_forward`] call, kept for [`layernorm_backward`]
/// (computed and stored in f64 whatever `T` is).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormStats {
    /// Mean of each row, `[rows]`.
    pub mean: Vec<f64>,
    /// `1 / sqrt(var + eps)` of each row (biased variance, as torch), `[rows]`.
    pub inv_std: Vec<f64>,
}

/// LayerNorm forward (Ba et al. 2016; torch `nn.LayerNorm` over the last dimension):
/// `y[r, j] = (x[r, j] − μ_r) · s_r · w[j] + b[j]` with `μ_r = mean_j x[r, j]`,
/// `s_r = 1/sqrt(mean_j (x[r, j] − μ_r)² + eps)`.
///
/// Shapes: `x [rows, dim]`, `w, b [dim]`; returns `(y [rows, dim], stats)`. Statistics and the
/// per-element arithmetic are done in f64 and `y` is rounded to `T` once. Rows run in parallel
/// above [`PAR_MIN_ELEMS`] (2¹⁵) elements.
pub fn layernorm_forward<T: Scalar>(x: &[T], dim: usize, w: &[T], b: &[T], eps: f64) -> (Vec<T>, LayerNormStats) {
    assert!(dim > 0 && x.len().is_multiple_of(dim), "layernorm_forward: x must be [rows, dim]");
    assert_eq!(w.len(), dim, "layernorm_forward: w must be [dim]");
    assert_eq!(b.len(), dim, "layernorm_forward: b must be [dim]");
    let rows = x.len() / dim;
    let mut y = vec![T::zero(); x.len()];
    let mut mean = vec![0.0f64; rows];
    let mut inv_std = vec![0.0f64; rows];
    let block = |yb: &mut [T], mb: &mut [f64], ib: &mut [f64], xb: &[T]| {
        for (((yr, m), s), xr) in
            yb.chunks_exact_mut(dim).zip(mb.iter_mut()).zip(ib.iter_mut()).zip(xb.chunks_exact(dim))
        {
            let mu = xr.iter().map(|v| v.as_f64()).sum::<f64>() / dim as f64;
            let var = xr.iter().map(|v| (v.as_f64() - mu).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (var + eps).sqrt();
            *m = mu;
            *s = inv;
            for ((yj, &xj), (&wj, &bj)) in yr.iter_mut().zip(xr).zip(w.iter().zip(b)) {
                *yj = T::from_f64((xj.as_f64() - mu) * inv * wj.as_f64() + bj.as_f64());
            }
        }
    };
    if x.len() > PAR_MIN_ELEMS {
        let br = block_rows(dim);
        y.par_chunks_mut(br * dim)
            .zip(mean.par_chunks_mut(br).zip(inv_std.par_chunks_mut(br)))
            .zip(x.par_chunks(br * dim))
            .for_each(|((yb, (mb, ib)), xb)| block(yb, mb, ib, xb));
    } else {
        block(&mut y, &mut mean, &mut inv_std, x);
    }
    (y, LayerNormStats { mean, inv_std })
}

/// Backward of [`layernorm_forward`]: returns `dx [rows, dim]` and accumulates `dw, db [dim]`.
///
/// With `x̂_j = (x_j − μ) s` and `g_j = dy_j w_j` (derivative of the definition):
/// `dx_j = s · (g_j − mean_k g_k − x̂_j · mean_k g_k x̂_k)`, `dw_j += Σ_rows dy_j x̂_j`,
/// `db_j += Σ_rows dy_j`. Shapes: `x, dy [rows, dim]`, `w, dw, db [dim]`; `stats` from the
/// forward on the same `x`. Row sums and the `dw`, `db` sums over rows are accumulated in f64.
pub fn layernorm_backward<T: Scalar>(
    x: &[T],
    dim: usize,
    w: &[T],
    stats: &LayerNormStats,
    dy: &[T],
    dw: &mut [T],
    db: &mut [T],
) -> Vec<T> {
    assert!(dim > 0 && x.len().is_multiple_of(dim), "layernorm_backward: x must be [rows, dim]");
    let rows = x.len() / dim;
    assert_eq!(w.len(), dim, "layernorm_backward: w must be [dim]");
    assert_eq!(dw.len(), dim, "layernorm_backward: dw must be [dim]");
    assert_eq!(db.len(), dim, "layernorm_backward: db must be [dim]");
    assert_eq!(stats.mean.len(), rows, "layernorm_backward: stats must cover [rows]");
    assert_eq!(stats.inv_std.len(), rows, "layernorm_backward: stats must cover [rows]");
    assert_eq!(dy.len(), x.len(), "layernorm_backward: dy must be [rows, dim]");
    let mut dx = vec![T::zero(); x.len()];
    // One block of rows: writes its dx rows, returns its partial (dw, db) in f64.
    let block = |dxb: &mut [T], mb: &[f64], ib: &[f64], xb: &[T], dyb: &[T]| -> (Vec<f64>, Vec<f64>) {
        let mut dwp = vec![0.0f64; dim];
        let mut dbp = vec![0.0f64; dim];
        let mut xhat = vec![0.0f64; dim];
        let mut g = vec![0.0f64; dim];
        for ((((dxr, &mu), &s), xr), dyr) in
            dxb.chunks_exact_mut(dim).zip(mb).zip(ib).zip(xb.chunks_exact(dim)).zip(dyb.chunks_exact(dim))
        {
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            for j in 0..dim {
                let xh = (xr[j].as_f64() - mu) * s;
                let d = dyr[j].as_f64();
                let gj = d * w[j].as_f64();
                xhat[j] = xh;
                g[j] = gj;
                sg += gj;
                sgx += gj * xh;
                dwp[j] += d * xh;
                dbp[j] += d;
            }
            let (a, c) = (sg / dim as f64, sgx / dim as f64);
            for j in 0..dim {
                dxr[j] = T::from_f64(s * (g[j] - a - xhat[j] * c));
            }
        }
        (dwp, dbp)
    };
    let partials: Vec<(Vec<f64>, Vec<f64>)> = if x.len() > PAR_MIN_ELEMS {
        let br = block_rows(dim);
        dx.par_chunks_mut(br * dim)
            .zip(stats.mean.par_chunks(br).zip(stats.inv_std.par_chunks(br)))
            .zip(x.par_chunks(br * dim).zip(dy.par_chunks(br * dim)))
            .map(|((dxb, (mb, ib)), (xb, dyb))| block(dxb, mb, ib, xb, dyb))
            .collect()
    } else {
        vec![block(&mut dx, &stats.mean, &stats.inv_std, x, dy)]
    };
    // Sum the blocks in order (deterministic), then add to dw, db once.
    let mut tw = vec![0.0f64; dim];
    let mut tb = vec![0.0f64; dim];
    for (pw, pb) in &partials {
        for j in 0..dim {
            tw[j] += pw[j];
            tb[j] += pb[j];
        }
    }
    for j in 0..dim {
        dw[j] += T::from_f64(tw[j]);
        db[j] += T::from_f64(tb[j]);
    }
    dx
}

/// LayerNorm parameters: `weight` (γ) and `bias` (β), both `[hidden]`.
#[derive(Clone, Debug)]
pub struct LayerNormWeights<T> {
    /// `…LayerNorm.weight`, `[hidden]`.
    pub weight: Param<T>,
    /// `…LayerNorm.bias`, `[hidden]`.
    pub bias: Param<T>,
}

impl<T: Scalar> LayerNormWeights<T> {
    /// Zeros named `{prefix}.weight` and `{prefix}.bias`, both `[h]`.
    pub fn zeros(prefix: &str, h: usize) -> Self {
        LayerNormWeights {
            weight: Param::zeros(format!("{prefix}.weight"), &[h]),
            bias: Param::zeros(format!("{prefix}.bias"), &[h]),
        }
    }
    /// Zeros shaped and named like `self` (a gradient buffer).
    pub fn zeros_like(&self) -> Self {
        LayerNormWeights { weight: self.weight.zeros_like(), bias: self.bias.zeros_like() }
    }
    /// [`layernorm_forward`] with these parameters: `x [rows, dim]` → `(y [rows, dim], stats)`.
    pub fn forward(&self, x: &[T], eps: f64) -> (Vec<T>, LayerNormStats) {
        layernorm_forward(x, self.weight.data.len(), &self.weight.data, &self.bias.data, eps)
    }
    /// [`layernorm_backward`] with these parameters: returns `dx [rows, dim]` and accumulates
    /// `dγ, dβ` into `grad`. `x` and `stats` are the forward's.
    pub fn backward(&self, x: &[T], stats: &LayerNormStats, dy: &[T], grad: &mut LayerNormWeights<T>) -> Vec<T> {
        layernorm_backward(
            x,
            self.weight.data.len(),
            &self.weight.data,
            stats,
            dy,
            &mut grad.weight.data,
            &mut grad.bias.data,
        )
    }
}
