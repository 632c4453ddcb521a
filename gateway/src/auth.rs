//! Token authentication and roles, checked for every call before any handler runs: the
//! request's body is not read, no model is looked up, so a refusal says nothing about
//! what exists. Which role each RPC needs is `kiln_core::auth::required`; the tokens are
//! the watched cluster view's (a revoked token is refused as soon as the watch brings
//! the deletion).

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::Either;
use kiln_core::auth::{Access, Limits, Role, bearer, required, token_hash};
use kiln_registry::WatchedView;

use crate::Error;
use crate::admission::{Admission, Guarded, Permit};

/// Who is calling, as the handlers see it (a request extension).
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    /// The token's name (`anonymous` when authentication is off or the RPC is open).
    pub name: Arc<str>,
    /// What it may do.
    pub role: Role,
    /// Its token's own limits (0 fields: the role's defaults).
    pub limits: Limits,
}

impl Caller {
    /// The caller when authentication is off: everything is allowed.
    pub fn anonymous() -> Self {
        Self {
            name: Arc::from("anonymous"),
            role: Role::Admin,
            limits: Limits::default(),
        }
    }
}

/// How a call's credentials are checked.
#[derive(Clone)]
pub enum Authenticator {
    /// Every call is allowed (`--auth off`).
    Off,
    /// Tokens from the watched cluster view.
    Tokens(WatchedView),
}

impl Authenticator {
    /// Decide a call to `path` carrying `authorization` (the header's value, if any):
    /// the token's caller, or None for a call that needs no token (open RPCs, or
    /// authentication off).
    pub fn check(&self, path: &str, authorization: Option<&str>) -> Result<Option<Caller>, Error> {
        let view = match self {
            Authenticator::Off => return Ok(None),
            Authenticator::Tokens(view) => view,
        };
        let needed = match required(path) {
            Access::Open => return Ok(None),
            Access::Needs(role) => role,
        };
        let Some(token) = authorization.and_then(bearer) else {
            return Err(Error::Unauthenticated(
                "this call needs a token: send `authorization: Bearer <token>` \
                 (the kiln CLI reads KILN_TOKEN or --token)"
                    .into(),
            ));
        };
        let current = view.current();
        let Some(record) = current.tokens.get(&token_hash(token)) else {
            return Err(Error::Unauthenticated(
                "the token is not valid (unknown or revoked)".into(),
            ));
        };
        if !record.role.allows(needed) {
            return Err(Error::PermissionDenied(format!(
                "token {:?} has role {}; this call needs role {}",
                record.name,
                record.role.as_str(),
                needed.as_str()
            )));
        }
        Ok(Some(Caller {
            name: Arc::from(record.name.as_str()),
            role: record.role,
            limits: record.limits,
        }))
    }
}

/// [`AuthService`] as a layer for `tonic::transport::Server::builder().layer(..)`.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Authenticator,
    admission: Arc<Admission>,
}

impl AuthLayer {
    /// Check tokens with `auth` and admit each token's calls through `admission`.
    pub fn new(auth: Authenticator, admission: Arc<Admission>) -> Self {
        Self { auth, admission }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            auth: self.auth.clone(),
            admission: self.admission.clone(),
        }
    }
}

/// Checks each call's token, role and limits; answers UNAUTHENTICATED, PERMISSION_DENIED
/// or RESOURCE_EXHAUSTED itself (trailers only), else passes the call on with its
/// [`Caller`] attached and its in-flight place held until the answer's body ends.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Authenticator,
    admission: Arc<Admission>,
}

pin_project_lite::pin_project! {
    /// The inner call's answer, its body holding the call's permit.
    pub struct Admitted<F> {
        #[pin]
        inner: F,
        permit: Option<Permit>,
    }
}

impl<F, E> std::future::Future for Admitted<F>
where
    F: std::future::Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Ready(Ok(response)) => {
                let permit = this.permit.take();
                Poll::Ready(Ok(
                    response.map(|body| tonic::body::Body::new(Guarded::new(body, permit)))
                ))
            }
            other => other,
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<std::future::Ready<Result<S::Response, S::Error>>, Admitted<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let admitted = self
            .auth
            .check(request.uri().path(), authorization)
            .and_then(|caller| match caller {
                Some(caller) => {
                    let permit = self.admission.admit(&caller)?;
                    Ok((caller, Some(permit)))
                }
                None => Ok((Caller::anonymous(), None)),
            });
        match admitted {
            Ok((caller, permit)) => {
                // The token goes no further than this check: not to handlers, logs or
                // the services calls are forwarded to.
                request.headers_mut().remove(http::header::AUTHORIZATION);
                request.extensions_mut().insert(caller);
                Either::Right(Admitted {
                    inner: self.inner.call(request),
                    permit,
                })
            }
            Err(e) => {
                let status: tonic::Status = e.into();
                Either::Left(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_registry::{MemoryStore, Registry};

    #[tokio::test]
    async fn tokens_are_checked_against_the_watched_view_and_revocation_is_seen() {
        let store = Arc::new(MemoryStore::default());
        let registry = Registry::new(store.clone(), "/t/");
        let (_, infer) = registry
            .create_token("svc", Role::Infer, Default::default())
            .await
            .unwrap();
        let (_, admin) = registry
            .create_token("ops", Role::Admin, Default::default())
            .await
            .unwrap();
        let view = WatchedView::start(store, "/t/".into()).await.unwrap();
        let auth = Authenticator::Tokens(view.clone());
        let infer_call = "/inference.GRPCInferenceService/ModelInfer";
        let admin_call = "/kiln.v1.Models/CreateModel";
        let bearer = |t: &str| format!("Bearer {t}");

        let caller = auth
            .check(infer_call, Some(&bearer(&infer)))
            .unwrap()
            .unwrap();
        assert_eq!((&*caller.name, caller.role), ("svc", Role::Infer));
        assert!(matches!(
            auth.check(admin_call, Some(&bearer(&infer))),
            Err(Error::PermissionDenied(m)) if m.contains("needs role admin")
        ));
        assert!(auth.check(admin_call, Some(&bearer(&admin))).is_ok());
        assert!(matches!(
            auth.check(infer_call, None),
            Err(Error::Unauthenticated(_))
        ));
        assert!(matches!(
            auth.check(infer_call, Some("Bearer kiln_0000")),
            Err(Error::Unauthenticated(_))
        ));
        // Open RPCs need nothing.
        assert!(matches!(
            auth.check("/grpc.health.v1.Health/Check", None),
            Ok(None)
        ));

        registry.revoke_token("svc").await.unwrap();
        let gone = view
            .wait_for(std::time::Duration::from_secs(5), |v| v.tokens.len() == 1)
            .await;
        assert!(gone.is_some(), "the watch brings the revocation");
        assert!(matches!(
            auth.check(infer_call, Some(&bearer(&infer))),
            Err(Error::Unauthenticated(_))
        ));
        // Off: anything goes.
        assert!(matches!(
            Authenticator::Off.check(admin_call, None),
            Ok(None)
        ));
    }
}
