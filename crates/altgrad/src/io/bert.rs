//! HF (transformers) BERT directories: `config.json` (`model_type` "bert") + `model.safetensors`,
//! loaded into a [`BertModel`] (e.g. sentence-transformers' all-MiniLM-L6-v2).

use super::tensors::{decode_finite, MappedSafetensors};
use crate::linalg::Scalar;
use crate::model::bert::{BertConfig, BertModel, BertWeights};
use crate::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// Only `model_type`, read first so a non-BERT config is reported as such rather than as a
/// missing field.
#[derive(Deserialize)]
struct ModelType {
    model_type: Option<String>,
}

/// The fields of an HF `BertConfig` that altgrad uses (others are ignored). Optional fields
/// default as in transformers' `BertConfig`.
#[derive(Deserialize)]
struct HfBertConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    position_embedding_type: Option<String>,
    is_decoder: Option<bool>,
}

/// Parses the text of an HF BERT `config.json`; `source` names it in errors.
pub(crate) fn parse_hf_bert_config(text: &str, source: &str) -> Result<BertConfig> {
    let bad = |m: String| Error::bad(source, m);
    let json_err = |e: serde_json::Error| match e.classify() {
        serde_json::error::Category::Data => bad(format!("invalid config: {e}")),
        _ => bad(format!("invalid JSON: {e}")),
    };
    let mt: ModelType = serde_json::from_str(text).map_err(json_err)?;
    match mt.model_type.as_deref() {
        Some("bert") => {}
        Some(other) => return Err(bad(format!("model_type \"{other}\" is not supported (expected \"bert\")"))),
        None => return Err(bad("missing field `model_type` (expected \"bert\")".into())),
    }
    let hf: HfBertConfig = serde_json::from_str(text).map_err(json_err)?;
    let act = hf.hidden_act.as_deref().unwrap_or("gelu");
    if act != "gelu" {
        return Err(bad(format!("hidden_act \"{act}\" is not supported (only \"gelu\", the exact erf form)")));
    }
    let pos = hf.position_embedding_type.as_deref().unwrap_or("absolute");
    if pos != "absolute" {
        return Err(bad(format!("position_embedding_type \"{pos}\" is not supported (only \"absolute\")")));
    }
    if hf.is_decoder == Some(true) {
        return Err(bad("is_decoder = true (causal BERT) is not supported".into()));
    }
    if hf.num_attention_heads == 0 {
        return Err(bad("num_attention_heads must be positive".into()));
    }
    if !hf.hidden_size.is_multiple_of(hf.num_attention_heads) {
        return Err(bad(format!(
            "hidden_size ({}) is not a multiple of num_attention_heads ({})",
            hf.hidden_size, hf.num_attention_heads
        )));
    }
    let cfg = BertConfig {
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        num_layers: hf.num_hidden_layers,
        num_heads: hf.num_attention_heads,
        head_dim: hf.hidden_size / hf.num_attention_heads,
        max_position_embeddings: hf.max_position_embeddings.unwrap_or(512),
        type_vocab_size: hf.type_vocab_size.unwrap_or(2),
        layer_norm_eps: hf.layer_norm_eps.unwrap_or(1e-12),
    };
    cfg.validate(source)?;
    Ok(cfg)
}

/// Lower bound on the bytes the weights of `cfg` need (2-byte dtypes, no norms or biases), used
/// to reject configs that would allocate far more than the weight file can fill.
fn min_weight_bytes(cfg: &BertConfig) -> u128 {
    let (v, h, i, l) =
        (cfg.vocab_size as u128, cfg.hidden_size as u128, cfg.intermediate_size as u128, cfg.num_layers as u128);
    let (p, t, q) = (cfg.max_position_embeddings as u128, cfg.type_vocab_size as u128, cfg.q_dim() as u128);
    2 * ((v + p + t) * h + l * (4 * q * h + 2 * i * h))
}

