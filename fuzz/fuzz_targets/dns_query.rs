//! Fuzzes what `sextant-dns` does with a UDP datagram: the scan, the fast
//! path, the general (hickory) path, and the response encoders. Any input
//! must give either no response or one that decodes, fits the UDP size and
//! answers the query's id; nothing may panic.

#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use sextant_edge::dns::metrics::Tally;
use sextant_edge::dns::sample;
use sextant_edge::dns::table::Tables;
use sextant_edge::dns::udp::{answer, Scratch};

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| match Tables::build(1, &sample::config(), None) {
        Ok(t) => t,
        Err(e) => panic!("the sample config does not build: {e}"),
    })
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the resolver's address (inside or outside the
    // sample's client groups); the rest is the datagram.
    let Some((&who, packet)) = data.split_first() else {
        return;
    };
    let src: SocketAddr = match who % 4 {
        0 => ([10, 1, 2, 3], 5353).into(),
        1 => ([10, 7, 0, 1], 5353).into(),
        2 => ([0x2001, 0xdb8, 1, 0, 0, 0, 0, 1], 5353).into(),
        _ => ([192, 0, 2, 1], 5353).into(),
    };
    let mut cx = Scratch::default();
    let mut tally = Tally::new("udp");
    if answer(packet, src, Some(tables()), &mut cx, &mut tally) {
        assert!(cx.out.len() >= 12, "short response");
        assert!(cx.out.len() <= 1232, "response of {} bytes", cx.out.len());
        assert_eq!(cx.out[..2], packet[..2], "id not echoed");
        if let Err(e) = Message::from_vec(&cx.out) {
            panic!("undecodable response {:02x?}: {e}", cx.out);
        }
    }
});
