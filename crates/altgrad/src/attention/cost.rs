//! The cost model of the attention methods (MATH §7): FLOPs of forward + backward and working
//! memory of one head, as the kernels of [`super::exact`], [`super::poly`] and [`super::altgrad`]
//! do the work. Pure arithmetic: every function is O(1) and depends on the sizes only.
//! [`super::method::Method::flops`] and [`super::method::Method::state_bytes`] pick the formula of
//! a method.

use super::exact::{BLOCK_K, BLOCK_Q};

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

/// FLOPs of hybrid attention forward + backward for one head (MATH §4.1, §7), causal: the exact
/// part over the `w + s` near keys of each row (`2·(w+s)·(4d + 3d_v)` per row, as
/// [`exact_flops`] per pair, capped at the causal count) plus [`poly_flops`] over the
/// `n − w − s` rows with far keys, and the merge (`≈ 4 n d_v`). Tiles the window mask only partly
/// covers are counted as their allowed pairs (the kernels compute whole tiles: a lower bound).
pub fn hybrid_flops(n: usize, d: usize, dv: usize, r: usize, window: usize, sinks: usize, chunk: usize) -> f64 {
    let near = window.saturating_add(sinks);
    let nf = n as f64;
    // allowed near pairs: Σ_i min(i + 1, w + s)
    let pairs = if near >= n {
        nf * (nf + 1.0) / 2.0
    } else {
        let m = near as f64;
        m * (m + 1.0) / 2.0 + (nf - m) * m
    };
    let far_rows = n.saturating_sub(near);
    let far = if far_rows > 0 { poly_flops(far_rows, d, dv, r, true, chunk) } else { 0.0 };
    2.0 * pairs * (4 * d + 3 * dv) as f64 + far + 4.0 * nf * dv as f64
}

/// Working memory of the polynomial kernels for one head, in bytes, excluding inputs, outputs
/// and O(n + C·g) vectors: the `r×(d_v+1)` state and its gradient, and the chunk scratch of
/// `poly::Head::scratch_len` (centered): three `r×C` feature buffers (`Φᵀ`, `Ψᵀ`,
/// `dΦᵀ`), two `C×C` tiles (causal), four `C×(d_v+1)` value/gradient chunks (two row-major, two
/// transposed) and three `d×C` transposed inputs (`elem` = 4 for f32, 8 for f64). O(C·r + r·d_v),
/// never O(n·r). (A causal forward's saved block states are not scratch:
/// [`super::poly::block_states_len`].)
pub fn poly_state_bytes(d: usize, dv: usize, r: usize, chunk: usize, elem: usize) -> usize {
    let (e, c) = (dv + 1, chunk.max(1));
    elem * (2 * r * e + 3 * c * r + 2 * c * c + 4 * c * e + 3 * c * d)
}

/// FLOPs of ALTGrad forward + backward for one head as `attention::altgrad` does them (MATH §5,
/// §7), with `e = d_v + 1`, `w = d` (Q/K/V form) and chunk `C = min(chunk, n)`:
///
/// - forward (the polynomial forward): GEMMs `4nre`; causal adds the diagonal blocks `2nC(d + e)`;
/// - backward: four Kronecker GEMMs `8·n·r·e·d` (the key-side state `(Φ_K ⊘ V')ᵀK`, `p K` through
///   it, the query-side state `(D̃⁻¹Φ_Q ⊘ G')ᵀQ`, `pᵀQ` through it), `f̃ᵀG` `4nr·d_v`, the
///   denominators `2nr`, the row contractions `4n·e·d`; causal adds the diagonal blocks
///   `2nC(e + 3d + d_v)` and the scores `2nCd`;
/// - feature work ≈ `13nr` (non-causal) or `22nr` (causal): the feature passes, row weights and
///   normalizations.
///
/// The backward is ≈ `8·n·r·(d_v+1)·d` (MATH §7's `4·n·r·d_v·d` counts multiply-adds).
pub fn altgrad_flops(n: usize, d: usize, dv: usize, r: usize, causal: bool, chunk: usize) -> f64 {
    let (nf, rf, e, df, dvf) = (n as f64, r as f64, (dv + 1) as f64, d as f64, dv as f64);
    let c = chunk.max(1).min(n.max(1)) as f64;
    let fwd = 4.0 * nf * rf * e + if causal { 2.0 * nf * c * (df + e) } else { 0.0 };
    let bwd = 8.0 * nf * rf * e * df
        + 4.0 * nf * rf * dvf
        + 2.0 * nf * rf
        + 4.0 * nf * e * df
        + if causal { 2.0 * nf * c * (e + 4.0 * df + dvf) } else { 0.0 };
    let features = if causal { 22.0 } else { 13.0 } * nf * rf;
    fwd + bwd + features
}

/// Working memory of the exact kernels for one head, in bytes: the two `BLOCK_Q×BLOCK_K` score
/// tiles (scores and probabilities) of [`super::exact`] (`elem` = 4 for f32, 8 for f64),
/// independent of `n` (MATH §2: O(n) memory overall, the inputs and outputs excluded).
pub fn exact_state_bytes(elem: usize) -> usize {
    elem * 2 * BLOCK_Q * BLOCK_K
}

/// Working memory of ALTGrad's backward for one head, in bytes, excluding inputs and outputs:
/// the two Kronecker states `r·(d_v+1)·d` and their chunk slices `C·(d_v+1)·d`, two `C×r` feature
/// buffers and two `C×C` tiles (MATH §5; `elem` = 4 for f32, 8 for f64).
pub fn altgrad_state_bytes(d: usize, dv: usize, r: usize, chunk: usize, elem: usize) -> usize {
    let (e, c) = (dv + 1, chunk);
    elem * (2 * r * e * d + 2 * c * e * d + 2 * c * r + 2 * c * c)
}
