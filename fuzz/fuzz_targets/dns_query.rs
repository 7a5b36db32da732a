//! Arbitrary bytes as a DNS query, through the function the DNS proxy's UDP
//! and TCP servers answer with (the network left out): no input may panic,
//! and every answer must be a well-formed DNS response to it.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meshvm_agent::dns::{LookupTable, Protocol, answer_packet};

static TABLE: LazyLock<LookupTable> = LazyLock::new(meshvm_fuzz::table);

fuzz_target!(|request: &[u8]| {
    for protocol in [Protocol::Udp, Protocol::Tcp] {
        let reply = answer_packet(&TABLE, request, protocol);
        meshvm_fuzz::check_answer(request, reply.as_deref(), protocol);
    }
});
