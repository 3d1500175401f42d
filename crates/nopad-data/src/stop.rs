//! [`StopFlag`]: a request to stop, shared between whoever raises it (a signal handler, a test)
//! and long data preparation (reading, tokenising, rendering templates), which checks it between
//! records so a first Ctrl-C ends preparation promptly instead of after it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A stop request: 0 while none, else the signal number that asked. Clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicUsize>);

impl StopFlag {
    /// A flag nobody has raised.
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises the flag as `signal` would (a signal handler stores the number itself, through
    /// [`StopFlag::shared`]).
    pub fn raise(&self, signal: i32) {
        self.0.store(signal.max(1) as usize, Ordering::SeqCst);
    }

    /// The signal that asked to stop, if one did.
    pub fn raised(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }

    /// The shared word, for a signal handler that stores the signal number into it.
    pub fn shared(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.0)
    }
}

/// Two options are equal whatever their flags (the flag is a channel, not a setting).
impl PartialEq for StopFlag {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for StopFlag {}
