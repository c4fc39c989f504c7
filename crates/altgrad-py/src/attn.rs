//! `attention_forward` / `attention_backward`: one attention call over a batch, on numpy arrays
//! in the flash-attn layout `q [B, T, H, D]`, `k [B, T, H_kv, D]`, `v [B, T, H_kv, D_v]` (MATH §1),
//! float32 or float64, C-contiguous. Inputs are read in place (zero-copy); outputs are the
//! library's own buffers handed to numpy without a copy when `B = 1` (one copy per output to
//! stack the batch otherwise). The library's API has no batch dimension yet, so each call loops
//! over the batch (batch `b` of a contiguous `[B, T, H, D]` array is a contiguous slice) inside
//! one GIL-released call. The Python package's `torch.autograd.Function`s
//! (`python/altgrad/attention.py`) are the intended callers; the checks here stand on their own.

use crate::runtime::{check_memory, record_kernel, run};
use altgrad::attention::{self as at, features, AttnOptions, AttnOutput, AttnShape, PolyOptions, PolyOutput};
use altgrad::linalg::Scalar;
use altgrad::Error;
use numpy::{Element, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::time::Instant;

/// The three methods of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    /// Exact softmax attention (MATH §2).
    Exact,
    /// Polynomial attention and its exact gradient (MATH §3–4).
    Poly,
    /// Polynomial forward, the paper's Algorithm 1 backward (MATH §5).
    AltGrad,
}

fn parse_method(s: &str) -> PyResult<Method> {
    match s {
        "exact" => Ok(Method::Exact),
        "poly" => Ok(Method::Poly),
        "altgrad" => Ok(Method::AltGrad),
        _ => Err(PyValueError::new_err(format!("method: expected \"exact\", \"poly\" or \"altgrad\", got {s:?}"))),
    }
}

/// Everything that fixes one call: method, batch, per-batch shape and options.
#[derive(Clone, Copy, Debug)]
struct Call {
    method: Method,
    batch: usize,
    shape: AttnShape,
    opts: AttnOptions,
    popts: PolyOptions,
}

impl Call {
    fn q_len(&self) -> usize {
        let s = &self.shape;
        s.seq_len * s.num_heads * s.head_dim
    }
    fn k_len(&self) -> usize {
        let s = &self.shape;
        s.seq_len * s.num_kv_heads * s.head_dim
    }
    fn v_len(&self) -> usize {
        let s = &self.shape;
        s.seq_len * s.num_kv_heads * s.head_dim_v
    }
    fn o_len(&self) -> usize {
        let s = &self.shape;
        s.seq_len * s.num_heads * s.head_dim_v
    }
    fn lse_len(&self) -> usize {
        self.shape.seq_len * self.shape.num_heads
    }
    /// Feature width `r = C(d+g, g)` (MATH §3), when representable.
    fn rank(&self) -> Option<usize> {
        features::feature_dim(self.shape.head_dim, self.popts.degree)
    }
    /// Values of one batch's non-causal poly state: `H_kv · r · (D_v + 1)`.
    fn state_len(&self) -> usize {
        match (self.method, self.opts.causal, self.rank()) {
            (Method::Poly, false, Some(r)) => self.shape.num_kv_heads * r * (self.shape.head_dim_v + 1),
            _ => 0,
        }
    }
    /// A rough upper estimate of the working memory in bytes, for [`check_memory`]: outputs and
    /// saved tensors (twice: the library's buffers and the stacked or copied ones), and for the
    /// polynomial methods the per-thread scratch of [`at::bound::poly_state_bytes`], every batch's
    /// non-causal state `H_kv·r·(D_v+1)` and, for ALTGrad's backward, two Kronecker states per
    /// running head (at most 8 bytes per value, capped as the library caps them).
    fn memory_bytes(&self, elem: usize, backward: bool) -> f64 {
        let (s, b, e) = (&self.shape, self.batch as f64, elem as f64);
        let threads = crate::runtime::num_threads().max(1).min(s.num_heads) as f64;
        let io = (self.q_len() + self.k_len() + self.v_len() + 2 * self.o_len() + 2 * self.lse_len()) as f64;
        let mut bytes = 2.0 * b * io * e;
        // A feature width above the library's limit is refused by the library itself.
        let r = self.rank().filter(|&r| r <= features::MAX_FEATURE_DIM);
        if let (true, Some(r)) = (self.method != Method::Exact, r) {
            bytes += threads * at::bound::poly_state_bytes(s.head_dim, s.head_dim_v, r, self.popts.chunk, elem) as f64;
            bytes += b * (s.num_kv_heads * r * (s.head_dim_v + 1)) as f64 * e;
            if backward && self.method == Method::AltGrad {
                let kron = at::altgrad::kron_state_len(r, s.head_dim_v, s.head_dim).unwrap_or(usize::MAX);
                bytes += threads * 2.0 * kron.min(at::altgrad::MAX_KRON_STATE) as f64 * 8.0;
            }
        }
        bytes
    }
}

