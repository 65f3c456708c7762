//! A command line clap refuses (an unknown option or subcommand, an option without its value, a
//! value it does not take, a missing or conflicting argument) under `--json`: the problem object
//! every other `--json` failure prints ([`super::Failure`]'s shape), on stdout, before clap
//! prints its own error on stderr and exits 2 as without `--json`. `--help` and `--version` are
//! clap's alone. Since clap parsed nothing, whether `--json` was asked for is read from the raw
//! arguments ([`json_requested`]).

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// What [`super::Failure`] carries for a refused command line: the argument at fault (an option
/// as `--name`, a positional as its value name, `COMMAND` for a subcommand), clap's message
/// (its first paragraph, without `error: `) and clap's tips as the hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgumentProblem {
    pub argument: String,
    pub message: String,
    pub hint: Option<String>,
}

/// Print `error` as clap does and exit with its code; first, when it is an error (not help or a
/// version) and `args` ask for `--json`, the problem object on stdout.
pub fn exit(mut error: clap::Error, command: &clap::Command, args: &[OsString]) -> ! {
    without_hidden_suggestions(&mut error, command);
    name_the_command_an_option_belongs_to(&mut error, command, args);
    if error.use_stderr() && json_requested(command, args) {
        let problem = problem(&error, command);
        crate::report::problems::print_failure_json(
            "",
            &problem.argument,
            &problem.message,
            problem.hint.as_deref(),
        );
    }
    error.exit()
}

/// clap's "a similar subcommand exists" tip names hidden subcommands too (`train-rank`, which
/// `run` starts for data-parallel ranks, for `peftpipe train`): only the visible ones stay.
fn without_hidden_suggestions(error: &mut clap::Error, command: &clap::Command) {
    let Some(ContextValue::Strings(names)) = error.get(ContextKind::SuggestedSubcommand) else {
        return;
    };
    let hidden = |name: &String| {
        command
            .get_subcommands()
            .any(|subcommand| subcommand.is_hide_set() && subcommand.get_name() == name)
    };
    let visible: Vec<String> = names.iter().filter(|name| !hidden(name)).cloned().collect();
    if visible.len() == names.len() {
        return;
    }
    if visible.is_empty() {
        error.remove(ContextKind::SuggestedSubcommand);
        // An empty list of other tips would still print a blank line.
        if matches!(error.get(ContextKind::Suggested), Some(ContextValue::StyledStrs(tips)) if tips.is_empty())
        {
            error.remove(ContextKind::Suggested);
        }
    } else {
        error.insert(
            ContextKind::SuggestedSubcommand,
            ContextValue::Strings(visible),
        );
    }
}

/// An unknown `--name` that another subcommand takes (`push --missing-ok`, a `pull` flag): the
/// tip says whose it is, instead of clap's "to pass '--missing-ok' as a value, use '--'".
fn name_the_command_an_option_belongs_to(
    error: &mut clap::Error,
    command: &clap::Command,
    args: &[OsString],
) {
    if error.kind() != ErrorKind::UnknownArgument {
        return;
    }
    let Some(ContextValue::String(written)) = error.get(ContextKind::InvalidArg) else {
        return;
    };
    let Some(long) = written.strip_prefix("--") else {
        return;
    };
    let long = long.split('=').next().unwrap_or(long).to_string();
    // The subcommand path as written (`bench data`): the words naming visible subcommands.
    let mut current = command;
    let mut path = Vec::new();
    for arg in args.iter().skip(1).filter_map(|arg| arg.to_str()) {
        if let Some(next) = current
            .get_subcommands()
            .find(|sub| !sub.is_hide_set() && sub.get_name() == arg)
        {
            path.push(arg.to_string());
            current = next;
        }
    }
    let mut owners = Vec::new();
    let mut pending: Vec<(String, &clap::Command)> = command
        .get_subcommands()
        .filter(|sub| !sub.is_hide_set())
        .map(|sub| (sub.get_name().to_string(), sub))
        .collect();
    while let Some((name, sub)) = pending.pop() {
        if sub
            .get_arguments()
            .any(|arg| arg.get_long() == Some(long.as_str()))
            && name != path.join(" ")
        {
            owners.push(format!("`peftpipe {name}`"));
        }
        pending.extend(
            sub.get_subcommands()
                .filter(|inner| !inner.is_hide_set())
                .map(|inner| (format!("{name} {}", inner.get_name()), inner)),
        );
    }
    if owners.is_empty() {
        return;
    }
    owners.sort();
    error.remove(ContextKind::SuggestedArg);
    error.insert(
        ContextKind::Suggested,
        ContextValue::StyledStrs(vec![format!(
            "`--{long}` is an option of {}, not of `peftpipe {}`",
            owners.join(", "),
            path.join(" ")
        )
        .into()]),
    );
}

