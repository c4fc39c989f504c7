//! `attention_forward` / `attention_backward`: one attention call over a batch, on numpy arrays
//! in the flash-attn layout `q [B, T, H, D]`, `k [B, T, H_kv, D]`, `v [B, T, H_kv, D_v]` (MATH §1),
//! float32 or float64, C-contiguous. Inputs are read in place (zero-copy) as one batched
//! [`Qkv`]: the library's kernels run every (sequence, head) pair in parallel in one call, and
//! their output buffers are handed to numpy without a copy. The causal polynomial scan's state
//! ([`PolyState`]: `s [B, H_kv, r, D_v+1]`, `key_sum [B, H_kv, D]`, `reference [B, H_kv, D]`,
//! `count`) goes in and out as a tuple of arrays. The Python package's `torch.autograd.Function`s
//! (`python/altgrad/attention.py`) are the intended callers; the checks here stand on their own.

use crate::runtime::{check_memory, record_kernel, run};
use altgrad::attention::{
    self as at, features, AttnOptions, AttnShape, HybridOptions, Mask, Method, PolyOptions, PolySaved, PolyState,
    PolyStateGrad, Qkv,
};
use altgrad::linalg::Scalar;
use altgrad::Error;
use numpy::{Element, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::time::Instant;

/// The library method named `s` ([`Method::from_name`], or `"hybrid"`: [`Method::Hybrid`], MATH
/// §4.1).
///
/// Errors: `ValueError` naming `method` and listing the names.
fn parse_method(s: &str) -> PyResult<Method> {
    if s == "hybrid" {
        return Ok(Method::Hybrid);
    }
    Method::from_name(s).ok_or_else(|| {
        let names: Vec<String> =
            Method::ALL.iter().map(|m| format!("{:?}", m.as_str())).chain(["\"hybrid\"".to_string()]).collect();
        let (last, rest) = names.split_last().expect("at least one method");
        PyValueError::new_err(format!("method: expected {} or {last}, got {s:?}", rest.join(", ")))
    })
}

/// Everything that fixes one call: method, batched shape, options (the mask's query offset is 0;
/// a state's count moves it, [`Call::opts_at`]). A hybrid call ([`Method::Hybrid`]) has `hybrid`
/// set: its window, sinks and polynomial.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Call {
    pub(crate) method: Method,
    hybrid: Option<HybridOptions>,
    pub(crate) shape: AttnShape,
    pub(crate) opts: AttnOptions,
    pub(crate) popts: PolyOptions,
}

impl Call {
    /// The hybrid options of a hybrid call (no window, no sinks — poly — if unset).
    fn hybrid_options(&self) -> HybridOptions {
        self.hybrid.unwrap_or(HybridOptions { window: 0, sinks: 0, poly: self.popts })
    }
    /// Feature width `r = C(d+g, g)` (MATH §3), when representable.
    pub(crate) fn rank(&self) -> Option<usize> {
        features::feature_dim(self.shape.head_dim, self.popts.degree)
    }
    fn causal(&self) -> bool {
        self.opts.is_causal()
    }
    /// Values of the polynomial state `[B, H_kv, r, D_v + 1]` (0 when `r` is not representable).
    fn state_len(&self) -> usize {
        let s = &self.shape;
        self.rank().map_or(0, |r| s.kv_heads() * r * (s.head_dim_v + 1))
    }
    /// Values of a causal poly forward's block states (`PolySaved::block_states`: one state per
    /// key/value head and scan block after the first), 0 otherwise.
    fn block_states_len(&self) -> usize {
        match self.rank() {
            Some(r) if self.method == Method::Poly && self.causal() => {
                at::poly::block_states_len(&self.shape, self.popts.chunk, r)
            }
            _ => 0,
        }
    }
    /// The options of a call whose rows start at position `count` (a state's keys so far).
    fn opts_at(&self, count: usize) -> AttnOptions {
        match self.opts.mask {
            Mask::Causal { .. } => self.opts.with_mask(Mask::Causal { q_offset: count }),
            _ => self.opts,
        }
    }
    /// The shape of a 4-D output `[B, T, heads, width]`.
    fn dims(&self, heads: usize, width: usize) -> [usize; 4] {
        [self.shape.batch, self.shape.seq_len, heads, width]
    }
    /// A rough upper estimate of the working memory in bytes, for [`check_memory`]: inputs,
    /// outputs and saved tensors, and for the polynomial methods the per-thread scratch of
    /// [`at::cost::poly_state_bytes`], the states `[B, H_kv, r, D_v+1]` (twice: forward state and
    /// its gradient), causal poly's block states and, for ALTGrad's backward, two Kronecker states
    /// per running head (at most 8 bytes per value, capped as the library caps them).
    pub(crate) fn memory_bytes(&self, elem: usize, backward: bool) -> f64 {
        let (s, e) = (&self.shape, elem as f64);
        let threads = crate::runtime::num_threads().max(1).min(s.heads()) as f64;
        let rows = (s.batch * s.seq_len) as f64;
        let io = rows
            * (2.0 * (s.num_heads * s.head_dim) as f64 + 2.0 * (s.num_kv_heads * (s.head_dim + s.head_dim_v)) as f64);
        let mut bytes = (io + rows * (2 * s.num_heads * s.head_dim_v + 2 * s.num_heads) as f64) * e;
        // A feature width above the library's limit is refused by the library itself.
        let r = self.rank().filter(|&r| r <= features::MAX_FEATURE_DIM);
        if let (true, Some(r)) = (self.method != Method::Exact, r) {
            bytes += threads * at::cost::poly_state_bytes(s.head_dim, s.head_dim_v, r, self.popts.chunk, elem) as f64;
            bytes += (2 * self.state_len() + self.block_states_len()) as f64 * e;
            if backward && self.method == Method::AltGrad {
                let kron = at::altgrad::kron_state_len(r, s.head_dim_v, s.head_dim).unwrap_or(usize::MAX);
                bytes += threads * 2.0 * kron.min(at::altgrad::MAX_KRON_STATE) as f64 * 8.0;
            }
        }
        bytes
    }
}

