//! Wire-format tests: the generated types must produce and accept exactly the
//! bytes istiod and pilot-agent use. Expected byte strings are written out by
//! hand from the field numbers in the reference (tag byte = field << 3 | wire
//! type; wire type 0 = varint, 2 = length-delimited), so a wrong field number
//! or type in our .proto files fails here.

use std::collections::BTreeMap;

use meshvm_proto::istio::networking::nds::v1::{NameTable, name_table::NameInfo};
use meshvm_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use meshvm_proto::{HEALTH_INFORMATION_TYPE_URL, NAME_TABLE_TYPE_URL, TYPE_URL_PREFIX};
use prost::{Message, Name};
use prost_types::{Any, Struct, Value, value::Kind};

/// `tag` followed by a one-byte length and `payload` (all our test payloads
/// are under 128 bytes).
fn ld(tag: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 128, "length would need a multi-byte varint");
    let mut out = vec![tag, payload.len() as u8];
    out.extend_from_slice(payload);
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// What pilot-agent sends: csr (1), validity_duration (3) = SECRET_TTL 24h,
/// metadata (4) = Struct {CertSigner: ""}.
fn agent_request() -> IstioCertificateRequest {
    IstioCertificateRequest {
        csr: "CSR".to_owned(),
        validity_duration: 86_400,
        metadata: Some(Struct {
            fields: BTreeMap::from([("CertSigner".to_owned(), string_value(""))]),
        }),
    }
}

#[test]
fn certificate_request_encodes_to_reference_field_numbers() {
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // csr = 1, string: tag 0x0a, len 3, "CSR"
        0x0a, 0x03, b'C', b'S', b'R',
        // validity_duration = 3, int64 varint: tag 0x18, 86400 = 0x80 0xa3 0x05
        0x18, 0x80, 0xa3, 0x05,
        // metadata = 4, Struct: tag 0x22, len 18
        0x22, 0x12,
        //   Struct.fields = 1 (map entry): tag 0x0a, len 16
        0x0a, 0x10,
        //     entry key = 1: tag 0x0a, len 10, "CertSigner"
        0x0a, 0x0a, b'C', b'e', b'r', b't', b'S', b'i', b'g', b'n', b'e', b'r',
        //     entry value = 2, Value: tag 0x12, len 2
        0x12, 0x02,
        //       Value.string_value = 3 (oneof, so sent even when empty): tag 0x1a, len 0
        0x1a, 0x00,
    ];
    let req = agent_request();
    assert_eq!(req.encode_to_vec(), expected);
    assert_eq!(IstioCertificateRequest::decode(expected).unwrap(), req);
}

#[test]
fn certificate_request_round_trips() {
    let req = IstioCertificateRequest {
        csr: "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
            .to_owned(),
        validity_duration: -1, // istiod treats <= 0 as "use the default TTL"
        metadata: Some(Struct {
            fields: BTreeMap::from([
                ("CertSigner".to_owned(), string_value("signer-a")),
                (
                    "ImpersonatedIdentity".to_owned(),
                    string_value("spiffe://x"),
                ),
            ]),
        }),
    };
    let bytes = req.encode_to_vec();
    assert_eq!(
        IstioCertificateRequest::decode(bytes.as_slice()).unwrap(),
        req
    );
}

#[test]
fn default_certificate_request_is_empty_on_the_wire() {
    // proto3: default scalars and an absent Struct are not sent.
    assert!(
        IstioCertificateRequest::default()
            .encode_to_vec()
            .is_empty()
    );
}

#[test]
fn certificate_response_decodes_chain_in_order() {
    // What istiod sends: cert_chain = 1 (repeated string), leaf first, root last.
    let leaf = b"-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n";
    let root = b"-----BEGIN CERTIFICATE-----\nROOT\n-----END CERTIFICATE-----\n";
    let wire = cat(&[&ld(0x0a, leaf), &ld(0x0a, root)]);
    let resp = IstioCertificateResponse::decode(wire.as_slice()).unwrap();
    assert_eq!(
        resp.cert_chain,
        [
            String::from_utf8(leaf.to_vec()).unwrap(),
            String::from_utf8(root.to_vec()).unwrap()
        ]
    );
    assert_eq!(resp.encode_to_vec(), wire);
}

fn ratings_info() -> NameInfo {
    NameInfo {
        ips: vec!["10.96.0.12".to_owned()],
        registry: "Kubernetes".to_owned(),
        shortname: "ratings".to_owned(),
        namespace: "vm-ns".to_owned(),
        alt_hosts: vec!["ratings.alt".to_owned()],
    }
}

/// NameInfo for `ratings` with every field set, as hand-encoded bytes.
fn ratings_info_wire() -> Vec<u8> {
    cat(&[
        &ld(0x0a, b"10.96.0.12"),  // ips = 1
        &ld(0x12, b"Kubernetes"),  // registry = 2
        &ld(0x1a, b"ratings"),     // shortname = 3
        &ld(0x22, b"vm-ns"),       // namespace = 4
        &ld(0x2a, b"ratings.alt"), // alt_hosts = 5
    ])
}

