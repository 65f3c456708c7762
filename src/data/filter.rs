//! Row filters and keys on record batches: evaluates the ingest stage's declarative filters into a
//! keep mask (counting the rows each filter dropped), hashes dedup keys (blake3) and reads stratum
//! values. Works one batch at a time and keeps no rows.

use std::collections::HashSet;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow::compute::kernels::cmp;
use arrow::datatypes::DataType;

use crate::config::ingest::RowFilter;
use crate::stages::StageError;

/// A filter bound to a column index, with its comparison values prepared.
#[derive(Debug)]
enum Compiled {
    IsNull,
    NotNull,
    Equals(String, bool),
    InSet(HashSet<String>),
    Length(Option<u64>, Option<u64>),
}

/// The ingest filters compiled against the mapped schema.
#[derive(Debug)]
pub struct RowFilters {
    filters: Vec<(usize, Compiled, String)>,
    drop_nulls: bool,
}

/// What filtering one batch gave.
#[derive(Debug)]
pub struct FilterOutcome {
    /// Rows every filter accepted.
    pub keep: BooleanArray,
    /// Rows each filter dropped (a row is counted by the first filter that drops it).
    pub dropped_by_filter: Vec<u64>,
    /// Rows dropped by `drop_nulls` (after the filters).
    pub dropped_by_nulls: u64,
}

/// The text form of a scalar JSON value, checked against the column's type.
fn text_value(
    value: &serde_json::Value,
    column: &str,
    data_type: &DataType,
) -> Result<String, String> {
    let numeric = data_type.is_numeric();
    match value {
        serde_json::Value::String(text) => {
            if numeric && text.parse::<f64>().is_err() {
                return Err(format!(
                    "column `{column}` is {data_type} but the filter compares it with the string {value}"
                ));
            }
            if *data_type == DataType::Boolean && text != "true" && text != "false" {
                return Err(format!(
                    "column `{column}` is Boolean but the filter compares it with the string {value}"
                ));
            }
            Ok(text.clone())
        }
        serde_json::Value::Number(number) => Ok(number.to_string()),
        serde_json::Value::Bool(flag) => Ok(flag.to_string()),
        other => Err(format!(
            "filter on `{column}` compares with {other}; use a string, number or boolean"
        )),
    }
}

impl RowFilters {
    /// Bind filters to the columns of `schema`. Errors name the filter and the column.
    pub fn compile(
        filters: &[RowFilter],
        drop_nulls: bool,
        schema: &arrow::datatypes::Schema,
    ) -> Result<Self, StageError> {
        let mut compiled = Vec::with_capacity(filters.len());
        for filter in filters {
            let name = filter.column();
            let index = schema.index_of(name).map_err(|_| {
                let available: Vec<&str> =
                    schema.fields().iter().map(|f| f.name().as_str()).collect();
                StageError::user(format!(
                    "filter {}: column `{name}` is not an output column; available: {}",
                    filter.describe(),
                    available.join(", ")
                ))
            })?;
            let data_type = schema.field(index).data_type();
            let prepared = match filter {
                RowFilter::IsNull(_) => Compiled::IsNull,
                RowFilter::NotNull(_) => Compiled::NotNull,
                RowFilter::Equals(f) => Compiled::Equals(
                    text_value(&f.value, name, data_type).map_err(StageError::User)?,
                    true,
                ),
                RowFilter::NotEquals(f) => Compiled::Equals(
                    text_value(&f.value, name, data_type).map_err(StageError::User)?,
                    false,
                ),
                RowFilter::InSet(f) => Compiled::InSet(
                    f.values
                        .iter()
                        .map(|v| text_value(v, name, data_type))
                        .collect::<Result<_, _>>()
                        .map_err(StageError::User)?,
                ),
                RowFilter::Length(f) => {
                    if !matches!(
                        data_type,
                        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                    ) {
                        return Err(StageError::user(format!(
                            "filter {}: column `{name}` is {data_type}, not a string",
                            filter.describe()
                        )));
                    }
                    Compiled::Length(f.min, f.max)
                }
            };
            compiled.push((index, prepared, filter.describe()));
        }
        Ok(RowFilters {
            filters: compiled,
            drop_nulls,
        })
    }

