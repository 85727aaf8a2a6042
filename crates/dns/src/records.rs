//! The live name table and the answers it gives.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use parking_lot::RwLock;

use crate::{DnsError, TTL};

/// The names of a vL3's members and their addresses, shared between the node daemon (which
/// updates it as members come and go) and the server (which answers from it).
///
/// Cloning is cheap and every clone sees the same table, so an update is visible to the next
/// query. Names are case-insensitive and fully qualified: `web-1.istio` and `WEB-1.istio.` are
/// the same name.
#[derive(Clone, Debug, Default)]
pub struct Records {
    // A BTreeMap keeps PTR answers (several names on one address) in a stable order.
    table: Arc<RwLock<BTreeMap<LowerName, Vec<IpAddr>>>>,
}

impl Records {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the addresses of `name`, replacing any it had. A name with no addresses still exists:
    /// queries for it get an empty answer rather than being forwarded.
    pub fn set(&self, name: &str, addrs: Vec<IpAddr>) -> Result<(), DnsError> {
        let key = parse_name(name)?;
        self.table.write().insert(key, dedup(addrs));
        Ok(())
    }

    /// Removes `name`; returns whether it was there. Queries for it are forwarded again.
    pub fn remove(&self, name: &str) -> bool {
        parse_name(name).is_ok_and(|key| self.table.write().remove(&key).is_some())
    }

    /// Replaces the whole table at once, so no query sees a half-applied update. If a name
    /// repeats, its last addresses win. On an invalid name the table is left as it was.
    pub fn replace_all<S: AsRef<str>>(
        &self,
        entries: impl IntoIterator<Item = (S, Vec<IpAddr>)>,
    ) -> Result<(), DnsError> {
        let table = entries
            .into_iter()
            .map(|(name, addrs)| Ok((parse_name(name.as_ref())?, dedup(addrs))))
            .collect::<Result<BTreeMap<_, _>, DnsError>>()?;
        *self.table.write() = table;
        Ok(())
    }

    /// The addresses of `name`, or `None` if it is not in the table.
    pub fn get(&self, name: &str) -> Option<Vec<IpAddr>> {
        let key = parse_name(name).ok()?;
        self.table.read().get(&key).cloned()
    }

    /// The answer records for a query, or `None` if the table does not know the name (so the
    /// query is forwarded). `Some` with no records is NODATA: the name exists, not that type.
    ///
    /// `owner` is the name as the client spelled it, echoed back because some resolvers check the
    /// case of the answer (DNS 0x20).
    pub(crate) fn answer(&self, owner: &Name, qtype: RecordType) -> Option<Vec<Record>> {
        let key = LowerName::new(owner);
        let table = self.table.read();
        if let Some(addrs) = table.get(&key) {
            let records = addrs
                .iter()
                .filter_map(|addr| match (addr, qtype) {
                    (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(*v4))),
                    (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(*v6))),
                    _ => None,
                })
                .map(|rdata| Record::from_rdata(owner.clone(), TTL, rdata))
                .collect();
            return Some(records);
        }
        // A reverse name is known when it is exactly one address that some member holds.
        let net = owner.parse_arpa_name().ok()?;
        if net.prefix_len() != net.max_prefix_len() {
            return None;
        }
        let addr = net.addr();
        let names: Vec<&LowerName> = table
            .iter()
            .filter(|(_, addrs)| addrs.contains(&addr))
            .map(|(name, _)| name)
            .collect();
        if names.is_empty() {
            return None;
        }
        if !matches!(qtype, RecordType::PTR | RecordType::ANY) {
            return Some(Vec::new());
        }
        Some(
            names
                .into_iter()
                .map(|name| Record::from_rdata(owner.clone(), TTL, RData::PTR(PTR(Name::from(name)))))
                .collect(),
        )
    }
}

/// Parses a name as given by the node daemon: case folded, trailing dot implied.
fn parse_name(name: &str) -> Result<LowerName, DnsError> {
    let invalid = |reason: String| DnsError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    let mut parsed = Name::from_ascii(name).map_err(|e| invalid(e.to_string()))?;
    parsed.set_fqdn(true);
    if parsed.is_root() {
        return Err(invalid("empty name".to_owned()));
    }
    Ok(LowerName::new(&parsed))
}

/// Drops repeated addresses: an RRset must not hold the same record twice.
fn dedup(addrs: Vec<IpAddr>) -> Vec<IpAddr> {
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn names_are_case_insensitive_and_fully_qualified() {
        let records = Records::new();
        records.set("Web-1.Istio", vec!["10.0.0.1".parse().unwrap()]).unwrap();
        assert_eq!(records.get("web-1.istio."), Some(vec!["10.0.0.1".parse().unwrap()]));
        assert_eq!(records.get("WEB-1.ISTIO"), Some(vec!["10.0.0.1".parse().unwrap()]));
        assert!(records.remove("web-1.ISTIO."));
        assert!(!records.remove("web-1.istio"));
        assert_eq!(records.get("web-1.istio"), None);
    }

    #[test]
    fn invalid_names_are_rejected_and_replace_all_is_atomic() {
        let records = Records::new();
        records.set("a.vl3", vec![]).unwrap();
        assert!(records.set("", vec![]).is_err());
        assert!(records.set(".", vec![]).is_err());
        assert!(records.set("a..b", vec![]).is_err());
        let bad = [("b.vl3", vec![]), ("x..y", vec![])];
        assert!(records.replace_all(bad).is_err());
        assert_eq!(records.get("a.vl3"), Some(vec![]));
        assert_eq!(records.get("b.vl3"), None);
    }

    #[test]
    fn ptr_only_for_whole_addresses_held() {
        let records = Records::new();
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        records.set("a.vl3", vec![v4, v4]).unwrap();
        records.set("b.vl3", vec![v4]).unwrap();
        let ptr = records.answer(&Name::from(v4), RecordType::PTR).unwrap();
        let targets: Vec<String> = ptr.iter().map(|r| r.data.to_string()).collect();
        assert_eq!(targets, ["a.vl3.", "b.vl3."]);
        assert_eq!(records.answer(&name("a.vl3."), RecordType::A).unwrap().len(), 1);
        // a /24 reverse zone name is not an address
        assert!(records.answer(&name("0.0.10.in-addr.arpa."), RecordType::PTR).is_none());
        assert!(
            records
                .answer(&name("2.0.0.10.in-addr.arpa."), RecordType::PTR)
                .is_none()
        );
        assert_eq!(records.answer(&Name::from(v4), RecordType::A), Some(vec![]));
    }
}
