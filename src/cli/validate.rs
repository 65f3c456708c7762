//! `peftpipe validate FILE...`: syntax, schema and semantic checks of every file, every problem
//! reported; pipelines of one project (or cache) that share a name are a problem of each; exit 2
//! when any file is invalid. Nothing runs.

use std::path::PathBuf;

use clap::Args;

use super::GlobalArgs;
use crate::config::load::{load_pipeline_with, read_document, shared_names, NameClaim};
use crate::config::probe::{ModelsCheckedOnce, Probe};
use crate::config::{LoadOptions, Pipeline, Problems};
use crate::probe::StandardProbe;
use crate::report::problems::{print_validation, print_validation_json, FileValidation};

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Pipeline files to check.
    #[arg(required = true, value_name = "FILE")]
    pub pipelines: Vec<PathBuf>,
    /// Override a value in every file: `--set stages.train.train.method.lora.r=16` (VALUE is YAML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Accept template files and export destinations outside the project directory (as
    /// `peftpipe run --allow-outside-project` would).
    #[arg(long)]
    pub allow_outside_project: bool,
}

pub fn run(global: &GlobalArgs, args: ValidateArgs) -> u8 {
    let options = LoadOptions {
        allow_outside_project: args.allow_outside_project,
    };
    let loaded = load_each(&args.pipelines, &args.overrides, &StandardProbe, &options);
    let shared = name_conflicts(global, &loaded);
    let outcomes: Vec<FileValidation> = loaded
        .into_iter()
        .enumerate()
        .map(|(index, result)| match result {
            Ok(pipeline) => match shared.iter().find(|(at, _)| *at == index) {
                Some((_, problems)) => FileValidation::invalid(problems.clone()),
                None => FileValidation::valid(
                    pipeline.file.display().to_string(),
                    pipeline.stages.keys().cloned().collect(),
                ),
            },
            Err(problems) => FileValidation::invalid(problems),
        })
        .collect();
    if global.json {
        print_validation_json(&outcomes);
    } else {
        print_validation(&outcomes, global.quiet);
    }
    if outcomes.iter().all(|outcome| outcome.valid) {
        super::EXIT_OK
    } else {
        super::EXIT_INVALID
    }
}

/// Every file loaded and checked, `probe` asked once per model folder for the whole command
/// (a folder several files name has its files read for the first only).
fn load_each(
    files: &[PathBuf],
    overrides: &[String],
    probe: &dyn Probe,
    options: &LoadOptions,
) -> Vec<Result<Pipeline, Problems>> {
    let probe = ModelsCheckedOnce::new(probe);
    files
        .iter()
        .map(|file| load_pipeline_with(file, overrides, &probe, options))
        .collect()
}

/// Valid pipelines that share a name with another file of their project or cache, each with its
/// problem placed in its file.
fn name_conflicts(
    global: &GlobalArgs,
    loaded: &[Result<Pipeline, Problems>],
) -> Vec<(usize, Problems)> {
    let cache_dirs: Vec<Option<PathBuf>> = loaded
        .iter()
        .map(|result| {
            result.as_ref().ok().map(|pipeline| {
                global
                    .cache_dir
                    .clone()
                    .unwrap_or_else(|| crate::cache::default_cache_dir(&pipeline.project_dir))
            })
        })
        .collect();
    let mut indices = Vec::new();
    let mut claims = Vec::new();
    for (index, (result, cache_dir)) in loaded.iter().zip(&cache_dirs).enumerate() {
        if let (Ok(pipeline), Some(cache_dir)) = (result, cache_dir) {
            indices.push(index);
            claims.push(NameClaim {
                file: &pipeline.file,
                name: &pipeline.name,
                project_dir: &pipeline.project_dir,
                cache_dir,
            });
        }
    }
    shared_names(&claims)
        .into_iter()
        .map(|(claim, problem)| {
            let index = indices[claim];
            let file = claims[claim].file;
            // Placed at the `name:` line when the file can still be read (it just was).
            let problems = match read_document(file) {
                Ok((document, _)) => document.problems(vec![problem]),
                Err(_) => Problems::new(file.display().to_string(), vec![problem]),
            };
            (index, problems)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Mutex;

    use super::*;
    use crate::config::chat_template::ChatTemplateSource;
    use crate::config::ingest::InputFormat;
    use crate::config::probe::ModelFacts;

    /// [`StandardProbe`], counting the model checks per folder.
    #[derive(Default)]
    struct CountingProbe {
        models: Mutex<BTreeMap<PathBuf, usize>>,
    }

    impl Probe for CountingProbe {
        fn input_columns(
            &self,
            path: &Path,
            format: Option<InputFormat>,
        ) -> Result<Vec<String>, String> {
            StandardProbe.input_columns(path, format)
        }

        fn check_chat_template(&self, source: &ChatTemplateSource) -> Result<(), String> {
            StandardProbe.check_chat_template(source)
        }

        fn check_model(&self, dir: &Path) -> ModelFacts {
            *self
                .models
                .lock()
                .unwrap()
                .entry(dir.canonicalize().unwrap())
                .or_default() += 1;
            StandardProbe.check_model(dir)
        }
    }

    /// Probe item: `validate a.yaml b.yaml` read a model folder both files name once per file
    /// (b755ad9 made it once per pipeline); now once per command.
    #[test]
    fn a_model_folder_two_files_name_is_probed_once_per_command() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("model")).unwrap();
        std::fs::write(dir.path().join("data.csv"), "text,label\nhi,yes\n").unwrap();
        let files: Vec<PathBuf> = ["a", "b"]
            .iter()
            .map(|name| {
                let file = dir.path().join(format!("{name}.yaml"));
                std::fs::write(
                    &file,
                    format!(
                        r#"name: {name}
stages:
  data: {{ingest: {{path: data.csv}}}}
  prompts: {{template: {{input: data, prompt: "{{{{ text }}}}", completion: "{{{{ label }}}}"}}}}
  train: {{train: {{data: prompts, model: model, method: {{lora: {{r: 4}}}}}}}}
"#
                    ),
                )
                .unwrap();
                file
            })
            .collect();
        let probe = CountingProbe::default();
        let loaded = load_each(&files, &[], &probe, &LoadOptions::default());
        assert_eq!(loaded.len(), 2);
        let model = dir.path().join("model").canonicalize().unwrap();
        assert_eq!(
            probe.models.into_inner().unwrap(),
            BTreeMap::from([(model, 1)]),
            "{:#?}",
            loaded
                .iter()
                .filter_map(|r| r.as_ref().err())
                .collect::<Vec<_>>()
        );
    }
}
