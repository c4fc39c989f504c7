//! Measured error of polynomial attention on a sample of query rows (MATH §3 "Measured
//! estimate"; issue 14). The a-priori bound `ε_A(R, g)` of MATH §3 is 10³–10⁶ loose on real
//! inputs (docs/RESULTS.md), so `auto` also *measures*: for a sample `S` of query rows it computes
//! exact softmax attention and the polynomial model directly (O(|S|·n·d) in f64 GEMMs, no feature map),
//! and compares them.
//!
//! Two errors are estimated, both relative Frobenius errors over all rows of the head; the first
//! (the quantity `ε_A` bounds, MATH §3) decides `auto`, the second is reported beside it:
//!
//! - `o`: `‖Õ − O‖_F / ‖O‖_F` (the head's output, MATH §3–4);
//! - `dq`: `‖dQ̃ − dQ‖_F / ‖dQ‖_F`, the gradient of the head's queries for an upstream gradient `G`
//!   of i.i.d. standard normal entries (a fixed seed): row-local, so sampled rows give it exactly.
//!   `dq_i = τ Σ_j ds_ij (k_j − k̄_i)` with `ds_ij = w_ij (G_i·v_j − G_i·o_i)`, `w_ij = p_ij` (exact;
//!   `Σ_j ds_ij = 0`, so `k̄_i` drops out) or `T_{g−1}(s̃_ij)/den_i` (the polynomial model's exact
//!   gradient, MATH §4, with `k̄_i` the row shift's key mean, 0 without it).
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
pub use super::view::Rows;
use crate::linalg::{matmul, rm, rm_mut, Scalar};
use faer::Par;

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
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorEstimate {
    /// Degree `g`.
    pub degree: usize,
    /// Estimate of `‖Õ − O‖_F/‖O‖_F` over all rows (point estimate).
    pub rel_err_o: f64,
    /// Estimate of `‖dQ̃ − dQ‖_F/‖dQ‖_F` over all rows for a standard normal `G` (point estimate).
    pub rel_err_dq: f64,
    /// One-sided 95% upper confidence bound on the output error `rel_err_o` (see the module docs):
    /// what [`super::method::Policy::choose`] compares with `tol`.
    pub upper: f64,
    /// The same bound on the query-gradient error `rel_err_dq` (reported, not decisive).
    pub upper_dq: f64,
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

/// `len` i.i.d. standard normal numbers from `seed` (the generator of the estimate's `G`).
pub(crate) fn normal_vec<T: Scalar>(len: usize, seed: u64) -> Vec<T> {
    let mut rng = Mix(seed);
    (0..len).map(|_| T::from_f64(rng.normal())).collect()
}

/// The sampled rows: `(row, is_top)`, top rows first.
fn sample_rows<T: Scalar>(q: &Rows<T>, spec: &EstimateSpec) -> Vec<(usize, bool)> {
    let n = spec.seq_len;
    let mut by_norm: Vec<(f64, usize)> =
        (0..n.min(q.rows())).map(|i| (q.row(i).iter().map(|x| x.as_f64() * x.as_f64()).sum::<f64>(), i)).collect();
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

/// Sampled rows are processed in blocks of this many (the score blocks are `BLOCK × n` in f64).
const BLOCK: usize = 32;

/// Per-row squared errors and squared norms for every degree: `[degree][(e_o, y_o, e_dq, y_dq)]`,
/// rows in the order of `rows`. By blocks of [`BLOCK`] sampled rows, everything in f64: the
/// scores `S = τ Q_B Kᵀ − m` of a block are one GEMM, `G Vᵀ`, `P V`, `dS K` and per degree `A V`,
/// `dS̃ K` more (masked keys get weight 0): O(|rows|·n·(d + d_v)·(2 + |degrees|)).
#[allow(clippy::type_complexity)]
fn row_errors<T: Scalar>(
    q: &Rows<T>,
    k: &Rows<T>,
    v: &Rows<T>,
    spec: &EstimateSpec,
    degrees: &[usize],
    rows: &[(usize, bool)],
) -> Vec<Vec<[f64; 4]>> {
    let (n, d, dv, tau) = (spec.seq_len, q.cols(), v.cols(), spec.scale);
    let kf: Vec<f64> = (0..n).flat_map(|j| k.row(j).iter().map(|x| x.as_f64())).collect();
    let vf: Vec<f64> = (0..n).flat_map(|j| v.row(j).iter().map(|x| x.as_f64())).collect();
    // key means: global, or prefix sums for the causal prefix means
    let mut ksum = vec![0.0f64; d];
    let mut prefix: Vec<f64> = if spec.causal { vec![0.0; n * d] } else { Vec::new() };
    for j in 0..n {
        for (c, x) in kf[j * d..(j + 1) * d].iter().enumerate() {
            ksum[c] += x;
            if spec.causal {
                prefix[j * d + c] = ksum[c];
            }
        }
    }
    let mut rng = Mix(spec.seed ^ 0x60A5_51A4);
    let mut out = vec![Vec::with_capacity(rows.len()); degrees.len()];
    let (mut s, mut w, mut gv) = (vec![0.0f64; BLOCK * n], vec![0.0f64; BLOCK * n], vec![0.0f64; BLOCK * n]);
    let (mut o, mut ot) = (vec![0.0f64; BLOCK * dv], vec![0.0f64; BLOCK * dv]);
    for block in rows.chunks(BLOCK) {
        let b = block.len();
        let qb: Vec<f64> = block.iter().flat_map(|&(i, _)| q.row(i).iter().map(|x| x.as_f64())).collect();
        let gb: Vec<f64> = (0..b * dv).map(|_| rng.normal()).collect();
        let (s, w, gv) = (&mut s[..b * n], &mut w[..b * n], &mut gv[..b * n]);
        let (o, ot) = (&mut o[..b * dv], &mut ot[..b * dv]);
        matmul(rm_mut(s, b, n), false, rm(&qb, b, d), rm(&kf, n, d).transpose(), tau, Par::Seq);
        matmul(rm_mut(gv, b, n), false, rm(&gb, b, dv), rm(&vf, n, dv).transpose(), 1.0, Par::Seq);
        let keys = |r: usize| if spec.causal { block[r].0 + 1 } else { n };
        // shift each row by m_i and remember its largest score
        let mut smax = vec![f64::NEG_INFINITY; b];
        for (r, &(i, _)) in block.iter().enumerate() {
            let qi = &qb[r * d..(r + 1) * d];
            let m = if spec.center {
                let (sum, cnt) =
                    if spec.causal { (&prefix[i * d..(i + 1) * d], (i + 1) as f64) } else { (&ksum[..], n as f64) };
                tau * qi.iter().zip(sum).map(|(a, c)| a * c / cnt).sum::<f64>()
            } else {
                0.0
            };
            for x in s[r * n..r * n + keys(r)].iter_mut() {
                *x -= m;
                smax[r] = smax[r].max(*x);
            }
        }
        // exact: p_ij = exp(s_ij − max) / Σ, masked keys 0
        let mut psum = vec![0.0f64; b];
        for r in 0..b {
            let (sr, wr) = (&s[r * n..(r + 1) * n], &mut w[r * n..(r + 1) * n]);
            for (j, (x, y)) in sr.iter().zip(wr.iter_mut()).enumerate() {
                *y = if j < keys(r) { (x - smax[r]).exp() } else { 0.0 };
                psum[r] += *y;
            }
        }
        matmul(rm_mut(o, b, dv), false, rm(w, b, n), rm(&vf, n, dv), 1.0, Par::Seq);
        // exact: ds_ij = p_ij (g_i·v_j − g_i·o_i), dq_i = τ Σ_j ds_ij k_j (MATH §4)
        let mut y_o = Vec::with_capacity(b);
        let mut ds = vec![0.0f64; b * n];
        for r in 0..b {
            let (or, gr) = (&mut o[r * dv..(r + 1) * dv], &gb[r * dv..(r + 1) * dv]);
            or.iter_mut().for_each(|x| *x /= psum[r]);
            let go: f64 = gr.iter().zip(or.iter()).map(|(a, c)| a * c).sum();
            for j in 0..keys(r) {
                ds[r * n + j] = w[r * n + j] / psum[r] * (gv[r * n + j] - go);
            }
            y_o.push(or.iter().map(|x| x * x).sum::<f64>());
        }
        let mut dq = vec![0.0f64; b * d];
        let mut dqt = vec![0.0f64; b * d];
        matmul(rm_mut(&mut dq, b, d), false, rm(&ds, b, n), rm(&kf, n, d), tau, Par::Seq);
        for (di, &g) in degrees.iter().enumerate() {
            for r in 0..b {
                for (j, (x, y)) in s[r * n..(r + 1) * n].iter().zip(w[r * n..(r + 1) * n].iter_mut()).enumerate() {
                    *y = if j < keys(r) { taylor(g, *x) } else { 0.0 };
                }
            }
            matmul(rm_mut(ot, b, dv), false, rm(w, b, n), rm(&vf, n, dv), 1.0, Par::Seq);
            // the polynomial model's ds̃_ij = T_{g−1}(s̃_ij)/den_i (g_i·v_j − g_i·õ_i) (MATH §4)
            let mut dsum = vec![0.0f64; b];
            let mut e_o = vec![0.0f64; b];
            for r in 0..b {
                let den: f64 = w[r * n..r * n + keys(r)].iter().sum();
                let (otr, or, gr) =
                    (&mut ot[r * dv..(r + 1) * dv], &o[r * dv..(r + 1) * dv], &gb[r * dv..(r + 1) * dv]);
                otr.iter_mut().for_each(|x| *x /= den);
                let got: f64 = gr.iter().zip(otr.iter()).map(|(a, c)| a * c).sum();
                e_o[r] = otr.iter().zip(or).map(|(a, c)| (a - c) * (a - c)).sum();
                for j in 0..keys(r) {
                    let x = taylor(g - 1, s[r * n + j]) / den * (gv[r * n + j] - got);
                    ds[r * n + j] = x;
                    dsum[r] += x;
                }
            }
            // dq̃_i = τ Σ_j ds̃_ij (k_j − k̄_i): the shift m_i = τ q_i·k̄_i depends on q_i too
            matmul(rm_mut(&mut dqt, b, d), false, rm(&ds, b, n), rm(&kf, n, d), tau, Par::Seq);
            for (r, &(i, _)) in block.iter().enumerate() {
                if spec.center {
                    let (sum, cnt) =
                        if spec.causal { (&prefix[i * d..(i + 1) * d], (i + 1) as f64) } else { (&ksum[..], n as f64) };
                    for (x, c) in dqt[r * d..(r + 1) * d].iter_mut().zip(sum) {
                        *x -= tau * dsum[r] * c / cnt;
                    }
                }
                let (dr, dtr) = (&dq[r * d..(r + 1) * d], &dqt[r * d..(r + 1) * d]);
                let e_dq: f64 = dtr.iter().zip(dr).map(|(a, c)| (a - c) * (a - c)).sum();
                let y_dq: f64 = dr.iter().map(|x| x * x).sum();
                out[di].push([e_o[r], y_o[r], e_dq, y_dq]);
            }
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
/// one [`ErrorEstimate`] per degree, in order. O((top + uniform)·n·(d + d_v)·(2 + |degrees|)) time in
/// GEMMs, O(32·n + n·(d + d_v)) memory (f64 copies of `k`, `v`, the causal prefix sums and one block
/// of scores), all in f64.
///
/// Panics when `q`, `k` or `v` has fewer than `spec.seq_len` rows, `q` and `k` differ in width, or
/// a degree is 0 (callers validate degrees).
pub fn estimate_poly_error<T: Scalar>(
    q: &Rows<T>,
    k: &Rows<T>,
    v: &Rows<T>,
    spec: &EstimateSpec,
    degrees: &[usize],
) -> Vec<ErrorEstimate> {
    assert!(degrees.iter().all(|&g| g >= 1), "estimate_poly_error: degree 0");
    let n = spec.seq_len;
    assert!(q.rows() >= n && k.rows() >= n && v.rows() >= n, "estimate_poly_error: fewer rows than seq_len");
    assert_eq!(q.cols(), k.cols(), "estimate_poly_error: q and k differ in width");
    let rows = sample_rows(q, spec);
    let per = row_errors(q, k, v, spec, degrees, &rows);
    degrees
        .iter()
        .zip(per)
        .map(|(&g, r)| {
            let col = |c: usize| r.iter().map(|x| x[c]).collect::<Vec<f64>>();
            let (po, uo) = combine(spec.seq_len, &rows, &col(0), &col(1));
            let (pd, ud) = combine(spec.seq_len, &rows, &col(2), &col(3));
            ErrorEstimate { degree: g, rel_err_o: po, rel_err_dq: pd, upper: uo, upper_dq: ud, rows: rows.len() }
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
                    &Rows::contiguous(&q, n, d),
                    &Rows::contiguous(&k, n, d),
                    &Rows::contiguous(&v, n, d),
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

    /// With every row sampled the dq estimate is the exact relative error of dL/dq for the same
    /// upstream gradient `G` (rebuilt here from the sample order and seed), against the naive
    /// O(n²) backward of exact attention and of the polynomial model (MATH §4).
    #[test]
    fn exhaustive_sample_equals_true_dq_error() {
        use super::super::naive;
        use super::super::{AttnShape, Qkv};
        let (n, d, dv) = (37, 3, 5);
        let (q, k, v) = (data(n, d, 7, 0.8), data(n, d, 8, 0.8), data(n, dv, 9, 1.0));
        let s = AttnShape::new(n, 1, 1, d).with_head_dim_v(dv);
        let x = Qkv::new(&q, &k, &v, &s).unwrap();
        for (causal, center) in [(false, true), (true, true), (true, false)] {
            let tau = 0.7;
            let mut spec = EstimateSpec::new(n, tau, causal, center);
            spec.top = 4;
            spec.uniform = n;
            let (qr, kr, vr) = (Rows::contiguous(&q, n, d), Rows::contiguous(&k, n, d), Rows::contiguous(&v, n, dv));
            let rows = sample_rows(&qr, &spec);
            let mut rng = Mix(spec.seed ^ 0x60A5_51A4);
            let mut g = vec![0.0f64; n * dv];
            for &(i, _) in &rows {
                for c in 0..dv {
                    g[i * dv + c] = rng.normal();
                }
            }
            let (dq, _, _) = naive::backward(&x, &g, causal, tau);
            for deg in [2usize, 4] {
                let (dqt, _, _) =
                    naive::poly_backward(&x, &g, &naive::Poly { causal, scale: tau, degree: deg, center });
                let num: f64 = dqt.iter().zip(&dq).map(|(a, b)| (a - b) * (a - b)).sum();
                let truth = (num / dq.iter().map(|b| b * b).sum::<f64>()).sqrt();
                let est = estimate_poly_error(&qr, &kr, &vr, &spec, &[deg])[0];
                assert!(
                    (est.rel_err_dq - truth).abs() <= 1e-10 * truth,
                    "causal {causal} center {center} g={deg}: {} vs {truth}",
                    est.rel_err_dq
                );
            }
        }
    }

    #[test]
    fn error_falls_with_degree_and_sample_is_deterministic() {
        let (n, d) = (300, 8);
        let (q, k, v) = (data(n, d, 4, 0.5), data(n, d, 5, 0.5), data(n, d, 6, 1.0));
        let spec = EstimateSpec::new(n, 1.0 / (d as f64).sqrt(), true, true);
        let (qr, kr, vr) = (Rows::contiguous(&q, n, d), Rows::contiguous(&k, n, d), Rows::contiguous(&v, n, d));
        let e = estimate_poly_error(&qr, &kr, &vr, &spec, &[2, 4, 6]);
        assert!(e[0].rel_err_o > e[1].rel_err_o && e[1].rel_err_o > e[2].rel_err_o, "{e:?}");
        assert!(e[0].rel_err_dq > e[2].rel_err_dq, "{e:?}");
        assert_eq!(e, estimate_poly_error(&qr, &kr, &vr, &spec, &[2, 4, 6]));
        assert_eq!(e[0].rows, 128);
    }
}
