//! Prometheus metrics, kept by hand (a few counters and histograms) and written
//! in the text exposition format at `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }
    fn observe(&mut self, v: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    /// (model, outcome) -> count
    requests: BTreeMap<(String, String), u64>,
    queue: BTreeMap<String, Histogram>,
    compute: BTreeMap<String, Histogram>,
    total: BTreeMap<String, Histogram>,
    batch: BTreeMap<String, Histogram>,
}

/// Live per-model numbers read at scrape time.
pub struct ModelGauge {
    pub model: String,
    pub version: String,
    pub ready: bool,
    /// LOADING, READY or UNAVAILABLE.
    pub state: &'static str,
    pub queue_depth: usize,
    pub in_flight: usize,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// One answered inference request.
    pub fn request(&self, model: &str, outcome: &str, total_s: Option<f64>) {
        self.with(|m| {
            *m.requests
                .entry((model.to_string(), outcome.to_string()))
                .or_default() += 1;
            if let Some(t) = total_s {
                m.total
                    .entry(model.to_string())
                    .or_insert_with(|| Histogram::new(&LATENCY_BUCKETS))
                    .observe(t);
            }
        })
    }

    /// One batch run: its size, its compute time, and each member's queue time.
    pub fn batch(&self, model: &str, size: usize, compute_s: f64, queue_s: &[f64]) {
        self.with(|m| {
            m.batch
                .entry(model.to_string())
                .or_insert_with(|| Histogram::new(&BATCH_BUCKETS))
                .observe(size as f64);
            m.compute
                .entry(model.to_string())
                .or_insert_with(|| Histogram::new(&LATENCY_BUCKETS))
                .observe(compute_s);
            let q = m
                .queue
                .entry(model.to_string())
                .or_insert_with(|| Histogram::new(&LATENCY_BUCKETS));
            for s in queue_s {
                q.observe(*s);
            }
        })
    }

    pub fn render(&self, gauges: &[ModelGauge]) -> String {
        let mut out = String::new();
        self.with(|m| {
            out.push_str("# HELP kiln_requests_total Inference requests answered, by model and outcome.\n# TYPE kiln_requests_total counter\n");
            for ((model, outcome), n) in &m.requests {
                let _ = writeln!(
                    out,
                    "kiln_requests_total{{model=\"{}\",outcome=\"{}\"}} {n}",
                    esc(model),
                    esc(outcome)
                );
            }
            for (name, help, map) in [
                ("kiln_queue_seconds", "Time from arrival to the start of its batch.", &m.queue),
                ("kiln_compute_seconds", "Time one batch spent running the model.", &m.compute),
                ("kiln_request_seconds", "Total time of successful requests in the server.", &m.total),
                ("kiln_batch_size", "Requests merged into one model run.", &m.batch),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
                for (model, h) in map {
                    h.write(&mut out, name, &format!("model=\"{}\"", esc(model)));
                }
            }
        });
        out.push_str("# HELP kiln_queue_depth Requests waiting for a batch.\n# TYPE kiln_queue_depth gauge\n");
        for g in gauges {
            let _ = writeln!(
                out,
                "kiln_queue_depth{{model=\"{}\"}} {}",
                esc(&g.model),
                g.queue_depth
            );
        }
        out.push_str("# HELP kiln_batches_in_flight Batches running now.\n# TYPE kiln_batches_in_flight gauge\n");
        for g in gauges {
            let _ = writeln!(
                out,
                "kiln_batches_in_flight{{model=\"{}\"}} {}",
                esc(&g.model),
                g.in_flight
            );
        }
        out.push_str("# HELP kiln_model_ready 1 when the model loaded and serves, 0 while it loads or when it failed to load.\n# TYPE kiln_model_ready gauge\n");
        for g in gauges {
            let _ = writeln!(
                out,
                "kiln_model_ready{{model=\"{}\",version=\"{}\"}} {}",
                esc(&g.model),
                esc(&g.version),
                g.ready as u8
            );
        }
        out.push_str("# HELP kiln_model_state The model's state: 1 on the series whose state label is current (LOADING, READY, UNAVAILABLE).\n# TYPE kiln_model_state gauge\n");
        for g in gauges {
            for state in ["LOADING", "READY", "UNAVAILABLE"] {
                let _ = writeln!(
                    out,
                    "kiln_model_state{{model=\"{}\",version=\"{}\",state=\"{state}\"}} {}",
                    esc(&g.model),
                    esc(&g.version),
                    (g.state == state) as u8
                );
            }
        }
        out
    }
}
