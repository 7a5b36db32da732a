//! `tcpSocket` probes: healthy when a TCP connection opens (reference §3.3).

use std::net::Ipv4Addr;

use tokio::net::TcpStream;

use crate::config::TcpSocketProbe;

/// Connects to `host:port` (host defaults to 127.0.0.1: the application
/// listens on the VM itself, and loopback is not captured by the sidecar).
#[derive(Debug, Clone)]
pub struct TcpCheck {
    host: String,
    port: u16,
}

impl TcpCheck {
    pub fn new(probe: &TcpSocketProbe) -> Self {
        let host = if probe.host.is_empty() {
            Ipv4Addr::LOCALHOST.to_string()
        } else {
            probe.host.clone()
        };
        Self {
            host,
            // The configuration refuses ports outside 1-65535.
            port: u16::try_from(probe.port).unwrap_or(0),
        }
    }

    /// One connection attempt (the caller bounds it with the timeout).
    pub async fn check(&self) -> Result<(), String> {
        match TcpStream::connect((self.host.as_str(), self.port)).await {
            Ok(_) => Ok(()),
            Err(error) => Err(format!("tcp {}:{}: {error}", self.host, self.port)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::health::Health;
    use crate::health::probe::{self, Checker, Schedule};
    use crate::xds::HealthReport;

    #[tokio::test]
    async fn healthy_while_listening_then_unhealthy_after_the_failure_threshold() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let check = TcpCheck::new(&TcpSocketProbe {
            host: String::new(),
            port: port.into(),
        });
        assert_eq!(check.check().await, Ok(()));

        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let health = Arc::new(Health::new(move |r| sink.lock().unwrap().push(r)));
        let schedule = Schedule {
            initial_delay: Duration::ZERO,
            period: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
        };
        let task = tokio::spawn(probe::run(Checker::Tcp(check), schedule, health.clone()));
        let wait = |n: usize| {
            let seen = seen.clone();
            async move {
                for _ in 0..200 {
                    if seen.lock().unwrap().len() >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("no report {n}: {:?}", seen.lock().unwrap());
            }
        };
        wait(1).await;
        assert_eq!(seen.lock().unwrap()[0], HealthReport::Healthy);

        drop(listener);
        wait(2).await;
        task.abort();
        let report = seen.lock().unwrap()[1].clone();
        let HealthReport::Unhealthy(message) = report else {
            panic!("{report:?}");
        };
        assert!(
            message.starts_with(&format!("agent-probe: tcp 127.0.0.1:{port}: ")),
            "{message}"
        );
        assert!(
            health.probe_counts().failure >= 3,
            "{:?}",
            health.probe_counts()
        );
    }
}
