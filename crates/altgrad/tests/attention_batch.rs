//! The batch dimension and the caller-owned-buffer entry points: a call on `[batch, seq, heads,
//! dim]` tensors equals one call per sequence (outputs, log-sum-exps, gradients, final states),
//! for every method and mask; `_into` calls write the same numbers into caller buffers, and a
//! kept `Workspace` is reused across calls without changing them.

mod common;
use altgrad::attention::dispatch::{backward_layer, forward_layer};
use altgrad::attention::HeadPlan;
use altgrad::attention::{
    backward_altgrad, backward_exact, backward_exact_into, backward_poly_into, backward_poly_state, forward_exact,
    forward_exact_into, forward_poly, forward_poly_into, forward_poly_state, AttnGrads, AttnOptions, AttnShape, Mask,
    PolyBuffers, PolyOptions, Workspace,
};
use common::{qkv, randn, rel};

/// Sequence `b`'s block of a `[batch, …]` tensor of `per` values per sequence.
fn seq<T>(x: &[T], b: usize, per: usize) -> &[T] {
    &x[b * per..(b + 1) * per]
}

struct Data {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    g: Vec<f64>,
}

fn data(s: &AttnShape, seed: u64) -> Data {
    let b = s.batch;
    Data {
        q: randn(b * s.seq_len * s.num_heads * s.head_dim, seed, 1.0),
        k: randn(b * s.kv_len * s.num_kv_heads * s.head_dim, seed + 1, 1.0),
        v: randn(b * s.kv_len * s.num_kv_heads * s.head_dim_v, seed + 2, 1.0),
        g: randn(b * s.seq_len * s.num_heads * s.head_dim_v, seed + 3, 1.0),
    }
}

/// Per-sequence sizes of the tensors of `s`: `(q, k, v, o, lse)`.
fn per(s: &AttnShape) -> (usize, usize, usize, usize, usize) {
    let (n, nk) = (s.seq_len, s.kv_len);
    (
        n * s.num_heads * s.head_dim,
        nk * s.num_kv_heads * s.head_dim,
        nk * s.num_kv_heads * s.head_dim_v,
        n * s.num_heads * s.head_dim_v,
        s.num_heads * n,
    )
}

fn assert_close(name: &str, got: &[f64], want: &[f64]) {
    let e = rel(got, want);
    assert!(e <= 1e-14, "{name}: batched vs per-sequence rel err {e:e}");
}

#[test]
fn exact_batch_equals_one_call_per_sequence() {
    let base = AttnShape::new(70, 4, 2, 8).with_head_dim_v(6);
    for mask in
        [Mask::Full, Mask::causal(), Mask::Causal { q_offset: 9 }, Mask::Window { window: 20, sinks: 2, q_offset: 5 }]
    {
        let one = base.with_kv_len(mask.kv_len(base.seq_len).unwrap_or(base.seq_len));
        let s = one.with_batch(3);
        let x = data(&s, 7);
        let opts = AttnOptions::standard(8, false).with_mask(mask);
        let xb = qkv(&x.q, &x.k, &x.v, &s);
        let fwd = forward_exact(&xb, &opts).unwrap();
        let gr = backward_exact(&xb, &fwd, &x.g).unwrap();
        let (pq, pk, pv, po, pl) = per(&one);
        for b in 0..3 {
            let x1 = qkv(seq(&x.q, b, pq), seq(&x.k, b, pk), seq(&x.v, b, pv), &one);
            let f1 = forward_exact(&x1, &opts).unwrap();
            let g1 = backward_exact(&x1, &f1, seq(&x.g, b, po)).unwrap();
            let tag = format!("{mask:?} sequence {b}");
            assert_close(&format!("o {tag}"), seq(&fwd.o, b, po), &f1.o);
            assert_close(&format!("lse {tag}"), seq(&fwd.lse, b, pl), &f1.lse);
            assert_close(&format!("dq {tag}"), seq(&gr.dq, b, pq), &g1.dq);
            assert_close(&format!("dk {tag}"), seq(&gr.dk, b, pk), &g1.dk);
            assert_close(&format!("dv {tag}"), seq(&gr.dv, b, pv), &g1.dv);
        }
        // caller-owned buffers and a kept workspace: the same numbers, twice
        let ws = Workspace::new();
        for _ in 0..2 {
            let (mut o, mut lse) = (vec![0.0; fwd.o.len()], vec![0.0; fwd.lse.len()]);
            forward_exact_into(&xb, &opts, &mut o, &mut lse, &ws).unwrap();
            assert_eq!((&o, &lse), (&fwd.o, &fwd.lse));
            let mut g2 = AttnGrads::zeros(&s);
            g2.dq.fill(7.0); // overwritten, not accumulated
            backward_exact_into(&xb, &opts, &o, &lse, &x.g, g2.as_mut(), &ws).unwrap();
            assert_eq!((&g2.dq, &g2.dk, &g2.dv), (&gr.dq, &gr.dk, &gr.dv));
        }
        assert!(ws.held() > 0, "the workspace keeps its buffers");
    }
}

