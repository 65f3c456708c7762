//! Parse a pipeline file: YAML with spans, `--set` overrides, every problem collected with its
//! file:line:column and key path, then semantic checks into a [`super::Pipeline`].
//!
//! The passes, each of which keeps going after a problem so that `validate` reports all of them:
//! 1. [`parse_yaml`]: yaml-rust2 marked events → a JSON value tree plus a [`SpanIndex`] (key path →
//!    where the key was written). Duplicate keys, unsupported tags and non-finite numbers are
//!    problems here; a syntax error stops this file.
//!    Limits keep a hostile file cheap: at most [`MAX_PIPELINE_FILE_BYTES`], [`MAX_DOCUMENT_VALUES`]
//!    values, [`MAX_NESTING_DEPTH`] levels, and aliases copying at most [`MAX_ALIAS_EXPANSION`]
//!    values and characters (a "billion laughs" file stops at the alias that crosses it).
//! 2. [`apply_override`]: `--set a.b.c=VALUE` edits the tree (VALUE is YAML); the edited paths
//!    remember the argument they came from.
//! 3. Deserialization into [`RawPipeline`], the top level and each stage separately, through
//!    `serde_path_to_error`; after an error the offending key is taken out and deserialization is
//!    retried, so every bad key of every stage is reported.
//! 4. Semantic checks ([`check_pipeline_with`]): stage references, cycles, input files, then each
//!    kind's own checks (`StageSpec::check`) in topological order with the columns known so far,
//!    and the path policy (`super::paths`) under the command line's [`LoadOptions`].
//!
//! Pipeline and stage names follow one rule ([`name_problem`]); [`shared_names`] finds files of
//! one project (or cache) that would share a name, hence a lock file and an output folder.
//!
//! This module reads the pipeline file and whatever `StageSpec` implementations read (file
//! metadata, template files, and through the caller's [`super::Probe`] Parquet footers and model
//! configs); it never hashes or runs anything.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::paths::confine_destination;
use super::problem::{hint_for_unknown, quoted_list, Subject};
use super::{
    CheckContext, InputFile, LoadOptions, Pipeline, Probe, Problem, Problems, RawPipeline,
    StageConfig, StageKind,
};
use crate::dag::{GraphError, StageGraph};

/// Where a value of the pipeline came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Written in the file at this 1-based line and column (of its key, or of the item for
    /// sequence items).
    File { line: usize, column: usize },
    /// Set on the command line by this `--set KEY=VALUE` argument.
    Override(String),
}

/// Key path → origin, for every key and sequence item of the document, and where each value
/// written in the file starts (scalars and flow collections; a block collection starts on the
/// line after its key, so its key stands for it).
#[derive(Debug, Clone, Default)]
pub struct SpanIndex {
    entries: HashMap<String, Origin>,
    values: HashMap<String, (usize, usize)>,
}

impl SpanIndex {
    /// Where exactly this path was written, if it was.
    pub fn get(&self, path: &str) -> Option<&Origin> {
        self.entries.get(path)
    }

    /// Where this path, or else its nearest written ancestor, came from.
    pub fn locate(&self, path: &str) -> Option<&Origin> {
        let mut current = path;
        loop {
            if let Some(origin) = self.entries.get(current) {
                return Some(origin);
            }
            current = parent_path(current)?;
        }
    }

    /// Where the value at exactly this path starts in the file (1-based line and column), if it
    /// was written there as a scalar or a flow collection.
    pub fn value(&self, path: &str) -> Option<(usize, usize)> {
        self.values.get(path).copied()
    }

    /// Fill in a problem's line/column (or its `--set` argument) from its key path, unless it
    /// already has a position: at the value when the problem is about the value and the value
    /// was written in the file, else at the key (or its nearest written ancestor).
    pub fn place(&self, problem: &mut Problem) {
        if problem.line.is_some() || problem.from_override.is_some() {
            return;
        }
        if problem.subject == Subject::Value {
            if let Some((line, column)) = self.value(&problem.path) {
                problem.line = Some(line);
                problem.column = Some(column);
                return;
            }
        }
        match self.locate(&problem.path) {
            Some(Origin::File { line, column }) => {
                problem.line = Some(*line);
                problem.column = Some(*column);
            }
            Some(Origin::Override(argument)) => problem.from_override = Some(argument.clone()),
            None => {}
        }
    }

    fn insert(&mut self, path: String, origin: Origin) {
        self.entries.insert(path, origin);
    }

    fn insert_value(&mut self, path: String, marker: Marker) {
        self.values.insert(path, (marker.line(), marker.col() + 1));
    }

    /// Give `to` and everything under it the positions of `from` and everything under it (a
    /// matrix expansion is placed where its stage, or a substituted value, was written).
    pub(crate) fn copy_subtree(&mut self, from: &str, to: &str) {
        let rename = |key: &str| format!("{to}{}", &key[from.len()..]);
        let in_subtree = |key: &String| key == from || is_descendant(key, from);
        let entries: Vec<(String, Origin)> = self
            .entries
            .iter()
            .filter(|(key, _)| in_subtree(key))
            .map(|(key, origin)| (rename(key), origin.clone()))
            .collect();
        let values: Vec<(String, (usize, usize))> = self
            .values
            .iter()
            .filter(|(key, _)| in_subtree(key))
            .map(|(key, position)| (rename(key), *position))
            .collect();
        self.entries.extend(entries);
        self.values.extend(values);
    }

    /// Forget `path` and everything under it.
    pub(crate) fn forget_subtree(&mut self, path: &str) {
        self.remove_subtree(path);
    }

    /// Move each `(from, to)` subtree at once (list items renumbered after an item became
    /// several); a `from` may be the `to` of another move, and several moves may share a `from`.
    pub(crate) fn move_subtrees(&mut self, moves: &[(String, String)]) {
        let in_subtree = |key: &str, root: &str| key == root || is_descendant(key, root);
        let mut entries = Vec::new();
        let mut values = Vec::new();
        for (from, to) in moves {
            let rename = |key: &str| format!("{to}{}", &key[from.len()..]);
            entries.extend(
                self.entries
                    .iter()
                    .filter(|(key, _)| in_subtree(key, from))
                    .map(|(key, origin)| (rename(key), origin.clone())),
            );
            values.extend(
                self.values
                    .iter()
                    .filter(|(key, _)| in_subtree(key, from))
                    .map(|(key, position)| (rename(key), *position)),
            );
        }
        for (from, _) in moves {
            self.remove_subtree(from);
        }
        self.entries.extend(entries);
        self.values.extend(values);
    }

    /// Forget `path` and everything under it.
    fn remove_subtree(&mut self, path: &str) {
        self.entries
            .retain(|key, _| !(key == path || is_descendant(key, path)));
        self.values
            .retain(|key, _| !(key == path || is_descendant(key, path)));
    }
}

/// `a.b[2]` → `a.b`, `a.b` → `a`, `a` → `` (the document root), `` → None.
fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

fn is_descendant(key: &str, ancestor: &str) -> bool {
    if ancestor.is_empty() {
        return !key.is_empty();
    }
    key.len() > ancestor.len()
        && key.starts_with(ancestor)
        && matches!(key.as_bytes()[ancestor.len()], b'.' | b'[')
}

