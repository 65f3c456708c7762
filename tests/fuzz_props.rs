//! The fuzz targets of fuzz/ as proptest properties, so `cargo test` keeps them: the pipeline
//! loader, the safetensors header reader and the Parquet/CSV/JSONL readers return (Ok or an
//! error) on mutated valid files — truncated, with bytes overwritten or inserted — on arbitrary
//! bytes, and on safetensors headers with hostile shapes and offsets, and never panic. Few cases each, so the whole file takes seconds.

use std::path::Path;

use peftpipe::config::InputFile;
use peftpipe::data::source::{peek_schema, scan, SourceSpec};
use proptest::prelude::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A mutation of a valid file.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Overwrite(usize, Vec<u8>),
    Insert(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Overwrite(at, bytes)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
    ]
}

/// A size from a header: small, anywhere, or at the top of the range (where sums overflow).
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..64, any::<u64>(), (u64::MAX - 64)..=u64::MAX]
}

fn mutate(original: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = original.to_vec();
    for mutation in mutations {
        let length = bytes.len().max(1);
        match mutation {
            Mutation::Truncate(at) => bytes.truncate(at % length),
            Mutation::Overwrite(at, new) => {
                let start = at % length;
                for (offset, byte) in new.iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(start + offset) {
                        *slot = *byte;
                    }
                }
            }
            Mutation::Insert(at, new) => {
                let start = (at % length).min(bytes.len());
                bytes.splice(start..start, new.iter().copied());
            }
        }
    }
    bytes
}

fn load_pipeline_bytes(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = peftpipe::config::load::parse_yaml(text);
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, bytes).expect("write");
    let _ = peftpipe::config::load::load_pipeline(&file, &[], &peftpipe::probe::StandardProbe);
}

fn read_safetensors_bytes(bytes: &[u8]) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("model.safetensors");
    std::fs::write(&file, bytes).expect("write");
    let _ = peftpipe::models::load::read_safetensors_header(&file);
}

fn read_data_bytes(extension: &str, bytes: &[u8]) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let key = format!("input.{extension}");
    let path = dir.path().join(&key);
    std::fs::write(&path, bytes).expect("write");
    let _ = peek_schema(&path, None);
    let spec = SourceSpec {
        files: vec![InputFile { key, path }],
        format: None,
        columns: Vec::new(),
        rename: indexmap::IndexMap::new(),
        types: indexmap::IndexMap::new(),
        limit: Some(100_000),
    };
    let _ = scan(&spec, |_, _| Ok(()));
}

/// A small valid safetensors file: the header of two f32 tensors and their bytes.
fn small_safetensors() -> Vec<u8> {
    let header = br#"{"a.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b.weight":{"dtype":"F32","shape":[4],"data_offsets":[16,32]},"__metadata__":{"format":"pt"}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 32]);
    bytes
}

const CSV: &[u8] = b"text,label\ngreat album,positive\n\"awful, really\",negative\n,\n";
const JSONL: &[u8] =
    b"{\"text\": \"great album\", \"label\": \"positive\"}\n{\"text\": null, \"label\": 3}\n";

/// The crashing inputs kept under fuzz/corpus/safetensors_header/ read back as an error, not a
/// panic; among them an overflowing shape with a reversed span (both sizes unknown, once taken
/// as "equal", then `data_start + begin` overflowed).
#[test]
fn the_safetensors_crash_corpus_is_refused_cleanly() {
    let corpus = repo().join("fuzz/corpus/safetensors_header");
    for entry in std::fs::read_dir(&corpus).expect("corpus") {
        let path = entry.expect("entry").path();
        if path
            .file_name()
            .is_some_and(|name| name == "two_tensors.safetensors")
        {
            continue; // a valid seed
        }
        let result = peftpipe::models::load::read_safetensors_header(&path);
        assert!(result.is_err(), "{} was accepted", path.display());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_pipeline_loader_survives_mutated_pipelines(mutations in prop::collection::vec(mutation(), 1..4)) {
        let original = std::fs::read(repo().join("pipelines/quickstart.yaml")).expect("quickstart");
        load_pipeline_bytes(&mutate(&original, &mutations));
    }

    #[test]
    fn the_pipeline_loader_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        load_pipeline_bytes(&bytes);
    }

    #[test]
    fn the_safetensors_header_reader_survives_mutations(mutations in prop::collection::vec(mutation(), 1..4)) {
        read_safetensors_bytes(&mutate(&small_safetensors(), &mutations));
    }

    #[test]
    fn the_safetensors_header_reader_survives_arbitrary_headers(
        length in any::<u64>(),
        header in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = length.to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        read_safetensors_bytes(&bytes);
    }

    #[test]
    fn the_safetensors_header_reader_survives_hostile_sizes(
        tensors in prop::collection::vec(
            (
                prop::sample::select(vec!["F32", "BF16", "I64", "U8", "F8_E4M3", "??"]),
                prop::collection::vec(size(), 0..4),
                size(),
                size(),
            ),
            1..4,
        ),
    ) {
        let mut header = serde_json::Map::new();
        for (index, (dtype, shape, begin, end)) in tensors.into_iter().enumerate() {
            header.insert(
                format!("t{index}"),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}),
            );
        }
        let json = serde_json::to_vec(&header).expect("encode");
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&json);
        bytes.extend_from_slice(&[0u8; 64]);
        read_safetensors_bytes(&bytes);
    }

    #[test]
    fn the_parquet_reader_survives_mutations(mutations in prop::collection::vec(mutation(), 1..4)) {
        let original = std::fs::read(repo().join("tests/fixtures/invalid/reviews.parquet")).expect("parquet");
        read_data_bytes("parquet", &mutate(&original, &mutations));
    }

    #[test]
    fn the_csv_reader_survives_mutations(mutations in prop::collection::vec(mutation(), 1..4)) {
        read_data_bytes("csv", &mutate(CSV, &mutations));
    }

    #[test]
    fn the_jsonl_reader_survives_mutations(mutations in prop::collection::vec(mutation(), 1..4)) {
        read_data_bytes("jsonl", &mutate(JSONL, &mutations));
    }
}
