//! Row shift, score bound, error bounds, degree choice, cost model and the per-head [`Policy`]
//! (MATH §3, §7; AS23 Lemma 3.3–3.4 and Def 3.2).
//!
//! Everything here is O(n·d) per head and computed in f64.

use super::features::feature_dim;
use super::poly::DEFAULT_CHUNK;
use super::view::Rows;
use crate::linalg::Scalar;
use crate::{Error, Result};

/// Largest degree [`Policy::choose`] considers.
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
        super::features::simd(
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
    (0..n)
        .map(|i| {
            let kb = if per_row { &kbar[i * d..(i + 1) * d] } else { &kbar[..d] };
            T::from_f64(scale * q.row(i).iter().zip(kb).map(|(a, b)| a.as_f64() * b.as_f64()).sum::<f64>())
        })
        .collect()
}

/// Bound `R` on every score the polynomial approximates, for one head (MATH §3 "Bound and
/// degree"): `q [n, d]`, `k [n, d]`, `scale = τ`.
///
/// - `center = true` (shifted scores `s_ij − m_i`):
///   `R = τ · max_i ‖q_i‖ · (max_j ‖k_j − c‖ + max_i ‖k̄_i − c‖)` with `c` the global key mean and
///   `k̄_i` the means of [`key_means`] (the second term is 0 without a mask); it bounds
///   `τ ‖q_i‖ ‖k_j − k̄_i‖ ≥ |s_ij − m_i|` by Cauchy–Schwarz and the triangle inequality, in O(nd).
///   This is the score the kernels approximate: they form it as `τ q_i·(k_j − c) − m'_i` with their
///   reference point `c` and `m'_i = τ q_i·(k̄_i − c)` (MATH §3 "Reference point"), the same number
///   for any `c`, so `R` bounds it whatever `c` they use.
/// - `center = false` (unshifted): `R = τ · max_i ‖q_i‖ · max_j ‖k_j‖`.
///
/// Panics if `q` or `k` is not `n·d` long.
pub fn score_bound<T: Scalar>(q: &[T], k: &[T], n: usize, d: usize, scale: f64, causal: bool, center: bool) -> f64 {
    assert!(q.len() == n * d && k.len() == n * d, "score_bound: q or k has the wrong length");
    let norm = |x: &[T]| x.iter().map(|v| v.as_f64() * v.as_f64()).sum::<f64>().sqrt();
    let qmax = q.chunks_exact(d).map(norm).fold(0.0, f64::max);
    let kterm = if center {
        let kd: Vec<f64> = k.iter().map(|x| x.as_f64()).collect();
        let c = key_means(&kd, n, d, false);
        let dist = |x: &[f64]| x.iter().zip(&c).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
        let kmax = kd.chunks_exact(d).map(dist).fold(0.0, f64::max);
        let mmax = if causal { key_means(&kd, n, d, true).chunks_exact(d).map(dist).fold(0.0, f64::max) } else { 0.0 };
        kmax + mmax
    } else {
        k.chunks_exact(d).map(norm).fold(0.0, f64::max)
    };
    scale * qmax * kterm
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

/// FLOPs of exact attention forward + backward for one head (MATH §7, FA2):
/// forward `2n²(d + d_v)`, backward with recompute `2n²(3d + 2d_v)` (so `14n²d` when `d = d_v`),
/// halved when causal.
pub fn exact_flops(n: usize, d: usize, dv: usize, causal: bool) -> f64 {
    let n = n as f64;
    let f = 2.0 * n * n * (4 * d + 3 * dv) as f64;
    if causal {
        f / 2.0
    } else {
        f
    }
}

/// FLOPs of polynomial attention forward + backward for one head (MATH §4, §7) as the kernels of
/// [`super::poly`] do it, with `e = d_v + 1` (values augmented by a ones column, so `z` rides with
/// `H`) and chunk `C = min(chunk, n)`:
///
/// - non-causal: GEMMs `2nr(5e + d_v)` (`H`, `num|den`, `dΨ_Q`, `dH`, `dΦ_K`, `dV`; `H` is kept
///   from the forward), feature work ≈ `18nr`;
/// - causal: GEMMs `2nr(6e + d_v)` (the backward rescans the state), intra-chunk
///   `2nC(4d + 3e)` (full C×C tiles), feature work ≈ `23nr`.
///
/// Total ≈ `12·n·r·d_v` (MATH §7) plus lower-order terms.
pub fn poly_flops(n: usize, d: usize, dv: usize, r: usize, causal: bool, chunk: usize) -> f64 {
    let (nf, rf, e, dvf) = (n as f64, r as f64, (dv + 1) as f64, dv as f64);
    if causal {
        let c = chunk.max(1).min(n.max(1)) as f64;
        2.0 * nf * rf * (6.0 * e + dvf) + 2.0 * nf * c * (4.0 * d as f64 + 3.0 * e) + 23.0 * nf * rf
    } else {
        2.0 * nf * rf * (5.0 * e + dvf) + 18.0 * nf * rf
    }
}

/// Working memory of the polynomial kernels for one head, in bytes, excluding inputs, outputs
/// and O(n + C·g) vectors: the `r×(d_v+1)` state and its gradient, and the chunk scratch of
/// [`super::poly::Head::scratch_len`] (centered): three `r×C` feature buffers (`Φᵀ`, `Ψᵀ`,
/// `dΦᵀ`), two `C×C` tiles (causal), the `C×(d_v+1)` value/gradient chunks and three `d×C`
/// transposed inputs (`elem` = 4 for f32, 8 for f64). O(C·r + r·d_v), never O(n·r).
pub fn poly_state_bytes(d: usize, dv: usize, r: usize, chunk: usize, elem: usize) -> usize {
    let (e, c) = (dv + 1, chunk.max(1));
    elem * (2 * r * e + 3 * c * r + 2 * c * c + 2 * c * e + 3 * c * d)
}

/// How a head's attention is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Exact tiled softmax attention (MATH §2).
    Exact,
    /// Polynomial attention with its exact gradient (MATH §4).
    Poly,
    /// The paper's Algorithm 1 (MATH §5).
    AltGrad,
}

