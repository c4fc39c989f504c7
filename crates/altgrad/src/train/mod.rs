//! Training with exact or approximate attention gradients (`altgrad train`).
//!
//! - [`optim`]: AdamW (decoupled weight decay on ≥ 2-D tensors only), global-norm clipping, linear
//!   warm-up + cosine schedule.
//! - [`data`]: byte/tokenized text with a 90/10 held-out split, and MQAR (Zoology) generated on
//!   the fly; every batch is a pure function of `(seed, step)`.
//! - [`loss`]: next-token cross-entropy on selected rows (MQAR answers) through the model's
//!   general-loss entry `backward_hidden_into`.
//! - [`checkpoint`]: atomic checkpoint directories (weights, AdamW moments, step, config).
//! - [`run_train`]: the whole run (model, data, loop, validation, checkpoints, JSON lines);
//!   [`TrainSummary::charts`] its loss curve, [`run_charts`] the curves of several runs from their
//!   JSON-lines logs (chart data; the CLI draws them).
//!
//! Determinism: the same options and the same rayon thread count give the same losses bit for
//! bit, and a run stopped at step K and resumed reproduces the uninterrupted run exactly.

pub mod checkpoint;
pub mod data;
pub mod loss;
pub mod optim;

use crate::attention::Method;
use crate::attention::PolyOptions;
use crate::chart::{ChartSpec, Series};
use crate::io::tokenizer::TextTokenizer;
use crate::io::{load_model, AnyModel};
use crate::model::{
    AttentionPolicy, BuiltInAttention, LayerAttention, LlamaConfig, LlamaWeights, Model, Network, RopeLayout,
};
use crate::{Error, Progress, Result};
use checkpoint::{checkpoint_exists, load_checkpoint, save_checkpoint, TrainState};
use data::{Mqar, Rng, Sequence, TextData, STREAM_EVAL, STREAM_TRAIN};
use loss::{lm_head_grad, masked_lm_loss};
use optim::{clip_factor, global_norm, lr_at, AdamW, AdamWConfig};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Synthetic task (`--task`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Multi-query associative recall ([`data::Mqar`]).
    Mqar,
}

impl std::str::FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mqar" => Ok(Task::Mqar),
            _ => Err(Error::bad("--task", format!("`{s}` is not a known task (mqar)"))),
        }
    }
}

/// Shape of the built-in `tiny` model when training from scratch (`head_dim = hidden / heads`,
/// SwiGLU width `3·hidden`, untied head, rotate-half RoPE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TinySize {
    /// Decoder layers (`--layers`, default 4).
    pub layers: usize,
    /// Model width (`--hidden`, default 128).
    pub hidden: usize,
    /// Query heads (`--heads`, default 4).
    pub heads: usize,
    /// Key/value heads (`--kv-heads`, default 2).
    pub kv_heads: usize,
}

impl Default for TinySize {
    fn default() -> Self {
        let c = LlamaConfig::tiny();
        TinySize { layers: c.num_layers, hidden: c.hidden_size, heads: c.num_heads, kv_heads: c.num_kv_heads }
    }
}

impl TinySize {
    /// The model configuration for `vocab` tokens.
    pub fn config(&self, vocab: usize) -> Result<LlamaConfig> {
        if self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
            return Err(Error::bad("--hidden", format!("{} is not a multiple of --heads {}", self.hidden, self.heads)));
        }
        let head_dim = self.hidden / self.heads;
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::bad("--kv-heads", format!("{} does not divide --heads {}", self.kv_heads, self.heads)));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(Error::bad(
                "--hidden",
                format!("head_dim = hidden / heads = {head_dim} must be even (RoPE pairs coordinates)"),
            ));
        }
        let cfg = LlamaConfig {
            vocab_size: vocab,
            hidden_size: self.hidden,
            intermediate_size: 3 * self.hidden,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim,
            rope_layout: RopeLayout::RotateHalf,
            ..LlamaConfig::tiny()
        };
        cfg.validate("tiny (--layers/--hidden/--heads/--kv-heads/--vocab)")?;
        Ok(cfg)
    }
}

