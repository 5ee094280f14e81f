//! KV for batched decoding: the sequences that are decoding share one decoder run, one row each.
//!
//! **Layout.** Every cache tensor of the batch is `[rows, …, width, …]` (the graph's own layout with
//! the batch axis filled), and each row's positions are *left-padded*: a row that holds `len`
//! positions keeps them in `width - len .. width`, zeros before. The run's `attention_mask` is 0 over
//! the padding and 1 elsewhere; `position_ids` are each row's own. Left padding keeps the distance
//! between the new position (`width`) and every cached one equal to the row's own, which is what a
//! graph that builds its causal and sliding-window masks from the past *length* compares.
//!
//! **Cost.** Between steps the batch lives in the graph's `present.*` outputs, moved into the next
//! run's inputs: no copy beyond the graph's own concatenation. Only when rows join or leave is the
//! batch rebuilt, once for all the changes of that step: one host copy of the rows that stay (plus
//! the joining rows), i.e. as many bytes as one decode step's concatenation already writes, and
//! the padding shrinks to what the longest remaining row needs. A leaving row's positions are copied
//! out (its KV goes to the prefix cache). The batch's bytes (padding included) count against the
//! prefix cache's budget ([`super::prefix_cache::PrefixCache::set_reserved`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ort::value::DynValue;

use super::kv::{self, KvCache, KvLayout, KvState};
use super::tensor;
use super::EngineError;
use crate::error::{ClassifiedError, ErrorClass};

/// A row's owner-chosen id (unique among the rows of one batch).
pub type RowId = u64;

/// The rows' KV of a batch, left-padded to a common width.
pub struct BatchKv {
    values: Vec<DynValue>,
    width: usize,
    /// Row order of the tensors.
    rows: Vec<Row>,
}

/// One row of a batch: its id, positions held and (fused decoders) where its sliding-window buffers
/// start ([`KvCache::local_start`]).
#[derive(Debug, Clone, Copy)]
struct Row {
    id: RowId,
    len: usize,
    local_start: usize,
    min_prefix: usize,
}

impl Row {
    fn of(id: RowId, c: &KvCache) -> Self {
        Self {
            id,
            len: c.len,
            local_start: c.local_start,
            min_prefix: c.min_prefix,
        }
    }

    fn local_len(&self) -> usize {
        self.len - self.local_start
    }
}

impl KvState for BatchKv {
    fn values(&self) -> &[DynValue] {
        &self.values
    }
    fn width(&self) -> usize {
        self.width
    }
    fn row_lens(&self) -> Vec<usize> {
        self.rows.iter().map(|r| r.len).collect()
    }
    fn local_lens(&self) -> Vec<usize> {
        self.rows.iter().map(Row::local_len).collect()
    }
    fn advance(&mut self, values: Vec<DynValue>, n: usize) {
        self.values = values;
        self.advance_in_place(n);
    }
    fn values_mut(&mut self) -> &mut [DynValue] {
        &mut self.values
    }
    fn reserve(&mut self, layout: &KvLayout, n: usize) -> Result<(), EngineError> {
        let longest_local = |rows: &[Row]| rows.iter().map(Row::local_len).max().unwrap_or(0);
        if let Some(keep) = layout.keep() {
            if kv::capacity(layout, &self.values, true) < longest_local(&self.rows) + n {
                for (r, row) in self.rows.iter_mut().enumerate() {
                    let held = row.local_len();
                    if held <= keep {
                        continue;
                    }
                    for (slot, v) in layout.slots.iter().zip(self.values.iter_mut()) {
                        if slot.local {
                            kv::shift_positions(v, r, held - keep, keep, slot.seq_axis)?;
                        }
                    }
                    row.local_start += held - keep;
                    row.min_prefix = layout.min_prefix_of(row.local_start);
                }
            }
        }
        if kv::capacity(layout, &self.values, false) >= self.width + n
            && kv::capacity(layout, &self.values, true) >= longest_local(&self.rows) + n
        {
            return Ok(());
        }
        let sources: Vec<Source> = self
            .rows
            .iter()
            .enumerate()
            .map(|(row, r)| Source {
                values: &self.values,
                row,
                start: self.start(layout, row),
                len: r.len,
                local: r.local_len(),
            })
            .collect();
        let grown = rebuild(layout, &sources, self.rows.clone(), n)?;
        drop(sources);
        *self = grown;
        Ok(())
    }
    fn advance_in_place(&mut self, n: usize) {
        self.width += n;
        for r in &mut self.rows {
            r.len += n;
        }
    }
}

