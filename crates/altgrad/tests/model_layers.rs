//! Every non-attention layer of the models (MATH §6), forward against its definition and
//! backward against central finite differences in f64 ([`common::fd_grad`]): token embedding,
//! RMSNorm, LayerNorm, RoPE, SwiGLU, GELU, the residual add; plus their f32 paths against f64
//! and their parallel paths against the serial ones.

mod common;
use altgrad::linalg::rel_err;
use altgrad::model::layers::{
    add_inplace, embedding_backward, embedding_forward, gelu, gelu_backward, gelu_derivative, gelu_forward,
    layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward, swiglu_backward, swiglu_forward, Rope,
    RopeLayout, PAR_MIN_ELEMS,
};
use common::{check_close, dot, fd_grad, layernorm_ref, randn_from, to_f32, to_f64};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Finite-difference step.
const H: f64 = 1e-6;

#[test]
fn embedding_forward_and_backward_with_repeats() {
    let mut rng = StdRng::seed_from_u64(1);
    let (vocab, hidden) = (6, 4);
    let table = randn_from(&mut rng, vocab * hidden);
    let ids = [2u32, 0, 2, 5, 2, 0];
    let y = embedding_forward(&ids, &table, hidden);
    for (i, &id) in ids.iter().enumerate() {
        for j in 0..hidden {
            assert_eq!(y[i * hidden + j], table[id as usize * hidden + j]);
        }
    }
    let r = randn_from(&mut rng, ids.len() * hidden);
    let fd = fd_grad(&table, H, |t| dot(&r, &embedding_forward(&ids, t, hidden)));
    // Accumulation: start from a non-zero dtable and subtract it afterwards.
    let pre = randn_from(&mut rng, vocab * hidden);
    let mut dt = pre.clone();
    embedding_backward(&ids, &r, hidden, &mut dt);
    let an: Vec<f64> = dt.iter().zip(&pre).map(|(a, b)| a - b).collect();
    check_close("embedding dtable", &an, &fd, 1e-7);
    // Rows never looked up get exactly zero.
    for id in [1usize, 3, 4] {
        assert!(an[id * hidden..(id + 1) * hidden].iter().all(|&v| v.abs() < 1e-12));
    }
    // f32 forward is an exact copy of the rounded table.
    let y32 = embedding_forward(&ids, &to_f32(&table), hidden);
    assert_eq!(y32, to_f32(&y));
}

/// Independent RMSNorm reference: straight from the definition, one element at a time.
fn rmsnorm_ref(x: &[f64], dim: usize, w: &[f64], eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for r in 0..x.len() / dim {
        let mut ss = 0.0;
        for j in 0..dim {
            ss += x[r * dim + j].powi(2);
        }
        let rms = (ss / dim as f64 + eps).sqrt();
        for j in 0..dim {
            y[r * dim + j] = x[r * dim + j] / rms * w[j];
        }
    }
    y
}

#[test]
fn rmsnorm_forward_matches_definition() {
    let mut rng = StdRng::seed_from_u64(2);
    let (rows, dim, eps) = (5, 8, 1e-5);
    let x = randn_from(&mut rng, rows * dim);
    let w = randn_from(&mut rng, dim);
    let (y, inv) = rmsnorm_forward(&x, dim, &w, eps);
    let e = rel_err(&y, &rmsnorm_ref(&x, dim, &w, eps));
    eprintln!("rmsnorm forward vs definition: {e:.3e}");
    assert!(e < 1e-14);
    for r in 0..rows {
        let ms: f64 = x[r * dim..(r + 1) * dim].iter().map(|v| v * v).sum::<f64>() / dim as f64;
        assert!((inv[r] - 1.0 / (ms + eps).sqrt()).abs() < 1e-14 * inv[r]);
    }
}

