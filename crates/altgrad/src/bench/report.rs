//! The bench report: JSON types, the CSV, the markdown summary and the plots.

use super::profile::StageProfile;
use crate::attention::Method;
use crate::chart::{ChartSpec, LineChart, Series};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// One measured point of the sweep (f32, all heads, forward + backward).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BenchRun {
    /// `exact`, `poly` or `altgrad`.
    pub method: String,
    /// Sequence length.
    pub n: usize,
    /// Head width `d` (= `d_v`).
    pub head_dim: usize,
    /// Polynomial degree `g`; `null` for exact.
    pub degree: Option<usize>,
    /// Feature width `r = C(d+g, g)`; `null` for exact.
    pub rank: Option<usize>,
    /// Causal mask.
    pub causal: bool,
    /// Query heads (= key/value heads).
    pub heads: usize,
    /// Chunk `C` of the polynomial kernels; `null` for exact.
    pub chunk: Option<usize>,
    /// Timed repetitions (after the warm-up).
    pub reps: usize,
    /// Whether a warm-up run of this very point preceded the timed runs (skipped only for points
    /// predicted to take longer than the warm-up limit; smaller sizes of the same series ran before).
    pub warmup: bool,
    /// Median seconds of forward + backward.
    pub median_s: f64,
    /// Median forward seconds.
    pub fwd_s: f64,
    /// Median backward seconds.
    pub bwd_s: f64,
    /// FLOPs of forward + backward, all heads (MATH §7; see `attention::Method::flops`).
    pub flops: f64,
    /// `flops / median_s / 1e9`.
    pub gflops: f64,
    /// `gflops / gemm_peak_gflops`.
    pub frac_of_peak: f64,
    /// Extra resident memory of this point (see `memory_method` in the report), bytes.
    pub peak_rss_bytes: u64,
    /// Analytic working memory of the kernels, all heads, excluding inputs, outputs and O(n)
    /// per-head buffers (exact: the score tiles; poly: `cost::poly_state_bytes`; altgrad: the two
    /// Kronecker states plus chunk scratch), bytes.
    pub state_bytes: u64,
    /// Exact time / this time at the same `(n, head_dim, causal)`, when exact ran.
    pub speedup_vs_exact: Option<f64>,
    /// Relative error of `o` against exact (bounded inputs), when exact ran.
    pub err_o: Option<f64>,
    /// Relative error of `dq`.
    pub err_dq: Option<f64>,
    /// Relative error of `dk`.
    pub err_dk: Option<f64>,
    /// Relative error of `dv`.
    pub err_dv: Option<f64>,
    /// Relative error of `dq, dk, dv` concatenated.
    pub err_grad: Option<f64>,
}

/// A point the sweep did not run, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Skipped {
    /// Method.
    pub method: String,
    /// Sequence length.
    pub n: usize,
    /// Head width.
    pub head_dim: usize,
    /// Degree (approximate methods).
    pub degree: Option<usize>,
    /// Causal mask.
    pub causal: bool,
    /// Why (predicted time above the limit, a size limit of the kernel, …).
    pub reason: String,
}

/// Least-squares exponent of time in n for one series.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Fit {
    /// Method.
    pub method: String,
    /// Head width.
    pub head_dim: usize,
    /// Degree (approximate methods).
    pub degree: Option<usize>,
    /// Causal mask.
    pub causal: bool,
    /// Slope of `ln median_s` against `ln n` over the largest measured sizes.
    pub exponent: f64,
    /// Smallest n of the fit.
    pub n_min: usize,
    /// Largest n of the fit.
    pub n_max: usize,
    /// Number of points fitted.
    pub points: usize,
}

/// The paper-claims data (`claims` in `bench.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    /// (a) time `n^{1+o(1)}`: fitted exponents per method.
    pub time_exponent: Vec<ExponentClaim>,
    /// (b) error `1/poly(n)` at the degree chosen for ε = 1/n on bounded inputs.
    pub error_vs_n: Option<ErrorClaim>,
    /// (c) whole-model gradient error against the number of layers.
    pub multi_layer: Option<MultiLayerClaim>,
    /// (d) crossover lengths and the largest speed-ups.
    pub crossover: Vec<Crossover>,
    /// The claims table as markdown (claim — what we measured — command).
    pub markdown: String,
}

