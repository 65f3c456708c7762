//! Activation checkpointing (`train.activation_checkpointing`): the layer-by-layer loss model
//! (`train::CheckpointedLoss`) gives the same loss and the same gradient for every trainable
//! tensor as the whole-graph backward — bit for bit on the CPU — for a random Llama with GQA, a
//! random GPT-2 and stories260k with LoRA (dropout included), for prompt methods through `Hooks`
//! (prompt tuning, prefix tuning, LLaMA-Adapter), and in a train-stage run, which ends with the
//! same adapter; since the results are identical, the option is not in the stage fingerprint.
//! Also: the gradient store after backward holds only the adapter's gradients (issue 8 item 3),
//! and `peftpipe bench train` measures several shapes with and without checkpointing in one table.
#![expect(
    clippy::print_stderr,
    reason = "tests print why they skip and the figures they measured"
)]

mod exec_support;
mod support;
mod train_support;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use peftpipe::data::batch::{collate, HostBatch, Sequence};
use peftpipe::models::random::{load_from_tensors, random_weights};
use peftpipe::models::{AdapterPrompt, CausalLm, Hooks, ModelConfig, ModelDir};
use peftpipe::peft::{Adapter, AdapterMode, LoraAdapter, LoraSettings, TargetModules};
use peftpipe::train::{CausalLmLoss, CheckpointedLoss, LossModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use train_support::TrainProject;

fn random_llama_gqa() -> ModelConfig {
    ModelConfig::from_json(&serde_json::json!({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 64, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false
    }))
    .expect("llama config")
}

fn random_gpt2() -> ModelConfig {
    ModelConfig::from_json(&serde_json::json!({
        "model_type": "gpt2", "n_embd": 32, "n_layer": 3, "n_head": 4,
        "vocab_size": 64, "n_positions": 64, "layer_norm_epsilon": 1e-5
    }))
    .expect("gpt2 config")
}

fn lora(config: &ModelConfig, dropout: f32) -> LoraAdapter {
    let gpt2 = matches!(config, ModelConfig::Gpt2(_));
    let targets = if gpt2 {
        TargetModules::Names(vec!["c_attn".into(), "c_proj".into(), "c_fc".into()])
    } else {
        TargetModules::AllLinear
    };
    LoraAdapter::new(
        LoraSettings {
            rank: 4,
            alpha: 8.0,
            dropout,
            targets,
            use_rslora: false,
            fan_in_fan_out: gpt2,
            seed: 11,
        },
        &Device::Cpu,
    )
    .expect("LoRA adapter")
}

/// Random values in every variable (LoRA's B starts at zero, which would make A's gradient zero).
fn randomize(variables: &[(String, Var)], seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (_, var) in variables {
        let count = var.elem_count();
        let values: Vec<f32> = (0..count)
            .map(|_| rng.random::<f32>() * 0.4 - 0.2)
            .collect();
        let tensor = Tensor::from_vec(values, var.shape(), &Device::Cpu).expect("values");
        var.set(&tensor).expect("set a variable");
    }
}

/// A right-padded batch of three rows of different lengths, with some unscored prompt tokens.
fn batch(vocab: usize, seed: u64) -> HostBatch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let sequences: Vec<Sequence> = [9usize, 14, 6]
        .iter()
        .map(|&length| Sequence {
            ids: (0..length)
                .map(|_| rng.random_range(1..vocab as u32))
                .collect(),
            completion_start: 3,
        })
        .collect();
    collate(&sequences, &[0, 1, 2], 0)
}

/// The reference: the whole graph, hooks included, scored like `CausalLmLoss` (virtual tokens
/// are not scored).
struct WholeGraph<'a> {
    model: &'a dyn CausalLm,
    hooks: Hooks,
}

