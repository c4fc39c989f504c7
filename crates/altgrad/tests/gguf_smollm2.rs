//! The real SmolLM2-135M-Instruct GGUF (Q4_1, from llama.cpp's converter) through
//! `altgrad::io::gguf`: metadata, configuration, and dequantized values against llama.cpp's own
//! Python reader (gguf-py), stored in the git-ignored `models/smollm2/dequant_ref.safetensors`
//! (model data) by `tests/fixtures/make_gguf_dequant_fixture.py --smollm2`, which
//! `scripts/setup-venv.sh` runs.
//!
//! Skipped (with a note) when the model is absent: `scripts/fetch-models.sh` fetches it.

use altgrad::io::gguf::{load_gguf_llama, GgmlType, GgufArray, GgufFile, GgufValue};
use altgrad::io::read_safetensors;
use altgrad::model::RopeLayout;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn model() -> Option<PathBuf> {
    let p =
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("SKIPPED: {} is missing (run scripts/fetch-models.sh)", p.display());
        None
    }
}

#[test]
fn smollm2_metadata() {
    let Some(p) = model() else { return };
    let g = GgufFile::open(&p).unwrap();
    assert_eq!((g.version(), g.alignment(), g.data_offset()), (3, 32, 1785664));
    assert_eq!((g.metadata().len(), g.tensors().len()), (33, 272));
    let mut by_type: HashMap<GgmlType, usize> = HashMap::new();
    for t in g.tensors() {
        *by_type.entry(t.ggml_type).or_default() += 1;
    }
    assert_eq!(by_type, HashMap::from([(GgmlType::Q4_1, 210), (GgmlType::F32, 61), (GgmlType::Q8_0, 1)]));

    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    assert!(!g.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    assert!(!g.get_bool("tokenizer.ggml.add_space_prefix").unwrap());
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!((tokens.len(), tokens[0].as_str(), tokens[1].as_str()), (49152, "<|endoftext|>", "<|im_start|>"));
    assert_eq!(g.get_str_array("tokenizer.ggml.merges").unwrap().len(), 48900);
    assert_eq!(g.get_i32_array("tokenizer.ggml.token_type").unwrap().len(), 49152);
    for (k, v) in [
        ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.eos_token_id", 2),
        ("tokenizer.ggml.unknown_token_id", 0),
        ("tokenizer.ggml.padding_token_id", 2),
    ] {
        assert_eq!(g.get(k), Some(&GgufValue::U32(v)), "{k}");
    }
    assert_eq!(g.get("general.languages"), Some(&GgufValue::Array(GgufArray::String(vec!["en".into()]))));
    assert_eq!(g.get_f64("llama.rope.freq_base").unwrap(), 100000.0);
    let e = g.get_u64("tokenizer.ggml.tokens").unwrap_err().to_string();
    assert!(e.contains("array of string (49152 elements)") && e.len() < 300, "{e}");
}

#[test]
fn smollm2_loads_and_matches_gguf_py() {
    let Some(p) = model() else { return };
    let (cfg, w, g) = load_gguf_llama::<f32>(&p).unwrap();
    assert_eq!(
        (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size),
        (30, 576, 9, 3, 64, 49152)
    );
    assert_eq!((cfg.intermediate_size, cfg.max_seq_len), (1536, 8192));
    assert_eq!((cfg.rope_theta, cfg.rms_norm_eps), (100000.0, 1e-5f32 as f64));
    assert_eq!(cfg.rope_layout, RopeLayout::Interleaved);
    assert!(cfg.tie_word_embeddings && w.lm_head.is_none());
    assert!(!cfg.attention_bias && !cfg.mlp_bias);
    assert_eq!(w.numel(), 134_515_008);
    assert_eq!(w.layers[29].down_proj.weight.name, "blk.29.ffn_down.weight");
    assert_eq!(w.layers[0].k_proj.weight.shape, vec![192, 576]);

    let fixture =
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/smollm2/dequant_ref.safetensors");
    if !fixture.is_file() {
        eprintln!("SKIPPED the gguf-py comparison: {} is missing (run scripts/setup-venv.sh)", fixture.display());
        return;
    }
    let refs = read_safetensors(&fixture).unwrap();
    let params: HashMap<&str, &[f32]> = w.params().into_iter().map(|p| (p.name.as_str(), &p.data[..])).collect();
    let mut types = Vec::new();
    for r in &refs {
        let info = g.tensor_info(&r.name).unwrap_or_else(|| panic!("{} not in the model", r.name));
        types.push(info.ggml_type);
        let n = r.data.len();
        // The fixture holds the first rows; shapes agree row-wise.
        assert_eq!(r.shape.last(), info.shape().last(), "{}", r.name);
        let (_, direct) = g.tensor_f32(&r.name).unwrap();
        let loaded = params[r.name.as_str()];
        let mut identical = 0;
        for (i, &want) in r.data.iter().enumerate() {
            for (what, got) in [("tensor_f32", direct[i]), ("load_gguf_llama", loaded[i])] {
                let got = got as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs(),
                    "{} [{i}] via {what}: {got} vs gguf-py {want}",
                    r.name
                );
            }
            identical += (direct[i] as f64 == want) as usize;
        }
        eprintln!("{} ({}): {identical}/{n} values bit-identical to gguf-py", r.name, info.ggml_type);
        assert_eq!(identical, n, "{}: same f32 operations in the same order should agree exactly", r.name);
    }
    for t in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::F32] {
        assert!(types.contains(&t), "fixture lacks a {t} tensor");
    }
}
