//! The model repository: what is served, its state, and input validation.

use crate::config::{ModelConfig, ModelConfigFile, ServeConfig};
use crate::error::{ErrorKind, SResult, ServeError};
use crate::metrics::{Metrics, ModelGauge};
use crate::protocol::{datatype_name, metadata_shape};
use crate::scheduler::{ComputePool, SchedConfig, Scheduler};
use kiln_ir::{Dim, Tensor};
use kiln_runtime::{IoInfo, Session, SessionOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A loaded model's state; a model still loading has none yet.
pub enum ModelState {
    Ready {
        session: Arc<Session>,
        scheduler: Arc<Scheduler>,
        batching: bool,
    },
    Failed(String),
}

pub struct ServedModel {
    pub name: String,
    pub version: String,
    pub path: PathBuf,
    pub config: ModelConfig,
    /// Unset while the model loads; set once, by the loader, to ready or failed.
    state: OnceLock<ModelState>,
}

/// Tensor metadata as the protocol shows it.
pub struct TensorMeta {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

fn meta(io: &IoInfo) -> TensorMeta {
    TensorMeta {
        name: io.name.clone(),
        datatype: datatype_name(io.dtype),
        shape: metadata_shape(io.shape.as_deref()),
    }
}

impl ServedModel {
    /// `None` while the model is still loading.
    pub fn state(&self) -> Option<&ModelState> {
        self.state.get()
    }

    pub fn ready(&self) -> bool {
        matches!(self.state.get(), Some(ModelState::Ready { .. }))
    }

    /// The model's state as the protocol and the metrics show it.
    pub fn state_name(&self) -> &'static str {
        match self.state.get() {
            None => "LOADING",
            Some(ModelState::Ready { .. }) => "READY",
            Some(ModelState::Failed(_)) => "UNAVAILABLE",
        }
    }

    /// Why the model failed to load, if it did.
    pub fn load_error(&self) -> Option<&str> {
        match self.state.get() {
            Some(ModelState::Failed(e)) => Some(e),
            _ => None,
        }
    }

    pub fn inputs(&self) -> Vec<TensorMeta> {
        match self.state.get() {
            Some(ModelState::Ready { session, .. }) => session.inputs().iter().map(meta).collect(),
            _ => vec![],
        }
    }

    pub fn outputs(&self) -> Vec<TensorMeta> {
        match self.state.get() {
            Some(ModelState::Ready { session, .. }) => session.outputs().iter().map(meta).collect(),
            _ => vec![],
        }
    }

    pub fn input_info(&self, name: &str) -> SResult<&IoInfo> {
        let session = self.session()?;
        session
            .inputs()
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = session.inputs().iter().map(|i| i.name.as_str()).collect();
                ServeError::bad(format!(
                    "model '{}' has no input named '{name}'; its inputs are: {}",
                    self.name,
                    names.join(", ")
                ))
            })
    }

    pub fn session(&self) -> SResult<&Arc<Session>> {
        match self.state.get() {
            Some(ModelState::Ready { session, .. }) => Ok(session),
            Some(ModelState::Failed(e)) => Err(ServeError::new(
                ErrorKind::Unavailable,
                format!("model '{}' is not ready: {e}", self.name),
            )),
            None => Err(ServeError::new(
                ErrorKind::Unavailable,
                format!("model '{}' is not ready: still loading", self.name),
            )),
        }
    }

    /// Validates inputs against the model's signature, then queues them.
    pub async fn infer(&self, inputs: Vec<(String, Tensor)>) -> SResult<Vec<(String, Tensor)>> {
        let Some(ModelState::Ready {
            session, scheduler, ..
        }) = self.state.get()
        else {
            return Err(self.session().err().expect("not ready"));
        };
        let mut seen = std::collections::HashSet::new();
        for (name, t) in &inputs {
            let info = self.input_info(name)?;
            if !seen.insert(name.as_str()) {
                return Err(ServeError::bad(format!("input '{name}' is given twice")));
            }
            if t.dtype() != info.dtype {
                return Err(ServeError::bad(format!(
                    "input '{name}' must be {} but {} was given",
                    datatype_name(info.dtype),
                    datatype_name(t.dtype())
                )));
            }
            if let Some(shape) = &info.shape {
                let ok = shape.len() == t.rank()
                    && shape
                        .iter()
                        .zip(t.shape())
                        .all(|(d, &a)| !matches!(d, Dim::Known(v) if *v != a));
                if !ok {
                    return Err(ServeError::bad(format!(
                        "input '{name}' must have shape {:?} but {:?} was given",
                        metadata_shape(Some(shape)),
                        t.shape()
                    )));
                }
            }
        }
        if let Some(missing) = session
            .inputs()
            .iter()
            .find(|i| !i.has_default && !seen.contains(i.name.as_str()))
        {
            return Err(ServeError::bad(format!(
                "missing input '{}' ({} {:?})",
                missing.name,
                datatype_name(missing.dtype),
                metadata_shape(missing.shape.as_deref())
            )));
        }
        scheduler.infer(inputs).await
    }
}

