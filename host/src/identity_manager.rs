//! Keeps the workload certificate current (reference §4.3), as Istio's
//! agent's secret cache does:
//!
//! 1. At start, reuse a stored certificate that is still good
//!    ([`CertStore::load_valid`]), else request one with the bootstrap token.
//! 2. Renew at [`IssuedCert::renew_at`] (≈ 50 % of the lifetime, jittered),
//!    authenticating with the current certificate over mTLS; the token is
//!    used only when there is no valid certificate.
//! 3. On failure, retry with capped exponential backoff and jitter, keeping
//!    the current certificate until it expires (then it is withdrawn).
//! 4. Each new certificate is verified ([`verify_issued`]), stored
//!    ([`CertStore::save`]) and published on a `watch` channel that the SDS
//!    server subscribes to.
//!
//! Every request uses a fresh key. Logs name failures, never key material or
//! the token.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::ca_client::{CaAuth, CaClient, CaClientError};
use crate::config::RootCerts;
use crate::identity::{
    CertStore, IdentityError, IssuedCert, KeyAlgorithm, KeyError, StoreError, WorkloadKey,
    random_jitter, verify_issued,
};

/// The current workload identity, as the SDS server serves it.
#[derive(Clone)]
pub struct WorkloadIdentity {
    /// The private key (its `Debug` shows only the algorithm).
    pub key: Arc<WorkloadKey>,
    /// The verified certificate chain (leaf first, root last).
    pub cert: IssuedCert,
}

impl WorkloadIdentity {
    /// The private key, PEM (PKCS#8), zeroed on drop: the `default` secret.
    pub fn private_key_pem(&self) -> Zeroizing<String> {
        self.key.private_key_pem()
    }

    /// `cert-chain.pem`: the `default` secret's chain.
    pub fn chain_pem(&self) -> &str {
        self.cert.chain_pem()
    }

    /// The CA's roots: the `ROOTCA` secret.
    pub fn roots_pem(&self) -> &str {
        self.cert.root_pem()
    }
}

impl std::fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("key", &self.key)
            .field("cert", &self.cert)
            .finish()
    }
}

/// What the watch channel carries: `None` until the first certificate, and
/// again if the current one expires before a renewal succeeds.
pub type CurrentIdentity = Option<Arc<WorkloadIdentity>>;

/// Retry delays after a failed request: `initial`, doubling up to `max`,
/// each moved by up to ± `jitter` of itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// A share in [0, 1].
    pub jitter: f64,
}

impl Default for Backoff {
    /// 1 s doubling to 5 min, ± 20 %.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay before retry `attempt` (1 = after the first failure),
    /// jittered by `jitter_draw` in [-1, 1], never above `max`.
    pub fn delay(&self, attempt: u32, jitter_draw: f64) -> Duration {
        let factor = 2f64.powi(attempt.saturating_sub(1).min(62) as i32);
        let base = self.initial.as_secs_f64() * factor;
        let base = base.min(self.max.as_secs_f64());
        let j = self.jitter.clamp(0.0, 1.0) * jitter_draw.clamp(-1.0, 1.0);
        let secs = (base * (1.0 + j)).clamp(0.0, self.max.as_secs_f64());
        Duration::from_secs_f64(secs)
    }
}

/// What the manager needs.
#[derive(Debug, Clone)]
pub struct IdentityOptions {
    /// `spiffe://<td>/ns/<ns>/sa/<sa>` ([`crate::config::Config::spiffe_id`]).
    pub spiffe_id: String,
    pub key_algorithm: KeyAlgorithm,
    /// The bootstrap token file (re-read at each request).
    pub token_path: PathBuf,
    /// The onboarding roots: every certificate must verify to one of them.
    pub roots: RootCerts,
    pub store: CertStore,
    /// The lifetime requested (`SECRET_TTL`).
    pub ttl: Duration,
    pub backoff: Backoff,
    /// The least time between a new certificate and its renewal (guards
    /// against a CA whose backdated `notBefore` puts the half-life in the
    /// past, which would otherwise renew in a tight loop).
    pub min_renew_delay: Duration,
}

impl IdentityOptions {
    /// Defaults for `config`: ECDSA P-256, `SECRET_TTL`, 1 s → 5 min backoff, the
    /// certificates in `store`.
    pub fn from_config(config: &crate::config::Config, store: CertStore) -> Self {
        Self {
            spiffe_id: config.spiffe_id(),
            key_algorithm: KeyAlgorithm::EcdsaP256,
            token_path: config.token_path.clone(),
            roots: config.root_certs.clone(),
            store,
            ttl: config.secret_ttl,
            backoff: Backoff::default(),
            min_renew_delay: Duration::from_secs(1),
        }
    }
}

