//! The per-head policy keeps its promise: on bounded inputs, the degree it picks for a tolerance
//! gives an output error within the predicted bound (MATH §3), measured against exact softmax; the
//! measured estimate tracks the true error; forced runs over their budget are refused.

mod common;
use altgrad::attention::bound::{choose_degree, output_bound, score_bound, ScoreBounds, MAX_AUTO_DEGREE};
use altgrad::attention::estimate::ErrorEstimate;
use altgrad::attention::{forward_exact, forward_poly, AttnOptions, AttnShape, PolyOptions};
use altgrad::attention::{Budget, Decider, Method, Policy};
use common::{qkv, randn};

#[test]
fn chosen_degree_meets_its_predicted_output_bound() {
    let (n, d) = (300, 8);
    for causal in [false, true] {
        for (scale_in, seed) in [(0.6, 1u64), (0.9, 2), (1.2, 3)] {
            let q = randn(n * d, seed, scale_in);
            let k = randn(n * d, seed + 10, scale_in);
            let v = randn(n * d, seed + 20, 1.0);
            let s = AttnShape::new(n, 1, 1, d);
            let opts = AttnOptions::standard(d, causal);
            let r = score_bound(&q, &k, n, d, opts.scale, causal, true);
            let exact = forward_exact(&qkv(&q, &k, &v, &s), &opts).unwrap();
            let vmax = v.iter().fold(0.0f64, |a, x| a.max(x.abs()));
            for tol in [1e-1, 1e-2, 1e-3, 1e-4] {
                let Some(g) = choose_degree(r, tol, MAX_AUTO_DEGREE) else { continue };
                let poly = forward_poly(&qkv(&q, &k, &v, &s), &opts, &PolyOptions::new(g)).unwrap();
                let err = poly.o.iter().zip(&exact.o).fold(0.0f64, |a, (x, y)| a.max((x - y).abs()));
                let pred = output_bound(r, g) * vmax;
                assert!(
                    err <= pred,
                    "causal={causal} R={r:.3} tol={tol:e} g={g}: max error {err:e} above predicted {pred:e}"
                );
            }
        }
    }
}

/// A stand-in for the measured estimate: every degree measures `upper`.
fn measured(upper: f64) -> impl FnMut(&[usize], bool) -> Vec<ErrorEstimate> {
    move |gs: &[usize], _| {
        gs.iter()
            .map(|&g| ErrorEstimate { degree: g, rel_err_o: upper, rel_err_dq: upper, upper, upper_dq: upper, rows: 1 })
            .collect()
    }
}

fn both(r: f64) -> ScoreBounds {
    ScoreBounds { shifted: r, unshifted: r }
}

#[test]
fn policy_falls_back_to_exact_when_poly_cannot_pay() {
    // Unbounded scores and a large measured error: no degree meets the tolerance.
    let p = Policy::choose(4096, 16, 16, true, both(20.0), 1e-3, 1 << 16, &mut measured(0.5));
    assert_eq!((p.method, p.decided_by), (Method::Exact, Decider::Error));
    assert!(p.reason.contains("no degree cheaper than exact meets"), "{}", p.reason);
    // Short sequence: exact is cheaper, whatever the error.
    let p = Policy::choose(64, 16, 16, true, both(0.5), 1e-1, 1 << 16, &mut measured(0.0));
    assert_eq!((p.method, p.decided_by), (Method::Exact, Decider::Cost));
    assert!(p.reason.contains("FLOP vs"), "{}", p.reason);
    // Rank over the memory budget.
    let p = Policy::choose(1 << 20, 64, 64, true, both(1.0), 1e-3, 1000, &mut measured(0.0));
    assert_eq!(p.method, Method::Exact);
    assert!(p.reason.contains("max_rank"), "{}", p.reason);
    // Bounded, long, small head_dim: polynomial by the bound when the estimate is no better.
    let p = Policy::choose(32768, 16, 16, true, both(0.5), 1e-2, 1 << 16, &mut measured(1.0));
    assert_eq!((p.method, p.decided_by), (Method::Poly, Decider::Bound));
    assert_eq!(p.degree, Some(4));
    assert_eq!(p.rank, Some(4845));
    // ... and by the estimate at the cheaper degree 2 when it measures within tol.
    let p = Policy::choose(32768, 16, 16, true, both(0.5), 1e-2, 1 << 16, &mut measured(1e-3));
    assert_eq!((p.method, p.degree, p.decided_by), (Method::Poly, Some(2), Decider::Estimate));
}

