//! Writing Parquet artifacts incrementally: a thin [`ParquetSink`] over parquet's `ArrowWriter`
//! that bounds the buffered row group (by rows and bytes) so memory does not grow with the
//! output, and writes through a temporary name renamed into place on `finish`, so a crash never
//! leaves a complete-looking file. Also the JSON side files (atomic).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::stages::StageError;

/// Rows per row group written.
const ROW_GROUP_ROWS: usize = 64 * 1024;
/// Flush the row group once its buffered size passes this many bytes.
const ROW_GROUP_BYTES: usize = 48 * 1024 * 1024;

/// An incremental Parquet writer for one artifact file.
pub struct ParquetSink {
    writer: ArrowWriter<BufWriter<File>>,
    temporary: PathBuf,
    path: PathBuf,
    rows: u64,
}

impl ParquetSink {
    /// Create `path` (written as `path.partial`, renamed on [`ParquetSink::finish`]).
    /// `compressed`: snappy for artifacts, none for scratch files.
    pub fn create(path: &Path, schema: SchemaRef, compressed: bool) -> Result<Self, StageError> {
        let mut name = path.as_os_str().to_owned();
        name.push(".partial");
        let temporary = PathBuf::from(name);
        let file = File::create(&temporary)
            .map_err(|e| StageError::user(format!("cannot create {}: {e}", temporary.display())))?;
        let properties = WriterProperties::builder()
            .set_compression(if compressed {
                Compression::SNAPPY
            } else {
                Compression::UNCOMPRESSED
            })
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        let writer = ArrowWriter::try_new(BufWriter::new(file), schema, Some(properties))
            .map_err(|e| StageError::Internal(format!("{}: {e}", path.display())))?;
        Ok(ParquetSink {
            writer,
            temporary,
            path: path.to_path_buf(),
            rows: 0,
        })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), StageError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.writer
            .write(batch)
            .map_err(|e| StageError::user(format!("writing {}: {e}", self.path.display())))?;
        self.rows += batch.num_rows() as u64;
        if self.writer.in_progress_size() > ROW_GROUP_BYTES {
            self.writer
                .flush()
                .map_err(|e| StageError::user(format!("writing {}: {e}", self.path.display())))?;
        }
        Ok(())
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Close the file and rename it into place. Returns the rows written.
    pub fn finish(self) -> Result<u64, StageError> {
        let ParquetSink {
            writer,
            temporary,
            path,
            rows,
        } = self;
        writer
            .close()
            .map_err(|e| StageError::user(format!("writing {}: {e}", path.display())))?;
        std::fs::rename(&temporary, &path)
            .map_err(|e| StageError::user(format!("cannot rename to {}: {e}", path.display())))?;
        Ok(rows)
    }
}

/// Write a JSON value to `path` atomically (pretty, trailing newline).
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), StageError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| StageError::Internal(format!("serializing {}: {e}", path.display())))?;
    text.push('\n');
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    let temporary = PathBuf::from(name);
    std::fs::write(&temporary, text)
        .map_err(|e| StageError::user(format!("cannot write {}: {e}", temporary.display())))?;
    std::fs::rename(&temporary, path)
        .map_err(|e| StageError::user(format!("cannot rename to {}: {e}", path.display())))
}
