//! Text to token ids and back, exactly as the model's own tokenizer does it.
//!
//! Two sources:
//! - [`TextTokenizer::from_file`]: an HF `tokenizer.json`, with its normalizer, pre-tokenizer, model,
//!   post-processor (BERT gets `[CLS] … [SEP]`) and decoder. Truncation and padding stored in the
//!   file are switched off, as `transformers` does for a plain call: callers cut sequences
//!   themselves (`--seq-len`).
//! - [`TextTokenizer::from_gguf_parts`]: a byte-level BPE vocabulary from GGUF metadata
//!   (`tokenizer.ggml.model == "gpt2"`), rebuilt with llama.cpp's semantics: the pre-tokenizer
//!   named by `tokenizer.ggml.pre`, control tokens matched whole in the text, BOS prepended only
//!   when `tokenizer.ggml.add_bos_token` says so.
//!
//! Every error names the tokenizer's source file.

use std::path::Path;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// GGUF `tokenizer.ggml.token_type` of a control token (`<|endoftext|>`, `<|im_start|>`, …).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `tokenizer.ggml.token_type` of a user-defined token (matched whole, kept when decoding).
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The GPT-2 split regex (llama.cpp's form; HF's `ByteLevel` adds a final `|\s+`, which changes
/// nothing because llama.cpp keeps unmatched stretches as pieces of their own).
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// A tokenizer: text to token ids and back.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Prepended by [`TextTokenizer::encode`] (GGUF `add_bos_token`); HF files do this in their
    /// post-processor instead.
    bos: Option<u32>,
    /// Number of token ids the model knows (ids `0..vocab_size`).
    vocab_size: usize,
    /// The file the tokenizer came from, for error messages.
    source: String,
}

