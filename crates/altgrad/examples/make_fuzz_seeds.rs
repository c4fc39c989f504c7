//! Writes the seed corpora of the fuzz targets into `fuzz/seeds/<target>/` (small files, a few
//! hundred KB in all): tiny valid files of every kind the targets read, built with the library's
//! own writers (and a small GGUF writer here), plus a cut-down copy of the MiniLM
//! `tokenizer.json` when `models/minilm` is present.
//!
//! Run: `cargo run --release -p altgrad --features fuzzing --example make_fuzz_seeds`.

use altgrad::fuzzing::join;
use altgrad::io::gguf::GgmlType;
use altgrad::io::{save_hf_llama, write_safetensors};
use altgrad::model::bert::{BertConfig, BertWeights};
use altgrad::model::{LlamaConfig, LlamaWeights, RopeLayout};
use altgrad::train::{run_train, Task, TinySize, TrainOptions};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn seeds(target: &str) -> PathBuf {
    let d = root().join("fuzz/seeds").join(target);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(seeds(target).join(name), bytes).unwrap();
}

/// Deterministic pseudo-random bytes (SplitMix64).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("altgrad-seeds-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---------------------------------------------------------------------------------------------
// A minimal GGUF v3 writer.

enum Kv {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArr(Vec<String>),
    I32Arr(Vec<i32>),
    U8(u8),
    I64(i64),
    F64(f64),
    NestedArr,
}

