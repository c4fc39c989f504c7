//! Thin helpers over `faer`: the [`Scalar`] trait (f32, f64), row-major matrix views over slices,
//! and one matrix-multiply entry point with transposes.
//!
//! Every tensor in altgrad is a plain row-major `Vec<T>` (or slice) with its shape carried
//! alongside; these helpers view such slices as `faer` matrices without copying.

use faer::{Accum, MatMut, MatRef, Par};
use num_traits::Float;
use rayon::prelude::*;
use std::fmt::Debug;
use std::iter::Sum;

/// Floating-point element type of every kernel: `f32` or `f64`.
///
/// Combines `faer`'s field trait (for GEMM) with `num_traits::Float` (for `exp`, `ln`, …).
pub trait Scalar:
    faer::traits::RealField
    + Float
    + Copy
    + Send
    + Sync
    + Debug
    + Default
    + Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + 'static
{
    /// Name of the type as in safetensors dtypes: `"F32"` or `"F64"`.
    const DTYPE: &'static str;
    /// Converts from f64 (rounding to nearest for f32).
    fn from_f64(x: f64) -> Self;
    /// Converts to f64 (exact). Named `as_f64` because `num_traits::ToPrimitive::to_f64` (returning
    /// `Option`) is also in scope for every `Scalar`.
    fn as_f64(self) -> f64;
    /// Converts from f32 (exact).
    fn from_f32(x: f32) -> Self {
        Self::from_f64(x as f64)
    }
    /// `exp` of every element of `xs`, in place. f32 uses a vectorized polynomial
    /// (≤ 2 ulp on the range softmax uses); f64 uses the standard library.
    fn exp_inplace(xs: &mut [Self]);
    /// `xs[i] = exp(xs[i] − shift)` and their sum, in one pass (f32: the vectorized polynomial).
    fn exp_shift_sum(xs: &mut [Self], shift: Self) -> Self;
    /// The largest element (`−∞` when empty) of `xs`, which holds no NaN (f32: vectorized).
    fn max_of(xs: &[Self]) -> Self;
}

impl Scalar for f32 {
    const DTYPE: &'static str = "F32";
    #[inline]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn as_f64(self) -> f64 {
        self as f64
    }
    fn exp_inplace(xs: &mut [Self]) {
        crate::fastmath::exp_f32_inplace(xs)
    }
    fn exp_shift_sum(xs: &mut [Self], shift: Self) -> Self {
        crate::fastmath::exp_shift_sum_f32(xs, shift)
    }
    fn max_of(xs: &[Self]) -> Self {
        crate::fastmath::max_f32(xs)
    }
}

impl Scalar for f64 {
    const DTYPE: &'static str = "F64";
    #[inline]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline]
    fn as_f64(self) -> f64 {
        self
    }
    fn exp_inplace(xs: &mut [Self]) {
        for x in xs {
            *x = x.exp();
        }
    }
    fn exp_shift_sum(xs: &mut [Self], shift: Self) -> Self {
        let mut sum = 0.0;
        for x in xs {
            *x = (*x - shift).exp();
            sum += *x;
        }
        sum
    }
    fn max_of(xs: &[Self]) -> Self {
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Whether `T` is `f32` (the f32-only SIMD kernels may then treat `T` data as `f32`).
#[inline(always)]
pub fn is_f32<T: 'static>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
}

/// `x` as f32 values when `T` is f32 ([`is_f32`]), else `None`.
#[inline(always)]
pub fn as_f32<T: 'static>(x: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32 (same TypeId), so the slice's memory holds f32 values.
    is_f32::<T>().then(|| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) })
}

/// [`as_f32`] for a mutable slice.
#[inline(always)]
pub fn as_f32_mut<T: 'static>(x: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: as in as_f32.
    is_f32::<T>().then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) })
}

/// Converts an f64 constant to `T`.
#[inline]
pub fn c<T: Scalar>(x: f64) -> T {
    T::from_f64(x)
}

/// Row-major view of `data` as a `rows × cols` matrix (`data.len() == rows * cols`).
#[inline]
pub fn rm<T>(data: &[T], rows: usize, cols: usize) -> MatRef<'_, T> {
    MatRef::from_row_major_slice(data, rows, cols)
}

/// Mutable row-major view of `data` as a `rows × cols` matrix.
#[inline]
pub fn rm_mut<T>(data: &mut [T], rows: usize, cols: usize) -> MatMut<'_, T> {
    MatMut::from_row_major_slice_mut(data, rows, cols)
}

