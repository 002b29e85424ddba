//! `sextantctl token ...`: create, list and revoke bearer tokens (admins).

use clap::Subcommand;
use serde_json::{json, Value};
use sextant_proto::v1 as pb;
use sextant_proto::v1::token_service_client::TokenServiceClient;

use super::{CliError, Table};
use crate::timefmt::{parse_duration_ms, rfc3339};

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Issue a token; its secret is printed once and never again.
    Create {
        /// Who it is for (audit records say `token/NAME (ID)`).
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Lifetime, e.g. 12h or 30d (at most 366d).
        #[arg(long)]
        ttl: String,
        /// Domains an operator token may drain, e.g. region/eu-west
        /// (repeatable; none: all).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id; it stops working at once.
    Revoke {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

fn token_json(t: &pb::TokenInfo) -> Value {
    json!({
        "id": t.id, "name": t.name, "role": t.role, "scopes": t.scopes,
        "created": rfc3339(t.created_at_unix_ms), "created_by": t.created_by,
        "expires": rfc3339(t.expires_at_unix_ms), "revoked": t.revoked,
    })
}

pub(super) async fn run(
    channel: super::Conn,
    cmd: TokenCmd,
    json: bool,
) -> Result<String, CliError> {
    let mut client = TokenServiceClient::new(channel);
    Ok(match cmd {
        TokenCmd::Create {
            name,
            role,
            ttl,
            scopes,
            reason,
        } => {
            let ttl_ms =
                parse_duration_ms(&ttl).map_err(|e| CliError::Usage(format!("--ttl: {e}")))?;
            let ttl_seconds = u64::try_from(ttl_ms / 1000)
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| CliError::Usage(format!("--ttl {ttl}: must be at least 1s")))?;
            let r = client
                .create(pb::CreateTokenRequest {
                    name,
                    role,
                    scopes,
                    ttl_seconds,
                    reason,
                })
                .await?
                .into_inner();
            let info = r.token.unwrap_or_default();
            if json {
                let mut v = token_json(&info);
                v["token"] = Value::String(r.secret);
                v.to_string()
            } else {
                format!(
                    "token {} for {} ({}), expires {}\n\n{}\n\nThis is the only time the token is shown. Pass it as SEXTANT_TOKEN (or --token).",
                    info.id,
                    info.name,
                    info.role,
                    rfc3339(info.expires_at_unix_ms),
                    r.secret
                )
            }
        }
        TokenCmd::List => {
            let r = client.list(pb::ListTokensRequest {}).await?.into_inner();
            if json {
                Value::Array(r.tokens.iter().map(token_json).collect()).to_string()
            } else {
                let mut t = Table::new([
                    "ID",
                    "NAME",
                    "ROLE",
                    "SCOPES",
                    "EXPIRES",
                    "STATE",
                    "CREATED BY",
                ]);
                for k in &r.tokens {
                    t.row([
                        k.id.clone(),
                        k.name.clone(),
                        k.role.clone(),
                        if k.scopes.is_empty() {
                            "-".into()
                        } else {
                            k.scopes.join(",")
                        },
                        rfc3339(k.expires_at_unix_ms),
                        if k.revoked { "revoked" } else { "active" }.into(),
                        k.created_by.clone(),
                    ]);
                }
                t.render()
            }
        }
        TokenCmd::Revoke { id, reason } => {
            let r = client
                .revoke(pb::RevokeTokenRequest { id, reason })
                .await?
                .into_inner();
            let info = r.token.unwrap_or_default();
            if json {
                token_json(&info).to_string()
            } else {
                format!("token {} ({}) revoked", info.id, info.name)
            }
        }
    })
}