/// Everything `altgrad train` takes. [`TrainOptions::default`] gives the CLI's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// `tiny` (from scratch, weights from `seed`) or a loadable Llama model (fine-tuning).
    pub model: String,
    /// Size of `tiny` (ignored for a loaded model).
    pub tiny: TinySize,
    /// Vocabulary: `tiny`'s size (must be 256 with `--text`: bytes); for MQAR the token range
    /// (default: the model's vocabulary, 256 for `tiny`).
    pub vocab: Option<usize>,
    /// Text files to train on (each split 90/10 into training and held-out tokens).
    pub text: Vec<PathBuf>,
    /// Synthetic task instead of text.
    pub task: Option<Task>,
    /// MQAR key–value pairs per sequence (default `seq_len/16`, at most `vocab/2 − 1`, at least 1).
    pub mqar_pairs: Option<usize>,
    /// Number of updates.
    pub steps: usize,
    /// Sequences per update (loss = mean over all scored tokens of the batch).
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Warm-up updates (default: `steps / 10`).
    pub warmup: Option<usize>,
    /// AdamW decoupled weight decay (matrices only).
    pub weight_decay: f64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Maximum global gradient norm (0 = no clipping).
    pub grad_clip: f64,
    /// Attention method: `exact`, `poly`, `altgrad`, or `hybrid` (a model built with it).
    pub attention: Method,
    /// Degree of poly / altgrad / hybrid (even, ≥ 2).
    pub degree: usize,
    /// Built-in attention (`tiny` from scratch): query/key width of the poly and hybrid layers
    /// (Based's feature dimension). Given, or with `hybrid` or `layer_attention`, the model is
    /// built with its attention ([`crate::model::BuiltInAttention`]); default: `head_dim`.
    #[serde(default)]
    pub feature_dim: Option<usize>,
    /// Hybrid layers: keys per row seen exactly (required with hybrid).
    #[serde(default)]
    pub window: Option<usize>,
    /// Hybrid layers: leading keys every row sees exactly.
    #[serde(default)]
    pub sinks: usize,
    /// Built-in attention, one kind per layer (default: `attention` for every layer).
    #[serde(default)]
    pub layer_attention: Option<Vec<LayerAttention>>,
    /// Chunk size of the polynomial kernels.
    pub chunk: usize,
    /// Seed of the `tiny` weights and of every batch.
    pub seed: u64,
    /// Validation every this many updates and after the last (0 = only after the last).
    pub eval_every: usize,
    /// Held-out sequences per validation.
    pub eval_seqs: usize,
    /// Checkpoint directory.
    pub checkpoint: Option<PathBuf>,
    /// Checkpoint every this many updates (0 = only at the end or at `stop_at`).
    pub save_every: usize,
    /// Continue from the checkpoint in `checkpoint`.
    pub resume: bool,
    /// End the run after this update (1-based) with a checkpoint, as an interruption would.
    pub stop_at: Option<usize>,
    /// One JSON object per update to this file (`-` = stdout).
    pub json: Option<PathBuf>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            model: "tiny".into(),
            tiny: TinySize::default(),
            vocab: None,
            text: Vec::new(),
            task: None,
            mqar_pairs: None,
            steps: 200,
            batch_size: 8,
            seq_len: 256,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup: None,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            attention: Method::Exact,
            degree: 2,
            feature_dim: None,
            window: None,
            sinks: 0,
            layer_attention: None,
            chunk: crate::attention::poly::DEFAULT_CHUNK,
            seed: 0,
            eval_every: 50,
            eval_seqs: 16,
            checkpoint: None,
            save_every: 0,
            resume: false,
            stop_at: None,
            json: None,
        }
    }
}

/// Options that may differ between a run and its resumption (they do not change the trajectory).
const RESUME_FREE: [&str; 8] =
    ["resume", "stop_at", "json", "plot", "checkpoint", "save_every", "eval_every", "eval_seqs"];

impl TrainOptions {
    /// The attention policy these options ask for (exact when the model is built with its own
    /// attention, [`TrainOptions::built_in`]: no policy reaches its layers).
    pub fn policy(&self) -> Result<AttentionPolicy> {
        let po = PolyOptions { degree: self.degree, center: true, chunk: self.chunk };
        if self.attention.is_approximate() {
            po.validate().map_err(Error::for_flags)?;
        }
        if self.wants_built_in() {
            return Ok(AttentionPolicy::EXACT);
        }
        Ok(AttentionPolicy::Fixed(self.attention.plan(po)))
    }

    /// Whether the options ask for a model built with its attention: `hybrid`, `feature_dim` or
    /// `layer_attention`.
    pub fn wants_built_in(&self) -> bool {
        self.attention == Method::Hybrid || self.feature_dim.is_some() || self.layer_attention.is_some()
    }

    /// The attention a `tiny` model of `num_layers` layers and heads of `head_dim` is built with
    /// (`None` unless [`wants_built_in`](Self::wants_built_in)).
    ///
    /// Errors: `BadInput` naming the flag (`--attention`, `--layer-attention`, `--window`, `--sinks`).
    pub fn built_in(&self, num_layers: usize, head_dim: usize) -> Result<Option<BuiltInAttention>> {
        if !self.wants_built_in() {
            if self.window.is_some() || self.sinks > 0 {
                return Err(Error::bad("--window", "a window belongs to hybrid layers: give --attention hybrid"));
            }
            return Ok(None);
        }
        let kind = match self.attention {
            Method::Exact => LayerAttention::Exact,
            Method::Poly => LayerAttention::Poly,
            Method::Hybrid => LayerAttention::Hybrid,
            Method::AltGrad => {
                return Err(Error::bad(
                    "--attention",
                    "altgrad is a backward formula, not a model's attention: build the model with poly or hybrid",
                ))
            }
        };
        let layers = match &self.layer_attention {
            Some(l) if l.len() != num_layers => {
                return Err(Error::bad(
                    "--layer-attention",
                    format!("{} kinds for {num_layers} layers (one per layer)", l.len()),
                ))
            }
            Some(l) => l.clone(),
            None => vec![kind; num_layers],
        };
        let hybrid = layers.contains(&LayerAttention::Hybrid);
        let window = match (hybrid, self.window) {
            (true, None) => return Err(Error::bad("--window", "hybrid layers need --window (e.g. 64)")),
            (false, Some(_)) => return Err(Error::bad("--window", "only hybrid layers take a window")),
            (_, w) => w.unwrap_or(0),
        };
        if !hybrid && self.sinks > 0 {
            return Err(Error::bad("--sinks", "only hybrid layers take sinks"));
        }
        Ok(Some(BuiltInAttention {
            layers,
            feature_dim: self.feature_dim.unwrap_or(head_dim),
            degree: self.degree,
            window,
            sinks: self.sinks,
            center: true,
            chunk: self.chunk,
        }))
    }

