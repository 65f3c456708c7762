//! The export stage: the PEFT adapter folder keeps PEFT's tensor names and values, the merged
//! model folder reloads with our loader and gives the adapted model's logits (Llama with PEFT's own
//! reference adapter, GPT-2 with Conv1D weights), publishing is atomic and refuses destinations
//! outside the project; the merged model re-quantized in bitsandbytes' 4-bit format (`quantize:`)
//! is the CPU quantizer applied to the plain merged export's weights, byte for byte, and loads with
//! peftpipe's reader of such checkpoints. Needs `PEFTPIPE_SHARED` for the model tests (skips with a
//! printed reason).
#![expect(
    clippy::print_stderr,
    reason = "tests print skip reasons and the measured errors"
)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peftpipe::config::export::ExportDtype;
use peftpipe::config::method::{ComputeDtypeChoice, FourBitSettings, QuantTypeChoice};
use peftpipe::config::ExportConfig;
use peftpipe::models::checkpoint::MergedOptions;
use peftpipe::models::quantized::{
    is_quantized_linear, read_bnb_weights, BaseQuantization, QuantizingFactory,
};
use peftpipe::models::quantized_writer::{write_quantized_merged_folder, QuantizedMergedOptions};
use peftpipe::models::{
    FrozenLinearFactory, Hooks, LinearFactory, LinearLayer, LinearWeights, ModelDir,
};
use peftpipe::peft::qlora::quant_config;
use peftpipe::quant::{QuantConfig, QuantizedTensor};
use peftpipe::stages::export::EXPORT_MARKER;
use support::export::export;
use support::{masked_max_abs, max_difference, shared_dir, TestResult};

/// A train artifact as the train stage writes it: `adapter/` + `base_model.json`.
fn fake_train_artifact(root: &Path, adapter_source: &Path, base: &Path) -> PathBuf {
    let train = root.join("train-artifact");
    std::fs::create_dir_all(train.join("adapter")).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter_source.join(file), train.join("adapter").join(file)).unwrap();
    }
    let record = serde_json::json!({"model": base.display().to_string(), "path": base.display().to_string()});
    std::fs::write(train.join("base_model.json"), record.to_string()).unwrap();
    std::fs::write(
        train.join("summary.json"),
        r#"{"final_loss": 1.25, "steps": 60}"#,
    )
    .unwrap();
    train
}

fn config(adapter: Option<&str>, merged: Option<&str>) -> ExportConfig {
    merged_config(adapter, merged, None, None)
}

fn merged_config(
    adapter: Option<&str>,
    merged: Option<&str>,
    max_shard_size: Option<&str>,
    dtype: Option<ExportDtype>,
) -> ExportConfig {
    ExportConfig {
        from: "tune".into(),
        adapter: adapter.map(str::to_string),
        merged: merged.map(str::to_string),
        max_shard_size: max_shard_size.map(str::to_string),
        dtype,
        base_model_name_or_path: None,
        gguf: None,
        gguf_type: None,
        quantize: None,
    }
}

#[test]
fn merged_export_of_peft_reference_lora_gives_peft_logits() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let base = shared.join("models/stories260k");
    let reference = base.join("reference/peft_lora");
    let project = tempfile::tempdir()?;
    let train = fake_train_artifact(project.path(), &reference, &base);
    export(
        project.path(),
        &train,
        config(Some("out/adapter"), Some("out/merged")),
        false,
    )?;
    if let Some(keep) = std::env::var_os("PEFTPIPE_KEEP_EXPORT") {
        // For tests/python/check_peft_export.py: keep the published folders.
        let keep = PathBuf::from(keep);
        for kind in ["adapter", "merged"] {
            peftpipe::stages::export::publish_folder(
                &project.path().join("out").join(kind),
                &keep.join("out").join(kind),
                "export",
            )?;
        }
    }
    let merged = project.path().join("out/merged");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        EXPORT_MARKER,
    ] {
        assert!(merged.join(file).is_file(), "merged folder lacks {file}");
    }
    // Same tensor names, shapes and dtypes as the base checkpoint.
    let base_tensors =
        candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu)?;
    let merged_tensors =
        candle_core::safetensors::load(merged.join("model.safetensors"), &Device::Cpu)?;
    let mut base_names: Vec<_> = base_tensors.keys().collect();
    let mut merged_names: Vec<_> = merged_tensors.keys().collect();
    base_names.sort();
    merged_names.sort();
    assert_eq!(base_names, merged_names);
    for (name, tensor) in &base_tensors {
        assert_eq!(tensor.dims(), merged_tensors[name].dims(), "{name}");
        assert_eq!(tensor.dtype(), merged_tensors[name].dtype(), "{name}");
    }

    // Our loader on the merged folder reproduces PEFT's logits for the adapted model.
    let model = ModelDir::open(&merged)?.load(&Device::Cpu, DType::F32, &FrozenLinearFactory)?;
    let inputs = candle_core::safetensors::load(
        base.join("reference/base_logits.safetensors"),
        &Device::Cpu,
    )?;
    let expected = candle_core::safetensors::load(
        reference.join("expected_logits.safetensors"),
        &Device::Cpu,
    )?;
    let logits = model.forward(
        &inputs["input_ids"],
        Some(&inputs["attention_mask"]),
        &Hooks::none(),
    )?;
    let error = masked_max_abs(&logits, &expected["logits"], &inputs["attention_mask"])?;
    eprintln!("merged stories260k + peft_lora vs PEFT: max abs logit error = {error:e}");
    assert!(error <= 1e-4, "max abs error {error}");
    // And the merge changed the model (the reference adapter is not a no-op).
    let base_logits = &inputs["logits"];
    let moved = masked_max_abs(&logits, base_logits, &inputs["attention_mask"])?;
    assert!(
        moved > 1e-2,
        "merged logits equal the base model's ({moved})"
    );
    Ok(())
}

#[test]
fn exported_adapter_keeps_peft_names_and_values() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let base = shared.join("models/stories260k");
    let reference = base.join("reference/peft_lora");
    let project = tempfile::tempdir()?;
    let train = fake_train_artifact(project.path(), &reference, &base);
    export(project.path(), &train, config(Some("adapter"), None), false)?;
    let exported = project.path().join("adapter");
    assert!(!project.path().join("merged").exists());
    let ours =
        candle_core::safetensors::load(exported.join("adapter_model.safetensors"), &Device::Cpu)?;
    let peft =
        candle_core::safetensors::load(reference.join("adapter_model.safetensors"), &Device::Cpu)?;
    let mut our_names: Vec<&String> = ours.keys().collect();
    let mut peft_names: Vec<&String> = peft.keys().collect();
    our_names.sort();
    peft_names.sort();
    assert_eq!(our_names, peft_names, "tensor names differ from PEFT's");
    assert!(our_names
        .iter()
        .all(|name| name.starts_with("base_model.model.model.layers.")));
    for (name, tensor) in &peft {
        let difference = (tensor - &ours[name])?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(difference, 0.0, "{name}");
    }
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        exported.join("adapter_config.json"),
    )?)?;
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(
        config["base_model_name_or_path"],
        base.canonicalize()?.display().to_string()
    );
    let card = std::fs::read_to_string(exported.join("README.md"))?;
    assert!(card.contains("library_name: peft"));
    assert!(card.contains("| trainable parameters | 23120 |"), "{card}");
    assert!(card.contains("| steps | 60 |"), "{card}");
    Ok(())
}

