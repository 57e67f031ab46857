//! The load generator against a real in-process server (tiny_cnn on an
//! ephemeral port): closed and open loop stay in their bounds with no errors,
//! a tiny queue limit turns overload into counted 429s, and model states
//! (ready / failed with its error) show over HTTP.

use kiln_serve::loadgen::{self, LoadConfig, LoadError, TensorFormat};
use kiln_serve::{ModelConfig, RunningServer, ServeConfig};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn tiny_cnn() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny_cnn.onnx")
}

/// A server on ephemeral ports, on a runtime of its own; dropping the runtime
/// ends it.
struct TestServer {
    url: String,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<RunningServer>,
}

impl TestServer {
    fn start(path: PathBuf, model: ModelConfig) -> TestServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let cfg = ServeConfig {
            path,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            http_port: 0,
            grpc_port: None,
            threads: 2,
            max_body_bytes: 16 << 20,
            model_defaults: model,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt
            .block_on(kiln_serve::start(cfg, async {
                let _ = rx.await;
            }))
            .expect("server starts");
        let url = format!("http://{}", server.http_addr);
        let s = TestServer {
            url,
            rt,
            stop: Some(tx),
            server: Some(server),
        };
        s.wait_settled();
        s
    }

    /// Waits until no model is loading any more (loading runs on its own thread).
    fn wait_settled(&self) {
        let state = &self.server.as_ref().expect("running").state;
        let until = Instant::now() + Duration::from_secs(60);
        while !state.repo.all_settled() {
            assert!(Instant::now() < until, "models did not load within 60 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// GET on a fresh connection: (status, body).
    fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let addr = self.server.as_ref().expect("running").http_addr;
        http_get(addr, path)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), s.wait()).await });
        }
    }
}

/// A plain blocking HTTP/1.0 GET (independent of the load generator's client).
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn load(url: &str, duration_s: f64) -> LoadConfig {
    let mut c = LoadConfig::new(url, "tiny_cnn", Duration::from_secs_f64(duration_s));
    c.request_timeout = Duration::from_secs(10);
    c
}

fn assert_no_errors(r: &loadgen::LoadReport) {
    assert_eq!(r.failed(), 0, "errors: {}", r.summary());
    assert_eq!(r.ok, r.sent, "{}", r.summary());
    assert!(r.ok > 0, "{}", r.summary());
    assert!(r.latency_ms.p50 > 0.0 && r.latency_ms.p50 <= r.latency_ms.p99);
    assert!(r.latency_ms.p99 <= r.latency_ms.max);
}

#[test]
fn closed_loop_runs_for_its_duration_without_errors() {
    let s = TestServer::start(tiny_cnn(), ModelConfig::default());
    let mut c = load(&s.url, 1.0);
    c.concurrency = 4;
    let t0 = Instant::now();
    let r = loadgen::run_blocking(&c).expect("load runs");
    let wall = t0.elapsed().as_secs_f64();
    assert_no_errors(&r);
    assert_eq!(r.mode, "closed");
    assert_eq!(r.shapes, vec![("image".to_string(), vec![1, 3, 64, 64])]);
    // Bounded: nothing new after the duration; in-flight requests finish
    // within their own time limit.
    assert!(
        wall < 1.0 + 10.0 + 1.0,
        "ran {wall} s, more than duration + request timeout"
    );
    let j = r.to_json();
    assert_eq!(j["ok"], r.ok);
    assert_eq!(j["errors"]["http_429"], 0);
    assert!(j["latency_ms"]["p99"].as_f64().is_some());
}

#[test]
fn max_requests_bounds_the_count_exactly() {
    let s = TestServer::start(tiny_cnn(), ModelConfig::default());
    let mut c = load(&s.url, 600.0);
    c.concurrency = 3;
    c.max_requests = Some(25);
    let r = loadgen::run_blocking(&c).expect("load runs");
    assert_no_errors(&r);
    assert_eq!(r.sent, 25);
}

#[test]
fn json_tensors_work_too() {
    let s = TestServer::start(tiny_cnn(), ModelConfig::default());
    let mut c = load(&s.url, 600.0);
    c.max_requests = Some(5);
    c.format = TensorFormat::Json;
    let r = loadgen::run_blocking(&c).expect("load runs");
    assert_no_errors(&r);
    assert_eq!(r.sent, 5);
    assert_eq!(r.tensor_format, "json");
}

#[test]
fn poisson_arrivals_stay_in_bounds_without_errors() {
    let s = TestServer::start(tiny_cnn(), ModelConfig::default());
    let mut c = load(&s.url, 1.0);
    c.rate = Some(40.0);
    c.max_in_flight = 64;
    c.seed = 7;
    let t0 = Instant::now();
    let r = loadgen::run_blocking(&c).expect("load runs");
    let wall = t0.elapsed().as_secs_f64();
    assert_no_errors(&r);
    assert_eq!(r.mode, "poisson");
    assert_eq!(r.dropped, 0);
    assert!(wall < 1.0 + 10.0 + 1.0, "ran {wall} s");
    // A request count cap ends the open loop too.
    c.duration = Duration::from_secs(600);
    c.max_requests = Some(12);
    c.rate = Some(200.0);
    let r = loadgen::run_blocking(&c).expect("load runs");
    assert_no_errors(&r);
    assert_eq!(r.sent + r.dropped, 12);
}

