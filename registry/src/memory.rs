//! An in-process [`KvStore`]: the whole state in a `BTreeMap` behind a mutex, with a bounded
//! history for watches. It is also the engine of the embedded [`crate::FileStore`], which
//! plugs a [`Persist`] hook under it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::broadcast;

use crate::kv::{Expect, KeyValue, KvStore, LeaseId, Listing, WatchEvent, WatchStream};
use crate::{Error, Result};

/// How many past events a watch can resume from before it must re-list.
const HISTORY: usize = 10_000;
/// Capacity of the live event channel; a watcher further behind than this re-lists.
const LIVE_EVENTS: usize = 4_096;
/// How often expired leases are swept.
const LEASE_SWEEP: Duration = Duration::from_millis(100);

/// A change handed to a [`Persist`] hook.
#[derive(Debug)]
pub enum Change<'a> {
    /// A key was written.
    Put(&'a KeyValue),
    /// A key was deleted.
    Delete(&'a str),
}

/// Durable storage under a [`MemoryStore`]. Called with the state lock held, so changes
/// reach it in revision order. Leased keys are never handed to it: they belong to a live
/// process and would be stale after a restart.
pub trait Persist: Send + Sync + 'static {
    /// Make `changes` durable, together with the store's new `revision`.
    fn apply(&self, revision: i64, changes: &[Change<'_>]) -> Result<()>;
}

/// An in-process key-value store with etcd's semantics (revisions, leases, CAS, watch).
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Live events for watchers; history covers those that start behind.
    events: broadcast::Sender<WatchEvent>,
    persist: Option<Box<dyn Persist>>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

#[derive(Default)]
struct State {
    revision: i64,
    data: BTreeMap<String, KeyValue>,
    history: VecDeque<WatchEvent>,
    /// Highest revision no longer in `history` (0: nothing dropped yet).
    compacted: i64,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::build(State::default(), None)
    }

    /// A store that starts from `records` at `revision` and hands every change to `persist`.
    pub fn with_persistence(
        records: Vec<KeyValue>,
        revision: i64,
        persist: Box<dyn Persist>,
    ) -> Self {
        let state = State {
            revision,
            data: records.into_iter().map(|kv| (kv.key.clone(), kv)).collect(),
            compacted: revision,
            ..State::default()
        };
        Self::build(state, Some(persist))
    }

    fn build(state: State, persist: Option<Box<dyn Persist>>) -> Self {
        let (events, _) = broadcast::channel(LIVE_EVENTS);
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            events,
            persist,
        });
        // Leases expire in the background when a runtime is there to run the sweeper;
        // every call also sweeps first, so a store used without a runtime stays correct.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&inner);
            handle.spawn(sweep_leases(weak));
        }
        Self { inner }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than stopping the cluster, so poisoning is ignored.
        let mut state = self
            .inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.inner.expire(&mut state, Instant::now());
        state
    }
}

async fn sweep_leases(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(LEASE_SWEEP).await;
        let Some(inner) = inner.upgrade() else { return };
        let mut state = inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        inner.expire(&mut state, Instant::now());
    }
}

// === impl Inner ===

impl Inner {
    fn expire(&self, state: &mut State, now: Instant) {
        let expired: Vec<LeaseId> = state
            .leases
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.end_lease(state, id);
        }
    }

    fn end_lease(&self, state: &mut State, id: LeaseId) {
        if let Some(lease) = state.leases.remove(&id) {
            for key in lease.keys {
                // Leased keys are never persisted, so there is nothing to tell `persist`.
                if state.data.remove(&key).is_some() {
                    state.revision += 1;
                    let revision = state.revision;
                    self.publish(state, WatchEvent::Delete { key, revision });
                }
            }
        }
    }

    fn publish(&self, state: &mut State, event: WatchEvent) {
        if state.history.len() == HISTORY
            && let Some(old) = state.history.pop_front()
        {
            state.compacted = old.revision();
        }
        state.history.push_back(event.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event);
    }

    fn write(
        &self,
        state: &mut State,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<i64> {
        crate::kv::check_value_size(key, &value)?;
        if let Some(id) = lease
            && !state.leases.contains_key(&id)
        {
            return Err(Error::LeaseExpired(id));
        }
        let revision = state.revision + 1;
        let previous = state.data.get(key);
        let create_revision = previous.map_or(revision, |kv| kv.create_revision);
        let previous_lease = previous.and_then(|kv| kv.lease);
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision,
            mod_revision: revision,
            lease,
        };
        if lease.is_none()
            && let Some(persist) = &self.persist
        {
            persist.apply(revision, &[Change::Put(&kv)])?;
        }
        if let Some(old) = previous_lease
            && let Some(old_lease) = state.leases.get_mut(&old)
        {
            old_lease.keys.remove(key);
        }
        if let Some(id) = lease
            && let Some(l) = state.leases.get_mut(&id)
        {
            l.keys.insert(key.to_owned());
        }
        state.revision = revision;
        state.data.insert(key.to_owned(), kv.clone());
        self.publish(state, WatchEvent::Put(kv));
        Ok(revision)
    }
}

