//! The per-head policy keeps its promise: on bounded inputs, the degree it picks for a tolerance
//! gives an output error within the predicted bound (MATH §3), measured against exact softmax.

mod common;
use altgrad::attention::bound::{choose_degree, output_bound, score_bound, MAX_AUTO_DEGREE};
use altgrad::attention::{forward_exact, forward_poly, AttnOptions, AttnShape, PolyOptions};
use altgrad::attention::{Method, Policy};
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

#[test]
fn policy_falls_back_to_exact_when_poly_cannot_pay() {
    // Unbounded scores: no degree meets the tolerance.
    let p = Policy::choose(4096, 16, 16, true, 20.0, 1e-3, 1 << 16);
    assert_eq!(p.method, Method::Exact);
    assert!(p.reason.contains("no even degree"), "{}", p.reason);
    // Short sequence: exact is cheaper.
    let p = Policy::choose(64, 16, 16, true, 0.5, 1e-1, 1 << 16);
    assert_eq!(p.method, Method::Exact);
    assert!(p.reason.contains("FLOP vs"), "{}", p.reason);
    // Rank over the memory budget.
    let p = Policy::choose(1 << 20, 64, 64, true, 1.0, 1e-3, 1000);
    assert_eq!(p.method, Method::Exact);
    assert!(p.reason.contains("max_rank"), "{}", p.reason);
    // Bounded, long, small head_dim: polynomial.
    let p = Policy::choose(32768, 16, 16, true, 0.5, 1e-2, 1 << 16);
    assert_eq!(p.method, Method::Poly);
    assert_eq!(p.degree, Some(4));
    assert_eq!(p.rank, Some(4845));
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
    let policy = |tol: f64| AttentionPolicy::PerHeadDegree { method: Method::Poly, tol, chunk: 64, center: true };
    for (scale_in, seed) in [(0.35, 5u64), (3.0, 6)] {
        let q = randn(n * d, seed, scale_in);
        let k = randn(n * d, seed + 1, scale_in);
        let r = decide(&policy(1e-3), &q, &k, &s, &opts).unwrap()[0].bound;
        // a tolerance that degree 6 meets and degree 4 does not (when R is finite and moderate)
        let tol = if eps_a(r, 6) < eps_a(r, 4) { eps_a(r, 6) * 1.0001 } else { 1e-3 };
        let h = &decide(&policy(tol), &q, &k, &s, &opts).unwrap()[0];
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
