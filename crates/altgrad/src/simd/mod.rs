//! Explicit SIMD for the f32 hot loops: the instruction set of this CPU (detected once, at run
//! time, so the binary runs on any x86-64), a [`Vector`] abstraction over one register of f32
//! lanes (AVX-512F: 16, AVX2+FMA: 8) with a vectorized `exp`, and [`gemm`], a register-tiled
//! matrix product for operands that sit in cache (the attention kernels' tiles, MATH §2).
//!
//! Two ways in: [`dispatch`] runs a closure compiled for the widest level (auto-vectorized code),
//! and [`Level`] tells which [`Vector`] implementation a kernel should be instantiated with.
//! Kernels written over [`Vector`] are generic functions marked `#[inline(always)]` and called
//! from one `#[target_feature]` entry per level, so every intrinsic inlines into code compiled
//! for its instruction set.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

pub(crate) mod elementwise;
pub(crate) mod fused;
pub(crate) mod packed;
pub(crate) mod transpose;

/// Vector instruction set of this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// AVX-512F (16 f32 lanes, 32 registers, mask registers).
    Avx512,
    /// AVX2 with FMA (8 f32 lanes, 16 registers).
    Avx2,
    /// Neither (or not x86-64): the portable code paths.
    Generic,
}

impl Level {
    /// The widest level this CPU has (detected once). `ALTGRAD_SIMD=avx2|generic` caps it (for
    /// measuring and testing the narrower paths on a wider CPU); it cannot raise it. Any other
    /// non-empty value but `avx512` is ignored with a warning on stderr (once), naming it.
    pub fn detect() -> Level {
        use std::sync::OnceLock;
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let hw = Level::hardware();
            // read as an OsString: a value that is not UTF-8 reaches the warning too, its bytes
            // shown escaped by OsStr's Debug ("avx\xFF"; a UTF-8 value prints as a str would)
            let var = std::env::var_os("ALTGRAD_SIMD");
            match var.as_deref().map(|v| v.to_str()) {
                Some(Some("generic")) => Level::Generic,
                Some(Some("avx2")) if hw != Level::Generic => Level::Avx2,
                None | Some(Some("" | "avx512" | "avx2")) => hw,
                Some(_) => {
                    eprintln!(
                        "altgrad: ALTGRAD_SIMD={:?} is not avx512, avx2 or generic: ignored (this CPU has {})",
                        var.unwrap_or_default(),
                        hw.name()
                    );
                    hw
                }
            }
        })
    }

    /// What the CPU has, ignoring `ALTGRAD_SIMD`.
    pub fn hardware() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Level::Avx2;
            }
        }
        Level::Generic
    }

    /// The levels this CPU can run, widest first (for tests that cover every path).
    pub fn available() -> Vec<Level> {
        match Level::hardware() {
            Level::Avx512 => vec![Level::Avx512, Level::Avx2, Level::Generic],
            Level::Avx2 => vec![Level::Avx2, Level::Generic],
            Level::Generic => vec![Level::Generic],
        }
    }

    /// Name for reports: `avx512`, `avx2` or `generic`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Avx512 => "avx512",
            Level::Avx2 => "avx2",
            Level::Generic => "generic",
        }
    }
}