/// Reads `[B, T, H, D]`, `[B, T, H_kv, D]`, `[B, T, H_kv, D_v]` and the options into a [`Call`].
/// `window` (keys per row, diagonal included) and `sinks` (leading keys every row sees) make the
/// exact method's mask a sliding window (MATH §1 "Masks"; causal only).
#[allow(clippy::too_many_arguments)]
pub(crate) fn call_of(
    method: &str,
    q: &[usize],
    k: &[usize],
    v: &[usize],
    causal: bool,
    scale: Option<f64>,
    degree: usize,
    center: bool,
    chunk: usize,
    window: Option<usize>,
    sinks: usize,
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
    if method == Method::Hybrid {
        // hybrid: the window and sinks are its near keys, the rest its polynomial's
        let Some(window) = window else {
            return Err(PyValueError::new_err("window: hybrid attention needs a window (keys per row seen exactly)"));
        };
        if !causal {
            return Err(PyValueError::new_err("causal: hybrid attention is causal: pass causal=True"));
        }
        return Ok(Call {
            method,
            hybrid: Some(HybridOptions { window, sinks, poly: popts }),
            shape: AttnShape::new(t, h, hkv, d).with_head_dim_v(dv).with_batch(b),
            opts: AttnOptions { mask: Mask::causal(), scale },
            popts,
        });
    }
    let mask = match window {
        None if sinks > 0 => {
            return Err(PyValueError::new_err("sinks: attention sinks belong to a sliding window: pass window too"))
        }
        None => Mask::from_causal(causal),
        Some(_) if method != Method::Exact => {
            return Err(PyValueError::new_err(
                "window: a sliding window is an exact-attention mask (method=\"exact\"); the polynomial methods \
                 take the full or the causal mask",
            ))
        }
        Some(_) if !causal => {
            return Err(PyValueError::new_err("window: a sliding window is causal: pass causal=True"))
        }
        Some(0) => return Err(PyValueError::new_err("window: must be at least 1 (keys per row, diagonal included)")),
        Some(window) => Mask::Window { window, sinks, q_offset: 0 },
    };
    Ok(Call {
        method,
        hybrid: None,
        shape: AttnShape::new(t, h, hkv, d).with_head_dim_v(dv).with_batch(b),
        opts: AttnOptions { mask, scale },
        popts,
    })
}

/// `x` as an array of `T` (the dtype of `q`), else `TypeError` naming it.
pub(crate) fn typed<'py, T: Element>(
    name: &str,
    x: &Bound<'py, PyAny>,
    dtype: &str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    x.cast::<PyArrayDyn<T>>()
        .cloned()
        .map_err(|_| PyTypeError::new_err(format!("{name}: expected a {dtype} array (the dtype of q)")))
}

/// A read-only borrow of `x`, else `ValueError` naming it.
pub(crate) fn borrow<'py, T: Element>(
    name: &str,
    x: &Bound<'py, PyArrayDyn<T>>,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    x.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: cannot be read: {e}")))
}