/// Row-major view with a row stride (e.g. one head `[seq, head_dim]` inside `[seq, heads, head_dim]`:
/// `data` starts at the head's first element and `stride = heads * head_dim`).
#[inline]
pub fn rm_strided<T>(data: &[T], rows: usize, cols: usize, stride: usize) -> MatRef<'_, T> {
    if rows == 0 || cols == 0 {
        return MatRef::from_row_major_slice(&data[..0], rows, cols);
    }
    MatRef::from_row_major_slice_with_stride(data, rows, cols, stride)
}

/// Mutable row-major view with a row stride (see [`rm_strided`]).
#[inline]
pub fn rm_strided_mut<T>(data: &mut [T], rows: usize, cols: usize, stride: usize) -> MatMut<'_, T> {
    if rows == 0 || cols == 0 {
        return MatMut::from_row_major_slice_mut(&mut data[..0], rows, cols);
    }
    // faer 0.24.4's `MatMut::from_row_major_slice_with_stride_mut` builds the view with the
    // strides swapped (row stride 1, column stride `stride`), so products write outside the rows:
    // the column-major view of the transpose, transposed, is the row-major view
    MatMut::from_column_major_slice_with_stride_mut(data, cols, rows, stride).transpose_mut()
}

/// `dst = alpha · a · b` (`acc == false`) or `dst += alpha · a · b` (`acc == true`).
///
/// Shapes: `a [m, k]`, `b [k, n]`, `dst [m, n]`; pass `x.transpose()` for transposed operands.
/// `par`: `Par::Seq` inside per-head work (heads run in parallel with rayon), `Par::rayon(0)`
/// for whole-model projections. Panics on mismatched shapes (a programming error, not user input).
#[inline]
pub fn matmul<T: Scalar>(dst: MatMut<'_, T>, acc: bool, a: MatRef<'_, T>, b: MatRef<'_, T>, alpha: T, par: Par) {
    if a.ncols() == 0 {
        if !acc {
            let mut dst = dst;
            dst.fill(T::from_f64(0.0));
        }
        return;
    }
    let threads = match par {
        Par::Seq => 1,
        Par::Rayon(t) => t.get(),
    };
    let (m, n, k) = (dst.nrows(), dst.ncols(), a.ncols());
    if threads > 1 && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN {
        // f32: the packed GEMM (both operands packed into reused, aligned per-thread panels: as
        // fast as faer's one-thread kernels on a split of C in a fresh process, and twice as fast
        // in a process whose heap another library has churned, where faer reading its unpacked
        // operand in place measured 2× slower: on the Xeon, BENCHMARKS "Issue 13"; on AMD Zen 4
        // faer's own product measured up to 9% faster on 5 of 6 shapes, "Issue 13 on AMD EPYC
        // Zen 4");
        // otherwise faer's one-thread kernels on a split of C, one part per thread (faer's own
        // parallel GEMM measured 10–20% slower on the projections, on the Xeon)
        let dst = match packed_f32(dst, acc, a, b, alpha, par) {
            None => return,
            Some(dst) => dst,
        };
        split_seq(dst, acc, a, b, alpha, threads);
        return;
    }
    let beta = if acc { Accum::Add } else { Accum::Replace };
    faer::linalg::matmul::matmul(dst, beta, a, b, alpha, par);
}

