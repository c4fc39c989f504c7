//! Vectorizable elementary functions for the attention kernels' hot loops.
//!
//! `exp` for f32 in the Cephes form (range reduction by ln 2, degree-6 minimax polynomial,
//! exponent by bit assembly), written so the compiler vectorizes it; dispatched at run time to
//! an AVX-512F or AVX2+FMA build where the CPU has it, so the binary still runs on any x86-64.
//! The softmax tile's row passes (maximum; shift, exp and sum) come fused in one call each.

use crate::simd::dispatch;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const ROUND_MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting rounds to nearest

#[inline(always)]
fn exp1(x: f32) -> f32 {
    // Below this the result underflows: return exactly 0 (covers −∞ from masks).
    let zero = x < -87.33;
    let x = x.clamp(-87.33, 88.72);
    let n = (x * LOG2E + ROUND_MAGIC) - ROUND_MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r2 + r + 1.0;
    // 2^n by building the exponent bits; n ∈ [-126, 128]. Split to avoid overflow at 128.
    let ni = n as i32;
    let half = ni >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((ni - half + 127) as u32) << 23);
    let v = y * s1 * s2;
    if zero {
        0.0
    } else {
        v
    }
}

#[inline(always)]
fn exp_generic(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp1(*x);
    }
}

/// Lanes of the sums in [`exp_shift_sum_generic`]: independent accumulators, so the sum
/// vectorizes (16 f32 = one AVX-512 register, two AVX2 registers).
const LANES: usize = 16;

/// `xs[i] = exp(xs[i] − shift)` and their sum, in one pass (summed in [`LANES`] lanes, then the
/// lanes in order).
#[inline(always)]
fn exp_shift_sum_generic(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (x, a) in c.iter_mut().zip(acc.iter_mut()) {
            *x = exp1(*x - shift);
            *a += *x;
        }
    }
    let mut sum = 0.0f32;
    for x in chunks.into_remainder() {
        *x = exp1(*x - shift);
        sum += *x;
    }
    acc.iter().sum::<f32>() + sum
}

/// The largest element (`−∞` for an empty slice), in [`LANES`] lanes so it vectorizes; the
/// inputs are finite or `−∞` (masked scores), never NaN.
#[inline(always)]
fn max_generic(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (x, a) in c.iter().zip(acc.iter_mut()) {
            *a = if *x > *a { *x } else { *a };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for x in acc.iter().chain(tail) {
        m = if *x > m { *x } else { m };
    }
    m
}

/// `ln x` for a positive normal `x` in the Cephes form: `x = m·2^e` with `m ∈ [√½, √2)` by bit
/// assembly, `ln m` by a degree-9 polynomial in `m − 1`, `e·ln 2` added in two parts. Relative
/// error ≤ 3e-7 ([`ln_f32_inplace`]'s test); other inputs are fixed up by the caller.
#[inline(always)]
fn ln1(x: f32) -> f32 {
    let bits = x.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 126; // x = f·2^e, f ∈ [0.5, 1)
    let f = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let small = f < std::f32::consts::FRAC_1_SQRT_2;
    let e = (if small { e - 1 } else { e }) as f32;
    let m = if small { f + f - 1.0 } else { f - 1.0 };
    let z = m * m;
    let mut y = 7.037_683_6e-2_f32;
    y = y * m - 1.151_461e-1;
    y = y * m + 1.167_699_9e-1;
    y = y * m - 1.242_014_1e-1;
    y = y * m + 1.424_932_3e-1;
    y = y * m - 1.666_805_8e-1;
    y = y * m + 2.000_071_4e-1;
    y = y * m - 2.499_999_4e-1;
    y = y * m + 3.333_333e-1;
    y = y * m * z;
    y += LN2_LO * e;
    y -= 0.5 * z;
    m + y + LN2_HI * e
}

#[inline(always)]
fn ln_generic(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = ln1(*x);
    }
}

/// `xs[i] = ln(xs[i])` for every element: AVX-512 or AVX2 code chosen at run time for positive
/// normal values (relative error ≤ 3e-7), `f32::ln` for the rest (zero, subnormal, negative, ∞,
/// NaN: the standard results). The row log-sum-exps of polynomial attention (MATH §4), one per
/// query row: a scalar `ln` each measured 8% of the d = 16 kernel's time on an Intel Xeon.
pub fn ln_f32_inplace(xs: &mut [f32]) {
    // which inputs the polynomial form does not cover, before they are overwritten
    let special = |x: f32| !(x.is_normal() && x > 0.0);
    if xs.iter().any(|x| special(*x)) {
        for x in xs.iter_mut() {
            *x = if special(*x) { x.ln() } else { ln1(*x) };
        }
        return;
    }
    dispatch(
        #[inline(always)]
        || ln_generic(xs),
    )
}

