//! GGUF files (llama.cpp's model format): a validating reader, dequantization to f32, and a
//! Llama loader.
//!
//! Source: the GGUF specification (ggml `docs/gguf.md`), the block layouts of ggml's
//! `ggml-common.h`, and llama.cpp's `gguf-py` (`gguf/quants.py`, `gguf/constants.py`).
//!
//! File layout (all integers little-endian):
//!
//! ```text
//! magic "GGUF" | version u32 (2 or 3) | tensor_count u64 | metadata_kv_count u64
//! metadata_kv_count × { key: string, value_type u32, value }
//! tensor_count × { name: string, n_dims u32, ne[n_dims] u64, ggml_type u32, offset u64 }
//! padding to general.alignment (default 32)
//! tensor data: each tensor at data_start + offset (in order, each padded to the alignment)
//! ```
//!
//! where `string = { len u64, len bytes of UTF-8 }` and array values are
//! `{ element_type u32, len u64, len elements }` (arrays may nest).
//!
//! - [`GgufFile::open`] parses and validates everything except the tensor values: every count,
//!   length, size and offset is checked against the bytes that remain before it is used, so a
//!   truncated or hostile file gives [`crate::Error::BadInput`] naming the file and what is wrong,
//!   never a panic; no buffer is reserved for more elements than the remaining bytes could
//!   encode, so allocations stay within a small constant factor of the file's size. The tensor
//!   data stays memory-mapped.
//! - [`GgufFile::tensor_f32`] dequantizes one tensor (see [`GgmlType`] for the supported types).
//! - [`load_gguf_llama`] builds a [`LlamaConfig`] + [`LlamaWeights`] (tensors keep their GGUF
//!   names) from a `general.architecture = "llama"` file.

use super::bytes::Bytes;
use crate::linalg::Scalar;
use crate::model::{Linear, LlamaConfig, LlamaWeights, RopeLayout};
use crate::{Error, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data-section alignment when `general.alignment` is absent (GGUF spec).
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// Most tensor dimensions GGUF allows (`GGML_MAX_DIMS`).
pub const GGUF_MAX_DIMS: usize = 4;
/// Deepest nesting of array values accepted (an array of arrays is depth 2).
pub const GGUF_MAX_ARRAY_DEPTH: usize = 8;

/// Smallest encoding of a tensor info: empty name (8), `n_dims = 0` (4), type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;
/// Smallest encoding of a metadata entry: empty key (8), type (4), a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest encoding of a nested array: element type (4) and length (8).
const MIN_ARRAY_BYTES: u64 = 4 + 8;

// Metadata value types (GGUF spec `gguf_metadata_value_type`).
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// Initial capacity for `count` elements of type `X` read from `remaining` bytes: never more
/// memory than the bytes that remain (a hostile count cannot reserve more than the file's size;
/// vectors still grow as elements are actually parsed).
fn capacity_for<X>(count: u64, remaining: u64) -> usize {
    count.min(remaining / std::mem::size_of::<X>().max(1) as u64) as usize
}

/// Name of a metadata value type id, for messages.
fn value_type_name(t: u32) -> String {
    match t {
        T_U8 => "u8".into(),
        T_I8 => "i8".into(),
        T_U16 => "u16".into(),
        T_I16 => "i16".into(),
        T_U32 => "u32".into(),
        T_I32 => "i32".into(),
        T_F32 => "f32".into(),
        T_BOOL => "bool".into(),
        T_STRING => "string".into(),
        T_ARRAY => "array".into(),
        T_U64 => "u64".into(),
        T_I64 => "i64".into(),
        T_F64 => "f64".into(),
        other => format!("unknown type {other}"),
    }
}

/// Fewest bytes one value of type `t` occupies; `None` for an unknown type.
fn min_value_bytes(t: u32) -> Option<u64> {
    Some(match t {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 => 8,
        T_STRING => 8,
        T_ARRAY => MIN_ARRAY_BYTES,
        _ => return None,
    })
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// `uint8` (type 0).
    U8(u8),
    /// `int8` (type 1).
    I8(i8),
    /// `uint16` (type 2).
    U16(u16),
    /// `int16` (type 3).
    I16(i16),
    /// `uint32` (type 4).
    U32(u32),
    /// `int32` (type 5).
    I32(i32),
    /// `float32` (type 6).
    F32(f32),
    /// `bool` (type 7): one byte, 0 or 1.
    Bool(bool),
    /// `string` (type 8): UTF-8.
    String(String),
    /// `array` (type 9).
    Array(GgufArray),
    /// `uint64` (type 10).
    U64(u64),
    /// `int64` (type 11).
    I64(i64),
    /// `float64` (type 12).
    F64(f64),
}

/// An array metadata value: all elements share one type, stored unboxed.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    /// `uint8` elements.
    U8(Vec<u8>),
    /// `int8` elements.
    I8(Vec<i8>),
    /// `uint16` elements.
    U16(Vec<u16>),
    /// `int16` elements.
    I16(Vec<i16>),
    /// `uint32` elements.
    U32(Vec<u32>),
    /// `int32` elements.
    I32(Vec<i32>),
    /// `float32` elements.
    F32(Vec<f32>),
    /// `bool` elements.
    Bool(Vec<bool>),
    /// `string` elements.
    String(Vec<String>),
    /// Nested arrays (each with its own element type and length).
    Array(Vec<GgufArray>),
    /// `uint64` elements.
    U64(Vec<u64>),
    /// `int64` elements.
    I64(Vec<i64>),
    /// `float64` elements.
    F64(Vec<f64>),
}

impl GgufArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's name (`"u8"`, …, `"string"`, `"array"`).
    pub fn element_type_name(&self) -> &'static str {
        match self {
            GgufArray::U8(_) => "u8",
            GgufArray::I8(_) => "i8",
            GgufArray::U16(_) => "u16",
            GgufArray::I16(_) => "i16",
            GgufArray::U32(_) => "u32",
            GgufArray::I32(_) => "i32",
            GgufArray::F32(_) => "f32",
            GgufArray::Bool(_) => "bool",
            GgufArray::String(_) => "string",
            GgufArray::Array(_) => "array",
            GgufArray::U64(_) => "u64",
            GgufArray::I64(_) => "i64",
            GgufArray::F64(_) => "f64",
        }
    }
}

