//! O(n²) materialized references, in f64, for tests only (not part of the stable API).
//!
//! Direct transcriptions of MATH §1–2: `S = τ Q Kᵀ`, an explicit boolean mask, `P = softmax(S)`,
//! `O = P V`, and the textbook backward `dV = Pᵀ G`, `dP = G Vᵀ`, `dS = P ∘ (dP − rowsum(dP ∘ P))`, `dQ = τ dS K`,
//! `dK = τ dSᵀ Q`, one head at a time with GQA head mapping.
#![allow(clippy::needless_range_loop)]

use super::{AttnShape, Qkv};

fn idx(i: usize, h: usize, c: usize, heads: usize, w: usize) -> usize {
    (i * heads + h) * w + c
}

/// Zero `(dq, dk, dv)` in the layouts of `s`.
fn zero_grads(s: &AttnShape) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (n, nk) = (s.seq_len, s.kv_len);
    (
        vec![0.0; n * s.num_heads * s.head_dim],
        vec![0.0; nk * s.num_kv_heads * s.head_dim],
        vec![0.0; nk * s.num_kv_heads * s.head_dim_v],
    )
}

/// The polynomial model of MATH §3–5 as the references take it: causal mask or not, score scale
/// τ, degree `g` of `T_g`, row shift on or off.
#[derive(Clone, Copy, Debug)]
pub struct Poly {
    /// Causal mask `j ≤ i`.
    pub causal: bool,
    /// Score scale τ.
    pub scale: f64,
    /// Degree `g`.
    pub degree: usize,
    /// Row shift `m_i = τ q_i·k̄_i`.
    pub center: bool,
}

impl Poly {
    /// `Poly { causal, scale, degree, center }`.
    pub fn new(causal: bool, scale: f64, degree: usize, center: bool) -> Self {
        Poly { causal, scale, degree, center }
    }
}

/// The explicit `[n][n_k]` mask of the causal (`j ≤ i`) or full pattern.
pub fn causal_mask(n: usize, nk: usize, causal: bool) -> Vec<Vec<bool>> {
    (0..n).map(|i| (0..nk).map(|j| !causal || j <= i).collect()).collect()
}

/// Materialized softmax probabilities of query head `h` under the explicit mask `allowed [n][n_k]`
/// (`true` where query row `i` sees key `j`; every row sees at least one key): `[n][n_k]`, masked
/// entries 0. Keys are `s.kv_len` rows.
pub fn probs_masked(q: &[f64], k: &[f64], s: &AttnShape, allowed: &[Vec<bool>], scale: f64, h: usize) -> Vec<Vec<f64>> {
    let (n, nk) = (s.seq_len, s.kv_len);
    let kv = h / (s.num_heads / s.num_kv_heads);
    let mut p = vec![vec![0.0; nk]; n];
    for i in 0..n {
        let seen: Vec<usize> = (0..nk).filter(|&j| allowed[i][j]).collect();
        let mut mx = f64::NEG_INFINITY;
        for &j in &seen {
            let dot: f64 = (0..s.head_dim)
                .map(|c| q[idx(i, h, c, s.num_heads, s.head_dim)] * k[idx(j, kv, c, s.num_kv_heads, s.head_dim)])
                .sum();
            p[i][j] = scale * dot;
            mx = mx.max(p[i][j]);
        }
        let mut sum = 0.0;
        for &j in &seen {
            p[i][j] = (p[i][j] - mx).exp();
            sum += p[i][j];
        }
        for &j in &seen {
            p[i][j] /= sum;
        }
    }
    p
}

/// [`probs_masked`] with the causal or full mask: `[n][n]`.
pub fn probs(q: &[f64], k: &[f64], s: &AttnShape, causal: bool, scale: f64, h: usize) -> Vec<Vec<f64>> {
    probs_masked(q, k, s, &causal_mask(s.seq_len, s.kv_len, causal), scale, h)
}

