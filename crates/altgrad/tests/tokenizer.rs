//! `altgrad::io::tokenizer` against reference ids from HF `transformers`/`tokenizers`
//! (tests/fixtures/tokenizer_ids.json, made by tests/fixtures/make_tokenizer_fixture.py).
//!
//! Real-model tests skip with a note when `models/` is missing (run `scripts/fetch-models.sh`).
//! The SmolLM2 tokenizer is read from the GGUF by a minimal metadata reader local to this file.

use altgrad::io::tokenizer::{GgufTokenizerParts, TextTokenizer};
use altgrad::Error;
use serde_json::Value;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

const GPL3: &str = "/usr/share/common-licenses/GPL-3";

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn fixture() -> Value {
    let path = root().join("tests/fixtures/tokenizer_ids.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The file if it exists, else `None` after printing why the test is skipped.
fn model_file(rel: &str) -> Option<PathBuf> {
    let p = root().join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIP: {} is missing (run scripts/fetch-models.sh)", p.display());
        None
    }
}

/// A unique file path under the system temp dir.
fn temp_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "altgrad-tokenizer-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

// ---------------------------------------------------------------- minimal GGUF metadata reader

/// The GGUF metadata values this test needs; other values are skipped.
#[derive(Debug)]
enum Meta {
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    U32(u32),
    Bool(bool),
    Other,
}

struct Rd<R: Read>(R);

impl<R: Read> Rd<R> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        self.0.read_exact(&mut b).unwrap();
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b).unwrap();
        String::from_utf8(b).unwrap()
    }
    /// Reads a scalar of GGUF type `ty`; only the types this test keeps are returned.
    fn scalar(&mut self, ty: u32) -> Meta {
        match ty {
            0 | 1 => {
                self.bytes::<1>();
                Meta::Other
            }
            2 | 3 => {
                self.bytes::<2>();
                Meta::Other
            }
            4 => Meta::U32(self.u32()),
            5 | 6 => {
                self.bytes::<4>();
                Meta::Other
            }
            7 => Meta::Bool(self.bytes::<1>()[0] != 0),
            8 => Meta::Str(self.string()),
            10..=12 => {
                self.bytes::<8>();
                Meta::Other
            }
            _ => panic!("unknown GGUF value type {ty}"),
        }
    }
    fn value(&mut self, ty: u32) -> Meta {
        if ty != 9 {
            return self.scalar(ty);
        }
        let elem = self.u32();
        let n = self.u64() as usize;
        match elem {
            8 => Meta::Strs((0..n).map(|_| self.string()).collect()),
            5 => Meta::I32s((0..n).map(|_| i32::from_le_bytes(self.bytes())).collect()),
            _ => {
                for _ in 0..n {
                    self.value(elem);
                }
                Meta::Other
            }
        }
    }
}