#[test]
fn rmsnorm_backward_fd() {
    let mut rng = StdRng::seed_from_u64(3);
    let (rows, dim, eps) = (5, 8, 1e-5);
    let x = randn_from(&mut rng, rows * dim);
    let w = randn_from(&mut rng, dim);
    let r = randn_from(&mut rng, rows * dim);
    let (_, inv) = rmsnorm_forward(&x, dim, &w, eps);
    let pre = randn_from(&mut rng, dim);
    let mut dw = pre.clone();
    let dx = rmsnorm_backward(&x, dim, &w, &inv, &r, &mut dw);
    let dw: Vec<f64> = dw.iter().zip(&pre).map(|(a, b)| a - b).collect();
    let fdx = fd_grad(&x, H, |xx| dot(&r, &rmsnorm_forward(xx, dim, &w, eps).0));
    let fdw = fd_grad(&w, H, |ww| dot(&r, &rmsnorm_forward(&x, dim, ww, eps).0));
    check_close("rmsnorm dx", &dx, &fdx, 1e-7);
    check_close("rmsnorm dw", &dw, &fdw, 1e-7);
}

#[test]
fn rmsnorm_parallel_path_matches_row_by_row() {
    // 64 × 1024 > PAR_MIN_ELEMS: the rayon path, checked against the (FD-verified) serial path
    // applied to one row at a time.
    let mut rng = StdRng::seed_from_u64(4);
    let (rows, dim, eps) = (64, 1024, 1e-6);
    assert!(rows * dim > PAR_MIN_ELEMS);
    let x = randn_from(&mut rng, rows * dim);
    let w = randn_from(&mut rng, dim);
    let dy = randn_from(&mut rng, rows * dim);
    let (y, inv) = rmsnorm_forward(&x, dim, &w, eps);
    let mut dw = vec![0.0; dim];
    let dx = rmsnorm_backward(&x, dim, &w, &inv, &dy, &mut dw);
    let mut dw_ref = vec![0.0; dim];
    for (r, &inv_r) in inv.iter().enumerate() {
        let s = r * dim..(r + 1) * dim;
        let (yr, ir) = rmsnorm_forward(&x[s.clone()], dim, &w, eps);
        assert_eq!(&y[s.clone()], &yr[..]);
        assert_eq!(inv_r, ir[0]);
        let dxr = rmsnorm_backward(&x[s.clone()], dim, &w, &ir, &dy[s.clone()], &mut dw_ref);
        assert_eq!(&dx[s], &dxr[..]);
    }
    let e = rel_err(&dw, &dw_ref);
    assert!(e < 1e-13, "dw parallel vs serial: {e:e}");
}

#[test]
fn rmsnorm_f32_matches_f64() {
    let mut rng = StdRng::seed_from_u64(5);
    let (rows, dim, eps) = (7, 64, 1e-5);
    let x32 = to_f32(&randn_from(&mut rng, rows * dim));
    let w32 = to_f32(&randn_from(&mut rng, dim));
    let (y32, i32_) = rmsnorm_forward(&x32, dim, &w32, eps);
    let (y64, i64_) = rmsnorm_forward(&to_f64(&x32), dim, &to_f64(&w32), eps);
    let (ey, ei) = (rel_err(&y32, &y64), rel_err(&i32_, &i64_));
    eprintln!("rmsnorm f32 vs f64: y {ey:.3e}, inv_rms {ei:.3e}");
    assert!(ey < 1e-6 && ei < 1e-6);
    let dy32 = to_f32(&randn_from(&mut rng, rows * dim));
    let mut dw32 = vec![0.0f32; dim];
    let mut dw64 = vec![0.0f64; dim];
    let dx32 = rmsnorm_backward(&x32, dim, &w32, &i32_, &dy32, &mut dw32);
    let dx64 = rmsnorm_backward(&to_f64(&x32), dim, &to_f64(&w32), &i64_, &to_f64(&dy32), &mut dw64);
    let (edx, edw) = (rel_err(&dx32, &dx64), rel_err(&dw32, &dw64));
    eprintln!("rmsnorm backward f32 vs f64: dx {edx:.3e}, dw {edw:.3e}");
    assert!(edx < 1e-5 && edw < 1e-5);
}

/// Angles for p = 3, θ = 10000, d = 8, by hand: θ^(−2i/8) = 10000^(−i/4) = 1, 0.1, 0.01, 0.001.
const HAND_ANGLES_P3: [f64; 4] = [3.0, 0.3, 0.03, 0.003];

