//! `poly_split`: non-causal polynomial attention cut into its key side and its query side
//! (MATH §4 "Split across pieces"; [`altgrad::attention::poly_split`]), for `altgrad.distributed`'s
//! non-causal calls: each process computes its keys' state, the states are all-reduced, each
//! process runs its queries against the sum. Same layouts and input checks as [`crate::attn`];
//! outputs are checked where no collective follows (`o`, `den`, `dk`, `dv`) and the summed key
//! state where every rank reads it (docs/RELIABILITY.md).

use crate::attn::{
    borrow, call_of, check_finite, check_results, data, owned, owned_unchecked, state_dims, typed, Call,
};
use crate::runtime::{check_memory, record_kernel, run, to_py_err};
use altgrad::attention::{self as at, Qkv};
use altgrad::linalg::Scalar;
use numpy::{Element, PyArray1, PyArrayDyn, PyArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::time::Instant;

/// The optional arrays of one `poly_split` call.
struct Extra<'a, 'py> {
    reference: Option<&'a Bound<'py, PyAny>>,
    state: Option<&'a Bound<'py, PyAny>>,
    kbar: Option<&'a Bound<'py, PyAny>>,
    o: Option<&'a Bound<'py, PyAny>>,
    den: Option<&'a Bound<'py, PyAny>>,
    grad: Option<&'a Bound<'py, PyAny>>,
}

/// `x` (named `name`), required by `part`.
fn need<'a, 'py>(x: Option<&'a Bound<'py, PyAny>>, name: &str, part: &str) -> PyResult<&'a Bound<'py, PyAny>> {
    x.ok_or_else(|| PyValueError::new_err(format!("{name}: required by part {part:?}")))
}

fn split_t<'py, T: Scalar + Element>(
    py: Python<'py>,
    part: &str,
    c: &Call,
    q: &Bound<'py, PyArrayDyn<T>>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    x: &Extra<'_, 'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    let dtype = T::DTYPE.to_lowercase().replace('f', "float");
    let (k, v) = (typed::<T>("k", k, &dtype)?, typed::<T>("v", v, &dtype)?);
    let (qr, kr, vr) = (borrow("q", q)?, borrow("k", &k)?, borrow("v", &v)?);
    let s = c.shape;
    let (b, t, h, hkv, d, dv) = (s.batch, s.seq_len, s.num_heads, s.num_kv_heads, s.head_dim, s.head_dim_v);
    let (qs, ks, vs) =
        (data("q", &qr, b * t * h * d)?, data("k", &kr, b * t * hkv * d)?, data("v", &vr, b * t * hkv * dv)?);
    let (sd, kd) = state_dims(c)?;
    let reference = match x.reference.filter(|r| !r.is_none()) {
        Some(r) => Some(owned::<T>("reference", r, &kd, &dtype)?),
        None => None,
    };
    check_memory(c.memory_bytes(std::mem::size_of::<T>(), part.ends_with("backward")), "this attention call")?;
    let (opts, popts) = (c.opts, c.popts);
    let t0 = Instant::now();
    let out = match part {
        "key_state" => {
            let st = run(py, || {
                check_finite("k", ks)?;
                check_finite("v", vs)?;
                // not checked here: it is all-reduced next, and every rank's "queries" checks the
                // sum (its `state`), so all ranks raise together instead of one leaving the others
                // waiting in the collective
                at::poly_key_state(&Qkv::new(qs, ks, vs, &s)?, &opts, &popts, reference.as_deref())
            })?;
            PyTuple::new(py, [PyArray1::from_vec(py, st).reshape(sd)?.into_any()])?
        }
        "key_state_backward" => {
            let ds = owned::<T>("grad", need(x.grad, "grad", part)?, &sd, &dtype)?;
            let (dk, dvv) = run(py, || {
                let x = Qkv::new(qs, ks, vs, &s)?;
                let (dk, dv) = at::poly_key_state_backward(&x, &opts, &popts, reference.as_deref(), &ds)?;
                check_results(c, &[("gradient dk", &dk), ("gradient dv", &dv)])?;
                Ok((dk, dv))
            })?;
            PyTuple::new(
                py,
                [
                    PyArray1::from_vec(py, dk).reshape([b, t, hkv, d])?.into_any(),
                    PyArray1::from_vec(py, dvv).reshape([b, t, hkv, dv])?.into_any(),
                ],
            )?
        }
        "queries" => {
            // the state is the sum of every rank's key state: a non-finite value there is an
            // overflow of the keys' features (reported with the advice of any overflow), which
            // every rank sees alike, so all raise together
            let st = owned_unchecked::<T>("state", need(x.state, "state", part)?, &sd, &dtype)?;
            check_results(c, &[("key state H' (the sum over the ranks)", &st)]).map_err(to_py_err)?;
            let kb = owned::<T>("kbar", need(x.kbar, "kbar", part)?, &kd, &dtype)?;
            let (o, den) = run(py, || {
                check_finite("q", qs)?;
                let (o, den) = at::poly_queries(&Qkv::new(qs, ks, vs, &s)?, &opts, &popts, &st, &kb)?;
                check_results(c, &[("attention output o", &o), ("denominator den", &den)])?;
                Ok((o, den))
            })?;
            PyTuple::new(
                py,
                [
                    PyArray1::from_vec(py, o).reshape([b, t, h, dv])?.into_any(),
                    PyArray1::from_vec(py, den).reshape([b, h, t])?.into_any(),
                ],
            )?
        }
        "queries_backward" => {
            let st = owned::<T>("state", need(x.state, "state", part)?, &sd, &dtype)?;
            let kb = owned::<T>("kbar", need(x.kbar, "kbar", part)?, &kd, &dtype)?;
            let o = owned::<T>("o", need(x.o, "o", part)?, &[b, t, h, dv], &dtype)?;
            let den = owned::<T>("den", need(x.den, "den", part)?, &[b, h, t], &dtype)?;
            let g = owned::<T>("grad", need(x.grad, "grad", part)?, &[b, t, h, dv], &dtype)?;
            let r = run(py, || {
                // not checked here, unlike "queries": ds is all-reduced next (every rank's
                // "key_state_backward" checks the sum, its `grad`), and one rank raising here would
                // leave the others waiting in that collective; so dq and dkbar are not checked
                at::poly_queries_backward(&Qkv::new(qs, ks, vs, &s)?, &opts, &popts, &st, &kb, &o, &den, &g)
            })?;
            PyTuple::new(
                py,
                [
                    PyArray1::from_vec(py, r.dq).reshape([b, t, h, d])?.into_any(),
                    PyArray1::from_vec(py, r.ds).reshape(sd)?.into_any(),
                    PyArray1::from_vec(py, r.dkbar).reshape(kd)?.into_any(),
                ],
            )?
        }
        _ => {
            return Err(PyValueError::new_err(format!(
            "part: expected \"key_state\", \"key_state_backward\", \"queries\" or \"queries_backward\", got {part:?}"
        )))
        }
    };
    record_kernel(t0.elapsed().as_secs_f64());
    Ok(out)
}

