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
use peftpipe::data::batch::{collate, Sequence};
use peftpipe::models::quantized::{
    dequantized_base_patches, is_quantized_linear, QuantizingFactory,
};
use peftpipe::models::{CausalLm, FrozenLinearFactory, ModelDir};
use peftpipe::peft::{load_adapter, Adapter, AdapterMode};
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
    /// Trains the saved tensors themselves (not a reparameterization of them).
    saves_what_it_trains: bool,
}

fn cases() -> Vec<Case> {
    let case = |yaml, identity_at_step_zero, reference, reference_virtual_tokens| Case {
        yaml,
        identity_at_step_zero,
        reference,
        reference_virtual_tokens,
        saves_what_it_trains: true,
    };
    let mut cases = vec![
        case(
            "lora: {r: 4, alpha: 8, target_modules: all-linear}",
            true,
            Some("peft_lora"),
            0,
        ),
        case(
            "prompt_tuning: {num_virtual_tokens: 4}",
            false,
            Some("peft_prompt_tuning"),
            8,
        ),
        case(
            "prompt_tuning: {num_virtual_tokens: 3, init: sample_vocab}",
            false,
            None,
            0,
        ),
        case(
            "prompt_tuning: {num_virtual_tokens: 5, init: text, init_text: 'a fox'}",
            false,
            None,
            0,
        ),
        case(
            "prefix_tuning: {num_virtual_tokens: 4}",
            false,
            Some("peft_prefix_tuning"),
            0,
        ),
        case(
            "prefix_tuning: {num_virtual_tokens: 2, init: sample_vocab}",
            false,
            None,
            0,
        ),
        Case {
            saves_what_it_trains: false,
            ..case(
                "prefix_tuning: {num_virtual_tokens: 3, prefix_projection: true, encoder_hidden_size: 12}",
                false,
                None,
                0,
            )
        },
        case(
            "llama_adapter: {adapter_len: 3, adapter_layers: 2}",
            true,
            Some("peft_adaption_prompt"),
            0,
        ),
        case(
            "llama_adapter: {adapter_len: 2, adapter_layers: 1, per_head_gate: true}",
            true,
            None,
            0,
        ),
    ];
    cases.extend(ia3_and_dora_cases());
    cases.extend(qlora_cases());
    cases.extend(auxiliary_cases());
    cases
}

/// PEFT's auxiliary trainable modules riding along with a method (`peft::auxiliary`): trainable
/// token rows (list and mapping form) and modules to save. The tiny Llama's head is untied;
/// `auxiliary_modules_on_a_tied_model_*` cover the tied case.
fn auxiliary_cases() -> Vec<Case> {
    let case = |yaml| Case {
        yaml,
        identity_at_step_zero: true,
        reference: None,
        reference_virtual_tokens: 0,
        saves_what_it_trains: true,
    };
    vec![
        case("lora: {r: 4, alpha: 8, trainable_token_indices: [2, 7]}"),
        case("lora: {r: 2, alpha: 4, trainable_token_indices: {embed_tokens: [2], lm_head: [2, 39]}}"),
        case("lora: {r: 2, alpha: 4, modules_to_save: [lm_head]}"),
        case("lora: {r: 2, alpha: 4, use_dora: true, modules_to_save: [embed_tokens]}"),
        case("qlora: {r: 2, alpha: 4, trainable_token_indices: [2], modules_to_save: [lm_head]}"),
        case("ia3: {modules_to_save: [embed_tokens, lm_head]}"),
        // Norms (PEFT's ModulesToSaveWrapper around an RMSNorm): `norm` ends every norm's name.
        case("lora: {r: 2, alpha: 4, modules_to_save: [norm]}"),
        case("lora: {r: 2, alpha: 4, use_dora: true, modules_to_save: [input_layernorm, lm_head]}"),
        case("qlora: {r: 2, alpha: 4, modules_to_save: [post_attention_layernorm, model.norm]}"),
        case("ia3: {modules_to_save: [model.norm]}"),
    ]
}

/// QLoRA: LoRA over a 4-bit base. Its step-0 identity is against the *dequantized* base, and a
/// reload goes onto the same quantized base (the adapter folder is plain PEFT LoRA; the run
/// records the quantization beside it).
fn qlora_cases() -> Vec<Case> {
    let case = |yaml| Case {
        yaml,
        identity_at_step_zero: true,
        reference: None,
        reference_virtual_tokens: 0,
        saves_what_it_trains: true,
    };
    vec![
        case("qlora: {r: 4, alpha: 8, target_modules: all-linear}"),
        case("qlora: {r: 2, alpha: 4, quant_type: fp4, double_quant: false, block_size: 128, dropout: 0.1}"),
        case("qlora: {r: 2, alpha: 4, use_dora: true, target_modules: [q_proj, down_proj, lm_head]}"),
    ]
}

/// The base a method's adapter computes over: the weights as given, or for a quantized base
/// (QLoRA) every quantizable linear weight dequantized from its 4-bit form.
fn effective_base(
    adapter: &dyn Adapter,
    weights: &HashMap<String, Tensor>,
) -> HashMap<String, Tensor> {
    let Some(quantization) = adapter.base_quantization() else {
        return weights.clone();
    };
    weights
        .iter()
        .map(|(name, weight)| {
            let value = if is_quantized_linear(name, weight.dims()) {
                quantization
                    .round_trip(weight)
                    .unwrap()
                    .to_dtype(weight.dtype())
                    .unwrap()
            } else {
                weight.clone()
            };
            (name.clone(), value)
        })
        .collect()
}

/// IA3 (PEFT's default Llama targets, and a custom set) and DoRA (LoRA's `use_dora`). No PEFT
/// reference adapter of these exists in the shared folder (stories260k/reference has LoRA and the
/// prompt methods only); `ia3_and_dora_save_peft_names_and_config_keys` checks PEFT's documented
/// format instead.
fn ia3_and_dora_cases() -> Vec<Case> {
    let case = |yaml| Case {
        yaml,
        identity_at_step_zero: true,
        reference: None,
        reference_virtual_tokens: 0,
        saves_what_it_trains: true,
    };
    vec![
        case("ia3: {}"),
        case("ia3: {target_modules: [q_proj, up_proj, down_proj, o_proj], feedforward_modules: [down_proj, o_proj]}"),
        case("lora: {r: 4, alpha: 8, use_dora: true, target_modules: all-linear}"),
        case("lora: {r: 2, alpha: 4, dropout: 0.1, use_dora: true, use_rslora: true}"),
    ]
}

