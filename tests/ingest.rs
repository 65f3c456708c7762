//! The ingest stage on small generated Parquet / JSONL / CSV files in temp dirs: filters, dedup,
//! stratified split proportions, determinism, shards, row limits and errors on corrupt or
//! mistyped input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use peftpipe::config::IngestConfig;
use peftpipe::stages::{self, NullSink, RunOptions, StageContext, StageError, StageOutcome};

fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(name, array)| Field::new(*name, array.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let batch =
        RecordBatch::try_new(schema.clone(), columns.into_iter().map(|c| c.1).collect()).unwrap();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn strings(values: &[Option<&str>]) -> ArrayRef {
    Arc::new(StringArray::from(values.to_vec()))
}

fn config(yaml: &str) -> IngestConfig {
    let value: serde_json::Value = serde_norway::from_str(yaml).unwrap();
    serde_json::from_value(value).unwrap()
}

/// Run an ingest config with the pipeline directory `project`, writing into `out`.
fn run(
    config: &IngestConfig,
    project: &Path,
    out: &Path,
    seed: u64,
) -> Result<StageOutcome, StageError> {
    std::fs::create_dir_all(out).unwrap();
    let upstream = BTreeMap::new();
    let cancel = AtomicBool::new(false);
    let options = RunOptions::default();
    let ctx = StageContext {
        name: "data",
        project_dir: project,
        out_dir: out,
        upstream: &upstream,
        seed,
        progress: &NullSink,
        cancel: &cancel,
        options: &options,
        fingerprint: "",
        upstream_outcomes: &Default::default(),
        inputs: &Default::default(),
        checkpoint_dir: None,
        resume: true,
    };
    stages::build(&peftpipe::config::StageConfig::Ingest(config.clone())).run(&ctx)
}

/// Read a column of a Parquet artifact as strings (numbers in text form).
fn column(path: &Path, name: &str) -> Vec<Option<String>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let mut values = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let array = batch.column(batch.schema().index_of(name).unwrap());
        let text = arrow::compute::cast(array, &DataType::Utf8).unwrap();
        let text = text.as_any().downcast_ref::<StringArray>().unwrap();
        values.extend(text.iter().map(|v| v.map(str::to_string)));
    }
    values
}

fn stats(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap()
}

fn labelled_rows(dir: &Path, positives: usize, negatives: usize) -> PathBuf {
    let total = positives + negatives;
    let texts: Vec<String> = (0..total).map(|i| format!("review number {i}")).collect();
    let labels: Vec<&str> = (0..total)
        .map(|i| {
            if i < positives {
                "positive"
            } else {
                "negative"
            }
        })
        .collect();
    let ids: Vec<i64> = (0..total as i64).collect();
    let path = dir.join("rows.parquet");
    write_parquet(
        &path,
        vec![
            ("id", Arc::new(Int64Array::from(ids))),
            ("text", Arc::new(StringArray::from(texts))),
            ("label", Arc::new(StringArray::from(labels))),
        ],
    );
    path
}

#[test]
fn filters_nulls_and_dedup_drop_the_right_rows_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    write_parquet(
        &dir.path().join("in.parquet"),
        vec![
            (
                "text",
                strings(&[
                    Some("good film"),
                    None,
                    Some("ok"),
                    Some("good film"),
                    Some("bad plot"),
                    Some("fine acting"),
                    Some("bad plot"),
                    Some("nice"),
                ]),
            ),
            (
                "label",
                strings(&[
                    Some("positive"),
                    Some("negative"),
                    Some("positive"),
                    Some("positive"),
                    Some("negative"),
                    None,
                    Some("negative"),
                    Some("unsure"),
                ]),
            ),
        ],
    );
    let config = config(
        "path: in.parquet\nfilters:\n  - not_null: text\n  - length: {column: text, min: 3}\n  - in_set: {column: label, values: [positive, negative]}\ndrop_nulls: true\ndedup: [text]\nsplit: {fractions: {train: 0.5, eval: 0.5}}\n",
    );
    let out = dir.path().join("out");
    let outcome = run(&config, dir.path(), &out, 1).unwrap();
    let stats = stats(&out);
    assert_eq!(stats["rows_read"], 8);
    let dropped: Vec<u64> = stats["dropped"]["filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rows"].as_u64().unwrap())
        .collect();
    // not_null drops the null text, length drops "ok", in_set drops "unsure" and the null label.
    assert_eq!(dropped, vec![1, 1, 2]);
    assert_eq!(stats["dropped"]["drop_nulls"], 0);
    assert_eq!(stats["dropped"]["dedup"], 2);
    assert_eq!(stats["rows_kept"], 2);
    assert_eq!(stats["input_nulls"]["text"], 1);
    assert_eq!(outcome.summary["rows_kept"], 2);
    let mut kept: Vec<Option<String>> = column(&out.join("train.parquet"), "text");
    kept.extend(column(&out.join("eval.parquet"), "text"));
    kept.sort();
    assert_eq!(
        kept,
        vec![Some("bad plot".into()), Some("good film".into())]
    );
    assert!(!out.join("test.parquet").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        3,
        "only the artifact files remain: {leftovers:?}"
    );
}

