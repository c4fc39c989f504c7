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
