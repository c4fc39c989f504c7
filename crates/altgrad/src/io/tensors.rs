//! Safetensors in and out: validated memory-mapped reading, dtype conversion (F32, F64, F16,
//! BF16), atomic writing (temporary file, fsync, rename), and the finiteness check every loaded
//! tensor goes through.

use super::bytes::Bytes;
use crate::linalg::Scalar;
use crate::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

/// One tensor read by [`read_safetensors`], with its values converted to f64.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorF64 {
    /// Name as stored in the file.
    pub name: String,
    /// Shape, outermost first (row-major).
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major, converted exactly to f64.
    pub data: Vec<f64>,
    /// The dtype stored in the file: `"F32"`, `"F64"`, `"F16"` or `"BF16"`.
    pub dtype: String,
}

/// A memory-mapped safetensors file whose 8-byte header length has been checked against the
/// file size. [`MappedSafetensors::parse`] validates the rest (header JSON, offsets, sizes).
pub(crate) struct MappedSafetensors {
    /// The path, for error messages.
    pub(crate) name: String,
    mmap: Bytes,
}

impl MappedSafetensors {
    /// Opens and maps `path`. Errors: `Io` if it cannot be opened or mapped; `BadInput` if it is
    /// shorter than 8 bytes or its header length exceeds the file size.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let mut file = File::open(path).map_err(|e| Error::io(&name, e))?;
        let meta = file.metadata().map_err(|e| Error::io(&name, e))?;
        if !meta.is_file() {
            return Err(Error::bad(&name, "not a regular file (expected a .safetensors file)"));
        }
        let len = meta.len();
        if len < 8 {
            return Err(Error::bad(
                &name,
                format!(
                    "not a safetensors file: {len} bytes, shorter than the 8-byte header length \
                     (truncated?)"
                ),
            ));
        }
        let mut head = [0u8; 8];
        file.read_exact(&mut head).map_err(|e| Error::io(&name, e))?;
        check_header_length(&name, u64::from_le_bytes(head), len)?;
        // SAFETY: the map is read-only and lives as long as `self`. As with every memory map, a
        // concurrent truncation of the file by another process is outside our control; the
        // header and all offsets are validated against the map's length before any tensor is read.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&name, e))?;
        Ok(MappedSafetensors { name, mmap: Bytes::Mapped(mmap) })
    }

    /// A safetensors file held in memory; `name` stands for it in messages. Errors: as
    /// [`MappedSafetensors::open`] after reading.
    pub(crate) fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self> {
        let len = bytes.len() as u64;
        if len < 8 {
            return Err(Error::bad(
                name,
                format!("not a safetensors file: {len} bytes, shorter than the 8-byte header length (truncated?)"),
            ));
        }
        let mut head = [0u8; 8];
        head.copy_from_slice(&bytes[..8]);
        check_header_length(name, u64::from_le_bytes(head), len)?;
        Ok(MappedSafetensors { name: name.to_string(), mmap: Bytes::Owned(bytes) })
    }

    /// Size of the mapped file in bytes.
    pub(crate) fn len(&self) -> usize {
        self.mmap.len()
    }

    /// Parses and validates the header (JSON, dtypes, offsets covering the data exactly).
    /// Errors: `BadInput` naming the file, with safetensors' reason.
    pub(crate) fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap)
            .map_err(|e| Error::bad(&self.name, format!("not a valid safetensors file: {e}")))
    }

    /// Tensor names in file (data offset) order. Errors as [`MappedSafetensors::parse`].
    fn names_in_order(&self) -> Result<Vec<String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap)
            .map_err(|e| Error::bad(&self.name, format!("not a valid safetensors file: {e}")))?;
        Ok(meta.offset_keys())
    }
}

