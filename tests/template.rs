//! The template stage on small generated splits in temp dirs: prompt/completion/text output,
//! strict-undefined errors naming row and variable, few-shot draws (never the row itself, never
//! evaluation rows), chat templates (Llama-3 and ChatML style) against hand-written strings,
//! template files with macros, and the quickstart tokenizer.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use peftpipe::config::{StageConfig, TemplateConfig};
use peftpipe::data::chat::{ChatTemplate, ChatTemplateSource, Message};
use peftpipe::stages::{self, NullSink, RunOptions, StageContext, StageError, StageOutcome};

fn write_split(path: &Path, ids: std::ops::Range<i64>) {
    let texts: Vec<Option<String>> = ids
        .clone()
        .map(|i| {
            if i == 1002 {
                None
            } else {
                Some(format!("text {i}"))
            }
        })
        .collect();
    let labels: Vec<&str> = ids
        .clone()
        .map(|i| if i % 2 == 0 { "positive" } else { "negative" })
        .collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("text", DataType::Utf8, true),
        Field::new("label", DataType::Utf8, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ids.collect::<Vec<_>>())),
        Arc::new(StringArray::from(texts)),
        Arc::new(StringArray::from(labels)),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// An input artifact with train ids 0..40 and eval ids 1000..1010 (row 1002's text is null).
fn input_artifact(dir: &Path) -> std::path::PathBuf {
    let input = dir.join("data");
    std::fs::create_dir_all(&input).unwrap();
    write_split(&input.join("train.parquet"), 0..40);
    write_split(&input.join("eval.parquet"), 1000..1010);
    input
}

fn config(yaml: &str) -> TemplateConfig {
    let value: serde_json::Value = serde_norway::from_str(yaml).unwrap();
    serde_json::from_value(value).unwrap()
}

fn run(
    config: &TemplateConfig,
    project: &Path,
    input: &Path,
    out: &Path,
) -> Result<(), StageError> {
    run_with(
        config,
        project,
        input,
        out,
        &RunOptions::default(),
        &AtomicBool::new(false),
    )
    .map(|_| ())
}

fn run_with(
    config: &TemplateConfig,
    project: &Path,
    input: &Path,
    out: &Path,
    options: &RunOptions,
    cancel: &AtomicBool,
) -> Result<StageOutcome, StageError> {
    std::fs::create_dir_all(out).unwrap();
    let upstream: BTreeMap<String, std::path::PathBuf> =
        [("data".to_string(), input.to_path_buf())].into();
    let ctx = StageContext {
        name: "prompts",
        project_dir: project,
        out_dir: out,
        upstream: &upstream,
        seed: 7,
        progress: &NullSink,
        cancel,
        options,
        fingerprint: "",
        upstream_outcomes: &Default::default(),
        inputs: &Default::default(),
        checkpoint_dir: None,
        resume: true,
    };
    stages::build(&StageConfig::Template(config.clone())).run(&ctx)
}

fn read(path: &Path, name: &str) -> Vec<Option<String>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let mut values = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let array = batch.column(batch.schema().index_of(name).unwrap());
        let text = arrow::compute::cast(array, &DataType::Utf8).unwrap();
        let text = text.as_any().downcast_ref::<StringArray>().unwrap();
        values.extend(text.iter().map(|v| v.map(str::to_string)));
    }
    values
}

#[test]
fn rows_render_into_prompt_completion_and_text_with_the_label_carried() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_artifact(dir.path());
    let out = dir.path().join("out");
    let config = config(
        "input: data\nprompt: \"review: {{ text if text else 'empty' }}\\nsentiment:\"\ncompletion: \" {{ label }}\"\nlabel: label\n",
    );
    run(&config, dir.path(), &input, &out).unwrap();
    let train = out.join("train.parquet");
    assert_eq!(
        read(&train, "prompt")[3].as_deref(),
        Some("review: text 3\nsentiment:")
    );
    assert_eq!(read(&train, "completion")[3].as_deref(), Some(" negative"));
    assert_eq!(
        read(&train, "text")[3].as_deref(),
        Some("review: text 3\nsentiment: negative")
    );
    assert_eq!(read(&train, "label")[3].as_deref(), Some("negative"));
    assert_eq!(
        read(&out.join("eval.parquet"), "prompt")[2].as_deref(),
        Some("review: empty\nsentiment:")
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("template.json")).unwrap()).unwrap();
    assert_eq!(record["rows"]["train"], 40);
    assert_eq!(record["templates"]["completion"]["source"], " {{ label }}");
}

