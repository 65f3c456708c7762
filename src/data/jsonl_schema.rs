//! The column types of a JSON-lines file: what arrow's inference finds over every record, found
//! cheaply. Arrow infers from the first [`SAMPLE_RECORDS`] records; then every record is checked
//! against those types by a streaming pass that allocates nothing (serde with a seed per type).
//! Only when some record does not fit them (a key first seen later, an integer key holding a
//! fraction, a nested field added) does arrow infer again from every record, so the result is
//! always arrow's whole-file inference. Results are kept per file (path, size, modification
//! time) for the life of the process: `run` validates, plans and reads a file more than once.

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use arrow::datatypes::{DataType, Fields, Schema};
use arrow::error::ArrowError;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Records arrow infers from before the whole file is checked against its types.
pub const SAMPLE_RECORDS: usize = 1000;

type Key = (PathBuf, u64, Option<SystemTime>);

fn memo() -> &'static Mutex<HashMap<Key, Schema>> {
    static MEMO: OnceLock<Mutex<HashMap<Key, Schema>>> = OnceLock::new();
    MEMO.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The schema arrow infers from every record of the JSON-lines file at `path`; `open` opens it
/// for reading from its first record (each call a fresh reader). Errors are arrow's, from the
/// whole-file inference.
pub fn infer<R: Read>(
    path: &Path,
    open: impl Fn() -> Result<BufReader<R>, String>,
) -> Result<Schema, InferError> {
    let key = std::fs::metadata(path)
        .ok()
        .map(|meta| (path.to_path_buf(), meta.len(), meta.modified().ok()));
    if let Some(key) = &key {
        if let Some(schema) = memo().lock().ok().and_then(|memo| memo.get(key).cloned()) {
            return Ok(schema);
        }
    }
    let mut reader = open().map_err(InferError::Io)?;
    let sampled = arrow::json::reader::infer_json_schema(&mut reader, Some(SAMPLE_RECORDS))
        .map(|(schema, _)| schema);
    let schema = match sampled {
        Ok(schema) if every_record_fits(open()?, &schema) => schema,
        // Something later does not fit the sample's types (or the sample itself failed):
        // arrow's inference over every record decides (or says what is wrong).
        _ => arrow::json::reader::infer_json_schema(&mut open().map_err(InferError::Io)?, None)
            .map(|(schema, _)| schema)
            .map_err(InferError::Arrow)?,
    };
    if let (Some(key), Ok(mut memo)) = (key, memo().lock()) {
        memo.insert(key, schema.clone());
    }
    Ok(schema)
}

/// Why inference failed.
#[derive(Debug)]
pub enum InferError {
    /// The file could not be opened or read.
    Io(String),
    /// Arrow's inference over every record failed (syntax, a key of two kinds).
    Arrow(ArrowError),
}

impl fmt::Display for InferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InferError::Io(message) => write!(f, "{message}"),
            InferError::Arrow(error) => write!(f, "{error}"),
        }
    }
}

impl From<String> for InferError {
    fn from(message: String) -> Self {
        InferError::Io(message)
    }
}

/// Whether every record (non-blank line) of `reader` parses and fits `schema` as it is: no key it
/// lacks, no value of another kind (an integer fits a float column, null fits any).
fn every_record_fits<R: Read>(reader: BufReader<R>, schema: &Schema) -> bool {
    let root = DataType::Struct(schema.fields().clone());
    for line in reader.split(b'\n') {
        let Ok(line) = line else {
            return false;
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let mut deserializer = serde_json::Deserializer::from_slice(&line);
        match Fits(&root).deserialize(&mut deserializer) {
            Ok(true) if deserializer.end().is_ok() => {}
            _ => return false,
        }
    }
    true
}

/// Deserializes a JSON value into whether it fits a column of this type.
struct Fits<'a>(&'a DataType);

impl<'de> DeserializeSeed<'de> for Fits<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Fits<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a JSON value")
    }

    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(true)
    }

    fn visit_none<E>(self) -> Result<bool, E> {
        Ok(true)
    }

    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(matches!(self.0, DataType::Boolean))
    }

    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(matches!(self.0, DataType::Int64 | DataType::Float64))
    }

    fn visit_u64<E>(self, value: u64) -> Result<bool, E> {
        Ok(i64::try_from(value).is_ok() && matches!(self.0, DataType::Int64 | DataType::Float64))
    }

    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(matches!(self.0, DataType::Float64))
    }

    fn visit_str<E>(self, _: &str) -> Result<bool, E> {
        Ok(matches!(self.0, DataType::Utf8))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let DataType::List(item) = self.0 else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(false);
        };
        let mut fits = true;
        while let Some(element) = seq.next_element_seed(Fits(item.data_type()))? {
            fits &= element;
        }
        Ok(fits)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let DataType::Struct(fields) = self.0 else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(false);
        };
        let mut fits = true;
        while let Some(field) = map.next_key_seed(FieldOf(fields))? {
            match field {
                Some(index) => fits &= map.next_value_seed(Fits(fields[index].data_type()))?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                    fits = false;
                }
            }
        }
        Ok(fits)
    }
}

/// Deserializes an object key into the index of the struct field it names (None: no such field).
struct FieldOf<'a>(&'a Fields);

impl<'de> DeserializeSeed<'de> for FieldOf<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldOf<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.find(key).map(|(index, _)| index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole_file(text: &str) -> Schema {
        arrow::json::reader::infer_json_schema(&mut BufReader::new(text.as_bytes()), None)
            .unwrap()
            .0
    }

    fn inferred(text: &str) -> Schema {
        // A path that does not exist: nothing is kept between the cases.
        infer(Path::new("/nonexistent/in-memory.jsonl"), || {
            Ok(BufReader::new(text.as_bytes()))
        })
        .unwrap()
    }

    #[test]
    fn the_result_is_whole_file_inference_whatever_comes_after_the_sample() {
        let sample: String = (0..SAMPLE_RECORDS)
            .map(|i| format!("{{\"text\": \"row {i}\", \"n\": {i}, \"tags\": [\"a\"], \"meta\": {{\"k\": 1}}}}\n"))
            .collect();
        for later in [
            // fits: the sample's types stand
            "{\"text\": \"x\", \"n\": null, \"tags\": [], \"meta\": {}}\n",
            "\n   \n{\"text\": \"é\\u00e9\", \"n\": 3}\n",
            // does not fit: arrow decides from every record
            "{\"text\": \"x\", \"late\": true}\n",
            "{\"text\": \"x\", \"n\": 1.5}\n",
            "{\"text\": \"x\", \"meta\": {\"k\": 2, \"new\": \"y\"}}\n",
            "{\"text\": \"x\", \"tags\": [1]}\n",
        ] {
            let text = format!("{sample}{later}");
            assert_eq!(inferred(&text), whole_file(&text), "{later}");
        }
    }

    #[test]
    fn a_broken_record_after_the_sample_is_arrows_error() {
        let mut text: String = (0..SAMPLE_RECORDS + 5)
            .map(|i| format!("{{\"text\": \"row {i}\"}}\n"))
            .collect();
        text.push_str("{\"text\": \n");
        let error = infer(Path::new("/nonexistent/broken.jsonl"), || {
            Ok(BufReader::new(text.as_bytes()))
        })
        .unwrap_err();
        assert!(matches!(error, InferError::Arrow(_)), "{error}");
    }
}
