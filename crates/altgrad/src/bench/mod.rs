//! Benchmarks and the paper-claims report (`altgrad bench`, issue 7), plus the measurement helpers
//! `benches/` use: the machine's GEMM peak, FLOP counts (MATH §7), median wall-clock timing and
//! memory.
//!
//! - [`run_bench`] runs everything given [`BenchOptions`]: the sweep method × n × head_dim ×
//!   degree × causal (f32, median of repeated fwd+bwd runs after a warm-up, FLOPs, GFLOP/s, ratio
//!   to the f32 GEMM peak measured in the same run, per-point peak memory, relative error against
//!   exact on bounded inputs), the fitted exponents of time in n, the paper-claims data
//!   ([`Claims`]: exponents, error against n at the degree chosen for ε = 1/n, multi-layer
//!   gradient error against depth, crossover lengths), the stage breakdown of the largest poly and
//!   exact cases ([`StageProfile`]), and writes `bench.json`, `bench.csv`, `bench.md` and the
//!   plots (PNG + SVG) to the output directory.
//! - Timing: each point runs the `_into` entry points on one set of caller-owned outputs (written
//!   once before the first repetition) and one workspace (filled by the first call: the warm-up,
//!   where there is one), reused by every repetition as a training loop reuses its buffers, so the
//!   times measure the kernels; the allocating entry points add the first touch of fresh outputs
//!   (page faults) on top, which grows with n.
//! - Memory: each point's `peak_rss_bytes` is measured, not computed: the heap is trimmed, the
//!   process's peak RSS (`VmHWM`) is reset before the point by writing `5` to
//!   `/proc/self/clear_refs` (Linux), a helper thread samples the RSS every 2 ms during the point
//!   (the kernel's high-water mark alone misses memory returned to the allocator), and the point
//!   reports `max(VmHWM, sampled RSS) − VmRSS(before)`, i.e. the extra resident memory of its
//!   forward + backward over what was resident before (inputs included in the baseline). Where the reset is unavailable the process-wide `VmHWM` is reported instead and
//!   `memory_method` in the JSON says so. The analytic working memory of the kernels is reported
//!   beside it as `state_bytes`.

// One-way: sweep → claims → plan → report; sweep → profile → report (docs/ARCHITECTURE.md).
mod claims;
mod plan;
mod profile;
mod report;
mod sweep;

pub use plan::BenchOptions;
pub use profile::{profile_exact_stages, profile_poly_stages, Stage, StageProfile};
pub use report::{
    BenchReport, BenchRun, Claims, Crossover, ErrorClaim, ErrorClaimPoint, ErrorSlope, ExponentClaim, Fit,
    MultiLayerClaim, MultiLayerPoint, Skipped, CSV_HEADER,
};
pub use sweep::run_bench;

use crate::attention::{self, AttnOptions, AttnShape};
use crate::linalg::{matmul, par_all, rm, rm_mut};
use faer::Par;
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
    median(&mut ts)
}

/// Median of `xs` (sorted in place; the upper median for even lengths); NaN when empty.
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Fastest wall-clock seconds of `reps` runs of `f` after one warm-up run (for peaks: on a shared
/// machine the fastest run is the one least disturbed).
pub fn best_time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn gemm_rate(m: usize, k: usize, n: usize, reps: usize, par: Par, best: bool) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 13.0).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 11.0).collect();
    let mut c = vec![0.0f32; m * n];
    let mut f = || matmul(rm_mut(&mut c, m, n), false, rm(&a, m, k), rm(&b, k, n), 1.0, par);
    let t = if best { best_time(reps, f) } else { median_time(reps, &mut f) };
    let rate = 2.0 * (m * k * n) as f64 / t / 1e9;
    if !best {
        return rate;
    }
    // the peak is the faster of altgrad's product (the packed GEMM for large parallel f32
    // products) and faer's own: on AMD Zen 4 faer's measured 8–10% faster at 2048³ (BENCHMARKS
    // "Issue 13 on AMD EPYC Zen 4")
    let faer = || {
        faer::linalg::matmul::matmul(rm_mut(&mut c, m, n), faer::Accum::Replace, rm(&a, m, k), rm(&b, k, n), 1.0, par)
    };
    rate.max(2.0 * (m * k * n) as f64 / best_time(reps, faer) / 1e9)
}

/// The f32 GEMM peak in GFLOP/s: the **fastest** of `reps` products `[m, k]·[k, n]` (after a
/// warm-up) on all rayon threads (`seq = false`) or one thread (`seq = true`), each through
/// altgrad's [`matmul`] (the packed GEMM of `simd::packed` for large parallel f32 products on
/// AVX2/AVX-512 CPUs) and through faer's own product, whichever is faster. What `run_bench`
/// divides by.
pub fn gemm_peak_gflops(m: usize, k: usize, n: usize, reps: usize, seq: bool) -> f64 {
    gemm_rate(m, k, n, reps, if seq { Par::Seq } else { par_all() }, true)
}

/// Measured f32 GEMM rate of altgrad's [`matmul`] on this machine in GFLOP/s: the median of
/// `reps` products `[m, k] · [k, n]` (2mkn FLOPs each) using all rayon threads.
pub fn gemm_gflops(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    gemm_rate(m, k, n, reps, par_all(), false)
}

