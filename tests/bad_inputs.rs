//! The bad-input corpus: every broken file is answered with a clean error and exit code, within
//! bounded time and memory, and never with a panic. The small text cases live in
//! tests/fixtures/bad/ (see its README.md); binary and big cases (Parquet, safetensors, invalid
//! UTF-8, huge lines) are generated here from the quickstart dataset and model.
//!
//! Each case runs the real binary (`validate`, `run`, `inspect`, `generate`, `preview` as fits)
//! under `prlimit --data=1GiB` when util-linux has it, polling the child's peak resident memory
//! (VmHWM) and CPU time, and killing it past 1 GiB, 10 s of CPU, or 60 s of wall time (a hang;
//! CPU time rather than wall time keeps the limit meaningful on a loaded machine). One command
//! runs at a time (the test threads take turns), so cases do not starve each other. A check passes when the process exited by itself
//! with 1 or 2 (0 where noted: `validate` cannot see a broken row without reading the data), its
//! stderr never says "panicked", and the error names the offending file. A category's failures
//! are collected and reported together. Control cases (valid inputs) must succeed, so the
//! harness cannot pass by failing everything.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CPU_LIMIT: Duration = Duration::from_secs(10);
const WALL_LIMIT: Duration = Duration::from_secs(60);
const MEMORY_LIMIT_BYTES: u64 = 1 << 30;
/// Output kept per stream (a runaway error message must not fill the test's memory).
const KEEP_OUTPUT: u64 = 1 << 20;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(relative: &str) -> PathBuf {
    repo().join("tests/fixtures/bad").join(relative)
}

fn quickstart_model() -> PathBuf {
    repo().join("datasets/quickstart/model")
}

/// What a command may end with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Exit 1 or 2, naming the file.
    Fails,
    /// Exit 0, or 1/2 naming the file (`validate` on data it does not read).
    MayPass,
    /// Exit 0 (control cases).
    Passes,
}

struct Check {
    args: Vec<String>,
    expect: Expect,
}

fn check(expect: Expect, args: &[&str]) -> Check {
    Check {
        args: args.iter().map(|arg| arg.to_string()).collect(),
        expect,
    }
}

struct Case {
    name: String,
    /// Where the commands run (a temporary project, or the fixtures).
    dir: PathBuf,
    /// What the error must name (a file name).
    names: String,
    checks: Vec<Check>,
    _keep: Option<tempfile::TempDir>,
}

/// How one command ended.
struct Outcome {
    code: Option<i32>,
    stderr: String,
    elapsed: Duration,
    cpu: Duration,
    peak_rss_bytes: u64,
    killed_for: Option<&'static str>,
}

/// CPU time (user + system, all threads) of a live process.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture peftpipe builds for.
    Some(Duration::from_millis(ticks * 10))
}

/// Peak resident memory of a live process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn drain(mut stream: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let _ = (&mut stream).take(KEEP_OUTPUT).read_to_end(&mut kept);
        let _ = std::io::copy(&mut stream, &mut std::io::sink());
        kept
    })
}

/// Run `peftpipe ARGS` in `dir` with the time and memory caps, one command at a time.
fn run_capped(dir: &Path, args: &[String]) -> Outcome {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let binary = env!("CARGO_BIN_EXE_peftpipe");
    let mut command = if Path::new("/usr/bin/prlimit").exists() {
        let mut command = Command::new("/usr/bin/prlimit");
        command
            .arg(format!("--data={MEMORY_LIMIT_BYTES}"))
            .arg("--")
            .arg(binary);
        command
    } else {
        Command::new(binary)
    };
    let mut child = command
        .args(args)
        .current_dir(dir)
        .env_remove("PEFTPIPE_CACHE_DIR")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn peftpipe");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let started = Instant::now();
    let mut peak = 0;
    let mut cpu = Duration::ZERO;
    let mut killed_for = None;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            break status;
        }
        peak = peak.max(peak_rss(child.id()).unwrap_or(0));
        cpu = cpu.max(cpu_time(child.id()).unwrap_or_default());
        if peak > MEMORY_LIMIT_BYTES {
            killed_for = Some("memory over 1 GiB");
        } else if cpu > CPU_LIMIT {
            killed_for = Some("CPU time over 10 s");
        } else if started.elapsed() > WALL_LIMIT {
            killed_for = Some("wall time over 60 s (a hang?)");
        }
        if killed_for.is_some() {
            let _ = child.kill();
            break child.wait().expect("reap child");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = stdout.join();
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    Outcome {
        code: status.code(),
        stderr,
        elapsed: started.elapsed(),
        cpu,
        peak_rss_bytes: peak,
        killed_for,
    }
}

