//! The weights of a BERT encoder: every tensor, named as in HF checkpoints without the `bert.`
//! prefix, in one container that also holds the gradients.

use super::config::BertConfig;
use crate::linalg::Scalar;
use crate::model::layers::{LayerNormWeights, Linear};
use crate::model::param::{fill_normal, Param, ParamSet};

/// One encoder layer (HF `encoder.layer.{i}`).
#[derive(Clone, Debug)]
pub struct BertLayerWeights<T> {
    /// `attention.self.query`, `[heads·head_dim, hidden]` + bias.
    pub query: Linear<T>,
    /// `attention.self.key`, `[heads·head_dim, hidden]` + bias.
    pub key: Linear<T>,
    /// `attention.self.value`, `[heads·head_dim, hidden]` + bias.
    pub value: Linear<T>,
    /// `attention.output.dense`, `[hidden, heads·head_dim]` + bias.
    pub attn_out: Linear<T>,
    /// `attention.output.LayerNorm`.
    pub attn_norm: LayerNormWeights<T>,
    /// `intermediate.dense`, `[intermediate, hidden]` + bias.
    pub intermediate: Linear<T>,
    /// `output.dense`, `[hidden, intermediate]` + bias.
    pub output: Linear<T>,
    /// `output.LayerNorm`.
    pub out_norm: LayerNormWeights<T>,
}

impl<T: Scalar> BertLayerWeights<T> {
    /// All tensors of the layer in HF order: query, key, value, attention output dense and
    /// LayerNorm, intermediate dense, output dense and LayerNorm (weight before bias).
    pub fn params(&self) -> Vec<&Param<T>> {
        let mut v = Vec::with_capacity(16);
        for l in [&self.query, &self.key, &self.value, &self.attn_out] {
            v.extend(l.params());
        }
        v.extend([&self.attn_norm.weight, &self.attn_norm.bias]);
        for l in [&self.intermediate, &self.output] {
            v.extend(l.params());
        }
        v.extend([&self.out_norm.weight, &self.out_norm.bias]);
        v
    }
    /// All tensors, mutable, same order as [`BertLayerWeights::params`].
    pub fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut v = Vec::with_capacity(16);
        for l in [&mut self.query, &mut self.key, &mut self.value, &mut self.attn_out] {
            v.extend(l.params_mut());
        }
        v.extend([&mut self.attn_norm.weight, &mut self.attn_norm.bias]);
        for l in [&mut self.intermediate, &mut self.output] {
            v.extend(l.params_mut());
        }
        v.extend([&mut self.out_norm.weight, &mut self.out_norm.bias]);
        v
    }
    /// Zeros shaped and named like `self` (a gradient buffer).
    pub fn zeros_like(&self) -> Self {
        BertLayerWeights {
            query: self.query.zeros_like(),
            key: self.key.zeros_like(),
            value: self.value.zeros_like(),
            attn_out: self.attn_out.zeros_like(),
            attn_norm: self.attn_norm.zeros_like(),
            intermediate: self.intermediate.zeros_like(),
            output: self.output.zeros_like(),
            out_norm: self.out_norm.zeros_like(),
        }
    }
}

/// All weights of a BERT encoder, named as in HF checkpoints without the `bert.` prefix
/// (as in sentence-transformers' all-MiniLM-L6-v2). The same type holds gradients.
#[derive(Clone, Debug)]
pub struct BertWeights<T> {
    /// `embeddings.word_embeddings.weight`, `[vocab, hidden]`.
    pub word_embeddings: Param<T>,
    /// `embeddings.position_embeddings.weight`, `[max_position_embeddings, hidden]`.
    pub position_embeddings: Param<T>,
    /// `embeddings.token_type_embeddings.weight`, `[type_vocab_size, hidden]`.
    pub token_type_embeddings: Param<T>,
    /// `embeddings.LayerNorm`.
    pub embed_norm: LayerNormWeights<T>,
    /// `encoder.layer.{i}`, first to last.
    pub layers: Vec<BertLayerWeights<T>>,
}

