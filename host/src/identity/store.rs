//! `key.pem`, `cert-chain.pem` and `root-cert.pem` on disk, as Istio's agent
//! writes them to `OUTPUT_CERTS`: each replaced atomically, mode 0600.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::verify::verify_elements;
use super::{
    CERT_CHAIN_FILE, FILE_MODE, ISTIO_VM_CERT_DIR, IdentityError, IssuedCert, KEY_FILE, KeyError,
    ROOT_CERT_FILE, WorkloadKey,
};
use crate::config::RootCerts;

/// The mode of the directory when the store creates it.
const DIR_MODE: u32 = 0o700;

/// Marks this module's temporary files: `.<name>.meshvm-tmp.<pid>.<n>`.
const TMP_MARKER: &str = ".meshvm-tmp.";

/// A file could not be written. (The message includes the cause, which is
/// therefore not also its `source()`, as in [`crate::config::ConfigError`].)
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {error}", path.display())]
pub struct StoreError {
    pub action: &'static str,
    pub path: PathBuf,
    pub error: io::Error,
}

/// Why the stored certificate cannot be reused. None of these is fatal: the
/// agent reports it and requests a new certificate; the files stay as they
/// are until the new ones replace them.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("{} exists but {} does not", present.display(), missing.display())]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("{}: {error}", path.display())]
    Key { path: PathBuf, error: KeyError },
    #[error("{}: {error}", path.display())]
    Certificate { path: PathBuf, error: IdentityError },
}

/// The state directory holding the workload's key and certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertStore {
    dir: PathBuf,
}

impl CertStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Istio's VM location, `/etc/certs` (where `root-cert.pem` is installed
    /// at onboarding; the CA's root replaces it, as with Istio's agent).
    pub fn istio_vm() -> Self {
        Self::new(ISTIO_VM_CERT_DIR)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    pub fn cert_chain_path(&self) -> PathBuf {
        self.dir.join(CERT_CHAIN_FILE)
    }

    pub fn root_cert_path(&self) -> PathBuf {
        self.dir.join(ROOT_CERT_FILE)
    }

    /// Writes `key.pem`, `cert-chain.pem` and `root-cert.pem`, each through
    /// [`write_atomic`], creating the directory (mode 0700) if needed. A crash
    /// between two files leaves a key and a chain that do not match, which
    /// [`CertStore::load`] detects.
    pub fn save(&self, key: &WorkloadKey, cert: &IssuedCert) -> Result<(), StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&self.dir)
            .map_err(|error| StoreError {
                action: "create the directory",
                path: self.dir.clone(),
                error,
            })?;
        self.remove_stale_temporaries();
        write_atomic(&self.key_path(), key.private_key_pem().as_bytes())?;
        write_atomic(&self.cert_chain_path(), cert.chain_pem().as_bytes())?;
        write_atomic(&self.root_cert_path(), cert.root_pem().as_bytes())?;
        tracing::info!(
            dir = %self.dir.display(),
            identity = cert.spiffe_id(),
            not_after = %super::rfc3339(&cert.not_after()),
            "stored the workload certificate"
        );
        Ok(())
    }

    /// The stored key and certificate, if both are present and the
    /// certificate still passes [`super::verify_issued`]'s checks at `now`
    /// for `expected_spiffe_id` and `roots`. `Ok(None)`: nothing stored.
    /// The CA's roots are taken from `root-cert.pem`, or from `roots` if that
    /// file is missing or unreadable.
    pub fn load(
        &self,
        now: SystemTime,
        expected_spiffe_id: &str,
        roots: &RootCerts,
    ) -> Result<Option<(WorkloadKey, IssuedCert)>, LoadError> {
        let key_path = self.key_path();
        let chain_path = self.cert_chain_path();
        let key_text = read_optional(&key_path)?;
        let chain_text = read_optional(&chain_path)?;
        let (key_text, chain_text) = match (key_text, chain_text) {
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(LoadError::Incomplete {
                    present: key_path,
                    missing: chain_path,
                });
            }
            (None, Some(_)) => {
                return Err(LoadError::Incomplete {
                    present: chain_path,
                    missing: key_path,
                });
            }
            (Some(key), Some(chain)) => (zeroize::Zeroizing::new(key), chain),
        };
        warn_if_readable_by_others(&key_path);
        let key = WorkloadKey::from_pem(&key_text).map_err(|error| LoadError::Key {
            path: key_path,
            error,
        })?;
        let root_pem = self.stored_root(roots);
        let cert = verify_elements(
            [chain_text.as_str()],
            chain_text.clone(),
            root_pem,
            &key,
            expected_spiffe_id,
            roots,
            now,
        )
        .map_err(|error| LoadError::Certificate {
            path: chain_path,
            error,
        })?;
        Ok(Some((key, cert)))
    }

    /// [`CertStore::load`], reporting why a stored certificate is not reused
    /// (the files are left in place).
    pub fn load_valid(
        &self,
        now: SystemTime,
        expected_spiffe_id: &str,
        roots: &RootCerts,
    ) -> Option<(WorkloadKey, IssuedCert)> {
        match self.load(now, expected_spiffe_id, roots) {
            Ok(Some((key, cert))) => {
                tracing::info!(
                    dir = %self.dir.display(),
                    identity = cert.spiffe_id(),
                    not_after = %super::rfc3339(&cert.not_after()),
                    "reusing the stored workload certificate"
                );
                Some((key, cert))
            }
            Ok(None) => {
                tracing::info!(dir = %self.dir.display(), "no stored workload certificate");
                None
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    "not reusing the stored workload certificate; a new one will be requested"
                );
                None
            }
        }
    }

    fn stored_root(&self, roots: &RootCerts) -> String {
        let path = self.root_cert_path();
        match fs::read_to_string(&path) {
            Ok(text) => match RootCerts::parse(&text) {
                Ok(_) => return text,
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    problem = %e.problem,
                    "ignoring the stored CA roots; serving the onboarding root-cert.pem"
                ),
            },
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot read the stored CA roots; serving the onboarding root-cert.pem"
            ),
        }
        roots.pem().to_string()
    }

    /// Removes temporary files an interrupted write of another process left.
    fn remove_stale_temporaries(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let own = format!("{TMP_MARKER}{}.", std::process::id());
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') && name.contains(TMP_MARKER) && !name.contains(&own) {
                let path = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => tracing::info!(
                        path = %path.display(),
                        "removed a temporary file an interrupted write left behind"
                    ),
                    Err(e) => tracing::warn!(
                        path = %path.display(),
                        error = %e,
                        "cannot remove a temporary file an interrupted write left behind"
                    ),
                }
            }
        }
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, LoadError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(LoadError::Read {
            path: path.to_path_buf(),
            error,
        }),
    }
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:04o}"),
                "the private key is accessible to other users; the next renewal rewrites it with mode 0600"
            );
        }
    }
}

