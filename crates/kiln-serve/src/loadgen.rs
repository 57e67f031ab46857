//! A load generator for KServe v2 HTTP servers (`kiln bench --server`).
//!
//! Two scenarios, both bounded in time and in request count:
//! - **closed loop**: `concurrency` clients, each with one keep-alive connection,
//!   send a request, wait for its answer, and send the next;
//! - **open loop** (`rate`): requests arrive as a Poisson process at `rate` per
//!   second (MLPerf's Server scenario) whatever the server's speed; latency is
//!   measured from each request's scheduled arrival, so a slow server is not
//!   hidden by the client waiting for it ("coordinated omission").
//!
//! Inputs are built from the model's metadata (`GET /v2/models/<m>`): -1 in dim 0
//! becomes the batch size, any other -1 becomes 1, unless a shape override says
//! otherwise; data is seeded random. A few request bodies are built once and
//! reused, so the client spends its CPU on I/O and not on making data (it often
//! shares the machine with the server).
//!
//! Only loopback servers are accepted: this is a benchmark, not a traffic
//! generator to point at other people's machines.
//!
//! The HTTP client is a minimal HTTP/1.1 one over a tokio `TcpStream` (one
//! keep-alive connection per client, Content-Length or chunked bodies); it
//! needs nothing beyond the tokio already in the tree.

use serde_json::{json, Value};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How tensors travel in requests and responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorFormat {
    /// JSON `data` lists.
    Json,
    /// The `binary_tensor_data` extension (inputs and outputs).
    Binary,
}

impl TensorFormat {
    fn name(self) -> &'static str {
        match self {
            TensorFormat::Json => "json",
            TensorFormat::Binary => "binary",
        }
    }
}

/// What to send, how, and for how long.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Base URL, `http://HOST:PORT` with a loopback HOST.
    pub server: String,
    pub model: String,
    pub model_version: Option<String>,
    /// Closed loop: number of clients (connections). Ignored when `rate` is set.
    pub concurrency: usize,
    /// How long new requests are sent; requests in flight at the end are awaited
    /// (each at most `request_timeout`).
    pub duration: Duration,
    /// Open loop: Poisson arrivals per second.
    pub rate: Option<f64>,
    /// Open loop: most requests outstanding at once; an arrival beyond it is
    /// counted as dropped (the client, not the server, could not keep up).
    pub max_in_flight: usize,
    /// Stop sending after this many requests.
    pub max_requests: Option<u64>,
    pub request_timeout: Duration,
    /// Dim 0 of each request's inputs where the model's dim 0 is variable.
    pub batch_size: usize,
    /// Input shapes that replace the metadata's (by input name).
    pub shapes: Vec<(String, Vec<usize>)>,
    pub format: TensorFormat,
    pub seed: u64,
}

impl LoadConfig {
    /// A closed-loop run with one client for `duration`, binary tensors.
    pub fn new(server: impl Into<String>, model: impl Into<String>, duration: Duration) -> Self {
        LoadConfig {
            server: server.into(),
            model: model.into(),
            model_version: None,
            concurrency: 1,
            duration,
            rate: None,
            max_in_flight: 256,
            max_requests: None,
            request_timeout: Duration::from_secs(30),
            batch_size: 1,
            shapes: Vec::new(),
            format: TensorFormat::Binary,
            seed: 0,
        }
    }
}

/// Why a load run could not start (failures of single requests are counted in
/// the report instead).
#[derive(Debug)]
pub enum LoadError {
    /// The configuration is wrong (bad URL, non-loopback host, bad shape...).
    Usage(String),
    /// The server could not be reached or described the model in a way we
    /// cannot use.
    Server(String),
}

