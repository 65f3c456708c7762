//! Command-line interface: clap types and one file per subcommand. Nothing outside cli/ sees clap
//! types: each subcommand resolves its arguments into plain settings and calls the core.
//!
//! Exit codes (documented in README.md): 0 success; 1 a stage or command failed (bad data, I/O);
//! 2 invalid pipeline or arguments; 3 `status --check` found stale stages; 130 interrupted by
//! Ctrl-C, 143 by SIGTERM (see [`interrupt`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub mod argument_error;
pub mod bench_data;
pub mod bench_quantize;
pub mod bench_status;
pub mod bench_train;
pub mod dag;
pub mod gc;
pub mod generate;
pub mod init;
pub mod inspect;
pub mod interrupt;
pub mod metrics;
pub mod preview;
pub mod remote;
pub mod report;
pub mod run;
pub mod schema;
pub mod status;
pub mod validate;

/// Exit codes.
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_INVALID: u8 = 2;
pub const EXIT_STALE: u8 = 3;
/// Ctrl-C; an interrupted command returns [`interrupt::exit_code`] (143 after SIGTERM).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Why a command stopped: its exit code, what is at fault (`inspect`/`generate`: the argument,
/// `MODEL`, `--target`; a pipeline command: the argument or key, `--stage`, `--cache-dir`,
/// `stages.NAME`; empty for the file as a whole), the message and an optional hint.
/// [`Failure::report`] prints it as every command prints a problem: the message on stderr, and
/// with `--json` the object of `validate --json` on stdout (one shape for every command).
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub argument: String,
    pub message: String,
    pub hint: Option<String>,
}

impl Failure {
    pub fn new(code: u8, argument: impl Into<String>, message: String) -> Self {
        Failure {
            code,
            argument: argument.into(),
            message,
            hint: None,
        }
    }

    /// The failure with a hint (on stderr as `= hint:`, in the JSON problem as `hint`).
    pub fn with_hint(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }

    /// An error that kept a run or a plan from starting: a cache error is a failure (1) at
    /// `--cache-dir`; an unknown `--stage`, an unreadable input or a bad graph is invalid (2).
    pub fn exec(error: &crate::exec::ExecError) -> Self {
        use crate::exec::ExecError;
        let (code, argument) = match error {
            ExecError::Cache(_) => (EXIT_FAILED, "--cache-dir".to_string()),
            ExecError::UnknownStage { .. } => (EXIT_INVALID, "--stage".to_string()),
            ExecError::Input { stage, .. } => (EXIT_INVALID, format!("stages.{stage}")),
            ExecError::Graph(_) => (EXIT_INVALID, "stages".to_string()),
            ExecError::NameTaken { .. } => (EXIT_INVALID, "name".to_string()),
        };
        let hint = matches!(error, ExecError::NameTaken { .. })
            .then(|| "give each pipeline its own `name:`".to_string());
        Failure::new(code, argument, error.to_string()).with_hint(hint)
    }

    /// Report the failure about `subject` (the file or folder the command was given) and return
    /// its exit code.
    pub fn report(self, global: &GlobalArgs, subject: &str) -> u8 {
        match &self.hint {
            Some(hint) => {
                crate::report::problems::print_usage_error(&self.message, Some(hint.as_str()))
            }
            None => crate::report::error(&self.message),
        }
        if global.json {
            self.print_json(subject);
        }
        self.code
    }

    /// Only the `--json` object (when the error itself was already reported on stderr).
    pub fn print_json(&self, subject: &str) {
        crate::report::problems::print_failure_json(
            subject,
            &self.argument,
            &self.message,
            self.hint.as_deref(),
        );
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "peftpipe",
    version = crate::TOOL_BUILD,
    about = "One YAML file to a reproducible, cached PEFT fine-tuning run",
    after_help = "Examples:\n  peftpipe init --data data/reviews.parquet --model models/tiny\n  \
        peftpipe run pipelines/quickstart.yaml\n  peftpipe status pipelines/quickstart.yaml\n  \
        peftpipe metrics diff --rev HEAD~1 pipelines/quickstart.yaml\n  \
        peftpipe report pipelines/quickstart.yaml -o report.html"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Cache directory (default: `.peftpipe/cache` next to the pipeline file).
    #[arg(long, global = true, env = "PEFTPIPE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Machine-readable JSON on stdout instead of the human report.
    #[arg(long, global = true)]
    pub json: bool,
    /// Only errors and warnings on stderr (no progress, summaries or notes).
    #[arg(long, short, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More detail: `-v` every figure in the run summary and info logs, `-vv` debug logs
    /// (progress lines too when stderr is not a terminal).
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Colors on stderr: `auto` (a terminal without NO_COLOR), `always` or `never`.
    #[arg(long, global = true, value_enum, default_value_t = ColorArg::Auto, value_name = "WHEN")]
    pub color: ColorArg,
}

/// `--color WHEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorArg {
    Auto,
    Always,
    Never,
}

