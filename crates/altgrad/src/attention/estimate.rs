//! Measured error of polynomial attention on a sample of query rows (MATH §3 "Measured
//! estimate"; issue 14). The a-priori bound `ε_A(R, g)` of MATH §3 is 10³–10⁶ loose on real
//! inputs (docs/RESULTS.md), so `auto` also *measures*: for a sample `S` of query rows it computes
//! exact softmax attention and the polynomial model directly (O(|S|·n·d) in f64, no feature map),
//! and compares them.
//!
//! Two errors are estimated, both relative Frobenius errors over all rows of the head:
//!
//! - `o`: `‖Õ − O‖_F / ‖O‖_F` (the head's output, MATH §3–4);
//! - `ds`: `‖dS̃ − dS‖_F / ‖dS‖_F`, the gradient of the scores for an upstream gradient `G` of
//!   i.i.d. standard normal entries (a fixed seed). `dS` carries every gradient of the head:
//!   `dQ = τ dS K`, `dK = τ dSᵀ Q`, and its rows are `ds_ij = w_ij (G_i·v_j − G_i·o_i)` with
//!   `w_ij = p_ij` (exact) or `T_{g−1}(s̃_ij)/den_i` (the polynomial model's exact gradient, MATH §4).
//!
//! **Sampling.** `top` rows with the largest `‖q_i‖` (the rows whose scores can be largest:
//! `|s̃_ij| ≤ τ‖q_i‖‖k_j − k̄_i‖`) are always measured; `uniform` more rows are drawn uniformly
//! without replacement from the rest. A row's squared error `e_i` and squared norm `y_i` add up
//! to the totals `E = Σ_i e_i`, `Y = Σ_i y_i`: the top rows count once, each uniform row stands for
//! `(n − top)/uniform` rows. The reported `upper` is `√((E_top + N·(ē + z·σ_e/√m)) /
//! max(Y_top + N·(ȳ − z·σ_y/√m), Y_top))` with `N = n − top`, `m` uniform rows, sample means `ē, ȳ`
//! and standard deviations `σ`, `z = 1.645`: a one-sided 95% normal-approximation upper
//! confidence bound on the relative error over all rows (exact when every row is sampled).

use super::features::taylor;
use crate::linalg::Scalar;

/// Rows of one head of a `[seq, heads, width]` tensor (or a contiguous `[seq, width]` one):
/// row `i` is `data[offset + i·stride ..][..width]`.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a, T> {
    /// The tensor's storage.
    pub data: &'a [T],
    /// Start of row 0.
    pub offset: usize,
    /// Distance between rows (`heads · width` for `[seq, heads, width]`).
    pub stride: usize,
    /// Row width.
    pub width: usize,
}

impl<'a, T: Scalar> Rows<'a, T> {
    /// Contiguous `[n, width]` rows.
    pub fn contiguous(data: &'a [T], width: usize) -> Self {
        Rows { data, offset: 0, stride: width, width }
    }
    /// Head `h` of `[seq, heads, width]`.
    pub fn head(data: &'a [T], heads: usize, width: usize, h: usize) -> Self {
        Rows { data, offset: h * width, stride: heads * width, width }
    }
    fn row(&self, i: usize) -> &'a [T] {
        let s = self.offset + i * self.stride;
        &self.data[s..s + self.width]
    }
}

/// What to estimate for one head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EstimateSpec {
    /// Sequence length `n`.
    pub seq_len: usize,
    /// Score scale τ.
    pub scale: f64,
    /// Causal mask `j ≤ i`.
    pub causal: bool,
    /// Row shift `m_i = τ q_i·k̄_i` (MATH §3), as `PolyOptions::center`.
    pub center: bool,
    /// Rows with the largest `‖q_i‖`, always measured.
    pub top: usize,
    /// Further rows drawn uniformly.
    pub uniform: usize,
    /// Seed of the row draw and of the upstream gradient `G`.
    pub seed: u64,
}

impl EstimateSpec {
    /// Defaults: 32 top rows, 96 uniform rows (128 in all, O(128·n·d) per head), seed 0.
    pub fn new(seq_len: usize, scale: f64, causal: bool, center: bool) -> Self {
        EstimateSpec { seq_len, scale, causal, center, top: 32, uniform: 96, seed: 0 }
    }
}

