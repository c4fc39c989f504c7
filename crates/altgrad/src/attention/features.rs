//! The polynomial feature map φ of MATH §3 (AS23 Lemma 3.3–3.4; LSSSZ Lemma C.13).
//!
//! For degree `g` and width `d`, `φ(x)_α = x^α / √(α!)` over every multi-index `α ∈ Nᵈ` with
//! `|α| ≤ g` (the symmetric monomial basis, width `r = C(d+g, g)`), so that
//! `φ(x)·φ(y) = T_g(x·y)` exactly, with `T_g(z) = Σ_{t≤g} zᵗ/t!`.
//!
//! **Layout.** Features are stored degree block by degree block: block `t` ([`FeatureMap::block`])
//! holds the `C(d+t−1, t)` monomials of degree `t`. Inside block `t` the monomials are grouped by
//! their largest coordinate `c` (increasing), and the group of `c` is `x_c` times the prefix of
//! block `t−1` whose largest coordinate is `≤ c` — a contiguous prefix, because block `t−1` is
//! sorted the same way. Each monomial therefore has one parent (`α + e_c` from `α`) and
//! `φ(α + e_c) = φ(α) · x_c / √(α_c + 1)`, so a row costs O(r) and its transposed Jacobian too
//! (a reverse pass over the same build).

use crate::linalg::Scalar;
use crate::simd::dispatch;
use crate::{Error, Result};
use std::ops::Range;

/// Largest feature width [`FeatureMap::new`] accepts (`2²²` ≈ 4.2 million features: a single
/// row of them is 16 MiB in f32 and a 64-row chunk 1 GiB).
pub const MAX_FEATURE_DIM: usize = 1 << 22;

/// The feature width `r = C(d+g, g)` of degree `g` on `d` coordinates (MATH §3 table), or `None`
/// when it does not fit in `usize`.
///
/// Examples: `feature_dim(16, 2) == Some(153)`, `feature_dim(64, 2) == Some(2145)`.
pub fn feature_dim(d: usize, g: usize) -> Option<usize> {
    // C(d+i, i) = C(d+i−1, i−1)·(d+i)/i is exact at every step.
    let mut r: u128 = 1;
    for i in 1..=g as u128 {
        r = r.checked_mul(d as u128 + i)? / i;
    }
    usize::try_from(r).ok()
}

/// The truncated exponential `T_k(x) = Σ_{t≤k} xᵗ/t!` (MATH §3), by Horner's rule.
///
/// `T_0 = 1`; callers treat `T_{−1}` as 0. Positive for every real `x` when `k` is even.
#[inline]
pub fn taylor<T: Scalar>(k: usize, x: T) -> T {
    let mut acc = T::one();
    for t in (1..=k).rev() {
        acc = T::one() + x * acc / T::from_f64(t as f64);
    }
    acc
}

/// The feature map φ of degree `g` on `d` coordinates (see the module docs for the layout).
///
/// Immutable after construction and `Sync`, so one map serves every head of a call.
#[derive(Clone, Debug)]
pub struct FeatureMap<T> {
    d: usize,
    g: usize,
    /// `offsets[t]..offsets[t+1]` is block `t`; `offsets.len() == g + 2`.
    offsets: Vec<usize>,
    /// `groups[t][c]..groups[t][c+1]` (relative to block `t`) are the children of coordinate `c`;
    /// their parents are block `t−1`'s first `groups[t][c+1] − groups[t][c]` entries.
    groups: Vec<Vec<usize>>,
    /// Per feature: `1/√(α_c + 1)` for the coordinate `c` that built it from its parent (1 at degree 0).
    scale: Vec<T>,
}

impl<T: Scalar> FeatureMap<T> {
    /// Builds the map of degree `g` on `d ≥ 1` coordinates. O(r) time and memory.
    ///
    /// Errors: [`Error::BadInput`] (input `"degree"`) when `d == 0` or `r = C(d+g, g)` exceeds
    /// [`MAX_FEATURE_DIM`] (the message gives `r`).
    pub fn new(d: usize, g: usize) -> Result<Self> {
        if d == 0 {
            return Err(Error::bad("head_dim", "feature map needs at least one coordinate"));
        }
        match feature_dim(d, g) {
            Some(r) if r <= MAX_FEATURE_DIM => {}
            r => {
                let shown = r.map_or_else(|| "more than 2^64".to_string(), |r| r.to_string());
                return Err(Error::bad(
                    "degree",
                    format!(
                        "feature dimension r = C(d+g, g) for d = {d}, g = {g} is {shown}, above the limit \
                         {MAX_FEATURE_DIM}: use a lower degree or exact attention"
                    ),
                ));
            }
        }
        // Per feature: largest coordinate (usize::MAX at degree 0) and its multiplicity.
        let mut last: Vec<usize> = vec![usize::MAX];
        let mut mult: Vec<u32> = vec![0];
        let mut scale = vec![T::one()];
        let mut offsets = vec![0, 1];
        let mut groups = vec![Vec::new()];
        for t in 1..=g {
            let prev = offsets[t - 1]..offsets[t];
            let mut starts = Vec::with_capacity(d + 1);
            let mut count = 0;
            for c in 0..d {
                starts.push(count);
                for p in prev.clone() {
                    if t > 1 && last[p] > c {
                        break; // block t−1 is sorted by largest coordinate
                    }
                    let m = if last[p] == c { mult[p] + 1 } else { 1 };
                    last.push(c);
                    mult.push(m);
                    scale.push(T::from_f64(1.0 / (m as f64).sqrt()));
                    count += 1;
                }
            }
            starts.push(count);
            groups.push(starts);
            offsets.push(offsets[t] + count);
        }
        debug_assert_eq!(Some(scale.len()), feature_dim(d, g));
        Ok(FeatureMap { d, g, offsets, groups, scale })
    }

