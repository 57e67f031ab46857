//! Scheduling: a compute thread pool (inference never runs on the async
//! reactor), and per model a bounded queue, a concurrency limit, and dynamic
//! batching (queued requests with the same non-batch shapes merged along dim 0).

use crate::error::{ErrorKind, SResult, ServeError};
use crate::metrics::Metrics;
use kiln_ir::{DType, Tensor, TensorData};
use kiln_runtime::Session;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Fixed pool of std threads that run model executions.
pub struct ComputePool {
    tx: Mutex<mpsc::Sender<Job>>,
}

impl ComputePool {
    pub fn new(threads: usize) -> Arc<ComputePool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("kiln-compute-{i}"))
                .spawn(move || loop {
                    let job = {
                        let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
                        guard.recv()
                    };
                    match job {
                        Ok(job) => {
                            // A panicking kernel fails its requests (their reply
                            // senders drop), not the worker.
                            let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                        }
                        Err(_) => return,
                    }
                })
                .expect("spawning a compute thread");
        }
        Arc::new(ComputePool { tx: Mutex::new(tx) })
    }

    fn execute(&self, job: Job) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(job);
    }
}

pub type Outputs = Vec<(String, Tensor)>;

struct Pending {
    inputs: Vec<(String, Tensor)>,
    /// Dim 0 shared by every input, when batching may merge this request.
    rows: Option<usize>,
    /// Names, dtypes and non-batch dims: requests merge only when equal.
    signature: Vec<(String, DType, Vec<usize>)>,
    enqueued: Instant,
    deadline: Option<Instant>,
    reply: oneshot::Sender<SResult<Outputs>>,
}

struct Queue {
    items: VecDeque<Pending>,
}

/// Settings the scheduler acts on.
#[derive(Clone, Debug)]
pub struct SchedConfig {
    pub batching: bool,
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    pub max_queue_size: usize,
    pub max_concurrency: usize,
    pub timeout: Option<Duration>,
}

pub struct Scheduler {
    model: String,
    session: Arc<Session>,
    cfg: SchedConfig,
    queue: Mutex<Queue>,
    queue_cv: Condvar,
    slots: Mutex<usize>,
    slots_cv: Condvar,
    depth: AtomicUsize,
    in_flight: AtomicUsize,
    pool: Arc<ComputePool>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Releases a concurrency slot when a batch ends, however it ends.
struct SlotGuard(Arc<Scheduler>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut s = lock(&self.0.slots);
        *s -= 1;
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.slots_cv.notify_one();
    }
}

