//! Config of the `export` stage kind and its semantic checks: which trained adapter to export and
//! where the PEFT adapter folder and/or the merged model folder are published. Pure data plus
//! checks: whether a destination may leave the project directory depends on the `run` flag
//! `--allow-outside-project`, so that part is enforced when publishing (stages/export.rs), while
//! everything knowable from the file alone is checked here.

use std::path::{Component, Path};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::evaluate::check_upstream_kind;
use super::{CheckContext, InputFile, Problem, StageKind, StageSpec, UpstreamRef};

/// The `export` stage: the trained adapter as a PEFT folder and/or a merged model in Hugging Face
/// layout, built in the artifact and published (copied atomically) to the declared folders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Upstream `train` stage whose adapter is exported.
    pub from: String,
    /// Folder for the PEFT adapter (adapter_config.json, adapter_model.safetensors, README.md),
    /// relative to the pipeline's directory. Replaced as a whole on each publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// Folder for the merged model in Hugging Face layout (config.json, model.safetensors in the
    /// base model's dtype, tokenizer files, generation_config.json), relative to the pipeline's
    /// directory. Replaced as a whole on each publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<String>,
}

/// Why a destination as written is not acceptable inside the project (None: it is fine).
/// `..` components and absolute paths leave the project directory.
pub fn escape_reason(written: &str) -> Option<String> {
    let path = Path::new(written);
    if path.is_absolute() || written.starts_with('~') {
        return Some(format!("`{written}` is an absolute path"));
    }
    for component in path.components() {
        match component {
            Component::ParentDir => return Some(format!("`{written}` goes up with `..`")),
            Component::Prefix(_) | Component::RootDir => {
                return Some(format!("`{written}` is an absolute path"))
            }
            Component::CurDir | Component::Normal(_) => {}
        }
    }
    if path.components().all(|c| matches!(c, Component::CurDir)) {
        return Some(format!("`{written}` is the project directory itself"));
    }
    None
}

impl StageSpec for ExportConfig {
    fn upstream(&self) -> Vec<UpstreamRef> {
        vec![UpstreamRef {
            key: "from",
            stage: self.from.clone(),
        }]
    }

    fn input_files(&self, _project_dir: &Path) -> Result<Vec<InputFile>, String> {
        // The adapter and the base model come through the upstream train artifact.
        Ok(Vec::new())
    }

    fn output_columns(&self, _cx: &CheckContext<'_>, _stage: &str) -> Option<Vec<String>> {
        None
    }

    fn check(&self, cx: &CheckContext<'_>, at: &str, problems: &mut Vec<Problem>) {
        check_upstream_kind(
            cx,
            &self.from,
            StageKind::Train,
            format!("{at}.from"),
            problems,
        );
        if self.adapter.is_none() && self.merged.is_none() {
            problems.push(Problem::new(at.to_string(), "nothing to export").with_hint(
                "add `adapter: DIR` (PEFT adapter) and/or `merged: DIR` (merged model)",
            ));
        }
        let mut expanded = Vec::new();
        for (key, value) in [("adapter", &self.adapter), ("merged", &self.merged)] {
            let Some(written) = value else { continue };
            let path = format!("{at}.{key}");
            if written.trim().is_empty() {
                problems.push(Problem::new(path, "the destination is empty").about_value());
                continue;
            }
            match super::expand_env(written) {
                Ok(text) => {
                    if Path::new(&text)
                        .components()
                        .all(|c| c == Component::CurDir)
                    {
                        // Publishing replaces the destination as a whole: never the project.
                        problems.push(
                            Problem::new(
                                path,
                                format!("`{written}` is the project directory itself"),
                            )
                            .about_value(),
                        );
                        continue;
                    }
                    expanded.push((key, path, text));
                }
                Err(message) => problems.push(Problem::new(path, message).about_value()),
            }
        }
        if let [(_, _, first), (_, second_path, second)] = expanded.as_slice() {
            let first_path = Path::new(first);
            let second = Path::new(second);
            if first_path.starts_with(second) || second.starts_with(first_path) {
                problems.push(
                    Problem::new(
                        second_path.clone(),
                        "the adapter and merged destinations overlap: publishing one would replace the other",
                    )
                    .about_value()
                    .with_hint("use two separate folders, e.g. `out/adapter` and `out/merged`"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{RawPipeline, StageConfig};

    fn problems_of(export: &str) -> Vec<Problem> {
        let text = format!(
            "
stages:
  data: {{ ingest: {{ path: x.parquet }} }}
  prompts: {{ template: {{ input: data }} }}
  tune: {{ train: {{ data: prompts, model: base-model }} }}
  out: {{ export: {export} }}
"
        );
        let raw: RawPipeline = crate::config::evaluate::tests::from_yaml(&text).unwrap();
        let columns = BTreeMap::new();
        let cx = CheckContext {
            pipeline: &raw,
            project_dir: Path::new("."),
            columns: &columns,
            probe: &crate::config::probe::TestProbe,
        };
        let StageConfig::Export(config) = &raw.stages["out"] else {
            panic!("not an export stage");
        };
        let mut problems = Vec::new();
        config.check(&cx, "stages.out.export", &mut problems);
        problems
    }

    #[test]
    fn a_valid_export_has_no_problems() {
        assert!(problems_of("{ from: tune, adapter: out/adapter, merged: out/merged }").is_empty());
        assert!(problems_of("{ from: tune, merged: merged }").is_empty());
    }

    #[test]
    fn at_least_one_destination_is_required() {
        let problems = problems_of("{ from: tune }");
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.contains("nothing to export"));
    }

    #[test]
    fn the_project_directory_itself_is_refused() {
        let problems = problems_of("{ from: tune, adapter: . }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.out.export.adapter");
    }

    #[test]
    fn overlapping_destinations_are_refused() {
        let problems = problems_of("{ from: tune, adapter: out, merged: out/merged }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("overlap"));
    }

    #[test]
    fn from_must_be_a_train_stage() {
        let problems = problems_of("{ from: prompts, adapter: a }");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].path, "stages.out.export.from");
    }

    #[test]
    fn escape_reasons() {
        assert_eq!(escape_reason("out/adapter"), None);
        assert_eq!(escape_reason("./out"), None);
        assert!(escape_reason("../elsewhere").unwrap().contains(".."));
        assert!(escape_reason("out/../../x").unwrap().contains(".."));
        assert!(escape_reason("/tmp/x").unwrap().contains("absolute"));
        assert!(escape_reason("~/x").unwrap().contains("absolute"));
        assert!(escape_reason(".").unwrap().contains("project directory"));
    }
}
