//! A small BERT encoder (2 layers, hidden 8) end to end: every parameter's gradient and
//! `dL/d(embeddings)` against central finite differences in f64 ([`common::fd_params`]), the
//! forward against a naive element-by-element BERT, f32 against f64, input errors; and the
//! [`Network`] interface, which the Llama decoder and this encoder share.

mod common;
use altgrad::attention::HeadPlan;
use altgrad::attention::PolyOptions;
use altgrad::linalg::{norm, rel_err};
use altgrad::model::bert::{BertCache, BertConfig, BertModel, BertWeights};
use altgrad::model::loss::pooled_norm_loss;
use altgrad::model::{Activations, AttentionPolicy, Family, Linear, Model, Network, ParamSet};
use common::{check_close, dot, fd_grad, fd_params, layernorm_ref, randn_from};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Finite-difference step.
const H: f64 = 1e-6;

fn tiny_cfg() -> BertConfig {
    BertConfig {
        vocab_size: 11,
        hidden_size: 8,
        intermediate_size: 16,
        num_layers: 2,
        num_heads: 2,
        head_dim: 4,
        max_position_embeddings: 7,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
    }
}

fn tiny_model() -> BertModel<f64> {
    let cfg = tiny_cfg();
    let w = BertWeights::random(&cfg, 42);
    BertModel::new(cfg, w, "tiny-bert").unwrap()
}

/// A loss sensitive to every hidden coordinate: `Σ r ⊙ hidden + pooled_norm_loss`.
fn probe_loss(cache: &BertCache<f64>, r: &[f64]) -> f64 {
    dot(r, &cache.hidden) + pooled_norm_loss(&cache.hidden, cache.n).0
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    let base = tiny_model();
    let ids = [3u32, 7, 3, 10, 0];
    let n = ids.len();
    let h = base.cfg.hidden_size;
    let mut rng = StdRng::seed_from_u64(5);
    let r: Vec<f64> = randn_from(&mut rng, n * h).iter().map(|v| 0.3 * v).collect();
    let cache = base.forward(&ids).unwrap();
    let (_, dpool) = pooled_norm_loss(&cache.hidden, n);
    let dhidden: Vec<f64> = r.iter().zip(&dpool).map(|(a, b)| a + b).collect();
    let grads = base.backward_from_hidden(&cache, &dhidden).unwrap();

    let names: Vec<String> = base.weights.params().iter().map(|p| p.name.clone()).collect();
    assert_eq!(names.len(), 5 + 2 * 16);
    let gparams = grads.weights.params();
    let fds = fd_params(&base, H, |m| probe_loss(&m.forward(&ids).unwrap(), &r));
    let mut worst = 0.0f64;
    for (pi, name) in names.iter().enumerate() {
        let fd = &fds[pi];
        let an = &gparams[pi].data;
        assert_eq!(gparams[pi].name, *name);
        if name.ends_with("attention.self.key.bias") {
            // Softmax is invariant to adding q·b_k to every score of a row: the true gradient
            // is zero, so compare absolutely.
            let (a, f) = (norm(an), norm(fd));
            eprintln!("{name}: |analytic| = {a:.3e}, |fd| = {f:.3e} (exactly zero in theory)");
            assert!(a < 1e-12 && f < 1e-8, "{name}: {a:e} {f:e}");
            continue;
        }
        let e = rel_err(an, fd);
        eprintln!("{name}: rel err {e:.3e} (|g| = {:.3e})", norm(fd));
        assert!(e <= 1e-6, "{name}: relative error {e:e}");
        worst = worst.max(e);
        // Rows the forward never reads get exactly zero.
        if name.contains("position_embeddings") {
            assert!(an[n * h..].iter().all(|&v| v == 0.0));
        }
        if name.contains("token_type_embeddings") {
            assert!(an[h..].iter().all(|&v| v == 0.0));
        }
        if name.contains("word_embeddings") {
            for id in [1usize, 2, 4, 5, 6, 8, 9] {
                assert!(an[id * h..(id + 1) * h].iter().all(|&v| v == 0.0));
            }
        }
    }
    eprintln!("worst parameter rel err {worst:.3e}");

    // dL/de through forward_embeddings.
    let e0 = cache.embeddings.clone();
    let fd = fd_grad(&e0, H, |e| probe_loss(&base.forward_embeddings(e.to_vec(), n).unwrap(), &r));
    check_close("embeddings", &grads.embeddings, &fd, 1e-6);

    // forward() and forward_embeddings(embed()) agree exactly; the latter gives no table grads.
    let c2 = base.forward_embeddings(base.embed(&ids).unwrap(), n).unwrap();
    assert_eq!(c2.hidden, cache.hidden);
    let g2 = base.backward_from_hidden(&c2, &dhidden).unwrap();
    assert_eq!(g2.embeddings, grads.embeddings);
    assert!(g2.weights.word_embeddings.data.iter().all(|&v| v == 0.0));
    assert!(g2.weights.position_embeddings.data.iter().all(|&v| v == 0.0));

    // loss_and_grads = forward + pooled_norm_loss + backward.
    let (l, g3, _) = base.loss_and_grads(&ids).unwrap();
    let g4 = base.backward_from_hidden(&cache, &dpool).unwrap();
    assert_eq!(l, pooled_norm_loss(&cache.hidden, n).0);
    for (a, b) in g3.weights.params().iter().zip(g4.weights.params()) {
        assert_eq!(a.data, b.data, "{}", a.name);
    }
}

