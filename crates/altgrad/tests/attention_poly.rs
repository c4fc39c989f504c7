//! Polynomial attention (MATH §3–4): the feature map against the truncated exponential, the fast
//! chunked kernels against the naive materialized reference (f64 ≤ 1e-10, f32 ≤ 1e-5), the
//! backward against f64 finite differences, and the approximation against exact softmax
//! attention on bounded inputs (error falls with the degree and stays under the MATH §3 bound).

mod common;
use altgrad::attention::bound::{output_bound, score_bound};
use altgrad::attention::features::{feature_dim, FeatureMap};
use altgrad::attention::poly::block_states_len;
use altgrad::attention::{
    backward_poly, backward_poly_state, forward_poly, forward_poly_state, head_bounds, naive, AttnOptions, AttnShape,
    Mask, PolyOptions, PolyOutput, PolyStateGrad,
};
use common::{qkv, randn, rel, to_f32};
use proptest::prelude::*;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn features_reproduce_truncated_exponential() {
    let mut seed = 1;
    for &d in &[1usize, 3, 8, 16] {
        for g in 0..=6usize {
            let fm = FeatureMap::<f64>::new(d, g).unwrap();
            assert_eq!(Some(fm.dim()), feature_dim(d, g));
            let (mut px, mut py) = (vec![0.0; fm.dim()], vec![0.0; fm.dim()]);
            for _ in 0..3 {
                // |x·y| up to ~2: every power matters
                let x = randn(d, seed, 1.2 / (d as f64).sqrt().sqrt());
                let y = randn(d, seed + 1, 1.2 / (d as f64).sqrt().sqrt());
                seed += 2;
                fm.apply(&x, &mut px);
                fm.apply(&y, &mut py);
                let want = naive::taylor_exp(g, dot(&x, &y));
                let got = dot(&px, &py);
                assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "d={d} g={g}: {got} vs {want}");
            }
        }
    }
}

#[test]
fn feature_vjp_matches_finite_differences() {
    for &(d, g) in &[(1usize, 4usize), (3, 2), (4, 4), (6, 3), (5, 6)] {
        let fm = FeatureMap::<f64>::new(d, g).unwrap();
        let r = fm.dim();
        let x = randn(d, 40 + d as u64, 0.8);
        let u = randn(r, 41 + g as u64, 1.0);
        let f = |x: &[f64]| {
            let mut p = vec![0.0; r];
            fm.apply(x, &mut p);
            dot(&p, &u)
        };
        let mut phi = vec![0.0; r];
        fm.apply(&x, &mut phi);
        let mut du = u.clone();
        let mut dx = vec![0.0; d];
        fm.vjp(&x, &phi, &mut du, &mut dx);
        let eps = 1e-6;
        let fd: Vec<f64> = (0..d)
            .map(|c| {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[c] += eps;
                xm[c] -= eps;
                (f(&xp) - f(&xm)) / (2.0 * eps)
            })
            .collect();
        let e = rel(&dx, &fd);
        assert!(e < 1e-8, "d={d} g={g}: vjp rel err {e:e}");
    }
}

#[test]
fn feature_dim_table_from_math() {
    // MATH §3 table (rows d = 8, 16, 32, 64; columns g = 1, 2, 3, 4, 6, 8)
    let table: &[(usize, &[(usize, usize)])] = &[
        (8, &[(1, 9), (2, 45), (3, 165), (4, 495), (6, 3003), (8, 12870)]),
        (16, &[(1, 17), (2, 153), (3, 969), (4, 4845), (6, 74613), (8, 735471)]),
        (32, &[(1, 33), (2, 561), (3, 6545), (4, 58905), (6, 2760681)]),
        (64, &[(1, 65), (2, 2145), (3, 47905), (4, 814385)]),
    ];
    for (d, row) in table {
        for &(g, r) in *row {
            assert_eq!(feature_dim(*d, g), Some(r), "d={d} g={g}");
        }
    }
    assert_eq!(feature_dim(5, 0), Some(1));
    assert_eq!(feature_dim(usize::MAX / 2, 4), None);
}

struct Case {
    n: usize,
    h: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    causal: bool,
    center: bool,
    degree: usize,
    chunk: usize,
    seed: u64,
    qk_scale: f64,
}

