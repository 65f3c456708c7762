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

/// The file beside a chat-template source that [`load_chat_template`] may also read: the
/// `chat_template.jinja` a `tokenizer_config.json` falls back to, or the `tokenizer_config.json`
/// a `.jinja` template takes its special tokens from. Both are inputs of the stage that renders
/// with it (hashed when present, whether or not this load needs it).
pub fn companion_file_name(source: &Path) -> &'static str {
    if source.extension().is_some_and(|e| e == "json") {
        "chat_template.jinja"
    } else {
        "tokenizer_config.json"
    }
}

/// Load the chat template and special tokens of a `tokenizer_config.json`, or the raw template
/// of a `.jinja` file (special tokens then come from a `tokenizer_config.json` beside it, if any).
pub fn load_chat_template(path: &Path) -> Result<ChatTemplateSource, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    if !is_json {
        let beside = path.with_file_name(companion_file_name(path));
        let tokens = if beside.is_file() {
            tokens_of(&beside)?
        } else {
            (String::new(), String::new(), None, None)
        };
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
    let jinja = path.with_file_name(companion_file_name(path));
    let template = match config.get("chat_template") {
        _ if jinja.is_file() => std::fs::read_to_string(&jinja)
            .map_err(|e| format!("cannot read {}: {e}", jinja.display()))?,
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
    let (bos_token, eos_token, pad_token, unk_token) = tokens_from_json(&config);
    Ok(ChatTemplateSource {
        template,
        bos_token,
        eos_token,
        pad_token,
        unk_token,
    })
}

type Tokens = (String, String, Option<String>, Option<String>);

fn tokens_of(path: &Path) -> Result<Tokens, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not valid JSON: {e}", path.display()))?;
    Ok(tokens_from_json(&config))
}

fn tokens_from_json(config: &serde_json::Value) -> Tokens {
    (
        token_text(config.get("bos_token")).unwrap_or_default(),
        token_text(config.get("eos_token")).unwrap_or_default(),
        token_text(config.get("pad_token")),
        token_text(config.get("unk_token")),
    )
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
}
