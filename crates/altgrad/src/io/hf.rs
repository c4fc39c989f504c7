//! HF (transformers) Llama directories: `config.json` + `model.safetensors` (or a sharded
//! `model.safetensors.index.json` + shards), loaded into [`LlamaConfig`] + [`LlamaWeights`], and
//! written back (f32) by [`save_hf_llama`].

use super::tensors::{atomic_write, decode_finite, write_tensors, MappedSafetensors};
use crate::linalg::Scalar;
use crate::model::{LlamaConfig, LlamaWeights, RopeLayout};
use crate::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// Only `model_type`, read first so a non-Llama config is reported as such rather than as a
/// missing field.
#[derive(Deserialize)]
struct ModelType {
    model_type: Option<String>,
}

/// The fields of an HF `LlamaConfig` that altgrad uses (others are ignored).
#[derive(Deserialize)]
struct HfLlamaConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5: `{"rope_type": ..., "rope_theta": ...}` replaces `rope_theta` and
    /// `rope_scaling`.
    rope_parameters: Option<serde_json::Value>,
    hidden_act: Option<String>,
}

/// `model.safetensors.index.json`.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// For a sharded model: the index file's name (for errors) and, per tensor name, the position
/// of its shard in the list of weight files.
type ShardMap = (String, HashMap<String, usize>);

/// `rope_scaling` that changes nothing: absent, `null`, or `{"rope_type": "default"}` (older
/// files say `"type"`).
fn rope_scaling_is_default(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Object(m) => {
            let kind = m.get("rope_type").or_else(|| m.get("type")).and_then(|t| t.as_str());
            kind == Some("default")
        }
        _ => false,
    }
}

/// Parses the text of an HF Llama `config.json`; `source` names it in errors.
pub(crate) fn parse_hf_llama_config(text: &str, source: &str) -> Result<LlamaConfig> {
    let bad = |m: String| Error::bad(source, m);
    let json_err = |e: serde_json::Error| match e.classify() {
        serde_json::error::Category::Data => bad(format!("invalid config: {e}")),
        _ => bad(format!("invalid JSON: {e}")),
    };
    let mt: ModelType = serde_json::from_str(text).map_err(json_err)?;
    match mt.model_type.as_deref() {
        Some("llama") => {}
        Some(other) => return Err(bad(format!("model_type \"{other}\" is not supported (expected \"llama\")"))),
        None => return Err(bad("missing field `model_type` (expected \"llama\")".into())),
    }
    let hf: HfLlamaConfig = serde_json::from_str(text).map_err(json_err)?;
    if let Some(rs) = &hf.rope_scaling {
        if !rope_scaling_is_default(rs) {
            return Err(bad(format!("rope_scaling is not supported (found {rs})")));
        }
    }
    let mut rope_theta = hf.rope_theta;
    if let Some(rp) = hf.rope_parameters.as_ref().filter(|v| !v.is_null()) {
        if !rope_scaling_is_default(rp) {
            return Err(bad(format!(
                "rope_parameters other than rope_type \"default\" are not supported (rope scaling; found {rp})"
            )));
        }
        if let Some(t) = rp.get("rope_theta") {
            let t = t.as_f64().ok_or_else(|| bad(format!("rope_parameters.rope_theta ({t}) is not a number")))?;
            if rope_theta.is_some_and(|top| top != t) {
                return Err(bad(format!(
                    "rope_theta ({}) and rope_parameters.rope_theta ({t}) disagree",
                    rope_theta.unwrap_or_default()
                )));
            }
            rope_theta = Some(t);
        }
    }
    if let Some(act) = &hf.hidden_act {
        if act != "silu" && act != "swish" {
            return Err(bad(format!("hidden_act \"{act}\" is not supported (Llama uses \"silu\")")));
        }
    }
    let head_dim = match hf.head_dim {
        Some(d) => d,
        None if hf.num_attention_heads == 0 => 0, // reported by validate
        None if !hf.hidden_size.is_multiple_of(hf.num_attention_heads) => {
            return Err(bad(format!(
                "hidden_size ({}) is not a multiple of num_attention_heads ({}) and head_dim is not given",
                hf.hidden_size, hf.num_attention_heads
            )))
        }
        None => hf.hidden_size / hf.num_attention_heads,
    };
    let cfg = LlamaConfig {
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        num_layers: hf.num_hidden_layers,
        num_heads: hf.num_attention_heads,
        num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim,
        rms_norm_eps: hf.rms_norm_eps,
        rope_theta: rope_theta.unwrap_or(10000.0),
        rope_layout: RopeLayout::RotateHalf,
        max_seq_len: hf.max_position_embeddings.unwrap_or(2048),
        tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        attention_bias: hf.attention_bias.unwrap_or(false),
        mlp_bias: hf.mlp_bias.unwrap_or(false),
        built_in_attention: None,
    };
    cfg.validate(source)?;
    Ok(cfg)
}

