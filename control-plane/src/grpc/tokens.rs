//! `TokenService`: admins create, list and revoke operators' bearer
//! tokens. The secret is returned once; the store keeps its SHA-256. Every
//! creation and revocation is an audit record with the admin's identity.

use std::sync::Arc;

use sextant_core::DomainPath;
use sextant_proto::v1 as pb;
use sextant_proto::v1::token_service_client::TokenServiceClient;
use sextant_proto::v1::token_service_server::TokenService;
use sextant_store::Store;
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use crate::auth::{self, Role, StoredToken};
use crate::cluster::Node;
use crate::control_loop::Clock;
use crate::state;

/// Longest token lifetime.
pub const MAX_TTL_SECONDS: u64 = 366 * 24 * 3600;

pub struct TokenApi {
    pub node: Node,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for TokenApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenApi").finish_non_exhaustive()
    }
}

fn info_of(t: &StoredToken) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id.clone(),
        name: t.name.clone(),
        role: t.role.as_str().to_owned(),
        scopes: t.scopes.clone(),
        created_at_unix_ms: t.created_at_ms,
        created_by: t.created_by.clone(),
        expires_at_unix_ms: t.expires_at_ms,
        revoked: t.revoked,
    }
}

/// Checks a create request whole; nothing is stored when a field is bad.
fn check_create(req: &pb::CreateTokenRequest) -> Result<(Role, Vec<String>), Status> {
    if !auth::valid_name(&req.name) {
        return Err(Status::invalid_argument(format!(
            "token name {:?}: 1 to 128 of A-Z a-z 0-9 . _ -",
            req.name
        )));
    }
    let role = Role::parse(&req.role).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if req.ttl_seconds == 0 || req.ttl_seconds > MAX_TTL_SECONDS {
        return Err(Status::invalid_argument(format!(
            "ttl_seconds must be 1..={MAX_TTL_SECONDS} (366 days), got {}",
            req.ttl_seconds
        )));
    }
    let mut scopes = Vec::new();
    for (i, s) in req.scopes.iter().enumerate() {
        let d: DomainPath = s
            .parse()
            .map_err(|e| Status::invalid_argument(format!("scopes[{i}] {s:?}: {e}")))?;
        scopes.push(d.to_string());
    }
    if !scopes.is_empty() && role != Role::Operator {
        return Err(Status::invalid_argument(
            "scopes limit where an operator drains: only operator tokens take them",
        ));
    }
    Ok((role, scopes))
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    #[instrument(skip_all, fields(name))]
    async fn create(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let who = super::principal(&request)?;
        let req = request.get_ref().clone();
        tracing::Span::current().record("name", req.name.as_str());
        let (role, scopes) = check_create(&req)?;
        let handle = match super::writer(&self.node, &request)? {
            super::Writer::Local(h) => h,
            super::Writer::Remote { channel, .. } => {
                let r = TokenServiceClient::new(channel)
                    .create(super::forwarded(req, &self.node.me.id, &who))
                    .await?;
                return Ok(Response::new(r.into_inner()));
            }
        };
        let (id, secret) = auth::new_token().map_err(|e| Status::internal(e.to_string()))?;
        let now = self.clock.now_ms();
        let ttl_ms = i64::try_from(req.ttl_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
        let intent = super::intent(&who, None, req.reason.clone());
        let token = StoredToken {
            id: id.clone(),
            name: req.name.clone(),
            role,
            scopes,
            hash: auth::hash_secret(&secret),
            created_at_ms: now,
            created_by: intent.actor.clone(),
            expires_at_ms: now.saturating_add(ttl_ms),
            revoked: false,
        };
        handle
            .put_token(token.clone(), "token.create", intent)
            .await?;
        info!(id = %token.id, name = %token.name, role = token.role.as_str(), "token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some(info_of(&token)),
            secret: auth::token_text(&id, &secret),
        }))
    }

    async fn list(
        &self,
        _: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let tokens = state::list_tokens(self.store.as_ref())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.iter().map(info_of).collect(),
        }))
    }

    #[instrument(skip_all, fields(id))]
    async fn revoke(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let who = super::principal(&request)?;
        let req = request.get_ref().clone();
        tracing::Span::current().record("id", req.id.as_str());
        let handle = match super::writer(&self.node, &request)? {
            super::Writer::Local(h) => h,
            super::Writer::Remote { channel, .. } => {
                let r = TokenServiceClient::new(channel)
                    .revoke(super::forwarded(req, &self.node.me.id, &who))
                    .await?;
                return Ok(Response::new(r.into_inner()));
            }
        };
        let mut token = state::load_token(self.store.as_ref(), &req.id)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("no token with id {:?}", req.id)))?;
        if !token.revoked {
            token.revoked = true;
            let intent = super::intent(&who, None, req.reason.clone());
            handle
                .put_token(token.clone(), "token.revoke", intent)
                .await?;
            info!(id = %token.id, name = %token.name, "token revoked");
        }
        Ok(Response::new(pb::RevokeTokenResponse {
            token: Some(info_of(&token)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, role: &str, scopes: &[&str], ttl: u64) -> pb::CreateTokenRequest {
        pb::CreateTokenRequest {
            name: name.into(),
            role: role.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ttl_seconds: ttl,
            reason: String::new(),
        }
    }

    #[test]
    fn create_requests_are_checked_naming_the_field() {
        assert!(check_create(&req("ci", "viewer", &[], 60)).is_ok());
        let (role, scopes) =
            check_create(&req("ops", "operator", &["region/eu-west"], 60)).expect("valid");
        assert_eq!(
            (role, scopes),
            (Role::Operator, vec!["region/eu-west".into()])
        );
        for (r, says) in [
            (req("", "viewer", &[], 60), "token name"),
            (req("a b", "viewer", &[], 60), "token name"),
            (req("ci", "root", &[], 60), "unknown role"),
            (req("ci", "viewer", &[], 0), "ttl_seconds"),
            (req("ci", "viewer", &[], MAX_TTL_SECONDS + 1), "ttl_seconds"),
            (req("ci", "operator", &["planet/x"], 60), "scopes[0]"),
            (
                req("ci", "admin", &["region/a"], 60),
                "only operator tokens",
            ),
        ] {
            let e = check_create(&r).expect_err(says);
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(says), "{}", e.message());
        }
    }
}