#[test]
fn undefined_variable_error_names_the_row_and_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_artifact(dir.path());
    let error = run(
        &config("input: data\nprompt: \"{{ txet }}\"\ncompletion: \"{{ label }}\"\n"),
        dir.path(),
        &input,
        &dir.path().join("out"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("row 0") && error.contains("`txet`"),
        "{error}"
    );
    // A null cell printed: the eval split's row 2.
    let error = run(
        &config("input: data\nprompt: \"{{ text }}\"\ncompletion: \"{{ label }}\"\n"),
        dir.path(),
        &input,
        &dir.path().join("out2"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("split eval, row 2") && error.contains("text"),
        "{error}"
    );
}

#[test]
fn few_shot_never_uses_the_row_itself_nor_evaluation_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_artifact(dir.path());
    for strategy in ["random", "stratified", "first_k"] {
        let out = dir.path().join(format!("out-{strategy}"));
        let config = config(&format!(
            "input: data\nprompt: \"{{% for ex in examples %}}[{{{{ ex.id }}}}]{{% endfor %}}\"\ncompletion: \"{{{{ id }}}}\"\nlabel: label\nfew_shot: {{k: 4, strategy: {strategy}}}\n"
        ));
        run(&config, dir.path(), &input, &out).unwrap();
        for split in ["train", "eval"] {
            let prompts = read(&out.join(format!("{split}.parquet")), "prompt");
            let ids = read(&out.join(format!("{split}.parquet")), "completion");
            for (prompt, id) in prompts.iter().zip(&ids) {
                let prompt = prompt.as_deref().unwrap();
                let shots: Vec<i64> = prompt
                    .trim_matches(|c| c == '[' || c == ']')
                    .split("][")
                    .map(|s| s.parse().unwrap())
                    .collect();
                assert_eq!(shots.len(), 4, "{strategy} {split}: {prompt}");
                let id: i64 = id.as_deref().unwrap().parse().unwrap();
                assert!(
                    !shots.contains(&id),
                    "{strategy}: row {id} is its own demonstration"
                );
                assert!(
                    shots.iter().all(|s| *s < 1000),
                    "{strategy}: an eval row in {prompt}"
                );
                if strategy == "stratified" {
                    let positives = shots.iter().filter(|s| *s % 2 == 0).count();
                    assert_eq!(positives, 2, "balanced labels: {prompt}");
                }
            }
        }
    }
    let error = run(
        &config("input: data\nprompt: \"x\"\ncompletion: \"y\"\nfew_shot: {k: 2, split: eval}\n"),
        dir.path(),
        &input,
        &dir.path().join("refused"),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("evaluation rows"), "{error}");
}

#[test]
fn template_files_with_macros_and_includes_render_and_are_input_files() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_artifact(dir.path());
    let templates = dir.path().join("templates");
    std::fs::create_dir(&templates).unwrap();
    std::fs::write(
        templates.join("macros.j2"),
        "{% macro shout(x) %}{{ x | upper }}{% endmacro %}",
    )
    .unwrap();
    std::fs::write(templates.join("header.j2"), "Review").unwrap();
    std::fs::write(
        templates.join("prompt.j2"),
        "{% from 'templates/macros.j2' import shout %}{% include 'templates/header.j2' %}: {{ shout(text or '') }}\n",
    )
    .unwrap();
    let config =
        config("input: data\nprompt_file: templates/prompt.j2\ncompletion: \" {{ label }}\"\n");
    let out = dir.path().join("out");
    run(&config, dir.path(), &input, &out).unwrap();
    assert_eq!(
        read(&out.join("train.parquet"), "prompt")[0].as_deref(),
        Some("Review: TEXT 0")
    );
    use peftpipe::config::StageSpec;
    let keys: Vec<String> = config
        .input_files(dir.path())
        .unwrap()
        .into_iter()
        .map(|f| f.key)
        .collect();
    assert_eq!(
        keys,
        vec![
            "templates/header.j2",
            "templates/macros.j2",
            "templates/prompt.j2"
        ]
    );
}

