//! A config directory: its `*.yaml`/`*.yml` files (not recursive; hidden
//! files, such as editors' swap files, are skipped), each remembered with
//! its content and what it defined, so a re-scan re-parses only files that
//! changed.
//!
//! Bad input loses nothing: when a file's new version has errors, the
//! objects its previous version defined and the new one no longer does are
//! kept (a malformed document may be the one that held them) until the file
//! parses cleanly again; a file that cannot be read keeps all its objects.
//! Removing an object from a file therefore takes effect once the file has
//! no errors. Deleting a file removes its objects.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::manifest::{Object, Source, parse_manifests};
use super::{ConfigSnapshot, Kind, ManifestError, ManifestProblem, ObjectKey};

/// Why a config directory could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config directory {}: {error}", path.display())]
    Dir { path: PathBuf, error: io::Error },
    #[error("cannot start watching the config directory: {0}")]
    Watch(io::Error),
}

/// What one file defines.
#[derive(Debug, Default)]
struct FileState {
    /// The content last parsed; `None` after a failed read, so the next
    /// successful one is parsed.
    content: Option<Vec<u8>>,
    objects: Vec<(Object, Source)>,
    errors: Vec<ManifestError>,
}

/// A config directory and what its files defined when last scanned.
#[derive(Debug)]
pub struct ConfigDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

/// Reads a config directory once.
pub fn load_dir(dir: &Path) -> Result<ConfigSnapshot, ConfigError> {
    let mut config = ConfigDir::new(dir);
    config.rescan()?;
    Ok(config.snapshot())
}