/// `parent.key` (or `key` at the root).
pub fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// `parent[index]`.
pub fn join_index(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

// ---------------------------------------------------------------------------------------------
// Pass 1: YAML with spans.
// ---------------------------------------------------------------------------------------------

/// A YAML document as a JSON value tree with the position of every key.
#[derive(Debug, Clone)]
pub struct ParsedYaml {
    /// The document; `None` when the file holds no document (empty or only comments).
    pub value: Option<Value>,
    pub spans: SpanIndex,
    /// Problems that did not stop parsing (duplicate keys, unsupported tags).
    pub problems: Vec<Problem>,
    /// Paths of values rejected here (unsupported tag, non-finite number) and read as null.
    pub rejected_values: HashSet<String>,
}

/// Parse YAML text (one document) into a value tree with spans. A syntax error is returned as
/// the only problem.
pub fn parse_yaml(source: &str) -> Result<ParsedYaml, Box<Problem>> {
    let mut builder = TreeBuilder {
        source_lines: source.lines().map(|line| line.chars().collect()).collect(),
        ..TreeBuilder::default()
    };
    let mut parser = Parser::new_from_str(source);
    // Events one by one rather than `Parser::load`, which recurses once per nesting level (a
    // deeply nested file would overflow the stack) and cannot be stopped by the receiver.
    let scanned = loop {
        let (event, marker) = match parser.next_token() {
            Ok(next) => next,
            Err(error) => break Err(error),
        };
        let end = event == Event::StreamEnd;
        builder.on_event(event, marker);
        if let Some(problem) = builder.limit_exceeded.take() {
            return Err(Box::new(problem));
        }
        if end {
            break Ok(());
        }
    };
    if let Err(error) = scanned {
        let marker = error.marker();
        let hint = unclosed_bracket(source, marker.line())
            .map(|(bracket, line, column)| {
                format!("the `{bracket}` on line {line}, column {column} is never closed")
            })
            .or_else(|| scan_error_hint(error.info()));
        return Err(Box::new(
            Problem::new(
                "",
                format!("YAML syntax error: {}", describe_scan_error(error.info())),
            )
            .with_optional_hint(hint)
            .at(marker.line(), marker.col() + 1),
        ));
    }
    let mut problems = builder.problems;
    if builder.documents > 1 {
        problems.push(
            Problem::new(
                "",
                format!(
                    "the file holds {} YAML documents; a pipeline is one document",
                    builder.documents
                ),
            )
            .with_hint("remove the `---` separators and keep one pipeline per file")
            .at(builder.second_document_line.unwrap_or(1), 1),
        );
    }
    Ok(ParsedYaml {
        value: builder.root,
        spans: builder.spans,
        problems,
        rejected_values: builder.rejected_values,
    })
}

fn describe_scan_error(info: &str) -> String {
    info.to_string()
}

/// The innermost flow bracket (`[` or `{`) opened before `error_line` and not closed by then,
/// outside quotes and comments: the usual cause of a confusing syntax error further down.
fn unclosed_bracket(source: &str, error_line: usize) -> Option<(char, usize, usize)> {
    let mut open: Vec<(char, usize, usize)> = Vec::new();
    for (index, line) in source
        .lines()
        .enumerate()
        .take(error_line.saturating_sub(1))
    {
        let mut quote: Option<char> = None;
        let mut previous = ' ';
        for (column, c) in line.chars().enumerate() {
            match quote {
                Some(q) => {
                    if c == q {
                        quote = None;
                    }
                }
                None => match c {
                    '#' if previous.is_whitespace() => break,
                    '"' | '\'' if previous.is_whitespace() || "[{,:".contains(previous) => {
                        quote = Some(c)
                    }
                    '[' | '{' => open.push((c, index + 1, column + 1)),
                    ']' | '}' => {
                        open.pop();
                    }
                    _ => {}
                },
            }
            previous = c;
        }
    }
    open.pop()
}

fn scan_error_hint(info: &str) -> Option<String> {
    if info.contains("tab") {
        Some("YAML indents with spaces; replace the tab characters with spaces".to_string())
    } else if info.contains("mapping values are not allowed") {
        Some("a value containing `: ` must be quoted, or a key is indented wrongly".to_string())
    } else if info.contains("did not find expected key") || info.contains("block end") {
        Some("check the indentation of this line against the lines above it".to_string())
    } else {
        None
    }
}

/// A key waiting for its value inside a mapping frame.
#[derive(Debug)]
struct PendingKey {
    name: String,
    /// The value is dropped (duplicate or unusable key) but its events are still consumed.
    discard: bool,
    /// `<<`: merge the value's mapping(s) into this mapping.
    merge: bool,
}

#[derive(Debug)]
enum Frame {
    Mapping {
        path: String,
        entries: Map<String, Value>,
        key: Option<PendingKey>,
        anchor: usize,
        /// Where each key was first written (for duplicate-key messages).
        first_seen: HashMap<String, usize>,
        merged: Vec<Map<String, Value>>,
        /// This mapping is itself used as a key (not supported): it is consumed and dropped.
        is_key: bool,
        /// A mapping that is a sequence item: its position is its first key's (the parser's
        /// mark for a block mapping start lies after that key).
        span_pending: bool,
    },
    Sequence {
        path: String,
        items: Vec<Value>,
        anchor: usize,
        is_key: bool,
    },
}

/// Most values (scalars, mappings, sequences) a pipeline document may hold as written.
pub const MAX_DOCUMENT_VALUES: usize = 100_000;
/// Most values plus characters that aliases (`*name`, `<<: *name`) may copy in one document:
/// each alias copies its anchor's whole value, so a few lines can otherwise expand
/// exponentially ("billion laughs").
pub const MAX_ALIAS_EXPANSION: usize = 1_000_000;
/// Deepest nesting of mappings and sequences in a pipeline document.
pub const MAX_NESTING_DEPTH: usize = 64;
/// Largest pipeline file read (bytes).
pub const MAX_PIPELINE_FILE_BYTES: u64 = 8 << 20;

#[derive(Debug, Default)]
struct TreeBuilder {
    stack: Vec<Frame>,
    root: Option<Value>,
    /// Anchor id → its value and that value's [`expansion_weight`].
    anchors: HashMap<usize, (Value, usize)>,
    /// Values written in the document so far (aliases not counted: see `alias_expansion`).
    values: usize,
    /// The weight aliases have copied so far.
    alias_expansion: usize,
    /// Set when a limit is crossed: parsing stops with this problem.
    limit_exceeded: Option<Problem>,
    spans: SpanIndex,
    problems: Vec<Problem>,
    documents: usize,
    second_document_line: Option<usize>,
    rejected_values: HashSet<String>,
    /// The source's lines, to tell flow collections (`[`, `{`) from block ones.
    source_lines: Vec<Vec<char>>,
}

fn position(marker: Marker) -> Origin {
    Origin::File {
        line: marker.line(),
        column: marker.col() + 1,
    }
}

impl TreeBuilder {
    /// Path of the node that starts now, and whether it is used as a mapping key.
    fn next_node_path(&mut self, marker: Marker) -> (String, bool) {
        match self.stack.last_mut() {
            None => (String::new(), false),
            Some(Frame::Mapping {
                path, key: None, ..
            }) => (format!("{path}.<key>"), true),
            Some(Frame::Mapping {
                path,
                key: Some(key),
                ..
            }) => {
                if key.discard || key.merge {
                    (format!("{path}.<discarded:{}>", marker.index()), false)
                } else {
                    (join_key(path, &key.name), false)
                }
            }
            Some(Frame::Sequence {
                path,
                items,
                is_key,
                ..
            }) => {
                let item_path = join_index(path, items.len());
                if !*is_key {
                    self.spans.insert(item_path.clone(), position(marker));
                }
                (item_path, false)
            }
        }
    }

    fn in_key_position(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Mapping { key: None, .. }))
    }

    /// A scalar (or alias) in key position.
    fn take_key(&mut self, name: String, plain: bool, marker: Marker) {
        let Some(Frame::Mapping {
            path,
            key,
            first_seen,
            is_key,
            span_pending,
            ..
        }) = self.stack.last_mut()
        else {
            return;
        };
        if *span_pending && !*is_key {
            *span_pending = false;
            self.spans.insert(path.clone(), position(marker));
        }
        let line = marker.line();
        let key_path = join_key(path, &name);
        if *is_key {
            *key = Some(PendingKey {
                name,
                discard: true,
                merge: false,
            });
            return;
        }
        if plain && name == "<<" {
            *key = Some(PendingKey {
                name,
                discard: false,
                merge: true,
            });
            return;
        }
        if let Some(first_line) = first_seen.get(&name) {
            let (message, hint) = if path == "stages" {
                (
                    format!("duplicate stage name `{name}` (first defined on line {first_line})"),
                    "stage names must be unique: rename one of the two stages".to_string(),
                )
            } else {
                (
                    format!("duplicate key `{name}` (first written on line {first_line})"),
                    "YAML keys must be unique in a mapping: remove one of them".to_string(),
                )
            };
            self.problems.push(
                Problem::new(key_path, message)
                    .with_hint(hint)
                    .at(line, marker.col() + 1),
            );
            *key = Some(PendingKey {
                name,
                discard: true,
                merge: false,
            });
            return;
        }
        first_seen.insert(name.clone(), line);
        self.spans.insert(key_path, position(marker));
        *key = Some(PendingKey {
            name,
            discard: false,
            merge: false,
        });
    }

    /// A complete node: store its anchor, attach it to its parent.
    fn complete(&mut self, value: Value, anchor: usize, marker: Marker) {
        if anchor > 0 {
            let weight = expansion_weight(&value);
            self.anchors.insert(anchor, (value.clone(), weight));
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(value);
                }
            }
            Some(Frame::Sequence { items, .. }) => items.push(value),
            Some(Frame::Mapping { key: None, .. }) => {
                // A non-scalar (or aliased) node in key position.
                let name = match &value {
                    Value::String(text) => Some(text.clone()),
                    Value::Number(number) => Some(number.to_string()),
                    Value::Bool(flag) => Some(flag.to_string()),
                    _ => None,
                };
                match name {
                    Some(name) => self.take_key(name, false, marker),
                    None => {
                        let path = match self.stack.last() {
                            Some(Frame::Mapping { path, .. }) => path.clone(),
                            _ => String::new(),
                        };
                        self.problems.push(
                            Problem::new(
                                path,
                                "a mapping key must be a plain name, not a mapping or a list",
                            )
                            .at(marker.line(), marker.col() + 1),
                        );
                        if let Some(Frame::Mapping { key, .. }) = self.stack.last_mut() {
                            *key = Some(PendingKey {
                                name: String::new(),
                                discard: true,
                                merge: false,
                            });
                        }
                    }
                }
            }
            Some(Frame::Mapping {
                key: key @ Some(_),
                entries,
                merged,
                path,
                ..
            }) => {
                let Some(pending) = key.take() else {
                    return;
                };
                if pending.discard {
                    return;
                }
                if pending.merge {
                    let merge_path = join_key(path, "<<");
                    match value {
                        Value::Object(map) => merged.push(map),
                        Value::Array(items) => {
                            for item in items {
                                match item {
                                    Value::Object(map) => merged.push(map),
                                    _ => self.problems.push(
                                        Problem::new(
                                            merge_path.clone(),
                                            "`<<` merges mappings only",
                                        )
                                        .at(marker.line(), marker.col() + 1),
                                    ),
                                }
                            }
                        }
                        _ => self.problems.push(
                            Problem::new(merge_path, "`<<` merges mappings only")
                                .with_hint("write `<<: *anchor` where the anchor names a mapping")
                                .at(marker.line(), marker.col() + 1),
                        ),
                    }
                    return;
                }
                entries.insert(pending.name, value);
            }
        }
    }

    fn scalar(
        &mut self,
        text: String,
        style: TScalarStyle,
        anchor: usize,
        tag: Option<Tag>,
        marker: Marker,
    ) {
        if self.in_key_position() && anchor == 0 {
            let plain = matches!(style, TScalarStyle::Plain);
            self.take_key(text, plain, marker);
            return;
        }
        let (path, _) = if self.in_key_position() {
            (String::new(), true)
        } else {
            let (path, is_key) = self.next_node_path(marker);
            // An implicit null (`lora:` with nothing after it) has no text of its own: the
            // parser marks the next token, a line below, so its problems point at its key.
            let implicit_null = text.is_empty() && matches!(style, TScalarStyle::Plain);
            if !is_key && !implicit_null {
                self.spans.insert_value(path.clone(), marker);
            }
            (path, is_key)
        };
        let value = match resolve_scalar(&text, style, tag.as_ref()) {
            Ok(value) => value,
            Err(message) => {
                self.rejected_values.insert(path.clone());
                self.problems
                    .push(Problem::new(path, message).at(marker.line(), marker.col() + 1));
                Value::Null
            }
        };
        self.complete(value, anchor, marker);
    }

    /// Whether the collection starting at `marker` is a flow collection (`[…]`, `{…}`).
    fn is_flow_start(&self, marker: Marker) -> bool {
        let line = marker
            .line()
            .checked_sub(1)
            .and_then(|i| self.source_lines.get(i));
        matches!(
            line.and_then(|chars| chars.get(marker.col())),
            Some('[' | '{')
        )
    }

    fn start_collection(&mut self, mapping: bool, anchor: usize, marker: Marker) {
        let (path, is_key) = self.next_node_path(marker);
        let is_key = is_key
            || matches!(
                self.stack.last(),
                Some(Frame::Mapping { is_key: true, .. })
                    | Some(Frame::Sequence { is_key: true, .. })
            );
        if !is_key && self.is_flow_start(marker) {
            self.spans.insert_value(path.clone(), marker);
        }
        let span_pending = !is_key && matches!(self.stack.last(), Some(Frame::Sequence { .. }));
        if mapping {
            if span_pending {
                self.spans.entries.remove(&path);
            }
            self.stack.push(Frame::Mapping {
                span_pending,
                path,
                entries: Map::new(),
                key: None,
                anchor,
                first_seen: HashMap::new(),
                merged: Vec::new(),
                is_key,
            });
        } else {
            self.stack.push(Frame::Sequence {
                path,
                items: Vec::new(),
                anchor,
                is_key,
            });
        }
    }

    fn end_collection(&mut self, marker: Marker) {
        match self.stack.pop() {
            Some(Frame::Mapping {
                mut entries,
                anchor,
                merged,
                ..
            }) => {
                for map in merged {
                    for (key, value) in map {
                        if !entries.contains_key(&key) {
                            entries.insert(key, value);
                        }
                    }
                }
                self.complete(Value::Object(entries), anchor, marker);
            }
            Some(Frame::Sequence { items, anchor, .. }) => {
                self.complete(Value::Array(items), anchor, marker);
            }
            None => {}
        }
    }
}

impl TreeBuilder {
    /// Count a value written in the document; false (and `limit_exceeded` set) past the limit.
    fn count_value(&mut self, marker: Marker) -> bool {
        self.values += 1;
        if self.values > MAX_DOCUMENT_VALUES {
            self.limit_exceeded = Some(
                Problem::new(
                    "",
                    format!(
                        "document too large: more than {} values (a pipeline holds a few hundred)",
                        thousands(MAX_DOCUMENT_VALUES)
                    ),
                )
                .at(marker.line(), marker.col() + 1),
            );
            return false;
        }
        true
    }

    /// A collection starts: false (and `limit_exceeded` set) when it nests too deeply.
    fn check_depth(&mut self, marker: Marker) -> bool {
        if self.stack.len() >= MAX_NESTING_DEPTH {
            self.limit_exceeded = Some(
                Problem::new(
                    "",
                    format!(
                        "document too large: mappings and lists nested more than {MAX_NESTING_DEPTH} deep"
                    ),
                )
                .at(marker.line(), marker.col() + 1),
            );
            return false;
        }
        true
    }

    /// The value an alias stands for, counted against [`MAX_ALIAS_EXPANSION`]; None (and
    /// `limit_exceeded` set) past the limit.
    fn expand_alias(&mut self, anchor: usize, marker: Marker) -> Option<Value> {
        let Some((value, weight)) = self.anchors.get(&anchor) else {
            return Some(Value::Null);
        };
        self.alias_expansion = self.alias_expansion.saturating_add(*weight);
        if self.alias_expansion > MAX_ALIAS_EXPANSION {
            self.limit_exceeded = Some(
                Problem::new(
                    "",
                    format!(
                        "too many alias expansions: the aliases up to here copy more than {} values and characters",
                        thousands(MAX_ALIAS_EXPANSION)
                    ),
                )
                .with_hint("an alias (`*name`, `<<: *name`) copies its anchor's whole value; write the values out or use fewer nested aliases")
                .at(marker.line(), marker.col() + 1),
            );
            return None;
        }
        Some(value.clone())
    }
}