/// The contiguous data of `x` with `want` values, else `ValueError` naming it.
pub(crate) fn data<'a, T: Element>(name: &str, x: &'a PyReadonlyArrayDyn<'_, T>, want: usize) -> PyResult<&'a [T]> {
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
pub(crate) fn check_finite<T: Scalar>(name: &str, x: &[T]) -> altgrad::Result<()> {
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

/// Finite inputs whose intermediates overflowed (RELIABILITY "No silent non-finite results"):
/// `BadInput` naming the result (`attention output o (poly attention, F32)`, …) with the count,
/// the first value and what to change ([`altgrad::error::check_finite_result`]), after the same
/// vectorized scan as [`check_finite`] for each of `results`.
pub(crate) fn check_results<T: Scalar>(c: &Call, results: &[(&str, &[T])]) -> altgrad::Result<()> {
    for (name, x) in results {
        if check_finite(name, x).is_err() {
            let wider = if T::DTYPE == "F64" { "" } else { "float64 inputs, or " };
            let advice = match c.method {
                Method::Exact => format!("use {wider}a smaller scale (|τ q·k| overflows {})", T::DTYPE),
                _ => format!(
                    "use {wider}smaller scores (a smaller scale or inputs; T_{} grows as |s|^{0})",
                    c.popts.degree
                ),
            };
            let stage = format!("{name} ({} attention, {})", c.method, T::DTYPE);
            altgrad::error::check_finite_result(&stage, x, &advice)?;
        }
    }
    Ok(())
}

/// The shape of a numpy array, else `TypeError` naming it.
pub(crate) fn shape_of(name: &str, x: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    x.cast::<numpy::PyUntypedArray>()
        .map(|a| a.shape().to_vec())
        .map_err(|_| PyTypeError::new_err(format!("{name}: expected a numpy array")))
}

/// A copy of array `x` (`name`), which must have shape `want` and finite values.
pub(crate) fn owned<T: Scalar + Element>(
    name: &str,
    x: &Bound<'_, PyAny>,
    want: &[usize],
    dtype: &str,
) -> PyResult<Vec<T>> {
    let s = owned_unchecked::<T>(name, x, want, dtype)?;
    check_finite(name, &s).map_err(crate::runtime::to_py_err)?;
    Ok(s)
}

/// A copy of array `x` (`name`), which must have shape `want`; its values are not checked (the
/// caller checks them as a result: [`check_results`]).
pub(crate) fn owned_unchecked<T: Scalar + Element>(
    name: &str,
    x: &Bound<'_, PyAny>,
    want: &[usize],
    dtype: &str,
) -> PyResult<Vec<T>> {
    let got = shape_of(name, x)?;
    if got != want {
        return Err(PyValueError::new_err(format!("{name}: shape {got:?}, expected {want:?}")));
    }
    let a = typed::<T>(name, x, dtype)?;
    let r = borrow(name, &a)?;
    Ok(data(name, &r, want.iter().product())?.to_vec())
}

/// The dims of a state's `s` and of its `key_sum` / `reference`.
pub(crate) fn state_dims(c: &Call) -> PyResult<([usize; 4], [usize; 3])> {
    let s = &c.shape;
    let r = c.rank().filter(|&r| r <= features::MAX_FEATURE_DIM).ok_or_else(|| {
        PyValueError::new_err(format!("degree: feature width C(D+g, g) for D = {} is too large", s.head_dim))
    })?;
    Ok(([s.batch, s.num_kv_heads, r, s.head_dim_v + 1], [s.batch, s.num_kv_heads, s.head_dim]))
}

/// Checks that a call may carry a state: causal polynomial attention (MATH §4 "Causal").
fn check_stateful(c: &Call, what: &str) -> PyResult<()> {
    match c.method {
        Method::Hybrid => Err(PyValueError::new_err(format!(
            "{what}: hybrid attention carries no state; only the causal polynomial method (method=\"poly\") does"
        ))),
        Method::Poly if c.causal() => Ok(()),
        Method::Poly => Err(PyValueError::new_err(format!(
            "{what}: the polynomial scan's state continues a causal sequence: pass causal=True"
        ))),
        Method::AltGrad => Err(PyValueError::new_err(format!(
            "{what}: ALTGrad's backward (the paper's Algorithm 1) does not continue a state; use method=\"poly\" \
             (the same forward, with its exact gradient) or run the sequence in one call"
        ))),
        Method::Exact => Err(PyValueError::new_err(format!(
            "{what}: only the causal polynomial method (method=\"poly\", causal=True) carries a state"
        ))),
    }
}

/// `initial_state = (s, key_sum, reference, count)` as a [`PolyState`] (copied; each array checked
/// by name: `s [B, H_kv, r, D_v+1]`, `key_sum` and `reference` `[B, H_kv, D]`, `count ≥ 0`).
fn state_of<T: Scalar + Element>(c: &Call, st: &Bound<'_, PyAny>, dtype: &str) -> PyResult<PolyState<T>> {
    check_stateful(c, "initial_state")?;
    let st = st.cast::<PyTuple>().map_err(|_| {
        PyTypeError::new_err(
            "initial_state: expected a tuple (s, key_sum, reference, count), as output_final_state returns",
        )
    })?;
    if st.len() != 4 {
        return Err(PyValueError::new_err(format!(
            "initial_state: expected 4 items (s, key_sum, reference, count), got {}",
            st.len()
        )));
    }
    let (ds, dk) = state_dims(c)?;
    let count: usize = st
        .get_item(3)?
        .extract()
        .map_err(|_| PyTypeError::new_err("initial_state.count: expected a non-negative int (keys so far)"))?;
    Ok(PolyState {
        s: owned("initial_state.s", &st.get_item(0)?, &ds, dtype)?,
        key_sum: owned("initial_state.key_sum", &st.get_item(1)?, &dk, dtype)?,
        reference: owned("initial_state.reference", &st.get_item(2)?, &dk, dtype)?,
        count,
    })
}

/// What the forward of one call produced.
struct Fwd<T> {
    o: Vec<T>,
    lse: Vec<T>,
    /// Hybrid: the far part's output and log-sum-exps (empty otherwise).
    far: (Vec<T>, Vec<T>),
    den: Vec<T>,
    kv_state: Vec<T>,
    reference: Vec<T>,
    final_state: Option<PolyState<T>>,
    /// Causal poly: the scan's block states, for a blocked backward (empty otherwise).
    block_states: Vec<T>,
}

fn forward_all<T: Scalar>(
    c: &Call,
    q: &[T],
    k: &[T],
    v: &[T],
    initial: Option<&PolyState<T>>,
) -> altgrad::Result<Fwd<T>> {
    check_finite("q", q)?;
    check_finite("k", k)?;
    check_finite("v", v)?;
    let x = Qkv::new(q, k, v, &c.shape)?;
    let t0 = Instant::now();
    let none = || (Vec::new(), Vec::new());
    let f = match c.method {
        Method::Hybrid => {
            let h = c.hybrid_options();
            let f = at::forward_hybrid(&x, &c.opts, &h)?;
            let far = (f.far_o, f.far_lse);
            Fwd {
                o: f.o,
                lse: f.lse,
                far,
                den: Vec::new(),
                kv_state: Vec::new(),
                reference: Vec::new(),
                final_state: None,
                block_states: Vec::new(),
            }
        }
        Method::Exact => {
            let f = at::forward_exact(&x, &c.opts)?;
            Fwd {
                o: f.o,
                lse: f.lse,
                far: none(),
                den: Vec::new(),
                kv_state: Vec::new(),
                reference: Vec::new(),
                final_state: None,
                block_states: Vec::new(),
            }
        }
        Method::Poly | Method::AltGrad => {
            if c.method == Method::AltGrad {
                // the backward's Kronecker state: refused before any work
                at::altgrad::check_kron_state(&c.shape, &c.popts)?;
            }
            let opts = c.opts_at(initial.map_or(0, |st| st.count));
            let f = at::forward_poly_state(&x, &opts, &c.popts, initial, None)?;
            let saved = f.saved;
            Fwd {
                o: f.o,
                lse: f.lse,
                far: none(),
                den: f.den,
                kv_state: saved.kv_state,
                reference: saved.reference,
                final_state: saved.final_state,
                // ALTGrad's backward does not scan by blocks: not returned
                block_states: if c.method == Method::Poly { saved.block_states } else { Vec::new() },
            }
        }
    };
    record_kernel(t0.elapsed().as_secs_f64());
    check_results(c, &[("attention output o", &f.o), ("lse", &f.lse)])?;
    Ok(f)
}

/// Forward of one attention call on numpy arrays: see `attention_forward`.
fn forward_t<'py, T: Scalar + Element>(
    py: Python<'py>,
    c: &Call,
    q: &Bound<'py, PyArrayDyn<T>>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    initial: Option<&Bound<'py, PyAny>>,
    output_final_state: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let dtype = T::DTYPE.to_lowercase().replace('f', "float");
    let (k, v) = (typed::<T>("k", k, &dtype)?, typed::<T>("v", v, &dtype)?);
    let (qr, kr, vr) = (borrow("q", q)?, borrow("k", &k)?, borrow("v", &v)?);
    let s = c.shape;
    let (b, t, h, hkv, d, dv) = (s.batch, s.seq_len, s.num_heads, s.num_kv_heads, s.head_dim, s.head_dim_v);
    let (qs, ks, vs) =
        (data("q", &qr, b * t * h * d)?, data("k", &kr, b * t * hkv * d)?, data("v", &vr, b * t * hkv * dv)?);
    if output_final_state {
        check_stateful(c, "output_final_state")?;
    }
    let initial = initial.map(|st| state_of::<T>(c, st, &dtype)).transpose()?;
    check_memory(c.memory_bytes(std::mem::size_of::<T>(), false), "this attention forward")?;
    let f = run(py, || forward_all(c, qs, ks, vs, initial.as_ref()))?;
    let out = PyDict::new(py);
    out.set_item("o", PyArray1::from_vec(py, f.o).reshape(c.dims(h, dv))?)?;
    out.set_item("lse", PyArray1::from_vec(py, f.lse).reshape([b, h, t])?)?;
    if c.method == Method::Hybrid {
        out.set_item("far_o", PyArray1::from_vec(py, f.far.0).reshape(c.dims(h, dv))?)?;
        out.set_item("far_lse", PyArray1::from_vec(py, f.far.1).reshape([b, h, t])?)?;
    } else if c.method != Method::Exact {
        let (ds, dk) = state_dims(c)?;
        out.set_item("den", PyArray1::from_vec(py, f.den).reshape([b, h, t])?)?;
        let kv = if c.causal() { [b, hkv, 0, 0] } else { ds };
        out.set_item("kv_state", PyArray1::from_vec(py, f.kv_state).reshape(kv)?)?;
        out.set_item("reference", PyArray1::from_vec(py, f.reference).reshape(dk)?)?;
        if c.method == Method::Poly {
            let per = f.block_states.len() / (b * hkv).max(1);
            out.set_item("block_states", PyArray1::from_vec(py, f.block_states).reshape([b, hkv, per])?)?;
        }
        if let (true, Some(st)) = (output_final_state, f.final_state) {
            out.set_item("final_s", PyArray1::from_vec(py, st.s).reshape(ds)?)?;
            out.set_item("final_key_sum", PyArray1::from_vec(py, st.key_sum).reshape(dk)?)?;
            out.set_item("final_reference", PyArray1::from_vec(py, st.reference).reshape(dk)?)?;
            out.set_item("final_count", st.count)?;
        }
    }
    Ok(out)
}

/// `_core.attention_forward(method, q, k, v, *, causal, scale, degree, center, chunk, window=None,
/// sinks=0, initial_state=None, output_final_state=False) -> dict`.
///
/// `q [B, T, H, D]`, `k [B, T, H_kv, D]`, `v [B, T, H_kv, D_v]`: C-contiguous numpy arrays of one
/// dtype (float32 or float64), `H` a multiple of `H_kv`, every size positive and every value
/// finite. `method` `"exact"` (MATH §2), `"poly"` (MATH §3–4) or `"altgrad"` (MATH §5; same
/// forward as poly); `scale` τ (`None`: `1/√D`); `degree` (even ≥ 2), `center` (row shift, MATH
/// §3) and `chunk` (≥ 1) are used by poly and altgrad only; `window` / `sinks` make exact causal
/// attention a sliding window with attention sinks (row `i` sees `j ≤ i` with `i − j < window`,
/// or `j < sinks`). `initial_state = (s, key_sum, reference, count)` continues a causal poly
/// sequence (rows are then positions `count..count+T`).
///
/// Returns `o [B, T, H, D_v]` and `lse [B, H, T]`; for poly and altgrad also `den [B, H, T]`,
/// `kv_state [B, H_kv, r, D_v + 1]` (non-causal `H' = Φ_Kᵀ [V 1]`, MATH §4; `[B, H_kv, 0, 0]`
/// causal) and `reference [B, H_kv, D]`; for poly `block_states [B, H_kv, (blocks − 1)·r·(D_v +
/// 1)]` (causal: `S'` at the start of every scan block after the first, blocks of 16 chunks, for a
/// backward that scans block by block; `[B, H_kv, 0]` otherwise, and optional in the `saved`
/// dict of `attention_backward`); with `output_final_state` (causal poly) `final_s`,
/// `final_key_sum`, `final_reference` and `final_count`: what `attention_backward` and the next
/// piece need.
///
/// Errors: `TypeError` for arrays that are not float32/float64 or not all of one dtype;
/// `ValueError` naming the argument for a bad method, shape, scale, degree, chunk, window, state,
/// a non-contiguous array or a NaN/Inf; `MemoryError` when the working memory would exceed the
/// free memory; `RuntimeError` for an internal error.
#[pyfunction]
#[pyo3(signature = (method, q, k, v, *, causal, scale, degree, center, chunk, window=None, sinks=0,
    initial_state=None, output_final_state=false))]
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
    window: Option<usize>,
    sinks: usize,
    initial_state: Option<&Bound<'py, PyAny>>,
    output_final_state: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let (qd, kd, vd) = (shape_of("q", q)?, shape_of("k", k)?, shape_of("v", v)?);
    let c = call_of(method, &qd, &kd, &vd, causal, scale, degree, center, chunk, window, sinks)?;
    let initial_state = initial_state.filter(|x| !x.is_none());
    if let Ok(q) = q.cast::<PyArrayDyn<f32>>() {
        forward_t::<f32>(py, &c, q, k, v, initial_state, output_final_state)
    } else if let Ok(q) = q.cast::<PyArrayDyn<f64>>() {
        forward_t::<f64>(py, &c, q, k, v, initial_state, output_final_state)
    } else {
        Err(PyTypeError::new_err("q: expected a float32 or float64 array"))
    }
}

