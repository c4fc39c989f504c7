//! The paper-claims data: (a) time exponents, (b) error against n at the degree chosen for
//! ε = 1/n, (c) multi-layer gradient error against depth, (d) crossover lengths (LSSSZ Thm 4.2;
//! AS23 Thm 1.4; MATH §3, §6, §7).

use super::loglog_slope;
use super::plan::{bounded_inputs, grad_errors, run_method, Inputs, Plan};
use super::report::{sci, series_label, BenchRun, Fit};
use super::report::{
    Crossover, ErrorClaim, ErrorClaimPoint, ErrorSlope, ExponentClaim, MultiLayerClaim, MultiLayerPoint,
};
use crate::attention::bound::{choose_degree, eps_a};
use crate::attention::bound::{key_means, row_shift};
use crate::attention::features::feature_dim;
use crate::attention::view::Rows;
use crate::attention::{Method, PolyOptions};
use crate::linalg::rel_err;
use crate::linalg::{matmul, par_all, rm, rm_mut};
use crate::model::{AttentionPolicy, LlamaConfig, LlamaWeights, Model, Network, RopeLayout};
use crate::Result;
use std::fmt::Write as _;
use std::time::Instant;

/// Claim (a) from the fits.
pub(crate) fn exponent_claims(fits: &[Fit]) -> Vec<ExponentClaim> {
    let mut out = Vec::new();
    for m in Method::ALL.map(|m| m.as_str()) {
        let fs: Vec<&Fit> = fits.iter().filter(|f| f.method == m && f.exponent.is_finite()).collect();
        if fs.is_empty() {
            continue;
        }
        out.push(ExponentClaim {
            method: m.into(),
            exponent_min: fs.iter().map(|f| f.exponent).fold(f64::INFINITY, f64::min),
            exponent_max: fs.iter().map(|f| f.exponent).fold(f64::NEG_INFINITY, f64::max),
            series: fs.len(),
            n_max: fs.iter().map(|f| f.n_max).max().unwrap_or(0),
        });
    }
    out
}

/// Claim (d) from the runs.
pub(crate) fn crossovers(runs: &[BenchRun]) -> Vec<Crossover> {
    let mut keys: Vec<(String, usize, usize, usize, bool, usize)> = Vec::new();
    for r in runs.iter().filter(|r| r.method != Method::Exact.as_str()) {
        let k =
            (r.method.clone(), r.head_dim, r.degree.unwrap_or(0), r.rank.unwrap_or(0), r.causal, r.chunk.unwrap_or(64));
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.iter()
        .map(|(m, d, g, rank, causal, chunk)| {
            let pts: Vec<(usize, f64)> = runs
                .iter()
                .filter(|r| &r.method == m && r.head_dim == *d && r.degree == Some(*g) && r.causal == *causal)
                .filter_map(|r| r.speedup_vs_exact.map(|s| (r.n, s)))
                .collect();
            let (crossover_n, note) = match pts.iter().position(|p| p.1 >= 1.0) {
                None if pts.is_empty() => (None, "no size with both exact and this method".to_string()),
                None => (None, format!("slower than exact at every measured n ≤ {}", pts[pts.len() - 1].0)),
                Some(0) => (None, format!("faster than exact already at the smallest measured n = {}", pts[0].0)),
                Some(i) => {
                    let ((n0, s0), (n1, s1)) = (pts[i - 1], pts[i]);
                    let (l0, l1) = ((n0 as f64).ln(), (n1 as f64).ln());
                    let t = if (s1.ln() - s0.ln()).abs() > 0.0 { -s0.ln() / (s1.ln() - s0.ln()) } else { 0.5 };
                    (
                        Some((l0 + t.clamp(0.0, 1.0) * (l1 - l0)).exp()),
                        format!("between n = {n0} and {n1} (log-log interpolation)"),
                    )
                }
            };
            let big = 1usize << 20;
            let method = Method::from_name(m).unwrap_or(Method::AltGrad);
            let model = big as f64 * method.flops(big, *d, *d, *rank, *causal, *chunk)
                / Method::Exact.flops(big, *d, *d, 0, *causal, *chunk);
            let best = pts.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1));
            Crossover {
                method: m.clone(),
                head_dim: *d,
                degree: *g,
                rank: *rank,
                causal: *causal,
                crossover_n,
                note,
                model_crossover_n: model,
                max_speedup: best.map(|b| b.1),
                max_speedup_n: best.map(|b| b.0),
            }
        })
        .collect()
}