/// `{% include [a, b] %}` takes the first file that exists and `ignore missing` renders nothing
/// for an absent one, as in jinja2. An absent alternative is no input file, so the inputs (and
/// the fingerprint) change when it appears; before, the stage refused the absent file.
#[test]
fn include_lists_and_ignore_missing_take_the_files_that_exist() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_artifact(dir.path());
    std::fs::write(dir.path().join("fallback.j2"), "Fallback").unwrap();
    let stage = config(
        "input: data\nprompt: \"{% include ['custom.j2', 'fallback.j2'] %}{% include 'extra.j2' ignore missing %}: {{ text or '' }}\"\ncompletion: \" {{ label }}\"\n",
    );
    use peftpipe::config::StageSpec;
    let keys = || -> Vec<String> {
        stage
            .input_files(dir.path())
            .unwrap()
            .into_iter()
            .map(|f| f.key)
            .collect()
    };
    let first_prompt = |out: &str| {
        let out = dir.path().join(out);
        run(&stage, dir.path(), &input, &out).unwrap();
        read(&out.join("train.parquet"), "prompt")[0].clone()
    };
    assert_eq!(keys(), vec!["fallback.j2"]);
    assert_eq!(first_prompt("out1").as_deref(), Some("Fallback: text 0"));
    std::fs::write(dir.path().join("custom.j2"), "Custom").unwrap();
    std::fs::write(dir.path().join("extra.j2"), "+").unwrap();
    assert_eq!(keys(), vec!["custom.j2", "extra.j2", "fallback.j2"]);
    assert_eq!(first_prompt("out2").as_deref(), Some("Custom+: text 0"));
    // A file a plain include names must exist.
    let required = config(
        "input: data\nprompt: \"{% include 'absent.j2' %}\"\ncompletion: \" {{ label }}\"\n",
    );
    let error = required.input_files(dir.path()).unwrap_err();
    assert!(error.contains("absent.j2"), "{error}");
}

const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn chat(template: &str, bos: &str, eos: &str) -> ChatTemplate {
    ChatTemplate::new(ChatTemplateSource {
        template: template.into(),
        bos_token: bos.into(),
        eos_token: eos.into(),
        pad_token: None,
        unk_token: None,
    })
    .unwrap()
}

#[test]
fn llama3_chat_template_matches_the_hand_written_rendering() {
    let chat = chat(LLAMA3, "<|begin_of_text|>", "<|eot_id|>");
    let messages = [
        Message::new("system", "Be brief."),
        Message::new("user", "Is this good? "),
        Message::new("assistant", "Yes."),
    ];
    let (prompt, completion) = chat.prompt_and_completion(&messages).unwrap();
    assert_eq!(
        prompt,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nIs this good?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    assert_eq!(completion, "Yes.<|eot_id|>");
}

#[test]
fn chatml_chat_template_matches_the_hand_written_rendering() {
    let chat = chat(CHATML, "", "<|im_end|>");
    let messages = [
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello!"),
    ];
    assert_eq!(
        chat.render(&messages[..1], true).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let (prompt, completion) = chat.prompt_and_completion(&messages).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(completion, "Hello!<|im_end|>\n");
}

#[test]
fn chat_stage_renders_turns_and_few_shot_demonstrations_as_prior_turns() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_artifact(dir.path());
    let out = dir.path().join("out");
    let yaml = format!(
        "input: data\nchat:\n  template: {}\n  system: Classify.\n  user: \"{{{{ text or '' }}}}\"\n  assistant: \"{{{{ label }}}}\"\nfew_shot: {{k: 1, strategy: first_k}}\n",
        serde_json::to_string(CHATML).unwrap()
    );
    run(&config(&yaml), dir.path(), &input, &out).unwrap();
    let prompt = read(&out.join("eval.parquet"), "prompt")[0]
        .clone()
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nClassify.<|im_end|>\n<|im_start|>user\ntext 0<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n<|im_start|>user\ntext 1000<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        read(&out.join("eval.parquet"), "completion")[0].as_deref(),
        Some("positive<|im_end|>\n")
    );
}