    /// The warm-up length actually used.
    pub fn warmup_steps(&self) -> usize {
        self.warmup.unwrap_or(self.steps / 10)
    }

    /// Checks every option that does not need the model or the data.
    ///
    /// Errors: `BadInput` naming the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, m: String| Err(Error::bad(flag, m));
        if self.steps == 0 {
            return bad("--steps", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("--batch-size", "must be at least 1".into());
        }
        if self.seq_len < 2 {
            return bad(
                "--seq-len",
                format!("{} is too short: next-token training needs at least 2 tokens", self.seq_len),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("--lr", format!("{} must be a positive number", self.lr));
        }
        if !(self.min_lr_ratio.is_finite() && (0.0..=1.0).contains(&self.min_lr_ratio)) {
            return bad("--min-lr-ratio", format!("{} must be in [0, 1]", self.min_lr_ratio));
        }
        if self.warmup_steps() > self.steps {
            return bad("--warmup", format!("{} exceeds --steps {}", self.warmup_steps(), self.steps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("--weight-decay", format!("{} must be ≥ 0", self.weight_decay));
        }
        for (flag, b) in [("--beta1", self.beta1), ("--beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(flag, format!("{b} must be in [0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("--eps", format!("{} must be positive", self.eps));
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return bad("--grad-clip", format!("{} must be ≥ 0 (0 = no clipping)", self.grad_clip));
        }
        self.policy()?;
        if self.model == "tiny" {
            self.built_in(self.tiny.layers, 2)?; // the flags' errors before any work
        }
        match (self.text.is_empty(), self.task) {
            (true, None) => return bad("--text/--task", "give training data: --text PATH or --task mqar".into()),
            (false, Some(_)) => return bad("--text/--task", "give either --text or --task, not both".into()),
            _ => {}
        }
        if self.mqar_pairs.is_some() && self.task != Some(Task::Mqar) {
            return bad("--mqar-pairs", "only applies to --task mqar".into());
        }
        if let Some(k) = self.stop_at {
            if k == 0 || k > self.steps {
                return bad("--stop-at", format!("{k} must be in 1..={}", self.steps));
            }
            if self.checkpoint.is_none() {
                return bad("--stop-at", "needs --checkpoint DIR to stop into".into());
            }
        }
        if self.resume && self.checkpoint.is_none() {
            return bad("--resume", "needs --checkpoint DIR to resume from".into());
        }
        if self.eval_seqs == 0 {
            return bad("--eval-seqs", "must be at least 1".into());
        }
        Ok(())
    }
}

/// One line of the JSON-lines log (one per update).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Updates completed (1-based).
    pub step: usize,
    /// Mean training loss of this update's batch (nats per scored token).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens per second of this update (forward + backward + optimizer).
    pub tokens_per_s: f64,
    /// Wall time of this update in seconds.
    pub step_s: f64,
    /// MQAR: fraction of this batch's answers predicted correctly (arg-max).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_accuracy: Option<f64>,
    /// Held-out loss, when measured at this update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// MQAR: held-out answer accuracy, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
}

/// What [`run_train`] returns.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    /// Model source (`tiny` or the path).
    pub model: String,
    /// The model's configuration.
    pub config: LlamaConfig,
    /// Number of parameters.
    pub n_params: usize,
    /// `exact`, `poly` or `altgrad`.
    pub attention: String,
    /// First update of this invocation (1-based; > 1 after `--resume`).
    pub first_step: usize,
    /// Last update completed.
    pub last_step: usize,
    /// True when `stop_at` or an interruption ended the run before `steps`.
    pub stopped_early: bool,
    /// True when [`run_train_until`]'s `stop` ended the run (after update `last_step`).
    pub interrupted: bool,
    /// True when `resume` found the checkpoint already at the last update: nothing was trained.
    pub already_finished: bool,
    /// Training loss of every update of this invocation.
    pub losses: Vec<f64>,
    /// Every record of the run (on resume, the log's earlier records too when `json` is a file).
    pub records: Vec<StepRecord>,
    /// Training loss of the last update.
    pub final_loss: f64,
    /// Last held-out loss.
    pub val_loss: Option<f64>,
    /// Last held-out MQAR accuracy.
    pub accuracy: Option<f64>,
    /// Mean wall time per update (this invocation, excluding validation and checkpoints).
    pub mean_step_s: f64,
    /// Training tokens per second over this invocation's updates.
    pub tokens_per_s: f64,
    /// Where the last checkpoint went.
    pub checkpoint: Option<PathBuf>,
    /// Remarks (e.g. a different thread count on resume).
    pub notes: Vec<String>,
    /// Label of the run for charts: model and attention (`tiny exact`, `tiny poly g=2`).
    pub label: String,
}

impl TrainSummary {
    /// This run's loss chart (and accuracy chart for MQAR), to be drawn as `<stem>.png`/`.svg`.
    pub fn charts(&self, stem: &Path) -> Vec<ChartSpec> {
        loss_charts(&[(self.label.clone(), self.records.clone())], stem, "training loss")
    }
}

enum Data {
    Text(TextData),
    Mqar(Mqar),
}

impl Data {
    fn train_seq(&self, seed: u64, step: usize, b: usize, seq_len: usize) -> Sequence {
        let mut rng = Rng::derive(seed, STREAM_TRAIN, step as u64, b as u64);
        match self {
            Data::Text(t) => t.sample(&mut rng, seq_len),
            Data::Mqar(m) => m.sample(&mut rng),
        }
    }
    fn eval_set(&self, seed: u64, seq_len: usize, count: usize) -> Vec<Sequence> {
        match self {
            Data::Text(t) => t.eval_set(seq_len, count),
            Data::Mqar(m) => (0..count).map(|i| m.sample(&mut Rng::derive(seed, STREAM_EVAL, 0, i as u64))).collect(),
        }
    }
}

fn build_model(opts: &TrainOptions) -> Result<(Model<f32>, Option<TextTokenizer>)> {
    if opts.model == "tiny" {
        let vocab = match (opts.vocab, opts.text.is_empty()) {
            (Some(v), false) if v != 256 => {
                return Err(Error::bad("--vocab", format!("tiny reads bytes with --text: vocab must be 256, got {v}")))
            }
            (v, _) => v.unwrap_or(256),
        };
        let mut cfg = opts.tiny.config(vocab)?;
        cfg.built_in_attention = opts.built_in(cfg.num_layers, cfg.head_dim)?;
        cfg.validate("tiny (--attention/--feature-dim/--window/--layer-attention)")?;
        let w = LlamaWeights::random_hf(&cfg, opts.seed);
        return Ok((Model::new(cfg, w, "tiny")?, None));
    }
    if opts.wants_built_in() || opts.window.is_some() {
        return Err(Error::bad(
            "--attention",
            format!(
                "a model's built-in attention is chosen when it is created (--model tiny); {} keeps its own",
                opts.model
            ),
        ));
    }
    let loaded = load_model::<f32>(&opts.model, opts.seed)?;
    match loaded.model {
        AnyModel::Llama(m) => {
            if !opts.text.is_empty() && loaded.tokenizer.is_none() {
                return Err(Error::bad(&opts.model, "has no tokenizer (tokenizer.json): cannot tokenize --text"));
            }
            if let Some(v) = opts.vocab {
                if v > m.cfg.vocab_size || !opts.text.is_empty() {
                    return Err(Error::bad(
                        "--vocab",
                        format!("for a loaded model --vocab only sets MQAR's token range (≤ {})", m.cfg.vocab_size),
                    ));
                }
            }
            Ok((m, loaded.tokenizer))
        }
        AnyModel::Bert(_) => Err(Error::bad(&opts.model, "is a BERT encoder; train supports Llama-family decoders")),
    }
}

fn build_data(opts: &TrainOptions, model: &Model<f32>, tok: Option<&TextTokenizer>) -> Result<Data> {
    if opts.seq_len > model.cfg.max_seq_len {
        return Err(Error::bad(
            "--seq-len",
            format!("{} exceeds the model's maximum sequence length {}", opts.seq_len, model.cfg.max_seq_len),
        ));
    }
    if opts.task == Some(Task::Mqar) {
        let vocab = opts.vocab.unwrap_or(model.cfg.vocab_size);
        let pairs = opts.mqar_pairs.unwrap_or((opts.seq_len / 16).min(vocab / 2 - 1).max(1));
        return Ok(Data::Mqar(Mqar::new(vocab, opts.seq_len, pairs)?));
    }
    let mut files = Vec::new();
    for p in &opts.text {
        let shown = p.display().to_string();
        let bytes = std::fs::read(p).map_err(|e| Error::bad(&shown, format!("cannot read text: {e}")))?;
        let ids: Vec<u32> = match tok {
            None => bytes.iter().map(|&b| u32::from(b)).collect(),
            Some(t) => {
                let s = String::from_utf8(bytes).map_err(|e| Error::bad(&shown, format!("not valid UTF-8: {e}")))?;
                t.encode(&s)?
            }
        };
        if ids.is_empty() {
            return Err(Error::bad(&shown, "is empty"));
        }
        model.check_ids(&ids[..ids.len().min(model.cfg.max_seq_len)], &shown)?;
        files.push((shown, ids));
    }
    Ok(Data::Text(TextData::split(files, opts.seq_len)?))
}

/// Held-out loss (and MQAR accuracy) of `model` on `set`.
fn evaluate(model: &Model<f32>, policy: &AttentionPolicy, set: &[Sequence], mqar: bool) -> Result<(f64, Option<f64>)> {
    let (mut nll, mut correct, mut count) = (0.0, 0usize, 0usize);
    for s in set {
        let cache = model.forward_with(&s.ids, policy)?;
        let ml = masked_lm_loss(model, &cache, &s.positions, &s.targets, 1.0, None)?;
        nll += ml.sum_nll;
        correct += ml.correct;
        count += s.targets.len();
    }
    let count = count.max(1) as f64;
    Ok((nll / count, mqar.then(|| correct as f64 / count)))
}

fn options_json(opts: &TrainOptions) -> serde_json::Value {
    serde_json::to_value(opts).expect("TrainOptions serializes")
}

/// Checks that a checkpoint's saved options and model match this run's (ignoring [`RESUME_FREE`]).
fn check_resumable(saved: &serde_json::Value, opts: &TrainOptions, cfg: &LlamaConfig, dir: &Path) -> Result<()> {
    let shown = dir.display().to_string();
    let mut now = options_json(opts);
    let mut then = saved.get("options").cloned().unwrap_or_default();
    for k in RESUME_FREE {
        for v in [&mut now, &mut then] {
            if let Some(o) = v.as_object_mut() {
                o.remove(k);
            }
        }
    }
    let (Some(a), Some(b)) = (now.as_object(), then.as_object()) else {
        return Err(Error::bad(&shown, "train_config.json has no options"));
    };
    let differ: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, v)| {
            format!("{k} (checkpoint {}, now {v})", b.get(k).map(|x| x.to_string()).unwrap_or("missing".into()))
        })
        .collect();
    if !differ.is_empty() {
        return Err(Error::bad(
            &shown,
            format!("cannot resume: options differ from the checkpoint's: {}", differ.join(", ")),
        ));
    }
    let saved_cfg = saved.get("model").cloned().unwrap_or_default();
    if saved_cfg != serde_json::to_value(cfg).expect("LlamaConfig serializes") {
        return Err(Error::bad(
            &shown,
            "cannot resume: the checkpoint's model configuration differs from this model's",
        ));
    }
    Ok(())
}

/// The JSON-lines sink: stdout or a file (on resume, the records up to the checkpoint are kept
/// and later ones, from an interrupted run, dropped).
struct JsonLog {
    out: Option<Box<dyn Write>>,
    shown: String,
}

impl JsonLog {
    fn open(path: Option<&Path>, resume_step: Option<usize>) -> Result<(Self, Vec<StepRecord>)> {
        let Some(path) = path else { return Ok((JsonLog { out: None, shown: String::new() }, Vec::new())) };
        if path == Path::new("-") {
            return Ok((JsonLog { out: Some(Box::new(std::io::stdout())), shown: "stdout".into() }, Vec::new()));
        }
        let shown = path.display().to_string();
        let mut kept = Vec::new();
        if let (Some(k), true) = (resume_step, path.exists()) {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(&shown, e))?;
            kept = text
                .lines()
                .filter_map(|l| serde_json::from_str::<StepRecord>(l).ok())
                .filter(|r| r.step <= k)
                .collect();
            let mut body = Vec::new();
            for r in &kept {
                serde_json::to_writer(&mut body, r).expect("record serializes");
                body.push(b'\n');
            }
            crate::io::write_file_atomic(path, &body)?;
        } else {
            std::fs::write(path, b"").map_err(|e| Error::io(&shown, e))?;
        }
        let f = std::fs::OpenOptions::new().append(true).open(path).map_err(|e| Error::io(&shown, e))?;
        Ok((JsonLog { out: Some(Box::new(f)), shown }, kept))
    }