/// Reads and validates an HF Llama `config.json` (the file itself, not its directory).
///
/// Fields: `model_type` must be `"llama"`; required `vocab_size`, `hidden_size`,
/// `intermediate_size`, `num_hidden_layers`, `num_attention_heads`, `rms_norm_eps`; optional
/// `num_key_value_heads` (default `num_attention_heads`), `head_dim` (default
/// `hidden_size / num_attention_heads`), `rope_theta` (10000; transformers ≥ 5 writes it in
/// `rope_parameters`, whose `rope_type` must be `"default"`), `max_position_embeddings` (2048),
/// `tie_word_embeddings`, `attention_bias`, `mlp_bias` (false). RoPE layout is rotate-half.
///
/// Errors: `Io` naming the file if unreadable; `BadInput` naming the file for invalid JSON or a
/// missing/mistyped field (serde's message, with line and column), another `model_type` (named),
/// a non-default `rope_scaling` ("rope_scaling is not supported"), `hidden_act` other than
/// silu, or a configuration [`LlamaConfig::validate`] rejects.
pub fn read_hf_llama_config(path: &Path) -> Result<LlamaConfig> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(&shown, e))?;
    parse_hf_llama_config(&text, &shown)
}

/// Lower bound on the bytes the weights of `cfg` need (2-byte dtypes, no norms or biases), used
/// to reject configs that would allocate far more than the weight files can fill.
pub(crate) fn min_weight_bytes(cfg: &LlamaConfig) -> u128 {
    let (v, h, i, l) =
        (cfg.vocab_size as u128, cfg.hidden_size as u128, cfg.intermediate_size as u128, cfg.num_layers as u128);
    let (q, kv) = (cfg.q_dim() as u128, cfg.kv_dim() as u128);
    let heads = if cfg.tie_word_embeddings { 1 } else { 2 };
    2 * (heads * v * h + l * h * (2 * q + 2 * kv + 3 * i))
}

/// Checks that a shard name from `weight_map` is a plain file name inside the directory.
fn plain_file_name(name: &str) -> bool {
    let mut comps = Path::new(name).components();
    matches!((comps.next(), comps.next()), (Some(Component::Normal(_)), None))
}