#[test]
fn quickstart_tokenizer_loads_and_covers_the_dataset_and_templates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/quickstart");
    let tokenizer = tokenizers::Tokenizer::from_file(root.join("model/tokenizer.json")).unwrap();
    assert_eq!(tokenizer.token_to_id("<unk>"), Some(0));
    assert_eq!(tokenizer.token_to_id("<s>"), Some(1));
    assert_eq!(tokenizer.token_to_id("</s>"), Some(2));
    assert_eq!(tokenizer.token_to_id("<pad>"), Some(3));
    let text = "review: The film was REALLY great!\nsentiment: positive</s>";
    let encoding = tokenizer.encode(text, false).unwrap();
    assert!(
        !encoding.get_ids().contains(&0),
        "no <unk> in {:?}",
        encoding.get_tokens()
    );
    assert_eq!(encoding.get_ids().last(), Some(&2));
    // Every row of the committed dataset tokenizes without <unk>, and the file matches the
    // generator (regenerate with `cargo run --example make_quickstart_data`).
    let rows = peftpipe::data::synthetic::quickstart_rows();
    let mut committed_texts = Vec::new();
    let reader = ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(root.join("reviews.parquet")).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    for batch in reader {
        let batch = batch.unwrap();
        let text = batch
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        committed_texts.extend(text.iter().map(|v| v.map(str::to_string)));
    }
    let generated: Vec<Option<String>> = rows.iter().map(|r| r.0.clone()).collect();
    assert_eq!(
        committed_texts, generated,
        "datasets/quickstart/reviews.parquet is stale"
    );
    for text in generated.iter().flatten() {
        let ids = tokenizer.encode(text.as_str(), false).unwrap();
        assert!(!ids.get_ids().contains(&0), "<unk> in {text}");
    }
    let vocab_size = tokenizer.get_vocab_size(true);
    let readme = std::fs::read_to_string(root.join("model/README.md")).unwrap();
    assert!(
        readme.contains(&format!("vocab_size = {vocab_size}")),
        "model/README.md must state vocab_size = {vocab_size}"
    );
}

/// Regression: nested `range(10000)` loops ran without end. Each rendering has fuel now: the
/// stage fails fast with an error naming the split, row and limit.
#[test]
fn runaway_loops_run_out_of_fuel_fast() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_artifact(dir.path());
    let started = std::time::Instant::now();
    let error = run(
        &config("input: data\nprompt: \"{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}\"\ncompletion: \"{{ label }}\"\n"),
        dir.path(),
        &input,
        &dir.path().join("out"),
    )
    .unwrap_err()
    .to_string();
    let seconds = started.elapsed().as_secs_f64();
    assert!(seconds < 5.0, "took {seconds:.1} s");
    assert!(
        error.contains("split train, row 0: the prompt template ran out of fuel")
            && error.contains("limits.fuel (10000000 instructions)"),
        "{error}"
    );
}

/// Regression: a template emitting 100 MB per row was accepted. Output is capped per rendering
/// (1 MiB by default, `limits.max_row_bytes`), and the cap is configurable.
#[test]
fn huge_rows_are_refused_and_the_cap_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_artifact(dir.path());
    let started = std::time::Instant::now();
    let error = run(
        &config("input: data\nprompt: \"{{ 'x' * 100000000 }}\"\ncompletion: \"{{ label }}\"\n"),
        dir.path(),
        &input,
        &dir.path().join("out"),
    )
    .unwrap_err()
    .to_string();
    assert!(started.elapsed().as_secs_f64() < 5.0);
    assert!(
        error.contains("split train, row 0: the prompt template's output exceeds limits.max_row_bytes (1048576 bytes)"),
        "{error}"
    );
    // Raised and lowered in the stage config.
    let wide = "input: data\nprompt: \"{{ 'x' * 2000000 }}\"\ncompletion: \"{{ label }}\"\n";
    run(
        &config(&format!("{wide}limits: {{max_row_bytes: 3000000}}\n")),
        dir.path(),
        &input,
        &dir.path().join("raised"),
    )
    .unwrap();
    let error = run(
        &config("input: data\nprompt: \"{{ text }}\"\ncompletion: \" {{ label }}\"\nlimits: {max_row_bytes: 5}\n"),
        dir.path(),
        &input,
        &dir.path().join("lowered"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("split train, row 0: the prompt template's output exceeds limits.max_row_bytes (5 bytes)"),
        "{error}"
    );
    let error = run(
        &config("input: data\nprompt: \"{% for i in range(100) %}{% endfor %}\"\ncompletion: \"{{ label }}\"\nlimits: {fuel: 50}\n"),
        dir.path(),
        &input,
        &dir.path().join("little-fuel"),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("limits.fuel (50 instructions)"), "{error}");
}

