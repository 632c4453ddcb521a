//! The dynamic batcher of one loaded version: callers enqueue rows; one task gathers them
//! into batches of at most `max_batch_size` rows, waiting at most `max_queue_delay` for
//! company, drops callers whose deadline passed or who went away, and hands each batch to
//! the engine as one forward pass. The queue is bounded: full means RESOURCE_EXHAUSTED.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_registry::records::{BatchingSettings, VersionKey};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{EngineHandle, ForwardOutput};
use crate::{Error, Result};

/// One caller's answer.
#[derive(Debug)]
pub struct BatchReply {
    /// Row-major little-endian FP32 outputs of this caller's rows.
    pub outputs: Bytes,
    /// Outputs per row.
    pub cols: usize,
    /// How long the caller waited before its batch went to the device.
    pub queue: Duration,
    /// How long that batch took on the device.
    pub compute: Duration,
    /// Rows in that batch.
    pub batch_rows: usize,
}

struct Pending {
    /// Row-major little-endian FP32 features, as they came off the wire.
    features: Bytes,
    rows: usize,
    deadline: Option<Instant>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<BatchReply>>,
}

impl Pending {
    fn abandoned(&self, now: Instant) -> bool {
        self.reply.is_closed() || self.deadline.is_some_and(|d| d <= now)
    }
}

/// The sending side of a version's batcher.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Pending>,
    depth: Arc<AtomicUsize>,
    settings: BatchingSettings,
}

impl Batcher {
    /// Start the batcher task for `key` on `engine`; it ends when every handle is dropped.
    pub fn spawn(key: VersionKey, settings: BatchingSettings, engine: EngineHandle) -> Self {
        let (tx, rx) = mpsc::channel(settings.max_queue_size.max(1) as usize);
        let depth = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run(key, settings, engine, rx, depth.clone()));
        Self {
            tx,
            depth,
            settings,
        }
    }

    /// Requests waiting right now.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// The settings it runs with.
    pub fn settings(&self) -> BatchingSettings {
        self.settings
    }

    /// Queue `rows` rows and wait for their outputs.
    pub async fn infer(
        &self,
        features: Bytes,
        rows: usize,
        deadline: Option<Instant>,
    ) -> Result<BatchReply> {
        let max = self.settings.max_batch_size as usize;
        if rows == 0 || rows > max {
            return Err(Error::Invalid(format!(
                "batch of {rows} rows is outside 1..={max} (the model's max_batch_size)"
            )));
        }
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            features,
            rows,
            deadline,
            enqueued: Instant::now(),
            reply,
        };
        match self.tx.try_send(pending) {
            Ok(()) => {
                self.depth.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(Error::QueueFull(self.settings.max_queue_size));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Error::EngineStopped),
        }
        rx.await.map_err(|_| Error::EngineStopped)?
    }
}

async fn run(
    key: VersionKey,
    settings: BatchingSettings,
    engine: EngineHandle,
    mut rx: mpsc::Receiver<Pending>,
    depth: Arc<AtomicUsize>,
) {
    let max_rows = settings.max_batch_size.max(1) as usize;
    let delay = Duration::from_micros(settings.max_queue_delay_us);
    // A request that did not fit in the last batch opens the next one.
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => {
                    depth.fetch_sub(1, Ordering::Relaxed);
                    p
                }
                None => return,
            },
        };
        let mut batch = vec![first];
        let mut rows = batch[0].rows;
        let close_at = tokio::time::Instant::from_std(batch[0].enqueued + delay);
        while rows < max_rows {
            let next = match rx.try_recv() {
                Ok(p) => Some(p),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if delay.is_zero() {
                        None
                    } else {
                        tokio::time::timeout_at(close_at, rx.recv())
                            .await
                            .ok()
                            .flatten()
                    }
                }
            };
            let Some(p) = next else { break };
            depth.fetch_sub(1, Ordering::Relaxed);
            if rows + p.rows > max_rows {
                carry = Some(p);
                break;
            }
            rows += p.rows;
            batch.push(p);
        }

        let now = Instant::now();
        batch.retain(|p| {
            if p.abandoned(now) {
                // The deadline passed (or the caller left) before compute: drop it unrun.
                false
            } else {
                true
            }
        });
        if batch.is_empty() {
            continue;
        }
        let rows: usize = batch.iter().map(|p| p.rows).sum();
        let mut features = Vec::with_capacity(batch.iter().map(|p| p.features.len() / 4).sum());
        for p in &batch {
            features.extend(
                p.features
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        let started = Instant::now();
        // While the engine works on this batch, new requests pile up in the queue and form
        // the next one: waiting here is what makes batches grow under load.
        let result = engine.forward(key.clone(), features, rows).await;
        deliver(batch, result, started, rows);
    }
}

fn deliver(
    batch: Vec<Pending>,
    result: Result<ForwardOutput>,
    started: Instant,
    batch_rows: usize,
) {
    match result {
        Ok(output) => {
            let mut offset = 0;
            for p in batch {
                let n = p.rows * output.cols;
                let slice = output.values.get(offset..offset + n).unwrap_or_default();
                offset += n;
                let mut bytes = Vec::with_capacity(n * 4);
                for v in slice {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
                let _ = p.reply.send(Ok(BatchReply {
                    outputs: Bytes::from(bytes),
                    cols: output.cols,
                    queue: started.saturating_duration_since(p.enqueued),
                    compute: output.compute,
                    batch_rows,
                }));
            }
        }
        Err(e) => {
            let message = e.to_string();
            for p in batch {
                let _ = p.reply.send(Err(Error::Device(message.clone())));
            }
        }
    }
}
