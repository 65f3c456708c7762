//! Prompts from a JSONL file for `peftpipe generate --input`: one JSON object per line, the prompt
//! in one string field, every other field carried through to the output line. Lines are read one
//! at a time (memory is bounded by the longest line, not the file); blank lines are skipped.
//! Every error names the file and the line.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::session::GenerateOutput;

/// The names of the fields a generation adds to its input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFields {
    /// The generated text.
    pub text: String,
    /// How many tokens were generated (`<text>_tokens`).
    pub tokens: String,
    /// Why generation ended (`stop_reason`).
    pub stop_reason: String,
    /// What the line does not say by itself (`notes`, under `--json`: [`GenerateOutput`]'s
    /// notes); `None`: not written.
    pub notes: Option<String>,
}

impl OutputFields {
    /// `text`, `<text>_tokens` and `stop_reason`.
    pub fn named(text: &str) -> Self {
        OutputFields {
            text: text.to_string(),
            tokens: format!("{text}_tokens"),
            stop_reason: "stop_reason".to_string(),
            notes: None,
        }
    }

    /// These fields and `notes`, as `generate --prompt --json` names them.
    pub fn with_notes(mut self) -> Self {
        self.notes = Some("notes".to_string());
        self
    }

    fn all(&self) -> Vec<&str> {
        let mut names = vec![
            self.text.as_str(),
            self.tokens.as_str(),
            self.stop_reason.as_str(),
        ];
        names.extend(self.notes.as_deref());
        names
    }
}

/// One input line: its number (1-based), its prompt and all its fields (the prompt's included).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRecord {
    pub line: usize,
    pub prompt: String,
    pub fields: Map<String, Value>,
}

impl PromptRecord {
    /// The output line: the input's fields in their order, then the generation's.
    pub fn with_output(self, names: &OutputFields, output: &GenerateOutput) -> Map<String, Value> {
        let mut fields = self.fields;
        fields.insert(names.text.clone(), Value::from(output.completion.clone()));
        fields.insert(names.tokens.clone(), Value::from(output.token_ids.len()));
        fields.insert(
            names.stop_reason.clone(),
            serde_json::to_value(output.stop_reason).unwrap_or(Value::Null),
        );
        if let Some(notes) = &names.notes {
            fields.insert(notes.clone(), Value::from(output.notes.clone()));
        }
        fields
    }
}

/// The records of a JSONL prompt file, read lazily.
pub struct PromptLines<R> {
    reader: R,
    path: PathBuf,
    line: usize,
    prompt_field: String,
    output: OutputFields,
    buffer: String,
}

impl PromptLines<std::io::BufReader<std::fs::File>> {
    /// Open `path`; the prompt is in `prompt_field`, and no line may already hold a field the
    /// output would overwrite.
    pub fn open(path: &Path, prompt_field: &str, output: &OutputFields) -> Result<Self, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self::new(
            std::io::BufReader::new(file),
            path,
            prompt_field,
            output,
        ))
    }
}

impl<R: BufRead> PromptLines<R> {
    /// Records of `reader`, errors naming `path`.
    pub fn new(reader: R, path: &Path, prompt_field: &str, output: &OutputFields) -> Self {
        PromptLines {
            reader,
            path: path.to_path_buf(),
            line: 0,
            prompt_field: prompt_field.to_string(),
            output: output.clone(),
            buffer: String::new(),
        }
    }

    fn record(&self, text: &str) -> Result<PromptRecord, String> {
        let at = format!("{}:{}", self.path.display(), self.line);
        // serde_json counts lines within the one line it read: say the column only, after the
        // file's own line number.
        let value: Value = serde_json::from_str(text).map_err(|e| {
            let reason = e.to_string();
            let reason = reason
                .split(" at line ")
                .next()
                .unwrap_or(&reason)
                .to_string();
            format!("{at}: invalid JSON: {reason} (column {})", e.column())
        })?;
        let Value::Object(fields) = value else {
            return Err(format!(
                "{at}: expected a JSON object such as {{\"{}\": \"...\"}}, found {}",
                self.prompt_field,
                kind(&value)
            ));
        };
        let prompt = match fields.get(&self.prompt_field) {
            Some(Value::String(prompt)) => prompt.clone(),
            Some(other) => {
                return Err(format!(
                    "{at}: field `{}` is {}, not a string",
                    self.prompt_field,
                    kind(other)
                ))
            }
            None => {
                let found: Vec<&str> = fields.keys().map(String::as_str).collect();
                return Err(format!(
                    "{at}: no field `{}` (the line has: {}); name the prompt's field with --prompt-field",
                    self.prompt_field,
                    if found.is_empty() {
                        "no fields".to_string()
                    } else {
                        found.join(", ")
                    }
                ));
            }
        };
        if let Some(taken) = self
            .output
            .all()
            .into_iter()
            .find(|name| fields.contains_key(*name))
        {
            let added = self.output.all();
            let (last, first) = added.split_last().unwrap_or((&"", &[]));
            return Err(format!(
                "{at}: the line already has a field `{taken}`, which the output would overwrite; name the generated field with --output-field (it adds `{}` and `{last}`)",
                first.join("`, `")
            ));
        }
        Ok(PromptRecord {
            line: self.line,
            prompt,
            fields,
        })
    }
}