/// Why one attempt to obtain a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("key generation: {0}")]
    Key(#[from] KeyError),
    #[error(transparent)]
    Ca(#[from] CaClientError),
    #[error("the CA's answer was rejected: {0}")]
    Rejected(#[from] IdentityError),
    #[error("key generation task failed: {0}")]
    Join(String),
}

/// The running manager. Dropping it stops the task.
#[derive(Debug)]
pub struct IdentityManager {
    current: watch::Receiver<CurrentIdentity>,
    task: JoinHandle<()>,
}

impl Drop for IdentityManager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl IdentityManager {
    /// Starts the manager on the current tokio runtime.
    pub fn start(client: CaClient, options: IdentityOptions) -> Self {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(run(client, options, tx));
        Self { current: rx, task }
    }

    /// A receiver of the current identity (for the SDS server).
    pub fn subscribe(&self) -> watch::Receiver<CurrentIdentity> {
        self.current.clone()
    }

    /// The current identity, if any.
    pub fn current(&self) -> CurrentIdentity {
        self.current.borrow().clone()
    }

    /// Waits until an identity is available.
    pub async fn ready(&self) -> Arc<WorkloadIdentity> {
        let mut rx = self.current.clone();
        let current = rx
            .wait_for(Option::is_some)
            .await
            .expect("the manager task holds the sender while running");
        current.clone().expect("checked")
    }

    /// Stops the task.
    pub async fn stop(self) {
        self.task.abort();
    }
}

async fn run(client: CaClient, options: IdentityOptions, tx: watch::Sender<CurrentIdentity>) {
    let mut current: Option<Arc<WorkloadIdentity>> = options
        .store
        .load_valid(SystemTime::now(), &options.spiffe_id, &options.roots)
        .map(|(key, cert)| {
            Arc::new(WorkloadIdentity {
                key: Arc::new(key),
                cert,
            })
        });
    if let Some(identity) = &current {
        tx.send_replace(Some(identity.clone()));
    }
    let mut failures: u32 = 0;
    let mut next = match &current {
        Some(identity) => identity.cert.renew_at(random_jitter()),
        None => SystemTime::now(),
    };
    loop {
        // Sleep until `next`, withdrawing the certificate if it expires first.
        loop {
            let now = SystemTime::now();
            let expiry = current.as_ref().map(|c| c.cert.not_after());
            if let Some(expiry) = expiry
                && expiry <= now
            {
                tracing::warn!(
                    identity = %options.spiffe_id,
                    "the workload certificate expired before it could be renewed; withdrawing it"
                );
                current = None;
                tx.send_replace(None);
                continue;
            }
            let target = match expiry {
                Some(expiry) if expiry < next => expiry,
                _ => next,
            };
            match target.duration_since(now) {
                Ok(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
                _ => {}
            }
            if SystemTime::now() >= next {
                break;
            }
        }

        let renewing = current.is_some();
        match attempt(&client, &options, current.as_deref()).await {
            Ok(identity) => {
                failures = 0;
                if let Err(error) = options.store.save(&identity.key, &identity.cert) {
                    log_store_error(&error);
                }
                tracing::info!(
                    identity = identity.cert.spiffe_id(),
                    renewal = renewing,
                    cert = ?identity.cert,
                    "obtained a workload certificate"
                );
                let renew = identity.cert.renew_at(random_jitter());
                let earliest = SystemTime::now() + options.min_renew_delay;
                next = renew.max(earliest);
                let identity = Arc::new(identity);
                current = Some(identity.clone());
                tx.send_replace(Some(identity));
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let delay = options.backoff.delay(failures, random_jitter());
                let retryable = !matches!(&error, AttemptError::Ca(e) if !e.is_retryable());
                tracing::warn!(
                    %error,
                    identity = %options.spiffe_id,
                    attempt = failures,
                    renewal = renewing,
                    retry_in_ms = delay.as_millis() as u64,
                    retryable,
                    "could not obtain a workload certificate; keeping the current one, if any"
                );
                next = SystemTime::now() + delay;
            }
        }
    }
}

fn log_store_error(error: &StoreError) {
    tracing::warn!(%error, "could not store the workload certificate; serving it anyway");
}

/// One request: fresh key, CSR, `CreateCertificate` (mTLS with `current` if
/// it is still valid, else the token), verification.
async fn attempt(
    client: &CaClient,
    options: &IdentityOptions,
    current: Option<&WorkloadIdentity>,
) -> Result<WorkloadIdentity, AttemptError> {
    let algorithm = options.key_algorithm;
    let spiffe_id = options.spiffe_id.clone();
    // RSA generation takes a while: keep it off the runtime's threads.
    let (key, csr) = tokio::task::spawn_blocking(move || {
        let key = WorkloadKey::generate(algorithm)?;
        let csr = key.csr_pem(&spiffe_id)?;
        Ok::<_, KeyError>((key, csr))
    })
    .await
    .map_err(|e| AttemptError::Join(e.to_string()))??;
    let now = SystemTime::now();
    let auth = match current {
        Some(c) if c.cert.not_after() > now => CaAuth::ClientCert(&c.key, &c.cert),
        _ => CaAuth::Token(&options.token_path),
    };
    let chain = client.create_certificate(&csr, options.ttl, auth).await?;
    let cert = verify_issued(
        &chain,
        &key,
        &options.spiffe_id,
        &options.roots,
        SystemTime::now(),
    )?;
    Ok(WorkloadIdentity {
        key: Arc::new(key),
        cert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            jitter: 0.2,
        };
        assert_eq!(b.delay(1, 0.0), Duration::from_secs(1));
        assert_eq!(b.delay(2, 0.0), Duration::from_secs(2));
        assert_eq!(b.delay(4, 0.0), Duration::from_secs(8));
        assert_eq!(b.delay(20, 0.0), Duration::from_secs(300));
        assert_eq!(b.delay(u32::MAX, 1.0), Duration::from_secs(300));
        assert_eq!(b.delay(1, 1.0), Duration::from_secs_f64(1.2));
        assert_eq!(b.delay(1, -1.0), Duration::from_secs_f64(0.8));
    }
}
