//! State in and out of the causal polynomial kernel (MATH §4 "Causal"; fla's `initial_state`,
//! `final_state`, `dht`, `dh0`): a sequence cut into pieces and chained through the state gives the
//! whole sequence's outputs, log-sum-exps, final state and gradients (f64 ≤ 1e-12, f32 ≤ 1e-5), with
//! `dL/d(final state)` chained backwards through the pieces; and the state gradients match f64
//! finite differences.

mod common;
use altgrad::attention::features::feature_dim;
use altgrad::attention::{
    backward_poly_state, forward_poly, forward_poly_state, AttnOptions, AttnShape, Mask, PolyOptions, PolyOutput,
    PolyState, PolyStateGrad, Qkv,
};
use altgrad::linalg::Scalar;
use common::{qkv, randn, rel};

/// One piece `[a, b)` of a `[n, heads, width]` tensor (rows are contiguous).
fn rows<T: Copy>(x: &[T], a: usize, b: usize, heads: usize, width: usize) -> &[T] {
    &x[a * heads * width..b * heads * width]
}

struct Chain {
    n: usize,
    cuts: Vec<usize>,
    h: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    degree: usize,
    center: bool,
    chunk: usize,
    explicit_reference: bool,
    seed: u64,
}

/// Worst relative error of the chained run against the whole one, over o, lse, the final state,
/// dq, dk, dv and the gradient of the (zero) initial state.
fn chain<T: Scalar>(c: &Chain) -> f64 {
    let (n, h, hkv, d, dv) = (c.n, c.h, c.hkv, c.d, c.dv);
    let conv = |x: Vec<f64>| x.into_iter().map(T::from_f64).collect::<Vec<T>>();
    let (q, k, v) = (
        conv(randn(n * h * d, c.seed, 0.8)),
        conv(randn(n * hkv * d, c.seed + 1, 0.8)),
        conv(randn(n * hkv * dv, c.seed + 2, 1.0)),
    );
    let g = conv(randn(n * h * dv, c.seed + 3, 1.0));
    let r = feature_dim(d, c.degree).unwrap();
    let dfinal = PolyStateGrad {
        ds: conv(randn(hkv * r * (dv + 1), c.seed + 4, 1.0)),
        dkey_sum: conv(randn(hkv * d, c.seed + 5, 1.0)),
    };
    let reference: Option<Vec<T>> = c.explicit_reference.then(|| conv(randn(hkv * d, c.seed + 6, 0.5)));
    let opts = AttnOptions { mask: Mask::causal(), scale: 1.0 / (d as f64).sqrt() };
    let popts = PolyOptions { degree: c.degree, center: c.center, chunk: c.chunk };
    let shape = |len: usize| AttnShape::new(len, h, hkv, d).with_head_dim_v(dv);
    let s = shape(n);
    // the whole sequence
    let xw = qkv(&q, &k, &v, &s);
    let fw = forward_poly_state(&xw, &opts, &popts, None, reference.as_deref()).unwrap();
    let (gw, dinit_w) = backward_poly_state(&xw, &fw, &g, Some(&dfinal)).unwrap();
    // the pieces, forward
    let mut bounds = vec![0];
    bounds.extend(&c.cuts);
    bounds.push(n);
    let pieces: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
    let shapes: Vec<AttnShape> = pieces.iter().map(|&(a, b)| shape(b - a)).collect();
    let mut fwds: Vec<PolyOutput<T>> = Vec::new();
    for (i, &(a, b)) in pieces.iter().enumerate() {
        let x = Qkv::new(rows(&q, a, b, h, d), rows(&k, a, b, hkv, d), rows(&v, a, b, hkv, dv), &shapes[i]).unwrap();
        let prev = fwds.last().and_then(|f| f.final_state.as_ref());
        // row 0 of the piece is position a, the count of the state it continues
        let opts = opts.with_mask(Mask::Causal { q_offset: a });
        fwds.push(forward_poly_state(&x, &opts, &popts, prev, reference.as_deref()).unwrap());
    }
    // the pieces, backward: dL/d(final state) enters the last piece, each piece's dL/d(initial
    // state) is the previous piece's dL/d(final state)
    let mut grads = vec![None; pieces.len()];
    let mut dnext = dfinal.clone();
    for (i, &(a, b)) in pieces.iter().enumerate().rev() {
        let x = Qkv::new(rows(&q, a, b, h, d), rows(&k, a, b, hkv, d), rows(&v, a, b, hkv, dv), &shapes[i]).unwrap();
        let (gr, dinit) = backward_poly_state(&x, &fwds[i], rows(&g, a, b, h, dv), Some(&dnext)).unwrap();
        dnext = dinit.unwrap();
        grads[i] = Some(gr);
    }
    let cat = |f: &dyn Fn(usize) -> Vec<T>| -> Vec<T> { (0..pieces.len()).flat_map(f).collect() };
    let o = cat(&|i| fwds[i].o.clone());
    // lse is [num_heads, seq_len]: per head, the pieces' rows one after another
    let mut lse = Vec::with_capacity(h * n);
    for hh in 0..h {
        for (f, sh) in fwds.iter().zip(&shapes) {
            lse.extend_from_slice(&f.lse[hh * sh.seq_len..(hh + 1) * sh.seq_len]);
        }
    }
    let last = fwds.last().unwrap().final_state.as_ref().unwrap();
    let whole = fw.final_state.as_ref().unwrap();
    assert_eq!(last.count, n);
    assert_eq!(last.reference, whole.reference, "the sequence keeps one reference point");
    let dq = cat(&|i| grads[i].as_ref().unwrap().dq.clone());
    let dk = cat(&|i| grads[i].as_ref().unwrap().dk.clone());
    let dvv = cat(&|i| grads[i].as_ref().unwrap().dv.clone());
    let dinit_w = dinit_w.unwrap();
    let up = |x: &[T]| x.iter().map(|v| v.as_f64()).collect::<Vec<f64>>();
    let tag = format!(
        "n={n} cuts={:?} h={h} hkv={hkv} d={d} dv={dv} g={} center={} chunk={} explicit_reference={} {}",
        c.cuts,
        c.degree,
        c.center,
        c.chunk,
        c.explicit_reference,
        T::DTYPE
    );
    let mut worst = 0.0f64;
    for (name, got, want) in [
        ("o", up(&o), up(&fw.o)),
        ("lse", up(&lse), up(&fw.lse)),
        ("final S'", up(&last.s), up(&whole.s)),
        ("final key_sum", up(&last.key_sum), up(&whole.key_sum)),
        ("dq", up(&dq), up(&gw.dq)),
        ("dk", up(&dk), up(&gw.dk)),
        ("dv", up(&dvv), up(&gw.dv)),
        ("dS'_initial", up(&dnext.ds), up(&dinit_w.ds)),
        ("dkey_sum_initial", up(&dnext.dkey_sum), up(&dinit_w.dkey_sum)),
    ] {
        let e = rel(&got, &want);
        assert!(e.is_finite(), "{name} {tag}: not finite");
        worst = worst.max(e);
        let tol = if T::DTYPE == "F64" { 1e-12 } else { 1e-5 };
        assert!(e <= tol, "{name} {tag}: chained vs whole rel err {e:e} > {tol:e}");
    }
    worst
}