    fn write(&mut self, r: &StepRecord) -> Result<()> {
        if let Some(out) = self.out.as_mut() {
            let mut line = serde_json::to_vec(r).expect("record serializes");
            line.push(b'\n');
            out.write_all(&line).and_then(|_| out.flush()).map_err(|e| Error::io(&self.shown, e))?;
        }
        Ok(())
    }
}

/// Runs a whole training job: builds or loads the model, prepares the data, trains with AdamW
/// (clipping, warm-up + cosine), validates every `eval_every` updates and after the last,
/// checkpoints (every `save_every`, at `stop_at` and at the end), logs one JSON line per update
/// and reports each update to `on_progress` (`message`: the loss and tokens/s). The loss
/// curve is [`TrainSummary::charts`] (drawn by the CLI).
///
/// Errors: `BadInput` naming the flag or file for bad options, unreadable or too-short data, a
/// checkpoint directory that already exists without `resume`, options that differ from the
/// checkpoint's on `resume`, or a loss that becomes non-finite (lower `--lr`); `Io` for write
/// failures.
pub fn run_train(opts: &TrainOptions, on_progress: &dyn Fn(Progress)) -> Result<TrainSummary> {
    run_train_until(opts, on_progress, &|| false)
}

/// [`run_train`] that can be stopped: `stop` is asked between updates (never during one), and
/// when it says true the run ends after the update just completed, saving a checkpoint there
/// when `checkpoint` is set (so `resume` continues from it) and returning a summary with
/// [`TrainSummary::interrupted`] set. The CLI's SIGINT/SIGTERM handler sets such a flag.
///
/// Errors: as [`run_train`].
pub fn run_train_until(
    opts: &TrainOptions,
    on_progress: &dyn Fn(Progress),
    stop: &dyn Fn() -> bool,
) -> Result<TrainSummary> {
    opts.validate()?;
    if let Some(j) = opts.json.as_deref().filter(|j| *j != Path::new("-")) {
        crate::io::check_output_file("--json", j)?;
    }
    if let Some(dir) = &opts.checkpoint {
        crate::io::check_output_dir("--checkpoint", dir)?;
    }
    let policy = opts.policy()?;
    if let (Some(dir), false) = (&opts.checkpoint, opts.resume) {
        if checkpoint_exists(dir) || dir.read_dir().map(|mut d| d.next().is_some()).unwrap_or(false) {
            return Err(Error::bad(
                dir.display().to_string(),
                "already exists; pass --resume to continue that run, or choose another --checkpoint",
            ));
        }
    }
    let (mut model, tok) = build_model(opts)?;
    let data = build_data(opts, &model, tok.as_ref())?;
    let mqar = matches!(data, Data::Mqar(_));
    let cfg = model.cfg.clone();
    let saved_config = serde_json::json!({ "options": options_json(opts), "model": cfg });
    let adam = AdamWConfig { beta1: opts.beta1, beta2: opts.beta2, eps: opts.eps, weight_decay: opts.weight_decay };
    let mut opt = AdamW::new(adam, &model.weights);
    let threads = rayon::current_num_threads();
    let mut notes = Vec::new();
    let mut start = 0usize;
    let mut tokens_seen = 0u64;
    if opts.resume {
        let dir = opts.checkpoint.as_ref().expect("validated");
        let ck = load_checkpoint(dir)?;
        check_resumable(&ck.config, opts, &cfg, &ck.dir)?;
        ck.restore(&mut model.weights, &mut opt)?;
        start = ck.state.step;
        tokens_seen = ck.state.tokens_seen;
        if ck.state.threads != threads {
            notes.push(format!(
                "checkpoint written with {} threads, resuming with {threads}: losses may differ in the last bits",
                ck.state.threads
            ));
        }
        if let Some(k) = opts.stop_at {
            if k <= start {
                return Err(Error::bad("--stop-at", format!("{k} is not after the checkpoint's step {start}")));
            }
        }
    }
    let end = opts.stop_at.unwrap_or(opts.steps);
    if start >= end {
        notes.push(format!("the checkpoint is already at update {start}: nothing to do"));
    }
    let (mut log, mut records) = JsonLog::open(opts.json.as_deref(), opts.resume.then_some(start))?;
    let eval_set = data.eval_set(opts.seed, opts.seq_len, opts.eval_seqs);
    let warmup = opts.warmup_steps();
    let min_lr = opts.lr * opts.min_lr_ratio;
    let step_tokens = (opts.batch_size * opts.seq_len) as f64;

    let mut grads = model.zero_grads(opts.seq_len);
    let (mut losses, mut train_time) = (Vec::new(), 0.0f64);
    let (mut val_loss, mut accuracy) = (None, None);
    let mut last_ckpt = None;
    let save = |model: &Model<f32>, opt: &AdamW<f32>, step: usize, tokens: u64, loss: f64| -> Result<Option<PathBuf>> {
        let Some(dir) = &opts.checkpoint else { return Ok(None) };
        let state = TrainState {
            format: checkpoint::FORMAT,
            step,
            data_position: step,
            rng: "none saved: sequence b of update s uses SplitMix64(hash(seed, stream, s, b))".into(),
            tokens_seen: tokens,
            last_loss: loss,
            threads,
        };
        save_checkpoint(dir, &model.weights, opt, &state, &saved_config)?;
        Ok(Some(dir.clone()))
    };

    let mut interrupted = false;
    let mut last_done = start;
    for step in start..end {
        if stop() {
            interrupted = true;
            break;
        }
        let t0 = Instant::now();
        for p in grads.weights.params_mut() {
            p.data.fill(0.0);
        }
        let seqs: Vec<Sequence> =
            (0..opts.batch_size).map(|b| data.train_seq(opts.seed, step, b, opts.seq_len)).collect();
        let count: usize = seqs.iter().map(|s| s.targets.len()).sum();
        let scale = 1.0 / count as f64;
        let (mut nll, mut correct) = (0.0f64, 0usize);
        let lr = lr_at(step, opts.steps, warmup, opts.lr, min_lr);
        let diverged = |what: &str| {
            let hint = match opts.attention {
                Method::Exact => "lower --lr".to_string(),
                _ => format!("lower --lr (or use a lower --degree than {})", opts.degree),
            };
            Error::bad(
                "--lr",
                format!("diverged at step {} ({what}; learning rate {lr:.3e} at that step); {hint}", step + 1),
            )
        };
        for s in &seqs {
            let cache = model.forward_with(&s.ids, &policy)?;
            if cache.hidden.iter().any(|x| !x.is_finite()) {
                return Err(diverged("non-finite activations"));
            }
            let ml = masked_lm_loss(&model, &cache, &s.positions, &s.targets, scale, Some(lm_head_grad(&mut grads)))?;
            if !ml.sum_nll.is_finite() || ml.dhidden.iter().any(|x| !x.is_finite()) {
                return Err(diverged("non-finite loss"));
            }
            model.backward_hidden_into(&cache, &ml.dhidden, &mut grads)?;
            nll += ml.sum_nll;
            correct += ml.correct;
        }
        let loss = nll / count as f64;
        let norm = global_norm(&grads.weights);
        if !loss.is_finite() {
            return Err(diverged("non-finite loss"));
        }
        if !norm.is_finite() {
            return Err(diverged(&format!("loss {loss:.4}, non-finite gradient norm")));
        }
        opt.step(&mut model.weights, &grads.weights, lr, clip_factor(norm, opts.grad_clip))?;
        if model.weights.params().iter().any(|p| p.data.iter().any(|x| !x.is_finite())) {
            return Err(diverged("non-finite weights after the update"));
        }
        let dt = t0.elapsed().as_secs_f64();
        train_time += dt;
        tokens_seen += step_tokens as u64;
        losses.push(loss);
        let done = step + 1;
        let mut rec = StepRecord {
            step: done,
            loss,
            lr,
            grad_norm: norm,
            tokens_per_s: step_tokens / dt.max(1e-12),
            step_s: dt,
            train_accuracy: mqar.then(|| correct as f64 / count as f64),
            val_loss: None,
            accuracy: None,
        };
        if (opts.eval_every > 0 && done.is_multiple_of(opts.eval_every)) || done == opts.steps || done == end {
            let (vl, acc) = evaluate(&model, &policy, &eval_set, mqar)?;
            (rec.val_loss, rec.accuracy) = (Some(vl), acc);
            (val_loss, accuracy) = (Some(vl), acc);
        }
        log.write(&rec)?;
        records.push(rec);
        let msg = format!(
            "loss {loss:.4}{} | {:.0} tok/s",
            val_loss.map(|v| format!(" val {v:.4}")).unwrap_or_default(),
            step_tokens / dt.max(1e-12)
        );
        on_progress(Progress { done: done as u64, total: opts.steps as u64, message: &msg });
        last_done = done;
        let stopping = done < end && stop();
        if (opts.save_every > 0 && done.is_multiple_of(opts.save_every)) || done == end || stopping {
            last_ckpt = save(&model, &opt, done, tokens_seen, loss)?;
        }
        if stopping {
            interrupted = true;
            break;
        }
    }
    if interrupted && last_ckpt.is_none() && last_done > start {
        // Stopped before the first update's checkpoint could be asked for: save now.
        last_ckpt = save(&model, &opt, last_done, tokens_seen, losses.last().copied().unwrap_or(f64::NAN))?;
    }
    if interrupted && last_ckpt.is_none() {
        last_ckpt = opts.checkpoint.clone().filter(|d| checkpoint_exists(d));
    }
    let label = format!("{} {}", cfg_label(&model), policy_label(opts));
    let n = losses.len();
    Ok(TrainSummary {
        model: model.source.clone(),
        config: cfg,
        n_params: model.weights.numel(),
        attention: policy_label(opts),
        first_step: start + 1,
        last_step: if interrupted { last_done } else { end.max(start) },
        stopped_early: end < opts.steps || interrupted,
        interrupted,
        already_finished: start >= opts.steps,
        final_loss: losses.last().copied().unwrap_or(f64::NAN),
        losses,
        records,
        val_loss,
        accuracy,
        mean_step_s: if n > 0 { train_time / n as f64 } else { 0.0 },
        tokens_per_s: if train_time > 0.0 { n as f64 * step_tokens / train_time } else { 0.0 },
        checkpoint: last_ckpt,
        notes,
        label,
    })
}

