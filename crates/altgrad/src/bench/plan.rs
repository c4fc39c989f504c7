//! What a bench run measures and how one point is measured: [`BenchOptions`] (the request) →
//! `Plan` (the resolved sizes and budgets), the bounded random inputs of one point (MATH §3: `q`
//! rescaled to a target score bound `R`), one method's forward + backward on them, and the
//! relative errors of its output and gradients against a reference. Used by the claims and the
//! sweep; imports no other bench module but the records.

use crate::attention::{self, head_bounds, AttnGrads, AttnOptions, AttnShape, Method, PolyOptions};
use crate::linalg::Scalar;
use crate::{Error, Result};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
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
    /// The `--threads` the run was asked for (only written into [`command_line`](Self::command_line);
    /// the caller sizes the thread pool). `None`: all cores.
    pub threads: Option<usize>,
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
            threads: None,
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
        // an empty list is `none` on the command line (an empty value would not parse back)
        let or_none = |v: Vec<String>| if v.is_empty() { "none".to_string() } else { v.join(",") };
        let list = |v: &[usize]| or_none(v.iter().map(|x| x.to_string()).collect());
        let pairs = |v: &[(usize, usize)]| or_none(v.iter().map(|(d, g)| format!("{d}:{g}")).collect());
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
        if let Some(t) = self.threads {
            s.push_str(&format!(" --threads {t}"));
        }
        s.push_str(&format!(" --out {}", shell_quote(&self.out_dir.display().to_string())));
        s
    }
}