#[test]
fn pieces_chained_through_the_state_give_the_whole_sequence() {
    let mut worst = (0.0f64, 0.0f64);
    let mut seed = 10;
    // two and three pieces, uneven, not multiples of the chunk; GQA and not; centered and not
    type Case<'a> = (usize, &'a [usize], usize, usize, usize, usize);
    let cases: &[Case] =
        &[(150, &[37], 4, 2, 8, 6), (150, &[50, 91], 4, 2, 8, 6), (97, &[33, 34], 3, 1, 4, 5), (64, &[16], 2, 2, 8, 8)];
    for &(n, cuts, h, hkv, d, dv) in cases {
        for degree in [2usize, 4] {
            if degree == 4 && d > 4 && n > 100 {
                continue; // r = 495 at d = 8: the f64 whole-vs-pieces check stays quick without it
            }
            for center in [true, false] {
                let c = Chain {
                    n,
                    cuts: cuts.to_vec(),
                    h,
                    hkv,
                    d,
                    dv,
                    degree,
                    center,
                    chunk: 16,
                    explicit_reference: false,
                    seed,
                };
                worst.0 = worst.0.max(chain::<f64>(&c));
                worst.1 = worst.1.max(chain::<f32>(&c));
                seed += 10;
            }
        }
    }
    // an explicit reference point (as a distributed caller would pass), with a first piece shorter
    // than the chunk
    for cuts in [vec![5usize, 70], vec![90]] {
        let c = Chain {
            n: 120,
            cuts,
            h: 4,
            hkv: 2,
            d: 6,
            dv: 4,
            degree: 2,
            center: true,
            chunk: 32,
            explicit_reference: true,
            seed,
        };
        worst.0 = worst.0.max(chain::<f64>(&c));
        worst.1 = worst.1.max(chain::<f32>(&c));
        seed += 10;
    }
    eprintln!("pieces vs whole sequence: worst rel err f64 {:.1e}, f32 {:.1e}", worst.0, worst.1);
}

