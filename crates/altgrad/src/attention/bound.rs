//! Row shift, score bound, error bounds and degree choice (MATH §3; AS23 Lemma 3.3–3.4 and
//! Def 3.2). The cost model is [`super::cost`]; the method chosen from these numbers is
//! [`super::method`].
//!
//! Everything here is O(n·d) per head and computed in f64.

use super::view::Rows;
use crate::linalg::Scalar;
use crate::{Error, Result};

/// Largest degree the automatic choice ([`super::method::Policy::choose`]) considers.
pub const MAX_AUTO_DEGREE: usize = 8;

/// The key means each query row is shifted by (MATH §3 "Row shift"): `k [n, d]` row-major.
///
/// Returns `[1, d]` (the global mean `(1/n) Σ_j k_j`) without a mask, and `[n, d]` (the prefix
/// means `k̄_i = (1/(i+1)) Σ_{j≤i} k_j`, never a look-ahead) under the causal mask. Sums are
/// accumulated in f64. Panics if `k.len() != n * d`.
pub fn key_means<T: Scalar>(k: &[T], n: usize, d: usize, causal: bool) -> Vec<T> {
    assert_eq!(k.len(), n * d, "key_means: k has the wrong length");
    let mut acc = vec![0.0f64; d];
    if causal {
        let mut out = vec![T::zero(); n * d];
        crate::simd::dispatch(
            #[inline(always)]
            || {
                for (i, (row, orow)) in k.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
                    let inv = 1.0 / (i + 1) as f64;
                    for ((a, x), o) in acc.iter_mut().zip(row).zip(orow) {
                        *a += x.as_f64();
                        *o = T::from_f64(*a * inv);
                    }
                }
            },
        );
        out
    } else {
        for row in k.chunks_exact(d) {
            for (a, x) in acc.iter_mut().zip(row) {
                *a += x.as_f64();
            }
        }
        let inv = if n == 0 { 0.0 } else { 1.0 / n as f64 };
        acc.iter().map(|a| T::from_f64(a * inv)).collect()
    }
}

/// Row shifts `m_i = τ q_i·k̄_i` (MATH §3): `q [n, d]`, `kbar` from [`key_means`] (`[1, d]` is
/// used for every row, `[n, d]` row by row), `scale = τ`. Returns `m [n]` (dot products in f64).
/// Panics on inconsistent lengths.
pub fn row_shift<T: Scalar>(q: &[T], kbar: &[T], n: usize, d: usize, scale: f64) -> Vec<T> {
    assert_eq!(q.len(), n * d, "row_shift: q has the wrong length");
    row_shift_rows(Rows::contiguous(q, n, d), kbar, scale)
}

/// [`row_shift`] of a strided view `q [n, d]`.
pub(crate) fn row_shift_rows<T: Scalar>(q: Rows<'_, T>, kbar: &[T], scale: f64) -> Vec<T> {
    let (n, d) = (q.rows(), q.cols());
    assert!(kbar.len() == d || kbar.len() == n * d, "row_shift: kbar has the wrong length");
    let per_row = kbar.len() == n * d && n > 1;
    let mut m = vec![T::zero(); n];
    // a plain loop: a closure passed to an iterator adapter would not inherit dispatch's ISA
    crate::simd::dispatch(
        #[inline(always)]
        || {
            for (i, mi) in m.iter_mut().enumerate() {
                q.prefetch_ahead(i);
                let kb = if per_row { &kbar[i * d..(i + 1) * d] } else { &kbar[..d] };
                *mi = T::from_f64(scale * dot_f64(q.row(i), kb));
            }
        },
    );
    m
}

/// `Σ_c a_c b_c` in f64, in eight interleaved partial sums (added pairwise at the end), so that the
/// products vectorize and the additions are not one chain: for the row shifts and log-normalizers
/// of every row, where an in-order sum was a chain of `d` dependent additions per row.
#[inline(always)]
pub(crate) fn dot_f64<T: Scalar>(a: &[T], b: &[T]) -> f64 {
    const L: usize = 8;
    let n = a.len().min(b.len());
    let split = n / L * L;
    let mut acc = [0.0f64; L];
    for (x, y) in a[..split].chunks_exact(L).zip(b[..split].chunks_exact(L)) {
        for l in 0..L {
            acc[l] += x[l].as_f64() * y[l].as_f64();
        }
    }
    let mut rest = 0.0;
    for (x, y) in a[split..n].iter().zip(&b[split..n]) {
        rest += x.as_f64() * y.as_f64();
    }
    let mut w = L / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0] + rest
}

