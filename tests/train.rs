//! The training loop end to end on tiny models: determinism (same seed → identical adapter bytes),
//! resume equivalence (interrupted + resumed == uninterrupted, bit for bit), gradient accumulation,
//! NaN/inf detection naming the step, the loss going down, the train stage's artifact, and a short
//! LoRA run on stories260k + bevostories that lowers the validation perplexity.
#![expect(
    clippy::print_stderr,
    reason = "tests print why they skip and the figures they measured"
)]

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use peftpipe::config::train::ScheduleKind;
use peftpipe::data::batch::{HostBatch, Sequence};
use peftpipe::models::{llama::Llama, CausalLm, Hooks, ModelConfig, ModelDir};
use peftpipe::peft::{Adapter, LoraAdapter, LoraSettings, TargetModules};
use peftpipe::train::CausalLmLoss;
use peftpipe::train::{
    train, train_data_parallel, train_with_evaluation, AdamWSettings, EarlyStopping, Evaluation,
    LossModel, TrainError, TrainOutcome, TrainerSettings,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use support::{build_llama, llama_weights, shared_dir, tiny_llama_json};

/// Prompt/completion sequences over the tiny vocabulary, with a learnable pattern: the completion
/// repeats the prompt's last token pattern.
fn sequences(count: usize, seed: u64) -> Vec<Sequence> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let prompt_len = rng.random_range(2..6);
            let mut ids = vec![1u32];
            ids.extend((0..prompt_len).map(|_| rng.random_range(3..40u32)));
            let start = ids.len();
            let key = ids[start - 1];
            ids.extend([key, (key + 1) % 40, 2]);
            Sequence {
                ids,
                completion_start: start,
            }
        })
        .collect()
}

struct Run {
    model: Llama,
    adapter: LoraAdapter,
}

fn setup(weights: &HashMap<String, Tensor>, seed: u64, dropout: f32) -> Run {
    let config = ModelConfig::from_json(&tiny_llama_json()).unwrap();
    let adapter = LoraAdapter::new(
        LoraSettings {
            rank: 4,
            alpha: 8.0,
            dropout,
            targets: TargetModules::AllLinear,
            use_rslora: false,
            fan_in_fan_out: false,
            seed,
        },
        &Device::Cpu,
    )
    .unwrap();
    let model = build_llama(&config, weights, &adapter);
    adapter.finish_injection(&model).unwrap();
    Run { model, adapter }
}

/// The masked-loss model the stage uses (loss on completion tokens).
struct CompletionLoss<'a>(&'a dyn CausalLm);

impl LossModel for CompletionLoss<'_> {
    fn loss_sum(&self, batch: &HostBatch) -> candle_core::Result<Tensor> {
        let shape = (batch.batch, batch.length);
        let ids = Tensor::from_vec(batch.input_ids.clone(), shape, &Device::Cpu)?;
        let mask = Tensor::from_vec(batch.attention_mask(), shape, &Device::Cpu)?;
        let loss_mask = Tensor::from_vec(batch.loss_mask.clone(), shape, &Device::Cpu)?;
        let logits = self.0.forward(&ids, Some(&mask), &Hooks::none())?;
        Ok(peftpipe::ops::next_token_cross_entropy(&logits, &ids, &loss_mask)?.sum)
    }
    fn device(&self) -> &Device {
        self.0.device()
    }
}

fn trainer_settings(seed: u64) -> TrainerSettings {
    TrainerSettings {
        adamw: AdamWSettings {
            weight_decay: 0.01,
            ..AdamWSettings::default()
        },
        learning_rate: 1e-2,
        schedule: ScheduleKind::Cosine,
        warmup_steps: 1,
        max_grad_norm: Some(1.0),
        batch_size: 2,
        accumulation: 2,
        epochs: 2,
        max_steps: None,
        sort_by_length: true,
        seed,
        pad_id: 0,
        checkpoint_every: 0,
        checkpoint_dir: None,
        run_key: "test run".into(),
        synchronize_phases: false,
    }
}

/// Train and return the saved adapter's bytes with the outcome.
fn train_once(
    weights: &HashMap<String, Tensor>,
    data: &[Sequence],
    settings: &TrainerSettings,
    dropout: f32,
    cancel_after: Option<u64>,
) -> (Result<TrainOutcome, TrainError>, Vec<u8>) {
    let run = setup(weights, settings.seed, dropout);
    let cancel = AtomicBool::new(false);
    let result = train(
        &CompletionLoss(&run.model),
        &run.adapter,
        data,
        settings,
        &cancel,
        &mut |metrics| {
            if Some(metrics.step) == cancel_after {
                cancel.store(true, Ordering::Relaxed);
            }
        },
    );
    let dir = tempfile::tempdir().unwrap();
    run.adapter.save(dir.path(), "tiny").unwrap();
    (
        result,
        std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap(),
    )
}

#[test]
fn same_seed_gives_identical_adapter_bytes() {
    let config = ModelConfig::from_json(&tiny_llama_json()).unwrap();
    let weights = llama_weights(&config, 1, 0.3);
    let data = sequences(12, 2);
    let settings = trainer_settings(7);
    let (first, first_bytes) = train_once(&weights, &data, &settings, 0.1, None);
    let (second, second_bytes) = train_once(&weights, &data, &settings, 0.1, None);
    assert_eq!(first.unwrap().steps, 6);
    second.unwrap();
    assert_eq!(first_bytes, second_bytes, "same seed, different adapter");
    let (_, other_bytes) = train_once(&weights, &data, &trainer_settings(8), 0.1, None);
    assert_ne!(first_bytes, other_bytes, "the seed must matter");
}

