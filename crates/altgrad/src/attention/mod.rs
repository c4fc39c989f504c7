//! Attention: the core of altgrad. Depends on [`crate::linalg`] only.
//!
//! Tensors use the flash-attn layout without batch: `q [seq_len, num_heads, head_dim]`,
//! `k [seq_len, num_kv_heads, head_dim]`, `v [seq_len, num_kv_heads, head_dim_v]`,
//! `o [seq_len, num_heads, head_dim_v]`, `lse [num_heads, seq_len]` (MATH §1). Query head `h`
//! reads key/value head `h / (num_heads / num_kv_heads)` (GQA). Heads run in parallel (rayon);
//! each head's kernel is sequential.

pub mod altgrad;
pub mod bound;
pub mod exact;
pub mod features;
pub mod mixed;
#[doc(hidden)]
pub mod naive;
pub mod poly;

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

pub use bound::{Method, Policy};
pub use poly::{PolyOptions, PolyOutput};

/// One key/value head's inputs for the polynomial kernels (MATH §3 "Row shift"): with centering,
/// keys relative to a reference point `c`, `k [n, d]` holding `k_j − c`, and the key means relative
/// to it, `kbar` holding `k̄_i − c` (`[1, d]`, zero, without a mask, where `c` is the global mean;
/// `[n, d]` prefix means under the causal mask, where `c` is the mean of the first chunk's keys);
/// `v [n, dv]`. The function depends on the keys only through `k_j − k̄_i = (k_j − c) − (k̄_i − c)`,
/// so no term of size `|c|` ever enters the kernels (features of `√τ (k_j − c)`, row shifts
/// `m_i = τ q_i·(k̄_i − c)`), and `c` is a constant of the backward. Without centering `c = 0`.
pub(crate) struct PolyKv<T> {
    pub(crate) k: Vec<T>,
    pub(crate) v: Vec<T>,
    pub(crate) kbar: Vec<T>,
    /// The reference point `c [d]`.
    pub(crate) c: Vec<T>,
}

/// Gathers every key/value head, its reference point and its relative key means (shared by the
/// poly and ALTGrad kernels; see [`PolyKv`]). `chunk` is the kernels' chunk (the causal reference
/// point is the mean of the first `min(chunk, n)` keys: no look-ahead past the first chunk).
pub(crate) fn poly_kv<T: Scalar>(
    k: &[T],
    v: &[T],
    s: &AttnShape,
    causal: bool,
    center: bool,
    chunk: usize,
) -> Vec<PolyKv<T>> {
    let (n, d) = (s.seq_len, s.head_dim);
    (0..s.num_kv_heads)
        .into_par_iter()
        .map(|h| {
            let mut k = gather_head(k, n, s.num_kv_heads, d, h);
            let v = gather_head(v, n, s.num_kv_heads, s.head_dim_v, h);
            let (kbar, c) = center_keys(&mut k, n, d, causal, center, chunk);
            PolyKv { k, v, kbar, c }
        })
        .collect()
}

/// Centers one key head in place, `k [n, d] ← k − c`, and returns `(k̄ − c, c)` as in [`PolyKv`]
/// (zeros and `c = 0` without centering).
pub(crate) fn center_keys<T: Scalar>(
    k: &mut [T],
    n: usize,
    d: usize,
    causal: bool,
    center: bool,
    chunk: usize,
) -> (Vec<T>, Vec<T>) {
    if !center {
        return (vec![T::zero(); d], vec![T::zero(); d]);
    }
    let first = if causal { chunk.clamp(1, n) } else { n };
    let c = bound::key_means(&k[..first * d], first, d, false);
    for row in k.chunks_exact_mut(d) {
        for (x, cv) in row.iter_mut().zip(&c) {
            *x -= *cv;
        }
    }
    let kbar = if causal { bound::key_means(k, n, d, true) } else { vec![T::zero(); d] };
    (kbar, c)
}

/// Row shifts of one query head: `m_i = τ q_i·(k̄_i − c)` when centering, else zeros.
fn poly_shift<T: Scalar>(qh: &[T], kv: &PolyKv<T>, s: &AttnShape, opts: &AttnOptions, center: bool) -> Vec<T> {
    if center {
        bound::row_shift(qh, &kv.kbar, s.seq_len, s.head_dim, opts.scale)
    } else {
        vec![T::zero(); s.seq_len]
    }
}

