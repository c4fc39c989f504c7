//! The models' default losses (MATH §6, ARCHITECTURE "Losses"): the decoder's chunked next-token
//! cross-entropy through the LM head against a naive log-softmax and central finite differences
//! ([`common::fd_grad`]), and the encoder's pooled-norm loss against finite differences.

mod common;
use altgrad::linalg::rel_err;
use altgrad::model::loss::{lm_cross_entropy, lm_logits, pooled_norm_loss};
use common::{check_close, dot, fd_grad, randn_from, to_f32, to_f64};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Finite-difference step.
const H: f64 = 1e-6;

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

fn problem(seed: u64, n: usize, dim: usize, vocab: usize, t: usize) -> (Vec<f64>, Vec<f64>, Vec<u32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let hidden = randn_from(&mut rng, n * dim);
    let head = randn_from(&mut rng, vocab * dim);
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
    let pre = randn_from(&mut rng, vocab * dim);
    let mut dhead = pre.clone();
    let (_, dhidden) = lm_cross_entropy(&hidden, dim, &head, vocab, &targets, chunk, &mut dhead);
    let dhead: Vec<f64> = dhead.iter().zip(&pre).map(|(a, b)| a - b).collect();
    let fdh = fd_grad(&hidden, H, |h| loss_only(h, dim, &head, vocab, &targets, chunk));
    let fdw = fd_grad(&head, H, |w| loss_only(&hidden, dim, w, vocab, &targets, chunk));
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
    let (h32, w32) = (to_f32(&h64), to_f32(&w64));
    let (h64, w64) = (to_f64(&h32), to_f64(&w32));
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

#[test]
fn pooled_norm_loss_matches_fd() {
    let mut rng = StdRng::seed_from_u64(4);
    let (n, h) = (4, 6);
    let x = randn_from(&mut rng, n * h);
    let (l, d) = pooled_norm_loss(&x, n);
    let fd = fd_grad(&x, H, |x| pooled_norm_loss(x, n).0);
    check_close("pooled_norm_loss", &d, &fd, 1e-8);
    let m: Vec<f64> = (0..h).map(|j| (0..n).map(|i| x[i * h + j]).sum::<f64>() / n as f64).collect();
    assert!((l - 0.5 * dot(&m, &m)).abs() < 1e-14);
}
