//! The BERT encoder: forward keeping what backward needs, hand-written backward layer m → 1
//! (MATH §6; residuals add the identity path, LSSSZ Lemma J.3), as a [`Network`].
//!
//! Layer `l` (HF `BertLayer`, dropout off):
//! `x₁ = LN₁(x + Wₒ·Attn(W_q x, W_k x, W_v x))`, `x₂ = LN₂(x₁ + W₂·GELU(W₁·x₁))`, every linear map
//! with a bias; attention is non-causal with scale `1/√head_dim`. The final hidden states are the
//! last layer's output (no final norm, no pooler): [`BertCache::hidden`].

use super::config::BertConfig;
use super::weights::BertWeights;
use crate::attention::{AttnOptions, AttnShape};
use crate::linalg::Scalar;
use crate::model::layers::{add_inplace, embedding_backward, gelu_backward, gelu_forward, AttnCache, LayerNormStats};
use crate::model::loss::pooled_norm_loss;
use crate::model::network::{
    check_rows, check_token_ids, impl_activations, Family, Gradients, Network, NetworkSummary,
};
use crate::model::param::check_finite_params;
use crate::model::policy::AttentionPolicy;
use crate::{Error, Result};

/// A BERT encoder: configuration plus named weights.
#[derive(Clone, Debug)]
pub struct BertModel<T> {
    /// Shapes and hyper-parameters.
    pub cfg: BertConfig,
    /// Every parameter, named as in the model file (without a `bert.` prefix).
    pub weights: BertWeights<T>,
    /// Where the model came from (a path, or a description), for reports and errors.
    pub source: String,
}

/// Gradients of an encoder's loss: every parameter (named as the model's weights; the embedding
/// tables get gradients — word rows by id, position rows `0..n`, token-type row 0 — only when the
/// forward had token ids) and `dL/de [n, hidden]`, `e` = word + position + token-type embedding
/// (before the embedding LayerNorm).
pub type BertGrads<T> = Gradients<T, BertWeights<T>>;

/// What one encoder layer's forward keeps for its backward (~`4·hidden + 3·q_dim + inter`
/// values per token; the GELU output is recomputed in backward).
#[derive(Clone, Debug)]
pub struct BertLayerCache<T> {
    /// Layer input `x [n, hidden]`.
    pub x_in: Vec<T>,
    /// Attention: queries, keys, values `[n, num_heads, head_dim]` (biases included), output,
    /// what each head's method keeps for its backward, and each head's decision.
    pub attn: AttnCache<T>,
    /// `x + Wₒ·o + bₒ`, the input of the attention LayerNorm, `[n, hidden]`.
    pub pre_norm1: Vec<T>,
    /// Statistics of the attention LayerNorm.
    pub norm1: LayerNormStats,
    /// `x₁`, the attention LayerNorm's output, `[n, hidden]`.
    pub x1: Vec<T>,
    /// `W₁·x₁ + b₁`, the GELU input, `[n, intermediate]`.
    pub inter: Vec<T>,
    /// `x₁ + W₂·GELU(…) + b₂`, the input of the output LayerNorm, `[n, hidden]`.
    pub pre_norm2: Vec<T>,
    /// Statistics of the output LayerNorm.
    pub norm2: LayerNormStats,
}

/// Everything the backward needs from a forward pass over `n` tokens.
#[derive(Clone, Debug)]
pub struct BertCache<T> {
    /// Token ids (empty when the forward started from embeddings).
    pub ids: Vec<u32>,
    /// Sequence length.
    pub n: usize,
    /// Summed embeddings `e = word + position + token_type` (the embedding LayerNorm's input),
    /// `[n, hidden]`.
    pub embeddings: Vec<T>,
    /// Statistics of the embedding LayerNorm.
    pub embed_norm: LayerNormStats,
    /// Per-layer caches, first to last.
    pub layers: Vec<BertLayerCache<T>>,
    /// Final hidden states: the last layer's output `[n, hidden]` (what `--hidden-out` writes).
    pub hidden: Vec<T>,
}

impl_activations!(BertCache);

