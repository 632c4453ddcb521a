//! `kiln.v1.Tokens`: make, list and revoke bearer tokens (admin only, as the auth layer
//! enforces). A token's secret is in the create answer and nowhere else.

use std::sync::Arc;

use kiln_core::auth::Role;
use kiln_core::records::TokenRecord;
use kiln_proto::kiln::v1 as pb;
use kiln_proto::kiln::v1::tokens_server::Tokens;
use tonic::{Request, Response, Status};

use crate::{Error, Shared};

/// The `kiln.v1.Tokens` service.
pub struct TokensService {
    pub(crate) shared: Arc<Shared>,
}

/// How a stored token is listed: its fingerprint is the start of its hash.
pub fn token_info(record: &TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        name: record.name.clone(),
        role: record.role.as_str().to_owned(),
        fingerprint: record.sha256.get(..12).unwrap_or_default().to_owned(),
        created_unix_ms: record.created_unix_ms,
        limits: Some(pb::Limits {
            requests_per_second: record.limits.requests_per_second,
            burst: record.limits.burst,
            max_in_flight: record.limits.max_in_flight,
        }),
    }
}

/// A request's limits (unset: all 0, the role's defaults).
pub fn limits_from_proto(limits: Option<pb::Limits>) -> kiln_core::auth::Limits {
    let l = limits.unwrap_or_default();
    kiln_core::auth::Limits {
        requests_per_second: l.requests_per_second,
        burst: l.burst,
        max_in_flight: l.max_in_flight,
    }
}

#[tonic::async_trait]
impl Tokens for TokensService {
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let request = request.into_inner();
        let role = Role::parse(&request.role).map_err(|e| Error::Invalid(format!("role: {e}")))?;
        let (record, secret) = self
            .shared
            .registry
            .create_token(&request.name, role, limits_from_proto(request.limits))
            .await
            .map_err(Error::from)?;
        tracing::info!(name = %record.name, role = role.as_str(), "token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some(token_info(&record)),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        _: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let tokens = self
            .shared
            .registry
            .list_tokens()
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.iter().map(token_info).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let name = request.into_inner().name;
        self.shared
            .registry
            .revoke_token(&name)
            .await
            .map_err(Error::from)?;
        tracing::info!(%name, "token revoked");
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }
}
