//! Shared helpers for the binary's integration tests: running `altgrad`, temporary directories,
//! fixture paths, and its output as text.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The built `altgrad` binary, ready for arguments.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_altgrad"))
}

/// Runs `altgrad args…` to completion.
pub fn altgrad(args: &[&str]) -> Output {
    bin().args(args).output().expect("run altgrad")
}

/// A fresh, empty directory `altgrad-cli-TAG-PID` under the system's temp dir.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("altgrad-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The path of `tests/fixtures/P` at the repository root.
pub fn fixture(p: &str) -> String {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("tests/fixtures").join(p).display().to_string()
}

/// Standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}
