//! kiln's inference server: the KServe Open Inference Protocol v2 (what Triton
//! speaks) over HTTP/REST (axum) and gRPC (tonic), with per-model dynamic
//! batching on a dedicated compute thread pool, bounded queues, per-request
//! timeouts, Prometheus metrics and graceful shutdown.

pub mod config;
pub mod error;
mod grpc;
mod http;
mod infer;
pub mod loadgen;
pub mod metrics;
#[allow(clippy::all)]
mod proto;
pub mod protocol;
pub mod repository;
pub mod scheduler;

pub use config::{ModelConfig, ServeConfig};

use repository::Repository;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// Protocol extensions the server implements.
pub const EXTENSIONS: &[&str] = &["binary_tensor_data"];

pub(crate) fn server_metadata_json() -> serde_json::Value {
    serde_json::json!({
        "name": "kiln",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS,
    })
}

/// What the request handlers share.
pub struct AppState {
    pub repo: Repository,
    pub max_body_bytes: usize,
    shutting_down: AtomicBool,
}

impl AppState {
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// Opens the ports, loads the models (health/live answers at once; each model
/// is LOADING until it is ready or failed) and serves until SIGTERM/SIGINT;
/// then stops accepting, finishes the requests in flight, and returns.
pub fn serve(cfg: ServeConfig) -> Result<(), String> {
    // The reactor only does I/O and protocol work; inference runs on the
    // compute pool, so two reactor threads are plenty.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kiln-io")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(async {
        let server = start(cfg, shutdown_signal()).await?;
        server.wait().await
    })
}

/// A server started by [`start`]: where it listens, and its end.
pub struct RunningServer {
    pub http_addr: SocketAddr,
    pub grpc_addr: Option<SocketAddr>,
    pub state: Arc<AppState>,
    done: tokio::task::JoinHandle<Result<(), String>>,
}

impl RunningServer {
    /// Waits until the server has stopped (after `shutdown` resolved and the
    /// requests in flight were answered).
    pub async fn wait(self) -> Result<(), String> {
        self.done
            .await
            .map_err(|e| format!("server task failed: {e}"))?
    }
}

/// Finds the models, binds the HTTP (and gRPC) ports, starts serving, and
/// loads the models on a thread of their own; returns once the ports are open.
/// The server stops accepting when `shutdown` resolves, then finishes the
/// requests in flight. Must be called inside a multi-threaded tokio runtime.
pub async fn start<F>(cfg: ServeConfig, shutdown: F) -> Result<RunningServer, String>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let metrics = Arc::new(metrics::Metrics::default());
    let repo = Repository::discover(&cfg, metrics)?;
    let state = Arc::new(AppState {
        repo,
        max_body_bytes: cfg.max_body_bytes,
        shutting_down: AtomicBool::new(false),
    });

    let http_addr = SocketAddr::new(cfg.host, cfg.http_port);
    let listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .map_err(|e| format!("cannot listen on {http_addr}: {e}"))?;
    let http_addr = listener.local_addr().unwrap_or(http_addr);
    let grpc_listener = match cfg.grpc_port {
        Some(port) => {
            let addr = SocketAddr::new(cfg.host, port);
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let addr = l.local_addr().unwrap_or(addr);
            Some((l, addr))
        }
        None => None,
    };
    let grpc_addr = grpc_listener.as_ref().map(|(_, a)| *a);

    let (stop_tx, stop_rx) = watch::channel(false);
    let wait_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    let app = http::router(state.clone());
    let http_task = tokio::spawn({
        let rx = stop_rx.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(wait_stop(rx))
                .await
                .map_err(|e| format!("HTTP server failed: {e}"))
        }
    });

    let grpc_task = match grpc_listener {
        Some((listener, addr)) => {
            let incoming =
                tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let svc =
                proto::grpc_inference_service_server::GrpcInferenceServiceServer::new(grpc::Grpc {
                    state: state.clone(),
                })
                .max_decoding_message_size(cfg.max_body_bytes)
                .max_encoding_message_size(usize::MAX);
            let rx = stop_rx.clone();
            tracing::info!(%addr, "gRPC listening");
            Some(tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming_shutdown(incoming, wait_stop(rx))
                    .await
                    .map_err(|e| format!("gRPC server failed: {e}"))
            }))
        }
        None => None,
    };
    tracing::info!(addr = %http_addr, models = state.repo.models.len(), "HTTP listening");
    // Machine-readable line for scripts waiting on startup (the ports answer
    // from now on; readiness tells when the models are loaded).
    eprintln!(
        "kiln serve: listening http={http_addr} grpc={}",
        grpc_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "off".into())
    );

    // Models load on a plain thread: loading is blocking CPU work, and a
    // server told to stop while a model loads must not wait for it.
    {
        let st = state.clone();
        std::thread::Builder::new()
            .name("kiln-loader".into())
            .spawn(move || {
                st.repo.load_models();
                let ready = st.repo.models.iter().filter(|m| m.ready()).count();
                tracing::info!(
                    ready,
                    failed = st.repo.models.len() - ready,
                    "all models loaded"
                );
            })
            .map_err(|e| format!("cannot start the model loader: {e}"))?;
    }

    let st = state.clone();
    let done = tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown signal: no new connections; finishing requests in flight");
        st.shutting_down.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(true);
        let mut result = Ok(());
        match http_task.await {
            Ok(Err(e)) => result = Err(e),
            Err(e) => result = Err(format!("HTTP server task failed: {e}")),
            Ok(Ok(())) => {}
        }
        if let Some(t) = grpc_task {
            match t.await {
                Ok(Err(e)) => result = Err(e),
                Err(e) => result = Err(format!("gRPC server task failed: {e}")),
                Ok(Ok(())) => {}
            }
        }
        tracing::info!("stopped");
        result
    });
    Ok(RunningServer {
        http_addr,
        grpc_addr,
        state,
        done,
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
