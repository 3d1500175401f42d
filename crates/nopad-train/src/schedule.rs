//! Learning-rate schedules: linear warm-up, then cosine or linear decay (or constant), and the
//! restart of the decay a resumed run that changes its length or learning rate makes.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Shape of the decay after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    /// Half a cosine from the peak to `min_lr`.
    Cosine,
    /// A straight line from the peak to `min_lr`.
    Linear,
    /// The peak forever.
    Constant,
}

impl Decay {
    /// The fraction of the way from `min_lr` to the peak at `progress` (0 to 1) through the
    /// decay.
    fn frac(self, progress: f64) -> f64 {
        match self {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - progress,
            Decay::Constant => 1.0,
        }
    }

    /// The name `FromStr` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Decay::Cosine => "cosine",
            Decay::Linear => "linear",
            Decay::Constant => "constant",
        }
    }
}

impl FromStr for Decay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cosine" => Ok(Decay::Cosine),
            "linear" => Ok(Decay::Linear),
            "constant" => Ok(Decay::Constant),
            _ => Err(format!(
                "unknown schedule `{s}` (expected cosine, linear or constant)"
            )),
        }
    }
}

/// Where a resumed run that changed its length or learning rate restarts the decay: after update
/// `at` (the checkpoint's), from `lr` to `min_lr` at the new `total`, so the learning rate goes
/// on from where the checkpoint left it instead of jumping to the new curve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Restart {
    /// The checkpoint's optimizer update.
    pub at: u64,
    /// The learning rate the decay restarts from: the old schedule's at `at`, times new peak
    /// over old peak.
    pub lr: f64,
}

/// A learning-rate schedule over `total` optimizer updates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Updates of linear warm-up.
    pub warmup: u64,
    /// Total updates.
    pub total: u64,
    /// Decay after warm-up.
    pub decay: Decay,
    /// The restart of a resumed run that changed its schedule (None: the plain curve).
    pub restart: Option<Restart>,
}

impl Schedule {
    /// Learning rate of update `k` (1-based): `lr·k/warmup` during warm-up (so the first update
    /// already moves the weights), then the decay from `lr` at update `warmup` to `min_lr` at
    /// update `total`.
    pub fn lr_at(&self, k: u64) -> f64 {
        if k <= self.warmup && self.warmup > 0 {
            return self.lr * k as f64 / self.warmup as f64;
        }
        let (from, peak) = match self.restart.filter(|r| k > r.at) {
            Some(r) => (r.at, r.lr),
            None => (self.warmup.min(k), self.lr),
        };
        let span = self.total.saturating_sub(from).max(1) as f64;
        let progress = ((k - from) as f64 / span).clamp(0.0, 1.0);
        self.min_lr + (peak - self.min_lr) * self.decay.frac(progress)
    }

    /// This schedule continued by `next` (the same run resumed after update `at` with another
    /// length or learning rate): `next` restarts its decay at `at` from this schedule's rate
    /// there scaled by the ratio of the peaks. Inside the warm-up there is nothing to restart:
    /// the warm-up goes on to the new peak, then decays to the new end.
    pub fn continued(&self, at: u64, next: Schedule) -> Schedule {
        let restart = (at >= next.warmup && at > 0).then(|| Restart {
            at,
            lr: self.lr_at(at) * next.lr / self.lr,
        });
        Schedule { restart, ..next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Warm-up over 10 updates to 1e-3, cosine to 1e-4 at 110.
    fn sample() -> Schedule {
        Schedule {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 10,
            total: 110,
            decay: Decay::Cosine,
            restart: None,
        }
    }

    #[test]
    fn warmup_then_decay_hits_the_ends() {
        let s = sample();
        assert!((s.lr_at(1) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(60) - 5.5e-4).abs() < 1e-12);
        assert!((s.lr_at(110) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(500) - 1e-4).abs() < 1e-12);
        let l = Schedule {
            decay: Decay::Linear,
            ..s
        };
        assert!((l.lr_at(35) - (1e-4 + 9e-4 * 0.75)).abs() < 1e-12);
        let c = Schedule {
            decay: Decay::Constant,
            warmup: 0,
            ..s
        };
        assert_eq!(c.lr_at(1), 1e-3);
        assert!("step".parse::<Decay>().unwrap_err().contains("cosine"));
    }

    #[test]
    fn a_continued_schedule_restarts_from_the_old_rate() {
        let old = sample();
        // Twice as long: the cosine restarts at update 60 from 5.5e-4 down to 1e-4 at 210.
        let longer = old.continued(60, Schedule { total: 210, ..old });
        assert_eq!(longer.restart.unwrap().lr, old.lr_at(60));
        assert!((longer.lr_at(135) - (1e-4 + 4.5e-4 * 0.5)).abs() < 1e-12);
        assert!((longer.lr_at(210) - 1e-4).abs() < 1e-12);
        assert!(longer.lr_at(61) < old.lr_at(60) && longer.lr_at(61) > old.lr_at(61));
        // A new peak scales the rate it restarts from.
        let lower = old.continued(
            60,
            Schedule {
                lr: 5e-4,
                min_lr: 5e-5,
                ..old
            },
        );
        assert!((lower.restart.unwrap().lr - 2.75e-4).abs() < 1e-12);
        assert!((lower.lr_at(110) - 5e-5).abs() < 1e-12);
        // Inside the warm-up the warm-up goes on to the new peak.
        let early = old.continued(5, Schedule { total: 210, ..old });
        assert_eq!(early.restart, None);
        assert_eq!(early.lr_at(10), 1e-3);
    }
}
