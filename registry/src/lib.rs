//! Kiln's cluster state and artifact store.
//!
//! - [`kv`]: the etcd-shaped key-value contract ([`KvStore`]): revisions, leases,
//!   compare-and-swap, watch;
//! - [`memory`] and [`file`]: its in-memory and embedded persistent (redb) implementations;
//! - [`spec`]: what a model is (architecture and signature);
//! - [`training`]: what a training job asks for and what it measured;
//! - [`parallel`]: data-parallel training's shared arithmetic (shards, gradient averages);
//! - [`records`]: the JSON records and the key layout;
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
pub mod npy;
pub mod parallel;
pub mod records;
pub mod registry;
pub mod spec;
pub mod testing;
pub mod training;
pub mod view;
pub mod weights;

pub use artifacts::{ArtifactStore, sha256_hex};
pub use error::{Error, Result};
pub use etcd::EtcdStore;
pub use file::FileStore;
pub use kv::{KvStore, LeaseId};
pub use memory::MemoryStore;
pub use registry::{NewModel, NewVersion, Registry};
pub use view::{ClusterView, WatchedView};
pub use weights::MlpWeights;
