//! `peftpipe bench_data` (skeleton: its owner fills in the arguments and the call into the core).

use clap::Args;

use super::GlobalArgs;

#[derive(Debug, Args)]
pub struct BenchDataArgs {}

pub fn run(_global: &GlobalArgs, _args: BenchDataArgs) -> u8 {
    crate::report::error("this command is not built yet");
    super::EXIT_FAILED
}