#[test]
fn resume_from_a_checkpoint_is_bit_identical_to_an_uninterrupted_run() {
    let config = ModelConfig::from_json(&tiny_llama_json()).unwrap();
    let weights = llama_weights(&config, 3, 0.3);
    let data = sequences(12, 4);
    let mut settings = trainer_settings(9);
    settings.checkpoint_every = 3;

    let whole_dir = tempfile::tempdir().unwrap();
    settings.checkpoint_dir = Some(whole_dir.path().to_path_buf());
    let (whole, whole_bytes) = train_once(&weights, &data, &settings, 0.1, None);
    let whole = whole.unwrap();
    assert_eq!((whole.steps, whole.resumed_from), (6, None));

    // Cancelled (Ctrl-C, SIGTERM) after step 4: it stops there and checkpoints step 4 (the
    // newest checkpoint replaces step 3's); after step 3, step 3's periodic one is what remains.
    // A fresh process (new model, new adapter) resumes from it bit-identical.
    let mut dirs = Vec::new();
    for stop in [4, 3] {
        let dir = tempfile::tempdir().unwrap();
        settings.checkpoint_dir = Some(dir.path().to_path_buf());
        let (stopped, _) = train_once(&weights, &data, &settings, 0.1, Some(stop));
        assert!(
            matches!(stopped, Err(TrainError::Cancelled { step }) if step == stop),
            "{stopped:?}"
        );
        assert!(dir
            .path()
            .join(format!("step-0000000{stop}/state.json"))
            .is_file());
        let (resumed, resumed_bytes) = train_once(&weights, &data, &settings, 0.1, None);
        let resumed = resumed.unwrap();
        assert_eq!(resumed.resumed_from, Some(stop));
        assert_eq!(
            resumed_bytes, whole_bytes,
            "run resumed at step {stop} differs from the uninterrupted one"
        );
        assert_eq!(resumed.metrics_jsonl.lines().count(), 6);
        assert_eq!(resumed.final_loss, whole.final_loss);
        // No timings in the metrics: resumed and uninterrupted runs write the same bytes.
        assert_eq!(resumed.metrics_jsonl, whole.metrics_jsonl);
        dirs.push(dir);
    }

    // A checkpoint of another run (different key) is ignored.
    settings.run_key = "another run".into();
    let (fresh, _) = train_once(&weights, &data, &settings, 0.1, None);
    assert_eq!(fresh.unwrap().resumed_from, None);
}

#[test]
fn accumulating_two_half_batches_equals_one_full_batch() {
    // 8 rows: every epoch ends on a step boundary either way.
    accumulation_matches_full_batches(8);
}

#[test]
fn an_optimizer_step_never_spans_an_epoch_boundary() {
    // 6 rows: a full batch of 4 leaves a short batch of 2 at each epoch's end; 2 × 2 has 3
    // micro-batches an epoch, so the epoch's last step holds one (as in HF Trainer), never the
    // next epoch's first: the same steps, schedule and adapter as the full batches.
    accumulation_matches_full_batches(6);
}

