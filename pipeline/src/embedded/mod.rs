//! The embedded backends `iotpipe dev` runs on: an in-process partitioned log and redb-backed
//! stores in a data directory. No external service is needed.
//!
//! Why redb: it is a pure-Rust, ACID, single-file B-tree store with fsync'd commits and MVCC reads,
//! which matches what the stores need (small transactional batches, range scans by key, readers
//! never blocking the writer). `benches/pipeline.rs` measures it against fjall for the history write
//! pattern; see `docs/BENCHMARKS.md` for the figures behind the choice.

mod dead_letters;
mod history;
mod kv;
mod latest;
mod mem_log;

pub use dead_letters::RedbDeadLetters;
pub use history::RedbHistory;
pub use kv::RedbKv;
pub use latest::RedbLatest;
pub use mem_log::MemLog;

use crate::store::StoreError;

/// Opens a redb file with a bounded page cache. redb's default cache is 1 GiB per database, which
/// on a busy history file grows the process by that much; the latest store keeps its own copy in
/// memory and the history is mostly written, so a small cache loses little.
fn open_db(path: &std::path::Path, cache_bytes: usize) -> Result<redb::Database, StoreError> {
    redb::Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(unavailable)
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Corrupt(format!("store task failed: {e}")))?
}
