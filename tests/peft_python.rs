//! Hugging Face PEFT loads what peftpipe exports, for every method with a PEFT format: each method
//! of [`cases`] is made from its YAML through the registry on stories260k, trained a few AdamW
//! steps (so no factor is still at its zero init), exported by the export stage (`adapter:`, and
//! `merged:` for a mergeable method), and tests/python/check_peft_export.py then loads the adapter
//! with `PeftModel.from_pretrained` on the base (failing on missing/unexpected keys and on any
//! tensor PEFT holds with other values than the file's) and compares its logits with peftpipe's
//! for the same inputs (../shared's reference prompts); a merged export is loaded with
//! transformers' `AutoModelForCausalLM` and compared the same way. Tolerance: 1e-4 absolute on
//! the logits of the attended positions (both sides f32; stories260k's logits are O(10)).
//!
//! QLoRA: its adapter is a plain PEFT LoRA folder over the 4-bit base. PEFT loads it here onto
//! that base's dequantized weights (every quantized linear layer `dequant(quant(W))`, written as
//! a 16-bit checkpoint by the test): bitsandbytes' 4-bit layers would compute the same values
//! (peftpipe's NF4 is bit-exact with bitsandbytes, tests/quant.rs), but bitsandbytes is not part
//! of this check's Python setup. LLaMA-Adapter's `per_head_gate` has no PEFT format (PEFT's gate
//! is one scalar per layer) and is not here.
//!
//! Runs when `PEFTPIPE_PEFT_PYTHON` (default `python3`) can `import peft, torch, transformers`
//! and `PEFTPIPE_SHARED` is set; otherwise it prints why it skips. Not in CI (no torch there).
//! Setup: see tests/python/check_peft_export.py.
#![expect(
    clippy::print_stderr,
    reason = "the test prints why it skips and the differences it measured"
)]

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use peftpipe::config::ExportConfig;
use peftpipe::data::batch::{collate, Sequence};
use peftpipe::models::quantized::is_quantized_linear;
use peftpipe::models::{CausalLm, ModelDir};
use peftpipe::peft::{Adapter, AdapterMode};
use peftpipe::train::optimizer::{AdamW, AdamWSettings};
use peftpipe::train::{CausalLmLoss, LossModel};
use support::export::export;
use support::methods::new_method;
use support::shared_dir;

/// The tolerance on max |Δlogit| between peftpipe and PEFT / transformers.
const TOLERANCE: f64 = 1e-4;

/// One method with a PEFT format.
struct Case {
    /// The method as a pipeline writes it under `method:`.
    yaml: &'static str,
    /// AdamW's learning rate for the few training steps.
    learning_rate: f64,
    /// The export stage also writes a merged model.
    mergeable: bool,
}

fn cases() -> Vec<Case> {
    let case = |yaml, learning_rate, mergeable| Case {
        yaml,
        learning_rate,
        mergeable,
    };
    vec![
        case("lora: {r: 4, alpha: 8, target_modules: all-linear}", 1e-2, true),
        case(
            "lora: {r: 4, alpha: 8, use_dora: true, target_modules: all-linear}",
            1e-2,
            true,
        ),
        case("lora: {r: 4, alpha: 8, use_rslora: true}", 1e-2, true),
        case("ia3: {}", 3e-2, true),
        case(
            "ia3: {target_modules: [q_proj, up_proj, down_proj, o_proj], feedforward_modules: [down_proj, o_proj]}",
            3e-2,
            true,
        ),
        case("prompt_tuning: {num_virtual_tokens: 4}", 3e-2, false),
        case(
            "prompt_tuning: {num_virtual_tokens: 5, init: text, init_text: 'Once upon a time'}",
            3e-2,
            false,
        ),
        case("prefix_tuning: {num_virtual_tokens: 4}", 3e-2, false),
        case(
            "prefix_tuning: {num_virtual_tokens: 3, prefix_projection: true, encoder_hidden_size: 16}",
            1e-2,
            false,
        ),
        case("llama_adapter: {adapter_len: 4, adapter_layers: 2}", 3e-2, false),
        case("qlora: {r: 4, alpha: 8, target_modules: all-linear}", 1e-2, true),
        case(
            "lora: {r: 2, alpha: 4, trainable_token_indices: [2, 7]}",
            1e-2,
            true,
        ),
        // PEFT's ModulesToSaveWrapper around every RMSNorm (`norm` ends each one's name).
        case("lora: {r: 2, alpha: 4, modules_to_save: [norm]}", 1e-2, true),
    ]
}