impl GgufValue {
    /// The type's name: `"u8"`, …, `"string"`, or `"array of <element type>"`.
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::U8(_) => "u8".into(),
            GgufValue::I8(_) => "i8".into(),
            GgufValue::U16(_) => "u16".into(),
            GgufValue::I16(_) => "i16".into(),
            GgufValue::U32(_) => "u32".into(),
            GgufValue::I32(_) => "i32".into(),
            GgufValue::F32(_) => "f32".into(),
            GgufValue::Bool(_) => "bool".into(),
            GgufValue::String(_) => "string".into(),
            GgufValue::Array(a) => format!("array of {}", a.element_type_name()),
            GgufValue::U64(_) => "u64".into(),
            GgufValue::I64(_) => "i64".into(),
            GgufValue::F64(_) => "f64".into(),
        }
    }

    /// Type and a short preview of the value, for messages: `u32 7`, `string "abc…"`,
    /// `array of string (49152 elements)`.
    pub fn describe(&self) -> String {
        match self {
            GgufValue::String(s) => {
                let short: String = s.chars().take(40).collect();
                let more = if short.len() < s.len() { "…" } else { "" };
                format!("string {short:?}{more}")
            }
            GgufValue::Array(a) => format!("array of {} ({} elements)", a.element_type_name(), a.len()),
            GgufValue::U8(x) => format!("u8 {x}"),
            GgufValue::I8(x) => format!("i8 {x}"),
            GgufValue::U16(x) => format!("u16 {x}"),
            GgufValue::I16(x) => format!("i16 {x}"),
            GgufValue::U32(x) => format!("u32 {x}"),
            GgufValue::I32(x) => format!("i32 {x}"),
            GgufValue::U64(x) => format!("u64 {x}"),
            GgufValue::I64(x) => format!("i64 {x}"),
            GgufValue::F32(x) => format!("f32 {x}"),
            GgufValue::F64(x) => format!("f64 {x}"),
            GgufValue::Bool(x) => format!("bool {x}"),
        }
    }

    /// The value as a non-negative integer: any integer type holding a value ≥ 0.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(x) => Some(x as u64),
            GgufValue::U16(x) => Some(x as u64),
            GgufValue::U32(x) => Some(x as u64),
            GgufValue::U64(x) => Some(x),
            GgufValue::I8(x) => u64::try_from(x).ok(),
            GgufValue::I16(x) => u64::try_from(x).ok(),
            GgufValue::I32(x) => u64::try_from(x).ok(),
            GgufValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// The value as f64: a float (f32 widened exactly) or an integer (rounded above 2^53).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(x) => Some(x as f64),
            GgufValue::F64(x) => Some(x),
            GgufValue::I8(x) => Some(x as f64),
            GgufValue::I16(x) => Some(x as f64),
            GgufValue::I32(x) => Some(x as f64),
            GgufValue::I64(x) => Some(x as f64),
            _ => self.as_u64().map(|x| x as f64),
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A ggml tensor element type: id as stored in the file (`ggml_type` in `ggml.h`), block size
/// (elements per block) and type size (bytes per block) as in ggml's type traits.
///
/// [`GgufFile::open`] accepts every type listed here (so it can check each tensor's byte
/// extent); [`GgufFile::tensor_f32`] dequantizes F32, F16, BF16, F64, I8, I16, I32, Q4_0, Q4_1,
/// Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K, and reports the others (the IQ*,
/// TQ*, MXFP4, NVFP4, Q1_0, Q8_1 and I64 types) as unsupported. Ids 4, 5 and 31–33, 36–38 are
/// types removed from ggml and are rejected as unknown.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// IEEE f32.
    F32 = 0,
    /// IEEE f16.
    F16 = 1,
    /// 32 elements: f16 scale `d`, 16 bytes of 4-bit `q`; `x = d·(q − 8)`.
    Q4_0 = 2,
    /// 32 elements: f16 `d`, f16 `m`, 16 bytes of 4-bit `q`; `x = d·q + m`.
    Q4_1 = 3,
    /// 32 elements: f16 `d`, 32 high bits, 16 bytes of low nibbles; `x = d·(q − 16)`.
    Q5_0 = 6,
    /// 32 elements: f16 `d`, f16 `m`, 32 high bits, 16 bytes of low nibbles; `x = d·q + m`.
    Q5_1 = 7,
    /// 32 elements: f16 `d`, 32 × i8 `q`; `x = d·q`.
    Q8_0 = 8,
    /// 32 elements: f16 `d`, f16 sum, 32 × i8 (an activation type; not dequantized here).
    Q8_1 = 9,
    /// 256-element super-block of 16 × 16, 2-bit quants with 4-bit scales and mins.
    Q2_K = 10,
    /// 256-element super-block of 16 × 16, 3-bit quants with 6-bit scales.
    Q3_K = 11,
    /// 256-element super-block of 8 × 32, 4-bit quants with 6-bit scales and mins.
    Q4_K = 12,
    /// 256-element super-block of 8 × 32, 5-bit quants with 6-bit scales and mins.
    Q5_K = 13,
    /// 256-element super-block of 16 × 16, 6-bit quants with i8 scales.
    Q6_K = 14,
    /// 256 elements: f32 `d`, 256 × i8, 16 × i16 block sums; `x = d·q`.
    Q8_K = 15,
    /// Importance-matrix 2-bit type (not dequantized here).
    IQ2_XXS = 16,
    /// Importance-matrix 2-bit type (not dequantized here).
    IQ2_XS = 17,
    /// Importance-matrix 3-bit type (not dequantized here).
    IQ3_XXS = 18,
    /// Importance-matrix 1-bit type (not dequantized here).
    IQ1_S = 19,
    /// Non-linear 4-bit type (not dequantized here).
    IQ4_NL = 20,
    /// Importance-matrix 3-bit type (not dequantized here).
    IQ3_S = 21,
    /// Importance-matrix 2-bit type (not dequantized here).
    IQ2_S = 22,
    /// Non-linear 4-bit super-block type (not dequantized here).
    IQ4_XS = 23,
    /// i8.
    I8 = 24,
    /// i16.
    I16 = 25,
    /// i32.
    I32 = 26,
    /// i64 (not dequantized here).
    I64 = 27,
    /// IEEE f64.
    F64 = 28,
    /// Importance-matrix 1-bit type (not dequantized here).
    IQ1_M = 29,
    /// bfloat16.
    BF16 = 30,
    /// Ternary type (not dequantized here).
    TQ1_0 = 34,
    /// Ternary type (not dequantized here).
    TQ2_0 = 35,
    /// Microscaling FP4 (not dequantized here).
    MXFP4 = 39,
    /// NVIDIA FP4 (not dequantized here).
    NVFP4 = 40,
    /// 1-bit type (not dequantized here).
    Q1_0 = 41,
}

const QK_K: usize = 256;

impl GgmlType {
    /// The type with file id `id`, or `None` for an unknown (or removed) id.
    pub fn from_u32(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            40 => NVFP4,
            41 => Q1_0,
            _ => return None,
        })
    }

    /// `(elements per block, bytes per block)`, as ggml's `blck_size` and `type_size`.
    pub fn block_layout(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            F64 | I64 => (1, 8),
            I8 => (1, 1),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 2 + 2 + 32),
            Q2_K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            Q3_K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            Q4_K => (QK_K, 2 + 2 + QK_K / 2 + 12),
            Q5_K => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            Q6_K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            Q8_K => (QK_K, 4 + QK_K + QK_K / 8),
            IQ2_XXS => (QK_K, 2 + QK_K / 4),
            IQ2_XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ3_XXS => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            IQ1_S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ4_NL => (32, 2 + 16),
            IQ3_S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ2_S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ4_XS => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            IQ1_M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            TQ1_0 => (QK_K, 2 + 4 * 13),
            TQ2_0 => (QK_K, 2 + 64),
            MXFP4 => (32, 1 + 16),
            NVFP4 => (64, 4 + 32),
            Q1_0 => (128, 2 + 16),
        }
    }

    /// True when [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | F64
                | I8
                | I16
                | I32
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2_K
                | Q3_K
                | Q4_K
                | Q5_K
                | Q6_K
                | Q8_K
        )
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// Where and how one tensor is stored, as read from its tensor info (validated by
/// [`GgufFile::open`]: dims product fits, row length a multiple of the block size, offset
/// aligned, data inside the file).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    /// Name (e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// ggml `ne`: dimensions innermost (contiguous) first; `ne[0]` is the row length.
    pub ne: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Byte offset of the data from the start of the data section.
    pub offset: u64,
    /// Number of elements, `Π ne`.
    pub n_elements: usize,
    /// Number of bytes of data, `n_elements / block_size · type_size`.
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    /// Shape outermost first (row-major, `ne` reversed): a GGUF linear weight with
    /// `ne = [in, out]` has shape `[out, in]`.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file: metadata in file order, tensor infos in file order, and the memory-mapped
