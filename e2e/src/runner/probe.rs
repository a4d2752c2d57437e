//! Container probes, as a kubelet runs them against the pod's address: `httpGet` (plain HTTP; the port by number or
//! by the name of a container port; a status of 200-399 passes) and `tcpSocket` (a connection passes). `exec`,
//! `grpc` and HTTPS probes are not supported: they always fail, with a message saying so, so a pod that relies on
//! one never turns ready here instead of passing unnoticed.

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The timing of a probe, with the Kubernetes defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `initialDelaySeconds` (0).
    pub initial_delay: Duration,
    /// `periodSeconds` (10).
    pub period: Duration,
    /// `timeoutSeconds` (1).
    pub timeout: Duration,
    /// `successThreshold` (1).
    pub success_threshold: u32,
    /// `failureThreshold` (3).
    pub failure_threshold: u32,
}

fn seconds(value: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(value.and_then(|value| u64::try_from(value).ok()).filter(|value| *value > 0).unwrap_or(default))
}

impl Timing {
    /// The timing of `probe`.
    pub fn of(probe: &Probe) -> Timing {
        let count = |value: Option<i32>, default: u32| {
            value.and_then(|value| u32::try_from(value).ok()).filter(|value| *value > 0).unwrap_or(default)
        };
        Timing {
            initial_delay: Duration::from_secs(
                probe.initial_delay_seconds.and_then(|value| u64::try_from(value).ok()).unwrap_or(0),
            ),
            period: seconds(probe.period_seconds, 10),
            timeout: seconds(probe.timeout_seconds, 1),
            success_threshold: count(probe.success_threshold, 1),
            failure_threshold: count(probe.failure_threshold, 3),
        }
    }
}

/// Counts consecutive results against the thresholds: `Some(true)` when the probe has just passed its success
/// threshold, `Some(false)` when it has just reached its failure threshold, `None` when nothing changed.
#[derive(Debug, Clone, Default)]
pub struct Verdicts {
    successes: u32,
    failures: u32,
}

impl Verdicts {
    /// Adds one result.
    pub fn record(&mut self, passed: bool, timing: &Timing) -> Option<bool> {
        if passed {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            (self.successes == timing.success_threshold).then_some(true)
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            (self.failures == timing.failure_threshold).then_some(false)
        }
    }
}

/// The port a probe names.
pub fn port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(number) => u16::try_from(*number).map_err(|_| format!("probe port {number} is out of range")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|port| port.name.as_deref() == Some(name.as_str()))
            .and_then(|port| u16::try_from(port.container_port).ok())
            .ok_or_else(|| format!("probe port {name:?} names no port of container {}", container.name)),
    }
}

/// Runs `probe` once against `address`; `Err` says why it failed.
pub async fn check(probe: &Probe, container: &Container, address: Ipv4Addr) -> Result<(), String> {
    let timeout = Timing::of(probe).timeout;
    let attempt = async {
        if let Some(http) = &probe.http_get {
            if http.scheme.as_deref().is_some_and(|scheme| !scheme.eq_ignore_ascii_case("HTTP")) {
                return Err("HTTPS probes are not supported by the pod runner".to_owned());
            }
            let host = http.host.as_deref().and_then(|host| host.parse::<Ipv4Addr>().ok()).unwrap_or(address);
            let port = port(&http.port, container)?;
            let path = http.path.as_deref().filter(|path| !path.is_empty()).unwrap_or("/");
            let mut request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/parley-pod-runner\r\n\
                 Accept: */*\r\nConnection: close\r\n"
            );
            for header in http.http_headers.iter().flatten() {
                request.push_str(&format!("{}: {}\r\n", header.name, header.value));
            }
            request.push_str("\r\n");
            let mut stream = TcpStream::connect(SocketAddr::from((host, port)))
                .await
                .map_err(|error| format!("GET http://{host}:{port}{path}: {error}"))?;
            stream.write_all(request.as_bytes()).await.map_err(|error| format!("GET {path}: {error}"))?;
            let mut head = Vec::with_capacity(64);
            let mut buffer = [0u8; 256];
            while !head.windows(2).any(|window| window == b"\r\n") {
                let read = stream.read(&mut buffer).await.map_err(|error| format!("GET {path}: {error}"))?;
                if read == 0 {
                    break;
                }
                head.extend_from_slice(&buffer[..read]);
            }
            let line = String::from_utf8_lossy(&head);
            let status: u16 = line.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
            if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(format!("GET http://{host}:{port}{path} answered {:?}", line.lines().next().unwrap_or("nothing")))
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            let host = tcp.host.as_deref().and_then(|host| host.parse::<Ipv4Addr>().ok()).unwrap_or(address);
            let port = port(&tcp.port, container)?;
            TcpStream::connect(SocketAddr::from((host, port)))
                .await
                .map(|_| ())
                .map_err(|error| format!("connect {host}:{port}: {error}"))
        } else if probe.exec.is_some() {
            Err("exec probes are not supported by the pod runner".to_owned())
        } else if probe.grpc.is_some() {
            Err("grpc probes are not supported by the pod runner".to_owned())
        } else {
            Err("the probe has no handler".to_owned())
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container() -> Container {
        serde_json::from_value(json!({"name": "c", "ports": [{"name": "admin", "containerPort": 9090}]})).expect("c")
    }

    #[test]
    fn timing_defaults_and_thresholds() {
        let probe: Probe = serde_json::from_value(json!({"periodSeconds": 5, "failureThreshold": 2})).expect("probe");
        let timing = Timing::of(&probe);
        assert_eq!((timing.period, timing.timeout), (Duration::from_secs(5), Duration::from_secs(1)));
        let mut verdicts = Verdicts::default();
        assert_eq!(verdicts.record(true, &timing), Some(true));
        assert_eq!(verdicts.record(true, &timing), None);
        assert_eq!(verdicts.record(false, &timing), None);
        assert_eq!(verdicts.record(false, &timing), Some(false));
        assert_eq!(verdicts.record(false, &timing), None);
        assert_eq!(verdicts.record(true, &timing), Some(true));
    }

    #[test]
    fn ports_by_number_and_by_name() {
        assert_eq!(port(&IntOrString::Int(80), &container()), Ok(80));
        assert_eq!(port(&IntOrString::String("admin".into()), &container()), Ok(9090));
        assert!(port(&IntOrString::String("client".into()), &container()).is_err());
    }

    #[tokio::test]
    async fn http_probes_pass_on_2xx_and_fail_otherwise() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut stream, _) = listener.accept().await.expect("accept");
                let mut buffer = [0u8; 512];
                let _ = stream.read(&mut buffer).await;
                let _ = stream.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes()).await;
            }
        });
        let probe: Probe =
            serde_json::from_value(json!({"httpGet": {"path": "/readyz", "port": port}})).expect("probe");
        let localhost = Ipv4Addr::LOCALHOST;
        assert_eq!(check(&probe, &container(), localhost).await, Ok(()));
        let error = check(&probe, &container(), localhost).await.expect_err("503");
        assert!(error.contains("503"), "{error}");
        let exec: Probe = serde_json::from_value(json!({"exec": {"command": ["true"]}})).expect("probe");
        assert!(check(&exec, &container(), localhost).await.expect_err("exec").contains("not supported"));
    }
}
