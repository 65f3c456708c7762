//! Batched decoding (`peftpipe generate --input`) gives every prompt the tokens it gets alone:
//! prompts of different lengths, left-padded into one batch, on stories260k (Llama) with and
//! without each of its reference PEFT adapters (LoRA, prefix tuning, prompt tuning, LLaMA-Adapter)
//! and on the tiny GPT-2 with and without a LoRA adapter; greedy and seeded sampling; rows that
//! finish early leave the batch (the KV cache shrinks) without changing the others. Needs
//! `PEFTPIPE_SHARED` (skips with a printed reason).
#![expect(clippy::print_stderr, reason = "tests print why they skip")]

mod support;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use peftpipe::infer::generate::{generate, generate_batch, GenerationSettings};
use peftpipe::infer::session::{generate_many, generate_one, GenerateRequest, InferenceModel};
use peftpipe::infer::{Sampling, TextCodec};
use peftpipe::models::ModelDir;
use peftpipe::peft::{Adapter, LoraAdapter, LoraSettings, TargetModules};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use support::{shared_dir, TestResult};

/// Prompts from one word to a long sentence, so the batch has much padding.
const PROMPTS: [&str; 5] = [
    "Once",
    "Tom and his mom went to the store to buy some",
    "The sun",
    "Once upon a time, there was a little girl named Lily. She",
    "A big dog",
];

const SAMPLED: Sampling = Sampling::Random {
    temperature: 0.9,
    top_p: 0.95,
    seed: 5,
};

fn load(model: &Path, adapter: Option<&Path>) -> InferenceModel {
    InferenceModel::load(model, adapter, None, &Device::Cpu, DType::F32)
        .unwrap_or_else(|message| panic!("{message}"))
}

/// Each prompt alone, then all at once and in batches of 2: the same tokens, stop reasons and
/// text, greedy and sampled.
fn batched_equals_alone(model: &InferenceModel, what: &str) -> TestResult {
    let prompts: Vec<String> = PROMPTS.iter().map(|p| p.to_string()).collect();
    for sampling in [Sampling::Greedy, SAMPLED] {
        let alone = prompts
            .iter()
            .map(|prompt| {
                generate_one(
                    model,
                    &GenerateRequest {
                        prompt: prompt.clone(),
                        max_new_tokens: 24,
                        sampling,
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        assert!(
            alone.iter().all(|output| !output.token_ids.is_empty()),
            "{what}: every prompt generates"
        );
        let together = generate_many(model, &prompts, 24, sampling).map_err(|e| e.message)?;
        assert_eq!(together, alone, "{what}, {sampling:?}: one batch of 5");
        let mut pairs = Vec::new();
        for chunk in prompts.chunks(2) {
            pairs.extend(generate_many(model, chunk, 24, sampling).map_err(|e| e.message)?);
        }
        assert_eq!(pairs, alone, "{what}, {sampling:?}: batches of 2");
    }
    // Rows that stop at different steps leave the batch; the rest go on as alone.
    let language_model = model.language_model();
    let encoded = prompts
        .iter()
        .map(|prompt| model.tokenizer.encode_prompt(prompt))
        .collect::<Result<Vec<_>, _>>()?;
    let settings = GenerationSettings {
        max_new_tokens: 20,
        sampling: Sampling::Greedy,
        eos_token_ids: model.tokenizer.eos_token_ids.clone(),
        max_length: Some(model.max_length()),
    };
    let budget = |row: usize| 2 + 4 * row;
    let batched = generate_batch(&language_model, &encoded, &settings, |row, tokens| {
        tokens.len() >= budget(row)
    })?;
    for (row, (prompt, together)) in encoded.iter().zip(&batched).enumerate() {
        let alone = generate(&language_model, prompt, &settings, |tokens| {
            tokens.len() >= budget(row)
        })?;
        assert_eq!(together, &alone, "{what}: row {row} with its own stop");
    }
    Ok(())
}

#[test]
fn stories260k_batches_decode_like_single_prompts_with_and_without_adapters() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let root = shared.join("models/stories260k");
    batched_equals_alone(&load(&root, None), "stories260k")?;
    for adapter in [
        "peft_lora",
        "peft_prefix_tuning",
        "peft_prompt_tuning",
        "peft_adaption_prompt",
    ] {
        let dir = root.join("reference").join(adapter);
        batched_equals_alone(&load(&root, Some(&dir)), adapter)?;
    }
    Ok(())
}

#[test]
fn tiny_gpt2_batches_decode_like_single_prompts_with_and_without_lora() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let root = shared.join("models/tiny-gpt2-random");
    batched_equals_alone(&load(&root, None), "tiny-gpt2")?;

    // The random GPT-2's greedy text is one token repeated (near-uniform logits), so the base
    // model above is checked mostly by sampling; a LoRA adapter on c_attn with large lora_B
    // values (saved in PEFT format) makes greedy decoding follow varied tokens.
    let adapter = LoraAdapter::new(
        LoraSettings {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: TargetModules::default_for("gpt2")?,
            use_rslora: false,
            fan_in_fan_out: true,
            seed: 3,
        },
        &Device::Cpu,
    )?;
    let dir = ModelDir::open(&root)?;
    let model = dir.load(&Device::Cpu, DType::F32, &adapter)?;
    adapter.finish_injection(model.as_ref())?;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (name, var) in adapter.trainable_vars() {
        if name.ends_with("lora_B.weight") {
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| (rng.random::<f32>() - 0.5) * 8.0)
                .collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
        }
    }
    let saved = tempfile::tempdir()?;
    adapter.save(saved.path(), "tiny-gpt2-random")?;
    let adapted = load(&root, Some(saved.path()));
    let prompt = GenerateRequest {
        prompt: PROMPTS[1].to_string(),
        max_new_tokens: 24,
        sampling: Sampling::Greedy,
    };
    let tokens = generate_one(&adapted, &prompt)?.token_ids;
    assert_ne!(
        tokens,
        generate_one(&load(&root, None), &prompt)?.token_ids,
        "the adapter changes the generation (else the test proves nothing)"
    );
    let distinct: std::collections::BTreeSet<u32> = tokens.iter().copied().collect();
    assert!(
        distinct.len() > 3,
        "greedy text of the adapted model: {tokens:?}"
    );
    batched_equals_alone(&adapted, "tiny-gpt2 + LoRA")
}
