//! Training checkpoints: a directory holding
//!
//! - `weights.safetensors`: every parameter under its model name (f32 for an f32 model);
//! - `optimizer.safetensors`: AdamW's `m.<name>` and `v.<name>` for every parameter;
//! - `state.json`: [`TrainState`] (step = data position; no RNG state: every batch is derived from
//!   `(seed, step)`);
//! - `train_config.json`: the [`super::TrainOptions`] and the model's `LlamaConfig`.
//!
//! Writes never leave a broken checkpoint: everything goes to `<dir>.tmp-<pid>` (each file
//! fsynced), then the old `<dir>` is renamed to `<dir>.prev`, the new one renamed into place and
//! `<dir>.prev` removed. A crash between the two renames leaves `<dir>.prev`, which
//! [`load_checkpoint`] falls back to; a crash before them leaves `<dir>` untouched and a stale
//! temporary directory that loading ignores and the next save of the same process replaces.

use super::optim::AdamW;
use crate::io::{load_model, read_safetensors, write_file_atomic, write_safetensors, AnyModel, Loaded, TensorF64};
use crate::linalg::Scalar;
use crate::model::{LlamaConfig, LlamaWeights, Model, Param};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Checkpoint format version written to `state.json`.
pub const FORMAT: u32 = 1;

/// The loop's position, saved as `state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Format version ([`FORMAT`]).
    pub format: u32,
    /// Updates completed (the next update is number `step + 1`, 1-based).
    pub step: usize,
    /// Batches consumed: equals `step` (each batch is a pure function of `(seed, step)`).
    pub data_position: usize,
    /// How the data RNG is derived (documentation for readers of the file).
    pub rng: String,
    /// Training tokens processed so far.
    pub tokens_seen: u64,
    /// Training loss of the last completed update.
    pub last_loss: f64,
    /// Rayon threads of the run that wrote the checkpoint (bit-identical resumption needs the same count).
    pub threads: usize,
}

/// What [`load_checkpoint`] read.
#[derive(Clone, Debug)]
pub struct LoadedCheckpoint {
    /// The directory actually read (`<dir>`, or `<dir>.prev` after an interrupted save).
    pub dir: PathBuf,
    /// `state.json`.
    pub state: TrainState,
    /// `train_config.json`.
    pub config: serde_json::Value,
    /// `weights.safetensors`.
    pub weights: Vec<TensorF64>,
    /// `optimizer.safetensors`.
    pub optimizer: Vec<TensorF64>,
}

fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::bad(dir.display().to_string(), "checkpoint path has no directory name"))?;
    let mut s = name.to_os_string();
    s.push(suffix);
    Ok(dir.with_file_name(s))
}

/// `<dir>.prev`: the previous checkpoint while a new one is being moved into place.
pub fn prev_dir(dir: &Path) -> Result<PathBuf> {
    sibling(dir, ".prev")
}

/// `<dir>.tmp-<pid>`: where this process writes a checkpoint before renaming it.
pub fn tmp_dir(dir: &Path) -> Result<PathBuf> {
    sibling(dir, &format!(".tmp-{}", std::process::id()))
}

/// True when `dir` holds a complete checkpoint (its `state.json` exists).
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join("state.json").is_file()
}

/// True when a checkpoint can be loaded from `dir` (or from `<dir>.prev`).
pub fn checkpoint_exists(dir: &Path) -> bool {
    is_checkpoint(dir) || prev_dir(dir).map(|p| is_checkpoint(&p)).unwrap_or(false)
}

fn io_err(p: &Path, e: std::io::Error) -> Error {
    Error::io(p.display().to_string(), e)
}

fn fsync_dir(p: &Path) {
    if let Ok(f) = std::fs::File::open(p) {
        let _ = f.sync_all();
    }
}

fn named<T: Scalar>(prefix: &str, ps: &[Param<T>]) -> Vec<(String, Vec<usize>, Vec<T>)> {
    ps.iter().map(|p| (format!("{prefix}{}", p.name), p.shape.clone(), p.data.clone())).collect()
}

/// Saves a checkpoint atomically (see the module docs).
///
/// Errors: `Io` naming the file or directory that could not be written or renamed; `BadInput`
/// when `dir` exists and is not a checkpoint.
pub fn save_checkpoint<T: Scalar>(
    dir: &Path,
    weights: &LlamaWeights<T>,
    opt: &AdamW<T>,
    state: &TrainState,
    config: &serde_json::Value,
) -> Result<()> {
    save_checkpoint_inner(dir, weights, opt, state, config, usize::MAX)
}

