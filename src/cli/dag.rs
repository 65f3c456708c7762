//! `peftpipe dag FILE [--format text|mermaid|dot] [--stage NAME]`: print the stage graph on
//! stdout. Needs a pipeline whose stages parse and whose references resolve; input files and
//! per-kind checks are `validate`'s business, so a graph can be drawn before the data exists.

use clap::{Args, ValueEnum};

use super::{GlobalArgs, PipelineArgs};
use crate::config::load::{graph_problem, parse_pipeline};
use crate::config::problem::hint_for_unknown;
use crate::dag::render::{render, GraphFormat};
use crate::dag::StageGraph;
use crate::report::problems::{print_data, print_json, print_problems, print_usage_error};

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
            print_problems(&problems);
            return super::EXIT_INVALID;
        }
    };
    let (graph, errors) = StageGraph::build(
        parsed
            .raw
            .stages
            .iter()
            .map(|(name, config)| (name.as_str(), config.kind(), config.spec().upstream())),
        parsed.stage_names.iter().map(String::as_str),
    );
    let mut problems = parsed.problems.clone();
    problems.extend(
        errors
            .iter()
            .map(|error| graph_problem(error, &parsed.raw.stages)),
    );
    if !problems.is_empty() {
        print_problems(&parsed.document.problems(problems));
        return super::EXIT_INVALID;
    }
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
                print_usage_error(
                    &format!(
                        "--stage {}: {} has no stage of that name",
                        unknown.name,
                        file.display()
                    ),
                    hint.as_deref(),
                );
                return super::EXIT_INVALID;
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
        print_json(&serde_json::json!({ "stages": stages }));
        return super::EXIT_OK;
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
    super::EXIT_OK
}