/// Reads `[B, T, H, D]`, `[B, T, H_kv, D]`, `[B, T, H_kv, D_v]` and the options into a [`Call`].
#[allow(clippy::too_many_arguments)]
fn call_of(
    method: &str,
    q: &[usize],
    k: &[usize],
    v: &[usize],
    causal: bool,
    scale: Option<f64>,
    degree: usize,
    center: bool,
    chunk: usize,
) -> PyResult<Call> {
    let method = parse_method(method)?;
    for (name, s, want) in [("q", q, "[B, T, H, D]"), ("k", k, "[B, T, H_kv, D]"), ("v", v, "[B, T, H_kv, D_v]")] {
        if s.len() != 4 {
            return Err(PyValueError::new_err(format!("{name}: expected a 4-D tensor {want}, got shape {s:?}")));
        }
        if s.contains(&0) {
            return Err(PyValueError::new_err(format!(
                "{name}: every dimension of {want} must be positive, got {s:?}"
            )));
        }
    }
    let (b, t, h, d) = (q[0], q[1], q[2], q[3]);
    let (hkv, dv) = (k[2], v[3]);
    if k != [b, t, hkv, d] {
        return Err(PyValueError::new_err(format!(
            "k: shape {k:?} does not match q {q:?}: expected [B, T, H_kv, D] = [{b}, {t}, H_kv, {d}]"
        )));
    }
    if v[..3] != [b, t, hkv] {
        return Err(PyValueError::new_err(format!(
            "v: shape {v:?} does not match k {k:?}: expected [B, T, H_kv, D_v] = [{b}, {t}, {hkv}, D_v]"
        )));
    }
    if !h.is_multiple_of(hkv) {
        return Err(PyValueError::new_err(format!(
            "k: the number of query heads H = {h} is not a multiple of the key/value heads H_kv = {hkv} (GQA)"
        )));
    }
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    if !(scale.is_finite() && scale > 0.0) {
        return Err(PyValueError::new_err(format!("scale: must be finite and positive, got {scale}")));
    }
    let popts = PolyOptions { degree, center, chunk };
    if method != Method::Exact {
        popts.validate().map_err(crate::runtime::to_py_err)?;
    }
    Ok(Call {
        method,
        batch: b,
        shape: AttnShape { seq_len: t, num_heads: h, num_kv_heads: hkv, head_dim: d, head_dim_v: dv },
        opts: AttnOptions { causal, scale },
        popts,
    })
}

/// `x` as an array of `T` (the dtype of `q`), else `TypeError` naming it.
fn typed<'py, T: Element>(name: &str, x: &Bound<'py, PyAny>, dtype: &str) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    x.cast::<PyArrayDyn<T>>()
        .cloned()
        .map_err(|_| PyTypeError::new_err(format!("{name}: expected a {dtype} array (the dtype of q)")))
}

/// A read-only borrow of `x`, else `ValueError` naming it.
fn borrow<'py, T: Element>(name: &str, x: &Bound<'py, PyArrayDyn<T>>) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    x.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: cannot be read: {e}")))
}