/// A fresh adapter for `case` injected into a tiny Llama built from `weights`.
fn injected(
    case: &Case,
    config: &peftpipe::models::ModelConfig,
    weights: &HashMap<String, Tensor>,
) -> (Box<dyn Adapter>, peftpipe::models::llama::Llama) {
    let adapter = fresh(case, &tiny_llama_json());
    let model = build_llama(config, weights, adapter.linear_factory());
    adapter.finish_injection(&model).unwrap();
    (adapter, model)
}

fn fresh(case: &Case, model_config: &serde_json::Value) -> Box<dyn Adapter> {
    support::methods::new_method(case.yaml, model_config, &Device::Cpu, 17)
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
    for case in cases() {
        let (adapter, model) = injected(&case, &config, &weights);
        assert!(adapter.trainable_parameter_count() > 0, "{}", case.yaml);
        let base = build_llama(
            &config,
            &effective_base(adapter.as_ref(), &weights),
            &FrozenLinearFactory,
        );
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
        let (adapter, model) = injected(&case, &config, &weights);
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
        let (adapter, model) = injected(&case, &config, &weights);
        perturb(adapter.as_ref(), 5);
        adapter.set_mode(AdapterMode::Eval);
        let expected = logits(&model, Some(adapter.as_ref()));
        let dir = tempfile::tempdir().unwrap();
        adapter.save(dir.path(), "models/tiny").unwrap();
        let loaded = load_adapter(dir.path(), &Device::Cpu)
            .unwrap_or_else(|error| panic!("{}: {error}", case.yaml));
        assert_eq!(loaded.peft_type(), adapter.peft_type());
        // A QLoRA adapter reloads onto the same 4-bit base.
        let reloaded = match adapter.base_quantization() {
            Some(quantization) => build_llama(
                &config,
                &weights,
                &QuantizingFactory::new(loaded.linear_factory(), quantization),
            ),
            None => build_llama(&config, &weights, loaded.linear_factory()),
        };
        loaded.finish_injection(&reloaded).unwrap();
        let difference = max_difference(&logits(&reloaded, Some(loaded.as_ref())), &expected);
        assert_eq!(difference, 0.0, "{}: reloaded logits differ", case.yaml);
        if case.saves_what_it_trains {
            assert_eq!(
                loaded.trainable_parameter_count(),
                adapter.trainable_parameter_count(),
                "{}",
                case.yaml
            );
        }
        // A mergeable method's patches give the adapted model as a plain one.
        // (A QLoRA adapter's over the dequantized base, as the export stage writes it.)
        let patches =
            loaded
                .merge_patches()
                .unwrap()
                .map(|patches| match adapter.base_quantization() {
                    Some(quantization) => {
                        let shapes = weights
                            .iter()
                            .map(|(name, weight)| (name.clone(), weight.dims().to_vec()))
                            .collect();
                        dequantized_base_patches(patches, &quantization, DType::F32, &shapes)
                    }
                    None => patches,
                });
        if let Some(patches) = patches {
            let mut merged = weights.clone();
            for patch in patches {
                let name = patch.tensor_name();
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

// ---------------------------------------------------------------------------------------------
// Each method lowers stories260k's validation perplexity on bevostories (base 13.37).
// ---------------------------------------------------------------------------------------------

#[test]
fn every_method_lowers_bevostories_validation_perplexity() {
    use peftpipe::config::train::ScheduleKind;
    use peftpipe::train::{train, AdamWSettings, TrainerSettings};
    use std::sync::atomic::AtomicBool;

    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let root = shared.join("models/stories260k");
    let (train_set, validation) = support::bevostories(&shared);
    let dir = ModelDir::open(&root).unwrap();
    let base = dir
        .load(&Device::Cpu, DType::F32, &FrozenLinearFactory)
        .unwrap();
    let base_perplexity =
        support::perplexity(base.as_ref(), &peftpipe::models::Hooks::none(), &validation);
    assert!(
        (base_perplexity - 13.37).abs() < 0.05,
        "base validation perplexity {base_perplexity} (documented 13.37)"
    );
    // (method, learning rate), 40 steps of batch 1 each (a few seconds on one core).
    let runs = [
        ("prompt_tuning: {num_virtual_tokens: 16, init: sample_vocab}", 3e-2),
        ("prefix_tuning: {num_virtual_tokens: 16, init: sample_vocab}", 3e-2),
        (
            "prefix_tuning: {num_virtual_tokens: 16, prefix_projection: true, encoder_hidden_size: 64}",
            3e-3,
        ),
        ("llama_adapter: {adapter_len: 10, adapter_layers: 5}", 1e-2),
        ("ia3: {}", 3e-2),
        (
            "lora: {r: 16, alpha: 32, use_dora: true, target_modules: all-linear}",
            5e-3,
        ),
    ];
    for (yaml, learning_rate) in runs {
        let case = Case {
            yaml,
            identity_at_step_zero: false,
            reference: None,
            reference_virtual_tokens: 0,
            saves_what_it_trains: true,
        };
        let model_config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("config.json")).unwrap())
                .unwrap();
        let adapter = fresh(&case, &model_config);
        let model = dir
            .load(&Device::Cpu, DType::F32, adapter.linear_factory())
            .unwrap();
        adapter.finish_injection(model.as_ref()).unwrap();
        adapter.set_mode(AdapterMode::Eval);
        let initial = support::perplexity(model.as_ref(), &adapter.hooks().unwrap(), &validation);
        adapter.set_mode(AdapterMode::Train { seed: 0 });
        let settings = TrainerSettings {
            adamw: AdamWSettings::default(),
            learning_rate,
            schedule: ScheduleKind::Constant,
            warmup_steps: 0,
            max_grad_norm: Some(1.0),
            batch_size: 1,
            accumulation: 1,
            epochs: 1,
            max_steps: Some(40),
            sort_by_length: false,
            seed: 0,
            pad_id: 0,
            checkpoint_every: 0,
            checkpoint_dir: None,
            run_key: "methods".into(),
            synchronize_phases: false,
        };
        let started = std::time::Instant::now();
        let loss_model = CausalLmLoss {
            model: model.as_ref(),
            adapter: adapter.as_ref(),
        };
        let outcome = train(
            &loss_model,
            adapter.as_ref(),
            &train_set,
            &settings,
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap();
        adapter.set_mode(AdapterMode::Eval);
        let adapted = support::perplexity(model.as_ref(), &adapter.hooks().unwrap(), &validation);
        eprintln!(
            "stories260k + bevostories, {yaml} ({} params), batch 1, lr {learning_rate}, 40 steps in {:.1}s: validation perplexity {base_perplexity:.2} (base; {initial:.2} at step 0) → {adapted:.2} (final train loss {:.3})",
            adapter.trainable_parameter_count(),
            started.elapsed().as_secs_f64(),
            outcome.final_loss
        );
        assert!(
            adapted < 0.9 * base_perplexity,
            "{yaml}: {base_perplexity} → {adapted}"
        );
    }
}

/// The PEFT-format check for IA3 and DoRA without a PEFT-made reference: the folder peftpipe
/// writes has PEFT 0.21's config keys and tensor names/shapes (`IA3Config` / `LoraConfig`
/// dataclass fields; `ia3_l` `[out, 1]` or `[1, in]` for feed-forward modules;
/// `lora_magnitude_vector` `[out]`, saved without PEFT's `.weight` suffix).
#[test]
fn ia3_and_dora_save_peft_names_and_config_keys() {
    let config = tiny_llama_config();
    let weights = llama_weights(&config, 6, 0.2);
    let saved = |yaml: &'static str| {
        let case = Case {
            yaml,
            identity_at_step_zero: true,
            reference: None,
            reference_virtual_tokens: 0,
            saves_what_it_trains: true,
        };
        let (adapter, _model) = injected(&case, &config, &weights);
        let dir = tempfile::tempdir().unwrap();
        adapter.save(dir.path(), "models/tiny").unwrap();
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let tensors = candle_core::safetensors::load(
            dir.path().join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let mut shapes: Vec<(String, Vec<usize>)> = tensors
            .into_iter()
            .map(|(name, tensor)| (name, tensor.dims().to_vec()))
            .collect();
        shapes.sort();
        (json, shapes)
    };

    let (json, shapes) = saved("ia3: {}");
    // Only `IA3Config`'s fields (PEFT 0.21.2, `dataclasses.fields`): PEFT warns "Unexpected
    // keyword arguments" about any other key (peftpipe wrote LoRA's `layers_pattern` and
    // `layers_to_transform`, found by tests/peft_python.rs).
    let ia3_config_fields = [
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "target_modules",
        "exclude_modules",
        "feedforward_modules",
        "fan_in_fan_out",
        "modules_to_save",
        "init_ia3_weights",
    ];
    for key in json.as_object().expect("a JSON object").keys() {
        assert!(
            ia3_config_fields.contains(&key.as_str()),
            "IA3 adapter_config.json has `{key}`, not a field of PEFT's IA3Config"
        );
    }
    assert_eq!(json["peft_type"], "IA3");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["base_model_name_or_path"], "models/tiny");
    assert_eq!(json["init_ia3_weights"], true);
    assert_eq!(json["fan_in_fan_out"], false);
    assert_eq!(
        json["feedforward_modules"],
        serde_json::json!(["down_proj"])
    );
    assert_eq!(
        json["target_modules"],
        serde_json::json!(["down_proj", "k_proj", "v_proj"])
    );
    for key in [
        "modules_to_save",
        "exclude_modules",
        "revision",
        "inference_mode",
    ] {
        assert!(json.get(key).is_some(), "adapter_config.json lacks `{key}`");
    }
    let layer = |i: usize, module: &str, shape: &[usize]| {
        (
            format!("base_model.model.model.layers.{i}.{module}.ia3_l"),
            shape.to_vec(),
        )
    };
    // Tiny Llama: hidden 16, kv width 8 (2 kv heads × 4), MLP 24.
    assert_eq!(
        shapes,
        vec![
            layer(0, "mlp.down_proj", &[1, 24]),
            layer(0, "self_attn.k_proj", &[8, 1]),
            layer(0, "self_attn.v_proj", &[8, 1]),
            layer(1, "mlp.down_proj", &[1, 24]),
            layer(1, "self_attn.k_proj", &[8, 1]),
            layer(1, "self_attn.v_proj", &[8, 1]),
        ]
    );

    let (json, shapes) = saved("lora: {r: 2, alpha: 4, use_dora: true}");
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["use_dora"], true);
    assert_eq!(json["r"], 2);
    let names: Vec<&str> = shapes.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.len(), 2 * 2 * 3, "{names:?}");
    let q = "base_model.model.model.layers.0.self_attn.q_proj";
    let find = |name: String| {
        shapes
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s.clone())
    };
    assert_eq!(find(format!("{q}.lora_A.weight")), Some(vec![2, 16]));
    assert_eq!(find(format!("{q}.lora_B.weight")), Some(vec![16, 2]));
    assert_eq!(find(format!("{q}.lora_magnitude_vector")), Some(vec![16]));
    assert_eq!(
        find("base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector".into()),
        Some(vec![8])
    );
}

