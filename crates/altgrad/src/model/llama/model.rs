//! The Llama-family decoder: forward keeping what backward needs, hand-written backward
//! layer m → 1 (LSSSZ Alg. 1 `MultiGrad`, Lemma J.3 for residuals; MATH §6), as a [`Network`].
//!
//! Layer `l`: `x_mid = x + o_proj(Attn(RoPE(q_proj(n₁)), RoPE(k_proj(n₁)), v_proj(n₁)))` with
//! `n₁ = RMSNorm(x)`, then `x_out = x_mid + down(SiLU(gate(n₂)) ∘ up(n₂))` with `n₂ = RMSNorm(x_mid)`.
//! After the last layer: final RMSNorm → `hidden [n, hidden_size]` → LM head → loss.

use super::config::LlamaConfig;
use super::weights::LlamaWeights;
use crate::attention::{AttnOptions, AttnShape};
use crate::linalg::{linear_backward, Scalar};
use crate::model::layers::{
    add_inplace, embedding_backward, embedding_forward, rmsnorm_backward, rmsnorm_forward, swiglu_backward,
    swiglu_forward, AttnCache, Rope,
};
use crate::model::loss::lm_cross_entropy;
use crate::model::network::{
    check_rows, check_token_ids, impl_activations, Family, Gradients, Network, NetworkSummary,
};
use crate::model::param::check_finite_params;
use crate::model::policy::AttentionPolicy;
use crate::profile::{timed, Kind as K, Pass::Backward as B, Pass::Forward as F};
use crate::{Error, Result};

/// Rows of logits computed at once by the loss (`[LOSS_CHUNK, vocab]` at a time).
pub const LOSS_CHUNK: usize = 512;

/// A Llama-family decoder: configuration plus named weights.
#[derive(Clone, Debug)]
pub struct Model<T> {
    /// Shapes and hyper-parameters.
    pub cfg: LlamaConfig,
    /// Every parameter, named as in the model file.
    pub weights: LlamaWeights<T>,
    /// Where the model came from (a path or `tiny`), for reports.
    pub source: String,
}

/// Gradients of a decoder's loss: every parameter (named as the model's weights) and the input
/// embeddings.
pub type Grads<T> = Gradients<T, LlamaWeights<T>>;

/// What one layer's forward keeps for its backward. Normalized inputs and the SwiGLU product are
/// recomputed in backward instead of stored (memory: ~`2·hidden + 2·q_dim + 2·kv_dim + 2·inter`
/// values per token per layer).
#[derive(Clone, Debug)]
pub struct LayerCache<T> {
    /// Layer input `[n, hidden]`.
    pub x_in: Vec<T>,
    /// `1/rms` of each row of `x_in`, `[n]`.
    pub inv_rms1: Vec<T>,
    /// Attention: queries and keys after RoPE `[n, heads, head_dim]`, values, output, what each
    /// head's method keeps for its backward, and each head's decision.
    pub attn: AttnCache<T>,
    /// Residual stream after attention `[n, hidden]`.
    pub x_mid: Vec<T>,
    /// `1/rms` of each row of `x_mid`.
    pub inv_rms2: Vec<T>,
    /// Gate projection `[n, intermediate]`.
    pub gate: Vec<T>,
    /// Up projection `[n, intermediate]`.
    pub up: Vec<T>,
}

/// Everything the backward needs from a forward pass over `n` tokens.
#[derive(Clone, Debug)]
pub struct ForwardCache<T> {
    /// Token ids (empty when the forward started from embeddings).
    pub ids: Vec<u32>,
    /// Sequence length.
    pub n: usize,
    /// Per-layer caches, first to last.
    pub layers: Vec<LayerCache<T>>,
    /// Output of the last layer, before the final norm `[n, hidden]`.
    pub x_final: Vec<T>,
    /// `1/rms` of each row of `x_final`.
    pub inv_rms_final: Vec<T>,
    /// Final hidden states after the final norm `[n, hidden]` (what `--hidden-out` writes).
    pub hidden: Vec<T>,
    rope: Rope<T>,
    /// RoPE tables of the built-in poly/hybrid layers' `feature_dim`-wide queries and keys (when
    /// it differs from `head_dim`).
    rope_f: Option<Rope<T>>,
}

/// The RoPE tables for queries and keys of width `width`: `rope_f` (the built-in layers'
/// `feature_dim`) when it has that width, else `rope` (`head_dim`).
fn rope_for<'a, T: Scalar>(rope: &'a Rope<T>, rope_f: &'a Option<Rope<T>>, width: usize) -> &'a Rope<T> {
    match rope_f {
        Some(r) if r.head_dim() == width => r,
        _ => rope,
    }
}

