//! `peftpipe dag FILE [--format text|mermaid|dot] [--stage NAME]`: print the stage graph on
//! stdout. The graph is drawn whenever every stage's kind and references can be read, the
//! references resolve and there is no cycle, even if the pipeline has other problems (a bad key,
//! a missing input file). Every problem `validate` would report is reported too (stderr, or the
//! `problems` list with `--json`), and the exit code is `validate`'s: 2 when there is any.

use clap::{Args, ValueEnum};

use super::{Failure, GlobalArgs, PipelineArgs};
use crate::config::load::{check_pipeline_with, drawable_graph, parse_pipeline};
use crate::config::problem::hint_for_unknown;
use crate::dag::render::{render, GraphFormat};
use crate::probe::StandardProbe;
use crate::report::problems::{
    print_data, print_json, print_problems, print_validation_json, FileValidation,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// One line per stage in topological order, with what it reads.
    Text,
    /// A mermaid flowchart (paste into Markdown).
    Mermaid,
    /// A Graphviz digraph (`| dot -Tsvg`).
    Dot,
}

#[derive(Debug, Args)]
pub struct DagArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Text)]
    pub format: FormatArg,
    /// Only this stage and everything it needs.
    #[arg(long, value_name = "NAME")]
    pub stage: Option<String>,
}

pub fn run(global: &GlobalArgs, args: DagArgs) -> u8 {
    let file = &args.pipeline.pipeline;
    let parsed = match parse_pipeline(file, &args.pipeline.overrides) {
        Ok(parsed) => parsed,
        Err(problems) => {
            if global.json {
                print_validation_json(&[FileValidation::invalid(problems)]);
            } else {
                print_problems(&problems);
            }
            return super::EXIT_INVALID;
        }
    };
    // What validate reports, plus graph problems of stages validate leaves out because their
    // config has other problems (their references are still checked here, to draw them).
    let mut problems = parsed.problems.clone();
    let options = crate::config::LoadOptions {
        allow_outside_project: args.pipeline.allow_outside_project,
    };
    problems.extend(check_pipeline_with(&parsed, &StandardProbe, &options));
    let (graph, graph_problems) = drawable_graph(&parsed);
    for problem in graph_problems {
        if !problems
            .iter()
            .any(|known| known.path == problem.path && known.message == problem.message)
        {
            problems.push(problem);
        }
    }
    let problems = (!problems.is_empty()).then(|| parsed.document.problems(problems));
    let exit_code = match &problems {
        Some(_) => super::EXIT_INVALID,
        None => super::EXIT_OK,
    };
    if !global.json {
        if let Some(problems) = &problems {
            print_problems(problems);
        }
    }
    let Some(graph) = graph else {
        if global.json {
            print_json(&with_validation(
                serde_json::json!({
                    "stages": null,
                    "problems": problems.as_ref().map(|p| p.problems.as_slice()).unwrap_or_default(),
                }),
                problems.as_ref(),
            ));
        }
        return exit_code;
    };
    let graph = match &args.stage {
        None => graph,
        Some(stage) => match graph.select(stage) {
            Ok(names) => graph.restricted_to(&names),
            Err(unknown) => {
                let hint = hint_for_unknown(
                    &unknown.name,
                    unknown.candidates.iter().map(String::as_str),
                    "stages",
                );
                return Failure::new(
                    super::EXIT_INVALID,
                    "--stage",
                    format!(
                        "--stage {}: {} has no stage of that name",
                        unknown.name,
                        file.display()
                    ),
                )
                .with_hint(hint)
                .report(global, &file.display().to_string());
            }
        },
    };
    if global.json {
        let stages: Vec<serde_json::Value> = graph
            .order()
            .map(|name| {
                serde_json::json!({
                    "name": name,
                    "kind": graph.kind(name).map(|kind| kind.as_str()),
                    "upstream": graph.upstream(name).into_iter()
                        .map(|(stage, key)| serde_json::json!({"stage": stage, "key": key}))
                        .collect::<Vec<_>>(),
                    "dependents": graph.dependents(name),
                })
            })
            .collect();
        print_json(&with_validation(
            serde_json::json!({
                "stages": stages,
                "problems": problems.as_ref().map(|p| p.problems.as_slice()).unwrap_or_default(),
            }),
            problems.as_ref(),
        ));
        return exit_code;
    }
    let format = match args.format {
        FormatArg::Text => GraphFormat::Text,
        FormatArg::Mermaid => GraphFormat::Mermaid,
        FormatArg::Dot => GraphFormat::Dot,
    };
    let title = parsed.raw.name.clone().unwrap_or_else(|| {
        file.file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".to_string())
    });
    print_data(&render(&graph, format, &title));
    exit_code
}

/// `dag --json`'s object with, when the pipeline has problems (exit 2), `valid: false` and
/// `files` as `validate --json` gives them: the shape every `--json` command prints on failure,
/// beside the graph and its `problems` list.
fn with_validation(
    mut document: serde_json::Value,
    problems: Option<&crate::config::Problems>,
) -> serde_json::Value {
    if let (Some(problems), Some(object)) = (problems, document.as_object_mut()) {
        object.insert("valid".into(), false.into());
        object.insert(
            "files".into(),
            serde_json::to_value([FileValidation::invalid(problems.clone())]).unwrap_or_default(),
        );
    }
    document
}
