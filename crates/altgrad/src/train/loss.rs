//! Next-token cross-entropy on selected rows only (MQAR answer positions; all rows for text),
//! with its exact gradient, built on the model's general-loss entry
//! [`Network::backward_hidden_into`]: this module computes `dL/d hidden` and the LM-head gradient,
//! the model does the rest.

use crate::linalg::{matmul, par_all, rm, rm_mut, Scalar};
use crate::model::loss::lm_logits;
use crate::model::{ForwardCache, Grads, Model, Network};
use crate::{Error, Result};

/// Rows of logits materialized at once (`[LOGIT_ROWS, vocab]`).
const LOGIT_ROWS: usize = 256;

/// Result of [`masked_lm_loss`].
#[derive(Clone, Debug)]
pub struct MaskedLoss<T> {
    /// `Σ_j −log softmax(logits[positions[j]])[targets[j]]` in nats (a sum, not a mean).
    pub sum_nll: f64,
    /// How many scored rows have `targets[j]` as their (first) arg-max.
    pub correct: usize,
    /// `scale · dΣ/d hidden` `[n, hidden]` (zero on unscored rows); empty when no gradient was asked.
    pub dhidden: Vec<T>,
}

/// Cross-entropy of the rows `positions` of `cache.hidden` against `targets`.
///
/// With `dhead = Some(buf)` (`[vocab, hidden]`, the LM-head gradient buffer: `lm_head.weight`,
/// or the embedding when tied — see [`lm_head_grad`]) the gradient of `scale · sum_nll` is
/// accumulated into `buf` and returned as `dhidden`; with `None` only the loss and accuracy are
/// computed. Logits are computed for the scored rows only, `256` rows at a time; the log-sum-exp
/// subtracts the row maximum and sums in f64.
///
/// Errors: `positions` and `targets` of different lengths, a position `≥ n`, a target
/// `≥ vocab`.
pub fn masked_lm_loss<T: Scalar>(
    model: &Model<T>,
    cache: &ForwardCache<T>,
    positions: &[usize],
    targets: &[u32],
    scale: f64,
    mut dhead: Option<&mut [T]>,
) -> Result<MaskedLoss<T>> {
    let (n, dim, vocab) = (cache.n, model.cfg.hidden_size, model.cfg.vocab_size);
    if positions.len() != targets.len() {
        return Err(Error::bad("targets", format!("{} positions but {} targets", positions.len(), targets.len())));
    }
    if let Some(&p) = positions.iter().find(|&&p| p >= n) {
        return Err(Error::bad("targets", format!("position {p} is outside the sequence of {n} tokens")));
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::bad("targets", format!("target {t} is ≥ vocab_size {vocab}")));
    }
    let head = &model.weights.head_weight().data;
    let want_grad = dhead.is_some();
    let mut dhidden = if want_grad { vec![T::zero(); n * dim] } else { Vec::new() };
    let (mut sum_nll, mut correct) = (0.0f64, 0usize);
    let mut rows = Vec::with_capacity(LOGIT_ROWS.min(positions.len()) * dim);
    for (pos, tgt) in positions.chunks(LOGIT_ROWS).zip(targets.chunks(LOGIT_ROWS)) {
        let rc = pos.len();
        rows.clear();
        for &p in pos {
            rows.extend_from_slice(&cache.hidden[p * dim..(p + 1) * dim]);
        }
        let mut logits = lm_logits(&rows, dim, head, vocab);
        for (row, &y) in logits.chunks_exact_mut(vocab).zip(tgt) {
            let (mut arg, mut m) = (0usize, T::neg_infinity());
            for (i, &v) in row.iter().enumerate() {
                if v > m {
                    (arg, m) = (i, v);
                }
            }
            correct += usize::from(arg == y as usize);
            let shift = row[y as usize].as_f64() - m.as_f64();
            for v in row.iter_mut() {
                *v -= m;
            }
            T::exp_inplace(row);
            let s: f64 = row.iter().map(|v| v.as_f64()).sum();
            sum_nll += s.ln() - shift;
            if want_grad {
                // row ← scale · (softmax − onehot(y))
                let k = T::from_f64(scale / s);
                for v in row.iter_mut() {
                    *v *= k;
                }
                row[y as usize] -= T::from_f64(scale);
            }
        }
        if let Some(dh) = dhead.as_deref_mut() {
            let lg = rm(&logits, rc, vocab);
            // dhead += dlogitsᵀ · rows
            matmul(rm_mut(dh, vocab, dim), true, lg.transpose(), rm(&rows, rc, dim), T::one(), par_all());
            // dhidden[pos] = dlogits · head
            let mut drows = vec![T::zero(); rc * dim];
            matmul(rm_mut(&mut drows, rc, dim), false, lg, rm(head, vocab, dim), T::one(), par_all());
            for (&p, d) in pos.iter().zip(drows.chunks_exact(dim)) {
                for (a, &b) in dhidden[p * dim..(p + 1) * dim].iter_mut().zip(d) {
                    *a += b;
                }
            }
        }
    }
    Ok(MaskedLoss { sum_nll, correct, dhidden })
}

/// The buffer the LM-head gradient goes to: `lm_head.weight`, or the token embedding when the
/// head is tied to it.
pub fn lm_head_grad<T: Scalar>(grads: &mut Grads<T>) -> &mut [T] {
    &mut grads.weights.head_weight_mut().data
}

/// Gradient of `scale · Σ_j CE(row positions[j], targets[j])` with respect to every parameter,
/// accumulated into `grads` (which must be shaped like the model; its `embeddings` field is
/// replaced by this sequence's `dL/d(input embeddings)`). Returns the loss sum and correct count.
pub fn accumulate_masked_grads<T: Scalar>(
    model: &Model<T>,
    cache: &ForwardCache<T>,
    positions: &[usize],
    targets: &[u32],
    scale: f64,
    grads: &mut Grads<T>,
) -> Result<(f64, usize)> {
    let ml = masked_lm_loss(model, cache, positions, targets, scale, Some(lm_head_grad(grads)))?;
    model.backward_hidden_into(cache, &ml.dhidden, grads)?;
    Ok((ml.sum_nll, ml.correct))
}
