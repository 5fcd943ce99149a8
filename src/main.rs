//! The `iotpipe` binary; everything it does lives in `iotpipe_operators::cli`.

/// mimalloc instead of the system allocator: the pipeline allocates many small, short-lived
/// buffers per message (JSON values, frames, batches), and under load glibc's malloc/free showed
/// up as ~12% of the CPU profile (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    iotpipe_operators::cli::main()
}