/// Fast vs naive in f64 (≤ tol64) and f32 (≤ 1e-5); returns the worst f64 and f32 errors.
fn check(c: &Case, tol64: f64) -> (f64, f64) {
    let s = AttnShape::new(c.n, c.h, c.hkv, c.d).with_head_dim_v(c.dv);
    let opts = AttnOptions::standard(c.d, c.causal);
    let popts = PolyOptions { degree: c.degree, center: c.center, chunk: c.chunk };
    let q = randn(c.n * c.h * c.d, c.seed, c.qk_scale);
    let k = randn(c.n * c.hkv * c.d, c.seed + 1, c.qk_scale);
    let v = randn(c.n * c.hkv * c.dv, c.seed + 2, 1.0);
    let g = randn(c.n * c.h * c.dv, c.seed + 3, 1.0);
    let o_ref = naive::poly_forward(&q, &k, &v, &s, &naive::Poly::new(c.causal, opts.scale, c.degree, c.center));
    let (dq_ref, dk_ref, dv_ref) =
        naive::poly_backward(&qkv(&q, &k, &v, &s), &g, &naive::Poly::new(c.causal, opts.scale, c.degree, c.center));
    // lse = m_i + ln Σ_j A_ij
    let mut lse_ref = Vec::new();
    for h in 0..c.h {
        let (a, m, _) = naive::poly_weights(&q, &k, &s, &naive::Poly::new(c.causal, opts.scale, c.degree, c.center), h);
        lse_ref.extend(a.iter().zip(&m).map(|(row, mi)| mi + row.iter().sum::<f64>().ln()));
    }
    let tag = format!(
        "n={} h={} hkv={} d={} dv={} causal={} center={} g={} chunk={}",
        c.n, c.h, c.hkv, c.d, c.dv, c.causal, c.center, c.degree, c.chunk
    );

    // A reference that is zero (dq for n = 1: the output is v_0 whatever q is) is compared by the
    // absolute error relative to ‖G‖, the scale of every gradient (the fast path gets its zero by
    // cancellation of O(‖G‖·‖v‖) terms, the reference exactly).
    let gnorm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
    let err = |got: &[f64], want: &[f64]| {
        let e = rel(got, want);
        if want.iter().all(|x| *x == 0.0) {
            e / gnorm
        } else {
            e
        }
    };
    let err32 = |got: &[f32], want: &[f64]| err(&got.iter().map(|x| *x as f64).collect::<Vec<_>>(), want);
    let fwd = forward_poly(&qkv(&q, &k, &v, &s), &opts, &popts).unwrap();
    let gr = backward_poly(&qkv(&q, &k, &v, &s), &fwd, &g).unwrap();
    let mut worst = (0.0f64, 0.0f64);
    for (name, got, want) in [
        ("o", &fwd.o, &o_ref),
        ("lse", &fwd.lse, &lse_ref),
        ("dq", &gr.dq, &dq_ref),
        ("dk", &gr.dk, &dk_ref),
        ("dv", &gr.dv, &dv_ref),
    ] {
        let e = err(got, want);
        worst.0 = worst.0.max(e);
        assert!(e < tol64, "f64 {name} {tag}: rel err {e:e}");
    }
    let (qf, kf, vf, gf) = (to_f32(&q), to_f32(&k), to_f32(&v), to_f32(&g));
    let fwd = forward_poly(&qkv(&qf, &kf, &vf, &s), &opts, &popts).unwrap();
    let gr = backward_poly(&qkv(&qf, &kf, &vf, &s), &fwd, &gf).unwrap();
    for (name, got, want) in [
        ("o", &fwd.o, &o_ref),
        ("lse", &fwd.lse, &lse_ref),
        ("dq", &gr.dq, &dq_ref),
        ("dk", &gr.dk, &dk_ref),
        ("dv", &gr.dv, &dv_ref),
    ] {
        let e = err32(got, want);
        worst.1 = worst.1.max(e);
        assert!(e < 1e-5, "f32 {name} {tag}: rel err {e:e}");
    }
    worst
}

