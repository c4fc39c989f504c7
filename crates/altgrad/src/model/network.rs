//! One interface for every model family: [`Network`], implemented by the Llama decoder
//! ([`super::Model`]) and the BERT encoder ([`super::bert::BertModel`]).
//!
//! A network maps token ids to final hidden states `[n, hidden]` through `num_layers` layers whose
//! attention heads are each exact or approximate ([`AttentionPolicy`]); its forward keeps what the
//! hand-written backward needs ([`Network::Cache`], read through [`Activations`]), and any loss
//! reaches it through `dL/d hidden` (LSSSZ Def 3.1, MATH §6), or `dL/d logits` for decoders.
//! Parameters and their gradients are named as in the model file ([`ParamSet`]).

use super::layers::AttnCache;
use super::param::ParamSet;
use super::policy::AttentionPolicy;
use crate::linalg::Scalar;
use crate::{Error, Result};
use serde::Serialize;

/// The kind of transformer a [`Network`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Family {
    /// Llama-family decoder: causal attention, RMSNorm, RoPE, SwiGLU, LM head.
    Llama,
    /// BERT encoder: bidirectional attention, LayerNorm, GELU, no LM head.
    Bert,
}

impl Family {
    /// Display name: `Llama` or `BERT`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "Llama",
            Family::Bert => "BERT",
        }
    }
    /// Attention is causal (decoders) or bidirectional (encoders).
    pub fn causal(self) -> bool {
        matches!(self, Family::Llama)
    }
    /// The family has an LM head, so [`Network::backward_from_logits`] applies.
    pub fn has_lm_head(self) -> bool {
        matches!(self, Family::Llama)
    }
    /// Name of the family's default loss ([`Network::default_loss`]), for display (ARCHITECTURE
    /// "Losses"): `mean next-token cross-entropy` or `0.5·‖mean-pooled final hidden‖²`.
    pub fn loss_name(self) -> &'static str {
        match self {
            Family::Llama => "mean next-token cross-entropy",
            Family::Bert => "0.5·‖mean-pooled final hidden‖²",
        }
    }
}

/// The shape of a network, in terms common to every family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetworkSummary {
    /// Decoder or encoder.
    pub family: Family,
    /// Number of layers.
    pub num_layers: usize,
    /// Model width `hidden`.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Query heads per layer.
    pub num_heads: usize,
    /// Key/value heads per layer (`num_heads` without GQA).
    pub num_kv_heads: usize,
    /// Per-head width `d`.
    pub head_dim: usize,
    /// Rows of the token-embedding table (and of the LM head, for decoders).
    pub vocab_size: usize,
    /// Most token ids [`Network::forward_with`] accepts (decoders: `max_position_embeddings`
    /// of the config; BERT: the rows of its position table).
    pub max_seq_len: usize,
    /// Total number of parameter scalars.
    pub num_params: usize,
}

impl std::fmt::Display for NetworkSummary {
    /// `Llama: 4 layers, hidden 128, 4 heads / 2 kv heads of 32, 0.9M params` or
    /// `BERT: 6 layers, hidden 384, 12 heads of 32, 22.7M params` (what `altgrad grad` prints).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} layers, hidden {}, {} heads",
            self.family.name(),
            self.num_layers,
            self.hidden_size,
            self.num_heads
        )?;
        if self.family == Family::Llama {
            write!(f, " / {} kv heads", self.num_kv_heads)?;
        }
        write!(f, " of {}, {:.1}M params", self.head_dim, self.num_params as f64 / 1e6)
    }
}

