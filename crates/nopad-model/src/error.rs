//! Errors of the model layer: bad configs, bad checkpoints, and backend failures.

use std::path::PathBuf;

/// Result of a model operation.
pub type Result<T> = std::result::Result<T, ModelError>;

/// Everything the model layer can fail with. Each variant names the file, field or tensor.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config field is missing, mistyped or has a value nopad does not support.
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        /// The config file (or `preset NAME`).
        path: String,
        /// The field.
        field: String,
        /// What is wrong and, where possible, what would be accepted.
        msg: String,
    },
    /// A checkpoint tensor is missing, unexpected, mis-shaped or of an unsupported dtype.
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor {
        /// The safetensors file or directory.
        path: PathBuf,
        /// HF name of the tensor.
        tensor: String,
        /// What is wrong.
        msg: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not what it claims to be (bad JSON, bad safetensors header).
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What could not be parsed.
        msg: String,
    },
    /// A batch the model cannot run (e.g. longer than the sliding window).
    #[error("{0}")]
    Input(String),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] nopad_backend::BackendError),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}
