//! Fetched modules on disk, by digest (Istio's pkg/wasm/cache.go, kept
//! across restarts).
//!
//! Layout under the cache directory:
//! - `<sha256 of registry/repo>/<digest hex>.wasm`: the module, written
//!   atomically (0600), only after every check passed;
//! - `<…>/<digest hex>.json`: what it is (URL, digest, the module's own
//!   sha256 and size), checked again before a cached module is handed out;
//! - `<…>/tags.json`: the digest each tag last resolved to, so a tag can be
//!   served from the cache while the registry is unreachable.
//!
//! A module's modification time is its last use: unused for longer than the
//! expiry it is removed, and when the cache outgrows its size limit the
//! least recently used modules go first.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::image::{self, FetchOptions, Source};
use super::{Sha256, WasmError, check_module};
use crate::identity::write_atomic;

/// Istio's `ISTIO_META_WASM_IMAGE_PULL_POLICY` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// `IfNotPresent`, except for `:latest`, which is `Always`.
    #[default]
    Unspecified,
    /// Use a cached module when there is one.
    IfNotPresent,
    /// Ask the registry again whenever the resource version changes.
    Always,
}

impl PullPolicy {
    /// The environment value's policy (unknown values: unspecified, as
    /// Istio).
    pub fn from_env(value: &str) -> Self {
        match value {
            "IfNotPresent" => Self::IfNotPresent,
            "Always" => Self::Always,
            _ => Self::Unspecified,
        }
    }
}

/// What to fetch.
#[derive(Clone, Default)]
pub struct ModuleRequest {
    /// A WasmPlugin's `url`.
    pub url: String,
    /// Its `sha256`: the manifest digest for an image, the file's for
    /// http(s).
    pub checksum: Option<Sha256>,
    pub pull_policy: PullPolicy,
    /// The ECDS resource asking, and its WasmPlugin's resource version
    /// (`Always` re-pulls when it changes).
    pub resource_name: String,
    pub resource_version: String,
    /// A `kubernetes.io/dockerconfigjson` document with registry
    /// credentials.
    pub pull_secret: Option<Vec<u8>>,
    /// How long the fetch may take (the source's `http_uri.timeout`).
    pub timeout: Option<Duration>,
}

/// Never prints the pull secret.
impl std::fmt::Debug for ModuleRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleRequest")
            .field("url", &self.url)
            .field("checksum", &self.checksum)
            .field("pull_policy", &self.pull_policy)
            .field("resource_name", &self.resource_name)
            .field("resource_version", &self.resource_version)
            .field(
                "pull_secret",
                &self.pull_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Cache settings (Istio's names in brackets).
#[derive(Debug, Clone)]
pub struct CacheOptions {
    pub dir: PathBuf,
    /// Unused modules are removed after this long (`WASM_MODULE_EXPIRY`,
    /// 24 h).
    pub expiry: Duration,
    /// How often expired modules are looked for (`WASM_PURGE_INTERVAL`,
    /// 1 h).
    pub purge_interval: Duration,
    /// The most the cache keeps on disk; least recently used modules go
    /// first.
    pub max_total_bytes: u64,
    /// Registries spoken to over plain HTTP (`WASM_INSECURE_REGISTRIES`).
    pub insecure_registries: Vec<String>,
    /// The largest module fetched (`ISTIO_WASM_MAX_BINARY_SIZE_BYTES`).
    pub max_module_bytes: u64,
    /// A fetch without its own timeout (`WASM_HTTP_REQUEST_TIMEOUT`, 15 s).
    pub timeout: Duration,
    /// Attempts when the registry is unreachable, 1 s apart.
    pub attempts: u32,
}

impl CacheOptions {
    /// Istio's defaults, in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            expiry: Duration::from_secs(24 * 3600),
            purge_interval: Duration::from_secs(3600),
            max_total_bytes: 1 << 30,
            insecure_registries: Vec::new(),
            max_module_bytes: super::DEFAULT_MAX_MODULE_BYTES,
            timeout: Duration::from_secs(15),
            attempts: 3,
        }
    }

    /// Istio's environment settings over these (`WASM_MODULE_EXPIRY`,
    /// `WASM_PURGE_INTERVAL`, `WASM_INSECURE_REGISTRIES`,
    /// `WASM_HTTP_REQUEST_TIMEOUT`, `ISTIO_WASM_MAX_BINARY_SIZE_BYTES`).
    pub fn with_env(mut self, env: &BTreeMap<String, String>) -> Result<Self, String> {
        let duration = |key: &str| -> Result<Option<Duration>, String> {
            env.get(key)
                .map(|v| {
                    crate::config::duration::parse_go_duration(v)
                        .map_err(|e| format!("{key}={v}: {e}"))
                })
                .transpose()
        };
        if let Some(d) = duration("WASM_MODULE_EXPIRY")? {
            self.expiry = d;
        }
        if let Some(d) = duration("WASM_PURGE_INTERVAL")? {
            self.purge_interval = d;
        }
        if let Some(d) = duration("WASM_HTTP_REQUEST_TIMEOUT")? {
            self.timeout = d;
        }
        if let Some(v) = env.get("WASM_INSECURE_REGISTRIES") {
            self.insecure_registries = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
        }
        if let Some(v) = env.get("ISTIO_WASM_MAX_BINARY_SIZE_BYTES") {
            self.max_module_bytes = v
                .parse()
                .map_err(|_| format!("ISTIO_WASM_MAX_BINARY_SIZE_BYTES={v}: not a number"))?;
        }
        Ok(self)
    }
}

