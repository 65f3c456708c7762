//! The stage graph: pipeline stages as nodes, "reads the output of" as edges. Finds unknown
//! references, self references and cycles (with the cycle's path), gives a stable topological
//! order (file order breaks ties), selects a stage plus everything it needs (`--stage`), lists
//! direct dependents, and renders the graph as text, mermaid or dot ([`render`]).
//!
//! Pure: no I/O, no printing, no knowledge of what stages do.

pub mod render;

use std::collections::{BTreeSet, HashMap};

use crate::config::{Pipeline, StageKind, UpstreamRef};

/// One edge: the stage at index `from` is read by the owner under config key `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub from: usize,
    pub key: &'static str,
}

/// What is wrong with the references between stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GraphError {
    /// `stage` names `reference` under `key`, and no stage has that name.
    UnknownStage {
        stage: String,
        key: &'static str,
        reference: String,
        /// Every stage name (for did-you-mean).
        candidates: Vec<String>,
    },
    /// `stage` names itself under `key`.
    SelfReference { stage: String, key: &'static str },
    /// A cycle, in dependency order and closed: `[a, b, a]` means b reads a and a reads b.
    Cycle { path: Vec<String> },
}

impl std::fmt::Display for GraphError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GraphError::UnknownStage {
                stage,
                key,
                reference,
                ..
            } => write!(
                f,
                "stage `{stage}` reads unknown stage `{reference}` ({key})"
            ),
            GraphError::SelfReference { stage, key } => {
                write!(f, "stage `{stage}` reads itself ({key})")
            }
            GraphError::Cycle { path } => write!(f, "cycle: {}", path.join(" → ")),
        }
    }
}

/// `--stage NAME` named no stage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no stage named `{name}`")]
pub struct UnknownStageName {
    pub name: String,
    /// Every stage name (for did-you-mean).
    pub candidates: Vec<String>,
}

/// The stages and who reads whom. Only valid edges are kept; stages on or downstream of a
/// cycle are absent from the topological order.
#[derive(Debug, Clone, Default)]
pub struct StageGraph {
    names: Vec<String>,
    kinds: Vec<StageKind>,
    index: HashMap<String, usize>,
    /// Per stage, the stages it reads (in the order its config names them, without repeats of
    /// the same stage under the same key).
    upstream: Vec<Vec<Edge>>,
    order: Vec<usize>,
}

impl StageGraph {
    /// The graph of a validated pipeline.
    pub fn new(pipeline: &Pipeline) -> Result<StageGraph, Vec<GraphError>> {
        let (graph, errors) = StageGraph::build(
            pipeline
                .stages
                .iter()
                .map(|(name, config)| (name.as_str(), config.kind(), config.spec().upstream())),
            pipeline.stages.keys().map(String::as_str),
        );
        if errors.is_empty() {
            Ok(graph)
        } else {
            Err(errors)
        }
    }

    /// Build from stages in file order, each with its kind and references. `known_names` are
    /// all stage names written in the pipeline, including stages left out of `stages` because
    /// their config is invalid: references to them are not reported (nor kept as edges).
    /// Returns the graph of what is valid and every error.
    pub fn build<'a>(
        stages: impl IntoIterator<Item = (&'a str, StageKind, Vec<UpstreamRef>)>,
        known_names: impl IntoIterator<Item = &'a str>,
    ) -> (StageGraph, Vec<GraphError>) {
        let stages: Vec<(&str, StageKind, Vec<UpstreamRef>)> = stages.into_iter().collect();
        let mut known: Vec<String> = known_names.into_iter().map(str::to_string).collect();
        let mut graph = StageGraph::default();
        for (name, kind, _) in &stages {
            graph.index.insert(name.to_string(), graph.names.len());
            graph.names.push(name.to_string());
            graph.kinds.push(*kind);
            if !known.iter().any(|known_name| known_name == name) {
                known.push(name.to_string());
            }
        }
        let mut errors = Vec::new();
        for (name, _, references) in &stages {
            let mut edges: Vec<Edge> = Vec::new();
            for reference in references {
                if reference.stage == *name {
                    errors.push(GraphError::SelfReference {
                        stage: name.to_string(),
                        key: reference.key,
                    });
                    continue;
                }
                match graph.index.get(&reference.stage) {
                    Some(&from) => {
                        let edge = Edge {
                            from,
                            key: reference.key,
                        };
                        if !edges.contains(&edge) {
                            edges.push(edge);
                        }
                    }
                    None if known.contains(&reference.stage) => {}
                    None => errors.push(GraphError::UnknownStage {
                        stage: name.to_string(),
                        key: reference.key,
                        reference: reference.stage.clone(),
                        candidates: known.clone(),
                    }),
                }
            }
            graph.upstream.push(edges);
        }
        graph.order = graph.topological_indices();
        errors.extend(
            graph
                .cycles()
                .into_iter()
                .map(|path| GraphError::Cycle { path }),
        );
        (graph, errors)
    }

