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
use crate::io::gguf::rename_to_gguf;
use crate::io::hf::min_weight_bytes;
use crate::io::tensors::{decode_finite, MappedSafetensors};
use crate::io::{read_safetensors, write_file_atomic, write_safetensors, TensorF64};
use crate::linalg::Scalar;
use crate::model::{LlamaConfig, LlamaWeights, Param, RopeLayout};
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
    crate::io::cleanup_create_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
    let result = write_and_swap(dir, &tmp, weights, opt, state, config, stop_after);
    crate::io::forget_temporary(&tmp);
    if result.is_err() && stop_after == usize::MAX {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_and_swap<T: Scalar>(
    dir: &Path,
    tmp: &Path,
    weights: &LlamaWeights<T>,
    opt: &AdamW<T>,
    state: &TrainState,
    config: &serde_json::Value,
    stop_after: usize,
) -> Result<()> {
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
    fsync_dir(tmp);
    let prev = prev_dir(dir)?;
    if dir.exists() {
        if prev.exists() {
            std::fs::remove_dir_all(&prev).map_err(|e| io_err(&prev, e))?;
        }
        std::fs::rename(dir, &prev).map_err(|e| io_err(dir, e))?;
    }
    std::fs::rename(tmp, dir).map_err(|e| io_err(dir, e))?;
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
    let real = checkpoint_source(dir)?;
    let read_json = |name: &str| -> Result<serde_json::Value> {
        let p = real.join(name);
        let text = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
        serde_json::from_str(&text).map_err(|e| Error::bad(p.display().to_string(), format!("invalid JSON: {e}")))
    };
    let state_path = real.join("state.json");
    let state_text = std::fs::read_to_string(&state_path).map_err(|e| io_err(&state_path, e))?;
    let state = parse_state(&state_path.display().to_string(), &state_text)?;
    let config = read_json("train_config.json")?;
    let weights = read_safetensors(&real.join("weights.safetensors"))?;
    let optimizer = read_safetensors(&real.join("optimizer.safetensors"))?;
    Ok(LoadedCheckpoint { dir: real, state, config, weights, optimizer })
}

/// A checkpoint read as a model (`altgrad grad/inspect/tokenize/export --model CKPT`): the
/// model configuration and weights saved at its last completed update, without the optimizer.
#[derive(Clone, Debug)]
pub struct CheckpointModel<T> {
    /// The directory actually read (`<dir>`, or `<dir>.prev` after an interrupted save).
    pub dir: PathBuf,
    /// `state.json`.
    pub state: TrainState,
    /// The model's configuration (`train_config.json`'s `model`).
    pub config: LlamaConfig,
    /// The training options (`train_config.json`'s `options`).
    pub options: serde_json::Value,
    /// The weights, under the names the run used (HF names for `tiny` and HF models, GGUF names
    /// for a fine-tuned GGUF model).
    pub weights: LlamaWeights<T>,
}

/// The directory a checkpoint is read from: `dir`, or `<dir>.prev` after an interrupted save.
fn checkpoint_source(dir: &Path) -> Result<PathBuf> {
    if is_checkpoint(dir) {
        return Ok(dir.to_path_buf());
    }
    let prev = prev_dir(dir)?;
    if !is_checkpoint(&prev) {
        return Err(Error::bad(dir.display().to_string(), "no checkpoint here (no state.json)"));
    }
    Ok(prev)
}

/// Reads the model saved in checkpoint `dir` (or `<dir>.prev`): `state.json`,
/// `train_config.json` and `weights.safetensors` (the optimizer's moments are not read).
///
/// Errors: `BadInput` naming the file for a missing or malformed file, a model configuration
/// that fails [`LlamaConfig::validate`] or implies more weights than the file holds (checked
/// before anything is allocated), a missing or misshapen tensor, or a non-finite value; `Io`
/// for unreadable files.
pub fn load_checkpoint_model<T: Scalar>(dir: &Path) -> Result<CheckpointModel<T>> {
    let real = checkpoint_source(dir)?;
    let read = |name: &str| -> Result<(String, String)> {
        let p = real.join(name);
        let shown = p.display().to_string();
        let text = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
        Ok((shown, text))
    };
    let state = read("state.json")?;
    let config = read("train_config.json")?;
    let wf = real.join("weights.safetensors");
    let mapped = MappedSafetensors::open(&wf)?;
    checkpoint_model_from(real, (&state.0, &state.1), (&config.0, &config.1), &mapped)
}

/// [`load_checkpoint_model`] of files held in memory: `(name, text)` of `state.json` and of
/// `train_config.json`, and the bytes of `weights.safetensors` (named `weights_name`).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn checkpoint_model_from_bytes<T: Scalar>(
    state: (&str, &str),
    config: (&str, &str),
    weights: Vec<u8>,
    weights_name: &str,
) -> Result<CheckpointModel<T>> {
    let mapped = MappedSafetensors::from_bytes(weights_name, weights)?;
    checkpoint_model_from(PathBuf::from("checkpoint"), state, config, &mapped)
}

