//! The `lorafuse` command: argv → library calls → printing (`cli`); the library and the plugin's
//! shared library hold no command-line code (clap, progress bars, Ctrl-C handling live here).

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // A closed stdout (`lorafuse inspect … | head`) ends the process quietly, as it does for other
    // command-line tools, instead of a panic in `println!` (Rust ignores SIGPIPE by default).
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match cli::run(cli::Cli::parse_from(cli::kebab_to_snake(
        std::env::args_os().collect(),
    ))) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the context chain on one line: "merging x: y.safetensors: truncated".
            eprintln!("error: {e:#}");
            if let Some(fault) = e
                .downcast_ref::<lorafuse::Error>()
                .map(lorafuse::Error::fault)
            {
                // the library's error kinds (error.rs `Fault`): say who can fix it
                match fault {
                    lorafuse::error::Fault::User => {}
                    lorafuse::error::Fault::File => {
                        eprintln!("(a problem with the file named above, not with lorafuse)")
                    }
                    lorafuse::error::Fault::Program => eprintln!(
                        "(lorafuse or ONNX Runtime failed on valid input: please report this with the command line)"
                    ),
                }
            }
            std::process::ExitCode::FAILURE
        }
    }
}
