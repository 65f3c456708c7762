//! Reading tabular input: peeking at column names without reading rows (Parquet footer, CSV header, first JSONL lines),
//! and streaming mapped (selected + renamed) record batches across files. Expanding a path / glob /
//! directory into files with stable keys is the core's `config::input` (re-exported here: the
//! fingerprint needs it without Arrow).
//!
//! Owns: format detection, projection, schema agreement across files, the stored type of a column
//! (Arrow's `Null` type becomes a string column of nulls) and error messages that name the file,
//! the row group (Parquet) or the file line (CSV, JSONL) and, when it can be found, the column. Only
//! regular files are opened (a device would be read forever). It must not filter, split or hold
//! more than one batch at a time.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{new_null_array, Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use indexmap::IndexMap;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::config::ingest::{CsvType, InputFormat};
use crate::config::InputFile;
use crate::stages::StageError;

pub use crate::config::input::{expand_input, format_of};

/// Rows per record batch read from the inputs.
pub const BATCH_ROWS: usize = 8192;

/// How many records validation decodes from a JSONL or CSV file (JSONL column types are
/// inferred from every record, streaming, so a key first seen late is a column too).
const INFER_RECORDS: usize = 1000;

fn resolve_format(path: &Path, format: Option<InputFormat>) -> Result<InputFormat, String> {
    format.or_else(|| format_of(path)).ok_or_else(|| {
        format!(
            "cannot tell the format of {} from its extension; set `format: parquet|jsonl|csv`",
            path.display()
        )
    })
}

/// The Arrow schema of a file without reading its rows (Parquet footer, CSV header: every
/// column text, JSONL records). See [`peek_schema_typed`] for CSV columns given a type.
pub fn peek_schema(path: &Path, format: Option<InputFormat>) -> Result<Schema, String> {
    peek_schema_typed(path, format, &IndexMap::new())
}

/// [`peek_schema`] with the ingest stage's `types` for CSV columns (ignored for other formats).
pub fn peek_schema_typed(
    path: &Path,
    format: Option<InputFormat>,
    types: &IndexMap<String, CsvType>,
) -> Result<Schema, String> {
    match resolve_format(path, format)? {
        InputFormat::Parquet => {
            let file = open(path)?;
            let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| format!("{}: cannot read the Parquet footer: {e}", path.display()))?;
            Ok(builder.schema().as_ref().clone())
        }
        InputFormat::Jsonl => {
            let schema = infer_jsonl(path, &path.display().to_string())?;
            // The records the types were inferred from must decode into them (a key that is a
            // number on one line and a string on another does not): said here, where validate
            // sees it, as a bad CSV record among them is.
            let schema_ref = std::sync::Arc::new(schema.clone());
            let first = arrow::json::ReaderBuilder::new(schema_ref.clone())
                .with_batch_size(INFER_RECORDS)
                .build(jsonl_reader(path)?)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .next();
            if let Some(Err(error)) = first {
                let located = jsonl_error(
                    &path.display().to_string(),
                    path,
                    Some(&schema_ref),
                    &error.to_string(),
                );
                return Err(if located.contains("one type on every line") {
                    located
                } else {
                    format!("{located} (column types are inferred from every record: give a key one type on every line)")
                });
            }
            Ok(schema)
        }
        InputFormat::Csv => {
            let shown = path.display().to_string();
            let schema = Arc::new(csv_schema(&shown, open(path)?, types)?);
            // The first records must read (field counts, UTF-8, typed cells), as JSONL's must
            // decode: said here, where validate sees it.
            read_csv(&shown, path, &schema, INFER_RECORDS, |_| Ok(false))
                .map_err(|error| error.to_string())?;
            Ok(schema.as_ref().clone())
        }
    }
}

/// The schema of a CSV file from its header (line 1) alone: every column text (Utf8), exactly
/// as written, except those `types` names. No value is guessed at: `007` stays `007`.
fn csv_schema(
    shown: &str,
    file: File,
    types: &IndexMap<String, CsvType>,
) -> Result<Schema, String> {
    let (header, _) = arrow::csv::reader::Format::default()
        .with_header(true)
        .infer_schema(BufReader::new(file), Some(0))
        .map_err(|e| format!("{shown}: cannot read the CSV header (line 1): {e}"))?;
    let fields: Vec<Field> = header
        .fields()
        .iter()
        .map(|field| {
            let data_type = match types.get(field.name()) {
                Some(CsvType::Int64) => DataType::Int64,
                Some(CsvType::Float64) => DataType::Float64,
                Some(CsvType::Boolean) => DataType::Boolean,
                Some(CsvType::String) | None => DataType::Utf8,
            };
            Field::new(field.name(), data_type, true)
        })
        .collect();
    Ok(Schema::new(fields))
}