/// Central differences in f64 of `L = ⟨G, o⟩ + ⟨G_S, S'_final⟩ + ⟨G_k, key_sum_final⟩` through
/// `forward_poly_state` started from a state (the final state of a prefix), against the gradients
/// of `q`, `k`, `v` and of the initial state (`dh0`) from `backward_poly_state`.
#[test]
fn state_gradients_match_finite_differences() {
    let (n0, n, h, hkv, d, dv) = (7, 9, 2, 1, 3, 2);
    let mut worst = 0.0f64;
    for degree in [2usize, 4] {
        for center in [true, false] {
            let seed = 100 + degree as u64 + if center { 1 } else { 0 };
            let s0 = AttnShape::new(n0, h, hkv, d).with_head_dim_v(dv);
            let s = AttnShape::new(n, h, hkv, d).with_head_dim_v(dv);
            let opts0 = AttnOptions { mask: Mask::causal(), scale: 0.6 };
            let opts = opts0.with_mask(Mask::Causal { q_offset: n0 });
            let popts = PolyOptions { degree, center, chunk: 4 };
            let reference: Option<Vec<f64>> = center.then(|| randn(hkv * d, seed + 9, 0.5));
            let (q0, k0, v0) =
                (randn(n0 * h * d, seed, 1.0), randn(n0 * hkv * d, seed + 1, 1.0), randn(n0 * hkv * dv, seed + 2, 1.0));
            let init = forward_poly_state(&qkv(&q0, &k0, &v0, &s0), &opts0, &popts, None, reference.as_deref())
                .unwrap()
                .saved
                .final_state
                .unwrap();
            let (q, k, v) = (
                randn(n * h * d, seed + 3, 1.0),
                randn(n * hkv * d, seed + 4, 1.0),
                randn(n * hkv * dv, seed + 5, 1.0),
            );
            let g = randn(n * h * dv, seed + 6, 1.0);
            let gs = randn(init.s.len(), seed + 7, 1.0);
            let gk = randn(init.key_sum.len(), seed + 8, 1.0);
            let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
            let loss = |st: &PolyState<f64>, q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                let f = forward_poly_state(&qkv(q, k, v, &s), &opts, &popts, Some(st), reference.as_deref()).unwrap();
                let fin = f.saved.final_state.unwrap();
                dot(&f.o, &g) + dot(&fin.s, &gs) + dot(&fin.key_sum, &gk)
            };
            let fwd =
                forward_poly_state(&qkv(&q, &k, &v, &s), &opts, &popts, Some(&init), reference.as_deref()).unwrap();
            let dfinal = PolyStateGrad { ds: gs.clone(), dkey_sum: gk.clone() };
            let (gr, dinit) = backward_poly_state(&qkv(&q, &k, &v, &s), &fwd, &g, Some(&dfinal)).unwrap();
            let dinit = dinit.unwrap();
            let eps = 1e-6;
            let fd = |x: &[f64], f: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
                (0..x.len())
                    .map(|i| {
                        let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
                        xp[i] += eps;
                        xm[i] -= eps;
                        (f(&xp) - f(&xm)) / (2.0 * eps)
                    })
                    .collect()
            };
            let with_s = |x: &[f64]| PolyState { s: x.to_vec(), ..init.clone() };
            let with_ks = |x: &[f64]| PolyState { key_sum: x.to_vec(), ..init.clone() };
            let tag = format!("g={degree} center={center}");
            for (name, got, want) in [
                ("dS'_initial", &dinit.ds, fd(&init.s, &|x| loss(&with_s(x), &q, &k, &v))),
                ("dkey_sum_initial", &dinit.dkey_sum, fd(&init.key_sum, &|x| loss(&with_ks(x), &q, &k, &v))),
                ("dq", &gr.dq, fd(&q, &|x| loss(&init, x, &k, &v))),
                ("dk", &gr.dk, fd(&k, &|x| loss(&init, &q, x, &v))),
                ("dv", &gr.dv, fd(&v, &|x| loss(&init, &q, &k, x))),
            ] {
                let e = rel(got, &want);
                worst = worst.max(e);
                assert!(e < 1e-7, "{name} {tag}: rel err {e:e} against finite differences");
            }
            if !center {
                // without centering the key sum is only carried along: its gradient is dfinal's
                assert!(rel(&dinit.dkey_sum, &gk) < 1e-15);
            }
        }
    }
    eprintln!("state gradients vs finite differences: worst rel err {worst:.1e}");
}

