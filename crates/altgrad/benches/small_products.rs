//! The per-chunk products of polynomial attention at d = 16, degree 2 (r = 153, e = d_v + 1 = 17,
//! chunk 256) through `linalg::matmul_small` (the register-tiled f32 kernels on AVX2/AVX-512), on
//! one thread, beside a 256³ product on the same kernels: GFLOP/s, best of 5 timings of repeated
//! calls. The shapes are the polynomial kernels' (MATH §4): the state update `H'[:, :dv] += Φᵀ V`
//! (V strided as one head of four), `Yᵀ = H'ᵀ Ψᵀ`, `dΦᵀ = H' dYᵀ` and `dV += Φ dH'[:, :dv]`.
//!
//! Run: `taskset -c 0 cargo bench --bench small_products` (pinning to one core steadies it).

use altgrad::linalg::{matmul_small, rm, rm_mut, rm_strided, rm_strided_mut};
use std::time::Instant;

fn bench(name: &str, m: usize, n: usize, k: usize, f: &mut dyn FnMut()) {
    let reps = (2e8 / (2.0 * (m * n * k) as f64)) as usize + 1;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    println!("| {name} | {m} | {n} | {k} | {:.1} |", 2.0 * (m * n * k) as f64 / best / 1e9);
}

fn main() {
    let (r, c, dv, e, heads) = (153usize, 256usize, 16usize, 17usize, 4usize);
    let phit: Vec<f32> = (0..r * c).map(|i| (i % 7) as f32 * 0.1).collect();
    let v: Vec<f32> = (0..c * heads * dv).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut h = vec![0f32; r * e];
    let vt: Vec<f32> = (0..e * c).map(|i| (i % 3) as f32 * 0.1).collect();
    let mut yt = vec![0f32; e * c];
    let mut dphit = vec![0f32; r * c];
    let mut dvo = vec![0f32; c * heads * dv];
    println!("| product | m | n | k | GFLOP/s |");
    println!("|---|---:|---:|---:|---:|");
    bench("H'[:, :dv] += Φᵀ V", r, dv, c, &mut || {
        let b = rm_strided(&v, c, dv, heads * dv);
        matmul_small(rm_strided_mut(&mut h, r, dv, e), true, rm(&phit, r, c), b, 1.0);
    });
    bench("Yᵀ = H'ᵀ Ψᵀ", e, c, r, &mut || {
        matmul_small(rm_mut(&mut yt, e, c), false, rm(&h, r, e).transpose(), rm(&phit, r, c), 1.0);
    });
    bench("dΦᵀ = H' dYᵀ", r, c, e, &mut || {
        matmul_small(rm_mut(&mut dphit, r, c), false, rm(&h, r, e), rm(&vt, e, c), 1.0);
    });
    bench("dV += Φ dH'[:, :dv]", c, dv, r, &mut || {
        let dst = rm_strided_mut(&mut dvo, c, dv, heads * dv);
        matmul_small(dst, true, rm(&phit, r, c).transpose(), rm_strided(&h, r, dv, e), 1.0);
    });
    let a: Vec<f32> = (0..256 * 256).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..256 * 256).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut cc = vec![0f32; 256 * 256];
    bench("256³ (reference)", 256, 256, 256, &mut || {
        matmul_small(rm_mut(&mut cc, 256, 256), false, rm(&a, 256, 256), rm(&b, 256, 256), 1.0);
    });
}
