//! The Llama-family decoder (Llama, SmolLM2, … from HF directories or GGUF): pre-norm layers of
//! RMSNorm, RoPE'd causal attention (GQA) and a SwiGLU MLP, a final RMSNorm and an LM head, with
//! a hand-written backward (MATH §6), as a [`crate::model::Network`].
//!
//! - [`config`]: [`LlamaConfig`] (shape and hyper-parameters, HF `config.json` names);
//! - [`weights`]: [`LlamaWeights`] / [`LayerWeights`], every tensor by name;
//! - [`model`]: [`Model`] (forward, loss, backward) and its caches.

pub mod config;
pub mod model;
pub mod weights;

pub use config::{BuiltInAttention, LayerAttention, LlamaConfig};
pub use model::{ForwardCache, Grads, LayerCache, Model, LOSS_CHUNK};
pub use weights::{LayerWeights, LlamaWeights};
