//! `nsm demo` runs the nsm-demo binary: without it, a clear error that says what to build, and
//! `nsm demo --help` still explains the demo. (The demo itself is tested in crates/bin/nsm-demo.)

use std::path::Path;
use std::process::Command;

#[test]
fn demo_without_nsm_demo_says_what_to_build() {
    let nsm = Path::new(env!("CARGO_BIN_EXE_nsm"));
    // A lone copy of nsm (a hard link where it can), with no nsm-demo beside it or on PATH.
    let dir = tempfile::tempdir_in(nsm.parent().unwrap()).unwrap();
    let lone = dir.path().join("nsm");
    if std::fs::hard_link(nsm, &lone).is_err() {
        std::fs::copy(nsm, &lone).unwrap();
    }
    let empty = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(&lone)
            .args(args)
            .env("PATH", empty.path())
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };

    let (ok, _, err) = run(&["demo", "--once"]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "nsm demo needs the nsm-demo binary (cargo build -p nsm-demo) next to {}",
            lone.display()
        )),
        "{err}"
    );

    let (ok, out, err) = run(&["demo", "--help"]);
    assert!(!ok);
    assert!(out.contains("Show the mesh working"), "{out}");
    assert!(err.contains("nsm demo needs the nsm-demo binary"), "{err}");
}