#[test]
fn a_text_initialised_prompt_names_the_published_base_as_its_tokenizer() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let base = shared.join("models/stories260k");
    let project = tempfile::tempdir()?;
    let train = fake_train_artifact(
        project.path(),
        &base.join("reference/peft_prompt_tuning"),
        &base,
    );
    // As the train stage writes it: the model as written in the pipeline, unexpanded.
    let config_path = train.join("adapter/adapter_config.json");
    let mut written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
    written["prompt_tuning_init"] = "TEXT".into();
    written["prompt_tuning_init_text"] = "Once upon a time".into();
    written["tokenizer_name_or_path"] = "${PEFTPIPE_SHARED}/models/stories260k".into();
    std::fs::write(&config_path, written.to_string())?;
    export(project.path(), &train, config(Some("adapter"), None), false)?;
    let exported: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        project.path().join("adapter/adapter_config.json"),
    )?)?;
    // PEFT loads this tokenizer when it loads the adapter for training: the base it names.
    assert_eq!(
        exported["tokenizer_name_or_path"],
        exported["base_model_name_or_path"]
    );
    assert_eq!(
        exported["base_model_name_or_path"],
        base.canonicalize()?.display().to_string()
    );
    Ok(())
}

#[test]
fn export_destinations_may_not_escape_the_project() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let base = shared.join("models/stories260k");
    let root = tempfile::tempdir()?;
    let project = root.path().join("project");
    std::fs::create_dir_all(&project)?;
    let train = fake_train_artifact(root.path(), &base.join("reference/peft_lora"), &base);
    let error = export(&project, &train, config(Some("../outside"), None), false).unwrap_err();
    assert!(
        error.to_string().contains("--allow-outside-project"),
        "{error}"
    );
    assert!(!root.path().join("outside").exists());
    // With the flag, the same destination is written.
    export(&project, &train, config(Some("../outside"), None), true)?;
    assert!(root
        .path()
        .join("outside/adapter_model.safetensors")
        .is_file());
    // Republishing replaces the earlier export, but never a file peftpipe did not write.
    std::fs::write(root.path().join("outside/stale.txt"), "old")?;
    let error = export(&project, &train, config(Some("../outside"), None), true).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("holds stale.txt, which peftpipe did not write"),
        "{error}"
    );
    assert!(root.path().join("outside/stale.txt").is_file());
    std::fs::remove_file(root.path().join("outside/stale.txt"))?;
    export(&project, &train, config(Some("../outside"), None), true)?;
    Ok(())
}

/// A test-side LoRA (y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ on plain tensors): the oracle the merged
/// weights are checked against.
struct OracleLora {
    pairs: HashMap<String, (Tensor, Tensor)>,
    scale: f64,
}

struct OracleLayer {
    base: LinearWeights,
    lora: Option<(Tensor, Tensor, f64)>,
}

impl LinearLayer for OracleLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.broadcast_matmul(&self.base.weight.t()?)?;
        let y = match &self.base.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        match &self.lora {
            None => Ok(y),
            Some((a, b, scale)) => {
                let delta = (x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * *scale)?;
                y + delta
            }
        }
    }
}

impl LinearFactory for OracleLora {
    fn build(&self, path: &str, base: LinearWeights) -> candle_core::Result<Box<dyn LinearLayer>> {
        let lora = self
            .pairs
            .get(path)
            .map(|(a, b)| (a.clone(), b.clone(), self.scale));
        Ok(Box::new(OracleLayer { base, lora }))
    }
}

#[test]
fn merged_gpt2_conv1d_weights_give_the_adapted_logits() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let base = shared.join("models/tiny-gpt2-random");
    let project = tempfile::tempdir()?;
    // A LoRA adapter on c_attn (64 → 192, Conv1D stored [64, 192]) and mlp.c_proj (256 → 64,
    // stored [256, 64]) of both layers, rank 2, alpha 4, random non-zero A and B.
    let adapter_dir = project.path().join("adapter-source");
    std::fs::create_dir_all(&adapter_dir)?;
    let device = Device::Cpu;
    let mut tensors = HashMap::new();
    let mut pairs = HashMap::new();
    for layer in 0..2 {
        for (module, input, output) in [("attn.c_attn", 64, 192), ("mlp.c_proj", 256, 64)] {
            let path = format!("transformer.h.{layer}.{module}");
            let a = Tensor::randn(0f32, 0.2, (2, input), &device)?;
            let b = Tensor::randn(0f32, 0.2, (output, 2), &device)?;
            tensors.insert(format!("base_model.model.{path}.lora_A.weight"), a.clone());
            tensors.insert(format!("base_model.model.{path}.lora_B.weight"), b.clone());
            pairs.insert(path, (a, b));
        }
    }
    candle_core::safetensors::save(&tensors, adapter_dir.join("adapter_model.safetensors"))?;
    let adapter_config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
        "lora_dropout": 0.0, "fan_in_fan_out": true, "bias": "none", "use_rslora": false,
        "target_modules": ["c_attn", "c_proj"], "modules_to_save": null,
        "base_model_name_or_path": base.display().to_string(),
    });
    std::fs::write(
        adapter_dir.join("adapter_config.json"),
        adapter_config.to_string(),
    )?;
    let train = fake_train_artifact(project.path(), &adapter_dir, &base);
    export(project.path(), &train, config(None, Some("merged")), false)?;

    let inputs =
        candle_core::safetensors::load(base.join("reference_logits.safetensors"), &device)?;
    let (ids, mask) = (&inputs["input_ids"], &inputs["attention_mask"]);
    let merged = ModelDir::open(&project.path().join("merged"))?.load(
        &device,
        DType::F32,
        &FrozenLinearFactory,
    )?;
    let oracle = OracleLora { pairs, scale: 2.0 };
    let adapted = ModelDir::open(&base)?.load(&device, DType::F32, &oracle)?;
    let merged_logits = merged.forward(ids, Some(mask), &Hooks::none())?;
    let adapted_logits = adapted.forward(ids, Some(mask), &Hooks::none())?;
    let error = masked_max_abs(&merged_logits, &adapted_logits, mask)?;
    eprintln!("merged tiny-gpt2 vs unmerged LoRA: max abs logit error = {error:e}");
    assert!(error <= 1e-4, "max abs error {error}");
    let moved = masked_max_abs(&merged_logits, &inputs["logits"], mask)?;
    assert!(moved > 1e-3, "the merge did not change the model ({moved})");
    Ok(())
}

#[test]
fn exported_adapter_reimports_with_peft_logits_and_matches_the_merged_model() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    use peftpipe::infer::session::InferenceModel;
    use peftpipe::infer::LanguageModel;
    let base = shared.join("models/stories260k");
    let reference = base.join("reference/peft_lora");
    let project = tempfile::tempdir()?;
    let train = fake_train_artifact(project.path(), &reference, &base);
    export(project.path(), &train, config(Some("a"), Some("m")), false)?;
    let inputs = candle_core::safetensors::load(
        base.join("reference/base_logits.safetensors"),
        &Device::Cpu,
    )?;
    let expected = candle_core::safetensors::load(
        reference.join("expected_logits.safetensors"),
        &Device::Cpu,
    )?;
    let (ids, mask) = (&inputs["input_ids"], &inputs["attention_mask"]);
    let adapted = InferenceModel::load(
        &base,
        Some(&project.path().join("a")),
        None,
        &Device::Cpu,
        DType::F32,
    )?;
    let merged = InferenceModel::load(
        &project.path().join("m"),
        None,
        None,
        &Device::Cpu,
        DType::F32,
    )?;
    let ids = ids.to_dtype(DType::U32)?;
    let mask = mask.to_dtype(DType::U32)?;
    let adapted_logits = adapted.language_model().logits(&ids, &mask)?;
    let merged_logits = merged.language_model().logits(&ids, &mask)?;
    // The adapter came in through crate::peft in inference mode: no autograd graph was built.
    assert!(!adapted_logits.track_op(), "inference built graph nodes");
    let versus_peft = masked_max_abs(&adapted_logits, &expected["logits"], &mask)?;
    let versus_merged = masked_max_abs(&adapted_logits, &merged_logits, &mask)?;
    eprintln!("re-imported adapter vs PEFT: {versus_peft:e}; vs merged export: {versus_merged:e}");
    assert!(versus_peft <= 1e-4, "{versus_peft}");
    assert!(versus_merged <= 1e-4, "{versus_merged}");
    Ok(())
}