/// file holding the tensor data.
pub struct GgufFile {
    path: String,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
    mmap: Bytes,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::bad(self.file, msg)
    }

    /// The next `n` bytes; `what` (evaluated only on failure) says what they are.
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated GGUF file: {} needs {n} bytes at offset {} but only {} remain (file is {} bytes)",
                what(),
                self.pos,
                self.remaining(),
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A GGUF string: u64 length, then that many bytes of UTF-8.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        if len > self.remaining() {
            return Err(self.err(format!(
                "{}: string length {len} at offset {} exceeds the {} bytes left in the file (truncated or corrupt)",
                what(),
                self.pos - 8,
                self.remaining()
            )));
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.err(format!("{} is not valid UTF-8: {e}", what())))
    }

    /// Metadata value of type `t` for `key`; `depth` counts enclosing arrays.
    fn value(&mut self, t: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let w = || format!("value of metadata {key}");
        Ok(match t {
            T_U8 => GgufValue::U8(self.array::<1>(&w)?[0]),
            T_I8 => GgufValue::I8(i8::from_le_bytes(self.array(&w)?)),
            T_U16 => GgufValue::U16(u16::from_le_bytes(self.array(&w)?)),
            T_I16 => GgufValue::I16(i16::from_le_bytes(self.array(&w)?)),
            T_U32 => GgufValue::U32(u32::from_le_bytes(self.array(&w)?)),
            T_I32 => GgufValue::I32(i32::from_le_bytes(self.array(&w)?)),
            T_F32 => GgufValue::F32(f32::from_le_bytes(self.array(&w)?)),
            T_U64 => GgufValue::U64(u64::from_le_bytes(self.array(&w)?)),
            T_I64 => GgufValue::I64(i64::from_le_bytes(self.array(&w)?)),
            T_F64 => GgufValue::F64(f64::from_le_bytes(self.array(&w)?)),
            T_BOOL => {
                let b = self.array::<1>(&w)?[0];
                GgufValue::Bool(bool_byte(b).ok_or_else(|| {
                    self.err(format!("metadata {key}: bool byte {b} at offset {} is neither 0 nor 1", self.pos - 1))
                })?)
            }
            T_STRING => GgufValue::String(self.string(&w)?),
            T_ARRAY => GgufValue::Array(self.array_value(key, depth + 1)?),
            other => {
                return Err(self.err(format!("metadata {key}: unknown value type {other} at offset {}", self.pos - 4)))
            }
        })
    }

    /// An array value (element type, length, elements) at nesting depth `depth` (≥ 1).
    fn array_value(&mut self, key: &str, depth: usize) -> Result<GgufArray> {
        if depth > GGUF_MAX_ARRAY_DEPTH {
            return Err(self.err(format!(
                "metadata {key}: arrays nested more than {GGUF_MAX_ARRAY_DEPTH} deep (at offset {})",
                self.pos
            )));
        }
        let et = self.u32(&|| format!("element type of array {key}"))?;
        let len = self.u64(&|| format!("length of array {key}"))?;
        let min = min_value_bytes(et).ok_or_else(|| {
            self.err(format!("metadata {key}: array element type {et} at offset {} is unknown", self.pos - 12))
        })?;
        let need = len.checked_mul(min);
        if need.is_none_or(|n| n > self.remaining()) {
            return Err(self.err(format!(
                "metadata {key}: array of {len} {} elements needs {} bytes but only {} remain after offset {} \
                 (truncated or corrupt)",
                value_type_name(et),
                need.map_or_else(|| "more than 2^64".to_string(), |n| format!("at least {n}")),
                self.remaining(),
                self.pos
            )));
        }
        // `len · min ≤ remaining`: fixed-size elements take as many bytes in memory as in the file;
        // the other capacities are capped by `capacity_for`.
        let n = len as usize;
        let rem = self.remaining();
        let w = || format!("elements of array {key}");
        fn fixed<const N: usize, X>(bytes: &[u8], f: fn([u8; N]) -> X) -> Vec<X> {
            bytes
                .chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect()
        }
        Ok(match et {
            T_U8 => GgufArray::U8(self.take(len, &w)?.to_vec()),
            T_I8 => GgufArray::I8(fixed(self.take(len, &w)?, i8::from_le_bytes)),
            T_U16 => GgufArray::U16(fixed(self.take(len * 2, &w)?, u16::from_le_bytes)),
            T_I16 => GgufArray::I16(fixed(self.take(len * 2, &w)?, i16::from_le_bytes)),
            T_U32 => GgufArray::U32(fixed(self.take(len * 4, &w)?, u32::from_le_bytes)),
            T_I32 => GgufArray::I32(fixed(self.take(len * 4, &w)?, i32::from_le_bytes)),
            T_F32 => GgufArray::F32(fixed(self.take(len * 4, &w)?, f32::from_le_bytes)),
            T_U64 => GgufArray::U64(fixed(self.take(len * 8, &w)?, u64::from_le_bytes)),
            T_I64 => GgufArray::I64(fixed(self.take(len * 8, &w)?, i64::from_le_bytes)),
            T_F64 => GgufArray::F64(fixed(self.take(len * 8, &w)?, f64::from_le_bytes)),
            T_BOOL => {
                let start = self.pos;
                let bytes = self.take(len, &w)?;
                let mut v = Vec::with_capacity(n);
                for (i, &b) in bytes.iter().enumerate() {
                    v.push(bool_byte(b).ok_or_else(|| {
                        self.err(format!(
                            "metadata {key}[{i}]: bool byte {b} at offset {} is neither 0 nor 1",
                            start + i
                        ))
                    })?);
                }
                GgufArray::Bool(v)
            }
            T_STRING => {
                let mut v = Vec::with_capacity(capacity_for::<String>(len, rem));
                for i in 0..n {
                    v.push(self.string(&|| format!("metadata {key}[{i}]"))?);
                }
                GgufArray::String(v)
            }
            T_ARRAY => {
                let mut v = Vec::with_capacity(capacity_for::<GgufArray>(len, rem));
                for _ in 0..n {
                    v.push(self.array_value(key, depth + 1)?);
                }
                GgufArray::Array(v)
            }
            _ => unreachable!("min_value_bytes accepted only known types"),
        })
    }
}

fn bool_byte(b: u8) -> Option<bool> {
    match b {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    }
}

