//! Row filters and keys on record batches: evaluates the ingest stage's declarative filters into a
//! keep mask (counting the rows each filter dropped), hashes dedup keys (blake3) and reads stratum
//! values. Works one batch at a time and keeps no rows.

use std::collections::HashSet;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow::datatypes::DataType;
use arrow::row::{RowConverter, SortField};

use crate::config::ingest::{CsvType, RowFilter};
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
    Integers(HashSet<i128>),
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

/// The values an integer type holds.
fn integer_range(data_type: &DataType) -> (i128, i128) {
    match data_type {
        DataType::Int8 => (i128::from(i8::MIN), i128::from(i8::MAX)),
        DataType::Int16 => (i128::from(i16::MIN), i128::from(i16::MAX)),
        DataType::Int32 => (i128::from(i32::MIN), i128::from(i32::MAX)),
        DataType::UInt8 => (0, i128::from(u8::MAX)),
        DataType::UInt16 => (0, i128::from(u16::MAX)),
        DataType::UInt32 => (0, i128::from(u32::MAX)),
        DataType::UInt64 => (0, i128::from(u64::MAX)),
        _ => (i128::from(i64::MIN), i128::from(i64::MAX)),
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
        let (least, most) = integer_range(data_type);
        let mut integers = HashSet::new();
        for value in written {
            let whole = |number: f64| {
                (number.is_finite() && number.fract() == 0.0 && number.abs() < 1.0e38)
                    .then_some(number as i128)
            };
            let integer = match value {
                serde_json::Value::Number(number) => number
                    .as_i64()
                    .map(i128::from)
                    .or(number.as_u64().map(i128::from))
                    .or_else(|| number.as_f64().and_then(whole)),
                serde_json::Value::String(text) => text
                    .trim()
                    .parse::<i128>()
                    .ok()
                    .or_else(|| text.trim().parse::<f64>().ok().and_then(whole)),
                other => return Err(not_scalar(other)),
            };
            match integer {
                Some(integer) if (least..=most).contains(&integer) => {
                    integers.insert(integer);
                }
                Some(_) => {
                    return Err(format!(
                        "column `{column}` is {data_type} but the filter compares it with {value}, outside the type's range {least}..={most}"
                    ))
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
        // Compared in the column's own precision: 0.1 on a Float32 column is the f32 nearest
        // 0.1, as the column stores it.
        let stored = |number: f64| match data_type {
            DataType::Float16 => half::f16::from_f64(number).to_f64(),
            DataType::Float32 => f64::from(number as f32),
            _ => number,
        };
        let mut numbers = Vec::with_capacity(written.len());
        for value in written {
            match number_of(value) {
                Some(number) if !number.is_nan() => numbers.push(stored(number)),
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
    if *data_type == DataType::Boolean {
        if let Some(value) = written
            .iter()
            .find(|value| matches!(value, serde_json::Value::Number(_)))
        {
            return Err(format!(
                "column `{column}` is Boolean but the filter compares it with the number {value}: write true or false"
            ));
        }
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
                    // Every integer type, u64 included, as a 20-digit decimal: one i128 array.
                    let cast = arrow::compute::cast(column, &DataType::Decimal128(20, 0))
                        .map_err(|e| e.to_string())?;
                    cast.as_any()
                        .downcast_ref::<arrow::array::Decimal128Array>()
                        .ok_or_else(|| format!("cannot read {} as integers", column.data_type()))?
                        .iter()
                        .map(|v| v.map(|v| integers.contains(&v)))
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

/// Filters that compare a CSV column read as text (one `types` does not name) with a number or
/// a boolean, as (filter index, message). Compared as text, `3` would miss a cell written `3.0`
/// or `03`: the user says which is meant, with `types` or by writing the value as a string.
/// `rename` maps file names to output names, `types` is keyed by file names.
pub fn csv_text_filter_problems(
    filters: &[RowFilter],
    rename: &indexmap::IndexMap<String, String>,
    types: &indexmap::IndexMap<String, CsvType>,
) -> Vec<(usize, String)> {
    let mut problems = Vec::new();
    for (index, filter) in filters.iter().enumerate() {
        let values: Vec<&serde_json::Value> = match filter {
            RowFilter::Equals(f) | RowFilter::NotEquals(f) => vec![&f.value],
            RowFilter::InSet(f) => f.values.iter().collect(),
            _ => continue,
        };
        let column = filter.column();
        let file_name = rename
            .iter()
            .find(|(_, new)| new.as_str() == column)
            .map_or(column, |(old, _)| old.as_str());
        if types.contains_key(file_name) {
            continue;
        }
        let Some(value) = values.iter().find(|value| !value.is_string()) else {
            continue;
        };
        let (kind, csv_type, examples) = match value {
            serde_json::Value::Bool(_) => ("boolean", CsvType::Boolean, "`True` or `TRUE`"),
            serde_json::Value::Number(number) if number.is_f64() => {
                ("number", CsvType::Float64, "`1.50` or `01.5`")
            }
            _ => ("number", CsvType::Int64, "`01` or `1.0`"),
        };
        problems.push((
            index,
            format!(
                "column `{column}` is read from CSV as text, so the {kind} {value} would be compared with the text \"{value}\" (a cell written {examples} would not match): give the column a type with `types: {{{file_name}: {}}}`{}, or write the value as the string \"{value}\"",
                csv_type.name(),
                if csv_type == CsvType::Int64 {
                    " (float64 if its cells hold fractions)"
                } else {
                    ""
                }
            ),
        ));
    }
    problems
}

/// Hashes the values of the key columns of each row (blake3 of Arrow's row format, truncated to
/// 128 bits). The row format encodes each value exactly, by its type: a list `["a, b"]` differs
/// from `["a", "b"]`, `[null]` from `[""]`, a null from any value (nulls equal only nulls), and
/// binary values are compared as bytes (not as text, which turned every non-UTF-8 value into a
/// null). Each column's encoding is self-delimiting, so `("ab", "c")` and `("a", "bc")` differ.
pub fn key_hashes(batch: &RecordBatch, key_columns: &[usize]) -> Result<Vec<u128>, StageError> {
    let columns: Vec<ArrayRef> = key_columns
        .iter()
        .map(|&index| batch.column(index).clone())
        .collect();
    let converter = RowConverter::new(
        columns
            .iter()
            .map(|column| SortField::new(column.data_type().clone()))
            .collect(),
    )
    .map_err(|e| StageError::user(format!("cannot compare dedup keys: {e}")))?;
    let rows = converter
        .convert_columns(&columns)
        .map_err(|e| StageError::user(format!("cannot compare dedup keys: {e}")))?;
    let mut hashes = Vec::with_capacity(batch.num_rows());
    for row in rows.iter() {
        let digest = blake3::hash(row.as_ref());
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest.as_bytes()[..16]);
        hashes.push(u128::from_le_bytes(first));
    }
    Ok(hashes)
}

/// Whether rows can be compared by a column of this type for `dedup`.
pub fn dedup_supports(data_type: &DataType) -> bool {
    RowConverter::supports_fields(&[SortField::new(data_type.clone())])
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
    fn numbers_compare_in_the_columns_own_type_and_range() {
        use arrow::array::{BooleanArray as Bools, Float32Array, UInt64Array, UInt8Array};
        let schema = Arc::new(Schema::new(vec![
            Field::new("f32", DataType::Float32, true),
            Field::new("u64", DataType::UInt64, true),
            Field::new("i64", DataType::Int64, true),
            Field::new("u8", DataType::UInt8, true),
            Field::new("flag", DataType::Boolean, true),
        ]));
        let big = (1u64 << 63) + 1;
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Float32Array::from(vec![0.1f32, 0.3, 0.5])),
                Arc::new(UInt64Array::from(vec![big, 1, 2])),
                Arc::new(Int64Array::from(vec![1i64 << 53, 0, 1])),
                Arc::new(UInt8Array::from(vec![1u8, 2, 255])),
                Arc::new(Bools::from(vec![true, false, true])),
            ],
        )
        .unwrap();
        let equals = |column: &str, value: serde_json::Value| {
            RowFilter::Equals(ValueFilter {
                column: column.into(),
                value,
            })
        };
        // 0.1 on a Float32 column is the f32 nearest 0.1 (before: no row matched).
        assert_eq!(
            kept(equals("f32", serde_json::json!(0.1)), &batch),
            [true, false, false]
        );
        assert_eq!(
            kept(
                RowFilter::InSet(SetFilter {
                    column: "f32".into(),
                    values: vec![serde_json::json!("0.3"), serde_json::json!(0.5)],
                }),
                &batch
            ),
            [false, true, true]
        );
        // Past i64 on a UInt64 column, and a whole float past 2^53 (before: refused).
        assert_eq!(
            kept(equals("u64", serde_json::json!(big)), &batch),
            [true, false, false]
        );
        assert_eq!(
            kept(equals("i64", serde_json::json!(9007199254740992.0)), &batch),
            [true, false, false]
        );
        // Outside the type's range, or a number against booleans: said before any row is read.
        for (column, value) in [
            ("u8", serde_json::json!(300)),
            ("u8", serde_json::json!(-1)),
            ("flag", serde_json::json!(1)),
        ] {
            let error =
                RowFilters::compile(&[equals(column, value.clone())], false, &batch.schema())
                    .unwrap_err()
                    .to_string();
            assert!(error.contains(&value.to_string()), "{error}");
        }
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
