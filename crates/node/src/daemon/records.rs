//! What this daemon wired for its clients, kept in its data directory: a client deleted while the
//! daemon was down is no longer in the registry when it restarts, and without a record its
//! interface would stay in the workload's namespace for good.
//!
//! One small file per client (`<data-dir>/wired/<hash>`), written when what stands for the client
//! changes and removed with it; lines: namespace, name, netns, interface, source address, the NAT
//! route (or empty). Only what removing the interface needs is kept.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use nsm_node_plan::ClientKey;

use nsm_mechanisms::link_name;

/// One client's record: its key and what stands for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) key: ClientKey,
    pub(super) netns: String,
    pub(super) interface: String,
    pub(super) src: IpNet,
    /// The route a gateway vWire masquerades `src` to, if it does.
    pub(super) nat_route: Option<IpNet>,
}

impl Record {
    fn encode(&self) -> String {
        let route = self.nat_route.map(|r| r.to_string()).unwrap_or_default();
        [
            self.key.namespace.as_str(),
            &self.key.name,
            &self.netns,
            &self.interface,
            &self.src.to_string(),
            &route,
        ]
        .join("\n")
    }

    fn decode(text: &str) -> Option<Record> {
        let l: Vec<&str> = text.split('\n').collect();
        let [ns, name, netns, interface, src, route] = l.as_slice() else {
            return None;
        };
        Some(Record {
            key: ClientKey::new(*ns, *name),
            netns: (*netns).to_owned(),
            interface: (*interface).to_owned(),
            src: src.parse().ok()?,
            nat_route: match *route {
                "" => None,
                r => Some(r.parse().ok()?),
            },
        })
    }
}

/// The records on disk, as last written (read once at start-up), so that unchanged ones are not
/// rewritten.
pub(super) struct Records {
    dir: PathBuf,
    written: HashMap<ClientKey, Record>,
}

impl Records {
    /// Opens (creating) `<data_dir>/wired` and reads what an earlier daemon recorded there
    /// (unreadable files are skipped, with a warning).
    pub(super) fn open(data_dir: &Path) -> io::Result<Records> {
        let dir = data_dir.join("wired");
        std::fs::create_dir_all(&dir)?;
        let mut written = HashMap::new();
        for e in std::fs::read_dir(&dir)?.flatten() {
            let path = e.path();
            if path.extension().is_some() {
                continue;
            }
            match std::fs::read_to_string(&path).ok().as_deref().and_then(Record::decode) {
                Some(r) => {
                    written.insert(r.key.clone(), r);
                }
                None => tracing::warn!(file = %path.display(), "unreadable vWire record; ignored"),
            }
        }
        Ok(Records { dir, written })
    }

    fn file(&self, key: &ClientKey) -> PathBuf {
        self.dir.join(link_name("", &format!("{}/{}", key.namespace, key.name)))
    }

    /// Writes `r` unless it is what stands already (atomically: a temporary file renamed).
    pub(super) fn save(&mut self, r: Record) {
        if self.written.get(&r.key) == Some(&r) {
            return;
        }
        let file = self.file(&r.key);
        let tmp = file.with_extension("tmp");
        let done = std::fs::write(&tmp, r.encode()).and_then(|()| std::fs::rename(&tmp, &file));
        match done {
            Ok(()) => {
                self.written.insert(r.key.clone(), r);
            }
            Err(e) => tracing::warn!(client = %r.key, file = %file.display(), error = %e, "recording a vWire"),
        }
    }

    /// Removes the record of `key`.
    pub(super) fn forget(&mut self, key: &ClientKey) {
        self.written.remove(key);
        match std::fs::remove_file(self.file(key)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(client = %key, error = %e, "removing a vWire's record"),
        }
    }

    /// Every record.
    pub(super) fn all(&self) -> Vec<Record> {
        self.written.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, nat: Option<&str>) -> Record {
        Record {
            key: ClientKey::new("default", name),
            netns: "/run/netns/pod".into(),
            interface: "nsm-1".into(),
            src: "10.70.0.1/32".parse().unwrap(),
            nat_route: nat.map(|r| r.parse().unwrap()),
        }
    }

    #[test]
    fn records_round_trip_and_go() {
        let dir = std::env::temp_dir().join(format!("nsm-records-{}", std::process::id()));
        let mut r = Records::open(&dir).unwrap();
        r.save(record("c1", None));
        r.save(record("c2", Some("10.0.0.5/32")));
        let mut all = Records::open(&dir).unwrap().all();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(all, vec![record("c1", None), record("c2", Some("10.0.0.5/32"))]);
        r.forget(&ClientKey::new("default", "c1"));
        assert_eq!(r.all(), vec![record("c2", Some("10.0.0.5/32"))]);
        assert_eq!(Record::decode("too\nfew"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