impl Scheduler {
    pub fn start(
        model: String,
        session: Arc<Session>,
        cfg: SchedConfig,
        pool: Arc<ComputePool>,
        metrics: Arc<Metrics>,
    ) -> Arc<Scheduler> {
        let s = Arc::new(Scheduler {
            model: model.clone(),
            session,
            cfg,
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
            }),
            queue_cv: Condvar::new(),
            slots: Mutex::new(0),
            slots_cv: Condvar::new(),
            depth: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            pool,
            metrics,
        });
        let me = s.clone();
        std::thread::Builder::new()
            .name(format!("kiln-batcher-{model}"))
            .spawn(move || me.batcher_loop())
            .expect("spawning a batcher thread");
        s
    }

    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Queues validated inputs and waits for the outputs.
    pub async fn infer(&self, mut inputs: Vec<(String, Tensor)>) -> SResult<Outputs> {
        inputs.sort_by(|a, b| a.0.cmp(&b.0));
        let rows = if self.cfg.batching {
            let first = inputs.first().and_then(|(_, t)| t.shape().first().copied());
            first.filter(|r| inputs.iter().all(|(_, t)| t.shape().first() == Some(r)))
        } else {
            None
        };
        let signature = inputs
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.dtype(),
                    t.shape().iter().skip(1).copied().collect(),
                )
            })
            .collect();
        let now = Instant::now();
        let deadline = self.cfg.timeout.map(|t| now + t);
        let (tx, rx) = oneshot::channel();
        {
            let mut q = lock(&self.queue);
            if q.items.len() >= self.cfg.max_queue_size {
                return Err(ServeError::new(
                    ErrorKind::QueueFull,
                    format!(
                        "model '{}' is at capacity ({} requests queued); retry later",
                        self.model, self.cfg.max_queue_size
                    ),
                ));
            }
            q.items.push_back(Pending {
                inputs,
                rows,
                signature,
                enqueued: now,
                deadline,
                reply: tx,
            });
            self.depth.store(q.items.len(), Ordering::Relaxed);
        }
        self.queue_cv.notify_one();
        let timed_out = || {
            ServeError::new(
                ErrorKind::Timeout,
                format!(
                    "request to model '{}' timed out after {} ms",
                    self.model,
                    self.cfg.timeout.map(|t| t.as_millis()).unwrap_or(0)
                ),
            )
        };
        let answer = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), rx).await {
                Ok(r) => r,
                Err(_) => return Err(timed_out()),
            },
            None => rx.await,
        };
        match answer {
            Ok(r) => r,
            Err(_) => Err(ServeError::internal(format!(
                "model '{}' failed while running this request (internal error)",
                self.model
            ))),
        }
    }

    fn batcher_loop(self: Arc<Self>) {
        loop {
            // Wait for work.
            {
                let mut q = lock(&self.queue);
                while q.items.is_empty() {
                    q = self.queue_cv.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            }
            // Wait for a free slot; the queue keeps filling meanwhile, so batches
            // grow under load.
            {
                let mut s = lock(&self.slots);
                while *s >= self.cfg.max_concurrency {
                    s = self.slots_cv.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                *s += 1;
                self.in_flight.fetch_add(1, Ordering::Relaxed);
            }
            let guard = SlotGuard(self.clone());
            let batch = self.form_batch();
            let me = self.clone();
            self.pool.execute(Box::new(move || {
                let _guard = guard;
                me.run_batch(batch);
            }));
        }
    }

    /// Takes the head request and, with batching, queued requests of the same
    /// signature until the batch is full or the head has waited long enough.
    fn form_batch(&self) -> Vec<Pending> {
        let mut q = lock(&self.queue);
        let head = q.items.pop_front().expect("queue is not empty");
        let mut batch = vec![head];
        if let Some(mut rows) = batch[0].rows {
            let until = batch[0].enqueued + self.cfg.max_queue_delay;
            loop {
                if rows >= self.cfg.max_batch_size {
                    break;
                }
                let pos = q.items.iter().position(|p| {
                    p.rows.is_some_and(|r| rows + r <= self.cfg.max_batch_size)
                        && p.signature == batch[0].signature
                });
                if let Some(i) = pos {
                    let p = q.items.remove(i).expect("index in range");
                    rows += p.rows.unwrap_or(0);
                    batch.push(p);
                    continue;
                }
                let now = Instant::now();
                if now >= until {
                    break;
                }
                let (g, _) = self
                    .queue_cv
                    .wait_timeout(q, until - now)
                    .unwrap_or_else(|p| p.into_inner());
                q = g;
            }
        }
        self.depth.store(q.items.len(), Ordering::Relaxed);
        batch
    }

    /// Runs the model; a panic in a kernel becomes an internal error for these
    /// requests only.
    fn run_safe(&self, inputs: Vec<(String, Tensor)>) -> SResult<Outputs> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.session.run(inputs))) {
            Ok(r) => r.map_err(ServeError::from_runtime),
            Err(_) => Err(ServeError::internal(format!(
                "internal error while running model '{}'",
                self.model
            ))),
        }
    }

    fn run_batch(&self, batch: Vec<Pending>) {
        let start = Instant::now();
        // Requests whose caller gave up or whose time ran out are not run.
        let mut live = Vec::with_capacity(batch.len());
        for p in batch {
            if p.reply.is_closed() || p.deadline.is_some_and(|d| d <= start) {
                let _ = p.reply.send(Err(ServeError::new(
                    ErrorKind::Timeout,
                    "request timed out while queued",
                )));
            } else {
                live.push(p);
            }
        }
        if live.is_empty() {
            return;
        }
        let queue_s: Vec<f64> = live
            .iter()
            .map(|p| (start - p.enqueued).as_secs_f64())
            .collect();
        let n = live.len();
        if n == 1 {
            let p = live.pop().expect("one request");
            let r = self.run_safe(p.inputs);
            self.metrics
                .batch(&self.model, 1, start.elapsed().as_secs_f64(), &queue_s);
            let _ = p.reply.send(r);
            return;
        }
        let rows: Vec<usize> = live.iter().map(|p| p.rows.unwrap_or(0)).collect();
        let result = match merge_inputs(&live) {
            Some(merged) => self
                .run_safe(merged)
                .and_then(|outs| split_outputs(outs, &rows)),
            None => Err(ServeError::internal("inputs cannot be merged")),
        };
        self.metrics
            .batch(&self.model, n, start.elapsed().as_secs_f64(), &queue_s);
        match result {
            Ok(per_request) => {
                for (p, outs) in live.into_iter().zip(per_request) {
                    let _ = p.reply.send(Ok(outs));
                }
            }
            Err(e) => {
                // One bad request must not fail its neighbours: run each alone.
                tracing::debug!(model = %self.model, error = %e, "batched run failed; running requests one by one");
                for p in live {
                    let r = self.run_safe(p.inputs);
                    let _ = p.reply.send(r);
                }
            }
        }
    }
}

