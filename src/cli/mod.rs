//! Command-line interface: clap types and one file per subcommand. Nothing outside cli/ sees clap.

use std::process::ExitCode;

pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