/// What copying `value` costs: one per value (scalar, mapping, sequence) plus the characters of
/// its strings and keys. Iterative: aliases can nest values deeper than the written document.
fn expansion_weight(value: &Value) -> usize {
    let mut weight = 0usize;
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        weight = weight.saturating_add(1);
        match value {
            Value::String(text) => weight = weight.saturating_add(text.len()),
            Value::Array(items) => pending.extend(items),
            Value::Object(map) => {
                for (key, item) in map {
                    weight = weight.saturating_add(key.len());
                    pending.push(item);
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    weight
}

/// `1000000` → `1,000,000`.
fn thousands(number: usize) -> String {
    let digits = number.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, event: Event, marker: Marker) {
        match &event {
            Event::Scalar(..) | Event::MappingStart(..) | Event::SequenceStart(..)
                if self.documents <= 1 =>
            {
                if !self.count_value(marker) {
                    return;
                }
                if !matches!(event, Event::Scalar(..)) && !self.check_depth(marker) {
                    return;
                }
            }
            _ => {}
        }
        match event {
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents == 2 {
                    self.second_document_line = Some(marker.line());
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                if self.documents > 1 {
                    return;
                }
                self.scalar(text, style, anchor, tag, marker);
            }
            Event::MappingStart(anchor, _) => {
                if self.documents <= 1 {
                    self.start_collection(true, anchor, marker);
                }
            }
            Event::SequenceStart(anchor, _) => {
                if self.documents <= 1 {
                    self.start_collection(false, anchor, marker);
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                if self.documents <= 1 {
                    self.end_collection(marker);
                }
            }
            Event::Alias(anchor) => {
                if self.documents > 1 {
                    return;
                }
                let Some(value) = self.expand_alias(anchor, marker) else {
                    return;
                };
                if !self.in_key_position() {
                    let (path, is_key) = self.next_node_path(marker);
                    if !is_key {
                        self.spans.insert_value(path, marker);
                    }
                }
                self.complete(value, 0, marker);
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

const CORE_SCHEMA: &str = "tag:yaml.org,2002:";

/// YAML 1.2 core schema resolution of a scalar into a JSON value.
fn resolve_scalar(text: &str, style: TScalarStyle, tag: Option<&Tag>) -> Result<Value, String> {
    if let Some(tag) = tag {
        if tag.handle == CORE_SCHEMA || tag.handle == "!!" {
            return match tag.suffix.as_str() {
                "str" => Ok(Value::String(text.to_string())),
                "null" | "bool" | "int" | "float" => {
                    let value = resolve_plain(text)?;
                    let matches = match tag.suffix.as_str() {
                        "null" => value.is_null(),
                        "bool" => value.is_boolean(),
                        "int" => value.is_i64() || value.is_u64(),
                        _ => value.is_number(),
                    };
                    if matches {
                        Ok(value)
                    } else {
                        Err(format!("`{text}` is not a valid !!{}", tag.suffix))
                    }
                }
                other => Err(format!("the YAML tag `!!{other}` is not supported here")),
            };
        }
        if tag.handle.is_empty() && tag.suffix == "!" {
            return Ok(Value::String(text.to_string()));
        }
        return Err(format!(
            "the YAML tag `{}{}` is not supported: pipelines use plain YAML values",
            tag.handle, tag.suffix
        ));
    }
    match style {
        TScalarStyle::Plain => resolve_plain(text),
        _ => Ok(Value::String(text.to_string())),
    }
}

fn resolve_plain(text: &str) -> Result<Value, String> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Ok(Value::Null),
        "true" | "True" | "TRUE" => return Ok(Value::Bool(true)),
        "false" | "False" | "FALSE" => return Ok(Value::Bool(false)),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => {
            return Err(format!(
                "`{text}` is not supported: numbers in a pipeline must be finite"
            ))
        }
        _ => {}
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    if let Some(hex) = text.strip_prefix("0x") {
        if !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            if let Ok(number) = u64::from_str_radix(hex, 16) {
                return Ok(Value::from(number));
            }
        }
    }
    if let Some(octal) = text.strip_prefix("0o") {
        if !octal.is_empty() && octal.chars().all(|c| ('0'..='7').contains(&c)) {
            if let Ok(number) = u64::from_str_radix(octal, 8) {
                return Ok(Value::from(number));
            }
        }
    }
    if !unsigned.is_empty() && unsigned.chars().all(|c| c.is_ascii_digit()) {
        if let Ok(number) = text.parse::<i64>() {
            return Ok(Value::from(number));
        }
        if let Ok(number) = text.trim_start_matches('+').parse::<u64>() {
            return Ok(Value::from(number));
        }
    }
    if is_core_float(unsigned) {
        if let Ok(number) = text.parse::<f64>() {
            if let Some(number) = serde_json::Number::from_f64(number) {
                return Ok(Value::Number(number));
            }
        }
    }
    Ok(Value::String(text.to_string()))
}

/// `( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?` (sign already stripped).
fn is_core_float(text: &str) -> bool {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], Some(&text[at + 1..])),
        None => (text, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, fraction)) => {
            whole.chars().all(|c| c.is_ascii_digit())
                && fraction.chars().all(|c| c.is_ascii_digit())
                && !(whole.is_empty() && fraction.is_empty())
        }
        None => !mantissa.is_empty() && mantissa.chars().all(|c| c.is_ascii_digit()),
    };
    let exponent_ok = match exponent {
        None => true,
        Some(exponent) => {
            let digits = exponent.strip_prefix(['-', '+']).unwrap_or(exponent);
            !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
        }
    };
    mantissa_ok && exponent_ok
}

// ---------------------------------------------------------------------------------------------
// The document: file, text, tree.
// ---------------------------------------------------------------------------------------------

/// A pipeline file read and parsed, overrides applied, not yet deserialized.
#[derive(Debug, Clone)]
pub struct Document {
    /// The file as given on the command line.
    pub file: PathBuf,
    pub source: String,
    /// The document (a mapping at the top, once [`read_document`] accepted it).
    pub value: Value,
    pub spans: SpanIndex,
    /// Paths of values the YAML layer rejected (their problem is already reported).
    pub rejected_values: HashSet<String>,
}

impl Document {
    /// The file name as shown in messages (as given on the command line).
    pub fn display_name(&self) -> String {
        self.file.display().to_string()
    }

    /// Place problems with the span index and wrap them for this file.
    pub fn problems(&self, mut problems: Vec<Problem>) -> Problems {
        for problem in &mut problems {
            self.spans.place(problem);
        }
        // In file order, as a compiler reports them; command-line problems first.
        problems.sort_by_key(|problem| (problem.line.unwrap_or(0), problem.column.unwrap_or(0)));
        // One problem of a matrix value shared by several expansions is reported once (for the
        // first expansion it breaks).
        let mut seen = HashSet::new();
        problems.retain(|problem| {
            let (path, message, hint) = super::matrix::without_expansion(problem);
            problem.line.is_none()
                || seen.insert((problem.line, problem.column, path, message, hint))
        });
        Problems::new(self.display_name(), problems).with_source(self.source.clone())
    }
}

/// Read and parse a pipeline file into a document whose top level is a mapping.
/// Returns every problem found at this level (the file is unusable past them).
pub fn read_document(file: &Path) -> Result<(Document, Vec<Problem>), Problems> {
    let display = file.display().to_string();
    let source = match read_bounded(file) {
        Ok(source) => source,
        Err(message) => return Err(Problems::new(display, vec![Problem::new("", message)])),
    };
    let wrap = |problems: Vec<Problem>| {
        Problems::new(display.clone(), problems).with_source(source.clone())
    };
    let parsed = match parse_yaml(&source) {
        Ok(parsed) => parsed,
        Err(problem) => return Err(wrap(vec![*problem])),
    };
    let mut problems = parsed.problems;
    let value = match parsed.value {
        None | Some(Value::Null) => {
            problems.push(
                Problem::new("", "the file is empty: a pipeline needs a `stages` mapping")
                    .with_hint("start from pipelines/quickstart.yaml, or see `peftpipe schema`")
                    .at(1, 1),
            );
            return Err(wrap(problems));
        }
        Some(Value::Object(map)) => Value::Object(map),
        Some(other) => {
            problems.push(
                Problem::new(
                    "",
                    format!(
                        "a pipeline is a mapping with a `stages` key, found {}",
                        describe_value(&other)
                    ),
                )
                .at(first_content_line(&source), 1),
            );
            return Err(wrap(problems));
        }
    };
    Ok((
        Document {
            file: file.to_path_buf(),
            source,
            value,
            spans: parsed.spans,
            rejected_values: parsed.rejected_values,
        },
        problems,
    ))
}

/// The file's text, refused past [`MAX_PIPELINE_FILE_BYTES`] (read no further than that, so a
/// huge or endless file such as a device costs nothing). Errors are messages for the user.
fn read_bounded(file: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let describe = |error: std::io::Error| match error.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::InvalidData => "the file is not UTF-8 text".to_string(),
        _ => format!("cannot read the file: {error}"),
    };
    let opened = std::fs::File::open(file).map_err(describe)?;
    if opened.metadata().is_ok_and(|metadata| metadata.is_dir()) {
        return Err("cannot read the file: it is a directory".to_string());
    }
    let mut bytes = Vec::new();
    opened
        .take(MAX_PIPELINE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(describe)?;
    if bytes.len() as u64 > MAX_PIPELINE_FILE_BYTES {
        return Err(format!(
            "document too large: a pipeline file may hold at most {} MiB",
            MAX_PIPELINE_FILE_BYTES >> 20
        ));
    }
    String::from_utf8(bytes).map_err(|_| "the file is not UTF-8 text".to_string())
}

fn first_content_line(source: &str) -> usize {
    source
        .lines()
        .position(|line| {
            let trimmed = line.trim();
            !trimmed.is_empty() && !trimmed.starts_with('#') && trimmed != "---"
        })
        .map_or(1, |index| index + 1)
}

/// `a list`, `the string "x"`, ...
pub fn describe_value(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(flag) => format!("the boolean `{flag}`"),
        Value::Number(number) => format!("the number `{number}`"),
        Value::String(text) => format!("the string \"{text}\""),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "a mapping".to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Pass 2: `--set` overrides.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `stages.data.ingest.filters[0].column` → segments. Digits after a dot index a list too.
fn parse_key_path(path: &str) -> Result<Vec<Segment>, String> {
    let mut segments = Vec::new();
    if path.is_empty() {
        return Err("the key is empty".to_string());
    }
    for part in path.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if name.is_empty() && segments.is_empty() {
            return Err(format!("`{path}` has an empty key"));
        }
        if !name.is_empty() {
            match name.parse::<usize>() {
                Ok(index) if name.chars().all(|c| c.is_ascii_digit()) => {
                    segments.push(Segment::Index(index))
                }
                _ => segments.push(Segment::Key(name.to_string())),
            }
        } else if rest.is_empty() {
            return Err(format!("`{path}` has an empty key"));
        }
        while !rest.is_empty() {
            let Some(close) = rest.find(']') else {
                return Err(format!("`{path}`: unclosed `[`"));
            };
            let index = rest[1..close]
                .parse::<usize>()
                .map_err(|_| format!("`{path}`: `{}` is not a list index", &rest[1..close]))?;
            segments.push(Segment::Index(index));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(format!("`{path}`: unexpected `{rest}` after `]`"));
            }
        }
    }
    Ok(segments)
}

fn render_segments(segments: &[Segment]) -> String {
    let mut path = String::new();
    for segment in segments {
        match segment {
            Segment::Key(key) => path = join_key(&path, key),
            Segment::Index(index) => path = join_index(&path, *index),
        }
    }
    path
}

