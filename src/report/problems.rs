//! Rendering of config diagnostics (`validate`, and any command that loads a pipeline): each
//! problem as `file:line:column: key.path: message`, a source excerpt with a caret under the
//! key, and a `hint:` line; `--json` output of validation; and the plain data the config
//! commands print on stdout (`schema`, `dag`).
//!
//! Pure string building plus the few functions that write it out; it decides nothing.

use serde::Serialize;

use crate::config::problem::Subject;
use crate::config::{Problem, Problems};

/// Whether stderr gets ANSI colors: a terminal, and `NO_COLOR` unset or empty.
pub fn stderr_color() -> bool {
    super::color_stderr()
}

struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
    fn bold(&self, text: &str) -> String {
        self.paint("1", text)
    }
    fn red(&self, text: &str) -> String {
        self.paint("1;31", text)
    }
    fn blue(&self, text: &str) -> String {
        self.paint("1;34", text)
    }
    fn cyan(&self, text: &str) -> String {
        self.paint("36", text)
    }
    fn green(&self, text: &str) -> String {
        self.paint("1;32", text)
    }
}

/// Every problem of one file, each with its excerpt and hint, separated by blank lines.
pub fn render_problems(problems: &Problems, color: bool) -> String {
    let style = Style { color };
    let mut out = String::new();
    for (i, problem) in problems.problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&render_problem(
            &problems.file,
            problem,
            problems.text.as_deref(),
            &style,
        ));
    }
    out
}

