//! `grpc` probes: `grpc.health.v1.Health/Check` in plaintext against
//! 127.0.0.1:port, healthy only when the answer is `SERVING` (reference §3.3).

use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::config::GrpcProbe;

/// Asks the application's health service about `service` ("": the server).
#[derive(Debug, Clone)]
pub struct GrpcCheck {
    uri: String,
    service: String,
}

impl GrpcCheck {
    pub fn new(probe: &GrpcProbe) -> Self {
        Self {
            uri: format!("http://127.0.0.1:{}", probe.port),
            service: probe.service.clone(),
        }
    }

    /// One fresh connection and one Check (the caller bounds it with the
    /// timeout).
    pub async fn check(&self) -> Result<(), String> {
        let failed = |what: &str, error: &dyn std::fmt::Display| {
            format!("grpc {} {what}: {error}", self.uri)
        };
        let endpoint = Endpoint::from_shared(self.uri.clone()).map_err(|e| failed("uri", &e))?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| failed("connect", &e))?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: self.service.clone(),
            })
            .await
            .map_err(|status| failed("Check", &status.message().to_string()))?;
        let status = response.into_inner().status();
        if status == ServingStatus::Serving {
            Ok(())
        } else {
            Err(format!(
                "grpc {} service {:?}: {}",
                self.uri,
                self.service,
                status.as_str_name()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::transport::Server;
    use tonic::transport::server::TcpIncoming;
    use tonic_health::ServingStatus as Reported;

    use super::*;
    use crate::health::probe::{Checker, ProbeOutcome};

    #[tokio::test]
    async fn serving_is_healthy_not_serving_is_not() {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("billing", Reported::Serving)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(
            Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        let checker = |service: &str| {
            Checker::Grpc(GrpcCheck::new(&GrpcProbe {
                port: port.into(),
                service: service.into(),
            }))
        };
        let timeout = Duration::from_secs(5);
        assert_eq!(
            checker("billing").check(timeout).await,
            ProbeOutcome::Success
        );

        reporter
            .set_service_status("billing", Reported::NotServing)
            .await;
        assert_eq!(
            checker("billing").check(timeout).await,
            ProbeOutcome::Failure(format!(
                "grpc http://127.0.0.1:{port} service \"billing\": NOT_SERVING"
            ))
        );
        // A service the server does not know: NOT_FOUND, unhealthy.
        let outcome = checker("unknown").check(timeout).await;
        assert!(outcome.message().contains("Check: "), "{outcome:?}");
        server.abort();
    }

    #[tokio::test]
    async fn nothing_listening_is_unhealthy() {
        let port = meshvm_testing::process::free_port();
        let outcome = Checker::Grpc(GrpcCheck::new(&GrpcProbe {
            port: port.into(),
            service: String::new(),
        }))
        .check(Duration::from_secs(5))
        .await;
        assert!(
            outcome
                .message()
                .starts_with(&format!("grpc http://127.0.0.1:{port} connect: ")),
            "{outcome:?}"
        );
    }
}
