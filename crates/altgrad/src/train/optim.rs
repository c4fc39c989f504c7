//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019, PyTorch's `AdamW` update),
//! clipping by global norm, and the linear warm-up + cosine learning-rate schedule.
//!
//! Weight decay applies to tensors with two or more dimensions (linear weights, embeddings, LM
//! head) and never to norms or biases (1-D tensors). Element-wise math is in `T` (f32 for
//! training); norms and bias corrections are accumulated in f64. Every loop is element-wise or a
//! fixed-order sum, so an update is bit-for-bit reproducible under any thread count.

use crate::linalg::Scalar;
use crate::model::{LlamaWeights, Param};
use crate::{Error, Result};
use rayon::prelude::*;

/// AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// β₁ (first-moment decay).
    pub beta1: f64,
    /// β₂ (second-moment decay).
    pub beta2: f64,
    /// ε added to `√v̂`.
    pub eps: f64,
    /// Decoupled weight decay λ (`θ ← θ·(1 − lr·λ)` on ≥ 2-D tensors).
    pub weight_decay: f64,
}

/// Whether a tensor gets weight decay: matrices yes, norms and biases (1-D) no.
pub fn decays(p: &Param<impl Sized>) -> bool {
    p.shape.len() >= 2
}

/// AdamW state: first and second moments of every parameter (same order and names as
/// [`LlamaWeights::params`]) and the number of updates taken.
#[derive(Clone, Debug)]
pub struct AdamW<T> {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Updates taken so far (`t` of the bias corrections).
    pub t: u64,
    /// `m` per parameter.
    pub m: Vec<Param<T>>,
    /// `v` per parameter.
    pub v: Vec<Param<T>>,
}

impl<T: Scalar> AdamW<T> {
    /// Zero moments shaped like `w`.
    pub fn new(cfg: AdamWConfig, w: &LlamaWeights<T>) -> Self {
        let zeros: Vec<Param<T>> = w.params().iter().map(|p| p.zeros_like()).collect();
        AdamW { cfg, t: 0, m: zeros.clone(), v: zeros }
    }

    /// One update of `w` with gradient `g` (same layout), learning rate `lr`, the gradient first
    /// multiplied by `grad_scale` (the clipping factor, 1 when not clipping).
    ///
    /// Per element (PyTorch AdamW): `θ ← θ(1 − lr·λ)` (decayed tensors only), `m ← β₁m + (1−β₁)g`,
    /// `v ← β₂v + (1−β₂)g²`, `θ ← θ − (lr/(1−β₁ᵗ))·m/(√v/√(1−β₂ᵗ) + ε)`.
    ///
    /// Errors: `g` or the state shaped differently from `w` (an internal error).
    pub fn step(&mut self, w: &mut LlamaWeights<T>, g: &LlamaWeights<T>, lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let (b1, b2) = (T::from_f64(c.beta1), T::from_f64(c.beta2));
        let (one_b1, one_b2) = (T::from_f64(1.0 - c.beta1), T::from_f64(1.0 - c.beta2));
        let step_size = T::from_f64(lr / bc1);
        let inv_sqrt_bc2 = T::from_f64(1.0 / bc2.sqrt());
        let eps = T::from_f64(c.eps);
        let gs = T::from_f64(grad_scale);
        let mut params = w.params_mut();
        let grads = g.params();
        if params.len() != grads.len() || params.len() != self.m.len() {
            return Err(Error::Internal("AdamW: parameter lists differ in length".into()));
        }
        let work: Vec<_> = params
            .iter_mut()
            .zip(grads)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .map(|((p, g), (m, v))| (p, g, m, v))
            .collect();
        for (p, g, m, v) in &work {
            if p.data.len() != g.data.len() || p.data.len() != m.data.len() || p.data.len() != v.data.len() {
                return Err(Error::Internal(format!("AdamW: shape mismatch for {}", p.name)));
            }
        }
        work.into_par_iter().for_each(|(p, g, m, v)| {
            let decay = T::from_f64(if decays(p) { 1.0 - lr * c.weight_decay } else { 1.0 });
            for (((x, &gi), mi), vi) in p.data.iter_mut().zip(&g.data).zip(m.data.iter_mut()).zip(v.data.iter_mut()) {
                let gi = gi * gs;
                *mi = b1 * *mi + one_b1 * gi;
                *vi = b2 * *vi + one_b2 * gi * gi;
                *x = *x * decay - step_size * *mi / (vi.sqrt() * inv_sqrt_bc2 + eps);
            }
        });
        Ok(())
    }
}