impl LoadError {
    pub fn is_usage(&self) -> bool {
        matches!(self, LoadError::Usage(_))
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Usage(m) | LoadError::Server(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for LoadError {}

/// Parses `NAME=D,D,...` (a `--shape` override).
pub fn parse_shape_override(s: &str) -> Result<(String, Vec<usize>), String> {
    let (name, dims) = s
        .split_once('=')
        .ok_or_else(|| format!("shape '{s}' must be NAME=D,D,..."))?;
    if name.is_empty() {
        return Err(format!("shape '{s}' has no input name"));
    }
    let dims = if dims.trim().is_empty() {
        Vec::new() // a scalar
    } else {
        dims.split(',')
            .map(|d| {
                d.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("shape '{s}': '{d}' is not a non-negative integer"))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    Ok((name.to_string(), dims))
}

/// Latency percentiles in milliseconds (nearest rank over successful requests).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Latency {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    fn from_ms(mut v: Vec<f64>) -> Latency {
        if v.is_empty() {
            return Latency::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let rank = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[i - 1]
        };
        Latency {
            min: v[0],
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub server: String,
    pub model: String,
    /// "closed" or "poisson".
    pub mode: &'static str,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub batch_size: usize,
    pub tensor_format: &'static str,
    /// The input shapes sent.
    pub shapes: Vec<(String, Vec<usize>)>,
    pub duration_s: f64,
    /// From the first request to the last answer.
    pub elapsed_s: f64,
    /// Requests sent (or, open loop, scheduled and not dropped).
    pub sent: u64,
    /// 2xx with a well-formed body.
    pub ok: u64,
    /// 429 Too Many Requests (the server's queue limit).
    pub rejected_429: u64,
    /// Other 4xx.
    pub client_4xx: u64,
    /// 5xx (504 when the server's own time limit passed, 503 when not ready).
    pub server_5xx: u64,
    /// No answer within `request_timeout`.
    pub timeouts: u64,
    /// Connect, read or write failures, or responses that are not HTTP.
    pub transport_errors: u64,
    /// A 2xx whose body is not a v2 inference response.
    pub bad_responses: u64,
    /// Open loop: arrivals not sent because `max_in_flight` were outstanding.
    pub dropped: u64,
    pub throughput_per_s: f64,
    /// `throughput_per_s` times the batch size.
    pub inferences_per_s: f64,
    pub latency_ms: Latency,
    /// The first failure seen, to say what went wrong.
    pub first_error: Option<String>,
}

impl LoadReport {
    /// Failed requests of every kind (429s included).
    pub fn failed(&self) -> u64 {
        self.rejected_429
            + self.client_4xx
            + self.server_5xx
            + self.timeouts
            + self.transport_errors
            + self.bad_responses
    }

    pub fn to_json(&self) -> Value {
        let l = &self.latency_ms;
        json!({
            "server": self.server,
            "model": self.model,
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "batch_size": self.batch_size,
            "tensor_format": self.tensor_format,
            "shapes": self.shapes.iter().map(|(n, s)| (n.clone(), json!(s))).collect::<serde_json::Map<_, _>>(),
            "duration_s": self.duration_s,
            "elapsed_s": self.elapsed_s,
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed(),
            "errors": {
                "http_429": self.rejected_429,
                "http_4xx": self.client_4xx,
                "http_5xx": self.server_5xx,
                "timeouts": self.timeouts,
                "transport": self.transport_errors,
                "bad_response": self.bad_responses,
            },
            "dropped": self.dropped,
            "throughput_per_s": self.throughput_per_s,
            "inferences_per_s": self.inferences_per_s,
            "latency_ms": {
                "min": l.min, "mean": l.mean, "p50": l.p50, "p90": l.p90, "p99": l.p99, "max": l.max,
            },
            "first_error": self.first_error,
        })
    }

    /// The human-readable form.
    pub fn summary(&self) -> String {
        let l = &self.latency_ms;
        let load = match self.rate {
            Some(r) => format!("Poisson arrivals at {r} req/s"),
            None => format!("{} closed-loop clients", self.concurrency),
        };
        let shapes: Vec<String> = self
            .shapes
            .iter()
            .map(|(n, s)| format!("{n}={s:?}"))
            .collect();
        let mut s = format!(
            "server      {} model {}\n\
             load        {load}, {:.1} s, batch {} per request, {} tensors\n\
             inputs      {}\n\
             requests    {} sent, {} ok, {} failed{} in {:.2} s\n\
             throughput  {:.2} req/s ({:.2} inferences/s)\n\
             latency ms  p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  mean {:.2}\n",
            self.server,
            self.model,
            self.duration_s,
            self.batch_size,
            self.tensor_format,
            shapes.join(" "),
            self.sent,
            self.ok,
            self.failed(),
            if self.dropped > 0 {
                format!(" ({} arrivals dropped by the client)", self.dropped)
            } else {
                String::new()
            },
            self.elapsed_s,
            self.throughput_per_s,
            self.inferences_per_s,
            l.p50,
            l.p90,
            l.p99,
            l.max,
            l.mean,
        );
        if self.failed() > 0 {
            s.push_str(&format!(
                "errors      429: {}  other 4xx: {}  5xx: {}  timeouts: {}  transport: {}  bad responses: {}\n",
                self.rejected_429,
                self.client_4xx,
                self.server_5xx,
                self.timeouts,
                self.transport_errors,
                self.bad_responses
            ));
        }
        if let Some(e) = &self.first_error {
            s.push_str(&format!("first error {e}\n"));
        }
        s
    }
}

/// Runs the load on a small runtime of its own (one thread: the client must
/// leave the cores to the server it measures) and returns the report.
pub fn run_blocking(cfg: &LoadConfig) -> Result<LoadReport, LoadError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LoadError::Server(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(run(cfg))
}

// ---------------------------------------------------------------------------
// Target: a loopback host and a path prefix.

struct Target {
    addr: SocketAddr,
    /// `host:port` as the Host header gives it.
    host_header: String,
    /// Path prefix from the URL, without a trailing `/`.
    prefix: String,
}

async fn parse_target(url: &str) -> Result<Target, LoadError> {
    let usage = |m: String| LoadError::Usage(m);
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        usage(format!(
            "server URL '{url}' must start with http:// (TLS is not supported)"
        ))
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(usage(format!("server URL '{url}' has no usable host")));
    }
    // `[::1]:8000`, `[::1]`, `host:8000`, `host`.
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .ok_or_else(|| usage(format!("server URL '{url}': unclosed '['")))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(usage(format!("server URL '{url}': junk after ']'"))),
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(usage(format!("server URL '{url}' has no host")));
    }
    let port: u16 = match port {
        None => 80,
        Some(p) => p
            .parse()
            .map_err(|_| usage(format!("server URL '{url}': '{p}' is not a port")))?,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| usage(format!("cannot resolve '{host}': {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(usage(format!("'{host}' resolves to no address")));
    }
    // Every address must be loopback: a name that also resolves elsewhere is refused.
    if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(usage(format!(
            "refusing to load '{host}' ({}): kiln bench --server only targets loopback \
             addresses (127.0.0.0/8, ::1, localhost)",
            a.ip()
        )));
    }
    Ok(Target {
        addr: addrs[0],
        host_header: authority.to_string(),
        prefix: path.to_string(),
    })
}

// ---------------------------------------------------------------------------
// A minimal HTTP/1.1 client connection.

/// Largest response head we accept (status line + headers).
const MAX_HEAD: usize = 64 << 10;
/// Largest response body we accept.
const MAX_BODY: usize = 1 << 30;

struct Response {
    status: u16,
    /// `Inference-Header-Content-Length`, if sent.
    header_len: Option<usize>,
    body: Vec<u8>,
    /// The server asked to close the connection after this response.
    close: bool,
}

struct Conn {
    stream: BufReader<TcpStream>,
}

fn io_err(m: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m.into())
}

impl Conn {
    async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let s = TcpStream::connect(addr).await?;
        // Requests are written in one or two writes; no Nagle delay between them.
        s.set_nodelay(true)?;
        Ok(Conn {
            stream: BufReader::with_capacity(64 << 10, s),
        })
    }

    /// Sends one request and reads its response. On any error the connection
    /// must be dropped (its state is unknown).
    async fn request(&mut self, head: &[u8], body: &[u8]) -> std::io::Result<Response> {
        let s = self.stream.get_mut();
        s.write_all(head).await?;
        if !body.is_empty() {
            s.write_all(body).await?;
        }
        s.flush().await?;
        self.read_response().await
    }

    async fn read_line(&mut self, line: &mut Vec<u8>, budget: &mut usize) -> std::io::Result<()> {
        line.clear();
        let n = (&mut self.stream)
            .take(*budget as u64 + 1)
            .read_until(b'\n', line)
            .await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        if n > *budget || line.last() != Some(&b'\n') {
            return Err(io_err("response head too long or truncated"));
        }
        *budget -= n;
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        Ok(())
    }

    async fn read_response(&mut self) -> std::io::Result<Response> {
        let mut budget = MAX_HEAD;
        let mut line = Vec::with_capacity(128);
        // Skip interim 1xx responses (100 Continue).
        let status = loop {
            self.read_line(&mut line, &mut budget).await?;
            let text = std::str::from_utf8(&line).map_err(|_| io_err("status line not UTF-8"))?;
            let mut parts = text.splitn(3, ' ');
            let version = parts.next().unwrap_or("");
            if !version.starts_with("HTTP/1.") {
                return Err(io_err(format!("not an HTTP/1.x response: '{text}'")));
            }
            let status: u16 = parts
                .next()
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| io_err(format!("bad status line '{text}'")))?;
            if (100..200).contains(&status) {
                loop {
                    self.read_line(&mut line, &mut budget).await?;
                    if line.is_empty() {
                        break;
                    }
                }
                continue;
            }
            break status;
        };
        let mut content_length: Option<usize> = None;
        let mut chunked = false;
        let mut close = false;
        let mut header_len = None;
        loop {
            self.read_line(&mut line, &mut budget).await?;
            if line.is_empty() {
                break;
            }
            let text = std::str::from_utf8(&line).map_err(|_| io_err("header not UTF-8"))?;
            let Some((k, v)) = text.split_once(':') else {
                return Err(io_err(format!("bad header line '{text}'")));
            };
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => {
                    content_length = Some(
                        v.parse()
                            .map_err(|_| io_err(format!("bad Content-Length '{v}'")))?,
                    )
                }
                "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
                "connection" => close = v.eq_ignore_ascii_case("close"),
                "inference-header-content-length" => header_len = v.parse().ok(),
                _ => {}
            }
        }
        let body = if chunked {
            self.read_chunked().await?
        } else if let Some(n) = content_length {
            if n > MAX_BODY {
                return Err(io_err(format!("response body of {n} bytes is too large")));
            }
            let mut b = vec![0u8; n];
            self.stream.read_exact(&mut b).await?;
            b
        } else if status == 204 || status == 304 {
            Vec::new()
        } else {
            // Delimited by the end of the connection.
            close = true;
            let mut b = Vec::new();
            (&mut self.stream)
                .take(MAX_BODY as u64)
                .read_to_end(&mut b)
                .await?;
            b
        };
        Ok(Response {
            status,
            header_len,
            body,
            close,
        })
    }