#[test]
fn stratified_split_keeps_label_proportions_exactly() {
    let dir = tempfile::tempdir().unwrap();
    labelled_rows(dir.path(), 700, 300);
    let config = config(
        "path: rows.parquet\nsplit: {fractions: {train: 0.7, eval: 0.2, test: 0.1}, stratify_by: label}\n",
    );
    let out = dir.path().join("out");
    run(&config, dir.path(), &out, 3).unwrap();
    let count = |split: &str, label: &str| {
        column(&out.join(format!("{split}.parquet")), "label")
            .iter()
            .filter(|v| v.as_deref() == Some(label))
            .count()
    };
    assert_eq!(
        (count("train", "positive"), count("train", "negative")),
        (490, 210)
    );
    assert_eq!(
        (count("eval", "positive"), count("eval", "negative")),
        (140, 60)
    );
    assert_eq!(
        (count("test", "positive"), count("test", "negative")),
        (70, 30)
    );
    let stats = stats(&out);
    assert_eq!(stats["splits"]["eval"]["strata"]["negative"], 60);
    // Every id lands in exactly one split.
    let mut ids: Vec<i64> = ["train", "eval", "test"]
        .iter()
        .flat_map(|s| column(&out.join(format!("{s}.parquet")), "id"))
        .map(|v| v.unwrap().parse().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..1000).collect::<Vec<i64>>());
}

#[test]
fn counts_split_gives_train_the_rest_and_writes_a_test_file() {
    let dir = tempfile::tempdir().unwrap();
    labelled_rows(dir.path(), 50, 50);
    let config =
        config("path: rows.parquet\nshuffle: false\nsplit: {counts: {eval: 10, test: 5}}\n");
    let out = dir.path().join("out");
    run(&config, dir.path(), &out, 3).unwrap();
    assert_eq!(column(&out.join("train.parquet"), "id").len(), 85);
    assert_eq!(column(&out.join("eval.parquet"), "id").len(), 10);
    assert_eq!(column(&out.join("test.parquet"), "id").len(), 5);
    // Without shuffling, rows keep their input order within a split.
    let train: Vec<i64> = column(&out.join("train.parquet"), "id")
        .into_iter()
        .map(|v| v.unwrap().parse().unwrap())
        .collect();
    assert!(train.windows(2).all(|w| w[0] < w[1]));
    let too_many = config_with_counts(200);
    let error = run(&too_many, dir.path(), &dir.path().join("out2"), 3).unwrap_err();
    assert!(error.to_string().contains("only 100 rows"), "{error}");
}

fn config_with_counts(eval: u64) -> IngestConfig {
    config(&format!(
        "path: rows.parquet\nsplit: {{counts: {{eval: {eval}}}}}\n"
    ))
}

#[test]
fn same_seed_gives_identical_files_and_another_seed_does_not() {
    let dir = tempfile::tempdir().unwrap();
    labelled_rows(dir.path(), 120, 80);
    let config = config("path: rows.parquet\ndedup: [text]\nsplit: {fractions: {train: 0.8, eval: 0.2}, stratify_by: label}\n");
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    let other = dir.path().join("other");
    run(&config, dir.path(), &first, 42).unwrap();
    run(&config, dir.path(), &second, 42).unwrap();
    run(&config, dir.path(), &other, 43).unwrap();
    for name in ["train.parquet", "eval.parquet", "stats.json"] {
        assert_eq!(
            std::fs::read(first.join(name)).unwrap(),
            std::fs::read(second.join(name)).unwrap(),
            "{name} differs between two runs with one seed"
        );
    }
    assert_ne!(
        std::fs::read(first.join("train.parquet")).unwrap(),
        std::fs::read(other.join("train.parquet")).unwrap()
    );
}

#[test]
fn shards_in_a_glob_or_directory_are_read_in_order_with_stable_keys() {
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    for shard in 0..3 {
        let texts: Vec<String> = (0..10).map(|i| format!("shard {shard} row {i}")).collect();
        write_parquet(
            &shards.join(format!("part-{shard}.parquet")),
            vec![("text", Arc::new(StringArray::from(texts)) as ArrayRef)],
        );
    }
    let from_glob = config(
        "path: shards/part-*.parquet\nshuffle: false\nlimit: 25\nsplit: {counts: {eval: 0}}\n",
    );
    let files = from_glob.files(dir.path()).unwrap();
    let keys: Vec<&str> = files.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "shards/part-0.parquet",
            "shards/part-1.parquet",
            "shards/part-2.parquet"
        ]
    );
    let out = dir.path().join("out");
    run(&from_glob, dir.path(), &out, 0).unwrap();
    let texts = column(&out.join("train.parquet"), "text");
    assert_eq!(texts.len(), 25, "limit stops reading after 25 rows");
    assert_eq!(texts[24].as_deref(), Some("shard 2 row 4"));
    let from_dir = config("path: shards\n");
    assert_eq!(
        from_dir.files(dir.path()).unwrap()[2].key,
        "shards/part-2.parquet"
    );
}