/// The saved forward tensors of one call, as slices.
struct Saved<'a, T> {
    o: &'a [T],
    lse: &'a [T],
    far_o: &'a [T],
    far_lse: &'a [T],
    den: &'a [T],
    kv_state: &'a [T],
    reference: &'a [T],
    block_states: &'a [T],
}

/// Input gradients and, for a call with a state, the initial state's gradient.
type Back<T> = (altgrad::attention::AttnGrads<T>, Option<PolyStateGrad<T>>);

#[allow(clippy::too_many_arguments)]
fn backward_all<T: Scalar>(
    c: &Call,
    q: &[T],
    k: &[T],
    v: &[T],
    sv: &Saved<'_, T>,
    dout: &[T],
    initial: Option<PolyState<T>>,
    dfinal: Option<PolyStateGrad<T>>,
) -> altgrad::Result<Back<T>> {
    check_finite("grad_output", dout)?;
    check_finite("block_states", sv.block_states)?;
    let x = Qkv::new(q, k, v, &c.shape)?;
    let mut grads = altgrad::attention::AttnGrads::zeros(&c.shape);
    let ws = at::Workspace::new();
    let t0 = Instant::now();
    let dinit = match c.method {
        Method::Hybrid => {
            let h = c.hybrid_options();
            let saved = at::HybridSaved { o: sv.o, lse: sv.lse, far_o: sv.far_o, far_lse: sv.far_lse };
            at::backward_hybrid_into(&x, &c.opts, &h, saved, dout, grads.as_mut(), &ws)?;
            None
        }
        Method::Exact => {
            at::backward_exact_into(&x, &c.opts, sv.o, sv.lse, dout, grads.as_mut(), &ws)?;
            None
        }
        Method::Poly | Method::AltGrad => {
            let saved = PolySaved {
                kv_state: sv.kv_state.to_vec(),
                reference: sv.reference.to_vec(),
                opts: c.opts_at(initial.as_ref().map_or(0, |st| st.count)),
                initial,
                final_state: None,
                block_states: sv.block_states.to_vec(),
                shape: c.shape,
                popts: c.popts,
            };
            if c.method == Method::Poly {
                at::backward_poly_into(&x, &saved, sv.o, sv.den, dout, dfinal.as_ref(), grads.as_mut(), &ws)?
            } else {
                at::backward_altgrad_into(&x, &saved, sv.o, sv.den, dout, grads.as_mut(), &ws)?;
                None
            }
        }
    };
    record_kernel(t0.elapsed().as_secs_f64());
    check_results(c, &[("gradient dq", &grads.dq), ("gradient dk", &grads.dk), ("gradient dv", &grads.dv)])?;
    Ok((grads, dinit))
}