impl BatchKv {
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Bytes the batch's tensors hold (padding included).
    pub fn bytes(&self) -> usize {
        self.values.iter().map(tensor::value_bytes).sum()
    }
}

/// One source row of a rebuild: a tensor per slot, the row in it, and where its positions are.
struct Source<'a> {
    values: &'a [DynValue],
    row: usize,
    start: usize,
    len: usize,
    /// Positions its sliding-window buffers hold (from 0).
    local: usize,
}

/// Builds the batch's tensors from `sources` (one row each, in order). Unfused: `[rows, …, longest,
/// …]`, each row's positions at the right end. Fused ([`KvLayout::fused`]): buffers with room for
/// `extra` more positions past the longest row, each row's positions from 0.
fn rebuild(
    layout: &KvLayout,
    sources: &[Source],
    rows: Vec<Row>,
    extra: usize,
) -> Result<BatchKv, EngineError> {
    let Some(first) = sources.first() else {
        return Err(EngineError::Tensor("a batch of no rows".into()));
    };
    let longest = sources.iter().map(|s| s.len).max().unwrap_or(0);
    let fused = layout.fused.is_some();
    let longest_local = sources.iter().map(|s| s.local).max().unwrap_or(0);
    let cap = if fused {
        kv::grown_capacity(longest + extra)
    } else {
        longest
    };
    let local_cap = kv::grown_capacity(longest_local + extra);
    let mut values = Vec::with_capacity(layout.slots.len());
    for (i, slot) in layout.slots.iter().enumerate() {
        let (ty, mut shape) = tensor::value_info(&first.values[i])?;
        if slot.seq_axis >= shape.len() {
            return Err(EngineError::Tensor(format!(
                "{}: a {shape:?} cache tensor has no axis {}",
                slot.past, slot.seq_axis
            )));
        }
        shape[0] = sources.len() as i64;
        shape[slot.seq_axis] = if slot.local { local_cap } else { cap } as i64;
        let mut out = tensor::alloc(ty, &shape)?;
        for (b, s) in sources.iter().enumerate() {
            let (start, len) = if slot.local {
                (0, s.local)
            } else {
                (s.start, s.len)
            };
            let at = if fused { 0 } else { cap - s.len };
            kv::copy_positions(
                &s.values[i],
                s.row,
                start,
                &mut out,
                b,
                at,
                len,
                slot.seq_axis,
            )
            .map_err(|e| EngineError::Tensor(format!("{}: {e}", slot.past)))?;
        }
        values.push(out);
    }
    Ok(BatchKv {
        values,
        width: longest,
        rows,
    })
}

impl BatchKv {
    /// Where row `row`'s positions start in the tensors.
    fn start(&self, layout: &KvLayout, row: usize) -> usize {
        if layout.fused.is_some() {
            0
        } else {
            self.width - self.rows[row].len
        }
    }
}

/// What a decode batch shares with the rest of the process (metrics, `inspect`, tests).
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Most rows a run takes (1 = no batching).
    pub max_rows: AtomicUsize,
    /// Why the model does not batch, when it does not.
    pub refused: Mutex<Option<String>>,
    /// Rows in the last run.
    pub rows: AtomicUsize,
    /// Batched runs, and the rows they advanced in all.
    pub runs: AtomicU64,
    pub row_steps: AtomicU64,
    /// Times the batch's tensors were rebuilt because rows joined or left.
    pub rebuilds: AtomicU64,
    /// The decoder's attention is fused and its KV cache written in place ([`KvLayout::fused`]).
    pub fused_attention: std::sync::atomic::AtomicBool,
}