#[test]
fn jsonl_and_csv_inputs_are_selected_and_renamed() {
    let dir = tempfile::tempdir().unwrap();
    let mut jsonl = String::new();
    for i in 0..20 {
        jsonl.push_str(&format!(
            "{{\"sentence\": \"line {i}\", \"score\": {i}, \"extra\": true}}\n"
        ));
    }
    std::fs::write(dir.path().join("rows.jsonl"), jsonl).unwrap();
    let mut csv = String::from("sentence,score,extra\n");
    for i in 0..20 {
        csv.push_str(&format!("\"line, {i}\",{i},x\n"));
    }
    std::fs::write(dir.path().join("rows.csv"), csv).unwrap();
    for file in ["rows.jsonl", "rows.csv"] {
        // CSV cells are text unless `types` says otherwise: the number 3 compares with integers.
        let types = if file.ends_with("csv") {
            "types: {score: int64}\n"
        } else {
            ""
        };
        let config = config(&format!(
            "path: {file}\n{types}columns: [score, sentence]\nrename: {{sentence: text}}\nfilters: [{{equals: {{column: score, value: 3}}}}]\nsplit: {{counts: {{eval: 0}}}}\n"
        ));
        let out = dir.path().join(format!("out-{file}"));
        run(&config, dir.path(), &out, 0).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(out.join("train.parquet")).unwrap(),
        )
        .unwrap();
        let names: Vec<String> = reader
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(names, vec!["score", "text"], "{file}");
        let texts = column(&out.join("train.parquet"), "text");
        let expected = if file.ends_with("csv") {
            "line, 3"
        } else {
            "line 3"
        };
        assert_eq!(texts, vec![Some(expected.to_string())], "{file}");
    }
}

#[test]
fn corrupt_parquet_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.parquet"),
        b"PAR1 this is not parquet",
    )
    .unwrap();
    let error = run(
        &config("path: broken.parquet\n"),
        dir.path(),
        &dir.path().join("out"),
        0,
    )
    .unwrap_err();
    assert!(error.to_string().contains("broken.parquet"), "{error}");
}

#[test]
fn corrupt_row_group_is_an_error_naming_file_row_group_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = labelled_rows(dir.path(), 300, 300);
    // Overwrite bytes inside the first column chunk's pages (after the 4-byte magic).
    let mut bytes = std::fs::read(&path).unwrap();
    let metadata = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
        .unwrap()
        .metadata()
        .clone();
    let text_chunk = metadata.row_group(0).column(1);
    let (start, length) = text_chunk.byte_range();
    for byte in &mut bytes[start as usize + 40..(start + length) as usize - 8] {
        *byte = 0xAB;
    }
    std::fs::write(&path, bytes).unwrap();
    let error = run(
        &config("path: rows.parquet\n"),
        dir.path(),
        &dir.path().join("out"),
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("rows.parquet"), "{error}");
    assert!(error.contains("row group 0"), "{error}");
    assert!(error.contains("column `text`"), "{error}");
}

#[test]
fn mistyped_shard_is_an_error_naming_file_and_column() {
    let dir = tempfile::tempdir().unwrap();
    write_parquet(
        &dir.path().join("a.parquet"),
        vec![("label", Arc::new(Int64Array::from(vec![1, 0])) as ArrayRef)],
    );
    write_parquet(
        &dir.path().join("b.parquet"),
        vec![("label", strings(&[Some("positive")]))],
    );
    let error = run(
        &config("path: '*.parquet'\n"),
        dir.path(),
        &dir.path().join("out"),
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("b.parquet") && error.contains("`label`"),
        "{error}"
    );
    let error = run(
        &config("path: a.parquet\nfilters: [{equals: {column: label, value: positive}}]\n"),
        dir.path(),
        &dir.path().join("out2"),
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("Int64"), "{error}");
}

#[test]
fn stats_report_length_percentiles_and_nulls_per_split() {
    let dir = tempfile::tempdir().unwrap();
    labelled_rows(dir.path(), 60, 40);
    let out = dir.path().join("out");
    run(&config("path: rows.parquet\n"), dir.path(), &out, 0).unwrap();
    let stats = stats(&out);
    let lengths = &stats["text_lengths"]["text"];
    // "review number 0" .. "review number 99": 15 or 16 characters.
    assert_eq!(lengths["min"], 15);
    assert_eq!(lengths["max"], 16);
    assert_eq!(lengths["count"], 100);
    assert_eq!(stats["splits"]["train"]["rows"], 90);
    assert_eq!(stats["splits"]["eval"]["nulls"]["text"], 0);
}

