//! The `altgrad attn` file format: `q [b,n,h,d]`, `k [b,n,h_kv,d]`, `v [b,n,h_kv,d_v]` and an
//! optional `do [b,n,h,d_v]` in one safetensors file (all of one dtype: F32, F64, F16 or
//! BF16), validated by [`attn_input`]; [`run_attn`] computes `o` (and `dq`, `dk`, `dv` when `do`
//! is given) with one method for every head ([`run_attn_hybrid`]: hybrid attention) and checks
//! that every output is finite.

use super::TensorF64;
use crate::attention::dispatch::{backward_layer, forward_layer};
use crate::attention::{
    backward_hybrid, forward_hybrid, AttnGrads, AttnOptions, AttnShape, HeadPlan, HybridOptions, PolyOptions, Qkv,
};
use crate::error::check_finite_result;
use crate::linalg::Scalar;
use crate::{Error, Result};

/// The validated inputs of one `attn` call.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnInput {
    /// Batch size `b` (≥ 1).
    pub batch: usize,
    /// Shape of the call, batch included (`shape.batch == batch`).
    pub shape: AttnShape,
    /// The dtype shared by every input tensor (`"F32"`, `"F64"`, `"F16"`, `"BF16"`); the
    /// outputs are written in it.
    pub dtype: String,
    /// `q`, row-major `[b, n, h, d]`.
    pub q: Vec<f64>,
    /// `k`, row-major `[b, n, h_kv, d]`.
    pub k: Vec<f64>,
    /// `v`, row-major `[b, n, h_kv, d_v]`.
    pub v: Vec<f64>,
    /// `do` (the gradient of the loss with respect to `o`), row-major `[b, n, h, d_v]`.
    pub dout: Option<Vec<f64>>,
}

/// Validates the tensors of an `attn` input file named `source`: `q`, `k`, `v` present, every
/// input 4-D, of one dtype and finite, the shapes consistent (`h` a multiple of `h_kv`, every
/// size ≥ 1). Other tensors are ignored.
///
/// Errors: `BadInput` naming `source` and the tensor at fault.
pub fn attn_input(mut tensors: Vec<TensorF64>, source: &str) -> Result<AttnInput> {
    let mut take = |name: &str| tensors.iter().position(|t| t.name == name).map(|i| tensors.swap_remove(i));
    let need =
        |t: Option<TensorF64>, name: &str| t.ok_or_else(|| Error::bad(source, format!("missing tensor `{name}`")));
    let (q, k, v) = (need(take("q"), "q")?, need(take("k"), "k")?, need(take("v"), "v")?);
    let dout = take("do");
    for t in [Some(&q), Some(&k), Some(&v), dout.as_ref()].into_iter().flatten() {
        if t.shape.len() != 4 {
            return Err(Error::bad(
                source,
                format!("tensor `{}` must be 4-D [b, n, heads, dim], got {:?}", t.name, t.shape),
            ));
        }
        if t.dtype != q.dtype {
            return Err(Error::bad(
                source,
                format!("tensor `{}` is {} but `q` is {}: give every input in one dtype", t.name, t.dtype, q.dtype),
            ));
        }
        if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
            return Err(Error::bad(
                source,
                format!("tensor `{}` has a non-finite value {} at index {i}", t.name, t.data[i]),
            ));
        }
    }
    let (b, n, h, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (hkv, dv) = (k.shape[2], v.shape[3]);
    if b == 0 {
        return Err(Error::bad(
            source,
            format!("tensor `q` has batch size 0 (shape {:?}); nothing to compute", q.shape),
        ));
    }
    if k.shape != [b, n, hkv, d] {
        return Err(Error::bad(source, format!("k has shape {:?}, expected [{b}, {n}, h_kv, {d}]", k.shape)));
    }
    if v.shape[..3] != [b, n, hkv] {
        return Err(Error::bad(source, format!("v has shape {:?}, expected [{b}, {n}, {hkv}, d_v]", v.shape)));
    }
    if let Some(g) = &dout {
        if g.shape != [b, n, h, dv] {
            return Err(Error::bad(source, format!("do has shape {:?}, expected [{b}, {n}, {h}, {dv}]", g.shape)));
        }
    }
    let shape = AttnShape::new(n, h, hkv, d).with_head_dim_v(dv).with_batch(b);
    shape.validate().map_err(|e| Error::bad(source, e.to_string()))?;
    Ok(AttnInput { batch: b, shape, dtype: q.dtype, q: q.data, k: k.data, v: v.data, dout: dout.map(|t| t.data) })
}

/// One named output of [`run_attn`]: name, shape, row-major values.
pub type NamedOutput<T> = (String, Vec<usize>, Vec<T>);

/// Largest polynomial state (values) `attn` accepts per head: `r·(d_v+1)` for the state
/// `Φ_Kᵀ [V 1]` and `C·r` for a chunk's features, `2²⁵` ≈ 33.5 million values (256 MiB in
/// f64), checked before anything is allocated.
pub const MAX_POLY_STATE: usize = 1 << 25;