/// Apply one `--set KEY=VALUE` to the document. VALUE is parsed as YAML. The key's parents must
/// exist up to the stage kind (an override never creates a stage or gives it a second kind);
/// below that, missing mappings are created and deserialization judges the keys.
pub fn apply_override(document: &mut Document, argument: &str) -> Result<(), Box<Problem>> {
    apply_override_unboxed(document, argument).map_err(Box::new)
}

#[expect(
    clippy::result_large_err,
    reason = "private helper with many early returns; the public function boxes the error"
)]
fn apply_override_unboxed(document: &mut Document, argument: &str) -> Result<(), Problem> {
    let origin_problem = |path: &str, message: String| {
        let mut problem = Problem::new(path, message);
        problem.from_override = Some(argument.to_string());
        problem
    };
    let Some((key, text)) = argument.split_once('=') else {
        return Err(
            origin_problem("", format!("`--set {argument}` is not KEY=VALUE"))
                .with_hint("e.g. `--set stages.train.train.method.lora.r=16`"),
        );
    };
    let key = key.trim();
    let segments = parse_key_path(key).map_err(|message| origin_problem(key, message))?;
    let new_value = match parse_yaml(text) {
        Ok(parsed) => {
            if let Some(problem) = parsed.problems.into_iter().next() {
                return Err(origin_problem(
                    key,
                    format!("the value `{text}` is not valid: {}", problem.message),
                ));
            }
            parsed.value.unwrap_or(Value::Null)
        }
        Err(problem) => {
            return Err(origin_problem(
                key,
                format!("the value `{text}` is not valid YAML: {}", problem.message),
            )
            .with_hint("quote values that contain YAML syntax, e.g. `--set 'stages.x.template.prompt=\"a: b\"'`"))
        }
    };

    let mut current = &mut document.value;
    let mut walked: Vec<Segment> = Vec::new();
    let last = segments.len() - 1;
    for (depth, segment) in segments.iter().enumerate() {
        let here = render_segments(&walked);
        let in_stages = walked.len() == 1 && walked[0] == Segment::Key("stages".to_string());
        let in_stage = walked.len() == 2 && walked[0] == Segment::Key("stages".to_string());
        match segment {
            Segment::Key(name) => {
                let Value::Object(map) = current else {
                    return Err(origin_problem(
                        key,
                        format!(
                            "`{here}` is {}, so it has no key `{name}`",
                            describe_value(current)
                        ),
                    ));
                };
                if in_stages && !map.contains_key(name) {
                    let names: Vec<&str> = map.keys().map(String::as_str).collect();
                    // `--set` edits the file as written, before `matrix:` expansion.
                    let hint = match name.split_once('@') {
                        Some((base, _)) if map.contains_key(base) => Some(format!(
                            "`{name}` is an expansion of `{base}`'s matrix: set `stages.{base}.…` (every expansion) or its values, `stages.{base}.matrix.KEY`"
                        )),
                        _ => hint_for_unknown(name, names, "stages"),
                    };
                    return Err(origin_problem(key, format!("no stage named `{name}`"))
                        .with_optional_hint(hint));
                }
                // A `matrix:` may be added next to the kind.
                if in_stage && !map.contains_key(name) && name != super::matrix::MATRIX_KEY {
                    let existing: Vec<&str> = map.keys().map(String::as_str).collect();
                    let message = match existing.as_slice() {
                        [kind] => format!("stage `{here}` is a `{kind}` stage, not `{name}`"),
                        _ => format!("`{here}` has no key `{name}`"),
                    };
                    return Err(origin_problem(key, message)
                        .with_optional_hint(hint_for_unknown(name, existing, "keys")));
                }
                if depth == last {
                    map.insert(name.clone(), new_value);
                    break;
                }
                current = map
                    .entry(name.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if current.is_null() {
                    *current = Value::Object(Map::new());
                }
            }
            Segment::Index(index) => {
                let Value::Array(items) = current else {
                    return Err(origin_problem(
                        key,
                        format!(
                            "`{here}` is {}, not a list, so `[{index}]` does not apply",
                            describe_value(current)
                        ),
                    ));
                };
                let length = items.len();
                let Some(item) = items.get_mut(*index) else {
                    return Err(origin_problem(
                        key,
                        format!("`{here}` has {length} item(s); index {index} is out of range"),
                    ));
                };
                if depth == last {
                    *item = new_value;
                    break;
                }
                current = item;
            }
        }
        walked.push(segment.clone());
    }
    let path = render_segments(&segments);
    document.spans.remove_subtree(&path);
    document
        .spans
        .insert(path, Origin::Override(argument.to_string()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Pass 3: deserialization, every problem.
// ---------------------------------------------------------------------------------------------

/// Deserialize `value` (found at key path `prefix`) into `T`, collecting every problem: after an
/// error the offending entry is taken out and deserialization is retried.
pub fn deserialize_all<T: DeserializeOwned>(
    value: &Value,
    prefix: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    const MAX_ROUNDS: usize = 64;
    let mut value = value.clone();
    // Original key paths already reported and taken out.
    let mut removed: HashSet<String> = HashSet::new();
    // Original key paths a did-you-mean pointed at (`a.path` for `a.pathh`): a "missing" error
    // for them repeats the typo's problem.
    let mut suggested: HashSet<String> = HashSet::new();
    // Original indices taken out of each sequence (by its original path), to map the indices
    // serde reports after a removal back to the file.
    let mut removed_items: HashMap<String, Vec<usize>> = HashMap::new();
    for _ in 0..MAX_ROUNDS {
        let error = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(parsed) => return Some(parsed),
            Err(error) => error,
        };
        // Current (post-removal) segments and their original counterparts.
        let mut target = Vec::new();
        let mut original_path = prefix.to_string();
        let mut ends_in_variant = false;
        for segment in error.path().iter() {
            ends_in_variant = false;
            match segment {
                serde_path_to_error::Segment::Seq { index } => {
                    let original = original_index(removed_items.get(&original_path), *index);
                    target.push(Segment::Index(*index));
                    original_path = join_index(&original_path, original);
                }
                serde_path_to_error::Segment::Map { key } => {
                    target.push(Segment::Key(key.clone()));
                    original_path = join_key(&original_path, key);
                }
                serde_path_to_error::Segment::Enum { variant } => {
                    target.push(Segment::Key(variant.clone()));
                    original_path = join_key(&original_path, variant);
                    ends_in_variant = true;
                }
                serde_path_to_error::Segment::Unknown => {}
            }
        }
        let mut explained = explain_serde_error(&error.inner().to_string());
        // A choice (`method`, an enum written as a mapping) given several keys: name them.
        if explained
            .message
            .starts_with("expected map with a single key")
        {
            if let Some(Value::Object(map)) = value_at(&value, &target) {
                let keys: Vec<String> = map.keys().map(|key| format!("`{key}`")).collect();
                explained.message = format!(
                    "expected exactly one key (one choice), found {}: {}",
                    keys.len(),
                    keys.join(", ")
                );
                explained.hint = Some("keep one of them".to_string());
            }
        }
        let mut report = !removed.contains(&original_path);
        match &explained.kind {
            // The path may or may not already name the unknown key; make it name it.
            SerdeErrorKind::UnknownField(field) => {
                let names_key = matches!(target.last(), Some(Segment::Key(last)) if last == field)
                    && !ends_in_variant;
                if !names_key {
                    target.push(Segment::Key(field.clone()));
                    original_path = join_key(&original_path, field);
                    ends_in_variant = false;
                }
                if let Some(close) = explained.hint.as_deref().and_then(suggestion) {
                    if let Some(parent) = parent_path(&original_path) {
                        suggested.insert(join_key(parent, close));
                    }
                }
            }
            // Missing keys point at the mapping that lacks them: report, then take the whole
            // mapping out (its parent then misses it, which is not reported twice).
            SerdeErrorKind::MissingField(field) => {
                let missing = join_key(&original_path, field);
                if removed.contains(&missing) || suggested.contains(&missing) {
                    report = false;
                }
            }
            SerdeErrorKind::Other => {}
        }
        if report {
            let mut problem = Problem::new(original_path.clone(), explained.message)
                .with_optional_hint(explained.hint);
            // A wrong type, an invalid or unknown value: the value is what is wrong.
            if matches!(explained.kind, SerdeErrorKind::Other) {
                problem.subject = Subject::Value;
            }
            problems.push(problem);
        }
        // Removing the document itself or an enum's variant would only produce a confusing
        // second error about the enum: stop here.
        if target.is_empty() || ends_in_variant {
            return None;
        }
        removed.insert(original_path.clone());
        match remove_at(&mut value, &target) {
            Some(Segment::Index(index)) => {
                let sequence_path = parent_path(&original_path)?;
                let original = original_index(removed_items.get(sequence_path), index);
                removed_items
                    .entry(sequence_path.to_string())
                    .or_default()
                    .push(original);
            }
            Some(Segment::Key(_)) => {}
            None => return None,
        }
    }
    None
}

/// `did you mean `x`?` → `x`.
fn suggestion(hint: &str) -> Option<&str> {
    hint.strip_prefix("did you mean `")?.strip_suffix("`?")
}

/// The original index of the `index`-th remaining item when `removed` were taken out.
fn original_index(removed: Option<&Vec<usize>>, index: usize) -> usize {
    let Some(removed) = removed else {
        return index;
    };
    let mut remaining = index;
    let mut original = 0;
    loop {
        if !removed.contains(&original) {
            if remaining == 0 {
                return original;
            }
            remaining -= 1;
        }
        original += 1;
    }
}

/// Remove the node at `segments`; returns the removed last segment.
/// The value at `segments` (None when the path does not lead anywhere).
fn value_at<'a>(value: &'a Value, segments: &[Segment]) -> Option<&'a Value> {
    let mut current = value;
    for segment in segments {
        current = match (segment, current) {
            (Segment::Key(key), Value::Object(map)) => map.get(key)?,
            (Segment::Index(index), Value::Array(items)) => items.get(*index)?,
            _ => return None,
        };
    }
    Some(current)
}

fn remove_at(value: &mut Value, segments: &[Segment]) -> Option<Segment> {
    let (last, parents) = segments.split_last()?;
    let mut current = value;
    for segment in parents {
        current = match (segment, current) {
            (Segment::Key(key), Value::Object(map)) => map.get_mut(key)?,
            (Segment::Index(index), Value::Array(items)) => items.get_mut(*index)?,
            _ => return None,
        };
    }
    match (last, current) {
        (Segment::Key(key), Value::Object(map)) => {
            map.shift_remove(key)?;
        }
        (Segment::Index(index), Value::Array(items)) => {
            if *index >= items.len() {
                return None;
            }
            items.remove(*index);
        }
        _ => return None,
    }
    Some(last.clone())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SerdeErrorKind {
    UnknownField(String),
    MissingField(String),
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ExplainedError {
    kind: SerdeErrorKind,
    message: String,
    hint: Option<String>,
}

/// Turn serde's messages into a pipeline author's words, with did-you-mean from serde's
/// "expected one of" lists.
fn explain_serde_error(message: &str) -> ExplainedError {
    let plain = |message: String| ExplainedError {
        kind: SerdeErrorKind::Other,
        message,
        hint: None,
    };
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let (name, expected) = split_name_and_expected(rest);
        let hint = if expected.is_empty() {
            Some("this mapping takes no keys".to_string())
        } else {
            hint_for_unknown(&name, expected.iter().map(String::as_str), "keys")
        };
        return ExplainedError {
            kind: SerdeErrorKind::UnknownField(name.clone()),
            message: format!("unknown key `{name}`"),
            hint,
        };
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let (name, expected) = split_name_and_expected(rest);
        return ExplainedError {
            kind: SerdeErrorKind::Other,
            message: format!("unknown value `{name}`"),
            hint: hint_for_unknown(&name, expected.iter().map(String::as_str), "values"),
        };
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        let name = rest.trim_matches('`').to_string();
        return ExplainedError {
            kind: SerdeErrorKind::MissingField(name.clone()),
            message: format!("missing required key `{name}`"),
            hint: None,
        };
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((found, expected)) = rest.split_once(", expected ") {
                let (expected, found) = (describe_expected(expected), describe_found(found));
                // `lora:` with nothing after it is null in YAML, not an empty mapping.
                let hint = (expected == "a mapping" && found == "null").then(|| {
                    "a key with nothing after it is null in YAML: write `{}` for a mapping \
                     of defaults (`lora: {}`)"
                        .to_string()
                });
                return ExplainedError {
                    hint,
                    ..plain(format!("expected {expected}, found {found}"))
                };
            }
        }
    }
    if let Some(rest) = message.strip_prefix("invalid length ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return plain(format!("expected {expected}, found {found} item(s)"));
        }
    }
    plain(message.to_string())
}

