//! kiln's inference server: the KServe Open Inference Protocol v2 (what Triton
//! speaks) over HTTP/REST (axum) and gRPC (tonic), with per-model dynamic
//! batching on a dedicated compute thread pool, bounded queues, per-request
//! timeouts, Prometheus metrics and graceful shutdown.

pub mod config;
pub mod error;
mod grpc;
mod http;
mod infer;
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

/// Loads the models and serves until SIGTERM/SIGINT; then stops accepting,
/// finishes the requests in flight, and returns.
pub fn serve(cfg: ServeConfig) -> Result<(), String> {
    let metrics = Arc::new(metrics::Metrics::default());
    let repo = Repository::load(&cfg, metrics)?;
    let state = Arc::new(AppState {
        repo,
        max_body_bytes: cfg.max_body_bytes,
        shutting_down: AtomicBool::new(false),
    });
    // The reactor only does I/O and protocol work; inference runs on the
    // compute pool, so two reactor threads are plenty.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kiln-io")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(run(cfg, state))
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

async fn run(cfg: ServeConfig, state: Arc<AppState>) -> Result<(), String> {
    let http_addr = SocketAddr::new(cfg.host, cfg.http_port);
    let listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .map_err(|e| format!("cannot listen on {http_addr}: {e}"))?;
    let http_addr = listener.local_addr().unwrap_or(http_addr);
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

    let mut grpc_addr = None;
    let grpc_task = match cfg.grpc_port {
        Some(port) => {
            let addr = SocketAddr::new(cfg.host, port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let addr = listener.local_addr().unwrap_or(addr);
            grpc_addr = Some(addr);
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
    // Machine-readable line for scripts waiting on startup.
    eprintln!(
        "kiln serve: listening http={http_addr} grpc={}",
        grpc_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "off".into())
    );

    shutdown_signal().await;
    tracing::info!("shutdown signal: no new connections; finishing requests in flight");
    state.shutting_down.store(true, Ordering::Relaxed);
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
}
