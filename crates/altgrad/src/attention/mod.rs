//! Attention: the core of altgrad. Depends on [`crate::linalg`] only.
//!
//! Tensors use the flash-attn layout: `q [batch, seq_len, num_heads, head_dim]`,
//! `k [batch, kv_len, num_kv_heads, head_dim]`, `v [batch, kv_len, num_kv_heads, head_dim_v]`,
//! `o [batch, seq_len, num_heads, head_dim_v]`, `lse [batch, num_heads, seq_len]` (MATH §1). Query
//! head `h` reads key/value head `h / (num_heads / num_kv_heads)` (GQA). A call's inputs are one [`Qkv`]
//! (the tensors and their [`AttnShape`], checked once); forward outputs keep the shape and options
//! they were computed with, so a backward takes only the inputs, the saved forward and `dL/do`.
//! The (sequence, head) pairs of a batch run in parallel (rayon) on strided views of the tensors
//! ([`view`]); each head's kernel is sequential (`Par::Seq` inside: a measured choice). The `_into`
//! entry points write into caller-owned buffers and take a reusable [`Workspace`].

pub mod altgrad;
pub mod bound;
pub mod cost;
pub mod dispatch;
pub mod estimate;
pub mod exact;
mod exact_simd;
pub mod features;
pub mod hybrid;
pub mod method;
#[doc(hidden)]
pub mod naive;
pub mod poly;
pub mod poly_split;
pub mod view;
pub mod workspace;

use crate::linalg::Scalar;
use crate::{Error, Result};
use rayon::prelude::*;
use view::{heads_mut, Rows, RowsMut};

pub use altgrad::{backward_altgrad, backward_altgrad_into};
pub use exact::{backward_exact, backward_exact_into, forward_exact, forward_exact_into};
pub use hybrid::{
    backward_hybrid, backward_hybrid_into, forward_hybrid, forward_hybrid_into, HybridBuffers, HybridOptions,
    HybridOutput, HybridSaved,
};
pub use method::{Budget, Decider, HeadPlan, Method, Policy};
pub use poly::{
    backward_poly, backward_poly_into, backward_poly_state, forward_poly, forward_poly_into, forward_poly_state,
    PolyBuffers, PolyOptions, PolyOutput, PolySaved, PolyState, PolyStateGrad,
};
pub use poly_split::{poly_key_state, poly_key_state_backward, poly_queries, poly_queries_backward, SplitQueryGrads};
pub use workspace::Workspace;

/// The sizes of one attention call. Tensors are `[batch, rows, heads, width]` (MATH §1); the
/// sequences of a batch are independent and share every size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Sequences `B` (≥ 1).
    pub batch: usize,
    /// Query rows `n` per sequence (≥ 1).
    pub seq_len: usize,
    /// Key/value rows `n_k` (≥ 1): `seq_len` unless the mask has a query offset
    /// ([`Mask::kv_len`]: the keys are positions `0..q_offset + seq_len`).
    pub kv_len: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; divides `num_heads`.
    pub num_kv_heads: usize,
    /// Width `d` of queries and keys.
    pub head_dim: usize,
    /// Width `d_v` of values and outputs.
    pub head_dim_v: usize,
}

