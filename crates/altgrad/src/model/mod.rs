//! The models: a Llama-family decoder ([`llama`]) and a BERT encoder ([`bert`]), both with a
//! hand-written backward (MATH §6) behind one interface, [`Network`].
//!
//! Every non-attention part (embedding, norms, RoPE, linear maps, activations, residual adds,
//! LM head, loss) is differentiated exactly ([`layers`], [`loss`]); attention goes through
//! [`crate::attention`], each head by the method an [`AttentionPolicy`] chooses ([`policy`],
//! [`layers::attention`]). Parameters and gradients are named tensors ([`param`]).
//!
//! Dependencies inside `model` run one way: `param`, `policy` ← `layers` ← `network`, `loss` ←
//! `llama`, `bert`.

pub mod bert;
pub mod layers;
pub mod llama;
pub mod loss;
pub mod network;
pub mod param;
pub mod policy;

pub use layers::{Linear, RopeLayout};
pub use llama::{
    BuiltInAttention, ForwardCache, Grads, LayerAttention, LayerWeights, LlamaConfig, LlamaWeights, Model,
};
pub use network::{Activations, Family, Gradients, LossAndGrads, Network, NetworkSummary};
pub use param::{Param, ParamSet};
pub use policy::{AttentionPolicy, HeadDecision};