/// The state of `(name, text)` of `state.json`. Errors: `BadInput` naming the file.
fn parse_state(name: &str, text: &str) -> Result<TrainState> {
    let state: TrainState = serde_json::from_str(text).map_err(|e| {
        let what = if e.is_data() { "not a training state" } else { "invalid JSON" };
        Error::bad(name, format!("{what}: {e}"))
    })?;
    if state.format != FORMAT {
        return Err(Error::bad(
            name,
            format!("checkpoint format {} is not supported (expected {FORMAT})", state.format),
        ));
    }
    Ok(state)
}

fn checkpoint_model_from<T: Scalar>(
    dir: PathBuf,
    (state_name, state_text): (&str, &str),
    (config_name, config_text): (&str, &str),
    mapped: &MappedSafetensors,
) -> Result<CheckpointModel<T>> {
    let state = parse_state(state_name, state_text)?;
    let v: serde_json::Value =
        serde_json::from_str(config_text).map_err(|e| Error::bad(config_name, format!("invalid JSON: {e}")))?;
    let model = v.get("model").cloned().ok_or_else(|| Error::bad(config_name, "has no `model` configuration"))?;
    let config: LlamaConfig = serde_json::from_value(model)
        .map_err(|e| Error::bad(config_name, format!("`model` is not a Llama configuration: {e}")))?;
    config.validate(config_name)?;
    let options = v.get("options").cloned().unwrap_or(serde_json::Value::Null);
    // Bound the allocation by the file before making it.
    let need = min_weight_bytes(&config);
    if need > mapped.len() as u128 {
        return Err(Error::bad(
            config_name,
            format!(
                "the model configuration implies at least {need} bytes of weights but {} holds {}",
                mapped.name,
                mapped.len()
            ),
        ));
    }
    let st = mapped.parse()?;
    let mut weights = LlamaWeights::<T>::zeros_hf(&config);
    if st.tensor("token_embd.weight").is_ok() {
        rename_to_gguf(&mut weights);
    }
    for p in weights.params_mut() {
        let view = st.tensor(&p.name).map_err(|_| Error::bad(&mapped.name, format!("missing tensor {}", p.name)))?;
        if view.shape() != p.shape.as_slice() {
            return Err(Error::bad(
                &mapped.name,
                format!("tensor {} has shape {:?}, the configuration implies {:?}", p.name, view.shape(), p.shape),
            ));
        }
        p.data = decode_finite::<T>(&mapped.name, &p.name, &view)?;
    }
    Ok(CheckpointModel { dir, state, config, options, weights })
}

/// What [`export_checkpoint_hf`] wrote.
#[derive(Clone, Debug)]
pub struct Exported {
    /// The update the exported weights are from.
    pub step: usize,
    /// The `tokenizer.json` copied beside the weights, when the checkpoint's model had one.
    pub tokenizer: Option<PathBuf>,
    /// Remarks (e.g. why no tokenizer was written).
    pub notes: Vec<String>,
}