impl<T: Scalar> BertModel<T> {
    /// Builds a model from parts, checking the config, every tensor's shape against it, and that
    /// every weight is finite. `source` names the model in errors.
    ///
    /// Errors: `BadInput` naming `source` (an inconsistent config, a layer count, name or shape
    /// that differs from what the config implies, a non-finite weight).
    pub fn new(cfg: BertConfig, weights: BertWeights<T>, source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        cfg.validate(&source)?;
        if weights.layers.len() != cfg.num_layers {
            return Err(Error::bad(
                &source,
                format!("weights have {} layers, config says {}", weights.layers.len(), cfg.num_layers),
            ));
        }
        let want = BertWeights::<T>::zeros(&cfg);
        for (p, z) in weights.params().iter().zip(want.params()) {
            if p.name != z.name || p.shape != z.shape || p.data.len() != z.data.len() {
                return Err(Error::bad(
                    &source,
                    format!(
                        "tensor {} has shape {:?} ({} values), expected {} with shape {:?}",
                        p.name,
                        p.shape,
                        p.data.len(),
                        z.name,
                        z.shape
                    ),
                ));
            }
        }
        check_finite_params(&source, &weights.params())?;
        Ok(BertModel { cfg, weights, source })
    }

    /// Summed input embeddings `e[i] = word[ids[i]] + position[i] + token_type[0]`, `[n, hidden]`
    /// (what [`Network::forward_with`] feeds the embedding LayerNorm).
    ///
    /// Errors: bad ids ([`Network::check_ids`], input `tokens`).
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<T>> {
        self.check_ids(ids, "tokens")?;
        let h = self.cfg.hidden_size;
        let w = &self.weights;
        let tt = &w.token_type_embeddings.data[..h];
        let mut e = Vec::with_capacity(ids.len() * h);
        for (i, &id) in ids.iter().enumerate() {
            let word = &w.word_embeddings.data[id as usize * h..(id as usize + 1) * h];
            let pos = &w.position_embeddings.data[i * h..(i + 1) * h];
            e.extend(word.iter().zip(pos).zip(tt).map(|((&a, &b), &c)| a + b + c));
        }
        Ok(e)
    }

    fn attn_shape(&self, n: usize) -> AttnShape {
        AttnShape::new(n, self.cfg.num_heads, self.cfg.num_heads, self.cfg.head_dim)
    }

    fn attn_opts(&self) -> AttnOptions {
        AttnOptions::full(self.cfg.head_dim)
    }
}

impl<T: Scalar> Network<T> for BertModel<T> {
    type Weights = BertWeights<T>;
    type Cache = BertCache<T>;

    fn summary(&self) -> NetworkSummary {
        let c = &self.cfg;
        NetworkSummary {
            family: Family::Bert,
            num_layers: c.num_layers,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_heads: c.num_heads,
            num_kv_heads: c.num_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
            max_seq_len: c.max_position_embeddings,
            num_params: self.weights.numel(),
        }
    }

    fn source(&self) -> &str {
        &self.source
    }

    fn weights(&self) -> &BertWeights<T> {
        &self.weights
    }

    fn weights_mut(&mut self) -> &mut BertWeights<T> {
        &mut self.weights
    }

    /// Checks token ids: non-empty, at most `max_position_embeddings` of them, each `< vocab_size`.
    fn check_ids(&self, ids: &[u32], input: &str) -> Result<()> {
        let c = &self.cfg;
        check_token_ids(ids, c.vocab_size, c.max_position_embeddings, "max_position_embeddings", input)
    }

    /// Token type 0, positions `0..n`: [`BertModel::embed`], then
    /// [`Network::forward_embeddings_with`]; the cache keeps `ids`.
    fn forward_with(&self, ids: &[u32], policy: &AttentionPolicy) -> Result<BertCache<T>> {
        let e = self.embed(ids)?;
        let mut cache = self.forward_embeddings_with(e, ids.len(), policy)?;
        cache.ids = ids.to_vec();
        Ok(cache)
    }

