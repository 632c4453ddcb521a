//! The dynamic batcher of one loaded version: callers enqueue requests (named tensors,
//! `rows` rows each); one task gathers them into batches of at most `max_batch_size` rows,
//! drops callers whose deadline passed or who went away, joins the batch's tensors along
//! the batch dimension, hands them to the engine as one forward pass and splits the
//! answers back by rows. It never looks inside a tensor, so every family whose batching is
//! `Rows` (see `kiln_core::family`) goes through it. The queue is bounded: full means
//! RESOURCE_EXHAUSTED.
//!
//! A batch is everything queued when the previous one finishes (up to `max_batch_size`
//! rows): an idle model answers a lone request at once, and under load batches grow by
//! themselves while the device works. `max_queue_delay` > 0 additionally holds a batch
//! open that long for company (tokio's timer resolution, 1 ms, applies).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kiln_core::records::{BatchingSettings, VersionKey};
use kiln_core::tensor::Tensor;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{EngineHandle, ForwardOutput};
use crate::{Error, Result};

/// One caller's answer.
#[derive(Debug)]
pub struct BatchReply {
    /// The model's outputs for this caller's rows.
    pub outputs: Vec<Tensor>,
    /// How long the caller waited before its batch went to the device.
    pub queue: Duration,
    /// How long that batch took on the device.
    pub compute: Duration,
    /// Rows in that batch.
    pub batch_rows: usize,
    /// How many of this caller's rows the model cut to fit (texts past an encoder's
    /// longest sequence).
    pub truncated: usize,
}

struct Pending {
    /// The request's inputs, in the model's interface order, `rows` rows each.
    inputs: Vec<Tensor>,
    rows: usize,
    deadline: Option<Instant>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<BatchReply>>,
    /// The request's trace context (the worker's `Infer` call): the parent of its
    /// queue-wait span, recorded when it leaves the queue, and what its batch links to.
    trace: Option<kiln_telemetry::trace::Context>,
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
    /// Rows sent to the engine so far (requests dropped before compute are not counted).
    computed: Arc<AtomicU64>,
    settings: BatchingSettings,
}

