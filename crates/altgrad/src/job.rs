//! The main job as a library: one forward + backward pass of any loaded model with a given
//! attention policy, the per-layer comparison of two passes (approximate vs exact) that
//! `altgrad grad --compare` reports (ARCHITECTURE "grad --json keys"), and the assembly of the
//! `grad` and `inspect` reports ([`grad_run`], [`inspect_report`]) shared by the CLI and the
//! Python package, so both produce the same objects.

use crate::attention::bound::validate_degree;
use crate::attention::{Budget, HeadPlan, Method, PolyOptions};
use crate::error::check_finite_result;
use crate::io::{AnyModel, Loaded};
use crate::linalg::{rel_err, Scalar};
use crate::model::{Activations, AttentionPolicy, HeadDecision, Network, ParamSet};
use crate::report::{Compare, GradReport, HeadReport, InspectReport, LayerCompare, Timing};
use crate::{Error, Result};
use std::time::Instant;

pub use crate::report::InspectHead;

/// A named tensor `(name, shape, values)`, as written to safetensors.
pub type NamedTensor<T> = (String, Vec<usize>, Vec<T>);

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
        (AttentionPolicy::Forced { degree: Some(g), .. }, true) => {
            format!("use --dtype f64 (float64) or a lower --degree than {g}")
        }
        (AttentionPolicy::Forced { degree: Some(g), .. }, false) => format!("use a lower --degree than {g}"),
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
        AnyModel::Llama(m) => run_pass_on(m, ids, input, policy),
        AnyModel::Bert(m) => run_pass_on(m, ids, input, policy),
    }
}

/// [`run_pass`] on any [`Network`]: forward with `policy` and the family's default loss (timed as
/// `t_fwd`), then the backward recording each layer's input gradient (timed as `t_bwd`).
///
/// Errors: bad ids (naming `input`), fewer than 2 tokens for decoders, invalid plans.
pub fn run_pass_on<T: Scalar, N: Network<T>>(
    model: &N,
    ids: &[u32],
    input: &str,
    policy: &AttentionPolicy,
) -> Result<Pass<T>> {
    model.check_loss_ids(ids, input)?;
    let summary = model.summary();
    let t0 = Instant::now();
    let cache = model.forward_with(ids, policy)?;
    check_forward(cache.hidden(), policy)?;
    let mut grads = model.zero_grads(ids.len());
    grads.layer_dx = Some(Vec::new());
    let (loss, dhidden) = model.default_loss(&cache, &mut grads)?;
    let t_fwd = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    model.backward_hidden_into(&cache, &dhidden, &mut grads)?;
    let t_bwd = t1.elapsed().as_secs_f64();
    let layer_dx = grads.layer_dx.take().unwrap_or_default();
    let mut named: Vec<NamedTensor<T>> =
        grads.weights.params().into_iter().map(|p| (p.name.clone(), p.shape.clone(), p.data.clone())).collect();
    let index: std::collections::HashMap<&str, usize> =
        named.iter().enumerate().map(|(i, g)| (g.0.as_str(), i)).collect();
    let layer_params =
        grads.weights.layer_params().iter().map(|ps| ps.iter().map(|p| index[p.name.as_str()]).collect()).collect();
    let h = summary.hidden_size;
    named.push(("embeddings_grad".into(), vec![grads.embeddings.len() / h, h], grads.embeddings));
    Ok(Pass {
        loss,
        loss_name: summary.family.loss_name(),
        t_fwd,
        t_bwd,
        hidden: cache.hidden().to_vec(),
        hidden_size: h,
        grads: named,
        layer_params,
        layer_dx,
        decisions: cache.attention().iter().map(|a| a.decisions.clone()).collect(),
    })
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
                estimate: d.estimate,
                decided_by: d.decided_by.map(|x| x.as_str().to_string()),
                true_rel_err_o: None,
                true_rel_err_dq: None,
            })
        })
        .collect()
}

