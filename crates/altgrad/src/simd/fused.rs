//! The polynomial backward's feature gradient and its chain rule in one pass (MATH §4, degree 2):
//! `dψ = M y` per chunk row (`M = H'` or `dH'`, `[r, e]`; `y` = that row of `dYᵀ` or `V'ᵀ`,
//! `[e, rows]`) and `dx = J_φ(x)ᵀ dψ`, sixteen rows at a time in the lanes of AVX-512 registers,
//! without writing `dΨ [r, rows]` out and reading it back. For the degree-2 map
//! `φ = [1, s_p x_p, a_pc x_p x_c]` ([`crate::attention::features::FeatureMap`]), with the
//! coefficients folded into the rows of `M` (`Ms = diag(a) M`, [`scale_rows`]):
//!
//! - degree 1: `dx_p += (Ms y)_{1+p}`;
//! - degree 2, feature `f = (p, c)`, `p ≤ c`: `t = (Ms y)_f`, `dx_p += t x_c`, `dx_c += t x_p`;
//! - optionally `dm −= w_1 (Ms y)_0 + w_2 Σ_p x_p (Ms y)_{1+p}` (the row shift's share through the
//!   degree-0 and degree-1 blocks, `Σ_{t<g} w_{t+1} ⟨φ_t, dψ_t⟩`);
//!
//! with the row shift's degree weights `w_t` per row (`dφ_t = w_t dψ_t`; all 1 without a shift).
//! [`features_product`] is the forward's counterpart: `Yᵀ = Mᵀ (w ∘ φ)` with the features made in
//! registers, and [`features_state`] the state products `H' += Φᵀ [V 1]`, `dH' += Ψᵀ dY` with
//! the features made in registers too (`d = 16`), so that at `d = d_v = 16` no pass of the
//! polynomial kernels writes features out.

#[cfg(target_arch = "x86_64")]
use super::{Avx512, Level, Vector};

/// `E`, the value width plus the denominator column, that the fused pass is compiled for (`y` in
/// 17 registers: `head_dim_v = 16`).
pub(crate) const E: usize = 17;

/// `ms[f, :] = a_f · m[f, :]` for `m [r, E]` row-major and per-feature coefficients `a [r]`.
pub(crate) fn scale_rows(m: &[f32], a: &[f32], ms: &mut [f32]) {
    for ((dst, src), s) in ms.chunks_exact_mut(E).zip(m.chunks_exact(E)).zip(a) {
        for (x, y) in dst.iter_mut().zip(src) {
            *x = *y * *s;
        }
    }
}

/// Operands of [`feature_vjp`]; every matrix row-major.
pub(crate) struct Vjp<'a> {
    /// `Ms [r, E]`, the state with the feature coefficients folded in ([`scale_rows`]).
    pub ms: &'a [f32],
    /// `y [E, rows]` with row stride `rows`.
    pub y: &'a [f32],
    /// The scaled inputs `xt [d, rows]`.
    pub xt: &'a [f32],
    /// `starts[c]..starts[c + 1]`: the degree-2 features of coordinate `c` (relative to the block),
    /// whose other coordinates are `p = 0, 1, …` (`starts.len() = d + 1`).
    pub starts: &'a [usize],
    /// The degree weights `w [g + 1, rows]` (row `t` multiplies the degree-`t` block of the
    /// features, MATH §3 "Row shift"), `None` when they are all 1.
    pub w: Option<&'a [f32]>,
    /// Chunk rows.
    pub rows: usize,
}

/// `dxt [d, rows] = J_φᵀ (w ∘ M y)` (overwritten; `Ms` holds `M` with the coefficients) and, when
/// given, `dm [rows] −= w_1 (Ms y)_0 +
/// w_2 Σ_p x_p (Ms y)_{1+p}` (`Σ_{t<g} w_{t+1} ⟨φ_t, dψ_t⟩`), on AVX-512; returns `false`, touching
/// nothing, on any other level. `scratch` holds at least `3·d·16` values.
///
/// Panics if the operands' lengths do not match `rows`, `d = starts.len() − 1` and
/// `r = 1 + d + starts[d]`.
pub(crate) fn feature_vjp(
    level: Level,
    v: &Vjp<'_>,
    dxt: &mut [f32],
    dm: Option<&mut [f32]>,
    scratch: &mut [f32],
) -> bool {
    let d = v.starts.len() - 1;
    let r = 1 + d + v.starts[d];
    let rows = v.rows;
    assert!(
        v.ms.len() >= r * E && v.y.len() >= E * rows && v.xt.len() >= d * rows && dxt.len() >= d * rows,
        "fused feature VJP: operand too short"
    );
    assert!(scratch.len() >= 3 * d * 16, "fused feature VJP: scratch too short");
    assert!(v.w.is_none_or(|w| w.len() >= 3 * rows), "fused feature VJP: w too short");
    assert!(dm.as_ref().is_none_or(|m| m.len() >= rows), "fused feature VJP: dm too short");
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is this CPU's (the caller's Level::detect), the lengths are checked above.
        Level::Avx512 => unsafe { vjp_avx512(v, d, dxt, dm, scratch) },
        _ => return false,
    }
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn vjp_avx512(v: &Vjp<'_>, d: usize, dxt: &mut [f32], dm: Option<&mut [f32]>, scratch: &mut [f32]) {
    vjp_impl::<Avx512>(v, d, dxt, dm, scratch)
}