/// Test hook: [`save_checkpoint`] that stops (as a crash would) after writing `files` of the
/// four files into the temporary directory, returning an `Internal` error and leaving the
/// temporary directory behind. Not for normal use.
#[doc(hidden)]
pub fn save_checkpoint_interrupted<T: Scalar>(
    dir: &Path,
    weights: &LlamaWeights<T>,
    opt: &AdamW<T>,
    state: &TrainState,
    config: &serde_json::Value,
    files: usize,
) -> Result<()> {
    save_checkpoint_inner(dir, weights, opt, state, config, files)
}

fn save_checkpoint_inner<T: Scalar>(
    dir: &Path,
    weights: &LlamaWeights<T>,
    opt: &AdamW<T>,
    state: &TrainState,
    config: &serde_json::Value,
    stop_after: usize,
) -> Result<()> {
    // An empty directory (e.g. made by the user beforehand) may be replaced; anything else that
    // is not a checkpoint is refused.
    if dir.exists() && !is_checkpoint(dir) && std::fs::remove_dir(dir).is_err() {
        return Err(Error::bad(
            dir.display().to_string(),
            "exists and is not an altgrad checkpoint; refusing to replace it",
        ));
    }
    let tmp = tmp_dir(dir)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    let interrupted = || Err(Error::Internal("checkpoint write interrupted (test hook)".into()));
    let ws: Vec<Param<T>> = weights.params().into_iter().cloned().collect();
    write_safetensors(&tmp.join("weights.safetensors"), &named("", &ws))?;
    drop(ws);
    if stop_after <= 1 {
        return interrupted();
    }
    let mut ot = named("m.", &opt.m);
    ot.extend(named("v.", &opt.v));
    write_safetensors(&tmp.join("optimizer.safetensors"), &ot)?;
    drop(ot);
    if stop_after <= 2 {
        return interrupted();
    }
    let cfg = serde_json::to_vec_pretty(config).map_err(|e| Error::Internal(format!("train_config.json: {e}")))?;
    write_file_atomic(&tmp.join("train_config.json"), &cfg)?;
    if stop_after <= 3 {
        return interrupted();
    }
    let st = serde_json::to_vec_pretty(state).map_err(|e| Error::Internal(format!("state.json: {e}")))?;
    write_file_atomic(&tmp.join("state.json"), &st)?;
    fsync_dir(&tmp);
    let prev = prev_dir(dir)?;
    if dir.exists() {
        if prev.exists() {
            std::fs::remove_dir_all(&prev).map_err(|e| io_err(&prev, e))?;
        }
        std::fs::rename(dir, &prev).map_err(|e| io_err(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))?;
    if let Some(parent) = dir.parent() {
        fsync_dir(if parent.as_os_str().is_empty() { Path::new(".") } else { parent });
    }
    if prev.exists() {
        std::fs::remove_dir_all(&prev).map_err(|e| io_err(&prev, e))?;
    }
    Ok(())
}

/// Reads the checkpoint in `dir`, or in `<dir>.prev` when a save was interrupted between its two
/// renames.
///
/// Errors: `BadInput` naming `dir` when neither holds a checkpoint or a file is malformed;
/// `Io` for unreadable files.
pub fn load_checkpoint(dir: &Path) -> Result<LoadedCheckpoint> {
    let shown = dir.display().to_string();
    let real = if is_checkpoint(dir) {
        dir.to_path_buf()
    } else {
        let prev = prev_dir(dir)?;
        if !is_checkpoint(&prev) {
            return Err(Error::bad(&shown, "no checkpoint here (no state.json) to resume from"));
        }
        prev
    };
    let read_json = |name: &str| -> Result<serde_json::Value> {
        let p = real.join(name);
        let text = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
        serde_json::from_str(&text).map_err(|e| Error::bad(p.display().to_string(), format!("invalid JSON: {e}")))
    };
    let state_v = read_json("state.json")?;
    let state: TrainState = serde_json::from_value(state_v)
        .map_err(|e| Error::bad(real.join("state.json").display().to_string(), format!("not a training state: {e}")))?;
    if state.format != FORMAT {
        return Err(Error::bad(
            real.join("state.json").display().to_string(),
            format!("checkpoint format {} is not supported (expected {FORMAT})", state.format),
        ));
    }
    let config = read_json("train_config.json")?;
    let weights = read_safetensors(&real.join("weights.safetensors"))?;
    let optimizer = read_safetensors(&real.join("optimizer.safetensors"))?;
    Ok(LoadedCheckpoint { dir: real, state, config, weights, optimizer })
}

fn fill<T: Scalar>(dst: &mut Param<T>, src: Option<&TensorF64>, file: &Path, name: &str) -> Result<()> {
    fill_as(dst, src, file, name, true)
}

/// [`fill`], converting the dtype when `same_dtype` is false (loading a model for inference).
fn fill_as<T: Scalar>(
    dst: &mut Param<T>,
    src: Option<&TensorF64>,
    file: &Path,
    name: &str,
    same_dtype: bool,
) -> Result<()> {
    let shown = file.display().to_string();
    let t = src.ok_or_else(|| Error::bad(&shown, format!("tensor {name} is missing")))?;
    if t.shape != dst.shape {
        return Err(Error::bad(
            &shown,
            format!("tensor {name} has shape {:?}, the model needs {:?}", t.shape, dst.shape),
        ));
    }
    if same_dtype && t.dtype != T::DTYPE {
        return Err(Error::bad(&shown, format!("tensor {name} is {}, expected {}", t.dtype, T::DTYPE)));
    }
    for (d, &s) in dst.data.iter_mut().zip(&t.data) {
        *d = T::from_f64(s);
    }
    Ok(())
}

impl LoadedCheckpoint {
    /// Copies the saved weights and optimizer moments into `w` and `opt` (bit-exact: the files
    /// hold the model's own dtype) and sets the optimizer's step count.
    ///
    /// Errors: `BadInput` naming the file for a missing tensor, a shape or dtype mismatch.
    pub fn restore<T: Scalar>(&self, w: &mut LlamaWeights<T>, opt: &mut AdamW<T>) -> Result<()> {
        let find = |ts: &[TensorF64], n: &str| ts.iter().position(|t| t.name == n);
        let wf = self.dir.join("weights.safetensors");
        let of = self.dir.join("optimizer.safetensors");
        for p in w.params_mut() {
            let name = p.name.clone();
            let i = find(&self.weights, &name);
            fill(p, i.map(|i| &self.weights[i]), &wf, &name)?;
        }
        for (prefix, ps) in [("m.", &mut opt.m), ("v.", &mut opt.v)] {
            for p in ps.iter_mut() {
                let name = format!("{prefix}{}", p.name);
                let i = find(&self.optimizer, &name);
                fill(p, i.map(|i| &self.optimizer[i]), &of, &name)?;
            }
        }
        opt.t = self.state.step as u64;
        Ok(())
    }
}

/// The model of the checkpoint in `dir` (or `<dir>.prev`, as [`load_checkpoint`]), for gradients
/// or inspection rather than resuming: the configuration from `train_config.json` (`model`), the
/// weights from `weights.safetensors` (converted to `T`; the optimizer moments are not read into
/// the model). The tokenizer and the parameter names come from the run's base model
/// (`options.model`): none (bytes) and HF names for `tiny`; otherwise the base model is loaded
/// again (with `seed`) when it is still at its path, for its tokenizer and names.
///
/// Errors: those of [`load_checkpoint`]; `BadInput` naming `train_config.json` when it has no
/// valid `model` configuration, or naming `weights.safetensors` for a missing tensor or a shape
/// mismatch (e.g. when the base model has moved and its parameter names are not HF names).
pub fn load_checkpoint_model<T: Scalar>(dir: &Path, seed: u64) -> Result<Loaded<T>> {
    let ck = load_checkpoint(dir)?;
    let cfg_file = ck.dir.join("train_config.json").display().to_string();
    let cfg: LlamaConfig = serde_json::from_value(ck.config.get("model").cloned().unwrap_or_default())
        .map_err(|e| Error::bad(&cfg_file, format!("no valid model configuration (`model`): {e}")))?;
    let base = ck.config.get("options").and_then(|o| o.get("model")).and_then(|m| m.as_str()).unwrap_or("tiny");
    let (mut weights, tokenizer) = match base {
        "tiny" => (LlamaWeights::zeros_hf(&cfg), None),
        spec => match load_model::<T>(spec, seed) {
            Ok(Loaded { model: AnyModel::Llama(m), tokenizer }) if m.cfg == cfg => (m.weights, tokenizer),
            _ => (LlamaWeights::zeros_hf(&cfg), None),
        },
    };
    let wf = ck.dir.join("weights.safetensors");
    for p in weights.params_mut() {
        let name = p.name.clone();
        let t = ck.weights.iter().find(|t| t.name == name);
        fill_as(p, t, &wf, &name, false)?;
    }
    let model = Model::new(cfg, weights, dir.display().to_string())?;
    Ok(Loaded { model: AnyModel::Llama(model), tokenizer })
}