/// Loads an HF Llama directory: `config.json` (see [`read_hf_llama_config`]) and the weights
/// from `model.safetensors`, or, when that file is absent, from `model.safetensors.index.json`
/// and the shard files its `weight_map` names (plain file names in `dir`).
///
/// Every tensor [`LlamaWeights::zeros_hf`] expects must be present with exactly its shape
/// (HF layout, linear weights `[out, in]`); values in F32, F16, BF16 or F64 are converted to `T`
/// and must be finite. Extra tensors (e.g. `rotary_emb.inv_freq`) are ignored, as is
/// `lm_head.weight` in a tied model; an untied model must have it.
///
/// Errors: `Io` naming the directory or file when it is missing or unreadable; `BadInput`
/// naming the file (and tensor, when one is at fault) for: any config error, no weight file, a
/// malformed or truncated safetensors file, a shard name that is not a plain file name, a
/// missing tensor, a wrong shape (expected vs found), an unsupported dtype, a NaN/inf value
/// (with its index) or an F64 value overflowing f32, or a config implying more weights than the
/// files can hold.
pub fn load_hf_llama<T: Scalar>(dir: &Path) -> Result<(LlamaConfig, LlamaWeights<T>)> {
    let shown_dir = dir.display().to_string();
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(&shown_dir, e))?;
    if !meta.is_dir() {
        return Err(Error::bad(&shown_dir, "not a directory (expected an HF model directory with config.json)"));
    }
    let cfg = read_hf_llama_config(&dir.join("config.json"))?;

    // Which files hold the weights, and for sharded models which file holds which tensor.
    let single = dir.join("model.safetensors");
    let index_path = dir.join("model.safetensors.index.json");
    let (files, weight_map): (Vec<PathBuf>, Option<ShardMap>) = if single.exists() {
        (vec![single], None)
    } else if index_path.exists() {
        let shown = index_path.display().to_string();
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&shown, e))?;
        let index: ShardIndex =
            serde_json::from_str(&text).map_err(|e| Error::bad(&shown, format!("invalid shard index: {e}")))?;
        let mut files: Vec<PathBuf> = Vec::new();
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        let mut map = HashMap::with_capacity(index.weight_map.len());
        for (tensor, shard) in &index.weight_map {
            if !plain_file_name(shard) {
                return Err(Error::bad(
                    &shown,
                    format!("weight_map entry for {tensor} names \"{shard}\", which is not a file name in {shown_dir}"),
                ));
            }
            let k = *by_name.entry(shard.as_str()).or_insert_with(|| {
                files.push(dir.join(shard));
                files.len() - 1
            });
            map.insert(tensor.clone(), k);
        }
        (files, Some((shown, map)))
    } else {
        return Err(Error::bad(
            &shown_dir,
            "no model.safetensors or model.safetensors.index.json (expected an HF model directory)",
        ));
    };

    let mapped: Vec<MappedSafetensors> = files.iter().map(|p| MappedSafetensors::open(p)).collect::<Result<_>>()?;
    let w = llama_weights(&cfg, &dir.join("config.json").display().to_string(), &mapped, weight_map.as_ref())?;
    Ok((cfg, w))
}

/// An HF Llama model from the text of its `config.json` (named `config_name` in messages) and
/// one `model.safetensors` held in memory (named `weights_name`), checked as
/// [`load_hf_llama`] checks a directory.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn load_hf_llama_bytes<T: Scalar>(
    config_text: &str,
    config_name: &str,
    weights: Vec<u8>,
    weights_name: &str,
) -> Result<(LlamaConfig, LlamaWeights<T>)> {
    let cfg = parse_hf_llama_config(config_text, config_name)?;
    let mapped = [MappedSafetensors::from_bytes(weights_name, weights)?];
    let w = llama_weights(&cfg, config_name, &mapped, None)?;
    Ok((cfg, w))
}

/// Fills the weights of `cfg` from the parsed weight files (`weight_map` says which file holds
/// which tensor for a sharded model). Errors: as [`load_hf_llama`].
fn llama_weights<T: Scalar>(
    cfg: &LlamaConfig,
    config_name: &str,
    mapped: &[MappedSafetensors],
    weight_map: Option<&ShardMap>,
) -> Result<LlamaWeights<T>> {
    let parsed: Vec<SafeTensors<'_>> = mapped.iter().map(|m| m.parse()).collect::<Result<_>>()?;
    let total_bytes: u128 = mapped.iter().map(|m| m.len() as u128).sum();
    let need = min_weight_bytes(cfg);
    if need > total_bytes {
        return Err(Error::bad(
            config_name,
            format!(
                "the config implies at least {need} bytes of weights but the weight file(s) hold {total_bytes} bytes"
            ),
        ));
    }

    let mut w = LlamaWeights::<T>::zeros_hf(cfg);
    for p in w.params_mut() {
        let k = match weight_map {
            None => 0,
            Some((index_name, map)) => *map
                .get(&p.name)
                .ok_or_else(|| Error::bad(index_name, format!("missing tensor {} (not in weight_map)", p.name)))?,
        };
        let file = &mapped[k].name;
        let view = parsed[k].tensor(&p.name).map_err(|_| {
            let hint = if p.name == "lm_head.weight" { " (config.json says tie_word_embeddings = false)" } else { "" };
            Error::bad(file, format!("missing tensor {}{hint}", p.name))
        })?;
        if view.shape() != p.shape.as_slice() {
            return Err(Error::bad(
                file,
                format!("tensor {} has shape {:?}, expected {:?} (from config.json)", p.name, view.shape(), p.shape),
            ));
        }
        p.data = decode_finite::<T>(file, &p.name, &view)?;
    }
    Ok(w)
}

/// The HF `config.json` object for `cfg` (model_type llama, rotate-half RoPE, SiLU, f32).
fn hf_config_json(cfg: &LlamaConfig) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": null,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "torch_dtype": "float32",
    })
}

