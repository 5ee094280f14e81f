//! Which models are served right now, learnt from worker heartbeats. A worker counts while its last
//! heartbeat is younger than its `ttl_ms` and it is not draining.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::bus::Bus;
use crate::protocol::{WorkerHeartbeat, WorkerModel};

#[derive(Default)]
pub struct Registry {
    workers: RwLock<HashMap<String, (WorkerHeartbeat, Instant)>>,
    /// Every model name (and alias) a worker ever announced: requests for them get 503, not 404, while
    /// no live worker serves them.
    known: RwLock<std::collections::HashSet<String>>,
}

/// What a request's `model` names.
#[derive(Debug, Clone)]
pub enum Lookup {
    Served(WorkerModel),
    /// Served before, but no live worker serves it now.
    Unserved,
    Unknown,
}

impl Registry {
    pub fn update(&self, hb: WorkerHeartbeat) {
        {
            let mut known = self.known.write().expect("registry lock");
            for m in &hb.models {
                known.insert(m.name.clone());
                known.extend(m.aliases.iter().cloned());
            }
        }
        self.workers
            .write()
            .expect("registry lock")
            .insert(hb.worker_id.clone(), (hb, Instant::now()));
    }

    fn live(&self) -> Vec<WorkerHeartbeat> {
        let now = Instant::now();
        let mut w = self.workers.write().expect("registry lock");
        // Forget workers silent for much longer than their TTL.
        w.retain(|_, (hb, seen)| {
            now.duration_since(*seen)
                < Duration::from_millis(hb.ttl_ms.saturating_mul(10).max(60_000))
        });
        w.values()
            .filter(|(hb, seen)| {
                !hb.draining && now.duration_since(*seen) <= Duration::from_millis(hb.ttl_ms)
            })
            .map(|(hb, _)| hb.clone())
            .collect()
    }

    /// Served models, one entry per name, sorted by name.
    pub fn models(&self) -> Vec<WorkerModel> {
        let mut by_name: HashMap<String, WorkerModel> = HashMap::new();
        for hb in self.live() {
            for m in hb.models {
                by_name.entry(m.name.clone()).or_insert(m);
            }
        }
        let mut v: Vec<WorkerModel> = by_name.into_values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The model a request's `model` names (its served name or an alias).
    pub fn lookup(&self, name: &str) -> Lookup {
        let models = self.models();
        let found = models
            .iter()
            .find(|m| m.name == name)
            .or_else(|| models.iter().find(|m| m.aliases.iter().any(|a| a == name)));
        match found {
            Some(m) => Lookup::Served(m.clone()),
            None if self.known.read().expect("registry lock").contains(name) => Lookup::Unserved,
            None => Lookup::Unknown,
        }
    }

    /// Where to send a job for `model` whose conversation prefixes have `digests` (digest_k for
    /// k = 1, 2, …; see `protocol::prefix`): the live worker holding the longest of them, when it
    /// has a free slot. `None`: nobody holds any, or the holder is busy (the shared queue then).
    pub fn route(&self, model: &str, digests: &[String]) -> Option<String> {
        let mut best: Option<(usize, bool, String)> = None;
        for hb in self.live() {
            let free = hb.active < hb.max_concurrent;
            for m in hb.models.iter().filter(|m| m.name == model) {
                let held: std::collections::HashSet<&str> =
                    m.prefixes.iter().map(String::as_str).collect();
                let Some(k) = digests.iter().rposition(|d| held.contains(d.as_str())) else {
                    continue;
                };
                if best
                    .as_ref()
                    .is_none_or(|(bk, bfree, _)| (k, free) > (*bk, *bfree))
                {
                    best = Some((k, free, hb.worker_id.clone()));
                }
            }
        }
        best.filter(|(_, free, _)| *free).map(|(_, _, w)| w)
    }

    /// Live workers and their free slots.
    pub fn workers(&self) -> (usize, u32) {
        let live = self.live();
        let free = live
            .iter()
            .map(|h| h.max_concurrent.saturating_sub(h.active))
            .sum();
        (live.len(), free)
    }

    /// Follows the bus's heartbeats until the stream ends; resubscribes after bus errors.
    pub fn spawn_follower(self: &Arc<Self>, bus: Arc<dyn Bus>) -> tokio::task::JoinHandle<()> {
        let reg = self.clone();
        tokio::spawn(async move {
            loop {
                match bus.heartbeats().await {
                    Ok(mut s) => {
                        while let Some(hb) = s.next().await {
                            reg.update(hb);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot follow worker heartbeats"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(id: &str, model: &str, draining: bool) -> WorkerHeartbeat {
        WorkerHeartbeat {
            worker_id: id.into(),
            models: vec![WorkerModel {
                name: model.into(),
                aliases: vec![format!("{model}/Q4")],
                context_length: 10,
                quant: None,
                vision: false,
                audio: false,
                created: 0,
                prefixes: vec![],
                max_token_bytes: None,
            }],
            max_concurrent: 2,
            active: 1,
            ttl_ms: 60_000,
            draining,
            version: None,
            completed: 0,
            started_ms: 0,
        }
    }

    #[test]
    fn lookup_by_name_and_alias() {
        let r = Registry::default();
        r.update(hb("w1", "a", false));
        r.update(hb("w2", "a", false));
        r.update(hb("w3", "b", true));
        assert_eq!(r.models().len(), 1);
        assert!(matches!(r.lookup("a"), Lookup::Served(_)));
        assert!(matches!(r.lookup("a/Q4"), Lookup::Served(_)));
        assert!(
            matches!(r.lookup("b"), Lookup::Unserved),
            "only a draining worker serves b"
        );
        assert!(matches!(r.lookup("c"), Lookup::Unknown));
        assert_eq!(r.workers(), (2, 2));
    }

    #[test]
    fn routes_to_the_longest_held_prefix_with_a_free_slot() {
        let r = Registry::default();
        let mut a = hb("w1", "a", false);
        a.models[0].prefixes = vec!["d1".into()];
        let mut b = hb("w2", "a", false);
        b.models[0].prefixes = vec!["d1".into(), "d2".into()];
        r.update(a.clone());
        r.update(b.clone());
        let digests = vec!["d1".to_string(), "d2".into(), "d3".into()];
        assert_eq!(r.route("a", &digests).as_deref(), Some("w2"));
        let tie = r.route("a", &digests[..1]);
        assert!(matches!(tie.as_deref(), Some("w1" | "w2")), "{tie:?}");
        assert_eq!(r.route("a", &["x".to_string()]), None);
        assert_eq!(r.route("b", &digests), None);
        // The holder is busy: the queue, not the second best.
        b.active = b.max_concurrent;
        r.update(b);
        assert_eq!(r.route("a", &digests), None);
    }
}
