//! `peftpipe bench_status` (skeleton: its owner fills in the arguments and the call into the core).

use clap::Args;

use super::GlobalArgs;

#[derive(Debug, Args)]
pub struct BenchStatusArgs {}

pub fn run(_global: &GlobalArgs, _args: BenchStatusArgs) -> u8 {
    crate::report::error("this command is not built yet");
    super::EXIT_FAILED
}