/// `(Ms y)_f` for the lanes in `y`: two partial sums, so the chain is half as long.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot<S: Vector>(row: *const f32, y: &[S::V; E]) -> S::V {
    let mut a = S::mul(S::splat(*row), y[0]);
    let mut b = S::mul(S::splat(*row.add(1)), y[1]);
    let mut e = 2;
    while e + 1 < E {
        a = S::fma(S::splat(*row.add(e)), y[e], a);
        b = S::fma(S::splat(*row.add(e + 1)), y[e + 1], b);
        e += 2;
    }
    if e < E {
        a = S::fma(S::splat(*row.add(e)), y[e], a);
    }
    S::add(a, b)
}

/// Block `i0..i0 + LANES` of `rows` (lanes beyond `rows` off in `mask`): the degree weights
/// `[w_0, w_1, w_2]` (all 1 when `w` is `None`), with the block's inputs staged zero-padded into
/// `xs` and times `w_2` into `xs2` (`[d, LANES]` each).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn stage<S: Vector>(
    xt: &[f32],
    w: Option<&[f32]>,
    rows: usize,
    i0: usize,
    d: usize,
    mask: S::Mask,
    xs: *mut f32,
    xs2: *mut f32,
) -> [S::V; 3] {
    let l = S::LANES;
    let w = match w {
        Some(w) => [0, 1, 2].map(|t| S::load_m(w.as_ptr().add(t * rows + i0), mask)),
        None => [S::splat(1.0); 3],
    };
    for p in 0..d {
        let x = S::load_m(xt.as_ptr().add(p * rows + i0), mask);
        S::store(xs.add(p * l), x);
        S::store(xs2.add(p * l), S::mul(x, w[2]));
    }
    w
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn vjp_impl<S: Vector>(v: &Vjp<'_>, d: usize, dxt: &mut [f32], mut dm: Option<&mut [f32]>, scratch: &mut [f32]) {
    let l = S::LANES;
    let rows = v.rows;
    let (xs, rest) = scratch.split_at_mut(d * l);
    let (xs2, dxs) = rest.split_at_mut(d * l);
    let (xs, xs2, dxs) = (xs.as_mut_ptr(), xs2.as_mut_ptr(), dxs.as_mut_ptr());
    let ms = v.ms.as_ptr();
    let mut i0 = 0;
    while i0 < rows {
        let lanes = l.min(rows - i0);
        let mask = S::mask(lanes);
        // this block's inputs (zero-padded), the inputs times w_2, and zeroed gradients
        let [_, w1, w2] = stage::<S>(v.xt, v.w, rows, i0, d, mask, xs, xs2);
        for p in 0..d {
            S::store(dxs.add(p * l), S::splat(0.0));
        }
        let mut y = [S::splat(0.0); E];
        for (e, ye) in y.iter_mut().enumerate() {
            *ye = S::load_m(v.y.as_ptr().add(e * rows + i0), mask);
        }
        // degree 0 and 1: dx_p += w_1 t_p ; dm −= w_1 t_0 + w_2 Σ_p x_p t_p
        let t0 = dot::<S>(ms, &y);
        let mut s1 = S::splat(0.0);
        for p in 0..d {
            let t = dot::<S>(ms.add((1 + p) * E), &y);
            let dp = dxs.add(p * l);
            S::store(dp, S::fma(w1, t, S::load(dp)));
            s1 = S::fma(t, S::load(xs.add(p * l)), s1);
        }
        let dmv = S::sub(S::splat(0.0), S::fma(w1, t0, S::mul(w2, s1)));
        // degree 2: f = (p, c), p ≤ c, in the map's order (c-major): dx_p += t w_2 x_c, dx_c += t w_2 x_p
        let mut f = 1 + d;
        for c in 0..d {
            let xc = S::load(xs2.add(c * l));
            let mut acc = S::splat(0.0);
            for p in 0..v.starts[c + 1] - v.starts[c] {
                let t = dot::<S>(ms.add(f * E), &y);
                acc = S::fma(t, S::load(xs2.add(p * l)), acc);
                let dp = dxs.add(p * l);
                S::store(dp, S::fma(t, xc, S::load(dp)));
                f += 1;
            }
            let dc = dxs.add(c * l);
            S::store(dc, S::add(S::load(dc), acc));
        }
        for p in 0..d {
            S::store_m(dxt.as_mut_ptr().add(p * rows + i0), S::load(dxs.add(p * l)), mask);
        }
        if let Some(m) = dm.as_deref_mut() {
            let mp = m.as_mut_ptr().add(i0);
            S::store_m(mp, S::add(S::load_m(mp, mask), dmv), mask);
        }
        i0 += l;
    }
}

/// Operands of [`features_product`]; every matrix row-major.
pub(crate) struct Product<'a> {
    /// `Ms [r, E]`, the state with the feature coefficients folded in ([`scale_rows`]).
    pub ms: &'a [f32],
    /// The scaled inputs `xt [d, rows]`.
    pub xt: &'a [f32],
    /// As [`Vjp::starts`].
    pub starts: &'a [usize],
    /// The degree weights `w [g + 1, rows]`, `None` when they are all 1.
    pub w: Option<&'a [f32]>,
    /// Chunk rows.
    pub rows: usize,
}

