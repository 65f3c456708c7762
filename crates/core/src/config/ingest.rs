//! Config of the `ingest` stage kind and its semantic checks: which files to read, how columns are
//! selected and renamed, which rows are filtered, deduplicated and how they are split.
//!
//! Pure data plus checks. It must not read row data: the only I/O is listing the input files and
//! peeking at their column names (Parquet footer, CSV header, the first JSONL lines) through the
//! [`super::probe::Probe`]. The stage itself lives in the main crate's `stages/ingest.rs`.

use std::path::Path;

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::problem::did_you_mean;
use super::{CheckContext, InputFile, Problem, StageSpec, UpstreamRef};

/// The `ingest` stage: read Parquet / JSONL / CSV files, map columns, filter, deduplicate and split
/// into `train.parquet`, `eval.parquet` (and `test.parquet` when a test split is declared).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Input: a file, a glob (`data/shard-*.parquet`) or a directory of shards, relative to the
    /// pipeline file. Environment variables (`${PEFTPIPE_SHARED}/datasets/sst2/train.parquet`)
    /// are expanded. Files are read in sorted path order.
    pub path: String,
    /// File format; by default it is taken from each file's extension (`.parquet`/`.pq`,
    /// `.jsonl`/`.ndjson`/`.json`, `.csv`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<InputFormat>,
    /// Columns to keep, by their name in the files, in this order. Empty keeps every column.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// CSV only: read these columns (by their name in the file, before renaming) as typed values,
    /// e.g. `{label: int64, score: float64, flag: boolean}`. Every other CSV column is text
    /// exactly as written (`007`, `1.50`, `true` and `2024-01-05` stay as they are); an empty
    /// cell is null. A cell a typed column cannot read is an error naming its line. Parquet and
    /// JSONL files carry their own types.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub types: IndexMap<String, CsvType>,
    /// Renames applied after selection: `{old_name: new_name}`. Filters, `dedup` and
    /// `split.stratify_by` use the new names.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub rename: IndexMap<String, String>,
    /// Row filters, applied in order after selection and renaming; a row is kept when every
    /// filter accepts it. `stats.json` counts the rows each filter dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<RowFilter>,
    /// Drop rows with a null in any (selected) column.
    #[serde(default)]
    pub drop_nulls: bool,
    /// Drop rows whose values in these columns equal those of an earlier row (the first
    /// occurrence in file order is kept). Empty: no deduplication.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dedup: Vec<String>,
    /// Read at most this many input rows (in file order, before filtering): quick trial runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Shuffle the rows of each split (seeded by the pipeline seed and the stage name). When
    /// false, rows keep their input order.
    #[serde(default = "default_true")]
    pub shuffle: bool,
    /// How rows are split into train / eval / test.
    #[serde(default)]
    pub split: SplitConfig,
}

fn default_true() -> bool {
    true
}

/// Input file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    /// Apache Parquet.
    Parquet,
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header line.
    Csv,
}

/// The type a CSV column is read as (see `types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CsvType {
    /// Text as written (the default for every CSV column).
    String,
    /// A 64-bit signed integer (`-12`, `007`); a fraction or text is an error.
    Int64,
    /// A 64-bit float (`1.5`, `-2e3`, `3`).
    Float64,
    /// `true` or `false` (any letter case).
    Boolean,
}

impl CsvType {
    /// The name as written in the config (`int64`).
    pub fn name(self) -> &'static str {
        match self {
            CsvType::String => "string",
            CsvType::Int64 => "int64",
            CsvType::Float64 => "float64",
            CsvType::Boolean => "boolean",
        }
    }
}

/// A declarative row filter (one key per filter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RowFilter {
    /// Keep rows where this column is null.
    IsNull(
        /// Column name (after renaming) that must be null.
        String,
    ),
    /// Keep rows where this column is not null.
    NotNull(
        /// Column name (after renaming) that must not be null.
        String,
    ),
    /// Keep rows where the column equals a value (string, number or boolean).
    Equals(ValueFilter),
    /// Keep rows where the column does not equal a value (nulls are dropped too).
    NotEquals(ValueFilter),
    /// Keep rows where the column's value is one of a set.
    InSet(SetFilter),
    /// Keep rows whose string length (in characters) is within bounds (nulls are dropped).
    Length(LengthFilter),
}

/// A column compared with one value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValueFilter {
    /// Column name (after renaming).
    pub column: String,
    /// The value (string, number or boolean). On a numeric column it is compared as a number
    /// (`1`, `1.0` and `"1"` are the same; a fraction on an integer column is an error), on
    /// any other column with the value's text form.
    pub value: serde_json::Value,
}

