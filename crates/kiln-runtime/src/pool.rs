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

/// How long a keeper polls without finding work before it returns and lets
/// rayon put its worker to sleep: longer than the gaps between a plan's
/// parallel kernels.
const KEEPER_IDLE_MAX: Duration = Duration::from_micros(500);

/// How long a keeper lives at most, busy or not. A worker waiting inside a
/// join may pick a keeper up nested on top of the job it waits in; while
/// other work keeps the keeper busy, that job cannot go on. This bounds the
/// hold-up; [`rewarm`] (before each step) replaces keepers that returned.
const KEEPER_LIFE_MAX: Duration = Duration::from_millis(2);

/// The keepers of one [`install_warm`] call.
struct Warmth {
    /// Set when the work is over, however it ended.
    done: AtomicBool,
    /// Keepers polling now.
    live: AtomicUsize,
    /// Keeper jobs spawned and not yet started.
    pending: AtomicUsize,
    /// Keepers wanted: the pool's other workers.
    want: usize,
    /// The thread the work runs on.
    home: Option<usize>,
}

impl Warmth {
    /// One keeper job per worker of the pool (`spawn_broadcast`, so each
    /// lands on its own worker and wakes it), unless all keepers are live
    /// or a round of them has not started yet.
    fn arm(self: &Arc<Self>) {
        if self.live.load(Ordering::Acquire) >= self.want
            || self.pending.load(Ordering::Acquire) > 0
        {
            return;
        }
        // The job the work's own thread gets is not counted: that thread
        // may never look for work before the run ends.
        self.pending.fetch_add(self.want, Ordering::AcqRel);
        let w = self.clone();
        rayon::spawn_broadcast(move |_| {
            if rayon::current_thread_index() != w.home {
                w.pending.fetch_sub(1, Ordering::AcqRel);
                w.keep();
            }
        });
    }

    /// One keeper: polls the pool for work until the work is done, or it
    /// has found none for [`KEEPER_IDLE_MAX`], or it has lived
    /// [`KEEPER_LIFE_MAX`]. Returns at once on the work's own thread and on
    /// a thread where a keeper already polls (rayon's `yield_now` there ran
    /// this one); [`Warmth::arm`] keeps it off the work's own thread.
    fn keep(&self) {
        if POLLING.with(|p| p.replace(true)) {
            return;
        }
        self.live.fetch_add(1, Ordering::AcqRel);
        let born = Instant::now();
        let mut idle_since = born;
        while !self.done.load(Ordering::Acquire) && born.elapsed() <= KEEPER_LIFE_MAX {
            match rayon::yield_now() {
                Some(rayon::Yield::Executed) => idle_since = Instant::now(),
                _ => {
                    if idle_since.elapsed() > KEEPER_IDLE_MAX {
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
        }
        self.live.fetch_sub(1, Ordering::AcqRel);
        POLLING.with(|p| p.set(false));
    }
}

thread_local! {
    /// The keepers of the [`install_warm`] whose work runs on this thread,
    /// if any.
    static WARMTH: std::cell::RefCell<Option<Arc<Warmth>>> =
        const { std::cell::RefCell::new(None) };
    /// Whether a keeper polls on this thread.
    static POLLING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `pool.install(f)`, with the pool's other workers kept awake while `f`
/// runs, polling for work instead of sleeping.
///
/// Why: a rayon worker that finds no work through some rounds of searching
/// and yielding goes to sleep, and waking it (on a VM, an idle vCPU halted
/// in the host) can take longer than a small kernel. A plan alternates
/// short sequential stretches with parallel kernels, so without this many
/// of a small model's parallel kernels ran on one thread while the other
/// was still waking (one measurement on the 2-core development VM,
/// `examples/warm_pool.rs`: 8 x 5 us tasks after a 60 us sequential
/// stretch took 99 us a round instead of the ideal 80; kept warm, 81).
/// ONNX Runtime and OpenMP runtimes spin their workers during a run for
/// the same reason.
///
/// Each keeper is a rayon job that calls [`rayon::yield_now`] (which runs
/// one pending job of the pool, if any) until `f` is done, or it found no
/// work for [`KEEPER_IDLE_MAX`], or it lived [`KEEPER_LIFE_MAX`] (see
/// there why). Keepers that returned are replaced at the next [`rewarm`]
/// (the executor calls it before each step). Limits: a step whose own
/// sequential part outlasts [`KEEPER_IDLE_MAX`] finds its workers asleep
/// again; so does the first kernel of a run after a pause between runs.
pub fn install_warm<R: Send>(pool: &rayon::ThreadPool, f: impl FnOnce() -> R + Send) -> R {
    pool.install(|| {
        let want = rayon::current_num_threads().saturating_sub(1);
        if want == 0 {
            return f();
        }
        let warmth = Arc::new(Warmth {
            done: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
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

/// Replaces keepers that returned, for the [`install_warm`] whose work runs
/// on this thread; does nothing elsewhere.
pub fn rewarm() {
    WARMTH.with(|w| {
        if let Some(w) = w.borrow().as_ref() {
            w.arm();
        }
    });
}

/// Test hook: the keepers of the [`install_warm`] whose work runs on this
/// thread.
#[cfg(test)]
fn current_warmth() -> Option<Arc<Warmth>> {
    WARMTH.with(|w| w.borrow().clone())
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

    /// While the work runs a sequential stretch, the other worker polls
    /// (one keeper, never more than one per other worker); once the work is
    /// done, its keepers stop.
    #[test]
    fn keepers_poll_while_the_work_runs_and_stop_after() {
        for threads in [2, 3] {
            let p = pool(threads);
            let (warmth, most) = install_warm(&p, || {
                let warmth = current_warmth().expect("install_warm sets up keepers");
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut most = 0;
                while most == 0 && Instant::now() < deadline {
                    rewarm();
                    for _ in 0..1000 {
                        most = most.max(warmth.live.load(Ordering::Acquire));
                    }
                }
                (warmth, most)
            });
            assert!(
                (1..threads).contains(&most),
                "{threads} threads: at most {most} keepers seen polling"
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while warmth.live.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(warmth.live.load(Ordering::Acquire), 0, "{threads} threads");
            assert!(current_warmth().is_none());
        }
    }

    /// A run inside a run (a subgraph's session on the same pool) has its
    /// own keepers and gives the outer ones back as it ends, a panic
    /// included.
    #[test]
    fn nested_warm_runs_restore_the_outer_keepers() {
        let p = pool(2);
        install_warm(&p, || {
            let outer = current_warmth().expect("outer keepers");
            let inner = install_warm(&p, || current_warmth().expect("inner keepers"));
            assert!(!Arc::ptr_eq(&outer, &inner));
            assert!(inner.done.load(Ordering::Acquire));
            let now = current_warmth().expect("outer keepers restored");
            assert!(Arc::ptr_eq(&outer, &now));
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                install_warm(&p, || panic!("inner kernel failed"))
            }));
            assert!(caught.is_err());
            let now = current_warmth().expect("outer keepers restored after a panic");
            assert!(Arc::ptr_eq(&outer, &now));
            assert!(!outer.done.load(Ordering::Acquire));
        });
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
