//! Configuration of a Llama-family decoder and the built-in `tiny` model's shape.

use crate::model::layers::RopeLayout;
use crate::model::network::check_sizes;
use serde::{Deserialize, Serialize};

/// Shape and hyper-parameters of a Llama-family decoder.
///
/// Field names follow HF `config.json` where one exists.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width `hidden`.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads per layer.
    pub num_heads: usize,
    /// Key/value heads per layer (GQA); divides `num_heads`.
    pub num_kv_heads: usize,
    /// Per-head width `d`.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// RoPE pairing convention.
    pub rope_layout: RopeLayout,
    /// Longest sequence the model accepts (`max_position_embeddings`).
    pub max_seq_len: usize,
    /// LM head shares the token-embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v/o projections have biases.
    pub attention_bias: bool,
    /// gate/up/down projections have biases.
    pub mlp_bias: bool,
}

impl LlamaConfig {
    /// The built-in `tiny` model: 4 layers, hidden 128, 4 heads of 32, 2 KV heads, vocab 256
    /// (bytes), SwiGLU 384, untied head, rotate-half RoPE, up to 4096 positions.
    pub fn tiny() -> Self {
        LlamaConfig {
            vocab_size: 256,
            hidden_size: 128,
            intermediate_size: 384,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_layout: RopeLayout::RotateHalf,
            max_seq_len: 1 << 16,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
        }
    }

    /// Checks internal consistency (positive sizes, `num_kv_heads | num_heads`, even `head_dim`,
    /// finite positive eps/θ). `source` names the input in the error.
    pub fn validate(&self, source: &str) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::bad(source, m));
        check_sizes(
            source,
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_layers),
                ("num_attention_heads", self.num_heads),
                ("num_key_value_heads", self.num_kv_heads),
                ("head_dim", self.head_dim),
                ("max_position_embeddings", self.max_seq_len),
            ],
        )?;
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even for RoPE", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!("rms_norm_eps ({}) must be finite and positive", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!("rope_theta ({}) must be finite and > 1", self.rope_theta));
        }
        Ok(())
    }

    /// Width of the concatenated query heads, `num_heads · head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads, `num_kv_heads · head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}
