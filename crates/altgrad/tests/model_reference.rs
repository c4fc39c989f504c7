//! End to end against HF transformers' `LlamaForCausalLM` in float64 (fixtures made by
//! `tests/fixtures/make_llama_fixture.py`): loss, final hidden states, logits, dL/d(input
//! embeddings) and every parameter gradient, computed here in f64 and in f32.

mod common;
use altgrad::io::{load_hf_llama, read_safetensors, read_tokens, TensorF64};
use altgrad::linalg::Scalar;
use altgrad::model::loss::lm_logits;
use altgrad::model::{Model, Network};
use common::rel;
use std::path::{Path, PathBuf};

fn dir(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("tests/fixtures").join(name)
}

fn check<T: Scalar>(name: &str, tol: f64) {
    let d = dir(name);
    let (cfg, w) = load_hf_llama::<T>(&d).unwrap();
    let m = Model::new(cfg, w, name).unwrap();
    let ids = read_tokens(&d.join("tokens.txt")).unwrap();
    let expected = read_safetensors(&d.join("expected.safetensors")).unwrap();
    let get = |k: &str| -> &TensorF64 { expected.iter().find(|t| t.name == k).unwrap_or_else(|| panic!("no {k}")) };
    let (loss, grads, cache) = m.loss_and_grads(&ids).unwrap();
    let le = (loss - get("loss").data[0]).abs() / get("loss").data[0].abs();
    assert!(le < tol, "{name} {}: loss {loss} vs {} (rel {le:e})", T::DTYPE, get("loss").data[0]);
    let to64 = |x: &[T]| x.iter().map(|v| v.as_f64()).collect::<Vec<f64>>();
    let logits = lm_logits(&cache.hidden, m.cfg.hidden_size, &m.weights.head_weight().data, m.cfg.vocab_size);
    let mut checked = 0;
    for (what, got) in
        [("hidden", to64(&cache.hidden)), ("logits", to64(&logits)), ("embeddings_grad", to64(&grads.embeddings))]
    {
        let e = rel(&got, &get(what).data);
        assert!(e < tol, "{name} {}: {what} rel err {e:e}", T::DTYPE);
    }
    for p in grads.weights.params() {
        let want = get(&format!("grad.{}", p.name));
        assert_eq!(want.shape, p.shape, "{}", p.name);
        let e = rel(&to64(&p.data), &want.data);
        assert!(e < tol, "{name} {}: grad {} rel err {e:e}", T::DTYPE, p.name);
        checked += 1;
    }
    let n_expected = expected.iter().filter(|t| t.name.starts_with("grad.")).count();
    assert_eq!(checked, n_expected, "every reference gradient is compared");
}

#[test]
fn llama_tiny_matches_transformers_f64() {
    check::<f64>("llama_tiny", 1e-10);
}

#[test]
fn llama_tiny_matches_transformers_f32_compute() {
    check::<f32>("llama_tiny", 1e-4);
}

#[test]
fn llama_tied_bias_matches_transformers_f64() {
    check::<f64>("llama_tiny_tied_bias", 1e-10);
}

#[test]
fn llama_tied_bias_matches_transformers_f32_compute() {
    check::<f32>("llama_tiny_tied_bias", 1e-4);
}