/// Checks the 8-byte header length `n` of a safetensors file of `len` bytes.
fn check_header_length(name: &str, n: u64, len: u64) -> Result<()> {
    if n > len - 8 {
        return Err(Error::bad(
            name,
            format!(
                "not a safetensors file: header length {n} exceeds the file size ({len} bytes; truncated or corrupt)"
            ),
        ));
    }
    Ok(())
}

/// Decodes element `i` of little-endian `bytes` of dtype `dtype` to f64 (exact for F16, BF16,
/// F32, F64). `None` for other dtypes.
fn element(dtype: Dtype, bytes: &[u8], i: usize) -> Option<f64> {
    let b = |w: usize| &bytes[i * w..(i + 1) * w];
    Some(match dtype {
        Dtype::F64 => f64::from_le_bytes(b(8).try_into().ok()?),
        Dtype::F32 => f32::from_le_bytes(b(4).try_into().ok()?) as f64,
        Dtype::F16 => half::f16::from_le_bytes(b(2).try_into().ok()?).to_f64(),
        Dtype::BF16 => half::bf16::from_le_bytes(b(2).try_into().ok()?).to_f64(),
        _ => return None,
    })
}

fn decode_with<T: Scalar, const W: usize>(bytes: &[u8], f: impl Fn([u8; W]) -> f64) -> Vec<T> {
    bytes
        .chunks_exact(W)
        .map(|c| {
            let mut a = [0u8; W];
            a.copy_from_slice(c);
            T::from_f64(f(a))
        })
        .collect()
}

/// Converts a tensor's little-endian bytes to `T` (through f64, exact except for rounding to
/// f32 when `T = f32` and the file holds F64). Errors: `BadInput` naming `file` and `name` for a
/// dtype other than F32, F64, F16, BF16.
pub(crate) fn decode<T: Scalar>(file: &str, name: &str, view: &TensorView<'_>) -> Result<Vec<T>> {
    let bytes = view.data();
    Ok(match view.dtype() {
        Dtype::F64 => decode_with::<T, 8>(bytes, f64::from_le_bytes),
        Dtype::F32 => decode_with::<T, 4>(bytes, |a| f32::from_le_bytes(a) as f64),
        Dtype::F16 => decode_with::<T, 2>(bytes, |a| half::f16::from_le_bytes(a).to_f64()),
        Dtype::BF16 => decode_with::<T, 2>(bytes, |a| half::bf16::from_le_bytes(a).to_f64()),
        other => {
            return Err(Error::bad(
                file,
                format!("tensor {name} has unsupported dtype {other:?} (supported: F32, F64, F16, BF16)"),
            ))
        }
    })
}

/// Row-major multi-index of flat index `i` in `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (k, &s) in shape.iter().enumerate().rev() {
        if s > 0 {
            idx[k] = i % s;
            i /= s;
        }
    }
    idx
}

/// Decodes `view` to `T` and checks that every value is finite (and, for F64 read as f32, that
/// it does not overflow). Errors: `BadInput` naming `file` and tensor `name`: unsupported dtype,
/// or the first non-finite value with its flat index and multi-index.
pub(crate) fn decode_finite<T: Scalar>(file: &str, name: &str, view: &TensorView<'_>) -> Result<Vec<T>> {
    let data = decode::<T>(file, name, view)?;
    if let Some(i) = data.iter().position(|x| !x.as_f64().is_finite()) {
        let src = element(view.dtype(), view.data(), i).unwrap_or(f64::NAN);
        let pos = unravel(i, view.shape());
        let msg = if src.is_finite() {
            format!("tensor {name}: value {src:e} at index {i} (position {pos:?}) overflows {}", T::DTYPE)
        } else {
            format!("tensor {name}: non-finite value {src} at index {i} (position {pos:?})")
        };
        return Err(Error::bad(file, msg));
    }
    Ok(data)
}

/// Checks that every value of `data` is finite.
///
/// Errors: `BadInput` whose input is `what` and whose message gives the first non-finite value
/// (NaN, inf or -inf) and its flat index.
pub fn check_finite<T: Scalar>(what: &str, data: &[T]) -> Result<()> {
    match data.iter().position(|x| !x.as_f64().is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::bad(what, format!("non-finite value {} at index {i}", data[i].as_f64()))),
    }
}