impl Batcher {
    /// Start the batcher task for `key` on `engine`; it ends when every handle is dropped.
    pub fn spawn(key: VersionKey, settings: BatchingSettings, engine: EngineHandle) -> Self {
        let (tx, rx) = mpsc::channel(settings.max_queue_size.max(1) as usize);
        let depth = Arc::new(AtomicUsize::new(0));
        let computed = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(
            key,
            settings,
            engine,
            rx,
            depth.clone(),
            computed.clone(),
        ));
        Self {
            tx,
            depth,
            computed,
            settings,
        }
    }

    /// Requests waiting right now: queued, or in a batch that has not yet gone to the engine.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Rows the engine has been given to compute (expired and abandoned requests are
    /// dropped before and not counted).
    pub fn rows_computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    /// The settings it runs with.
    pub fn settings(&self) -> BatchingSettings {
        self.settings
    }

    /// Queue a request of `rows` rows and wait for its outputs. More rows than
    /// `max_batch_size` go in as several requests of at most that many rows (the batcher
    /// packs them with the others), as long as they fit in the queue.
    pub async fn infer(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        deadline: Option<Instant>,
    ) -> Result<BatchReply> {
        let max = self.settings.max_batch_size.max(1) as usize;
        if rows == 0 {
            return Err(Error::Invalid("a request needs at least 1 row".into()));
        }
        if rows <= max {
            return self.enqueue(inputs, rows, deadline)?.await;
        }
        let pieces = rows.div_ceil(max);
        let slots = self.settings.max_queue_size as usize;
        if pieces > slots {
            return Err(Error::Invalid(format!(
                "batch of {rows} rows needs {pieces} passes of max_batch_size {max}; the queue holds {slots} (at most {} rows)",
                slots * max
            )));
        }
        // Every piece is queued before any is awaited, so they ride in consecutive
        // batches; a piece that cannot be queued drops those before it (their callers
        // are gone, so the batcher skips them).
        let mut waits = Vec::with_capacity(pieces);
        for start in (0..rows).step_by(max) {
            let n = max.min(rows - start);
            let piece = inputs
                .iter()
                .map(|t| t.slice_rows(start, n))
                .collect::<kiln_core::Result<Vec<_>>>()?;
            waits.push(self.enqueue(piece, n, deadline)?);
        }
        let replies = futures::future::try_join_all(waits).await?;
        let outputs = join_outputs(replies.iter().map(|r| r.outputs.clone()).collect())?;
        Ok(BatchReply {
            outputs,
            queue: replies.iter().map(|r| r.queue).max().unwrap_or_default(),
            compute: replies.iter().map(|r| r.compute).sum(),
            batch_rows: replies.iter().map(|r| r.batch_rows).max().unwrap_or(0),
            truncated: replies.iter().map(|r| r.truncated).sum(),
        })
    }

    /// Queue one request of at most `max_batch_size` rows; the answer arrives on the
    /// returned future.
    fn enqueue(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        deadline: Option<Instant>,
    ) -> Result<impl std::future::Future<Output = Result<BatchReply>> + use<>> {
        let (reply, rx) = oneshot::channel();
        let trace = kiln_telemetry::trace::enabled().then(kiln_telemetry::trace::current);
        let pending = Pending {
            inputs,
            rows,
            deadline,
            enqueued: Instant::now(),
            reply,
            trace,
        };
        // Counted before it is sent, so that the batcher never takes it off an uncounted
        // depth; taken back if it was not queued.
        self.depth.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(pending) {
            self.depth.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => {
                    Error::QueueFull(self.settings.max_queue_size)
                }
                mpsc::error::TrySendError::Closed(_) => Error::EngineStopped,
            });
        }
        Ok(async move { rx.await.map_err(|_| Error::EngineStopped)? })
    }
}

async fn run(
    key: VersionKey,
    settings: BatchingSettings,
    engine: EngineHandle,
    mut rx: mpsc::Receiver<Pending>,
    depth: Arc<AtomicUsize>,
    computed: Arc<AtomicU64>,
) {
    let max_rows = settings.max_batch_size.max(1) as usize;
    let delay = Duration::from_micros(settings.max_queue_delay_us);
    // A request that did not fit in the last batch opens the next one.
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut batch: Vec<Pending> = vec![first];
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
            if rows + p.rows > max_rows || !joinable(&batch[0], &p) {
                carry = Some(p);
                break;
            }
            rows += p.rows;
            batch.push(p);
        }

        // A request waits (and counts in the depth) until its batch leaves for the engine:
        // those gathered while the batch fills, and one carried over to the next, too.
        depth.fetch_sub(batch.len(), Ordering::Relaxed);
        let now = Instant::now();
        queue_waits(&batch, now);
        // Callers whose deadline passed, or who left, are dropped before compute.
        let (mut batch, abandoned): (Vec<Pending>, Vec<Pending>) =
            batch.into_iter().partition(|p| !p.abandoned(now));
        for p in abandoned {
            let _ = p.reply.send(Err(Error::DeadlineExceeded));
        }
        if batch.is_empty() {
            continue;
        }
        let rows: usize = batch.iter().map(|p| p.rows).sum();
        let span = batch_span(&key, &batch, rows);
        let inputs = match join_inputs(&mut batch) {
            Ok(inputs) => inputs,
            Err(e) => {
                let message = e.to_string();
                for p in batch {
                    let _ = p.reply.send(Err(Error::Invalid(message.clone())));
                }
                continue;
            }
        };
        let started = Instant::now();
        computed.fetch_add(rows as u64, Ordering::Relaxed);
        // While the engine works on this batch, new requests pile up in the queue and form
        // the next one: waiting here is what makes batches grow under load.
        let result = engine.forward(key.clone(), inputs, rows).await;
        drop(span);
        deliver(batch, result, started, rows);
    }
}

