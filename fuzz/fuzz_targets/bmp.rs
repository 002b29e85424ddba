//! Fuzzes the BMP station's decoder (`sextant_bgp::bmp`): any stream, fed
//! in pieces as TCP would deliver it, must be framed and decoded into
//! messages or refused with an error whose offset lies inside the stream;
//! the route state taking the messages in must not panic either.

#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use sextant_bgp::bmp::{decode, decode_stream, Framer, Session};

fuzz_target!(|data: &[u8]| {
    let watched: BTreeSet<ipnet::IpNet> = ["203.0.113.0/24", "2001:db8::/32"]
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    // Whole, then in pieces of a size taken from the first byte.
    let whole = decode_stream(data);
    if let Err(e) = &whole {
        assert!(e.offset() <= data.len() as u64, "{e}");
    }
    let piece = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut framer = Framer::new();
    let mut session = Session::default();
    let mut framed = Vec::new();
    'outer: for chunk in data.chunks(piece) {
        framer.push(chunk);
        loop {
            match framer.next_message() {
                Ok(Some((at, msg))) => match decode(&msg, at) {
                    Ok(m) => {
                        session.apply(&m, 0, &watched);
                        framed.push(m);
                    }
                    Err(e) => {
                        assert!(e.offset() >= at && e.offset() <= at + msg.len() as u64, "{e}");
                        break 'outer;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    assert!(e.offset() <= data.len() as u64, "{e}");
                    break 'outer;
                }
            }
        }
    }
    // Both ways agree on a good stream.
    if let Ok(all) = whole {
        assert_eq!(all, framed);
    }
});
