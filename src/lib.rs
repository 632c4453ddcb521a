//! The `kiln` binary's library: the embedded cluster ([`embedded`]) that `kiln up` runs,
//! the client commands ([`client`]) and the benchmark ([`bench`]). Cluster tests in `tests/` drive both.

#![forbid(unsafe_code)]

pub mod bench;
pub mod client;
pub mod embedded;
pub mod train;
