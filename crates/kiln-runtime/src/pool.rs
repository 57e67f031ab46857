//! The compute thread pools kernels run on.
//!
//! Sessions asking for the same number of threads share one rayon pool, so
//! several sessions running at once (a server's models, a test's threads) queue
//! their work on the same cores instead of oversubscribing them. A session's
//! `run` installs its pool; kernels split work with rayon inside it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The shared pool with `threads` workers (0 means one per core), created on
/// first request.
pub(crate) fn shared_pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, String> {
    let threads = if threads == 0 {
        default_threads()
    } else {
        threads
    };
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(p) = pools.get(&threads) {
        return Ok(p.clone());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("kiln-compute-{threads}-{i}"))
        .build()
        .map_err(|e| format!("cannot start a pool of {threads} compute threads: {e}"))?;
    let pool = Arc::new(pool);
    pools.insert(threads, pool.clone());
    Ok(pool)
}

/// One thread per core this process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
