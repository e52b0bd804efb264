//! The `wgtune` binary: parse, set up logging, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = wgtune::cli::Cli::parse_from(wgtune::cli::normalize_args(std::env::args().collect()));
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match wgtune::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors already carry their cause in the message.
            eprintln!("error: {}", anyhow::Error::from(e));
            ExitCode::from(2)
        }
    }
}