/// The weights of `w` under HF names in rotate-half RoPE layout: renames GGUF tensor names and,
/// for the interleaved layout (GGUF), permutes the rows of every q/k projection (weights and
/// biases) within each head from pairs `(2i, 2i+1)` to pairs `(i, i + d/2)`, undoing llama.cpp's
/// conversion, so the model computes the same function.
pub fn to_hf_layout<T: Scalar>(cfg: &LlamaConfig, w: &LlamaWeights<T>) -> (LlamaConfig, LlamaWeights<T>) {
    let mut out = LlamaWeights::<T>::zeros_hf(cfg);
    for (dst, src) in out.params_mut().into_iter().zip(w.params()) {
        dst.data.clone_from(&src.data);
    }
    let mut cfg = cfg.clone();
    if cfg.rope_layout == RopeLayout::Interleaved {
        let d = cfg.head_dim;
        let unpermute = |data: &mut Vec<T>, cols: usize| {
            let rows = data.len() / cols;
            let mut fixed = data.clone();
            for r in 0..rows {
                let (head, h) = (r / d, r % d);
                let src = head * d + 2 * (h % (d / 2)) + h / (d / 2);
                fixed[r * cols..(r + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
            *data = fixed;
        };
        for l in &mut out.layers {
            for lin in [&mut l.q_proj, &mut l.k_proj] {
                let cols = lin.weight.shape[1];
                unpermute(&mut lin.weight.data, cols);
                if let Some(b) = &mut lin.bias {
                    unpermute(&mut b.data, 1);
                }
            }
        }
        cfg.rope_layout = RopeLayout::RotateHalf;
    }
    (cfg, out)
}

/// Writes the model in checkpoint `ckpt` as an HF Llama directory `out` (`config.json` +
/// `model.safetensors`, F32, HF names, rotate-half RoPE; see [`to_hf_layout`]) that
/// [`crate::io::load_hf_llama`] and HF transformers load, computing the same loss; and, when the
/// checkpoint's model had an HF `tokenizer.json` (in the checkpoint, or in the HF directory it was
/// trained from), a copy of it.
///
/// Errors: those of [`load_checkpoint_model`]; `BadInput` naming the checkpoint when its model
/// is built with its own attention ([`crate::model::BuiltInAttention`]: no HF Llama computes it),
/// or naming `out` when it exists and is not a directory (files already in it are replaced);
/// `Io` for write failures.
pub fn export_checkpoint_hf(ckpt: &Path, out: &Path) -> Result<Exported> {
    crate::io::check_output_dir("--out", out)?;
    let ck = load_checkpoint_model::<f32>(ckpt)?;
    if let Some(b) = &ck.config.built_in_attention {
        let kinds: Vec<&str> = b.layers.iter().map(|k| k.as_str()).collect();
        return Err(crate::Error::bad(
            ckpt.display().to_string(),
            format!(
                "the model is built with its own attention ({}; feature_dim {}), which an HF Llama cannot express: \
                 transformers would run softmax attention; use the checkpoint itself (grad/inspect --model DIR)",
                kinds.join(","),
                b.feature_dim
            ),
        ));
    }
    let (cfg, w) = to_hf_layout(&ck.config, &ck.weights);
    crate::io::save_hf_llama(out, &cfg, &w)?;
    let origin = ck.options.get("model").and_then(|m| m.as_str()).unwrap_or("tiny").to_string();
    let mut notes = Vec::new();
    let candidates = [ck.dir.join("tokenizer.json"), Path::new(&origin).join("tokenizer.json")];
    let tokenizer = match candidates.iter().find(|p| p.is_file()) {
        Some(src) => {
            let bytes = std::fs::read(src).map_err(|e| io_err(src, e))?;
            let dst = out.join("tokenizer.json");
            write_file_atomic(&dst, &bytes)?;
            Some(dst)
        }
        None => {
            notes.push(if origin == "tiny" || origin == "tiny-bounded" {
                "no tokenizer.json: the model reads bytes (token id = byte value)".to_string()
            } else {
                format!("no tokenizer.json: none found for the model it was trained from ({origin})")
            });
            None
        }
    };
    Ok(Exported { step: ck.state.step, tokenizer, notes })
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
