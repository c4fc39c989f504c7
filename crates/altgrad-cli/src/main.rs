//! The `altgrad` command line: parses, calls the library, prints. No math here.

use altgrad::attention;
use altgrad::attention::{AttnOptions, Budget, HeadPlan, HybridOptions, Method, PolyOptions};
use altgrad::io::{self as aio, Loaded};
use altgrad::job;
use altgrad::linalg::norm;
use altgrad::linalg::Scalar;
use altgrad::model::AttentionPolicy;
use altgrad::Error;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

mod bench_args;
mod interrupt;
mod plot;

/// Loss and gradients of multi-layer transformers, exact or in almost linear time.
#[derive(Parser)]
#[command(name = "altgrad", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Loss and gradients of a model on a token sequence.
    Grad(GradArgs),
    /// One attention call on tensors from a safetensors file.
    Attn(AttnArgs),
    /// Per layer and head: max score, bound R, degree needed for a tolerance, rank, auto choice.
    Inspect(InspectArgs),
    /// Print the token ids of a text as the model's own tokenizer produces them.
    Tokenize(TokenizeArgs),
    /// Train (or fine-tune) with exact, polynomial or ALTGrad attention gradients.
    Train(Box<TrainArgs>),
    /// Plot loss (and accuracy) curves of `train --json` logs.
    TrainPlot(TrainPlotArgs),
    /// Write a training checkpoint as an HF directory (config.json + model.safetensors).
    Export(ExportArgs),
    /// Benchmarks: exact/poly/altgrad × n × head_dim × degree × causal, GEMM peak, fits, claims.
    Bench(BenchCmd),
}

/// `--attention` of `attn`: a library [`Method`], or `hybrid` (MATH §4.1, its own kernel with a
/// window and sinks).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum AttnKernel {
    /// This method for every head.
    Every(Method),
    /// Hybrid attention for every head.
    Hybrid,
}

impl ValueEnum for AttnKernel {
    fn value_variants<'a>() -> &'a [Self] {
        static ALL: std::sync::OnceLock<Vec<AttnKernel>> = std::sync::OnceLock::new();
        ALL.get_or_init(|| Method::ALL.into_iter().map(AttnKernel::Every).chain([AttnKernel::Hybrid]).collect())
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(match self {
            AttnKernel::Every(m) => clap::builder::PossibleValue::new(m.as_str()).help(m.summary()),
            AttnKernel::Hybrid => clap::builder::PossibleValue::new("hybrid").help(
                "Causal hybrid: exact softmax for --window keys and --sinks, degree-g polynomial for the far keys, one \
                 normalization",
            ),
        })
    }
}

/// `--attention` of `grad` and `inspect`-like commands: one library [`Method`] for every head, or
/// `auto` (chosen per head).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Attention {
    /// This method for every head.
    Every(Method),
    /// Per head: polynomial where the measured bound meets --tol and it is cheaper, else exact.
    Auto,
}

impl Attention {
    fn name(self) -> &'static str {
        match self {
            Attention::Every(m) => m.as_str(),
            Attention::Auto => "auto",
        }
    }
}

impl ValueEnum for Attention {
    fn value_variants<'a>() -> &'a [Self] {
        static ALL: std::sync::OnceLock<Vec<Attention>> = std::sync::OnceLock::new();
        ALL.get_or_init(|| Method::ALL.into_iter().map(Attention::Every).chain([Attention::Auto]).collect())
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(match self {
            Attention::Every(m) => clap::builder::PossibleValue::new(m.as_str()).help(m.summary()),
            Attention::Auto => clap::builder::PossibleValue::new("auto").help(
                "Per head: polynomial where it is cheaper and the bound or the measured error meets --tol, else exact",
            ),
        })
    }
}

/// Flags shared by the subcommands that choose an attention method.
#[derive(clap::Args, Clone, Debug)]
struct AttnMethodArgs {
    /// Attention method for every head (`auto`: chosen per head).
    #[arg(long, value_enum, default_value = "exact")]
    attention: Attention,
    /// Polynomial degree for every head (even, ≥ 2); without it, poly/altgrad pick per head the
    /// smallest even degree meeting --tol.
    #[arg(long)]
    degree: Option<usize>,
    /// Tolerance on a head's relative error: the a-priori ε_A of the attention matrix (MATH §3) or,
    /// for auto, the measured relative error of the head's output on sampled rows (95% upper bound),
    /// whichever admits the cheaper degree (the query-gradient error is reported, not used).
    #[arg(long, default_value_t = 1e-3)]
    tol: f64,
    /// Refuse a forced poly/altgrad run whose predicted attention FLOPs exceed this many times
    /// exact attention's (see --force).
    #[arg(long, default_value_t = 4.0)]
    max_slowdown: f64,
    /// Refuse a forced poly/altgrad run whose predicted attention working memory exceeds this
    /// many GiB (see --force).
    #[arg(long, default_value_t = 8.0)]
    max_memory: f64,
    /// Run a forced poly/altgrad method even when it exceeds --max-slowdown or --max-memory.
    #[arg(long)]
    force: bool,
    /// Rows per chunk of the polynomial kernels.
    #[arg(long, default_value_t = 64)]
    chunk: usize,
    /// Turn off the row shift m_i = τ q_i·k̄_i (MATH §3).
    #[arg(long)]
    no_center: bool,
    /// Largest feature width r that `auto` may use (memory budget).
    #[arg(long, default_value_t = 1 << 16)]
    max_rank: usize,
}