#[test]
fn poly_matches_naive_degree_2_over_shapes() {
    let heads = [(2usize, 1usize), (2, 2), (3, 1), (4, 2)];
    let mut seed = 100;
    let mut worst = (0.0f64, 0.0f64);
    for &n in &[1usize, 7, 64, 100, 257] {
        for &chunk in &[16usize, 64] {
            for &causal in &[false, true] {
                for &center in &[false, true] {
                    for &d in &[8usize, 16, 32, 64] {
                        let (h, hkv) = heads[(seed as usize / 7) % heads.len()];
                        let c = Case { n, h, hkv, d, dv: d, causal, center, degree: 2, chunk, seed, qk_scale: 1.0 };
                        let w = check(&c, 1e-10);
                        worst = (worst.0.max(w.0), worst.1.max(w.1));
                        seed += 7;
                    }
                }
            }
        }
    }
    eprintln!("degree 2: worst rel err f64 {:.2e}, f32 {:.2e}", worst.0, worst.1);
}

/// With centering the shifted score is `τ q_i·(k_j − c) − τ q_i·(k̄_i − c) = τ q_i·(k_j − k̄_i)`:
/// the model does not depend on the reference point `c`. An explicit `c` far from the key mean
/// (so the row shifts `m_i` and the degree weights are not trivial, also without the mask) must
/// give the naive reference's output and gradients, in f64 and in f32 (where the kernels for
/// `head_dim_v = 16` fuse the features into the products).
#[test]
fn poly_does_not_depend_on_an_explicit_reference_point() {
    for &causal in &[false, true] {
        for &(d, n, h, hkv) in &[(8usize, 37usize, 2usize, 1usize), (16, 100, 2, 2), (16, 257, 3, 1)] {
            let s = AttnShape::new(n, h, hkv, d);
            let opts = AttnOptions::standard(d, causal);
            let popts = PolyOptions { degree: 2, center: true, chunk: 64 };
            let seed = 4000 + n as u64 + d as u64;
            let (q, k, v) =
                (randn(n * h * d, seed, 1.0), randn(n * hkv * d, seed + 1, 1.0), randn(n * hkv * d, seed + 2, 1.0));
            let g = randn(n * h * d, seed + 3, 1.0);
            let c = randn(hkv * d, seed + 4, 0.3);
            let p = naive::Poly::new(causal, opts.scale, 2, true);
            let o_ref = naive::poly_forward(&q, &k, &v, &s, &p);
            let (dq_ref, dk_ref, dv_ref) = naive::poly_backward(&qkv(&q, &k, &v, &s), &g, &p);
            let tag = format!("causal={causal} d={d} n={n} h={h} hkv={hkv}");
            let f = forward_poly_state(&qkv(&q, &k, &v, &s), &opts, &popts, None, Some(&c)).unwrap();
            let gr = backward_poly(&qkv(&q, &k, &v, &s), &f, &g).unwrap();
            for (name, got, want) in
                [("o", &f.o, &o_ref), ("dq", &gr.dq, &dq_ref), ("dk", &gr.dk, &dk_ref), ("dv", &gr.dv, &dv_ref)]
            {
                let e = rel(got, want);
                assert!(e < 1e-9, "f64 {name} {tag}: rel err {e:e}");
            }
            let (qf, kf, vf, gf, cf) = (to_f32(&q), to_f32(&k), to_f32(&v), to_f32(&g), to_f32(&c));
            let f = forward_poly_state(&qkv(&qf, &kf, &vf, &s), &opts, &popts, None, Some(&cf)).unwrap();
            let gr = backward_poly(&qkv(&qf, &kf, &vf, &s), &f, &gf).unwrap();
            for (name, got, want) in
                [("o", &f.o, &o_ref), ("dq", &gr.dq, &dq_ref), ("dk", &gr.dk, &dk_ref), ("dv", &gr.dv, &dv_ref)]
            {
                let e = rel(&got.iter().map(|x| *x as f64).collect::<Vec<_>>(), want);
                assert!(e < 2e-5, "f32 {name} {tag}: rel err {e:e}");
            }
        }
    }
}

