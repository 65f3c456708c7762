//! Learning-rate schedules with linear warmup, with transformers' exact semantics
//! (`get_{constant,linear,cosine}_schedule_with_warmup`): optimizer step k (0-based) uses
//! `base_lr · λ(k)`, so with warmup the very first step has learning rate 0, as in transformers.
//! Pure arithmetic; knows nothing of tensors.

pub use crate::config::train::ScheduleKind;

/// A schedule over a known number of optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// The multiplier λ(step).
    pub fn factor(&self, step: u64) -> f64 {
        let step_f = step as f64;
        if step < self.warmup_steps {
            return step_f / (self.warmup_steps.max(1) as f64);
        }
        let remaining = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => {
                (self.total_steps.saturating_sub(step) as f64 / remaining).max(0.0)
            }
            ScheduleKind::Cosine => {
                let progress = (step - self.warmup_steps) as f64 / remaining;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn learning_rate(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            base_lr: 1e-3,
            warmup_steps: 2,
            total_steps: 10,
        }
    }

    #[test]
    fn warmup_is_linear_from_zero() {
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            let s = schedule(kind);
            assert_eq!(s.learning_rate(0), 0.0);
            assert!((s.learning_rate(1) - 0.5e-3).abs() < 1e-15);
            assert!((s.learning_rate(2) - 1e-3).abs() < 1e-15);
        }
    }

    #[test]
    fn linear_decays_to_zero() {
        let s = schedule(ScheduleKind::Linear);
        // transformers: λ(k) = (total - k) / (total - warmup).
        assert!((s.factor(6) - 0.5).abs() < 1e-15);
        assert!((s.factor(9) - 0.125).abs() < 1e-15);
        assert_eq!(s.factor(10), 0.0);
        assert_eq!(s.factor(12), 0.0);
    }

    #[test]
    fn cosine_halves_at_midpoint() {
        let s = schedule(ScheduleKind::Cosine);
        assert!((s.factor(6) - 0.5).abs() < 1e-12);
        // progress 1/8: 0.5·(1 + cos(π/8)).
        let expected = 0.5 * (1.0 + (std::f64::consts::PI / 8.0).cos());
        assert!((s.factor(3) - expected).abs() < 1e-12);
        assert!(s.factor(10).abs() < 1e-12);
    }

    #[test]
    fn constant_without_warmup_is_flat() {
        let s = Schedule {
            warmup_steps: 0,
            ..schedule(ScheduleKind::Constant)
        };
        assert_eq!(s.learning_rate(0), 1e-3);
        assert_eq!(s.learning_rate(9), 1e-3);
    }
}