#[test]
fn rope_matches_hand_computation() {
    let (seq, heads, d) = (4, 2, 8);
    let mut rng = StdRng::seed_from_u64(6);
    let x = randn_from(&mut rng, seq * heads * d);
    let rope = Rope::<f64>::new(seq, d, 10000.0);
    for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
        let mut y = x.clone();
        rope.apply(&mut y, seq, heads, layout);
        // Position 0: angle 0, identity.
        assert!(rel_err(&y[..heads * d], &x[..heads * d]) < 1e-15);
        for h in 0..heads {
            let base = 3 * heads * d + h * d;
            for (i, &ang) in HAND_ANGLES_P3.iter().enumerate() {
                let (a, b) = match layout {
                    RopeLayout::RotateHalf => (base + i, base + i + 4),
                    RopeLayout::Interleaved => (base + 2 * i, base + 2 * i + 1),
                };
                let (c, s) = (ang.cos(), ang.sin());
                let ea = x[a] * c - x[b] * s;
                let eb = x[b] * c + x[a] * s;
                assert!((y[a] - ea).abs() < 1e-14, "{layout:?} head {h} pair {i}: {} vs {ea}", y[a]);
                assert!((y[b] - eb).abs() < 1e-14, "{layout:?} head {h} pair {i}: {} vs {eb}", y[b]);
            }
        }
    }
    // One literal value, so a wrong sign convention in both the code and `sin` use above fails:
    // x = e_1 (RotateHalf, pair 1 at p = 3) ↦ cos(0.3) e_1 + sin(0.3) e_5.
    let mut e1 = vec![0.0; seq * d];
    e1[3 * d + 1] = 1.0;
    rope.apply(&mut e1, seq, 1, RopeLayout::RotateHalf);
    assert!((e1[3 * d + 1] - 0.955_336_489_125_606).abs() < 1e-14);
    assert!((e1[3 * d + 5] - 0.295_520_206_661_339_6).abs() < 1e-14);
}

#[test]
fn rope_interleaved_equals_permuted_rotate_half() {
    let (seq, heads, d) = (6, 3, 16);
    let mut rng = StdRng::seed_from_u64(7);
    let x = randn_from(&mut rng, seq * heads * d);
    let rope = Rope::<f64>::new(seq, d, 500000.0);
    let mut yi = x.clone();
    rope.apply(&mut yi, seq, heads, RopeLayout::Interleaved);
    // perm[k] = source index in the interleaved vector for rotate-half slot k.
    let half = d / 2;
    let perm: Vec<usize> = (0..d).map(|k| if k < half { 2 * k } else { 2 * (k - half) + 1 }).collect();
    let mut xp = vec![0.0; x.len()];
    for (hv, hx) in xp.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        for k in 0..d {
            hv[k] = hx[perm[k]];
        }
    }
    rope.apply(&mut xp, seq, heads, RopeLayout::RotateHalf);
    let mut back = vec![0.0; x.len()];
    for (hb, hp) in back.chunks_exact_mut(d).zip(xp.chunks_exact(d)) {
        for k in 0..d {
            hb[perm[k]] = hp[k];
        }
    }
    let e = rel_err(&yi, &back);
    eprintln!("interleaved vs permuted rotate-half: {e:.3e}");
    assert!(e < 1e-15);
}

#[test]
fn rope_inverse_is_backward_and_inverse() {
    let (seq, heads, d) = (5, 2, 8);
    let mut rng = StdRng::seed_from_u64(8);
    let rope = Rope::<f64>::new(7, d, 10000.0);
    for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
        let x = randn_from(&mut rng, seq * heads * d);
        let r = randn_from(&mut rng, seq * heads * d);
        let fd = fd_grad(&x, H, |xx| {
            let mut y = xx.to_vec();
            rope.apply(&mut y, seq, heads, layout);
            dot(&r, &y)
        });
        let mut an = r.clone();
        rope.apply_inverse(&mut an, seq, heads, layout);
        check_close(&format!("rope {layout:?} backward"), &an, &fd, 1e-7);
        let mut y = x.clone();
        rope.apply(&mut y, seq, heads, layout);
        assert!(rel_err(&y, &x) > 0.1, "rope must move x");
        rope.apply_inverse(&mut y, seq, heads, layout);
        let e = rel_err(&y, &x);
        eprintln!("rope {layout:?} apply∘apply_inverse: {e:.3e}");
        assert!(e < 1e-14);
    }
}

