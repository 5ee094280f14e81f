//! The prefix cache: the KV of finished sequences, kept so that a later sequence whose prompt starts
//! the same way (the next turn of a conversation, a shared system prompt, another sample of the same
//! prompt) feeds only what differs.
//!
//! An entry is the KV a sequence left (its prompt plus the generated tokens that were fed back) and
//! one key per position. Keys are token ids, except at media soft-token positions, where they carry
//! the media item's content hash, so the same token ids with a different image are a miss (the
//! families compute them). A lookup takes the entry with the **longest common prefix** of keys within
//! the same *scope* (API key + `cache_salt`: a sequence never reads KV made under another scope) and
//! copies that many positions out of it; entries stay immutable, so one entry serves any number of
//! concurrent sequences. Prefixes of a sequence's KV are exact: a position's keys and values depend
//! only on the positions before it.
//!
//! The cache is bounded by bytes (`--kv-cache-mb`), least recently used first out. An entry whose
//! keys are a prefix of a newer entry's is redundant (every lookup matches the newer one at least as
//! far) and is dropped when the newer one arrives: a conversation keeps one entry, not one per turn.
//! Lookup is a linear scan over the entries' keys: a few hundred entries of a few thousand positions
//! is well under a millisecond, next to a prefill step of tens of milliseconds or more.
//!
//! Entries also carry opaque *tags* (the conversation digests the worker announces for routing, see
//! `protocol::prefix`); the tags of live entries are published in [`PrefixCache::tags`].

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::kv::{KvCache, KvLayout};
use super::EngineError;

/// Counters and gauges, readable from other threads (for `/metrics`).
#[derive(Debug, Default)]
pub struct PrefixCacheStats {
    /// Prompt positions served from the cache.
    pub hit_tokens: AtomicU64,
    /// Prompt positions that had to be computed.
    pub miss_tokens: AtomicU64,
    /// Entries dropped to make room (not counting redundant ones replaced by their extension).
    pub evictions: AtomicU64,
    pub bytes: AtomicI64,
    pub entries: AtomicI64,
}

struct Entry {
    scope: String,
    keys: Vec<u64>,
    kv: KvCache,
    bytes: usize,
    last_used: u64,
    tags: Vec<String>,
}

/// Tags published per entry at most, and in all.
const TAGS_PER_ENTRY: usize = 8;
const TAGS_MAX: usize = 512;

pub struct PrefixCache {
    budget: usize,
    /// Bytes of the budget taken by live sequences (the decode batch's KV).
    reserved: usize,
    entries: Vec<Entry>,
    used: usize,
    clock: u64,
    stats: Arc<PrefixCacheStats>,
    tags: Arc<Mutex<Vec<String>>>,
}

/// A reusable prefix: its length and the KV of those positions (a copy).
pub struct PrefixHit {
    pub len: usize,
    pub kv: KvCache,
}

