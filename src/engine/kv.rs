//! The decoder's KV cache, discovered from the graph and kept in ORT values between steps.
//!
//! Inputs named `past_key_values.*` are the cache; each output `present<rest>` feeds input
//! `past_key_values<rest>` on the next step (the transformers.js rule). Nothing is hard-coded about how
//! many layers there are: a graph that declares KV for every layer and one that declares it only for
//! cache-owning layers both work. The values returned by one run are moved into the next run's
//! inputs; the cache is never copied through host memory.
//!
//! **In place** ([`FusedKv`]): when the load-time rewrite fused the decoder's attention
//! (`GroupQueryAttention`, see [`super::rewrite`]), each cache tensor is a buffer with room for more
//! positions than it holds (`[rows, heads, capacity, head_dim]`, each row's positions from 0). A run
//! binds the same buffer as `past_key_values.*` and `present.*`, and the kernel writes the new
//! positions after the row's length: nothing is copied. Buffers grow (one copy) by at least an
//! eighth and a multiple of [`GROW_STEP`] positions when a run would not fit.

use std::borrow::Cow;

use ort::session::SessionInputValue;
use ort::value::DynValue;

use super::session::{ElemType, GraphSession};
use super::tensor;
use super::EngineError;

pub const PAST_PREFIX: &str = "past_key_values";
pub const PRESENT_PREFIX: &str = "present";

/// One cache tensor: input name, output name, element type and the shape of an empty cache.
#[derive(Debug, Clone)]
pub struct KvSlot {
    pub past: String,
    pub present: String,
    pub dtype: ElemType,
    pub empty_shape: Vec<i64>,
    /// The axis that grows with the positions held (the non-batch symbolic dimension).
    pub seq_axis: usize,
    /// A sliding-window layer's buffer of a fused decoder: it keeps only the last positions
    /// ([`KvLayout::keep`]), counted from [`KvCache::local_start`].
    pub local: bool,
}

/// The cache layout a decoder graph declares.
#[derive(Debug, Clone)]
pub struct KvLayout {
    pub slots: Vec<KvSlot>,
    /// Set when the decoder's attention is fused: the cache is written in place.
    pub fused: Option<FusedKv>,
}

/// How a fused decoder's runs bind the cache buffers.
#[derive(Debug, Clone, Default)]
pub struct FusedKv {
    /// Extra outputs bound to a slot's buffer (KV-shared layers), with the slot's index.
    pub aliases: Vec<(String, usize)>,
    /// The graph has separate `seqlens_k`/`total` inputs for its sliding-window layers.
    pub local_inputs: bool,
    /// The (largest) sliding window of the layers whose buffers are trimmed.
    pub window: Option<usize>,
}

/// Positions a trimmed sliding-window buffer keeps beyond the window, so that a prefix a little
/// shorter than a finished sequence (a re-rendered last turn) can still be reused.
pub const TRIM_MARGIN: usize = 64;

/// Buffers grow by multiples of this many positions.
pub const GROW_STEP: usize = 256;

/// The capacity a buffer that must hold `need` positions grows to.
pub fn grown_capacity(need: usize) -> usize {
    (need + need / 8).div_ceil(GROW_STEP).max(1) * GROW_STEP
}