/// Sharded like transformers above `max_shard_size` (index with total_size and weight_map), and
/// the round trip export → load → logits gives exactly the unsharded export's logits; `dtype:
/// bf16` stores every tensor as the f32 merge rounded to bf16 and says so in config.json.
#[test]
fn merged_export_shards_and_converts_dtype() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let base = shared.join("models/stories260k");
    let reference = base.join("reference/peft_lora");
    let project = tempfile::tempdir()?;
    let train = fake_train_artifact(project.path(), &reference, &base);
    export(project.path(), &train, config(None, Some("single")), false)?;
    let limit = 256 * 1024;
    export(
        project.path(),
        &train,
        merged_config(None, Some("sharded"), Some("256KiB"), None),
        false,
    )?;
    export(
        project.path(),
        &train,
        merged_config(None, Some("bf16"), None, Some(ExportDtype::Bf16)),
        false,
    )?;
    let single = project.path().join("single");
    let sharded = project.path().join("sharded");
    assert!(single.join("model.safetensors").is_file());
    assert!(!single.join("model.safetensors.index.json").exists());

    // The index: every tensor mapped to an existing shard, total_size = the tensor bytes.
    assert!(!sharded.join("model.safetensors").exists());
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        sharded.join("model.safetensors.index.json"),
    )?)?;
    let weight_map = index["weight_map"].as_object().ok_or("no weight_map")?;
    let single_tensors =
        candle_core::safetensors::load(single.join("model.safetensors"), &Device::Cpu)?;
    let mut names: Vec<&String> = single_tensors.keys().collect();
    names.sort();
    assert_eq!(weight_map.keys().collect::<Vec<_>>(), names);
    let tensor_bytes: usize = single_tensors
        .values()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    assert_eq!(index["metadata"]["total_size"], tensor_bytes as u64);
    let shards: std::collections::BTreeSet<&str> =
        weight_map.values().filter_map(|v| v.as_str()).collect();
    assert!(
        shards.len() >= 4,
        "{} shards for {tensor_bytes} bytes",
        shards.len()
    );
    for (position, shard) in shards.iter().enumerate() {
        assert_eq!(
            *shard,
            format!(
                "model-{:05}-of-{:05}.safetensors",
                position + 1,
                shards.len()
            )
        );
        let tensors = candle_core::safetensors::load(sharded.join(shard), &Device::Cpu)?;
        let bytes: usize = tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        assert!(
            bytes <= limit || tensors.len() == 1,
            "{shard}: {bytes} bytes"
        );
        for (name, tensor) in &tensors {
            assert_eq!(weight_map[name], *shard);
            assert_eq!(max_difference(tensor, &single_tensors[name]), 0.0, "{name}");
        }
    }

    // Round trip: our loader on the shards gives the unsharded export's logits exactly.
    let inputs = candle_core::safetensors::load(
        base.join("reference/base_logits.safetensors"),
        &Device::Cpu,
    )?;
    let (ids, mask) = (&inputs["input_ids"], &inputs["attention_mask"]);
    let logits = |dir: &Path| -> Result<Tensor, Box<dyn std::error::Error>> {
        let model = ModelDir::open(dir)?.load(&Device::Cpu, DType::F32, &FrozenLinearFactory)?;
        Ok(model.forward(ids, Some(mask), &Hooks::none())?)
    };
    let single_logits = logits(&single)?;
    let sharded_logits = logits(&sharded)?;
    let error = masked_max_abs(&sharded_logits, &single_logits, mask)?;
    eprintln!(
        "sharded ({} files) vs single-file merged export: max abs logit error = {error:e}",
        shards.len()
    );
    assert_eq!(error, 0.0);

    // dtype: bf16 — every tensor is the f32 merge rounded to bf16; config.json says bfloat16.
    let bf16 = project.path().join("bf16");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bf16.join("config.json"))?)?;
    assert_eq!(config["torch_dtype"], "bfloat16");
    let bf16_tensors =
        candle_core::safetensors::load(bf16.join("model.safetensors"), &Device::Cpu)?;
    assert_eq!(bf16_tensors.len(), single_tensors.len());
    for (name, tensor) in &bf16_tensors {
        assert_eq!(tensor.dtype(), DType::BF16, "{name}");
        let expected = single_tensors[name].to_dtype(DType::BF16)?;
        assert_eq!(max_difference(tensor, &expected), 0.0, "{name}");
    }
    let bf16_logits = logits(&bf16)?;
    let error = masked_max_abs(&bf16_logits, &single_logits, mask)?;
    eprintln!("bf16 merged export vs f32: max abs logit error = {error:e}");
    assert!(error < 0.25, "{error}");
    Ok(())
}

/// A trained-looking adapter for stories260k (its variables moved by seeded noise) with PEFT's
/// auxiliary modules, saved in PEFT's format into `dir`.
fn auxiliary_adapter(base: &Path, yaml: &str, dir: &Path) -> TestResult {
    use peftpipe::peft::{new_adapter, MethodContext};
    use rand::{Rng, SeedableRng};
    let value: serde_json::Value = serde_norway::from_str(yaml)?;
    let method: peftpipe::config::method::MethodConfig = serde_json::from_value(value)?;
    let model_dir = ModelDir::open(base)?;
    let adapter = new_adapter(
        &method,
        &MethodContext {
            model_config: model_dir.config_json(),
            device: &Device::Cpu,
            seed: 3,
            tokenize: None,
        },
    )?;
    let model = model_dir.load(&Device::Cpu, DType::F32, adapter.linear_factory())?;
    adapter.finish_injection(model.as_ref())?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    for (_, var) in adapter.trainable_vars() {
        let noise: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random::<f32>() * 0.4 - 0.2)
            .collect();
        let noise = Tensor::from_vec(noise, var.shape(), &Device::Cpu)?;
        var.set(&var.as_tensor().add(&noise)?)?;
    }
    adapter.save(dir, "stories260k")?;
    Ok(())
}

