//! minijinja rendering of rows: rows of record batches exposed to templates lazily (a column is
//! converted only when a template reads it), one rendering bounded by the stage's
//! `limits.max_row_bytes` (its fuel is the environment's), and error messages that name the row
//! and the undefined or null variable, or the limit a rendering crossed.
//!
//! The strict environment every row template uses (its rules are documented there) is the core's
//! `config::jinja`, re-exported here, so validation checks templates under the same rules.
//! Never prints.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type,
    UInt32Type, UInt64Type, UInt8Type,
};
use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use minijinja::{Error, ErrorKind};

pub use crate::config::jinja::{
    row_environment, undeclared_variables, Includes, RenderLimits, BUILTIN_NAMES,
};

/// The columns of one record batch, shared by the rows rendered from it.
#[derive(Debug)]
pub struct BatchColumns {
    index: HashMap<String, usize>,
    names: Vec<String>,
    arrays: Vec<ArrayRef>,
}

impl BatchColumns {
    pub fn new(batch: &RecordBatch) -> Arc<Self> {
        let schema = batch.schema();
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        Arc::new(BatchColumns {
            index: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i))
                .collect(),
            names,
            arrays: batch.columns().to_vec(),
        })
    }

    pub fn len(&self) -> usize {
        self.arrays.first().map_or(0, |a| a.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A column's cell as a template value (None: no such column).
    pub fn cell(&self, column: &str, row: usize) -> Option<Value> {
        let index = *self.index.get(column)?;
        Some(column_cell_value(self.arrays[index].as_ref(), row, column))
    }

    /// All cells of a row as an owned map (for few-shot demonstrations kept across batches).
    pub fn row_map(&self, row: usize) -> Value {
        let map: Vec<(String, Value)> = self
            .names
            .iter()
            .zip(&self.arrays)
            .map(|(name, array)| (name.clone(), column_cell_value(array.as_ref(), row, name)))
            .collect();
        Value::from_iter(map)
    }
}

/// One row as the template context: its columns plus extra named values (`examples`).
#[derive(Debug)]
pub struct RowContext {
    pub columns: Arc<BatchColumns>,
    pub row: usize,
    pub extra: Vec<(&'static str, Value)>,
}

impl Object for RowContext {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        self.get_value_by_str(key)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        if let Some((_, value)) = self.extra.iter().find(|(name, _)| *name == key) {
            return Some(value.clone());
        }
        self.columns.cell(key, self.row)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let mut keys: Vec<Value> = self
            .columns
            .names
            .iter()
            .map(|n| Value::from(n.as_str()))
            .collect();
        keys.extend(self.extra.iter().map(|(n, _)| Value::from(*n)));
        Enumerator::Values(keys)
    }
}

/// A cell as a template value: strings, integers, floats, booleans, lists and structs map to
/// their template equivalents, nulls to `none`, binary data to a value that fails when a
/// template reads it (see [`column_cell_value`]), anything else to its display text.
pub fn cell_value(array: &dyn Array, row: usize) -> Value {
    column_cell_value(array, row, "")
}

/// [`cell_value`] of a cell of `column` (named when a template reads binary data from it).
///
/// Binary cells (Arrow `Binary`, `LargeBinary`, `BinaryView`, `FixedSizeBinary`, also inside
/// lists and structs) are refused rather than written: their display text is hex digits, and
/// jinja2 would write `b'...'`; neither belongs in a prompt. Reading one (printing it, testing
/// it, passing it to a filter) is an error naming the column; a null binary cell is `none`.
pub fn column_cell_value(array: &dyn Array, row: usize, column: &str) -> Value {
    if array.is_null(row) {
        return Value::from(());
    }
    match array.data_type() {
        DataType::Utf8 => Value::from(array.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Value::from(array.as_string::<i64>().value(row)),
        DataType::Utf8View => Value::from(array.as_string_view().value(row)),
        DataType::Boolean => Value::from(array.as_boolean().value(row)),
        DataType::Int8 => Value::from(array.as_primitive::<Int8Type>().value(row)),
        DataType::Int16 => Value::from(array.as_primitive::<Int16Type>().value(row)),
        DataType::Int32 => Value::from(array.as_primitive::<Int32Type>().value(row)),
        DataType::Int64 => Value::from(array.as_primitive::<Int64Type>().value(row)),
        DataType::UInt8 => Value::from(array.as_primitive::<UInt8Type>().value(row)),
        DataType::UInt16 => Value::from(array.as_primitive::<UInt16Type>().value(row)),
        DataType::UInt32 => Value::from(array.as_primitive::<UInt32Type>().value(row)),
        DataType::UInt64 => Value::from(array.as_primitive::<UInt64Type>().value(row)),
        DataType::Float32 => Value::from(array.as_primitive::<Float32Type>().value(row)),
        DataType::Float64 => Value::from(array.as_primitive::<Float64Type>().value(row)),
        DataType::List(_) => list_value(array.as_list::<i32>().value(row).as_ref(), column),
        DataType::LargeList(_) => list_value(array.as_list::<i64>().value(row).as_ref(), column),
        DataType::Struct(fields) => {
            let structure = array.as_struct();
            Value::from_iter(
                fields
                    .iter()
                    .zip(structure.columns())
                    .map(|(f, c)| (f.name().clone(), column_cell_value(c.as_ref(), row, column)))
                    .collect::<Vec<_>>(),
            )
        }
        data_type @ (DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_)) => Value::from(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "column `{column}` holds binary data ({data_type}), which a template cannot \
                 write as text: convert it to a string column before the template stage (a \
                 Parquet writer may store text as plain binary: Spark's \
                 spark.sql.parquet.binaryAsString), or leave it out of the template"
            ),
        )),
        _ => match arrow::util::display::array_value_to_string(array, row) {
            Ok(text) => Value::from(text),
            Err(_) => Value::from(()),
        },
    }
}