/// The measured error of one degree on one head.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ErrorEstimate {
    /// Degree `g`.
    pub degree: usize,
    /// Estimate of `‖Õ − O‖_F/‖O‖_F` over all rows (point estimate).
    pub rel_err_o: f64,
    /// Estimate of `‖dS̃ − dS‖_F/‖dS‖_F` over all rows for a standard normal `G` (point estimate).
    pub rel_err_ds: f64,
    /// One-sided 95% upper confidence bound on the larger of the two (see the module docs).
    pub upper: f64,
    /// Rows measured.
    pub rows: usize,
}

/// SplitMix64: a small deterministic generator for the row draw and `G`.
struct Mix(u64);
impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        (-2.0 * self.unit().ln()).sqrt() * (std::f64::consts::TAU * self.unit()).cos()
    }
}

/// The sampled rows: `(row, is_top)`, top rows first.
fn sample_rows<T: Scalar>(q: &Rows<T>, spec: &EstimateSpec) -> Vec<(usize, bool)> {
    let n = spec.seq_len;
    let mut by_norm: Vec<(f64, usize)> =
        (0..n).map(|i| (q.row(i).iter().map(|x| x.as_f64() * x.as_f64()).sum::<f64>(), i)).collect();
    by_norm.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let top = spec.top.min(n);
    let mut rows: Vec<(usize, bool)> = by_norm[..top].iter().map(|&(_, i)| (i, true)).collect();
    let mut rest: Vec<usize> = by_norm[top..].iter().map(|&(_, i)| i).collect();
    let m = spec.uniform.min(rest.len());
    let mut rng = Mix(spec.seed ^ 0x0005_EED0_FE57);
    for t in 0..m {
        let j = t + (rng.next() % (rest.len() - t) as u64) as usize;
        rest.swap(t, j);
        rows.push((rest[t], false));
    }
    rows
}

