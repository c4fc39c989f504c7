//! GGUF reader (`altgrad::io::gguf`) against files written here by a small, independent GGUF
//! writer (GGUF spec v3) with quantizers following ggml's reference `quantize_row_*_ref`:
//!
//! - a valid tiny Llama (F32, F16, Q8_0, Q4_0, Q4_1 tensors, every metadata type, nested arrays)
//!   loads, and every dequantized value equals the value this file computed from the blocks it
//!   wrote (bit for bit), which in turn is close to the original value;
//! - truncations at every byte of the header/metadata/tensor-info region and at many offsets
//!   in the data, absurd counts and lengths, bad dims/types/offsets, bad magic and versions:
//!   every case is an `Err` naming the file (never a panic), and no single allocation made while
//!   parsing exceeds the file's size (plus a small constant for messages) — checked with a
//!   counting global allocator.

mod common;

use altgrad::io::gguf::{load_gguf_llama, GgmlType, GgufArray, GgufFile, GgufValue};
use altgrad::model::RopeLayout;
use altgrad::Error;
use half::f16;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

// ---------------------------------------------------------------------------------------------
// Largest single allocation, per thread.

struct Counting;

thread_local! {
    static MAX_ALLOC: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = MAX_ALLOC.try_with(|m| {
        if size > m.get() {
            m.set(size)
        }
    });
}

// SAFETY: forwards to the system allocator; only records sizes in a const-initialized
// thread-local (which never allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`, returning its result and the largest single allocation it made on this thread.
fn max_alloc_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    MAX_ALLOC.with(|m| m.set(0));
    let r = f();
    (r, MAX_ALLOC.with(|m| m.get()))
}