    /// Input width `d`.
    pub fn input_dim(&self) -> usize {
        self.d
    }

    /// Degree `g`.
    pub fn degree(&self) -> usize {
        self.g
    }

    /// Feature width `r = C(d+g, g)`.
    pub fn dim(&self) -> usize {
        self.scale.len()
    }

    /// Index range of the degree-`t` block (`t ≤ g`; panics otherwise). Block `t` has
    /// `C(d+t−1, t)` entries, and `Σ_{α in block t} φ(x)_α φ(y)_α = (x·y)ᵗ/t!`, which is what the
    /// row shift of MATH §3 reweights.
    pub fn block(&self, t: usize) -> Range<usize> {
        assert!(t <= self.g, "block {t} of a degree-{} feature map", self.g);
        self.offsets[t]..self.offsets[t + 1]
    }

    /// Degree 2 only (`None` otherwise): every feature's coefficient `a_f` in `φ_f = a_f·Π x`
    /// (`1`; `s_p` for `x_p`; `s_p·s_f` for `x_p x_c`), and the degree-2 block's group starts
    /// (feature `starts[c] + p` of the block is `x_p x_c`, `p ≤ c`), for the fused backward
    /// (`crate::simd::fused`).
    pub(crate) fn quadratic(&self) -> Option<(Vec<T>, &[usize])> {
        if self.g != 2 {
            return None;
        }
        let (o1, o2) = (self.offsets[1], self.offsets[2]);
        let st = &self.groups[2];
        let mut a = self.scale.clone();
        for c in 0..self.d {
            for p in 0..st[c + 1] - st[c] {
                let f = o2 + st[c] + p;
                a[f] = self.scale[o1 + p] * self.scale[f];
            }
        }
        Some((a, st))
    }

    /// `out = φ(x)`: `x [d]`, `out [r]`. O(r). Panics on wrong lengths.
    pub fn apply(&self, x: &[T], out: &mut [T]) {
        assert_eq!(x.len(), self.d, "FeatureMap::apply: x has the wrong length");
        assert_eq!(out.len(), self.dim(), "FeatureMap::apply: out has the wrong length");
        out[0] = T::one();
        for t in 1..=self.g {
            let (head, tail) = out.split_at_mut(self.offsets[t]);
            let prev = &head[self.offsets[t - 1]..];
            let cur = &mut tail[..self.offsets[t + 1] - self.offsets[t]];
            let sc = &self.scale[self.offsets[t]..self.offsets[t + 1]];
            let st = &self.groups[t];
            for (c, &xc) in x.iter().enumerate() {
                let (a, b) = (st[c], st[c + 1]);
                for ((o, p), s) in cur[a..b].iter_mut().zip(&prev[..b - a]).zip(&sc[a..b]) {
                    *o = *p * xc * *s;
                }
            }
        }
    }

    /// Row by row: `out [rows, r] = φ(x [rows, d])`. Panics on wrong lengths.
    pub fn apply_rows(&self, x: &[T], rows: usize, out: &mut [T]) {
        assert_eq!(x.len(), rows * self.d, "FeatureMap::apply_rows: x has the wrong length");
        assert_eq!(out.len(), rows * self.dim(), "FeatureMap::apply_rows: out has the wrong length");
        if rows == 0 {
            return;
        }
        for (xr, or) in x.chunks_exact(self.d).zip(out.chunks_exact_mut(self.dim())) {
            self.apply(xr, or);
        }
    }

