//! The fleet: edges, origins, client groups and services, as read from a
//! fleet file and checked.
//!
//! A fleet file (TOML, see `deploy/examples/fleet.toml`) is read into a
//! [`FleetSpec`] (serde, unknown fields rejected) and then checked by
//! [`Fleet::from_spec`], which reports *every* problem with its location and
//! builds nothing unless there are none: a bad file is rejected whole.
//!
//! One traffic unit throughout: requests per second (`*_rps`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::domain::{DomainKind, DomainPath};
use crate::ids::{check_id, EdgeId, GroupId, OriginId, ServiceId};

// ---------------------------------------------------------------------------
// The file format.
// ---------------------------------------------------------------------------

/// A fleet file, as written by operators.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<OriginSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edges: Vec<EdgeSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupSpec>,
    /// Sites whose reachability by anycast is judged from BGP (BMP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anycast: Vec<AnycastSpec>,
}

/// A steered hostname and its policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Short id, e.g. `www`; client groups name it in `demand_rps`.
    pub id: String,
    /// The steered name, e.g. `www.example.com`; must be inside `zone`.
    pub hostname: String,
    /// The DNS zone served authoritatively, e.g. `example.com`.
    pub zone: String,
    /// TTL of steered answers.
    #[serde(default = "default_ttl")]
    pub ttl_seconds: u32,
    /// Group used for clients that match no group, and as the fallback of a
    /// group with no usable edge.
    pub default_group: String,
    /// Name servers of the zone (NS records).
    pub nameservers: Vec<String>,
    /// SOA data of the zone.
    #[serde(default)]
    pub soa: SoaSpec,
    /// Addresses (or CNAMEs) per answer.
    #[serde(default = "default_answer_count")]
    pub answer_count: u32,
    /// Steering policy.
    #[serde(default)]
    pub policy: PolicySpec,
}

fn default_ttl() -> u32 {
    30
}

fn default_answer_count() -> u32 {
    1
}

/// SOA record data; `mname` defaults to the first name server and `rname` to
/// `hostmaster.<zone>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoaSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rname: Option<String>,
    #[serde(default = "soa_refresh")]
    pub refresh: u32,
    #[serde(default = "soa_retry")]
    pub retry: u32,
    #[serde(default = "soa_expire")]
    pub expire: u32,
    #[serde(default = "soa_minimum")]
    pub minimum: u32,
}

fn soa_refresh() -> u32 {
    3600
}
fn soa_retry() -> u32 {
    600
}
fn soa_expire() -> u32 {
    604_800
}
fn soa_minimum() -> u32 {
    60
}

impl Default for SoaSpec {
    fn default() -> Self {
        Self {
            mname: None,
            rname: None,
            refresh: soa_refresh(),
            retry: soa_retry(),
            expire: soa_expire(),
            minimum: soa_minimum(),
        }
    }
}

/// How a service is steered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    /// Sextant computes the weights from capacity and signals.
    #[default]
    Optimize,
    /// Operator-set static weights per group and edge (classic weighted DNS),
    /// still health- and drain-aware: renormalised over what remains.
    Weighted,
}

impl PolicyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Optimize => "optimize",
            Self::Weighted => "weighted",
        }
    }
}

/// The fault-domain level that `min_domains` counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainLevel {
    /// Distinct sites (`region/R/metro/M/site/S`).
    Site,
    /// Distinct metros (`region/R/metro/M`).
    #[default]
    Metro,
    /// Distinct regions (`region/R`).
    Region,
}

impl DomainLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Site => "site",
            Self::Metro => "metro",
            Self::Region => "region",
        }
    }

    /// The domain of this level that a site path is in.
    pub fn of_site(self, site: &DomainPath) -> DomainPath {
        let want = match self {
            Self::Site => DomainKind::Site,
            Self::Metro => DomainKind::Metro,
            Self::Region => DomainKind::Region,
        };
        site.ancestors()
            .find(|d| d.kind() == want)
            .unwrap_or_else(|| site.clone())
    }
}

/// A service's steering policy.
///
/// In `optimize` mode (the default) the solver minimises, over every
/// service and group at once (edges are shared),
///
/// ```text
///   Σ rps × (latency_weight × latency_ms + cost_weight × price)  + penalties
/// ```
///
/// where `price` is an edge's money per rps (`cost_per_unit` for
/// self-built edges; for third-party edges nothing inside `commit_rps` and
/// `overage_price` above it), subject to each edge's capacity × drain ×
/// `target_utilization`. Every field below is optional and has the default
/// shown; in `weighted` mode only `weights` may be set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    #[serde(default)]
    pub mode: PolicyMode,
    /// For `weighted`: group id → edge id → relative weight (≥ 0).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub weights: BTreeMap<String, BTreeMap<String, f64>>,
    /// Weight of latency in the objective, per ms and rps (≥ 0; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_weight: Option<f64>,
    /// Weight of money in the objective, per unit of price and rps (≥ 0;
    /// default 1). With the default weights one unit of money per rps
    /// weighs as much as one millisecond; raise it to trade latency for
    /// cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_weight: Option<f64>,
    /// Highest acceptable latency, ms (> 0; default none). Edges above it are
    /// used only when no capacity is left within it, and the row says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_ms: Option<f64>,
    /// Utilization planned for, in (0, 1] (default 0.8): the headroom is
    /// `1 - target_utilization`. An edge runs above it, up to its full
    /// capacity, only when the alternative is unserved demand. Edges are
    /// shared: an edge plans for the lowest target of the services with
    /// demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_utilization: Option<f64>,
    /// Resilience: each group spreads over at least this many edges, 1 to 16
    /// (default 1): no edge carries more than `1 / min_edges` of a group's
    /// demand, as far as the group's usable candidates and capacity allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_edges: Option<u32>,
    /// Resilience: each group spreads over at least this many fault domains
    /// of `domain_level`, 1 to 16 (default 1): no domain carries more than
    /// `1 / min_domains` of a group's demand, as far as the fleet allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_domains: Option<u32>,
    /// What `min_domains` counts: `site`, `metro` (default) or `region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_level: Option<DomainLevel>,
    /// Largest share of a group's demand that one new routing table may move
    /// to other edges, in (0, 1] (default 1: no limit). Weight leaving an
    /// unhealthy or fully drained edge, and load above a reduced capacity
    /// (a drain step), move at once regardless. When a table is held back,
    /// `summary.pending_shift` is set and the next solve moves further.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shift: Option<f64>,
}

/// A checked steering policy (`optimize` fields with defaults applied; see
/// [`PolicySpec`] for their meaning).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub latency_weight: f64,
    pub cost_weight: f64,
    pub max_latency_ms: Option<f64>,
    pub target_utilization: f64,
    pub min_edges: u32,
    pub min_domains: u32,
    pub domain_level: DomainLevel,
    pub max_shift: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            latency_weight: 1.0,
            cost_weight: 1.0,
            max_latency_ms: None,
            target_utilization: 0.8,
            min_edges: 1,
            min_domains: 1,
            domain_level: DomainLevel::Metro,
            max_shift: 1.0,
        }
    }
}

/// An origin (where edges fetch from).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginSpec {
    pub id: String,
    /// Its fault-domain path, `region/R/origin/O`.
    pub domain: String,
    /// `host:port` endpoints edge proxies connect to.
    pub endpoints: Vec<String>,
    pub capacity_rps: f64,
}

/// Whether an edge is ours or a third party's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeKindSpec {
    SelfBuilt,
    ThirdParty,
}

/// An edge: a self-built PoP cluster or a third-party CDN endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSpec {
    pub id: String,
    pub kind: EdgeKindSpec,
    /// Site path, `region/R/metro/M/site/S`.
    pub site: String,
    /// Self-built: addresses answered in DNS (A/AAAA).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Third party: the CNAME target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cname: Option<String>,
    /// Third party: the provider name (its domain is `provider/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub capacity_rps: f64,
    /// Cost per unit of traffic (per rps sustained), any currency. For a
    /// self-built edge, the money the solver counts per rps. For a third
    /// party, the price when it has no `overage_price`.
    #[serde(default)]
    pub cost_per_unit: f64,
    /// Third party: traffic already paid for, rps. The solver treats it as
    /// sunk: traffic inside the commit costs no money.
    #[serde(default)]
    pub commit_rps: f64,
    /// Third party: price per rps above the commit.
    #[serde(default)]
    pub overage_price: f64,
    /// Health-check target: an `http://` or `https://` URL, or `host:port`.
    pub health_check: String,
}

