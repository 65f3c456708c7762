//! The executor's view of the stage graph, on top of [`crate::dag::StageGraph`]: upstream names
//! per stage, the topological order (file order breaks ties, so runs are reproducible) and
//! `--stage` selection (targets plus everything they need) as owned names. Pure; no I/O.

use std::collections::BTreeSet;

use indexmap::IndexMap;

use super::ExecError;
use crate::config::problem::did_you_mean;
use crate::config::StageConfig;
use crate::dag::StageGraph;

/// Upstream stage names of a config (deduplicated, in declaration order).
pub fn upstream_names(config: &StageConfig) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for reference in config.spec().upstream() {
        if !names.contains(&reference.stage) {
            names.push(reference.stage);
        }
    }
    names
}

/// The stage graph of `stages` (see [`crate::dag::StageGraph`]); its first problem is an error.
fn graph(stages: &IndexMap<String, StageConfig>) -> Result<StageGraph, ExecError> {
    let (graph, errors) = StageGraph::build(
        stages
            .iter()
            .map(|(name, config)| (name.as_str(), config.kind(), config.spec().upstream())),
        stages.keys().map(String::as_str),
    );
    match errors.first() {
        Some(error) => Err(ExecError::Graph(error.to_string())),
        None => Ok(graph),
    }
}

/// Stages in an order where every stage comes after its upstream stages. Ties keep file order.
pub fn topological_order(stages: &IndexMap<String, StageConfig>) -> Result<Vec<String>, ExecError> {
    Ok(graph(stages)?.order().map(String::from).collect())
}

/// The stages a run needs, in topological order: every stage when `targets` is empty, else the
/// targets and their transitive upstream stages. A target that names a matrix stage (`train`,
/// expanded into `train@…`) selects every expansion, as DVC does.
pub fn select(
    stages: &IndexMap<String, StageConfig>,
    order: &[String],
    targets: &[String],
) -> Result<Vec<String>, ExecError> {
    if targets.is_empty() {
        return Ok(order.to_vec());
    }
    let graph = graph(stages)?;
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for target in targets {
        // A matrix stage's name selects all its expansions (`train` → `train@a`, `train@b`).
        let group: Vec<&String> = stages
            .keys()
            .filter(|name| {
                !stages.contains_key(target)
                    && name
                        .strip_prefix(target.as_str())
                        .is_some_and(|rest| rest.starts_with('@'))
            })
            .collect();
        if !group.is_empty() {
            for member in group {
                let needed = graph
                    .select(member)
                    .map_err(|error| ExecError::UnknownStage {
                        hint: None,
                        name: error.name,
                    })?;
                wanted.extend(needed.into_iter().map(String::from));
            }
            continue;
        }
        let needed = graph
            .select(target)
            .map_err(|error| ExecError::UnknownStage {
                hint: did_you_mean(target, error.candidates.iter().map(String::as_str))
                    .map(String::from),
                name: error.name,
            })?;
        wanted.extend(needed.into_iter().map(String::from));
    }
    Ok(order
        .iter()
        .filter(|name| wanted.contains(*name))
        .cloned()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stages(yaml: &str) -> IndexMap<String, StageConfig> {
        let value: serde_norway::Value = serde_norway::from_str(yaml).unwrap();
        serde_json::from_value(serde_json::to_value(value).unwrap()).unwrap()
    }

    const DIAMOND: &str = "
train_prompts: {template: {input: data}}
data: {ingest: {path: a.parquet}}
eval_prompts: {template: {input: data}}
other: {ingest: {path: b.parquet}}
";

    #[test]
    fn order_puts_upstream_first_and_keeps_file_order() {
        let stages = stages(DIAMOND);
        let order = topological_order(&stages).unwrap();
        assert_eq!(order, ["data", "train_prompts", "eval_prompts", "other"]);
    }

    #[test]
    fn select_takes_targets_and_their_upstream() {
        let stages = stages(DIAMOND);
        let order = topological_order(&stages).unwrap();
        let selected = select(&stages, &order, &["eval_prompts".to_string()]).unwrap();
        assert_eq!(selected, ["data", "eval_prompts"]);
        assert_eq!(select(&stages, &order, &[]).unwrap(), order);
    }

    #[test]
    fn unknown_target_suggests_a_name() {
        let stages = stages(DIAMOND);
        let order = topological_order(&stages).unwrap();
        let error = select(&stages, &order, &["eval_prompt".to_string()]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "no stage named `eval_prompt` (did you mean `eval_prompts`?)"
        );
    }

    #[test]
    fn a_matrix_stage_name_selects_every_expansion() {
        let stages = stages(
            "data: {ingest: {path: a.parquet}}\nt@a: {template: {input: data}}\nt@b: {template: {input: data}}\nother: {ingest: {path: b.parquet}}\n",
        );
        let order = topological_order(&stages).unwrap();
        let selected = select(&stages, &order, &["t".to_string()]).unwrap();
        assert_eq!(selected, ["data", "t@a", "t@b"]);
    }

    #[test]
    fn cycles_are_reported() {
        let stages = stages("a: {template: {input: b}}\nb: {template: {input: a}}\n");
        let error = topological_order(&stages).unwrap_err().to_string();
        assert!(error.starts_with("cycle: "), "{error}");
    }
}
