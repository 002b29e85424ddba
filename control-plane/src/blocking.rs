//! CPU-heavy work (solving, validating or encoding a large fleet) called
//! from async code. On the multi-threaded runtime it runs through
//! `block_in_place`, so the worker hands its other tasks (lease
//! keep-alives, config streams) to another thread instead of starving them;
//! elsewhere (single-threaded runtimes, tests) it just runs.

/// Runs `f`, telling the runtime that it may take a while.
pub fn heavy<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
