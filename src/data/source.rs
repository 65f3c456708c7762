//! Reading tabular input: peeking at column names without reading rows (Parquet footer, CSV header, first JSONL lines),
//! and streaming mapped (selected + renamed) record batches across files. Expanding a path / glob /
//! directory into files with stable keys is the core's `config::input` (re-exported here: the
//! fingerprint needs it without Arrow).
//!
//! Owns: format detection, projection, schema agreement across files and error messages that name
//! the file, the row group (Parquet) or row range and, when it can be found, the column. It must not
//! filter, split or hold more than one batch at a time.

use std::fs::File;
use std::io::{BufReader, Seek};
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use indexmap::IndexMap;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::config::ingest::InputFormat;
use crate::config::InputFile;
use crate::stages::StageError;

pub use crate::config::input::{expand_input, format_of};

/// Rows per record batch read from the inputs.
pub const BATCH_ROWS: usize = 8192;

/// How many records schema inference reads from a JSONL or CSV file.
const INFER_RECORDS: usize = 1000;

fn resolve_format(path: &Path, format: Option<InputFormat>) -> Result<InputFormat, String> {
    format.or_else(|| format_of(path)).ok_or_else(|| {
        format!(
            "cannot tell the format of {} from its extension; set `format: parquet|jsonl|csv`",
            path.display()
        )
    })
}

/// The Arrow schema of a file without reading its rows (Parquet footer, CSV header + the first
/// records, JSONL first records).
pub fn peek_schema(path: &Path, format: Option<InputFormat>) -> Result<Schema, String> {
    match resolve_format(path, format)? {
        InputFormat::Parquet => {
            let file = open(path)?;
            let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| format!("{}: cannot read the Parquet footer: {e}", path.display()))?;
            Ok(builder.schema().as_ref().clone())
        }
        InputFormat::Jsonl => {
            let mut reader = BufReader::new(open(path)?);
            let (schema, _) =
                arrow::json::reader::infer_json_schema(&mut reader, Some(INFER_RECORDS))
                    .map_err(|e| format!("{}: not valid JSON lines: {e}", path.display()))?;
            Ok(schema)
        }
        InputFormat::Csv => {
            let reader = open(path)?;
            let (schema, _) = arrow::csv::reader::Format::default()
                .with_header(true)
                .infer_schema(reader, Some(INFER_RECORDS))
                .map_err(|e| format!("{}: cannot read the CSV header: {e}", path.display()))?;
            Ok(schema)
        }
    }
}

/// Column names of a file (see [`peek_schema`]).
pub fn peek_columns(path: &Path, format: Option<InputFormat>) -> Result<Vec<String>, String> {
    Ok(peek_schema(path, format)?
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect())
}

fn open(path: &Path) -> Result<File, String> {
    File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))
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
    let schema = peek_schema(&first.path, spec.format).map_err(StageError::User)?;
    let indices = Mapper::indices(spec, &first.key, &schema)?;
    let fields: Vec<Field> = indices
        .iter()
        .map(|&index| {
            let field = schema.field(index);
            let name = spec.rename.get(field.name()).unwrap_or(field.name());
            Field::new(name, field.data_type().clone(), true)
        })
        .collect();
    Ok(Arc::new(Schema::new(fields)))
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
            fields.push(Field::new(new_name, field.data_type().clone(), true));
            columns.push(batch.column(index).clone());
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
    // The JSONL schema is inferred once (from the first JSONL file) so every file decodes alike.
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
                let handle = File::open(&file.path)
                    .map_err(|e| StageError::user(format!("{}: cannot open: {e}", file.key)))?;
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
                        let mut reader = BufReader::new(File::open(&file.path).map_err(|e| {
                            StageError::user(format!("{}: cannot open: {e}", file.key))
                        })?);
                        let (schema, _) = arrow::json::reader::infer_json_schema_from_seekable(
                            &mut reader,
                            Some(INFER_RECORDS),
                        )
                        .map_err(|e| {
                            StageError::user(format!("{}: not valid JSON lines: {e}", file.key))
                        })?;
                        let schema = Arc::new(schema);
                        jsonl_schema = Some(schema.clone());
                        schema
                    }
                };
                Mapper::indices(spec, &file.key, &schema)?;
                let handle = File::open(&file.path)
                    .map_err(|e| StageError::user(format!("{}: cannot open: {e}", file.key)))?;
                let reader = arrow::json::ReaderBuilder::new(schema)
                    .with_batch_size(BATCH_ROWS)
                    .build(BufReader::new(handle))
                    .map_err(|e| StageError::user(format!("{}: {e}", file.key)))?;
                for batch in reader {
                    let batch = batch.map_err(|e| {
                        StageError::user(format!(
                            "{}: invalid JSON line in the batch starting at line {}: {e}",
                            file.key,
                            in_file + 1
                        ))
                    })?;
                    if !emit(batch, None, &mut in_file, &mut total)? {
                        break;
                    }
                }
            }
            InputFormat::Csv => {
                let mut handle = File::open(&file.path)
                    .map_err(|e| StageError::user(format!("{}: cannot open: {e}", file.key)))?;
                let (schema, _) = arrow::csv::reader::Format::default()
                    .with_header(true)
                    .infer_schema(BufReader::new(&mut handle), Some(INFER_RECORDS))
                    .map_err(|e| StageError::user(format!("{}: bad CSV header: {e}", file.key)))?;
                handle
                    .rewind()
                    .map_err(|e| StageError::user(format!("{}: {e}", file.key)))?;
                let schema = Arc::new(schema);
                Mapper::indices(spec, &file.key, &schema)?;
                let reader = arrow::csv::ReaderBuilder::new(schema)
                    .with_header(true)
                    .with_batch_size(BATCH_ROWS)
                    .build(BufReader::new(handle))
                    .map_err(|e| StageError::user(format!("{}: {e}", file.key)))?;
                for batch in reader {
                    let batch = batch.map_err(|e| {
                        StageError::user(format!(
                            "{}: bad CSV record in the batch starting at data row {}: {e}",
                            file.key,
                            in_file + 1
                        ))
                    })?;
                    if !emit(batch, None, &mut in_file, &mut total)? {
                        break;
                    }
                }
            }
        }
    }
    Ok((total, mapper.schema))
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