fn cfg_label(m: &Model<f32>) -> String {
    m.source.rsplit('/').find(|s| !s.is_empty()).unwrap_or("model").to_string()
}

fn policy_label(opts: &TrainOptions) -> String {
    let df = opts.feature_dim.map(|d| format!(" d_f={d}")).unwrap_or_default();
    match (opts.attention, &opts.layer_attention) {
        (_, Some(l)) => {
            let kinds: Vec<&str> = l.iter().map(|k| k.as_str()).collect();
            format!("{}{df} g={}", kinds.join(","), opts.degree)
        }
        (Method::Exact, None) if df.is_empty() => Method::Exact.to_string(),
        (Method::Exact, None) => format!("exact{df}"),
        (Method::Hybrid, None) => {
            let s = if opts.sinks > 0 { format!(" s={}", opts.sinks) } else { String::new() };
            format!("hybrid w={}{s}{df} g={}", opts.window.unwrap_or(0), opts.degree)
        }
        (a, None) => format!("{a}{df} g={}", opts.degree),
    }
}

/// The loss chart (`<stem>`) and, when any run measured MQAR accuracy, the accuracy chart
/// (`<stem>-accuracy`) of labelled runs (see [`run_charts`] for what they show).
pub fn loss_charts(runs: &[(String, Vec<StepRecord>)], stem: &Path, title: &str) -> Vec<ChartSpec> {
    loss_charts_by(runs, stem, title, false)
}