// ---------------------------------------------------------------------------------------------
// Temporary files.

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        // Thousands of small files are written: prefer a RAM file system when there is one (a
        // busy disk makes each rewrite wait on the journal).
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let p = base.join(format!("altgrad-gguf-{}-{tag}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// A GGUF writer (spec: ggml docs/gguf.md).

#[derive(Clone, Debug)]
enum Meta {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    /// Element type id and elements (all of that type).
    Arr(u32, Vec<Meta>),
}

fn type_id(m: &Meta) -> u32 {
    match m {
        Meta::U8(_) => 0,
        Meta::I8(_) => 1,
        Meta::U16(_) => 2,
        Meta::I16(_) => 3,
        Meta::U32(_) => 4,
        Meta::I32(_) => 5,
        Meta::F32(_) => 6,
        Meta::Bool(_) => 7,
        Meta::Str(_) => 8,
        Meta::Arr(..) => 9,
        Meta::U64(_) => 10,
        Meta::I64(_) => 11,
        Meta::F64(_) => 12,
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// The value's encoding without its type id.
fn payload(b: &mut Vec<u8>, m: &Meta) {
    match m {
        Meta::U8(x) => b.push(*x),
        Meta::I8(x) => b.extend(x.to_le_bytes()),
        Meta::U16(x) => b.extend(x.to_le_bytes()),
        Meta::I16(x) => b.extend(x.to_le_bytes()),
        Meta::U32(x) => b.extend(x.to_le_bytes()),
        Meta::I32(x) => b.extend(x.to_le_bytes()),
        Meta::F32(x) => b.extend(x.to_le_bytes()),
        Meta::Bool(x) => b.push(*x as u8),
        Meta::Str(s) => put_str(b, s),
        Meta::U64(x) => b.extend(x.to_le_bytes()),
        Meta::I64(x) => b.extend(x.to_le_bytes()),
        Meta::F64(x) => b.extend(x.to_le_bytes()),
        Meta::Arr(t, v) => {
            b.extend(t.to_le_bytes());
            b.extend((v.len() as u64).to_le_bytes());
            for e in v {
                assert_eq!(type_id(e), *t, "array elements must share the declared type");
                payload(b, e);
            }
        }
    }
}

#[derive(Clone)]
struct Tensor {
    name: String,
    /// ggml ne (innermost first).
    ne: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

/// Byte positions of a metadata entry's fields.
#[derive(Clone, Copy, Debug)]
struct KvPos {
    key_len: usize,
    ty: usize,
    value: usize,
}

/// Byte positions of a tensor info's fields.
#[derive(Clone, Copy, Debug)]
struct TiPos {
    n_dims: usize,
    dims: usize,
    ty: usize,
    offset: usize,
}

struct Written {
    bytes: Vec<u8>,
    kv: HashMap<String, KvPos>,
    ti: HashMap<String, TiPos>,
    data_offset: usize,
    data_end: usize,
}

fn write_gguf(meta: &[(String, Meta)], tensors: &[Tensor]) -> Written {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    let mut kv = HashMap::new();
    for (k, v) in meta {
        let key_len = b.len();
        put_str(&mut b, k);
        let ty = b.len();
        b.extend(type_id(v).to_le_bytes());
        let value = b.len();
        payload(&mut b, v);
        kv.insert(k.clone(), KvPos { key_len, ty, value });
    }
    let align = meta
        .iter()
        .find_map(|(k, v)| match v {
            Meta::U32(a) if k == "general.alignment" => Some(*a as usize),
            _ => None,
        })
        .unwrap_or(32);
    let mut offsets = Vec::new();
    let mut off = 0usize;
    for t in tensors {
        offsets.push(off);
        off = (off + t.data.len()).div_ceil(align) * align;
    }
    let mut ti = HashMap::new();
    for (t, &o) in tensors.iter().zip(&offsets) {
        put_str(&mut b, &t.name);
        let n_dims = b.len();
        b.extend((t.ne.len() as u32).to_le_bytes());
        let dims = b.len();
        for d in &t.ne {
            b.extend(d.to_le_bytes());
        }
        let ty = b.len();
        b.extend(t.ty.to_le_bytes());
        let offset = b.len();
        b.extend((o as u64).to_le_bytes());
        ti.insert(t.name.clone(), TiPos { n_dims, dims, ty, offset });
    }
    let data_offset = b.len().div_ceil(align) * align;
    b.resize(data_offset, 0);
    for (t, &o) in tensors.iter().zip(&offsets) {
        b.resize(data_offset + o, 0);
        b.extend(&t.data);
    }
    let data_end = b.len();
    Written { bytes: b, kv, ti, data_offset, data_end }
}

// ---------------------------------------------------------------------------------------------
// Quantizers (ggml-quants.c `quantize_row_*_ref`) returning the blocks and the values they
// encode, computed here from the stored integers and f16 scales.

const QK: usize = 32;

fn quant_q8_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut b, mut y) = (Vec::new(), Vec::new());
    for blk in x.chunks(QK) {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d16 = f16::from_f32(d);
        b.extend(d16.to_le_bytes());
        for &v in blk {
            let q = (v * id).round() as i8; // roundf: half away from zero
            b.push(q as u8);
            y.push(q as f32 * d16.to_f32());
        }
    }
    (b, y)
}

fn quant_q4_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut b, mut y) = (Vec::new(), Vec::new());
    for blk in x.chunks(QK) {
        let max = blk.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d16 = f16::from_f32(d);
        b.extend(d16.to_le_bytes());
        let q: Vec<u8> = blk.iter().map(|&v| ((v * id + 8.5) as i8).min(15) as u8).collect();
        for j in 0..QK / 2 {
            b.push(q[j] | (q[j + 16] << 4));
        }
        y.extend(q.iter().map(|&q| (q as f32 - 8.0) * d16.to_f32()));
    }
    (b, y)
}

fn quant_q4_1(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut b, mut y) = (Vec::new(), Vec::new());
    for blk in x.chunks(QK) {
        let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
        let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (d16, m16) = (f16::from_f32(d), f16::from_f32(min));
        b.extend(d16.to_le_bytes());
        b.extend(m16.to_le_bytes());
        let q: Vec<u8> = blk.iter().map(|&v| (((v - min) * id + 0.5) as i8).min(15) as u8).collect();
        for j in 0..QK / 2 {
            b.push(q[j] | (q[j + 16] << 4));
        }
        y.extend(q.iter().map(|&q| q as f32 * d16.to_f32() + m16.to_f32()));
    }
    (b, y)
}

fn quant_f16(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    (h.iter().flat_map(|v| v.to_le_bytes()).collect(), h.iter().map(|v| v.to_f32()).collect())
}

fn quant_f32(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    (x.iter().flat_map(|v| v.to_le_bytes()).collect(), x.to_vec())
}

const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;

/// Quantizes `x` (row-major `[rows, cols]`) to ggml type `ty`, checking the blocks encode
/// values close to `x`. Returns the data and the encoded values.
fn quantize(ty: u32, x: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let (b, y) = match ty {
        F32 => quant_f32(x),
        F16 => quant_f16(x),
        Q8_0 => quant_q8_0(x),
        Q4_0 => quant_q4_0(x),
        Q4_1 => quant_q4_1(x),
        _ => unreachable!(),
    };
    // The quantizer is sane: each value within about one quantization step of the original.
    for (blk_x, blk_y) in x.chunks(cols.min(QK)).zip(y.chunks(cols.min(QK))) {
        let amax = blk_x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let step = match ty {
            F32 => 0.0,
            F16 => amax * 1e-3,
            Q8_0 => amax / 127.0 * 0.6,
            Q4_0 => amax / 8.0 * 1.01,
            _ => amax * 2.0 / 15.0 * 0.6,
        };
        for (a, b) in blk_x.iter().zip(blk_y) {
            assert!((a - b).abs() <= step + 1e-6, "type {ty}: {a} encoded as {b}");
        }
    }
    (b, y)
}