impl LossModel for WholeGraph<'_> {
    fn loss_sum(&self, batch: &HostBatch) -> candle_core::Result<Tensor> {
        let shape = (batch.batch, batch.length);
        let ids = Tensor::from_vec(batch.input_ids.clone(), shape, &Device::Cpu)?;
        let mask = Tensor::from_vec(batch.attention_mask(), shape, &Device::Cpu)?;
        let loss_mask = Tensor::from_vec(batch.loss_mask.clone(), shape, &Device::Cpu)?;
        let mut hidden = self
            .model
            .forward_hidden(&ids, Some(&mask), &self.hooks, None)?;
        let extra = hidden.dim(1)? - batch.length;
        if extra > 0 {
            hidden = hidden.narrow(1, extra, batch.length)?;
        }
        if let Some(weight) = self.model.lm_head().frozen_weight() {
            let loss =
                peftpipe::ops::next_token_linear_cross_entropy(&hidden, weight, &ids, &loss_mask)?;
            return Ok(loss.sum);
        }
        let logits = self.model.lm_head().forward(&hidden)?;
        Ok(peftpipe::ops::next_token_cross_entropy(&logits, &ids, &loss_mask)?.sum)
    }

    fn device(&self) -> &Device {
        self.model.device()
    }
}

/// Loss and gradients of `loss_model` on `batch` (scale 1/scored, as the trainer scales).
fn loss_and_gradients(
    loss_model: &dyn LossModel,
    batch: &HostBatch,
    variables: &[Var],
) -> (f32, Vec<Option<Tensor>>) {
    let pass = loss_model.forward_pass(batch).expect("forward");
    let loss = pass.loss_sum().to_scalar::<f32>().expect("f32 loss");
    let gradients = pass
        .backward(1.0 / batch.scored_tokens as f64, variables)
        .expect("backward");
    (loss, gradients)
}

fn values(tensor: &Tensor) -> Vec<f32> {
    tensor
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 values")
}

/// Checkpointed and whole-graph losses and gradients are bit-identical; every variable has a
/// nonzero gradient. Returns how many values were compared.
fn assert_identical(
    what: &str,
    model: &dyn CausalLm,
    hooks: Hooks,
    variables: &[(String, Var)],
    set_mode: &dyn Fn(u64),
) -> usize {
    let vars: Vec<Var> = variables.iter().map(|(_, v)| v.clone()).collect();
    let batch = batch(model.config().vocab_size(), 5);
    let whole = WholeGraph {
        model,
        hooks: hooks.clone(),
    };
    let checkpointed = CheckpointedLoss {
        offload: None,
        model,
        hooks: hooks.into(),
    };
    set_mode(42);
    let (whole_loss, whole_grads) = loss_and_gradients(&whole, &batch, &vars);
    set_mode(42);
    let (ckpt_loss, ckpt_grads) = loss_and_gradients(&checkpointed, &batch, &vars);
    assert_eq!(whole_loss.to_bits(), ckpt_loss.to_bits(), "{what}: loss");
    let mut compared = 0;
    for ((name, _), (whole, ckpt)) in variables.iter().zip(whole_grads.iter().zip(&ckpt_grads)) {
        let (Some(whole), Some(ckpt)) = (whole, ckpt) else {
            panic!("{what}: `{name}` has no gradient in one of the two backwards");
        };
        let (a, b) = (values(whole), values(ckpt));
        assert!(
            a.iter().any(|&v| v != 0.0),
            "{what}: `{name}` gets a zero gradient (the test would prove nothing)"
        );
        let same = a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (*x == 0.0 && *y == 0.0));
        assert!(same, "{what}: `{name}` differs: {a:?} vs {b:?}");
        compared += a.len();
    }
    compared
}

fn check_lora(what: &str, config: &ModelConfig, model: Box<dyn CausalLm>, adapter: &LoraAdapter) {
    let variables = adapter.trainable_vars();
    randomize(&variables, 3);
    let set_mode = |seed| adapter.set_mode(AdapterMode::Train { seed });
    let compared = assert_identical(what, &*model, Hooks::none(), &variables, &set_mode);
    eprintln!(
        "{what} ({}): {} variables, {compared} gradient values bit-identical",
        config.model_type(),
        variables.len()
    );
}