/// The metadata key/values of a GGUF (v2 or v3) file.
fn read_gguf_metadata(path: &Path) -> HashMap<String, Meta> {
    let mut r = Rd(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    assert_eq!(&r.bytes::<4>(), b"GGUF");
    let version = r.u32();
    assert!(version == 2 || version == 3, "GGUF version {version}");
    let _n_tensors = r.u64();
    let n_kv = r.u64();
    (0..n_kv)
        .map(|_| {
            let key = r.string();
            let ty = r.u32();
            (key, r.value(ty))
        })
        .collect()
}

/// The tokenizer parts the lead's GGUF loader will hand to `from_gguf_parts`.
fn smollm2_parts(path: &Path) -> GgufTokenizerParts {
    let mut meta = read_gguf_metadata(path);
    let mut take = |k: &str| meta.remove(k);
    assert!(matches!(take("tokenizer.ggml.model"), Some(Meta::Str(m)) if m == "gpt2"));
    let Some(Meta::Strs(tokens)) = take("tokenizer.ggml.tokens") else { panic!("no tokens") };
    let Some(Meta::Strs(merges)) = take("tokenizer.ggml.merges") else { panic!("no merges") };
    let token_types = match take("tokenizer.ggml.token_type") {
        Some(Meta::I32s(t)) => Some(t),
        _ => None,
    };
    let pre = match take("tokenizer.ggml.pre") {
        Some(Meta::Str(p)) => Some(p),
        _ => None,
    };
    let id = |m: Option<Meta>| match m {
        Some(Meta::U32(i)) => Some(i),
        _ => None,
    };
    let bos_id = id(take("tokenizer.ggml.bos_token_id"));
    let eos_id = id(take("tokenizer.ggml.eos_token_id"));
    let add_bos = matches!(take("tokenizer.ggml.add_bos_token"), Some(Meta::Bool(true)));
    GgufTokenizerParts { tokens, merges, token_types, pre, bos_id, eos_id, add_bos, source: path.display().to_string() }
}

const SMOLLM2: &str = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

// ---------------------------------------------------------------- MiniLM (HF tokenizer.json)

#[test]
fn minilm_matches_transformers() {
    let Some(path) = model_file("models/minilm/tokenizer.json") else { return };
    let tok = TextTokenizer::from_file(&path).unwrap();
    assert_eq!(tok.vocab_size(), 30522);
    let fx = fixture();
    let cases = fx["minilm"]["cases"].as_object().unwrap();
    for (name, case) in cases {
        let ids = tok.encode(case["text"].as_str().unwrap()).unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "MiniLM case {name}");
    }
    // The GPL-3 excerpt: [CLS] … [SEP], and longer than the file's stored truncation (128).
    let ids = tok.encode(cases["gpl3_excerpt"]["text"].as_str().unwrap()).unwrap();
    assert_eq!(ids.first(), Some(&101));
    assert_eq!(ids.last(), Some(&102));
    assert_eq!(ids.len(), 590);
    // decode skips [CLS]/[SEP] (BERT lowercases, so compare with the lowercased text).
    assert_eq!(tok.decode(&tok.encode("Hello, World!").unwrap()).unwrap(), "hello, world!");
}

// ---------------------------------------------------------------- SmolLM2 (GGUF byte-level BPE)

#[test]
fn smollm2_gguf_matches_reference() {
    let Some(path) = model_file(SMOLLM2) else { return };
    let fx = fixture();
    let sm = &fx["smollm2"];
    let parts = smollm2_parts(&path);
    // The file's own metadata agrees with what the gguf package read.
    let meta = &sm["gguf_metadata"];
    assert_eq!(parts.tokens.len() as u64, meta["n_tokens"].as_u64().unwrap());
    assert_eq!(parts.merges.len() as u64, meta["n_merges"].as_u64().unwrap());
    assert_eq!(parts.pre.as_deref(), meta["tokenizer.ggml.pre"].as_str());
    assert_eq!(parts.add_bos, meta["tokenizer.ggml.add_bos_token"].as_bool().unwrap());
    assert!(!parts.add_bos, "SmolLM2's GGUF says add_bos_token = false");
    assert_eq!(sm["hf_gguf_add_bos_token"].as_bool(), Some(false));
    assert_eq!(parts.bos_id, Some(1));

    let tok = TextTokenizer::from_gguf_parts(parts).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    for (name, case) in sm["cases"].as_object().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "SmolLM2 case {name} ({text:?})");
        // transformers' GGUF loader lacks the digit split; it differs exactly on the diverge_* cases.
        let hf = ids_of(&case["hf_gguf_ids"]);
        assert_eq!(ids != hf, name.starts_with("diverge_"), "SmolLM2 case {name}: transformers' GGUF ids {hf:?}");
    }
    // No BOS added; control tokens are matched whole and dropped when decoding.
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(*ids.last().unwrap(), 2);
    assert_eq!(tok.decode(&ids).unwrap(), "user\nHi");
    assert_ne!(tok.encode("Hello").unwrap()[0], 1);
}

