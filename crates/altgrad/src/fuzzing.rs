//! Entry points of the fuzz targets (`fuzz/`, `scripts/fuzz.sh`): each takes arbitrary bytes,
//! runs one reader of user files on them, and everything such a file reaches in a real run
//! (dequantization, model building, tokenization, a short forward pass), returning the result.
//!
//! Compiled for tests and with the `fuzzing` feature only; not part of the library's API. The
//! fuzz harness treats a panic, an [`Error::Internal`], an empty error message or an allocation
//! beyond the stated bound as a crash; the unit tests below replay every input kept in
//! `fuzz/regressions/<target>/` and every seed in `fuzz/seeds/<target>/` through the same checks
//! (minus the allocation bound), so `cargo test` covers what the fuzzers found.
//!
//! Multi-file inputs (an HF directory, a checkpoint) are split by [`split`]: each part but the
//! last is a little-endian `u32` length followed by that many bytes (clamped to what remains).

use crate::attention::HeadPlan;
use crate::attention::{AttnOptions, Mask, PolyOptions};
use crate::io::gguf::{dequantize, load_gguf_llama_from, GgmlType, GgufFile};
use crate::io::tokenizer::TextTokenizer;
use crate::io::{attn_file, gguf_tokenizer_parts, read_safetensors_bytes};
use crate::model::{AttentionPolicy, Model, Network};
use crate::{Error, Result};

/// A fuzz target: one input, an error for a rejected one.
pub type Target = fn(&[u8]) -> Result<()>;

/// The fuzz targets: name and entry point. `scripts/fuzz.sh` runs them by these names.
pub const TARGETS: [(&str, Target); 9] = [
    ("gguf", gguf),
    ("dequant", dequant),
    ("safetensors", safetensors),
    ("hf_model", hf_model),
    ("hf_config", hf_config),
    ("tokenizer_json", tokenizer_json),
    ("tokens", tokens),
    ("checkpoint", checkpoint),
    ("attn", attn),
];

/// Largest single allocation a target may make for an input of `len` bytes: the stated bound
/// of `docs/RELIABILITY.md` (64 bytes per input byte, plus 64 MiB for fixed-size tables such as
/// a tokenizer's regexes; `attn` adds the polynomial state limit [`attn_file::MAX_POLY_STATE`]
/// values of f64).
pub fn allocation_bound(target: &str, len: usize) -> usize {
    let base = 64 * len + (64 << 20);
    if target == "attn" {
        base + 8 * attn_file::MAX_POLY_STATE
    } else {
        base
    }
}

/// One-time set-up before allocations are measured: the GEMM backend (faer) reserves a fixed
/// page pool per thread on its first product (≈ 1 GiB of address space, independent of any
/// input); this runs small f32 and f64 products on this thread and on every rayon thread.
pub fn warm_up() {
    fn products() {
        use crate::linalg::{matmul, rm, rm_mut};
        for n in [8usize, 64, 256] {
            let a = vec![1.0f32; n * n];
            let mut c = vec![0.0f32; n * n];
            matmul(rm_mut(&mut c, n, n), false, rm(&a, n, n), rm(&a, n, n), 1.0, faer::Par::Seq);
            let a = vec![1.0f64; n * n];
            let mut c = vec![0.0f64; n * n];
            matmul(rm_mut(&mut c, n, n), false, rm(&a, n, n), rm(&a, n, n), 1.0, faer::Par::Seq);
        }
    }
    products();
    rayon::broadcast(|_| products());
}

/// Splits `data` into `n` parts (see the module docs).
pub fn split(mut data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts = Vec::with_capacity(n);
    for _ in 1..n {
        let len = if data.len() >= 4 {
            let l = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
            data = &data[4..];
            l.min(data.len())
        } else {
            data = &[];
            0
        };
        parts.push(&data[..len]);
        data = &data[len..];
    }
    parts.push(data);
    parts
}

/// Joins parts in the format [`split`] reads (for making seeds).
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i + 1 < parts.len() {
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(p);
    }
    out
}

