//! The Llama model with every head forced to polynomial attention (MATH §3–4: `T_g` of the
//! row-shifted scores, prefix-mean shift under the causal mask, gradient through the shift)
//! against an independent float64 PyTorch-autograd reference: HF transformers'
//! `LlamaForCausalLM` with its eager attention monkey-patched to the same function
//! (fixture made by `tests/fixtures/make_poly_fixture.py`, model `llama_bounded`: llama_tiny's
//! shape with small q/k weights so that every |s_ij − m_i| ≤ 0.31).
//!
//! Checked: loss, dL/d(input embeddings) and every parameter gradient, for g = 2 and 4 with the
//! shift, g = 2 without it, and exact attention; in f64 (1e-10) and f32 (1e-4). Chunk 5 so that
//! n = 24 spans several chunks of the causal kernel. Also: the poly gradients are measurably
//! different from the exact ones (so the comparisons can tell the methods apart) and g = 4 is
//! closer to exact than g = 2.

mod common;
use altgrad::attention::HeadPlan;
use altgrad::attention::PolyOptions;
use altgrad::io::{load_hf_llama, read_safetensors, read_tokens, TensorF64};
use altgrad::linalg::Scalar;
use altgrad::model::{AttentionPolicy, Model, Network};
use common::rel;
use std::path::{Path, PathBuf};

const CHUNK: usize = 5;

fn dir() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("tests/fixtures/llama_bounded")
}

fn variants() -> Vec<(&'static str, AttentionPolicy)> {
    let poly = |degree, center| AttentionPolicy::Fixed(HeadPlan::Poly(PolyOptions { degree, center, chunk: CHUNK }));
    vec![
        ("poly_g2_center", poly(2, true)),
        ("poly_g4_center", poly(4, true)),
        ("poly_g2_nocenter", poly(2, false)),
        ("exact", AttentionPolicy::EXACT),
    ]
}

/// Loss, (name, gradient) for every parameter, and dL/d(input embeddings), all as f64.
struct Out {
    loss: f64,
    grads: Vec<(String, Vec<usize>, Vec<f64>)>,
    emb: Vec<f64>,
}

impl Out {
    /// All gradients (parameters then embeddings) as one vector.
    fn flat(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.grads.iter().flat_map(|(_, _, g)| g.iter().copied()).collect();
        v.extend_from_slice(&self.emb);
        v
    }
}

fn run<T: Scalar>(policy: &AttentionPolicy) -> Out {
    let d = dir();
    let (cfg, w) = load_hf_llama::<T>(&d).unwrap();
    let m = Model::new(cfg, w, "llama_bounded").unwrap();
    let ids = read_tokens(&d.join("tokens.txt")).unwrap();
    assert_eq!(ids.len(), 24);
    let (loss, grads, _) = m.loss_and_grads_with(&ids, policy).unwrap();
    let to64 = |x: &[T]| x.iter().map(|v| v.as_f64()).collect::<Vec<f64>>();
    Out {
        loss,
        grads: grads.weights.params().iter().map(|p| (p.name.clone(), p.shape.clone(), to64(&p.data))).collect(),
        emb: to64(&grads.embeddings),
    }
}

fn expected() -> Vec<TensorF64> {
    read_safetensors(&dir().join("expected.safetensors")).unwrap()
}

fn get<'a>(exp: &'a [TensorF64], k: &str) -> &'a TensorF64 {
    exp.iter().find(|t| t.name == k).unwrap_or_else(|| panic!("no {k} in expected.safetensors"))
}

/// The reference of variant `v` as an [`Out`], in the order of `like`'s parameters.
fn reference(exp: &[TensorF64], v: &str, like: &Out) -> Out {
    Out {
        loss: get(exp, &format!("{v}.loss")).data[0],
        grads: like
            .grads
            .iter()
            .map(|(n, s, _)| {
                let t = get(exp, &format!("{v}.grad.{n}"));
                assert_eq!(&t.shape, s, "{v}: shape of {n}");
                (n.clone(), s.clone(), t.data.clone())
            })
            .collect(),
        emb: get(exp, &format!("{v}.embeddings_grad")).data.clone(),
    }
}

