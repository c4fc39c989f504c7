//! Scaled f32 transposes between row-major head views and the feature-major chunks of polynomial
//! attention (MATH §4: the feature map works on `x'ᵀ [d, rows]`, one row per lane), 8×8 blocks in
//! AVX registers (on AVX-512 CPUs too: the blocks are 8 wide). The scalar form of each element is
//! the portable code's, so results are bit-identical to it.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::Level;

/// Transposes the 8×8 block held in `r` (row `k` in `r[k]`): standard unpack / shuffle /
/// 128-bit-lane permute sequence, 24 instructions.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn t8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// The 8×8 block at `p` (rows `stride` apart), transposed.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_t8(p: *const f32, stride: usize) -> [__m256; 8] {
    let mut r = [_mm256_setzero_ps(); 8];
    for (k, v) in r.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(p.add(k * stride));
    }
    t8(r)
}

/// Calls `f(i0, c0)` for the corner of every whole 8×8 block of a `rows × cols` matrix.
#[inline(always)]
fn blocks(rows: usize, cols: usize, mut f: impl FnMut(usize, usize)) {
    for i0 in (0..rows / 8 * 8).step_by(8) {
        for c0 in (0..cols / 8 * 8).step_by(8) {
            f(i0, c0);
        }
    }
}

/// Calls `f(i, c)` for every element outside the whole 8×8 blocks.
#[inline(always)]
fn remainder(rows: usize, cols: usize, mut f: impl FnMut(usize, usize)) {
    let (rb, cb) = (rows / 8 * 8, cols / 8 * 8);
    for i in 0..rows {
        for c in if i < rb { cb } else { 0 }..cols {
            f(i, c);
        }
    }
}

/// One element of [`transpose_scaled`], in the portable code's order of operations.
#[inline(always)]
fn scaled(x: f32, shift: Option<&[f32]>, c: usize, scale: f32) -> f32 {
    match shift {
        Some(s) => (x - s[c]) * scale,
        None => x * scale,
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[allow(clippy::too_many_arguments)]
unsafe fn transpose_scaled_avx(
    src: &[f32],
    ss: usize,
    rows: usize,
    cols: usize,
    shift: Option<&[f32]>,
    scale: f32,
    dst: &mut [f32],
    ld: usize,
) {
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    let sc = _mm256_set1_ps(scale);
    blocks(rows, cols, |i0, c0| {
        for (k, v) in load_t8(sp.add(i0 * ss + c0), ss).iter().enumerate() {
            let v = match shift {
                Some(s) => _mm256_sub_ps(*v, _mm256_set1_ps(s[c0 + k])),
                None => *v,
            };
            _mm256_storeu_ps(dp.add((c0 + k) * ld + i0), _mm256_mul_ps(v, sc));
        }
    });
    remainder(rows, cols, |i, c| *dp.add(c * ld + i) = scaled(src[i * ss + c], shift, c, scale));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[allow(clippy::too_many_arguments)]
unsafe fn add_transposed_avx(src: &[f32], ld: usize, rows: usize, cols: usize, scale: f32, dst: *mut f32, ds: usize) {
    let sp = src.as_ptr();
    let sc = _mm256_set1_ps(scale);
    blocks(rows, cols, |i0, c0| {
        for (k, v) in load_t8(sp.add(c0 * ld + i0), ld).iter().enumerate() {
            let p = dst.add((i0 + k) * ds + c0);
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm256_mul_ps(*v, sc)));
        }
    });
    remainder(rows, cols, |i, c| *dst.add(i * ds + c) += src[c * ld + i] * scale);
}

/// `dst[c·ld + i] = (src[i·ss + c] − shift[c])·scale` for `i < rows`, `c < cols` (no `− shift`
/// when `None`): the scaled transpose of a strided `rows × cols` view into a `cols × rows` block
/// with leading dimension `ld`. Returns `false`, touching nothing, without a SIMD level. Panics if
/// a slice is too short.
#[allow(clippy::too_many_arguments)]
pub(crate) fn transpose_scaled(
    level: Level,
    src: &[f32],
    ss: usize,
    rows: usize,
    cols: usize,
    shift: Option<&[f32]>,
    scale: f32,
    dst: &mut [f32],
    ld: usize,
) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    assert!(ss >= cols && ld >= rows, "transpose_scaled: strides");
    assert!(src.len() >= (rows - 1) * ss + cols, "transpose_scaled: src too short");
    assert!(dst.len() >= (cols - 1) * ld + rows, "transpose_scaled: dst too short");
    assert!(shift.is_none_or(|s| s.len() >= cols), "transpose_scaled: shift too short");
    match level {
        // SAFETY: the level is this CPU's (AVX-512 and AVX2 CPUs have AVX); every block read or
        // written lies inside the slices checked above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx2 => unsafe { transpose_scaled_avx(src, ss, rows, cols, shift, scale, dst, ld) },
        _ => return false,
    }
    true
}

