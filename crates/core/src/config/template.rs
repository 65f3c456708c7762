//! Config of the `template` stage kind and its semantic checks: where the prompt and completion
//! templates come from (inline, files next to the pipeline, or a model's chat template), few-shot
//! settings, and which columns are carried through.
//!
//! Pure data plus checks. Checks compile the row templates with minijinja (syntax errors, variables
//! no input column provides, includes by computed names) and read template files and
//! `tokenizer_config.json`; a chat template is compiled by the [`super::probe::Probe`] (as the
//! stage renders it). Where template files may be is the path policy ([`super::paths`]), checked
//! by [`TemplateConfig::path_problems`] with the command line's `--allow-outside-project`. Checks
//! never read rows. The stage itself lives in the main crate's `stages/template.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::chat_template::{load_chat_template, ChatTemplateSource};
use super::ingest::IngestConfig;
use super::jinja::{
    row_environment, template_references, undeclared_variables, unknown_filters_and_tests,
    Includes, RenderLimits, TemplateReference, UnknownCallable, FILTER_NAMES, TEST_NAMES,
};
use super::paths::{confine_template, read_template_file};
use super::problem::did_you_mean;
use super::{resolve_path, CheckContext, InputFile, Problem, StageConfig, StageSpec, UpstreamRef};

/// The `template` stage: renders each row of the input stage's splits into `prompt`, `completion`
/// and `text` (= prompt + completion) with minijinja, in strict mode (an undefined variable is an
/// error naming the row and the variable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// Upstream stage whose rows are rendered (an `ingest` stage: its train / eval / test splits).
    pub input: String,
    /// Prompt template (minijinja), inline. Row columns are variables; with `few_shot`,
    /// `examples` is the list of demonstrations (each with the row's columns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Prompt template file, relative to the pipeline file (instead of `prompt`). Includes and
    /// imports resolve relative to the pipeline directory and name their template with a string
    /// literal (`{% include "parts/header.j2" %}`), so that editing it reruns the stage. Template
    /// files must lie inside the pipeline's directory tree (symbolic links resolved) unless
    /// `--allow-outside-project` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_file: Option<String>,
    /// Completion template (minijinja), inline: the text the model learns to produce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
    /// Completion template file, relative to the pipeline file (instead of `completion`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_file: Option<String>,
    /// Render conversations with a model's chat template instead of `prompt` / `completion`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatConfig>,
    /// Few-shot demonstrations drawn from a split and given to the templates as `examples`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub few_shot: Option<FewShotConfig>,
    /// Label column carried through to the output unchanged (classification accuracy, stratified
    /// few-shot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Other input columns carried through unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub carry: Vec<String>,
    /// Bounds on rendering one template for one row (default: fuel 10,000,000 instructions,
    /// max_row_bytes 1 MiB), so that no template runs without end or fills the memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<RenderLimits>,
}

/// A chat-template rendering: each row becomes a conversation (optional system message, the user
/// turn, the assistant turn), rendered as transformers' `apply_chat_template` does. The prompt is
/// the conversation up to the user turn with `add_generation_prompt=true`; the completion is the
/// assistant content plus the template's end-of-turn text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatConfig {
    /// A model's `tokenizer_config.json` (its `chat_template`, `bos_token`, `eos_token`) or a
    /// `.jinja` chat-template file, relative to the pipeline file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_config: Option<String>,
    /// An inline chat template (Jinja), instead of `tokenizer_config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Overrides the BOS token text the chat template sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token: Option<String>,
    /// Overrides the EOS token text the chat template sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<String>,
    /// Template of the system message (omitted when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Template of the user message.
    pub user: String,
    /// Template of the assistant message (the completion's content).
    pub assistant: String,
}

/// How few-shot demonstrations are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FewShotConfig {
    /// Demonstrations per row.
    pub k: usize,
    /// Split the demonstrations come from. Only `train`: evaluation rows never go into training
    /// prompts.
    #[serde(default = "default_split")]
    pub split: String,
    /// How demonstrations are chosen.
    #[serde(default)]
    pub strategy: FewShotStrategy,
    /// Column the `stratified` strategy balances (default: the stage's `label`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stratify_by: Option<String>,
    /// Demonstrations come from a seeded sample of at most this many rows of the split (per
    /// label value when stratified), so memory stays bounded.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Seed of the draws (default: derived from the pipeline seed and the stage name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

fn default_split() -> String {
    "train".to_string()
}

fn default_pool_size() -> usize {
    1000
}

/// How demonstrations are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FewShotStrategy {
    /// `k` rows drawn at random (without replacement) for every rendered row.
    #[default]
    Random,
    /// Balanced over the values of a label column: round-robin over the labels in a random order,
    /// a random row of each.
    Stratified,
    /// The first `k` rows of the split (skipping the row itself), the same for every row.
    FirstK,
}

/// A template's source as resolved for a run (recorded in `template.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedSource {
    /// The name minijinja knows it by (`prompt`, `completion`, `chat_user`, …).
    pub name: String,
    /// The file it came from (as written), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub source: String,
}

/// The chat part of the resolved templates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResolvedChat {
    pub chat_template: ChatTemplateSource,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<NamedSource>,
    pub user: NamedSource,
    pub assistant: NamedSource,
}

/// Every template of the stage, sources loaded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResolvedTemplates {
    /// The names the templates include literally (transitively): what the loader may serve.
    #[serde(skip)]
    pub included: BTreeSet<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<NamedSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion: Option<NamedSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<ResolvedChat>,
}