fn gstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn gguf(meta: &[(&str, Kv)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        gstr(&mut b, k);
        match v {
            Kv::U32(x) => {
                b.extend_from_slice(&4u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Kv::F32(x) => {
                b.extend_from_slice(&6u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Kv::Bool(x) => {
                b.extend_from_slice(&7u32.to_le_bytes());
                b.push(*x as u8);
            }
            Kv::Str(s) => {
                b.extend_from_slice(&8u32.to_le_bytes());
                gstr(&mut b, s);
            }
            Kv::StrArr(v) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&8u32.to_le_bytes());
                b.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for s in v {
                    gstr(&mut b, s);
                }
            }
            Kv::I32Arr(v) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&5u32.to_le_bytes());
                b.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for x in v {
                    b.extend_from_slice(&x.to_le_bytes());
                }
            }
            Kv::U8(x) => {
                b.extend_from_slice(&0u32.to_le_bytes());
                b.push(*x);
            }
            Kv::I64(x) => {
                b.extend_from_slice(&11u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Kv::F64(x) => {
                b.extend_from_slice(&12u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Kv::NestedArr => {
                // array of 2 arrays of u16: [[1, 2], [3]]
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&2u64.to_le_bytes());
                for inner in [&[1u16, 2][..], &[3u16][..]] {
                    b.extend_from_slice(&2u32.to_le_bytes());
                    b.extend_from_slice(&(inner.len() as u64).to_le_bytes());
                    for x in inner {
                        b.extend_from_slice(&x.to_le_bytes());
                    }
                }
            }
        }
    }
    let mut offset = 0u64;
    for (name, ne, ty, data) in tensors {
        gstr(&mut b, name);
        b.extend_from_slice(&(ne.len() as u32).to_le_bytes());
        for d in ne {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    for (_, _, _, data) in tensors {
        b.extend_from_slice(data);
        b.resize(b.len().div_ceil(32) * 32, 0);
    }
    b
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f16_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()
}

/// Q8_0 blocks of `x` (ggml's reference quantizer).
fn q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in x.chunks(32) {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// A valid tiny GGUF Llama (hidden 32 so that 32-element quant blocks fit) with a byte-level
/// BPE vocabulary; tensors in F32, F16 and Q8_0.
fn gguf_llama() -> Vec<u8> {
    let (h, ff, heads, kv, vocab) = (32usize, 32usize, 2usize, 1usize, 40usize);
    let hd = h / heads;
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "Ġ".into()];
    tokens.extend(('a'..='z').map(String::from));
    tokens.extend(["Ġt", "he", "Ġthe", "ll", "o", "Ġw", "or"].iter().map(|s| s.to_string()));
    tokens.dedup();
    while tokens.len() < vocab {
        let n = tokens.len();
        tokens.push(format!("{n}"));
    }
    tokens.truncate(vocab);
    let merges: Vec<String> = ["Ġ t", "h e", "Ġt he", "l l", "Ġ w", "o r"].iter().map(|s| s.to_string()).collect();
    let mut types = vec![1i32; vocab];
    types[0] = 3;
    types[1] = 3;
    let w = |n: usize, seed: u64| -> Vec<f32> { noise(n, seed).iter().map(|&b| (b as f32 - 127.5) / 400.0).collect() };
    let ones = vec![1.0f32; h];
    let mut t: Vec<(String, Vec<u64>, u32, Vec<u8>)> =
        vec![("token_embd.weight".into(), vec![h as u64, vocab as u64], GgmlType::Q8_0 as u32, q8_0(&w(h * vocab, 1)))];
    let p = "blk.0";
    t.push((format!("{p}.attn_norm.weight"), vec![h as u64], 0, f32_bytes(&ones)));
    t.push((format!("{p}.attn_q.weight"), vec![h as u64, (heads * hd) as u64], 1, f16_bytes(&w(h * h, 2))));
    t.push((format!("{p}.attn_k.weight"), vec![h as u64, (kv * hd) as u64], 8, q8_0(&w(h * kv * hd, 3))));
    t.push((format!("{p}.attn_v.weight"), vec![h as u64, (kv * hd) as u64], 0, f32_bytes(&w(h * kv * hd, 4))));
    t.push((format!("{p}.attn_output.weight"), vec![h as u64, h as u64], 1, f16_bytes(&w(h * h, 5))));
    t.push((format!("{p}.ffn_norm.weight"), vec![h as u64], 0, f32_bytes(&ones)));
    t.push((format!("{p}.ffn_gate.weight"), vec![h as u64, ff as u64], 8, q8_0(&w(h * ff, 6))));
    t.push((format!("{p}.ffn_up.weight"), vec![h as u64, ff as u64], 8, q8_0(&w(h * ff, 7))));
    t.push((format!("{p}.ffn_down.weight"), vec![ff as u64, h as u64], 8, q8_0(&w(h * ff, 8))));
    t.push(("output_norm.weight".into(), vec![h as u64], 0, f32_bytes(&ones)));
    let meta = vec![
        ("general.architecture", Kv::Str("llama".into())),
        ("general.name", Kv::Str("fuzz seed".into())),
        ("general.alignment", Kv::U32(32)),
        ("llama.context_length", Kv::U32(64)),
        ("llama.embedding_length", Kv::U32(h as u32)),
        ("llama.block_count", Kv::U32(1)),
        ("llama.feed_forward_length", Kv::U32(ff as u32)),
        ("llama.attention.head_count", Kv::U32(heads as u32)),
        ("llama.attention.head_count_kv", Kv::U32(kv as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Kv::F32(1e-5)),
        ("llama.rope.freq_base", Kv::F32(10000.0)),
        ("llama.rope.dimension_count", Kv::U32(hd as u32)),
        ("llama.vocab_size", Kv::U32(vocab as u32)),
        ("tokenizer.ggml.model", Kv::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Kv::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Kv::StrArr(tokens)),
        ("tokenizer.ggml.token_type", Kv::I32Arr(types)),
        ("tokenizer.ggml.merges", Kv::StrArr(merges)),
        ("tokenizer.ggml.bos_token_id", Kv::U32(1)),
        ("tokenizer.ggml.eos_token_id", Kv::U32(0)),
        ("tokenizer.ggml.add_bos_token", Kv::Bool(true)),
        ("general.quantization_version", Kv::U8(2)),
        ("general.file_type", Kv::I64(7)),
        ("general.some_f64", Kv::F64(0.5)),
        ("general.nested", Kv::NestedArr),
    ];
    let tr: Vec<(&str, Vec<u64>, u32, Vec<u8>)> =
        t.iter().map(|(n, ne, ty, d)| (n.as_str(), ne.clone(), *ty, d.clone())).collect();
    gguf(&meta, &tr)
}

/// One small tensor of every ggml type (random blocks), for the dequantization paths.
fn gguf_zoo() -> Vec<u8> {
    let tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = (0..64)
        .filter_map(GgmlType::from_u32)
        .map(|ty| {
            let (bs, ts) = ty.block_layout();
            (format!("t.{ty}"), vec![bs as u64, 1], ty as u32, noise(ts, ty as u64 + 100))
        })
        .collect();
    let tr: Vec<(&str, Vec<u64>, u32, Vec<u8>)> =
        tensors.iter().map(|(n, ne, ty, d)| (n.as_str(), ne.clone(), *ty, d.clone())).collect();
    gguf(&[("general.architecture", Kv::Str("zoo".into()))], &tr)
}

// ---------------------------------------------------------------------------------------------

fn tiny_llama_cfg(tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 12,
        hidden_size: 8,
        intermediate_size: 12,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_layout: RopeLayout::RotateHalf,
        max_seq_len: 32,
        tie_word_embeddings: tied,
        attention_bias: tied,
        mlp_bias: false,
        built_in_attention: None,
    }
}

fn tiny_bert() -> (serde_json::Value, Vec<u8>) {
    let cfg = BertConfig {
        vocab_size: 12,
        hidden_size: 8,
        intermediate_size: 12,
        num_layers: 1,
        num_heads: 2,
        head_dim: 4,
        max_position_embeddings: 16,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
    };
    let w = BertWeights::<f32>::random(&cfg, 3);
    let json = serde_json::json!({
        "model_type": "bert", "vocab_size": 12, "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
        "position_embedding_type": "absolute"
    });
    let d = tmp("bert");
    let p = d.join("model.safetensors");
    let ts: Vec<(String, Vec<usize>, Vec<f32>)> =
        w.params().iter().map(|p| (format!("bert.{}", p.name), p.shape.clone(), p.data.clone())).collect();
    write_safetensors(&p, &ts).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let _ = std::fs::remove_dir_all(&d);
    (json, bytes)
}

/// A byte-level BPE tokenizer.json with a template post-processor.
fn bpe_tokenizer_json() -> String {
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": true}
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": {"<|endoftext|>": 0, "<s>": 1, "H": 2, "e": 3, "l": 4, "o": 5, "Ġ": 6, "w": 7, "r": 8,
                      "d": 9, ",": 10, "!": 11, "He": 12, "ll": 13, "Hell": 14, "Hello": 15, "Ġw": 16,
                      "or": 17, "Ġwor": 18, "1": 19, "2": 20},
            "merges": ["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or"]}
    })
    .to_string()
}

/// The MiniLM tokenizer.json with its vocabulary cut to the first ids (WordPiece, BERT
/// normalizer and template), when the model is present.
fn minilm_tokenizer_json() -> Option<String> {
    let text = std::fs::read_to_string(root().join("models/minilm/tokenizer.json")).ok()?;
    let mut v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let vocab = v["model"]["vocab"].as_object()?.clone();
    let keep: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .filter(|(tok, id)| id.as_u64().is_some_and(|i| i < 110 || (1000..1100).contains(&i)) || tok == "hello")
        .collect();
    v["model"]["vocab"] = serde_json::Value::Object(keep);
    Some(v.to_string())
}

fn main() {
    let _ = std::fs::remove_dir_all(root().join("fuzz/seeds"));
    // gguf
    put("gguf", "ok_llama_q8_f16_f32.gguf", &gguf_llama());
    put("gguf", "every_type.gguf", &gguf_zoo());
    // dequant: two blocks of every type, from random bytes and from gguf-py's fixture blocks.
    let types: Vec<GgmlType> = (0..64).filter_map(GgmlType::from_u32).collect();
    let fixture = std::fs::read(root().join("tests/fixtures/ggml_blocks_dequant.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&fixture).unwrap();
    for (i, ty) in types.iter().enumerate() {
        let (_, ts) = ty.block_layout();
        let mut b = vec![i as u8];
        match st.tensor(&format!("{ty}.bytes")) {
            Ok(t) => b.extend_from_slice(&t.data()[..(2 * ts).min(t.data().len())]),
            Err(_) => b.extend(noise(2 * ts, i as u64)),
        }
        put("dequant", &format!("ok_{ty}"), &b);
    }
    // safetensors: every float dtype, several ranks, metadata.
    let d = tmp("st");
    let p = d.join("a.safetensors");
    write_safetensors(
        &p,
        &[
            ("x".to_string(), vec![2, 3], vec![1.0f32, -2.0, 0.5, 3.0, 0.0, 1e-3]),
            ("scalar".to_string(), vec![], vec![7.0f32]),
            ("empty".to_string(), vec![0, 4], vec![]),
        ],
    )
    .unwrap();
    put("safetensors", "ok_f32.safetensors", &std::fs::read(&p).unwrap());
    write_safetensors(&p, &[("y".to_string(), vec![1, 2, 2], vec![0.25f64, -1e300, 2.0, 1.0])]).unwrap();
    put("safetensors", "ok_f64.safetensors", &std::fs::read(&p).unwrap());
    for (dtype, bytes) in [
        (safetensors::Dtype::F16, f16_bytes(&[1.0, -2.0, 65504.0, 0.5])),
        (safetensors::Dtype::BF16, vec![0x80, 0x3F, 0x00, 0xC0, 0x49, 0x40, 0x80, 0x7F]),
        (safetensors::Dtype::I32, vec![1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0]),
    ] {
        let view = safetensors::tensor::TensorView::new(dtype, vec![2, 2], &bytes).unwrap();
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let buf = safetensors::serialize([("t", view)], Some(meta)).unwrap();
        let ok = if dtype == safetensors::Dtype::I32 { "" } else { "ok_" };
        put("safetensors", &format!("{ok}{dtype:?}.safetensors"), &buf);
    }
    // hf_model and hf_config
    for (i, tied) in [false, true].into_iter().enumerate() {
        let dir = tmp(&format!("hf{i}"));
        let cfg = tiny_llama_cfg(tied);
        save_hf_llama(&dir, &cfg, &LlamaWeights::<f32>::random_hf(&cfg, 5)).unwrap();
        let c = std::fs::read(dir.join("config.json")).unwrap();
        let w = std::fs::read(dir.join("model.safetensors")).unwrap();
        for sel in [0u8, 1] {
            let mut seed = vec![sel];
            seed.extend(join(&[&c, &w]));
            put("hf_model", &format!("ok_llama_{i}_{sel}"), &seed);
        }
        put("hf_config", &format!("ok_llama_{i}.json"), &c);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (bj, bw) = tiny_bert();
    let bj = bj.to_string().into_bytes();
    for sel in [2u8, 3] {
        let mut seed = vec![sel];
        seed.extend(join(&[&bj, &bw]));
        put("hf_model", &format!("ok_bert_{sel}"), &seed);
    }
    put("hf_config", "ok_bert.json", &bj);
    put(
        "hf_config",
        "ok_llama_tiny_fixture.json",
        &std::fs::read(root().join("tests/fixtures/llama_tiny/config.json")).unwrap(),
    );
    // MiniLM's own config.json is a fetched model file: scripts/fuzz.sh adds it to the
    // git-ignored working corpus instead of committing a copy here.
    // tokenizer_json
    put("tokenizer_json", "ok_bpe.json", bpe_tokenizer_json().as_bytes());
    // MiniLM's own tokenizer.json, cut down: model data, so into the git-ignored working corpus
    // (fuzz/corpus/), not the tracked seeds
    if let Some(t) = minilm_tokenizer_json() {
        let d = root().join("fuzz/corpus/tokenizer_json");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ok_minilm_cut.json"), t.as_bytes()).unwrap();
    }
    // tokens
    put("tokens", "ok_ids.txt", b"1 2 3\n4\t5 +6\r\n4294967295\n");
    put("tokens", "bad.txt", b"12 -3 abc 99999999999 \xff");
    put("tokens", "ok_fixture.txt", &std::fs::read(root().join("tests/fixtures/llama_tiny/tokens.txt")).unwrap());
    // checkpoint: a real one-update run of a tiny model.
    let ck = tmp("ck");
    let opts = TrainOptions {
        tiny: TinySize { layers: 1, hidden: 8, heads: 2, kv_heads: 1 },
        vocab: Some(12),
        task: Some(Task::Mqar),
        steps: 1,
        batch_size: 1,
        seq_len: 16,
        eval_seqs: 1,
        checkpoint: Some(ck.join("run")),
        ..TrainOptions::default()
    };
    run_train(&opts, &|_| {}).unwrap();
    let r = |f: &str| std::fs::read(ck.join("run").join(f)).unwrap();
    put("checkpoint", "ok_tiny_step1", &join(&[&r("state.json"), &r("train_config.json"), &r("weights.safetensors")]));
    let _ = std::fs::remove_dir_all(&ck);
    // attn: q/k/v/do in each float dtype, GQA.
    let (b, n, h, hkv, dd) = (1usize, 5usize, 2usize, 1usize, 4usize);
    let vals =
        |len: usize, seed: u64| -> Vec<f64> { noise(len, seed).iter().map(|&x| (x as f64 - 127.5) / 64.0).collect() };
    let shapes =
        [("q", vec![b, n, h, dd]), ("k", vec![b, n, hkv, dd]), ("v", vec![b, n, hkv, dd]), ("do", vec![b, n, h, dd])];
    let ts: Vec<(String, Vec<usize>, Vec<f64>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, s))| (name.to_string(), s.clone(), vals(s.iter().product(), i as u64)))
        .collect();
    write_safetensors(&p, &ts).unwrap();
    let f64_file = std::fs::read(&p).unwrap();
    let ts32: Vec<(String, Vec<usize>, Vec<f32>)> =
        ts.iter().map(|(n, s, v)| (n.clone(), s.clone(), v.iter().map(|&x| x as f32).collect())).collect();
    write_safetensors(&p, &ts32).unwrap();
    let f32_file = std::fs::read(&p).unwrap();
    for (a, bb, file, tag) in [
        (0u8, 0x80u8, &f32_file, "ok_exact_f32"),
        (0x52, 0x83, &f64_file, "ok_poly_causal_f64"),
        (0x05, 0x75, &f32_file, "ok_altgrad_g4_f32"),
        (0x2e, 0x90, &f32_file, "ok_poly_g8_nocenter_f32"),
    ] {
        let mut seed = vec![a, bb];
        seed.extend_from_slice(file);
        put("attn", tag, &seed);
    }
    let h16: Vec<u8> = {
        let mut bufs = Vec::new();
        for (name, s, v) in &ts {
            bufs.push((name.clone(), s.clone(), f16_bytes(&v.iter().map(|&x| x as f32).collect::<Vec<_>>())));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
            .iter()
            .map(|(n, s, d)| {
                (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.clone(), d).unwrap())
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    };
    let mut seed = vec![0u8, 0x80];
    seed.extend(h16);
    put("attn", "ok_exact_f16", &seed);
    let _ = std::fs::remove_dir_all(&d);
    let mut total = 0;
    for e in walk(&root().join("fuzz/seeds")) {
        total += std::fs::metadata(e).unwrap().len();
    }
    println!("seeds written: {total} bytes in fuzz/seeds");
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
