//! Shared helpers for integration tests: the one finite-difference gradient ([`fd_grad`], and
//! [`fd_params`] over every parameter of a model), seeded random data, error measures and
//! independent references used by more than one test file.
#![allow(dead_code)]

use altgrad::linalg::rel_err;
use altgrad::model::{Network, ParamSet};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh, empty temporary directory (`altgrad-test-PID-TAG-N` under the system's temp dir),
/// removed with everything in it when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates the directory (removing a leftover of the same name first); panics on failure.
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "altgrad-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Central finite differences of `f` at `x`, in f64: entry `i` is
/// `(f(x + h·eᵢ) − f(x − h·eᵢ)) / 2h` (error `O(h²)` plus rounding `O(ε/h)`; `h = 1e-6` suits
/// O(1) inputs). `f` sees `x` with one entry moved at a time.
pub fn fd_grad(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
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

/// [`fd_grad`] of `f(model)` with respect to every parameter of `model`, one vector per tensor
/// in the order of [`ParamSet::params`] (the order of the gradients `backward` returns).
pub fn fd_params<N: Network<f64> + Clone>(model: &N, h: f64, f: impl Fn(&N) -> f64) -> Vec<Vec<f64>> {
    let mut probe = model.clone();
    let originals: Vec<Vec<f64>> = model.weights().params().iter().map(|p| p.data.clone()).collect();
    originals
        .iter()
        .enumerate()
        .map(|(pi, x0)| {
            let g = fd_grad(x0, h, |x| {
                probe.weights_mut().params_mut()[pi].data.copy_from_slice(x);
                f(&probe)
            });
            probe.weights_mut().params_mut()[pi].data.copy_from_slice(x0);
            g
        })
        .collect()
}

/// `len` standard-normal f64 values from `seed`, times `scale`.
pub fn randn(len: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    randn_from(&mut rng, len).into_iter().map(|z| scale * z).collect()
}

/// The next `len` standard-normal f64 values of `rng` (for tests drawing several inputs from one
/// stream).
pub fn randn_from(rng: &mut StdRng, len: usize) -> Vec<f64> {
    (0..len).map(|_| StandardNormal.sample(rng)).collect()
}

/// f64 → f32 copy.
pub fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|v| *v as f32).collect()
}

/// f32 → f64 copy.
pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|v| *v as f64).collect()
}

/// `Σ aᵢ bᵢ` in f64.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Relative Frobenius error ‖a − b‖ / ‖b‖ in f64; the absolute error ‖a − b‖ when ‖b‖ < 1e-12
/// (e.g. dq for a single token, which is zero up to rounding).
pub fn rel<A: Copy + Into<f64>, B: Copy + Into<f64>>(a: &[A], b: &[B]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((*x).into() - (*y).into()).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| (*y).into().powi(2)).sum::<f64>().sqrt();
    if den < 1e-12 {
        num
    } else {
        num / den
    }
}

/// Asserts `rel_err(got, want) ≤ tol` (MATH §1: `‖got − want‖/‖want‖`), printing the error.
pub fn check_close(name: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    eprintln!("{name}: rel err {e:.3e}");
    assert!(e <= tol, "{name}: relative error {e:e} > {tol:e}");
}

/// LayerNorm straight from its definition (Ba et al. 2016; torch `nn.LayerNorm` over the last
/// dimension, biased variance), two passes, one element at a time: `x [rows, dim]`, `w, b [dim]`.
pub fn layernorm_ref(x: &[f64], dim: usize, w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for r in 0..x.len() / dim {
        let row = &x[r * dim..(r + 1) * dim];
        let mu = row.iter().sum::<f64>() / dim as f64;
        let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / dim as f64;
        for j in 0..dim {
            y[r * dim + j] = (row[j] - mu) / (var + eps).sqrt() * w[j] + b[j];
        }
    }
    y
}

/// The checked inputs of one attention call (panics on a length mismatch: test data is built to fit).
pub fn qkv<'a, T>(
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    s: &altgrad::attention::AttnShape,
) -> altgrad::attention::Qkv<'a, T> {
    altgrad::attention::Qkv::new(q, k, v, s).unwrap()
}
