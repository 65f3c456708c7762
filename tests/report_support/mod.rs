//! Helpers of the report, metrics and CLI tests: a temporary project with the quickstart's data
//! and tiny model and a short pipeline (three training steps), and the binary run in it.
#![allow(dead_code, reason = "each test file uses a different subset")]

use std::path::{Path, PathBuf};
use std::process::Output;

/// The tiny pipeline: ingest 200 rows, template, 3 training steps, evaluate 16 rows with two
/// samples, export the adapter. `{name}`, `{r}` are replaced.
pub const TINY: &str = r#"name: {name}
seed: 3
stages:
  data:
    ingest:
      path: data/reviews.parquet
      columns: [text, label]
      filters:
        - in_set: {column: label, values: [positive, negative]}
      drop_nulls: true
      limit: 200
      split: {fractions: {train: 0.8, eval: 0.2}}
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
      method: {lora: {r: {r}, alpha: 8, target_modules: all-linear}}
      learning_rate: 0.003
      batch_size: 8
      max_steps: 3
      max_seq_len: 48
      device: cpu
  evaluate:
    evaluate:
      model: train
      data: prompts
      metrics:
        accuracy:
          choices: [" positive", " negative"]
          labels: [positive, negative]
          label_column: label
      max_rows: 16
      samples: 2
      device: cpu
  export:
    export:
      from: train
      adapter: out/{name}/adapter
"#;

/// The tiny pipeline named `name` with LoRA rank `r`.
pub fn tiny_yaml(name: &str, r: u32) -> String {
    TINY.replace("{name}", name).replace("{r}", &r.to_string())
}

pub struct Project {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Project {
    /// A project with the quickstart's model under `model/`, its reviews under `data/` and
    /// `pipeline.yaml` = the tiny pipeline named `tiny`.
    pub fn tiny() -> Project {
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path().canonicalize().expect("canonical");
        let project = Project { _dir: dir, root };
        let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/quickstart");
        copy_dir(&quickstart.join("model"), &project.root.join("model"));
        std::fs::create_dir_all(project.root.join("data")).expect("create data/");
        std::fs::copy(
            quickstart.join("reviews.parquet"),
            project.root.join("data/reviews.parquet"),
        )
        .expect("copy the dataset");
        project.write("pipeline.yaml", &tiny_yaml("tiny", 4));
        project
    }

    /// An empty project folder.
    pub fn empty() -> Project {
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path().canonicalize().expect("canonical");
        Project { _dir: dir, root }
    }

    pub fn write(&self, relative: &str, content: &str) {
        let path = self.root.join(relative);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("create directories");
        std::fs::write(&path, content).expect("write file");
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// `peftpipe ARGS` here, without inherited cache/log settings, colors off.
    pub fn peftpipe(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_peftpipe"))
            .args(args)
            .current_dir(&self.root)
            .env_remove("PEFTPIPE_CACHE_DIR")
            .env_remove("PEFTPIPE_VERSION_OVERRIDE")
            .env_remove("PEFTPIPE_TEST_STAGE_DELAY")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .output()
            .expect("run peftpipe")
    }

    /// Like [`Project::peftpipe`], asserting success.
    pub fn ok(&self, args: &[&str]) -> Output {
        let output = self.peftpipe(args);
        assert!(
            output.status.success(),
            "peftpipe {args:?} failed:\n{}",
            stderr(&output)
        );
        output
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create");
    for entry in std::fs::read_dir(from).expect("list") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
            let mut permissions = std::fs::metadata(&target).expect("metadata").permissions();
            #[expect(clippy::permissions_set_readonly_false, reason = "test copies")]
            permissions.set_readonly(false);
            std::fs::set_permissions(&target, permissions).expect("writable");
        }
    }
}