/// Whether `args` (the program name first) hold the flag `--json` as clap reads them: an
/// argument `--json` before any `--` (after which every argument is a value), and not the value
/// of the option before it. clap takes an argument starting with `-` as an option's value only
/// for an option that allows such values (`allow_hyphen_values`); after any other option it is
/// the flag, and the option before it lacks its value, which is clap's error. An option that
/// allows such values in any subcommand counts as one everywhere (the JSON is left out rather
/// than printed where it was a value). No positional of this command line takes values starting
/// with `-` (a test checks), so a positional never swallows it.
pub fn json_requested(command: &clap::Command, args: &[OsString]) -> bool {
    let hyphen_options = hyphen_value_options(command);
    let mut after_hyphen_option = false;
    for arg in args.iter().skip(1) {
        let Some(text) = arg.to_str() else {
            after_hyphen_option = false;
            continue;
        };
        if text == "--" {
            return false;
        }
        if text == "--json" && !after_hyphen_option {
            return true;
        }
        after_hyphen_option = takes_next_as_hyphen_value(text, &hyphen_options);
    }
    false
}

/// The options (`--name`, `-c`) of `command` and its subcommands that take a value and allow it
/// to start with `-`.
fn hyphen_value_options(command: &clap::Command) -> Vec<String> {
    // Built, the command's own settings are on its arguments and the global ones are in every
    // subcommand.
    let mut built = command.clone();
    built.build();
    let mut names = Vec::new();
    collect_hyphen_value_options(&built, &mut names);
    names
}

fn collect_hyphen_value_options(command: &clap::Command, names: &mut Vec<String>) {
    for arg in command.get_arguments() {
        if arg.is_positional() || !arg.get_action().takes_values() {
            continue;
        }
        if !arg.is_allow_hyphen_values_set() {
            continue;
        }
        if let Some(long) = arg.get_long() {
            names.push(format!("--{long}"));
        }
        for alias in arg.get_all_aliases().into_iter().flatten() {
            names.push(format!("--{alias}"));
        }
        if let Some(short) = arg.get_short() {
            names.push(format!("-{short}"));
        }
    }
    for subcommand in command.get_subcommands() {
        collect_hyphen_value_options(subcommand, names);
    }
}

/// Whether the argument after `text` is the value of an option in `text` that allows values
/// starting with `-`: `--name` (without `=VALUE`), or a group of short options `-abc` whose last
/// letter is one (a letter before it that takes a value would take the rest as its value).
fn takes_next_as_hyphen_value(text: &str, hyphen_options: &[String]) -> bool {
    if text.starts_with("--") {
        return !text.contains('=') && hyphen_options.iter().any(|name| name == text);
    }
    match text.strip_prefix('-') {
        Some(letters) if !letters.is_empty() => letters
            .chars()
            .last()
            .is_some_and(|last| hyphen_options.contains(&format!("-{last}"))),
        _ => false,
    }
}

/// The problem `error` describes: its argument, message and hint.
pub fn problem(error: &clap::Error, command: &clap::Command) -> ArgumentProblem {
    let text = error.render().to_string();
    if error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        return missing_subcommand(&text, command);
    }
    let mut lines = text.lines();
    let mut message = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string();
    let mut tips = Vec::new();
    let mut in_message = true;
    for line in lines {
        if line.trim().is_empty() {
            in_message = false;
        } else if let Some(tip) = line.trim_start().strip_prefix("tip: ") {
            tips.push(tip.to_string());
        } else if in_message {
            message.push('\n');
            message.push_str(line.trim());
        }
    }
    let argument = match error.kind() {
        ErrorKind::InvalidSubcommand | ErrorKind::MissingSubcommand => "COMMAND".to_string(),
        _ => match error.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(name)) => argument_name(name),
            Some(ContextValue::Strings(names)) => names
                .first()
                .map(|name| argument_name(name))
                .unwrap_or_default(),
            _ => String::new(),
        },
    };
    ArgumentProblem {
        argument,
        message,
        hint: (!tips.is_empty()).then(|| tips.join("\n")),
    }
}

