//! Polynomial attention (MATH §4) forward+backward against exact attention and the GEMM peak
//! (issue 4).
//!
//! Run: `cargo bench --bench poly_attention` (n up to 65536; add `-- --quick` for n ≤ 8192).
//! Options after `--`: `--chunk C` (causal chunk, default 64), `--stream-chunk C` (non-causal
//! streaming chunk, default 256), `--exact-limit S` (skip exact runs predicted above S seconds,
//! default 60), `--ns 1024,32768` (lengths), `--configs 16:2,64:2` (head_dim:degree pairs). All runs: f32, 4 query heads = 4 key/value heads, head_dim_v = head_dim,
//! random inputs in [−1, 1], centered (row shift on), the same process measuring the GEMM peak,
//! exact attention and polynomial attention. Prints markdown tables: FLOPs of the MATH §7 cost
//! model (`cost::poly_flops`, `cost::exact_flops`), achieved GFLOP/s and the ratio to the f32
//! GEMM peak, speed-up over exact at the same n, the fitted exponent of poly time in n over the
//! three largest sizes, and the crossover n.

use altgrad::attention::{self, cost, features::feature_dim, AttnOptions, AttnShape, PolyOptions};
use altgrad::bench::{gemm_peak_gflops, median_time, time_exact};
use std::collections::HashMap;

/// One timed polynomial-attention configuration.
struct PolyRun {
    fwd_s: f64,
    bwd_s: f64,
    flops: f64,
}