impl GgufFile {
    /// Opens, memory-maps and validates a GGUF file (versions 2 and 3, little-endian).
    ///
    /// Reads the header, every metadata entry (all value types, nested arrays up to
    /// [`GGUF_MAX_ARRAY_DEPTH`]) and every tensor info; checks `general.alignment` (a `u32`
    /// power of two, default 32), and for each tensor: at most 4 dims, a known ggml type, the
    /// dims' product fits in 64 bits, `ne[0]` a multiple of the type's block size, the offset a
    /// multiple of the alignment, the data inside the file, and the tensors stored in order without
    /// gaps or overlaps (each padded to the alignment, as llama.cpp requires). Keys and tensor
    /// names must be unique. Tensor values are not read (see [`GgufFile::tensor_f32`]).
    ///
    /// Errors: `Io` naming the path if it cannot be opened or mapped; `BadInput` naming the path
    /// and what is wrong otherwise (not a regular file, bad magic, version 1 or unknown,
    /// big-endian, truncation with the offset reached, counts or lengths that cannot fit in the
    /// remaining bytes, invalid UTF-8, a bool byte other than 0/1, unknown value or ggml types,
    /// any check above). Counts are checked against the remaining bytes before anything is
    /// allocated or looped over.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| Error::io(&name, e))?;
        let meta = file.metadata().map_err(|e| Error::io(&name, e))?;
        if !meta.is_file() {
            return Err(Error::bad(&name, "not a regular file (expected a .gguf file)"));
        }
        if meta.len() == 0 {
            return Err(Error::bad(&name, "empty file (expected a GGUF file)"));
        }
        // SAFETY: the map is read-only and lives as long as the returned value. As with every
        // memory map, truncation of the file by another process while it is mapped is outside
        // our control; every offset is validated against the map's length before use.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&name, e))?;
        Self::from_storage(name, Bytes::Mapped(mmap))
    }

    /// Parses and validates a GGUF file held in memory, exactly as [`GgufFile::open`] does a
    /// file on disk; `name` stands for the file in error messages.
    ///
    /// Errors: those of [`GgufFile::open`] after the file is read (`BadInput` naming `name`).
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<GgufFile> {
        if bytes.is_empty() {
            return Err(Error::bad(name, "empty file (expected a GGUF file)"));
        }
        Self::from_storage(name.to_string(), Bytes::Owned(bytes))
    }

    fn from_storage(name: String, mmap: Bytes) -> Result<GgufFile> {
        let parsed = parse(&name, &mmap)?;
        Ok(GgufFile {
            path: name,
            version: parsed.version,
            metadata: parsed.metadata,
            metadata_index: parsed.metadata_index,
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            mmap,
        })
    }

    /// The path as given to [`GgufFile::open`] (used in error messages).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The format version: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data-section alignment in bytes (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute byte offset of the data section (after the tensor infos, aligned).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Every metadata entry, in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// The metadata value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// True when `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.metadata_index.contains_key(key)
    }

    fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key).ok_or_else(|| Error::bad(&self.path, format!("missing metadata key {key}")))
    }

    fn wrong_type(&self, key: &str, v: &GgufValue, expected: &str) -> Error {
        Error::bad(&self.path, format!("metadata {key} is {}, expected {expected}", v.describe()))
    }

    /// `key` as a non-negative integer (any integer type). Errors: `BadInput` naming the file
    /// and key when it is missing, not an integer, or negative.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| self.wrong_type(key, v, "a non-negative integer"))
    }

    /// `key` as f64 (a float, or an integer). Errors: `BadInput` when missing or not a number.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| self.wrong_type(key, v, "a number"))
    }

    /// `key` as a bool. Errors: `BadInput` when missing or not a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong_type(key, v, "a bool"))
    }

    /// `key` as a string. Errors: `BadInput` when missing or not a string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, v, "a string"))
    }

    /// `key` as an array of strings (e.g. `tokenizer.ggml.tokens`). Errors: `BadInput` when
    /// missing or not an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        match self.require(key)? {
            GgufValue::Array(GgufArray::String(v)) => Ok(v),
            v => Err(self.wrong_type(key, v, "an array of strings")),
        }
    }

    /// `key` as an array of i32 (e.g. `tokenizer.ggml.token_type`). Errors: `BadInput` when
    /// missing or not an array of i32.
    pub fn get_i32_array(&self, key: &str) -> Result<&[i32]> {
        match self.require(key)? {
            GgufValue::Array(GgufArray::I32(v)) => Ok(v),
            v => Err(self.wrong_type(key, v, "an array of i32")),
        }
    }

    /// `key` as an array of f32 (e.g. `tokenizer.ggml.scores`). Errors: `BadInput` when
    /// missing or not an array of f32.
    pub fn get_f32_array(&self, key: &str) -> Result<&[f32]> {
        match self.require(key)? {
            GgufValue::Array(GgufArray::F32(v)) => Ok(v),
            v => Err(self.wrong_type(key, v, "an array of f32")),
        }
    }

    /// Every tensor info, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name`, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw (still quantized) bytes of tensor `name`. Errors: `BadInput` naming the file
    /// and the tensor when it is absent.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info_or_err(name)?;
        Ok(self.bytes_of(info))
    }

    fn info_or_err(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name).ok_or_else(|| Error::bad(&self.path, format!("missing tensor {name}")))
    }

    fn bytes_of(&self, info: &GgufTensorInfo) -> &[u8] {
        // In bounds: checked by `parse`.
        let start = (self.data_offset + info.offset) as usize;
        &self.mmap[start..start + info.n_bytes]
    }

    /// Tensor `name` dequantized to f32: `(shape, values)` with `shape` outermost first (ggml
    /// `ne` reversed) and `values` row-major, bit-identical to gguf-py's
    /// `gguf.quants.dequantize` (same f32 operations in the same order).
    ///
    /// Errors: `BadInput` naming the file and the tensor when it is absent or its type cannot
    /// be dequantized ([`GgmlType::can_dequantize`]). Values are not checked for finiteness.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.info_or_err(name)?;
        if !info.ggml_type.can_dequantize() {
            return Err(Error::bad(
                &self.path,
                format!("tensor {name}: ggml type {} is not supported for dequantization", info.ggml_type),
            ));
        }
        let mut out = vec![0f32; info.n_elements];
        dequantize_into(info.ggml_type, self.bytes_of(info), &mut out)
            .map_err(|m| Error::bad(&self.path, format!("tensor {name}: {m}")))?;
        Ok((info.shape(), out))
    }
}

