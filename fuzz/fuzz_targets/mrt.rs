//! Fuzzes the MRT RIB decoder (`sextant_bgp::rib::decode_mrt`): any input
//! must be refused with an error or give a map whose lookups and binary
//! form work; nothing may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sextant_bgp::rib::{decode_mrt, RibMap};

fuzz_target!(|data: &[u8]| {
    if let Ok((map, _)) = decode_mrt(bytes::Bytes::copy_from_slice(data)) {
        for route in map.routes() {
            let hit = map.lookup(route.prefix.network());
            assert!(hit.is_some_and(|r| r.prefix.prefix_len() >= route.prefix.prefix_len()));
        }
        let back = RibMap::decode(&map.encode());
        assert!(back.is_ok_and(|b| b.digest() == map.digest()));
    }
});