/// Claim (b): f64, `plan.claim_b_*` sizes, both masks, poly and altgrad at `g = choose_degree(R, 1/n)`.
pub(crate) fn error_claim(plan: &Plan, tick: &dyn Fn(&str)) -> Result<ErrorClaim> {
    let (d, heads, r_target, maxg, chunk) = (plan.b_head_dim, plan.b_heads, plan.b_r, plan.b_max_degree, plan.chunk);
    let mut points = Vec::new();
    let mut skipped = Vec::new();
    // (method, causal) → last (n, seconds), to skip points predicted above the limit
    let mut last: Vec<((Method, bool), (usize, f64))> = Vec::new();
    for causal in [false, true] {
        let mut last_exact: Option<(usize, f64)> = None;
        for &n in &plan.b_ns {
            tick(&format!("claim (b) n={n} causal={causal}"));
            let inp = bounded_inputs::<f64>(n, heads, d, causal, r_target, plan.seed ^ 0xb)?;
            let Some(g) = choose_degree(inp.bound, 1.0 / n as f64, maxg) else {
                skipped.push(format!(
                    "n={n} causal={causal}: no even degree ≤ {maxg} reaches ε_A ≤ 1/n at R = {:.3}",
                    inp.bound
                ));
                continue;
            };
            let rank = feature_dim(d, g).unwrap_or(usize::MAX);
            let exact_pred = last_exact.map_or(0.0, |(m, t): (usize, f64)| t * (n as f64 / m as f64).powi(2));
            if exact_pred > plan.b_limit_s {
                skipped.push(format!(
                    "n={n} causal={causal}: exact reference {}",
                    super::over_limit(exact_pred, plan.b_limit_s)
                ));
                continue;
            }
            let smax = max_shifted_score(&inp);
            let t = Instant::now();
            let (_, _, o_ref, g_ref) = run_method(Method::Exact, &inp, &PolyOptions::new(2))?;
            last_exact = Some((n, t.elapsed().as_secs_f64()));
            for method in [Method::Poly, Method::AltGrad] {
                let predicted = last.iter().find(|(k, _)| *k == (method, causal)).map_or(0.0, |(_, (m, t))| {
                    t * n as f64 / *m as f64 * (rank as f64 / rank_at(d, &points, method, causal, *m))
                });
                if predicted > plan.b_limit_s {
                    skipped.push(format!(
                        "{method} n={n} g={g} causal={causal}: {}",
                        super::over_limit(predicted, plan.b_limit_s)
                    ));
                    continue;
                }
                let popts = PolyOptions { degree: g, center: true, chunk };
                let t = Instant::now();
                let res = run_method(method, &inp, &popts);
                let secs = t.elapsed().as_secs_f64();
                match res {
                    Ok((_, _, o, gr)) => {
                        let (err_o, _, _, _, err_grad) = grad_errors(&o, &gr, &o_ref, &g_ref);
                        last.retain(|(k, _)| *k != (method, causal));
                        last.push(((method, causal), (n, secs)));
                        points.push(ErrorClaimPoint {
                            method: method.as_str().into(),
                            causal,
                            n,
                            degree: g,
                            rank,
                            eps_target: 1.0 / n as f64,
                            eps_a: eps_a(inp.bound, g),
                            max_abs_shifted_score: smax,
                            err_o,
                            err_grad,
                            seconds: secs,
                        });
                    }
                    Err(e) => skipped.push(format!("{method} n={n} g={g} causal={causal}: {e}")),
                }
            }
        }
    }
    let mut slopes = Vec::new();
    for m in [Method::Poly.as_str(), Method::AltGrad.as_str()] {
        for causal in [false, true] {
            let ps: Vec<&ErrorClaimPoint> = points.iter().filter(|p| p.method == m && p.causal == causal).collect();
            if ps.is_empty() {
                continue;
            }
            let so: Vec<(f64, f64)> = ps.iter().map(|p| (p.n as f64, p.err_o)).collect();
            let sg: Vec<(f64, f64)> = ps.iter().map(|p| (p.n as f64, p.err_grad)).collect();
            slopes.push(ErrorSlope {
                method: m.into(),
                causal,
                slope_o: loglog_slope(&so),
                slope_grad: loglog_slope(&sg),
                max_err_grad_times_n: ps.iter().map(|p| p.err_grad * p.n as f64).fold(0.0, f64::max),
            });
        }
    }
    Ok(ErrorClaim {
        head_dim: d,
        heads,
        r_bound: r_target,
        dtype: "f64".into(),
        chunk,
        max_degree: maxg,
        points,
        slopes,
        skipped,
    })
}

