//! The hardware profile kiln's planner uses: instruction-set features, cores and
//! cache sizes (read once, cheaply), plus measured peak FLOP/s and memory
//! bandwidth (`measure`, on request: it takes about a second).

use std::sync::OnceLock;

mod cache;
mod measure;

pub use cache::{default_cache_path, fingerprint, load_cached, measured, store_cached, Source};
pub use measure::{measure, Measured};

/// Cache sizes in bytes (per core for L1/L2, shared L3), when the OS reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caches {
    pub l1d: Option<usize>,
    pub l2: Option<usize>,
    pub l3: Option<usize>,
}

/// What this machine's CPU is and has.
#[derive(Clone, Debug)]
pub struct CpuInfo {
    /// `x86_64`, `aarch64`, ...
    pub arch: &'static str,
    /// The model name the OS reports, if any.
    pub model_name: Option<String>,
    /// Logical cores available to this process.
    pub cores: usize,
    /// Detected SIMD features relevant to kiln's kernels, e.g. `avx512f`, `fma`.
    pub features: Vec<&'static str>,
    pub caches: Caches,
}

impl CpuInfo {
    pub fn has(&self, feature: &str) -> bool {
        self.features.contains(&feature)
    }
}

/// The CPU profile, detected on first use.
pub fn cpu() -> &'static CpuInfo {
    static INFO: OnceLock<CpuInfo> = OnceLock::new();
    INFO.get_or_init(detect)
}

fn detect() -> CpuInfo {
    CpuInfo {
        arch: std::env::consts::ARCH,
        model_name: model_name(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        features: features(),
        caches: caches(),
    }
}

#[cfg(target_arch = "x86_64")]
fn features() -> Vec<&'static str> {
    let mut f = Vec::new();
    macro_rules! probe {
        ($($name:tt),*) => {$(
            if std::arch::is_x86_feature_detected!($name) {
                f.push($name);
            }
        )*};
    }
    probe!(
        "sse4.1",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512vnni",
        "avx512bf16",
        "avx512fp16"
    );
    f
}

#[cfg(target_arch = "aarch64")]
fn features() -> Vec<&'static str> {
    let mut f = Vec::new();
    macro_rules! probe {
        ($($name:tt),*) => {$(
            if std::arch::is_aarch64_feature_detected!($name) {
                f.push($name);
            }
        )*};
    }
    probe!("neon", "fp16", "dotprod", "bf16", "i8mm", "sve");
    f
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn features() -> Vec<&'static str> {
    Vec::new()
}

fn model_name() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name") || l.starts_with("Model"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// Cache sizes from Linux sysfs (`/sys/devices/system/cpu/cpu0/cache`).
fn caches() -> Caches {
    let mut c = Caches::default();
    for i in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size"))
        else {
            continue;
        };
        let Some(bytes) = parse_size(size.trim()) else {
            continue;
        };
        match (level.trim(), kind.trim()) {
            ("1", "Data") => c.l1d = Some(bytes),
            ("2", "Unified" | "Data") => c.l2 = Some(bytes),
            ("3", "Unified") => c.l3 = Some(bytes),
            _ => {}
        }
    }
    c
}

/// `32K` / `1024K` / `32M` / `65536` -> bytes.
fn parse_size(s: &str) -> Option<usize> {
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1024),
        'M' | 'm' => (&s[..s.len() - 1], 1024 * 1024),
        'G' | 'g' => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    num.trim().parse::<usize>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("32K"), Some(32 * 1024));
        assert_eq!(parse_size("32M"), Some(32 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("x"), None);
    }

    #[test]
    fn detection_reports_at_least_one_core() {
        let c = cpu();
        assert!(c.cores >= 1);
        assert_eq!(c.arch, std::env::consts::ARCH);
    }
}