// ---------------------------------------------------------------------------------------------
// The tiny Llama.

const VOCAB: usize = 40;
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const FFN: usize = 96;
const LAYERS: usize = 2;

struct Model {
    meta: Vec<(String, Meta)>,
    tensors: Vec<Tensor>,
    /// name → (shape outermost first, expected dequantized values).
    expected: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

fn s(x: &str) -> Meta {
    Meta::Str(x.into())
}

fn tiny_model(tied: bool) -> Model {
    let tokens: Vec<Meta> = (0..VOCAB).map(|i| s(&format!("tok{i}"))).collect();
    let token_type: Vec<Meta> = (0..VOCAB).map(|i| Meta::I32(if i < 3 { 3 } else { 1 })).collect();
    let meta: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), s("llama")),
        ("general.name".into(), s("tiny ✓")),
        ("general.alignment".into(), Meta::U32(32)),
        ("llama.context_length".into(), Meta::U32(256)),
        ("llama.embedding_length".into(), Meta::U32(HIDDEN as u32)),
        ("llama.block_count".into(), Meta::U64(LAYERS as u64)),
        ("llama.feed_forward_length".into(), Meta::I32(FFN as i32)),
        ("llama.attention.head_count".into(), Meta::U16(HEADS as u16)),
        ("llama.attention.head_count_kv".into(), Meta::U8(KV_HEADS as u8)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Meta::F32(1e-5)),
        ("llama.rope.freq_base".into(), Meta::F64(500000.0)),
        ("llama.rope.dimension_count".into(), Meta::I64(HEAD_DIM as i64)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.tokens".into(), Meta::Arr(8, tokens)),
        ("tokenizer.ggml.token_type".into(), Meta::Arr(5, token_type)),
        ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(true)),
        ("test.i8".into(), Meta::I8(-7)),
        ("test.i16".into(), Meta::I16(-300)),
        ("test.u8_array".into(), Meta::Arr(0, vec![Meta::U8(1), Meta::U8(255)])),
        ("test.f32_array".into(), Meta::Arr(6, vec![Meta::F32(0.5), Meta::F32(-2.0)])),
        ("test.bool_array".into(), Meta::Arr(7, vec![Meta::Bool(true), Meta::Bool(false)])),
        ("test.u64_array".into(), Meta::Arr(10, vec![Meta::U64(u64::MAX)])),
        (
            "test.nested".into(),
            Meta::Arr(
                9,
                vec![
                    Meta::Arr(4, vec![Meta::U32(1), Meta::U32(2)]),
                    Meta::Arr(8, vec![s("a"), s("")]),
                    Meta::Arr(9, vec![Meta::Arr(12, vec![Meta::F64(-1.5)])]),
                ],
            ),
        ),
    ];
    let mut tensors = Vec::new();
    let mut expected = HashMap::new();
    let mut seed = 100;
    let mut add = |name: String, shape: Vec<usize>, ty: u32, mean: f64, std: f64| {
        seed += 1;
        let n: usize = shape.iter().product();
        let x: Vec<f32> = common::randn(n, seed, std).iter().map(|v| (v + mean) as f32).collect();
        let cols = *shape.last().unwrap();
        let (data, y) = quantize(ty, &x, cols);
        tensors.push(Tensor { name: name.clone(), ne: shape.iter().rev().map(|&d| d as u64).collect(), ty, data });
        expected.insert(name, (shape, y));
    };
    add("token_embd.weight".into(), vec![VOCAB, HIDDEN], Q8_0, 0.0, 1.0);
    for i in 0..LAYERS {
        let q = HEADS * HEAD_DIM;
        let kv = KV_HEADS * HEAD_DIM;
        add(format!("blk.{i}.attn_norm.weight"), vec![HIDDEN], F32, 1.0, 0.1);
        add(format!("blk.{i}.attn_q.weight"), vec![q, HIDDEN], Q4_0, 0.0, 0.125);
        add(format!("blk.{i}.attn_k.weight"), vec![kv, HIDDEN], Q4_1, 0.0, 0.125);
        add(format!("blk.{i}.attn_v.weight"), vec![kv, HIDDEN], F16, 0.0, 0.125);
        add(format!("blk.{i}.attn_output.weight"), vec![HIDDEN, q], Q8_0, 0.0, 0.125);
        add(format!("blk.{i}.ffn_norm.weight"), vec![HIDDEN], F32, 1.0, 0.1);
        add(format!("blk.{i}.ffn_gate.weight"), vec![FFN, HIDDEN], Q4_1, 0.0, 0.125);
        add(format!("blk.{i}.ffn_up.weight"), vec![FFN, HIDDEN], Q4_0, 0.0, 0.125);
        add(format!("blk.{i}.ffn_down.weight"), vec![HIDDEN, FFN], if i == 0 { F16 } else { Q8_0 }, 0.0, 0.1);
    }
    add("output_norm.weight".into(), vec![HIDDEN], F32, 1.0, 0.1);
    if !tied {
        add("output.weight".into(), vec![VOCAB, HIDDEN], Q4_1, 0.0, 0.125);
    }
    // An extra tensor the loader ignores, of a type that cannot be dequantized (IQ2_XXS: 256
    // values in 66 bytes).
    tensors.push(Tensor { name: "extra.iq2".into(), ne: vec![256], ty: 16, data: vec![0; 66] });
    Model { meta, tensors, expected }
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// `GgufFile::open` on `bytes` must fail with a user error naming the file (and containing
/// `needle`), allocating at most the file's size plus a constant; `load_gguf_llama` too.
fn open_err(dir: &TempDir, bytes: &[u8], needle: &str) -> String {
    open_err_opt(dir, bytes, needle, true)
}