/// "`name`, expected one of `a`, `b`" → ("name", ["a", "b"]).
fn split_name_and_expected(rest: &str) -> (String, Vec<String>) {
    let (name_part, expected_part) = match rest.split_once(", expected ") {
        Some((name, expected)) => (name, expected),
        None => match rest.split_once(", there are no ") {
            Some((name, _)) => (name, ""),
            None => (rest, ""),
        },
    };
    let name = name_part.trim().trim_matches('`').to_string();
    let expected = expected_part
        .trim_start_matches("one of ")
        .split(", ")
        .map(|item| item.trim().trim_matches('`').to_string())
        .filter(|item| !item.is_empty())
        .collect();
    (name, expected)
}

fn describe_expected(expected: &str) -> String {
    let expected = expected.trim();
    match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer".to_string(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer".to_string(),
        "f32" | "f64" => "a number".to_string(),
        "a sequence" => "a list".to_string(),
        "a map" => "a mapping".to_string(),
        "a boolean" | "a string" | "a character" => expected.to_string(),
        _ if expected.starts_with("struct ") => "a mapping".to_string(),
        _ if expected.starts_with("a borrowed") => "a string".to_string(),
        _ if expected.starts_with("tuple struct ") || expected.starts_with("a tuple") => {
            "a list".to_string()
        }
        _ => expected.to_string(),
    }
}

fn describe_found(found: &str) -> String {
    let found = found.trim();
    if let Some(text) = found.strip_prefix("string ") {
        return text.to_string();
    }
    for prefix in ["integer ", "floating point ", "boolean "] {
        if let Some(value) = found.strip_prefix(prefix) {
            return value.trim_matches('`').to_string();
        }
    }
    match found {
        "map" => "a mapping".to_string(),
        "sequence" => "a list".to_string(),
        "unit value" | "unit" => "null".to_string(),
        _ => found.to_string(),
    }
}

/// The result of parsing: the pipeline as written (stages whose config could not be read are
/// left out of `raw` and named in `invalid_stages`), the document it came from, every problem.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub raw: RawPipeline,
    pub document: Document,
    pub overrides: Vec<String>,
    /// Names of stages written in the file, in file order (including invalid ones).
    pub stage_names: Vec<String>,
    /// Stages that exist but whose config has problems.
    pub invalid_stages: HashSet<String>,
    /// Invalid stages whose kind and upstream references could still be read once the offending
    /// keys were taken out (no problem sits at a reference key). Good for drawing the graph
    /// ([`drawable_graph`]), never for running.
    pub readable_stages: IndexMap<String, StageConfig>,
    /// Each stage with a `matrix:` and the names of its expansions (which stand in its place in
    /// `raw.stages` and `stage_names`); see [`super::matrix`].
    pub expansions: IndexMap<String, Vec<String>>,
    pub problems: Vec<Problem>,
}

impl Parsed {
    /// The pipeline file's directory (relative paths in the pipeline resolve against it).
    pub fn project_dir(&self) -> PathBuf {
        project_dir_of(&self.document.file)
    }
}

fn project_dir_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Longest stage or pipeline name: names become file and folder names (lock files, artifact
/// and checkpoint folders, temporary folders with a suffix), which most filesystems cap at 255
/// bytes.
pub const MAX_NAME_LENGTH: usize = 64;

/// Why `name` cannot name a stage or a pipeline, if it cannot: names may hold only letters,
/// digits, `-` and `_` (they appear in key paths, `--set` keys, artifact and lock file paths,
/// spelled as written, so two different names never share a folder) and at most
/// [`MAX_NAME_LENGTH`] characters.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is empty".to_string());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Some("may only contain letters, digits, `-` and `_`".to_string());
    }
    if name.len() > MAX_NAME_LENGTH {
        return Some(format!(
            "is {} characters long; at most {MAX_NAME_LENGTH} are allowed",
            name.len()
        ));
    }
    None
}

/// The pipeline's name: `name:` when written, else the file stem.
pub fn pipeline_name(raw: &RawPipeline, file: &Path) -> String {
    raw.name.clone().unwrap_or_else(|| {
        file.file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".to_string())
    })
}

/// A valid pipeline as `validate` compares it with the other files it was given.
#[derive(Debug, Clone)]
pub struct NameClaim<'a> {
    /// The pipeline file as given.
    pub file: &'a Path,
    pub name: &'a str,
    /// Where its `.peftpipe/out/<name>/` lives.
    pub project_dir: &'a Path,
    /// Where its lock file lives.
    pub cache_dir: &'a Path,
}

/// Pipelines of different files that share a name and a project or cache directory: they would
/// share a lock file (each run reading the other's fingerprints) and an output folder. For each
/// such pipeline, its index and a problem naming the other file.
pub fn shared_names(claims: &[NameClaim<'_>]) -> Vec<(usize, Problem)> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => std::path::absolute(a).ok() == std::path::absolute(b).ok(),
    };
    let mut found = Vec::new();
    for (index, claim) in claims.iter().enumerate() {
        let other = claims.iter().enumerate().find(|(other_index, other)| {
            *other_index != index
                && other.name == claim.name
                && !same(other.file, claim.file)
                && (same(other.project_dir, claim.project_dir)
                    || same(other.cache_dir, claim.cache_dir))
        });
        let Some((_, other)) = other else {
            continue;
        };
        let shared = if same(other.project_dir, claim.project_dir) {
            format!("its lock file and `.peftpipe/out/{}/`", claim.name)
        } else {
            "its lock file in the cache".to_string()
        };
        found.push((
            index,
            Problem::new(
                "name",
                format!(
                    "pipeline name `{}` is also the name of {}: the two would share {shared}",
                    claim.name,
                    other.file.display()
                ),
            )
            .with_hint("give each pipeline its own `name:`")
            .about_value(),
        ));
    }
    found
}

/// The problem with the pipeline's name (written, or the file stem standing in for it).
fn pipeline_name_problem(raw: &RawPipeline, file: &Path) -> Option<Problem> {
    let name = pipeline_name(raw, file);
    let reason = name_problem(&name)?;
    let hint = "the pipeline name names its lock file and its `.peftpipe/out/<name>/` folder";
    Some(match &raw.name {
        Some(_) => Problem::new("name", format!("pipeline name `{name}` {reason}"))
            .with_hint(hint)
            .about_value(),
        None => Problem::new(
            "",
            format!("the pipeline is named after its file, and `{name}` {reason}"),
        )
        .with_hint(format!("add a `name:` line, or rename the file ({hint})"))
        .at(1, 1),
    })
}

/// Parse a pipeline file and apply overrides: syntax and schema, no semantic checks. Problems
/// found on the way are in `Parsed::problems` (not yet placed); the error case is a file that
/// cannot be read as a pipeline at all.
pub fn parse_pipeline(file: &Path, overrides: &[String]) -> Result<Parsed, Problems> {
    let (mut document, mut problems) = read_document(file)?;
    let yaml_problem_count = problems.len();
    for argument in overrides {
        if let Err(problem) = apply_override(&mut document, argument) {
            problems.push(*problem);
        }
    }
    let Value::Object(top) = &document.value else {
        problems.push(Problem::new(
            "",
            "a pipeline is a mapping with a `stages` key",
        ));
        return Err(document.problems(problems));
    };

    // The top level, with `stages` stood in for by an empty mapping (stages are read one by one).
    let mut top_level = top.clone();
    let stages_value = top_level.get("stages").cloned();
    if matches!(stages_value, Some(Value::Object(_))) {
        top_level.insert("stages".to_string(), Value::Object(Map::new()));
    }
    let mut raw: Option<RawPipeline> =
        deserialize_all(&Value::Object(top_level), "", &mut problems);
    if stages_value.is_none() {
        for problem in &mut problems {
            if problem.path.is_empty() && problem.message == "missing required key `stages`" {
                problem.hint = Some(
                    "a pipeline lists its stages under `stages:`, e.g. `stages: { data: { ingest: { path: data.parquet } } }`"
                        .to_string(),
                );
                problem.line = Some(first_content_line(&document.source));
                problem.column = Some(1);
            }
        }
    }

    let mut stages: IndexMap<String, StageConfig> = IndexMap::new();
    let mut stage_names = Vec::new();
    let mut invalid_stages = HashSet::new();
    let mut readable_stages = IndexMap::new();
    let mut expansions = IndexMap::new();
    if let Some(Value::Object(stage_map)) = &stages_value {
        if stage_map.is_empty() {
            problems.push(
                Problem::new("stages", "the pipeline has no stages").with_hint(
                    "add at least one stage, e.g. `data: { ingest: { path: data.parquet } }`",
                ),
            );
        }
        let mut misnamed = HashSet::new();
        for name in stage_map.keys() {
            if let Some(reason) = name_problem(name) {
                problems.push(
                    Problem::new(
                        join_key("stages", name),
                        format!("stage name `{name}` {reason}"),
                    )
                    .with_hint("stage names appear in key paths, `--set` keys and artifact paths"),
                );
                misnamed.insert(name.clone());
            }
        }
        let expanded = super::matrix::expand(stage_map, &mut document.spans, &mut problems);
        for name in &expanded.invalid {
            stage_names.push(name.clone());
            invalid_stages.insert(name.clone());
        }
        for (name, value) in &expanded.stages {
            if expanded.invalid.contains(name) {
                continue;
            }
            stage_names.push(name.clone());
            let at = join_key("stages", name);
            let before = problems.len();
            if misnamed.contains(name) {
                invalid_stages.insert(name.clone());
            }
            if let Some(config) = parse_stage(value, &at, &mut problems) {
                if problems.len() == before {
                    stages.insert(name.clone(), config);
                } else if references_intact(&config, &at, &problems[before..]) {
                    readable_stages.insert(name.clone(), config);
                }
            }
            if problems.len() != before {
                invalid_stages.insert(name.clone());
            }
        }
        // A misnamed stage with no other problem is still left out of the pipeline.
        for name in &misnamed {
            if let Some(config) = stages.shift_remove(name) {
                readable_stages.insert(name.clone(), config);
            }
        }
        expansions = expanded.expansions;
    }
    if let Some(raw) = raw.as_mut() {
        raw.stages = stages;
        problems.extend(pipeline_name_problem(raw, file));
    }
    // Values the YAML layer already rejected (and replaced by null) are not reported again.
    let mut index = 0;
    problems.retain(|problem| {
        index += 1;
        index <= yaml_problem_count || !document.rejected_values.contains(&problem.path)
    });
    let raw = raw.unwrap_or(RawPipeline {
        name: None,
        seed: 0,
        stages: IndexMap::new(),
    });
    Ok(Parsed {
        raw,
        document,
        overrides: overrides.to_vec(),
        stage_names,
        invalid_stages,
        readable_stages,
        expansions,
        problems,
    })
}

/// Whether none of `problems` (of the stage at `at`) is about one of the stage's upstream
/// references, so the references `config` holds are the ones written. (References are required
/// keys: one that had to be taken out leaves no config at all.)
fn references_intact(config: &StageConfig, at: &str, problems: &[Problem]) -> bool {
    let kind_at = join_key(at, config.kind().as_str());
    let reference_keys: Vec<String> = config
        .spec()
        .upstream()
        .iter()
        .map(|reference| join_key(&kind_at, reference.key))
        .collect();
    !problems.iter().any(|problem| {
        problem.path == kind_at
            || reference_keys
                .iter()
                .any(|key| problem.path == *key || is_descendant(&problem.path, key))
    })
}

