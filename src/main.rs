use clap::Parser;

fn main() -> std::process::ExitCode {
    match lorafuse::cli::run(lorafuse::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the context chain on one line: "merging x: y.safetensors: truncated".
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
