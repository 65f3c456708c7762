//! `peftpipe init [--model DIR] [--data FILE] [-o pipeline.yaml]`: write a commented starter
//! pipeline that validates, with the `$schema` line (the schema written beside it), its columns
//! read from the data file (Parquet footer, CSV header, first JSONL record). Without `--data`,
//! a small example dataset is written next to it; without `--model`, the train, evaluate and
//! export stages are written commented out, ready to fill in. Never overwrites a file.

use std::path::{Path, PathBuf};

use clap::Args;

use super::{GlobalArgs, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::report;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  peftpipe init\n  \
    peftpipe init --data data/reviews.parquet --model models/tiny-llama\n  \
    peftpipe init -o pipelines/sft.yaml --data data/chat.jsonl")]
pub struct InitArgs {
    /// A Hugging Face model directory to fine-tune (or `hf://org/name`).
    #[arg(long, value_name = "DIR")]
    pub model: Option<String>,
    /// The training data: Parquet, CSV or JSONL (default: an example dataset is written).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// The pipeline file to write.
    #[arg(long, short, value_name = "FILE", default_value = "pipeline.yaml")]
    pub output: PathBuf,
}

/// Columns that play the prompt and the completion, guessed from their names.
pub fn guess_roles(columns: &[String]) -> Option<(String, String)> {
    let has = |name: &str| columns.iter().any(|column| column == name);
    for (prompt, completion) in [
        ("prompt", "completion"),
        ("instruction", "output"),
        ("question", "answer"),
        ("input", "output"),
        ("text", "label"),
        ("sentence", "label"),
        ("source", "target"),
    ] {
        if has(prompt) && has(completion) {
            return Some((prompt.into(), completion.into()));
        }
    }
    match columns {
        [first, second, ..] => Some((first.clone(), second.clone())),
        _ => None,
    }
}

/// The example dataset written when no `--data` is given: 40 one-digit additions.
fn example_rows() -> String {
    let mut text = String::new();
    for left in 0..8 {
        for right in 0..5 {
            text.push_str(&format!(
                "{{\"prompt\": \"{left} + {right} =\", \"completion\": \"{}\"}}\n",
                left + right
            ));
        }
    }
    text
}

/// `path` as the pipeline in `base` should name it: relative to `base` (with `..` where it lies
/// outside it, as pipelines/quickstart.yaml writes `../datasets/...`), so the pipeline works in
/// any checkout and its inputs' fingerprint keys (the paths as written) are the same on every
/// machine. Absolute only when the two share nothing but the filesystem root.
fn relative_to(path: &Path, base: &Path) -> String {
    let absolute = |path: &Path| {
        std::fs::canonicalize(path).unwrap_or_else(|_| {
            std::env::current_dir()
                .and_then(std::fs::canonicalize)
                .map(|cwd| cwd.join(path))
                .unwrap_or_else(|_| path.to_path_buf())
        })
    };
    let (path_abs, base_abs) = (absolute(path), absolute(base));
    let (path_parts, base_parts): (Vec<_>, Vec<_>) = (
        path_abs.components().collect(),
        base_abs.components().collect(),
    );
    let common = path_parts
        .iter()
        .zip(&base_parts)
        .take_while(|(a, b)| a == b)
        .count();
    let below_root = |parts: &[std::path::Component]| {
        parts
            .iter()
            .filter(|part| matches!(part, std::path::Component::Normal(_)))
            .count()
    };
    if below_root(&path_parts[..common]) == 0 {
        return path_abs.display().to_string();
    }
    let mut relative = PathBuf::new();
    for _ in common..base_parts.len() {
        relative.push("..");
    }
    for part in &path_parts[common..] {
        relative.push(part);
    }
    if relative.as_os_str().is_empty() {
        return ".".into();
    }
    relative.display().to_string()
}

/// A valid pipeline name from a file stem: letters, digits, `-` and `_` (others become `_`), at
/// most 64 characters (`sft.v2` → `sft_v2`).
fn pipeline_name(stem: &str) -> String {
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(crate::config::load::MAX_NAME_LENGTH)
        .collect();
    if name.is_empty() {
        "pipeline".into()
    } else {
        name
    }
}

/// The pipeline text; `file` is the pipeline file's name, for the commands its comments show.
/// Every value that comes from the user (name, paths, columns) is written quoted, so YAML reads
/// it as the string it is (`true`, `a #b`, `x: y`).
pub fn pipeline_text(
    name: &str,
    file: &str,
    data: &str,
    columns: &[String],
    prompt: &str,
    completion: &str,
    model: Option<&str>,
) -> String {
    let quoted = |text: &str| serde_json::to_string(text).unwrap_or_default();
    let column_list = columns
        .iter()
        .map(|column| quoted(column))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = format!(
        "# yaml-language-server: $schema=pipeline.schema.json\n\
         # Written by `peftpipe init`. Check it: `peftpipe validate {file}`;\n\
         # run it: `peftpipe run {file}`; see it: `peftpipe report {file}`.\n\
         # Every key is described in pipeline.schema.json (editors with YAML support complete them).\n\
         name: {quoted_name}\n\
         seed: 1\n\
         stages:\n\
         \x20 # Read the data, keep the columns the prompts use, split train/eval.\n\
         \x20 data:\n\
         \x20   ingest:\n\
         \x20     path: {quoted_data}\n\
         \x20     columns: [{column_list}]\n\
         \x20     drop_nulls: true\n\
         \x20     split:\n\
         \x20       fractions: {{train: 0.9, eval: 0.1}}\n\
         \x20 # Render each row as prompt + completion (minijinja templates over the columns).\n\
         \x20 # Look at the result: `peftpipe preview {file} --stage prompts -n 3`.\n\
         \x20 prompts:\n\
         \x20   template:\n\
         \x20     input: data\n\
         \x20     prompt: {}\n\
         \x20     completion: {}\n",
        quoted(&format!("{{{{ {prompt} }}}}")),
        quoted(&format!(" {{{{ {completion} }}}}")),
        quoted_name = quoted(name),
        quoted_data = quoted(data),
    );
    let model_line = model.map(quoted).unwrap_or_else(|| {
        "path/to/model   # a Hugging Face model directory or hf://org/name".to_string()
    });
    let training = format!(
        "# Fine-tune with LoRA (the base model stays untouched; only the adapter is trained).\n\
         train:\n\
         \x20 train:\n\
         \x20   data: prompts\n\
         \x20   model: {model_line}\n\
         \x20   method:\n\
         \x20     lora: {{r: 8, alpha: 16, target_modules: all-linear}}\n\
         \x20   learning_rate: 0.001\n\
         \x20   batch_size: 8\n\
         \x20   epochs: 3\n\
         # Base vs adapted on the eval split (loss and perplexity by default).\n\
         evaluate:\n\
         \x20 evaluate:\n\
         \x20   model: train\n\
         \x20   data: prompts\n\
         \x20   samples: 3\n\
         # Write the adapter (PEFT format) and the merged model (Hugging Face layout).\n\
         export:\n\
         \x20 export:\n\
         \x20   from: train\n\
         \x20   adapter: out/{name}/adapter\n\
         \x20   merged: out/{name}/merged\n"
    );
    let prefix = if model.is_some() { "  " } else { "  # " };
    if model.is_none() {
        text.push_str("  # Add a model (`--model DIR` to init, or here) and uncomment:\n");
    }
    for line in training.lines() {
        text.push_str(prefix);
        text.push_str(line);
        text.push('\n');
    }
    text
}

pub fn run(_global: &GlobalArgs, args: InitArgs) -> u8 {
    match init(&args) {
        Ok(written) => {
            for path in &written {
                report::write_stderr(&format!("     Created {}", path.display()));
            }
            report::write_stderr(&format!(
                "        Next peftpipe validate {0} && peftpipe run {0}",
                args.output.display()
            ));
            EXIT_OK
        }
        Err((message, code)) => {
            report::error(&message);
            code
        }
    }
}

fn write_new(path: &Path, text: &str) -> Result<(), (String, u8)> {
    if path.exists() {
        return Err((
            format!(
                "{} already exists; init never overwrites a file",
                path.display()
            ),
            EXIT_INVALID,
        ));
    }
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|error| {
            (
                format!("cannot create {}: {error}", parent.display()),
                EXIT_FAILED,
            )
        })?;
    }
    crate::peft::write_atomic(path, text.as_bytes()).map_err(|error| {
        (
            format!("cannot write {}: {error}", path.display()),
            EXIT_FAILED,
        )
    })
}