fn check<T: Scalar>(tol: f64) {
    let exp = expected();
    for (v, policy) in variants() {
        let got = run::<T>(&policy);
        let want = reference(&exp, v, &got);
        let le = (got.loss - want.loss).abs() / want.loss.abs();
        let mut worst = ("loss".to_string(), le);
        assert!(le <= tol, "{v} {}: loss {} vs torch {} (rel {le:e})", T::DTYPE, got.loss, want.loss);
        let ee = rel(&got.emb, &want.emb);
        assert!(ee <= tol, "{v} {}: embeddings_grad rel err {ee:e}", T::DTYPE);
        if ee > worst.1 {
            worst = ("embeddings_grad".into(), ee);
        }
        for ((n, _, g), (_, _, w)) in got.grads.iter().zip(&want.grads) {
            let e = rel(g, w);
            assert!(e <= tol, "{v} {}: grad {n} rel err {e:e}", T::DTYPE);
            if e > worst.1 {
                worst = (n.clone(), e);
            }
        }
        let n_expected = exp.iter().filter(|t| t.name.starts_with(&format!("{v}.grad."))).count();
        assert_eq!(got.grads.len(), n_expected, "{v}: every reference gradient is compared");
        println!(
            "{v} {}: loss {:.15} (torch {:.15}), rel err loss {le:.2e}, worst {} {:.2e}",
            T::DTYPE,
            got.loss,
            want.loss,
            worst.0,
            worst.1
        );
    }
}

#[test]
fn poly_model_matches_torch_f64() {
    check::<f64>(1e-10);
}

#[test]
fn poly_model_matches_torch_f32_compute() {
    check::<f32>(1e-4);
}

/// The comparisons above can tell the methods apart: every poly variant's gradient is more than
/// 1e-6 (relative, all gradients together) from the exact one, each tensor by more than 100× the
/// f64 tolerance, in the reference and in altgrad; and g = 4 is closer to exact than g = 2.
#[test]
fn poly_variants_are_distinguishable_from_exact() {
    let exp = expected();
    let outs: Vec<(&str, Out)> = variants().into_iter().map(|(v, p)| (v, run::<f64>(&p))).collect();
    let rust_exact = &outs.iter().find(|(v, _)| *v == "exact").unwrap().1;
    let torch_exact = reference(&exp, "exact", rust_exact);
    let mut dist = std::collections::HashMap::new();
    for (v, got) in outs.iter().filter(|(v, _)| *v != "exact") {
        let want = reference(&exp, v, got);
        for (side, o, ex) in [("altgrad", got, rust_exact), ("torch", &want, &torch_exact)] {
            let d = rel(&o.flat(), &ex.flat());
            assert!(d > 1e-6, "{side} {v}: gradients only {d:e} from exact");
            for ((n, _, g), (_, _, w)) in o.grads.iter().zip(&ex.grads) {
                let e = rel(g, w);
                assert!(e > 1e-8, "{side} {v}: grad {n} only {e:e} from exact");
            }
            assert!(rel(&o.emb, &ex.emb) > 1e-8, "{side} {v}: embeddings_grad too close to exact");
            assert!(o.loss != ex.loss, "{side} {v}: loss equals exact");
            println!(
                "{side} {v}: |loss − exact| rel {:.3e}, gradients rel {:.3e} from exact",
                (o.loss - ex.loss).abs() / ex.loss.abs(),
                d
            );
            dist.insert((side, *v), (d, (o.loss - ex.loss).abs()));
        }
    }
    for side in ["altgrad", "torch"] {
        let (g2, l2) = dist[&(side, "poly_g2_center")];
        let (g4, l4) = dist[&(side, "poly_g4_center")];
        assert!(g4 < g2, "{side}: g=4 gradients ({g4:e}) not closer to exact than g=2 ({g2:e})");
        assert!(l4 < l2, "{side}: g=4 loss ({l4:e}) not closer to exact than g=2 ({l2:e})");
    }
}