#[test]
fn poly_matches_naive_degree_4_and_value_width() {
    let mut seed = 900;
    let mut worst = (0.0f64, 0.0f64);
    for &n in &[7usize, 100] {
        for &causal in &[false, true] {
            for &center in &[false, true] {
                for &(d, dv) in &[(8usize, 8usize), (16, 16), (8, 5)] {
                    let c = Case { n, h: 2, hkv: 1, d, dv, causal, center, degree: 4, chunk: 16, seed, qk_scale: 1.0 };
                    let w = check(&c, 1e-10);
                    worst = (worst.0.max(w.0), worst.1.max(w.1));
                    seed += 5;
                }
            }
        }
    }
    // value width ≠ head width, degree 2, chunk of 1 (LSSSZ Lemma I.3's case) and a chunk > n
    for &(chunk, causal) in &[(1usize, true), (1, false), (500, true), (13, true)] {
        let c = Case { n: 37, h: 3, hkv: 3, d: 4, dv: 7, causal, center: true, degree: 2, chunk, seed, qk_scale: 1.3 };
        let w = check(&c, 1e-10);
        worst = (worst.0.max(w.0), worst.1.max(w.1));
        seed += 5;
    }
    // degree 2 with head_dim_v = 16 beside other head widths: in f32 on AVX-512 the fused feature
    // VJP and forward product run without the fused state products (d ≠ 16), and d = 16 with
    // d_v ≠ 16 runs none of the fused kernels
    for &(d, dv) in &[(8usize, 16usize), (32, 16), (16, 8)] {
        for &causal in &[false, true] {
            for &center in &[false, true] {
                let c = Case { n: 100, h: 2, hkv: 1, d, dv, causal, center, degree: 2, chunk: 16, seed, qk_scale: 1.0 };
                let w = check(&c, 1e-10);
                worst = (worst.0.max(w.0), worst.1.max(w.1));
                seed += 5;
            }
        }
    }
    eprintln!("degree 4 / dv ≠ d: worst rel err f64 {:.2e}, f32 {:.2e}", worst.0, worst.1);
}