/// [`gemm_gflops`] on one thread (`Par::Seq`): the peak a single head's kernel can reach, since
/// each head runs sequentially.
pub fn gemm_gflops_seq(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    gemm_rate(m, k, n, reps, Par::Seq, false)
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
    let x = attention::Qkv::new(&q, &k, &v, &s).unwrap();
    let mut fwd = None;
    let fwd_s = median_time(reps, || fwd = Some(attention::forward_exact(&x, &opts).unwrap()));
    let fwd = fwd.unwrap();
    let bwd_s = median_time(reps, || {
        std::hint::black_box(attention::backward_exact(&x, &fwd, &g).unwrap());
    });
    let flops = exact_attention_flops(&s, causal);
    ExactRun { n, head_dim, num_heads, causal, fwd_s, bwd_s, flops, gflops: flops / (fwd_s + bwd_s) / 1e9 }
}

fn status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident set size of this process so far, in bytes (`VmHWM` from `/proc/self/status`);
/// `None` where that file does not exist. Since [`reset_peak_rss`]: the peak since the reset.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:")
}

/// Current resident set size in bytes (`VmRSS`); `None` where `/proc/self/status` does not exist.
pub fn current_rss_bytes() -> Option<u64> {
    status_kb("VmRSS:")
}

/// Memory the machine can still give without swapping, in bytes (`MemAvailable` of
/// `/proc/meminfo`); `None` where that file does not exist or has no such line. For refusing a
/// request up front: a failed allocation in Rust aborts the process.
pub fn available_memory_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the process's peak RSS (`VmHWM`) to the current RSS by writing `5` to
/// `/proc/self/clear_refs` (Linux ≥ 4.0). Returns whether the reset worked.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", b"5").is_ok()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn malloc_trim(pad: usize) -> i32;
}

/// Returns freed heap memory to the operating system (glibc `malloc_trim(0)`), so that the next
/// RSS baseline does not count memory the allocator merely kept. No-op elsewhere.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory at the top of/inside the heap; it takes no
    // pointers and is thread-safe in glibc.
    unsafe {
        malloc_trim(0);
    }
}

/// Least-squares slope of `ln y` against `ln x` over `pts` (points with non-positive or
/// non-finite coordinates are ignored); NaN with fewer than two usable points.
pub fn loglog_slope(pts: &[(f64, f64)]) -> f64 {
    let p: Vec<(f64, f64)> = pts
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite() && *x > 0.0 && *y > 0.0)
        .map(|(x, y)| (x.ln(), y.ln()))
        .collect();
    if p.len() < 2 {
        return f64::NAN;
    }
    let k = p.len() as f64;
    let (mx, my) = (p.iter().map(|a| a.0).sum::<f64>() / k, p.iter().map(|a| a.1).sum::<f64>() / k);
    let num: f64 = p.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = p.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    if den == 0.0 {
        f64::NAN
    } else {
        num / den
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_power_law() {
        let pts: Vec<(f64, f64)> = [1.0f64, 2.0, 4.0, 8.0].iter().map(|&x| (x, 3.0 * x.powf(1.5))).collect();
        assert!((loglog_slope(&pts) - 1.5).abs() < 1e-12);
        assert!(loglog_slope(&pts[..1]).is_nan());
    }

    #[test]
    fn altgrad_flops_backward_dominant_term() {
        // n r (d_v+1) d dominates for large r: ratio to 8·n·r·(d_v+1)·d tends to 1 (plus forward)
        let (n, d, r) = (4096, 16, 4845);
        let f = crate::attention::cost::altgrad_flops(n, d, d, r, false, 64);
        let main = 8.0 * (n * r * (d + 1) * d) as f64;
        assert!(f > main && f < 1.1 * main, "{f} vs {main}");
    }

    #[test]
    fn median_is_middle() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert!(median(&mut []).is_nan());
    }
}

/// `"{predicted} s > limit {limit} s"` with as many decimals as it takes (up to 3) for the two
/// numbers to print differently (never "predicted 10 s > limit 10 s").
pub(crate) fn over_limit(predicted: f64, limit: f64) -> String {
    for dec in 0..=3 {
        let (p, l) = (format!("{predicted:.dec$}"), format!("{limit:.dec$}"));
        if p != l || dec == 3 {
            return format!("predicted {p} s > limit {l} s");
        }
    }
    unreachable!()
}

/// `x` as a percentage of a single-thread `peak`, worded honestly above 100% (the peak was
/// measured in the same run and the machine was busier then, or the stage used more threads).
pub(crate) fn of_1thread_peak(x: f64, peak: f64) -> String {
    let pct = 100.0 * x / peak;
    if pct <= 100.0 {
        format!("{pct:.0}% of the 1-thread GEMM peak ({peak:.1} GFLOP/s)")
    } else {
        format!("above the 1-thread GEMM peak ({peak:.1} GFLOP/s) measured in this run")
    }
}

#[cfg(test)]
mod wording_tests {
    use super::*;

    #[test]
    fn limits_and_peaks_read_right() {
        assert_eq!(over_limit(10.4, 10.0), "predicted 10.4 s > limit 10.0 s");
        assert_eq!(over_limit(25.0, 10.0), "predicted 25 s > limit 10 s");
        assert_eq!(over_limit(10.004, 10.0), "predicted 10.004 s > limit 10.000 s");
        assert_eq!(of_1thread_peak(45.0, 90.0), "50% of the 1-thread GEMM peak (90.0 GFLOP/s)");
        assert!(!of_1thread_peak(107.0, 90.0).contains('%'));
    }
}