    async fn read_chunked(&mut self) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        let mut line = Vec::new();
        loop {
            let mut budget = MAX_HEAD;
            self.read_line(&mut line, &mut budget).await?;
            let text = std::str::from_utf8(&line).map_err(|_| io_err("chunk size not UTF-8"))?;
            let hex = text.split(';').next().unwrap_or("").trim();
            let n = usize::from_str_radix(hex, 16)
                .map_err(|_| io_err(format!("bad chunk size '{text}'")))?;
            if n == 0 {
                // Trailers, then the blank line.
                loop {
                    self.read_line(&mut line, &mut budget).await?;
                    if line.is_empty() {
                        return Ok(body);
                    }
                }
            }
            if body.len() + n > MAX_BODY {
                return Err(io_err("chunked response body is too large"));
            }
            let at = body.len();
            body.resize(at + n, 0);
            self.stream.read_exact(&mut body[at..]).await?;
            self.read_line(&mut line, &mut budget).await?;
            if !line.is_empty() {
                return Err(io_err("chunk not followed by CRLF"));
            }
        }
    }
}

fn get_head(t: &Target, path: &str) -> Vec<u8> {
    format!(
        "GET {}{path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n\r\n",
        t.prefix, t.host_header
    )
    .into_bytes()
}

/// One GET on a fresh connection; the body as JSON.
async fn get_json(t: &Target, path: &str, timeout: Duration) -> Result<(u16, Value), LoadError> {
    let what = format!("GET {}{path}", t.prefix);
    let fut = async {
        let mut c = Conn::connect(t.addr).await?;
        c.request(&get_head(t, path), &[]).await
    };
    let r = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| LoadError::Server(format!("{what}: no answer within {timeout:?}")))?
        .map_err(|e| {
            LoadError::Server(format!(
                "{what} on {}: {e} (is the server running?)",
                t.addr
            ))
        })?;
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    Ok((r.status, v))
}