fn random_model(config: &ModelConfig, adapter: &LoraAdapter) -> Box<dyn CausalLm> {
    let weights = random_weights(config, 7, 0.2, DType::F32, &Device::Cpu).expect("weights");
    let model = load_from_tensors(
        config,
        weights,
        DType::F32,
        &Device::Cpu,
        adapter.linear_factory(),
    )
    .expect("model");
    adapter.finish_injection(&*model).expect("injection");
    model
}

#[test]
fn random_llama_gqa_lora_with_dropout_gradients_are_bit_identical() {
    let config = random_llama_gqa();
    let adapter = lora(&config, 0.1);
    let model = random_model(&config, &adapter);
    check_lora("random Llama (GQA)", &config, model, &adapter);
}

#[test]
fn random_gpt2_lora_with_dropout_gradients_are_bit_identical() {
    let config = random_gpt2();
    let adapter = lora(&config, 0.1);
    let model = random_model(&config, &adapter);
    check_lora("random GPT-2", &config, model, &adapter);
}

#[test]
fn stories260k_lora_with_dropout_gradients_are_bit_identical() {
    let Some(shared) = support::shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED is not set");
        return;
    };
    let dir = ModelDir::open(&shared.join("models/stories260k")).expect("stories260k");
    let config = dir.config().clone();
    let adapter = lora(&config, 0.1);
    let model = dir
        .load(&Device::Cpu, DType::F32, adapter.linear_factory())
        .expect("load stories260k");
    adapter.finish_injection(&*model).expect("injection");
    check_lora("stories260k", &config, model, &adapter);
}

