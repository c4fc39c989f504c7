//! Exact tiled attention against the naive O(n²) reference (f64 ≤ 1e-10, f32 ≤ 1e-5), against
//! PyTorch's `scaled_dot_product_attention` (fixture), and its backward against finite differences.

mod common;
use altgrad::attention::{backward_exact, forward_exact, naive, AttnOptions, AttnShape, Qkv};
use common::{qkv, randn, rel, to_f32};

fn case(n: usize, h: usize, hkv: usize, d: usize, causal: bool, seed: u64) {
    let s = AttnShape::new(n, h, hkv, d);
    let opts = AttnOptions::standard(d, causal);
    // scale 1.5 makes the softmax peaked enough to matter
    let q = randn(n * h * d, seed, 1.5);
    let k = randn(n * hkv * d, seed + 1, 1.5);
    let v = randn(n * hkv * d, seed + 2, 1.0);
    let g = randn(n * h * d, seed + 3, 1.0);
    let o_ref = naive::forward(&q, &k, &v, &s, causal, opts.scale);
    let (dq_ref, dk_ref, dv_ref) = naive::backward(&qkv(&q, &k, &v, &s), &g, causal, opts.scale);

    let fwd = forward_exact(&qkv(&q, &k, &v, &s), &opts).unwrap();
    let gr = backward_exact(&qkv(&q, &k, &v, &s), &fwd, &g).unwrap();
    let tag = format!("n={n} h={h} hkv={hkv} d={d} causal={causal}");
    for (name, got, want) in
        [("o", &fwd.o, &o_ref), ("dq", &gr.dq, &dq_ref), ("dk", &gr.dk, &dk_ref), ("dv", &gr.dv, &dv_ref)]
    {
        let e = rel(got, want);
        assert!(e < 1e-10, "f64 {name} {tag}: rel err {e:e}");
    }

    let (qf, kf, vf, gf) = (to_f32(&q), to_f32(&k), to_f32(&v), to_f32(&g));
    let fwd = forward_exact(&qkv(&qf, &kf, &vf, &s), &opts).unwrap();
    let gr = backward_exact(&qkv(&qf, &kf, &vf, &s), &fwd, &gf).unwrap();
    for (name, got, want) in
        [("o", &fwd.o, &o_ref), ("dq", &gr.dq, &dq_ref), ("dk", &gr.dk, &dk_ref), ("dv", &gr.dv, &dv_ref)]
    {
        let e = rel(got, want);
        assert!(e < 1e-5, "f32 {name} {tag}: rel err {e:e}");
    }
}

#[test]
fn exact_matches_naive_over_shapes() {
    let mut seed = 10;
    for &n in &[1usize, 2, 63, 300] {
        for &causal in &[false, true] {
            for &(h, hkv, d) in &[(2, 2, 8), (4, 2, 16), (3, 1, 32), (2, 1, 64)] {
                case(n, h, hkv, d, causal, seed);
                seed += 7;
            }
        }
    }
}

#[test]
fn exact_matches_naive_head_dim_128_and_multi_block() {
    // n not a multiple of either tile size, spanning several query and key tiles
    case(333, 2, 1, 128, true, 99);
    case(200, 2, 2, 128, false, 98);
}