// ---------------------------------------------------------------------------
// Request bodies built from the model's metadata.

/// Bytes per element and how to fill it, by protocol datatype name.
fn datatype_size(dt: &str) -> Option<usize> {
    Some(match dt {
        "BOOL" | "INT8" | "UINT8" => 1,
        "FP16" | "BF16" | "INT16" | "UINT16" => 2,
        "FP32" | "INT32" | "UINT32" => 4,
        "FP64" | "INT64" | "UINT64" => 8,
        _ => return None,
    })
}

/// splitmix64: small, seedable, good enough for benchmark data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One input as it will be sent.
#[derive(Clone, Debug)]
struct InputSpec {
    name: String,
    datatype: String,
    shape: Vec<usize>,
}

/// Random element values: floats uniform in [-1, 1), integers in [0, 16)
/// (small enough to be valid indices or token ids for most models), booleans
/// either way.
fn fill(spec: &InputSpec, rng: &mut Rng) -> (Vec<u8>, Vec<Value>) {
    let n: usize = spec.shape.iter().product();
    let mut raw = Vec::with_capacity(n * datatype_size(&spec.datatype).unwrap_or(1));
    let mut vals = Vec::with_capacity(n);
    for _ in 0..n {
        let f = rng.unit() * 2.0 - 1.0;
        let i = (rng.next_u64() % 16) as i64;
        match spec.datatype.as_str() {
            "FP32" => {
                let x = f as f32;
                raw.extend_from_slice(&x.to_le_bytes());
                vals.push(json!(x));
            }
            "FP64" => {
                raw.extend_from_slice(&f.to_le_bytes());
                vals.push(json!(f));
            }
            "FP16" => {
                let x = half::f16::from_f64(f);
                raw.extend_from_slice(&x.to_le_bytes());
                vals.push(json!(x.to_f32()));
            }
            "BF16" => {
                let x = half::bf16::from_f64(f);
                raw.extend_from_slice(&x.to_le_bytes());
                vals.push(json!(x.to_f32()));
            }
            "BOOL" => {
                let b = i % 2 == 1;
                raw.push(b as u8);
                vals.push(json!(b));
            }
            "INT8" | "UINT8" => raw.push(i as u8),
            "INT16" | "UINT16" => raw.extend_from_slice(&(i as u16).to_le_bytes()),
            "INT32" | "UINT32" => raw.extend_from_slice(&(i as u32).to_le_bytes()),
            _ => raw.extend_from_slice(&(i as u64).to_le_bytes()),
        }
        if spec.datatype.starts_with("INT") || spec.datatype.starts_with("UINT") {
            vals.push(json!(i));
        }
    }
    (raw, vals)
}