impl KvLayout {
    /// Reads the layout from the decoder session; fails when an input has no matching output.
    pub fn from_decoder(dec: &GraphSession) -> Result<Self, EngineError> {
        let mut slots = Vec::new();
        let mut unmatched = Vec::new();
        for input in dec
            .inputs
            .iter()
            .filter(|i| i.name.starts_with(PAST_PREFIX))
        {
            let rest = &input.name[PAST_PREFIX.len()..];
            let present = format!("{PRESENT_PREFIX}{rest}");
            if dec.output(&present).is_none() {
                unmatched.push(input.name.clone());
                continue;
            }
            if !input.dtype.is_float() {
                return Err(EngineError::Interface {
                    component: dec.component.clone(),
                    path: dec.path.clone(),
                    message: format!(
                        "cache input {} has element type {}",
                        input.name, input.dtype
                    ),
                });
            }
            // transformers.js' rule: the batch dimension is 1, any other symbolic dimension is the
            // (empty) sequence dimension.
            let empty_shape: Vec<i64> = input
                .dims
                .iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Some(v) => *v,
                    None if i == 0 => 1,
                    None => 0,
                })
                .collect();
            let seq_axes: Vec<usize> = (1..empty_shape.len())
                .filter(|&i| empty_shape[i] == 0)
                .collect();
            let [seq_axis] = seq_axes[..] else {
                return Err(EngineError::Interface {
                    component: dec.component.clone(),
                    path: dec.path.clone(),
                    message: format!(
                        "cache input {} has shape {}: expected exactly one symbolic (sequence) dimension besides the batch",
                        input.name,
                        input.shape_string()
                    ),
                });
            };
            let local = dec
                .rewrite
                .attention
                .as_ref()
                .is_some_and(|f| f.local_pasts.contains(&input.name));
            slots.push(KvSlot {
                past: input.name.clone(),
                present,
                dtype: input.dtype,
                empty_shape,
                seq_axis,
                local,
            });
        }
        if !unmatched.is_empty() {
            return Err(EngineError::Interface {
                component: dec.component.clone(),
                path: dec.path.clone(),
                message: format!(
                    "cache inputs {unmatched:?} have no matching `present*` output; outputs are {:?}",
                    dec.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>()
                ),
            });
        }
        let fused = match &dec.rewrite.attention {
            None => None,
            Some(f) => {
                let mut aliases = Vec::new();
                for (output, past) in &f.aliases {
                    let Some(i) = slots.iter().position(|s| &s.past == past) else {
                        return Err(EngineError::Interface {
                            component: dec.component.clone(),
                            path: dec.path.clone(),
                            message: format!("{output} aliases {past}, which is not a cache input"),
                        });
                    };
                    aliases.push((output.clone(), i));
                }
                let local_inputs = dec.has_input(super::rewrite::SEQLENS_LOCAL);
                Some(FusedKv {
                    aliases,
                    local_inputs,
                    window: f.window.filter(|_| local_inputs),
                })
            }
        };
        Ok(Self { slots, fused })
    }

    /// A cache holding no positions.
    pub fn empty(&self) -> Result<KvCache, EngineError> {
        let values = self
            .slots
            .iter()
            .map(|s| tensor::alloc(s.dtype, &s.empty_shape))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KvCache::new(values, 0))
    }

    /// Positions a sliding-window buffer keeps when trimmed; `None` when no buffer is trimmed.
    pub fn keep(&self) -> Option<usize> {
        let w = self.fused.as_ref()?.window?;
        self.slots
            .iter()
            .any(|s| s.local)
            .then(|| w.saturating_sub(1) + TRIM_MARGIN)
    }

    /// The shortest prefix a cache whose sliding-window buffers start at `local_start` can give.
    pub fn min_prefix_of(&self, local_start: usize) -> usize {
        match self.fused.as_ref().and_then(|f| f.window) {
            Some(w) if local_start > 0 => local_start + w.saturating_sub(1),
            _ => 0,
        }
    }

    /// Bytes one position of one sequence takes in the cache (all slots, batch 1).
    pub fn bytes_per_position(&self) -> usize {
        self.slots
            .iter()
            .map(|s| {
                let n: i64 = s
                    .empty_shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| if i == s.seq_axis { 1 } else { d.max(1) })
                    .product();
                n as usize * s.dtype.byte_size()
            })
            .sum()
    }

    pub fn dtype(&self) -> Option<ElemType> {
        self.slots.first().map(|s| s.dtype)
    }
}

/// The cache of one sequence: one value per [`KvSlot`], in layout order.
pub struct KvCache {
    pub values: Vec<DynValue>,
    /// Number of positions the cache holds.
    pub len: usize,
    /// The first position the sliding-window buffers still hold (at their index 0): positions
    /// before it were trimmed ([`KvLayout::keep`]). 0 for every other layout.
    pub local_start: usize,
    /// The shortest prefix [`Self::prefix`] can give: a prefix needs the window before its end.
    pub min_prefix: usize,
}