fn accumulation_matches_full_batches(rows: usize) {
    let config = ModelConfig::from_json(&tiny_llama_json()).unwrap();
    let weights = llama_weights(&config, 5, 0.3);
    let data = sequences(rows, 6);
    let mut full = trainer_settings(3);
    full.sort_by_length = false;
    full.batch_size = 4;
    full.accumulation = 1;
    let mut halves = full.clone();
    halves.batch_size = 2;
    halves.accumulation = 2;
    let adapter_of = |settings: &TrainerSettings| {
        let run = setup(&weights, settings.seed, 0.0);
        train(
            &CompletionLoss(&run.model),
            &run.adapter,
            &data,
            settings,
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap();
        run.adapter.trainable_vars()
    };
    assert_eq!(
        peftpipe::train::trainer::total_steps(rows, &full),
        peftpipe::train::trainer::total_steps(rows, &halves),
        "{rows} rows"
    );
    let (a, b) = (adapter_of(&full), adapter_of(&halves));
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let difference = x
            .sub(y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(difference < 1e-5, "{name}: {difference}");
    }
}

/// The adapter's variables as host vectors, and each step's (loss, gradient norm).
type RankResult = (Vec<(String, Vec<f32>)>, Vec<(f64, f64)>);

/// Train on every rank of an in-process group (one thread each), returning each rank's
/// [`RankResult`] (or its error's message).
fn train_ranks(
    weights: &HashMap<String, Tensor>,
    data: &[Sequence],
    settings: &TrainerSettings,
    world_size: usize,
    nan_loss_on_rank: Option<usize>,
) -> Vec<Result<RankResult, String>> {
    use peftpipe::train::distributed::local::LocalGroup;
    let ranks = LocalGroup::new(world_size, std::time::Duration::from_secs(60));
    std::thread::scope(|scope| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|comm| {
                scope.spawn(move || {
                    let run = setup(weights, settings.seed, 0.0);
                    let rank = peftpipe::train::distributed::Communicator::rank(&comm);
                    let broken = Broken {
                        adapter: &run.adapter,
                        calls: std::cell::Cell::new(0),
                        nan_loss_at: 2,
                    };
                    let normal = CompletionLoss(&run.model);
                    let model: &dyn LossModel = if nan_loss_on_rank == Some(rank) {
                        &broken
                    } else {
                        &normal
                    };
                    let mut figures = Vec::new();
                    let result = train_data_parallel(
                        model,
                        &run.adapter,
                        data,
                        None,
                        settings,
                        &comm,
                        &AtomicBool::new(false),
                        &mut |metrics| figures.push((metrics.loss, metrics.grad_norm)),
                        &mut |_| {},
                    );
                    drop(comm);
                    result.map_err(|e| e.to_string()).map(|_| {
                        let vars = run
                            .adapter
                            .trainable_vars()
                            .into_iter()
                            .map(|(name, var)| {
                                let values = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                                (name, values)
                            })
                            .collect();
                        (vars, figures)
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn data_parallel_ranks_match_one_rank_on_the_whole_batch() {
    let config = ModelConfig::from_json(&tiny_llama_json()).unwrap();
    let weights = llama_weights(&config, 5, 0.3);
    let data = sequences(10, 6);
    let mut settings = trainer_settings(3);
    settings.sort_by_length = false;
    settings.batch_size = 4;
    settings.accumulation = 2;
    let one = train_ranks(&weights, &data, &settings, 1, None);
    let (one, one_figures) = one[0].as_ref().unwrap();
    let initial = setup(&weights, settings.seed, 0.0).adapter.trainable_vars();
    for world_size in [2, 4] {
        let ranks = train_ranks(&weights, &data, &settings, world_size, None);
        let (first, _) = ranks[0].as_ref().unwrap();
        for (rank, result) in ranks.iter().enumerate() {
            let (vars, figures) = result.as_ref().unwrap();
            // The loss and the (averaged) gradient norm of every step, as on one rank: Adam and
            // clipping would hide a gradient off by a constant factor, these do not.
            assert_eq!(figures.len(), one_figures.len());
            for ((loss, norm), (one_loss, one_norm)) in figures.iter().zip(one_figures) {
                assert!(
                    (loss - one_loss).abs() < 1e-5 * one_loss,
                    "{loss} vs {one_loss}"
                );
                assert!(
                    (norm - one_norm).abs() < 1e-4 * one_norm,
                    "{norm} vs {one_norm}"
                );
            }
            for (((name, got), (_, zero)), ((_, want), (_, start))) in
                vars.iter().zip(first).zip(one.iter().zip(&initial))
            {
                assert_eq!(
                    got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    zero.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "world {world_size}: rank {rank}'s {name} differs from rank 0's"
                );
                let moved = start.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(got != &moved, "{name} did not train");
                let difference = got
                    .iter()
                    .zip(want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    difference < 1e-5,
                    "world {world_size}: {name} differs from one rank by {difference}"
                );
            }
        }
    }
}

#[test]
fn a_failing_rank_ends_the_data_parallel_run_with_a_clear_error() {
    let config = ModelConfig::from_json(&tiny_llama_json()).unwrap();
    let weights = llama_weights(&config, 5, 0.3);
    let data = sequences(8, 6);
    let settings = trainer_settings(3);
    let started = std::time::Instant::now();
    let ranks = train_ranks(&weights, &data, &settings, 2, Some(1));
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let failed = ranks[1].as_ref().unwrap_err();
    assert!(failed.contains("not finite"), "{failed}");
    let other = ranks[0].as_ref().unwrap_err();
    assert!(
        other.contains("data-parallel training") && other.contains("rank 1 stopped"),
        "{other}"
    );
}

/// A model whose loss becomes NaN at a given step, or whose gradient does.
struct Broken<'a> {
    adapter: &'a LoraAdapter,
    calls: std::cell::Cell<u64>,
    nan_loss_at: u64,
}

impl LossModel for Broken<'_> {
    fn loss_sum(&self, _batch: &HostBatch) -> candle_core::Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        let vars = self.adapter.trainable_vars();
        // The last variable is a lora_B: all zeros before the first update.
        let (_, var) = &vars[vars.len() - 1];
        let x = var.as_tensor();
        if self.calls.get() == self.nan_loss_at {
            return x.sum_all()?.affine(f64::NAN, 0.0);
        }
        // A finite loss (0) whose gradient is infinite: d√x/dx at x = 0.
        if self.nan_loss_at == 0 {
            return x.sqrt()?.sum_all();
        }
        x.sqr()?.sum_all()
    }
    fn device(&self) -> &Device {
        &Device::Cpu
    }
}

#[test]
fn non_finite_loss_or_gradient_stops_with_the_step() {
    let config = ModelConfig::from_json(&tiny_llama_json()).unwrap();
    let weights = llama_weights(&config, 7, 0.3);
    let data = sequences(8, 8);
    let mut settings = trainer_settings(1);
    settings.accumulation = 1;
    let run = setup(&weights, 1, 0.0);
    let broken = Broken {
        adapter: &run.adapter,
        calls: 0.into(),
        nan_loss_at: 3,
    };
    let error = train(
        &broken,
        &run.adapter,
        &data,
        &settings,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(error, TrainError::NonFinite { step: 3, .. }),
        "{error:?}"
    );
    assert!(error.to_string().starts_with("step 3: the loss"), "{error}");

    let broken = Broken {
        adapter: &run.adapter,
        calls: 0.into(),
        nan_loss_at: 0,
    };
    let error = train(
        &broken,
        &run.adapter,
        &data,
        &settings,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, TrainError::NonFinite { step: 1, .. }),
        "{error:?}"
    );
    assert!(
        message.contains("gradient norm") && message.contains("lora_B"),
        "{message}"
    );
}

#[test]
fn training_lowers_the_loss_on_a_learnable_pattern() {
    let config = ModelConfig::from_json(&tiny_llama_json()).unwrap();
    let weights = llama_weights(&config, 9, 0.3);
    let data = sequences(16, 10);
    let mut settings = trainer_settings(2);
    settings.max_steps = Some(40);
    settings.accumulation = 1;
    settings.batch_size = 8;
    settings.learning_rate = 3e-2;
    let run = setup(&weights, 2, 0.0);
    let mut losses = Vec::new();
    train(
        &CompletionLoss(&run.model),
        &run.adapter,
        &data,
        &settings,
        &AtomicBool::new(false),
        &mut |m| losses.push(m.loss),
    )
    .unwrap();
    let first = losses[..4].iter().sum::<f64>() / 4.0;
    let last = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
    eprintln!(
        "tiny model: loss {first:.3} → {last:.3} in {} steps",
        losses.len()
    );
    assert!(last < 0.6 * first, "loss {first} → {last}");
}

#[test]
fn every_token_loss_model_trains_too() {
    // The benchmark's loss model (all tokens scored) on the same tiny model.
    let config = ModelConfig::from_json(&tiny_llama_json()).unwrap();
    let weights = llama_weights(&config, 11, 0.3);
    let data: Vec<Sequence> = sequences(4, 12)
        .into_iter()
        .map(|s| Sequence {
            completion_start: 0,
            ..s
        })
        .collect();
    let mut settings = trainer_settings(4);
    settings.max_steps = Some(3);
    let run = setup(&weights, 4, 0.0);
    let outcome = train(
        &CausalLmLoss {
            model: &run.model,
            adapter: &run.adapter,
        },
        &run.adapter,
        &data,
        &settings,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(outcome.steps, 3);
    assert!(outcome.final_loss.is_finite());
}

// ---------------------------------------------------------------------------------------------
// The train stage on a model directory.
// ---------------------------------------------------------------------------------------------

/// A Hugging Face style directory of the tiny Llama with a word-level tokenizer.
fn tiny_model_dir(dir: &Path) {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    let config = tiny_llama_json();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let model_config = ModelConfig::from_json(&config).unwrap();
    let weights = llama_weights(&model_config, 13, 0.3);
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    let mut words = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    words.extend((3..40).map(|i| format!("w{i}")));
    let vocab: HashMap<String, u32> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .unwrap();
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Whitespace {}));
    tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}"#,
    )
    .unwrap();
}

/// Write `train.parquet` with prompt/completion columns.
fn write_pairs(path: &Path, rows: &[(String, String)]) {
    use arrow::array::StringArray;
    use arrow::record_batch::RecordBatch;
    let prompts = StringArray::from_iter_values(rows.iter().map(|r| r.0.as_str()));
    let completions = StringArray::from_iter_values(rows.iter().map(|r| r.1.as_str()));
    let batch = RecordBatch::try_from_iter([
        (
            "prompt",
            std::sync::Arc::new(prompts) as arrow::array::ArrayRef,
        ),
        (
            "completion",
            std::sync::Arc::new(completions) as arrow::array::ArrayRef,
        ),
    ])
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// The progress events and the notes a stage sent.
struct Recorder(
    std::sync::Mutex<Vec<peftpipe::stages::Progress>>,
    std::sync::Mutex<Vec<String>>,
);

impl peftpipe::stages::ProgressSink for Recorder {
    fn progress(&self, progress: peftpipe::stages::Progress) {
        self.0.lock().unwrap().push(progress);
    }
    fn note(&self, message: String) {
        self.1.lock().unwrap().push(message);
    }
}

fn run_stage(
    project: &Path,
    upstream: &Path,
    out: &Path,
    yaml: &str,
) -> (peftpipe::stages::StageOutcome, usize) {
    match try_run_stage(project, upstream, out, yaml) {
        Ok(result) => result,
        Err(error) => panic!("the train stage failed: {error}"),
    }
}

fn try_run_stage(
    project: &Path,
    upstream: &Path,
    out: &Path,
    yaml: &str,
) -> Result<(peftpipe::stages::StageOutcome, usize), peftpipe::stages::StageError> {
    try_run_stage_noting(project, upstream, out, yaml).map(|(outcome, steps, _)| (outcome, steps))
}

/// [`try_run_stage`], also returning the notes the stage sent.
fn try_run_stage_noting(
    project: &Path,
    upstream: &Path,
    out: &Path,
    yaml: &str,
) -> Result<(peftpipe::stages::StageOutcome, usize, Vec<String>), peftpipe::stages::StageError> {
    let value: serde_json::Value = serde_norway::from_str(yaml).unwrap();
    let config: peftpipe::config::TrainConfig = serde_json::from_value(value).unwrap();
    let stage = peftpipe::stages::train::TrainStage::new(config);
    let upstream_map =
        std::collections::BTreeMap::from([("prompts".to_string(), upstream.to_path_buf())]);
    let recorder = Recorder(
        std::sync::Mutex::new(Vec::new()),
        std::sync::Mutex::new(Vec::new()),
    );
    let cancel = AtomicBool::new(false);
    let options = peftpipe::stages::RunOptions {
        device: Some("cpu".into()),
        ..Default::default()
    };
    let checkpoints = project.join("checkpoints");
    let ctx = peftpipe::stages::StageContext {
        name: "train",
        project_dir: project,
        out_dir: out,
        upstream: &upstream_map,
        seed: 42,
        progress: &recorder,
        cancel: &cancel,
        options: &options,
        fingerprint: "test fingerprint",
        upstream_outcomes: &Default::default(),
        inputs: &Default::default(),
        checkpoint_dir: Some(&checkpoints),
        resume: true,
    };
    let outcome = peftpipe::stages::Stage::run(&stage, &ctx)?;
    let steps = recorder.0.lock().unwrap().len();
    let notes = std::mem::take(&mut *recorder.1.lock().unwrap());
    Ok((outcome, steps, notes))
}

#[test]
fn train_stage_writes_a_loadable_peft_artifact() {
    let (project, upstream) = tiny_project();
    let rows: Vec<(String, String)> = (0..10)
        .map(|i| {
            (
                format!("w{} w{} w{}", 3 + i, 10 + i, 20 + i),
                format!("w{} w{}", 20 + i, 21 + i),
            )
        })
        .collect();
    write_pairs(&upstream.join("train.parquet"), &rows);
    let yaml = "data: prompts\nmodel: tiny-model\nmethod:\n  lora:\n    r: 2\n    alpha: 4\n    target_modules: [q_proj, v_proj]\nbatch_size: 4\nepochs: 2\ncheckpoint_every: 2\nlearning_rate: 0.01\n";
    let out = project.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (outcome, progress_events) = run_stage(project.path(), &upstream, &out, yaml);
    assert_eq!(outcome.summary["steps"], 6);
    assert_eq!(progress_events, 6);
    // 2 layers × (q: 2·(16+16) + v: 2·(16+8)) = 2 × 112.
    assert_eq!(outcome.summary["trainable_parameters"], 224);
    for file in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "summary.json",
        "base_model.json",
    ] {
        assert!(out.join(file).is_file(), "missing {file}");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in ["step", "loss", "lr", "grad_norm"] {
        assert!(first.get(key).is_some(), "metrics line lacks {key}");
    }
    // The artifact holds no timings (it is content-addressed); the outcome does.
    assert!(first.get("tokens_per_second").is_none(), "{first}");
    let summary = std::fs::read_to_string(out.join("summary.json")).unwrap();
    assert!(!summary.contains("wall_seconds"), "{summary}");
    assert!(!summary.contains("peak_memory"), "{summary}");
    assert!(outcome.summary["wall_seconds"].as_f64().unwrap() > 0.0);
    // The run's peak memory (the process's peak RSS on the CPU, where Linux lets it be reset).
    if std::path::Path::new("/proc/self/clear_refs").exists() {
        assert!(
            outcome.summary["peak_memory_bytes"].as_u64().unwrap_or(0) > 1 << 20,
            "{:?}",
            outcome.summary
        );
        assert_eq!(outcome.summary["peak_memory_source"], "process_rss");
    }
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("base_model.json")).unwrap())
            .unwrap();
    assert_eq!(base["model"], "tiny-model");
    // No path resolved on this machine: the artifact is the same in every checkout, and the
    // model as written resolves in each.
    assert!(base.get("path").is_none(), "{base}");
    let record = peftpipe::stages::export::BaseModelRecord::read(&out, project.path()).unwrap();
    assert!(record.path.join("config.json").is_file());
    // The checkpoints are gone once the artifact is complete.
    assert!(!project.path().join("checkpoints").exists());
    // The adapter loads back onto the model.
    let adapter = peftpipe::peft::load_adapter(&out.join("adapter"), &Device::Cpu).unwrap();
    let reloaded = ModelDir::open(&project.path().join("tiny-model"))
        .unwrap()
        .load(&Device::Cpu, DType::F32, adapter.linear_factory())
        .unwrap();
    adapter.finish_injection(reloaded.as_ref()).unwrap();
    // Same inputs, same seed: the same adapter bytes.
    let again = project.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    run_stage(project.path(), &upstream, &again, yaml);
    assert_eq!(
        std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap(),
        std::fs::read(again.join("adapter/adapter_model.safetensors")).unwrap()
    );
}