/// A client group: users steered alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub id: String,
    /// Client prefixes (CIDR), IPv4 or IPv6.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    /// ISO 3166-1 alpha-2 country codes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub countries: Vec<String>,
    /// Origin ASNs of client networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub asns: Vec<u32>,
    /// Demand per service id, rps.
    #[serde(default)]
    pub demand_rps: BTreeMap<String, f64>,
    /// Latency estimate, ms, to candidate edges: keys are edge ids or
    /// fault-domain paths (a site, metro, region or provider); an edge takes
    /// the most specific entry that covers it (edge id, then the deepest
    /// site-hierarchy path, then its provider). Edges with no entry are not
    /// candidates of this group.
    pub latency_ms: BTreeMap<String, f64>,
}

/// An anycast site: the routers that announce its service prefixes, as
/// they report over BMP. When `quorum` of them have no route for any of
/// the prefixes (withdrawn, peer down, BMP session down), the site's edges
/// are not reachable by anycast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnycastSpec {
    /// Site path, `region/R/metro/M/site/S`, with at least one edge.
    pub site: String,
    /// How the station knows each router: its BMP Initiation sysName, its
    /// BGP router id, or the address its BMP session comes from.
    pub routers: Vec<String>,
    /// The site's anycast service prefixes (CIDR).
    pub prefixes: Vec<String>,
    /// Routers that must lose the route for the site to be unreachable
    /// (default: all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<usize>,
}

// ---------------------------------------------------------------------------
// Problems.
// ---------------------------------------------------------------------------

/// One problem in a fleet file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// e.g. `edges[3] "ams1-a".capacity_rps`, or `line 12, column 3`.
    pub location: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// A fleet file that cannot be used, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FleetError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for FleetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid fleet: {n} problem{}",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl FleetError {
    fn single(location: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                location: location.into(),
                message: message.into(),
            }],
        }
    }
}

/// Turns a byte offset into `line L, column C` (1-based).
pub fn line_col(text: &str, offset: usize) -> String {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {col}")
}

impl FleetSpec {
    /// Reads a TOML fleet file. Syntax errors, wrong types and unknown fields
    /// are reported with their line and column.
    pub fn from_toml(text: &str) -> Result<Self, FleetError> {
        toml::from_str(text).map_err(|e| {
            let location = e
                .span()
                .map_or_else(|| "fleet file".to_owned(), |s| line_col(text, s.start));
            FleetError::single(location, e.message().trim().to_owned())
        })
    }

    /// Reads a JSON fleet document (same structure as TOML).
    pub fn from_json(text: &str) -> Result<Self, FleetError> {
        serde_json::from_str(text).map_err(|e| {
            FleetError::single(
                format!("line {}, column {}", e.line(), e.column()),
                e.to_string(),
            )
        })
    }

    /// Writes the fleet as TOML.
    pub fn to_toml(&self) -> Result<String, FleetError> {
        toml::to_string(self).map_err(|e| FleetError::single("fleet", e.to_string()))
    }
}

// ---------------------------------------------------------------------------
// The checked model.
// ---------------------------------------------------------------------------

/// How clients reach an edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeTarget {
    /// Our own PoP: answered as A/AAAA records.
    SelfBuilt { addresses: Vec<IpAddr> },
    /// A third-party CDN endpoint: answered as a CNAME.
    ThirdParty { cname: String },
}

/// A checked edge.
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    pub id: EdgeId,
    pub site: DomainPath,
    pub provider: Option<DomainPath>,
    pub target: EdgeTarget,
    pub capacity_rps: f64,
    pub cost_per_unit: f64,
    pub commit_rps: f64,
    pub overage_price: f64,
    pub health_check: String,
}

impl Edge {
    /// Every fault domain this edge is in: its site and the domains above
    /// it, then its provider.
    pub fn domains(&self) -> impl Iterator<Item = DomainPath> + '_ {
        self.site.ancestors().chain(self.provider.iter().cloned())
    }

    /// The edge's region.
    pub fn region(&self) -> Option<DomainPath> {
        self.site.region()
    }

    pub fn kind_str(&self) -> &'static str {
        match self.target {
            EdgeTarget::SelfBuilt { .. } => "self_built",
            EdgeTarget::ThirdParty { .. } => "third_party",
        }
    }

    pub fn is_third_party(&self) -> bool {
        matches!(self.target, EdgeTarget::ThirdParty { .. })
    }

    /// Money per rps at the margin outside a commit: `cost_per_unit` for a
    /// self-built edge; for a third party its `overage_price`, or
    /// `cost_per_unit` when it has no overage price.
    pub fn price_per_unit(&self) -> f64 {
        if self.is_third_party() && self.overage_price > 0.0 {
            self.overage_price
        } else {
            self.cost_per_unit
        }
    }

    /// Whether traffic up to `commit_rps` is already paid for (a third
    /// party with a commit): it costs nothing more, and only traffic above
    /// the commit costs [`Edge::price_per_unit`].
    pub fn has_commit(&self) -> bool {
        self.is_third_party() && self.commit_rps > 0.0 && self.price_per_unit() > 0.0
    }
}

/// A checked origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub id: OriginId,
    pub domain: DomainPath,
    pub endpoints: Vec<String>,
    pub capacity_rps: f64,
}

/// A candidate edge of a group, with its latency estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub edge: EdgeId,
    pub latency_ms: f64,
    /// Position of the edge in [`Fleet::edges`] (id order), so that the
    /// solver needs no lookup by id.
    pub edge_index: usize,
}

/// A checked client group.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientGroup {
    pub id: GroupId,
    pub prefixes: Vec<IpNet>,
    pub countries: Vec<String>,
    pub asns: Vec<u32>,
    pub demand_rps: BTreeMap<ServiceId, f64>,
    /// Candidate edges, sorted by edge id.
    pub candidates: Vec<Candidate>,
}

impl ClientGroup {
    pub fn demand(&self, service: &ServiceId) -> f64 {
        self.demand_rps.get(service).copied().unwrap_or(0.0)
    }
}

/// A checked service.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub id: ServiceId,
    pub hostname: String,
    pub zone: String,
    pub ttl_seconds: u32,
    pub default_group: GroupId,
    pub nameservers: Vec<String>,
    pub soa: SoaSpec,
    pub answer_count: u32,
    pub mode: PolicyMode,
    /// For `weighted`: group → edge → relative weight.
    pub weights: BTreeMap<GroupId, BTreeMap<EdgeId, f64>>,
    /// For `optimize`: objective, headroom, resilience and stability.
    pub policy: Policy,
}

/// A checked anycast site.
#[derive(Debug, Clone, PartialEq)]
pub struct Anycast {
    pub site: DomainPath,
    pub routers: Vec<String>,
    pub prefixes: Vec<IpNet>,
    /// Routers that must lose the route (1 ..= routers).
    pub quorum: usize,
}

/// Longest router name.
pub const MAX_ROUTER_LEN: usize = 128;

/// What sits below one fault domain.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DomainInfo {
    pub edges: Vec<EdgeId>,
    pub origins: Vec<OriginId>,
    /// Declared edge capacity below it, rps.
    pub capacity_rps: f64,
}

/// A checked fleet. Built only by [`Fleet::from_spec`].
#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    spec: FleetSpec,
    pub edges: BTreeMap<EdgeId, Edge>,
    pub origins: BTreeMap<OriginId, Origin>,
    pub groups: BTreeMap<GroupId, ClientGroup>,
    pub services: BTreeMap<ServiceId, Service>,
    /// Every fault domain the fleet defines (from edge sites and providers
    /// and origin paths, with every domain above them).
    pub domains: BTreeMap<DomainPath, DomainInfo>,
    /// Anycast sites by site path.
    pub anycast: BTreeMap<DomainPath, Anycast>,
    /// Every group's candidates in flat arrays, for the solver.
    candidates: CandidateIndex,
}

