//! Diagnostics for configs: each problem names the file, line, column, key path, what is wrong
//! and a hint. Rendering to the terminal is the reporter's job; this module only holds data.

use serde::Serialize;

/// One thing wrong with a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Key path, e.g. `stages.prompts.template.k`.
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
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            message: message.into(),
            hint: None,
            line: None,
            column: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Every problem found in one pipeline file.
#[derive(Debug, Clone, Serialize, thiserror::Error)]
#[error("{file}: {} problem(s)", problems.len())]
pub struct Problems {
    pub file: String,
    pub problems: Vec<Problem>,
}

/// The closest candidate to `word` (for did-you-mean hints), if any is close enough.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