/// Reads every tensor of a safetensors file, converting its values to f64.
///
/// Tensors come in file order (increasing data offset). Accepted dtypes: F32, F64, F16, BF16.
/// Values are not checked for finiteness (use [`check_finite`] where it matters).
///
/// Errors: `Io` if the file cannot be opened; `BadInput` naming the file for anything
/// malformed: shorter than 8 bytes, header length beyond the file size (checked first, before
/// mapping), header not valid JSON, offsets not covering the data exactly (truncation), or a
/// tensor of another dtype (naming the tensor). Never panics on a hostile file.
pub fn read_safetensors(path: &Path) -> Result<Vec<TensorF64>> {
    read_mapped(&MappedSafetensors::open(path)?)
}

/// Every tensor of a safetensors file held in memory, as [`read_safetensors`] reads a file on
/// disk; `name` stands for the file in messages.
///
/// Errors: as [`read_safetensors`], naming `name`.
pub fn read_safetensors_bytes(name: &str, bytes: Vec<u8>) -> Result<Vec<TensorF64>> {
    read_mapped(&MappedSafetensors::from_bytes(name, bytes)?)
}

fn read_mapped(mapped: &MappedSafetensors) -> Result<Vec<TensorF64>> {
    let st = mapped.parse()?;
    let mut out = Vec::with_capacity(st.len());
    for name in mapped.names_in_order()? {
        let view = st
            .tensor(&name)
            .map_err(|e| Error::Internal(format!("{}: tensor {name} listed but not found: {e}", mapped.name)))?;
        let data = decode::<f64>(&mapped.name, &name, &view)?;
        out.push(TensorF64 { name, shape: view.shape().to_vec(), data, dtype: format!("{:?}", view.dtype()) });
    }
    Ok(out)
}

/// Writes `path` atomically: `write` fills `path` + `".tmp-<pid>"` in the same directory, which
/// is then fsynced and renamed over `path` (the directory is fsynced too, best effort). On any
/// failure the temporary file is removed and an existing file at `path` is left untouched.
///
/// Errors: `BadInput` if `path` has no file name; `Io` naming `path` for any I/O failure.
pub(crate) fn atomic_write(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> Result<()> {
    let shown = path.display().to_string();
    let Some(file_name) = path.file_name() else {
        return Err(Error::bad(&shown, "not a file path"));
    };
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| -> std::io::Result<()> {
        let mut w = BufWriter::new(super::cleanup::create_registered_file(&tmp)?);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        test_write_delay();
        std::fs::rename(&tmp, path)
    })();
    super::cleanup::forget_temporary(&tmp);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(shown, e));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Test hook for the interrupt tests: with `ALTGRAD_TEST_WRITE_DELAY_MS=N` in the environment,
/// each atomic write waits N ms (at most 60 s) before renaming its complete temporary file into
/// place, so a test can signal the process while the temporary file exists.
fn test_write_delay() {
    if let Some(ms) = std::env::var("ALTGRAD_TEST_WRITE_DELAY_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms.min(60_000)));
    }
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename;
/// see [`write_safetensors`] for the guarantees). Useful for JSON reports and configs.
///
/// Errors: `BadInput` if `path` has no file name; `Io` naming `path` if writing fails.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write(path, |w| w.write_all(bytes))
}