/// Regression: one Ctrl-C did not stop slow templates: the cancel flag was read once per batch.
/// It is read between rows now.
#[test]
fn cancellation_is_honoured_between_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_artifact(dir.path());
    // Each row loops 300,000 times (tens of milliseconds); the 40 train rows are one batch, so
    // a check per batch would render all of them (seconds) before noticing.
    let slow = config(
        "input: data\nprompt: \"{% for i in range(300) %}{% for j in range(1000) %}{% endfor %}{% endfor %}{{ id }}\"\ncompletion: \"{{ label }}\"\n",
    );
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&cancel);
    let setter = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let started = std::time::Instant::now();
    let result = run_with(
        &slow,
        dir.path(),
        &input,
        &dir.path().join("cancelled"),
        &RunOptions::default(),
        &cancel,
    );
    let stopped = started.elapsed().as_secs_f64();
    setter.join().unwrap();
    assert!(matches!(result, Err(StageError::Cancelled)), "{result:?}");
    assert!(stopped < 1.0, "cancelled after {stopped:.2} s");
}

/// Regression: `{% set n = 'dyn' ~ '.j2' %}{% include n %}` rendered dyn.j2 untracked (editing it
/// left the stage fresh). Validation refuses it; the stage's loader serves only names written
/// literally, which are the files the fingerprint hashes.
#[test]
fn includes_by_computed_names_are_refused_at_render_time_too() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_artifact(dir.path());
    std::fs::write(dir.path().join("dyn.j2"), "dynamic").unwrap();
    let error = run(
        &config("input: data\nprompt: \"{% set n = 'dyn' ~ '.j2' %}{% include n %}\"\ncompletion: \"{{ label }}\"\n"),
        dir.path(),
        &input,
        &dir.path().join("out"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("split train, row 0") && error.contains("cannot track it"),
        "{error}"
    );
    // Written literally, it renders (and is an input file of the stage).
    let literal =
        config("input: data\nprompt: \"{% include 'dyn.j2' %}\"\ncompletion: \"{{ label }}\"\n");
    run(&literal, dir.path(), &input, &dir.path().join("literal")).unwrap();
    assert_eq!(
        read(&dir.path().join("literal/train.parquet"), "prompt")[0].as_deref(),
        Some("dynamic")
    );
}

/// The stage applies the path policy itself too (symbolic links resolved), honouring
/// `--allow-outside-project`.
#[test]
fn template_files_outside_the_project_need_the_flag_at_run_time() {
    let root = tempfile::tempdir().unwrap();
    let project = root.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    let input = input_artifact(&project);
    std::fs::write(root.path().join("outside.j2"), "outside {{ id }}").unwrap();
    std::os::unix::fs::symlink(root.path().join("outside.j2"), project.join("link.j2")).unwrap();
    for prompt in [
        "prompt_file: link.j2",
        "prompt_file: ../outside.j2",
        "prompt: \"{% include 'link.j2' %}\"",
    ] {
        let config = config(&format!(
            "input: data\n{prompt}\ncompletion: \"{{{{ label }}}}\"\n"
        ));
        let error = run(&config, &project, &input, &project.join("refused"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("outside the project directory")
                && error.contains("--allow-outside-project"),
            "{prompt}: {error}"
        );
        let allowed = RunOptions {
            allow_outside_project: true,
            ..RunOptions::default()
        };
        let out = project.join("allowed");
        let _ = std::fs::remove_dir_all(&out);
        run_with(
            &config,
            &project,
            &input,
            &out,
            &allowed,
            &AtomicBool::new(false),
        )
        .unwrap();
        assert_eq!(
            read(&out.join("train.parquet"), "prompt")[0].as_deref(),
            Some("outside 0")
        );
    }
}

/// Rows whose prompt or completion renders empty (or only whitespace) are counted per split in
/// template.json and in the stage's figures, so a template that leaves rows blank is seen.
#[test]
fn rows_rendered_empty_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_artifact(dir.path());
    let out = dir.path().join("out");
    // Eval row 1002 has a null text; train rows with an id divisible by 10 get no completion.
    let config = config(
        "input: data\nprompt: \"{{ text if text else ' ' }}\"\ncompletion: \"{{ label if id % 10 else '' }}\"\n",
    );
    let outcome = run_with(
        &config,
        dir.path(),
        &input,
        &out,
        &RunOptions::default(),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(outcome.summary["empty_prompts"], 1, "{:?}", outcome.summary);
    assert_eq!(
        outcome.summary["empty_completions"], 5,
        "{:?}",
        outcome.summary
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("template.json")).unwrap()).unwrap();
    assert_eq!(record["empty_prompts"]["eval"], 1, "{record}");
    assert_eq!(record["empty_prompts"]["train"], 0, "{record}");
    assert_eq!(record["empty_completions"]["train"], 4, "{record}");
    assert_eq!(record["empty_completions"]["eval"], 1, "{record}");
}

