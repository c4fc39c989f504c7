//! The bytes of an input file: memory-mapped from disk, or owned (parsed from memory, e.g. by
//! the fuzz targets or a caller that already holds the file).

use memmap2::Mmap;

/// A read-only byte buffer: a memory map or an owned vector.
pub(crate) enum Bytes {
    /// A read-only memory map of a file.
    Mapped(Mmap),
    /// Bytes held in memory.
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}
