//! Measured choices between kernels that compute the same thing (a conv as
//! a GEMM over channel rows, over position rows, gathered channels-last, by
//! Winograd, or by the direct kernels: the blocked one with positions in
//! lanes, and `conv_lanes` with output channels in lanes), for the cases
//! the shape heuristics cannot settle: each
//! candidate is timed once on the node's first real input, the fastest is
//! kept, and the choice is remembered on disk, keyed by the hardware
//! fingerprint (`kiln_hw::fingerprint`) and the node's shapes, so
//! later sessions on this machine make it without timing.
//!
//! `KILN_TUNE=0` (or `off`, `false`, any case) turns it off: the heuristics alone
//! decide and nothing is read or written. `KILN_TUNE_CACHE` names the file
//! (default: `tuning.json` beside `kiln hw`'s cache, under
//! `$XDG_CACHE_HOME/kiln` or `~/.cache/kiln`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Rounds of timing after a warm-up run of each candidate; each candidate's
/// fastest run counts (the minimum is the least disturbed by other work on
/// a shared machine). Candidates run in turn within a round, so a slow
/// spell hits all of them.
const ROUNDS: usize = 3;

/// Nodes whose first candidate runs faster than this are not timed
/// further: the heuristics' choice costs at most a few microseconds there,
/// less than timing can resolve.
const MIN_TUNED: Duration = Duration::from_micros(20);

/// Bumped when a kernel change could change which strategy is fastest
/// (it is part of the cache's fingerprint).
const KERNELS: u32 = 2;

/// Whether choices are measured and remembered (`KILN_TUNE` not `0`,
/// `off` or `false`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    // This crate's unit tests keep to the heuristics (they check what the
    // heuristics choose); the tuning path has tests of its own.
    *ON.get_or_init(|| {
        !cfg!(test)
            && !std::env::var("KILN_TUNE").is_ok_and(|v| {
                let v = v.trim();
                ["0", "off", "false"]
                    .iter()
                    .any(|no| v.eq_ignore_ascii_case(no))
            })
    })
}

#[derive(Serialize, Deserialize, Default)]
struct CacheFile {
    fingerprint: String,
    /// Node key -> the chosen candidate's name.
    choices: BTreeMap<String, String>,
}

struct Store {
    path: Option<PathBuf>,
    file: CacheFile,
}

/// This process's choices: the file's, loaded on first use, plus those made
/// since.
fn store() -> &'static Mutex<Store> {
    static STORE: OnceLock<Mutex<Store>> = OnceLock::new();
    STORE.get_or_init(|| {
        // Unit tests remember in memory only.
        let path = if cfg!(test) {
            None
        } else {
            std::env::var_os("KILN_TUNE_CACHE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| {
                    kiln_hw::default_cache_path()
                        .and_then(|p| Some(p.parent()?.join("tuning.json")))
                })
        };
        // Choices hold for this hardware and these kernels: a new kiln
        // version, or a new `KERNELS` here, starts over.
        let fingerprint = format!(
            "{}|kiln {}|kernels {KERNELS}",
            kiln_hw::fingerprint(kiln_hw::cpu()),
            env!("CARGO_PKG_VERSION")
        );
        let file = path
            .as_deref()
            .and_then(|p| load(p, &fingerprint))
            .unwrap_or(CacheFile {
                fingerprint,
                choices: BTreeMap::new(),
            });
        Mutex::new(Store { path, file })
    })
}

/// The choices in the file at `path`, if it parses and was written on
/// hardware with this fingerprint.
fn load(path: &Path, fingerprint: &str) -> Option<CacheFile> {
    let text = std::fs::read_to_string(path).ok()?;
    let file: CacheFile = serde_json::from_str(&text).ok()?;
    (file.fingerprint == fingerprint).then_some(file)
}

/// Writes `file` to `path` with the entries another process added since
/// this one loaded it (for keys this one did not decide), through a
/// temporary file and a rename so no reader sees half a file.
fn save(path: &Path, file: &CacheFile) -> std::io::Result<()> {
    let mut merged = load(path, &file.fingerprint).unwrap_or_default();
    merged.fingerprint = file.fingerprint.clone();
    for (k, v) in &file.choices {
        merged.choices.insert(k.clone(), v.clone());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_string_pretty(&merged)?)?;
    std::fs::rename(&tmp, path)
}

fn lock() -> std::sync::MutexGuard<'static, Store> {
    // Only whole-entry inserts happen under the lock: a panic elsewhere
    // cannot leave it half-updated.
    store().lock().unwrap_or_else(|e| e.into_inner())
}

/// The candidate chosen earlier for `key` on this hardware, by name.
pub fn recall(key: &str) -> Option<String> {
    lock().file.choices.get(key).cloned()
}

/// Remembers `choice` for `key`, in memory and on disk. A cache that cannot
/// be written is logged and otherwise ignored (the choice holds for this
/// process).
pub fn remember(key: &str, choice: &str) {
    let mut s = lock();
    s.file.choices.insert(key.to_string(), choice.to_string());
    if let Some(path) = s.path.clone() {
        if let Err(e) = save(&path, &s.file) {
            tracing::warn!(
                "could not write the tuning cache {}: {e} (the choice holds for this process)",
                path.display()
            );
        }
    }
}

