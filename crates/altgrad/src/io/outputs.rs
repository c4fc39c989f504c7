//! Output paths checked before any work starts, so a long run never fails at its end because
//! it cannot write its result.

use crate::{Error, Result};
use std::path::Path;

/// The directory `path` would be written into (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Checks that a file can be created in `dir` (a probe file, removed at once).
fn probe_writable(flag: &str, shown: &str, dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".altgrad-write-test-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::bad(
            format!("{flag} {shown}"),
            format!("cannot write in directory {}: {}", dir.display(), plain_io(&e)),
        )),
    }
}

/// An OS error in words, without Rust's `(os error N)` suffix.
fn plain_io(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Checks, before any work, that `path` (given with `flag`, e.g. `--out`) can be written as a
/// file: it is not a directory, its directory exists and a file can be created there.
///
/// Errors: `BadInput` whose input is `"FLAG PATH"` and whose message says what is wrong in
/// plain words (e.g. "directory /nonexistent does not exist").
pub fn check_output_file(flag: &str, path: &Path) -> Result<()> {
    let shown = path.display().to_string();
    if path.as_os_str().is_empty() {
        return Err(Error::bad(flag, "is empty; give a file path"));
    }
    if path.is_dir() {
        return Err(Error::bad(format!("{flag} {shown}"), "is a directory, expected a file path"));
    }
    if path.file_name().is_none() {
        return Err(Error::bad(format!("{flag} {shown}"), "has no file name"));
    }
    let parent = parent_of(path);
    if !parent.exists() {
        return Err(Error::bad(format!("{flag} {shown}"), format!("directory {} does not exist", parent.display())));
    }
    if !parent.is_dir() {
        return Err(Error::bad(format!("{flag} {shown}"), format!("{} is not a directory", parent.display())));
    }
    probe_writable(flag, &shown, parent)
}

/// Checks, before any work, the files `STEM.png` and `STEM.svg` a plot (given with `flag`)
/// will be written to. Errors: as [`check_output_file`].
pub fn check_plot_stem(flag: &str, stem: &Path) -> Result<()> {
    if stem.is_dir() {
        return Err(Error::bad(
            format!("{flag} {}", stem.display()),
            "is a directory; give a file stem (STEM.png and STEM.svg are written)",
        ));
    }
    for ext in ["png", "svg"] {
        check_output_file(flag, &stem.with_extension(ext))?;
    }
    Ok(())
}

/// Checks, before any work, that `dir` (given with `flag`, e.g. `--checkpoint`) can be written
/// as an output directory: it is a directory or does not exist yet, and its nearest existing
/// ancestor is a writable directory (missing directories are created when writing).
///
/// Errors: `BadInput` whose input is `"FLAG DIR"`, in plain words.
pub fn check_output_dir(flag: &str, dir: &Path) -> Result<()> {
    let shown = dir.display().to_string();
    if dir.as_os_str().is_empty() {
        return Err(Error::bad(flag, "is empty; give a directory path"));
    }
    if dir.exists() {
        if !dir.is_dir() {
            return Err(Error::bad(format!("{flag} {shown}"), "exists and is not a directory"));
        }
        return probe_writable(flag, &shown, dir);
    }
    let mut anc = parent_of(dir);
    while !anc.exists() {
        anc = parent_of(anc);
        if anc == Path::new(".") && !anc.exists() {
            break;
        }
    }
    if !anc.is_dir() {
        return Err(Error::bad(format!("{flag} {shown}"), format!("{} is not a directory", anc.display())));
    }
    probe_writable(flag, &shown, anc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tensors::tests::TempDir;

    #[test]
    fn plain_messages_before_any_work() {
        let d = TempDir::new("outputs");
        let f = d.0.join("file.txt");
        std::fs::write(&f, "x").unwrap();
        assert!(check_output_file("--out", &d.0.join("new.safetensors")).is_ok());
        assert!(check_output_file("--out", &f).is_ok());
        let e = check_output_file("--out", Path::new("/nonexistent/p")).unwrap_err().to_string();
        assert_eq!(e, "--out /nonexistent/p: directory /nonexistent does not exist");
        let e = check_output_file("--json", &d.0).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let e = check_output_file("--out", &f.join("x")).unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
        let e = check_plot_stem("--plot", Path::new("/nonexistent/p")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/p.png") && e.contains("does not exist"), "{e}");
        assert!(check_output_dir("--checkpoint", &d.0.join("a/b/c")).is_ok());
        let e = check_output_dir("--checkpoint", &f).unwrap_err().to_string();
        assert!(e.contains("exists and is not a directory"), "{e}");
        let e = check_output_dir("--checkpoint", &f.join("sub")).unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
        // No probe file left behind.
        assert_eq!(std::fs::read_dir(&d.0).unwrap().count(), 1);
    }
}