/// `max |τ q_i·k_j − m_i|` over heads and allowed pairs (`m_i` the row shift of MATH §3), by
/// tiles of 256 query rows (one GEMM each). O(n²·d) per head.
fn max_shifted_score(inp: &Inputs<f64>) -> f64 {
    let s = inp.shape;
    let (n, d, tau, causal) = (s.seq_len, s.head_dim, inp.opts.scale, inp.opts.is_causal());
    const TILE: usize = 256;
    let mut best = 0.0f64;
    let mut tile = vec![0.0f64; TILE * n];
    for h in 0..s.num_heads {
        let q = Rows::head(&inp.q, n, s.num_heads, d, 0, h).to_vec();
        let k = Rows::head(&inp.k, n, s.num_kv_heads, d, 0, h / s.group()).to_vec();
        let kbar = key_means(&k, n, d, causal);
        let m = row_shift(&q, &kbar, n, d, tau);
        let mut i0 = 0;
        while i0 < n {
            let br = TILE.min(n - i0);
            let cols = if causal { i0 + br } else { n };
            let st = &mut tile[..br * cols];
            matmul(
                rm_mut(st, br, cols),
                false,
                rm(&q[i0 * d..(i0 + br) * d], br, d),
                rm(&k[..cols * d], cols, d).transpose(),
                tau,
                par_all(),
            );
            for r in 0..br {
                let lim = if causal { i0 + r + 1 } else { cols };
                for x in &st[r * cols..r * cols + lim] {
                    best = best.max((x - m[i0 + r]).abs());
                }
            }
            i0 += br;
        }
    }
    best
}

/// The rank used by the last point of a series (for time prediction when the degree changes).
fn rank_at(d: usize, points: &[ErrorClaimPoint], method: Method, causal: bool, n: usize) -> f64 {
    points
        .iter()
        .find(|p| p.method == method.as_str() && p.causal == causal && p.n == n)
        .map_or(feature_dim(d, 2).unwrap_or(1) as f64, |p| p.rank as f64)
}

