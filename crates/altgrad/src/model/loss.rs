//! The models' default losses with their exact gradients (MATH §6: the LM head and the loss are
//! non-attention parts, differentiated exactly; ARCHITECTURE "Losses"): the decoder's LM head and
//! next-token cross-entropy, and the encoder's pooled-norm loss.
//!
//! The `[n, vocab]` logits are never materialized at once: [`lm_cross_entropy`] computes them
//! `chunk` rows at a time, turns each chunk into its gradient in place and immediately
//! back-propagates it into `dhidden` and `dhead`.

use super::layers::PAR_MIN_ELEMS;
use crate::linalg::{matmul, par_all, rm, rm_mut, Scalar};
use crate::simd::dispatch;
use rayon::prelude::*;

/// Mean next-token cross-entropy of an LM head, computed in row chunks so the `[n, vocab]`
/// logits never exist at once.
///
/// Shapes: `hidden [n, dim]` (final normed hidden states), `head [vocab, dim]`
/// (`logits = hidden · headᵀ`), `targets [t]` with `t ≤ n`: row `i < t` predicts `targets[i]`
/// (each `< vocab`); rows `≥ t` have no target and get zero gradient.
///
/// Returns `(loss, dhidden [n, dim])` with (standard definition, HF `CrossEntropyLoss` with mean
/// reduction) `loss = (1/t) Σ_{i<t} (logsumexp(logits_i) − logits_i[targets[i]])` in nats, as f64,
/// and accumulates `dhead [vocab, dim] += dlogitsᵀ · hidden`, where
/// `dlogits_i = (softmax(logits_i) − onehot(targets[i])) / t` and `dhidden = dlogits · head`.
/// The log-sum-exp subtracts the row max and sums in f64. `chunk` (≥ 1, e.g. 256) rows of logits
/// exist at a time: memory `chunk · vocab` values. `t = 0` gives loss 0 and zero gradients.
pub fn lm_cross_entropy<T: Scalar>(
    hidden: &[T],
    dim: usize,
    head: &[T],
    vocab: usize,
    targets: &[u32],
    chunk: usize,
    dhead: &mut [T],
) -> (f64, Vec<T>) {
    assert!(dim > 0 && hidden.len().is_multiple_of(dim), "lm_cross_entropy: hidden must be [n, dim]");
    assert!(vocab > 0, "lm_cross_entropy: vocab must be positive");
    assert_eq!(head.len(), vocab * dim, "lm_cross_entropy: head must be [vocab, dim]");
    assert_eq!(dhead.len(), vocab * dim, "lm_cross_entropy: dhead must be [vocab, dim]");
    assert!(chunk > 0, "lm_cross_entropy: chunk must be positive");
    let n = hidden.len() / dim;
    let t = targets.len();
    assert!(t <= n, "lm_cross_entropy: {t} targets for {n} rows");
    if let Some(&bad) = targets.iter().find(|&&y| y as usize >= vocab) {
        panic!("lm_cross_entropy: target {bad} out of range for vocab {vocab}");
    }
    let mut dhidden = vec![T::zero(); n * dim];
    if t == 0 {
        return (0.0, dhidden);
    }
    let inv_t = 1.0 / t as f64;
    let chunk = chunk.min(t);
    let mut logits = vec![T::zero(); chunk * vocab];
    let head_m = rm(head, vocab, dim);

    // One row: logits → dlogits in place; returns −log softmax(logits)[y].
    // (max, shifted exp and the f64 sum are vectorized passes: AVX-512 or AVX2 at run time)
    let row_loss = |(row, &y): (&mut [T], &u32)| -> f64 {
        let m = T::max_of(row);
        let shift = row[y as usize].as_f64() - m.as_f64();
        T::exp_shift_sum(row, m);
        let s = sum_f64(row);
        let scale = T::from_f64(inv_t / s);
        dispatch(
            #[inline(always)]
            || {
                for v in row.iter_mut() {
                    *v *= scale;
                }
            },
        );
        row[y as usize] -= T::from_f64(inv_t);
        s.ln() - shift
    };

    let mut total = 0.0f64;
    for r0 in (0..t).step_by(chunk) {
        let rc = chunk.min(t - r0);
        let lg = &mut logits[..rc * vocab];
        let h = &hidden[r0 * dim..(r0 + rc) * dim];
        let tg = &targets[r0..r0 + rc];
        matmul(rm_mut(lg, rc, vocab), false, rm(h, rc, dim), head_m.transpose(), T::one(), par_all());
        // Per-row losses collected in order, then summed: deterministic under any thread count.
        let losses: Vec<f64> = if rc * vocab > PAR_MIN_ELEMS {
            lg.par_chunks_mut(vocab).zip(tg.par_iter()).map(row_loss).collect()
        } else {
            lg.chunks_mut(vocab).zip(tg).map(row_loss).collect()
        };
        total += losses.iter().sum::<f64>();
        let lg = &logits[..rc * vocab];
        matmul(
            rm_mut(&mut dhidden[r0 * dim..(r0 + rc) * dim], rc, dim),
            false,
            rm(lg, rc, vocab),
            head_m,
            T::one(),
            par_all(),
        );
        matmul(rm_mut(dhead, vocab, dim), true, rm(lg, rc, vocab).transpose(), rm(h, rc, dim), T::one(), par_all());
    }
    (total * inv_t, dhidden)
}

