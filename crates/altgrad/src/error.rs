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
    /// True for errors caused by the user's input (exit code 2).
    pub fn is_user_error(&self) -> bool {
        !matches!(self, Error::Internal(_))
    }
}

/// `Result` with altgrad's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
