//! The minijinja environment every row template (prompt, completion, chat turns) is checked and
//! rendered with, the limits of one rendering, the templates a template includes, and the
//! variables a template reads. Validation and the template stage both use it, so a template that
//! validates renders under the same rules.
//!
//! Rules (documented for users in the template stage): undefined variables are errors (strict),
//! printing a null cell is an error (`{% if x %}` still works on nulls), and so is printing or
//! `join`ing a list or map that holds a null (minijinja would write `none`, jinja2 `None`: a word
//! no row holds), no autoescaping, one
//! trailing newline of a template is dropped (as in Jinja2), Python string methods (`.strip()`,
//! `.upper()`, …) work through minijinja-contrib's pycompat, and `{% include %}` /
//! `{% import %}` / `{% from %}` / `{% extends %}` name their template with a string literal
//! (or a list of them), resolved relative to the pipeline directory and confined to it unless
//! `--allow-outside-project` ([`super::paths`]): the loader serves only the names written
//! literally ([`Includes::tracked`]), which are exactly the files the stage's fingerprint hashes,
//! so a computed name can never load an untracked file. Each rendering has a fuel budget
//! (minijinja instructions) and a cap on its output ([`RenderLimits`]). Rows themselves (Arrow
//! record batches) are the main crate's `data::render`. Never prints.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use minijinja::machinery::Instruction;
use minijinja::value::{StringInput, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, UndefinedBehavior};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::paths::{confine_template, read_template_file};

/// Names minijinja provides itself (not columns): excluded from "unknown variable" checks.
pub const BUILTIN_NAMES: &[&str] = &[
    "range",
    "dict",
    "namespace",
    "debug",
    "loop",
    "self",
    "caller",
    "varargs",
    "kwargs",
    "true",
    "false",
    "none",
    "True",
    "False",
    "None",
];

/// Default fuel of one rendering: minijinja instructions (roughly one per expression step, loop
/// iteration or output). A few-shot prompt uses thousands; ten million is ~0.1–0.5 s of work.
pub const DEFAULT_FUEL: u64 = 10_000_000;

/// Default cap on what one rendering (one template, one row) may output: 1 MiB.
pub const DEFAULT_MAX_ROW_BYTES: u64 = 1 << 20;

/// Bounds on rendering one template for one row, so no template runs without end or fills the
/// memory. The defaults suit any real prompt; raise them for unusually large ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RenderLimits {
    /// Instructions one rendering may execute (loops, expressions, output): past it the row
    /// fails with an error naming the stage, row and limit.
    #[serde(default = "default_fuel")]
    #[schemars(range(min = 1))]
    pub fuel: u64,
    /// Bytes one rendering (one template, one row) may output: past it the row fails with an
    /// error naming the stage, row and limit.
    #[serde(default = "default_max_row_bytes")]
    #[schemars(range(min = 1))]
    pub max_row_bytes: u64,
}

fn default_fuel() -> u64 {
    DEFAULT_FUEL
}

fn default_max_row_bytes() -> u64 {
    DEFAULT_MAX_ROW_BYTES
}

impl Default for RenderLimits {
    fn default() -> Self {
        RenderLimits {
            fuel: DEFAULT_FUEL,
            max_row_bytes: DEFAULT_MAX_ROW_BYTES,
        }
    }
}

/// Where `{% include %}` and friends may load templates from.
#[derive(Debug, Clone)]
pub struct Includes {
    /// The pipeline's directory: names resolve against it.
    pub project_dir: PathBuf,
    /// `--allow-outside-project`: names may resolve outside the project directory.
    pub allow_outside_project: bool,
    /// The names the stage's templates write literally (transitively): the only ones served.
    pub tracked: BTreeSet<String>,
}

impl Includes {
    /// No include may load anything (validation compiles templates without rendering them).
    pub fn none(project_dir: &Path) -> Includes {
        Includes {
            project_dir: project_dir.to_path_buf(),
            allow_outside_project: false,
            tracked: BTreeSet::new(),
        }
    }
}