/// A binary column is refused when a template reads it, with an error naming the column and the
/// row (it rendered as hex digits; jinja2 would write `b'...'`): neither is text a prompt should
/// hold. A template that does not read it renders as usual.
#[test]
fn a_binary_column_read_by_a_template_is_an_error_naming_the_column() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("data");
    std::fs::create_dir_all(&input).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("text", DataType::Utf8, true),
        Field::new("blob", DataType::Binary, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec!["a", "b"])),
        Arc::new(arrow::array::BinaryArray::from(vec![
            b"hi".as_slice(),
            b"\x00\xff".as_slice(),
        ])),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let mut writer = ArrowWriter::try_new(
        std::fs::File::create(input.join("train.parquet")).unwrap(),
        schema,
        None,
    )
    .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    for prompt in [
        "{{ blob }}",
        "{% if blob %}x{% endif %}",
        "{{ blob | length }}",
    ] {
        let error = run(
            &config(&format!(
                "input: data\nprompt: \"{prompt}\"\ncompletion: \"{{{{ text }}}}\"\n"
            )),
            dir.path(),
            &input,
            &dir.path().join("out"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("split train, row 0")
                && error.contains("column `blob`")
                && error.contains("binary"),
            "{prompt}: {error}"
        );
    }
    let out = dir.path().join("ok");
    run(
        &config("input: data\nprompt: \"{{ text }}\"\ncompletion: \"!\"\ncarry: [blob]\n"),
        dir.path(),
        &input,
        &out,
    )
    .unwrap();
    assert_eq!(
        read(&out.join("train.parquet"), "prompt"),
        [Some("a".into()), Some("b".into())]
    );
}

/// transformers renders with `tools=None, documents=None` when none are given
/// (`render_jinja_template`), so `tools is not none` is false there; undefined `tools` is not none.
#[test]
fn tools_and_documents_are_none_as_transformers_passes_them() {
    let chat = chat(
        "{% if tools is not none %}[AVAILABLE_TOOLS]{% endif %}{% if documents is none %}{{ messages[0]['content'] }}{% endif %}",
        "",
        "",
    );
    assert_eq!(
        chat.render(&[Message::new("user", "Hi")], true).unwrap(),
        "Hi"
    );
}

