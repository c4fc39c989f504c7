//! Exact tiled attention against the naive O(n²) reference (f64 ≤ 1e-10, f32 ≤ 1e-5), against
//! PyTorch's `scaled_dot_product_attention` (fixture), and its backward against finite differences.

mod common;
use altgrad::attention::{
    backward_exact, forward_exact, forward_poly, naive, AttnOptions, AttnShape, Mask, PolyOptions, Qkv,
};
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

/// A mask kind, written out here independently of the library's `Mask::allows`.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Full,
    Causal { off: usize },
    Window { w: usize, sinks: usize, off: usize },
}

impl Kind {
    fn mask(self) -> Mask {
        match self {
            Kind::Full => Mask::Full,
            Kind::Causal { off } => Mask::Causal { q_offset: off },
            Kind::Window { w, sinks, off } => Mask::Window { window: w, sinks, q_offset: off },
        }
    }
    /// Keys of a call of `n` rows: positions `0..off + n` (kv-cache convention), or `nk_full`.
    fn kv_len(self, n: usize, nk_full: usize) -> usize {
        match self {
            Kind::Full => nk_full,
            Kind::Causal { off } | Kind::Window { off, .. } => off + n,
        }
    }
    /// `[n][n_k]`: row `i` (position `off + i`) sees key `j`.
    fn explicit(self, n: usize, nk: usize) -> Vec<Vec<bool>> {
        let mut m = vec![vec![false; nk]; n];
        for (i, row) in m.iter_mut().enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x = match self {
                    Kind::Full => true,
                    Kind::Causal { off } => j < off + i + 1,
                    Kind::Window { w, sinks, off } => j < off + i + 1 && (j + w > off + i || j < sinks),
                };
            }
        }
        m
    }
}

fn masked_case(n: usize, h: usize, hkv: usize, d: usize, dv: usize, kind: Kind, seed: u64) -> (f64, f64) {
    let nk = kind.kv_len(n, n + 17);
    let s = AttnShape::new(n, h, hkv, d).with_head_dim_v(dv).with_kv_len(nk);
    let opts = AttnOptions::standard(d, false).with_mask(kind.mask());
    let q = randn(n * h * d, seed, 1.5);
    let k = randn(nk * hkv * d, seed + 1, 1.5);
    let v = randn(nk * hkv * dv, seed + 2, 1.0);
    let g = randn(n * h * dv, seed + 3, 1.0);
    let allowed = kind.explicit(n, nk);
    let x = qkv(&q, &k, &v, &s);
    let o_ref = naive::forward_masked(&x, &allowed, opts.scale);
    let (dq_ref, dk_ref, dv_ref) = naive::backward_masked(&x, &g, &allowed, opts.scale);
    let fwd = forward_exact(&x, &opts).unwrap();
    let gr = backward_exact(&x, &fwd, &g).unwrap();
    let tag = format!("n={n} nk={nk} h={h} hkv={hkv} d={d} dv={dv} {kind:?}");
    // a zero reference (dq, dk under a one-key window: softmax of one entry has no gradient) is
    // compared by the absolute error over ‖G‖, the scale of every gradient
    let gnorm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
    let err = |got: &[f64], want: &[f64]| {
        let e = rel(got, want);
        if want.iter().all(|x| x.abs() < 1e-12) {
            e / gnorm
        } else {
            e
        }
    };
    let mut worst = (0.0f64, 0.0f64);
    for (name, got, want) in
        [("o", &fwd.o, &o_ref), ("dq", &gr.dq, &dq_ref), ("dk", &gr.dk, &dk_ref), ("dv", &gr.dv, &dv_ref)]
    {
        let e = err(got, want);
        worst.0 = worst.0.max(e);
        assert!(e < 1e-10, "f64 {name} {tag}: rel err {e:e}");
    }
    let (qf, kf, vf, gf) = (to_f32(&q), to_f32(&k), to_f32(&v), to_f32(&g));
    let xf = qkv(&qf, &kf, &vf, &s);
    let fwd = forward_exact(&xf, &opts).unwrap();
    let gr = backward_exact(&xf, &fwd, &gf).unwrap();
    let up = |x: &[f32]| x.iter().map(|v| *v as f64).collect::<Vec<f64>>();
    for (name, got, want) in
        [("o", &fwd.o, &o_ref), ("dq", &gr.dq, &dq_ref), ("dk", &gr.dk, &dk_ref), ("dv", &gr.dv, &dv_ref)]
    {
        let e = err(&up(got), want);
        worst.1 = worst.1.max(e);
        assert!(e < 1e-5, "f32 {name} {tag}: rel err {e:e}");
    }
    worst
}

