//! `peftpipe generate MODEL [--adapter DIR] (--prompt TEXT | --input FILE.jsonl)`: try a model
//! (a base model, a merged export, or a base model with a PEFT adapter) on one prompt or on every
//! line of a JSONL file. Resolves the arguments into
//! [`crate::infer::session::GenerateRequest`]s and hands the results to the reporter (one prompt)
//! or to the output JSONL (stdout through the reporter, or a file).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;

use super::{Failure, GlobalArgs, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::config::method::{block_size_problem, FourBitSettings, QuantTypeChoice};
use crate::device::{compute_dtype, resolve_device, DTypeSpec, DeviceSpec};
use crate::infer::adapter_base::{adapter_base, StoredBase, GENERATE};
use crate::infer::jsonl::{OutputFields, PromptLines, PromptRecord};
use crate::infer::session::{
    generate_many, generate_one, recorded_base_quantization, GenerateRequest, InferenceModel,
};
use crate::infer::Sampling;
use crate::models::quantized::BaseQuantization;
use crate::models::{resolve_model_path, ModelConfig, ModelDir};
use crate::peft::qlora;
use crate::report;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model folder in Hugging Face layout (config.json, model.safetensors, tokenizer.json): a
    /// base model or a merged export; or a Hub id `hf://org/name[@revision]` found in the local
    /// Hugging Face cache (downloaded when built with the `hub` feature).
    #[arg(value_name = "MODEL")]
    pub model: String,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors) applied on the model,
    /// or a Hub id `hf://org/name[@revision]` found in the local Hugging Face cache (never
    /// downloaded: fetch it with `huggingface-cli download org/name`). A QLoRA adapter is
    /// applied over the same 4-bit base it was trained over, as recorded in a train artifact's
    /// sibling base_model.json or an exported folder's peftpipe_base_quantization.json; over a
    /// MODEL or --load-in-4bit that gives another base, over that one, with a warning.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<String>,
    /// The prompt (BOS is added when the tokenizer adds it).
    #[arg(long, required_unless_present = "input", conflicts_with = "input")]
    pub prompt: Option<String>,
    /// Generate for every line of this JSONL file: each line a JSON object whose `prompt` field
    /// (see --prompt-field) is the prompt. Writes one JSON line per input line, in order: the
    /// input's fields followed by `completion` (the generated text), `completion_tokens` and
    /// `stop_reason`. Every line's JSON is checked before the model loads.
    #[arg(long, value_name = "FILE.jsonl")]
    pub input: Option<PathBuf>,
    /// Where --input's results go (default: stdout). The file is replaced once every line is
    /// generated; a run that fails leaves it as it was and keeps what it generated in
    /// `FILE.jsonl.partial`. It may not be the --input file.
    #[arg(long, value_name = "FILE.jsonl", requires = "input")]
    pub output: Option<PathBuf>,
    /// The field of each --input line that holds the prompt.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "prompt",
        requires = "input"
    )]
    pub prompt_field: String,
    /// The field the generated text is written to (also names `<NAME>_tokens`); an input line
    /// that already has it is an error, never overwritten.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "completion",
        requires = "input"
    )]
    pub output_field: String,
    /// --input prompts decoded together: left-padded into one batch, one forward pass per token
    /// step for the whole batch, each prompt stopping on its own; its output lines are written
    /// when the batch finishes (memory holds one batch). The tokens of each prompt do not depend
    /// on the batch size.
    #[arg(long, value_name = "N", default_value_t = 16, requires = "input", value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// Most tokens to generate (generation also stops at EOS).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_new_tokens: usize,
    /// Sample with this temperature instead of greedy decoding.
    #[arg(long, value_name = "T")]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (needs
    /// --temperature).
    #[arg(long, value_name = "P", requires = "temperature")]
    pub top_p: Option<f64>,
    /// Seed of the sampler (needs --temperature; default 0).
    #[arg(long, value_name = "S", requires = "temperature")]
    pub seed: Option<u64>,
    /// Load the model's linear layers (all but `lm_head`) in bitsandbytes 4-bit, quantized as
    /// they load (bit-exact with bitsandbytes), as PEFT applies an adapter trained with QLoRA
    /// elsewhere over `BitsAndBytesConfig(load_in_4bit=True, ...)`: `nf4` (the default) or
    /// `fp4`, double-quantized, in blocks of 64 unless the flags below say otherwise; --dtype is
    /// the compute dtype. A model saved in 4 bits is used as stored without it; a QLoRA train
    /// artifact's adapter brings its own base (a flag that asks for another is followed, with a
    /// warning).
    #[arg(long, value_name = "TYPE", num_args = 0..=1, default_missing_value = "nf4", value_parser = ["nf4", "fp4"])]
    pub load_in_4bit: Option<String>,
    /// With --load-in-4bit: keep the per-block absmax values in f32 (bitsandbytes'
    /// `bnb_4bit_use_double_quant=False`).
    #[arg(long, requires = "load_in_4bit")]
    pub no_double_quant: bool,
    /// With --load-in-4bit: weights per absmax, a power of two from 64 to 4096.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 64,
        requires = "load_in_4bit"
    )]
    pub block_size: usize,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype: `auto` (f32 on CPU, bf16 on CUDA), `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

pub fn run(global: &GlobalArgs, args: GenerateArgs) -> u8 {
    match generate(global, &args) {
        Ok(code) => code,
        Err(failure) => failure.report(global, &args.model),
    }
}

/// Generate as `args` ask: the exit code, or why nothing (more) could be generated. A failure
/// in the middle of `--input` lines written to stdout is reported on stderr only (stdout holds
/// JSON lines then, and `--json` changes nothing about them).
fn generate(global: &GlobalArgs, args: &GenerateArgs) -> Result<u8, Failure> {
    let device_spec: DeviceSpec = match args.device.parse() {
        Ok(spec) => spec,
        Err(error) => {
            return Err(Failure::new(
                EXIT_INVALID,
                "--device",
                format!("--device: {error}"),
            ));
        }
    };
    let dtype_spec: DTypeSpec = match args.dtype.parse() {
        Ok(spec) => spec,
        Err(error) => {
            return Err(Failure::new(
                EXIT_INVALID,
                "--dtype",
                format!("--dtype: {error}"),
            ));
        }
    };
    let sampling = match args.temperature {
        None => Sampling::Greedy,
        Some(temperature) => Sampling::Random {
            temperature,
            top_p: args.top_p.unwrap_or(1.0),
            seed: args.seed.unwrap_or(0),
        },
    };
    if let Err(message) = sampling.validate() {
        return Err(Failure::new(EXIT_INVALID, "--temperature", message));
    }
    // A bad line fails here, before any model loads or any output is written.
    if let Some(input) = &args.input {
        let names = output_fields(args, global.json);
        if args.prompt_field == args.output_field {
            return Err(Failure::new(EXIT_INVALID, "--output-field", format!(
                "--prompt-field and --output-field are both `{}`: the output would overwrite the prompt",
                args.prompt_field
            )));
        }
        if let Some(output) = &args.output {
            // Writing the results where the prompts are read from would lose them.
            let same = match (std::fs::canonicalize(input), std::fs::canonicalize(output)) {
                (Ok(input), Ok(output)) => input == output,
                _ => false,
            };
            if same {
                return Err(Failure::new(EXIT_INVALID, "--output", format!(
                    "--output {} is the --input file: the prompts would be overwritten; write the results elsewhere",
                    output.display()
                )));
            }
        }
        match check_input(input, &args.prompt_field, &names) {
            Ok(0) => {
                return Err(Failure::new(
                    EXIT_INVALID,
                    "--input",
                    format!("{}: no prompts (the file is empty)", input.display()),
                ));
            }
            Ok(_) => {}
            Err(message) => {
                return Err(Failure::new(EXIT_INVALID, "--input", message));
            }
        }
    }
    let device = match resolve_device(device_spec) {
        Ok(device) => device,
        Err(error) => {
            return Err(Failure::new(EXIT_FAILED, "--device", error.to_string()));
        }
    };
    let dtype = compute_dtype(&device, dtype_spec);
    let model_dir = match resolve_model_path(&args.model) {
        Ok(path) => path,
        Err(error) => {
            return Err(Failure::new(EXIT_INVALID, "MODEL", error.to_string()));
        }
    };
    let adapter = match args.adapter.as_deref().map(resolve_adapter) {
        Some(Err(message)) => {
            return Err(Failure::new(EXIT_INVALID, "--adapter", message));
        }
        Some(Ok(dir)) => Some(dir),
        None => None,
    };
    let recorded = match adapter.as_deref().map(recorded_base_quantization) {
        Some(Err(message)) => {
            return Err(Failure::new(EXIT_INVALID, "--adapter", message));
        }
        Some(Ok(recorded)) => recorded,
        None => None,
    };
    let asked = match asked_quantization(args, &model_dir) {
        Ok(asked) => asked,
        Err(message) => {
            return Err(Failure::new(EXIT_INVALID, "--load-in-4bit", message));
        }
    };
    // A QLoRA adapter over a base its record does not describe runs, never silently: the note
    // evaluate gives an outside adapter, as a warning here and in --json's `notes`.
    let (quantization, base_note) = match recorded {
        None => (asked, None),
        Some(recorded) => {
            let dir = match ModelDir::open(&model_dir) {
                Ok(dir) => dir,
                Err(error) => return Err(Failure::new(EXIT_FAILED, "MODEL", error.to_string())),
            };
            let name = format!(
                "the adapter {}",
                args.adapter.as_deref().unwrap_or_default()
            );
            let (chosen, note) = adapter_base(
                &name,
                asked.as_ref(),
                StoredBase::of(&dir).as_ref(),
                Some(recorded.clone()),
                GENERATE,
            );
            match note {
                // The base it was trained over.
                None => (asked.or(Some(recorded.0)), None),
                Some(note) => (chosen, Some(note)),
            }
        }
    };
    if let Some(note) = &base_note {
        report::warning(note);
    }
    let model = match InferenceModel::load(
        &model_dir,
        adapter.as_deref(),
        quantization.as_ref(),
        &device,
        dtype,
    ) {
        Ok(model) => model,
        Err(message) => {
            return Err(Failure::new(EXIT_FAILED, "MODEL", message));
        }
    };
    let Some(prompt) = args.prompt.clone() else {
        let Some(input) = &args.input else {
            return Err(Failure::new(
                EXIT_INVALID,
                "--prompt",
                "give --prompt TEXT or --input FILE.jsonl".to_string(),
            ));
        };
        let names = output_fields(args, global.json);
        let base_note = base_note.as_deref();
        return match generate_file(&model, input, args, &names, sampling, base_note) {
            Ok(generated) => {
                match &args.output {
                    // The lines are in the file: stdout gets the summary.
                    Some(path) if global.json => {
                        let notes: Vec<&str> = base_note
                            .into_iter()
                            .chain(generated.stop_notes.keys().map(String::as_str))
                            .collect();
                        report::json(&serde_json::json!({
                            "input": input.display().to_string(),
                            "output": path.display().to_string(),
                            "prompts": generated.count,
                            "notes": notes,
                        }));
                    }
                    _ if global.quiet => {}
                    to => {
                        let to = match to {
                            Some(path) => path.display().to_string(),
                            None => "stdout".to_string(),
                        };
                        let mut text = format!(
                            "{} prompts from {} generated, written to {to}",
                            generated.count,
                            input.display()
                        );
                        for (note, lines) in &generated.stop_notes {
                            text.push_str(&format!("\n  {lines} of them: {note}"));
                        }
                        report::write_stderr(&text);
                    }
                }
                Ok(EXIT_OK)
            }
            Err(message) if args.output.is_some() => {
                Err(Failure::new(EXIT_FAILED, "--input", message))
            }
            Err(message) => {
                report::error(&message);
                Ok(EXIT_FAILED)
            }
        };
    };
    let request = GenerateRequest {
        prompt,
        max_new_tokens: args.max_new_tokens,
        sampling,
    };
    match generate_one(&model, &request) {
        Ok(mut output) => {
            if let Some(note) = base_note {
                output.notes.insert(0, note);
            }
            if global.json {
                report::json(&output);
            } else {
                report::generate::print(&output, global.quiet);
            }
            Ok(EXIT_OK)
        }
        Err(message) => Err(Failure::new(EXIT_FAILED, "--prompt", message)),
    }
}

/// The fields `--input` adds to each line; with `--json` also `notes`, as `--prompt --json`
/// gives them.
fn output_fields(args: &GenerateArgs, json: bool) -> OutputFields {
    let names = OutputFields::named(&args.output_field);
    if json {
        names.with_notes()
    } else {
        names
    }
}

/// What [`generate_file`] generated: how many lines, and how many of them each note about how
/// generation stopped concerns (a sliding window that ended it).
struct FileGenerated {
    count: usize,
    stop_notes: BTreeMap<String, usize>,
}

/// The 4-bit base --load-in-4bit asks for (checked against a stored 4-bit checkpoint's
/// settings: such a checkpoint is used as stored, never re-quantized); `None` without the flag.
fn asked_quantization(
    args: &GenerateArgs,
    model_dir: &Path,
) -> Result<Option<BaseQuantization>, String> {
    let Some(quant_type) = &args.load_in_4bit else {
        return Ok(None);
    };
    let settings = FourBitSettings {
        quant_type: if quant_type == "fp4" {
            QuantTypeChoice::Fp4
        } else {
            QuantTypeChoice::Nf4
        },
        double_quant: !args.no_double_quant,
        block_size: args.block_size,
        compute_dtype: None,
    };
    if let Some(message) = block_size_problem(settings.block_size) {
        return Err(format!("--block-size: {message}"));
    }
    let dir = ModelDir::open(model_dir).map_err(|error| error.to_string())?;
    if matches!(dir.config(), ModelConfig::Gpt2(_)) {
        return Err(format!(
            "--load-in-4bit: a 4-bit base is supported for Llama-family models; {} is gpt2",
            model_dir.display()
        ));
    }
    let stored = dir.stored_quantization();
    let asked = qlora::base_quantization(&settings, stored.is_some());
    if let Some(stored) = stored {
        if !stored.has_settings_of(&asked.config) {
            return Err(format!(
                "{}: key `quantization_config`: the checkpoint is stored in bitsandbytes 4-bit ({}, double_quant {}) and is used as stored, never re-quantized; --load-in-4bit asks for {} with double_quant {}: drop the flag",
                dir.config_path().display(),
                stored.quant_type.name(),
                stored.double_quant,
                asked.config.quant_type.name(),
                asked.config.double_quant
            ));
        }
    }
    Ok(Some(asked))
}

/// The folder of `--adapter`: a path as given, or a Hub id's snapshot in the local cache (never
/// downloaded: the `hub` feature's download fetches a model's files, not an adapter's).
fn resolve_adapter(text: &str) -> Result<PathBuf, String> {
    match crate::config::hub::HubId::parse(text) {
        Ok(None) => Ok(PathBuf::from(text)),
        Ok(Some(_)) => crate::config::hub::resolve_adapter_dir(Path::new("."), text)
            .map_err(|message| format!("--adapter: {message}")),
        Err(error) => Err(format!("--adapter: {error}")),
    }
}

/// Read every line of `input` once (nothing kept): the number of prompts, or the first bad line.
fn check_input(input: &Path, prompt_field: &str, names: &OutputFields) -> Result<usize, String> {
    let mut count = 0;
    for record in PromptLines::open(input, prompt_field, names)? {
        record?;
        count += 1;
    }
    Ok(count)
}

/// Where the output lines go.
enum Sink {
    Stdout,
    File(std::io::BufWriter<std::fs::File>, PathBuf),
}

impl Sink {
    fn write(&mut self, text: &str) -> Result<(), String> {
        match self {
            Sink::Stdout => {
                report::write_stdout_raw(text);
                Ok(())
            }
            Sink::File(file, path) => file
                .write_all(text.as_bytes())
                .and_then(|()| file.flush())
                .map_err(|e| format!("{}: {e}", path.display())),
        }
    }
}

/// Generate for every line of `input`, `batch_size` lines at a time (read, decoded together as one
/// batch, written in input order). `base_note` (the adapter's base is not the one its record
/// describes) goes first in every line's notes. An error after some lines were written says
/// how many.
fn generate_file(
    model: &InferenceModel,
    input: &Path,
    args: &GenerateArgs,
    names: &OutputFields,
    sampling: Sampling,
    base_note: Option<&str>,
) -> Result<FileGenerated, String> {
    // A file is written beside --output and moved over it once every line is there: a run that
    // fails leaves an existing --output as it was, and what it generated in `<output>.partial`.
    let (mut sink, temporary) = match &args.output {
        None => (Sink::Stdout, None),
        Some(path) => {
            let directory = path
                .parent()
                .filter(|parent| !parent.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let temporary = crate::files::file_builder()
                .prefix(".peftpipe-generate-")
                .suffix(".partial")
                .tempfile_in(directory)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let file = temporary
                .as_file()
                .try_clone()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            (
                Sink::File(std::io::BufWriter::new(file), path.clone()),
                Some(temporary),
            )
        }
    };
    let mut generated = FileGenerated {
        count: 0,
        stop_notes: BTreeMap::new(),
    };
    let result = generate_batches(
        model,
        input,
        args,
        names,
        sampling,
        base_note,
        &mut sink,
        &mut generated,
    );
    drop(sink);
    let written = generated.count;
    match (result, temporary, &args.output) {
        (Ok(()), Some(temporary), Some(path)) => {
            temporary
                .persist(path)
                .map_err(|e| format!("{}: {}", path.display(), e.error))?;
            Ok(generated)
        }
        (Ok(()), _, _) => Ok(generated),
        (Err(message), _, _) if written == 0 => Err(message),
        (Err(message), Some(temporary), Some(path)) => {
            let partial = PathBuf::from(format!("{}.partial", path.display()));
            match temporary.persist(&partial) {
                Ok(_) => Err(format!(
                    "{message} ({written} lines were generated before it, kept in {}; {} was left as it was)",
                    partial.display(),
                    path.display()
                )),
                Err(_) => Err(format!(
                    "{message} ({written} lines were generated before it; {} was left as it was)",
                    path.display()
                )),
            }
        }
        (Err(message), _, _) => Err(format!(
            "{message} ({written} lines were written before it)"
        )),
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "generate_file's settings and its two outputs"
)]
fn generate_batches(
    model: &InferenceModel,
    input: &Path,
    args: &GenerateArgs,
    names: &OutputFields,
    sampling: Sampling,
    base_note: Option<&str>,
    sink: &mut Sink,
    generated: &mut FileGenerated,
) -> Result<(), String> {
    let batch_size = usize::try_from(args.batch_size).unwrap_or(usize::MAX);
    let mut lines = PromptLines::open(input, &args.prompt_field, names)?;
    loop {
        let batch: Vec<PromptRecord> = lines.by_ref().take(batch_size).collect::<Result<_, _>>()?;
        if batch.is_empty() {
            return Ok(());
        }
        let count = batch.len();
        let prompts: Vec<String> = batch.iter().map(|record| record.prompt.clone()).collect();
        let outputs =
            generate_many(model, &prompts, args.max_new_tokens, sampling).map_err(|error| {
                match error.index.and_then(|index| batch.get(index)) {
                    Some(record) => {
                        format!("{}:{}: {}", input.display(), record.line, error.message)
                    }
                    None => format!(
                        "{}:{}-{}: {}",
                        input.display(),
                        batch.first().map_or(0, |record| record.line),
                        batch.last().map_or(0, |record| record.line),
                        error.message
                    ),
                }
            })?;
        let mut text = String::new();
        for (record, mut output) in batch.into_iter().zip(outputs) {
            for note in &output.notes {
                *generated.stop_notes.entry(note.clone()).or_default() += 1;
            }
            if let Some(note) = base_note {
                output.notes.insert(0, note.to_string());
            }
            let line = record.line;
            let fields = record.with_output(names, &output);
            let json = serde_json::to_string(&fields).map_err(|e| {
                format!("{}:{line}: cannot encode the output: {e}", input.display())
            })?;
            text.push_str(&json);
            text.push('\n');
        }
        sink.write(&text)?;
        generated.count += count;
    }
}