/// Per-row squared errors and squared norms for every degree: `[degree][(e_o, y_o, e_ds, y_ds)]`.
#[allow(clippy::type_complexity)]
fn row_errors<T: Scalar>(
    q: &Rows<T>,
    k: &Rows<T>,
    v: &Rows<T>,
    spec: &EstimateSpec,
    degrees: &[usize],
    rows: &[(usize, bool)],
) -> Vec<Vec<[f64; 4]>> {
    let (n, d, dv, tau) = (spec.seq_len, q.width, v.width, spec.scale);
    // key means: global, or prefix sums for the causal prefix means
    let mut ksum = vec![0.0f64; d];
    let mut prefix: Vec<f64> = if spec.causal { vec![0.0; n * d] } else { Vec::new() };
    for j in 0..n {
        for (c, x) in k.row(j).iter().enumerate() {
            ksum[c] += x.as_f64();
            if spec.causal {
                prefix[j * d + c] = ksum[c];
            }
        }
    }
    let mut rng = Mix(spec.seed ^ 0x60A5_51A4);
    let mut out = vec![Vec::with_capacity(rows.len()); degrees.len()];
    let mut s = vec![0.0f64; n];
    let mut vd: Vec<Vec<f64>> = Vec::new();
    for &(i, _) in rows {
        let keys = if spec.causal { i + 1 } else { n };
        let qi: Vec<f64> = q.row(i).iter().map(|x| x.as_f64()).collect();
        let m = if spec.center {
            let (sum, cnt) =
                if spec.causal { (&prefix[i * d..(i + 1) * d], (i + 1) as f64) } else { (&ksum[..], n as f64) };
            tau * qi.iter().zip(sum).map(|(a, b)| a * b / cnt).sum::<f64>()
        } else {
            0.0
        };
        let mut smax = f64::NEG_INFINITY;
        for (j, sj) in s[..keys].iter_mut().enumerate() {
            *sj = tau * qi.iter().zip(k.row(j)).map(|(a, b)| a * b.as_f64()).sum::<f64>() - m;
            smax = smax.max(*sj);
        }
        let gi: Vec<f64> = (0..dv).map(|_| rng.normal()).collect();
        // g_i · v_j for every key
        vd.clear();
        let gv: Vec<f64> =
            (0..keys).map(|j| gi.iter().zip(v.row(j)).map(|(a, b)| a * b.as_f64()).sum::<f64>()).collect();
        // exact: p_ij = exp(s_ij − max) / Σ
        let p: Vec<f64> = s[..keys].iter().map(|x| (x - smax).exp()).collect();
        let psum: f64 = p.iter().sum();
        let mut o = vec![0.0f64; dv];
        for (j, pj) in p.iter().enumerate() {
            for (oc, vc) in o.iter_mut().zip(v.row(j)) {
                *oc += pj / psum * vc.as_f64();
            }
        }
        let go: f64 = gi.iter().zip(&o).map(|(a, b)| a * b).sum();
        let ds_exact: Vec<f64> = p.iter().zip(&gv).map(|(pj, gvj)| pj / psum * (gvj - go)).collect();
        let y_o: f64 = o.iter().map(|x| x * x).sum();
        let y_ds: f64 = ds_exact.iter().map(|x| x * x).sum();
        for (di, &g) in degrees.iter().enumerate() {
            let a: Vec<f64> = s[..keys].iter().map(|x| taylor(g, *x)).collect();
            let den: f64 = a.iter().sum();
            let mut ot = vec![0.0f64; dv];
            for (j, aj) in a.iter().enumerate() {
                for (oc, vc) in ot.iter_mut().zip(v.row(j)) {
                    *oc += aj / den * vc.as_f64();
                }
            }
            let got: f64 = gi.iter().zip(&ot).map(|(a, b)| a * b).sum();
            let e_o: f64 = ot.iter().zip(&o).map(|(a, b)| (a - b) * (a - b)).sum();
            let e_ds: f64 = s[..keys]
                .iter()
                .zip(&gv)
                .zip(&ds_exact)
                .map(|((x, gvj), de)| {
                    let w = if g == 0 { 0.0 } else { taylor(g - 1, *x) / den };
                    let dt = w * (gvj - got);
                    (dt - de) * (dt - de)
                })
                .sum();
            out[di].push([e_o, y_o, e_ds, y_ds]);
        }
    }
    out
}

