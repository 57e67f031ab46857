//! REST front end (axum): the Open Inference Protocol v2 HTTP endpoints, the
//! binary tensor data extension, and `GET /metrics`.

use crate::error::{ErrorKind, SResult, ServeError};
use crate::infer::{check_outputs, declared_input, select_outputs};
use crate::protocol::{
    datatype_name, tensor_from_json, tensor_from_raw, tensor_to_json, tensor_to_raw,
};
use crate::repository::ServedModel;
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kiln_ir::Tensor;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;

const HEADER_LEN: &str = "inference-header-content-length";

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/:model", get(model_metadata))
        .route("/v2/models/:model/versions/:version", get(model_metadata_v))
        .route("/v2/models/:model/ready", get(model_ready))
        .route(
            "/v2/models/:model/versions/:version/ready",
            get(model_ready_v),
        )
        .route("/v2/models/:model/infer", post(infer))
        .route("/v2/models/:model/versions/:version/infer", post(infer_v))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            error_response(&ServeError::new(ErrorKind::NotFound, "no such endpoint"))
        })
        .with_state(state)
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ServeError) -> Response {
    let status =
        StatusCode::from_u16(e.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &json!({ "error": e.message }))
}

async fn live() -> Response {
    json_response(StatusCode::OK, &json!({ "live": true }))
}

async fn ready(State(s): State<Arc<AppState>>) -> Response {
    // Ready when serving and every model loaded (a failed model makes the
    // server not ready, so orchestrators notice).
    let ok = !s.shutting_down() && s.repo.all_ready();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &json!({ "ready": ok }))
}

async fn server_metadata() -> Response {
    json_response(StatusCode::OK, &crate::server_metadata_json())
}

fn model_metadata_value(m: &ServedModel) -> Value {
    let t = |v: Vec<crate::repository::TensorMeta>| -> Value {
        v.into_iter()
            .map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape }))
            .collect()
    };
    let mut v = json!({
        "name": m.name,
        "versions": [m.version],
        "platform": "onnx",
        "inputs": t(m.inputs()),
        "outputs": t(m.outputs()),
    });
    if !m.ready() {
        // Not in the protocol's schema; extra fields are allowed and say why
        // the model does not serve (yet).
        v["state"] = json!(m.state_name());
        if let Some(e) = m.load_error() {
            v["error"] = json!(e);
        }
    }
    v
}

fn metadata(s: &AppState, model: &str, version: Option<&str>) -> Response {
    match s.repo.get(model, version) {
        Ok(m) => json_response(StatusCode::OK, &model_metadata_value(m)),
        Err(e) => error_response(&e),
    }
}

async fn model_metadata(State(s): State<Arc<AppState>>, Path(model): Path<String>) -> Response {
    metadata(&s, &model, None)
}

async fn model_metadata_v(
    State(s): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    metadata(&s, &model, Some(&version))
}

fn readiness(s: &AppState, model: &str, version: Option<&str>) -> Response {
    match s.repo.get(model, version) {
        Ok(m) if m.ready() && !s.shutting_down() => {
            json_response(StatusCode::OK, &json!({ "name": m.name, "ready": true }))
        }
        Ok(m) => {
            let mut v = json!({ "name": m.name, "ready": false, "state": m.state_name() });
            if let Some(e) = m.load_error() {
                v["error"] = json!(e);
            }
            json_response(StatusCode::SERVICE_UNAVAILABLE, &v)
        }
        Err(e) => error_response(&e),
    }
}

async fn model_ready(State(s): State<Arc<AppState>>, Path(model): Path<String>) -> Response {
    readiness(&s, &model, None)
}

