//! Parameter containers: every tensor of a Llama-family decoder, each carrying the name it has in
//! the model file, so gradients come out named as the user's checkpoint names them.

use super::config::LlamaConfig;
use crate::linalg::Scalar;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// One named tensor, row-major.
#[derive(Clone, Debug)]
pub struct Param<T> {
    /// Name as in the model file (e.g. `model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Shape, outermost first (HF convention: linear weights are `[out, in]`).
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<T>,
}

impl<T: Scalar> Param<T> {
    /// A zero tensor of the given name and shape.
    pub fn zeros(name: impl Into<String>, shape: &[usize]) -> Self {
        Param { name: name.into(), shape: shape.to_vec(), data: vec![T::zero(); shape.iter().product()] }
    }
    /// A zero tensor shaped and named like `self`.
    pub fn zeros_like(&self) -> Self {
        Param { name: self.name.clone(), shape: self.shape.clone(), data: vec![T::zero(); self.data.len()] }
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// A linear layer `y = x Wᵀ + b`: `weight [out, in]`, optional `bias [out]`.
#[derive(Clone, Debug)]
pub struct Linear<T> {
    /// `[out, in]`.
    pub weight: Param<T>,
    /// `[out]`, when the layer has a bias.
    pub bias: Option<Param<T>>,
}

impl<T: Scalar> Linear<T> {
    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.weight.shape[0]
    }
    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.weight.shape[1]
    }
    /// Applies the layer to `x [rows, in]`, returning `[rows, out]`.
    pub fn forward(&self, x: &[T], rows: usize) -> Vec<T> {
        crate::linalg::linear(
            x,
            rows,
            &self.weight.data,
            self.out_dim(),
            self.in_dim(),
            self.bias.as_ref().map(|b| &b.data[..]),
        )
    }
    /// Backward: returns `dx [rows, in]`, accumulates into `grad`'s weight and bias.
    pub fn backward(&self, x: &[T], rows: usize, dy: &[T], grad: &mut Linear<T>) -> Vec<T> {
        crate::linalg::linear_backward(
            x,
            rows,
            &self.weight.data,
            self.out_dim(),
            self.in_dim(),
            dy,
            &mut grad.weight.data,
            grad.bias.as_mut().map(|b| &mut b.data[..]),
        )
    }
    fn zeros_like(&self) -> Self {
        Linear { weight: self.weight.zeros_like(), bias: self.bias.as_ref().map(|b| b.zeros_like()) }
    }
    fn params(&self) -> impl Iterator<Item = &Param<T>> {
        std::iter::once(&self.weight).chain(self.bias.as_ref())
    }
    fn params_mut(&mut self) -> impl Iterator<Item = &mut Param<T>> {
        std::iter::once(&mut self.weight).chain(self.bias.as_mut())
    }
}

/// One decoder layer: pre-norm attention and pre-norm SwiGLU MLP, both with residual adds.
#[derive(Clone, Debug)]
pub struct LayerWeights<T> {
    /// RMSNorm before attention, `[hidden]`.
    pub attn_norm: Param<T>,
    /// `[num_heads·head_dim, hidden]`.
    pub q_proj: Linear<T>,
    /// `[num_kv_heads·head_dim, hidden]`.
    pub k_proj: Linear<T>,
    /// `[num_kv_heads·head_dim, hidden]`.
    pub v_proj: Linear<T>,
    /// `[hidden, num_heads·head_dim]`.
    pub o_proj: Linear<T>,
    /// RMSNorm before the MLP, `[hidden]`.
    pub mlp_norm: Param<T>,
    /// `[intermediate, hidden]`.
    pub gate_proj: Linear<T>,
    /// `[intermediate, hidden]`.
    pub up_proj: Linear<T>,
    /// `[hidden, intermediate]`.
    pub down_proj: Linear<T>,
}

impl<T: Scalar> LayerWeights<T> {
    /// All tensors of the layer, in a fixed order.
    pub fn params(&self) -> Vec<&Param<T>> {
        let mut v = vec![&self.attn_norm];
        for l in [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj] {
            v.extend(l.params());
        }
        v.push(&self.mlp_norm);
        for l in [&self.gate_proj, &self.up_proj, &self.down_proj] {
            v.extend(l.params());
        }
        v
    }
    /// All tensors of the layer, mutable, same order as [`LayerWeights::params`].
    pub fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut v = vec![&mut self.attn_norm];
        for l in [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj, &mut self.o_proj] {
            v.extend(l.params_mut());
        }
        v.push(&mut self.mlp_norm);
        for l in [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj] {
            v.extend(l.params_mut());
        }
        v
    }
    /// Zeros shaped and named like `self` (a gradient buffer).
    pub fn zeros_like(&self) -> Self {
        LayerWeights {
            attn_norm: self.attn_norm.zeros_like(),
            q_proj: self.q_proj.zeros_like(),
            k_proj: self.k_proj.zeros_like(),
            v_proj: self.v_proj.zeros_like(),
            o_proj: self.o_proj.zeros_like(),
            mlp_norm: self.mlp_norm.zeros_like(),
            gate_proj: self.gate_proj.zeros_like(),
            up_proj: self.up_proj.zeros_like(),
            down_proj: self.down_proj.zeros_like(),
        }
    }
}