/// The environment for row templates (prompt, completion, chat turns), rendering at most
/// `fuel` instructions per rendering (`None`: unlimited, for compiling only).
pub fn row_environment(includes: &Includes, fuel: Option<u64>) -> Environment<'static> {
    let mut env = Environment::new();
    // minijinja keeps template sources and error spans only in debug mode, which defaults to
    // `cfg!(debug_assertions)`: without this, a release build's errors lose the expression that
    // failed (`undefined variable` instead of ``undefined variable `txet` ``).
    env.set_debug(true);
    env.set_fuel(fuel);
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    let includes = includes.clone();
    env.set_loader(move |name| load_included(&includes, name));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_formatter(|out, state, value| {
        if value.is_none() {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "the value is null (test it with `{% if … %}` or use `| default('…', true)`)",
            ));
        }
        refuse_nested_nulls(value)?;
        minijinja::escape_formatter(out, state, value)
    });
    env.add_filter("join", join_without_nulls);
    env
}

/// Error when `value` (a list or map) holds a null, or a value that cannot be written, at any
/// depth: printed, minijinja would write it as `none` (or an error's text).
fn refuse_nested_nulls(value: &Value) -> Result<(), Error> {
    match nested_null(value, 0) {
        Some(path) => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "the value holds a null at {path} (drop nulls with `| reject('none')`, replace \
                 them with `| map('default', '…', true)`, or test with `{{% if … %}}`)"
            ),
        )),
        None => Ok(()),
    }
}

/// Lists and maps nested deeper than this are not searched for nulls.
const NULL_SEARCH_DEPTH: usize = 32;

/// Where the first null (or invalid value) inside a list or map is (`[1]`, `["k"][0]`).
/// Lazy iterables are not walked (iterating may consume them).
fn nested_null(value: &Value, depth: usize) -> Option<String> {
    if depth >= NULL_SEARCH_DEPTH {
        return None;
    }
    let check = |item: &Value, at: String| -> Option<String> {
        if item.is_none() || item.kind() == ValueKind::Invalid {
            return Some(at);
        }
        nested_null(item, depth + 1).map(|rest| format!("{at}{rest}"))
    };
    match value.kind() {
        ValueKind::Seq => value
            .try_iter()
            .ok()?
            .enumerate()
            .find_map(|(index, item)| check(&item, format!("[{index}]"))),
        ValueKind::Map => value.try_iter().ok()?.find_map(|key| {
            let item = value.get_item(&key).ok()?;
            check(&item, format!("[{key:?}]"))
        }),
        _ => None,
    }
}

/// minijinja's `join`, refusing a null among the items (it would write `none`).
fn join_without_nulls(
    state: &State,
    value: &Value,
    joiner: Option<StringInput<'_>>,
) -> Result<Value, Error> {
    if matches!(value.kind(), ValueKind::Seq | ValueKind::Iterable) {
        // Collected once: a lazy iterable (`reject`'s output) may be iterable only once.
        let items = Value::from(value.try_iter()?.collect::<Vec<_>>());
        refuse_nested_nulls(&items)?;
        return minijinja::filters::join(state, &items, joiner);
    }
    minijinja::filters::join(state, value, joiner)
}

/// minijinja's built-in filters (the `builtins` feature): did-you-mean candidates for a filter
/// the environment lacks. A test checks that each one is provided.
pub const FILTER_NAMES: &[&str] = &[
    "abs",
    "attr",
    "batch",
    "bool",
    "capitalize",
    "chain",
    "count",
    "d",
    "default",
    "dictsort",
    "e",
    "escape",
    "first",
    "float",
    "format",
    "groupby",
    "indent",
    "int",
    "items",
    "join",
    "last",
    "length",
    "lines",
    "list",
    "lower",
    "map",
    "max",
    "min",
    "pprint",
    "reject",
    "rejectattr",
    "replace",
    "reverse",
    "round",
    "safe",
    "select",
    "selectattr",
    "slice",
    "sort",
    "split",
    "string",
    "sum",
    "title",
    "tojson",
    "trim",
    "unique",
    "upper",
    "zip",
];

/// minijinja's built-in tests, as [`FILTER_NAMES`].
pub const TEST_NAMES: &[&str] = &[
    "boolean",
    "defined",
    "divisibleby",
    "endingwith",
    "eq",
    "equalto",
    "escaped",
    "even",
    "false",
    "filter",
    "float",
    "ge",
    "greaterthan",
    "gt",
    "in",
    "int",
    "integer",
    "iterable",
    "le",
    "lessthan",
    "lower",
    "lt",
    "mapping",
    "ne",
    "none",
    "number",
    "odd",
    "safe",
    "sameas",
    "sequence",
    "startingwith",
    "string",
    "test",
    "true",
    "undefined",
    "upper",
];

/// A filter or test a template names that its environment does not provide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCallable {
    /// `filter` or `test`.
    pub kind: &'static str,
    pub name: String,
    /// 1-based line in the template (0: unknown).
    pub line: usize,
}

