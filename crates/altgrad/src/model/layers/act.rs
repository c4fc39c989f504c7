//! Activations with hand-written backward (MATH §6): SwiGLU (the Llama MLP's gated unit) and
//! GELU in its exact erf form (BERT's MLP), elementwise, in parallel above [`PAR_MIN_ELEMS`].

use super::{PAR_BLOCK_ELEMS, PAR_MIN_ELEMS};
use crate::linalg::{as_f32, as_f32_mut, Scalar};
use crate::simd::{dispatch, elementwise, Level};
use rayon::prelude::*;

/// `s[j] = sigmoid(x[j])` for a block: `e = exp(−|x|)` by the vectorized [`Scalar::exp_inplace`],
/// then `1/(1 + e)` for `x ≥ 0` and `e/(1 + e)` below (no overflow), branch-free.
fn sigmoid_into<T: Scalar>(x: &[T], s: &mut [T]) {
    for (sj, &xj) in s.iter_mut().zip(x) {
        *sj = -xj.abs();
    }
    T::exp_inplace(s);
    dispatch(
        #[inline(always)]
        || {
            for (sj, &xj) in s.iter_mut().zip(x) {
                let e = *sj;
                let r = T::one() / (T::one() + e);
                *sj = if xj >= T::zero() { r } else { e * r };
            }
        },
    );
}

/// SwiGLU activation (Shazeer 2020, "GLU Variants"; the Llama MLP): `h = silu(gate) ⊙ up` with
/// `silu(x) = x · sigmoid(x)`, elementwise; stable for large `|gate|` (no overflow, no NaN).
///
/// Shapes: `gate, up [rows, inter]` (any equal lengths); returns `h` of the same shape.
pub fn swiglu_forward<T: Scalar>(gate: &[T], up: &[T]) -> Vec<T> {
    assert_eq!(gate.len(), up.len(), "swiglu_forward: gate and up must have the same shape");
    let mut h = vec![T::zero(); gate.len()];
    let block = |(hb, (gb, ub)): (&mut [T], (&[T], &[T]))| {
        // f32: one fused SIMD pass
        if let (Some(g), Some(u), Some(o)) = (as_f32(gb), as_f32(ub), as_f32_mut(hb)) {
            if elementwise::swiglu_forward(Level::detect(), g, u, o) {
                return;
            }
        }
        // hb holds sigmoid(g) first, then h
        sigmoid_into(gb, hb);
        dispatch(
            #[inline(always)]
            || {
                for (hj, (&g, &u)) in hb.iter_mut().zip(gb.iter().zip(ub)) {
                    *hj = g * *hj * u;
                }
            },
        );
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
        // f32: one fused SIMD pass
        if let (Some(g), Some(u), Some(d)) = (as_f32(gb), as_f32(ub), as_f32(hb)) {
            if let (Some(dg), Some(du)) = (as_f32_mut(dgb), as_f32_mut(dub)) {
                if elementwise::swiglu_backward(Level::detect(), g, u, d, dg, du) {
                    return;
                }
            }
        }
        // dgb holds sigmoid(g) first
        sigmoid_into(gb, dgb);
        dispatch(
            #[inline(always)]
            || {
                for ((dg, du), (&g, (&u, &d))) in
                    dgb.iter_mut().zip(dub.iter_mut()).zip(gb.iter().zip(ub.iter().zip(hb)))
                {
                    let s = *dg;
                    *du = d * g * s;
                    *dg = d * u * s * (T::one() + g * (T::one() - s));
                }
            },
        );
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

/// GELU, exact erf form (Hendrycks & Gimpel 2016; torch `F.gelu`, HF `hidden_act: "gelu"`):
/// `gelu(x) = x · Φ(x) = 0.5 · x · (1 + erf(x/√2))`, evaluated as `0.5 · x · erfc(−x/√2)`
/// (same function, no cancellation for negative `x`) with `libm::erfc`.
#[inline]
pub fn gelu(x: f64) -> f64 {
    0.5 * x * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
}

/// Derivative of [`gelu`]: `Φ(x) + x · φ(x)` with `φ(x) = exp(−x²/2)/√(2π)`.
#[inline]
pub fn gelu_derivative(x: f64) -> f64 {
    const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
    0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2) + x * (-0.5 * x * x).exp() * INV_SQRT_2PI
}

/// Applies `f(x, aux)` elementwise into a new vector, in parallel above 2¹⁵ elements.
fn map2<T: Scalar>(x: &[T], aux: &[T], f: impl Fn(f64, f64) -> f64 + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let block = |(ob, (xb, ab)): (&mut [T], (&[T], &[T]))| {
        for ((o, &xv), &av) in ob.iter_mut().zip(xb).zip(ab) {
            *o = T::from_f64(f(xv.as_f64(), av.as_f64()));
        }
    };
    if x.len() > PAR_MIN_ELEMS {
        let b = PAR_BLOCK_ELEMS;
        out.par_chunks_mut(b).zip(x.par_chunks(b).zip(aux.par_chunks(b))).for_each(block);
    } else {
        block((&mut out[..], (x, aux)));
    }
    out
}

/// [`gelu`] of every element (any shape), computed in f64 and rounded to `T`.
pub fn gelu_forward<T: Scalar>(x: &[T]) -> Vec<T> {
    map2(x, x, |v, _| gelu(v))
}

/// Backward of [`gelu_forward`]: `dx = dy ⊙ gelu′(x)` (same shape as `x`).
pub fn gelu_backward<T: Scalar>(x: &[T], dy: &[T]) -> Vec<T> {
    assert_eq!(x.len(), dy.len(), "gelu_backward: dy must have the shape of x");
    map2(x, dy, |v, d| d * gelu_derivative(v))
}
