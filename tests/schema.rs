//! The committed JSON Schema (schemas/pipeline.schema.json) matches the config types, `peftpipe
//! schema` prints it, and every field of every config type carries a description.

use std::path::Path;
use std::process::Command;

use peftpipe::schema::{
    pipeline_schema_json, undocumented_properties, REGENERATE_COMMAND, SCHEMA_PATH,
};

#[test]
fn committed_schema_is_up_to_date() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(SCHEMA_PATH);
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = pipeline_schema_json();
    assert!(
        committed == generated,
        "{SCHEMA_PATH} is stale (or missing): the config types changed. Regenerate it with\n\n    \
         {REGENERATE_COMMAND}\n\nand commit the result."
    );
}

#[test]
fn schema_command_prints_the_schema_on_stdout() {
    let output = Command::new(env!("CARGO_BIN_EXE_peftpipe"))
        .arg("schema")
        .output();
    let Ok(output) = output else {
        panic!("cannot run peftpipe");
    };
    assert_eq!(output.status.code(), Some(0));
    assert!(output.stderr.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        pipeline_schema_json()
    );
}

#[test]
fn every_field_has_a_description() {
    let schema: serde_json::Value =
        serde_json::from_str(&pipeline_schema_json()).unwrap_or_default();
    let missing = undocumented_properties(&schema);
    assert!(
        missing.is_empty(),
        "these config fields have no doc comment, so the schema has no description for them \
         (editors show it as the field's help): {missing:?}"
    );
}

#[test]
fn schema_rejects_unknown_keys_everywhere() {
    // `deny_unknown_fields` on every config struct shows as additionalProperties: false, so
    // editors flag a misspelled key as the validator does.
    let schema: serde_json::Value =
        serde_json::from_str(&pipeline_schema_json()).unwrap_or_default();
    assert_eq!(
        schema["additionalProperties"],
        serde_json::Value::Bool(false)
    );
    let definitions = schema["definitions"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert!(!definitions.is_empty());
    for (name, definition) in definitions {
        if definition.get("properties").is_some() {
            assert_eq!(
                definition["additionalProperties"],
                serde_json::Value::Bool(false),
                "{name} accepts unknown keys: add #[serde(deny_unknown_fields)]"
            );
        }
    }
}