/// Naive forward under the explicit mask `allowed [n][n_k]`: returns `o [n, num_heads, head_dim_v]`.
pub fn forward_masked(x: &Qkv<'_, f64>, allowed: &[Vec<bool>], scale: f64) -> Vec<f64> {
    let (q, k, v, s) = (x.q(), x.k(), x.v(), x.shape());
    let (n, nk) = (s.seq_len, s.kv_len);
    let mut o = vec![0.0; n * s.num_heads * s.head_dim_v];
    for h in 0..s.num_heads {
        let kv = h / (s.num_heads / s.num_kv_heads);
        let p = probs_masked(q, k, s, allowed, scale, h);
        for i in 0..n {
            for c in 0..s.head_dim_v {
                o[idx(i, h, c, s.num_heads, s.head_dim_v)] =
                    (0..nk).map(|j| p[i][j] * v[idx(j, kv, c, s.num_kv_heads, s.head_dim_v)]).sum();
            }
        }
    }
    o
}

/// Naive forward, causal or full: returns `o [n, num_heads, head_dim_v]`.
pub fn forward(q: &[f64], k: &[f64], v: &[f64], s: &AttnShape, causal: bool, scale: f64) -> Vec<f64> {
    forward_masked(
        &Qkv::new(q, k, v, s).expect("naive::forward: lengths"),
        &causal_mask(s.seq_len, s.kv_len, causal),
        scale,
    )
}

/// Naive backward under the explicit mask `allowed [n][n_k]`: returns `(dq, dk, dv)` for upstream
/// `g = dL/do`.
pub fn backward_masked(
    x: &Qkv<'_, f64>,
    g: &[f64],
    allowed: &[Vec<bool>],
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (q, k, v, s) = (x.q(), x.k(), x.v(), x.shape());
    let (n, nk) = (s.seq_len, s.kv_len);
    let (d, dvw) = (s.head_dim, s.head_dim_v);
    let (mut dq, mut dk, mut dv) = zero_grads(s);
    for h in 0..s.num_heads {
        let kv = h / (s.num_heads / s.num_kv_heads);
        let p = probs_masked(q, k, s, allowed, scale, h);
        for i in 0..n {
            // dP_ij = g_i · v_j
            let dp: Vec<f64> = (0..nk)
                .map(|j| {
                    (0..dvw).map(|c| g[idx(i, h, c, s.num_heads, dvw)] * v[idx(j, kv, c, s.num_kv_heads, dvw)]).sum()
                })
                .collect();
            let rs: f64 = (0..nk).map(|j| dp[j] * p[i][j]).sum();
            for j in 0..nk {
                let ds = p[i][j] * (dp[j] - rs);
                for c in 0..d {
                    dq[idx(i, h, c, s.num_heads, d)] += scale * ds * k[idx(j, kv, c, s.num_kv_heads, d)];
                    dk[idx(j, kv, c, s.num_kv_heads, d)] += scale * ds * q[idx(i, h, c, s.num_heads, d)];
                }
                for c in 0..dvw {
                    dv[idx(j, kv, c, s.num_kv_heads, dvw)] += p[i][j] * g[idx(i, h, c, s.num_heads, dvw)];
                }
            }
        }
    }
    (dq, dk, dv)
}

/// Naive backward, causal or full: returns `(dq, dk, dv)` for upstream `g = dL/do`.
pub fn backward(x: &Qkv<'_, f64>, g: &[f64], causal: bool, scale: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let s = x.shape();
    backward_masked(x, g, &causal_mask(s.seq_len, s.kv_len, causal), scale)
}

/// `T_g(x) = Σ_{t≤g} xᵗ/t!`, summed term by term (MATH §3).
pub fn taylor_exp(g: usize, x: f64) -> f64 {
    let (mut term, mut sum) = (1.0, 1.0);
    for t in 1..=g {
        term *= x / t as f64;
        sum += term;
    }
    sum
}

