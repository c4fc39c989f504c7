//! The layers both model families are built from, each a forward and its hand-written backward
//! (MATH §6: every non-attention part is differentiated exactly; only the attention core is
//! approximated):
//!
//! - [`embed`]: token-embedding lookup;
//! - [`linear`]: `y = x Wᵀ + b`;
//! - [`norm`]: RMSNorm (Llama) and LayerNorm (BERT);
//! - [`act`]: SwiGLU (Llama) and exact-erf GELU (BERT);
//! - [`rope`]: rotary position embedding (Llama);
//! - [`attention`]: self-attention with a per-head method, the models' one call into
//!   [`crate::attention`];
//! - here: the residual add and the parallel split shared by the row-wise kernels.
//!
//! Every function works on row-major slices with the shape passed alongside (`[rows, dim]`), is
//! generic over [`Scalar`] (f32, f64), and accumulates its reductions (norm statistics,
//! weight-gradient sums) in f64. Rows are processed in parallel with rayon when `rows × dim`
//! exceeds [`PAR_MIN_ELEMS`].

pub mod act;
pub mod attention;
pub mod embed;
pub mod linear;
pub mod norm;
pub mod rope;

pub use act::{gelu, gelu_backward, gelu_derivative, gelu_forward, swiglu_backward, swiglu_forward};
pub use attention::AttnCache;
pub use embed::{embedding_backward, embedding_forward};
pub use linear::Linear;
pub use norm::{
    layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward, LayerNormStats, LayerNormWeights,
};
pub use rope::{Rope, RopeLayout};

use crate::linalg::Scalar;
use rayon::prelude::*;

/// Element count above which the row-wise kernels of the model (these layers and
/// [`super::loss`]) split their work over rayon's threads; below it they run as plain loops
/// (thread start-up would dominate). Public so tests can exercise both paths.
pub const PAR_MIN_ELEMS: usize = 1 << 15;

/// Elements per parallel task (a task holds whole rows, at least one).
pub(crate) const PAR_BLOCK_ELEMS: usize = 1 << 13;

/// Rows per parallel task for rows of `dim` elements (at least one).
#[inline]
pub(crate) fn block_rows(dim: usize) -> usize {
    (PAR_BLOCK_ELEMS / dim.max(1)).max(1)
}

/// Residual add, in place: `a += b` elementwise (any shape, equal lengths). Its backward is the
/// identity on both inputs (MATH §6, LSSSZ Lemma J.3).
pub fn add_inplace<T: Scalar>(a: &mut [T], b: &[T]) {
    assert_eq!(a.len(), b.len(), "add_inplace: length mismatch");
    let block = |(ab, bb): (&mut [T], &[T])| {
        for (x, &y) in ab.iter_mut().zip(bb) {
            *x += y;
        }
    };
    if a.len() > PAR_MIN_ELEMS {
        a.par_chunks_mut(PAR_BLOCK_ELEMS).zip(b.par_chunks(PAR_BLOCK_ELEMS)).for_each(block);
    } else {
        block((a, b));
    }
}