impl BatchStats {
    /// Most rows per run, or why there is no batching.
    pub fn status(&self) -> Result<usize, String> {
        match self.refused.lock().unwrap().clone() {
            Some(why) => Err(why),
            None => Ok(self.max_rows.load(Ordering::Relaxed)),
        }
    }
}

/// The decode batch of an owner thread: rows join (with their KV) and leave between runs; each run
/// feeds every row the id set for it and leaves each row's logits to be taken.
pub struct DecodeBatch {
    max_rows: usize,
    kv: Option<BatchKv>,
    joining: Vec<(RowId, KvCache)>,
    /// Rows of `kv` that left and are dropped at the next [`Self::prepare`].
    left: Vec<RowId>,
    next: HashMap<RowId, u32>,
    results: HashMap<RowId, Result<Vec<f32>, ClassifiedError>>,
    stats: Arc<BatchStats>,
}

impl DecodeBatch {
    /// `max_rows` = most rows one run takes (≤ 1 = no batching).
    pub fn new(max_rows: usize) -> Self {
        Self::with_stats(max_rows, Arc::default())
    }

    pub fn with_stats(max_rows: usize, stats: Arc<BatchStats>) -> Self {
        stats.max_rows.store(max_rows, Ordering::Relaxed);
        Self {
            max_rows,
            kv: None,
            joining: Vec::new(),
            left: Vec::new(),
            next: HashMap::new(),
            results: HashMap::new(),
            stats,
        }
    }

    pub fn stats(&self) -> &Arc<BatchStats> {
        &self.stats
    }

    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Rows in the batch or joining it (not those that left).
    pub fn rows(&self) -> usize {
        self.kv.as_ref().map_or(0, |k| k.rows.len()) - self.left.len() + self.joining.len()
    }

    /// Whether `n` more rows fit.
    pub fn has_room(&self, n: usize) -> bool {
        self.max_rows > 1 && self.rows() + n <= self.max_rows
    }

    /// Bytes of the batch's KV (padding included), joining rows included.
    pub fn bytes(&self) -> usize {
        self.kv.as_ref().map_or(0, BatchKv::bytes)
            + self.joining.iter().map(|j| j.1.bytes()).sum::<usize>()
    }

    /// Adds a row holding `cache`'s positions; it is fed `next` on the next run.
    pub fn join(&mut self, id: RowId, cache: KvCache, next: u32) {
        self.joining.push((id, cache));
        self.next.insert(id, next);
    }

    /// The id to feed row `id` on the next run.
    pub fn feed(&mut self, id: RowId, next: u32) {
        self.next.insert(id, next);
    }

    /// The logits of row `id` from the last run (or why the run failed); `None` when the row was
    /// not in it.
    pub fn take(&mut self, id: RowId) -> Option<Result<Vec<f32>, ClassifiedError>> {
        self.results.remove(&id)
    }

    /// Takes row `id` out of the batch and gives its positions back as a cache of its own.
    pub fn leave(&mut self, layout: &KvLayout, id: RowId) -> Result<KvCache, EngineError> {
        self.next.remove(&id);
        self.results.remove(&id);
        if let Some(i) = self.joining.iter().position(|j| j.0 == id) {
            return Ok(self.joining.swap_remove(i).1);
        }
        let kv = self
            .kv
            .as_ref()
            .filter(|_| !self.left.contains(&id))
            .ok_or_else(|| EngineError::Tensor(format!("row {id} is not in the batch")))?;
        let Some(row) = kv.rows.iter().position(|r| r.id == id) else {
            return Err(EngineError::Tensor(format!("row {id} is not in the batch")));
        };
        let r = kv.rows[row];
        let src = [Source {
            values: &kv.values,
            row,
            start: kv.start(layout, row),
            len: r.len,
            local: r.local_len(),
        }];
        let own = rebuild(layout, &src, vec![r], 0)?;
        self.left.push(id);
        Ok(KvCache {
            values: own.values,
            len: r.len,
            local_start: r.local_start,
            min_prefix: r.min_prefix,
        })
    }

