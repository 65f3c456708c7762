//! Logit parity of our Llama and GPT-2 with Hugging Face transformers on the shared tiny models,
//! plus the measured facts about stories260k (perplexity of a fixed sentence, greedy generation).
//! Needs `PEFTPIPE_SHARED` (skips with a printed reason when it is unset).
#![expect(
    clippy::print_stderr,
    reason = "tests print skip reasons and the measured errors"
)]

mod support;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use peftpipe::models::generate::{greedy, GreedyOptions};
use peftpipe::models::{CausalLm, FrozenLinearFactory, Hooks, ModelDir};
use peftpipe::ops::next_token_cross_entropy;
use support::{masked_max_abs, shared_dir, TestResult};

fn load(dir: &std::path::Path) -> Result<Box<dyn CausalLm>, Box<dyn std::error::Error>> {
    Ok(ModelDir::open(dir)?.load(&Device::Cpu, DType::F32, &FrozenLinearFactory)?)
}

fn check_reference_logits(model_dir: PathBuf, reference: PathBuf, name: &str) -> TestResult {
    let model = load(&model_dir)?;
    let tensors = candle_core::safetensors::load(&reference, &Device::Cpu)?;
    let input_ids = &tensors["input_ids"];
    let attention_mask = &tensors["attention_mask"];
    let logits = model.forward(input_ids, Some(attention_mask), &Hooks::none())?;
    assert_eq!(logits.dims(), tensors["logits"].dims());
    let error = masked_max_abs(&logits, &tensors["logits"], attention_mask)?;
    eprintln!("{name}: max abs logit error vs transformers = {error:e}");
    assert!(error < 1e-4, "{name}: max abs error {error} ≥ 1e-4");
    Ok(())
}

#[test]
fn stories260k_logits_match_transformers() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let dir = shared.join("models/stories260k");
    check_reference_logits(
        dir.clone(),
        dir.join("reference/base_logits.safetensors"),
        "stories260k",
    )
}

#[test]
fn tiny_gpt2_logits_match_transformers() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let dir = shared.join("models/tiny-gpt2-random");
    check_reference_logits(
        dir.clone(),
        dir.join("reference_logits.safetensors"),
        "tiny-gpt2-random",
    )
}

/// Left padding gives the real tokens the same logits as right padding (positions from the mask).
#[test]
fn left_padding_matches_right_padding() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    for name in ["stories260k", "tiny-gpt2-random"] {
        let model = load(&shared.join("models").join(name))?;
        let prompt: Vec<u32> = vec![1, 403, 407, 261, 378, 300];
        let right = Tensor::new(&[[1u32, 403, 407, 261, 378, 300, 0, 0]], &Device::Cpu)?;
        let right_mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 0, 0]], &Device::Cpu)?;
        let left = Tensor::new(&[[0u32, 0, 1, 403, 407, 261, 378, 300]], &Device::Cpu)?;
        let left_mask = Tensor::new(&[[0u32, 0, 1, 1, 1, 1, 1, 1]], &Device::Cpu)?;
        let right_logits = model.forward(&right, Some(&right_mask), &Hooks::none())?;
        let left_logits = model.forward(&left, Some(&left_mask), &Hooks::none())?;
        let n = prompt.len();
        let difference = (right_logits.narrow(1, 0, n)? - left_logits.narrow(1, 2, n)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(
            difference < 1e-5,
            "{name}: left vs right padding differ by {difference}"
        );
    }
    Ok(())
}

#[test]
fn stories260k_perplexity_of_the_fox_sentence() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let dir = ModelDir::open(&shared.join("models/stories260k"))?;
    let tokenizer = dir.tokenizer()?;
    let model = dir.load(&Device::Cpu, DType::F32, &FrozenLinearFactory)?;
    let ids = tokenizer.encode(
        "One day, a clever fox found a shiny key under the old oak tree.",
        true,
    )?;
    assert_eq!(ids.first(), Some(&1), "BOS is added");
    let length = ids.len();
    let input = Tensor::from_vec(ids, (1, length), &Device::Cpu)?;
    let logits = model.forward(&input, None, &Hooks::none())?;
    let loss_mask = Tensor::ones((1, length), DType::U32, &Device::Cpu)?;
    let loss = next_token_cross_entropy(&logits, &input, &loss_mask)?;
    let sum = loss.sum.to_scalar::<f32>()?;
    let perplexity = loss.perplexity()?;
    eprintln!(
        "stories260k fox sentence: summed NLL {sum:.4} over {} tokens, perplexity {perplexity:.4}",
        loss.count
    );
    assert_eq!(loss.count, 34);
    assert!((sum - 54.404).abs() < 5e-3, "summed NLL {sum}");
    assert!((perplexity - 4.954).abs() < 5e-4, "perplexity {perplexity}");
    Ok(())
}

#[test]
fn stories260k_greedy_generation_with_and_without_cache() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let dir = ModelDir::open(&shared.join("models/stories260k"))?;
    let tokenizer = dir.tokenizer()?;
    let model = dir.load(&Device::Cpu, DType::F32, &FrozenLinearFactory)?;
    let prompt = tokenizer.encode("Once upon a time", true)?;
    let mut options = GreedyOptions {
        max_new_tokens: 40,
        stop_token_ids: tokenizer.eos_token_ids.clone(),
        use_cache: true,
        pad_token_id: 0,
    };
    let cached = greedy(
        model.as_ref(),
        std::slice::from_ref(&prompt),
        &Hooks::none(),
        &options,
    )?;
    options.use_cache = false;
    let uncached = greedy(
        model.as_ref(),
        std::slice::from_ref(&prompt),
        &Hooks::none(),
        &options,
    )?;
    assert_eq!(cached, uncached, "the KV cache changes greedy decoding");
    let mut all = prompt;
    all.extend(&cached[0].tokens);
    let text = tokenizer.decode(&all, true)?;
    eprintln!("stories260k greedy: {text:?}");
    let expected =
        "Once upon a time, there was a little girl named Lily. She loved to play outside \
                    in the park. One day, she saw a big, red ball.";
    assert!(text.starts_with(expected), "generated {text:?}");
    Ok(())
}