/// Global L2 norm of all gradients, `√(Σ g²)`, summed in f64 in parameter order.
pub fn global_norm<T: Scalar>(g: &LlamaWeights<T>) -> f64 {
    let per: Vec<f64> =
        g.params().par_iter().map(|p| p.data.iter().map(|&x| x.as_f64() * x.as_f64()).sum::<f64>()).collect();
    per.iter().sum::<f64>().sqrt()
}

/// The factor clipping by global norm applies: `max_norm / norm` when `norm > max_norm > 0`,
/// otherwise 1.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / norm
    } else {
        1.0
    }
}

/// Learning rate of update `step` (0-based) of `total`: linear warm-up from `lr/warmup` to `lr`
/// over the first `warmup` updates, then cosine decay to `min_lr` at the last update (a run with a single
/// post-warm-up update uses `lr`).
pub fn lr_at(step: usize, total: usize, warmup: usize, lr: f64, min_lr: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup + 1);
    let progress = if span == 0 { 0.0 } else { ((step - warmup) as f64 / span as f64).min(1.0) };
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;

    #[test]
    fn schedule_shape() {
        let (t, w, lr, lo) = (100, 10, 1e-3, 1e-4);
        assert!((lr_at(0, t, w, lr, lo) - 1e-4).abs() < 1e-18);
        assert!((lr_at(9, t, w, lr, lo) - lr).abs() < 1e-18);
        assert!((lr_at(10, t, w, lr, lo) - lr).abs() < 1e-18);
        assert!((lr_at(99, t, w, lr, lo) - lo).abs() < 1e-15);
        let mid = lr_at(10 + 89 / 2, t, w, lr, lo);
        assert!((mid - 0.5 * (lr + lo)).abs() < 2e-5);
        for s in 10..99 {
            assert!(lr_at(s + 1, t, w, lr, lo) <= lr_at(s, t, w, lr, lo));
        }
        assert_eq!(lr_at(0, 1, 0, lr, lo), lr);
    }

    #[test]
    fn adamw_matches_the_formula_and_skips_decay_on_norms() {
        let mut cfg = LlamaConfig::tiny();
        (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) = (1, 8, 8, 5);
        (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) = (2, 1, 4);
        let w0: LlamaWeights<f64> = LlamaWeights::random_hf(&cfg, 1);
        let g: LlamaWeights<f64> = LlamaWeights::random_hf(&cfg, 2);
        let oc = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(oc, &w0);
        let mut w = w0.clone();
        let lr = 0.01;
        opt.step(&mut w, &g, lr, 0.5).unwrap();
        opt.step(&mut w, &g, lr, 0.5).unwrap();
        for ((p0, p), gp) in w0.params().iter().zip(w.params()).zip(g.params()) {
            for i in 0..p.data.len() {
                let (mut x, mut m, mut v) = (p0.data[i], 0.0, 0.0);
                for t in 1..=2 {
                    let gi = 0.5 * gp.data[i];
                    if p.shape.len() >= 2 {
                        x *= 1.0 - lr * 0.1;
                    }
                    m = 0.9 * m + 0.1 * gi;
                    v = 0.95 * v + 0.05 * gi * gi;
                    let mh = m / (1.0 - 0.9f64.powi(t));
                    let vh = v / (1.0 - 0.95f64.powi(t));
                    x -= lr * mh / (vh.sqrt() + 1e-8);
                }
                assert!((x - p.data[i]).abs() < 1e-14, "{} [{i}]", p.name);
            }
        }
        assert!(!decays(&w.final_norm) && decays(&w.embed) && decays(&w.layers[0].q_proj.weight));
    }

    #[test]
    fn clipping() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(4.0, 1.0), 0.25);
        assert_eq!(clip_factor(4.0, 0.0), 1.0);
    }
}