/// Run every check of every case; the failures, one line each.
fn failures(cases: &[Case]) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases {
        for check in &case.checks {
            let outcome = run_capped(&case.dir, &check.args);
            let command = check.args.join(" ");
            // The lines that say what went wrong, else the last ones.
            let lines: Vec<&str> = outcome.stderr.lines().collect();
            let telling: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|line| {
                    line.contains("error") || line.contains("Failed ") || line.contains("panicked")
                })
                .take(3)
                .collect();
            let tail = if telling.is_empty() {
                lines[lines.len().saturating_sub(3)..].join(" ⏎ ")
            } else {
                telling.join(" ⏎ ")
            };
            let context = format!(
                "{}: `peftpipe {command}` (exit {:?}, {:.1} s, CPU {:.1} s, peak {} MiB): {tail}",
                case.name,
                outcome.code,
                outcome.elapsed.as_secs_f64(),
                outcome.cpu.as_secs_f64(),
                outcome.peak_rss_bytes >> 20
            );
            let problem = if let Some(reason) = outcome.killed_for {
                Some(format!("killed: {reason}"))
            } else if outcome.stderr.contains("panicked") || outcome.code == Some(101) {
                Some("panicked".to_string())
            } else {
                match (outcome.code, check.expect) {
                    (None, _) => Some("killed by a signal (the memory cap?)".to_string()),
                    (Some(0), Expect::Passes | Expect::MayPass) => None,
                    (Some(0), Expect::Fails) => Some("accepted the bad input".to_string()),
                    (Some(1 | 2), Expect::Fails | Expect::MayPass)
                        if !outcome.stderr.contains(&case.names) =>
                    {
                        Some(format!("the error does not name `{}`", case.names))
                    }
                    (Some(1 | 2), Expect::Fails | Expect::MayPass) => None,
                    (Some(code), _) => Some(format!("unexpected exit code {code}")),
                }
            };
            if let Some(problem) = problem {
                failures.push(format!("{problem} — {context}"));
            }
        }
    }
    failures
}