/// A short forward pass (ids 0 and 1, or 0 twice) of a loaded decoder, as `grad` would run.
fn short_forward(m: &Model<f32>) -> Result<()> {
    let ids = [0, 1.min(m.cfg.vocab_size as u32 - 1)];
    m.check_ids(&ids, "fuzz ids")?;
    let cache = m.forward_with(&ids, &AttentionPolicy::EXACT)?;
    let _ = cache.hidden.len();
    Ok(())
}

/// A GGUF file: parse, dequantize every tensor, build the Llama model and its tokenizer,
/// tokenize a text, run a short forward pass.
pub fn gguf(data: &[u8]) -> Result<()> {
    let g = GgufFile::from_bytes("fuzz.gguf", data.to_vec())?;
    for t in g.tensors() {
        let _ = g.tensor_f32(&t.name);
    }
    for (k, v) in g.metadata() {
        let _ = (k.len(), v.describe(), v.type_name());
    }
    if let Ok(parts) = gguf_tokenizer_parts(&g) {
        if let Ok(tok) = TextTokenizer::from_gguf_parts(parts) {
            if let Ok(ids) = tok.encode("Hello, world! 123 <|im_start|>") {
                let _ = tok.decode(&ids);
            }
        }
    }
    let (cfg, w, _g) = load_gguf_llama_from::<f32>(g)?;
    short_forward(&Model::new(cfg, w, "fuzz.gguf")?)
}

/// Dequantization of one ggml type: byte 0 picks the type (among every known id), the rest is
/// cut to whole blocks.
pub fn dequant(data: &[u8]) -> Result<()> {
    let Some((&sel, rest)) = data.split_first() else { return Ok(()) };
    let types: Vec<GgmlType> = (0..64).filter_map(GgmlType::from_u32).collect();
    let ty = types[sel as usize % types.len()];
    let (bs, ts) = ty.block_layout();
    let whole = &rest[..rest.len() / ts * ts];
    match dequantize(ty, whole) {
        Ok(v) if v.len() != whole.len() / ts * bs => Err(Error::Internal(format!("{ty}: {} values", v.len()))),
        Ok(_) => Ok(()),
        Err(e) if ty.can_dequantize() => Err(Error::Internal(format!("{ty} rejected whole blocks: {e}"))),
        Err(_) => {
            // A partial block must be an error, never a panic.
            let _ = dequantize(ty, rest);
            Ok(())
        }
    }
}

/// A safetensors file: header and every tensor, as `attn` and checkpoints read it.
pub fn safetensors(data: &[u8]) -> Result<()> {
    let ts = read_safetensors_bytes("fuzz.safetensors", data.to_vec())?;
    for t in &ts {
        let numel = t.shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        if numel != Some(t.data.len()) {
            return Err(Error::Internal(format!("tensor {}: shape {:?}, {} values", t.name, t.shape, t.data.len())));
        }
    }
    Ok(())
}

/// An HF directory: `config.json` | `model.safetensors` ([`split`]); byte 0 picks Llama or
/// BERT and f32 or f64. A short forward pass on success.
pub fn hf_model(data: &[u8]) -> Result<()> {
    let Some((&sel, rest)) = data.split_first() else { return Ok(()) };
    let parts = split(rest, 2);
    let text = std::str::from_utf8(parts[0]).map_err(|_| Error::bad("fuzz/config.json", "not UTF-8"))?;
    let (cfg_name, st_name) = ("fuzz/config.json", "fuzz/model.safetensors");
    match sel % 4 {
        0 => {
            let (cfg, w) = crate::io::hf::load_hf_llama_bytes::<f32>(text, cfg_name, parts[1].to_vec(), st_name)?;
            short_forward(&Model::new(cfg, w, "fuzz")?)
        }
        1 => crate::io::hf::load_hf_llama_bytes::<f64>(text, cfg_name, parts[1].to_vec(), st_name).map(|_| ()),
        2 => {
            let m = crate::io::bert::load_hf_bert_bytes::<f32>(text, cfg_name, parts[1].to_vec(), st_name)?;
            let ids = [0, 1.min(m.cfg.vocab_size as u32 - 1)];
            m.check_ids(&ids, "fuzz ids")?;
            m.forward(&ids).map(|_| ())
        }
        _ => crate::io::bert::load_hf_bert_bytes::<f64>(text, cfg_name, parts[1].to_vec(), st_name).map(|_| ()),
    }
}