/// Trainable tensors reaching the model through `Hooks` (prompt methods), beside LoRA.
#[test]
fn prompt_methods_through_hooks_gradients_are_bit_identical() {
    let config = random_llama_gqa();
    let ModelConfig::Llama(llama) = &config else {
        unreachable!()
    };
    let (hidden, kv_heads, head_dim) =
        (llama.hidden_size, llama.num_key_value_heads, llama.head_dim);
    let layers = llama.num_hidden_layers;
    let var = |shape: &[usize]| Var::zeros(shape, DType::F32, &Device::Cpu).expect("var");
    type HooksOf = Box<dyn Fn(&[(String, Var)]) -> Hooks>;
    type Case = (&'static str, Vec<(String, Var)>, HooksOf);
    let cases: Vec<Case> = vec![
        (
            "prompt tuning",
            vec![("prompt".into(), var(&[1, 3, hidden]))],
            Box::new(|vars: &[(String, Var)]| Hooks {
                input_prefix: Some(vars[0].1.as_tensor().clone()),
                ..Hooks::none()
            }),
        ),
        (
            "prefix tuning",
            (0..layers)
                .flat_map(|i| {
                    [
                        (format!("key {i}"), var(&[1, kv_heads, 2, head_dim])),
                        (format!("value {i}"), var(&[1, kv_heads, 2, head_dim])),
                    ]
                })
                .collect(),
            Box::new(move |vars: &[(String, Var)]| Hooks {
                layer_prefix: Some(
                    (0..layers)
                        .map(|i| {
                            (
                                vars[2 * i].1.as_tensor().clone(),
                                vars[2 * i + 1].1.as_tensor().clone(),
                            )
                        })
                        .collect(),
                ),
                ..Hooks::none()
            }),
        ),
        (
            "LLaMA-Adapter",
            vec![
                ("adapter prompt".into(), var(&[4, hidden])),
                ("adapter gate".into(), var(&[1])),
            ],
            Box::new(|vars: &[(String, Var)]| Hooks {
                adapters: BTreeMap::from([(
                    1,
                    AdapterPrompt {
                        prompt: vars[0].1.as_tensor().clone(),
                        gate: vars[1].1.as_tensor().clone(),
                    },
                )]),
                ..Hooks::none()
            }),
        ),
    ];
    for (what, hook_vars, hooks) in cases {
        let adapter = lora(&config, 0.1);
        let model = random_model(&config, &adapter);
        let mut variables = adapter.trainable_vars();
        variables.extend(hook_vars.iter().cloned());
        randomize(&variables, 9);
        let set_mode = |seed| adapter.set_mode(AdapterMode::Train { seed });
        let compared = assert_identical(what, &*model, hooks(&hook_vars), &variables, &set_mode);
        eprintln!("{what} + LoRA: {compared} gradient values bit-identical");
    }
}

/// Dropout is drawn again in the recompute: with another micro-batch seed the gradients differ,
/// so the identity above is not an accident of dropout being off.
#[test]
fn dropout_is_in_play_and_redrawn_identically() {
    let config = random_llama_gqa();
    let adapter = lora(&config, 0.5);
    let model = random_model(&config, &adapter);
    let variables = adapter.trainable_vars();
    randomize(&variables, 3);
    let vars: Vec<Var> = variables.iter().map(|(_, v)| v.clone()).collect();
    let batch = batch(config.vocab_size(), 5);
    let checkpointed = CheckpointedLoss {
        offload: None,
        model: &*model,
        hooks: Hooks::none().into(),
    };
    let mut runs = Vec::new();
    for seed in [1, 2, 1] {
        adapter.set_mode(AdapterMode::Train { seed });
        let (loss, grads) = loss_and_gradients(&checkpointed, &batch, &vars);
        let first = values(grads[0].as_ref().expect("a gradient"));
        runs.push((loss, first));
    }
    assert_ne!(runs[0], runs[1], "another dropout seed, other gradients");
    assert_eq!(runs[0], runs[2], "the same seed, the same gradients");
    // And the plain loss model agrees with the same seed.
    adapter.set_mode(AdapterMode::Train { seed: 1 });
    let (loss, _) = loss_and_gradients(
        &CausalLmLoss {
            model: &*model,
            adapter: &adapter,
        },
        &batch,
        &vars,
    );
    assert_eq!(loss.to_bits(), runs[0].0.to_bits());
}

/// The train stage with the option: the same final loss and adapter bytes as without it, and
/// toggling it leaves the stage fresh (it is not in the fingerprint).
#[test]
fn train_stage_with_checkpointing_matches_and_stays_fresh() {
    let pipeline = train_support::PIPELINE.replace(
        "target_modules: all-linear}",
        "target_modules: all-linear, dropout: 0.1}",
    );
    assert_ne!(pipeline, train_support::PIPELINE);
    let project = TrainProject::with_pipeline(&pipeline);
    let plain = project.run_ok("pipeline.yaml", &["--stage", "train"]);
    let with_option = pipeline.replace(
        "      checkpoint_every: 2\n",
        "      checkpoint_every: 2\n      activation_checkpointing: true\n",
    );
    assert_ne!(with_option, pipeline);
    project.write("pipeline.yaml", &with_option);
    let status = project.run(&["status", "pipeline.yaml"]);
    let text = exec_support::stdout(&status);
    assert!(text.contains("[FRESH] train"), "{text}");
    let checkpointed = project.run_ok("pipeline.yaml", &["--force", "--stage", "train"]);
    assert_eq!(checkpointed.ran(), ["train"]);
    assert_eq!(
        checkpointed.outcome("train")["final_loss"],
        plain.outcome("train")["final_loss"]
    );
    assert_eq!(
        checkpointed.output("train"),
        plain.output("train"),
        "the same adapter artifact, byte for byte"
    );
    eprintln!(
        "train stage: final loss {} with and without checkpointing",
        plain.outcome("train")["final_loss"]
    );
}

/// What candle's `backward` keeps (issue 8 item 3): after the whole-graph backward of the
/// training loss the gradient store holds the adapter's gradients and (almost) nothing else — no
/// gradient for a constant operand (the embeddings entering layer 0, a frozen layer's output, a
/// dropout mask). Prints the ratio of the store's bytes to the adapter's bytes.
#[test]
fn the_gradient_store_holds_only_the_adapter_after_backward() {
    for (config, dropout) in [(random_llama_gqa(), 0.1), (random_gpt2(), 0.1)] {
        let adapter = lora(&config, dropout);
        let model = random_model(&config, &adapter);
        let variables = adapter.trainable_vars();
        randomize(&variables, 3);
        adapter.set_mode(AdapterMode::Train { seed: 4 });
        let batch = batch(config.vocab_size(), 5);
        let loss = CausalLmLoss {
            model: &*model,
            adapter: &adapter,
        }
        .loss_sum(&batch)
        .expect("forward");
        let store = loss.backward().expect("backward");
        let store_bytes = peftpipe::train::pass::store_bytes(&store);
        let entries = store.get_ids().count();
        let adapter_bytes: u64 = variables
            .iter()
            .map(|(_, var)| peftpipe::train::pass::tensor_bytes(var.as_tensor()))
            .sum();
        let ratio = store_bytes as f64 / adapter_bytes as f64;
        eprintln!(
            "{}: gradient store {entries} tensors, {store_bytes} B; adapter {} tensors, \
             {adapter_bytes} B; ratio {ratio:.3}",
            config.model_type(),
            variables.len()
        );
        for (name, var) in &variables {
            assert!(store.get(var.as_tensor()).is_some(), "{name}: no gradient");
        }
        assert_eq!(
            entries,
            variables.len(),
            "{}: the store holds gradients of non-variables",
            config.model_type()
        );
        assert!(ratio <= 1.0 + 1e-9, "ratio {ratio}");
    }
}

fn bench_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("tiny.config.json");
    let json = serde_json::json!({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 64, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false
    });
    std::fs::write(&path, json.to_string()).expect("write config");
    path
}