impl Method {
    /// Lower-case name, as on the CLI and in JSON reports: `exact`, `poly`, `altgrad`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Exact => "exact",
            Method::Poly => "poly",
            Method::AltGrad => "altgrad",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The method chosen for one head and why (MATH §3 "Bound and degree", §7).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Policy {
    /// [`Method::Poly`] or [`Method::Exact`].
    pub method: Method,
    /// Degree `g` (Poly only).
    pub degree: Option<usize>,
    /// Feature width `r = C(d+g, g)` (Poly only).
    pub rank: Option<usize>,
    /// The score bound `R` the choice used ([`score_bound`]).
    pub bound: f64,
    /// [`output_bound`]`(R, g)` for Poly (relative to `‖V‖_∞`); 0 for Exact.
    pub predicted_rel_err: f64,
    /// One sentence saying why this method was chosen.
    pub reason: String,
}

impl Policy {
    /// Chooses the method of one head of length `n`, widths `d`, `d_v`, with score bound `bound`
    /// (`R`), tolerance `tol` on `ε_A`, and largest acceptable feature width `max_rank`.
    ///
    /// Poly is chosen only when an even degree `g ≤ MAX_AUTO_DEGREE` reaches `ε_A(R, g) ≤ tol`
    /// ([`choose_degree`]), its width `r(d, g) ≤ max_rank`, and [`poly_flops`] (chunk
    /// [`DEFAULT_CHUNK`]) is below [`exact_flops`]; otherwise Exact, with the failed condition in
    /// `reason`.
    pub fn choose(n: usize, d: usize, dv: usize, causal: bool, bound: f64, tol: f64, max_rank: usize) -> Policy {
        let exact = |reason: String| Policy {
            method: Method::Exact,
            degree: None,
            rank: None,
            bound,
            predicted_rel_err: 0.0,
            reason,
        };
        let Some(g) = choose_degree(bound, tol, MAX_AUTO_DEGREE) else {
            return exact(format!(
                "no even degree ≤ {MAX_AUTO_DEGREE} reaches ε_A ≤ {tol:e} at score bound R = {bound:.3} \
                 (ε_A(R, {MAX_AUTO_DEGREE}) = {:.2e})",
                eps_a(bound, MAX_AUTO_DEGREE)
            ));
        };
        let Some(r) = feature_dim(d, g).filter(|&r| r <= max_rank) else {
            return exact(format!(
                "degree {g} needs feature width r = C({d}+{g}, {g}) = {}, above max_rank = {max_rank}",
                feature_dim(d, g).map_or("overflow".to_string(), |r| r.to_string())
            ));
        };
        let (pf, ef) = (poly_flops(n, d, dv, r, causal, DEFAULT_CHUNK), exact_flops(n, d, dv, causal));
        if pf >= ef {
            return exact(format!(
                "polynomial attention (g = {g}, r = {r}) would cost {:.3e} FLOP vs {:.3e} for exact at n = {n}",
                pf, ef
            ));
        }
        Policy {
            method: Method::Poly,
            degree: Some(g),
            rank: Some(r),
            bound,
            predicted_rel_err: output_bound(bound, g),
            reason: format!(
                "R = {bound:.3}: degree {g} gives ε_A = {:.2e} ≤ {tol:e}, r = {r}, {:.1}× fewer FLOPs than exact",
                eps_a(bound, g),
                ef / pf
            ),
        }
    }
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
        }
    }

    #[test]
    fn policy_prefers_exact_when_short_or_unbounded() {
        let p = Policy::choose(128, 64, 64, true, 0.5, 1e-2, 1 << 20);
        assert_eq!(p.method, Method::Exact, "{}", p.reason);
        let p = Policy::choose(32768, 16, 16, true, 0.5, 1e-1, 1 << 20);
        assert_eq!(p.method, Method::Poly, "{}", p.reason);
        assert_eq!((p.degree, p.rank), (Some(2), Some(153)));
        let p = Policy::choose(32768, 16, 16, true, 8.0, 1e-3, 1 << 20);
        assert_eq!(p.method, Method::Exact);
        let p = Policy::choose(32768, 16, 16, true, 0.5, 1e-1, 100);
        assert_eq!(p.method, Method::Exact);
        assert!(p.reason.contains("max_rank"));
    }
}