/// Concatenates each input along dim 0 (all requests have the same signature).
fn merge_inputs(batch: &[Pending]) -> Option<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (i, (name, first)) in batch[0].inputs.iter().enumerate() {
        let total: usize = batch.iter().map(|p| p.inputs[i].1.shape()[0]).sum();
        let mut shape = first.shape().to_vec();
        shape[0] = total;
        let parts: Vec<&TensorData> = batch.iter().map(|p| p.inputs[i].1.data()).collect();
        let data = concat_data(&parts)?;
        out.push((name.clone(), Tensor::new(shape, data).ok()?));
    }
    Some(out)
}

fn concat_data(parts: &[&TensorData]) -> Option<TensorData> {
    macro_rules! cat {
        ($($variant:ident),*) => {
            match parts[0] {
                $(TensorData::$variant(_) => {
                    let mut v = Vec::new();
                    for p in parts {
                        if let TensorData::$variant(x) = p {
                            v.extend_from_slice(x);
                        }
                    }
                    Some(TensorData::$variant(v))
                })*
                #[allow(unreachable_patterns)]
                _ => None,
            }
        };
    }
    cat!(F32, F64, F16, BF16, I8, I16, I32, I64, U8, U16, U32, U64, Bool, String)
}

/// Splits each output back along dim 0 by the requests' row counts.
fn split_outputs(outs: Outputs, rows: &[usize]) -> SResult<Vec<Outputs>> {
    let total: usize = rows.iter().sum();
    let mut per: Vec<Outputs> = rows.iter().map(|_| Vec::new()).collect();
    for (name, t) in outs {
        if t.shape().first() != Some(&total) {
            return Err(ServeError::internal(format!(
                "output '{name}' has shape {:?}, not batch-major; cannot split a batch of {total}",
                t.shape()
            )));
        }
        let row_len: usize = t.shape()[1..].iter().product();
        let mut at = 0;
        for (i, &r) in rows.iter().enumerate() {
            let mut shape = t.shape().to_vec();
            shape[0] = r;
            let data = t.data().gather(at * row_len..(at + r) * row_len);
            at += r;
            let part = Tensor::new(shape, data).map_err(|e| ServeError::internal(e.to_string()))?;
            per[i].push((name.clone(), part));
        }
    }
    Ok(per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_then_split_round_trips() {
        let a = Tensor::from_vec(vec![1, 2], vec![1.0f32, 2.0]).unwrap();
        let b = Tensor::from_vec(vec![2, 2], vec![3.0f32, 4.0, 5.0, 6.0]).unwrap();
        let merged = concat_data(&[a.data(), b.data()]).unwrap();
        let t = Tensor::new(vec![3, 2], merged).unwrap();
        let parts = split_outputs(vec![("y".into(), t)], &[1, 2]).unwrap();
        assert_eq!(parts[0][0].1, a);
        assert_eq!(parts[1][0].1, b);
    }

    #[test]
    fn split_refuses_outputs_that_are_not_batch_major() {
        let t = Tensor::from_vec(vec![2], vec![1i64, 2]).unwrap();
        assert!(split_outputs(vec![("y".into(), t)], &[1, 2]).is_err());
    }
}