impl ResolvedTemplates {
    /// The row templates (name, key suffix for problems).
    pub fn row_templates(&self) -> Vec<(&NamedSource, &'static str)> {
        let mut all = Vec::new();
        if let Some(prompt) = &self.prompt {
            all.push((
                prompt,
                if prompt.file.is_some() {
                    "prompt_file"
                } else {
                    "prompt"
                },
            ));
        }
        if let Some(completion) = &self.completion {
            all.push((
                completion,
                if completion.file.is_some() {
                    "completion_file"
                } else {
                    "completion"
                },
            ));
        }
        if let Some(chat) = &self.chat {
            if let Some(system) = &chat.system {
                all.push((system, "chat.system"));
            }
            all.push((&chat.user, "chat.user"));
            all.push((&chat.assistant, "chat.assistant"));
        }
        all
    }

    /// The row-template environment with every row template added, rendering at most `fuel`
    /// instructions per rendering, its includes confined to the project unless
    /// `allow_outside_project`. Errors: (key suffix, message).
    pub fn environment(
        &self,
        project_dir: &Path,
        allow_outside_project: bool,
        fuel: Option<u64>,
    ) -> Result<minijinja::Environment<'static>, (String, String)> {
        let includes = Includes {
            project_dir: project_dir.to_path_buf(),
            allow_outside_project,
            tracked: self.included.clone(),
        };
        let mut env = row_environment(&includes, fuel);
        for (source, key) in self.row_templates() {
            env.add_template_owned(source.name.clone(), source.source.clone())
                .map_err(|e| (key.to_string(), syntax_message(&e)))?;
        }
        Ok(env)
    }
}

fn syntax_message(error: &minijinja::Error) -> String {
    let detail = error.detail().unwrap_or("invalid template");
    match error.line() {
        Some(line) => format!("template syntax error on line {line}: {detail}"),
        None => format!("template syntax error: {detail}"),
    }
}

/// A template name still to read while following includes.
struct Pending {
    /// The name as written.
    written: String,
    /// The key of the stage's template it was reached from.
    key: &'static str,
    /// Named by an include tag (not `prompt_file` or `completion_file`).
    included: bool,
    /// The include may do without it ([`TemplateReference::Literal`]).
    may_be_absent: bool,
}

/// The template files a stage's templates read, found by following literal includes.
#[derive(Debug, Clone, Default)]
struct TemplateWalk {
    /// `prompt_file`, `completion_file` and every included file, by the name written.
    files: Vec<InputFile>,
    /// Names written literally in include tags (transitively), each with the key of the
    /// stage's template it was first reached from.
    included: BTreeMap<String, &'static str>,
    /// Includes by computed names: (key of the stage's template they stem from, the file they
    /// are in if not that template itself, the tag, its line).
    computed: Vec<(&'static str, Option<String>, String, usize)>,
}

impl TemplateWalk {
    fn scan(
        &mut self,
        source: &str,
        key: &'static str,
        file: Option<&str>,
        pending: &mut Vec<Pending>,
    ) {
        for reference in template_references(source) {
            match reference {
                TemplateReference::Literal {
                    names,
                    may_be_absent,
                } => pending.extend(names.into_iter().map(|name| Pending {
                    written: name,
                    key,
                    included: true,
                    may_be_absent,
                })),
                TemplateReference::Computed { tag, line } => {
                    self.computed
                        .push((key, file.map(str::to_string), tag, line))
                }
            }
        }
    }
}

impl TemplateConfig {
    /// The stage's inline row templates with their keys.
    fn inline_sources(&self) -> Vec<(&String, &'static str)> {
        let mut inline = Vec::new();
        inline.extend(self.prompt.iter().map(|s| (s, "prompt")));
        inline.extend(self.completion.iter().map(|s| (s, "completion")));
        if let Some(chat) = &self.chat {
            inline.extend(chat.system.iter().map(|s| (s, "chat.system")));
            inline.push((&chat.user, "chat.user"));
            inline.push((&chat.assistant, "chat.assistant"));
        }
        inline
    }

    /// Follow the templates' literal includes from the inline templates and template files.
    /// Every file is resolved under the path policy (`allow_outside_project`) and read bounded.
    fn walk_templates(
        &self,
        project_dir: &Path,
        allow_outside_project: bool,
    ) -> Result<TemplateWalk, String> {
        let mut walk = TemplateWalk::default();
        let mut pending = Vec::new();
        for (file, key) in [
            (&self.completion_file, "completion_file"),
            (&self.prompt_file, "prompt_file"),
        ] {
            if let Some(file) = file {
                pending.push(Pending {
                    written: file.clone(),
                    key,
                    included: false,
                    may_be_absent: false,
                });
            }
        }
        for (source, key) in self.inline_sources() {
            walk.scan(source, key, None, &mut pending);
        }
        let mut seen = BTreeSet::new();
        while let Some(Pending {
            written,
            key,
            included,
            may_be_absent,
        }) = pending.pop()
        {
            if included {
                walk.included.entry(written.clone()).or_insert(key);
            }
            if seen.contains(&written) {
                continue;
            }
            let what = if included {
                "the included template"
            } else {
                key
            };
            let path = confine_template(project_dir, &written, what, allow_outside_project)?;
            // A file an include may do without (a list's alternative, `ignore missing`) that is
            // not there is no input: should it appear, the set of inputs, and so the
            // fingerprint, changes. The name stays tracked, so a run's loader answers for it.
            if may_be_absent && !path.exists() {
                continue;
            }
            seen.insert(written.clone());
            let source = read_template_file(&path, &written)?;
            walk.scan(&source, key, Some(&written), &mut pending);
            walk.files.push(InputFile { key: written, path });
        }
        Ok(walk)
    }