/// DoRA's magnitude starts at the row norms of the base weight (PEFT's init), and IA3's vectors
/// at ones.
#[test]
fn dora_magnitude_starts_at_the_weight_row_norms_and_ia3_at_ones() {
    let config = tiny_llama_config();
    let weights = llama_weights(&config, 8, 0.2);
    let case = |yaml| Case {
        yaml,
        identity_at_step_zero: true,
        reference: None,
        reference_virtual_tokens: 0,
        saves_what_it_trains: true,
    };
    let dora = fresh(&case("lora: {use_dora: true}"), &tiny_llama_json());
    let _model = build_llama(&config, &weights, dora.linear_factory());
    let vars = dora.trainable_vars();
    let (_, magnitude) = vars
        .iter()
        .find(|(name, _)| {
            name == "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"
        })
        .expect("a magnitude vector");
    let expected = weights["model.layers.1.self_attn.q_proj.weight"]
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .sqrt()
        .unwrap();
    assert!(max_difference(magnitude.as_tensor(), &expected) < 1e-6);
    let ia3 = fresh(&case("ia3: {}"), &tiny_llama_json());
    let _model = build_llama(&config, &weights, ia3.linear_factory());
    for (name, var) in ia3.trainable_vars() {
        let values: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(values.iter().all(|v| *v == 1.0), "{name}");
    }
}