#[test]
fn states_are_checked() {
    let s = AttnShape::new(5, 2, 1, 3).with_head_dim_v(2);
    let (q, k, v) = (randn(5 * 2 * 3, 1, 1.0), randn(5 * 3, 2, 1.0), randn(5 * 2, 3, 1.0));
    let x = qkv(&q, &k, &v, &s);
    let causal = AttnOptions { mask: Mask::causal(), scale: 0.5 };
    let popts = PolyOptions { degree: 2, center: true, chunk: 2 };
    let st = forward_poly(&x, &causal, &popts).unwrap().saved.final_state.unwrap();
    assert_eq!(st.count, 5);
    let next = causal.with_mask(Mask::Causal { q_offset: 5 });
    assert!(forward_poly_state(&x, &next, &popts, Some(&st), None).is_ok());
    // the query offset must be the state's count
    let err = forward_poly_state(&x, &causal, &popts, Some(&st), None).unwrap_err();
    assert!(err.to_string().starts_with("mask:"), "{err}");
    // a state of another degree
    let err = forward_poly_state(&x, &next, &PolyOptions { degree: 4, ..popts }, Some(&st), None).unwrap_err();
    assert!(err.to_string().starts_with("initial:"), "{err}");
    // a state without the causal mask
    let full = AttnOptions { mask: Mask::Full, ..causal };
    let err = forward_poly_state(&x, &full, &popts, Some(&st), None).unwrap_err();
    assert!(err.to_string().starts_with("initial:"), "{err}");
    assert!(forward_poly(&x, &full, &popts).unwrap().final_state.is_none());
    // a reference that is not the state's, of the wrong length, or without centering
    let other: Vec<f64> = st.reference.iter().map(|c| c + 1.0).collect();
    let err = forward_poly_state(&x, &next, &popts, Some(&st), Some(&other)).unwrap_err();
    assert!(err.to_string().starts_with("reference:"), "{err}");
    let err = forward_poly_state(&x, &causal, &popts, None, Some(&other[..2])).unwrap_err();
    assert!(err.to_string().starts_with("reference:"), "{err}");
    let plain = PolyOptions { center: false, ..popts };
    let err = forward_poly_state(&x, &causal, &plain, None, Some(&other)).unwrap_err();
    assert!(err.to_string().starts_with("reference:"), "{err}");
    let err = forward_poly_state(&x, &next, &plain, Some(&st), None).unwrap_err();
    assert!(err.to_string().starts_with("initial:"), "{err}");
    // a state gradient of the wrong size, or without the causal mask
    let fwd = forward_poly_state(&x, &next, &popts, Some(&st), None).unwrap();
    let bad = PolyStateGrad { ds: vec![0.0; 3], dkey_sum: vec![0.0; 3] };
    let err = backward_poly_state(&x, &fwd, &[0.0; 5 * 2 * 2], Some(&bad)).unwrap_err();
    assert!(err.to_string().starts_with("dfinal:"), "{err}");
    let fwd = forward_poly(&x, &full, &popts).unwrap();
    let good = PolyStateGrad { ds: vec![0.0; st.s.len()], dkey_sum: vec![0.0; 3] };
    let err = backward_poly_state(&x, &fwd, &[0.0; 5 * 2 * 2], Some(&good)).unwrap_err();
    assert!(err.to_string().starts_with("dfinal:"), "{err}");
}