/// The inputs to send, from `GET /v2/models/<m>` and the overrides.
fn input_specs(meta: &Value, cfg: &LoadConfig) -> Result<Vec<InputSpec>, LoadError> {
    let bad = |m: String| LoadError::Server(format!("model '{}': {m}", cfg.model));
    let inputs = meta
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("metadata has no 'inputs' list".into()))?;
    for (name, _) in &cfg.shapes {
        if !inputs
            .iter()
            .any(|i| i.get("name").and_then(Value::as_str) == Some(name))
        {
            return Err(LoadError::Usage(format!(
                "--shape names '{name}', which is not an input of model '{}'",
                cfg.model
            )));
        }
    }
    let mut specs = Vec::new();
    for i in inputs {
        let name = i
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("an input has no name".into()))?;
        let datatype = i
            .get("datatype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("input '{name}' has no datatype")))?;
        if datatype_size(datatype).is_none() {
            return Err(bad(format!(
                "input '{name}' is {datatype}; the load generator makes only numeric and BOOL data"
            )));
        }
        let shape = match cfg.shapes.iter().find(|(n, _)| n == name) {
            Some((_, s)) => s.clone(),
            None => {
                let dims = i
                    .get("shape")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad(format!("input '{name}' has no shape")))?;
                let mut shape = Vec::with_capacity(dims.len());
                for (k, d) in dims.iter().enumerate() {
                    let d = d
                        .as_i64()
                        .ok_or_else(|| bad(format!("input '{name}': bad dim {d}")))?;
                    shape.push(match (k, d) {
                        (0, -1) => cfg.batch_size,
                        (_, -1) => 1,
                        (0, d) if d >= 0 && d as usize != cfg.batch_size && cfg.batch_size != 1 => {
                            return Err(LoadError::Usage(format!(
                                "input '{name}' of model '{}' has a fixed dim 0 of {d}: \
                                 --batch-size {} cannot apply (give --shape instead)",
                                cfg.model, cfg.batch_size
                            )))
                        }
                        (_, d) if d >= 0 => d as usize,
                        (_, d) => return Err(bad(format!("input '{name}': bad dim {d}"))),
                    });
                }
                shape
            }
        };
        // Bodies are built in memory: keep each input under 256 Mi elements.
        if shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .is_none_or(|n| n > (256 << 20))
        {
            return Err(LoadError::Usage(format!(
                "input '{name}' shape {shape:?} is too large"
            )));
        }
        specs.push(InputSpec {
            name: name.to_string(),
            datatype: datatype.to_string(),
            shape,
        });
    }
    if specs.is_empty() {
        return Err(bad("the model has no inputs".into()));
    }
    Ok(specs)
}

/// A complete infer request: HTTP head and body.
struct Prepared {
    head: Vec<u8>,
    body: Vec<u8>,
}

fn build_request(
    t: &Target,
    path: &str,
    specs: &[InputSpec],
    format: TensorFormat,
    rng: &mut Rng,
) -> Prepared {
    let mut inputs = Vec::new();
    let mut binary = Vec::new();
    for s in specs {
        let (raw, vals) = fill(s, rng);
        let mut v = json!({ "name": s.name, "shape": s.shape, "datatype": s.datatype });
        match format {
            TensorFormat::Binary => {
                v["parameters"] = json!({ "binary_data_size": raw.len() });
                binary.extend_from_slice(&raw);
            }
            TensorFormat::Json => v["data"] = Value::Array(vals),
        }
        inputs.push(v);
    }
    let req = json!({
        "inputs": inputs,
        "parameters": { "binary_data_output": format == TensorFormat::Binary },
    });
    let mut body = req.to_string().into_bytes();
    let json_len = body.len();
    body.extend_from_slice(&binary);
    let mut head = format!(
        "POST {}{path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
        t.prefix,
        t.host_header,
        body.len()
    );
    match format {
        TensorFormat::Binary => head.push_str(&format!(
            "Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {json_len}\r\n\r\n"
        )),
        TensorFormat::Json => head.push_str("Content-Type: application/json\r\n\r\n"),
    }
    Prepared {
        head: head.into_bytes(),
        body,
    }
}

/// Whether a 2xx body is a v2 inference response (JSON head with an `outputs`
/// list whose binary sizes add up to the bytes that follow it).
fn valid_infer_response(r: &Response) -> bool {
    let json_len = r.header_len.unwrap_or(r.body.len());
    if json_len > r.body.len() {
        return false;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&r.body[..json_len]) else {
        return false;
    };
    let Some(outs) = v.get("outputs").and_then(Value::as_array) else {
        return false;
    };
    let binary: u64 = outs
        .iter()
        .filter_map(|o| o.pointer("/parameters/binary_data_size")?.as_u64())
        .sum();
    !outs.is_empty() && binary == (r.body.len() - json_len) as u64
}

// ---------------------------------------------------------------------------
// The run.

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    r429: AtomicU64,
    c4xx: AtomicU64,
    s5xx: AtomicU64,
    timeouts: AtomicU64,
    transport: AtomicU64,
    bad: AtomicU64,
    dropped: AtomicU64,
    first_error: Mutex<Option<String>>,
    latencies_ms: Mutex<Vec<f64>>,
    /// When the last answer (or failure) came.
    last_done: Mutex<Option<Instant>>,
}

impl Tally {
    fn error(&self, counter: &AtomicU64, msg: impl FnOnce() -> String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut fe = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if fe.is_none() {
            *fe = Some(msg());
        }
    }

    fn done(&self, at: Instant) {
        let mut l = self.last_done.lock().unwrap_or_else(|e| e.into_inner());
        if l.is_none_or(|t| at > t) {
            *l = Some(at);
        }
    }
}

