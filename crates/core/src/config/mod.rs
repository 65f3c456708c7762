//! The YAML surface: raw serde types (as written), per-kind stage configs as pure data, and
//! validation into a checked [`Pipeline`]. Errors carry file:line:column and the key path.
//! This module never hashes, runs or loads anything beyond file metadata; what needs Arrow or a
//! model (Parquet footers, chat-template compilation, a model's linear layers) it asks a
//! [`probe::Probe`] the caller supplies.
//!
//! Ownership of files: `mod.rs` (top-level types, the `StageSpec` trait), `load.rs` (parse, spans,
//! `--set` overrides, collecting every problem), `matrix.rs` (`matrix:` expansion of a stage
//! into `stage@…` stages, on the value tree before deserialization), `problem.rs` (diagnostics), `probe.rs` (the
//! questions validation asks the main crate); one file per stage kind (`ingest.rs`, `template.rs`,
//! `train.rs`, `evaluate.rs`, `export.rs`) holding that kind's config and its semantic checks, with
//! the pure helpers they share with the stages: `input.rs` (input paths → files),
//! `jinja.rs` (the row-template environment), `chat_template.rs` (loading chat templates),
//! `target_modules.rs` (PEFT target specs), `hub.rs` (`hf://` model ids in the local Hugging Face
//! cache), `paths.rs` (the path policy: templates and export destinations stay inside the
//! project unless `--allow-outside-project`), `project_config.rs` (`.peftpipe/config.yaml`, the
//! project's settings that are not part of any pipeline: the remote cache).

pub mod auxiliary;
pub mod chat_template;
pub mod devices;
pub mod evaluate;
pub mod export;
pub mod hub;
pub mod ingest;
pub mod input;
pub mod jinja;
pub mod load;
pub mod matrix;
pub mod method;
pub mod paths;
pub mod probe;
pub mod problem;
pub mod project_config;
pub mod target_modules;
pub mod template;
pub mod train;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use evaluate::EvaluateConfig;
pub use export::ExportConfig;
pub use ingest::IngestConfig;
pub use probe::Probe;
pub use problem::{Problem, Problems};
pub use template::TemplateConfig;
pub use train::TrainConfig;

/// What the command line decides about validation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// `--allow-outside-project`: template files and export destinations may resolve outside
    /// the project directory (see [`paths`]).
    pub allow_outside_project: bool,
}

/// A pipeline as written in YAML.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    /// Name of the pipeline (defaults to the file stem): letters, digits, `-` and `_`, at most
    /// 64 characters. It names the pipeline's lock file in the cache and its
    /// `.peftpipe/out/<name>/` folder, so two pipelines of one project need different names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"))]
    pub name: Option<String>,
    /// Global seed; every stage's randomness (shuffles, splits, few-shot draws, init, dropout)
    /// derives from it and the stage name. Part of every fingerprint.
    #[serde(default)]
    pub seed: u64,
    /// The stages, by name. Each stage has exactly one kind key (`ingest`, `template`, `train`,
    /// `evaluate`, `export`), optionally a `matrix:` next to it (one stage per combination of
    /// values, named `<stage>@…`), and names the upstream stages it reads. Stage names use
    /// letters, digits, `-` and `_`, at most 64 characters.
    #[schemars(extend("propertyNames" = { "pattern": "^[A-Za-z0-9_-]{1,64}$" }, "minProperties" = 1))]
    pub stages: IndexMap<String, StageConfig>,
}

/// One stage: externally tagged by its kind.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StageConfig {
    /// Read Parquet / JSONL / CSV, map columns, filter, dedup and split.
    Ingest(IngestConfig),
    /// Render prompts and completions with minijinja.
    Template(TemplateConfig),
    /// Train a PEFT adapter on a pre-trained model (boxed: by far the largest config).
    Train(Box<TrainConfig>),
    /// Evaluate base and adapted model on held-out data.
    Evaluate(EvaluateConfig),
    /// Export the adapter in PEFT format and/or a merged model.
    Export(ExportConfig),
}

