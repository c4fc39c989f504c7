//! The registry of temporary files and directories being written (`FILE.tmp-PID`,
//! `CKPT.tmp-PID`), so that an interrupted process (SIGINT, SIGTERM) can remove them before it
//! exits: [`remove_temporary_files`] deletes every registered path and refuses new ones, so no
//! temporary file outlives the process and the previous file at the final path stays intact
//! (it is only ever replaced by an atomic rename).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

struct Registry {
    /// Set by [`remove_temporary_files`]: no new temporary path may be created.
    closed: bool,
    /// Registered paths, each with whether it is a directory.
    paths: Vec<(PathBuf, bool)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { closed: false, paths: Vec::new() });

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn interrupted() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Interrupted, "interrupted: no new files are written")
}

/// Creates (truncates) the file `path` and registers it, atomically with respect to
/// [`remove_temporary_files`]. Errors: the OS error, or `Interrupted` after cleanup began.
pub(crate) fn create_registered_file(path: &Path) -> std::io::Result<File> {
    let mut r = registry();
    if r.closed {
        return Err(interrupted());
    }
    let f = File::create(path)?;
    r.paths.push((path.to_path_buf(), false));
    Ok(f)
}

/// Creates the directory `path` (and its parents) and registers it, as
/// [`create_registered_file`] does a file.
pub(crate) fn create_registered_dir(path: &Path) -> std::io::Result<()> {
    let mut r = registry();
    if r.closed {
        return Err(interrupted());
    }
    std::fs::create_dir_all(path)?;
    r.paths.push((path.to_path_buf(), true));
    Ok(())
}

/// Registers a temporary file that another library creates itself (e.g. a plot backend): it is
/// removed by [`remove_temporary_files`] unless [`forget_temporary`] is called first (after
/// renaming it into place or removing it).
pub fn register_temporary_file(path: &Path) {
    registry().paths.push((path.to_path_buf(), false));
}

/// Drops `path` from the registry (it was renamed into place or removed).
pub fn forget_temporary(path: &Path) {
    let mut r = registry();
    if let Some(i) = r.paths.iter().rposition(|(p, _)| p == path) {
        r.paths.swap_remove(i);
    }
}

/// Removes every registered temporary file and directory that still exists and refuses new
/// ones from then on; returns the paths removed. Meant for a signal handler's thread just before
/// the process exits.
pub fn remove_temporary_files() -> Vec<PathBuf> {
    let mut r = registry();
    r.closed = true;
    let mut removed = Vec::new();
    for (p, is_dir) in r.paths.drain(..) {
        let ok = if is_dir { std::fs::remove_dir_all(&p).is_ok() } else { std::fs::remove_file(&p).is_ok() };
        if ok {
            removed.push(p);
        }
    }
    removed
}