// Issue 7, item 15: errors name the file, the line and the real cause; an empty split fails at
// ingest; an all-null column is a column of nulls.

fn ingest_error(dir: &Path, yaml: &str) -> String {
    match run(&config(yaml), dir, &dir.join("out"), 0) {
        Ok(_) => panic!("ingest of {yaml:?} succeeded"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn an_empty_split_fails_at_ingest_naming_the_stage_and_the_split() {
    let dir = tempfile::tempdir().unwrap();
    labelled_rows(dir.path(), 2, 1);
    // 10% of 3 rows rounds to no eval row: train would pass, evaluate would fail on an empty file.
    let error = ingest_error(
        dir.path(),
        "path: rows.parquet\nsplit: {fractions: {train: 0.9, eval: 0.1}}\n",
    );
    assert!(
        error.contains("ingest stage `data` would write an empty `eval` split"),
        "{error}"
    );
    assert!(error.contains("3 rows are kept"), "{error}");
    assert!(
        error.contains("the split's fraction 0.1 of them rounds to none"),
        "{error}"
    );
    // Counts that take every row leave train empty, and say so.
    let error = ingest_error(
        dir.path(),
        "path: rows.parquet\nsplit: {counts: {eval: 2, test: 1}}\n",
    );
    assert!(error.contains("empty `train` split"), "{error}");
    assert!(
        error.contains("3 rows are kept and the other splits' counts (2 + 1) take them all"),
        "{error}"
    );
    // Every row filtered out: the train split is empty.
    let error = ingest_error(
        dir.path(),
        "path: rows.parquet\nfilters: [{equals: {column: label, value: neutral}}]\n",
    );
    assert!(error.contains("empty `train` split"), "{error}");
    assert!(error.contains("no row of the 3 read"), "{error}");
    // Nothing read at all: the input file is at fault and is named.
    let empty = tempfile::tempdir().unwrap();
    labelled_rows(empty.path(), 0, 0);
    let error = ingest_error(empty.path(), "path: rows.parquet\n");
    assert!(error.contains("empty `train` split"), "{error}");
    assert!(error.contains("rows.parquet holds no rows"), "{error}");
    // A split declared with size 0 may stay empty.
    run(
        &config("path: rows.parquet\nsplit: {counts: {eval: 0}}\n"),
        dir.path(),
        &dir.path().join("out-zero"),
        0,
    )
    .unwrap();
}

/// Regression: CSV columns that looked numeric were converted (`007` → 7, `1.50` → 1.5, `5` →
/// 5.0 once a later row held a fraction), as were booleans and dates; the text as written is
/// what fine-tuning reads.
#[test]
fn csv_cells_are_read_as_the_text_written_unless_types_says_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rows.csv"),
        "text,label,flag,day\n007,01,true,2024-01-05\n010,1.50,FALSE,2024-02-01\n5,3,,x\n",
    )
    .unwrap();
    let as_written = "path: rows.csv\nshuffle: false\nsplit: {counts: {eval: 0}}\n";
    let out = dir.path().join("out-text");
    run(&config(as_written), dir.path(), &out, 0).unwrap();
    let train = out.join("train.parquet");
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&train).unwrap()).unwrap();
    for field in reader.schema().fields() {
        assert_eq!(field.data_type(), &DataType::Utf8, "{field:?}");
    }
    let texts = |name: &str| -> Vec<Option<String>> { column(&train, name) };
    let some = |values: &[&str]| -> Vec<Option<String>> {
        values.iter().map(|v| Some(v.to_string())).collect()
    };
    assert_eq!(texts("text"), some(&["007", "010", "5"]));
    assert_eq!(texts("label"), some(&["01", "1.50", "3"]));
    // An empty cell of a text column is the empty string (pyarrow's default).
    assert_eq!(texts("flag"), some(&["true", "FALSE", ""]));
    assert_eq!(texts("day"), some(&["2024-01-05", "2024-02-01", "x"]));

    // `types` reads chosen columns as values.
    let typed = "path: rows.csv\nshuffle: false\ncolumns: [text, label, flag]\ntypes: {label: float64, flag: boolean}\nfilters: [{in_set: {column: label, values: [1, 1.5]}}]\nsplit: {counts: {eval: 0}}\n";
    let out = dir.path().join("out-typed");
    run(&config(typed), dir.path(), &out, 0).unwrap();
    let train = out.join("train.parquet");
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&train).unwrap()).unwrap();
    let types: Vec<DataType> = reader
        .schema()
        .fields()
        .iter()
        .map(|f| f.data_type().clone())
        .collect();
    assert_eq!(
        types,
        [DataType::Utf8, DataType::Float64, DataType::Boolean]
    );
    assert_eq!(column(&train, "text"), some(&["007", "010"]));
    assert_eq!(column(&train, "flag"), some(&["true", "false"]));

    // A cell a typed column cannot read names its line and column, and the option.
    let error = ingest_error(
        dir.path(),
        "path: rows.csv\ntypes: {day: int64}\nsplit: {counts: {eval: 0}}\n",
    );
    assert!(
        error.contains("rows.csv: line 2: column `day`: \"2024-01-05\" is not an integer")
            && error.contains("types"),
        "{error}"
    );
    // A number compared with a text column: the run refuses as validate does.
    let error = ingest_error(
        dir.path(),
        "path: rows.csv\nfilters: [{equals: {column: label, value: 1}}]\nsplit: {counts: {eval: 0}}\n",
    );
    assert!(error.contains("types: {label: int64}"), "{error}");
    // Written as a string, the value compares with the text.
    let out = dir.path().join("out-string");
    run(
        &config("path: rows.csv\nfilters: [{equals: {column: label, value: \"01\"}}]\nsplit: {counts: {eval: 0}}\n"),
        dir.path(),
        &out,
        0,
    )
    .unwrap();
    assert_eq!(column(&out.join("train.parquet"), "text"), some(&["007"]));
}

