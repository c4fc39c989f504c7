//! BERT encoder (Devlin et al. 2019; the HF `BertModel` without pooler, e.g. sentence-transformers'
//! all-MiniLM-L6-v2) with a hand-written backward (MATH §6), as a [`crate::model::Network`]:
//! embeddings (word + position + token type, then LayerNorm), post-LayerNorm blocks with
//! bidirectional attention and an exact-erf GELU MLP. Its layers (LayerNorm, GELU, linear,
//! attention) are in [`crate::model::layers`]; its default loss is
//! [`crate::model::loss::pooled_norm_loss`].
//!
//! - [`config`]: [`BertConfig`] (HF `config.json` names);
//! - [`weights`]: [`BertWeights`] / [`BertLayerWeights`], every tensor by name;
//! - [`model`]: [`BertModel`] (forward, backward) and its caches.

pub mod config;
pub mod model;
pub mod weights;

pub use config::BertConfig;
pub use model::{BertCache, BertGrads, BertLayerCache, BertModel};
pub use weights::{BertLayerWeights, BertWeights};
