//! A real `nsm registry` process for end-to-end tests and benchmarks.

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The path of workspace binary `name` built next to `sibling` (e.g. `env!("CARGO_BIN_EXE_nsmctl")`),
/// with a clear error if it was not built.
pub fn sibling_binary(sibling: &str, name: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(sibling).with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is not built; run `cargo build -p {name}` (or `cargo test --workspace`)",
            path.display()
        );
    }
    Ok(path)
}

/// Admin configs of the registries this process started, by URL: what a node joining a registry
/// that a test names only by URL gets its token with (see [`join_token`]).
static ADMIN_CONFIGS: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());

/// The admin config of the registry at `url`, if this process started it with identities on.
pub fn admin_config_for(url: &str) -> Option<PathBuf> {
    ADMIN_CONFIGS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .find(|(u, _)| u == url)
        .map(|(_, p)| p.clone())
}

/// A one-time join token for node `name` from the registry at `url` (started by this process),
/// made as an operator makes it: `nsmctl node create NAME -o json`, or `nsmctl node token NAME`
/// when the node exists. None: that registry runs `--insecure`.
pub fn join_token(nsm_bin: &Path, url: &str, name: &str) -> anyhow::Result<Option<String>> {
    let Some(config) = admin_config_for(url) else {
        return Ok(None);
    };
    let nsmctl = sibling_binary(&nsm_bin.display().to_string(), "nsmctl")?;
    let run = |args: &[&str]| {
        Command::new(&nsmctl)
            .args(args)
            .args(["-o", "json", "--registry", url])
            .env("NSM_CONFIG", &config)
            .output()
    };
    let mut out = run(&["node", "create", name])?;
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already exists") {
        out = run(&["node", "token", name])?;
    }
    if !out.status.success() {
        bail!(
            "nsmctl node create/token {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("nsmctl printed {:?}", String::from_utf8_lossy(&out.stdout)))?;
    v["joinToken"]
        .as_str()
        .map(|t| Some(t.to_owned()))
        .with_context(|| format!("no joinToken in {v}"))
}

/// A gRPC channel to the registry at `url` as its admin when this process started it with
/// identities (mutual TLS), else plaintext.
pub async fn channel_to(url: &str) -> anyhow::Result<tonic::transport::Channel> {
    let security = match admin_config_for(url) {
        None => nsm_transport::ClientSecurity::Insecure,
        Some(config) => {
            let credentials = nsm_identity::ClientConfig::load(&config)?.credentials()?;
            let expect = nsm_identity::Expect::Id(nsm_identity::SpiffeId::registry(&credentials.trust_domain())?);
            nsm_transport::ClientSecurity::Mtls { credentials, expect }
        }
    };
    Ok(nsm_transport::connect_secure(url, Duration::from_secs(10), &security).await?)
}

/// `nsm registry` on a free loopback port with a data directory of its own, killed (by its own PID)
/// when dropped. With identities on (unless started with `--insecure`): its admin config is
/// [`NsmRegistry::admin_config`].
pub struct NsmRegistry {
    bin: PathBuf,
    port: u16,
    args: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl NsmRegistry {
    /// Starts `bin registry --listen tcp://127.0.0.1:PORT --data-dir DIR EXTRA…` and waits until
    /// it says it is serving (its state is loaded).
    pub fn start(bin: &Path, extra: &[&str]) -> anyhow::Result<NsmRegistry> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut r = NsmRegistry {
            bin: bin.to_owned(),
            port,
            args: extra.iter().map(|s| s.to_string()).collect(),
            dir: tempfile::tempdir()?,
            child: None,
        };
        r.launch()?;
        if !r.is_insecure() {
            ADMIN_CONFIGS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((r.url(), r.admin_config()));
        }
        Ok(r)
    }

    /// Whether it was started with `--insecure`.
    pub fn is_insecure(&self) -> bool {
        self.args.iter().any(|a| a == "--insecure")
    }

    /// Its admin's client configuration (`<data-dir>/admin.config`).
    pub fn admin_config(&self) -> PathBuf {
        self.dir.path().join("data").join("admin.config")
    }

    /// Its data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A gRPC channel to it as its admin (mutual TLS), or plaintext when it runs `--insecure`.
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        channel_to(&self.url()).await
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let ready_before = self.log().matches("serving on").count();
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("registry.log"))?;
        let child = Command::new(&self.bin)
            .arg("registry")
            .args(["--listen", &self.url()])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(&self.args)
            .env("NSM_LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if self.log().matches("serving on").count() > ready_before
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("nsm registry exited with {status}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("nsm registry did not listen within 20 s:\n{}", self.log())
    }

    /// `tcp://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `kill -9`, then start again on the same port and data directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.launch()
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for NsmRegistry {
    fn drop(&mut self) {
        self.kill9();
    }
}