/// Runs `f` compiled for the widest vector instruction set this CPU has (AVX-512F, else
/// AVX2+FMA, else baseline x86-64), so elementwise loops vectorize to full width. Only code that
/// is inlined into `f` benefits: pass an `#[inline(always)]` closure calling `#[inline(always)]`
/// functions. Rust does not contract `a·b + c` into FMA, so every level gives bit-identical results.
#[inline(always)]
pub(crate) fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match Level::detect() {
        // SAFETY: detect() checked that the CPU has these features.
        Level::Avx512 => return unsafe { run_avx512(f) },
        // SAFETY: as above.
        Level::Avx2 => return unsafe { run_avx2(f) },
        Level::Generic => {}
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// One register of f32 lanes and the operations the kernels need. Every method is `unsafe`: the
/// caller must run on a CPU with the implementation's instruction set (inside a
/// `#[target_feature]` function of that set, so the intrinsics inline) and pass pointers valid
/// for the lanes read or written.
pub(crate) trait Vector: Copy {
    /// The register type.
    type V: Copy;
    /// Which lanes a partial load or store touches.
    type Mask: Copy;
    /// Lanes per register.
    const LANES: usize;
    /// The first `n` lanes (`n ≤ LANES`).
    unsafe fn mask(n: usize) -> Self::Mask;
    /// Every lane `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// `LANES` values from `p`.
    unsafe fn load(p: *const f32) -> Self::V;
    /// The lanes of `m` from `p`, the others 0 (reads only those lanes).
    unsafe fn load_m(p: *const f32, m: Self::Mask) -> Self::V;
    /// Writes `LANES` values to `p`.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Writes the lanes of `m` to `p` (touches only those lanes).
    unsafe fn store_m(p: *mut f32, v: Self::V, m: Self::Mask);
    /// `a · b + c`, fused.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a − b`.
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    /// `a · b`.
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise maximum (no NaN in the kernels' data).
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `a / b`, correctly rounded.
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    /// `−|x|` of every lane.
    unsafe fn neg_abs(x: Self::V) -> Self::V;
    /// Per lane: `if_neg` where `x < 0`, else `other`.
    unsafe fn select_neg(x: Self::V, if_neg: Self::V, other: Self::V) -> Self::V;
    /// Sum of the lanes.
    unsafe fn hsum(v: Self::V) -> f32;
    /// `exp` of every lane: relative error ≤ 3e-7 for arguments in [−87, 88.7], exactly 0 below
    /// −87.33 (never a subnormal: arithmetic on subnormals is slow) and for −∞ (the masked
    /// scores), +∞ above 88.73. The kernels' arguments are scores minus their row maximum or
    /// `lse`: never above 0.
    unsafe fn exp(x: Self::V) -> Self::V;
}

// exp: x = n·ln2 + r, |r| ≤ ln2/2 (ln 2 split in two for an exact reduction), then Cephes'
// degree-6 polynomial for e^r (relative error ≤ 2e-7 on [−ln2/2, ln2/2]), then 2^n.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_2e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5;

/// AVX-512F (16 lanes).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Vector for Avx512 {
    type V = __m512;
    type Mask = __mmask16;
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_m(p: *const f32, m: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(m, p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn store_m(p: *mut f32, v: __m512, m: __mmask16) {
        _mm512_mask_storeu_ps(p, m, v)
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        _mm512_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn div(a: __m512, b: __m512) -> __m512 {
        _mm512_div_ps(a, b)
    }
    #[inline(always)]
    unsafe fn neg_abs(x: __m512) -> __m512 {
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN)))
    }
    #[inline(always)]
    unsafe fn select_neg(x: __m512, if_neg: __m512, other: __m512) -> __m512 {
        _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps()), other, if_neg)
    }
    #[inline(always)]
    unsafe fn hsum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        // Below −87.33 the result would be subnormal, and arithmetic on subnormals is slow (a
        // microcode assist per operation): return exactly 0 there (also for −∞, the masked
        // scores); the clamp keeps n in range for scalef.
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.33));
        let x = _mm512_max_ps(x, _mm512_set1_ps(-88.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(LOG2E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(P0);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P4));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P5));
        let r2 = _mm512_mul_ps(r, r);
        let y = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_maskz_scalef_ps(keep, y, n)
    }
}

/// AVX2 with FMA (8 lanes).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Vector for Avx2 {
    type V = __m256;
    type Mask = __m256i;
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn mask(n: usize) -> __m256i {
        let n = n.min(8) as i32;
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes)
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_m(p: *const f32, m: __m256i) -> __m256 {
        _mm256_maskload_ps(p, m)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn store_m(p: *mut f32, v: __m256, m: __m256i) {
        _mm256_maskstore_ps(p, m, v)
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        _mm256_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn div(a: __m256, b: __m256) -> __m256 {
        _mm256_div_ps(a, b)
    }
    #[inline(always)]
    unsafe fn neg_abs(x: __m256) -> __m256 {
        _mm256_or_ps(x, _mm256_set1_ps(-0.0))
    }
    #[inline(always)]
    unsafe fn select_neg(x: __m256, if_neg: __m256, other: __m256) -> __m256 {
        _mm256_blendv_ps(other, if_neg, _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps()))
    }
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        let lo = _mm256_set1_ps(-87.33);
        let zero = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
        let x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(89.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(LOG2E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P0);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        // 2^n for n ∈ [−126, 128] in two factors (n = 128 alone would not be a normal float)
        let ni = _mm256_cvtps_epi32(n);
        let half = _mm256_srai_epi32::<1>(ni);
        let bias = _mm256_set1_epi32(127);
        let s1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(half, bias)));
        let s2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias)));
        _mm256_andnot_ps(zero, _mm256_mul_ps(_mm256_mul_ps(y, s1), s2))
    }
}