/// The two score bounds of one head (MATH §3 "Bound and degree"), from [`score_bounds`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScoreBounds {
    /// Bound on the shifted scores `|s_ij − m_i|` (the kernels with `center = true`).
    pub shifted: f64,
    /// Bound on the unshifted scores `|s_ij|` (`center = false`).
    pub unshifted: f64,
}

impl ScoreBounds {
    /// The smaller bound and whether it is the shifted one (`center = true`; ties go to the shift).
    pub fn best(&self) -> (f64, bool) {
        if self.shifted <= self.unshifted {
            (self.shifted, true)
        } else {
            (self.unshifted, false)
        }
    }

    /// The bound of the scores the kernels approximate with row shift `center`.
    pub fn for_center(&self, center: bool) -> f64 {
        if center {
            self.shifted
        } else {
            self.unshifted
        }
    }
}

/// Per-row bounds `R` on every score the polynomial approximates, for one head (MATH §3 "Bound and
/// degree"): `q [n, d]`, `k [n, d]` (strided views), `scale = τ`, in O(n·d) and f64. Each bound is
/// the largest of its per-row bounds `R_i`, which pair `‖q_i‖` with the keys row `i` may see (a
/// prefix under the causal mask), so it is never above the product of the global maxima:
///
/// - shifted (`s_ij − m_i`, `m_i = τ q_i·k̄_i`): `R_i = τ ‖q_i‖ (max_{j≤i} ‖k_j − c‖ + ‖k̄_i − c‖)`
///   with `c` the global key mean and `k̄_i` the means of [`key_means`] (without a mask `k̄_i = c` and
///   the second term is 0); it bounds `τ ‖q_i‖ ‖k_j − k̄_i‖ ≥ |s_ij − m_i|` by Cauchy–Schwarz and the
///   triangle inequality. This is the score the kernels approximate: they form it as
///   `τ q_i·(k_j − c') − m'_i` with their own reference point `c'` (MATH §3 "Reference point"), the
///   same number for any `c'`.
/// - unshifted: `R_i = τ ‖q_i‖ max_{j≤i} ‖k_j‖`.
///
/// Under the causal mask the unshifted bound can be the smaller one (row 0's prefix mean is `k_0`
/// itself, and early rows see few keys); [`ScoreBounds::best`] picks it.
///
/// Panics if `q` and `k` differ in rows or width.
pub fn score_bounds<T: Scalar>(q: Rows<'_, T>, k: Rows<'_, T>, scale: f64, causal: bool) -> ScoreBounds {
    let (n, d) = (q.rows(), q.cols());
    assert!(k.rows() == n && k.cols() == d, "score_bounds: q and k differ in shape");
    if n == 0 {
        return ScoreBounds { shifted: 0.0, unshifted: 0.0 };
    }
    let norm = |x: &[T]| x.iter().map(|v| v.as_f64() * v.as_f64()).sum::<f64>().sqrt();
    let mut c = vec![0.0f64; d];
    for j in 0..n {
        for (a, x) in c.iter_mut().zip(k.row(j)) {
            *a += x.as_f64();
        }
    }
    c.iter_mut().for_each(|a| *a /= n as f64);
    let dist_c = |x: &[T]| x.iter().zip(&c).map(|(a, b)| (a.as_f64() - b) * (a.as_f64() - b)).sum::<f64>().sqrt();
    let (mut shifted, mut unshifted) = (0.0f64, 0.0f64);
    if causal {
        let (mut kmax_c, mut kmax, mut acc) = (0.0f64, 0.0f64, vec![0.0f64; d]);
        for i in 0..n {
            let kr = k.row(i);
            kmax_c = kmax_c.max(dist_c(kr));
            kmax = kmax.max(norm(kr));
            let inv = 1.0 / (i + 1) as f64;
            let mut mean_c = 0.0f64;
            for ((a, x), cc) in acc.iter_mut().zip(kr).zip(&c) {
                *a += x.as_f64();
                mean_c += (*a * inv - cc) * (*a * inv - cc);
            }
            let qn = scale * norm(q.row(i));
            shifted = shifted.max(qn * (kmax_c + mean_c.sqrt()));
            unshifted = unshifted.max(qn * kmax);
        }
    } else {
        let kmax_c = (0..n).map(|j| dist_c(k.row(j))).fold(0.0, f64::max);
        let kmax = (0..n).map(|j| norm(k.row(j))).fold(0.0, f64::max);
        let qmax = scale * (0..n).map(|i| norm(q.row(i))).fold(0.0, f64::max);
        shifted = qmax * kmax_c;
        unshifted = qmax * kmax;
    }
    ScoreBounds { shifted, unshifted }
}

