//! Self-attention as a layer of a model: each head's method chosen by an [`AttentionPolicy`] from
//! the layer's own `q`, `k` (MATH §3 "Bound and degree"), the heads run by
//! [`crate::attention::dispatch`] (exact MATH §2, polynomial §4, ALTGrad §5), and everything the
//! backward needs — inputs, output, per-head state, decisions, shape and options — kept in one
//! [`AttnCache`]. This is the only place the models call [`crate::attention`].

use crate::attention::dispatch::{backward_layer, forward_layer, LayerOutput};
use crate::attention::HeadPlan;
use crate::attention::{AttnGrads, AttnOptions, AttnShape};
use crate::linalg::Scalar;
use crate::model::policy::{decide, AttentionPolicy, HeadDecision, BUILT_IN_REASON};
use crate::Result;

/// One layer's attention: what its forward produced and its backward needs.
#[derive(Clone, Debug)]
pub struct AttnCache<T> {
    /// Queries `[n, num_heads, head_dim]` (decoders: after RoPE).
    pub q: Vec<T>,
    /// Keys `[n, num_kv_heads, head_dim]` (decoders: after RoPE).
    pub k: Vec<T>,
    /// Values `[n, num_kv_heads, head_dim]`.
    pub v: Vec<T>,
    /// Output `o [n, num_heads, head_dim]` and what each head's method keeps for its backward.
    pub out: LayerOutput<T>,
    /// Each head's decision (plan, bound, rank, predicted error), query heads in order.
    pub decisions: Vec<HeadDecision>,
    /// Sequence length and head counts and widths of this call.
    pub shape: AttnShape,
    /// Mask (causal or not) and score scale of this call.
    pub opts: AttnOptions,
}

impl<T: Scalar> AttnCache<T> {
    /// Chooses every head's plan by `policy` from `q`, `k` ([`decide`]) and runs the attention
    /// forward, keeping `q, k, v` (shapes as the fields) and each head's saved state.
    ///
    /// Errors: shape mismatches, invalid plans (odd degree, too large a feature state, …).
    pub fn forward(
        q: Vec<T>,
        k: Vec<T>,
        v: Vec<T>,
        shape: AttnShape,
        opts: AttnOptions,
        policy: &AttentionPolicy,
    ) -> Result<Self> {
        let decisions = decide(policy, &q, &k, &v, &shape, &opts)?;
        let plans: Vec<HeadPlan> = decisions.iter().map(|d| d.plan).collect();
        let out = forward_layer(&q, &k, &v, &shape, &opts, &plans)?;
        Ok(AttnCache { q, k, v, out, decisions, shape, opts })
    }

    /// Runs the attention forward with `plan` for every head: a model's own attention (built in,
    /// [`crate::model::BuiltInAttention`]), so no policy decides and nothing is predicted (the
    /// decisions say so; the bound is measured for reports).
    ///
    /// Errors: shape mismatches, invalid plans.
    pub fn forward_built_in(
        q: Vec<T>,
        k: Vec<T>,
        v: Vec<T>,
        shape: AttnShape,
        opts: AttnOptions,
        plan: HeadPlan,
    ) -> Result<Self> {
        let center = plan.options().is_none_or(|p| p.center);
        let bounds = crate::attention::head_bounds(&q, &k, &shape, &opts, center)?;
        let decisions = bounds
            .into_iter()
            .map(|bound| HeadDecision {
                plan,
                bound,
                center,
                rank: plan.rank(shape.head_dim),
                predicted_rel_err: 0.0,
                estimate: None,
                decided_by: None,
                reason: BUILT_IN_REASON.to_string(),
            })
            .collect();
        let plans = vec![plan; shape.num_heads];
        let out = forward_layer(&q, &k, &v, &shape, &opts, &plans)?;
        Ok(AttnCache { q, k, v, out, decisions, shape, opts })
    }

    /// The attention output `o [n, num_heads, head_dim]`.
    pub fn o(&self) -> &[T] {
        &self.out.o
    }

    /// Each head's plan, query heads in order.
    pub fn plans(&self) -> Vec<HeadPlan> {
        self.decisions.iter().map(|d| d.plan).collect()
    }

    /// Backward of [`AttnCache::forward`] from `dL/do [n, num_heads, head_dim]`: returns
    /// `dq, dk, dv` (shapes of `q, k, v`), each head by its own method's backward (ALTGrad heads:
    /// the paper's Algorithm 1 formula).
    ///
    /// Errors: `d_o` of the wrong length.
    pub fn backward(&self, d_o: &[T]) -> Result<AttnGrads<T>> {
        backward_layer(&self.q, &self.k, &self.v, &self.out, d_o, &self.shape, &self.opts, &self.plans())
    }
}