/// A matrix operand in memory: element `(i, p)` at `ptr + i·rs + p·cs` (f32 elements).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strided {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// `C = α·A·B` (`acc == false`) or `C += α·A·B` (`acc == true`) through `S`'s compiled entry
/// ([`Tiles::gemm`]); see [`Tiles::gemm`] for the layout.
///
/// # Safety
/// As [`Tiles::gemm`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<S: Tiles>(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    acc: bool,
) {
    S::gemm(m, n, k, a, b, rsb, c, rsc, alpha, acc)
}

/// The body of every level's [`Tiles::gemm`]:
/// `C = α·A·B` (`acc == false`) or `C += α·A·B` (`acc == true`), for `A [m, k]` with any strides,
/// `B [k, n]` row-major with row stride `rsb` (columns contiguous), `C [m, n]` row-major with row
/// stride `rsc`. Register-tiled (`MR` rows × `NV` registers of columns, the accumulators never
/// leave registers over `k`), no packing: meant for operands that sit in L1/L2, such as the
/// attention tiles. Columns past the last full register are read and written with masks, so no
/// element outside the matrices is touched.
///
/// # Safety
/// The CPU must have `S`'s instruction set and the caller must be compiled for it (a
/// `#[target_feature]` function calling this `#[inline(always)]` one); every element of `A`, `B`,
/// `C` addressed by the shapes and strides must be valid, and `C` must not overlap `A` or `B`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_impl<S: Tiles>(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                std::ptr::write_bytes(c.add(i * rsc), 0, n);
            }
        }
        return;
    }
    let l = S::LANES;
    let mut j = 0;
    while j < n {
        let w = (n - j).min(4 * l);
        let nv = w.div_ceil(l);
        let tail = S::mask(w - (nv - 1) * l);
        S::strip(nv, m, k, a, b.add(j), rsb, c.add(j), rsc, alpha, acc, tail);
        j += w;
    }
}

/// The register-tiled product of one instruction set: how many rows (`MR`) go with how many
/// column registers (`NV` ≤ 4), as the register file allows, and the entry compiled for it.
pub(crate) trait Tiles: Vector {
    /// `C = α·A·B` or `C += α·A·B`: `A [m, k]` with any strides, `B [k, n]` row-major (row stride
    /// `rsb`), `C [m, n]` row-major (row stride `rsc`). Register-tiled, no packing: for operands
    /// in L1/L2. Columns past the last full register are read and written with masks.
    ///
    /// # Safety
    /// The CPU must have the instruction set; every element addressed must be valid; `C` must not
    /// overlap `A` or `B`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: Strided,
        b: *const f32,
        rsb: usize,
        c: *mut f32,
        rsc: usize,
        alpha: f32,
        acc: bool,
    );

    /// All `m` rows of one column strip of `nv` registers (the last one masked by `tail`).
    ///
    /// # Safety
    /// As [`gemm`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn strip(
        nv: usize,
        m: usize,
        k: usize,
        a: Strided,
        b: *const f32,
        rsb: usize,
        c: *mut f32,
        rsc: usize,
        alpha: f32,
        acc: bool,
        tail: Self::Mask,
    );
}