/// Materialized polynomial-attention weights of query head `h` (MATH §3–4): `A_ij = T_g(s_ij − m_i)`
/// for visible `j` (0 where masked), with `s_ij = scale·q_i·k_j`, `m_i = scale·q_i·k̄_i`, and `k̄_i`
/// the mean of the keys row `i` sees (all keys, or `j ≤ i` under the causal mask); `m_i = 0`
/// without `center`. Returns `(A [n][n], m [n], k̄ [n][d])`.
pub fn poly_weights(
    q: &[f64],
    k: &[f64],
    s: &AttnShape,
    p: &Poly,
    h: usize,
) -> (Vec<Vec<f64>>, Vec<f64>, Vec<Vec<f64>>) {
    let Poly { causal, scale, degree, center } = *p;
    let n = s.seq_len;
    let d = s.head_dim;
    let kv = h / (s.num_heads / s.num_kv_heads);
    let qv = |i: usize, c: usize| q[idx(i, h, c, s.num_heads, d)];
    let kvv = |j: usize, c: usize| k[idx(j, kv, c, s.num_kv_heads, d)];
    let mut a = vec![vec![0.0; n]; n];
    let mut m = vec![0.0; n];
    let mut kbar = vec![vec![0.0; d]; n];
    for i in 0..n {
        let jmax = if causal { i + 1 } else { n };
        for c in 0..d {
            let mut sum = 0.0;
            for j in 0..jmax {
                sum += kvv(j, c);
            }
            kbar[i][c] = sum / jmax as f64;
        }
        if center {
            let mut dot = 0.0;
            for c in 0..d {
                dot += qv(i, c) * kbar[i][c];
            }
            m[i] = scale * dot;
        }
        for j in 0..jmax {
            let mut dot = 0.0;
            for c in 0..d {
                dot += qv(i, c) * kvv(j, c);
            }
            a[i][j] = taylor_exp(degree, scale * dot - m[i]);
        }
    }
    (a, m, kbar)
}

/// Naive polynomial-attention forward: `P = A / rowsum(A)`, `O = P V` with `A` from
/// [`poly_weights`]; returns `o [n, num_heads, head_dim_v]`.
pub fn poly_forward(q: &[f64], k: &[f64], v: &[f64], s: &AttnShape, p: &Poly) -> Vec<f64> {
    let n = s.seq_len;
    let dvw = s.head_dim_v;
    let mut o = vec![0.0; n * s.num_heads * dvw];
    for h in 0..s.num_heads {
        let kv = h / (s.num_heads / s.num_kv_heads);
        let (a, _, _) = poly_weights(q, k, s, p, h);
        for i in 0..n {
            let den: f64 = a[i].iter().sum();
            for c in 0..dvw {
                let mut num = 0.0;
                for j in 0..n {
                    num += a[i][j] * v[idx(j, kv, c, s.num_kv_heads, dvw)];
                }
                o[idx(i, h, c, s.num_heads, dvw)] = num / den;
            }
        }
    }
    o
}

