//! Rego policies over a [`PathInput`], each `package nsm` with a boolean `valid`, as upstream's.

use std::path::Path;

use regorus::{Engine, Value};

use crate::{PathInput, PolicyError};

/// Upstream's default server-side set, in the order a refusal should be attributed: a token that
/// does not decode is reported as such, not as an expired or unchained one.
const SERVER_DEFAULTS: [(&str, &str); 4] = [
    ("tokens_valid", include_str!("../policies/tokens_valid.rego")),
    ("tokens_expired", include_str!("../policies/tokens_expired.rego")),
    ("tokens_chained", include_str!("../policies/tokens_chained.rego")),
    ("prev_token_signed", include_str!("../policies/prev_token_signed.rego")),
];

const VALID: &str = "data.nsm.valid";

/// A policy refused the request (the caller answers `PermissionDenied`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {policy} refused: {reason}")]
pub struct Refusal {
    /// The policy's name: its file name without `.rego`, e.g. `tokens_chained`.
    pub policy: String,
    pub reason: String,
}

/// An ordered set of compiled policies; every one must hold.
///
/// Each policy has an engine of its own because every policy is `package nsm` defining `valid`,
/// which would conflict in one engine. Engines are parsed and prepared once; a check clones them
/// (cheap: the compiled policy is shared behind an `Arc`).
#[derive(Clone, Default)]
pub struct PolicySet {
    policies: Vec<Policy>,
}

#[derive(Clone)]
struct Policy {
    name: String,
    engine: Engine,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet").field("policies", &self.names()).finish()
    }
}

impl PolicySet {
    /// An empty set: every request passes. Use [`PolicySet::server_defaults`] for a server.
    pub fn new() -> Self {
        Self::default()
    }

    /// Upstream's default server-side set (`common/*` + `server/*`): tokens_valid,
    /// tokens_expired, tokens_chained, prev_token_signed. Written here in Rego v1 over
    /// [`PathInput`] and embedded in the binary.
    ///
    /// They judge the left part of the path, segments `0..=index` (what the caller vouches for);
    /// later segments are left from an earlier request and the server replaces them. The policies
    /// refuse an `index` of 0: a caller that put no segment of its own proves nothing.
    pub fn server_defaults() -> Self {
        let mut set = Self::new();
        for (name, rego) in SERVER_DEFAULTS {
            // The embedded policies are tested; failing here is a build defect.
            #[allow(clippy::expect_used)]
            set.add_policy(name, rego).expect("embedded default policy compiles");
        }
        set
    }

    /// Adds every `*.rego` file of `dir` (operator policies, `--policy-dir`), in file-name order.
    /// A file whose name is already in the set replaces that policy, as a file on disk overrides
    /// upstream's embedded copy.
    ///
    /// Files are Rego v1; a file that is not v1 but parses as Rego v0 (upstream's sample
    /// policies) is accepted as v0. Upstream's `io.jwt.*` and `time.now_ns` are refused at load:
    /// policies read the claims nsm decoded and verified, and `input.now`.
    pub fn add_dir(&mut self, dir: &Path) -> Result<(), PolicyError> {
        let io = |source| PolicyError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_some_and(|e| e == "rego") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        for path in files {
            let rego = std::fs::read_to_string(&path).map_err(|source| PolicyError::Io {
                path: path.clone(),
                source,
            })?;
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.add_source(&name, &path.display().to_string(), &rego)?;
        }
        Ok(())
    }

    /// Adds (or replaces, by name) one policy; `name` is what a refusal reports.
    pub fn add_policy(&mut self, name: &str, rego: &str) -> Result<(), PolicyError> {
        self.add_source(name, &format!("{name}.rego"), rego)
    }

    /// The policies' names, in evaluation order.
    pub fn names(&self) -> Vec<String> {
        self.policies.iter().map(|p| p.name.clone()).collect()
    }

    /// Evaluates each policy's `data.nsm.valid` in order; the first that is not `true` refuses
    /// (undefined and evaluation errors refuse too: deny by default). The reason is the policy's
    /// `reason` (a string or a set of strings) or else its `deny` messages, or else
    /// "valid is false".
    pub fn check(&self, input: &PathInput) -> Result<(), Refusal> {
        if self.policies.is_empty() {
            return Ok(());
        }
        let input = match serde_json::to_value(input) {
            Ok(v) => Value::from(v),
            Err(e) => {
                return Err(Refusal {
                    policy: self.policies[0].name.clone(),
                    reason: format!("input does not serialise: {e}"),
                });
            }
        };
        for policy in &self.policies {
            policy.check(&input)?;
        }
        Ok(())
    }

    fn add_source(&mut self, name: &str, file: &str, rego: &str) -> Result<(), PolicyError> {
        let policy = Policy::compile(name, file, rego)?;
        match self.policies.iter_mut().find(|p| p.name == name) {
            Some(old) => *old = policy,
            None => self.policies.push(policy),
        }
        Ok(())
    }
}

