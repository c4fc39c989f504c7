//! Fused elementwise f32 passes of the models' layers (MATH §6) on whole registers with the
//! vectorized `exp` of [`super::Vector`]: one read of each input and one write of each output per
//! element, where the portable code makes several passes.

#[cfg(target_arch = "x86_64")]
use super::{Avx2, Avx512};
use super::{Level, Vector};

/// `sigmoid(x)` per lane, stable for any `x`: with `e = exp(−|x|)`, `1/(1 + e)` for `x ≥ 0` and
/// `e/(1 + e)` below (the portable [`crate::model::layers`] formula).
#[inline(always)]
unsafe fn sigmoid<S: Vector>(x: S::V) -> S::V {
    let e = S::exp(S::neg_abs(x));
    let r = S::div(S::splat(1.0), S::add(S::splat(1.0), e));
    S::select_neg(x, S::mul(e, r), r)
}

// The loops below are written out (no closure per register): a closure would be compiled
// without the caller's target features, and every intrinsic in it would become a call.

#[inline(always)]
unsafe fn swiglu_fwd<S: Vector>(gate: &[f32], up: &[f32], h: &mut [f32]) {
    let (g, u, o) = (gate.as_ptr(), up.as_ptr(), h.as_mut_ptr());
    let (len, l) = (h.len(), S::LANES);
    let mut j = 0;
    while j < len {
        let m = S::mask(len - j);
        let x = S::load_m(g.add(j), m);
        let y = S::mul(S::mul(x, sigmoid::<S>(x)), S::load_m(u.add(j), m));
        S::store_m(o.add(j), y, m);
        j += l;
    }
}

#[inline(always)]
unsafe fn swiglu_bwd<S: Vector>(gate: &[f32], up: &[f32], dh: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    let (g, u, d) = (gate.as_ptr(), up.as_ptr(), dh.as_ptr());
    let (dg, du) = (dgate.as_mut_ptr(), dup.as_mut_ptr());
    let one = S::splat(1.0);
    let (len, l) = (dgate.len(), S::LANES);
    let mut j = 0;
    while j < len {
        let m = S::mask(len - j);
        let (x, uv, dv) = (S::load_m(g.add(j), m), S::load_m(u.add(j), m), S::load_m(d.add(j), m));
        let s = sigmoid::<S>(x);
        S::store_m(du.add(j), S::mul(S::mul(dv, x), s), m);
        // dh · up · s · (1 + g (1 − s))
        let t = S::fma(x, S::sub(one, s), one);
        S::store_m(dg.add(j), S::mul(S::mul(S::mul(dv, uv), s), t), m);
        j += l;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_fwd_avx512(gate: &[f32], up: &[f32], h: &mut [f32]) {
    swiglu_fwd::<Avx512>(gate, up, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_fwd_avx2(gate: &[f32], up: &[f32], h: &mut [f32]) {
    swiglu_fwd::<Avx2>(gate, up, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_bwd_avx512(gate: &[f32], up: &[f32], dh: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    swiglu_bwd::<Avx512>(gate, up, dh, dgate, dup)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_bwd_avx2(gate: &[f32], up: &[f32], dh: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    swiglu_bwd::<Avx2>(gate, up, dh, dgate, dup)
}

/// `h = silu(gate) ⊙ up` in one pass on `level` (all slices the same length). Returns `false`,
/// touching nothing, without a SIMD level.
pub(crate) fn swiglu_forward(level: Level, gate: &[f32], up: &[f32], h: &mut [f32]) -> bool {
    assert!(gate.len() == h.len() && up.len() == h.len(), "swiglu_forward: lengths");
    // SAFETY: the level is this CPU's (detected), the slices have equal lengths.
    unsafe {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => swiglu_fwd_avx512(gate, up, h),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => swiglu_fwd_avx2(gate, up, h),
            _ => return false,
        }
    }
    true
}

/// `dup = dh ⊙ silu(gate)`, `dgate = dh ⊙ up ⊙ s (1 + gate (1 − s))` with `s = sigmoid(gate)`, in
/// one pass on `level` (all slices the same length). Returns `false`, touching nothing, without
/// a SIMD level.
pub(crate) fn swiglu_backward(
    level: Level,
    gate: &[f32],
    up: &[f32],
    dh: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) -> bool {
    let n = dgate.len();
    assert!(gate.len() == n && up.len() == n && dh.len() == n && dup.len() == n, "swiglu_backward: lengths");
    // SAFETY: the level is this CPU's (detected), the slices have equal lengths.
    unsafe {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => swiglu_bwd_avx512(gate, up, dh, dgate, dup),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => swiglu_bwd_avx2(gate, up, dh, dgate, dup),
            _ => return false,
        }
    }
    true
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Every level against the f64 definitions, over gates from −100 to 100 (no overflow, no NaN).
    #[test]
    fn swiglu_matches_the_f64_definition_on_every_level() {
        let n = 1001;
        let gate: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) / 5.0).collect();
        let up: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 / 3.0 - 1.5).collect();
        let dh: Vec<f32> = (0..n).map(|i| ((i * 13) % 7) as f32 / 2.0 - 1.0).collect();
        for level in Level::available().into_iter().filter(|l| *l != Level::Generic) {
            let (mut h, mut dg, mut du) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            assert!(swiglu_forward(level, &gate, &up, &mut h));
            assert!(swiglu_backward(level, &gate, &up, &dh, &mut dg, &mut du));
            for i in 0..n {
                let (g, u, d) = (gate[i] as f64, up[i] as f64, dh[i] as f64);
                let s = 1.0 / (1.0 + (-g).exp());
                let close = |got: f32, want: f64| (got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs());
                assert!(close(h[i], g * s * u), "{level:?} h({g})");
                assert!(close(du[i], d * g * s), "{level:?} dup({g})");
                assert!(
                    close(dg[i], d * u * s * (1.0 + g * (1.0 - s))),
                    "{level:?} dgate({g}): {} vs {}",
                    dg[i],
                    d * u * s * (1.0 + g * (1.0 - s))
                );
            }
        }
    }
}