/// `truncation: right` with `max_seq_len` at or below a prompt's length cuts the whole
/// completion: such a row is truncated and, with nothing left to score, dropped (not counted as
/// a row without completion, which is what the data says), and the note says so.
#[test]
fn right_truncation_that_cuts_the_whole_completion_counts_as_truncated_and_dropped() {
    let (project, upstream) = tiny_project();
    let words = |from: usize, count: usize| -> String {
        (from..from + count)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut rows: Vec<(String, String)> = (0..3)
        // BOS + 8 prompt tokens: max_seq_len 9 leaves no completion token.
        .map(|i| (words(3 + i, 8), "w30 w31".to_string()))
        .collect();
    // BOS + 7 prompt tokens: one completion token is left.
    rows.push((words(10, 7), "w30 w31".into()));
    // Fits.
    rows.push((words(3, 2), "w30 w31".into()));
    // No completion in the data.
    rows.push((words(5, 1), String::new()));
    write_pairs(&upstream.join("train.parquet"), &rows);
    let yaml = "data: prompts\nmodel: tiny-model\nmethod: {lora: {r: 2, alpha: 4}}\n\
batch_size: 2\nmax_steps: 1\ncheckpoint_every: 0\nlearning_rate: 0.01\n\
add_eos: false\ntruncation: right\nmax_seq_len: 9\n";
    let out = project.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (_, _, notes) = try_run_stage_noting(project.path(), &upstream, &out, yaml)
        .unwrap_or_else(|error| panic!("the train stage failed: {error}"));
    let summary = read_json(&out.join("summary.json"));
    let counts = [
        "examples",
        "truncated_examples",
        "dropped_examples",
        "examples_without_completion",
    ]
    .map(|key| summary[key].as_u64().unwrap_or(u64::MAX));
    assert_eq!(counts, [2, 4, 3, 1], "{summary}");
    let note = notes
        .iter()
        .find(|note| note.contains("longer than 9 tokens"))
        .unwrap_or_else(|| panic!("no truncation note in {notes:?}"));
    assert_eq!(
        note,
        "4 of 6 examples were longer than 9 tokens: 4 cut (truncation: right), 3 dropped \
         (the cut left them no completion token to train on: use a max_seq_len above their \
         prompts, or truncation: prompt_left)"
    );
}

#[test]
fn a_warmup_as_long_as_the_run_is_said() {
    // Three epochs of 2 examples at batch 2: 3 optimizer steps, all inside a warmup of 5.
    let (project, upstream) = tiny_project();
    let rows: Vec<(String, String)> = vec![
        ("w3 w4".into(), " w30".into()),
        ("w5 w6".into(), " w31".into()),
    ];
    write_pairs(&upstream.join("train.parquet"), &rows);
    let run = |warmup: u32| -> Vec<String> {
        let yaml = format!(
            "data: prompts\nmodel: tiny-model\nmethod: {{lora: {{r: 2, alpha: 4}}}}\n\
batch_size: 2\nepochs: 3\nwarmup_steps: {warmup}\ncheckpoint_every: 0\nlearning_rate: 0.01\n"
        );
        let out = project.path().join(format!("out-{warmup}"));
        std::fs::create_dir_all(&out).unwrap();
        let (_, _, notes) = try_run_stage_noting(project.path(), &upstream, &out, &yaml)
            .unwrap_or_else(|error| panic!("the train stage failed: {error}"));
        notes
    };
    let notes = run(5);
    let note = notes
        .iter()
        .find(|note| note.contains("warmup_steps"))
        .unwrap_or_else(|| panic!("no warmup note in {notes:?}"));
    // Linear warmup: step 2 (0-based) of 5 uses 2/5 of the rate.
    assert_eq!(
        note,
        "warmup_steps 5 is not below the run's 3 optimizer steps: the learning rate rises the \
         whole run and never reaches learning_rate 0.01 (the last step uses 4.000e-3); lower \
         warmup_steps or train longer"
    );
    let notes = run(2);
    assert!(
        !notes.iter().any(|note| note.contains("warmup_steps")),
        "{notes:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// stories260k + bevostories.
// ---------------------------------------------------------------------------------------------

#[test]
fn lora_on_stories260k_lowers_bevostories_validation_perplexity() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let root = shared.join("models/stories260k");
    let (train_set, validation) = support::bevostories(&shared);
    let dir = ModelDir::open(&root).unwrap();
    let base = dir
        .load(
            &Device::Cpu,
            DType::F32,
            &peftpipe::models::FrozenLinearFactory,
        )
        .unwrap();
    let base_perplexity = support::perplexity(base.as_ref(), &Hooks::none(), &validation);

    let adapter = LoraAdapter::new(
        LoraSettings {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: TargetModules::AllLinear,
            use_rslora: false,
            fan_in_fan_out: false,
            seed: 0,
        },
        &Device::Cpu,
    )
    .unwrap();
    let model = dir.load(&Device::Cpu, DType::F32, &adapter).unwrap();
    adapter.finish_injection(model.as_ref()).unwrap();
    let settings = TrainerSettings {
        learning_rate: 5e-3,
        schedule: ScheduleKind::Constant,
        warmup_steps: 0,
        batch_size: 1,
        accumulation: 1,
        max_steps: Some(60),
        sort_by_length: false,
        pad_id: 0,
        ..trainer_settings(0)
    };
    let started = std::time::Instant::now();
    let outcome = train(
        &CompletionLoss(model.as_ref()),
        &adapter,
        &train_set,
        &settings,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    let adapted_perplexity = support::perplexity(model.as_ref(), &Hooks::none(), &validation);
    eprintln!(
        "stories260k + bevostories, LoRA r16 α32 all-linear ({} params), batch 1, lr 5e-3, 60 steps in {:.1}s: validation perplexity {base_perplexity:.2} → {adapted_perplexity:.2} (final train loss {:.3})",
        adapter.trainable_parameter_count(),
        started.elapsed().as_secs_f64(),
        outcome.final_loss
    );
    assert!(
        (base_perplexity - 13.37).abs() < 0.05,
        "base validation perplexity {base_perplexity} (documented 13.37)"
    );
    assert!(
        adapted_perplexity < 0.75 * base_perplexity,
        "{base_perplexity} → {adapted_perplexity}"
    );
}

/// `model: hf://org/name` trains on the snapshot the Hugging Face cache holds (a fake cache
/// here); base_model.json keeps the id and records the snapshot folder.
#[test]
fn train_stage_takes_a_hub_id_from_the_cache() {
    let project = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let hash = "5a4b3c2d1e0f5a4b3c2d1e0f5a4b3c2d1e0f5a4b";
    let repo = cache.path().join("models--org--tiny");
    let snapshot = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snapshot).unwrap();
    tiny_model_dir(&snapshot);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), hash).unwrap();
    // The only test of this binary that reads the Hub cache variable.
    std::env::set_var("HF_HUB_CACHE", cache.path());
    let upstream = project.path().join("prompts-artifact");
    std::fs::create_dir_all(&upstream).unwrap();
    let rows: Vec<(String, String)> = (0..4)
        .map(|i| (format!("w{} w{}", 3 + i, 10 + i), format!("w{}", 20 + i)))
        .collect();
    write_pairs(&upstream.join("train.parquet"), &rows);
    let yaml = "data: prompts\nmodel: hf://org/tiny\nmethod:\n  lora:\n    r: 2\nbatch_size: 4\nepochs: 1\n";
    let out = project.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (outcome, _) = run_stage(project.path(), &upstream, &out, yaml);
    // The record names the Hub id only; reading it finds the snapshot in the cache again.
    let record = peftpipe::stages::export::BaseModelRecord::read(&out, project.path());
    std::env::remove_var("HF_HUB_CACHE");
    assert_eq!(outcome.summary["steps"], 1);
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("base_model.json")).unwrap())
            .unwrap();
    assert_eq!(base["model"], "hf://org/tiny");
    assert!(base.get("path").is_none(), "{base}");
    assert_eq!(
        record.unwrap().path.canonicalize().unwrap(),
        snapshot.canonicalize().unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Evaluation during training: eval_steps, early stopping, keep best.
// ---------------------------------------------------------------------------------------------

/// A template artifact of bevostories (empty prompt, the story as the completion): `train` and
/// `eval` (the validation stories), and the stories260k model directory.
fn bevostories_artifact(shared: &Path, dir: &Path) {
    let read = |file: &str| -> Vec<(String, String)> {
        support::read_texts(&shared.join("datasets/bevostories").join(file))
            .into_iter()
            .map(|text| (String::new(), text))
            .collect()
    };
    write_pairs(&dir.join("train.parquet"), &read("train.parquet"));
    write_pairs(&dir.join("eval.parquet"), &read("validation.parquet"));
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn metrics_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Early stopping with a tiny patience stops the run; `keep: best` outputs the adapter of the
/// best evaluation, byte for byte the adapter of a run that stops at that step; `keep: last`
/// the adapter after the last step.
#[test]
fn early_stopping_keeps_the_best_adapter_on_stories260k() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let project = tempfile::tempdir().unwrap();
    let upstream = project.path().join("prompts-artifact");
    std::fs::create_dir_all(&upstream).unwrap();
    bevostories_artifact(&shared, &upstream);
    let model = shared.join("models/stories260k");
    // A constant learning rate: a run cut at step k trains exactly the first k steps of a longer
    // one. The learning rate is high enough that the held-out loss turns back up.
    let base = format!(
        "data: prompts\nmodel: {}\nmethod: {{lora: {{r: 4, alpha: 8, target_modules: all-linear}}}}\n\
         learning_rate: 0.02\nschedule: constant\nbatch_size: 4\nmax_seq_len: 96\ncheckpoint_every: 0\n",
        model.display()
    );
    let evaluating = format!(
        "{base}max_steps: 40\neval_steps: 2\neval_max_rows: 8\nearly_stopping: {{patience: 2}}\n"
    );
    let run = |name: &str, yaml: &str| {
        let out = project.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        let started = std::time::Instant::now();
        let (outcome, _) = run_stage(project.path(), &upstream, &out, yaml);
        eprintln!("{name}: {:.1}s", started.elapsed().as_secs_f64());
        (out, outcome)
    };
    let (best_out, outcome) = run("best", &evaluating);
    let summary = read_json(&best_out.join("summary.json"));
    let evaluation = &summary["evaluation"];
    eprintln!("{}", serde_json::to_string_pretty(evaluation).unwrap());
    assert_eq!(evaluation["stopped_early"], true, "{evaluation}");
    let stopped_at = summary["steps"].as_u64().unwrap();
    assert!(stopped_at < 40, "{summary}");
    assert_eq!(outcome.summary["early_stopped_at"], stopped_at);
    // Every second step evaluated; the best is the lowest eval_loss recorded.
    let lines = metrics_lines(&best_out);
    assert_eq!(lines.len() as u64, stopped_at);
    let evaluations: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|line| Some((line["step"].as_u64()?, line["eval_loss"].as_f64()?)))
        .collect();
    assert_eq!(
        evaluations.iter().map(|e| e.0).collect::<Vec<_>>(),
        (1..=stopped_at / 2).map(|k| 2 * k).collect::<Vec<_>>()
    );
    let (best_step, best_loss) =
        evaluations.iter().copied().fold(
            (0, f64::INFINITY),
            |best, e| if e.1 < best.1 { e } else { best },
        );
    assert_eq!(evaluation["best_step"], best_step);
    assert_eq!(evaluation["best_eval_loss"].as_f64(), Some(best_loss));
    assert_eq!(evaluation["kept_step"], best_step);
    // Patience 2: the last two evaluations did not improve on the best, which is not the first.
    assert_eq!(best_step, stopped_at - 4, "{evaluations:?}");
    assert!(best_step > 2, "{evaluations:?}");
    let first = lines[1]["eval_perplexity"].as_f64().unwrap();
    assert!((first - lines[1]["eval_loss"].as_f64().unwrap().exp()).abs() < 1e-9 * first);

    let adapter =
        |out: &Path| std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    let (cut_out, _) = run("cut", &format!("{base}max_steps: {best_step}\n"));
    assert_eq!(
        adapter(&best_out),
        adapter(&cut_out),
        "keep: best ≠ the step-{best_step} adapter"
    );
    let (last_out, last) = run("last", &format!("{evaluating}keep: last\n"));
    assert_eq!(last.summary["kept_step"], stopped_at);
    let (cut_last, _) = run("cut-last", &format!("{base}max_steps: {stopped_at}\n"));
    assert_eq!(adapter(&last_out), adapter(&cut_last));
    assert_ne!(adapter(&best_out), adapter(&last_out));
}