/// `lse_i = τ q_i·c + m_i + ln den_i` (in f64): the log of the polynomial model's normalizer of the
/// unshifted scores `s_ij = τ q_i·k_j`, since the kernels' shifted score is
/// `s_ij − τ q_i·k̄_i = τ q_i·(k_j − c) − m_i`.
pub(crate) fn poly_lse<T: Scalar>(qh: &[T], c: &[T], m: &[T], den: &[T], d: usize, scale: f64) -> Vec<T> {
    qh.chunks_exact(d)
        .zip(m.iter().zip(den))
        .map(|(qi, (mi, di))| {
            let qc: f64 = qi.iter().zip(c).map(|(a, b)| a.as_f64() * b.as_f64()).sum();
            T::from_f64(scale * qc + mi.as_f64() + di.as_f64().ln())
        })
        .collect()
}

/// Polynomial attention, forward (MATH §3–4; AS23 Lemma 3.4, LSSSZ Lemma I.3): the softmax
/// weights `exp(s_ij)` are replaced by `T_g(s_ij − m_i)` (degree `popts.degree`, row shift
/// `m_i = τ q_i·k̄_i` when `popts.center`). O(n·r·d_v) time and O(C·r + r·d_v) extra memory per
/// head with `r = C(d+g, g)`; heads in parallel, each sequential. Shapes as [`forward_exact`].
///
/// Returns a [`PolyOutput`]: `o`, `lse = m_i + ln den_i`, the denominators and (non-causal) each
/// key/value head's state `H' = Φ_Kᵀ [V 1]`, which [`backward_poly`] reuses.
///
/// Errors: [`Error::BadInput`] on length/shape mismatches, a non-positive scale, an odd or zero
/// degree ("degree must be even: …"), a zero chunk, or a feature width above
/// [`features::MAX_FEATURE_DIM`].
pub fn forward_poly<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
    popts: &PolyOptions,
) -> Result<PolyOutput<T>> {
    check_inputs(q, k, v, shape, opts)?;
    popts.validate()?;
    let s = *shape;
    let n = s.seq_len;
    let fm = features::FeatureMap::<T>::new(s.head_dim, popts.degree)?;
    let head = poly::Head { fm: &fm, n, dv: s.head_dim_v, scale: opts.scale, center: popts.center, chunk: popts.chunk };
    let kvs = poly_kv(k, v, &s, opts.causal, popts.center, popts.chunk);
    let kv_state: Vec<Vec<T>> =
        if opts.causal { Vec::new() } else { kvs.par_iter().map(|kv| head.kv_state(&kv.k, &kv.v)).collect() };
    let per_head: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..s.num_heads)
        .into_par_iter()
        .map(|h| {
            let kvh = h / s.group();
            let kv = &kvs[kvh];
            let qh = gather_head(q, n, s.num_heads, s.head_dim, h);
            let m = poly_shift(&qh, kv, &s, opts, popts.center);
            let (o, den) = if opts.causal {
                head.forward_causal(&qh, &kv.k, &kv.v, &m)
            } else {
                head.forward_queries(&qh, &m, &kv_state[kvh])
            };
            let lse = poly_lse(&qh, &kv.c, &m, &den, s.head_dim, opts.scale);
            (o, lse, den)
        })
        .collect();
    let mut os = Vec::with_capacity(s.num_heads);
    let (mut lse, mut den) = (Vec::with_capacity(n * s.num_heads), Vec::with_capacity(n * s.num_heads));
    for (o, l, d) in per_head {
        os.push(o);
        lse.extend_from_slice(&l);
        den.extend_from_slice(&d);
    }
    Ok(PolyOutput { o: scatter_heads(&os, n, s.head_dim_v), lse, den, kv_state })
}

