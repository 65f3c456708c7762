//! The `template` stage: renders every row of the input stage's splits with minijinja.
//!
//! # Artifact (the contract downstream stages rely on)
//! In `ctx.out_dir`, for each split the input stage wrote (`train`, `eval`, `test` when present):
//! * `<split>.parquet` with Utf8 columns `prompt`, `completion` and `text` (= `prompt` +
//!   `completion`, exactly the string the train stage tokenizes: it tokenizes `prompt` and
//!   `completion` separately and puts the loss on completion tokens only), followed by the carried
//!   columns (`label`, then `carry`) with their input types. Row order is the input's.
//! * `template.json`: the resolved template sources (inline or from files, the chat template with
//!   its special tokens), the few-shot settings, the rows per split and, per split, how many rows
//!   rendered an empty prompt or completion (empty or only whitespace). The stage's figures
//!   give the totals (`empty_prompts`, `empty_completions`) and a note says when there are any.
//!
//! With a chat template, `prompt` is the rendering of the conversation up to the user turn with
//! `add_generation_prompt=true` (it may begin with the template's `bos_token` text: tokenize it
//! without adding special tokens again) and `completion` is the assistant content plus the
//! template's end-of-turn text.
//!
//! Bounds: each rendering (one template, one row) runs with the stage's `limits.fuel` and its
//! output is capped at `limits.max_row_bytes`; a row past either fails the stage with an error
//! naming the split, row and limit. Ctrl-C is honoured between rows. Template files and includes
//! are confined to the project unless `--allow-outside-project` (`config::paths`).
//!
//! Memory: one batch at a time, the few-shot pool (at most `pool_size` rows) and the output
//! writer's row group plus its queue (`data::artifact::QUEUED_BATCHES` batches; encoding runs on
//! the writer's thread while the next batch renders). Never prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use minijinja::value::Value;
use minijinja::Environment;
use serde::Serialize;

use crate::config::jinja::RenderLimits;
use crate::config::template::{FewShotConfig, ResolvedTemplates};
use crate::config::TemplateConfig;
use crate::data::artifact::{write_json, ParquetSink};
use crate::data::chat::{ChatTemplate, Message};
use crate::data::few_shot::{FewShotPool, FewShotSettings};
use crate::data::render::{describe_row_error, render_row, BatchColumns, RowContext};
use crate::data::source::{parquet_row_count, read_artifact};
use crate::data::split::SPLIT_NAMES;

use super::{derive_seed, Progress, Stage, StageContext, StageError, StageOutcome};

pub struct TemplateStage {
    config: TemplateConfig,
}

impl TemplateStage {
    pub fn new(config: TemplateConfig) -> Self {
        TemplateStage { config }
    }
}

/// Renders rows of record batches into prompts and completions.
pub struct RowRenderer {
    env: Environment<'static>,
    resolved: ResolvedTemplates,
    chat: Option<ChatTemplate>,
    pool: Option<FewShotPool>,
    limits: RenderLimits,
}

impl RowRenderer {
    /// Compile the templates (files and includes confined to the project unless
    /// `allow_outside_project`) and build the few-shot pool from `input_dir/<split>.parquet`.
    pub fn new(
        config: &TemplateConfig,
        project_dir: &Path,
        input_dir: &Path,
        stage_seed: u64,
        allow_outside_project: bool,
    ) -> Result<Self, StageError> {
        let limits = config.render_limits();
        let resolved = config
            .resolve(project_dir, allow_outside_project)
            .map_err(|(key, message)| StageError::user(format!("template.{key}: {message}")))?;
        let env = resolved
            .environment(project_dir, allow_outside_project, Some(limits.fuel))
            .map_err(|(key, message)| StageError::user(format!("template.{key}: {message}")))?;
        let chat = match &resolved.chat {
            Some(chat) => Some(
                ChatTemplate::new(chat.chat_template.clone())
                    .map_err(|e| StageError::user(format!("template.chat: {e}")))?,
            ),
            None => None,
        };
        let pool = match &config.few_shot {
            Some(few_shot) => Some(build_pool(config, few_shot, input_dir, stage_seed)?),
            None => None,
        };
        Ok(RowRenderer {
            env,
            resolved,
            chat,
            pool,
            limits,
        })
    }

    pub fn resolved(&self) -> &ResolvedTemplates {
        &self.resolved
    }