#[test]
fn rope_parallel_path_matches_per_head() {
    // 16 × 64 × 64 > PAR_MIN_ELEMS; each head extracted alone ([seq, 1, d]) takes the serial path.
    let (seq, heads, d) = (16, 64, 64);
    assert!(seq * heads * d > PAR_MIN_ELEMS && seq * d <= PAR_MIN_ELEMS);
    let mut rng = StdRng::seed_from_u64(9);
    let x = randn_from(&mut rng, seq * heads * d);
    let rope = Rope::<f64>::new(seq, d, 10000.0);
    for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
        let mut y = x.clone();
        rope.apply(&mut y, seq, heads, layout);
        for h in 0..heads {
            let mut xh: Vec<f64> = (0..seq).flat_map(|p| x[(p * heads + h) * d..][..d].to_vec()).collect();
            rope.apply(&mut xh, seq, 1, layout);
            for p in 0..seq {
                assert_eq!(&y[(p * heads + h) * d..][..d], &xh[p * d..][..d]);
            }
        }
    }
}

#[test]
fn rope_f32_matches_f64() {
    let (seq, heads, d) = (40, 4, 32);
    let mut rng = StdRng::seed_from_u64(10);
    let x32 = to_f32(&randn_from(&mut rng, seq * heads * d));
    for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
        let mut y32 = x32.clone();
        Rope::<f32>::new(seq, d, 10000.0).apply(&mut y32, seq, heads, layout);
        let mut y64 = to_f64(&x32);
        Rope::<f64>::new(seq, d, 10000.0).apply(&mut y64, seq, heads, layout);
        let e = rel_err(&y32, &y64);
        eprintln!("rope {layout:?} f32 vs f64: {e:.3e}");
        assert!(e < 1e-6);
    }
}

