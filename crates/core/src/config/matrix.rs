//! `matrix:` expansion (DVC's `matrix`): one stage written once, expanded into one ordinary stage
//! per combination of the matrix's values, before anything is deserialized.
//!
//! ```yaml
//! train:
//!   matrix:
//!     method:                       # named values: the names name the expansions
//!       lora_r4: {lora: {r: 4, alpha: 8}}
//!       lora_r8: {lora: {r: 8, alpha: 16}}
//!     lr: [0.003, 0.01]             # a list: scalars name themselves
//!   train:
//!     data: prompts
//!     method: ${item.method}        # a whole-string reference keeps the value's type
//!     learning_rate: ${item.lr}
//! ```
//! expands into `train@lora_r4-0_003`, `train@lora_r4-0_01`, `train@lora_r8-0_003` and
//! `train@lora_r8-0_01` (first key slowest). The rules:
//! - **Names**: `<stage>@<part>-<part>…`, one part per matrix key in written order. A named
//!   value's part is its name; a list value that is a string, number or boolean is its text with
//!   every character other than letters, digits, `-` and `_` replaced by `_` (`0.003` → `0_003`);
//!   any other list value (a mapping, a list, null, an empty string) is the key and its index
//!   (`method0`), as DVC does. Two expansions with one name are a problem at the matrix.
//! - **References**: `${item.KEY}` or `${item.KEY.FIELD…}` (a number indexes a list) in any string
//!   of the stage. A string that is exactly one reference becomes the value itself (a mapping,
//!   a number); a reference inside longer text is replaced by the value's text (strings, numbers
//!   and booleans only). Other `${…}` (environment variables in paths) are left alone. Every
//!   matrix key must be referenced.
//! - **All expansions as a list item**: `STAGE@*` written as an item of a list in another stage
//!   stands for every expansion of `STAGE`, in expansion order (for stages that read several
//!   upstream stages). Anywhere else it is a problem; so is naming the matrix stage itself.
//! - **Limits**: at most [`MAX_EXPANSIONS`] expansions per stage, names at most
//!   [`MAX_EXPANDED_NAME_LENGTH`] characters.
//!
//! Each expansion is a normal stage afterwards: its own fingerprint (its name and substituted
//! parameters), cache entry, `status` line and output folder. Problems in the matrix block or in
//! a reference are reported once, at the matrix (or the reference) as written; problems of an
//! expanded stage's settings carry the expansion's key path and point at the line the setting
//! (or, for a substituted value, the matrix value) was written on.
//!
//! This module edits the JSON value tree and the span index; it reads no file and runs nothing.

use indexmap::IndexMap;
use serde_json::{Map, Value};

use super::load::{join_index, join_key, name_problem, SpanIndex};
use super::problem::{hint_for_unknown, quoted_list, Problem};

/// The key of a stage that holds its matrix.
pub const MATRIX_KEY: &str = "matrix";
/// Most expansions one matrix may produce (each is a stage that runs: a typo in a list should
/// not start a thousand trainings).
pub const MAX_EXPANSIONS: usize = 64;
/// Longest expanded stage name (`stage@parts`): names become folder names.
pub const MAX_EXPANDED_NAME_LENGTH: usize = 128;
/// What references start with: `${item.`.
const REFERENCE_START: &str = "${item";

/// The JSON Schema of a `matrix:` block (added to every stage kind by `crate::schema`).
pub fn matrix_schema() -> Value {
    serde_json::json!({
        "description": format!(
            "Expand this stage into one stage per combination of the values (DVC's `matrix`), \
             named `<stage>@<part>-<part>…` (a named value's name; a string, number or boolean's \
             text with characters other than letters, digits, `-` and `_` as `_`; else the key \
             and the index, `method0`). The stage's strings use `${{item.KEY}}` (or \
             `${{item.KEY.FIELD}}`); a string that is exactly one reference becomes the value \
             itself. In a list of another stage, `<stage>@*` stands for every expansion. At most \
             {MAX_EXPANSIONS} expansions."
        ),
        "type": "object",
        "minProperties": 1,
        "propertyNames": { "pattern": "^[A-Za-z_][A-Za-z0-9_]*$" },
        "additionalProperties": {
            "description": "The values of one key: a list, or a mapping of named values (the names name the expansions).",
            "oneOf": [
                { "type": "array", "minItems": 1 },
                {
                    "type": "object",
                    "minProperties": 1,
                    "propertyNames": { "pattern": "^[A-Za-z0-9_-]{1,64}$" }
                }
            ]
        }
    })
}

