//! Per-caller admission: a token bucket of requests per second and a cap on calls in
//! flight, per token, decided with the token check before the request is read — a
//! refusal costs a hash lookup and a lock held for a few arithmetic operations. One
//! caller over its limits gets RESOURCE_EXHAUSTED; the others' capacity is untouched.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use kiln_core::auth::{Limits, Role};

use crate::Error;
use crate::auth::Caller;

/// The default limits of each role (a token's own limits override them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoleLimits {
    /// Of `infer` tokens.
    pub infer: Limits,
    /// Of `train` tokens.
    pub train: Limits,
    /// Of `admin` tokens.
    pub admin: Limits,
}

/// Calls in flight per token unless configured: far above one client's needs, low
/// enough that one client cannot hold every connection's worth of work.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 1024;

impl Default for RoleLimits {
    fn default() -> Self {
        let limits = Limits {
            requests_per_second: 0.0,
            burst: 0,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        };
        Self {
            infer: limits,
            train: limits,
            admin: limits,
        }
    }
}

impl RoleLimits {
    /// The defaults of `role`.
    pub fn of(&self, role: Role) -> Limits {
        match role {
            Role::Infer => self.infer,
            Role::Train => self.train,
            Role::Admin => self.admin,
        }
    }
}

struct CallerState {
    /// Requests the bucket holds now.
    tokens: f64,
    refilled: Instant,
    in_flight: Arc<AtomicU32>,
}

/// Every caller's bucket and in-flight count.
pub struct Admission {
    roles: RoleLimits,
    callers: Mutex<HashMap<Arc<str>, CallerState>>,
}

/// A call's place in its caller's in-flight count, given back when dropped.
pub struct Permit(Arc<AtomicU32>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// Admission with these role defaults.
    pub fn new(roles: RoleLimits) -> Self {
        Self {
            roles,
            callers: Mutex::new(HashMap::new()),
        }
    }

    /// Admit one call of `caller` now, or say which limit it is over.
    pub fn admit(&self, caller: &Caller) -> Result<Permit, Error> {
        self.admit_at(caller, Instant::now())
    }

    fn admit_at(&self, caller: &Caller, now: Instant) -> Result<Permit, Error> {
        let limits = caller.limits.or(self.roles.of(caller.role));
        let mut callers = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        let state = callers
            .entry(caller.name.clone())
            .or_insert_with(|| CallerState {
                tokens: limits.bucket(),
                refilled: now,
                in_flight: Arc::new(AtomicU32::new(0)),
            });
        if limits.max_in_flight > 0
            && state.in_flight.load(Ordering::Acquire) >= limits.max_in_flight
        {
            return Err(Error::Overloaded(format!(
                "token {:?} already has {} calls in flight, its limit (max_in_flight; the \
                 token's own, else the gateway's --max-in-flight for role {})",
                &*caller.name,
                limits.max_in_flight,
                caller.role.as_str()
            )));
        }
        if limits.requests_per_second > 0.0 {
            let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
            state.tokens =
                (state.tokens + elapsed * limits.requests_per_second).min(limits.bucket());
            state.refilled = now;
            if state.tokens < 1.0 {
                return Err(Error::Overloaded(format!(
                    "token {:?} is over its limit of {} requests per second (burst {}; the \
                     token's own, else the gateway's --requests-per-second for role {})",
                    &*caller.name,
                    limits.requests_per_second,
                    limits.bucket(),
                    caller.role.as_str()
                )));
            }
            state.tokens -= 1.0;
        }
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(Permit(state.in_flight.clone()))
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its call's [`Permit`] until the body ends or is dropped,
    /// so a stream counts as in flight for as long as it runs.
    pub struct Guarded<B> {
        #[pin]
        inner: B,
        permit: Option<Permit>,
    }
}

impl<B> Guarded<B> {
    /// `inner`, holding `permit`.
    pub fn new(inner: B, permit: Option<Permit>) -> Self {
        Self { inner, permit }
    }
}

impl<B: http_body::Body> http_body::Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.permit.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn caller(name: &str, limits: Limits) -> Caller {
        Caller {
            name: Arc::from(name),
            role: Role::Infer,
            limits,
        }
    }

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let admission = Admission::new(RoleLimits::default());
        let c = caller(
            "a",
            Limits {
                requests_per_second: 10.0,
                burst: 3,
                max_in_flight: 0,
            },
        );
        let t0 = Instant::now();
        let permits: Vec<_> = (0..3)
            .map(|_| admission.admit_at(&c, t0).unwrap())
            .collect();
        let refused = admission.admit_at(&c, t0).err().unwrap().to_string();
        assert!(refused.contains("10 requests per second") && refused.contains("\"a\""));
        // 100 ms later, one more (10/s).
        assert!(
            admission
                .admit_at(&c, t0 + Duration::from_millis(100))
                .is_ok()
        );
        assert!(
            admission
                .admit_at(&c, t0 + Duration::from_millis(110))
                .is_err()
        );
        // Another caller is untouched.
        assert!(admission.admit_at(&caller("b", c.limits), t0).is_ok());
        drop(permits);
    }

    #[test]
    fn calls_in_flight_are_counted_until_their_permits_go() {
        let admission = Admission::new(RoleLimits::default());
        let c = caller(
            "a",
            Limits {
                max_in_flight: 2,
                ..Default::default()
            },
        );
        let first = admission.admit(&c).unwrap();
        let _second = admission.admit(&c).unwrap();
        let refused = admission.admit(&c).err().unwrap().to_string();
        assert!(refused.contains("2 calls in flight"), "{refused}");
        drop(first);
        assert!(admission.admit(&c).is_ok());
    }

    #[test]
    fn role_defaults_apply_where_the_token_sets_nothing() {
        let roles = RoleLimits {
            infer: Limits {
                max_in_flight: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let admission = Admission::new(roles);
        let c = caller("a", Limits::default());
        let _held = admission.admit(&c).unwrap();
        assert!(admission.admit(&c).is_err());
        // The token's own limit wins over its role's.
        let own = caller(
            "b",
            Limits {
                max_in_flight: 5,
                ..Default::default()
            },
        );
        let held: Vec<_> = (0..5).map(|_| admission.admit(&own).unwrap()).collect();
        assert!(admission.admit(&own).is_err());
        drop(held);
    }
}
