//! One entry point for every model the CLI accepts: `tiny`, a `.gguf` file, or an HF directory
//! (Llama or BERT), each with its own tokenizer.

use super::gguf::{load_gguf_llama, GgufFile};
use super::tokenizer::{GgufTokenizerParts, TextTokenizer};
use crate::linalg::Scalar;
use crate::model::bert::BertModel;
use crate::model::{Model, Network, NetworkSummary};
use crate::{Error, Result};
use std::path::Path;

/// A loaded model: a Llama-family decoder or a BERT encoder.
#[derive(Clone, Debug)]
pub enum AnyModel<T> {
    /// Decoder (loss: mean next-token cross-entropy).
    Llama(Model<T>),
    /// Encoder (loss: `0.5·‖mean-pooled final hidden‖²`).
    Bert(BertModel<T>),
}

impl<T: Scalar> AnyModel<T> {
    /// The model's shape ([`Network::summary`]).
    pub fn summary(&self) -> NetworkSummary {
        match self {
            AnyModel::Llama(m) => m.summary(),
            AnyModel::Bert(m) => m.summary(),
        }
    }
    /// Where the model came from ([`Network::source`]).
    pub fn source(&self) -> &str {
        match self {
            AnyModel::Llama(m) => m.source(),
            AnyModel::Bert(m) => m.source(),
        }
    }
}

/// A model and the tokenizer that came with it.
pub struct Loaded<T> {
    /// The model.
    pub model: AnyModel<T>,
    /// Its tokenizer, when the model has one.
    pub tokenizer: Option<TextTokenizer>,
    /// True when the model reads bytes as token ids (`tiny`, and checkpoints trained from it).
    /// A model with neither a tokenizer nor this cannot tokenize text (it needs token ids).
    pub byte_tokens: bool,
}

impl<T: Scalar> Loaded<T> {
    /// Token ids of `text` as the model's own tokenizer produces them (bytes for `tiny`).
    ///
    /// Errors: `BadInput` naming the model when it has no tokenizer (an HF directory without
    /// `tokenizer.json`): give token ids instead (`--tokens`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_limited(text, usize::MAX).map(|(ids, _)| ids)
    }

    /// Token ids of `text`, at most `max` of them, cut as `transformers` truncates (trailing
    /// special tokens such as BERT's `[SEP]` are kept; see [`TextTokenizer::encode_limited`]),
    /// and how many ids the whole text has. Errors: as [`Loaded::encode`].
    pub fn encode_limited(&self, text: &str, max: usize) -> Result<(Vec<u32>, usize)> {
        match &self.tokenizer {
            Some(t) => t.encode_limited(text, max),
            None if self.byte_tokens => {
                let ids: Vec<u32> = text.bytes().map(u32::from).collect();
                let total = ids.len();
                Ok((ids.into_iter().take(max).collect(), total))
            }
            None => Err(Error::bad(
                self.source(),
                "has no tokenizer (no tokenizer.json), so text cannot be tokenized: give token ids with --tokens FILE \
                 (whitespace-separated integers)",
            )),
        }
    }
    /// Where the model came from.
    pub fn source(&self) -> &str {
        self.model.source()
    }
}

/// The byte-level BPE tokenizer parts in a GGUF file's `tokenizer.ggml.*` metadata.
///
/// Errors: a tokenizer model other than `gpt2`, or missing `tokens`/`merges`.
pub fn gguf_tokenizer_parts(g: &GgufFile) -> Result<GgufTokenizerParts> {
    let src = g.path().to_string();
    let model = g.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(Error::bad(
            &src,
            format!("tokenizer.ggml.model `{model}` is not supported (only gpt2 byte-level BPE)"),
        ));
    }
    let opt_u32 = |k: &str| -> Result<Option<u32>> {
        if g.contains_key(k) {
            let v = g.get_u64(k)?;
            u32::try_from(v).map(Some).map_err(|_| Error::bad(&src, format!("{k} = {v} is out of range")))
        } else {
            Ok(None)
        }
    };
    Ok(GgufTokenizerParts {
        tokens: g.get_str_array("tokenizer.ggml.tokens")?.to_vec(),
        merges: g.get_str_array("tokenizer.ggml.merges")?.to_vec(),
        token_types: if g.contains_key("tokenizer.ggml.token_type") {
            Some(g.get_i32_array("tokenizer.ggml.token_type")?.to_vec())
        } else {
            None
        },
        pre: if g.contains_key("tokenizer.ggml.pre") {
            Some(g.get_str("tokenizer.ggml.pre")?.to_string())
        } else {
            None
        },
        bos_id: opt_u32("tokenizer.ggml.bos_token_id")?,
        eos_id: opt_u32("tokenizer.ggml.eos_token_id")?,
        add_bos: if g.contains_key("tokenizer.ggml.add_bos_token") {
            g.get_bool("tokenizer.ggml.add_bos_token")?
        } else {
            false
        },
        source: src,
    })
}

