//! Attention: the core of altgrad. Depends on [`crate::linalg`] only.
//!
//! Tensors use the flash-attn layout without batch: `q [seq_len, num_heads, head_dim]`,
//! `k [seq_len, num_kv_heads, head_dim]`, `v [seq_len, num_kv_heads, head_dim_v]`,
//! `o [seq_len, num_heads, head_dim_v]`, `lse [num_heads, seq_len]` (MATH §1). Query head `h`
//! reads key/value head `h / (num_heads / num_kv_heads)` (GQA). Heads run in parallel (rayon);
//! each head's kernel is sequential.

pub mod bound;
pub mod exact;
pub mod features;
pub mod poly;
#[doc(hidden)]
pub mod naive;

use crate::linalg::Scalar;
use crate::{Error, Result};
use rayon::prelude::*;

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Sequence length `n` (≥ 1).
    pub seq_len: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; divides `num_heads`.
    pub num_kv_heads: usize,
    /// Width `d` of queries and keys.
    pub head_dim: usize,
    /// Width `d_v` of values and outputs.
    pub head_dim_v: usize,
}

impl AttnShape {
    /// Shape with `head_dim_v == head_dim`.
    pub fn new(seq_len: usize, num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        AttnShape { seq_len, num_heads, num_kv_heads, head_dim, head_dim_v: head_dim }
    }
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
    /// Checks that every size is positive and `num_kv_heads | num_heads`.
    pub fn validate(&self) -> Result<()> {
        let s = self;
        if s.seq_len == 0 || s.num_heads == 0 || s.num_kv_heads == 0 || s.head_dim == 0 || s.head_dim_v == 0 {
            return Err(Error::bad("attention shape", format!("every size must be positive, got {s:?}")));
        }
        if !s.num_heads.is_multiple_of(s.num_kv_heads) {
            return Err(Error::bad(
                "attention shape",
                format!("num_heads ({}) is not a multiple of num_kv_heads ({})", s.num_heads, s.num_kv_heads),
            ));
        }
        Ok(())
    }
    fn check_len<T>(&self, name: &str, x: &[T], heads: usize, width: usize) -> Result<()> {
        let want = self.seq_len * heads * width;
        if x.len() != want {
            return Err(Error::bad(
                name,
                format!("expected {want} values ([{}, {heads}, {width}]), got {}", self.seq_len, x.len()),
            ));
        }
        Ok(())
    }
}

/// Options of an attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnOptions {
    /// Causal mask `j ≤ i` (diagonal included, MATH §1).
    pub causal: bool,
    /// Score scale τ; scores are `τ q·k`. Real models use `1/√head_dim`.
    pub scale: f64,
}

impl AttnOptions {
    /// `scale = 1/√head_dim`.
    pub fn standard(head_dim: usize, causal: bool) -> Self {
        AttnOptions { causal, scale: 1.0 / (head_dim as f64).sqrt() }
    }
}

/// Output of a forward pass: `o [seq_len, num_heads, head_dim_v]` and the per-row log-sum-exp
/// `lse [num_heads, seq_len]` that the exact backward needs (MATH §2).
#[derive(Clone, Debug)]
pub struct AttnOutput<T> {
    /// Attention output.
    pub o: Vec<T>,
    /// `lse_i = m_i + log l_i` per head and row.
    pub lse: Vec<T>,
}

/// Gradients of the inputs, same layouts as `q`, `k`, `v`.
#[derive(Clone, Debug)]
pub struct AttnGrads<T> {
    /// `dL/dq [seq_len, num_heads, head_dim]`.
    pub dq: Vec<T>,
    /// `dL/dk [seq_len, num_kv_heads, head_dim]` (summed over the query heads of each group).
    pub dk: Vec<T>,
    /// `dL/dv [seq_len, num_kv_heads, head_dim_v]`.
    pub dv: Vec<T>,
}

/// Copies head `h` out of `x [seq, heads, width]` into a contiguous `[seq, width]` buffer.
pub(crate) fn gather_head<T: Scalar>(x: &[T], seq: usize, heads: usize, width: usize, h: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(seq * width);
    for i in 0..seq {
        let base = (i * heads + h) * width;
        out.extend_from_slice(&x[base..base + width]);
    }
    out
}

/// Writes per-head `[seq, width]` buffers into `[seq, heads, width]`.
pub(crate) fn scatter_heads<T: Scalar>(per_head: &[Vec<T>], seq: usize, width: usize) -> Vec<T> {
    let heads = per_head.len();
    let mut out = vec![T::zero(); seq * heads * width];
    for (i, row) in out.chunks_exact_mut(heads * width).enumerate() {
        for (h, hb) in per_head.iter().enumerate() {
            row[h * width..(h + 1) * width].copy_from_slice(&hb[i * width..(i + 1) * width]);
        }
    }
    out
}