/// The merged export of an adapter with trainable token rows (stories260k's head is tied): the
/// merged checkpoint has the trained rows in `model.embed_tokens.weight` and no other change to
/// it, stays tied (the head follows the rows, as PEFT's tied adapter does), and gives the logits
/// of the base model with the exported adapter loaded. A trained copy of the tied embedding
/// (`modules_to_save`) unties the merged head, which keeps the base weights.
#[test]
fn merged_export_writes_trained_token_rows_and_modules_to_save() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    use peftpipe::infer::session::InferenceModel;
    use peftpipe::infer::LanguageModel;
    let base = shared.join("models/stories260k");
    let inputs = candle_core::safetensors::load(
        base.join("reference/base_logits.safetensors"),
        &Device::Cpu,
    )?;
    let ids = inputs["input_ids"].to_dtype(DType::U32)?;
    let mask = inputs["attention_mask"].to_dtype(DType::U32)?;
    let base_tensors =
        candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu)?;
    let embed = "model.embed_tokens.weight";
    // (method, the merged model stays tied, embedding rows changed: `None` = all)
    let cases: [(&str, bool, Option<Vec<usize>>); 4] = [
        (
            "lora: {r: 4, alpha: 8, target_modules: all-linear, trainable_token_indices: [2, 5]}",
            true,
            Some(vec![2, 5]),
        ),
        (
            "lora: {r: 4, alpha: 8, trainable_token_indices: {embed_tokens: [2], lm_head: [5, 9]}}",
            false,
            Some(vec![2]),
        ),
        (
            "lora: {r: 4, alpha: 8, modules_to_save: [lm_head]}",
            false,
            Some(vec![]),
        ),
        (
            "lora: {r: 4, alpha: 8, modules_to_save: [embed_tokens]}",
            false,
            None,
        ),
    ];
    for (yaml, tied_after, expected_rows) in cases {
        let project = tempfile::tempdir()?;
        let trained = project.path().join("trained");
        auxiliary_adapter(&base, yaml, &trained)?;
        let train = fake_train_artifact(project.path(), &trained, &base);
        export(project.path(), &train, config(Some("a"), Some("m")), false)?;
        let merged_dir = project.path().join("m");
        let merged_tensors =
            candle_core::safetensors::load(merged_dir.join("model.safetensors"), &Device::Cpu)?;
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(merged_dir.join("config.json"))?)?;
        assert_eq!(
            config["tie_word_embeddings"],
            serde_json::json!(tied_after),
            "{yaml}"
        );
        // (stories260k's checkpoint stores lm_head.weight beside the tied embedding.)
        let changed: Vec<usize> = {
            let a: Vec<Vec<f32>> = merged_tensors[embed].to_vec2()?;
            let b: Vec<Vec<f32>> = base_tensors[embed].to_vec2()?;
            (0..a.len()).filter(|&row| a[row] != b[row]).collect()
        };
        match expected_rows {
            Some(rows) => assert_eq!(changed, rows, "{yaml}"),
            None => {
                assert!(
                    changed.len() > 400,
                    "{yaml}: {} rows changed",
                    changed.len()
                );
                assert_eq!(
                    max_difference(&merged_tensors["lm_head.weight"], &base_tensors[embed]),
                    0.0,
                    "the untied head keeps the base weights"
                );
            }
        }
        let adapted = InferenceModel::load(
            &base,
            Some(&project.path().join("a")),
            None,
            &Device::Cpu,
            DType::F32,
        )?;
        let merged = InferenceModel::load(&merged_dir, None, None, &Device::Cpu, DType::F32)?;
        let adapted_logits = adapted.language_model().logits(&ids, &mask)?;
        let merged_logits = merged.language_model().logits(&ids, &mask)?;
        let versus_merged = masked_max_abs(&adapted_logits, &merged_logits, &mask)?;
        let moved = masked_max_abs(&adapted_logits, &inputs["logits"], &mask)?;
        eprintln!("{yaml}: adapter vs merged export {versus_merged:e}; vs base {moved:e}");
        assert!(versus_merged <= 1e-4, "{yaml}: {versus_merged}");
        assert!(moved > 1e-2, "{yaml}: the adapter is a no-op ({moved})");
    }
    Ok(())
}

/// The merged export of norms trained as modules to save (PEFT's `ModulesToSaveWrapper` around
/// an RMSNorm / a LayerNorm), through the export stage: stories260k with `modules_to_save: [norm]`
/// (PEFT's suffix match: every one of its 2·5 + 1 RMSNorms) and tiny-gpt2-random with
/// `[ln_1, ln_f]` (weight and bias). The merged checkpoint holds exactly the adapter file's trained
/// norm tensors, leaves every other norm bit-identical, and gives the adapter's logits.
#[test]
fn merged_export_writes_trained_norm_copies() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    use peftpipe::infer::session::InferenceModel;
    use peftpipe::infer::LanguageModel;
    // (base, its logits file, method, trained norm tensors in the checkpoint)
    let cases = [
        (
            "stories260k",
            "reference/base_logits.safetensors",
            "lora: {r: 4, alpha: 8, modules_to_save: [norm]}",
            11,
        ),
        (
            "tiny-gpt2-random",
            "reference_logits.safetensors",
            "lora: {r: 2, alpha: 4, modules_to_save: [ln_1, ln_f]}",
            0,
        ),
    ];
    for (model, logits_file, yaml, llama_norms) in cases {
        let base = shared.join("models").join(model);
        let project = tempfile::tempdir()?;
        let trained = project.path().join("trained");
        auxiliary_adapter(&base, yaml, &trained)?;
        let saved = candle_core::safetensors::load(
            trained.join("adapter_model.safetensors"),
            &Device::Cpu,
        )?;
        // The adapter file's norm tensors, by checkpoint name (PEFT's prefix removed).
        let norms: HashMap<String, Tensor> = saved
            .iter()
            .filter(|(name, tensor)| !name.contains(".lora_") && tensor.rank() == 1)
            .map(|(name, tensor)| {
                let name = name.trim_start_matches("base_model.model.");
                (name.to_string(), tensor.clone())
            })
            .collect();
        let train = fake_train_artifact(project.path(), &trained, &base);
        export(project.path(), &train, config(Some("a"), Some("m")), false)?;
        let merged_dir = project.path().join("m");
        let base_tensors =
            candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu)?;
        let merged_tensors =
            candle_core::safetensors::load(merged_dir.join("model.safetensors"), &Device::Cpu)?;
        // GPT-2 checkpoints may store names without `transformer.`.
        let trained_value = |name: &str| {
            norms
                .get(name)
                .or_else(|| norms.get(&format!("transformer.{name}")))
        };
        let mut written = 0;
        for (name, merged) in &merged_tensors {
            let is_norm = merged.rank() == 1 && (name.contains("norm") || name.contains("ln_"));
            if !is_norm {
                continue;
            }
            match trained_value(name) {
                Some(trained) => {
                    assert_eq!(max_difference(merged, trained), 0.0, "{yaml}: {name}");
                    assert!(
                        max_difference(merged, &base_tensors[name]) > 0.0,
                        "{yaml}: {name} kept the base values"
                    );
                    written += 1;
                }
                None => assert_eq!(
                    max_difference(merged, &base_tensors[name]),
                    0.0,
                    "{yaml}: the untrained {name} changed"
                ),
            }
        }
        assert_eq!(
            written,
            norms.len(),
            "{yaml}: every trained norm tensor is written"
        );
        if llama_norms > 0 {
            assert_eq!(written, llama_norms, "{yaml}");
        } else {
            // ln_1 of each of the two blocks and ln_f, weight and bias.
            assert_eq!(written, 2 * 3, "{yaml}");
        }
        let inputs = candle_core::safetensors::load(base.join(logits_file), &Device::Cpu)?;
        let ids = inputs["input_ids"].to_dtype(DType::U32)?;
        let mask = inputs["attention_mask"].to_dtype(DType::U32)?;
        let adapted = InferenceModel::load(
            &base,
            Some(&project.path().join("a")),
            None,
            &Device::Cpu,
            DType::F32,
        )?;
        let merged = InferenceModel::load(&merged_dir, None, None, &Device::Cpu, DType::F32)?;
        let adapted_logits = adapted.language_model().logits(&ids, &mask)?;
        let merged_logits = merged.language_model().logits(&ids, &mask)?;
        let versus_merged = masked_max_abs(&adapted_logits, &merged_logits, &mask)?;
        let moved = masked_max_abs(&adapted_logits, &inputs["logits"], &mask)?;
        eprintln!("{model} {yaml}: adapter vs merged export {versus_merged:e}; vs base {moved:e}");
        assert!(versus_merged <= 1e-4, "{yaml}: {versus_merged}");
        assert!(moved > 1e-3, "{yaml}: the adapter is a no-op ({moved})");
    }
    Ok(())
}