/// The index of the fastest of `n` candidates, `run(i)` running candidate
/// i once: a warm-up run of each (candidate 0 first: when it takes less
/// than [`MIN_TUNED`] it is chosen without more runs), then [`ROUNDS`]
/// rounds in turn; the lowest minimum wins, ties to the lower index. When
/// that is not candidate 0, it, the runner-up and candidate 0 run
/// [`ROUNDS`] more rounds first. Also
/// returns each candidate's minimum (empty when nothing was timed).
pub fn fastest(n: usize, mut run: impl FnMut(usize)) -> (usize, Vec<Duration>) {
    if n <= 1 {
        return (0, Vec::new());
    }
    let mut timed = |i: usize| {
        let t = Instant::now();
        run(i);
        t.elapsed()
    };
    if timed(0) < MIN_TUNED {
        return (0, Vec::new());
    }
    for i in 1..n {
        timed(i);
    }
    let mut best = vec![Duration::MAX; n];
    for _ in 0..ROUNDS {
        for (i, b) in best.iter_mut().enumerate() {
            *b = (*b).min(timed(i));
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (best[i], i));
    // A choice against the heuristics' is confirmed by more rounds of the
    // finalists alone (the winner, the runner-up and candidate 0): one slow
    // spell of the host during a candidate's rounds would otherwise be
    // remembered on disk for good.
    if order[0] != 0 {
        let mut finalists = vec![0, order[0], order[1]];
        finalists.sort_unstable();
        finalists.dedup();
        for _ in 0..ROUNDS {
            for &i in &finalists {
                best[i] = best[i].min(timed(i));
            }
        }
    }
    let winner = (0..n).min_by_key(|&i| (best[i], i)).unwrap_or(0);
    (winner, best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fastest_picks_the_lowest_minimum() {
        // Candidate 1 sleeps least, by margins a loaded machine's timer
        // slack does not cover in all three rounds; 2 is slowest.
        let naps = [2_000u64, 200, 4_000];
        let (i, times) = fastest(3, |i| std::thread::sleep(Duration::from_micros(naps[i])));
        assert_eq!(i, 1);
        assert_eq!(times.len(), 3);
        assert!(times[1] >= Duration::from_micros(200) && times[1] < times[2]);
        // Candidate 0 slow through the first rounds only (the host busy),
        // then fast: the confirming rounds give it back the choice. (With
        // two candidates, both are finalists.)
        let mut calls = [0usize; 2];
        let (i, _) = fastest(2, |i| {
            calls[i] += 1;
            let us = match (i, calls[0]) {
                (0, c) if c <= 1 + ROUNDS => 3_000,
                (0, _) => 100,
                _ => 1_000,
            };
            std::thread::sleep(Duration::from_micros(us));
        });
        assert_eq!(i, 0, "calls {calls:?}");
        assert_eq!(calls, [1 + 2 * ROUNDS, 1 + 2 * ROUNDS]);
        // The same for a runner-up that is not candidate 0: candidate 2 is
        // slow through the first rounds, then the fastest; 1 led at first.
        let mut calls = [0usize; 3];
        let (i, _) = fastest(3, |i| {
            calls[i] += 1;
            let us = match (i, calls[2]) {
                (0, _) => 4_000,
                (1, _) => 1_000,
                (_, c) if c <= 1 + ROUNDS => 1_500,
                _ => 100,
            };
            std::thread::sleep(Duration::from_micros(us));
        });
        assert_eq!(i, 2, "calls {calls:?}");
        // A first candidate under MIN_TUNED wins without timing the rest.
        let mut ran = vec![0usize; 3];
        let (i, times) = fastest(3, |i| ran[i] += 1);
        assert_eq!((i, ran, times), (0, vec![1, 0, 0], vec![]));
        assert_eq!(
            fastest(1, |_| panic!("a single candidate is not run")),
            (0, vec![])
        );
    }

    #[test]
    fn cache_file_round_trips_and_merges() {
        let dir = std::env::temp_dir().join(format!("kiln-tune-test-{}", std::process::id()));
        let path = dir.join("tuning.json");
        let mut a = CacheFile {
            fingerprint: "cpu-a".into(),
            ..Default::default()
        };
        a.choices.insert("conv k1".into(), "positions".into());
        save(&path, &a).unwrap();
        // Another process's file with another key: both survive the merge.
        let mut b = CacheFile {
            fingerprint: "cpu-a".into(),
            ..Default::default()
        };
        b.choices.insert("conv k2".into(), "gathered".into());
        save(&path, &b).unwrap();
        let got = load(&path, "cpu-a").unwrap();
        assert_eq!(
            got.choices.get("conv k1").map(String::as_str),
            Some("positions")
        );
        assert_eq!(
            got.choices.get("conv k2").map(String::as_str),
            Some("gathered")
        );
        // Written on other hardware: ignored.
        assert!(load(&path, "cpu-b").is_none());
        // Not JSON: ignored, not an error.
        std::fs::write(&path, "{not json").unwrap();
        assert!(load(&path, "cpu-a").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