/// The Python interpreter to use, or why the check cannot run.
fn python() -> Result<String, String> {
    let python = std::env::var("PEFTPIPE_PEFT_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .args(["-c", "import peft, torch, transformers"])
        .output()
        .map_err(|error| format!("`{python}` does not run: {error}"))?;
    if output.status.success() {
        Ok(python)
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "`{python} -c 'import peft, torch, transformers'` failed: {}",
            stderr.lines().last().unwrap_or("no output")
        ))
    }
}

/// The reference prompts' rows (attended tokens only) as training sequences.
fn sequences(inputs: &HashMap<String, Tensor>) -> Vec<Sequence> {
    let ids: Vec<Vec<u32>> = inputs["input_ids"]
        .to_dtype(DType::U32)
        .and_then(|t| t.to_vec2())
        .expect("input_ids");
    let mask: Vec<Vec<u32>> = inputs["attention_mask"]
        .to_dtype(DType::U32)
        .and_then(|t| t.to_vec2())
        .expect("attention_mask");
    ids.into_iter()
        .zip(mask)
        .map(|(ids, mask)| Sequence {
            ids: ids
                .into_iter()
                .zip(mask)
                .filter(|(_, m)| *m == 1)
                .map(|(id, _)| id)
                .collect(),
            completion_start: 1,
        })
        .collect()
}

/// A few AdamW steps on the reference prompts, as the trainer takes them.
fn train(adapter: &dyn Adapter, model: &dyn CausalLm, sequences: &[Sequence], learning_rate: f64) {
    let batch = collate(sequences, &(0..sequences.len()).collect::<Vec<_>>(), 0);
    let loss_model = CausalLmLoss { model, adapter };
    let mut optimizer =
        AdamW::new(adapter.trainable_vars(), AdamWSettings::default()).expect("optimizer");
    for step in 0..10 {
        adapter.set_mode(AdapterMode::Train { seed: step });
        let loss = loss_model.loss_sum(&batch).expect("forward");
        let grads = loss.backward().expect("backward");
        let gradients: Vec<Option<Tensor>> = optimizer
            .vars()
            .into_iter()
            .map(|var| grads.get(var.as_tensor()).cloned())
            .collect();
        optimizer
            .step(&gradients, learning_rate)
            .expect("AdamW step");
    }
    adapter.set_mode(AdapterMode::Eval);
}

/// A copy of the model folder whose quantizable linear weights are `dequant(quant(W))` with the
/// adapter's 4-bit settings: the base a QLoRA adapter computes over, in 16-bit form.
fn dequantized_base(adapter: &dyn Adapter, base: &Path, out: &Path) -> PathBuf {
    let quantization = adapter.base_quantization().expect("a QLoRA adapter");
    let weights =
        candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).unwrap();
    let weights: HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(name, weight)| {
            let value = if is_quantized_linear(&name, weight.dims()) {
                quantization
                    .round_trip(&weight.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .to_dtype(weight.dtype())
                    .unwrap()
            } else {
                weight
            };
            (name, value)
        })
        .collect();
    let dir = out.join("dequantized-base");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(base).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && path.file_name().is_some_and(|n| n != "model.safetensors") {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    dir
}

/// A train artifact as the train stage writes it: `adapter/` and `base_model.json`.
fn train_artifact(adapter: &dyn Adapter, base: &Path, project: &Path) -> PathBuf {
    let train = project.join("train-artifact");
    adapter
        .save(&train.join("adapter"), &base.display().to_string())
        .expect("save the adapter");
    let mut record = serde_json::json!({
        "model": base.display().to_string(),
        "path": base.display().to_string(),
        "model_type": "llama",
        "device": "cpu",
        "dtype": "f32",
    });
    if let Some(quantization) = adapter.base_quantization() {
        record["quantization"] = quantization.to_json();
    }
    std::fs::write(train.join("base_model.json"), record.to_string()).unwrap();
    train
}

