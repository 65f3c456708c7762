//! Row filters and keys on record batches: evaluates the ingest stage's declarative filters into a
//! keep mask (counting the rows each filter dropped), hashes dedup keys (blake3) and reads stratum
//! values. Works one batch at a time and keeps no rows.

use std::collections::HashSet;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow::datatypes::DataType;

use crate::config::ingest::RowFilter;
use crate::stages::StageError;

/// A filter bound to a column index, with its comparison values prepared.
#[derive(Debug)]
enum Compiled {
    IsNull,
    NotNull,
    /// Keep rows whose value is one of `values` (`true`: equals, in_set) or, non-null, none of
    /// them (`false`: not_equals).
    Match(Values, bool),
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

/// Comparison values in the column's own terms: integers for an integer column, numbers for a
/// floating-point or decimal one (so `1.0` is the integer 1, `"3.00"` is 3.0), text otherwise.
#[derive(Debug)]
enum Values {
    Text(HashSet<String>),
    Integers(HashSet<i64>),
    Numbers(Vec<f64>),
}

/// A scalar JSON value as a number, if it is one or a string that reads as one.
fn number_of(value: &serde_json::Value) -> Option<f64> {
    match value {
        serde_json::Value::Number(number) => number.as_f64(),
        serde_json::Value::String(text) => text.trim().parse::<f64>().ok(),
        _ => None,
    }
}

/// The comparison values of a filter on `column` of `data_type`, checked against the type.
fn values_for(
    written: &[&serde_json::Value],
    column: &str,
    data_type: &DataType,
) -> Result<Values, String> {
    let not_scalar = |other: &serde_json::Value| {
        format!("filter on `{column}` compares with {other}; use a string, number or boolean")
    };
    if data_type.is_integer() {
        let mut integers = HashSet::new();
        for value in written {
            if !matches!(
                value,
                serde_json::Value::Number(_) | serde_json::Value::String(_)
            ) {
                return Err(not_scalar(value));
            }
            let integer = match value {
                serde_json::Value::Number(number) if number.as_i64().is_some() => number.as_i64(),
                serde_json::Value::String(text) if text.trim().parse::<i64>().is_ok() => {
                    text.trim().parse::<i64>().ok()
                }
                _ => number_of(value)
                    .filter(|number| number.fract() == 0.0 && number.abs() < 9.0e15)
                    .map(|number| number as i64),
            };
            match integer {
                Some(integer) => {
                    integers.insert(integer);
                }
                None => {
                    return Err(format!(
                        "column `{column}` is {data_type} but the filter compares it with {value}, which no integer equals"
                    ))
                }
            }
        }
        return Ok(Values::Integers(integers));
    }
    if data_type.is_numeric() {
        let mut numbers = Vec::with_capacity(written.len());
        for value in written {
            match number_of(value) {
                Some(number) if !number.is_nan() => numbers.push(number),
                _ if !matches!(
                    value,
                    serde_json::Value::Number(_) | serde_json::Value::String(_)
                ) =>
                {
                    return Err(not_scalar(value))
                }
                _ => {
                    return Err(format!(
                        "column `{column}` is {data_type} but the filter compares it with {value}, which is not a number"
                    ))
                }
            }
        }
        return Ok(Values::Numbers(numbers));
    }
    let mut texts = HashSet::new();
    for value in written {
        let text = match value {
            serde_json::Value::String(text) => {
                if *data_type == DataType::Boolean && text != "true" && text != "false" {
                    return Err(format!(
                        "column `{column}` is Boolean but the filter compares it with the string {value}"
                    ));
                }
                text.clone()
            }
            serde_json::Value::Number(number) => number.to_string(),
            serde_json::Value::Bool(flag) => flag.to_string(),
            other => return Err(not_scalar(other)),
        };
        texts.insert(text);
    }
    Ok(Values::Text(texts))
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
                RowFilter::Equals(f) => Compiled::Match(
                    values_for(&[&f.value], name, data_type).map_err(StageError::User)?,
                    true,
                ),
                RowFilter::NotEquals(f) => Compiled::Match(
                    values_for(&[&f.value], name, data_type).map_err(StageError::User)?,
                    false,
                ),
                RowFilter::InSet(f) => Compiled::Match(
                    values_for(&f.values.iter().collect::<Vec<_>>(), name, data_type)
                        .map_err(StageError::User)?,
                    true,
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
    Ok(match filter {
        Compiled::IsNull => arrow::compute::is_null(column).map_err(|e| e.to_string())?,
        Compiled::NotNull => arrow::compute::is_not_null(column).map_err(|e| e.to_string())?,
        Compiled::Match(values, keep_matching) => {
            // Whether each row's value is among `values` (`None`: null, dropped either way).
            let found: Vec<Option<bool>> = match values {
                Values::Text(texts) => as_text(column)?
                    .iter()
                    .map(|v| v.map(|v| texts.contains(v)))
                    .collect(),
                Values::Integers(integers) => {
                    let cast = arrow::compute::cast(column, &DataType::Int64)
                        .map_err(|e| e.to_string())?;
                    let cast = cast
                        .as_any()
                        .downcast_ref::<arrow::array::Int64Array>()
                        .ok_or_else(|| format!("cannot read {} as integers", column.data_type()))?
                        .clone();
                    // A value too large for i64 (UInt64) casts to null: compare it as text.
                    let text = as_text(column)?;
                    cast.iter()
                        .zip(text.iter())
                        .map(|(integer, text)| match (integer, text) {
                            (Some(integer), _) => Some(integers.contains(&integer)),
                            (None, Some(_)) => Some(false),
                            (None, None) => None,
                        })
                        .collect()
                }
                Values::Numbers(numbers) => {
                    let cast = arrow::compute::cast(column, &DataType::Float64)
                        .map_err(|e| e.to_string())?;
                    cast.as_any()
                        .downcast_ref::<arrow::array::Float64Array>()
                        .ok_or_else(|| format!("cannot read {} as numbers", column.data_type()))?
                        .iter()
                        .map(|v| v.map(|v| numbers.contains(&v)))
                        .collect()
                }
            };
            BooleanArray::from_iter(
                found
                    .into_iter()
                    .map(|found| Some(found.is_some_and(|found| found == *keep_matching))),
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

    fn kept(filter: RowFilter, batch: &RecordBatch) -> Vec<bool> {
        let filters = RowFilters::compile(&[filter], false, &batch.schema()).unwrap();
        let outcome = filters.apply(batch).unwrap();
        outcome.keep.iter().map(|v| v.unwrap()).collect()
    }

    #[test]
    fn numeric_columns_compare_numbers_not_their_text() {
        use arrow::array::Float64Array;
        let schema = Arc::new(Schema::new(vec![
            Field::new("label", DataType::Int64, true),
            Field::new("score", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![Some(0), Some(1), Some(1), None])),
                Arc::new(Float64Array::from(vec![
                    Some(1.0),
                    Some(2.0),
                    Some(3.0),
                    Some(4.5),
                ])),
            ],
        )
        .unwrap();
        let set = |column: &str, values: serde_json::Value| {
            RowFilter::InSet(SetFilter {
                column: column.into(),
                values: serde_json::from_value(values).unwrap(),
            })
        };
        // `1.0` and `"1"` are the integer 1 (before: `1.0` matched no row).
        assert_eq!(
            kept(set("label", serde_json::json!([0, 1.0])), &batch),
            [true, true, true, false]
        );
        assert_eq!(
            kept(set("label", serde_json::json!(["1"])), &batch),
            [false, true, true, false]
        );
        // `1` and `"3.00"` are the floats 1.0 and 3.0 (before: neither matched).
        assert_eq!(
            kept(
                set("score", serde_json::json!([1, 2.0, "3.00", 4.5])),
                &batch
            ),
            [true, true, true, true]
        );
        let equals = |column: &str, value: serde_json::Value, keep: bool| {
            let filter = ValueFilter {
                column: column.into(),
                value,
            };
            if keep {
                RowFilter::Equals(filter)
            } else {
                RowFilter::NotEquals(filter)
            }
        };
        assert_eq!(
            kept(equals("score", serde_json::json!(2), true), &batch),
            [false, true, false, false]
        );
        // Not equal: nulls are dropped too.
        assert_eq!(
            kept(equals("label", serde_json::json!(1.0), false), &batch),
            [true, false, false, false]
        );
        // No integer equals 1.5: a mistake, said before any row is read.
        let error = RowFilters::compile(
            &[equals("label", serde_json::json!(1.5), true)],
            false,
            &batch.schema(),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("Int64") && error.to_string().contains("1.5"),
            "{error}"
        );
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