/// Train with evaluation (every step, keep best, early stopping) and return the saved adapter's
/// bytes with the outcome.
fn train_evaluating_once(
    weights: &HashMap<String, Tensor>,
    data: &[Sequence],
    held_out: &[Sequence],
    settings: &TrainerSettings,
    cancel_after: Option<u64>,
) -> (Result<TrainOutcome, TrainError>, Vec<u8>) {
    let run = setup(weights, settings.seed, 0.1);
    let cancel = AtomicBool::new(false);
    let evaluation = Evaluation {
        sequences: held_out,
        every: 1,
        batch_size: 4,
        early_stopping: Some(EarlyStopping {
            patience: 3,
            min_delta: 0.0,
        }),
        keep_best: true,
    };
    let result = train_with_evaluation(
        &CompletionLoss(&run.model),
        &run.adapter,
        data,
        Some(&evaluation),
        settings,
        &cancel,
        &mut |metrics| {
            if Some(metrics.step) == cancel_after {
                cancel.store(true, Ordering::Relaxed);
            }
        },
    );
    let dir = tempfile::tempdir().unwrap();
    run.adapter.save(dir.path(), "tiny").unwrap();
    (
        result,
        std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap(),
    )
}

/// The best evaluation so far, its adapter and the patience counter survive a resume: a run
/// cancelled after the best step and resumed ends as the uninterrupted one (same kept adapter,
/// same stop, same metrics).
#[test]
fn evaluation_state_survives_a_resume() {
    let config = ModelConfig::from_json(&tiny_llama_json()).unwrap();
    let weights = llama_weights(&config, 3, 0.3);
    let data = sequences(16, 4);
    // Held-out sequences of another pattern: once the training pattern is learned, their loss
    // goes back up.
    let held_out: Vec<Sequence> = sequences(8, 5)
        .into_iter()
        .map(|mut sequence| {
            let start = sequence.completion_start;
            sequence.ids[start + 1] = (sequence.ids[start] + 7) % 40;
            sequence
        })
        .collect();
    let mut settings = trainer_settings(9);
    settings.learning_rate = 0.05;
    settings.schedule = ScheduleKind::Constant;
    settings.max_steps = Some(40);
    settings.checkpoint_every = 2;
    let whole_dir = tempfile::tempdir().unwrap();
    settings.checkpoint_dir = Some(whole_dir.path().to_path_buf());
    let (whole, whole_bytes) = train_evaluating_once(&weights, &data, &held_out, &settings, None);
    let whole = whole.unwrap();
    let best = whole.evaluation.best_step.unwrap();
    eprintln!(
        "best step {best}, stopped after {} (early: {})",
        whole.steps, whole.stopped_early
    );
    assert!(whole.stopped_early);
    assert_eq!(whole.kept_step, best);
    assert!(best < whole.steps);
    // Cancel after the best step, before patience runs out; resume in a fresh process.
    let dir = tempfile::tempdir().unwrap();
    settings.checkpoint_dir = Some(dir.path().to_path_buf());
    let stop = best + 1;
    let (stopped, _) = train_evaluating_once(&weights, &data, &held_out, &settings, Some(stop));
    assert!(
        matches!(stopped, Err(TrainError::Cancelled { .. })),
        "{stopped:?}"
    );
    let (resumed, resumed_bytes) =
        train_evaluating_once(&weights, &data, &held_out, &settings, None);
    let resumed = resumed.unwrap();
    assert_eq!(resumed.resumed_from, Some(stop));
    assert_eq!(resumed.evaluation, whole.evaluation);
    assert_eq!(
        (resumed.steps, resumed.kept_step, resumed.stopped_early),
        (whole.steps, whole.kept_step, whole.stopped_early)
    );
    assert_eq!(resumed.metrics_jsonl, whole.metrics_jsonl);
    assert_eq!(
        resumed_bytes, whole_bytes,
        "the kept adapter differs after a resume"
    );
}