    /// Forward from summed embeddings `e [n, hidden]` (word + position + token type, before the
    /// embedding LayerNorm). Any `n ≥ 1` is accepted (the position table is not read here).
    ///
    /// Errors: wrong length or non-finite values in `e` (input `embeddings`), invalid plans.
    fn forward_embeddings_with(&self, e: Vec<T>, n: usize, policy: &AttentionPolicy) -> Result<BertCache<T>> {
        let c = &self.cfg;
        let h = c.hidden_size;
        check_rows("embeddings", &e, n, h)?;
        let w = &self.weights;
        let eps = c.layer_norm_eps;
        let (mut x, embed_norm) = w.embed_norm.forward(&e, eps);
        let shape = self.attn_shape(n);
        let opts = self.attn_opts();
        let mut layers = Vec::with_capacity(c.num_layers);
        for lw in &w.layers {
            let q = lw.query.forward(&x, n);
            let k = lw.key.forward(&x, n);
            let v = lw.value.forward(&x, n);
            let attn = AttnCache::forward(q, k, v, shape, opts, policy)?;
            let mut pre_norm1 = lw.attn_out.forward(attn.o(), n);
            add_inplace(&mut pre_norm1, &x);
            let (x1, norm1) = lw.attn_norm.forward(&pre_norm1, eps);
            let inter = lw.intermediate.forward(&x1, n);
            let act = gelu_forward(&inter);
            let mut pre_norm2 = lw.output.forward(&act, n);
            drop(act);
            add_inplace(&mut pre_norm2, &x1);
            let (x2, norm2) = lw.out_norm.forward(&pre_norm2, eps);
            layers.push(BertLayerCache { x_in: x, attn, pre_norm1, norm1, x1, inter, pre_norm2, norm2 });
            x = x2;
        }
        Ok(BertCache { ids: Vec::new(), n, embeddings: e, embed_norm, layers, hidden: x })
    }

    /// [`pooled_norm_loss`] of the final hidden states; reads no parameter, so `grads` is
    /// untouched.
    fn default_loss(&self, cache: &BertCache<T>, _grads: &mut BertGrads<T>) -> Result<(f64, Vec<T>)> {
        Ok(pooled_norm_loss(&cache.hidden, cache.n))
    }

    /// Backward from `dL/d hidden` of the last layer's output: each layer's MLP and attention
    /// block in reverse, the embedding LayerNorm, then (when the cache has ids) the three
    /// embedding tables by scatter-add.
    fn backward_hidden_into(&self, cache: &BertCache<T>, dhidden: &[T], grads: &mut BertGrads<T>) -> Result<()> {
        let c = &self.cfg;
        let (n, h) = (cache.n, c.hidden_size);
        check_rows("dhidden", dhidden, n, h)?;
        let mut dx = dhidden.to_vec(); // dL/d (output of the current layer)
        for (l, (lw, lc)) in self.weights.layers.iter().zip(&cache.layers).enumerate().rev() {
            let lg = &mut grads.weights.layers[l];
            // x₂ = LN₂(x₁ + W₂·GELU(W₁·x₁))
            let dpre2 = lw.out_norm.backward(&lc.pre_norm2, &lc.norm2, &dx, &mut lg.out_norm);
            let act = gelu_forward(&lc.inter);
            let dact = lw.output.backward(&act, n, &dpre2, &mut lg.output);
            drop(act);
            let dinter = gelu_backward(&lc.inter, &dact);
            drop(dact);
            let mut dx1 = lw.intermediate.backward(&lc.x1, n, &dinter, &mut lg.intermediate);
            add_inplace(&mut dx1, &dpre2); // residual: dx1 = dL/d x₁
            drop(dpre2);
            // x₁ = LN₁(x + Wₒ·Attn(q, k, v))
            let dpre1 = lw.attn_norm.backward(&lc.pre_norm1, &lc.norm1, &dx1, &mut lg.attn_norm);
            let do_ = lw.attn_out.backward(lc.attn.o(), n, &dpre1, &mut lg.attn_out);
            let ag = lc.attn.backward(&do_)?;
            let mut dxin = lw.query.backward(&lc.x_in, n, &ag.dq, &mut lg.query);
            add_inplace(&mut dxin, &lw.key.backward(&lc.x_in, n, &ag.dk, &mut lg.key));
            add_inplace(&mut dxin, &lw.value.backward(&lc.x_in, n, &ag.dv, &mut lg.value));
            add_inplace(&mut dxin, &dpre1); // residual: dxin = dL/d x
            dx = dxin;
            grads.record_layer_dx(&dx);
        }
        let de =
            self.weights.embed_norm.backward(&cache.embeddings, &cache.embed_norm, &dx, &mut grads.weights.embed_norm);
        if !cache.ids.is_empty() {
            embedding_backward(&cache.ids, &de, h, &mut grads.weights.word_embeddings.data);
            add_inplace(&mut grads.weights.position_embeddings.data[..n * h], &de);
            let tt = &mut grads.weights.token_type_embeddings.data[..h];
            for row in de.chunks_exact(h) {
                add_inplace(tt, row);
            }
        }
        grads.embeddings = de;
        Ok(())
    }
}