/// Real chat templates of popular models (tests/fixtures/chat_templates: Gemma 2, Zephyr,
/// Mistral instruct v0.2 and v0.3, Qwen2.5, Llama 3.1, Phi-3.5, SmolLM2), rendered as
/// transformers renders them; the expected strings are Jinja2 3.1.6's, with the environment
/// transformers builds (sandboxed, trim_blocks, lstrip_blocks, loopcontrols, tools=None).
#[test]
fn real_chat_templates_render_as_jinja2_does() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates");
    let cases: [(&str, bool, &str, &str); 9] = [
        ("gemma", false, "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nWhy é?<end_of_turn>\n<start_of_turn>model\n", "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nWhy é?<end_of_turn>\n<start_of_turn>model\nBecause.<end_of_turn>\n"),
        ("zephyr", true, "<|system|>\n Be brief. </s>\n<|user|>\nHi </s>\n<|assistant|>\n Hello!</s>\n<|user|>\nWhy é?</s>\n<|assistant|>\n", "<|system|>\n Be brief. </s>\n<|user|>\nHi </s>\n<|assistant|>\n Hello!</s>\n<|user|>\nWhy é?</s>\n<|assistant|>\nBecause.</s>\n"),
        ("mistral-v0.3", true, "<s>[INST] Hi [/INST] Hello!</s>[INST]  Be brief. \n\nWhy é?[/INST]", "<s>[INST] Hi [/INST] Hello!</s>[INST] Why é?[/INST] Because.</s>"),
        ("mistral-v0.2", false, "<s>[INST] Hi  [/INST] Hello!</s>[INST] Why é? [/INST]", "<s>[INST] Hi  [/INST] Hello!</s>[INST] Why é? [/INST]Because.</s>"),
        ("qwen2.5", true, "<|im_start|>system\n Be brief. <|im_end|>\n<|im_start|>user\nHi <|im_end|>\n<|im_start|>assistant\n Hello!<|im_end|>\n<|im_start|>user\nWhy é?<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>system\n Be brief. <|im_end|>\n<|im_start|>user\nHi <|im_end|>\n<|im_start|>assistant\n Hello!<|im_end|>\n<|im_start|>user\nWhy é?<|im_end|>\n<|im_start|>assistant\nBecause.<|im_end|>\n"),
        ("qwen2.5", false, "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi <|im_end|>\n<|im_start|>assistant\n Hello!<|im_end|>\n<|im_start|>user\nWhy é?<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi <|im_end|>\n<|im_start|>assistant\n Hello!<|im_end|>\n<|im_start|>user\nWhy é?<|im_end|>\n<|im_start|>assistant\nBecause.<|im_end|>\n"),
        ("llama-3.1", true, "<s><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhy é?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "<s><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhy é?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nBecause.<|eot_id|>"),
        ("phi-3.5", true, "<|system|>\n Be brief. <|end|>\n<|user|>\nHi <|end|>\n<|assistant|>\n Hello!<|end|>\n<|user|>\nWhy é?<|end|>\n<|assistant|>\n", "<|system|>\n Be brief. <|end|>\n<|user|>\nHi <|end|>\n<|assistant|>\n Hello!<|end|>\n<|user|>\nWhy é?<|end|>\n<|assistant|>\nBecause.<|end|>\n</s>"),
        ("smollm2", false, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi <|im_end|>\n<|im_start|>assistant\n Hello!<|im_end|>\n<|im_start|>user\nWhy é?<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi <|im_end|>\n<|im_start|>assistant\n Hello!<|im_end|>\n<|im_start|>user\nWhy é?<|im_end|>\n<|im_start|>assistant\nBecause.<|im_end|>\n"),
    ];
    let turns = [
        Message::new("user", "Hi "),
        Message::new("assistant", " Hello!"),
        Message::new("user", "Why é?"),
        Message::new("assistant", "Because."),
    ];
    for (name, with_system, prompt, full) in cases {
        let source = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
        let chat = chat(&source, "<s>", "</s>");
        let mut messages = Vec::new();
        if with_system {
            messages.push(Message::new("system", " Be brief. "));
        }
        messages.extend(turns.iter().cloned());
        let (last, earlier) = messages.split_last().unwrap();
        assert_eq!(chat.render(earlier, true).unwrap(), prompt, "{name}");
        assert_eq!(chat.render(&messages, false).unwrap(), full, "{name}");
        assert_eq!(last.role, "assistant");
    }
}

/// Templates that refuse a conversation (Gemma: no system role; Mistral: roles must alternate)
/// fail the row with the template's own message; Mistral v0.3 puts the system prompt in the last
/// user turn, so a prompt cannot be split off the conversation, and that is said too.
#[test]
fn chat_templates_that_refuse_a_conversation_say_why_and_which_row() {
    let dir = tempfile::tempdir().unwrap();
    let input = input_artifact(dir.path());
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates");
    for (name, expected) in [
        ("gemma", "System role not supported"),
        ("mistral-v0.2", "Conversation roles must alternate"),
        (
            "mistral-v0.3",
            "does not start with its rendering of the prompt",
        ),
    ] {
        let source = std::fs::read_to_string(fixtures.join(format!("{name}.jinja"))).unwrap();
        let yaml = format!(
            "input: data\nchat:\n  template: {}\n  system: Classify.\n  user: \"{{{{ text or '' }}}}\"\n  assistant: \"{{{{ label }}}}\"\n",
            serde_json::to_string(&source).unwrap()
        );
        let error = run(&config(&yaml), dir.path(), &input, &dir.path().join(name))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("row 0") && error.contains(expected),
            "{name}: {error}"
        );
    }
}
