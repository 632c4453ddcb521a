//! The artifact store: weights live here, content-addressed by sha256, never in the
//! cluster state (which keeps only the pointer and the checksum).

use std::sync::Arc;

use bytes::Bytes;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use sha2::{Digest, Sha256};

use crate::{Error, Result};
use kiln_core::records::ArtifactRef;

/// Where weights are kept: a local (or shared) directory, addressed as `file:///…`, or an
/// S3 bucket and prefix, `s3://bucket/prefix`.
#[derive(Clone)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    /// The store's URL, the prefix of every artifact URI.
    base: String,
}

impl ArtifactStore {
    /// Open a store from a URL: `file:///abs/dir` or a plain directory path (created when
    /// missing), or `s3://bucket/prefix` (an S3 or S3-compatible store, configured by the
    /// standard AWS environment variables: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION` or `AWS_DEFAULT_REGION`, and `AWS_ENDPOINT` with `AWS_ALLOW_HTTP=true`
    /// for a server on plain HTTP).
    pub fn open(location: &str) -> Result<Self> {
        if let Some(rest) = location.strip_prefix("s3://") {
            return Self::open_s3(location, rest);
        }
        let path = location.strip_prefix("file://").unwrap_or(location);
        if location.contains("://") && !location.starts_with("file://") {
            return Err(Error::Invalid(format!(
                "artifact store {location:?}: use file:///dir or s3://bucket/prefix"
            )));
        }
        std::fs::create_dir_all(path)
            .map_err(|e| Error::Artifacts(format!("cannot create {path}: {e}")))?;
        let dir = std::fs::canonicalize(path)
            .map_err(|e| Error::Artifacts(format!("cannot open {path}: {e}")))?;
        let store =
            LocalFileSystem::new_with_prefix(&dir).map_err(|e| Error::Artifacts(e.to_string()))?;
        Ok(Self {
            store: Arc::new(store),
            base: format!("file://{}", dir.display()),
        })
    }

    fn open_s3(location: &str, rest: &str) -> Result<Self> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        if bucket.is_empty() {
            return Err(Error::Invalid(format!(
                "artifact store {location:?}: the URL names no bucket (s3://bucket/prefix)"
            )));
        }
        let s3 = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| Error::Artifacts(format!("artifact store {location}: {e}")))?;
        let (store, base): (Arc<dyn ObjectStore>, String) = if prefix.is_empty() {
            (Arc::new(s3), format!("s3://{bucket}"))
        } else {
            (
                Arc::new(object_store::prefix::PrefixStore::new(s3, prefix)),
                format!("s3://{bucket}/{prefix}"),
            )
        };
        Ok(Self { store, base })
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Store `bytes` under their sha256; storing the same bytes twice is a no-op.
    pub async fn put(&self, bytes: Bytes) -> Result<ArtifactRef> {
        let sha256 = sha256_hex(&bytes);
        let path = ObjectPath::from(format!("sha256/{sha256}.safetensors"));
        let size = bytes.len() as u64;
        self.store
            .put(&path, bytes.into())
            .await
            .map_err(|e| Error::Artifacts(e.to_string()))?;
        Ok(ArtifactRef {
            uri: format!("{}/{}", self.base, path),
            sha256,
            size,
        })
    }

    /// Read an artifact and verify its checksum.
    pub async fn get(&self, artifact: &ArtifactRef) -> Result<Bytes> {
        let relative = artifact
            .uri
            .strip_prefix(&self.base)
            .and_then(|p| p.strip_prefix('/'))
            .ok_or_else(|| {
                Error::Artifacts(format!(
                    "artifact {} is not in this store ({})",
                    artifact.uri, self.base
                ))
            })?;
        let bytes = self
            .store
            .get(&ObjectPath::from(relative))
            .await
            .map_err(|e| Error::Artifacts(format!("cannot read {}: {e}", artifact.uri)))?
            .bytes()
            .await
            .map_err(|e| Error::Artifacts(format!("cannot read {}: {e}", artifact.uri)))?;
        let actual = sha256_hex(&bytes);
        if actual != artifact.sha256 {
            return Err(Error::Corrupt {
                uri: artifact.uri.clone(),
                expected: artifact.sha256.clone(),
                actual,
            });
        }
        Ok(bytes)
    }
}

/// Hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn artifacts_round_trip_and_corruption_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path().to_str().unwrap()).unwrap();
        let a = store.put(Bytes::from_static(b"weights")).await.unwrap();
        assert_eq!(a.size, 7);
        assert_eq!(&store.get(&a).await.unwrap()[..], b"weights");
        let file = dir.path().join(format!("sha256/{}.safetensors", a.sha256));
        std::fs::write(&file, b"tampered").unwrap();
        assert!(matches!(store.get(&a).await, Err(Error::Corrupt { .. })));
    }
}
