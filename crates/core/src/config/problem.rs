//! Diagnostics for configs: each problem names the file, line, column, key path, what is wrong
//! and a hint. Rendering to the terminal is the reporter's job (`report::problems`); this module
//! only holds data and the small helpers that build hints (did-you-mean, lists of choices).

use serde::Serialize;

/// One thing wrong with a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Key path, e.g. `stages.prompts.template.k` (sequence items as `filters[2]`).
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it (did-you-mean, available columns, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Where, filled in by the loader from the key path (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    /// The `--set KEY=VALUE` argument the offending value came from, when it did not come from
    /// the file (then `line`/`column` are absent).
    #[serde(rename = "set", skip_serializing_if = "Option::is_none")]
    pub from_override: Option<String>,
    /// Whether the key or its value is wrong: decides where `line`/`column` (and the caret under
    /// the excerpt) point.
    #[serde(skip)]
    pub subject: Subject,
}

/// What a problem is about, for placing it in the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Subject {
    /// The key as written: unknown, misplaced, duplicated, conflicting with another key, or a
    /// mapping that lacks a key.
    #[default]
    Key,
    /// The value written under the key (or the sequence item): wrong type, out of range, an
    /// unknown stage or column name, a missing file, a template that does not compile. Placed
    /// at the value when it was written in the file, else at its key.
    Value,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            message: message.into(),
            hint: None,
            line: None,
            column: None,
            from_override: None,
            subject: Subject::Key,
        }
    }

    /// The problem is about the value, not the key (see [`Subject`]).
    pub fn about_value(mut self) -> Self {
        self.subject = Subject::Value;
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Set the hint only when there is one.
    pub fn with_optional_hint(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }

    /// Place the problem at a 1-based line and column of the file.
    pub fn at(mut self, line: usize, column: usize) -> Self {
        self.line = Some(line);
        self.column = Some(column);
        self
    }
}

/// Every problem found in one pipeline file.
#[derive(Debug, Clone, Serialize, thiserror::Error)]
#[error("{file}: {} problem(s)", problems.len())]
pub struct Problems {
    /// The file as given on the command line.
    pub file: String,
    pub problems: Vec<Problem>,
    /// The file's text, for source excerpts (absent when it could not be read).
    #[serde(skip)]
    pub text: Option<String>,
}

impl Problems {
    pub fn new(file: impl Into<String>, problems: Vec<Problem>) -> Self {
        Problems {
            file: file.into(),
            problems,
            text: None,
        }
    }

    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.text = Some(source.into());
        self
    }
}

/// The closest candidate to `word` (for did-you-mean hints), if any is close enough.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lowered = word.to_lowercase();
    candidates
        .into_iter()
        .map(|candidate| {
            let score = strsim::jaro_winkler(&lowered, &candidate.to_lowercase())
                .max(similarity_by_edits(&lowered, &candidate.to_lowercase()));
            (score, candidate)
        })
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

/// 1 - (edit distance / longer length): catches transpositions in short words (`nmae`) that
/// Jaro-Winkler scores low.
fn similarity_by_edits(a: &str, b: &str) -> f64 {
    let longer = a.chars().count().max(b.chars().count());
    if longer == 0 {
        return 1.0;
    }
    let distance = strsim::damerau_levenshtein(a, b);
    if distance > 2 {
        return 0.0;
    }
    1.0 - distance as f64 / longer as f64
}

/// A hint for a name that is not one of `candidates`: did-you-mean when one is close, otherwise
/// the list of what is available (`what` names the kind of thing, e.g. "keys", "stages").
pub fn hint_for_unknown<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
    what: &str,
) -> Option<String> {
    let candidates: Vec<&str> = candidates.into_iter().collect();
    if let Some(close) = did_you_mean(word, candidates.iter().copied()) {
        return Some(format!("did you mean `{close}`?"));
    }
    if candidates.is_empty() {
        return None;
    }
    Some(format!("available {what}: {}", quoted_list(&candidates)))
}

/// `a`, `b`, `c`
pub fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|item| format!("`{item}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean_finds_typos_and_transpositions() {
        let keys = ["input", "prompt", "completion", "k", "name"];
        assert_eq!(did_you_mean("promt", keys), Some("prompt"));
        assert_eq!(did_you_mean("inptu", keys), Some("input"));
        assert_eq!(did_you_mean("nmae", keys), Some("name"));
        assert_eq!(did_you_mean("Completion", keys), Some("completion"));
        assert_eq!(did_you_mean("zzzzzz", keys), None);
    }

    #[test]
    fn hint_lists_candidates_when_nothing_is_close() {
        let hint = hint_for_unknown("zzz", ["a", "b"], "stages");
        assert_eq!(hint.as_deref(), Some("available stages: `a`, `b`"));
        let hint = hint_for_unknown("prmpts", ["data", "prompts"], "stages");
        assert_eq!(hint.as_deref(), Some("did you mean `prompts`?"));
        assert_eq!(hint_for_unknown("x", [], "stages"), None);
    }
}