async fn model_ready_v(
    State(s): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    readiness(&s, &model, Some(&version))
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let text = s.repo.metrics.render(&s.repo.gauges());
    let mut r = (StatusCode::OK, text).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

#[derive(Deserialize)]
struct InferRequestJson {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Option<Vec<OutputJson>>,
}

#[derive(Deserialize)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

struct Decoded {
    id: Option<Value>,
    inputs: Vec<(String, Tensor)>,
    /// Requested outputs with their "binary" choice; empty: all outputs.
    requested: Vec<(String, Option<bool>)>,
    binary_default: bool,
}

fn param_bool(p: &Option<Map<String, Value>>, key: &str) -> SResult<Option<bool>> {
    match p.as_ref().and_then(|m| m.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ServeError::bad(format!(
            "parameter '{key}' must be a boolean, got {v}"
        ))),
    }
}

fn reject_unsupported(p: &Option<Map<String, Value>>) -> SResult<()> {
    if let Some(m) = p {
        for key in ["shared_memory_region", "classification"] {
            if m.contains_key(key) {
                return Err(ServeError::bad(format!(
                    "parameter '{key}' is not supported"
                )));
            }
        }
    }
    Ok(())
}

fn decode(model: &ServedModel, body: &[u8], header_len: Option<usize>) -> SResult<Decoded> {
    let (json_part, mut binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(ServeError::bad(format!(
                "Inference-Header-Content-Length is {n} but the body has {} bytes",
                body.len()
            )))
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let req: InferRequestJson = serde_json::from_slice(json_part)
        .map_err(|e| ServeError::bad(format!("malformed inference request: {e}")))?;
    reject_unsupported(&req.parameters)?;
    let binary_default = param_bool(&req.parameters, "binary_data_output")?.unwrap_or(false);
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for inp in &req.inputs {
        reject_unsupported(&inp.parameters)?;
        let (dtype, dims, numel) = declared_input(model, &inp.name, &inp.datatype, &inp.shape)?;
        let bin_size = match inp
            .parameters
            .as_ref()
            .and_then(|m| m.get("binary_data_size"))
        {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                ServeError::bad(format!(
                    "input '{}': binary_data_size must be a non-negative integer",
                    inp.name
                ))
            })? as usize),
        };
        let tensor = match (bin_size, &inp.data) {
            (Some(_), Some(_)) => {
                return Err(ServeError::bad(format!(
                    "input '{}' has both 'data' and binary_data_size",
                    inp.name
                )))
            }
            (Some(n), None) => {
                if n > binary.len() {
                    return Err(ServeError::bad(format!(
                        "input '{}': binary_data_size {n} but only {} binary bytes remain",
                        inp.name,
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(n);
                binary = rest;
                tensor_from_raw(&inp.name, dtype, dims, numel, mine)?
            }
            (None, Some(d)) => tensor_from_json(&inp.name, dtype, dims, numel, d)?,
            (None, None) => {
                return Err(ServeError::bad(format!("input '{}' has no data", inp.name)))
            }
        };
        inputs.push((inp.name.clone(), tensor));
    }
    if !binary.is_empty() {
        return Err(ServeError::bad(format!(
            "{} bytes of binary data are not claimed by any input",
            binary.len()
        )));
    }
    let mut requested = Vec::new();
    for o in req.outputs.iter().flatten() {
        reject_unsupported(&o.parameters)?;
        requested.push((o.name.clone(), param_bool(&o.parameters, "binary_data")?));
    }
    check_outputs(model, requested.iter().map(|(n, _)| n.as_str()))?;
    Ok(Decoded {
        id: req.id,
        inputs,
        requested,
        binary_default,
    })
}

fn encode(model: &ServedModel, d: &Decoded, outs: Vec<(String, Tensor)>) -> SResult<Response> {
    let names: Vec<String> = d.requested.iter().map(|(n, _)| n.clone()).collect();
    let outs = select_outputs(outs, &names);
    let mut binary: Vec<u8> = Vec::new();
    let mut out_json = Vec::with_capacity(outs.len());
    for (name, t) in &outs {
        let want_binary = d
            .requested
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, b)| *b)
            .unwrap_or(d.binary_default);
        let mut o = json!({
            "name": name,
            "datatype": datatype_name(t.dtype()),
            "shape": t.shape(),
        });
        if want_binary {
            let raw = tensor_to_raw(t)?;
            o["parameters"] = json!({ "binary_data_size": raw.len() });
            binary.extend_from_slice(&raw);
        } else {
            o["data"] = tensor_to_json(t)?;
        }
        out_json.push(o);
    }
    let mut v = json!({
        "model_name": model.name,
        "model_version": model.version,
        "outputs": out_json,
    });
    if let Some(id) = &d.id {
        v["id"] = id.clone();
    }
    let header_bytes = v.to_string().into_bytes();
    if binary.is_empty() {
        let mut r = (StatusCode::OK, header_bytes).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Ok(r);
    }
    let hlen = header_bytes.len();
    let mut body = header_bytes;
    body.extend_from_slice(&binary);
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(HEADER_LEN, HeaderValue::from(hlen));
    Ok(r)
}