    /// Transposed Jacobian product `dx = J_φ(x)ᵀ dphi`: `x [d]`, `phi = φ(x) [r]` (from
    /// [`apply`](Self::apply)), `dphi [r]`, `dx [d]` (overwritten). O(r): one reverse pass over the
    /// build. `dphi` is used as the adjoint accumulator and is **overwritten**.
    /// Panics on wrong lengths.
    pub fn vjp(&self, x: &[T], phi: &[T], dphi: &mut [T], dx: &mut [T]) {
        assert_eq!(x.len(), self.d, "FeatureMap::vjp: x has the wrong length");
        assert_eq!(dx.len(), self.d, "FeatureMap::vjp: dx has the wrong length");
        assert_eq!(phi.len(), self.dim(), "FeatureMap::vjp: phi has the wrong length");
        assert_eq!(dphi.len(), self.dim(), "FeatureMap::vjp: dphi has the wrong length");
        dx.fill(T::zero());
        for t in (1..=self.g).rev() {
            let (o0, o1, o2) = (self.offsets[t - 1], self.offsets[t], self.offsets[t + 1]);
            let (head, tail) = dphi.split_at_mut(o1);
            let dprev = &mut head[o0..];
            let dcur = &tail[..o2 - o1];
            let prev = &phi[o0..o1];
            let sc = &self.scale[o1..o2];
            let st = &self.groups[t];
            for (c, &xc) in x.iter().enumerate() {
                let (a, b) = (st[c], st[c + 1]);
                let mut acc = T::zero();
                for (((dp, p), dc), s) in dprev[..b - a].iter_mut().zip(&prev[..b - a]).zip(&dcur[a..b]).zip(&sc[a..b])
                {
                    let w = *dc * *s;
                    acc += w * *p;
                    *dp += w * xc;
                }
                dx[c] += acc;
            }
        }
    }

    /// Row by row: `dx [rows, d] = J_φ(x_i)ᵀ dphi_i` with `x [rows, d]`, `phi [rows, r]`,
    /// `dphi [rows, r]` (overwritten, see [`vjp`](Self::vjp)). Panics on wrong lengths.
    pub fn vjp_rows(&self, x: &[T], phi: &[T], dphi: &mut [T], rows: usize, dx: &mut [T]) {
        let (d, r) = (self.d, self.dim());
        assert!(x.len() == rows * d && dx.len() == rows * d, "FeatureMap::vjp_rows: x or dx has the wrong length");
        assert!(
            phi.len() == rows * r && dphi.len() == rows * r,
            "FeatureMap::vjp_rows: phi or dphi has the wrong length"
        );
        for i in 0..rows {
            self.vjp(
                &x[i * d..(i + 1) * d],
                &phi[i * r..(i + 1) * r],
                &mut dphi[i * r..(i + 1) * r],
                &mut dx[i * d..(i + 1) * d],
            );
        }
    }

    /// Feature-major batch (the layout the kernels use, so every step is a vector operation over
    /// the `m` rows): `xt [d, m]` holds the inputs as columns (the transpose of `x [m, d]`), and
    /// `out [r, m]` receives `φ(x_i)` in column `i`. O(r·m). Panics on wrong lengths.
    pub fn apply_cols(&self, xt: &[T], m: usize, out: &mut [T]) {
        assert_eq!(xt.len(), self.d * m, "FeatureMap::apply_cols: xt has the wrong length");
        assert_eq!(out.len(), self.dim() * m, "FeatureMap::apply_cols: out has the wrong length");
        dispatch(
            #[inline(always)]
            || self.apply_cols_body(xt, m, out),
        )
    }

    #[inline(always)]
    fn apply_cols_body(&self, xt: &[T], m: usize, out: &mut [T]) {
        if m == 0 {
            return;
        }
        out[..m].fill(T::one());
        for t in 1..=self.g {
            let (o0, o1, o2) = (self.offsets[t - 1], self.offsets[t], self.offsets[t + 1]);
            let (head, tail) = out.split_at_mut(o1 * m);
            let prev = &head[o0 * m..];
            let cur = &mut tail[..(o2 - o1) * m];
            let st = &self.groups[t];
            for (c, xc) in xt.chunks_exact(m).enumerate() {
                for p in 0..st[c + 1] - st[c] {
                    let child = st[c] + p;
                    let s = self.scale[o1 + child];
                    let src = &prev[p * m..(p + 1) * m];
                    for ((o, pv), x) in cur[child * m..(child + 1) * m].iter_mut().zip(src).zip(xc) {
                        *o = *pv * *x * s;
                    }
                }
            }
        }
    }

    /// Feature-major transposed Jacobian product: `dxt [d, m]` (overwritten) gets
    /// `J_φ(x_i)ᵀ dphi_i` in column `i`, with `xt [d, m]` and `phit = φ [r, m]` as in
    /// [`apply_cols`](Self::apply_cols) and `dphit [r, m]`, which is **overwritten** (adjoint
    /// accumulator). O(r·m). Panics on wrong lengths.
    pub fn vjp_cols(&self, xt: &[T], phit: &[T], dphit: &mut [T], m: usize, dxt: &mut [T]) {
        let (d, r) = (self.d, self.dim());
        assert!(xt.len() == d * m && dxt.len() == d * m, "FeatureMap::vjp_cols: xt or dxt has the wrong length");
        assert!(
            phit.len() == r * m && dphit.len() == r * m,
            "FeatureMap::vjp_cols: phit or dphit has the wrong length"
        );
        dispatch(
            #[inline(always)]
            || self.vjp_cols_body(xt, phit, dphit, m, dxt),
        )
    }

