//! The conformance table: every PEFT method, made through the registry from its YAML config as a
//! pipeline writes it, goes through the same checks on a tiny random Llama (always) and on
//! stories260k (when PEFTPIPE_SHARED is set):
//! 1. step-0 identity where the method promises it (the adapted model's logits equal the base's);
//! 2. every trainable tensor gets a finite, non-zero gradient through the trainer's loss
//!    (after a small perturbation, so zero-initialised factors do not hide the others);
//! 3. save → load round trip (the PEFT folder reloads through the registry to the same logits);
//! 4. PEFT-format import: the reference adapter PEFT saved reproduces PEFT's logits.
//!
//! Adding a method: one row in [`cases`].
#![expect(
    clippy::print_stderr,
    reason = "tests print why they skip and the parity they measured"
)]

mod support;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use peftpipe::config::method::MethodConfig;
use peftpipe::data::batch::{collate, Sequence};
use peftpipe::models::{CausalLm, FrozenLinearFactory, ModelDir};
use peftpipe::peft::{load_adapter, new_adapter, Adapter, AdapterMode, MethodContext};
use peftpipe::train::trainer::{CausalLmLoss, LossModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use support::{
    build_llama, llama_weights, masked_max_abs, max_difference, shared_dir, tiny_llama_config,
    tiny_llama_json,
};

/// One method of the table.
struct Case {
    /// The method as a pipeline writes it under `method:`.
    yaml: &'static str,
    /// The adapter's output equals the base model's before training.
    identity_at_step_zero: bool,
    /// `reference/<folder>` of stories260k with PEFT's adapter and logits.
    reference: Option<&'static str>,
    /// Virtual tokens the reference logits lead with.
    reference_virtual_tokens: usize,
}

fn cases() -> Vec<Case> {
    vec![Case {
        yaml: "lora: {r: 4, alpha: 8, target_modules: all-linear}",
        identity_at_step_zero: true,
        reference: Some("peft_lora"),
        reference_virtual_tokens: 0,
    }]
}

fn method(case: &Case) -> MethodConfig {
    let value: serde_json::Value = serde_norway::from_str(case.yaml).expect("YAML of the case");
    serde_json::from_value(value).expect("a valid method config")
}

fn fresh(case: &Case, model_config: &serde_json::Value) -> Box<dyn Adapter> {
    let tokenize = |text: &str| -> Result<Vec<u32>, String> {
        Ok(text.bytes().map(|b| 3 + u32::from(b) % 30).collect())
    };
    new_adapter(
        &method(case),
        &MethodContext {
            model_config,
            device: &Device::Cpu,
            seed: 17,
            tokenize: Some(&tokenize),
        },
    )
    .unwrap_or_else(|error| panic!("{}: {error}", case.yaml))
}

fn sequences() -> Vec<Sequence> {
    vec![
        Sequence {
            ids: vec![1, 5, 9, 13, 2, 7],
            completion_start: 3,
        },
        Sequence {
            ids: vec![1, 30, 31, 4],
            completion_start: 2,
        },
    ]
}

fn logits(model: &dyn CausalLm, adapter: Option<&dyn Adapter>) -> Tensor {
    let batch = collate(&sequences(), &[0, 1], 0);
    let shape = (batch.batch, batch.length);
    let ids = Tensor::from_vec(batch.input_ids.clone(), shape, &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(batch.attention_mask(), shape, &Device::Cpu).unwrap();
    let hooks = match adapter {
        Some(adapter) => adapter.hooks().unwrap(),
        None => peftpipe::models::Hooks::none(),
    };
    let logits = model.forward(&ids, Some(&mask), &hooks).unwrap();
    // Virtual tokens (prompt tuning) lead the sequence: compare the real positions.
    let total = logits.dim(1).unwrap();
    logits
        .narrow(1, total - batch.length, batch.length)
        .unwrap()
}

/// Add small seeded noise to every trainable tensor (as after a few optimizer steps).
fn perturb(adapter: &dyn Adapter, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (_, var) in adapter.trainable_vars() {
        let noise: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random::<f32>() * 0.2 - 0.1)
            .collect();
        let noise = Tensor::from_vec(noise, var.shape(), &Device::Cpu).unwrap();
        var.set(&var.as_tensor().add(&noise).unwrap()).unwrap();
    }
}

#[test]
fn every_method_keeps_the_base_model_at_step_zero_where_it_promises_to() {
    let config = tiny_llama_config();
    let weights = llama_weights(&config, 1, 0.2);
    let base = build_llama(&config, &weights, &FrozenLinearFactory);
    for case in cases() {
        let adapter = fresh(&case, &tiny_llama_json());
        let model = build_llama(&config, &weights, adapter.linear_factory());
        adapter.finish_injection(&model).unwrap();
        assert!(adapter.trainable_parameter_count() > 0, "{}", case.yaml);
        let difference = max_difference(
            &logits(&model, Some(adapter.as_ref())),
            &logits(&base, None),
        );
        if case.identity_at_step_zero {
            assert_eq!(difference, 0.0, "{}: step-0 logits differ", case.yaml);
        }
    }
}

#[test]
fn every_trainable_tensor_of_every_method_gets_a_finite_nonzero_gradient() {
    let config = tiny_llama_config();
    let weights = llama_weights(&config, 2, 0.2);
    for case in cases() {
        let adapter = fresh(&case, &tiny_llama_json());
        let model = build_llama(&config, &weights, adapter.linear_factory());
        adapter.finish_injection(&model).unwrap();
        perturb(adapter.as_ref(), 3);
        adapter.set_mode(AdapterMode::Train { seed: 1 });
        let loss_model = CausalLmLoss {
            model: &model,
            adapter: adapter.as_ref(),
        };
        let batch = collate(&sequences(), &[0, 1], 0);
        let loss = loss_model.loss_sum(&batch).unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in adapter.trainable_vars() {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{}: {name} got no gradient", case.yaml));
            let norm = grad
                .sqr()
                .and_then(|g| g.sum_all())
                .and_then(|g| g.to_scalar::<f32>())
                .unwrap();
            assert!(
                norm.is_finite() && norm > 0.0,
                "{}: {name}: |grad|² = {norm}",
                case.yaml
            );
        }
    }
}

#[test]
fn every_method_saves_and_loads_back_to_identical_logits() {
    let config = tiny_llama_config();
    let weights = llama_weights(&config, 4, 0.2);
    for case in cases() {
        let adapter = fresh(&case, &tiny_llama_json());
        let model = build_llama(&config, &weights, adapter.linear_factory());
        adapter.finish_injection(&model).unwrap();
        perturb(adapter.as_ref(), 5);
        adapter.set_mode(AdapterMode::Eval);
        let expected = logits(&model, Some(adapter.as_ref()));
        let dir = tempfile::tempdir().unwrap();
        adapter.save(dir.path(), "models/tiny").unwrap();
        let loaded = load_adapter(dir.path(), &Device::Cpu)
            .unwrap_or_else(|error| panic!("{}: {error}", case.yaml));
        assert_eq!(loaded.peft_type(), adapter.peft_type());
        let reloaded = build_llama(&config, &weights, loaded.linear_factory());
        loaded.finish_injection(&reloaded).unwrap();
        let difference = max_difference(&logits(&reloaded, Some(loaded.as_ref())), &expected);
        assert_eq!(difference, 0.0, "{}: reloaded logits differ", case.yaml);
        assert_eq!(
            loaded.trainable_parameter_count(),
            adapter.trainable_parameter_count()
        );
        // A mergeable method's patches give the adapted model as a plain one.
        if let Some(patches) = loaded.merge_patches().unwrap() {
            let mut merged = weights.clone();
            for patch in patches {
                let name = format!("{}.weight", patch.path);
                let weight = patch.apply(&merged[&name]).unwrap();
                merged.insert(name, weight);
            }
            let plain = build_llama(&config, &merged, &FrozenLinearFactory);
            let difference = max_difference(&logits(&plain, None), &expected);
            assert!(
                difference < 1e-5,
                "{}: merged model {difference}",
                case.yaml
            );
        }
    }
}

#[test]
fn every_method_imports_its_peft_reference_adapter() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let root = shared.join("models/stories260k");
    let base: HashMap<String, Tensor> = candle_core::safetensors::load(
        root.join("reference/base_logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let (ids, mask) = (&base["input_ids"], &base["attention_mask"]);
    for case in cases() {
        let Some(reference) = case.reference else {
            continue;
        };
        let dir = root.join("reference").join(reference);
        let adapter = load_adapter(&dir, &Device::Cpu).unwrap();
        let model = ModelDir::open(&root)
            .unwrap()
            .load(&Device::Cpu, DType::F32, adapter.linear_factory())
            .unwrap();
        adapter.finish_injection(model.as_ref()).unwrap();
        let logits = model
            .forward(ids, Some(mask), &adapter.hooks().unwrap())
            .unwrap();
        let expected =
            candle_core::safetensors::load(dir.join("expected_logits.safetensors"), &Device::Cpu)
                .unwrap();
        let expected = &expected["logits"];
        assert_eq!(logits.dims(), expected.dims(), "{reference}");
        let full_mask = if case.reference_virtual_tokens > 0 {
            let ones = Tensor::ones(
                (mask.dim(0).unwrap(), case.reference_virtual_tokens),
                mask.dtype(),
                &Device::Cpu,
            )
            .unwrap();
            Tensor::cat(&[&ones, mask], 1).unwrap()
        } else {
            mask.clone()
        };
        let error = masked_max_abs(&logits, expected, &full_mask).unwrap();
        eprintln!("{reference}: max abs logit error vs PEFT = {error:e}");
        assert!(error < 1e-4, "{reference}: {error}");
    }
}
