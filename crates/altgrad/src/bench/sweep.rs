//! [`run_bench`]: the sweep, the claims, the roofline, and the files.

use super::claims::{claims_markdown, crossovers, error_claim, exponent_claims, multilayer_claim};
use super::profile::{profile_exact_stages, profile_poly_stages, StageProfile};
use super::report::{BenchReport, BenchRun, Claims, Fit, Skipped};
use super::{current_rss_bytes, gemm_peak_gflops, median, peak_rss_bytes, reset_peak_rss, trim_heap};
use crate::attention::features::feature_dim;
use crate::attention::{self, head_bounds, AttnGrads, AttnOptions, AttnShape, Method, PolyOptions};
use crate::io::write_file_atomic;
use crate::linalg::Scalar;
use crate::Progress;
use crate::{Error, Result};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// What [`run_bench`] runs. Build with [`BenchOptions::new`] and adjust fields.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchOptions {
    /// `--quick`: n up to 8192, fewer configurations, about 2 minutes on a 2-core machine.
    /// Otherwise the full sweep: n up to 65536 (points predicted above `limit_s` are skipped).
    pub quick: bool,
    /// Test-only: n ≤ 256, one configuration per method, tiny claims; seconds. Overrides `quick`.
    pub tiny: bool,
    /// Output directory (created): `bench.json`, `bench.csv`, `bench.md`, plots.
    pub out_dir: PathBuf,
    /// Query heads (= key/value heads) of every sweep point; default 4 (≥ the cores here).
    pub heads: usize,
    /// Override the sequence lengths of the sweep.
    pub ns: Option<Vec<usize>>,
    /// Override the `(head_dim, degree)` pairs of the poly method.
    pub poly_configs: Option<Vec<(usize, usize)>>,
    /// Override the `(head_dim, degree)` pairs of the altgrad method.
    pub altgrad_configs: Option<Vec<(usize, usize)>>,
    /// Override the head widths of exact attention.
    pub exact_dims: Option<Vec<usize>>,
    /// Skip a point when its predicted single forward + backward (extrapolated from the previous
    /// size of its series: n² for exact, n for the others) exceeds this many seconds; default
    /// 4 (quick), 300 (full).
    pub limit_s: Option<f64>,
    /// Causal chunk `C` of poly/altgrad (default 64, `poly::DEFAULT_CHUNK`).
    pub chunk: usize,
    /// Non-causal streaming chunk of poly/altgrad (default 256).
    pub stream_chunk: usize,
    /// Run the claims (b) and (c) (default true).
    pub claims: bool,
    /// Run the roofline stage breakdown (default true).
    pub roofline: bool,
    /// Seed of every random input.
    pub seed: u64,
}

impl BenchOptions {
    /// The full sweep into `out_dir` with the defaults above.
    pub fn new(out_dir: impl Into<PathBuf>) -> Self {
        BenchOptions {
            quick: false,
            tiny: false,
            out_dir: out_dir.into(),
            heads: 4,
            ns: None,
            poly_configs: None,
            altgrad_configs: None,
            exact_dims: None,
            limit_s: None,
            chunk: attention::poly::DEFAULT_CHUNK,
            stream_chunk: 256,
            claims: true,
            roofline: true,
            seed: 0,
        }
    }

