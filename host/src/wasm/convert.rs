//! Rewriting remote Wasm code to the cached file before Envoy sees it
//! (Istio's pkg/wasm/convert.go): istiod sends a WasmPlugin as an ECDS
//! `TypedExtensionConfig` whose Wasm `vm_config.code` is
//! `remote.http_uri` (`oci://…`, with `sha256`) and whose VM environment
//! carries the pull settings (`ISTIO_META_WASM_*`). The agent fetches the
//! module, points `code` at `local.filename`, and drops the `ISTIO_META_`
//! variables, which are for the agent and must not reach the module. Wasm
//! filters inline in listeners (LDS) are rewritten the same way.
//!
//! Only resources with remote Wasm code are decoded and re-encoded; every
//! other resource passes through byte for byte.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, TypedExtensionConfig, async_data_source, data_source,
};
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm as HttpWasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::wasm::v3::Wasm as NetworkWasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{PluginConfig, plugin_config};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use super::cache::{ModuleRequest, PullPolicy, WasmCache};
use super::{Sha256, WasmError};

pub const EXTENSION_CONFIG_TYPE_URL: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
pub const LISTENER_TYPE_URL: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const WASM_HTTP_FILTER_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
pub const WASM_NETWORK_FILTER_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm";
const HCM_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// istiod's VM environment keys for the agent (model.WasmSecretEnv, …).
pub const PULL_SECRET_ENV: &str = "ISTIO_META_WASM_IMAGE_PULL_SECRET";
pub const PULL_POLICY_ENV: &str = "ISTIO_META_WASM_IMAGE_PULL_POLICY";
pub const RESOURCE_VERSION_ENV: &str = "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION";
const AGENT_ENV_PREFIX: &str = "ISTIO_META_";

/// Why a response could not be rewritten (the agent NACKs it; Envoy keeps
/// what it has).
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{kind} `{resource}`: cannot decode it: {error}")]
    Decode {
        kind: &'static str,
        resource: String,
        error: prost::DecodeError,
    },
    #[error("Wasm filter `{filter}` of `{resource}`: {error}")]
    Module {
        resource: String,
        filter: String,
        error: WasmError,
    },
    #[error("Wasm filter `{filter}` of `{resource}`: {reason}")]
    Config {
        resource: String,
        filter: String,
        reason: String,
    },
}

/// Rewrites ECDS and LDS responses' remote Wasm code to cached files.
pub struct WasmRewriter {
    cache: Arc<WasmCache>,
}

impl std::fmt::Debug for WasmRewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRewriter")
            .field("cache", &self.cache.options().dir)
            .finish()
    }
}

impl WasmRewriter {
    pub fn new(cache: Arc<WasmCache>) -> Self {
        Self { cache }
    }

    /// Whether responses of `type_url` may carry Wasm filters.
    pub fn handles(type_url: &str) -> bool {
        type_url == EXTENSION_CONFIG_TYPE_URL || type_url == LISTENER_TYPE_URL
    }

    /// Rewrites every remote Wasm source in `resources` (all of
    /// `type_url`); returns how many filters now load a cached file. On an
    /// error nothing should be forwarded.
    pub async fn rewrite(
        &self,
        type_url: &str,
        resources: Vec<&mut Any>,
    ) -> Result<usize, ConvertError> {
        let mut rewritten = 0;
        for resource in resources {
            if !mentions_wasm(&resource.value) {
                continue;
            }
            rewritten += match type_url {
                EXTENSION_CONFIG_TYPE_URL => self.rewrite_extension_config(resource).await?,
                LISTENER_TYPE_URL => self.rewrite_listener(resource).await?,
                _ => 0,
            };
        }
        Ok(rewritten)
    }

    async fn rewrite_extension_config(&self, resource: &mut Any) -> Result<usize, ConvertError> {
        let mut config =
            TypedExtensionConfig::decode(resource.value.as_slice()).map_err(|error| {
                ConvertError::Decode {
                    kind: "extension config",
                    resource: String::new(),
                    error,
                }
            })?;
        let name = config.name.clone();
        let Some(typed) = config.typed_config.as_mut() else {
            return Ok(0);
        };
        if !self.rewrite_typed(&name, &name, typed).await? {
            return Ok(0);
        }
        resource.value = config.encode_to_vec();
        Ok(1)
    }

