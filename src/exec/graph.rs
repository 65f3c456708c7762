//! The executor's view of the stage graph: upstream names per stage, a topological order (file
//! order breaks ties, so runs are reproducible) and `--stage` selection (targets plus everything
//! they need). Pure; no I/O.

use std::collections::{BTreeMap, BTreeSet};

use indexmap::IndexMap;

use super::ExecError;
use crate::config::StageConfig;

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

/// Stages in an order where every stage comes after its upstream stages. Ties keep file order.
pub fn topological_order(stages: &IndexMap<String, StageConfig>) -> Result<Vec<String>, ExecError> {
    let mut remaining: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (name, config) in stages {
        let upstream: BTreeSet<String> = upstream_names(config).into_iter().collect();
        for needed in &upstream {
            if !stages.contains_key(needed) {
                return Err(ExecError::Graph(format!(
                    "stage `{name}` reads unknown stage `{needed}`"
                )));
            }
        }
        remaining.insert(name, upstream);
    }
    let mut order: Vec<String> = Vec::with_capacity(stages.len());
    while order.len() < stages.len() {
        let next = stages.keys().find(|name| {
            remaining
                .get(name.as_str())
                .is_some_and(|upstream| upstream.iter().all(|u| order.contains(u)))
                && !order.contains(name)
        });
        match next {
            Some(name) => {
                remaining.remove(name.as_str());
                order.push(name.clone());
            }
            None => {
                let cycle: Vec<&str> = remaining.keys().copied().collect();
                return Err(ExecError::Graph(format!(
                    "the stages {} form a cycle",
                    cycle.join(", ")
                )));
            }
        }
    }
    Ok(order)
}

/// The stages a run needs, in topological order: every stage when `targets` is empty, else the
/// targets and their transitive upstream stages.
pub fn select(
    stages: &IndexMap<String, StageConfig>,
    order: &[String],
    targets: &[String],
) -> Result<Vec<String>, ExecError> {
    if targets.is_empty() {
        return Ok(order.to_vec());
    }
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut stack: Vec<String> = Vec::new();
    for target in targets {
        if !stages.contains_key(target) {
            return Err(ExecError::UnknownStage {
                name: target.clone(),
                hint: crate::config::problem::did_you_mean(
                    target,
                    stages.keys().map(String::as_str),
                )
                .map(String::from),
            });
        }
        stack.push(target.clone());
    }
    while let Some(name) = stack.pop() {
        if wanted.insert(name.clone()) {
            if let Some(config) = stages.get(&name) {
                stack.extend(upstream_names(config));
            }
        }
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
    fn cycles_are_reported() {
        let stages = stages("a: {template: {input: b}}\nb: {template: {input: a}}\n");
        let error = topological_order(&stages).unwrap_err().to_string();
        assert_eq!(error, "the stages a, b form a cycle");
    }
}
