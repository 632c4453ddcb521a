//! [`KvStore`] on etcd v3 (cluster mode), through the `etcd-client` crate: revisions,
//! leases, compare-and-put in a transaction, and watches that report compaction so the
//! caller can re-list.

use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KvClient, LeaseClient,
    PutOptions, Txn, TxnOp, TxnOpResponse, WatchClient, WatchOptions,
};
use futures::StreamExt;

use crate::kv::{
    Expect, KeyValue, KvStore, LeaseId, Listing, WatchEvent, WatchStream, check_value_size,
};
use crate::{Error, Result};

/// Largest answer read from etcd (a listing of many job records).
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// TLS to etcd: the CA its certificate comes from and, when etcd asks for client
/// certificates, this process's (all PEM bytes).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// CA certificate(s).
    pub ca: Vec<u8>,
    /// Client certificate chain and key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// The cluster state in etcd.
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
}

/// etcd's error as one readable line: a status's message and its innermost cause (the
/// client's own text is a debug dump of the status).
fn etcd(e: etcd_client::Error) -> Error {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let mut cause: Option<&(dyn std::error::Error + 'static)> =
                std::error::Error::source(&status);
            let mut innermost = None;
            while let Some(c) = cause {
                innermost = Some(c.to_string());
                cause = c.source();
            }
            Error::Etcd(match innermost {
                Some(cause) => format!("{} ({cause})", status.message()),
                None => format!("{:?}: {}", status.code(), status.message()),
            })
        }
        other => Error::Etcd(other.to_string()),
    }
}

fn key_value(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    Ok(KeyValue {
        key: kv
            .key_str()
            .map_err(|_| Error::Etcd("a key is not UTF-8".into()))?
            .to_owned(),
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    })
}

impl EtcdStore {
    /// Connect to etcd (`http://host:port` or `host:port` endpoints), failing after
    /// `timeout` when none answers.
    pub async fn connect(endpoints: &[String], timeout: Duration) -> Result<Self> {
        Self::connect_with(endpoints, timeout, None).await
    }

    /// [`connect`](Self::connect) over TLS when `tls` is given (endpoints `https://…`).
    pub async fn connect_with(
        endpoints: &[String],
        timeout: Duration,
        tls: Option<&EtcdTls>,
    ) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::Invalid("no etcd endpoint given".into()));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(tls) = tls {
            let mut config = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(config);
        }
        let client = tokio::time::timeout(timeout, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| {
                Error::Etcd(format!(
                    "no answer from {} within {timeout:?}",
                    endpoints.join(",")
                ))
            })?
            .map_err(etcd)?;
        let store = Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            lease: client.lease_client(),
        };
        // A first read proves the cluster answers (connect alone is lazy).
        tokio::time::timeout(timeout, store.kv.clone().get("\0", None))
            .await
            .map_err(|_| {
                Error::Etcd(format!(
                    "etcd at {} did not answer within {timeout:?}",
                    endpoints.join(",")
                ))
            })?
            .map_err(etcd)?;
        Ok(store)
    }

    fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
        lease.map(|l| PutOptions::new().with_lease(l))
    }
}