/// What [`parse`] extracts.
struct Parsed {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

/// Parses and validates the header, metadata and tensor infos of `buf` (the whole file);
/// `file` names it in errors.
fn parse(file: &str, buf: &[u8]) -> Result<Parsed> {
    let mut c = Cursor { buf, pos: 0, file };
    let file_len = buf.len() as u64;
    if buf.len() < 4 || buf[..4] != GGUF_MAGIC {
        let head = &buf[..buf.len().min(4)];
        return Err(c.err(format!(
            "not a GGUF file: it starts with {:?} instead of the magic \"GGUF\" ({file_len} bytes)",
            String::from_utf8_lossy(head)
        )));
    }
    c.pos = 4;
    let version = c.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(c.err(
                "GGUF version 1 is not supported (an obsolete layout with 32-bit lengths); re-convert the model \
                 with a current llama.cpp",
            ))
        }
        v if matches!(v.swap_bytes(), 1..=3) => {
            return Err(c.err(format!(
                "big-endian GGUF (version {}) is not supported; use a little-endian file",
                v.swap_bytes()
            )))
        }
        v => return Err(c.err(format!("unsupported GGUF version {v} (this reader handles versions 2 and 3)"))),
    }
    let tensor_count = c.u64(&|| "the tensor count".into())?;
    let kv_count = c.u64(&|| "the metadata count".into())?;
    let rem = c.remaining();
    if tensor_count > rem / MIN_TENSOR_INFO_BYTES {
        return Err(c.err(format!(
            "tensor count {tensor_count} cannot fit in the {rem} bytes after the header (each tensor info takes at \
             least {MIN_TENSOR_INFO_BYTES} bytes; truncated or corrupt)"
        )));
    }
    if kv_count > rem / MIN_KV_BYTES {
        return Err(c.err(format!(
            "metadata count {kv_count} cannot fit in the {rem} bytes after the header (each entry takes at least \
             {MIN_KV_BYTES} bytes; truncated or corrupt)"
        )));
    }
    if tensor_count * MIN_TENSOR_INFO_BYTES + kv_count * MIN_KV_BYTES > rem {
        return Err(c.err(format!(
            "{tensor_count} tensor infos and {kv_count} metadata entries cannot fit in the {rem} bytes after the \
             header (truncated or corrupt)"
        )));
    }

    let mut metadata: Vec<(String, GgufValue)> = Vec::with_capacity(capacity_for::<(String, GgufValue)>(kv_count, rem));
    let mut metadata_index = HashMap::with_capacity(capacity_for::<(String, GgufValue)>(kv_count, rem));
    for i in 0..kv_count {
        let key = c.string(&|| format!("metadata key {i}"))?;
        let t = c.u32(&|| format!("type of metadata {key}"))?;
        let value = c.value(t, &key, 0)?;
        if metadata_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(c.err(format!("duplicate metadata key {key}")));
        }
        metadata.push((key, value));
    }

    let alignment = match metadata_index.get("general.alignment").map(|&i| &metadata[i].1) {
        None => GGUF_DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => *a as u64,
        Some(GgufValue::U32(a)) => {
            return Err(c.err(format!("general.alignment = {a} is not a power of two")));
        }
        Some(v) => return Err(c.err(format!("general.alignment is {}, expected u32", v.describe()))),
    };

    let rem = c.remaining();
    if tensor_count > rem / MIN_TENSOR_INFO_BYTES {
        return Err(c.err(format!(
            "tensor count {tensor_count} cannot fit in the {rem} bytes after the metadata (each tensor info takes \
             at least {MIN_TENSOR_INFO_BYTES} bytes; truncated or corrupt)"
        )));
    }
    // (name, ne, type, offset), validated once the data section's start is known.
    type RawInfo = (String, Vec<u64>, GgmlType, u64);
    let mut raw: Vec<RawInfo> = Vec::with_capacity(capacity_for::<RawInfo>(tensor_count, rem));
    let mut tensor_index = HashMap::with_capacity(capacity_for::<RawInfo>(tensor_count, rem));
    for i in 0..tensor_count {
        let name = c.string(&|| format!("name of tensor {i}"))?;
        let n_dims = c.u32(&|| format!("n_dims of tensor {name}"))?;
        if n_dims as usize > GGUF_MAX_DIMS {
            return Err(
                c.err(format!("tensor {name}: n_dims = {n_dims} at offset {} (at most {GGUF_MAX_DIMS})", c.pos - 4))
            );
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for k in 0..n_dims {
            ne.push(c.u64(&|| format!("ne[{k}] of tensor {name}"))?);
        }
        let t = c.u32(&|| format!("ggml type of tensor {name}"))?;
        let ty = GgmlType::from_u32(t)
            .ok_or_else(|| c.err(format!("tensor {name}: unknown ggml type {t} at offset {}", c.pos - 4)))?;
        let offset = c.u64(&|| format!("data offset of tensor {name}"))?;
        if tensor_index.insert(name.clone(), raw.len()).is_some() {
            return Err(c.err(format!("duplicate tensor name {name}")));
        }
        raw.push((name, ne, ty, offset));
    }

    let end_of_infos = c.pos as u64;
    let data_offset = end_of_infos.div_ceil(alignment) * alignment; // ≤ file_len + 2^32: no overflow
    let data_len = file_len.saturating_sub(data_offset);
    let mut tensors = Vec::with_capacity(capacity_for::<GgufTensorInfo>(raw.len() as u64, file_len));
    let mut next_offset = 0u64;
    for (name, ne, ty, offset) in raw {
        let bad = |m: String| Err(Error::bad(file, format!("tensor {name}: {m}")));
        let Some(n_elements) = ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d)) else {
            return bad(format!("dims {ne:?} overflow (their product exceeds 2^64)"));
        };
        let (bs, ts) = ty.block_layout();
        let row = ne.first().copied().unwrap_or(1);
        if row % bs as u64 != 0 {
            return bad(format!("row length ne[0] = {row} is not a multiple of the {ty} block size {bs}"));
        }
        let Some(n_bytes) = (n_elements / bs as u64).checked_mul(ts as u64) else {
            return bad(format!("dims {ne:?} of type {ty} need more than 2^64 bytes"));
        };
        if offset % alignment != 0 {
            return bad(format!("data offset {offset} is not a multiple of the alignment {alignment}"));
        }
        let end = offset.checked_add(n_bytes);
        if end.is_none_or(|e| e > data_len) {
            return bad(format!(
                "data [{offset}, {}) of the data section (which starts at byte {data_offset}) extends past the end \
                 of the file ({file_len} bytes; truncated or corrupt; dims {ne:?}, type {ty})",
                end.map_or_else(|| "2^64+".to_string(), |e| e.to_string())
            ));
        }
        if offset != next_offset {
            return bad(format!(
                "data offset {offset}, expected {next_offset}: tensors must be stored in order, each padded to the \
                 alignment ({alignment}), without gaps or overlaps (as llama.cpp requires)"
            ));
        }
        next_offset = (offset + n_bytes).div_ceil(alignment) * alignment; // ≤ file_len + 2^32
                                                                          // n_bytes ≤ file_len and n_elements ≤ n_bytes · 256, so both fit in usize wherever the
                                                                          // file could be mapped; try_from guards 32-bit targets.
        let (Ok(n_elements), Ok(n_bytes)) = (usize::try_from(n_elements), usize::try_from(n_bytes)) else {
            return bad(format!("{n_elements} elements do not fit in memory on this platform"));
        };
        tensors.push(GgufTensorInfo { name, ne, ggml_type: ty, offset, n_elements, n_bytes });
    }
    Ok(Parsed { version, metadata, metadata_index, tensors, tensor_index, alignment, data_offset })
}