    /// Every row in the batch or joining it.
    pub fn row_ids(&self) -> Vec<RowId> {
        let mut ids: Vec<RowId> = self
            .kv
            .iter()
            .flat_map(|k| k.rows.iter().map(|r| r.id))
            .filter(|id| !self.left.contains(id))
            .collect();
        ids.extend(self.joining.iter().map(|j| j.0));
        ids
    }

    /// Gives rows `ids` the error `e` as their result and drops every row.
    pub fn fail(&mut self, ids: &[RowId], e: ClassifiedError) {
        for &id in ids {
            self.results.insert(id, Err(e.clone()));
        }
        self.clear();
    }

    /// Drops every row (after a failed run, whose outputs are gone, or once the last row left).
    pub fn clear(&mut self) {
        self.kv = None;
        self.joining.clear();
        self.left.clear();
        self.next.clear();
    }

    /// Applies the joins and leaves since the last run (one rebuild), and returns the batch with the
    /// ids to feed, in row order; `None` when no row is left.
    pub fn prepare(
        &mut self,
        layout: &KvLayout,
    ) -> Result<Option<(&mut BatchKv, Vec<u32>)>, EngineError> {
        if !self.joining.is_empty() || !self.left.is_empty() {
            let joining = std::mem::take(&mut self.joining);
            let mut sources = Vec::new();
            let mut rows = Vec::new();
            if let Some(kv) = &self.kv {
                for (row, r) in kv.rows.iter().enumerate() {
                    if self.left.contains(&r.id) {
                        continue;
                    }
                    sources.push(Source {
                        values: &kv.values,
                        row,
                        start: kv.start(layout, row),
                        len: r.len,
                        local: r.local_len(),
                    });
                    rows.push(*r);
                }
            }
            for (id, cache) in &joining {
                sources.push(Source {
                    values: &cache.values,
                    row: 0,
                    start: 0,
                    len: cache.len,
                    local: cache.local_len(),
                });
                rows.push(Row::of(*id, cache));
            }
            let rebuilt = if sources.is_empty() {
                None
            } else {
                self.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
                Some(rebuild(layout, &sources, rows, 1)?)
            };
            drop(sources);
            self.kv = rebuilt;
            self.left.clear();
        }
        let Some(kv) = self.kv.as_mut() else {
            return Ok(None);
        };
        let mut ids = Vec::with_capacity(kv.rows.len());
        for Row { id, .. } in &kv.rows {
            match self.next.get(id) {
                Some(&t) => ids.push(t),
                None => return Err(EngineError::Tensor(format!("row {id} has no id to feed"))),
            }
        }
        Ok(Some((kv, ids)))
    }