/// `dst = alpha · a · b` (`acc == false`) or `dst += alpha · a · b` (`acc == true`) on one
/// thread, for small operands that sit in L1/L2 (the polynomial kernels' per-chunk products).
/// Shapes as [`matmul`]. f32 on an AVX2/AVX-512 CPU runs the register-tiled kernels
/// ([`crate::simd::tile_gemm`], no packing) in whichever orientation puts the longer unit-stride
/// side in the vector lanes — `dst` directly when `dst` and `b` are row-major, `dstᵀ = bᵀ aᵀ` when
/// `dst` and `a` are column-major — and falls back to faer's one-thread product otherwise (other
/// strides, f64, no SIMD). Panics on mismatched shapes.
#[inline]
pub fn matmul_small<T: Scalar>(dst: MatMut<'_, T>, acc: bool, a: MatRef<'_, T>, b: MatRef<'_, T>, alpha: T) {
    use crate::simd::{tile_gemm, Level, Strided};
    assert!(dst.nrows() == a.nrows() && dst.ncols() == b.ncols() && a.ncols() == b.nrows(), "matmul_small: shapes");
    let (m, n, k) = (dst.nrows(), dst.ncols(), a.ncols());
    let level = Level::detect();
    if is_f32::<T>() && level != Level::Generic && m > 0 && n > 0 {
        let st = |rs: isize, cs: isize| (rs >= 0 && cs >= 0).then_some((rs as usize, cs as usize));
        let (sa, sb, sc) = (
            st(a.row_stride(), a.col_stride()),
            st(b.row_stride(), b.col_stride()),
            st(dst.row_stride(), dst.col_stride()),
        );
        if let (Some(sa), Some(sb), Some(sc)) = (sa, sb, sc) {
            // lanes filled by a side of `len` values: len / (registers · 16), 0 when not unit-stride
            let fill = |ok: bool, len: usize| if ok { len as f64 / (len.div_ceil(16) * 16) as f64 } else { 0.0 };
            let direct = fill(sb.1 == 1 && sc.1 == 1, n);
            let transposed = fill(sa.0 == 1 && sc.0 == 1, m);
            let (ap, bp) = (a.as_ptr() as *const f32, b.as_ptr() as *const f32);
            let cp = dst.as_ptr_mut() as *mut f32;
            let al = alpha.as_f64() as f32;
            // SAFETY: T is f32 (is_f32); faer's views address valid elements at these strides
            // (non-negative, checked), dst (a MatMut) does not alias a or b, and the level is
            // this CPU's (Level::detect).
            unsafe {
                if direct > 0.0 && direct >= transposed {
                    let a = Strided { ptr: ap, rs: sa.0, cs: sa.1 };
                    if tile_gemm(level, m, n, k, a, bp, sb.0, cp, sc.0, al, acc) {
                        return;
                    }
                } else if transposed > 0.0 {
                    // dstᵀ [n, m] = bᵀ aᵀ: bᵀ(j, p) = b(p, j), aᵀ row-major with row stride a's column stride
                    let bt = Strided { ptr: bp, rs: sb.1, cs: sb.0 };
                    if tile_gemm(level, n, m, k, bt, ap, sa.1, cp, sc.1, al, acc) {
                        return;
                    }
                }
            }
        }
    }
    matmul(dst, acc, a, b, alpha, Par::Seq);
}

/// Parallel products at least this large (`m·n·k`) are split over the threads by [`matmul`]
/// itself; smaller ones go to faer as asked.
const PARALLEL_MIN: usize = 1 << 20;

/// `dst (+)= alpha·a·b` as `threads` one-thread faer products on parts of `dst`: split along its
/// longer side, `a`'s rows or `b`'s columns going with each part.
fn split_seq<T: Scalar>(dst: MatMut<'_, T>, acc: bool, a: MatRef<'_, T>, b: MatRef<'_, T>, alpha: T, threads: usize) {
    let beta = if acc { Accum::Add } else { Accum::Replace };
    let (m, n) = (dst.nrows(), dst.ncols());
    let rows = m >= n;
    let len = if rows { m } else { n };
    let part = len.div_ceil(threads).next_multiple_of(16).min(len);
    let parts = len.div_ceil(part);
    let mut pieces = Vec::with_capacity(parts);
    let mut rest = dst;
    for i in 0..parts {
        let take = part.min(len - i * part);
        let (p, r) = if rows { rest.split_at_row_mut(take) } else { rest.split_at_col_mut(take) };
        pieces.push((i * part, take, p));
        rest = r;
    }
    pieces.into_par_iter().for_each(|(start, take, p)| {
        if rows {
            faer::linalg::matmul::matmul(p, beta, a.subrows(start, take), b, alpha, Par::Seq)
        } else {
            faer::linalg::matmul::matmul(p, beta, a, b.subcols(start, take), alpha, Par::Seq)
        }
    });
}

