//! The `altgrad` command line: parses, calls the library, prints. No math here.

use altgrad::attention::{self, AttnOptions, AttnShape};
use altgrad::io::{self as aio, TensorF64};
use altgrad::io::{AnyModel, Loaded};
use altgrad::linalg::norm;
use altgrad::linalg::Scalar;
use altgrad::model::bert::{pooled_norm_loss, BertModel};
use altgrad::model::Model;
use altgrad::report::{GradReport, HeadReport, Timing};
use altgrad::Error;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::time::Instant;

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
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Method {
    /// Exact softmax attention (tiled, O(n²) time, O(n) memory).
    Exact,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Dtype {
    F32,
    F64,
}

#[derive(clap::Args)]
struct GradArgs {
    /// Model: `tiny` (built-in, seeded), a `.gguf` file (Llama), or an HF directory (Llama or BERT).
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
    /// Attention method for every head.
    #[arg(long, value_enum, default_value = "exact")]
    attention: Method,
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
struct AttnArgs {
    /// safetensors with q [b,n,h,d], k [b,n,h_kv,d], v [b,n,h_kv,d_v], optional do [b,n,h,d_v].
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors: o, and dq, dk, dv when `do` is given (input dtype).
    #[arg(long)]
    out: PathBuf,
    /// Attention method.
    #[arg(long, value_enum, default_value = "exact")]
    attention: Method,
    /// Causal mask (j ≤ i).
    #[arg(long)]
    causal: bool,
    /// Score scale τ (default 1/√d).
    #[arg(long)]
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
    // No subcommand: the default run, `altgrad grad` with its defaults.
    let cmd = cli.cmd.or_else(|| Cli::parse_from(["altgrad", "grad"]).cmd).expect("grad parses");
    let res = match cmd {
        Cmd::Grad(a) => run_grad(&a),
        Cmd::Attn(a) => run_attn(&a),
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
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().context("setting up the thread pool")?;
    }
    Ok(())
}

/// What a gradient run produced, whatever the model family.
struct GradRun<T> {
    loss: f64,
    loss_name: &'static str,
    t_fwd: f64,
    t_bwd: f64,
    hidden: Vec<T>,
    hidden_size: usize,
    n_layers: usize,
    n_heads: usize,
    summary: String,
    grads: Vec<(String, Vec<usize>, Vec<T>)>,
}

fn token_ids<T: Scalar>(a: &GradArgs, loaded: &Loaded<T>, max_len: usize) -> Result<Vec<u32>> {
    let mut ids = if let Some(p) = &a.tokens {
        aio::read_tokens(p)?
    } else {
        let text = match &a.text {
            Some(p) => std::fs::read_to_string(p).map_err(|e| Error::io(p.display().to_string(), e))?,
            None => DEFAULT_TEXT.to_string(),
        };
        loaded.encode(&text)?
    };
    if let Some(n) = a.seq_len {
        if n == 0 {
            return Err(Error::bad("--seq-len", "must be at least 1").into());
        }
        ids.truncate(n);
    } else if a.tokens.is_none() && a.text.is_none() {
        ids.truncate(1024.min(max_len));
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

fn input_name(a: &GradArgs) -> String {
    a.tokens.as_ref().or(a.text.as_ref()).map(|p| p.display().to_string()).unwrap_or("built-in text".into())
}

fn run_llama<T: Scalar>(model: &Model<T>, ids: &[u32], input: &str) -> Result<GradRun<T>> {
    model.check_ids(ids, input)?;
    if ids.len() < 2 {
        return Err(Error::bad(input, "the next-token loss needs at least 2 token ids").into());
    }
    let t0 = Instant::now();
    let cache = model.forward(ids)?;
    let mut grads = model.zero_grads(ids.len());
    let (loss, dhidden) = model.lm_loss(&cache, &mut grads)?;
    let t_fwd = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    model.backward_hidden_into(&cache, &dhidden, &mut grads)?;
    let t_bwd = t1.elapsed().as_secs_f64();
    let c = &model.cfg;
    let summary = format!(
        "{} (Llama: {} layers, hidden {}, {} heads / {} kv heads of {}, {:.1}M params, {})",
        model.source,
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        model.weights.numel() as f64 / 1e6,
        T::DTYPE.to_lowercase()
    );
    Ok(GradRun {
        loss,
        loss_name: "mean next-token cross-entropy",
        t_fwd,
        t_bwd,
        hidden: cache.hidden,
        hidden_size: c.hidden_size,
        n_layers: c.num_layers,
        n_heads: c.num_heads,
        summary,
        grads: named_grads(grads.weights.params(), grads.embeddings, c.hidden_size),
    })
}

fn run_bert<T: Scalar>(model: &BertModel<T>, ids: &[u32], input: &str) -> Result<GradRun<T>> {
    model.check_ids(ids, input)?;
    let n = ids.len();
    let t0 = Instant::now();
    let cache = model.forward(ids)?;
    let (loss, dhidden) = pooled_norm_loss(&cache.hidden, n);
    let t_fwd = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let grads = model.backward_from_hidden(&cache, &dhidden)?;
    let t_bwd = t1.elapsed().as_secs_f64();
    let c = &model.cfg;
    let summary = format!(
        "{} (BERT: {} layers, hidden {}, {} heads of {}, {:.1}M params, {})",
        model.source,
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.head_dim,
        model.weights.numel() as f64 / 1e6,
        T::DTYPE.to_lowercase()
    );
    Ok(GradRun {
        loss,
        loss_name: "0.5·‖mean-pooled final hidden‖²",
        t_fwd,
        t_bwd,
        hidden: cache.hidden,
        hidden_size: c.hidden_size,
        n_layers: c.num_layers,
        n_heads: c.num_heads,
        summary,
        grads: named_grads(grads.weights.params(), grads.embeddings, c.hidden_size),
    })
}

fn named_grads<T: Scalar>(
    params: Vec<&altgrad::model::Param<T>>,
    embeddings: Vec<T>,
    hidden: usize,
) -> Vec<(String, Vec<usize>, Vec<T>)> {
    let mut v: Vec<_> = params.into_iter().map(|p| (p.name.clone(), p.shape.clone(), p.data.clone())).collect();
    v.push(("embeddings_grad".into(), vec![embeddings.len() / hidden, hidden], embeddings));
    v
}

fn grad_typed<T: Scalar>(a: &GradArgs) -> Result<()> {
    let loaded = aio::load_model::<T>(&a.model, a.seed)?;
    let max_len = match &loaded.model {
        AnyModel::Llama(m) => m.cfg.max_seq_len,
        AnyModel::Bert(m) => m.cfg.max_position_embeddings,
    };
    let ids = token_ids(a, &loaded, max_len)?;
    let input = input_name(a);
    let r = match &loaded.model {
        AnyModel::Llama(m) => run_llama(m, &ids, &input)?,
        AnyModel::Bert(m) => run_bert(m, &ids, &input)?,
    };
    let n = ids.len();
    let heads = (0..r.n_layers)
        .flat_map(|layer| {
            (0..r.n_heads).map(move |head| HeadReport {
                layer,
                head,
                method: "exact".into(),
                bound: None,
                degree: None,
                rank: None,
                predicted_rel_err: 0.0,
            })
        })
        .collect();
    let report = GradReport {
        model: loaded.source().to_string(),
        seq_len: n,
        n_layers: r.n_layers,
        attention: format!("{:?}", a.attention).to_lowercase(),
        loss: r.loss,
        heads,
        timing_s: Timing { forward: r.t_fwd, backward: r.t_bwd, exact_backward: None },
        compare: None,
    };
    if let Some(p) = &a.out {
        aio::write_safetensors(p, &r.grads)?;
    }
    if let Some(p) = &a.hidden_out {
        aio::write_safetensors(p, &[("hidden".to_string(), vec![n, r.hidden_size], r.hidden.clone())])?;
    }
    if a.json.as_deref() != Some("-") {
        let gnorm: f64 =
            r.grads.iter().filter(|g| g.0 != "embeddings_grad").map(|g| norm(&g.2).powi(2)).sum::<f64>().sqrt();
        println!("model        {}", r.summary);
        println!("tokens       {n} ({input})");
        println!("attention    {}", report.attention);
        println!("loss         {:.6} ({}; exp = {:.2})", r.loss, r.loss_name, r.loss.exp());
        println!("grad norm    {gnorm:.6e}");
        println!("forward      {:.3} s ({:.0} tokens/s)", r.t_fwd, n as f64 / r.t_fwd);
        println!("backward     {:.3} s ({:.0} tokens/s)", r.t_bwd, n as f64 / r.t_bwd);
        if let Some(p) = &a.out {
            println!("gradients -> {}", p.display());
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

fn run_attn(a: &AttnArgs) -> Result<()> {
    set_threads(a.threads)?;
    let input = a.input.display().to_string();
    let ts = aio::read_safetensors(&a.input)?;
    let get = |name: &str| ts.iter().find(|t| t.name == name);
    let need = |name: &str| get(name).ok_or_else(|| Error::bad(&input, format!("missing tensor `{name}`")));
    let (q, k, v) = (need("q")?, need("k")?, need("v")?);
    let dout = get("do");
    for t in [Some(q), Some(k), Some(v), dout].into_iter().flatten() {
        if t.shape.len() != 4 {
            return Err(Error::bad(
                &input,
                format!("tensor `{}` must be 4-D [b, n, heads, dim], got {:?}", t.name, t.shape),
            )
            .into());
        }
        if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
            return Err(Error::bad(&input, format!("tensor `{}` has a non-finite value at index {i}", t.name)).into());
        }
    }
    let (b, n, h, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (hkv, dv) = (k.shape[2], v.shape[3]);
    if k.shape != [b, n, hkv, d] {
        return Err(Error::bad(&input, format!("k has shape {:?}, expected [{b}, {n}, h_kv, {d}]", k.shape)).into());
    }
    if v.shape[..3] != [b, n, hkv] {
        return Err(Error::bad(&input, format!("v has shape {:?}, expected [{b}, {n}, {hkv}, d_v]", v.shape)).into());
    }
    if let Some(g) = dout {
        if g.shape != [b, n, h, dv] {
            return Err(
                Error::bad(&input, format!("do has shape {:?}, expected [{b}, {n}, {h}, {dv}]", g.shape)).into()
            );
        }
    }
    let shape = AttnShape { seq_len: n, num_heads: h, num_kv_heads: hkv, head_dim: d, head_dim_v: dv };
    shape.validate().map_err(|e| Error::bad(&input, e.to_string()))?;
    let scale = a.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let opts = AttnOptions { causal: a.causal, scale };
    if q.dtype == "F64" {
        attn_typed::<f64>(a, q, k, v, dout, b, &shape, &opts)
    } else {
        attn_typed::<f32>(a, q, k, v, dout, b, &shape, &opts)
    }
}

#[allow(clippy::too_many_arguments)]
fn attn_typed<T: Scalar>(
    a: &AttnArgs,
    q: &TensorF64,
    k: &TensorF64,
    v: &TensorF64,
    dout: Option<&TensorF64>,
    b: usize,
    s: &AttnShape,
    opts: &AttnOptions,
) -> Result<()> {
    let conv = |t: &TensorF64| -> Vec<T> { t.data.iter().map(|x| T::from_f64(*x)).collect() };
    let (q, k, v) = (conv(q), conv(k), conv(v));
    let g = dout.map(conv);
    let (n, h, hkv, d, dv) = (s.seq_len, s.num_heads, s.num_kv_heads, s.head_dim, s.head_dim_v);
    let (sq, sk, sv, so) = (n * h * d, n * hkv * d, n * hkv * dv, n * h * dv);
    let (mut o, mut dq, mut dk, mut dvv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for bi in 0..b {
        let (qb, kb, vb) = (&q[bi * sq..(bi + 1) * sq], &k[bi * sk..(bi + 1) * sk], &v[bi * sv..(bi + 1) * sv]);
        let fwd = attention::forward_exact(qb, kb, vb, s, opts)?;
        if let Some(g) = &g {
            let gr = attention::backward_exact(qb, kb, vb, &fwd, &g[bi * so..(bi + 1) * so], s, opts)?;
            dq.extend(gr.dq);
            dk.extend(gr.dk);
            dvv.extend(gr.dv);
        }
        o.extend(fwd.o);
    }
    let mut out = vec![("o".to_string(), vec![b, n, h, dv], o)];
    if g.is_some() {
        out.push(("dq".into(), vec![b, n, h, d], dq));
        out.push(("dk".into(), vec![b, n, hkv, d], dk));
        out.push(("dv".into(), vec![b, n, hkv, dv], dvv));
    }
    aio::write_safetensors(&a.out, &out)?;
    println!("wrote {} ({} tensors, {})", a.out.display(), out.len(), T::DTYPE);
    Ok(())
}