/// Merging in place (the adapter folds itself into the built model) gives the unmerged logits,
/// and unmerging restores them, for the layer methods that merge.
#[test]
fn ia3_and_dora_merge_in_place_equals_the_unmerged_forward() {
    let config = tiny_llama_config();
    let weights = llama_weights(&config, 9, 0.2);
    for case in ia3_and_dora_cases() {
        let (adapter, model) = injected(&case, &config, &weights);
        perturb(adapter.as_ref(), 10);
        adapter.set_mode(AdapterMode::Eval);
        let unmerged = logits(&model, Some(adapter.as_ref()));
        adapter.merge().unwrap();
        let merged = logits(&model, Some(adapter.as_ref()));
        let difference = max_difference(&merged, &unmerged);
        eprintln!(
            "{}: merged vs unmerged max |Δlogit| = {difference:e}",
            case.yaml
        );
        assert!(difference < 1e-5, "{}: {difference}", case.yaml);
        adapter.unmerge().unwrap();
        let difference = max_difference(&logits(&model, Some(adapter.as_ref())), &unmerged);
        assert!(
            difference < 1e-6,
            "{}: unmerged again {difference}",
            case.yaml
        );
    }
}

// ---------------------------------------------------------------------------------------------
// PEFT's auxiliary modules (`trainable_token_indices`, `modules_to_save`) beyond the table rows
// ---------------------------------------------------------------------------------------------

/// The tiny Llama with a tied head (stories260k's layout).
fn tied_llama() -> (serde_json::Value, peftpipe::models::ModelConfig) {
    let mut json = tiny_llama_json();
    json["tie_word_embeddings"] = serde_json::json!(true);
    let config = peftpipe::models::ModelConfig::from_json(&json).unwrap();
    (json, config)
}

fn case_of(yaml: &'static str) -> Case {
    Case {
        yaml,
        identity_at_step_zero: true,
        reference: None,
        reference_virtual_tokens: 0,
        saves_what_it_trains: true,
    }
}

/// Apply merge patches to checkpoint-named weights the way `models::checkpoint` does for a tied
/// model: a patch of an absent `lm_head` unties it (starting from the embedding matrix).
fn merged_weights(
    adapter: &dyn Adapter,
    weights: &HashMap<String, Tensor>,
) -> HashMap<String, Tensor> {
    let mut merged = weights.clone();
    for patch in adapter.merge_patches().unwrap().expect("mergeable") {
        let name = patch.tensor_name();
        let base = match merged.get(&name) {
            Some(weight) => weight.clone(),
            None => {
                assert_eq!(patch.path, "lm_head", "patch of an absent weight");
                weights["model.embed_tokens.weight"].clone()
            }
        };
        merged.insert(name, patch.apply(&base).unwrap());
    }
    merged
}

/// Tensor names and shapes, sorted by name.
fn shapes(tensors: &HashMap<String, Tensor>) -> Vec<(String, Vec<usize>)> {
    let mut shapes: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(name, tensor)| (name.clone(), tensor.dims().to_vec()))
        .collect();
    shapes.sort();
    shapes
}

/// Rows of `a` and `b` (`[vocab, hidden]`) that differ at all.
fn changed_rows(a: &Tensor, b: &Tensor) -> Vec<usize> {
    let a: Vec<Vec<f32>> = a.to_vec2().unwrap();
    let b: Vec<Vec<f32>> = b.to_vec2().unwrap();
    (0..a.len()).filter(|&row| a[row] != b[row]).collect()
}

/// One SGD step on every trainable tensor from the trainer's loss; returns the loss gradients
/// by variable name.
fn sgd_step(adapter: &dyn Adapter, model: &dyn CausalLm) -> HashMap<String, Tensor> {
    adapter.set_mode(AdapterMode::Train { seed: 1 });
    let loss_model = CausalLmLoss { model, adapter };
    let loss = loss_model
        .loss_sum(&collate(&sequences(), &[0, 1], 0))
        .unwrap();
    let grads = loss.backward().unwrap();
    let mut by_name = HashMap::new();
    for (name, var) in adapter.trainable_vars() {
        let grad = grads.get(var.as_tensor()).unwrap().clone();
        var.set(&(var.as_tensor() - (&grad * 0.5).unwrap()).unwrap())
            .unwrap();
        by_name.insert(name, grad);
    }
    adapter.set_mode(AdapterMode::Eval);
    by_name
}

const EMBED_DELTA: &str =
    "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
const HEAD_DELTA: &str = "base_model.model.lm_head.token_adapter.trainable_tokens_delta";

/// `trainable_token_indices: [2, 7]` on a tied model: only rows 2 and 7 of the embedding train
/// (every other row of the merged embedding is bit-identical to the base after a training step),
/// the tied lm_head follows them (the merged tied model, whose head *is* the patched embedding,
/// gives the adapter's logits), and the head has no variable of its own (PEFT's `tied_adapter`).
#[test]
fn trainable_tokens_train_only_their_rows_and_a_tied_head_follows() {
    let (json, config) = tied_llama();
    let weights = llama_weights(&config, 11, 0.2);
    assert!(!weights.contains_key("lm_head.weight"));
    let adapter = fresh(
        &case_of("lora: {r: 2, alpha: 4, trainable_token_indices: [2, 7]}"),
        &json,
    );
    let model = build_llama(&config, &weights, adapter.linear_factory());
    adapter.finish_injection(&model).unwrap();
    let base = build_llama(&config, &weights, &FrozenLinearFactory);
    assert_eq!(
        max_difference(
            &logits(&model, Some(adapter.as_ref())),
            &logits(&base, None)
        ),
        0.0,
        "step-0 identity"
    );
    let names: Vec<String> = adapter
        .trainable_vars()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !name.contains(".lora_"))
        .collect();
    assert_eq!(names, [EMBED_DELTA]);

    let grads = sgd_step(adapter.as_ref(), &model);
    // Both chosen tokens occur in the batch: each of their rows gets a gradient.
    let grad: Vec<Vec<f32>> = grads[EMBED_DELTA].to_vec2().unwrap();
    for (row, values) in grad.iter().enumerate() {
        assert!(
            values.iter().all(|v| v.is_finite()) && values.iter().any(|v| *v != 0.0),
            "row {row}: {values:?}"
        );
    }
    let merged = merged_weights(adapter.as_ref(), &weights);
    assert!(
        !merged.contains_key("lm_head.weight"),
        "the head stays tied"
    );
    assert_eq!(
        changed_rows(
            &merged["model.embed_tokens.weight"],
            &weights["model.embed_tokens.weight"]
        ),
        [2, 7]
    );
    let plain = build_llama(&config, &merged, &FrozenLinearFactory);
    let adapted = logits(&model, Some(adapter.as_ref()));
    let difference = max_difference(&logits(&plain, None), &adapted);
    assert!(difference < 1e-5, "merged tied model: {difference}");
    // The head followed: the same merged embedding with the *base* head gives other logits.
    let mut untied = merged.clone();
    untied.insert(
        "lm_head.weight".into(),
        weights["model.embed_tokens.weight"].clone(),
    );
    let (_, untied_config) = {
        let mut json = json.clone();
        json["tie_word_embeddings"] = serde_json::json!(false);
        let config = peftpipe::models::ModelConfig::from_json(&json).unwrap();
        (json, config)
    };
    let base_head = build_llama(&untied_config, &untied, &FrozenLinearFactory);
    assert!(max_difference(&logits(&base_head, None), &adapted) > 1e-3);

    // Save → load onto the tied model gives the same logits.
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path(), "models/tiny").unwrap();
    let loaded = load_adapter(dir.path(), &Device::Cpu).unwrap();
    let reloaded = build_llama(&config, &weights, loaded.linear_factory());
    loaded.finish_injection(&reloaded).unwrap();
    assert_eq!(
        max_difference(&logits(&reloaded, Some(loaded.as_ref())), &adapted),
        0.0
    );
}