/// `bench train --shapes A,B --checkpointing both`: one row per shape and setting, each with
/// finite positive figures and the FLOPs of `lora_flops_per_token`; the text form is one table
/// plus a RESULT line per row; a single shape keeps the one-configuration report.
#[test]
fn bench_train_table_over_shapes_and_checkpointing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = bench_config(dir.path());
    let config_arg = config_path.to_str().expect("utf-8 path");
    let common = [
        "--config", config_arg, "--device", "cpu", "--rank", "4", "--steps", "2", "--warmup", "1",
    ];
    let mut args = vec!["--json", "bench", "train"];
    args.extend(common);
    args.extend(["--shapes", "2x16,1x24", "--checkpointing", "both"]);
    let output = support::peftpipe().args(&args).output().expect("run");
    assert!(output.status.success(), "{}", exec_support::stderr(&output));
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&exec_support::stdout(&output)).expect("a JSON array");
    let config = ModelConfig::from_json(
        &serde_json::from_str(&std::fs::read_to_string(&config_path).expect("read")).expect("json"),
    )
    .expect("config");
    let expected = [(2, 16, false), (2, 16, true), (1, 24, false), (1, 24, true)];
    assert_eq!(rows.len(), expected.len(), "{rows:?}");
    for (row, (batch, seq, checkpointing)) in rows.iter().zip(expected) {
        assert_eq!(row["batch"], batch, "{row}");
        assert_eq!(row["sequence_length"], seq, "{row}");
        assert_eq!(row["activation_checkpointing"], checkpointing, "{row}");
        for key in [
            "tokens_per_second",
            "step_ms",
            "forward_ms",
            "backward_ms",
            "mfu",
            "flops_per_token",
        ] {
            let value = row[key].as_f64().unwrap_or(f64::NAN);
            assert!(value.is_finite() && value > 0.0, "{key} = {value} in {row}");
        }
        assert!(row["peak_memory_bytes"].as_u64().unwrap_or(0) > 0, "{row}");
        let trainable = row["trainable_parameters"].as_u64().expect("trainable");
        assert_eq!(
            row["flops_per_token"].as_f64(),
            Some(peftpipe::train::bench::lora_flops_per_token(
                &config, seq, trainable
            ))
        );
    }

    let mut args = vec!["bench", "train"];
    args.extend(common);
    args.extend(["--shapes", "2x16,1x24", "--checkpointing", "both"]);
    let output = support::peftpipe().args(&args).output().expect("run");
    assert!(output.status.success(), "{}", exec_support::stderr(&output));
    let table = exec_support::stderr(&output);
    assert!(
        table.contains("shape") && table.contains("MFU") && table.contains("peak GiB"),
        "{table}"
    );
    let table_rows = table
        .lines()
        .filter(|line| line.starts_with("2x16 ") || line.starts_with("1x24 "))
        .count();
    assert_eq!(table_rows, 4, "{table}");
    let results = exec_support::stdout(&output)
        .lines()
        .filter(|line| line.starts_with("RESULT {"))
        .count();
    assert_eq!(results, 4);

    // One shape, one setting: the one-configuration report, as the GPU scripts read it.
    let mut args = vec!["bench", "train"];
    args.extend(common);
    args.extend(["--batch", "2", "--seq", "16", "--checkpointing", "on"]);
    let output = support::peftpipe().args(&args).output().expect("run");
    assert!(output.status.success(), "{}", exec_support::stderr(&output));
    let text = exec_support::stderr(&output);
    assert!(
        text.contains("batch 2 × 16, activation checkpointing"),
        "{text}"
    );
    assert!(
        text.contains("tokens/s (median of 2 steps") && text.contains("MFU"),
        "{text}"
    );
    let stdout = exec_support::stdout(&output);
    let line = stdout.strip_prefix("RESULT ").expect("a RESULT line");
    let result: serde_json::Value = serde_json::from_str(line.trim()).expect("JSON");
    assert_eq!(result["activation_checkpointing"], true);
    eprintln!("{table}");
}