/// A temporary project with the tiny model in `tiny-model/` and an empty template artifact
/// folder `prompts-artifact/` (the second value) for the rows a test writes.
fn tiny_project() -> (tempfile::TempDir, std::path::PathBuf) {
    let project = tempfile::tempdir().unwrap();
    let model_dir = project.path().join("tiny-model");
    std::fs::create_dir_all(&model_dir).unwrap();
    tiny_model_dir(&model_dir);
    let upstream = project.path().join("prompts-artifact");
    std::fs::create_dir_all(&upstream).unwrap();
    (project, upstream)
}

/// The tiny model and a template artifact with `train` (10 rows) and `eval` (4 rows) splits.
fn tiny_project_with_eval() -> (tempfile::TempDir, std::path::PathBuf) {
    let (project, upstream) = tiny_project();
    let pairs = |range: std::ops::Range<usize>| -> Vec<(String, String)> {
        range
            .map(|i| {
                (
                    format!("w{} w{} w{}", 3 + i, 10 + i, 20 + i),
                    format!("w{} w{}", 20 + i, 21 + i),
                )
            })
            .collect()
    };
    write_pairs(&upstream.join("train.parquet"), &pairs(0..10));
    write_pairs(&upstream.join("eval.parquet"), &pairs(10..14));
    (project, upstream)
}

