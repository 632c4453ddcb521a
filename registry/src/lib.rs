//! Kiln's cluster state storage and artifact store. The records stored here, and what they
//! describe (specs, jobs), are `kiln_core`'s; this crate keeps them.
//!
//! - [`kv`]: the etcd-shaped key-value contract ([`KvStore`]): revisions, leases,
//!   compare-and-swap, watch;
//! - [`memory`] and [`file`]: its in-memory and embedded persistent (redb) implementations;
//! - [`etcd`]: its etcd implementation, for cluster mode;
//! - errors ([`Error`]) and their one mapping to gRPC statuses (`From<Error> for Status`);
//! - [`registry`]: typed operations over a store ([`Registry`]);
//! - [`view`]: a parsed snapshot ([`ClusterView`]) kept current by a watch ([`WatchedView`]);
//! - [`artifacts`]: weights, content-addressed by sha256 ([`ArtifactStore`]).

#![forbid(unsafe_code)]

pub mod artifacts;
mod error;
pub mod etcd;
pub mod file;
pub mod kv;
pub mod memory;
pub mod registry;
mod status;
pub mod testing;
pub mod view;

pub use artifacts::{ArtifactStore, sha256_hex};
pub use error::{Error, Result};
pub use etcd::{EtcdStore, EtcdTls};
pub use file::FileStore;
pub use kv::{KvStore, LeaseId};
pub use memory::MemoryStore;
pub use registry::{NewModel, NewVersion, Registry};
pub use view::{ClusterView, WatchedView};
