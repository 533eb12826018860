//! The `switchyard` binary: parse arguments, set up logging, dispatch. No logic lives here.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Args::parse();
    cli::init_logging(&args);
    let runtime = match cli::runtime(&args) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let exit = runtime.block_on(cli::dispatch(args));
    std::process::ExitCode::from(exit as u8)
}