/// Writes named tensors as a safetensors file with element type `dtype` (F32 or F64), in the
/// given order, atomically. Errors: `BadInput` for a duplicate, empty or reserved name or a shape
/// that does not match the data length; `Io` for write failures.
pub(crate) fn write_tensors<T: Scalar>(path: &Path, tensors: &[(&str, &[usize], &[T])], dtype: Dtype) -> Result<()> {
    let shown = path.display().to_string();
    let (width, max) = match dtype {
        Dtype::F32 => (4, f32::MAX as f64),
        Dtype::F64 => (8, f64::MAX),
        Dtype::F16 => (2, half::f16::MAX.to_f64()),
        Dtype::BF16 => (2, half::bf16::MAX.to_f64()),
        other => return Err(Error::Internal(format!("write_tensors: unsupported dtype {other:?}"))),
    };
    // Values that are finite here must stay finite in the file's dtype.
    for &(name, _, data) in tensors {
        if let Some(i) = data.iter().position(|x| x.as_f64().is_finite() && x.as_f64().abs() > max) {
            return Err(Error::bad(
                &shown,
                format!(
                    "tensor {name}: value {:e} at index {i} does not fit in {dtype:?} (largest {max:e}); use a wider dtype",
                    data[i].as_f64()
                ),
            ));
        }
    }
    let mut seen = HashSet::new();
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for &(name, shape, data) in tensors {
        if name.is_empty() || name == "__metadata__" {
            return Err(Error::bad(&shown, format!("invalid tensor name {name:?}")));
        }
        if !seen.insert(name) {
            return Err(Error::bad(&shown, format!("duplicate tensor name {name}")));
        }
        let numel = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        if numel != Some(data.len()) {
            return Err(Error::bad(
                &shown,
                format!("tensor {name}: shape {shape:?} does not match its {} values", data.len()),
            ));
        }
        let size = data.len() * width;
        infos.push((
            name.to_string(),
            TensorInfo { dtype, shape: shape.to_vec(), data_offsets: (offset, offset + size) },
        ));
        offset += size;
    }
    let meta = Metadata::new(None, infos).map_err(|e| Error::bad(&shown, format!("cannot build header: {e}")))?;
    let mut header =
        serde_json::to_vec(&meta).map_err(|e| Error::Internal(format!("{shown}: serializing header: {e}")))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    atomic_write(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        let mut buf = Vec::with_capacity(8192 * width);
        for &(_, _, data) in tensors {
            for chunk in data.chunks(8192) {
                buf.clear();
                for &x in chunk {
                    let v = x.as_f64();
                    match dtype {
                        Dtype::F32 => buf.extend_from_slice(&(v as f32).to_le_bytes()),
                        Dtype::F16 => buf.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
                        Dtype::BF16 => buf.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
                        _ => buf.extend_from_slice(&v.to_le_bytes()),
                    }
                }
                w.write_all(&buf)?;
            }
        }
        Ok(())
    })
}

/// [`write_safetensors`] with the values stored as `dtype` (`"F32"`, `"F64"`, `"F16"` or
/// `"BF16"`, rounded to nearest), e.g. outputs in the dtype of their inputs.
///
/// Errors: as [`write_safetensors`], and `BadInput` naming `path` for another dtype or a finite
/// value too large for `dtype` (e.g. above 65504 for F16).
pub fn write_safetensors_as<T: Scalar>(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<T>)],
    dtype: &str,
) -> Result<()> {
    let dt = match dtype {
        "F32" => Dtype::F32,
        "F64" => Dtype::F64,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        other => {
            return Err(Error::bad(
                path.display().to_string(),
                format!("cannot write dtype {other} (F32, F64, F16, BF16)"),
            ))
        }
    };
    let refs: Vec<(&str, &[usize], &[T])> =
        tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())).collect();
    write_tensors(path, &refs, dt)
}