/// The stages after expansion.
#[derive(Debug, Clone, Default)]
pub struct Expansion {
    /// Every stage in file order, matrix stages replaced by their expansions.
    pub stages: Map<String, Value>,
    /// Matrix stage name → its expansions' names (also when the stage has problems, as long as
    /// the names could be made).
    pub expansions: IndexMap<String, Vec<String>>,
    /// Names of stages that stand in the graph but have problems already reported (the matrix
    /// stage itself when its names could not be made, or its expansions when a reference is bad).
    pub invalid: Vec<String>,
}

/// One matrix key's values: (name part, value, key path of the value in the file).
struct Axis {
    key: String,
    values: Vec<(String, Value, String)>,
}

/// Expand every stage with a `matrix:` key of `stages` (found at `stages`), then replace
/// `STAGE@*` list items. Problems go to `problems`; spans of expanded stages are added to `spans`.
pub fn expand(
    stages: &Map<String, Value>,
    spans: &mut SpanIndex,
    problems: &mut Vec<Problem>,
) -> Expansion {
    let mut out = Expansion::default();
    for (name, value) in stages {
        let at = join_key("stages", name);
        let Value::Object(map) = value else {
            out.stages.insert(name.clone(), value.clone());
            continue;
        };
        let Some(matrix) = map.get(MATRIX_KEY) else {
            stray_references(value, &at, problems);
            out.stages.insert(name.clone(), value.clone());
            continue;
        };
        if name_problem(name).is_some() {
            // Its name is already a problem; expansions of it would be too.
            out.invalid.push(name.clone());
            out.stages.insert(name.clone(), Value::Null);
            continue;
        }
        let mut body = map.clone();
        body.remove(MATRIX_KEY);
        let body = Value::Object(body);
        let matrix_at = join_key(&at, MATRIX_KEY);
        let before = problems.len();
        let Some(axes) = read_axes(matrix, &matrix_at, problems) else {
            out.invalid.push(name.clone());
            out.stages.insert(name.clone(), Value::Null);
            continue;
        };
        let names = match expansion_names(name, &axes, &matrix_at) {
            Ok(names) => names,
            Err(problem) => {
                problems.push(*problem);
                out.invalid.push(name.clone());
                out.stages.insert(name.clone(), Value::Null);
                continue;
            }
        };
        check_references(&body, &at, &axes, problems);
        let bad = problems.len() != before;
        for (index, expanded) in names.iter().enumerate() {
            let item = item_of(&axes, index);
            let target = join_key("stages", expanded);
            spans.copy_subtree(&at, &target);
            spans.forget_subtree(&join_key(&target, MATRIX_KEY));
            let value = if bad {
                out.invalid.push(expanded.clone());
                Value::Null
            } else {
                let mut copies = Vec::new();
                let value = substitute(&body, &target, &item, &mut copies);
                for (from, to) in copies {
                    spans.forget_subtree(&to);
                    spans.copy_subtree(&from, &to);
                }
                value
            };
            out.stages.insert(expanded.clone(), value);
        }
        out.expansions.insert(name.clone(), names);
    }
    let names: Vec<String> = out.stages.keys().cloned().collect();
    for name in names {
        let at = join_key("stages", &name);
        if let Some(value) = out.stages.get_mut(&name) {
            expand_all_references(value, &at, &out.expansions, spans, problems);
        }
    }
    out
}