/// Gradients of a loss: every parameter (same names and shapes as the model's weights, type `W`)
/// and the input embeddings. [`super::Grads`] (Llama) and [`super::bert::BertGrads`] are this type.
#[derive(Clone, Debug)]
pub struct Gradients<T, W> {
    /// `dL/dθ` for every parameter θ.
    pub weights: W,
    /// `dL/d(input embeddings)` `[n, hidden]`: the input of the first layer (Llama) or of the
    /// embedding LayerNorm (BERT), i.e. what [`Network::forward_embeddings_with`] takes.
    pub embeddings: Vec<T>,
    /// When `Some` (empty) before the backward: `dL/d(input of layer l)` `[n, hidden]` for every
    /// layer, first to last (for per-layer comparisons, `grad --compare`); `None` records nothing.
    pub layer_dx: Option<Vec<Vec<T>>>,
}

impl<T: Clone, W> Gradients<T, W> {
    /// Records `dx = dL/d(input of a layer)` `[n, hidden]` in `layer_dx` when recording is on
    /// (`Some`). A backward calls it once per layer, last layer first, so each record goes in
    /// front: the list ends up first layer to last.
    pub fn record_layer_dx(&mut self, dx: &[T]) {
        if let Some(rec) = self.layer_dx.as_mut() {
            rec.insert(0, dx.to_vec());
        }
    }
}

/// What [`Network::loss_and_grads_with`] returns for a network `N`: `(loss, grads, cache)`.
pub type LossAndGrads<T, N> = (f64, Gradients<T, <N as Network<T>>::Weights>, <N as Network<T>>::Cache);

/// Read access to what a forward pass kept, common to every family.
pub trait Activations<T> {
    /// Sequence length `n`.
    fn seq_len(&self) -> usize;
    /// Token ids of the forward (empty when it started from embeddings).
    fn token_ids(&self) -> &[u32];
    /// Final hidden states `[n, hidden]` (what `--hidden-out` writes and the loss reads).
    fn hidden(&self) -> &[T];
    /// Each layer's attention (q, k, v after any RoPE, output, per-head decisions), first to last.
    fn attention(&self) -> Vec<&AttnCache<T>>;
}

/// Implements [`Activations`] for a cache type `$cache<T>` with fields `n`, `ids`, `hidden` and
/// `layers`, each layer holding its [`AttnCache`] as `attn`.
macro_rules! impl_activations {
    ($cache:ident) => {
        impl<T> $crate::model::network::Activations<T> for $cache<T> {
            fn seq_len(&self) -> usize {
                self.n
            }
            fn token_ids(&self) -> &[u32] {
                &self.ids
            }
            fn hidden(&self) -> &[T] {
                &self.hidden
            }
            fn attention(&self) -> Vec<&$crate::model::layers::AttnCache<T>> {
                self.layers.iter().map(|l| &l.attn).collect()
            }
        }
    };
}
pub(crate) use impl_activations;

/// A transformer with a hand-written backward (MATH §6; LSSSZ Alg. 1 `MultiGrad`): forward keeping
/// the activations, the family's default loss, backward from `dL/d hidden` (or `dL/d logits`),
/// parameters and gradients by name.
///
/// Every method taking token ids validates them (non-empty, `< vocab_size`, at most
/// `max_seq_len`); inputs named in errors are `tokens`, `embeddings`, `dhidden`, `dlogits`.
pub trait Network<T: Scalar> {
    /// The parameter container; the same type holds the gradients.
    type Weights: ParamSet<T>;
    /// What the forward keeps for the backward.
    type Cache: Activations<T>;

    /// The network's shape.
    fn summary(&self) -> NetworkSummary;
    /// Where the model came from (a path, `tiny`, a description), for reports and errors.
    fn source(&self) -> &str;
    /// Every parameter, named as in the model file.
    fn weights(&self) -> &Self::Weights;
    /// Every parameter, mutable (an optimizer step, a finite-difference probe).
    fn weights_mut(&mut self) -> &mut Self::Weights;

    /// Checks token ids for a forward: non-empty, at most `max_seq_len`, each `< vocab_size`.
    ///
    /// Errors: `BadInput` naming `input`.
    fn check_ids(&self, ids: &[u32], input: &str) -> Result<()>;