const TINY_EVALUATING: &str =
    "data: prompts\nmodel: tiny-model\nmethod: {lora: {r: 2, alpha: 4}}\n\
batch_size: 4\nmax_steps: 6\ncheckpoint_every: 0\nlearning_rate: 0.01\neval_steps: 2\n";

#[test]
fn a_missing_eval_split_names_the_split_and_the_splits_not_a_cache_path() {
    let (project, upstream) = tiny_project_with_eval();
    let out = project.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let yaml = format!("{TINY_EVALUATING}eval_split: validation\n");
    let error = try_run_stage(project.path(), &upstream, &out, &yaml)
        .map(|(outcome, _)| outcome.summary)
        .expect_err("no validation split");
    let message = error.to_string();
    assert!(
        message.contains("eval_split: stage `prompts` has no split `validation`"),
        "{message}"
    );
    assert!(!message.contains("validation.parquet"), "{message}");
    assert!(message.contains("its splits: eval, train"), "{message}");
}

/// `tensorboard: true` writes a deterministic event file (a rerun writes the same bytes), and
/// tests/python/check_tensorboard.py reads it with TensorBoard's own EventAccumulator and checks
/// every scalar against metrics.jsonl, when `PEFTPIPE_TENSORBOARD_PYTHON` (default `python3`)
/// can import tensorboard; that part is skipped with a printed reason otherwise.
#[test]
fn the_tensorboard_package_reads_the_event_file() {
    let (project, upstream) = tiny_project_with_eval();
    let yaml = format!("{TINY_EVALUATING}tensorboard: true\n");
    let mut events = Vec::new();
    let mut outs = Vec::new();
    for name in ["first", "again"] {
        let out = project.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        run_stage(project.path(), &upstream, &out, &yaml);
        events.push(std::fs::read(out.join(peftpipe::train::tensorboard::EVENTS_FILE)).unwrap());
        outs.push(out);
    }
    assert_eq!(
        events[0], events[1],
        "the event file differs between two runs"
    );
    // Without the option, no event file.
    let plain = project.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    run_stage(project.path(), &upstream, &plain, TINY_EVALUATING);
    assert!(!plain.join("tensorboard").exists());

    let python = std::env::var("PEFTPIPE_TENSORBOARD_PYTHON").unwrap_or_else(|_| "python3".into());
    let importable = std::process::Command::new(&python)
        .args([
            "-c",
            "import tensorboard.backend.event_processing.event_accumulator",
        ])
        .output()
        .is_ok_and(|output| output.status.success());
    if !importable {
        eprintln!(
            "skipped the TensorBoard reader: `{python}` cannot import tensorboard (pip install \
             tensorboard, or set PEFTPIPE_TENSORBOARD_PYTHON to a Python that has it)"
        );
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_tensorboard.py");
    let output = std::process::Command::new(&python)
        .arg(script)
        .arg(&outs[0])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "check_tensorboard.py failed:\n{stdout}{stderr}"
    );
    assert!(stdout.contains("ok:"), "{stdout}");
    assert!(stdout.contains("eval/loss: 3"), "{stdout}");
}

// ---- the train stage's job on several ranks (issue 12) ------------------------------------------

