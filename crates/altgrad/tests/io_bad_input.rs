//! Hostile and malformed inputs to `altgrad::io`: every one must give `Err` (BadInput or Io)
//! whose message names the file (and the tensor or token at fault), never a panic.

use altgrad::io::{load_hf_llama, read_safetensors, read_tokens, save_hf_llama, write_safetensors};
use altgrad::model::{LlamaConfig, LlamaWeights, RopeLayout};
use altgrad::Error;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "altgrad-io-bad-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cfg() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 16,
        hidden_size: 8,
        intermediate_size: 12,
        num_layers: 2,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_layout: RopeLayout::RotateHalf,
        max_seq_len: 128,
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        built_in_attention: None,
    }
}

/// A valid model directory.
fn model_dir(tag: &str) -> TempDir {
    let d = TempDir::new(tag);
    let c = cfg();
    save_hf_llama(&d.0, &c, &LlamaWeights::<f32>::random_hf(&c, 1)).unwrap();
    assert!(load_hf_llama::<f32>(&d.0).is_ok());
    d
}

/// The error of a load that must fail; checks it is a user error and the message contains
/// every string in `needles`.
fn load_err(dir: &Path, needles: &[&str]) -> String {
    let e = match load_hf_llama::<f32>(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    };
    assert!(matches!(e, Error::BadInput { .. } | Error::Io { .. }), "{e:?}");
    let msg = e.to_string();
    eprintln!("{msg}");
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
    }
    msg
}