/// Polynomial attention, backward: the exact gradient of [`forward_poly`]'s function (MATH §4),
/// including the chain rule through the row shift `m_i` (which depends on `q_i` and the keys).
/// `fwd` must come from [`forward_poly`] with the same inputs, shape, options and `popts`;
/// `dout = dL/do [seq_len, num_heads, head_dim_v]`. Non-causal: per query head `dΨ`, `dQ` and
/// `dH'`; then per key/value head `dK`, `dV` from the group's summed `dH'` (the state is shared
/// by a GQA group). Causal: per query head a forward scan (`dQ`, intra-chunk terms) and a reverse
/// scan (`dK`, `dV`), summed over each group.
///
/// Errors: [`Error::BadInput`] as [`forward_poly`], or when `fwd`/`dout` do not match the shape
/// (including a state of the wrong size, e.g. from a different degree).
#[allow(clippy::too_many_arguments)]
pub fn backward_poly<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    fwd: &PolyOutput<T>,
    dout: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
    popts: &PolyOptions,
) -> Result<AttnGrads<T>> {
    check_inputs(q, k, v, shape, opts)?;
    popts.validate()?;
    let s = *shape;
    let n = s.seq_len;
    s.check_len("o", &fwd.o, s.num_heads, s.head_dim_v)?;
    s.check_len("do", dout, s.num_heads, s.head_dim_v)?;
    for (name, x) in [("lse", &fwd.lse), ("den", &fwd.den)] {
        if x.len() != s.num_heads * n {
            return Err(Error::bad(name, format!("expected {} values ([num_heads, seq_len])", s.num_heads * n)));
        }
    }
    let fm = features::FeatureMap::<T>::new(s.head_dim, popts.degree)?;
    let state_len = fm.dim() * (s.head_dim_v + 1);
    if !opts.causal && (fwd.kv_state.len() != s.num_kv_heads || fwd.kv_state.iter().any(|x| x.len() != state_len)) {
        return Err(Error::bad(
            "fwd",
            "key/value state does not match this shape and degree: pass the output of forward_poly called with \
             the same shape, options and PolyOptions",
        ));
    }
    let head = poly::Head { fm: &fm, n, dv: s.head_dim_v, scale: opts.scale, center: popts.center, chunk: popts.chunk };
    let kvs = poly_kv(k, v, &s, opts.causal, popts.center, popts.chunk);
    let per_head: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..s.num_heads)
        .into_par_iter()
        .map(|h| {
            let kvh = h / s.group();
            let kv = &kvs[kvh];
            let qh = gather_head(q, n, s.num_heads, s.head_dim, h);
            let oh = gather_head(&fwd.o, n, s.num_heads, s.head_dim_v, h);
            let gh = gather_head(dout, n, s.num_heads, s.head_dim_v, h);
            let den = &fwd.den[h * n..(h + 1) * n];
            let m = poly_shift(&qh, kv, &s, opts, popts.center);
            if opts.causal {
                head.backward_causal(&qh, &kv.k, &kv.v, &oh, den, &gh, &m, &kv.kbar)
            } else {
                let (dq, dstate, dkbar) = head.backward_queries(&qh, &oh, den, &gh, &m, &kv.kbar, &fwd.kv_state[kvh]);
                let dkbar = dkbar.into_iter().map(T::from_f64).collect();
                (dq, dstate, dkbar)
            }
        })
        .collect();
    if opts.causal {
        return Ok(combine_grads(per_head, &s));
    }
    // Non-causal: sum each group's dH' and dk̄, then one key-side pass per key/value head.
    let g = s.group();
    let mut dqs = Vec::with_capacity(s.num_heads);
    let mut sums: Vec<(Vec<T>, Vec<f64>)> = Vec::with_capacity(s.num_kv_heads);
    for (h, (dq, dstate, dkbar)) in per_head.into_iter().enumerate() {
        dqs.push(dq);
        let dkbar: Vec<f64> = dkbar.iter().map(|x| x.as_f64()).collect();
        if h % g == 0 {
            sums.push((dstate, dkbar));
        } else {
            let (ds, dk) = sums.last_mut().expect("group leader pushed first");
            for (a, b) in ds.iter_mut().zip(&dstate) {
                *a += *b;
            }
            for (a, b) in dk.iter_mut().zip(&dkbar) {
                *a += *b;
            }
        }
    }
    let kv_grads: Vec<(Vec<T>, Vec<T>)> = kvs
        .par_iter()
        .zip(sums.par_iter())
        .map(|(kv, (dstate, dkbar))| head.backward_keys(&kv.k, &kv.v, dstate, dkbar))
        .collect();
    let (dks, dvs): (Vec<_>, Vec<_>) = kv_grads.into_iter().unzip();
    Ok(AttnGrads {
        dq: scatter_heads(&dqs, n, s.head_dim),
        dk: scatter_heads(&dks, n, s.head_dim),
        dv: scatter_heads(&dvs, n, s.head_dim_v),
    })
}