/// A tiny project (model + `prompts-artifact/train.parquet`) and a train job on it.
fn tiny_job(project: &Path, yaml: &str) -> peftpipe::stages::train::TrainJob {
    let model_dir = project.join("tiny-model");
    std::fs::create_dir_all(&model_dir).unwrap();
    tiny_model_dir(&model_dir);
    let upstream = project.join("prompts-artifact");
    std::fs::create_dir_all(&upstream).unwrap();
    let rows: Vec<(String, String)> = (0..12)
        .map(|i| {
            (
                format!("w{} w{} w{}", 3 + i, 10 + i, 20 + i),
                format!("w{} w{}", 20 + i, 21 + i),
            )
        })
        .collect();
    write_pairs(&upstream.join("train.parquet"), &rows);
    let value: serde_json::Value = serde_norway::from_str(yaml).unwrap();
    peftpipe::stages::train::TrainJob {
        config: serde_json::from_value(value).unwrap(),
        device: "cpu".into(),
        project_dir: project.to_path_buf(),
        upstream_dir: upstream,
        out_dir: project.join("out"),
        fingerprint: "test fingerprint".into(),
        stage_seed: 42,
        checkpoint_dir: None,
        model_files: Default::default(),
    }
}

/// Stops a rank after the step `stop_after` (each rank its own flag, so every rank stops at the
/// same step boundary).
struct StopAfter {
    stop_after: Option<u64>,
    cancel: AtomicBool,
}

impl peftpipe::stages::ProgressSink for StopAfter {
    fn progress(&self, progress: peftpipe::stages::Progress) {
        if Some(progress.position) == self.stop_after {
            self.cancel.store(true, Ordering::Relaxed);
        }
    }
    fn note(&self, _message: String) {}
}

/// Rank 0's outcome summary of a train job, or its error.
type RankOutcome = Result<std::collections::BTreeMap<String, serde_json::Value>, String>;

/// Run `job` as `world_size` in-process ranks (threads, [`LocalGroup`]); each stops after
/// `stop_after` steps when given. Returns rank 0's result and every rank's adapter values.
fn job_on_ranks(
    job: &peftpipe::stages::train::TrainJob,
    world_size: usize,
    stop_after: Option<u64>,
) -> (RankOutcome, Vec<Vec<u32>>) {
    use peftpipe::train::distributed::local::LocalGroup;
    std::fs::create_dir_all(&job.out_dir).unwrap();
    let ranks = LocalGroup::new(world_size, std::time::Duration::from_secs(60));
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|comm| {
                scope.spawn(move || {
                    let sink = StopAfter {
                        stop_after,
                        cancel: AtomicBool::new(false),
                    };
                    let result =
                        peftpipe::stages::train::train_job(job, &comm, &sink, &sink.cancel)
                            .map_err(|error| error.to_string());
                    drop(comm);
                    result
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut results = results.into_iter();
    let first = results.next().unwrap();
    // Rank 0 wrote the adapter; every rank trained the same one (checked by the trainer's own
    // data-parallel test bit for bit), so the artifact's values stand for all.
    let values = match &first {
        Ok(_) => {
            let tensors = candle_core::safetensors::load(
                job.out_dir.join("adapter/adapter_model.safetensors"),
                &Device::Cpu,
            )
            .unwrap();
            let mut names: Vec<_> = tensors.keys().cloned().collect();
            names.sort();
            names
                .iter()
                .map(|name| {
                    tensors[name]
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect()
                })
                .collect()
        }
        Err(_) => Vec::new(),
    };
    for other in results {
        assert!(
            other.is_ok() == first.is_ok(),
            "ranks disagree: {other:?} vs {first:?}"
        );
    }
    (first, values)
}

fn losses(out: &Path) -> Vec<f64> {
    metrics_lines(out)
        .iter()
        .map(|line| line["loss"].as_f64().unwrap())
        .collect()
}

fn close(a: &[Vec<u32>], b: &[Vec<u32>], tolerance: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (x, y) in x.iter().zip(y) {
            worst = worst.max((f32::from_bits(*x) - f32::from_bits(*y)).abs());
        }
    }
    assert!(worst < tolerance, "adapters differ by {worst}");
    worst
}

const RANK_YAML: &str = "data: prompts\nmodel: tiny-model\nmethod:\n  lora:\n    r: 2\n    alpha: 4\n    target_modules: [q_proj, v_proj]\nbatch_size: 4\nmax_steps: 6\ncheckpoint_every: 1\nlearning_rate: 0.01\ndevice: cpu\n";

#[test]
fn the_train_stage_on_two_ranks_matches_one_rank() {
    let one = tempfile::tempdir().unwrap();
    let job = tiny_job(one.path(), RANK_YAML);
    let (summary, single) = job_on_ranks(&job, 1, None);
    let summary = summary.unwrap();
    assert_eq!(summary["steps"], 6);
    let two = tempfile::tempdir().unwrap();
    let job2 = tiny_job(two.path(), RANK_YAML);
    let (summary2, double) = job_on_ranks(&job2, 2, None);
    assert_eq!(summary2.unwrap()["steps"], 6);
    // The same global batch of 4 split 2 + 2: the same loss curve and adapter, up to the order
    // of the floating-point sums.
    for (a, b) in losses(&job.out_dir).iter().zip(losses(&job2.out_dir)) {
        assert!((a - b).abs() < 1e-5 * a.abs().max(1.0), "{a} vs {b}");
    }
    let worst = close(&single, &double, 1e-5);
    eprintln!("2 ranks vs 1: adapter max |Δ| {worst:e}");
}

#[test]
fn a_run_resumes_on_another_number_of_ranks() {
    let reference = tempfile::tempdir().unwrap();
    let job = tiny_job(reference.path(), RANK_YAML);
    let (_, uninterrupted) = job_on_ranks(&job, 1, None);
    let expected = losses(&job.out_dir);
    for (first, second) in [(2, 1), (1, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let mut job = tiny_job(dir.path(), RANK_YAML);
        job.checkpoint_dir = Some(dir.path().join("checkpoints"));
        let (stopped, _) = job_on_ranks(&job, first, Some(3));
        assert!(
            stopped
                .as_ref()
                .is_err_and(|error| error.contains("cancel")),
            "{stopped:?}"
        );
        let (resumed, adapter) = job_on_ranks(&job, second, None);
        let resumed = resumed.unwrap();
        assert_eq!(
            resumed["resumed_from"], 3,
            "{first} → {second} ranks: {resumed:?}"
        );
        for (a, b) in expected.iter().zip(losses(&job.out_dir)) {
            assert!((a - b).abs() < 1e-5 * a.abs().max(1.0), "{a} vs {b}");
        }
        let worst = close(&uninterrupted, &adapter, 1e-5);
        eprintln!("{first} ranks, resumed on {second}: adapter max |Δ| {worst:e}");
    }
}