fn init(args: &InitArgs) -> Result<Vec<PathBuf>, (String, u8)> {
    let output = &args.output;
    if output.exists() {
        return Err((
            format!(
                "{} already exists; init never overwrites a file",
                output.display()
            ),
            EXIT_INVALID,
        ));
    }
    let project = output
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let file_name = output
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("pipeline.yaml")
        .to_string();
    let name = pipeline_name(
        output
            .file_stem()
            .and_then(|stem| stem.to_str())
            .unwrap_or("pipeline"),
    );
    let mut written = Vec::new();
    let data = match &args.data {
        Some(data) => data.clone(),
        None => {
            let example = project.join("data").join("examples.jsonl");
            write_new(&example, &example_rows())?;
            written.push(example.clone());
            example
        }
    };
    let columns = crate::data::source::peek_columns(&data, None)
        .map_err(|error| (format!("{}: {error}", data.display()), EXIT_INVALID))?;
    let (prompt, completion) = guess_roles(&columns).ok_or_else(|| {
        (
            format!(
                "{}: needs at least two columns (a prompt and a completion); it has {}",
                data.display(),
                columns.join(", ")
            ),
            EXIT_INVALID,
        )
    })?;
    std::fs::create_dir_all(&project).map_err(|error| {
        (
            format!("cannot create {}: {error}", project.display()),
            EXIT_FAILED,
        )
    })?;
    let data_text = relative_to(&data, &project);
    let model_text = args.model.as_ref().map(|model| {
        if model.starts_with("hf://") {
            model.clone()
        } else {
            relative_to(Path::new(model), &project)
        }
    });
    let used = vec![prompt.clone(), completion.clone()];
    let text = pipeline_text(
        &name,
        &file_name,
        &data_text,
        &used,
        &prompt,
        &completion,
        model_text.as_deref(),
    );
    let schema = project.join("pipeline.schema.json");
    if !schema.exists() {
        write_new(&schema, &crate::schema::pipeline_schema_json())?;
        written.push(schema);
    }
    write_new(output, &text)?;
    written.push(output.clone());
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_column_names() {
        let columns = |names: &[&str]| {
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            guess_roles(&columns(&["id", "instruction", "output"])),
            Some(("instruction".into(), "output".into()))
        );
        assert_eq!(
            guess_roles(&columns(&["a", "b", "c"])),
            Some(("a".into(), "b".into()))
        );
        assert_eq!(guess_roles(&columns(&["only"])), None);
    }
}
