//! A consistent, parsed picture of the cluster state, and a background watch that keeps one
//! current. Gateways route from it and the scheduler plans from it, without a store round
//! trip per request.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use crate::kv::{KeyValue, KvStore, WatchEvent};
use crate::registry::decode;
use crate::{Error, Result};
use kiln_core::records::{
    AliasRecord, DeploymentRecord, LeaderRecord, ModelRecord, PlacementRecord, TokenRecord,
    VersionRecord, WorkerRecord, keys,
};

/// The alias an unqualified model name resolves to, when it exists.
pub const DEFAULT_ALIAS: &str = "production";

/// A model with its versions and aliases.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    /// The model record.
    pub record: ModelRecord,
    /// Versions by number.
    pub versions: BTreeMap<u64, VersionRecord>,
    /// Aliases by name.
    pub aliases: BTreeMap<String, AliasRecord>,
}

/// Everything under the prefix, parsed, at one revision.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Store revision of this view.
    pub revision: i64,
    /// Models by name.
    pub models: BTreeMap<String, ModelEntry>,
    /// Live workers by id.
    pub workers: BTreeMap<String, WorkerRecord>,
    /// Placements by worker id.
    pub placements: BTreeMap<String, PlacementRecord>,
    /// Deployments by model name.
    pub deployments: BTreeMap<String, DeploymentRecord>,
    /// The leading scheduler, when one leads.
    pub leader: Option<LeaderRecord>,
    /// Bearer tokens by their SHA-256 (how a request's token is looked up).
    pub tokens: BTreeMap<String, TokenRecord>,
}

impl ClusterView {
    /// Parse a listing of every key under `prefix`.
    pub fn from_listing(prefix: &str, items: &[KeyValue], revision: i64) -> Result<Self> {
        let mut view = ClusterView {
            revision,
            ..Default::default()
        };
        let mut versions = Vec::new();
        let mut aliases = Vec::new();
        for kv in items {
            let Some(key) = kv.key.strip_prefix(prefix) else {
                continue;
            };
            if let Some(rest) = key.strip_prefix(keys::MODELS) {
                match rest.split('/').collect::<Vec<_>>().as_slice() {
                    [_name] => {
                        let record: ModelRecord = decode(&kv.key, &kv.value)?;
                        view.models.insert(
                            record.name.clone(),
                            ModelEntry {
                                record,
                                versions: BTreeMap::new(),
                                aliases: BTreeMap::new(),
                            },
                        );
                    }
                    [_, "versions", _] => {
                        versions.push(decode::<VersionRecord>(&kv.key, &kv.value)?)
                    }
                    [_, "aliases", _] => aliases.push(decode::<AliasRecord>(&kv.key, &kv.value)?),
                    _ => {}
                }
            } else if key.starts_with(keys::WORKERS) {
                let record: WorkerRecord = decode(&kv.key, &kv.value)?;
                view.workers.insert(record.id.clone(), record);
            } else if key.starts_with(keys::PLACEMENTS) {
                let record: PlacementRecord = decode(&kv.key, &kv.value)?;
                view.placements.insert(record.worker.clone(), record);
            } else if key.starts_with(keys::DEPLOYMENTS) {
                let record: DeploymentRecord = decode(&kv.key, &kv.value)?;
                view.deployments.insert(record.model.clone(), record);
            } else if key == keys::LEADER {
                view.leader = Some(decode(&kv.key, &kv.value)?);
            } else if key.starts_with(keys::TOKENS) {
                let record: TokenRecord = decode(&kv.key, &kv.value)?;
                view.tokens.insert(record.sha256.clone(), record);
            }
        }
        for v in versions {
            if let Some(entry) = view.models.get_mut(&v.model) {
                entry.versions.insert(v.version, v);
            }
        }
        for a in aliases {
            if let Some(entry) = view.models.get_mut(&a.model) {
                entry.aliases.insert(a.alias.clone(), a);
            }
        }
        Ok(view)
    }

    /// [`resolve`](Self::resolve) for one request: when the alias it goes through has a
    /// canary, request number `ticket` may go to the canary version instead.
    pub fn resolve_request(
        &self,
        name: &str,
        selector: &str,
        ticket: u64,
    ) -> Result<(&ModelEntry, &VersionRecord)> {
        let (entry, version) = self.resolve(name, selector)?;
        let alias = if selector.is_empty() {
            entry.aliases.get(DEFAULT_ALIAS)
        } else {
            entry.aliases.get(selector)
        };
        if let Some(canary) = alias.and_then(|a| a.canary)
            && canary.takes(ticket)
            && let Some(v) = entry.versions.get(&canary.version)
        {
            return Ok((entry, v));
        }
        Ok((entry, version))
    }