/// Loads an HF BERT directory: `dir/config.json` and `dir/model.safetensors`.
///
/// Config: `model_type` must be "bert", `hidden_act` "gelu" (exact erf form; others such as
/// "gelu_new" or "relu" are rejected by name), `position_embedding_type` "absolute", not
/// `is_decoder`; `head_dim = hidden_size / num_attention_heads`; absent optional fields default
/// as in transformers (`max_position_embeddings` 512, `type_vocab_size` 2, `layer_norm_eps`
/// 1e-12).
///
/// Weights: every tensor [`BertWeights::zeros`] names (`embeddings.word_embeddings.weight`, …,
/// `encoder.layer.{i}.output.LayerNorm.bias`), all under a `bert.` prefix instead when the file
/// uses one (as `BertForMaskedLM` checkpoints do); values in F32, F16, BF16 or F64 are converted
/// to `T` and must be finite. Extra tensors (`embeddings.position_ids`, a pooler, an MLM head)
/// are ignored. The model's `source` is `dir`.
///
/// Errors: `Io` naming the directory or file when missing or unreadable; `BadInput` naming the
/// file (and tensor, when one is at fault) for: a config error, no `model.safetensors` (sharded
/// or `.bin` checkpoints are not supported), a malformed or truncated safetensors file, a missing
/// tensor, a wrong shape (found vs expected), an unsupported dtype, a non-finite value (with its
/// index), or a config implying more weights than the file holds.
pub fn load_hf_bert<T: Scalar>(dir: &Path) -> Result<BertModel<T>> {
    let shown_dir = dir.display().to_string();
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(&shown_dir, e))?;
    if !meta.is_dir() {
        return Err(Error::bad(&shown_dir, "not a directory (expected an HF model directory with config.json)"));
    }
    let cfg_path = dir.join("config.json");
    let shown_cfg = cfg_path.display().to_string();
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&shown_cfg, e))?;
    let cfg = parse_hf_bert_config(&text, &shown_cfg)?;

    let file = dir.join("model.safetensors");
    if !file.exists() {
        return Err(Error::bad(
            &shown_dir,
            "no model.safetensors (sharded and pytorch_model.bin BERT checkpoints are not supported)",
        ));
    }
    let mapped = MappedSafetensors::open(&file)?;
    bert_from(cfg, &shown_cfg, &mapped, shown_dir)
}

/// A BERT model from the text of its `config.json` (named `config_name` in messages) and its
/// `model.safetensors` held in memory (named `weights_name`), checked as [`load_hf_bert`]
/// checks a directory.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn load_hf_bert_bytes<T: Scalar>(
    config_text: &str,
    config_name: &str,
    weights: Vec<u8>,
    weights_name: &str,
) -> Result<BertModel<T>> {
    let cfg = parse_hf_bert_config(config_text, config_name)?;
    let mapped = MappedSafetensors::from_bytes(weights_name, weights)?;
    bert_from(cfg, config_name, &mapped, config_name.to_string())
}

