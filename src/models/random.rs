//! Random-init checkpoints: the tensors of a freshly initialised model (transformers' scheme:
//! normal(0, std) for linear and embedding weights, ones for norm weights, zeros for biases), named
//! as the Hugging Face checkpoint names them, for tests, benchmarks and the quickstart model.
//!
//! Must not: be used for anything presented as a trained model.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::ModelConfig;
use super::{gpt2, llama, CausalLm, LinearFactory};

/// Normal(0, std) values from a seeded ChaCha stream (Box–Muller), reproducible across platforms.
fn normal_values(count: usize, std: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut values = Vec::with_capacity(count + 1);
    while values.len() < count {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt() * std;
        let angle = 2.0 * std::f64::consts::PI * u2;
        values.push((radius * angle.cos()) as f32);
        values.push((radius * angle.sin()) as f32);
    }
    values.truncate(count);
    values
}

struct Builder<'a> {
    tensors: HashMap<String, Tensor>,
    rng: ChaCha8Rng,
    std: f64,
    dtype: DType,
    device: &'a Device,
}

impl Builder<'_> {
    fn normal(&mut self, name: String, shape: &[usize]) -> Result<()> {
        let count = shape.iter().product();
        let tensor = if self.device.is_cpu() {
            Tensor::from_vec(
                normal_values(count, self.std, &mut self.rng),
                shape,
                self.device,
            )?
        } else {
            // On an accelerator, the device's own generator (seeded once in `random_weights`).
            Tensor::randn(0f32, self.std as f32, shape, self.device)?
        };
        self.tensors.insert(name, tensor.to_dtype(self.dtype)?);
        Ok(())
    }

    fn constant(&mut self, name: String, size: usize, value: f64) -> Result<()> {
        let tensor = (Tensor::ones(size, self.dtype, self.device)? * value)?;
        self.tensors.insert(name, tensor);
        Ok(())
    }
}

/// The tensors of a random-init model for `config`, keyed by checkpoint name (GPT-2 with the
/// `transformer.` prefix and Conv1D `[in, out]` weights). A tied head stores no `lm_head.weight`.
/// On CPU the values depend only on `seed`.
pub fn random_weights(
    config: &ModelConfig,
    seed: u64,
    std: f64,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    if !device.is_cpu() {
        device.set_seed(seed)?;
    }
    let mut builder = Builder {
        tensors: HashMap::new(),
        rng: ChaCha8Rng::seed_from_u64(seed),
        std,
        dtype,
        device,
    };
    let (vocab, hidden) = (config.vocab_size(), config.hidden_size());
    match config {
        ModelConfig::Llama(c) => {
            builder.normal("model.embed_tokens.weight".to_string(), &[vocab, hidden])?;
            for i in 0..c.num_hidden_layers {
                let prefix = format!("model.layers.{i}");
                builder.constant(format!("{prefix}.input_layernorm.weight"), hidden, 1.0)?;
                builder.constant(
                    format!("{prefix}.post_attention_layernorm.weight"),
                    hidden,
                    1.0,
                )?;
            }
            builder.constant("model.norm.weight".to_string(), hidden, 1.0)?;
        }
        ModelConfig::Gpt2(c) => {
            builder.normal("transformer.wte.weight".to_string(), &[vocab, hidden])?;
            builder.normal(
                "transformer.wpe.weight".to_string(),
                &[c.n_positions, hidden],
            )?;
            let mut norms: Vec<String> = (0..c.n_layer)
                .flat_map(|i| {
                    [
                        format!("transformer.h.{i}.ln_1"),
                        format!("transformer.h.{i}.ln_2"),
                    ]
                })
                .collect();
            norms.push("transformer.ln_f".to_string());
            for norm in norms {
                builder.constant(format!("{norm}.weight"), hidden, 1.0)?;
                builder.constant(format!("{norm}.bias"), hidden, 0.0)?;
            }
        }
    }
    let conv1d = matches!(config, ModelConfig::Gpt2(_));
    for layer in config.linear_layers() {
        if layer.tied_to_embeddings {
            continue;
        }
        let shape = if conv1d && layer.path != "lm_head" {
            [layer.in_features, layer.out_features]
        } else {
            [layer.out_features, layer.in_features]
        };
        builder.normal(format!("{}.weight", layer.path), &shape)?;
        if layer.bias {
            builder.constant(format!("{}.bias", layer.path), layer.out_features, 0.0)?;
        }
    }
    Ok(builder.tensors)
}

/// Build a model from in-memory tensors named as a checkpoint (e.g. from [`random_weights`]).
pub fn load_from_tensors(
    config: &ModelConfig,
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
    factory: &dyn LinearFactory,
) -> Result<Box<dyn CausalLm>> {
    let builder = VarBuilder::from_tensors(tensors, dtype, device);
    Ok(match config {
        ModelConfig::Llama(c) => Box::new(llama::Llama::load(builder, c, config, factory)?),
        ModelConfig::Gpt2(c) => Box::new(gpt2::Gpt2::load(builder, c, config, factory)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_values_are_seeded_and_have_the_right_spread() {
        let mut first = ChaCha8Rng::seed_from_u64(7);
        let mut second = ChaCha8Rng::seed_from_u64(7);
        let a = normal_values(10_001, 0.02, &mut first);
        assert_eq!(a, normal_values(10_001, 0.02, &mut second));
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / a.len() as f64;
        let variance = a
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!(
            (variance.sqrt() - 0.02).abs() < 1e-3,
            "std {}",
            variance.sqrt()
        );
    }
}