/// The contiguous data of `x` with `want` values, else `ValueError` naming it.
fn data<'a, T: Element>(name: &str, x: &'a PyReadonlyArrayDyn<'_, T>, want: usize) -> PyResult<&'a [T]> {
    let s = x
        .as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name}: must be C-contiguous (call .contiguous())")))?;
    if s.len() != want {
        return Err(PyValueError::new_err(format!(
            "{name}: expected {want} values, got {} (shape {:?})",
            s.len(),
            x.shape()
        )));
    }
    Ok(s)
}

/// `BadInput` naming `name` at the first NaN or infinity of `x`. The scan is branch-free and
/// vectorizes (`v − v` is 0 for finite `v` and NaN for ±Inf and NaN, summed in 16 lanes); only a
/// failing array is searched for the index.
#[allow(clippy::eq_op)] // `v − v` on purpose: 0 exactly when `v` is finite
fn check_finite<T: Scalar>(name: &str, x: &[T]) -> altgrad::Result<()> {
    const LANES: usize = 16;
    let mut acc = [T::zero(); LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += c[j] - c[j];
        }
    }
    if acc.iter().all(|a| *a == T::zero()) && tail.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    match x.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::bad(name, format!("has a non-finite value (NaN or Inf) at flat index {i}"))),
    }
}

/// Concatenates per-batch outputs; the single batch's buffer is moved, not copied.
struct Stack<T> {
    data: Vec<T>,
    parts: usize,
}

impl<T: Copy> Stack<T> {
    fn new(batch: usize, len: usize) -> Self {
        Stack { data: if batch > 1 { Vec::with_capacity(batch * len) } else { Vec::new() }, parts: batch }
    }
    fn push(&mut self, v: Vec<T>) {
        if self.parts == 1 {
            self.data = v;
        } else {
            self.data.extend_from_slice(&v);
        }
    }
}

/// What the forward of one call produced, stacked over the batch.
struct Fwd<T> {
    o: Vec<T>,
    lse: Vec<T>,
    den: Vec<T>,
    state: Vec<T>,
}

fn forward_batches<T: Scalar>(c: &Call, q: &[T], k: &[T], v: &[T]) -> altgrad::Result<Fwd<T>> {
    check_finite("q", q)?;
    check_finite("k", k)?;
    check_finite("v", v)?;
    let (b, s) = (c.batch, &c.shape);
    let (mut o, mut lse) = (Stack::new(b, c.o_len()), Stack::new(b, c.lse_len()));
    let poly = c.method == Method::Poly;
    let (mut den, mut state) = (Stack::new(if poly { b } else { 0 }, c.lse_len()), Vec::new());
    let mut kernel = 0.0;
    for bi in 0..b {
        let qb = &q[bi * c.q_len()..(bi + 1) * c.q_len()];
        let kb = &k[bi * c.k_len()..(bi + 1) * c.k_len()];
        let vb = &v[bi * c.v_len()..(bi + 1) * c.v_len()];
        let t0 = Instant::now();
        match c.method {
            Method::Exact => {
                let f = at::forward_exact(qb, kb, vb, s, &c.opts)?;
                kernel += t0.elapsed().as_secs_f64();
                o.push(f.o);
                lse.push(f.lse);
            }
            Method::AltGrad => {
                let f = at::forward_altgrad(qb, kb, vb, s, &c.opts, &c.popts)?;
                kernel += t0.elapsed().as_secs_f64();
                o.push(f.o);
                lse.push(f.lse);
            }
            Method::Poly => {
                let f = at::forward_poly(qb, kb, vb, s, &c.opts, &c.popts)?;
                kernel += t0.elapsed().as_secs_f64();
                o.push(f.o);
                lse.push(f.lse);
                den.push(f.den);
                // STATE: with the library's PolyState, the causal final state is returned here too.
                for h in f.kv_state {
                    state.extend_from_slice(&h);
                }
            }
        }
    }
    record_kernel(kernel);
    Ok(Fwd { o: o.data, lse: lse.data, den: den.data, state })
}