/// Claim (c): a Llama of `plan.c_layers` layers (random HF-style weights, each layer's q/k
/// projections scaled so its largest head bound is `R = plan.c_r`), truncated to m = 1…layers;
/// whole-model gradient error of poly g ∈ {2, 4} and altgrad g ∈ {2, 4} against exact (f64).
pub(crate) fn multilayer_claim(plan: &Plan, tick: &dyn Fn(&str)) -> Result<MultiLayerClaim> {
    let cfg = LlamaConfig {
        vocab_size: plan.c_vocab,
        hidden_size: plan.c_hidden,
        intermediate_size: plan.c_inter,
        num_layers: plan.c_layers,
        num_heads: plan.c_heads,
        num_kv_heads: plan.c_heads,
        head_dim: plan.c_head_dim,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_layout: RopeLayout::RotateHalf,
        max_seq_len: plan.c_n.max(2),
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        built_in_attention: None,
    };
    let mut model = Model::<f64>::new(cfg.clone(), LlamaWeights::random_hf(&cfg, plan.seed ^ 0xc), "bench")?;
    let ids: Vec<u32> = {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed ^ 0x1d5);
        (0..plan.c_n).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect()
    };
    // Scale layer by layer: R is bilinear in (W_q, W_k), so scaling both by √(R*/R) gives R*;
    // later layers see the changed activations, so each layer is measured after the earlier ones.
    for l in 0..cfg.num_layers {
        tick(&format!("claim (c) scaling layer {l}"));
        let cache = model.forward_with(&ids, &AttentionPolicy::EXACT)?;
        let r = cache.layers[l].attn.decisions.iter().map(|d| d.bound).fold(0.0, f64::max);
        if r > 0.0 && r.is_finite() {
            let s = (plan.c_r / r).sqrt();
            let lw = &mut model.weights.layers[l];
            for x in lw.q_proj.weight.data.iter_mut().chain(lw.k_proj.weight.data.iter_mut()) {
                *x *= s;
            }
        }
    }
    let cache = model.forward_with(&ids, &AttentionPolicy::EXACT)?;
    let layer_bounds: Vec<f64> =
        cache.layers.iter().map(|c| c.attn.decisions.iter().map(|d| d.bound).fold(0.0, f64::max)).collect();
    drop(cache);
    let flat = |g: &crate::model::Grads<f64>| -> Vec<f64> {
        g.weights.params().iter().flat_map(|p| p.data.iter().copied()).collect()
    };
    let mut points = Vec::new();
    for m in 1..=cfg.num_layers {
        tick(&format!("claim (c) m={m}"));
        let mut c = cfg.clone();
        c.num_layers = m;
        let mut w = model.weights.clone();
        w.layers.truncate(m);
        let mm = Model::new(c, w, "bench")?;
        let (loss_ref, g_ref, _) = mm.loss_and_grads_with(&ids, &AttentionPolicy::EXACT)?;
        let g_ref = flat(&g_ref);
        for (method, g) in [(Method::Poly, 2), (Method::Poly, 4), (Method::AltGrad, 2), (Method::AltGrad, 4)] {
            let hp = method.plan(PolyOptions { degree: g, center: true, chunk: plan.chunk });
            let t = Instant::now();
            let (loss, gr, _) = mm.loss_and_grads_with(&ids, &AttentionPolicy::Fixed(hp))?;
            let secs = t.elapsed().as_secs_f64();
            points.push(MultiLayerPoint {
                layers: m,
                method: hp.method_name().into(),
                degree: g,
                rel_err_grad: rel_err(&flat(&gr), &g_ref),
                rel_err_loss: ((loss - loss_ref) / loss_ref).abs(),
                seconds: secs,
            });
        }
    }
    Ok(MultiLayerClaim {
        hidden: cfg.hidden_size,
        heads: cfg.num_heads,
        head_dim: cfg.head_dim,
        intermediate: cfg.intermediate_size,
        vocab: cfg.vocab_size,
        seq_len: plan.c_n,
        dtype: "f64".into(),
        r_target: plan.c_r,
        layer_bounds,
        points,
    })
}

