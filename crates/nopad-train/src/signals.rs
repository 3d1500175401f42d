//! Graceful stops: SIGINT and SIGTERM ask a run to finish its current step, save a checkpoint and
//! stop; a second signal ends the process at once (status 128 + signal number), leaving the
//! newest complete checkpoint as it was (saves are atomic, see [`crate::checkpoint`]).
//!
//! The library never installs handlers by itself: the binary calls [`install`] and puts the
//! returned [`Interrupt`] into [`crate::TrainConfig::interrupt`]; tests call
//! [`Interrupt::request`] instead of sending signals.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use nopad_data::StopFlag;

/// A stop request shared between signal handlers (or a test), data preparation and the training
/// loop: preparation stops at once (nothing to save yet), the loop after its current step.
#[derive(Clone, Debug, Default)]
pub struct Interrupt {
    flag: StopFlag,
}

impl Interrupt {
    /// A flag nobody has raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop, as `signal` would.
    pub fn request(&self, signal: i32) {
        self.flag.raise(signal);
    }

    /// The signal that asked the run to stop, if one did.
    pub fn requested(&self) -> Option<i32> {
        self.flag.raised()
    }

    /// The flag data preparation checks ([`nopad_data::LoadOptions::stop`]).
    pub fn flag(&self) -> &StopFlag {
        &self.flag
    }
}

/// Installs handlers for SIGINT and SIGTERM: the first raises the returned [`Interrupt`], a
/// second one exits the process immediately with status 128 + its number (130, 143).
pub fn install() -> std::io::Result<Interrupt> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    let interrupt = Interrupt::new();
    let seen = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // Actions run in registration order: the exit checks `seen` before this signal sets it,
        // so only a second signal exits.
        flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&seen))?;
        flag::register(sig, Arc::clone(&seen))?;
        flag::register_usize(sig, interrupt.flag.shared(), sig as usize)?;
    }
    Ok(interrupt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_seen_by_every_clone() {
        let i = Interrupt::new();
        let j = i.clone();
        assert_eq!(j.requested(), None);
        i.request(15);
        assert_eq!(j.requested(), Some(15));
    }
}