/// Replaces `path` with `contents` so that a reader sees the old file or the
/// new one, never a mix, and a crash leaves one of them: a temporary file in
/// the same directory, created with mode 0600 (never wider, even briefly),
/// is written, flushed to disk, renamed over `path`, and the directory is
/// flushed. On failure the temporary file is removed and `path` is intact.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}{TMP_MARKER}{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let error = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |error| StoreError {
            action,
            path,
            error,
        }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&tmp)
        .map_err(error("create", &tmp))?;
    let written = (|| {
        // The umask may have narrowed the mode; make it exactly 0600.
        file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
            .map_err(error("set the mode of", &tmp))?;
        file.write_all(contents).map_err(error("write", &tmp))?;
        file.sync_all().map_err(error("flush", &tmp))?;
        fs::rename(&tmp, path).map_err(error("replace", path))
    })();
    drop(file);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(error("flush the directory", dir))
}

#[cfg(test)]
mod tests {
    use super::super::test_ca::TestCa;
    use super::super::{KeyAlgorithm, verify_issued};
    use super::*;
    use std::time::Duration;

    const ID: &str = "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa";

    struct Issued {
        root: TestCa,
        roots: RootCerts,
        key: WorkloadKey,
        cert: IssuedCert,
    }

    fn issue(algorithm: KeyAlgorithm) -> Issued {
        let root = TestCa::root("cluster.local", "test root");
        let roots = RootCerts::parse(&root.pem()).unwrap();
        let key = WorkloadKey::generate(algorithm).unwrap();
        let leaf = root.issue_now(&key.csr_pem(ID).unwrap(), ID);
        let cert = verify_issued(&[leaf, root.pem()], &key, ID, &roots, SystemTime::now()).unwrap();
        Issued {
            root,
            roots,
            key,
            cert,
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn round_trip() {
        for algorithm in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048] {
            let issued = issue(algorithm);
            let tmp = tempfile::tempdir().unwrap();
            let store = CertStore::new(tmp.path().join("certs"));
            assert!(
                store
                    .load(SystemTime::now(), ID, &issued.roots)
                    .unwrap()
                    .is_none()
            );
            store.save(&issued.key, &issued.cert).unwrap();
            let (key, cert) = store
                .load_valid(SystemTime::now(), ID, &issued.roots)
                .unwrap();
            assert_eq!(key.algorithm(), algorithm);
            assert_eq!(key.public_key_raw(), issued.key.public_key_raw());
            assert_eq!(cert, issued.cert);
            assert_eq!(
                fs::read_to_string(store.key_path()).unwrap(),
                *issued.key.private_key_pem()
            );
        }
    }

    #[test]
    fn files_are_0600_and_no_temporaries_remain() {
        let issued = issue(KeyAlgorithm::EcdsaP256);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state").join("certs");
        let store = CertStore::new(&dir);
        store.save(&issued.key, &issued.cert).unwrap();
        assert_eq!(mode(&dir), 0o700);
        for name in [KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        assert_eq!(names(&dir), ["cert-chain.pem", "key.pem", "root-cert.pem"]);
        assert_eq!(
            fs::read_to_string(store.cert_chain_path()).unwrap(),
            issued.cert.chain_pem()
        );
        assert_eq!(
            fs::read_to_string(store.root_cert_path()).unwrap(),
            issued.root.pem()
        );
    }

    #[test]
    fn replaces_existing_files() {
        let issued = issue(KeyAlgorithm::EcdsaP256);
        let tmp = tempfile::tempdir().unwrap();
        let store = CertStore::new(tmp.path());
        // As istioctl installs root-cert.pem (0744), and an old key 0644.
        for (name, mode) in [(ROOT_CERT_FILE, 0o744), (KEY_FILE, 0o644)] {
            let path = tmp.path().join(name);
            fs::write(&path, "old").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        }
        let stale = tmp.path().join(".key.pem.meshvm-tmp.1.0");
        fs::write(&stale, "left by a crash").unwrap();
        store.save(&issued.key, &issued.cert).unwrap();
        assert_eq!(
            fs::read_to_string(store.root_cert_path()).unwrap(),
            issued.root.pem()
        );
        assert_eq!(mode(&store.root_cert_path()), 0o600);
        assert_eq!(mode(&store.key_path()), 0o600);
        assert_eq!(
            names(tmp.path()),
            ["cert-chain.pem", "key.pem", "root-cert.pem"]
        );

        // A renewal replaces the three again.
        let second = issue(KeyAlgorithm::EcdsaP384);
        store.save(&second.key, &second.cert).unwrap();
        let (key, cert) = store
            .load(SystemTime::now(), ID, &second.roots)
            .unwrap()
            .unwrap();
        assert_eq!(key.algorithm(), KeyAlgorithm::EcdsaP384);
        assert_eq!(cert, second.cert);
        assert_eq!(names(tmp.path()).len(), 3);
    }

    #[test]
    fn failed_write_leaves_the_old_file_and_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("key.pem");
        fs::write(&path, "old").unwrap();
        // Renaming a file over a directory fails after the temporary file
        // was written.
        let blocked = tmp.path().join("cert-chain.pem");
        fs::create_dir(&blocked).unwrap();
        let e = write_atomic(&blocked, b"new").unwrap_err();
        assert_eq!(e.action, "replace");
        assert!(e.to_string().starts_with("cannot replace "), "{e}");
        assert!(blocked.is_dir());
        assert_eq!(fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(names(tmp.path()), ["cert-chain.pem", "key.pem"]);
        // A directory that does not exist: nothing is created.
        let e = write_atomic(&tmp.path().join("missing/key.pem"), b"new").unwrap_err();
        assert_eq!(e.action, "create");
    }

    #[test]
    fn write_atomic_makes_0600_files() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        write_atomic(&path, b"x").unwrap();
        assert_eq!(mode(&path), 0o600);
        write_atomic(&path, b"y").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"y");
    }