/// [`open_err`], calling `load_gguf_llama` too only when `also_load`.
fn open_err_opt(dir: &TempDir, bytes: &[u8], needle: &str, also_load: bool) -> String {
    let p = dir.write("bad.gguf", bytes);
    let shown = p.display().to_string();
    let (r, max) = max_alloc_of(|| GgufFile::open(&p));
    let e = match r {
        Ok(_) => panic!("opening a file of {} bytes should fail (expected {needle:?})", bytes.len()),
        Err(e) => e,
    };
    assert!(matches!(e, Error::BadInput { .. }), "{e:?}");
    let msg = e.to_string();
    if !needle.is_empty() {
        eprintln!("{msg}");
    }
    assert!(msg.contains(&shown), "message {msg:?} does not name the file");
    assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
    assert!(max <= bytes.len().max(4096), "parsing {} bytes allocated {max} bytes at once ({msg})", bytes.len());
    if also_load {
        let e2 = load_gguf_llama::<f32>(&p).unwrap_err().to_string();
        assert_eq!(e2, msg, "load_gguf_llama reports the same error as open");
    }
    msg
}

/// `load_gguf_llama` on `bytes` must fail with a user error naming the file and `needles`.
fn load_err(dir: &TempDir, bytes: &[u8], needles: &[&str]) -> String {
    let p = dir.write("bad-load.gguf", bytes);
    let e = match load_gguf_llama::<f32>(&p) {
        Ok(_) => panic!("loading should fail (expected {needles:?})"),
        Err(e) => e,
    };
    assert!(matches!(e, Error::BadInput { .. }), "{e:?}");
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(msg.contains(&p.display().to_string()), "message {msg:?} does not name the file");
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
    }
    msg
}