/// The causal backward over several scan blocks (16 chunks each: chunk 4 gives blocks of 64 rows)
/// from the forward's block states: the naive reference's gradients (f64 ≤ 1e-10, f32 ≤ 1e-5,
/// through [`check`], including the fused d = 16 kernels), and the same gradients as the scans
/// over the whole sequence (block states dropped), for GQA heads, also continuing an initial state
/// with a final-state gradient; the states are used (a changed one changes the gradients), kept
/// only when no larger than the block's keys and values, and a buffer of the wrong length is
/// refused, naming `fwd`.
#[test]
fn blocked_causal_backward_matches_naive_and_whole_sequence_scans() {
    for (n, chunk, d, center) in
        [(150usize, 4usize, 8usize, true), (300, 8, 16, true), (200, 4, 8, false), (129, 4, 8, true)]
    {
        let c =
            Case { n, h: 4, hkv: 2, d, dv: d, causal: true, center, degree: 2, chunk, seed: n as u64, qk_scale: 1.0 };
        check(&c, 1e-10);
        let s = AttnShape::new(n, 4, 2, d).with_batch(2);
        let len = |w: usize| 2 * n * w * d;
        let (q, k, v, g) = (randn(len(4), 1, 1.0), randn(len(2), 2, 1.0), randn(len(2), 3, 1.0), randn(len(4), 4, 1.0));
        let opts = AttnOptions::causal(d);
        let popts = PolyOptions { degree: 2, center, chunk };
        let x = qkv(&q, &k, &v, &s);
        // an initial state (from a first piece of 37 keys) and a final-state gradient
        let s0 = AttnShape::new(37, 4, 2, d).with_batch(2);
        let l0 = |w: usize| 2 * 37 * w * d;
        let (q0, k0, v0) = (randn(l0(4), 5, 1.0), randn(l0(2), 6, 1.0), randn(l0(2), 7, 1.0));
        let first = forward_poly_state(&qkv(&q0, &k0, &v0, &s0), &AttnOptions::causal(d), &popts, None, None).unwrap();
        let initial = first.final_state.clone().unwrap();
        let opts_at = opts.with_mask(Mask::Causal { q_offset: initial.count });
        for (o, init) in [(opts, None), (opts_at, Some(&initial))] {
            let fwd = forward_poly_state(&x, &o, &popts, init, None).unwrap();
            let r = feature_dim(d, 2).unwrap();
            let blocks = n.div_ceil(16 * chunk);
            let want = 2 * 2 * (blocks - 1) * r * (d + 1);
            assert_eq!(
                fwd.block_states.len(),
                want,
                "n = {n}: one state per later block and (sequence, key/value head)"
            );
            assert_eq!(block_states_len(&s, chunk, r), want);
            let fs = fwd.final_state.as_ref().unwrap();
            let dfinal = PolyStateGrad { ds: randn(fs.s.len(), 8, 1.0), dkey_sum: randn(fs.key_sum.len(), 9, 1.0) };
            let (blocked, db) = backward_poly_state(&x, &fwd, &g, Some(&dfinal)).unwrap();
            let mut whole = fwd.clone();
            whole.block_states.clear();
            let (whole, dw) = backward_poly_state(&x, &whole, &g, Some(&dfinal)).unwrap();
            let (db, dw) = (db.unwrap(), dw.unwrap());
            let pairs = [
                ("dq", &blocked.dq, &whole.dq),
                ("dk", &blocked.dk, &whole.dk),
                ("dv", &blocked.dv, &whole.dv),
                ("ds", &db.ds, &dw.ds),
                ("dkey_sum", &db.dkey_sum, &dw.dkey_sum),
            ];
            for (name, a, b) in pairs {
                let e = rel(a, b);
                assert!(e <= 1e-14, "n = {n} {name}: blocked vs whole-sequence scans rel err {e:e}");
            }
            // the states are read: a changed one changes the gradients of the blocks after it
            let mut moved = fwd.clone();
            moved.block_states[d + 1] += 1.0; // S'[1, 0]: a degree-1 feature (the constant one has no q-gradient)
            let (gm, _) = backward_poly_state(&x, &moved, &g, Some(&dfinal)).unwrap();
            assert!(rel(&gm.dq, &blocked.dq) > 1e-6, "n = {n}: the block states are not used");
            let mut bad = fwd.clone();
            bad.block_states.pop();
            let err = backward_poly(&x, &bad, &g).unwrap_err();
            assert!(err.to_string().starts_with("fwd:") && err.to_string().contains("block states"), "{err}");
        }
    }
    // states larger than a block's keys and values are not kept: d = 16, chunk 4 (r·e = 2601 > 16·4·32)
    let s = AttnShape::new(200, 2, 1, 16);
    let (q, k, v) = (randn(200 * 2 * 16, 1, 1.0), randn(200 * 16, 2, 1.0), randn(200 * 16, 3, 1.0));
    let popts = PolyOptions { degree: 2, center: true, chunk: 4 };
    let fwd = forward_poly(&qkv(&q, &k, &v, &s), &AttnOptions::causal(16), &popts).unwrap();
    assert!(fwd.block_states.is_empty() && block_states_len(&s, 4, 153) == 0);
}