#[test]
fn naive_backward_matches_finite_differences() {
    // The naive reference itself is checked against central differences of its own forward.
    let (n, h, hkv, d) = (5, 2, 1, 4);
    let s = AttnShape::new(n, h, hkv, d);
    for causal in [false, true] {
        let scale = 0.7;
        let q = randn(n * h * d, 1, 1.0);
        let k = randn(n * hkv * d, 2, 1.0);
        let v = randn(n * hkv * d, 3, 1.0);
        let g = randn(n * h * d, 4, 1.0);
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            naive::forward(q, k, v, &s, causal, scale).iter().zip(&g).map(|(a, b)| a * b).sum()
        };
        let (dq, dk, dv) = naive::backward(&qkv(&q, &k, &v, &s), &g, causal, scale);
        let eps = 1e-6;
        let fd = |x: &[f64], which: usize| -> Vec<f64> {
            (0..x.len())
                .map(|i| {
                    let mut xp = x.to_vec();
                    let mut xm = x.to_vec();
                    xp[i] += eps;
                    xm[i] -= eps;
                    let (lp, lm) = match which {
                        0 => (loss(&xp, &k, &v), loss(&xm, &k, &v)),
                        1 => (loss(&q, &xp, &v), loss(&q, &xm, &v)),
                        _ => (loss(&q, &k, &xp), loss(&q, &k, &xm)),
                    };
                    (lp - lm) / (2.0 * eps)
                })
                .collect()
        };
        assert!(rel(&dq, &fd(&q, 0)) < 1e-8);
        assert!(rel(&dk, &fd(&k, 1)) < 1e-8);
        assert!(rel(&dv, &fd(&v, 2)) < 1e-8);
    }
}

#[test]
fn exact_matches_pytorch_sdpa_fixture() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("tests/fixtures/attention");
    let inp = altgrad::io::read_safetensors(&dir.join("input.safetensors")).unwrap();
    let exp = altgrad::io::read_safetensors(&dir.join("expected.safetensors")).unwrap();
    let get = |ts: &Vec<altgrad::io::TensorF64>, name: &str| ts.iter().find(|t| t.name == name).unwrap().clone();
    let (q, k, v, g) = (get(&inp, "q"), get(&inp, "k"), get(&inp, "v"), get(&inp, "do"));
    let (n, h, d) = (q.shape[1], q.shape[2], q.shape[3]);
    let s = AttnShape::new(n, h, k.shape[2], d);
    for (causal, tag) in [(true, "causal"), (false, "full")] {
        let opts = AttnOptions::standard(d, causal);
        let fwd = forward_exact(&qkv(&q.data, &k.data, &v.data, &s), &opts).unwrap();
        let gr = backward_exact(&qkv(&q.data, &k.data, &v.data, &s), &fwd, &g.data).unwrap();
        for (name, got) in [("o", &fwd.o), ("dq", &gr.dq), ("dk", &gr.dk), ("dv", &gr.dv)] {
            let want = get(&exp, &format!("{name}_{tag}"));
            let e = rel(got, &want.data);
            assert!(e < 1e-12, "{name}_{tag}: rel err {e:e} against torch");
        }
    }
}

#[test]
fn exact_rejects_bad_shapes() {
    let s = AttnShape::new(4, 3, 2, 8);
    let x = vec![0.0f64; 4 * 3 * 8];
    let err = Qkv::new(&x, &x, &x, &s).unwrap_err();
    assert!(err.to_string().contains("num_kv_heads"), "{err}");
    let s = AttnShape::new(4, 2, 2, 8);
    let err = Qkv::new(&x, &x[..10], &x, &s).unwrap_err();
    assert!(err.to_string().starts_with("q:") || err.to_string().starts_with("k:"), "{err}");
}

#[test]
fn max_abs_score_matches_a_direct_loop() {
    use altgrad::attention::bound::max_abs_score;
    for (n, causal) in [(1usize, true), (300, true), (300, false), (517, true)] {
        let d = 8;
        let q = randn(n * d, 5 + n as u64, 1.0);
        let k = randn(n * d, 6 + n as u64, 1.0);
        let mut want = 0.0f64;
        for i in 0..n {
            let jmax = if causal { i + 1 } else { n };
            for j in 0..jmax {
                let s: f64 = (0..d).map(|c| q[i * d + c] * k[j * d + c]).sum::<f64>() * 0.3;
                want = want.max(s.abs());
            }
        }
        let got = max_abs_score(&q, &k, n, d, 0.3, causal);
        assert!((got - want).abs() <= 1e-12 * want, "n={n} causal={causal}: {got} vs {want}");
    }
}
