//! Exact attention forward+backward vs this machine's f32 GEMM peak (issue: foundation).
//!
//! Run: `cargo bench --bench exact_attention` (add `-- --quick` for n ≤ 4096).
//! Prints a markdown table: FLOPs per MATH §7, achieved GFLOP/s, ratio to the GEMM peak measured
//! in the same run. A plain harness (not criterion) because every row needs a ratio to a peak
//! measured in the same process.

use altgrad::bench::{gemm_peak_gflops, time_exact};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let threads = rayon::current_num_threads();
    let peak = gemm_peak_gflops(2048, 2048, 2048, 5, false);
    let peak_k64 = gemm_peak_gflops(4096, 64, 4096, 5, false);
    println!("threads: {threads}");
    println!("f32 GEMM peak (faster of altgrad's and faer's) 2048³: {peak:.1} GFLOP/s; 4096×64×4096 (k = head_dim): {peak_k64:.1} GFLOP/s");
    println!();
    println!("| n | head_dim | heads | causal | fwd s | bwd s | GFLOP | GFLOP/s | % of GEMM peak |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let ns: &[usize] = if quick { &[1024, 4096] } else { &[1024, 4096, 16384] };
    for &n in ns {
        for causal in [false, true] {
            let reps = if n >= 16384 { 1 } else { 3 };
            let r = time_exact(n, 64, 4, causal, reps);
            println!(
                "| {} | {} | {} | {} | {:.4} | {:.4} | {:.2} | {:.1} | {:.0}% |",
                r.n,
                r.head_dim,
                r.num_heads,
                r.causal,
                r.fwd_s,
                r.bwd_s,
                r.flops / 1e9,
                r.gflops,
                100.0 * r.gflops / peak
            );
        }
    }
}