/// Relative error (point estimate, upper bound) from per-row squared errors `e` and norms `y`.
fn combine(n: usize, rows: &[(usize, bool)], e: &[f64], y: &[f64]) -> (f64, f64) {
    const Z: f64 = 1.645;
    let (mut et, mut yt) = (0.0, 0.0);
    let (mut eu, mut yu): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    for ((&(_, top), ei), yi) in rows.iter().zip(e).zip(y) {
        if top {
            et += ei;
            yt += yi;
        } else {
            eu.push(*ei);
            yu.push(*yi);
        }
    }
    let tops = rows.iter().filter(|r| r.1).count();
    let rest = (n - tops) as f64;
    let m = eu.len();
    if m == 0 {
        let r = if yt > 0.0 { (et / yt).sqrt() } else { 0.0 };
        return (r, r);
    }
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let sd = |x: &[f64], mu: f64| {
        if x.len() < 2 {
            0.0
        } else {
            (x.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
        }
    };
    let (me, my) = (mean(&eu), mean(&yu));
    let exhaustive = tops + m == n;
    let (se, sy) =
        if exhaustive { (0.0, 0.0) } else { (sd(&eu, me) / (m as f64).sqrt(), sd(&yu, my) / (m as f64).sqrt()) };
    let point_y = yt + rest * my;
    let point = if point_y > 0.0 { ((et + rest * me) / point_y).sqrt() } else { 0.0 };
    let up_y = (yt + rest * (my - Z * sy)).max(yt);
    let upper = if up_y > 0.0 { ((et + rest * (me + Z * se)) / up_y).sqrt() } else { f64::INFINITY };
    (point, upper)
}

/// Measures the polynomial method's error on one head for each degree in `degrees` (each even,
/// ≥ 2): `q`, `k` rows of width `d`, `v` rows of width `d_v`, `spec.seq_len` rows each. Returns
/// one [`ErrorEstimate`] per degree, in order. O((top + uniform)·n·(d + d_v·|degrees|)) time, O(n)
/// memory (plus `n·d` for the causal prefix sums), all in f64.
///
/// Panics when a row view reaches past its data or a degree is 0 (callers validate degrees).
pub fn estimate_poly_error<T: Scalar>(
    q: &Rows<T>,
    k: &Rows<T>,
    v: &Rows<T>,
    spec: &EstimateSpec,
    degrees: &[usize],
) -> Vec<ErrorEstimate> {
    assert!(degrees.iter().all(|&g| g >= 1), "estimate_poly_error: degree 0");
    let rows = sample_rows(q, spec);
    let per = row_errors(q, k, v, spec, degrees, &rows);
    degrees
        .iter()
        .zip(per)
        .map(|(&g, r)| {
            let col = |c: usize| r.iter().map(|x| x[c]).collect::<Vec<f64>>();
            let (po, uo) = combine(spec.seq_len, &rows, &col(0), &col(1));
            let (pd, ud) = combine(spec.seq_len, &rows, &col(2), &col(3));
            ErrorEstimate { degree: g, rel_err_o: po, rel_err_ds: pd, upper: uo.max(ud), rows: rows.len() }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, w: usize, seed: u64, amp: f64) -> Vec<f64> {
        let mut r = Mix(seed);
        (0..n * w).map(|_| amp * r.normal()).collect()
    }

    /// With every row sampled the estimate is the exact relative error of the output, computed
    /// here independently from the O(n²) materialized forms of `naive`.
    #[test]
    fn exhaustive_sample_equals_true_error() {
        use super::super::naive;
        use super::super::AttnShape;
        let (n, d) = (40, 4);
        let (q, k, v) = (data(n, d, 1, 0.7), data(n, d, 2, 0.7), data(n, d, 3, 1.0));
        let s = AttnShape::new(n, 1, 1, d);
        for causal in [false, true] {
            let tau = 0.5;
            let mut spec = EstimateSpec::new(n, tau, causal, true);
            spec.top = 5;
            spec.uniform = n;
            let exact = naive::forward(&q, &k, &v, &s, causal, tau);
            for g in [2usize, 4] {
                let approx =
                    naive::poly_forward(&q, &k, &v, &s, &naive::Poly { causal, scale: tau, degree: g, center: true });
                let num: f64 = approx.iter().zip(&exact).map(|(a, b)| (a - b) * (a - b)).sum();
                let den: f64 = exact.iter().map(|b| b * b).sum();
                let truth = (num / den).sqrt();
                let est = estimate_poly_error(
                    &Rows::contiguous(&q, d),
                    &Rows::contiguous(&k, d),
                    &Rows::contiguous(&v, d),
                    &spec,
                    &[g],
                )[0];
                assert_eq!(est.rows, n);
                assert!(
                    (est.rel_err_o - truth).abs() <= 1e-12 * truth.max(1e-300),
                    "{causal} g={g}: {est:?} vs {truth}"
                );
                assert!(est.upper >= est.rel_err_o);
            }
        }
    }

    #[test]
    fn error_falls_with_degree_and_sample_is_deterministic() {
        let (n, d) = (300, 8);
        let (q, k, v) = (data(n, d, 4, 0.5), data(n, d, 5, 0.5), data(n, d, 6, 1.0));
        let spec = EstimateSpec::new(n, 1.0 / (d as f64).sqrt(), true, true);
        let (qr, kr, vr) = (Rows::contiguous(&q, d), Rows::contiguous(&k, d), Rows::contiguous(&v, d));
        let e = estimate_poly_error(&qr, &kr, &vr, &spec, &[2, 4, 6]);
        assert!(e[0].rel_err_o > e[1].rel_err_o && e[1].rel_err_o > e[2].rel_err_o, "{e:?}");
        assert!(e[0].rel_err_ds > e[2].rel_err_ds, "{e:?}");
        assert_eq!(e, estimate_poly_error(&qr, &kr, &vr, &spec, &[2, 4, 6]));
        assert_eq!(e[0].rows, 128);
    }
}
