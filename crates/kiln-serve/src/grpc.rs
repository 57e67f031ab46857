//! gRPC front end (tonic): `inference.GRPCInferenceService`.

use crate::error::{ErrorKind, SResult, ServeError};
use crate::infer::{check_outputs, declared_input, select_outputs};
use crate::proto::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::infer_parameter::ParameterChoice;
use crate::proto::*;
use crate::protocol::{datatype_name, tensor_from_raw, tensor_to_raw};
use crate::repository::ServedModel;
use crate::AppState;
use half::{bf16, f16};
use kiln_ir::{DType, Tensor, TensorData};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

pub struct Grpc {
    pub state: Arc<AppState>,
}

fn reject_unsupported(p: &HashMap<String, InferParameter>) -> SResult<()> {
    for key in ["shared_memory_region", "classification"] {
        if p.contains_key(key) {
            return Err(ServeError::bad(format!(
                "parameter '{key}' is not supported"
            )));
        }
    }
    Ok(())
}

/// Builds a tensor from typed `contents` (narrowing checked).
fn from_contents(
    name: &str,
    dtype: DType,
    dims: Vec<usize>,
    numel: usize,
    c: &InferTensorContents,
) -> SResult<Tensor> {
    fn narrow<S: Copy, T: TryFrom<S>>(name: &str, v: &[S]) -> SResult<Vec<T>> {
        v.iter()
            .map(|&x| {
                T::try_from(x)
                    .map_err(|_| ServeError::bad(format!("input '{name}': value out of range")))
            })
            .collect()
    }
    let data = match dtype {
        DType::F32 => TensorData::F32(c.fp32_contents.clone()),
        DType::F64 => TensorData::F64(c.fp64_contents.clone()),
        DType::F16 => TensorData::F16(c.fp32_contents.iter().map(|&x| f16::from_f32(x)).collect()),
        DType::BF16 => {
            TensorData::BF16(c.fp32_contents.iter().map(|&x| bf16::from_f32(x)).collect())
        }
        DType::I8 => TensorData::I8(narrow(name, &c.int_contents)?),
        DType::I16 => TensorData::I16(narrow(name, &c.int_contents)?),
        DType::I32 => TensorData::I32(c.int_contents.clone()),
        DType::I64 => TensorData::I64(c.int64_contents.clone()),
        DType::U8 => TensorData::U8(narrow(name, &c.uint_contents)?),
        DType::U16 => TensorData::U16(narrow(name, &c.uint_contents)?),
        DType::U32 => TensorData::U32(c.uint_contents.clone()),
        DType::U64 => TensorData::U64(c.uint64_contents.clone()),
        DType::Bool => TensorData::Bool(c.bool_contents.clone()),
        DType::String => TensorData::String(
            c.bytes_contents
                .iter()
                .map(|b| {
                    String::from_utf8(b.clone()).map_err(|_| {
                        ServeError::bad(format!("input '{name}': BYTES element is not UTF-8"))
                    })
                })
                .collect::<SResult<_>>()?,
        ),
        #[allow(unreachable_patterns)]
        _ => {
            return Err(ServeError::bad(format!(
                "input '{name}': element type {dtype} is not supported by the protocol"
            )))
        }
    };
    if data.len() != numel {
        return Err(ServeError::bad(format!(
            "input '{name}': shape {dims:?} needs {numel} elements but contents hold {}",
            data.len()
        )));
    }
    Tensor::new(dims, data).map_err(|e| ServeError::bad(e.to_string()))
}

fn decode(model: &ServedModel, req: &ModelInferRequest) -> SResult<Vec<(String, Tensor)>> {
    reject_unsupported(&req.parameters)?;
    let raw = !req.raw_input_contents.is_empty();
    if raw && req.raw_input_contents.len() != req.inputs.len() {
        return Err(ServeError::bad(format!(
            "{} inputs but {} raw_input_contents",
            req.inputs.len(),
            req.raw_input_contents.len()
        )));
    }
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for (i, inp) in req.inputs.iter().enumerate() {
        reject_unsupported(&inp.parameters)?;
        let (dtype, dims, numel) = declared_input(model, &inp.name, &inp.datatype, &inp.shape)?;
        let t = if raw {
            if inp.contents.is_some() {
                return Err(ServeError::bad(format!(
                    "input '{}' has both contents and raw_input_contents",
                    inp.name
                )));
            }
            tensor_from_raw(&inp.name, dtype, dims, numel, &req.raw_input_contents[i])?
        } else {
            let c = inp
                .contents
                .as_ref()
                .ok_or_else(|| ServeError::bad(format!("input '{}' has no data", inp.name)))?;
            from_contents(&inp.name, dtype, dims, numel, c)?
        };
        inputs.push((inp.name.clone(), t));
    }
    Ok(inputs)
}