/// The kind of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Ingest,
    Template,
    Train,
    Evaluate,
    Export,
}

impl StageKind {
    /// Every kind, in pipeline order.
    pub const ALL: [StageKind; 5] = [
        StageKind::Ingest,
        StageKind::Template,
        StageKind::Train,
        StageKind::Evaluate,
        StageKind::Export,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Ingest => "ingest",
            StageKind::Template => "template",
            StageKind::Train => "train",
            StageKind::Evaluate => "evaluate",
            StageKind::Export => "export",
        }
    }
}

impl std::fmt::Display for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl StageKind {
    /// The kind with its article, for messages: "an ingest", "a template".
    pub fn with_article(self) -> String {
        let name = self.as_str();
        let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {name}")
    }
}

/// A reference from one stage to an upstream stage, with the key (relative to the kind's mapping)
/// that holds it, e.g. `("input", "data")` for `template: { input: data }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRef {
    pub key: &'static str,
    pub stage: String,
}

/// An input file a stage reads, as the fingerprint sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// Stable, machine-independent name: the path as written in the pipeline (environment
    /// variables unexpanded, relative to the pipeline directory), plus the matched file's suffix
    /// when the pattern was a glob or directory. Never an absolute path of this machine.
    pub key: String,
    /// Where the file is on this machine.
    pub path: PathBuf,
}

/// Whether two paths name one file (compared canonicalized when both resolve).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// What semantic checks may look at: the whole pipeline and where it lives.
pub struct CheckContext<'a> {
    pub pipeline: &'a RawPipeline,
    /// Directory of the pipeline file; relative paths resolve against it.
    pub project_dir: &'a Path,
    /// Output columns of each stage that could be determined (ingest from Parquet footers,
    /// template from its outputs). Filled in topological order before `check` runs.
    pub columns: &'a BTreeMap<String, Vec<String>>,
    /// Answers what needs Arrow or a model (column names of input files, chat templates, a
    /// model's linear layers).
    pub probe: &'a dyn Probe,
}

impl CheckContext<'_> {
    /// config.json's `model_type` of the model written `written` (a folder or `hf://` id), when
    /// it resolves and says. Reads config.json alone: the probe's full model check (headers,
    /// tokenizer) reports that file's problems where the model is checked.
    pub fn model_type(&self, written: &str) -> Option<String> {
        let dir = hub::resolve_model_dir(self.project_dir, written).ok()?;
        let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
        let config: serde_json::Value = serde_json::from_str(&text).ok()?;
        config.get("model_type")?.as_str().map(str::to_string)
    }
}