/// A column tested for membership in a set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetFilter {
    /// Column name (after renaming).
    pub column: String,
    /// Accepted values (strings, numbers or booleans), compared as `equals` compares.
    pub values: Vec<serde_json::Value>,
}

/// Bounds on a string column's length in characters (Unicode scalar values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LengthFilter {
    /// Column name (after renaming).
    pub column: String,
    /// Minimum length (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u64>,
    /// Maximum length (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
}

impl RowFilter {
    /// The column the filter reads.
    pub fn column(&self) -> &str {
        match self {
            RowFilter::IsNull(column) | RowFilter::NotNull(column) => column,
            RowFilter::Equals(f) | RowFilter::NotEquals(f) => &f.column,
            RowFilter::InSet(f) => &f.column,
            RowFilter::Length(f) => &f.column,
        }
    }

    /// The YAML key of the filter kind.
    pub fn kind(&self) -> &'static str {
        match self {
            RowFilter::IsNull(_) => "is_null",
            RowFilter::NotNull(_) => "not_null",
            RowFilter::Equals(_) => "equals",
            RowFilter::NotEquals(_) => "not_equals",
            RowFilter::InSet(_) => "in_set",
            RowFilter::Length(_) => "length",
        }
    }

    /// Key path of the column inside the filter, relative to the filter.
    fn column_key(&self) -> String {
        match self {
            RowFilter::IsNull(_) | RowFilter::NotNull(_) => self.kind().to_string(),
            _ => format!("{}.column", self.kind()),
        }
    }

    /// A short human description (`not_null(text)`, `length(text, 1..=200)`), used in stats.
    pub fn describe(&self) -> String {
        match self {
            RowFilter::IsNull(c) => format!("is_null({c})"),
            RowFilter::NotNull(c) => format!("not_null({c})"),
            RowFilter::Equals(f) => format!("equals({}, {})", f.column, f.value),
            RowFilter::NotEquals(f) => format!("not_equals({}, {})", f.column, f.value),
            RowFilter::InSet(f) => {
                let values: Vec<String> = f.values.iter().map(|v| v.to_string()).collect();
                format!("in_set({}, [{}])", f.column, values.join(", "))
            }
            RowFilter::Length(f) => format!(
                "length({}, {}..={})",
                f.column,
                f.min.map(|v| v.to_string()).unwrap_or_default(),
                f.max.map(|v| v.to_string()).unwrap_or_default()
            ),
        }
    }
}

/// How rows are divided between train, eval and test. Give either `fractions` or `counts`
/// (default: fractions train 0.9, eval 0.1).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// Fractions of the kept rows per split; they must add up to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fractions: Option<SplitFractions>,
    /// Row counts for eval and test; train gets the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<SplitCounts>,
    /// Stratify by this column: every split gets the same proportion of each of its values
    /// (up to rounding, by largest remainders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stratify_by: Option<String>,
}

/// Split fractions (each between 0 and 1, adding up to 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitFractions {
    /// Fraction of rows for training.
    pub train: f64,
    /// Fraction of rows for evaluation.
    #[serde(default)]
    pub eval: f64,
    /// Fraction of rows for a test split; when given, `test.parquet` is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<f64>,
}

/// Split sizes as row counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitCounts {
    /// Rows for evaluation.
    #[serde(default)]
    pub eval: u64,
    /// Rows for a test split; when given, `test.parquet` is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<u64>,
}

/// The split plan after defaults: what the stage executes.
#[derive(Debug, Clone, PartialEq)]
pub enum SplitSizes {
    /// Fractions for train, eval, test.
    Fractions([f64; 3]),
    /// Counts for eval and test; train gets the rest.
    Counts([u64; 2]),
}

impl SplitConfig {
    /// The effective sizes (defaults applied). `counts` wins when both are given (validation
    /// reports that as a problem).
    pub fn sizes(&self) -> SplitSizes {
        if let Some(counts) = &self.counts {
            return SplitSizes::Counts([counts.eval, counts.test.unwrap_or(0)]);
        }
        match &self.fractions {
            Some(f) => SplitSizes::Fractions([f.train, f.eval, f.test.unwrap_or(0.0)]),
            None => SplitSizes::Fractions([0.9, 0.1, 0.0]),
        }
    }

    /// Whether a test split is declared (then `test.parquet` is written, possibly empty).
    pub fn has_test(&self) -> bool {
        match (&self.counts, &self.fractions) {
            (Some(counts), _) => counts.test.is_some(),
            (None, Some(f)) => f.test.is_some(),
            (None, None) => false,
        }
    }