fn list_value(values: &dyn Array, column: &str) -> Value {
    Value::from(
        (0..values.len())
            .map(|i| column_cell_value(values, i, column))
            .collect::<Vec<_>>(),
    )
}

/// Why one rendering failed.
#[derive(Debug)]
pub enum RowRenderError {
    /// The template failed (undefined variable, null value, out of fuel, ...).
    Template(Error),
    /// The output passed `limits.max_row_bytes`.
    TooLarge,
}

/// Output that refuses to grow past `limit` bytes.
struct CappedOutput {
    bytes: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("the row output limit is reached"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Render `template` for one row, its output capped at `max_bytes` (the rendering stops at the
/// first write past it).
pub fn render_row(
    template: &minijinja::Template<'_, '_>,
    context: &Value,
    max_bytes: u64,
) -> Result<String, RowRenderError> {
    let mut output = CappedOutput {
        bytes: Vec::new(),
        limit: usize::try_from(max_bytes).unwrap_or(usize::MAX),
        exceeded: false,
    };
    match template.render_captured_to(context, &mut output) {
        Ok(_) => Ok(String::from_utf8(output.bytes)
            .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())),
        Err(_) if output.exceeded => Err(RowRenderError::TooLarge),
        Err(error) => Err(RowRenderError::Template(error)),
    }
}

/// A failed rendering as a user message naming the split, the row and the variable, or the
/// limit it crossed (with its value, and the key that raises it).
pub fn describe_row_error(
    error: &RowRenderError,
    template: &str,
    split: &str,
    row: u64,
    limits: &RenderLimits,
) -> String {
    match error {
        RowRenderError::TooLarge => format!(
            "split {split}, row {row}: the {template} template's output exceeds limits.max_row_bytes \
             ({} bytes); raise `limits.max_row_bytes` in the stage if rows this large are intended",
            limits.max_row_bytes
        ),
        RowRenderError::Template(error) if innermost(error).kind() == ErrorKind::OutOfFuel => format!(
            "split {split}, row {row}: the {template} template ran out of fuel: it executed more \
             than limits.fuel ({} instructions); a loop that runs too long? raise `limits.fuel` \
             in the stage if the work is intended",
            limits.fuel
        ),
        RowRenderError::Template(error) => describe_render_error(error, template, split, row),
    }
}

/// An error inside a template the row template includes comes wrapped (`error in "part.j2"`,
/// at the include): the innermost error says what failed, located in its own file.
fn innermost(mut error: &Error) -> &Error {
    while let Some(inner) = std::error::Error::source(error).and_then(|e| e.downcast_ref::<Error>())
    {
        error = inner;
    }
    error
}

/// A rendering error as a user message naming the split, the row and the variable.
pub fn describe_render_error(error: &Error, template: &str, split: &str, row: u64) -> String {
    let error = innermost(error);
    let location = match (error.name().filter(|name| *name != template), error.line()) {
        (Some(file), Some(line)) => {
            format!("the included template `{file}`, line {line}, from the {template} template")
        }
        (Some(file), None) => {
            format!("the included template `{file}`, from the {template} template")
        }
        (None, Some(line)) => format!("{template} template, line {line}"),
        (None, None) => format!("{template} template"),
    };
    // The expression that failed, when minijinja knows its span.
    let expression = match (error.template_source(), error.range()) {
        (Some(source), Some(range)) => source.get(range).map(str::trim).map(str::to_string),
        _ => None,
    };
    let what = match (error.kind(), expression) {
        (ErrorKind::UndefinedError, Some(expression)) => {
            format!("undefined variable `{expression}`")
        }
        (ErrorKind::UndefinedError, None) => "undefined variable".to_string(),
        (_, Some(expression)) => format!(
            "`{expression}`: {}",
            error.detail().unwrap_or("rendering failed")
        ),
        (_, None) => error.detail().unwrap_or("rendering failed").to_string(),
    };
    format!("split {split}, row {row}: {what} ({location})")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("text", DataType::Utf8, true),
            Field::new("label", DataType::Int64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![Some("  Great film "), None])),
                Arc::new(Int64Array::from(vec![Some(1), Some(0)])),
            ],
        )
        .unwrap()
    }

    fn render(source: &str, row: usize) -> Result<String, Error> {
        let mut env = row_environment(&Includes::none(Path::new(".")), None);
        env.add_template_owned("prompt", source.to_string())
            .unwrap();
        let context = Value::from_object(RowContext {
            columns: BatchColumns::new(&batch()),
            row,
            extra: vec![],
        });
        env.get_template("prompt")?.render(context)
    }

    #[test]
    fn rows_render_with_python_string_methods() {
        assert_eq!(
            render(
                "{{ text.strip().lower() }} / {{ ['neg', 'pos'][label] }}",
                0
            )
            .unwrap(),
            "great film / pos"
        );
    }

    #[test]
    fn an_error_in_an_included_template_names_that_file_and_its_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("part.j2"), "ok\n{{ txt }}").unwrap();
        let includes = Includes {
            project_dir: dir.path().to_path_buf(),
            allow_outside_project: false,
            tracked: ["part.j2".to_string()].into(),
        };
        let mut env = row_environment(&includes, None);
        env.add_template_owned("prompt", "\n\n{% include 'part.j2' %}".to_string())
            .unwrap();
        let context = Value::from_object(RowContext {
            columns: BatchColumns::new(&batch()),
            row: 0,
            extra: vec![],
        });
        let error = env
            .get_template("prompt")
            .unwrap()
            .render(context)
            .unwrap_err();
        let message = describe_render_error(&error, "prompt", "train", 0);
        assert!(
            message.contains("`txt`")
                && message
                    .contains("the included template `part.j2`, line 2, from the prompt template"),
            "{message}"
        );
    }

    #[test]
    fn undefined_and_null_variables_are_errors_naming_the_variable() {
        let error = render("review: {{ txt }}", 0).unwrap_err();
        let message = describe_render_error(&error, "prompt", "train", 0);
        assert!(message.contains("`txt`"), "{message}");
        assert!(message.contains("row 0"), "{message}");
        let error = render("review: {{ text }}", 1).unwrap_err();
        let message = describe_render_error(&error, "prompt", "eval", 1);
        assert!(
            message.contains("text") && message.contains("null"),
            "{message}"
        );
        assert_eq!(
            render("{% if text %}x{% else %}y{% endif %}", 1).unwrap(),
            "y"
        );
    }

    #[test]
    fn undeclared_variables_skip_loop_variables_and_builtins() {
        let mut env = row_environment(&Includes::none(Path::new(".")), None);
        env.add_template_owned(
            "t",
            "{% for ex in examples %}{{ ex.text }}{% endfor %}{{ range(3) | length }}{{ text }}"
                .to_string(),
        )
        .unwrap();
        let names = undeclared_variables(&env, "t").unwrap();
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            vec!["examples", "text"]
        );
    }

    #[test]
    fn output_past_the_cap_and_runaway_loops_are_errors_naming_the_limit() {
        let limits = RenderLimits {
            fuel: 100_000,
            max_row_bytes: 1000,
        };
        let mut env = row_environment(&Includes::none(Path::new(".")), Some(limits.fuel));
        env.add_template("big", "{{ 'x' * 1001 }}").unwrap();
        env.add_template("fits", "{{ 'x' * 1000 }}").unwrap();
        env.add_template(
            "loop",
            "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
        )
        .unwrap();
        let context = Value::from_object(RowContext {
            columns: BatchColumns::new(&batch()),
            row: 0,
            extra: vec![],
        });
        let render = |name: &str| {
            render_row(
                &env.get_template(name).unwrap(),
                &context,
                limits.max_row_bytes,
            )
        };
        assert_eq!(render("fits").unwrap().len(), 1000);
        let error = render("big").unwrap_err();
        let message = describe_row_error(&error, "prompt", "train", 7, &limits);
        assert!(
            message.starts_with("split train, row 7: the prompt template's output exceeds limits.max_row_bytes (1000 bytes)"),
            "{message}"
        );
        let error = render("loop").unwrap_err();
        let message = describe_row_error(&error, "completion", "eval", 3, &limits);
        assert!(
            message.starts_with("split eval, row 3: the completion template ran out of fuel: it executed more than limits.fuel (100000 instructions)"),
            "{message}"
        );
    }
}
