//! ALTGrad, LSSSZ's Algorithm 1 (MATH §5): the fast chunked kernels against the naive materialized
//! reference (f64 ≤ 1e-10, f32 ≤ 1e-5), the W-form against the Q/K/V chain rule, convergence to
//! the exact softmax gradient as the degree rises, and one test per correction of MATH §5.4 in
//! which the printed formula is shown to fail and the corrected one to match finite differences.

mod common;
use altgrad::attention::altgrad::{check_kron_state, one_layer_w_form, MAX_KRON_STATE};
use altgrad::attention::bound::{eps_a, key_means, row_shift};
use altgrad::attention::dispatch::forward_layer;
use altgrad::attention::features::{taylor, FeatureMap};
use altgrad::attention::HeadPlan;
use altgrad::attention::{
    backward_altgrad, backward_exact, backward_poly, forward_exact, forward_poly, head_bounds, naive, AttnOptions,
    AttnShape, Mask, PolyOptions, Qkv,
};
use common::{qkv, randn, rel, to_f32};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// small dense helpers (row-major)

/// `a [m, k] · b [k, n]`.
fn mm(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for t in 0..k {
            let av = a[i * k + t];
            for j in 0..n {
                out[i * n + j] += av * b[t * n + j];
            }
        }
    }
    out
}

/// Transpose of `a [m, n]`.
fn tr(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    (0..m * n).map(|t| a[(t % m) * n + t / m]).collect()
}

fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

fn scaled(a: &[f64], s: f64) -> Vec<f64> {
    a.iter().map(|x| x * s).collect()
}

/// `[n][n]` → row-major.
fn flat(f: &[Vec<f64>]) -> Vec<f64> {
    f.concat()
}

/// Central differences of `loss` at `x` (f64, step 1e-6).
fn fd(x: &[f64], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let eps = 1e-6;
    (0..x.len())
        .map(|i| {
            let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
            xp[i] += eps;
            xm[i] -= eps;
            (loss(&xp) - loss(&xm)) / (2.0 * eps)
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ---------------------------------------------------------------------------------------------
// 1. fast vs naive

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
}

/// Fast vs naive in f64 (≤ tol64) and f32 (≤ 1e-5); returns the worst f64 and f32 errors.
fn check(c: &Case, tol64: f64) -> (f64, f64) {
    let s = AttnShape::new(c.n, c.h, c.hkv, c.d).with_head_dim_v(c.dv);
    let opts = AttnOptions::standard(c.d, c.causal);
    let popts = PolyOptions { degree: c.degree, center: c.center, chunk: c.chunk };
    let q = randn(c.n * c.h * c.d, c.seed, 1.0);
    let k = randn(c.n * c.hkv * c.d, c.seed + 1, 1.0);
    let v = randn(c.n * c.hkv * c.dv, c.seed + 2, 1.0);
    let g = randn(c.n * c.h * c.dv, c.seed + 3, 1.0);
    let o_ref = naive::altgrad_forward(&q, &k, &v, &s, &naive::Poly::new(c.causal, opts.scale, c.degree, c.center));
    let (dq_ref, dk_ref, dv_ref) =
        naive::altgrad_backward(&qkv(&q, &k, &v, &s), &g, &naive::Poly::new(c.causal, opts.scale, c.degree, c.center));
    let mut lse_ref = Vec::new();
    for h in 0..c.h {
        let (a, m, _) = naive::poly_weights(&q, &k, &s, &naive::Poly::new(c.causal, opts.scale, c.degree, c.center), h);
        lse_ref.extend(a.iter().zip(&m).map(|(row, mi)| mi + row.iter().sum::<f64>().ln()));
    }
    let tag = format!(
        "n={} h={} hkv={} d={} dv={} causal={} center={} g={} chunk={}",
        c.n, c.h, c.hkv, c.d, c.dv, c.causal, c.center, c.degree, c.chunk
    );
    // dq is exactly zero for n = 1 (p = f̃ (G·v − δ) = 0): compare that by the absolute error over ‖G‖.
    let gnorm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
    let err = |got: &[f64], want: &[f64]| {
        let e = rel(got, want);
        if want.iter().all(|x| *x == 0.0) {
            e / gnorm
        } else {
            e
        }
    };
    let fwd = forward_poly(&qkv(&q, &k, &v, &s), &opts, &popts).unwrap();
    let gr = backward_altgrad(&qkv(&q, &k, &v, &s), &fwd, &g).unwrap();
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
    let gr = backward_altgrad(&qkv(&qf, &kf, &vf, &s), &fwd, &gf).unwrap();
    let up = |x: &[f32]| x.iter().map(|v| *v as f64).collect::<Vec<_>>();
    for (name, got, want) in [
        ("o", &fwd.o, &o_ref),
        ("lse", &fwd.lse, &lse_ref),
        ("dq", &gr.dq, &dq_ref),
        ("dk", &gr.dk, &dk_ref),
        ("dv", &gr.dv, &dv_ref),
    ] {
        let e = err(&up(got), want);
        worst.1 = worst.1.max(e);
        assert!(e < 1e-5, "f32 {name} {tag}: rel err {e:e}");
    }
    worst
}

#[test]
fn altgrad_matches_naive_over_shapes() {
    let heads = [(2usize, 1usize), (2, 2), (3, 1), (4, 2)];
    let mut seed = 100;
    let mut worst = (0.0f64, 0.0f64);
    for &n in &[1usize, 7, 64, 100, 257] {
        for &chunk in &[16usize, 64] {
            for &causal in &[false, true] {
                for &center in &[false, true] {
                    for &d in &[8usize, 16, 32] {
                        let (h, hkv) = heads[(seed as usize / 7) % heads.len()];
                        let c = Case { n, h, hkv, d, dv: d, causal, center, degree: 2, chunk, seed };
                        let w = check(&c, 1e-10);
                        worst = (worst.0.max(w.0), worst.1.max(w.1));
                        seed += 7;
                    }
                }
            }
        }
    }
    eprintln!("altgrad degree 2 vs naive: worst rel err f64 {:.2e}, f32 {:.2e}", worst.0, worst.1);
}

#[test]
fn altgrad_matches_naive_degree_4_value_width_and_chunks() {
    let mut seed = 900;
    let mut worst = (0.0f64, 0.0f64);
    for &n in &[7usize, 100] {
        for &causal in &[false, true] {
            for &center in &[false, true] {
                for &(d, dv) in &[(8usize, 8usize), (8, 5)] {
                    let c = Case { n, h: 2, hkv: 1, d, dv, causal, center, degree: 4, chunk: 16, seed };
                    let w = check(&c, 1e-10);
                    worst = (worst.0.max(w.0), worst.1.max(w.1));
                    seed += 5;
                }
            }
        }
    }
    // chunk 1 (LSSSZ Lemma I.3's row-by-row recursion), a chunk > n, and n not a multiple of it
    for &(chunk, causal) in &[(1usize, true), (1, false), (500, true), (13, true), (13, false)] {
        let c = Case { n: 37, h: 3, hkv: 3, d: 4, dv: 7, causal, center: true, degree: 2, chunk, seed };
        let w = check(&c, 1e-10);
        worst = (worst.0.max(w.0), worst.1.max(w.1));
        seed += 5;
    }
    eprintln!("altgrad degree 4 / dv ≠ d / chunks vs naive: worst rel err f64 {:.2e}, f32 {:.2e}", worst.0, worst.1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, .. ProptestConfig::default() })]
    #[test]
    fn altgrad_matches_naive_random_shapes(
        n in 1usize..60,
        hkv in 1usize..3,
        group in 1usize..3,
        d in 1usize..9,
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
        let o_ref = naive::altgrad_forward(&q, &k, &v, &s, &naive::Poly::new(causal, opts.scale, degree, center));
        let (dq_ref, dk_ref, dv_ref) = naive::altgrad_backward(&qkv(&q, &k, &v, &s), &g, &naive::Poly::new(causal, opts.scale, degree, center));
        let fwd = forward_poly(&qkv(&q, &k, &v, &s), &opts, &popts).unwrap();
        let gr = backward_altgrad(&qkv(&q, &k, &v, &s), &fwd, &g).unwrap();
        let gnorm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        for (name, got, want) in [("o", &fwd.o, &o_ref), ("dq", &gr.dq, &dq_ref), ("dk", &gr.dk, &dk_ref), ("dv", &gr.dv, &dv_ref)] {
            let mut e = rel(got, want);
            if want.iter().all(|x| *x == 0.0) {
                e /= gnorm;
            }
            prop_assert!(e < 1e-10, "{} rel err {:e}", name, e);
        }
    }
}