fn render_problem(file: &str, problem: &Problem, source: Option<&str>, style: &Style) -> String {
    let location = match (&problem.from_override, problem.line, problem.column) {
        (Some(argument), _, _) => format!("{file} (--set {argument})"),
        (None, Some(line), Some(column)) => format!("{file}:{line}:{column}"),
        (None, Some(line), None) => format!("{file}:{line}"),
        _ => file.to_string(),
    };
    let mut head = format!("{}:", style.bold(&location));
    if !problem.path.is_empty() {
        head.push_str(&format!(" {}:", style.cyan(&problem.path)));
    }
    head.push_str(&format!(" {}", style.red(&problem.message)));
    let mut out = head;
    out.push('\n');

    let gutter_width = problem.line.map_or(1, |line| line.to_string().len());
    let gutter = " ".repeat(gutter_width + 1);
    if problem.from_override.is_none() {
        if let (Some(line), Some(source)) = (problem.line, source) {
            if let Some(text) = source.lines().nth(line.saturating_sub(1)) {
                let column = problem.column.unwrap_or(1).max(1);
                let chars: Vec<char> = text.chars().collect();
                let start = (column - 1).min(chars.len());
                let padding: String = chars[..start]
                    .iter()
                    .map(|&c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                let underline = match problem.subject {
                    Subject::Key => underline_length(&chars[start..]),
                    Subject::Value => value_length(&chars[..start], &chars[start..]),
                };
                out.push_str(&format!("{gutter}{}\n", style.blue("|")));
                out.push_str(&format!(
                    "{} {} {}\n",
                    style.blue(&format!("{line:>gutter_width$}")),
                    style.blue("|"),
                    text.trim_end()
                ));
                out.push_str(&format!(
                    "{gutter}{} {padding}{}\n",
                    style.blue("|"),
                    style.red(&"^".repeat(underline))
                ));
            }
        }
    }
    if let Some(hint) = &problem.hint {
        out.push_str(&format!("{gutter}{} {}\n", style.blue("= hint:"), hint));
    }
    out
}

/// The length of the key or value token starting here (at least one character).
fn underline_length(rest: &[char]) -> usize {
    let mut length = 0;
    let mut quote = None;
    for (i, &c) in rest.iter().enumerate() {
        match quote {
            Some(q) => {
                length += 1;
                if c == q && i > 0 {
                    break;
                }
            }
            None => {
                if i == 0 && (c == '"' || c == '\'') {
                    quote = Some(c);
                    length += 1;
                    continue;
                }
                if c == ':' || c == ',' || c == '}' || c == ']' || c == '#' || c.is_whitespace() {
                    break;
                }
                length += 1;
            }
        }
    }
    length.max(1)
}

/// The length of the value starting here: a quoted string to its closing quote, a flow
/// collection to its closing bracket (or the end of the line), a plain scalar to the end of the
/// line or a comment — or, inside a flow collection (`before` opens one), to the next `,`, `]`
/// or `}`. At least one character.
fn value_length(before: &[char], rest: &[char]) -> usize {
    let trimmed_end = |length: usize| {
        let mut length = length;
        while length > 1 && rest[length - 1].is_whitespace() {
            length -= 1;
        }
        length.max(1)
    };
    match rest.first() {
        None => 1,
        Some('"' | '\'') => underline_length(rest),
        Some('[' | '{') => {
            let mut depth = 0usize;
            let mut quote: Option<char> = None;
            for (i, &c) in rest.iter().enumerate() {
                match quote {
                    Some(q) if c == q => quote = None,
                    Some(_) => {}
                    None => match c {
                        '"' | '\'' => quote = Some(c),
                        '[' | '{' => depth += 1,
                        ']' | '}' => {
                            depth -= 1;
                            if depth == 0 {
                                return i + 1;
                            }
                        }
                        _ => {}
                    },
                }
            }
            trimmed_end(rest.len())
        }
        Some(_) => {
            let in_flow = {
                let mut depth = 0i32;
                for &c in before {
                    match c {
                        '[' | '{' => depth += 1,
                        ']' | '}' => depth -= 1,
                        _ => {}
                    }
                }
                depth > 0
            };
            let mut end = rest.len();
            for (i, &c) in rest.iter().enumerate() {
                let comment = c == '#' && i > 0 && rest[i - 1].is_whitespace();
                let key_indicator =
                    c == ':' && rest.get(i + 1).is_none_or(|next| next.is_whitespace());
                let flow_end = in_flow && matches!(c, ',' | ']' | '}');
                if comment || key_indicator || flow_end {
                    end = i;
                    break;
                }
            }
            trimmed_end(end)
        }
    }
}

/// The outcome of validating one file.
#[derive(Debug, Clone, Serialize)]
pub struct FileValidation {
    pub file: String,
    pub valid: bool,
    /// Stage names in file order (valid files only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<String>,
    pub problems: Vec<Problem>,
    #[serde(skip)]
    pub rendered: Option<Problems>,
}

impl FileValidation {
    pub fn valid(file: impl Into<String>, stages: Vec<String>) -> Self {
        FileValidation {
            file: file.into(),
            valid: true,
            stages,
            problems: Vec::new(),
            rendered: None,
        }
    }

    pub fn invalid(problems: Problems) -> Self {
        FileValidation {
            file: problems.file.clone(),
            valid: false,
            stages: Vec::new(),
            problems: problems.problems.clone(),
            rendered: Some(problems),
        }
    }
}

/// The human report of `validate`: problems of invalid files, a line per valid file (unless
/// quiet), and a closing summary.
pub fn render_validation(outcomes: &[FileValidation], quiet: bool, color: bool) -> String {
    let style = Style { color };
    let mut out = String::new();
    let mut problem_count = 0;
    let mut invalid_files = 0;
    for outcome in outcomes {
        match &outcome.rendered {
            Some(problems) if !outcome.valid => {
                invalid_files += 1;
                problem_count += problems.problems.len();
                out.push_str(&render_problems(problems, color));
                out.push('\n');
            }
            _ => {
                if !quiet {
                    let count = outcome.stages.len();
                    let noun = if count == 1 { "stage" } else { "stages" };
                    out.push_str(&format!(
                        "{} {} ({count} {noun}: {})\n",
                        style.green("valid:"),
                        outcome.file,
                        outcome.stages.join(", ")
                    ));
                }
            }
        }
    }
    if invalid_files > 0 {
        let problem_noun = if problem_count == 1 {
            "problem"
        } else {
            "problems"
        };
        let file_noun = if outcomes.len() == 1 { "file" } else { "files" };
        out.push_str(&format!(
            "{} {problem_count} {problem_noun} in {invalid_files} of {} {file_noun}\n",
            style.red("error:"),
            outcomes.len()
        ));
    }
    out
}

/// Print `validate`'s human report to stderr.
pub fn print_validation(outcomes: &[FileValidation], quiet: bool) {
    super::write_stderr_raw(&render_validation(outcomes, quiet, stderr_color()));
}

/// Print the problems of a pipeline that another command could not load.
pub fn print_problems(problems: &Problems) {
    let color = stderr_color();
    let style = Style { color };
    let count = problems.problems.len();
    let noun = if count == 1 { "problem" } else { "problems" };
    super::write_stderr(&format!(
        "{}{} {} is not a valid pipeline ({count} {noun}; `peftpipe validate` checks it)",
        render_problems(problems, color),
        style.red("error:"),
        problems.file
    ));
}

/// An error about the command line (not the pipeline file), with an optional hint.
pub fn print_usage_error(message: &str, hint: Option<&str>) {
    let style = Style {
        color: stderr_color(),
    };
    let mut text = format!("{} {message}\n", style.red("error:"));
    if let Some(hint) = hint {
        text.push_str(&format!("  {} {hint}\n", style.blue("= hint:")));
    }
    super::write_stderr_raw(&text);
}

/// `validate --json`: `{"valid": bool, "files": [...]}` on stdout.
pub fn print_validation_json(outcomes: &[FileValidation]) {
    let document = serde_json::json!({
        "valid": outcomes.iter().all(|outcome| outcome.valid),
        "files": outcomes,
    });
    print_json(&document);
}

/// A command failed under `--json` for another reason than a pipeline that does not load: the
/// problem on stdout in `validate --json`'s shape, `file` the file or folder it is about as
/// given (the pipeline file, the MODEL), `path` what is at fault (the argument: `MODEL`,
/// `--target`, `--stage`, `--cache-dir`; or a key: `stages.NAME`). The error itself goes to
/// stderr as without `--json` (see [`super::error`]).
pub fn print_failure_json(file: &str, path: &str, message: &str, hint: Option<&str>) {
    let mut problem = crate::config::Problem::new(path, crate::exec::without_backtrace(message));
    if let Some(hint) = hint {
        problem = problem.with_hint(hint);
    }
    print_validation_json(&[FileValidation::invalid(Problems::new(file, vec![problem]))]);
}

/// A JSON document on stdout (pretty, newline-terminated).
pub fn print_json(value: &serde_json::Value) {
    let text = serde_json::to_string_pretty(value)
        .unwrap_or_else(|error| format!("{{\"error\": \"{error}\"}}"));
    print_data(&format!("{text}\n"));
}

/// Data on stdout as is (`schema`, `dag`). A closed pipe (`| head`) is not an error.
pub fn print_data(text: &str) {
    super::write_stdout_raw(text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Problems {
        let source = "stages:\n  prompts:\n    template:\n      k: four\n";
        Problems::new(
            "pipelines/x.yaml",
            vec![
                Problem::new(
                    "stages.prompts.template.k",
                    "expected an integer, found \"four\"",
                )
                .with_hint("k is the number of demonstrations")
                .at(4, 7),
                Problem::new("stages.prompts.template.k", "from the command line")
                    .with_hint("check the value"),
            ],
        )
        .with_source(source)
    }

    #[test]
    fn problems_render_with_location_excerpt_and_hint() {
        let mut problems = sample();
        problems.problems[1].from_override = Some("stages.prompts.template.k=x".into());
        let text = render_problems(&problems, false);
        assert_eq!(
            text,
            "pipelines/x.yaml:4:7: stages.prompts.template.k: expected an integer, found \"four\"\n  |\n4 |       k: four\n  |       ^\n  = hint: k is the number of demonstrations\n\npipelines/x.yaml (--set stages.prompts.template.k=x): stages.prompts.template.k: from the command line\n  = hint: check the value\n"
        );
    }

    #[test]
    fn color_only_when_asked() {
        assert!(!render_problems(&sample(), false).contains('\x1b'));
        assert!(render_problems(&sample(), true).contains("\x1b[1;31m"));
    }

    #[test]
    fn underline_covers_the_token() {
        let chars: Vec<char> = "promt: x".chars().collect();
        assert_eq!(underline_length(&chars), 5);
        let chars: Vec<char> = "\"a b\": x".chars().collect();
        assert_eq!(underline_length(&chars), 5);
        assert_eq!(underline_length(&[]), 1);
    }

    #[test]
    fn value_underline_covers_the_whole_value() {
        let value = |line: &str, column: usize| {
            let chars: Vec<char> = line.chars().collect();
            value_length(&chars[..column - 1], &chars[column - 1..])
        };
        // Plain scalars run to the end of the line or a comment, spaces included.
        assert_eq!(value("name: my pipeline  # note", 7), "my pipeline".len());
        assert_eq!(value("k: -3", 4), 2);
        // Quoted strings to their closing quote, flow collections to their closing bracket.
        assert_eq!(
            value("prompt: \"a: {{ b }}\" # c", 9),
            "\"a: {{ b }}\"".len()
        );
        assert_eq!(value("name: [not, a, name]", 7), "[not, a, name]".len());
        assert_eq!(value("split: {fractions: {train: 0.8, eval: 0.3}}", 20), 23);
        // Inside a flow collection a plain scalar ends at `,`, `]` or `}`.
        assert_eq!(value("columns: [text, lable]", 17), "lable".len());
        assert_eq!(value("x: {a: 1, b: two}", 14), "two".len());
    }

    #[test]
    fn a_value_problem_underlines_the_value() {
        let problems = Problems::new(
            "x.yaml",
            vec![Problem::new("k", "must be at least 1")
                .about_value()
                .at(1, 4)],
        )
        .with_source("k: -3\n");
        assert_eq!(
            render_problems(&problems, false),
            "x.yaml:1:4: k: must be at least 1\n  |\n1 | k: -3\n  |    ^^\n"
        );
    }

    #[test]
    fn validation_summary_counts_problems_and_files() {
        let outcomes = vec![
            FileValidation::valid("a.yaml", vec!["data".into(), "prompts".into()]),
            FileValidation::invalid(sample()),
        ];
        let text = render_validation(&outcomes, false, false);
        assert!(text.starts_with("valid: a.yaml (2 stages: data, prompts)\n"));
        assert!(text.ends_with("error: 2 problems in 1 of 2 files\n"));
        let quiet = render_validation(&outcomes, true, false);
        assert!(!quiet.contains("valid:"));
    }
}