/// Rewrites `config.json` through `edit`.
fn edit_config(d: &TempDir, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = d.path("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// The model's tensors as written by `save_hf_llama`.
fn tensors(d: &TempDir) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    read_safetensors(&d.path("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|t| (t.name, t.shape, t.data.iter().map(|&x| x as f32).collect()))
        .collect()
}

#[test]
fn config_not_json() {
    let d = model_dir("badjson");
    std::fs::write(d.path("config.json"), "{\n  \"model_type\": \"llama\",\n  oops\n}").unwrap();
    load_err(&d.0, &["config.json", "line 3"]);
}

#[test]
fn config_missing_field() {
    let d = model_dir("missing");
    edit_config(&d, |v| {
        v.as_object_mut().unwrap().remove("hidden_size");
    });
    load_err(&d.0, &["config.json", "missing field `hidden_size`", "line"]);
}

#[test]
fn config_wrong_type_field() {
    let d = model_dir("wrongtype");
    edit_config(&d, |v| v["vocab_size"] = (-5).into());
    load_err(&d.0, &["config.json", "-5"]);
}

#[test]
fn config_not_llama() {
    let d = model_dir("bert");
    edit_config(&d, |v| v["model_type"] = "bert".into());
    load_err(&d.0, &["config.json", "\"bert\""]);
}

#[test]
fn config_heads_not_multiple_of_kv_heads() {
    let d = model_dir("gqa");
    edit_config(&d, |v| {
        v["num_attention_heads"] = 3.into();
        v["num_key_value_heads"] = 2.into();
    });
    load_err(&d.0, &["config.json", "num_attention_heads (3)", "num_key_value_heads (2)"]);
}

#[test]
fn config_rope_scaling() {
    let d = model_dir("rope");
    edit_config(&d, |v| {
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
    });
    load_err(&d.0, &["config.json", "rope_scaling is not supported"]);
    // The default rope type is accepted.
    edit_config(&d, |v| v["rope_scaling"] = serde_json::json!({"rope_type": "default"}));
    assert!(load_hf_llama::<f32>(&d.0).is_ok());
}

#[test]
fn config_missing_file() {
    let d = model_dir("nocfg");
    std::fs::remove_file(d.path("config.json")).unwrap();
    let msg = load_err(&d.0, &["config.json"]);
    assert!(matches!(load_hf_llama::<f32>(&d.0), Err(Error::Io { .. })), "{msg}");
}

#[test]
fn missing_tensor() {
    let d = model_dir("misst");
    let mut t = tensors(&d);
    t.retain(|(n, _, _)| n != "model.layers.1.mlp.up_proj.weight");
    write_safetensors(&d.path("model.safetensors"), &t).unwrap();
    load_err(&d.0, &["model.safetensors", "missing tensor model.layers.1.mlp.up_proj.weight"]);
}

#[test]
fn untied_model_without_lm_head() {
    let d = model_dir("nohead");
    let mut t = tensors(&d);
    t.retain(|(n, _, _)| n != "lm_head.weight");
    write_safetensors(&d.path("model.safetensors"), &t).unwrap();
    load_err(&d.0, &["model.safetensors", "lm_head.weight"]);
    // The same tensors form a valid tied model.
    edit_config(&d, |v| v["tie_word_embeddings"] = true.into());
    let (c, w) = load_hf_llama::<f32>(&d.0).unwrap();
    assert!(c.tie_word_embeddings && w.lm_head.is_none());
}

#[test]
fn misshapen_tensor() {
    let d = model_dir("shape");
    let mut t = tensors(&d);
    for (n, s, v) in t.iter_mut() {
        if n == "model.layers.0.self_attn.k_proj.weight" {
            *s = vec![8, 4];
            v.truncate(32);
        }
    }
    write_safetensors(&d.path("model.safetensors"), &t).unwrap();
    load_err(&d.0, &["model.safetensors", "model.layers.0.self_attn.k_proj.weight", "[8, 4]", "expected [4, 8]"]);
}

#[test]
fn nan_in_weight() {
    let d = model_dir("nan");
    let mut t = tensors(&d);
    for (n, _, v) in t.iter_mut() {
        if n == "model.layers.1.self_attn.o_proj.weight" {
            v[13] = f32::NAN;
            v[20] = f32::INFINITY;
        }
    }
    write_safetensors(&d.path("model.safetensors"), &t).unwrap();
    load_err(&d.0, &["model.safetensors", "model.layers.1.self_attn.o_proj.weight", "NaN", "index 13", "[1, 5]"]);
}

#[test]
fn unsupported_dtype() {
    // An I32 tensor, hand-made: header then 4 bytes of data.
    let d = model_dir("dtype");
    let header = br#"{"model.norm.weight":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0, 0, 0, 0]);
    let p = d.path("one.safetensors");
    std::fs::write(&p, &bytes).unwrap();
    let e = read_safetensors(&p).unwrap_err().to_string();
    assert!(e.contains("one.safetensors") && e.contains("model.norm.weight") && e.contains("I32"), "{e}");
}

/// Offsets at which to cut a safetensors file of `len` bytes with a header of `n` bytes:
/// inside the 8-byte length, inside the JSON header, inside the data, one byte short.
fn cut_points(len: usize, n: usize) -> Vec<usize> {
    vec![0, 1, 4, 7, 8, 9, 8 + n / 2, 8 + n - 1, 8 + n, 8 + n + 1, (8 + n + len) / 2, len - 1]
}

#[test]
fn truncated_model_file() {
    let d = model_dir("trunc");
    let p = d.path("model.safetensors");
    let full = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    for cut in cut_points(full.len(), n) {
        std::fs::write(&p, &full[..cut]).unwrap();
        load_err(&d.0, &["model.safetensors"]);
        let e = read_safetensors(&p).unwrap_err();
        assert!(matches!(e, Error::BadInput { .. }), "cut at {cut}: {e:?}");
        assert!(e.to_string().contains("model.safetensors"), "cut at {cut}: {e}");
    }
    std::fs::write(&p, &full).unwrap();
    assert!(load_hf_llama::<f32>(&d.0).is_ok());
}

#[test]
fn hostile_header_length() {
    let d = TempDir::new("hostile");
    let p = d.path("model.safetensors");
    for n in [u64::MAX, u64::MAX / 2, 1 << 40, 100] {
        let mut bytes = n.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}      ");
        std::fs::write(&p, &bytes).unwrap();
        let e = read_safetensors(&p).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("header length"), "{n}: {e}");
    }
    // Same through a model directory.
    let m = model_dir("hostile-dir");
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(m.path("model.safetensors"), &bytes).unwrap();
    load_err(&m.0, &["model.safetensors", "header length"]);
}

#[test]
fn garbage_header() {
    let d = TempDir::new("garbage");
    let p = d.path("x.safetensors");
    for header in [
        &b"not json"[..],
        b"[1,2]   ",
        b"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,99]}}",
        b"\xff\xfe\xfd\xfc",
    ] {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 16]);
        std::fs::write(&p, &bytes).unwrap();
        let e = read_safetensors(&p).unwrap_err();
        assert!(matches!(e, Error::BadInput { .. }) && e.to_string().contains("x.safetensors"), "{e}");
    }
    // Huge shapes whose byte size overflows.
    let header = br#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    std::fs::write(&p, &bytes).unwrap();
    assert!(read_safetensors(&p).unwrap_err().to_string().contains("x.safetensors"));
}