fn put_u64_at(b: &mut [u8], pos: usize, v: u64) {
    b[pos..pos + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32_at(b: &mut [u8], pos: usize, v: u32) {
    b[pos..pos + 4].copy_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn valid_tiny_llama_loads_with_exact_values() {
    let dir = TempDir::new("valid");
    for tied in [false, true] {
        let m = tiny_model(tied);
        let w = write_gguf(&m.meta, &m.tensors);
        let p = dir.write("tiny.gguf", &w.bytes);

        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.alignment(), 32);
        assert_eq!(g.data_offset() as usize, w.data_offset);
        assert_eq!(g.metadata().len(), m.meta.len());
        assert_eq!(g.tensors().len(), m.tensors.len());
        // Metadata of every type reads back; order is the file's.
        for ((k, _), (k2, _)) in m.meta.iter().zip(g.metadata()) {
            assert_eq!(k, k2);
        }
        assert_eq!(g.get_str("general.name").unwrap(), "tiny ✓");
        assert_eq!(g.get("test.i8"), Some(&GgufValue::I8(-7)));
        assert_eq!(g.get("test.i16"), Some(&GgufValue::I16(-300)));
        assert_eq!(g.get("llama.attention.head_count"), Some(&GgufValue::U16(4)));
        assert_eq!(g.get_u64("llama.rope.dimension_count").unwrap(), 16);
        assert_eq!(g.get_u64("llama.feed_forward_length").unwrap(), FFN as u64);
        assert_eq!(g.get_f64("llama.attention.layer_norm_rms_epsilon").unwrap(), 1e-5f32 as f64);
        assert!(g.get_bool("tokenizer.ggml.add_bos_token").unwrap());
        let toks = g.get_str_array("tokenizer.ggml.tokens").unwrap();
        assert_eq!((toks.len(), toks[7].as_str()), (VOCAB, "tok7"));
        assert_eq!(&g.get_i32_array("tokenizer.ggml.token_type").unwrap()[..4], &[3, 3, 3, 1]);
        assert_eq!(g.get("test.u8_array"), Some(&GgufValue::Array(GgufArray::U8(vec![1, 255]))));
        assert_eq!(g.get_f32_array("test.f32_array").unwrap(), &[0.5, -2.0]);
        assert_eq!(g.get("test.bool_array"), Some(&GgufValue::Array(GgufArray::Bool(vec![true, false]))));
        assert_eq!(g.get("test.u64_array"), Some(&GgufValue::Array(GgufArray::U64(vec![u64::MAX]))));
        assert_eq!(
            g.get("test.nested"),
            Some(&GgufValue::Array(GgufArray::Array(vec![
                GgufArray::U32(vec![1, 2]),
                GgufArray::String(vec!["a".into(), "".into()]),
                GgufArray::Array(vec![GgufArray::F64(vec![-1.5])]),
            ])))
        );
        // Accessor errors name the file and key.
        let e = g.get_u64("general.name").unwrap_err().to_string();
        assert!(e.contains("general.name") && e.contains("string") && e.contains(&*p.to_string_lossy()), "{e}");
        let e = g.get_u64("tokenizer.ggml.tokens").unwrap_err().to_string();
        assert!(e.contains("is array of string (40 elements), expected a non-negative integer"), "{e}");
        let e = g.get_str("no.such.key").unwrap_err().to_string();
        assert!(e.contains("missing metadata key no.such.key"), "{e}");
        let e = g.tensor_f32("extra.iq2").unwrap_err().to_string();
        assert!(e.contains("extra.iq2") && e.contains("IQ2_XXS") && e.contains("not supported"), "{e}");
        let e = g.tensor_f32("nope").unwrap_err().to_string();
        assert!(e.contains("missing tensor nope"), "{e}");
        let info = g.tensor_info("blk.0.attn_k.weight").unwrap();
        assert_eq!(
            (info.ggml_type, info.ne.as_slice(), info.shape()),
            (GgmlType::Q4_1, &[64u64, 32][..], vec![32, 64])
        );

        // Every tensor dequantizes to exactly the values its blocks encode.
        for (name, (shape, y)) in &m.expected {
            let (s2, v) = g.tensor_f32(name).unwrap();
            assert_eq!(&s2, shape, "{name}");
            assert!(v.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}");
        }

        // Version 2 has the same layout.
        let mut v2 = w.bytes.clone();
        v2[4..8].copy_from_slice(&2u32.to_le_bytes());
        let g2 = GgufFile::open(&dir.write("tiny-v2.gguf", &v2)).unwrap();
        assert_eq!((g2.version(), g2.metadata(), g2.tensors()), (2, g.metadata(), g.tensors()));

        let (cfg, wts, _) = load_gguf_llama::<f32>(&p).unwrap();
        assert_eq!(
            (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers),
            (VOCAB, HIDDEN, FFN, LAYERS)
        );
        assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), (HEADS, KV_HEADS, HEAD_DIM));
        assert_eq!((cfg.rope_theta, cfg.rms_norm_eps, cfg.max_seq_len), (500000.0, 1e-5f32 as f64, 256));
        assert_eq!(cfg.rope_layout, RopeLayout::Interleaved);
        assert_eq!((cfg.tie_word_embeddings, cfg.attention_bias, cfg.mlp_bias), (tied, false, false));
        assert_eq!(wts.lm_head.is_none(), tied);
        let params = wts.params();
        assert_eq!(params.len(), m.expected.len());
        for p in &params {
            let (shape, y) = &m.expected[&p.name];
            assert_eq!(&p.shape, shape, "{}", p.name);
            assert!(p.data.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()), "{}", p.name);
        }
        let (_, w64, _) = load_gguf_llama::<f64>(&p).unwrap();
        for p in w64.params() {
            let (_, y) = &m.expected[&p.name];
            assert!(p.data.iter().zip(y).all(|(a, b)| *a == *b as f64), "{}", p.name);
        }
        // Spot check of naming: the q projection of layer 1 and the final norm.
        assert_eq!(wts.layers[1].q_proj.weight.name, "blk.1.attn_q.weight");
        assert_eq!(wts.layers[0].down_proj.weight.shape, vec![HIDDEN, FFN]);
        assert_eq!(wts.final_norm.name, "output_norm.weight");
    }
}