/// An error decoding a JSON-lines file, located: the file's first line that is not a JSON value
/// (serde_json's reason and column) or, given the schema, that Arrow cannot decode into it.
/// Falls back to Arrow's own message when no single line is at fault. Reads the file again,
/// which only happens on this error path.
fn jsonl_error(
    shown: &str,
    path: &Path,
    schema: Option<&SchemaRef>,
    arrow_message: &str,
) -> String {
    // Syntax and a key changing type first (over the whole file): a line the types were
    // inferred from may fail to decode only because a later line changed them.
    let located = locate_jsonl_error(path, None)
        .or_else(|| schema.and_then(|schema| locate_jsonl_error(path, Some(schema))));
    match located {
        Some((line, cause)) => format!("{shown}: line {line}: {cause}"),
        None => format!("{shown}: not valid JSON lines: {arrow_message}"),
    }
}

fn locate_jsonl_error(path: &Path, schema: Option<&SchemaRef>) -> Option<(u64, String)> {
    use std::io::BufRead;
    let reader = BufReader::new(open(path).ok()?);
    let mut decoder = match schema {
        Some(schema) => Some(
            arrow::json::ReaderBuilder::new(schema.clone())
                .build_decoder()
                .ok()?,
        ),
        None => None,
    };
    let mut kinds: std::collections::HashMap<String, (&'static str, u64)> =
        std::collections::HashMap::new();
    for (index, line) in reader.split(b'\n').enumerate() {
        let number = index as u64 + 1;
        let line = match line {
            Ok(line) => line,
            Err(error) => return Some((number, format!("cannot read: {error}"))),
        };
        let text = match record_text(&line, number) {
            Ok(Some(text)) => text,
            Ok(None) => continue,
            Err(cause) => return Some((number, cause)),
        };
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(value) => value,
            Err(error) => return Some((number, json_syntax_cause(&error))),
        };
        let Some(object) = value.as_object() else {
            return Some((number, format!("expected a JSON object, found {value}")));
        };
        // A key whose kind of value changes between lines (a number here, text there; an
        // object here, a string there), at any depth (`meta.source`, `tags[]`), is the likeliest
        // cause of a failed inference or decode.
        let mut paths = Vec::new();
        value_kinds("", object, &mut paths);
        for (path, kind) in paths {
            match kinds.get(&path) {
                Some(&(first_kind, first_line)) if first_kind != kind => {
                    return Some((
                        number,
                        format!(
                            "key `{path}` is {kind} here but {first_kind} on line {first_line}: give a key one type on every line"
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    kinds.insert(path, (kind, number));
                }
            }
        }
        if let Some(decoder) = &mut decoder {
            let decoded = decoder
                .serialize(std::slice::from_ref(&value))
                .and_then(|()| decoder.flush());
            if let Err(error) = decoded {
                return Some((number, error.to_string()));
            }
        }
    }
    None
}

/// The kind of every non-null value under `object`, by its path from the record (`key`,
/// `key.inner`, `key[]` for a list's elements).
fn value_kinds(
    prefix: &str,
    object: &serde_json::Map<String, serde_json::Value>,
    out: &mut Vec<(String, &'static str)>,
) {
    fn visit(path: String, value: &serde_json::Value, out: &mut Vec<(String, &'static str)>) {
        let Some(kind) = json_kind(value) else {
            return;
        };
        match value {
            serde_json::Value::Object(inner) => value_kinds(&path, inner, out),
            serde_json::Value::Array(items) => {
                for item in items {
                    visit(format!("{path}[]"), item, out);
                }
            }
            _ => {}
        }
        out.push((path, kind));
    }
    for (key, value) in object {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        visit(path, value, out);
    }
}

/// The kind of a JSON value as a column sees it (`None` for null, which fits any column).
fn json_kind(value: &serde_json::Value) -> Option<&'static str> {
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::Bool(_) => Some("a boolean"),
        serde_json::Value::Number(_) => Some("a number"),
        serde_json::Value::String(_) => Some("a string"),
        serde_json::Value::Array(_) => Some("a list"),
        serde_json::Value::Object(_) => Some("an object"),
    }
}

/// Line `number` of a JSON-lines file as text, without its line end: `None` when blank; a UTF-8 byte-order mark
/// before the first record (as some editors save) is not data.
fn record_text(line: &[u8], number: u64) -> Result<Option<&str>, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not valid UTF-8".to_string())?;
    let text = if number == 1 {
        text.strip_prefix('\u{feff}').unwrap_or(text)
    } else {
        text
    };
    // Without its line end, so serde_json's columns are the line's.
    let text = text.trim_end_matches(['\n', '\r']);
    Ok((!text.trim().is_empty()).then_some(text))
}

/// serde_json's reason for a line that is not JSON, with its column (its own "at line 1" is
/// the record's, not the file's, and is left out).
fn json_syntax_cause(error: &serde_json::Error) -> String {
    let message = error.to_string();
    let reason = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(reason, _)| reason);
    format!("column {}: {reason}", error.column())
}

/// Check one JSON-lines record without building it: exactly one JSON object on the line
/// (serde_json's grammar), and the first non-integer number given to one of `integer_columns`
/// (name and value), if any.
fn strict_record(
    text: &str,
    integer_columns: &[&str],
) -> Result<Option<(String, f64)>, serde_json::Error> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Record<'a>(&'a [&'a str]);
    struct Key<'a>(&'a [&'a str]);
    struct Integer;
    impl<'de> DeserializeSeed<'de> for Key<'_> {
        type Value = Option<String>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl Visitor<'_> for Key<'_> {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a key")
        }
        fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
            Ok(self.0.contains(&key).then(|| key.to_string()))
        }
    }
    impl<'de> DeserializeSeed<'de> for Integer {
        type Value = Option<f64>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Integer {
        type Value = Option<f64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a value")
        }
        fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Self::Value, E> {
            Ok(Some(value))
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        // Any other type is the decoder's to refuse (or to read as it reads it).
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    impl<'de> Visitor<'de> for Record<'_> {
        type Value = Option<(String, f64)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(key) = map.next_key_seed(Key(self.0))? {
                match key {
                    Some(name) => {
                        if let (Some(value), None) = (map.next_value_seed(Integer)?, &found) {
                            found = Some((name, value));
                        }
                    }
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(found)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let found = deserializer.deserialize_map(Record(integer_columns))?;
    deserializer.end()?;
    Ok(found)
}

/// A JSON-lines file to read from its first record: past a UTF-8 byte-order mark, which some
/// editors write and which is not JSON.
/// The column types of the JSON-lines file at `path` (`shown` in errors), inferred from every
/// record ([`super::jsonl_schema`]).
fn infer_jsonl(path: &Path, shown: &str) -> Result<Schema, String> {
    super::jsonl_schema::infer(path, || jsonl_reader(path)).map_err(|error| match error {
        super::jsonl_schema::InferError::Io(message) => message,
        super::jsonl_schema::InferError::Arrow(error) => {
            jsonl_error(shown, path, None, &error.to_string())
        }
    })
}

fn jsonl_reader(path: &Path) -> Result<BufReader<File>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = open(path)?;
    let mut head = [0u8; 3];
    let read = file
        .read(&mut head)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if read < 3 || head != [0xEF, 0xBB, 0xBF] {
        file.seek(SeekFrom::Start(0))
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    }
    Ok(BufReader::new(file))
}

/// Column names of a file (see [`peek_schema`]).
pub fn peek_columns(path: &Path, format: Option<InputFormat>) -> Result<Vec<String>, String> {
    Ok(peek_schema(path, format)?
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect())
}

/// Open an input file, refusing anything but a regular file: a device such as /dev/zero or a
/// FIFO would be read forever.
fn open(path: &Path) -> Result<File, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let metadata = file
        .metadata()
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    if !metadata.is_file() {
        return Err(format!(
            "{} is not a regular file (a device, FIFO or socket cannot be an input)",
            path.display()
        ));
    }
    Ok(file)
}

/// An input column's type as peftpipe stores it: Arrow's `Null` type (a JSONL key whose values
/// are all null in the records schema inference saw, a Parquet column of nulls) becomes a
/// string column of nulls, so templates and filters treat its values as nulls rather than as a
/// type of their own that renders as "".
pub fn stored_type(data_type: &DataType) -> DataType {
    match data_type {
        DataType::Null => DataType::Utf8,
        other => other.clone(),
    }
}

/// What to read and how to map it.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    pub files: Vec<InputFile>,
    pub format: Option<InputFormat>,
    /// Columns to keep (file names), in order; empty keeps all.
    pub columns: Vec<String>,
    /// Renames `{old: new}` applied after selection.
    pub rename: IndexMap<String, String>,
    /// CSV columns (file names) read as typed values; every other CSV column is text.
    pub types: IndexMap<String, CsvType>,
    /// Stop after this many input rows.
    pub limit: Option<u64>,
}

/// Where a batch came from (for error messages).
#[derive(Debug, Clone)]
pub struct BatchOrigin<'a> {
    /// The file's key (path as written).
    pub file: &'a str,
    /// Parquet row group, when the file is Parquet.
    pub row_group: Option<usize>,
    /// Index of the batch's first row within the file (0-based).
    pub first_row_in_file: u64,
    /// Index of the batch's first row across all files (0-based).
    pub first_row: u64,
}