impl AttnShape {
    /// Shape of one sequence (`batch = 1`) with `kv_len == seq_len` and `head_dim_v == head_dim`.
    pub fn new(seq_len: usize, num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        AttnShape { batch: 1, seq_len, kv_len: seq_len, num_heads, num_kv_heads, head_dim, head_dim_v: head_dim }
    }
    /// The same shape with `batch` sequences.
    pub fn with_batch(self, batch: usize) -> Self {
        AttnShape { batch, ..self }
    }
    /// The same shape with value width `head_dim_v`.
    pub fn with_head_dim_v(self, head_dim_v: usize) -> Self {
        AttnShape { head_dim_v, ..self }
    }
    /// The same shape with `kv_len` key/value rows.
    pub fn with_kv_len(self, kv_len: usize) -> Self {
        AttnShape { kv_len, ..self }
    }
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
    /// Checks that every size is positive and `num_kv_heads | num_heads`.
    pub fn validate(&self) -> Result<()> {
        let s = self;
        if s.batch == 0
            || s.seq_len == 0
            || s.kv_len == 0
            || s.num_heads == 0
            || s.num_kv_heads == 0
            || s.head_dim == 0
            || s.head_dim_v == 0
        {
            return Err(Error::bad("attention shape", format!("every size must be positive, got {s:?}")));
        }
        if !s.num_heads.is_multiple_of(s.num_kv_heads) {
            return Err(Error::bad(
                "attention shape",
                format!("num_heads ({}) is not a multiple of num_kv_heads ({})", s.num_heads, s.num_kv_heads),
            ));
        }
        Ok(())
    }
    /// Query heads of the call, over the batch: `batch · num_heads`. Query head `t` is head
    /// `t % num_heads` of sequence `t / num_heads`; it reads key/value head `t / group()`.
    pub fn heads(&self) -> usize {
        self.batch * self.num_heads
    }
    /// Key/value heads of the call, over the batch: `batch · num_kv_heads`.
    pub fn kv_heads(&self) -> usize {
        self.batch * self.num_kv_heads
    }
    /// Query head `t` ([`heads`](Self::heads)) of `q [batch, seq_len, num_heads, head_dim]` as a
    /// strided view.
    pub(crate) fn query<'a, T>(&self, q: &'a [T], t: usize) -> Rows<'a, T> {
        Rows::head(q, self.seq_len, self.num_heads, self.head_dim, t / self.num_heads, t % self.num_heads)
    }
    /// Key/value head `t` ([`kv_heads`](Self::kv_heads)) of `k [batch, kv_len, num_kv_heads,
    /// head_dim]` as a strided view.
    pub(crate) fn key<'a, T>(&self, k: &'a [T], t: usize) -> Rows<'a, T> {
        Rows::head(k, self.kv_len, self.num_kv_heads, self.head_dim, t / self.num_kv_heads, t % self.num_kv_heads)
    }
    /// Key/value head `t` of `v [batch, kv_len, num_kv_heads, head_dim_v]` as a strided view.
    pub(crate) fn value<'a, T>(&self, v: &'a [T], t: usize) -> Rows<'a, T> {
        Rows::head(v, self.kv_len, self.num_kv_heads, self.head_dim_v, t / self.num_kv_heads, t % self.num_kv_heads)
    }
    /// Query head `t` of an output-like tensor `[batch, seq_len, num_heads, head_dim_v]` (`o`, `dL/do`).
    pub(crate) fn out<'a, T>(&self, o: &'a [T], t: usize) -> Rows<'a, T> {
        Rows::head(o, self.seq_len, self.num_heads, self.head_dim_v, t / self.num_heads, t % self.num_heads)
    }
    /// Every query head of `x [batch, seq_len, num_heads, width]`, writable, in order `t`.
    pub(crate) fn query_views<'a, T: Scalar>(&self, x: &'a mut [T], width: usize) -> Vec<RowsMut<'a, T>> {
        heads_mut(x, self.batch, self.seq_len, self.num_heads, width)
    }
    /// Every key/value head of `x [batch, kv_len, num_kv_heads, width]`, writable, in order.
    pub(crate) fn kv_views<'a, T: Scalar>(&self, x: &'a mut [T], width: usize) -> Vec<RowsMut<'a, T>> {
        heads_mut(x, self.batch, self.kv_len, self.num_kv_heads, width)
    }
    /// Checks `x [batch, rows, heads, width]`'s length; `rows` is `seq_len` or `kv_len`.
    pub(crate) fn check_rows<T>(&self, name: &str, x: &[T], rows: usize, heads: usize, width: usize) -> Result<()> {
        let want = self.batch * rows * heads * width;
        if x.len() != want {
            return Err(Error::bad(
                name,
                format!("expected {want} values ([{}, {rows}, {heads}, {width}]), got {}", self.batch, x.len()),
            ));
        }
        Ok(())
    }
    /// Checks `x [batch, seq_len, heads, width]`'s length.
    pub(crate) fn check_len<T>(&self, name: &str, x: &[T], heads: usize, width: usize) -> Result<()> {
        self.check_rows(name, x, self.seq_len, heads, width)
    }
    /// Checks a per-row vector `x [batch, num_heads, seq_len]` (`lse`, `den`).
    pub(crate) fn check_rowwise<T>(&self, name: &str, x: &[T]) -> Result<()> {
        let want = self.heads() * self.seq_len;
        if x.len() != want {
            return Err(Error::bad(
                name,
                format!("expected {want} values ([batch, num_heads, seq_len]), got {}", x.len()),
            ));
        }
        Ok(())
    }
    /// Errors: [`Error::BadInput`] (input `name`) unless `kv_len == seq_len` (methods whose keys
    /// are the queries' own rows).
    pub(crate) fn check_self(&self, name: &str) -> Result<()> {
        if self.kv_len != self.seq_len {
            return Err(Error::bad(
                name,
                format!("needs as many keys as queries (kv_len {} ≠ seq_len {})", self.kv_len, self.seq_len),
            ));
        }
        Ok(())
    }
}