/// GPT-2 (tied head, embedding `transformer.wte`, Conv1D linears): `trainable_token_indices` in
/// PEFT's mapping form names `wte`; the merged checkpoint changes exactly those rows of
/// `wte.weight`, stays tied, and gives the adapter's logits.
#[test]
fn merged_gpt2_export_writes_trained_token_rows() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    use peftpipe::infer::session::InferenceModel;
    use peftpipe::infer::LanguageModel;
    let base = shared.join("models/tiny-gpt2-random");
    let project = tempfile::tempdir()?;
    let trained = project.path().join("trained");
    auxiliary_adapter(
        &base,
        "lora: {r: 2, alpha: 4, trainable_token_indices: {wte: [2, 5]}}",
        &trained,
    )?;
    let saved =
        candle_core::safetensors::load(trained.join("adapter_model.safetensors"), &Device::Cpu)?;
    assert_eq!(
        saved["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"].dims(),
        [2, 64]
    );
    let train = fake_train_artifact(project.path(), &trained, &base);
    export(project.path(), &train, config(Some("a"), Some("m")), false)?;
    let merged_dir = project.path().join("m");
    let base_tensors =
        candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu)?;
    let merged_tensors =
        candle_core::safetensors::load(merged_dir.join("model.safetensors"), &Device::Cpu)?;
    let name = base_tensors
        .keys()
        .find(|name| name.ends_with("wte.weight"))
        .expect("a wte weight")
        .clone();
    let a: Vec<Vec<f32>> = merged_tensors[&name].to_vec2()?;
    let b: Vec<Vec<f32>> = base_tensors[&name].to_vec2()?;
    let changed: Vec<usize> = (0..a.len()).filter(|&row| a[row] != b[row]).collect();
    assert_eq!(changed, [2, 5]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged_dir.join("config.json"))?)?;
    assert_eq!(config["tie_word_embeddings"], serde_json::json!(true));
    let inputs =
        candle_core::safetensors::load(base.join("reference_logits.safetensors"), &Device::Cpu)?;
    let ids = inputs["input_ids"].to_dtype(DType::U32)?;
    let mask = inputs["attention_mask"].to_dtype(DType::U32)?;
    let adapted = InferenceModel::load(
        &base,
        Some(&project.path().join("a")),
        None,
        &Device::Cpu,
        DType::F32,
    )?;
    let merged = InferenceModel::load(&merged_dir, None, None, &Device::Cpu, DType::F32)?;
    let adapted_logits = adapted.language_model().logits(&ids, &mask)?;
    let merged_logits = merged.language_model().logits(&ids, &mask)?;
    let error = masked_max_abs(&adapted_logits, &merged_logits, &mask)?;
    let moved = masked_max_abs(&adapted_logits, &inputs["logits"], &mask)?;
    eprintln!("gpt2 trainable tokens: adapter vs merged export {error:e}; vs base {moved:e}");
    assert!(error <= 1e-4, "{error}");
    assert!(moved > 1e-3, "the adapter is a no-op ({moved})");
    Ok(())
}

/// Train-free stand-in for a trained adapter: LoRA r2 with trainable token rows 5 and 9 over the
/// model in `base`, every variable moved by 0.25, exported `merged` into `project`; the merged
/// tensors.
fn merge_trained_token_rows(
    base: &Path,
    project: &Path,
) -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    let model_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json"))?)?;
    let adapter = support::methods::new_method(
        "lora: {r: 2, alpha: 4, trainable_token_indices: [5, 9]}",
        &model_json,
        &Device::Cpu,
        3,
    );
    let model = ModelDir::open(base)?.load(&Device::Cpu, DType::F32, adapter.linear_factory())?;
    adapter.finish_injection(model.as_ref())?;
    for (_, var) in adapter.trainable_vars() {
        var.set(&(var.as_tensor() + 0.25)?)?;
    }
    let source = project.join("saved");
    adapter.save(&source, &base.display().to_string())?;
    let train = fake_train_artifact(project, &source, base);
    export(project, &train, config(None, Some("merged")), false)?;
    Ok(candle_core::safetensors::load(
        project.join("merged/model.safetensors"),
        &Device::Cpu,
    )?)
}

/// A tied checkpoint that also stores its embedding as `lm_head.weight` (stories260k): the merged
/// export of trainable token rows (the tied head follows them) writes the same patched matrix
/// under both names. The stored copy was left at the base values, and transformers 5, which
/// unties a stored copy that differs from the embedding, then computed with the base head
/// (3.5 logits off; found by tests/peft_python.rs).
#[test]
fn merged_tied_checkpoint_keeps_its_stored_head_copy_equal_to_the_patched_embedding() -> TestResult
{
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let base = shared.join("models/stories260k");
    let project = tempfile::tempdir()?;
    let merged = merge_trained_token_rows(&base, project.path())?;
    let embedding = &merged["model.embed_tokens.weight"];
    let original = candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu)?;
    assert!(
        max_difference(embedding, &original["model.embed_tokens.weight"]) > 0.1,
        "the embedding rows were patched"
    );
    assert_eq!(
        max_difference(&merged["lm_head.weight"], embedding),
        0.0,
        "the stored head copy equals the patched embedding"
    );
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        project.path().join("merged/config.json"),
    )?)?;
    assert_eq!(config["tie_word_embeddings"], true);
    Ok(())
}

/// A Llama config.json without `tie_word_embeddings` is untied (transformers' LlamaConfig default,
/// and the loader's): a merge of patched embedding rows leaves the separate head as stored.
/// The merge used to take the missing key as tied and copy the patched rows into the head, so
/// the merged model differed from the adapted one (probe 59).
#[test]
fn an_untied_llama_without_the_tie_key_keeps_its_head_through_a_merge() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let project = tempfile::tempdir()?;
    let base = project.path().join("untied");
    std::fs::create_dir_all(&base)?;
    let stories = shared.join("models/stories260k");
    for entry in std::fs::read_dir(&stories)? {
        let entry = entry?;
        if entry.path().is_file() {
            std::fs::copy(entry.path(), base.join(entry.file_name()))?;
        }
    }
    // A head of its own (1.5 × the embedding), and no tie key.
    let mut tensors =
        candle_core::safetensors::load(stories.join("model.safetensors"), &Device::Cpu)?;
    let head = (&tensors["model.embed_tokens.weight"] * 1.5)?;
    tensors.insert("lm_head.weight".to_string(), head.clone());
    candle_core::safetensors::save(&tensors, base.join("model.safetensors"))?;
    let mut model_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json"))?)?;
    model_json
        .as_object_mut()
        .ok_or("config.json is an object")?
        .remove("tie_word_embeddings");
    std::fs::write(base.join("config.json"), model_json.to_string())?;
    let merged = merge_trained_token_rows(&base, project.path())?;
    assert!(
        max_difference(
            &merged["model.embed_tokens.weight"],
            &tensors["model.embed_tokens.weight"]
        ) > 0.1,
        "the embedding rows were patched"
    );
    assert_eq!(
        max_difference(&merged["lm_head.weight"], &head),
        0.0,
        "the separate head is as stored"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The merged model re-quantized in bitsandbytes' saved 4-bit format (`quantize:`)
// ---------------------------------------------------------------------------------------------

/// One stored tensor as raw bytes: (dtype, shape, bytes, file name).
type RawTensor = (safetensors::Dtype, Vec<usize>, Vec<u8>, String);

/// Every tensor of a model folder's weight files (one file or shards), as stored.
fn raw_tensors(dir: &Path) -> Result<BTreeMap<String, RawTensor>, Box<dyn std::error::Error>> {
    let mut tensors = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let file = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !file.ends_with(".safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let parsed = safetensors::SafeTensors::deserialize(&bytes)?;
        for (name, view) in parsed.tensors() {
            let previous = tensors.insert(
                name.clone(),
                (
                    view.dtype(),
                    view.shape().to_vec(),
                    view.data().to_vec(),
                    file.clone(),
                ),
            );
            assert!(previous.is_none(), "`{name}` stored twice");
        }
    }
    Ok(tensors)
}

/// A re-quantized export case: the train artifact (a LoRA over the 16-bit base, or the same
/// adapter recorded as a QLoRA run over the 4-bit base) and the export settings.
struct RequantCase {
    name: &'static str,
    /// Its folder under `PEFTPIPE_KEEP_EXPORT` (tests/python/check_bnb_export.py reads them).
    slug: &'static str,
    /// `quantization` of base_model.json (a QLoRA run), if any.
    qlora_base: Option<serde_json::Value>,
    quantize: FourBitSettings,
    max_shard_size: Option<&'static str>,
    dtype: Option<ExportDtype>,
}

fn requant_cases() -> Vec<RequantCase> {
    vec![
        RequantCase {
            name: "lora, quantize: {}",
            slug: "lora-nf4",
            qlora_base: None,
            quantize: FourBitSettings::default(),
            max_shard_size: None,
            dtype: None,
        },
        RequantCase {
            name: "qlora, fp4 blocks of 128 without double quant, bf16, sharded",
            slug: "qlora-fp4",
            qlora_base: Some(serde_json::json!({
                "quant_type": "nf4", "double_quant": true, "block_size": 64, "compute_dtype": null
            })),
            quantize: FourBitSettings {
                quant_type: QuantTypeChoice::Fp4,
                double_quant: false,
                block_size: 128,
                compute_dtype: Some(ComputeDtypeChoice::F16),
            },
            max_shard_size: Some("64KiB"),
            dtype: Some(ExportDtype::Bf16),
        },
    ]
}

/// A case's plain merged export and its re-quantized export, side by side in one project.
struct RequantExports {
    _project: tempfile::TempDir,
    plain: PathBuf,
    four_bit: PathBuf,
}

/// Export `case` twice: the plain merged model and the re-quantized one. None without
/// PEFTPIPE_SHARED.
fn requant_exports(
    case: &RequantCase,
) -> Result<Option<RequantExports>, Box<dyn std::error::Error>> {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(None);
    };
    let base = shared.join("models/stories260k");
    let project = tempfile::tempdir()?;
    let train = fake_train_artifact(project.path(), &base.join("reference/peft_lora"), &base);
    if let Some(quantization) = &case.qlora_base {
        let record = serde_json::json!({
            "model": base.display().to_string(),
            "path": base.display().to_string(),
            "quantization": quantization,
            "dtype": "f32",
        });
        std::fs::write(train.join("base_model.json"), record.to_string())?;
    }
    let plain = merged_config(None, Some("out/plain"), case.max_shard_size, case.dtype);
    export(project.path(), &train, plain.clone(), false)?;
    let quantized = ExportConfig {
        merged: Some("out/4bit".into()),
        quantize: Some(case.quantize.clone()),
        ..plain
    };
    export(project.path(), &train, quantized, false)?;
    if let Some(keep) = std::env::var_os("PEFTPIPE_KEEP_EXPORT") {
        // For tests/python/check_bnb_export.py: keep both folders.
        for kind in ["plain", "4bit"] {
            peftpipe::stages::export::publish_folder(
                &project.path().join("out").join(kind),
                &PathBuf::from(&keep)
                    .join("requant")
                    .join(case.slug)
                    .join(kind),
                "export",
            )?;
        }
    }
    Ok(Some(RequantExports {
        plain: project.path().join("out/plain"),
        four_bit: project.path().join("out/4bit"),
        _project: project,
    }))
}