#[test]
fn truncation_anywhere_is_an_error() {
    let dir = TempDir::new("trunc");
    let m = tiny_model(false);
    let w = write_gguf(&m.meta, &m.tensors);
    assert!(GgufFile::open(&dir.write("ok.gguf", &w.bytes)).is_ok());
    let mut cuts: Vec<usize> = (0..=w.data_offset).collect();
    cuts.extend((w.data_offset..w.data_end).step_by(97));
    cuts.push(w.data_end - 1);
    for &cut in &cuts {
        let msg = open_err_opt(&dir, &w.bytes[..cut], "", cut % 16 == 0);
        let kind = ["truncated", "empty file", "not a GGUF file", "past the end", "cannot fit", "exceeds"];
        assert!(kind.iter().any(|k| msg.contains(k)), "cut at {cut}: {msg}");
    }
    eprintln!("{} truncations rejected (header region {} bytes)", cuts.len(), w.data_offset);
}

#[test]
fn absurd_header_fields_are_errors() {
    let dir = TempDir::new("header");
    let m = tiny_model(false);
    let w = write_gguf(&m.meta, &m.tensors);
    let patched = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = w.bytes.clone();
        f(&mut b);
        b
    };
    open_err(&dir, &patched(&|b| b[..4].copy_from_slice(b"GGML")), "not a GGUF file");
    open_err(&dir, b"GG", "not a GGUF file");
    open_err(&dir, &patched(&|b| put_u32_at(b, 4, 1)), "version 1 is not supported");
    open_err(&dir, &patched(&|b| put_u32_at(b, 4, 99)), "unsupported GGUF version 99");
    open_err(&dir, &patched(&|b| put_u32_at(b, 4, 3u32.swap_bytes())), "big-endian");
    open_err(&dir, &patched(&|b| put_u64_at(b, 8, u64::MAX)), "tensor count 18446744073709551615");
    open_err(&dir, &patched(&|b| put_u64_at(b, 16, 1 << 40)), "metadata count 1099511627776");
    // Off-by-one counts read into the next section and fail somewhere; never succeed.
    let n_t = m.tensors.len() as u64;
    open_err(&dir, &patched(&|b| put_u64_at(b, 8, n_t + 1)), "");
    open_err(&dir, &patched(&|b| put_u64_at(b, 16, m.meta.len() as u64 + 1)), "");
    // Both counts plausible on their own, together too large for the file.
    let rem = (w.bytes.len() - 24) as u64;
    open_err(
        &dir,
        &patched(&|b| {
            put_u64_at(b, 8, rem / 24);
            put_u64_at(b, 16, rem / 13);
        }),
        "cannot fit",
    );
}