/// Every group's candidates (group id order) in flat arrays: reading 10,000
/// groups × 20 candidates from them is a fraction of following each
/// group's own vector.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct CandidateIndex {
    /// Per group, its first entry; one more at the end.
    pub start: Vec<u32>,
    /// Edge index (position in `Fleet::edges`).
    pub edge: Vec<u32>,
    pub latency_ms: Vec<f64>,
    /// Demand per group and service: `demand[group * services + service]`
    /// (both in id order).
    pub demand: Vec<f64>,
    pub services: usize,
}

impl CandidateIndex {
    fn of(
        groups: &BTreeMap<GroupId, ClientGroup>,
        services: &BTreeMap<ServiceId, Service>,
    ) -> Self {
        let n: usize = groups.values().map(|g| g.candidates.len()).sum();
        let mut index = Self {
            start: Vec::with_capacity(groups.len() + 1),
            edge: Vec::with_capacity(n),
            latency_ms: Vec::with_capacity(n),
            demand: Vec::with_capacity(groups.len() * services.len()),
            services: services.len(),
        };
        for g in groups.values() {
            index.demand.extend(services.keys().map(|s| g.demand(s)));
            index.start.push(index.edge.len() as u32);
            for c in &g.candidates {
                index.edge.push(c.edge_index as u32);
                index.latency_ms.push(c.latency_ms);
            }
        }
        index.start.push(index.edge.len() as u32);
        index
    }

    /// The index of a fleet whose maps were changed after it was checked:
    /// edge positions looked up by id (candidates of unknown edges get
    /// `u32::MAX`).
    pub(crate) fn rebuild(fleet: &Fleet) -> Self {
        let position: BTreeMap<&EdgeId, u32> = fleet
            .edges
            .keys()
            .enumerate()
            .map(|(i, id)| (id, i as u32))
            .collect();
        let mut index = Self::of(&fleet.groups, &fleet.services);
        let mut i = 0;
        for g in fleet.groups.values() {
            for c in &g.candidates {
                index.edge[i] = position.get(&c.edge).copied().unwrap_or(u32::MAX);
                i += 1;
            }
        }
        index
    }
}

impl Fleet {
    /// Reads and checks a TOML fleet file.
    pub fn from_toml(text: &str) -> Result<Self, FleetError> {
        Self::from_spec(FleetSpec::from_toml(text)?)
    }

    /// The spec this fleet was built from.
    pub fn spec(&self) -> &FleetSpec {
        &self.spec
    }

    /// Checks a spec and builds the fleet, or reports every problem.
    pub fn from_spec(spec: FleetSpec) -> Result<Self, FleetError> {
        let mut v = Validator::default();
        let fleet = v.build(&spec);
        if v.problems.is_empty() {
            let candidates = CandidateIndex::of(&fleet.groups, &fleet.services);
            Ok(Fleet {
                spec,
                candidates,
                ..fleet
            })
        } else {
            Err(FleetError {
                problems: v.problems,
            })
        }
    }

    /// The flat candidate index, if it still matches `groups` (it is built
    /// by [`Fleet::from_spec`]; the fields are public, so check).
    pub(crate) fn candidate_index(&self) -> Option<&CandidateIndex> {
        let c = &self.candidates;
        (c.start.len() == self.groups.len() + 1
            && c.services == self.services.len()
            && c.edge.len()
                == self
                    .groups
                    .values()
                    .map(|g| g.candidates.len())
                    .sum::<usize>())
        .then_some(c)
    }

    /// Total demand over every group and service, rps.
    pub fn total_demand(&self) -> f64 {
        self.groups
            .values()
            .flat_map(|g| g.demand_rps.values())
            .sum()
    }
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

fn loc(section: &str, index: usize, id: &str) -> String {
    if id.is_empty() {
        format!("{section}[{index}]")
    } else {
        format!("{section}[{index}] {id:?}")
    }
}

/// Checks a DNS name (no trailing dot needed): labels of 1–63 characters of
/// letters, digits and '-', not starting or ending with '-', 253 in all.
fn check_dns_name(name: &str) -> Result<(), String> {
    let n = name.strip_suffix('.').unwrap_or(name);
    if n.is_empty() {
        return Err("is empty".into());
    }
    if n.len() > 253 {
        return Err(format!("{name:?} is longer than 253 characters"));
    }
    for label in n.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "{name:?} has a label of {} characters (1 to 63)",
                label.len()
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{name:?}: label {label:?} starts or ends with '-'"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!("{name:?} contains {c:?}"));
        }
    }
    Ok(())
}

fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

fn check_host_port(s: &str) -> Result<(), String> {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    port.parse::<u16>()
        .map_err(|_| format!("{s:?} has a bad port {port:?}"))?;
    check_dns_name(host).map_err(|e| format!("{s:?}: host {e}"))
}

fn check_health_target(s: &str) -> Result<(), String> {
    if let Some(rest) = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
    {
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        if authority.parse::<std::net::SocketAddr>().is_ok() || authority.parse::<IpAddr>().is_ok()
        {
            return Ok(());
        }
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .trim_matches(['[', ']']);
        if host.parse::<IpAddr>().is_ok() {
            return Ok(());
        }
        return check_dns_name(host).map_err(|e| format!("{s:?}: host {e}"));
    }
    check_host_port(s).map_err(|e| format!("{e}; expected an http(s):// URL or host:port"))
}

fn check_amount(value: f64, positive: bool) -> Result<(), String> {
    if !value.is_finite() {
        return Err(format!("must be a finite number, got {value}"));
    }
    if positive && value <= 0.0 {
        return Err(format!("must be greater than 0, got {value}"));
    }
    if value < 0.0 {
        return Err(format!("must not be negative, got {value}"));
    }
    Ok(())
}