impl_activations!(ForwardCache);

impl<T: Scalar> Model<T> {
    /// The built-in `tiny` model ([`LlamaConfig::tiny`]) with seeded random weights
    /// ([`LlamaWeights::random_hf`]).
    pub fn tiny(seed: u64) -> Self {
        let cfg = LlamaConfig::tiny();
        let weights = LlamaWeights::random_hf(&cfg, seed);
        Model { cfg, weights, source: "tiny".into() }
    }

    /// `tiny` with its q and k projections scaled by 1/4, so attention scores stay small (score
    /// bound R ≈ 1): the regime where the polynomial method applies (MATH §3). Source `tiny-bounded`.
    pub fn tiny_bounded(seed: u64) -> Self {
        let mut m = Self::tiny(seed);
        for l in &mut m.weights.layers {
            for x in l.q_proj.weight.data.iter_mut().chain(l.k_proj.weight.data.iter_mut()) {
                *x *= T::from_f64(0.25);
            }
        }
        m.source = "tiny-bounded".into();
        m
    }

    /// Builds a model from parts, checking the config and that every weight is finite.
    ///
    /// Errors: `BadInput` naming `source` (an inconsistent config, a non-finite weight).
    pub fn new(cfg: LlamaConfig, weights: LlamaWeights<T>, source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        cfg.validate(&source)?;
        check_finite_params(&source, &weights.params())?;
        Ok(Model { cfg, weights, source })
    }

    /// Layer `l`'s attention shape: `qk_head_dim(l)`-wide queries and keys, `head_dim`-wide values.
    fn attn_shape(&self, l: usize, n: usize) -> AttnShape {
        let c = &self.cfg;
        AttnShape::new(n, c.num_heads, c.num_kv_heads, c.qk_head_dim(l)).with_head_dim_v(c.head_dim)
    }

    /// Causal, `τ = 1/√qk_head_dim(l)`.
    fn attn_opts(&self, l: usize) -> AttnOptions {
        AttnOptions::standard(self.cfg.qk_head_dim(l), true)
    }

    /// Mean next-token cross-entropy over the `n − 1` predictions (HF convention), in nats, and
    /// its gradient: returns `(loss, dL/d hidden [n, hidden])` and accumulates the LM-head
    /// gradient into `grads` (into the embedding when tied). Logits are computed `LOSS_CHUNK` rows
    /// at a time. This is the decoder's [`Network::default_loss`].
    ///
    /// Errors: fewer than 2 tokens, or a cache without token ids.
    pub fn lm_loss(&self, cache: &ForwardCache<T>, grads: &mut Grads<T>) -> Result<(f64, Vec<T>)> {
        if cache.ids.len() != cache.n || cache.n < 2 {
            return Err(Error::bad("tokens", "the next-token loss needs at least 2 token ids"));
        }
        let head = self.weights.head_weight();
        let (loss, dhidden) = timed(F, K::LmHeadLoss, || {
            lm_cross_entropy(
                &cache.hidden,
                self.cfg.hidden_size,
                &head.data,
                self.cfg.vocab_size,
                &cache.ids[1..],
                LOSS_CHUNK,
                &mut grads.weights.head_weight_mut().data,
            )
        });
        Ok((loss, dhidden))
    }
}

impl<T: Scalar> Network<T> for Model<T> {
    type Weights = LlamaWeights<T>;
    type Cache = ForwardCache<T>;

    fn summary(&self) -> NetworkSummary {
        let c = &self.cfg;
        NetworkSummary {
            family: Family::Llama,
            num_layers: c.num_layers,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
            max_seq_len: c.max_seq_len,
            num_params: self.weights.numel(),
        }
    }

    fn source(&self) -> &str {
        &self.source
    }

    fn weights(&self) -> &LlamaWeights<T> {
        &self.weights
    }

    fn weights_mut(&mut self) -> &mut LlamaWeights<T> {
        &mut self.weights
    }

    /// Checks token ids: non-empty, each `< vocab_size`, at most `max_seq_len` of them.
    fn check_ids(&self, ids: &[u32], input: &str) -> Result<()> {
        check_token_ids(ids, self.cfg.vocab_size, self.cfg.max_seq_len, "maximum sequence length", input)
    }

    /// [`Network::check_ids`] and at least 2 ids (one next-token prediction).
    fn check_loss_ids(&self, ids: &[u32], input: &str) -> Result<()> {
        self.check_ids(ids, input)?;
        if ids.len() < 2 {
            return Err(Error::bad(input, "the next-token loss needs at least 2 token ids"));
        }
        Ok(())
    }