/// [`loss_charts`] against the update (`by_time = false`) or against the training seconds so far
/// (`by_time`: the sum of each record's `step_s`, the wall-clock budget a comparison of methods
/// holds equal).
pub fn loss_charts_by(runs: &[(String, Vec<StepRecord>)], stem: &Path, title: &str, by_time: bool) -> Vec<ChartSpec> {
    // One run: raw training loss and held-out loss. Several: the training loss as a moving
    // average over 10 updates, and the held-out loss only while the palette (8 colours) suffices.
    let single = runs.len() == 1;
    let with_val = runs.len() * 2 <= 8;
    let mut loss = Vec::new();
    let mut acc = Vec::new();
    for (label, recs) in runs {
        // x of each record: its update, or the training seconds up to and including it
        let xs: Vec<f64> = if by_time {
            recs.iter()
                .scan(0.0, |t, r| {
                    *t += r.step_s;
                    Some(*t)
                })
                .collect()
        } else {
            recs.iter().map(|r| r.step as f64).collect()
        };
        let x_of = |i: usize| xs[i];
        let raw: Vec<(f64, f64)> = recs.iter().enumerate().map(|(i, r)| (x_of(i), r.loss)).collect();
        if single {
            loss.push(Series { label: format!("{label} train"), points: raw });
        } else {
            let w = 10usize;
            let pts = (0..raw.len())
                .map(|i| {
                    let lo = i.saturating_sub(w - 1);
                    (raw[i].0, raw[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i + 1 - lo) as f64)
                })
                .collect();
            loss.push(Series { label: format!("{label} train (mean of 10)"), points: pts });
        }
        let val: Vec<(f64, f64)> =
            recs.iter().enumerate().filter_map(|(i, r)| r.val_loss.map(|v| (x_of(i), v))).collect();
        if !val.is_empty() && with_val {
            loss.push(Series { label: format!("{label} held-out"), points: val });
        }
        let a: Vec<(f64, f64)> =
            recs.iter().enumerate().filter_map(|(i, r)| r.accuracy.map(|v| (x_of(i), v))).collect();
        if !a.is_empty() {
            acc.push(Series { label: format!("{label} held-out"), points: a });
        }
    }
    // Log scale only when the losses span more than a factor 20 (MQAR heading to 0); otherwise
    // a linear axis keeps its tick labels.
    let ys = || loss.iter().flat_map(|s| s.points.iter().map(|p| p.1)).filter(|y| y.is_finite() && *y > 0.0);
    let (lo, hi) = (ys().fold(f64::INFINITY, f64::min), ys().fold(0.0f64, f64::max));
    let log_y = lo.is_finite() && hi / lo > 20.0;
    let x_label = if by_time { "training time (s)" } else { "update" };
    let mut charts = vec![ChartSpec {
        stem: stem.display().to_string(),
        title: title.to_string(),
        x_label: x_label.into(),
        y_label: "loss (nats/token)".into(),
        log_x: false,
        log_y,
        series: loss,
    }];
    if !acc.is_empty() {
        let name = format!("{}-accuracy", stem.file_name().map(|s| s.to_string_lossy()).unwrap_or_default());
        charts.push(ChartSpec {
            stem: stem.with_file_name(name).display().to_string(),
            title: "MQAR answer accuracy".into(),
            x_label: x_label.into(),
            y_label: "accuracy".into(),
            log_x: false,
            log_y: false,
            series: acc,
        });
    }
    charts
}