/// Every filter and test template `name` (compiled in `env`) names that `env` does not provide,
/// each once, in order — whether or not a rendering would reach it (branches, macros,
/// `{% filter %}` blocks). minijinja looks them up only when it runs them, so without this a
/// template using jinja2's `truncate` validates and fails on the first row that reaches it.
/// Templates it includes are not followed (validation checks those on their own).
pub fn unknown_filters_and_tests(
    env: &Environment<'_>,
    name: &str,
) -> Result<Vec<UnknownCallable>, Error> {
    let template = env.get_template(name)?;
    let compiled = minijinja::machinery::get_compiled_template(&template);
    let mut seen = BTreeSet::new();
    let mut unknown = Vec::new();
    for instructions in std::iter::once(&compiled.instructions).chain(compiled.blocks.values()) {
        for index in 0..u32::try_from(instructions.len()).unwrap_or(u32::MAX) {
            let (kind, written) = match instructions.get(index) {
                Some(Instruction::ApplyFilter(written, _, _)) => ("filter", *written),
                Some(Instruction::PerformTest(written, _, _)) => ("test", *written),
                _ => continue,
            };
            // As minijinja looks it up.
            let called: String = written
                .chars()
                .filter(|c| !c.is_ascii_whitespace())
                .collect();
            if !seen.insert((kind, called.clone())) || provides(env, kind, &called) {
                continue;
            }
            unknown.push(UnknownCallable {
                kind,
                name: called,
                line: instructions.get_line(index).unwrap_or(0),
            });
        }
    }
    Ok(unknown)
}

/// Whether `env` has the filter or test `name`: a one-expression probe fails to find it or not
/// (any other outcome, a syntax error included, counts as found).
fn provides(env: &Environment<'_>, kind: &str, name: &str) -> bool {
    let probe = match kind {
        "filter" => format!("{{% set probe = none | {name} %}}"),
        _ => format!("{{% set probe = none is {name} %}}"),
    };
    match env.render_str(&probe, ()) {
        Ok(_) => true,
        Err(error) => !matches!(
            error.kind(),
            ErrorKind::UnknownFilter | ErrorKind::UnknownTest
        ),
    }
}

/// The loader: a tracked name, confined to the project, read as a bounded regular file.
fn load_included(includes: &Includes, name: &str) -> Result<Option<String>, Error> {
    let refuse = |message: String| Err(Error::new(ErrorKind::InvalidOperation, message));
    if !includes.tracked.contains(name) {
        return refuse(format!(
            "template `{name}` is not named by a string literal in the stage's templates, so \
             peftpipe cannot track it: write `{{% include \"{name}\" %}}`"
        ));
    }
    let path = match confine_template(
        &includes.project_dir,
        name,
        "the included template",
        includes.allow_outside_project,
    ) {
        Ok(path) => path,
        Err(message) => return refuse(message),
    };
    if !path.exists() {
        return Ok(None);
    }
    match read_template_file(&path, name) {
        Ok(source) => Ok(Some(source)),
        Err(message) => refuse(message),
    }
}

/// A template that `{% include %}`, `{% import %}`, `{% from %}` or `{% extends %}` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateReference {
    /// Written as a string literal, or a list of them (the first that exists is used).
    /// `may_be_absent`: a file it names may not exist (a list of several, or `ignore
    /// missing`): the run then takes the next one, or renders nothing.
    Literal {
        names: Vec<String>,
        may_be_absent: bool,
    },
    /// Computed at render time: the tag as written and its 1-based line.
    Computed { tag: String, line: usize },
}