    async fn rewrite_listener(&self, resource: &mut Any) -> Result<usize, ConvertError> {
        let mut listener =
            Listener::decode(resource.value.as_slice()).map_err(|error| ConvertError::Decode {
                kind: "listener",
                resource: String::new(),
                error,
            })?;
        let name = listener.name.clone();
        let mut rewritten = 0;
        let chains = listener
            .filter_chains
            .iter_mut()
            .chain(listener.default_filter_chain.as_mut());
        for chain in chains {
            for network_filter in &mut chain.filters {
                let Some(filter::ConfigType::TypedConfig(typed)) =
                    network_filter.config_type.as_mut()
                else {
                    continue;
                };
                if typed.type_url == HCM_TYPE_URL {
                    if !mentions_wasm(&typed.value) {
                        continue;
                    }
                    let mut manager = HttpConnectionManager::decode(typed.value.as_slice())
                        .map_err(|error| ConvertError::Decode {
                            kind: "listener",
                            resource: name.clone(),
                            error,
                        })?;
                    let mut changed = false;
                    for http in &mut manager.http_filters {
                        if let Some(http_filter::ConfigType::TypedConfig(t)) =
                            http.config_type.as_mut()
                            && self.rewrite_typed(&name, &http.name, t).await?
                        {
                            changed = true;
                            rewritten += 1;
                        }
                    }
                    if changed {
                        typed.value = manager.encode_to_vec();
                    }
                } else if self
                    .rewrite_typed(&name, &network_filter.name, typed)
                    .await?
                {
                    rewritten += 1;
                }
            }
        }
        if rewritten > 0 {
            resource.value = listener.encode_to_vec();
        }
        Ok(rewritten)
    }

    /// Rewrites `typed` if it is a Wasm filter (HTTP or network) with remote
    /// code; `false` if there was nothing to do.
    async fn rewrite_typed(
        &self,
        resource: &str,
        filter: &str,
        typed: &mut Any,
    ) -> Result<bool, ConvertError> {
        match typed.type_url.as_str() {
            WASM_HTTP_FILTER_TYPE_URL => {
                self.rewrite_wasm::<HttpWasm>(resource, filter, typed).await
            }
            WASM_NETWORK_FILTER_TYPE_URL => {
                self.rewrite_wasm::<NetworkWasm>(resource, filter, typed)
                    .await
            }
            _ => Ok(false),
        }
    }

    async fn rewrite_wasm<W: WasmFilter>(
        &self,
        resource: &str,
        filter: &str,
        typed: &mut Any,
    ) -> Result<bool, ConvertError> {
        let mut wasm = W::decode(typed.value.as_slice()).map_err(|error| ConvertError::Decode {
            kind: "Wasm filter",
            resource: format!("{resource}/{filter}"),
            error,
        })?;
        let Some(config) = wasm.plugin_config() else {
            return Ok(false);
        };
        if !self.rewrite_plugin(resource, filter, config).await? {
            return Ok(false);
        }
        typed.value = wasm.encode_to_vec();
        Ok(true)
    }

    /// Fetches the plugin's remote module and points its code at the file.
    async fn rewrite_plugin(
        &self,
        resource: &str,
        filter: &str,
        config: &mut PluginConfig,
    ) -> Result<bool, ConvertError> {
        let Some(plugin_config::Vm::VmConfig(vm)) = config.vm.as_mut() else {
            return Ok(false);
        };
        let Some(async_data_source::Specifier::Remote(remote)) =
            vm.code.as_ref().and_then(|c| c.specifier.as_ref())
        else {
            return Ok(false);
        };
        let config_error = |reason: String| ConvertError::Config {
            resource: resource.to_string(),
            filter: filter.to_string(),
            reason,
        };
        let Some(http_uri) = remote.http_uri.as_ref() else {
            return Err(config_error("remote code without an http_uri".into()));
        };
        // istiod sends "nil" when the WasmPlugin has no sha256.
        let checksum = match remote.sha256.as_str() {
            "" | "nil" => None,
            text => Some(Sha256::parse(text).map_err(|e| config_error(format!("sha256: {e}")))?),
        };
        let mut request = ModuleRequest {
            url: http_uri.uri.clone(),
            checksum,
            resource_name: resource.to_string(),
            timeout: http_uri
                .timeout
                .as_ref()
                .filter(|t| t.seconds >= 0 && t.nanos >= 0)
                .map(|t| Duration::new(t.seconds as u64, t.nanos as u32))
                .filter(|t| !t.is_zero()),
            ..Default::default()
        };
        if let Some(env) = vm.environment_variables.as_mut() {
            if let Some(secret) = env.key_values.get(PULL_SECRET_ENV) {
                if secret.is_empty() {
                    return Err(config_error("missing image pull secret".into()));
                }
                request.pull_secret = Some(secret.as_bytes().to_vec());
            }
            if let Some(policy) = env.key_values.get(PULL_POLICY_ENV) {
                request.pull_policy = PullPolicy::from_env(policy);
            }
            if let Some(version) = env.key_values.get(RESOURCE_VERSION_ENV) {
                request.resource_version = version.clone();
            }
            env.key_values
                .retain(|k, _| !k.starts_with(AGENT_ENV_PREFIX));
            if env.key_values.is_empty() && env.host_env_keys.is_empty() {
                vm.environment_variables = None;
            }
        }
        let module = self
            .cache
            .get(&request)
            .await
            .map_err(|error| ConvertError::Module {
                resource: resource.to_string(),
                filter: filter.to_string(),
                error,
            })?;
        tracing::info!(
            resource,
            filter,
            url = %request.url,
            digest = %module.digest,
            path = %module.path.display(),
            "Wasm filter loads the cached module"
        );
        vm.code = Some(local_code(&module.path));
        Ok(true)
    }
}

