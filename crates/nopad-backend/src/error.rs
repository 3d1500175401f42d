//! Errors of the backend layer: what failed, in which op or kernel, and what to try.

/// Result of a backend operation.
pub type Result<T> = std::result::Result<T, BackendError>;

/// Everything a backend can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// An op was called with buffers or dimensions that do not fit together (a bug in the
    /// caller, reported instead of reading out of bounds).
    #[error("{op}: {what}")]
    Shape {
        /// The op that checked.
        op: &'static str,
        /// What did not fit, with the numbers.
        what: String,
    },
    /// The requested device or one of its libraries is not available.
    #[error("{0}")]
    Unavailable(String),
    /// A device call failed.
    #[error("{op}: {msg}")]
    Device {
        /// The call or kernel that failed.
        op: String,
        /// The driver's or library's message.
        msg: String,
    },
    /// An input the backend cannot handle (e.g. a head dimension no kernel supports).
    #[error("{0}")]
    Unsupported(String),
}

/// Returns a [`BackendError::Shape`] unless `cond` holds.
pub(crate) fn check(cond: bool, op: &'static str, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(BackendError::Shape { op, what: what() })
    }
}