impl From<ColorArg> for crate::report::ColorChoice {
    fn from(value: ColorArg) -> Self {
        match value {
            ColorArg::Auto => crate::report::ColorChoice::Auto,
            ColorArg::Always => crate::report::ColorChoice::Always,
            ColorArg::Never => crate::report::ColorChoice::Never,
        }
    }
}

/// Options naming a pipeline and overrides.
#[derive(Debug, Clone, Args)]
pub struct PipelineArgs {
    /// The pipeline YAML file.
    pub pipeline: PathBuf,
    /// Override a value: `--set stages.train.train.method.lora.r=16` (YAML value; part of the fingerprint).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Let template files and export destinations resolve outside the project directory.
    #[arg(long)]
    pub allow_outside_project: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check pipelines (syntax, schema, semantics) without running anything.
    #[command(
        after_help = "Examples:\n  peftpipe validate pipelines/*.yaml\n  peftpipe validate pipelines/quickstart.yaml --json\n  peftpipe validate pipelines/quickstart.yaml --set stages.train.train.epochs=2"
    )]
    Validate(validate::ValidateArgs),
    /// Run what is stale, restore the rest from the cache.
    Run(run::RunArgs),
    /// Per stage: fresh, or dirty and why.
    Status(status::StatusArgs),
    /// Print the JSON schema of pipeline files.
    #[command(after_help = "Examples:\n  peftpipe schema > schemas/pipeline.schema.json")]
    Schema(schema::SchemaArgs),
    /// Print the stage graph (text, mermaid or dot).
    #[command(
        after_help = "Examples:\n  peftpipe dag pipelines/quickstart.yaml\n  peftpipe dag pipelines/quickstart.yaml --format mermaid\n  peftpipe dag pipelines/quickstart.yaml --format dot | dot -Tsvg > dag.svg"
    )]
    Dag(dag::DagArgs),
    /// Show rendered rows of a template stage with the prompt/completion boundary visible.
    #[command(
        after_help = "Examples:\n  peftpipe preview pipelines/quickstart.yaml --stage prompts -n 3\n  peftpipe preview pipelines/quickstart.yaml --stage prompts --split eval"
    )]
    Preview(preview::PreviewArgs),
    /// Drop cache objects that no lock file references.
    #[command(
        after_help = "Examples:\n  peftpipe gc pipelines/quickstart.yaml --dry-run\n  peftpipe gc pipelines/quickstart.yaml"
    )]
    Gc(gc::GcArgs),
    /// Copy the cache's outputs, run records and lock files to a remote cache.
    #[command(
        after_help = "Examples:\n  peftpipe push pipelines/quickstart.yaml --remote s3://team-bucket/peftpipe\n  \
        peftpipe push --remote /mnt/shared/peftpipe-cache   # the whole cache\n  \
        peftpipe push pipelines/quickstart.yaml   # the remote of pipelines/.peftpipe/config.yaml\n  \
        peftpipe push pipelines/quickstart.yaml --remote gs://team-bucket/peftpipe\n  \
        peftpipe push pipelines/quickstart.yaml --remote az://team-container/peftpipe\n\n\
        Credentials and endpoints come from the environment (messages never show them):\n  \
        s3://     AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION; an S3-compatible server\n            \
        through AWS_ENDPOINT (and AWS_ALLOW_HTTP=true for plain http)\n  \
        gs://     GOOGLE_SERVICE_ACCOUNT (a service-account key file), GOOGLE_SERVICE_ACCOUNT_KEY\n            \
        (its JSON) or GOOGLE_APPLICATION_CREDENTIALS, else the VM's metadata server; an\n            \
        emulator through a key file with \"gcs_base_url\" and \"disable_oauth\": true\n            \
        (and GOOGLE_ALLOW_HTTP=true for plain http)\n  \
        az://     (or azure://) AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY,\n            \
        AZURE_STORAGE_SAS_KEY or AZURE_CLIENT_ID + AZURE_CLIENT_SECRET + AZURE_TENANT_ID;\n            \
        Azurite through AZURE_STORAGE_USE_EMULATOR=true and AZURITE_BLOB_STORAGE_URL\n            \
        (default http://127.0.0.1:10000)\n  \
        https://  a user and password in the URL where the server asks for them (shown as ***)\n\n\
        Cloud remotes need a build with `--features cloud`."
    )]
    Push(remote::PushArgs),
    /// Copy outputs, run records and lock files from a remote cache, checking every file.
    #[command(
        after_help = "Examples:\n  peftpipe pull pipelines/quickstart.yaml --remote s3://team-bucket/peftpipe\n  \
        peftpipe pull pipelines/quickstart.yaml && peftpipe run pipelines/quickstart.yaml   # restores, trains nothing\n  \
        PEFTPIPE_REMOTE=https://dav.example/peftpipe peftpipe pull   # everything on the remote\n\n\
        Credentials and endpoints: as for `peftpipe push` (see `peftpipe push --help`)."
    )]
    Pull(remote::PullArgs),
    /// Describe a model: architecture, parameters, dtype, what LoRA targets would match.
    #[command(
        after_help = "Examples:\n  peftpipe inspect datasets/quickstart/model\n  peftpipe inspect datasets/quickstart/model --target all-linear --rank 8"
    )]
    Inspect(inspect::InspectArgs),
    /// Generate text from a model (optionally with an adapter).
    #[command(
        after_help = "Examples:\n  peftpipe generate datasets/quickstart/model --prompt \"review: a fine film.\\nsentiment:\"\n  peftpipe generate datasets/quickstart/model --adapter pipelines/out/quickstart/adapter --prompt \"review: dull.\\nsentiment:\" --max-new-tokens 4\n  peftpipe generate datasets/quickstart/model --input prompts.jsonl --output completions.jsonl --batch-size 32"
    )]
    Generate(generate::GenerateArgs),
    /// Each stage's metrics (`show`), or how two runs differ (`diff`).
    #[command(
        subcommand,
        after_help = "Examples:\n  peftpipe metrics show pipelines/quickstart.yaml\n  \
            peftpipe metrics diff --rev HEAD~1 pipelines/quickstart.yaml"
    )]
    Metrics(metrics::MetricsCommand),
    /// Write the run report: one self-contained HTML page (stages, curves, metrics, samples).
    Report(report::ReportArgs),
    /// Write a commented starter pipeline (columns read from the data file).
    Init(init::InitArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  peftpipe completions bash > ~/.local/share/bash-completion/completions/peftpipe\n  \
        peftpipe completions zsh > ~/.zfunc/_peftpipe\n  peftpipe completions fish > ~/.config/fish/completions/peftpipe.fish"
    )]
    Completions(CompletionsArgs),
    /// Print the man page (roff).
    #[command(
        after_help = "Examples:\n  peftpipe man > peftpipe.1 && man ./peftpipe.1\n  \
        peftpipe man run > peftpipe-run.1"
    )]
    Man(ManArgs),
    /// Benchmarks (data, status, training).
    #[command(
        subcommand,
        after_help = "Examples:\n  peftpipe bench data\n  peftpipe bench status"
    )]
    Bench(BenchCommand),
    /// One rank of a data-parallel train stage (started by `run` for `devices`; not for users).
    #[command(name = crate::stages::train::ranks::RANK_COMMAND, hide = true)]
    TrainRank(TrainRankArgs),
}