impl std::fmt::Display for BatchOrigin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(group) = self.row_group {
            write!(f, ", row group {group}")?;
        }
        write!(f, ", rows from {}", self.first_row_in_file)
    }
}

/// The output schema (selected + renamed columns, types of the first file) without reading rows.
pub fn mapped_schema(spec: &SourceSpec) -> Result<SchemaRef, StageError> {
    let first = spec
        .files
        .first()
        .ok_or_else(|| StageError::user("no input files"))?;
    let schema =
        peek_schema_typed(&first.path, spec.format, &spec.types).map_err(StageError::User)?;
    let indices = Mapper::indices(spec, &first.key, &schema)?;
    let fields: Vec<Field> = indices
        .iter()
        .map(|&index| {
            let field = schema.field(index);
            let name = spec.rename.get(field.name()).unwrap_or(field.name());
            Field::new(name, stored_type(field.data_type()), true)
        })
        .collect();
    Ok(Arc::new(Schema::new(fields)))
}

/// Whether the first input (whose columns and types the output takes) is a CSV file.
pub fn is_csv(spec: &SourceSpec) -> bool {
    spec.files.first().is_some_and(|first| {
        resolve_format(&first.path, spec.format).ok() == Some(InputFormat::Csv)
    })
}

/// Total rows of the inputs when cheaply known (Parquet footers); None otherwise.
pub fn known_row_count(spec: &SourceSpec) -> Option<u64> {
    let mut total = 0u64;
    for file in &spec.files {
        if resolve_format(&file.path, spec.format).ok()? != InputFormat::Parquet {
            return None;
        }
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(File::open(&file.path).ok()?).ok()?;
        total += u64::try_from(builder.metadata().file_metadata().num_rows()).ok()?;
    }
    Some(match spec.limit {
        Some(limit) => total.min(limit),
        None => total,
    })
}