fn assert_no_failures(category: &str, cases: &[Case]) {
    let failures = failures(cases);
    assert!(
        failures.is_empty(),
        "{} of the {category} corpus checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Projects

fn temp_project() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let root = dir.path().canonicalize().expect("canonical path");
    (dir, root)
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("create directories");
    std::fs::write(path, bytes).expect("write file");
}

/// Twenty rows (words of the quickstart tokenizer's vocabulary only): enough that the default
/// 0.1 eval split is not empty, which ingest refuses.
const ROWS_JSONL: &str = concat!(
    "{\"text\": \"great album\", \"label\": \"positive\"}\n",
    "{\"text\": \"awful battery\", \"label\": \"negative\"}\n",
    "{\"text\": \"beautiful album\", \"label\": \"positive\"}\n",
    "{\"text\": \"awful acting\", \"label\": \"negative\"}\n",
    "{\"text\": \"loved the story\", \"label\": \"positive\"}\n",
    "{\"text\": \"boring plot\", \"label\": \"negative\"}\n",
    "{\"text\": \"excellent camera\", \"label\": \"positive\"}\n",
    "{\"text\": \"terrible service\", \"label\": \"negative\"}\n",
    "{\"text\": \"wonderful music\", \"label\": \"positive\"}\n",
    "{\"text\": \"dull movie\", \"label\": \"negative\"}\n",
    "{\"text\": \"superb acting\", \"label\": \"positive\"}\n",
    "{\"text\": \"cheap shoes\", \"label\": \"negative\"}\n",
    "{\"text\": \"lovely hotel\", \"label\": \"positive\"}\n",
    "{\"text\": \"noisy room\", \"label\": \"negative\"}\n",
    "{\"text\": \"brilliant film\", \"label\": \"positive\"}\n",
    "{\"text\": \"slow pacing\", \"label\": \"negative\"}\n",
    "{\"text\": \"charming hero\", \"label\": \"positive\"}\n",
    "{\"text\": \"weak ending\", \"label\": \"negative\"}\n",
    "{\"text\": \"perfect phone\", \"label\": \"positive\"}\n",
    "{\"text\": \"cold food\", \"label\": \"negative\"}\n",
);

/// A pipeline that only ingests `data/FILE`.
fn ingest_case(name: &str, file: &str, bytes: &[u8]) -> Case {
    let (keep, root) = temp_project();
    write(&root.join("data").join(file), bytes);
    write(
        &root.join("pipeline.yaml"),
        format!("name: corpus\nseed: 1\nstages:\n  data:\n    ingest:\n      path: data/{file}\n")
            .as_bytes(),
    );
    Case {
        name: name.to_string(),
        dir: root,
        names: file.to_string(),
        checks: vec![
            check(Expect::MayPass, &["validate", "pipeline.yaml"]),
            check(Expect::Fails, &["run", "pipeline.yaml"]),
        ],
        _keep: Some(keep),
    }
}

const TRAIN_PIPELINE: &str = r#"name: corpus
seed: 1
stages:
  data:
    ingest:
      path: data/rows.jsonl
  prompts:
    template:
      input: data
      prompt: "review: {{ text }}\nsentiment:"
      completion: " {{ label }}"
  train:
    train:
      data: prompts
      model: model
      method:
        lora: {r: 2, alpha: 4, target_modules: [q_proj, v_proj]}
      max_steps: 2
      batch_size: 2
      max_seq_len: 32
      device: cpu
"#;

/// The quickstart model copied into `model/` with `file` replaced by `bytes` (None: a valid
/// model), rows, and a training pipeline on it.
fn model_case(name: &str, file: &str, bytes: Option<&[u8]>) -> Case {
    let (keep, root) = temp_project();
    std::fs::create_dir_all(root.join("model")).expect("model folder");
    for entry in std::fs::read_dir(quickstart_model()).expect("quickstart model") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), root.join("model").join(entry.file_name()))
            .expect("copy the quickstart model");
    }
    if let Some(bytes) = bytes {
        write(&root.join("model").join(file), bytes);
    }
    write(&root.join("data/rows.jsonl"), ROWS_JSONL.as_bytes());
    write(&root.join("pipeline.yaml"), TRAIN_PIPELINE.as_bytes());
    let expect = if bytes.is_some() {
        Expect::Fails
    } else {
        Expect::Passes
    };
    let generate = [
        "generate",
        "model",
        "--prompt",
        "great album",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ];
    Case {
        name: name.to_string(),
        dir: root,
        names: file.to_string(),
        checks: vec![
            check(expect, &["validate", "pipeline.yaml"]),
            // `inspect` describes what is stored; it may describe a broken folder.
            check(
                if bytes.is_some() {
                    Expect::MayPass
                } else {
                    Expect::Passes
                },
                &["inspect", "model"],
            ),
            check(expect, &generate),
            check(expect, &["run", "pipeline.yaml"]),
        ],
        _keep: Some(keep),
    }
}