/// The loss charts of several runs from their JSON-lines logs (`--json` files), for
/// `<out_stem>.png` / `.svg` (training loss as a moving average over 10 updates, and the
/// held-out loss where measured for up to 4 runs; log scale when the losses span more than a
/// factor 20) and, when any run measured MQAR accuracy, `<out_stem>-accuracy.png` / `.svg`. Each
/// run is labelled by its file name without extension.
///
/// Errors: `BadInput` naming a file that cannot be read, has a line that is not a step record,
/// or has no records.
pub fn run_charts(jsonl_files: &[PathBuf], out_stem: &Path) -> Result<Vec<ChartSpec>> {
    run_charts_by(jsonl_files, out_stem, false)
}

/// [`run_charts`] against the update or, `by_time`, the training seconds ([`loss_charts_by`]).
///
/// Errors: as [`run_charts`].
pub fn run_charts_by(jsonl_files: &[PathBuf], out_stem: &Path, by_time: bool) -> Result<Vec<ChartSpec>> {
    if jsonl_files.is_empty() {
        return Err(Error::bad("runs", "no JSON-lines files given"));
    }
    let mut runs = Vec::new();
    for f in jsonl_files {
        let shown = f.display().to_string();
        let text = std::fs::read_to_string(f).map_err(|e| Error::bad(&shown, format!("cannot read: {e}")))?;
        let mut recs = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            recs.push(
                serde_json::from_str::<StepRecord>(line)
                    .map_err(|e| Error::bad(&shown, format!("line {}: not a training step record: {e}", i + 1)))?,
            );
        }
        if recs.is_empty() {
            return Err(Error::bad(&shown, "has no step records"));
        }
        let label = f.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or(shown);
        runs.push((label, recs));
    }
    Ok(loss_charts_by(&runs, out_stem, "training loss", by_time))
}