/// Maps a file's batches onto the output schema (selection order + renames) and checks that
/// every file agrees with the first on types.
struct Mapper {
    /// Output schema (set from the first file).
    schema: Option<SchemaRef>,
    /// Key of the file that fixed the schema.
    schema_file: String,
}

impl Mapper {
    fn selected_names(spec: &SourceSpec, file_schema: &Schema) -> Vec<String> {
        if spec.columns.is_empty() {
            file_schema
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect()
        } else {
            spec.columns.clone()
        }
    }

    /// Check the file has the selected columns; return their indices in the file schema.
    fn indices(
        spec: &SourceSpec,
        file_key: &str,
        file_schema: &Schema,
    ) -> Result<Vec<usize>, StageError> {
        let names = Self::selected_names(spec, file_schema);
        names
            .iter()
            .map(|name| {
                file_schema.index_of(name).map_err(|_| {
                    let available: Vec<&str> = file_schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect();
                    StageError::user(format!(
                        "{file_key}: column `{name}` not found; available columns: {}",
                        available.join(", ")
                    ))
                })
            })
            .collect()
    }

    /// Project + rename `batch` (whose columns are the file's columns or a projection of them,
    /// given by `batch_names`).
    fn map(
        &mut self,
        spec: &SourceSpec,
        batch: &RecordBatch,
        file_key: &str,
    ) -> Result<RecordBatch, StageError> {
        let batch_schema = batch.schema();
        let names = Self::selected_names(spec, &batch_schema);
        let mut fields = Vec::with_capacity(names.len());
        let mut columns = Vec::with_capacity(names.len());
        for name in &names {
            let index = batch_schema
                .index_of(name)
                .map_err(|_| StageError::user(format!("{file_key}: column `{name}` not found")))?;
            let field = batch_schema.field(index);
            let new_name = spec.rename.get(name).unwrap_or(name);
            let column = batch.column(index);
            let data_type = stored_type(field.data_type());
            fields.push(Field::new(new_name, data_type.clone(), true));
            columns.push(if column.data_type() == &data_type {
                column.clone()
            } else {
                new_null_array(&data_type, column.len())
            });
        }
        let schema = match &self.schema {
            Some(schema) => {
                for (expected, found) in schema.fields().iter().zip(&fields) {
                    if expected.data_type() != found.data_type() {
                        return Err(StageError::user(format!(
                            "{file_key}: column `{}` has type {} but {} has {}; convert the files to one type",
                            found.name(),
                            found.data_type(),
                            self.schema_file,
                            expected.data_type()
                        )));
                    }
                }
                schema.clone()
            }
            None => {
                let schema = Arc::new(Schema::new(fields));
                self.schema = Some(schema.clone());
                self.schema_file = file_key.to_string();
                schema
            }
        };
        RecordBatch::try_new(schema, columns)
            .map_err(|e| StageError::user(format!("{file_key}: {e}")))
    }
}