#[test]
fn overload_with_a_tiny_queue_is_counted_as_429s() {
    let model = ModelConfig {
        max_queue_size: 1,
        max_concurrency: 1,
        ..ModelConfig::default()
    };
    let s = TestServer::start(tiny_cnn(), model);
    let mut c = load(&s.url, 1.5);
    c.concurrency = 16;
    let r = loadgen::run_blocking(&c).expect("load runs");
    assert!(r.rejected_429 > 0, "no 429 under overload: {}", r.summary());
    assert!(r.ok > 0, "{}", r.summary());
    // 429 is the only failure: no 5xx, no dropped connections, no timeouts.
    assert_eq!(r.failed(), r.rejected_429, "{}", r.summary());
    assert_eq!(r.ok + r.rejected_429, r.sent);
    assert!(r.first_error.as_deref().is_some_and(|e| e.contains("429")));
    // Still healthy, and a gentle client gets through with no errors.
    assert_eq!(s.get("/v2/health/ready").0, 200);
    let mut c = load(&s.url, 600.0);
    c.max_requests = Some(5);
    assert_no_errors(&loadgen::run_blocking(&c).expect("load runs"));
}

#[test]
fn a_model_that_fails_to_load_is_unavailable_and_the_others_serve() {
    let dir = std::env::temp_dir().join(format!("kiln-loadgen-repo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("good/1")).expect("mkdir");
    std::fs::create_dir_all(dir.join("broken/1")).expect("mkdir");
    std::fs::copy(tiny_cnn(), dir.join("good/1/model.onnx")).expect("copy");
    std::fs::write(dir.join("broken/1/model.onnx"), b"not a model").expect("write");
    let s = TestServer::start(dir.clone(), ModelConfig::default());

    let (st, v) = s.get("/v2/models/broken");
    assert_eq!(st, 200);
    assert_eq!(v["state"], "UNAVAILABLE");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    let (st, v) = s.get("/v2/models/broken/ready");
    assert_eq!(st, 503);
    assert_eq!(v["state"], "UNAVAILABLE");
    let (st, v) = s.get("/v2/models/good/ready");
    assert_eq!((st, &v["ready"]), (200, &serde_json::json!(true)));
    // The server is live but not ready (one model failed), as Triton does.
    assert_eq!(s.get("/v2/health/live").0, 200);
    assert_eq!(s.get("/v2/health/ready").0, 503);

    let mut c = LoadConfig::new(&s.url, "good", Duration::from_secs(600));
    c.max_requests = Some(5);
    assert_no_errors(&loadgen::run_blocking(&c).expect("load runs"));
    let mut c = LoadConfig::new(&s.url, "broken", Duration::from_secs(1));
    c.max_requests = Some(5);
    match loadgen::run_blocking(&c) {
        Err(LoadError::Server(m)) => assert!(m.contains("not ready"), "{m}"),
        other => panic!("expected a not-ready error, got {other:?}"),
    }
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn models_are_loading_until_loaded() {
    let cfg = ServeConfig {
        path: tiny_cnn(),
        host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        http_port: 0,
        grpc_port: None,
        threads: 1,
        max_body_bytes: 1 << 20,
        model_defaults: ModelConfig::default(),
    };
    let metrics = std::sync::Arc::new(kiln_serve::metrics::Metrics::default());
    let repo = kiln_serve::repository::Repository::discover(&cfg, metrics).expect("discover");
    let m = &repo.models[0];
    assert_eq!(m.state_name(), "LOADING");
    assert!(!m.ready() && !repo.all_settled() && !repo.all_ready());
    let err = m.session().err().expect("not ready while loading");
    assert!(err.message.contains("still loading"), "{}", err.message);
    assert!(m.inputs().is_empty());
    repo.load_models();
    assert_eq!(repo.models[0].state_name(), "READY");
    assert!(repo.all_settled() && repo.all_ready());
}

#[test]
fn non_loopback_servers_are_refused() {
    for url in [
        "http://10.1.2.3:8000",
        "http://192.168.0.1",
        "http://[2001:db8::1]:8000",
    ] {
        let c = LoadConfig::new(url, "m", Duration::from_secs(1));
        match loadgen::run_blocking(&c) {
            Err(e @ LoadError::Usage(_)) => {
                assert!(e.to_string().contains("loopback"), "{url}: {e}")
            }
            other => panic!("{url}: expected a usage error, got {other:?}"),
        }
    }
    for url in [
        "https://127.0.0.1:8000",
        "127.0.0.1:8000",
        "http://:80",
        "http://127.0.0.1:99999",
    ] {
        let c = LoadConfig::new(url, "m", Duration::from_secs(1));
        assert!(
            matches!(loadgen::run_blocking(&c), Err(LoadError::Usage(_))),
            "{url}"
        );
    }
}

#[test]
fn an_unreachable_server_is_an_error_not_a_hang() {
    // Bind then drop: a loopback port with nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port();
    let c = LoadConfig::new(
        format!("http://127.0.0.1:{port}"),
        "m",
        Duration::from_secs(1),
    );
    match loadgen::run_blocking(&c) {
        Err(LoadError::Server(m)) => assert!(m.contains("is the server running"), "{m}"),
        other => panic!("expected a server error, got {other:?}"),
    }
}