    /// Template files that resolve outside the project directory (symbolic links included),
    /// unless `allow_outside_project`: one problem per file, at the key that names it (an
    /// included file: at the template that includes it).
    pub fn path_problems(
        &self,
        project_dir: &Path,
        allow_outside_project: bool,
        at: &str,
    ) -> Vec<Problem> {
        if allow_outside_project {
            return Vec::new();
        }
        let mut problems = Vec::new();
        for (file, key) in [
            (&self.prompt_file, "prompt_file"),
            (&self.completion_file, "completion_file"),
        ] {
            if let Some(file) = file {
                if let Err(message) = confine_template(project_dir, file, key, false) {
                    problems.push(Problem::new(format!("{at}.{key}"), message).about_value());
                }
            }
        }
        // Includes, found by following every file (the refusals above are reported already).
        if let Ok(walk) = self.walk_templates(project_dir, true) {
            for (name, key) in walk.included {
                if let Err(message) =
                    confine_template(project_dir, &name, "the included template", false)
                {
                    problems.push(Problem::new(format!("{at}.{key}"), message).about_value());
                }
            }
        }
        problems
    }

    /// The rendering limits in force (the defaults unless `limits` is given).
    pub fn render_limits(&self) -> RenderLimits {
        self.limits.unwrap_or_default()
    }

    /// Load every template source (files relative to the pipeline directory, confined to it
    /// unless `allow_outside_project`) and the names the templates include. Errors: (key
    /// suffix, message).
    pub fn resolve(
        &self,
        project_dir: &Path,
        allow_outside_project: bool,
    ) -> Result<ResolvedTemplates, (String, String)> {
        let load = |name: &str,
                    inline: &Option<String>,
                    file: &Option<String>,
                    key: &str|
         -> Result<Option<NamedSource>, (String, String)> {
            match (inline, file) {
                (Some(source), None) => Ok(Some(NamedSource {
                    name: name.to_string(),
                    file: None,
                    source: source.clone(),
                })),
                (None, Some(file)) => {
                    let file_key = format!("{key}_file");
                    let path =
                        confine_template(project_dir, file, &file_key, allow_outside_project)
                            .map_err(|e| (file_key.clone(), e))?;
                    let source = read_template_file(&path, file).map_err(|e| (file_key, e))?;
                    Ok(Some(NamedSource {
                        name: name.to_string(),
                        file: Some(file.clone()),
                        source,
                    }))
                }
                (Some(_), Some(_)) => Err((
                    key.to_string(),
                    format!("both `{key}` and `{key}_file` are given; keep one"),
                )),
                (None, None) => Ok(None),
            }
        };
        let prompt = load("prompt", &self.prompt, &self.prompt_file, "prompt")?;
        let completion = load(
            "completion",
            &self.completion,
            &self.completion_file,
            "completion",
        )?;
        let chat = match &self.chat {
            None => {
                if prompt.is_none() {
                    return Err((
                        "prompt".into(),
                        "no prompt template: give `prompt`, `prompt_file` or `chat`".into(),
                    ));
                }
                if completion.is_none() {
                    return Err((
                        "completion".into(),
                        "no completion template: give `completion` or `completion_file`".into(),
                    ));
                }
                None
            }
            Some(chat) => {
                if prompt.is_some() || completion.is_some() {
                    return Err((
                        "chat".into(),
                        "`chat` renders prompt and completion itself; remove `prompt`/`completion`"
                            .into(),
                    ));
                }
                let mut template = match (&chat.tokenizer_config, &chat.template) {
                    (Some(file), None) => {
                        let path = resolve_path(project_dir, file)
                            .map_err(|e| ("chat.tokenizer_config".to_string(), e))?;
                        load_chat_template(&path)
                            .map_err(|e| ("chat.tokenizer_config".to_string(), e))?
                    }
                    (None, Some(source)) => ChatTemplateSource {
                        template: source.clone(),
                        bos_token: String::new(),
                        eos_token: String::new(),
                        pad_token: None,
                        unk_token: None,
                    },
                    (Some(_), Some(_)) => {
                        return Err((
                            "chat".into(),
                            "both `tokenizer_config` and `template` are given; keep one".into(),
                        ))
                    }
                    (None, None) => {
                        return Err((
                            "chat".into(),
                            "no chat template: give `tokenizer_config` or `template`".into(),
                        ))
                    }
                };
                if let Some(bos) = &chat.bos_token {
                    template.bos_token = bos.clone();
                }
                if let Some(eos) = &chat.eos_token {
                    template.eos_token = eos.clone();
                }
                let named = |name: &str, source: &String| NamedSource {
                    name: name.to_string(),
                    file: None,
                    source: source.clone(),
                };
                Some(ResolvedChat {
                    chat_template: template,
                    system: chat.system.as_ref().map(|s| named("chat_system", s)),
                    user: named("chat_user", &chat.user),
                    assistant: named("chat_assistant", &chat.assistant),
                })
            }
        };
        let included = self
            .walk_templates(project_dir, allow_outside_project)
            .map_err(|message| {
                let key = if self.prompt_file.is_some() {
                    "prompt_file"
                } else {
                    "prompt"
                };
                (key.to_string(), message)
            })?
            .included
            .into_keys()
            .collect();
        Ok(ResolvedTemplates {
            included,
            prompt,
            completion,
            chat,
        })
    }

    /// Columns carried to the output (label first, then `carry`, without repeats).
    pub fn carried_columns(&self) -> Vec<String> {
        let mut carried: Vec<String> = Vec::new();
        for name in self.label.iter().chain(&self.carry) {
            if !carried.contains(name) {
                carried.push(name.clone());
            }
        }
        carried
    }

