//! The control plane's configuration: Kubernetes-style YAML manifests in a
//! directory, standing in for the objects istiod reads from the Kubernetes
//! API (WorkloadGroups, WorkloadEntries, Services, Pods).
//!
//! - [`manifest`]: a file's `---`-separated documents (and `kind: List`
//!   items) → typed objects, or [`ManifestError`]s naming the file, the
//!   document, the line and the problem;
//! - [`dir`]: a directory of `*.yaml`/`*.yml` files → a [`ConfigSnapshot`].
//!   Bad input loses nothing: a malformed document is reported and skipped,
//!   everything else is served, and while a file has errors the objects its
//!   previous version defined stay served;
//! - [`watcher`]: re-reads the directory when it changes and publishes each
//!   new snapshot on a `tokio::sync::watch` channel;
//! - [`selector`]: which Pods and WorkloadEntries a Service selects.
//!
//! Objects without a namespace are in [`DEFAULT_NAMESPACE`], as `kubectl
//! apply` would put them.

pub mod dir;
pub mod manifest;
pub mod meta;
pub mod pod;
pub mod selector;
pub mod service;
pub mod watcher;
pub mod workload_entry;
pub mod workload_group;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

pub use dir::{ConfigDir, ConfigError, load_dir};
pub use manifest::{Object, Source, parse_manifests};
pub use meta::{DEFAULT_NAMESPACE, ObjectKey, ObjectMeta, OwnerReference};
pub use pod::Pod;
pub use service::{IntOrString, Service, ServicePort};
pub use watcher::ConfigWatcher;
pub use workload_entry::{WorkloadEntry, WorkloadEntrySpec};
pub use workload_group::WorkloadGroup;

/// API versions of Istio's networking kinds (WorkloadGroup, WorkloadEntry).
pub const ISTIO_API_VERSIONS: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// The API version this control plane writes Istio objects with.
pub const ISTIO_API_VERSION: &str = "networking.istio.io/v1";

/// The kinds a config directory may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    WorkloadGroup,
    WorkloadEntry,
    Service,
    Pod,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::WorkloadGroup => workload_group::KIND,
            Kind::WorkloadEntry => workload_entry::KIND,
            Kind::Service => service::KIND,
            Kind::Pod => pod::KIND,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is wrong with one document (or `List` item) of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestProblem {
    #[error("cannot read the file: {0}")]
    Read(String),
    #[error("not valid YAML: {0}")]
    Yaml(String),
    #[error("not a Kubernetes object: {0}")]
    NotAnObject(String),
    #[error("`{0}` is missing")]
    MissingField(&'static str),
    #[error(
        "unknown kind `{kind}` (apiVersion `{api_version}`): expected WorkloadGroup or WorkloadEntry (networking.istio.io), Service or Pod (v1), or a List of them"
    )]
    UnknownKind { api_version: String, kind: String },
    #[error("kind is `{found}`, expected {expected}")]
    WrongKind {
        found: String,
        expected: &'static str,
    },
    #[error("apiVersion `{found}` of a {kind} is not one of {expected:?}")]
    ApiVersion {
        kind: &'static str,
        found: String,
        expected: &'static [&'static str],
    },
    #[error("metadata.name is missing")]
    MissingName,
    /// A field of the wrong type or with an impossible value, as the YAML
    /// decoder reports it (with the field's path).
    #[error("{0}")]
    Decode(String),
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
    #[error("duplicate {kind} {key}: already defined in {first}")]
    Duplicate {
        kind: Kind,
        key: ObjectKey,
        first: Box<Source>,
    },
}

