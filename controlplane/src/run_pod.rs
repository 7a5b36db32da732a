//! `meshvm-controlplane run-pod`: plays a Pod of the config directory on
//! this host, as the Kubernetes side of a local mesh. A Pod's sidecar in
//! Istio is the same agent and Envoy as a VM's, talking to istiod directly,
//! so the Pod gets:
//!
//! - onboarding files as for a VM, from the Pod instead of a WorkloadGroup
//!   (namespace, service account, labels; its IP as the instance IP; no
//!   auto-registration: a Pod is an endpoint by being in the config);
//! - its app: the echo app on `<app address>:<containerPort>` for every
//!   container port, named after the Pod;
//! - `meshvm-agent run` for it (certificate from this control plane's CA,
//!   SDS, xDS, Envoy), with the Pod's name and its app and outbound
//!   addresses in the node metadata.
//!
//! It runs until SIGTERM or SIGINT, then stops the agent (which drains and
//! stops Envoy) and exits; if the agent exits first, so does it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};

use anyhow::{Context, bail};

use crate::ca::MeshCa;
use crate::config::workload_group::{EntryMeta, WorkloadGroupSpec};
use crate::config::{Pod, WorkloadEntrySpec, WorkloadGroup, load_dir};
use crate::echo::EchoApp;
use crate::mesh::vip::OUTBOUND_ADDRESSES_METADATA;
use crate::onboard::{self, OnboardOptions};
use crate::xds::envoy::APP_ADDRESS_METADATA;

/// What `run-pod` needs besides the Pod's name.
#[derive(Debug, Clone)]
pub struct RunPodOptions {
    pub name: String,
    pub namespace: String,
    pub config_dir: PathBuf,
    /// Onboarding files, certificates, Envoy's files.
    pub work_dir: PathBuf,
    /// `host:port` of this control plane.
    pub discovery_address: String,
    /// Where the Pod's app listens (Envoy forwards inbound requests there).
    pub app_address: IpAddr,
    /// The Pod's outbound loopback block (`127.x.0.0/16`), if not the default.
    pub outbound_addresses: Option<String>,
    /// The `meshvm-agent` binary.
    pub agent: PathBuf,
    /// More arguments for `meshvm-agent run` (ports, `--envoy`, ...).
    pub agent_args: Vec<String>,
}

/// The Pod `name` in `namespace` of the config directory.
pub fn find_pod(config_dir: &Path, namespace: &str, name: &str) -> anyhow::Result<Pod> {
    let snapshot = load_dir(config_dir)
        .with_context(|| format!("reading the config directory {}", config_dir.display()))?;
    for error in &snapshot.errors {
        tracing::warn!(%error, "config directory");
    }
    let pod = snapshot
        .pods
        .values()
        .find(|p| p.metadata.name == name && p.metadata.namespace() == namespace)
        .cloned();
    match pod {
        Some(pod) => Ok(pod),
        None => bail!(
            "no Pod {namespace}/{name} in {} (Pods there: {})",
            config_dir.display(),
            snapshot
                .pods
                .values()
                .map(|p| format!("{}/{}", p.metadata.namespace(), p.metadata.name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The WorkloadGroup-shaped template onboarding renders a Pod's files from.
fn group_of(pod: &Pod) -> WorkloadGroup {
    let mut metadata = pod.metadata.clone();
    metadata.namespace = Some(pod.metadata.namespace().to_string());
    WorkloadGroup {
        api_version: "networking.istio.io/v1".into(),
        kind: crate::config::workload_group::KIND.into(),
        metadata,
        spec: WorkloadGroupSpec {
            metadata: EntryMeta {
                labels: pod.metadata.labels.clone(),
                annotations: Default::default(),
            },
            template: WorkloadEntrySpec {
                ports: pod
                    .named_ports()
                    .into_iter()
                    .map(|(name, port)| (name, u32::from(port)))
                    .collect(),
                service_account: pod.service_account().to_string(),
                ..Default::default()
            },
            probe: None,
        },
    }
}

/// Writes the Pod's onboarding files into `dir`.
pub fn onboard_pod(
    pod: &Pod,
    ca: &MeshCa,
    discovery_address: &str,
    dir: &Path,
) -> anyhow::Result<IpAddr> {
    let ip = pod
        .ip()
        .with_context(|| format!("Pod {} has no status.podIP", pod.metadata.name))?;
    let options = OnboardOptions {
        discovery_address: Some(discovery_address.to_string()),
        internal_ip: Some(ip),
        autoregister: false,
        capture_dns: false,
        ..OnboardOptions::default()
    };
    let files = onboard::render(&group_of(pod), &options, ca)?;
    files.write_to(dir)?;
    Ok(ip)
}

/// A running Pod: its apps and its agent.
pub struct RunningPod {
    pub apps: Vec<EchoApp>,
    agent: Child,
}

impl RunningPod {
    /// Onboards the Pod, starts its apps and its agent.
    pub fn start(ca: &MeshCa, options: &RunPodOptions) -> anyhow::Result<RunningPod> {
        let pod = find_pod(&options.config_dir, &options.namespace, &options.name)?;
        let onboarding = options.work_dir.join("onboarding");
        let ip = onboard_pod(&pod, ca, &options.discovery_address, &onboarding)?;
        let mut apps = Vec::new();
        for (port_name, port) in pod.named_ports() {
            let addr = SocketAddr::new(options.app_address, port);
            let app = EchoApp::spawn(&addr.to_string(), &pod.metadata.name)
                .with_context(|| format!("starting the app for port {port_name}"))?;
            tracing::info!(%addr, port = %port_name, "Pod app listening");
            apps.push(app);
        }
        let mut command = Command::new(&options.agent);
        command
            .arg("--onboarding-dir")
            .arg(&onboarding)
            .arg("run")
            .arg("--state-dir")
            .arg(options.work_dir.join("certs"))
            .arg("--run-dir")
            .arg(options.work_dir.join("run"))
            .arg("--sds-socket")
            .arg(options.work_dir.join("run/sds.sock"))
            .args(&options.agent_args)
            .env("POD_NAME", &pod.metadata.name)
            .env(
                format!("ISTIO_META_{APP_ADDRESS_METADATA}"),
                options.app_address.to_string(),
            );
        if let Some(block) = &options.outbound_addresses {
            command.env(format!("ISTIO_META_{OUTBOUND_ADDRESSES_METADATA}"), block);
        }
        // The agent (and through it Envoy) never outlives run-pod, however
        // run-pod ends: SIGTERM lets it drain Envoy.
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let agent = command
            .spawn()
            .with_context(|| format!("starting {}", options.agent.display()))?;
        tracing::info!(
            pod = %pod.metadata.name,
            namespace = %pod.metadata.namespace(),
            %ip,
            agent_pid = agent.id(),
            "Pod started"
        );
        Ok(RunningPod { apps, agent })
    }

    /// Whether the agent has exited (and how).
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.agent.try_wait()
    }

    /// Stops the agent with SIGTERM (it drains Envoy) and waits for it.
    pub fn stop(mut self) -> std::io::Result<ExitStatus> {
        // SAFETY: kill(2) with a pid we own and a valid signal.
        unsafe {
            libc::kill(self.agent.id() as libc::pid_t, libc::SIGTERM);
        }
        self.agent.wait()
    }
}

/// The `meshvm-agent` next to this binary (as built and as packaged), else
/// the one on PATH.
pub fn default_agent() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("meshvm-agent")))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("meshvm-agent"))
}
