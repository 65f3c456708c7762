//! Shared helpers of the executor's integration tests (freshness, faults, cache): a temporary
//! project with a small JSONL dataset and a two-stage pipeline (ingest → template), a way to run
//! the binary in it, and redaction of paths, digests and timings for snapshots.
#![allow(dead_code, reason = "each test file uses a different subset")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const PIPELINE: &str = r#"name: reviews
seed: 7
stages:
  data:
    ingest:
      path: datasets/reviews.jsonl
      split:
        fractions: {train: 0.75, eval: 0.25}
  prompts:
    template:
      input: data
      prompt_file: templates/prompt.j2
      completion: " {{ label }}"
      label: label
      few_shot: {k: 1}
"#;

pub const PROMPT_TEMPLATE: &str = "{% for example in examples %}Review: {{ example.text }}\nSentiment: {{ example.label }}\n\n{% endfor %}Review: {{ text }}\nSentiment:";

/// The dataset's rows: (text, label).
pub fn rows() -> Vec<(String, &'static str)> {
    (0..40)
        .map(|index| {
            let label = if index % 2 == 0 {
                "positive"
            } else {
                "negative"
            };
            (format!("review number {index} was {label}"), label)
        })
        .collect()
}

pub fn jsonl(rows: &[(String, &str)]) -> String {
    rows.iter()
        .map(|(text, label)| format!("{{\"text\": \"{text}\", \"label\": \"{label}\"}}\n"))
        .collect()
}

pub struct Project {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Project {
    /// A project with the reviews dataset, the prompt template and `pipeline.yaml`.
    pub fn new() -> Project {
        Project::with_pipeline(PIPELINE)
    }

    pub fn with_pipeline(yaml: &str) -> Project {
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir
            .path()
            .canonicalize()
            .expect("canonical temporary directory");
        let project = Project { _dir: dir, root };
        project.write("datasets/reviews.jsonl", &jsonl(&rows()));
        project.write("templates/prompt.j2", PROMPT_TEMPLATE);
        project.write("pipeline.yaml", yaml);
        project
    }

    pub fn write(&self, relative: &str, content: &str) {
        let path = self.root.join(relative);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("create directories");
        std::fs::write(&path, content).expect("write file");
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// `peftpipe ARGS` in the project directory, with a clean environment for the cache and
    /// the test-only variables.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_peftpipe"));
        command
            .args(args)
            .current_dir(&self.root)
            .env_remove("PEFTPIPE_CACHE_DIR")
            .env_remove("PEFTPIPE_VERSION_OVERRIDE")
            .env_remove("PEFTPIPE_TEST_STAGE_DELAY")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run peftpipe")
    }

    /// The lock file of the `reviews` pipeline in the default cache, as JSON (Null when absent).
    pub fn lock_file(&self) -> serde_json::Value {
        let path = self.root.join(".peftpipe/cache/locks/reviews.lock.json");
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).expect("lock file is JSON"),
            Err(_) => serde_json::Value::Null,
        }
    }

    /// The output digest the lock file records for a stage.
    pub fn recorded_output(&self, stage: &str) -> Option<String> {
        self.lock_file()["stages"][stage]["output"]
            .as_str()
            .map(String::from)
    }

    pub fn object_data(&self, digest: &str) -> PathBuf {
        self.root
            .join(".peftpipe/cache/objects")
            .join(&digest[..2])
            .join(digest)
            .join("data")
    }

    pub fn redact(&self, text: &str) -> String {
        redact(text, &self.root)
    }
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Replace the project path, 64-hex digests and timings so snapshots are stable.
pub fn redact(text: &str, root: &Path) -> String {
    let text = text.replace(&root.display().to_string(), "[PROJECT]");
    let digests = regex::Regex::new(r"\b[0-9a-f]{64}\b").expect("regex");
    let text = digests.replace_all(&text, "[HASH]");
    let times =
        regex::Regex::new(r"\b\d+(\.\d+)?m?s\b|\b\d+m\d\ds\b|\b\d+h\d\dm\b").expect("regex");
    let text = times.replace_all(&text, "[TIME]");
    // Timing columns change width: collapse runs of spaces in table rows.
    let spaces = regex::Regex::new(r" {2,}").expect("regex");
    text.lines()
        .map(|line| {
            let leading = line.len() - line.trim_start().len();
            format!(
                "{}{}",
                &line[..leading],
                spaces.replace_all(line.trim_start(), "  ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every file under `dir` (relative path → content), for comparing outputs.
pub fn tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).expect("list directory") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let relative = path
                    .strip_prefix(dir)
                    .expect("under dir")
                    .to_string_lossy()
                    .into_owned();
                files.insert(relative, std::fs::read(&path).expect("read file"));
            }
        }
    }
    files
}