/// Whether two requests' inputs can be joined along the batch dimension: the same inputs
/// (a family may take optional ones), each with the same shape past the batch (requests of
/// token ids padded to different widths ride in different batches).
fn joinable(a: &Pending, b: &Pending) -> bool {
    a.inputs.len() == b.inputs.len()
        && a.inputs
            .iter()
            .zip(&b.inputs)
            .all(|(x, y)| x.name == y.name && x.shape.get(1..) == y.shape.get(1..))
}

/// The queue-wait span of each traced request of a batch that has just formed (those
/// about to be dropped for their deadline too): from when it was queued until `now`. Made
/// here, in one pass over the batch, rather than begun when each request is queued and
/// carried through the queue.
fn queue_waits(batch: &[Pending], now: Instant) {
    if !kiln_telemetry::trace::enabled() {
        return;
    }
    let clock = std::time::SystemTime::now();
    for p in batch {
        if let Some(cx) = &p.trace {
            let waited = now.saturating_duration_since(p.enqueued);
            let queued = clock.checked_sub(waited).unwrap_or(clock);
            // Recorded and ended at once.
            drop(kiln_telemetry::trace::Detached::start_at(
                "queue wait",
                cx,
                queued,
                || {
                    vec![kiln_telemetry::trace::KeyValue::new(
                        "kiln.rows",
                        p.rows as i64,
                    )]
                },
            ));
        }
    }
}

/// The span of one forward pass (see `kiln_telemetry::trace::batch`).
fn batch_span(
    key: &VersionKey,
    batch: &[Pending],
    rows: usize,
) -> Option<kiln_telemetry::trace::Detached> {
    if !kiln_telemetry::trace::enabled() {
        return None;
    }
    let requests: Vec<&kiln_telemetry::trace::Context> =
        batch.iter().filter_map(|p| p.trace.as_ref()).collect();
    use kiln_telemetry::trace::KeyValue;
    let served = batch.len();
    kiln_telemetry::trace::batch(&requests, || {
        vec![
            KeyValue::new(
                "kiln.model.name",
                kiln_telemetry::trace::name_value(&key.model),
            ),
            KeyValue::new("kiln.model.version", key.version as i64),
            KeyValue::new("kiln.batch.rows", rows as i64),
            KeyValue::new("kiln.batch.requests", served as i64),
        ]
    })
}

/// The batch's inputs, each joined along the batch dimension in the batch's order (the
/// requests' tensors move out; one request's are used as they are).
fn join_inputs(batch: &mut [Pending]) -> Result<Vec<Tensor>> {
    let count = batch.first().map_or(0, |p| p.inputs.len());
    let mut columns: Vec<Vec<Tensor>> = (0..count)
        .map(|_| Vec::with_capacity(batch.len()))
        .collect();
    for p in batch.iter_mut() {
        if p.inputs.len() != count {
            return Err(Error::Invalid(format!(
                "requests of one batch hold {count} and {} inputs",
                p.inputs.len()
            )));
        }
        for (column, t) in columns.iter_mut().zip(p.inputs.drain(..)) {
            column.push(t);
        }
    }
    Ok(columns
        .into_iter()
        .map(Tensor::concat_rows)
        .collect::<kiln_core::Result<_>>()?)
}

/// The outputs of consecutive pieces of one request, joined back in row order.
fn join_outputs(pieces: Vec<Vec<Tensor>>) -> Result<Vec<Tensor>> {
    let count = pieces.first().map_or(0, Vec::len);
    let mut columns: Vec<Vec<Tensor>> = (0..count).map(|_| Vec::new()).collect();
    for piece in pieces {
        for (column, t) in columns.iter_mut().zip(piece) {
            column.push(t);
        }
    }
    Ok(columns
        .into_iter()
        .map(Tensor::concat_rows)
        .collect::<kiln_core::Result<_>>()?)
}