/// Dequantizes `src` (whole blocks of type `ty`) to f32.
///
/// `src.len()` must be a multiple of the type size; returns `src.len() / type_size ·
/// block_size` values, computed with the same f32 operations, in the same order, as gguf-py's
/// `gguf.quants.dequantize` (so bit-identical to it). Errors: `BadInput` naming the type for
/// a type [`GgmlType::can_dequantize`] rejects or a partial block.
pub fn dequantize(ty: GgmlType, src: &[u8]) -> Result<Vec<f32>> {
    let (bs, ts) = ty.block_layout();
    if !src.len().is_multiple_of(ts) {
        return Err(Error::bad(
            format!("ggml {ty} data"),
            format!("{} bytes is not a whole number of {ts}-byte blocks", src.len()),
        ));
    }
    let mut out = vec![0f32; src.len() / ts * bs];
    dequantize_into(ty, src, &mut out).map_err(|m| Error::bad(format!("ggml {ty} data"), m))?;
    Ok(out)
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `src` into `dst` (`dst.len() = src.len() / type_size · block_size`), in parallel
/// over chunks of blocks. Errors: a message for an unsupported type or mismatched lengths.
fn dequantize_into(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> std::result::Result<(), String> {
    let (bs, ts) = ty.block_layout();
    if !ty.can_dequantize() {
        return Err(format!("ggml type {ty} is not supported for dequantization"));
    }
    if !src.len().is_multiple_of(ts) || src.len() / ts * bs != dst.len() {
        return Err(format!("{} bytes of {ty} do not hold {} values", src.len(), dst.len()));
    }
    // ~64K values per task.
    let blocks_per_chunk = (65536 / bs).max(1);
    src.par_chunks(blocks_per_chunk * ts)
        .zip(dst.par_chunks_mut(blocks_per_chunk * bs))
        .for_each(|(s, d)| dequantize_blocks(ty, s, d));
    Ok(())
}

/// Dequantizes whole blocks (lengths already checked). Layouts: ggml-common.h; operation order:
/// gguf-py quants.py.
fn dequantize_blocks(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    use GgmlType::*;
    let (bs, ts) = ty.block_layout();
    let blocks = src.chunks_exact(ts).zip(dst.chunks_exact_mut(bs));
    match ty {
        F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        BF16 => blocks.for_each(|(b, y)| y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        F64 => blocks.for_each(|(b, y)| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            y[0] = f64::from_le_bytes(a) as f32
        }),
        I8 => blocks.for_each(|(b, y)| y[0] = b[0] as i8 as f32),
        I16 => blocks.for_each(|(b, y)| y[0] = i16::from_le_bytes([b[0], b[1]]) as f32),
        I32 => blocks.for_each(|(b, y)| y[0] = i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32),
        Q4_0 => blocks.for_each(|(b, y)| {
            // d f16 | qs[16]: y[l] = low nibble of qs[l], y[l+16] = high nibble.
            let d = f16_at(b, 0);
            for l in 0..16 {
                let q = b[2 + l];
                y[l] = d * ((q & 0x0F) as i32 - 8) as f32;
                y[l + 16] = d * ((q >> 4) as i32 - 8) as f32;
            }
        }),
        Q4_1 => blocks.for_each(|(b, y)| {
            // d f16 | m f16 | qs[16]
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for l in 0..16 {
                let q = b[4 + l];
                y[l] = d * (q & 0x0F) as f32 + m;
                y[l + 16] = d * (q >> 4) as f32 + m;
            }
        }),
        Q5_0 => blocks.for_each(|(b, y)| {
            // d f16 | qh u32 (bit j = 5th bit of element j) | qs[16]
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for l in 0..16 {
                let q = b[6 + l];
                let h0 = ((qh >> l) & 1) as u8;
                let h1 = ((qh >> (l + 16)) & 1) as u8;
                y[l] = d * (((q & 0x0F) | (h0 << 4)) as i32 - 16) as f32;
                y[l + 16] = d * (((q >> 4) | (h1 << 4)) as i32 - 16) as f32;
            }
        }),
        Q5_1 => blocks.for_each(|(b, y)| {
            // d f16 | m f16 | qh u32 | qs[16]
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            for l in 0..16 {
                let q = b[8 + l];
                let h0 = ((qh >> l) & 1) as u8;
                let h1 = ((qh >> (l + 16)) & 1) as u8;
                y[l] = d * ((q & 0x0F) | (h0 << 4)) as f32 + m;
                y[l + 16] = d * ((q >> 4) | (h1 << 4)) as f32 + m;
            }
        }),
        Q8_0 => blocks.for_each(|(b, y)| {
            // d f16 | qs i8[32]
            let d = f16_at(b, 0);
            for l in 0..32 {
                y[l] = (b[2 + l] as i8) as f32 * d;
            }
        }),
        Q8_K => blocks.for_each(|(b, y)| {
            // d f32 | qs i8[256] | bsums i16[16] (unused)
            let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            for l in 0..QK_K {
                y[l] = d * (b[4 + l] as i8) as f32;
            }
        }),
        Q2_K => blocks.for_each(|(b, y)| {
            // scales[16] (low nibble scale, high nibble min) | qs[64] | d f16 | dmin f16.
            // Element i = 128·j + 32·s + l takes bits 2s..2s+2 of qs[32·j + l]; group i / 16.
            let (sc, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for (i, yi) in y.iter_mut().enumerate() {
                let (j, s, l) = (i / 128, (i / 32) % 4, i % 32);
                let g = sc[i / 16];
                let dl = d * (g & 0x0F) as f32;
                let ml = dmin * (g >> 4) as f32;
                let q = (qs[32 * j + l] >> (2 * s)) & 3;
                *yi = dl * q as f32 - ml;
            }
        }),
        Q3_K => blocks.for_each(|(b, y)| {
            // hmask[32] | qs[64] | scales[12] (16 packed 6-bit scales) | d f16.
            let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
            let d = f16_at(b, 108);
            let mut dl = [0f32; 16];
            for (k, dk) in dl.iter_mut().enumerate() {
                let lo = if k < 8 { sc[k] & 0x0F } else { sc[k - 8] >> 4 };
                let hi = (sc[8 + k % 4] >> (2 * (k / 4))) & 3;
                *dk = d * (((lo | (hi << 4)) as i8) - 32) as f32;
            }
            for (i, yi) in y.iter_mut().enumerate() {
                let (j, s, l) = (i / 128, (i / 32) % 4, i % 32);
                let ql = ((qs[32 * j + l] >> (2 * s)) & 3) as i8;
                let h = (hmask[l] >> (i / 32)) & 1;
                let q = ql - (((h ^ 1) << 2) as i8);
                *yi = dl[i / 16] * q as f32;
            }
        }),
        Q4_K | Q5_K => blocks.for_each(|(b, y)| {
            // d f16 | dmin f16 | scales[12] (8 × 6-bit scale and min) | [qh[32] for Q5_K] | qs[128].
            // Element i = 64·j + 32·s + l: nibble s of qs[32·j + l] (+16 if bit i/32 of qh[l]).
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (sc, m) = k_scale_min(&b[4..16]);
            let (qh, qs) = if ty == Q5_K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
            for g in 0..8 {
                let dg = d * sc[g] as f32;
                let mg = dmin * m[g] as f32;
                let (j, s) = (g / 2, g % 2);
                for l in 0..32 {
                    let mut q = (qs[32 * j + l] >> (4 * s)) & 0x0F;
                    if let Some(qh) = qh {
                        q |= ((qh[l] >> g) & 1) << 4;
                    }
                    y[32 * g + l] = dg * q as f32 - mg;
                }
            }
        }),
        Q6_K => blocks.for_each(|(b, y)| {
            // ql[128] | qh[64] | scales i8[16] | d f16. Element i = 128·j + 32·s + l:
            // low 4 bits = nibble s/2 of ql[64·j + 32·(s%2) + l], high 2 = bits 2s.. of qh[32·j + l].
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for (i, yi) in y.iter_mut().enumerate() {
                let (j, s, l) = (i / 128, (i / 32) % 4, i % 32);
                let lo = (ql[64 * j + 32 * (s % 2) + l] >> (4 * (s / 2))) & 0x0F;
                let hi = (qh[32 * j + l] >> (2 * s)) & 3;
                let q = ((lo | (hi << 4)) as i8) - 32;
                *yi = (d * (sc[i / 16] as i8) as f32) * q as f32;
            }
        }),
        _ => unreachable!("checked by can_dequantize"),
    }
}

/// The 8 six-bit scales and mins of a Q4_K/Q5_K super-block (ggml `get_scale_min_k4`).
fn k_scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, m)
}

/// Renames a linear layer's tensors to `{base}.weight` / `{base}.bias`.
fn rename_linear<T>(l: &mut Linear<T>, base: &str) {
    l.weight.name = format!("{base}.weight");
    if let Some(b) = &mut l.bias {
        b.name = format!("{base}.bias");
    }
}

/// Gives every tensor of `w` its GGUF (llama.cpp) name.
pub(crate) fn rename_to_gguf<T>(w: &mut LlamaWeights<T>) {
    w.embed.name = "token_embd.weight".into();
    for (i, l) in w.layers.iter_mut().enumerate() {
        l.attn_norm.name = format!("blk.{i}.attn_norm.weight");
        rename_linear(&mut l.q_proj, &format!("blk.{i}.attn_q"));
        rename_linear(&mut l.k_proj, &format!("blk.{i}.attn_k"));
        rename_linear(&mut l.v_proj, &format!("blk.{i}.attn_v"));
        rename_linear(&mut l.o_proj, &format!("blk.{i}.attn_output"));
        l.mlp_norm.name = format!("blk.{i}.ffn_norm.weight");
        rename_linear(&mut l.gate_proj, &format!("blk.{i}.ffn_gate"));
        rename_linear(&mut l.up_proj, &format!("blk.{i}.ffn_up"));
        rename_linear(&mut l.down_proj, &format!("blk.{i}.ffn_down"));
    }
    w.final_norm.name = "output_norm.weight".into();
    if let Some(h) = &mut w.lm_head {
        rename_linear(h, "output");
    }
}

/// Reads the Llama configuration of `g` (`general.architecture` must be `"llama"`).
fn llama_config(g: &GgufFile) -> Result<LlamaConfig> {
    let file = g.path();
    let bad = |m: String| Error::bad(file, m);
    let arch = g.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(bad(format!("general.architecture is \"{arch}\"; only \"llama\" is supported")));
    }
    let usize_of = |key: &str| -> Result<usize> {
        let v = g.get_u64(key)?;
        usize::try_from(v).map_err(|_| bad(format!("metadata {key} = {v} is too large")))
    };
    let opt_usize = |key: &str| -> Result<Option<usize>> {
        if g.contains_key(key) {
            usize_of(key).map(Some)
        } else {
            Ok(None)
        }
    };
    if let Some(n) = opt_usize("llama.expert_count")?.filter(|&n| n > 0) {
        return Err(bad(format!("llama.expert_count = {n}: mixture-of-experts models are not supported")));
    }
    if let Some(v) = g.get("llama.rope.scaling.type") {
        let t = v.as_str().ok_or_else(|| g.wrong_type("llama.rope.scaling.type", v, "a string"))?;
        if t != "none" {
            return Err(bad(format!("llama.rope.scaling.type = \"{t}\": RoPE scaling is not supported")));
        }
    } else if g.contains_key("llama.rope.scaling.factor") {
        let f = g.get_f64("llama.rope.scaling.factor")?;
        if f != 1.0 && f != 0.0 {
            return Err(bad(format!("llama.rope.scaling.factor = {f}: RoPE scaling is not supported")));
        }
    }
    if g.tensor_info("rope_freqs.weight").is_some() {
        return Err(bad(
            "tensor rope_freqs.weight (per-dimension RoPE frequency factors, Llama 3.1-style scaling) is not \
             supported"
                .into(),
        ));
    }

    let hidden = usize_of("llama.embedding_length")?;
    let embd = g.info_or_err("token_embd.weight")?;
    let shape = embd.shape();
    if shape.len() != 2 || shape[1] != hidden {
        return Err(bad(format!(
            "tensor token_embd.weight has shape {shape:?}, expected [vocab, {hidden}] (llama.embedding_length)"
        )));
    }
    let vocab_size = shape[0];
    let num_heads = usize_of("llama.attention.head_count")?;
    let num_kv_heads = opt_usize("llama.attention.head_count_kv")?.unwrap_or(num_heads);
    if num_heads == 0 {
        return Err(bad("llama.attention.head_count must be positive".into()));
    }
    let head_dim = match opt_usize("llama.attention.key_length")? {
        Some(d) => d,
        None if hidden.is_multiple_of(num_heads) => hidden / num_heads,
        None => {
            return Err(bad(format!(
                "llama.embedding_length ({hidden}) is not a multiple of llama.attention.head_count ({num_heads}) \
                 and llama.attention.key_length is absent"
            )))
        }
    };
    if let Some(dv) = opt_usize("llama.attention.value_length")? {
        if dv != head_dim {
            return Err(bad(format!(
                "llama.attention.value_length ({dv}) differs from the key length ({head_dim}); not supported"
            )));
        }
    }
    if let Some(r) = opt_usize("llama.rope.dimension_count")? {
        if r != head_dim {
            return Err(bad(format!(
                "llama.rope.dimension_count ({r}) differs from head_dim ({head_dim}); partial RoPE is not supported"
            )));
        }
    }
    let rope_theta = if g.contains_key("llama.rope.freq_base") { g.get_f64("llama.rope.freq_base")? } else { 10000.0 };

    if let Some(v) = opt_usize("llama.vocab_size")? {
        if v != vocab_size {
            return Err(bad(format!(
                "llama.vocab_size ({v}) disagrees with tensor token_embd.weight ({vocab_size} rows)"
            )));
        }
    }
    let cfg = LlamaConfig {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: usize_of("llama.feed_forward_length")?,
        num_layers: usize_of("llama.block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: g.get_f64("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta,
        rope_layout: RopeLayout::Interleaved,
        max_seq_len: usize_of("llama.context_length")?,
        tie_word_embeddings: g.tensor_info("output.weight").is_none(),
        attention_bias: g.tensor_info("blk.0.attn_q.bias").is_some(),
        mlp_bias: g.tensor_info("blk.0.ffn_gate.bias").is_some(),
        built_in_attention: None,
    };
    cfg.validate(file)?;
    Ok(cfg)
}

/// GGUF name and shape (outermost first) of every tensor `cfg` implies, lazily, in the order of
/// [`LlamaWeights::params`]. Checked against the file before anything is allocated.
fn gguf_tensor_specs(cfg: &LlamaConfig) -> impl Iterator<Item = (String, Vec<usize>)> + '_ {
    let (h, q, kv, f) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    let lin = |base: String, out: usize, inp: usize, bias: bool| {
        let mut v = vec![(format!("{base}.weight"), vec![out, inp])];
        if bias {
            v.push((format!("{base}.bias"), vec![out]));
        }
        v
    };
    let layers = (0..cfg.num_layers).flat_map(move |i| {
        let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
        let mut t = vec![(format!("blk.{i}.attn_norm.weight"), vec![h])];
        t.extend(lin(format!("blk.{i}.attn_q"), q, h, ab));
        t.extend(lin(format!("blk.{i}.attn_k"), kv, h, ab));
        t.extend(lin(format!("blk.{i}.attn_v"), kv, h, ab));
        t.extend(lin(format!("blk.{i}.attn_output"), h, q, ab));
        t.push((format!("blk.{i}.ffn_norm.weight"), vec![h]));
        t.extend(lin(format!("blk.{i}.ffn_gate"), f, h, mb));
        t.extend(lin(format!("blk.{i}.ffn_up"), f, h, mb));
        t.extend(lin(format!("blk.{i}.ffn_down"), h, f, mb));
        t
    });
    std::iter::once(("token_embd.weight".to_string(), vec![cfg.vocab_size, h]))
        .chain(layers)
        .chain(std::iter::once(("output_norm.weight".to_string(), vec![h])))
        .chain((!cfg.tie_word_embeddings).then(|| ("output.weight".to_string(), vec![cfg.vocab_size, h])))
}