/// All weights of a Llama-family decoder. The same type holds gradients ([`LlamaWeights::zeros_like`]).
#[derive(Clone, Debug)]
pub struct LlamaWeights<T> {
    /// Token embedding `[vocab, hidden]`.
    pub embed: Param<T>,
    /// Decoder layers, first to last.
    pub layers: Vec<LayerWeights<T>>,
    /// Final RMSNorm `[hidden]`.
    pub final_norm: Param<T>,
    /// Untied LM head `[vocab, hidden]` (optional bias); `None` when tied to `embed`.
    pub lm_head: Option<Linear<T>>,
}

fn hf_linear<T: Scalar>(name: &str, out: usize, inp: usize, bias: bool) -> Linear<T> {
    Linear {
        weight: Param::zeros(format!("{name}.weight"), &[out, inp]),
        bias: bias.then(|| Param::zeros(format!("{name}.bias"), &[out])),
    }
}

impl<T: Scalar> LlamaWeights<T> {
    /// Zero weights with HF names (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`,
    /// …, `model.norm.weight`, `lm_head.weight`) and the shapes `cfg` implies.
    pub fn zeros_hf(cfg: &LlamaConfig) -> Self {
        let h = cfg.hidden_size;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                LayerWeights {
                    attn_norm: Param::zeros(format!("{p}.input_layernorm.weight"), &[h]),
                    q_proj: hf_linear(&format!("{p}.self_attn.q_proj"), cfg.q_dim(), h, cfg.attention_bias),
                    k_proj: hf_linear(&format!("{p}.self_attn.k_proj"), cfg.kv_dim(), h, cfg.attention_bias),
                    v_proj: hf_linear(&format!("{p}.self_attn.v_proj"), cfg.kv_dim(), h, cfg.attention_bias),
                    o_proj: hf_linear(&format!("{p}.self_attn.o_proj"), h, cfg.q_dim(), cfg.attention_bias),
                    mlp_norm: Param::zeros(format!("{p}.post_attention_layernorm.weight"), &[h]),
                    gate_proj: hf_linear(&format!("{p}.mlp.gate_proj"), cfg.intermediate_size, h, cfg.mlp_bias),
                    up_proj: hf_linear(&format!("{p}.mlp.up_proj"), cfg.intermediate_size, h, cfg.mlp_bias),
                    down_proj: hf_linear(&format!("{p}.mlp.down_proj"), h, cfg.intermediate_size, cfg.mlp_bias),
                }
            })
            .collect();
        LlamaWeights {
            embed: Param::zeros("model.embed_tokens.weight", &[cfg.vocab_size, h]),
            layers,
            final_norm: Param::zeros("model.norm.weight", &[h]),
            lm_head: (!cfg.tie_word_embeddings).then(|| hf_linear("lm_head", cfg.vocab_size, h, false)),
        }
    }

    /// Seeded random weights with HF names: norms `1 + N(0, 0.1²)`, embeddings `N(0, 1)`,
    /// linear weights `N(0, 1/in)` (unit-variance activations), biases `N(0, 0.02²)`.
    /// Used by the built-in `tiny` model and by tests.
    pub fn random_hf(cfg: &LlamaConfig, seed: u64) -> Self {
        let mut w = Self::zeros_hf(cfg);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for p in w.params_mut() {
            let (mean, std) = if p.name.ends_with("norm.weight") {
                (1.0, 0.1)
            } else if p.name.contains("embed_tokens") {
                (0.0, 1.0)
            } else if p.name.ends_with(".bias") {
                (0.0, 0.02)
            } else {
                (0.0, 1.0 / (p.shape[1] as f64).sqrt())
            };
            let dist = Normal::new(mean, std).expect("valid normal");
            for x in p.data.iter_mut() {
                *x = T::from_f64(dist.sample(&mut rng));
            }
        }
        w
    }

    /// All tensors in a fixed order: embedding, layers, final norm, LM head.
    pub fn params(&self) -> Vec<&Param<T>> {
        let mut v = vec![&self.embed];
        for l in &self.layers {
            v.extend(l.params());
        }
        v.push(&self.final_norm);
        if let Some(h) = &self.lm_head {
            v.extend(h.params());
        }
        v
    }

    /// All tensors, mutable, same order as [`LlamaWeights::params`].
    pub fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut v = vec![&mut self.embed];
        for l in &mut self.layers {
            v.extend(l.params_mut());
        }
        v.push(&mut self.final_norm);
        if let Some(h) = &mut self.lm_head {
            v.extend(h.params_mut());
        }
        v
    }

    /// Zeros shaped and named like `self` (a gradient buffer).
    pub fn zeros_like(&self) -> Self {
        LlamaWeights {
            embed: self.embed.zeros_like(),
            layers: self.layers.iter().map(|l| l.zeros_like()).collect(),
            final_norm: self.final_norm.zeros_like(),
            lm_head: self.lm_head.as_ref().map(|h| h.zeros_like()),
        }
    }

    /// The LM head matrix `[vocab, hidden]`: `lm_head.weight`, or the embedding when tied.
    pub fn head_weight(&self) -> &Param<T> {
        self.lm_head.as_ref().map(|h| &h.weight).unwrap_or(&self.embed)
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }
}
