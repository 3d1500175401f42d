//! `FlashError`, the one error type of the crate, and `driver`, the one helper that turns a
//! driver error into it with a sentence naming what was being done (which kernel, which copy).

/// Errors of planning and launching; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    /// A shape the kernels do not support (head_dim other than 64/128, bad head ratio).
    #[error("unsupported attention shape: {0}")]
    Unsupported(String),
    /// `cu_seqlens` inconsistent with itself or with the dims.
    #[error("invalid cu_seqlens: {0}")]
    InvalidSeqlens(String),
    /// The caller's loader failed to compile or load a module.
    #[error("loading CUDA module {module}: {msg}")]
    Load {
        /// Module name (the .cu file).
        module: String,
        /// The loader's message (compile log included).
        msg: String,
    },
    /// A driver call (function lookup, attribute, copy, launch) failed.
    #[error("{what}: {source}")]
    Driver {
        /// What was being done, naming the kernel.
        what: String,
        /// The driver error.
        source: cudarc::driver::DriverError,
    },
}

/// `map_err` adapter for driver calls: `.map_err(driver(format!("launching {name}")))`.
pub(crate) fn driver(
    what: impl Into<String>,
) -> impl FnOnce(cudarc::driver::DriverError) -> FlashError {
    let what = what.into();
    move |source| FlashError::Driver { what, source }
}
