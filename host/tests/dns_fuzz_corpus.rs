//! Replays the `dns_query` fuzz target's corpus (`fuzz/corpus/dns_query/`:
//! the seeds, and every input fuzzing found worth keeping, crashes
//! included) on stable, through the same function and checks as the
//! target: no panic, and each answer absent or a well-formed response.

#[path = "../../fuzz/src/lib.rs"]
mod fuzz;

use std::collections::BTreeMap;
use std::path::Path;

use hickory_proto::op::{Message, ResponseCode};
use meshvm_agent::dns::{Protocol, answer_packet};

/// Every corpus file, by name.
fn corpus() -> BTreeMap<String, Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/dns_query");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect()
}

#[test]
fn every_corpus_input_gets_a_well_formed_answer_or_none() {
    let table = fuzz::table();
    let corpus = corpus();
    assert!(corpus.len() >= 20, "only {} inputs", corpus.len());
    for (name, request) in &corpus {
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            let replayed = std::panic::catch_unwind(|| {
                let reply = answer_packet(&table, request, protocol);
                fuzz::check_answer(request, reply.as_deref(), protocol);
            });
            assert!(
                replayed.is_ok(),
                "{name} over {protocol:?}: see the panic above"
            );
        }
    }
}

/// The seeds mean what their names say (so the replay above exercises
/// table answers, truncation, errors and drops, not only one of them).
#[test]
fn the_seeds_cover_each_kind_of_answer() {
    let table = fuzz::table();
    let corpus = corpus();
    let answer = |name: &str, protocol| {
        let request = corpus.get(name).unwrap_or_else(|| panic!("no seed {name}"));
        answer_packet(&table, request, protocol).map(|r| Message::from_vec(&r).unwrap())
    };
    let udp = |name: &str| answer(name, Protocol::Udp).unwrap_or_else(|| panic!("{name}: none"));
    let code = |name: &str| udp(name).metadata.response_code;

    for (name, answers) in [
        ("a-plain", 1),
        ("a-edns-cookie", 1),
        ("aaaa", 0),
        ("aaaa-short-name", 1),
        ("cname-search-domain", 2),
        ("wildcard-cname", 2),
        ("edns-do-bufsize-4096", 300),
    ] {
        let reply = udp(name);
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        assert!(reply.metadata.authoritative, "{name}");
        if name == "edns-do-bufsize-4096" {
            // 300 addresses do not fit in 4096 bytes either.
            assert!(reply.metadata.truncation && reply.answers.len() < answers);
        } else {
            assert_eq!(reply.answers.len(), answers, "{name}");
        }
    }
    let udp_many = udp("many-a-udp-512");
    assert!(udp_many.metadata.truncation);
    let tcp_many = answer("many-a-udp-512", Protocol::Tcp).unwrap();
    assert_eq!(tcp_many.answers.len(), 300);
    // What the proxy would forward: SERVFAIL without upstreams.
    for name in ["any", "ptr", "txt-mixed-case", "zero-questions"] {
        assert_eq!(code(name), ResponseCode::ServFail, "{name}");
    }
    for name in [
        "compression-pointer-self",
        "compression-pointer-pair",
        "compression-pointer-past-end",
        "truncated-question",
        "counts-beyond-the-message",
    ] {
        assert_eq!(code(name), ResponseCode::FormErr, "{name}");
    }
    assert_eq!(code("opcode-notify"), ResponseCode::NotImp);
    // Only the first of many questions is answered.
    assert_eq!(udp("many-questions").answers.len(), 1);
    for name in ["truncated-header", "response-bit"] {
        assert!(answer(name, Protocol::Udp).is_none(), "{name}");
    }
}