/// Every mask kind against the naive reference with the mask written out: full (also with more
/// keys than queries), causal with query offsets (kv-cache convention), and sliding windows with
/// and without sinks, spanning several query and key tiles (so whole tiles are skipped and others
/// masked in part); GQA; f64 ≤ 1e-10, f32 ≤ 1e-5.
#[test]
fn exact_masks_match_naive() {
    let kinds = [
        Kind::Full,
        Kind::Causal { off: 0 },
        Kind::Causal { off: 5 },
        Kind::Causal { off: 200 },
        Kind::Window { w: 1, sinks: 0, off: 0 },
        Kind::Window { w: 16, sinks: 0, off: 0 },
        Kind::Window { w: 50, sinks: 4, off: 0 },
        Kind::Window { w: 130, sinks: 3, off: 70 },
        Kind::Window { w: 40, sinks: 0, off: 300 },
        Kind::Window { w: 1000, sinks: 2, off: 9 },
        Kind::Window { w: 3, sinks: 200, off: 0 },
    ];
    let mut seed = 500;
    let mut worst = (0.0f64, 0.0f64);
    for kind in kinds {
        for &(n, h, hkv, d, dv) in &[(1usize, 2usize, 1usize, 8usize, 8usize), (70, 2, 2, 16, 8), (300, 4, 2, 16, 16)] {
            let w = masked_case(n, h, hkv, d, dv, kind, seed);
            worst = (worst.0.max(w.0), worst.1.max(w.1));
            seed += 7;
        }
    }
    // a long sequence with a narrow window: most tiles are skipped
    let w = masked_case(700, 2, 1, 8, 8, Kind::Window { w: 24, sinks: 1, off: 0 }, seed);
    worst = (worst.0.max(w.0), worst.1.max(w.1));
    eprintln!("exact masks vs naive: worst rel err f64 {:.1e}, f32 {:.1e}", worst.0, worst.1);
}

/// Every mask kind by central differences in f64: the kernel's backward against its own forward,
/// and the naive masked backward against the naive masked forward.
#[test]
fn exact_masks_match_finite_differences() {
    let (n, h, hkv, d, dv) = (7, 2, 1, 3, 2);
    for kind in [
        Kind::Full,
        Kind::Causal { off: 3 },
        Kind::Window { w: 2, sinks: 0, off: 0 },
        Kind::Window { w: 3, sinks: 1, off: 4 },
    ] {
        let nk = kind.kv_len(n, n + 2);
        let s = AttnShape::new(n, h, hkv, d).with_head_dim_v(dv).with_kv_len(nk);
        let opts = AttnOptions { mask: kind.mask(), scale: 0.7 };
        let q = randn(n * h * d, 1, 1.0);
        let k = randn(nk * hkv * d, 2, 1.0);
        let v = randn(nk * hkv * dv, 3, 1.0);
        let g = randn(n * h * dv, 4, 1.0);
        let allowed = kind.explicit(n, nk);
        let dot = |a: &[f64]| a.iter().zip(&g).map(|(x, y)| x * y).sum::<f64>();
        let kernel = |q: &[f64], k: &[f64], v: &[f64]| dot(&forward_exact(&qkv(q, k, v, &s), &opts).unwrap().o);
        let reference = |q: &[f64], k: &[f64], v: &[f64]| dot(&naive::forward_masked(&qkv(q, k, v, &s), &allowed, 0.7));
        let x = qkv(&q, &k, &v, &s);
        let fwd = forward_exact(&x, &opts).unwrap();
        let gr = backward_exact(&x, &fwd, &g).unwrap();
        let (dq, dk, dvv) = naive::backward_masked(&x, &g, &allowed, 0.7);
        let eps = 1e-6;
        type Loss<'a> = &'a dyn Fn(&[f64], &[f64], &[f64]) -> f64;
        let fd = |f: Loss, which: usize| -> Vec<f64> {
            let x0 = [&q, &k, &v][which];
            (0..x0.len())
                .map(|i| {
                    let (mut xp, mut xm) = (x0.to_vec(), x0.to_vec());
                    xp[i] += eps;
                    xm[i] -= eps;
                    let at = |x: &[f64]| match which {
                        0 => f(x, &k, &v),
                        1 => f(&q, x, &v),
                        _ => f(&q, &k, x),
                    };
                    (at(&xp) - at(&xm)) / (2.0 * eps)
                })
                .collect()
        };
        for (which, name, got, naive_got) in [(0, "dq", &gr.dq, &dq), (1, "dk", &gr.dk, &dk), (2, "dv", &gr.dv, &dvv)] {
            let e = rel(got, &fd(&kernel, which));
            assert!(e < 1e-7, "kernel {name} {kind:?}: rel err {e:e} against finite differences");
            let e = rel(naive_got, &fd(&reference, which));
            assert!(e < 1e-7, "naive {name} {kind:?}: rel err {e:e} against finite differences");
        }
    }
}

#[test]
fn masks_are_checked() {
    let s = AttnShape::new(4, 2, 2, 8);
    let x = vec![0.1f64; 4 * 2 * 8];
    let xq = qkv(&x, &x, &x, &s);
    let window0 = AttnOptions::standard(8, false).with_mask(Mask::Window { window: 0, sinks: 0, q_offset: 0 });
    assert!(forward_exact(&xq, &window0).unwrap_err().to_string().starts_with("mask:"));
    // an offset needs the earlier keys: kv_len = q_offset + seq_len
    let off = AttnOptions::standard(8, false).with_mask(Mask::Causal { q_offset: 3 });
    let err = forward_exact(&xq, &off).unwrap_err();
    assert!(err.to_string().starts_with("mask:") && err.to_string().contains("kv_len = 7"), "{err}");
    let k = vec![0.1f64; 7 * 2 * 8];
    assert!(forward_exact(&qkv(&x, &k, &k, &s.with_kv_len(7)), &off).is_ok());
    // polynomial attention: no windows, and the offset is the initial state's count
    let win = AttnOptions::standard(8, false).with_mask(Mask::Window { window: 2, sinks: 0, q_offset: 0 });
    let err = forward_poly(&xq, &win, &PolyOptions::new(2)).unwrap_err();
    assert!(err.to_string().starts_with("mask:"), "{err}");
    let err = forward_poly(&qkv(&x, &k, &k, &s.with_kv_len(7)), &off, &PolyOptions::new(2)).unwrap_err();
    assert!(err.to_string().starts_with("mask:"), "{err}");
}
