//! A bounded LRU cache of encoder outputs keyed by the content hash of the media bytes, so the same
//! image or clip in a later request (e.g. the next turn of a conversation) is not encoded again.
//! It lives on the model's owner thread; hit and miss counts are shared for metrics.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::engine::tensor::FloatData;
use crate::models::ModelError;

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

    /// Encoder rows for `items`, in order (one `Vec` per item): cached ones from here, the others
    /// from one `encode` call over the missing items (in order; it returns one `Vec` per item),
    /// which are then cached.
    pub fn get_or_encode<T>(
        &mut self,
        items: &[&T],
        key: impl Fn(&T) -> MediaKey,
        encode: impl FnOnce(&[&T]) -> Result<Vec<Vec<f32>>, ModelError>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out: Vec<Option<Vec<f32>>> = items
            .iter()
            .map(|i| self.get(&key(i)).map(|f| f.to_f32_vec()))
            .collect();
        let missing: Vec<&T> = items
            .iter()
            .zip(&out)
            .filter(|(_, hit)| hit.is_none())
            .map(|(i, _)| *i)
            .collect();
        if !missing.is_empty() {
            let encoded = encode(&missing)?;
            if encoded.len() != missing.len() {
                return Err(ModelError::Config(format!(
                    "an encoder gave rows for {} of {} items",
                    encoded.len(),
                    missing.len()
                )));
            }
            let mut fill = out.iter_mut().filter(|hit| hit.is_none());
            for (item, rows) in missing.into_iter().zip(encoded) {
                self.put(key(item), FloatData::F32(rows.clone()));
                if let Some(slot) = fill.next() {
                    *slot = Some(rows);
                }
            }
        }
        Ok(out.into_iter().flatten().collect())
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

    #[test]
    fn only_the_missing_items_are_encoded() {
        let mut c = EncoderCache::new(1 << 10, Arc::default());
        let items = [b"a".as_slice(), b"b", b"c"];
        let key = |i: &[u8]| media_key("i", i);
        c.put(key(b"b"), FloatData::F32(vec![2.0]));
        let refs: Vec<&[u8]> = items.to_vec();
        let refs: Vec<&&[u8]> = refs.iter().collect();
        let mut seen = Vec::new();
        let rows = c
            .get_or_encode(
                &refs,
                |i| key(i),
                |missing| {
                    seen = missing.iter().map(|i| i.to_vec()).collect();
                    Ok(vec![vec![1.0], vec![3.0]])
                },
            )
            .unwrap();
        assert_eq!(seen, [b"a".to_vec(), b"c".to_vec()]);
        assert_eq!(rows, [vec![1.0], vec![2.0], vec![3.0]]);
        // Now all cached: no encoder call.
        let rows = c
            .get_or_encode(&refs, |i| key(i), |_| panic!("encoded again"))
            .unwrap();
        assert_eq!(rows.len(), 3);
        assert!(c
            .get_or_encode(&[&b"d".as_slice()], |i| key(i), |_| Ok(vec![]))
            .is_err());
    }
}
