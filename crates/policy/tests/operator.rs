//! Operator policies from a directory (`--policy-dir`).

mod common;

use std::collections::BTreeMap;
use std::fs;

use common::{Mesh, now};
use nsm_policy::{PathInput, PolicyError, PolicySet, path_input};

const TENANT: &str = r#"package nsm

# Only clients labelled tenant=a may request the service s.
default valid := false

valid if input.service != "s"

valid if input.labels.tenant == "a"

reason := sprintf("service %s is for tenant a, not %s", [input.service, object.get(input.labels, "tenant", "none")])
"#;

fn input(mesh: &Mesh, service: &str, tenant: &str) -> PathInput {
    let labels = BTreeMap::from([("tenant".to_owned(), tenant.to_owned())]);
    path_input(
        2,
        &mesh.segments(),
        &mesh.nsmgr.spiffe_id,
        &mesh.nsmgr.cert_der,
        now(),
        service,
        &labels,
    )
}

#[test]
fn an_operator_policy_from_a_dir_refuses_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("tenant_a_only.rego"), TENANT).unwrap();
    fs::write(dir.path().join("README.md"), "not a policy").unwrap();
    let mut set = PolicySet::server_defaults();
    set.add_dir(dir.path()).unwrap();
    assert_eq!(
        set.names(),
        [
            "tokens_valid",
            "tokens_expired",
            "tokens_chained",
            "prev_token_signed",
            "tenant_a_only"
        ]
    );

    let mesh = Mesh::new();
    set.check(&input(&mesh, "s", "a")).unwrap();
    set.check(&input(&mesh, "other", "b")).unwrap();
    let r = set.check(&input(&mesh, "s", "b")).unwrap_err();
    assert_eq!(r.policy, "tenant_a_only");
    assert_eq!(
        r.to_string(),
        "policy tenant_a_only refused: service s is for tenant a, not b"
    );
}

#[test]
fn a_policy_without_reason_says_valid_is_false_or_undefined() {
    let mut set = PolicySet::new();
    set.add_policy("never", "package nsm\n\ndefault valid := false\n")
        .unwrap();
    let mesh = Mesh::new();
    assert_eq!(set.check(&input(&mesh, "s", "a")).unwrap_err().reason, "valid is false");

    let mut set = PolicySet::new();
    set.add_policy("undefined", "package nsm\n\nvalid if input.service == \"nope\"\n")
        .unwrap();
    let r = set.check(&input(&mesh, "s", "a")).unwrap_err();
    assert_eq!(
        (r.policy.as_str(), r.reason.as_str()),
        ("undefined", "valid is undefined")
    );
}

#[test]
fn deny_messages_are_the_reason() {
    let mut set = PolicySet::new();
    set.add_policy(
        "labels",
        r#"package nsm

deny contains "no tenant label" if not input.labels.tenant
deny contains "tenant b is suspended" if input.labels.tenant == "b"

valid if count(deny) == 0
"#,
    )
    .unwrap();
    let mesh = Mesh::new();
    set.check(&input(&mesh, "s", "a")).unwrap();
    assert_eq!(
        set.check(&input(&mesh, "s", "b")).unwrap_err().reason,
        "tenant b is suspended"
    );
}

#[test]
fn a_rego_v0_policy_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("v0.rego"),
        "package nsm\n\ndefault valid = false\n\nvalid {\n  input.labels.tenant == \"a\"\n}\n",
    )
    .unwrap();
    let mut set = PolicySet::new();
    set.add_dir(dir.path()).unwrap();
    let mesh = Mesh::new();
    set.check(&input(&mesh, "s", "a")).unwrap();
    assert_eq!(set.check(&input(&mesh, "s", "b")).unwrap_err().policy, "v0");
}

#[test]
fn a_file_named_like_a_default_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("tokens_expired.rego"), "package nsm\n\nvalid := true\n").unwrap();
    let mut set = PolicySet::server_defaults();
    set.add_dir(dir.path()).unwrap();
    assert_eq!(set.names().len(), 4);
    let mesh = Mesh::new();
    let mut segments = mesh.segments();
    let stale = now() - std::time::Duration::from_secs(1);
    segments[0].2 = nsm_policy::sign(&mesh.nsc.spiffe_id, &mesh.nsmgr.spiffe_id, stale, &mesh.nsc.key_der).unwrap();
    set.check(&mesh.input(&segments)).unwrap();
}

#[test]
fn a_file_that_does_not_parse_is_an_error_naming_it_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.rego");
    fs::write(&file, "package nsm\n\nvalid if {\n  input.service ==\n}\n").unwrap();
    let err = PolicySet::new().add_dir(dir.path()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PolicyError::Parse { .. }), "{text}");
    assert!(text.contains(&format!("{}:5:", file.display())), "{text}");
}

#[test]
fn a_file_without_valid_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("novalid.rego");
    fs::write(&file, "# a comment\npackage nsm\n\nallow := true\n").unwrap();
    let err = PolicySet::new().add_dir(dir.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("policy {}:2: defines no rule `valid`", file.display())
    );
}

#[test]
fn a_file_of_another_package_is_an_error() {
    let err = PolicySet::new()
        .add_policy("other", "package other\n\nvalid := true\n")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "policy other.rego:1: package is `other`, policies must be `package nsm`"
    );
}

#[test]
fn a_policy_calling_upstreams_jwt_builtins_is_an_error() {
    // Upstream's own policies call io.jwt.*, which regorus lacks: nsm hands claims over instead.
    let err = PolicySet::new()
        .add_policy("jwt", "package nsm\n\nvalid if io.jwt.decode(input.token)\n")
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("policy jwt.rego:3: io.jwt.* is not available"),
        "{err}"
    );
}

#[test]
fn a_policy_that_errors_on_some_input_still_loads() {
    PolicySet::new()
        .add_policy("zero", "package nsm\n\nvalid if 1 / 0 > 0\n")
        .unwrap();
}

#[test]
fn a_missing_dir_is_an_error_naming_it() {
    let err = PolicySet::new()
        .add_dir(std::path::Path::new("/nonexistent/policies"))
        .unwrap_err();
    assert!(err.to_string().starts_with("/nonexistent/policies: "), "{err}");
}

#[test]
fn an_evaluation_error_refuses() {
    let mut set = PolicySet::new();
    set.add_policy("divides", "package nsm\n\nvalid if 1 / count(input.labels) > 0\n")
        .unwrap();
    let mesh = Mesh::new();
    let labels = BTreeMap::new();
    let input = path_input(2, &mesh.segments(), "x", b"", now(), "s", &labels);
    let r = set.check(&input).unwrap_err();
    assert_eq!(r.policy, "divides");
    assert!(r.reason.starts_with("evaluation failed: --> divides.rego:3:12"), "{r}");
    assert!(r.reason.ends_with("divide by zero"), "{r}");
}