/// A tied head given other ids than the embedding trains its own rows (PEFT wraps it with its own
/// `TrainableTokensWrapper`); its columns of the output change, no other.
#[test]
fn a_tied_head_with_its_own_ids_trains_only_its_columns() {
    let (json, config) = tied_llama();
    let weights = llama_weights(&config, 12, 0.2);
    let adapter = fresh(
        &case_of(
            "lora: {r: 2, alpha: 4, trainable_token_indices: {embed_tokens: [2], lm_head: [5, 9]}}",
        ),
        &json,
    );
    let model = build_llama(&config, &weights, adapter.linear_factory());
    adapter.finish_injection(&model).unwrap();
    let names: Vec<String> = adapter
        .trainable_vars()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !name.contains(".lora_"))
        .collect();
    assert_eq!(names, [HEAD_DELTA, EMBED_DELTA]);
    let grads = sgd_step(adapter.as_ref(), &model);
    assert_eq!(grads[HEAD_DELTA].dims(), [2, 16]);
    let merged = merged_weights(adapter.as_ref(), &weights);
    // The merge unties the head: lm_head.weight is the base embedding with rows 5 and 9 trained.
    assert_eq!(
        changed_rows(
            &merged["lm_head.weight"],
            &weights["model.embed_tokens.weight"]
        ),
        [5, 9]
    );
    assert_eq!(
        changed_rows(
            &merged["model.embed_tokens.weight"],
            &weights["model.embed_tokens.weight"]
        ),
        [2]
    );
    let mut json = json.clone();
    json["tie_word_embeddings"] = serde_json::json!(false);
    let untied = peftpipe::models::ModelConfig::from_json(&json).unwrap();
    let plain = build_llama(&untied, &merged, &FrozenLinearFactory);
    let difference = max_difference(
        &logits(&plain, None),
        &logits(&model, Some(adapter.as_ref())),
    );
    assert!(difference < 1e-5, "merged model: {difference}");
}

/// A trained copy of a tied model's embedding (`modules_to_save: [embed_tokens]`) leaves the head
/// on the base weights, as PEFT's `ModulesToSaveWrapper` (a deep copy) does: the merge unties it.
#[test]
fn modules_to_save_copy_the_embedding_of_a_tied_model_and_untie_the_merge() {
    let (json, config) = tied_llama();
    let weights = llama_weights(&config, 13, 0.2);
    let adapter = fresh(
        &case_of("lora: {r: 2, alpha: 4, modules_to_save: [embed_tokens]}"),
        &json,
    );
    let model = build_llama(&config, &weights, adapter.linear_factory());
    adapter.finish_injection(&model).unwrap();
    sgd_step(adapter.as_ref(), &model);
    let merged = merged_weights(adapter.as_ref(), &weights);
    assert_eq!(
        changed_rows(
            &merged["lm_head.weight"],
            &weights["model.embed_tokens.weight"]
        ),
        Vec::<usize>::new()
    );
    assert!(!changed_rows(
        &merged["model.embed_tokens.weight"],
        &weights["model.embed_tokens.weight"]
    )
    .is_empty());
    let mut json = json.clone();
    json["tie_word_embeddings"] = serde_json::json!(false);
    let untied = peftpipe::models::ModelConfig::from_json(&json).unwrap();
    let plain = build_llama(&untied, &merged, &FrozenLinearFactory);
    let difference = max_difference(
        &logits(&plain, None),
        &logits(&model, Some(adapter.as_ref())),
    );
    assert!(difference < 1e-5, "merged model: {difference}");
}

