//! Optional per-op timing of the forward and backward passes (`Model::set_profiling`): the device
//! is synchronised at every op boundary and the host time between boundaries is charged to the
//! op. Synchronising adds launch gaps, so profiled steps run slower than normal ones; the
//! breakdown says where the time goes, not how fast a normal step is.

use std::time::Instant;

use nopad_backend::Backend;

use crate::error::Result;

/// Accumulated time per op label.
#[derive(Default)]
pub struct Profile {
    enabled: bool,
    last: Option<Instant>,
    totals: Vec<(&'static str, f64, u64)>,
}

impl Profile {
    /// Turns timing on or off (off: every call is a no-op).
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        self.last = None;
    }

    /// Starts a timed region (waits for queued work first).
    pub fn start<B: Backend>(&mut self, b: &B) -> Result<()> {
        if self.enabled {
            b.synchronize()?;
            self.last = Some(Instant::now());
        }
        Ok(())
    }

    /// Charges the time since the previous boundary to `label`.
    pub fn mark<B: Backend>(&mut self, b: &B, label: &'static str) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        b.synchronize()?;
        let now = Instant::now();
        if let Some(t) = self.last {
            let dt = (now - t).as_secs_f64();
            match self.totals.iter_mut().find(|(l, _, _)| *l == label) {
                Some(e) => {
                    e.1 += dt;
                    e.2 += 1;
                }
                None => self.totals.push((label, dt, 1)),
            }
        }
        self.last = Some(now);
        Ok(())
    }

    /// The totals so far (label, seconds, calls), in first-seen order, and resets them.
    pub fn take(&mut self) -> Vec<(&'static str, f64, u64)> {
        self.last = None;
        std::mem::take(&mut self.totals)
    }
}