/// On random inputs the sampled-row estimate (128 of n rows) tracks the true relative error of the
/// whole head, measured here by the full polynomial and exact forwards and backwards (f64): the
/// point estimates within a factor 2, the 95% upper bounds above the truth. The printed table is
/// docs/RESULTS.md's "random inputs" rows.
#[test]
fn estimate_tracks_the_true_error_on_random_inputs() {
    use altgrad::attention::estimate::{estimate_poly_error, EstimateSpec, Rows};
    use altgrad::attention::{backward_exact, backward_poly};
    let (n, d) = (2048, 16);
    for causal in [false, true] {
        for (scale_in, seed) in [(0.5, 11u64), (1.0, 12), (1.5, 13)] {
            let q = randn(n * d, seed, scale_in);
            let k = randn(n * d, seed + 10, scale_in);
            let v = randn(n * d, seed + 20, 1.0);
            let g = randn(n * d, seed + 30, 1.0);
            let s = AttnShape::new(n, 1, 1, d);
            let opts = AttnOptions::standard(d, causal);
            let x = qkv(&q, &k, &v, &s);
            let exact = forward_exact(&x, &opts).unwrap();
            let ge = backward_exact(&x, &exact, &g).unwrap();
            let spec = EstimateSpec::new(n, opts.scale, causal, true);
            let (qr, kr, vr) = (Rows::contiguous(&q, n, d), Rows::contiguous(&k, n, d), Rows::contiguous(&v, n, d));
            let est = estimate_poly_error(&qr, &kr, &vr, &spec, &[2, 4]);
            for e in est {
                let poly = forward_poly(&x, &opts, &PolyOptions::new(e.degree)).unwrap();
                let gp = backward_poly(&x, &poly, &g).unwrap();
                let (to, tq) = (rel(&poly.o, &exact.o), rel(&gp.dq, &ge.dq));
                eprintln!(
                    "| random, causal {causal}, σ = {scale_in} | {} | {:.2e} | {:.2e} | {to:.2e} | {:.2e} | {:.2e} | {tq:.2e} |",
                    e.degree, e.rel_err_o, e.upper, e.rel_err_dq, e.upper_dq
                );
                assert!(e.rel_err_o <= 2.0 * to && to <= 2.0 * e.rel_err_o, "o: {e:?} vs {to:e}");
                assert!(e.rel_err_dq <= 2.0 * tq && tq <= 2.0 * e.rel_err_dq, "dq: {e:?} vs {tq:e}");
                assert!(e.upper >= to && e.upper_dq >= tq, "upper bounds: {e:?} vs {to:e}, {tq:e}");
            }
        }
    }
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    (num / b.iter().map(|y| y * y).sum::<f64>()).sqrt()
}

#[test]
fn per_head_degree_reasons_state_only_bounds_that_hold() {
    use altgrad::attention::bound::eps_a;
    use altgrad::attention::Method;
    use altgrad::model::policy::decide;
    use altgrad::model::AttentionPolicy;
    // d = 64: degree 6 has r = C(70, 6) ≈ 1.3e8 features, above the limit; degree 4 (r = 814385) fits.
    let (n, d) = (16, 64);
    let s = AttnShape::new(n, 1, 1, d);
    let opts = AttnOptions::standard(d, false);
    let policy = |tol: f64| AttentionPolicy::Forced {
        method: Method::Poly,
        degree: None,
        budget: Budget::UNLIMITED,
        tol,
        chunk: 64,
        center: true,
    };
    for (scale_in, seed) in [(0.35, 5u64), (3.0, 6)] {
        let q = randn(n * d, seed, scale_in);
        let k = randn(n * d, seed + 1, scale_in);
        let r = decide(&policy(1e-3), &q, &k, &k, &s, &opts).unwrap()[0].bound;
        // a tolerance that degree 6 meets and degree 4 does not (when R is finite and moderate)
        let tol = if eps_a(r, 6) < eps_a(r, 4) { eps_a(r, 6) * 1.0001 } else { 1e-3 };
        let h = &decide(&policy(tol), &q, &k, &k, &s, &opts).unwrap()[0];
        let g = h.plan.degree().unwrap();
        assert_eq!(g, 4, "capped to the largest degree that fits: {}", h.reason);
        let meets_some = eps_a(r, 8) <= tol || eps_a(r, 6) <= tol;
        eprintln!("R = {r:.3}, tol = {tol:e}: {}", h.reason);
        if meets_some {
            assert!(h.reason.contains("capped at g = 4"), "{}", h.reason);
            assert!(
                h.reason.contains(&format!("ε_A = {:.1e}", eps_a(r, 4))),
                "the capped degree's own bound: {}",
                h.reason
            );
        } else {
            // no degree meets the tolerance: the reason must not claim that one would
            assert!(!h.reason.contains("would meet"), "{}", h.reason);
            assert!(h.reason.contains("no even degree"), "{}", h.reason);
        }
    }
}