/// Round trip: the 4-bit folder loads with peftpipe's reader of bitsandbytes checkpoints, and
/// each stored weight (packed codes, absmax, nested state, dtype, shape) is the CPU quantizer
/// applied to the weight the plain merged export writes, byte for byte; dequantized, equal to
/// the quantizer's dequantization bit for bit; config.json carries transformers'
/// `quantization_config`; the model gives exactly the logits of the plain merged export
/// quantized while loading.
#[test]
fn requantized_export_is_the_cpu_quantizer_on_the_merged_weights_byte_for_byte() -> TestResult {
    for case in requant_cases() {
        let Some(RequantExports {
            _project,
            plain,
            four_bit,
        }) = requant_exports(&case)?
        else {
            return Ok(());
        };
        let name = case.name;
        let config = quant_config(&case.quantize);
        let dir = ModelDir::open(&four_bit)?;
        let stored = dir
            .stored_quantization()
            .ok_or(format!("{name}: no quantization_config"))?;
        assert_eq!(
            (stored.quant_type, stored.double_quant),
            (config.quant_type, config.double_quant),
            "{name}"
        );
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(four_bit.join("config.json"))?)?;
        let torch = |dtype: Option<ExportDtype>| dtype.map_or("float32", ExportDtype::torch_name);
        let compute = case
            .quantize
            .compute_dtype
            .map_or(torch(case.dtype), |dtype| match dtype {
                ComputeDtypeChoice::Bf16 => "bfloat16",
                ComputeDtypeChoice::F16 => "float16",
                ComputeDtypeChoice::F32 => "float32",
            });
        assert_eq!(
            written["quantization_config"],
            serde_json::json!({
                "_load_in_4bit": true,
                "_load_in_8bit": false,
                "bnb_4bit_compute_dtype": compute,
                "bnb_4bit_quant_storage": "uint8",
                "bnb_4bit_quant_type": config.quant_type.name(),
                "bnb_4bit_use_double_quant": config.double_quant,
                "llm_int8_enable_fp32_cpu_offload": false,
                "llm_int8_has_fp16_weight": false,
                "llm_int8_skip_modules": null,
                "llm_int8_threshold": 6.0,
                "load_in_4bit": true,
                "load_in_8bit": false,
                "quant_method": "bitsandbytes"
            }),
            "{name}"
        );
        assert_eq!(written["torch_dtype"], torch(case.dtype), "{name}");

        let merged = raw_tensors(&plain)?;
        let loaded = read_bnb_weights(dir.weight_files(), &Device::Cpu)?;
        let linears: Vec<&String> = merged
            .iter()
            .filter(|(tensor, (_, shape, _, _))| is_quantized_linear(tensor, shape))
            .map(|(tensor, _)| tensor)
            .collect();
        assert_eq!(
            loaded.weights.keys().collect::<Vec<_>>(),
            linears,
            "{name}: the 4-bit weights are the decoder linears"
        );
        assert_eq!(linears.len(), 35, "{name}");
        // The weights the plain merged export wrote (one file or shards), as tensors.
        let mut plain_tensors = HashMap::new();
        for file in ModelDir::open(&plain)?.weight_files() {
            plain_tensors.extend(candle_core::safetensors::load(file, &Device::Cpu)?);
        }
        let raw = raw_tensors(&four_bit)?;
        for tensor in linears {
            let weight = &plain_tensors[tensor];
            let expected = QuantizedTensor::from_tensor(weight, &config)?;
            let ours = loaded.weights[tensor].weight.to_host()?;
            assert_eq!(ours, expected, "{name}: `{tensor}`");
            // Stored as bitsandbytes stores it: packed bytes [(n + 1) / 2, 1] as uint8.
            let (dtype, shape, bytes, file) = &raw[tensor];
            assert_eq!(*dtype, safetensors::Dtype::U8, "{name}: `{tensor}`");
            assert_eq!(shape, &[weight.elem_count().div_ceil(2), 1], "{tensor}");
            assert_eq!(bytes, &expected.packed, "{name}: `{tensor}`");
            // Every part of its state sits in the weight's own file (transformers reads a
            // weight's state from the shard that holds it).
            for (part, (_, _, _, part_file)) in raw.range(format!("{tensor}.")..) {
                if !part.starts_with(&format!("{tensor}.")) {
                    break;
                }
                assert_eq!(part_file, file, "{name}: `{part}`");
            }
            let dequantized = loaded.weights[tensor]
                .weight
                .dequantize(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let reference = expected.dequantize_f32();
            assert!(
                dequantized
                    .iter()
                    .zip(&reference)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: `{tensor}` dequantizes differently"
            );
        }

        // The model: exactly the plain merged export quantized while it loads.
        let ids = Tensor::new(&[[1u32, 403, 76, 300, 12, 99, 250, 7]], &Device::Cpu)?;
        let logits = |dir: &Path,
                      factory: &dyn LinearFactory|
         -> Result<Vec<f32>, Box<dyn std::error::Error>> {
            let model = ModelDir::open(dir)?.load(&Device::Cpu, DType::F32, factory)?;
            Ok(model
                .forward(&ids, None, &Hooks::none())?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let reference = QuantizingFactory::new(
            FrozenLinearFactory,
            BaseQuantization {
                config,
                compute_dtype: Some(DType::F32),
                prequantized: false,
            },
        );
        assert_eq!(
            logits(&four_bit, &FrozenLinearFactory)?,
            logits(&plain, &reference)?,
            "{name}"
        );
        eprintln!(
            "{name}: {} weights re-quantized, {} files",
            loaded.weights.len(),
            ModelDir::open(&four_bit)?.weight_files().len()
        );
    }
    Ok(())
}

/// Norms, embeddings and `lm_head` (and every other tensor that is not a decoder linear weight
/// or its 4-bit state) stay 16-bit, byte for byte what the plain merged export writes.
#[test]
fn requantized_export_keeps_norms_embeddings_and_head_as_the_merged_export_writes_them(
) -> TestResult {
    for case in requant_cases() {
        let Some(RequantExports {
            _project,
            plain,
            four_bit,
        }) = requant_exports(&case)?
        else {
            return Ok(());
        };
        let name = case.name;
        let merged = raw_tensors(&plain)?;
        let written = raw_tensors(&four_bit)?;
        let state = read_bnb_weights(ModelDir::open(&four_bit)?.weight_files(), &Device::Cpu)?
            .state_tensors;
        let dense: Vec<&String> = written
            .keys()
            .filter(|tensor| !state.contains(*tensor))
            .collect();
        let expected: Vec<&String> = merged
            .iter()
            .filter(|(tensor, (_, shape, _, _))| !is_quantized_linear(tensor, shape))
            .map(|(tensor, _)| tensor)
            .collect();
        assert_eq!(dense, expected, "{name}");
        for needed in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.4.post_attention_layernorm.weight",
        ] {
            assert!(dense.contains(&&needed.to_string()), "{name}: {needed}");
        }
        for tensor in dense {
            let (dtype, shape, bytes, _) = &written[tensor];
            let (merged_dtype, merged_shape, merged_bytes, _) = &merged[tensor];
            assert_eq!(
                (dtype, shape),
                (merged_dtype, merged_shape),
                "{name}: `{tensor}`"
            );
            assert!(bytes == merged_bytes, "{name}: `{tensor}` differs");
        }
        // The tokenizer and generation files come along.
        for file in ["tokenizer.json", "generation_config.json", EXPORT_MARKER] {
            assert!(four_bit.join(file).is_file(), "{name}: no {file}");
        }
    }
    Ok(())
}

/// `quantize:` settings are checked by `validate`, each error naming the pipeline file and key.
#[test]
fn quantize_settings_are_validated_naming_the_file_and_key() {
    for (export, expected) in [
        (
            "{ from: tune, merged: out/m, quantize: { block_size: 100 } }",
            "pipeline.yaml:5:71: stages.out.export.quantize.block_size: must be a power of two from 64 to 4096 (bitsandbytes' 4-bit block sizes), got 100",
        ),
        (
            "{ from: tune, merged: out/m, quantize: { quant_type: int4 } }",
            "stages.out.export.quantize.quant_type: unknown value `int4`",
        ),
        (
            "{ from: tune, merged: out/m, quantize: { bnb_4bit_quant_type: nf4 } }",
            "stages.out.export.quantize.bnb_4bit_quant_type: unknown key `bnb_4bit_quant_type`",
        ),
        (
            "{ from: tune, merged: out/m, quantize: { compute_dtype: f64 } }",
            "stages.out.export.quantize.compute_dtype: unknown value `f64`",
        ),
        (
            "{ from: tune, adapter: out/a, quantize: {} }",
            "stages.out.export: `quantize` applies to the merged model, but there is no `merged` destination",
        ),
    ] {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::write(dir.path().join("rows.csv"), "text,label\na,b\n").expect("a data file");
        // The quickstart's tiny Llama: the only problem is the one under test.
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/quickstart/model");
        let pipeline = format!(
            "stages:\n  data: {{ ingest: {{ path: rows.csv }} }}\n  prompts: {{ template: {{ input: \
             data, prompt: '{{{{ text }}}}', completion: '{{{{ label }}}}' }} }}\n  tune: {{ train: \
             {{ data: prompts, model: '{}', method: {{ lora: {{ r: 2 }} }} }} }}\n  \
             out: {{ export: {export} }}\n",
            model.display()
        );
        std::fs::write(dir.path().join("pipeline.yaml"), pipeline).expect("a pipeline");
        let output = support::peftpipe()
            .args(["validate", "pipeline.yaml"])
            .current_dir(dir.path())
            .env("NO_COLOR", "1")
            .output()
            .expect("peftpipe runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{export}: {stderr}");
        assert!(stderr.contains(expected), "{export}: {stderr}");
        assert!(stderr.contains("error: 1 problem in"), "{export}: {stderr}");
    }
}

/// peftpipe reads no GPT-2 checkpoint in 4 bits, so it writes none: refused naming the base's
/// config.json, before anything is written.
#[test]
fn a_gpt2_merged_model_is_not_written_in_4_bits() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let project = tempfile::tempdir()?;
    let out = project.path().join("4bit");
    let options = QuantizedMergedOptions {
        merged: MergedOptions {
            max_shard_size: 5_000_000_000,
            dtype: None,
        },
        quant: QuantConfig::default(),
        compute_dtype: None,
    };
    let error = write_quantized_merged_folder(
        &[],
        &shared.join("models/tiny-gpt2-random"),
        &out,
        options,
        &|| false,
    )
    .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("config.json"), "{message}");
    assert!(message.contains("not gpt2"), "{message}");
    assert!(!out.exists());
    Ok(())
}

