//! `_core.Model`: a loaded model (`tiny`, `tiny-bounded`, a GGUF file, an HF directory, a
//! training checkpoint; [`altgrad::job::load_model`]) with its tokenizer, its loss and gradients
//! under an attention policy ([`altgrad::job::grad_run`], the same report as `altgrad grad
//! --json`) and the score census ([`altgrad::job::inspect_report`], as `altgrad inspect --json`).
//! The Python class `altgrad.Model` (`python/altgrad/model.py`) wraps it and turns the arrays
//! into torch tensors and the JSON into dicts.

use crate::runtime::run;
use altgrad::attention::Budget;
use altgrad::io::{AnyModel, Loaded};
use altgrad::job;
use altgrad::linalg::Scalar;
use altgrad::Error;
use numpy::{Element, PyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// A model in float32 or float64.
enum Inner {
    F32(Loaded<f32>),
    F64(Loaded<f64>),
}

/// A loaded model (see the module docs). Not constructed directly: `Model.load(spec, dtype, seed)`.
#[pyclass(name = "Model", module = "altgrad._core", frozen)]
pub struct PyModel {
    inner: Inner,
}

/// One gradient: `(name, shape, flat values)`.
type GradOut<'py> = (String, Vec<usize>, Bound<'py, PyAny>);

fn ids_of(ids: Vec<i64>) -> PyResult<Vec<u32>> {
    ids.iter()
        .enumerate()
        .map(|(i, &x)| {
            u32::try_from(x).map_err(|_| {
                PyValueError::new_err(format!("ids: token id {x} at position {i} is negative or too large"))
            })
        })
        .collect()
}