/// `yt [E, rows] = Msᵀ (w ∘ φ')` (overwritten), with `φ'` the degree-2 monomials of `xt` without
/// their coefficients (`1, x_p, x_p x_c`; the coefficients are in `Ms`): the forward's
/// `Yᵀ = H'ᵀ Ψᵀ` with the query features made in registers, sixteen rows at a time, never stored.
/// AVX-512 only; returns `false`, touching nothing, on any other level. `scratch` holds at least
/// `2·d·16` values.
///
/// Panics if the operands' lengths do not match `rows`, `d = starts.len() − 1` and
/// `r = 1 + d + starts[d]`.
pub(crate) fn features_product(level: Level, v: &Product<'_>, yt: &mut [f32], scratch: &mut [f32]) -> bool {
    let d = v.starts.len() - 1;
    let r = 1 + d + v.starts[d];
    let rows = v.rows;
    assert!(
        v.ms.len() >= r * E && v.xt.len() >= d * rows && yt.len() >= E * rows,
        "fused features product: operand too short"
    );
    assert!(scratch.len() >= 2 * d * 16, "fused features product: scratch too short");
    assert!(v.w.is_none_or(|w| w.len() >= 3 * rows), "fused features product: w too short");
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is this CPU's (the caller's Level::detect), the lengths are checked above.
        Level::Avx512 => unsafe { product_avx512(v, d, yt, scratch) },
        _ => return false,
    }
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn product_avx512(v: &Product<'_>, d: usize, yt: &mut [f32], scratch: &mut [f32]) {
    product_impl::<Avx512>(v, d, yt, scratch)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn product_impl<S: Vector>(v: &Product<'_>, d: usize, yt: &mut [f32], scratch: &mut [f32]) {
    let l = S::LANES;
    let rows = v.rows;
    let (xs, xs2) = scratch.split_at_mut(d * l);
    let (xs, xs2) = (xs.as_mut_ptr(), xs2.as_mut_ptr());
    let ms = v.ms.as_ptr();
    let mut i0 = 0;
    while i0 < rows {
        let lanes = l.min(rows - i0);
        let mask = S::mask(lanes);
        let [w0, w1, _] = stage::<S>(v.xt, v.w, rows, i0, d, mask, xs, xs2);
        let mut acc = [S::splat(0.0); E];
        for (e, a) in acc.iter_mut().enumerate() {
            *a = S::mul(S::splat(*ms.add(e)), w0);
        }
        for p in 0..d {
            let phi = S::mul(S::load(xs.add(p * l)), w1);
            let row = ms.add((1 + p) * E);
            for (e, a) in acc.iter_mut().enumerate() {
                *a = S::fma(S::splat(*row.add(e)), phi, *a);
            }
        }
        let mut f = 1 + d;
        for c in 0..d {
            let xc = S::load(xs2.add(c * l));
            for p in 0..v.starts[c + 1] - v.starts[c] {
                let phi = S::mul(S::load(xs.add(p * l)), xc);
                let row = ms.add(f * E);
                for (e, a) in acc.iter_mut().enumerate() {
                    *a = S::fma(S::splat(*row.add(e)), phi, *a);
                }
                f += 1;
            }
        }
        for (e, a) in acc.iter().enumerate() {
            S::store_m(yt.as_mut_ptr().add(e * rows + i0), *a, mask);
        }
        i0 += l;
    }
}

/// The input width [`features_state`] is compiled for (`x` rows in one register: `head_dim = 16`).
pub(crate) const D: usize = 16;

/// Whether [`features_state`] applies to a degree-2 map with group starts `starts`: `d = 16`
/// inputs and the symmetric monomials `(p, c)`, `p ≤ c`, in the map's c-major order (group `c`
/// holds `c + 1` features).
pub(crate) fn state_applies(starts: &[usize]) -> bool {
    starts.len() == D + 1 && (0..D).all(|c| starts[c] == c * (c + 1) / 2 && starts[c + 1] - starts[c] == c + 1)
}

/// Operands of [`features_state`].
pub(crate) struct StateAdd<'a> {
    /// Input rows, `D` values each, row `i` at `x[i·xs..]`.
    pub x: &'a [f32],
    /// Row stride of `x`.
    pub xs: usize,
    /// Subtracted from every input row before scaling (`[D]`; `None`: no shift).
    pub shift: Option<&'a [f32]>,
    /// Multiplies the shifted inputs (`√τ`).
    pub scale: f32,
    /// Rows of `Y`, row `i` at `y[i·ys..]`: `E − 1` value columns, then (with `last`) the last
    /// column; without `last` the last column is 1 (`[V 1]`).
    pub y: &'a [f32],
    /// Row stride of `y`.
    pub ys: usize,
    /// Whether `y`'s rows hold the last column.
    pub last: bool,
    /// The degree weights `w [g + 1, rows]`, `None` when they are all 1.
    pub w: Option<&'a [f32]>,
    /// The feature coefficients `a [r]`.
    pub a: &'a [f32],
    /// Chunk rows.
    pub rows: usize,
}