/// Stream the mapped batches of every input file in order, calling `visit` for each (with its
/// origin). Stops after `spec.limit` rows. Returns the number of rows read and the output schema.
pub fn scan(
    spec: &SourceSpec,
    mut visit: impl FnMut(RecordBatch, &BatchOrigin<'_>) -> Result<(), StageError>,
) -> Result<(u64, Option<SchemaRef>), StageError> {
    let mut mapper = Mapper {
        schema: None,
        schema_file: String::new(),
    };
    let mut total = 0u64;
    let limit = spec.limit.unwrap_or(u64::MAX);
    // The JSONL schema is inferred once (from every record of the first JSONL file, streaming) so
    // every file decodes alike.
    let mut jsonl_schema: Option<SchemaRef> = None;
    for file in &spec.files {
        if total >= limit {
            break;
        }
        let format = resolve_format(&file.path, spec.format).map_err(StageError::User)?;
        let mut in_file = 0u64;
        let mut emit = |batch: RecordBatch,
                        row_group: Option<usize>,
                        in_file: &mut u64,
                        total: &mut u64|
         -> Result<bool, StageError> {
            let remaining = limit - *total;
            let batch = if (batch.num_rows() as u64) > remaining {
                batch.slice(0, remaining as usize)
            } else {
                batch
            };
            let rows = batch.num_rows() as u64;
            let mapped = mapper.map(spec, &batch, &file.key)?;
            let origin = BatchOrigin {
                file: &file.key,
                row_group,
                first_row_in_file: *in_file,
                first_row: *total,
            };
            visit(mapped, &origin)?;
            *in_file += rows;
            *total += rows;
            Ok(*total < limit)
        };
        match format {
            InputFormat::Parquet => {
                let handle = open(&file.path).map_err(StageError::User)?;
                let builder = ParquetRecordBatchReaderBuilder::try_new(handle).map_err(|e| {
                    StageError::user(format!(
                        "{}: not a readable Parquet file (footer): {e}",
                        file.key
                    ))
                })?;
                let file_schema = builder.schema().clone();
                let indices = Mapper::indices(spec, &file.key, &file_schema)?;
                let groups = builder.metadata().num_row_groups();
                'groups: for group in 0..groups {
                    let reader = open_row_group(&file.path, &file.key, &indices, group)?;
                    for batch in reader {
                        let batch = match batch {
                            Ok(batch) => batch,
                            Err(error) => {
                                return Err(describe_parquet_error(
                                    &file.path,
                                    &file.key,
                                    &file_schema,
                                    &indices,
                                    group,
                                    &error.to_string(),
                                ))
                            }
                        };
                        if !emit(batch, Some(group), &mut in_file, &mut total)? {
                            break 'groups;
                        }
                    }
                }
            }
            InputFormat::Jsonl => {
                let schema = match &jsonl_schema {
                    Some(schema) => schema.clone(),
                    None => {
                        let schema =
                            infer_jsonl(&file.path, &file.key).map_err(StageError::User)?;
                        // A key seen only with null values decodes as strings, so a later
                        // file's text values fit it (see `stored_type`).
                        let fields: Vec<Field> = schema
                            .fields()
                            .iter()
                            .map(|field| {
                                field
                                    .as_ref()
                                    .clone()
                                    .with_data_type(stored_type(field.data_type()))
                            })
                            .collect();
                        let schema = Arc::new(Schema::new(fields));
                        jsonl_schema = Some(schema.clone());
                        schema
                    }
                };
                Mapper::indices(spec, &file.key, &schema)?;
                decode_jsonl(&file.key, &file.path, &schema, |batch| {
                    emit(batch, None, &mut in_file, &mut total)
                })?;
            }
            InputFormat::Csv => {
                let typed = Arc::new(
                    csv_schema(
                        &file.key,
                        open(&file.path).map_err(StageError::User)?,
                        &spec.types,
                    )
                    .map_err(StageError::User)?,
                );
                Mapper::indices(spec, &file.key, &typed)?;
                read_csv(&file.key, &file.path, &typed, BATCH_ROWS, |batch| {
                    emit(batch, None, &mut in_file, &mut total)
                })?;
            }
        }
    }
    Ok((total, mapper.schema))
}