#[test]
fn smollm2_gpl3_round_trip_and_count() {
    let Some(path) = model_file(SMOLLM2) else { return };
    let Ok(gpl) = std::fs::read_to_string(GPL3) else {
        eprintln!("SKIP: {GPL3} is missing");
        return;
    };
    let tok = TextTokenizer::from_gguf_parts(smollm2_parts(&path)).unwrap();
    let ids = tok.encode(&gpl).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), gpl, "decode(encode(GPL-3)) differs from GPL-3");
    eprintln!("GPL-3: {} chars, {} SmolLM2 tokens", gpl.chars().count(), ids.len());
    let fx = fixture();
    let same_file = gpl.chars().count() as u64 == fx["gpl3"]["chars"].as_u64().unwrap()
        && gpl.starts_with(fx["smollm2"]["cases"]["gpl3_excerpt"]["text"].as_str().unwrap());
    if same_file {
        assert_eq!(ids.len() as u64, fx["smollm2"]["gpl3_full_count"].as_u64().unwrap());
    } else {
        eprintln!("note: {GPL3} differs from the fixture's; token count not compared");
    }
}

#[test]
fn smollm2_add_bos_prepends_bos() {
    let Some(path) = model_file(SMOLLM2) else { return };
    let mut parts = smollm2_parts(&path);
    parts.add_bos = true;
    let tok = TextTokenizer::from_gguf_parts(parts).unwrap();
    let ids = tok.encode("Hello world").unwrap();
    assert_eq!(ids, vec![1, 19556, 905]);
    assert_eq!(tok.decode(&ids).unwrap(), "Hello world");
}

// ---------------------------------------------------------------- synthetic byte-level BPE (always runs)

/// GPT-2's byte → char map.
fn byte_char(b: u8) -> char {
    let kept = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if kept(b) {
        char::from(b)
    } else {
        let n = (0..b).filter(|&x| !kept(x)).count() as u32;
        char::from_u32(256 + n).unwrap()
    }
}

/// 256 byte tokens, then `<s>` (control, id 256), `<tool>` (user-defined), then merges' results.
fn tiny_parts(pre: Option<&str>) -> GgufTokenizerParts {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut token_types = vec![1; 256];
    tokens.push("<s>".into());
    token_types.push(3);
    tokens.push("<tool>".into());
    token_types.push(4);
    let merges = ["Ġ 1", "Ġ Ġ", "1 2", "h i"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        token_types.push(1);
    }
    GgufTokenizerParts {
        tokens,
        merges: merges.iter().map(|m| m.to_string()).collect(),
        token_types: Some(token_types),
        pre: pre.map(str::to_string),
        bos_id: Some(256),
        eos_id: None,
        add_bos: false,
        source: "tiny.gguf".into(),
    }
}

#[test]
fn synthetic_pre_tokenizers() {
    let id = |t: &TextTokenizer, s: &str| t.encode(s).unwrap();
    // Token b < 256 is byte b (space is 32, spelled 'Ġ'); then <s>, <tool>, "Ġ1", "ĠĠ", "12", "hi".
    assert_eq!(byte_char(b' '), 'Ġ');
    let (space, one, two, a) = (32, u32::from(b'1'), u32::from(b'2'), u32::from(b'a'));
    let (g1, gg, d12, hi) = (258, 259, 260, 261);
    let smollm = TextTokenizer::from_gguf_parts(tiny_parts(Some("smollm"))).unwrap();
    let gpt2 = TextTokenizer::from_gguf_parts(tiny_parts(Some("gpt-2"))).unwrap();
    // smollm splits every digit apart first: " 12" → " ", "1", "2"; GPT-2 keeps " 12" together.
    assert_eq!(id(&smollm, " 12"), vec![space, one, two]);
    assert_eq!(id(&gpt2, " 12"), vec![g1, two]);
    assert_eq!(id(&smollm, "12"), vec![one, two]);
    assert_eq!(id(&gpt2, "12"), vec![d12]);
    // "a  1": smollm sees "a  " then "1" → "a", "ĠĠ", "1"; GPT-2 sees "a", " ", " 1".
    assert_eq!(id(&smollm, "a  1"), vec![a, gg, one]);
    assert_eq!(id(&gpt2, "a  1"), vec![a, space, g1]);
    // Control and user-defined tokens are matched whole; decode drops the control one only.
    let ids = id(&smollm, "<s>hi<tool>");
    assert_eq!(ids, vec![256, hi, 257]);
    assert_eq!(smollm.decode(&ids).unwrap(), "hi<tool>");
    // llama.cpp's default pre-tokenizer builds and round-trips.
    let default = TextTokenizer::from_gguf_parts(tiny_parts(None)).unwrap();
    let text = "x = 1234; y += \"naïve\" 👋\n\n";
    assert_eq!(default.decode(&default.encode(text).unwrap()).unwrap(), text);
    // add_bos prepends the BOS id.
    let mut parts = tiny_parts(Some("smollm"));
    parts.add_bos = true;
    let bos = TextTokenizer::from_gguf_parts(parts).unwrap();
    assert_eq!(id(&bos, "hi"), vec![256, hi]);
    assert_eq!(bos.vocab_size(), 262);
}