/// The inputs of one attention call: `q [batch, seq_len, num_heads, head_dim]`,
/// `k [batch, kv_len, num_kv_heads, head_dim]`, `v [batch, kv_len, num_kv_heads, head_dim_v]`
/// (row-major, contiguous, flash-attn's layout) and their [`AttnShape`], checked once by
/// [`Qkv::new`]. Kernels read each head in place as a strided matrix.
#[derive(Clone, Copy, Debug)]
pub struct Qkv<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    shape: AttnShape,
}

impl<'a, T> Qkv<'a, T> {
    /// Checks the shape and every length.
    ///
    /// Errors: [`Error::BadInput`] naming the input (`q`, `k`, `v`, or `attention shape`) whose
    /// length or size is wrong.
    pub fn new(q: &'a [T], k: &'a [T], v: &'a [T], shape: &AttnShape) -> Result<Self> {
        let s = *shape;
        s.validate()?;
        s.check_len("q", q, s.num_heads, s.head_dim)?;
        s.check_rows("k", k, s.kv_len, s.num_kv_heads, s.head_dim)?;
        s.check_rows("v", v, s.kv_len, s.num_kv_heads, s.head_dim_v)?;
        Ok(Qkv { q, k, v, shape: s })
    }
    /// Queries.
    pub fn q(&self) -> &'a [T] {
        self.q
    }
    /// Keys.
    pub fn k(&self) -> &'a [T] {
        self.k
    }
    /// Values.
    pub fn v(&self) -> &'a [T] {
        self.v
    }
    /// The sizes.
    pub fn shape(&self) -> &AttnShape {
        &self.shape
    }
    /// Query head `h` ([`AttnShape::heads`]) and its key/value head, as views.
    pub(crate) fn head(&self, h: usize) -> (Rows<'a, T>, Rows<'a, T>, Rows<'a, T>) {
        let s = &self.shape;
        let kv = h / s.group();
        (s.query(self.q, h), s.key(self.k, kv), s.value(self.v, kv))
    }
    /// Key/value head `h` ([`AttnShape::kv_heads`]), as views.
    pub(crate) fn kv(&self, h: usize) -> (Rows<'a, T>, Rows<'a, T>) {
        (self.shape.key(self.k, h), self.shape.value(self.v, h))
    }
}

