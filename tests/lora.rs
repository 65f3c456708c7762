//! LoRA against its definition and against Hugging Face PEFT: step-0 identity, merge equivalence,
//! gradient flow, PEFT adapter import (stories260k reference logits), save/load round trip, the
//! GPT-2 Conv1D case, and PEFT's trainable-parameter counts on real configs.
#![expect(
    clippy::print_stderr,
    reason = "tests print why they skip and the parity they measured"
)]

mod support;

use candle_core::{DType, Device, Tensor, Var};
use peftpipe::models::{CausalLm, FrozenLinearFactory, Hooks, ModelConfig, ModelDir};
use peftpipe::peft::targets::{lora_parameter_count, matched_modules};
use peftpipe::peft::{load_adapter, Adapter, LoraAdapter, LoraSettings, TargetModules};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use support::{build_llama, llama_weights, max_difference, shared_dir, tiny_llama_config};

fn settings(targets: TargetModules) -> LoraSettings {
    LoraSettings {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets,
        use_rslora: false,
        fan_in_fan_out: false,
        seed: 11,
    }
}

fn inputs() -> (Tensor, Tensor) {
    let ids = Tensor::new(
        &[[1u32, 5, 9, 13, 2, 7], [1, 30, 31, 4, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    (ids, mask)
}

fn logits(model: &dyn CausalLm) -> Tensor {
    let (ids, mask) = inputs();
    model.forward(&ids, Some(&mask), &Hooks::none()).unwrap()
}

/// Give every lora_B small random values so the adapter is not a no-op.
fn perturb(adapter: &dyn Adapter, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, var) in adapter.trainable_vars() {
        if name.ends_with("lora_B.weight") {
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| rng.random::<f32>() * 0.2 - 0.1)
                .collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn step_zero_lora_logits_equal_the_base_model() {
    let config = tiny_llama_config();
    let weights = llama_weights(&config, 1, 0.2);
    let base = build_llama(&config, &weights, &FrozenLinearFactory);
    let adapter = LoraAdapter::new(settings(TargetModules::AllLinear), &Device::Cpu).unwrap();
    let adapted = build_llama(&config, &weights, &adapter);
    adapter.finish_injection(&adapted).unwrap();
    // 2 layers × 7 linears, lm_head excluded.
    assert_eq!(adapter.trainable_vars().len(), 2 * 14);
    assert_eq!(max_difference(&logits(&base), &logits(&adapted)), 0.0);
}

#[test]
fn merged_and_unmerged_logits_agree() {
    let config = tiny_llama_config();
    let weights = llama_weights(&config, 2, 0.2);
    let base = build_llama(&config, &weights, &FrozenLinearFactory);
    let adapter = LoraAdapter::new(settings(TargetModules::AllLinear), &Device::Cpu).unwrap();
    let adapted = build_llama(&config, &weights, &adapter);
    perturb(&adapter, 3);
    let unmerged = logits(&adapted);
    assert!(
        max_difference(&unmerged, &logits(&base)) > 1e-3,
        "the perturbed adapter must change the logits"
    );
    adapter.merge().unwrap();
    let merged = logits(&adapted);
    let error = max_difference(&merged, &unmerged);
    assert!(error < 1e-5, "merged vs unmerged: {error}");
    // The merged weights handed to export give the same model when loaded as a plain model.
    let mut merged_weights = weights.clone();
    for patch in adapter.merge_patches().unwrap().unwrap() {
        let name = format!("{}.weight", patch.path);
        let weight = patch.apply(&weights[&name]).unwrap();
        merged_weights.insert(name, weight);
    }
    let exported = build_llama(&config, &merged_weights, &FrozenLinearFactory);
    let error = max_difference(&logits(&exported), &unmerged);
    assert!(error < 1e-5, "exported merged model vs adapter: {error}");
    adapter.unmerge().unwrap();
    let error = max_difference(&logits(&adapted), &unmerged);
    assert!(error < 1e-5, "after unmerge: {error}");
}

#[test]
fn every_lora_tensor_gets_a_finite_nonzero_gradient() {
    let config = tiny_llama_config();
    let weights = llama_weights(&config, 4, 0.2);
    let adapter = LoraAdapter::new(settings(TargetModules::AllLinear), &Device::Cpu).unwrap();
    let model = build_llama(&config, &weights, &adapter);
    // With B = 0, A's gradient is exactly zero (dL/dA = Bᵀ·…): perturb B first, as after a step.
    perturb(&adapter, 5);
    let (ids, mask) = inputs();
    let logits = model.forward(&ids, Some(&mask), &Hooks::none()).unwrap();
    let loss = peftpipe::ops::next_token_cross_entropy(&logits, &ids, &mask).unwrap();
    let grads = loss.mean.backward().unwrap();
    for (name, var) in adapter.trainable_vars() {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let norm = grad
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{name}: |grad|² = {norm}");
    }
}

#[test]
fn saved_adapter_loads_back_to_identical_logits() {
    let config = tiny_llama_config();
    let weights = llama_weights(&config, 6, 0.2);
    let targets = TargetModules::Names(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]);
    let adapter = LoraAdapter::new(settings(targets), &Device::Cpu).unwrap();
    let model = build_llama(&config, &weights, &adapter);
    perturb(&adapter, 7);
    let expected = logits(&model);
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path(), "models/tiny").unwrap();

    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(written["peft_type"], "LORA");
    assert_eq!(written["task_type"], "CAUSAL_LM");
    assert_eq!(written["r"], 4);
    assert_eq!(written["lora_alpha"], 8);
    assert_eq!(
        written["target_modules"],
        serde_json::json!(["down_proj", "q_proj", "v_proj"])
    );
    assert_eq!(written["base_model_name_or_path"], "models/tiny");
    let tensors =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(tensors.len(), 2 * 3 * 2);
    let a = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"];
    let b = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!(
        (a.dims(), b.dims(), a.dtype()),
        (&[4, 24][..], &[16, 4][..], DType::F32)
    );

    let loaded = load_adapter(dir.path(), &Device::Cpu).unwrap();
    let reloaded = build_llama(&config, &weights, loaded.linear_factory());
    loaded.finish_injection(&reloaded).unwrap();
    assert_eq!(max_difference(&logits(&reloaded), &expected), 0.0);
    // Saving the loaded adapter gives the same bytes.
    let again = tempfile::tempdir().unwrap();
    loaded.save(again.path(), "models/tiny").unwrap();
    for file in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(
            std::fs::read(dir.path().join(file)).unwrap(),
            std::fs::read(again.path().join(file)).unwrap(),
            "{file}"
        );
    }
}

#[test]
fn an_adapter_for_other_modules_is_refused() {
    let config = tiny_llama_config();
    let weights = llama_weights(&config, 8, 0.2);
    let adapter = LoraAdapter::new(
        settings(TargetModules::Names(vec!["q_proj".into()])),
        &Device::Cpu,
    )
    .unwrap();
    build_llama(&config, &weights, &adapter);
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path(), "x").unwrap();
    // Loaded with a model that lacks layer 1: its tensors match nothing → an error naming them.
    let small = ModelConfig::from_json(&serde_json::json!({
        "model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 40, "max_position_embeddings": 64, "tie_word_embeddings": false
    }))
    .unwrap();
    let small_weights = llama_weights(&small, 9, 0.2);
    let loaded = load_adapter(dir.path(), &Device::Cpu).unwrap();
    let small_model = build_llama(&small, &small_weights, loaded.linear_factory());
    let error = loaded
        .finish_injection(&small_model)
        .unwrap_err()
        .to_string();
    assert!(error.contains("model.layers.1.self_attn.q_proj"), "{error}");
}

