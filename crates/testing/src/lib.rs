//! Test support for nsm: real external servers, started per test and cleaned up after it.
//!
//! [`Etcd`] runs the real `etcd` binary (Debian package `etcd-server`) on loopback with its own
//! ports and a data directory in a temporary directory, so store tests exercise the actual server
//! (leases, compaction, dropped streams) rather than a mock. Each test may start its own instance;
//! one takes well under a second to become healthy. [`Etcd::start_tls`] runs it with TLS and
//! client-certificate authentication on its client port.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

mod registry;
pub use registry::{NsmRegistry, admin_config_for, channel_to, join_token, sibling_binary};

mod pki;
pub use pki::{Pem, TestPki};

/// Environment variable that overrides the etcd binary (default: `etcd` on `PATH`).
pub const ETCD_BINARY_ENV: &str = "NSM_TEST_ETCD";

/// How long [`Etcd::start`] and [`Etcd::restart`] wait for the server to report healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the server log quoted in startup errors.
const LOG_TAIL_LINES: usize = 20;

/// A single-member etcd cluster on 127.0.0.1, owned by the test that started it.
///
/// The process is killed (SIGKILL, by its own PID) when the value is dropped, and its data
/// directory is removed with it.
pub struct Etcd {
    binary: PathBuf,
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` (and metrics), so readiness is polled the same way with or without
    /// TLS on the client port.
    metrics_port: u16,
    /// Whether the client port requires TLS with a client certificate.
    tls: bool,
    /// Holds `data/` and `etcd.log`; removed on drop.
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Etcd {
    /// Starts etcd on free loopback ports with a fresh data directory and waits (up to 10 s)
    /// until it answers `/health`. The binary is `$NSM_TEST_ETCD` if set, else `etcd` on `PATH`.
    ///
    /// Fails with a message naming the binary and quoting the end of its log if the binary is
    /// missing, exits early, or does not become healthy in time.
    pub fn start() -> anyhow::Result<Etcd> {
        let binary = std::env::var_os(ETCD_BINARY_ENV).map_or_else(|| PathBuf::from("etcd"), PathBuf::from);
        Etcd::start_with_binary(binary)
    }

    /// Like [`start`](Self::start), with an explicit etcd binary.
    pub fn start_with_binary(binary: impl Into<PathBuf>) -> anyhow::Result<Etcd> {
        Etcd::start_inner(binary.into(), None)
    }

    /// Like [`start`](Self::start), but the client port speaks only TLS with the server
    /// certificate `server_cert_pem`/`server_key_pem` and requires client certificates signed by
    /// `ca_pem` (`--client-cert-auth`). Peer traffic stays plain HTTP (one member, loopback).
    /// The server certificate must be valid for `127.0.0.1`, the address clients dial.
    pub fn start_tls(
        ca_pem: impl AsRef<[u8]>,
        server_cert_pem: impl AsRef<[u8]>,
        server_key_pem: impl AsRef<[u8]>,
    ) -> anyhow::Result<Etcd> {
        let binary = std::env::var_os(ETCD_BINARY_ENV).map_or_else(|| PathBuf::from("etcd"), PathBuf::from);
        let tls = ServerTls {
            ca: ca_pem.as_ref().to_vec(),
            cert: server_cert_pem.as_ref().to_vec(),
            key: server_key_pem.as_ref().to_vec(),
        };
        Etcd::start_inner(binary, Some(&tls))
    }

    /// [`start_tls`](Self::start_tls) with a server certificate (`spiffe://nsm.test/etcd`) issued
    /// by `pki`, whose CA also authenticates clients.
    pub fn start_tls_with_pki(pki: &TestPki) -> anyhow::Result<Etcd> {
        let server = pki.issue("etcd")?;
        Etcd::start_tls(pki.ca_pem(), server.cert, server.key)
    }

    fn start_inner(binary: PathBuf, tls: Option<&ServerTls>) -> anyhow::Result<Etcd> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let mut last_error = None;
        // Free ports are found by binding port 0 and releasing it, so another process may take one
        // before etcd binds it; try a few times with fresh ports.
        for _ in 0..3 {
            let [client_port, peer_port, metrics_port] = free_ports()?;
            let name = format!(
                "nsm-test-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let mut etcd = Etcd {
                binary: binary.clone(),
                name,
                client_port,
                peer_port,
                metrics_port,
                tls: tls.is_some(),
                dir: tempfile::Builder::new()
                    .prefix("nsm-etcd-")
                    .tempdir()
                    .context("creating etcd temp dir")?,
                child: None,
            };
            if let Some(tls) = tls {
                tls.write(&etcd.tls_dir())?;
            }
            match etcd.launch() {
                Ok(()) => return Ok(etcd),
                Err(e) if etcd.log_tail().contains("address already in use") => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// The client address, `127.0.0.1:PORT`, as etcd clients take it.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The client URL, `http://127.0.0.1:PORT` (`https://` when started with TLS).
    pub fn client_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.endpoint())
    }

