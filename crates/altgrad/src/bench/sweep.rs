//! [`run_bench`]: the sweep, the claims, the roofline, and the files.

use super::claims::{claims_markdown, crossovers, error_claim, exponent_claims, multilayer_claim};
use super::plan::{bounded_inputs, grad_errors, run_method_into, BenchOptions, Buffers, Inputs, Plan};
use super::profile::{profile_exact_stages, profile_poly_stages, StageProfile};
use super::report::{BenchReport, BenchRun, Claims, Fit, Skipped};
use super::{current_rss_bytes, gemm_peak_gflops, median, peak_rss_bytes, reset_peak_rss, trim_heap};
use crate::attention::features::feature_dim;
use crate::attention::{AttnGrads, Method, PolyOptions};
use crate::io::write_file_atomic;
use crate::Progress;
use crate::{Error, Result};
use std::collections::HashMap;
use std::time::Instant;

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
    // one set of outputs and scratch for every repetition (Buffers: the kernels are timed, not the
    // first touch of fresh allocations)
    let mut bufs = Buffers::new(method, inp);
    let mut first = None;
    if warmup {
        let (f, b) = run_method_into(method, inp, popts, &mut bufs)?;
        first = Some(f + b);
    }
    let reps = first.map_or(1, |t| ((plan.target_s / t.max(1e-9)).floor() as usize).clamp(1, plan.max_reps));
    let (mut fw, mut bw, mut tot) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let (f, b) = run_method_into(method, inp, popts, &mut bufs)?;
        fw.push(f);
        bw.push(b);
        tot.push(f + b);
    }
    let out = bufs.outputs();
    let sampled = sampler.stop();
    let peak = peak_rss_bytes().unwrap_or(0).max(sampled);
    Ok(Measured {
        fwd_s: median(&mut fw),
        bwd_s: median(&mut bw),
        median_s: median(&mut tot),
        reps,
        warmup,
        peak_rss: if reset { peak.saturating_sub(base) } else { peak },
        out,
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

/// The CPU model and the SIMD level the kernels run at (for the report's `cpu`).
fn cpu_name() -> String {
    use crate::simd::Level;
    let (used, hw) = (Level::detect(), Level::hardware());
    let simd = if used == hw {
        format!("SIMD {}", used.name())
    } else {
        format!(
            "SIMD {} of the CPU's {}, capped by ALTGRAD_SIMD; faer's GEMM in the peak is not capped",
            used.name(),
            hw.name()
        )
    };
    format!("{} ({simd})", cpu_model())
}

/// The CPU model name from `/proc/cpuinfo` (`unknown` without one).
fn cpu_model() -> String {
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
/// Errors: [`Error::BadInput`] for invalid options or an `out_dir` that is a file, [`Error::Io`]
/// when the directory or a file cannot be written.
pub fn run_bench(opts: &BenchOptions, on_progress: &dyn Fn(Progress)) -> Result<BenchReport> {
    let start = Instant::now();
    let plan = Plan::new(opts)?;
    let dir = &opts.out_dir;
    if dir.exists() && !dir.is_dir() {
        return Err(Error::bad("--out", format!("{} exists and is not a directory", dir.display())));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("--out {}", dir.display()), e))?;
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
                p.sweep_frac_of_peak = sweep_frac(&runs, Method::Poly.as_str(), n, d, Some(g), causal);
                roofline.push(p);
            }
        }
        if let Some(&d) = plan.exact_dims.iter().max() {
            for causal in [false, true] {
                tick(&format!("roofline exact d={d} causal={causal}"));
                let mut p = profile_exact_stages(n, d, causal, peak1);
                p.sweep_frac_of_peak = sweep_frac(&runs, Method::Exact.as_str(), n, d, None, causal);
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
