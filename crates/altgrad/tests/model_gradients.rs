//! The whole decoder's gradient by central finite differences in f64 ([`common::fd_params`]:
//! every parameter; [`common::fd_grad`]: the input embeddings), for several configurations, and
//! the general-loss entry points.

mod common;
use altgrad::model::loss::lm_logits;
use altgrad::model::{LlamaConfig, LlamaWeights, Model, Network, RopeLayout};
use common::{fd_grad, fd_params, randn, rel};

/// Finite-difference step.
const H: f64 = 1e-5;

fn small_cfg(layout: RopeLayout, tied: bool, bias: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 13,
        hidden_size: 8,
        intermediate_size: 12,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_layout: layout,
        max_seq_len: 64,
        tie_word_embeddings: tied,
        attention_bias: bias,
        mlp_bias: bias,
        built_in_attention: None,
    }
}

fn model(cfg: LlamaConfig, seed: u64) -> Model<f64> {
    let mut w = LlamaWeights::<f64>::random_hf(&cfg, seed);
    // larger weights: peaked attention, non-trivial gradients everywhere
    for p in w.params_mut() {
        if !p.name.ends_with("norm.weight") {
            for x in p.data.iter_mut() {
                *x *= 2.0;
            }
        }
    }
    Model::new(cfg, w, "test").unwrap()
}

fn check_ce_gradients(cfg: LlamaConfig, seed: u64) {
    let m = model(cfg, seed);
    let ids: Vec<u32> = vec![3, 7, 1, 12, 0, 7, 5];
    let (_, grads, _) = m.loss_and_grads(&ids).unwrap();
    let loss = |mm: &Model<f64>| mm.loss_and_grads(&ids).unwrap().0;
    let fd = fd_params(&m, H, loss);
    for (p, g) in grads.weights.params().iter().zip(&fd) {
        let e = rel(&p.data, g);
        assert!(e < 1e-7, "{}: rel err {e:e} against finite differences", p.name);
    }
}

#[test]
fn cross_entropy_gradient_matches_finite_differences_rotate_half_gqa() {
    check_ce_gradients(small_cfg(RopeLayout::RotateHalf, false, false), 1);
}

#[test]
fn cross_entropy_gradient_matches_finite_differences_interleaved_tied_bias() {
    check_ce_gradients(small_cfg(RopeLayout::Interleaved, true, true), 2);
}

#[test]
fn general_loss_entry_points_match_finite_differences() {
    let cfg = small_cfg(RopeLayout::RotateHalf, false, true);
    let m = model(cfg.clone(), 3);
    let n = 6;
    let h = cfg.hidden_size;
    let x0 = randn(n * h, 11, 1.0);
    // dL/d hidden with L = Σ r ∘ hidden
    let r = randn(n * h, 12, 1.0);
    let cache = m.forward_embeddings(x0.clone(), n).unwrap();
    let grads = m.backward_from_hidden(&cache, &r).unwrap();
    let l_hidden = |x: &[f64]| -> f64 {
        let c = m.forward_embeddings(x.to_vec(), n).unwrap();
        c.hidden.iter().zip(&r).map(|(a, b)| a * b).sum()
    };
    let fd = fd_grad(&x0, H, l_hidden);
    let e = rel(&grads.embeddings, &fd);
    assert!(e < 1e-7, "dL/d embeddings via hidden: {e:e}");
    assert!(grads.weights.lm_head.as_ref().unwrap().weight.data.iter().all(|x| *x == 0.0));

    // dL/d logits with L = Σ r ∘ logits: every parameter
    let rl = randn(n * cfg.vocab_size, 13, 1.0);
    let grads = m.backward_from_logits(&cache, &rl).unwrap();
    let l_logits = |mm: &Model<f64>| -> f64 {
        let c = mm.forward_embeddings(x0.clone(), n).unwrap();
        let hw = mm.weights.head_weight();
        lm_logits(&c.hidden, h, &hw.data, cfg.vocab_size).iter().zip(&rl).map(|(a, b)| a * b).sum()
    };
    let fd = fd_params(&m, H, l_logits);
    for (p, g) in grads.weights.params().iter().zip(&fd) {
        if p.name == "model.embed_tokens.weight" {
            // forward from embeddings: the table is unused
            assert!(p.data.iter().all(|x| *x == 0.0));
            continue;
        }
        let e = rel(&p.data, g);
        assert!(e < 1e-7, "{}: rel err {e:e}", p.name);
    }
}