/// `dst[i·ds + c] += src[c·ld + i]·scale` for `i < rows`, `c < cols`: adds the scaled transpose of
/// a `cols × rows` block (leading dimension `ld`) into a strided `rows × cols` view at `dst`.
/// Returns `false`, touching nothing, without a SIMD level.
///
/// # Safety
/// `dst` must be valid for reading and writing `(i, c)` at `dst + i·ds + c` for every `i < rows`,
/// `c < cols` (an output head view's rows), and not overlap `src`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn add_transposed(
    level: Level,
    src: &[f32],
    ld: usize,
    rows: usize,
    cols: usize,
    scale: f32,
    dst: *mut f32,
    ds: usize,
) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    assert!(ld >= rows && src.len() >= (cols - 1) * ld + rows, "add_transposed: src too short");
    match level {
        // SAFETY: the level is this CPU's; src checked above, dst by the caller's contract.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx2 => unsafe { add_transposed_avx(src, ld, rows, cols, scale, dst, ds) },
        _ => return false,
    }
    true
}

/// `dst[i·ds + c] = src[c·ld + i]·w[i]` for `i < rows`, `c < cols`: writes the transpose of a
/// `cols × rows` block (leading dimension `ld`), row `i` scaled by `w[i]`, into a strided
/// `rows × cols` view at `dst` (the polynomial forward's `o_i = y_i / den_i` from `Yᵀ`). Returns
/// `false`, touching nothing, without a SIMD level. Panics if `src` or `w` is too short.
///
/// # Safety
/// `dst` must be valid for writing `(i, c)` at `dst + i·ds + c` for every `i < rows`, `c < cols`,
/// and not overlap `src`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn store_transposed(
    level: Level,
    src: &[f32],
    ld: usize,
    rows: usize,
    cols: usize,
    w: &[f32],
    dst: *mut f32,
    ds: usize,
) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    assert!(ld >= rows && src.len() >= (cols - 1) * ld + rows, "store_transposed: src too short");
    assert!(w.len() >= rows, "store_transposed: w too short");
    match level {
        // SAFETY: the level is this CPU's; src and w checked above, dst by the caller's contract.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx2 => unsafe { store_transposed_avx(src, ld, rows, cols, w, dst, ds) },
        _ => return false,
    }
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[allow(clippy::too_many_arguments)]
unsafe fn store_transposed_avx(src: &[f32], ld: usize, rows: usize, cols: usize, w: &[f32], dst: *mut f32, ds: usize) {
    let sp = src.as_ptr();
    blocks(rows, cols, |i0, c0| {
        for (k, v) in load_t8(sp.add(c0 * ld + i0), ld).iter().enumerate() {
            _mm256_storeu_ps(dst.add((i0 + k) * ds + c0), _mm256_mul_ps(*v, _mm256_set1_ps(w[i0 + k])));
        }
    });
    remainder(rows, cols, |i, c| *dst.add(i * ds + c) = src[c * ld + i] * w[i]);
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 7e6 - 1.0).collect()
    }

    /// Every shape class (whole 8×8 blocks, row and column remainders, strides wider than the
    /// rows, leading dimensions wider than the block) against the element-by-element definition,
    /// bit for bit, on every SIMD level of this CPU.
    #[test]
    fn transposes_match_the_definition_bit_for_bit() {
        for level in Level::available().into_iter().filter(|l| *l != Level::Generic) {
            for (rows, cols, ss, ld) in
                [(64, 16, 64, 64), (64, 16, 16, 64), (17, 9, 12, 20), (8, 8, 8, 8), (5, 3, 3, 5), (23, 32, 100, 30)]
            {
                let src = data((rows - 1) * ss + cols, 7);
                let shift = data(cols, 99);
                let scale = 0.353_553_4f32;
                for sh in [None, Some(&shift[..])] {
                    let mut got = vec![f32::NAN; (cols - 1) * ld + rows];
                    let mut want = got.clone();
                    assert!(transpose_scaled(level, &src, ss, rows, cols, sh, scale, &mut got, ld));
                    for i in 0..rows {
                        for c in 0..cols {
                            want[c * ld + i] = scaled(src[i * ss + c], sh, c, scale);
                        }
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "transpose {level:?} {rows}x{cols} ss {ss} ld {ld}");
                }
                // and back: add the transpose of a cols × rows block into a strided view
                let blk = data((cols - 1) * ld + rows, 3);
                let mut got = data((rows - 1) * ss + cols, 11);
                let mut want = got.clone();
                // SAFETY: got holds (rows − 1)·ss + cols values: every (i, c) is inside it.
                assert!(unsafe { add_transposed(level, &blk, ld, rows, cols, scale, got.as_mut_ptr(), ss) });
                for i in 0..rows {
                    for c in 0..cols {
                        want[i * ss + c] += blk[c * ld + i] * scale;
                    }
                }
                assert_eq!(got, want, "add_transposed {level:?} {rows}x{cols} ss {ss} ld {ld}");
                // and a row-weighted store of the transpose into a strided view (other values kept)
                let w = data(rows, 5);
                let mut got = data((rows - 1) * ss + cols, 13);
                let mut want = got.clone();
                // SAFETY: as above.
                assert!(unsafe { store_transposed(level, &blk, ld, rows, cols, &w, got.as_mut_ptr(), ss) });
                for i in 0..rows {
                    for c in 0..cols {
                        want[i * ss + c] = blk[c * ld + i] * w[i];
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "store_transposed {level:?} {rows}x{cols} ss {ss} ld {ld}");
            }
        }
    }
}
