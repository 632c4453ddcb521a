//! Placement: the worker follows the `placements/<worker>` key the scheduler writes,
//! loading (fetch, verify sha256, build on the device, start a batcher) and unloading
//! versions, and reports each version's state.

use super::*;

pub(super) async fn follow_placement(state: Arc<State>) {
    let registry = state.deps.registry.clone();
    let key = format!("{}{}", registry.prefix(), keys::placement(&state.id));
    loop {
        let revision = match registry.store().list(&key).await {
            Ok(listing) => listing.revision,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        match registry.placement(&state.id).await {
            Ok(placement) => {
                let desired: BTreeSet<VersionKey> = placement.versions.into_iter().collect();
                reconcile(&state, &desired).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read placement"),
        }
        let Ok(mut changes) = registry.store().watch(&key, revision + 1).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // Any change (or a broken watch) sends us round the loop to re-read and reconcile;
        // so does a quiet spell, which retries versions that failed to load.
        let _ = tokio::time::timeout(RETRY_FAILED_LOADS, changes.next()).await;
    }
}

pub(super) async fn reconcile(state: &Arc<State>, desired: &BTreeSet<VersionKey>) {
    // A stopping worker has left the routing table; the placement controller moves its
    // versions elsewhere, but what it holds stays until its in-flight calls are answered.
    if state.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let held: Vec<VersionKey> = lock(&state.loaded).keys().cloned().collect();
    for key in held.iter().filter(|k| !desired.contains(*k)) {
        unload_version(state, key).await;
    }
    for key in desired {
        let held = lock(&state.loaded)
            .get(key)
            .is_some_and(|l| l.state != LoadState::Failed);
        if !held {
            let _ = load_version(state, key, None).await;
        }
    }
}

pub(super) fn set_loaded(state: &State, key: &VersionKey, load: LoadState, reason: String) {
    lock(&state.loaded).insert(
        key.clone(),
        LoadedRecord {
            key: key.clone(),
            state: load,
            reason,
            last_used_unix_ms: 0,
        },
    );
    state.report.notify_one();
}

pub(super) async fn load_version(
    state: &Arc<State>,
    key: &VersionKey,
    batching: Option<BatchingSettings>,
) -> Result<()> {
    set_loaded(state, key, LoadState::Loading, String::new());
    let started = Instant::now();
    let span = tracing::info_span!(
        "model load",
        kiln.model.name = %key.model,
        kiln.model.version = key.version as i64,
    );
    match fetch_and_build(state, key, batching)
        .instrument(span.clone())
        .await
    {
        Ok(()) => {
            lock(&state.load_seconds)[0].observe(started.elapsed().as_secs_f64());
            span.in_scope(|| tracing::info!(version = %key, elapsed_ms = started.elapsed().as_millis() as u64, "model loaded"));
            set_loaded(state, key, LoadState::Ready, String::new());
            Ok(())
        }
        Err(e) => {
            lock(&state.load_seconds)[1].observe(started.elapsed().as_secs_f64());
            span.in_scope(|| tracing::warn!(version = %key, error = %e, "model failed to load"));
            set_loaded(state, key, LoadState::Failed, e.public_text());
            Err(e)
        }
    }
}

pub(super) async fn fetch_and_build(
    state: &Arc<State>,
    key: &VersionKey,
    batching: Option<BatchingSettings>,
) -> Result<()> {
    let registry = &state.deps.registry;
    let view = registry.view().await?;
    let (entry, version) = view.resolve(&key.model, &key.version.to_string())?;
    let spec = entry.record.spec.clone();
    let mut artifacts = crate::family::Artifacts {
        weights: state.deps.artifacts.get(&version.artifact).await?,
        files: Default::default(),
        preprocessing: version.preprocessing.clone(),
    };
    for (name, artifact) in &version.files {
        let bytes = state.deps.artifacts.get(artifact).await?;
        artifacts.files.insert(name.clone(), bytes);
    }
    let interface = spec.interface(&entry.record.signature);
    // Decoded and checked by the version's family off the device thread; built on it.
    let prepared = {
        let spec = spec.clone();
        let interface = interface.clone();
        tokio::task::spawn_blocking(move || {
            crate::family::family(&spec).prepare(&spec, interface, artifacts)
        })
        .await
        .map_err(|e| Error::Device(e.to_string()))??
    };
    let batching = batching.unwrap_or_else(|| view.deployment(&key.model).batching);
    state.engine.load(key.clone(), prepared).await?;
    let batcher = Batcher::spawn(key.clone(), batching, state.engine.clone());
    lock(&state.weight_bytes).insert(key.clone(), spec.parameter_count() * 4);
    // Generation versions queue on the engine's generator; their batcher stays idle.
    state
        .served
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            key.clone(),
            Served {
                batcher,
                interface,
                spec: spec.clone(),
            },
        );
    Ok(())
}

pub(super) async fn unload_version(state: &Arc<State>, key: &VersionKey) {
    state
        .served
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .remove(key);
    let _ = state.engine.unload(key.clone()).await;
    lock(&state.weight_bytes).remove(key);
    lock(&state.loaded).remove(key);
    state.report.notify_one();
    tracing::info!(version = %key, "model unloaded");
}