#[test]
fn missing_directory_and_files() {
    let d = TempDir::new("nodir");
    let missing = d.path("no-such-model");
    let e = load_err(&missing, &["no-such-model"]);
    assert!(matches!(load_hf_llama::<f64>(&missing), Err(Error::Io { .. })), "{e}");
    // A file where a directory is expected.
    std::fs::write(d.path("file"), "x").unwrap();
    load_err(&d.path("file"), &["file", "not a directory"]);
    // A directory without weights.
    let m = model_dir("noweights");
    std::fs::remove_file(m.path("model.safetensors")).unwrap();
    load_err(&m.0, &["model.safetensors"]);
    // read_safetensors on a missing file.
    let e = read_safetensors(&d.path("absent.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("absent.safetensors"));
}

#[test]
fn bad_sharded_index() {
    let m = model_dir("shards");
    std::fs::rename(m.path("model.safetensors"), m.path("part.safetensors")).unwrap();
    std::fs::write(m.path("model.safetensors.index.json"), "{\"weight_map\": 3}").unwrap();
    load_err(&m.0, &["model.safetensors.index.json"]);
    std::fs::write(
        m.path("model.safetensors.index.json"),
        r#"{"weight_map": {"model.embed_tokens.weight": "/etc/passwd"}}"#,
    )
    .unwrap();
    load_err(&m.0, &["model.safetensors.index.json", "/etc/passwd"]);
    std::fs::write(
        m.path("model.safetensors.index.json"),
        r#"{"weight_map": {"model.embed_tokens.weight": "gone.safetensors"}}"#,
    )
    .unwrap();
    load_err(&m.0, &["gone.safetensors"]);
}

#[test]
fn token_files() {
    let d = TempDir::new("tokens");
    let p = d.path("ids.txt");
    std::fs::write(&p, "12 abc 7").unwrap();
    let e = read_tokens(&p).unwrap_err();
    assert!(matches!(e, Error::BadInput { .. }));
    let m = e.to_string();
    assert!(m.contains("ids.txt") && m.contains("\"abc\"") && m.contains("token 2"), "{m}");

    std::fs::write(&p, "-3").unwrap();
    let m = read_tokens(&p).unwrap_err().to_string();
    assert!(m.contains("ids.txt") && m.contains("\"-3\"") && m.contains("negative"), "{m}");

    std::fs::write(&p, "").unwrap();
    let m = read_tokens(&p).unwrap_err().to_string();
    assert!(m.contains("ids.txt") && m.contains("no token ids"), "{m}");

    std::fs::write(&p, "3 1.5").unwrap();
    let m = read_tokens(&p).unwrap_err().to_string();
    assert!(m.contains("\"1.5\""), "{m}");

    let m = read_tokens(&d.path("none.txt")).unwrap_err().to_string();
    assert!(m.contains("none.txt"), "{m}");

    std::fs::write(&p, "5\n6 7\n").unwrap();
    assert_eq!(read_tokens(&p).unwrap(), vec![5, 6, 7]);
}
