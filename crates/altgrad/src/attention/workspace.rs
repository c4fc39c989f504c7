//! Reusable scratch of the attention kernels (faer's `MemStack` idea, for rayon tasks): a
//! [`Workspace`] keeps the per-head chunk buffers of finished heads and hands them to the next,
//! within a call and across calls, so a caller that keeps one workspace allocates them once.
//! Buffers are grown on demand and never shrink; their contents are not meaningful between uses
//! (every kernel writes a buffer before reading it).

use crate::linalg::Scalar;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// A pool of scratch values of one kind.
#[derive(Debug)]
pub(crate) struct Pool<B>(Mutex<Vec<B>>);

impl<B> Default for Pool<B> {
    fn default() -> Self {
        Pool(Mutex::new(Vec::new()))
    }
}

impl<B> Pool<B> {
    /// A held value, if any.
    pub(crate) fn take(&self) -> Option<B> {
        self.0.lock().ok()?.pop()
    }
    /// Holds `b` for a later [`take`](Self::take).
    pub(crate) fn put(&self, b: B) {
        if let Ok(mut v) = self.0.lock() {
            v.push(b);
        }
    }
    /// Values held.
    pub(crate) fn len(&self) -> usize {
        self.0.lock().map_or(0, |v| v.len())
    }
}

/// A scratch value checked out of a [`Pool`] (or made for one use), returned on drop.
pub(crate) struct Pooled<'w, B> {
    b: Option<B>,
    pool: Option<&'w Pool<B>>,
}

impl<'w, B: Default> Pooled<'w, B> {
    /// A value from `pool` (or a new one), passed through `fit` to size it for this use.
    pub(crate) fn get(pool: Option<&'w Pool<B>>, fit: impl FnOnce(&mut B)) -> Self {
        let mut b = pool.and_then(Pool::take).unwrap_or_default();
        fit(&mut b);
        Pooled { b: Some(b), pool }
    }
}

impl<B> Deref for Pooled<'_, B> {
    type Target = B;
    fn deref(&self) -> &B {
        self.b.as_ref().expect("present until drop")
    }
}

impl<B> DerefMut for Pooled<'_, B> {
    fn deref_mut(&mut self) -> &mut B {
        self.b.as_mut().expect("present until drop")
    }
}

impl<B> Drop for Pooled<'_, B> {
    fn drop(&mut self) {
        if let (Some(pool), Some(b)) = (self.pool, self.b.take()) {
            pool.put(b);
        }
    }
}

/// Grows `v` to at least `len` values (contents unspecified).
pub(crate) fn fit<T: Scalar>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::zero());
    }
}

/// Reusable scratch for the `_into` entry points ([`super::forward_exact_into`],
/// [`super::forward_poly_into`], …): per-head chunk and tile buffers, and the causal polynomial
/// calls' prefix means (one `[seq_len, head_dim]` vector per key/value head, as large as `K`, held
/// for the longest call so far), kept between calls. Shared
/// by the parallel heads of a call (`&Workspace` is `Sync`); at most one buffer set per running
/// head is alive. A fresh workspace allocates on first use, as the allocating entry points do.
#[derive(Debug, Default)]
pub struct Workspace<T> {
    pub(crate) exact: Pool<super::exact::Tiles<T>>,
    pub(crate) exact_simd: Pool<super::exact_simd::Scratch>,
    pub(crate) poly: Pool<super::poly::Bufs<T>>,
    pub(crate) kron: Pool<super::altgrad::KBufs<T>>,
    /// Whole-sequence vectors (the causal prefix means `[n, d]` of [`super::poly::kv_heads`]).
    pub(crate) vecs: Pool<Vec<T>>,
}

impl<T: Scalar> Workspace<T> {
    /// An empty workspace.
    pub fn new() -> Self {
        Workspace {
            exact: Pool::default(),
            exact_simd: Pool::default(),
            poly: Pool::default(),
            kron: Pool::default(),
            vecs: Pool::default(),
        }
    }

    /// Buffer sets held for reuse (for tests and reports).
    pub fn held(&self) -> usize {
        self.exact.len() + self.exact_simd.len() + self.poly.len() + self.kron.len() + self.vecs.len()
    }
}