impl ConfigDir {
    /// A directory not read yet (see [`ConfigDir::rescan`]).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the directory; `Ok(true)` if any file was added, removed or
    /// changed. A directory that cannot be listed is an error and changes
    /// nothing.
    pub fn rescan(&mut self) -> Result<bool, ConfigError> {
        let dir_error = |error| ConfigError::Dir {
            path: self.dir.clone(),
            error,
        };
        let mut paths = BTreeSet::new();
        for entry in fs::read_dir(&self.dir).map_err(dir_error)? {
            let entry = entry.map_err(dir_error)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
                continue;
            }
            let path = entry.path();
            // Follows symbolic links (e.g. a mounted ConfigMap's files).
            if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                paths.insert(path);
            }
        }
        let mut changed = false;
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !paths.contains(*p))
            .cloned()
            .collect();
        for path in removed {
            tracing::info!(file = %path.display(), "manifest file removed");
            self.files.remove(&path);
            changed = true;
        }
        for path in paths {
            changed |= self.read_file(path);
        }
        Ok(changed)
    }

    /// Re-reads one file; whether what it defines changed.
    fn read_file(&mut self, path: PathBuf) -> bool {
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                let state = self.files.entry(path.clone()).or_default();
                let error = ManifestError {
                    file: path,
                    document: None,
                    item: None,
                    line: None,
                    problem: ManifestProblem::Read(e.to_string()),
                };
                let changed = state.errors != [error.clone()];
                state.content = None;
                state.errors = vec![error];
                return changed;
            }
        };
        let previous = self.files.get(&path);
        if previous.is_some_and(|s| s.content.as_deref() == Some(&bytes[..])) {
            return false;
        }
        let (mut objects, errors) = match std::str::from_utf8(&bytes) {
            Ok(text) => parse_manifests(&path, text),
            Err(e) => (
                Vec::new(),
                vec![ManifestError {
                    file: path.clone(),
                    document: None,
                    item: None,
                    line: None,
                    problem: ManifestProblem::Read(format!("not UTF-8 text ({e})")),
                }],
            ),
        };
        if !errors.is_empty()
            && let Some(previous) = previous
        {
            let defined: BTreeSet<(Kind, ObjectKey)> =
                objects.iter().map(|(o, _)| (o.kind(), o.key())).collect();
            for (object, source) in &previous.objects {
                if !defined.contains(&(object.kind(), object.key())) {
                    tracing::warn!(
                        file = %path.display(),
                        kind = %object.kind(),
                        object = %object.key(),
                        "the file has errors: keeping the previous version of the object"
                    );
                    objects.push((object.clone(), source.clone()));
                }
            }
        }
        let state = FileState {
            content: Some(bytes),
            objects,
            errors,
        };
        let changed =
            previous.is_none_or(|p| p.objects != state.objects || p.errors != state.errors);
        self.files.insert(path, state);
        changed
    }

    /// Every object and problem, files in path order; of two objects of the
    /// same kind and key, the first is kept and the second reported.
    pub fn snapshot(&self) -> ConfigSnapshot {
        let mut snapshot = ConfigSnapshot::default();
        let mut duplicates = Vec::new();
        for (path, state) in &self.files {
            snapshot.errors.extend(state.errors.iter().cloned());
            for (object, source) in &state.objects {
                let (kind, key) = (object.kind(), object.key());
                if let Err(first) = snapshot.insert(object.clone(), source.clone()) {
                    duplicates.push(ManifestError {
                        file: path.clone(),
                        document: Some(source.document),
                        item: source.item,
                        line: Some(source.line),
                        problem: ManifestProblem::Duplicate {
                            kind,
                            key,
                            first: Box::new(first),
                        },
                    });
                }
            }
        }
        snapshot.errors.extend(duplicates);
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WG: &str = "apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: ratings-vm, namespace: vm-ns}
spec: {template: {serviceAccount: ratings-sa}}
";
    const SVC: &str = "apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: vm-ns}
spec: {selector: {app: ratings}, ports: [{name: http, port: 9080}]}
";

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn reads_yaml_files_only_and_reports_duplicates() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "a.yaml", WG);
        write(tmp.path(), "b.yml", &format!("{WG}---\n{SVC}"));
        write(tmp.path(), ".a.yaml.swp", "garbage: [");
        write(tmp.path(), "notes.txt", "garbage: [");
        let snapshot = load_dir(tmp.path()).unwrap();
        assert_eq!(snapshot.workload_groups.len(), 1);
        assert_eq!(snapshot.services.len(), 1);
        assert_eq!(snapshot.errors.len(), 1);
        let message = snapshot.errors[0].to_string();
        assert!(
            message.contains("b.yml: document 1, line 1: duplicate WorkloadGroup vm-ns/ratings-vm: already defined in")
                && message.contains("a.yaml document 1"),
            "{message}"
        );
        let source = snapshot
            .source(Kind::Service, &ObjectKey::new("vm-ns", "ratings"))
            .unwrap();
        assert_eq!((source.document, source.line), (2, 6));
    }

    #[test]
    fn a_broken_file_keeps_its_previous_objects_until_fixed() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "mesh.yaml", &format!("{WG}---\n{SVC}"));
        let mut dir = ConfigDir::new(tmp.path());
        assert!(dir.rescan().unwrap());
        assert!(!dir.rescan().unwrap(), "nothing changed");

        // The Service's document breaks: the Service is kept, the group updated.
        let edited_wg = WG.replace("ratings-sa", "ratings-sa2");
        write(
            tmp.path(),
            "mesh.yaml",
            &format!("{edited_wg}---\napiVersion: v1\nkind: Service\nmetadata: {{name: [\n"),
        );
        assert!(dir.rescan().unwrap());
        let snapshot = dir.snapshot();
        assert_eq!(snapshot.errors.len(), 1, "{:?}", snapshot.errors);
        assert_eq!(snapshot.services.len(), 1, "the old Service is kept");
        let wg = snapshot.workload_group("vm-ns", "ratings-vm").unwrap();
        assert_eq!(wg.spec.template.service_account, "ratings-sa2");

        // Still broken after another edit: still kept.
        write(tmp.path(), "mesh.yaml", &format!("{WG}---\nkind: [\n"));
        assert!(dir.rescan().unwrap());
        assert_eq!(dir.snapshot().services.len(), 1);

        // Fixed without the Service: now it is gone.
        write(tmp.path(), "mesh.yaml", WG);
        assert!(dir.rescan().unwrap());
        let snapshot = dir.snapshot();
        assert!(snapshot.services.is_empty());
        assert!(snapshot.errors.is_empty());

        // Deleted: everything from it is gone.
        fs::remove_file(tmp.path().join("mesh.yaml")).unwrap();
        assert!(dir.rescan().unwrap());
        assert!(dir.snapshot().workload_groups.is_empty());
    }

    #[test]
    fn an_unreadable_file_keeps_everything() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "mesh.yaml", WG);
        let mut dir = ConfigDir::new(tmp.path());
        dir.rescan().unwrap();
        fs::write(tmp.path().join("mesh.yaml"), b"\xff\xfe not text").unwrap();
        assert!(dir.rescan().unwrap());
        let snapshot = dir.snapshot();
        assert_eq!(snapshot.workload_groups.len(), 1);
        assert!(
            snapshot.errors[0]
                .to_string()
                .contains("mesh.yaml: cannot read the file: not UTF-8"),
            "{}",
            snapshot.errors[0]
        );
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = load_dir(&tmp.path().join("nope")).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