    /// Hands the run's per-row logits (row order) to the rows.
    pub fn finish(&mut self, result: Result<Vec<Vec<f32>>, ClassifiedError>) {
        let Some(kv) = &self.kv else { return };
        let ids: Vec<RowId> = kv.rows.iter().map(|r| r.id).collect();
        self.stats.rows.store(ids.len(), Ordering::Relaxed);
        self.stats.runs.fetch_add(1, Ordering::Relaxed);
        self.stats
            .row_steps
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        match result {
            Ok(rows) if rows.len() == ids.len() => {
                for (id, l) in ids.into_iter().zip(rows) {
                    self.results.insert(id, Ok(l));
                }
            }
            Ok(rows) => {
                let e = ClassifiedError::new(
                    ErrorClass::Internal,
                    format!(
                        "a batched run returned {} rows for {}",
                        rows.len(),
                        ids.len()
                    ),
                );
                for id in ids {
                    self.results.insert(id, Err(e.clone()));
                }
                self.clear();
            }
            Err(e) => {
                for id in ids {
                    self.results.insert(id, Err(e.clone()));
                }
                self.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv::KvSlot;
    use crate::engine::session::ElemType;
    use crate::engine::tensor::FloatData;

    fn layout() -> KvLayout {
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

    /// A batch-1 cache of `len` positions; element (head h, position p, d) = base + 100h + 10p + d.
    fn cache(len: usize, base: f32) -> KvCache {
        let mut v = Vec::new();
        for h in 0..2 {
            for p in 0..len {
                for d in 0..3 {
                    v.push(base + (100 * h + 10 * p + d) as f32);
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

    fn floats(v: &DynValue) -> (Vec<i64>, Vec<f32>) {
        let (d, shape) = tensor::extract_floats(v).unwrap();
        (shape, d.to_f32_vec())
    }

    fn init() {
        crate::engine::runtime::init(None).expect("ONNX Runtime (run `make setup` first)");
    }

    #[test]
    fn rows_are_left_padded_and_come_back_unchanged() {
        init();
        let l = layout();
        let mut b = DecodeBatch::new(4);
        b.join(1, cache(3, 0.0), 7);
        b.join(2, cache(1, 1000.0), 8);
        let (kv, ids) = b.prepare(&l).unwrap().unwrap();
        assert_eq!(ids, [7, 8]);
        assert_eq!((kv.width(), kv.rows()), (3, 2));
        assert_eq!(kv.attention_mask(1), [1, 1, 1, 1, 0, 0, 1, 1]);
        assert_eq!(kv.positions(1), [3, 1]);
        let (shape, v) = floats(&kv.values()[0]);
        assert_eq!(shape, [2, 2, 3, 3]);
        // row 1, head 0: two padding positions, then the one real position
        let row1_head0 = &v[18..27];
        assert_eq!(row1_head0, [0., 0., 0., 0., 0., 0., 1000., 1001., 1002.]);
        // leaving gives the exact positions back; the batch shrinks at the next prepare
        let own = b.leave(&l, 2).unwrap();
        assert_eq!(own.len, 1);
        assert_eq!(floats(&own.values[0]), floats(&cache(1, 1000.0).values[0]));
        assert_eq!(b.rows(), 1);
        let (kv, ids) = b.prepare(&l).unwrap().unwrap();
        assert_eq!((kv.width(), kv.rows(), ids), (3, 1, vec![7]));
        assert_eq!(floats(&kv.values()[0]), floats(&cache(3, 0.0).values[0]));
        // a longer row joining widens the padding of the others
        b.join(3, cache(5, 500.0), 9);
        let (kv, ids) = b.prepare(&l).unwrap().unwrap();
        assert_eq!((kv.width(), ids), (5, vec![7, 9]));
        assert_eq!(kv.attention_mask(1), [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
        let back = b.leave(&l, 1).unwrap();
        assert_eq!(floats(&back.values[0]), floats(&cache(3, 0.0).values[0]));
        assert_eq!(b.stats().rebuilds.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn capacity_failures_and_unknown_rows() {
        init();
        let l = layout();
        let mut b = DecodeBatch::new(2);
        assert!(b.has_room(2) && !b.has_room(3));
        b.join(1, cache(2, 0.0), 1);
        assert!(b.has_room(1) && !b.has_room(2));
        assert!(b.leave(&l, 9).is_err(), "not a row");
        b.prepare(&l).unwrap();
        b.finish(Err(ClassifiedError::new(ErrorClass::Internal, "boom")));
        assert!(b.take(1).unwrap().is_err(), "the row sees the failure");
        assert_eq!(b.rows(), 0, "a failed run drops the rows");
        assert!(b.prepare(&l).unwrap().is_none());
        assert!(!DecodeBatch::new(1).has_room(1), "max 1 row = no batching");
    }
}
