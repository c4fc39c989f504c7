//! How every call runs: in this extension's own rayon pool (rayon's global pool can be built only
//! once, and the embedding process may have built it), with the GIL released, panics caught and
//! turned into `RuntimeError`, library errors into `ValueError` / `OSError`, and the kernel's own
//! wall time recorded for `last_kernel_seconds()`.

use pyo3::exceptions::{PyFileNotFoundError, PyMemoryError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The pool every call runs in; `None` until the first call or `set_num_threads`.
static POOL: Mutex<Option<Arc<ThreadPool>>> = Mutex::new(None);
/// Bits of the `f64` seconds the library's kernels took in the last call.
static LAST_KERNEL: AtomicU64 = AtomicU64::new(0);
/// Bits of the `f64` seconds of every kernel since the module was loaded.
static TOTAL_KERNEL: AtomicU64 = AtomicU64::new(0);

fn build(threads: usize) -> PyResult<Arc<ThreadPool>> {
    ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("altgrad-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| PyRuntimeError::new_err(format!("altgrad: cannot start the thread pool: {e}")))
}

/// The current pool, built on first use with rayon's default size (`RAYON_NUM_THREADS`, else
/// every core).
fn pool() -> PyResult<Arc<ThreadPool>> {
    let mut g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = g.as_ref() {
        return Ok(p.clone());
    }
    let p = build(0)?;
    *g = Some(p.clone());
    Ok(p)
}

/// Threads of the current pool (1 when it cannot be built).
pub fn num_threads() -> usize {
    pool().map(|p| p.current_num_threads()).unwrap_or(1)
}

/// `altgrad.set_num_threads(n)`: the number of worker threads of every later call (a new pool;
/// calls already running finish in the old one).
///
/// Errors: `ValueError` when `n < 1` or above 8 × max(cores, 8) (it would only thrash).
#[pyfunction]
pub fn set_num_threads(n: i64) -> PyResult<()> {
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let max = 8 * cores.max(8);
    if n < 1 || n as u64 > max as u64 {
        return Err(PyValueError::new_err(format!(
            "n: the number of threads must be between 1 and {max} on this machine ({cores} cores), got {n}"
        )));
    }
    let p = build(n as usize)?;
    *POOL.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    Ok(())
}

/// `altgrad.get_num_threads()`: the number of worker threads calls run on.
#[pyfunction]
pub fn get_num_threads() -> PyResult<usize> {
    Ok(pool()?.current_num_threads())
}

/// Wall seconds the Rust kernels (the library's forward/backward calls, summed over the batch)
/// took in the last `_core` call; excludes argument checks, copies and the Python wrapper.
#[pyfunction]
pub fn last_kernel_seconds() -> f64 {
    f64::from_bits(LAST_KERNEL.load(Ordering::Relaxed))
}

/// Wall seconds of every kernel since the module was loaded (difference two readings to time a
/// forward + backward pair).
#[pyfunction]
pub fn kernel_seconds_total() -> f64 {
    f64::from_bits(TOTAL_KERNEL.load(Ordering::Relaxed))
}

/// Records `secs` as the last call's kernel time and adds it to the total.
pub fn record_kernel(secs: f64) {
    LAST_KERNEL.store(secs.to_bits(), Ordering::Relaxed);
    let _ =
        TOTAL_KERNEL.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some((f64::from_bits(b) + secs).to_bits()));
}

/// A library error as the Python exception a user expects: `BadInput` → `ValueError`
/// (`"input: message"`), `Io` → `FileNotFoundError` / `OSError`, `Internal` → `RuntimeError`.
pub fn to_py_err(e: altgrad::Error) -> PyErr {
    match &e {
        altgrad::Error::BadInput { .. } => PyValueError::new_err(e.to_string()),
        altgrad::Error::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(e.to_string())
        }
        altgrad::Error::Io { .. } => PyOSError::new_err(e.to_string()),
        altgrad::Error::Internal(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// Runs `f` in the pool with the GIL released. A panic (in `f` or a worker) becomes
/// `RuntimeError` rather than pyo3's `PanicException` (a `BaseException`): it is a bug in altgrad,
/// never the interpreter's end.
pub fn run<R: Send>(py: Python<'_>, f: impl FnOnce() -> altgrad::Result<R> + Send) -> PyResult<R> {
    let pool = pool()?;
    let out = py.detach(|| catch_unwind(AssertUnwindSafe(|| pool.install(f))));
    match out {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py_err(e)),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!("altgrad internal error (a Rust panic, please report it): {msg}")))
        }
    }
}

/// Refuses a call whose estimated working memory exceeds what the machine has free
/// (`MemAvailable` of `/proc/meminfo`), since a failed allocation in Rust aborts the process.
/// `what` says what needs it. No check below 1 GiB (the common case costs no file read) or where
/// `/proc/meminfo` cannot be read.
///
/// Errors: `MemoryError`.
pub fn check_memory(bytes: f64, what: &str) -> PyResult<()> {
    if bytes < f64::powi(2.0, 30) {
        return Ok(());
    }
    let avail = altgrad::bench::available_memory_bytes().map(|b| b as f64);
    match avail {
        Some(a) if bytes > a => Err(PyMemoryError::new_err(format!(
            "{what} needs about {:.1} GiB of working memory, more than the {:.1} GiB available",
            bytes / f64::powi(2.0, 30),
            a / f64::powi(2.0, 30)
        ))),
        _ => Ok(()),
    }
}

/// Test hook: panics inside the pool, to check that a panic reaches Python as `RuntimeError`.
#[pyfunction]
pub fn _panic_for_tests(py: Python<'_>) -> PyResult<()> {
    run(py, || -> altgrad::Result<()> {
        rayon::join(|| (), || panic!("deliberate panic from altgrad._core._panic_for_tests"));
        Ok(())
    })
}
