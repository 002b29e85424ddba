//! A small fleet config, for unit tests, benches and the fuzz target:
//! www (1 answer) and api.v1 (2 answers) in example.com; groups nl
//! (10.1/16, 2001:db8:1::/48), gb (10.2/16, its row fully drained), de
//! (10.5/16, IPv4-only edges), cdn (10.7/16 → a CNAME) and default.

use sextant_proto::v1 as pb;

/// Edge weights of a row.
fn weights(ws: &[(&str, f64)]) -> Vec<pb::EdgeWeight> {
    ws.iter()
        .map(|(e, w)| pb::EdgeWeight {
            edge: (*e).into(),
            weight: *w,
        })
        .collect()
}

/// A routing row.
pub fn row(service: &str, group: &str, ws: &[(&str, f64)], unserved: f64) -> pb::GroupRouting {
    pb::GroupRouting {
        service: service.into(),
        group: group.into(),
        weights: weights(ws),
        unserved,
        ..pb::GroupRouting::default()
    }
}

/// The config.
pub fn config() -> pb::NodeConfig {
    let service = |id: &str, host: &str, answers: u32| pb::ServiceConfig {
        id: id.into(),
        hostname: host.into(),
        zone: "example.com".into(),
        ttl_seconds: 30,
        default_group: "default".into(),
        soa_mname: "ns1.example.com".into(),
        soa_rname: "hostmaster.example.com".into(),
        soa_refresh: 3600,
        soa_retry: 600,
        soa_expire: 604_800,
        soa_minimum: 60,
        nameservers: vec!["ns1.example.com".into(), "ns2.example.com".into()],
        answer_count: answers,
    };
    let edge = |id: &str, addrs: &[&str], cname: &str| pb::EdgeTarget {
        id: id.into(),
        addresses: addrs.iter().map(|a| (*a).into()).collect(),
        cname: cname.into(),
        site: format!("region/r/metro/m/site/{id}"),
    };
    let group = |id: &str, prefixes: &[&str]| pb::GroupMatch {
        id: id.into(),
        prefixes: prefixes.iter().map(|p| (*p).into()).collect(),
        ..pb::GroupMatch::default()
    };
    pb::NodeConfig {
        services: vec![
            service("www", "www.example.com", 1),
            service("api", "api.v1.example.com", 2),
        ],
        edges: vec![
            edge("ams1", &["127.10.1.1", "2001:db8::1"], ""),
            edge("ams2", &["127.10.1.2"], ""),
            edge("lon1", &["127.10.1.3", "127.10.1.33"], ""),
            edge("fra1", &["127.10.2.1"], ""),
            edge("cdn-a", &[], "lon.cdn-a.example.net"),
        ],
        groups: vec![
            group("cdn", &["10.7.0.0/16"]),
            group("de", &["10.5.0.0/16"]),
            group("default", &[]),
            group("gb", &["10.2.0.0/16"]),
            group("nl", &["10.1.0.0/16", "2001:db8:1::/48"]),
        ],
        routing: vec![
            row("www", "nl", &[("ams1", 1.0)], 0.0),
            row("www", "gb", &[], 1.0),
            row("www", "de", &[("fra1", 1.0)], 0.0),
            row("www", "cdn", &[("cdn-a", 1.0)], 0.0),
            row("www", "default", &[("lon1", 1.0)], 0.0),
            row("api", "nl", &[("ams1", 0.5), ("ams2", 0.5)], 0.0),
            row("api", "default", &[("lon1", 0.6), ("fra1", 0.4)], 0.0),
        ],
        ..pb::NodeConfig::default()
    }
}