/// `s` as one POSIX shell word: unchanged when it holds only characters no shell treats
/// specially, else in single quotes (a `'` inside written `'\''`).
fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./:=,+-@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
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
    /// The plan of request `o` (the sizes of `--quick`, `--tiny` or the full run, then `o`'s
    /// overrides).
    ///
    /// Errors: [`Error::BadInput`] (input `bench options`) for non-positive sizes or limits.
    pub(crate) fn new(o: &BenchOptions) -> Result<Plan> {
        let bad = |m: String| Err(Error::bad("bench options", m));
        for (name, v) in [("--heads", o.heads), ("--chunk", o.chunk), ("--stream-chunk", o.stream_chunk)] {
            if v == 0 {
                return bad(format!("{name}: must be positive, got 0"));
            }
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
            if ns.is_empty() {
                return bad("--ns: the list is empty (give lengths such as 1024,4096)".into());
            }
            if let Some(i) = ns.iter().position(|&n| n == 0) {
                return bad(format!("--ns: lengths must be positive, got 0 (item {} of the list)", i + 1));
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
                    attention::bound::validate_degree(g).map_err(|e| e.relabel(name))?;
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
        if p.sweep_points() == 0 && !p.claims && !p.roofline {
            return bad(
                "nothing to run: --exact, --poly and --altgrad are all `none`, with --no-claims and --no-roofline"
                    .into(),
            );
        }
        p.check_memory(super::available_memory_bytes())?;
        Ok(p)
    }

    /// Bytes one sweep point of length `n` holds at its widest head at the least: the f32 inputs
    /// `q, k, v, g` and the method's output and three gradients (8 tensors of `n × heads ×
    /// head_dim`; the exact reference and the kernels' scratch come on top). A lower bound, so a
    /// length that fits is never refused; in f64, so no size overflows.
    pub(crate) fn point_bytes(&self, n: usize) -> f64 {
        let pairs = self.poly.iter().chain(&self.altgrad).map(|&(d, _)| d);
        let d = self.exact_dims.iter().copied().chain(pairs).max().unwrap_or(0);
        8.0 * std::mem::size_of::<f32>() as f64 * n as f64 * self.heads as f64 * d as f64
    }

    /// Refuses sequence lengths whose tensors alone would not fit in `available` bytes (a failed
    /// allocation aborts the process instead of reporting an error).
    ///
    /// Errors: [`Error::BadInput`] (input `bench options`) naming `--ns` and the length.
    pub(crate) fn check_memory(&self, available: Option<u64>) -> Result<()> {
        let Some(avail) = available else { return Ok(()) };
        let gib = |b: f64| b / f64::powi(2.0, 30);
        match self.ns.iter().find(|&&n| self.point_bytes(n) > avail as f64) {
            Some(&n) => Err(Error::bad(
                "bench options",
                format!(
                    "--ns: n = {n} needs at least {:.1} GiB for one point's tensors, more than the {:.1} GiB available",
                    gib(self.point_bytes(n)),
                    gib(avail as f64)
                ),
            )),
            None => Ok(()),
        }
    }

    /// Number of sweep points (both masks), for progress.
    pub(crate) fn sweep_points(&self) -> usize {
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

/// Caller-owned outputs and scratch of one sweep point, reused by every repetition (as a training
/// loop reuses its buffers): the timings then measure the kernels, not the first touch of freshly
/// allocated outputs (page faults), which the allocating entry points add on top.
pub(crate) struct Buffers<T> {
    o: Vec<T>,
    lse: Vec<T>,
    den: Vec<T>,
    far_o: Vec<T>,
    far_lse: Vec<T>,
    grads: AttnGrads<T>,
    ws: attention::Workspace<T>,
}

impl<T: Scalar> Buffers<T> {
    /// Buffers for `method` on `inp`'s shape (those it does not use empty, so that the point's
    /// peak memory counts only its own), every page written once (so that no repetition pays for
    /// it).
    pub(crate) fn new(method: Method, inp: &Inputs<T>) -> Self {
        let s = inp.shape;
        let (rows, dv) = (s.heads() * s.seq_len, s.head_dim_v);
        let (den, far) = match method {
            Method::Exact => (false, false),
            Method::Poly | Method::AltGrad => (true, false),
            Method::Hybrid => (false, true),
        };
        // non-zero fills: the allocator's zeroed pages would be touched only later, in the kernels
        let touched = |len: usize| vec![T::one(); len];
        let used = |on: bool, len: usize| if on { touched(len) } else { Vec::new() };
        let mut grads = AttnGrads::zeros(&s);
        for x in [&mut grads.dq, &mut grads.dk, &mut grads.dv] {
            x.fill(T::one());
        }
        Buffers {
            o: touched(rows * dv),
            lse: touched(rows),
            den: used(den, rows),
            far_o: used(far, rows * dv),
            far_lse: used(far, rows),
            grads,
            ws: attention::Workspace::new(),
        }
    }

    /// The last forward's output and the last backward's gradients.
    pub(crate) fn outputs(self) -> (Vec<T>, AttnGrads<T>) {
        (self.o, self.grads)
    }
}

/// One forward + backward of `method` on `inp` into `b` (overwritten): `(fwd seconds, bwd
/// seconds)`, the `_into` entry points timed.
pub(crate) fn run_method_into<T: Scalar>(
    method: Method,
    inp: &Inputs<T>,
    popts: &PolyOptions,
    b: &mut Buffers<T>,
) -> Result<(f64, f64)> {
    let (x, g, o) = (attention::Qkv::new(&inp.q, &inp.k, &inp.v, &inp.shape)?, &inp.g, &inp.opts);
    if method == Method::AltGrad {
        attention::altgrad::check_kron_state(&inp.shape, popts)?;
    }
    let t0 = Instant::now();
    let grads = attention::AttnGradsMut { dq: &mut b.grads.dq, dk: &mut b.grads.dk, dv: &mut b.grads.dv };
    let t1 = match method {
        Method::Exact => {
            attention::forward_exact_into(&x, o, &mut b.o, &mut b.lse, &b.ws)?;
            let t1 = t0.elapsed().as_secs_f64();
            attention::backward_exact_into(&x, o, &b.o, &b.lse, g, grads, &b.ws)?;
            t1
        }
        Method::Poly | Method::AltGrad => {
            let out = attention::PolyBuffers { o: &mut b.o, lse: &mut b.lse, den: &mut b.den };
            let saved = attention::forward_poly_into(&x, o, popts, None, None, out, &b.ws)?;
            let t1 = t0.elapsed().as_secs_f64();
            if method == Method::Poly {
                attention::backward_poly_into(&x, &saved, &b.o, &b.den, g, None, grads, &b.ws)?;
            } else {
                attention::backward_altgrad_into(&x, &saved, &b.o, &b.den, g, grads, &b.ws)?;
            }
            t1
        }
        Method::Hybrid => {
            // no window, no sinks: the sweep's hybrid is poly through the hybrid kernel
            let h = attention::HybridOptions { window: 0, sinks: 0, poly: *popts };
            let out =
                attention::HybridBuffers { o: &mut b.o, lse: &mut b.lse, far_o: &mut b.far_o, far_lse: &mut b.far_lse };
            attention::forward_hybrid_into(&x, o, &h, out, &b.ws)?;
            let t1 = t0.elapsed().as_secs_f64();
            let saved = attention::HybridSaved { o: &b.o, lse: &b.lse, far_o: &b.far_o, far_lse: &b.far_lse };
            attention::backward_hybrid_into(&x, o, &h, saved, g, grads, &b.ws)?;
            t1
        }
    };
    Ok((t1, t0.elapsed().as_secs_f64() - t1))
}

/// One forward + backward of `method` on `inp` in fresh buffers: `(fwd seconds, bwd seconds, o,
/// grads)` ([`run_method_into`]).
pub(crate) fn run_method<T: Scalar>(
    method: Method,
    inp: &Inputs<T>,
    popts: &PolyOptions,
) -> Result<(f64, f64, Vec<T>, AttnGrads<T>)> {
    let mut b = Buffers::new(method, inp);
    let (f, bw) = run_method_into(method, inp, popts, &mut b)?;
    let (o, g) = b.outputs();
    Ok((f, bw, o, g))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The quoted word reads back as the original through a real shell (`sh -c 'printf %s …'`).
    #[test]
    fn command_line_paths_survive_the_shell() {
        for path in ["/tmp/x", "/tmp/b 2", "it's here", "a\"b$c`d\\e", "-", ""] {
            let q = shell_quote(path);
            let out = std::process::Command::new("sh").arg("-c").arg(format!("printf %s {q}")).output().unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), path, "quoted as {q}");
        }
        let mut o = BenchOptions::new("/tmp/b 2");
        o.threads = Some(2);
        assert_eq!(o.command_line(), "altgrad bench --threads 2 --out '/tmp/b 2'");
    }

    /// A length is refused only when the point's own f32 tensors (q, k, v, g, o, dq, dk, dv:
    /// 8 · 4 bytes per element of `n × heads × head_dim`) exceed the memory: `n = 2^20`, 4 heads of
    /// 64 need exactly 8 GiB.
    #[test]
    fn memory_check_refuses_only_what_cannot_fit() {
        let mut o = BenchOptions::new("/tmp/unused");
        (o.ns, o.poly_configs, o.exact_dims, o.altgrad_configs) =
            (Some(vec![256]), Some(vec![(64, 2)]), Some(vec![]), Some(vec![]));
        let mut p = Plan::new(&o).unwrap();
        p.ns = vec![1 << 20];
        let need = 8u64 << 30;
        assert!(p.check_memory(Some(need)).is_ok());
        assert!(p.check_memory(None).is_ok());
        let e = p.check_memory(Some(need - 1)).unwrap_err();
        assert!(e.is_user_error() && e.to_string().contains("n = 1048576 needs at least 8.0 GiB"), "{e}");
    }

    /// A zero size names the option (and, for `--ns`, which item of the list).
    #[test]
    fn zero_sizes_name_the_option() {
        let msg = |f: &dyn Fn(&mut BenchOptions)| {
            let mut o = BenchOptions::new("/tmp/unused");
            f(&mut o);
            Plan::new(&o).map(|_| ()).unwrap_err().to_string()
        };
        assert!(msg(&|o| o.heads = 0).contains("--heads: must be positive, got 0"));
        assert!(msg(&|o| o.chunk = 0).contains("--chunk: must be positive, got 0"));
        assert!(msg(&|o| o.stream_chunk = 0).contains("--stream-chunk: must be positive, got 0"));
        let e = msg(&|o| o.ns = Some(vec![1024, 0]));
        assert!(e.contains("--ns: lengths must be positive, got 0 (item 2 of the list)"), "{e}");
    }
}