/// The folder peftpipe writes carries PEFT's tensor names and config fields for the auxiliary
/// modules, as `peft.utils.save_and_load.get_peft_model_state_dict` writes them (PEFT 0.21):
/// `TrainableTokensWrapper.adapter_state_dict` gives `token_adapter.trainable_tokens_delta` under
/// the wrapped module (nothing for a tied head, whose `tied_adapter` shares the embedding's),
/// `ModulesToSaveWrapper.adapter_state_dict` the copy's own `state_dict` keys under the module
/// (`lm_head.weight`, the `modules_to_save.default.` part removed); `trainable_token_indices` and
/// `modules_to_save` are kept in adapter_config.json as written (`LoraConfig` fields). The names
/// and shapes are compared with what PEFT 0.21 wrote for the same configs
/// (tests/fixtures/peft_auxiliary, see `peft_made_auxiliary_adapters_import_with_peft_logits`).
#[test]
fn auxiliary_modules_save_peft_names_and_config_fields() {
    let (json, config) = tied_llama();
    let weights = llama_weights(&config, 14, 0.2);
    let saved = |yaml: &'static str| {
        let adapter = fresh(&case_of(yaml), &json);
        let model = build_llama(&config, &weights, adapter.linear_factory());
        adapter.finish_injection(&model).unwrap();
        let dir = tempfile::tempdir().unwrap();
        adapter.save(dir.path(), "models/tiny").unwrap();
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let tensors = candle_core::safetensors::load(
            dir.path().join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let all = shapes(&tensors);
        let extra: Vec<(String, Vec<usize>)> = all
            .iter()
            .filter(|(name, _)| !name.contains(".lora_"))
            .cloned()
            .collect();
        (config, extra, all)
    };
    // What PEFT itself wrote for the same configs on a model of the same shape.
    let peft_wrote = |case: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/peft_auxiliary")
            .join(case)
            .join("adapter_model.safetensors");
        shapes(&candle_core::safetensors::load(path, &Device::Cpu).unwrap())
    };
    let (config, extra, all) = saved("lora: {r: 2, alpha: 4, trainable_token_indices: [2, 7]}");
    assert_eq!(all, peft_wrote("tokens"));
    assert_eq!(config["trainable_token_indices"], serde_json::json!([2, 7]));
    assert_eq!(config["modules_to_save"], serde_json::Value::Null);
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(extra, [(EMBED_DELTA.to_string(), vec![2, 16])]);

    let (config, extra, all) = saved(
        "lora: {r: 2, alpha: 4, trainable_token_indices: {embed_tokens: [2], lm_head: [5, 9]}}",
    );
    assert_eq!(all, peft_wrote("tokens_head"));
    assert_eq!(
        config["trainable_token_indices"],
        serde_json::json!({"embed_tokens": [2], "lm_head": [5, 9]})
    );
    assert_eq!(
        extra,
        [
            (HEAD_DELTA.to_string(), vec![2, 16]),
            (EMBED_DELTA.to_string(), vec![1, 16]),
        ]
    );

    // Norms: PEFT's suffix match takes every RMSNorm for `norm`; `<module>.weight` each.
    let (config, extra, all) = saved("lora: {r: 2, alpha: 4, modules_to_save: [norm]}");
    assert_eq!(all, peft_wrote("norms"));
    assert_eq!(config["modules_to_save"], serde_json::json!(["norm"]));
    assert_eq!(extra.len(), 5);
    assert!(extra
        .iter()
        .all(|(name, shape)| name.ends_with("norm.weight") && shape == &[16]));

    let (config, extra, all) =
        saved("lora: {r: 2, alpha: 4, modules_to_save: [lm_head, embed_tokens]}");
    assert_eq!(all, peft_wrote("save"));
    assert_eq!(
        config["modules_to_save"],
        serde_json::json!(["lm_head", "embed_tokens"])
    );
    assert_eq!(config["trainable_token_indices"], serde_json::Value::Null);
    // IA3Config has no `trainable_token_indices`: PEFT warns about a key it does not know.
    let (config, _, _) = saved("ia3: {modules_to_save: [lm_head]}");
    assert_eq!(config["peft_type"], "IA3");
    assert_eq!(config["modules_to_save"], serde_json::json!(["lm_head"]));
    assert!(config.get("trainable_token_indices").is_none(), "{config}");
    assert_eq!(
        extra,
        [
            ("base_model.model.lm_head.weight".to_string(), vec![40, 16]),
            (
                "base_model.model.model.embed_tokens.weight".to_string(),
                vec![40, 16]
            ),
        ]
    );
}

/// Bad auxiliary settings fail when the adapter meets the model, naming the field (fresh) or the
/// adapter_config.json (loaded); a saved folder missing a tensor names the weights file.
#[test]
fn auxiliary_modules_that_do_not_fit_the_model_are_errors() {
    let (json, config) = tied_llama();
    let weights = llama_weights(&config, 15, 0.2);
    let error_of = |yaml: &'static str| {
        let adapter = fresh(&case_of(yaml), &json);
        let model = build_llama(&config, &weights, adapter.linear_factory());
        adapter.finish_injection(&model).unwrap_err().to_string()
    };
    let range = error_of("lora: {trainable_token_indices: [2, 40]}");
    assert!(
        range.contains(
            "`trainable_token_indices[1]`: token id 40 is outside the vocabulary (vocab_size 40"
        ),
        "{range}"
    );
    let unknown = error_of("lora: {modules_to_save: [lm_haed]}");
    assert!(unknown.contains("`lm_haed` matches no module"), "{unknown}");
    let linear = error_of("lora: {modules_to_save: [q_proj]}");
    assert!(
        linear.contains("not an embedding, lm_head or norm"),
        "{linear}"
    );
    let both = error_of("lora: {target_modules: [q_proj, lm_head], trainable_token_indices: [2]}");
    assert!(both.contains("the method adapts lm_head"), "{both}");

    // A loaded folder whose config asks for rows its weights file lacks.
    let adapter = fresh(&case_of("lora: {trainable_token_indices: [2]}"), &json);
    let model = build_llama(&config, &weights, adapter.linear_factory());
    adapter.finish_injection(&model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path(), "models/tiny").unwrap();
    let config_path = dir.path().join("adapter_config.json");
    let mut saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    saved["trainable_token_indices"] = serde_json::json!([2, 99]);
    std::fs::write(&config_path, saved.to_string()).unwrap();
    let loaded = load_adapter(dir.path(), &Device::Cpu).unwrap();
    let reloaded = build_llama(&config, &weights, loaded.linear_factory());
    let error = loaded.finish_injection(&reloaded).unwrap_err().to_string();
    assert!(
        error.contains("adapter_config.json") && error.contains("token id 99"),
        "{error}"
    );
    // PEFT's `ensure_weight_tying` with a module to save would tie lm_head to the copy: refused.
    saved["trainable_token_indices"] = serde_json::json!([2]);
    saved["modules_to_save"] = serde_json::json!(["lm_head"]);
    saved["ensure_weight_tying"] = serde_json::json!(true);
    std::fs::write(&config_path, saved.to_string()).unwrap();
    let error = load_adapter(dir.path(), &Device::Cpu)
        .err()
        .expect("ensure_weight_tying is refused")
        .to_string();
    assert!(error.contains("`ensure_weight_tying: true`"), "{error}");
}