/// Checks that tensor `name` is in `g` with shape `shape`. Errors: `BadInput` naming the file
/// and the tensor.
fn check_tensor(g: &GgufFile, name: &str, shape: &[usize]) -> Result<()> {
    let info = g.info_or_err(name)?;
    let have = info.shape();
    if have != shape {
        return Err(Error::bad(
            g.path(),
            format!("tensor {name} has shape {have:?} (ggml ne {:?}), expected {shape:?}", info.ne),
        ));
    }
    Ok(())
}

/// Loads a Llama-family model from a GGUF file: configuration, weights (dequantized to f32,
/// then converted to `T`), and the parsed file (for its tokenizer metadata).
///
/// Configuration (GGUF spec, `llama.*` keys): `context_length` → `max_seq_len`,
/// `embedding_length` → `hidden_size`, `block_count`, `feed_forward_length`,
/// `attention.head_count`, `attention.head_count_kv` (default: head_count),
/// `attention.layer_norm_rms_epsilon`, `rope.freq_base` (default 10000),
/// `attention.key_length` (default hidden / heads) = `head_dim`, which `rope.dimension_count`
/// must equal when present. `vocab_size` is the row count of `token_embd.weight`; the head is
/// tied when `output.weight` is absent; biases are present when `blk.0.attn_q.bias` /
/// `blk.0.ffn_gate.bias` are. RoPE is [`RopeLayout::Interleaved`]: llama.cpp's converter
/// permutes the q/k rows of HF checkpoints for its pairwise (NORM) RoPE.
///
/// Tensors keep their GGUF names: `token_embd.weight`, `blk.{i}.attn_norm.weight`,
/// `blk.{i}.attn_{q,k,v,output}.{weight,bias}`, `blk.{i}.ffn_norm.weight`,
/// `blk.{i}.ffn_{gate,up,down}.{weight,bias}`, `output_norm.weight`, `output.weight`. A GGUF
/// linear weight with `ne = [in, out]` is the row-major `[out, in]` matrix altgrad uses.
///
/// Errors: those of [`GgufFile::open`]; `BadInput` naming the file for another architecture,
/// missing or mistyped metadata, unsupported features (MoE, RoPE scaling, `rope_freqs.weight`,
/// value length ≠ key length, partial RoPE), an inconsistent config (`LlamaConfig::validate`),
/// and — naming the tensor — a missing tensor or a wrong shape (both checked for every tensor
/// before the weights are allocated), a type that cannot be dequantized, or a non-finite value.
pub fn load_gguf_llama<T: Scalar>(path: &Path) -> Result<(LlamaConfig, LlamaWeights<T>, GgufFile)> {
    load_gguf_llama_from(GgufFile::open(path)?)
}

