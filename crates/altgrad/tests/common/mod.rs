//! Shared helpers for integration tests: seeded random data.
#![allow(dead_code)]

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// `len` standard-normal f64 values from `seed`, times `scale`.
pub fn randn(len: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            scale * z
        })
        .collect::<Vec<f64>>()
}

/// f64 → f32 copy.
pub fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|v| *v as f32).collect()
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

/// The checked inputs of one attention call (panics on a length mismatch: test data is built to fit).
pub fn qkv<'a, T>(
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    s: &altgrad::attention::AttnShape,
) -> altgrad::attention::Qkv<'a, T> {
    altgrad::attention::Qkv::new(q, k, v, s).unwrap()
}