/// PEFT-made adapters with auxiliary modules (tests/fixtures/peft_auxiliary: PEFT 0.21 and
/// transformers 5.17 on a random tied Llama of the tiny shape, LoRA r=2 on q/v with every
/// trainable tensor moved by seeded noise, saved with `save_pretrained`, with PEFT's logits for
/// two rows): `trainable_token_indices` as a list (the tied head follows) and as a mapping (the
/// head with its own rows), `modules_to_save: [lm_head, embed_tokens]` and `[norm]` (every
/// RMSNorm), and on a random tiny GPT-2 LoRA on c_attn with `modules_to_save: [ln_1, ln_f]`
/// (LayerNorm weight and bias). Each loads through the registry, uses every tensor, and
/// reproduces PEFT's logits; the norm cases count PEFT's trainable parameters
/// (`get_nb_trainable_parameters`: 304 and 352, of which 5·16 and 3·2·16 the norm copies).
#[test]
fn peft_made_auxiliary_adapters_import_with_peft_logits() {
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_auxiliary");
    let cases = [
        ("tokens", "base", None),
        ("tokens_head", "base", None),
        ("save", "base", None),
        ("norms", "base", Some(304)),
        ("gpt2_norms", "gpt2_base", Some(352)),
    ];
    for (case, base_folder, peft_trainable) in cases {
        let dir = root.join(case);
        let adapter = load_adapter(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{case}: {e}"));
        let model = ModelDir::open(&root.join(base_folder))
            .unwrap()
            .load(&Device::Cpu, DType::F32, adapter.linear_factory())
            .unwrap();
        adapter
            .finish_injection(model.as_ref())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        if let Some(count) = peft_trainable {
            assert_eq!(adapter.trainable_parameter_count(), count, "{case}");
        }
        let expected =
            candle_core::safetensors::load(dir.join("expected_logits.safetensors"), &Device::Cpu)
                .unwrap();
        let (ids, mask) = (&expected["input_ids"], &expected["attention_mask"]);
        let logits = model
            .forward(ids, Some(mask), &adapter.hooks().unwrap())
            .unwrap();
        let error = masked_max_abs(&logits, &expected["logits"], mask).unwrap();
        let base = ModelDir::open(&root.join(base_folder))
            .unwrap()
            .load(&Device::Cpu, DType::F32, &FrozenLinearFactory)
            .unwrap();
        let moved = masked_max_abs(
            &base
                .forward(ids, Some(mask), &peftpipe::models::Hooks::none())
                .unwrap(),
            &expected["logits"],
            mask,
        )
        .unwrap();
        eprintln!("PEFT {case}: max abs logit error {error:e} (the adapter moves them {moved:e})");
        assert!(error < 1e-5, "{case}: {error}");
        assert!(moved > 1e-2, "{case}: the fixture adapter is a no-op");
    }
}

/// Norms as modules to save (PEFT's `ModulesToSaveWrapper` around an RMSNorm), on the tied tiny
/// Llama: `[post_attention_layernorm, model.norm]` makes one f32 copy of each matched norm's
/// weight (PEFT's names, `[hidden]` each, initialised from the base: step-0 identity), each gets
/// a finite non-zero gradient and moves in a training step while the other norms stay frozen
/// (no variable, the merged checkpoint keeps them bit-identical), the folder reloads to the same
/// logits, the merge writes the trained weights and gives the adapter's logits, and the
/// trainable-parameter count is PEFT's (`hidden` per RMSNorm copy).
#[test]
fn modules_to_save_norms_train_save_load_and_merge() {
    let (json, config) = tied_llama();
    let weights = llama_weights(&config, 16, 0.2);
    let yaml = "lora: {r: 2, alpha: 4, modules_to_save: [post_attention_layernorm, model.norm]}";
    let adapter = fresh(&case_of(yaml), &json);
    let model = build_llama(&config, &weights, adapter.linear_factory());
    adapter.finish_injection(&model).unwrap();
    let norms = [
        "model.layers.0.post_attention_layernorm",
        "model.layers.1.post_attention_layernorm",
        "model.norm",
    ];
    let names: Vec<String> = adapter
        .trainable_vars()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !name.contains(".lora_"))
        .collect();
    let expected: Vec<String> = norms
        .iter()
        .map(|norm| format!("base_model.model.{norm}.weight"))
        .collect();
    assert_eq!(names, expected);
    let lora_only = fresh(&case_of("lora: {r: 2, alpha: 4}"), &json);
    let plain_model = build_llama(&config, &weights, lora_only.linear_factory());
    lora_only.finish_injection(&plain_model).unwrap();
    assert_eq!(
        adapter.trainable_parameter_count() - lora_only.trainable_parameter_count(),
        3 * 16,
        "PEFT counts hidden_size per RMSNorm copy"
    );
    let method = support::methods::method_config(yaml);
    assert_eq!(
        peftpipe::peft::auxiliary::auxiliary_parameters(&method, &config),
        Ok(3 * 16)
    );
    // Step-0 identity against the base model.
    let base = build_llama(&config, &weights, &FrozenLinearFactory);
    assert_eq!(
        max_difference(
            &logits(&model, Some(adapter.as_ref())),
            &logits(&base, None)
        ),
        0.0,
        "step-0 identity"
    );
    // One step: each copy gets a finite non-zero gradient and moves.
    let grads = sgd_step(adapter.as_ref(), &model);
    for name in &expected {
        let grad: Vec<f32> = grads[name].to_vec1().unwrap();
        assert_eq!(grad.len(), 16, "{name}");
        assert!(
            grad.iter().all(|v| v.is_finite()) && grad.iter().any(|v| *v != 0.0),
            "{name}: {grad:?}"
        );
    }
    let adapted = logits(&model, Some(adapter.as_ref()));
    let merged = merged_weights(adapter.as_ref(), &weights);
    for norm in norms {
        let key = format!("{norm}.weight");
        assert!(
            max_difference(&merged[&key], &weights[&key]) > 0.0,
            "{key} did not move"
        );
    }
    for (name, weight) in &weights {
        if !norms.iter().any(|norm| name.starts_with(norm)) && !name.contains("proj") {
            assert_eq!(max_difference(&merged[name], weight), 0.0, "{name} changed");
        }
    }
    // The merge of the LoRA factors and the trained norms is the adapted model.
    let plain = build_llama(&config, &merged, &FrozenLinearFactory);
    let difference = max_difference(&logits(&plain, None), &adapted);
    assert!(difference < 1e-5, "merged model: {difference}");
    // Save → PEFT's names in the folder → load gives the same logits and tensors.
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path(), "models/tiny").unwrap();
    let saved =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    for name in &expected {
        assert_eq!(saved[name].dims(), [16], "{name}");
    }
    let saved_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        saved_config["modules_to_save"],
        serde_json::json!(["post_attention_layernorm", "model.norm"])
    );
    let loaded = load_adapter(dir.path(), &Device::Cpu).unwrap();
    // Merged from the file alone (the export stage's way: no model built).
    let from_file = merged_weights(loaded.as_ref(), &weights);
    for norm in norms {
        let key = format!("{norm}.weight");
        assert_eq!(
            max_difference(&from_file[&key], &merged[&key]),
            0.0,
            "{key}"
        );
    }
    let reloaded = build_llama(&config, &weights, loaded.linear_factory());
    loaded.finish_injection(&reloaded).unwrap();
    assert_eq!(
        max_difference(&logits(&reloaded, Some(loaded.as_ref())), &adapted),
        0.0
    );
    assert_eq!(
        loaded.trainable_parameter_count(),
        adapter.trainable_parameter_count()
    );
    // A file whose norm copy has another shape names the file and the tensor.
    let mut broken: HashMap<String, Tensor> = saved.clone();
    broken.insert(
        expected[2].clone(),
        Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&broken, dir.path().join("adapter_model.safetensors")).unwrap();
    let loaded = load_adapter(dir.path(), &Device::Cpu).unwrap();
    let reloaded = build_llama(&config, &weights, loaded.linear_factory());
    let error = loaded.finish_injection(&reloaded).unwrap_err().to_string();
    assert!(
        error.contains("adapter_model.safetensors")
            && error.contains("base_model.model.model.norm.weight")
            && error.contains("shape [8]"),
        "{error}"
    );
}

