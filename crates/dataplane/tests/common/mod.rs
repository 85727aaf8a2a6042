//! Test helpers: unique names and a guard that deletes, by exact name, everything a test created,
//! also when the test panics.

#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};

use nsm_dataplane::{NetNs, Netlink, named_path};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// `nsmt-PID-N`: unique per process and per call, recognisable as ours.
pub fn unique_name() -> String {
    format!(
        "nsmt-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes its links and namespaces (links first, then namespaces) when dropped.
#[derive(Default)]
pub struct Cleanup {
    namespaces: Vec<String>,
    links: Vec<(NetNs, String)>,
}

impl Cleanup {
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a fresh named namespace that this guard will delete.
    pub fn netns(&mut self) -> (String, NetNs) {
        let name = unique_name();
        self.namespaces.push(name.clone());
        let ns = NetNs::create(&name).expect("create netns");
        (name, ns)
    }

    /// Records a link to delete (by name, inside `ns`) before the namespaces go.
    pub fn link(&mut self, ns: &NetNs, name: &str) {
        self.links
            .push((ns.try_clone().expect("dup netns fd"), name.to_string()));
    }

    /// Drops the guard and checks that every namespace it created is gone.
    pub fn finish(self) {
        let names = self.namespaces.clone();
        drop(self);
        for n in names {
            assert!(!named_path(&n).exists(), "netns {n} still exists after cleanup");
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let links = std::mem::take(&mut self.links);
        if !links.is_empty() {
            // A dedicated thread with its own runtime: Drop may run inside (or outside) a runtime.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    for (ns, name) in links.iter().rev() {
                        if let Ok(nl) = Netlink::connect(ns).await {
                            let _ = nl.delete_link(name).await;
                        }
                    }
                });
            })
            .join();
        }
        for n in self.namespaces.iter().rev() {
            if let Err(e) = NetNs::delete(n)
                && !e.is_not_found()
            {
                eprintln!("cleanup: {e}");
            }
        }
    }
}