    /// Token embedding lookup, then [`Network::forward_embeddings_with`]; the cache keeps `ids`.
    fn forward_with(&self, ids: &[u32], policy: &AttentionPolicy) -> Result<ForwardCache<T>> {
        self.check_ids(ids, "tokens")?;
        let x = timed(F, K::Embedding, || embedding_forward(ids, &self.weights.embed.data, self.cfg.hidden_size));
        let mut cache = self.forward_embeddings_with(x, ids.len(), policy)?;
        cache.ids = ids.to_vec();
        Ok(cache)
    }

    /// Forward from token embeddings `x [n, hidden]` (the first layer's input).
    ///
    /// Errors: wrong length or non-finite values (input `embeddings`), `n` above `max_seq_len`,
    /// invalid plans.
    fn forward_embeddings_with(&self, x: Vec<T>, n: usize, policy: &AttentionPolicy) -> Result<ForwardCache<T>> {
        let c = &self.cfg;
        let h = c.hidden_size;
        check_rows("embeddings", &x, n, h)?;
        if n > c.max_seq_len {
            return Err(Error::bad("embeddings", format!("n = {n} exceeds max_seq_len {}", c.max_seq_len)));
        }
        let rope = Rope::new(n, c.head_dim, c.rope_theta);
        let rope_f = c
            .built_in_attention
            .as_ref()
            .filter(|b| b.feature_dim != c.head_dim)
            .map(|b| Rope::new(n, b.feature_dim, c.rope_theta));
        let mut layers = Vec::with_capacity(c.num_layers);
        let mut x = x;
        for (l, lw) in self.weights.layers.iter().enumerate() {
            let (shape, opts) = (self.attn_shape(l, n), self.attn_opts(l));
            let rl = rope_for(&rope, &rope_f, shape.head_dim);
            let (xn1, inv_rms1) = timed(F, K::Norm, || rmsnorm_forward(&x, h, &lw.attn_norm.data, c.rms_norm_eps));
            let (mut q, mut k, v) = timed(F, K::QkvProj, || {
                (lw.q_proj.forward(&xn1, n), lw.k_proj.forward(&xn1, n), lw.v_proj.forward(&xn1, n))
            });
            drop(xn1);
            timed(F, K::Rope, || {
                rl.apply(&mut q, n, c.num_heads, c.rope_layout);
                rl.apply(&mut k, n, c.num_kv_heads, c.rope_layout);
            });
            let attn = timed(F, K::Attention, || match c.layer_plan(l) {
                Some(plan) => AttnCache::forward_built_in(q, k, v, shape, opts, plan),
                None => AttnCache::forward(q, k, v, shape, opts, policy),
            })?;
            let mut x_mid = timed(F, K::OProj, || lw.o_proj.forward(attn.o(), n));
            timed(F, K::Residual, || add_inplace(&mut x_mid, &x));
            let (xn2, inv_rms2) = timed(F, K::Norm, || rmsnorm_forward(&x_mid, h, &lw.mlp_norm.data, c.rms_norm_eps));
            let (gate, up) = timed(F, K::GateUp, || (lw.gate_proj.forward(&xn2, n), lw.up_proj.forward(&xn2, n)));
            drop(xn2);
            let act = timed(F, K::Activation, || swiglu_forward(&gate, &up));
            let mut x_out = timed(F, K::DownProj, || lw.down_proj.forward(&act, n));
            timed(F, K::Residual, || add_inplace(&mut x_out, &x_mid));
            layers.push(LayerCache { x_in: x, inv_rms1, attn, x_mid, inv_rms2, gate, up });
            x = x_out;
        }
        let (hidden, inv_rms_final) =
            timed(F, K::Norm, || rmsnorm_forward(&x, h, &self.weights.final_norm.data, c.rms_norm_eps));
        Ok(ForwardCache { ids: Vec::new(), n, layers, x_final: x, inv_rms_final, hidden, rope, rope_f })
    }

    /// [`Model::lm_loss`].
    fn default_loss(&self, cache: &ForwardCache<T>, grads: &mut Grads<T>) -> Result<(f64, Vec<T>)> {
        self.lm_loss(cache, grads)
    }

