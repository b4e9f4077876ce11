//! `scli`: Meshblock's admin command line, in ScaleIO's grammar: one command flag plus options,
//! e.g. `scli --add_volume --storage_pool_name sp1 --size_gb 8 --volume_name v1`.
//! Errors go to stderr as `Error: ...` with exit code 1.

mod args;
mod client;
mod events;
mod output;
mod progress;
mod resilience;
mod session;
mod vtree;

fn main() {
    let mut args = match args::try_parse_from(std::env::args_os()) {
        Ok(a) => a,
        // Help and version go to stdout with code 0; wrong arguments to stderr with code 2.
        Err(e) => e.exit(),
    };
    args.can_prompt = proto::secret::can_prompt();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: start the runtime: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(args::run(args)) {
        Ok(out) => {
            use std::io::Write;
            if !out.is_empty() {
                // A closed pipe (`scli ... | head`) is not an error worth a panic.
                let _ = writeln!(std::io::stdout(), "{out}");
            }
        }
        Err(e) => {
            eprintln!("Error: {}", proto::daemon::error_line(e.as_ref()));
            std::process::exit(1);
        }
    }
}
