//! The general path, on hickory-server's types: every TCP query, and every
//! UDP query the fast path does not take (other types, several questions,
//! compression, other opcodes, EDNS versions). It resolves with the same
//! [`Tables::resolve`] as the fast path and encodes with hickory.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageRequest, MessageResponseBuilder};
use tracing::debug;

use super::table::{Answer, Client, Rcode, Resolution, Tables};
use super::wire::{self, ScanError, MAX_UDP};
use super::Shared;

/// A response, ready to encode.
#[derive(Debug)]
pub struct Plan<'t> {
    pub metadata: Metadata,
    pub answers: Vec<&'t Record>,
    pub authorities: Vec<&'t Record>,
    pub edns: Option<Edns>,
    pub rcode: Rcode,
    pub qtype: u16,
    pub ecs: bool,
    pub res: Option<Resolution>,
}

fn response_code(r: Rcode) -> ResponseCode {
    match r {
        Rcode::NoError => ResponseCode::NoError,
        Rcode::FormErr => ResponseCode::FormErr,
        Rcode::ServFail => ResponseCode::ServFail,
        Rcode::NxDomain => ResponseCode::NXDomain,
        Rcode::NotImp => ResponseCode::NotImp,
        Rcode::Refused => ResponseCode::Refused,
        Rcode::BadVers => ResponseCode::BADVERS,
    }
}

/// Decides the response to a decoded request. `raw` is the request as
/// received (ECS is validated from it), `src` the resolver's address.
pub fn plan<'t>(
    tables: Option<&'t Tables>,
    req: &MessageRequest,
    raw: &[u8],
    src: IpAddr,
    rng: &mut fastrand::Rng,
) -> Plan<'t> {
    let mut metadata = Metadata::response_from_request(&req.metadata);
    let qtype = req
        .queries
        .queries()
        .first()
        .map_or(0, |q| u16::from(q.query_type()));
    let mut plan = Plan {
        metadata,
        answers: vec![],
        authorities: vec![],
        edns: None,
        rcode: Rcode::NoError,
        qtype,
        ecs: false,
        res: None,
    };
    let finish = |mut plan: Plan<'t>, rcode: Rcode| {
        plan.rcode = rcode;
        plan.metadata.response_code = response_code(rcode);
        plan
    };
    if let Some(q) = &req.edns {
        let mut e = Edns::new();
        e.set_max_payload(MAX_UDP as u16);
        e.set_dnssec_ok(q.flags().dnssec_ok);
        plan.edns = Some(e);
        if q.version() > 0 {
            return finish(plan, Rcode::BadVers);
        }
    }
    let mut name = [0u8; 256];
    let ecs = match wire::scan(raw, &mut name) {
        Ok(s) => s.edns.and_then(|e| e.ecs),
        Err(ScanError::FormErr) => return finish(plan, Rcode::FormErr),
        Err(ScanError::Drop) => None,
    };
    plan.ecs = ecs.is_some();
    if req.metadata.op_code != OpCode::Query {
        return finish(plan, Rcode::NotImp);
    }
    let [query] = req.queries.queries() else {
        return finish(plan, Rcode::FormErr);
    };
    if query.query_class() != DNSClass::IN
        || matches!(query.query_type(), RecordType::AXFR | RecordType::IXFR)
    {
        return finish(plan, Rcode::Refused);
    }
    let Some(t) = tables else {
        return finish(plan, Rcode::ServFail);
    };
    let Ok(key) = query.name().to_bytes() else {
        return finish(plan, Rcode::FormErr);
    };
    let client = match ecs {
        Some(e) if e.source > 0 => e.addr,
        _ => src,
    };
    let res = t.resolve(&key, qtype, Client { addr: client }, rng);
    metadata = plan.metadata;
    metadata.authoritative = res.authoritative;
    plan.metadata = metadata;
    match res.answer {
        Answer::None => {}
        Answer::Steered {
            service,
            family,
            route,
            picks,
            count,
        } => {
            for p in t.steered(service, family, route, &picks[..usize::from(count)]) {
                plan.answers.extend(p.records.iter());
            }
        }
        Answer::Soa => {
            if let Some(z) = res.zone {
                plan.answers.push(&t.zones[z as usize].soa);
            }
        }
        Answer::Ns => {
            if let Some(z) = res.zone {
                plan.answers.extend(t.zones[z as usize].ns.iter());
            }
        }
    }
    if let Some(z) = res.soa_zone {
        plan.authorities.push(&t.zones[z as usize].soa);
    }
    if let (Some(e), Some(ecs)) = (plan.edns.as_mut(), ecs) {
        e.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(
            ecs.addr, ecs.source, res.scope,
        )));
    }
    plan.res = Some(res);
    finish(plan, res.rcode)
}

/// Encodes a plan for UDP into `out`, within the requester's size (an empty
/// response with TC when the answer does not fit). Returns whether it was
/// truncated.
pub fn encode_udp(req: &MessageRequest, plan: &Plan<'_>, out: &mut Vec<u8>) -> bool {
    let max = match &req.edns {
        Some(e) => usize::from(e.max_payload()).clamp(512, MAX_UDP),
        None => 512,
    };
    out.clear();
    let emitted = {
        let mut enc = BinEncoder::new(out);
        enc.set_max_size(max as u16);
        MessageResponseBuilder::new(&req.queries, plan.edns.as_ref())
            .build(
                plan.metadata,
                plan.answers.iter().copied(),
                plan.authorities.iter().copied(),
                std::iter::empty(),
                std::iter::empty(),
            )
            .destructive_emit(&mut enc)
    };
    match emitted {
        Ok(h) if !h.truncation => false,
        _ => {
            out.clear();
            let mut metadata = plan.metadata;
            metadata.truncation = true;
            let mut enc = BinEncoder::new(out);
            enc.set_max_size(max as u16);
            let r = MessageResponseBuilder::new(&req.queries, plan.edns.as_ref())
                .build_no_records(metadata)
                .destructive_emit(&mut enc);
            if r.is_err() {
                // Not even the question fits: header only.
                out.clear();
                out.extend_from_slice(&req.metadata.id.to_be_bytes());
                out.extend_from_slice(&[0x82, 0x00, 0, 0, 0, 0, 0, 0, 0, 0]);
            }
            true
        }
    }
}

/// The TCP side: hickory's `Server` decodes, we plan, hickory encodes.
#[derive(Debug, Clone)]
pub struct Handler {
    pub shared: std::sync::Arc<Shared>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let current = self.shared.current.load_full();
        let tables = current.as_deref().map(|a| &a.value);
        let mut rng = fastrand::Rng::new();
        let plan = plan(
            tables,
            request,
            request.as_slice(),
            request.src().ip(),
            &mut rng,
        );
        self.shared.metrics.observe(
            "tcp",
            tables,
            plan.qtype,
            plan.rcode,
            plan.res.as_ref(),
            plan.ecs,
        );
        let response = MessageResponseBuilder::new(&request.queries, plan.edns.as_ref()).build(
            plan.metadata,
            plan.answers.iter().copied(),
            plan.authorities.iter().copied(),
            std::iter::empty(),
            std::iter::empty(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                debug!(error = %e, "cannot send a tcp response");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}