    /// The file (as written in the pipeline) the template minijinja knows as `name` came from,
    /// if it came from one.
    fn template_file(&self, name: &str) -> Option<&str> {
        let resolved = &self.resolved;
        let chat = resolved
            .chat
            .iter()
            .flat_map(|chat| chat.system.iter().chain([&chat.user, &chat.assistant]));
        resolved
            .prompt
            .iter()
            .chain(&resolved.completion)
            .chain(chat)
            .find(|source| source.name == name)
            .and_then(|source| source.file.as_deref())
    }

    /// The output columns `prompt`, `completion` and `text` of `batch`, whose first row is row
    /// `first_row` of `split`, built straight into Arrow arrays. Stops with
    /// [`StageError::Cancelled`] between rows once `cancel` is set.
    pub fn render_columns(
        &self,
        batch: &RecordBatch,
        split: &str,
        first_row: u64,
        cancel: &AtomicBool,
    ) -> Result<[ArrayRef; 3], StageError> {
        let rows = batch.num_rows();
        let text_bytes = batch
            .columns()
            .iter()
            .map(|column| column.get_buffer_memory_size())
            .sum::<usize>();
        let mut prompts = StringBuilder::with_capacity(rows, text_bytes);
        let mut completions = StringBuilder::with_capacity(rows, rows * 16);
        let mut texts = StringBuilder::with_capacity(rows, text_bytes + rows * 16);
        self.for_each_rendered(batch, split, first_row, cancel, |prompt, completion| {
            prompts.append_value(prompt);
            completions.append_value(completion);
            // `write_str` extends the pending value; `append_value("")` ends it.
            let _ = texts.write_str(prompt);
            let _ = texts.write_str(completion);
            texts.append_value("");
        })?;
        Ok([
            Arc::new(prompts.finish()),
            Arc::new(completions.finish()),
            Arc::new(texts.finish()),
        ])
    }

    /// Render each row of `batch` and hand its prompt and completion to `emit`, in row order.
    fn for_each_rendered(
        &self,
        batch: &RecordBatch,
        split: &str,
        first_row: u64,
        cancel: &AtomicBool,
        mut emit: impl FnMut(&str, &str),
    ) -> Result<(), StageError> {
        let template = |name: &str| {
            self.env
                .get_template(name)
                .map_err(|e| StageError::Internal(format!("template {name}: {e}")))
        };
        let render = |template: &minijinja::Template<'_, '_>,
                      name: &str,
                      context: &Value,
                      row: u64|
         -> Result<String, StageError> {
            render_row(template, context, self.limits.max_row_bytes).map_err(|e| {
                let message = describe_row_error(&e, name, split, row, &self.limits);
                // A template read from a file: the error names the file first.
                StageError::user(match self.template_file(name) {
                    Some(file) => format!("{file}: {message}"),
                    None => message,
                })
            })
        };
        let columns = BatchColumns::new(batch);
        let plain = match &self.resolved.chat {
            Some(_) => None,
            None => Some((template("prompt")?, template("completion")?)),
        };
        let chat = match (&self.chat, &self.resolved.chat) {
            (Some(chat), Some(resolved)) => Some((
                chat,
                match &resolved.system {
                    Some(system) => Some((system.name.as_str(), template(&system.name)?)),
                    None => None,
                },
                (resolved.user.name.as_str(), template(&resolved.user.name)?),
                (
                    resolved.assistant.name.as_str(),
                    template(&resolved.assistant.name)?,
                ),
            )),
            _ => None,
        };
        for index in 0..batch.num_rows() {
            if cancel.load(Ordering::Relaxed) {
                return Err(StageError::Cancelled);
            }
            let row = first_row + index as u64;
            let examples = match &self.pool {
                Some(pool) => Some(
                    pool.draw(split, row)
                        .map_err(|e| StageError::user(format!("split {split}, row {row}: {e}")))?,
                ),
                None => None,
            };
            let mut extra = Vec::new();
            if let Some(examples) = &examples {
                extra.push(("examples", Value::from(examples.clone())));
            }
            let context = Value::from_object(RowContext {
                columns: Arc::clone(&columns),
                row: index,
                extra,
            });
            if let Some((prompt, completion)) = &plain {
                emit(
                    &render(prompt, "prompt", &context, row)?,
                    &render(completion, "completion", &context, row)?,
                );
                continue;
            }
            let Some((chat, system, (user_name, user), (assistant_name, assistant))) = &chat else {
                return Err(StageError::Internal(
                    "chat settings without a chat template".into(),
                ));
            };
            let mut messages = Vec::new();
            if let Some((name, system)) = system {
                messages.push(Message::new("system", render(system, name, &context, row)?));
            }
            for example in examples.iter().flatten() {
                messages.push(Message::new("user", render(user, user_name, example, row)?));
                messages.push(Message::new(
                    "assistant",
                    render(assistant, assistant_name, example, row)?,
                ));
            }
            messages.push(Message::new(
                "user",
                render(user, user_name, &context, row)?,
            ));
            messages.push(Message::new(
                "assistant",
                render(assistant, assistant_name, &context, row)?,
            ));
            let (prompt, completion) = chat
                .prompt_and_completion(&messages)
                .map_err(|e| StageError::user(format!("split {split}, row {row}: {e}")))?;
            // The chat template's own rendering (the model's, in data::chat) is checked after
            // the fact: its inputs, the messages, are each capped already.
            for (text, name) in [(&prompt, "chat prompt"), (&completion, "chat completion")] {
                if text.len() as u64 > self.limits.max_row_bytes {
                    return Err(StageError::user(describe_row_error(
                        &crate::data::render::RowRenderError::TooLarge,
                        name,
                        split,
                        row,
                        &self.limits,
                    )));
                }
            }
            emit(&prompt, &completion);
        }
        Ok(())
    }
}

