//! Shared helpers of the binary-level tests that train (crash, concurrency, faults, freshness):
//! a temporary project holding a copy of the quickstart data and tiny model and a small
//! five-stage pipeline (ingest → template → train → evaluate → export) that runs in a few seconds
//! on two cores, with checkpoints every two steps; ways to run, spawn and kill the binary in it;
//! and readers of what a run recorded.
#![allow(dead_code, reason = "each test file uses a different subset")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The pipeline: the quickstart, cut down (400 input rows, 16 training steps, a checkpoint every
/// 2 steps, 40 evaluation rows, no samples).
pub const PIPELINE: &str = r#"name: quick
seed: 17
stages:
  data:
    ingest:
      path: data/reviews.parquet
      columns: [text, label]
      drop_nulls: true
      limit: 400
      split:
        fractions: {train: 0.8, eval: 0.2}
        stratify_by: label
  prompts:
    template:
      input: data
      prompt: "review: {{ text }}\nsentiment:"
      completion: " {{ label }}"
      label: label
  train:
    train:
      data: prompts
      model: model
      method:
        lora: {r: 4, alpha: 8, target_modules: all-linear}
      learning_rate: 0.01
      batch_size: 16
      max_steps: 16
      checkpoint_every: 2
      max_seq_len: 48
      device: cpu
  evaluate:
    evaluate:
      model: train
      data: prompts
      max_rows: 40
      samples: 0
      metrics:
        accuracy:
          choices: [" positive", " negative"]
          labels: [positive, negative]
          label_column: label
      device: cpu
  export:
    export:
      from: train
      adapter: exported/adapter
"#;

/// The stages of [`PIPELINE`], in order.
pub const STAGES: [&str; 5] = ["data", "prompts", "train", "evaluate", "export"];

/// The quickstart's data and model in the repository.
fn quickstart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/quickstart")
}

pub struct TrainProject {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl TrainProject {
    /// A project with `data/reviews.parquet`, `model/` and `pipeline.yaml` ([`PIPELINE`]).
    pub fn new() -> TrainProject {
        TrainProject::with_pipeline(PIPELINE)
    }

    pub fn with_pipeline(yaml: &str) -> TrainProject {
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path().canonicalize().expect("canonical directory");
        let project = TrainProject { _dir: dir, root };
        std::fs::create_dir_all(project.path("data")).expect("data dir");
        std::fs::copy(
            quickstart().join("reviews.parquet"),
            project.path("data/reviews.parquet"),
        )
        .expect("copy the data");
        std::fs::create_dir_all(project.path("model")).expect("model dir");
        for entry in std::fs::read_dir(quickstart().join("model")).expect("model") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), project.path("model").join(entry.file_name()))
                .expect("copy the model");
        }
        project.write("pipeline.yaml", yaml);
        project
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    pub fn write(&self, relative: &str, content: &str) {
        let path = self.path(relative);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("directories");
        std::fs::write(path, content).expect("write");
    }

    /// `peftpipe ARGS` in the project, with a clean environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_peftpipe"));
        command
            .args(args)
            .current_dir(&self.root)
            .env_remove("PEFTPIPE_CACHE_DIR")
            .env_remove("PEFTPIPE_VERSION_OVERRIDE")
            .env_remove("PEFTPIPE_TEST_STAGE_DELAY")
            .env_remove("PEFTPIPE_TEST_CHECKPOINT_DELAY")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run peftpipe")
    }

    /// `peftpipe --json run FILE EXTRA...`, which must succeed: its summary.
    pub fn run_ok(&self, file: &str, extra: &[&str]) -> RunResult {
        let mut args = vec!["--json", "run", file];
        args.extend_from_slice(extra);
        let output = self.run(&args);
        assert!(
            output.status.success(),
            "peftpipe {args:?} failed:\n{}",
            stderr(&output)
        );
        RunResult::new(&output)
    }

    /// Start `peftpipe run FILE` with extra environment, stderr streamed (see [`Running`]).
    pub fn spawn(&self, file: &str, env: &[(&str, &str)]) -> Running {
        let mut command = self.command(&["run", file]);
        for (key, value) in env {
            command.env(key, value);
        }
        Running::start(command)
    }

    /// The lock file of pipeline `name` in the default cache (Null when absent).
    pub fn lock_file(&self, name: &str) -> serde_json::Value {
        let path = self.path(&format!(".peftpipe/cache/locks/{name}.lock.json"));
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).expect("lock file is JSON"),
            Err(_) => serde_json::Value::Null,
        }
    }

    /// Stage → output digest recorded in pipeline `name`'s lock file.
    pub fn recorded_outputs(&self, name: &str) -> BTreeMap<String, String> {
        let lock = self.lock_file(name);
        let mut out = BTreeMap::new();
        if let Some(stages) = lock["stages"].as_object() {
            for (stage, entry) in stages {
                if let Some(output) = entry["output"].as_str() {
                    out.insert(stage.clone(), output.to_string());
                }
            }
        }
        out
    }

    /// Every checkpoint directory (`checkpoints/<pipeline>/<stage>/<fingerprint>`) of the
    /// default cache.
    pub fn checkpoint_dirs(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for pipeline in list(&self.path(".peftpipe/cache/checkpoints")) {
            for stage in list(&pipeline) {
                found.extend(list(&stage));
            }
        }
        found.sort();
        found
    }

    /// Whether some checkpoint directory holds a complete checkpoint (`step-*/state.json`).
    pub fn has_complete_checkpoint(&self) -> bool {
        self.checkpoint_dirs().iter().any(|dir| {
            list(dir).iter().any(|entry| {
                entry
                    .file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with("step-"))
                    && entry.join("state.json").is_file()
            })
        })
    }

    /// Remove the cache, the outputs and the exports: the next run is a clean one.
    pub fn wipe(&self) {
        for dir in [".peftpipe", "exported"] {
            let path = self.path(dir);
            if path.exists() {
                std::fs::remove_dir_all(&path).expect("wipe");
            }
        }
    }
}

