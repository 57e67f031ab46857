//! The on-disk cache of [`Measured`] peaks, so `kiln bench` does not spend a
//! second re-measuring on every call. Entries are keyed by a hardware
//! fingerprint (CPU model, features, cores) and by the thread count they were
//! measured with; a file written on other hardware is ignored.

use crate::{measure, CpuInfo, Measured};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize, Default)]
struct CacheFile {
    fingerprint: String,
    measurements: Vec<Measured>,
}

/// What identifies the hardware a measurement is valid for.
pub fn fingerprint(cpu: &CpuInfo) -> String {
    format!(
        "{}|{}|{}|{}",
        cpu.arch,
        cpu.model_name.as_deref().unwrap_or("unknown"),
        cpu.features.join(","),
        cpu.cores
    )
}

/// `$XDG_CACHE_HOME/kiln/hw.json`, else `$HOME/.cache/kiln/hw.json`.
pub fn default_cache_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("kiln").join("hw.json"))
}

/// The cached measurement for `threads` threads at `path`, if the file exists,
/// parses, and was written on hardware with this `fingerprint`.
pub fn load_cached(path: &Path, fingerprint: &str, threads: usize) -> Option<Measured> {
    let text = std::fs::read_to_string(path).ok()?;
    let file: CacheFile = serde_json::from_str(&text).ok()?;
    if file.fingerprint != fingerprint {
        return None;
    }
    file.measurements.into_iter().find(|m| m.threads == threads)
}

/// Adds `m` to the cache at `path`, merged with the entry for the same thread
/// count by keeping the higher value of each peak (a peak is what the hardware
/// sustains; a lower reading means other work shared the cores then). Entries
/// for other thread counts are kept when the fingerprint matches; a file from
/// other hardware is replaced. Writes a temporary file and renames it, so a reader never sees
/// half a file.
pub fn store_cached(path: &Path, fingerprint: &str, m: &Measured) -> std::io::Result<()> {
    let mut file = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<CacheFile>(&t).ok())
        .filter(|f| f.fingerprint == fingerprint)
        .unwrap_or_else(|| CacheFile {
            fingerprint: fingerprint.to_string(),
            measurements: Vec::new(),
        });
    let merged = match file.measurements.iter().find(|e| e.threads == m.threads) {
        Some(old) => best_of(old, m),
        None => m.clone(),
    };
    file.measurements.retain(|e| e.threads != m.threads);
    file.measurements.push(merged);
    file.measurements.sort_by_key(|e| e.threads);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(&file).map_err(std::io::Error::other)?;
    let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Each peak's higher reading of two measurements of the same hardware.
fn best_of(a: &Measured, b: &Measured) -> Measured {
    let opt_max = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    let (f32_gflops, f32_path) = if b.peak_f32_gflops >= a.peak_f32_gflops {
        (b.peak_f32_gflops, b.f32_path.clone())
    } else {
        (a.peak_f32_gflops, a.f32_path.clone())
    };
    Measured {
        threads: b.threads,
        peak_f32_gflops: f32_gflops,
        f32_path,
        peak_bf16_gflops: opt_max(a.peak_bf16_gflops, b.peak_bf16_gflops),
        peak_int8_gops: opt_max(a.peak_int8_gops, b.peak_int8_gops),
        mem_bandwidth_gbs: a.mem_bandwidth_gbs.max(b.mem_bandwidth_gbs),
    }
}

/// Where a [`Measured`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cache,
    Fresh,
}