/// Writes named tensors `(name, shape, row-major data)` to a safetensors file, in the given
/// order, with dtype `T::DTYPE` (F32 for f32, F64 for f64).
///
/// The write is atomic: the file is written to `path` + `".tmp-<pid>"` in the same directory,
/// fsynced, then renamed over `path`; on failure the temporary file is removed and an existing
/// file at `path` is untouched.
///
/// Errors: `BadInput` naming `path` for a duplicate, empty or `__metadata__` tensor name, or a
/// shape whose product differs from the data length; `Io` naming `path` if writing fails.
pub fn write_safetensors<T: Scalar>(path: &Path, tensors: &[(String, Vec<usize>, Vec<T>)]) -> Result<()> {
    let dtype = if T::DTYPE == "F64" { Dtype::F64 } else { Dtype::F32 };
    let refs: Vec<(&str, &[usize], &[T])> =
        tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())).collect();
    write_tensors(path, &refs, dtype)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A unique directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "altgrad-io-unit-{}-{tag}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn no_temp_files(dir: &Path) -> bool {
        std::fs::read_dir(dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp-"))
    }

    #[test]
    fn round_trip_f32_and_f64() {
        let d = TempDir::new("rt");
        let p = d.0.join("a.safetensors");
        let t32 = vec![
            ("q".to_string(), vec![2, 3], vec![1.0f32, -2.5, 3.25, 1e-30, 7e30, 0.0]),
            ("b".to_string(), vec![1], vec![0.1f32]),
            ("empty".to_string(), vec![0, 4], vec![]),
        ];
        write_safetensors(&p, &t32).unwrap();
        let r = read_safetensors(&p).unwrap();
        assert_eq!(r.len(), 3);
        for (w, g) in t32.iter().zip(&r) {
            assert_eq!(w.0, g.name, "file order is write order");
            assert_eq!(w.1, g.shape);
            assert_eq!(g.dtype, "F32");
            assert_eq!(w.2.iter().map(|&x| x as f64).collect::<Vec<_>>(), g.data);
        }
        // f64 overwrites the existing file atomically.
        let t64 = vec![("x".to_string(), vec![3], vec![0.1f64, -1e300, std::f64::consts::PI])];
        write_safetensors(&p, &t64).unwrap();
        let r = read_safetensors(&p).unwrap();
        assert_eq!(
            r,
            vec![TensorF64 { name: "x".into(), shape: vec![3], data: t64[0].2.clone(), dtype: "F64".into() }]
        );
        assert!(no_temp_files(&d.0));
        // The file is readable by the safetensors crate itself.
        let bytes = std::fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("x").unwrap().dtype(), Dtype::F64);
    }

    #[test]
    fn failed_write_leaves_existing_file() {
        let d = TempDir::new("fail");
        let p = d.0.join("keep.safetensors");
        std::fs::write(&p, b"old contents").unwrap();
        let bad_shape = vec![("a".to_string(), vec![2, 2], vec![1.0f32; 3])];
        let e = write_safetensors(&p, &bad_shape).unwrap_err().to_string();
        assert!(e.contains("tensor a") && e.contains("[2, 2]"), "{e}");
        let dup = vec![("a".to_string(), vec![1], vec![1.0f32]), ("a".to_string(), vec![1], vec![2.0f32])];
        assert!(write_safetensors(&p, &dup).unwrap_err().to_string().contains("duplicate"));
        assert_eq!(std::fs::read(&p).unwrap(), b"old contents");
        // A rename failure (destination is a non-empty directory) removes the temporary file.
        let dir_dest = d.0.join("adir");
        std::fs::create_dir(&dir_dest).unwrap();
        std::fs::write(dir_dest.join("inner"), b"x").unwrap();
        let ok = vec![("a".to_string(), vec![1], vec![1.0f32])];
        let e = write_safetensors(&dir_dest, &ok).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(no_temp_files(&d.0));
        assert_eq!(std::fs::read(dir_dest.join("inner")).unwrap(), b"x");
        // A missing directory is an Io error naming the path.
        let e = write_safetensors(&d.0.join("nope/x.safetensors"), &ok).unwrap_err().to_string();
        assert!(e.contains("nope/x.safetensors"), "{e}");
    }

    fn write_raw(path: &Path, dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) {
        let view = TensorView::new(dtype, shape, bytes).unwrap();
        let buf = safetensors::serialize([("t", view)], None).unwrap();
        std::fs::write(path, buf).unwrap();
    }

    #[test]
    fn half_and_bfloat_values() {
        let d = TempDir::new("half");
        let p = d.0.join("h.safetensors");
        // bf16: 1.0, -2.0, 0.5, 3.140625 (0x4049), inf
        let bf: [u16; 5] = [0x3F80, 0xC000, 0x3F00, 0x4049, 0x7F80];
        let bytes: Vec<u8> = bf.iter().flat_map(|x| x.to_le_bytes()).collect();
        write_raw(&p, Dtype::BF16, vec![5], &bytes);
        let r = read_safetensors(&p).unwrap();
        assert_eq!(r[0].dtype, "BF16");
        assert_eq!(r[0].data, vec![1.0, -2.0, 0.5, 3.140625, f64::INFINITY]);
        // f16: 1.0, -2.0, 65504 (max), 2^-24 (smallest subnormal), 0.333251953125 (0x3555)
        let h: [u16; 5] = [0x3C00, 0xC000, 0x7BFF, 0x0001, 0x3555];
        let bytes: Vec<u8> = h.iter().flat_map(|x| x.to_le_bytes()).collect();
        write_raw(&p, Dtype::F16, vec![5], &bytes);
        let r = read_safetensors(&p).unwrap();
        assert_eq!(r[0].dtype, "F16");
        assert_eq!(r[0].data, vec![1.0, -2.0, 65504.0, 2f64.powi(-24), 0.333251953125]);
        // Decoding to f32 gives the same values.
        let m = MappedSafetensors::open(&p).unwrap();
        let st = m.parse().unwrap();
        let v: Vec<f32> = decode_finite(&m.name, "t", &st.tensor("t").unwrap()).unwrap();
        assert_eq!(v.iter().map(|&x| x as f64).collect::<Vec<_>>(), r[0].data);
    }

    #[test]
    fn non_finite_and_overflow_are_reported() {
        let d = TempDir::new("nan");
        let p = d.0.join("n.safetensors");
        let vals = [1.0f64, 2.0, 1e300, f64::NAN];
        let bytes: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
        write_raw(&p, Dtype::F64, vec![2, 2], &bytes);
        let m = MappedSafetensors::open(&p).unwrap();
        let st = m.parse().unwrap();
        let view = st.tensor("t").unwrap();
        let e = decode_finite::<f64>(&m.name, "t", &view).unwrap_err().to_string();
        assert!(e.contains("tensor t") && e.contains("NaN") && e.contains("index 3") && e.contains("[1, 1]"), "{e}");
        let e = decode_finite::<f32>(&m.name, "t", &view).unwrap_err().to_string();
        assert!(e.contains("overflows F32") && e.contains("index 2"), "{e}");
        // Unsupported dtype.
        write_raw(&p, Dtype::I32, vec![1], &[0, 0, 0, 0]);
        let e = read_safetensors(&p).unwrap_err().to_string();
        assert!(e.contains("unsupported dtype I32") && e.contains("tensor t"), "{e}");
    }

    #[test]
    fn check_finite_names_input_and_index() {
        assert!(check_finite("x", &[1.0f32, 2.0]).is_ok());
        let e = check_finite("q", &[1.0f64, f64::NEG_INFINITY, f64::NAN]).unwrap_err().to_string();
        assert_eq!(e, "q: non-finite value -inf at index 1");
    }

    #[test]
    fn unravel_is_row_major() {
        assert_eq!(unravel(5, &[2, 3]), vec![1, 2]);
        assert_eq!(unravel(0, &[]), Vec::<usize>::new());
        assert_eq!(unravel(7, &[2, 2, 2]), vec![1, 1, 1]);
    }

    #[test]
    fn write_file_atomic_replaces() {
        let d = TempDir::new("atomic");
        let p = d.0.join("r.json");
        write_file_atomic(&p, b"one").unwrap();
        write_file_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(no_temp_files(&d.0));
    }
}