/// `xs[i] = exp(xs[i])` for every element; relative error ≤ 2e-7 for arguments in
/// [−87, 88.7], exactly 0 below −87.33 (and for −∞), +∞ is not produced (clamped). AVX-512 or
/// AVX2 code, chosen at run time ([`simd`]).
pub fn exp_f32_inplace(xs: &mut [f32]) {
    dispatch(
        #[inline(always)]
        || exp_generic(xs),
    )
}

/// `xs[i] = exp(xs[i] − shift)` (the accuracy of [`exp_f32_inplace`]) and `Σ_i xs[i]`, in one
/// pass: a softmax tile row against its running maximum. AVX-512 or AVX2 code, chosen at run time.
pub fn exp_shift_sum_f32(xs: &mut [f32], shift: f32) -> f32 {
    dispatch(
        #[inline(always)]
        || exp_shift_sum_generic(xs, shift),
    )
}

/// The largest element of `xs` (`−∞` when empty); `xs` holds no NaN. AVX-512 or AVX2 code,
/// chosen at run time.
pub fn max_f32(xs: &[f32]) -> f32 {
    dispatch(
        #[inline(always)]
        || max_generic(xs),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64's `ln` over positive normals from 1e-37 to 1e38 (and around 1, where `ln` is
    /// small and relative error is hardest), and the standard results for the special inputs.
    #[test]
    fn ln_matches_f64_to_3e7() {
        let mut xs: Vec<f32> = (0..20_000).map(|i| 10f32.powf(-37.0 + 75.0 * i as f32 / 20_000.0)).collect();
        xs.extend((1..2000).map(|i| 1.0 + (i as f32 - 1000.0) * 1e-4));
        let want: Vec<f64> = xs.iter().map(|x| (*x as f64).ln()).collect();
        let mut got = xs.clone();
        ln_f32_inplace(&mut got);
        for ((x, g), w) in xs.iter().zip(&got).zip(&want) {
            let err = (*g as f64 - w).abs() / w.abs().max(1e-30);
            // near x = 1 the absolute error of f32 rounding of x itself dominates
            let ok = err <= 3e-7 || (*g as f64 - w).abs() <= 1.5e-7 * (*x as f64).max(1.0);
            assert!(ok, "ln({x}) = {g}, want {w} (rel {err:e})");
        }
        let mut sp = vec![0.0f32, -1.0, f32::INFINITY, 1e-40, 2.0];
        ln_f32_inplace(&mut sp);
        assert_eq!(sp[0], f32::NEG_INFINITY);
        assert!(sp[1].is_nan());
        assert_eq!(sp[2], f32::INFINITY);
        assert!((sp[3] as f64 - (1e-40f64).ln()).abs() < 1e-3);
        assert!((sp[4] as f64 - 2f64.ln()).abs() < 1e-7);
    }

    #[test]
    fn exp_matches_std_to_2e7() {
        let mut worst = 0.0f64;
        let mut xs: Vec<f32> = (0..200_001).map(|i| -87.0 + 175.5 * i as f32 / 200_000.0).collect();
        let orig = xs.clone();
        exp_f32_inplace(&mut xs);
        for (y, x) in xs.iter().zip(&orig) {
            let want = (*x as f64).exp();
            let rel = ((*y as f64) - want).abs() / want;
            worst = worst.max(rel);
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        let mut edge = [f32::NEG_INFINITY, -1000.0, -87.5, 0.0];
        exp_f32_inplace(&mut edge);
        assert_eq!(edge, [0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn shifted_exp_sum_and_max_match_the_plain_forms() {
        for len in [0usize, 1, 15, 16, 17, 100, 257] {
            let xs: Vec<f32> = (0..len).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3).collect();
            let want_max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_f32(&xs), want_max, "len {len}");
            let shift = if len == 0 { 0.0 } else { want_max };
            let mut got = xs.clone();
            let sum = exp_shift_sum_f32(&mut got, shift);
            let mut want_sum = 0.0f64;
            for (g, x) in got.iter().zip(&xs) {
                let w = ((*x - shift) as f64).exp();
                assert!(((*g as f64) - w).abs() <= 2e-7 * w + 1e-38, "len {len}: {g} vs {w}");
                want_sum += w;
            }
            assert!(((sum as f64) - want_sum).abs() <= 1e-6 * want_sum.max(1e-30), "len {len}: {sum} vs {want_sum}");
        }
        let mut masked = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        assert_eq!(max_f32(&masked), 0.0);
        assert_eq!(exp_shift_sum_f32(&mut masked, 0.0), 1.0);
        assert_eq!(masked, [0.0, 1.0, 0.0]);
    }
}