/// Read a CSV file into batches of `typed` (its header's columns: text, or the type `types`
/// gives). Arrow reads every cell as text; typed columns are parsed here, so an error names the
/// column and the file line. An empty cell (`,,` or `""`) is the empty string in a text column
/// and null in a typed one, as pyarrow.csv reads by default (`strings_can_be_null=False`; pandas
/// would read NaN for both), as are its other null spellings (`NA`, `null`, ...). Errors give
/// the file line of the record (not its number: a quoted field may hold line breaks), and a
/// quote never closed is said as such. `on_batch` returns whether to go on.
fn read_csv(
    key: &str,
    path: &Path,
    typed: &SchemaRef,
    batch_rows: usize,
    mut on_batch: impl FnMut(RecordBatch) -> Result<bool, StageError>,
) -> Result<(), StageError> {
    let text_schema = Arc::new(Schema::new(
        typed
            .fields()
            .iter()
            .map(|field| Field::new(field.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let scan = std::rc::Rc::new(std::cell::RefCell::new(CsvScan::default()));
    let tracked = ScanningReader {
        inner: open(path).map_err(StageError::User)?,
        scan: scan.clone(),
    };
    // Arrow reads an empty cell as null by default; no cell is null here (a pattern that
    // matches nothing), and typed columns make their null spellings null when parsed.
    let never_null =
        regex::Regex::new(r"[^\s\S]").map_err(|e| StageError::Internal(e.to_string()))?;
    let reader = arrow::csv::ReaderBuilder::new(text_schema)
        .with_header(true)
        .with_null_regex(never_null)
        .with_batch_size(batch_rows)
        .build(tracked)
        .map_err(|e| StageError::user(format!("{key}: {e}")))?;
    // Data records read so far (the header is record 0).
    let mut records = 0u64;
    for batch in reader {
        let batch = batch.map_err(|error| csv_error(key, path, typed, &error.to_string()))?;
        let rows = batch.num_rows() as u64;
        let batch = apply_csv_types(key, path, typed, &batch, records)?;
        records += rows;
        if !on_batch(batch)? {
            break;
        }
    }
    let scan = scan.borrow();
    if let (true, Some(line)) = (scan.at_end, scan.open_quote()) {
        return Err(StageError::user(format!(
            "{key}: line {line}: a quote opened here is never closed (the rest of the file would be one field)"
        )));
    }
    Ok(())
}

/// Parse the typed columns of a batch of text cells; `first_record` is the data record (from 0)
/// of its first row.
fn apply_csv_types(
    key: &str,
    path: &Path,
    typed: &SchemaRef,
    batch: &RecordBatch,
    first_record: u64,
) -> Result<RecordBatch, StageError> {
    use arrow::array::{BooleanArray, Float64Array, Int64Array, StringArray};
    if typed
        .fields()
        .iter()
        .all(|field| field.data_type() == &DataType::Utf8)
    {
        return RecordBatch::try_new(typed.clone(), batch.columns().to_vec())
            .map_err(|e| StageError::Internal(e.to_string()));
    }
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in typed.fields().iter().zip(batch.columns()) {
        let data_type = field.data_type();
        if data_type == &DataType::Utf8 {
            columns.push(column.clone());
            continue;
        }
        let text = column
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| StageError::Internal("a CSV column is not text".into()))?;
        let bad = |row: usize, value: &str, what: &str| {
            let record = first_record + row as u64 + 1;
            let line = csv_line_of_record(path, record)
                .map_or_else(|| format!("record {record}"), |line| format!("line {line}"));
            StageError::user(format!(
                "{key}: {line}: column `{}`: {value:?} is not {what} (`types` reads the column as {})",
                field.name(),
                type_name(data_type)
            ))
        };
        let array: arrow::array::ArrayRef = match data_type {
            DataType::Int64 => Arc::new(Int64Array::from(parse_cells(
                text,
                |value| value.parse::<i64>().ok(),
                |row, value| bad(row, value, "an integer"),
            )?)),
            DataType::Float64 => Arc::new(Float64Array::from(parse_cells(
                text,
                |value| value.parse::<f64>().ok(),
                |row, value| bad(row, value, "a number"),
            )?)),
            _ => Arc::new(BooleanArray::from(parse_cells(
                text,
                |value| match value.to_ascii_lowercase().as_str() {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => None,
                },
                |row, value| bad(row, value, "true or false"),
            )?)),
        };
        columns.push(array);
    }
    RecordBatch::try_new(typed.clone(), columns).map_err(|e| StageError::Internal(e.to_string()))
}

/// The cells a typed CSV column reads as null: pyarrow.csv's default `null_values` (Arrow's
/// `ConvertOptions::Defaults`, after pandas' `read_csv`), matched as written. Text columns keep
/// them as text (`strings_can_be_null=False`).
const CSV_NULL_VALUES: [&str; 17] = [
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "N/A", "NA", "NULL", "NaN", "n/a", "nan", "null",
];

/// Each cell of a CSV text column parsed (trimmed) by `parse`, a null spelling
/// ([`CSV_NULL_VALUES`]) null; a cell it refuses is `refused(row, cell)`.
fn parse_cells<T>(
    text: &arrow::array::StringArray,
    parse: impl Fn(&str) -> Option<T>,
    refused: impl Fn(usize, &str) -> StageError,
) -> Result<Vec<Option<T>>, StageError> {
    text.iter()
        .enumerate()
        .map(|(row, cell)| {
            cell.filter(|cell| !CSV_NULL_VALUES.contains(cell))
                .map(|cell| parse(cell.trim()).ok_or_else(|| refused(row, cell)))
                .transpose()
        })
        .collect()
}

/// A column type as `types` writes it.
fn type_name(data_type: &DataType) -> &'static str {
    match data_type {
        DataType::Int64 => CsvType::Int64.name(),
        DataType::Float64 => CsvType::Float64.name(),
        DataType::Boolean => CsvType::Boolean.name(),
        _ => CsvType::String.name(),
    }
}

/// A CSV record Arrow could not read, located at its file line. Arrow numbers records (the
/// header is 1), which is the file line only while no quoted field holds a line break: the
/// record's number is mapped back to its line by scanning the file. A quote left open before
/// the record is the likelier cause and is named instead.
fn csv_error(key: &str, path: &Path, typed: &Schema, message: &str) -> StageError {
    let number_after = |marker: &str| -> Option<(usize, usize, u64)> {
        let start = message.find(marker)? + marker.len();
        let end = message[start..]
            .find(|c: char| !c.is_ascii_digit())
            .map_or(message.len(), |end| start + end);
        Some((start, end, message[start..end].parse().ok()?))
    };
    let scanned = scan_csv_file(path);
    if let Some(line) = scanned.as_ref().and_then(CsvScan::open_quote) {
        return StageError::user(format!(
            "{key}: line {line}: a quote opened here is never closed"
        ));
    }
    let line_of = |number: u64| {
        number
            .checked_sub(1)
            .and_then(|record| csv_line_of_record(path, record))
    };
    // "incorrect number of fields for line N, expected E got F"
    if let Some((_, end, number)) = number_after("incorrect number of fields for line ") {
        let rest = message[end..].trim_start_matches(',').trim();
        let line = line_of(number).unwrap_or(number);
        return StageError::user(format!(
            "{key}: line {line}: bad CSV record: {} fields where line 1 names {} columns",
            rest.rsplit(' ').next().unwrap_or("?"),
            typed.fields().len()
        ));
    }
    // "Encountered invalid UTF-8 data for line N and field F"
    if let Some((_, end, number)) = number_after("invalid UTF-8 data for line ") {
        let field = message[end..]
            .trim_start_matches(" and field ")
            .trim()
            .parse::<usize>()
            .ok()
            .and_then(|index| typed.fields().get(index))
            .map_or(String::new(), |field| {
                format!("column `{}`: ", field.name())
            });
        let line = line_of(number).unwrap_or(number);
        return StageError::user(format!("{key}: line {line}: {field}not valid UTF-8"));
    }
    StageError::user(format!("{key}: bad CSV record: {message}"))
}

/// Where a CSV scanner stands (the grammar Arrow's reader follows: a quote opens a quoted field
/// only at the start of a field, `""` inside it is a quote, blank lines are skipped).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum CsvState {
    #[default]
    RecordStart,
    FieldStart,
    Unquoted,
    Quoted,
    QuoteInQuoted,
}

/// Tracks records and file lines over the bytes of a CSV file.
#[derive(Debug, Default)]
struct CsvScan {
    state: CsvState,
    /// Line breaks seen so far (the current line is this + 1).
    breaks: u64,
    /// Records started so far (the header is the first).
    records: u64,
    /// Line where the quoted field being read opened.
    quote_line: u64,
    /// Whether the end of the file was read.
    at_end: bool,
}

impl CsvScan {
    /// Feed bytes; `on_record(record, line)` is told of each record as it starts (record from
    /// 0, the header being 0; line from 1) and returns whether to go on.
    fn feed(&mut self, bytes: &[u8], mut on_record: impl FnMut(u64, u64) -> bool) -> bool {
        for &byte in bytes {
            if self.state == CsvState::RecordStart {
                if byte == b'\n' || byte == b'\r' {
                    self.breaks += u64::from(byte == b'\n');
                    continue;
                }
                self.records += 1;
                if !on_record(self.records - 1, self.breaks + 1) {
                    return false;
                }
                self.state = CsvState::FieldStart;
            }
            self.state = match (self.state, byte) {
                (CsvState::Quoted, b'"') => CsvState::QuoteInQuoted,
                (CsvState::Quoted, _) => CsvState::Quoted,
                (CsvState::QuoteInQuoted, b'"') => CsvState::Quoted,
                (CsvState::FieldStart, b'"') => {
                    self.quote_line = self.breaks + 1;
                    CsvState::Quoted
                }
                (_, b',') => CsvState::FieldStart,
                (_, b'\n' | b'\r') => CsvState::RecordStart,
                _ => CsvState::Unquoted,
            };
            self.breaks += u64::from(byte == b'\n');
        }
        true
    }

    /// The line of a quoted field still open (at the end of the file).
    fn open_quote(&self) -> Option<u64> {
        (self.state == CsvState::Quoted).then_some(self.quote_line)
    }
}

/// Scan a whole CSV file (error paths only).
fn scan_csv_file(path: &Path) -> Option<CsvScan> {
    use std::io::Read;
    let mut file = open(path).ok()?;
    let mut scan = CsvScan::default();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = file.read(&mut buffer).ok()?;
        if read == 0 {
            return Some(scan);
        }
        scan.feed(&buffer[..read], |_, _| true);
    }
}