/// Regression: dedup compared keys as text, so `["a, b"]` equalled `["a", "b"]`, `[null]`
/// equalled `[""]`, and every non-UTF-8 binary value equalled null.
#[test]
fn dedup_compares_list_and_binary_keys_by_value() {
    use arrow::array::{BinaryArray, ListBuilder, StringBuilder};
    let dir = tempfile::tempdir().unwrap();
    let mut tags = ListBuilder::new(StringBuilder::new());
    for row in [
        vec![Some("a, b")],
        vec![Some("a"), Some("b")],
        vec![None],
        vec![Some("")],
        vec![None],
        vec![Some("a"), Some("b")],
    ] {
        for value in row {
            tags.values().append_option(value);
        }
        tags.append(true);
    }
    let bytes: Vec<Option<&[u8]>> = vec![
        Some(b"\xff"),
        None,
        Some(b"\xfe"),
        Some(b"\xff"),
        None,
        Some(b"ok"),
    ];
    write_parquet(
        &dir.path().join("in.parquet"),
        vec![
            (
                "id",
                Arc::new(Int64Array::from((0..6).collect::<Vec<i64>>())),
            ),
            ("tags", Arc::new(tags.finish())),
            ("blob", Arc::new(BinaryArray::from(bytes))),
        ],
    );
    let kept = |key: &str| {
        let out = dir.path().join(format!("out-{key}"));
        let yaml = format!(
            "path: in.parquet\ndedup: [{key}]\nshuffle: false\nsplit: {{counts: {{eval: 0}}}}\n"
        );
        run(&config(&yaml), dir.path(), &out, 0).unwrap();
        column(&out.join("train.parquet"), "id")
            .into_iter()
            .map(|id| id.unwrap().parse::<i64>().unwrap())
            .collect::<Vec<_>>()
    };
    // Only the second `[null]` (row 4) and the second `["a", "b"]` (row 5) are duplicates.
    assert_eq!(kept("tags"), [0, 1, 2, 3]);
    // 0xff twice (row 3) and null twice (row 4): 0xfe and "ok" are values of their own.
    assert_eq!(kept("blob"), [0, 1, 2, 5]);
}

/// Regression: JSONL column types came from the first 1000 records, so a key first seen after
/// them was dropped without a word (and `columns: [.., late]` said it was not in the file).
#[test]
fn a_jsonl_key_first_seen_late_in_the_file_is_a_column() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = String::new();
    for i in 0..1200 {
        if i == 1100 {
            rows.push_str(&format!("{{\"text\": \"row {i}\", \"late\": \"here\"}}\n"));
        } else {
            rows.push_str(&format!("{{\"text\": \"row {i}\"}}\n"));
        }
    }
    std::fs::write(dir.path().join("rows.jsonl"), rows).unwrap();
    let yaml = "path: rows.jsonl\ncolumns: [text, late]\nfilters: [not_null: late]\nsplit: {counts: {eval: 0}}\n";
    let columns =
        peftpipe::data::source::peek_columns(&dir.path().join("rows.jsonl"), None).unwrap();
    assert_eq!(columns, ["text", "late"]);
    let out = dir.path().join("out");
    run(&config(yaml), dir.path(), &out, 0).unwrap();
    assert_eq!(
        column(&out.join("train.parquet"), "text"),
        [Some("row 1100".to_string())]
    );
}