/// Everything `run_bench` measured; serialized as `bench.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BenchReport {
    /// The command that reproduces this report.
    pub command: String,
    /// `--quick`.
    pub quick: bool,
    /// rayon threads (= the threads of every GEMM peak and kernel).
    pub threads: usize,
    /// CPU model from `/proc/cpuinfo` and, in parentheses, the SIMD level the kernels ran at
    /// (`SIMD avx512`, or the level `ALTGRAD_SIMD` capped it to).
    pub cpu: String,
    /// `/proc/loadavg` (1, 5, 15 min) at the start: above ~0.3 the machine was shared.
    pub loadavg_start: Vec<f64>,
    /// `/proc/loadavg` at the end.
    pub loadavg_end: Vec<f64>,
    /// Element type of the sweep (`f32`).
    pub dtype: String,
    /// Query heads of every sweep point.
    pub heads: usize,
    /// f32 GEMM 2048³ on all threads, GFLOP/s: the peak every ratio uses, the larger of
    /// `gemm_peak_start_gflops` and `gemm_peak_end_gflops` (each the fastest of 5 runs of altgrad's
    /// product and of faer's, whichever is faster: [`super::gemm_peak_gflops`]; before 2026-12-08
    /// altgrad's alone).
    pub gemm_peak_gflops: f64,
    /// The peak measured before the sweep.
    pub gemm_peak_start_gflops: f64,
    /// The peak measured after the sweep (a large difference means the machine was shared).
    pub gemm_peak_end_gflops: f64,
    /// f32 GEMM with inner dimension 64 (`4096×64×4096`), all threads, GFLOP/s (fastest of 5).
    pub gemm_k64_gflops: f64,
    /// f32 GEMM 1024³ on one thread, GFLOP/s, fastest of 5 (the ceiling of one head's sequential kernel).
    pub gemm_peak_1thread_gflops: f64,
    /// How `peak_rss_bytes` was measured.
    pub memory_method: String,
    /// Every measured point.
    pub runs: Vec<BenchRun>,
    /// Points not run, and why.
    pub skipped: Vec<Skipped>,
    /// Exponent of time in n per series.
    pub fits: Vec<Fit>,
    /// The paper-claims data.
    pub claims: Claims,
    /// Stage breakdowns of the largest poly and exact cases (one head, one thread).
    pub roofline: Vec<StageProfile>,
    /// Files written (relative to the output directory).
    pub files: Vec<String>,
    /// Wall-clock seconds of the whole run.
    pub elapsed_s: f64,
}

/// Claim (a): the range of fitted exponents of time in n for one method.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExponentClaim {
    /// Method.
    pub method: String,
    /// Smallest fitted exponent over the method's series.
    pub exponent_min: f64,
    /// Largest fitted exponent.
    pub exponent_max: f64,
    /// Number of series (head_dim × degree × causal).
    pub series: usize,
    /// Largest n in any of the fits.
    pub n_max: usize,
}

/// One point of claim (b).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorClaimPoint {
    /// `poly` or `altgrad`.
    pub method: String,
    /// Causal mask.
    pub causal: bool,
    /// Sequence length.
    pub n: usize,
    /// Degree chosen: the smallest even `g` with `ε_A(R, g) ≤ 1/n` (`bound::choose_degree`).
    pub degree: usize,
    /// Feature width `r`.
    pub rank: usize,
    /// Target `1/n`.
    pub eps_target: f64,
    /// `ε_A(R, g)`, the entrywise bound on the attention matrix.
    pub eps_a: f64,
    /// The largest shifted score `|s_ij − m_i|` actually present (max over heads and allowed
    /// pairs), which `R` bounds: how loose the bound is on these inputs.
    pub max_abs_shifted_score: f64,
    /// Relative error of `o` against exact (f64).
    pub err_o: f64,
    /// Relative error of `dq, dk, dv` concatenated.
    pub err_grad: f64,
    /// Seconds of forward + backward (one run, f64).
    pub seconds: f64,
}