    /// Checks token ids for the default loss: [`Network::check_ids`], and for decoders at least 2
    /// ids (one next-token prediction).
    ///
    /// Errors: `BadInput` naming `input`.
    fn check_loss_ids(&self, ids: &[u32], input: &str) -> Result<()> {
        self.check_ids(ids, input)
    }

    /// Forward pass over token ids `[n]` with each head's attention chosen by `policy`, keeping
    /// the activations the backward needs.
    ///
    /// Errors: bad ids ([`Network::check_ids`], input `tokens`), invalid plans.
    fn forward_with(&self, ids: &[u32], policy: &AttentionPolicy) -> Result<Self::Cache>;

    /// Forward pass from input embeddings `x [n, hidden]` (Llama: the token embeddings; BERT: the
    /// summed word + position + token-type embeddings before the embedding LayerNorm). The cache
    /// has no token ids, so the backward leaves the embedding tables' gradients at zero.
    ///
    /// Errors: wrong length or non-finite values in `x` (input `embeddings`), `n` above a
    /// decoder's `max_seq_len`, invalid plans.
    fn forward_embeddings_with(&self, x: Vec<T>, n: usize, policy: &AttentionPolicy) -> Result<Self::Cache>;

    /// [`Network::forward_with`] with exact attention everywhere.
    fn forward(&self, ids: &[u32]) -> Result<Self::Cache> {
        self.forward_with(ids, &AttentionPolicy::EXACT)
    }

    /// [`Network::forward_embeddings_with`] with exact attention everywhere.
    fn forward_embeddings(&self, x: Vec<T>, n: usize) -> Result<Self::Cache> {
        self.forward_embeddings_with(x, n, &AttentionPolicy::EXACT)
    }

    /// A zero gradient buffer for a sequence of `n` tokens (`layer_dx: None`).
    fn zero_grads(&self, n: usize) -> Gradients<T, Self::Weights> {
        Gradients {
            weights: self.weights().zeros_like(),
            embeddings: vec![T::zero(); n * self.summary().hidden_size],
            layer_dx: None,
        }
    }

    /// The family's default loss (ARCHITECTURE "Losses") on a forward's cache: returns
    /// `(L, dL/d hidden [n, hidden])` and accumulates the gradient of any parameter the loss reads
    /// directly (a decoder's LM head) into `grads`. Decoders: mean next-token cross-entropy over
    /// the `n − 1` predictions, in nats ([`super::loss::lm_cross_entropy`]); encoders:
    /// `0.5·‖mean-pooled hidden‖²` ([`super::loss::pooled_norm_loss`]).
    ///
    /// Errors: decoders, a cache with fewer than 2 token ids.
    fn default_loss(&self, cache: &Self::Cache, grads: &mut Gradients<T, Self::Weights>) -> Result<(f64, Vec<T>)>;

    /// The general-loss entry point (LSSSZ Def 3.1): backward from `dL/d hidden [n, hidden]` of the
    /// final hidden states, layer m → 1 (residuals add the identity path, Lemma J.3), accumulating
    /// every parameter's gradient into `grads` (which may already hold, e.g., the LM head's) and
    /// setting `grads.embeddings`; records `grads.layer_dx` when it is `Some`.
    ///
    /// Errors: wrong length or non-finite values in `dhidden` (input `dhidden`).
    fn backward_hidden_into(
        &self,
        cache: &Self::Cache,
        dhidden: &[T],
        grads: &mut Gradients<T, Self::Weights>,
    ) -> Result<()>;

    /// [`Network::backward_hidden_into`] into a fresh buffer: every gradient of a loss whose
    /// `dL/d hidden` is `dhidden` (a decoder's LM head gets none).
    ///
    /// Errors: as [`Network::backward_hidden_into`].
    fn backward_from_hidden(&self, cache: &Self::Cache, dhidden: &[T]) -> Result<Gradients<T, Self::Weights>> {
        let mut grads = self.zero_grads(cache.seq_len());
        self.backward_hidden_into(cache, dhidden, &mut grads)?;
        Ok(grads)
    }