#[test]
fn a_bad_csv_record_names_its_line_not_the_header() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rows.csv"),
        "text,label\ngreat,positive,extra\nbad,negative\n",
    )
    .unwrap();
    let error = ingest_error(dir.path(), "path: rows.csv\n");
    assert!(error.contains("rows.csv"), "{error}");
    assert!(!error.contains("header"), "{error}");
    assert!(error.contains("line 2"), "{error}");
    // Regression: a quoted field holding line breaks made Arrow's record number lag the file
    // line (the ragged record on line 5 was "line 3").
    std::fs::write(
        dir.path().join("multiline.csv"),
        "text,label\n\"one\ntwo\nthree\",a\nbad,b,extra\n",
    )
    .unwrap();
    let error = ingest_error(dir.path(), "path: multiline.csv\n");
    assert!(
        error.contains("multiline.csv: line 5: bad CSV record"),
        "{error}"
    );
    // Regression: a quote never closed was "unequal lengths ... found 1".
    std::fs::write(
        dir.path().join("unclosed.csv"),
        "text,label\ngood,a\n\"never closed,b\nmore,c\n",
    )
    .unwrap();
    let error = ingest_error(dir.path(), "path: unclosed.csv\n");
    assert!(
        error.contains("unclosed.csv: line 3: a quote opened here is never closed"),
        "{error}"
    );
    // Far down the file, a value a typed column cannot read: file line 1052.
    let mut rows = String::from("text,score\n");
    for i in 0..1050 {
        rows.push_str(&format!("row {i},{i}\n"));
    }
    rows.push_str("late,high\n");
    std::fs::write(dir.path().join("typed.csv"), rows).unwrap();
    let error = ingest_error(dir.path(), "path: typed.csv\ntypes: {score: int64}\n");
    assert!(
        error.contains("typed.csv: line 1052: column `score`: \"high\""),
        "{error}"
    );
}

#[test]
fn jsonl_errors_name_the_file_line() {
    let dir = tempfile::tempdir().unwrap();
    // A syntax error on line 4 (line 3 is blank).
    std::fs::write(
        dir.path().join("syntax.jsonl"),
        "{\"text\": \"a\"}\n{\"text\": \"b\"}\n\n{\"text\": \"c\",}\n",
    )
    .unwrap();
    let error = ingest_error(dir.path(), "path: syntax.jsonl\n");
    assert!(error.contains("syntax.jsonl: line 4: column"), "{error}");
    // A key that changes type far into the file (types are inferred from every record): the
    // line where it changes, with the line that set it (M3: was "Json error: ... Scalar").
    let mut rows = String::new();
    for i in 0..1001 {
        rows.push_str(&format!("{{\"text\": \"row {i}\", \"score\": {i}}}\n"));
    }
    rows.push_str("{\"text\": \"late\", \"score\": \"high\"}\n");
    std::fs::write(dir.path().join("typed.jsonl"), rows).unwrap();
    let error = ingest_error(dir.path(), "path: typed.jsonl\n");
    assert!(
        error.contains(
            "typed.jsonl: line 1002: key `score` is a string here but a number on line 1"
        ),
        "{error}"
    );
    // The same inside an object and a list: the nested key's path and its lines.
    for (name, first, changed, expected) in [
        (
            "nested",
            "{\"o\": {\"a\": 1}}",
            "{\"o\": {\"a\": \"s\"}}",
            "line 1206: key `o.a` is a string here but a number on line 1",
        ),
        (
            "list",
            "{\"l\": [1, 2]}",
            "{\"l\": [1, \"x\"]}",
            "line 1206: key `l[]` is a string here but a number on line 1",
        ),
    ] {
        let mut rows = format!("{first}\n").repeat(1205);
        rows.push_str(&format!("{changed}\n{first}\n"));
        std::fs::write(dir.path().join(format!("{name}.jsonl")), rows).unwrap();
        let error = ingest_error(dir.path(), &format!("path: {name}.jsonl\n"));
        assert!(error.contains(expected), "{error}");
    }
    std::fs::write(
        dir.path().join("object.jsonl"),
        "{\"meta\": {\"a\": 1}}\n{\"meta\": null}\n{\"meta\": \"flat\"}\n",
    )
    .unwrap();
    let error = ingest_error(dir.path(), "path: object.jsonl\n");
    assert!(
        error.contains("object.jsonl: line 3: key `meta` is a string here but an object on line 1"),
        "{error}"
    );
}

#[cfg(unix)]
#[test]
fn a_device_is_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let error = ingest_error(dir.path(), "path: /dev/zero\nformat: csv\n");
    assert!(error.contains("/dev/zero"), "{error}");
    assert!(error.contains("is not a regular file"), "{error}");
    assert!(!error.contains("does not exist"), "{error}");
}