    /// Kahn's algorithm; among ready stages the earliest in the file goes first.
    fn topological_indices(&self) -> Vec<usize> {
        let count = self.names.len();
        let mut waiting_on: Vec<usize> = self
            .upstream
            .iter()
            .map(|edges| distinct_sources(edges).len())
            .collect();
        let dependents = self.dependents_by_index();
        let mut ready: BTreeSet<usize> = (0..count).filter(|&i| waiting_on[i] == 0).collect();
        let mut order = Vec::with_capacity(count);
        while let Some(next) = ready.pop_first() {
            order.push(next);
            for &dependent in &dependents[next] {
                waiting_on[dependent] -= 1;
                if waiting_on[dependent] == 0 {
                    ready.insert(dependent);
                }
            }
        }
        order
    }

    /// Per stage, the distinct stages that read it, in file order.
    fn dependents_by_index(&self) -> Vec<Vec<usize>> {
        let mut dependents = vec![Vec::new(); self.names.len()];
        for (stage, edges) in self.upstream.iter().enumerate() {
            for source in distinct_sources(edges) {
                dependents[source].push(stage);
            }
        }
        dependents
    }

    /// One cycle per strongly connected component with more than one stage, each starting at
    /// its earliest stage in the file and written in dependency order (`a → b → a`: b reads a).
    fn cycles(&self) -> Vec<Vec<String>> {
        let dependents = self.dependents_by_index();
        let components = strongly_connected_components(&dependents);
        let mut cycles = Vec::new();
        for component in components {
            if component.len() < 2 {
                continue;
            }
            let Some(&start) = component.iter().min() else {
                continue;
            };
            // Breadth-first from start along "is read by" edges inside the component, back to
            // start: the shortest cycle through the earliest stage.
            let inside: BTreeSet<usize> = component.iter().copied().collect();
            let mut previous: HashMap<usize, usize> = HashMap::new();
            let mut queue = std::collections::VecDeque::from([start]);
            let mut closing = None;
            'search: while let Some(node) = queue.pop_front() {
                for &next in &dependents[node] {
                    if !inside.contains(&next) {
                        continue;
                    }
                    if next == start {
                        closing = Some(node);
                        break 'search;
                    }
                    if next != start && !previous.contains_key(&next) {
                        previous.insert(next, node);
                        queue.push_back(next);
                    }
                }
            }
            let Some(mut node) = closing else {
                continue;
            };
            // Walk back from the closing stage to the start, then turn it around.
            let mut path = vec![node];
            while node != start {
                match previous.get(&node) {
                    Some(&before) => {
                        node = before;
                        path.push(node);
                    }
                    None => break,
                }
            }
            path.reverse();
            path.push(start);
            let names: Vec<String> = path.iter().map(|&i| self.names[i].clone()).collect();
            cycles.push(names);
        }
        cycles
    }

    /// Stage names in topological order (stages on or behind a cycle are absent).
    pub fn order(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(|&i| self.names[i].as_str())
    }

    /// Stage names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    pub fn contains(&self, stage: &str) -> bool {
        self.index.contains_key(stage)
    }

    pub fn kind(&self, stage: &str) -> Option<StageKind> {
        self.index.get(stage).map(|&i| self.kinds[i])
    }

    /// The stages `stage` reads directly, with the config key, in the order its config names
    /// them.
    pub fn upstream(&self, stage: &str) -> Vec<(&str, &'static str)> {
        let Some(&i) = self.index.get(stage) else {
            return Vec::new();
        };
        self.upstream[i]
            .iter()
            .map(|edge| (self.names[edge.from].as_str(), edge.key))
            .collect()
    }

    /// The stages that read `stage` directly, in file order.
    pub fn dependents(&self, stage: &str) -> Vec<&str> {
        let Some(&i) = self.index.get(stage) else {
            return Vec::new();
        };
        self.dependents_by_index()[i]
            .iter()
            .map(|&d| self.names[d].as_str())
            .collect()
    }

    /// `stage` and every stage it needs, transitively, in topological order.
    pub fn select(&self, stage: &str) -> Result<Vec<&str>, UnknownStageName> {
        let Some(&root) = self.index.get(stage) else {
            return Err(UnknownStageName {
                name: stage.to_string(),
                candidates: self.names.clone(),
            });
        };
        let mut needed = vec![false; self.names.len()];
        let mut stack = vec![root];
        while let Some(node) = stack.pop() {
            if std::mem::replace(&mut needed[node], true) {
                continue;
            }
            stack.extend(self.upstream[node].iter().map(|edge| edge.from));
        }
        Ok(self
            .order
            .iter()
            .filter(|&&i| needed[i])
            .map(|&i| self.names[i].as_str())
            .collect())
    }

    /// The graph restricted to `keep` (edges between kept stages only), for rendering a
    /// selection.
    pub fn restricted_to(&self, keep: &[&str]) -> StageGraph {
        let (graph, _) = StageGraph::build(
            self.names
                .iter()
                .enumerate()
                .filter(|(_, name)| keep.contains(&name.as_str()))
                .map(|(i, name)| {
                    let references = self.upstream[i]
                        .iter()
                        .filter(|edge| keep.contains(&self.names[edge.from].as_str()))
                        .map(|edge| UpstreamRef {
                            key: edge.key,
                            stage: self.names[edge.from].clone(),
                        })
                        .collect();
                    (name.as_str(), self.kinds[i], references)
                }),
            keep.iter().copied(),
        );
        graph
    }
}

