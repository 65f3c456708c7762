//! `peftpipe run` (skeleton: its owner fills in the arguments and the call into the core).

use clap::Args;

use super::GlobalArgs;

#[derive(Debug, Args)]
pub struct RunArgs {}

pub fn run(_global: &GlobalArgs, _args: RunArgs) -> u8 {
    crate::report::error("this command is not built yet");
    super::EXIT_FAILED
}
