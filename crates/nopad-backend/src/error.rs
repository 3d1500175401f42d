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
    /// The device has no room for an allocation, even after the cached blocks were given back.
    #[error(
        "out of GPU memory allocating {what}: asked for {}, with {} held by nopad and {} free \
         of the device's {}; try a smaller --batch-size or --max-len, --recompute mlp or full, \
         or check that no other process holds the GPU (nvidia-smi)",
        gib(*requested), gib(*held), gib(*free), gib(*total)
    )]
    OutOfMemory {
        /// What was being allocated (set by the caller that knows: "activations for 8192
        /// tokens", "the optimizer's moments"), else the size class.
        what: String,
        /// Bytes asked for.
        requested: usize,
        /// Bytes nopad held from the driver at the time (live buffers and cache).
        held: usize,
        /// Bytes the driver reported free.
        free: usize,
        /// The device's memory.
        total: usize,
    },
}

fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

impl BackendError {
    /// Names what was being allocated when this is an out-of-memory error; other errors pass
    /// through unchanged.
    pub fn while_allocating(self, what: impl FnOnce() -> String) -> Self {
        match self {
            BackendError::OutOfMemory {
                requested,
                held,
                free,
                total,
                ..
            } => BackendError::OutOfMemory {
                what: what(),
                requested,
                held,
                free,
                total,
            },
            e => e,
        }
    }
}

/// Returns a [`BackendError::Shape`] unless `cond` holds.
pub(crate) fn check(cond: bool, op: &'static str, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(BackendError::Shape { op, what: what() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_says_what_how_much_and_what_to_try() {
        let e = BackendError::OutOfMemory {
            what: "a buffer of 512 bytes".into(),
            requested: 16 << 30,
            held: 60 << 30,
            free: 3 << 29,
            total: 80 << 30,
        }
        .while_allocating(|| "AdamW's moments of 8030261248 parameters".into());
        let msg = e.to_string();
        for part in [
            "out of GPU memory allocating AdamW's moments of 8030261248 parameters",
            "asked for 16.00 GiB",
            "60.00 GiB held by nopad",
            "1.50 GiB free of the device's 80.00 GiB",
            "--batch-size",
        ] {
            assert!(msg.contains(part), "{part:?} missing from {msg:?}");
        }
        // Other errors pass through unchanged.
        let other = BackendError::Unsupported("x".into()).while_allocating(|| "y".into());
        assert_eq!(other.to_string(), "x");
    }
}