/// The tokenizer part of a GGUF file's metadata, for [`TextTokenizer::from_gguf_parts`].
#[derive(Clone, Debug, Default)]
pub struct GgufTokenizerParts {
    /// `tokenizer.ggml.tokens`: token `i` has id `i`, spelled in the byte-level alphabet.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.merges`: `"a b"` pairs, highest priority first.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.token_type`, one per token (1 normal, 3 control, 4 user-defined, …).
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.pre`: the pre-tokenizer's name (`"smollm"`, `"gpt-2"`, …).
    pub pre: Option<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (false when absent, as llama.cpp does for BPE vocabularies).
    pub add_bos: bool,
    /// The GGUF file, named in errors.
    pub source: String,
}

impl TextTokenizer {
    /// From an HF `tokenizer.json` (post-processing included: BERT gets `[CLS] … [SEP]`).
    ///
    /// Truncation and padding settings in the file are ignored: [`TextTokenizer::encode`] returns
    /// every id, as `transformers` does for `tokenizer(text)`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(&source, e))?;
        Self::from_bytes(&source, &bytes)
    }

    /// From the bytes of an HF `tokenizer.json`, as [`TextTokenizer::from_file`] reads the file;
    /// `source` names it in messages.
    ///
    /// Errors: `BadInput` naming `source` when the bytes are not a valid tokenizer.json or its
    /// vocabulary is empty.
    pub fn from_bytes(source: &str, bytes: &[u8]) -> Result<Self> {
        let source = source.to_string();
        // JSON syntax first: the tokenizers crate (0.22) panics instead of failing on a syntax
        // error inside some sections (e.g. `decoder`), found by fuzzing (fuzz/regressions).
        let json: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::bad(&source, format!("not a valid HF tokenizer.json: invalid JSON: {e}")))?;
        if let Some(pp) = json.get("post_processor") {
            check_post_processor(pp).map_err(|m| Error::bad(&source, format!("not a valid HF tokenizer.json: {m}")))?;
        }
        let mut inner = guard(&source, "reading", || Tokenizer::from_bytes(bytes))?
            .map_err(|e| Error::bad(&source, format!("not a valid HF tokenizer.json: {e}")))?;
        inner.with_truncation(None).map_err(|e| Error::bad(&source, format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);
        let vocab_size = inner.get_vocab_size(true);
        if vocab_size == 0 {
            return Err(Error::bad(&source, "the tokenizer has an empty vocabulary"));
        }
        Ok(TextTokenizer { inner, bos: None, vocab_size, source })
    }

    /// Equivalent byte-level BPE from GGUF metadata (`tokenizer.ggml.model == "gpt2"`).
    ///
    /// Pre-tokenizers (`tokenizer.ggml.pre`), as llama.cpp defines them:
    /// - `smollm` (also `starcoder`, `refact`, `codeshell`, `minerva-7b`): each `\p{N}` alone, then
    ///   the GPT-2 regex; in HF terms `Sequence[Digits(individual), ByteLevel(use_regex)]`.
    /// - `gpt-2`/`gpt2` (also `phi-2`, `mpt`, `olmo`): the GPT-2 regex (`ByteLevel` alone).
    /// - `default` or absent: llama.cpp's fallback, four regexes in turn (punctuation runs, GPT-2,
    ///   `\p{N}+`, three ASCII digits).
    /// - anything else: an error naming the pre-tokenizer.
    ///
    /// Control tokens (type 3), BOS and EOS become special tokens (matched whole in the text,
    /// dropped by [`TextTokenizer::decode`]); user-defined tokens (type 4) are matched whole and
    /// kept when decoding, as llama.cpp does.
    pub fn from_gguf_parts(parts: GgufTokenizerParts) -> Result<Self> {
        let GgufTokenizerParts { tokens, merges, token_types, pre, bos_id, eos_id, add_bos, source } = parts;
        let bad = |msg: String| Error::bad(&source, msg);
        let n = tokens.len();
        if n == 0 {
            return Err(bad("tokenizer.ggml.tokens is empty".into()));
        }
        if u32::try_from(n).is_err() {
            return Err(bad(format!("tokenizer.ggml.tokens has {n} entries, more than u32 ids can number")));
        }
        if let Some(types) = &token_types {
            if types.len() != n {
                return Err(bad(format!(
                    "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {n}",
                    types.len()
                )));
            }
        }
        for (key, id) in [("tokenizer.ggml.bos_token_id", bos_id), ("tokenizer.ggml.eos_token_id", eos_id)] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(bad(format!("{key} = {id} is not below the vocabulary size {n}")));
                }
            }
        }
        if add_bos && bos_id.is_none() {
            return Err(bad("tokenizer.ggml.add_bos_token is true but there is no tokenizer.ggml.bos_token_id".into()));
        }

        let pre_tokenizer = gguf_pre_tokenizer(pre.as_deref()).map_err(bad)?;

        // Like llama.cpp, a token listed twice keeps its last id.
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges: Merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok((a.to_owned(), b.to_owned())),
                _ => Err(bad(format!("tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space"))),
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(format!("the BPE vocabulary and merges do not fit together: {e}")))?;

        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));

        let mut special: Vec<usize> = Vec::new();
        let mut user_defined: Vec<usize> = Vec::new();
        if let Some(types) = &token_types {
            for (i, &ty) in types.iter().enumerate() {
                match ty {
                    TOKEN_TYPE_CONTROL => special.push(i),
                    TOKEN_TYPE_USER_DEFINED => user_defined.push(i),
                    _ => {}
                }
            }
        }
        special.extend(bos_id.iter().chain(eos_id.iter()).map(|&id| id as usize));
        special.sort_unstable();
        special.dedup();
        let added = |ids: &[usize], is_special: bool| -> Vec<AddedToken> {
            ids.iter()
                .filter(|&&i| !tokens[i].is_empty())
                .map(|&i| AddedToken::from(tokens[i].clone(), is_special).normalized(false))
                .collect()
        };
        // The ids come from the vocabulary, where every one of these tokens already is.
        inner.add_special_tokens(&added(&special, true));
        inner.add_tokens(&added(&user_defined, false));

        // Fewer when a token is listed twice (its first id then decodes to nothing), never more.
        let rebuilt = inner.get_vocab_size(true);
        if rebuilt > n {
            return Err(Error::Internal(format!("{source}: the rebuilt tokenizer has {rebuilt} ids for {n} tokens")));
        }
        Ok(TextTokenizer { inner, bos: if add_bos { bos_id } else { None }, vocab_size: n, source })
    }

    /// The token ids of `text`, with special tokens as the model's tokenizer adds them
    /// (`[CLS] … [SEP]` for BERT, BOS for a GGUF whose `add_bos_token` is true).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = guard(&self.source, "tokenizing with", || self.inner.encode_fast(text, true))?
            .map_err(|e| Error::bad(&self.source, format!("cannot tokenize the text: {e}")))?;
        let ids = encoding.get_ids();
        let mut out = Vec::with_capacity(ids.len() + usize::from(self.bos.is_some()));
        out.extend(self.bos);
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// The token ids of `text` as [`TextTokenizer::encode`] gives them, cut to at most `max` ids
    /// the way `transformers` truncates (`truncation=True, max_length=max`): the special tokens
    /// the post-processor puts at the end (BERT's `[SEP]`) are kept, text tokens are dropped
    /// before them. Also returns how many ids the whole text has.
    pub fn encode_limited(&self, text: &str, max: usize) -> Result<(Vec<u32>, usize)> {
        let encoding = guard(&self.source, "tokenizing with", || self.inner.encode_fast(text, true))?
            .map_err(|e| Error::bad(&self.source, format!("cannot tokenize the text: {e}")))?;
        let ids = encoding.get_ids();
        let total = ids.len() + usize::from(self.bos.is_some());
        let mut out: Vec<u32> = self.bos.into_iter().chain(ids.iter().copied()).collect();
        if out.len() > max {
            let mask = encoding.get_special_tokens_mask();
            let tail = mask.iter().rev().take_while(|&&m| m == 1).count().min(ids.len());
            if max > tail {
                let keep_tail: Vec<u32> = out[out.len() - tail..].to_vec();
                out.truncate(max - tail);
                out.extend(keep_tail);
            } else {
                out.truncate(max);
            }
        }
        Ok((out, total))
    }

    /// The text of `ids`, special tokens skipped. Every id must be below
    /// [`TextTokenizer::vocab_size`].
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(Error::bad(
                "token ids",
                format!("id {id} is not below the vocabulary size {} of {}", self.vocab_size, self.source),
            ));
        }
        guard(&self.source, "decoding with", || self.inner.decode(ids, true))?
            .map_err(|e| Error::bad(&self.source, format!("cannot decode token ids: {e}")))
    }

    /// The number of token ids (added tokens included): valid ids are `0..vocab_size()`.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// Runs `f`, turning a panic inside the tokenizers crate into `BadInput` naming `source` (a last
/// line of defence: the checks before it avoid the panics fuzzing found).
fn guard<R>(source: &str, doing: &str, f: impl FnOnce() -> R) -> Result<R> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let why = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        Error::bad(source, format!("the tokenizers library failed {doing} this tokenizer: {why}"))
    })
}

/// Checks a `post_processor` section: every special token a `TemplateProcessing` template
/// names must be defined in its `special_tokens` (the tokenizers crate 0.22 accepts such a file
/// and then panics when encoding; found by fuzzing). `Sequence` processors are checked
/// recursively.
fn check_post_processor(pp: &serde_json::Value) -> std::result::Result<(), String> {
    // Structural, whatever `type` says: the crate's post-processor wrapper is untagged, so an
    // object with template fields becomes a TemplateProcessing even under a misspelled type
    // (found by fuzzing).
    for p in pp.get("processors").and_then(|p| p.as_array()).into_iter().flatten() {
        check_post_processor(p)?;
    }
    let defined = pp.get("special_tokens").and_then(|t| t.as_object());
    for template in ["single", "pair"] {
        for piece in pp.get(template).and_then(|t| t.as_array()).into_iter().flatten() {
            let Some(id) = piece.get("SpecialToken").and_then(|t| t.get("id")).and_then(|i| i.as_str()) else {
                continue;
            };
            if !defined.is_some_and(|d| d.contains_key(id)) {
                return Err(format!(
                    "post_processor template `{template}` uses special token {id:?}, which its special_tokens do not \
                     define"
                ));
            }
        }
    }
    Ok(())
}

/// The HF pre-tokenizer equivalent to llama.cpp's pre-tokenizer `pre` for a byte-level BPE vocabulary.
fn gguf_pre_tokenizer(pre: Option<&str>) -> std::result::Result<PreTokenizerWrapper, String> {
    let byte_level = |use_regex: bool| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let split = |re: &str| -> std::result::Result<PreTokenizerWrapper, String> {
        Split::new(SplitPattern::Regex(re.to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map(PreTokenizerWrapper::Split)
            .map_err(|e| format!("internal regex {re:?} does not compile: {e}"))
    };
    Ok(match pre {
        Some("smollm" | "starcoder" | "refact" | "codeshell" | "minerva-7b") => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![Digits::new(true).into(), byte_level(true)]))
        }
        Some("gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo") => byte_level(true),
        None | Some("default") => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(r"[\p{P}\$\+<=>\^~\|]+")?,
            split(GPT2_SPLIT)?,
            split(r"\p{N}+")?,
            split("[0-9][0-9][0-9]")?,
            byte_level(false),
        ])),
        Some(other) => {
            return Err(format!(
                "unsupported pre-tokenizer tokenizer.ggml.pre = {other:?} (supported: smollm, starcoder, refact, \
                 codeshell, minerva-7b, gpt-2, gpt2, phi-2, mpt, olmo, default)"
            ))
        }
    })
}
