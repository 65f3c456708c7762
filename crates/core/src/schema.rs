//! JSON Schema of pipeline files, generated with schemars from the config types (descriptions
//! from their doc comments, defaults from their serde defaults). Committed as
//! schemas/pipeline.schema.json (tests/schema.rs fails when it is stale) so editors complete and
//! check pipelines through a `# yaml-language-server: $schema=...` line.
//!
//! Nothing else lives here: no validation, no I/O.

use schemars::generate::SchemaSettings;
use schemars::Schema;
use serde_json::Value;

use crate::config::RawPipeline;

/// Where the committed schema lives, relative to the repository root.
pub const SCHEMA_PATH: &str = "schemas/pipeline.schema.json";

/// The command that regenerates the committed schema.
pub const REGENERATE_COMMAND: &str = "cargo run -- schema > schemas/pipeline.schema.json";

/// The pipeline schema (JSON Schema draft-07, which yaml-language-server supports fully).
pub fn pipeline_schema() -> Schema {
    let generator = SchemaSettings::draft07().into_generator();
    let mut schema = generator.into_root_schema_for::<RawPipeline>();
    add_matrix(&mut schema);
    schema.insert(
        "title".to_string(),
        Value::String("peftpipe pipeline".to_string()),
    );
    schema.insert(
        "description".to_string(),
        Value::String(format!(
            "A peftpipe pipeline: named stages (ingest, template, train, evaluate, export), each \
             naming the upstream stages it reads. Generated from peftpipe's config types; \
             regenerate with `{REGENERATE_COMMAND}`."
        )),
    );
    schema
}

/// Every stage kind may sit next to a `matrix:` (expanded before deserialization, so it is no
/// field of the config types; see `config::matrix`).
fn add_matrix(schema: &mut Schema) {
    let Some(Value::Object(definitions)) = schema.get_mut("definitions") else {
        return;
    };
    if let Some(Value::Array(variants)) = definitions
        .get_mut("StageConfig")
        .and_then(|stage| stage.get_mut("oneOf"))
    {
        for variant in variants {
            if let Some(Value::Object(properties)) = variant.get_mut("properties") {
                properties.insert(
                    crate::config::matrix::MATRIX_KEY.to_string(),
                    serde_json::json!({ "$ref": "#/definitions/Matrix" }),
                );
            }
        }
    }
    definitions.insert("Matrix".to_string(), crate::config::matrix::matrix_schema());
}

/// The schema as committed: pretty JSON with a trailing newline.
pub fn pipeline_schema_json() -> String {
    let mut text = serde_json::to_string_pretty(&pipeline_schema())
        .unwrap_or_else(|error| format!("{{\"error\": \"{error}\"}}"));
    text.push('\n');
    text
}

/// Key paths of object properties in the schema that carry no `description` (every field of
/// the config types must be documented).
pub fn undocumented_properties(schema: &Value) -> Vec<String> {
    let mut missing = Vec::new();
    collect_undocumented(schema, schema, "", &mut missing, 0, false);
    missing.sort();
    missing.dedup();
    missing
}

fn collect_undocumented(
    root: &Value,
    node: &Value,
    path: &str,
    missing: &mut Vec<String>,
    depth: usize,
    is_variant: bool,
) {
    if depth > 64 {
        return;
    }
    let Value::Object(map) = node else {
        if let Value::Array(items) = node {
            for item in items {
                collect_undocumented(root, item, path, missing, depth + 1, is_variant);
            }
        }
        return;
    };
    if let Some(Value::Object(properties)) = map.get("properties") {
        // An externally tagged enum variant is an object with one property; its doc comment
        // sits on that object.
        let variant_documented =
            is_variant && properties.len() == 1 && map.get("description").is_some();
        for (name, property) in properties {
            if variant_documented {
                continue;
            }
            let property_path = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            if !has_description(root, property) {
                missing.push(property_path.clone());
            }
        }
    }
    for (key, value) in map {
        let child_path = match key.as_str() {
            "definitions" | "$defs" => {
                if let Value::Object(definitions) = value {
                    for (name, definition) in definitions {
                        collect_undocumented(root, definition, name, missing, depth + 1, false);
                    }
                }
                continue;
            }
            "properties" => {
                if let Value::Object(properties) = value {
                    for (name, property) in properties {
                        let property_path = if path.is_empty() {
                            name.clone()
                        } else {
                            format!("{path}.{name}")
                        };
                        collect_undocumented(
                            root,
                            property,
                            &property_path,
                            missing,
                            depth + 1,
                            false,
                        );
                    }
                }
                continue;
            }
            _ => path.to_string(),
        };
        if matches!(value, Value::Object(_) | Value::Array(_)) {
            let variants = matches!(key.as_str(), "oneOf" | "anyOf");
            collect_undocumented(root, value, &child_path, missing, depth + 1, variants);
        }
    }
}

/// A property is documented when it, or the definition it refers to, has a description.
fn has_description(root: &Value, property: &Value) -> bool {
    if property.get("description").is_some() {
        return true;
    }
    let reference = property
        .get("$ref")
        .or_else(|| {
            property
                .get("allOf")
                .and_then(|all| all.get(0))
                .and_then(|first| first.get("$ref"))
        })
        .and_then(Value::as_str);
    match reference.and_then(|reference| reference.strip_prefix('#')) {
        Some(pointer) => root
            .pointer(pointer)
            .is_some_and(|definition| definition.get("description").is_some()),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_every_stage_kind_and_is_draft_07() {
        let text = pipeline_schema_json();
        let schema: Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(
            schema["$schema"],
            Value::from("http://json-schema.org/draft-07/schema#")
        );
        for kind in crate::config::StageKind::ALL {
            assert!(
                text.contains(&format!("\"{}\"", kind.as_str())),
                "schema lacks the `{kind}` stage kind"
            );
        }
        assert!(schema["properties"]["stages"].is_object());
    }

    #[test]
    fn undocumented_properties_are_found() {
        let schema = serde_json::json!({
            "properties": {
                "documented": {"type": "string", "description": "yes"},
                "bare": {"type": "string"},
                "referenced": {"$ref": "#/definitions/Thing"}
            },
            "definitions": {
                "Thing": {"description": "a thing", "properties": {"inner": {"type": "integer"}}}
            }
        });
        assert_eq!(
            undocumented_properties(&schema),
            vec!["Thing.inner", "bare"]
        );
    }
}