    fn load_error(store: &CertStore, roots: &RootCerts, now: SystemTime) -> LoadError {
        let e = store.load(now, ID, roots).unwrap_err();
        assert!(store.load_valid(now, ID, roots).is_none());
        // Never deleted.
        assert!(store.key_path().exists() || store.cert_chain_path().exists());
        e
    }

    #[test]
    fn corrupt_or_mismatched_files_are_reported_and_kept() {
        let issued = issue(KeyAlgorithm::EcdsaP256);
        let tmp = tempfile::tempdir().unwrap();
        let store = CertStore::new(tmp.path());
        let now = SystemTime::now();
        store.save(&issued.key, &issued.cert).unwrap();
        let chain = fs::read_to_string(store.cert_chain_path()).unwrap();

        // A chain that is not PEM.
        fs::write(store.cert_chain_path(), "garbage").unwrap();
        let e = load_error(&store, &issued.roots, now);
        assert!(
            matches!(
                &e,
                LoadError::Certificate {
                    error: IdentityError::BadPem { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("cert-chain.pem: certificate chain element 0"),
            "{e}"
        );
        assert_eq!(
            fs::read_to_string(store.cert_chain_path()).unwrap(),
            "garbage"
        );

        // A truncated chain (the leaf cut in half).
        fs::write(store.cert_chain_path(), &chain[..chain.len() / 4]).unwrap();
        let e = load_error(&store, &issued.roots, now);
        assert!(matches!(e, LoadError::Certificate { .. }), "{e:?}");

        // A key that is not the certificate's.
        fs::write(store.cert_chain_path(), &chain).unwrap();
        let other = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        fs::write(store.key_path(), other.private_key_pem().as_bytes()).unwrap();
        let e = load_error(&store, &issued.roots, now);
        assert!(
            matches!(
                &e,
                LoadError::Certificate {
                    error: IdentityError::NotOurKey,
                    ..
                }
            ),
            "{e:?}"
        );

        // A corrupt key.
        fs::write(store.key_path(), "-----BEGIN PRIVATE KEY-----\nAAAA\n").unwrap();
        let e = load_error(&store, &issued.roots, now);
        assert!(matches!(e, LoadError::Key { .. }), "{e:?}");
        assert!(!e.to_string().contains("AAAA"), "{e}");

        // A key Istio's agent wrote (SEC1).
        let sec1 = include_str!("../../../testdata/identity/istio-sec1-key.pem");
        fs::write(store.key_path(), sec1).unwrap();
        let e = load_error(&store, &issued.roots, now);
        assert!(e.to_string().contains("PKCS#8"), "{e}");
        assert_eq!(fs::read_to_string(store.key_path()).unwrap(), sec1);
    }

    #[test]
    fn expired_wrong_identity_or_untrusted_are_not_reused() {
        let issued = issue(KeyAlgorithm::EcdsaP256);
        let tmp = tempfile::tempdir().unwrap();
        let store = CertStore::new(tmp.path());
        store.save(&issued.key, &issued.cert).unwrap();
        let later = issued.cert.not_after() + Duration::from_secs(1);
        let e = load_error(&store, &issued.roots, later);
        assert!(
            matches!(
                &e,
                LoadError::Certificate {
                    error: IdentityError::Expired { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        let e = store
            .load(
                SystemTime::now(),
                "spiffe://cluster.local/ns/a/sa/b",
                &issued.roots,
            )
            .unwrap_err();
        assert!(
            matches!(
                &e,
                LoadError::Certificate {
                    error: IdentityError::WrongIdentity { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        // The mesh root changed (re-onboarded to another cluster).
        let other = TestCa::root("cluster.local", "another mesh");
        let other_roots = RootCerts::parse(&other.pem()).unwrap();
        let e = load_error(&store, &other_roots, SystemTime::now());
        assert!(
            matches!(
                &e,
                LoadError::Certificate {
                    error: IdentityError::Untrusted { .. },
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn half_written_state() {
        let issued = issue(KeyAlgorithm::EcdsaP256);
        let tmp = tempfile::tempdir().unwrap();
        let store = CertStore::new(tmp.path());
        fs::write(store.key_path(), issued.key.private_key_pem().as_bytes()).unwrap();
        let e = load_error(&store, &issued.roots, SystemTime::now());
        assert!(matches!(e, LoadError::Incomplete { .. }), "{e:?}");
        assert!(e.to_string().ends_with("cert-chain.pem does not"), "{e}");
        fs::remove_file(store.key_path()).unwrap();
        fs::write(store.cert_chain_path(), issued.cert.chain_pem()).unwrap();
        let e = load_error(&store, &issued.roots, SystemTime::now());
        assert!(e.to_string().ends_with("key.pem does not"), "{e}");
    }

    #[test]
    fn missing_or_bad_root_file_falls_back_to_the_onboarding_roots() {
        let issued = issue(KeyAlgorithm::EcdsaP256);
        let tmp = tempfile::tempdir().unwrap();
        let store = CertStore::new(tmp.path());
        store.save(&issued.key, &issued.cert).unwrap();
        fs::write(store.root_cert_path(), "garbage").unwrap();
        let (_, cert) = store
            .load(SystemTime::now(), ID, &issued.roots)
            .unwrap()
            .unwrap();
        assert_eq!(cert.root_pem(), issued.roots.pem());
        fs::remove_file(store.root_cert_path()).unwrap();
        let (_, cert) = store
            .load(SystemTime::now(), ID, &issued.roots)
            .unwrap()
            .unwrap();
        assert_eq!(cert.root_pem(), issued.roots.pem());
    }
}