/// Give every bias `keep` accepts non-zero values (random init leaves them zero, which no
/// scaling changes); returns their names.
fn with_nonzero_biases(
    weights: &mut HashMap<String, Tensor>,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let names: Vec<String> = weights
        .keys()
        .filter(|name| name.ends_with(".bias") && keep(name))
        .cloned()
        .collect();
    for (index, name) in names.iter().enumerate() {
        let length = weights[name].dim(0)?;
        let values: Vec<f32> = (0..length)
            .map(|i| ((i * 7 + index * 3) % 11) as f32 * 0.1 - 0.5)
            .collect();
        weights.insert(
            name.clone(),
            Tensor::from_vec(values, length, &Device::Cpu)?,
        );
    }
    Ok(names)
}

/// An IA3 folder as PEFT saves it (`fields` added to the config): a vector of each shape
/// (`[out, 1]`, or `[1, in]` feed-forward) for each module of layers 0 and 1 under `layers`.
/// Returns the vectors by their saved names.
fn write_ia3_folder(
    dir: &Path,
    fields: serde_json::Value,
    layers: &str,
    modules: &[(&str, (usize, usize))],
) -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let mut config = serde_json::json!({
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "inference_mode": true,
    });
    for (key, value) in fields.as_object().ok_or("fields are an object")? {
        config[key] = value.clone();
    }
    std::fs::write(dir.join("adapter_config.json"), config.to_string())?;
    let mut vectors = HashMap::new();
    for layer in 0..2 {
        for (module, shape) in modules {
            let values: Vec<f32> = (0..shape.0 * shape.1)
                .map(|i| 0.5 + ((i * 3 + layer) % 7) as f32 * 0.2)
                .collect();
            vectors.insert(
                format!("base_model.model.{layers}.{layer}.{module}.ia3_l"),
                Tensor::from_vec(values, *shape, &Device::Cpu)?,
            );
        }
    }
    candle_core::safetensors::save(&vectors, dir.join("adapter_model.safetensors"))?;
    Ok(vectors)
}

/// `patches` merged into `base`, written to `out` in one shard, dtype kept.
fn write_merged(
    patches: &[peftpipe::models::checkpoint::WeightPatch],
    base: &Path,
    out: &Path,
) -> Result<(), peftpipe::models::checkpoint::CheckpointError> {
    peftpipe::models::checkpoint::write_merged_folder(
        patches,
        base,
        out,
        MergedOptions {
            max_shard_size: u64::MAX,
            dtype: None,
        },
        &|| false,
    )
    .map(|_| ())
}

