//! Named tensors: [`Param`] (one tensor, carrying the name it has in the model file, so gradients
//! come out named as the user's checkpoint names them) and [`ParamSet`] (every tensor of a model
//! in a fixed order; the same container type holds the gradients).

use crate::linalg::Scalar;
use crate::{Error, Result};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// One named tensor, row-major.
#[derive(Clone, Debug)]
pub struct Param<T> {
    /// Name as in the model file (e.g. `model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Shape, outermost first (HF convention: linear weights are `[out, in]`).
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<T>,
}

impl<T: Scalar> Param<T> {
    /// A zero tensor of the given name and shape.
    pub fn zeros(name: impl Into<String>, shape: &[usize]) -> Self {
        Param { name: name.into(), shape: shape.to_vec(), data: vec![T::zero(); shape.iter().product()] }
    }
    /// A zero tensor shaped and named like `self`.
    pub fn zeros_like(&self) -> Self {
        Param { name: self.name.clone(), shape: self.shape.clone(), data: vec![T::zero(); self.data.len()] }
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Every tensor of a model, by name: the weights of a [`super::Network`] and, in the same type,
/// its gradients (`dL/dθ` under θ's name and shape).
///
/// Implemented by [`super::LlamaWeights`] and [`super::bert::BertWeights`]; the order of
/// [`ParamSet::params`] is the family's file order and is the same for weights and gradients.
pub trait ParamSet<T: Scalar>: Clone {
    /// All tensors in a fixed order.
    fn params(&self) -> Vec<&Param<T>>;
    /// All tensors, mutable, same order as [`ParamSet::params`].
    fn params_mut(&mut self) -> Vec<&mut Param<T>>;
    /// The tensors of each layer, first layer to last (each a subset of [`ParamSet::params`], in
    /// that order); embeddings, final norms and heads belong to no layer.
    fn layer_params(&self) -> Vec<Vec<&Param<T>>>;
    /// Zeros shaped and named like `self` (a gradient buffer).
    fn zeros_like(&self) -> Self;
    /// Total number of scalars.
    fn numel(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }
    /// The tensor called `name`, if any.
    fn get(&self, name: &str) -> Option<&Param<T>> {
        self.params().into_iter().find(|p| p.name == name)
    }
}

/// Fills every tensor of `params`, in order, with seeded normal values: `rule(p)` gives the
/// `(mean, std)` of tensor `p`, and one `StdRng` seeded with `seed` draws every value in turn (so
/// the same seed, rule and order always give the same weights).
pub(crate) fn fill_normal<T: Scalar>(params: Vec<&mut Param<T>>, seed: u64, rule: impl Fn(&Param<T>) -> (f64, f64)) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for p in params {
        let (mean, std) = rule(p);
        let dist = Normal::new(mean, std).expect("valid normal");
        for x in p.data.iter_mut() {
            *x = T::from_f64(dist.sample(&mut rng));
        }
    }
}

/// Checks that every value of every tensor is finite.
///
/// Errors: `BadInput` naming `source`, the tensor and the index of its first non-finite value.
pub(crate) fn check_finite_params<T: Scalar>(source: &str, params: &[&Param<T>]) -> Result<()> {
    for p in params {
        if let Some(i) = p.data.iter().position(|x| !x.is_finite()) {
            return Err(Error::bad(source, format!("tensor {} has a non-finite value at index {i}", p.name)));
        }
    }
    Ok(())
}