#[derive(Debug, Args)]
pub struct TrainRankArgs {
    /// The train job the launching stage wrote.
    pub job: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// A subcommand's page instead (`peftpipe man run` is peftpipe-run(1)).
    pub command: Option<String>,
}

/// The completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> String {
    // clap_complete offers hidden subcommands too (`train-rank`, which `run` starts for
    // data-parallel ranks), and clap cannot remove one: the root is assembled again from its own
    // settings, arguments and visible subcommands.
    let full = <Cli as clap::CommandFactory>::command();
    let mut command = clap::Command::new("peftpipe")
        .version(crate::TOOL_BUILD)
        .args(full.get_arguments().cloned())
        .subcommands(
            full.get_subcommands()
                .filter(|subcommand| !subcommand.is_hide_set())
                .cloned(),
        );
    if let Some(about) = full.get_about() {
        command = command.about(about.clone());
    }
    let mut bytes = Vec::new();
    clap_complete::generate(shell, &mut command, "peftpipe", &mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The man page (roff) of the tool, or of one subcommand (`peftpipe-run(1)`).
pub fn man_page(subcommand: Option<&str>) -> Result<String, String> {
    let command = <Cli as clap::CommandFactory>::command();
    let page = match subcommand {
        None => command,
        Some(name) => {
            let found = command
                .get_subcommands()
                .find(|sub| sub.get_name() == name)
                .cloned()
                .ok_or_else(|| {
                    let names: Vec<&str> = command
                        .get_subcommands()
                        .filter(|sub| !sub.is_hide_set())
                        .map(clap::Command::get_name)
                        .collect();
                    format!("no subcommand `{name}` (subcommands: {})", names.join(", "))
                })?;
            let full: &'static str = Box::leak(format!("peftpipe-{name}").into_boxed_str());
            // A subcommand has no version of its own; its page's title carries the tool's.
            found.name(full).version(crate::TOOL_BUILD)
        }
    };
    let mut bytes = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut bytes)
        .map_err(|error| error.to_string())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// ingest + template throughput and peak memory on generated Parquet.
    #[command(
        after_help = "Examples:\n  peftpipe bench data --rows 100000\n  peftpipe bench data --python"
    )]
    Data(bench_data::BenchDataArgs),
    /// `status` latency on a pipeline with large inputs.
    #[command(after_help = "Examples:\n  peftpipe bench status --size-mib 256 --runs 5")]
    Status(bench_status::BenchStatusArgs),
    /// LoRA training step throughput and memory.
    #[command(
        after_help = "Examples:\n  peftpipe bench train --config datasets/quickstart/model/config.json --device cpu"
    )]
    Train(bench_train::BenchTrainArgs),
    /// 4-bit quantization (QLoRA's load, the quantized export) time per model, all threads vs one.
    #[command(
        after_help = "Examples:\n  peftpipe bench quantize --config llama-3.1-8b.config.json"
    )]
    Quantize(bench_quantize::BenchQuantizeArgs),
}