/// Which keys each query row sees (MATH §1). Row `i` of a call is position `p = q_offset + i`;
/// keys are positions `0..kv_len`. With a query offset the keys of a call are positions
/// `0..q_offset + seq_len` (flash-attn's kv-cache convention), so `kv_len = q_offset + seq_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mask {
    /// Every key.
    Full,
    /// Keys `j ≤ p` (diagonal included, LSSSZ Def I.2).
    Causal {
        /// Position of the call's first query row.
        q_offset: usize,
    },
    /// A sliding window with attention sinks: keys `j ≤ p` with `p − j < window` (the `window`
    /// latest keys, diagonal included) or `j < sinks` (the first `sinks` keys).
    Window {
        /// Keys in the window (≥ 1, or 0 with at least one sink: sinks only).
        window: usize,
        /// Leading keys every row sees.
        sinks: usize,
        /// Position of the call's first query row.
        q_offset: usize,
    },
}

impl Mask {
    /// `Causal { q_offset: 0 }`.
    pub fn causal() -> Self {
        Mask::Causal { q_offset: 0 }
    }
    /// `Causal { q_offset: 0 }` when `causal`, else `Full`.
    pub fn from_causal(causal: bool) -> Self {
        if causal {
            Mask::causal()
        } else {
            Mask::Full
        }
    }
    /// Whether keys after a row's position are hidden (`Causal` or `Window`).
    pub fn is_causal(&self) -> bool {
        !matches!(self, Mask::Full)
    }
    /// Position of the first query row (0 for `Full`).
    pub fn q_offset(&self) -> usize {
        match *self {
            Mask::Full => 0,
            Mask::Causal { q_offset } | Mask::Window { q_offset, .. } => q_offset,
        }
    }
    /// Whether query position `p` sees key `j`.
    #[inline]
    pub fn allows(&self, p: usize, j: usize) -> bool {
        match *self {
            Mask::Full => true,
            Mask::Causal { .. } => j <= p,
            Mask::Window { window, sinks, .. } => j <= p && (p - j < window || j < sinks),
        }
    }
    /// The same mask for the query rows from `rows` on (their positions start `rows` later).
    pub fn skip_rows(self, rows: usize) -> Mask {
        match self {
            Mask::Full => Mask::Full,
            Mask::Causal { q_offset } => Mask::Causal { q_offset: q_offset + rows },
            Mask::Window { window, sinks, q_offset } => Mask::Window { window, sinks, q_offset: q_offset + rows },
        }
    }
    /// The key/value rows a call of `seq_len` query rows has: `q_offset + seq_len` for `Causal`
    /// and `Window`; `None` for `Full` (any number).
    pub fn kv_len(&self, seq_len: usize) -> Option<usize> {
        self.is_causal().then(|| self.q_offset() + seq_len)
    }
    /// Checks the mask against a shape.
    ///
    /// Errors: [`Error::BadInput`] (input `mask`) for a zero window without sinks (rows that see
    /// no key), or `kv_len` other than [`Mask::kv_len`].
    pub fn validate(&self, s: &AttnShape) -> Result<()> {
        if let Mask::Window { window: 0, sinks: 0, .. } = self {
            return Err(Error::bad("mask", "a sliding window needs at least one key (window ≥ 1, or a sink)"));
        }
        match self.kv_len(s.seq_len) {
            Some(want) if want != s.kv_len => Err(Error::bad(
                "mask",
                format!(
                    "query offset {} and {} query rows need kv_len = {want} keys (positions 0..{want}), the shape has {}",
                    self.q_offset(),
                    s.seq_len,
                    s.kv_len
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Options of an attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnOptions {
    /// Which keys each row sees.
    pub mask: Mask,
    /// Score scale τ; scores are `τ q·k`. Real models use `1/√head_dim`.
    pub scale: f64,
}

impl AttnOptions {
    /// `scale = 1/√head_dim`, [`Mask::from_causal`]`(causal)`.
    pub fn standard(head_dim: usize, causal: bool) -> Self {
        AttnOptions { mask: Mask::from_causal(causal), scale: 1.0 / (head_dim as f64).sqrt() }
    }
    /// `scale = 1/√head_dim`, causal mask without offset.
    pub fn causal(head_dim: usize) -> Self {
        Self::standard(head_dim, true)
    }
    /// `scale = 1/√head_dim`, no mask.
    pub fn full(head_dim: usize) -> Self {
        Self::standard(head_dim, false)
    }
    /// The same options with `mask`.
    pub fn with_mask(self, mask: Mask) -> Self {
        AttnOptions { mask, ..self }
    }
    /// Whether keys after a row's position are hidden ([`Mask::is_causal`]).
    pub fn is_causal(&self) -> bool {
        self.mask.is_causal()
    }
    /// Errors: [`Error::BadInput`] (input `scale`) unless the scale is finite and positive.
    pub fn validate(&self) -> Result<()> {
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(Error::bad("scale", format!("must be finite and positive, got {}", self.scale)));
        }
        Ok(())
    }
    /// [`validate`](Self::validate) and the mask against `s` ([`Mask::validate`]).
    pub fn check(&self, s: &AttnShape) -> Result<()> {
        self.validate()?;
        self.mask.validate(s)
    }
}

/// Output of an exact forward pass: `o [batch, seq_len, num_heads, head_dim_v]`, the per-row
/// log-sum-exp `lse [batch, num_heads, seq_len]` that the backward needs (MATH §2), and the shape
/// and options it was computed with.
#[derive(Clone, Debug)]
pub struct AttnOutput<T> {
    /// Attention output.
    pub o: Vec<T>,
    /// `lse_i = m_i + log l_i` per head and row.
    pub lse: Vec<T>,
    /// The shape of the inputs.
    pub shape: AttnShape,
    /// The options of the call.
    pub opts: AttnOptions,
}

/// Gradients of the inputs, same layouts as `q`, `k`, `v`.
#[derive(Clone, Debug)]
pub struct AttnGrads<T> {
    /// `dL/dq [batch, seq_len, num_heads, head_dim]`.
    pub dq: Vec<T>,
    /// `dL/dk [batch, kv_len, num_kv_heads, head_dim]` (summed over the query heads of each group).
    pub dk: Vec<T>,
    /// `dL/dv [batch, kv_len, num_kv_heads, head_dim_v]`.
    pub dv: Vec<T>,
}

/// Caller-owned gradient buffers (e.g. another framework's tensors), layouts as [`AttnGrads`].
/// The backward kernels overwrite them.
#[derive(Debug)]
pub struct AttnGradsMut<'a, T> {
    /// `dL/dq [batch, seq_len, num_heads, head_dim]`.
    pub dq: &'a mut [T],
    /// `dL/dk [batch, kv_len, num_kv_heads, head_dim]`.
    pub dk: &'a mut [T],
    /// `dL/dv [batch, kv_len, num_kv_heads, head_dim_v]`.
    pub dv: &'a mut [T],
}

impl<T: Scalar> AttnGradsMut<'_, T> {
    /// Errors: [`Error::BadInput`] (input `dq`, `dk` or `dv`) for a wrong length.
    pub(crate) fn check(&self, s: &AttnShape) -> Result<()> {
        s.check_len("dq", self.dq, s.num_heads, s.head_dim)?;
        s.check_rows("dk", self.dk, s.kv_len, s.num_kv_heads, s.head_dim)?;
        s.check_rows("dv", self.dv, s.kv_len, s.num_kv_heads, s.head_dim_v)
    }
    /// Sets every gradient to zero (the kernels accumulate), in parallel blocks of 64 Ki values: a
    /// fresh allocation's first touch (its page faults) and the fill are shared by the threads
    /// instead of taking one thread a pass over all three tensors.
    pub(crate) fn zero(&mut self) {
        for x in [&mut *self.dq, &mut *self.dk, &mut *self.dv] {
            x.par_chunks_mut(1 << 16).for_each(|c| c.fill(T::zero()));
        }
    }
}

impl<T: Scalar> AttnGrads<T> {
    /// Zero gradients of the shape's layouts.
    pub fn zeros(s: &AttnShape) -> Self {
        let (n, nk, b) = (s.seq_len, s.kv_len, s.batch);
        AttnGrads {
            dq: vec![T::zero(); b * n * s.num_heads * s.head_dim],
            dk: vec![T::zero(); b * nk * s.num_kv_heads * s.head_dim],
            dv: vec![T::zero(); b * nk * s.num_kv_heads * s.head_dim_v],
        }
    }
    /// The buffers as [`AttnGradsMut`].
    pub fn as_mut(&mut self) -> AttnGradsMut<'_, T> {
        AttnGradsMut { dq: &mut self.dq, dk: &mut self.dk, dv: &mut self.dv }
    }
}

/// Checks what every backward needs: the inputs' shape is the one `fwd` was computed with, and
/// `o`, `dout` (`[batch, seq_len, num_heads, head_dim_v]`) have their lengths.
///
/// Errors: [`Error::BadInput`] naming `fwd`, `o` or `do`.
pub(crate) fn check_backward<T>(x: &Qkv<'_, T>, fwd_shape: &AttnShape, o: &[T], dout: &[T]) -> Result<()> {
    let s = x.shape;
    if *fwd_shape != s {
        return Err(Error::bad(
            "fwd",
            format!(
                "the forward was computed for {fwd_shape:?}, the inputs have {s:?}: pass the forward of these inputs"
            ),
        ));
    }
    s.check_len("o", o, s.num_heads, s.head_dim_v)?;
    s.check_len("do", dout, s.num_heads, s.head_dim_v)
}

/// Runs `f(h, dq_h, dk_h, dv_h)` for every query head `h` of the batch ([`AttnShape::heads`]) in
/// parallel, with `dq_h` the head's view of `grads.dq` and `dk_h`, `dv_h` views of its key/value
/// head in `grads.dk`, `grads.dv` when there is one query head per key/value head, else per-head
/// buffers summed over each GQA group afterwards (the one place where key/value gradients are
/// summed over a group). `grads` is zeroed first; `f` adds into the views. Returns `f`'s results
/// in head order.
pub(crate) fn query_head_grads<T: Scalar, R: Send, F>(
    s: &AttnShape,
    grads: &mut AttnGradsMut<'_, T>,
    f: F,
) -> Result<Vec<R>>
where
    F: Fn(usize, &mut RowsMut<'_, T>, &mut RowsMut<'_, T>, &mut RowsMut<'_, T>) -> Result<R> + Sync,
{
    let (nk, d, dv, g) = (s.kv_len, s.head_dim, s.head_dim_v, s.group());
    grads.zero();
    let dqs = s.query_views(grads.dq, d);
    let dks = s.kv_views(grads.dk, d);
    let dvs = s.kv_views(grads.dv, dv);
    if g == 1 {
        return dqs
            .into_par_iter()
            .zip(dks.into_par_iter().zip(dvs))
            .enumerate()
            .map(|(h, (mut dqh, (mut dkh, mut dvh)))| f(h, &mut dqh, &mut dkh, &mut dvh))
            .collect();
    }
    type KvBufs<T> = (Vec<T>, Vec<T>);
    let per_head: Vec<(KvBufs<T>, R)> = dqs
        .into_par_iter()
        .enumerate()
        .map(|(h, mut dqh)| {
            let (mut kb, mut vb) = (vec![T::zero(); nk * d], vec![T::zero(); nk * dv]);
            let r =
                f(h, &mut dqh, &mut RowsMut::contiguous(&mut kb, nk, d), &mut RowsMut::contiguous(&mut vb, nk, dv))?;
            Ok(((kb, vb), r))
        })
        .collect::<Result<_>>()?;
    let (bufs, results): (Vec<_>, Vec<R>) = per_head.into_iter().unzip();
    let sums = sum_groups(bufs, g);
    dks.into_par_iter().zip(dvs).zip(sums.par_iter()).for_each(|((mut dkh, mut dvh), (kb, vb))| {
        for i in 0..nk {
            dkh.row_mut(i).copy_from_slice(&kb[i * d..(i + 1) * d]);
            dvh.row_mut(i).copy_from_slice(&vb[i * dv..(i + 1) * dv]);
        }
    });
    Ok(results)
}

/// Values that add up element by element (per-head gradients and states summed over a group).
pub(crate) trait AddAll {
    /// `self += other`, element by element.
    fn add_all(&mut self, other: &Self);
}

impl<T: Copy + std::ops::AddAssign> AddAll for Vec<T> {
    fn add_all(&mut self, other: &Self) {
        for (a, b) in self.iter_mut().zip(other) {
            *a += *b;
        }
    }
}

impl<A: AddAll, B: AddAll> AddAll for (A, B) {
    fn add_all(&mut self, other: &Self) {
        self.0.add_all(&other.0);
        self.1.add_all(&other.1);
    }
}

/// Sums per-query-head values over each GQA group of `group` consecutive heads: one value per
/// key/value head.
pub(crate) fn sum_groups<A: AddAll>(per_head: Vec<A>, group: usize) -> Vec<A> {
    let mut out: Vec<A> = Vec::with_capacity(per_head.len() / group.max(1));
    for (h, x) in per_head.into_iter().enumerate() {
        if h % group == 0 {
            out.push(x);
        } else {
            out.last_mut().expect("group leader pushed first").add_all(&x);
        }
    }
    out
}

/// The score bound `R` of every query head (MATH §3, [`bound::score_bounds`]): shifted scores when
/// `center`, else unshifted; `[batch, num_heads]`, each against its key/value head. O(n·d) per head.
/// A window mask is bounded as the causal mask (its pairs are a subset).
///
/// Errors: [`Error::BadInput`] when `q`/`k` disagree with `shape`, `kv_len ≠ seq_len`, or the
/// scale is not positive.
pub fn head_bounds<T: Scalar>(
    q: &[T],
    k: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
    center: bool,
) -> Result<Vec<f64>> {
    Ok(head_score_bounds(q, k, shape, opts)?.into_iter().map(|b| b.for_center(center)).collect())
}

/// Both score bounds (shifted and unshifted, [`bound::score_bounds`]) of every query head,
/// `[batch, num_heads]`, heads in parallel. O(n·d) per head.
///
/// Errors: as [`head_bounds`].
pub fn head_score_bounds<T: Scalar>(
    q: &[T],
    k: &[T],
    shape: &AttnShape,
    opts: &AttnOptions,
) -> Result<Vec<bound::ScoreBounds>> {
    let s = *shape;
    s.validate()?;
    s.check_len("q", q, s.num_heads, s.head_dim)?;
    s.check_self("k")?;
    s.check_len("k", k, s.num_kv_heads, s.head_dim)?;
    opts.validate()?;
    Ok((0..s.heads())
        .into_par_iter()
        .map(|h| bound::score_bounds(s.query(q, h), s.key(k, h / s.group()), opts.scale, opts.is_causal()))
        .collect())
}

/// The largest `|τ q_i·k_j|` of every query head over the allowed pairs, `[batch, num_heads]`
/// ([`bound::max_abs_score`]; O(n²·d) per head, heads in parallel). For reports.
///
/// Errors: [`Error::BadInput`] when `q`/`k` disagree with `shape` or `kv_len ≠ seq_len`.
pub fn head_max_scores<T: Scalar>(q: &[T], k: &[T], shape: &AttnShape, opts: &AttnOptions) -> Result<Vec<f64>> {
    let s = *shape;
    s.validate()?;
    s.check_len("q", q, s.num_heads, s.head_dim)?;
    s.check_self("k")?;
    s.check_len("k", k, s.num_kv_heads, s.head_dim)?;
    let n = s.seq_len;
    Ok((0..s.heads())
        .into_par_iter()
        .map(|h| {
            let (qh, kh) = (s.query(q, h).to_vec(), s.key(k, h / s.group()).to_vec());
            bound::max_abs_score(&qh, &kh, n, s.head_dim, opts.scale, opts.is_causal())
        })
        .collect())
}