    /// Why the split `name` is written empty by the configuration itself (a fraction or count
    /// of 0), if it is: a stage reading it would have no rows.
    pub fn declared_empty(&self, name: &str) -> Option<String> {
        let (kind, size) = match (self.sizes(), name) {
            (SplitSizes::Fractions([_, eval, _]), "eval") => ("fractions", eval),
            (SplitSizes::Fractions([_, _, test]), "test") => ("fractions", test),
            (SplitSizes::Counts([eval, _]), "eval") => ("counts", eval as f64),
            (SplitSizes::Counts([_, test]), "test") => ("counts", test as f64),
            _ => return None,
        };
        let declared = name == "eval" || self.has_test();
        (declared && size == 0.0).then(|| format!("split.{kind}.{name} is 0"))
    }

    /// Names of the splits written, in order.
    pub fn split_names(&self) -> Vec<&'static str> {
        if self.has_test() {
            vec!["train", "eval", "test"]
        } else {
            vec!["train", "eval"]
        }
    }
}

impl IngestConfig {
    /// The input files (pattern expanded, sorted), with machine-independent keys.
    pub fn files(&self, project_dir: &Path) -> Result<Vec<InputFile>, String> {
        super::input::expand_input(project_dir, &self.path)
    }

    /// The mapped column names given the column names found in the files (selection, then
    /// renaming). Errors name the missing columns.
    pub fn map_columns(&self, available: &[String]) -> Result<Vec<String>, String> {
        let selected: Vec<String> = if self.columns.is_empty() {
            available.to_vec()
        } else {
            self.columns.clone()
        };
        let missing: Vec<&String> = selected
            .iter()
            .filter(|name| !available.contains(name))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "column(s) {} not found; available: {}",
                quote_list(missing.iter().map(|s| s.as_str())),
                available.join(", ")
            ));
        }
        Ok(selected
            .into_iter()
            .map(|name| self.rename.get(&name).cloned().unwrap_or(name))
            .collect())
    }

    fn peek_available(&self, cx: &CheckContext<'_>) -> Option<Vec<String>> {
        let files = self.files(cx.project_dir).ok()?;
        let first = files.first()?;
        cx.probe.input_columns(&first.path, self.format).ok()
    }
}

fn quote_list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn column_hint(name: &str, available: &[String]) -> String {
    let list = available.join(", ");
    match did_you_mean(name, available.iter().map(String::as_str)) {
        Some(close) => format!("did you mean `{close}`? available columns: {list}"),
        None => format!("available columns: {list}"),
    }
}

impl StageSpec for IngestConfig {
    fn upstream(&self) -> Vec<UpstreamRef> {
        vec![]
    }

    fn input_files(&self, project_dir: &Path) -> Result<Vec<InputFile>, String> {
        self.files(project_dir)
    }

    fn output_columns(&self, cx: &CheckContext<'_>, _stage: &str) -> Option<Vec<String>> {
        let available = self.peek_available(cx)?;
        self.map_columns(&available).ok()
    }

