//! The library's error type.

/// Errors returned by altgrad's public functions.
///
/// `BadInput` and `Io` are the user's to fix (the CLI exits with code 2); `Internal` is a bug
/// (exit code 1).
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// An input (file, tensor, flag, token id, …) is malformed; `input` names it.
    #[error("{input}: {msg}")]
    BadInput {
        /// What the user gave: a path, a tensor name, a flag.
        input: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's error (shown in the message, so not also chained as a source).
        err: std::io::Error,
    },
    /// A condition the code should never reach.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::BadInput`].
    pub fn bad(input: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::BadInput { input: input.into(), msg: msg.into() }
    }
    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), err: source }
    }
    /// The same error reported against `input` (e.g. a command-line flag) instead of the name
    /// it had (`degree` → `--degree`), so messages never stack two names
    /// ("--degree: degree: …"). Other kinds are returned unchanged.
    pub fn relabel(self, input: impl Into<String>) -> Self {
        match self {
            Error::BadInput { msg, .. } => Error::BadInput { input: input.into(), msg },
            other => other,
        }
    }
    /// [`Error::relabel`] by flag: an error about `degree` or `chunk` (as the attention
    /// options name them) becomes one about `--degree` or `--chunk`.
    pub fn for_flags(self) -> Self {
        match &self {
            Error::BadInput { input, .. } if !input.starts_with("--") => {
                let flag = format!("--{}", input.replace(['_', ' '], "-"));
                self.relabel(flag)
            }
            _ => self,
        }
    }
    /// True for errors caused by the user's input (exit code 2).
    pub fn is_user_error(&self) -> bool {
        !matches!(self, Error::Internal(_))
    }
}

/// `Result` with altgrad's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks that a computed result (attention output, loss, gradient, …) is finite: finite inputs
/// whose intermediates overflow give NaN or ±inf, which must not pass silently.
///
/// Errors: `BadInput` whose input is `stage` (what was being computed) and whose message gives
/// how many values are not finite, the first one and its index, and `advice` (what to change:
/// float64, a lower degree, a lower learning rate, …).
pub fn check_finite_result<T: crate::linalg::Scalar>(stage: &str, values: &[T], advice: &str) -> Result<()> {
    let Some(first) = values.iter().position(|x| !x.as_f64().is_finite()) else { return Ok(()) };
    let count = values.iter().filter(|x| !x.as_f64().is_finite()).count();
    Err(Error::bad(
        stage,
        format!(
            "{count} of {} values are not finite (first: {} at index {first}) although the inputs are: the \
             computation overflowed {}; {advice}",
            values.len(),
            values[first].as_f64(),
            T::DTYPE
        ),
    ))
}