/// `p`, hidden from the optimizer (offset by a zero it cannot see): it cannot tell that the group
/// pointers of [`micro`] are a fixed distance apart, so it keeps one induction variable per group
/// instead of rebuilding all of them from one pointer by a chain of adds in every k step.
#[inline(always)]
fn opaque(p: *const f32) -> *const f32 {
    #[allow(unused_mut)]
    let mut zero = 0usize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: an empty asm block that reads and writes one integer register: no memory, no flags.
    // Not `pure`: the calls must not be merged into one zero (then the group pointers would be a
    // visible fixed distance apart again).
    unsafe {
        std::arch::asm!("/* {0} */", inout(reg) zero, options(nomem, nostack, preserves_flags));
    }
    p.wrapping_add(zero)
}

/// The most groups of four rows of `A` a micro-kernel reads (`MR ≤ 16`).
const MAX_GROUPS: usize = 4;

/// `MR` rows × `NV` registers of `C`, accumulated in registers over `k`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<S: Vector, const MR: usize, const NV: usize>(
    k: usize,
    a: Strided,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    acc: bool,
    tail: S::Mask,
) {
    let l = S::LANES;
    let mut ab = [[S::splat(0.0); NV]; MR];
    // A's rows in groups of four, one base pointer per group: row 4g + j is read at
    // `base[g] + j·rs` (an addressing mode), so each k step advances MR/4 independent pointers.
    // (One pointer stepped by `rs` from row to row made a chain of MR dependent adds per k step,
    // longer than the step's MR·NV/2 cycles of FMAs at NV = 1 and as long at NV = 2.)
    debug_assert!(MR <= 4 * MAX_GROUPS);
    let mut base = [a.ptr; MAX_GROUPS];
    for (g, p) in base.iter_mut().enumerate().take(MR.div_ceil(4)) {
        *p = opaque(a.ptr.wrapping_add(4 * g * a.rs));
    }
    let mut bp = b;
    for _ in 0..k {
        let mut bv = [S::splat(0.0); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = if v + 1 < NV { S::load(bp.add(v * l)) } else { S::load_m(bp.add(v * l), tail) };
        }
        for (i, row) in ab.iter_mut().enumerate() {
            let ai = S::splat(*base[i / 4].add(i % 4 * a.rs));
            for (x, bx) in row.iter_mut().zip(&bv) {
                *x = S::fma(ai, *bx, *x);
            }
        }
        // wrapping: after the last step the pointers may point past the operands (never read)
        for p in base.iter_mut().take(MR.div_ceil(4)) {
            *p = p.wrapping_add(a.cs);
        }
        bp = bp.wrapping_add(rsb);
    }
    let al = S::splat(alpha);
    for (i, row) in ab.iter().enumerate() {
        let ci = c.add(i * rsc);
        for (v, x) in row.iter().enumerate() {
            let p = ci.add(v * l);
            let last = v + 1 == NV;
            let old = if !acc {
                S::splat(0.0)
            } else if last {
                S::load_m(p, tail)
            } else {
                S::load(p)
            };
            let y = S::fma(al, *x, old);
            if last {
                S::store_m(p, y, tail)
            } else {
                S::store(p, y)
            }
        }
    }
}

/// Every row of a strip: blocks of `MR`, then the remainder one size down at a time.
macro_rules! rows {
    ($S:ty, $NV:literal, $MR:literal, $m:ident, $($arg:expr),*) => {{
        let mut i = 0;
        while i + $MR <= $m {
            rows!(@call $S, $NV, $MR, i, $($arg),*);
            i += $MR;
        }
        while i < $m {
            let r = $m - i;
            // the largest power of two ≤ r (≤ MR/… and ≥ 1)
            if r >= 8 {
                rows!(@call $S, $NV, 8, i, $($arg),*);
                i += 8;
            } else if r >= 4 {
                rows!(@call $S, $NV, 4, i, $($arg),*);
                i += 4;
            } else if r >= 2 {
                rows!(@call $S, $NV, 2, i, $($arg),*);
                i += 2;
            } else {
                rows!(@call $S, $NV, 1, i, $($arg),*);
                i += 1;
            }
        }
    }};
    (@call $S:ty, $NV:literal, $MR:literal, $i:ident, $k:expr, $a:expr, $b:expr, $rsb:expr, $c:expr, $rsc:expr, $alpha:expr, $acc:expr, $tail:expr) => {{
        let a: Strided = $a;
        let ai = Strided { ptr: a.ptr.add($i * a.rs), ..a };
        micro::<$S, $MR, $NV>($k, ai, $b, $rsb, $c.add($i * $rsc), $rsc, $alpha, $acc, $tail);
    }};
}

