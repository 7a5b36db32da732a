//! Generates the Rust types for `proto/**/*.proto` without a system `protoc`:
//! `protox` (a pure-Rust protobuf compiler) parses the files into a
//! `FileDescriptorSet`, and `tonic-prost-build` turns that into prost messages
//! plus the tonic client and server for `IstioCertificateService`.

use std::error::Error;
use std::path::Path;

/// The .proto files we compile, relative to `proto/`.
const PROTOS: &[&str] = &[
    "istio/v1/auth/ca.proto",
    "istio/networking/nds/v1/nds.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let root = Path::new("proto");
    println!("cargo:rerun-if-changed=build.rs");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }

    // Imports such as google/protobuf/struct.proto come from protox's bundled
    // well-known types. They must be in the set (prost-build inspects them,
    // e.g. to decide whether a message can derive `Eq`), but no code is
    // generated for them: prost-build maps every `.google.protobuf.*` type to
    // `::prost_types::*` by default, so `IstioCertificateRequest.metadata` is
    // an `Option<prost_types::Struct>`.
    let fds = protox::Compiler::new([root])?
        .include_source_info(true) // keep the .proto comments as rustdoc
        .include_imports(true)
        .open_files(PROTOS)?
        .file_descriptor_set();

    // `impl prost::Name` for every message, with type URLs in the
    // `type.googleapis.com/` domain Istio uses, so `prost_types::Any::from_msg`
    // / `Any::to_msg` pack and unpack xDS resources such as the NameTable.
    let mut config = tonic_prost_build::Config::new();
    config
        .enable_type_names()
        .type_name_domain(["."], "type.googleapis.com")
        // Ordered maps: a NameTable encodes to the same bytes every time, so
        // its digest can serve as the xDS version.
        .btree_map(["."]);

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // No `Client::connect(uri)` helper: it needs tonic's `transport`
        // feature here. Callers build a `Channel` (with their TLS setup) and
        // use `Client::new(channel)`.
        .build_transport(false)
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