/// `st [r, E] += (w ∘ φ(x'))ᵀ Y` for a chunk's inputs `x' = scale·(x − shift)` (the state
/// products `H' += Φ_Kᵀ [V 1]` and `dH' += Ψᵀ dY` of MATH §4) with the features made in
/// registers, never stored: the value columns in the lanes (`E − 1 = 16`), a row's features as
/// broadcasts of its inputs, `a_f` applied once per feature and call; the last column through the
/// Gram matrix `Σ_i s_i x'_i x'_iᵀ` (`s_i` that column of `Y`). The degree-2 block carries no
/// weight: `w_2 = T_0 = 1` (MATH §3), so `w`'s rows 0 and 1 are read. `d = 16` only
/// ([`state_applies`]). AVX-512 only; returns `false`, touching nothing, on any other level.
/// `scratch` holds at least `2·D·rows` values.
///
/// Panics if the operands are shorter than `rows` rows or `r = 1 + D + D(D+1)/2`.
pub(crate) fn features_state(level: Level, v: &StateAdd<'_>, st: &mut [f32], scratch: &mut [f32]) -> bool {
    let (rows, r) = (v.rows, 1 + D + D * (D + 1) / 2);
    if rows == 0 {
        return matches!(level, Level::Avx512);
    }
    assert!(
        v.a.len() >= r
            && st.len() >= r * E
            && v.x.len() >= (rows - 1) * v.xs + D
            && v.y.len() >= (rows - 1) * v.ys + if v.last { E } else { E - 1 },
        "fused features state: operand too short"
    );
    assert!(v.shift.is_none_or(|c| c.len() >= D), "fused features state: shift too short");
    assert!(v.w.is_none_or(|w| w.len() >= 3 * rows), "fused features state: w too short");
    assert!(scratch.len() >= 2 * D * rows, "fused features state: scratch too short");
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is this CPU's (the caller's Level::detect), the lengths are checked above.
        Level::Avx512 => unsafe { state_avx512(v, st, scratch) },
        _ => return false,
    }
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn state_avx512(v: &StateAdd<'_>, st: &mut [f32], scratch: &mut [f32]) {
    state_impl::<Avx512>(v, st, scratch)
}

/// Accumulators of one register block of degree-2 features.
const BLOCK: usize = 25;