/// The matrix's keys and values, or None (with problems) when it is not a usable matrix.
fn read_axes(matrix: &Value, at: &str, problems: &mut Vec<Problem>) -> Option<Vec<Axis>> {
    let example = "e.g. `matrix: {lr: [0.001, 0.01]}` with `learning_rate: ${item.lr}`";
    let Value::Object(keys) = matrix else {
        problems.push(
            Problem::new(
                at,
                format!(
                    "`matrix` is a mapping of keys to lists of values, found {}",
                    super::load::describe_value(matrix)
                ),
            )
            .with_hint(example)
            .about_value(),
        );
        return None;
    };
    if keys.is_empty() {
        problems.push(Problem::new(at, "the matrix has no keys").with_hint(example));
        return None;
    }
    let mut axes = Vec::new();
    let mut usable = true;
    for (key, values) in keys {
        let key_at = join_key(at, key);
        if !is_identifier(key) {
            problems.push(
                Problem::new(&key_at, format!("matrix key `{key}` is not a name"))
                    .with_hint("matrix keys are letters, digits and `_`, not starting with a digit (they are used as `${item.KEY}`)"),
            );
            usable = false;
            continue;
        }
        let values = match values {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(index, value)| {
                    (
                        list_part(key, index, value),
                        value.clone(),
                        join_index(&key_at, index),
                    )
                })
                .collect::<Vec<_>>(),
            Value::Object(named) => {
                let mut values = Vec::new();
                for (value_name, value) in named {
                    if let Some(reason) = name_problem(value_name) {
                        problems.push(
                            Problem::new(
                                join_key(&key_at, value_name),
                                format!("value name `{value_name}` {reason}"),
                            )
                            .with_hint("a value's name is part of its expansions' stage names"),
                        );
                        usable = false;
                    }
                    values.push((
                        value_name.clone(),
                        value.clone(),
                        join_key(&key_at, value_name),
                    ));
                }
                values
            }
            other => {
                problems.push(
                    Problem::new(&key_at, format!("matrix key `{key}` needs a list of values (or a mapping of named values), found {}", super::load::describe_value(other)))
                        .with_hint(format!("e.g. `{key}: [a, b]`"))
                        .about_value(),
                );
                usable = false;
                continue;
            }
        };
        if values.is_empty() {
            problems.push(
                Problem::new(
                    &key_at,
                    format!("matrix key `{key}` has no values: the stage would expand to nothing"),
                )
                .with_hint("give at least one value, or remove the key")
                .about_value(),
            );
            usable = false;
            continue;
        }
        axes.push(Axis {
            key: key.clone(),
            values,
        });
    }
    if !usable {
        return None;
    }
    let count = axes.iter().fold(1usize, |count, axis| {
        count.saturating_mul(axis.values.len())
    });
    if count > MAX_EXPANSIONS {
        let sizes: Vec<String> = axes
            .iter()
            .map(|axis| axis.values.len().to_string())
            .collect();
        problems.push(
            Problem::new(at, format!("the matrix expands to {count} stages ({}); at most {MAX_EXPANSIONS} are allowed", sizes.join(" × ")))
                .with_hint("split it into several stages, or drop values"),
        );
        return None;
    }
    Some(axes)
}