/// What the cache knows about a module it holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct ModuleRecord {
    url: String,
    digest: String,
    module_sha256: String,
    size: u64,
    variant: String,
}

/// The cache. One per agent; fetches are serialised, so the same module is
/// never fetched twice at once.
pub struct WasmCache {
    options: CacheOptions,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Per ECDS resource, the resource version last pulled for (`Always`).
    versions: HashMap<String, String>,
}

/// Where a module was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedModule {
    pub path: PathBuf,
    pub digest: Sha256,
    /// Fetched now, rather than found in the cache.
    pub fetched: bool,
}

impl WasmCache {
    pub fn new(options: CacheOptions) -> Self {
        Self {
            options,
            state: Mutex::new(State::default()),
        }
    }

    pub fn options(&self) -> &CacheOptions {
        &self.options
    }

    /// The module `request` names, from the cache or fetched (and then
    /// kept); a cached module stands in when the registry is unreachable.
    pub async fn get(&self, request: &ModuleRequest) -> Result<CachedModule, WasmError> {
        let source = Source::parse(&request.url)?;
        let url = source.url().to_string();
        let expected = match (request.checksum, source.pinned()) {
            (Some(a), Some(b)) if a != b => {
                return Err(WasmError::DigestMismatch {
                    url,
                    what: "the reference's digest",
                    expected: a,
                    actual: b,
                });
            }
            (a, b) => a.or(b),
        };
        let dir = self.module_dir(&source);
        let tag = source.tag();
        let policy = match request.pull_policy {
            PullPolicy::Unspecified if expected.is_none() && tag.as_deref() == Some("latest") => {
                PullPolicy::Always
            }
            PullPolicy::Unspecified => PullPolicy::IfNotPresent,
            p => p,
        };
        let mut state = self.state.lock().await;
        let seen = state.versions.get(&request.resource_name);
        let pull = policy == PullPolicy::Always
            && (request.resource_name.is_empty() || seen != Some(&request.resource_version));
        // What the cache would answer with, if anything.
        let cached_digest = match expected {
            Some(d) => Some(d),
            None => self.tag_digest(&dir, tag.as_deref()),
        };
        let cached = match cached_digest {
            Some(d) => {
                // Reading and hashing a module (up to the size limit) is
                // blocking work.
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || Self::lookup(&dir, d))
                    .await
                    .expect("the cache lookup does not panic")?
            }
            None => None,
        };
        if !pull && let Some(module) = cached.clone() {
            tracing::debug!(url = %url, digest = %module.digest, "Wasm module from the cache");
            return Ok(module);
        }
        let auth = registry_auth(&source, request.pull_secret.as_deref())?;
        let fetch_options = FetchOptions {
            insecure_registries: self.options.insecure_registries.clone(),
            max_module_bytes: self.options.max_module_bytes,
            timeout: request.timeout.unwrap_or(self.options.timeout),
        };
        let mut attempt = 1;
        let fetched = loop {
            match image::fetch(&source, expected, &auth, &fetch_options).await {
                Err(e) if e.is_unavailable() && attempt < self.options.attempts.max(1) => {
                    tracing::info!(url = %url, attempt, error = %e, "Wasm module fetch failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                other => break other,
            }
        };
        let mut fetched = match fetched {
            Ok(fetched) => fetched,
            Err(e) if e.is_unavailable() => {
                let Some(module) = cached else { return Err(e) };
                tracing::warn!(
                    url = %url,
                    digest = %module.digest,
                    error = %e,
                    "registry unreachable; using the cached Wasm module"
                );
                return Ok(module);
            }
            Err(e) => return Err(e),
        };
        let record = ModuleRecord {
            url: url.clone(),
            digest: fetched.digest.to_string(),
            module_sha256: Sha256::of(&fetched.module).to_string(),
            size: fetched.module.len() as u64,
            variant: fetched.variant.to_string(),
        };
        let path = {
            let (dir, digest) = (dir.clone(), fetched.digest);
            let (module, record) = (std::mem::take(&mut fetched.module), record.clone());
            tokio::task::spawn_blocking(move || Self::store(&dir, digest, &module, &record))
                .await
                .expect("the cache store does not panic")?
        };
        if let Some(tag) = &tag {
            self.set_tag(&dir, tag, fetched.digest)?;
        }
        if !request.resource_name.is_empty() {
            state.versions.insert(
                request.resource_name.clone(),
                request.resource_version.clone(),
            );
        }
        drop(state);
        tracing::info!(
            url = %url,
            digest = %fetched.digest,
            variant = fetched.variant,
            bytes = record.size,
            "Wasm module fetched"
        );
        self.enforce_size_limit(Some(&path));
        Ok(CachedModule {
            path,
            digest: fetched.digest,
            fetched: true,
        })
    }

    fn module_dir(&self, source: &Source) -> PathBuf {
        self.options
            .dir
            .join(Sha256::of(source.repository().as_bytes()).hex())
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WasmError + '_ {
        move |error| WasmError::Cache {
            path: path.to_path_buf(),
            error,
        }
    }

    /// A cached module that still is what its record says; a damaged one is
    /// removed (and fetched again).
    fn lookup(dir: &Path, digest: Sha256) -> Result<Option<CachedModule>, WasmError> {
        let path = dir.join(format!("{}.wasm", digest.hex()));
        let record_path = dir.join(format!("{}.json", digest.hex()));
        let (Ok(module), Ok(record)) = (std::fs::read(&path), std::fs::read(&record_path)) else {
            return Ok(None);
        };
        let intact = serde_json::from_slice::<ModuleRecord>(&record)
            .ok()
            .filter(|r| {
                r.digest == digest.to_string()
                    && r.size == module.len() as u64
                    && r.module_sha256 == Sha256::of(&module).to_string()
            })
            .is_some()
            && check_module(&path.display().to_string(), &module, u64::MAX).is_ok();
        if !intact {
            tracing::warn!(path = %path.display(), "cached Wasm module damaged; removing it");
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(&record_path);
            return Ok(None);
        }
        // Its last use, for expiry.
        if let Ok(file) = std::fs::File::options().append(true).open(&path) {
            let _ = file.set_modified(SystemTime::now());
        }
        Ok(Some(CachedModule {
            path,
            digest,
            fetched: false,
        }))
    }

    fn store(
        dir: &Path,
        digest: Sha256,
        module: &[u8],
        record: &ModuleRecord,
    ) -> Result<PathBuf, WasmError> {
        std::fs::create_dir_all(dir).map_err(Self::io(dir))?;
        let path = dir.join(format!("{}.wasm", digest.hex()));
        let record_path = dir.join(format!("{}.json", digest.hex()));
        let json = serde_json::to_vec_pretty(record).expect("a record serialises");
        // The record first: a module without one is never handed out.
        write_atomic(&record_path, &json).map_err(|e| WasmError::Cache {
            path: record_path.clone(),
            error: e.error,
        })?;
        write_atomic(&path, module).map_err(|e| WasmError::Cache {
            path: path.clone(),
            error: e.error,
        })?;
        Ok(path)
    }

    fn tags(dir: &Path) -> BTreeMap<String, String> {
        std::fs::read(dir.join("tags.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn tag_digest(&self, dir: &Path, tag: Option<&str>) -> Option<Sha256> {
        let tags = Self::tags(dir);
        let digest = tags.get(tag.unwrap_or(""))?;
        Sha256::parse(digest).ok()
    }

    fn set_tag(&self, dir: &Path, tag: &str, digest: Sha256) -> Result<(), WasmError> {
        let mut tags = Self::tags(dir);
        if tags.get(tag) == Some(&digest.to_string()) {
            return Ok(());
        }
        tags.insert(tag.to_string(), digest.to_string());
        let path = dir.join("tags.json");
        let json = serde_json::to_vec_pretty(&tags).expect("tags serialise");
        write_atomic(&path, &json).map_err(|e| WasmError::Cache {
            path: path.clone(),
            error: e.error,
        })
    }

    /// Every cached module with its size and last use.
    fn modules(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let mut out = Vec::new();
        let Ok(dirs) = std::fs::read_dir(&self.options.dir) else {
            return out;
        };
        for dir in dirs.flatten() {
            let Ok(files) = std::fs::read_dir(dir.path()) else {
                continue;
            };
            for file in files.flatten() {
                let path = file.path();
                if path.extension().and_then(|e| e.to_str()) != Some("wasm") {
                    continue;
                }
                if let Ok(meta) = file.metadata() {
                    let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    out.push((path, meta.len(), used));
                }
            }
        }
        out
    }

    fn remove_module(path: &Path) {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(path.with_extension("json"));
        if let Some(dir) = path.parent() {
            let only_tags = std::fs::read_dir(dir)
                .map(|d| d.flatten().all(|e| e.file_name() == "tags.json"))
                .unwrap_or(false);
            if only_tags {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// Removes modules unused for longer than the expiry; returns how many.
    pub fn purge_expired(&self) -> usize {
        let now = SystemTime::now();
        let mut removed = 0;
        for (path, _, used) in self.modules() {
            if now.duration_since(used).unwrap_or_default() > self.options.expiry {
                tracing::info!(path = %path.display(), "removing an expired Wasm module");
                Self::remove_module(&path);
                removed += 1;
            }
        }
        removed
    }

    /// Removes the least recently used modules (never `keep`) until the
    /// cache fits its size limit.
    fn enforce_size_limit(&self, keep: Option<&Path>) {
        let mut modules = self.modules();
        let mut total: u64 = modules.iter().map(|m| m.1).sum();
        modules.sort_by_key(|m| m.2);
        for (path, size, _) in modules {
            if total <= self.options.max_total_bytes {
                break;
            }
            if Some(path.as_path()) == keep {
                continue;
            }
            tracing::info!(path = %path.display(), "Wasm module cache over its size limit; removing the least recently used module");
            Self::remove_module(&path);
            total -= size;
        }
    }

    /// Purges expired modules every purge interval, for ever.
    pub async fn run_purge(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(self.options.purge_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let cache = self.clone();
            let _ = tokio::task::spawn_blocking(move || cache.purge_expired()).await;
        }
    }
}

/// Credentials for `source`'s registry from a docker config JSON (the
/// `auths` of a `kubernetes.io/dockerconfigjson` secret); anonymous
/// without one or without an entry for the registry.
fn registry_auth(source: &Source, secret: Option<&[u8]>) -> Result<RegistryAuth, WasmError> {
    let (Source::Oci { reference, .. }, Some(secret)) = (source, secret) else {
        return Ok(RegistryAuth::Anonymous);
    };
    #[derive(Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: BTreeMap<String, AuthEntry>,
    }
    #[derive(Deserialize)]
    struct AuthEntry {
        #[serde(default)]
        auth: Option<String>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<String>,
    }
    let bad = |reason: String| WasmError::PullSecret {
        url: source.url().to_string(),
        reason,
    };
    let config: DockerConfig = serde_json::from_slice(secret)
        .map_err(|e| bad(format!("not a docker config JSON document: {e}")))?;
    let registry = reference.resolve_registry();
    let entry = config.auths.iter().find(|(key, _)| {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        host == registry || host == reference.registry()
    });
    let Some((_, entry)) = entry else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let (Some(user), Some(password)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(user.clone(), password.clone()));
    }
    if let Some(auth) = &entry.auth {
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad("an `auth` entry is not base64".into()))?;
        let text =
            String::from_utf8(decoded).map_err(|_| bad("an `auth` entry is not UTF-8".into()))?;
        let (user, password) = text
            .split_once(':')
            .ok_or_else(|| bad("an `auth` entry is not `user:password`".into()))?;
        return Ok(RegistryAuth::Basic(user.into(), password.into()));
    }
    Ok(RegistryAuth::Anonymous)
}

/// Putting modules into a cache without a registry, for tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// Stores `module` for `url` (tagged with its tag, if any) under a
    /// made-up manifest digest, which it returns.
    pub(crate) fn seed(cache: &WasmCache, url: &str, module: &[u8]) -> Sha256 {
        let source = Source::parse(url).unwrap();
        let dir = cache.module_dir(&source);
        let digest = Sha256::of(url.as_bytes());
        let record = ModuleRecord {
            url: url.into(),
            digest: digest.to_string(),
            module_sha256: Sha256::of(module).to_string(),
            size: module.len() as u64,
            variant: "oci".into(),
        };
        WasmCache::store(&dir, digest, module, &record).unwrap();
        if let Some(tag) = source.tag() {
            cache.set_tag(&dir, &tag, digest).unwrap();
        }
        digest
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::seed as seed_module;
    use super::*;

    fn cache(dir: &Path) -> WasmCache {
        WasmCache::new(CacheOptions {
            attempts: 1,
            timeout: Duration::from_secs(2),
            ..CacheOptions::new(dir.to_path_buf())
        })
    }

    const MODULE: &[u8] = b"\0asm\x01\0\0\0 a module";

    fn seed(cache: &WasmCache, url: &str) -> (PathBuf, Sha256) {
        let digest = seed_module(cache, url, MODULE);
        let dir = cache.module_dir(&Source::parse(url).unwrap());
        (dir.join(format!("{}.wasm", digest.hex())), digest)
    }

    // Nothing listens on port 9 of 127.0.0.1: every fetch is "unavailable".
    const DOWN: &str = "oci://127.0.0.1:9/meshvm/filter";

    #[tokio::test]
    async fn cached_modules_are_served_without_the_registry() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = cache(tmp.path());
        let (path, digest) = seed(&cache, &format!("{DOWN}:v1"));
        // By tag (IfNotPresent), by checksum, by pinned digest.
        for request in [
            ModuleRequest {
                url: format!("{DOWN}:v1"),
                ..Default::default()
            },
            ModuleRequest {
                url: format!("{DOWN}:other"),
                checksum: Some(digest),
                ..Default::default()
            },
            ModuleRequest {
                url: format!("{DOWN}@{digest}"),
                ..Default::default()
            },
        ] {
            let got = cache.get(&request).await.unwrap();
            assert_eq!(
                (got.path.clone(), got.fetched),
                (path.clone(), false),
                "{request:?}"
            );
        }
        // Always: the registry is asked, it is down, the cache stands in.
        let got = cache
            .get(&ModuleRequest {
                url: format!("{DOWN}:v1"),
                pull_policy: PullPolicy::Always,
                resource_name: "ns.plugin".into(),
                resource_version: "1".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(got.path, path);
        // Unknown tag, registry down: the error says so.
        let e = cache
            .get(&ModuleRequest {
                url: format!("{DOWN}:v2"),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            e.is_unavailable() && e.to_string().contains("cannot fetch"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn damaged_modules_are_not_served() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = cache(tmp.path());
        let (path, digest) = seed(&cache, &format!("{DOWN}:v1"));
        std::fs::write(&path, b"\0asm\x01\0\0\0 tampered").unwrap();
        let e = cache
            .get(&ModuleRequest {
                url: format!("{DOWN}:v1"),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        assert!(!path.exists());
        let _ = digest;
    }

    #[tokio::test]
    async fn conflicting_digests_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = cache(tmp.path());
        let a = Sha256::of(b"a");
        let e = cache
            .get(&ModuleRequest {
                url: format!("{DOWN}@{a}"),
                checksum: Some(Sha256::of(b"b")),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("the reference's digest"), "{e}");
    }

    #[test]
    fn expiry_and_size_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cache = cache(tmp.path());
        let (old, _) = seed(&cache, "oci://r.example/a:1");
        let (new, _) = seed(&cache, "oci://r.example/b:1");
        let day_ago = SystemTime::now() - Duration::from_secs(25 * 3600);
        std::fs::File::options()
            .append(true)
            .open(&old)
            .unwrap()
            .set_modified(day_ago)
            .unwrap();
        assert_eq!(cache.purge_expired(), 1);
        assert!(!old.exists() && !old.with_extension("json").exists() && new.exists());
        let (third, _) = seed(&cache, "oci://r.example/c:1");
        cache.options.max_total_bytes = MODULE.len() as u64;
        cache.enforce_size_limit(Some(&third));
        assert!(!new.exists() && third.exists());
    }

    #[test]
    fn pull_secrets() {
        let source = Source::parse("oci://registry.example:5000/f:1").unwrap();
        let secret = br#"{"auths":{"registry.example:5000":{"auth":"dXNlcjpwYXNz"}}}"#;
        assert!(matches!(
            registry_auth(&source, Some(secret)).unwrap(),
            RegistryAuth::Basic(u, p) if u == "user" && p == "pass"
        ));
        let other = br#"{"auths":{"https://elsewhere.example":{"username":"a","password":"b"}}}"#;
        assert!(matches!(
            registry_auth(&source, Some(other)).unwrap(),
            RegistryAuth::Anonymous
        ));
        let e = registry_auth(&source, Some(b"{")).unwrap_err().to_string();
        assert!(
            e.contains("image pull secret: not a docker config JSON"),
            "{e}"
        );
        // The secret itself never appears in errors.
        let bad = br#"{"auths":{"registry.example:5000":{"auth":"c2VjcmV0"}}}"#;
        let e = registry_auth(&source, Some(bad)).unwrap_err().to_string();
        assert!(
            e.contains("not `user:password`") && !e.contains("c2VjcmV0"),
            "{e}"
        );
    }

    #[test]
    fn requests_never_print_their_pull_secret() {
        let request = ModuleRequest {
            url: "oci://r.example/f:1".into(),
            pull_secret: Some(br#"{"auths":{"r.example":{"auth":"c2VjcmV0OnB3"}}}"#.to_vec()),
            ..Default::default()
        };
        let printed = format!("{request:?}");
        assert!(
            printed.contains("<redacted>") && !printed.contains("c2VjcmV0"),
            "{printed}"
        );
    }

    #[test]
    fn istio_environment() {
        let env: BTreeMap<String, String> = [
            ("WASM_MODULE_EXPIRY", "2h"),
            ("WASM_INSECURE_REGISTRIES", "localhost:5000, 127.0.0.1:5000"),
            ("ISTIO_WASM_MAX_BINARY_SIZE_BYTES", "1024"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let o = CacheOptions::new("/x".into()).with_env(&env).unwrap();
        assert_eq!(o.expiry, Duration::from_secs(7200));
        assert_eq!(o.insecure_registries, ["localhost:5000", "127.0.0.1:5000"]);
        assert_eq!(o.max_module_bytes, 1024);
        let bad: BTreeMap<String, String> =
            [("WASM_PURGE_INTERVAL".to_string(), "soon".to_string())].into();
        let e = CacheOptions::new("/x".into()).with_env(&bad).unwrap_err();
        assert!(e.contains("WASM_PURGE_INTERVAL=soon"), "{e}");
    }
}