/// The score bound `R` of every query head (MATH §3, [`bound::score_bound`]): shifted scores when
/// `center`, else unshifted; `[num_heads]`, each against its key/value head. O(n·d) per head.
///
/// Errors: [`Error::BadInput`] when `q`/`k` disagree with `shape` or the scale is not positive.
pub fn head_bounds<T: Scalar>(
    q: &[T],
    k: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
    center: bool,
) -> Result<Vec<f64>> {
    let s = *shape;
    s.validate()?;
    s.check_len("q", q, s.num_heads, s.head_dim)?;
    s.check_len("k", k, s.num_kv_heads, s.head_dim)?;
    if !(opts.scale.is_finite() && opts.scale > 0.0) {
        return Err(Error::bad("scale", format!("must be finite and positive, got {}", opts.scale)));
    }
    let n = s.seq_len;
    Ok((0..s.num_heads)
        .into_par_iter()
        .map(|h| {
            let qh = gather_head(q, n, s.num_heads, s.head_dim, h);
            let kh = gather_head(k, n, s.num_kv_heads, s.head_dim, h / s.group());
            bound::score_bound(&qh, &kh, n, s.head_dim, opts.scale, opts.causal, center)
        })
        .collect())
}

/// ALTGrad forward (MATH §5; LSSSZ Lemma C.13, I.1): `Õ = D̃⁻¹ Φ_Q Φ_Kᵀ V` with the degree-`g`
/// features of [`features`] and the row shift of MATH §3 when `popts.center` (row `i`'s degree-`t`
/// block weighted by `T_{g−t}(−m_i)`). The same function as [`forward_poly`]; returned as an
/// [`AttnOutput`] with `lse_i = m_i + ln den_i`. Shapes as [`forward_exact`]; O(n·r·d_v) per head,
/// heads in parallel.
///
/// Errors: [`Error::BadInput`] on length/shape mismatches, a non-positive scale, an odd or zero
/// degree ([`bound::validate_degree`]), a zero chunk, or a feature width above
/// [`features::MAX_FEATURE_DIM`].
pub fn forward_altgrad<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
    popts: &PolyOptions,
) -> Result<AttnOutput<T>> {
    altgrad::forward(q, k, v, shape, opts, popts)
}

/// ALTGrad backward, the paper's Algorithm 1 for one layer in Q/K/V form (MATH §5; LSSSZ Def C.12,
/// Fact C.2, Lemma C.16, Def D.16, Lemmas I.3–I.8, with MATH §5.4's corrections): the exact
/// softmax-gradient formula with `f̃` in place of softmax, `p = f̃ ∘ (G Vᵀ) − diag(δ) f̃`,
/// `dQ = τ p K`, `dK = τ pᵀ Q`, `dV = f̃ᵀ G`, no chain rule through the row shift. It is **not**
/// the gradient of [`forward_altgrad`] (that is [`backward_poly`]); it tends to the exact
/// gradient as the degree rises. `fwd` must come from [`forward_altgrad`] with the same inputs;
/// `dout = dL/do [seq_len, num_heads, head_dim_v]`. O(n·r·d_v·d) per head; GQA `dk`, `dv` summed
/// over each group.
///
/// Errors: [`Error::BadInput`] as [`forward_altgrad`], when `fwd`/`dout` do not match the shape,
/// or when the Kronecker state `r·(d_v+1)·d` exceeds [`altgrad::MAX_KRON_STATE`].
#[allow(clippy::too_many_arguments)]
pub fn backward_altgrad<T: Scalar>(
    q: &[T],
    k: &[T],
    v: &[T],
    fwd: &AttnOutput<T>,
    dout: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
    popts: &PolyOptions,
) -> Result<AttnGrads<T>> {
    altgrad::backward(q, k, v, fwd, dout, shape, opts, popts)
}

/// The largest `|τ q_i·k_j|` of every query head over the allowed pairs, `[num_heads]`
/// ([`bound::max_abs_score`]; O(n²·d) per head, heads in parallel). For reports.
///
/// Errors: [`Error::BadInput`] when `q`/`k` disagree with `shape`.
pub fn head_max_scores<T: Scalar>(q: &[T], k: &[T], shape: &AttnShape, opts: &AttnOptions) -> Result<Vec<f64>> {
    let s = *shape;
    s.validate()?;
    s.check_len("q", q, s.num_heads, s.head_dim)?;
    s.check_len("k", k, s.num_kv_heads, s.head_dim)?;
    let n = s.seq_len;
    Ok((0..s.num_heads)
        .into_par_iter()
        .map(|h| {
            let qh = gather_head(q, n, s.num_heads, s.head_dim, h);
            let kh = gather_head(k, n, s.num_kv_heads, s.head_dim, h / s.group());
            bound::max_abs_score(&qh, &kh, n, s.head_dim, opts.scale, opts.causal)
        })
        .collect())
}