#[test]
fn peft_adapter_import_reproduces_the_reference_logits() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let root = shared.join("models/stories260k");
    let reference = candle_core::safetensors::load(
        root.join("reference/base_logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let expected = candle_core::safetensors::load(
        root.join("reference/peft_lora/expected_logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let adapter = load_adapter(&root.join("reference/peft_lora"), &Device::Cpu).unwrap();
    let model = ModelDir::open(&root)
        .unwrap()
        .load(&Device::Cpu, DType::F32, adapter.linear_factory())
        .unwrap();
    adapter.finish_injection(model.as_ref()).unwrap();
    assert_eq!(adapter.trainable_parameter_count(), 23_120);
    let ids = &reference["input_ids"];
    let mask = &reference["attention_mask"];
    let got = model.forward(ids, Some(mask), &Hooks::none()).unwrap();
    let keep = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let error = got
        .sub(&expected["logits"])
        .unwrap()
        .broadcast_mul(&keep)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("PEFT LoRA import on stories260k: max |Δlogits| = {error:e}");
    assert!(error <= 1e-4, "max |Δ| = {error}");
    // The base logits differ, so the adapter really acts.
    let base_error = got
        .sub(&reference["logits"])
        .unwrap()
        .broadcast_mul(&keep)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(base_error > 1e-2);
}

#[test]
fn gpt2_conv1d_layers_save_linear_shapes_and_merge_exactly() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let root = shared.join("models/tiny-gpt2-random");
    let dir = ModelDir::open(&root).unwrap();
    let targets = TargetModules::default_for("gpt2").unwrap();
    let adapter = LoraAdapter::new(
        LoraSettings {
            fan_in_fan_out: true,
            ..settings(targets)
        },
        &Device::Cpu,
    )
    .unwrap();
    let model = dir.load(&Device::Cpu, DType::F32, &adapter).unwrap();
    adapter.finish_injection(model.as_ref()).unwrap();
    let base = dir
        .load(&Device::Cpu, DType::F32, &FrozenLinearFactory)
        .unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 13, 2, 7]], &Device::Cpu).unwrap();
    let forward = |m: &dyn CausalLm| m.forward(&ids, None, &Hooks::none()).unwrap();
    assert_eq!(
        max_difference(&forward(model.as_ref()), &forward(base.as_ref())),
        0.0
    );
    perturb(&adapter, 12);
    let unmerged = forward(model.as_ref());
    adapter.merge().unwrap();
    assert!(max_difference(&forward(model.as_ref()), &unmerged) < 1e-5);
    let out = tempfile::tempdir().unwrap();
    adapter.save(out.path(), "tiny-gpt2-random").unwrap();
    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(written["fan_in_fan_out"], true);
    assert_eq!(written["target_modules"], serde_json::json!(["c_attn"]));
    let tensors =
        candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    // PEFT stores lora_A [r, in] and lora_B [out, r] for Conv1D too (n_embd 64 → 3·64).
    assert_eq!(
        tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].dims(),
        &[4, 64]
    );
    assert_eq!(
        tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].dims(),
        &[192, 4]
    );
}