/// Loads `spec`: `tiny` (built-in, weights from `seed`), `tiny-bounded` (the same with q/k
/// projections scaled by 1/4, so attention scores are bounded), a `.gguf` file (Llama architecture, its
/// BPE tokenizer), an HF directory whose `config.json` says `model_type` `llama` or `bert`
/// (tokenizer from `tokenizer.json` when present), or a training checkpoint directory
/// (`altgrad train --checkpoint DIR`: the weights of its last completed update).
///
/// Errors: a missing path, an unknown format or `model_type`, and every error of the loaders.
pub fn load_model<T: Scalar>(spec: &str, seed: u64) -> Result<Loaded<T>> {
    if spec == "tiny" {
        return Ok(Loaded { model: AnyModel::Llama(Model::tiny(seed)), tokenizer: None, byte_tokens: true });
    }
    if spec == "tiny-bounded" {
        return Ok(Loaded { model: AnyModel::Llama(Model::tiny_bounded(seed)), tokenizer: None, byte_tokens: true });
    }
    let path = Path::new(spec);
    if !path.exists() {
        return Err(Error::bad(
            spec,
            "no such model file or directory (expected `tiny`, a .gguf file or an HF directory)",
        ));
    }
    if path.is_file() {
        let mut magic = [0u8; 4];
        let head = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .map(|_| magic == *b"GGUF")
            .unwrap_or(false);
        if !head {
            return Err(Error::bad(spec, "not a GGUF file (no GGUF magic); expected a .gguf file or an HF directory"));
        }
        let (cfg, w, g) = load_gguf_llama::<T>(path)?;
        let tokenizer = TextTokenizer::from_gguf_parts(gguf_tokenizer_parts(&g)?)?;
        let model = Model::new(cfg, w, spec)?;
        return Ok(Loaded { model: AnyModel::Llama(model), tokenizer: Some(tokenizer), byte_tokens: false });
    }
    if crate::train::checkpoint::checkpoint_exists(path) && !path.join("config.json").exists() {
        return load_checkpoint_as_model(path, spec);
    }
    let cfg_path = path.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(cfg_path.display().to_string(), e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad(cfg_path.display().to_string(), format!("invalid JSON: {e}")))?;
    let tok_path = path.join("tokenizer.json");
    let tokenizer = if tok_path.exists() { Some(TextTokenizer::from_file(&tok_path)?) } else { None };
    match v.get("model_type").and_then(|m| m.as_str()) {
        Some("bert") => {
            Ok(Loaded { model: AnyModel::Bert(super::load_hf_bert::<T>(path)?), tokenizer, byte_tokens: false })
        }
        _ => {
            // load_hf_llama reports a wrong or missing model_type itself
            let (cfg, w) = super::load_hf_llama::<T>(path)?;
            Ok(Loaded { model: AnyModel::Llama(Model::new(cfg, w, spec)?), tokenizer, byte_tokens: false })
        }
    }
}

/// A training checkpoint as a model: its weights at the last completed update, and the
/// tokenizer of the model it was trained from (bytes for `tiny`; the original model's
/// tokenizer when that file or directory still exists; a `tokenizer.json` in the checkpoint
/// directory takes precedence).
fn load_checkpoint_as_model<T: Scalar>(path: &Path, spec: &str) -> Result<Loaded<T>> {
    let ck = crate::train::checkpoint::load_checkpoint_model::<T>(path)?;
    let origin = ck.options.get("model").and_then(|m| m.as_str()).unwrap_or("tiny").to_string();
    let own = ck.dir.join("tokenizer.json");
    let (tokenizer, byte_tokens) = if own.is_file() {
        (Some(TextTokenizer::from_file(&own)?), false)
    } else if origin == "tiny" || origin == "tiny-bounded" {
        (None, true)
    } else {
        (origin_tokenizer(Path::new(&origin)), false)
    };
    let model = Model::new(ck.config, ck.weights, spec)?;
    Ok(Loaded { model: AnyModel::Llama(model), tokenizer, byte_tokens })
}

/// The tokenizer of the model at `origin` (a GGUF file or an HF directory), if it can be read.
fn origin_tokenizer(origin: &Path) -> Option<TextTokenizer> {
    if origin.is_file() {
        let g = GgufFile::open(origin).ok()?;
        TextTokenizer::from_gguf_parts(gguf_tokenizer_parts(&g).ok()?).ok()
    } else {
        TextTokenizer::from_file(&origin.join("tokenizer.json")).ok()
    }
}