/// The text of a `config.json`, read as a Llama and as a BERT configuration.
pub fn hf_config(data: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(data).map_err(|_| Error::bad("fuzz/config.json", "not UTF-8"))?;
    let a = crate::io::hf::parse_hf_llama_config(text, "fuzz/config.json").map(|_| ());
    let b = crate::io::bert::parse_hf_bert_config(text, "fuzz/config.json").map(|_| ());
    a.or(b)
}

/// An HF `tokenizer.json`: build it, tokenize texts (plain, special-token-like, non-ASCII),
/// decode the ids.
pub fn tokenizer_json(data: &[u8]) -> Result<()> {
    let tok = TextTokenizer::from_bytes("fuzz/tokenizer.json", data)?;
    for text in ["Hello, world!", " [CLS] <s> <|endoftext|> 12345 ", "héllo wörld ☃ 日本語"] {
        let ids = tok.encode(text)?;
        let _ = tok.decode(&ids);
    }
    Ok(())
}

/// A token-id file.
pub fn tokens(data: &[u8]) -> Result<()> {
    crate::io::tokens::parse_tokens("fuzz/tokens.txt", data).map(|_| ())
}

/// A training checkpoint read as a model: `state.json` | `train_config.json` |
/// `weights.safetensors` ([`split`]), then a short forward pass.
pub fn checkpoint(data: &[u8]) -> Result<()> {
    let parts = split(data, 3);
    let utf8 =
        |b: &[u8], name: &str| std::str::from_utf8(b).map(str::to_owned).map_err(|_| Error::bad(name, "not UTF-8"));
    let state = utf8(parts[0], "fuzz/state.json")?;
    let config = utf8(parts[1], "fuzz/train_config.json")?;
    let ck = crate::train::checkpoint::checkpoint_model_from_bytes::<f32>(
        ("fuzz/state.json", &state),
        ("fuzz/train_config.json", &config),
        parts[2].to_vec(),
        "fuzz/weights.safetensors",
    )?;
    short_forward(&Model::new(ck.config, ck.weights, "fuzz")?)
}

/// An `attn` input file: byte 0 picks the method (exact, poly, altgrad), degree (2–8), causal
/// mask, row shift and f32/f64; byte 1 the chunk and the scale; the rest is the safetensors file.
pub fn attn(data: &[u8]) -> Result<()> {
    let (Some(&a), Some(&b)) = (data.first(), data.get(1)) else { return Ok(()) };
    let ts = read_safetensors_bytes("fuzz/attn.safetensors", data[2..].to_vec())?;
    let input = attn_file::attn_input(ts, "fuzz/attn.safetensors")?;
    let po =
        PolyOptions { degree: 2 * (1 + ((a >> 2) & 3) as usize), center: a & 0x20 == 0, chunk: 1 + (b & 15) as usize };
    let plan = match a % 3 {
        0 => HeadPlan::Exact,
        1 => HeadPlan::Poly(po),
        _ => HeadPlan::AltGrad(po),
    };
    let scale = 2f64.powi((b >> 4) as i32 - 8);
    let opts = AttnOptions { mask: Mask::from_causal(a & 0x10 != 0), scale };
    if plan != HeadPlan::Exact && may_overflow_poly(&input, &po, scale, a & 0x40 != 0) {
        // Such inputs end in a non-finite result, which `run_attn` reports as an error in release
        // builds (tested in altgrad-cli's tests); with debug assertions, as fuzz builds have,
        // the polynomial kernels assert on the NaN denominator first (attention/poly.rs
        // `finish`). Only the reading and validation are fuzzed for them.
        return Ok(());
    }
    if a & 0x40 != 0 {
        attn_file::run_attn::<f64>(&input, &plan, &opts).map(|_| ())
    } else {
        attn_file::run_attn::<f32>(&input, &plan, &opts).map(|_| ())
    }
}