fn config_json<T: Scalar>(l: &Loaded<T>, dtype: &str) -> altgrad::Result<String> {
    let (arch, mut v) = match &l.model {
        AnyModel::Llama(m) => ("llama", serde_json::to_value(&m.cfg)),
        AnyModel::Bert(m) => ("bert", serde_json::to_value(&m.cfg)),
    };
    let v = v.as_mut().map_err(|e| Error::Internal(format!("config: {e}")))?;
    if let Some(o) = v.as_object_mut() {
        o.insert("architecture".into(), arch.into());
        o.insert("dtype".into(), dtype.into());
        o.insert("source".into(), l.source().into());
        o.insert("has_tokenizer".into(), l.tokenizer.is_some().into());
    }
    serde_json::to_string(v).map_err(|e| Error::Internal(format!("config: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn loss_and_grads_t<'py, T: Scalar + Element>(
    py: Python<'py>,
    l: &Loaded<T>,
    ids: Vec<u32>,
    attention: &str,
    degree: Option<usize>,
    tol: f64,
    compare: bool,
    chunk: usize,
    center: bool,
    max_rank: usize,
    budget: Budget,
) -> PyResult<(f64, Vec<GradOut<'py>>, String)> {
    let (pass, report) = run(py, || {
        let policy = job::attention_policy(attention, degree, tol, chunk, center, max_rank, budget)?;
        let r = job::grad_run(l, &ids, "ids", &policy, attention, compare, &|_| {})?;
        let report = serde_json::to_string(&r.report).map_err(|e| Error::Internal(format!("report: {e}")))?;
        Ok((r.pass, report))
    })?;
    let loss = pass.loss;
    let grads = pass
        .grads
        .into_iter()
        .map(|(name, shape, values)| (name, shape, PyArray1::from_vec(py, values).into_any()))
        .collect();
    Ok((loss, grads, report))
}

#[pymethods]
impl PyModel {
    /// `Model.load(spec, dtype="float32", seed=0)`: loads `spec` (`"tiny"`, `"tiny-bounded"`, a
    /// `.gguf` file, an HF directory with `config.json` + `model.safetensors`, or a checkpoint
    /// directory of `altgrad train --checkpoint`); `seed` sets the built-in models' weights.
    ///
    /// Errors: `ValueError` for an unknown or malformed model (naming the file), a bad dtype;
    /// `FileNotFoundError` / `OSError` for unreadable files.
    #[staticmethod]
    #[pyo3(signature = (spec, dtype = "float32", seed = 0))]
    fn load(py: Python<'_>, spec: &str, dtype: &str, seed: u64) -> PyResult<Self> {
        let inner = match dtype {
            "float32" => Inner::F32(run(py, || job::load_model::<f32>(spec, seed))?),
            "float64" => Inner::F64(run(py, || job::load_model::<f64>(spec, seed))?),
            _ => {
                return Err(PyValueError::new_err(format!("dtype: expected \"float32\" or \"float64\", got {dtype:?}")))
            }
        };
        Ok(PyModel { inner })
    }

    /// The configuration as JSON: the model's own config fields (HF names where they exist) plus
    /// `architecture` (`llama` or `bert`), `dtype`, `source` and `has_tokenizer`.
    fn config_json(&self) -> PyResult<String> {
        match &self.inner {
            Inner::F32(l) => config_json(l, "float32"),
            Inner::F64(l) => config_json(l, "float64"),
        }
        .map_err(crate::runtime::to_py_err)
    }

    /// Token ids of `text` as the model's own tokenizer produces them (bytes for `tiny`).
    ///
    /// Errors: `ValueError` when the tokenizer fails.
    fn tokenize(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        match &self.inner {
            Inner::F32(l) => run(py, || l.encode(text)),
            Inner::F64(l) => run(py, || l.encode(text)),
        }
    }

    /// `(loss, [(name, shape, flat grad)], report_json)` of one forward + backward over `ids`
    /// with the attention policy of [`job::attention_policy`]; the report is `altgrad grad
    /// --json`'s. Gradients are named as in the model file, plus `embeddings_grad [n, hidden]`.
    ///
    /// Errors: `ValueError` for bad ids (negative, out of the vocabulary, fewer than 2 for a
    /// decoder) or a bad policy argument (naming it).
    /// `max_slowdown` and `max_memory` (GiB) are [`Budget`]'s limits for forced poly/altgrad;
    /// `force` lifts them.
    #[pyo3(signature = (ids, attention = "exact", degree = None, tol = 1e-3, compare = false, chunk = 64, center = true, max_rank = 65536, max_slowdown = 4.0, max_memory = 8.0, force = false))]
    #[allow(clippy::too_many_arguments)]
    fn loss_and_grads<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<i64>,
        attention: &str,
        degree: Option<usize>,
        tol: f64,
        compare: bool,
        chunk: usize,
        center: bool,
        max_rank: usize,
        max_slowdown: f64,
        max_memory: f64,
        force: bool,
    ) -> PyResult<(f64, Vec<GradOut<'py>>, String)> {
        let ids = ids_of(ids)?;
        let b = if force {
            Budget::UNLIMITED
        } else {
            Budget { max_slowdown, max_memory: max_memory * (1u64 << 30) as f64 }
        };
        match &self.inner {
            Inner::F32(l) => loss_and_grads_t(py, l, ids, attention, degree, tol, compare, chunk, center, max_rank, b),
            Inner::F64(l) => loss_and_grads_t(py, l, ids, attention, degree, tol, compare, chunk, center, max_rank, b),
        }
    }

    /// The `altgrad inspect --json` report on `ids` as JSON (model, seq_len, tol, heads).
    ///
    /// Errors: `ValueError` for bad ids or a `tol` that is not a positive number.
    #[pyo3(signature = (ids, tol = 1e-3, max_rank = 65536))]
    fn inspect_json(&self, py: Python<'_>, ids: Vec<i64>, tol: f64, max_rank: usize) -> PyResult<String> {
        let ids = ids_of(ids)?;
        let to_json = |r: altgrad::report::InspectReport| {
            serde_json::to_string(&r).map_err(|e| Error::Internal(format!("report: {e}")))
        };
        match &self.inner {
            Inner::F32(l) => run(py, || job::inspect_report(l, &ids, "ids", tol, max_rank).and_then(to_json)),
            Inner::F64(l) => run(py, || job::inspect_report(l, &ids, "ids", tol, max_rank).and_then(to_json)),
        }
    }
}