/// An argument as clap shows it (`--color <WHEN>`, `<PIPELINE>`, `--verbose...`) as a problem's
/// path: `--color`, `PIPELINE`, `--verbose`.
fn argument_name(shown: &str) -> String {
    shown
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_end_matches("...")
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

/// A command that needs a subcommand given none (clap prints its help): which command, from the
/// help's usage line, and its subcommands as the hint.
fn missing_subcommand(help: &str, command: &clap::Command) -> ArgumentProblem {
    let usage = help
        .lines()
        .find_map(|line| line.strip_prefix("Usage: "))
        .unwrap_or_default();
    let names: Vec<&str> = usage
        .split_whitespace()
        .take_while(|word| !word.starts_with('[') && !word.starts_with('<'))
        .collect();
    let mut found = Some(command);
    for name in names.iter().skip(1) {
        found = found.and_then(|command| command.find_subcommand(name));
    }
    let subcommands: Vec<&str> = found
        .map(|command| {
            command
                .get_subcommands()
                .filter(|subcommand| !subcommand.is_hide_set())
                .map(clap::Command::get_name)
                .collect()
        })
        .unwrap_or_default();
    let shown = names.join(" ");
    ArgumentProblem {
        argument: "COMMAND".to_string(),
        message: format!("`{shown}` requires a subcommand but one was not provided"),
        hint: (!subcommands.is_empty()).then(|| format!("subcommands: {}", subcommands.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command, CommandFactory};

    fn args(words: &[&str]) -> Vec<OsString> {
        std::iter::once("peftpipe")
            .chain(words.iter().copied())
            .map(OsString::from)
            .collect()
    }

    /// A command line with `--json` and an option `--pattern`/`-p` that takes values starting
    /// with `-` (peftpipe has none today; the rule must still hold when one comes).
    fn with_hyphen_option() -> Command {
        Command::new("peftpipe")
            .arg(Arg::new("json").long("json").action(ArgAction::SetTrue))
            .arg(Arg::new("quiet").short('q').action(ArgAction::SetTrue))
            .subcommand(
                Command::new("find").arg(
                    Arg::new("pattern")
                        .long("pattern")
                        .short('p')
                        .allow_hyphen_values(true),
                ),
            )
    }

    #[test]
    fn a_hidden_subcommand_is_never_suggested() {
        let command = crate::cli::Cli::command();
        for (words, kept) in [(&["train"][..], None), (&["trai"], Some("metrics"))] {
            let mut error = command
                .clone()
                .try_get_matches_from(args(words))
                .unwrap_err();
            assert!(
                error.render().to_string().contains("train-rank"),
                "{words:?}"
            );
            without_hidden_suggestions(&mut error, &command);
            let text = error.render().to_string();
            assert!(!text.contains("train-rank"), "{words:?}: {text}");
            assert!(
                text.contains("unrecognized subcommand") && !text.contains("\n\n\n"),
                "{words:?}: {text}"
            );
            assert_eq!(
                problem(&error, &command).hint.is_some(),
                kept.is_some(),
                "{words:?}: {text}"
            );
            if let Some(kept) = kept {
                assert!(text.contains(&format!("'{kept}'")), "{text}");
            }
        }
    }

    #[test]
    fn an_option_of_another_subcommand_is_named_as_its() {
        let command = crate::cli::Cli::command();
        let mut error = command
            .clone()
            .try_get_matches_from(args(&["push", "--missing-ok"]))
            .unwrap_err();
        assert!(
            !error.render().to_string().contains("option of"),
            "clap says it already"
        );
        name_the_command_an_option_belongs_to(
            &mut error,
            &command,
            &args(&["push", "--missing-ok"]),
        );
        let text = error.render().to_string();
        assert!(
            text.contains("`--missing-ok` is an option of `peftpipe pull`, not of `peftpipe push`")
                && !text.contains("as a value"),
            "{text}"
        );
        // A misspelling that no subcommand takes keeps clap's own tip.
        let words = ["status", "x.yaml", "--jsno"];
        let mut error = command
            .clone()
            .try_get_matches_from(args(&words))
            .unwrap_err();
        name_the_command_an_option_belongs_to(&mut error, &command, &args(&words));
        assert!(error.render().to_string().contains("'--json'"));
    }

    #[test]
    fn json_is_the_flag_where_clap_reads_it_as_one() {
        let command = crate::cli::Cli::command();
        for words in [
            &["--json", "status", "x.yaml", "--bogus"][..],
            &["status", "x.yaml", "--bogus", "--json"],
            // clap takes no `--`-value for --input: the flag, and --input lacks its value.
            &["generate", "m", "--input", "--json"],
            &["run", "x.yaml", "--set=--json", "--json"],
        ] {
            assert!(json_requested(&command, &args(words)), "{words:?}");
        }
        for words in [
            &["status", "x.yaml", "--bogus"][..],
            &["status", "x.yaml", "--", "--json"],
            &["run", "x.yaml", "--set=--json"],
            &["status", "--jsonx"],
        ] {
            assert!(!json_requested(&command, &args(words)), "{words:?}");
        }
    }

    #[test]
    fn json_is_a_value_after_an_option_that_takes_values_starting_with_a_hyphen() {
        let command = with_hyphen_option();
        for words in [
            &["find", "--pattern", "--json"][..],
            &["find", "-p", "--json"],
            &["find", "-qp", "--json"],
        ] {
            assert!(!json_requested(&command, &args(words)), "{words:?}");
        }
        for words in [
            &["find", "--pattern=-x", "--json"][..],
            &["find", "--pattern", "--json", "--json"],
            &["find", "-p-x", "--json"],
        ] {
            assert!(json_requested(&command, &args(words)), "{words:?}");
        }
    }

    /// [`json_requested`] assumes no positional takes values starting with `-`.
    #[test]
    fn no_positional_takes_values_starting_with_a_hyphen() {
        fn check(command: &Command) {
            for arg in command.get_arguments().filter(|arg| arg.is_positional()) {
                assert!(
                    !arg.is_allow_hyphen_values_set()
                        && !arg.is_last_set()
                        && !arg.is_trailing_var_arg_set(),
                    "{} {}",
                    command.get_name(),
                    arg.get_id()
                );
            }
            command.get_subcommands().for_each(check);
        }
        let mut command = crate::cli::Cli::command();
        command.build();
        check(&command);
    }

    #[test]
    fn a_refused_argument_is_named_with_clap_s_message_and_tip() {
        let command = crate::cli::Cli::command();
        let refused = |words: &[&str]| {
            let error = command
                .clone()
                .try_get_matches_from(args(words))
                .expect_err("refused");
            problem(&error, &command)
        };
        let problem = refused(&["status", "x.yaml", "--jsno"]);
        assert_eq!(problem.argument, "--jsno");
        assert_eq!(problem.message, "unexpected argument '--jsno' found");
        assert!(problem.hint.is_some_and(|hint| hint.contains("'--json'")));
        let problem = refused(&["status", "x.yaml", "--color", "purple"]);
        assert_eq!(problem.argument, "--color");
        assert!(
            problem
                .message
                .starts_with("invalid value 'purple' for '--color <WHEN>'")
                && problem
                    .message
                    .contains("[possible values: auto, always, never]"),
            "{problem:?}"
        );
        assert_eq!(refused(&["status"]).argument, "PIPELINE");
        assert_eq!(refused(&["statsu"]).argument, "COMMAND");
        assert_eq!(refused(&[]).argument, "COMMAND");
        let problem = refused(&["metrics"]);
        assert_eq!(problem.argument, "COMMAND");
        assert_eq!(
            problem.message,
            "`peftpipe metrics` requires a subcommand but one was not provided"
        );
        assert_eq!(problem.hint.as_deref(), Some("subcommands: show, diff"));
    }
}