/// Slope of `ln err` against `ln n` for one method and mask.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorSlope {
    /// Method.
    pub method: String,
    /// Causal mask.
    pub causal: bool,
    /// Slope for the output error.
    pub slope_o: f64,
    /// Slope for the gradient error.
    pub slope_grad: f64,
    /// Largest `err_grad · n` over the points (≤ 1 means the error met the 1/n target).
    pub max_err_grad_times_n: f64,
}

/// Claim (b): error against n on bounded inputs with the degree chosen for ε = 1/n.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorClaim {
    /// Head width.
    pub head_dim: usize,
    /// Heads (query = key/value).
    pub heads: usize,
    /// The score bound `R` of the inputs (queries rescaled so that the largest head bound is R).
    pub r_bound: f64,
    /// Element type (`f64`, so that rounding does not floor the errors).
    pub dtype: String,
    /// Chunk of the kernels.
    pub chunk: usize,
    /// Largest degree considered.
    pub max_degree: usize,
    /// Measured points.
    pub points: Vec<ErrorClaimPoint>,
    /// Fitted slopes.
    pub slopes: Vec<ErrorSlope>,
    /// Points not run, and why.
    pub skipped: Vec<String>,
}

/// One point of claim (c).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MultiLayerPoint {
    /// Number of layers m.
    pub layers: usize,
    /// `poly` or `altgrad`.
    pub method: String,
    /// Degree.
    pub degree: usize,
    /// Relative error of all parameter gradients concatenated, against the exact model's.
    pub rel_err_grad: f64,
    /// `|L − L_exact| / |L_exact|`.
    pub rel_err_loss: f64,
    /// Seconds of forward + backward of this model.
    pub seconds: f64,
}

impl MultiLayerPoint {
    /// `poly g=2`-style label.
    pub fn label(&self) -> String {
        format!("{} g={}", self.method, self.degree)
    }
}

/// Claim (c): whole-model gradient error against the number of layers on a bounded-score Llama.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MultiLayerClaim {
    /// Model width.
    pub hidden: usize,
    /// Heads per layer (= key/value heads).
    pub heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// SwiGLU width.
    pub intermediate: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Tokens (random ids, seeded).
    pub seq_len: usize,
    /// Element type (`f64`).
    pub dtype: String,
    /// Target score bound: each layer's q/k projections are scaled so its largest head bound `R` is this.
    pub r_target: f64,
    /// The measured `R` of each layer of the deepest model after scaling (max over heads).
    pub layer_bounds: Vec<f64>,
    /// Measured points.
    pub points: Vec<MultiLayerPoint>,
}

/// Claim (d): where an approximate method overtakes exact, and the best speed-up measured.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Crossover {
    /// `poly` or `altgrad`.
    pub method: String,
    /// Head width.
    pub head_dim: usize,
    /// Degree.
    pub degree: usize,
    /// Feature width.
    pub rank: usize,
    /// Causal mask.
    pub causal: bool,
    /// Measured crossover n (log-log interpolation between the sizes around speed-up 1); `null`
    /// when the method was faster at every size or never faster (see `note`).
    pub crossover_n: Option<f64>,
    /// How `crossover_n` was found, or why it is missing.
    pub note: String,
    /// Cost-model crossover `n* = n · flops(method) / flops(exact)` (MATH §7), large-n limit.
    pub model_crossover_n: f64,
    /// Largest measured speed-up (exact time / method time).
    pub max_speedup: Option<f64>,
    /// The n of `max_speedup`.
    pub max_speedup_n: Option<usize>,
}

/// Header of `bench.csv` (one row per [`BenchRun`], same field names).
pub const CSV_HEADER: &str = "method,n,head_dim,degree,rank,causal,heads,chunk,reps,warmup,median_s,fwd_s,bwd_s,flops,gflops,frac_of_peak,peak_rss_bytes,state_bytes,speedup_vs_exact,err_o,err_dq,err_dk,err_dv,err_grad";

fn opt<T: std::fmt::Display>(x: Option<T>) -> String {
    x.map_or(String::new(), |v| v.to_string())
}

fn fopt(x: Option<f64>) -> String {
    x.map_or(String::new(), |v| format!("{v:.6e}"))
}