fn deliver(
    batch: Vec<Pending>,
    result: Result<ForwardOutput>,
    started: Instant,
    batch_rows: usize,
) {
    let counts: Vec<usize> = batch.iter().map(|p| p.rows).collect();
    // Each output split by the requests' rows: `split[o][r]` is output o of request r.
    let split = result.and_then(|output| {
        let split = output
            .outputs
            .iter()
            .map(|t| t.split_rows(&counts))
            .collect::<kiln_core::Result<Vec<_>>>()
            .map_err(|e| Error::Device(format!("the model answered a malformed batch: {e}")))?;
        Ok((split, output.truncated, output.compute))
    });
    match split {
        Ok((split, truncated, compute)) => {
            let mut per_output: Vec<std::vec::IntoIter<Tensor>> =
                split.into_iter().map(Vec::into_iter).collect();
            let mut start = 0;
            for p in batch {
                let outputs = per_output.iter_mut().filter_map(Iterator::next).collect();
                let rows = start..start + p.rows;
                start += p.rows;
                let _ = p.reply.send(Ok(BatchReply {
                    outputs,
                    queue: started.saturating_duration_since(p.enqueued),
                    compute,
                    batch_rows,
                    truncated: truncated.iter().filter(|r| rows.contains(r)).count(),
                }));
            }
        }
        // A version unloaded while its batch waited is not a device failure: callers get
        // NotLoaded (UNAVAILABLE), which the gateway retries on another replica.
        Err(Error::NotLoaded(key)) => {
            for p in batch {
                let _ = p.reply.send(Err(Error::NotLoaded(key.clone())));
            }
        }
        // A batch the model refused: every request in it hears why.
        Err(Error::Invalid(message)) => {
            for p in batch {
                let _ = p.reply.send(Err(Error::Invalid(message.clone())));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Command, EngineHandle};

    fn key() -> VersionKey {
        VersionKey {
            model: "m".into(),
            version: 1,
        }
    }

    /// `n` rows of two zero features.
    fn rows(n: usize) -> Vec<Tensor> {
        features(&vec![0.0; n * 2])
    }

    /// Rows of two features from `values`.
    fn features(values: &[f32]) -> Vec<Tensor> {
        vec![Tensor::from_f32("input", vec![values.len() / 2, 2], values).unwrap()]
    }

    /// The first (only) output's values.
    fn values(reply: &BatchReply) -> Vec<f32> {
        reply.outputs[0].f32_values().unwrap()
    }

    /// A batcher whose engine is the test: forward passes arrive on the returned channel
    /// and wait there until the test answers them.
    fn batcher(max_batch_size: u32, max_queue_size: u32) -> (Batcher, mpsc::Receiver<Command>) {
        let (engine, commands) = EngineHandle::detached();
        let settings = BatchingSettings {
            max_batch_size,
            max_queue_delay_us: 0,
            max_queue_size,
        };
        (Batcher::spawn(key(), settings, engine), commands)
    }

    /// Answer one forward pass: one output per row, its first feature + 1.
    async fn answer(commands: &mut mpsc::Receiver<Command>) -> usize {
        match commands.recv().await {
            Some(Command::Forward {
                inputs,
                rows,
                reply,
                ..
            }) => {
                let firsts: Vec<f32> = inputs[0]
                    .f32_values()
                    .unwrap()
                    .chunks(inputs[0].row_elements())
                    .map(|r| r[0])
                    .collect();
                let values: Vec<f32> = firsts.iter().map(|v| v + 1.0).collect();
                let output = Tensor::from_f32("output", vec![rows, 1], &values).unwrap();
                // Rows whose first feature is 100 or more count as cut.
                let truncated = (0..rows).filter(|r| firsts[*r] >= 100.0).collect();
                let _ = reply.send(Ok(ForwardOutput {
                    outputs: vec![output],
                    truncated,
                    compute: Duration::from_micros(5),
                }));
                rows
            }
            _ => panic!("expected a forward pass"),
        }
    }

    /// A first request of one row, for the test's engine to hold while others queue.
    fn occupy(batcher: &Batcher) -> tokio::task::JoinHandle<Result<BatchReply>> {
        let b = batcher.clone();
        tokio::spawn(async move { b.infer(rows(1), 1, None).await })
    }

    #[tokio::test]
    async fn queued_requests_ride_one_batch_and_get_their_own_rows() {
        let (batcher, mut commands) = batcher(16, 64);
        // The first request occupies the engine; the next three queue behind it.
        let first = occupy(&batcher);
        tokio::task::yield_now().await;
        let mut waiting = Vec::new();
        for i in 0..3u8 {
            let b = batcher.clone();
            let row = features(&[f32::from(i) * 10.0, 0.0]);
            waiting.push(tokio::spawn(async move { b.infer(row, 1, None).await }));
        }
        while batcher.queue_depth() < 3 {
            tokio::task::yield_now().await;
        }
        assert_eq!(answer(&mut commands).await, 1);
        first.await.unwrap().unwrap();
        // Everything that queued meanwhile goes to the device as one batch of 3 rows.
        assert_eq!(answer(&mut commands).await, 3);
        for (i, task) in waiting.into_iter().enumerate() {
            let reply = task.await.unwrap().unwrap();
            assert_eq!(reply.batch_rows, 3);
            let out = values(&reply)[0];
            assert_eq!(
                out,
                i as f32 * 10.0 + 1.0,
                "caller {i} got someone else's row"
            );
        }
    }

    #[tokio::test]
    async fn requests_in_a_filling_batch_count_as_queued_until_it_leaves() {
        // A batch that waits up to 2 s to fill (it never does: 3 rows of 16).
        let (engine, mut commands) = EngineHandle::detached();
        let settings = BatchingSettings {
            max_batch_size: 16,
            max_queue_delay_us: 2_000_000,
            max_queue_size: 64,
        };
        let batcher = Batcher::spawn(key(), settings, engine);
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let b = batcher.clone();
                tokio::spawn(async move { b.infer(rows(1), 1, None).await })
            })
            .collect();
        let all_counted = async {
            while batcher.queue_depth() < 3 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(1), all_counted)
            .await
            .expect("the three requests never all counted");
        // The batcher has taken them off its channel to fill the batch; they still wait,
        // and still count (an autoscaler's signal).
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(batcher.queue_depth(), 3);
        }
        assert_eq!(answer(&mut commands).await, 3);
        assert_eq!(batcher.queue_depth(), 0);
        for task in waiting {
            task.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn requests_of_other_shapes_wait_for_a_batch_of_their_own_and_cut_rows_are_counted_per_caller()
     {
        let (batcher, mut commands) = batcher(16, 64);
        let first = occupy(&batcher);
        tokio::task::yield_now().await;
        // Two requests of two features (one with a cut row), then one of three features.
        let mut waiting = Vec::new();
        for inputs in [
            features(&[100.0, 0.0, 5.0, 0.0]),
            features(&[7.0, 0.0]),
            vec![Tensor::from_f32("input", vec![1, 3], &[200.0, 0.0, 0.0]).unwrap()],
        ] {
            let b = batcher.clone();
            let rows = inputs[0].rows();
            waiting.push(tokio::spawn(
                async move { b.infer(inputs, rows, None).await },
            ));
            while batcher.queue_depth() < waiting.len() {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(answer(&mut commands).await, 1);
        first.await.unwrap().unwrap();
        assert_eq!(answer(&mut commands).await, 3);
        assert_eq!(answer(&mut commands).await, 1);
        let replies: Vec<BatchReply> = futures::future::join_all(waiting)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        assert_eq!(values(&replies[0]), vec![101.0, 6.0]);
        assert_eq!(values(&replies[1]), vec![8.0]);
        assert_eq!(values(&replies[2]), vec![201.0]);
        let cut: Vec<usize> = replies.iter().map(|r| r.truncated).collect();
        assert_eq!(cut, vec![1, 0, 1]);
        assert_eq!(
            replies.iter().map(|r| r.batch_rows).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
    }

    #[tokio::test]
    async fn a_request_above_max_batch_size_runs_in_pieces_and_keeps_its_row_order() {
        let (batcher, mut commands) = batcher(2, 3);
        // Five rows whose first features are 0, 10, 20, 30, 40.
        let five: Vec<f32> = (0..5).flat_map(|r| [r as f32 * 10.0, 0.0]).collect();
        let task = tokio::spawn({
            let b = batcher.clone();
            async move { b.infer(features(&five), 5, None).await }
        });
        let mut passes = Vec::new();
        for _ in 0..3 {
            passes.push(answer(&mut commands).await);
        }
        // Never more than max_batch_size rows in one pass.
        assert!(passes.iter().all(|&n| n <= 2), "{passes:?}");
        assert_eq!(passes.iter().sum::<usize>(), 5);
        let reply = task.await.unwrap().unwrap();
        assert_eq!(values(&reply), vec![1.0, 11.0, 21.0, 31.0, 41.0]);
        assert_eq!(reply.outputs[0].shape, vec![5, 1]);
        // Seven rows would need 4 pieces; the queue holds 3: refused, naming the limit.
        let e = batcher.infer(rows(7), 7, None).await.unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert!(e.to_string().contains("at most 6 rows"), "{e}");
    }

    #[tokio::test]
    async fn a_full_queue_answers_resource_exhausted_at_once() {
        let (batcher, mut commands) = batcher(1, 2);
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let b = batcher.clone();
            tasks.push(tokio::spawn(async move { b.infer(rows(1), 1, None).await }));
            tokio::task::yield_now().await;
        }
        // One at the engine, two queued: the queue (size 2) is full.
        while batcher.queue_depth() < 2 {
            tokio::task::yield_now().await;
        }
        let refused = batcher.infer(rows(1), 1, None).await.unwrap_err();
        assert!(matches!(refused, Error::QueueFull(2)), "{refused:?}");
        assert_eq!(
            tonic::Status::from(refused).code(),
            tonic::Code::ResourceExhausted
        );
        for _ in 0..3 {
            answer(&mut commands).await;
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn expired_requests_are_dropped_before_compute() {
        let (batcher, mut commands) = batcher(8, 8);
        let busy = tokio::spawn({
            let b = batcher.clone();
            async move { b.infer(rows(1), 1, None).await }
        });
        tokio::task::yield_now().await;
        let late = tokio::spawn({
            let b = batcher.clone();
            let deadline = Instant::now() + Duration::from_millis(20);
            async move { b.infer(rows(2), 2, Some(deadline)).await }
        });
        let on_time = tokio::spawn({
            let b = batcher.clone();
            async move { b.infer(rows(1), 1, None).await }
        });
        while batcher.queue_depth() < 2 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
        answer(&mut commands).await;
        busy.await.unwrap().unwrap();
        // The next pass holds only the caller still in time: 1 row, not 3.
        assert_eq!(answer(&mut commands).await, 1);
        on_time.await.unwrap().unwrap();
        let err = late.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::DeadlineExceeded), "{err:?}");
    }

    #[tokio::test]
    async fn a_version_unloaded_under_a_queued_batch_answers_not_loaded() {
        let (batcher, mut commands) = batcher(4, 8);
        let task = tokio::spawn({
            let b = batcher.clone();
            async move { b.infer(rows(2), 2, None).await }
        });
        match commands.recv().await {
            Some(Command::Forward { key, reply, .. }) => {
                let _ = reply.send(Err(Error::NotLoaded(key)));
            }
            _ => panic!("expected a forward pass"),
        }
        let e = task.await.unwrap().unwrap_err();
        assert!(matches!(e, Error::NotLoaded(_)), "{e}");
        // NotLoaded is UNAVAILABLE on the wire: the gateway tries another replica.
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn a_request_without_rows_is_refused() {
        let (batcher, _commands) = batcher(4, 8);
        let err = batcher.infer(rows(0), 0, None).await.unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err:?}");
        assert_eq!(batcher.queue_depth(), 0);
    }
}