// ---------------------------------------------------------------- errors

fn assert_bad_input(err: Error, input: &str, needle: &str) {
    let msg = err.to_string();
    assert!(err.is_user_error(), "{msg}");
    assert!(msg.contains(input), "message {msg:?} does not name {input:?}");
    assert!(msg.contains(needle), "message {msg:?} does not say {needle:?}");
}

#[test]
fn missing_tokenizer_file() {
    let path = temp_path("missing.json");
    let err = TextTokenizer::from_file(&path).err().unwrap();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_bad_input(err, &path.display().to_string(), "");
}

#[test]
fn malformed_tokenizer_json() {
    for (tag, body) in [
        ("garbage.json", "this is not json"),
        ("truncated.json", "{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\", \"vocab\": {"),
        ("wrong.json", "{\"version\": \"1.0\", \"model\": {\"type\": \"NoSuchModel\"}}"),
    ] {
        let path = temp_path(tag);
        std::fs::write(&path, body).unwrap();
        let err = TextTokenizer::from_file(&path).err().unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(err, Error::BadInput { .. }), "{err}");
        assert_bad_input(err, &path.display().to_string(), "tokenizer.json");
    }
}

#[test]
fn bad_gguf_parts() {
    let err = TextTokenizer::from_gguf_parts(tiny_parts(Some("qwen2"))).err().unwrap();
    assert_bad_input(err, "tiny.gguf", "unsupported pre-tokenizer");

    let mut p = tiny_parts(Some("smollm"));
    p.merges.push("nospace".into());
    assert_bad_input(TextTokenizer::from_gguf_parts(p).err().unwrap(), "tiny.gguf", "merges[4]");

    let mut p = tiny_parts(Some("smollm"));
    p.merges.push("q z".into()); // "qz" is not a token
    assert_bad_input(TextTokenizer::from_gguf_parts(p).err().unwrap(), "tiny.gguf", "merges");

    let mut p = tiny_parts(Some("smollm"));
    p.bos_id = Some(100_000);
    assert_bad_input(TextTokenizer::from_gguf_parts(p).err().unwrap(), "tiny.gguf", "bos_token_id");

    let mut p = tiny_parts(Some("smollm"));
    p.bos_id = None;
    p.add_bos = true;
    assert_bad_input(TextTokenizer::from_gguf_parts(p).err().unwrap(), "tiny.gguf", "add_bos_token");

    let mut p = tiny_parts(Some("smollm"));
    p.token_types.as_mut().unwrap().pop();
    assert_bad_input(TextTokenizer::from_gguf_parts(p).err().unwrap(), "tiny.gguf", "token_type");

    let mut p = tiny_parts(Some("smollm"));
    p.tokens.clear();
    p.token_types = None;
    assert_bad_input(TextTokenizer::from_gguf_parts(p).err().unwrap(), "tiny.gguf", "empty");

    let tok = TextTokenizer::from_gguf_parts(tiny_parts(Some("smollm"))).unwrap();
    assert_bad_input(tok.decode(&[1, 262]).err().unwrap(), "tiny.gguf", "262");
}
