//! Errors of the training layer.

/// Result of a training operation.
pub type Result<T> = std::result::Result<T, TrainError>;

/// Everything training can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The model or checkpoint layer failed.
    #[error(transparent)]
    Model(#[from] nopad_model::ModelError),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] nopad_backend::BackendError),
    /// The data layer failed.
    #[error(transparent)]
    Data(#[from] nopad_data::DataError),
    /// A setting that cannot work, naming the setting.
    #[error("{0}")]
    Config(String),
    /// Writing a log or report failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A collective between ranks could not complete: a rank failed, left, hung or called
    /// another collective; the message names the rank.
    #[error("{0}")]
    Collective(String),
    /// One rank of a data-parallel run failed (the error that started the failure).
    #[error("rank {rank}: {source}")]
    Rank {
        /// The rank.
        rank: usize,
        /// What it failed with.
        source: Box<TrainError>,
    },
    /// Training stopped because too many steps had a non-finite loss or gradient.
    #[error("{0}")]
    Diverged(String),
    /// A signal stopped the run before its first step (while the data was being prepared), so
    /// there was nothing to save.
    #[error("stopped by signal {0} while preparing the data; nothing was trained or written")]
    Interrupted(i32),
}

/// Maps an OS error to [`TrainError::Io`] naming `path` (for `map_err`).
pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}