fn is_identifier(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The name part of the `index`-th value of a list under `key` (see the module doc).
fn list_part(key: &str, index: usize, value: &Value) -> String {
    let text = match value {
        Value::String(text) if !text.is_empty() => text.clone(),
        Value::Number(number) => number.to_string(),
        Value::Bool(flag) => flag.to_string(),
        _ => return format!("{key}{index}"),
    };
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Names of the expansions, in order (first key slowest), or the problem that prevents them.
fn expansion_names(stage: &str, axes: &[Axis], at: &str) -> Result<Vec<String>, Box<Problem>> {
    let count: usize = axes.iter().map(|axis| axis.values.len()).product();
    let mut names: Vec<String> = Vec::with_capacity(count);
    for index in 0..count {
        let parts: Vec<&str> = choice(axes, index)
            .iter()
            .zip(axes)
            .map(|(&chosen, axis)| axis.values[chosen].0.as_str())
            .collect();
        let name = format!("{stage}@{}", parts.join("-"));
        if name.len() > MAX_EXPANDED_NAME_LENGTH {
            return Err(Box::new(
                Problem::new(at, format!("expansion name `{name}` is {} characters long; at most {MAX_EXPANDED_NAME_LENGTH} are allowed", name.len()))
                    .with_hint("name the values: `KEY: {short_name: value, …}`"),
            ));
        }
        if names.contains(&name) {
            return Err(Box::new(
                Problem::new(at, format!("two expansions of the matrix would both be named `{name}`"))
                    .with_hint("values that only differ in characters other than letters, digits, `-` and `_` share a name; name them: `KEY: {name_a: value, name_b: value}`"),
            ));
        }
        names.push(name);
    }
    Ok(names)
}

/// The value index chosen on each axis for the `index`-th expansion (first axis slowest).
fn choice(axes: &[Axis], mut index: usize) -> Vec<usize> {
    let mut chosen = vec![0; axes.len()];
    for (position, axis) in axes.iter().enumerate().rev() {
        chosen[position] = index % axis.values.len();
        index /= axis.values.len();
    }
    chosen
}

/// Matrix key → (chosen value, its key path) for the `index`-th expansion.
type Item<'a> = IndexMap<&'a str, (&'a Value, &'a str)>;

fn item_of(axes: &[Axis], index: usize) -> Item<'_> {
    choice(axes, index)
        .into_iter()
        .zip(axes)
        .map(|(chosen, axis)| {
            let (_, value, path) = &axis.values[chosen];
            (axis.key.as_str(), (value, path.as_str()))
        })
        .collect()
}

/// A `${item…}` reference found in a string.
struct Reference {
    /// Byte range of `${…}` in the string.
    start: usize,
    end: usize,
    /// `KEY` then fields (`item.method.lora.r` → ["method", "lora", "r"]); empty for `${item}`.
    segments: Vec<String>,
}

/// Every `${item…}` reference in `text`, or the reason the text cannot be read.
fn references(text: &str) -> Result<Vec<Reference>, String> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(offset) = text[from..].find(REFERENCE_START) {
        let start = from + offset;
        let after = &text[start + REFERENCE_START.len()..];
        // `${items}` or `${item_x}` is not ours (an environment variable, say).
        if !(after.starts_with('.') || after.starts_with('}')) {
            from = start + REFERENCE_START.len();
            continue;
        }
        let Some(close) = after.find('}') else {
            return Err(format!("unterminated `{REFERENCE_START}` reference"));
        };
        let inner = &after[..close];
        let segments: Vec<String> = inner.split('.').skip(1).map(str::to_string).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!("`${{item{inner}}}` has an empty field name"));
        }
        let end = start + REFERENCE_START.len() + close + 1;
        found.push(Reference {
            start,
            end,
            segments,
        });
        from = end;
    }
    Ok(found)
}

/// Follow `fields` into `value`; the resolved value and its key path under `path`.
fn follow<'a>(
    value: &'a Value,
    path: &str,
    fields: &[String],
) -> Result<(&'a Value, String), String> {
    let mut current = value;
    let mut current_path = path.to_string();
    for field in fields {
        current = match current {
            Value::Object(map) => match map.get(field) {
                Some(next) => {
                    current_path = join_key(&current_path, field);
                    next
                }
                None => return Err(format!("has no field `{field}`")),
            },
            Value::Array(items) => match field
                .parse::<usize>()
                .ok()
                .and_then(|i| items.get(i).map(|v| (i, v)))
            {
                Some((index, next)) => {
                    current_path = join_index(&current_path, index);
                    next
                }
                None => return Err(format!("has no item `{field}`")),
            },
            _ => {
                return Err(format!(
                    "is {}, which has no field `{field}`",
                    super::load::describe_value(current)
                ))
            }
        };
    }
    Ok((current, current_path))
}