fn config_at(name: &str) -> Option<ModelConfig> {
    let shared = shared_dir()?;
    let text = std::fs::read_to_string(shared.join("models/configs").join(name)).unwrap();
    Some(ModelConfig::from_json(&serde_json::from_str(&text).unwrap()).unwrap())
}

fn names(list: &[&str]) -> TargetModules {
    TargetModules::Names(list.iter().map(|s| s.to_string()).collect())
}

#[test]
fn lora_parameter_counts_match_peft_on_real_configs() {
    let Some(llama_3b) = config_at("llama-3.2-3b.config.json") else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let layers = llama_3b.linear_layers();
    // PEFT's own benchmark figure.
    assert_eq!(
        lora_parameter_count(&layers, &names(&["q_proj", "v_proj"]), 32),
        Some(9_175_040)
    );
    assert_eq!(
        matched_modules(&layers, &names(&["q_proj", "v_proj"])).len(),
        56
    );

    // Llama-3.2-1B, r16 on all seven linears (what `bench train` trains): 16 × 704,512.
    let layers_1b = config_at("llama-3.2-1b.config.json")
        .unwrap()
        .linear_layers();
    let seven = names(&[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]);
    assert_eq!(
        lora_parameter_count(&layers_1b, &seven, 16),
        Some(11_272_192)
    );
    assert_eq!(
        lora_parameter_count(&layers_1b, &TargetModules::AllLinear, 16),
        Some(11_272_192)
    );

    // Llama-3.1-8B, r16 on q,v: 32 × 16 × (8192 + 5120) = 6,815,744.
    let layers_8b = config_at("llama-3.1-8b.config.json")
        .unwrap()
        .linear_layers();
    assert_eq!(
        lora_parameter_count(&layers_8b, &names(&["q_proj", "v_proj"]), 16),
        Some(6_815_744)
    );

    // LLaMA-7B (MHA), r8 on q,v: 32 × 8 × 4 × 4096 = 4,194,304 (the alpaca-lora figure).
    let layers_7b = config_at("llama-7b.config.json").unwrap().linear_layers();
    assert_eq!(
        lora_parameter_count(&layers_7b, &names(&["q_proj", "v_proj"]), 8),
        Some(4_194_304)
    );

    // A regex over the top layers only (full-match semantics).
    let top = TargetModules::regex(r"model\.layers\.(2[4-7])\.self_attn\.(q|v)_proj").unwrap();
    assert_eq!(
        lora_parameter_count(&layers, &top, 32),
        Some(4 * 9_175_040 / 28)
    );
}

#[test]
fn stories260k_all_seven_count_matches_the_reference_adapter() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let dir = ModelDir::open(&shared.join("models/stories260k")).unwrap();
    let seven = names(&[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]);
    assert_eq!(
        lora_parameter_count(&dir.config().linear_layers(), &seven, 4),
        Some(23_120)
    );
}

#[test]
fn var_count_is_two_per_targeted_layer() {
    let config = tiny_llama_config();
    let weights = llama_weights(&config, 10, 0.2);
    let adapter = LoraAdapter::new(
        settings(TargetModules::regex(r".*\.layers\.1\.mlp\..*").unwrap()),
        &Device::Cpu,
    )
    .unwrap();
    let model = build_llama(&config, &weights, &adapter);
    adapter.finish_injection(&model).unwrap();
    let vars: Vec<(String, Var)> = adapter.trainable_vars();
    assert_eq!(vars.len(), 6);
    let count = lora_parameter_count(&config.linear_layers(), &adapter.settings().targets, 4);
    assert_eq!(Some(adapter.trainable_parameter_count()), count);
}
