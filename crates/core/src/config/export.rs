//! Config of the `export` stage kind and its semantic checks: which trained adapter to export and
//! where the PEFT adapter folder and/or the merged model folder are published. Pure data plus
//! checks: whether a destination may leave the project directory depends on the `run` flag
//! `--allow-outside-project`, so that part is enforced when publishing (stages/export.rs), while
//! everything knowable from the file alone is checked here.

use std::path::{Component, Path, PathBuf};

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
    /// Largest weight file of the merged model, e.g. `5GB` (the default, as transformers'
    /// `save_pretrained`), `500MB`, `2GiB`, `64KB` or `1000B` (GB/MB/KB are powers of 10,
    /// GiB/MiB/KiB of 2). A bigger model is written as `model-0000k-of-0000n.safetensors` with a
    /// `model.safetensors.index.json`; a smaller one as one `model.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shard_size: Option<String>,
    /// dtype of the merged model's floating-point weights: `f32`, `bf16` or `f16` (config.json's
    /// `torch_dtype` follows). Default: the base checkpoint's dtype, tensor by tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<ExportDtype>,
    /// What the published adapter's `adapter_config.json` and model card name as the base model
    /// (`base_model_name_or_path`), verbatim, e.g. a Hub id `org/name` the model was uploaded as.
    /// Default: the Hub id for an `hf://org/name` model, else the base model folder as resolved
    /// for this checkout when publishing (never the path of the checkout that trained it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
}

impl ExportConfig {
    /// The declared destinations: (artifact subfolder `adapter`/`merged`, destination as written).
    pub fn destinations(&self) -> Vec<(&'static str, &str)> {
        let mut out = Vec::new();
        if let Some(adapter) = &self.adapter {
            out.push(("adapter", adapter.as_str()));
        }
        if let Some(merged) = &self.merged {
            out.push(("merged", merged.as_str()));
        }
        out
    }
}

/// A floating-point dtype to export the merged model in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    F32,
    Bf16,
    F16,
}

impl ExportDtype {
    /// The name transformers writes as `torch_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
            ExportDtype::F16 => "float16",
        }
    }
}

/// The default `max_shard_size` (transformers' `save_pretrained` default).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// Parse a size as transformers' `convert_file_size_to_int` does: `5GB` = 5·10⁹, `2GiB` = 2·2³⁰,
/// also MB/MiB, KB/KiB and plain bytes (`1000B` or `1000`).
pub fn parse_size(written: &str) -> Result<u64, String> {
    let text = written.trim();
    let units: [(&str, u64); 7] = [
        ("GIB", 1 << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ];
    let upper = text.to_ascii_uppercase();
    let (number, factor) = units
        .iter()
        .find_map(|(unit, factor)| upper.strip_suffix(unit).map(|n| (n.trim(), *factor)))
        .unwrap_or((upper.as_str(), 1));
    let bad =
        || format!("`{written}` is not a size (write e.g. `5GB`, `500MB`, `2GiB` or `1000B`)");
    let value: f64 = number.parse().map_err(|_| bad())?;
    if !value.is_finite() || value <= 0.0 {
        return Err(bad());
    }
    let bytes = value * factor as f64;
    if bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
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

    fn published_paths(&self, project_dir: &Path) -> Result<Vec<PathBuf>, String> {
        self.destinations()
            .into_iter()
            .map(|(_, written)| {
                let expanded = super::expand_env(written)?;
                Ok(if Path::new(&expanded).is_absolute() {
                    PathBuf::from(expanded)
                } else {
                    project_dir.join(expanded)
                })
            })
            .collect()
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
        if let Some(name) = &self.base_model_name_or_path {
            if name.trim().is_empty() {
                problems.push(
                    Problem::new(format!("{at}.base_model_name_or_path"), "is empty")
                        .about_value()
                        .with_hint("leave it out to name the base model the pipeline trained on"),
                );
            }
            if self.adapter.is_none() {
                problems.push(
                    Problem::new(
                        at.to_string(),
                        "`base_model_name_or_path` applies to the adapter, but there is no `adapter` destination",
                    )
                    .with_hint("add `adapter: DIR`, or drop it"),
                );
            }
        }
        if let Some(size) = &self.max_shard_size {
            if let Err(message) = parse_size(size) {
                problems.push(Problem::new(format!("{at}.max_shard_size"), message));
            }
        }
        if self.merged.is_none() && (self.max_shard_size.is_some() || self.dtype.is_some()) {
            problems.push(
                Problem::new(
                    at.to_string(),
                    "`max_shard_size` and `dtype` apply to the merged model, but there is no `merged` destination",
                )
                .with_hint("add `merged: DIR`, or drop them"),
            );
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
    fn shard_size_and_dtype_are_checked() {
        assert!(
            problems_of("{ from: tune, merged: m, max_shard_size: 2GiB, dtype: bf16 }").is_empty()
        );
        let problems = problems_of("{ from: tune, merged: m, max_shard_size: lots }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.out.export.max_shard_size");
        let problems = problems_of("{ from: tune, adapter: a, dtype: f16 }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("no `merged` destination"));
    }

    #[test]
    fn base_model_name_needs_an_adapter_and_a_value() {
        assert!(
            problems_of("{ from: tune, adapter: a, base_model_name_or_path: org/tiny }").is_empty()
        );
        let problems = problems_of("{ from: tune, merged: m, base_model_name_or_path: org/x }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("no `adapter` destination"));
        let problems = problems_of("{ from: tune, adapter: a, base_model_name_or_path: ' ' }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].path,
            "stages.out.export.base_model_name_or_path"
        );
    }

    #[test]
    fn published_paths_resolve_against_the_project() {
        let StageConfig::Export(config) =
            crate::config::evaluate::tests::from_yaml::<BTreeMap<String, StageConfig>>(
                "out: { export: { from: tune, adapter: out/a, merged: /abs/m } }",
            )
            .unwrap()
            .remove("out")
            .unwrap()
        else {
            panic!("not an export stage");
        };
        assert_eq!(
            config.published_paths(Path::new("/project")).unwrap(),
            [PathBuf::from("/project/out/a"), PathBuf::from("/abs/m")]
        );
    }

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("500mb"), Ok(500_000_000));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("1000B"), Ok(1000));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "GB", "-1GB", "0", "five", "1TB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
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
