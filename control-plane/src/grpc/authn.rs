//! Admission of every gRPC request, as a tower layer in front of all
//! services: who is calling (certificate identity, bearer token, or a
//! replica acting on someone's behalf), whether that principal may call the
//! method, and per-peer rate and concurrency limits. The principal goes
//! into the request's extensions for the handlers (audit actor, scopes,
//! node ids); a refused request never reaches a handler.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{HeaderMap, Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sextant_store::Store;
use tonic::body::Body;
use tonic::Status;
use tracing::{debug, warn};

use crate::auth::{self, AuthError, NodeKind, Policy, Principal};
use crate::control_loop::Clock;
use crate::state;

/// How callers are authenticated.
#[derive(Debug, Clone)]
pub enum Mode {
    /// `--insecure`: plaintext, nobody is authenticated, anyone may do
    /// anything.
    Insecure,
    /// Certificates (identity from the SAN URI) and bearer tokens;
    /// operators with certificates get their role from the policy.
    Secure { policy: Arc<Policy> },
}

/// Per-peer limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sustained requests per second per peer (streams count once).
    pub rate_per_sec: f64,
    /// Requests a peer may make at once after a quiet spell.
    pub burst: f64,
    /// Requests and streams a peer may have open at once.
    pub max_open_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            rate_per_sec: 200.0,
            burst: 400.0,
            max_open_per_peer: 256,
        }
    }
}

/// What the transport says about a connection's peer.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// The identity of a verified client certificate.
    pub cert: Option<sextant_tls::Identity>,
}

impl Peer {
    /// The peer of a request, from the connection info tonic put into its
    /// extensions.
    pub fn of(ext: &http::Extensions) -> Peer {
        if let Some(info) = ext.get::<sextant_tls::PeerInfo>() {
            return Peer {
                addr: info.remote,
                cert: info.identity.clone(),
            };
        }
        Peer {
            addr: ext
                .get::<tonic::transport::server::TcpConnectInfo>()
                .and_then(|i| i.remote_addr()),
            cert: None,
        }
    }
}

struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// Authenticates and admits requests.
pub struct Authenticator {
    mode: Mode,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    buckets: Mutex<HashMap<String, Bucket>>,
    open: Arc<Mutex<HashMap<String, usize>>>,
    /// Refused requests by gRPC code.
    refused: Family<Vec<(String, String)>, Counter>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Holds one of a peer's open requests until dropped.
#[derive(Debug)]
pub struct OpenGuard {
    key: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            if let Some(n) = open.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.key);
                }
            }
        }
    }
}

impl Authenticator {
    pub fn new(mode: Mode, store: Arc<dyn Store>, clock: Arc<dyn Clock>, limits: Limits) -> Self {
        Self {
            mode,
            store,
            clock,
            limits,
            buckets: Mutex::new(HashMap::new()),
            open: Arc::new(Mutex::new(HashMap::new())),
            refused: Family::default(),
        }
    }

