//! Membership: the worker's record in the cluster state, under a lease it keeps alive,
//! rewritten when what it holds changes, and revoked when it stops.

use super::*;

pub(super) fn record(state: &State) -> WorkerRecord {
    WorkerRecord {
        schema: SCHEMA,
        id: state.id.clone(),
        address: state.address.clone(),
        backend: state.backend.to_owned(),
        adapter: state.adapter.clone(),
        loaded: {
            let used = lock(&state.last_used);
            lock(&state.loaded)
                .values()
                .cloned()
                .map(|mut l| {
                    // To the second: a busy model changes its record once per renewal at most.
                    l.last_used_unix_ms = used.get(&l.key).map_or(0, |ms| ms / 1000 * 1000);
                    l
                })
                .collect()
        },
        started_unix_ms: state.started_unix_ms,
        memory_bytes: state.memory_bytes,
        training: training_runs(state) as u32,
    }
}

/// Training runs in progress: tracked, still held, and not told to stop.
pub(crate) fn training_runs(state: &State) -> usize {
    lock(&state.runs)
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .filter(|cancel| !cancel.load(std::sync::atomic::Ordering::Relaxed))
        .count()
}

pub(super) async fn register(state: &State, ttl: Duration) -> Result<()> {
    let lease = state.deps.registry.grant_lease(ttl).await?;
    *lock(&state.lease) = Some(lease);
    let now = record(state);
    state.deps.registry.put_worker(&now, lease).await?;
    *lock(&state.written) = Some(now);
    Ok(())
}

pub(super) async fn deregister(state: &State) {
    state
        .stopping
        .store(true, std::sync::atomic::Ordering::Relaxed);
    // Training runs stop before their next batch; their streams end and the scheduler
    // hands the jobs to other workers.
    for run in lock(&state.runs).drain(..) {
        if let Some(cancel) = run.upgrade() {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let lease = lock(&state.lease).take();
    if let Some(lease) = lease
        && let Err(e) = state.deps.registry.store().revoke_lease(lease).await
    {
        tracing::warn!(error = %e, "could not revoke the worker's lease");
    }
}

/// Keep the lease alive and the record current; a lease that was lost (e.g. the process
/// stalled past its TTL) is replaced by a fresh registration.
pub(super) async fn keep_registered(state: Arc<State>, ttl: Duration) {
    let period = ttl / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = state.report.notified() => {}
        }
        if state.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let lease = *lock(&state.lease);
        let alive = match lease {
            Some(lease) => state.deps.registry.store().keep_alive(lease).await.is_ok(),
            None => false,
        };
        let result = if let (true, Some(lease)) = (alive, lease) {
            // The lease is renewed; the record is written only when it says something new.
            let now = record(&state);
            if lock(&state.written).as_ref() == Some(&now) {
                Ok(())
            } else {
                let written = state.deps.registry.put_worker(&now, lease).await;
                if written.is_ok() {
                    *lock(&state.written) = Some(now);
                }
                written
            }
        } else {
            if lease.is_some() {
                tracing::warn!(worker = %state.id, "lease lost; taking no work until registered again");
                *lock(&state.lease) = None;
            }
            register(&state, ttl).await.map_err(|e| match e {
                Error::Registry(e) => e,
                other => kiln_registry::Error::Storage(other.to_string()),
            })
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not refresh the worker record");
        }
    }
}