/// Whether dim 0 is symbolic on every input and output (so requests can merge).
fn batchable(session: &Session) -> bool {
    let sym0 = |io: &IoInfo| {
        io.shape
            .as_ref()
            .and_then(|s| s.first())
            .is_some_and(|d| !matches!(d, Dim::Known(_)))
    };
    !session.inputs().is_empty()
        && session.inputs().iter().all(|i| sym0(i) && !i.has_default)
        && session.outputs().iter().all(sym0)
}

pub struct Repository {
    pub models: Vec<ServedModel>,
    pub metrics: Arc<Metrics>,
    pool: Arc<ComputePool>,
    /// Kernel threads of every session (one shared kernel pool of this size).
    threads: usize,
}

impl Repository {
    /// Finds and loads every model under `cfg.path`; a model that fails is
    /// kept, not ready.
    pub fn load(cfg: &ServeConfig, metrics: Arc<Metrics>) -> Result<Repository, String> {
        let repo = Repository::discover(cfg, metrics)?;
        repo.load_models();
        Ok(repo)
    }

    /// Finds the models under `cfg.path` without loading them: each is
    /// LOADING (or already failed, when its folder or config is unusable)
    /// until [`Repository::load_models`] runs.
    pub fn discover(cfg: &ServeConfig, metrics: Arc<Metrics>) -> Result<Repository, String> {
        let pool = ComputePool::new(cfg.threads);
        let mut found: Vec<(String, String, PathBuf, ModelConfig, Option<String>)> = Vec::new();
        let path = &cfg.path;
        if path.is_file() {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("model")
                .to_string();
            found.push((
                name,
                "1".into(),
                path.clone(),
                cfg.model_defaults.clone(),
                None,
            ));
        } else if path.is_dir() {
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            dirs.sort();
            for dir in dirs {
                let name = dir
                    .file_name()
                    .and_then(|s| s.to_str())
                    .unwrap_or("")
                    .to_string();
                if name.is_empty() || name.starts_with('.') {
                    continue;
                }
                let (config, config_err) = read_config(&dir, &cfg.model_defaults);
                let mut versions: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok().map(|e| e.path()))
                            .filter_map(|p| {
                                let v = p.file_name()?.to_str()?.parse::<u64>().ok()?;
                                Some((v, p))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                versions.sort();
                if versions.is_empty() {
                    found.push((
                        name.clone(),
                        "1".into(),
                        dir.clone(),
                        config,
                        Some(format!(
                            "no version folder with model.onnx under {}",
                            dir.display()
                        )),
                    ));
                    continue;
                }
                for (v, vdir) in versions {
                    found.push((
                        name.clone(),
                        v.to_string(),
                        vdir.join("model.onnx"),
                        config.clone(),
                        config_err.clone(),
                    ));
                }
            }
        } else {
            return Err(format!(
                "{} is neither a model file nor a folder",
                path.display()
            ));
        }
        if found.is_empty() {
            return Err(format!("no models found under {}", path.display()));
        }
        let mut models = Vec::new();
        for (name, version, file, config, err) in found {
            let state = OnceLock::new();
            if let Some(e) = err {
                tracing::error!(
                    model = %name, version = %version, path = %file.display(), error = %e,
                    "model cannot be loaded; serving it as not ready"
                );
                let _ = state.set(ModelState::Failed(e));
            } else {
                tracing::info!(model = %name, version = %version, path = %file.display(), "model loading");
            }
            models.push(ServedModel {
                name,
                version,
                path: file,
                config,
                state,
            });
        }
        Ok(Repository {
            models,
            metrics,
            pool,
            threads: cfg.threads.max(1),
        })
    }

    /// Loads every model still LOADING, one after another (the kernels use
    /// the cores already); each becomes READY or UNAVAILABLE with its error as
    /// soon as it is done, so the first ones serve while later ones load.
    pub fn load_models(&self) {
        for m in &self.models {
            if m.state.get().is_some() {
                continue;
            }
            let started = std::time::Instant::now();
            let state = load_one(m, self.threads, &self.pool, &self.metrics);
            let load_ms = started.elapsed().as_millis() as u64;
            match &state {
                ModelState::Ready { batching, .. } => tracing::info!(
                    model = %m.name, version = %m.version, batching = *batching, load_ms,
                    "model ready"
                ),
                ModelState::Failed(e) => tracing::error!(
                    model = %m.name, version = %m.version, path = %m.path.display(), error = %e,
                    "model failed to load; serving it as not ready"
                ),
            }
            let _ = m.state.set(state);
        }
    }

    /// Whether no model is still loading.
    pub fn all_settled(&self) -> bool {
        self.models.iter().all(|m| m.state.get().is_some())
    }

    /// The model by name and (optional) version: the newest version when none given.
    pub fn get(&self, name: &str, version: Option<&str>) -> SResult<&ServedModel> {
        let version = version.filter(|v| !v.is_empty());
        let mut best: Option<&ServedModel> = None;
        for m in self.models.iter().filter(|m| m.name == name) {
            match version {
                Some(v) if m.version == v => return Ok(m),
                Some(_) => {}
                None => {
                    let newer = match best {
                        None => true,
                        Some(b) => {
                            m.version.parse::<u64>().unwrap_or(0)
                                > b.version.parse::<u64>().unwrap_or(0)
                        }
                    };
                    if newer {
                        best = Some(m);
                    }
                }
            }
        }
        best.ok_or_else(|| {
            ServeError::new(
                ErrorKind::NotFound,
                match version {
                    Some(v) => format!("unknown model '{name}' version '{v}'"),
                    None => format!("unknown model '{name}'"),
                },
            )
        })
    }

    pub fn all_ready(&self) -> bool {
        self.models.iter().all(|m| m.ready())
    }

    pub fn gauges(&self) -> Vec<ModelGauge> {
        self.models
            .iter()
            .map(|m| {
                let (depth, inflight) = match m.state.get() {
                    Some(ModelState::Ready { scheduler, .. }) => {
                        (scheduler.queue_depth(), scheduler.in_flight())
                    }
                    _ => (0, 0),
                };
                ModelGauge {
                    model: m.name.clone(),
                    version: m.version.clone(),
                    ready: m.ready(),
                    state: m.state_name(),
                    queue_depth: depth,
                    in_flight: inflight,
                }
            })
            .collect()
    }
}

fn read_config(dir: &Path, defaults: &ModelConfig) -> (ModelConfig, Option<String>) {
    let file = dir.join("config.json");
    if !file.exists() {
        return (defaults.clone(), None);
    }
    let parsed = std::fs::read_to_string(&file)
        .map_err(|e| e.to_string())
        .and_then(|s| serde_json::from_str::<ModelConfigFile>(&s).map_err(|e| e.to_string()));
    match parsed {
        Ok(f) => (f.apply(defaults), None),
        Err(e) => (
            defaults.clone(),
            Some(format!("invalid {}: {e}", file.display())),
        ),
    }
}

fn load_one(
    m: &ServedModel,
    threads: usize,
    pool: &Arc<ComputePool>,
    metrics: &Arc<Metrics>,
) -> ModelState {
    let (name, file, config) = (&m.name, &m.path, &m.config);
    // Every model's kernels run on one shared pool of `threads` (the runtime
    // shares pools between sessions of the same size), so several models or
    // batches in flight never oversubscribe the cores.
    let options = SessionOptions {
        threads: Some(threads),
        ..SessionOptions::default()
    };
    let loaded = std::panic::catch_unwind(|| Session::load(file, &options));
    let session = match loaded {
        Ok(Ok(s)) => Arc::new(s),
        Ok(Err(e)) => return ModelState::Failed(e.to_string()),
        Err(_) => return ModelState::Failed("internal error while loading".into()),
    };
    let batching = config.dynamic_batching && config.max_batch_size > 1 && batchable(&session);
    let sched = SchedConfig {
        batching,
        max_batch_size: config.max_batch_size.max(1),
        max_queue_delay: Duration::from_micros(config.max_queue_delay_us),
        max_queue_size: config.max_queue_size.max(1),
        max_concurrency: config.max_concurrency.max(1),
        timeout: (config.timeout_ms > 0).then(|| Duration::from_millis(config.timeout_ms)),
    };
    let scheduler = Scheduler::start(
        name.to_string(),
        session.clone(),
        sched,
        pool.clone(),
        metrics.clone(),
    );
    ModelState::Ready {
        session,
        scheduler,
        batching,
    }
}
