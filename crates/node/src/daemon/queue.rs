//! A controller's work queue: each key at most once in the queue and at most once in flight (a
//! key triggered while it runs runs again after), a bounded number of workers, and retries of
//! keys that are not done with exponential backoff and jitter. The bookkeeping ([`Core`]) is
//! sans-IO — time and jitter are arguments — and tested deterministically; [`Queue`] drives it.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;

/// The first retry's delay.
pub(crate) const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// The longest retry delay: clients that cannot be built are retried at least this often.
pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// How a key's run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Nothing more to do until something changes.
    Done,
    /// Not done (not Ready): run again after a backoff.
    Retry,
}

/// The delay before retry number `failures` (1 for the first): [`BACKOFF_BASE`] doubled per
/// failure up to [`BACKOFF_CAP`], scaled by `jitter` in [-1, 1] by up to ±10 %, so that keys that
/// failed together do not retry in lockstep.
pub(crate) fn backoff(failures: u32, jitter: f64) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1 << failures.saturating_sub(1).min(16));
    exp.min(BACKOFF_CAP).mul_f64(1.0 + 0.1 * jitter.clamp(-1.0, 1.0))
}

/// The queue's state.
#[derive(Debug)]
pub(crate) struct Core<K> {
    ready: VecDeque<K>,
    queued: HashSet<K>,
    running: HashSet<K>,
    /// Triggered while running: queued again when done.
    again: HashSet<K>,
    /// Retries not yet due, by when they are.
    delayed: BTreeSet<(Instant, u64, K)>,
    due: HashMap<K, (Instant, u64)>,
    failures: HashMap<K, u32>,
    seq: u64,
}

impl<K: Clone + Eq + Hash + Ord> Default for Core<K> {
    fn default() -> Self {
        Core {
            ready: VecDeque::new(),
            queued: HashSet::new(),
            running: HashSet::new(),
            again: HashSet::new(),
            delayed: BTreeSet::new(),
            due: HashMap::new(),
            failures: HashMap::new(),
            seq: 0,
        }
    }
}

impl<K: Clone + Eq + Hash + Ord> Core<K> {
    /// Queues `key` now (a pending retry of it is dropped: this run replaces it).
    pub(crate) fn add(&mut self, key: K) {
        if let Some((at, seq)) = self.due.remove(&key) {
            self.delayed.remove(&(at, seq, key.clone()));
        }
        if self.running.contains(&key) {
            self.again.insert(key);
        } else if self.queued.insert(key.clone()) {
            self.ready.push_back(key);
        }
    }

    /// Queues `key` at `at`, unless it is queued or due sooner already.
    fn add_at(&mut self, key: K, at: Instant) {
        if self.queued.contains(&key) || self.again.contains(&key) {
            return;
        }
        if let Some(&(old, seq)) = self.due.get(&key) {
            if old <= at {
                return;
            }
            self.delayed.remove(&(old, seq, key.clone()));
        }
        self.seq += 1;
        self.delayed.insert((at, self.seq, key.clone()));
        self.due.insert(key, (at, self.seq));
    }

    /// The next key to run at `now`, marked running.
    pub(crate) fn next(&mut self, now: Instant) -> Option<K> {
        while let Some((at, _, _)) = self.delayed.first()
            && *at <= now
        {
            let (_, _, key) = self.delayed.pop_first().expect("first");
            self.due.remove(&key);
            if self.queued.insert(key.clone()) {
                self.ready.push_back(key);
            }
        }
        let key = self.ready.pop_front()?;
        self.queued.remove(&key);
        self.running.insert(key.clone());
        Some(key)
    }

    /// When the next retry is due, if one is waiting.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.delayed.first().map(|(at, _, _)| *at)
    }

    /// `key`'s run ended with `outcome` at `now`; `jitter` in [-1, 1] spreads its retry.
    pub(crate) fn done(&mut self, key: K, outcome: Outcome, now: Instant, jitter: f64) {
        self.running.remove(&key);
        match outcome {
            Outcome::Done => {
                self.failures.remove(&key);
            }
            Outcome::Retry => {
                let n = self.failures.entry(key.clone()).or_default();
                *n = n.saturating_add(1);
                let at = now + backoff(*n, jitter);
                if !self.again.contains(&key) {
                    self.add_at(key.clone(), at);
                }
            }
        }
        if self.again.remove(&key) {
            self.add(key);
        }
    }

    /// Forgets a key's failures and pending retry (its client is gone).
    pub(crate) fn forget(&mut self, key: &K) {
        self.failures.remove(key);
        if let Some((at, seq)) = self.due.remove(key) {
            self.delayed.remove(&(at, seq, key.clone()));
        }
    }

    /// Keys queued or running.
    pub(crate) fn busy(&self) -> usize {
        self.ready.len() + self.running.len()
    }
}

/// The queue shared by the triggers (which add) and the workers (which run).
pub(crate) struct Queue<K> {
    core: parking_lot::Mutex<Core<K>>,
    wake: tokio::sync::Notify,
}