/// `template_file` (a fixture) as the prompt file of a template stage over a few rows.
fn template_case(template_file: &str) -> Case {
    let (keep, root) = temp_project();
    let template = std::fs::read(fixture(&format!("templates/{template_file}"))).expect("fixture");
    write(&root.join("templates").join(template_file), &template);
    write(&root.join("data/rows.jsonl"), ROWS_JSONL.as_bytes());
    write(
        &root.join("pipeline.yaml"),
        format!(
            "name: corpus\nseed: 1\nstages:\n  data:\n    ingest:\n      path: data/rows.jsonl\n  \
             prompts:\n    template:\n      input: data\n      prompt_file: templates/{template_file}\n      \
             completion: \" {{{{ label }}}}\"\n"
        )
        .as_bytes(),
    );
    Case {
        name: format!("templates/{template_file}"),
        dir: root,
        names: template_file.to_string(),
        checks: vec![
            check(Expect::MayPass, &["validate", "pipeline.yaml"]),
            check(Expect::Fails, &["run", "pipeline.yaml"]),
            check(
                Expect::Fails,
                &["preview", "pipeline.yaml", "--stage", "prompts", "-n", "1"],
            ),
        ],
        _keep: Some(keep),
    }
}

/// A pipeline file (`validate` and `run` on it), copied into a temporary project.
fn pipeline_case(name: &str, file: &str, bytes: &[u8]) -> Case {
    let (keep, root) = temp_project();
    write(&root.join(file), bytes);
    Case {
        name: name.to_string(),
        dir: root,
        names: file.to_string(),
        checks: vec![
            check(Expect::Fails, &["validate", file]),
            check(Expect::Fails, &["run", file]),
        ],
        _keep: Some(keep),
    }
}

// ---------------------------------------------------------------------------------------------
// YAML

#[test]
fn bad_pipeline_files_are_refused_cleanly() {
    let mut cases = Vec::new();
    for file in [
        "alias_bomb.yaml",
        "alias_bomb_in_stage.yaml",
        "merge_key_bomb.yaml",
        "recursive_alias.yaml",
        "binary_garbage.yaml",
    ] {
        let bytes = std::fs::read(fixture(&format!("yaml/{file}"))).expect("fixture");
        cases.push(pipeline_case(&format!("yaml/{file}"), file, &bytes));
    }
    let deep = format!(
        "name: deep\nstages: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    cases.push(pipeline_case("deep nesting", "deep.yaml", deep.as_bytes()));
    let mut not_utf8 = b"name: bytes\nstages:\n  data:\n    ingest:\n      path: \"".to_vec();
    not_utf8.extend_from_slice(&[0xff, 0xfe, 0x80, b'"', b'\n']);
    cases.push(pipeline_case("invalid UTF-8", "not_utf8.yaml", &not_utf8));
    let mut big =
        String::from("name: big\nstages:\n  data:\n    ingest:\n      path: rows.jsonl\n");
    let filler = format!("# {}\n", "x".repeat(1000));
    while big.len() < 64 << 20 {
        big.push_str(&filler);
    }
    big.push_str("  oops: [unclosed\n");
    cases.push(pipeline_case("64 MiB document", "big.yaml", big.as_bytes()));
    assert_no_failures("YAML", &cases);
}

// ---------------------------------------------------------------------------------------------
// Data files

fn reviews_parquet() -> Vec<u8> {
    std::fs::read(repo().join("datasets/quickstart/reviews.parquet")).expect("quickstart parquet")
}

/// A valid Parquet file with the columns text and label and no rows.
fn zero_row_parquet() -> Vec<u8> {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, StringArray};
    use arrow::record_batch::RecordBatch;
    let text: ArrayRef = Arc::new(StringArray::from(Vec::<&str>::new()));
    let label: ArrayRef = Arc::new(StringArray::from(Vec::<&str>::new()));
    let batch = RecordBatch::try_from_iter([("text", text), ("label", label)]).expect("batch");
    let mut bytes = Vec::new();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
    bytes
}

