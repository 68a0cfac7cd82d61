//! Learning-rate schedules, as a function of the step number.
//!
//! A pure function of (step, total steps) so that a resumed run continues
//! on exactly the curve it was on, with nothing to checkpoint.

use serde::{Deserialize, Serialize};

/// How the learning rate moves over a run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Schedule {
    /// The same rate throughout.
    Constant { lr: f64 },
    /// Linear warm-up from 0 over `warmup` of the run, then cosine decay to 0.
    WarmupCosine { lr: f64, warmup: f64 },
    /// Smith's one-cycle: cosine up from `lr / 25` to `lr` over the first
    /// `warmup` of the run, then cosine down to `lr / 1e4` (PyTorch's
    /// `OneCycleLR` defaults).
    OneCycle { lr: f64, warmup: f64 },
}

impl Schedule {
    /// The learning rate for 0-based `step` of `total` steps.
    pub fn lr(&self, step: u64, total: u64) -> f64 {
        let t = if total == 0 {
            1.0
        } else {
            (step as f64 / total as f64).clamp(0.0, 1.0)
        };
        // Cosine interpolation from `a` (at p = 0) to `b` (at p = 1).
        let cos =
            |a: f64, b: f64, p: f64| b + (a - b) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
        match *self {
            Schedule::Constant { lr } => lr,
            Schedule::WarmupCosine { lr, warmup } => {
                if t < warmup {
                    lr * t / warmup
                } else {
                    cos(lr, 0.0, (t - warmup) / (1.0 - warmup).max(f64::EPSILON))
                }
            }
            Schedule::OneCycle { lr, warmup } => {
                if t < warmup {
                    cos(lr / 25.0, lr, t / warmup)
                } else {
                    cos(
                        lr,
                        lr / 25.0 / 1e4,
                        (t - warmup) / (1.0 - warmup).max(f64::EPSILON),
                    )
                }
            }
        }
    }

    /// The peak learning rate, for messages.
    pub fn peak(&self) -> f64 {
        match *self {
            Schedule::Constant { lr }
            | Schedule::WarmupCosine { lr, .. }
            | Schedule::OneCycle { lr, .. } => lr,
        }
    }

    /// A copy with every rate multiplied by `factor` (the NaN guard's back-off).
    pub fn scaled(&self, factor: f64) -> Self {
        let mut s = *self;
        match &mut s {
            Schedule::Constant { lr }
            | Schedule::WarmupCosine { lr, .. }
            | Schedule::OneCycle { lr, .. } => *lr *= factor,
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cycle_rises_then_falls() {
        let s = Schedule::OneCycle {
            lr: 0.2,
            warmup: 0.3,
        };
        assert!((s.lr(0, 100) - 0.2 / 25.0).abs() < 1e-12);
        assert!((s.lr(30, 100) - 0.2).abs() < 1e-12);
        assert!(s.lr(15, 100) < s.lr(29, 100));
        assert!(s.lr(60, 100) < s.lr(31, 100));
        assert!(s.lr(100, 100) < 1e-5);
    }

    #[test]
    fn warmup_cosine_starts_at_zero_and_ends_at_zero() {
        let s = Schedule::WarmupCosine {
            lr: 1e-3,
            warmup: 0.1,
        };
        assert_eq!(s.lr(0, 1000), 0.0);
        assert!((s.lr(100, 1000) - 1e-3).abs() < 1e-12);
        assert!(s.lr(1000, 1000).abs() < 1e-12);
        assert_eq!(s.scaled(0.5).peak(), 5e-4);
    }
}