fn check_inputs<T: Scalar>(q: &[T], k: &[T], v: &[T], s: &AttnShape, opts: &AttnOptions) -> Result<()> {
    s.validate()?;
    s.check_len("q", q, s.num_heads, s.head_dim)?;
    s.check_len("k", k, s.num_kv_heads, s.head_dim)?;
    s.check_len("v", v, s.num_kv_heads, s.head_dim_v)?;
    if !(opts.scale.is_finite() && opts.scale > 0.0) {
        return Err(Error::bad("scale", format!("must be finite and positive, got {}", opts.scale)));
    }
    Ok(())
}

/// Exact softmax attention, forward (MATH §2, FA2 Alg. 1): tiled online softmax, O(n) extra
/// memory per head, heads in parallel.
///
/// Errors: [`Error::BadInput`] when a slice length disagrees with `shape` or the shape is invalid.
pub fn forward_exact<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
) -> Result<AttnOutput<T>> {
    check_inputs(q, k, v, shape, opts)?;
    let s = *shape;
    let n = s.seq_len;
    let per_head: Vec<(Vec<T>, Vec<T>)> = (0..s.num_heads)
        .into_par_iter()
        .map(|h| {
            let kv = h / s.group();
            let qh = gather_head(q, n, s.num_heads, s.head_dim, h);
            let kh = gather_head(k, n, s.num_kv_heads, s.head_dim, kv);
            let vh = gather_head(v, n, s.num_kv_heads, s.head_dim_v, kv);
            exact::forward_head(&qh, &kh, &vh, n, s.head_dim, s.head_dim_v, opts)
        })
        .collect();
    let (os, lses): (Vec<_>, Vec<_>) = per_head.into_iter().unzip();
    let o = scatter_heads(&os, n, s.head_dim_v);
    let lse = lses.concat();
    Ok(AttnOutput { o, lse })
}

/// Exact softmax attention, backward (MATH §2, FA2 Alg. 2): recomputes `P` block by block from
/// `lse`; `dout` is `dL/do [seq_len, num_heads, head_dim_v]`. Heads in parallel; GQA gradients
/// of `k`, `v` are summed over each group.
///
/// Errors: [`Error::BadInput`] on length mismatches.
#[allow(clippy::too_many_arguments)]
pub fn backward_exact<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    fwd: &AttnOutput<T>,
    dout: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
) -> Result<AttnGrads<T>> {
    check_inputs(q, k, v, shape, opts)?;
    let s = *shape;
    s.check_len("o", &fwd.o, s.num_heads, s.head_dim_v)?;
    s.check_len("do", dout, s.num_heads, s.head_dim_v)?;
    if fwd.lse.len() != s.num_heads * s.seq_len {
        return Err(Error::bad("lse", format!("expected {} values", s.num_heads * s.seq_len)));
    }
    let n = s.seq_len;
    let per_head: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..s.num_heads)
        .into_par_iter()
        .map(|h| {
            let kv = h / s.group();
            let qh = gather_head(q, n, s.num_heads, s.head_dim, h);
            let kh = gather_head(k, n, s.num_kv_heads, s.head_dim, kv);
            let vh = gather_head(v, n, s.num_kv_heads, s.head_dim_v, kv);
            let oh = gather_head(&fwd.o, n, s.num_heads, s.head_dim_v, h);
            let gh = gather_head(dout, n, s.num_heads, s.head_dim_v, h);
            let lse = &fwd.lse[h * n..(h + 1) * n];
            exact::backward_head(&qh, &kh, &vh, &oh, lse, &gh, n, s.head_dim, s.head_dim_v, opts)
        })
        .collect();
    Ok(combine_grads(per_head, &s))
}

/// Assembles per-query-head `(dq, dk, dv)` (each `[seq, width]`) into the public layouts,
/// summing `dk`, `dv` over each GQA group.
pub(crate) fn combine_grads<T: Scalar>(per_head: Vec<(Vec<T>, Vec<T>, Vec<T>)>, s: &AttnShape) -> AttnGrads<T> {
    let n = s.seq_len;
    let g = s.group();
    let mut dqs = Vec::with_capacity(s.num_heads);
    let mut dks: Vec<Vec<T>> = Vec::with_capacity(s.num_kv_heads);
    let mut dvs: Vec<Vec<T>> = Vec::with_capacity(s.num_kv_heads);
    for (h, (dq, dk, dv)) in per_head.into_iter().enumerate() {
        dqs.push(dq);
        if h % g == 0 {
            dks.push(dk);
            dvs.push(dv);
        } else {
            let kv = h / g;
            for (a, b) in dks[kv].iter_mut().zip(&dk) {
                *a += *b;
            }
            for (a, b) in dvs[kv].iter_mut().zip(&dv) {
                *a += *b;
            }
        }
    }
    AttnGrads {
        dq: scatter_heads(&dqs, n, s.head_dim),
        dk: scatter_heads(&dks, n, s.head_dim),
        dv: scatter_heads(&dvs, n, s.head_dim_v),
    }
}