/// `Σ xs` in f64, in 8 independent lanes (so it vectorizes), then the lanes in order.
fn sum_f64<T: Scalar>(xs: &[T]) -> f64 {
    dispatch(
        #[inline(always)]
        || {
            let mut acc = [0.0f64; 8];
            let chunks = xs.chunks_exact(8);
            let tail: f64 = chunks.remainder().iter().map(|v| v.as_f64()).sum();
            for c in chunks {
                for (a, v) in acc.iter_mut().zip(c) {
                    *a += v.as_f64();
                }
            }
            acc.iter().sum::<f64>() + tail
        },
    )
}

/// Logits of an LM head for every row: `logits = hidden · headᵀ`.
///
/// Shapes: `hidden [n, dim]`, `head [vocab, dim]`; returns `[n, vocab]` (materialized: callers
/// with large `n · vocab` pass a row range of `hidden`). Used by tests and for evaluation.
pub fn lm_logits<T: Scalar>(hidden: &[T], dim: usize, head: &[T], vocab: usize) -> Vec<T> {
    assert!(dim > 0 && hidden.len().is_multiple_of(dim), "lm_logits: hidden must be [n, dim]");
    assert_eq!(head.len(), vocab * dim, "lm_logits: head must be [vocab, dim]");
    let n = hidden.len() / dim;
    let mut out = vec![T::zero(); n * vocab];
    matmul(
        rm_mut(&mut out, n, vocab),
        false,
        rm(hidden, n, dim),
        rm(head, vocab, dim).transpose(),
        T::one(),
        par_all(),
    );
    out
}

/// The default encoder loss (ARCHITECTURE "Losses"): `L = 0.5 · ‖m‖²` with `m = (1/n) Σᵢ hidden[i, :]`
/// the mean-pooled final hidden state. Returns `(L, dL/d hidden)` with
/// `dL/d hidden[i, j] = m_j / n` (`[n, hidden]`, same length as `hidden`). Sums in f64.
///
/// Panics if `n == 0` or `hidden.len()` is not a multiple of `n` (a programming error).
pub fn pooled_norm_loss<T: Scalar>(hidden: &[T], n: usize) -> (f64, Vec<T>) {
    assert!(n > 0 && hidden.len().is_multiple_of(n), "pooled_norm_loss: hidden must be [n, hidden]");
    let h = hidden.len() / n;
    let mut m = vec![0.0f64; h];
    for row in hidden.chunks_exact(h.max(1)) {
        for (mj, v) in m.iter_mut().zip(row) {
            *mj += v.as_f64();
        }
    }
    for mj in m.iter_mut() {
        *mj /= n as f64;
    }
    let loss = 0.5 * m.iter().map(|v| v * v).sum::<f64>();
    let row: Vec<T> = m.iter().map(|v| T::from_f64(v / n as f64)).collect();
    let mut d = Vec::with_capacity(hidden.len());
    for _ in 0..n {
        d.extend_from_slice(&row);
    }
    (loss, d)
}