/// [`score_bounds`] of contiguous `q [n, d]`, `k [n, d]`: the shifted bound when `center`, else the
/// unshifted one.
///
/// Panics if `q` or `k` is not `n·d` long.
pub fn score_bound<T: Scalar>(q: &[T], k: &[T], n: usize, d: usize, scale: f64, causal: bool, center: bool) -> f64 {
    assert!(q.len() == n * d && k.len() == n * d, "score_bound: q or k has the wrong length");
    score_bounds(Rows::contiguous(q, n, d), Rows::contiguous(k, n, d), scale, causal).for_center(center)
}

/// Entrywise relative error bound of the attention matrix, `ε_A(R, g) = R^{g+1} e^{2R} / (g+1)!`
/// (MATH §3; from `|T_g(x) − eˣ| ≤ R^{g+1} e^R/(g+1)!` on `|x| ≤ R`). Dimensionless; `+∞` for
/// non-finite `R`. For the gradient of the polynomial model use `eps_a(R, g − 1)` (MATH §4).
pub fn eps_a(r_bound: f64, g: usize) -> f64 {
    if !r_bound.is_finite() {
        return f64::INFINITY;
    }
    let r_bound = r_bound.abs();
    // Π_{i ≤ g+1} (R/i) in a loop: no overflow of R^{g+1} or (g+1)! separately.
    let mut p = (2.0 * r_bound).exp();
    for i in 1..=g + 1 {
        p *= r_bound / i as f64;
    }
    p
}

/// Predicted bound on the output error relative to `‖V‖_∞`: `‖Õ − O‖_∞ ≤ 2ε_A/(1−ε_A) · ‖V‖_∞`
/// with `ε_A = eps_a(R, g)` (MATH §3; AS23 Def 3.2). `+∞` when `ε_A ≥ 1` (no guarantee).
pub fn output_bound(r_bound: f64, g: usize) -> f64 {
    let e = eps_a(r_bound, g);
    if e >= 1.0 {
        f64::INFINITY
    } else {
        2.0 * e / (1.0 - e)
    }
}

/// The smallest even degree `g ≥ 2`, `g ≤ max_degree`, with `eps_a(R, g) ≤ tol` (MATH §3), or
/// `None` if there is none (the head must then use exact attention).
pub fn choose_degree(r_bound: f64, tol: f64, max_degree: usize) -> Option<usize> {
    (2..=max_degree).step_by(2).find(|&g| eps_a(r_bound, g) <= tol)
}

/// Checks a user-chosen degree: it must be even and at least 2 (MATH §3 "Positivity").
///
/// Errors: [`Error::BadInput`] (input `"degree"`) for 0 or an odd degree.
pub fn validate_degree(g: usize) -> Result<()> {
    if g == 0 {
        return Err(Error::bad("degree", "degree must be at least 2 (T_0 = 1 ignores the scores); got 0"));
    }
    if g % 2 == 1 {
        return Err(Error::bad(
            "degree",
            format!("degree must be even: T_g has a real root for odd g, so denominators can vanish (got {g})"),
        ));
    }
    Ok(())
}