/// Sends one request on `conn` (connecting first if needed) and tallies it.
/// `since` is when the request counts as issued (its scheduled arrival in the
/// open loop). Returns the connection if it can be reused.
async fn one_request(
    target: &Target,
    conn: Option<Conn>,
    req: &Prepared,
    timeout: Duration,
    since: Instant,
    tally: &Tally,
    local_lat: &mut Vec<f64>,
) -> Option<Conn> {
    let fut = async {
        let mut c = match conn {
            Some(c) => c,
            None => Conn::connect(target.addr).await?,
        };
        let r = c.request(&req.head, &req.body).await?;
        Ok::<_, std::io::Error>((c, r))
    };
    let res = tokio::time::timeout(timeout, fut).await;
    let now = Instant::now();
    tally.done(now);
    match res {
        Err(_) => {
            tally.error(&tally.timeouts, || {
                format!("no answer within {} ms", timeout.as_millis())
            });
            None
        }
        Ok(Err(e)) => {
            tally.error(&tally.transport, || format!("transport: {e}"));
            None
        }
        Ok(Ok((c, r))) => {
            let reuse = (!r.close).then_some(c);
            match r.status {
                200..=299 if valid_infer_response(&r) => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    local_lat.push(now.duration_since(since).as_secs_f64() * 1e3);
                }
                200..=299 => tally.error(&tally.bad, || {
                    format!(
                        "HTTP {} with a body that is not an inference response",
                        r.status
                    )
                }),
                status => {
                    let counter = match status {
                        429 => &tally.r429,
                        400..=499 => &tally.c4xx,
                        500..=599 => &tally.s5xx,
                        _ => &tally.bad,
                    };
                    tally.error(counter, || {
                        let body =
                            String::from_utf8_lossy(&r.body[..r.body.len().min(300)]).into_owned();
                        format!("HTTP {status}: {body}")
                    })
                }
            }
            reuse
        }
    }
}

