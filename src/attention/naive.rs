//! O(n²) materialized references, in f64, for tests only (not part of the stable API).
//!
//! Direct transcriptions of MATH §1–2: `S = τ Q Kᵀ`, mask, `P = softmax(S)`, `O = P V`, and the
//! textbook backward `dV = Pᵀ G`, `dP = G Vᵀ`, `dS = P ∘ (dP − rowsum(dP ∘ P))`, `dQ = τ dS K`,
//! `dK = τ dSᵀ Q`, one head at a time with GQA head mapping.
#![allow(clippy::needless_range_loop)]

use super::AttnShape;

fn idx(i: usize, h: usize, c: usize, heads: usize, w: usize) -> usize {
    (i * heads + h) * w + c
}

/// Materialized softmax probabilities of query head `h`: `[n][n]` (masked entries 0).
pub fn probs(q: &[f64], k: &[f64], s: &AttnShape, causal: bool, scale: f64, h: usize) -> Vec<Vec<f64>> {
    let n = s.seq_len;
    let kv = h / (s.num_heads / s.num_kv_heads);
    let mut p = vec![vec![0.0; n]; n];
    for i in 0..n {
        let jmax = if causal { i + 1 } else { n };
        let mut mx = f64::NEG_INFINITY;
        for j in 0..jmax {
            let dot: f64 = (0..s.head_dim)
                .map(|c| q[idx(i, h, c, s.num_heads, s.head_dim)] * k[idx(j, kv, c, s.num_kv_heads, s.head_dim)])
                .sum();
            p[i][j] = scale * dot;
            mx = mx.max(p[i][j]);
        }
        let mut sum = 0.0;
        for j in 0..jmax {
            p[i][j] = (p[i][j] - mx).exp();
            sum += p[i][j];
        }
        for j in 0..jmax {
            p[i][j] /= sum;
        }
    }
    p
}

/// Naive forward: returns `o [n, num_heads, head_dim_v]`.
pub fn forward(q: &[f64], k: &[f64], v: &[f64], s: &AttnShape, causal: bool, scale: f64) -> Vec<f64> {
    let n = s.seq_len;
    let mut o = vec![0.0; n * s.num_heads * s.head_dim_v];
    for h in 0..s.num_heads {
        let kv = h / (s.num_heads / s.num_kv_heads);
        let p = probs(q, k, s, causal, scale, h);
        for i in 0..n {
            for c in 0..s.head_dim_v {
                o[idx(i, h, c, s.num_heads, s.head_dim_v)] =
                    (0..n).map(|j| p[i][j] * v[idx(j, kv, c, s.num_kv_heads, s.head_dim_v)]).sum();
            }
        }
    }
    o
}

/// Naive backward: returns `(dq, dk, dv)` for upstream `g = dL/do`.
pub fn backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    g: &[f64],
    s: &AttnShape,
    causal: bool,
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = s.seq_len;
    let (d, dvw) = (s.head_dim, s.head_dim_v);
    let mut dq = vec![0.0; n * s.num_heads * d];
    let mut dk = vec![0.0; n * s.num_kv_heads * d];
    let mut dv = vec![0.0; n * s.num_kv_heads * dvw];
    for h in 0..s.num_heads {
        let kv = h / (s.num_heads / s.num_kv_heads);
        let p = probs(q, k, s, causal, scale, h);
        for i in 0..n {
            // dP_ij = g_i · v_j
            let dp: Vec<f64> = (0..n)
                .map(|j| {
                    (0..dvw).map(|c| g[idx(i, h, c, s.num_heads, dvw)] * v[idx(j, kv, c, s.num_kv_heads, dvw)]).sum()
                })
                .collect();
            let rs: f64 = (0..n).map(|j| dp[j] * p[i][j]).sum();
            for j in 0..n {
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
#[allow(clippy::too_many_arguments)]
pub fn poly_weights(
    q: &[f64],
    k: &[f64],
    s: &AttnShape,
    causal: bool,
    scale: f64,
    degree: usize,
    center: bool,
    h: usize,
) -> (Vec<Vec<f64>>, Vec<f64>, Vec<Vec<f64>>) {
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
#[allow(clippy::too_many_arguments)]
pub fn poly_forward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s: &AttnShape,
    causal: bool,
    scale: f64,
    degree: usize,
    center: bool,
) -> Vec<f64> {
    let n = s.seq_len;
    let dvw = s.head_dim_v;
    let mut o = vec![0.0; n * s.num_heads * dvw];
    for h in 0..s.num_heads {
        let kv = h / (s.num_heads / s.num_kv_heads);
        let (a, _, _) = poly_weights(q, k, s, causal, scale, degree, center, h);
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
#[allow(clippy::too_many_arguments)]
pub fn poly_backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    g: &[f64],
    s: &AttnShape,
    causal: bool,
    scale: f64,
    degree: usize,
    center: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = s.seq_len;
    let (d, dvw) = (s.head_dim, s.head_dim_v);
    let mut dq = vec![0.0; n * s.num_heads * d];
    let mut dk = vec![0.0; n * s.num_kv_heads * d];
    let mut dv = vec![0.0; n * s.num_kv_heads * dvw];
    for h in 0..s.num_heads {
        let kv = h / (s.num_heads / s.num_kv_heads);
        let (a, m, kbar) = poly_weights(q, k, s, causal, scale, degree, center, h);
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
