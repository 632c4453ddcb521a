//! Who may call what: the roles a bearer token carries, the role every public RPC
//! requires, and tokens as they are made, shown once and stored (hashed: a stored token
//! cannot be used to call Kiln). The gateway enforces it (`kiln_gateway::auth`).
//!
//! - `infer`: OIP inference and metadata, text generation, model listings;
//! - `train`: training jobs and datasets;
//! - `admin`: everything else — creating, importing, exporting and deploying models,
//!   aliases, repository load and unload, cluster status, tokens — and every role's RPCs.
//!
//! Health and reflection stay open. An RPC this table does not know needs `admin`, so a
//! new RPC is closed until it is given a role.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// A token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Inference, generation and metadata.
    Infer,
    /// Training jobs and datasets.
    Train,
    /// Everything.
    Admin,
}

impl Role {
    /// Its name, as tokens and messages give it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Infer => "infer",
            Role::Train => "train",
            Role::Admin => "admin",
        }
    }

    /// From its name; the error lists the roles.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "infer" => Ok(Role::Infer),
            "train" => Ok(Role::Train),
            "admin" => Ok(Role::Admin),
            other => Err(Error::Invalid(format!(
                "role {other:?} is not one of infer, train, admin"
            ))),
        }
    }

    /// Whether a token of this role may call an RPC that requires `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self == Role::Admin || self == needed
    }
}

/// How much a caller may ask of a gateway; 0 means no limit. A token's own limits
/// override its role's defaults field by field.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Sustained requests per second (a token bucket refilled at this rate).
    pub requests_per_second: f64,
    /// Requests that may arrive at once above the rate (0: one second's worth, at least 1).
    pub burst: u32,
    /// Calls in flight at once (a stream counts until it ends).
    pub max_in_flight: u32,
}

impl Limits {
    /// These limits, with `defaults` where these are 0.
    pub fn or(self, defaults: Limits) -> Limits {
        Limits {
            requests_per_second: if self.requests_per_second > 0.0 {
                self.requests_per_second
            } else {
                defaults.requests_per_second
            },
            burst: if self.burst > 0 {
                self.burst
            } else {
                defaults.burst
            },
            max_in_flight: if self.max_in_flight > 0 {
                self.max_in_flight
            } else {
                defaults.max_in_flight
            },
        }
    }

    /// The bucket's size: `burst`, else one second's worth (at least 1).
    pub fn bucket(&self) -> f64 {
        if self.burst > 0 {
            f64::from(self.burst)
        } else {
            self.requests_per_second.ceil().max(1.0)
        }
    }

    /// Check the values a request or flag gives; `field` prefixes the names in the error.
    pub fn validate(&self, field: &str) -> Result<()> {
        let rps = self.requests_per_second;
        if !rps.is_finite() || !(0.0..=1_000_000.0).contains(&rps) {
            return Err(Error::Invalid(format!(
                "{field}requests_per_second must be between 0 (no limit) and 1000000, got {rps}"
            )));
        }
        if self.burst > 1_000_000 || self.max_in_flight > 1_000_000 {
            return Err(Error::Invalid(format!(
                "{field}burst and {field}max_in_flight must be at most 1000000"
            )));
        }
        Ok(())
    }
}

/// What an RPC requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token (health, reflection).
    Open,
    /// A token of this role (or `admin`).
    Needs(Role),
}

/// What the RPC at gRPC `path` (`/package.Service/Method`) requires.
pub fn required(path: &str) -> Access {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Access::Needs(Role::Admin);
    };
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => Access::Open,
        "inference.GRPCInferenceService" => match method {
            "RepositoryModelLoad" | "RepositoryModelUnload" => Access::Needs(Role::Admin),
            "ServerLive" | "ServerReady" | "ModelReady" | "ServerMetadata" | "ModelMetadata"
            | "ModelInfer" | "ModelStreamInfer" | "ModelConfig" | "ModelStatistics"
            | "RepositoryIndex" => Access::Needs(Role::Infer),
            _ => Access::Needs(Role::Admin),
        },
        "kiln.v1.Generation" => match method {
            "Generate" => Access::Needs(Role::Infer),
            _ => Access::Needs(Role::Admin),
        },
        "kiln.v1.Tokens" => Access::Needs(Role::Admin),
        "kiln.v1.Models" => match method {
            "ListModels" | "GetModelVersion" => Access::Needs(Role::Infer),
            _ => Access::Needs(Role::Admin),
        },
        "kiln.v1.Training" => match method {
            "SubmitTrainingJob" | "WatchTrainingJob" | "GetTrainingJob" | "ListTrainingJobs"
            | "CancelTrainingJob" | "UploadDataset" | "ListDatasets" | "DeleteDataset" => {
                Access::Needs(Role::Train)
            }
            _ => Access::Needs(Role::Admin),
        },
        _ => Access::Needs(Role::Admin),
    }
}