    /// The `altgrad bench …` command line these options correspond to.
    pub fn command_line(&self) -> String {
        let mut s = String::from("altgrad bench");
        if self.tiny {
            s.push_str(" (tiny, test only)");
        } else if self.quick {
            s.push_str(" --quick");
        }
        let list = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
        let pairs = |v: &[(usize, usize)]| v.iter().map(|(d, g)| format!("{d}:{g}")).collect::<Vec<_>>().join(",");
        if let Some(ns) = &self.ns {
            s.push_str(&format!(" --ns {}", list(ns)));
        }
        if let Some(c) = &self.poly_configs {
            s.push_str(&format!(" --poly {}", pairs(c)));
        }
        if let Some(c) = &self.altgrad_configs {
            s.push_str(&format!(" --altgrad {}", pairs(c)));
        }
        if let Some(c) = &self.exact_dims {
            s.push_str(&format!(" --exact {}", list(c)));
        }
        if let Some(l) = self.limit_s {
            s.push_str(&format!(" --limit {l}"));
        }
        if self.heads != 4 {
            s.push_str(&format!(" --heads {}", self.heads));
        }
        if self.chunk != attention::poly::DEFAULT_CHUNK {
            s.push_str(&format!(" --chunk {}", self.chunk));
        }
        if self.stream_chunk != 256 {
            s.push_str(&format!(" --stream-chunk {}", self.stream_chunk));
        }
        if !self.claims {
            s.push_str(" --no-claims");
        }
        if !self.roofline {
            s.push_str(" --no-roofline");
        }
        if self.seed != 0 {
            s.push_str(&format!(" --seed {}", self.seed));
        }
        s.push_str(&format!(" --out {}", self.out_dir.display()));
        s
    }
}

/// The resolved plan of a run.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub ns: Vec<usize>,
    pub heads: usize,
    pub exact_dims: Vec<usize>,
    pub poly: Vec<(usize, usize)>,
    pub altgrad: Vec<(usize, usize)>,
    pub chunk: usize,
    pub stream_chunk: usize,
    /// Skip points predicted above this (seconds, one fwd+bwd).
    pub limit_s: f64,
    /// Warm-up run only for points predicted below this.
    pub warmup_limit_s: f64,
    /// Time budget of the timed repetitions of one point.
    pub target_s: f64,
    pub max_reps: usize,
    pub gemm_n: usize,
    pub seed: u64,
    pub claims: bool,
    pub roofline: bool,
    pub profile_n: usize,
    // claim (b)
    pub b_ns: Vec<usize>,
    pub b_head_dim: usize,
    pub b_heads: usize,
    pub b_r: f64,
    pub b_max_degree: usize,
    /// Skip limit of claim (b) (seconds per run, exact f64 reference ∝ n², others ∝ n).
    pub b_limit_s: f64,
    // claim (c)
    pub c_n: usize,
    pub c_layers: usize,
    pub c_hidden: usize,
    pub c_heads: usize,
    pub c_head_dim: usize,
    pub c_inter: usize,
    pub c_vocab: usize,
    pub c_r: f64,
}