// === impl KvStore for MemoryStore ===

#[async_trait::async_trait]
impl KvStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(self.lock().data.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let state = self.lock();
        let items = state
            .data
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(Listing {
            items,
            revision: state.revision,
        })
    }

    async fn put(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> Result<i64> {
        let mut state = self.lock();
        self.inner.write(&mut state, key, value, lease)
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expect: Expect,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<std::result::Result<i64, Option<KeyValue>>> {
        let mut state = self.lock();
        let current = state.data.get(key);
        let holds = match (expect, current) {
            (Expect::Absent, None) => true,
            (Expect::ModRevision(rev), Some(kv)) => kv.mod_revision == rev,
            _ => false,
        };
        if !holds {
            return Ok(Err(current.cloned()));
        }
        Ok(Ok(self.inner.write(&mut state, key, value, lease)?))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let mut state = self.lock();
        let Some(old) = state.data.get(key).cloned() else {
            return Ok(false);
        };
        let revision = state.revision + 1;
        if old.lease.is_none()
            && let Some(persist) = &self.inner.persist
        {
            persist.apply(revision, &[Change::Delete(key)])?;
        }
        if let Some(id) = old.lease
            && let Some(lease) = state.leases.get_mut(&id)
        {
            lease.keys.remove(key);
        }
        state.data.remove(key);
        state.revision = revision;
        self.inner.publish(
            &mut state,
            WatchEvent::Delete {
                key: key.to_owned(),
                revision,
            },
        );
        Ok(true)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(Error::Invalid("lease ttl must be above 0".into()));
        }
        let mut state = self.lock();
        state.next_lease += 1;
        let id = state.next_lease;
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut state = self.lock();
        let l = state
            .leases
            .get_mut(&lease)
            .ok_or(Error::LeaseExpired(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let mut state = self.lock();
        self.inner.end_lease(&mut state, lease);
        Ok(())
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream> {
        let state = self.lock();
        let from = if from_revision <= 0 {
            state.revision + 1
        } else {
            from_revision
        };
        if from <= state.compacted {
            return Err(Error::Compacted {
                requested: from,
                oldest: state.compacted + 1,
            });
        }
        let prefix = prefix.to_owned();
        let backlog: Vec<WatchEvent> = state
            .history
            .iter()
            .filter(|e| e.revision() >= from && e.key().starts_with(&prefix))
            .cloned()
            .collect();
        // Subscribing under the lock means no event falls between backlog and live.
        let live = tokio_stream::wrappers::BroadcastStream::new(self.inner.events.subscribe());
        drop(state);
        let live = live.filter_map(move |item| {
            let prefix = prefix.clone();
            async move {
                match item {
                    Ok(event) if event.revision() >= from && event.key().starts_with(&prefix) => {
                        Some(Ok(event))
                    }
                    Ok(_) => None,
                    Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                        Some(Err(Error::Compacted {
                            requested: from,
                            oldest: from + n as i64,
                        }))
                    }
                }
            }
        });
        Ok(futures::stream::iter(backlog.into_iter().map(Ok))
            .chain(live)
            .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leased_keys_vanish_when_the_lease_ends() {
        let store = MemoryStore::new();
        let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        store
            .put("w/1", Bytes::from_static(b"x"), Some(lease))
            .await
            .unwrap();
        let mut watch = store.watch("w/", 0).await.unwrap();
        store.revoke_lease(lease).await.unwrap();
        assert!(store.get("w/1").await.unwrap().is_none());
        let event = watch.next().await.unwrap().unwrap();
        assert!(matches!(event, WatchEvent::Delete { ref key, .. } if key == "w/1"));
        assert!(store.keep_alive(lease).await.is_err());
    }
}