/// `bench train --kprof DIR` runs each row with DIR/kprof.so preloaded (KPROF_OUT, KPROF_STEPS set)
/// and reads the launches per step from its report. A stand-in kprof.so, compiled here with the C
/// compiler, writes a report whose launch count is KPROF_STEPS, so the test checks the plumbing
/// (the real one, CUPTI, runs on the GPU host: `engine.sh launches`). Also the offload rows.
#[test]
fn bench_train_reads_launches_per_step_from_kprof() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("kprof.c");
    std::fs::write(
        &source,
        r#"#include <stdio.h>
#include <stdlib.h>
__attribute__((destructor)) static void report(void) {
  const char *out = getenv("KPROF_OUT"), *steps = getenv("KPROF_STEPS");
  if (!out || !steps) return;
  FILE *f = fopen(out, "w");
  if (!f) return;
  fprintf(f, "kprof: window cuProfilerStart..Stop; per step = totals / %s\n", steps);
  fprintf(f, "kprof: span 1.000 ms/step, kernel sum 1.000 ms/step, GPU busy 1.000 ms/step (100.0%% of span), %s.0 launches/step, 1 distinct\n", steps);
  fclose(f);
}
"#,
    )
    .expect("write");
    let compiled = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(dir.path().join("kprof.so"))
        .arg(&source)
        .status();
    if !compiled.is_ok_and(|status| status.success()) {
        eprintln!("skipped: no C compiler to build the stand-in kprof.so");
        return;
    }
    let config_path = bench_config(dir.path());
    let output = support::peftpipe()
        .args(["--json", "bench", "train", "--config"])
        .arg(&config_path)
        .args([
            "--device", "cpu", "--rank", "4", "--steps", "3", "--warmup", "1",
        ])
        .args(["--shapes", "2x16", "--checkpointing", "all", "--kprof"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(output.status.success(), "{}", exec_support::stderr(&output));
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&exec_support::stdout(&output)).expect("a JSON array");
    let settings: Vec<(bool, bool)> = rows
        .iter()
        .map(|row| {
            (
                row["activation_checkpointing"].as_bool().unwrap_or(false),
                row["activation_offload"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(settings, [(false, false), (true, false), (true, true)]);
    for row in &rows {
        assert_eq!(row["launches_per_step"], 3.0, "{row}");
    }
}

/// PEFT's auxiliary modules (trainable token rows through `Hooks::embedding_rows` and the wrapped
/// lm_head, a trained lm_head copy) give bit-identical gradients with checkpointing: a random
/// Llama (untied; embedding rows and lm_head rows of their own), a random GPT-2 (tied; the head
/// follows the embedding rows) and a GPT-2 with an lm_head copy beside the rows.
#[test]
fn auxiliary_modules_gradients_are_bit_identical() {
    use peftpipe::config::auxiliary::TrainableTokenIndices;
    use peftpipe::config::method::{LoraConfig, MethodConfig, TargetModulesConfig};
    use peftpipe::peft::{new_adapter, MethodContext};
    // Two distinct tokens of the test batch (so their embedding rows get a gradient).
    let tokens: Vec<u32> = {
        let ids = batch(64, 5).input_ids;
        let first = *ids.iter().find(|&&id| id != 0).expect("a token");
        let second = *ids
            .iter()
            .find(|&&id| id != 0 && id != first)
            .expect("another token");
        vec![first, second]
    };
    let llama_json = serde_json::json!({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 64, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false
    });
    let gpt2_json = serde_json::json!({
        "model_type": "gpt2", "n_embd": 32, "n_layer": 3, "n_head": 4,
        "vocab_size": 64, "n_positions": 64, "layer_norm_epsilon": 1e-5
    });
    let gpt2_targets = Some(TargetModulesConfig::Names(vec!["c_attn".into()]));
    let cases = [
        (
            "random Llama, embedding and lm_head rows",
            llama_json.clone(),
            LoraConfig {
                trainable_token_indices: Some(TrainableTokenIndices::Modules(BTreeMap::from([
                    ("embed_tokens".to_string(), tokens.clone()),
                    ("lm_head".to_string(), vec![5, 9]),
                ]))),
                ..LoraConfig::default()
            },
        ),
        (
            "random GPT-2, tied rows",
            gpt2_json.clone(),
            LoraConfig {
                target_modules: gpt2_targets.clone(),
                trainable_token_indices: Some(TrainableTokenIndices::List(tokens.clone())),
                ..LoraConfig::default()
            },
        ),
        (
            "random GPT-2, rows and an lm_head copy",
            gpt2_json.clone(),
            LoraConfig {
                target_modules: gpt2_targets.clone(),
                trainable_token_indices: Some(TrainableTokenIndices::List(tokens.clone())),
                modules_to_save: Some(vec!["lm_head".into()]),
                ..LoraConfig::default()
            },
        ),
        (
            "random Llama, every norm copied",
            llama_json.clone(),
            LoraConfig {
                modules_to_save: Some(vec!["norm".into()]),
                ..LoraConfig::default()
            },
        ),
        (
            "random GPT-2, ln_1 and ln_f copied",
            gpt2_json,
            LoraConfig {
                target_modules: gpt2_targets,
                modules_to_save: Some(vec!["ln_1".into(), "ln_f".into()]),
                ..LoraConfig::default()
            },
        ),
    ];
    for (what, json, lora) in cases {
        let config = ModelConfig::from_json(&json).expect("config");
        let adapter = new_adapter(
            &MethodConfig::Lora(lora),
            &MethodContext {
                model_config: &json,
                device: &Device::Cpu,
                seed: 5,
                tokenize: None,
            },
        )
        .expect("adapter");
        let weights = random_weights(&config, 7, 0.2, DType::F32, &Device::Cpu).expect("weights");
        let model = load_from_tensors(
            &config,
            weights,
            DType::F32,
            &Device::Cpu,
            adapter.linear_factory(),
        )
        .expect("model");
        adapter.finish_injection(&*model).expect("injection");
        let variables = adapter.trainable_vars();
        assert!(
            variables.iter().any(|(name, _)| !name.contains(".lora_")),
            "{what}: no auxiliary variable"
        );
        randomize(&variables, 3);
        adapter.set_mode(AdapterMode::Train { seed: 42 });
        let hooks = adapter.hooks().expect("hooks");
        let set_mode = |seed| adapter.set_mode(AdapterMode::Train { seed });
        let compared = assert_identical(what, &*model, hooks, &variables, &set_mode);
        eprintln!("{what}: {compared} gradient values bit-identical");
    }
}