/// The text a value takes inside a longer string, if it has one.
fn inline_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// Check every reference of a matrix stage against every value of its key (each problem once,
/// at the string that holds it), and that every key is used.
fn check_references(body: &Value, at: &str, axes: &[Axis], problems: &mut Vec<Problem>) {
    let mut used: Vec<&str> = Vec::new();
    let keys: Vec<&str> = axes.iter().map(|axis| axis.key.as_str()).collect();
    walk_strings(body, at, &mut |text, path| {
        let found = match references(text) {
            Ok(found) => found,
            Err(message) => {
                problems.push(Problem::new(path, message).about_value());
                return;
            }
        };
        let whole = found.len() == 1 && found[0].start == 0 && found[0].end == text.len();
        for reference in &found {
            let Some((key, fields)) = reference.segments.split_first() else {
                problems.push(
                    Problem::new(path, "`${item}` needs a matrix key: `${item.KEY}`")
                        .with_hint(format!("the matrix keys are {}", quoted_list(&keys)))
                        .about_value(),
                );
                continue;
            };
            let Some(axis) = axes.iter().find(|axis| axis.key == *key) else {
                problems.push(
                    Problem::new(
                        path,
                        format!("`${{item.{key}}}` names no key of the stage's matrix"),
                    )
                    .with_optional_hint(hint_for_unknown(key, keys.iter().copied(), "matrix keys"))
                    .about_value(),
                );
                continue;
            };
            if !used.contains(&axis.key.as_str()) {
                used.push(axis.key.as_str());
            }
            for (value_name, value, value_path) in &axis.values {
                let reference_text = &text[reference.start..reference.end];
                match follow(value, value_path, fields) {
                    Err(why) => {
                        problems.push(
                            Problem::new(path, format!("`{reference_text}`: value `{value_name}` of matrix key `{key}` {why}"))
                                .about_value(),
                        );
                        break;
                    }
                    Ok((resolved, _)) if !whole && inline_text(resolved).is_none() => {
                        problems.push(
                            Problem::new(path, format!("`{reference_text}` is {} for value `{value_name}`, which cannot be part of a longer string", super::load::describe_value(resolved)))
                                .with_hint("write the reference alone as the whole value, or reference a field of it")
                                .about_value(),
                        );
                        break;
                    }
                    Ok(_) => {}
                }
            }
        }
    });
    for axis in axes {
        if !used.contains(&axis.key.as_str()) {
            problems.push(
                Problem::new(join_key(&join_key(at, MATRIX_KEY), &axis.key), format!("matrix key `{}` is never used as `${{item.{}}}`", axis.key, axis.key))
                    .with_hint("every expansion would run the same settings; use the key in the stage, or remove it"),
            );
        }
    }
}

/// References in a stage without a matrix.
fn stray_references(value: &Value, at: &str, problems: &mut Vec<Problem>) {
    walk_strings(value, at, &mut |text, path| {
        if let Ok(found) = references(text) {
            if let Some(first) = found.first() {
                problems.push(
                    Problem::new(
                        path,
                        format!(
                            "`{}` refers to a matrix, but the stage has no `matrix:`",
                            &text[first.start..first.end]
                        ),
                    )
                    .with_hint("add `matrix: {KEY: [values…]}` next to the stage's kind")
                    .about_value(),
                );
            }
        }
    });
}

fn walk_strings(value: &Value, path: &str, visit: &mut dyn FnMut(&str, &str)) {
    match value {
        Value::String(text) => visit(text, path),
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                walk_strings(item, &join_index(path, index), visit);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                walk_strings(item, &join_key(path, key), visit);
            }
        }
        _ => {}
    }
}