    /// The general-loss entry point of a decoder: backward from any `dL/d logits [n, vocab]`,
    /// LM head included. Networks without an LM head ([`Family::has_lm_head`]) return an error.
    ///
    /// Errors: no LM head; wrong length or non-finite values in `dlogits` (input `dlogits`).
    fn backward_from_logits(&self, cache: &Self::Cache, dlogits: &[T]) -> Result<Gradients<T, Self::Weights>> {
        let _ = (cache, dlogits);
        let family = self.summary().family.name();
        Err(Error::bad("dlogits", format!("a {family} model has no LM head: give dL/d(hidden) instead")))
    }

    /// Forward with `policy`, the default loss and the full backward over `ids`: returns
    /// `(loss, grads, cache)` — the gradient of the model whose heads are what `policy` chose
    /// (ALTGrad heads: the paper's Algorithm 1 formula instead).
    ///
    /// Errors: bad ids ([`Network::check_loss_ids`], input `tokens`), invalid plans.
    fn loss_and_grads_with(&self, ids: &[u32], policy: &AttentionPolicy) -> Result<LossAndGrads<T, Self>>
    where
        Self: Sized,
    {
        self.check_loss_ids(ids, "tokens")?;
        let cache = self.forward_with(ids, policy)?;
        let mut grads = self.zero_grads(ids.len());
        let (loss, dhidden) = self.default_loss(&cache, &mut grads)?;
        self.backward_hidden_into(&cache, &dhidden, &mut grads)?;
        Ok((loss, grads, cache))
    }

    /// [`Network::loss_and_grads_with`] with exact attention everywhere.
    fn loss_and_grads(&self, ids: &[u32]) -> Result<LossAndGrads<T, Self>>
    where
        Self: Sized,
    {
        self.loss_and_grads_with(ids, &AttentionPolicy::EXACT)
    }
}

/// Checks token ids: non-empty, at most `max_len` of them (`limit` names that bound in the message),
/// each `< vocab`.
///
/// Errors: `BadInput` naming `input`.
pub(crate) fn check_token_ids(ids: &[u32], vocab: usize, max_len: usize, limit: &str, input: &str) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::bad(input, "no tokens"));
    }
    if ids.len() > max_len {
        return Err(Error::bad(input, format!("{} tokens exceed the model's {limit} {max_len}", ids.len())));
    }
    if let Some((i, t)) = ids.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
        return Err(Error::bad(input, format!("token id {t} at position {i} is ≥ vocab_size {vocab}")));
    }
    Ok(())
}

/// Checks an activation-shaped input `x [rows, width]`: `rows ≥ 1`, `rows · width` values, all
/// finite.
///
/// Errors: `BadInput` naming `name`, with the expected shape or the first non-finite index.
pub(crate) fn check_rows<T: Scalar>(name: &str, x: &[T], rows: usize, width: usize) -> Result<()> {
    if rows == 0 || x.len() != rows * width {
        return Err(Error::bad(name, format!("expected [n ≥ 1, {width}] values for n = {rows}, got {}", x.len())));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::bad(name, format!("non-finite value at index {i}")));
    }
    Ok(())
}

/// Checks a config's sizes: each positive and at most 2²⁴ (`name` is the HF `config.json` key).
///
/// Errors: `BadInput` naming `source`.
pub(crate) fn check_sizes(source: &str, sizes: &[(&str, usize)]) -> Result<()> {
    for &(name, v) in sizes {
        if v == 0 {
            return Err(Error::bad(source, format!("{name} must be positive")));
        }
        if v > 1 << 24 {
            return Err(Error::bad(source, format!("{name} = {v} is implausibly large")));
        }
    }
    Ok(())
}
