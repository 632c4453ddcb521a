//! `kiln tokens create|list|revoke`: bearer tokens, through a gateway (admin token
//! needed) or, to make the first token of a cluster, straight in etcd (whoever can write
//! etcd already holds the cluster).

use std::time::Duration;

use kiln_core::auth::Role;
use kiln_proto::kiln::v1 as pb;
use kiln_proto::kiln::v1::tokens_client::TokensClient;
use kiln_registry::{EtcdStore, EtcdTls, Registry};

use crate::client::{channel, status};

/// Where a token command goes.
pub enum Target<'a> {
    /// A gateway, with the CLI's credentials.
    Gateway(&'a str),
    /// etcd directly: endpoints, the cluster's key prefix, TLS.
    Etcd(&'a [String], &'a str, Option<&'a EtcdTls>),
}

fn created_text(info: &pb::TokenInfo, secret: &str) -> String {
    format!(
        "created token {:?} (role {}, fingerprint {})\n\n  {secret}\n\n\
         It is shown only now: keep it in a secret store. Clients send it as \
         `authorization: Bearer <token>`; the kiln CLI reads KILN_TOKEN or --token.",
        info.name, info.role, info.fingerprint
    )
}

/// `kiln tokens create --name N --role R`.
pub async fn create(
    target: Target<'_>,
    name: &str,
    role: &str,
    limits: kiln_core::auth::Limits,
) -> anyhow::Result<String> {
    match target {
        Target::Gateway(addr) => {
            let response = TokensClient::new(channel(addr).await?)
                .create_token(pb::CreateTokenRequest {
                    name: name.into(),
                    role: role.into(),
                    limits: Some(pb::Limits {
                        requests_per_second: limits.requests_per_second,
                        burst: limits.burst,
                        max_in_flight: limits.max_in_flight,
                    }),
                })
                .await
                .map_err(status)?
                .into_inner();
            let info = response.token.unwrap_or_default();
            Ok(created_text(&info, &response.secret))
        }
        Target::Etcd(endpoints, prefix, tls) => {
            let role = Role::parse(role)?;
            let store = EtcdStore::connect_with(endpoints, Duration::from_secs(10), tls).await?;
            let registry = Registry::new(std::sync::Arc::new(store), prefix);
            let (record, secret) = registry.create_token(name, role, limits).await?;
            let info = kiln_gateway::tokens::token_info(&record);
            Ok(created_text(&info, &secret))
        }
    }
}

/// `kiln tokens list`: a table, or JSON.
pub async fn list(addr: &str, json: bool) -> anyhow::Result<String> {
    let tokens = TokensClient::new(channel(addr).await?)
        .list_tokens(pb::ListTokensRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .tokens;
    if json {
        let items: Vec<serde_json::Value> = tokens
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "role": t.role,
                    "fingerprint": t.fingerprint,
                    "created_unix_ms": t.created_unix_ms,
                    "limits": t.limits.as_ref().map(|l| serde_json::json!({
                        "requests_per_second": l.requests_per_second,
                        "burst": l.burst,
                        "max_in_flight": l.max_in_flight,
                    })),
                })
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&items)?);
    }
    let mut out = format!(
        "{:<24} {:<6} {:<12} {:<10} {:<26}\n",
        "NAME", "ROLE", "FINGERPRINT", "MADE", "LIMITS"
    );
    for t in &tokens {
        out.push_str(&format!(
            "{:<24} {:<6} {:<12} {:<10} {}\n",
            t.name,
            t.role,
            t.fingerprint,
            age(t.created_unix_ms),
            limits_text(t.limits.as_ref())
        ));
    }
    Ok(out)
}

/// `kiln tokens revoke NAME`.
pub async fn revoke(addr: &str, name: &str) -> anyhow::Result<String> {
    TokensClient::new(channel(addr).await?)
        .revoke_token(pb::RevokeTokenRequest { name: name.into() })
        .await
        .map_err(status)?;
    Ok(format!("revoked token {name:?}"))
}

/// How long ago `unix_ms` was, in the largest whole unit (`5m ago`).
fn age(unix_ms: u64) -> String {
    let seconds = kiln_core::records::now_unix_ms().saturating_sub(unix_ms) / 1000;
    match seconds {
        0..60 => format!("{seconds}s ago"),
        60..3600 => format!("{}m ago", seconds / 60),
        3600..86400 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86400),
    }
}

/// A token's own limits, for the listing (`role default` where it has none).
fn limits_text(limits: Option<&pb::Limits>) -> String {
    let Some(l) = limits else {
        return "role defaults".into();
    };
    let mut parts = Vec::new();
    if l.requests_per_second > 0.0 {
        parts.push(format!("{}/s", l.requests_per_second));
    }
    if l.burst > 0 {
        parts.push(format!("burst {}", l.burst));
    }
    if l.max_in_flight > 0 {
        parts.push(format!("{} in flight", l.max_in_flight));
    }
    if parts.is_empty() {
        "role defaults".into()
    } else {
        parts.join(", ")
    }
}
