//! The main job as a library: one forward + backward pass of any loaded model with a given
//! attention policy, and the per-layer comparison of two passes (approximate vs exact) that
//! `altgrad grad --compare` reports (ARCHITECTURE "grad --json keys").

use crate::attention::mixed::HeadPlan;
use crate::error::check_finite_result;
use crate::io::AnyModel;
use crate::linalg::{rel_err, Scalar};
use crate::model::bert::pooled_norm_loss;
use crate::model::{AttentionPolicy, HeadDecision};
use crate::report::{Compare, HeadReport, LayerCompare};
use crate::{Error, Result};
use std::time::Instant;

/// A named tensor `(name, shape, values)`, as written to safetensors.
pub type NamedTensor<T> = (String, Vec<usize>, Vec<T>);

/// Per-layer `(q, k)` of a forward pass.
type LayerQk<T> = Vec<(Vec<T>, Vec<T>)>;

/// What one forward + backward pass produced.
#[derive(Clone, Debug)]
pub struct Pass<T> {
    /// Loss value (decoders: mean next-token cross-entropy; encoders: `0.5·‖mean-pooled hidden‖²`).
    pub loss: f64,
    /// Name of the loss, for display.
    pub loss_name: &'static str,
    /// Forward seconds (loss included).
    pub t_fwd: f64,
    /// Backward seconds.
    pub t_bwd: f64,
    /// Final hidden states `[n, hidden]`.
    pub hidden: Vec<T>,
    /// Model width.
    pub hidden_size: usize,
    /// Every parameter's gradient `(name, shape, values)`, then `embeddings_grad [n, hidden]`.
    pub grads: Vec<NamedTensor<T>>,
    /// For each layer, the indices into `grads` of its parameters.
    pub layer_params: Vec<Vec<usize>>,
    /// `dL/d(input of layer l) [n, hidden]`, first to last layer.
    pub layer_dx: Vec<Vec<T>>,
    /// Each layer's per-head decisions.
    pub decisions: Vec<Vec<HeadDecision>>,
}

fn collect<T: Scalar>(
    params: Vec<&crate::model::Param<T>>,
    layer_names: Vec<Vec<String>>,
    embeddings: Vec<T>,
    hidden: usize,
) -> (Vec<NamedTensor<T>>, Vec<Vec<usize>>) {
    let mut grads: Vec<_> = params.into_iter().map(|p| (p.name.clone(), p.shape.clone(), p.data.clone())).collect();
    let index: std::collections::HashMap<&str, usize> =
        grads.iter().enumerate().map(|(i, g)| (g.0.as_str(), i)).collect();
    let layer_params = layer_names.iter().map(|names| names.iter().map(|n| index[n.as_str()]).collect()).collect();
    grads.push(("embeddings_grad".into(), vec![embeddings.len() / hidden, hidden], embeddings));
    (grads, layer_params)
}

/// Runs forward (with `policy`), the model's default loss, and backward over `ids`.
///
/// Errors: bad ids (naming `input`), fewer than 2 tokens for decoders, invalid plans, and a
/// non-finite forward output, loss or gradient (`BadInput` naming the stage and what to change:
/// float64, a lower degree) — finite inputs whose intermediates overflowed never pass silently.
pub fn run_pass<T: Scalar>(model: &AnyModel<T>, ids: &[u32], input: &str, policy: &AttentionPolicy) -> Result<Pass<T>> {
    let pass = run_pass_unchecked(model, ids, input, policy)?;
    let advice = overflow_advice::<T>(policy);
    check_finite_result(&format!("loss ({})", pass.loss_name), &[pass.loss], &advice)?;
    for (name, _, g) in &pass.grads {
        check_finite_result(&format!("gradient {name}"), g, &advice)?;
    }
    Ok(pass)
}

/// What to change when a pass with `policy` in `T` overflowed.
fn overflow_advice<T: Scalar>(policy: &AttentionPolicy) -> String {
    let f32 = T::DTYPE != "F64";
    match (policy, f32) {
        (AttentionPolicy::Fixed(HeadPlan::Exact), true) => "use --dtype f64 (float64)".into(),
        (AttentionPolicy::Fixed(HeadPlan::Exact), false) => {
            "it overflows even in float64: check the model's weights and inputs".into()
        }
        (AttentionPolicy::Fixed(p), true) => {
            format!("use --dtype f64 (float64) or a lower --degree than {}", p.degree().unwrap_or(2))
        }
        (AttentionPolicy::Fixed(p), false) => format!("use a lower --degree than {}", p.degree().unwrap_or(2)),
        (_, true) => "use --dtype f64 (float64), a lower --tol or --attention exact".into(),
        (_, false) => "use a lower --tol or --attention exact".into(),
    }
}