    /// Descriptions of the filters, in order (for stats).
    pub fn descriptions(&self) -> Vec<String> {
        self.filters.iter().map(|(_, _, d)| d.clone()).collect()
    }

    /// Evaluate every filter on a batch.
    pub fn apply(&self, batch: &RecordBatch) -> Result<FilterOutcome, StageError> {
        let rows = batch.num_rows();
        let mut keep = BooleanArray::from(vec![true; rows]);
        let mut dropped_by_filter = Vec::with_capacity(self.filters.len());
        for (index, filter, description) in &self.filters {
            let column = batch.column(*index);
            let mask = evaluate(column, filter)
                .map_err(|e| StageError::user(format!("filter {description}: {e}")))?;
            let before = keep.true_count();
            keep = arrow::compute::and(&keep, &mask)
                .map_err(|e| StageError::Internal(e.to_string()))?;
            dropped_by_filter.push((before - keep.true_count()) as u64);
        }
        let mut dropped_by_nulls = 0;
        if self.drop_nulls {
            let before = keep.true_count();
            for column in batch.columns() {
                if column.null_count() > 0 {
                    let present = arrow::compute::is_not_null(column)
                        .map_err(|e| StageError::Internal(e.to_string()))?;
                    keep = arrow::compute::and(&keep, &present)
                        .map_err(|e| StageError::Internal(e.to_string()))?;
                }
            }
            dropped_by_nulls = (before - keep.true_count()) as u64;
        }
        // Normalize: a null in the mask means "drop".
        let keep = if keep.null_count() > 0 {
            BooleanArray::from_iter(keep.iter().map(|v| Some(v.unwrap_or(false))))
        } else {
            keep
        };
        Ok(FilterOutcome {
            keep,
            dropped_by_filter,
            dropped_by_nulls,
        })
    }
}

/// A column as UTF-8 text (numbers and booleans in their canonical text form).
pub fn as_text(column: &ArrayRef) -> Result<StringArray, String> {
    let cast = arrow::compute::cast(column, &DataType::Utf8).map_err(|e| e.to_string())?;
    cast.as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .ok_or_else(|| format!("cannot read {} as text", column.data_type()))
}

fn evaluate(column: &ArrayRef, filter: &Compiled) -> Result<BooleanArray, String> {
    let nulls_false = |mask: BooleanArray| {
        if mask.null_count() > 0 {
            BooleanArray::from_iter(mask.iter().map(|v| Some(v.unwrap_or(false))))
        } else {
            mask
        }
    };
    Ok(match filter {
        Compiled::IsNull => arrow::compute::is_null(column).map_err(|e| e.to_string())?,
        Compiled::NotNull => arrow::compute::is_not_null(column).map_err(|e| e.to_string())?,
        Compiled::Equals(value, equal) => {
            let text = as_text(column)?;
            let scalar = StringArray::new_scalar(value.as_str());
            let mask = if *equal {
                cmp::eq(&text, &scalar)
            } else {
                cmp::neq(&text, &scalar)
            }
            .map_err(|e| e.to_string())?;
            nulls_false(mask)
        }
        Compiled::InSet(values) => {
            let text = as_text(column)?;
            BooleanArray::from_iter(
                text.iter()
                    .map(|v| Some(v.is_some_and(|v| values.contains(v)))),
            )
        }
        Compiled::Length(min, max) => {
            let text = as_text(column)?;
            BooleanArray::from_iter(text.iter().map(|v| {
                Some(v.is_some_and(|v| {
                    let length = v.chars().count() as u64;
                    min.is_none_or(|m| length >= m) && max.is_none_or(|m| length <= m)
                }))
            }))
        }
    })
}