impl KvCache {
    pub fn new(values: Vec<DynValue>, len: usize) -> Self {
        Self {
            values,
            len,
            local_start: 0,
            min_prefix: 0,
        }
    }

    /// Positions the sliding-window buffers hold.
    pub fn local_len(&self) -> usize {
        self.len - self.local_start
    }

    /// Bytes the cache's tensors hold.
    pub fn bytes(&self) -> usize {
        self.values.iter().map(tensor::value_bytes).sum()
    }

    /// A copy holding only the first `len` positions (`len` ≤ `self.len`): the KV of a prefix, since a
    /// position's keys and values depend only on the positions before it. Copies on the host, one
    /// contiguous run per row of the dimensions before the sequence axis.
    pub fn prefix(&self, layout: &KvLayout, len: usize) -> Result<KvCache, EngineError> {
        if len > self.len || (len < self.len && len < self.min_prefix) {
            return Err(EngineError::Tensor(format!(
                "a prefix of {len} positions from a cache of {} (whose sliding-window buffers start at {})",
                self.len, self.local_start
            )));
        }
        let local = len - self.local_start.min(len);
        let values = layout
            .slots
            .iter()
            .zip(&self.values)
            .map(|(slot, v)| {
                let n = if slot.local { local } else { len };
                resized(v, slot.seq_axis, n, n)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KvCache {
            values,
            len,
            local_start: self.local_start.min(len),
            min_prefix: self.min_prefix,
        })
    }

    /// Positions the full-attention buffers have room for.
    pub fn capacity(&self, layout: &KvLayout) -> usize {
        capacity(layout, &self.values, false)
    }

    /// Makes room for `n` more positions: sliding-window buffers first drop what their window no
    /// longer needs (one move within the buffer), then buffers without room grow (one copy).
    pub fn reserve(&mut self, layout: &KvLayout, n: usize) -> Result<(), EngineError> {
        if let Some(keep) = layout.keep() {
            let held = self.local_len();
            if capacity(layout, &self.values, true) < held + n && held > keep {
                let drop = held - keep;
                for (slot, v) in layout.slots.iter().zip(self.values.iter_mut()) {
                    if slot.local {
                        shift_positions(v, 0, drop, keep, slot.seq_axis)?;
                    }
                }
                self.local_start += drop;
                self.min_prefix = layout.min_prefix_of(self.local_start);
            }
        }
        for local in [false, true] {
            let held = if local { self.local_len() } else { self.len };
            if capacity(layout, &self.values, local) >= held + n {
                continue;
            }
            let cap = grown_capacity(held + n);
            for (slot, v) in layout.slots.iter().zip(self.values.iter_mut()) {
                if slot.local == local {
                    *v = resized(v, slot.seq_axis, held, cap)?;
                }
            }
        }
        Ok(())
    }

    /// Replaces the cache with the `present*` values taken out of a run's outputs.
    pub fn update(
        &mut self,
        layout: &KvLayout,
        outputs: &mut ort::session::SessionOutputs<'_>,
        new_positions: usize,
    ) -> Result<(), EngineError> {
        update(self, layout, outputs, new_positions)
    }
}

/// What a decoder run reads its cache from: one sequence ([`KvCache`]) or a batch of left-padded
/// rows ([`super::batch::BatchKv`]).
pub trait KvState {
    /// One value per [`KvSlot`], in layout order, `[rows, …, width, …]`.
    fn values(&self) -> &[DynValue];
    /// Positions along the sequence axis (the longest row's).
    fn width(&self) -> usize;
    /// Positions each row holds (right-aligned in `width`).
    fn row_lens(&self) -> Vec<usize>;
    /// Positions each row's sliding-window buffers hold (the row's own length where none is trimmed).
    fn local_lens(&self) -> Vec<usize>;
    /// Takes the run's `present*` values; every row grew by `n` positions.
    fn advance(&mut self, values: Vec<DynValue>, n: usize);

