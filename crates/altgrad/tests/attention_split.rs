//! Non-causal polynomial attention split across pieces of a sequence (MATH §4 "Split across
//! pieces"; `attention::poly_split`): summing the pieces' key/value states and key sums, as an
//! all-reduce would, gives the whole sequence's output (against the naive O(n²) form, f64 ≤ 1e-12)
//! and its gradients (against the whole-sequence backward, itself checked by finite differences
//! in `attention_poly.rs`), with GQA, uneven pieces, centered or not, and at any shared reference.

mod common;
use altgrad::attention::naive;
use altgrad::attention::{
    backward_poly, forward_poly, poly_key_state, poly_key_state_backward, poly_queries, poly_queries_backward,
    AttnOptions, AttnShape, Mask, PolyOptions, Qkv,
};
use common::{qkv, randn, rel};

/// Rows `[a, b)` of a `[n, heads, width]` tensor.
fn rows(x: &[f64], a: usize, b: usize, heads: usize, width: usize) -> &[f64] {
    &x[a * heads * width..b * heads * width]
}

struct Case {
    n: usize,
    cuts: &'static [usize],
    h: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    degree: usize,
    center: bool,
    /// Shift the shared reference away from the key mean (the function must not change).
    offset_reference: bool,
}

/// Worst relative error of the split run against the whole sequence over o, dq, dk, dv.
fn split(c: &Case) -> f64 {
    let (n, h, hkv, d, dv) = (c.n, c.h, c.hkv, c.d, c.dv);
    let q = randn(n * h * d, 11, 0.8);
    let k: Vec<f64> = randn(n * hkv * d, 12, 0.8).iter().map(|x| x + 0.4).collect();
    let v = randn(n * hkv * dv, 13, 1.0);
    let g = randn(n * h * dv, 14, 1.0);
    let opts = AttnOptions { mask: Mask::Full, scale: 1.0 / (d as f64).sqrt() };
    let popts = PolyOptions { degree: c.degree, center: c.center, chunk: 4 };
    let shape = |len: usize| AttnShape::new(len, h, hkv, d).with_head_dim_v(dv);
    // the whole sequence: the naive O(n²) output and the library's gradient
    let s = shape(n);
    let naive_o = naive::poly_forward(&q, &k, &v, &s, &naive::Poly::new(false, opts.scale, c.degree, c.center));
    let xw = qkv(&q, &k, &v, &s);
    let fw = forward_poly(&xw, &opts, &popts).unwrap();
    let gw = backward_poly(&xw, &fw, &g).unwrap();
    // the key mean of the whole sequence (what the all-reduce of key sums gives) and the shared reference
    let mut mean = vec![0.0; hkv * d];
    for j in 0..n {
        for (m, x) in mean.iter_mut().zip(&k[j * hkv * d..(j + 1) * hkv * d]) {
            *m += x / n as f64;
        }
    }
    let reference: Option<Vec<f64>> = c.center.then(|| {
        let shift = if c.offset_reference { randn(hkv * d, 15, 0.5) } else { vec![0.0; hkv * d] };
        mean.iter().zip(&shift).map(|(m, s)| m + s).collect()
    });
    let kbar: Vec<f64> = match &reference {
        Some(r) => mean.iter().zip(r).map(|(m, c)| m - c).collect(),
        None => vec![0.0; hkv * d],
    };
    let mut bounds = vec![0];
    bounds.extend(c.cuts);
    bounds.push(n);
    let pieces: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
    let piece = |a: usize, b: usize, s: &'_ AttnShape| -> Qkv<'_, f64> {
        Qkv::new(rows(&q, a, b, h, d), rows(&k, a, b, hkv, d), rows(&v, a, b, hkv, dv), s).unwrap()
    };
    let shapes: Vec<AttnShape> = pieces.iter().map(|&(a, b)| shape(b - a)).collect();
    // forward: the all-reduce of the pieces' states, then each piece's queries
    let mut state: Vec<f64> = Vec::new();
    for (i, &(a, b)) in pieces.iter().enumerate() {
        let st = poly_key_state(&piece(a, b, &shapes[i]), &opts, &popts, reference.as_deref()).unwrap();
        if state.is_empty() {
            state = st;
        } else {
            state.iter_mut().zip(&st).for_each(|(x, y)| *x += y);
        }
    }
    let mut o = Vec::new();
    let mut fwds = Vec::new();
    for (i, &(a, b)) in pieces.iter().enumerate() {
        let (oi, den) = poly_queries(&piece(a, b, &shapes[i]), &opts, &popts, &state, &kbar).unwrap();
        o.extend_from_slice(&oi);
        fwds.push((oi, den));
    }
    // backward: each piece's queries, the all-reduce of dH' and d(k̄ − c), each piece's keys
    let (mut dq, mut ds, mut dkbar) = (Vec::new(), vec![0.0; state.len()], vec![0.0; hkv * d]);
    for (i, &(a, b)) in pieces.iter().enumerate() {
        let x = piece(a, b, &shapes[i]);
        let (oi, den) = &fwds[i];
        let r = poly_queries_backward(&x, &opts, &popts, &state, &kbar, oi, den, rows(&g, a, b, h, dv)).unwrap();
        dq.extend_from_slice(&r.dq);
        ds.iter_mut().zip(&r.ds).for_each(|(x, y)| *x += y);
        dkbar.iter_mut().zip(&r.dkbar).for_each(|(x, y)| *x += y);
    }
    let (mut dk, mut dvv) = (Vec::new(), Vec::new());
    for (i, &(a, b)) in pieces.iter().enumerate() {
        let (dki, dvi) =
            poly_key_state_backward(&piece(a, b, &shapes[i]), &opts, &popts, reference.as_deref(), &ds).unwrap();
        dk.extend_from_slice(&dki);
        dvv.extend_from_slice(&dvi);
    }
    // the key mean's gradient reaches every key as d(k̄ − c)/n (the caller's mean)
    for j in 0..n {
        for (x, y) in dk[j * hkv * d..(j + 1) * hkv * d].iter_mut().zip(&dkbar) {
            *x += y / n as f64;
        }
    }
    [rel(&o, &naive_o), rel(&o, &fw.o), rel(&dq, &gw.dq), rel(&dk, &gw.dk), rel(&dvv, &gw.dv)]
        .into_iter()
        .fold(0.0, f64::max)
}

