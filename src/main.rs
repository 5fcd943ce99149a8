//! The `iotpipe` binary; everything it does lives in `iotpipe_operators::cli`.

fn main() -> std::process::ExitCode {
    iotpipe_operators::cli::main()
}
