//! `altgrad._core`: the Rust extension module of the `altgrad` Python package (PyO3 + numpy,
//! built by maturin from the repository's `pyproject.toml`). The public Python API lives in
//! `python/altgrad/` (`altgrad.attention`, `altgrad.load`, …); this module is its engine:
//!
//! - [`attn`]: `attention_forward` / `attention_backward` over `[B, T, H, D]` numpy arrays
//!   (exact MATH §2, poly MATH §3–4, ALTGrad MATH §5), zero-copy inputs, the batch looped in Rust;
//! - [`split`]: `poly_split`, the key side and the query side of non-causal polynomial attention
//!   over one piece of a sequence (for `altgrad.distributed`);
//! - [`model`]: `Model` (load, tokenize, loss and gradients with the `altgrad grad --json` report,
//!   the `altgrad inspect` census);
//! - [`runtime`]: the extension's own rayon pool (`set_num_threads`, `get_num_threads`), the GIL
//!   released around every computation, panics caught as `RuntimeError`, library errors as
//!   `ValueError` / `OSError`, and the kernels' own time (`last_kernel_seconds`).

use pyo3::prelude::*;

pub mod attn;
pub mod model;
pub mod runtime;
pub mod split;

/// The module `altgrad._core`.
#[pymodule]
#[pyo3(name = "_core")]
fn altgrad_py(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(attn::attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(attn::attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(split::poly_split, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::last_kernel_seconds, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::kernel_seconds_total, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::_panic_for_tests, m)?)?;
    m.add_class::<model::PyModel>()?;
    m.add("DEFAULT_CHUNK", altgrad::attention::poly::DEFAULT_CHUNK)?;
    m.add("MAX_FEATURE_DIM", altgrad::attention::features::MAX_FEATURE_DIM)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