/// The f32 product on this CPU's SIMD level ([`crate::simd::packed::gemm`]) when `T` is f32, the
/// product is large and the strides allow (non-negative; `dst` with a unit stride in one
/// direction, transposing the product when it is column-major): returns `None` when done, else
/// hands `dst` back for faer.
fn packed_f32<'a, T: Scalar>(
    dst: MatMut<'a, T>,
    acc: bool,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    alpha: T,
    par: Par,
) -> Option<MatMut<'a, T>> {
    use crate::simd::{packed, Level, Strided};
    let (m, n, k) = (dst.nrows(), dst.ncols(), a.ncols());
    if !is_f32::<T>() || m < 8 || n < 8 || k == 0 {
        return Some(dst);
    }
    let level = Level::detect();
    if level == Level::Generic {
        return Some(dst);
    }
    let st = |rs: isize, cs: isize| (rs >= 0 && cs >= 0).then_some((rs as usize, cs as usize));
    let (Some(sa), Some(sb)) = (st(a.row_stride(), a.col_stride()), st(b.row_stride(), b.col_stride())) else {
        return Some(dst);
    };
    let (rs_c, cs_c) = (dst.row_stride(), dst.col_stride());
    let parallel = !matches!(par, Par::Seq);
    let al = alpha.as_f64() as f32;
    let (ap, bp) = (a.as_ptr() as *const f32, b.as_ptr() as *const f32);
    let cp = dst.as_ptr_mut() as *mut f32;
    // SAFETY: T is f32 (is_f32), so the views' data are f32; faer's views address valid elements
    // at these strides, and dst (a MatMut) does not alias a or b.
    let done = unsafe {
        if cs_c == 1 && rs_c >= 0 {
            let a = Strided { ptr: ap, rs: sa.0, cs: sa.1 };
            let b = Strided { ptr: bp, rs: sb.0, cs: sb.1 };
            packed::gemm(level, m, n, k, a, b, cp, rs_c as usize, al, acc, parallel, None)
        } else if rs_c == 1 && cs_c >= 0 {
            // column-major C: Cᵀ = Bᵀ Aᵀ is row-major
            let a2 = Strided { ptr: bp, rs: sb.1, cs: sb.0 };
            let b2 = Strided { ptr: ap, rs: sa.1, cs: sa.0 };
            packed::gemm(level, n, m, k, a2, b2, cp, cs_c as usize, al, acc, parallel, None)
        } else {
            false
        }
    };
    if done {
        None
    } else {
        Some(dst)
    }
}

/// The parallelism to use for large whole-sequence GEMMs: all of rayon's threads.
#[inline]
pub fn par_all() -> Par {
    let t = rayon::current_num_threads();
    if t <= 1 {
        Par::Seq
    } else {
        Par::rayon(t)
    }
}

/// `y = x · Wᵀ (+ b)`: a linear layer on row-major `x [rows, in]`, `w [out, in]` (HF layout),
/// optional bias `[out]`; returns `y [rows, out]`.
pub fn linear<T: Scalar>(x: &[T], rows: usize, w: &[T], out: usize, inp: usize, bias: Option<&[T]>) -> Vec<T> {
    debug_assert_eq!(x.len(), rows * inp);
    debug_assert_eq!(w.len(), out * inp);
    let mut y = vec![T::zero(); rows * out];
    matmul(rm_mut(&mut y, rows, out), false, rm(x, rows, inp), rm(w, out, inp).transpose(), T::one(), par_all());
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(out) {
            for (yi, bi) in row.iter_mut().zip(b) {
                *yi += *bi;
            }
        }
    }
    y
}

#[allow(clippy::too_many_arguments)]
/// Backward of [`linear`]: given `dy [rows, out]`, returns `dx [rows, in] = dy · W` and
/// accumulates `dw [out, in] += dyᵀ · x` and `db [out] += Σ_rows dy`.
pub fn linear_backward<T: Scalar>(
    x: &[T],
    rows: usize,
    w: &[T],
    out: usize,
    inp: usize,
    dy: &[T],
    dw: &mut [T],
    db: Option<&mut [T]>,
) -> Vec<T> {
    let mut dx = vec![T::zero(); rows * inp];
    matmul(rm_mut(&mut dx, rows, inp), false, rm(dy, rows, out), rm(w, out, inp), T::one(), par_all());
    matmul(rm_mut(dw, out, inp), true, rm(dy, rows, out).transpose(), rm(x, rows, inp), T::one(), par_all());
    if let Some(db) = db {
        for row in dy.chunks_exact(out) {
            for (d, g) in db.iter_mut().zip(row) {
                *d += *g;
            }
        }
    }
    dx
}

/// Frobenius norm of a slice, accumulated in f64.
pub fn norm<T: Scalar>(x: &[T]) -> f64 {
    x.iter().map(|v| v.as_f64() * v.as_f64()).sum::<f64>().sqrt()
}