/// Checks the per-head state sizes of polynomial options `p` (`None`: exact) on `shape` against
/// [`MAX_POLY_STATE`].
fn check_poly_state(p: Option<&PolyOptions>, shape: &AttnShape) -> Result<()> {
    let Some(p) = p else { return Ok(()) };
    let d = shape.head_dim;
    let r = crate::attention::features::feature_dim(d, p.degree);
    let state = r.and_then(|r| r.checked_mul(shape.head_dim_v.checked_add(1)?));
    let chunk = r.and_then(|r| r.checked_mul(p.chunk));
    match (r, state, chunk) {
        (Some(_), Some(s), Some(c)) if s <= MAX_POLY_STATE && c <= MAX_POLY_STATE => Ok(()),
        _ => Err(Error::bad(
            "--degree",
            format!(
                "degree {} at head_dim {d} has feature width r = C(d+g, g) = {}: the state r·(d_v+1) (d_v = {}) or \
                 the chunk's C·r (C = {}) exceeds the limit of {MAX_POLY_STATE} values; use a lower --degree, a \
                 smaller --chunk or exact attention",
                p.degree,
                r.map_or_else(|| "more than 2^64".to_string(), |r| r.to_string()),
                shape.head_dim_v,
                p.chunk
            ),
        )),
    }
}

/// What to suggest when a result of a method of degree `degree` (`None`: exact) in `T` is not
/// finite.
fn overflow_advice<T: Scalar>(degree: Option<usize>) -> String {
    let wider = if T::DTYPE == "F64" { "" } else { "float64 inputs, or " };
    match degree {
        Some(g) if g > 2 => format!("use {wider}a lower --degree than {g} (scores near the bound overflow T_{g})"),
        Some(_) => format!("use {wider}smaller scores (a smaller --scale)"),
        None => format!("use {wider}a smaller --scale (|τ q·k| overflows {})", T::DTYPE),
    }
}

/// Runs attention on `input` in precision `T` with `plan` for every head: returns the named
/// outputs `o [b,n,h,d_v]` and, when `do` is given, `dq`, `dk`, `dv`.
///
/// Errors: those of the attention kernels (e.g. a feature width above the limit), and
/// `BadInput` naming the output (`attention output o`, `gradient dq`, …) when finite inputs
/// gave a non-finite result (the intermediates overflowed `T`), with what to change.
pub fn run_attn<T: Scalar>(input: &AttnInput, plan: &HeadPlan, opts: &AttnOptions) -> Result<Vec<NamedOutput<T>>> {
    check_poly_state(plan.options(), &input.shape)?;
    let plans = vec![*plan; input.shape.num_heads];
    run_with(input, opts, plan.method_name(), plan.degree(), |q, k, v, g| {
        let s = &input.shape;
        let fwd = forward_layer(q, k, v, s, opts, &plans)?;
        let grads = g.map(|g| backward_layer(q, k, v, &fwd, g, s, opts, &plans)).transpose()?;
        Ok((fwd.o, grads))
    })
}

/// [`run_attn`] with hybrid attention (MATH §4.1) for every head: `opts.mask` must be causal.
///
/// Errors: as [`run_attn`] and [`crate::attention::forward_hybrid`].
pub fn run_attn_hybrid<T: Scalar>(
    input: &AttnInput,
    hopts: &HybridOptions,
    opts: &AttnOptions,
) -> Result<Vec<NamedOutput<T>>> {
    if hopts.far_rows(input.shape.seq_len) > 0 {
        check_poly_state(Some(&hopts.poly), &input.shape)?;
    }
    run_with(input, opts, "hybrid", Some(hopts.poly.degree), |q, k, v, g| {
        let x = Qkv::new(q, k, v, &input.shape)?;
        let fwd = forward_hybrid(&x, opts, hopts)?;
        let grads = g.map(|g| backward_hybrid(&x, &fwd, g)).transpose()?;
        Ok((fwd.o, grads))
    })
}

/// Gradients of `q`, `k`, `v`, when `do` is given.
type MaybeGrads<T> = Option<AttnGrads<T>>;

/// Converts `input` to `T`, runs `f(q, k, v, do)` (the output `o` and, with `do`, the gradients)
/// and checks every result is finite; `name` and `degree` describe the method in messages.
fn run_with<T: Scalar>(
    input: &AttnInput,
    opts: &AttnOptions,
    name: &str,
    degree: Option<usize>,
    f: impl FnOnce(&[T], &[T], &[T], Option<&[T]>) -> Result<(Vec<T>, MaybeGrads<T>)>,
) -> Result<Vec<NamedOutput<T>>> {
    if !(opts.scale.is_finite() && opts.scale > 0.0) {
        return Err(Error::bad("--scale", format!("must be finite and positive, got {}", opts.scale)));
    }
    let s = &input.shape;
    let conv = |x: &[f64]| -> Vec<T> { x.iter().map(|&v| T::from_f64(v)).collect() };
    let (q, k, v) = (conv(&input.q), conv(&input.k), conv(&input.v));
    for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
        check_finite_result(&format!("input {name} converted to {}", T::DTYPE), t, "give float64 inputs")?;
    }
    let g = input.dout.as_deref().map(conv);
    let (b, n, h, hkv, d, dv) = (input.batch, s.seq_len, s.num_heads, s.num_kv_heads, s.head_dim, s.head_dim_v);
    let advice = overflow_advice::<T>(degree);
    let stage = |what: &str| format!("{what} ({name} attention, {})", T::DTYPE);
    // the whole batch in one call: the (sequence, head) pairs run in parallel
    let (o, grads) = f(&q, &k, &v, g.as_deref())?;
    check_finite_result(&stage("attention output o"), &o, &advice)?;
    let mut out = vec![("o".to_string(), vec![b, n, h, dv], o)];
    if let Some(gr) = grads {
        for (name, t) in [("gradient dq", &gr.dq), ("gradient dk", &gr.dk), ("gradient dv", &gr.dv)] {
            check_finite_result(&stage(name), t, &advice)?;
        }
        out.push(("dq".into(), vec![b, n, h, d], gr.dq));
        out.push(("dk".into(), vec![b, n, hkv, d], gr.dk));
        out.push(("dv".into(), vec![b, n, hkv, dv], gr.dv));
    }
    Ok(out)
}
