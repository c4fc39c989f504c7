//! The LM head and the next-token cross-entropy loss, with their exact gradients (MATH §6: the
//! LM head and the loss are non-attention parts, differentiated exactly).
//!
//! The `[n, vocab]` logits are never materialized at once: [`lm_cross_entropy`] computes them
//! `chunk` rows at a time, turns each chunk into its gradient in place and immediately
//! back-propagates it into `dhidden` and `dhead`.

use super::layers::PAR_MIN_ELEMS;
use crate::linalg::{matmul, par_all, rm, rm_mut, Scalar};
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
    let row_loss = |(row, &y): (&mut [T], &u32)| -> f64 {
        let m = row.iter().copied().fold(T::neg_infinity(), T::max);
        let shift = row[y as usize].as_f64() - m.as_f64();
        for v in row.iter_mut() {
            *v -= m;
        }
        T::exp_inplace(row);
        let s: f64 = row.iter().map(|v| v.as_f64()).sum();
        let scale = T::from_f64(inv_t / s);
        for v in row.iter_mut() {
            *v *= scale;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::rel_err;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::StandardNormal;

    fn randn(rng: &mut StdRng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.sample(StandardNormal)).collect()
    }

    fn to32(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }

    fn to64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    /// Independent reference: full logits by triple loop, then log-softmax straight from the
    /// definition `log(Σ_j exp(l_j)) − l_y` (inputs are small enough not to overflow).
    fn naive_loss(hidden: &[f64], dim: usize, head: &[f64], vocab: usize, targets: &[u32]) -> f64 {
        let mut total = 0.0;
        for (i, &y) in targets.iter().enumerate() {
            let logits: Vec<f64> =
                (0..vocab).map(|v| (0..dim).map(|k| hidden[i * dim + k] * head[v * dim + k]).sum::<f64>()).collect();
            let z: f64 = logits.iter().map(|l| l.exp()).sum();
            total += z.ln() - logits[y as usize];
        }
        total / targets.len() as f64
    }

    fn fd_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let h = 1e-6;
        let mut xp = x.to_vec();
        (0..x.len())
            .map(|k| {
                let x0 = xp[k];
                xp[k] = x0 + h;
                let fp = f(&xp);
                xp[k] = x0 - h;
                let fm = f(&xp);
                xp[k] = x0;
                (fp - fm) / (2.0 * h)
            })
            .collect()
    }

    fn problem(seed: u64, n: usize, dim: usize, vocab: usize, t: usize) -> (Vec<f64>, Vec<f64>, Vec<u32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let hidden = randn(&mut rng, n * dim);
        let head = randn(&mut rng, vocab * dim);
        let targets = (0..t).map(|_| rng.random_range(0..vocab as u32)).collect();
        (hidden, head, targets)
    }

    fn loss_only(hidden: &[f64], dim: usize, head: &[f64], vocab: usize, targets: &[u32], chunk: usize) -> f64 {
        let mut dh = vec![0.0; head.len()];
        lm_cross_entropy(hidden, dim, head, vocab, targets, chunk, &mut dh).0
    }

    #[test]
    fn loss_value_matches_naive_log_softmax() {
        let (n, dim, vocab) = (7, 8, 11);
        let (hidden, head, targets) = problem(1, n, dim, vocab, n - 1);
        let reference = naive_loss(&hidden, dim, &head, vocab, &targets);
        for chunk in [1, 3, 6, 7, 256] {
            let l = loss_only(&hidden, dim, &head, vocab, &targets, chunk);
            let e = (l - reference).abs() / reference.abs();
            eprintln!("loss chunk {chunk}: {l} vs naive {reference}: rel {e:.3e}");
            assert!(e < 1e-14);
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (n, dim, vocab, chunk) = (7, 8, 11, 3);
        let (hidden, head, targets) = problem(2, n, dim, vocab, n - 1);
        let mut rng = StdRng::seed_from_u64(22);
        let pre = randn(&mut rng, vocab * dim);
        let mut dhead = pre.clone();
        let (_, dhidden) = lm_cross_entropy(&hidden, dim, &head, vocab, &targets, chunk, &mut dhead);
        let dhead: Vec<f64> = dhead.iter().zip(&pre).map(|(a, b)| a - b).collect();
        let fdh = fd_grad(&hidden, |h| loss_only(h, dim, &head, vocab, &targets, chunk));
        let fdw = fd_grad(&head, |w| loss_only(&hidden, dim, w, vocab, &targets, chunk));
        let (eh, ew) = (rel_err(&dhidden, &fdh), rel_err(&dhead, &fdw));
        eprintln!("loss FD: dhidden {eh:.3e}, dhead {ew:.3e}");
        assert!(eh < 1e-7 && ew < 1e-7);
        // The last row has no target: its gradient is exactly zero.
        assert!(dhidden[(n - 1) * dim..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn no_targets_gives_zero() {
        let (n, dim, vocab) = (3, 4, 5);
        let (hidden, head, _) = problem(3, n, dim, vocab, 0);
        let mut dhead = vec![0.5; vocab * dim];
        let (l, dh) = lm_cross_entropy(&hidden, dim, &head, vocab, &[], 4, &mut dhead);
        assert_eq!(l, 0.0);
        assert!(dh.iter().all(|&v| v == 0.0));
        assert!(dhead.iter().all(|&v| v == 0.5));
    }

    #[test]
    fn large_vocab_parallel_rows_and_chunking() {
        // rows × vocab > PAR_MIN_ELEMS: the rayon softmax path; large logits test the max shift.
        let (n, dim, vocab) = (20, 16, 3000);
        let (hidden, mut head, targets) = problem(4, n, dim, vocab, n - 1);
        let reference = naive_loss(&hidden, dim, &head, vocab, &targets);
        let mut dh_a = vec![0.0; vocab * dim];
        let (la, ga) = lm_cross_entropy(&hidden, dim, &head, vocab, &targets, 256, &mut dh_a);
        let mut dh_b = vec![0.0; vocab * dim];
        let (lb, gb) = lm_cross_entropy(&hidden, dim, &head, vocab, &targets, 3, &mut dh_b);
        eprintln!("large vocab: loss {la} naive {reference}");
        assert!((la - reference).abs() < 1e-12 * reference);
        assert!((la - lb).abs() < 1e-12 * la);
        assert!(rel_err(&ga, &gb) < 1e-12 && rel_err(&dh_a, &dh_b) < 1e-12);
        // Logits of order 1e3 would overflow a naive exp: the loss must stay finite.
        for v in head.iter_mut() {
            *v *= 300.0;
        }
        let mut dh = vec![0.0; vocab * dim];
        let (l, g) = lm_cross_entropy(&hidden, dim, &head, vocab, &targets, 7, &mut dh);
        assert!(l.is_finite() && g.iter().chain(&dh).all(|v| v.is_finite()));
    }

    #[test]
    fn f32_matches_f64() {
        let (n, dim, vocab) = (9, 32, 50);
        let (h64, w64, targets) = problem(5, n, dim, vocab, n - 1);
        let (h32, w32) = (to32(&h64), to32(&w64));
        let (h64, w64) = (to64(&h32), to64(&w32));
        let mut d32 = vec![0.0f32; vocab * dim];
        let mut d64 = vec![0.0f64; vocab * dim];
        let (l32, g32) = lm_cross_entropy(&h32, dim, &w32, vocab, &targets, 4, &mut d32);
        let (l64, g64) = lm_cross_entropy(&h64, dim, &w64, vocab, &targets, 4, &mut d64);
        let el = (l32 - l64).abs() / l64.abs();
        let (eg, ed) = (rel_err(&g32, &g64), rel_err(&d32, &d64));
        let elog = rel_err(&lm_logits(&h32, dim, &w32, vocab), &lm_logits(&h64, dim, &w64, vocab));
        eprintln!("loss f32 vs f64: loss {el:.3e} dhidden {eg:.3e} dhead {ed:.3e} logits {elog:.3e}");
        assert!(el < 1e-5 && eg < 1e-5 && ed < 1e-5 && elog < 1e-5);
    }

    #[test]
    fn logits_match_triple_loop() {
        let (n, dim, vocab) = (5, 8, 11);
        let (hidden, head, _) = problem(6, n, dim, vocab, 0);
        let l = lm_logits(&hidden, dim, &head, vocab);
        for i in 0..n {
            for v in 0..vocab {
                let r: f64 = (0..dim).map(|k| hidden[i * dim + k] * head[v * dim + k]).sum();
                assert!((l[i * vocab + v] - r).abs() < 1e-13);
            }
        }
    }
}
