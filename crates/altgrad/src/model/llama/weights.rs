//! The weights of a Llama-family decoder: every tensor, named as in the model file (HF names by
//! default, GGUF names when loaded from GGUF), in one container that also holds the gradients.

use super::config::LlamaConfig;
use crate::linalg::Scalar;
use crate::model::layers::Linear;
use crate::model::param::{fill_normal, Param, ParamSet};

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
                    q_proj: Linear::zeros(&format!("{p}.self_attn.q_proj"), cfg.q_dim_of(i), h, cfg.attention_bias),
                    k_proj: Linear::zeros(&format!("{p}.self_attn.k_proj"), cfg.k_dim_of(i), h, cfg.attention_bias),
                    v_proj: Linear::zeros(&format!("{p}.self_attn.v_proj"), cfg.kv_dim(), h, cfg.attention_bias),
                    o_proj: Linear::zeros(&format!("{p}.self_attn.o_proj"), h, cfg.q_dim(), cfg.attention_bias),
                    mlp_norm: Param::zeros(format!("{p}.post_attention_layernorm.weight"), &[h]),
                    gate_proj: Linear::zeros(&format!("{p}.mlp.gate_proj"), cfg.intermediate_size, h, cfg.mlp_bias),
                    up_proj: Linear::zeros(&format!("{p}.mlp.up_proj"), cfg.intermediate_size, h, cfg.mlp_bias),
                    down_proj: Linear::zeros(&format!("{p}.mlp.down_proj"), h, cfg.intermediate_size, cfg.mlp_bias),
                }
            })
            .collect();
        LlamaWeights {
            embed: Param::zeros("model.embed_tokens.weight", &[cfg.vocab_size, h]),
            layers,
            final_norm: Param::zeros("model.norm.weight", &[h]),
            lm_head: (!cfg.tie_word_embeddings).then(|| Linear::zeros("lm_head", cfg.vocab_size, h, false)),
        }
    }

    /// Seeded random weights with HF names: norms `1 + N(0, 0.1²)`, embeddings `N(0, 1)`,
    /// linear weights `N(0, 1/in)` (unit-variance activations), biases `N(0, 0.02²)`.
    /// Used by the built-in `tiny` model and by tests.
    pub fn random_hf(cfg: &LlamaConfig, seed: u64) -> Self {
        let mut w = Self::zeros_hf(cfg);
        fill_normal(w.params_mut(), seed, |p| {
            if p.name.ends_with("norm.weight") {
                (1.0, 0.1)
            } else if p.name.contains("embed_tokens") {
                (0.0, 1.0)
            } else if p.name.ends_with(".bias") {
                (0.0, 0.02)
            } else {
                (0.0, 1.0 / (p.shape[1] as f64).sqrt())
            }
        });
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

    /// The LM head matrix, mutable: `lm_head.weight`, or the embedding when tied (in a gradient
    /// buffer: where the LM head's gradient goes).
    pub fn head_weight_mut(&mut self) -> &mut Param<T> {
        match &mut self.lm_head {
            Some(h) => &mut h.weight,
            None => &mut self.embed,
        }
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }
}

impl<T: Scalar> ParamSet<T> for LlamaWeights<T> {
    fn params(&self) -> Vec<&Param<T>> {
        LlamaWeights::params(self)
    }
    fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        LlamaWeights::params_mut(self)
    }
    fn layer_params(&self) -> Vec<Vec<&Param<T>>> {
        self.layers.iter().map(|l| l.params()).collect()
    }
    fn zeros_like(&self) -> Self {
        LlamaWeights::zeros_like(self)
    }
    fn numel(&self) -> usize {
        LlamaWeights::numel(self)
    }
}
