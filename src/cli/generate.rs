//! `peftpipe generate` (skeleton: its owner fills in the arguments and the call into the core).

use clap::Args;

use super::GlobalArgs;

#[derive(Debug, Args)]
pub struct GenerateArgs {}

pub fn run(_global: &GlobalArgs, _args: GenerateArgs) -> u8 {
    crate::report::error("this command is not built yet");
    super::EXIT_FAILED
}