/// Independent silu: from the plain formula x / (1 + e^(−x)) (fine for moderate x).
fn silu_ref(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

#[test]
fn swiglu_forward_matches_definition_and_backward_fd() {
    let mut rng = StdRng::seed_from_u64(11);
    let n = 5 * 8;
    let g: Vec<f64> = randn_from(&mut rng, n).iter().map(|v| 3.0 * v).collect();
    let u = randn_from(&mut rng, n);
    let h = swiglu_forward(&g, &u);
    let href: Vec<f64> = g.iter().zip(&u).map(|(&a, &b)| silu_ref(a) * b).collect();
    let e = rel_err(&h, &href);
    eprintln!("swiglu forward vs definition: {e:.3e}");
    assert!(e < 1e-14);
    let r = randn_from(&mut rng, n);
    let (dg, du) = swiglu_backward(&g, &u, &r);
    let fdg = fd_grad(&g, H, |gg| dot(&r, &swiglu_forward(gg, &u)));
    let fdu = fd_grad(&u, H, |uu| dot(&r, &swiglu_forward(&g, uu)));
    check_close("swiglu dgate", &dg, &fdg, 1e-7);
    check_close("swiglu dup", &du, &fdu, 1e-7);
}

#[test]
fn swiglu_in_f32_matches_the_f64_definition() {
    // the f32 path uses the vectorized exp (fastmath): parallel blocks, every sign and size of gate
    let mut rng = StdRng::seed_from_u64(12);
    let n = PAR_MIN_ELEMS * 3 + 77;
    let g: Vec<f64> = randn_from(&mut rng, n).iter().map(|v| 6.0 * v).collect();
    let u = randn_from(&mut rng, n);
    let r = randn_from(&mut rng, n);
    let h = swiglu_forward(&to_f32(&g), &to_f32(&u));
    let (dg, du) = swiglu_backward(&to_f32(&g), &to_f32(&u), &to_f32(&r));
    let (g32, u32_, r32) = (to_f64(&to_f32(&g)), to_f64(&to_f32(&u)), to_f64(&to_f32(&r)));
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let href: Vec<f64> = g32.iter().zip(&u32_).map(|(&a, &b)| silu_ref(a) * b).collect();
    let duref: Vec<f64> = g32.iter().zip(&r32).map(|(&a, &d)| d * silu_ref(a)).collect();
    let dgref: Vec<f64> = (0..n)
        .map(|j| {
            let s = sig(g32[j]);
            r32[j] * u32_[j] * s * (1.0 + g32[j] * (1.0 - s))
        })
        .collect();
    for (name, got, want) in [("h", &h, &href), ("dup", &du, &duref), ("dgate", &dg, &dgref)] {
        let e = rel_err(&to_f64(got), want);
        assert!(e < 1e-6, "swiglu f32 {name}: relative error {e:.2e}");
    }
}

#[test]
fn swiglu_is_stable_for_large_gate() {
    let g = [1000.0f32, -1000.0, 88.0, -88.0, 200.0, -200.0];
    let u = [1.0f32; 6];
    let h = swiglu_forward(&g, &u);
    let (dg, du) = swiglu_backward(&g, &u, &u);
    for v in h.iter().chain(&dg).chain(&du) {
        assert!(v.is_finite(), "non-finite: h {h:?} dg {dg:?} du {du:?}");
    }
    assert_eq!(h[0], 1000.0);
    assert!(h[1].abs() < 1e-30);
    assert_eq!(dg[0], 1.0);
    assert!(dg[1].abs() < 1e-30);
    let g64 = [1000.0f64, -1000.0, 800.0, -800.0];
    let h64 = swiglu_forward(&g64, &[1.0; 4]);
    let (dg64, _) = swiglu_backward(&g64, &[1.0; 4], &[1.0; 4]);
    assert!(h64.iter().chain(&dg64).all(|v| v.is_finite()));
    assert_eq!(h64[0], 1000.0);
}

#[test]
fn swiglu_f32_matches_f64_and_parallel_path() {
    let mut rng = StdRng::seed_from_u64(12);
    let n = 40_000; // > PAR_MIN_ELEMS: parallel path
    let g32 = to_f32(&randn_from(&mut rng, n));
    let u32_ = to_f32(&randn_from(&mut rng, n));
    let h32 = swiglu_forward(&g32, &u32_);
    let h64 = swiglu_forward(&to_f64(&g32), &to_f64(&u32_));
    let e = rel_err(&h32, &h64);
    eprintln!("swiglu f32 vs f64: {e:.3e}");
    assert!(e < 1e-6);
    // Parallel vs serial (small slices take the serial path).
    let dh = to_f64(&to_f32(&randn_from(&mut rng, n)));
    let (g, u) = (to_f64(&g32), to_f64(&u32_));
    let (dg, du) = swiglu_backward(&g, &u, &dh);
    for s in (0..n).step_by(1000) {
        let e = (s + 1000).min(n);
        assert_eq!(&h64[s..e], &swiglu_forward(&g[s..e], &u[s..e])[..]);
        let (dgs, dus) = swiglu_backward(&g[s..e], &u[s..e], &dh[s..e]);
        assert_eq!(&dg[s..e], &dgs[..]);
        assert_eq!(&du[s..e], &dus[..]);
    }
}

#[test]
fn add_inplace_adds() {
    let mut rng = StdRng::seed_from_u64(13);
    for n in [10, 50_000] {
        let a = randn_from(&mut rng, n);
        let b = randn_from(&mut rng, n);
        let mut c = a.clone();
        add_inplace(&mut c, &b);
        assert!(c.iter().zip(a.iter().zip(&b)).all(|(c, (a, b))| *c == a + b));
    }
}

#[test]
fn layernorm_forward_matches_definition_and_backward_matches_fd() {
    let mut rng = StdRng::seed_from_u64(1);
    let (rows, dim, eps) = (5, 8, 1e-5);
    let x: Vec<f64> = randn_from(&mut rng, rows * dim).iter().map(|v| 3.0 * v + 0.7).collect();
    let w: Vec<f64> = randn_from(&mut rng, dim).iter().map(|v| 1.0 + 0.3 * v).collect();
    let b = randn_from(&mut rng, dim);
    let (y, stats) = layernorm_forward(&x, dim, &w, &b, eps);
    let e = rel_err(&y, &layernorm_ref(&x, dim, &w, &b, eps));
    assert!(e < 1e-15, "forward vs definition {e:e}");
    let r = randn_from(&mut rng, rows * dim);
    let (mut dw, mut db) = (vec![0.5; dim], vec![-0.25; dim]);
    let dx = layernorm_backward(&x, dim, &w, &stats, &r, &mut dw, &mut db);
    let dw: Vec<f64> = dw.iter().map(|v| v - 0.5).collect();
    let db: Vec<f64> = db.iter().map(|v| v + 0.25).collect();
    check_close("layernorm dx", &dx, &fd_grad(&x, H, |x| dot(&r, &layernorm_ref(x, dim, &w, &b, eps))), 1e-7);
    check_close("layernorm dw", &dw, &fd_grad(&w, H, |w| dot(&r, &layernorm_ref(&x, dim, w, &b, eps))), 1e-7);
    check_close("layernorm db", &db, &fd_grad(&b, H, |b| dot(&r, &layernorm_ref(&x, dim, &w, b, eps))), 1e-7);
    // f32 agrees with f64 to f32 precision.
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    let b32: Vec<f32> = b.iter().map(|&v| v as f32).collect();
    let (y32, _) = layernorm_forward(&x32, dim, &w32, &b32, eps);
    assert!(rel_err(&y32, &y) < 1e-6);
}

#[test]
fn layernorm_parallel_path_matches_serial() {
    let mut rng = StdRng::seed_from_u64(2);
    let (rows, dim, eps) = (300, 128, 1e-12); // 38400 > PAR_MIN_ELEMS
    let x = randn_from(&mut rng, rows * dim);
    let w = randn_from(&mut rng, dim);
    let b = randn_from(&mut rng, dim);
    let dy = randn_from(&mut rng, rows * dim);
    let (y, st) = layernorm_forward(&x, dim, &w, &b, eps);
    let (mut dw, mut db) = (vec![0.0; dim], vec![0.0; dim]);
    let dx = layernorm_backward(&x, dim, &w, &st, &dy, &mut dw, &mut db);
    // Serial: one row at a time.
    let (mut dw1, mut db1) = (vec![0.0; dim], vec![0.0; dim]);
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let (yr, sr) = layernorm_forward(xr, dim, &w, &b, eps);
        assert_eq!(&y[r * dim..(r + 1) * dim], &yr[..]);
        let dxr = layernorm_backward(xr, dim, &w, &sr, &dy[r * dim..(r + 1) * dim], &mut dw1, &mut db1);
        assert_eq!(&dx[r * dim..(r + 1) * dim], &dxr[..]);
    }
    assert!(rel_err(&dw, &dw1) < 1e-14 && rel_err(&db, &db1) < 1e-14);
}