impl Plan {
    fn new(o: &BenchOptions) -> Result<Plan> {
        let bad = |m: String| Err(Error::bad("bench options", m));
        if o.heads == 0 || o.chunk == 0 || o.stream_chunk == 0 {
            return bad("heads, chunk and stream chunk must be positive".into());
        }
        let pow2 = |a: u32, b: u32| (a..=b).map(|p| 1usize << p).collect::<Vec<_>>();
        let mut p = if o.tiny {
            Plan {
                ns: vec![64, 128, 256],
                heads: o.heads,
                exact_dims: vec![8],
                poly: vec![(8, 2)],
                altgrad: vec![(8, 2)],
                chunk: o.chunk,
                stream_chunk: o.stream_chunk,
                limit_s: 5.0,
                warmup_limit_s: 1.0,
                target_s: 0.05,
                max_reps: 3,
                gemm_n: 256,
                seed: o.seed,
                claims: o.claims,
                roofline: o.roofline,
                profile_n: 256,
                b_ns: vec![64, 128, 256],
                b_head_dim: 4,
                b_heads: 1,
                b_r: 1.0,
                b_max_degree: 8,
                b_limit_s: 5.0,
                c_n: 16,
                c_layers: 2,
                c_hidden: 32,
                c_heads: 2,
                c_head_dim: 8,
                c_inter: 64,
                c_vocab: 64,
                c_r: 1.0,
            }
        } else if o.quick {
            Plan {
                ns: pow2(8, 13),
                heads: o.heads,
                exact_dims: vec![16, 64],
                poly: vec![(16, 2), (16, 4), (64, 2)],
                altgrad: vec![(16, 2)],
                chunk: o.chunk,
                stream_chunk: o.stream_chunk,
                limit_s: 4.0,
                warmup_limit_s: 1.0,
                target_s: 0.5,
                max_reps: 5,
                gemm_n: 2048,
                seed: o.seed,
                claims: o.claims,
                roofline: o.roofline,
                profile_n: 4096,
                b_ns: pow2(9, 13),
                b_head_dim: 8,
                b_heads: 2,
                b_r: 1.0,
                b_max_degree: 10,
                b_limit_s: 10.0,
                c_n: 256,
                c_layers: 8,
                c_hidden: 64,
                c_heads: 4,
                c_head_dim: 16,
                c_inter: 128,
                c_vocab: 256,
                c_r: 1.0,
            }
        } else {
            Plan {
                ns: pow2(9, 16),
                heads: o.heads,
                exact_dims: vec![16, 32, 64],
                poly: vec![(16, 2), (16, 4), (32, 2), (64, 2)],
                altgrad: vec![(16, 2), (16, 4), (32, 2)],
                chunk: o.chunk,
                stream_chunk: o.stream_chunk,
                limit_s: 300.0,
                warmup_limit_s: 5.0,
                target_s: 3.0,
                max_reps: 7,
                gemm_n: 2048,
                seed: o.seed,
                claims: o.claims,
                roofline: o.roofline,
                profile_n: 16384,
                b_ns: pow2(9, 16),
                b_head_dim: 8,
                b_heads: 2,
                b_r: 1.0,
                b_max_degree: 10,
                b_limit_s: 300.0,
                c_n: 512,
                c_layers: 8,
                c_hidden: 64,
                c_heads: 4,
                c_head_dim: 16,
                c_inter: 128,
                c_vocab: 256,
                c_r: 1.0,
            }
        };
        if let Some(ns) = &o.ns {
            if ns.is_empty() || ns.contains(&0) {
                return bad("--ns: lengths must be positive".into());
            }
            p.ns = ns.clone();
            p.ns.sort_unstable();
            p.ns.dedup();
        }
        for (name, cfg, dst) in
            [("--poly", &o.poly_configs, &mut p.poly), ("--altgrad", &o.altgrad_configs, &mut p.altgrad)]
        {
            if let Some(c) = cfg {
                for &(d, g) in c {
                    if d == 0 {
                        return bad(format!("{name}: head_dim must be positive"));
                    }
                    attention::bound::validate_degree(g)?;
                }
                *dst = c.clone();
            }
        }
        if let Some(e) = &o.exact_dims {
            if e.contains(&0) {
                return bad("--exact: head_dim must be positive".into());
            }
            p.exact_dims = e.clone();
        }
        if let Some(l) = o.limit_s {
            if l.is_nan() || l <= 0.0 {
                return bad("--limit must be positive".into());
            }
            p.limit_s = l;
            p.b_limit_s = l;
        }
        Ok(p)
    }

    fn sweep_points(&self) -> usize {
        2 * self.ns.len() * (self.exact_dims.len() + self.poly.len() + self.altgrad.len())
    }
}

/// Random bounded inputs of one sweep point: `q, k, v, g ~ N(0, 1)`, then `q` rescaled so that
/// the largest head bound `R` (MATH §3, shifted scores, [`head_bounds`]) equals `r_target`.
pub(crate) struct Inputs<T> {
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub g: Vec<T>,
    pub shape: AttnShape,
    pub opts: AttnOptions,
    /// `R` after rescaling (max over heads).
    pub bound: f64,
}