/// The file line (from 1) where record `record` (from 0, the header being 0) starts.
fn csv_line_of_record(path: &Path, record: u64) -> Option<u64> {
    use std::io::Read;
    let mut file = open(path).ok()?;
    let mut scan = CsvScan::default();
    let mut found = None;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = file.read(&mut buffer).ok()?;
        if read == 0 {
            return None;
        }
        let go_on = scan.feed(&buffer[..read], |index, line| {
            if index == record {
                found = Some(line);
            }
            found.is_none()
        });
        if !go_on {
            return found;
        }
    }
}

/// A reader that scans the CSV bytes it passes on, so a quote still open at the end of the file
/// is known without reading it twice.
struct ScanningReader {
    inner: File,
    scan: std::rc::Rc<std::cell::RefCell<CsvScan>>,
}

impl std::io::Read for ScanningReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buffer)?;
        let mut scan = self.scan.borrow_mut();
        scan.at_end |= read == 0 && !buffer.is_empty();
        scan.feed(&buffer[..read], |_, _| true);
        Ok(read)
    }
}

/// Decode a JSON-lines file into batches of `schema`, line by line and strictly: every
/// non-blank line is exactly one JSON object (serde_json's grammar: no trailing comma, no second
/// value on the line), and a number in an integer column is an integer (Arrow's decoder alone
/// accepts all three, and truncates 1.5 to 1). Errors name the file, the line and the cause.
/// `on_batch` returns whether to go on.
fn decode_jsonl(
    key: &str,
    path: &Path,
    schema: &SchemaRef,
    mut on_batch: impl FnMut(RecordBatch) -> Result<bool, StageError>,
) -> Result<(), StageError> {
    use std::io::BufRead;
    let at = |line: u64, cause: String| StageError::user(format!("{key}: line {line}: {cause}"));
    // A value that does not fit its column shows when a batch is built, not on its line: found
    // by decoding the lines one at a time again (only on this error path).
    let flush_error = |error: arrow::error::ArrowError| {
        StageError::user(jsonl_error(key, path, Some(schema), &error.to_string()))
    };
    let mut decoder = arrow::json::ReaderBuilder::new(schema.clone())
        .with_batch_size(BATCH_ROWS)
        .build_decoder()
        .map_err(|e| StageError::user(format!("{key}: {e}")))?;
    let integer_columns: Vec<&str> = schema
        .fields()
        .iter()
        .filter(|field| field.data_type().is_integer())
        .map(|field| field.name().as_str())
        .collect();
    let mut reader = BufReader::new(open(path).map_err(StageError::User)?);
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| at(number + 1, format!("cannot read: {e}")))?;
        if read == 0 {
            break;
        }
        number += 1;
        let Some(text) = record_text(&line, number).map_err(|cause| at(number, cause))? else {
            continue;
        };
        if let Some((name, value)) = strict_record(text, &integer_columns)
            .map_err(|error| at(number, json_syntax_cause(&error)))?
        {
            return Err(at(
                number,
                format!(
                    "`{name}` is {value}, but the column holds integers (its type is inferred from every record, and this one is an integer elsewhere)"
                ),
            ));
        }
        // The line as read (its line end separates it from the next record), past a mark.
        let mut bytes: &[u8] = &line;
        if number == 1 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        while !bytes.is_empty() {
            let used = decoder
                .decode(bytes)
                .map_err(|error| at(number, error.to_string()))?;
            bytes = &bytes[used..];
            if !bytes.is_empty() || decoder.len() >= BATCH_ROWS {
                // The batch is full: hand it on before decoding the rest of the line.
                if let Some(batch) = decoder.flush().map_err(flush_error)? {
                    if !on_batch(batch)? {
                        return Ok(());
                    }
                }
            }
        }
    }
    if let Some(batch) = decoder.flush().map_err(flush_error)? {
        on_batch(batch)?;
    }
    Ok(())
}