/// Times `forward_poly` and `backward_poly` (f32) for one configuration: median of enough runs
/// to fill about 0.3 s (at least 1, at most 15) after a warm-up. FLOPs from the cost model,
/// summed over heads.
fn time_poly(n: usize, d: usize, g: usize, heads: usize, causal: bool, chunk: usize) -> PolyRun {
    let s = AttnShape::new(n, heads, heads, d);
    let opts = AttnOptions::standard(d, causal);
    let popts = PolyOptions { degree: g, center: true, chunk };
    let len = n * heads * d;
    let gen = |seed: usize| -> Vec<f32> {
        (0..len).map(|i| (((i * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0).collect()
    };
    let (q, k, v, dout) = (gen(1), gen(2), gen(3), gen(4));
    let x = attention::Qkv::new(&q, &k, &v, &s).unwrap();
    let t0 = std::time::Instant::now();
    let fwd = attention::forward_poly(&x, &opts, &popts).unwrap();
    std::hint::black_box(attention::backward_poly(&x, &fwd, &dout).unwrap());
    let reps = (0.3 / t0.elapsed().as_secs_f64()).clamp(1.0, 15.0) as usize;
    let mut fwd = None;
    let fwd_s = median_time(reps, || fwd = Some(attention::forward_poly(&x, &opts, &popts).unwrap()));
    let fwd = fwd.unwrap();
    let bwd_s = median_time(reps, || {
        std::hint::black_box(attention::backward_poly(&x, &fwd, &dout).unwrap());
    });
    let r = feature_dim(d, g).unwrap();
    let flops = heads as f64 * cost::poly_flops(n, d, d, r, causal, chunk);
    PolyRun { fwd_s, bwd_s, flops }
}

fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn arg(name: &str) -> Option<f64> {
    arg_str(name).and_then(|v| v.parse().ok())
}

/// Least-squares slope of log t against log n.
fn slope(pts: &[(usize, f64)]) -> f64 {
    let xs: Vec<f64> = pts.iter().map(|p| (p.0 as f64).ln()).collect();
    let ys: Vec<f64> = pts.iter().map(|p| p.1.ln()).collect();
    let (mx, my) = (xs.iter().sum::<f64>() / xs.len() as f64, ys.iter().sum::<f64>() / ys.len() as f64);
    let num: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    num / den
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let chunk = arg("--chunk").map_or(64, |c| c as usize);
    let stream_chunk = arg("--stream-chunk").map_or(256, |c| c as usize);
    let exact_limit = arg("--exact-limit").unwrap_or(60.0);
    let heads = 4;
    let threads = rayon::current_num_threads();
    let peak = gemm_peak_gflops(2048, 2048, 2048, 5, false);
    println!(
        "threads: {threads}; heads: {heads}; f32; causal chunk {chunk}, non-causal streaming chunk {stream_chunk}"
    );
    println!("f32 GEMM peak 2048³ (faster of altgrad's and faer's): {peak:.1} GFLOP/s (the peak below)");
    println!();
    let ns: Vec<usize> = match arg_str("--ns") {
        Some(list) => list.split(',').map(|x| x.trim().parse().expect("--ns: comma-separated lengths")).collect(),
        None if quick => vec![1024, 2048, 4096, 8192],
        None => vec![1024, 2048, 4096, 8192, 16384, 32768, 65536],
    };
    let configs: Vec<(usize, usize)> = match arg_str("--configs") {
        Some(list) => list
            .split(',')
            .map(|x| {
                let (d, g) = x.split_once(':').expect("--configs: head_dim:degree pairs, e.g. 16:2,64:2");
                (d.trim().parse().expect("head_dim"), g.trim().parse().expect("degree"))
            })
            .collect(),
        None => vec![(16, 2), (16, 4), (32, 2), (64, 2)],
    };
    // exact runs depend on (n, head_dim, causal) only: measure each once
    let mut exact: HashMap<(usize, usize, bool), Option<f64>> = HashMap::new();
    let mut exact_skipped = false;
    println!(
        "| n | head_dim | g | r | causal | poly fwd s | poly bwd s | poly GFLOP | GFLOP/s | % of peak | exact s | exact GFLOP/s | speed-up |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for &(d, g) in &configs {
        let r = feature_dim(d, g).unwrap();
        for causal in [false, true] {
            let c = if causal { chunk } else { stream_chunk };
            let mut poly_t = Vec::new();
            let mut ratio = Vec::new();
            for &n in &ns {
                let p = time_poly(n, d, g, heads, causal, c);
                let pt = p.fwd_s + p.bwd_s;
                poly_t.push((n, pt));
                // exact: skip when the quadratic extrapolation of the previous size exceeds the limit
                let ex = match exact.get(&(n, d, causal)) {
                    Some(t) => *t,
                    None => {
                        let predicted = exact
                            .iter()
                            .filter(|((m, dd, cc), t)| *dd == d && *cc == causal && *m < n && t.is_some())
                            .max_by_key(|((m, _, _), _)| *m)
                            .map_or(0.0, |((m, _, _), t)| t.unwrap() * (n as f64 / *m as f64).powi(2));
                        let t = if predicted > exact_limit {
                            None
                        } else {
                            let e = time_exact(n, d, heads, causal, if n <= 4096 { 3 } else { 1 });
                            Some(e.fwd_s + e.bwd_s)
                        };
                        exact.insert((n, d, causal), t);
                        t
                    }
                };
                let ex_flops = heads as f64 * cost::exact_flops(n, d, d, causal);
                let (ex_s, ex_gf, speed) = match ex {
                    Some(t) => {
                        ratio.push((n, t / pt));
                        (format!("{t:.4}"), format!("{:.1}", ex_flops / t / 1e9), format!("{:.1}×", t / pt))
                    }
                    None => {
                        exact_skipped = true;
                        ("—".into(), "—".into(), "—".into())
                    }
                };
                let gf = p.flops / pt / 1e9;
                println!(
                    "| {n} | {d} | {g} | {r} | {causal} | {:.4} | {:.4} | {:.2} | {gf:.1} | {:.0}% | {ex_s} | {ex_gf} | {speed} |",
                    p.fwd_s,
                    p.bwd_s,
                    p.flops / 1e9,
                    100.0 * gf / peak
                );
            }
            let tail = &poly_t[poly_t.len().saturating_sub(3)..];
            let crossover = match ratio.iter().find(|(_, x)| *x > 1.0) {
                Some(&(n, _)) if n == ns[0] => format!("≤ {n} (poly faster from the smallest measured n)"),
                Some(&(n, _)) => format!("between {} and {n}", ns[ns.iter().position(|&m| m == n).unwrap() - 1]),
                None => "above the largest n with an exact run".into(),
            };
            // cost-model crossover: smallest power of two where poly FLOPs < exact FLOPs
            let model = (4..30)
                .map(|p| 1usize << p)
                .find(|&n| cost::poly_flops(n, d, d, r, causal, c) < cost::exact_flops(n, d, d, causal))
                .unwrap_or(0);
            let exponent = if tail.len() >= 2 {
                format!("{:.2} (n = {}…{})", slope(tail), tail[0].0, tail[tail.len() - 1].0)
            } else {
                "— (one size)".to_string()
            };
            summary.push(format!("| {d} | {g} | {r} | {causal} | {exponent} | {crossover} | {model} |"));
        }
    }
    println!();
    println!("| head_dim | g | r | causal | fitted exponent of poly time in n | measured crossover n | cost-model crossover n (power of 2) |");
    println!("|---|---|---|---|---|---|---|");
    for line in summary {
        println!("{line}");
    }
    if exact_skipped {
        println!();
        println!("— : exact not run (its quadratic extrapolation from the previous size exceeds {exact_limit} s).");
    }
}
