//! Strided row views: one head of a `[batch, seq, heads, width]` tensor (MATH §1's layout) is a
//! `seq × width` matrix with row stride `heads · width`, read and written in place (no per-head
//! copies). [`Rows`] reads; [`RowsMut`] writes and is built by splitting one tensor into disjoint
//! heads ([`heads_mut`]), so heads can be written in parallel.

use crate::linalg::{rm_strided, Scalar};
use faer::prelude::ReborrowMut;
use faer::{MatMut, MatRef};

/// Rows ahead of the current one that a row-by-row pass over a strided head asks for
/// ([`Rows::prefetch_ahead`]): the rows of one head of `[seq, heads, width]` are `heads · width`
/// apart, a stride the hardware prefetcher of the CPUs we measure does not run ahead of, so each
/// row's first read waited for memory (at n = 65536 the prefix means' pass took 5–9% of a
/// polynomial step).
const PREFETCH_AHEAD: usize = 64;

/// Rows per prefetch request in such a pass (one request every this many rows).
const PREFETCH_STEP: usize = 8;

/// A read-only `rows × cols` matrix whose row `i` is `data[i·stride .. i·stride + cols]`.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    stride: usize,
}

impl<'a, T> Rows<'a, T> {
    /// Rows `0..rows` of width `cols` starting at `data[0]`, `stride` apart (`stride ≥ cols`).
    /// Panics if `data` is too short (a programming error: callers check lengths first).
    pub fn new(data: &'a [T], rows: usize, cols: usize, stride: usize) -> Self {
        assert!(stride >= cols, "Rows: stride {stride} < cols {cols}");
        assert!(rows == 0 || cols == 0 || data.len() >= (rows - 1) * stride + cols, "Rows: data too short");
        Rows { data, rows, cols, stride }
    }

    /// A contiguous row-major `rows × cols` matrix (`data.len() == rows·cols`).
    pub fn contiguous(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "Rows::contiguous: wrong length");
        Rows::new(data, rows, cols, cols)
    }

    /// Head `(b, h)` of `x [batch, seq, heads, width]` (row-major, contiguous): `seq × width`.
    pub fn head(x: &'a [T], seq: usize, heads: usize, width: usize, b: usize, h: usize) -> Self {
        let start = (b * seq * heads + h) * width;
        Rows::new(&x[start.min(x.len())..], seq, width, heads * width)
    }

    /// Number of rows.
    #[inline]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row width.
    #[inline]
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `i` (`i < rows`).
    #[inline]
    pub fn row(&self, i: usize) -> &'a [T] {
        debug_assert!(i < self.rows);
        let s = i * self.stride;
        &self.data[s..s + self.cols]
    }

    /// Rows `i0..i0 + n`.
    #[inline]
    pub fn sub(&self, i0: usize, n: usize) -> Rows<'a, T> {
        assert!(i0 + n <= self.rows, "Rows::sub out of range");
        let start = if n == 0 { 0 } else { i0 * self.stride };
        Rows { data: &self.data[start..], rows: n, cols: self.cols, stride: self.stride }
    }

    /// A contiguous row-major copy (`rows·cols` values), for callers that need one.
    pub fn to_vec(&self) -> Vec<T>
    where
        T: Clone,
    {
        (0..self.rows).flat_map(|i| self.row(i).iter().cloned()).collect()
    }

    /// The underlying values from element `(0, 0)` (at least `(rows − 1)·stride + cols` of them when
    /// `rows, cols > 0`) and the row stride: element `(i, c)` is `data[i·stride + c]`.
    #[inline]
    pub(crate) fn parts(&self) -> (&'a [T], usize) {
        (self.data, self.stride)
    }

    /// Pointer to element `(0, 0)` and the row stride, for kernels that address rows themselves
    /// (element `(i, c)` at `ptr + i·stride + c`; valid for `rows × cols` elements).
    #[inline]
    pub(crate) fn raw(&self) -> (*const T, usize) {
        (self.data.as_ptr(), self.stride)
    }

    /// Asks the CPU to bring rows `i0..i0 + n` (clamped to the view) into cache ahead of use: a
    /// hint (a no-op off x86-64), for loops that stream a strided head chunk by chunk, where the
    /// hardware prefetcher does not run ahead of the row stride.
    #[inline]
    pub(crate) fn prefetch(&self, i0: usize, n: usize) {
        prefetch_rows(self.data.as_ptr(), self.stride, self.cols, i0, n.min(self.rows.saturating_sub(i0)));
    }

    /// For a pass that reads the rows one by one: called at row `i`, asks for the rows
    /// `PREFETCH_AHEAD` (64) ahead, `PREFETCH_STEP` (8) of them every 8 rows ([`prefetch`](Self::prefetch)).
    #[inline(always)]
    pub(crate) fn prefetch_ahead(&self, i: usize) {
        if i.is_multiple_of(PREFETCH_STEP) {
            self.prefetch(i + PREFETCH_AHEAD, PREFETCH_STEP);
        }
    }

    /// The rows as a faer matrix view (row stride `stride`, column stride 1).
    #[inline]
    pub fn mat(&self) -> MatRef<'a, T> {
        rm_strided(self.data, self.rows, self.cols, self.stride)
    }
}