impl<K: Clone + Eq + Hash + Ord + Send + 'static> Queue<K> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Queue {
            core: parking_lot::Mutex::new(Core::default()),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Queues `key` now.
    pub(crate) fn add(&self, key: K) {
        self.core.lock().add(key);
        self.wake.notify_one();
    }

    /// Queues every key of `keys` now.
    pub(crate) fn add_all(&self, keys: impl IntoIterator<Item = K>) {
        let mut core = self.core.lock();
        let mut n = 0;
        for k in keys {
            core.add(k);
            n += 1;
        }
        drop(core);
        for _ in 0..n {
            self.wake.notify_one();
        }
    }

    /// Forgets a key's retries.
    pub(crate) fn forget(&self, key: &K) {
        self.core.lock().forget(key);
    }

    /// Keys queued or running.
    pub(crate) fn busy(&self) -> usize {
        self.core.lock().busy()
    }

    /// Runs `workers` tasks that take keys and run `work` on them until the queue is dropped by
    /// everyone else.
    pub(crate) fn spawn_workers<F, Fut>(self: &Arc<Self>, workers: usize, work: F)
    where
        F: Fn(K) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Outcome> + Send,
    {
        let work = Arc::new(work);
        for _ in 0..workers.max(1) {
            let q = Arc::downgrade(self);
            let work = work.clone();
            tokio::spawn(async move {
                loop {
                    let Some(queue) = q.upgrade() else { return };
                    let (key, due) = {
                        let mut core = queue.core.lock();
                        (core.next(Instant::now()), core.next_due())
                    };
                    let Some(key) = key else {
                        let wait = due.map_or(Duration::from_secs(1), |d| d.saturating_duration_since(Instant::now()));
                        // Hold only the wake-up, not the queue, while idle: a dropped queue ends
                        // the workers.
                        let woken = async {
                            let notified = queue.wake.notified();
                            tokio::time::timeout(wait, notified).await
                        };
                        let _ = woken.await;
                        drop(queue);
                        continue;
                    };
                    // A panic in one client's reconcile must not end this worker, nor leave the
                    // key marked running for good: it is retried like any failure.
                    let outcome = std::panic::AssertUnwindSafe(work(key.clone()))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| {
                            tracing::error!("a reconcile panicked; retrying it");
                            Outcome::Retry
                        });
                    let jitter = f64::from(rand_core::RngCore::next_u32(&mut rand_core::OsRng)) / f64::from(u32::MAX)
                        * 2.0
                        - 1.0;
                    queue.core.lock().done(key, outcome, Instant::now(), jitter);
                    // A key queued again, or a retry due sooner, may need a worker that sleeps.
                    queue.wake.notify_one();
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_key_is_queued_once_and_runs_once_at_a_time() {
        let t = Instant::now();
        let mut q = Core::default();
        q.add("a");
        q.add("b");
        q.add("a");
        assert_eq!(q.next(t), Some("a"));
        // Triggered while it runs: not handed to a second worker, but run again after.
        q.add("a");
        assert_eq!(q.next(t), Some("b"));
        assert_eq!(q.next(t), None);
        q.done("a", Outcome::Done, t, 0.0);
        assert_eq!(q.next(t), Some("a"));
        q.done("a", Outcome::Done, t, 0.0);
        q.done("b", Outcome::Done, t, 0.0);
        assert_eq!(q.next(t), None);
        assert_eq!(q.busy(), 0);
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap_and_reset_when_done() {
        let t = Instant::now();
        let mut q = Core::default();
        let mut at = t;
        let mut delays = Vec::new();
        q.add("a");
        for _ in 0..6 {
            let k = q.next(at).expect("due");
            q.done(k, Outcome::Retry, at, 0.0);
            let due = q.next_due().unwrap();
            delays.push(due - at);
            assert_eq!(q.next(due - ms(1)), None, "not before it is due");
            at = due;
        }
        assert_eq!(delays, [ms(200), ms(400), ms(800), ms(1600), ms(2000), ms(2000)]);
        let k = q.next(at).unwrap();
        q.done(k, Outcome::Done, at, 0.0);
        q.add("a");
        let k = q.next(at).unwrap();
        q.done(k, Outcome::Retry, at, 0.0);
        assert_eq!(q.next_due().unwrap() - at, ms(200), "a success resets the backoff");
    }

    #[test]
    fn a_trigger_runs_a_waiting_retry_now_and_forget_drops_it() {
        let t = Instant::now();
        let mut q = Core::default();
        q.add("a");
        let k = q.next(t).unwrap();
        q.done(k, Outcome::Retry, t, 0.0);
        assert_eq!(q.next(t), None);
        q.add("a");
        assert_eq!(q.next(t), Some("a"), "an event does not wait for the backoff");
        q.done("a", Outcome::Retry, t, 0.0);
        q.forget(&"a");
        assert_eq!(q.next_due(), None);
        assert_eq!(q.next(t + Duration::from_secs(10)), None);
    }

    #[test]
    fn jitter_spreads_within_ten_percent() {
        assert_eq!(backoff(1, -1.0), ms(180));
        assert_eq!(backoff(1, 1.0), ms(220));
        assert_eq!(backoff(30, 0.0), BACKOFF_CAP);
        assert_eq!(backoff(30, 1.0), ms(2200));
    }

    #[tokio::test]
    async fn workers_run_keys_concurrently_up_to_their_number() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let q = Queue::new();
        let (now, peak, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (n, p, d) = (now.clone(), peak.clone(), done.clone());
        q.spawn_workers(3, move |_k: u32| {
            let (n, p, d) = (n.clone(), p.clone(), d.clone());
            async move {
                let running = n.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(ms(20)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                d.fetch_add(1, Ordering::SeqCst);
                Outcome::Done
            }
        });
        q.add_all(0..12);
        let deadline = Instant::now() + Duration::from_secs(5);
        while done.load(Ordering::SeqCst) < 12 && Instant::now() < deadline {
            tokio::time::sleep(ms(5)).await;
        }
        assert_eq!(done.load(Ordering::SeqCst), 12);
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }
}