pub(crate) fn bounded_inputs<T: Scalar>(
    n: usize,
    heads: usize,
    d: usize,
    causal: bool,
    r_target: f64,
    seed: u64,
) -> Result<Inputs<T>> {
    let shape = AttnShape::new(n, heads, heads, d);
    let opts = AttnOptions::standard(d, causal);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ ((n as u64) << 24) ^ ((d as u64) << 8) ^ causal as u64);
    let len = n * heads * d;
    let mut draw = || -> Vec<T> {
        (0..len)
            .map(|_| {
                let x: f64 = StandardNormal.sample(&mut rng);
                T::from_f64(x)
            })
            .collect()
    };
    let (mut q, k, v, g) = (draw(), draw(), draw(), draw());
    let r = head_bounds(&q, &k, &shape, &opts, true)?.into_iter().fold(0.0, f64::max);
    if r > 0.0 {
        let s = T::from_f64(r_target / r);
        for x in &mut q {
            *x *= s;
        }
    }
    let bound = head_bounds(&q, &k, &shape, &opts, true)?.into_iter().fold(0.0, f64::max);
    Ok(Inputs { q, k, v, g, shape, opts, bound })
}

/// One forward + backward of `method` on `inp`: `(fwd seconds, bwd seconds, o, grads)`.
pub(crate) fn run_method<T: Scalar>(
    method: Method,
    inp: &Inputs<T>,
    popts: &PolyOptions,
) -> Result<(f64, f64, Vec<T>, AttnGrads<T>)> {
    let (x, g, o) = (attention::Qkv::new(&inp.q, &inp.k, &inp.v, &inp.shape)?, &inp.g, &inp.opts);
    let t0 = Instant::now();
    Ok(match method {
        Method::Exact => {
            let f = attention::forward_exact(&x, o)?;
            let t1 = t0.elapsed().as_secs_f64();
            let gr = attention::backward_exact(&x, &f, g)?;
            (t1, t0.elapsed().as_secs_f64() - t1, f.o, gr)
        }
        Method::Poly | Method::AltGrad => {
            if method == Method::AltGrad {
                attention::altgrad::check_kron_state(&inp.shape, popts)?;
            }
            let f = attention::forward_poly(&x, o, popts)?;
            let t1 = t0.elapsed().as_secs_f64();
            let gr = if method == Method::Poly {
                attention::backward_poly(&x, &f, g)?
            } else {
                attention::backward_altgrad(&x, &f, g)?
            };
            (t1, t0.elapsed().as_secs_f64() - t1, f.o, gr)
        }
    })
}

/// Relative errors `(o, dq, dk, dv, [dq dk dv])` of an approximation against a reference.
pub(crate) fn grad_errors<T: Scalar>(
    o: &[T],
    gr: &AttnGrads<T>,
    o_ref: &[T],
    g_ref: &AttnGrads<T>,
) -> (f64, f64, f64, f64, f64) {
    let sq = |x: &[T], y: &[T]| -> (f64, f64) {
        x.iter().zip(y).fold((0.0, 0.0), |(a, b), (p, r)| {
            let (p, r) = (p.as_f64(), r.as_f64());
            (a + (p - r) * (p - r), b + r * r)
        })
    };
    let rel = |(a, b): (f64, f64)| if b > 0.0 { (a / b).sqrt() } else { a.sqrt() };
    let (eo, eq, ek, ev) = (sq(o, o_ref), sq(&gr.dq, &g_ref.dq), sq(&gr.dk, &g_ref.dk), sq(&gr.dv, &g_ref.dv));
    let all = (eq.0 + ek.0 + ev.0, eq.1 + ek.1 + ev.1);
    (rel(eo), rel(eq), rel(ek), rel(ev), rel(all))
}

struct Measured {
    fwd_s: f64,
    bwd_s: f64,
    median_s: f64,
    reps: usize,
    warmup: bool,
    peak_rss: u64,
    out: (Vec<f32>, AttnGrads<f32>),
}