/// Checks the forward's final hidden states before the loss is taken from them.
fn check_forward<T: Scalar>(hidden: &[T], policy: &AttentionPolicy) -> Result<()> {
    check_finite_result("forward pass (final hidden states)", hidden, &overflow_advice::<T>(policy))
}

fn run_pass_unchecked<T: Scalar>(
    model: &AnyModel<T>,
    ids: &[u32],
    input: &str,
    policy: &AttentionPolicy,
) -> Result<Pass<T>> {
    match model {
        AnyModel::Llama(m) => {
            m.check_ids(ids, input)?;
            if ids.len() < 2 {
                return Err(Error::bad(input, "the next-token loss needs at least 2 token ids"));
            }
            let t0 = Instant::now();
            let cache = m.forward_with(ids, policy)?;
            check_forward(&cache.hidden, policy)?;
            let mut grads = m.zero_grads(ids.len());
            grads.layer_dx = Some(Vec::new());
            let (loss, dhidden) = m.lm_loss(&cache, &mut grads)?;
            let t_fwd = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            m.backward_hidden_into(&cache, &dhidden, &mut grads)?;
            let t_bwd = t1.elapsed().as_secs_f64();
            let layer_names =
                grads.weights.layers.iter().map(|l| l.params().iter().map(|p| p.name.clone()).collect()).collect();
            let layer_dx = grads.layer_dx.take().unwrap_or_default();
            let (g, layer_params) =
                collect(grads.weights.params(), layer_names, grads.embeddings.clone(), m.cfg.hidden_size);
            Ok(Pass {
                loss,
                loss_name: "mean next-token cross-entropy",
                t_fwd,
                t_bwd,
                hidden: cache.hidden.clone(),
                hidden_size: m.cfg.hidden_size,
                grads: g,
                layer_params,
                layer_dx,
                decisions: cache.layers.iter().map(|l| l.decisions.clone()).collect(),
            })
        }
        AnyModel::Bert(m) => {
            m.check_ids(ids, input)?;
            let t0 = Instant::now();
            let cache = m.forward_with(ids, policy)?;
            check_forward(&cache.hidden, policy)?;
            let (loss, dhidden) = pooled_norm_loss(&cache.hidden, ids.len());
            let t_fwd = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let mut grads = m.backward_from_hidden(&cache, &dhidden)?;
            let t_bwd = t1.elapsed().as_secs_f64();
            let layer_names =
                grads.weights.layers.iter().map(|l| l.params().iter().map(|p| p.name.clone()).collect()).collect();
            let layer_dx = std::mem::take(&mut grads.layer_dx);
            let (g, layer_params) =
                collect(grads.weights.params(), layer_names, grads.embeddings.clone(), m.cfg.hidden_size);
            Ok(Pass {
                loss,
                loss_name: "0.5·‖mean-pooled final hidden‖²",
                t_fwd,
                t_bwd,
                hidden: cache.hidden.clone(),
                hidden_size: m.cfg.hidden_size,
                grads: g,
                layer_params,
                layer_dx,
                decisions: cache.layers.iter().map(|l| l.decisions.clone()).collect(),
            })
        }
    }
}

/// Every head's decision in report form (`heads` of the JSON contract).
pub fn head_reports<T>(pass: &Pass<T>) -> Vec<HeadReport> {
    pass.decisions
        .iter()
        .enumerate()
        .flat_map(|(layer, ds)| {
            ds.iter().enumerate().map(move |(head, d)| HeadReport {
                layer,
                head,
                method: d.plan.method_name().to_string(),
                bound: Some(d.bound),
                degree: d.plan.degree(),
                rank: d.rank,
                predicted_rel_err: d.predicted_rel_err,
            })
        })
        .collect()
}

