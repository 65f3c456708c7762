//! Choosing the next token from logits: greedy (argmax) or seeded temperature / top-p (nucleus)
//! sampling. The random stream is ChaCha8 seeded from the user's seed, so a seed gives the same
//! text on every platform and rand version.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (the lowest id on ties).
    Greedy,
    /// Sample from softmax(logits / temperature), restricted to the smallest set of most likely
    /// tokens whose probability reaches `top_p` (1.0: no restriction).
    Random {
        temperature: f64,
        top_p: f64,
        seed: u64,
    },
}

impl Sampling {
    /// Check the settings; the message names the bad value.
    pub fn validate(&self) -> Result<(), String> {
        if let Sampling::Random {
            temperature, top_p, ..
        } = *self
        {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(format!(
                    "temperature must be a positive number, got {temperature} (use greedy decoding for 0)"
                ));
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(format!("top-p must be in (0, 1], got {top_p}"));
            }
        }
        Ok(())
    }
}

/// A token chooser with its random state.
pub struct Sampler {
    sampling: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Self {
        let seed = match sampling {
            Sampling::Greedy => 0,
            Sampling::Random { seed, .. } => seed,
        };
        Sampler {
            sampling,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The next token id for one position's logits. Errors when the logits are empty or not
    /// finite (a broken model must not produce silently wrong text).
    pub fn next(&mut self, logits: &[f32]) -> Result<u32, String> {
        if logits.is_empty() {
            return Err("the model returned no logits".to_string());
        }
        if let Some(position) = logits.iter().position(|v| v.is_nan()) {
            return Err(format!(
                "the model returned NaN logits (token id {position})"
            ));
        }
        match self.sampling {
            Sampling::Greedy => Ok(argmax(logits)),
            Sampling::Random {
                temperature, top_p, ..
            } => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if max == f32::NEG_INFINITY {
                    return Err("every logit is -inf".to_string());
                }
                let mut weights: Vec<(u32, f64)> = logits
                    .iter()
                    .enumerate()
                    .map(|(id, &v)| {
                        (
                            id as u32,
                            ((f64::from(v) - f64::from(max)) / temperature).exp(),
                        )
                    })
                    .collect();
                let total: f64 = weights.iter().map(|(_, w)| w).sum();
                // Most likely first; ties by id so the order is deterministic.
                weights.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let mut kept = 0;
                let mut cumulative = 0.0;
                for (_, weight) in &weights {
                    kept += 1;
                    cumulative += weight / total;
                    if cumulative >= top_p {
                        break;
                    }
                }
                weights.truncate(kept.max(1));
                let kept_total: f64 = weights.iter().map(|(_, w)| w).sum();
                let draw = self.rng.random::<f64>() * kept_total;
                let mut running = 0.0;
                for (id, weight) in &weights {
                    running += weight;
                    if draw < running {
                        return Ok(*id);
                    }
                }
                // Rounding left the draw at the very top: the last kept token.
                Ok(weights.last().map(|(id, _)| *id).unwrap_or(0))
            }
        }
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (index, value) in values.iter().enumerate() {
        if *value > values[best] {
            best = index;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut sampler = Sampler::new(Sampling::Greedy);
        assert_eq!(sampler.next(&[0.1, 3.0, 3.0, -1.0]).unwrap(), 1);
    }

    #[test]
    fn nan_logits_are_an_error() {
        let mut sampler = Sampler::new(Sampling::Greedy);
        assert!(sampler.next(&[0.1, f32::NAN]).unwrap_err().contains("NaN"));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ≈ [0.665, 0.245, 0.090]: top_p 0.6 keeps only token 0.
        let logits = [2.0f32, 1.0, 0.0];
        let mut sampler = Sampler::new(Sampling::Random {
            temperature: 1.0,
            top_p: 0.6,
            seed: 7,
        });
        for _ in 0..50 {
            assert_eq!(sampler.next(&logits).unwrap(), 0);
        }
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 0.25, 0.75
        let draw = |seed| {
            let mut sampler = Sampler::new(Sampling::Random {
                temperature: 1.0,
                top_p: 1.0,
                seed,
            });
            (0..4000)
                .map(|_| sampler.next(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        let first = draw(3);
        assert_eq!(first, draw(3), "same seed, same tokens");
        assert_ne!(first, draw(4), "another seed, other tokens");
        let ones = first.iter().filter(|&&t| t == 1).count() as f64 / first.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "frequency of token 1: {ones}");
    }

    #[test]
    fn settings_are_validated() {
        let bad = Sampling::Random {
            temperature: 0.0,
            top_p: 0.9,
            seed: 0,
        };
        assert!(bad.validate().unwrap_err().contains("temperature"));
        let bad = Sampling::Random {
            temperature: 0.7,
            top_p: 1.5,
            seed: 0,
        };
        assert!(bad.validate().unwrap_err().contains("top-p"));
        assert!(Sampling::Greedy.validate().is_ok());
    }
}
