//! `nsm demo` end to end, as root: it builds the hybrid-cloud vWires, proves traffic, and leaves
//! nothing behind — also when it is killed and `nsm demo --down` cleans up after it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The command users run is `nsm demo`: the `nsm` binary next to nsm-demo (built by
/// `cargo test --workspace`), which execs nsm-demo and lends it its daemons.
fn nsm() -> PathBuf {
    let nsm = Path::new(env!("CARGO_BIN_EXE_nsm-demo")).with_file_name("nsm");
    assert!(
        nsm.exists(),
        "{} is not built; run `cargo build -p nsm -p nsmctl` (or `cargo test --workspace`)",
        nsm.display()
    );
    nsm
}

/// `nsm demo --help` explains the demo (nsm-demo's help, under the name users typed); needs no root.
#[test]
fn nsm_demo_help_explains_the_demo() {
    let o = Command::new(nsm()).args(["demo", "--help"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("Show the mesh working"), "{out}");
    assert!(out.contains("Usage: nsm demo [OPTIONS]"), "{out}");
    for flag in ["--once", "--down", "--state-dir", "--prefix"] {
        assert!(out.contains(flag), "missing {flag} in:\n{out}");
    }
}

fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// A live (not zombie) process: its executable link resolves only while it runs.
fn alive(pid: u64) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok()
}

fn prefix(tag: &str) -> String {
    format!("nsmt-{}-{tag}", std::process::id())
}

/// One test, run in order: two demos at once would share their vL3 routers' namespace names
/// (they are named after the nodes, which are the same in every demo).
#[test]
fn demo_once_then_killed_and_cleaned_by_down() {
    demo_once_proves_traffic_and_cleans_up();
    demo_killed_is_cleaned_by_down();
}

fn demo_once_proves_traffic_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = prefix("demo");
    let o = Command::new(nsm())
        .args(["demo", "--once", "--prefix", &prefix, "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    // The design document's three commands, the last one inside the pod.
    for cmd in [
        "nsmctl ns create istio-namespace --namespace=istio-system",
        "nsmctl endpoint create vm-endpoint --address=10.0.0.5",
        "nsmctl client create orders-vwire --service=orders --endpoint=vm-endpoint",
    ] {
        assert!(out.contains(cmd), "missing {cmd:?} in:\n{out}");
    }
    assert_eq!(out.matches(" 0% packet loss").count(), 2, "{out}");
    assert!(
        out.contains("the server saw the connection from 192.0.2.11"),
        "NAT to the VM: {out}"
    );
    assert!(out.contains("Mechanism:        VXLAN"), "{out}");
    // The vL3 scenarios: names resolve, tenants are isolated but share billing.
    assert!(out.contains("web: db.istio. → 172.16."), "{out}");
    assert_eq!(out.matches("blocked, as intended").count(), 2, "{out}");
    assert_eq!(out.matches(": reached").count(), 2, "{out}");
    assert!(out.contains("every namespace deleted"), "{out}");
    assert!(
        netns_with_prefix(&prefix).is_empty(),
        "{:?}",
        netns_with_prefix(&prefix)
    );
    assert!(!dir.path().join("state.json").exists());
}

fn demo_killed_is_cleaned_by_down() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = prefix("kill");
    let mut demo = Command::new(nsm())
        .args(["demo", "--prefix", &prefix, "--state-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it has started its daemons (the state file lists four processes).
    let state = dir.path().join("state.json");
    let start = Instant::now();
    let pids: Vec<u64> = loop {
        let pids = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|j| {
                j["pids"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|p| p.as_u64()).collect::<Vec<_>>())
            })
            .unwrap_or_default();
        if pids.len() == 4 {
            break pids;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "demo did not start its daemons"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = demo.kill();
    let _ = demo.wait();
    assert!(
        !netns_with_prefix(&prefix).is_empty(),
        "the killed demo left its namespaces"
    );
    assert!(pids.iter().all(|p| alive(*p)), "and its daemons");

    // A second demo refuses to start over a running one's leftovers.
    let o = Command::new(nsm())
        .args(["demo", "--once", "--prefix", &prefix, "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already running"));

    let o = Command::new(nsm())
        .args(["demo", "--down", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        netns_with_prefix(&prefix).is_empty(),
        "{:?}",
        netns_with_prefix(&prefix)
    );
    assert!(netns_with_prefix("nsm-vl3-k8s-node").is_empty(), "vL3 routers too");
    let start = Instant::now();
    while pids.iter().any(|p| alive(*p)) {
        assert!(start.elapsed() < Duration::from_secs(5), "daemons still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Idempotent.
    let o = Command::new(nsm())
        .args(["demo", "--down", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success());
}