/// Envoy's two Wasm filters (HTTP and network) wrap the same plugin
/// configuration.
trait WasmFilter: Message + Default + Send {
    fn plugin_config(&mut self) -> Option<&mut PluginConfig>;
}

impl WasmFilter for HttpWasm {
    fn plugin_config(&mut self) -> Option<&mut PluginConfig> {
        self.config.as_mut()
    }
}

impl WasmFilter for NetworkWasm {
    fn plugin_config(&mut self) -> Option<&mut PluginConfig> {
        self.config.as_mut()
    }
}

fn local_code(path: &Path) -> envoy_types::pb::envoy::config::core::v3::AsyncDataSource {
    envoy_types::pb::envoy::config::core::v3::AsyncDataSource {
        specifier: Some(async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::Filename(path.display().to_string())),
            ..Default::default()
        })),
    }
}

/// A cheap look for either Wasm filter type URL before decoding anything.
fn mentions_wasm(bytes: &[u8]) -> bool {
    const NEEDLE: &[u8] = b"wasm.v3.Wasm";
    bytes.windows(NEEDLE.len()).any(|w| w == NEEDLE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm::cache::CacheOptions;
    use envoy_types::pb::envoy::config::core::v3::{
        AsyncDataSource, HttpUri, RemoteDataSource, http_uri,
    };
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;
    use envoy_types::pb::envoy::extensions::wasm::v3::{EnvironmentVariables, VmConfig};
    use envoy_types::util::pack_any;

    const MODULE: &[u8] = b"\0asm\x01\0\0\0 module";
    const URL: &str = "oci://127.0.0.1:9/meshvm/filter:v1";

    /// A cache holding MODULE for URL, whose registry is down.
    fn seeded() -> (tempfile::TempDir, WasmRewriter, Sha256) {
        let tmp = tempfile::tempdir().unwrap();
        let cache = WasmCache::new(CacheOptions {
            attempts: 1,
            ..CacheOptions::new(tmp.path().to_path_buf())
        });
        let digest = crate::wasm::cache::tests_support::seed(&cache, URL, MODULE);
        (tmp, WasmRewriter::new(Arc::new(cache)), digest)
    }

    fn plugin(code: AsyncDataSource, env: &[(&str, &str)]) -> PluginConfig {
        PluginConfig {
            name: "ns.meshvm".into(),
            root_id: "meshvm".into(),
            vm: Some(plugin_config::Vm::VmConfig(VmConfig {
                vm_id: "meshvm".into(),
                runtime: "envoy.wasm.runtime.v8".into(),
                code: Some(code),
                environment_variables: (!env.is_empty()).then(|| EnvironmentVariables {
                    key_values: env
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn remote(url: &str, sha256: &str) -> AsyncDataSource {
        AsyncDataSource {
            specifier: Some(async_data_source::Specifier::Remote(RemoteDataSource {
                http_uri: Some(HttpUri {
                    uri: url.into(),
                    timeout: Some(envoy_types::pb::google::protobuf::Duration {
                        seconds: 30,
                        nanos: 0,
                    }),
                    http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster("_".into())),
                }),
                sha256: sha256.into(),
                ..Default::default()
            })),
        }
    }

    fn ecds(plugin: PluginConfig) -> Any {
        pack_any(TypedExtensionConfig {
            name: "ns.meshvm".into(),
            typed_config: Some(pack_any(HttpWasm {
                config: Some(plugin),
            })),
        })
    }

    fn code_of(
        resource: &Any,
    ) -> (
        Option<async_data_source::Specifier>,
        Option<EnvironmentVariables>,
    ) {
        let config = TypedExtensionConfig::decode(resource.value.as_slice()).unwrap();
        let wasm = HttpWasm::decode(config.typed_config.unwrap().value.as_slice()).unwrap();
        let Some(plugin_config::Vm::VmConfig(vm)) = wasm.config.unwrap().vm else {
            panic!()
        };
        (vm.code.unwrap().specifier, vm.environment_variables)
    }

    #[tokio::test]
    async fn ecds_remote_code_becomes_the_cached_file() {
        let (_tmp, rewriter, digest) = seeded();
        let mut resource = ecds(plugin(
            remote(URL, &digest.hex()),
            &[
                (PULL_POLICY_ENV, "IfNotPresent"),
                (RESOURCE_VERSION_ENV, "7"),
                ("GREETING", "hi"),
            ],
        ));
        let n = rewriter
            .rewrite(EXTENSION_CONFIG_TYPE_URL, vec![&mut resource])
            .await
            .unwrap();
        assert_eq!(n, 1);
        let (code, env) = code_of(&resource);
        let Some(async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::Filename(path)),
            ..
        })) = code
        else {
            panic!("{code:?}")
        };
        assert_eq!(std::fs::read(&path).unwrap(), MODULE);
        // The agent's variables are gone, the module's stay.
        let env = env.unwrap().key_values;
        assert_eq!(env.len(), 1, "{env:?}");
        assert_eq!(env["GREETING"], "hi");
    }

    #[tokio::test]
    async fn other_resources_pass_untouched() {
        let (_tmp, rewriter, _) = seeded();
        let local = AsyncDataSource {
            specifier: Some(async_data_source::Specifier::Local(DataSource {
                specifier: Some(data_source::Specifier::Filename("/x.wasm".into())),
                ..Default::default()
            })),
        };
        let mut a = ecds(plugin(local, &[]));
        let mut b = pack_any(TypedExtensionConfig {
            name: "rbac".into(),
            typed_config: Some(Any {
                type_url: "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC".into(),
                value: vec![],
            }),
        });
        let (a0, b0) = (a.clone(), b.clone());
        let n = rewriter
            .rewrite(EXTENSION_CONFIG_TYPE_URL, vec![&mut a, &mut b])
            .await
            .unwrap();
        assert_eq!((n, a, b), (0, a0, b0));
    }

    #[tokio::test]
    async fn failures_name_the_filter_and_the_problem() {
        let (_tmp, rewriter, digest) = seeded();
        for (code, env, expected) in [
            (
                remote("oci://127.0.0.1:9/meshvm/other:v1", ""),
                vec![],
                "cannot fetch oci://127.0.0.1:9/meshvm/other:v1",
            ),
            (
                remote(URL, "sha256:12"),
                vec![],
                "sha256: `sha256:12` is not a SHA-256 digest",
            ),
            (
                remote(URL, &digest.hex()),
                vec![(PULL_SECRET_ENV, "")],
                "missing image pull secret",
            ),
            (remote("ftp://x/y", ""), vec![], "unsupported scheme `ftp`"),
        ] {
            let mut resource = ecds(plugin(code, &env));
            let e = rewriter
                .rewrite(EXTENSION_CONFIG_TYPE_URL, vec![&mut resource])
                .await
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("Wasm filter `ns.meshvm` of `ns.meshvm`") && e.contains(expected),
                "{e}"
            );
        }
        let mut garbage = Any {
            type_url: EXTENSION_CONFIG_TYPE_URL.into(),
            value: b"\xff\xffwasm.v3.Wasm".to_vec(),
        };
        let e = rewriter
            .rewrite(EXTENSION_CONFIG_TYPE_URL, vec![&mut garbage])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cannot decode"), "{e}");
    }

    #[tokio::test]
    async fn listeners_inline_wasm_is_rewritten() {
        let (_tmp, rewriter, digest) = seeded();
        let manager = HttpConnectionManager {
            http_filters: vec![
                HttpFilter {
                    name: "meshvm".into(),
                    config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(HttpWasm {
                        config: Some(plugin(remote(URL, &digest.to_string()), &[])),
                    }))),
                    ..Default::default()
                },
                HttpFilter {
                    name: "envoy.filters.http.router".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let mut listener = pack_any(Listener {
            name: "inbound".into(),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack_any(manager))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        let n = rewriter
            .rewrite(LISTENER_TYPE_URL, vec![&mut listener])
            .await
            .unwrap();
        assert_eq!(n, 1);
        let listener = Listener::decode(listener.value.as_slice()).unwrap();
        let Some(filter::ConfigType::TypedConfig(hcm)) =
            listener.filter_chains[0].filters[0].config_type.clone()
        else {
            panic!()
        };
        let manager = HttpConnectionManager::decode(hcm.value.as_slice()).unwrap();
        let Some(http_filter::ConfigType::TypedConfig(wasm)) =
            manager.http_filters[0].config_type.clone()
        else {
            panic!()
        };
        let wasm = HttpWasm::decode(wasm.value.as_slice()).unwrap();
        let Some(plugin_config::Vm::VmConfig(vm)) = wasm.config.unwrap().vm else {
            panic!()
        };
        assert!(
            matches!(
                vm.code.unwrap().specifier,
                Some(async_data_source::Specifier::Local(_))
            ),
            "still remote"
        );
        assert_eq!(manager.http_filters[1].name, "envoy.filters.http.router");
    }
}
