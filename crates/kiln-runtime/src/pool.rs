//! The compute thread pools kernels run on.
//!
//! Sessions asking for the same number of threads share one rayon pool, so
//! several sessions running at once (a server's models, a test's threads) queue
//! their work on the same cores instead of oversubscribing them. A session's
//! `run` installs its pool; kernels split work with rayon inside it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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

/// How long a kept-warm worker waits for work before it gives up and lets
/// rayon put it to sleep: longer than the gaps between a plan's parallel
/// kernels, short enough that a keeper stuck under a job it was handed
/// while waiting (see [`install_warm`]) holds that job up only briefly.
const WARM_IDLE_MAX: Duration = Duration::from_micros(500);

/// The keepers of one [`install_warm`] call.
struct Warmth {
    /// Set when the work is over, however it ended.
    done: AtomicBool,
    /// Keepers spawned and not yet returned.
    live: AtomicUsize,
    /// Keepers wanted: the pool's other workers.
    want: usize,
    /// The thread the work runs on.
    home: Option<usize>,
}

impl Warmth {
    /// Spawns keepers until `want` are live.
    fn arm(self: &Arc<Self>) {
        let live = self.live.load(Ordering::Acquire);
        for _ in live..self.want {
            self.live.fetch_add(1, Ordering::AcqRel);
            let w = self.clone();
            rayon::spawn(move || {
                w.keep();
                w.live.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    /// One keeper: polls the pool for work until the work is done or it
    /// has been idle for [`WARM_IDLE_MAX`].
    fn keep(&self) {
        if rayon::current_thread_index() == self.home {
            return;
        }
        let mut idle_since = Instant::now();
        while !self.done.load(Ordering::Acquire) {
            match rayon::yield_now() {
                Some(rayon::Yield::Executed) => idle_since = Instant::now(),
                _ => {
                    if idle_since.elapsed() > WARM_IDLE_MAX {
                        return;
                    }
                    std::hint::spin_loop();
                }
            }
        }
    }
}

thread_local! {
    /// The keepers of the [`install_warm`] running on this thread, if any.
    static WARMTH: std::cell::RefCell<Option<Arc<Warmth>>> =
        const { std::cell::RefCell::new(None) };
}

/// `pool.install(f)`, with the pool's other workers kept awake while `f`
/// runs, polling for work instead of sleeping.
///
/// Why: a rayon worker that finds no work for some 20 microseconds goes to
/// sleep, and waking it (on this VM, an idle vCPU halted in the host) takes
/// longer than a small kernel. A plan alternates short sequential stretches
/// with parallel kernels, so without this many of a small model's parallel
/// kernels ran on one thread while the other was still waking
/// (`examples/warm_pool.rs`: 8 x 5 us tasks after a 60 us sequential
/// stretch take 99 us a round on 2 threads instead of 80; kept warm, 81).
/// ONNX Runtime and OpenMP runtimes spin their workers during a run for the
/// same reason.
///
/// Each keeper is a rayon job that calls [`rayon::yield_now`] (which runs
/// one pending job of the pool, if any) until `f` is done or it has found
/// nothing to do for [`WARM_IDLE_MAX`]. That bound matters: a worker waiting
/// inside a join may pick a keeper up nested on top of the job it waits in,
/// and the keeper must not hold that job up for the rest of someone else's
/// run. A keeper that lands on `f`'s own thread returns at once. Keepers
/// that gave up are replaced at the next [`rewarm`] (the executor calls it
/// before each step), so one long sequential step does not leave the rest
/// of the run cold.
pub fn install_warm<R: Send>(pool: &rayon::ThreadPool, f: impl FnOnce() -> R + Send) -> R {
    pool.install(|| {
        let want = rayon::current_num_threads().saturating_sub(1);
        if want == 0 {
            return f();
        }
        let warmth = Arc::new(Warmth {
            done: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            want,
            home: rayon::current_thread_index(),
        });
        warmth.arm();
        /// Stops the keepers and restores the thread's previous warmth
        /// however `f` ends, a panic included.
        struct Stop {
            warmth: Arc<Warmth>,
            outer: Option<Arc<Warmth>>,
        }
        impl Drop for Stop {
            fn drop(&mut self) {
                self.warmth.done.store(true, Ordering::Release);
                let outer = self.outer.take();
                WARMTH.with(|w| *w.borrow_mut() = outer);
            }
        }
        let outer = WARMTH.with(|w| w.borrow_mut().replace(warmth.clone()));
        let _stop = Stop { warmth, outer };
        f()
    })
}

/// Replaces keepers of the [`install_warm`] running on this thread that
/// gave up; nothing elsewhere. Cheap (one atomic load) when all are live.
pub fn rewarm() {
    WARMTH.with(|w| {
        if let Some(w) = w.borrow().as_ref() {
            w.arm();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a test pool")
    }

    #[test]
    fn warm_install_returns_what_the_work_computes() {
        for threads in [1, 2, 4] {
            let p = pool(threads);
            let sum: u64 = install_warm(&p, || (0..100_000u64).into_par_iter().sum());
            assert_eq!(sum, 99_999 * 100_000 / 2, "{threads} threads");
        }
    }

    #[test]
    fn a_panic_in_the_work_reaches_the_caller_and_the_pool_keeps_working() {
        let p = pool(2);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            install_warm(&p, || panic!("kernel failed"))
        }));
        assert!(caught.is_err());
        assert_eq!(install_warm(&p, || 7), 7);
    }

    /// Several callers at once on one pool (a server's requests), with
    /// nested parallel work: every run finishes with the right answer.
    #[test]
    fn concurrent_warm_runs_on_one_pool_all_finish() {
        let p = Arc::new(pool(3));
        let callers: Vec<_> = (0..6u64)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|_| {
                            install_warm(&p, || {
                                (0..64u64)
                                    .into_par_iter()
                                    .map(|j| {
                                        (0..1000u64).into_par_iter().map(|x| x * j + i).sum::<u64>()
                                    })
                                    .sum::<u64>()
                            })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for (i, c) in callers.into_iter().enumerate() {
            let got = c.join().expect("a caller thread");
            let i = i as u64;
            let want: u64 = (0..64u64)
                .map(|j| (0..1000u64).map(|x| x * j + i).sum::<u64>())
                .sum();
            assert!(got.iter().all(|&g| g == want), "caller {i}");
        }
    }
}
