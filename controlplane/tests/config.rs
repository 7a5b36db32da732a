//! The config directory fixtures in testdata/controlplane/: `mesh/` loads
//! without a problem, every problem in `bad/` is reported with its file and
//! cause, and the good objects next to them are served.

use std::path::{Path, PathBuf};

use meshvm_controlplane::config::selector::{select_pods, select_workload_entries};
use meshvm_controlplane::config::{IntOrString, Kind, ObjectKey, load_dir};

fn testdata(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/controlplane")
        .join(dir)
}

#[test]
fn the_mesh_fixture_loads_cleanly() {
    let config = load_dir(&testdata("mesh")).unwrap();
    assert_eq!(config.errors, []);
    assert_eq!(
        config.summary(),
        "1 WorkloadGroups, 1 WorkloadEntries, 2 Services, 1 Pods"
    );

    let group = config.workload_group("vm-ns", "ratings-vm").unwrap();
    assert_eq!(group.service_account(), "ratings-sa");
    assert_eq!(group.spec.template.network, "vm-network");
    let probe = group.spec.probe.as_ref().unwrap();
    assert_eq!(probe.http_get.as_ref().unwrap().path, "/health");

    let product = &config.services[&ObjectKey::new("default", "product")];
    assert_eq!(product.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(product.cluster_ip(), Some("10.96.88.12".parse().unwrap()));
    assert_eq!(
        product.spec.ports[0].target_port(),
        IntOrString::String("http".into())
    );
    let pods: Vec<&str> = select_pods(product, config.pods.values())
        .iter()
        .map(|p| p.metadata.name.as_str())
        .collect();
    assert_eq!(pods, ["product-v1-6d8f9c7b5-x2k4p"]);
    let pod = &config.pods[&ObjectKey::new("default", "product-v1-6d8f9c7b5-x2k4p")];
    assert_eq!(pod.service_account(), "product");
    assert_eq!(pod.ip(), Some("10.244.1.17".parse().unwrap()));

    let ratings = &config.services[&ObjectKey::new("vm-ns", "ratings")];
    assert!(select_pods(ratings, config.pods.values()).is_empty());
    assert!(select_workload_entries(ratings, config.workload_entries.values()).is_empty());
    let source = config
        .source(
            Kind::Pod,
            &ObjectKey::new("default", "product-v1-6d8f9c7b5-x2k4p"),
        )
        .unwrap();
    assert_eq!((source.document, source.item), (1, Some(0)));
}

#[test]
fn every_problem_in_the_bad_fixture_is_reported() {
    let config = load_dir(&testdata("bad")).unwrap();
    let messages: Vec<String> = config.errors.iter().map(ToString::to_string).collect();
    let expected = [
        (
            "bad-list.yaml",
            "document 1, items[1]: apiVersion `networking.istio.io/v2` of a WorkloadGroup",
        ),
        (
            "missing-name.yaml",
            "document 1, line 1: metadata.name is missing",
        ),
        (
            "mixed.yaml",
            "document 2, line 11: status.podIP: `10.244.1` is not an IP address",
        ),
        (
            "syntax-error.yaml",
            "document 1, line 6: not valid YAML: did not find expected ',' or '}', while parsing a flow mapping",
        ),
        (
            "unknown-kind.yaml",
            "document 1, line 1: unknown kind `Deployment`",
        ),
        (
            "wrong-type.yaml",
            "document 1, line 8: spec.ports.http: invalid type: string \"web\", expected u32",
        ),
        (
            "mixed.yaml",
            "document 3, line 18: duplicate Service default/good: already defined in",
        ),
    ];
    assert_eq!(messages.len(), expected.len(), "{messages:#?}");
    for (message, (file, problem)) in messages.iter().zip(expected) {
        let path = testdata("bad").join(file);
        assert!(
            message.starts_with(&format!("{}: {problem}", path.display())),
            "{message}\nwanted: {file}: {problem}"
        );
    }
    // The good objects are served.
    assert_eq!(
        config.services.keys().collect::<Vec<_>>(),
        [&ObjectKey::new("default", "good")]
    );
    assert_eq!(
        config.services[&ObjectKey::new("default", "good")]
            .spec
            .ports[0]
            .port,
        80,
        "the first definition wins"
    );
    assert_eq!(
        config.pods.keys().collect::<Vec<_>>(),
        [&ObjectKey::new("default", "listed")]
    );
    assert!(config.workload_groups.is_empty() && config.workload_entries.is_empty());
}