/// Prefix of every token Kiln makes (so that scanners recognise a leaked one).
pub const TOKEN_PREFIX: &str = "kiln_";

/// A new token from 32 random bytes: `kiln_` and 64 hex digits. Shown once; only its
/// [`token_hash`] is stored.
pub fn new_token(random: [u8; 32]) -> String {
    format!("{TOKEN_PREFIX}{}", hex::encode(random))
}

/// The stored form of a token: its SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token of an `authorization` header value (`Bearer TOKEN`, the scheme in any case).
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn every_public_rpc_has_a_deliberate_role() {
        let set = prost_types::FileDescriptorSet::decode(kiln_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut seen = 0;
        for file in &set.file {
            let package = file.package();
            if package.starts_with("kiln.internal") {
                continue;
            }
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{package}.{}/{}", service.name(), method.name());
                    seen += 1;
                    // Every public method is in the table by name: none falls through to
                    // the closed default by accident.
                    let expected = match (package, service.name(), method.name()) {
                        ("inference", _, "RepositoryModelLoad" | "RepositoryModelUnload") => {
                            Role::Admin
                        }
                        ("inference", ..) => Role::Infer,
                        ("kiln.v1", "Generation", _) => Role::Infer,
                        ("kiln.v1", "Training", _) => Role::Train,
                        ("kiln.v1", "Models", "ListModels" | "GetModelVersion") => Role::Infer,
                        ("kiln.v1", "Models" | "Cluster" | "Tokens", _) => Role::Admin,
                        other => panic!("{other:?} has no role in this test"),
                    };
                    assert_eq!(required(&path), Access::Needs(expected), "{path}");
                }
            }
        }
        // The public API's RPCs: 12 of OIP, 7 Models, 8 Training, Cluster, Generation and
        // 3 Tokens.
        assert_eq!(seen, 32, "the descriptor set lists every public RPC");
        assert_eq!(required("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(
            required("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Access::Open
        );
        assert_eq!(
            required("/kiln.v1.Models/SomethingNew"),
            Access::Needs(Role::Admin)
        );
        assert_eq!(required("garbage"), Access::Needs(Role::Admin));
    }

    #[test]
    fn admin_may_do_everything_and_other_roles_only_their_own() {
        assert!(Role::Admin.allows(Role::Train));
        assert!(Role::Admin.allows(Role::Infer));
        assert!(Role::Infer.allows(Role::Infer));
        assert!(!Role::Infer.allows(Role::Train));
        assert!(!Role::Train.allows(Role::Admin));
        assert_eq!(Role::parse("train").unwrap(), Role::Train);
        assert!(
            Role::parse("root")
                .unwrap_err()
                .to_string()
                .contains("infer, train, admin")
        );
    }

    #[test]
    fn tokens_are_stored_hashed_and_read_from_bearer_headers() {
        let token = new_token([7; 32]);
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(token.len(), TOKEN_PREFIX.len() + 64);
        let hash = token_hash(&token);
        assert_eq!(hash.len(), 64);
        assert!(!hash.contains(&token[TOKEN_PREFIX.len()..]));
        assert_ne!(hash, token_hash(&new_token([8; 32])));
        assert_eq!(bearer(&format!("Bearer {token}")), Some(token.as_str()));
        assert_eq!(bearer(&format!("bearer  {token} ")), Some(token.as_str()));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer(&token), None);
    }
}