/// Independent forward: BERT written out element by element (materialized softmax, loops
/// for every matrix product, LayerNorm and GELU from their definitions via [`layernorm_ref`]
/// and `0.5·x·(1 + erf(x/√2))`).
fn naive_forward(m: &BertModel<f64>, ids: &[u32]) -> Vec<f64> {
    let c = &m.cfg;
    let w = &m.weights;
    let (n, h, nh, d) = (ids.len(), c.hidden_size, c.num_heads, c.head_dim);
    let lin = |x: &[f64], l: &Linear<f64>| -> Vec<f64> {
        let (o, i) = (l.weight.shape[0], l.weight.shape[1]);
        let b = &l.bias.as_ref().unwrap().data;
        let mut y = vec![0.0; n * o];
        for r in 0..n {
            for a in 0..o {
                let mut s = b[a];
                for k in 0..i {
                    s += x[r * i + k] * l.weight.data[a * i + k];
                }
                y[r * o + a] = s;
            }
        }
        y
    };
    let mut e = vec![0.0; n * h];
    for (i, &id) in ids.iter().enumerate() {
        for j in 0..h {
            e[i * h + j] = w.word_embeddings.data[id as usize * h + j]
                + w.position_embeddings.data[i * h + j]
                + w.token_type_embeddings.data[j];
        }
    }
    let eps = c.layer_norm_eps;
    let mut x = layernorm_ref(&e, h, &w.embed_norm.weight.data, &w.embed_norm.bias.data, eps);
    for lw in &w.layers {
        let (q, k, v) = (lin(&x, &lw.query), lin(&x, &lw.key), lin(&x, &lw.value));
        let mut o = vec![0.0; n * nh * d];
        for hd in 0..nh {
            for i in 0..n {
                let s: Vec<f64> = (0..n)
                    .map(|j| (0..d).map(|t| q[i * nh * d + hd * d + t] * k[j * nh * d + hd * d + t]).sum::<f64>())
                    .map(|v| v / (d as f64).sqrt())
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                for j in 0..n {
                    let p = (s[j] - mx).exp() / z;
                    for t in 0..d {
                        o[i * nh * d + hd * d + t] += p * v[j * nh * d + hd * d + t];
                    }
                }
            }
        }
        let a: Vec<f64> = lin(&o, &lw.attn_out).iter().zip(&x).map(|(a, b)| a + b).collect();
        let x1 = layernorm_ref(&a, h, &lw.attn_norm.weight.data, &lw.attn_norm.bias.data, eps);
        let g: Vec<f64> = lin(&x1, &lw.intermediate)
            .iter()
            .map(|&u| 0.5 * u * (1.0 + libm::erf(u / std::f64::consts::SQRT_2)))
            .collect();
        let inter = lw.intermediate.weight.shape[0];
        let out = {
            let l = &lw.output;
            let b = &l.bias.as_ref().unwrap().data;
            let mut y = vec![0.0; n * h];
            for r in 0..n {
                for a in 0..h {
                    y[r * h + a] =
                        b[a] + (0..inter).map(|k| g[r * inter + k] * l.weight.data[a * inter + k]).sum::<f64>();
                }
            }
            y
        };
        let s2: Vec<f64> = out.iter().zip(&x1).map(|(a, b)| a + b).collect();
        x = layernorm_ref(&s2, h, &lw.out_norm.weight.data, &lw.out_norm.bias.data, eps);
    }
    x
}