/// Fills the weights of `cfg` from `mapped`; the model's source is `source`. Errors: as
/// [`load_hf_bert`].
fn bert_from<T: Scalar>(
    cfg: BertConfig,
    shown_cfg: &str,
    mapped: &MappedSafetensors,
    source: String,
) -> Result<BertModel<T>> {
    let st = mapped.parse()?;
    let need = min_weight_bytes(&cfg);
    if need > mapped.len() as u128 {
        return Err(Error::bad(
            shown_cfg,
            format!("the config implies at least {need} bytes of weights but {} holds {}", mapped.name, mapped.len()),
        ));
    }
    let prefix = if st.tensor("embeddings.word_embeddings.weight").is_err()
        && st.tensor("bert.embeddings.word_embeddings.weight").is_ok()
    {
        "bert."
    } else {
        ""
    };
    let mut w = BertWeights::<T>::zeros(&cfg);
    for p in w.params_mut() {
        let name = format!("{prefix}{}", p.name);
        let view = st.tensor(&name).map_err(|_| Error::bad(&mapped.name, format!("missing tensor {name}")))?;
        if view.shape() != p.shape.as_slice() {
            return Err(Error::bad(
                &mapped.name,
                format!("tensor {name} has shape {:?}, expected {:?} (from config.json)", view.shape(), p.shape),
            ));
        }
        p.data = decode_finite::<T>(&mapped.name, &name, &view)?;
    }
    BertModel::new(cfg, w, source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tensors::tests::TempDir;
    use crate::io::write_safetensors;

    fn small() -> BertConfig {
        BertConfig {
            vocab_size: 13,
            hidden_size: 8,
            intermediate_size: 12,
            num_layers: 2,
            num_heads: 2,
            head_dim: 4,
            max_position_embeddings: 10,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
        }
    }

    fn config_json(cfg: &BertConfig) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "max_position_embeddings": cfg.max_position_embeddings,
            "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.layer_norm_eps,
            "hidden_act": "gelu",
            "position_embedding_type": "absolute",
            "hidden_dropout_prob": 0.1,
        })
    }

    /// Writes `w` (with `prefix` on every name, plus extras) and its config into `dir`.
    fn write_dir(dir: &Path, cfg: &BertConfig, w: &BertWeights<f32>, prefix: &str) {
        std::fs::write(dir.join("config.json"), config_json(cfg).to_string()).unwrap();
        let mut ts: Vec<(String, Vec<usize>, Vec<f32>)> =
            w.params().iter().map(|p| (format!("{prefix}{}", p.name), p.shape.clone(), p.data.clone())).collect();
        let pos: Vec<f32> = (0..cfg.max_position_embeddings).map(|i| i as f32).collect();
        ts.push((format!("{prefix}embeddings.position_ids"), vec![1, cfg.max_position_embeddings], pos));
        ts.push(("pooler.dense.bias".into(), vec![cfg.hidden_size], vec![0.0; cfg.hidden_size]));
        write_safetensors(&dir.join("model.safetensors"), &ts).unwrap();
    }

    #[test]
    fn loads_with_and_without_prefix() {
        let cfg = small();
        let w = BertWeights::<f32>::random(&cfg, 3);
        for prefix in ["", "bert."] {
            let d = TempDir::new("bert-load");
            write_dir(&d.0, &cfg, &w, prefix);
            let m = load_hf_bert::<f64>(&d.0).unwrap();
            assert_eq!(m.cfg, cfg);
            assert_eq!(m.source, d.0.display().to_string());
            for (a, b) in m.weights.params().iter().zip(w.params()) {
                assert_eq!(a.name, b.name);
                assert_eq!(a.shape, b.shape);
                assert!(a.data.iter().zip(&b.data).all(|(x, y)| *x == *y as f64), "{}", a.name);
            }
            let m32 = load_hf_bert::<f32>(&d.0).unwrap();
            assert_eq!(m32.weights.layers[1].output.weight.data, w.layers[1].output.weight.data);
        }
    }

    #[test]
    fn config_errors_are_named() {
        let cfg = small();
        let base = config_json(&cfg);
        let parse = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = base.clone();
            f(&mut v);
            parse_hf_bert_config(&v.to_string(), "cfg.json").map_err(|e| e.to_string())
        };
        assert_eq!(parse(&|_| {}).unwrap(), cfg);
        // Defaults as in transformers.
        let c = parse(&|v| {
            let o = v.as_object_mut().unwrap();
            for k in ["hidden_act", "position_embedding_type", "layer_norm_eps", "type_vocab_size"] {
                o.remove(k);
            }
            o.remove("max_position_embeddings");
        })
        .unwrap();
        assert_eq!((c.max_position_embeddings, c.type_vocab_size, c.layer_norm_eps), (512, 2, 1e-12));
        let e = parse(&|v| v["hidden_act"] = "gelu_new".into()).unwrap_err();
        assert!(e.contains("cfg.json") && e.contains("hidden_act \"gelu_new\""), "{e}");
        let e = parse(&|v| v["hidden_act"] = "relu".into()).unwrap_err();
        assert!(e.contains("hidden_act \"relu\""), "{e}");
        let e = parse(&|v| v["position_embedding_type"] = "relative_key".into()).unwrap_err();
        assert!(e.contains("position_embedding_type \"relative_key\""), "{e}");
        let e = parse(&|v| v["model_type"] = "roberta".into()).unwrap_err();
        assert!(e.contains("model_type \"roberta\""), "{e}");
        let e = parse(&|v| v["hidden_size"] = 9.into()).unwrap_err();
        assert!(e.contains("not a multiple of num_attention_heads"), "{e}");
        let e = parse(&|v| v["is_decoder"] = true.into()).unwrap_err();
        assert!(e.contains("is_decoder"), "{e}");
        let e = parse(&|v| {
            v.as_object_mut().unwrap().remove("vocab_size");
        })
        .unwrap_err();
        assert!(e.contains("vocab_size"), "{e}");
        let e = parse(&|v| v["layer_norm_eps"] = (-1.0).into()).unwrap_err();
        assert!(e.contains("layer_norm_eps"), "{e}");
    }

    #[test]
    fn weight_errors_name_file_and_tensor() {
        let cfg = small();
        let w = BertWeights::<f32>::random(&cfg, 4);
        let d = TempDir::new("bert-bad");
        let file = d.0.join("model.safetensors");
        let shown = file.display().to_string();
        let base: Vec<(String, Vec<usize>, Vec<f32>)> =
            w.params().iter().map(|p| (p.name.clone(), p.shape.clone(), p.data.clone())).collect();
        std::fs::write(d.0.join("config.json"), config_json(&cfg).to_string()).unwrap();

        // Missing tensor.
        let ts: Vec<_> = base.iter().filter(|t| t.0 != "encoder.layer.1.attention.self.key.bias").cloned().collect();
        write_safetensors(&file, &ts).unwrap();
        let e = load_hf_bert::<f32>(&d.0).unwrap_err().to_string();
        assert!(e.contains(&shown) && e.contains("missing tensor encoder.layer.1.attention.self.key.bias"), "{e}");

        // Wrong shape.
        let mut ts = base.clone();
        let k = ts.iter().position(|t| t.0 == "encoder.layer.0.intermediate.dense.weight").unwrap();
        ts[k].1 = vec![8, 12];
        write_safetensors(&file, &ts).unwrap();
        let e = load_hf_bert::<f32>(&d.0).unwrap_err().to_string();
        assert!(e.contains("encoder.layer.0.intermediate.dense.weight has shape [8, 12], expected [12, 8]"), "{e}");

        // Non-finite value.
        let mut ts = base.clone();
        let k = ts.iter().position(|t| t.0 == "embeddings.LayerNorm.bias").unwrap();
        ts[k].2[3] = f32::NAN;
        write_safetensors(&file, &ts).unwrap();
        let e = load_hf_bert::<f64>(&d.0).unwrap_err().to_string();
        assert!(e.contains(&shown) && e.contains("embeddings.LayerNorm.bias") && e.contains("index 3"), "{e}");

        // Truncated file.
        write_safetensors(&file, &base).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
        let e = load_hf_bert::<f32>(&d.0).unwrap_err().to_string();
        assert!(e.contains(&shown), "{e}");

        // No weight file; not a directory.
        std::fs::remove_file(&file).unwrap();
        let e = load_hf_bert::<f32>(&d.0).unwrap_err().to_string();
        assert!(e.contains("no model.safetensors"), "{e}");
        let e = load_hf_bert::<f32>(&d.0.join("config.json")).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
    }

    #[test]
    fn oversized_config_is_refused_before_allocating() {
        let cfg = small();
        let w = BertWeights::<f32>::random(&cfg, 5);
        let d = TempDir::new("bert-huge");
        write_dir(&d.0, &cfg, &w, "");
        let mut v = config_json(&cfg);
        v["vocab_size"] = 16_000_000.into();
        v["hidden_size"] = 16_000_000.into();
        std::fs::write(d.0.join("config.json"), v.to_string()).unwrap();
        let e = load_hf_bert::<f32>(&d.0).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("bytes of weights"), "{e}");
    }
}
