//! Chat templates rendered the way Hugging Face transformers renders them
//! (`tokenizer.apply_chat_template`), so training text matches inference text.
//!
//! Transformers renders `chat_template` with Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls,
//! default — lenient — undefined), passing `messages`, `add_generation_prompt`, `tools=None`,
//! `documents=None` and the special tokens (`bos_token`, `eos_token`, …), with
//! `raise_exception(message)` and a `tojson` filter that is Python's `json.dumps` (`, ` / `: `
//! separators, non-ASCII kept). This module reproduces that with minijinja (+ pycompat for Python
//! string methods). `strftime_now` is deliberately not provided, so date-stamping templates fall
//! back to their fixed default date and renders stay reproducible.
//!
//! Owns compiling and rendering a chat template and splitting a
//! conversation into prompt (the user turns rendered with `add_generation_prompt=true`) and
//! completion (what the full conversation adds: the assistant content plus the template's
//! end-of-turn text). Loading the template's source from a `tokenizer_config.json` or a `.jinja`
//! file is the core's `config::chat_template` (re-exported here). Never prints.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};
use serde::Serialize;

pub use crate::config::chat_template::{load_chat_template, ChatTemplateSource};

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
        // Error spans in release builds too (minijinja's debug mode follows debug_assertions).
        env.set_debug(true);
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
            // transformers passes these as None when the call gives none, so `tools is not none`
            // is false (an undefined `tools` would not be none).
            ("tools", Value::from(())),
            ("documents", Value::from(())),
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