/// The stage graph as written, for drawing it (`peftpipe dag`) even when the pipeline has other
/// problems: stages with problems take part when their kind and references could be read
/// ([`Parsed::readable_stages`]). Returns the graph when it can be drawn faithfully — every
/// stage's kind and references were read, every reference resolves and there is no cycle — and
/// the graph's problems (unknown references, cycles) either way.
pub fn drawable_graph(parsed: &Parsed) -> (Option<StageGraph>, Vec<Problem>) {
    let mut stages = parsed.raw.stages.clone();
    for (name, config) in &parsed.readable_stages {
        stages.insert(name.clone(), config.clone());
    }
    // File order, as the graph's tie-break.
    let ordered: IndexMap<String, StageConfig> = parsed
        .stage_names
        .iter()
        .filter_map(|name| {
            stages
                .get(name)
                .map(|config| (name.clone(), config.clone()))
        })
        .collect();
    let (graph, errors) = StageGraph::build(
        ordered
            .iter()
            .map(|(name, config)| (name.as_str(), config.kind(), config.spec().upstream())),
        parsed.stage_names.iter().map(String::as_str),
    );
    let problems: Vec<Problem> = errors
        .iter()
        .filter_map(|error| {
            matrix_reference(graph_problem(error, &ordered), error, &parsed.expansions)
        })
        .collect();
    let complete = ordered.len() == parsed.stage_names.len();
    let graph = (complete && problems.is_empty()).then_some(graph);
    (graph, problems)
}

