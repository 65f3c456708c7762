//! Text, mermaid and dot renderings of a [`StageGraph`]. Returns strings; printing them is the
//! reporter's job.

use super::StageGraph;

/// The output formats of `peftpipe dag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphFormat {
    Text,
    Mermaid,
    Dot,
}

/// Render in the chosen format. `title` names the pipeline (dot graph name).
pub fn render(graph: &StageGraph, format: GraphFormat, title: &str) -> String {
    match format {
        GraphFormat::Text => render_text(graph),
        GraphFormat::Mermaid => render_mermaid(graph),
        GraphFormat::Dot => render_dot(graph, title),
    }
}

/// One line per stage in topological order: `name (kind)`, then `← upstream (key)` lines.
///
/// ```text
/// data (ingest)
/// prompts (template)
///   ← data (input)
/// ```
pub fn render_text(graph: &StageGraph) -> String {
    let mut out = String::new();
    for name in graph.order() {
        let kind = graph.kind(name).map(|kind| kind.as_str()).unwrap_or("?");
        out.push_str(&format!("{name} ({kind})\n"));
        for (upstream, key) in graph.upstream(name) {
            out.push_str(&format!("  ← {upstream} ({key})\n"));
        }
    }
    out
}

/// A mermaid flowchart. Node ids are `s0`, `s1`, ... (stage names such as `end` are reserved
/// words in mermaid); labels carry the name and kind, edges the config key.
pub fn render_mermaid(graph: &StageGraph) -> String {
    let ids: Vec<(String, String)> = graph
        .names()
        .enumerate()
        .map(|(i, name)| (name.to_string(), format!("s{i}")))
        .collect();
    let id_of = |name: &str| {
        ids.iter()
            .find(|(stage, _)| stage == name)
            .map(|(_, id)| id.clone())
            .unwrap_or_default()
    };
    let mut out = String::from("flowchart LR\n");
    for name in graph.order() {
        let kind = graph.kind(name).map(|kind| kind.as_str()).unwrap_or("?");
        out.push_str(&format!(
            "    {}[\"{} ({kind})\"]\n",
            id_of(name),
            mermaid_text(name)
        ));
    }
    for name in graph.order() {
        for (upstream, key) in graph.upstream(name) {
            out.push_str(&format!(
                "    {} -->|{key}| {}\n",
                id_of(upstream),
                id_of(name)
            ));
        }
    }
    out
}

fn mermaid_text(text: &str) -> String {
    text.replace('"', "#quot;")
}

/// A Graphviz digraph, left to right.
pub fn render_dot(graph: &StageGraph, title: &str) -> String {
    let mut out = format!(
        "digraph {} {{\n    rankdir=LR;\n    node [shape=box];\n",
        dot_quote(title)
    );
    for name in graph.order() {
        let kind = graph.kind(name).map(|kind| kind.as_str()).unwrap_or("?");
        out.push_str(&format!(
            "    {} [label={}];\n",
            dot_quote(name),
            dot_quote(&format!("{name}\n({kind})"))
        ));
    }
    for name in graph.order() {
        for (upstream, key) in graph.upstream(name) {
            out.push_str(&format!(
                "    {} -> {} [label={}];\n",
                dot_quote(upstream),
                dot_quote(name),
                dot_quote(key)
            ));
        }
    }
    out.push_str("}\n");
    out
}

fn dot_quote(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{StageKind, UpstreamRef};

    fn sample() -> StageGraph {
        let reference = |key, stage: &str| UpstreamRef {
            key,
            stage: stage.to_string(),
        };
        let (graph, errors) = StageGraph::build(
            vec![
                ("data", StageKind::Ingest, vec![]),
                (
                    "prompts",
                    StageKind::Template,
                    vec![reference("input", "data")],
                ),
                ("end", StageKind::Train, vec![reference("data", "prompts")]),
            ],
            ["data", "prompts", "end"],
        );
        assert!(errors.is_empty());
        graph
    }

    #[test]
    fn text_lists_stages_in_order_with_their_inputs() {
        assert_eq!(
            render_text(&sample()),
            "data (ingest)\nprompts (template)\n  ← data (input)\nend (train)\n  ← prompts (data)\n"
        );
    }

    #[test]
    fn mermaid_uses_safe_ids_and_labels_edges() {
        let text = render_mermaid(&sample());
        assert!(text.starts_with("flowchart LR\n"));
        assert!(text.contains("    s2[\"end (train)\"]\n"));
        assert!(text.contains("    s0 -->|input| s1\n"));
        assert!(text.contains("    s1 -->|data| s2\n"));
    }

    #[test]
    fn dot_quotes_names_and_labels() {
        let text = render_dot(&sample(), "my \"pipe\"");
        assert!(text.starts_with("digraph \"my \\\"pipe\\\"\" {\n"));
        assert!(text.contains("    \"data\" [label=\"data\\n(ingest)\"];\n"));
        assert!(text.contains("    \"data\" -> \"prompts\" [label=\"input\"];\n"));
        assert!(text.ends_with("}\n"));
    }
}