#[test]
fn forward_matches_naive_reference() {
    let m = tiny_model();
    for ids in [vec![4u32], vec![3, 7, 3, 10, 0], vec![1, 2, 3, 4, 5, 6, 10]] {
        let got = m.forward(&ids).unwrap().hidden;
        let e = rel_err(&got, &naive_forward(&m, &ids));
        eprintln!("n = {}: forward vs naive {e:.3e}", ids.len());
        assert!(e < 1e-13, "n = {}: {e:e}", ids.len());
    }
}

#[test]
fn f32_model_tracks_f64() {
    let m64 = tiny_model();
    let w32 = {
        let mut w = BertWeights::<f32>::zeros(&m64.cfg);
        for (a, b) in w.params_mut().into_iter().zip(m64.weights.params()) {
            a.data = b.data.iter().map(|&v| v as f32).collect();
        }
        w
    };
    let m32 = BertModel::new(m64.cfg.clone(), w32, "tiny-bert-f32").unwrap();
    let ids = [1u32, 2, 9, 4, 4, 6, 0];
    let (l64, g64, c64) = m64.loss_and_grads(&ids).unwrap();
    let (l32, g32, c32) = m32.loss_and_grads(&ids).unwrap();
    assert!(rel_err(&c32.hidden, &c64.hidden) < 1e-5);
    assert!((l32 - l64).abs() / l64 < 1e-4);
    for (a, b) in g32.weights.params().iter().zip(g64.weights.params()) {
        if a.name.ends_with("attention.self.key.bias") {
            continue; // zero in theory (see the finite-difference test): rounding noise only
        }
        let e = rel_err(&a.data, &b.data);
        assert!(e < 1e-3, "{}: {e:e}", a.name);
    }
    assert!(rel_err(&g32.embeddings, &g64.embeddings) < 1e-3);
}

#[test]
fn bad_inputs_are_named() {
    let m = tiny_model();
    let e = m.forward(&[]).unwrap_err().to_string();
    assert!(e.contains("tokens") && e.contains("no tokens"), "{e}");
    let e = m.forward(&[1, 11]).unwrap_err().to_string();
    assert!(e.contains("token id 11 at position 1") && e.contains("vocab_size 11"), "{e}");
    let e = m.forward(&[0; 8]).unwrap_err().to_string();
    assert!(e.contains("8 tokens exceed") && e.contains("max_position_embeddings 7"), "{e}");
    let e = m.forward_embeddings(vec![0.0; 7], 1).unwrap_err().to_string();
    assert!(e.contains("embeddings"), "{e}");
    let mut x = vec![0.0; 8];
    x[3] = f64::NAN;
    assert!(m.forward_embeddings(x, 1).unwrap_err().to_string().contains("index 3"));
    // Longer than the position table is fine from embeddings.
    assert_eq!(m.forward_embeddings(vec![0.5; 8 * 9], 9).unwrap().hidden.len(), 72);
    let c = m.forward(&[1, 2]).unwrap();
    assert!(m.backward_from_hidden(&c, &[0.0; 15]).unwrap_err().to_string().contains("dhidden"));
    let mut cfg = tiny_cfg();
    cfg.layer_norm_eps = 0.0;
    assert!(cfg.validate("c").unwrap_err().to_string().contains("layer_norm_eps"));
    let mut w = BertWeights::<f64>::random(&tiny_cfg(), 1);
    w.layers[1].output.weight.data[5] = f64::INFINITY;
    let e = BertModel::new(tiny_cfg(), w, "src").unwrap_err().to_string();
    assert!(e.contains("encoder.layer.1.output.dense.weight") && e.contains("index 5"), "{e}");
}