/// The degree-2 features of groups `C0..C1` (`Σ (c + 1) ≤ BLOCK`): `acc_(p,c) = Σ_i x_ip (x_ic
/// y_i)`, then `st[f] += a_f acc_f` for the value columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn state_block<S: Vector, const C0: usize, const C1: usize>(v: &StateAdd<'_>, xs: *const f32, st: *mut f32) {
    let mut acc = [S::splat(0.0); BLOCK];
    for i in 0..v.rows {
        let y = S::load(v.y.as_ptr().add(i * v.ys));
        let xi = xs.add(i * D);
        let mut k = 0;
        for c in C0..C1 {
            let u = S::mul(S::splat(*xi.add(c)), y);
            for p in 0..c + 1 {
                acc[k] = S::fma(S::splat(*xi.add(p)), u, acc[k]);
                k += 1;
            }
        }
    }
    let mut k = 0;
    for c in C0..C1 {
        for p in 0..c + 1 {
            let f = 1 + D + c * (c + 1) / 2 + p;
            let dst = st.add(f * E);
            S::store(dst, S::fma(S::splat(v.a[f]), acc[k], S::load(dst)));
            k += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn state_impl<S: Vector>(v: &StateAdd<'_>, st: &mut [f32], scratch: &mut [f32]) {
    let rows = v.rows;
    let (xs, rest) = scratch.split_at_mut(rows * D);
    let x1s = &mut rest[..rows * D];
    let (xs, x1s) = (xs.as_mut_ptr(), x1s.as_mut_ptr());
    let weight = |t: usize, i: usize| v.w.map_or(1.0, |w| w[t * rows + i]);
    let last = |i: usize| if v.last { *v.y.as_ptr().add(i * v.ys + E - 1) } else { 1.0 };
    // the scaled inputs and the inputs times w_1, and the last column's degree-0 and -1 sums
    let shift = v.shift.map_or(S::splat(0.0), |c| S::load(c.as_ptr()));
    let scale = S::splat(v.scale);
    let (mut g0, mut g1) = (0.0f32, S::splat(0.0));
    for i in 0..rows {
        let x = S::mul(S::sub(S::load(v.x.as_ptr().add(i * v.xs)), shift), scale);
        let s = last(i);
        S::store(xs.add(i * D), x);
        S::store(x1s.add(i * D), S::mul(x, S::splat(weight(1, i))));
        g1 = S::fma(x, S::splat(s * weight(1, i)), g1);
        g0 += s * weight(0, i);
    }
    // the last column's degree-2 sums: the Gram matrix G[p, :] = Σ_i x_ip s_i x_i
    let mut gram = [S::splat(0.0); D];
    for i in 0..rows {
        let z = S::mul(S::load(xs.add(i * D)), S::splat(last(i)));
        for (p, g) in gram.iter_mut().enumerate() {
            *g = S::fma(S::splat(*xs.add(i * D + p)), z, *g);
        }
    }
    let mut gv = [0.0f32; D * D];
    for (p, g) in gram.iter().enumerate() {
        S::store(gv.as_mut_ptr().add(p * D), *g);
    }
    let mut g1v = [0.0f32; D];
    S::store(g1v.as_mut_ptr(), g1);
    let stp = st.as_mut_ptr();
    *stp.add(E - 1) += v.a[0] * g0;
    for (p, g) in g1v.iter().enumerate() {
        *stp.add((1 + p) * E + E - 1) += v.a[1 + p] * *g;
    }
    for c in 0..D {
        for p in 0..=c {
            let f = 1 + D + c * (c + 1) / 2 + p;
            *stp.add(f * E + E - 1) += v.a[f] * gv[p * D + c];
        }
    }
    // the value columns, degrees 0 and 1: acc_0 = Σ_i w_0 y_i, acc_{1+p} = Σ_i w_1 x_ip y_i
    let mut acc = [S::splat(0.0); 1 + D];
    for i in 0..rows {
        let y = S::load(v.y.as_ptr().add(i * v.ys));
        acc[0] = S::fma(S::splat(weight(0, i)), y, acc[0]);
        for p in 0..D {
            acc[1 + p] = S::fma(S::splat(*x1s.add(i * D + p)), y, acc[1 + p]);
        }
    }
    for (f, a) in acc.iter().enumerate() {
        let dst = stp.add(f * E);
        S::store(dst, S::fma(S::splat(v.a[f]), *a, S::load(dst)));
    }
    // degree 2 in register blocks of whole groups (21, 24, 21, 25, 14, 15, 16 features: with y and
    // u, at most 27 of the 32 registers, so that the accumulators are not spilled)
    state_block::<S, 0, 6>(v, xs, stp);
    state_block::<S, 6, 9>(v, xs, stp);
    state_block::<S, 9, 11>(v, xs, stp);
    state_block::<S, 11, 13>(v, xs, stp);
    state_block::<S, 13, 14>(v, xs, stp);
    state_block::<S, 14, 15>(v, xs, stp);
    state_block::<S, 15, 16>(v, xs, stp);
}
