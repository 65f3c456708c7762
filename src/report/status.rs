//! Rendering of plans: `peftpipe status` (`[FRESH] data`, `[DIRTY] prompts: parameter template.few_shot.k
//! changed (3 → 4)`, `[DIRTY] export: published output out/adapter changed (README.md content
//! differs)`, `[DIRTY] train: cached output of an earlier run with these inputs; the published
//! copies are another run's`, `[DIRTY] train: never run (the last run with these inputs failed:
//! ...)`) and `run --dry-run`, plus their `--json` form. Only renders.

use std::fmt::Write as _;

use crate::exec::{Freshness, Plan};

use super::run::Style;

/// One line per stage, cargo style.
pub fn plan_lines(style: &Style, plan: &Plan, dry_run: bool) -> String {
    let mut text = String::new();
    for stage in &plan.stages {
        let line = match &stage.freshness {
            Freshness::Fresh(cached) if cached.from_run_cache && !cached.republish.is_empty() => {
                // Restorable without running, but what is published now is another run's.
                let tag = style_tag(style, "[DIRTY]", "1;33");
                let mut line = format!(
                    "{tag} {}: cached output of an earlier run with these inputs; the published copies are another run's",
                    stage.name
                );
                if dry_run {
                    line.push_str(" — would restore and publish again");
                }
                line
            }
            Freshness::Fresh(cached) if !cached.republish.is_empty() => {
                let tag = style_tag(style, "[DIRTY]", "1;33");
                let mut line = format!("{tag} {}: {}", stage.name, join(&cached.republish));
                if dry_run {
                    line.push_str(" — would restore and publish again");
                }
                line
            }
            Freshness::Fresh(cached) => {
                let tag = style_tag(style, "[FRESH]", "1;32");
                let mut line = format!("{tag} {}", stage.name);
                if cached.from_run_cache {
                    line.push_str(" (cached output of an earlier run with these inputs)");
                }
                if dry_run {
                    line.push_str(" — would restore");
                }
                line
            }
            Freshness::Dirty { reasons } => {
                let tag = style_tag(style, "[DIRTY]", "1;33");
                let mut line = format!("{tag} {}: {}", stage.name, join(reasons));
                if let Some(failure) = &stage.last_failure {
                    let _ = write!(
                        line,
                        " (the last run with these inputs failed: {})",
                        first_line(&failure.error)
                    );
                }
                if dry_run {
                    line.push_str(" — would run");
                }
                line
            }
        };
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// The first line of an error (the rest is in the run's output and the report).
pub fn first_line(error: &str) -> &str {
    error.lines().next().unwrap_or_default()
}

fn join(reasons: &[crate::fingerprint::DirtyReason]) -> String {
    reasons
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn style_tag(style: &Style, tag: &str, code: &str) -> String {
    if style.color {
        format!("\x1b[{code}m{tag}\x1b[0m")
    } else {
        tag.to_string()
    }
}

/// The plan as JSON: per stage its name, kind, `status` (`fresh` or `dirty`; the key `run --json`
/// names a stage's outcome by), reasons (text and structured) and digest. `state` repeats
/// `status` under the key this output used before; it is deprecated and will be removed.
pub fn plan_json(plan: &Plan) -> serde_json::Value {
    let stages: Vec<serde_json::Value> = plan
        .stages
        .iter()
        .map(|stage| {
            let (state, reasons, output) = match &stage.freshness {
                Freshness::Fresh(cached) if !cached.republish.is_empty() => (
                    "dirty",
                    cached.republish.clone(),
                    Some(cached.output.clone()),
                ),
                Freshness::Fresh(cached) => ("fresh", Vec::new(), Some(cached.output.clone())),
                Freshness::Dirty { reasons } => ("dirty", reasons.clone(), None),
            };
            serde_json::json!({
                "name": stage.name,
                "kind": stage.kind,
                "status": state,
                "state": state,
                "reasons": reasons.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "reason_details": reasons,
                "fingerprint": stage.fingerprint.digest(),
                "output": output,
                "last_failure": stage.last_failure,
            })
        })
        .collect();
    serde_json::json!({
        "pipeline": plan.pipeline,
        "fresh": plan.all_fresh(),
        "stages": stages,
    })
}