/// Writes an HF Llama directory that [`load_hf_llama`] (and HF transformers) can load:
/// `dir/config.json` (HF field names, `model_type` llama) and `dir/model.safetensors` with every
/// tensor of `w` under its own name, stored as F32 (f64 weights are rounded). `dir` is created
/// if needed; each file is written atomically (temporary file, fsync, rename).
///
/// Errors: `BadInput` if `cfg` fails [`LlamaConfig::validate`], its RoPE layout is not
/// rotate-half (HF's convention), `w` disagrees with `cfg` (layer count, embedding shape,
/// presence of `lm_head` vs `tie_word_embeddings`, a shape not matching its data); `Io` naming
/// the file for write failures.
pub fn save_hf_llama<T: Scalar>(dir: &Path, cfg: &LlamaConfig, w: &LlamaWeights<T>) -> Result<()> {
    let shown = dir.display().to_string();
    cfg.validate(&shown)?;
    let bad = |m: String| Err(Error::bad(&shown, m));
    if cfg.rope_layout != RopeLayout::RotateHalf {
        return bad("HF Llama directories use rotate-half RoPE; these weights use the interleaved layout".into());
    }
    if w.layers.len() != cfg.num_layers {
        return bad(format!("weights have {} layers, config says {}", w.layers.len(), cfg.num_layers));
    }
    if w.embed.shape != [cfg.vocab_size, cfg.hidden_size] {
        return bad(format!(
            "embedding has shape {:?}, config implies {:?}",
            w.embed.shape,
            [cfg.vocab_size, cfg.hidden_size]
        ));
    }
    if cfg.tie_word_embeddings == w.lm_head.is_some() {
        return bad(format!(
            "config says tie_word_embeddings = {} but the weights {} an lm_head",
            cfg.tie_word_embeddings,
            if w.lm_head.is_some() { "have" } else { "lack" }
        ));
    }
    let params = w.params();
    for p in &params {
        if p.shape.iter().product::<usize>() != p.data.len() {
            return bad(format!("tensor {} has shape {:?} but {} values", p.name, p.shape, p.data.len()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(&shown, e))?;
    let json = serde_json::to_string_pretty(&hf_config_json(cfg))
        .map_err(|e| Error::Internal(format!("serializing config.json: {e}")))?;
    atomic_write(&dir.join("config.json"), |f| f.write_all(json.as_bytes()).and_then(|_| f.write_all(b"\n")))?;
    let tensors: Vec<(&str, &[usize], &[T])> =
        params.iter().map(|p| (p.name.as_str(), p.shape.as_slice(), p.data.as_slice())).collect();
    write_tensors(&dir.join("model.safetensors"), &tensors, Dtype::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tensors::tests::TempDir;
    use crate::io::{read_safetensors, write_safetensors};

    fn small(tied: bool, bias: bool) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 19,
            hidden_size: 12,
            intermediate_size: 20,
            num_layers: 2,
            num_heads: 3,
            num_kv_heads: 1,
            head_dim: 6,
            rms_norm_eps: 1e-6,
            rope_theta: 500000.0,
            rope_layout: RopeLayout::RotateHalf,
            max_seq_len: 4096,
            tie_word_embeddings: tied,
            attention_bias: bias,
            mlp_bias: bias,
            built_in_attention: None,
        }
    }

    fn assert_same<T: Scalar, U: Scalar>(a: &LlamaWeights<T>, b: &LlamaWeights<U>, round_f32: bool) {
        let (pa, pb) = (a.params(), b.params());
        assert_eq!(pa.len(), pb.len());
        for (x, y) in pa.iter().zip(&pb) {
            assert_eq!(x.name, y.name);
            assert_eq!(x.shape, y.shape);
            for (u, v) in x.data.iter().zip(&y.data) {
                let u = u.as_f64();
                let u = if round_f32 { u as f32 as f64 } else { u };
                assert_eq!(u, v.as_f64(), "{}", x.name);
            }
        }
    }

    #[test]
    fn save_load_round_trip_tied_and_untied() {
        for (tied, bias) in [(false, false), (true, true), (false, true), (true, false)] {
            let d = TempDir::new("hf-rt");
            let cfg = small(tied, bias);
            let w = LlamaWeights::<f32>::random_hf(&cfg, 7);
            save_hf_llama(&d.0, &cfg, &w).unwrap();
            let (cfg2, w2) = load_hf_llama::<f32>(&d.0).unwrap();
            assert_eq!(cfg2, cfg);
            assert_eq!(w2.lm_head.is_none(), tied);
            assert_eq!(w2.layers[1].q_proj.bias.is_some(), bias);
            assert_same(&w, &w2, false);
            // Loading as f64 is exact too.
            let (_, w3) = load_hf_llama::<f64>(&d.0).unwrap();
            assert_same(&w, &w3, false);
        }
    }

    #[test]
    fn f64_weights_are_saved_as_f32() {
        let d = TempDir::new("hf-f64");
        let cfg = small(false, true);
        let w = LlamaWeights::<f64>::random_hf(&cfg, 3);
        save_hf_llama(&d.0, &cfg, &w).unwrap();
        let t = read_safetensors(&d.0.join("model.safetensors")).unwrap();
        assert!(t.iter().all(|t| t.dtype == "F32"));
        assert_eq!(t.len(), w.params().len());
        let (_, w2) = load_hf_llama::<f64>(&d.0).unwrap();
        assert_same(&w, &w2, true);
    }

    #[test]
    fn config_defaults_and_extras() {
        let text = r#"{"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 4,
            "rms_norm_eps": 1e-5, "rope_scaling": {"rope_type": "default"}, "num_key_value_heads": null,
            "hidden_act": "silu", "torch_dtype": "bfloat16", "pretraining_tp": 1}"#;
        let c = parse_hf_llama_config(text, "c.json").unwrap();
        assert_eq!((c.num_kv_heads, c.head_dim, c.max_seq_len), (4, 4, 2048));
        assert_eq!(c.rope_theta, 10000.0);
        assert!(!c.tie_word_embeddings && !c.attention_bias && !c.mlp_bias);
        let e = parse_hf_llama_config(&text.replace("\"silu\"", "\"gelu\""), "c.json").unwrap_err().to_string();
        assert!(e.contains("hidden_act \"gelu\""), "{e}");
        let e = parse_hf_llama_config(&text.replace("\"hidden_size\": 16", "\"hidden_size\": 18"), "c.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a multiple of num_attention_heads"), "{e}");
        let e = parse_hf_llama_config(&text.replace("\"default\"", "\"llama3\""), "c.json").unwrap_err().to_string();
        assert!(e.contains("rope_scaling is not supported"), "{e}");
        let e =
            parse_hf_llama_config(&text.replace("\"model_type\": \"llama\",", ""), "c.json").unwrap_err().to_string();
        assert!(e.contains("model_type"), "{e}");
        let e = parse_hf_llama_config(&text.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 0"), "c")
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_attention_heads must be positive"), "{e}");
    }

    #[test]
    fn loads_transformers_fixtures() {
        // Written by transformers 5 (tests/fixtures/make_llama_fixture.py): `rope_parameters`.
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("tests/fixtures");
        for (dir, tied, bias, layers, kv) in
            [("llama_tiny", false, false, 2, 2), ("llama_tiny_tied_bias", true, true, 3, 4)]
        {
            let d = root.join(dir);
            let (c, w) = load_hf_llama::<f64>(&d).unwrap();
            assert_eq!((c.tie_word_embeddings, c.attention_bias, c.mlp_bias), (tied, bias, bias));
            assert_eq!((c.num_layers, c.num_kv_heads, c.head_dim, c.hidden_size), (layers, kv, 8, 32));
            assert_eq!((c.rope_theta, c.max_seq_len, c.rms_norm_eps), (10000.0, 128, 1e-5));
            assert_eq!(w.lm_head.is_none(), tied);
            assert!(w.numel() > 0);
        }
        let base = r#"{"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 1, "num_attention_heads": 4, "rms_norm_eps": 1e-5, "#;
        let c = parse_hf_llama_config(
            &format!(r#"{base} "rope_parameters": {{"rope_type": "default", "rope_theta": 500000.0}}}}"#),
            "c",
        )
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        let e = parse_hf_llama_config(
            &format!(r#"{base} "rope_parameters": {{"rope_type": "yarn", "rope_theta": 5e5, "factor": 4}}}}"#),
            "c",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("rope_parameters") && e.contains("yarn"), "{e}");
        let e = parse_hf_llama_config(
            &format!(r#"{base} "rope_theta": 1e4, "rope_parameters": {{"rope_type": "default", "rope_theta": 5e5}}}}"#),
            "c",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("disagree"), "{e}");
    }

    #[test]
    fn sharded_directory_loads() {
        let d = TempDir::new("hf-shard");
        let cfg = small(false, false);
        let w = LlamaWeights::<f32>::random_hf(&cfg, 11);
        save_hf_llama(&d.0, &cfg, &w).unwrap();
        std::fs::remove_file(d.0.join("model.safetensors")).unwrap();
        let params = w.params();
        let (a, b) = params.split_at(params.len() / 2);
        let mut map = serde_json::Map::new();
        for (shard, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
            let ts: Vec<(String, Vec<usize>, Vec<f32>)> =
                part.iter().map(|p| (p.name.clone(), p.shape.clone(), p.data.clone())).collect();
            write_safetensors(&d.0.join(shard), &ts).unwrap();
            for p in part {
                map.insert(p.name.clone(), shard.into());
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(d.0.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let (_, w2) = load_hf_llama::<f32>(&d.0).unwrap();
        assert_same(&w, &w2, false);

        // A shard name escaping the directory is refused.
        map.insert("model.norm.weight".into(), "../model-00001-of-00002.safetensors".into());
        let index = serde_json::json!({"weight_map": map});
        std::fs::write(d.0.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let e = load_hf_llama::<f32>(&d.0).unwrap_err().to_string();
        assert!(e.contains("model.safetensors.index.json") && e.contains("not a file name"), "{e}");
        // A tensor absent from weight_map is named.
        map.remove("model.norm.weight");
        let index = serde_json::json!({"weight_map": map});
        std::fs::write(d.0.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let e = load_hf_llama::<f32>(&d.0).unwrap_err().to_string();
        assert!(e.contains("missing tensor model.norm.weight"), "{e}");
    }

    #[test]
    fn tied_model_with_lm_head_and_extras_loads() {
        let d = TempDir::new("hf-extra");
        let cfg = small(true, false);
        let w = LlamaWeights::<f32>::random_hf(&cfg, 5);
        let mut ts: Vec<(String, Vec<usize>, Vec<f32>)> =
            w.params().iter().map(|p| (p.name.clone(), p.shape.clone(), p.data.clone())).collect();
        ts.push(("lm_head.weight".into(), vec![19, 12], vec![0.5; 19 * 12]));
        ts.push(("model.layers.0.self_attn.rotary_emb.inv_freq".into(), vec![3], vec![1.0, 0.1, 0.01]));
        save_hf_llama(&d.0, &cfg, &w).unwrap();
        write_safetensors(&d.0.join("model.safetensors"), &ts).unwrap();
        let (_, w2) = load_hf_llama::<f32>(&d.0).unwrap();
        assert!(w2.lm_head.is_none());
        assert_same(&w, &w2, false);
    }

    #[test]
    fn save_rejects_inconsistent_weights() {
        let d = TempDir::new("hf-incons");
        let cfg = small(false, false);
        let w = LlamaWeights::<f32>::random_hf(&cfg, 1);
        let tied = small(true, false);
        let e = save_hf_llama(&d.0, &tied, &w).unwrap_err().to_string();
        assert!(e.contains("tie_word_embeddings"), "{e}");
        let mut inter = cfg.clone();
        inter.rope_layout = RopeLayout::Interleaved;
        assert!(save_hf_llama(&d.0, &inter, &w).unwrap_err().to_string().contains("rotate-half"));
    }

    #[test]
    fn oversized_config_is_refused_before_allocating() {
        let d = TempDir::new("hf-huge");
        let cfg = small(false, false);
        let w = LlamaWeights::<f32>::random_hf(&cfg, 1);
        save_hf_llama(&d.0, &cfg, &w).unwrap();
        let p = d.0.join("config.json");
        let text = std::fs::read_to_string(&p).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["vocab_size"] = 16_000_000.into();
        v["hidden_size"] = 16_000_002.into();
        v["head_dim"] = 2.into();
        v["num_attention_heads"] = 3.into();
        std::fs::write(&p, v.to_string()).unwrap();
        let e = load_hf_llama::<f32>(&d.0).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("bytes of weights"), "{e}");
    }
}