impl Grpc {
    fn model(&self, name: &str, version: &str) -> SResult<(usize, &ServedModel)> {
        let m = self.state.repo.get(name, Some(version))?;
        let idx = self
            .state
            .repo
            .models
            .iter()
            .position(|x| std::ptr::eq(x, m))
            .unwrap_or(0);
        Ok((idx, m))
    }

    async fn infer_inner(&self, idx: usize, req: ModelInferRequest) -> SResult<ModelInferResponse> {
        let m = &self.state.repo.models[idx];
        m.session()?;
        for o in &req.outputs {
            reject_unsupported(&o.parameters)?;
        }
        check_outputs(m, req.outputs.iter().map(|o| o.name.as_str()))?;
        let requested: Vec<String> = req.outputs.iter().map(|o| o.name.clone()).collect();
        let st = self.state.clone();
        let (req, inputs) = tokio::task::spawn_blocking(move || {
            let r = decode(&st.repo.models[idx], &req);
            (req, r)
        })
        .await
        .map_err(|_| ServeError::internal("request decoding failed"))?;
        let inputs = inputs?;
        let outs = m.infer(inputs).await?;
        let outs = select_outputs(outs, &requested);
        let (model_name, model_version) = (m.name.clone(), m.version.clone());
        let resp = tokio::task::spawn_blocking(move || -> SResult<ModelInferResponse> {
            let mut resp = ModelInferResponse {
                model_name,
                model_version,
                id: req.id,
                ..Default::default()
            };
            for (name, t) in outs {
                resp.outputs.push(model_infer_response::InferOutputTensor {
                    name,
                    datatype: datatype_name(t.dtype()).to_string(),
                    shape: t.shape().iter().map(|&d| d as i64).collect(),
                    ..Default::default()
                });
                resp.raw_output_contents.push(tensor_to_raw(&t)?);
            }
            Ok(resp)
        })
        .await
        .map_err(|_| ServeError::internal("response encoding failed"))?;
        resp
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Grpc {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: !self.state.shutting_down() && self.state.repo.all_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = req.into_inner();
        let (_, m) = self.model(&r.name, &r.version)?;
        Ok(Response::new(ModelReadyResponse {
            ready: m.ready() && !self.state.shutting_down(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "kiln".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: crate::EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let (_, m) = self.model(&r.name, &r.version)?;
        let t = |v: Vec<crate::repository::TensorMeta>| {
            v.into_iter()
                .map(|t| model_metadata_response::TensorMetadata {
                    name: t.name,
                    datatype: t.datatype.to_string(),
                    shape: t.shape,
                })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: m.name.clone(),
            versions: vec![m.version.clone()],
            platform: "onnx".into(),
            inputs: t(m.inputs()),
            outputs: t(m.outputs()),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        let metrics = &self.state.repo.metrics;
        let idx = match self.model(&req.model_name, &req.model_version) {
            Ok((idx, _)) => idx,
            Err(e) => {
                metrics.request("", e.kind.label(), None);
                return Err(e.into());
            }
        };
        let name = self.state.repo.models[idx].name.clone();
        match self.infer_inner(idx, req).await {
            Ok(r) => {
                metrics.request(&name, "success", Some(start.elapsed().as_secs_f64()));
                Ok(Response::new(r))
            }
            Err(e) => {
                metrics.request(&name, e.kind.label(), None);
                if e.kind == ErrorKind::Internal {
                    tracing::error!(model = %name, error = %e.message, "inference failed");
                }
                Err(e.into())
            }
        }
    }
}

// Silence the unused warning for the parameter oneof import on some builds.
#[allow(dead_code)]
fn _param_kinds(p: &ParameterChoice) -> bool {
    matches!(p, ParameterChoice::BoolParam(_))
}
