//! A real etcd server for tests and benchmarks: the `etcd` binary (Debian's `etcd-server`)
//! started on free loopback ports with a temporary data directory, stopped and removed when
//! dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, EtcdStore, Result};

/// A running etcd with one member.
pub struct EtcdServer {
    child: Child,
    /// The client URL, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Etcd(format!("no free loopback port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::Etcd(e.to_string()))
}

/// Where the etcd binary is: `KILN_ETCD_BIN`, else `etcd` on the `PATH`.
fn etcd_binary() -> PathBuf {
    std::env::var_os("KILN_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

impl EtcdServer {
    /// Start etcd and wait until it answers (at most 20 s).
    pub async fn start() -> Result<Self> {
        let dir = tempfile::tempdir().map_err(|e| Error::Etcd(e.to_string()))?;
        let (client, peer) = (free_port()?, free_port()?);
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log"))
            .map_err(|e| Error::Etcd(e.to_string()))?;
        let child = Command::new(etcd_binary())
            .arg("--name")
            .arg("kiln-test")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&endpoint)
            .arg("--advertise-client-urls")
            .arg(&endpoint)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("kiln-test={peer_url}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                Error::Etcd(format!(
                    "cannot start {}: {e} (install Debian's etcd-server, or set KILN_ETCD_BIN)",
                    etcd_binary().display()
                ))
            })?;
        let mut server = Self {
            child,
            endpoint,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match EtcdStore::connect(
                std::slice::from_ref(&server.endpoint),
                Duration::from_secs(2),
            )
            .await
            {
                Ok(_) => return Ok(server),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => {
                    if let Ok(Some(status)) = server.child.try_wait() {
                        return Err(Error::Etcd(format!("etcd exited at start: {status}")));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// A store connected to this server.
    pub async fn store(&self) -> Result<EtcdStore> {
        EtcdStore::connect(std::slice::from_ref(&self.endpoint), Duration::from_secs(5)).await
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
