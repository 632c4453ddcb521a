//! The embedded persistent store for `kiln up`: a [`MemoryStore`] whose every change is
//! written through to a redb file before it becomes visible. State survives a restart;
//! leased keys (live workers) do not, by design — their processes are gone too.

use std::path::Path;

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::kv::KeyValue;
use crate::memory::{Change, MemoryStore, Persist};
use crate::{Error, Result};

/// key → create revision (8 bytes LE) ‖ mod revision (8 bytes LE) ‖ value.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// "revision" → the store's revision.
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");

/// Opens (or creates) the embedded store at a path.
pub struct FileStore;

impl FileStore {
    /// Open the store file at `path`, creating it if missing, and load it into memory.
    pub fn open(path: &Path) -> Result<MemoryStore> {
        // The file is locked while open. A store of this same process that is still
        // closing (its last handle dropping on another thread) lets go within moments,
        // so an "already open" is retried briefly before it is reported.
        let mut attempts = 0;
        let db = loop {
            match Database::create(path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(storage(e)),
            }
        };
        let (records, revision) = load(&db)?;
        Ok(MemoryStore::with_persistence(
            records,
            revision,
            Box::new(RedbPersist { db }),
        ))
    }
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Storage(e.to_string())
}

fn load(db: &Database) -> Result<(Vec<KeyValue>, i64)> {
    // Make sure both tables exist so a fresh file reads back as empty.
    let txn = db.begin_write().map_err(storage)?;
    txn.open_table(RECORDS).map_err(storage)?;
    txn.open_table(META).map_err(storage)?;
    txn.commit().map_err(storage)?;

    let txn = db.begin_read().map_err(storage)?;
    let meta = txn.open_table(META).map_err(storage)?;
    let revision = meta
        .get("revision")
        .map_err(storage)?
        .map_or(0, |v| v.value());
    let table = txn.open_table(RECORDS).map_err(storage)?;
    let mut records = Vec::new();
    for entry in table.iter().map_err(storage)? {
        let (key, value) = entry.map_err(storage)?;
        let key = key.value().to_owned();
        let raw = value.value();
        if raw.len() < 16 {
            return Err(Error::Decode {
                key,
                reason: "record shorter than its header".into(),
            });
        }
        let create_revision = i64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let mod_revision = i64::from_le_bytes(raw[8..16].try_into().unwrap_or_default());
        records.push(KeyValue {
            key,
            value: Bytes::copy_from_slice(&raw[16..]),
            create_revision,
            mod_revision,
            lease: None,
        });
    }
    Ok((records, revision))
}

struct RedbPersist {
    db: Database,
}

impl Persist for RedbPersist {
    fn apply(&self, revision: i64, changes: &[Change<'_>]) -> Result<()> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(RECORDS).map_err(storage)?;
            for change in changes {
                match change {
                    Change::Put(kv) => {
                        let mut raw = Vec::with_capacity(16 + kv.value.len());
                        raw.extend_from_slice(&kv.create_revision.to_le_bytes());
                        raw.extend_from_slice(&kv.mod_revision.to_le_bytes());
                        raw.extend_from_slice(&kv.value);
                        table
                            .insert(kv.key.as_str(), raw.as_slice())
                            .map_err(storage)?;
                    }
                    Change::Delete(key) => {
                        table.remove(*key).map_err(storage)?;
                    }
                }
            }
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert("revision", revision).map_err(storage)?;
        }
        txn.commit().map_err(storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvStore;

    #[tokio::test]
    async fn state_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let revision = {
            let store = FileStore::open(&path).unwrap();
            store
                .put("a", Bytes::from_static(b"1"), None)
                .await
                .unwrap();
            store
                .put("b", Bytes::from_static(b"2"), None)
                .await
                .unwrap();
            store.delete("a").await.unwrap()
        };
        assert!(revision);
        let store = FileStore::open(&path).unwrap();
        let listing = store.list("").await.unwrap();
        assert_eq!(listing.items.len(), 1);
        assert_eq!(listing.items[0].key, "b");
        assert_eq!(&listing.items[0].value[..], b"2");
        // The revision keeps counting where it stopped: nothing is ever reissued.
        assert_eq!(listing.revision, 3);
        let next = store.put("c", Bytes::new(), None).await.unwrap();
        assert_eq!(next, 4);
    }
}