    /// The label column the stratified few-shot strategy balances.
    pub fn few_shot_label(&self) -> Option<&str> {
        let few_shot = self.few_shot.as_ref()?;
        few_shot.stratify_by.as_deref().or(self.label.as_deref())
    }
}

/// The splits an upstream stage writes, when known from its config.
pub(crate) fn upstream_splits(cx: &CheckContext<'_>, stage: &str) -> Option<Vec<String>> {
    match cx.pipeline.stages.get(stage)? {
        StageConfig::Ingest(ingest) => Some(
            ingest
                .split
                .split_names()
                .into_iter()
                .map(str::to_string)
                .collect(),
        ),
        StageConfig::Template(template) => upstream_splits(cx, &template.input),
        _ => None,
    }
}

/// The ingest stage at the root of `stage` (through template stages), if there is one.
fn root_ingest<'a>(cx: &'a CheckContext<'_>, stage: &str) -> Option<(&'a str, &'a IngestConfig)> {
    let (name, config) = cx.pipeline.stages.get_key_value(stage)?;
    match config {
        StageConfig::Ingest(ingest) => Some((name.as_str(), ingest)),
        StageConfig::Template(template) => root_ingest(cx, &template.input),
        _ => None,
    }
}

/// A stage reads split `split` of data stage `data` (at key `at`): the name must not be empty,
/// the split must be one the data stage writes, and not one its own configuration leaves empty.
pub(crate) fn check_split_read(
    cx: &CheckContext<'_>,
    data: &str,
    split: &str,
    at: &str,
    problems: &mut Vec<Problem>,
) {
    if split.trim().is_empty() {
        problems.push(Problem::new(at, "the split name is empty").about_value());
        return;
    }
    let Some(splits) = upstream_splits(cx, data) else {
        return;
    };
    if !splits.iter().any(|name| name == split) {
        let mut problem = Problem::new(
            at,
            format!("stage `{data}` writes no split named `{split}`"),
        )
        .about_value();
        problem = match did_you_mean(split, splits.iter().map(String::as_str)) {
            Some(close) => problem.with_hint(format!(
                "did you mean `{close}`? its splits: {}",
                splits.join(", ")
            )),
            None => problem.with_hint(format!("its splits: {}", splits.join(", "))),
        };
        problems.push(problem);
        return;
    }
    if let Some((ingest_name, ingest)) = root_ingest(cx, data) {
        if let Some(reason) = ingest.split.declared_empty(split) {
            problems.push(
                Problem::new(
                    at,
                    format!("split `{split}` has no rows: stage `{ingest_name}` has {reason}"),
                )
                .about_value()
                .with_hint(format!(
                    "give stages.{ingest_name}.ingest.split a share for `{split}`, or read another split"
                )),
            );
        }
    }
}

/// A demonstration for validation's trial render: a map of the row's columns (each the string
/// `x`) that notes every other field a template asks of it.
#[derive(Debug)]
struct StandInDemonstration {
    columns: BTreeSet<String>,
    unknown: std::sync::Arc<std::sync::Mutex<BTreeSet<String>>>,
}

impl minijinja::value::Object for StandInDemonstration {
    fn get_value(self: &std::sync::Arc<Self>, key: &minijinja::Value) -> Option<minijinja::Value> {
        let name = key.as_str()?;
        if self.columns.contains(name) {
            return Some(minijinja::Value::from("x"));
        }
        if let Ok(mut unknown) = self.unknown.lock() {
            unknown.insert(name.to_string());
        }
        None
    }
}

fn column_hint(name: &str, available: &[String]) -> String {
    let list = available.join(", ");
    match did_you_mean(name, available.iter().map(String::as_str)) {
        Some(close) => format!("did you mean `{close}`? available columns: {list}"),
        None => format!("available columns: {list}"),
    }
}

/// Output columns every template stage writes.
pub const RENDERED_COLUMNS: [&str; 3] = ["prompt", "completion", "text"];

impl StageSpec for TemplateConfig {
    fn upstream(&self) -> Vec<UpstreamRef> {
        vec![UpstreamRef {
            key: "input",
            stage: self.input.clone(),
        }]
    }

    fn input_files(&self, project_dir: &Path) -> Result<Vec<InputFile>, String> {
        // Every file a run may read, wherever it is: the path policy is validation's and the
        // stage's to enforce; the fingerprint hashes what is there.
        let mut files = self.walk_templates(project_dir, true)?.files;
        if let Some(config) = self.chat.as_ref().and_then(|c| c.tokenizer_config.as_ref()) {
            let path = resolve_path(project_dir, config)?;
            for companion in super::chat_template::companion_file_names(&path) {
                let beside = path.with_file_name(companion);
                if beside.is_file() {
                    files.push(InputFile {
                        key: Path::new(config)
                            .with_file_name(companion)
                            .to_string_lossy()
                            .into_owned(),
                        path: beside,
                    });
                }
            }
            files.push(InputFile {
                key: config.clone(),
                path,
            });
        }
        files.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(files)
    }

    fn output_columns(&self, _cx: &CheckContext<'_>, _stage: &str) -> Option<Vec<String>> {
        let mut columns: Vec<String> = RENDERED_COLUMNS.iter().map(|c| c.to_string()).collect();
        for name in self.carried_columns() {
            if !columns.contains(&name) {
                columns.push(name);
            }
        }
        Some(columns)
    }