/// Forward of one attention call on numpy arrays: see `attention_forward`.
fn forward_t<'py, T: Scalar + Element>(
    py: Python<'py>,
    c: &Call,
    q: &Bound<'py, PyArrayDyn<T>>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let dtype = T::DTYPE.to_lowercase().replace('f', "float");
    let (k, v) = (typed::<T>("k", k, &dtype)?, typed::<T>("v", v, &dtype)?);
    let (qr, kr, vr) = (borrow("q", q)?, borrow("k", &k)?, borrow("v", &v)?);
    let (qs, ks, vs) = (
        data("q", &qr, c.batch * c.q_len())?,
        data("k", &kr, c.batch * c.k_len())?,
        data("v", &vr, c.batch * c.v_len())?,
    );
    check_memory(c.memory_bytes(std::mem::size_of::<T>(), false), "this attention forward")?;
    let f = run(py, || forward_batches(c, qs, ks, vs))?;
    let s = &c.shape;
    let (b, t, h, hkv, dv) = (c.batch, s.seq_len, s.num_heads, s.num_kv_heads, s.head_dim_v);
    let out = PyDict::new(py);
    out.set_item("o", PyArray1::from_vec(py, f.o).reshape([b, t, h, dv])?)?;
    out.set_item("lse", PyArray1::from_vec(py, f.lse).reshape([b, h, t])?)?;
    if c.method == Method::Poly {
        out.set_item("den", PyArray1::from_vec(py, f.den).reshape([b, h, t])?)?;
        let r = if c.opts.causal { 0 } else { c.rank().unwrap_or(0) };
        let e = if c.opts.causal { 0 } else { dv + 1 };
        out.set_item("kv_state", PyArray1::from_vec(py, f.state).reshape([b, hkv, r, e])?)?;
    }
    Ok(out)
}

/// `_core.attention_forward(method, q, k, v, *, causal, scale, degree, center, chunk) -> dict`.
///
/// `q [B, T, H, D]`, `k [B, T, H_kv, D]`, `v [B, T, H_kv, D_v]`: C-contiguous numpy arrays of one
/// dtype (float32 or float64), `H` a multiple of `H_kv`, every size positive and every value
/// finite. `method` `"exact"` (MATH §2), `"poly"` (MATH §3–4) or `"altgrad"` (MATH §5; same
/// forward as poly); `scale` τ (`None`: `1/√D`); `degree` (even ≥ 2), `center` (row shift, MATH
/// §3) and `chunk` (≥ 1) are used by poly and altgrad only. Returns `o [B, T, H, D_v]` and
/// `lse [B, H, T]`, and for poly also `den [B, H, T]` and `kv_state [B, H_kv, r, D_v + 1]`
/// (non-causal `H' = Φ_Kᵀ [V 1]`, MATH §4; `[B, H_kv, 0, 0]` causal), all of the input dtype:
/// what `attention_backward` needs.
///
/// Errors: `TypeError` for arrays that are not float32/float64 or not all of one dtype;
/// `ValueError` naming the argument for a bad method, shape, scale, degree, chunk, a
/// non-contiguous array or a NaN/Inf; `MemoryError` when the working memory would exceed the
/// free memory; `RuntimeError` for an internal error.
#[pyfunction]
#[pyo3(signature = (method, q, k, v, *, causal, scale, degree, center, chunk))]
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<'py>(
    py: Python<'py>,
    method: &str,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    causal: bool,
    scale: Option<f64>,
    degree: usize,
    center: bool,
    chunk: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let shape = |name: &str, x: &Bound<'py, PyAny>| -> PyResult<Vec<usize>> {
        x.cast::<numpy::PyUntypedArray>()
            .map(|a| a.shape().to_vec())
            .map_err(|_| PyTypeError::new_err(format!("{name}: expected a numpy array")))
    };
    let c = call_of(method, &shape("q", q)?, &shape("k", k)?, &shape("v", v)?, causal, scale, degree, center, chunk)?;
    if let Ok(q) = q.cast::<PyArrayDyn<f32>>() {
        forward_t::<f32>(py, &c, q, k, v)
    } else if let Ok(q) = q.cast::<PyArrayDyn<f64>>() {
        forward_t::<f64>(py, &c, q, k, v)
    } else {
        Err(PyTypeError::new_err("q: expected a float32 or float64 array"))
    }
}

