//! Where a chat template comes from: a model's `tokenizer_config.json` (`chat_template` as a
//! string or the named-list form, else a `chat_template.jinja` beside it) or a `.jinja` file, with
//! the special tokens (`bos_token`, `eos_token`, …) the template may use.
//!
//! Only loading, as plain data: validation and the template stage both resolve templates through
//! here so they see the same source. Compiling and rendering the template the way transformers
//! does is the main crate's `data::chat` (reached from validation through
//! [`super::probe::Probe::check_chat_template`]). Never prints.

use std::path::Path;

use serde::Serialize;

/// A chat template's source and the special tokens it may use.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTemplateSource {
    /// The Jinja source.
    pub template: String,
    pub bos_token: String,
    pub eos_token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pad_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unk_token: Option<String>,
}

/// A special token in tokenizer_config.json: a string or an `AddedToken` object.
fn token_text(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Object(map) => map
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// transformers' legacy special-tokens file, read beside a `tokenizer_config.json`.
pub const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";

/// Whether transformers' load reads special_tokens_map.json for this `tokenizer_config.json`
/// (`Value::Null` when there is none): its legacy `_from_pretrained` path, taken when the config
/// has no `added_tokens_decoder`, sets every special token the map names over the config's
/// (`init_kwargs[key] = value`); with `added_tokens_decoder` the map is not read. The tokenizer
/// (`models::tokenizer`) and chat templates both follow this one rule.
pub fn reads_special_tokens_map(tokenizer_config: &serde_json::Value) -> bool {
    tokenizer_config.get("added_tokens_decoder").is_none()
}

/// The files beside a chat-template source that [`load_chat_template`] may also read: the
/// `chat_template.jinja` a `tokenizer_config.json` falls back to, or the `tokenizer_config.json`
/// a `.jinja` template takes its special tokens from, and the special_tokens_map.json that
/// overrides them ([`reads_special_tokens_map`]). All are inputs of the stage that renders with
/// it (hashed when present, whether or not this load needs them).
pub fn companion_file_names(source: &Path) -> [&'static str; 2] {
    if source.extension().is_some_and(|e| e == "json") {
        ["chat_template.jinja", SPECIAL_TOKENS_MAP]
    } else {
        ["tokenizer_config.json", SPECIAL_TOKENS_MAP]
    }
}

/// Load the chat template and special tokens of a `tokenizer_config.json`, or the raw template
/// of a `.jinja` file (special tokens then come from a `tokenizer_config.json` beside it, if any).
/// Either way a special_tokens_map.json beside it overrides the tokens as transformers' legacy
/// load does ([`reads_special_tokens_map`]), so `bos_token` and `eos_token` render as
/// `apply_chat_template` renders them.
pub fn load_chat_template(path: &Path) -> Result<ChatTemplateSource, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    let [companion, _] = companion_file_names(path);
    let beside = path.with_file_name(companion);
    if !is_json {
        let config = if beside.is_file() {
            read_json(&beside)?
        } else {
            serde_json::Value::Null
        };
        let tokens = special_tokens(path, &config)?;
        return Ok(ChatTemplateSource {
            template: text,
            bos_token: tokens.0,
            eos_token: tokens.1,
            pad_token: tokens.2,
            unk_token: tokens.3,
        });
    }
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not valid JSON: {e}", path.display()))?;
    // A chat_template.jinja beside the config wins over the config's own `chat_template`, as
    // transformers loads them ("the file template clobbers any template in the config").
    let template = match config.get("chat_template") {
        _ if beside.is_file() => std::fs::read_to_string(&beside)
            .map_err(|e| format!("cannot read {}: {e}", beside.display()))?,
        Some(serde_json::Value::String(template)) => template.clone(),
        // The newer list form: [{"name": "default", "template": "..."}, ...].
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|entry| entry.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|entry| entry.get("template").and_then(|t| t.as_str()))
            .map(str::to_string)
            .ok_or_else(|| {
                format!(
                    "{}: `chat_template` lists named templates but none is named `default`",
                    path.display()
                )
            })?,
        _ => {
            return Err(format!(
                "{} has no `chat_template` (and there is no chat_template.jinja beside it)",
                path.display()
            ))
        }
    };
    let (bos_token, eos_token, pad_token, unk_token) = special_tokens(path, &config)?;
    Ok(ChatTemplateSource {
        template,
        bos_token,
        eos_token,
        pad_token,
        unk_token,
    })
}

