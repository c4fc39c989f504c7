//! Configuration of a BERT encoder (HF `config.json` names).

use crate::model::network::check_sizes;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Shape and hyper-parameters of a BERT encoder. Field names follow HF `config.json` where one
/// exists (`num_layers` is `num_hidden_layers`, `num_heads` is `num_attention_heads`; `head_dim`
/// is `hidden_size / num_attention_heads` there).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Rows of the word-embedding table.
    pub vocab_size: usize,
    /// Model width `hidden`.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_layers: usize,
    /// Attention heads per layer (keys and values have as many: no GQA).
    pub num_heads: usize,
    /// Per-head width `d`.
    pub head_dim: usize,
    /// Rows of the position-embedding table: the longest token sequence the model accepts.
    pub max_position_embeddings: usize,
    /// Rows of the token-type (segment) table (≥ 1; altgrad uses type 0).
    pub type_vocab_size: usize,
    /// LayerNorm epsilon (1e-12 in BERT).
    pub layer_norm_eps: f64,
}

impl BertConfig {
    /// Checks internal consistency: positive, plausible sizes; finite positive `layer_norm_eps`.
    /// `source` names the input in the error.
    pub fn validate(&self, source: &str) -> Result<()> {
        check_sizes(
            source,
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_layers),
                ("num_attention_heads", self.num_heads),
                ("head_dim", self.head_dim),
                ("max_position_embeddings", self.max_position_embeddings),
                ("type_vocab_size", self.type_vocab_size),
            ],
        )?;
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::bad(
                source,
                format!("layer_norm_eps ({}) must be finite and positive", self.layer_norm_eps),
            ));
        }
        Ok(())
    }

    /// Width of the concatenated heads, `num_heads · head_dim` (= `hidden_size` in HF BERT).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
}