impl Policy {
    fn compile(name: &str, file: &str, rego: &str) -> Result<Self, PolicyError> {
        let engine = match parse(file, rego, false) {
            Ok(engine) => engine,
            Err(v1) => match parse(file, rego, true) {
                Ok(engine) => {
                    tracing::debug!(file, "policy is not Rego v1; accepted as Rego v0");
                    engine
                }
                // The v1 error is the one to show: v1 is the syntax we ask for.
                Err(_) => {
                    return Err(PolicyError::Parse {
                        file: file.to_owned(),
                        message: v1.trim_start().to_owned(),
                    });
                }
            },
        };
        let shape = |message: String| PolicyError::Shape {
            file: file.to_owned(),
            line: package_line(rego),
            message,
        };
        let packages = engine
            .get_policy_package_components()
            .map_err(|e| shape(e.to_string()))?;
        let package = packages.first().map(|p| p.components.join(".")).unwrap_or_default();
        if package != "nsm" {
            return Err(shape(format!("package is `{package}`, policies must be `package nsm`")));
        }
        if let Some((line, builtin)) = upstream_only_builtin(rego) {
            return Err(PolicyError::Shape {
                file: file.to_owned(),
                line,
                message: format!(
                    "{builtin} is not available: nsm decodes and verifies path tokens itself and \
                     gives policies input.path_segments[_].claims, .signature_verified and input.now"
                ),
            });
        }
        if !engine
            .has_declared_rule_rooted_at(file, "valid")
            .map_err(|e| shape(e.to_string()))?
        {
            return Err(shape("defines no rule `valid`".to_owned()));
        }
        let mut policy = Self {
            name: name.to_owned(),
            engine,
        };
        // Prepare once (analysis, scheduling, builtin resolution: an unknown function such as
        // upstream's `io.jwt.decode` fails here) so every clone in `check` starts prepared.
        policy
            .engine
            .compile_with_entrypoint(&VALID.into())
            .map_err(|e| PolicyError::Parse {
                file: file.to_owned(),
                message: e.to_string().trim_start().to_owned(),
            })?;
        Ok(policy)
    }

    fn check(&self, input: &Value) -> Result<(), Refusal> {
        let mut engine = self.engine.clone();
        engine.set_input(input.clone());
        let refuse = |reason: String| Refusal {
            policy: self.name.clone(),
            reason,
        };
        match engine.eval_rule(VALID.to_owned()) {
            Ok(Value::Bool(true)) => Ok(()),
            Ok(Value::Undefined) => Err(refuse(reason(&mut engine, "valid is undefined"))),
            Ok(Value::Bool(false)) => Err(refuse(reason(&mut engine, "valid is false"))),
            Ok(other) => Err(refuse(format!("valid is {other}, not a boolean"))),
            Err(e) => {
                tracing::warn!(policy = %self.name, error = %e, "policy evaluation failed");
                Err(refuse(format!("evaluation failed: {}", e.to_string().trim_start())))
            }
        }
    }
}

fn parse(file: &str, rego: &str, v0: bool) -> Result<Engine, String> {
    let mut engine = Engine::new();
    engine.set_rego_v0(v0);
    engine
        .add_policy(file.to_owned(), rego.to_owned())
        .map_err(|e| e.to_string())?;
    Ok(engine)
}

/// The policy's own explanation of a refusal: `reason`, else `deny`, else `fallback`.
fn reason(engine: &mut Engine, fallback: &str) -> String {
    for rule in ["data.nsm.reason", "data.nsm.deny"] {
        let Ok(value) = engine.eval_rule(rule.to_owned()) else {
            continue; // not defined by this policy
        };
        let messages: Vec<String> = match &value {
            Value::String(s) => vec![s.to_string()],
            Value::Set(s) => s.iter().filter_map(text).collect(),
            Value::Array(a) => a.iter().filter_map(text).collect(),
            _ => Vec::new(),
        };
        if !messages.is_empty() {
            return messages.join("; ");
        }
    }
    fallback.to_owned()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.to_string()),
        Value::Undefined | Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// Builtins upstream's policies call that regorus lacks (they would only fail, and refuse, at
/// evaluation): the first use, with its 1-based line.
fn upstream_only_builtin(rego: &str) -> Option<(usize, &'static str)> {
    rego.lines().enumerate().find_map(|(i, line)| {
        let code = line.split('#').next().unwrap_or_default();
        ["io.jwt.", "time.now_ns"]
            .into_iter()
            .find(|b| code.contains(b))
            .map(|b| (i + 1, if b == "io.jwt." { "io.jwt.*" } else { b }))
    })
}

/// The 1-based line of the `package` clause, to point at when a policy has the wrong shape.
fn package_line(rego: &str) -> usize {
    rego.lines()
        .position(|l| l.trim_start().starts_with("package"))
        .map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + Clone>() {}

    #[test]
    fn policy_set_is_shareable() {
        assert_send_sync::<PolicySet>();
    }

    #[test]
    fn defaults_are_rego_v1() {
        for (name, rego) in SERVER_DEFAULTS {
            assert!(parse(name, rego, false).is_ok(), "{name} is not Rego v1");
        }
    }

    #[test]
    fn defaults_compile_in_order() {
        assert_eq!(
            PolicySet::server_defaults().names(),
            ["tokens_valid", "tokens_expired", "tokens_chained", "prev_token_signed"]
        );
    }
}