fn list(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
    paths.sort();
    paths
}

/// What a `--json` run reported.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub json: serde_json::Value,
    pub stderr: String,
}

impl RunResult {
    pub fn new(output: &Output) -> RunResult {
        RunResult {
            json: serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
                panic!(
                    "--json output is not JSON ({error}):\n{}\n{}",
                    String::from_utf8_lossy(&output.stdout),
                    stderr(output)
                )
            }),
            stderr: stderr(output),
        }
    }

    fn stage(&self, name: &str) -> &serde_json::Value {
        self.json["stages"]
            .as_array()
            .and_then(|stages| stages.iter().find(|stage| stage["name"] == name))
            .unwrap_or_else(|| panic!("no stage {name} in {}", self.json))
    }

    /// `fresh`, `ran`, ...
    pub fn status(&self, stage: &str) -> String {
        self.stage(stage)["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The stages this run executed (not restored).
    pub fn ran(&self) -> Vec<String> {
        self.json["stages"]
            .as_array()
            .map(|stages| {
                stages
                    .iter()
                    .filter(|stage| stage["status"] == "ran")
                    .filter_map(|stage| stage["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn outcome(&self, stage: &str) -> &serde_json::Value {
        &self.stage(stage)["outcome"]
    }

    pub fn output(&self, stage: &str) -> String {
        self.stage(stage)["output"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Whether the train stage resumed a checkpoint in this run.
    pub fn resumed(&self) -> bool {
        self.stderr.contains("resumed from the checkpoint")
            || !self.outcome("train")["resumed_from"].is_null()
    }
}

/// A spawned `peftpipe run` whose stderr lines are collected by a thread as they come.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Running {
    pub fn start(mut command: Command) -> Running {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn peftpipe");
        let stderr = child.stderr.take().expect("stderr");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait until a stderr line contains `needle` (true), or the process ended or `timeout`
    /// passed (false).
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if self.seen.iter().any(|line| line.contains(needle)) {
            return true;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.lines.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return true;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// Poll `condition` every 5 ms until it holds (true) or the process ends or `timeout`
    /// passes (false).
    pub fn wait_until(&mut self, timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if condition() {
                return true;
            }
            if self.child.try_wait().expect("poll").is_some() {
                return condition();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        self.child.wait().expect("reap");
    }

    /// Send a signal (`-INT`, `-TERM`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill(1)");
        assert!(sent.success());
    }

    /// Wait for the end; the exit code and every stderr line.
    pub fn finish(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().expect("wait");
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        (status.code(), self.seen.join("\n"))
    }
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every file under `dir` (relative path → content).
pub fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for path in list(&current) {
            if path.is_dir() {
                stack.push(path);
            } else {
                let relative = path
                    .strip_prefix(dir)
                    .expect("under dir")
                    .to_string_lossy()
                    .into_owned();
                files.insert(relative, std::fs::read(&path).expect("read"));
            }
        }
    }
    files
}

/// Change one weight of the model a little (the low byte of the last float of
/// `model.safetensors`): a valid model with other weights.
pub fn nudge_weights(project: &TrainProject) {
    let path = project.path("model/model.safetensors");
    let mut bytes = std::fs::read(&path).expect("read weights");
    let last = bytes.len() - 4;
    bytes[last] ^= 0x5a;
    std::fs::write(&path, bytes).expect("write weights");
}
