//! AdamW (Loshchilov & Hutter) with torch's exact update order, f32 moments whatever the compute
//! dtype, decoupled weight decay per parameter group, serializable state for exact resume; and
//! global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_`.
//! Knows nothing of models, adapters or data: it sees named variables and their gradients.
//!
//! On CUDA (bf16/f32 parameters, `--features cuda`) the update is the multi-tensor kernel of
//! `ops::cuda` (every parameter in one launch per dtype, moments and parameters updated in place,
//! clipping folded in as a gradient scale) and the global norm is one launch and one read; the
//! tensor-op path below is the CPU path and the reference the kernel is tested against.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

/// Hyperparameters (the learning rate comes per step from the schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        AdamWSettings {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Whether a parameter is in the weight-decay group: matrices yes; biases, norms and other
/// vectors no (the usual transformers grouping).
pub fn decays(name: &str, rank: usize) -> bool {
    let lower = name.to_ascii_lowercase();
    rank >= 2 && !lower.contains("bias") && !lower.contains("norm")
}

struct Parameter {
    name: String,
    var: Var,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

/// AdamW over a fixed list of named variables.
pub struct AdamW {
    settings: AdamWSettings,
    parameters: Vec<Parameter>,
    steps: u64,
}

impl AdamW {
    /// Moments start at zero (f32, on each variable's device).
    pub fn new(vars: Vec<(String, Var)>, settings: AdamWSettings) -> candle_core::Result<Self> {
        let parameters = vars
            .into_iter()
            .map(|(name, var)| {
                // Two allocations: the CUDA path updates the moments in place.
                let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                Ok(Parameter {
                    decay: decays(&name, var.rank()),
                    exp_avg: zeros()?,
                    exp_avg_sq: zeros()?,
                    name,
                    var,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            settings,
            parameters,
            steps: 0,
        })
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Names in the order `step` expects gradients.
    pub fn names(&self) -> Vec<&str> {
        self.parameters.iter().map(|p| p.name.as_str()).collect()
    }

    /// The variables, in the order `step` expects gradients.
    pub fn vars(&self) -> Vec<&Var> {
        self.parameters.iter().map(|p| &p.var).collect()
    }

    /// One update; `gradients[i]` belongs to the i-th variable (None: no gradient, skipped as
    /// torch skips parameters whose `.grad` is None).
    pub fn step(
        &mut self,
        gradients: &[Option<Tensor>],
        learning_rate: f64,
    ) -> candle_core::Result<()> {
        self.step_scaled(gradients, learning_rate, 1.0)
    }

    /// [`AdamW::step`] on the gradients multiplied by `grad_scale` (the clipping coefficient of
    /// [`clip_coefficient`]; 1 leaves them as they are), without materialising scaled copies on CUDA.
    pub fn step_scaled(
        &mut self,
        gradients: &[Option<Tensor>],
        learning_rate: f64,
        grad_scale: f64,
    ) -> candle_core::Result<()> {
        if gradients.len() != self.parameters.len() {
            candle_core::bail!(
                "AdamW: {} gradients for {} parameters",
                gradients.len(),
                self.parameters.len()
            )
        }
        self.steps += 1;
        let AdamWSettings {
            beta1,
            beta2,
            epsilon,
            weight_decay,
        } = self.settings;
        let step = self.steps as i32;
        let bias_correction1 = 1.0 - beta1.powi(step);
        let bias_correction2_sqrt = (1.0 - beta2.powi(step)).sqrt();
        let step_size = learning_rate / bias_correction1;
        #[cfg(feature = "cuda")]
        if self.step_cuda(
            gradients,
            learning_rate,
            grad_scale,
            step_size,
            bias_correction2_sqrt,
        )? {
            return Ok(());
        }
        for (parameter, gradient) in self.parameters.iter_mut().zip(gradients) {
            let Some(gradient) = gradient else { continue };
            let mut gradient = gradient.to_dtype(DType::F32)?;
            if grad_scale != 1.0 {
                gradient = gradient.affine(grad_scale, 0.0)?;
            }
            let mut value = parameter.var.as_tensor().to_dtype(DType::F32)?;
            if parameter.decay && weight_decay != 0.0 {
                value = value.affine(1.0 - learning_rate * weight_decay, 0.0)?;
            }
            // exp_avg.lerp_(grad, 1 - beta1) = exp_avg + (1 - beta1)·(grad - exp_avg)
            let exp_avg = (&parameter.exp_avg
                + gradient.sub(&parameter.exp_avg)?.affine(1.0 - beta1, 0.0)?)?;
            // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value = 1 - beta2)
            let exp_avg_sq = (parameter.exp_avg_sq.affine(beta2, 0.0)?
                + gradient.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let denominator = exp_avg_sq
                .sqrt()?
                .affine(1.0 / bias_correction2_sqrt, 0.0)?
                .affine(1.0, epsilon)?;
            let update = exp_avg.div(&denominator)?.affine(step_size, 0.0)?;
            let value = value.sub(&update)?;
            parameter
                .var
                .set(&value.to_dtype(parameter.var.dtype())?.detach())?;
            parameter.exp_avg = exp_avg.detach();
            parameter.exp_avg_sq = exp_avg_sq.detach();
        }
        Ok(())
    }

    /// The multi-tensor CUDA update; `false` (nothing done) when a parameter is not a contiguous
    /// bf16/f32 CUDA tensor or the fused kernels are switched off.
    #[cfg(feature = "cuda")]
    fn step_cuda(
        &self,
        gradients: &[Option<Tensor>],
        learning_rate: f64,
        grad_scale: f64,
        step_size: f64,
        bias_correction2_sqrt: f64,
    ) -> candle_core::Result<bool> {
        let suitable = |t: &Tensor| {
            crate::ops::cuda::applies("adamw", t)
                && t.is_contiguous()
                && t.layout().start_offset() == 0
        };
        if !self
            .parameters
            .iter()
            .all(|p| suitable(p.var.as_tensor()) && suitable(&p.exp_avg) && suitable(&p.exp_avg_sq))
        {
            return Ok(false);
        }
        let prepared = self
            .parameters
            .iter()
            .zip(gradients)
            .filter_map(|(parameter, gradient)| {
                let gradient = gradient.as_ref()?;
                // Same dtype: a no-op; transposed 2-D views are read in place by the kernel.
                Some(
                    gradient
                        .to_dtype(parameter.var.dtype())
                        .and_then(|g| match crate::ops::cuda::gradient_readable(&g)? {
                            true => Ok(g),
                            false => g.contiguous(),
                        })
                        .map(|g| (parameter, g)),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let weight_decay = self.settings.weight_decay;
        let launch = crate::ops::cuda::AdamWLaunch {
            tensors: prepared
                .iter()
                .map(|(parameter, gradient)| {
                    let decay = if parameter.decay && weight_decay != 0.0 {
                        1.0 - learning_rate * weight_decay
                    } else {
                        1.0
                    };
                    (
                        parameter.var.as_tensor(),
                        gradient,
                        &parameter.exp_avg,
                        &parameter.exp_avg_sq,
                        decay as f32,
                    )
                })
                .collect(),
            grad_scale: grad_scale as f32,
            beta1: self.settings.beta1 as f32,
            beta2: self.settings.beta2 as f32,
            epsilon: self.settings.epsilon as f32,
            step_size: step_size as f32,
            bias_correction2_sqrt: bias_correction2_sqrt as f32,
        };
        launch.run()?;
        Ok(true)
    }

    /// The state as named f32 tensors (`exp_avg/<name>`, `exp_avg_sq/<name>`); the step count
    /// goes with it separately.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::with_capacity(2 * self.parameters.len());
        for parameter in &self.parameters {
            tensors.push((
                format!("exp_avg/{}", parameter.name),
                parameter.exp_avg.clone(),
            ));
            tensors.push((
                format!("exp_avg_sq/{}", parameter.name),
                parameter.exp_avg_sq.clone(),
            ));
        }
        tensors
    }

    /// Restore the state written by [`AdamW::state_tensors`]. Errors name the missing or
    /// mis-shaped tensor.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        for parameter in &mut self.parameters {
            for (prefix, slot) in [
                ("exp_avg", &mut parameter.exp_avg),
                ("exp_avg_sq", &mut parameter.exp_avg_sq),
            ] {
                let key = format!("{prefix}/{}", parameter.name);
                let tensor = tensors
                    .get(&key)
                    .ok_or_else(|| format!("optimizer state has no tensor `{key}`"))?;
                if tensor.dims() != parameter.var.dims() {
                    return Err(format!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        tensor.dims(),
                        parameter.var.dims()
                    ));
                }
                // `copy`: the moments own their storage (the CUDA path updates them in place).
                *slot = tensor
                    .to_dtype(DType::F32)
                    .and_then(|t| t.to_device(parameter.var.device()))
                    .and_then(|t| t.copy())
                    .map_err(|error| format!("optimizer state `{key}`: {error}"))?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// The global L2 norm of all gradients (computed in f32 on the device, one host sync).
pub fn global_norm(gradients: &[Option<Tensor>]) -> candle_core::Result<f64> {
    #[cfg(feature = "cuda")]
    {
        let present: Vec<&Tensor> = gradients.iter().flatten().collect();
        if !present.is_empty()
            && present
                .iter()
                .all(|g| crate::ops::cuda::applies("adamw", g))
        {
            return crate::ops::cuda::global_norm(&present);
        }
    }
    let squares = gradients
        .iter()
        .flatten()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()?.reshape(1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    if squares.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::cat(&squares, 0)?.sum_all()?.to_scalar::<f32>()?;
    Ok(f64::from(total).sqrt())
}

/// torch's `clip_grad_norm_` factor: `max_norm / (norm + 1e-6)`, clamped to at most 1.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Scale gradients so their global norm is at most `max_norm`, like torch's `clip_grad_norm_`
/// (coefficient `max_norm / (norm + 1e-6)`, clamped to 1). `norm` is [`global_norm`]'s value.
pub fn clip_gradients(
    gradients: &mut [Option<Tensor>],
    norm: f64,
    max_norm: f64,
) -> candle_core::Result<()> {
    let coefficient = clip_coefficient(norm, max_norm);
    if coefficient >= 1.0 {
        return Ok(());
    }
    for gradient in gradients.iter_mut().flatten() {
        *gradient = gradient.affine(coefficient, 0.0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(var: &Var) -> Vec<f32> {
        var.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// AdamW by hand, in f64, for one scalar, mirroring torch's formula.
    fn reference(mut p: f64, grads: &[f64], lr: f64, wd: f64, s: AdamWSettings) -> f64 {
        let (mut m, mut v) = (0.0, 0.0);
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            p *= 1.0 - lr * wd;
            m = s.beta1 * m + (1.0 - s.beta1) * g;
            v = s.beta2 * v + (1.0 - s.beta2) * g * g;
            let mhat = m / (1.0 - s.beta1.powi(t));
            let denom = (v / (1.0 - s.beta2.powi(t))).sqrt() + s.epsilon;
            p -= lr * mhat / denom;
        }
        p
    }

    #[test]
    fn matches_hand_computed_adamw_with_and_without_decay() {
        let settings = AdamWSettings {
            weight_decay: 0.1,
            ..AdamWSettings::default()
        };
        let device = Device::Cpu;
        let matrix = Var::new(&[[1.0f32, -2.0], [0.5, 3.0]], &device).unwrap();
        let bias = Var::new(&[1.0f32, -2.0], &device).unwrap();
        let mut optimizer = AdamW::new(
            vec![
                ("w".into(), matrix.clone()),
                ("layer.bias".into(), bias.clone()),
            ],
            settings,
        )
        .unwrap();
        let grads = [
            [0.3f32, -0.1, 0.0, 2.0],
            [-0.2, 0.4, 1.0, -1.0],
            [0.05, 0.05, -0.3, 0.7],
        ];
        let lr = 0.01;
        for g in grads {
            let gm = Tensor::new(&[[g[0], g[1]], [g[2], g[3]]], &device).unwrap();
            let gb = Tensor::new(&[g[0], g[1]], &device).unwrap();
            optimizer.step(&[Some(gm), Some(gb)], lr).unwrap();
        }
        let start = [1.0, -2.0, 0.5, 3.0];
        let got = values(&matrix);
        for i in 0..4 {
            let history: Vec<f64> = grads.iter().map(|g| g[i] as f64).collect();
            let expected = reference(start[i], &history, lr, 0.1, settings);
            assert!(
                (got[i] as f64 - expected).abs() < 1e-6,
                "w[{i}] {} vs {expected}",
                got[i]
            );
        }
        // The bias is in the no-decay group.
        let got = values(&bias);
        for i in 0..2 {
            let history: Vec<f64> = grads.iter().map(|g| g[i] as f64).collect();
            let expected = reference(start[i], &history, lr, 0.0, settings);
            assert!(
                (got[i] as f64 - expected).abs() < 1e-6,
                "b[{i}] {} vs {expected}",
                got[i]
            );
        }
        assert_eq!(optimizer.steps(), 3);
    }

    #[test]
    fn first_step_moves_each_weight_by_about_lr() {
        // Bias correction makes step 1 a sign step: |Δ| ≈ lr for any gradient scale.
        let device = Device::Cpu;
        let var = Var::new(&[0.0f32, 0.0, 0.0], &device).unwrap();
        let mut optimizer =
            AdamW::new(vec![("w".into(), var.clone())], AdamWSettings::default()).unwrap();
        let grad = Tensor::new(&[1e-3f32, -50.0, 7.0], &device).unwrap();
        optimizer.step(&[Some(grad)], 0.1).unwrap();
        let got = values(&var);
        assert!(
            (got[0] + 0.1).abs() < 1e-5
                && (got[1] - 0.1).abs() < 1e-5
                && (got[2] + 0.1).abs() < 1e-5,
            "{got:?}"
        );
    }

    #[test]
    fn state_round_trips_for_exact_resume() {
        let device = Device::Cpu;
        let make = || Var::new(&[[1.0f32, 2.0]], &device).unwrap();
        let grad = |x: f32| Some(Tensor::new(&[[x, -x]], &device).unwrap());
        // Uninterrupted: two steps.
        let a = make();
        let mut whole =
            AdamW::new(vec![("w".into(), a.clone())], AdamWSettings::default()).unwrap();
        whole.step(&[grad(0.5)], 0.1).unwrap();
        whole.step(&[grad(0.25)], 0.1).unwrap();
        // Interrupted after one step: keep the value and the state, rebuild, replay step 2.
        let c = make();
        let mut one = AdamW::new(vec![("w".into(), c.clone())], AdamWSettings::default()).unwrap();
        one.step(&[grad(0.5)], 0.1).unwrap();
        let state: HashMap<String, Tensor> = one.state_tensors().into_iter().collect();
        let d = Var::from_tensor(c.as_tensor()).unwrap();
        let mut resumed =
            AdamW::new(vec![("w".into(), d.clone())], AdamWSettings::default()).unwrap();
        resumed.load_state(&state, 1).unwrap();
        resumed.step(&[grad(0.25)], 0.1).unwrap();
        assert_eq!(values(&d), values(&a));
        let missing = HashMap::new();
        assert!(resumed
            .load_state(&missing, 1)
            .unwrap_err()
            .contains("exp_avg/w"));
    }

    #[test]
    fn clipping_matches_torch() {
        let device = Device::Cpu;
        let mut grads = vec![
            Some(Tensor::new(&[3.0f32, 0.0], &device).unwrap()),
            None,
            Some(Tensor::new(&[[4.0f32]], &device).unwrap()),
        ];
        let norm = global_norm(&grads).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        clip_gradients(&mut grads, norm, 1.0).unwrap();
        let clipped = global_norm(&grads).unwrap();
        assert!((clipped - 5.0 / (5.0 + 1e-6)).abs() < 1e-6, "{clipped}");
        // Below the threshold nothing changes.
        let before: Vec<f32> = grads[0].as_ref().unwrap().to_vec1().unwrap();
        clip_gradients(&mut grads, clipped, 10.0).unwrap();
        assert_eq!(before, grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn non_finite_gradients_show_in_the_norm() {
        let device = Device::Cpu;
        let grads = vec![Some(Tensor::new(&[1.0f32, f32::NAN], &device).unwrap())];
        assert!(!global_norm(&grads).unwrap().is_finite());
        let grads = vec![Some(Tensor::new(&[f32::INFINITY], &device).unwrap())];
        assert!(!global_norm(&grads).unwrap().is_finite());
    }

    #[test]
    fn decay_groups() {
        assert!(decays("base_model.model.x.lora_A.weight", 2));
        assert!(!decays("model.norm.weight", 1));
        assert!(!decays("layer.bias", 2));
        assert!(!decays("prompt", 1));
    }
}