/// Per-layer and total relative errors of `approx` against `exact` (MATH §1: `‖x − y‖/‖y‖`):
/// `rel_err_dx` of dL/d(layer input), `rel_err_dw` of the layer's weight gradients concatenated,
/// `rel_err_total` over all parameter gradients (not the input embeddings), and the backward
/// speed-up `exact.t_bwd / approx.t_bwd` — `None` when every head of `approx` ran exact attention
/// (both sides the same method: their ratio is timing noise, not a result).
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
        speedup: (!same_as_exact(approx)).then(|| exact.t_bwd / approx.t_bwd.max(1e-12)),
        rel_err_total: rel_err(&flat(approx, &mut (0..n_params)), &flat(exact, &mut (0..n_params))),
        layers,
    }
}

/// True `(output, query-gradient)` relative errors, `[layer][head]` ([`true_head_errors`]).
pub type HeadErrors = Vec<Vec<Option<(f64, f64)>>>;

/// For every head whose decision carries a measured estimate (`auto`), the true relative errors
/// `(‖Õ − O‖_F/‖O‖_F, ‖dQ̃ − dQ‖_F/‖dQ‖_F)` of the estimate's degree on that head's own inputs
/// (`dQ` for an upstream gradient of i.i.d. standard normal entries, as the estimate's): a forward
/// with `policy` over `ids`, then per head the full polynomial forward and backward
/// ([`crate::attention::forward_poly`]) and the exact ones ([`crate::attention::forward_exact`]),
/// heads in parallel. `[layer][head]`, `None` where nothing was estimated. What `--compare` checks the estimate against (docs/RESULTS.md).
///
/// Errors: those of the forward.
pub fn true_head_errors<T: Scalar>(model: &AnyModel<T>, ids: &[u32], policy: &AttentionPolicy) -> Result<HeadErrors> {
    match model {
        AnyModel::Llama(m) => true_head_errors_on(m, ids, policy),
        AnyModel::Bert(m) => true_head_errors_on(m, ids, policy),
    }
}

