//! Stored state the front ends share (the Responses API's stored responses): a key-value store with a
//! time to live and a size bound. The in-process bus keeps it in memory ([`MemoryStore`]); NATS keeps
//! it in a JetStream key-value bucket, so that any front end reads what another stored.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Bounds of the stored state (both stores).
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Entries older than this are gone.
    pub ttl: Duration,
    /// Most bytes held; the oldest entries go first (memory), or new ones are refused until old
    /// ones expire (JetStream's key-value buckets discard new writes).
    pub max_bytes: u64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 3600),
            max_bytes: 256 << 20,
        }
    }
}

/// The in-memory store: entries expire after the TTL; beyond the size bound the oldest go.
pub struct MemoryStore {
    limits: StoreLimits,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, (Instant, Bytes)>,
    /// Keys by age (a key put again is moved to the back: its stale entry is skipped).
    order: VecDeque<(Instant, String)>,
    bytes: u64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(StoreLimits::default())
    }
}

impl MemoryStore {
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            limits,
            inner: Mutex::default(),
        }
    }

    fn evict(&self, inner: &mut Inner, now: Instant) {
        while let Some((at, key)) = inner.order.front().cloned() {
            let expired = now.duration_since(at) >= self.limits.ttl;
            if !expired && inner.bytes <= self.limits.max_bytes {
                break;
            }
            inner.order.pop_front();
            // Only the entry this record is for (a later put of the key has its own record).
            if inner.map.get(&key).is_some_and(|(t, _)| *t == at) {
                if let Some((_, v)) = inner.map.remove(&key) {
                    inner.bytes -= v.len() as u64;
                }
            }
        }
    }

    /// Stores `value`; false when it alone exceeds the size bound.
    pub fn put(&self, key: &str, value: Bytes) -> bool {
        if value.len() as u64 > self.limits.max_bytes {
            return false;
        }
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("store lock");
        if let Some((_, old)) = inner.map.remove(key) {
            inner.bytes -= old.len() as u64;
        }
        inner.bytes += value.len() as u64;
        inner.map.insert(key.to_string(), (now, value));
        inner.order.push_back((now, key.to_string()));
        self.evict(&mut inner, now);
        true
    }

    pub fn get(&self, key: &str) -> Option<Bytes> {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("store lock");
        self.evict(&mut inner, now);
        inner.map.get(key).map(|(_, v)| v.clone())
    }

    pub fn delete(&self, key: &str) -> bool {
        let mut inner = self.inner.lock().expect("store lock");
        match inner.map.remove(key) {
            Some((_, v)) => {
                inner.bytes -= v.len() as u64;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_size_and_age() {
        let s = MemoryStore::new(StoreLimits {
            ttl: Duration::from_secs(3600),
            max_bytes: 10,
        });
        assert!(s.put("a", Bytes::from_static(b"1234")));
        assert!(s.put("b", Bytes::from_static(b"1234")));
        assert!(s.put("a", Bytes::from_static(b"12345")));
        // 4 + 5 bytes held; a third entry evicts the oldest (b).
        assert!(s.put("c", Bytes::from_static(b"12")));
        assert_eq!(s.get("b"), None);
        assert_eq!(s.get("a").as_deref(), Some(&b"12345"[..]));
        assert!(!s.put("big", Bytes::from(vec![0; 11])));
        assert!(s.delete("a"));
        assert!(!s.delete("a"));
        let s = MemoryStore::new(StoreLimits {
            ttl: Duration::from_millis(1),
            max_bytes: 10,
        });
        s.put("a", Bytes::from_static(b"1"));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.get("a"), None);
    }
}
