//! Llama-family decoder with hand-written backward (MATH §6).
//!
//! Every non-attention part (embedding, RMSNorm, RoPE, linear, SwiGLU, residual adds, LM head,
//! loss) is differentiated exactly; attention goes through [`crate::attention`].

pub mod bert;
pub mod config;
pub mod layers;
pub mod loss;
pub mod policy;
pub mod transformer;
pub mod weights;

pub use config::{LlamaConfig, RopeLayout};
pub use policy::{AttentionPolicy, HeadDecision};
pub use transformer::{ForwardCache, Grads, Model};
pub use weights::{LayerWeights, Linear, LlamaWeights, Param};
