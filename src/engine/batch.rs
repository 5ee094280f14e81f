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

use super::kv::{KvCache, KvLayout, KvSlot, KvState};
use super::session::ElemType;
use super::tensor::{self, FloatData};
use super::EngineError;
use crate::error::{ClassifiedError, ErrorClass};

/// A row's owner-chosen id (unique among the rows of one batch).
pub type RowId = u64;

/// The rows' KV of a batch, left-padded to a common width.
pub struct BatchKv {
    values: Vec<DynValue>,
    width: usize,
    /// Row order of the tensors: id and positions held.
    rows: Vec<(RowId, usize)>,
}

impl KvState for BatchKv {
    fn values(&self) -> &[DynValue] {
        &self.values
    }
    fn width(&self) -> usize {
        self.width
    }
    fn row_lens(&self) -> Vec<usize> {
        self.rows.iter().map(|r| r.1).collect()
    }
    fn advance(&mut self, values: Vec<DynValue>, n: usize) {
        self.values = values;
        self.width += n;
        for r in &mut self.rows {
            r.1 += n;
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
}

/// Builds one slot's `[sources, …, width, …]` tensor, each source's positions at the right end.
fn assemble(
    slot: &KvSlot,
    sources: &[Source],
    index: usize,
    width: usize,
) -> Result<DynValue, EngineError> {
    let axis = slot.seq_axis;
    let mut shape: Option<Vec<i64>> = None;
    for s in sources {
        let (_, sh) = tensor::value_info(&s.values[index])?;
        if axis >= sh.len()
            || s.start + s.len > sh[axis].max(0) as usize
            || s.row >= sh[0].max(0) as usize
        {
            return Err(EngineError::Tensor(format!(
                "{}: a row's positions {}..{} lie outside a {sh:?} cache tensor",
                slot.past,
                s.start,
                s.start + s.len
            )));
        }
        match &shape {
            None => shape = Some(sh),
            Some(first) if first[1..axis] != sh[1..axis] || first[axis + 1..] != sh[axis + 1..] => {
                return Err(EngineError::Tensor(format!(
                    "{}: cache tensors {first:?} and {sh:?} cannot share a batch",
                    slot.past
                )))
            }
            Some(_) => {}
        }
    }
    let Some(mut shape) = shape else {
        return Err(EngineError::Tensor("a batch of no rows".into()));
    };
    let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
    let outer: usize = dims[1..axis].iter().product();
    let inner: usize = dims[axis + 1..].iter().product();
    fn fill<T: Copy + Default>(
        parts: &[(&[T], &Source, usize)],
        outer: usize,
        inner: usize,
        width: usize,
    ) -> Vec<T> {
        let row_out = outer * width * inner;
        let mut out = vec![T::default(); parts.len() * row_out];
        for (b, (src, s, src_width)) in parts.iter().enumerate() {
            let row_in = outer * src_width * inner;
            for o in 0..outer {
                let from = s.row * row_in + o * src_width * inner + s.start * inner;
                let to = b * row_out + o * width * inner + (width - s.len) * inner;
                out[to..to + s.len * inner].copy_from_slice(&src[from..from + s.len * inner]);
            }
        }
        out
    }
    let widths: Vec<usize> = sources
        .iter()
        .map(|s| tensor::value_info(&s.values[index]).map(|(_, sh)| sh[axis].max(0) as usize))
        .collect::<Result<_, _>>()?;
    let data = match slot.dtype {
        ElemType::F32 => {
            let mut parts = Vec::with_capacity(sources.len());
            for (s, &w) in sources.iter().zip(&widths) {
                let (_, d) = s.values[index]
                    .try_extract_tensor::<f32>()
                    .map_err(tensor::tensor_err)?;
                parts.push((d, s, w));
            }
            FloatData::F32(fill(&parts, outer, inner, width))
        }
        ElemType::F16 => {
            let mut parts = Vec::with_capacity(sources.len());
            for (s, &w) in sources.iter().zip(&widths) {
                let (_, d) = s.values[index]
                    .try_extract_tensor::<half::f16>()
                    .map_err(tensor::tensor_err)?;
                parts.push((d, s, w));
            }
            FloatData::F16(fill(&parts, outer, inner, width))
        }
        other => {
            return Err(EngineError::Tensor(format!(
                "cannot batch a {other} cache tensor"
            )))
        }
    };
    shape[0] = sources.len() as i64;
    shape[axis] = width as i64;
    data.into_value(&shape)
}

fn rebuild(
    layout: &KvLayout,
    sources: &[Source],
    rows: Vec<(RowId, usize)>,
) -> Result<BatchKv, EngineError> {
    let width = sources.iter().map(|s| s.len).max().unwrap_or(0);
    let values = layout
        .slots
        .iter()
        .enumerate()
        .map(|(i, slot)| assemble(slot, sources, i, width))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(BatchKv {
        values,
        width,
        rows,
    })
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
        let Some(row) = kv.rows.iter().position(|r| r.0 == id) else {
            return Err(EngineError::Tensor(format!("row {id} is not in the batch")));
        };
        let len = kv.rows[row].1;
        let src = [Source {
            values: &kv.values,
            row,
            start: kv.width - len,
            len,
        }];
        let own = rebuild(layout, &src, vec![(id, len)])?;
        self.left.push(id);
        Ok(KvCache {
            values: own.values,
            len,
        })
    }

    /// Every row in the batch or joining it.
    pub fn row_ids(&self) -> Vec<RowId> {
        let mut ids: Vec<RowId> = self
            .kv
            .iter()
            .flat_map(|k| k.rows.iter().map(|r| r.0))
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
                for (row, &(id, len)) in kv.rows.iter().enumerate() {
                    if self.left.contains(&id) {
                        continue;
                    }
                    sources.push(Source {
                        values: &kv.values,
                        row,
                        start: kv.width - len,
                        len,
                    });
                    rows.push((id, len));
                }
            }
            for (id, cache) in &joining {
                sources.push(Source {
                    values: &cache.values,
                    row: 0,
                    start: 0,
                    len: cache.len,
                });
                rows.push((*id, cache.len));
            }
            let rebuilt = if sources.is_empty() {
                None
            } else {
                self.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
                Some(rebuild(layout, &sources, rows)?)
            };
            drop(sources);
            self.kv = rebuilt;
            self.left.clear();
        }
        let Some(kv) = self.kv.as_mut() else {
            return Ok(None);
        };
        let mut ids = Vec::with_capacity(kv.rows.len());
        for (id, _) in &kv.rows {
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
        let ids: Vec<RowId> = kv.rows.iter().map(|r| r.0).collect();
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

    fn layout() -> KvLayout {
        KvLayout {
            slots: vec![KvSlot {
                past: "past_key_values.0.key".into(),
                present: "present.0.key".into(),
                dtype: ElemType::F32,
                empty_shape: vec![1, 2, 0, 3],
                seq_axis: 2,
            }],
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
        KvCache {
            values: vec![FloatData::F32(v)
                .into_value(&[1, 2, len as i64, 3])
                .unwrap()],
            len,
        }
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