impl<R: BufRead> Iterator for PromptLines<R> {
    type Item = Result<PromptRecord, String>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buffer.clear();
            self.line += 1;
            match self.reader.read_line(&mut self.buffer) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(format!("{}:{}: {e}", self.path.display(), self.line))),
            }
            let text = self.buffer.trim();
            if text.is_empty() {
                continue;
            }
            let text = text.to_string();
            return Some(self.record(&text));
        }
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::StopReason;

    fn read(text: &str) -> Vec<Result<PromptRecord, String>> {
        PromptLines::new(
            text.as_bytes(),
            Path::new("prompts.jsonl"),
            "prompt",
            &OutputFields::named("completion"),
        )
        .collect()
    }

    #[test]
    fn records_keep_their_fields_and_line_numbers_and_blank_lines_are_skipped() {
        let records = read("{\"id\": 7, \"prompt\": \"Once\"}\n\n  \n{\"prompt\": \"Tom\"}");
        let records: Vec<PromptRecord> = records.into_iter().map(Result::unwrap).collect();
        assert_eq!(records.len(), 2);
        assert_eq!((records[0].line, records[0].prompt.as_str()), (1, "Once"));
        assert_eq!((records[1].line, records[1].prompt.as_str()), (4, "Tom"));
        let output = GenerateOutput {
            prompt: "Once".to_string(),
            completion: " upon".to_string(),
            token_ids: vec![5, 6],
            prompt_token_ids: vec![1, 9],
            stop_reason: StopReason::Eos,
            notes: vec!["not written".to_string()],
            context: String::new(),
        };
        let line = records[0]
            .clone()
            .with_output(&OutputFields::named("completion"), &output);
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"id":7,"prompt":"Once","completion":" upon","completion_tokens":2,"stop_reason":"eos"}"#
        );
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_cause() {
        let errors: Vec<String> = read(
            "{\"prompt\": \"ok\"}\n{\"prompt\": \"x\",}\n[1]\n{\"text\": \"a\", \"id\": 1}\n{\"prompt\": 3}\n{\"prompt\": \"a\", \"completion\": \"b\"}\n",
        )
        .into_iter()
        .filter_map(Result::err)
        .collect();
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert!(
            !errors[0].contains("line 1"),
            "one line number, the file's: {}",
            errors[0]
        );
        assert!(
            errors[0].starts_with("prompts.jsonl:2: invalid JSON"),
            "{}",
            errors[0]
        );
        assert!(
            errors[1].starts_with("prompts.jsonl:3: expected a JSON object")
                && errors[1].ends_with("found an array"),
            "{}",
            errors[1]
        );
        assert!(
            errors[2].starts_with("prompts.jsonl:4: no field `prompt` (the line has: text, id)"),
            "{}",
            errors[2]
        );
        assert_eq!(
            errors[3],
            "prompts.jsonl:5: field `prompt` is a number, not a string"
        );
        assert!(
            errors[4].starts_with("prompts.jsonl:6: the line already has a field `completion`")
                && errors[4].contains("--output-field"),
            "{}",
            errors[4]
        );
    }

    #[test]
    fn the_prompt_and_output_fields_can_be_renamed() {
        let records: Vec<_> = PromptLines::new(
            "{\"text\": \"a\", \"completion\": \"ref\"}\n".as_bytes(),
            Path::new("p.jsonl"),
            "text",
            &OutputFields::named("generated"),
        )
        .collect();
        assert_eq!(records[0].as_ref().unwrap().prompt, "a");
    }

    /// `--json`: every line also carries `notes`, and an input line that has one is refused as
    /// for the other output fields (never overwritten); without it `notes` is the input's.
    #[test]
    fn notes_are_written_and_guarded_only_when_asked_for() {
        let text = "{\"prompt\": \"a\", \"notes\": \"mine\"}\n{\"prompt\": \"b\"}\n";
        let read_with = |names: &OutputFields| -> Vec<Result<PromptRecord, String>> {
            PromptLines::new(text.as_bytes(), Path::new("p.jsonl"), "prompt", names).collect()
        };
        let with_notes = OutputFields::named("completion").with_notes();
        let records = read_with(&with_notes);
        let error = records[0].as_ref().unwrap_err();
        assert!(
            error.starts_with("p.jsonl:1: the line already has a field `notes`")
                && error.contains("`completion`, `completion_tokens`, `stop_reason` and `notes`"),
            "{error}"
        );
        let output = GenerateOutput {
            prompt: "b".to_string(),
            completion: " c".to_string(),
            token_ids: vec![5],
            prompt_token_ids: vec![1, 9],
            stop_reason: StopReason::MaxLength,
            notes: vec!["stopped at the window".to_string()],
            context: String::new(),
        };
        let line = records[1]
            .clone()
            .unwrap()
            .with_output(&with_notes, &output);
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"prompt":"b","completion":" c","completion_tokens":1,"stop_reason":"max_length","notes":["stopped at the window"]}"#
        );
        let plain = read_with(&OutputFields::named("completion"));
        assert_eq!(plain[0].as_ref().unwrap().fields["notes"], "mine");
    }

    #[test]
    fn invalid_utf8_is_an_error_with_the_line() {
        let bytes: &[u8] = b"{\"prompt\": \"a\"}\n{\"prompt\": \"\xff\"}\n";
        let records: Vec<_> = PromptLines::new(
            bytes,
            Path::new("p.jsonl"),
            "prompt",
            &OutputFields::named("completion"),
        )
        .collect();
        let error = records[1].as_ref().unwrap_err();
        assert!(error.starts_with("p.jsonl:2:"), "{error}");
    }
}