#[test]
fn poly_and_altgrad_batch_equal_one_call_per_sequence() {
    let one = AttnShape::new(45, 4, 2, 4).with_head_dim_v(3);
    let s = one.with_batch(2);
    let x = data(&s, 30);
    let (pq, pk, pv, po, pl) = per(&one);
    for causal in [false, true] {
        for center in [true, false] {
            let opts = AttnOptions::standard(4, causal);
            let popts = PolyOptions { degree: 2, center, chunk: 16 };
            let xb = qkv(&x.q, &x.k, &x.v, &s);
            let fwd = forward_poly(&xb, &opts, &popts).unwrap();
            let gp = backward_poly_state(&xb, &fwd, &x.g, None).unwrap();
            let ga = backward_altgrad(&xb, &fwd, &x.g).unwrap();
            for b in 0..2 {
                let x1 = qkv(seq(&x.q, b, pq), seq(&x.k, b, pk), seq(&x.v, b, pv), &one);
                let f1 = forward_poly(&x1, &opts, &popts).unwrap();
                let (gp1, d1) = backward_poly_state(&x1, &f1, seq(&x.g, b, po), None).unwrap();
                let ga1 = backward_altgrad(&x1, &f1, seq(&x.g, b, po)).unwrap();
                let tag = format!("causal={causal} center={center} sequence {b}");
                assert_close(&format!("o {tag}"), seq(&fwd.o, b, po), &f1.o);
                assert_close(&format!("lse {tag}"), seq(&fwd.lse, b, pl), &f1.lse);
                assert_close(&format!("den {tag}"), seq(&fwd.den, b, pl), &f1.den);
                let rl = one.num_kv_heads * one.head_dim;
                assert_close(&format!("reference {tag}"), seq(&fwd.reference, b, rl), &f1.reference);
                for (name, got, want) in
                    [("dq", &gp.0.dq, &gp1.dq), ("dk", &gp.0.dk, &gp1.dk), ("dv", &gp.0.dv, &gp1.dv)]
                {
                    let len = want.len();
                    assert_close(&format!("poly {name} {tag}"), seq(got, b, len), want);
                }
                for (name, got, want) in [("dq", &ga.dq, &ga1.dq), ("dk", &ga.dk, &ga1.dk), ("dv", &ga.dv, &ga1.dv)] {
                    let len = want.len();
                    assert_close(&format!("altgrad {name} {tag}"), seq(got, b, len), want);
                }
                if causal {
                    let (fs, fs1) = (fwd.final_state.as_ref().unwrap(), f1.final_state.as_ref().unwrap());
                    assert_close(&format!("final S' {tag}"), seq(&fs.s, b, fs1.s.len()), &fs1.s);
                    assert_close(&format!("final key_sum {tag}"), seq(&fs.key_sum, b, fs1.key_sum.len()), &fs1.key_sum);
                    let (d, d1) = (gp.1.as_ref().unwrap(), d1.unwrap());
                    assert_close(&format!("dS'_initial {tag}"), seq(&d.ds, b, d1.ds.len()), &d1.ds);
                }
            }
            // caller-owned buffers and a kept workspace
            let ws = Workspace::new();
            for _ in 0..2 {
                let (mut o, mut lse, mut den) =
                    (vec![0.0; fwd.o.len()], vec![0.0; fwd.lse.len()], vec![0.0; fwd.den.len()]);
                let out = PolyBuffers { o: &mut o, lse: &mut lse, den: &mut den };
                let saved = forward_poly_into(&xb, &opts, &popts, None, None, out, &ws).unwrap();
                assert_eq!((&o, &lse, &den), (&fwd.o, &fwd.lse, &fwd.den));
                let mut g2 = AttnGrads::zeros(&s);
                backward_poly_into(&xb, &saved, &o, &den, &x.g, None, g2.as_mut(), &ws).unwrap();
                assert_eq!((&g2.dq, &g2.dk, &g2.dv), (&gp.0.dq, &gp.0.dk, &gp.0.dv));
            }
        }
    }
}

/// One workspace through causal polynomial calls of different lengths and centering: its
/// recycled whole-sequence buffers (the prefix means, grown for the longest call and holding an
/// earlier call's values) give the numbers of calls with fresh buffers, bit for bit.
#[test]
fn kept_workspace_across_lengths_and_centering() {
    let ws = Workspace::new();
    let opts = AttnOptions::causal(4);
    for (n, center) in [(45, true), (13, true), (45, false), (60, true), (7, false), (45, true)] {
        let s = AttnShape::new(n, 4, 2, 4).with_head_dim_v(3);
        let x = data(&s, 90 + n as u64);
        let xb = qkv(&x.q, &x.k, &x.v, &s);
        let popts = PolyOptions { degree: 2, center, chunk: 8 };
        let fwd = forward_poly(&xb, &opts, &popts).unwrap();
        let (gp, _) = backward_poly_state(&xb, &fwd, &x.g, None).unwrap();
        let (mut o, mut lse, mut den) = (vec![0.0; fwd.o.len()], vec![0.0; fwd.lse.len()], vec![0.0; fwd.den.len()]);
        let out = PolyBuffers { o: &mut o, lse: &mut lse, den: &mut den };
        let saved = forward_poly_into(&xb, &opts, &popts, None, None, out, &ws).unwrap();
        let tag = format!("n = {n}, center = {center}");
        assert_eq!((&o, &lse, &den), (&fwd.o, &fwd.lse, &fwd.den), "forward, {tag}");
        assert_eq!(saved.final_state, fwd.final_state, "final state, {tag}");
        let mut g2 = AttnGrads::zeros(&s);
        backward_poly_into(&xb, &saved, &o, &den, &x.g, None, g2.as_mut(), &ws).unwrap();
        assert_eq!((&g2.dq, &g2.dk, &g2.dv), (&gp.dq, &gp.dk, &gp.dv), "gradients, {tag}");
    }
    assert!(ws.held() > 0, "the workspace keeps its buffers");
}