/// A writable `rows × cols` matrix with unit column stride: one head of an output tensor, or a
/// contiguous buffer.
#[derive(Debug)]
pub struct RowsMut<'a, T> {
    m: MatMut<'a, T>,
}

impl<'a, T: Scalar> RowsMut<'a, T> {
    /// A contiguous row-major `rows × cols` buffer (`data.len() == rows·cols`).
    pub fn contiguous(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "RowsMut::contiguous: wrong length");
        RowsMut { m: MatMut::from_row_major_slice_mut(data, rows, cols) }
    }

    /// Number of rows.
    #[inline]
    pub fn rows(&self) -> usize {
        self.m.nrows()
    }

    /// Row width.
    #[inline]
    pub fn cols(&self) -> usize {
        self.m.ncols()
    }

    /// Row `i`, as a slice.
    #[inline]
    pub fn row_mut(&mut self, i: usize) -> &mut [T] {
        self.m.rb_mut().row_mut(i).try_as_row_major_mut().expect("unit column stride").as_slice_mut()
    }

    /// Rows `i0..i0 + n`.
    #[inline]
    pub fn sub_mut(&mut self, i0: usize, n: usize) -> RowsMut<'_, T> {
        RowsMut { m: self.m.rb_mut().subrows_mut(i0, n) }
    }

    /// The rows as a faer matrix view.
    #[inline]
    pub fn mat_mut(&mut self) -> MatMut<'_, T> {
        self.m.rb_mut()
    }

    /// Pointer to element `(0, 0)` and the row stride (element `(i, c)` at `ptr + i·stride + c`;
    /// valid for writing `rows × cols` elements while `self` is borrowed).
    #[inline]
    pub(crate) fn raw_mut(&mut self) -> (*mut T, usize) {
        let stride = if self.m.nrows() <= 1 { self.m.ncols() } else { self.m.row_stride() as usize };
        (self.m.rb_mut().as_ptr_mut(), stride)
    }

    /// Sets every entry to zero.
    pub fn fill_zero(&mut self) {
        self.m.fill(T::zero());
    }
}

/// Every head of `x [batch, seq, heads, width]` (row-major, contiguous) as a disjoint writable
/// `seq × width` view, in the order `b · heads + h`. Panics if `x.len() != batch·seq·heads·width`.
pub fn heads_mut<T: Scalar>(x: &mut [T], batch: usize, seq: usize, heads: usize, width: usize) -> Vec<RowsMut<'_, T>> {
    assert_eq!(x.len(), batch * seq * heads * width, "heads_mut: wrong length");
    let mut out = Vec::with_capacity(batch * heads);
    if seq == 0 || width == 0 {
        for _ in 0..batch * heads {
            out.push(RowsMut { m: MatMut::from_row_major_slice_mut(&mut [], seq, width) });
        }
        return out;
    }
    let mut rest = MatMut::from_row_major_slice_mut(x, batch * seq, heads * width);
    for _ in 0..batch {
        let (mut seq_rows, tail) = rest.split_at_row_mut(seq);
        rest = tail;
        for _ in 0..heads {
            let (head, right) = seq_rows.split_at_col_mut(width);
            seq_rows = right;
            out.push(RowsMut { m: head });
        }
    }
    out
}

/// The cache lines of rows `i0..i0 + n` of `cols` values, `stride` apart in `data` (a hint).
#[inline]
fn prefetch_rows<T>(data: *const T, stride: usize, cols: usize, i0: usize, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let size = std::mem::size_of::<T>();
        let base = data as *const i8;
        for i in i0..i0 + n {
            // every 64-byte line the row touches, by absolute address (a row need not start on one)
            let first = base.wrapping_add(i * stride * size);
            let start = first as usize;
            let end = start + (cols * size).max(1) - 1;
            let mut line = start & !63;
            while line <= end {
                // SAFETY: a prefetch never faults; the address is only formed (wrapping), not read.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(first.wrapping_offset(line as isize - start as isize)) };
                line += 64;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, stride, cols, i0, n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_strided_views() {
        let (b, n, h, w) = (2, 3, 4, 5);
        let x: Vec<f64> = (0..b * n * h * w).map(|i| i as f64).collect();
        let mut y = vec![0.0f64; x.len()];
        {
            let mut views = heads_mut(&mut y, b, n, h, w);
            for bi in 0..b {
                for hi in 0..h {
                    let r = Rows::head(&x, n, h, w, bi, hi);
                    let out = &mut views[bi * h + hi];
                    for i in 0..n {
                        out.row_mut(i).copy_from_slice(r.row(i));
                        assert_eq!(r.row(i)[0], x[((bi * n + i) * h + hi) * w]);
                    }
                }
            }
        }
        assert_eq!(x, y);
    }
}