    fn check(&self, cx: &CheckContext<'_>, at: &str, problems: &mut Vec<Problem>) {
        check_split(&self.split, &format!("{at}.split"), problems);

        let files = match self.files(cx.project_dir) {
            Ok(files) => files,
            Err(message) => {
                problems.push(Problem::new(format!("{at}.path"), message).about_value().with_hint(
                    "paths are relative to the pipeline file; globs and directories of shards work",
                ));
                return;
            }
        };
        let Some(first) = files.first() else {
            return;
        };
        let available = match cx.probe.input_columns(&first.path, self.format) {
            Ok(columns) => columns,
            Err(message) => {
                problems.push(Problem::new(format!("{at}.path"), message).about_value());
                return;
            }
        };

        for (index, name) in self.columns.iter().enumerate() {
            if !available.contains(name) {
                problems.push(
                    Problem::new(
                        format!("{at}.columns[{index}]"),
                        format!("column `{name}` is not in {}", first.key),
                    )
                    .about_value()
                    .with_hint(column_hint(name, &available)),
                );
            }
        }
        let selected: Vec<String> = if self.columns.is_empty() {
            available.clone()
        } else {
            self.columns.clone()
        };
        for old in self.rename.keys() {
            if !selected.contains(old) {
                problems.push(
                    Problem::new(
                        format!("{at}.rename.{old}"),
                        format!("renamed column `{old}` is not among the selected columns"),
                    )
                    .about_value()
                    .with_hint(column_hint(old, &selected)),
                );
            }
        }
        // A name the file itself gives to two selected columns (a CSV header `text,,text`) is the
        // file's fault, not the stage's: say which file.
        let mut file_duplicates = std::collections::BTreeSet::new();
        for name in &selected {
            if available.iter().filter(|column| *column == name).count() > 1
                && file_duplicates.insert(name.clone())
            {
                problems.push(
                    Problem::new(
                        format!("{at}.path"),
                        format!("{} has more than one column named `{name}`", first.key),
                    )
                    .about_value()
                    .with_hint(
                        "columns must have distinct names: fix the file's header, or select other columns with `columns:`",
                    ),
                );
            }
        }
        check_types(self, &files, &selected, &format!("{at}.types"), problems);
        let mapped: Vec<String> = selected
            .into_iter()
            .map(|name| self.rename.get(&name).cloned().unwrap_or(name))
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        for name in &mapped {
            let from_the_file =
                file_duplicates.contains(name) && !self.rename.values().any(|new| new == name);
            if !seen.insert(name.as_str()) && !from_the_file {
                problems.push(
                    Problem::new(
                        format!("{at}.rename"),
                        format!("two output columns would be named `{name}`"),
                    )
                    .about_value(),
                );
            }
        }

        for (index, filter) in self.filters.iter().enumerate() {
            let column = filter.column();
            if !mapped.iter().any(|c| c == column) {
                problems.push(
                    Problem::new(
                        format!("{at}.filters[{index}].{}", filter.column_key()),
                        format!("filter on column `{column}`, which the stage does not output"),
                    )
                    .about_value()
                    .with_hint(column_hint(column, &mapped)),
                );
            }
            check_filter_values(filter, &format!("{at}.filters[{index}]"), problems);
        }
        for (key, message) in cx.probe.check_column_types(&first.path, self) {
            problems.push(
                Problem::new(format!("{at}.{key}"), format!("{message} ({})", first.key))
                    .about_value(),
            );
        }
        for (index, column) in self.dedup.iter().enumerate() {
            if !mapped.contains(column) {
                problems.push(
                    Problem::new(
                        format!("{at}.dedup[{index}]"),
                        format!("dedup column `{column}` is not an output column"),
                    )
                    .about_value()
                    .with_hint(column_hint(column, &mapped)),
                );
            }
        }
        if let Some(column) = &self.split.stratify_by {
            if !mapped.contains(column) {
                problems.push(
                    Problem::new(
                        format!("{at}.split.stratify_by"),
                        format!("stratify column `{column}` is not an output column"),
                    )
                    .about_value()
                    .with_hint(column_hint(column, &mapped)),
                );
            }
        }
    }
}

/// `types` names selected columns of CSV files: Parquet and JSONL carry their own types.
fn check_types(
    config: &IngestConfig,
    files: &[InputFile],
    selected: &[String],
    at: &str,
    problems: &mut Vec<Problem>,
) {
    if config.types.is_empty() {
        return;
    }
    let not_csv = files.iter().find(|file| {
        config
            .format
            .or_else(|| super::input::format_of(&file.path))
            != Some(InputFormat::Csv)
    });
    if let Some(file) = not_csv {
        problems.push(
            Problem::new(
                at,
                format!("`types` applies to CSV files, and {} is not one", file.key),
            )
            .about_value()
            .with_hint("Parquet and JSONL files carry their own column types; remove `types`"),
        );
        return;
    }
    for name in config.types.keys() {
        if !selected.contains(name) {
            problems.push(
                Problem::new(
                    format!("{at}.{name}"),
                    format!("typed column `{name}` is not among the selected columns"),
                )
                .about_value()
                .with_hint(column_hint(name, selected)),
            );
        }
    }
}

fn check_filter_values(filter: &RowFilter, at: &str, problems: &mut Vec<Problem>) {
    let scalar = |value: &serde_json::Value| {
        matches!(
            value,
            serde_json::Value::String(_)
                | serde_json::Value::Number(_)
                | serde_json::Value::Bool(_)
        )
    };
    match filter {
        RowFilter::Equals(f) | RowFilter::NotEquals(f) if !scalar(&f.value) => {
            problems.push(
                Problem::new(
                    format!("{at}.{}.value", filter.kind()),
                    "the value must be a string, number or boolean",
                )
                .about_value(),
            );
        }
        RowFilter::InSet(f) => {
            if f.values.is_empty() {
                problems.push(
                    Problem::new(
                        format!("{at}.in_set.values"),
                        "the set is empty: no row would be kept",
                    )
                    .about_value(),
                );
            }
            for (index, value) in f.values.iter().enumerate() {
                if !scalar(value) {
                    problems.push(
                        Problem::new(
                            format!("{at}.in_set.values[{index}]"),
                            "each value must be a string, number or boolean",
                        )
                        .about_value(),
                    );
                }
            }
        }
        RowFilter::Length(f) => {
            if let (Some(min), Some(max)) = (f.min, f.max) {
                if min > max {
                    problems.push(
                        Problem::new(
                            format!("{at}.length"),
                            format!("min ({min}) is greater than max ({max})"),
                        )
                        .about_value(),
                    );
                }
            }
            if f.min.is_none() && f.max.is_none() {
                problems.push(
                    Problem::new(format!("{at}.length"), "neither min nor max is given")
                        .about_value()
                        .with_hint("give `min`, `max` or both"),
                );
            }
        }
        _ => {}
    }
}