/// Whether the polynomial kernels could overflow on `input`: `T_g(2R)·F·n·(1 + max|v|)·(1 + max|do|)·(1 + R)`
/// above `1e30` (f32) or `1e300` (f64), with `R = τ·max‖q_i‖·max‖k_j‖` bounding every score and
/// `F = max(1, √τ·max‖q_i‖)^g · max(1, √τ·max‖k_j‖)^g` the features' growth.
fn may_overflow_poly(input: &attn_file::AttnInput, po: &PolyOptions, scale: f64, f64_: bool) -> bool {
    let s = &input.shape;
    let max_norm =
        |x: &[f64], d: usize| x.chunks(d).map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt()).fold(0.0, f64::max);
    let maxabs = |x: &[f64]| x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (nq, nk) = (max_norm(&input.q, s.head_dim), max_norm(&input.k, s.head_dim));
    let r = scale * nq * nk;
    // The features of q and of k alone grow as (√τ‖x‖)^g.
    let feat =
        (scale.sqrt() * nq).max(1.0).powi(po.degree as i32) * (scale.sqrt() * nk).max(1.0).powi(po.degree as i32);
    let t = (0..=po.degree).fold((0.0f64, 1.0f64), |(sum, term), k| {
        let term = if k == 0 { 1.0 } else { term * 2.0 * r / k as f64 };
        (sum + term, term)
    });
    let dmax = input.dout.as_deref().map_or(0.0, maxabs);
    let bound = t.0 * feat * s.seq_len as f64 * (1.0 + maxabs(&input.v)) * (1.0 + dmax) * (1.0 + r);
    let limit = if f64_ { 1e300 } else { 1e30 };
    bound.is_nan() || bound >= limit
}

/// Runs target `name` on `data` and checks what the harness checks (except the allocation
/// bound): no panic (the caller sees it), no internal error, a message for every error.
///
/// Panics: when the result breaks one of these rules (that is the crash the fuzzer reports).
pub fn check(name: &str, f: fn(&[u8]) -> Result<()>, data: &[u8]) {
    match f(data) {
        Ok(()) | Err(Error::Io { .. }) => {}
        Err(Error::Internal(m)) => panic!("{name}: internal error: {m}"),
        Err(e @ Error::BadInput { .. }) => {
            let Error::BadInput { input, msg } = &e else { unreachable!() };
            assert!(!input.is_empty() && !msg.is_empty(), "{name}: empty error message: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fuzz_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
    }

    /// Every input the fuzzers found (and every seed) still gives a clean result.
    #[test]
    fn regressions_and_seeds_replay_cleanly() {
        let mut replayed = 0;
        for (name, f) in TARGETS {
            for kind in ["regressions", "seeds"] {
                let dir = fuzz_dir().join(kind).join(name);
                let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                for e in entries {
                    let p = e.unwrap().path();
                    if p.is_file() {
                        let data = std::fs::read(&p).unwrap();
                        let r = std::panic::catch_unwind(|| check(name, f, &data));
                        assert!(r.is_ok(), "{name}: {} fails", p.display());
                        // Seeds named ok_* are valid files: they must be accepted whole, so the
                        // fuzzers start from inputs that reach every stage.
                        if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("ok_")) {
                            if let Err(e) = f(&data) {
                                panic!("{name}: valid seed {} rejected: {e}", p.display());
                            }
                        }
                        replayed += 1;
                    }
                }
            }
        }
        assert!(replayed >= TARGETS.len(), "only {replayed} inputs replayed");
    }

    #[test]
    fn split_and_join_round_trip() {
        let parts: [&[u8]; 3] = [b"abc", b"", b"tail"];
        assert_eq!(split(&join(&parts), 3), parts.to_vec());
        // Lengths past the end are clamped; missing parts are empty.
        assert_eq!(split(&[9, 0, 0, 0, 1], 2), vec![&[1u8][..], &[][..]]);
        assert_eq!(split(&[1], 3), vec![&[0u8; 0][..]; 3]);
    }
}
