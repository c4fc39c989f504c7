//! Real models on real text: SmolLM2-135M (GGUF Q4_1) and all-MiniLM-L6-v2 (HF safetensors),
//! loaded, tokenized with their own tokenizers, and compared with HF transformers' numbers
//! (fixtures made by `tests/fixtures/make_real_model_fixtures.py`). The models come from
//! `scripts/fetch-models.sh`; without them these tests print a note and pass.

mod common;
use altgrad::io::{load_model, read_safetensors, AnyModel};
use altgrad::model::loss::lm_cross_entropy;
use altgrad::model::Network;
use common::rel;
use std::path::{Path, PathBuf};

const SMOLLM2: &str = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MINILM: &str = "models/minilm";
const GPL3: &str = "/usr/share/common-licenses/GPL-3";

fn root(p: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(p)
}

fn present(p: &str) -> Option<String> {
    let path = root(p);
    if path.exists() && Path::new(GPL3).exists() {
        Some(path.display().to_string())
    } else {
        eprintln!("note: {p} or {GPL3} missing; run scripts/fetch-models.sh — test skipped");
        None
    }
}

fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root("tests/fixtures").join(name)).unwrap()).unwrap()
}

#[test]
fn smollm2_predicts_gpl3_like_transformers() {
    let Some(path) = present(SMOLLM2) else { return };
    let loaded = load_model::<f32>(&path, 0).unwrap();
    let AnyModel::Llama(model) = &loaded.model else { panic!("SmolLM2 must load as a Llama decoder") };
    let text = std::fs::read_to_string(GPL3).unwrap();
    let ids = loaded.encode(&text).unwrap();
    let fx = fixture_json("smollm2_gpl3.json");
    let want_ids: Vec<u32> =
        fx["ids_first_2048"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(&ids[..2048], &want_ids[..], "token ids differ from the reference tokenizer");

    // One forward over 1024 tokens; causal, so the 512-token loss is a prefix of it.
    let n = 1024;
    let cache = model.forward(&ids[..n]).unwrap();
    let h = model.cfg.hidden_size;
    let head = &model.weights.head_weight().data;
    let mut dhead = vec![0f32; head.len()];
    for m in [512usize, 1024] {
        let (loss, _) =
            lm_cross_entropy(&cache.hidden[..m * h], h, head, model.cfg.vocab_size, &ids[1..m], 256, &mut dhead);
        let want = fx["loss"][m.to_string()]["f64"].as_f64().unwrap();
        let e = (loss - want).abs() / want;
        eprintln!("SmolLM2 first {m} tokens of GPL-3: loss {loss:.6} vs transformers {want:.6} (rel {e:.1e})");
        assert!(e < 5e-3, "loss {loss} vs reference {want}: rel err {e}");
        assert!(loss < 4.0, "perplexity should be near 20, got exp({loss})");
    }
}

#[test]
fn smollm2_gradient_runs_and_is_finite() {
    let Some(path) = present(SMOLLM2) else { return };
    let loaded = load_model::<f32>(&path, 0).unwrap();
    let AnyModel::Llama(model) = &loaded.model else { panic!() };
    let ids = loaded.encode(&std::fs::read_to_string(GPL3).unwrap()).unwrap();
    let (loss, grads, _) = model.loss_and_grads(&ids[..128]).unwrap();
    assert!(loss.is_finite());
    let names: Vec<&str> = grads.weights.params().iter().map(|p| p.name.as_str()).collect();
    assert!(names.contains(&"blk.0.attn_q.weight") && names.contains(&"token_embd.weight"), "GGUF names");
    for p in grads.weights.params() {
        assert!(p.data.iter().all(|x| x.is_finite()), "{}", p.name);
        assert!(p.data.iter().any(|x| *x != 0.0), "{} has an all-zero gradient", p.name);
    }
}

#[test]
fn minilm_hidden_states_match_transformers() {
    let Some(path) = present(MINILM) else { return };
    let fx = read_safetensors(&root("tests/fixtures/minilm_gpl3.safetensors")).unwrap();
    let get = |n: &str| fx.iter().find(|t| t.name == n).unwrap().clone();
    let want_ids: Vec<u32> = get("ids").data.iter().map(|v| *v as u32).collect();
    let text: String = std::fs::read_to_string(GPL3).unwrap().chars().take(600).collect();
    for dtype in ["f32", "f64"] {
        let (ids, hidden) = if dtype == "f32" {
            let l = load_model::<f32>(&path, 0).unwrap();
            let AnyModel::Bert(m) = &l.model else { panic!("MiniLM must load as BERT") };
            let ids = l.encode(&text).unwrap();
            let c = m.forward(&ids).unwrap();
            (ids, c.hidden.iter().map(|x| *x as f64).collect::<Vec<f64>>())
        } else {
            let l = load_model::<f64>(&path, 0).unwrap();
            let AnyModel::Bert(m) = &l.model else { panic!() };
            let ids = l.encode(&text).unwrap();
            let c = m.forward(&ids).unwrap();
            (ids, c.hidden)
        };
        assert_eq!(ids, want_ids, "MiniLM token ids ([CLS] … [SEP]) differ from the reference");
        let e = rel(&hidden, &get("hidden_f64").data);
        eprintln!("MiniLM {dtype}: last hidden rel err {e:.2e}");
        assert!(e < 1e-3, "{dtype}: {e}");
    }
}