/// Runs the load described by `cfg` on the current tokio runtime.
pub async fn run(cfg: &LoadConfig) -> Result<LoadReport, LoadError> {
    if cfg.model.is_empty() {
        return Err(LoadError::Usage("a model name is required".into()));
    }
    if cfg.batch_size == 0 {
        return Err(LoadError::Usage("the batch size must be at least 1".into()));
    }
    if cfg.duration.is_zero() {
        return Err(LoadError::Usage("the duration must be above 0".into()));
    }
    if cfg.max_requests == Some(0) {
        return Err(LoadError::Usage("max requests must be at least 1".into()));
    }
    match cfg.rate {
        Some(r) if !(r.is_finite() && r > 0.0 && r <= 1e6) => {
            return Err(LoadError::Usage(format!(
                "the rate must be above 0 and at most 1e6 req/s, got {r}"
            )))
        }
        Some(_) if cfg.max_in_flight == 0 => {
            return Err(LoadError::Usage("max in flight must be at least 1".into()))
        }
        None if cfg.concurrency == 0 || cfg.concurrency > 4096 => {
            return Err(LoadError::Usage(format!(
                "the concurrency must be between 1 and 4096, got {}",
                cfg.concurrency
            )))
        }
        _ => {}
    }
    let target = Arc::new(parse_target(&cfg.server).await?);
    let model_path = match &cfg.model_version {
        Some(v) => format!("/v2/models/{}/versions/{v}", cfg.model),
        None => format!("/v2/models/{}", cfg.model),
    };
    let probe_timeout = cfg.request_timeout.min(Duration::from_secs(10));
    let (status, ready) = get_json(&target, &format!("{model_path}/ready"), probe_timeout).await?;
    if status != 200 {
        let why = ready
            .get("error")
            .and_then(Value::as_str)
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(LoadError::Server(format!(
            "model '{}' is not ready on {} (HTTP {status}{why})",
            cfg.model, cfg.server
        )));
    }
    let (status, meta) = get_json(&target, &model_path, probe_timeout).await?;
    if status != 200 {
        return Err(LoadError::Server(format!(
            "GET {model_path}: HTTP {status}: {meta}"
        )));
    }
    let specs = input_specs(&meta, cfg)?;
    let infer_path = format!("{model_path}/infer");
    let mut rng = Rng(cfg.seed ^ 0x6b69_6c6e);
    let n_bodies = match cfg.rate {
        Some(_) => 4,
        None => cfg.concurrency.min(4),
    };
    let bodies: Arc<Vec<Prepared>> = Arc::new(
        (0..n_bodies)
            .map(|_| build_request(&target, &infer_path, &specs, cfg.format, &mut rng))
            .collect(),
    );

    let tally = Arc::new(Tally::default());
    let budget = Arc::new(AtomicU64::new(cfg.max_requests.unwrap_or(u64::MAX)));
    // Claims one request from the count budget.
    let claim = |b: &AtomicU64| {
        b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    };
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let timeout = cfg.request_timeout;

    match cfg.rate {
        None => {
            let mut tasks = Vec::with_capacity(cfg.concurrency);
            for k in 0..cfg.concurrency {
                let (target, bodies, tally, budget) = (
                    target.clone(),
                    bodies.clone(),
                    tally.clone(),
                    budget.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let req = &bodies[k % bodies.len()];
                    let mut conn: Option<Conn> = None;
                    let mut lat = Vec::new();
                    while Instant::now() < deadline && claim(&budget) {
                        tally.sent.fetch_add(1, Ordering::Relaxed);
                        let had_conn = conn.is_some();
                        let t0 = Instant::now();
                        conn = one_request(&target, conn, req, timeout, t0, &tally, &mut lat).await;
                        if conn.is_none() && !had_conn {
                            // Could not even connect or the server closes every
                            // connection: do not spin.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    tally
                        .latencies_ms
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(lat);
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        Some(rate) => {
            let pool: Arc<Mutex<Vec<Conn>>> = Arc::new(Mutex::new(Vec::new()));
            let in_flight = Arc::new(AtomicUsize::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            let mut next = start;
            let mut k = 0usize;
            loop {
                // Exponential gaps: a Poisson process at `rate`.
                let gap = -(1.0 - rng.unit()).ln() / rate;
                next += Duration::from_secs_f64(gap);
                if next >= deadline || !claim(&budget) {
                    break;
                }
                tokio::time::sleep_until(next.into()).await;
                // Reap finished tasks so the set stays small.
                while tasks.try_join_next().is_some() {}
                if in_flight.load(Ordering::Relaxed) >= cfg.max_in_flight {
                    tally.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                tally.sent.fetch_add(1, Ordering::Relaxed);
                in_flight.fetch_add(1, Ordering::Relaxed);
                let (target, bodies, tally, pool, in_flight) = (
                    target.clone(),
                    bodies.clone(),
                    tally.clone(),
                    pool.clone(),
                    in_flight.clone(),
                );
                let idx = k % bodies.len();
                k += 1;
                let since = next;
                tasks.spawn(async move {
                    let conn = pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let mut lat = Vec::with_capacity(1);
                    let back = one_request(
                        &target,
                        conn,
                        &bodies[idx],
                        timeout,
                        since,
                        &tally,
                        &mut lat,
                    )
                    .await;
                    if let Some(c) = back {
                        pool.lock().unwrap_or_else(|e| e.into_inner()).push(c);
                    }
                    tally
                        .latencies_ms
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(lat);
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
            while tasks.join_next().await.is_some() {}
        }
    }

    let end = tally
        .last_done
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or_else(Instant::now);
    let elapsed = end.duration_since(start).as_secs_f64().max(1e-9);
    let lat = std::mem::take(&mut *tally.latencies_ms.lock().unwrap_or_else(|e| e.into_inner()));
    let ok = tally.ok.load(Ordering::Relaxed);
    let throughput = ok as f64 / elapsed;
    let first_error = tally
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(LoadReport {
        server: cfg.server.clone(),
        model: cfg.model.clone(),
        mode: if cfg.rate.is_some() {
            "poisson"
        } else {
            "closed"
        },
        concurrency: if cfg.rate.is_some() {
            cfg.max_in_flight
        } else {
            cfg.concurrency
        },
        rate: cfg.rate,
        batch_size: cfg.batch_size,
        tensor_format: cfg.format.name(),
        shapes: specs
            .iter()
            .map(|s| (s.name.clone(), s.shape.clone()))
            .collect(),
        duration_s: cfg.duration.as_secs_f64(),
        elapsed_s: elapsed,
        sent: tally.sent.load(Ordering::Relaxed),
        ok,
        rejected_429: tally.r429.load(Ordering::Relaxed),
        client_4xx: tally.c4xx.load(Ordering::Relaxed),
        server_5xx: tally.s5xx.load(Ordering::Relaxed),
        timeouts: tally.timeouts.load(Ordering::Relaxed),
        transport_errors: tally.transport.load(Ordering::Relaxed),
        bad_responses: tally.bad.load(Ordering::Relaxed),
        dropped: tally.dropped.load(Ordering::Relaxed),
        throughput_per_s: throughput,
        inferences_per_s: throughput * cfg.batch_size as f64,
        latency_ms: Latency::from_ms(lat),
        first_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = Latency::from_ms((1..=100).rev().map(|v| v as f64).collect());
        assert_eq!(
            (l.min, l.p50, l.p90, l.p99, l.max),
            (1.0, 50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(l.mean, 50.5);
        let one = Latency::from_ms(vec![3.0]);
        assert_eq!((one.p50, one.p99, one.max), (3.0, 3.0, 3.0));
        assert_eq!(Latency::from_ms(vec![]), Latency::default());
    }

    #[test]
    fn shape_overrides_parse() {
        assert_eq!(
            parse_shape_override("x=1,3, 224,224").unwrap(),
            ("x".to_string(), vec![1, 3, 224, 224])
        );
        assert_eq!(
            parse_shape_override("s=").unwrap(),
            ("s".to_string(), vec![])
        );
        for bad in ["x", "=1,2", "x=1,-2", "x=1,,2", "x=a"] {
            assert!(parse_shape_override(bad).is_err(), "{bad}");
        }
    }

    fn spec(name: &str, dt: &str, shape: Value) -> Value {
        json!({ "name": name, "datatype": dt, "shape": shape })
    }

    #[test]
    fn input_shapes_come_from_metadata_batch_size_and_overrides() {
        let meta = json!({ "inputs": [
            spec("a", "FP32", json!([-1, 3, -1])),
            spec("b", "INT64", json!([-1])),
        ]});
        let mut cfg = LoadConfig::new("http://127.0.0.1:1", "m", Duration::from_secs(1));
        cfg.batch_size = 4;
        let s = input_specs(&meta, &cfg).unwrap();
        assert_eq!(s[0].shape, vec![4, 3, 1]);
        assert_eq!(s[1].shape, vec![4]);
        cfg.shapes = vec![("a".into(), vec![2, 3, 5])];
        assert_eq!(input_specs(&meta, &cfg).unwrap()[0].shape, vec![2, 3, 5]);
        cfg.shapes = vec![("nope".into(), vec![1])];
        assert!(matches!(input_specs(&meta, &cfg), Err(LoadError::Usage(_))));
        // A fixed dim 0 cannot take another batch size.
        let fixed = json!({ "inputs": [spec("a", "FP32", json!([1, 3]))] });
        cfg.shapes.clear();
        assert!(matches!(
            input_specs(&fixed, &cfg),
            Err(LoadError::Usage(_))
        ));
        cfg.batch_size = 1;
        assert_eq!(input_specs(&fixed, &cfg).unwrap()[0].shape, vec![1, 3]);
        let strings = json!({ "inputs": [spec("t", "BYTES", json!([1]))] });
        assert!(input_specs(&strings, &cfg).is_err());
    }

    #[test]
    fn request_bodies_frame_binary_and_json_tensors() {
        let t = Target {
            addr: "127.0.0.1:1".parse().unwrap(),
            host_header: "127.0.0.1:1".into(),
            prefix: String::new(),
        };
        let specs = vec![
            InputSpec {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![2, 3],
            },
            InputSpec {
                name: "m".into(),
                datatype: "BOOL".into(),
                shape: vec![2],
            },
        ];
        let p = build_request(
            &t,
            "/v2/models/m/infer",
            &specs,
            TensorFormat::Binary,
            &mut Rng(1),
        );
        let head = String::from_utf8(p.head.clone()).unwrap();
        let hlen: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Inference-Header-Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", p.body.len())));
        let j: Value = serde_json::from_slice(&p.body[..hlen]).unwrap();
        assert_eq!(j["inputs"][0]["parameters"]["binary_data_size"], 24);
        assert_eq!(j["inputs"][1]["parameters"]["binary_data_size"], 2);
        assert_eq!(p.body.len() - hlen, 26);
        let floats: Vec<f32> = p.body[hlen..hlen + 24]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert!(floats.iter().all(|v| (-1.0..1.0).contains(v)), "{floats:?}");
        assert!(p.body[hlen + 24..].iter().all(|&b| b <= 1));

        let p = build_request(
            &t,
            "/v2/models/m/infer",
            &specs,
            TensorFormat::Json,
            &mut Rng(1),
        );
        let j: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(j["inputs"][0]["data"].as_array().unwrap().len(), 6);
        assert!(j["inputs"][1]["data"][0].is_boolean());
        assert_eq!(j["parameters"]["binary_data_output"], false);
    }

    /// Serves the given raw bytes to the first connection, then returns what
    /// the client sent.
    async fn one_shot_server(reply: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(reply).await.unwrap();
            let _ = s.shutdown().await;
        });
        (addr, h)
    }

    #[tokio::test]
    async fn client_reads_chunked_content_length_and_interim_responses() {
        let (addr, h) = one_shot_server(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
        )
        .await;
        let mut c = Conn::connect(addr).await.unwrap();
        let r = c.request(b"GET / HTTP/1.1\r\n\r\n", b"").await.unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), r.close),
            (200, &b"hello world"[..], false)
        );
        h.await.unwrap();

        let (addr, h) = one_shot_server(
            b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 4\r\nConnection: close\r\n\
              inference-header-content-length: 2\r\n\r\nabcdEXTRA",
        )
        .await;
        let mut c = Conn::connect(addr).await.unwrap();
        let r = c.request(b"GET / HTTP/1.1\r\n\r\n", b"").await.unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), r.close, r.header_len),
            (429, &b"abcd"[..], true, Some(2))
        );
        h.await.unwrap();
    }

    #[tokio::test]
    async fn client_rejects_garbage_and_truncation() {
        for reply in [
            &b"SSH-2.0-OpenSSH\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"",
        ] {
            let (addr, h) = one_shot_server(reply).await;
            let mut c = Conn::connect(addr).await.unwrap();
            let r = c.request(b"GET / HTTP/1.1\r\n\r\n", b"").await;
            assert!(r.is_err(), "{:?} parsed", String::from_utf8_lossy(reply));
            h.await.unwrap();
        }
    }

    #[test]
    fn infer_responses_are_checked() {
        let ok = |body: &str, hl: Option<usize>| {
            valid_infer_response(&Response {
                status: 200,
                header_len: hl,
                body: body.as_bytes().to_vec(),
                close: false,
            })
        };
        assert!(ok(r#"{"outputs":[{"name":"y","data":[1]}]}"#, None));
        let head = r#"{"outputs":[{"name":"y","parameters":{"binary_data_size":4}}]}"#;
        assert!(ok(&format!("{head}abcd"), Some(head.len())));
        assert!(!ok(&format!("{head}abc"), Some(head.len())));
        assert!(!ok(r#"{"outputs":[]}"#, None));
        assert!(!ok("not json", None));
        assert!(!ok(r#"{"error":"x"}"#, None));
    }

    #[test]
    fn poisson_gaps_have_the_right_mean() {
        // Exponential gaps at rate 100/s average 10 ms: check the sampler the
        // open loop uses over many draws (seeded, so deterministic).
        let mut rng = Rng(42);
        let n = 20_000;
        let mean: f64 = (0..n)
            .map(|_| -(1.0 - rng.unit()).ln() / 100.0)
            .sum::<f64>()
            / n as f64;
        assert!((mean - 0.01).abs() < 0.0005, "mean gap {mean}");
    }
}