impl Validator {
    fn problem(&mut self, location: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            location: location.into(),
            message: message.into(),
        });
    }

    /// A CIDR prefix without host bits, or a problem at `here`.
    fn cidr(&mut self, here: &str, p: &str) -> Option<IpNet> {
        match p.parse::<IpNet>() {
            Ok(net) if net.trunc() != net => {
                self.problem(
                    here,
                    format!("{p} has host bits set; did you mean {}?", net.trunc()),
                );
                None
            }
            Ok(net) => Some(net),
            Err(_) => {
                self.problem(
                    here,
                    format!("{p:?} is not a CIDR prefix (e.g. 192.0.2.0/24)"),
                );
                None
            }
        }
    }

    fn check<T>(&mut self, location: impl Into<String>, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(t) => Some(t),
            Err(e) => {
                self.problem(location, e);
                None
            }
        }
    }

    fn id(&mut self, section: &str, i: usize, id: &str, seen: &mut BTreeSet<String>) -> bool {
        let at = format!("{}.id", loc(section, i, id));
        if let Err(e) = check_id(id) {
            self.problem(at, format!("id {e}"));
            return false;
        }
        if !seen.insert(id.to_owned()) {
            self.problem(at, format!("duplicate id {id:?}"));
            return false;
        }
        true
    }

    fn build(&mut self, spec: &FleetSpec) -> Fleet {
        let origins = self.origins(spec);
        let edges = self.edges(spec);
        let mut domains: BTreeMap<DomainPath, DomainInfo> = BTreeMap::new();
        for e in edges.values() {
            for d in e.domains() {
                let info = domains.entry(d).or_default();
                info.edges.push(e.id.clone());
                info.capacity_rps += e.capacity_rps;
            }
        }
        for o in origins.values() {
            for d in o.domain.ancestors() {
                domains.entry(d).or_default().origins.push(o.id.clone());
            }
        }
        let service_ids: BTreeSet<&str> = spec.services.iter().map(|s| s.id.as_str()).collect();
        let groups = self.groups(spec, &edges, &domains, &service_ids);
        let services = self.services(spec, &edges);
        let anycast = self.anycast(spec, &domains);
        Fleet {
            spec: FleetSpec::default(),
            edges,
            origins,
            groups,
            services,
            domains,
            anycast,
            candidates: CandidateIndex::default(),
        }
    }

    fn origins(&mut self, spec: &FleetSpec) -> BTreeMap<OriginId, Origin> {
        let mut seen = BTreeSet::new();
        let mut out = BTreeMap::new();
        for (i, o) in spec.origins.iter().enumerate() {
            let at = loc("origins", i, &o.id);
            let id_ok = self.id("origins", i, &o.id, &mut seen);
            let domain = match DomainPath::parse(&o.domain) {
                Ok(d) if d.kind() == DomainKind::Origin => Some(d),
                Ok(d) => {
                    self.problem(
                        format!("{at}.domain"),
                        format!(
                            "{d} is a {} path; an origin needs region/R/origin/O",
                            d.kind()
                        ),
                    );
                    None
                }
                Err(e) => {
                    self.problem(format!("{at}.domain"), e.to_string());
                    None
                }
            };
            if o.endpoints.is_empty() {
                self.problem(format!("{at}.endpoints"), "needs at least one host:port");
            }
            for (j, ep) in o.endpoints.iter().enumerate() {
                self.check(format!("{at}.endpoints[{j}]"), check_host_port(ep));
            }
            let cap = self.check(
                format!("{at}.capacity_rps"),
                check_amount(o.capacity_rps, true),
            );
            if let (true, Some(domain), Some(())) = (id_ok, domain, cap) {
                out.insert(
                    OriginId::new(&o.id),
                    Origin {
                        id: OriginId::new(&o.id),
                        domain,
                        endpoints: o.endpoints.clone(),
                        capacity_rps: o.capacity_rps,
                    },
                );
            }
        }
        out
    }

    fn edges(&mut self, spec: &FleetSpec) -> BTreeMap<EdgeId, Edge> {
        let mut seen = BTreeSet::new();
        let mut out = BTreeMap::new();
        for (i, e) in spec.edges.iter().enumerate() {
            let at = loc("edges", i, &e.id);
            let id_ok = self.id("edges", i, &e.id, &mut seen);
            let site = match DomainPath::parse(&e.site) {
                Ok(d) if d.kind() == DomainKind::Site => Some(d),
                Ok(d) => {
                    self.problem(
                        format!("{at}.site"),
                        format!(
                            "{d} is a {} path; an edge needs region/R/metro/M/site/S",
                            d.kind()
                        ),
                    );
                    None
                }
                Err(err) => {
                    self.problem(format!("{at}.site"), err.to_string());
                    None
                }
            };
            let mut ok = id_ok && site.is_some();
            for (field, value, positive) in [
                ("capacity_rps", e.capacity_rps, true),
                ("cost_per_unit", e.cost_per_unit, false),
                ("commit_rps", e.commit_rps, false),
                ("overage_price", e.overage_price, false),
            ] {
                ok &= self
                    .check(format!("{at}.{field}"), check_amount(value, positive))
                    .is_some();
            }
            ok &= self
                .check(
                    format!("{at}.health_check"),
                    check_health_target(&e.health_check),
                )
                .is_some();
            let (target, provider) = match e.kind {
                EdgeKindSpec::SelfBuilt => {
                    if e.addresses.is_empty() {
                        self.problem(
                            format!("{at}.addresses"),
                            "a self_built edge needs at least one address",
                        );
                        ok = false;
                    }
                    for (field, set) in [
                        ("cname", e.cname.is_some()),
                        ("provider", e.provider.is_some()),
                    ] {
                        if set {
                            self.problem(
                                format!("{at}.{field}"),
                                format!("only third_party edges have a {field}"),
                            );
                            ok = false;
                        }
                    }
                    if e.commit_rps > 0.0 || e.overage_price > 0.0 {
                        self.problem(
                            format!("{at}.commit_rps"),
                            "commit and overage apply to third_party edges only",
                        );
                        ok = false;
                    }
                    let mut addresses = Vec::new();
                    for (j, a) in e.addresses.iter().enumerate() {
                        match a.parse::<IpAddr>() {
                            Ok(ip) => addresses.push(ip),
                            Err(_) => {
                                self.problem(
                                    format!("{at}.addresses[{j}]"),
                                    format!("{a:?} is not an IPv4 or IPv6 address"),
                                );
                                ok = false;
                            }
                        }
                    }
                    (EdgeTarget::SelfBuilt { addresses }, None)
                }
                EdgeKindSpec::ThirdParty => {
                    if !e.addresses.is_empty() {
                        self.problem(
                            format!("{at}.addresses"),
                            "a third_party edge is answered by its cname, not addresses",
                        );
                        ok = false;
                    }
                    let cname = match &e.cname {
                        None => {
                            self.problem(format!("{at}.cname"), "a third_party edge needs a cname");
                            ok = false;
                            String::new()
                        }
                        Some(c) => {
                            ok &= self
                                .check(format!("{at}.cname"), check_dns_name(c))
                                .is_some();
                            normalize_name(c)
                        }
                    };
                    let provider = match &e.provider {
                        None => {
                            self.problem(
                                format!("{at}.provider"),
                                "a third_party edge needs a provider",
                            );
                            ok = false;
                            None
                        }
                        Some(p) => match DomainPath::provider(p) {
                            Ok(d) => Some(d),
                            Err(err) => {
                                self.problem(format!("{at}.provider"), err.reason);
                                ok = false;
                                None
                            }
                        },
                    };
                    (EdgeTarget::ThirdParty { cname }, provider)
                }
            };
            if let (true, Some(site)) = (ok, site) {
                out.insert(
                    EdgeId::new(&e.id),
                    Edge {
                        id: EdgeId::new(&e.id),
                        site,
                        provider,
                        target,
                        capacity_rps: e.capacity_rps,
                        cost_per_unit: e.cost_per_unit,
                        commit_rps: e.commit_rps,
                        overage_price: e.overage_price,
                        health_check: e.health_check.clone(),
                    },
                );
            }
        }
        out
    }

    fn anycast(
        &mut self,
        spec: &FleetSpec,
        domains: &BTreeMap<DomainPath, DomainInfo>,
    ) -> BTreeMap<DomainPath, Anycast> {
        let mut out = BTreeMap::new();
        let mut router_at: BTreeMap<&str, String> = BTreeMap::new();
        for (i, a) in spec.anycast.iter().enumerate() {
            let at = loc("anycast", i, &a.site);
            let mut ok = true;
            let site = match DomainPath::parse(&a.site) {
                Ok(d) if d.kind() == DomainKind::Site => {
                    if domains.get(&d).is_none_or(|info| info.edges.is_empty()) {
                        self.problem(format!("{at}.site"), format!("no edge is in {d}"));
                        ok = false;
                    }
                    Some(d)
                }
                Ok(d) => {
                    self.problem(
                        format!("{at}.site"),
                        format!(
                            "{d} is a {} path; anycast is per site, region/R/metro/M/site/S",
                            d.kind()
                        ),
                    );
                    None
                }
                Err(err) => {
                    // A bare site name: say which path it is.
                    let known: Vec<&DomainPath> = domains
                        .keys()
                        .filter(|d| d.kind() == DomainKind::Site && d.name() == a.site)
                        .collect();
                    let hint = match known.as_slice() {
                        [one] => format!("; did you mean {one}?"),
                        _ => String::new(),
                    };
                    self.problem(format!("{at}.site"), format!("{err}{hint}"));
                    None
                }
            };
            if a.routers.is_empty() {
                self.problem(format!("{at}.routers"), "needs at least one router");
                ok = false;
            }
            let mut mine = BTreeSet::new();
            for (j, r) in a.routers.iter().enumerate() {
                let here = format!("{at}.routers[{j}]");
                if r.is_empty()
                    || r.len() > MAX_ROUTER_LEN
                    || r.chars().any(|c| c.is_control() || c.is_whitespace())
                {
                    self.problem(
                        here,
                        format!(
                            "router {r:?} must be 1..={MAX_ROUTER_LEN} characters without spaces"
                        ),
                    );
                    ok = false;
                } else if !mine.insert(r.as_str()) {
                    self.problem(here, format!("duplicate router {r:?}"));
                    ok = false;
                } else if let Some(other) = router_at.insert(r.as_str(), at.clone()) {
                    self.problem(here, format!("router {r:?} is also in {other}"));
                    ok = false;
                }
            }
            if a.prefixes.is_empty() {
                self.problem(format!("{at}.prefixes"), "needs at least one prefix");
                ok = false;
            }
            let mut prefixes: Vec<IpNet> = Vec::new();
            for (j, p) in a.prefixes.iter().enumerate() {
                let here = format!("{at}.prefixes[{j}]");
                match self.cidr(&here, p) {
                    Some(net) if prefixes.contains(&net) => {
                        self.problem(here, format!("duplicate prefix {net}"));
                        ok = false;
                    }
                    Some(net) => prefixes.push(net),
                    None => ok = false,
                }
            }
            let quorum = a.quorum.unwrap_or(a.routers.len());
            if quorum == 0 || quorum > a.routers.len() {
                self.problem(
                    format!("{at}.quorum"),
                    format!(
                        "quorum {quorum} must be between 1 and the number of routers ({})",
                        a.routers.len()
                    ),
                );
                ok = false;
            }
            let Some(site) = site else { continue };
            if out.contains_key(&site) {
                self.problem(
                    format!("{at}.site"),
                    format!("site {site} has another anycast block"),
                );
                continue;
            }
            if ok {
                out.insert(
                    site.clone(),
                    Anycast {
                        site,
                        routers: a.routers.clone(),
                        prefixes,
                        quorum,
                    },
                );
            }
        }
        out
    }

    fn groups<'a>(
        &mut self,
        spec: &FleetSpec,
        edges: &'a BTreeMap<EdgeId, Edge>,
        domains: &'a BTreeMap<DomainPath, DomainInfo>,
        service_ids: &BTreeSet<&str>,
    ) -> BTreeMap<GroupId, ClientGroup> {
        let position: BTreeMap<&EdgeId, usize> =
            edges.keys().enumerate().map(|(i, id)| (id, i)).collect();
        let mut seen = BTreeSet::new();
        let mut prefix_owner: BTreeMap<IpNet, String> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (i, g) in spec.groups.iter().enumerate() {
            let at = loc("groups", i, &g.id);
            let mut ok = self.id("groups", i, &g.id, &mut seen);
            let mut prefixes = Vec::new();
            for (j, p) in g.prefixes.iter().enumerate() {
                let here = format!("{at}.prefixes[{j}]");
                match self.cidr(&here, p) {
                    Some(net) => {
                        if let Some(other) = prefix_owner.insert(net, g.id.clone()) {
                            self.problem(here, format!("prefix {net} is also in group {other:?}"));
                            ok = false;
                        }
                        prefixes.push(net);
                    }
                    None => ok = false,
                }
            }
            for (j, c) in g.countries.iter().enumerate() {
                if c.len() != 2 || !c.chars().all(|ch| ch.is_ascii_uppercase()) {
                    self.problem(
                        format!("{at}.countries[{j}]"),
                        format!("{c:?} is not an ISO 3166-1 alpha-2 code (two capital letters)"),
                    );
                    ok = false;
                }
            }
            let mut demand_rps = BTreeMap::new();
            for (svc, d) in &g.demand_rps {
                let here = format!("{at}.demand_rps.{svc}");
                if !service_ids.contains(svc.as_str()) {
                    self.problem(&here, format!("unknown service {svc:?}"));
                    ok = false;
                }
                ok &= self.check(&here, check_amount(*d, false)).is_some();
                demand_rps.insert(ServiceId::new(svc), *d);
            }
            // Resolve latency keys, keeping the most specific entry per edge:
            // edge id, then site, metro, region, then provider. Each key is
            // resolved through the domain index, so the cost is the number of
            // edges the keys cover, not groups × edges.
            let mut best: BTreeMap<&EdgeId, (u8, f64)> = BTreeMap::new();
            let mut offer = |edge: &'a EdgeId, rank: u8, ms: f64| {
                let entry = best.entry(edge).or_insert((rank, ms));
                if rank < entry.0 {
                    *entry = (rank, ms);
                }
            };
            for (key, ms) in &g.latency_ms {
                let here = format!("{at}.latency_ms.{key:?}");
                ok &= self.check(&here, check_amount(*ms, false)).is_some();
                if let Some((id, _)) = edges.get_key_value(key.as_str()) {
                    offer(id, 0, *ms);
                    continue;
                }
                match DomainPath::parse(key) {
                    Ok(d) if d.kind() == DomainKind::Origin => {
                        self.problem(here, "latency is to edges; origins are not candidates");
                        ok = false;
                    }
                    Ok(d) => match domains.get(&d) {
                        Some(info) if !info.edges.is_empty() => {
                            let rank = match d.kind() {
                                DomainKind::Site => 1,
                                DomainKind::Metro => 2,
                                DomainKind::Region => 3,
                                DomainKind::Provider | DomainKind::Origin => 4,
                            };
                            for e in &info.edges {
                                offer(e, rank, *ms);
                            }
                        }
                        _ => {
                            self.problem(here, format!("no edge is in {d}"));
                            ok = false;
                        }
                    },
                    Err(_) => {
                        self.problem(
                            here,
                            format!("{key:?} is neither an edge id nor a fault-domain path"),
                        );
                        ok = false;
                    }
                }
            }
            let candidates: Vec<Candidate> = best
                .into_iter()
                .map(|(edge, (_, latency_ms))| Candidate {
                    edge: edge.clone(),
                    latency_ms,
                    edge_index: position.get(edge).copied().unwrap_or(usize::MAX),
                })
                .collect();
            if candidates.is_empty() && !g.latency_ms.is_empty() && ok {
                self.problem(
                    format!("{at}.latency_ms"),
                    "no edge is a candidate of this group",
                );
                ok = false;
            } else if g.latency_ms.is_empty() {
                self.problem(
                    format!("{at}.latency_ms"),
                    "a group needs latency to at least one edge, site, metro, region or provider",
                );
                ok = false;
            }
            if ok {
                out.insert(
                    GroupId::new(&g.id),
                    ClientGroup {
                        id: GroupId::new(&g.id),
                        prefixes,
                        countries: g.countries.clone(),
                        asns: g.asns.clone(),
                        demand_rps,
                        candidates,
                    },
                );
            }
        }
        out
    }

    /// Checks the `optimize` fields of a policy and applies defaults.
    fn policy(&mut self, at: &str, p: &PolicySpec) -> Option<Policy> {
        let here = |field: &str| format!("{at}.policy.{field}");
        let mut ok = true;
        if p.mode == PolicyMode::Weighted {
            for (field, set) in [
                ("latency_weight", p.latency_weight.is_some()),
                ("cost_weight", p.cost_weight.is_some()),
                ("max_latency_ms", p.max_latency_ms.is_some()),
                ("target_utilization", p.target_utilization.is_some()),
                ("min_edges", p.min_edges.is_some()),
                ("min_domains", p.min_domains.is_some()),
                ("domain_level", p.domain_level.is_some()),
                ("max_shift", p.max_shift.is_some()),
            ] {
                if set {
                    self.problem(here(field), "used only with mode = \"optimize\"");
                    ok = false;
                }
            }
        }
        let d = Policy::default();
        let mut weight = |field: &str, v: Option<f64>, default: f64| -> f64 {
            let v = v.unwrap_or(default);
            if self.check(here(field), check_amount(v, false)).is_none() {
                ok = false;
            }
            v
        };
        let latency_weight = weight("latency_weight", p.latency_weight, d.latency_weight);
        let cost_weight = weight("cost_weight", p.cost_weight, d.cost_weight);
        if latency_weight == 0.0 && cost_weight == 0.0 {
            self.problem(
                here("cost_weight"),
                "latency_weight and cost_weight cannot both be 0",
            );
            ok = false;
        }
        if let Some(ms) = p.max_latency_ms {
            ok &= self
                .check(here("max_latency_ms"), check_amount(ms, true))
                .is_some();
        }
        let mut share = |field: &str, v: Option<f64>, default: f64| -> f64 {
            let v = v.unwrap_or(default);
            if !(v > 0.0 && v <= 1.0) {
                self.problem(here(field), format!("must be in (0, 1], got {v}"));
                ok = false;
            }
            v
        };
        let target_utilization = share(
            "target_utilization",
            p.target_utilization,
            d.target_utilization,
        );
        let max_shift = share("max_shift", p.max_shift, d.max_shift);
        let mut count = |field: &str, v: Option<u32>| -> u32 {
            let v = v.unwrap_or(1);
            if !(1..=16).contains(&v) {
                self.problem(here(field), format!("must be 1 to 16, got {v}"));
                ok = false;
            }
            v
        };
        let min_edges = count("min_edges", p.min_edges);
        let min_domains = count("min_domains", p.min_domains);
        ok.then_some(Policy {
            latency_weight,
            cost_weight,
            max_latency_ms: p.max_latency_ms,
            target_utilization,
            min_edges,
            min_domains,
            domain_level: p.domain_level.unwrap_or(d.domain_level),
            max_shift,
        })
    }

    fn services(
        &mut self,
        spec: &FleetSpec,
        edges: &BTreeMap<EdgeId, Edge>,
    ) -> BTreeMap<ServiceId, Service> {
        let group_ids: BTreeSet<&str> = spec.groups.iter().map(|g| g.id.as_str()).collect();
        let mut seen = BTreeSet::new();
        let mut hostnames: BTreeMap<String, String> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (i, s) in spec.services.iter().enumerate() {
            let at = loc("services", i, &s.id);
            let mut ok = self.id("services", i, &s.id, &mut seen);
            ok &= self
                .check(format!("{at}.hostname"), check_dns_name(&s.hostname))
                .is_some();
            ok &= self
                .check(format!("{at}.zone"), check_dns_name(&s.zone))
                .is_some();
            let hostname = normalize_name(&s.hostname);
            let zone = normalize_name(&s.zone);
            if hostname != zone && !hostname.ends_with(&format!(".{zone}")) {
                self.problem(
                    format!("{at}.hostname"),
                    format!("{hostname:?} is not inside zone {zone:?}"),
                );
                ok = false;
            }
            if let Some(other) = hostnames.insert(hostname.clone(), s.id.clone()) {
                self.problem(
                    format!("{at}.hostname"),
                    format!("{hostname:?} is also the hostname of service {other:?}"),
                );
                ok = false;
            }
            if s.ttl_seconds == 0 || s.ttl_seconds > 86_400 {
                self.problem(
                    format!("{at}.ttl_seconds"),
                    format!("must be 1 to 86400, got {}", s.ttl_seconds),
                );
                ok = false;
            }
            if !(1..=16).contains(&s.answer_count) {
                self.problem(
                    format!("{at}.answer_count"),
                    format!("must be 1 to 16, got {}", s.answer_count),
                );
                ok = false;
            }
            if !group_ids.contains(s.default_group.as_str()) {
                self.problem(
                    format!("{at}.default_group"),
                    format!("unknown group {:?}", s.default_group),
                );
                ok = false;
            }
            if s.nameservers.is_empty() {
                self.problem(
                    format!("{at}.nameservers"),
                    "needs at least one name server",
                );
                ok = false;
            }
            for (j, ns) in s.nameservers.iter().enumerate() {
                ok &= self
                    .check(format!("{at}.nameservers[{j}]"), check_dns_name(ns))
                    .is_some();
            }
            for (field, name) in [("soa.mname", &s.soa.mname), ("soa.rname", &s.soa.rname)] {
                if let Some(n) = name {
                    ok &= self
                        .check(format!("{at}.{field}"), check_dns_name(n))
                        .is_some();
                }
            }
            let mut weights = BTreeMap::new();
            for (g, row) in &s.policy.weights {
                let here = format!("{at}.policy.weights.{g}");
                if !group_ids.contains(g.as_str()) {
                    self.problem(&here, format!("unknown group {g:?}"));
                    ok = false;
                }
                let mut out_row = BTreeMap::new();
                for (e, w) in row {
                    if !edges.contains_key(e.as_str()) {
                        self.problem(format!("{here}.{e}"), format!("unknown edge {e:?}"));
                        ok = false;
                    }
                    ok &= self
                        .check(format!("{here}.{e}"), check_amount(*w, false))
                        .is_some();
                    out_row.insert(EdgeId::new(e), *w);
                }
                weights.insert(GroupId::new(g), out_row);
            }
            if s.policy.mode == PolicyMode::Optimize && !s.policy.weights.is_empty() {
                self.problem(
                    format!("{at}.policy.weights"),
                    "weights are used only with mode = \"weighted\"",
                );
                ok = false;
            }
            let policy = self.policy(&at, &s.policy);
            ok &= policy.is_some();
            if ok {
                out.insert(
                    ServiceId::new(&s.id),
                    Service {
                        id: ServiceId::new(&s.id),
                        hostname,
                        zone,
                        ttl_seconds: s.ttl_seconds,
                        default_group: GroupId::new(&s.default_group),
                        nameservers: s.nameservers.iter().map(|n| normalize_name(n)).collect(),
                        soa: s.soa.clone(),
                        answer_count: s.answer_count,
                        mode: s.policy.mode,
                        weights,
                        policy: policy.unwrap_or_default(),
                    },
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[[services]]
id = "www"
hostname = "www.example.com"
zone = "example.com"
default_group = "eu"
nameservers = ["ns1.example.com"]

[[origins]]
id = "dc1"
domain = "region/eu/origin/dc1"
endpoints = ["127.0.0.1:8081"]
capacity_rps = 3000

[[edges]]
id = "ams1"
kind = "self_built"
site = "region/eu/metro/ams/site/ams1"
addresses = ["127.1.0.1", "::1"]
capacity_rps = 1000
health_check = "http://127.1.0.1:8080/healthz"

[[edges]]
id = "cdn-eu"
kind = "third_party"
provider = "cdn-a"
site = "region/eu/metro/ams/site/cdn-a-ams"
cname = "eu.cdn-a.example.net"
capacity_rps = 4000
commit_rps = 100
overage_price = 1.0
health_check = "127.2.0.1:443"

[[groups]]
id = "eu"
prefixes = ["10.1.0.0/16", "2001:db8::/32"]
countries = ["NL"]
demand_rps = { www = 1000 }
latency_ms = { "region/eu" = 10, "provider/cdn-a" = 30, "ams1" = 5 }
"#;

    fn problems(text: &str) -> Vec<Problem> {
        match Fleet::from_toml(text) {
            Ok(_) => panic!("expected the fleet to be rejected"),
            Err(e) => e.problems,
        }
    }

    fn has(problems: &[Problem], location: &str, message: &str) -> bool {
        problems
            .iter()
            .any(|p| p.location == location && p.message.contains(message))
    }

    #[test]
    fn the_base_fleet_is_valid_and_indexed() {
        let f = Fleet::from_toml(BASE).expect("valid");
        assert_eq!(f.edges.len(), 2);
        let eu = &f.groups[&GroupId::from("eu")];
        // ams1 by edge id (5), cdn-eu by region (10) over provider (30).
        let lat: Vec<(&str, f64)> = eu
            .candidates
            .iter()
            .map(|c| (c.edge.as_str(), c.latency_ms))
            .collect();
        assert_eq!(lat, [("ams1", 5.0), ("cdn-eu", 10.0)]);
        for d in [
            "region/eu",
            "region/eu/metro/ams",
            "region/eu/metro/ams/site/ams1",
            "region/eu/origin/dc1",
            "provider/cdn-a",
        ] {
            assert!(
                f.domains.contains_key(&DomainPath::parse(d).expect(d)),
                "{d}"
            );
        }
        let eu_domain = &f.domains[&DomainPath::parse("region/eu").expect("path")];
        assert_eq!(eu_domain.edges.len(), 2);
        assert_eq!(eu_domain.origins.len(), 1);
        assert_eq!(eu_domain.capacity_rps, 5000.0);
        // The spec round-trips through TOML.
        let again = Fleet::from_toml(&f.spec().to_toml().expect("toml")).expect("valid");
        assert_eq!(again, f);
    }

    #[test]
    fn unknown_fields_are_reported_with_line_and_column() {
        let text = BASE.replace("capacity_rps = 1000", "capacity_rps = 1000\ncapacty = 5");
        let p = problems(&text);
        assert_eq!(p.len(), 1);
        assert!(p[0].message.contains("capacty"), "{:?}", p[0]);
        assert!(p[0].location.starts_with("line 21"), "{:?}", p[0]);
    }

    #[test]
    fn syntax_and_type_errors_are_located() {
        let p = problems(&BASE.replace("capacity_rps = 1000", "capacity_rps = \"lots\""));
        assert!(p[0].location.starts_with("line 20"), "{:?}", p[0]);
        let p = problems("[[edges]\n");
        assert!(p[0].location.starts_with("line 1"), "{:?}", p[0]);
    }

    #[test]
    fn duplicate_ids() {
        let text =
            format!("{BASE}\n[[groups]]\nid = \"eu\"\nlatency_ms = {{ \"region/eu\" = 1 }}\n");
        let p = problems(&text);
        assert!(
            has(&p, "groups[1] \"eu\".id", "duplicate id \"eu\""),
            "{p:?}"
        );
    }

    #[test]
    fn unknown_references() {
        let text = BASE
            .replace("default_group = \"eu\"", "default_group = \"nowhere\"")
            .replace(
                "demand_rps = { www = 1000 }",
                "demand_rps = { www = 1000, img = 5 }",
            )
            .replace(
                "\"provider/cdn-a\" = 30",
                "\"provider/cdn-z\" = 30, \"edge-x\" = 3",
            );
        let p = problems(&text);
        assert!(
            has(
                &p,
                "services[0] \"www\".default_group",
                "unknown group \"nowhere\""
            ),
            "{p:?}"
        );
        assert!(
            has(
                &p,
                "groups[0] \"eu\".demand_rps.img",
                "unknown service \"img\""
            ),
            "{p:?}"
        );
        assert!(
            has(
                &p,
                "groups[0] \"eu\".latency_ms.\"provider/cdn-z\"",
                "no edge is in provider/cdn-z"
            ),
            "{p:?}"
        );
        assert!(
            has(
                &p,
                "groups[0] \"eu\".latency_ms.\"edge-x\"",
                "neither an edge id"
            ),
            "{p:?}"
        );
    }

    #[test]
    fn bad_prefixes() {
        let text = BASE.replace(
            "prefixes = [\"10.1.0.0/16\", \"2001:db8::/32\"]",
            "prefixes = [\"10.1.0.1/16\", \"10.300.0.0/16\", \"banana\"]",
        );
        let p = problems(&text);
        assert!(
            has(
                &p,
                "groups[0] \"eu\".prefixes[0]",
                "did you mean 10.1.0.0/16"
            ),
            "{p:?}"
        );
        assert!(
            has(&p, "groups[0] \"eu\".prefixes[1]", "not a CIDR prefix"),
            "{p:?}"
        );
        assert!(
            has(&p, "groups[0] \"eu\".prefixes[2]", "not a CIDR prefix"),
            "{p:?}"
        );
    }

    #[test]
    fn the_same_prefix_in_two_groups_is_ambiguous() {
        let text = format!(
            "{BASE}\n[[groups]]\nid = \"eu2\"\nprefixes = [\"10.1.0.0/16\"]\nlatency_ms = {{ \"region/eu\" = 1 }}\n"
        );
        let p = problems(&text);
        assert!(
            has(&p, "groups[1] \"eu2\".prefixes[0]", "also in group \"eu\""),
            "{p:?}"
        );
    }

    #[test]
    fn zero_and_negative_amounts() {
        let text = BASE
            .replace("capacity_rps = 1000", "capacity_rps = 0")
            .replace("capacity_rps = 4000", "capacity_rps = -5")
            .replace("capacity_rps = 3000", "capacity_rps = nan")
            .replace("{ www = 1000 }", "{ www = -1 }");
        let p = problems(&text);
        assert!(
            has(
                &p,
                "edges[0] \"ams1\".capacity_rps",
                "greater than 0, got 0"
            ),
            "{p:?}"
        );
        assert!(
            has(
                &p,
                "edges[1] \"cdn-eu\".capacity_rps",
                "greater than 0, got -5"
            ),
            "{p:?}"
        );
        assert!(
            has(&p, "origins[0] \"dc1\".capacity_rps", "finite"),
            "{p:?}"
        );
        assert!(
            has(&p, "groups[0] \"eu\".demand_rps.www", "not be negative"),
            "{p:?}"
        );
    }

    #[test]
    fn bad_paths_kinds_and_names() {
        let text = BASE
            .replace(
                "site = \"region/eu/metro/ams/site/ams1\"",
                "site = \"region/eu/metro/ams\"",
            )
            .replace(
                "domain = \"region/eu/origin/dc1\"",
                "domain = \"region/eu/orign/dc1\"",
            )
            .replace(
                "addresses = [\"127.1.0.1\", \"::1\"]",
                "addresses = [\"127.1.0.300\"]",
            )
            .replace(
                "cname = \"eu.cdn-a.example.net\"",
                "cname = \"eu..example.net\"",
            )
            .replace(
                "hostname = \"www.example.com\"",
                "hostname = \"www.example.org\"",
            )
            .replace("countries = [\"NL\"]", "countries = [\"nl\"]")
            .replace(
                "health_check = \"127.2.0.1:443\"",
                "health_check = \"ftp://x\"",
            );
        let p = problems(&text);
        assert!(
            has(&p, "edges[0] \"ams1\".site", "metro path; an edge needs"),
            "{p:?}"
        );
        assert!(
            has(&p, "origins[0] \"dc1\".domain", "invalid fault-domain path"),
            "{p:?}"
        );
        assert!(
            has(
                &p,
                "edges[0] \"ams1\".addresses[0]",
                "not an IPv4 or IPv6 address"
            ),
            "{p:?}"
        );
        assert!(has(&p, "edges[1] \"cdn-eu\".cname", "label"), "{p:?}");
        assert!(
            has(&p, "services[0] \"www\".hostname", "not inside zone"),
            "{p:?}"
        );
        assert!(
            has(&p, "groups[0] \"eu\".countries[0]", "ISO 3166-1"),
            "{p:?}"
        );
        assert!(
            has(
                &p,
                "edges[1] \"cdn-eu\".health_check",
                "expected an http(s):// URL"
            ),
            "{p:?}"
        );
    }

    #[test]
    fn edge_kind_rules() {
        let text = BASE
            .replace(
                "addresses = [\"127.1.0.1\", \"::1\"]",
                "addresses = []\ncname = \"x.example.net\"",
            )
            .replace("provider = \"cdn-a\"\n", "");
        let p = problems(&text);
        assert!(
            has(&p, "edges[0] \"ams1\".addresses", "at least one address"),
            "{p:?}"
        );
        assert!(
            has(&p, "edges[0] \"ams1\".cname", "only third_party"),
            "{p:?}"
        );
        assert!(
            has(&p, "edges[1] \"cdn-eu\".provider", "needs a provider"),
            "{p:?}"
        );
    }

    #[test]
    fn policy_defaults_and_every_field_parsed() {
        let f = Fleet::from_toml(BASE).expect("valid");
        assert_eq!(
            f.services[&ServiceId::from("www")].policy,
            Policy::default()
        );
        let text = BASE.replace(
            "nameservers = [\"ns1.example.com\"]",
            "nameservers = [\"ns1.example.com\"]\npolicy = { latency_weight = 2, cost_weight = 0.5, \
             max_latency_ms = 80, target_utilization = 0.7, min_edges = 2, min_domains = 3, \
             domain_level = \"site\", max_shift = 0.25 }",
        );
        let f = Fleet::from_toml(&text).expect("valid");
        assert_eq!(
            f.services[&ServiceId::from("www")].policy,
            Policy {
                latency_weight: 2.0,
                cost_weight: 0.5,
                max_latency_ms: Some(80.0),
                target_utilization: 0.7,
                min_edges: 2,
                min_domains: 3,
                domain_level: DomainLevel::Site,
                max_shift: 0.25,
            }
        );
        // The spec round-trips, policy included.
        let again = Fleet::from_toml(&f.spec().to_toml().expect("toml")).expect("valid");
        assert_eq!(again, f);
    }

    #[test]
    fn policy_fields_are_checked_where_they_are() {
        let with = |policy: &str| {
            BASE.replace(
                "nameservers = [\"ns1.example.com\"]",
                &format!("nameservers = [\"ns1.example.com\"]\npolicy = {{ {policy} }}"),
            )
        };
        let at = |field: &str| format!("services[0] \"www\".policy.{field}");
        for (policy, field, message) in [
            ("latency_weight = -1", "latency_weight", "not be negative"),
            ("cost_weight = nan", "cost_weight", "finite"),
            (
                "latency_weight = 0, cost_weight = 0",
                "cost_weight",
                "cannot both be 0",
            ),
            ("max_latency_ms = 0", "max_latency_ms", "greater than 0"),
            ("target_utilization = 0", "target_utilization", "(0, 1]"),
            ("target_utilization = 1.5", "target_utilization", "(0, 1]"),
            ("min_edges = 0", "min_edges", "1 to 16"),
            ("min_domains = 17", "min_domains", "1 to 16"),
            ("max_shift = 0", "max_shift", "(0, 1]"),
            ("max_shift = 2", "max_shift", "(0, 1]"),
            (
                "mode = \"weighted\", max_shift = 0.5",
                "max_shift",
                "only with mode = \"optimize\"",
            ),
            (
                "mode = \"weighted\", min_edges = 2",
                "min_edges",
                "only with mode = \"optimize\"",
            ),
        ] {
            let p = problems(&with(policy));
            assert!(has(&p, &at(field), message), "{policy}: {p:?}");
        }
        // Wrong types and unknown values are located by line and column.
        for policy in [
            "domain_level = \"rack\"",
            "min_edges = -1",
            "max_shfit = 0.5",
        ] {
            let p = problems(&with(policy));
            assert!(p[0].location.starts_with("line 8"), "{policy}: {p:?}");
        }
    }

    #[test]
    fn the_example_fleet_is_valid_with_default_policies() {
        let f = Fleet::from_toml(include_str!("../../../deploy/examples/fleet.toml"))
            .expect("deploy/examples/fleet.toml");
        assert!(f.services.values().all(|s| s.policy == Policy::default()));
    }

    #[test]
    fn anycast_blocks_are_checked() {
        let ok = format!(
            "{BASE}\n[[anycast]]\nsite = \"region/eu/metro/ams/site/ams1\"\nrouters = [\"r1\", \"192.0.2.2\"]\nprefixes = [\"203.0.113.0/24\", \"2001:db8:ffff::/48\"]\n"
        );
        let f = Fleet::from_toml(&ok).expect("valid");
        let site = DomainPath::parse("region/eu/metro/ams/site/ams1").expect("path");
        let a = &f.anycast[&site];
        assert_eq!(a.quorum, 2, "default: all routers");
        assert_eq!(a.prefixes.len(), 2);
        assert_eq!(
            Fleet::from_toml(&format!("{ok}quorum = 1\n"))
                .expect("valid")
                .anycast[&site]
                .quorum,
            1
        );
        let block = |body: &str| format!("{BASE}\n[[anycast]]\n{body}\n");
        let at = "anycast[0] \"region/eu/metro/ams/site/ams1\"";
        for (body, field, message) in [
            (
                "site = \"ams1\"\nrouters = [\"r1\"]\nprefixes = [\"203.0.113.0/24\"]",
                "anycast[0] \"ams1\".site",
                "did you mean region/eu/metro/ams/site/ams1?",
            ),
            (
                "site = \"region/eu/metro/ams/site/nope\"\nrouters = [\"r1\"]\nprefixes = [\"203.0.113.0/24\"]",
                "anycast[0] \"region/eu/metro/ams/site/nope\".site",
                "no edge is in",
            ),
            (
                "site = \"region/eu\"\nrouters = [\"r1\"]\nprefixes = [\"203.0.113.0/24\"]",
                "anycast[0] \"region/eu\".site",
                "anycast is per site",
            ),
            (
                "site = \"region/eu/metro/ams/site/ams1\"\nrouters = []\nprefixes = [\"203.0.113.0/24\"]",
                &format!("{at}.routers"),
                "at least one router",
            ),
            (
                "site = \"region/eu/metro/ams/site/ams1\"\nrouters = [\"r1\", \"r1\"]\nprefixes = [\"203.0.113.0/24\"]",
                &format!("{at}.routers[1]"),
                "duplicate router",
            ),
            (
                "site = \"region/eu/metro/ams/site/ams1\"\nrouters = [\"r 1\"]\nprefixes = [\"203.0.113.0/24\"]",
                &format!("{at}.routers[0]"),
                "without spaces",
            ),
            (
                "site = \"region/eu/metro/ams/site/ams1\"\nrouters = [\"r1\"]\nprefixes = [\"203.0.113.1/24\"]",
                &format!("{at}.prefixes[0]"),
                "host bits",
            ),
            (
                "site = \"region/eu/metro/ams/site/ams1\"\nrouters = [\"r1\"]\nprefixes = [\"203.0.113.0/24\", \"203.0.113.0/24\"]",
                &format!("{at}.prefixes[1]"),
                "duplicate prefix",
            ),
            (
                "site = \"region/eu/metro/ams/site/ams1\"\nrouters = [\"r1\"]\nprefixes = [\"nope\"]",
                &format!("{at}.prefixes[0]"),
                "not a CIDR prefix",
            ),
            (
                "site = \"region/eu/metro/ams/site/ams1\"\nrouters = [\"r1\"]\nprefixes = []",
                &format!("{at}.prefixes"),
                "at least one prefix",
            ),
            (
                "site = \"region/eu/metro/ams/site/ams1\"\nrouters = [\"r1\"]\nprefixes = [\"203.0.113.0/24\"]\nquorum = 2",
                &format!("{at}.quorum"),
                "between 1 and the number of routers (1)",
            ),
        ] {
            let p = problems(&block(body));
            assert!(has(&p, field, message), "{body}: {p:?}");
        }
        // The same site twice, and a router in two sites.
        let twice = format!(
            "{ok}\n[[anycast]]\nsite = \"region/eu/metro/ams/site/ams1\"\nrouters = [\"r1\"]\nprefixes = [\"203.0.113.0/24\"]\n"
        );
        let p = problems(&twice);
        assert!(
            has(
                &p,
                "anycast[1] \"region/eu/metro/ams/site/ams1\".routers[0]",
                "also in anycast[0]"
            ),
            "{p:?}"
        );
        assert!(
            has(
                &p,
                "anycast[1] \"region/eu/metro/ams/site/ams1\".site",
                "another anycast block"
            ),
            "{p:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = BASE
            .replace("capacity_rps = 1000", "capacity_rps = 0")
            .replace("default_group = \"eu\"", "default_group = \"zz\"")
            .replace("\"10.1.0.0/16\"", "\"10.1.0.0/33\"");
        let e = Fleet::from_toml(&text).expect_err("invalid");
        assert!(e.problems.len() >= 3, "{e}");
        let shown = e.to_string();
        assert!(
            shown.contains("capacity_rps")
                && shown.contains("default_group")
                && shown.contains("prefixes[0]"),
            "{shown}"
        );
    }
}