#[test]
fn absurd_metadata_is_an_error() {
    let dir = TempDir::new("meta");
    let m = tiny_model(false);
    let w = write_gguf(&m.meta, &m.tensors);
    let kv = |k: &str| w.kv[k];
    let patched = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = w.bytes.clone();
        f(&mut b);
        b
    };
    let name = kv("general.name");
    open_err(&dir, &patched(&|b| put_u64_at(b, name.key_len, 1 << 62)), "string length 4611686018427387904");
    open_err(&dir, &patched(&|b| put_u64_at(b, name.value, 1 << 62)), "string length 4611686018427387904");
    open_err(&dir, &patched(&|b| put_u64_at(b, name.value, u64::MAX)), "string length");
    open_err(&dir, &patched(&|b| b[name.value + 8] = 0xFF), "not valid UTF-8");
    open_err(&dir, &patched(&|b| put_u32_at(b, name.ty, 13)), "unknown value type 13");
    open_err(&dir, &patched(&|b| put_u32_at(b, name.ty, u32::MAX)), "unknown value type");
    let toks = kv("tokenizer.ggml.tokens");
    open_err(&dir, &patched(&|b| put_u64_at(b, toks.value + 4, 1 << 61)), "array of 2305843009213693952 string");
    open_err(&dir, &patched(&|b| put_u64_at(b, toks.value + 4, u64::MAX)), "more than 2^64");
    open_err(&dir, &patched(&|b| put_u32_at(b, toks.value, 99)), "array element type 99");
    // An array of u8 whose length is the remaining bytes plus one.
    let u8a = kv("test.u8_array");
    let too_long = (w.bytes.len() - u8a.value - 12 + 1) as u64;
    open_err(&dir, &patched(&|b| put_u64_at(b, u8a.value + 4, too_long)), "array of");
    let bools = kv("test.bool_array");
    open_err(&dir, &patched(&|b| b[bools.value + 12] = 2), "bool byte 2");
    let bos = kv("tokenizer.ggml.add_bos_token");
    open_err(&dir, &patched(&|b| b[bos.value] = 7), "bool byte 7");
    let align = kv("general.alignment");
    open_err(&dir, &patched(&|b| put_u32_at(b, align.value, 3)), "general.alignment = 3 is not a power of two");
    open_err(&dir, &patched(&|b| put_u32_at(b, align.value, 0)), "general.alignment = 0 is not a power of two");
    // Misdeclared nested array: a u32 element array claiming 2^60 elements.
    let nested = kv("test.nested");
    open_err(&dir, &patched(&|b| put_u64_at(b, nested.value + 12 + 4, 1 << 60)), "array of 1152921504606846976 u32");

    // Arrays nested 1000 deep.
    let mut deep = Meta::Arr(0, vec![]);
    for _ in 0..1000 {
        deep = Meta::Arr(9, vec![deep]);
    }
    let mut meta = m.meta.clone();
    meta.push(("test.deep".into(), deep));
    open_err(&dir, &write_gguf(&meta, &m.tensors).bytes, "nested more than 8 deep");
    // Duplicate key; alignment of the wrong type.
    let mut meta = m.meta.clone();
    meta.push(("general.name".into(), s("again")));
    open_err(&dir, &write_gguf(&meta, &m.tensors).bytes, "duplicate metadata key general.name");
    let mut meta = m.meta.clone();
    meta[2].1 = Meta::U64(32);
    open_err(&dir, &write_gguf(&meta, &m.tensors).bytes, "general.alignment is u64 32, expected u32");
}

#[test]
fn absurd_tensor_infos_are_errors() {
    let dir = TempDir::new("tinfo");
    let m = tiny_model(false);
    let w = write_gguf(&m.meta, &m.tensors);
    let patched = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = w.bytes.clone();
        f(&mut b);
        b
    };
    let q = w.ti["blk.0.attn_q.weight"];
    open_err(&dir, &patched(&|b| put_u32_at(b, q.n_dims, 100)), "n_dims = 100");
    open_err(&dir, &patched(&|b| put_u32_at(b, q.n_dims, 5)), "n_dims = 5");
    open_err(
        &dir,
        &patched(&|b| {
            put_u64_at(b, q.dims, 1 << 40);
            put_u64_at(b, q.dims + 8, 1 << 40);
        }),
        "overflow",
    );
    open_err(&dir, &patched(&|b| put_u64_at(b, q.dims + 8, 1 << 40)), "extends past the end");
    open_err(&dir, &patched(&|b| put_u64_at(b, q.dims, 33)), "not a multiple of the Q4_0 block size 32");
    open_err(&dir, &patched(&|b| put_u32_at(b, q.ty, 999)), "unknown ggml type 999");
    open_err(&dir, &patched(&|b| put_u32_at(b, q.ty, 4)), "unknown ggml type 4");
    open_err(&dir, &patched(&|b| put_u64_at(b, q.offset, 1 << 50)), "extends past the end");
    open_err(&dir, &patched(&|b| put_u64_at(b, q.offset, u64::MAX - 31)), "extends past the end");
    let off = u64::from_le_bytes(w.bytes[q.offset..q.offset + 8].try_into().unwrap());
    open_err(&dir, &patched(&|b| put_u64_at(b, q.offset, off + 1)), "not a multiple of the alignment 32");
    // The last tensor's data one byte short.
    open_err(&dir, &w.bytes[..w.data_end - 1], "extends past the end");
    // Duplicate tensor name.
    let mut tensors = m.tensors.clone();
    tensors.push(tensors[1].clone());
    open_err(&dir, &write_gguf(&m.meta, &tensors).bytes, "duplicate tensor name blk.0.attn_norm.weight");
}