#[test]
fn bad_parquet_files_are_refused_cleanly() {
    let original = reviews_parquet();
    let length = original.len();
    let mut cases = vec![ingest_case(
        "control: quickstart reviews",
        "ok.parquet",
        &original,
    )];
    cases[0].checks = vec![
        check(Expect::Passes, &["validate", "pipeline.yaml"]),
        check(Expect::Passes, &["run", "pipeline.yaml"]),
    ];
    cases.push(ingest_case(
        "truncated",
        "truncated.parquet",
        &original[..length / 2],
    ));
    let mut wrong_magic = original.clone();
    wrong_magic[length - 4..].copy_from_slice(b"PAR0");
    cases.push(ingest_case(
        "wrong magic",
        "wrong_magic.parquet",
        &wrong_magic,
    ));
    cases.push(ingest_case("empty file", "empty.parquet", b""));
    cases.push(ingest_case(
        "zero rows",
        "zero_rows.parquet",
        &zero_row_parquet(),
    ));
    // The footer declares 2 GiB of metadata in a 19 kB file.
    let mut huge_footer = original.clone();
    huge_footer[length - 8..length - 4].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
    cases.push(ingest_case(
        "huge declared footer",
        "huge_footer.parquet",
        &huge_footer,
    ));
    // The footer length points into the column data: metadata that is not metadata.
    let mut shifted_footer = original.clone();
    let footer = u32::from_le_bytes(
        original[length - 8..length - 4]
            .try_into()
            .expect("4 bytes"),
    );
    shifted_footer[length - 8..length - 4].copy_from_slice(&(footer + 4096).to_le_bytes());
    cases.push(ingest_case(
        "footer length into the data",
        "shifted_footer.parquet",
        &shifted_footer,
    ));
    // Garbage metadata of the declared size.
    let mut garbage_metadata = original.clone();
    let start = length - 8 - footer as usize;
    for (index, byte) in garbage_metadata[start..length - 8].iter_mut().enumerate() {
        *byte = (index as u8).wrapping_mul(37) | 0x80;
    }
    cases.push(ingest_case(
        "garbage metadata",
        "garbage_metadata.parquet",
        &garbage_metadata,
    ));
    assert_no_failures("Parquet", &cases);
}

#[test]
fn bad_csv_files_are_refused_cleanly() {
    let mut cases = Vec::new();
    for file in ["bad_header.csv", "ragged.csv"] {
        let bytes = std::fs::read(fixture(&format!("csv/{file}"))).expect("fixture");
        cases.push(ingest_case(&format!("csv/{file}"), file, &bytes));
    }
    let mut invalid = b"text,label\ngreat album,positive\n".to_vec();
    invalid.extend_from_slice(b"bad \xff\xfe bytes,negative\n");
    cases.push(ingest_case("invalid UTF-8", "invalid_utf8.csv", &invalid));
    cases.push(ingest_case(
        "unclosed quote",
        "unclosed_quote.csv",
        b"text,label\n\"great album,positive\nawful,negative\n",
    ));
    assert_no_failures("CSV", &cases);
}

#[test]
fn bad_jsonl_files_are_refused_cleanly() {
    let mut cases = vec![ingest_case(
        "control: rows",
        "ok.jsonl",
        ROWS_JSONL.as_bytes(),
    )];
    cases[0].checks = vec![
        check(Expect::Passes, &["validate", "pipeline.yaml"]),
        check(Expect::Passes, &["run", "pipeline.yaml"]),
    ];
    for file in ["bad_line.jsonl", "not_an_object.jsonl"] {
        let bytes = std::fs::read(fixture(&format!("jsonl/{file}"))).expect("fixture");
        cases.push(ingest_case(&format!("jsonl/{file}"), file, &bytes));
    }
    // One 64 MiB line that never closes its string.
    let mut huge =
        String::from("{\"text\": \"great album\", \"label\": \"positive\"}\n{\"text\": \"");
    huge.push_str(&"x".repeat(64 << 20));
    huge.push('\n');
    cases.push(ingest_case("huge line", "huge_line.jsonl", huge.as_bytes()));
    let mut invalid = ROWS_JSONL.as_bytes().to_vec();
    invalid.extend_from_slice(b"{\"text\": \"bad \xff\xfe\", \"label\": \"negative\"}\n");
    cases.push(ingest_case("invalid UTF-8", "invalid_utf8.jsonl", &invalid));
    assert_no_failures("JSONL", &cases);
}

