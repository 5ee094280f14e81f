//! A bounded LRU cache of encoder outputs keyed by the content hash of the media bytes, so the same
//! image or clip in a later request (e.g. the next turn of a conversation) is not encoded again.
//! It lives on the model's owner thread; hit and miss counts are shared for metrics.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::engine::tensor::FloatData;

/// SHA-256 of a media item's bytes (plus a domain tag, so an image and a clip never collide).
pub type MediaKey = [u8; 32];

pub fn media_key(kind: &str, bytes: &[u8]) -> MediaKey {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(bytes);
    h.finalize().into()
}

/// Hit/miss counters, readable from other threads.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

pub struct EncoderCache {
    entries: HashMap<MediaKey, FloatData>,
    /// Least recently used first.
    order: VecDeque<MediaKey>,
    bytes: usize,
    capacity: usize,
    stats: Arc<CacheStats>,
}

fn size_of(d: &FloatData) -> usize {
    match d {
        FloatData::F32(v) => v.len() * 4,
        FloatData::F16(v) => v.len() * 2,
    }
}

impl EncoderCache {
    /// `capacity` in bytes of cached features; 0 disables the cache.
    pub fn new(capacity: usize, stats: Arc<CacheStats>) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            capacity,
            stats,
        }
    }

    pub fn get(&mut self, key: &MediaKey) -> Option<FloatData> {
        match self.entries.get(key) {
            Some(v) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                if let Some(pos) = self.order.iter().position(|k| k == key) {
                    self.order.remove(pos);
                }
                self.order.push_back(*key);
                Some(v.clone())
            }
            None => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub fn put(&mut self, key: MediaKey, value: FloatData) {
        let size = size_of(&value);
        if size > self.capacity || self.entries.contains_key(&key) {
            return;
        }
        while self.bytes + size > self.capacity {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(v) = self.entries.remove(&old) {
                self.bytes -= size_of(&v);
            }
        }
        self.bytes += size;
        self.order.push_back(key);
        self.entries.insert(key, value);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_by_bytes() {
        let stats = Arc::new(CacheStats::default());
        let mut c = EncoderCache::new(32, stats.clone());
        let (a, b, d) = (
            media_key("i", b"a"),
            media_key("i", b"b"),
            media_key("i", b"d"),
        );
        assert_ne!(media_key("i", b"a"), media_key("a", b"a"));
        c.put(a, FloatData::F32(vec![1.0; 4]));
        c.put(b, FloatData::F32(vec![2.0; 4]));
        assert!(c.get(&a).is_some()); // a is now the most recent
        c.put(d, FloatData::F32(vec![3.0; 4])); // evicts b
        assert!(c.get(&b).is_none());
        assert!(c.get(&a).is_some() && c.get(&d).is_some());
        c.put(media_key("i", b"huge"), FloatData::F32(vec![0.0; 100])); // larger than the cache
        assert_eq!(c.len(), 2);
        assert_eq!(stats.hits.load(Ordering::Relaxed), 3);
        assert_eq!(stats.misses.load(Ordering::Relaxed), 1);
        let mut off = EncoderCache::new(0, Arc::default());
        off.put(a, FloatData::F32(vec![1.0]));
        assert!(off.is_empty());
    }
}