#[test]
fn inconsistent_models_are_load_errors() {
    let dir = TempDir::new("load");
    let m = tiny_model(false);
    let with_meta = |k: &str, v: Option<Meta>| {
        let mut meta = m.meta.clone();
        meta.retain(|(k2, _)| k2 != k);
        if let Some(v) = v {
            meta.push((k.into(), v));
        }
        write_gguf(&meta, &m.tensors).bytes
    };
    load_err(&dir, &with_meta("general.architecture", Some(s("qwen2"))), &["\"qwen2\"", "only \"llama\""]);
    load_err(&dir, &with_meta("general.architecture", None), &["missing metadata key general.architecture"]);
    load_err(&dir, &with_meta("llama.block_count", None), &["missing metadata key llama.block_count"]);
    load_err(
        &dir,
        &with_meta("llama.block_count", Some(s("2"))),
        &["llama.block_count is string \"2\", expected a non-negative integer"],
    );
    load_err(&dir, &with_meta("llama.block_count", Some(Meta::I32(-2))), &["llama.block_count is i32 -2"]);
    load_err(
        &dir,
        &with_meta("llama.block_count", Some(Meta::U64(1 << 20))),
        &["missing tensor blk.2.attn_norm.weight"],
    );
    load_err(
        &dir,
        &with_meta("llama.feed_forward_length", Some(Meta::U64(1 << 23))),
        &["blk.0.ffn_gate.weight has shape"],
    );
    load_err(&dir, &with_meta("llama.rope.dimension_count", Some(Meta::U32(8))), &["partial RoPE"]);
    load_err(&dir, &with_meta("llama.rope.scaling.type", Some(s("yarn"))), &["yarn", "not supported"]);
    load_err(&dir, &with_meta("llama.attention.head_count_kv", Some(Meta::U32(3))), &["not a multiple"]);
    load_err(&dir, &with_meta("llama.embedding_length", Some(Meta::U32(32))), &["token_embd.weight", "[vocab, 32]"]);
    load_err(&dir, &with_meta("llama.vocab_size", Some(Meta::U32(41))), &["llama.vocab_size (41)"]);

    let with_tensors = |f: &dyn Fn(&mut Vec<Tensor>)| {
        let mut t = m.tensors.clone();
        f(&mut t);
        write_gguf(&m.meta, &t).bytes
    };
    load_err(
        &dir,
        &with_tensors(&|t| t.retain(|t| t.name != "blk.1.ffn_up.weight")),
        &["missing tensor blk.1.ffn_up.weight"],
    );
    load_err(
        &dir,
        &with_tensors(&|t| t.retain(|t| t.name != "token_embd.weight")),
        &["missing tensor token_embd.weight"],
    );
    load_err(
        &dir,
        &with_tensors(&|t| {
            let n = t.iter_mut().find(|t| t.name == "blk.0.ffn_norm.weight").unwrap();
            n.ne = vec![32];
            n.data.truncate(32 * 4);
        }),
        &["tensor blk.0.ffn_norm.weight has shape [32]", "expected [64]"],
    );
    for bad in [f32::NAN, f32::INFINITY] {
        load_err(
            &dir,
            &with_tensors(&|t| {
                let n = t.iter_mut().find(|t| t.name == "blk.1.attn_norm.weight").unwrap();
                n.data[12..16].copy_from_slice(&bad.to_le_bytes());
            }),
            &["tensor blk.1.attn_norm.weight", "non-finite value", "index 3"],
        );
    }
    // A NaN f16 scale in a Q8_0 block.
    load_err(
        &dir,
        &with_tensors(&|t| {
            let n = t.iter_mut().find(|t| t.name == "blk.1.attn_output.weight").unwrap();
            n.data[34..36].copy_from_slice(&f16::NAN.to_le_bytes());
        }),
        &["tensor blk.1.attn_output.weight", "non-finite"],
    );
    // A required tensor of a type that cannot be dequantized.
    load_err(
        &dir,
        &with_tensors(&|t| {
            let n = t.iter_mut().find(|t| t.name == "output_norm.weight").unwrap();
            n.ty = 27; // I64: 8 bytes per value
            n.data = vec![0; HIDDEN * 8];
        }),
        &["tensor output_norm.weight", "I64", "not supported"],
    );
    load_err(
        &dir,
        &with_tensors(&|t| t.push(Tensor { name: "rope_freqs.weight".into(), ne: vec![8], ty: 0, data: vec![0; 32] })),
        &["rope_freqs.weight", "not supported"],
    );
}

#[test]
fn files_that_are_not_files() {
    let dir = TempDir::new("notfile");
    let missing = dir.0.join("missing.gguf");
    let e = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("missing.gguf"), "{e}");
    let e = GgufFile::open(&dir.0).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let e = GgufFile::open(&dir.write("empty.gguf", b"")).unwrap_err().to_string();
    assert!(e.contains("empty file") && e.contains("empty.gguf"), "{e}");
    let _ = Path::new("");
}