fn build_pool(
    config: &TemplateConfig,
    few_shot: &FewShotConfig,
    input_dir: &Path,
    stage_seed: u64,
) -> Result<FewShotPool, StageError> {
    let path = input_dir.join(format!("{}.parquet", few_shot.split));
    if !path.is_file() {
        return Err(StageError::user(format!(
            "few_shot.split: the input stage wrote no `{}` split",
            few_shot.split
        )));
    }
    if few_shot.split != "train" {
        return Err(StageError::user(format!(
            "few_shot.split: demonstrations from `{}` would put evaluation rows into training prompts",
            few_shot.split
        )));
    }
    FewShotPool::build(
        &path,
        FewShotSettings {
            k: few_shot.k,
            strategy: few_shot.strategy,
            label: config.few_shot_label().map(str::to_string),
            pool_size: few_shot.pool_size,
            seed: few_shot
                .seed
                .unwrap_or_else(|| derive_seed(stage_seed, "few-shot")),
            split: few_shot.split.clone(),
        },
    )
}

/// `template.json`.
#[derive(Debug, Serialize)]
struct TemplateRecord<'a> {
    templates: &'a ResolvedTemplates,
    #[serde(skip_serializing_if = "Option::is_none")]
    few_shot: Option<&'a FewShotConfig>,
    carried: Vec<String>,
    rows: BTreeMap<String, u64>,
    /// Rows per split whose prompt is empty or only whitespace.
    empty_prompts: BTreeMap<String, u64>,
    /// Rows per split whose completion is empty or only whitespace.
    empty_completions: BTreeMap<String, u64>,
}

/// Rows of a rendered column (`prompt` or `completion`) that are empty or only whitespace.
fn blank_rows(rendered: &ArrayRef) -> u64 {
    rendered.as_string_opt::<i32>().map_or(0, |strings| {
        strings
            .iter()
            .filter(|value| value.is_none_or(|text| text.trim().is_empty()))
            .count() as u64
    })
}

