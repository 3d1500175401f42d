//! Learning-rate schedules: linear warm-up, then cosine or linear decay (or constant).

use std::str::FromStr;

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
}

impl Schedule {
    /// Learning rate of update `k` (1-based): `lr·k/warmup` during warm-up (so the first update
    /// already moves the weights), then the decay from `lr` at update `warmup` to `min_lr` at
    /// update `total`.
    pub fn lr_at(&self, k: u64) -> f64 {
        if k <= self.warmup && self.warmup > 0 {
            return self.lr * k as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((k - self.warmup.min(k)) as f64 / span).clamp(0.0, 1.0);
        let frac = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - progress,
            Decay::Constant => 1.0,
        };
        self.min_lr + (self.lr - self.min_lr) * frac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_hits_the_ends() {
        let s = Schedule {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 10,
            total: 110,
            decay: Decay::Cosine,
        };
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
}
