//! Measurement helpers shared by `benches/` (and later `altgrad bench`): the machine's GEMM peak,
//! FLOP counts (MATH §7), and median wall-clock timing.

use crate::attention::{self, AttnOptions, AttnShape};
use crate::linalg::{matmul, par_all, rm, rm_mut};
use std::time::Instant;

/// Median wall-clock seconds of `reps` runs of `f` after one warm-up run.
pub fn median_time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut ts: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(|a, b| a.total_cmp(b));
    ts[ts.len() / 2]
}

/// Measured f32 GEMM rate of `faer` on this machine in GFLOP/s: the median of `reps` products
/// `[m, k] · [k, n]` (2mkn FLOPs each) using all rayon threads.
pub fn gemm_gflops(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 13.0).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 11.0).collect();
    let mut c = vec![0.0f32; m * n];
    let t = median_time(reps, || matmul(rm_mut(&mut c, m, n), false, rm(&a, m, k), rm(&b, k, n), 1.0, par_all()));
    2.0 * (m * k * n) as f64 / t / 1e9
}

/// FLOPs of exact attention forward + backward for all heads (MATH §7): per head
/// `4n²d` (fwd) + `10n²d` (bwd with recompute), halved when causal (d = d_v assumed).
pub fn exact_attention_flops(s: &AttnShape, causal: bool) -> f64 {
    let n = s.seq_len as f64;
    let per_head = 14.0 * n * n * s.head_dim as f64;
    let f = per_head * s.num_heads as f64;
    if causal {
        f / 2.0
    } else {
        f
    }
}

/// One timed exact-attention configuration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExactRun {
    /// Sequence length.
    pub n: usize,
    /// Head width.
    pub head_dim: usize,
    /// Query heads (= key/value heads here).
    pub num_heads: usize,
    /// Causal mask.
    pub causal: bool,
    /// Median forward seconds.
    pub fwd_s: f64,
    /// Median backward seconds.
    pub bwd_s: f64,
    /// FLOPs of forward + backward (MATH §7).
    pub flops: f64,
    /// Achieved GFLOP/s of forward + backward.
    pub gflops: f64,
}

/// Times exact attention forward and backward (f32, random inputs) for one configuration.
pub fn time_exact(n: usize, head_dim: usize, num_heads: usize, causal: bool, reps: usize) -> ExactRun {
    let s = AttnShape::new(n, num_heads, num_heads, head_dim);
    let opts = AttnOptions::standard(head_dim, causal);
    let len = n * num_heads * head_dim;
    let gen = |seed: usize| -> Vec<f32> {
        (0..len).map(|i| (((i * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0).collect()
    };
    let (q, k, v, g) = (gen(1), gen(2), gen(3), gen(4));
    let mut fwd = None;
    let fwd_s = median_time(reps, || fwd = Some(attention::forward_exact(&q, &k, &v, &s, &opts).unwrap()));
    let fwd = fwd.unwrap();
    let bwd_s = median_time(reps, || {
        std::hint::black_box(attention::backward_exact(&q, &k, &v, &fwd, &g, &s, &opts).unwrap());
    });
    let flops = exact_attention_flops(&s, causal);
    ExactRun { n, head_dim, num_heads, causal, fwd_s, bwd_s, flops, gflops: flops / (fwd_s + bwd_s) / 1e9 }
}

/// Peak resident set size of this process so far, in bytes (`VmHWM` from `/proc/self/status`);
/// `None` where that file does not exist.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