    /// Resolve a model name and a version selector: empty means the `production` alias,
    /// else the latest version; digits name a version; anything else is an alias.
    pub fn resolve(&self, name: &str, selector: &str) -> Result<(&ModelEntry, &VersionRecord)> {
        let entry = self.models.get(name).ok_or_else(|| Error::NotFound {
            what: format!("model {name:?}"),
        })?;
        let number = if selector.is_empty() {
            match entry.aliases.get(DEFAULT_ALIAS) {
                Some(alias) => alias.version,
                None => *entry
                    .versions
                    .keys()
                    .next_back()
                    .ok_or_else(|| Error::NotFound {
                        what: format!("a version of model {name:?}"),
                    })?,
            }
        } else if selector.chars().all(|c| c.is_ascii_digit()) {
            selector.parse::<u64>().map_err(|_| {
                Error::Invalid(format!(
                    "version {selector:?} is not a valid version number"
                ))
            })?
        } else {
            entry
                .aliases
                .get(selector)
                .ok_or_else(|| Error::NotFound {
                    what: format!("alias {selector:?} of model {name:?}"),
                })?
                .version
        };
        let version = entry.versions.get(&number).ok_or_else(|| Error::NotFound {
            what: format!("version {number} of model {name:?}"),
        })?;
        Ok((entry, version))
    }

    /// The deployment of a model (the default when none was written).
    pub fn deployment(&self, model: &str) -> DeploymentRecord {
        self.deployments
            .get(model)
            .cloned()
            .unwrap_or_else(|| DeploymentRecord::default_for(model))
    }
}

/// A view kept current by a background watch.
#[derive(Clone)]
pub struct WatchedView {
    current: Arc<RwLock<Arc<ClusterView>>>,
    changed: watch::Receiver<i64>,
    /// Stops the watch task when the last handle goes, releasing the store at once.
    _task: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl WatchedView {
    /// Read the state, then follow every change under `prefix` in a background task that
    /// ends when every handle is dropped. A watch that falls behind the store's history
    /// re-lists at one revision and watches on from there.
    pub async fn start(store: Arc<dyn KvStore>, prefix: String) -> Result<Self> {
        let listing = store.list(&prefix).await?;
        let view = ClusterView::from_listing(&prefix, &listing.items, listing.revision)?;
        let current = Arc::new(RwLock::new(Arc::new(view)));
        let (tx, changed) = watch::channel(listing.revision);
        let items: BTreeMap<String, KeyValue> = listing
            .items
            .into_iter()
            .map(|kv| (kv.key.clone(), kv))
            .collect();
        let task = tokio::spawn(follow(
            store,
            prefix,
            items,
            listing.revision,
            current.clone(),
            tx,
        ));
        Ok(Self {
            current,
            changed,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }

    /// The latest view.
    pub fn current(&self) -> Arc<ClusterView> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// A receiver that changes whenever the view does (its value is the revision).
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.changed.clone()
    }

    /// Wait until `predicate` holds for the view, or `timeout` passes; returns the view that
    /// satisfied it.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut predicate: impl FnMut(&ClusterView) -> bool,
    ) -> Option<Arc<ClusterView>> {
        let mut rx = self.subscribe();
        let wait = async {
            loop {
                let view = self.current();
                if predicate(&view) {
                    return Some(view);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }
}

async fn follow(
    store: Arc<dyn KvStore>,
    prefix: String,
    mut items: BTreeMap<String, KeyValue>,
    mut revision: i64,
    current: Arc<RwLock<Arc<ClusterView>>>,
    tx: watch::Sender<i64>,
) {
    loop {
        if tx.is_closed() {
            return;
        }
        let stream = match store.watch(&prefix, revision + 1).await {
            Ok(stream) => Some(stream),
            Err(Error::Compacted { .. }) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cluster-state watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut relist = stream.is_none();
        if let Some(mut stream) = stream {
            loop {
                // Wake up now and then so a view nobody holds any more stops its task.
                let next = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
                let event = match next {
                    Err(_) if tx.is_closed() => return,
                    Err(_) => continue,
                    Ok(None) => break,
                    Ok(Some(Err(_))) => {
                        relist = true;
                        break;
                    }
                    Ok(Some(Ok(event))) => event,
                };
                revision = event.revision();
                // Jobs and datasets change every epoch and are not part of the view.
                if !in_view(&prefix, event.key()) {
                    continue;
                }
                match event {
                    WatchEvent::Put(kv) => {
                        items.insert(kv.key.clone(), kv);
                    }
                    WatchEvent::Delete { key, .. } => {
                        items.remove(&key);
                    }
                }
                publish(&prefix, &items, revision, &current, &tx);
            }
        }
        if relist {
            match store.list(&prefix).await {
                Ok(listing) => {
                    items = listing
                        .items
                        .into_iter()
                        .map(|kv| (kv.key.clone(), kv))
                        .collect();
                    revision = listing.revision;
                    publish(&prefix, &items, revision, &current, &tx);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cluster-state re-list failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// Whether a key is one the view is built from.
fn in_view(prefix: &str, key: &str) -> bool {
    key.strip_prefix(prefix).is_some_and(|k| {
        [
            keys::MODELS,
            keys::WORKERS,
            keys::PLACEMENTS,
            keys::DEPLOYMENTS,
            keys::LEADER,
            keys::TOKENS,
        ]
        .iter()
        .any(|p| k.starts_with(p))
    })
}

fn publish(
    prefix: &str,
    items: &BTreeMap<String, KeyValue>,
    revision: i64,
    current: &RwLock<Arc<ClusterView>>,
    tx: &watch::Sender<i64>,
) {
    let all: Vec<KeyValue> = items.values().cloned().collect();
    match ClusterView::from_listing(prefix, &all, revision) {
        Ok(view) => {
            *current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
            let _ = tx.send(revision);
        }
        Err(e) => {
            tracing::error!(error = %e, "cluster state does not decode; keeping the last good view")
        }
    }
}