/// The claims table (claim — what we measured — command) and the crossover table, as markdown.
pub(crate) fn claims_markdown(
    command: &str,
    time: &[ExponentClaim],
    b: Option<&ErrorClaim>,
    c: Option<&MultiLayerClaim>,
    d: &[Crossover],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Paper claims\n");
    let _ = writeln!(s, "| claim | what we measured | command |");
    let _ = writeln!(s, "|---|---|---|");
    let cmd = format!("`{command}`");
    // (a)
    let mut a = String::new();
    for e in time {
        let _ = write!(
            a,
            "{}: exponent {:.2}–{:.2} ({} series, up to n = {}); ",
            e.method, e.exponent_min, e.exponent_max, e.series, e.n_max
        );
    }
    let measured = if a.is_empty() {
        // one size per series (or none run): no slope to fit
        "not measured: a fitted exponent needs at least two sizes per method (`--ns`)".to_string()
    } else {
        a.trim_end_matches("; ").to_string()
            + ". fitted slope of log time vs log n over the largest sizes; exact is the n² baseline"
    };
    let _ =
        writeln!(s, "| (a) time n^(1+o(1)) for bounded entries (LSSSZ Thm 4.2, AS23 Thm 1.4) | {measured} | {cmd} |");
    // (b)
    match b {
        Some(b) => {
            let mut m = format!(
                "d = {}, R = {:.2}, {} heads, f64, g = smallest even degree with ε_A(R, g) ≤ 1/n: ",
                b.head_dim, b.r_bound, b.heads
            );
            let gs: Vec<String> = {
                let mut v: Vec<(usize, usize)> = b
                    .points
                    .iter()
                    .filter(|p| p.method == Method::Poly.as_str() && !p.causal)
                    .map(|p| (p.n, p.degree))
                    .collect();
                v.dedup();
                v.iter().map(|(n, g)| format!("n={n}→g={g}")).collect()
            };
            let _ = write!(m, "{}. ", gs.join(", "));
            let smax = b.points.iter().map(|p| p.max_abs_shifted_score).fold(0.0, f64::max);
            let _ = write!(m, "(The bound R is loose: the largest shifted score present is {smax:.2}.) ");
            for sl in &b.slopes {
                let ps: Vec<&ErrorClaimPoint> =
                    b.points.iter().filter(|p| p.method == sl.method && p.causal == sl.causal).collect();
                let (lo, hi) = (ps.first().map(|p| p.err_grad), ps.last().map(|p| p.err_grad));
                let _ = write!(
                    m,
                    "{}{}: grad error {} → {} (slope {:.2}), max err·n = {:.2e}; ",
                    sl.method,
                    if sl.causal { " causal" } else { "" },
                    sci(lo),
                    sci(hi),
                    sl.slope_grad,
                    sl.max_err_grad_times_n
                );
            }
            let _ = writeln!(
                s,
                "| (b) error 1/poly(n) with the degree chosen for ε = 1/n (AS23 Thm 1.4; LSSSZ Thm 4.2) | {} | {cmd} |",
                m.trim_end_matches("; ")
            );
        }
        None => {
            let _ = writeln!(s, "| (b) error 1/poly(n) | not run | {cmd} |");
        }
    }
    // (c)
    match c {
        Some(c) => {
            let mut m = format!(
                "Llama hidden {}, {} heads × {}, n = {}, f64, every layer's R scaled to {:.1}: ",
                c.hidden, c.heads, c.head_dim, c.seq_len, c.r_target
            );
            let mut labels: Vec<String> = Vec::new();
            for p in &c.points {
                if !labels.contains(&p.label()) {
                    labels.push(p.label());
                }
            }
            for l in &labels {
                let ps: Vec<&MultiLayerPoint> = c.points.iter().filter(|p| &p.label() == l).collect();
                let (f, last) = (ps.first().unwrap(), ps.last().unwrap());
                let _ = write!(
                    m,
                    "{l}: {} (m={}) → {} (m={}); ",
                    sci(Some(f.rel_err_grad)),
                    f.layers,
                    sci(Some(last.rel_err_grad)),
                    last.layers
                );
            }
            let _ = writeln!(
                s,
                "| (c) multi-layer gradient within 1/poly(n) of exact (LSSSZ Thm 4.2, Alg. 1; MATH §6) | {} | {cmd} |",
                m.trim_end_matches("; ")
            );
        }
        None => {
            let _ = writeln!(s, "| (c) multi-layer gradient error | not run | {cmd} |");
        }
    }
    // (d)
    let mut m = String::new();
    for x in d {
        let _ = write!(
            m,
            "{}{}: crossover {} (model {:.0}), best {} at n = {}; ",
            series_label(&x.method, x.head_dim, Some(x.degree)),
            if x.causal { " causal" } else { "" },
            x.crossover_n.map_or_else(|| x.note.clone(), |n| format!("n ≈ {n:.0}")),
            x.model_crossover_n,
            x.max_speedup.map_or("—".into(), |v| format!("{v:.2}×")),
            x.max_speedup_n.map_or("—".into(), |n| n.to_string())
        );
    }
    let _ =
        writeln!(s, "| (d) speed-up over exact only past n* ≈ r (MATH §7) | {} | {cmd} |", m.trim_end_matches("; "));
    // detail tables
    if let Some(b) = b {
        let _ = writeln!(s, "\n### (b) error against n at g chosen for ε = 1/n\n");
        let _ = writeln!(
            s,
            "| method | causal | n | g | r | max abs shifted score | 1/n | ε_A(R,g) | err o | err grad | s |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
        for p in &b.points {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.3} | {:.2e} | {:.2e} | {:.2e} | {:.2e} | {:.3} |",
                p.method,
                p.causal,
                p.n,
                p.degree,
                p.rank,
                p.max_abs_shifted_score,
                p.eps_target,
                p.eps_a,
                p.err_o,
                p.err_grad,
                p.seconds
            );
        }
        for k in &b.skipped {
            let _ = writeln!(s, "\nSkipped: {k}");
        }
    }
    if let Some(c) = c {
        let _ = writeln!(s, "\n### (c) whole-model gradient error against layers\n");
        let _ = writeln!(
            s,
            "Layer bounds R after scaling: {}\n",
            c.layer_bounds.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", ")
        );
        let mut labels: Vec<String> = Vec::new();
        for p in &c.points {
            if !labels.contains(&p.label()) {
                labels.push(p.label());
            }
        }
        let _ = writeln!(s, "| m | {} |", labels.join(" | "));
        let _ = writeln!(s, "|---|{}", "---|".repeat(labels.len()));
        let mut ms: Vec<usize> = c.points.iter().map(|p| p.layers).collect();
        ms.dedup();
        for m in ms {
            let cells: Vec<String> = labels
                .iter()
                .map(|l| {
                    c.points
                        .iter()
                        .find(|p| p.layers == m && &p.label() == l)
                        .map_or("—".into(), |p| format!("{:.2e}", p.rel_err_grad))
                })
                .collect();
            let _ = writeln!(s, "| {m} | {} |", cells.join(" | "));
        }
    }
    if !d.is_empty() {
        let _ = writeln!(s, "\n### (d) crossover and speed-up\n");
        let _ = writeln!(
            s,
            "| method | d | g | r | causal | measured crossover n | cost-model n* | best speed-up | at n |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for x in d {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {:.0} | {} | {} |",
                x.method,
                x.head_dim,
                x.degree,
                x.rank,
                x.causal,
                x.crossover_n.map_or_else(|| x.note.clone(), |n| format!("≈ {n:.0} ({})", x.note)),
                x.model_crossover_n,
                x.max_speedup.map_or("—".into(), |v| format!("{v:.2}×")),
                x.max_speedup_n.map_or("—".into(), |n| n.to_string())
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Claim (a) with no fitted series (one size per method) says why, instead of an empty cell.
    #[test]
    fn claim_a_without_a_fit_says_why() {
        let md = claims_markdown("altgrad bench --ns 2048", &[], None, None, &[]);
        let row = md.lines().find(|l| l.starts_with("| (a) time")).expect("row (a)");
        assert!(row.contains("| not measured: a fitted exponent needs at least two sizes per method"), "{row}");
        assert!(!row.contains("|  ") && !row.contains("| ."), "{row}");
    }
}