    /// Registers `sextant_grpc_refused_total{code}`: requests refused by
    /// authentication, authorization or the per-peer limits.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "sextant_grpc_refused",
            "gRPC requests refused before any handler (unauthenticated, permission_denied, resource_exhausted)",
            self.refused.clone(),
        );
    }

    fn count_refusal(&self, status: &Status) {
        let code = match status.code() {
            tonic::Code::Unauthenticated => "unauthenticated",
            tonic::Code::PermissionDenied => "permission_denied",
            tonic::Code::ResourceExhausted => "resource_exhausted",
            tonic::Code::Unimplemented => "unimplemented",
            _ => "other",
        };
        self.refused
            .get_or_create(&vec![("code".to_owned(), code.to_owned())])
            .inc();
    }

    pub fn insecure(&self) -> bool {
        matches!(self.mode, Mode::Insecure)
    }

    /// `mtls+token` or `insecure`.
    pub fn mode_name(&self) -> &'static str {
        match self.mode {
            Mode::Insecure => "insecure",
            Mode::Secure { .. } => "mtls+token",
        }
    }

    /// Who is calling, from the peer's certificate, the replica's
    /// on-behalf-of header, or a bearer token.
    pub async fn identify(&self, peer: &Peer, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let policy = match &self.mode {
            Mode::Insecure => return Ok(Principal::Insecure),
            Mode::Secure { policy } => policy,
        };
        if let Some(sextant_tls::Identity { kind, id }) = &peer.cert {
            use sextant_tls::Kind;
            let node = |kind| Principal::Node {
                kind,
                id: id.clone(),
            };
            return match kind {
                Kind::Operator => policy.operator(id),
                Kind::Edge => Ok(node(NodeKind::Edge)),
                Kind::Dns => Ok(node(NodeKind::Dns)),
                Kind::Probe => Ok(node(NodeKind::Probe)),
                Kind::Replica => match headers.get(auth::ON_BEHALF_OF) {
                    None => Ok(Principal::Replica { id: id.clone() }),
                    Some(v) => v
                        .to_str()
                        .ok()
                        .and_then(|s| serde_json::from_str::<Principal>(s).ok())
                        .filter(|p| !matches!(p, Principal::Insecure))
                        .ok_or_else(|| {
                            AuthError::Denied(format!(
                                "replica/{id} sent an unreadable {} header",
                                auth::ON_BEHALF_OF
                            ))
                        }),
                },
            };
        }
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(AuthError::Unauthenticated);
        };
        let text = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                AuthError::BadToken("the authorization header is not `Bearer sxt_...`".into())
            })?;
        let (id, secret) = auth::parse_token(text.trim())?;
        let stored = state::load_token(self.store.as_ref(), id)
            .await
            .map_err(|e| AuthError::BadToken(format!("cannot read tokens: {e}")))?
            .ok_or_else(|| AuthError::BadToken(format!("no token with id {id}")))?;
        auth::check_token(&stored, secret, self.clock.now_ms())
    }

    /// Takes one request from the peer's rate bucket and one of its open
    /// slots; replicas (forwarding for others) are not limited.
    fn limit(&self, who: &Principal, peer: &Peer) -> Result<Option<OpenGuard>, Status> {
        if matches!(who, Principal::Replica { .. }) {
            return Ok(None);
        }
        let key = match who {
            Principal::Insecure => peer
                .addr
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|| "unknown".into()),
            who => who.to_string(),
        };
        let now = self.clock.now_ms();
        let mut buckets = self
            .buckets
            .lock()
            .map_err(|_| Status::internal("rate limiter poisoned"))?;
        if buckets.len() > 100_000 {
            // Forget idle peers (full buckets) rather than grow forever.
            let (rate, burst) = (self.limits.rate_per_sec, self.limits.burst);
            buckets.retain(|_, b| b.tokens + (now - b.at_ms) as f64 * rate / 1000.0 < burst);
        }
        let b = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.limits.burst,
            at_ms: now,
        });
        let elapsed = (now - b.at_ms).max(0) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * self.limits.rate_per_sec).min(self.limits.burst);
        b.at_ms = now;
        if b.tokens < 1.0 {
            return Err(Status::resource_exhausted(format!(
                "{key}: more than {} requests/s; slow down and retry",
                self.limits.rate_per_sec
            )));
        }
        let mut open = self
            .open
            .lock()
            .map_err(|_| Status::internal("stream counter poisoned"))?;
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= self.limits.max_open_per_peer {
            return Err(Status::resource_exhausted(format!(
                "{key}: {} requests and streams open already, the most one peer may have",
                self.limits.max_open_per_peer
            )));
        }
        // Only an admitted request spends from the budget.
        b.tokens -= 1.0;
        *n += 1;
        Ok(Some(OpenGuard {
            key,
            open: self.open.clone(),
        }))
    }

    /// Admits a request to `path`: its principal and its open-slot guard,
    /// or the status to refuse it with.
    pub async fn admit(
        &self,
        path: &str,
        headers: &HeaderMap,
        ext: &http::Extensions,
    ) -> Result<(Principal, Option<OpenGuard>), Status> {
        let r = self.admit_inner(path, headers, ext).await;
        if let Err(status) = &r {
            self.count_refusal(status);
        }
        r
    }

    async fn admit_inner(
        &self,
        path: &str,
        headers: &HeaderMap,
        ext: &http::Extensions,
    ) -> Result<(Principal, Option<OpenGuard>), Status> {
        let peer = Peer::of(ext);
        let who = self.identify(&peer, headers).await.map_err(|e| {
            debug!(path, peer = ?peer.addr, error = %e, "request not authenticated");
            Status::from(e)
        })?;
        match auth::need(path) {
            Some(need) => auth::allows(&who, need, path).map_err(|e| {
                warn!(path, %who, error = %e, "request refused");
                Status::from(e)
            })?,
            None if self.insecure() => {}
            None => return Err(Status::unimplemented(format!("unknown method {path}"))),
        }
        let guard = self.limit(&who, &peer)?;
        Ok((who, guard))
    }
}