/// Times one point: optional warm-up, then repetitions filling `plan.target_s`; memory as in the
/// module docs of [`super`].
fn measure(method: Method, inp: &Inputs<f32>, popts: &PolyOptions, plan: &Plan, predicted: f64) -> Result<Measured> {
    trim_heap();
    let base = current_rss_bytes().unwrap_or(0);
    let reset = reset_peak_rss();
    let sampler = RssSampler::start();
    let warmup = predicted < plan.warmup_limit_s;
    let mut first = None;
    if warmup {
        let (f, b, _, _) = run_method(method, inp, popts)?;
        first = Some(f + b);
    }
    let reps = first.map_or(1, |t| ((plan.target_s / t.max(1e-9)).floor() as usize).clamp(1, plan.max_reps));
    let (mut fw, mut bw, mut tot) = (Vec::new(), Vec::new(), Vec::new());
    let mut out = None;
    for _ in 0..reps {
        drop(out.take()); // free the previous repetition's outputs before the next one
        let (f, b, o, g) = run_method(method, inp, popts)?;
        fw.push(f);
        bw.push(b);
        tot.push(f + b);
        out = Some((o, g));
    }
    let sampled = sampler.stop();
    let peak = peak_rss_bytes().unwrap_or(0).max(sampled);
    Ok(Measured {
        fwd_s: median(&mut fw),
        bwd_s: median(&mut bw),
        median_s: median(&mut tot),
        reps,
        warmup,
        peak_rss: if reset { peak.saturating_sub(base) } else { peak },
        out: out.expect("at least one repetition"),
    })
}

/// Samples the resident set size every 2 ms on a helper thread and keeps the largest value.
/// `VmHWM` alone can miss peaks: the kernel updates the high-water mark only on some unmap
/// paths, so memory freed back to the allocator's heap may never be recorded.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    max: std::sync::Arc<std::sync::atomic::AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start() -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(statm_rss().unwrap_or(0)));
        let (s, m) = (stop.clone(), max.clone());
        let handle = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Some(r) = statm_rss() {
                        m.fetch_max(r, Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            })
            .ok();
        RssSampler { stop, max, handle }
    }

    /// Stops the thread; returns the largest RSS seen (bytes), including one last sample.
    fn stop(mut self) -> u64 {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.max.load(Ordering::Relaxed).max(statm_rss().unwrap_or(0))
    }
}

/// Resident set size from `/proc/self/statm` (second field, pages of 4 KiB).
fn statm_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

type SeriesKey = (Method, usize, usize, bool);