impl ManifestProblem {
    /// A field's value is refused.
    pub fn field(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ManifestProblem::Field {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// A problem in a manifest file, with where it is. Displayed as
/// `FILE: document N[, item M][, line L]: PROBLEM`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based index among the file's non-empty documents; `None` when the
    /// problem is with the whole file.
    pub document: Option<usize>,
    /// 0-based index in a `List`'s `items`.
    pub item: Option<usize>,
    /// 1-based line in the file, when the YAML parser gives one.
    pub line: Option<usize>,
    pub problem: ManifestProblem,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(document) = self.document {
            write!(f, ": document {document}")?;
        }
        if let Some(item) = self.item {
            write!(f, ", items[{item}]")?;
        }
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// Checks `metadata.name` (present, valid by `rule`) and
/// `metadata.namespace` (a DNS label if set).
pub(crate) fn check_object_name(
    meta: &ObjectMeta,
    rule: fn(&str) -> bool,
) -> Result<(), ManifestProblem> {
    if meta.name.is_empty() {
        return Err(ManifestProblem::MissingName);
    }
    if !rule(&meta.name) {
        return Err(ManifestProblem::field(
            "metadata.name",
            format!("`{}` is not a valid name for this kind", meta.name),
        ));
    }
    if let Some(ns) = meta.namespace.as_deref()
        && !ns.is_empty()
        && !meta::is_dns_label(ns)
    {
        return Err(ManifestProblem::field(
            "metadata.namespace",
            format!("`{ns}` is not a Kubernetes namespace name"),
        ));
    }
    Ok(())
}

/// Every object of a config directory, by kind and key, and the problems
/// found reading it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigSnapshot {
    pub workload_groups: BTreeMap<ObjectKey, WorkloadGroup>,
    pub workload_entries: BTreeMap<ObjectKey, WorkloadEntry>,
    pub services: BTreeMap<ObjectKey, Service>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    /// Where each object was defined.
    pub sources: BTreeMap<(Kind, ObjectKey), Source>,
    /// Problems, each file's in document order, then duplicates.
    pub errors: Vec<ManifestError>,
}

impl ConfigSnapshot {
    /// Adds `object` unless one of the same kind and key is there already;
    /// then the object is refused and the first definition is returned.
    /// A missing namespace is set to [`DEFAULT_NAMESPACE`].
    pub fn insert(&mut self, mut object: Object, source: Source) -> Result<(), Source> {
        object.default_namespace();
        let key = object.key();
        let kind = object.kind();
        if let Some(first) = self.sources.get(&(kind, key.clone())) {
            return Err(first.clone());
        }
        match object {
            Object::WorkloadGroup(o) => {
                self.workload_groups.insert(key.clone(), o);
            }
            Object::WorkloadEntry(o) => {
                self.workload_entries.insert(key.clone(), o);
            }
            Object::Service(o) => {
                self.services.insert(key.clone(), o);
            }
            Object::Pod(o) => {
                self.pods.insert(key.clone(), o);
            }
        }
        self.sources.insert((kind, key), source);
        Ok(())
    }

    /// Where the object of `kind` named `key` was defined.
    pub fn source(&self, kind: Kind, key: &ObjectKey) -> Option<&Source> {
        self.sources.get(&(kind, key.clone()))
    }

    /// The WorkloadGroup `namespace/name`.
    pub fn workload_group(&self, namespace: &str, name: &str) -> Option<&WorkloadGroup> {
        self.workload_groups.get(&ObjectKey::new(namespace, name))
    }

    /// How many objects of each kind, for logs.
    pub fn summary(&self) -> String {
        format!(
            "{} WorkloadGroups, {} WorkloadEntries, {} Services, {} Pods",
            self.workload_groups.len(),
            self.workload_entries.len(),
            self.services.len(),
            self.pods.len()
        )
    }
}

/// A snapshot of the manifests in `yaml`, for tests; panics on a problem.
#[cfg(test)]
pub fn snapshot_of(yaml: &str) -> ConfigSnapshot {
    let (objects, errors) = parse_manifests(std::path::Path::new("test.yaml"), yaml);
    assert!(errors.is_empty(), "{errors:?}");
    let mut snapshot = ConfigSnapshot::default();
    for (object, source) in objects {
        snapshot.insert(object, source).unwrap();
    }
    snapshot
}
