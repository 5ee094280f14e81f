//! The decoder's KV cache, discovered from the graph and kept in ORT values between steps.
//!
//! Inputs named `past_key_values.*` are the cache; each output `present<rest>` feeds input
//! `past_key_values<rest>` on the next step (the transformers.js rule). Nothing is hard-coded about how
//! many layers there are: a graph that declares KV for every layer and one that declares it only for
//! cache-owning layers both work. The values returned by one run are moved into the next run's
//! inputs; the cache is never copied through host memory.

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
}

/// The cache layout a decoder graph declares.
#[derive(Debug, Clone)]
pub struct KvLayout {
    pub slots: Vec<KvSlot>,
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
            slots.push(KvSlot {
                past: input.name.clone(),
                present,
                dtype: input.dtype,
                empty_shape,
                seq_axis,
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
        Ok(Self { slots })
    }

    /// A cache holding no positions.
    pub fn empty(&self) -> Result<KvCache, EngineError> {
        let values = self
            .slots
            .iter()
            .map(|s| tensor::zeros(s.dtype, &s.empty_shape))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KvCache { values, len: 0 })
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
}

impl KvCache {
    /// Bytes the cache's tensors hold.
    pub fn bytes(&self) -> usize {
        self.values.iter().map(tensor::value_bytes).sum()
    }

    /// A copy holding only the first `len` positions (`len` ≤ `self.len`): the KV of a prefix, since a
    /// position's keys and values depend only on the positions before it. Copies on the host, one
    /// contiguous run per row of the dimensions before the sequence axis.
    pub fn prefix(&self, layout: &KvLayout, len: usize) -> Result<KvCache, EngineError> {
        if len > self.len {
            return Err(EngineError::Tensor(format!(
                "a prefix of {len} positions from a cache of {}",
                self.len
            )));
        }
        let values = layout
            .slots
            .iter()
            .zip(&self.values)
            .map(|(slot, v)| slice_seq(v, slot.seq_axis, len))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KvCache { values, len })
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
    /// Takes the run's `present*` values; every row grew by `n` positions.
    fn advance(&mut self, values: Vec<DynValue>, n: usize);

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
    fn advance(&mut self, values: Vec<DynValue>, n: usize) {
        self.values = values;
        self.len += n;
    }
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

/// The first `len` entries of `v` along `axis`, copied straight from the value's buffer.
fn slice_seq(v: &DynValue, axis: usize, len: usize) -> Result<DynValue, EngineError> {
    let (ty, shape) = tensor::value_info(v)?;
    let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
    if axis >= dims.len() || len > dims[axis] {
        return Err(EngineError::Tensor(format!(
            "cannot take {len} positions along axis {axis} of a {shape:?} cache tensor"
        )));
    }
    let outer: usize = dims[..axis].iter().product();
    let inner: usize = dims[axis + 1..].iter().product();
    let (from, to) = (dims[axis] * inner, len * inner);
    fn take<T: Copy>(src: &[T], outer: usize, from: usize, to: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(outer * to);
        for o in 0..outer {
            out.extend_from_slice(&src[o * from..o * from + to]);
        }
        out
    }
    let sliced = match ty {
        ElemType::F32 => {
            let (_, d) = v.try_extract_tensor::<f32>().map_err(tensor::tensor_err)?;
            tensor::FloatData::F32(take(d, outer, from, to))
        }
        ElemType::F16 => {
            let (_, d) = v
                .try_extract_tensor::<half::f16>()
                .map_err(tensor::tensor_err)?;
            tensor::FloatData::F16(take(d, outer, from, to))
        }
        other => {
            return Err(EngineError::Tensor(format!(
                "cannot slice a {other} cache tensor"
            )))
        }
    };
    let mut new_shape = shape.clone();
    new_shape[axis] = len as i64;
    sliced.into_value(&new_shape)
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