#[test]
fn pieces_summed_give_the_whole_sequence() {
    for (center, offset_reference) in [(true, false), (true, true), (false, false)] {
        for degree in [2, 4] {
            for (h, hkv) in [(4, 2), (2, 2), (3, 1)] {
                let c = Case { n: 23, cuts: &[5, 6, 17], h, hkv, d: 3, dv: 4, degree, center, offset_reference };
                let err = split(&c);
                assert!(err <= 1e-12, "center {center} offset {offset_reference} g {degree} H {h}/{hkv}: {err:.2e}");
            }
        }
    }
}

#[test]
fn the_gradient_of_the_key_mean_matters() {
    // without the d(k̄ − c)/n term the keys' gradient is wrong when the row shift is on: the
    // comparison above can fail
    let (n, h, hkv, d, dv) = (12, 2, 1, 3, 2);
    let q = randn(n * h * d, 21, 0.8);
    let k: Vec<f64> = randn(n * hkv * d, 22, 0.8).iter().map(|x| x + 0.4).collect();
    let v = randn(n * hkv * dv, 23, 1.0);
    let g = randn(n * h * dv, 24, 1.0);
    let opts = AttnOptions { mask: Mask::Full, scale: 0.5 };
    let popts = PolyOptions { degree: 2, center: true, chunk: 4 };
    let s = AttnShape::new(n, h, hkv, d).with_head_dim_v(dv);
    let x = qkv(&q, &k, &v, &s);
    let mean: Vec<f64> = (0..d).map(|c| (0..n).map(|j| k[j * d + c]).sum::<f64>() / n as f64).collect();
    let st = poly_key_state(&x, &opts, &popts, Some(&mean)).unwrap();
    let kbar = vec![0.0; d];
    let (o, den) = poly_queries(&x, &opts, &popts, &st, &kbar).unwrap();
    let r = poly_queries_backward(&x, &opts, &popts, &st, &kbar, &o, &den, &g).unwrap();
    let (dk, _) = poly_key_state_backward(&x, &opts, &popts, Some(&mean), &r.ds).unwrap();
    let whole = backward_poly(&x, &forward_poly(&x, &opts, &popts).unwrap(), &g).unwrap();
    assert!(r.dkbar.iter().any(|x| x.abs() > 1e-3), "{:?}", r.dkbar);
    assert!(rel(&dk, &whole.dk) > 1e-3);
}

#[test]
fn bad_calls_name_their_input() {
    let s = AttnShape::new(4, 2, 1, 2).with_head_dim_v(2);
    let (q, k, v) = (randn(16, 1, 1.0), randn(8, 2, 1.0), randn(8, 3, 1.0));
    let x = qkv(&q, &k, &v, &s);
    let full = AttnOptions { mask: Mask::Full, scale: 0.5 };
    let centered = PolyOptions { degree: 2, center: true, chunk: 4 };
    let plain = PolyOptions { degree: 2, center: false, chunk: 4 };
    let msg = |e: altgrad::Error| e.to_string();
    let causal = AttnOptions { mask: Mask::causal(), scale: 0.5 };
    assert!(msg(poly_key_state(&x, &causal, &plain, None).unwrap_err()).contains("mask"));
    assert!(msg(poly_key_state(&x, &full, &centered, None).unwrap_err()).contains("reference"));
    assert!(msg(poly_key_state(&x, &full, &plain, Some(&[0.0, 0.0])).unwrap_err()).contains("reference"));
    assert!(msg(poly_key_state(&x, &full, &centered, Some(&[0.0])).unwrap_err()).contains("reference"));
    let st = poly_key_state(&x, &full, &plain, None).unwrap();
    assert!(msg(poly_queries(&x, &full, &plain, &st[1..], &[0.0, 0.0]).unwrap_err()).contains("state"));
    assert!(msg(poly_queries(&x, &full, &plain, &st, &[0.0]).unwrap_err()).contains("kbar"));
    assert!(msg(poly_key_state_backward(&x, &full, &plain, None, &st[1..]).unwrap_err()).contains("ds"));
    let (o, den) = poly_queries(&x, &full, &plain, &st, &[0.0, 0.0]).unwrap();
    let e = poly_queries_backward(&x, &full, &plain, &st, &[0.0, 0.0], &o, &den[1..], &o).unwrap_err();
    assert!(msg(e).contains("den"));
}