/// `_core.poly_split(part, q, k, v, *, scale, degree, center, chunk, reference=None, state=None,
/// kbar=None, o=None, den=None, grad=None) -> tuple`: one side of non-causal polynomial attention
/// over a piece of a sequence (MATH §4 "Split across pieces"). Arrays as in `attention_forward`
/// (`q [B, T, H, D]`, `k [B, T, H_kv, D]`, `v [B, T, H_kv, D_v]`, one dtype, C-contiguous);
/// `reference [B, H_kv, D]` (the shared reference point; required with `center`, else `None`),
/// `state [B, H_kv, r, D_v + 1]`, `kbar [B, H_kv, D]` (the whole sequence's key mean minus the
/// reference point).
///
/// - `"key_state"` → `(s,)`: this piece's `H'_p` (reads `k`, `v`);
/// - `"key_state_backward"` with `grad = dL/dH'` (summed over all pieces) → `(dk, dv)`;
/// - `"queries"` with `state` (`Σ_p H'_p`) and `kbar` → `(o [B, T, H, D_v], den [B, H, T])`;
/// - `"queries_backward"` with `state`, `kbar`, `o`, `den` and `grad = dL/do` →
///   `(dq, ds [B, H_kv, r, D_v + 1], dkbar [B, H_kv, D])`: this piece's shares.
///
/// Errors: `TypeError` for arrays of the wrong dtype; `ValueError` naming the argument for a bad
/// `part`, shape, option, a missing array, a non-contiguous array or a NaN/Inf; `MemoryError`;
/// `RuntimeError` for an internal error.
#[pyfunction]
#[pyo3(signature = (part, q, k, v, *, scale, degree, center, chunk, reference=None, state=None, kbar=None,
    o=None, den=None, grad=None))]
#[allow(clippy::too_many_arguments)]
pub fn poly_split<'py>(
    py: Python<'py>,
    part: &str,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    scale: Option<f64>,
    degree: usize,
    center: bool,
    chunk: usize,
    reference: Option<&Bound<'py, PyAny>>,
    state: Option<&Bound<'py, PyAny>>,
    kbar: Option<&Bound<'py, PyAny>>,
    o: Option<&Bound<'py, PyAny>>,
    den: Option<&Bound<'py, PyAny>>,
    grad: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let (qd, kd, vd) = (crate::attn::shape_of("q", q)?, crate::attn::shape_of("k", k)?, crate::attn::shape_of("v", v)?);
    let c = call_of("poly", &qd, &kd, &vd, false, scale, degree, center, chunk, None, 0)?;
    let x = Extra { reference, state, kbar, o, den, grad };
    if let Ok(q) = q.cast::<PyArrayDyn<f32>>() {
        split_t::<f32>(py, part, &c, q, k, v, &x)
    } else if let Ok(q) = q.cast::<PyArrayDyn<f64>>() {
        split_t::<f64>(py, part, &c, q, k, v, &x)
    } else {
        Err(PyTypeError::new_err("q: expected a float32 or float64 array"))
    }
}