// ---------------------------------------------------------------------------------------------
// Model folders

/// The quickstart model.safetensors as (header JSON, data bytes).
fn safetensors_parts() -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let bytes = std::fs::read(quickstart_model().join("model.safetensors")).expect("weights");
    let length = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + length]).expect("header JSON");
    let header = header.as_object().expect("header object").clone();
    (header, bytes[8 + length..].to_vec())
}

fn safetensors_bytes(header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("encode header");
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(data);
    bytes
}

/// The tensors of a header (without `__metadata__`), by name.
fn tensors_mut(
    header: &mut serde_json::Map<String, serde_json::Value>,
) -> impl Iterator<Item = (&String, &mut serde_json::Value)> {
    header
        .iter_mut()
        .filter(|(name, _)| *name != "__metadata__")
}

#[test]
fn bad_safetensors_files_are_refused_cleanly() {
    const FILE: &str = "model.safetensors";
    let original = std::fs::read(quickstart_model().join(FILE)).expect("weights");
    let (header, data) = safetensors_parts();
    let header_length = u64::from_le_bytes(original[..8].try_into().expect("8 bytes")) as usize;
    let mut cases = vec![model_case("control: quickstart model", FILE, None)];

    cases.push(model_case(
        "truncated header",
        FILE,
        Some(&original[..8 + header_length / 2]),
    ));
    cases.push(model_case(
        "truncated data",
        FILE,
        Some(&original[..original.len() / 2]),
    ));
    cases.push(model_case("empty file", FILE, Some(b"")));
    let mut longer = original.clone();
    longer[..8].copy_from_slice(&(original.len() as u64 + 1000).to_le_bytes());
    cases.push(model_case("header length > file", FILE, Some(&longer)));
    let mut huge = original.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    cases.push(model_case("header length 2^64-1", FILE, Some(&huge)));

    let mut overlapping = header.clone();
    for (_, tensor) in tensors_mut(&mut overlapping) {
        let offsets = tensor["data_offsets"].as_array().expect("offsets").clone();
        let size = offsets[1].as_u64().expect("end") - offsets[0].as_u64().expect("begin");
        tensor["data_offsets"] = serde_json::json!([0, size]);
    }
    cases.push(model_case(
        "overlapping offsets",
        FILE,
        Some(&safetensors_bytes(&overlapping, &data)),
    ));

    let mut integers = header.clone();
    for (_, tensor) in tensors_mut(&mut integers) {
        tensor["dtype"] = serde_json::json!("I32");
    }
    cases.push(model_case(
        "integer dtypes",
        FILE,
        Some(&safetensors_bytes(&integers, &data)),
    ));

    let mut mismatch = header.clone();
    if let Some((_, tensor)) = tensors_mut(&mut mismatch).next() {
        let shape = tensor["shape"].as_array().expect("shape").clone();
        let first = shape[0].as_u64().expect("dimension");
        let mut doubled = shape;
        doubled[0] = serde_json::json!(first * 2);
        tensor["shape"] = serde_json::Value::Array(doubled);
    }
    cases.push(model_case(
        "shape/offset mismatch",
        FILE,
        Some(&safetensors_bytes(&mismatch, &data)),
    ));

    let mut overflow = header.clone();
    if let Some((_, tensor)) = tensors_mut(&mut overflow).next() {
        tensor["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40]);
    }
    cases.push(model_case(
        "shape whose element count overflows",
        FILE,
        Some(&safetensors_bytes(&overflow, &data)),
    ));

    let mut offset_overflow = header.clone();
    if let Some((_, tensor)) = tensors_mut(&mut offset_overflow).next() {
        tensor["data_offsets"] = serde_json::json!([u64::MAX - 1, u64::MAX]);
    }
    cases.push(model_case(
        "offsets near 2^64",
        FILE,
        Some(&safetensors_bytes(&offset_overflow, &data)),
    ));

    let mut missing = header.clone();
    let first_name = tensors_mut(&mut missing)
        .next()
        .map(|(name, _)| name.clone())
        .expect("a tensor");
    missing.remove(&first_name);
    cases.push(model_case(
        "a tensor missing",
        FILE,
        Some(&safetensors_bytes(&missing, &data)),
    ));
    let mut not_json = 9u64.to_le_bytes().to_vec();
    not_json.extend_from_slice(b"{not json");
    not_json.extend_from_slice(&data);
    cases.push(model_case("header not JSON", FILE, Some(&not_json)));
    assert_no_failures("safetensors", &cases);
}

#[test]
fn bad_tokenizers_are_refused_cleanly() {
    const FILE: &str = "tokenizer.json";
    let garbage = std::fs::read(fixture("tokenizer/garbage.json")).expect("fixture");
    let mut cases = vec![model_case("tokenizer/garbage.json", FILE, Some(&garbage))];
    cases.push(model_case(
        "binary",
        FILE,
        Some(&(0..=255u8).cycle().take(4096).collect::<Vec<u8>>()),
    ));
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(quickstart_model().join(FILE)).expect("tokenizer"))
            .expect("tokenizer JSON");
    // A word of the rows mapped past config.json's vocab_size (177).
    let mut beyond = original.clone();
    beyond["model"]["vocab"]["great"] = serde_json::json!(1130);
    cases.push(model_case(
        "ids ≥ vocab_size",
        FILE,
        Some(&serde_json::to_vec(&beyond).expect("encode")),
    ));
    let mut eos_beyond = original.clone();
    eos_beyond["added_tokens"][2]["id"] = serde_json::json!(5000);
    eos_beyond["model"]["vocab"]["</s>"] = serde_json::json!(5000);
    cases.push(model_case(
        "EOS id ≥ vocab_size",
        FILE,
        Some(&serde_json::to_vec(&eos_beyond).expect("encode")),
    ));
    assert_no_failures("tokenizer", &cases);
}