/// `C = α·A·B` or `C += α·A·B` on the register-tiled kernels of `level` (layout as
/// [`Tiles::gemm`]: `A [m, k]` any strides, `B [k, n]` and `C [m, n]` row-major with row strides
/// `rsb`, `rsc`). Returns `false`, touching nothing, for [`Level::Generic`].
///
/// # Safety
/// `level` must be this CPU's or narrower ([`Level::detect`]); every element addressed must be
/// valid; `C` must not overlap `A` or `B`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile_gemm(
    level: Level,
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    acc: bool,
) -> bool {
    match level {
        // SAFETY: the caller's contract (the CPU has the level; the operands are valid).
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { gemm_avx512(m, n, k, a, b, rsb, c, rsc, alpha, acc) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { gemm_avx2(m, n, k, a, b, rsb, c, rsc, alpha, acc) },
        _ => return false,
    }
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx512(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    acc: bool,
) {
    gemm_impl::<Avx512>(m, n, k, a, b, rsb, c, rsc, alpha, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx2(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    acc: bool,
) {
    gemm_impl::<Avx2>(m, n, k, a, b, rsb, c, rsc, alpha, acc)
}

#[cfg(target_arch = "x86_64")]
impl Tiles for Avx512 {
    #[inline(always)]
    unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: Strided,
        b: *const f32,
        rsb: usize,
        c: *mut f32,
        rsc: usize,
        alpha: f32,
        acc: bool,
    ) {
        gemm_avx512(m, n, k, a, b, rsb, c, rsc, alpha, acc)
    }
    #[inline(always)]
    unsafe fn strip(
        nv: usize,
        m: usize,
        k: usize,
        a: Strided,
        b: *const f32,
        rsb: usize,
        c: *mut f32,
        rsc: usize,
        alpha: f32,
        acc: bool,
        tail: __mmask16,
    ) {
        // 32 registers: MR·NV accumulators + NV for B + 1 broadcast
        match nv {
            1 => rows!(Avx512, 1, 16, m, k, a, b, rsb, c, rsc, alpha, acc, tail),
            2 => rows!(Avx512, 2, 12, m, k, a, b, rsb, c, rsc, alpha, acc, tail),
            3 => rows!(Avx512, 3, 8, m, k, a, b, rsb, c, rsc, alpha, acc, tail),
            _ => rows!(Avx512, 4, 6, m, k, a, b, rsb, c, rsc, alpha, acc, tail),
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Tiles for Avx2 {
    #[inline(always)]
    unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: Strided,
        b: *const f32,
        rsb: usize,
        c: *mut f32,
        rsc: usize,
        alpha: f32,
        acc: bool,
    ) {
        gemm_avx2(m, n, k, a, b, rsb, c, rsc, alpha, acc)
    }
    #[inline(always)]
    unsafe fn strip(
        nv: usize,
        m: usize,
        k: usize,
        a: Strided,
        b: *const f32,
        rsb: usize,
        c: *mut f32,
        rsc: usize,
        alpha: f32,
        acc: bool,
        tail: __m256i,
    ) {
        // 16 registers: MR·NV accumulators + NV for B + 1 broadcast
        match nv {
            1 => rows!(Avx2, 1, 12, m, k, a, b, rsb, c, rsc, alpha, acc, tail),
            2 => rows!(Avx2, 2, 6, m, k, a, b, rsb, c, rsc, alpha, acc, tail),
            3 => rows!(Avx2, 3, 4, m, k, a, b, rsb, c, rsc, alpha, acc, tail),
            _ => rows!(Avx2, 4, 2, m, k, a, b, rsb, c, rsc, alpha, acc, tail),
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn naive(m: usize, n: usize, k: usize, a: &[f32], rsa: usize, csa: usize, b: &[f32], rsb: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * rsa + p * csa] as f64 * b[p * rsb + j] as f64).sum();
            }
        }
        c
    }

    /// Every shape class (row remainders, masked last registers, transposed A, accumulate) against
    /// an f64 triple loop; C's padding columns must stay untouched.
    #[test]
    fn gemm_matches_the_triple_loop_on_every_level() {
        let val = |i: usize| (((i * 2654435761) % 1000) as f32 / 500.0) - 1.0;
        for level in Level::available() {
            if level == Level::Generic {
                continue;
            }
            for &(m, n, k) in
                &[(1, 1, 1), (7, 5, 3), (16, 16, 16), (13, 40, 9), (64, 128, 64), (33, 70, 17), (6, 64, 128)]
            {
                for trans in [false, true] {
                    for acc in [false, true] {
                        let (rsa, csa) = if trans { (1, m + 3) } else { (k + 2, 1) };
                        let a: Vec<f32> = (0..(m + 3) * (k + 2)).map(val).collect();
                        let rsb = n + 5;
                        let b: Vec<f32> = (0..k * rsb).map(|i| val(i + 7)).collect();
                        let rsc = n + 3;
                        let mut c: Vec<f32> = (0..m * rsc).map(|i| val(i + 11)).collect();
                        let c0 = c.clone();
                        let sa = Strided { ptr: a.as_ptr(), rs: rsa, cs: csa };
                        unsafe {
                            match level {
                                Level::Avx512 => {
                                    gemm::<Avx512>(m, n, k, sa, b.as_ptr(), rsb, c.as_mut_ptr(), rsc, 0.5, acc)
                                }
                                _ => gemm::<Avx2>(m, n, k, sa, b.as_ptr(), rsb, c.as_mut_ptr(), rsc, 0.5, acc),
                            }
                        }
                        let want = naive(m, n, k, &a, rsa, csa, &b, rsb);
                        for i in 0..m {
                            for j in 0..rsc {
                                let got = c[i * rsc + j] as f64;
                                if j >= n {
                                    assert_eq!(c[i * rsc + j], c0[i * rsc + j], "padding touched");
                                    continue;
                                }
                                let w = 0.5 * want[i * n + j] + if acc { c0[i * rsc + j] as f64 } else { 0.0 };
                                assert!(
                                    (got - w).abs() <= 1e-5 * (1.0 + w.abs()) * k as f64,
                                    "{level:?} {m}x{n}x{k} {got} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn exp512(x: &[f32; 16]) -> [f32; 16] {
        let mut out = [0.0; 16];
        Avx512::store(out.as_mut_ptr(), Avx512::exp(Avx512::load(x.as_ptr())));
        out
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp256(x: &[f32; 16]) -> [f32; 16] {
        let mut out = [0.0; 16];
        for h in 0..2 {
            Avx2::store(out.as_mut_ptr().add(8 * h), Avx2::exp(Avx2::load(x.as_ptr().add(8 * h))));
        }
        out
    }

    /// `exp` against f64 on a dense sweep of [−88, 88.7] and at the edges (−∞, underflow, overflow).
    #[test]
    fn exp_is_accurate_on_every_level() {
        for level in Level::available() {
            let f = |x: &[f32; 16]| unsafe {
                match level {
                    Level::Avx512 => exp512(x),
                    _ => exp256(x),
                }
            };
            if level == Level::Generic {
                continue;
            }
            let mut worst = 0.0f64;
            let mut x = -88.0f32;
            while x < 88.5 {
                let xs: [f32; 16] = std::array::from_fn(|i| x + i as f32 * 1.37e-3);
                for (xi, yi) in xs.iter().zip(f(&xs)) {
                    let want = (*xi as f64).exp();
                    if want > 1.2e-38 {
                        worst = worst.max(((yi as f64) - want).abs() / want);
                    }
                }
                x += 0.0219;
            }
            assert!(worst < 3e-7, "{level:?}: worst relative error {worst}");
            let edge = f(&std::array::from_fn(|i| [f32::NEG_INFINITY, -200.0, -87.5, 0.0, 89.0][i % 5]));
            assert_eq!(&edge[..4], &[0.0, 0.0, 0.0, 1.0], "{level:?}");
            assert_eq!(edge[4], f32::INFINITY, "{level:?}");
        }
    }
}