/// Every template reference of `source`, in order. Tags inside `{% raw %}` blocks, comments and
/// string literals of expressions are not references.
pub fn template_references(source: &str) -> Vec<TemplateReference> {
    let mut found = Vec::new();
    let mut rest = source;
    let mut offset = 0;
    let line_of = |at: usize| source[..at].matches('\n').count() + 1;
    while let Some(start) = rest.find('{') {
        let after = &rest[start..];
        let (close, is_tag) = if after.starts_with("{%") {
            ("%}", true)
        } else if after.starts_with("{{") {
            ("}}", false)
        } else if after.starts_with("{#") {
            ("#}", false)
        } else {
            offset += start + 1;
            rest = &rest[start + 1..];
            continue;
        };
        let body_start = start + 2;
        let Some(body_len) =
            find_outside_strings(&rest[body_start..], close, after.starts_with("{#"))
        else {
            break;
        };
        let body = &rest[body_start..body_start + body_len];
        let mut consumed = body_start + body_len + 2;
        if is_tag {
            let inner = body
                .trim_start_matches(['-', '+'])
                .trim_end_matches(['-', '+'])
                .trim();
            let (keyword, argument) = match inner.split_once(char::is_whitespace) {
                Some((keyword, argument)) => (keyword, argument.trim()),
                None => (inner, ""),
            };
            match keyword {
                "raw" => {
                    // Skip to the end of the raw block.
                    let tail = &rest[consumed..];
                    consumed += raw_block_end(tail).unwrap_or(tail.len());
                }
                "include" | "import" | "from" | "extends" => {
                    found.push(match literal_names(keyword, argument) {
                        Some((names, ignore_missing)) => TemplateReference::Literal {
                            may_be_absent: ignore_missing || names.len() > 1,
                            names,
                        },
                        None => TemplateReference::Computed {
                            tag: format!("{{% {inner} %}}"),
                            line: line_of(offset + start),
                        },
                    });
                }
                _ => {}
            }
        }
        offset += consumed;
        rest = &rest[consumed..];
    }
    found
}

/// Where `close` (ASCII) occurs in `text`, not counting occurrences inside string literals
/// (comments have no strings). Scans bytes: an index inside a character of several bytes is
/// never sliced at, and a match of `close` is always at a character boundary.
fn find_outside_strings(text: &str, close: &str, comment: bool) -> Option<usize> {
    if comment {
        return text.find(close);
    }
    let bytes = text.as_bytes();
    let mut index = 0;
    let mut quote: Option<u8> = None;
    while index < bytes.len() {
        let byte = bytes[index];
        match quote {
            Some(q) => {
                if byte == b'\\' {
                    index += 1;
                } else if byte == q {
                    quote = None;
                }
            }
            None => {
                if byte == b'"' || byte == b'\'' {
                    quote = Some(byte);
                } else if bytes[index..].starts_with(close.as_bytes()) {
                    return Some(index);
                }
            }
        }
        index += 1;
    }
    None
}

/// Length up to and including the `{% endraw %}` tag that ends a raw block.
fn raw_block_end(text: &str) -> Option<usize> {
    let mut searched = 0;
    while let Some(start) = text[searched..].find("{%") {
        let at = searched + start;
        let end = text[at..].find("%}")? + at + 2;
        let inner = text[at + 2..end - 2]
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+'])
            .trim();
        if inner == "endraw" {
            return Some(end);
        }
        searched = end;
    }
    None
}

/// The names of a reference tag's argument when they are string literals: `"a.j2"`,
/// `["a.j2", "b.j2"]` or `("a.j2",)`, followed only by what the keyword allows (`ignore missing`,
/// `with context`, `as name`, `import names`). None: computed.
fn literal_names(keyword: &str, argument: &str) -> Option<(Vec<String>, bool)> {
    let (names, rest) = match argument.chars().next()? {
        '"' | '\'' => {
            let (name, rest) = string_literal(argument)?;
            (vec![name], rest)
        }
        open @ ('[' | '(') => {
            let close = if open == '[' { ']' } else { ')' };
            let mut names = Vec::new();
            let mut rest = argument[1..].trim_start();
            loop {
                if let Some(after) = rest.strip_prefix(close) {
                    rest = after;
                    break;
                }
                let (name, after) = string_literal(rest)?;
                names.push(name);
                rest = after.trim_start();
                if let Some(after) = rest.strip_prefix(',') {
                    rest = after.trim_start();
                } else if !rest.starts_with(close) {
                    return None;
                }
            }
            if names.is_empty() {
                return None;
            }
            (names, rest)
        }
        _ => return None,
    };
    let words: Vec<&str> = rest.split_whitespace().collect();
    let context =
        |words: &[&str]| matches!(words, [] | ["with", "context"] | ["without", "context"]);
    let ignore_missing = keyword == "include" && words.starts_with(&["ignore", "missing"]);
    let allowed = match keyword {
        "include" => match words.as_slice() {
            ["ignore", "missing", more @ ..] => context(more),
            more => context(more),
        },
        "import" => match words.as_slice() {
            ["as", name, more @ ..] => is_identifier(name) && context(more),
            _ => false,
        },
        "from" => matches!(words.first(), Some(&"import")) && words.len() > 1,
        _ => words.is_empty(),
    };
    allowed.then_some((names, ignore_missing))
}