pub(crate) fn series_label(method: &str, d: usize, g: Option<usize>) -> String {
    match g {
        Some(g) => format!("{method} d={d} g={g}"),
        None => format!("{method} d={d}"),
    }
}

/// `1.23e-4`-style with 2 significant digits, or `—`.
pub(crate) fn sci(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.2e}"),
        _ => "—".into(),
    }
}

impl BenchReport {
    /// `bench.csv`: [`CSV_HEADER`] and one line per run.
    pub fn csv(&self) -> String {
        let mut s = String::from(CSV_HEADER);
        s.push('\n');
        for r in &self.runs {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{},{},{},{:.6e},{:.6e},{:.6e},{:.6e},{:.3},{:.4},{},{},{},{},{},{},{},{}",
                r.method,
                r.n,
                r.head_dim,
                opt(r.degree),
                opt(r.rank),
                r.causal,
                r.heads,
                opt(r.chunk),
                r.reps,
                r.warmup,
                r.median_s,
                r.fwd_s,
                r.bwd_s,
                r.flops,
                r.gflops,
                r.frac_of_peak,
                r.peak_rss_bytes,
                r.state_bytes,
                r.speedup_vs_exact.map_or(String::new(), |v| format!("{v:.4}")),
                fopt(r.err_o),
                fopt(r.err_dq),
                fopt(r.err_dk),
                fopt(r.err_dv),
                fopt(r.err_grad),
            );
        }
        s
    }

    /// What the CLI prints: one line on the machine and the peak, the fitted exponents, the
    /// claims table with its detail tables, the roofline and the files written (everything of
    /// [`BenchReport::markdown`] but the long per-point table, which is in `bench.md`/`bench.csv`).
    pub fn summary_markdown(&self) -> String {
        let full = self.markdown();
        let start = full.find("## Exponent of time").unwrap_or(0);
        let mut s = format!(
            "altgrad bench: {} points in {:.0} s; {} threads, f32 GEMM peak {:.1} GFLOP/s; load average {:?} → {:?}\n\n",
            self.runs.len(),
            self.elapsed_s,
            self.threads,
            self.gemm_peak_gflops,
            self.loadavg_start,
            self.loadavg_end
        );
        s.push_str(&full[start..]);
        let _ = writeln!(s, "\nFiles: {}", self.files.join(", "));
        s
    }

    /// The whole report as markdown: machine, sweep table, fits, claims table, crossovers,
    /// roofline (`bench.md`).
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# altgrad bench\n");
        let _ = writeln!(s, "Command: `{}`\n", self.command);
        let _ = writeln!(
            s,
            "Machine: {} — {} rayon threads; load average at start {:?}, at end {:?} (above ~0.3: shared, timings noisy). \
             f32 GEMM peak {:.1} GFLOP/s (the faster of altgrad's product and faer's; before/after the sweep {:.1}/{:.1}; inner dim 64: {:.1}; one thread: {:.1}). Memory: {}. Elapsed {:.0} s.\n",
            self.cpu,
            self.threads,
            self.loadavg_start,
            self.loadavg_end,
            self.gemm_peak_gflops,
            self.gemm_peak_start_gflops,
            self.gemm_peak_end_gflops,
            self.gemm_k64_gflops,
            self.gemm_peak_1thread_gflops,
            self.memory_method,
            self.elapsed_s
        );
        let _ = writeln!(
            s,
            "## Sweep ({} heads, f32, fwd+bwd, median; `_into` entry points, outputs and workspace reused across \
             repetitions)\n",
            self.heads
        );
        let _ = writeln!(
            s,
            "| method | causal | d | g | r | n | median s | GFLOP | GFLOP/s | % peak | speed-up | err o | err grad | peak RSS MiB |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &self.runs {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {:.4} | {:.2} | {:.1} | {:.0}% | {} | {} | {} | {:.1} |",
                r.method,
                r.causal,
                r.head_dim,
                opt(r.degree),
                opt(r.rank),
                r.n,
                r.median_s,
                r.flops / 1e9,
                r.gflops,
                100.0 * r.frac_of_peak,
                r.speedup_vs_exact.map_or("—".into(), |v| format!("{v:.2}×")),
                sci(r.err_o),
                sci(r.err_grad),
                r.peak_rss_bytes as f64 / (1u64 << 20) as f64
            );
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(s, "\nSkipped:\n");
            for k in &self.skipped {
                let _ = writeln!(
                    s,
                    "- {} causal={} n={}: {}",
                    series_label(&k.method, k.head_dim, k.degree),
                    k.causal,
                    k.n,
                    k.reason
                );
            }
        }
        let _ = writeln!(s, "\n## Exponent of time in n (least squares over the largest sizes)\n");
        let _ = writeln!(s, "| series | causal | exponent | n range |");
        let _ = writeln!(s, "|---|---|---|---|");
        for f in &self.fits {
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {}–{} ({} pts) |",
                series_label(&f.method, f.head_dim, f.degree),
                f.causal,
                f.exponent,
                f.n_min,
                f.n_max,
                f.points
            );
        }
        let _ = writeln!(s, "\n{}", self.claims.markdown);
        if !self.roofline.is_empty() {
            let _ = writeln!(s, "\n## Roofline (one head, one thread; stage breakdown)\n");
            for p in &self.roofline {
                s.push_str(&p.markdown());
                s.push('\n');
            }
        }
        s
    }

    /// The report's charts (time, speed-up and error against n, the claims), as data for the CLI
    /// to draw (`<stem>.png` / `<stem>.svg` in the output directory); charts without points are
    /// left out.
    pub fn charts(&self) -> Vec<ChartSpec> {
        let mut files = Vec::new();
        let mut draw = |stem: &str, chart: LineChart, series: Vec<Series>| {
            if series.iter().all(|s| s.points.is_empty()) {
                return;
            }
            files.push(ChartSpec {
                stem: stem.to_string(),
                title: chart.title.to_string(),
                x_label: chart.x_label.to_string(),
                y_label: chart.y_label.to_string(),
                log_x: chart.log_x,
                log_y: chart.log_y,
                series,
            });
        };
        for causal in [false, true] {
            let tag = if causal { "causal" } else { "noncausal" };
            let keys = self.series_keys(causal);
            // time vs n, with fitted slopes in the legend
            let series: Vec<Series> = keys
                .iter()
                .map(|(m, d, g)| {
                    let slope = self
                        .fits
                        .iter()
                        .find(|f| &f.method == m && f.head_dim == *d && f.degree == *g && f.causal == causal)
                        .map_or("—".into(), |f| format!("{:.2}", f.exponent));
                    Series {
                        label: format!("{} (slope {slope})", series_label(m, *d, *g)),
                        points: self.points(m, *d, *g, causal, |r| Some(r.median_s)),
                    }
                })
                .collect();
            let title = format!("fwd+bwd time vs n ({tag}, {} heads, f32)", self.heads);
            draw(
                &format!("time_vs_n_{tag}"),
                LineChart { title: &title, x_label: "n", y_label: "seconds", log_x: true, log_y: true },
                series,
            );
            // speed-up vs n
            let approx: Vec<_> = keys.iter().filter(|k| k.0 != Method::Exact.as_str()).collect();
            let series: Vec<Series> = approx
                .iter()
                .map(|(m, d, g)| Series {
                    label: series_label(m, *d, *g),
                    points: self.points(m, *d, *g, causal, |r| r.speedup_vs_exact),
                })
                .collect();
            let title = format!("speed-up over exact vs n ({tag})");
            draw(
                &format!("speedup_vs_n_{tag}"),
                LineChart {
                    title: &title,
                    x_label: "n",
                    y_label: "exact time / method time",
                    log_x: true,
                    log_y: true,
                },
                series,
            );
            // errors vs n
            for (what, get) in
                [("o", (|r: &BenchRun| r.err_o) as fn(&BenchRun) -> Option<f64>), ("grad", |r: &BenchRun| r.err_grad)]
            {
                let series: Vec<Series> = approx
                    .iter()
                    .map(|(m, d, g)| Series {
                        label: series_label(m, *d, *g),
                        points: self.points(m, *d, *g, causal, get),
                    })
                    .collect();
                let title = if what == "o" {
                    format!("relative error of o vs exact ({tag}, R = 1)")
                } else {
                    format!("relative error of dq,dk,dv vs exact ({tag}, R = 1)")
                };
                draw(
                    &format!("error_{what}_vs_n_{tag}"),
                    LineChart { title: &title, x_label: "n", y_label: "relative error", log_x: true, log_y: true },
                    series,
                );
            }
        }
        if let Some(b) = &self.claims.error_vs_n {
            let mut series = Vec::new();
            for causal in [false, true] {
                let tag = if causal { " causal" } else { "" };
                let pick = |m: &str, get: fn(&ErrorClaimPoint) -> f64| -> Vec<(f64, f64)> {
                    b.points
                        .iter()
                        .filter(|p| p.method == m && p.causal == causal)
                        .map(|p| (p.n as f64, get(p)))
                        .collect()
                };
                // the forward is the same function for poly and altgrad: one output series
                for (label, pts) in [
                    (format!("o (poly = altgrad){tag}"), pick(Method::Poly.as_str(), |p| p.err_o)),
                    (format!("poly grad{tag}"), pick(Method::Poly.as_str(), |p| p.err_grad)),
                    (format!("altgrad grad{tag}"), pick(Method::AltGrad.as_str(), |p| p.err_grad)),
                ] {
                    if !pts.is_empty() {
                        series.push(Series { label, points: pts });
                    }
                }
            }
            let first: Vec<&ErrorClaimPoint> = {
                let causal0 = b.points.first().is_some_and(|p| p.causal);
                b.points.iter().filter(|p| p.method == Method::Poly.as_str() && p.causal == causal0).collect()
            };
            series.push(Series {
                label: "1/n (target)".into(),
                points: first.iter().map(|p| (p.n as f64, 1.0 / p.n as f64)).collect(),
            });
            series.push(Series {
                label: "ε_A(R, g) bound".into(),
                points: first.iter().map(|p| (p.n as f64, p.eps_a)).collect(),
            });
            let title = format!("claim (b): error at g chosen for ε = 1/n (d={}, R={:.2}, f64)", b.head_dim, b.r_bound);
            draw(
                "claim_error_vs_n",
                LineChart { title: &title, x_label: "n", y_label: "relative error", log_x: true, log_y: true },
                series,
            );
        }
        if let Some(c) = &self.claims.multi_layer {
            let mut labels: Vec<String> = Vec::new();
            for p in &c.points {
                let l = p.label();
                if !labels.contains(&l) {
                    labels.push(l);
                }
            }
            let series: Vec<Series> = labels
                .iter()
                .map(|l| Series {
                    label: l.clone(),
                    points: c
                        .points
                        .iter()
                        .filter(|p| &p.label() == l)
                        .map(|p| (p.layers as f64, p.rel_err_grad))
                        .collect(),
                })
                .collect();
            let title =
                format!("claim (c): whole-model gradient error vs layers (n={}, R≈{:.1}, f64)", c.seq_len, c.r_target);
            draw(
                "claim_multilayer",
                LineChart {
                    title: &title,
                    x_label: "layers m",
                    y_label: "relative error of all grads",
                    log_x: false,
                    log_y: true,
                },
                series,
            );
        }
        files
    }

    /// The distinct `(method, head_dim, degree)` of the runs with this mask, in first-seen order.
    fn series_keys(&self, causal: bool) -> Vec<(String, usize, Option<usize>)> {
        let mut keys = Vec::new();
        for r in self.runs.iter().filter(|r| r.causal == causal) {
            let k = (r.method.clone(), r.head_dim, r.degree);
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        keys.sort_by_key(|a| (Method::report_order(&a.0), a.1, a.2));
        keys
    }

    fn points(
        &self,
        m: &str,
        d: usize,
        g: Option<usize>,
        causal: bool,
        get: impl Fn(&BenchRun) -> Option<f64>,
    ) -> Vec<(f64, f64)> {
        self.runs
            .iter()
            .filter(|r| r.method == m && r.head_dim == d && r.degree == g && r.causal == causal)
            .filter_map(|r| get(r).map(|y| (r.n as f64, y)))
            .collect()
    }
}