#[test]
fn bad_token_ids_are_rejected_with_a_clear_message() {
    let m = model(small_cfg(RopeLayout::RotateHalf, false, false), 4);
    let err = m.loss_and_grads(&[1, 2, 13]).unwrap_err().to_string();
    assert!(err.contains("token id 13 at position 2") && err.contains("vocab_size 13"), "{err}");
    let err = m.loss_and_grads(&[1]).unwrap_err().to_string();
    assert!(err.contains("at least 2"), "{err}");
    let err = m.loss_and_grads(&vec![1; 65]).unwrap_err().to_string();
    assert!(err.contains("maximum sequence length 64"), "{err}");
    let mut w = m.weights.clone();
    w.layers[1].q_proj.weight.data[5] = f64::NAN;
    let err = Model::new(m.cfg.clone(), w, "nan-model").unwrap_err().to_string();
    assert!(err.contains("model.layers.1.self_attn.q_proj.weight") && err.contains("index 5"), "{err}");
}

use altgrad::attention::HeadPlan;
use altgrad::attention::PolyOptions;
use altgrad::model::AttentionPolicy;

/// Weights scaled down so attention scores are bounded (the polynomial method's regime).
fn bounded_model(seed: u64) -> Model<f64> {
    let cfg = small_cfg(RopeLayout::RotateHalf, false, false);
    let mut w = LlamaWeights::<f64>::random_hf(&cfg, seed);
    for l in &mut w.layers {
        for x in l.q_proj.weight.data.iter_mut().chain(l.k_proj.weight.data.iter_mut()) {
            *x *= 0.5;
        }
    }
    Model::new(cfg, w, "bounded").unwrap()
}

#[test]
fn forced_poly_model_gradient_matches_finite_differences_of_the_approximate_model() {
    let m = bounded_model(21);
    let ids: Vec<u32> = vec![3, 7, 1, 12, 0, 7, 5, 9, 2];
    for center in [true, false] {
        let policy = AttentionPolicy::Fixed(HeadPlan::Poly(PolyOptions { degree: 2, center, chunk: 4 }));
        let (_, grads, _) = m.loss_and_grads_with(&ids, &policy).unwrap();
        let fd = fd_params(&m, H, |mm: &Model<f64>| mm.loss_and_grads_with(&ids, &policy).unwrap().0);
        for (p, g) in grads.weights.params().iter().zip(&fd) {
            let e = rel(&p.data, g);
            assert!(e < 1e-7, "center={center} {}: rel err {e:e}", p.name);
        }
    }
}

#[test]
fn approximate_model_gradients_approach_exact_as_degree_rises() {
    let m = bounded_model(22);
    let ids: Vec<u32> = vec![3, 7, 1, 12, 0, 7, 5, 9, 2, 11, 4];
    let (_, exact, _) = m.loss_and_grads(&ids).unwrap();
    let flat = |g: &altgrad::model::Grads<f64>| -> Vec<f64> {
        g.weights.params().iter().flat_map(|p| p.data.iter().copied()).collect()
    };
    let ex = flat(&exact);
    for make in
        [(|g| HeadPlan::Poly(PolyOptions { degree: g, center: true, chunk: 4 })) as fn(usize) -> HeadPlan, |g| {
            HeadPlan::AltGrad(PolyOptions { degree: g, center: true, chunk: 4 })
        }]
    {
        let errs: Vec<f64> = [2, 4, 6]
            .iter()
            .map(|&g| {
                let (_, gr, _) = m.loss_and_grads_with(&ids, &AttentionPolicy::Fixed(make(g))).unwrap();
                rel(&flat(&gr), &ex)
            })
            .collect();
        eprintln!("{:?}: rel err of all gradients vs exact for g = 2, 4, 6: {errs:?}", make(2).method_name());
        assert!(errs[0] < 0.05 && errs[1] < errs[0] && errs[2] < errs[1], "{errs:?}");
    }
}