#[test]
fn batched_state_continues_every_sequence() {
    let one = AttnShape::new(30, 2, 1, 4);
    let s = one.with_batch(3);
    let x = data(&s, 60);
    let opts = AttnOptions::causal(4);
    let popts = PolyOptions { degree: 2, center: true, chunk: 8 };
    let first = forward_poly(&qkv(&x.q, &x.k, &x.v, &s), &opts, &popts).unwrap();
    let st = first.saved.final_state.unwrap();
    assert_eq!(st.count, 30);
    // the same inputs again, continuing the state: position 30.. of every sequence
    let next = opts.with_mask(Mask::Causal { q_offset: 30 });
    let fb = forward_poly_state(&qkv(&x.q, &x.k, &x.v, &s), &next, &popts, Some(&st), None).unwrap();
    let (pq, pk, pv, po, _) = per(&one);
    for b in 0..3 {
        let x1 = qkv(seq(&x.q, b, pq), seq(&x.k, b, pk), seq(&x.v, b, pv), &one);
        let st1 = forward_poly(&x1, &opts, &popts).unwrap().saved.final_state.unwrap();
        let f1 = forward_poly_state(&x1, &next, &popts, Some(&st1), None).unwrap();
        assert_close(&format!("o sequence {b}"), seq(&fb.o, b, po), &f1.o);
    }
}

#[test]
fn mixed_layer_batch_equals_one_call_per_sequence() {
    let one = AttnShape::new(40, 4, 2, 4);
    let s = one.with_batch(2);
    let x = data(&s, 90);
    let opts = AttnOptions::causal(4);
    let p = PolyOptions { degree: 2, center: true, chunk: 16 };
    let plans = [HeadPlan::Exact, HeadPlan::Poly(p), HeadPlan::AltGrad(p), HeadPlan::Poly(PolyOptions::new(4))];
    let fwd = forward_layer(&x.q, &x.k, &x.v, &s, &opts, &plans).unwrap();
    let gr = backward_layer(&x.q, &x.k, &x.v, &fwd, &x.g, &s, &opts, &plans).unwrap();
    let (pq, pk, pv, po, _) = per(&one);
    for b in 0..2 {
        let (q1, k1, v1, g1) = (seq(&x.q, b, pq), seq(&x.k, b, pk), seq(&x.v, b, pv), seq(&x.g, b, po));
        let f1 = forward_layer(q1, k1, v1, &one, &opts, &plans).unwrap();
        let gr1 = backward_layer(q1, k1, v1, &f1, g1, &one, &opts, &plans).unwrap();
        assert_close("o", seq(&fwd.o, b, po), &f1.o);
        assert_close("dq", seq(&gr.dq, b, pq), &gr1.dq);
        assert_close("dk", seq(&gr.dk, b, pk), &gr1.dk);
        assert_close("dv", seq(&gr.dv, b, pv), &gr1.dv);
    }
}

#[test]
fn caller_buffers_are_checked() {
    let s = AttnShape::new(5, 2, 1, 4).with_batch(2);
    let x = data(&s, 1);
    let xb = qkv(&x.q, &x.k, &x.v, &s);
    let opts = AttnOptions::causal(4);
    let ws = Workspace::new();
    let (mut o, mut lse) = (vec![0.0; x.g.len()], vec![0.0; 2 * 2 * 5]);
    let err = forward_exact_into(&xb, &opts, &mut o[..3], &mut lse, &ws).unwrap_err();
    assert!(err.to_string().starts_with("o:"), "{err}");
    let err = forward_exact_into(&xb, &opts, &mut o, &mut lse[..3], &ws).unwrap_err();
    assert!(err.to_string().starts_with("lse:"), "{err}");
    forward_exact_into(&xb, &opts, &mut o, &mut lse, &ws).unwrap();
    let mut g = AttnGrads::zeros(&s);
    g.dk.pop();
    let err = backward_exact_into(&xb, &opts, &o, &lse, &x.g, g.as_mut(), &ws).unwrap_err();
    assert!(err.to_string().starts_with("dk:"), "{err}");
}