impl AttnMethodArgs {
    fn policy(&self) -> Result<AttentionPolicy> {
        let a = self;
        let budget = Budget { max_slowdown: a.max_slowdown, max_memory: a.max_memory * (1u64 << 30) as f64 };
        let mut policy =
            job::attention_policy(a.attention.name(), a.degree, a.tol, a.chunk, !a.no_center, a.max_rank, budget)
                .map_err(flag_error)?;
        if let (true, AttentionPolicy::Forced { budget, .. }) = (a.force, &mut policy) {
            *budget = Budget::UNLIMITED; // the limits were still validated
        }
        Ok(policy)
    }
}

/// Renames a library error's input `x` to the flag `--x` that carries it (`degree` → `--degree`).
fn flag_error(e: Error) -> Error {
    match e {
        Error::BadInput { input, msg }
            if ["attention", "degree", "tol", "chunk", "max-slowdown", "max-memory"].contains(&input.as_str()) =>
        {
            Error::BadInput { input: format!("--{input}"), msg }
        }
        other => other,
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Dtype {
    F32,
    F64,
}

#[derive(clap::Args)]
struct GradArgs {
    /// Model: `tiny` or `tiny-bounded` (built-in, seeded), a `.gguf` file (Llama), or an HF
    /// directory (Llama or BERT).
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Text file, tokenized with the model's own tokenizer (bytes for `tiny`).
    #[arg(long, conflicts_with = "tokens")]
    text: Option<PathBuf>,
    /// File of whitespace-separated token ids.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Keep only the first N token ids.
    #[arg(long)]
    seq_len: Option<usize>,
    #[command(flatten)]
    method: AttnMethodArgs,
    /// Also run the exact backward and report per-layer errors and the speed-up.
    #[arg(long)]
    compare: bool,
    /// Time the forward and backward by layer kind (embedding, norms, projections, RoPE,
    /// attention, SwiGLU, LM head + loss, …) and print the table (Llama models).
    #[arg(long, conflicts_with = "compare")]
    profile: bool,
    /// Write every parameter's gradient (named as in the model) and `embeddings_grad` here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the final hidden states (`hidden [n, hidden_size]`, after the final norm) here.
    #[arg(long)]
    hidden_out: Option<PathBuf>,
    /// Write the JSON report to FILE, or `-` for stdout.
    #[arg(long)]
    json: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the `tiny` model's weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute precision.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// `tiny` (from scratch) or a loadable Llama model (fine-tuning).
    #[arg(long, default_value = "tiny")]
    model: String,
    /// tiny: decoder layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// tiny: model width.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// tiny: query heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// tiny: key/value heads.
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// tiny vocabulary (256 with --text: bytes); MQAR token range.
    #[arg(long)]
    vocab: Option<usize>,
    /// Text file to train on (repeatable; each split 90/10 into training and held-out).
    #[arg(long, conflicts_with = "task")]
    text: Vec<PathBuf>,
    /// Synthetic task: `mqar` (multi-query associative recall).
    #[arg(long)]
    task: Option<String>,
    /// MQAR key–value pairs per sequence (default seq_len/16).
    #[arg(long)]
    mqar_pairs: Option<usize>,
    /// Number of updates.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Sequences per update.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Final learning rate of the cosine, as a fraction of --lr.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// Warm-up updates (default steps/10).
    #[arg(long)]
    warmup: Option<usize>,
    /// AdamW decoupled weight decay (matrices only).
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// AdamW β₁.
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    /// AdamW β₂.
    #[arg(long, default_value_t = 0.95)]
    beta2: f64,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    /// Maximum global gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Attention: exact, poly or altgrad (gradients of a softmax-shaped model), or hybrid (a model
    /// built with it). With hybrid, --feature-dim or --layer-attention the tiny model is built with
    /// its own attention (saved in checkpoints; grad and inspect then compute that attention).
    #[arg(long, default_value = "exact")]
    attention: String,
    /// Degree of poly/altgrad/hybrid (even, ≥ 2).
    #[arg(long, default_value_t = 2)]
    degree: usize,
    /// Chunk size of the polynomial kernels.
    #[arg(long, default_value_t = 64)]
    chunk: usize,
    /// Built-in attention: query/key width of the poly and hybrid layers (Based: 16; even).
    #[arg(long)]
    feature_dim: Option<usize>,
    /// Hybrid layers: keys per row seen exactly (the sliding window, diagonal included).
    #[arg(long)]
    window: Option<usize>,
    /// Hybrid layers: leading keys every row sees exactly (attention sinks).
    #[arg(long, default_value_t = 0)]
    sinks: usize,
    /// Built-in attention per layer, comma-separated (e.g. `exact,hybrid,hybrid,hybrid`).
    #[arg(long, value_delimiter = ',')]
    layer_attention: Option<Vec<String>>,
    /// Seed of the tiny weights and of every batch.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Validation every N updates (0 = only after the last).
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Held-out sequences per validation.
    #[arg(long, default_value_t = 16)]
    eval_seqs: usize,
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Checkpoint every N updates (0 = at the end or at --stop-at only).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Continue the run in --checkpoint.
    #[arg(long)]
    resume: bool,
    /// End after update K with a checkpoint, as an interruption would.
    #[arg(long)]
    stop_at: Option<usize>,
    /// One JSON object per update to FILE (`-` = stdout).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Loss-curve plot: STEM.png and STEM.svg.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Worker threads (default: all cores; resuming bit-identically needs the same number).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(clap::Args)]
struct BenchCmd {
    #[command(flatten)]
    args: bench_args::BenchArgs,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(clap::Args)]
struct TrainPlotArgs {
    /// Output stem: STEM.png and STEM.svg.
    #[arg(long)]
    out: PathBuf,
    /// `train --json` logs to compare.
    #[arg(required = true)]
    logs: Vec<PathBuf>,
    /// x axis: the update, or the training time in seconds (equal wall-clock budgets).
    #[arg(long, value_parser = ["update", "time"], default_value = "update")]
    x: String,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Checkpoint directory (`train --checkpoint DIR`).
    checkpoint: PathBuf,
    /// Output HF directory (created if needed): config.json, model.safetensors and, when the
    /// trained model had one, tokenizer.json.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct TokenizeArgs {
    /// Model: `tiny` (bytes), a `.gguf` file, an HF directory with tokenizer.json, or a
    /// training checkpoint.
    #[arg(long)]
    model: String,
    /// Text file.
    #[arg(long)]
    text: PathBuf,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// Model: `tiny`, a `.gguf` file, or an HF directory (Llama or BERT).
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Text file, tokenized with the model's own tokenizer.
    #[arg(long, conflicts_with = "tokens")]
    text: Option<PathBuf>,
    /// File of whitespace-separated token ids.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Keep only the first N token ids.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Tolerance on ε_A for the degree each head needs.
    #[arg(long, default_value_t = 1e-3)]
    tol: f64,
    /// Largest feature width r that `auto` may use.
    #[arg(long, default_value_t = 1 << 16)]
    max_rank: usize,
    /// Write the JSON report to FILE, or `-` for stdout.
    #[arg(long)]
    json: Option<String>,
    /// Heatmap of the needed degree (layers × heads) to STEM.png and STEM.svg.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the `tiny` model's weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
struct AttnArgs {
    /// safetensors with q [b,n,h,d], k [b,n,h_kv,d], v [b,n,h_kv,d_v], optional do [b,n,h,d_v].
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors: o, and dq, dk, dv when `do` is given, in the inputs' dtype (F32,
    /// F64, F16 or BF16; computed in f64 for F64 inputs, in f32 otherwise).
    #[arg(long)]
    out: PathBuf,
    /// Attention method for every head.
    #[arg(long, value_enum, default_value = "exact")]
    attention: AttnKernel,
    /// Polynomial degree (even, ≥ 2) for poly/altgrad/hybrid.
    #[arg(long, default_value_t = 2)]
    degree: usize,
    /// Sliding window: keys per row seen exactly (diagonal included). Hybrid: required (0 with
    /// --sinks 0 is poly); exact: a causal sliding-window mask.
    #[arg(long)]
    window: Option<usize>,
    /// Attention sinks: leading keys every row sees exactly (with --window).
    #[arg(long, default_value_t = 0)]
    sinks: usize,
    /// Rows per chunk of the polynomial kernels.
    #[arg(long, default_value_t = 64)]
    chunk: usize,
    /// Turn off the row shift (MATH §3).
    #[arg(long)]
    no_center: bool,
    /// Causal mask (j ≤ i); hybrid attention and --window are causal by definition.
    #[arg(long)]
    causal: bool,
    /// Score scale τ (default 1/√d; must be positive).
    #[arg(long, allow_negative_numbers = true)]
    scale: Option<f64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

/// Text used by `altgrad grad` when no input is given (tokenized as bytes for `tiny`).
const DEFAULT_TEXT: &str = include_str!("default_text.txt");

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if let Err(e) = interrupt::install() {
        eprintln!("warning: cannot handle SIGINT/SIGTERM ({e}); an interrupted run may leave temporary files");
    }
    // No subcommand: the default run, `altgrad grad` with its defaults.
    let cmd = cli.cmd.or_else(|| Cli::parse_from(["altgrad", "grad"]).cmd).expect("grad parses");
    let res = match cmd {
        Cmd::Grad(a) => run_grad(&a),
        Cmd::Attn(a) => run_attn(&a),
        Cmd::Inspect(a) => run_inspect(&a),
        Cmd::Tokenize(a) => run_tokenize(&a),
        Cmd::Train(a) => run_train_cmd(&a),
        Cmd::Bench(a) => run_bench_cmd(&a),
        Cmd::TrainPlot(a) => run_train_plot(&a),
        Cmd::Export(a) => run_export(&a),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        let user = e.chain().any(|c| c.downcast_ref::<Error>().is_some_and(|e| e.is_user_error()));
        std::process::exit(if user { 2 } else { 1 });
    }
}

fn set_threads(t: Option<usize>) -> Result<()> {
    if let Some(t) = t {
        if t == 0 {
            return Err(Error::bad("--threads", "must be at least 1").into());
        }
        let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
        if t > 8 * cores.max(8) {
            return Err(Error::bad(
                "--threads",
                format!("{t} threads on {cores} cores would only thrash; use at most {}", 8 * cores.max(8)),
            )
            .into());
        }
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().context("setting up the thread pool")?;
    }
    Ok(())
}

fn token_ids<T: Scalar>(a: &Inputs, loaded: &Loaded<T>, max_len: usize) -> Result<Vec<u32>> {
    if a.seq_len == Some(0) {
        return Err(Error::bad("--seq-len", "must be at least 1").into());
    }
    let limit = match (a.seq_len, &a.tokens, &a.text) {
        (Some(n), ..) => n,
        (None, None, None) => 1024.min(max_len),
        (None, ..) => usize::MAX,
    };
    let (ids, total) = if let Some(p) = &a.tokens {
        let ids = aio::read_tokens(p)?;
        let total = ids.len();
        (ids.into_iter().take(limit).collect(), total)
    } else {
        let text = match &a.text {
            Some(p) => {
                let t = std::fs::read_to_string(p).map_err(|e| Error::io(p.display().to_string(), e))?;
                if t.trim().is_empty() {
                    return Err(Error::bad(p.display().to_string(), "is empty: there is no text to tokenize").into());
                }
                t
            }
            None => DEFAULT_TEXT.to_string(),
        };
        // Trailing special tokens (BERT's [SEP]) survive the cut, as in transformers.
        loaded.encode_limited(&text, limit)?
    };
    if let Some(n) = a.seq_len {
        if n > total {
            eprintln!("note: --seq-len {n} is more than the {total} tokens of {}: using all {total}", input_name(a));
        }
    }
    Ok(ids)
}

fn run_grad(a: &GradArgs) -> Result<()> {
    set_threads(a.threads)?;
    match a.dtype {
        Dtype::F32 => grad_typed::<f32>(a),
        Dtype::F64 => grad_typed::<f64>(a),
    }
}

/// Where the token ids come from (shared by grad and inspect).
struct Inputs {
    text: Option<PathBuf>,
    tokens: Option<PathBuf>,
    seq_len: Option<usize>,
}

fn input_name(a: &Inputs) -> String {
    a.tokens.as_ref().or(a.text.as_ref()).map(|p| p.display().to_string()).unwrap_or("built-in text".into())
}

fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"));
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

fn fmt_err(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2e}")
    } else {
        "no bound".into()
    }
}

/// The `grad --profile` table: seconds by layer kind in the forward (the loss included, as
/// `grad` times it) and the backward, each kind's share of both, and what no kind covers.
fn print_profile(times: &[altgrad::profile::KindTime], t_fwd: f64, t_bwd: f64) {
    let total = (t_fwd + t_bwd).max(1e-12);
    println!("profile      seconds by layer kind (wall clock; the loss is part of the forward):");
    println!("  {:<26} {:>9} {:>9} {:>9} {:>6}", "kind", "forward", "backward", "total", "share");
    let (mut sf, mut sb) = (0.0, 0.0);
    for t in times {
        let both = t.forward_s + t.backward_s;
        sf += t.forward_s;
        sb += t.backward_s;
        println!(
            "  {:<26} {:>9.3} {:>9.3} {:>9.3} {:>5.1}%",
            t.kind.name(),
            t.forward_s,
            t.backward_s,
            both,
            100.0 * both / total
        );
    }
    let (of, ob) = ((t_fwd - sf).max(0.0), (t_bwd - sb).max(0.0));
    println!(
        "  {:<26} {:>9.3} {:>9.3} {:>9.3} {:>5.1}%",
        "other (untimed)",
        of,
        ob,
        of + ob,
        100.0 * (of + ob) / total
    );
}

fn grad_typed<T: Scalar>(a: &GradArgs) -> Result<()> {
    let policy = a.method.policy()?;
    for (flag, path) in [("--out", a.out.as_deref()), ("--hidden-out", a.hidden_out.as_deref())]
        .into_iter()
        .chain(std::iter::once(("--json", a.json.as_deref().filter(|j| *j != "-").map(Path::new))))
    {
        if let Some(p) = path {
            aio::check_output_file(flag, p)?;
        }
    }
    let pb = spinner("loading model");
    let loaded = job::load_model::<T>(&a.model, a.seed)?;
    let shape = loaded.model.summary();
    let max_len = shape.max_seq_len;
    let summary = format!("{} ({shape}, {})", loaded.source(), T::DTYPE.to_lowercase());
    let inputs = Inputs { text: a.text.clone(), tokens: a.tokens.clone(), seq_len: a.seq_len };
    let ids = token_ids(&inputs, &loaded, max_len)?;
    let input = input_name(&inputs);
    let n = ids.len();
    if a.profile {
        altgrad::profile::enable(true);
        altgrad::profile::take();
    }
    let run = job::grad_run(&loaded, &ids, &input, &policy, a.method.attention.name(), a.compare, &|m| {
        pb.set_message(m.to_string())
    })
    .map_err(flag_error)?;
    pb.finish_and_clear();
    let (r, exact, report) = (&run.pass, &run.exact, &run.report);
    let compare = &report.compare;
    if let Some(p) = &a.out {
        aio::write_safetensors(p, &r.grads)?;
    }
    if let Some(p) = &a.hidden_out {
        aio::write_safetensors(p, &[("hidden".to_string(), vec![n, r.hidden_size], r.hidden.clone())])?;
    }
    if a.json.as_deref() != Some("-") {
        let gnorm: f64 =
            r.grads.iter().filter(|g| g.0 != "embeddings_grad").map(|g| norm(&g.2).powi(2)).sum::<f64>().sqrt();
        println!("model        {summary}");
        println!("tokens       {n} ({input})");
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for h in &report.heads {
            let key = match h.degree {
                Some(g) => format!("{} g={g}", h.method),
                None => h.method.clone(),
            };
            *counts.entry(key).or_default() += 1;
        }
        let heads: Vec<String> = counts.iter().map(|(k, c)| format!("{c} {k}")).collect();
        println!("attention    {} ({} heads: {})", report.attention, report.heads.len(), heads.join(", "));
        if r.loss_name.contains("cross-entropy") {
            println!("loss         {:.6} ({}; perplexity {:.2})", r.loss, r.loss_name, r.loss.exp());
        } else {
            println!("loss         {:.6} ({})", r.loss, r.loss_name);
        }
        println!("grad norm    {gnorm:.6e}");
        println!("forward      {:.3} s ({:.0} tokens/s)", r.t_fwd, n as f64 / r.t_fwd);
        println!("backward     {:.3} s ({:.0} tokens/s)", r.t_bwd, n as f64 / r.t_bwd);
        if a.profile {
            print_profile(&altgrad::profile::take(), r.t_fwd, r.t_bwd);
        }
        if let (Some(c), Some(e)) = (compare, exact) {
            match c.speedup {
                Some(x) => println!(
                    "exact        loss {:.6}, backward {:.3} s; speed-up of the backward {x:.2}× (medians of {} runs \
                     each)",
                    c.loss_exact,
                    e.t_bwd,
                    job::COMPARE_REPS
                ),
                None => println!(
                    "exact        loss {:.6}, backward {:.3} s (every head ran the same attention on both sides: \
                     exact, or the model's built-in attention; no speed-up to report)",
                    c.loss_exact, e.t_bwd
                ),
            }
            println!();
            let auto = r.decisions.iter().flatten().any(|d| d.estimate.is_some());
            println!("(bound o: the largest predicted bound on a head's output error, ‖Õ−O‖∞/‖V‖∞, MATH §3;");
            println!(" 'no bound' where ε_A ≥ 1. The errors are measured against the exact backward.)");
            if auto {
                println!("(est.: the largest measured relative error of a head's output o and query gradient dq on sampled rows, a");
                println!(" 95% upper bound, the larger of the two; true: the same two errors measured on whole heads");
                println!(
                    " (dq for an independent draw of the upstream gradient), the largest of a layer. Exact heads:"
                );
                println!(" the errors of the degree auto measured.)");
                println!("layer  methods                    bound o        est.      true  rel_err_dx  rel_err_dw");
            } else {
                println!("layer  methods                    bound o        rel_err_dx  rel_err_dw");
            }
            for (l, lc) in c.layers.iter().enumerate() {
                let mut m = std::collections::BTreeMap::<String, usize>::new();
                let (mut worst, mut est, mut truth) = (0.0f64, 0.0f64, 0.0f64);
                for d in &r.decisions[l] {
                    let key = match d.plan.degree() {
                        Some(g) => format!("{} g={g}", d.plan.method_name()),
                        None => d.plan.method_name().to_string(),
                    };
                    *m.entry(key).or_default() += 1;
                    worst = worst.max(d.predicted_rel_err);
                    est = est.max(d.estimate.map_or(0.0, |e| e.upper.max(e.upper_dq)));
                }
                for h in report.heads.iter().filter(|h| h.layer == l) {
                    truth = truth.max(h.true_rel_err_o.unwrap_or(0.0)).max(h.true_rel_err_dq.unwrap_or(0.0));
                }
                let methods: Vec<String> = m.iter().map(|(k, c)| format!("{c} {k}")).collect();
                if auto {
                    println!(
                        "{l:>5}  {:<26} {:>13}  {est:>8.1e}  {truth:>8.1e}  {:>10.3e}  {:>10.3e}",
                        methods.join(", "),
                        fmt_err(worst),
                        lc.rel_err_dx,
                        lc.rel_err_dw
                    );
                } else {
                    println!(
                        "{l:>5}  {:<26} {:>13}  {:>10.3e}  {:>10.3e}",
                        methods.join(", "),
                        fmt_err(worst),
                        lc.rel_err_dx,
                        lc.rel_err_dw
                    );
                }
            }
            println!("total  relative error of all parameter gradients: {:.3e}", c.rel_err_total);
        }
        // Why each method was chosen: the head with the smallest bound speaks for its method.
        let mut why = std::collections::BTreeMap::<&str, (f64, &str)>::new();
        for d in r.decisions.iter().flatten() {
            let e = why.entry(d.plan.method_name()).or_insert((f64::INFINITY, ""));
            if d.bound < e.0 {
                *e = (d.bound, d.reason.as_str());
            }
        }
        let bounds: Vec<f64> = r.decisions.iter().flatten().map(|d| d.bound).collect();
        let (bmin, bmax) = bounds.iter().fold((f64::INFINITY, 0.0f64), |(a, b), x| (a.min(*x), b.max(*x)));
        let shift = match a.method.attention {
            Attention::Auto => "the smaller of shifted and unshifted",
            _ if a.method.no_center => "without the row shift",
            _ => "after the row shift",
        };
        println!("bounds       R ({shift}) from {bmin:.2} to {bmax:.2} over the heads");
        let mut by = std::collections::BTreeMap::<&str, usize>::new();
        for d in r.decisions.iter().flatten() {
            if let Some(x) = d.decided_by {
                *by.entry(x.as_str()).or_default() += 1;
            }
        }
        if !by.is_empty() {
            let range = |f: &dyn Fn(&altgrad::attention::estimate::ErrorEstimate) -> f64| {
                let xs: Vec<f64> = r.decisions.iter().flatten().filter_map(|d| d.estimate.as_ref().map(f)).collect();
                xs.iter().fold((f64::INFINITY, 0.0f64), |(x, y), e| (x.min(*e), y.max(*e)))
            };
            let ((omin, omax), (qmin, qmax)) = (range(&|e| e.upper), range(&|e| e.upper_dq));
            let parts: Vec<String> = by.iter().map(|(k, c)| format!("{c} by {k}")).collect();
            println!(
                "decided      {} (95% upper bounds measured on sampled rows: output error {omin:.1e} to {omax:.1e}, \
                 dq error {qmin:.1e} to {qmax:.1e})",
                parts.join(", ")
            );
        }
        for (m, (_, reason)) in &why {
            println!("why {m:<8} e.g. {reason}");
        }
        if let Some(p) = &a.out {
            println!("gradients -> {}", p.display());
        }
    }
    if let Some(j) = &a.json {
        let s = serde_json::to_string_pretty(report)?;
        if j == "-" {
            println!("{s}");
        } else {
            aio::write_file_atomic(Path::new(j), s.as_bytes())?;
        }
    }
    Ok(())
}

fn run_bench_cmd(a: &BenchCmd) -> Result<()> {
    set_threads(a.threads)?;
    let mut o = a.args.options();
    o.threads = a.threads;
    let show = !a.args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = progress_bar(show, "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}");
    let r = altgrad::bench::run_bench(&o, &|p| {
        bar.set_length(p.total);
        bar.set_position(p.done);
        bar.set_message(p.message.to_string());
    })?;
    bar.finish_and_clear();
    for spec in r.charts() {
        plot::draw_spec(&a.args.out, &spec)?;
    }
    println!("{}", r.markdown());
    println!("wrote {}/bench.json, bench.csv, bench.md and plots", a.args.out.display());
    Ok(())
}

fn run_train_cmd(a: &TrainArgs) -> Result<()> {
    use altgrad::train::{run_train_until, TinySize, TrainOptions};
    use std::io::IsTerminal;
    set_threads(a.threads)?;
    if let Some(stem) = &a.plot {
        aio::check_plot_stem("--plot", stem)?;
    }
    let opts = TrainOptions {
        model: a.model.clone(),
        tiny: TinySize { layers: a.layers, hidden: a.hidden, heads: a.heads, kv_heads: a.kv_heads },
        vocab: a.vocab,
        text: a.text.clone(),
        task: a.task.as_deref().map(str::parse).transpose()?,
        mqar_pairs: a.mqar_pairs,
        steps: a.steps,
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        lr: a.lr,
        min_lr_ratio: a.min_lr_ratio,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        beta1: a.beta1,
        beta2: a.beta2,
        eps: a.eps,
        grad_clip: a.grad_clip,
        attention: match a.attention.as_str() {
            "hybrid" => Method::Hybrid,
            other => other.parse::<Method>().map_err(|e| match e {
                Error::BadInput { msg, .. } => Error::bad("--attention", format!("{msg} or hybrid")),
                e => e,
            })?,
        },
        degree: a.degree,
        chunk: a.chunk,
        feature_dim: a.feature_dim,
        window: a.window,
        sinks: a.sinks,
        layer_attention: a
            .layer_attention
            .as_ref()
            .map(|l| {
                l.iter().map(|k| k.parse().map_err(|e: Error| Error::bad("--layer-attention", e.to_string()))).collect()
            })
            .transpose()?,
        seed: a.seed,
        eval_every: a.eval_every,
        eval_seqs: a.eval_seqs,
        checkpoint: a.checkpoint.clone(),
        save_every: a.save_every,
        resume: a.resume,
        stop_at: a.stop_at,
        json: a.json.clone(),
    };
    let to_stdout = a.json.as_deref() == Some(Path::new("-"));
    let bar = progress_bar(
        std::io::stderr().is_terminal(),
        "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
    );
    interrupt::set_graceful(true);
    let res = run_train_until(
        &opts,
        &|p| {
            bar.set_length(p.total);
            bar.set_position(p.done);
            bar.set_message(p.message.to_string());
        },
        &interrupt::stop_requested,
    );
    interrupt::set_graceful(false);
    match &res {
        Ok(_) => bar.finish(),
        Err(_) => bar.abandon(),
    }
    let sum = res?;
    if sum.already_finished {
        let dir = a.checkpoint.as_deref().map(|d| d.display().to_string()).unwrap_or_default();
        eprintln!(
            "nothing to do: the run in {dir} is already finished (update {} of {}); its final model is in the \
             checkpoint (altgrad export {dir} --out DIR writes it as an HF directory)",
            sum.last_step, a.steps
        );
        return Ok(());
    }
    if let Some(stem) = &a.plot {
        for spec in sum.charts(stem) {
            plot::draw_spec(Path::new(""), &spec)?;
        }
    }
    if !to_stdout {
        println!("model        {} ({:.2}M params), attention {}", sum.model, sum.n_params as f64 / 1e6, sum.attention);
        if sum.losses.is_empty() {
            println!("updates      none (interrupted before the first update of this run)");
        } else {
            println!(
                "updates      {}..{}{}",
                sum.first_step,
                sum.last_step,
                if sum.interrupted {
                    " (interrupted)"
                } else if sum.stopped_early {
                    " (stopped early)"
                } else {
                    ""
                }
            );
            println!("final loss   {:.4} (training batch)", sum.final_loss);
        }
        if let Some(v) = sum.val_loss {
            println!("val loss     {v:.4}");
        }
        if let Some(acc) = sum.accuracy {
            println!("accuracy     {acc:.3} (answer positions)");
        }
        println!("speed        {:.3} s/update, {:.0} tokens/s", sum.mean_step_s, sum.tokens_per_s);
        if let Some(c) = &sum.checkpoint {
            println!("checkpoint   {}", c.display());
        }
        for note in &sum.notes {
            println!("note         {note}");
        }
    }
    if sum.interrupted {
        match &sum.checkpoint {
            Some(c) => eprintln!(
                "interrupted after update {}: checkpoint in {}; continue with the same options and --resume",
                sum.last_step,
                c.display()
            ),
            None => eprintln!("interrupted after update {} (no --checkpoint: nothing saved)", sum.last_step),
        }
        std::process::exit(130);
    }
    Ok(())
}

fn run_train_plot(a: &TrainPlotArgs) -> Result<()> {
    aio::check_plot_stem("--out", &a.out)?;
    for spec in altgrad::train::run_charts_by(&a.logs, &a.out, a.x == "time")? {
        plot::draw_spec(Path::new(""), &spec)?;
    }
    Ok(())
}

/// A progress bar on stderr with `template`, or a hidden one when `show` is false.
fn progress_bar(show: bool, template: &str) -> ProgressBar {
    let b = if show { ProgressBar::new(0) } else { ProgressBar::hidden() };
    if let Ok(style) = ProgressStyle::with_template(template) {
        b.set_style(style.progress_chars("=> "));
    }
    b
}

fn run_export(a: &ExportArgs) -> Result<()> {
    let e = altgrad::train::checkpoint::export_checkpoint_hf(&a.checkpoint, &a.out)?;
    println!(
        "wrote {} (config.json, model.safetensors) from update {} of {}",
        a.out.display(),
        e.step,
        a.checkpoint.display()
    );
    if let Some(t) = &e.tokenizer {
        println!("tokenizer    {}", t.display());
    }
    for n in &e.notes {
        println!("note         {n}");
    }
    Ok(())
}

fn run_tokenize(a: &TokenizeArgs) -> Result<()> {
    let loaded = aio::load_model::<f32>(&a.model, 0)?;
    if loaded.tokenizer.is_none() && !loaded.byte_tokens {
        return Err(Error::bad(&a.model, "has no tokenizer (no tokenizer.json): nothing to tokenize with").into());
    }
    let text = std::fs::read_to_string(&a.text).map_err(|e| Error::io(a.text.display().to_string(), e))?;
    let ids = loaded.encode(&text)?;
    let s: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    println!("{}", s.join(" "));
    Ok(())
}

fn run_inspect(a: &InspectArgs) -> Result<()> {
    set_threads(a.threads)?;
    if !(a.tol.is_finite() && a.tol > 0.0) {
        return Err(Error::bad("--tol", format!("must be a positive number, got {}", a.tol)).into());
    }
    if let Some(stem) = &a.plot {
        aio::check_plot_stem("--plot", stem)?;
    }
    if let Some(j) = a.json.as_deref().filter(|j| *j != "-") {
        aio::check_output_file("--json", Path::new(j))?;
    }
    let pb = spinner("loading model");
    let loaded = job::load_model::<f32>(&a.model, a.seed)?;
    let ga = Inputs { text: a.text.clone(), tokens: a.tokens.clone(), seq_len: a.seq_len };
    let max_len = loaded.model.summary().max_seq_len;
    let ids = token_ids(&ga, &loaded, max_len)?;
    let input = input_name(&ga);
    pb.set_message(format!("forward and score census ({} tokens)", ids.len()));
    let report = job::inspect_report(&loaded, &ids, &input, a.tol, a.max_rank).map_err(flag_error)?;
    pb.finish_and_clear();
    let heads = &report.heads;
    let n_layers = heads.iter().map(|h| h.layer + 1).max().unwrap_or(0);
    let n_heads = heads.iter().map(|h| h.head + 1).max().unwrap_or(0);
    let mut values = vec![vec![None; n_heads]; n_layers];
    let mut text = vec![vec![String::new(); n_heads]; n_layers];
    for h in heads {
        values[h.layer][h.head] = h.degree.map(|g| g as f64);
        text[h.layer][h.head] = match (h.degree, Method::from_name(&h.method)) {
            (Some(g), Some(Method::Poly)) => format!("{g}"),
            (Some(g), _) => format!("{g}*"),
            (None, _) => "-".into(),
        };
    }
    let title = format!(
        "degree for ε_A ≤ {:e}, n = {} (* = auto uses exact: cheaper or r > max_rank; - = none ≤ 8)",
        a.tol,
        ids.len()
    );
    if let Some(stem) = &a.plot {
        plot::heatmap(
            stem,
            &plot::Heatmap { title: &title, row_label: "layer", col_label: "head", values, cell_text: text },
        )?;
    }
    if a.json.as_deref() != Some("-") {
        println!("model {} · {} tokens ({input}) · tol {:e}", loaded.source(), ids.len(), a.tol);
        println!("layer  head  max|score|  R shifted  R raw    degree  rank     auto");
        for h in heads {
            println!(
                "{:>5}  {:>4}  {:>10.3}  {:>9.3}  {:>7.3}  {:>6}  {:>7}  {}",
                h.layer,
                h.head,
                h.max_abs_score,
                h.bound,
                h.bound_unshifted,
                h.degree.map_or("-".to_string(), |g| g.to_string()),
                h.rank.map_or("-".to_string(), |r| r.to_string()),
                h.method
            );
        }
        let bounded = heads.iter().filter(|h| h.degree.is_some()).count();
        let poly = heads.iter().filter(|h| h.method == Method::Poly.as_str()).count();
        println!(
            "{bounded} of {} heads have a degree ≤ 8 meeting the tolerance; auto would use poly for {poly}",
            heads.len()
        );
        if let Some(stem) = &a.plot {
            println!("heatmap -> {}.png, {}.svg", stem.display(), stem.display());
        }
    }
    if let Some(j) = &a.json {
        let s = serde_json::to_string_pretty(&report)?;
        if j == "-" {
            println!("{s}");
        } else {
            aio::write_file_atomic(Path::new(j), s.as_bytes())?;
        }
    }
    Ok(())
}

/// What `attn` runs for every head: a library plan, or hybrid attention.
enum Kernel {
    Plan(HeadPlan),
    Hybrid(HybridOptions),
}

impl Kernel {
    fn run<T: Scalar>(
        &self,
        inp: &aio::attn_file::AttnInput,
        opts: &AttnOptions,
    ) -> altgrad::Result<Vec<aio::attn_file::NamedOutput<T>>> {
        match self {
            Kernel::Plan(p) => aio::attn_file::run_attn::<T>(inp, p, opts),
            Kernel::Hybrid(h) => aio::attn_file::run_attn_hybrid::<T>(inp, h, opts),
        }
    }
}

fn run_attn(a: &AttnArgs) -> Result<()> {
    set_threads(a.threads)?;
    aio::check_output_file("--out", &a.out)?;
    let p = PolyOptions { degree: a.degree, center: !a.no_center, chunk: a.chunk };
    let kernel = match a.attention {
        AttnKernel::Hybrid => {
            let Some(window) = a.window else {
                let msg = "hybrid attention needs --window (keys per row seen exactly, e.g. 64)";
                return Err(Error::bad("--window", msg).into());
            };
            p.validate().map_err(Error::for_flags)?;
            Kernel::Hybrid(HybridOptions { window, sinks: a.sinks, poly: p })
        }
        AttnKernel::Every(m) => {
            let plan = m.plan(p);
            if plan != HeadPlan::Exact {
                p.validate().map_err(Error::for_flags)?;
            }
            if a.window.is_some() && m != Method::Exact {
                let msg = format!("{m} attention takes no window; use --attention hybrid or exact");
                return Err(Error::bad("--window", msg).into());
            }
            Kernel::Plan(plan)
        }
    };
    let mask = match (&kernel, a.window) {
        (Kernel::Hybrid(_), _) => attention::Mask::causal(),
        (_, None) if a.sinks > 0 => return Err(Error::bad("--sinks", "sinks belong to a window: give --window").into()),
        (_, None) => attention::Mask::from_causal(a.causal),
        (_, Some(0)) if a.sinks == 0 => {
            return Err(Error::bad(
                "--window",
                "must be at least 1 (keys per row, diagonal included) or come with --sinks",
            )
            .into())
        }
        (_, Some(window)) => attention::Mask::Window { window, sinks: a.sinks, q_offset: 0 },
    };
    let input = a.input.display().to_string();
    let inp = aio::attn_file::attn_input(aio::read_safetensors(&a.input)?, &input)?;
    let scale = a.scale.unwrap_or(1.0 / (inp.shape.head_dim as f64).sqrt());
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::bad("--scale", format!("must be a positive number, got {scale}")).into());
    }
    let opts = AttnOptions { mask, scale };
    let n = if inp.dtype == "F64" {
        let out = kernel.run::<f64>(&inp, &opts)?;
        aio::write_safetensors_as(&a.out, &out, &inp.dtype)?;
        out.len()
    } else {
        let out = kernel.run::<f32>(&inp, &opts)?;
        aio::write_safetensors_as(&a.out, &out, &inp.dtype)?;
        out.len()
    };
    let computed = if inp.dtype == "F64" { "f64" } else { "f32" };
    println!("wrote {} ({n} tensors, {}; computed in {computed})", a.out.display(), inp.dtype);
    Ok(())
}