/// `grad_final_state = (ds, dkey_sum)`, either `None` (zero), as a [`PolyStateGrad`]; `None` when
/// both are.
fn state_grad_of<T: Scalar + Element>(
    c: &Call,
    g: &Bound<'_, PyAny>,
    dtype: &str,
) -> PyResult<Option<PolyStateGrad<T>>> {
    check_stateful(c, "grad_final_state")?;
    let g = g
        .cast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err("grad_final_state: expected a tuple (ds, dkey_sum), items may be None"))?;
    if g.len() != 2 {
        return Err(PyValueError::new_err(format!(
            "grad_final_state: expected 2 items (ds, dkey_sum), got {}",
            g.len()
        )));
    }
    let (ds, dk) = state_dims(c)?;
    let (a, b) = (g.get_item(0)?, g.get_item(1)?);
    if a.is_none() && b.is_none() {
        return Ok(None);
    }
    let read = |name: &str, x: &Bound<'_, PyAny>, want: &[usize]| -> PyResult<Vec<T>> {
        if x.is_none() {
            Ok(vec![T::zero(); want.iter().product()])
        } else {
            owned(name, x, want, dtype)
        }
    };
    Ok(Some(PolyStateGrad {
        ds: read("grad_final_state.ds", &a, &ds)?,
        dkey_sum: read("grad_final_state.dkey_sum", &b, &dk)?,
    }))
}