/// The saved forward tensors of one call, as slices.
struct Saved<'a, T> {
    o: &'a [T],
    lse: &'a [T],
    den: &'a [T],
    state: &'a [T],
}

fn backward_batches<T: Scalar>(
    c: &Call,
    q: &[T],
    k: &[T],
    v: &[T],
    sv: &Saved<'_, T>,
    dout: &[T],
) -> altgrad::Result<(Vec<T>, Vec<T>, Vec<T>)> {
    check_finite("grad_output", dout)?;
    let b = c.batch;
    let s = &c.shape;
    let (mut dq, mut dk, mut dv) = (Stack::new(b, c.q_len()), Stack::new(b, c.k_len()), Stack::new(b, c.v_len()));
    let st = c.state_len();
    let mut kernel = 0.0;
    for bi in 0..b {
        let qb = &q[bi * c.q_len()..(bi + 1) * c.q_len()];
        let kb = &k[bi * c.k_len()..(bi + 1) * c.k_len()];
        let vb = &v[bi * c.v_len()..(bi + 1) * c.v_len()];
        let gb = &dout[bi * c.o_len()..(bi + 1) * c.o_len()];
        let o = sv.o[bi * c.o_len()..(bi + 1) * c.o_len()].to_vec();
        let lse = sv.lse[bi * c.lse_len()..(bi + 1) * c.lse_len()].to_vec();
        let (t0, g) = match c.method {
            Method::Exact => {
                let fwd = AttnOutput { o, lse };
                let t0 = Instant::now();
                (t0, at::backward_exact(qb, kb, vb, &fwd, gb, s, &c.opts)?)
            }
            Method::AltGrad => {
                let fwd = AttnOutput { o, lse };
                let t0 = Instant::now();
                (t0, at::backward_altgrad(qb, kb, vb, &fwd, gb, s, &c.opts, &c.popts)?)
            }
            Method::Poly => {
                let den = sv.den[bi * c.lse_len()..(bi + 1) * c.lse_len()].to_vec();
                let kv_state = if st == 0 {
                    Vec::new()
                } else {
                    sv.state[bi * st..(bi + 1) * st].chunks_exact(st / s.num_kv_heads).map(|x| x.to_vec()).collect()
                };
                // STATE: the initial state and dL/d(final state) enter the library's backward here,
                // and dL/d(initial state) comes back with the input gradients.
                let fwd = PolyOutput { o, lse, den, kv_state };
                let t0 = Instant::now();
                (t0, at::backward_poly(qb, kb, vb, &fwd, gb, s, &c.opts, &c.popts)?)
            }
        };
        kernel += t0.elapsed().as_secs_f64();
        dq.push(g.dq);
        dk.push(g.dk);
        dv.push(g.dv);
    }
    record_kernel(kernel);
    Ok((dq.data, dk.data, dv.data))
}

