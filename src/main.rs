//! The `wgtune` binary: parse, set up logging, run, map errors to exit codes.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = wgtune::cli::parse(std::env::args().collect());
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match wgtune::cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Library errors already carry their cause in the message.
            eprintln!("error: {}", anyhow::Error::from(e));
            ExitCode::from(2)
        }
    }
}