#[async_trait::async_trait]
impl KvStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let response = self.kv.clone().get(key, None).await.map_err(etcd)?;
        response.kvs().first().map(key_value).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let response = self
            .kv
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd)?;
        Ok(Listing {
            items: response
                .kvs()
                .iter()
                .map(key_value)
                .collect::<Result<_>>()?,
            revision: response.header().map_or(0, |h| h.revision()),
        })
    }

    async fn put(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> Result<i64> {
        check_value_size(key, &value)?;
        let response = self
            .kv
            .clone()
            .put(key, value.to_vec(), Self::put_options(lease))
            .await
            .map_err(|e| lease_error(e, lease))?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expect: Expect,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<std::result::Result<i64, Option<KeyValue>>> {
        check_value_size(key, &value)?;
        let condition = match expect {
            Expect::Absent => Compare::create_revision(key, CompareOp::Equal, 0),
            Expect::ModRevision(r) => Compare::mod_revision(key, CompareOp::Equal, r),
        };
        let txn = Txn::new()
            .when([condition])
            .and_then([TxnOp::put(key, value.to_vec(), Self::put_options(lease))])
            .or_else([TxnOp::get(key, None)]);
        let response = self
            .kv
            .clone()
            .txn(txn)
            .await
            .map_err(|e| lease_error(e, lease))?;
        if response.succeeded() {
            return Ok(Ok(response.header().map_or(0, |h| h.revision())));
        }
        let current = response
            .op_responses()
            .iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(get) => Some(get.kvs().first().map(key_value).transpose()),
                _ => None,
            })
            .transpose()?
            .flatten();
        Ok(Err(current))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let response = self.kv.clone().delete(key, None).await.map_err(etcd)?;
        Ok(response.deleted() > 0)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        // etcd counts whole seconds.
        let seconds = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let response = self
            .lease
            .clone()
            .grant(seconds, None)
            .await
            .map_err(etcd)?;
        Ok(response.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        // Opening the keep-alive stream sends one renewal and reads its answer (a lease
        // that ended answers with TTL 0: an error here).
        self.lease
            .clone()
            .keep_alive(lease)
            .await
            .map_err(|e| lease_error(e, Some(lease)))?;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        match self.lease.clone().revoke(lease).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("lease not found") => Ok(()),
            Err(e) => Err(etcd(e)),
        }
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream> {
        let mut options = WatchOptions::new().with_prefix();
        if from_revision > 0 {
            options = options.with_start_revision(from_revision);
        }
        let mut stream = self
            .watch
            .clone()
            .watch(prefix, Some(options))
            .await
            .map_err(etcd)?;
        // The first answer confirms the watch, or says the start was compacted away.
        let first = stream
            .message()
            .await
            .map_err(etcd)?
            .ok_or_else(|| Error::Etcd("the watch ended before it started".into()))?;
        if first.canceled() {
            return Err(cancelled(&first, from_revision));
        }
        let mut next = from_revision;
        let pending = convert(&first, &mut next);
        let live =
            futures::stream::unfold((stream, false), move |(mut stream, ended)| async move {
                if ended {
                    return None;
                }
                let batch: Vec<Result<WatchEvent>> = match stream.message().await {
                    Ok(Some(answer)) if answer.canceled() => {
                        vec![Err(cancelled(&answer, next))]
                    }
                    Ok(Some(answer)) => convert(&answer, &mut next),
                    Ok(None) => vec![Err(Error::Etcd("etcd ended the watch".into()))],
                    Err(e) => vec![Err(etcd(e))],
                };
                let ended = batch.iter().any(Result::is_err);
                Some((futures::stream::iter(batch), (stream, ended)))
            })
            .flatten();
        Ok(futures::stream::iter(pending).chain(live).boxed())
    }
}

/// A cancelled watch: compaction (re-list and watch again) or another reason.
fn cancelled(answer: &etcd_client::WatchResponse, requested: i64) -> Error {
    if answer.compact_revision() > 0 {
        Error::Compacted {
            requested,
            oldest: answer.compact_revision(),
        }
    } else {
        Error::Etcd(format!(
            "etcd cancelled the watch: {}",
            answer.cancel_reason()
        ))
    }
}

/// The events of one watch answer, advancing `next` past them.
fn convert(answer: &etcd_client::WatchResponse, next: &mut i64) -> Vec<Result<WatchEvent>> {
    answer
        .events()
        .iter()
        .filter_map(|event| {
            let kv = event.kv()?;
            let converted = match event.event_type() {
                EventType::Put => key_value(kv).map(WatchEvent::Put),
                EventType::Delete => kv
                    .key_str()
                    .map(|key| WatchEvent::Delete {
                        key: key.to_owned(),
                        revision: kv.mod_revision(),
                    })
                    .map_err(|_| Error::Etcd("a key is not UTF-8".into())),
            };
            if let Ok(e) = &converted {
                *next = e.revision() + 1;
            }
            Some(converted)
        })
        .collect()
}

/// etcd's "lease not found" is [`Error::LeaseExpired`]; the rest pass through.
fn lease_error(e: etcd_client::Error, lease: Option<LeaseId>) -> Error {
    let text = e.to_string();
    match lease {
        Some(id) if text.contains("lease not found") => Error::LeaseExpired(id),
        _ => Error::Etcd(text),
    }
}
