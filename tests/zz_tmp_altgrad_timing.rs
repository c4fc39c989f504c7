mod common;
use altgrad::attention::*;
use std::time::Instant;
#[test]
fn timing() {
    for &(n, d, causal) in &[(4096usize, 16usize, true), (4096, 16, false), (4096, 32, true), (16384, 16, true)] {
        let h = 4;
        let s = AttnShape::new(n, h, h, d);
        let opts = AttnOptions::standard(d, causal);
        let q: Vec<f32> = common::to_f32(&common::randn(n * h * d, 1, 0.5));
        let k: Vec<f32> = common::to_f32(&common::randn(n * h * d, 2, 0.5));
        let v: Vec<f32> = common::to_f32(&common::randn(n * h * d, 3, 1.0));
        let g: Vec<f32> = common::to_f32(&common::randn(n * h * d, 4, 1.0));
        let p = PolyOptions::new(2);
        let t = Instant::now();
        let f = forward_altgrad(&q, &k, &v, &s, &opts, &p).unwrap();
        let t1 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = backward_altgrad(&q, &k, &v, &f, &g, &s, &opts, &p).unwrap();
        let t2 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let pf = forward_poly(&q, &k, &v, &s, &opts, &p).unwrap();
        let _ = backward_poly(&q, &k, &v, &pf, &g, &s, &opts, &p).unwrap();
        let t3 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let ef = forward_exact(&q, &k, &v, &s, &opts).unwrap();
        let _ = backward_exact(&q, &k, &v, &ef, &g, &s, &opts).unwrap();
        let t4 = t.elapsed().as_secs_f64();
        let r = altgrad::attention::features::feature_dim(d, 2).unwrap() as f64;
        let fl = 8.0 * n as f64 * r * (d as f64 + 1.0) * d as f64 * h as f64;
        eprintln!("n={n} d={d} causal={causal}: altgrad fwd {t1:.3}s bwd {t2:.3}s ({:.1} GFLOP/s on the Kronecker GEMMs) | poly fwd+bwd {t3:.3}s | exact fwd+bwd {t4:.3}s", fl / t2 / 1e9);
    }
}