#[allow(clippy::too_many_arguments)]
fn backward_t<'py, T: Scalar + Element>(
    py: Python<'py>,
    c: &Call,
    q: &Bound<'py, PyArrayDyn<T>>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    saved: &Bound<'py, PyDict>,
    dout: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let dtype = T::DTYPE.to_lowercase().replace('f', "float");
    let (k, v, g) =
        (typed::<T>("k", k, &dtype)?, typed::<T>("v", v, &dtype)?, typed::<T>("grad_output", dout, &dtype)?);
    let get = |name: &str| -> PyResult<Bound<'py, PyArrayDyn<T>>> {
        match saved.get_item(name)? {
            Some(x) => typed::<T>(name, &x, &dtype),
            None => Err(PyValueError::new_err(format!("saved: missing `{name}` (pass attention_forward's dict)"))),
        }
    };
    let poly = c.method == Method::Poly;
    let (o, lse) = (get("o")?, get("lse")?);
    let (den, state) = if poly { (Some(get("den")?), Some(get("kv_state")?)) } else { (None, None) };
    let (qr, kr, vr, gr) = (borrow("q", q)?, borrow("k", &k)?, borrow("v", &v)?, borrow("grad_output", &g)?);
    let (or, lr) = (borrow("o", &o)?, borrow("lse", &lse)?);
    let dr = den.as_ref().map(|x| borrow("den", x)).transpose()?;
    let sr = state.as_ref().map(|x| borrow("kv_state", x)).transpose()?;
    let b = c.batch;
    let (qs, ks, vs) = (data("q", &qr, b * c.q_len())?, data("k", &kr, b * c.k_len())?, data("v", &vr, b * c.v_len())?);
    let gs = data("grad_output", &gr, b * c.o_len())?;
    let sv = Saved {
        o: data("o", &or, b * c.o_len())?,
        lse: data("lse", &lr, b * c.lse_len())?,
        den: match &dr {
            Some(x) => data("den", x, b * c.lse_len())?,
            None => &[],
        },
        state: match &sr {
            Some(x) => data("kv_state", x, b * c.state_len())?,
            None => &[],
        },
    };
    check_memory(c.memory_bytes(std::mem::size_of::<T>(), true), "this attention backward")?;
    let (dq, dk, dv) = run(py, || backward_batches(c, qs, ks, vs, &sv, gs))?;
    let s = &c.shape;
    let (t, h, hkv, d, dvv) = (s.seq_len, s.num_heads, s.num_kv_heads, s.head_dim, s.head_dim_v);
    Ok((
        PyArray1::from_vec(py, dq).reshape([b, t, h, d])?.into_any(),
        PyArray1::from_vec(py, dk).reshape([b, t, hkv, d])?.into_any(),
        PyArray1::from_vec(py, dv).reshape([b, t, hkv, dvv])?.into_any(),
    ))
}

/// `_core.attention_backward(method, q, k, v, saved, grad_output, *, causal, scale, degree,
/// center, chunk) -> (dq, dk, dv)`.
///
/// `saved` is the dict `attention_forward` returned for the same inputs and options;
/// `grad_output = dL/do [B, T, H, D_v]` (finite). Exact: FA2's backward (MATH §2). Poly: the exact
/// gradient of the polynomial forward, through the row shift (MATH §4). ALTGrad: the paper's
/// Algorithm 1 (MATH §5) — the softmax-gradient formula with the low-rank `f̃`, not the gradient
/// of any function. Returns `dq [B, T, H, D]`, `dk [B, T, H_kv, D]`, `dv [B, T, H_kv, D_v]`
/// (GQA groups summed), of the input dtype.
///
/// Errors: as `attention_forward`, plus `ValueError` for a missing or mis-sized saved array.
#[pyfunction]
#[pyo3(signature = (method, q, k, v, saved, grad_output, *, causal, scale, degree, center, chunk))]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<'py>(
    py: Python<'py>,
    method: &str,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    saved: &Bound<'py, PyDict>,
    grad_output: &Bound<'py, PyAny>,
    causal: bool,
    scale: Option<f64>,
    degree: usize,
    center: bool,
    chunk: usize,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let shape = |name: &str, x: &Bound<'py, PyAny>| -> PyResult<Vec<usize>> {
        x.cast::<numpy::PyUntypedArray>()
            .map(|a| a.shape().to_vec())
            .map_err(|_| PyTypeError::new_err(format!("{name}: expected a numpy array")))
    };
    let c = call_of(method, &shape("q", q)?, &shape("k", k)?, &shape("v", v)?, causal, scale, degree, center, chunk)?;
    let gshape = shape("grad_output", grad_output)?;
    let s = &c.shape;
    if gshape != [c.batch, s.seq_len, s.num_heads, s.head_dim_v] {
        return Err(PyValueError::new_err(format!(
            "grad_output: shape {gshape:?}, expected [B, T, H, D_v] = {:?}",
            [c.batch, s.seq_len, s.num_heads, s.head_dim_v]
        )));
    }
    if let Ok(q) = q.cast::<PyArrayDyn<f32>>() {
        backward_t::<f32>(py, &c, q, k, v, saved, grad_output)
    } else if let Ok(q) = q.cast::<PyArrayDyn<f64>>() {
        backward_t::<f64>(py, &c, q, k, v, saved, grad_output)
    } else {
        Err(PyTypeError::new_err("q: expected a float32 or float64 array"))
    }
}
