//! TLS for Kiln's listeners and channels: rustls with the ring provider, certificates from
//! PEM files. A listener's certificate, key and client CA are re-read when their files
//! change (checked every second), so a certificate renewed on disk — by cert-manager, by
//! an operator — is served to the next connection without a restart; a broken renewal is
//! logged and the last good set kept. With a client CA, a listener refuses every peer
//! without a certificate from it (mutual TLS).
//!
//! Channels: once [`set_client`] is called, every channel the process opens (see
//! [`crate::channel`]) speaks TLS, trusting the given CA and presenting the process's own
//! certificate when it has one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, Result};

/// How often a listener looks at its certificate files.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of a listener's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When given, clients must present a certificate signed by one of these CAs (PEM).
    pub client_ca: Option<PathBuf>,
}

/// A listener's TLS configuration, kept current with its files.
#[derive(Clone)]
pub struct ServerTls {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

fn tls_error(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("{} ({what}): {e}", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error(path, what, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_error(path, what, e))?;
    if certs.is_empty() {
        return Err(tls_error(path, what, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn build(files: &ServerTlsFiles) -> Result<ServerConfig> {
    let certs = read_certs(&files.cert, "--tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| tls_error(&files.key, "--tls-key", e))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(path, "--tls-client-ca")? {
                roots
                    .add(cert)
                    .map_err(|e| tls_error(path, "--tls-client-ca", e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| tls_error(path, "--tls-client-ca", e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| tls_error(&files.cert, "--tls-cert and --tls-key", e))?;
    // gRPC is HTTP/2 only; clients (grpc-core among them) insist on ALPN `h2`.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// What a file looks like from outside: a change in either means it was rewritten.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn stamps(files: &ServerTlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    std::iter::once(&files.cert)
        .chain(std::iter::once(&files.key))
        .chain(files.client_ca.iter())
        .map(|p| stamp(p))
        .collect()
}

impl ServerTls {
    /// Read the files (an error names the file and the flag), and follow them in a
    /// background task for as long as the configuration is in use.
    pub fn load(files: ServerTlsFiles) -> Result<Self> {
        let current = Arc::new(RwLock::new(Arc::new(build(&files)?)));
        let weak = Arc::downgrade(&current);
        let mut seen = stamps(&files);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_CHECK).await;
                let Some(current) = weak.upgrade() else {
                    return;
                };
                let now = stamps(&files);
                if now == seen {
                    continue;
                }
                seen = now;
                match build(&files) {
                    Ok(config) => {
                        *current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
                        tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => tracing::error!(
                        error = %e,
                        "TLS files changed but do not load; serving the previous certificate"
                    ),
                }
            }
        });
        Ok(Self { current })
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The files of the process's channels' TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The CA (PEM) that peers' certificates must come from.
    pub ca: PathBuf,
    /// The process's own certificate chain and key, presented to peers that ask for one.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name peers' certificates must carry (default: the host of the address called).
    pub server_name: Option<String>,
}

/// The TLS every channel of this process uses.
#[derive(Debug, Clone)]
pub(crate) struct ClientTls {
    pub(crate) config: tonic::transport::ClientTlsConfig,
}

static CLIENT: OnceLock<ClientTls> = OnceLock::new();

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| tls_error(path, what, e))
}

/// From now on, every channel this process opens speaks TLS with `files` (the first call
/// wins). The files are read now; an error names the file and the flag.
pub fn set_client(files: &ClientTlsFiles) -> Result<()> {
    let ca = read(&files.ca, "--tls-ca")?;
    // Parse here, so that a wrong file is refused at start with its name rather than at
    // the first call.
    read_certs(&files.ca, "--tls-ca")?;
    let mut config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    if let Some((cert, key)) = &files.identity {
        read_certs(cert, "--tls-cert")?;
        PrivateKeyDer::from_pem_file(key).map_err(|e| tls_error(key, "--tls-key", e))?;
        config = config.identity(tonic::transport::Identity::from_pem(
            read(cert, "--tls-cert")?,
            read(key, "--tls-key")?,
        ));
    }
    if let Some(name) = &files.server_name {
        config = config.domain_name(name.clone());
    }
    let _ = CLIENT.set(ClientTls { config });
    Ok(())
}

/// The process's channel TLS, once set.
pub(crate) fn client() -> Option<&'static ClientTls> {
    CLIENT.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bad_file_is_refused_at_start_naming_it_and_its_flag() {
        let dir = std::env::temp_dir().join(format!("kiln-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let missing = dir.join("missing.pem");
        let files = |cert: &Path| ServerTlsFiles {
            cert: cert.to_path_buf(),
            key: garbage.clone(),
            client_ca: None,
        };
        let e = ServerTls::load(files(&missing)).err().unwrap().to_string();
        assert!(e.contains("missing.pem") && e.contains("--tls-cert"), "{e}");
        let e = ServerTls::load(files(&garbage)).err().unwrap().to_string();
        assert!(
            e.contains("no PEM certificate") && e.contains("garbage.pem"),
            "{e}"
        );
        let e = set_client(&ClientTlsFiles {
            ca: garbage.clone(),
            identity: None,
            server_name: None,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--tls-ca"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
