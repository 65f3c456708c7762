//! Prompt and prefix tuning's virtual tokens take positions of the model's context (PEFT's prompt
//! embeddings are prepended to the input; its prefix is `past_key_values`, so the real tokens'
//! positions start after it). On GPT-2, whose 128 learned positions are a hard limit, training,
//! evaluation and generation must fit the real tokens into what the virtual ones leave, and
//! `validate` must refuse virtual tokens that leave nothing (PEFTPIPE_SHARED: tiny-gpt2-random,
//! bevostories, whose stories are longer than 128 tokens).
#![expect(clippy::print_stderr, reason = "tests print why they skip")]

mod support;

use std::path::Path;
use std::process::Output;

use support::{peftpipe, shared_dir};

fn pipeline(method: &str) -> String {
    format!(
        r#"name: virtual
seed: 5
stages:
  data:
    ingest:
      path: ${{PEFTPIPE_SHARED}}/datasets/bevostories/validation.parquet
      limit: 12
      split: {{counts: {{eval: 4}}}}
  stories:
    template:
      input: data
      prompt: ""
      completion: "{{{{ text }}}}"
  train:
    train:
      data: stories
      model: ${{PEFTPIPE_SHARED}}/models/tiny-gpt2-random
      method: {method}
      batch_size: 2
      max_steps: 2
      add_eos: false
      device: cpu
  evaluate:
    evaluate:
      model: train
      data: stories
      samples: 1
      sample_max_new_tokens: 200
      device: cpu
  export:
    export:
      from: train
      adapter: out/adapter
"#
    )
}

fn run_in(dir: &Path, shared: &Path, args: &[&str]) -> Output {
    peftpipe()
        .args(args)
        .current_dir(dir)
        .env("PEFTPIPE_SHARED", shared)
        .env_remove("PEFTPIPE_CACHE_DIR")
        .env("NO_COLOR", "1")
        .output()
        .expect("run peftpipe")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn gpt2_prompt_and_prefix_tuning_fit_the_real_tokens_after_the_virtual_ones() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    for method in [
        "{prompt_tuning: {num_virtual_tokens: 8}}",
        "{prefix_tuning: {num_virtual_tokens: 8, prefix_projection: true, encoder_hidden_size: 16}}",
    ] {
        let project = tempfile::tempdir().unwrap();
        std::fs::write(project.path().join("p.yaml"), pipeline(method)).unwrap();
        let output = run_in(project.path(), &shared, &["run", "p.yaml", "--no-report"]);
        assert!(output.status.success(), "{method}:\n{}", text(&output));

        // Generation stops at the context the virtual tokens leave, cleanly, with its text.
        let model = shared.join("models/tiny-gpt2-random");
        let output = run_in(
            project.path(),
            &shared,
            &[
                "generate",
                model.to_str().unwrap(),
                "--adapter",
                "out/adapter",
                "--prompt",
                "Once upon a time",
                "--max-new-tokens",
                "200",
            ],
        );
        assert!(output.status.success(), "{method}:\n{}", text(&output));
        assert!(
            text(&output).contains("context length reached"),
            "{method}:\n{}",
            text(&output)
        );
    }
}

#[test]
fn validate_refuses_virtual_tokens_that_fill_the_context() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    for (method, key) in [
        (
            "{prompt_tuning: {num_virtual_tokens: 128}}",
            "method.prompt_tuning.num_virtual_tokens",
        ),
        (
            "{prefix_tuning: {num_virtual_tokens: 200}}",
            "method.prefix_tuning.num_virtual_tokens",
        ),
    ] {
        let project = tempfile::tempdir().unwrap();
        std::fs::write(project.path().join("p.yaml"), pipeline(method)).unwrap();
        let output = run_in(project.path(), &shared, &["validate", "p.yaml"]);
        assert!(!output.status.success(), "{method}: validate passed");
        let message = text(&output);
        assert!(
            message.contains(key) && message.contains("128"),
            "{method}:\n{message}"
        );
    }
    // 120 leaves 8 positions: valid (126 leaves 2, too few: see the method's unit test).
    let project = tempfile::tempdir().unwrap();
    std::fs::write(
        project.path().join("p.yaml"),
        pipeline("{prompt_tuning: {num_virtual_tokens: 120}}"),
    )
    .unwrap();
    let output = run_in(project.path(), &shared, &["validate", "p.yaml"]);
    assert!(output.status.success(), "{}", text(&output));
}
