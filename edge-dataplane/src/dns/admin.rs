//! The GeoDNS admin port: `/healthz`, `/metrics` (Prometheus text) and
//! `/debug/answer?name=NAME&client=IP[/LEN][&type=A|AAAA]`, which says which
//! group a client falls in, with which ECS scope, which routing row and
//! weights answer it, and shows one sample answer.

use std::net::IpAddr;
use std::sync::Arc;

use hyper::{StatusCode, Uri};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::table::{TYPE_A, TYPE_AAAA};
use super::Shared;

/// What the admin port serves.
#[derive(Debug)]
pub struct Admin {
    pub shared: Arc<Shared>,
    pub registry: Registry,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0))
}

/// Minimal percent-decoding for query parameters.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => match s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                None => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| decode(v))
    })
}

impl Admin {
    /// The metrics text, with the config age updated.
    pub fn metrics(&self) -> String {
        let held = self.shared.current.load_full();
        self.shared.metrics.config_age_seconds.set(
            held.as_ref()
                .map_or(-1.0, |c| (now_ms() - c.accepted_at_ms) as f64 / 1000.0),
        );
        let mut out = String::new();
        match encode(&mut out, &self.registry) {
            Ok(()) => out,
            Err(e) => format!("# cannot encode metrics: {e}\n"),
        }
    }

    fn debug_answer(&self, query: &str) -> (StatusCode, String) {
        let Some(held) = self.shared.current.load_full() else {
            return (StatusCode::SERVICE_UNAVAILABLE, "no config yet\n".into());
        };
        let (Some(name), Some(client)) = (param(query, "name"), param(query, "client")) else {
            return (
                StatusCode::BAD_REQUEST,
                "usage: /debug/answer?name=www.example.com&client=192.0.2.1[/24][&type=A|AAAA]\n"
                    .into(),
            );
        };
        let (addr, source) = match client.split_once('/') {
            Some((a, l)) => (a.parse::<IpAddr>(), l.parse::<u8>().ok()),
            None => (client.parse::<IpAddr>(), None),
        };
        let Ok(addr) = addr else {
            return (
                StatusCode::BAD_REQUEST,
                format!("client {client:?} is not an IP address (optionally /LEN)\n"),
            );
        };
        let qtype = match param(query, "type").as_deref() {
            None | Some("A") | Some("a") => TYPE_A,
            Some("AAAA") | Some("aaaa") => TYPE_AAAA,
            Some(other) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("type {other:?}: A or AAAA\n"),
                )
            }
        };
        let mut rng = fastrand::Rng::new();
        let v = held.value.explain(&name, addr, source, qtype, &mut rng);
        let status = if v.get("error").is_some() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        };
        (
            status,
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        )
    }

    fn respond(&self, uri: &Uri) -> (StatusCode, String) {
        match uri.path() {
            "/metrics" => (StatusCode::OK, self.metrics()),
            "/healthz" => match self.shared.current.load_full() {
                Some(c) => (
                    StatusCode::OK,
                    format!("ok: config version {}\n", c.version),
                ),
                None => (StatusCode::SERVICE_UNAVAILABLE, "no config yet\n".into()),
            },
            "/debug/answer" => self.debug_answer(uri.query().unwrap_or_default()),
            _ => (StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }
}

/// Serves the admin port forever.
pub async fn serve(listener: TcpListener, admin: Admin) {
    crate::admin::serve_with(listener, move |uri| admin.respond(uri)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters() {
        assert_eq!(
            param("name=www.example.com&client=10.1.2.0%2F24", "client").as_deref(),
            Some("10.1.2.0/24")
        );
        assert_eq!(param("a=1", "b"), None);
        assert_eq!(decode("%zz%"), "%zz%");
    }
}