fn open_row_group(
    path: &Path,
    key: &str,
    indices: &[usize],
    group: usize,
) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader, StageError> {
    let handle =
        File::open(path).map_err(|e| StageError::user(format!("{key}: cannot open: {e}")))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(handle)
        .map_err(|e| StageError::user(format!("{key}: not a readable Parquet file: {e}")))?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices.iter().copied());
    builder
        .with_projection(mask)
        .with_row_groups(vec![group])
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| StageError::user(format!("{key}, row group {group}: {e}")))
}

/// A decoding error in a row group: find which column fails by decoding each alone.
fn describe_parquet_error(
    path: &Path,
    key: &str,
    schema: &Schema,
    indices: &[usize],
    group: usize,
    message: &str,
) -> StageError {
    for &index in indices {
        let Ok(reader) = open_row_group(path, key, &[index], group) else {
            continue;
        };
        for batch in reader {
            if let Err(error) = batch {
                return StageError::user(format!(
                    "{key}, row group {group}, column `{}`: cannot decode: {error}",
                    schema.field(index).name()
                ));
            }
        }
    }
    StageError::user(format!(
        "{key}, row group {group}: cannot decode: {message}"
    ))
}

/// Read every batch of one of our own Parquet artifacts (no mapping), for stages downstream of
/// ingest. Errors name the file and row group.
pub fn read_artifact(
    path: &Path,
    mut visit: impl FnMut(RecordBatch) -> Result<(), StageError>,
) -> Result<SchemaRef, StageError> {
    let shown = path.display().to_string();
    let handle = File::open(path).map_err(|e| StageError::user(format!("{shown}: {e}")))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(handle)
        .map_err(|e| StageError::user(format!("{shown}: not a readable Parquet file: {e}")))?;
    let schema = builder.schema().clone();
    let reader = builder
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| StageError::user(format!("{shown}: {e}")))?;
    for batch in reader {
        let batch = batch.map_err(|e| StageError::user(format!("{shown}: cannot decode: {e}")))?;
        visit(batch)?;
    }
    Ok(schema)
}

/// Row count of a Parquet file from its footer.
pub fn parquet_row_count(path: &Path) -> Result<u64, StageError> {
    let shown = path.display().to_string();
    let handle = File::open(path).map_err(|e| StageError::user(format!("{shown}: {e}")))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(handle)
        .map_err(|e| StageError::user(format!("{shown}: not a readable Parquet file: {e}")))?;
    Ok(u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0))
}

/// Whether an array holds UTF-8 strings of any layout.
pub fn is_string(array: &dyn Array) -> bool {
    matches!(
        array.data_type(),
        arrow::datatypes::DataType::Utf8
            | arrow::datatypes::DataType::LargeUtf8
            | arrow::datatypes::DataType::Utf8View
    )
}