/// The naive reference is an independent transcription: with the exact softmax matrix in place of
/// `f̃`, its §5 formula is the textbook exact backward, and its forward is polynomial attention's.
#[test]
fn naive_reference_is_the_exact_formula_with_f_replaced() {
    let (n, h, hkv, d, dv) = (11, 2, 1, 5, 3);
    let s = AttnShape::new(n, h, hkv, d).with_head_dim_v(dv);
    for causal in [false, true] {
        let scale = 0.45;
        let q = randn(n * h * d, 71, 1.0);
        let k = randn(n * hkv * d, 72, 1.0);
        let v = randn(n * hkv * dv, 73, 1.0);
        let g = randn(n * h * dv, 74, 1.0);
        let (dq, _, _) = naive::backward(&qkv(&q, &k, &v, &s), &g, causal, scale);
        let head = |x: &[f64], heads: usize, w: usize, hh: usize| -> Vec<f64> {
            (0..n * w).map(|t| x[((t / w) * heads + hh) * w + t % w]).collect()
        };
        for hh in 0..h {
            let f = naive::probs(&q, &k, &s, causal, scale, hh);
            let mg = naive::grads_from_matrix(
                &f,
                &head(&q, h, d, hh),
                &head(&k, hkv, d, 0),
                &head(&v, hkv, dv, 0),
                &head(&g, h, dv, hh),
                n,
                d,
                dv,
                scale,
            );
            assert!(rel(&mg.dq, &head(&dq, h, d, hh)) < 1e-12);
        }
        // with one query head per key head the key/value gradients compare directly
        let s1 = AttnShape { num_heads: 1, ..s };
        let q1 = head(&q, h, d, 0);
        let (_, dk1, dv1) = naive::backward(&qkv(&q1, &k, &v, &s1), &head(&g, h, dv, 0), causal, scale);
        let f = naive::probs(&q1, &k, &s1, causal, scale, 0);
        let mg = naive::grads_from_matrix(&f, &q1, &k, &v, &head(&g, h, dv, 0), n, d, dv, scale);
        assert!(rel(&mg.dk, &dk1) < 1e-12 && rel(&mg.dv, &dv1) < 1e-12);
        for center in [false, true] {
            let a = naive::altgrad_forward(&q, &k, &v, &s, &naive::Poly::new(causal, scale, 4, center));
            let b = naive::poly_forward(&q, &k, &v, &s, &naive::Poly::new(causal, scale, 4, center));
            assert!(rel(&a, &b) < 1e-13);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. convergence to the exact softmax gradient

/// On inputs scaled so that the (shifted) score bound is R = 0.5 and 1.0, ALTGrad's output and
/// gradients approach exact softmax attention's as the degree rises (2, 4, 6), and the gradient
/// error stays below `ε_A(R, g)` (it uses `T_g` where the exact gradient uses
/// `eˣ`; the polynomial method's own gradient carries `T_{g−1}`, MATH §4).
#[test]
fn altgrad_approaches_exact_softmax_gradient_as_degree_rises() {
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
                let r = head_bounds(&q, &k, &s, &opts, center).unwrap().into_iter().fold(0.0, f64::max);
                // exact reference: the tiled kernel, checked against the materialized one
                let ex = forward_exact(&qkv(&q, &k, &v, &s), &opts).unwrap();
                let exg = backward_exact(&qkv(&q, &k, &v, &s), &ex, &g).unwrap();
                let (dq_n, _, _) = naive::backward(&qkv(&q, &k, &v, &s), &g, causal, opts.scale);
                assert!(rel(&exg.dq, &dq_n) < 1e-12);
                let mut prev = [f64::INFINITY; 4];
                let mut line = format!("causal={causal} center={center} R={r:.2}:");
                for degree in [2usize, 4, 6] {
                    let popts = PolyOptions { degree, center, chunk: 32 };
                    let fwd = forward_poly(&qkv(&q, &k, &v, &s), &opts, &popts).unwrap();
                    let gr = backward_altgrad(&qkv(&q, &k, &v, &s), &fwd, &g).unwrap();
                    let errs = [rel(&fwd.o, &ex.o), rel(&gr.dq, &exg.dq), rel(&gr.dk, &exg.dk), rel(&gr.dv, &exg.dv)];
                    let pf = forward_poly(&qkv(&q, &k, &v, &s), &opts, &popts).unwrap();
                    let pg = backward_poly(&qkv(&q, &k, &v, &s), &pf, &g).unwrap();
                    let poly_dq = rel(&pg.dq, &exg.dq);
                    let ea = eps_a(r, degree);
                    line += &format!(
                        "\n  g={degree}: ε_A={ea:.1e} | altgrad o {:.1e} dq {:.1e} dk {:.1e} dv {:.1e} | poly dq {poly_dq:.1e}",
                        errs[0], errs[1], errs[2], errs[3]
                    );
                    for (name, (e, p)) in ["o", "dq", "dk", "dv"].iter().zip(errs.iter().zip(&prev)) {
                        assert!(e < p, "{name} error did not fall at g={degree}: {e:e} ≥ {p:e} ({line})");
                    }
                    for (name, e) in ["dq", "dk", "dv"].iter().zip(&errs[1..]) {
                        assert!(*e < ea, "{name} at g={degree}: {e:e} above ε_A = {ea:e} ({line})");
                    }
                    prev = errs;
                }
                eprintln!("{line}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. the W-form

struct Layer {
    d: usize,
    x: Vec<f64>,
    wq: Vec<f64>,
    wk: Vec<f64>,
    wv: Vec<f64>,
    g: Vec<f64>,
}

fn layer(n: usize, hdim: usize, d: usize, dv: usize, seed: u64) -> Layer {
    Layer {
        d,
        x: randn(n * hdim, seed, 0.8),
        wq: randn(hdim * d, seed + 1, 0.6),
        wk: randn(hdim * d, seed + 2, 0.6),
        wv: randn(hdim * dv, seed + 3, 1.0),
        g: randn(n * dv, seed + 4, 1.0),
    }
}

/// The W-form (dL/dW for W = W_Q W_Kᵀ, dL/dW_V, dL/dX) against the Q/K/V chain rule through
/// `backward_altgrad` on the same input: `dW_Q = Xᵀ dQ = (dL/dW) W_K`, `dW_K = Xᵀ dK = (dL/dW)ᵀ W_Q`,
/// `dW_V = Xᵀ dV`, `dX = dQ W_Qᵀ + dK W_Kᵀ + dV W_Vᵀ`; and `dL/dW` itself against the naive W-form.
#[test]
fn w_form_matches_qkv_chain_rule() {
    let mut worst = 0.0f64;
    let mut worst32 = 0.0f64;
    let mut seed = 500;
    for &(n, hdim, d, dv) in &[(1usize, 6usize, 4usize, 3usize), (37, 12, 8, 8), (100, 10, 4, 5)] {
        for causal in [false, true] {
            for center in [false, true] {
                let l = layer(n, hdim, d, dv, seed);
                seed += 10;
                let opts = AttnOptions::standard(d, causal);
                let popts = PolyOptions { degree: 2, center, chunk: 16 };
                let wf = one_layer_w_form(&l.x, &l.wq, &l.wk, &l.wv, &l.g, n, hdim, d, dv, &opts, &popts).unwrap();
                let (q, k, v) =
                    (mm(&l.x, &l.wq, n, hdim, d), mm(&l.x, &l.wk, n, hdim, d), mm(&l.x, &l.wv, n, hdim, dv));
                let s = AttnShape::new(n, 1, 1, d).with_head_dim_v(dv);
                let fwd = forward_poly(&qkv(&q, &k, &v, &s), &opts, &popts).unwrap();
                let gr = backward_altgrad(&qkv(&q, &k, &v, &s), &fwd, &l.g).unwrap();
                let xt = tr(&l.x, n, hdim);
                let pairs = [
                    ("o", wf.o.clone(), fwd.o.clone()),
                    ("dW_Q", mm(&wf.dw, &l.wk, hdim, hdim, d), mm(&xt, &gr.dq, hdim, n, d)),
                    ("dW_K", mm(&tr(&wf.dw, hdim, hdim), &l.wq, hdim, hdim, d), mm(&xt, &gr.dk, hdim, n, d)),
                    ("dW_V", wf.dw_v.clone(), mm(&xt, &gr.dv, hdim, n, dv)),
                    (
                        "dX",
                        wf.dx.clone(),
                        add(
                            &add(
                                &mm(&gr.dq, &tr(&l.wq, hdim, d), n, d, hdim),
                                &mm(&gr.dk, &tr(&l.wk, hdim, d), n, d, hdim),
                            ),
                            &mm(&gr.dv, &tr(&l.wv, hdim, dv), n, dv, hdim),
                        ),
                    ),
                ];
                let tag = format!("n={n} hdim={hdim} d={d} dv={dv} causal={causal} center={center}");
                for (name, got, want) in &pairs {
                    let e = rel(got, want);
                    worst = worst.max(e);
                    assert!(e < 1e-10, "{name} {tag}: rel err {e:e}");
                }
                // dL/dW itself against the naive W-form with the materialized f̃
                let f = naive::altgrad_matrix(&q, &k, &s, &naive::Poly::new(causal, opts.scale, 2, center), 0);
                let w = mm(&l.wq, &tr(&l.wk, hdim, d), hdim, d, hdim);
                let (dw, dw_v, dx) = naive::w_form_from_matrix(&f, &l.x, &w, &l.wv, &l.g, n, hdim, dv, opts.scale);
                for (name, got, want) in [("dW", &wf.dw, &dw), ("dW_V", &wf.dw_v, &dw_v), ("dX", &wf.dx, &dx)] {
                    let e = rel(got, want);
                    worst = worst.max(e);
                    assert!(e < 1e-10, "naive {name} {tag}: rel err {e:e}");
                }
                // f32
                let w32 = one_layer_w_form(
                    &to_f32(&l.x),
                    &to_f32(&l.wq),
                    &to_f32(&l.wk),
                    &to_f32(&l.wv),
                    &to_f32(&l.g),
                    n,
                    hdim,
                    d,
                    dv,
                    &opts,
                    &popts,
                )
                .unwrap();
                let up = |x: &[f32]| x.iter().map(|v| *v as f64).collect::<Vec<_>>();
                for (name, got, want) in [("dW", &w32.dw, &dw), ("dW_V", &w32.dw_v, &dw_v), ("dX", &w32.dx, &dx)] {
                    let e = rel(&up(got), want);
                    worst32 = worst32.max(e);
                    assert!(e < 1e-5, "f32 {name} {tag}: rel err {e:e}");
                }
            }
        }
    }
    eprintln!("W-form vs Q/K/V chain rule and naive: worst rel err f64 {worst:.2e}, f32 {worst32:.2e}");
}

// ---------------------------------------------------------------------------------------------
// 4. the corrections of MATH §5.4, each against f64 finite differences of exact attention

/// One exact attention layer `L = ⟨G, f(X) X W_V⟩`, `f = softmax(τ X W Xᵀ)` (masked when causal),
/// computed independently of the library.
struct Exact {
    n: usize,
    hdim: usize,
    dv: usize,
    tau: f64,
    causal: bool,
}

impl Exact {
    fn probs(&self, x: &[f64], w: &[f64]) -> Vec<Vec<f64>> {
        let (n, hd) = (self.n, self.hdim);
        let xw = mm(x, w, n, hd, hd);
        let sc = mm(&xw, &tr(x, n, hd), n, hd, n);
        (0..n)
            .map(|i| {
                let jmax = if self.causal { i + 1 } else { n };
                let mx = (0..jmax).map(|j| self.tau * sc[i * n + j]).fold(f64::NEG_INFINITY, f64::max);
                let mut row: Vec<f64> =
                    (0..n).map(|j| if j < jmax { (self.tau * sc[i * n + j] - mx).exp() } else { 0.0 }).collect();
                let sum: f64 = row.iter().sum();
                row.iter_mut().for_each(|x| *x /= sum);
                row
            })
            .collect()
    }
    fn loss(&self, x: &[f64], w: &[f64], w_v: &[f64], g: &[f64]) -> f64 {
        let (n, hd, dv) = (self.n, self.hdim, self.dv);
        let f = flat(&self.probs(x, w));
        let o = mm(&f, &mm(x, w_v, n, hd, dv), n, n, dv);
        dot(&o, g)
    }
}

/// The exact-attention quantities the corrections are written with.
struct Terms {
    f: Vec<f64>,
    p1: Vec<f64>,
    p2: Vec<f64>,
    v: Vec<f64>,
    delta: Vec<f64>,
}

fn terms(e: &Exact, x: &[f64], w: &[f64], w_v: &[f64], g: &[f64]) -> Terms {
    let (n, hd, dv) = (e.n, e.hdim, e.dv);
    let f = flat(&e.probs(x, w));
    let v = mm(x, w_v, n, hd, dv);
    let o = mm(&f, &v, n, n, dv);
    let delta: Vec<f64> = (0..n).map(|i| dot(&g[i * dv..(i + 1) * dv], &o[i * dv..(i + 1) * dv])).collect();
    let gvt = mm(g, &tr(&v, n, dv), n, dv, n);
    let p1: Vec<f64> = f.iter().zip(&gvt).map(|(a, b)| a * b).collect();
    let p2: Vec<f64> = (0..n * n).map(|t| delta[t / n] * f[t]).collect();
    Terms { f, p1, p2, v, delta }
}

fn setup(causal: bool, tau: f64) -> (Exact, Layer, Vec<f64>) {
    let (n, hdim, d, dv) = (9, 6, 4, 3);
    let l = layer(n, hdim, d, dv, 4242);
    let w = mm(&l.wq, &tr(&l.wk, hdim, d), hdim, d, hdim);
    (Exact { n, hdim, dv, tau, causal }, l, w)
}

/// Correction 1 (Lemma G.3): the printed `dL/dW_V = Xᵀ f G` fails against finite differences of
/// exact causal attention; the corrected `Xᵀ fᵀ G` matches, and so does the library's exact `dV`.
#[test]
fn correction_1_dwv_needs_f_transposed() {
    let (e, l, w) = setup(true, 0.5);
    let (n, hd, dv) = (e.n, e.hdim, e.dv);
    let want = fd(&l.wv, |wv| e.loss(&l.x, &w, wv, &l.g));
    let t = terms(&e, &l.x, &w, &l.wv, &l.g);
    let xt = tr(&l.x, n, hd);
    let printed = mm(&xt, &mm(&t.f, &l.g, n, n, dv), hd, n, dv);
    let corrected = mm(&xt, &mm(&tr(&t.f, n, n), &l.g, n, n, dv), hd, n, dv);
    let (ep, ec) = (rel(&printed, &want), rel(&corrected, &want));
    // the library's exact backward on Q = X W_Q, K = X W_K, V = X W_V
    let s = AttnShape::new(n, 1, 1, l.d).with_head_dim_v(dv);
    let opts = AttnOptions { mask: Mask::causal(), scale: e.tau };
    let (q, k) = (mm(&l.x, &l.wq, n, hd, l.d), mm(&l.x, &l.wk, n, hd, l.d));
    let fw = forward_exact(&qkv(&q, &k, &t.v, &s), &opts).unwrap();
    let gr = backward_exact(&qkv(&q, &k, &t.v, &s), &fw, &l.g).unwrap();
    let el = rel(&mm(&xt, &gr.dv, hd, n, dv), &want);
    eprintln!("correction 1 (G.3): printed Xᵀ f G rel err {ep:.2e}; corrected Xᵀ fᵀ G {ec:.2e}; library {el:.2e}");
    assert!(ep > 0.1, "printed form should fail: {ep:e}");
    assert!(ec < 1e-7 && el < 1e-7, "corrected form should match: {ec:e} {el:e}");
}

/// Correction 2 (Lemma D.17): the five printed terms (W ↔ Wᵀ swapped in D₂, D₄, D₆, D₇; f instead
/// of fᵀ in D₆, D₇, D₈) do not sum to dL/dX; the corrected total `τ(p X Wᵀ + pᵀ X W) + fᵀ G W_Vᵀ`
/// matches f64 finite differences of exact causal attention, and leaving out any one of the seven
/// corrections fails.
///
/// The terms, corrected: `D₂ = τ p₁ X Wᵀ`, `D₄ = −τ p₂ X Wᵀ` (the row side of the scores),
/// `D₆ = τ (fᵀ ∘ V Gᵀ) X W = τ p₁ᵀ X W`, `D₇ = −τ fᵀ diag(δ) X W = −τ p₂ᵀ X W` (the column side),
/// `D₈ = fᵀ G W_Vᵀ` (through `V = X W_V`).
#[test]
fn correction_2_d17_terms() {
    let (e, l, w) = setup(true, 0.5);
    let (n, hd, dv, tau) = (e.n, e.hdim, e.dv, e.tau);
    let want = fd(&l.x, |x| e.loss(x, &w, &l.wv, &l.g));
    let t = terms(&e, &l.x, &w, &l.wv, &l.g);
    let wt = tr(&w, hd, hd);
    let ft = tr(&t.f, n, n);
    let vgt = mm(&t.v, &tr(&l.g, n, dv), n, dv, n);
    // fix[c] = true applies correction c: 0 D₂ W, 1 D₄ W, 2 D₆ W, 3 D₆ fᵀ, 4 D₇ W, 5 D₇ fᵀ, 6 D₈ fᵀ
    let total = |fix: [bool; 7]| -> Vec<f64> {
        let pick_w = |ok: bool, correct: &Vec<f64>, wrong: &Vec<f64>| if ok { correct.clone() } else { wrong.clone() };
        let d2 = scaled(&mm(&mm(&t.p1, &l.x, n, n, hd), &pick_w(fix[0], &wt, &w), n, hd, hd), tau);
        let d4 = scaled(&mm(&mm(&t.p2, &l.x, n, n, hd), &pick_w(fix[1], &wt, &w), n, hd, hd), -tau);
        let f6 = pick_w(fix[3], &ft, &t.f);
        let a6: Vec<f64> = f6.iter().zip(&vgt).map(|(a, b)| a * b).collect();
        let d6 = scaled(&mm(&mm(&a6, &l.x, n, n, hd), &pick_w(fix[2], &w, &wt), n, hd, hd), tau);
        let f7 = pick_w(fix[5], &ft, &t.f);
        let dx7: Vec<f64> = (0..n * hd).map(|z| t.delta[z / hd] * l.x[z]).collect();
        let d7 = scaled(&mm(&mm(&f7, &dx7, n, n, hd), &pick_w(fix[4], &w, &wt), n, hd, hd), -tau);
        let f8 = pick_w(fix[6], &ft, &t.f);
        let d8 = mm(&mm(&f8, &l.g, n, n, dv), &tr(&l.wv, hd, dv), n, dv, hd);
        [d4, d6, d7, d8].iter().fold(d2, |acc, x| add(&acc, x))
    };
    let printed = rel(&total([false; 7]), &want);
    let corrected_terms = rel(&total([true; 7]), &want);
    // the corrected closed form, from the naive library reference with the exact f
    let fr: Vec<Vec<f64>> = t.f.chunks(n).map(|r| r.to_vec()).collect();
    let (_, _, dx) = naive::w_form_from_matrix(&fr, &l.x, &w, &l.wv, &l.g, n, hd, dv, tau);
    let closed = rel(&dx, &want);
    let mut line = format!(
        "correction 2 (D.17): printed terms rel err {printed:.2e}; corrected terms {corrected_terms:.2e}; \
         τ(pXWᵀ + pᵀXW) + fᵀGW_Vᵀ {closed:.2e}; one correction left out:"
    );
    let names = ["D₂ W", "D₄ W", "D₆ W", "D₆ fᵀ", "D₇ W", "D₇ fᵀ", "D₈ fᵀ"];
    for (c, name) in names.iter().enumerate() {
        let mut fix = [true; 7];
        fix[c] = false;
        let e1 = rel(&total(fix), &want);
        line += &format!(" {name} {e1:.1e};");
        assert!(e1 > 1e-3, "leaving out correction {name} should fail: {e1:e}");
    }
    eprintln!("{line}");
    assert!(printed > 0.1, "printed D.17 should fail: {printed:e}");
    assert!(corrected_terms < 1e-7 && closed < 1e-7, "corrected D.17 should match: {corrected_terms:e} {closed:e}");
}

/// Correction 3 (Lemmas I.3–I.8): under the causal mask, `(M∘UVᵀ)Y` is a prefix sum, but the
/// transposed product `(M∘UVᵀ)ᵀY` needs a **suffix** sum. Shown on ALTGrad's own low-rank factors
/// (`U = D̃⁻¹Φ_Q`, `V = Φ_K`, with the row shift): (a) `dV = f̃ᵀG`, the gradient of the altgrad
/// forward in `V` (linear in `V`, so finite differences are exact); (b) the Fact C.2 product
/// `p₁ᵀB` with `p₁ = M ∘ ((D̃⁻¹Φ_Q ⊘ G)(Φ_K ⊘ V)ᵀ)`, the gradient of `Y ↦ ⟨B, p₁Y⟩` computed by
/// the paper's prefix recursion.
#[test]
fn correction_3_causal_transposed_products_need_suffix_sums() {
    let (n, d, dv, degree) = (13, 4, 3, 2);
    let s = AttnShape::new(n, 1, 1, d).with_head_dim_v(dv);
    let opts = AttnOptions::standard(d, true);
    let popts = PolyOptions { degree, center: true, chunk: 4 };
    let q = randn(n * d, 31, 1.0);
    let k = randn(n * d, 32, 1.0);
    let v = randn(n * dv, 33, 1.0);
    let g = randn(n * dv, 34, 1.0);
    // factors, built here from the public feature map: ψ_i (shift-weighted), φ_j, den_i
    let fm = FeatureMap::<f64>::new(d, degree).unwrap();
    let r = fm.dim();
    let st = opts.scale.sqrt();
    let m = row_shift(&q, &key_means(&k, n, d, true), n, d, opts.scale);
    let feat = |x: &[f64]| {
        let xs: Vec<f64> = x.iter().map(|a| a * st).collect();
        let mut out = vec![0.0; r];
        fm.apply(&xs, &mut out);
        out
    };
    let phi: Vec<Vec<f64>> = (0..n).map(|j| feat(&k[j * d..(j + 1) * d])).collect();
    let psi: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut p = feat(&q[i * d..(i + 1) * d]);
            for t in 0..=degree {
                for a in fm.block(t) {
                    p[a] *= taylor(degree - t, -m[i]);
                }
            }
            p
        })
        .collect();
    let den: Vec<f64> = (0..n).map(|i| (0..=i).map(|j| dot(&psi[i], &phi[j])).sum()).collect();
    let u: Vec<Vec<f64>> = (0..n).map(|i| psi[i].iter().map(|x| x / den[i]).collect()).collect();

    // (a) dV = (M ∘ U Φᵀ)ᵀ G: row j = φ_jᵀ Σ_{i ∈ S(j)} u_i g_iᵀ with S(j) = {i ≤ j} or {i ≥ j}
    let scan = |suffix: bool| -> Vec<f64> {
        let mut out = vec![0.0; n * dv];
        for j in 0..n {
            let mut state = vec![0.0; r * dv];
            let rows: Vec<usize> = if suffix { (j..n).collect() } else { (0..=j).collect() };
            for i in rows {
                for a in 0..r {
                    for c in 0..dv {
                        state[a * dv + c] += u[i][a] * g[i * dv + c];
                    }
                }
            }
            for c in 0..dv {
                out[j * dv + c] = (0..r).map(|a| phi[j][a] * state[a * dv + c]).sum();
            }
        }
        out
    };
    let want = fd(&v, |vv| dot(&forward_poly(&qkv(&q, &k, vv, &s), &opts, &popts).unwrap().o, &g));
    let (ea_pre, ea_suf) = (rel(&scan(false), &want), rel(&scan(true), &want));
    let fwd = forward_poly(&qkv(&q, &k, &v, &s), &opts, &popts).unwrap();
    let lib = rel(&backward_altgrad(&qkv(&q, &k, &v, &s), &fwd, &g).unwrap().dv, &want);

    // (b) p₁ with Kronecker factors a_i = u_i ⊗ g_i, b_j = φ_j ⊗ v_j (length r·dv)
    let kr = |x: &[f64], y: &[f64]| -> Vec<f64> { x.iter().flat_map(|a| y.iter().map(move |b| a * b)).collect() };
    let aa: Vec<Vec<f64>> = (0..n).map(|i| kr(&u[i], &g[i * dv..(i + 1) * dv])).collect();
    let bb: Vec<Vec<f64>> = (0..n).map(|j| kr(&phi[j], &v[j * dv..(j + 1) * dv])).collect();
    let w = 5;
    let y0 = randn(n * w, 35, 1.0);
    let bmat = randn(n * w, 36, 1.0);
    let rk = r * dv;
    // the paper's prefix recursion for (M ∘ A Bᵀ) Y: row i = a_iᵀ Σ_{j ≤ i} b_j y_jᵀ
    let p1_times = |y: &[f64]| -> Vec<f64> {
        let mut state = vec![0.0; rk * w];
        let mut out = vec![0.0; n * w];
        for i in 0..n {
            for a in 0..rk {
                for c in 0..w {
                    state[a * w + c] += bb[i][a] * y[i * w + c];
                }
            }
            for c in 0..w {
                out[i * w + c] = (0..rk).map(|a| aa[i][a] * state[a * w + c]).sum();
            }
        }
        out
    };
    // sanity: the prefix recursion is p₁ Y with p₁ = f̃ ∘ (G Vᵀ) materialized
    let f = naive::altgrad_matrix(&q, &k, &s, &naive::Poly::new(true, opts.scale, degree, true), 0);
    let p1: Vec<f64> =
        (0..n * n).map(|t| f[t / n][t % n] * dot(&g[t / n * dv..][..dv], &v[t % n * dv..][..dv])).collect();
    assert!(rel(&p1_times(&y0), &mm(&p1, &y0, n, n, w)) < 1e-12);
    let want_b = fd(&y0, |y| dot(&bmat, &p1_times(y)));
    let scan_t = |suffix: bool| -> Vec<f64> {
        let mut out = vec![0.0; n * w];
        let mut state = vec![0.0; rk * w];
        let order: Vec<usize> = if suffix { (0..n).rev().collect() } else { (0..n).collect() };
        for j in order {
            for a in 0..rk {
                for c in 0..w {
                    state[a * w + c] += aa[j][a] * bmat[j * w + c];
                }
            }
            for c in 0..w {
                out[j * w + c] = (0..rk).map(|a| bb[j][a] * state[a * w + c]).sum();
            }
        }
        out
    };
    let (eb_pre, eb_suf) = (rel(&scan_t(false), &want_b), rel(&scan_t(true), &want_b));
    eprintln!(
        "correction 3 (I.3–I.8, causal): f̃ᵀG prefix {ea_pre:.2e} suffix {ea_suf:.2e} library dV {lib:.2e}; \
         p₁ᵀB (Fact C.2 factors) prefix {eb_pre:.2e} suffix {eb_suf:.2e}"
    );
    assert!(ea_pre > 0.1 && eb_pre > 0.1, "prefix sums should fail: {ea_pre:e} {eb_pre:e}");
    assert!(ea_suf < 1e-7 && eb_suf < 1e-7 && lib < 1e-7, "suffix sums should match: {ea_suf:e} {eb_suf:e} {lib:e}");
}

/// Correction 4 (from Def C.6 on): the score scale τ is dropped. `dL/dW = Xᵀ p X` (Lemma F.4 as
/// printed) and `dQ = p K` fail against finite differences of exact causal attention unless τ = 1;
/// `τ Xᵀ p X` and `τ p K` match for τ = 1/√d and τ = 1.
#[test]
fn correction_4_restore_tau() {
    for tau in [0.5f64, 1.0] {
        let (e, l, w) = setup(true, tau);
        let (n, hd, d, dv) = (e.n, e.hdim, l.d, e.dv);
        // dL/dW, W = W_Q W_Kᵀ
        let want_w = fd(&w, |ww| e.loss(&l.x, ww, &l.wv, &l.g));
        let t = terms(&e, &l.x, &w, &l.wv, &l.g);
        let p: Vec<f64> = t.p1.iter().zip(&t.p2).map(|(a, b)| a - b).collect();
        let xpx = mm(&tr(&l.x, n, hd), &mm(&p, &l.x, n, n, hd), hd, n, hd);
        let (ew_p, ew_c) = (rel(&xpx, &want_w), rel(&scaled(&xpx, tau), &want_w));
        // dQ on Q/K/V inputs: FD of the materialized exact forward (library naive) in q
        let s = AttnShape::new(n, 1, 1, d).with_head_dim_v(dv);
        let (q, k) = (mm(&l.x, &l.wq, n, hd, d), mm(&l.x, &l.wk, n, hd, d));
        let want_q = fd(&q, |qq| dot(&naive::forward(qq, &k, &t.v, &s, true, tau), &l.g));
        let pk = mm(&p, &k, n, n, d);
        let (eq_p, eq_c) = (rel(&pk, &want_q), rel(&scaled(&pk, tau), &want_q));
        eprintln!(
            "correction 4 (τ = {tau}): printed Xᵀ p X {ew_p:.2e}, τ Xᵀ p X {ew_c:.2e}; printed p K {eq_p:.2e}, τ p K {eq_c:.2e}"
        );
        assert!(ew_c < 1e-7 && eq_c < 1e-7, "τ restored should match: {ew_c:e} {eq_c:e}");
        if tau == 1.0 {
            assert!(ew_p < 1e-7 && eq_p < 1e-7, "with τ = 1 the printed forms are right: {ew_p:e} {eq_p:e}");
        } else {
            assert!(ew_p > 0.1 && eq_p > 0.1, "without τ the printed forms should fail: {ew_p:e} {eq_p:e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. bad input

#[test]
fn altgrad_rejects_bad_degree_options_and_huge_states() {
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
    assert!(Qkv::new(&q, &kv[..5], &kv, &s).unwrap_err().to_string().starts_with("k:"));
    let fwd = forward_poly(&qkv(&q, &kv, &kv, &s), &opts, &PolyOptions::new(2)).unwrap();
    let mut bad = fwd.clone();
    bad.den = vec![0.0; 3];
    let err = backward_altgrad(&qkv(&q, &kv, &kv, &s), &bad, &q).unwrap_err();
    assert!(err.to_string().starts_with("den:"), "{err}");
    let err = backward_altgrad(&qkv(&q, &kv, &kv, &s), &fwd, &q[..7]).unwrap_err();
    assert!(err.to_string().starts_with("do:"), "{err}");
    // d = 64, g = 4: r = 814385, r·(d_v+1)·d ≈ 3.4e9 > MAX_KRON_STATE
    let s64 = AttnShape::new(1, 1, 1, 64);
    let x = vec![0.1f64; 64];
    let o64 = AttnOptions::standard(64, false);
    // rejected before any work: by the plan check (a layer's forward) and by the backward
    let err = check_kron_state(&s64, &PolyOptions::new(4)).unwrap_err();
    assert!(err.is_user_error() && err.to_string().contains(&MAX_KRON_STATE.to_string()), "{err}");
    let plans = [HeadPlan::AltGrad(PolyOptions::new(4))];
    let err = forward_layer(&x, &x, &x, &s64, &o64, &plans).unwrap_err();
    assert!(err.to_string().contains(&MAX_KRON_STATE.to_string()), "{err}");
    let mut fwd = forward_poly(&qkv(&x, &x, &x, &s64), &o64, &PolyOptions::new(2)).unwrap();
    fwd.popts.degree = 4;
    let err = backward_altgrad(&qkv(&x, &x, &x, &s64), &fwd, &x).unwrap_err();
    assert!(err.is_user_error() && err.to_string().contains(&MAX_KRON_STATE.to_string()), "{err}");
    // W-form
    let l = layer(5, 6, 4, 3, 9);
    let wo = AttnOptions::standard(4, true);
    let p2 = PolyOptions::new(2);
    assert!(one_layer_w_form(&l.x, &l.wq, &l.wk, &l.wv, &l.g, 5, 6, 4, 3, &wo, &p2).is_ok());
    let err = one_layer_w_form(&l.x, &l.wq[..3], &l.wk, &l.wv, &l.g, 5, 6, 4, 3, &wo, &p2).unwrap_err();
    assert!(err.to_string().starts_with("w_q:"), "{err}");
    let err = one_layer_w_form(&l.x, &l.wq, &l.wk, &l.wv, &l.g, 5, 6, 4, 3, &wo, &PolyOptions::new(3)).unwrap_err();
    assert!(err.to_string().contains("degree must be even"), "{err}");
    let bad_scale = AttnOptions { mask: Mask::causal(), scale: -1.0 };
    assert!(one_layer_w_form(&l.x, &l.wq, &l.wk, &l.wv, &l.g, 5, 6, 4, 3, &bad_scale, &p2).is_err());
}