/// The tower layer that runs [`Authenticator::admit`] before every service.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    pub auth: Arc<Authenticator>,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<Request<B>> for AuthService<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // The clone is ready only after poll_ready; call the one that is.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let admitted = auth
                .admit(req.uri().path(), req.headers(), req.extensions())
                .await;
            match admitted {
                Ok((who, guard)) => {
                    req.extensions_mut().insert(who);
                    let resp = inner.call(req).await?;
                    Ok(match guard {
                        Some(g) => resp.map(|body| Body::new(Guarded { body, _guard: g })),
                        None => resp,
                    })
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// A response body that holds its request's open slot until it ends.
struct Guarded {
    body: Body,
    _guard: OpenGuard,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Role, StoredToken};
    use sextant_store::embedded::EmbeddedStore;
    use std::sync::atomic::{AtomicI64, Ordering};

    struct TestClock(AtomicI64);
    impl Clock for TestClock {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    struct Fixture {
        auth: Authenticator,
        store: Arc<dyn Store>,
        _dir: tempfile::TempDir,
    }

    fn fixture(limits: Limits) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s")).expect("store"));
        let policy = Policy::from_toml(
            "[[operators]]\nname = \"alice\"\nrole = \"operator\"\nscopes = [\"region/eu-west\"]\n",
        )
        .expect("policy");
        let auth = Authenticator::new(
            Mode::Secure {
                policy: Arc::new(policy),
            },
            store.clone(),
            Arc::new(TestClock(AtomicI64::new(1_000))),
            limits,
        );
        Fixture {
            auth,
            store,
            _dir: dir,
        }
    }

    async fn token(store: &dyn Store, role: Role, expires: i64, revoked: bool) -> String {
        let (id, secret) = auth::new_token().expect("random");
        let t = StoredToken {
            id: id.clone(),
            name: "ci".into(),
            role,
            scopes: vec![],
            hash: auth::hash_secret(&secret),
            created_at_ms: 0,
            created_by: "test".into(),
            expires_at_ms: expires,
            revoked,
        };
        store
            .put(
                &state::token_key(&id),
                serde_json::to_vec(&t).expect("json"),
            )
            .await
            .expect("put");
        auth::token_text(&id, &secret)
    }

    fn bearer(text: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {text}").parse().expect("header"),
        );
        h
    }

    fn cert(kind: &str, id: &str) -> http::Extensions {
        let kind: sextant_tls::Kind = kind.parse().expect("kind");
        let mut ext = http::Extensions::new();
        ext.insert(sextant_tls::PeerInfo {
            remote: None,
            identity: Some(sextant_tls::Identity::new(kind, id).expect("identity")),
            cert_not_after_unix: None,
        });
        ext
    }

    /// The token with the last digit of its secret changed.
    fn wrong_secret(token: &str) -> String {
        let last = if token.ends_with('0') { '1' } else { '0' };
        format!("{}{last}", &token[..token.len() - 1])
    }

    const DRAIN: &str = "/sextant.v1.OperationsService/Drain";
    const STATUS: &str = "/sextant.v1.ClusterService/Status";

    #[tokio::test]
    async fn tokens_are_checked_and_roles_enforced() {
        let f = fixture(Limits::default());
        let none = http::Extensions::new();
        let e = f
            .auth
            .admit(STATUS, &HeaderMap::new(), &none)
            .await
            .expect_err("no credentials");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("no credentials"), "{}", e.message());

        let viewer = token(f.store.as_ref(), Role::Viewer, 10_000, false).await;
        let (who, _g) = f
            .auth
            .admit(STATUS, &bearer(&viewer), &none)
            .await
            .expect("viewer reads");
        assert!(who.to_string().starts_with("token/ci ("), "{who}");
        let e = f
            .auth
            .admit(DRAIN, &bearer(&viewer), &none)
            .await
            .expect_err("viewer drains");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("role viewer is not enough"),
            "{}",
            e.message()
        );

        let operator = token(f.store.as_ref(), Role::Operator, 10_000, false).await;
        assert!(f.auth.admit(DRAIN, &bearer(&operator), &none).await.is_ok());

        for (text, says) in [
            (
                token(f.store.as_ref(), Role::Admin, 500, false).await,
                "expired",
            ),
            (
                token(f.store.as_ref(), Role::Admin, 10_000, true).await,
                "revoked",
            ),
            (wrong_secret(&viewer), "does not match"),
            (
                "sxt_000000000000_".to_owned() + &"0".repeat(64),
                "no token with id",
            ),
            ("hunter2".to_owned(), "sxt_"),
        ] {
            let e = f
                .auth
                .admit(STATUS, &bearer(&text), &none)
                .await
                .expect_err(says);
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{says}");
            assert!(e.message().contains(says), "{}", e.message());
        }
        let e = f
            .auth
            .admit("/sextant.v1.FleetService/Nope", &bearer(&operator), &none)
            .await
            .expect_err("unknown method");
        assert_eq!(e.code(), tonic::Code::Unimplemented);
    }

    #[tokio::test]
    async fn certificates_name_nodes_operators_and_replicas() {
        let f = fixture(Limits::default());
        let h = HeaderMap::new();
        let (who, _g) = f
            .auth
            .admit(
                "/sextant.v1.SignalsService/ReportEdge",
                &h,
                &cert("edge", "ams1"),
            )
            .await
            .expect("edge reports");
        assert_eq!(
            who,
            Principal::Node {
                kind: NodeKind::Edge,
                id: "ams1".into()
            }
        );
        assert!(f
            .auth
            .admit(DRAIN, &h, &cert("edge", "ams1"))
            .await
            .is_err());
        let (who, _g) = f
            .auth
            .admit(DRAIN, &h, &cert("operator", "alice"))
            .await
            .expect("alice operates");
        assert!(matches!(
            who,
            Principal::Operator {
                role: Role::Operator,
                ..
            }
        ));
        let e = f
            .auth
            .admit(STATUS, &h, &cert("operator", "mallory"))
            .await
            .expect_err("not in the policy");
        assert!(
            e.message().contains("not in the policy file"),
            "{}",
            e.message()
        );

        // A replica forwards on behalf of the original caller.
        let mut fwd = HeaderMap::new();
        let alice = serde_json::to_string(&who).expect("json");
        fwd.insert(auth::ON_BEHALF_OF, alice.parse().expect("header"));
        let (on_behalf, _g) = f
            .auth
            .admit(DRAIN, &fwd, &cert("replica", "cp-2"))
            .await
            .expect("forwarded");
        assert_eq!(on_behalf, who);
        // Nobody else is believed.
        let (edge, _g) = f
            .auth
            .admit(
                "/sextant.v1.SignalsService/ReportEdge",
                &fwd,
                &cert("edge", "ams1"),
            )
            .await
            .expect("edge");
        assert!(matches!(edge, Principal::Node { .. }));
        let mut bad = HeaderMap::new();
        bad.insert(
            auth::ON_BEHALF_OF,
            "{\"type\":\"insecure\"}".parse().expect("h"),
        );
        assert!(f
            .auth
            .admit(DRAIN, &bad, &cert("replica", "cp-2"))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn peers_are_rate_and_concurrency_limited() {
        let f = fixture(Limits {
            rate_per_sec: 1.0,
            burst: 3.0,
            max_open_per_peer: 2,
        });
        let h = HeaderMap::new();
        let ext = cert("operator", "alice");
        let g1 = f.auth.admit(STATUS, &h, &ext).await.expect("1");
        let _g2 = f.auth.admit(STATUS, &h, &ext).await.expect("2");
        let e = f.auth.admit(STATUS, &h, &ext).await.expect_err("3 open");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("open already"), "{}", e.message());
        drop(g1);
        let _g3 = f.auth.admit(STATUS, &h, &ext).await.expect("a slot freed");
        // Another peer has its own budget.
        let _other = f
            .auth
            .admit(STATUS, &h, &cert("operator", "alice2"))
            .await
            .expect_err("alice2 is not in the policy");
        drop(_g3);
        drop(_g2);
        let e = f.auth.admit(STATUS, &h, &ext).await.expect_err("rate");
        assert!(e.message().contains("requests/s"), "{}", e.message());
    }
}
