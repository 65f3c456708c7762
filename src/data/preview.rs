//! The first rows of an ingest or template artifact, for `peftpipe preview`: template rows as
//! their rendered prompt and completion (read back from the artifact, not re-rendered) plus the
//! carried columns, ingest rows as their columns shown as text.
//!
//! Reads one split file of an artifact directory the caller found (in the cache or an output
//! directory); it never runs a stage and never prints.

use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use serde::Serialize;

use super::source::{is_string, parquet_row_count, read_artifact};
use crate::stages::StageError;

/// Where the previewed artifact came from.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum PreviewSource {
    /// The stage was fresh: read from the cache, nothing ran.
    Cache,
    /// These stages were stale and ran first (through the executor, into the cache).
    Ran { stages: Vec<String> },
}

/// Rows shown by `peftpipe preview`.
#[derive(Debug, Clone, Serialize)]
pub struct Preview {
    pub stage: String,
    pub kind: String,
    pub split: String,
    /// Rows in the previewed split.
    pub split_rows: u64,
    #[serde(flatten)]
    pub source: PreviewSource,
    pub rows: Vec<PreviewRow>,
}

/// One previewed row: the rendered prompt and completion (template stages) and the other
/// columns as text (for template stages, the carried ones; `text` = prompt + completion is left
/// out).
#[derive(Debug, Clone, Serialize)]
pub struct PreviewRow {
    pub index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
    pub columns: Vec<(String, String)>,
}

/// The first `count` rows of `dir/<split>.parquet`, an artifact of the stage `stage` of kind
/// `kind` (`ingest` or `template`).
pub fn read_rows(
    dir: &Path,
    stage: &str,
    kind: &str,
    split: &str,
    count: usize,
    source: PreviewSource,
) -> Result<Preview, StageError> {
    let path = dir.join(format!("{split}.parquet"));
    if !path.is_file() {
        let written: Vec<String> = ["train", "eval", "test"]
            .iter()
            .filter(|name| dir.join(format!("{name}.parquet")).is_file())
            .map(|name| name.to_string())
            .collect();
        return Err(StageError::user(format!(
            "stage `{stage}` wrote no `{split}` split; it wrote: {}",
            written.join(", ")
        )));
    }
    let split_rows = parquet_row_count(&path)?;
    let mut rows = Vec::new();
    read_artifact(&path, |batch| {
        if rows.len() < count {
            let take = (count - rows.len()).min(batch.num_rows());
            let first = rows.len() as u64;
            rows.extend(preview_rows(
                &batch.slice(0, take),
                first,
                kind == "template",
            )?);
        }
        Ok(())
    })?;
    Ok(Preview {
        stage: stage.to_string(),
        kind: kind.to_string(),
        split: split.to_string(),
        split_rows,
        source,
        rows,
    })
}

fn preview_rows(
    batch: &RecordBatch,
    first: u64,
    rendered: bool,
) -> Result<Vec<PreviewRow>, StageError> {
    let schema = batch.schema();
    let text_column = |name: &str| -> Result<Option<&arrow::array::StringArray>, StageError> {
        if !rendered {
            return Ok(None);
        }
        let index = schema.index_of(name).map_err(|_| {
            StageError::user(format!("the template artifact has no `{name}` column"))
        })?;
        let column = batch.column(index);
        if !is_string(column.as_ref()) {
            return Err(StageError::user(format!(
                "column `{name}` of the template artifact is {}, not text",
                column.data_type()
            )));
        }
        Ok(column.as_string_opt::<i32>())
    };
    let prompts = text_column("prompt")?;
    let completions = text_column("completion")?;
    let mut rows = Vec::with_capacity(batch.num_rows());
    for index in 0..batch.num_rows() {
        let cell = |array: Option<&arrow::array::StringArray>| {
            array.map(|array| {
                if array.is_null(index) {
                    String::new()
                } else {
                    array.value(index).to_string()
                }
            })
        };
        let columns = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .filter(|(field, _)| {
                !rendered || !["prompt", "completion", "text"].contains(&field.name().as_str())
            })
            .map(|(field, column)| {
                let text = if column.is_null(index) {
                    "null".to_string()
                } else {
                    arrow::util::display::array_value_to_string(column, index).unwrap_or_default()
                };
                (field.name().clone(), text)
            })
            .collect();
        rows.push(PreviewRow {
            index: first + index as u64,
            prompt: cell(prompts),
            completion: cell(completions),
            columns,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::data::artifact::ParquetSink;

    fn write(dir: &Path, name: &str, columns: &[(&str, Vec<Option<&str>>)]) {
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|(name, _)| Field::new(*name, DataType::Utf8, true))
                .collect::<Vec<_>>(),
        ));
        let arrays = columns
            .iter()
            .map(|(_, values)| Arc::new(StringArray::from(values.clone())) as _)
            .collect();
        let batch = RecordBatch::try_new(schema.clone(), arrays).unwrap();
        let mut sink = ParquetSink::create(&dir.join(name), schema, true).unwrap();
        sink.write(&batch).unwrap();
        sink.finish().unwrap();
    }

    #[test]
    fn template_rows_show_prompt_completion_and_carried_columns() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "train.parquet",
            &[
                (
                    "prompt",
                    vec![Some("Q: a\nA:"), Some("Q: b\nA:"), Some("Q: c\nA:")],
                ),
                ("completion", vec![Some(" x"), Some(" y"), Some(" z")]),
                (
                    "text",
                    vec![Some("Q: a\nA: x"), Some("Q: b\nA: y"), Some("Q: c\nA: z")],
                ),
                ("label", vec![Some("x"), None, Some("z")]),
            ],
        );
        let preview = read_rows(
            dir.path(),
            "p",
            "template",
            "train",
            2,
            PreviewSource::Cache,
        )
        .unwrap();
        assert_eq!(preview.split_rows, 3);
        assert_eq!(preview.rows.len(), 2);
        assert_eq!(preview.rows[1].prompt.as_deref(), Some("Q: b\nA:"));
        assert_eq!(preview.rows[1].completion.as_deref(), Some(" y"));
        assert_eq!(
            preview.rows[1].columns,
            vec![("label".to_string(), "null".to_string())]
        );
        let missing = read_rows(dir.path(), "p", "template", "eval", 2, PreviewSource::Cache);
        assert!(missing.unwrap_err().to_string().contains("it wrote: train"));
    }

    #[test]
    fn ingest_rows_show_every_column() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "eval.parquet", &[("text", vec![Some("hello")])]);
        let preview =
            read_rows(dir.path(), "d", "ingest", "eval", 5, PreviewSource::Cache).unwrap();
        assert_eq!(preview.rows.len(), 1);
        assert!(preview.rows[0].prompt.is_none());
        assert_eq!(
            preview.rows[0].columns,
            vec![("text".to_string(), "hello".to_string())]
        );
    }
}
