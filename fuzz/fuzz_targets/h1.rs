//! Fuzzes the edge proxy's HTTP/1.1 heads and chunked bodies
//! (`sextant_edge::h1`): any bytes from a client or an origin must be
//! refused, left for more, handed off, or turned into a head that is itself
//! a complete, valid HTTP/1.1 message with no hop-by-hop field but, in a
//! WebSocket handshake or its 101, `upgrade: websocket`; the end of a
//! chunked body must not depend on how TCP cut it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sextant_edge::h1::{forward_request, forward_response, Asked, ChunkedEnd, Framing, Parsed};

fn hop_by_hop_free(head: &[u8], upgrade: bool) {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut fields);
    let mut fields2 = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut fields2);
    let headers = if head.starts_with(b"HTTP/") {
        assert!(matches!(resp.parse(head), Ok(httparse::Status::Complete(n)) if n == head.len()));
        &*resp.headers
    } else {
        assert!(matches!(req.parse(head), Ok(httparse::Status::Complete(n)) if n == head.len()));
        &*req.headers
    };
    let upgrades = headers.iter().filter(|h| h.name.eq_ignore_ascii_case("upgrade"));
    assert_eq!(upgrades.clone().count(), usize::from(upgrade));
    assert!(upgrades.clone().all(|h| h.value == b"websocket"));
    for h in headers.iter().filter(|h| !h.name.eq_ignore_ascii_case("upgrade")) {
        for hop in ["keep-alive", "te", "proxy-authorization", "proxy-connection"] {
            assert!(!h.name.eq_ignore_ascii_case(hop), "{} forwarded", h.name);
        }
    }
}

fn chunked_end(data: &[u8], piece: usize) -> Result<Option<usize>, ()> {
    let mut d = ChunkedEnd::default();
    let mut at = 0;
    for chunk in data.chunks(piece) {
        let (n, done) = d.feed(chunk).map_err(|_| ())?;
        assert!(n <= chunk.len());
        at += n;
        if done {
            return Ok(Some(at));
        }
    }
    Ok(None)
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    if let Ok(Parsed::Done(h)) = forward_request(data, b"127.0.0.1", &mut out) {
        assert!(h.len <= data.len());
        hop_by_hop_free(&out, h.upgrade.is_some());
        // Only a GET without a body is a WebSocket handshake.
        assert!(h.upgrade.is_none() || (out.starts_with(b"GET ") && h.body == Framing::None));
        // Exactly one Host goes out, and a valid one.
        let mut fields = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut fields);
        let _ = req.parse(&out);
        let hosts: Vec<_> = req.headers.iter().filter(|f| f.name.eq_ignore_ascii_case("host")).collect();
        assert_eq!(hosts.len(), 1, "{:?}", String::from_utf8_lossy(&out));
        assert!(sextant_edge::h1::valid_host(hosts[0].value));
    }
    let asked = Asked {
        head_method: false,
        keep_alive: true,
        upgrade: data
            .last()
            .is_some_and(|b| b & 1 == 1)
            .then_some(*b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
    };
    if let Ok(Some(r)) = forward_response(data, asked, b"a", &mut out) {
        assert!(r.len <= data.len());
        assert!(!r.upgraded || asked.upgrade.is_some());
        hop_by_hop_free(&out, r.upgraded);
    }
    let piece = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let whole = chunked_end(data, data.len().max(1));
    assert_eq!(whole, chunked_end(data, piece));
});
