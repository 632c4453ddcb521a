//! One contract, three stores: every property here runs on the in-memory store, the
//! embedded file store and a real etcd server (started on loopback by the harness), each
//! in a key prefix of its own. A store that breaks the contract fails with its name.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use kiln_core::records::ArtifactRef;
use kiln_core::spec::{Activation, MlpSpec, ModelSpec, Signature, Task};
use kiln_registry::kv::{Expect, KvStore, MAX_VALUE_BYTES, WatchEvent};
use kiln_registry::testing::EtcdServer;
use kiln_registry::{Error, FileStore, MemoryStore, NewModel, NewVersion, Registry, WatchedView};

/// The stores under test, and what keeps them alive.
struct Stores {
    all: Vec<(&'static str, Arc<dyn KvStore>)>,
    _dir: tempfile::TempDir,
    etcd: EtcdServer,
}

async fn stores() -> Stores {
    let dir = tempfile::tempdir().unwrap();
    let file = FileStore::open(&dir.path().join("state.redb")).unwrap();
    let etcd = EtcdServer::start().await.unwrap();
    let all: Vec<(&'static str, Arc<dyn KvStore>)> = vec![
        ("memory", Arc::new(MemoryStore::new())),
        ("file", Arc::new(file)),
        ("etcd", Arc::new(etcd.store().await.unwrap())),
    ];
    Stores {
        all,
        _dir: dir,
        etcd,
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn next_event(watch: &mut kiln_registry::kv::WatchStream, store: &str) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap_or_else(|_| panic!("{store}: no watch event within 5 s"))
        .unwrap_or_else(|| panic!("{store}: the watch ended"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_bump_one_revision_and_a_listing_reads_at_one() {
    let s = stores().await;
    for (name, store) in &s.all {
        let p = format!("/conformance/{name}/list/");
        let r1 = store.put(&format!("{p}a"), b("1"), None).await.unwrap();
        let r2 = store.put(&format!("{p}b"), b("2"), None).await.unwrap();
        let r3 = store.put(&format!("{p}a"), b("3"), None).await.unwrap();
        assert!(r1 < r2 && r2 < r3, "{name}: revisions {r1} {r2} {r3}");
        // A key outside the prefix that shares its start is not listed.
        store
            .put(&format!("/conformance/{name}/listx"), b("x"), None)
            .await
            .unwrap();
        let listing = store.list(&p).await.unwrap();
        let keys: Vec<&str> = listing.items.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, vec![format!("{p}a"), format!("{p}b")], "{name}");
        let a = &listing.items[0];
        assert_eq!(
            (a.value.clone(), a.create_revision, a.mod_revision),
            (b("3"), r1, r3),
            "{name}"
        );
        assert!(
            listing.revision >= r3,
            "{name}: listed at {}",
            listing.revision
        );
        assert_eq!(
            store.get(&format!("{p}b")).await.unwrap().unwrap().value,
            b("2"),
            "{name}"
        );
        assert!(
            store.get(&format!("{p}zz")).await.unwrap().is_none(),
            "{name}"
        );
        assert!(store.delete(&format!("{p}b")).await.unwrap(), "{name}");
        assert!(!store.delete(&format!("{p}b")).await.unwrap(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_put_writes_only_when_the_condition_holds() {
    let s = stores().await;
    for (name, store) in &s.all {
        let key = format!("/conformance/{name}/cas/k");
        let created = store
            .compare_and_put(&key, Expect::Absent, b("v1"), None)
            .await
            .unwrap()
            .unwrap();
        // Absent no longer holds: the answer is the key as it is.
        let lost = store
            .compare_and_put(&key, Expect::Absent, b("other"), None)
            .await
            .unwrap()
            .unwrap_err()
            .unwrap();
        assert_eq!(
            (lost.value, lost.mod_revision),
            (b("v1"), created),
            "{name}"
        );
        let updated = store
            .compare_and_put(&key, Expect::ModRevision(created), b("v2"), None)
            .await
            .unwrap()
            .unwrap();
        assert!(updated > created, "{name}");
        // A stale revision loses.
        let stale = store
            .compare_and_put(&key, Expect::ModRevision(created), b("v3"), None)
            .await
            .unwrap()
            .unwrap_err()
            .unwrap();
        assert_eq!(stale.value, b("v2"), "{name}");
        // On an absent key a revision condition loses with None.
        let missing = store
            .compare_and_put(
                &format!("{key}-missing"),
                Expect::ModRevision(created),
                b("x"),
                None,
            )
            .await
            .unwrap()
            .unwrap_err();
        assert!(missing.is_none(), "{name}");
        assert_eq!(
            store.get(&key).await.unwrap().unwrap().value,
            b("v2"),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_from_a_listing_without_missing_or_repeating() {
    let s = stores().await;
    for (name, store) in &s.all {
        let p = format!("/conformance/{name}/watch/");
        store
            .put(&format!("{p}before"), b("0"), None)
            .await
            .unwrap();
        let listing = store.list(&p).await.unwrap();
        // Changes after the listing, before the watch starts: the watch must still see them.
        let r1 = store.put(&format!("{p}a"), b("1"), None).await.unwrap();
        let mut watch = store.watch(&p, listing.revision + 1).await.unwrap();
        let r2 = store.put(&format!("{p}a"), b("2"), None).await.unwrap();
        store.delete(&format!("{p}before")).await.unwrap();
        store
            .put(&format!("/conformance/{name}/elsewhere"), b("x"), None)
            .await
            .unwrap();
        let first = next_event(&mut watch, name).await;
        assert!(
            matches!(&first, WatchEvent::Put(kv) if kv.mod_revision == r1 && kv.value == b("1")),
            "{name}: {first:?}"
        );
        let second = next_event(&mut watch, name).await;
        assert!(
            matches!(&second, WatchEvent::Put(kv) if kv.mod_revision == r2 && kv.create_revision == r1),
            "{name}: {second:?}"
        );
        let third = next_event(&mut watch, name).await;
        assert!(
            matches!(&third, WatchEvent::Delete { key, revision } if key.ends_with("before") && *revision > r2),
            "{name}: {third:?}"
        );
        // Nothing else (the key outside the prefix is not seen).
        let more = tokio::time::timeout(Duration::from_millis(300), watch.next()).await;
        assert!(more.is_err(), "{name}: unexpected {more:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_keys_vanish_with_their_lease() {
    let s = stores().await;
    for (name, store) in &s.all {
        let p = format!("/conformance/{name}/lease/");
        // Revoked: the key goes at once, watchers see it go, renewals fail.
        let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        let at = store
            .put(&format!("{p}revoked"), b("w"), Some(lease))
            .await
            .unwrap();
        assert_eq!(
            store
                .get(&format!("{p}revoked"))
                .await
                .unwrap()
                .unwrap()
                .lease,
            Some(lease),
            "{name}"
        );
        let mut watch = store.watch(&p, at + 1).await.unwrap();
        store.keep_alive(lease).await.unwrap();
        store.revoke_lease(lease).await.unwrap();
        assert!(
            store.get(&format!("{p}revoked")).await.unwrap().is_none(),
            "{name}"
        );
        let gone = next_event(&mut watch, name).await;
        assert!(
            matches!(gone, WatchEvent::Delete { .. }),
            "{name}: {gone:?}"
        );
        let renewed = store.keep_alive(lease).await;
        assert!(
            matches!(renewed, Err(Error::LeaseExpired(id)) if id == lease),
            "{name}: {renewed:?}"
        );
        let orphan = store.put(&format!("{p}orphan"), b("x"), Some(lease)).await;
        assert!(
            matches!(orphan, Err(Error::LeaseExpired(_))),
            "{name}: {orphan:?}"
        );

        // Not renewed: the key goes after the TTL (etcd's shortest is about 2 s).
        let short = store.grant_lease(Duration::from_secs(2)).await.unwrap();
        store
            .put(&format!("{p}expiring"), b("w"), Some(short))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.get(&format!("{p}expiring")).await.unwrap().is_some() {
            assert!(
                Instant::now() < deadline,
                "{name}: the key outlived its lease"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_over_the_limit_are_refused_before_they_are_sent() {
    let s = stores().await;
    for (name, store) in &s.all {
        let key = format!("/conformance/{name}/big");
        let big = Bytes::from(vec![b'x'; MAX_VALUE_BYTES + 1]);
        let err = store.put(&key, big.clone(), None).await.unwrap_err();
        assert!(
            matches!(&err, Error::Invalid(m) if m.contains("262144")),
            "{name}: {err:?}"
        );
        let err = store
            .compare_and_put(&key, Expect::Absent, big, None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{name}: {err:?}");
        assert!(store.get(&key).await.unwrap().is_none(), "{name}");
        // At the limit is fine.
        let fits = Bytes::from(vec![b'x'; MAX_VALUE_BYTES]);
        store.put(&key, fits, None).await.unwrap();
    }
}

fn model() -> NewModel {
    NewModel {
        name: "m".into(),
        spec: ModelSpec::Mlp(MlpSpec {
            input_width: 4,
            hidden: vec![3],
            activation: Activation::Relu,
            output_width: 1,
            task: Task::Regression,
        }),
        signature: Signature::default(),
        description: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_registrations_make_versions_one_to_sixteen() {
    let s = stores().await;
    for (name, store) in &s.all {
        let registry = Registry::new(store.clone(), format!("/conformance/{name}/registry/"));
        registry.create_model(model()).await.unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let r = registry.clone();
                tokio::spawn(async move {
                    let artifact = ArtifactRef {
                        uri: format!("file:///a/{i}"),
                        sha256: format!("{i:02}"),
                        size: 1,
                    };
                    r.register_version("m", NewVersion::new(artifact, "import"))
                        .await
                })
            })
            .collect();
        let mut versions = Vec::new();
        for t in tasks {
            versions.push(t.await.unwrap().unwrap().version);
        }
        versions.sort_unstable();
        assert_eq!(versions, (1..=16).collect::<Vec<_>>(), "{name}");
        // Each number went to one artifact.
        let view = registry.view().await.unwrap();
        let mut artifacts: Vec<String> = view.models["m"]
            .versions
            .values()
            .map(|v| v.artifact.uri.clone())
            .collect();
        artifacts.sort_unstable();
        artifacts.dedup();
        assert_eq!(artifacts.len(), 16, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_revision_says_so_and_the_view_follows_on() {
    let s = stores().await;
    let store: Arc<dyn KvStore> = Arc::new(s.etcd.store().await.unwrap());
    let prefix = "/conformance/etcd/compact/".to_owned();
    let registry = Registry::new(store.clone(), prefix.clone());
    registry.create_model(model()).await.unwrap();
    let view = WatchedView::start(store.clone(), prefix.clone())
        .await
        .unwrap();
    // A watch that starts at a compacted revision is told so.
    let listing = store.list(&prefix).await.unwrap();
    for i in 0..5 {
        store
            .put(&format!("{prefix}filler/{i}"), b("x"), None)
            .await
            .unwrap();
    }
    let head = store.list(&prefix).await.unwrap().revision;
    let mut client = etcd_client::Client::connect([s.etcd.endpoint.as_str()], None)
        .await
        .unwrap();
    client.compact(head, None).await.unwrap();
    // (etcd confirms the watch first and cancels it in its next answer: the error comes as
    // the stream's first item.)
    let outcome = match store.watch(&prefix, listing.revision + 1).await {
        Err(e) => Err(e),
        Ok(mut watch) => tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap(),
    };
    match outcome {
        Err(Error::Compacted { oldest, .. }) => assert!(oldest >= head, "{oldest} < {head}"),
        other => panic!("expected Compacted, got {other:?}"),
    }
    // The view still follows new changes.
    let artifact = ArtifactRef {
        uri: "file:///a".into(),
        sha256: "aa".into(),
        size: 1,
    };
    registry
        .register_version("m", NewVersion::new(artifact, "import"))
        .await
        .unwrap();
    let seen = view
        .wait_for(Duration::from_secs(10), |v| {
            v.models
                .get("m")
                .is_some_and(|m| m.versions.contains_key(&1))
        })
        .await;
    assert!(seen.is_some(), "the view never saw version 1");
}

/// A TCP relay between a client and etcd that can be cut and restored, to take a watcher
/// off the network while the cluster moves on.
struct Relay {
    addr: std::net::SocketAddr,
    open: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(target: String) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (o, c) = (open.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !o.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the connection is refused
                }
                let target = target.clone();
                c.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Relay { addr, open, conns }
    }

    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_cut_off_while_etcd_compacts_comes_back_without_stale_workers() {
    use kiln_core::records::{SCHEMA, WorkerRecord};
    let etcd = EtcdServer::start().await.unwrap();
    let prefix = "/relay/kiln/v1/".to_owned();
    let direct: Arc<dyn KvStore> = Arc::new(etcd.store().await.unwrap());
    let registry = Registry::new(direct.clone(), prefix.clone());
    let relay = Relay::start(etcd.endpoint.trim_start_matches("http://").to_owned()).await;
    let relayed: Arc<dyn KvStore> = Arc::new(
        kiln_registry::EtcdStore::connect(
            &[format!("http://{}", relay.addr)],
            Duration::from_secs(5),
        )
        .await
        .unwrap(),
    );
    let worker = |id: &str| WorkerRecord {
        schema: SCHEMA,
        id: id.into(),
        address: "127.0.0.1:1".into(),
        backend: "cpu".into(),
        adapter: "test".into(),
        loaded: vec![],
        started_unix_ms: 0,
        memory_bytes: 0,
        training: 0,
    };
    let lease = registry.grant_lease(Duration::from_secs(60)).await.unwrap();
    registry
        .put_worker(&worker("leaving"), lease)
        .await
        .unwrap();
    let view = WatchedView::start(relayed, prefix.clone()).await.unwrap();
    assert!(view.current().workers.contains_key("leaving"));

    // Off the network: the worker leaves, another arrives, etcd compacts that history away.
    relay.cut();
    direct.revoke_lease(lease).await.unwrap();
    let other = registry.grant_lease(Duration::from_secs(60)).await.unwrap();
    registry
        .put_worker(&worker("arrived"), other)
        .await
        .unwrap();
    let head = direct.list(&prefix).await.unwrap().revision;
    let mut client = etcd_client::Client::connect([etcd.endpoint.as_str()], None)
        .await
        .unwrap();
    client.compact(head, None).await.unwrap();
    // The watcher has noticed by now that its stream is gone (it retries every 200 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        view.current().workers.contains_key("leaving"),
        "still the old view"
    );

    // Back: its next revision was compacted, so it re-lists and drops the stale worker.
    relay.restore();
    let fresh = view
        .wait_for(Duration::from_secs(15), |v| {
            v.workers.contains_key("arrived") && !v.workers.contains_key("leaving")
        })
        .await;
    assert!(
        fresh.is_some(),
        "the view kept {:?}",
        view.current().workers.keys().collect::<Vec<_>>()
    );
}
