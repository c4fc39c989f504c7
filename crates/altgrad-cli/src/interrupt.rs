//! SIGINT and SIGTERM. A thread waits for them (signal-hook's iterator, so nothing runs in the
//! signal handler itself):
//!
//! - while a training run is in its update loop ([`set_graceful`]), the first signal asks it to
//!   stop after the current update (it then saves a checkpoint there and exits); a second one
//!   stops at once, as below;
//! - otherwise the process removes every temporary file the library is writing
//!   (`altgrad::io::remove_temporary_files`: `FILE.tmp-PID`, `CKPT.tmp-PID`), leaving the
//!   previous output files untouched, and exits with status 128 + the signal number.

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static GRACEFUL: AtomicBool = AtomicBool::new(false);

/// Starts the thread that handles SIGINT and SIGTERM. Errors: the OS refused the handlers.
pub fn install() -> std::io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for sig in signals.forever() {
            handle(sig);
        }
    })?;
    Ok(())
}

fn handle(sig: i32) {
    let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
    if GRACEFUL.load(Ordering::SeqCst) && !STOP.swap(true, Ordering::SeqCst) {
        eprintln!(
            "\n{name}: stopping after the current update (a checkpoint will be saved); send it again to stop now"
        );
        return;
    }
    STOP.store(true, Ordering::SeqCst);
    let removed = altgrad::io::remove_temporary_files();
    if removed.is_empty() {
        eprintln!("\ninterrupted ({name})");
    } else {
        let list: Vec<String> = removed.iter().map(|p| p.display().to_string()).collect();
        eprintln!("\ninterrupted ({name}): removed {}; existing output files are unchanged", list.join(", "));
    }
    std::process::exit(128 + sig);
}

/// True once a signal asked a graceful run to stop.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// While `on`, the first signal only asks the run to stop ([`stop_requested`]).
pub fn set_graceful(on: bool) {
    GRACEFUL.store(on, Ordering::SeqCst);
}
