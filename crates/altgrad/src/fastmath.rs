//! Vectorizable elementary functions for the attention kernels' hot loops.
//!
//! `exp` for f32 in the Cephes form (range reduction by ln 2, degree-6 minimax polynomial,
//! exponent by bit assembly), written so the compiler vectorizes it; dispatched at run time to
//! an AVX2+FMA build where the CPU has it, so the binary still runs on any x86-64.

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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(xs: &mut [f32]) {
    exp_generic(xs)
}

/// `xs[i] = exp(xs[i])` for every element; relative error ≤ 2e-7 for arguments in
/// [−87, 88.7], exactly 0 below −87.33 (and for −∞), +∞ is not produced (clamped).
pub fn exp_f32_inplace(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { exp_avx2(xs) };
            return;
        }
    }
    exp_generic(xs)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