#[test]
fn an_all_null_column_is_a_string_column_of_nulls() {
    let dir = tempfile::tempdir().unwrap();
    // Arrow infers `note` as the Null type: it must reach the artifact as nulls of a string
    // column, which templates and filters treat as nulls (a Null-typed cell rendered as "").
    std::fs::write(
        dir.path().join("rows.jsonl"),
        "{\"text\": \"a\", \"note\": null}\n{\"text\": \"b\", \"note\": null}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    run(
        &config("path: rows.jsonl\nsplit: {counts: {eval: 0}}\n"),
        dir.path(),
        &out,
        0,
    )
    .unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(out.join("train.parquet")).unwrap(),
    )
    .unwrap();
    let schema = reader.schema().clone();
    assert_eq!(
        schema.field_with_name("note").unwrap().data_type(),
        &DataType::Utf8
    );
    assert_eq!(column(&out.join("train.parquet"), "note"), vec![None, None]);
    // drop_nulls sees them as nulls.
    let error = ingest_error(dir.path(), "path: rows.jsonl\ndrop_nulls: true\n");
    assert!(error.contains("no row of the 2 read"), "{error}");
}

#[test]
fn every_jsonl_line_is_read_strictly_not_only_those_schema_inference_sees() {
    // Past the first 1000 records (what inference reads, and what validate checks), a trailing
    // comma, a second object on the line and a fraction in an integer column were accepted, the
    // last one truncated: each is an error naming the line.
    let dir = tempfile::tempdir().unwrap();
    let head: String = (0..1200)
        .map(|i| format!("{{\"id\": {i}, \"text\": \"row {i}\"}}\n"))
        .collect();
    for (bad, cause) in [
        ("{\"id\": 1200, \"text\": \"x\",}", "trailing comma"),
        (
            "{\"id\": 1200, \"text\": \"x\"} {\"id\": 1201}",
            "trailing characters",
        ),
        ("[1, 2]", "expected a JSON object"),
    ] {
        std::fs::write(dir.path().join("late.jsonl"), format!("{head}{bad}\n")).unwrap();
        let error = ingest_error(dir.path(), "path: late.jsonl\n");
        assert!(error.contains("late.jsonl: line 1201: "), "{bad}: {error}");
        assert!(error.contains(cause), "{bad}: {error}");
    }
    // A byte-order mark before the first record is not data.
    std::fs::write(dir.path().join("bom.jsonl"), format!("\u{feff}{head}")).unwrap();
    let out = dir.path().join("bom-out");
    run(
        &config("path: bom.jsonl\nsplit: {counts: {eval: 0}}\n"),
        dir.path(),
        &out,
        0,
    )
    .unwrap();
    assert_eq!(column(&out.join("train.parquet"), "text").len(), 1200);
}

/// A null and the text "null" in the stratify column are two strata (they were one: a null's
/// stratum was named by the text `null`), each split in the asked proportions on its own.
#[test]
fn a_null_and_the_text_null_are_separate_strata() {
    let dir = tempfile::tempdir().unwrap();
    // 10 nulls, then 10 rows whose label is the text "null".
    let labels: Vec<Option<&str>> = (0..20)
        .map(|i| if i < 10 { None } else { Some("null") })
        .collect();
    let ids: Vec<i64> = (0..20).collect();
    write_parquet(
        &dir.path().join("rows.parquet"),
        vec![
            ("id", Arc::new(Int64Array::from(ids))),
            ("label", strings(&labels)),
        ],
    );
    let config = config(
        "path: rows.parquet\nsplit: {fractions: {train: 0.5, eval: 0.5}, stratify_by: label}\n",
    );
    let out = dir.path().join("out");
    run(&config, dir.path(), &out, 3).unwrap();
    let eval = column(&out.join("eval.parquet"), "label");
    let nulls = eval.iter().filter(|value| value.is_none()).count();
    let texts = eval
        .iter()
        .filter(|value| value.as_deref() == Some("null"))
        .count();
    assert_eq!((nulls, texts), (5, 5), "eval labels: {eval:?}");
    let stats = stats(&out);
    assert_eq!(stats["splits"]["eval"]["strata"]["null"], 5, "{stats}");
    assert_eq!(stats["splits"]["eval"]["null_stratum"], 5, "{stats}");
}

/// A JSON-lines record that repeats a key keeps the last value, as Python's `json` (and so
/// pandas and Hugging Face datasets) does: `{"text": "a", "text": "b"}` is the row `b`, a later
/// null replaces an earlier value, and nested objects follow the same rule.
#[test]
fn a_repeated_jsonl_key_keeps_its_last_value() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rows.jsonl"),
        concat!(
            "{\"text\": \"first\", \"label\": \"x\", \"text\": \"last\"}\n",
            "{\"text\": \"kept\", \"label\": \"y\", \"label\": null}\n",
            "{\"text\": \"n\", \"meta\": {\"k\": \"a\", \"k\": \"b\"}}\n",
            "{\"text\": 1, \"text\": \"typed\"}\n",
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    run(
        &config("path: rows.jsonl\nshuffle: false\nsplit: {counts: {eval: 0}}\n"),
        dir.path(),
        &out,
        0,
    )
    .unwrap();
    let train = out.join("train.parquet");
    assert_eq!(
        column(&train, "text"),
        [
            Some("last".into()),
            Some("kept".into()),
            Some("n".into()),
            Some("typed".into())
        ]
    );
    assert_eq!(
        column(&train, "label"),
        [Some("x".into()), None, None, None]
    );
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&train).unwrap()).unwrap();
    let batch = reader.build().unwrap().next().unwrap().unwrap();
    let meta = batch
        .column_by_name("meta")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::StructArray>()
        .unwrap();
    let k = arrow::compute::cast(meta.column_by_name("k").unwrap(), &DataType::Utf8).unwrap();
    let k = k.as_any().downcast_ref::<StringArray>().unwrap();
    assert_eq!(k.value(2), "b");
}