/// Hashes the values of the key columns of each row (blake3, truncated to 128 bits), with a
/// null marker and length prefixes so `("ab", "c")` and `("a", "bc")` differ.
pub fn key_hashes(batch: &RecordBatch, key_columns: &[usize]) -> Result<Vec<u128>, StageError> {
    let texts: Vec<StringArray> = key_columns
        .iter()
        .map(|&index| as_text(batch.column(index)))
        .collect::<Result<_, _>>()
        .map_err(StageError::User)?;
    let mut hashes = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        let mut hasher = blake3::Hasher::new();
        for text in &texts {
            if text.is_null(row) {
                hasher.update(&[0u8]);
            } else {
                let value = text.value(row);
                hasher.update(&[1u8]);
                hasher.update(&(value.len() as u64).to_le_bytes());
                hasher.update(value.as_bytes());
            }
        }
        let digest = hasher.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest.as_bytes()[..16]);
        hashes.push(u128::from_le_bytes(first));
    }
    Ok(hashes)
}

/// The value of the stratify column for each row, as text (`null` for nulls).
pub fn stratum_values(batch: &RecordBatch, column: usize) -> Result<StringArray, StageError> {
    as_text(batch.column(column)).map_err(StageError::User)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{Field, Schema};

    use super::*;
    use crate::config::ingest::{LengthFilter, SetFilter, ValueFilter};

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("text", DataType::Utf8, true),
            Field::new("label", DataType::Int64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![
                    Some("good"),
                    None,
                    Some("bad movie"),
                    Some("ok"),
                ])),
                Arc::new(Int64Array::from(vec![Some(1), Some(0), None, Some(1)])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn filters_count_the_rows_each_one_drops() {
        let batch = batch();
        let filters = RowFilters::compile(
            &[
                RowFilter::NotNull("text".into()),
                RowFilter::Length(LengthFilter {
                    column: "text".into(),
                    min: Some(3),
                    max: None,
                }),
            ],
            true,
            &batch.schema(),
        )
        .unwrap();
        let outcome = filters.apply(&batch).unwrap();
        assert_eq!(outcome.dropped_by_filter, vec![1, 1]);
        assert_eq!(outcome.dropped_by_nulls, 1);
        let kept: Vec<bool> = outcome.keep.iter().map(|v| v.unwrap()).collect();
        assert_eq!(kept, vec![true, false, false, false]);
    }

    #[test]
    fn equality_and_sets_compare_text_forms_and_check_types() {
        let batch = batch();
        let filters = RowFilters::compile(
            &[RowFilter::Equals(ValueFilter {
                column: "label".into(),
                value: serde_json::json!(1),
            })],
            false,
            &batch.schema(),
        )
        .unwrap();
        assert_eq!(filters.apply(&batch).unwrap().keep.true_count(), 2);
        let error = RowFilters::compile(
            &[RowFilter::InSet(SetFilter {
                column: "label".into(),
                values: vec![serde_json::json!("positive")],
            })],
            false,
            &batch.schema(),
        )
        .unwrap_err();
        assert!(error.to_string().contains("Int64"), "{error}");
    }

    #[test]
    fn key_hashes_distinguish_column_boundaries_and_nulls() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Utf8, true),
            Field::new("b", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![
                    Some("ab"),
                    Some("a"),
                    Some("ab"),
                    None,
                ])),
                Arc::new(StringArray::from(vec![
                    Some("c"),
                    Some("bc"),
                    Some("c"),
                    Some(""),
                ])),
            ],
        )
        .unwrap();
        let hashes = key_hashes(&batch, &[0, 1]).unwrap();
        assert_ne!(hashes[0], hashes[1]);
        assert_eq!(hashes[0], hashes[2]);
        assert_ne!(hashes[3], hashes[1]);
    }
}
