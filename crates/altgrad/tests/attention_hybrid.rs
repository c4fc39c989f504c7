//! Hybrid attention (MATH §4.1) against the naive O(n²) f64 form (`naive::hybrid_forward`, the
//! weights written out row by row), its backward against central finite differences of that
//! naive form, and its limits: `w = s = 0` is naive polynomial attention, `w ≥ n` naive exact
//! causal attention.

mod common;
use altgrad::attention::{
    backward_hybrid, forward_hybrid, naive, AttnOptions, AttnShape, HybridOptions, Mask, PolyOptions, Qkv,
};
use common::{dot, fd_grad, qkv, randn, rel, to_f32};

/// One case: shape, hybrid options, batch; inputs of scale `amp`.
struct Case {
    n: usize,
    h: usize,
    hkv: usize,
    d: usize,
    batch: usize,
    hopts: HybridOptions,
    amp: f64,
}

impl Case {
    fn new(n: usize, h: usize, hkv: usize, d: usize, w: usize, s: usize) -> Self {
        Case { n, h, hkv, d, batch: 1, hopts: HybridOptions::new(w, s, 2), amp: 1.0 }
    }
    fn shape(&self) -> AttnShape {
        AttnShape::new(self.n, self.h, self.hkv, self.d).with_batch(self.batch)
    }
    fn inputs(&self, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (b, n, h, hkv, d) = (self.batch, self.n, self.h, self.hkv, self.d);
        (
            randn(b * n * h * d, seed, self.amp),
            randn(b * n * hkv * d, seed + 1, self.amp),
            randn(b * n * hkv * d, seed + 2, 1.0),
            randn(b * n * h * d, seed + 3, 1.0),
        )
    }
    fn poly(&self, scale: f64) -> naive::Poly {
        naive::Poly::new(true, scale, self.hopts.poly.degree, self.hopts.poly.center)
    }
    /// The naive output of every sequence of the batch, concatenated.
    fn naive(&self, q: &[f64], k: &[f64], v: &[f64], scale: f64) -> Vec<f64> {
        let s1 = AttnShape { batch: 1, ..self.shape() };
        let (lq, lk) = (self.n * self.h * self.d, self.n * self.hkv * self.d);
        (0..self.batch)
            .flat_map(|b| {
                let (qb, kb, vb) = (&q[b * lq..(b + 1) * lq], &k[b * lk..(b + 1) * lk], &v[b * lk..(b + 1) * lk]);
                naive::hybrid_forward(qb, kb, vb, &s1, &self.poly(scale), self.hopts.window, self.hopts.sinks)
            })
            .collect()
    }
    fn tag(&self) -> String {
        let HybridOptions { window, sinks, poly } = self.hopts;
        format!(
            "n={} h={} hkv={} d={} b={} w={window} s={sinks} g={} center={} chunk={}",
            self.n, self.h, self.hkv, self.d, self.batch, poly.degree, poly.center, poly.chunk
        )
    }
}

/// Forward against the naive form (f64 ≤ 1e-11, f32 ≤ 2e-5).
fn forward_matches(c: &Case, seed: u64) {
    let s = c.shape();
    let opts = AttnOptions::causal(c.d);
    let (q, k, v, _) = c.inputs(seed);
    let want = c.naive(&q, &k, &v, opts.scale);
    let got = forward_hybrid(&qkv(&q, &k, &v, &s), &opts, &c.hopts).unwrap();
    let e = rel(&got.o, &want);
    assert!(e < 1e-11, "f64 o {}: rel err {e:e}", c.tag());
    let (qf, kf, vf) = (to_f32(&q), to_f32(&k), to_f32(&v));
    let got = forward_hybrid(&qkv(&qf, &kf, &vf, &s), &opts, &c.hopts).unwrap();
    let e = rel(&got.o, &want);
    assert!(e < 2e-5, "f32 o {}: rel err {e:e}", c.tag());
}

/// Backward against central differences of `L = Σ g ∘ naive(q, k, v)` (relative ≤ 1e-7).
fn backward_matches_fd(c: &Case, seed: u64) {
    let s = c.shape();
    let opts = AttnOptions::causal(c.d);
    let (q, k, v, g) = c.inputs(seed);
    let x = qkv(&q, &k, &v, &s);
    let fwd = forward_hybrid(&x, &opts, &c.hopts).unwrap();
    let gr = backward_hybrid(&x, &fwd, &g).unwrap();
    let loss = |q: &[f64], k: &[f64], v: &[f64]| dot(&c.naive(q, k, v, opts.scale), &g);
    let dq = fd_grad(&q, 1e-6, |q| loss(q, &k, &v));
    let dk = fd_grad(&k, 1e-6, |k| loss(&q, k, &v));
    let dv = fd_grad(&v, 1e-6, |v| loss(&q, &k, v));
    for (name, got, want) in [("dq", &gr.dq, &dq), ("dk", &gr.dk, &dk), ("dv", &gr.dv, &dv)] {
        let e = rel(got, want);
        assert!(e < 1e-7, "{name} {}: rel err {e:e} against finite differences", c.tag());
    }
}

#[test]
fn hybrid_forward_matches_naive() {
    let mut seed = 300;
    // n not a multiple of the window or of the chunk; windows shorter and longer than a chunk;
    // rows with and without far keys; GQA
    for &(n, w, s) in &[(1, 1, 0), (7, 3, 0), (37, 5, 2), (70, 16, 1), (130, 9, 4), (200, 100, 0), (67, 0, 3)] {
        for &(h, hkv, d) in &[(2, 2, 4), (4, 2, 8), (3, 1, 16)] {
            for &(g, center, chunk) in &[(2, true, 16), (2, false, 7), (4, true, 64)] {
                let mut c = Case::new(n, h, hkv, d, w, s);
                c.hopts.poly = PolyOptions { degree: g, center, chunk };
                forward_matches(&c, seed);
                seed += 5;
            }
        }
    }
}

