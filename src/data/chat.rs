//! Chat templates rendered the way Hugging Face transformers renders them
//! (`tokenizer.apply_chat_template`), so training text matches inference text.
//!
//! Transformers renders `chat_template` with Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls,
//! default — lenient — undefined), passing `messages`, `add_generation_prompt` and the special
//! tokens (`bos_token`, `eos_token`, …), with `raise_exception(message)` and a `tojson` filter that
//! is Python's `json.dumps` (`, ` / `: ` separators, non-ASCII kept). This module reproduces that
//! with minijinja (+ pycompat for Python string methods). `strftime_now` is deliberately not
//! provided, so date-stamping templates fall back to their fixed default date and renders stay
//! reproducible.
//!
//! Owns loading a template from a `tokenizer_config.json` or a `.jinja` file and splitting a
//! conversation into prompt (the user turns rendered with `add_generation_prompt=true`) and
//! completion (what the full conversation adds: the assistant content plus the template's
//! end-of-turn text). Never prints.

use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};
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

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
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

/// Load the chat template and special tokens of a `tokenizer_config.json`, or the raw template
/// of a `.jinja` file (special tokens then come from a `tokenizer_config.json` beside it, if any).
pub fn load_chat_template(path: &Path) -> Result<ChatTemplateSource, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    if !is_json {
        let beside = path.with_file_name("tokenizer_config.json");
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
    let template = match config.get("chat_template") {
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
            let jinja = path.with_file_name("chat_template.jinja");
            if jinja.is_file() {
                std::fs::read_to_string(&jinja)
                    .map_err(|e| format!("cannot read {}: {e}", jinja.display()))?
            } else {
                return Err(format!(
                    "{} has no `chat_template` (and there is no chat_template.jinja beside it)",
                    path.display()
                ));
            }
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

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)` (what transformers' `tojson`
/// filter does).
fn python_json(value: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * level));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    match value {
        serde_json::Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push_str(separator);
                }
                newline(out, level + 1);
                python_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        serde_json::Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (index, (key, item)) in map.iter().enumerate() {
                if index > 0 {
                    out.push_str(separator);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push_str(": ");
                python_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn tojson_filter(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("cannot serialize to JSON: {e}"),
        )
    })?;
    let mut out = String::new();
    python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: ChatTemplateSource,
}

impl ChatTemplate {
    /// Compile; a syntax error is returned as a message with its line.
    pub fn new(source: ChatTemplateSource) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat_template", source.template.clone())
            .map_err(|e| describe_chat_error(&e))?;
        Ok(ChatTemplate { env, source })
    }

    pub fn source(&self) -> &ChatTemplateSource {
        &self.source
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=…)`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let template = self
            .env
            .get_template("chat_template")
            .map_err(|e| describe_chat_error(&e))?;
        let mut context = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", Value::from(self.source.bos_token.as_str())),
            ("eos_token", Value::from(self.source.eos_token.as_str())),
        ];
        if let Some(pad) = &self.source.pad_token {
            context.push(("pad_token", Value::from(pad.as_str())));
        }
        if let Some(unk) = &self.source.unk_token {
            context.push(("unk_token", Value::from(unk.as_str())));
        }
        template
            .render(Value::from_iter(context))
            .map_err(|e| describe_chat_error(&e))
    }

    /// Split a conversation whose last message is the assistant's into (prompt, completion):
    /// the prompt is the rendering of the earlier messages with `add_generation_prompt=true`,
    /// the completion what rendering the whole conversation adds to it.
    pub fn prompt_and_completion(&self, messages: &[Message]) -> Result<(String, String), String> {
        let Some((last, earlier)) = messages.split_last() else {
            return Err("the conversation is empty".into());
        };
        if last.role != "assistant" {
            return Err("the last message must be the assistant's".into());
        }
        let prompt = self.render(earlier, true)?;
        let full = self.render(messages, false)?;
        match full.strip_prefix(&prompt) {
            Some(completion) => Ok((prompt, completion.to_string())),
            None => Err(format!(
                "the chat template's rendering of the whole conversation does not start with its rendering of the prompt (add_generation_prompt=true), so prompt and completion cannot be separated; prompt: {prompt:?}, conversation: {full:?}"
            )),
        }
    }
}

fn describe_chat_error(error: &Error) -> String {
    let detail = error.detail().unwrap_or("error");
    match error.line() {
        Some(line) => format!("chat template, line {line}: {detail} ({:?})", error.kind()),
        None => format!("chat template: {detail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_matches_json_dumps_separators() {
        let value = serde_json::json!({"a": [1, "é"], "b": {}});
        let mut compact = String::new();
        python_json(&value, None, 0, &mut compact);
        assert_eq!(compact, r#"{"a": [1, "é"], "b": {}}"#);
        let mut indented = String::new();
        python_json(&value, Some(2), 0, &mut indented);
        assert_eq!(
            indented,
            "{\n  \"a\": [\n    1,\n    \"é\"\n  ],\n  \"b\": {}\n}"
        );
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let chat = ChatTemplate::new(ChatTemplateSource {
            template: "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok".into(),
            bos_token: String::new(),
            eos_token: String::new(),
            pad_token: None,
            unk_token: None,
        })
        .unwrap();
        let error = chat
            .render(&[Message::new("assistant", "x")], false)
            .unwrap_err();
        assert!(error.contains("first must be user"), "{error}");
        assert_eq!(
            chat.render(&[Message::new("user", "x")], false).unwrap(),
            "ok"
        );
    }
}