fn sweep(plan: &Plan, peak: f64, tick: &dyn Fn(&str)) -> Result<(Vec<BenchRun>, Vec<Skipped>)> {
    let mut dims: Vec<usize> = plan
        .exact_dims
        .iter()
        .copied()
        .chain(plan.poly.iter().map(|c| c.0))
        .chain(plan.altgrad.iter().map(|c| c.0))
        .collect();
    dims.sort_unstable();
    dims.dedup();
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    let mut last: HashMap<SeriesKey, (usize, f64)> = HashMap::new();
    for &d in &dims {
        for causal in [false, true] {
            for &n in &plan.ns {
                let mut todo: Vec<(Method, Option<usize>)> = Vec::new();
                if plan.exact_dims.contains(&d) {
                    todo.push((Method::Exact, None));
                }
                todo.extend(plan.poly.iter().filter(|c| c.0 == d).map(|c| (Method::Poly, Some(c.1))));
                todo.extend(plan.altgrad.iter().filter(|c| c.0 == d).map(|c| (Method::AltGrad, Some(c.1))));
                let inp = bounded_inputs::<f32>(n, plan.heads, d, causal, 1.0, plan.seed)?;
                let mut reference: Option<(Vec<f32>, AttnGrads<f32>)> = None;
                let mut exact_s: Option<f64> = None;
                for (method, g) in todo {
                    let label = format!(
                        "{method} d={d}{} n={n}{}",
                        g.map_or(String::new(), |g| format!(" g={g}")),
                        if causal { " causal" } else { "" }
                    );
                    tick(&label);
                    let key = (method, d, g.unwrap_or(0), causal);
                    let power = if method == Method::Exact { 2 } else { 1 };
                    let predicted = last.get(&key).map_or(0.0, |(m, t)| t * (n as f64 / *m as f64).powi(power));
                    let skip = |reason: String| Skipped {
                        method: method.as_str().into(),
                        n,
                        head_dim: d,
                        degree: g,
                        causal,
                        reason,
                    };
                    if predicted > plan.limit_s {
                        skipped.push(skip(format!(
                            "{} for one fwd+bwd (from the previous size, ∝ n^{power})",
                            super::over_limit(predicted, plan.limit_s)
                        )));
                        continue;
                    }
                    let rank = g.and_then(|g| feature_dim(d, g));
                    let chunk = if causal { plan.chunk } else { plan.stream_chunk };
                    let popts = PolyOptions { degree: g.unwrap_or(2), center: true, chunk };
                    let m = match measure(method, &inp, &popts, plan, predicted) {
                        Ok(m) => m,
                        Err(e) if e.is_user_error() => {
                            skipped.push(skip(e.to_string()));
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    last.insert(key, (n, m.median_s));
                    let flops = plan.heads as f64 * method.flops(n, d, d, rank.unwrap_or(0), causal, chunk);
                    let gflops = flops / m.median_s / 1e9;
                    let (err_o, err_dq, err_dk, err_dv, err_grad) = match (&reference, method) {
                        (Some((o_ref, g_ref)), Method::Poly | Method::AltGrad) => {
                            let e = grad_errors(&m.out.0, &m.out.1, o_ref, g_ref);
                            (Some(e.0), Some(e.1), Some(e.2), Some(e.3), Some(e.4))
                        }
                        _ => (None, None, None, None, None),
                    };
                    let speedup = if method == Method::Exact { None } else { exact_s.map(|t| t / m.median_s) };
                    runs.push(BenchRun {
                        method: method.as_str().into(),
                        n,
                        head_dim: d,
                        degree: g,
                        rank,
                        causal,
                        heads: plan.heads,
                        chunk: g.map(|_| chunk),
                        reps: m.reps,
                        warmup: m.warmup,
                        median_s: m.median_s,
                        fwd_s: m.fwd_s,
                        bwd_s: m.bwd_s,
                        flops,
                        gflops,
                        frac_of_peak: gflops / peak,
                        peak_rss_bytes: m.peak_rss,
                        state_bytes: (plan.heads * method.state_bytes(d, d, rank.unwrap_or(0), chunk, 4)) as u64,
                        speedup_vs_exact: speedup,
                        err_o,
                        err_dq,
                        err_dk,
                        err_dv,
                        err_grad,
                    });
                    if method == Method::Exact {
                        exact_s = Some(m.median_s);
                        reference = Some(m.out);
                    }
                }
            }
        }
    }
    Ok((runs, skipped))
}

/// Exponent of time in n per series over the largest sizes (n ≥ n_max/4, i.e. the last three
/// powers of two).
fn fits(runs: &[BenchRun]) -> Vec<Fit> {
    let mut keys: Vec<(String, usize, Option<usize>, bool)> = Vec::new();
    for r in runs {
        let k = (r.method.clone(), r.head_dim, r.degree, r.causal);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .filter_map(|(m, d, g, causal)| {
            let mut pts: Vec<(usize, f64)> = runs
                .iter()
                .filter(|r| r.method == m && r.head_dim == d && r.degree == g && r.causal == causal)
                .map(|r| (r.n, r.median_s))
                .collect();
            pts.sort_by_key(|p| p.0);
            let n_max = pts.last()?.0;
            let tail: Vec<(f64, f64)> = pts.iter().filter(|p| p.0 * 4 >= n_max).map(|p| (p.0 as f64, p.1)).collect();
            if tail.len() < 2 {
                return None;
            }
            Some(Fit {
                method: m,
                head_dim: d,
                degree: g,
                causal,
                exponent: super::loglog_slope(&tail),
                n_min: tail[0].0 as usize,
                n_max,
                points: tail.len(),
            })
        })
        .collect()
}

fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Runs the benchmarks and the paper-claims measurements described by `opts` and writes into
/// `opts.out_dir`: `bench.json` ([`BenchReport`]; keys `gemm_peak_gflops`, `runs`, `fits`,
/// `claims`, `roofline`, …), `bench.csv` (one row per run, header
/// [`super::CSV_HEADER`]), `bench.md` ([`BenchReport::markdown`]) and the plots
/// `time_vs_n_{noncausal,causal}`, `speedup_vs_n_*`, `error_o_vs_n_*`, `error_grad_vs_n_*`,
/// `claim_error_vs_n`, `claim_multilayer` (each `.png` and `.svg`).
///
/// The sweep (f32, `opts.heads` heads, default 4): for each head width, mask and n, bounded
/// inputs (`q` rescaled so the largest head bound `R` is 1), then exact (the reference), poly and
/// altgrad at each configured degree: a warm-up run and the median of repeated forward + backward
/// runs, FLOPs (MATH §7, [`Method::flops`]), GFLOP/s and the ratio to the f32 GEMM peak
/// measured in the same run (the faster of before and after the sweep), the point's peak memory,
/// the speed-up over exact and the relative errors of `o`, `dq`, `dk`, `dv` against exact. Points whose predicted time
/// exceeds the limit are listed in `skipped` with the reason. Each step is reported to
/// `on_progress` (the CLI draws a progress bar); nothing is printed to stdout (print [`BenchReport::markdown`] or
/// `report.claims.markdown`).
///
/// Errors: [`Error::BadInput`] for invalid options, [`Error::Io`] when the directory or a file
/// cannot be written.
pub fn run_bench(opts: &BenchOptions, on_progress: &dyn Fn(Progress)) -> Result<BenchReport> {
    let start = Instant::now();
    let plan = Plan::new(opts)?;
    let dir = &opts.out_dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
    let load_start = loadavg();
    let claim_points = if plan.claims { 2 * plan.b_ns.len() + 2 * plan.c_layers } else { 0 };
    let roof_points = if plan.roofline { 6 } else { 0 };
    let total = (4 + plan.sweep_points() + claim_points + roof_points) as u64;
    let done = std::cell::Cell::new(0u64);
    let tick = |msg: &str| {
        done.set(done.get() + 1);
        on_progress(Progress { done: done.get(), total, message: msg });
    };
    let gn = plan.gemm_n;
    tick("GEMM peak (all threads)");
    let peak_start = gemm_peak_gflops(gn, gn, gn, 5, false);
    tick("GEMM k = 64");
    let kn = gn.clamp(256, 4096) * 2;
    let peak_k64 = gemm_peak_gflops(kn, 64, kn, 5, false);
    tick("GEMM peak (one thread)");
    let p1n = gn.min(1024);
    let peak1 = gemm_peak_gflops(p1n, p1n, p1n, 5, true);
    let memory_method = if reset_peak_rss() {
        "per point: heap trimmed (malloc_trim), VmHWM reset through /proc/self/clear_refs, RSS sampled every 2 ms \
         during the point; peak_rss_bytes = max(VmHWM, sampled RSS) − VmRSS before the point (inputs and the exact \
         reference are in the baseline)"
    } else {
        "process-wide VmHWM (no reset available): peak_rss_bytes is the process peak so far"
    }
    .to_string();

    let (mut runs, skipped) = sweep(&plan, peak_start, &tick)?;
    tick("GEMM peak again (all threads)");
    let peak_end = gemm_peak_gflops(gn, gn, gn, 5, false);
    let peak = peak_start.max(peak_end);
    for r in &mut runs {
        r.frac_of_peak = r.gflops / peak;
    }
    runs.sort_by_key(|a| (a.causal, a.head_dim, Method::report_order(&a.method), a.degree, a.n));
    let fits = fits(&runs);

    let command = opts.command_line();
    let error_claim = if plan.claims { Some(error_claim(&plan, &tick)?) } else { None };
    let multi = if plan.claims { Some(multilayer_claim(&plan, &tick)?) } else { None };
    let time = exponent_claims(&fits);
    let cross = crossovers(&runs);
    let markdown = claims_markdown(&command, &time, error_claim.as_ref(), multi.as_ref(), &cross);
    let claims =
        Claims { time_exponent: time, error_vs_n: error_claim, multi_layer: multi, crossover: cross, markdown };

    let mut roofline: Vec<StageProfile> = Vec::new();
    if plan.roofline {
        let n = plan.profile_n;
        // the poly configuration with the widest head and the one with the largest feature width
        let mut cfgs: Vec<(usize, usize)> = Vec::new();
        for c in [
            plan.poly.iter().max_by_key(|(d, g)| (*d, feature_dim(*d, *g).unwrap_or(0))),
            plan.poly.iter().max_by_key(|(d, g)| feature_dim(*d, *g).unwrap_or(0)),
        ]
        .into_iter()
        .flatten()
        {
            if !cfgs.contains(c) {
                cfgs.push(*c);
            }
        }
        for &(d, g) in &cfgs {
            for causal in [false, true] {
                tick(&format!("roofline poly d={d} g={g} causal={causal}"));
                let c = if causal { plan.chunk } else { plan.stream_chunk };
                let mut p = profile_poly_stages(n, d, g, causal, c, peak1)?;
                p.sweep_frac_of_peak = sweep_frac(&runs, "poly", n, d, Some(g), causal);
                roofline.push(p);
            }
        }
        if let Some(&d) = plan.exact_dims.iter().max() {
            for causal in [false, true] {
                tick(&format!("roofline exact d={d} causal={causal}"));
                let mut p = profile_exact_stages(n, d, causal, peak1);
                p.sweep_frac_of_peak = sweep_frac(&runs, "exact", n, d, None, causal);
                roofline.push(p);
            }
        }
    }

    let mut report = BenchReport {
        command,
        quick: opts.quick,
        threads: rayon::current_num_threads(),
        cpu: cpu_name(),
        loadavg_start: load_start,
        loadavg_end: loadavg(),
        dtype: "f32".into(),
        heads: plan.heads,
        gemm_peak_gflops: peak,
        gemm_peak_start_gflops: peak_start,
        gemm_peak_end_gflops: peak_end,
        gemm_k64_gflops: peak_k64,
        gemm_peak_1thread_gflops: peak1,
        memory_method,
        runs,
        skipped,
        fits,
        claims,
        roofline,
        files: Vec::new(),
        elapsed_s: 0.0,
    };
    let mut files: Vec<String> =
        report.charts().iter().flat_map(|c| [format!("{}.png", c.stem), format!("{}.svg", c.stem)]).collect();
    files.extend(["bench.json", "bench.csv", "bench.md"].map(String::from));
    report.files = files;
    report.elapsed_s = start.elapsed().as_secs_f64();
    let json = serde_json::to_vec_pretty(&report).map_err(|e| Error::Internal(format!("bench report JSON: {e}")))?;
    write_file_atomic(&dir.join("bench.json"), &json)?;
    write_file_atomic(&dir.join("bench.csv"), report.csv().as_bytes())?;
    write_file_atomic(&dir.join("bench.md"), report.markdown().as_bytes())?;
    Ok(report)
}

fn sweep_frac(runs: &[BenchRun], m: &str, n: usize, d: usize, g: Option<usize>, causal: bool) -> Option<f64> {
    runs.iter()
        .find(|r| r.method == m && r.n == n && r.head_dim == d && r.degree == g && r.causal == causal)
        .map(|r| r.frac_of_peak)
}