/// The peaks for `threads` threads on this machine: from the default cache when
/// `use_cache` and an entry for this hardware exists, else measured now (about
/// a second) and stored in the cache. A cache that cannot be written is not an
/// error: the fresh measurement is still returned.
pub fn measured(threads: usize, use_cache: bool) -> (Measured, Source) {
    let threads = threads.max(1);
    let fp = fingerprint(crate::cpu());
    let path = default_cache_path();
    if use_cache {
        if let Some(m) = path.as_deref().and_then(|p| load_cached(p, &fp, threads)) {
            return (m, Source::Cache);
        }
    }
    let m = measure(threads);
    if let Some(p) = &path {
        let _ = store_cached(p, &fp, &m);
    }
    (m, Source::Fresh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Caches;

    fn sample(threads: usize, gflops: f64) -> Measured {
        Measured {
            threads,
            peak_f32_gflops: gflops,
            f32_path: "avx512".into(),
            peak_bf16_gflops: Some(2.0 * gflops),
            peak_int8_gops: None,
            mem_bandwidth_gbs: 20.5,
        }
    }

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir()
            .join(format!("kiln-hw-test-{}-{tag}", std::process::id()))
            .join("nested")
            .join("hw.json")
    }

    #[test]
    fn cache_round_trip_per_thread_count() {
        let path = temp_path("roundtrip");
        let fp = "x86_64|Test CPU|avx2,fma|4";
        assert_eq!(load_cached(&path, fp, 1), None, "no file yet");
        store_cached(&path, fp, &sample(1, 100.0)).unwrap();
        store_cached(&path, fp, &sample(4, 350.0)).unwrap();
        assert_eq!(load_cached(&path, fp, 1), Some(sample(1, 100.0)));
        assert_eq!(load_cached(&path, fp, 4), Some(sample(4, 350.0)));
        assert_eq!(load_cached(&path, fp, 2), None, "never measured");
        // Re-storing a thread count keeps each peak's higher reading.
        store_cached(&path, fp, &sample(1, 120.0)).unwrap();
        assert_eq!(load_cached(&path, fp, 1), Some(sample(1, 120.0)));
        assert_eq!(load_cached(&path, fp, 4), Some(sample(4, 350.0)));
        let mut disturbed = sample(1, 60.0);
        disturbed.mem_bandwidth_gbs = 30.0;
        disturbed.peak_int8_gops = Some(400.0);
        store_cached(&path, fp, &disturbed).unwrap();
        let kept = load_cached(&path, fp, 1).unwrap();
        assert_eq!(kept.peak_f32_gflops, 120.0);
        assert_eq!(kept.peak_bf16_gflops, Some(240.0));
        assert_eq!(kept.peak_int8_gops, Some(400.0));
        assert_eq!(kept.mem_bandwidth_gbs, 30.0);
        std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap()).unwrap();
    }

    #[test]
    fn cache_from_other_hardware_is_ignored_and_replaced() {
        let path = temp_path("otherhw");
        store_cached(&path, "old-cpu", &sample(2, 50.0)).unwrap();
        assert_eq!(load_cached(&path, "new-cpu", 2), None);
        store_cached(&path, "new-cpu", &sample(1, 80.0)).unwrap();
        assert_eq!(load_cached(&path, "new-cpu", 1), Some(sample(1, 80.0)));
        // The old hardware's entries went with its fingerprint.
        assert_eq!(load_cached(&path, "new-cpu", 2), None);
        assert_eq!(load_cached(&path, "old-cpu", 2), None);
        std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap()).unwrap();
    }

    #[test]
    fn corrupt_cache_reads_as_missing_and_is_overwritten() {
        let path = temp_path("corrupt");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(load_cached(&path, "fp", 1), None);
        store_cached(&path, "fp", &sample(1, 10.0)).unwrap();
        assert_eq!(load_cached(&path, "fp", 1), Some(sample(1, 10.0)));
        std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap()).unwrap();
    }

    #[test]
    fn fingerprint_changes_with_model_features_and_cores() {
        let base = CpuInfo {
            arch: "x86_64",
            model_name: Some("CPU A".into()),
            cores: 4,
            features: vec!["avx2", "fma"],
            caches: Caches::default(),
        };
        let fp = fingerprint(&base);
        let mut other = base.clone();
        other.model_name = Some("CPU B".into());
        assert_ne!(fingerprint(&other), fp);
        let mut other = base.clone();
        other.features.push("avx512f");
        assert_ne!(fingerprint(&other), fp);
        let mut other = base.clone();
        other.cores = 8;
        assert_ne!(fingerprint(&other), fp);
        // Cache sizes are not part of it: same CPU, same peaks.
        let mut other = base.clone();
        other.caches.l3 = Some(1 << 25);
        assert_eq!(fingerprint(&other), fp);
    }
}
