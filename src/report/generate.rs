//! Output of `peftpipe generate`: the prompt and its continuation on stdout, a one-line account
//! of how generation ended on stderr (`--json` goes through [`super::json`]).

use crate::infer::session::GenerateOutput;
use crate::infer::StopReason;

/// Print the prompt followed by the generated text, and (unless quiet) why it stopped.
pub fn print(output: &GenerateOutput, quiet: bool) {
    super::write_stdout(&format!("{}{}", output.prompt, output.completion));
    if !quiet {
        let why = match output.stop_reason {
            StopReason::Eos => "end of sequence".to_string(),
            StopReason::MaxNewTokens => "--max-new-tokens reached".to_string(),
            // Which key of config.json: a Mistral's `sliding_window` is its context here.
            StopReason::MaxLength if output.context.starts_with("`sliding_window`") => format!(
                "the model's context length reached ({}; peftpipe has no sliding-window attention, so the window is the context)",
                output.context
            ),
            StopReason::MaxLength if !output.context.is_empty() => {
                format!("the model's context length reached ({})", output.context)
            }
            StopReason::MaxLength => "the model's context length reached".to_string(),
            StopReason::StopCondition => "stop condition".to_string(),
        };
        super::write_stderr(&format!(
            "{} prompt tokens, {} new tokens; stopped: {why}",
            output.prompt_token_ids.len(),
            output.token_ids.len()
        ));
    }
}
