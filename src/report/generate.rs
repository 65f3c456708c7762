//! Output of `peftpipe generate`: the prompt and its continuation on stdout, a one-line account
//! of how generation ended on stderr (`--json` goes through [`super::json`]).

use crate::infer::session::GenerateOutput;
use crate::infer::StopReason;

/// Print the prompt followed by the generated text, and (unless quiet) why it stopped.
pub fn print(output: &GenerateOutput, quiet: bool) {
    super::write_stdout(&format!("{}{}", output.prompt, output.completion));
    if !quiet {
        let why = match output.stop_reason {
            StopReason::Eos => "end of sequence",
            StopReason::MaxNewTokens => "--max-new-tokens reached",
            StopReason::MaxLength => "the model's context length reached",
            StopReason::StopCondition => "stop condition",
        };
        super::write_stderr(&format!(
            "{} prompt tokens, {} new tokens; stopped: {why}",
            output.prompt_token_ids.len(),
            output.token_ids.len()
        ));
    }
}