/// GPT-2's LayerNorms as modules to save: a copy of weight and bias each (PEFT's
/// `ln_f.weight`/`ln_f.bias` names, 2·hidden parameters per norm), both trained from step-0
/// identity, saved, reloaded and merged.
#[test]
fn modules_to_save_layer_norms_train_weight_and_bias() {
    use peftpipe::models::random::{load_from_tensors, random_weights};
    let json = serde_json::json!({
        "model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 4,
        "vocab_size": 40, "n_positions": 64, "layer_norm_epsilon": 1e-5
    });
    let config = peftpipe::models::ModelConfig::from_json(&json).unwrap();
    let mut weights = random_weights(&config, 7, 0.2, DType::F32, &Device::Cpu).unwrap();
    // Norm parameters away from 1 and 0, so a wrong parameter shows.
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for (name, tensor) in weights.iter_mut() {
        if name.contains(".ln_") {
            let values: Vec<f32> = (0..16).map(|_| rng.random::<f32>() * 0.4 - 0.2).collect();
            *tensor =
                (tensor.clone() + Tensor::from_vec(values, 16, &Device::Cpu).unwrap()).unwrap();
        }
    }
    let build = |factory: &dyn peftpipe::models::LinearFactory| {
        load_from_tensors(&config, weights.clone(), DType::F32, &Device::Cpu, factory).unwrap()
    };
    let yaml = "lora: {r: 2, alpha: 4, target_modules: [c_attn], modules_to_save: [ln_1, ln_f]}";
    let adapter = fresh(&case_of(yaml), &json);
    let model = build(adapter.linear_factory());
    adapter.finish_injection(model.as_ref()).unwrap();
    let names: Vec<String> = adapter
        .trainable_vars()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !name.contains(".lora_"))
        .collect();
    let mut expected = Vec::new();
    for norm in [
        "transformer.h.0.ln_1",
        "transformer.h.1.ln_1",
        "transformer.ln_f",
    ] {
        for parameter in ["bias", "weight"] {
            expected.push(format!("base_model.model.{norm}.{parameter}"));
        }
    }
    assert_eq!(names, expected);
    assert_eq!(
        peftpipe::peft::auxiliary::auxiliary_parameters(
            &support::methods::method_config(yaml),
            &config
        ),
        Ok(3 * 2 * 16)
    );
    let base = build(&FrozenLinearFactory);
    assert_eq!(
        max_difference(
            &logits(model.as_ref(), Some(adapter.as_ref())),
            &logits(base.as_ref(), None)
        ),
        0.0,
        "step-0 identity"
    );
    let grads = sgd_step(adapter.as_ref(), model.as_ref());
    for name in &expected {
        let grad: Vec<f32> = grads[name].to_vec1().unwrap();
        assert!(
            grad.iter().all(|v| v.is_finite()) && grad.iter().any(|v| *v != 0.0),
            "{name}: {grad:?}"
        );
    }
    let adapted = logits(model.as_ref(), Some(adapter.as_ref()));
    let mut merged = weights.clone();
    for patch in adapter.merge_patches().unwrap().expect("mergeable") {
        // GPT-2's checkpoint names: Conv1D weights are `[in, out]` (LoRA's patch is `[out, in]`).
        let name = patch.tensor_name();
        let base = &merged[&name];
        let value = if base.rank() == 2 {
            patch.apply(&base.t().unwrap()).unwrap().t().unwrap()
        } else {
            patch.apply(base).unwrap()
        };
        merged.insert(name, value.contiguous().unwrap());
    }
    for norm in ["transformer.h.0.ln_1", "transformer.ln_f"] {
        for parameter in ["weight", "bias"] {
            let key = format!("{norm}.{parameter}");
            assert!(max_difference(&merged[&key], &weights[&key]) > 0.0, "{key}");
        }
    }
    assert_eq!(
        max_difference(
            &merged["transformer.h.0.ln_2.bias"],
            &weights["transformer.h.0.ln_2.bias"]
        ),
        0.0
    );
    let plain = load_from_tensors(
        &config,
        merged,
        DType::F32,
        &Device::Cpu,
        &FrozenLinearFactory,
    )
    .unwrap();
    let difference = max_difference(&logits(plain.as_ref(), None), &adapted);
    assert!(difference < 1e-5, "merged model: {difference}");
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path(), "models/gpt2").unwrap();
    // The names and shapes PEFT wrote for the same config on a GPT-2 of the same shape.
    let shapes_in = |path: std::path::PathBuf| {
        shapes(&candle_core::safetensors::load(path, &Device::Cpu).unwrap())
    };
    assert_eq!(
        shapes_in(dir.path().join("adapter_model.safetensors")),
        shapes_in(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/peft_auxiliary/gpt2_norms/adapter_model.safetensors")
        )
    );
    let loaded = load_adapter(dir.path(), &Device::Cpu).unwrap();
    let reloaded = build(loaded.linear_factory());
    loaded.finish_injection(reloaded.as_ref()).unwrap();
    assert_eq!(
        max_difference(&logits(reloaded.as_ref(), Some(loaded.as_ref())), &adapted),
        0.0
    );
}