impl<T: Scalar> BertWeights<T> {
    /// Zero weights with HF names and the shapes `cfg` implies.
    pub fn zeros(cfg: &BertConfig) -> Self {
        let (h, q, inter) = (cfg.hidden_size, cfg.q_dim(), cfg.intermediate_size);
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                BertLayerWeights {
                    query: Linear::zeros(&format!("{p}.attention.self.query"), q, h, true),
                    key: Linear::zeros(&format!("{p}.attention.self.key"), q, h, true),
                    value: Linear::zeros(&format!("{p}.attention.self.value"), q, h, true),
                    attn_out: Linear::zeros(&format!("{p}.attention.output.dense"), h, q, true),
                    attn_norm: LayerNormWeights::zeros(&format!("{p}.attention.output.LayerNorm"), h),
                    intermediate: Linear::zeros(&format!("{p}.intermediate.dense"), inter, h, true),
                    output: Linear::zeros(&format!("{p}.output.dense"), h, inter, true),
                    out_norm: LayerNormWeights::zeros(&format!("{p}.output.LayerNorm"), h),
                }
            })
            .collect();
        BertWeights {
            word_embeddings: Param::zeros("embeddings.word_embeddings.weight", &[cfg.vocab_size, h]),
            position_embeddings: Param::zeros(
                "embeddings.position_embeddings.weight",
                &[cfg.max_position_embeddings, h],
            ),
            token_type_embeddings: Param::zeros("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, h]),
            embed_norm: LayerNormWeights::zeros("embeddings.LayerNorm", h),
            layers,
        }
    }

    /// Seeded random weights with HF names: LayerNorm weights `1 + N(0, 0.1²)`, LayerNorm and
    /// linear biases `N(0, 0.1²)`, embedding tables `N(0, 1)`, linear weights `N(0, 1/in)`.
    /// Used by tests (and any built-in small encoder).
    pub fn random(cfg: &BertConfig, seed: u64) -> Self {
        let mut w = Self::zeros(cfg);
        fill_normal(w.params_mut(), seed, |p| {
            if p.name.ends_with("LayerNorm.weight") {
                (1.0, 0.1)
            } else if p.name.ends_with(".bias") {
                (0.0, 0.1)
            } else if p.name.starts_with("embeddings.") {
                (0.0, 1.0)
            } else {
                (0.0, 1.0 / (p.shape[1] as f64).sqrt())
            }
        });
        w
    }

    /// All tensors in HF order: word, position, token-type embeddings, embedding LayerNorm
    /// (weight, bias), then each layer ([`BertLayerWeights::params`]).
    pub fn params(&self) -> Vec<&Param<T>> {
        let mut v = vec![
            &self.word_embeddings,
            &self.position_embeddings,
            &self.token_type_embeddings,
            &self.embed_norm.weight,
            &self.embed_norm.bias,
        ];
        for l in &self.layers {
            v.extend(l.params());
        }
        v
    }

    /// All tensors, mutable, same order as [`BertWeights::params`].
    pub fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut v = vec![
            &mut self.word_embeddings,
            &mut self.position_embeddings,
            &mut self.token_type_embeddings,
            &mut self.embed_norm.weight,
            &mut self.embed_norm.bias,
        ];
        for l in &mut self.layers {
            v.extend(l.params_mut());
        }
        v
    }

    /// Zeros shaped and named like `self` (a gradient buffer).
    pub fn zeros_like(&self) -> Self {
        BertWeights {
            word_embeddings: self.word_embeddings.zeros_like(),
            position_embeddings: self.position_embeddings.zeros_like(),
            token_type_embeddings: self.token_type_embeddings.zeros_like(),
            embed_norm: self.embed_norm.zeros_like(),
            layers: self.layers.iter().map(|l| l.zeros_like()).collect(),
        }
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }
}

impl<T: Scalar> ParamSet<T> for BertWeights<T> {
    fn params(&self) -> Vec<&Param<T>> {
        BertWeights::params(self)
    }
    fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        BertWeights::params_mut(self)
    }
    fn layer_params(&self) -> Vec<Vec<&Param<T>>> {
        self.layers.iter().map(|l| l.params()).collect()
    }
    fn zeros_like(&self) -> Self {
        BertWeights::zeros_like(self)
    }
    fn numel(&self) -> usize {
        BertWeights::numel(self)
    }
}
