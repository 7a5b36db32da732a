//! istiod's port 15012 as this control plane serves it: the CA
//! (`IstioCertificateService`) and ADS on one TLS listener, client
//! certificates optional at the TLS layer (a VM's first CA request has only
//! its token) and required by the ADS stream itself.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::ca::server::{ServeError, ServeOptions, incoming, tls_config};
use crate::ca::{CaService, MeshCa};
use crate::xds::XdsServer;

/// Serves the CA, and ADS when `xds` is given, on `listener` until
/// `shutdown` completes.
pub async fn serve(
    ca: Arc<MeshCa>,
    xds: Option<XdsServer>,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let tls = tls_config(&ca, &options).map_err(ServeError::Ca)?;
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    tracing::info!(
        %addr,
        cluster_id = %options.cluster_id,
        ads = xds.is_some(),
        "serving the CA{} over TLS",
        if xds.is_some() { " and ADS" } else { "" }
    );
    let ca_service = CaService::new(ca, options.cluster_id.clone()).into_server();
    // ADS streams never end by themselves: close them when shutting down,
    // or the server would wait for them forever.
    let closer = xds.clone();
    let shutdown = async move {
        shutdown.await;
        if let Some(xds) = closer {
            xds.close_all_streams();
        }
    };
    Server::builder()
        .tls_config(tls)?
        .add_service(ca_service)
        .add_optional_service(xds.map(XdsServer::into_server))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await?;
    Ok(())
}