/// Central differences in f64 of `L = Σ o ∘ G` through `forward_poly` itself.
#[test]
fn poly_backward_matches_finite_differences() {
    let (n, h, hkv, d, dv) = (9, 2, 1, 4, 3);
    let s = AttnShape::new(n, h, hkv, d).with_head_dim_v(dv);
    let mut worst: f64 = 0.0;
    for &degree in &[2usize, 4] {
        for &causal in &[false, true] {
            for &center in &[false, true] {
                let opts = AttnOptions { mask: Mask::from_causal(causal), scale: 0.6 };
                let popts = PolyOptions { degree, center, chunk: 4 };
                let seed = 7 * degree as u64 + if causal { 3 } else { 0 } + if center { 1 } else { 0 };
                let q = randn(n * h * d, seed, 1.0);
                let k = randn(n * hkv * d, seed + 10, 1.0);
                let v = randn(n * hkv * dv, seed + 20, 1.0);
                let g = randn(n * h * dv, seed + 30, 1.0);
                let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                    forward_poly(&qkv(q, k, v, &s), &opts, &popts).unwrap().o.iter().zip(&g).map(|(a, b)| a * b).sum()
                };
                let fwd = forward_poly(&qkv(&q, &k, &v, &s), &opts, &popts).unwrap();
                let gr = backward_poly(&qkv(&q, &k, &v, &s), &fwd, &g).unwrap();
                let eps = 1e-6;
                let fd = |x: &[f64], which: usize| -> Vec<f64> {
                    (0..x.len())
                        .map(|i| {
                            let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
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
                let tag = format!("g={degree} causal={causal} center={center}");
                for (name, got, want) in
                    [("dq", &gr.dq, fd(&q, 0)), ("dk", &gr.dk, fd(&k, 1)), ("dv", &gr.dv, fd(&v, 2))]
                {
                    let e = rel(got, &want);
                    worst = worst.max(e);
                    assert!(e < 1e-7, "{name} {tag}: rel err {e:e} against finite differences");
                }
            }
        }
    }
    eprintln!("fast backward vs finite differences: worst rel err {worst:.2e}");
}

/// The naive reference backward is itself checked against central differences of its forward.
#[test]
fn naive_poly_backward_matches_finite_differences() {
    let (n, h, hkv, d, dv) = (6, 2, 1, 3, 2);
    let s = AttnShape::new(n, h, hkv, d).with_head_dim_v(dv);
    for &(degree, causal, center) in
        &[(2, false, true), (2, true, true), (4, true, false), (4, false, false), (6, true, true)]
    {
        let scale = 0.7;
        let q = randn(n * h * d, 1, 1.0);
        let k = randn(n * hkv * d, 2, 1.0);
        let v = randn(n * hkv * dv, 3, 1.0);
        let g = randn(n * h * dv, 4, 1.0);
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            naive::poly_forward(q, k, v, &s, &naive::Poly::new(causal, scale, degree, center))
                .iter()
                .zip(&g)
                .map(|(a, b)| a * b)
                .sum()
        };
        let (dq, dk, dv_) =
            naive::poly_backward(&qkv(&q, &k, &v, &s), &g, &naive::Poly::new(causal, scale, degree, center));
        let eps = 1e-6;
        let fd = |x: &[f64], which: usize| -> Vec<f64> {
            (0..x.len())
                .map(|i| {
                    let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
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
        let tag = format!("g={degree} causal={causal} center={center}");
        assert!(rel(&dq, &fd(&q, 0)) < 1e-8, "naive dq {tag}");
        assert!(rel(&dk, &fd(&k, 1)) < 1e-8, "naive dk {tag}");
        assert!(rel(&dv_, &fd(&v, 2)) < 1e-8, "naive dv {tag}");
    }
}

/// Against exact softmax attention with inputs scaled so that the score bound is R ≈ 0.5 and 1.0:
/// the error of o, dq, dk, dv falls as the degree rises (2, 4, 6), and the output error stays
/// under the MATH §3 bound `‖Õ − O‖_∞ ≤ 2ε_A/(1−ε_A) ‖V‖_∞` wherever that bound is finite.
#[test]
fn poly_approaches_exact_softmax_as_degree_rises() {
    let (n, h, hkv, d) = (128, 2, 1, 8);
    let s = AttnShape::new(n, h, hkv, d);
    for &causal in &[false, true] {
        for &center in &[true, false] {
            for &target in &[0.5f64, 1.0] {
                let opts = AttnOptions::standard(d, causal);
                let mut q = randn(n * h * d, 3, 1.0);
                let k = randn(n * hkv * d, 4, 1.0);
                let v = randn(n * hkv * d, 5, 1.0);
                let g = randn(n * h * d, 6, 1.0);
                let r0 = head_bounds(&q, &k, &s, &opts, center).unwrap().into_iter().fold(0.0, f64::max);
                for x in &mut q {
                    *x *= target / r0;
                }
                let bounds = head_bounds(&q, &k, &s, &opts, center).unwrap();
                let r = bounds.iter().copied().fold(0.0, f64::max);
                assert!((r - target).abs() < 1e-9);
                // R really bounds every (shifted) score of every head
                for (hh, &rh) in bounds.iter().enumerate() {
                    let (a, m, _) =
                        naive::poly_weights(&q, &k, &s, &naive::Poly::new(causal, opts.scale, 2, center), hh);
                    let kvh = hh / (h / hkv);
                    for i in 0..n {
                        for j in 0..if causal { i + 1 } else { n } {
                            let sij: f64 = opts.scale
                                * (0..d).map(|c| q[(i * h + hh) * d + c] * k[(j * hkv + kvh) * d + c]).sum::<f64>();
                            assert!((sij - m[i]).abs() <= rh * (1.0 + 1e-12), "score bound violated");
                            assert!(a[i][j] > 0.0);
                        }
                    }
                    let qh: Vec<f64> = (0..n * d).map(|x| q[(x / d * h + hh) * d + x % d]).collect();
                    let kh: Vec<f64> = (0..n * d).map(|x| k[(x / d * hkv + kvh) * d + x % d]).collect();
                    assert_eq!(score_bound(&qh, &kh, n, d, opts.scale, causal, center), rh);
                }
                let o_ex = naive::forward(&q, &k, &v, &s, causal, opts.scale);
                let (dq_ex, dk_ex, dv_ex) = naive::backward(&qkv(&q, &k, &v, &s), &g, causal, opts.scale);
                let vmax = v.iter().fold(0.0f64, |a, x| a.max(x.abs()));
                let mut prev = [f64::INFINITY; 4];
                let mut line = format!("causal={causal} center={center} R={r:.2}:");
                for degree in [2usize, 4, 6] {
                    let popts = PolyOptions { degree, center, chunk: 32 };
                    let fwd: PolyOutput<f64> = forward_poly(&qkv(&q, &k, &v, &s), &opts, &popts).unwrap();
                    let gr = backward_poly(&qkv(&q, &k, &v, &s), &fwd, &g).unwrap();
                    let errs = [rel(&fwd.o, &o_ex), rel(&gr.dq, &dq_ex), rel(&gr.dk, &dk_ex), rel(&gr.dv, &dv_ex)];
                    let max_abs = fwd.o.iter().zip(&o_ex).fold(0.0f64, |a, (x, y)| a.max((x - y).abs()));
                    let bound = output_bound(r, degree);
                    line += &format!(
                        " g={degree}: o {:.1e} (∞-err {:.1e} ≤ bound {:.1e}) dq {:.1e} dk {:.1e} dv {:.1e};",
                        errs[0],
                        max_abs / vmax,
                        bound,
                        errs[1],
                        errs[2],
                        errs[3]
                    );
                    assert!(
                        max_abs <= bound * vmax,
                        "g={degree}: ‖Õ−O‖∞ = {max_abs:e} above the bound {:e}",
                        bound * vmax
                    );
                    for (name, (e, p)) in ["o", "dq", "dk", "dv"].iter().zip(errs.iter().zip(&prev)) {
                        assert!(e < p, "{name} error did not fall at g={degree}: {e:e} ≥ {p:e} ({line})");
                    }
                    prev = errs;
                }
                eprintln!("{line}");
            }
        }
    }
}

/// Keys sharing a large common offset (as real keys often do): the row shift shrinks the bound
/// and the error against exact softmax, causal (prefix means) and not (MATH §3 "Row shift").
#[test]
fn row_shift_helps_when_keys_share_an_offset() {
    let (n, h, hkv, d) = (96, 2, 2, 8);
    let s = AttnShape::new(n, h, hkv, d);
    for causal in [false, true] {
        let opts = AttnOptions::standard(d, causal);
        let q = randn(n * h * d, 21, 0.5);
        let mut k = randn(n * hkv * d, 22, 0.3);
        for (i, x) in k.iter_mut().enumerate() {
            *x += if i % 2 == 0 { 1.0 } else { -0.5 };
        }
        let v = randn(n * hkv * d, 23, 1.0);
        let o_ex = naive::forward(&q, &k, &v, &s, causal, opts.scale);
        let r_c = head_bounds(&q, &k, &s, &opts, true).unwrap();
        let r_u = head_bounds(&q, &k, &s, &opts, false).unwrap();
        let e = |center| {
            let popts = PolyOptions { degree: 2, center, chunk: 16 };
            rel(&forward_poly(&qkv(&q, &k, &v, &s), &opts, &popts).unwrap().o, &o_ex)
        };
        let (ec, eu) = (e(true), e(false));
        eprintln!("causal={causal}: R centered {r_c:.2?} vs {r_u:.2?}; rel err {ec:.1e} vs {eu:.1e}");
        assert!(r_c.iter().zip(&r_u).all(|(a, b)| a < b));
        assert!(ec < 0.5 * eu, "centering did not help: {ec:e} vs {eu:e}");
    }
}

#[test]
fn poly_rejects_bad_degree_and_options() {
    let s = AttnShape::new(4, 2, 1, 8);
    let opts = AttnOptions::standard(8, true);
    let q = randn(4 * 2 * 8, 1, 1.0);
    let kv = randn(4 * 8, 2, 1.0);
    for g in [1usize, 3, 5] {
        let err = forward_poly(&qkv(&q, &kv, &kv, &s), &opts, &PolyOptions::new(g)).unwrap_err();
        assert!(err.is_user_error());
        assert!(err.to_string().contains("degree must be even"), "{err}");
    }
    assert!(forward_poly(&qkv(&q, &kv, &kv, &s), &opts, &PolyOptions::new(0)).is_err());
    let popts = PolyOptions { chunk: 0, ..PolyOptions::new(2) };
    assert!(forward_poly(&qkv(&q, &kv, &kv, &s), &opts, &popts).unwrap_err().to_string().contains("chunk"));
    let huge = PolyOptions::new(12);
    let s128 = AttnShape::new(1, 1, 1, 128);
    let x = vec![0.0f64; 128];
    let err = forward_poly(&qkv(&x, &x, &x, &s128), &AttnOptions::standard(128, false), &huge).unwrap_err();
    assert!(err.to_string().contains("feature dimension"), "{err}");
    // a non-causal state of another degree, or a forward of another shape, is refused by the backward
    let opts = AttnOptions::standard(8, false);
    let mut fwd = forward_poly(&qkv(&q, &kv, &kv, &s), &opts, &PolyOptions::new(2)).unwrap();
    fwd.popts.degree = 4;
    let err = backward_poly(&qkv(&q, &kv, &kv, &s), &fwd, &q).unwrap_err();
    assert!(err.to_string().starts_with("fwd:"), "{err}");
    let s2 = AttnShape::new(8, 2, 2, 4);
    let fwd = forward_poly(&qkv(&q, &q, &q, &s2), &opts, &PolyOptions::new(2)).unwrap();
    let err = backward_poly(&qkv(&q, &kv, &kv, &s), &fwd, &q).unwrap_err();
    assert!(err.to_string().starts_with("fwd:"), "{err}");
    let err = head_bounds(&q, &kv[..5], &s, &opts, true).unwrap_err();
    assert!(err.to_string().starts_with("k:"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, .. ProptestConfig::default() })]
    #[test]
    fn poly_matches_naive_random_shapes(
        n in 1usize..70,
        hkv in 1usize..3,
        group in 1usize..3,
        d in 1usize..10,
        dv in 1usize..6,
        deg in 1usize..3,
        chunk in 1usize..40,
        causal: bool,
        center: bool,
        seed in 0u64..1000,
    ) {
        let degree = 2 * deg;
        let h = hkv * group;
        let s = AttnShape::new(n, h, hkv, d).with_head_dim_v(dv);
        let opts = AttnOptions::standard(d, causal);
        let popts = PolyOptions { degree, center, chunk };
        let q = randn(n * h * d, seed, 1.0);
        let k = randn(n * hkv * d, seed + 1, 1.0);
        let v = randn(n * hkv * dv, seed + 2, 1.0);
        let g = randn(n * h * dv, seed + 3, 1.0);
        let o_ref = naive::poly_forward(&q, &k, &v, &s, &naive::Poly::new(causal, opts.scale, degree, center));
        let (dq_ref, dk_ref, dv_ref) = naive::poly_backward(&qkv(&q, &k, &v, &s), &g, &naive::Poly::new(causal, opts.scale, degree, center));
        let fwd = forward_poly(&qkv(&q, &k, &v, &s), &opts, &popts).unwrap();
        let gr = backward_poly(&qkv(&q, &k, &v, &s), &fwd, &g).unwrap();
        for (name, got, want) in [("o", &fwd.o, &o_ref), ("dq", &gr.dq, &dq_ref), ("dk", &gr.dk, &dk_ref), ("dv", &gr.dv, &dv_ref)] {
            let e = rel(got, want);
            prop_assert!(e < 1e-10, "{} rel err {:e}", name, e);
        }
    }
}