#[test]
fn gelu_values_and_derivative() {
    // Hand values: x·Φ(x) evaluated with mpmath at 40 digits, rounded to the nearest f64.
    for (x, want) in [
        (1.0, 0.8413447460685429),
        (0.0, 0.0),
        (-1.0, -0.15865525393145705),
        (2.0, 1.9544997361036416),
        (-3.0, -0.0040496940948902835),
        (0.5, 0.34573123063700656),
        (-8.0, -4.976768459417427e-15),
    ] {
        let g = gelu(x);
        // erfc's condition number at −x/√2 is ≈ x² + 1, so far tails lose a few ulps.
        assert!((g - want).abs() <= 1e-14 * want.abs(), "gelu({x}) = {g:e}, want {want:e}");
    }
    // Derivative Φ(x) + x·φ(x), same source.
    for (x, want) in [(1.0, 1.0833154705876864), (-3.0, -0.011945647204183927), (0.0, 0.5)] {
        let d = gelu_derivative(x);
        assert!((d - want).abs() <= 1e-14 * want.abs(), "gelu'({x}) = {d:e}, want {want:e}");
    }
    let mut rng = StdRng::seed_from_u64(3);
    let x: Vec<f64> = randn_from(&mut rng, 50).iter().map(|v| 3.0 * v).collect();
    let r = randn_from(&mut rng, 50);
    let dx = gelu_backward(&x, &r);
    check_close("gelu dx", &dx, &fd_grad(&x, H, |x| dot(&r, &gelu_forward(x))), 1e-7);
    // f32 path rounds the f64 value once.
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    for (a, &b) in gelu_forward(&x32).iter().zip(&x32) {
        assert_eq!(*a, gelu(b as f64) as f32);
    }
}