fn true_head_errors_on<T: Scalar, N: Network<T>>(
    model: &N,
    ids: &[u32],
    policy: &AttentionPolicy,
) -> Result<HeadErrors> {
    use crate::attention::{backward_exact, backward_poly, forward_exact, forward_poly, AttnShape, Qkv};
    use rayon::prelude::*;
    let cache = model.forward_with(ids, policy)?;
    cache
        .attention()
        .into_iter()
        .map(|a| {
            let s = a.shape;
            (0..s.num_heads)
                .into_par_iter()
                .map(|h| {
                    let d = &a.decisions[h];
                    let Some(e) = d.estimate else { return Ok(None) };
                    let kv = h / s.group();
                    let (q, k, v) = (s.query(&a.q, h).to_vec(), s.key(&a.k, kv).to_vec(), s.value(&a.v, kv).to_vec());
                    let one = AttnShape::new(s.seq_len, 1, 1, s.head_dim).with_head_dim_v(s.head_dim_v);
                    let x = Qkv::new(&q, &k, &v, &one)?;
                    let chunk = d.plan.options().map_or(crate::attention::poly::DEFAULT_CHUNK, |p| p.chunk);
                    let p = PolyOptions { degree: e.degree, center: d.center, chunk };
                    let (approx, exact) = (forward_poly(&x, &a.opts, &p)?, forward_exact(&x, &a.opts)?);
                    // dL/dq for an upstream gradient of i.i.d. standard normal entries (seeded by head)
                    let g = crate::attention::estimate::normal_vec::<T>(exact.o.len(), 0x7255_7E00 + h as u64);
                    let (ga, ge) = (backward_poly(&x, &approx, &g)?, backward_exact(&x, &exact, &g)?);
                    Ok(Some((rel_err(&approx.o, &exact.o), rel_err(&ga.dq, &ge.dq))))
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect()
}

/// The census of every head of a model on `ids` (exact forward): scores, bounds, the degree a
/// tolerance needs, and the `auto` choice.
///
/// Errors: bad ids (naming `input`); a `tol` that is not a positive number (naming `tol`).
pub fn inspect<T: Scalar>(
    model: &AnyModel<T>,
    ids: &[u32],
    input: &str,
    tol: f64,
    max_rank: usize,
) -> Result<Vec<InspectHead>> {
    match model {
        AnyModel::Llama(m) => inspect_on(m, ids, input, tol, max_rank),
        AnyModel::Bert(m) => inspect_on(m, ids, input, tol, max_rank),
    }
}

/// [`inspect`] on any [`Network`]: an exact forward, then every layer's `q`, `k` (after RoPE for
/// decoders) measured head by head.
///
/// Errors: bad ids (naming `input`).
pub fn inspect_on<T: Scalar, N: Network<T>>(
    model: &N,
    ids: &[u32],
    input: &str,
    tol: f64,
    max_rank: usize,
) -> Result<Vec<InspectHead>> {
    use crate::attention::bound::{choose_degree, ScoreBounds, MAX_AUTO_DEGREE};
    use crate::attention::estimate::{estimate_poly_error, EstimateSpec};
    use crate::attention::features::feature_dim;
    use crate::attention::Policy;
    use crate::attention::{head_bounds, head_max_scores};
    check_tol(tol)?;
    let cache = model.forward(ids).map_err(|e| relabel(e, input))?;
    let mut out = Vec::new();
    for (layer, a) in cache.attention().into_iter().enumerate() {
        let (q, k, shape, opts) = (&a.q, &a.k, &a.shape, &a.opts);
        let maxs = head_max_scores(q, k, shape, opts)?;
        let r_shift = head_bounds(q, k, shape, opts, true)?;
        let r_raw = head_bounds(q, k, shape, opts, false)?;
        for head in 0..shape.num_heads {
            let g = choose_degree(r_shift[head], tol, MAX_AUTO_DEGREE);
            let (n, kv) = (shape.seq_len, head / shape.group());
            let (qh, kh, vh) = (shape.query(q, head), shape.key(k, kv), shape.value(&a.v, kv));
            let mut measure = |gs: &[usize], center: bool| {
                estimate_poly_error(&qh, &kh, &vh, &EstimateSpec::new(n, opts.scale, opts.is_causal(), center), gs)
            };
            let bounds = ScoreBounds { shifted: r_shift[head], unshifted: r_raw[head] };
            let p = Policy::choose(
                n,
                shape.head_dim,
                shape.head_dim_v,
                opts.is_causal(),
                bounds,
                tol,
                max_rank,
                &mut measure,
            );
            out.push(InspectHead {
                layer,
                head,
                max_abs_score: maxs[head],
                bound: r_shift[head],
                bound_unshifted: r_raw[head],
                degree: g,
                rank: g.and_then(|g| feature_dim(shape.head_dim, g)),
                method: p.method.to_string(),
                auto_degree: p.degree,
                estimate: p.estimate,
                decided_by: p.decided_by.as_str().to_string(),
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

fn check_tol(tol: f64) -> Result<()> {
    if !(tol.is_finite() && tol > 0.0) {
        return Err(Error::bad("tol", format!("must be a positive number, got {tol}")));
    }
    Ok(())
}

/// The attention policy of a `grad` run from its request (the CLI's `--attention`, `--degree`,
/// `--tol`, `--chunk`, `--no-center`, `--max-rank`; the Python `Model.loss_and_grads` arguments):
///
/// - `exact`: every head exact (the other arguments are ignored);
/// - `poly` / `altgrad` with a degree: every head with that degree (MATH §3–5);
/// - `poly` / `altgrad` without one: per head the smallest even degree meeting `tol`;
/// - `auto`: per head the cheapest degree cheaper than exact that the bound or the measured
///   estimate admits within `tol` (`r ≤ max_rank`), else exact.
///
/// Forced poly / altgrad runs are refused before their first layer runs when its predicted cost
/// exceeds `budget` ([`Budget::check`]; [`Budget::UNLIMITED`] for `--force`).
///
/// Errors: [`Error::BadInput`] naming `attention` (unknown method), `degree` (odd or zero, or given
/// with `auto`), `tol` (not a positive number), `chunk` (zero) or `max-slowdown` / `max-memory`
/// (not positive). The CLI prefixes the names with `--`.
pub fn attention_policy(
    method: &str,
    degree: Option<usize>,
    tol: f64,
    chunk: usize,
    center: bool,
    max_rank: usize,
    budget: Budget,
) -> Result<AttentionPolicy> {
    check_tol(tol)?;
    if budget.max_slowdown.is_nan() || budget.max_slowdown <= 0.0 {
        return Err(Error::bad("max-slowdown", format!("must be a positive number, got {}", budget.max_slowdown)));
    }
    if budget.max_memory.is_nan() || budget.max_memory <= 0.0 {
        return Err(Error::bad("max-memory", "must be a positive number of GiB"));
    }
    if chunk == 0 {
        return Err(Error::bad("chunk", "must be at least 1"));
    }
    if let Some(g) = degree {
        validate_degree(g)?;
    }
    if method == "auto" {
        if degree.is_some() {
            return Err(Error::bad("degree", "auto chooses degrees itself; use attention poly with a degree"));
        }
        return Ok(AttentionPolicy::Auto { tol, max_rank, chunk });
    }
    let method = Method::from_name(method)
        .ok_or_else(|| Error::bad("attention", format!("expected {} or auto, got `{method}`", Method::names(", "))))?;
    if method == Method::Exact {
        return Ok(AttentionPolicy::EXACT);
    }
    Ok(AttentionPolicy::Forced { method, degree, budget, tol, chunk, center })
}

/// Number of transformer layers of a loaded model.
pub fn num_layers<T>(model: &AnyModel<T>) -> usize {
    match model {
        AnyModel::Llama(m) => m.cfg.num_layers,
        AnyModel::Bert(m) => m.cfg.num_layers,
    }
}

/// What [`grad_run`] produced: the pass with the requested policy, the exact pass when
/// comparing, and the `grad --json` report of both.
#[derive(Clone, Debug)]
pub struct GradRun<T> {
    /// The pass with the requested policy (loss, gradients, decisions).
    pub pass: Pass<T>,
    /// The exact pass (`compare` only).
    pub exact: Option<Pass<T>>,
    /// The report, exactly what `altgrad grad --json` writes.
    pub report: GradReport,
}

/// Whether every head of `pass` ran exact attention or its layer's built-in attention (which the
/// exact pass runs too): then both passes compute the same function.
pub fn same_as_exact<T>(pass: &Pass<T>) -> bool {
    pass.decisions.iter().flatten().all(|d| d.plan == HeadPlan::Exact || d.is_built_in())
}

/// Timed repetitions of each pass under `--compare` (interleaved; medians reported).
pub const COMPARE_REPS: usize = 3;

/// The median of `xs` (non-empty; the mean of the middle two for an even count).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        0.5 * (xs[m - 1] + xs[m])
    }
}

/// The whole `grad` job on `ids`: (with `compare`, a short exact warm-up so neither timed pass
/// pays for thread start-up), the pass with `policy`, the exact pass when `compare` — then [`COMPARE_REPS`] interleaved
/// runs of each, whose median times are reported — and the
/// report (`attention` is the requested method's name: `exact`, `poly`, `altgrad` or `auto`).
/// `phase` is told what runs next (for a spinner); the library prints nothing.
///
/// Errors: those of [`run_pass`].
#[allow(clippy::too_many_arguments)]
pub fn grad_run<T: Scalar>(
    loaded: &Loaded<T>,
    ids: &[u32],
    input: &str,
    policy: &AttentionPolicy,
    attention: &str,
    compare: bool,
    phase: &dyn Fn(&str),
) -> Result<GradRun<T>> {
    let n = ids.len();
    if compare {
        let warm = &ids[..n.min(128)];
        let _ = run_pass(&loaded.model, warm, input, &AttentionPolicy::EXACT);
    }
    phase(&format!("forward + backward ({}, {n} tokens)", policy.name()));
    let mut pass = run_pass(&loaded.model, ids, input, policy)?;
    let exact = if compare {
        // COMPARE_REPS timed runs of each side, interleaved so that both see the same machine
        // state; the reported times are medians (the gradients are those of the last runs: the
        // passes are deterministic).
        let (mut fwd, mut bwd, mut ebwd) = (vec![pass.t_fwd], vec![pass.t_bwd], Vec::new());
        let mut exact = None;
        for rep in 0..COMPARE_REPS {
            phase(&format!("exact forward + backward for --compare ({n} tokens, run {} of {COMPARE_REPS})", rep + 1));
            let e = run_pass(&loaded.model, ids, input, &AttentionPolicy::EXACT)?;
            ebwd.push(e.t_bwd);
            exact = Some(e);
            if rep + 1 < COMPARE_REPS {
                phase(&format!(
                    "forward + backward ({}, {n} tokens, run {} of {COMPARE_REPS})",
                    policy.name(),
                    rep + 2
                ));
                pass = run_pass(&loaded.model, ids, input, policy)?;
                fwd.push(pass.t_fwd);
                bwd.push(pass.t_bwd);
            }
        }
        pass.t_fwd = median(fwd);
        pass.t_bwd = median(bwd);
        exact.map(|mut e| {
            e.t_bwd = median(ebwd);
            e
        })
    } else {
        None
    };
    let mut heads = head_reports(&pass);
    if compare && pass.decisions.iter().flatten().any(|d| d.estimate.is_some()) {
        phase(&format!("true error of each estimated head for --compare ({n} tokens)"));
        let truth = true_head_errors(&loaded.model, ids, policy)?;
        for h in &mut heads {
            let t = truth.get(h.layer).and_then(|l| l.get(h.head)).copied().flatten();
            (h.true_rel_err_o, h.true_rel_err_dq) = (t.map(|x| x.0), t.map(|x| x.1));
        }
    }
    let report = GradReport {
        model: loaded.source().to_string(),
        seq_len: n,
        n_layers: num_layers(&loaded.model),
        // a model built with its attention runs it whatever --attention asked
        attention: if pass.decisions.iter().flatten().all(|d| d.is_built_in()) {
            "built-in".to_string()
        } else {
            attention.to_string()
        },
        loss: pass.loss,
        heads,
        timing_s: Timing { forward: pass.t_fwd, backward: pass.t_bwd, exact_backward: exact.as_ref().map(|e| e.t_bwd) },
        compare: exact.as_ref().map(|e| crate::job::compare(&pass, e)),
    };
    Ok(GradRun { pass, exact, report })
}

/// The `inspect --json` report: [`inspect`]'s census with the model source, length and tolerance.
///
/// Errors: those of [`inspect`].
pub fn inspect_report<T: Scalar>(
    loaded: &Loaded<T>,
    ids: &[u32],
    input: &str,
    tol: f64,
    max_rank: usize,
) -> Result<InspectReport> {
    let heads = inspect(&loaded.model, ids, input, tol, max_rank)?;
    Ok(InspectReport { model: loaded.source().to_string(), seq_len: ids.len(), tol, heads })
}

/// Loads `spec` as the CLI's `--model` does ([`crate::io::load_model`]: `tiny`, `tiny-bounded`, a
/// `.gguf` file, an HF directory, or a training checkpoint directory written by `altgrad train
/// --checkpoint`).
///
/// Errors: those of the loader.
pub fn load_model<T: Scalar>(spec: &str, seed: u64) -> Result<Loaded<T>> {
    crate::io::load_model(spec, seed)
}