/// The stage body with the item's values substituted (references already checked). `copies`
/// receives (matrix value path, expanded path) for values substituted whole, so their spans
/// point at the matrix.
fn substitute(
    value: &Value,
    path: &str,
    item: &Item<'_>,
    copies: &mut Vec<(String, String)>,
) -> Value {
    match value {
        Value::String(text) => {
            let Ok(found) = references(text) else {
                return value.clone();
            };
            if found.is_empty() {
                return value.clone();
            }
            let resolve = |reference: &Reference| {
                let (key, fields) = reference.segments.split_first()?;
                let (value, value_path) = item.get(key.as_str())?;
                follow(value, value_path, fields).ok()
            };
            if found.len() == 1 && found[0].start == 0 && found[0].end == text.len() {
                if let Some((resolved, from)) = resolve(&found[0]) {
                    copies.push((from, path.to_string()));
                    return resolved.clone();
                }
                return value.clone();
            }
            let mut out = String::with_capacity(text.len());
            let mut last = 0;
            for reference in &found {
                out.push_str(&text[last..reference.start]);
                match resolve(reference).and_then(|(resolved, _)| inline_text(resolved)) {
                    Some(inline) => out.push_str(&inline),
                    None => out.push_str(&text[reference.start..reference.end]),
                }
                last = reference.end;
            }
            out.push_str(&text[last..]);
            Value::String(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(index, item_value)| {
                    substitute(item_value, &join_index(path, index), item, copies)
                })
                .collect(),
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, item_value)| {
                    (
                        key.clone(),
                        substitute(item_value, &join_key(path, key), item, copies),
                    )
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `STAGE@*` as a list item → every expansion of STAGE; anywhere else a problem.
fn expand_all_references(
    value: &mut Value,
    path: &str,
    expansions: &IndexMap<String, Vec<String>>,
    spans: &mut SpanIndex,
    problems: &mut Vec<Problem>,
) {
    match value {
        Value::String(text) => {
            if let Some(base) = all_of(text) {
                let problem = if expansions.contains_key(base) {
                    Problem::new(path, format!("`{text}` stands for every expansion of `{base}`, so it can only be an item of a list"))
                        .with_hint(format!("name one expansion: {}", quoted_list(&expansions[base].iter().map(String::as_str).collect::<Vec<_>>())))
                } else {
                    Problem::new(path, format!("`{text}`: stage `{base}` has no `matrix:`"))
                        .with_hint(format!("name the stage itself: `{base}`"))
                };
                problems.push(problem.about_value());
            }
        }
        Value::Array(items) => {
            let mut replaced = Vec::with_capacity(items.len());
            let mut moves: Vec<(String, String)> = Vec::new();
            let mut changed = false;
            for (index, mut item) in std::mem::take(items).into_iter().enumerate() {
                let from = join_index(path, index);
                let names = match &item {
                    Value::String(text) => all_of(text).and_then(|base| expansions.get(base)),
                    _ => None,
                };
                if let Some(names) = names {
                    changed = true;
                    for name in names {
                        moves.push((from.clone(), join_index(path, replaced.len())));
                        replaced.push(Value::String(name.clone()));
                    }
                    continue;
                }
                expand_all_references(&mut item, &from, expansions, spans, problems);
                moves.push((from, join_index(path, replaced.len())));
                replaced.push(item);
            }
            if changed {
                spans.move_subtrees(&moves);
            }
            *items = replaced;
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let at = join_key(path, key);
                expand_all_references(item, &at, expansions, spans, problems);
            }
        }
        _ => {}
    }
}

/// A problem's key path, message and hint with its stage's expansion part left out
/// (`stages.t@a-b.train.x` → `stages.t.train.x`, "stage `t@a-b` reads …" → "stage `t` reads …"),
/// to tell problems that several expansions share.
pub fn without_expansion(problem: &Problem) -> (String, String, Option<String>) {
    let unchanged = || {
        (
            problem.path.clone(),
            problem.message.clone(),
            problem.hint.clone(),
        )
    };
    let Some(rest) = problem.path.strip_prefix("stages.") else {
        return unchanged();
    };
    let end = rest.find(['.', '[']).unwrap_or(rest.len());
    let stage = &rest[..end];
    let Some((base, _)) = stage.split_once('@') else {
        return unchanged();
    };
    let quoted = format!("`{stage}`");
    let base_quoted = format!("`{base}`");
    (
        format!("stages.{base}{}", &rest[end..]),
        problem.message.replace(&quoted, &base_quoted),
        problem
            .hint
            .as_ref()
            .map(|hint| hint.replace(&quoted, &base_quoted)),
    )
}

/// `STAGE@*` → `STAGE`.
pub fn all_of(text: &str) -> Option<&str> {
    let base = text.strip_suffix("@*")?;
    name_problem(base).is_none().then_some(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_yaml;

    fn expand_text(yaml: &str) -> (Expansion, Vec<Problem>, SpanIndex) {
        let parsed = parse_yaml(yaml).unwrap();
        let mut spans = parsed.spans;
        let mut problems = Vec::new();
        let value = parsed.value.unwrap();
        let stages = value["stages"].as_object().unwrap().clone();
        let expansion = expand(&stages, &mut spans, &mut problems);
        for problem in &mut problems {
            spans.place(problem);
        }
        (expansion, problems, spans)
    }

    const TRAIN: &str = "stages:
  train:
    matrix:
      method:
        small: {lora: {r: 4}}
        big: {lora: {r: 8}}
      lr: [0.001, 1e-2]
    train:
      data: prompts
      method: ${item.method}
      learning_rate: ${item.lr}
      note: \"rank ${item.method.lora.r} at ${item.lr}\"
  eval:
    evaluate:
      models: [base, train@*, other]
";

    #[test]
    fn expands_in_order_with_dvc_names_and_typed_values() {
        let (expansion, problems, _) = expand_text(TRAIN);
        assert!(problems.is_empty(), "{problems:?}");
        let names: Vec<&String> = expansion.stages.keys().collect();
        assert_eq!(
            names,
            [
                "train@small-0_001",
                "train@small-0_01",
                "train@big-0_001",
                "train@big-0_01",
                "eval"
            ]
        );
        let big = &expansion.stages["train@big-0_01"]["train"];
        assert_eq!(big["method"], serde_json::json!({"lora": {"r": 8}}));
        assert_eq!(big["learning_rate"], serde_json::json!(0.01));
        assert_eq!(big["note"], "rank 8 at 0.01");
        assert_eq!(
            expansion.stages["eval"]["evaluate"]["models"],
            serde_json::json!([
                "base",
                "train@small-0_001",
                "train@small-0_01",
                "train@big-0_001",
                "train@big-0_01",
                "other"
            ])
        );
    }

    #[test]
    fn expanded_paths_point_at_the_stage_or_the_matrix_value() {
        let (_, _, spans) = expand_text(TRAIN);
        // A setting written in the stage: its own line.
        let mut problem = Problem::new("stages.train@big-0_01.train.data", "x");
        spans.place(&mut problem);
        assert_eq!((problem.line, problem.column), (Some(9), Some(7)));
        // A substituted value: the matrix value it came from.
        let mut problem =
            Problem::new("stages.train@big-0_01.train.method.lora.r", "x").about_value();
        spans.place(&mut problem);
        assert_eq!(problem.line, Some(6));
        let mut problem =
            Problem::new("stages.train@small-0_01.train.learning_rate", "x").about_value();
        spans.place(&mut problem);
        assert_eq!((problem.line, problem.column), (Some(7), Some(19)));
        // Items after an `@*` moved with their list.
        let mut problem = Problem::new("stages.eval.evaluate.models[5]", "x").about_value();
        spans.place(&mut problem);
        assert_eq!((problem.line, problem.column), (Some(15), Some(31)));
    }

    fn messages(yaml: &str) -> Vec<(String, Option<usize>, String)> {
        let (_, problems, _) = expand_text(yaml);
        problems
            .into_iter()
            .map(|p| (p.path, p.line, p.message))
            .collect()
    }

    #[test]
    fn matrix_problems_point_at_the_matrix() {
        let bad_key = messages(
            "stages:\n  t:\n    matrix: {lr: [1], 2x: [3]}\n    train: {a: '${item.lr}'}\n",
        );
        assert_eq!(bad_key[0].0, "stages.t.matrix.2x");
        assert!(bad_key[0].2.contains("is not a name"));
        let empty =
            messages("stages:\n  t:\n    matrix:\n      lr: []\n    train: {a: '${item.lr}'}\n");
        assert_eq!(
            (empty[0].0.as_str(), empty[0].1),
            ("stages.t.matrix.lr", Some(4))
        );
        assert!(empty[0].2.contains("has no values"));
        let unknown =
            messages("stages:\n  t:\n    matrix: {lr: [1]}\n    train: {a: '${item.rl}'}\n");
        assert_eq!(unknown[0].0, "stages.t.train.a");
        assert!(unknown[0].2.contains("names no key"), "{unknown:?}");
        let unused = messages(
            "stages:\n  t:\n    matrix: {lr: [1], r: [2]}\n    train: {a: '${item.lr}'}\n",
        );
        assert_eq!(unused[0].0, "stages.t.matrix.r");
        let collision = messages(
            "stages:\n  t:\n    matrix: {lr: [0.1, '0_1']}\n    train: {a: '${item.lr}'}\n",
        );
        assert_eq!(
            (collision[0].0.as_str(), collision[0].1),
            ("stages.t.matrix", Some(3))
        );
        assert!(collision[0].2.contains("`t@0_1`"));
        let many = messages("stages:\n  t:\n    matrix: {a: [1,2,3,4,5,6,7,8,9], b: [1,2,3,4,5,6,7,8]}\n    train: {x: '${item.a}${item.b}'}\n");
        assert!(many[0].2.contains("72 stages (9 × 8)"), "{many:?}");
        let inline_mapping =
            messages("stages:\n  t:\n    matrix: {m: [{a: 1}]}\n    train: {x: 'm=${item.m}'}\n");
        assert!(inline_mapping[0]
            .2
            .contains("cannot be part of a longer string"));
        let stray = messages("stages:\n  t:\n    train: {x: '${item.m}'}\n");
        assert!(stray[0].2.contains("has no `matrix:`"));
        let scalar_all = messages("stages:\n  t:\n    matrix: {m: [1]}\n    train: {x: '${item.m}'}\n  e:\n    export: {from: 't@*'}\n");
        assert!(
            scalar_all[0].2.contains("only be an item of a list"),
            "{scalar_all:?}"
        );
    }

    #[test]
    fn expansion_parts_are_left_out_of_key_paths_and_messages() {
        let shared = |path: &str, message: &str| {
            let (path, message, _) = without_expansion(&Problem::new(path, message));
            (path, message)
        };
        assert_eq!(
            shared("stages.t@a-b.train.x", "stage `t@a-b` reads `p`"),
            (
                "stages.t.train.x".to_string(),
                "stage `t` reads `p`".to_string()
            )
        );
        assert_eq!(shared("stages.t@a[0]", "m").0, "stages.t[0]");
        assert_eq!(shared("stages.t.train.x", "m").0, "stages.t.train.x");
        assert_eq!(shared("seed", "m").0, "seed");
    }

    #[test]
    fn environment_variables_are_left_alone() {
        let (expansion, problems, _) = expand_text(
            "stages:\n  t:\n    matrix: {m: [a]}\n    train: {x: '${items}/${HOME}/${item.m}'}\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(expansion.stages["t@a"]["train"]["x"], "${items}/${HOME}/a");
    }

    #[test]
    fn mapping_values_in_a_list_are_named_by_key_and_index() {
        let (expansion, problems, _) = expand_text("stages:\n  t:\n    matrix: {m: [{a: 1}, {a: 2}], s: [x y]}\n    train: {x: '${item.m}', y: '${item.s}'}\n");
        assert!(problems.is_empty(), "{problems:?}");
        let names: Vec<&String> = expansion.stages.keys().collect();
        assert_eq!(names, ["t@m0-x_y", "t@m1-x_y"]);
    }
}