#[test]
fn name_table_encodes_to_reference_field_numbers() {
    let host = "ratings.vm-ns.svc.cluster.local";
    let table = NameTable {
        table: BTreeMap::from([(host.to_owned(), ratings_info())]),
    };
    // table = 1 is a map: one length-delimited entry per key, the entry being
    // {key = 1 (string), value = 2 (NameInfo)}.
    let entry = cat(&[&ld(0x0a, host.as_bytes()), &ld(0x12, &ratings_info_wire())]);
    let expected = ld(0x0a, &entry);
    assert_eq!(table.encode_to_vec(), expected);
    assert_eq!(NameTable::decode(expected.as_slice()).unwrap(), table);
}

#[test]
fn name_table_round_trips() {
    let mut table = NameTable::default();
    table
        .table
        .insert("ratings.vm-ns.svc.cluster.local".to_owned(), ratings_info());
    table.table.insert(
        "api.example.com".to_owned(),
        NameInfo {
            ips: vec!["240.240.0.1".to_owned(), "2001:db8::1".to_owned()],
            registry: "External".to_owned(),
            ..Default::default()
        },
    );
    table
        .table
        .insert("*.wild.example.com".to_owned(), NameInfo::default());
    let bytes = table.encode_to_vec();
    assert_eq!(NameTable::decode(bytes.as_slice()).unwrap(), table);
}

/// A NameTable as istiod's Go protobuf encoder writes it: map entries in any
/// order, key and value always present (even an empty NameInfo), plus a field
/// this version does not know (field 2, as a newer istiod might add), which
/// must be skipped rather than rejected.
fn istiod_name_table_wire() -> Vec<u8> {
    let headless = cat(&[
        &ld(0x0a, b"10.0.0.12"),
        &ld(0x0a, b"10.0.0.13"),
        &ld(0x12, b"Kubernetes"),
        &ld(0x1a, b"db"),
        &ld(0x22, b"vm-ns"),
    ]);
    let service_entry = cat(&[&ld(0x0a, b"240.240.0.1"), &ld(0x12, b"External")]);
    cat(&[
        &ld(
            0x0a,
            &cat(&[&ld(0x0a, b"api.example.com"), &ld(0x12, &service_entry)]),
        ),
        // unknown field 2 (length-delimited) between map entries
        &ld(0x12, b"from-the-future"),
        &ld(
            0x0a,
            &cat(&[
                &ld(0x0a, b"db.vm-ns.svc.cluster.local"),
                &ld(0x12, &headless),
            ]),
        ),
        &ld(
            0x0a,
            &cat(&[
                &ld(0x0a, b"ratings.vm-ns.svc.cluster.local"),
                &ld(0x12, &ratings_info_wire()),
            ]),
        ),
        // an empty NameInfo is still written as "value = 2, length 0"
        &ld(
            0x0a,
            &cat(&[&ld(0x0a, b"empty.example.com"), &[0x12, 0x00]]),
        ),
    ])
}

#[test]
fn name_table_decodes_istiod_bytes() {
    let table = NameTable::decode(istiod_name_table_wire().as_slice()).unwrap();
    assert_eq!(table.table.len(), 4);
    assert_eq!(
        table.table["ratings.vm-ns.svc.cluster.local"],
        ratings_info()
    );
    assert_eq!(
        table.table["db.vm-ns.svc.cluster.local"],
        NameInfo {
            ips: vec!["10.0.0.12".to_owned(), "10.0.0.13".to_owned()],
            registry: "Kubernetes".to_owned(),
            shortname: "db".to_owned(),
            namespace: "vm-ns".to_owned(),
            alt_hosts: vec![],
        }
    );
    assert_eq!(
        table.table["api.example.com"],
        NameInfo {
            ips: vec!["240.240.0.1".to_owned()],
            registry: "External".to_owned(),
            ..Default::default()
        }
    );
    assert_eq!(table.table["empty.example.com"], NameInfo::default());
}

#[test]
fn name_table_unpacks_from_discovery_response_any() {
    // DiscoveryResponse.resources[0] is a google.protobuf.Any:
    // type_url = 1 (string), value = 2 (bytes).
    let wire = cat(&[
        &ld(0x0a, NAME_TABLE_TYPE_URL.as_bytes()),
        &ld(0x12, &ratings_only_table_wire()),
    ]);
    let any = Any::decode(wire.as_slice()).unwrap();
    let table: NameTable = any.to_msg().unwrap();
    assert_eq!(
        table.table["ratings.vm-ns.svc.cluster.local"],
        ratings_info()
    );
    // And packing produces the same Any.
    assert_eq!(Any::from_msg(&table).unwrap(), any);
}

fn ratings_only_table_wire() -> Vec<u8> {
    ld(
        0x0a,
        &cat(&[
            &ld(0x0a, b"ratings.vm-ns.svc.cluster.local"),
            &ld(0x12, &ratings_info_wire()),
        ]),
    )
}

#[test]
fn type_urls_match_generated_names() {
    assert_eq!(NameTable::type_url(), NAME_TABLE_TYPE_URL);
    assert_eq!(
        NameTable::full_name(),
        NAME_TABLE_TYPE_URL.strip_prefix(TYPE_URL_PREFIX).unwrap()
    );
    assert_eq!(
        IstioCertificateRequest::type_url(),
        "type.googleapis.com/istio.v1.auth.IstioCertificateRequest"
    );
    assert_eq!(
        HEALTH_INFORMATION_TYPE_URL,
        format!("{TYPE_URL_PREFIX}istio.v1.HealthInformation")
    );
}