#[test]
fn bad_model_configs_are_refused_cleanly() {
    const FILE: &str = "config.json";
    let mut cases = Vec::new();
    for name in [
        "negative_sizes.json",
        "huge_dims.json",
        "huge_layers.json",
        "rms_norm_eps_negative.json",
        "zero_heads.json",
        "fractional_sizes.json",
    ] {
        let bytes = std::fs::read(fixture(&format!("config/{name}"))).expect("fixture");
        cases.push(model_case(
            &format!("config/{name} in a model"),
            FILE,
            Some(&bytes),
        ));
        // A lone config.json: `inspect` counts parameters without weights.
        cases.push(Case {
            name: format!("config/{name} alone"),
            dir: fixture("config"),
            names: name.to_string(),
            checks: vec![
                check(Expect::Fails, &["inspect", name]),
                check(Expect::Fails, &["inspect", name, "--target", "all-linear"]),
            ],
            _keep: None,
        });
    }
    cases.push(model_case(
        "not JSON",
        FILE,
        Some(b"{\"model_type\": \"llama\","),
    ));
    assert_no_failures("config.json", &cases);
}

// ---------------------------------------------------------------------------------------------
// Templates

#[test]
fn bad_templates_are_refused_cleanly() {
    let cases: Vec<Case> = [
        "syntax_error.j2",
        "runaway_loop.j2",
        "output_bomb.j2",
        "recursive_macro.j2",
    ]
    .into_iter()
    .map(template_case)
    .collect();
    assert_no_failures("template", &cases);
}
