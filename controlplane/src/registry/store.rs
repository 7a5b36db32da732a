//! Where the registry keeps the WorkloadEntries it manages, standing in for
//! the Kubernetes API: `<state dir>/workloadentries/<namespace>/<name>.yaml`,
//! each file the entry as `kubectl get workloadentry NAME -o yaml` shows it.
//!
//! Every write is atomic (a temporary file in the same directory, renamed
//! over the old one), a deletion removes the file. A file that does not hold
//! a valid entry named like it is reported and left untouched: it is not
//! loaded, and the registry refuses to overwrite it.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::meta::ObjectKey;
use crate::config::workload_entry::WorkloadEntry;
use crate::files;

/// The state directory's subdirectory for WorkloadEntries.
pub const WORKLOAD_ENTRIES_DIR: &str = "workloadentries";

/// A stored file that is not a valid WorkloadEntry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct StoredEntryError {
    pub path: PathBuf,
    pub problem: String,
}

/// What a state directory holds.
#[derive(Debug, Default)]
pub struct StoredEntries {
    pub entries: BTreeMap<ObjectKey, WorkloadEntry>,
    /// Files that are not valid entries, by the key their path names.
    pub malformed: BTreeMap<ObjectKey, StoredEntryError>,
}

/// The WorkloadEntries of a state directory.
#[derive(Debug, Clone)]
pub struct WorkloadEntryStore {
    dir: PathBuf,
}