    fn check(&self, cx: &CheckContext<'_>, at: &str, problems: &mut Vec<Problem>) {
        let columns = cx.columns.get(&self.input);

        for (index, name) in self.carried_columns().iter().enumerate() {
            let key = if self.label.as_deref() == Some(name.as_str()) && index == 0 {
                format!("{at}.label")
            } else {
                let position = self.carry.iter().position(|c| c == name).unwrap_or(0);
                format!("{at}.carry[{position}]")
            };
            if RENDERED_COLUMNS.contains(&name.as_str()) {
                problems.push(
                    Problem::new(
                        key.clone(),
                        format!("`{name}` is a column the template stage writes itself"),
                    )
                    .about_value(),
                );
            }
            if let Some(columns) = columns {
                if !columns.contains(name) {
                    problems.push(
                        Problem::new(
                            key,
                            format!("column `{name}` is not an output of stage `{}`", self.input),
                        )
                        .about_value()
                        .with_hint(column_hint(name, columns)),
                    );
                }
            }
        }

        if let Some(few_shot) = &self.few_shot {
            let base = format!("{at}.few_shot");
            if few_shot.k == 0 {
                problems.push(
                    Problem::new(format!("{base}.k"), "k is 0: no demonstrations")
                        .about_value()
                        .with_hint("remove `few_shot` or set k ≥ 1"),
                );
            }
            if few_shot.pool_size < few_shot.k {
                problems.push(
                    Problem::new(
                        format!("{base}.pool_size"),
                        format!(
                            "pool_size ({}) is smaller than k ({})",
                            few_shot.pool_size, few_shot.k
                        ),
                    )
                    .about_value(),
                );
            }
            let splits = upstream_splits(cx, &self.input)
                .unwrap_or_else(|| vec!["train".into(), "eval".into(), "test".into()]);
            if !splits.contains(&few_shot.split) {
                problems.push(
                    Problem::new(
                        format!("{base}.split"),
                        format!(
                            "stage `{}` writes no split named `{}`",
                            self.input, few_shot.split
                        ),
                    )
                    .about_value()
                    .with_hint(format!("its splits: {}", splits.join(", "))),
                );
            } else if few_shot.split != "train" {
                problems.push(
                    Problem::new(
                        format!("{base}.split"),
                        format!(
                            "demonstrations from the `{}` split would put evaluation rows into training prompts",
                            few_shot.split
                        ),
                    )
                    .about_value()
                    .with_hint("draw demonstrations from `train`"),
                );
            }
            if few_shot.strategy == FewShotStrategy::Stratified {
                match self.few_shot_label() {
                    None => problems.push(
                        Problem::new(
                            format!("{base}.strategy"),
                            "the stratified strategy needs a label column",
                        )
                        .about_value()
                        .with_hint("set `label` on the stage or `few_shot.stratify_by`"),
                    ),
                    Some(label) => {
                        if let (Some(columns), Some(_)) = (columns, &few_shot.stratify_by) {
                            if !columns.iter().any(|c| c == label) {
                                problems.push(
                                    Problem::new(
                                        format!("{base}.stratify_by"),
                                        format!(
                                            "column `{label}` is not an output of stage `{}`",
                                            self.input
                                        ),
                                    )
                                    .about_value()
                                    .with_hint(column_hint(label, columns)),
                                );
                            }
                        }
                    }
                }
            }
        }

        if let Some(limits) = &self.limits {
            for (value, key) in [
                (limits.fuel, "fuel"),
                (limits.max_row_bytes, "max_row_bytes"),
            ] {
                if value == 0 {
                    problems.push(
                        Problem::new(
                            format!("{at}.limits.{key}"),
                            format!("{key} is 0: no row could render"),
                        )
                        .about_value()
                        .with_hint("remove it to use the default, or give a positive number"),
                    );
                }
            }
        }
        // Included templates by name, each with the key of the template it was reached from.
        let mut included = BTreeMap::new();
        if let Ok(walk) = self.walk_templates(cx.project_dir, true) {
            included = walk.included;
            for (key, file, tag, line) in walk.computed {
                let place = match file {
                    Some(file) => format!("line {line} of {file}"),
                    None => format!("line {line}"),
                };
                problems.push(
                    Problem::new(
                        format!("{at}.{key}"),
                        format!("`{tag}` ({place}) names its template by a computed expression: peftpipe tracks included templates by the names written, so editing that file would not rerun the stage"),
                    )
                    .about_value()
                    .with_hint("write the name as a string literal, e.g. `{% include \"parts/example.j2\" %}`, or a list of literals"),
                );
            }
        }
        // Validation reads template files wherever they are, to compile them; whether they may
        // be there is `path_problems`' question.
        let resolved = match self.resolve(cx.project_dir, true) {
            Ok(resolved) => resolved,
            Err((key, message)) => {
                let problem = Problem::new(format!("{at}.{key}"), message);
                // A template or tokenizer_config file that cannot be read is about the path
                // written; the other resolve errors are about which keys are given.
                problems.push(
                    if key.ends_with("_file") || key.ends_with("tokenizer_config") {
                        problem.about_value()
                    } else {
                        problem
                    },
                );
                return;
            }
        };
        if let Some(chat) = &resolved.chat {
            if let Err(message) = cx.probe.check_chat_template(&chat.chat_template) {
                let key = if self.chat.as_ref().is_some_and(|c| c.template.is_some()) {
                    "chat.template"
                } else {
                    "chat.tokenizer_config"
                };
                problems.push(Problem::new(format!("{at}.{key}"), message).about_value());
            }
        }
        // Compile each row template on its own so every syntax error is reported.
        let mut env = row_environment(&Includes::none(cx.project_dir), None);
        let mut compiled = Vec::new();
        for (source, key) in resolved.row_templates() {
            match env.add_template_owned(source.name.clone(), source.source.clone()) {
                Ok(()) => compiled.push((source.name.clone(), key)),
                Err(error) => problems.push(
                    Problem::new(format!("{at}.{key}"), syntax_message(&error)).about_value(),
                ),
            }
        }
        let mut uses_examples = false;
        // A template that includes others may use `examples` in them, which this does not see.
        let includes = resolved
            .row_templates()
            .iter()
            .any(|(source, _)| !super::jinja::template_references(&source.source).is_empty());
        // minijinja looks filters and tests up only when it runs them: one the environment lacks
        // (jinja2's `truncate`) would fail on the first row that reaches it. `file`: the
        // included template it is in.
        let unknown_problem = |key: &str, file: Option<&str>, unknown: UnknownCallable| {
            let candidates = if unknown.kind == "filter" {
                FILTER_NAMES
            } else {
                TEST_NAMES
            };
            let line = match unknown.line {
                0 => String::new(),
                line => format!(" (line {line})"),
            };
            let hint = match did_you_mean(&unknown.name, candidates.iter().copied()) {
                Some(close) => format!("did you mean `{close}`? "),
                None => String::new(),
            };
            let template = match file {
                Some(file) => format!("the included template `{file}`"),
                None => "the template".to_string(),
            };
            Problem::new(
                format!("{at}.{key}"),
                format!(
                    "{template} uses {} `{}`{line}, which peftpipe's templates do not provide: rendering would fail on the first row that reaches it",
                    unknown.kind, unknown.name
                ),
            )
            .about_value()
            .with_hint(format!(
                "{hint}templates render with minijinja's built-in {kind}s ({}), not all of jinja2's",
                candidates.join(", "),
                kind = unknown.kind
            ))
        };
        // Included templates, loaded as a run loads them (only the names written literally);
        // validation reads them wherever they are, as the stage's own files. One that does not
        // compile would fail every row that renders it; one missing or unreadable is reported
        // where the walk reads it (and `path_problems`).
        if !included.is_empty() {
            let include_env = row_environment(
                &Includes {
                    project_dir: cx.project_dir.to_path_buf(),
                    allow_outside_project: true,
                    tracked: included.keys().cloned().collect(),
                },
                None,
            );
            for (name, key) in &included {
                match unknown_filters_and_tests(&include_env, name) {
                    Ok(unknown) => problems.extend(
                        unknown
                            .into_iter()
                            .map(|unknown| unknown_problem(key, Some(name), unknown)),
                    ),
                    Err(error) if error.kind() == minijinja::ErrorKind::SyntaxError => problems
                        .push(
                            Problem::new(
                                format!("{at}.{key}"),
                                format!(
                                    "the included template `{name}` does not compile ({}): \
                                     rendering would fail on every row that reaches it",
                                    syntax_message(&error)
                                ),
                            )
                            .about_value(),
                        ),
                    Err(_) => {}
                }
            }
        }
        for (name, key) in compiled {
            for unknown in unknown_filters_and_tests(&env, &name).unwrap_or_default() {
                problems.push(unknown_problem(key, None, unknown));
            }
            let variables = match undeclared_variables(&env, &name) {
                Ok(variables) => variables,
                Err(error) => {
                    problems.push(
                        Problem::new(format!("{at}.{key}"), syntax_message(&error)).about_value(),
                    );
                    continue;
                }
            };
            for variable in variables {
                if variable == "examples" {
                    uses_examples = true;
                    if self.few_shot.is_none() {
                        problems.push(
                            Problem::new(
                                format!("{at}.{key}"),
                                "the template uses `examples` but the stage has no `few_shot`",
                            )
                            .about_value()
                            .with_hint("add `few_shot: {k: 3}`"),
                        );
                    }
                    continue;
                }
                if let Some(columns) = columns {
                    if !columns.contains(&variable) {
                        problems.push(
                            Problem::new(
                                format!("{at}.{key}"),
                                format!(
                                    "template variable `{variable}` is not a column of stage `{}`",
                                    self.input
                                ),
                            )
                            .about_value()
                            .with_hint(column_hint(&variable, columns)),
                        );
                    }
                }
            }
        }
        // A demonstration's fields are read through a loop variable (`{{ e.sentense }}`), which
        // the variable check above cannot see: render once with stand-in demonstrations that
        // note every field asked of them that is no column. Only those are reported; any other
        // error may come from the stand-in values and is the run's to find.
        if let (Some(columns), Some(few_shot), true) = (
            columns,
            &self.few_shot,
            uses_examples && self.chat.is_none(),
        ) {
            let asked = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
            let demonstration = minijinja::Value::from_object(StandInDemonstration {
                columns: columns.iter().cloned().collect(),
                unknown: asked.clone(),
            });
            let mut context: BTreeMap<String, minijinja::Value> = columns
                .iter()
                .map(|column| (column.clone(), minijinja::Value::from("x")))
                .collect();
            context.insert(
                "examples".to_string(),
                minijinja::Value::from(vec![demonstration; few_shot.k.clamp(1, 4)]),
            );
            env.set_fuel(Some(self.render_limits().fuel));
            for (source, key) in resolved.row_templates() {
                // A template that tests for missing fields (`is defined`, `default`) may ask
                // for fields no row has, on purpose.
                let tests_fields = ["defined", "default", "get("]
                    .iter()
                    .any(|word| source.source.contains(word));
                if tests_fields {
                    continue;
                }
                let Ok(template) = env.get_template(&source.name) else {
                    continue;
                };
                let _ = template.render(&context);
                let unknown: Vec<String> = asked
                    .lock()
                    .map(|mut names| std::mem::take(&mut *names).into_iter().collect())
                    .unwrap_or_default();
                for name in unknown {
                    problems.push(
                        Problem::new(
                            format!("{at}.{key}"),
                            format!(
                                "a demonstration's `{name}` is not a column of stage `{}`",
                                self.input
                            ),
                        )
                        .about_value()
                        .with_hint(format!(
                            "a demonstration has the row's columns; {}",
                            column_hint(&name, columns)
                        )),
                    );
                }
            }
        }
        // Chat turns take the demonstrations themselves; a prompt must loop over them.
        if self.few_shot.is_some() && self.chat.is_none() && !uses_examples && !includes {
            problems.push(
                Problem::new(
                    format!("{at}.few_shot"),
                    "`few_shot` draws demonstrations, but neither template uses `examples` (the list of them): they would be drawn and dropped",
                )
                .with_hint("loop over them in the prompt: `{% for example in examples %}…{{ example.text }}…{% endfor %}`, or drop `few_shot`"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use indexmap::IndexMap;

    use super::*;
    use crate::config::RawPipeline;

    fn check(yaml: &str, columns: &[&str]) -> Vec<Problem> {
        check_in(yaml, columns, Path::new("."))
    }

    /// `check` with the pipeline directory `project_dir` (for included templates).
    fn check_in(yaml: &str, columns: &[&str], project_dir: &Path) -> Vec<Problem> {
        let value: serde_json::Value = serde_norway::from_str(yaml).unwrap();
        let pipeline: RawPipeline = serde_json::from_value(value).unwrap();
        let mut known = BTreeMap::new();
        known.insert(
            "data".to_string(),
            columns.iter().map(|c| c.to_string()).collect(),
        );
        let cx = CheckContext {
            pipeline: &pipeline,
            project_dir,
            columns: &known,
            probe: &crate::config::probe::TestProbe,
        };
        let mut problems = Vec::new();
        if let Some(StageConfig::Template(template)) = pipeline.stages.get("prompts") {
            template.check(&cx, "stages.prompts.template", &mut problems);
        }
        problems
    }

    const HEADER: &str = "stages:\n  data:\n    ingest: {path: x.parquet}\n  prompts:\n    template:\n      input: data\n";

    #[test]
    fn unknown_variables_are_reported_with_the_available_columns() {
        let problems = check(
            &format!("{HEADER}      prompt: \"review: {{{{ txt }}}}\"\n      completion: \" {{{{ label }}}}\"\n"),
            &["text", "label"],
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.prompts.template.prompt");
        assert!(problems[0].message.contains("`txt`"));
        assert!(problems[0]
            .hint
            .as_deref()
            .unwrap()
            .contains("did you mean `text`"));
    }

    #[test]
    fn syntax_errors_and_bad_few_shot_splits_are_reported() {
        let problems = check(
            &format!("{HEADER}      prompt: \"{{{{ text \"\n      completion: \"{{{{ label }}}}\"\n      few_shot: {{k: 2, split: validation}}\n"),
            &["text", "label"],
        );
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert!(
            paths.contains(&"stages.prompts.template.prompt"),
            "{problems:?}"
        );
        assert!(
            paths.contains(&"stages.prompts.template.few_shot.split"),
            "{problems:?}"
        );
        let problems = check(
            &format!("{HEADER}      prompt: \"{{{{ text }}}}\"\n      completion: \"{{{{ label }}}}\"\n      few_shot: {{k: 2, split: eval}}\n"),
            &["text", "label"],
        );
        assert!(
            problems[0].message.contains("evaluation rows"),
            "{problems:?}"
        );
    }

    /// Regression: a filter or test the row environment lacks (jinja2's `truncate`,
    /// `wordcount`, `is divisible_by`) passed validate and failed only at run, on the first row
    /// that reached it. Every filter and test a template names is checked, in branches no row
    /// may take, macros and `{% filter %}` blocks included.
    #[test]
    fn filters_and_tests_the_environment_lacks_are_reported() {
        let stage = "      prompt: \"{% if label == 'x' %}{{ text | truncate(10) }}{% endif %}{% macro m(v) %}{{ v | wordcount }}{% endmacro %}\"\n      completion: \"{% filter bogus_upper %}{{ label }}{% endfilter %}{% if label is divisible_by(3) %}x{% endif %}\"\n";
        let problems = check(&format!("{HEADER}{stage}"), &["text", "label"]);
        let messages: Vec<(&str, &str)> = problems
            .iter()
            .map(|p| (p.path.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(problems.len(), 4, "{messages:?}");
        for (path, name) in [
            ("stages.prompts.template.prompt", "filter `truncate`"),
            ("stages.prompts.template.prompt", "filter `wordcount`"),
            ("stages.prompts.template.completion", "filter `bogus_upper`"),
            ("stages.prompts.template.completion", "test `divisible_by`"),
        ] {
            assert!(
                messages
                    .iter()
                    .any(|(p, m)| *p == path && m.contains(name) && m.contains("line 1")),
                "{name}: {messages:?}"
            );
        }
        let test = problems
            .iter()
            .find(|p| p.message.contains("divisible_by"))
            .unwrap();
        assert!(
            test.hint
                .as_deref()
                .is_some_and(|hint| hint.contains("did you mean `divisibleby`")),
            "{test:?}"
        );
        // Built-in filters and tests (minijinja's, jinja2's names) are fine.
        let stage = "      prompt: \"{{ examples | selectattr('label', 'eq', 'x') | map(attribute='text') | join(', ') }}{{ text | trim | lower | replace('a', 'b') }}{% if label is none or label is divisibleby(2) or label is not defined %}{% endif %}{{ text | default('') | tojson }}\"\n      completion: \"{{ label | upper }}\"\n      few_shot: {k: 2}\n";
        let problems = check(&format!("{HEADER}{stage}"), &["text", "label"]);
        assert!(problems.is_empty(), "{problems:?}");
    }

    /// Templates a template includes, imports or extends (transitively) are checked too, each
    /// problem naming the included file and its line, at the key of the template that includes
    /// it; before, validate compiled without loading them and saw none.
    #[test]
    fn filters_and_tests_the_environment_lacks_in_included_templates_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("parts")).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(
            "parts/shot.j2",
            "shot:\n{{ text | truncate(5) }}{% include \"parts/deep.j2\" %}",
        );
        write(
            "parts/deep.j2",
            "{{ text | trim }}\n\n{{ text | wordcount }}",
        );
        write(
            "parts/macros.j2",
            "{% macro odd(v) %}{% if v is divisible_by(2) %}x{% endif %}{% endmacro %}",
        );
        write(
            "base.j2",
            "{% block answer %}{{ label | bogus }}{% endblock %}",
        );
        write("fine.j2", "{{ label | upper }}");
        let stage = "      prompt: \"{% include 'parts/shot.j2' %}{% import 'parts/macros.j2' as m %}{{ m.odd(1) }}{% include 'fine.j2' %}\"\n      completion: \"{% extends 'base.j2' %}\"\n";
        let problems = check_in(&format!("{HEADER}{stage}"), &["text", "label"], dir.path());
        let messages: Vec<(&str, &str)> = problems
            .iter()
            .map(|p| (p.path.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(problems.len(), 4, "{messages:?}");
        for (path, file, name, line) in [
            ("prompt", "parts/shot.j2", "filter `truncate`", "line 2"),
            ("prompt", "parts/deep.j2", "filter `wordcount`", "line 3"),
            ("prompt", "parts/macros.j2", "test `divisible_by`", "line 1"),
            ("completion", "base.j2", "filter `bogus`", "line 1"),
        ] {
            assert!(
                messages
                    .iter()
                    .any(|(p, m)| *p == format!("stages.prompts.template.{path}")
                        && m.contains(&format!("`{file}`"))
                        && m.contains(name)
                        && m.contains(line)),
                "{file} {name}: {messages:?}"
            );
        }
    }

    /// An included template that does not compile fails every row that renders it: validate
    /// reports it, naming the file and its line, at the key of the template that includes it.
    #[test]
    fn syntax_errors_in_included_templates_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("part.j2", "{% include 'deep.j2' %}");
        write("deep.j2", "fine\n{% if text %}review: {{ text }");
        write("fine.j2", "{{ label }}");
        let stage = "      prompt: \"{% include 'part.j2' %}\"\n      completion: \"{% include 'fine.j2' %}\"\n";
        let problems = check_in(&format!("{HEADER}{stage}"), &["text", "label"], dir.path());
        let messages: Vec<(&str, &str)> = problems
            .iter()
            .map(|p| (p.path.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(problems.len(), 1, "{messages:?}");
        let (path, message) = messages[0];
        assert_eq!(path, "stages.prompts.template.prompt");
        assert!(
            message.contains("`deep.j2`") && message.contains("syntax error on line 2"),
            "{message}"
        );
    }

    #[test]
    fn few_shot_without_examples_in_a_prompt_is_reported() {
        let problems = check(
            &format!("{HEADER}      prompt: \"t: {{{{ text }}}}\"\n      completion: \"{{{{ label }}}}\"\n      few_shot: {{k: 2}}\n"),
            &["text", "label"],
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.prompts.template.few_shot");
        assert!(problems[0].message.contains("`examples`"), "{problems:?}");
        // Used: no problem; chat turns take the demonstrations themselves.
        for stage in [
            "      prompt: \"{% for e in examples %}{{ e.text }}{% endfor %}{{ text }}\"\n      completion: \"{{ label }}\"\n      few_shot: {k: 2}\n",
            "      chat: {template: \"{{ messages }}\", user: \"{{ text }}\", assistant: \"{{ label }}\"}\n      few_shot: {k: 2}\n",
        ] {
            let problems = check(&format!("{HEADER}{stage}"), &["text", "label"]);
            assert!(problems.is_empty(), "{stage}: {problems:?}");
        }
    }

    #[test]
    fn a_demonstration_field_no_column_provides_is_reported() {
        let stage = "      prompt: \"{% for e in examples %}{{ e.sentense }} {{ e.label }}\n{% endfor %}{{ sentence }}\"\n      completion: \"{{ label }}\"\n      few_shot: {k: 2}\n";
        let problems = check(&format!("{HEADER}{stage}"), &["sentence", "label"]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.prompts.template.prompt");
        assert!(
            problems[0].message.contains("`sentense`")
                && problems[0]
                    .hint
                    .as_deref()
                    .is_some_and(|hint| hint.contains("did you mean `sentence`")),
            "{:?}",
            problems[0].message
        );
        // Fields that are columns, and filters on them, are fine.
        let stage = "      prompt: \"{% for e in examples %}{{ e.sentence | upper }} {{ e['label'] }}{% endfor %}{{ sentence }}\"\n      completion: \"{{ label }}\"\n      few_shot: {k: 2}\n";
        let problems = check(&format!("{HEADER}{stage}"), &["sentence", "label"]);
        assert!(problems.is_empty(), "{problems:?}");
        // A template that tests for a missing field on purpose.
        let stage = "      prompt: \"{% for e in examples %}{% if e.note is defined %}{{ e.note }}{% endif %}{{ e.sentence }}{% endfor %}{{ sentence }}\"\n      completion: \"{{ label }}\"\n      few_shot: {k: 2}\n";
        let problems = check(&format!("{HEADER}{stage}"), &["sentence", "label"]);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn output_columns_are_rendered_plus_carried() {
        let config = TemplateConfig {
            input: "data".into(),
            prompt: Some("x".into()),
            prompt_file: None,
            completion: Some("y".into()),
            completion_file: None,
            chat: None,
            few_shot: None,
            label: Some("label".into()),
            carry: vec!["id".into(), "label".into()],
            limits: None,
        };
        let pipeline = RawPipeline {
            name: None,
            seed: 0,
            stages: IndexMap::new(),
        };
        let known = BTreeMap::new();
        let cx = CheckContext {
            pipeline: &pipeline,
            project_dir: Path::new("."),
            columns: &known,
            probe: &crate::config::probe::TestProbe,
        };
        assert_eq!(
            config.output_columns(&cx, "prompts").unwrap(),
            vec!["prompt", "completion", "text", "label", "id"]
        );
    }

    #[test]
    fn includes_by_computed_names_are_reported() {
        let problems = check(
            &format!("{HEADER}      prompt: \"{{% set n = 'dyn' ~ '.j2' %}}{{% include n %}}{{{{ text }}}}\"\n      completion: \"{{{{ label }}}}\"\n"),
            &["text", "label"],
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.prompts.template.prompt");
        assert!(
            problems[0].message.contains("`{% include n %}`")
                && problems[0].message.contains("computed expression"),
            "{problems:?}"
        );
    }
}