type Grads<'py> =
    (Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>, Option<Bound<'py, PyAny>>, Option<Bound<'py, PyAny>>);

#[allow(clippy::too_many_arguments)]
fn backward_t<'py, T: Scalar + Element>(
    py: Python<'py>,
    c: &Call,
    q: &Bound<'py, PyArrayDyn<T>>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    saved: &Bound<'py, PyDict>,
    dout: &Bound<'py, PyAny>,
    initial: Option<&Bound<'py, PyAny>>,
    grad_final: Option<&Bound<'py, PyAny>>,
) -> PyResult<Grads<'py>> {
    let dtype = T::DTYPE.to_lowercase().replace('f', "float");
    let (k, v, g) =
        (typed::<T>("k", k, &dtype)?, typed::<T>("v", v, &dtype)?, typed::<T>("grad_output", dout, &dtype)?);
    let get = |name: &str| -> PyResult<Bound<'py, PyArrayDyn<T>>> {
        match saved.get_item(name)? {
            Some(x) => typed::<T>(name, &x, &dtype),
            None => Err(PyValueError::new_err(format!("saved: missing `{name}` (pass attention_forward's dict)"))),
        }
    };
    let s = c.shape;
    let (b, t, h, hkv, d, dv) = (s.batch, s.seq_len, s.num_heads, s.num_kv_heads, s.head_dim, s.head_dim_v);
    let hybrid = c.method == Method::Hybrid;
    let exact = c.method == Method::Exact;
    let poly = !exact && !hybrid;
    let o = get("o")?;
    let lse = if exact || hybrid { Some(get("lse")?) } else { None };
    let (fo, fl) = if hybrid { (Some(get("far_o")?), Some(get("far_lse")?)) } else { (None, None) };
    let (den, kvs, rf) =
        if poly { (Some(get("den")?), Some(get("kv_state")?), Some(get("reference")?)) } else { (None, None, None) };
    let (qr, kr, vr, gr) = (borrow("q", q)?, borrow("k", &k)?, borrow("v", &v)?, borrow("grad_output", &g)?);
    let or = borrow("o", &o)?;
    let for_ = fo.as_ref().map(|x| borrow("far_o", x)).transpose()?;
    let flr = fl.as_ref().map(|x| borrow("far_lse", x)).transpose()?;
    let lr = lse.as_ref().map(|x| borrow("lse", x)).transpose()?;
    let dr = den.as_ref().map(|x| borrow("den", x)).transpose()?;
    let kr2 = kvs.as_ref().map(|x| borrow("kv_state", x)).transpose()?;
    let rr = rf.as_ref().map(|x| borrow("reference", x)).transpose()?;
    // causal poly's block states: optional, and an empty array is none (the backward then scans
    // the whole sequence)
    let bs = match saved.get_item("block_states")? {
        Some(x) if c.block_states_len() > 0 => Some(typed::<T>("block_states", &x, &dtype)?).filter(|a| a.len() > 0),
        _ => None,
    };
    let bsr = bs.as_ref().map(|x| borrow("block_states", x)).transpose()?;
    let (qs, ks, vs) =
        (data("q", &qr, b * t * h * d)?, data("k", &kr, b * t * hkv * d)?, data("v", &vr, b * t * hkv * dv)?);
    let gs = data("grad_output", &gr, b * t * h * dv)?;
    let empty: &[T] = &[];
    let sv = Saved {
        o: data("o", &or, b * t * h * dv)?,
        lse: match &lr {
            Some(x) => data("lse", x, b * h * t)?,
            None => empty,
        },
        far_o: match &for_ {
            Some(x) => data("far_o", x, b * t * h * dv)?,
            None => empty,
        },
        far_lse: match &flr {
            Some(x) => data("far_lse", x, b * h * t)?,
            None => empty,
        },
        den: match &dr {
            Some(x) => data("den", x, b * h * t)?,
            None => empty,
        },
        kv_state: match &kr2 {
            Some(x) => data("kv_state", x, if c.causal() { 0 } else { c.state_len() })?,
            None => empty,
        },
        reference: match &rr {
            Some(x) => data("reference", x, b * hkv * d)?,
            None => empty,
        },
        block_states: match &bsr {
            Some(x) => data("block_states", x, c.block_states_len())?,
            None => empty,
        },
    };
    let initial = initial.map(|st| state_of::<T>(c, st, &dtype)).transpose()?;
    let dfinal = match grad_final {
        Some(g) => state_grad_of::<T>(c, g, &dtype)?,
        None => None,
    };
    check_memory(c.memory_bytes(std::mem::size_of::<T>(), true), "this attention backward")?;
    let (grads, dinit) = run(py, || backward_all(c, qs, ks, vs, &sv, gs, initial, dfinal))?;
    let (ds, dk) = if poly { state_dims(c)? } else { ([0; 4], [0; 3]) };
    let (dinit_s, dinit_k) = match dinit {
        Some(g) => (
            Some(PyArray1::from_vec(py, g.ds).reshape(ds)?.into_any()),
            Some(PyArray1::from_vec(py, g.dkey_sum).reshape(dk)?.into_any()),
        ),
        None => (None, None),
    };
    Ok((
        PyArray1::from_vec(py, grads.dq).reshape(c.dims(h, d))?.into_any(),
        PyArray1::from_vec(py, grads.dk).reshape(c.dims(hkv, d))?.into_any(),
        PyArray1::from_vec(py, grads.dv).reshape(c.dims(hkv, dv))?.into_any(),
        dinit_s,
        dinit_k,
    ))
}

