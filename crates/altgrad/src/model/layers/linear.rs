//! The linear layer `y = x Wᵀ + b` with named parameters and its exact backward (MATH §6), over
//! [`crate::linalg::linear`] / [`crate::linalg::linear_backward`].

use crate::linalg::Scalar;
use crate::model::param::Param;

/// A linear layer `y = x Wᵀ + b`: `weight [out, in]`, optional `bias [out]`.
#[derive(Clone, Debug)]
pub struct Linear<T> {
    /// `[out, in]`.
    pub weight: Param<T>,
    /// `[out]`, when the layer has a bias.
    pub bias: Option<Param<T>>,
}

impl<T: Scalar> Linear<T> {
    /// A zero layer named `{name}.weight` `[out, inp]` and, when `bias`, `{name}.bias` `[out]`
    /// (the HF naming).
    pub fn zeros(name: &str, out: usize, inp: usize, bias: bool) -> Self {
        Linear {
            weight: Param::zeros(format!("{name}.weight"), &[out, inp]),
            bias: bias.then(|| Param::zeros(format!("{name}.bias"), &[out])),
        }
    }
    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.weight.shape[0]
    }
    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.weight.shape[1]
    }
    /// Applies the layer to `x [rows, in]`, returning `[rows, out]`.
    pub fn forward(&self, x: &[T], rows: usize) -> Vec<T> {
        crate::linalg::linear(
            x,
            rows,
            &self.weight.data,
            self.out_dim(),
            self.in_dim(),
            self.bias.as_ref().map(|b| &b.data[..]),
        )
    }
    /// Backward of [`Linear::forward`] on the same `x [rows, in]` with `dy [rows, out]`: returns
    /// `dx = dy W` `[rows, in]` and accumulates `dW += dyᵀ x`, `db += Σ_rows dy` into `grad`.
    pub fn backward(&self, x: &[T], rows: usize, dy: &[T], grad: &mut Linear<T>) -> Vec<T> {
        crate::linalg::linear_backward(
            x,
            rows,
            &self.weight.data,
            self.out_dim(),
            self.in_dim(),
            dy,
            &mut grad.weight.data,
            grad.bias.as_mut().map(|b| &mut b.data[..]),
        )
    }
    /// Zeros shaped and named like `self` (a gradient buffer).
    pub fn zeros_like(&self) -> Self {
        Linear { weight: self.weight.zeros_like(), bias: self.bias.as_ref().map(|b| b.zeros_like()) }
    }
    /// The layer's tensors: weight, then bias when present.
    pub fn params(&self) -> impl Iterator<Item = &Param<T>> {
        std::iter::once(&self.weight).chain(self.bias.as_ref())
    }
    /// The layer's tensors, mutable, same order as [`Linear::params`].
    pub fn params_mut(&mut self) -> impl Iterator<Item = &mut Param<T>> {
        std::iter::once(&mut self.weight).chain(self.bias.as_mut())
    }
}