fn check_split(split: &SplitConfig, at: &str, problems: &mut Vec<Problem>) {
    if split.fractions.is_some() && split.counts.is_some() {
        problems.push(
            Problem::new(at, "both `fractions` and `counts` are given")
                .with_hint("give one: fractions that add up to 1, or eval/test row counts"),
        );
    }
    if let Some(f) = &split.fractions {
        let parts = [
            ("train", Some(f.train)),
            ("eval", Some(f.eval)),
            ("test", f.test),
        ];
        let mut total = 0.0;
        for (name, value) in parts {
            let Some(value) = value else { continue };
            if !(0.0..=1.0).contains(&value) || !value.is_finite() {
                problems.push(
                    Problem::new(
                        format!("{at}.fractions.{name}"),
                        format!("fraction {value} is not between 0 and 1"),
                    )
                    .about_value(),
                );
            }
            total += value;
        }
        if (total - 1.0).abs() > 1e-9 {
            problems.push(
                Problem::new(
                    format!("{at}.fractions"),
                    format!("split fractions add up to {total}, not 1"),
                )
                .about_value()
                .with_hint(format!(
                    "for example train: {}, eval: {}",
                    round4(1.0 - f.eval - f.test.unwrap_or(0.0)),
                    round4(f.eval)
                )),
            );
        }
        if f.train <= 0.0 {
            problems.push(
                Problem::new(
                    format!("{at}.fractions.train"),
                    "the train fraction must be greater than 0",
                )
                .about_value(),
            );
        }
    }
}

fn round4(value: f64) -> f64 {
    (value * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// YAML → JSON value → config, as the loader does (externally tagged enums as maps).
    fn from_yaml<T: serde::de::DeserializeOwned>(yaml: &str) -> Result<T, serde_json::Error> {
        let value: serde_json::Value = serde_norway::from_str(yaml).unwrap();
        serde_json::from_value(value)
    }

    fn parse(yaml: &str) -> IngestConfig {
        from_yaml(yaml).unwrap()
    }

    #[test]
    fn filters_parse_externally_tagged() {
        let config = parse(
            "path: x.parquet\nfilters:\n  - not_null: text\n  - equals: {column: label, value: positive}\n  - length: {column: text, min: 1, max: 20}\n",
        );
        assert_eq!(config.filters.len(), 3);
        assert_eq!(config.filters[0], RowFilter::NotNull("text".into()));
        assert_eq!(config.filters[1].column(), "label");
        assert_eq!(config.filters[2].describe(), "length(text, 1..=20)");
        assert!(config.shuffle);
        assert_eq!(config.split.sizes(), SplitSizes::Fractions([0.9, 0.1, 0.0]));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(from_yaml::<IngestConfig>("path: x\ndedupe: [a]\n").is_err());
        assert!(from_yaml::<IngestConfig>(
            "path: x\nfilters: [{equals: {column: a, value: 1, extra: 2}}]\n"
        )
        .is_err());
    }

    #[test]
    fn split_fractions_that_do_not_add_up_are_reported() {
        let split = SplitConfig {
            fractions: Some(SplitFractions {
                train: 0.8,
                eval: 0.3,
                test: None,
            }),
            ..SplitConfig::default()
        };
        let mut problems = Vec::new();
        check_split(&split, "stages.data.ingest.split", &mut problems);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.data.ingest.split.fractions");
        assert!(
            problems[0].message.contains("1.1"),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn map_columns_selects_then_renames() {
        let config = parse("path: x\ncolumns: [sentence, label]\nrename: {sentence: text}\n");
        let available = vec!["idx".to_string(), "sentence".into(), "label".into()];
        assert_eq!(
            config.map_columns(&available).unwrap(),
            vec!["text".to_string(), "label".into()]
        );
        let error = config.map_columns(&["idx".to_string()]).unwrap_err();
        assert!(error.contains("`sentence`") && error.contains("available: idx"));
    }
}