async fn infer(
    State(s): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_infer(s, model, None, headers, body).await
}

async fn infer_v(
    State(s): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_infer(s, model, Some(version), headers, body).await
}

async fn run_infer(
    s: Arc<AppState>,
    model: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let idx = match s.repo.get(&model, version.as_deref()) {
        Ok(m) => s
            .repo
            .models
            .iter()
            .position(|x| std::ptr::eq(x, m))
            .unwrap_or(0),
        Err(e) => {
            s.repo.metrics.request("", e.kind.label(), None);
            return error_response(&e);
        }
    };
    let result = infer_inner(&s, idx, headers, body).await;
    let m = &s.repo.models[idx];
    match result {
        Ok(r) => {
            s.repo
                .metrics
                .request(&m.name, "success", Some(start.elapsed().as_secs_f64()));
            r
        }
        Err(e) => {
            s.repo.metrics.request(&m.name, e.kind.label(), None);
            if e.kind == ErrorKind::Internal {
                tracing::error!(model = %m.name, error = %e.message, "inference failed");
            } else {
                tracing::debug!(model = %m.name, status = e.kind.http_status(), error = %e.message, "request refused");
            }
            error_response(&e)
        }
    }
}

async fn read_body(s: &AppState, headers: &HeaderMap, body: Body) -> SResult<Bytes> {
    let limit = s.max_body_bytes;
    let too_large = || {
        ServeError::new(
            ErrorKind::TooLarge,
            format!("request body exceeds the limit of {limit} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = src {
            if err
                .to_string()
                .to_ascii_lowercase()
                .contains("length limit")
            {
                return too_large();
            }
            src = err.source();
        }
        ServeError::bad(format!("could not read the request body: {e}"))
    })
}

async fn infer_inner(
    s: &Arc<AppState>,
    idx: usize,
    headers: HeaderMap,
    body: Body,
) -> SResult<Response> {
    let m = &s.repo.models[idx];
    m.session()?;
    if let Some(enc) = headers.get(header::CONTENT_ENCODING) {
        if enc.as_bytes() != b"identity" {
            return Err(ServeError::bad(
                "compressed request bodies are not supported",
            ));
        }
    }
    let header_len = match headers.get(HEADER_LEN) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ServeError::bad("Inference-Header-Content-Length is not a number")
                })?,
        ),
    };
    let body = read_body(s, &headers, body).await?;
    // Decoding large tensors is real CPU work: keep it off the reactor threads.
    let st = s.clone();
    let decoded =
        tokio::task::spawn_blocking(move || decode(&st.repo.models[idx], &body, header_len))
            .await
            .map_err(|_| ServeError::internal("request decoding failed"))??;
    let mut decoded = decoded;
    let inputs = std::mem::take(&mut decoded.inputs);
    let outs = m.infer(inputs).await?;
    let st = s.clone();
    tokio::task::spawn_blocking(move || encode(&st.repo.models[idx], &decoded, outs))
        .await
        .map_err(|_| ServeError::internal("response encoding failed"))?
}