/// The largest `|s_ij| = τ |q_i·k_j|` over the pairs the mask allows (`j ≤ i` when `causal`), for
/// one head: `q [n, d]`, `k [n, d]`. Exact, O(n²·d) by tiles of 256 query rows (one GEMM each),
/// O(256·n) memory. For reports (`altgrad inspect`), not for the kernels.
pub fn max_abs_score<T: Scalar>(q: &[T], k: &[T], n: usize, d: usize, scale: f64, causal: bool) -> f64 {
    use crate::linalg::{matmul, rm, rm_mut};
    const TILE: usize = 256;
    let mut s = vec![T::zero(); TILE * n];
    let mut best = 0.0f64;
    let mut i0 = 0;
    while i0 < n {
        let br = TILE.min(n - i0);
        let cols = if causal { i0 + br } else { n };
        let st = &mut s[..br * cols];
        matmul(
            rm_mut(st, br, cols),
            false,
            rm(&q[i0 * d..(i0 + br) * d], br, d),
            rm(&k[..cols * d], cols, d).transpose(),
            T::from_f64(scale),
            faer::Par::Seq,
        );
        for r in 0..br {
            let lim = if causal { i0 + r + 1 } else { cols };
            for x in &st[r * cols..r * cols + lim] {
                best = best.max(x.as_f64().abs());
            }
        }
        i0 += br;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eps_a_matches_formula() {
        for &r in &[0.1f64, 0.5, 1.0, 2.0] {
            for g in 1..8usize {
                let fact: f64 = (1..=g + 1).map(|i| i as f64).product();
                let want = r.powi(g as i32 + 1) * (2.0 * r).exp() / fact;
                assert!((eps_a(r, g) - want).abs() <= 1e-14 * want);
            }
        }
        assert_eq!(output_bound(5.0, 2), f64::INFINITY);
    }

    #[test]
    fn degree_choice_is_smallest_even() {
        // R = 0.5: ε(2) ≈ 0.0566, ε(4) ≈ 7.1e-4, ε(6) ≈ 4.2e-6
        assert_eq!(choose_degree(0.5, 0.1, 8), Some(2));
        assert_eq!(choose_degree(0.5, 1e-3, 8), Some(4));
        assert_eq!(choose_degree(0.5, 1e-5, 8), Some(6));
        assert_eq!(choose_degree(0.5, 1e-30, 8), None);
        assert!(validate_degree(3).unwrap_err().to_string().contains("degree must be even"));
        assert!(validate_degree(0).is_err());
        assert!(validate_degree(4).is_ok());
    }

    #[test]
    fn prefix_means_never_look_ahead() {
        let k: Vec<f64> = (0..12).map(|i| (i * i) as f64).collect(); // n = 6, d = 2
        let m = key_means(&k, 6, 2, true);
        for i in 0..6 {
            for c in 0..2 {
                let want: f64 = (0..=i).map(|j| k[j * 2 + c]).sum::<f64>() / (i + 1) as f64;
                assert!((m[i * 2 + c] - want).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn bound_dominates_shifted_scores() {
        let (n, d, tau) = (9, 3, 0.6);
        let q: Vec<f64> = (0..n * d).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect();
        let k: Vec<f64> = (0..n * d).map(|i| ((i * 13 % 7) as f64 - 1.0) / 2.0).collect();
        for causal in [false, true] {
            let kb = key_means(&k, n, d, causal);
            let m = row_shift(&q, &kb, n, d, tau);
            let r = score_bound(&q, &k, n, d, tau, causal, true);
            let r0 = score_bound(&q, &k, n, d, tau, causal, false);
            for i in 0..n {
                for j in 0..if causal { i + 1 } else { n } {
                    let s: f64 = tau * (0..d).map(|c| q[i * d + c] * k[j * d + c]).sum::<f64>();
                    assert!((s - m[i]).abs() <= r + 1e-12);
                    assert!(s.abs() <= r0 + 1e-12);
                }
            }
            // never above the product of the global maxima (the bound before per-row pairing)
            let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
            let qmax = q.chunks(d).map(norm).fold(0.0, f64::max);
            assert!(r0 <= tau * qmax * k.chunks(d).map(norm).fold(0.0, f64::max) + 1e-12);
        }
    }
}