#[test]
fn peft_loads_every_export_with_peftpipes_logits() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let python = match python() {
        Ok(python) => python,
        Err(reason) => {
            eprintln!("skipped: {reason} (set PEFTPIPE_PEFT_PYTHON to a Python with peft, torch and transformers; see tests/python/check_peft_export.py)");
            return;
        }
    };
    let base = shared.join("models/stories260k");
    let inputs_path = base.join("reference/base_logits.safetensors");
    let inputs = candle_core::safetensors::load(&inputs_path, &Device::Cpu).unwrap();
    let sequences = sequences(&inputs);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_peft_export.py");
    let model_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    let mut failures = Vec::new();
    let mut table = Vec::new();
    for case in cases() {
        let adapter = new_method(case.yaml, &model_json, &Device::Cpu, 17);
        let model = ModelDir::open(&base)
            .unwrap()
            .load(&Device::Cpu, DType::F32, adapter.linear_factory())
            .unwrap();
        adapter.finish_injection(model.as_ref()).unwrap();
        train(
            adapter.as_ref(),
            model.as_ref(),
            &sequences,
            case.learning_rate,
        );
        let logits = model
            .forward(
                &inputs["input_ids"],
                Some(&inputs["attention_mask"]),
                &adapter.hooks().unwrap(),
            )
            .unwrap();

        let project = tempfile::tempdir().unwrap();
        let expected = project.path().join("peftpipe_logits.safetensors");
        candle_core::safetensors::save(&HashMap::from([("logits", logits)]), &expected).unwrap();
        let train = train_artifact(adapter.as_ref(), &base, project.path());
        let config = ExportConfig {
            from: "tune".into(),
            adapter: Some("out/adapter".into()),
            merged: case.mergeable.then(|| "out/merged".into()),
            max_shard_size: None,
            dtype: None,
            base_model_name_or_path: None,
            gguf: None,
            gguf_type: None,
            quantize: None,
        };
        export(project.path(), &train, config, false)
            .unwrap_or_else(|error| panic!("{}: export: {error}", case.yaml));
        let peft_base = match adapter.base_quantization() {
            Some(_) => dequantized_base(adapter.as_ref(), &base, project.path()),
            None => base.clone(),
        };
        let figures = project.path().join("figures.json");
        let mut command = Command::new(&python);
        command
            .arg(&script)
            .arg("--base")
            .arg(&peft_base)
            .arg("--adapter")
            .arg(project.path().join("out/adapter"))
            .arg("--inputs")
            .arg(&inputs_path)
            .arg("--expected")
            .arg(&expected)
            .arg("--tolerance")
            .arg(TOLERANCE.to_string())
            .arg("--json")
            .arg(&figures);
        if case.mergeable {
            command
                .arg("--merged")
                .arg(project.path().join("out/merged"));
        }
        let output = command.output().expect("run the PEFT check");
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || !figures.is_file() {
            failures.push(format!(
                "{}: the PEFT check failed ({}):\n{stdout}\n{}",
                case.yaml,
                output.status,
                String::from_utf8_lossy(&output.stderr)
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
            continue;
        }
        let figures: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&figures).unwrap()).unwrap();
        let differences = figures["differences"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let moved = figures["moved"].as_f64().unwrap_or(0.0);
        let line = format!(
            "{}: {} tensors; {}; the adapter moves the base logits by {moved:.3e}",
            case.yaml,
            figures["tensors"],
            differences
                .iter()
                .map(|(name, value)| format!("{name} {:.2e}", value.as_f64().unwrap_or(f64::NAN)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        eprintln!("{line}");
        table.push(line);
        let expected_comparisons = if case.mergeable { 3 } else { 1 };
        if differences.len() != expected_comparisons {
            failures.push(format!("{}: comparisons {differences:?}", case.yaml));
        }
        for (name, value) in &differences {
            let value = value.as_f64().unwrap_or(f64::NAN);
            if value.is_nan() || value > TOLERANCE {
                failures.push(format!("{}: {name} = {value:e}", case.yaml));
            }
        }
        if moved.is_nan() || moved <= 1e-3 {
            failures.push(format!(
                "{}: the trained adapter barely moves the logits ({moved:e}): the check would be vacuous",
                case.yaml
            ));
        }
    }
    eprintln!("PEFT cross-check, max |Δlogit| (tolerance {TOLERANCE:e}):");
    for line in &table {
        eprintln!("  {line}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