/// Relative error `‖x − y‖_F / ‖y‖_F` (MATH §1), in f64; `0` when both are zero,
/// `inf` when only `y` is zero.
pub fn rel_err<T: Scalar, U: Scalar>(x: &[T], y: &[U]) -> f64 {
    assert_eq!(x.len(), y.len(), "rel_err: length mismatch");
    let num: f64 = x.iter().zip(y).map(|(a, b)| (a.as_f64() - b.as_f64()).powi(2)).sum::<f64>().sqrt();
    let den = norm(y);
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        num / den
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect()
    }

    /// A product into a strided row-major view writes exactly its rows' first `cols` values
    /// (faer 0.24.4's own constructor for this view swaps the strides and writes past them).
    #[test]
    fn strided_row_major_destination_keeps_the_gaps() {
        let (m, n, k, stride) = (5, 8, 3, 9);
        let (a, b) = (data(m * k, 1), data(k * n, 2));
        let mut c = data(m * stride, 3);
        let before = c.clone();
        matmul(rm_strided_mut(&mut c, m, n, stride), true, rm(&a, m, k), rm(&b, k, n), 1.0, Par::Seq);
        for i in 0..m {
            for j in 0..stride {
                let want = if j < n {
                    before[i * stride + j] + (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f64>()
                } else {
                    before[i * stride + j]
                };
                assert!((c[i * stride + j] - want).abs() < 1e-12, "({i}, {j}): {} vs {want}", c[i * stride + j]);
            }
        }
    }

    /// `matmul_small` in f32 against the f64 triple loop, in every orientation it picks: `dst`
    /// row-major with `b` row-major (direct; also with row strides wider than the rows), `dst` and
    /// `a` column-major (transposed), and strides that fit neither (faer); widths around the
    /// register sizes, `k = 0`, `acc` both ways. (On a CPU without AVX2 every case is faer's.)
    #[test]
    fn small_products_match_the_triple_loop_in_every_orientation() {
        for (m, n, k) in [(17, 64, 153), (153, 64, 17), (153, 16, 64), (64, 17, 153), (1, 1, 1), (7, 33, 0), (20, 5, 9)]
        {
            for layout in 0..4 {
                for acc in [false, true] {
                    let (a64, b64, c64) = (data(m * k, 4), data(k * n, 5), data(m * n, 6));
                    let f = |x: &[f64]| x.iter().map(|v| *v as f32).collect::<Vec<f32>>();
                    let (a, b, mut c) = (f(&a64), f(&b64), f(&c64));
                    let alpha = 0.75f32;
                    // a, b, c hold row-major data of their shapes; views pick the layout
                    match layout {
                        0 => matmul_small(rm_mut(&mut c, m, n), acc, rm(&a, m, k), rm(&b, k, n), alpha),
                        1 => {
                            // column-major dst and a: store their transposes row-major
                            let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
                            let mut ct: Vec<f32> = (0..n * m).map(|x| c[(x % m) * n + x / m]).collect();
                            matmul_small(
                                rm_mut(&mut ct, n, m).transpose_mut(),
                                acc,
                                rm(&at, k, m).transpose(),
                                rm(&b, k, n),
                                alpha,
                            );
                            for i in 0..m {
                                for j in 0..n {
                                    c[i * n + j] = ct[j * m + i];
                                }
                            }
                        }
                        3 => {
                            // dst and b row-major with row strides wider than their rows (the
                            // state products' layout): direct, the gaps kept
                            let (sc, sb) = (n + 3, n + 5);
                            let mut cs = vec![f32::NAN; m * sc];
                            let mut bs = vec![f32::NAN; k * sb];
                            for i in 0..m {
                                cs[i * sc..i * sc + n].copy_from_slice(&c[i * n..(i + 1) * n]);
                            }
                            for p in 0..k {
                                bs[p * sb..p * sb + n].copy_from_slice(&b[p * n..(p + 1) * n]);
                            }
                            matmul_small(
                                rm_strided_mut(&mut cs, m, n, sc),
                                acc,
                                rm(&a, m, k),
                                rm_strided(&bs, k, n, sb),
                                alpha,
                            );
                            for i in 0..m {
                                assert!(
                                    cs[i * sc + n..(i + 1) * sc].iter().all(|x| x.is_nan()),
                                    "gap of row {i} written"
                                );
                                c[i * n..(i + 1) * n].copy_from_slice(&cs[i * sc..i * sc + n]);
                            }
                        }
                        _ => {
                            // b column-major, dst row-major: neither orientation (faer)
                            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
                            matmul_small(rm_mut(&mut c, m, n), acc, rm(&a, m, k), rm(&bt, n, k).transpose(), alpha);
                        }
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k).map(|p| a64[i * k + p] * b64[p * n + j]).sum();
                            let want = 0.75 * dot + if acc { c64[i * n + j] } else { 0.0 };
                            let got = c[i * n + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-5 * (1.0 + k as f64),
                                "{m}x{n}x{k} layout {layout} acc {acc} ({i}, {j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