/// Parse the command line, run, map the outcome to an exit code.
pub fn main() -> ExitCode {
    // First, while this is the only thread: every later thread inherits the signal mask.
    let installed = interrupt::install();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        // clap prints its error (or the help, the version) and exits; under `--json` an error
        // also gets the problem object on stdout.
        Err(error) => argument_error::exit(error, &<Cli as clap::CommandFactory>::command(), &args),
    };
    crate::report::set_color(cli.global.color.into());
    crate::report::init_logging(cli.global.quiet, cli.global.verbose);
    if let Err(message) = installed {
        crate::report::warning(&message);
    }
    let code = match cli.command {
        Command::Validate(args) => validate::run(&cli.global, args),
        Command::Run(args) => run::run(&cli.global, args),
        Command::Status(args) => status::run(&cli.global, args),
        Command::Schema(args) => schema::run(&cli.global, args),
        Command::Dag(args) => dag::run(&cli.global, args),
        Command::Preview(args) => preview::run(&cli.global, args),
        Command::Gc(args) => gc::run(&cli.global, args),
        Command::Push(args) => remote::push(&cli.global, args),
        Command::Pull(args) => remote::pull(&cli.global, args),
        Command::Inspect(args) => inspect::run(&cli.global, args),
        Command::Generate(args) => generate::run(&cli.global, args),
        Command::Metrics(command) => metrics::run(&cli.global, command),
        Command::Report(args) => report::run(&cli.global, args),
        Command::Init(args) => init::run(&cli.global, args),
        Command::Completions(args) => {
            crate::report::write_stdout_raw(&completions(args.shell));
            EXIT_OK
        }
        Command::Man(args) => match man_page(args.command.as_deref()) {
            Ok(page) => {
                crate::report::write_stdout_raw(&page);
                EXIT_OK
            }
            Err(message) => {
                crate::report::error(&message);
                EXIT_INVALID
            }
        },
        Command::TrainRank(args) => match crate::stages::train::ranks::run_rank(&args.job) {
            Ok(()) => EXIT_OK,
            Err(message) => {
                crate::report::error(&message);
                EXIT_FAILED
            }
        },
        Command::Bench(BenchCommand::Data(args)) => bench_data::run(&cli.global, args),
        Command::Bench(BenchCommand::Status(args)) => bench_status::run(&cli.global, args),
        Command::Bench(BenchCommand::Train(args)) => bench_train::run(&cli.global, args),
        Command::Bench(BenchCommand::Quantize(args)) => bench_quantize::run(&cli.global, args),
    };
    ExitCode::from(code)
}