    /// The values, to bind as a fused run's inputs and outputs.
    fn values_mut(&mut self) -> &mut [DynValue];
    /// Makes room for `n` more positions per row in the buffers ([`FusedKv`]).
    fn reserve(&mut self, layout: &KvLayout, n: usize) -> Result<(), EngineError>;
    /// A fused run wrote `n` positions per row into the buffers.
    fn advance_in_place(&mut self, n: usize);

    /// `attention_mask` for a run of `n` new positions per row: `[rows, width + n]`, 0 over each
    /// row's left padding.
    fn attention_mask(&self, n: usize) -> Vec<i64> {
        let w = self.width();
        let mut m = Vec::new();
        for len in self.row_lens() {
            m.extend(std::iter::repeat_n(0, w - len));
            m.extend(std::iter::repeat_n(1, len + n));
        }
        m
    }

    /// `position_ids` for a run of `n` new positions per row: `[rows, n]`, each row from its length.
    fn positions(&self, n: usize) -> Vec<i64> {
        self.row_lens()
            .into_iter()
            .flat_map(|len| len as i64..(len + n) as i64)
            .collect()
    }
}

impl KvState for KvCache {
    fn values(&self) -> &[DynValue] {
        &self.values
    }
    fn width(&self) -> usize {
        self.len
    }
    fn row_lens(&self) -> Vec<usize> {
        vec![self.len]
    }
    fn local_lens(&self) -> Vec<usize> {
        vec![self.local_len()]
    }
    fn advance(&mut self, values: Vec<DynValue>, n: usize) {
        self.values = values;
        self.len += n;
    }
    fn values_mut(&mut self) -> &mut [DynValue] {
        &mut self.values
    }
    fn reserve(&mut self, layout: &KvLayout, n: usize) -> Result<(), EngineError> {
        KvCache::reserve(self, layout, n)
    }
    fn advance_in_place(&mut self, n: usize) {
        self.len += n;
    }
}

/// The capacity of the full-attention (`local` = false) or sliding-window buffers: the first such
/// slot's sequence axis; unlimited when there is no such slot.
pub(super) fn capacity(layout: &KvLayout, values: &[DynValue], local: bool) -> usize {
    match layout
        .slots
        .iter()
        .zip(values)
        .find(|(s, _)| s.local == local)
    {
        Some((slot, v)) => tensor::value_info(v)
            .ok()
            .and_then(|(_, shape)| shape.get(slot.seq_axis).copied())
            .unwrap_or(0)
            .max(0) as usize,
        None => usize::MAX,
    }
}

/// Moves positions `from..from + count` of row `row` to `0..count` in the same buffer.
pub(super) fn shift_positions(
    v: &mut DynValue,
    row: usize,
    from: usize,
    count: usize,
    axis: usize,
) -> Result<(), EngineError> {
    let (ty, shape) = tensor::value_info(v)?;
    let d: Vec<usize> = shape.iter().map(|&x| x.max(0) as usize).collect();
    if axis == 0 || axis >= d.len() || row >= d[0] || from + count > d[axis] {
        return Err(EngineError::Tensor(format!(
            "cannot move {count} positions from {from} in a {shape:?} cache tensor"
        )));
    }
    let outer: usize = d[1..axis].iter().product();
    let inner = d[axis + 1..].iter().product::<usize>() * ty.byte_size();
    let raw = tensor::raw_mut(v)?;
    for o in 0..outer {
        let base = (row * outer + o) * d[axis] * inner;
        raw.copy_within(base + from * inner..base + (from + count) * inner, base);
    }
    Ok(())
}

/// Moves the `present*` values out of a run's outputs into `kv`, which grew by `n` positions.
pub fn update(
    kv: &mut impl KvState,
    layout: &KvLayout,
    outputs: &mut ort::session::SessionOutputs<'_>,
    n: usize,
) -> Result<(), EngineError> {
    let values = layout
        .slots
        .iter()
        .map(|slot| {
            outputs.remove(&slot.present).ok_or_else(|| {
                EngineError::Tensor(format!("the decoder returned no {}", slot.present))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    kv.advance(values, n);
    Ok(())
}

/// The first `len` entries of `v` along `axis` in a new buffer with room for `cap` (≥ `len`),
/// allocated by ONNX Runtime (so a fused run can bind it as an output).
fn resized(v: &DynValue, axis: usize, len: usize, cap: usize) -> Result<DynValue, EngineError> {
    let (ty, shape) = tensor::value_info(v)?;
    if axis >= shape.len() || len > shape[axis].max(0) as usize || len > cap {
        return Err(EngineError::Tensor(format!(
            "cannot take {len} positions along axis {axis} of a {shape:?} cache tensor"
        )));
    }
    let mut new_shape = shape.clone();
    new_shape[axis] = cap as i64;
    let mut out = tensor::alloc(ty, &new_shape)?;
    let rows = shape[0].max(0) as usize;
    for row in 0..rows {
        copy_positions(v, row, 0, &mut out, row, 0, len, axis)?;
    }
    Ok(out)
}

/// Copies positions `src_start..src_start + len` of row `src_row` of `src` to positions `dst_start..`
/// of row `dst_row` of `dst` (same element type, same dims but the batch and sequence axes): one
/// contiguous run per dimension before the sequence axis.
#[allow(clippy::too_many_arguments)]
pub(super) fn copy_positions(
    src: &DynValue,
    src_row: usize,
    src_start: usize,
    dst: &mut DynValue,
    dst_row: usize,
    dst_start: usize,
    len: usize,
    axis: usize,
) -> Result<(), EngineError> {
    if len == 0 {
        return Ok(());
    }
    let (ty, s) = tensor::value_info(src)?;
    let (dty, d) = tensor::value_info(dst)?;
    let dims = |v: &[i64]| v.iter().map(|&x| x.max(0) as usize).collect::<Vec<_>>();
    let (s, d) = (dims(&s), dims(&d));
    if ty != dty
        || axis == 0
        || axis >= s.len()
        || s.len() != d.len()
        || s[1..axis] != d[1..axis]
        || s[axis + 1..] != d[axis + 1..]
        || src_row >= s[0]
        || dst_row >= d[0]
        || src_start + len > s[axis]
        || dst_start + len > d[axis]
    {
        return Err(EngineError::Tensor(format!(
            "cannot copy {len} positions from {s:?} (row {src_row}, at {src_start}) to {d:?} (row {dst_row}, at {dst_start})"
        )));
    }
    let outer: usize = s[1..axis].iter().product();
    let inner = s[axis + 1..].iter().product::<usize>() * ty.byte_size();
    let from = tensor::raw(src)?;
    let to = tensor::raw_mut(dst)?;
    for o in 0..outer {
        let a = ((src_row * outer + o) * s[axis] + src_start) * inner;
        let b = ((dst_row * outer + o) * d[axis] + dst_start) * inner;
        to[b..b + len * inner].copy_from_slice(&from[a..a + len * inner]);
    }
    Ok(())
}

/// A run's feeds, by input name.
pub type Feeds<'v> = Vec<(Cow<'static, str>, SessionInputValue<'v>)>;

impl KvLayout {
    /// Appends the cache-side feeds of one decoder step: `num_logits_to_keep` = 1 and
    /// `use_cache_branch` where the graph declares them, then every `past_key_values.*` from `cache`.
    pub fn push_feeds<'v>(
        &self,
        decoder: &GraphSession,
        cache: &'v impl KvState,
        inputs: &mut Feeds<'v>,
    ) -> Result<(), EngineError> {
        if decoder.has_input("num_logits_to_keep") {
            inputs.push((
                Cow::Borrowed("num_logits_to_keep"),
                tensor::i64_value(&[], vec![1])?.into(),
            ));
        }
        if decoder.has_input("use_cache_branch") {
            inputs.push((
                Cow::Borrowed("use_cache_branch"),
                tensor::bool_value(&[1], vec![cache.width() > 0])?.into(),
            ));
        }
        for (slot, value) in self.slots.iter().zip(cache.values().iter()) {
            inputs.push((Cow::Owned(slot.past.clone()), value.into()));
        }
        Ok(())
    }
}