/// Ingests `dir`'s files with the ingest config `yaml` into `dir/out` (seed 0); returns `out`.
fn ingest_csv(dir: &Path, out: &str, yaml: &str) -> PathBuf {
    let out = dir.join(out);
    run(&config(yaml), dir, &out, 0).unwrap();
    out
}

/// Owned copies of optional texts (what `column` returns).
fn texts(values: &[Option<&str>]) -> Vec<Option<String>> {
    values.iter().map(|v| v.map(str::to_string)).collect()
}

/// An empty CSV cell, quoted or not, is the empty string in a text column and null in a typed
/// one, as pyarrow.csv reads it by default (`strings_can_be_null=False`; `""` is a null value
/// for other types). pandas would read both as NaN; peftpipe reads with Arrow and follows it.
#[test]
fn an_empty_csv_cell_is_an_empty_string_in_text_and_null_in_a_typed_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rows.csv"),
        "text,n,f,note\n\"\",,,x\na,1,true,\n,2,,\"\"\n",
    )
    .unwrap();
    let out = ingest_csv(dir.path(), "out", "path: rows.csv\nshuffle: false\ntypes: {n: int64, f: boolean, note: string}\nsplit: {counts: {eval: 0}}\n");
    let train = out.join("train.parquet");
    assert_eq!(
        column(&train, "text"),
        texts(&[Some(""), Some("a"), Some("")])
    );
    assert_eq!(column(&train, "n"), texts(&[None, Some("1"), Some("2")]));
    assert_eq!(column(&train, "f"), texts(&[None, Some("true"), None]));
    assert_eq!(
        column(&train, "note"),
        texts(&[Some("x"), Some(""), Some("")])
    );
    // `drop_nulls` keeps rows with an empty text cell; a filter on emptiness drops them.
    let out = ingest_csv(dir.path(), "out-nulls", "path: rows.csv\nshuffle: false\ncolumns: [text]\ndrop_nulls: true\nsplit: {counts: {eval: 0}}\n");
    assert_eq!(column(&out.join("train.parquet"), "text").len(), 3);
    let out = ingest_csv(dir.path(), "out-length", "path: rows.csv\nshuffle: false\nfilters: [{length: {column: text, min: 1}}]\nsplit: {counts: {eval: 0}}\n");
    assert_eq!(
        column(&out.join("train.parquet"), "text"),
        texts(&[Some("a")])
    );
}

/// pyarrow.csv's default null spellings (`ConvertOptions.null_values`: "NA", "null", "N/A",
/// "NaN", "#N/A", ...) are null in a typed column; a text column keeps them as written
/// (`strings_can_be_null=False`). peftpipe refused them in a typed column before.
#[test]
fn pyarrow_null_spellings_are_null_in_a_typed_column_and_text_in_a_text_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rows.csv"),
        "text,n,x,f\nNA,NA,null,N/A\nnull,1,NaN,true\n#N/A,-1.#IND,\"NULL\",n/a\nn/a,-nan,1.5,#NA\n",
    )
    .unwrap();
    let out = ingest_csv(dir.path(), "out", "path: rows.csv\nshuffle: false\ntypes: {n: int64, x: float64, f: boolean}\nsplit: {counts: {eval: 0}}\n");
    let train = out.join("train.parquet");
    assert_eq!(
        column(&train, "text"),
        texts(&[Some("NA"), Some("null"), Some("#N/A"), Some("n/a")])
    );
    assert_eq!(column(&train, "n"), texts(&[None, Some("1"), None, None]));
    assert_eq!(column(&train, "x"), texts(&[None, None, None, Some("1.5")]));
    assert_eq!(
        column(&train, "f"),
        texts(&[None, Some("true"), None, None])
    );

    // Other text is still refused, naming the line; spellings are matched as written.
    for cell in ["None", "na", " NA"] {
        std::fs::write(
            dir.path().join("bad.csv"),
            format!("text,n\na,1\nb,{cell}\n"),
        )
        .unwrap();
        let error = run(
            &config("path: bad.csv\ntypes: {n: int64}\nsplit: {counts: {eval: 0}}\n"),
            dir.path(),
            &dir.path().join("out-bad"),
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("bad.csv: line 3: column `n`") && error.contains("is not an integer"),
            "{cell}: {error}"
        );
    }
}