/// One stage's value: a mapping with exactly one kind key.
fn parse_stage(value: &Value, at: &str, problems: &mut Vec<Problem>) -> Option<StageConfig> {
    let kinds = StageKind::ALL.map(StageKind::as_str);
    let kind_list = quoted_list(&kinds);
    let Value::Object(map) = value else {
        problems.push(
            Problem::new(
                at,
                format!(
                    "a stage is a mapping with one kind key, found {}",
                    describe_value(value)
                ),
            )
            .with_hint(format!("the kinds are {kind_list}"))
            .about_value(),
        );
        return None;
    };
    let known: Vec<&String> = map
        .keys()
        .filter(|key| kinds.contains(&key.as_str()))
        .collect();
    let unknown: Vec<&String> = map
        .keys()
        .filter(|key| !kinds.contains(&key.as_str()))
        .collect();
    match (known.as_slice(), unknown.as_slice()) {
        ([], []) => {
            problems.push(
                Problem::new(at, "the stage has no kind")
                    .with_hint(format!("a stage has exactly one kind key: {kind_list}")),
            );
            None
        }
        ([kind], extra) => {
            for key in extra {
                problems.push(
                    Problem::new(
                        join_key(at, key),
                        format!("unknown key `{key}` next to the stage kind `{kind}`"),
                    )
                    .with_hint(format!(
                        "a stage holds only its kind: indent `{key}` under `{kind}:` if it is one of its settings"
                    )),
                );
            }
            let mut single = Map::new();
            let kind_value = map.get(kind.as_str()).cloned().unwrap_or(Value::Null);
            // `ingest:` with nothing under it means an empty mapping (serde needs the struct).
            let kind_value = if kind_value.is_null() {
                Value::Object(Map::new())
            } else {
                kind_value
            };
            single.insert((*kind).clone(), kind_value);
            deserialize_all::<StageConfig>(&Value::Object(single), at, problems)
        }
        ([], [only]) => {
            problems.push(
                Problem::new(join_key(at, only), format!("unknown stage kind `{only}`"))
                    .with_optional_hint(
                        hint_for_unknown(only, kinds, "kinds")
                            .or_else(|| Some(format!("the kinds are {kind_list}"))),
                    ),
            );
            None
        }
        ([], several) => {
            let names: Vec<&str> = several.iter().map(|key| key.as_str()).collect();
            problems.push(
                Problem::new(
                    at,
                    format!(
                        "the stage has no kind, only the keys {}",
                        quoted_list(&names)
                    ),
                )
                .with_hint(format!("a stage has exactly one kind key: {kind_list}")),
            );
            None
        }
        (several, _) => {
            let names: Vec<&str> = several.iter().map(|key| key.as_str()).collect();
            problems.push(
                Problem::new(
                    join_key(at, several[1]),
                    format!("the stage has {} kinds ({}); a stage has exactly one", names.len(), quoted_list(&names)),
                )
                .with_hint("split it into one stage per kind, the later one naming the earlier as its input"),
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pass 4: semantic checks.
// ---------------------------------------------------------------------------------------------

/// Stage references, cycles, input files and each kind's checks, under the default
/// [`LoadOptions`] (nothing outside the project). See [`check_pipeline_with`].
pub fn check_pipeline(parsed: &Parsed, probe: &dyn Probe) -> Vec<Problem> {
    check_pipeline_with(parsed, probe, &LoadOptions::default())
}

/// Stage references, cycles, input files, each kind's checks and the path policy (template
/// files and export destinations inside the project unless `options.allow_outside_project`).
/// Stages whose config could not be read are still valid reference targets (their own problems
/// are already reported). `probe` answers what needs Arrow or a model.
pub fn check_pipeline_with(
    parsed: &Parsed,
    probe: &dyn Probe,
    options: &LoadOptions,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let project_dir = parsed.project_dir();
    let stages = &parsed.raw.stages;
    // Every stage that names a model folder (a sweep's train stages, an evaluate stage's base,
    // an export's merge) asks about it; its files are read for the first only.
    let probe = &super::probe::ModelsCheckedOnce::new(probe);

    let (graph, graph_errors) = StageGraph::build(
        stages
            .iter()
            .map(|(name, config)| (name.as_str(), config.kind(), config.spec().upstream())),
        parsed.stage_names.iter().map(String::as_str),
    );
    for error in &graph_errors {
        problems.extend(matrix_reference(
            graph_problem(error, stages),
            error,
            &parsed.expansions,
        ));
    }

    // Kind checks in topological order, then whatever sits on or behind a cycle.
    let mut columns: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Each stage's input files, as listed below (read again by the published-input check).
    let mut inputs: Vec<(&str, &StageConfig, Vec<InputFile>)> = Vec::new();
    // Stages on or behind a cycle are checked too, but their outputs are not offered as
    // columns: the graph there is broken and its problem already reported.
    let ordered: Vec<&str> = graph.order().collect();
    let mut order = ordered.clone();
    for name in stages.keys() {
        if !order.contains(&name.as_str()) {
            order.push(name);
        }
    }
    for name in order {
        let Some(config) = stages.get(name) else {
            continue;
        };
        let at = join_key(&join_key("stages", name), config.kind().as_str());
        let context = CheckContext {
            pipeline: &parsed.raw,
            project_dir: &project_dir,
            columns: &columns,
            probe,
        };
        let before = problems.len();
        config.spec().check(&context, &at, &mut problems);
        // Missing input files, unless the kind's own check already said so (at its key).
        match config.spec().fingerprint_inputs(&project_dir) {
            Ok(files) => inputs.push((name, config, files)),
            Err(message) => {
                if !problems[before..]
                    .iter()
                    .any(|problem| problem.message == message)
                {
                    problems.push(Problem::new(at.clone(), message));
                }
            }
        }
        path_policy(config, &project_dir, options, &at, &mut problems);
        if !ordered.contains(&name) {
            continue;
        }
        if let Some(output) = config.spec().output_columns(&context, name) {
            columns.insert(name.to_string(), output);
        }
    }
    problems.extend(published_inputs(stages, &inputs, &project_dir));
    problems
}

/// `path` made comparable with another: canonical when it exists, else with `.` and `..`
/// folded lexically.
fn comparable(path: &Path) -> PathBuf {
    if let Ok(canonical) = path.canonicalize() {
        return canonical;
    }
    let mut folded = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                folded.pop();
            }
            other => folded.push(other),
        }
    }
    folded
}

/// A stage may not read, as an input file, what another stage of the pipeline publishes (an
/// export destination): nothing orders the reader after the publisher, so the reader's cache key
/// would be taken from the folder as the last run left it, and a run could report the reader
/// fresh with results a clean run would not produce (or read a half-published folder).
fn published_inputs(
    stages: &IndexMap<String, StageConfig>,
    inputs: &[(&str, &StageConfig, Vec<InputFile>)],
    project_dir: &Path,
) -> Vec<Problem> {
    let published: Vec<(&str, PathBuf)> = stages
        .iter()
        .flat_map(|(name, config)| {
            config
                .spec()
                .published_paths(project_dir)
                .unwrap_or_default()
                .into_iter()
                .map(move |path| (name.as_str(), comparable(&path)))
        })
        .collect();
    if published.is_empty() {
        return Vec::new();
    }
    let mut problems = Vec::new();
    for (name, config, files) in inputs {
        let found = files.iter().find_map(|file| {
            let path = comparable(&file.path);
            published
                .iter()
                .find(|(publisher, destination)| publisher != name && path.starts_with(destination))
                .map(|(publisher, destination)| (file, *publisher, destination))
        });
        if let Some((file, publisher, destination)) = found {
            let source = match stages.get(publisher) {
                Some(StageConfig::Export(export)) => format!(
                    "read the train stage `{}` it exports through `model:` or `adapters:`",
                    export.from
                ),
                _ => format!("read stage `{publisher}` through a stage reference"),
            };
            problems.push(
                Problem::new(
                    join_key(&join_key("stages", name), config.kind().as_str()),
                    format!(
                        "reads `{}`, which stage `{publisher}` publishes ({}): nothing orders this stage after `{publisher}`, so it could read the folder as an earlier run left it",
                        file.key,
                        destination.display()
                    ),
                )
                .with_hint(format!(
                    "{source}, or a copy outside `{publisher}`'s destinations"
                )),
            );
        }
    }
    problems
}

/// The path policy ([`super::paths`]) for one stage: template files and export destinations
/// stay inside the project unless `--allow-outside-project`. A destination that already has a
/// problem (empty, the project itself) is not judged again.
fn path_policy(
    config: &StageConfig,
    project_dir: &Path,
    options: &LoadOptions,
    at: &str,
    problems: &mut Vec<Problem>,
) {
    match config {
        StageConfig::Template(template) => {
            problems.extend(template.path_problems(project_dir, options.allow_outside_project, at));
        }
        StageConfig::Export(export) => {
            for (key, written) in [
                ("adapter", &export.adapter),
                ("merged", &export.merged),
                ("gguf", &export.gguf),
            ] {
                let Some(written) = written else { continue };
                let path = join_key(at, key);
                if problems.iter().any(|problem| problem.path == path) {
                    continue;
                }
                if let Err(message) =
                    confine_destination(project_dir, written, options.allow_outside_project)
                {
                    problems.push(Problem::new(path, message).about_value());
                }
            }
        }
        StageConfig::Ingest(_) | StageConfig::Train(_) | StageConfig::Evaluate(_) => {}
    }
}

/// A reference to a stage that a matrix replaced by its expansions says so; a `STAGE@*` where
/// one stage is read is no problem of the graph (the expansion already reported it).
fn matrix_reference(
    problem: Problem,
    error: &GraphError,
    expansions: &IndexMap<String, Vec<String>>,
) -> Option<Problem> {
    let GraphError::UnknownStage {
        stage, reference, ..
    } = error
    else {
        return Some(problem);
    };
    if super::matrix::all_of(reference).is_some() {
        return None;
    }
    let Some(names) = expansions.get(reference) else {
        return Some(problem);
    };
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    Some(Problem {
        message: format!(
            "stage `{stage}` reads `{reference}`, but its `matrix:` expands it into {} stages",
            names.len()
        ),
        hint: Some(format!(
            "name one of them ({}), or, in a list, all of them as `{reference}@*`",
            quoted_list(&names)
        )),
        ..problem
    })
}

/// A graph error as a problem at the reference (the value naming the upstream stage).
pub fn graph_problem(error: &GraphError, stages: &IndexMap<String, StageConfig>) -> Problem {
    graph_problem_at_key(error, stages).about_value()
}

fn graph_problem_at_key(error: &GraphError, stages: &IndexMap<String, StageConfig>) -> Problem {
    let reference_path = |stage: &str, key: &str| match stages.get(stage) {
        Some(config) => join_key(
            &join_key(&join_key("stages", stage), config.kind().as_str()),
            key,
        ),
        None => join_key("stages", stage),
    };
    match error {
        GraphError::UnknownStage {
            stage,
            key,
            reference,
            candidates,
        } => Problem::new(
            reference_path(stage, key),
            format!("stage `{stage}` reads `{reference}`, but there is no stage of that name"),
        )
        .with_optional_hint(hint_for_unknown(
            reference,
            candidates.iter().map(String::as_str),
            "stages",
        )),
        GraphError::SelfReference { stage, key } => Problem::new(
            reference_path(stage, key),
            format!("stage `{stage}` reads itself"),
        )
        .with_hint("name the upstream stage whose output this stage reads"),
        GraphError::Cycle { path } => {
            // path = [a, b, c, a]: b reads a, c reads b, a reads c. Report it at the reference
            // in the first stage that closes the cycle (a reading c).
            let first = path.first().map(String::as_str).unwrap_or_default();
            let closing = path.len().checked_sub(2).and_then(|i| path.get(i));
            let key = closing.and_then(|closing| {
                stages.get(first).and_then(|config| {
                    config
                        .spec()
                        .upstream()
                        .into_iter()
                        .find(|reference| reference.stage == *closing)
                        .map(|reference| reference.key)
                })
            });
            let at = match key {
                Some(key) => reference_path(first, key),
                None => join_key("stages", first),
            };
            Problem::new(
                at,
                format!(
                    "the stages form a cycle: {} (each reads the one before it)",
                    path.join(" → ")
                ),
            )
            .with_hint("a stage cannot depend, directly or through others, on its own output")
        }
    }
}

/// Parse, apply overrides, deserialize and check a pipeline under the default [`LoadOptions`]
/// (nothing outside the project): every problem, or the validated pipeline. `probe` answers what
/// semantic checks need from Arrow or a model.
pub fn load_pipeline(
    file: &Path,
    overrides: &[String],
    probe: &dyn Probe,
) -> Result<Pipeline, Problems> {
    load_pipeline_with(file, overrides, probe, &LoadOptions::default())
}

/// [`load_pipeline`] with the command line's options (`--allow-outside-project`).
pub fn load_pipeline_with(
    file: &Path,
    overrides: &[String],
    probe: &dyn Probe,
    options: &LoadOptions,
) -> Result<Pipeline, Problems> {
    let parsed = parse_pipeline(file, overrides)?;
    let mut problems = parsed.problems.clone();
    problems.extend(check_pipeline_with(&parsed, probe, options));
    if !problems.is_empty() {
        return Err(parsed.document.problems(problems));
    }
    let name = pipeline_name(&parsed.raw, file);
    // Absolute, so stages that run on other threads or change directory resolve paths alike;
    // fingerprints use the paths as written, never this one.
    let project_dir = parsed.project_dir();
    let project_dir = std::path::absolute(&project_dir).unwrap_or(project_dir);
    Ok(Pipeline {
        name,
        file: file.to_path_buf(),
        project_dir,
        seed: parsed.raw.seed,
        stages: parsed.raw.stages,
        overrides: parsed.overrides,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ParsedYaml {
        match parse_yaml(text) {
            Ok(parsed) => parsed,
            Err(problem) => panic!("unexpected syntax error: {problem:?}"),
        }
    }

    fn file_origin(line: usize, column: usize) -> Origin {
        Origin::File { line, column }
    }

    #[test]
    fn spans_point_at_keys_and_items() {
        let parsed = parse("# comment\nstages:\n  data:\n    ingest:\n      path: a.parquet\n      filters:\n        - column: x\n        - column: y\n");
        assert_eq!(parsed.spans.get("stages"), Some(&file_origin(2, 1)));
        assert_eq!(
            parsed.spans.get("stages.data.ingest.path"),
            Some(&file_origin(5, 7))
        );
        assert_eq!(
            parsed.spans.get("stages.data.ingest.filters[1]"),
            Some(&file_origin(8, 11))
        );
        assert_eq!(
            parsed.spans.get("stages.data.ingest.filters[1].column"),
            Some(&file_origin(8, 11))
        );
        assert_eq!(
            parsed.spans.locate("stages.data.ingest.missing.deeper"),
            Some(&file_origin(4, 5))
        );
    }

    #[test]
    fn value_positions_cover_scalars_and_flow_collections_not_block_ones() {
        let parsed = parse("a: 1\nb: [x, y]\nc:\n  d: z\ne: {f: 'g h'}\nl:\n  - item\n");
        let spans = &parsed.spans;
        assert_eq!(spans.value("a"), Some((1, 4)));
        assert_eq!(spans.value("b"), Some((2, 4)));
        assert_eq!(spans.value("b[1]"), Some((2, 8)));
        assert_eq!(
            spans.value("c"),
            None,
            "a block mapping: its key stands for it"
        );
        assert_eq!(spans.value("c.d"), Some((4, 6)));
        assert_eq!(spans.value("e"), Some((5, 4)));
        assert_eq!(spans.value("e.f"), Some((5, 8)));
        assert_eq!(spans.value("l[0]"), Some((7, 5)));
    }

    #[test]
    fn value_problems_are_placed_at_the_value_key_problems_at_the_key() {
        let mut document = document("stages:\n  data:\n    ingest: {path: x.csv}\nseed: four\n");
        let place = |document: &Document, problem: Problem| {
            let mut problem = problem;
            document.spans.place(&mut problem);
            (problem.line, problem.column, problem.from_override)
        };
        let value = Problem::new("seed", "wrong").about_value();
        assert_eq!(place(&document, value.clone()), (Some(4), Some(7), None));
        let key = Problem::new("seed", "unknown");
        assert_eq!(place(&document, key), (Some(4), Some(1), None));
        // A value that was never written (a missing key's default) falls back to the key path.
        let unwritten = Problem::new("stages.data.ingest.format", "wrong").about_value();
        assert_eq!(place(&document, unwritten), (Some(3), Some(5), None));
        // A value set on the command line points at the argument, not the file.
        apply_override(&mut document, "seed=5").unwrap();
        assert_eq!(
            place(&document, value),
            (None, None, Some("seed=5".to_string()))
        );
    }

    #[test]
    fn scalars_follow_the_yaml_core_schema() {
        let parsed = parse("a: 4\nb: '4'\nc: 4.5\nd: true\ne: ~\nf: yes\ng: 0x10\nh: 1e3\ni: 18446744073709551615\nj: inf\n");
        let value = parsed.value.unwrap_or_default();
        assert_eq!(value["a"], Value::from(4));
        assert_eq!(value["b"], Value::from("4"));
        assert_eq!(value["c"], Value::from(4.5));
        assert_eq!(value["d"], Value::from(true));
        assert_eq!(value["e"], Value::Null);
        assert_eq!(value["f"], Value::from("yes"));
        assert_eq!(value["g"], Value::from(16));
        assert_eq!(value["h"], Value::from(1000.0));
        assert_eq!(value["i"], Value::from(u64::MAX));
        assert_eq!(value["j"], Value::from("inf"));
    }

    #[test]
    fn non_finite_numbers_are_problems() {
        let parsed = parse("a: .inf\n");
        assert_eq!(parsed.problems.len(), 1);
        assert_eq!(parsed.problems[0].path, "a");
    }

    #[test]
    fn duplicate_keys_are_reported_and_the_first_wins() {
        let parsed = parse("stages:\n  a: {x: 1}\n  a: {x: 2}\n");
        assert_eq!(parsed.problems.len(), 1);
        let problem = &parsed.problems[0];
        assert_eq!(problem.path, "stages.a");
        assert!(problem.message.contains("duplicate stage name `a`"));
        assert_eq!((problem.line, problem.column), (Some(3), Some(3)));
        let value = parsed.value.unwrap_or_default();
        assert_eq!(value["stages"]["a"]["x"], Value::from(1));
        // The duplicate's subtree did not overwrite the first one's spans.
        assert_eq!(parsed.spans.get("stages.a.x"), Some(&file_origin(2, 7)));
    }

    #[test]
    fn anchors_aliases_and_merge_keys_work() {
        let parsed =
            parse("base: &base {r: 8, alpha: 16}\nuse:\n  <<: *base\n  r: 4\nlist: [*base]\n");
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        let value = parsed.value.unwrap_or_default();
        assert_eq!(value["use"]["r"], Value::from(4));
        assert_eq!(value["use"]["alpha"], Value::from(16));
        assert_eq!(value["list"][0]["r"], Value::from(8));
    }

    #[test]
    fn syntax_errors_and_tabs_are_located() {
        let Err(problem) = parse_yaml("stages:\n  a: [1, 2\n") else {
            panic!("expected a syntax error");
        };
        assert!(problem.message.starts_with("YAML syntax error"));
        assert!(problem.line.is_some());
        let Err(problem) = parse_yaml("stages:\n\ta: 1\n") else {
            panic!("expected a tab error");
        };
        assert_eq!(problem.line, Some(2));
        assert!(problem.hint.unwrap_or_default().contains("tab"));
    }

    #[test]
    fn key_paths_parse_with_indices() {
        assert_eq!(
            parse_key_path("a.b[2].c").unwrap_or_default(),
            vec![
                Segment::Key("a".into()),
                Segment::Key("b".into()),
                Segment::Index(2),
                Segment::Key("c".into())
            ]
        );
        assert_eq!(
            parse_key_path("a.0").unwrap_or_default(),
            vec![Segment::Key("a".into()), Segment::Index(0)]
        );
        assert!(parse_key_path("a[x]").is_err());
        assert!(parse_key_path("").is_err());
    }

    fn document(text: &str) -> Document {
        let parsed = parse(text);
        Document {
            file: PathBuf::from("p.yaml"),
            source: text.to_string(),
            value: parsed.value.unwrap_or_default(),
            spans: parsed.spans,
            rejected_values: parsed.rejected_values,
        }
    }

    #[test]
    fn overrides_set_values_and_remember_their_origin() {
        let mut doc = document("seed: 1\nstages:\n  p:\n    template:\n      k: 3\n");
        apply_override(&mut doc, "stages.p.template.k=4").unwrap_or_else(|p| panic!("{p:?}"));
        apply_override(&mut doc, "stages.p.template.extra.deep=[1, 2]")
            .unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(doc.value["stages"]["p"]["template"]["k"], Value::from(4));
        assert_eq!(
            doc.value["stages"]["p"]["template"]["extra"]["deep"],
            serde_json::json!([1, 2])
        );
        assert_eq!(
            doc.spans.locate("stages.p.template.k"),
            Some(&Origin::Override("stages.p.template.k=4".into()))
        );
        assert_eq!(doc.spans.get("seed"), Some(&file_origin(1, 1)));
    }

    #[test]
    fn overrides_never_invent_stages_or_kinds() {
        let mut doc = document("stages:\n  prompts:\n    template:\n      k: 3\n");
        let problem = apply_override(&mut doc, "stages.prmpts.template.k=4")
            .err()
            .unwrap_or_else(|| Box::new(Problem::new("", "")));
        assert_eq!(problem.message, "no stage named `prmpts`");
        assert_eq!(problem.hint.as_deref(), Some("did you mean `prompts`?"));
        let problem = apply_override(&mut doc, "stages.prompts.ingest.path=x")
            .err()
            .unwrap_or_else(|| Box::new(Problem::new("", "")));
        assert!(
            problem.message.contains("is a `template` stage"),
            "{problem:?}"
        );
        assert!(apply_override(&mut doc, "stages.prompts.template.k.x=4").is_err());
        assert!(apply_override(&mut doc, "novalue").is_err());
    }

    #[test]
    fn overrides_may_add_a_matrix_and_point_expansions_at_their_matrix_stage() {
        let mut doc = document("stages:\n  train:\n    train:\n      r: 3\n");
        apply_override(&mut doc, "stages.train.matrix={r: [4, 8]}").unwrap();
        assert_eq!(
            doc.value["stages"]["train"]["matrix"],
            serde_json::json!({"r": [4, 8]})
        );
        let problem = apply_override(&mut doc, "stages.train@4.train.r=5")
            .err()
            .unwrap_or_else(|| Box::new(Problem::new("", "")));
        assert_eq!(problem.message, "no stage named `train@4`");
        assert!(
            problem
                .hint
                .as_deref()
                .is_some_and(|hint| hint.contains("stages.train.matrix.KEY")),
            "{problem:?}"
        );
    }

    #[test]
    fn serde_messages_become_readable() {
        let explained = explain_serde_error("invalid type: string \"four\", expected u32");
        assert_eq!(
            explained.message,
            "expected a non-negative integer, found \"four\""
        );
        let explained =
            explain_serde_error("unknown field `promt`, expected one of `input`, `prompt`");
        assert_eq!(explained.kind, SerdeErrorKind::UnknownField("promt".into()));
        assert_eq!(explained.hint.as_deref(), Some("did you mean `prompt`?"));
        let explained = explain_serde_error("unknown field `zzz`, expected `input`");
        assert_eq!(explained.hint.as_deref(), Some("available keys: `input`"));
        let explained = explain_serde_error("invalid type: unit value, expected struct LoraConfig");
        assert_eq!(explained.message, "expected a mapping, found null");
        assert!(
            explained
                .hint
                .as_deref()
                .is_some_and(|hint| hint.contains("`lora: {}`")),
            "{explained:?}"
        );
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "fields exist to be deserialized")]
    struct Inner {
        name: String,
        #[serde(default)]
        size: u32,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "fields exist to be deserialized")]
    struct Outer {
        count: u32,
        items: Vec<Inner>,
        #[serde(default)]
        flag: bool,
    }

    #[test]
    fn deserialize_all_reports_every_problem_with_original_paths() {
        let value = serde_json::json!({
            "count": "four",
            "items": [
                {"name": "a", "sise": 1},
                {"name": "b", "size": "big"},
                {"name": "c"},
                {"size": 2},
            ],
            "flg": true,
        });
        let mut problems = Vec::new();
        let parsed: Option<Outer> = deserialize_all(&value, "root", &mut problems);
        assert!(parsed.is_none());
        let found: Vec<(&str, &str)> = problems
            .iter()
            .map(|p| (p.path.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(
            found,
            vec![
                (
                    "root.count",
                    "expected a non-negative integer, found \"four\""
                ),
                ("root.items[0].sise", "unknown key `sise`"),
                (
                    "root.items[1].size",
                    "expected a non-negative integer, found \"big\""
                ),
                ("root.items[3]", "missing required key `name`"),
                ("root.flg", "unknown key `flg`"),
            ]
        );
    }

    fn parsed(text: &str) -> Parsed {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pipeline.yaml");
        std::fs::write(&file, text).unwrap();
        parse_pipeline(&file, &[]).unwrap()
    }

    /// [`TestProbe`](crate::config::probe::TestProbe), counting the model checks per folder.
    #[derive(Default)]
    struct CountingProbe {
        models: std::sync::Mutex<BTreeMap<PathBuf, usize>>,
    }

    impl Probe for CountingProbe {
        fn input_columns(
            &self,
            path: &Path,
            format: Option<crate::config::ingest::InputFormat>,
        ) -> Result<Vec<String>, String> {
            crate::config::probe::TestProbe.input_columns(path, format)
        }

        fn check_chat_template(
            &self,
            source: &crate::config::chat_template::ChatTemplateSource,
        ) -> Result<(), String> {
            crate::config::probe::TestProbe.check_chat_template(source)
        }

        fn check_model(&self, dir: &Path) -> crate::config::probe::ModelFacts {
            *self
                .models
                .lock()
                .unwrap()
                .entry(dir.canonicalize().unwrap())
                .or_default() += 1;
            crate::config::probe::TestProbe.check_model(dir)
        }
    }

    /// A sweep of train stages over one model, an evaluate stage that checks its base, an IA3
    /// export that checks the merge, and a second model: each folder's files are read once
    /// per check of the pipeline, not once per stage that names it (before: 4 and 1).
    #[test]
    fn each_model_folder_is_checked_once_per_pipeline() {
        let dir = tempfile::tempdir().unwrap();
        for model in ["model", "other"] {
            std::fs::create_dir(dir.path().join(model)).unwrap();
        }
        let file = dir.path().join("pipeline.yaml");
        std::fs::write(
            &file,
            r#"stages:
  data: {ingest: {path: data.csv}}
  prompts: {template: {input: data, prompt: "{{ text }}", completion: "{{ label }}"}}
  train:
    matrix: {lr: [0.1, 0.2]}
    train: {data: prompts, model: model, method: {lora: {r: 4}}, learning_rate: "${item.lr}"}
  ia3:
    train: {data: prompts, model: ./model, method: {ia3: {}}}
  small:
    train: {data: prompts, model: other, method: {lora: {r: 4}}}
  evaluate:
    evaluate:
      model: train@0_1
      data: prompts
      base_quantization: {quant_type: nf4}
  export: {export: {from: ia3, merged: merged}}
"#,
        )
        .unwrap();
        let parsed = parse_pipeline(&file, &[]).unwrap();
        let probe = CountingProbe::default();
        let problems = check_pipeline_with(&parsed, &probe, &LoadOptions::default());
        let counts = probe.models.into_inner().unwrap();
        let model = dir.path().join("model").canonicalize().unwrap();
        let other = dir.path().join("other").canonicalize().unwrap();
        assert_eq!(
            counts,
            BTreeMap::from([(model, 1), (other, 1)]),
            "{problems:#?}"
        );
    }

    /// `lora:` with nothing after it is null: the problem points at `lora` (line 4), not at the
    /// next line's key the parser marks, and says to write `{}`.
    #[test]
    fn a_bare_key_read_as_null_is_located_at_the_key_with_a_hint() {
        let parsed = parsed(
            "stages:\n  train:\n    train:\n      method:\n        lora:\n      data: prompts\n      model: m\n",
        );
        let mut problem = parsed
            .problems
            .iter()
            .find(|problem| problem.path.ends_with("method.lora"))
            .unwrap_or_else(|| panic!("{:#?}", parsed.problems))
            .clone();
        parsed.document.spans.place(&mut problem);
        assert_eq!(problem.line, Some(5), "{problem:?}");
        assert!(
            problem
                .hint
                .as_deref()
                .is_some_and(|hint| hint.contains("`lora: {}`")),
            "{problem:?}"
        );
    }

    #[test]
    fn stages_with_other_problems_are_drawable_when_their_references_are_readable() {
        let parsed = parsed(
            "stages:\n  data: {ingest: {path: x.csv, colums: [a]}}\n  prompts: {template: {input: data, prompt: p, completion: c}}\n",
        );
        assert!(parsed.invalid_stages.contains("data"));
        assert!(parsed.readable_stages.contains_key("data"));
        let (graph, problems) = drawable_graph(&parsed);
        assert!(problems.is_empty(), "{problems:?}");
        let graph = graph.expect("drawable");
        assert_eq!(graph.order().collect::<Vec<_>>(), vec!["data", "prompts"]);
    }

    #[test]
    fn unreadable_references_unknown_stages_and_cycles_are_not_drawn() {
        // The reference itself is wrong: the stage's config cannot be read.
        let wrong_type = parsed(
            "stages:\n  data: {ingest: {path: x.csv}}\n  prompts: {template: {input: [data], prompt: p, completion: c}}\n",
        );
        assert!(!wrong_type.readable_stages.contains_key("prompts"));
        assert!(drawable_graph(&wrong_type).0.is_none());
        // A readable stage (bad key elsewhere) that names an unknown stage.
        let unknown = parsed(
            "stages:\n  data: {ingest: {path: x.csv}}\n  prompts: {template: {input: dta, prompt: p, completion: c, shots: 3}}\n",
        );
        let (graph, problems) = drawable_graph(&unknown);
        assert!(graph.is_none());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.prompts.template.input");
        let cycle = parsed(
            "stages:\n  a: {template: {input: b, prompt: p, completion: c}}\n  b: {template: {input: a, prompt: p, completion: c}}\n",
        );
        assert!(drawable_graph(&cycle).0.is_none());
    }

    #[test]
    fn a_problem_at_a_reference_key_makes_the_references_unreadable() {
        let value =
            serde_json::json!({"template": {"input": "data", "prompt": "p", "completion": "c"}});
        let config: StageConfig = serde_json::from_value(value).unwrap();
        let at = "stages.prompts";
        let elsewhere = [Problem::new(
            "stages.prompts.template.shots",
            "unknown key `shots`",
        )];
        assert!(references_intact(&config, at, &elsewhere));
        let at_reference = [Problem::new("stages.prompts.template.input", "bad")];
        assert!(!references_intact(&config, at, &at_reference));
    }

    #[test]
    fn alias_expansion_depth_and_size_are_bounded() {
        let mut bomb = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for level in 1..10 {
            let previous = format!("*a{}", level - 1);
            bomb.push_str(&format!(
                "a{level}: &a{level} [{}]\n",
                [previous.as_str(); 9].join(", ")
            ));
        }
        let Err(problem) = parse_yaml(&bomb) else {
            panic!("the alias bomb was accepted")
        };
        assert!(
            problem.message.starts_with("too many alias expansions"),
            "{problem:?}"
        );
        assert_eq!(problem.line, Some(6));
        // Merge keys count too.
        let mut merges =
            String::from("b0: &b0 {x: [lol, lol, lol, lol, lol, lol, lol, lol, lol]}\n");
        for level in 1..10 {
            let previous = format!("*b{}", level - 1);
            merges.push_str(&format!(
                "b{level}: &b{level} {{<<: {previous}, y: [{}]}}\n",
                [previous.as_str(); 9].join(", ")
            ));
        }
        let Err(problem) = parse_yaml(&merges) else {
            panic!("the merge-key bomb was accepted")
        };
        assert!(
            problem.message.starts_with("too many alias expansions"),
            "{problem:?}"
        );
        let deep = format!("a: {}{}", "[".repeat(70), "]".repeat(70));
        let Err(problem) = parse_yaml(&deep) else {
            panic!("70 levels were accepted")
        };
        assert!(
            problem.message.contains("nested more than 64 deep"),
            "{problem:?}"
        );
        let wide = format!("a: [{}]", "1, ".repeat(MAX_DOCUMENT_VALUES));
        let Err(problem) = parse_yaml(&wide) else {
            panic!("{MAX_DOCUMENT_VALUES} values were accepted")
        };
        assert!(
            problem.message.starts_with("document too large"),
            "{problem:?}"
        );
        // Ordinary anchors stay fine.
        let parsed = parse("base: &base {r: 8}\none: {<<: *base}\ntwo: [*base, *base]\n");
        assert_eq!(parsed.value.unwrap()["two"][1]["r"], 8);
    }

    #[test]
    fn names_follow_one_rule() {
        assert_eq!(name_problem("quickstart_v2-a"), None);
        assert!(name_problem("a/b").unwrap().contains("letters, digits"));
        assert!(name_problem("a.b").unwrap().contains("letters, digits"));
        assert!(name_problem("").unwrap().contains("empty"));
        assert!(name_problem(&"x".repeat(65))
            .unwrap()
            .contains("at most 64"));
        assert_eq!(name_problem(&"x".repeat(64)), None);
    }
}