/// IA3 on an output-side layer scales the layer's output, bias included (PEFT's `IA3Layer.merge`
/// multiplies the bias by the vector too): merging an adapter read from its folder into a Llama
/// with `attention_bias` (Qwen2 has q/k/v biases) gives `W' = diag(l)·W` and `b' = l ⊙ b` on
/// k_proj/v_proj, and a feed-forward down_proj only its input columns scaled, its bias kept.
#[test]
fn merged_ia3_scales_the_bias_of_an_output_side_layer() -> TestResult {
    let root = tempfile::tempdir()?;
    let base = root.path().join("base");
    std::fs::create_dir_all(&base)?;
    let config_json = serde_json::json!({
        "model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 40, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "attention_bias": true, "mlp_bias": true, "tie_word_embeddings": false,
    });
    std::fs::write(base.join("config.json"), config_json.to_string())?;
    let config = peftpipe::models::ModelConfig::from_json(&config_json)
        .map_err(|error| format!("{error:?}"))?;
    let mut weights =
        peftpipe::models::random::random_weights(&config, 3, 0.2, DType::F32, &Device::Cpu)?;
    // Random biases (random init leaves them zero, which no scaling changes).
    let names = with_nonzero_biases(&mut weights, |_| true)?;
    assert!(
        names.iter().any(|n| n.ends_with("k_proj.bias")),
        "{names:?}"
    );
    candle_core::safetensors::save(&weights, base.join("model.safetensors"))?;

    // An IA3 folder as PEFT saves it: [out, 1] for k/v, [1, in] for the feed-forward down_proj.
    let adapter = root.path().join("adapter");
    let vectors = write_ia3_folder(
        &adapter,
        serde_json::json!({
            "fan_in_fan_out": false,
            "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"],
        }),
        "model.layers",
        &[
            ("self_attn.k_proj", (8, 1)),
            ("self_attn.v_proj", (8, 1)),
            ("mlp.down_proj", (1, 24)),
        ],
    )?;

    let loaded = peftpipe::peft::load_adapter(&adapter, &Device::Cpu)?;
    let patches = loaded.merge_patches()?.ok_or("IA3 is mergeable")?;
    let out = root.path().join("merged");
    write_merged(&patches, &base, &out)?;
    let merged = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)?;
    for layer in 0..2 {
        for module in ["self_attn.k_proj", "self_attn.v_proj"] {
            let path = format!("model.layers.{layer}.{module}");
            let l = &vectors[&format!("base_model.model.{path}.ia3_l")];
            let weight = weights[&format!("{path}.weight")].broadcast_mul(l)?;
            let bias = weights[&format!("{path}.bias")].mul(&l.flatten_all()?)?;
            let merged_weight = &merged[&format!("{path}.weight")];
            let merged_bias = &merged[&format!("{path}.bias")];
            assert!(
                max_difference(merged_weight, &weight) < 1e-6,
                "{path}.weight"
            );
            assert!(max_difference(merged_bias, &bias) < 1e-6, "{path}.bias");
        }
        let path = format!("model.layers.{layer}.mlp.down_proj");
        let l = &vectors[&format!("base_model.model.{path}.ia3_l")];
        let weight = weights[&format!("{path}.weight")].broadcast_mul(l)?;
        assert!(max_difference(&merged[&format!("{path}.weight")], &weight) < 1e-6);
        let bias = &weights[&format!("{path}.bias")];
        assert_eq!(max_difference(&merged[&format!("{path}.bias")], bias), 0.0);
    }
    Ok(())
}

/// IA3 on GPT-2 (`fan_in_fan_out`, Conv1D weights stored `[in, out]`, every linear biased): the
/// output-side c_attn and attn.c_proj scale their output, bias included, the feed-forward
/// mlp.c_proj its input. Merged into the base, the model gives the adapted logits.
#[test]
fn merged_gpt2_ia3_gives_the_adapted_logits() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let source = shared.join("models/tiny-gpt2-random");
    let root = tempfile::tempdir()?;
    // The base with non-zero biases (a scaled zero bias would prove nothing).
    let base = root.path().join("base");
    std::fs::create_dir_all(&base)?;
    std::fs::copy(source.join("config.json"), base.join("config.json"))?;
    let mut weights =
        candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu)?;
    with_nonzero_biases(&mut weights, |name| !name.contains(".ln_"))?;
    candle_core::safetensors::save(&weights, base.join("model.safetensors"))?;

    let adapter = root.path().join("adapter");
    write_ia3_folder(
        &adapter,
        serde_json::json!({
            "fan_in_fan_out": true,
            "target_modules": ["c_attn", "c_proj"],
            "feedforward_modules": ["mlp.c_proj"],
        }),
        "transformer.h",
        &[
            ("attn.c_attn", (192, 1)),
            ("attn.c_proj", (64, 1)),
            ("mlp.c_proj", (1, 256)),
        ],
    )?;

    let inputs =
        candle_core::safetensors::load(source.join("reference_logits.safetensors"), &Device::Cpu)?;
    let (ids, mask) = (&inputs["input_ids"], &inputs["attention_mask"]);
    let loaded = peftpipe::peft::load_adapter(&adapter, &Device::Cpu)?;
    let patches = loaded.merge_patches()?.ok_or("IA3 is mergeable")?;
    let adapted = ModelDir::open(&base)?.load(&Device::Cpu, DType::F32, loaded.linear_factory())?;
    loaded.finish_injection(adapted.as_ref())?;
    let adapted_logits = adapted.forward(ids, Some(mask), &loaded.hooks()?)?;
    let out = root.path().join("merged");
    write_merged(&patches, &base, &out)?;
    let merged = ModelDir::open(&out)?.load(&Device::Cpu, DType::F32, &FrozenLinearFactory)?;
    let merged_logits = merged.forward(ids, Some(mask), &Hooks::none())?;
    let error = masked_max_abs(&merged_logits, &adapted_logits, mask)?;
    eprintln!("merged tiny-gpt2 IA3 vs unmerged: max abs logit error = {error:e}");
    assert!(error <= 1e-4, "max abs error {error}");
    let plain = ModelDir::open(&base)?.load(&Device::Cpu, DType::F32, &FrozenLinearFactory)?;
    let moved = masked_max_abs(
        &merged_logits,
        &plain.forward(ids, Some(mask), &Hooks::none())?,
        mask,
    )?;
    assert!(moved > 1e-3, "the merge did not change the model ({moved})");
    Ok(())
}

/// An adapter whose matrices do not fit the base model's weights is refused naming the base
/// checkpoint file as well as the module.
#[test]
fn a_merge_over_another_models_weights_names_the_checkpoint_file() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let base = shared.join("models/stories260k");
    let root = tempfile::tempdir()?;
    let adapter = root.path().join("adapter");
    std::fs::create_dir_all(&adapter)?;
    std::fs::write(
        adapter.join("adapter_config.json"),
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
            "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"})
        .to_string(),
    )?;
    // q_proj of a model 32 wide; stories260k's is [64, 64].
    let prefix = "base_model.model.model.layers.0.self_attn.q_proj";
    let tensors = HashMap::from([
        (
            format!("{prefix}.lora_A.weight"),
            Tensor::ones((2, 32), DType::F32, &Device::Cpu)?,
        ),
        (
            format!("{prefix}.lora_B.weight"),
            Tensor::ones((64, 2), DType::F32, &Device::Cpu)?,
        ),
    ]);
    candle_core::safetensors::save(&tensors, adapter.join("adapter_model.safetensors"))?;
    let loaded = peftpipe::peft::load_adapter(&adapter, &Device::Cpu)?;
    let patches = loaded.merge_patches()?.ok_or("LoRA is mergeable")?;
    let error = write_merged(&patches, &base, &root.path().join("merged"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("q_proj"), "{error}");
    assert!(
        error.contains(&base.join("model.safetensors").display().to_string()),
        "{error}"
    );
    Ok(())
}