/// What every stage-kind config provides to validation, planning and fingerprinting.
pub trait StageSpec {
    /// Upstream stages read by this stage.
    fn upstream(&self) -> Vec<UpstreamRef>;
    /// Files whose contents feed the stage (globs and directories expanded, sorted by key).
    /// Errors are messages for the user (missing file, bad glob).
    fn input_files(&self, project_dir: &Path) -> Result<Vec<InputFile>, String>;
    /// [`Self::input_files`] as the fingerprint keys them: refused when two different files would
    /// get one key once `\` and `..` are folded ([`crate::fingerprint::normalize_key`]), as
    /// `x/y.jsonl` and a file named `x\y.jsonl` do: one digest would stand for both, so a change
    /// to the other would go unseen. One file reached by two spellings is kept once.
    fn fingerprint_inputs(&self, project_dir: &Path) -> Result<Vec<InputFile>, String> {
        let files = self.input_files(project_dir)?;
        let mut seen: BTreeMap<String, &InputFile> = BTreeMap::new();
        let mut kept = Vec::with_capacity(files.len());
        for file in &files {
            let key = crate::fingerprint::normalize_key(&file.key);
            match seen.get(&key) {
                None => {
                    seen.insert(key, file);
                    kept.push(file.clone());
                }
                Some(first) if same_file(&first.path, &file.path) => {}
                Some(first) => {
                    return Err(format!(
                        "{} and {} would share one cache key (`{key}`): the cache could not tell a change to one from the other; rename one of them",
                        first.path.display(),
                        file.path.display()
                    ))
                }
            }
        }
        Ok(kept)
    }
    /// Columns this stage outputs, if they can be known without running (used to check
    /// downstream templates and column references).
    fn output_columns(&self, cx: &CheckContext<'_>, stage: &str) -> Option<Vec<String>>;
    /// Semantic checks. `at` is the key path of this stage's kind mapping, e.g.
    /// `stages.prompts.template`; problems use it as a prefix for their key paths.
    fn check(&self, cx: &CheckContext<'_>, at: &str, problems: &mut Vec<Problem>);
    /// Parts of the environment that change results (device kind, dtype), as fingerprint
    /// components. Empty for data stages.
    fn environment(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    /// The device the stage computes on, as written (`auto`, `cpu`, `cuda`, `cuda:N`), for kinds
    /// that compute on one; None for kinds that only move data. The executor gives each GPU to
    /// one such stage at a time (`exec::slots`). Default: None.
    fn device(&self) -> Option<&str> {
        None
    }
    /// Folders outside the cache the stage publishes its output to (export destinations),
    /// resolved against the project directory, so `status` can check them. Default: none.
    fn published_paths(&self, _project_dir: &Path) -> Result<Vec<PathBuf>, String> {
        Ok(Vec::new())
    }
    /// What publishing writes into the destinations that is decided on this machine, not
    /// cached (an export's `base_model_name_or_path`: the base model folder of this checkout),
    /// by name. Recorded with each publish; when it changes, the destinations are published
    /// again. Default: nothing.
    fn publish_context(&self, _pipeline: &Pipeline) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}

impl StageConfig {
    pub fn kind(&self) -> StageKind {
        match self {
            StageConfig::Ingest(_) => StageKind::Ingest,
            StageConfig::Template(_) => StageKind::Template,
            StageConfig::Train(_) => StageKind::Train,
            StageConfig::Evaluate(_) => StageKind::Evaluate,
            StageConfig::Export(_) => StageKind::Export,
        }
    }

    /// The kind's config as the trait every kind implements.
    pub fn spec(&self) -> &dyn StageSpec {
        match self {
            StageConfig::Ingest(c) => c,
            StageConfig::Template(c) => c,
            StageConfig::Train(c) => c.as_ref(),
            StageConfig::Evaluate(c) => c,
            StageConfig::Export(c) => c,
        }
    }

    /// The kind's parameters as JSON (resolved, defaults filled in, without the fields that do
    /// not change results, e.g. [`TrainConfig::NOT_HASHED`]): what the fingerprint hashes.
    pub fn params(&self) -> serde_json::Value {
        let value = match self {
            StageConfig::Ingest(c) => serde_json::to_value(c),
            StageConfig::Template(c) => serde_json::to_value(c),
            StageConfig::Train(c) => serde_json::to_value(c).map(|mut value| {
                if let Some(object) = value.as_object_mut() {
                    for key in TrainConfig::NOT_HASHED {
                        object.remove(*key);
                    }
                }
                value
            }),
            StageConfig::Evaluate(c) => serde_json::to_value(c),
            StageConfig::Export(c) => serde_json::to_value(c),
        };
        // Serializing plain data structs cannot fail.
        value.unwrap_or(serde_json::Value::Null)
    }
}

/// A validated pipeline: every reference resolves, the graph is acyclic, inputs exist.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The pipeline's name (from `name:` or the file stem).
    pub name: String,
    /// The pipeline file as given on the command line.
    pub file: PathBuf,
    /// Directory of the pipeline file; relative paths resolve against it.
    pub project_dir: PathBuf,
    pub seed: u64,
    /// Stages in file order.
    pub stages: IndexMap<String, StageConfig>,
    /// The `--set` overrides applied, as written (`key.path=value`).
    pub overrides: Vec<String>,
}

/// Expand `${VAR}` and `$VAR` in a path string from the environment. Errors name the variable.
pub fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let (name, consumed) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(end) => (&inner[..end], end + 2),
                None => return Err(format!("unterminated `${{` in `{text}`")),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        if name.is_empty() {
            out.push('$');
            rest = after;
            continue;
        }
        match std::env::var(name) {
            Ok(value) => out.push_str(&value),
            Err(_) => {
                return Err(format!(
                    "environment variable `{name}` is not set (used in `{text}`)"
                ))
            }
        }
        rest = &after[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Resolve a path as written in the pipeline (env vars expanded) against the project dir.
pub fn resolve_path(project_dir: &Path, written: &str) -> Result<PathBuf, String> {
    let expanded = expand_env(written)?;
    let path = PathBuf::from(expanded);
    Ok(if path.is_absolute() {
        path
    } else {
        project_dir.join(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage that reads the files it is given.
    struct Reads(Vec<InputFile>);

    impl StageSpec for Reads {
        fn upstream(&self) -> Vec<UpstreamRef> {
            Vec::new()
        }
        fn input_files(&self, _: &Path) -> Result<Vec<InputFile>, String> {
            Ok(self.0.clone())
        }
        fn output_columns(&self, _: &CheckContext<'_>, _: &str) -> Option<Vec<String>> {
            None
        }
        fn check(&self, _: &CheckContext<'_>, _: &str, _: &mut Vec<Problem>) {}
    }

    #[test]
    fn stage_kinds_take_their_article() {
        assert_eq!(StageKind::Ingest.with_article(), "an ingest");
        assert_eq!(StageKind::Evaluate.with_article(), "an evaluate");
        assert_eq!(StageKind::Export.with_article(), "an export");
        assert_eq!(StageKind::Template.with_article(), "a template");
        assert_eq!(StageKind::Train.with_article(), "a train");
    }

    #[test]
    fn two_files_with_one_cache_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = |key: &str, name: &str| InputFile {
            key: key.to_string(),
            path: dir.path().join(name),
        };
        std::fs::create_dir(dir.path().join("x")).unwrap();
        for name in ["x/y.jsonl", "x\\y.jsonl"] {
            std::fs::write(dir.path().join(name), "{}\n").unwrap();
        }
        // `x/y.jsonl` and the file named `x\y.jsonl`: one key once folded, two files.
        let error = Reads(vec![
            input("d/x/y.jsonl", "x/y.jsonl"),
            input("d/x\\y.jsonl", "x\\y.jsonl"),
        ])
        .fingerprint_inputs(dir.path())
        .unwrap_err();
        assert!(error.contains("`d/x/y.jsonl`"), "{error}");
        assert!(error.contains("rename one"), "{error}");
        // One file spelled two ways is one input.
        let kept = Reads(vec![
            input("d/x/y.jsonl", "x/y.jsonl"),
            input("d/x/../x/y.jsonl", "x/../x/y.jsonl"),
        ])
        .fingerprint_inputs(dir.path())
        .unwrap();
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn expand_env_replaces_braced_and_bare_variables() {
        std::env::set_var("PEFTPIPE_TEST_EXPAND", "/x");
        assert_eq!(expand_env("${PEFTPIPE_TEST_EXPAND}/a").unwrap(), "/x/a");
        assert_eq!(expand_env("$PEFTPIPE_TEST_EXPAND/a").unwrap(), "/x/a");
        assert_eq!(expand_env("plain/a").unwrap(), "plain/a");
        assert!(expand_env("${PEFTPIPE_TEST_MISSING_VAR}/a")
            .unwrap_err()
            .contains("PEFTPIPE_TEST_MISSING_VAR"));
    }
}