fn common_prefix(a: &[u64], b: &[u64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// `budget` in bytes of KV kept; 0 disables the cache.
    pub fn new(budget: usize, stats: Arc<PrefixCacheStats>) -> Self {
        Self {
            budget,
            reserved: 0,
            entries: Vec::new(),
            used: 0,
            clock: 0,
            stats,
            tags: Arc::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    pub fn stats(&self) -> &Arc<PrefixCacheStats> {
        &self.stats
    }

    /// The tags of the live entries, most recently used first (at most 512), kept up to date.
    pub fn tags(&self) -> Arc<Mutex<Vec<String>>> {
        self.tags.clone()
    }

    /// Publishes the tags into `tags` (shared with another thread) from now on.
    pub fn share_tags(&mut self, tags: Arc<Mutex<Vec<String>>>) {
        self.tags = tags;
        self.publish();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.used
    }

    /// Live sequences take `bytes` of the budget: entries go (least recently used first) until the
    /// rest fits.
    pub fn set_reserved(&mut self, bytes: usize) {
        if !self.enabled() || bytes == self.reserved {
            return;
        }
        let grew = bytes > self.reserved;
        self.reserved = bytes;
        if grew {
            self.evict_until(0);
            self.publish();
        }
    }

    /// Evicts least recently used entries until `extra` more bytes fit beside the reserved ones
    /// (or nothing is left).
    fn evict_until(&mut self, extra: usize) {
        while !self.entries.is_empty() && self.used + extra + self.reserved > self.budget {
            let Some(lru) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used)
            else {
                break;
            };
            let old = self.entries.swap_remove(lru);
            self.used -= old.bytes;
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The longest prefix of `keys` (at most `max_len` positions) held under `scope`, copied out.
    /// `None` when nothing matches (or the cache is off).
    pub fn lookup(
        &mut self,
        layout: &KvLayout,
        scope: &str,
        keys: &[u64],
        max_len: usize,
    ) -> Result<Option<PrefixHit>, EngineError> {
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.scope == scope)
            .map(|(i, e)| (i, common_prefix(&e.keys, keys).min(max_len)))
            // A cache whose sliding-window buffers were trimmed gives only prefixes that end after
            // the window it still holds.
            .filter(|&(i, n)| {
                n > 0 && (n == self.entries[i].kv.len || n >= self.entries[i].kv.min_prefix)
            })
            .max_by_key(|&(i, n)| (n, self.entries[i].last_used));
        let Some((i, len)) = best else {
            return Ok(None);
        };
        self.clock += 1;
        self.entries[i].last_used = self.clock;
        let kv = self.entries[i].kv.prefix(layout, len)?;
        self.publish();
        Ok(Some(PrefixHit { len, kv }))
    }

    /// Keeps `kv` (whose first positions have `keys`) under `scope`. `keys` longer than the cache are
    /// cut to it. Entries made redundant by this one go; least recently used ones go until it fits.
    pub fn insert(&mut self, scope: &str, mut keys: Vec<u64>, kv: KvCache, tags: Vec<String>) {
        if !self.enabled() || kv.len == 0 {
            return;
        }
        keys.truncate(kv.len);
        if keys.len() < kv.len {
            return; // positions without keys could never be matched safely
        }
        self.clock += 1;
        // Already covered by an entry that extends it (and can give this prefix): keep that one,
        // refresh it, add the tags.
        if let Some(e) = self.entries.iter_mut().find(|e| {
            e.scope == scope
                && e.keys.len() >= keys.len()
                && e.keys.starts_with(&keys)
                && (e.kv.len == keys.len() || e.kv.min_prefix <= keys.len())
        }) {
            e.last_used = self.clock;
            merge_tags(&mut e.tags, tags);
            self.publish();
            return;
        }
        let bytes = kv.bytes();
        if bytes > self.budget {
            self.publish();
            return;
        }
        let mut tags = tags;
        let mut i = 0;
        while i < self.entries.len() {
            let e = &self.entries[i];
            let covered = kv.len == e.keys.len() || kv.min_prefix <= e.keys.len();
            if e.scope == scope && keys.starts_with(&e.keys) && covered {
                let old = self.entries.swap_remove(i);
                self.used -= old.bytes;
                merge_tags(&mut tags, old.tags);
            } else {
                i += 1;
            }
        }
        self.evict_until(bytes);
        self.used += bytes;
        tags.truncate(TAGS_PER_ENTRY);
        self.entries.push(Entry {
            scope: scope.to_string(),
            keys,
            kv,
            bytes,
            last_used: self.clock,
            tags,
        });
        self.publish();
    }

    fn publish(&self) {
        self.stats.bytes.store(self.used as i64, Ordering::Relaxed);
        self.stats
            .entries
            .store(self.entries.len() as i64, Ordering::Relaxed);
        let mut order: Vec<&Entry> = self.entries.iter().collect();
        order.sort_by_key(|e| std::cmp::Reverse(e.last_used));
        let tags: Vec<String> = order
            .iter()
            .flat_map(|e| e.tags.iter().cloned())
            .take(TAGS_MAX)
            .collect();
        if let Ok(mut t) = self.tags.lock() {
            *t = tags;
        }
    }
}

/// `new` first, then the old tags not already there.
fn merge_tags(into: &mut Vec<String>, old: Vec<String>) {
    let mut merged: Vec<String> = Vec::with_capacity(into.len() + old.len());
    for t in std::mem::take(into).into_iter().chain(old) {
        if !merged.contains(&t) {
            merged.push(t);
        }
    }
    merged.truncate(TAGS_PER_ENTRY);
    *into = merged;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv::KvSlot;
    use crate::engine::session::ElemType;
    use crate::engine::tensor::{self, FloatData};

    /// A layout of one `[1, 2, seq, 3]` f32 tensor, and a cache whose value at position p, head h,
    /// element d is `p*100 + h*10 + d`.
    fn layout() -> KvLayout {
        crate::engine::runtime::init(None).expect("ONNX Runtime (run `make setup` first)");
        KvLayout {
            slots: vec![KvSlot {
                past: "past_key_values.0.key".into(),
                present: "present.0.key".into(),
                dtype: ElemType::F32,
                empty_shape: vec![1, 2, 0, 3],
                seq_axis: 2,
                local: false,
            }],
            fused: None,
        }
    }

    fn cache(len: usize) -> KvCache {
        layout();
        let mut v = Vec::new();
        for h in 0..2 {
            for p in 0..len {
                for d in 0..3 {
                    v.push((p * 100 + h * 10 + d) as f32);
                }
            }
        }
        KvCache::new(
            vec![FloatData::F32(v)
                .into_value(&[1, 2, len as i64, 3])
                .unwrap()],
            len,
        )
    }

    fn values(kv: &KvCache) -> Vec<f32> {
        tensor::extract_floats(&kv.values[0])
            .unwrap()
            .0
            .to_f32_vec()
    }

    fn keys(n: usize, tail: u64) -> Vec<u64> {
        let mut k: Vec<u64> = (0..n as u64).collect();
        if let Some(l) = k.last_mut() {
            *l += tail;
        }
        k
    }

    #[test]
    fn a_prefix_copy_holds_the_first_positions_of_every_head() {
        let kv = cache(5).prefix(&layout(), 2).unwrap();
        assert_eq!(kv.len, 2);
        assert_eq!(
            values(&kv),
            vec![0., 1., 2., 100., 101., 102., 10., 11., 12., 110., 111., 112.]
        );
        assert_eq!(kv.bytes(), 2 * 2 * 3 * 4);
        assert_eq!(layout().bytes_per_position(), 2 * 3 * 4);
        assert!(cache(2).prefix(&layout(), 3).is_err());
    }

    #[test]
    fn longest_common_prefix_within_the_scope() {
        let stats = Arc::new(PrefixCacheStats::default());
        let mut c = PrefixCache::new(1 << 20, stats.clone());
        c.insert("a", keys(6, 0), cache(6), vec!["t6".into()]);
        c.insert("a", keys(4, 1000), cache(4), vec![]);
        // Shares 5 keys with the first entry, 3 with the second.
        let hit = c
            .lookup(&layout(), "a", &keys(8, 0)[..5], 100)
            .unwrap()
            .unwrap();
        assert_eq!(hit.len, 5);
        assert_eq!(values(&hit.kv)[..3], [0., 1., 2.]);
        // Capped (a prompt keeps at least its last token to compute).
        assert_eq!(
            c.lookup(&layout(), "a", &keys(6, 0), 5)
                .unwrap()
                .unwrap()
                .len,
            5
        );
        // Another scope sees nothing; a first key that differs is a miss.
        assert!(c.lookup(&layout(), "b", &keys(6, 0), 6).unwrap().is_none());
        assert!(c.lookup(&layout(), "a", &[9, 9], 2).unwrap().is_none());
        assert_eq!(*c.tags().lock().unwrap(), vec!["t6".to_string()]);
    }

    #[test]
    fn extensions_replace_their_prefixes_and_the_budget_evicts_lru() {
        let stats = Arc::new(PrefixCacheStats::default());
        let one = cache(1).bytes();
        let mut c = PrefixCache::new(one * 10, stats.clone());
        c.insert("s", keys(3, 0), cache(3), vec!["turn1".into()]);
        c.insert("s", keys(6, 0), cache(6), vec!["turn2".into()]);
        assert_eq!(c.len(), 1, "turn 1 is a prefix of turn 2");
        assert_eq!(
            *c.tags().lock().unwrap(),
            vec!["turn2".to_string(), "turn1".to_string()]
        );
        // A prefix of what is held adds nothing.
        c.insert("s", keys(2, 0), cache(2), vec![]);
        assert_eq!((c.len(), c.bytes()), (1, 6 * one));
        // 6 + 4 fits; 6 + 4 + 3 does not: the least recently used goes.
        c.insert("s", keys(4, 500), cache(4), vec![]);
        assert_eq!(c.bytes(), 10 * one);
        c.lookup(&layout(), "s", &keys(6, 0), 6).unwrap().unwrap(); // touch the 6-entry
        c.insert("s", keys(3, 900), cache(3), vec![]);
        assert_eq!(c.len(), 2);
        assert_eq!(c.bytes(), 9 * one);
        assert_eq!(stats.evictions.load(Ordering::Relaxed), 1);
        assert!(
            c.lookup(&layout(), "s", &keys(4, 500), 4)
                .unwrap()
                .unwrap()
                .len
                < 4
        );
        // Larger than the whole budget: not kept; 0 = off.
        c.insert("s", keys(11, 7), cache(11), vec![]);
        assert_eq!(c.len(), 2);
        let mut off = PrefixCache::new(0, stats);
        off.insert("s", keys(3, 0), cache(3), vec![]);
        assert!(off.is_empty());
    }
}