    #[inline(always)]
    fn vjp_cols_body(&self, xt: &[T], phit: &[T], dphit: &mut [T], m: usize, dxt: &mut [T]) {
        dxt.fill(T::zero());
        if m == 0 {
            return;
        }
        for t in (1..=self.g).rev() {
            let (o0, o1, o2) = (self.offsets[t - 1], self.offsets[t], self.offsets[t + 1]);
            let (head, tail) = dphit.split_at_mut(o1 * m);
            let dprev = &mut head[o0 * m..];
            let dcur = &tail[..(o2 - o1) * m];
            let prev = &phit[o0 * m..o1 * m];
            let st = &self.groups[t];
            for (c, (xc, dxc)) in xt.chunks_exact(m).zip(dxt.chunks_exact_mut(m)).enumerate() {
                for p in 0..st[c + 1] - st[c] {
                    let child = st[c] + p;
                    let s = self.scale[o1 + child];
                    let dc = &dcur[child * m..(child + 1) * m];
                    let pv = &prev[p * m..(p + 1) * m];
                    let dp = &mut dprev[p * m..(p + 1) * m];
                    for i in 0..m {
                        let w = dc[i] * s;
                        dxc[i] += w * pv[i];
                        dp[i] += w * xc[i];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_binomial_sizes() {
        for d in 1..6 {
            for g in 0..5 {
                let fm = FeatureMap::<f64>::new(d, g).unwrap();
                assert_eq!(Some(fm.dim()), feature_dim(d, g));
                for t in 0..=g {
                    // degree-t monomials in d variables: C(d+t−1, t)
                    assert_eq!(Some(fm.block(t).len()), feature_dim(d - 1, t), "d={d} t={t}");
                }
            }
        }
    }

    #[test]
    fn features_are_scaled_monomials() {
        // d = 2, g = 2: [1, x0, x1, x0²/√2, x0 x1, x1²/√2] in this layout (c = 0 group, then c = 1)
        let fm = FeatureMap::<f64>::new(2, 2).unwrap();
        let (a, b) = (0.7, -1.3);
        let mut out = vec![0.0; 6];
        fm.apply(&[a, b], &mut out);
        let s2 = 2f64.sqrt();
        let want = [1.0, a, b, a * a / s2, a * b, b * b / s2];
        for (x, y) in out.iter().zip(&want) {
            assert!((x - y).abs() < 1e-15, "{out:?} vs {want:?}");
        }
    }

    #[test]
    fn taylor_matches_its_definition() {
        let mut fact = 1.0;
        let mut sum = 0.0;
        let x: f64 = -1.7;
        for k in 0..8 {
            if k > 0 {
                fact *= k as f64;
            }
            sum += x.powi(k as i32) / fact;
            assert!((taylor(k, x) - sum).abs() < 1e-14);
        }
    }

    #[test]
    fn rejects_huge_maps() {
        assert!(FeatureMap::<f32>::new(128, 8).is_err());
        assert!(FeatureMap::<f32>::new(0, 2).is_err());
        assert_eq!(feature_dim(usize::MAX, 3), None);
    }

    #[test]
    fn column_batch_matches_rows() {
        let (d, g, m) = (5, 4, 7);
        let fm = FeatureMap::<f64>::new(d, g).unwrap();
        let r = fm.dim();
        let x: Vec<f64> = (0..m * d).map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0).collect();
        let dphi: Vec<f64> = (0..m * r).map(|i| ((i * 5 % 13) as f64 - 6.0) / 6.0).collect();
        let mut phi = vec![0.0; m * r];
        fm.apply_rows(&x, m, &mut phi);
        let mut dx = vec![0.0; m * d];
        fm.vjp_rows(&x, &phi, &mut dphi.clone(), m, &mut dx);
        let tr = |a: &[f64], rows: usize, cols: usize| -> Vec<f64> {
            (0..rows * cols).map(|k| a[(k % rows) * cols + k / rows]).collect()
        };
        let xt = tr(&x, m, d);
        let mut phit = vec![0.0; r * m];
        fm.apply_cols(&xt, m, &mut phit);
        assert_eq!(phit, tr(&phi, m, r));
        let mut dxt = vec![0.0; d * m];
        fm.vjp_cols(&xt, &phit, &mut tr(&dphi, m, r), m, &mut dxt);
        for (a, b) in dxt.iter().zip(&tr(&dx, m, d)) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}