type Tokens = (String, String, Option<String>, Option<String>);

fn read_json(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", path.display()))
}

/// The special tokens of `config` (a `tokenizer_config.json`, or `Null`), each one that the
/// special_tokens_map.json beside `source` names replacing it where transformers reads the map.
fn special_tokens(source: &Path, config: &serde_json::Value) -> Result<Tokens, String> {
    let mut tokens = [
        token_text(config.get("bos_token")),
        token_text(config.get("eos_token")),
        token_text(config.get("pad_token")),
        token_text(config.get("unk_token")),
    ];
    let map_path = source.with_file_name(SPECIAL_TOKENS_MAP);
    if reads_special_tokens_map(config) && map_path.is_file() {
        let map = read_json(&map_path)?;
        if !map.is_object() {
            return Err(format!(
                "{}: must be a JSON object of special tokens",
                map_path.display()
            ));
        }
        let keys = ["bos_token", "eos_token", "pad_token", "unk_token"];
        for (key, token) in keys.into_iter().zip(&mut tokens) {
            if map.get(key).is_some() {
                *token = token_text(map.get(key));
            }
        }
    }
    let [bos, eos, pad, unk] = tokens;
    Ok((bos.unwrap_or_default(), eos.unwrap_or_default(), pad, unk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_template_file_wins_over_the_configs_own_as_in_transformers() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tokenizer_config.json");
        std::fs::write(
            &config,
            r#"{"chat_template": "from the config", "eos_token": "</s>"}"#,
        )
        .unwrap();
        assert_eq!(
            load_chat_template(&config).unwrap().template,
            "from the config"
        );
        std::fs::write(dir.path().join("chat_template.jinja"), "from the file").unwrap();
        let source = load_chat_template(&config).unwrap();
        assert_eq!(source.template, "from the file");
        assert_eq!(source.eos_token, "</s>");
    }

    #[test]
    fn special_tokens_map_json_overrides_the_tokens_as_transformers_legacy_load_does() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tokenizer_config.json");
        let jinja = dir.path().join("chat.jinja");
        std::fs::write(&jinja, "{{ bos_token }}").unwrap();
        std::fs::write(
            &config,
            r#"{"chat_template": "t", "bos_token": "<s>", "eos_token": "</s>"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join(SPECIAL_TOKENS_MAP),
            r#"{"eos_token": {"content": "<|end|>"}, "pad_token": "<pad>"}"#,
        )
        .unwrap();
        for path in [&config, &jinja] {
            let source = load_chat_template(path).unwrap();
            assert_eq!(source.bos_token, "<s>", "{path:?}");
            assert_eq!(source.eos_token, "<|end|>", "{path:?}");
            assert_eq!(source.pad_token.as_deref(), Some("<pad>"), "{path:?}");
        }
        // With `added_tokens_decoder` transformers does not read the map.
        std::fs::write(
            &config,
            r#"{"chat_template": "t", "eos_token": "</s>", "added_tokens_decoder": {}}"#,
        )
        .unwrap();
        for path in [&config, &jinja] {
            let source = load_chat_template(path).unwrap();
            assert_eq!(source.eos_token, "</s>", "{path:?}");
            assert_eq!(source.pad_token, None, "{path:?}");
        }
        // A map that is not an object is refused, naming it.
        std::fs::write(dir.path().join(SPECIAL_TOKENS_MAP), "[]").unwrap();
        std::fs::write(&config, r#"{"chat_template": "t"}"#).unwrap();
        let error = load_chat_template(&config).unwrap_err();
        assert!(error.contains(SPECIAL_TOKENS_MAP), "{error}");
    }
}