/// `"a.j2" rest` → ("a.j2", " rest"), for single or double quotes, with backslash escapes.
fn string_literal(text: &str) -> Option<(String, &str)> {
    let mut chars = text.char_indices();
    let (_, quote) = chars.next()?;
    if quote != '"' && quote != '\'' {
        return None;
    }
    let mut value = String::new();
    let mut escaped = false;
    for (index, c) in chars {
        if escaped {
            value.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == quote {
            return Some((value, &text[index + c.len_utf8()..]));
        } else {
            value.push(c);
        }
    }
    None
}

fn is_identifier(word: &str) -> bool {
    let mut chars = word.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The top-level variables a template reads that neither it nor minijinja defines.
pub fn undeclared_variables(env: &Environment<'_>, name: &str) -> Result<BTreeSet<String>, Error> {
    let template = env.get_template(name)?;
    Ok(template
        .undeclared_variables(false)
        .into_iter()
        .filter(|v| !BUILTIN_NAMES.contains(&v.as_str()))
        .collect())
}

#[cfg(test)]
mod tests {
    use minijinja::Value;

    use super::*;

    /// Release builds too: the error must still carry the failing expression's span.
    #[test]
    fn errors_keep_the_failing_expression_in_every_build_profile() {
        let mut env = row_environment(&Includes::none(Path::new(".")), Some(DEFAULT_FUEL));
        env.add_template("row", "{{ txet }}").unwrap();
        let error = env
            .get_template("row")
            .unwrap()
            .render(minijinja::context! {})
            .unwrap_err();
        let (Some(source), Some(range)) = (error.template_source(), error.range()) else {
            panic!("no span in {error}")
        };
        assert_eq!(source.get(range).map(str::trim), Some("txet"));
    }

    /// A tag holding characters of several bytes is scanned byte by byte without slicing inside
    /// one (the loader panicked on `{{ Āl }}`, found by tests/fuzz_props.rs).
    #[test]
    fn tags_with_multibyte_characters_are_scanned() {
        for source in [
            "{{ Āl }}",
            "{% include 'Ā.j2' %}{{ x Ā }}",
            "{# Ā #}{{ 'Ā' }}",
            "{{ Ā",
        ] {
            let _ = template_references(source);
        }
        assert_eq!(
            template_references("{{ Ā }}{% include 'é.j2' %}"),
            vec![TemplateReference::Literal {
                names: vec!["é.j2".to_string()],
                may_be_absent: false
            }]
        );
    }

    #[test]
    fn references_are_literal_or_computed() {
        use TemplateReference::{Computed, Literal};
        let literal = |names: &[&str], may_be_absent: bool| Literal {
            names: names.iter().map(|n| n.to_string()).collect(),
            may_be_absent,
        };
        let source = "{% include 'a.j2' %}{%- include [\"b.j2\", 'c.j2'] ignore missing -%}\n\
            {% import \"m.j2\" as m %}{% from 'f.j2' import x, y %}{% extends \"base.j2\" %}\n\
            {% include 'o.j2' ignore missing with context %}{% include ('p.j2', 'q.j2') %}\n\
            {% set n = 'dyn' ~ '.j2' %}{% include n %}{% include 'x' ~ n %}\n\
            {{ '{% include q %}' }}{# {% include r %} #}{% raw %}{% include s %}{% endraw %}";
        assert_eq!(
            template_references(source),
            vec![
                literal(&["a.j2"], false),
                literal(&["b.j2", "c.j2"], true),
                literal(&["m.j2"], false),
                literal(&["f.j2"], false),
                literal(&["base.j2"], false),
                literal(&["o.j2"], true),
                literal(&["p.j2", "q.j2"], true),
                Computed {
                    tag: "{% include n %}".into(),
                    line: 4
                },
                Computed {
                    tag: "{% include 'x' ~ n %}".into(),
                    line: 4
                },
            ]
        );
    }

    #[test]
    fn the_loader_serves_only_tracked_names_inside_the_project() {
        let root = tempfile::tempdir().unwrap();
        let project = root.path().join("project");
        std::fs::create_dir_all(&project).unwrap();
        std::fs::write(project.join("part.j2"), "part").unwrap();
        std::fs::write(project.join("dyn.j2"), "dyn").unwrap();
        std::fs::write(root.path().join("secret.j2"), "secret").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret.j2"), project.join("link.j2")).unwrap();
        let includes = Includes {
            project_dir: project.clone(),
            allow_outside_project: false,
            tracked: ["part.j2", "link.j2"].map(String::from).into(),
        };
        let render = |includes: &Includes, source: &str| {
            let mut env = row_environment(includes, Some(DEFAULT_FUEL));
            env.add_template_owned("row", source.to_string()).unwrap();
            env.get_template("row")
                .unwrap()
                .render(minijinja::context! {})
                .map_err(|e| format!("{e:#}"))
        };
        assert_eq!(
            render(&includes, "{% include 'part.j2' %}").unwrap(),
            "part"
        );
        let error = render(&includes, "{% set n = 'dyn' ~ '.j2' %}{% include n %}").unwrap_err();
        assert!(error.contains("cannot track it"), "{error}");
        let error = render(&includes, "{% include 'link.j2' %}").unwrap_err();
        assert!(error.contains("outside the project directory"), "{error}");
        let allowed = Includes {
            allow_outside_project: true,
            ..includes
        };
        assert_eq!(
            render(&allowed, "{% include 'link.j2' %}").unwrap(),
            "secret"
        );
    }

    /// A null printed at the top level is an error (strict); one inside a list or map, printed
    /// or joined, was written as minijinja's `none` (jinja2 writes `None`): both put a word no
    /// row holds into a training prompt, so they are errors too, naming where the null is.
    #[test]
    fn nulls_inside_printed_or_joined_values_are_errors_like_top_level_nulls() {
        let render = |source: &str| {
            let mut env = row_environment(&Includes::none(Path::new(".")), Some(DEFAULT_FUEL));
            env.add_template_owned("row", source.to_string()).unwrap();
            let tags = vec![Value::from("a"), Value::from(()), Value::from("b")];
            let meta = Value::from_iter([("k", Value::from(())), ("j", Value::from(1))]);
            env.get_template("row")
                .unwrap()
                .render(minijinja::context! { x => (), tags => tags, meta => meta, ok => vec!["a", "b"] })
                .map_err(|e| e.detail().unwrap_or_default().to_string())
        };
        let error = render("{{ x }}").unwrap_err();
        assert!(error.contains("null"), "{error}");
        // The hint's remedy works: `default` replaces a null only with its second argument
        // true (as in jinja2).
        assert!(error.contains("default('…', true)"), "{error}");
        assert_eq!(render("{{ x | default('?', true) }}").unwrap(), "?");
        let error = render("{{ tags | join(', ') }}").unwrap_err();
        assert!(error.contains("null") && error.contains("[1]"), "{error}");
        let error = render("{{ tags }}").unwrap_err();
        assert!(error.contains("null") && error.contains("[1]"), "{error}");
        let error = render("{{ meta }}").unwrap_err();
        assert!(error.contains("null") && error.contains("k"), "{error}");
        // Filtered out or replaced, the rest renders; tojson writes JSON's null.
        assert_eq!(
            render("{{ tags | reject('none') | join(', ') }}").unwrap(),
            "a, b"
        );
        assert_eq!(
            render("{{ tags | map('default', '?', true) | join(',') }}").unwrap(),
            "a,?,b"
        );
        assert_eq!(render("{{ tags | tojson }}").unwrap(), "[\"a\",null,\"b\"]");
        assert_eq!(
            render("{{ ok | join('+') }}{{ ok }}").unwrap(),
            "a+b[\"a\", \"b\"]"
        );
        assert_eq!(render("{{ 'abc' | join('-') }}").unwrap(), "a-b-c");
    }

    #[test]
    fn every_listed_filter_and_test_is_provided() {
        let env = row_environment(&Includes::none(Path::new(".")), Some(DEFAULT_FUEL));
        for name in FILTER_NAMES {
            assert!(provides(&env, "filter", name), "filter {name}");
        }
        for name in TEST_NAMES {
            assert!(provides(&env, "test", name), "test {name}");
        }
        assert!(!provides(&env, "filter", "truncate"));
        assert!(!provides(&env, "test", "divisible_by"));
    }

    #[test]
    fn fuel_stops_runaway_loops() {
        let mut env = row_environment(&Includes::none(Path::new(".")), Some(100_000));
        env.add_template(
            "row",
            "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}",
        )
        .unwrap();
        let started = std::time::Instant::now();
        let error = env
            .get_template("row")
            .unwrap()
            .render(minijinja::context! {})
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::OutOfFuel);
        assert!(started.elapsed().as_secs_f64() < 1.0);
    }
}
