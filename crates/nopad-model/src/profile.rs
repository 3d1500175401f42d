//! Optional per-op timing of the forward and backward passes (`Model::set_profiling`).
//!
//! Every op boundary records a timestamp in the device's queue ([`Backend::timestamp`]: a CUDA
//! event, or the host clock on the CPU, whose ops run synchronously) and nothing waits: each op is
//! charged the device time between its boundary and the previous one, as in a normal step (launch
//! gaps included, where the host falls behind the device). Time before a pass starts (`start`) is
//! charged to no op.

use nopad_backend::Backend;

use crate::error::Result;

/// Accumulated time per op label.
#[derive(Default)]
pub struct Profile {
    enabled: bool,
    /// One entry per timestamp recorded: the op it closes (None: a `start`).
    stamps: Vec<Option<&'static str>>,
    totals: Vec<(&'static str, f64, u64)>,
}

impl Profile {
    /// Turns timing on or off (off: every call is a no-op).
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
    }

    /// Starts a timed region.
    pub fn start<B: Backend>(&mut self, b: &B) -> Result<()> {
        self.stamp(b, None)
    }

    /// Charges the time since the previous boundary to `label`.
    pub fn mark<B: Backend>(&mut self, b: &B, label: &'static str) -> Result<()> {
        self.stamp(b, Some(label))
    }

    fn stamp<B: Backend>(&mut self, b: &B, label: Option<&'static str>) -> Result<()> {
        if self.enabled {
            b.timestamp()?;
            self.stamps.push(label);
        }
        Ok(())
    }

    /// The totals so far (label, seconds, calls), in first-seen order, and resets them (waits
    /// for the device).
    pub fn take<B: Backend>(&mut self, b: &B) -> Result<Vec<(&'static str, f64, u64)>> {
        let gaps = b.take_timestamps()?;
        let stamps = std::mem::take(&mut self.stamps);
        for (label, dt) in stamps.iter().skip(1).zip(gaps) {
            let Some(label) = *label else { continue };
            match self.totals.iter_mut().find(|(l, _, _)| *l == label) {
                Some(e) => {
                    e.1 += dt;
                    e.2 += 1;
                }
                None => self.totals.push((label, dt, 1)),
            }
        }
        Ok(std::mem::take(&mut self.totals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nopad_backend::cpu::Cpu;

    #[test]
    fn each_op_gets_the_time_since_the_previous_boundary_and_starts_reset_it() {
        let b = Cpu::<f32>::new();
        let mut p = Profile::default();
        p.mark(&b, "off").unwrap(); // disabled: nothing recorded
        p.set_enabled(true);
        let nap = || std::thread::sleep(std::time::Duration::from_millis(20));
        p.start(&b).unwrap();
        nap();
        p.mark(&b, "a").unwrap();
        p.mark(&b, "b").unwrap();
        nap(); // between passes: charged to nobody
        p.start(&b).unwrap();
        nap();
        p.mark(&b, "a").unwrap();
        let t = p.take(&b).unwrap();
        assert_eq!(
            t.iter().map(|e| (e.0, e.2)).collect::<Vec<_>>(),
            [("a", 2), ("b", 1)]
        );
        // Two naps inside passes reach `a`; `b` closes right after `a` (no bound on an upper
        // limit: a loaded machine may oversleep).
        assert!(t[0].1 >= 0.04 && t[1].1 < t[0].1, "{t:?}");
        assert!(p.take(&b).unwrap().is_empty());
    }
}
