//! Rotary position embedding (Su et al. 2021, RoFormer; Llama) and its backward, the inverse
//! rotation (MATH §6: differentiated exactly).

use super::{block_rows, PAR_MIN_ELEMS};
use crate::linalg::Scalar;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How RoPE pairs up the coordinates of a head (MATH §6: part of the exactly differentiated
/// non-attention layers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeLayout {
    /// HF transformers: coordinate `i` pairs with `i + head_dim/2` ("rotate_half").
    RotateHalf,
    /// GGUF / original Meta checkpoints: coordinates `2i` and `2i+1` form a pair.
    Interleaved,
}

/// Rotary position embedding tables (Su et al. 2021, RoFormer; Llama): `cos`/`sin` of
/// `angle(p, i) = p · θ^(−2i/head_dim)` for positions `p < seq_len` and pair indices
/// `i < head_dim/2` (the HF `inv_freq` convention), computed in f64 and rounded to `T`.
///
/// [`Rope::apply`] rotates each coordinate pair of every head by `+angle(p, i)`;
/// [`Rope::apply_inverse`] rotates by `−angle`, which is the transpose (a rotation is
/// orthogonal) and therefore the backward of `apply`. Which coordinates form pair `i` is set by
/// [`RopeLayout`].
#[derive(Clone, Debug)]
pub struct Rope<T> {
    /// `cos(angle(p, i))`, `[seq_len, head_dim/2]`.
    cos: Vec<T>,
    /// `sin(angle(p, i))`, `[seq_len, head_dim/2]`.
    sin: Vec<T>,
    /// Positions covered by the tables.
    seq_len: usize,
    /// Per-head width `d` (even).
    head_dim: usize,
}

impl<T: Scalar> Rope<T> {
    /// Tables for positions `0..seq_len` and heads of width `head_dim` (even, > 0) with base
    /// `theta` (Llama: 10000; `rope_theta` in HF configs).
    pub fn new(seq_len: usize, head_dim: usize, theta: f64) -> Self {
        assert!(
            head_dim > 0 && head_dim.is_multiple_of(2),
            "Rope::new: head_dim ({head_dim}) must be even and positive"
        );
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half).map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64)).collect();
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for p in 0..seq_len {
            for &f in &inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(T::from_f64(c));
                sin.push(T::from_f64(s));
            }
        }
        Rope { cos, sin, seq_len, head_dim }
    }

    /// Number of positions the tables cover (the largest `seq_len` `apply` accepts).
    pub fn max_seq_len(&self) -> usize {
        self.seq_len
    }

    /// Per-head width `d` the tables were built for.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Rotates, in place, every pair of every head of `x [seq_len, num_heads, head_dim]` at
    /// position `p` (the row index, starting at 0) by `+angle(p, i)`:
    /// `(a, b) ↦ (a cos − b sin, b cos + a sin)`, where for pair `i` the coordinates `(a, b)` are
    /// `(i, i + d/2)` for [`RopeLayout::RotateHalf`] and `(2i, 2i+1)` for [`RopeLayout::Interleaved`].
    pub fn apply(&self, x: &mut [T], seq_len: usize, num_heads: usize, layout: RopeLayout) {
        self.rotate(x, seq_len, num_heads, layout, false);
    }

    /// Rotates by `−angle(p, i)`: `(a, b) ↦ (a cos + b sin, b cos − a sin)`. This is the inverse
    /// and the transpose of [`Rope::apply`], hence its backward: `dx = apply_inverse(dy)`.
    /// Shapes as in [`Rope::apply`].
    pub fn apply_inverse(&self, x: &mut [T], seq_len: usize, num_heads: usize, layout: RopeLayout) {
        self.rotate(x, seq_len, num_heads, layout, true);
    }

    fn rotate(&self, x: &mut [T], seq_len: usize, num_heads: usize, layout: RopeLayout, inverse: bool) {
        let d = self.head_dim;
        let half = d / 2;
        assert!(seq_len <= self.seq_len, "Rope: seq_len {seq_len} exceeds the table's {}", self.seq_len);
        assert_eq!(x.len(), seq_len * num_heads * d, "Rope: x must be [seq_len, num_heads, head_dim]");
        let row = num_heads * d;
        if row == 0 {
            return;
        }
        let one_pos = |(p, xr): (usize, &mut [T])| {
            let cs = &self.cos[p * half..(p + 1) * half];
            let sn = &self.sin[p * half..(p + 1) * half];
            for head in xr.chunks_exact_mut(d) {
                for i in 0..half {
                    let (ia, ib) = match layout {
                        RopeLayout::RotateHalf => (i, i + half),
                        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (c, s) = (cs[i], if inverse { -sn[i] } else { sn[i] });
                    let (a, b) = (head[ia], head[ib]);
                    head[ia] = a * c - b * s;
                    head[ib] = b * c + a * s;
                }
            }
        };
        if x.len() > PAR_MIN_ELEMS {
            x.par_chunks_mut(row).enumerate().with_min_len(block_rows(row)).for_each(one_pos);
        } else {
            x.chunks_mut(row).enumerate().for_each(one_pos);
        }
    }
}