/// Per-layer and total relative errors of `approx` against `exact` (MATH §1: `‖x − y‖/‖y‖`):
/// `rel_err_dx` of dL/d(layer input), `rel_err_dw` of the layer's weight gradients concatenated,
/// `rel_err_total` over all parameter gradients (not the input embeddings), and the backward
/// speed-up `exact.t_bwd / approx.t_bwd`.
pub fn compare<T: Scalar>(approx: &Pass<T>, exact: &Pass<T>) -> Compare {
    let flat = |p: &Pass<T>, idx: &mut dyn Iterator<Item = usize>| -> Vec<T> {
        idx.flat_map(|i| p.grads[i].2.iter().copied()).collect()
    };
    let n_params = approx.grads.len() - 1; // last entry is embeddings_grad
    let layers = (0..approx.layer_params.len())
        .map(|l| LayerCompare {
            layer: l,
            rel_err_dx: rel_err(&approx.layer_dx[l], &exact.layer_dx[l]),
            rel_err_dw: rel_err(
                &flat(approx, &mut approx.layer_params[l].iter().copied()),
                &flat(exact, &mut exact.layer_params[l].iter().copied()),
            ),
        })
        .collect();
    Compare {
        loss_exact: exact.loss,
        speedup: exact.t_bwd / approx.t_bwd.max(1e-12),
        rel_err_total: rel_err(&flat(approx, &mut (0..n_params)), &flat(exact, &mut (0..n_params))),
        layers,
    }
}

/// One head's census line (`altgrad inspect`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct InspectHead {
    /// Layer index, from 0.
    pub layer: usize,
    /// Query head index.
    pub head: usize,
    /// Largest `|τ q_i·k_j|` over allowed pairs (measured exactly, O(n²d)).
    pub max_abs_score: f64,
    /// Score bound R after the row shift (MATH §3).
    pub bound: f64,
    /// Score bound R without the row shift.
    pub bound_unshifted: f64,
    /// Smallest even degree with `ε_A(R, g) ≤ tol`; `null` when none ≤ 8 does.
    pub degree: Option<usize>,
    /// Feature width `r = C(d+g, g)` of that degree.
    pub rank: Option<usize>,
    /// What `--attention auto` would use: `poly` or `exact`.
    pub method: String,
    /// Why.
    pub reason: String,
}

/// The census of every head of a model on `ids` (exact forward): scores, bounds, the degree a
/// tolerance needs, and the `auto` choice.
///
/// Errors: bad ids (naming `input`).
pub fn inspect<T: Scalar>(
    model: &AnyModel<T>,
    ids: &[u32],
    input: &str,
    tol: f64,
    max_rank: usize,
) -> Result<Vec<InspectHead>> {
    use crate::attention::bound::{choose_degree, Policy, MAX_AUTO_DEGREE};
    use crate::attention::features::feature_dim;
    use crate::attention::{head_bounds, head_max_scores, AttnOptions, AttnShape};
    let (qk, shape, causal): (LayerQk<T>, AttnShape, bool) = match model {
        AnyModel::Llama(m) => {
            let c = m.forward(ids).map_err(|e| relabel(e, input))?;
            let s = AttnShape::new(ids.len(), m.cfg.num_heads, m.cfg.num_kv_heads, m.cfg.head_dim);
            (c.layers.into_iter().map(|l| (l.q, l.k)).collect(), s, true)
        }
        AnyModel::Bert(m) => {
            let c = m.forward(ids).map_err(|e| relabel(e, input))?;
            let s = AttnShape::new(ids.len(), m.cfg.num_heads, m.cfg.num_heads, m.cfg.head_dim);
            (c.layers.into_iter().map(|l| (l.q, l.k)).collect(), s, false)
        }
    };
    let opts = AttnOptions::standard(shape.head_dim, causal);
    let mut out = Vec::new();
    for (layer, (q, k)) in qk.iter().enumerate() {
        let maxs = head_max_scores(q, k, &shape, &opts)?;
        let r_shift = head_bounds(q, k, &shape, &opts, true)?;
        let r_raw = head_bounds(q, k, &shape, &opts, false)?;
        for head in 0..shape.num_heads {
            let g = choose_degree(r_shift[head], tol, MAX_AUTO_DEGREE);
            let p = Policy::choose(ids.len(), shape.head_dim, shape.head_dim_v, causal, r_shift[head], tol, max_rank);
            out.push(InspectHead {
                layer,
                head,
                max_abs_score: maxs[head],
                bound: r_shift[head],
                bound_unshifted: r_raw[head],
                degree: g,
                rank: g.and_then(|g| feature_dim(shape.head_dim, g)),
                method: p.method.to_string(),
                reason: p.reason,
            });
        }
    }
    Ok(out)
}

fn relabel(e: Error, input: &str) -> Error {
    match e {
        Error::BadInput { input: i, msg } if i == "tokens" => Error::BadInput { input: input.to_string(), msg },
        other => other,
    }
}