    /// Backward from `dL/d hidden` of the final normed hidden states: final RMSNorm, then each
    /// layer's MLP and attention block in reverse, then (when the cache has ids) the embedding
    /// table. The LM head is untouched.
    fn backward_hidden_into(&self, cache: &ForwardCache<T>, dhidden: &[T], grads: &mut Grads<T>) -> Result<()> {
        let c = &self.cfg;
        let (n, h) = (cache.n, c.hidden_size);
        check_rows("dhidden", dhidden, n, h)?;
        let mut dx = timed(B, K::Norm, || {
            rmsnorm_backward(
                &cache.x_final,
                h,
                &self.weights.final_norm.data,
                &cache.inv_rms_final,
                dhidden,
                &mut grads.weights.final_norm.data,
            )
        });
        for (l, (lw, lc)) in self.weights.layers.iter().zip(&cache.layers).enumerate().rev() {
            let lg = &mut grads.weights.layers[l];
            // MLP block: x_out = x_mid + down(swiglu(gate(n2), up(n2)))
            let act = timed(B, K::Activation, || swiglu_forward(&lc.gate, &lc.up));
            let dact = timed(B, K::DownProj, || lw.down_proj.backward(&act, n, &dx, &mut lg.down_proj));
            drop(act);
            let (dgate, dup) = timed(B, K::Activation, || swiglu_backward(&lc.gate, &lc.up, &dact));
            let (xn2, _) = timed(B, K::Norm, || rmsnorm_forward(&lc.x_mid, h, &lw.mlp_norm.data, c.rms_norm_eps));
            let dxn2 = timed(B, K::GateUp, || {
                let mut dxn2 = lw.gate_proj.backward(&xn2, n, &dgate, &mut lg.gate_proj);
                add_inplace(&mut dxn2, &lw.up_proj.backward(&xn2, n, &dup, &mut lg.up_proj));
                dxn2
            });
            drop(xn2);
            let dmid = timed(B, K::Norm, || {
                rmsnorm_backward(&lc.x_mid, h, &lw.mlp_norm.data, &lc.inv_rms2, &dxn2, &mut lg.mlp_norm.data)
            });
            timed(B, K::Residual, || add_inplace(&mut dx, &dmid)); // residual: dx now = dL/d x_mid
                                                                   // Attention block: x_mid = x_in + o_proj(attn(q, k, v))
            let dattn = timed(B, K::OProj, || lw.o_proj.backward(lc.attn.o(), n, &dx, &mut lg.o_proj));
            let ag = timed(B, K::Attention, || lc.attn.backward(&dattn))?;
            let (mut dq, mut dk) = (ag.dq, ag.dk);
            let rl = rope_for(&cache.rope, &cache.rope_f, c.qk_head_dim(l));
            timed(B, K::Rope, || {
                rl.apply_inverse(&mut dq, n, c.num_heads, c.rope_layout);
                rl.apply_inverse(&mut dk, n, c.num_kv_heads, c.rope_layout);
            });
            let (xn1, _) = timed(B, K::Norm, || rmsnorm_forward(&lc.x_in, h, &lw.attn_norm.data, c.rms_norm_eps));
            let dxn1 = timed(B, K::QkvProj, || {
                let mut dxn1 = lw.q_proj.backward(&xn1, n, &dq, &mut lg.q_proj);
                add_inplace(&mut dxn1, &lw.k_proj.backward(&xn1, n, &dk, &mut lg.k_proj));
                add_inplace(&mut dxn1, &lw.v_proj.backward(&xn1, n, &ag.dv, &mut lg.v_proj));
                dxn1
            });
            drop(xn1);
            let din = timed(B, K::Norm, || {
                rmsnorm_backward(&lc.x_in, h, &lw.attn_norm.data, &lc.inv_rms1, &dxn1, &mut lg.attn_norm.data)
            });
            timed(B, K::Residual, || add_inplace(&mut dx, &din)); // residual: dx now = dL/d x_in
            grads.record_layer_dx(&dx);
        }
        if !cache.ids.is_empty() {
            timed(B, K::Embedding, || embedding_backward(&cache.ids, &dx, h, &mut grads.weights.embed.data));
        }
        grads.embeddings = dx;
        Ok(())
    }

    /// Backward from any `dL/d logits [n, vocab]` (`logits = hidden · headᵀ`): the LM head's
    /// gradient (into the embedding when tied), then [`Network::backward_hidden_into`].
    fn backward_from_logits(&self, cache: &ForwardCache<T>, dlogits: &[T]) -> Result<Grads<T>> {
        let (n, h, vocab) = (cache.n, self.cfg.hidden_size, self.cfg.vocab_size);
        check_rows("dlogits", dlogits, n, vocab)?;
        let mut grads = self.zero_grads(n);
        let head = self.weights.head_weight();
        let dhead = &mut grads.weights.head_weight_mut().data;
        let dhidden = linear_backward(&cache.hidden, n, &head.data, vocab, h, dlogits, dhead, None);
        self.backward_hidden_into(cache, &dhidden, &mut grads)?;
        Ok(grads)
    }
}