/// A batch of prompts of different lengths (left-padded) decodes each row as it would alone.
#[test]
fn batched_greedy_equals_single_prompts() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let dir = ModelDir::open(&shared.join("models/stories260k"))?;
    let tokenizer = dir.tokenizer()?;
    let model = dir.load(&Device::Cpu, DType::F32, &FrozenLinearFactory)?;
    let prompts = vec![
        tokenizer.encode("Once upon a time", true)?,
        tokenizer.encode("Tom and his mom went to the store", true)?,
    ];
    let options = GreedyOptions {
        max_new_tokens: 12,
        stop_token_ids: tokenizer.eos_token_ids.clone(),
        use_cache: true,
        pad_token_id: 0,
    };
    let batched = greedy(model.as_ref(), &prompts, &Hooks::none(), &options)?;
    for (prompt, together) in prompts.iter().zip(&batched) {
        let alone = greedy(
            model.as_ref(),
            std::slice::from_ref(prompt),
            &Hooks::none(),
            &options,
        )?;
        assert_eq!(&alone[0], together);
    }
    Ok(())
}

/// Our hooks reproduce PEFT's prompt-based methods on stories260k: each reference adapter, fed
/// through [`Hooks`] with the frozen base model, gives PEFT's logits.
fn check_hooks_parity(
    method: &str,
    hooks: impl Fn(&std::collections::HashMap<String, Tensor>) -> candle_core::Result<Hooks>,
    virtual_tokens: usize,
) -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let dir = shared.join("models/stories260k");
    let model = load(&dir)?;
    let base = candle_core::safetensors::load(
        dir.join("reference/base_logits.safetensors"),
        &Device::Cpu,
    )?;
    let adapter_dir = dir.join("reference").join(format!("peft_{method}"));
    let adapter = candle_core::safetensors::load(
        adapter_dir.join("adapter_model.safetensors"),
        &Device::Cpu,
    )?;
    let expected = candle_core::safetensors::load(
        adapter_dir.join("expected_logits.safetensors"),
        &Device::Cpu,
    )?;
    let mask = &base["attention_mask"];
    let logits = model.forward(&base["input_ids"], Some(mask), &hooks(&adapter)?)?;
    assert_eq!(logits.dims(), expected["logits"].dims());
    let full_mask = if virtual_tokens > 0 {
        let ones = Tensor::ones((mask.dim(0)?, virtual_tokens), mask.dtype(), &Device::Cpu)?;
        Tensor::cat(&[&ones, mask], 1)?
    } else {
        mask.clone()
    };
    let error = masked_max_abs(&logits, &expected["logits"], &full_mask)?;
    eprintln!("stories260k + PEFT {method}: max abs logit error = {error:e}");
    assert!(error < 1e-4, "{method}: max abs error {error}");
    Ok(())
}

#[test]
fn prompt_tuning_hook_matches_peft() -> TestResult {
    check_hooks_parity(
        "prompt_tuning",
        |adapter| {
            Ok(Hooks {
                input_prefix: Some(adapter["prompt_embeddings"].unsqueeze(0)?),
                ..Hooks::default()
            })
        },
        8,
    )
}

#[test]
fn prefix_tuning_hook_matches_peft() -> TestResult {
    check_hooks_parity(
        "prefix_tuning",
        |adapter| {
            // PEFT: [n, L·2·kv_dim] → view(n, 2L, kv_heads, head_dim) → per layer (2i: key, 2i+1: value).
            let (layers, kv_heads, head_dim) = (5, 4, 8);
            let table = &adapter["prompt_embeddings"];
            let n = table.dim(0)?;
            let table = table.reshape((n, 2 * layers, kv_heads, head_dim))?;
            let per_layer = (0..layers)
                .map(|layer| {
                    let pick = |index: usize| -> candle_core::Result<Tensor> {
                        table
                            .narrow(1, index, 1)?
                            .squeeze(1)?
                            .transpose(0, 1)?
                            .unsqueeze(0)
                    };
                    Ok((pick(2 * layer)?, pick(2 * layer + 1)?))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Hooks {
                layer_prefix: Some(per_layer),
                ..Hooks::default()
            })
        },
        0,
    )
}

#[test]
fn adaption_prompt_hook_matches_peft() -> TestResult {
    check_hooks_parity(
        "adaption_prompt",
        |adapter| {
            let mut hooks = Hooks::default();
            for layer in 2..5 {
                let key =
                    |name: &str| format!("base_model.model.model.layers.{layer}.self_attn.{name}");
                hooks.adapters.insert(
                    layer,
                    peftpipe::models::AdapterPrompt {
                        prompt: adapter[&key("adaption_prompt")].squeeze(0)?,
                        gate: adapter[&key("adaption_gate")].clone(),
                    },
                );
            }
            Ok(hooks)
        },
        0,
    )
}