/// [`load_gguf_llama`] of an already parsed file (on disk or from [`GgufFile::from_bytes`]).
///
/// Errors: as [`load_gguf_llama`] after opening.
pub fn load_gguf_llama_from<T: Scalar>(g: GgufFile) -> Result<(LlamaConfig, LlamaWeights<T>, GgufFile)> {
    let cfg = llama_config(&g)?;
    let file = g.path();
    // Every tensor present with its shape before allocating: the weights then take at most as
    // many values as the file's tensors hold.
    // Every type dequantizable too, so no buffer is reserved for a tensor that cannot be read.
    for (name, shape) in gguf_tensor_specs(&cfg) {
        check_tensor(&g, &name, &shape)?;
        let ty = g.info_or_err(&name)?.ggml_type;
        if !ty.can_dequantize() {
            return Err(Error::bad(file, format!("tensor {name}: ggml type {ty} is not supported for dequantization")));
        }
    }
    let mut w = LlamaWeights::<T>::zeros_hf(&cfg);
    rename_to_gguf(&mut w);
    for p in w.params_mut() {
        check_tensor(&g, &p.name, &p.shape)?;
        let (_, values) = g.tensor_f32(&p.name)?;
        if let Some(i) = values.iter().position(|x| !x.is_finite()) {
            return Err(Error::bad(file, format!("tensor {}: non-finite value {} at index {i}", p.name, values[i])));
        }
        p.data = values.into_iter().map(T::from_f32).collect();
    }
    Ok((cfg, w, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_layouts_match_ggml() {
        // Spot checks against ggml-common.h's static_asserts.
        assert_eq!(GgmlType::Q4_0.block_layout(), (32, 18));
        assert_eq!(GgmlType::Q4_1.block_layout(), (32, 20));
        assert_eq!(GgmlType::Q5_0.block_layout(), (32, 22));
        assert_eq!(GgmlType::Q5_1.block_layout(), (32, 24));
        assert_eq!(GgmlType::Q8_0.block_layout(), (32, 34));
        assert_eq!(GgmlType::Q2_K.block_layout(), (256, 84));
        assert_eq!(GgmlType::Q3_K.block_layout(), (256, 110));
        assert_eq!(GgmlType::Q4_K.block_layout(), (256, 144));
        assert_eq!(GgmlType::Q5_K.block_layout(), (256, 176));
        assert_eq!(GgmlType::Q6_K.block_layout(), (256, 210));
        assert_eq!(GgmlType::Q8_K.block_layout(), (256, 292));
        for id in 0..64 {
            if let Some(t) = GgmlType::from_u32(id) {
                assert_eq!(t as u32, id);
            }
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 999] {
            assert!(GgmlType::from_u32(removed).is_none());
        }
    }

    #[test]
    fn q8_k_by_hand() {
        let mut b = vec![0u8; 292];
        b[..4].copy_from_slice(&0.5f32.to_le_bytes());
        for l in 0..256 {
            b[4 + l] = (l as i32 - 128) as i8 as u8;
        }
        let y = dequantize(GgmlType::Q8_K, &b).unwrap();
        for (l, v) in y.iter().enumerate() {
            assert_eq!(*v, 0.5 * (l as f32 - 128.0));
        }
    }

    #[test]
    fn partial_blocks_and_unsupported_types_are_errors() {
        let e = dequantize(GgmlType::Q4_0, &[0u8; 19]).unwrap_err().to_string();
        assert!(e.contains("Q4_0") && e.contains("whole number"), "{e}");
        let e = dequantize(GgmlType::IQ2_XXS, &[0u8; 66]).unwrap_err().to_string();
        assert!(e.contains("IQ2_XXS") && e.contains("not supported"), "{e}");
    }

    /// Random blocks of every type gguf-py can dequantize, with gguf-py's output
    /// (tests/fixtures/make_gguf_dequant_fixture.py): bit-identical.
    #[test]
    fn random_blocks_match_gguf_py() {
        let p = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .join("tests/fixtures/ggml_blocks_dequant.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut checked = 0;
        for name in st.names() {
            let Some(ty_name) = name.strip_suffix(".bytes") else { continue };
            let ty = (0..64)
                .filter_map(GgmlType::from_u32)
                .find(|t| t.to_string() == ty_name)
                .unwrap_or_else(|| panic!("unknown type {ty_name}"));
            let raw = st.tensor(name).unwrap();
            let want = st.tensor(&format!("{ty_name}.f32")).unwrap();
            let want: Vec<f32> =
                want.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let got = dequantize(ty, raw.data()).unwrap();
            assert_eq!(got.len(), want.len(), "{ty}");
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{ty}[{i}]: {a} vs {b}");
            }
            checked += 1;
        }
        assert!(checked >= 12, "only {checked} types in the fixture");
    }
}