impl WorkloadEntryStore {
    /// The store in `state_dir` (nothing is read or created yet).
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join(WORKLOAD_ENTRIES_DIR),
        }
    }

    /// `<state dir>/workloadentries`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of the entry `key`.
    pub fn path(&self, key: &ObjectKey) -> PathBuf {
        self.dir
            .join(&key.namespace)
            .join(format!("{}.yaml", key.name))
    }

    /// Creates the store's directory if missing.
    pub fn create(&self) -> io::Result<()> {
        files::create_dir(&self.dir, 0o755)
    }

    /// Reads every stored entry; a missing directory is an empty store.
    /// Hidden files (an interrupted write's temporary files) and files not
    /// ending in `.yaml` are skipped.
    pub fn load(&self) -> io::Result<StoredEntries> {
        let mut stored = StoredEntries::default();
        let namespaces = match fs::read_dir(&self.dir) {
            Ok(dirs) => dirs,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(stored),
            Err(e) => return Err(e),
        };
        for namespace_dir in namespaces {
            let namespace_dir = namespace_dir?;
            let namespace = namespace_dir.file_name().to_string_lossy().into_owned();
            if namespace.starts_with('.') || !namespace_dir.file_type()?.is_dir() {
                continue;
            }
            for file in fs::read_dir(namespace_dir.path())? {
                let file = file?;
                let file_name = file.file_name().to_string_lossy().into_owned();
                let Some(name) = file_name.strip_suffix(".yaml") else {
                    continue;
                };
                if file_name.starts_with('.') {
                    continue;
                }
                let key = ObjectKey::new(&namespace, name);
                let path = file.path();
                match read_entry(&path, &key) {
                    Ok(entry) => {
                        stored.entries.insert(key, entry);
                    }
                    Err(problem) => {
                        stored
                            .malformed
                            .insert(key, StoredEntryError { path, problem });
                    }
                }
            }
        }
        Ok(stored)
    }

    /// Writes `entry` atomically (its namespace's directory is created).
    pub fn save(&self, entry: &WorkloadEntry) -> io::Result<()> {
        let path = self.path(&entry.metadata.key());
        if let Some(dir) = path.parent() {
            files::create_dir(dir, 0o755)?;
        }
        files::write_atomic(&path, to_yaml(entry).as_bytes(), files::PUBLIC_MODE)
    }

    /// Removes the entry's file (already gone is fine).
    pub fn delete(&self, key: &ObjectKey) -> io::Result<()> {
        match fs::remove_file(self.path(key)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Reads and checks one stored entry.
fn read_entry(path: &Path, key: &ObjectKey) -> Result<WorkloadEntry, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut entry: WorkloadEntry = serde_norway::from_str(&text).map_err(|e| e.to_string())?;
    entry.validate().map_err(|e| e.to_string())?;
    if entry.metadata.name != key.name {
        return Err(format!(
            "metadata.name is `{}`, the file name says `{}`",
            entry.metadata.name, key.name
        ));
    }
    match entry.metadata.namespace.as_deref() {
        None | Some("") => entry.metadata.namespace = Some(key.namespace.clone()),
        Some(ns) if ns == key.namespace => {}
        Some(ns) => {
            return Err(format!(
                "metadata.namespace is `{ns}`, the directory says `{}`",
                key.namespace
            ));
        }
    }
    Ok(entry)
}

/// An entry as `kubectl get workloadentry NAME -o yaml` writes it: keys in
/// alphabetical order, Go's YAML scalar styles.
pub fn to_yaml(entry: &WorkloadEntry) -> String {
    crate::yaml::json_to_string(&serde_json::to_value(entry).expect("serializable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: &str = "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  annotations:
    istio.io/autoRegistrationGroup: ratings-vm
    istio.io/connectedAt: \"2024-05-01T10:00:00.12Z\"
    istio.io/workloadController: meshvm-controlplane
  creationTimestamp: \"2024-05-01T10:00:00Z\"
  labels:
    app: ratings
  name: ratings-vm-10.0.0.12-vm-network
  namespace: vm-ns
  ownerReferences:
  - apiVersion: networking.istio.io/v1
    controller: true
    kind: WorkloadGroup
    name: ratings-vm
    uid: 0b4e3c5a-1f2d-5e6f-8a9b-0c1d2e3f4a5b
  uid: 6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f
spec:
  address: 10.0.0.12
  labels:
    app: ratings
  network: vm-network
  ports:
    http: 9080
  serviceAccount: ratings-sa
";

    #[test]
    fn writes_as_kubectl_shows_and_reads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let store = WorkloadEntryStore::new(tmp.path());
        let entry: WorkloadEntry = serde_norway::from_str(ENTRY).unwrap();
        assert_eq!(to_yaml(&entry), ENTRY, "kubectl's layout, byte for byte");
        store.save(&entry).unwrap();
        let path = store.path(&entry.metadata.key());
        assert!(path.ends_with("workloadentries/vm-ns/ratings-vm-10.0.0.12-vm-network.yaml"));
        assert_eq!(fs::read_to_string(&path).unwrap(), ENTRY);
        // Saved again: replaced, no temporary file left.
        store.save(&entry).unwrap();
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
        let loaded = store.load().unwrap();
        assert_eq!(loaded.entries[&entry.metadata.key()], entry);
        assert!(loaded.malformed.is_empty());
        store.delete(&entry.metadata.key()).unwrap();
        store.delete(&entry.metadata.key()).unwrap();
        assert!(store.load().unwrap().entries.is_empty());
    }

    #[test]
    fn malformed_files_are_reported_and_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let store = WorkloadEntryStore::new(tmp.path());
        assert!(store.load().unwrap().entries.is_empty(), "no directory yet");
        let ns = store.dir().join("vm-ns");
        fs::create_dir_all(&ns).unwrap();
        let cases = [
            ("broken.yaml", "kind: [\n".to_string()),
            (
                "renamed.yaml",
                ENTRY.replace(
                    "name: ratings-vm-10.0.0.12-vm-network",
                    "name: something-else",
                ),
            ),
            (
                "ratings-vm-10.0.0.12-vm-network.yaml",
                ENTRY.replace("namespace: vm-ns", "namespace: x"),
            ),
            ("bad-port.yaml", ENTRY.replace("http: 9080", "http: 0")),
        ];
        for (name, text) in &cases {
            fs::write(ns.join(name), text).unwrap();
        }
        fs::write(ns.join(".tmp-write.yaml"), "partial").unwrap();
        fs::write(ns.join("README"), "not an entry").unwrap();
        let loaded = store.load().unwrap();
        assert!(loaded.entries.is_empty());
        let problems: Vec<String> = loaded.malformed.values().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("renamed.yaml: metadata.name is `something-else`"))
        );
        assert!(problems.iter().any(|p| {
            p.contains("vm-network.yaml: metadata.namespace is `x`, the directory says `vm-ns`")
        }));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("bad-port.yaml: spec.ports.http: 0 is not a port"))
        );
        assert!(
            loaded
                .malformed
                .contains_key(&ObjectKey::new("vm-ns", "broken"))
        );
        for (name, text) in &cases {
            assert_eq!(
                &fs::read_to_string(ns.join(name)).unwrap(),
                text,
                "untouched"
            );
        }
    }
}