#[test]
fn hybrid_forward_batches_and_large_scores() {
    let mut c = Case::new(90, 4, 2, 8, 11, 2);
    c.batch = 3;
    c.hopts.poly.chunk = 13;
    forward_matches(&c, 41);
    // scores in the tens: the near part dominates by many nats and must not overflow f32
    let mut c = Case::new(80, 2, 1, 16, 8, 1);
    c.amp = 3.0;
    forward_matches(&c, 43);
}

#[test]
fn hybrid_backward_matches_finite_differences() {
    let mut seed = 500;
    for &(n, w, s, h, hkv, d, center, chunk) in &[
        (13, 3, 1, 2, 1, 4, true, 4),
        (13, 3, 1, 2, 1, 4, false, 5),
        (17, 4, 0, 2, 2, 3, true, 6),
        (11, 0, 2, 2, 1, 4, true, 3),
        (9, 0, 0, 1, 1, 4, true, 4),
        (10, 12, 0, 2, 1, 4, true, 4),
    ] {
        let mut c = Case::new(n, h, hkv, d, w, s);
        c.hopts.poly = PolyOptions { degree: 2, center, chunk };
        backward_matches_fd(&c, seed);
        seed += 9;
    }
    // degree 4, a batch of two
    let mut c = Case::new(12, 2, 1, 3, 3, 1);
    c.hopts.poly = PolyOptions { degree: 4, center: true, chunk: 5 };
    c.batch = 2;
    backward_matches_fd(&c, 601);
}

#[test]
fn hybrid_limits_are_poly_and_exact() {
    let (n, h, hkv, d) = (75, 2, 1, 8);
    let s = AttnShape::new(n, h, hkv, d);
    let opts = AttnOptions::causal(d);
    let q = randn(n * h * d, 7, 1.0);
    let k = randn(n * hkv * d, 8, 1.0);
    let v = randn(n * hkv * d, 9, 1.0);
    let x = qkv(&q, &k, &v, &s);
    // no window, no sinks: polynomial attention
    let o = forward_hybrid(&x, &opts, &HybridOptions::new(0, 0, 2)).unwrap().o;
    let want = naive::poly_forward(&q, &k, &v, &s, &naive::Poly::new(true, opts.scale, 2, true));
    assert!(rel(&o, &want) < 1e-12, "w = s = 0 vs naive poly: {:e}", rel(&o, &want));
    // a window covering the sequence: exact causal attention
    // (and no overflow at the largest sizes a hostile config could give)
    for (w, sinks) in [(n, 0), (n + 10, 0), (usize::MAX, 0), (1, usize::MAX), (usize::MAX, usize::MAX)] {
        let h = HybridOptions::new(w, sinks, 2);
        let fwd = forward_hybrid(&x, &opts, &h).unwrap();
        let want = naive::forward(&q, &k, &v, &s, true, opts.scale);
        assert!(rel(&fwd.o, &want) < 1e-12, "w = {w}, s = {sinks} vs naive exact: {:e}", rel(&fwd.o, &want));
        let g = randn(n * h_dims(&s), 10, 1.0);
        let gr = backward_hybrid(&x, &fwd, &g).unwrap();
        let (dq, dk, dv) = naive::backward(&x, &g, true, opts.scale);
        assert!(rel(&gr.dq, &dq) < 1e-11 && rel(&gr.dk, &dk) < 1e-11 && rel(&gr.dv, &dv) < 1e-11, "w = {w}");
    }
}

#[test]
fn hybrid_rejects_bad_options() {
    let s = AttnShape::new(8, 2, 2, 4);
    let x = vec![0.1f64; 8 * 2 * 4];
    let xq: Qkv<'_, f64> = qkv(&x, &x, &x, &s);
    let h = HybridOptions::new(4, 0, 2);
    for (opts, want) in [
        (AttnOptions::full(4), "mask:"),
        (AttnOptions::causal(4).with_mask(Mask::Window { window: 2, sinks: 0, q_offset: 0 }), "mask:"),
    ] {
        let err = forward_hybrid(&xq, &opts, &h).unwrap_err().to_string();
        assert!(err.starts_with(want), "{err}");
    }
    let err = forward_hybrid(&xq, &AttnOptions::causal(4), &HybridOptions::new(4, 0, 3)).unwrap_err().to_string();
    assert!(err.contains("even"), "{err}");
    let mut h0 = h;
    h0.poly.chunk = 0;
    assert!(forward_hybrid(&xq, &AttnOptions::causal(4), &h0).unwrap_err().to_string().starts_with("chunk:"));
    // a backward with another forward's shape
    let fwd = forward_hybrid(&xq, &AttnOptions::causal(4), &h).unwrap();
    let s2 = AttnShape::new(4, 2, 2, 4).with_batch(2);
    let err = backward_hybrid(&qkv(&x, &x, &x, &s2), &fwd, &x).unwrap_err().to_string();
    assert!(err.starts_with("fwd:"), "{err}");
}

/// Values per row of `o`: `num_heads · head_dim_v`.
fn h_dims(s: &AttnShape) -> usize {
    s.num_heads * s.head_dim_v
}