    /// Whether the client port requires TLS and a client certificate.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The data directory (kept across [`restart`](Self::restart)).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The PID of the server process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server process is running (it was started and not stopped).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the server with SIGKILL (no graceful shutdown, like a crash) and reaps it. Clients
    /// see their connections and streams break. Does nothing if it is not running.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // Fails only if the process was already reaped, which `take` rules out.
            let _ = child.kill();
            child
                .wait()
                .with_context(|| format!("waiting for {} to exit", self.binary.display()))?;
        }
        Ok(())
    }

    /// Kills the server (if running) and starts it again on the same ports with the same data
    /// directory, waiting until it is healthy. Data that was acknowledged before survives.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.launch()
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let client_url = self.client_url();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let metrics_url = format!("http://127.0.0.1:{}", self.metrics_port);
        let mut command = Command::new(&self.binary);
        if self.tls {
            let dir = self.tls_dir();
            command
                .arg("--cert-file")
                .arg(dir.join(SERVER_CERT))
                .arg("--key-file")
                .arg(dir.join(SERVER_KEY))
                .arg("--trusted-ca-file")
                .arg(dir.join(CA_CERT))
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args(["--listen-metrics-urls", &metrics_url])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .arg("--initial-cluster")
            .arg(format!("{}={peer_url}", self.name))
            .args([
                "--initial-cluster-state",
                "new",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating log file handle")?)
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "etcd binary {:?} not found: install Debian package etcd-server (or set {ETCD_BINARY_ENV})",
                self.binary
            ),
            Err(e) => return Err(e).with_context(|| format!("starting {}", self.binary.display())),
        };
        self.child = Some(child);
        self.wait_healthy()
    }

    fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.metrics_port));
        loop {
            let child = self.child.as_mut().expect("launched");
            if let Some(status) = child.try_wait().context("polling etcd")? {
                self.child = None;
                bail!(
                    "{} exited during startup ({status}); end of its log:\n{}",
                    self.binary.display(),
                    self.log_tail()
                );
            }
            if health_ok(addr) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.stop();
                bail!(
                    "{} did not become healthy on {addr} within {READY_TIMEOUT:?}; end of its log:\n{}",
                    self.binary.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// The last lines of the server's log (stdout and stderr of every run).
    pub fn log_tail(&self) -> String {
        tail(&self.log_path(), LOG_TAIL_LINES)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

const CA_CERT: &str = "ca.pem";
const SERVER_CERT: &str = "server.pem";
const SERVER_KEY: &str = "server.key";

/// The server's TLS material, written into its directory (etcd takes only file paths).
struct ServerTls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl ServerTls {
    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, pem) in [(CA_CERT, &self.ca), (SERVER_CERT, &self.cert), (SERVER_KEY, &self.key)] {
            let path = dir.join(name);
            std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

/// Distinct free loopback ports (client, peer, metrics); all are held until all are found.
fn free_ports() -> anyhow::Result<[u16; 3]> {
    let bind = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port");
    let held = [bind()?, bind()?, bind()?];
    let mut ports = [0; 3];
    for (port, listener) in ports.iter_mut().zip(&held) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// One `GET /health` over plain HTTP/1.0; true if etcd reports itself healthy.
fn health_ok(addr: SocketAddr) -> bool {
    let attempt = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    };
    attempt().is_ok_and(|body| body.contains("\"health\":\"true\""))
}

fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if File::open(path).and_then(|mut f| f.read_to_string(&mut text)).is_err() {
        return format!("(no log at {})", path.display());
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_says_what_to_install() {
        let err = Etcd::start_with_binary("/nonexistent/etcd")
            .err()
            .expect("no such binary");
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/etcd") && msg.contains("install Debian package etcd-server"),
            "{msg}"
        );
    }

    #[test]
    fn start_restart_and_drop() {
        let mut etcd = Etcd::start().unwrap();
        let addr: SocketAddr = etcd.endpoint().parse().unwrap();
        assert!(health_ok(addr));
        let data = etcd.data_dir();
        let first = etcd.pid().unwrap();
        etcd.stop().unwrap();
        assert!(!etcd.is_running() && !health_ok(addr));
        etcd.restart().unwrap();
        let second = etcd.pid().unwrap();
        assert_ne!(first, second);
        assert_eq!(etcd.endpoint(), addr.to_string(), "same ports after restart");
        assert_eq!(etcd.data_dir(), data);
        drop(etcd);
        assert!(
            !Path::new(&format!("/proc/{second}")).exists(),
            "process killed and reaped on drop"
        );
        assert!(!data.exists(), "data directory removed on drop");
    }

    #[test]
    fn tls_client_port_refuses_plain_http() {
        let pki = TestPki::new().unwrap();
        let mut etcd = Etcd::start_tls_with_pki(&pki).unwrap();
        assert!(etcd.is_tls());
        assert_eq!(etcd.client_url(), format!("https://{}", etcd.endpoint()));
        let client: SocketAddr = etcd.endpoint().parse().unwrap();
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, etcd.metrics_port));
        assert!(health_ok(metrics) && !health_ok(client));
        etcd.restart().unwrap();
        assert!(health_ok(metrics) && !health_ok(client));
    }
}