fn distinct_sources(edges: &[Edge]) -> Vec<usize> {
    let mut sources: Vec<usize> = Vec::new();
    for edge in edges {
        if !sources.contains(&edge.from) {
            sources.push(edge.from);
        }
    }
    sources
}

/// Tarjan's algorithm, iterative (no recursion depth limit on long pipelines).
fn strongly_connected_components(successors: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let count = successors.len();
    let mut index_of: Vec<Option<usize>> = vec![None; count];
    let mut low = vec![0usize; count];
    let mut on_stack = vec![false; count];
    let mut stack: Vec<usize> = Vec::new();
    let mut components = Vec::new();
    let mut next_index = 0;
    for root in 0..count {
        if index_of[root].is_some() {
            continue;
        }
        // (node, position in its successor list)
        let mut work: Vec<(usize, usize)> = vec![(root, 0)];
        index_of[root] = Some(next_index);
        low[root] = next_index;
        next_index += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(&mut (node, ref mut position)) = work.last_mut() {
            if let Some(&next) = successors[node].get(*position) {
                *position += 1;
                match index_of[next] {
                    None => {
                        index_of[next] = Some(next_index);
                        low[next] = next_index;
                        next_index += 1;
                        stack.push(next);
                        on_stack[next] = true;
                        work.push((next, 0));
                    }
                    Some(next_index_value) if on_stack[next] => {
                        low[node] = low[node].min(next_index_value);
                    }
                    Some(_) => {}
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[node]);
            }
            if Some(low[node]) == index_of[node] {
                let mut component = Vec::new();
                while let Some(member) = stack.pop() {
                    on_stack[member] = false;
                    component.push(member);
                    if member == node {
                        break;
                    }
                }
                components.push(component);
            }
        }
    }
    components
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(key: &'static str, stage: &str) -> UpstreamRef {
        UpstreamRef {
            key,
            stage: stage.to_string(),
        }
    }

    type Spec<'a> = (&'a str, StageKind, Vec<UpstreamRef>);

    fn graph(stages: Vec<Spec<'_>>) -> (StageGraph, Vec<GraphError>) {
        let names: Vec<&str> = stages.iter().map(|(name, _, _)| *name).collect();
        StageGraph::build(stages.clone(), names)
    }

    #[test]
    fn order_is_topological_and_file_order_breaks_ties() {
        let (graph, errors) = graph(vec![
            (
                "eval",
                StageKind::Evaluate,
                vec![reference("model", "train"), reference("data", "prompts")],
            ),
            (
                "train",
                StageKind::Train,
                vec![reference("data", "prompts")],
            ),
            ("b", StageKind::Ingest, vec![]),
            (
                "prompts",
                StageKind::Template,
                vec![reference("input", "a")],
            ),
            ("a", StageKind::Ingest, vec![]),
        ]);
        assert!(errors.is_empty(), "{errors:?}");
        let order: Vec<&str> = graph.order().collect();
        assert_eq!(order, vec!["b", "a", "prompts", "train", "eval"]);
        assert_eq!(graph.dependents("prompts"), vec!["eval", "train"]);
        assert_eq!(
            graph.upstream("eval"),
            vec![("train", "model"), ("prompts", "data")]
        );
        assert_eq!(graph.select("train"), Ok(vec!["a", "prompts", "train"]));
        assert_eq!(graph.select("b"), Ok(vec!["b"]));
        assert!(graph.select("nope").is_err());
    }

    #[test]
    fn unknown_and_self_references_are_errors() {
        let (graph, errors) = graph(vec![
            ("a", StageKind::Ingest, vec![]),
            ("b", StageKind::Template, vec![reference("input", "c")]),
            ("d", StageKind::Template, vec![reference("input", "d")]),
        ]);
        assert_eq!(errors.len(), 2);
        assert!(
            matches!(&errors[0], GraphError::UnknownStage { stage, reference, .. } if stage == "b" && reference == "c")
        );
        assert!(
            matches!(&errors[1], GraphError::SelfReference { stage, key: "input" } if stage == "d")
        );
        assert_eq!(graph.order().count(), 3);
    }

    #[test]
    fn references_to_known_but_invalid_stages_are_not_errors() {
        let (_, errors) = StageGraph::build(
            vec![("b", StageKind::Template, vec![reference("input", "broken")])],
            ["broken", "b"],
        );
        assert!(errors.is_empty());
    }

    #[test]
    fn cycles_are_found_with_their_path() {
        let (graph, errors) = graph(vec![
            ("data", StageKind::Ingest, vec![]),
            ("a", StageKind::Template, vec![reference("input", "c")]),
            ("b", StageKind::Train, vec![reference("data", "a")]),
            ("c", StageKind::Evaluate, vec![reference("model", "b")]),
            ("after", StageKind::Export, vec![reference("model", "c")]),
        ]);
        assert_eq!(
            errors,
            vec![GraphError::Cycle {
                path: vec!["a".into(), "b".into(), "c".into(), "a".into()]
            }]
        );
        // Stages on or behind the cycle have no place in the order.
        assert_eq!(graph.order().collect::<Vec<_>>(), vec!["data"]);
    }

    #[test]
    fn two_separate_cycles_are_both_reported() {
        let (_, errors) = graph(vec![
            ("a", StageKind::Template, vec![reference("input", "b")]),
            ("b", StageKind::Template, vec![reference("input", "a")]),
            ("c", StageKind::Template, vec![reference("input", "d")]),
            ("d", StageKind::Template, vec![reference("input", "c")]),
        ]);
        assert_eq!(errors.len(), 2);
    }

    #[test]
    fn restriction_keeps_only_edges_between_kept_stages() {
        let (graph, _) = graph(vec![
            ("a", StageKind::Ingest, vec![]),
            ("b", StageKind::Template, vec![reference("input", "a")]),
            ("c", StageKind::Train, vec![reference("data", "b")]),
        ]);
        let selected = graph.select("b").unwrap_or_default();
        let restricted = graph.restricted_to(&selected);
        assert_eq!(restricted.order().collect::<Vec<_>>(), vec!["a", "b"]);
        assert!(!restricted.contains("c"));
    }
}