/// The output schema: rendered columns then carried ones (with their input types).
fn output_schema(input: &Schema, carried: &[String], split: &str) -> Result<SchemaRef, StageError> {
    let mut fields = vec![
        Field::new("prompt", DataType::Utf8, false),
        Field::new("completion", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
    ];
    for name in carried {
        let field = input.field_with_name(name).map_err(|_| {
            let available: Vec<&str> = input.fields().iter().map(|f| f.name().as_str()).collect();
            StageError::user(format!(
                "carried column `{name}` is not in the input's {split} split; available: {}",
                available.join(", ")
            ))
        })?;
        fields.push(Field::new(name, field.data_type().clone(), true));
    }
    Ok(Arc::new(Schema::new(fields)))
}

impl Stage for TemplateStage {
    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let input_dir = ctx.upstream_dir(&self.config.input)?;
        let renderer = RowRenderer::new(
            &self.config,
            ctx.project_dir,
            input_dir,
            ctx.stage_seed(),
            ctx.options.allow_outside_project,
        )?;
        let carried = self.config.carried_columns();
        let splits: Vec<&str> = SPLIT_NAMES
            .iter()
            .copied()
            .filter(|split| input_dir.join(format!("{split}.parquet")).is_file())
            .collect();
        if splits.is_empty() {
            return Err(StageError::user(format!(
                "stage `{}` wrote no train/eval/test Parquet files",
                self.config.input
            )));
        }
        let mut total = 0;
        for split in &splits {
            total += parquet_row_count(&input_dir.join(format!("{split}.parquet")))?;
        }
        let mut rows_per_split = BTreeMap::new();
        let mut empty_prompts = BTreeMap::new();
        let mut empty_completions = BTreeMap::new();
        let mut done = 0u64;
        for split in splits {
            let input = input_dir.join(format!("{split}.parquet"));
            let output = ctx.out_dir.join(format!("{split}.parquet"));
            let mut sink: Option<ParquetSink> = None;
            let mut row = 0u64;
            let (mut blank_prompts, mut blank_completions) = (0u64, 0u64);
            let schema = read_artifact(&input, |batch| {
                ctx.check_cancel()?;
                if sink.is_none() {
                    sink = Some(ParquetSink::create(
                        &output,
                        output_schema(&batch.schema(), &carried, split)?,
                        true,
                    )?);
                }
                let rendered = renderer.render_columns(&batch, split, row, ctx.cancel)?;
                blank_prompts += blank_rows(&rendered[0]);
                blank_completions += blank_rows(&rendered[1]);
                let out = assemble(&batch, rendered, &carried)?;
                if let Some(sink) = sink.as_mut() {
                    sink.write(&out)?;
                }
                row += batch.num_rows() as u64;
                done += batch.num_rows() as u64;
                ctx.progress.progress(Progress {
                    position: done,
                    length: Some(total),
                    unit: "rows",
                    message: format!("rendering {split}"),
                });
                Ok(())
            })?;
            let sink = match sink {
                Some(sink) => sink,
                None => {
                    ParquetSink::create(&output, output_schema(&schema, &carried, split)?, true)?
                }
            };
            rows_per_split.insert(split.to_string(), sink.finish()?);
            empty_prompts.insert(split.to_string(), blank_prompts);
            empty_completions.insert(split.to_string(), blank_completions);
        }
        write_json(
            &ctx.out_dir.join("template.json"),
            &TemplateRecord {
                templates: renderer.resolved(),
                few_shot: self.config.few_shot.as_ref(),
                carried,
                rows: rows_per_split.clone(),
                empty_prompts: empty_prompts.clone(),
                empty_completions: empty_completions.clone(),
            },
        )?;
        let mut summary = BTreeMap::new();
        for (split, rows) in rows_per_split {
            summary.insert(format!("{split}_rows"), rows.into());
        }
        let total_prompts: u64 = empty_prompts.values().sum();
        let total_completions: u64 = empty_completions.values().sum();
        summary.insert("empty_prompts".into(), total_prompts.into());
        summary.insert("empty_completions".into(), total_completions.into());
        if total_prompts + total_completions > 0 {
            let per_split = |counts: &BTreeMap<String, u64>| {
                counts
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(split, n)| format!("{split} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let rows = |n: u64| {
                if n == 1 {
                    "1 row".to_string()
                } else {
                    format!("{n} rows")
                }
            };
            let mut parts = Vec::new();
            if total_prompts > 0 {
                parts.push(format!(
                    "{} rendered an empty prompt ({})",
                    rows(total_prompts),
                    per_split(&empty_prompts)
                ));
            }
            if total_completions > 0 {
                parts.push(format!(
                    "{} rendered an empty completion ({})",
                    rows(total_completions),
                    per_split(&empty_completions)
                ));
            }
            ctx.progress.note(format!(
                "{} (empty or only whitespace; see template.json)",
                parts.join("; ")
            ));
        }
        Ok(StageOutcome { summary })
    }
}

/// The output batch: rendered columns, then the carried input columns.
fn assemble(
    batch: &RecordBatch,
    rendered: [ArrayRef; 3],
    carried: &[String],
) -> Result<RecordBatch, StageError> {
    let schema = output_schema(&batch.schema(), carried, "input")?;
    let mut columns: Vec<ArrayRef> = rendered.into();
    for name in carried {
        let index = batch
            .schema()
            .index_of(name)
            .map_err(|_| StageError::user(format!("carried column `{name}` is missing")))?;
        columns.push(batch.column(index).clone());
    }
    RecordBatch::try_new(schema, columns).map_err(|e| StageError::Internal(e.to_string()))
}
