//! The key-value contract under all cluster state, shaped like etcd's so that an etcd
//! implementation fits it: every write bumps one global revision, keys may be bound to
//! leases, writes can be conditional on a key's last revision, and watches resume from a
//! revision.

use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;

use crate::Result;

/// Largest value a key may hold: records stay small (weights and datasets go to the
/// artifact store), well under etcd's 1.5 MiB request limit.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;

/// Refuse a value over [`MAX_VALUE_BYTES`] before it is sent anywhere.
pub fn check_value_size(key: &str, value: &[u8]) -> crate::Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(crate::Error::Invalid(format!(
            "the record for {key} is {} bytes; records are limited to {MAX_VALUE_BYTES} bytes",
            value.len()
        )));
    }
    Ok(())
}

/// A lease id; keys bound to a lease vanish when it expires or is revoked.
pub type LeaseId = i64;

/// One stored key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// Full key, prefix included.
    pub key: String,
    /// The value bytes.
    pub value: Bytes,
    /// Revision of the write that created the key.
    pub create_revision: i64,
    /// Revision of the last write to the key.
    pub mod_revision: i64,
    /// Lease the key is bound to, if any.
    pub lease: Option<LeaseId>,
}

/// The answer of a prefix listing: the keys and the revision they were read at, so a watch
/// can continue from `revision + 1` without missing or repeating anything.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Keys under the prefix, in key order.
    pub items: Vec<KeyValue>,
    /// Store revision at the time of the read.
    pub revision: i64,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or replaced.
    Put(KeyValue),
    /// A key was deleted (by a call, or by its lease ending).
    Delete {
        /// The deleted key.
        key: String,
        /// Revision of the deletion.
        revision: i64,
    },
}

impl WatchEvent {
    /// The revision at which the change happened.
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }

    /// The key that changed.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

/// The condition of a compare-and-put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key's last write must have been at this revision.
    ModRevision(i64),
}

/// A stream of changes; it ends with an error if the store cannot go on (e.g. compacted).
pub type WatchStream = BoxStream<'static, Result<WatchEvent>>;

/// The cluster-state store. Implementations: [`crate::MemoryStore`] (tests, and the engine
/// of the embedded store), [`crate::FileStore`] (persistent, for `kiln up`), and etcd
/// (cluster mode).
#[async_trait::async_trait]
pub trait KvStore: Send + Sync + 'static {
    /// Read one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Read every key under a prefix, at one revision.
    async fn list(&self, prefix: &str) -> Result<Listing>;
    /// Write a key unconditionally; returns the new revision.
    async fn put(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> Result<i64>;
    /// Write a key if `expect` holds. `Ok(Ok(revision))` when written, `Ok(Err(current))`
    /// with the key's current state (None: absent) when the condition failed.
    async fn compare_and_put(
        &self,
        key: &str,
        expect: Expect,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<std::result::Result<i64, Option<KeyValue>>>;
    /// Delete a key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool>;
    /// Grant a lease that lives `ttl` unless kept alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;
    /// Renew a lease; fails with [`crate::Error::LeaseExpired`] if it already ended.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;
    /// End a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;
    /// Watch every change under `prefix` from `from_revision` on (inclusive).
    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream>;
}
