//! Configuration of a Llama-family decoder and the built-in `tiny` model's shape.

use crate::attention::{features, HeadPlan, HybridOptions, PolyOptions};
use crate::model::layers::RopeLayout;
use crate::model::network::check_sizes;
use serde::{Deserialize, Serialize};

/// What one layer of a model built for polynomial attention computes (MATH §2, §4, §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerAttention {
    /// Softmax attention over `head_dim`-wide queries and keys.
    Exact,
    /// Causal polynomial attention over `feature_dim`-wide queries and keys.
    Poly,
    /// Hybrid attention (window and sinks exact, far keys polynomial) over `feature_dim`-wide
    /// queries and keys.
    Hybrid,
}

impl LayerAttention {
    /// `exact`, `poly` or `hybrid`.
    pub fn as_str(&self) -> &'static str {
        match self {
            LayerAttention::Exact => "exact",
            LayerAttention::Poly => "poly",
            LayerAttention::Hybrid => "hybrid",
        }
    }
}

impl std::str::FromStr for LayerAttention {
    type Err = crate::Error;
    /// Parses `exact`, `poly` or `hybrid`.
    ///
    /// Errors: `BadInput` (input `attention`) for any other string.
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "exact" => Ok(LayerAttention::Exact),
            "poly" => Ok(LayerAttention::Poly),
            "hybrid" => Ok(LayerAttention::Hybrid),
            _ => Err(crate::Error::bad("attention", format!("`{s}` is not a layer attention (exact, poly, hybrid)"))),
        }
    }
}

fn default_chunk() -> usize {
    crate::attention::poly::DEFAULT_CHUNK
}

fn default_center() -> bool {
    true
}

/// The attention a decoder is built with (Based, Arora et al. 2024; LoLCATs): per layer exact,
/// poly or hybrid. In poly and hybrid layers `q_proj` and `k_proj` map to `feature_dim` values per
/// head (Based's feature dimension, 16 there) and scores use `τ = 1/√feature_dim`; values and the
/// output keep `head_dim`. A model with it computes its own attention whatever a run's
/// `--attention` asks: its gradient is exact for that model (MATH §4.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltInAttention {
    /// One entry per layer.
    pub layers: Vec<LayerAttention>,
    /// Query/key width `d_f` of the poly and hybrid layers (even, ≥ 2).
    pub feature_dim: usize,
    /// Degree `g` of the polynomial (even, ≥ 2).
    pub degree: usize,
    /// Hybrid layers: keys per row seen exactly (the window, diagonal included).
    pub window: usize,
    /// Hybrid layers: leading keys every row sees exactly.
    pub sinks: usize,
    /// Row shift of the polynomial (MATH §3).
    #[serde(default = "default_center")]
    pub center: bool,
    /// Rows per chunk of the polynomial kernels (a compute setting: the function does not depend
    /// on it).
    #[serde(default = "default_chunk")]
    pub chunk: usize,
}

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
    /// The attention the model is built with; `None` (softmax models, every pretrained one): each
    /// run's `--attention` policy decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_in_attention: Option<BuiltInAttention>,
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
            built_in_attention: None,
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
        if let Some(b) = &self.built_in_attention {
            if b.layers.len() != self.num_layers {
                return bad(format!(
                    "built_in_attention has {} layer entries for {} layers",
                    b.layers.len(),
                    self.num_layers
                ));
            }
            if b.feature_dim < 2 || !b.feature_dim.is_multiple_of(2) {
                return bad(format!(
                    "feature_dim ({}) must be even and at least 2 (RoPE pairs coordinates)",
                    b.feature_dim
                ));
            }
            PolyOptions { degree: b.degree, center: b.center, chunk: b.chunk }
                .validate()
                .map_err(|e| crate::Error::bad(source, format!("built_in_attention: {e}")))?;
            if features::feature_dim(b.feature_dim, b.degree).is_none_or(|r| r > features::MAX_FEATURE_DIM) {
                return bad(format!(
                    "feature width C(feature_dim + degree, degree) for feature_dim {} and degree {} is too large",
                    b.feature_dim, b.degree
                ));
            }
            let hybrid = b.layers.contains(&LayerAttention::Hybrid);
            if hybrid && b.window == 0 && b.sinks == 0 {
                return bad("hybrid layers need a window or sinks (without both they are poly layers)".into());
            }
        }
        Ok(())
    }

    /// Query/key width of layer `l`: `feature_dim` in a built-in poly or hybrid layer, else
    /// `head_dim`.
    pub fn qk_head_dim(&self, l: usize) -> usize {
        match (&self.built_in_attention, self.layer_attention(l)) {
            (Some(b), Some(LayerAttention::Poly | LayerAttention::Hybrid)) => b.feature_dim,
            _ => self.head_dim,
        }
    }

    /// Layer `l`'s built-in attention kind (`None` for a model without one).
    pub fn layer_attention(&self, l: usize) -> Option<LayerAttention> {
        self.built_in_attention.as_ref().and_then(|b| b.layers.get(l).copied())
    }

    /// The plan every head of layer `l` runs when the model is built with its attention (`None`:
    /// the run's policy decides).
    pub fn layer_plan(&self, l: usize) -> Option<HeadPlan> {
        let b = self.built_in_attention.as_ref()?;
        let poly = PolyOptions { degree: b.degree, center: b.center, chunk: b.chunk };
        Some(match self.layer_attention(l)? {
            LayerAttention::Exact => HeadPlan::Exact,
            LayerAttention::Poly => HeadPlan::Poly(poly),
            LayerAttention::Hybrid => HeadPlan::Hybrid(HybridOptions { window: b.window, sinks: b.sinks, poly }),
        })
    }

    /// Width of layer `l`'s concatenated query heads, `num_heads · qk_head_dim(l)`.
    pub fn q_dim_of(&self, l: usize) -> usize {
        self.num_heads * self.qk_head_dim(l)
    }

    /// Width of layer `l`'s concatenated key heads, `num_kv_heads · qk_head_dim(l)`.
    pub fn k_dim_of(&self, l: usize) -> usize {
        self.num_kv_heads * self.qk_head_dim(l)
    }

    /// Width of the concatenated query heads (and of the attention output), `num_heads · head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads, `num_kv_heads · head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}