/// `_core.attention_backward(method, q, k, v, saved, grad_output, *, causal, scale, degree,
/// center, chunk, window=None, sinks=0, initial_state=None, grad_final_state=None) -> (dq, dk, dv,
/// d_initial_s, d_initial_key_sum)`.
///
/// `saved` is the dict `attention_forward` returned for the same inputs, options and
/// `initial_state` (its causal poly `block_states` may be left out or empty: the backward then
/// scans the whole sequence instead of block by block, with the same result, more slowly at long
/// `T`; like `den`, they are trusted to be that forward's); `grad_output = dL/do [B, T, H, D_v]`
/// (finite); `grad_final_state = (ds, dkey_sum)` is `dL/d(final state)` (fla's `dht`; either may be `None` for zero). Exact: FA2's
/// backward (MATH §2). Poly: the exact gradient of the polynomial forward, through the row shift
/// and the state (MATH §4). ALTGrad: the paper's Algorithm 1 (MATH §5) — the softmax-gradient
/// formula with the low-rank `f̃`, not the gradient of any function. Returns `dq [B, T, H, D]`,
/// `dk [B, T, H_kv, D]`, `dv [B, T, H_kv, D_v]` (GQA groups summed), of the input dtype, and with
/// an initial state its gradient `ds [B, H_kv, r, D_v+1]`, `dkey_sum [B, H_kv, D]` (else `None`).
///
/// Errors: as `attention_forward`, plus `ValueError` for a missing or mis-sized saved array.
#[pyfunction]
#[pyo3(signature = (method, q, k, v, saved, grad_output, *, causal, scale, degree, center, chunk, window=None,
    sinks=0, initial_state=None, grad_final_state=None))]
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
    window: Option<usize>,
    sinks: usize,
    initial_state: Option<&Bound<'py, PyAny>>,
    grad_final_state: Option<&Bound<'py, PyAny>>,
) -> PyResult<Grads<'py>> {
    let (qd, kd, vd) = (shape_of("q", q)?, shape_of("k", k)?, shape_of("v", v)?);
    let c = call_of(method, &qd, &kd, &vd, causal, scale, degree, center, chunk, window, sinks)?;
    let gshape = shape_of("grad_output", grad_output)?;
    let s = &c.shape;
    let want = c.dims(s.num_heads, s.head_dim_v);
    if gshape != want {
        return Err(PyValueError::new_err(format!(
            "grad_output: shape {gshape:?}, expected [B, T, H, D_v] = {want:?}"
        )));
    }
    let initial_state = initial_state.filter(|x| !x.is_none());
    let grad_final_state = grad_final_state.filter(|x| !x.is_none());
    if let Ok(q) = q.cast::<PyArrayDyn<f32>>() {
        backward_t::<f32>(py, &c, q, k, v, saved, grad_output, initial_state, grad_final_state)
    } else if let Ok(q) = q.cast::<PyArrayDyn<f64>>() {
        backward_t::<f64>(py, &c, q, k, v, saved, grad_output, initial_state, grad_final_state)
    } else {
        Err(PyTypeError::new_err("q: expected a float32 or float64 array"))
    }
}