/// Naive polynomial-attention backward for upstream `g = dL/do`; returns `(dq, dk, dv)`.
///
/// Written out from the forward: `dA_ij = g_i·(v_j − o_i)/D_i` (visible `j`),
/// `dS̃_ij = dA_ij T_{g−1}(s̃_ij)`, `dq_i += scale Σ_j dS̃_ij k_j`, `dk_j += scale dS̃_ij q_i`,
/// `dm_i = −Σ_j dS̃_ij`; through `m_i = scale q_i·k̄_i`: `dq_i += scale dm_i k̄_i` and every key `j`
/// row `i` sees gets `scale dm_i q_i / |{j visible}|`; `dv_j += P_ij g_i`.
pub fn poly_backward(x: &Qkv<'_, f64>, g: &[f64], p: &Poly) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (q, k, v, s) = (x.q(), x.k(), x.v(), x.shape());
    let Poly { causal, scale, degree, center } = *p;
    let n = s.seq_len;
    let (d, dvw) = (s.head_dim, s.head_dim_v);
    let (mut dq, mut dk, mut dv) = zero_grads(s);
    for h in 0..s.num_heads {
        let kv = h / (s.num_heads / s.num_kv_heads);
        let (a, m, kbar) = poly_weights(q, k, s, p, h);
        for i in 0..n {
            let jmax = if causal { i + 1 } else { n };
            let den: f64 = a[i].iter().sum();
            let mut o = vec![0.0; dvw];
            for c in 0..dvw {
                for j in 0..jmax {
                    o[c] += a[i][j] / den * v[idx(j, kv, c, s.num_kv_heads, dvw)];
                }
            }
            let mut dm = 0.0;
            for j in 0..jmax {
                let mut da = 0.0;
                for c in 0..dvw {
                    da += g[idx(i, h, c, s.num_heads, dvw)] * (v[idx(j, kv, c, s.num_kv_heads, dvw)] - o[c]);
                }
                da /= den;
                let mut dot = 0.0;
                for c in 0..d {
                    dot += q[idx(i, h, c, s.num_heads, d)] * k[idx(j, kv, c, s.num_kv_heads, d)];
                }
                let ds = da * taylor_exp(degree - 1, scale * dot - m[i]);
                dm -= ds;
                for c in 0..d {
                    dq[idx(i, h, c, s.num_heads, d)] += scale * ds * k[idx(j, kv, c, s.num_kv_heads, d)];
                    dk[idx(j, kv, c, s.num_kv_heads, d)] += scale * ds * q[idx(i, h, c, s.num_heads, d)];
                }
                for c in 0..dvw {
                    dv[idx(j, kv, c, s.num_kv_heads, dvw)] += a[i][j] / den * g[idx(i, h, c, s.num_heads, dvw)];
                }
            }
            if center {
                for c in 0..d {
                    dq[idx(i, h, c, s.num_heads, d)] += scale * dm * kbar[i][c];
                }
                for j in 0..jmax {
                    for c in 0..d {
                        dk[idx(j, kv, c, s.num_kv_heads, d)] +=
                            scale * dm * q[idx(i, h, c, s.num_heads, d)] / jmax as f64;
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

/// LSSSZ's approximate attention matrix of query head `h` (MATH §5): `f̃ = D̃⁻¹ A` with `A` from
/// [`poly_weights`] (`A_ij = T_g(s_ij − m_i)` = `Φ_Q Φ_Kᵀ` with the row shift; 0 where masked).
pub fn altgrad_matrix(q: &[f64], k: &[f64], s: &AttnShape, p: &Poly, h: usize) -> Vec<Vec<f64>> {
    let (mut a, _, _) = poly_weights(q, k, s, p, h);
    for row in &mut a {
        let den: f64 = row.iter().sum();
        for x in row.iter_mut() {
            *x /= den;
        }
    }
    a
}

/// Single-head gradients of `L = ⟨G, f V⟩` written with a fixed attention matrix `f` (MATH §5
/// applied literally; LSSSZ Def C.12, Lemma C.16, Def D.16): `o = f V`, `δ_i = G_i·o_i`,
/// `p₁ = f ∘ (G Vᵀ)`, `p₂ = diag(δ) f`, `p = p₁ − p₂`, `dq = τ p K`, `dk = τ pᵀ Q`, `dv = fᵀ G`.
/// With the exact softmax `f` this is the exact gradient; with `f̃` it is ALTGrad.
#[derive(Clone, Debug)]
pub struct MatrixGrads {
    /// `p = p₁ − p₂`, `[n][n]`.
    pub p: Vec<Vec<f64>>,
    /// `τ p K`, `[n, d]`.
    pub dq: Vec<f64>,
    /// `τ pᵀ Q`, `[n, d]`.
    pub dk: Vec<f64>,
    /// `fᵀ G`, `[n, dv]`.
    pub dv: Vec<f64>,
}

/// See [`MatrixGrads`]: `f [n][n]`, `q`, `k [n, d]`, `v`, `g [n, dv]` (one head, row-major).
#[allow(clippy::too_many_arguments)]
pub fn grads_from_matrix(
    f: &[Vec<f64>],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    g: &[f64],
    n: usize,
    d: usize,
    dvw: usize,
    scale: f64,
) -> MatrixGrads {
    let mut o = vec![0.0; n * dvw];
    for i in 0..n {
        for j in 0..n {
            for c in 0..dvw {
                o[i * dvw + c] += f[i][j] * v[j * dvw + c];
            }
        }
    }
    let delta: Vec<f64> = (0..n).map(|i| (0..dvw).map(|c| g[i * dvw + c] * o[i * dvw + c]).sum()).collect();
    let mut p = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in 0..n {
            let gv: f64 = (0..dvw).map(|c| g[i * dvw + c] * v[j * dvw + c]).sum();
            let p1 = f[i][j] * gv;
            let p2 = delta[i] * f[i][j];
            p[i][j] = p1 - p2;
        }
    }
    let (mut dq, mut dk, mut dv) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; n * dvw]);
    for i in 0..n {
        for j in 0..n {
            for c in 0..d {
                dq[i * d + c] += scale * p[i][j] * k[j * d + c];
                dk[j * d + c] += scale * p[i][j] * q[i * d + c];
            }
            for c in 0..dvw {
                dv[j * dvw + c] += f[i][j] * g[i * dvw + c];
            }
        }
    }
    MatrixGrads { p, dq, dk, dv }
}

/// Copies head `h` of `x [n, heads, w]` into `[n, w]`.
fn head_of(x: &[f64], n: usize, heads: usize, w: usize, h: usize) -> Vec<f64> {
    (0..n * w).map(|t| x[idx(t / w, h, t % w, heads, w)]).collect()
}

/// Naive ALTGrad forward (MATH §5): `o = f̃ V` per head with [`altgrad_matrix`];
/// returns `o [n, num_heads, head_dim_v]`.
pub fn altgrad_forward(q: &[f64], k: &[f64], v: &[f64], s: &AttnShape, p: &Poly) -> Vec<f64> {
    let n = s.seq_len;
    let dvw = s.head_dim_v;
    let mut o = vec![0.0; n * s.num_heads * dvw];
    for h in 0..s.num_heads {
        let kv = h / (s.num_heads / s.num_kv_heads);
        let f = altgrad_matrix(q, k, s, p, h);
        for i in 0..n {
            for c in 0..dvw {
                o[idx(i, h, c, s.num_heads, dvw)] =
                    (0..n).map(|j| f[i][j] * v[idx(j, kv, c, s.num_kv_heads, dvw)]).sum();
            }
        }
    }
    o
}

/// Naive ALTGrad backward (MATH §5 literally, [`grads_from_matrix`] with `f̃` per head, no chain
/// rule through the row shift); GQA `dk`, `dv` summed over each group. Returns `(dq, dk, dv)`.
pub fn altgrad_backward(x: &Qkv<'_, f64>, g: &[f64], p: &Poly) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (q, k, v, s) = (x.q(), x.k(), x.v(), x.shape());
    let scale = p.scale;
    let n = s.seq_len;
    let (d, dvw) = (s.head_dim, s.head_dim_v);
    let (mut dq, mut dk, mut dv) = zero_grads(s);
    for h in 0..s.num_heads {
        let kv = h / (s.num_heads / s.num_kv_heads);
        let f = altgrad_matrix(q, k, s, p, h);
        let mg = grads_from_matrix(
            &f,
            &head_of(q, n, s.num_heads, d, h),
            &head_of(k, n, s.num_kv_heads, d, kv),
            &head_of(v, n, s.num_kv_heads, dvw, kv),
            &head_of(g, n, s.num_heads, dvw, h),
            n,
            d,
            dvw,
            scale,
        );
        for i in 0..n {
            for c in 0..d {
                dq[idx(i, h, c, s.num_heads, d)] = mg.dq[i * d + c];
                dk[idx(i, kv, c, s.num_kv_heads, d)] += mg.dk[i * d + c];
            }
            for c in 0..dvw {
                dv[idx(i, kv, c, s.num_kv_heads, dvw)] += mg.dv[i * dvw + c];
            }
        }
    }
    (dq, dk, dv)
}

/// The W-form of one layer (LSSSZ Lemmas D.17, F.4, G.3 as corrected in MATH §5.4) for a fixed
/// attention matrix `f [n][n]`: `x [n, hdim]`, `w = W_Q W_Kᵀ [hdim, hdim]`, `w_v [hdim, dv]`,
/// `g [n, dv]`. With `V = X W_V`, `p` as in [`grads_from_matrix`], returns
/// `(dW = τ Xᵀ p X, dW_V = Xᵀ fᵀ G, dX = τ(p X Wᵀ + pᵀ X W) + fᵀ G W_Vᵀ)`.
#[allow(clippy::too_many_arguments)]
pub fn w_form_from_matrix(
    f: &[Vec<f64>],
    x: &[f64],
    w: &[f64],
    w_v: &[f64],
    g: &[f64],
    n: usize,
    hdim: usize,
    dvw: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; n * dvw];
    for i in 0..n {
        for c in 0..dvw {
            v[i * dvw + c] = (0..hdim).map(|a| x[i * hdim + a] * w_v[a * dvw + c]).sum();
        }
    }
    // q = k = x in grads_from_matrix gives p X and pᵀ X (times τ) and fᵀ G.
    let mg = grads_from_matrix(f, x, x, &v, g, n, hdim, dvw, scale);
    let (px, ptx, ftg) = (&mg.dq, &mg.dk, &mg.dv); // τ p X, τ pᵀ X, fᵀ G
    let mut dw = vec![0.0; hdim * hdim];
    for a in 0..hdim {
        for b in 0..hdim {
            dw[a * hdim + b] = (0..n).map(|i| x[i * hdim + a] * px[i * hdim + b]).sum();
        }
    }
    let mut dw_v = vec![0.0; hdim * dvw];
    for a in 0..hdim {
        for c in 0..dvw {
            dw_v[a * dvw + c] = (0..n).map(|i| x[i * hdim + a] * ftg[i * dvw + c]).sum();
        }
    }
    let mut dx = vec![0.0; n * hdim];
    for i in 0..n {
        for a in 0..hdim {
            let mut acc = 0.0;
            for b in 0..hdim {
                acc += px[i * hdim + b] * w[a * hdim + b] + ptx[i * hdim + b] * w[b * hdim + a];
            }
            for c in 0..dvw {
                acc += ftg[i * dvw + c] * w_v[a * dvw + c];
            }
            dx[i * hdim + a] = acc;
        }
    }
    (dw, dw_v, dx)
}

/// Naive hybrid attention (MATH §4.1), causal, one sequence: row `i` weighs key `j ≤ i` by
/// `exp(s_ij)` when it is near (`i − j < window` or `j < sinks`), else by
/// `T_g(s_ij − μ_i)·exp(μ_i)` with `μ_i = scale·q_i·k̄_i`, `k̄_i` the mean of row `i`'s far keys
/// (`sinks ≤ j ≤ i − window`; `μ_i = 0` without `center`); `o_i = Σ_j a_ij v_j / Σ_j a_ij`, from
/// log-weights with the row maximum subtracted (even `degree`: `T_g > 0`). Returns
/// `o [n, num_heads, head_dim_v]`.
#[allow(clippy::too_many_arguments)]
pub fn hybrid_forward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s: &AttnShape,
    p: &Poly,
    window: usize,
    sinks: usize,
) -> Vec<f64> {
    let (n, d, dvw) = (s.seq_len, s.head_dim, s.head_dim_v);
    let mut o = vec![0.0; n * s.num_heads * dvw];
    for h in 0..s.num_heads {
        let kv = h / (s.num_heads / s.num_kv_heads);
        let qv = |i: usize, c: usize| q[idx(i, h, c, s.num_heads, d)];
        let kvv = |j: usize, c: usize| k[idx(j, kv, c, s.num_kv_heads, d)];
        for i in 0..n {
            let far: Vec<usize> = (0..=i).filter(|&j| i - j >= window && j >= sinks).collect();
            let mut mu = 0.0;
            if p.center && !far.is_empty() {
                for c in 0..d {
                    let kb: f64 = far.iter().map(|&j| kvv(j, c)).sum::<f64>() / far.len() as f64;
                    mu += qv(i, c) * kb;
                }
                mu *= p.scale;
            }
            let logw: Vec<f64> = (0..=i)
                .map(|j| {
                    let sij = p.scale * (0..d).map(|c| qv(i, c) * kvv(j, c)).sum::<f64>();
                    if i - j < window || j < sinks {
                        sij
                    } else {
                        taylor_exp(p.degree, sij - mu).ln() + mu
                    }
                })
                .collect();
            let mx = logw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logw.iter().map(|l| (l - mx).exp()).collect();
            let den: f64 = w.iter().sum();
            for c in 0..dvw {
                let num: f64 = w.iter().enumerate().map(|(j, a)| a * v[idx(j, kv, c, s.num_kv_heads, dvw)]).sum();
                o[idx(i, h, c, s.num_heads, dvw)] = num / den;
            }
        }
    }
    o
}