/// The shared interface: summaries, parameters and gradients by the same names, the default loss
/// and the backward composed by hand equal to `loss_and_grads_with`, per-layer records, and the
/// logits entry point only where there is an LM head.
fn check_network<N: Network<f64>>(m: &N, ids: &[u32], family: Family) {
    let s = m.summary();
    assert_eq!(s.family, family);
    assert_eq!(s.num_params, m.weights().numel());
    assert_eq!(m.weights().layer_params().len(), s.num_layers);
    let policy = AttentionPolicy::Fixed(HeadPlan::Poly(PolyOptions { degree: 2, center: true, chunk: 2 }));
    let (loss, grads, cache) = m.loss_and_grads_with(ids, &policy).unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    let names = |w: &N::Weights| -> Vec<(String, Vec<usize>)> {
        w.params().iter().map(|p| (p.name.clone(), p.shape.clone())).collect()
    };
    assert_eq!(names(m.weights()), names(&grads.weights));
    assert_eq!(cache.seq_len(), ids.len());
    assert_eq!(cache.token_ids(), ids);
    assert_eq!(cache.hidden().len(), ids.len() * s.hidden_size);
    let attn = cache.attention();
    assert_eq!(attn.len(), s.num_layers);
    for a in &attn {
        assert_eq!(a.decisions.len(), s.num_heads);
        assert!(a.decisions.iter().all(|d| d.plan.method_name() == "poly"));
        assert_eq!(a.opts.is_causal(), family.causal());
        assert_eq!(a.q.len(), ids.len() * s.num_heads * s.head_dim);
        assert_eq!(a.k.len(), ids.len() * s.num_kv_heads * s.head_dim);
    }
    // The same pass by hand, recording each layer's input gradient.
    let mut g2 = m.zero_grads(ids.len());
    g2.layer_dx = Some(Vec::new());
    let (l2, dhidden) = m.default_loss(&cache, &mut g2).unwrap();
    m.backward_hidden_into(&cache, &dhidden, &mut g2).unwrap();
    assert_eq!(l2, loss);
    for (a, b) in grads.weights.params().iter().zip(g2.weights.params()) {
        assert_eq!(a.data, b.data, "{}", a.name);
    }
    assert_eq!(g2.embeddings, grads.embeddings);
    assert!(grads.layer_dx.is_none());
    let dx = g2.layer_dx.unwrap();
    assert_eq!(dx.len(), s.num_layers);
    if family == Family::Llama {
        // the first layer's input is the input embedding (BERT's is after the embedding LayerNorm)
        assert_eq!(dx[0], g2.embeddings);
    }
    assert!(dx.iter().all(|d| d.len() == ids.len() * s.hidden_size));
    let dlogits = vec![0.0; ids.len() * s.vocab_size];
    let r = m.backward_from_logits(&cache, &dlogits);
    assert_eq!(r.is_ok(), family.has_lm_head());
    if let Err(e) = r {
        assert!(e.to_string().contains("dlogits") && e.to_string().contains("no LM head"), "{e}");
    }
}

#[test]
fn both_families_share_the_network_interface() {
    let llama = Model::<f64>::tiny_bounded(3);
    check_network(&llama, &[3, 7, 1, 12, 0, 7], Family::Llama);
    assert_eq!(
        llama.summary().to_string(),
        format!(
            "Llama: 4 layers, hidden 128, 4 heads / 2 kv heads of 32, {:.1}M params",
            llama.weights.numel() as f64 / 1e6
        )
    );
    let bert = tiny_model();
    check_network(&bert, &[3, 7, 3, 10, 0], Family::Bert);
    assert_eq!(bert.summary().to_string(), "BERT: 2 layers, hidden 8, 2 heads of 4, 0.0M params");
    assert_eq!(bert.summary().max_seq_len, 7);
    // Decoders need two tokens for their loss; encoders one.
    assert!(llama.check_loss_ids(&[1], "t").unwrap_err().to_string().contains("at least 2"));
    bert.check_loss_ids(&[1], "t").unwrap();
}