/// A decoder built for polynomial attention (issue 17): layers of each kind, `feature_dim`-wide
/// queries and keys in the poly and hybrid layers (head_dim 4, feature_dim 2 or 6).
fn built_in_cfg(kinds: &[&str], feature_dim: usize, window: usize, sinks: usize) -> LlamaConfig {
    let layers = kinds.iter().map(|k| k.parse().unwrap()).collect();
    LlamaConfig {
        num_layers: kinds.len(),
        built_in_attention: Some(altgrad::model::BuiltInAttention {
            layers,
            feature_dim,
            degree: 2,
            window,
            sinks,
            center: true,
            chunk: 3,
        }),
        ..small_cfg(RopeLayout::RotateHalf, false, false)
    }
}

#[test]
fn built_in_attention_models_have_their_own_exact_gradient() {
    // every parameter by finite differences: the gradient is the model's own (hybrid and poly
    // layers included), whatever the run's policy
    for (kinds, df, w, s) in [(&["hybrid", "exact"][..], 6, 3, 1), (&["poly", "hybrid"][..], 2, 2, 0)] {
        let cfg = built_in_cfg(kinds, df, w, s);
        let m = model(cfg.clone(), 21);
        assert_eq!(m.weights.layers[0].q_proj.weight.shape, vec![cfg.num_heads * cfg.qk_head_dim(0), 8]);
        check_ce_gradients(cfg, 21);
    }
}

#[test]
fn built_in_hybrid_layer_with_a_long_window_is_the_softmax_layer() {
    // window ≥ n and feature_dim = head_dim: the hybrid model is the softmax model with the same weights
    let soft = model(small_cfg(RopeLayout::RotateHalf, false, false), 5);
    let cfg = built_in_cfg(&["hybrid", "hybrid"], 4, 64, 0);
    let hyb = Model::new(cfg, soft.weights.clone(), "test").unwrap();
    let ids: Vec<u32> = vec![3, 7, 1, 12, 0, 7, 5, 2, 9];
    let (la, ga, _) = soft.loss_and_grads(&ids).unwrap();
    let (lb, gb, _) = hyb.loss_and_grads(&ids).unwrap();
    assert!((la - lb).abs() < 1e-12, "{la} vs {lb}");
    for (a, b) in ga.weights.params().iter().zip(gb.weights.params()) {
        assert!(rel(&b.data, &a.data) < 1e-11, "{}", a.name);
    }
}

#[test]
fn built_in_attention_configs_are_checked() {
    let bad = |cfg: LlamaConfig, needle: &str| {
        let e = cfg.validate("cfg").unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    };
    bad(built_in_cfg(&["hybrid"], 4, 2, 0).clone_with_layers(2), "layer entries");
    bad(built_in_cfg(&["hybrid", "poly"], 3, 2, 0), "feature_dim (3)");
    bad(built_in_cfg(&["hybrid", "poly"], 4, 0, 0), "need a window or sinks");
    let mut c = built_in_cfg(&["poly", "poly"], 4, 0, 0);
    c.built_in_attention.as_mut().unwrap().degree = 3;
    bad(c, "degree");
}

trait WithLayers {
    fn clone_with_layers(&self, n: usize) -> Self;
}

impl WithLayers for LlamaConfig {
    fn clone_with_layers(&self, n: usize) -> Self {
        LlamaConfig { num_layers: n, ..self.clone() }
    }
}
