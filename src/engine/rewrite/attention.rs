//! Fused attention: each layer's exported attention (`Concat` of the past with the new keys and
//! values, repeat_kv copies, `MatMul`/`Add(mask)`/`Softmax`/`MatMul`) becomes one node with
//! `com.microsoft.GroupQueryAttention`'s interface whose past and present are the same buffer
//! (see `docs/attention-fusion.md`): [`crate::engine::attention`]'s `onnx_chat.CachedAttention` where
//! the cache is 32-bit float and [`AttentionKernel::Native`] is asked for, `GroupQueryAttention`
//! otherwise.
//!
//! **What is matched**, per `Softmax` (one per layer, in graph order):
//! `Softmax(Add(MatMul(Transpose₀₂₁₃(q), Transpose₀₁₃₂(repeat(present_k))), mask))` and
//! `Reshape(Transpose₀₂₁₃(MatMul(probs, repeat(present_v))))`, where `repeat(x)` is the exporters'
//! `Reshape(Expand(Unsqueeze(x)))` (or `x` itself when the heads are not repeated) and `present_k` is
//! `Concat(past_key_values.*, new)` on the sequence axis. A layer whose `Concat` another layer already
//! claimed reads that layer's cache (Gemma-3n's and Gemma 4's KV-shared layers).
//!
//! **What replaces it**: `GroupQueryAttention(q, k_new, v_new, past_k, past_v, seqlens_k, total)` with
//! the layer's `present.*` as its outputs (so [`crate::engine::kv::KvLayout`] is unchanged) and the
//! `Reshape`'s output as its output. A KV-shared layer gets the source layer's new keys and values and
//! past, and outputs of its own (declared as graph outputs, listed in [`Fusion::aliases`]) that the
//! caller binds to the source's buffer: writing the same positions twice, it appends nothing. Layers
//! with a sliding window read `seqlens_k`/`total` of their own ([`SEQLENS_LOCAL`], [`TOTAL_LOCAL`]), so a
//! caller may keep only their window. Nodes nothing reads any more (masks, repeat_kv, transposes) are
//! dropped. Anything unexpected leaves the graph as it was, with the reason.

use std::collections::{HashMap, HashSet};

use super::wire::*;
use super::{make_node, NodeInfo, RewriteError};

/// `seqlens_k` of the full-attention layers: per row, the index of its last position after the run.
pub const SEQLENS: &str = "onnx_chat_seqlens_k";
/// `total_sequence_length` of the full-attention layers: the longest row's positions after the run.
pub const TOTAL: &str = "onnx_chat_total_sequence_length";
/// As [`SEQLENS`], for the sliding-window layers (whose buffers may hold fewer positions).
pub const SEQLENS_LOCAL: &str = "onnx_chat_seqlens_k_local";
/// As [`TOTAL`], for the sliding-window layers.
pub const TOTAL_LOCAL: &str = "onnx_chat_total_sequence_length_local";

/// What the family declares about its decoder's attention.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSpec {
    /// Query heads (`num_attention_heads`).
    pub num_heads: usize,
    /// Per layer, in graph order: the sliding window (positions a query sees, itself included), or
    /// `None` for full attention.
    pub windows: Vec<Option<usize>>,
}

/// What the fusion did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fusion {
    /// Layers fused (all of them, or the rewrite was not applied).
    pub layers: usize,
    /// Of those, layers reading another layer's cache.
    pub shared: usize,
    /// Of those, sliding-window layers.
    pub windowed: usize,
    /// Added outputs (KV-shared layers' presents) and the `past_key_values.*` input whose buffer each
    /// must be bound to.
    pub aliases: Vec<(String, String)>,
    /// Sliding-window past inputs (their buffers follow [`SEQLENS_LOCAL`]).
    pub local_pasts: Vec<String>,
    /// The largest sliding window.
    pub window: Option<usize>,
    /// The layers run [`crate::engine::attention`]'s `onnx_chat.CachedAttention` (the session must
    /// register its domain); `false`: ONNX Runtime's `GroupQueryAttention`.
    pub native: bool,
}

/// `--attention-kernel`: which operator the fused layers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// `onnx_chat.CachedAttention` ([`crate::engine::attention`]) where the KV cache is 32-bit
    /// float, `GroupQueryAttention` otherwise.
    #[default]
    Native,
    /// ONNX Runtime's `com.microsoft.GroupQueryAttention` everywhere.
    Ort,
}

/// The edits: nodes replaced by others, nodes dropped, graph inputs and outputs added or dropped.
pub(super) struct Plan {
    pub replace: HashMap<usize, Vec<Vec<u8>>>,
    pub drop: HashSet<usize>,
    pub inputs: Vec<Vec<u8>>,
    pub outputs: Vec<Vec<u8>>,
    pub drop_inputs: HashSet<String>,
    pub fusion: Fusion,
}

/// A graph input: its name, element type, declared dims (None = symbolic) and its record.
pub(super) struct GraphInput {
    pub name: String,
    pub elem: Option<u64>,
    pub dims: Vec<Option<i64>>,
    pub raw: Vec<u8>,
}

pub(super) fn graph_input(body: &[u8]) -> Result<GraphInput, RewriteError> {
    let mut name = String::new();
    let mut elem = None;
    let mut dims = Vec::new();
    for v in fields(body) {
        let v = v?;
        match (v.num, v.wire) {
            (VALUE_INFO_NAME, WIRE_LEN) => name = text(v.body)?.to_string(),
            (VALUE_INFO_TYPE, WIRE_LEN) => {
                for t in fields(v.body) {
                    let t = t?;
                    if t.num != TYPE_TENSOR || t.wire != WIRE_LEN {
                        continue;
                    }
                    for s in fields(t.body) {
                        let s = s?;
                        if s.num == TYPE_TENSOR_ELEM && s.wire == WIRE_VARINT {
                            elem = Some(varint_value(&s)?);
                        }
                        if s.num != TYPE_TENSOR_SHAPE || s.wire != WIRE_LEN {
                            continue;
                        }
                        for d in fields(s.body) {
                            let d = d?;
                            if d.num != SHAPE_DIM || d.wire != WIRE_LEN {
                                continue;
                            }
                            let mut value = None;
                            for x in fields(d.body) {
                                let x = x?;
                                if x.num == DIM_VALUE && x.wire == WIRE_VARINT {
                                    value = Some(varint_value(&x)? as i64);
                                }
                            }
                            dims.push(value);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(GraphInput {
        name,
        elem,
        dims,
        raw: body.to_vec(),
    })
}

/// The record of input `from` renamed `to` (same type and shape).
fn renamed(from: &GraphInput, to: &str) -> Result<Vec<u8>, RewriteError> {
    let mut out = Vec::with_capacity(from.raw.len() + to.len());
    for f in fields(&from.raw) {
        let f = f?;
        if f.num == VALUE_INFO_NAME && f.wire == WIRE_LEN {
            put_bytes(&mut out, VALUE_INFO_NAME, to.as_bytes());
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    Ok(out)
}

/// An int32 input of the given symbolic dims (none = a scalar).
fn int32_input(name: &str, dims: &[&str]) -> Vec<u8> {
    super::tensor_input(name, TENSOR_INT32, dims)
}

fn int_attr(name: &str, v: i64) -> Vec<u8> {
    let mut a = Vec::new();
    put_bytes(&mut a, ATTR_NAME, name.as_bytes());
    put_uint(&mut a, ATTR_I, v as u64);
    put_uint(&mut a, ATTR_TYPE, ATTR_TYPE_INT);
    a
}

fn float_attr(name: &str, v: f32) -> Vec<u8> {
    let mut a = Vec::new();
    put_bytes(&mut a, ATTR_NAME, name.as_bytes());
    put_tag(&mut a, ATTR_F, WIRE_I32);
    a.extend_from_slice(&v.to_le_bytes());
    put_uint(&mut a, ATTR_TYPE, ATTR_TYPE_FLOAT);
    a
}

/// One layer's matched attention.
struct Layer {
    /// The queries, before the transpose to BNSH, or BNSH (`true`: transpose back).
    q: (String, bool),
    /// The factor on `q·k` (a `Mul`/`Div` by a constant between the scores and the mask, else 1).
    scale: f32,
    past_k: String,
    past_v: String,
    /// The new keys/values before the transpose to BNSH (`[batch, new, heads, head_dim]`), or the
    /// BNSH tensor when the graph has no such transpose (`true`: transpose back).
    k_new: (String, bool),
    v_new: (String, bool),
    present_k: String,
    present_v: String,
    concat_k: usize,
    concat_v: usize,
    output: String,
    out_node: usize,
}

struct Graph<'a> {
    nodes: &'a [NodeInfo],
    scalars: &'a HashMap<String, f32>,
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
}

impl<'a> Graph<'a> {
    fn new(nodes: &'a [NodeInfo], scalars: &'a HashMap<String, f32>) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            for o in &n.outputs {
                producer.insert(o.as_str(), i);
            }
            for x in &n.inputs {
                consumers.entry(x.as_str()).or_default().push(i);
            }
        }
        Self {
            nodes,
            scalars,
            producer,
            consumers,
        }
    }

    /// The node producing `name` when it is an `op` (standard domain).
    fn made_by(&self, name: &str, op: &str) -> Option<(usize, &'a NodeInfo)> {
        let &i = self.producer.get(name)?;
        let n = &self.nodes[i];
        (n.op == op && (n.domain.is_empty() || n.domain == "ai.onnx")).then_some((i, n))
    }

    /// The only consumer of `name`, when it is an `op`.
    fn only_consumer(&self, name: &str, op: &str) -> Option<(usize, &'a NodeInfo)> {
        match self.consumers.get(name).map(Vec::as_slice) {
            Some(&[i]) if self.nodes[i].op == op => Some((i, &self.nodes[i])),
            _ => None,
        }
    }

    fn transpose_input(&self, name: &str, perm: &[i64]) -> Option<&'a str> {
        let (_, t) = self.made_by(name, "Transpose")?;
        (t.ints("perm") == Some(perm)).then(|| t.inputs[0].as_str())
    }

    /// `x` from `Reshape(Expand(Unsqueeze(x)))` (repeat_kv), or `name` itself.
    fn unrepeat(&self, name: &'a str) -> &'a str {
        let step = || {
            let (_, r) = self.made_by(name, "Reshape")?;
            let (_, e) = self.made_by(&r.inputs[0], "Expand")?;
            let (_, u) = self.made_by(&e.inputs[0], "Unsqueeze")?;
            Some(u.inputs[0].as_str())
        };
        step().unwrap_or(name)
    }

    /// `(concat node, past input, new BNSH tensor)` of a present `Concat(past, new)`.
    fn present(
        &self,
        name: &str,
        past_inputs: &HashSet<&str>,
    ) -> Result<(usize, String, String), String> {
        let (i, c) = self
            .made_by(name, "Concat")
            .ok_or_else(|| format!("{name} is not made by a Concat"))?;
        let axis = c.ints("axis").and_then(|a| a.first().copied());
        if !matches!(axis, Some(-2) | Some(2)) || c.inputs.len() != 2 {
            return Err(format!(
                "{name}: a Concat that is not (past, new) on the sequence axis"
            ));
        }
        if !past_inputs.contains(c.inputs[0].as_str()) {
            return Err(format!(
                "{name}: the Concat's first input {} is not a past_key_values input",
                c.inputs[0]
            ));
        }
        Ok((i, c.inputs[0].clone(), c.inputs[1].clone()))
    }

    fn layer(&self, s: usize, past_inputs: &HashSet<&str>) -> Result<Layer, String> {
        let sm = &self.nodes[s];
        let (_, add) = self
            .made_by(&sm.inputs[0], "Add")
            .ok_or("the Softmax's input is not an Add (scores + mask)")?;
        let scaled = |x: &str| -> Option<(&'a NodeInfo, f32)> {
            if let Some((_, m)) = self.made_by(x, "MatMul") {
                return Some((m, 1.0));
            }
            for (op, invert) in [("Mul", false), ("Div", true)] {
                if let Some((_, n)) = self.made_by(x, op) {
                    let (_, m) = self.made_by(&n.inputs[0], "MatMul")?;
                    let c = *self.scalars.get(n.inputs.get(1)?.as_str())?;
                    return Some((m, if invert { 1.0 / c } else { c }));
                }
            }
            None
        };
        let (scores, scale) = add
            .inputs
            .iter()
            .find_map(|x| scaled(x))
            .ok_or("neither input of the mask Add is a MatMul, or one scaled by a constant (a soft-cap is not handled)")?;
        let q = match self.transpose_input(&scores.inputs[0], &[0, 2, 1, 3]) {
            Some(q) => (q.to_string(), false),
            None => (scores.inputs[0].clone(), true),
        };
        let k_rep = self
            .transpose_input(&scores.inputs[1], &[0, 1, 3, 2])
            .ok_or("the scores' key is not Transpose(0,1,3,2)")?;
        let present_k = self.unrepeat(k_rep);
        let (_, pv) = self
            .only_consumer(&sm.outputs[0], "MatMul")
            .ok_or("the Softmax's output does not go to one MatMul")?;
        if pv.inputs[0] != sm.outputs[0] {
            return Err("the probabilities are not the first MatMul input".into());
        }
        let present_v = self.unrepeat(&pv.inputs[1]);
        let (_, out_t) = self
            .only_consumer(&pv.outputs[0], "Transpose")
            .filter(|(_, t)| t.ints("perm") == Some(&[0, 2, 1, 3][..]))
            .ok_or("the attention output is not Transpose(0,2,1,3)")?;
        let (out_node, out_r) = self
            .only_consumer(&out_t.outputs[0], "Reshape")
            .ok_or("the transposed attention output does not go to one Reshape")?;
        let (concat_k, past_k, new_k) = self.present(present_k, past_inputs)?;
        let (concat_v, past_v, new_v) = self.present(present_v, past_inputs)?;
        let bsnh = |x: &str| match self.transpose_input(x, &[0, 2, 1, 3]) {
            Some(i) => (i.to_string(), false),
            None => (x.to_string(), true),
        };
        Ok(Layer {
            q,
            scale,
            past_k,
            past_v,
            k_new: bsnh(&new_k),
            v_new: bsnh(&new_v),
            present_k: present_k.to_string(),
            present_v: present_v.to_string(),
            concat_k,
            concat_v,
            output: out_r.outputs[0].clone(),
            out_node,
        })
    }
}

/// Plans the fusion of every layer, or says why it does not apply.
pub(super) fn plan(
    nodes: &[NodeInfo],
    inputs: &[GraphInput],
    outputs: &[String],
    scalars: &HashMap<String, f32>,
    spec: &AttentionSpec,
    kernel: AttentionKernel,
) -> Result<Plan, String> {
    if nodes.iter().any(|n| n.has_subgraph) {
        return Err("the graph has control-flow subgraphs".into());
    }
    let g = Graph::new(nodes, scalars);
    let softmaxes: Vec<usize> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op == "Softmax")
        .map(|(i, _)| i)
        .collect();
    if softmaxes.len() != spec.windows.len() {
        return Err(format!(
            "{} Softmax nodes for {} layers in config.json",
            softmaxes.len(),
            spec.windows.len()
        ));
    }
    let past: HashMap<&str, &GraphInput> = inputs
        .iter()
        .filter(|i| i.name.starts_with(crate::engine::kv::PAST_PREFIX))
        .map(|i| (i.name.as_str(), i))
        .collect();
    let past_names: HashSet<&str> = past.keys().copied().collect();
    let mut layers = Vec::new();
    for (l, &s) in softmaxes.iter().enumerate() {
        layers.push(
            g.layer(s, &past_names)
                .map_err(|e| format!("layer {l}: {e}"))?,
        );
    }
    let mut plan = Plan {
        replace: HashMap::new(),
        drop: HashSet::new(),
        inputs: Vec::new(),
        outputs: Vec::new(),
        drop_inputs: HashSet::new(),
        fusion: Fusion::default(),
    };
    // The layer that owns each present (the first to read it) and its window.
    let mut owner: HashMap<usize, (usize, Option<usize>)> = HashMap::new();
    let shape3 = "onnx_chat/gqa/shape_bs_flat";
    let perm = {
        let mut a = Vec::new();
        put_bytes(&mut a, ATTR_NAME, b"perm");
        for p in [0u64, 2, 1, 3] {
            put_uint(&mut a, ATTR_INTS, p);
        }
        put_uint(&mut a, ATTR_TYPE, ATTR_TYPE_INTS);
        a
    };
    for (l, layer) in layers.iter().enumerate() {
        let window = spec.windows[l];
        let kv_heads = past
            .get(layer.past_k.as_str())
            .and_then(|i| i.dims.get(1).copied().flatten())
            .ok_or_else(|| {
                format!(
                    "layer {l}: {} has no fixed head count (dim 1)",
                    layer.past_k
                )
            })?;
        if kv_heads <= 0 || spec.num_heads as i64 % kv_heads != 0 {
            return Err(format!(
                "layer {l}: {} query heads over {kv_heads} key/value heads",
                spec.num_heads
            ));
        }
        let shared = match owner.get(&layer.concat_k) {
            Some(&(src, src_window)) => {
                if src_window != window {
                    return Err(format!(
                        "layer {l} reads the cache of layer {src}, whose window differs"
                    ));
                }
                true
            }
            None => {
                owner.insert(layer.concat_k, (l, window));
                false
            }
        };
        let mut emitted = Vec::new();
        if plan.replace.is_empty() {
            emitted.push(super::int64_constant_node(shape3, &[0, 0, -1]));
        }
        let p = format!("onnx_chat/gqa/{l}");
        let flat = |x: &(String, bool), what: &str, emitted: &mut Vec<Vec<u8>>| {
            let mut src = x.0.clone();
            if x.1 {
                let t = format!("{p}/{what}_bsnh");
                emitted.push(make_node(
                    "Transpose",
                    &[&src],
                    &t,
                    std::slice::from_ref(&perm),
                ));
                src = t;
            }
            let r = format!("{p}/{what}");
            emitted.push(make_node("Reshape", &[&src, shape3], &r, &[]));
            r
        };
        let q = flat(&layer.q, "q", &mut emitted);
        let k = flat(&layer.k_new, "k", &mut emitted);
        let v = flat(&layer.v_new, "v", &mut emitted);
        let (seqlens, total) = if window.is_some() {
            (SEQLENS_LOCAL, TOTAL_LOCAL)
        } else {
            (SEQLENS, TOTAL)
        };
        let (pk, pv) = if shared {
            let (pk, pv) = (format!("{p}/present_key"), format!("{p}/present_value"));
            for (name, input) in [(&pk, &layer.past_k), (&pv, &layer.past_v)] {
                plan.outputs
                    .push(renamed(past[input.as_str()], name).map_err(|e| e.0)?);
                plan.fusion.aliases.push((name.clone(), input.clone()));
            }
            (pk, pv)
        } else {
            plan.drop.insert(layer.concat_k);
            plan.drop.insert(layer.concat_v);
            if window.is_some() {
                plan.fusion.local_pasts.push(layer.past_k.clone());
                plan.fusion.local_pasts.push(layer.past_v.clone());
            }
            (layer.present_k.clone(), layer.present_v.clone())
        };
        let mut attrs = vec![
            int_attr("num_heads", spec.num_heads as i64),
            int_attr("kv_num_heads", kv_heads),
            float_attr("scale", layer.scale),
        ];
        if let Some(w) = window {
            attrs.push(int_attr("local_window_size", w as i64));
        }
        let mut node = Vec::new();
        for i in [&q, &k, &v, &layer.past_k, &layer.past_v, seqlens, total] {
            put_bytes(&mut node, NODE_INPUT, i.as_bytes());
        }
        for o in [&layer.output, &pk, &pv] {
            put_bytes(&mut node, NODE_OUTPUT, o.as_bytes());
        }
        put_bytes(&mut node, NODE_NAME, p.as_bytes());
        let native = kernel == AttentionKernel::Native
            && past.get(layer.past_k.as_str()).and_then(|i| i.elem) == Some(TENSOR_FLOAT);
        if native {
            put_bytes(
                &mut node,
                NODE_OP_TYPE,
                crate::engine::attention::OP.as_bytes(),
            );
            put_bytes(
                &mut node,
                NODE_DOMAIN,
                crate::engine::attention::DOMAIN.as_bytes(),
            );
        } else {
            put_bytes(&mut node, NODE_OP_TYPE, b"GroupQueryAttention");
            put_bytes(&mut node, NODE_DOMAIN, b"com.microsoft");
        }
        if plan.fusion.layers > 0 && plan.fusion.native != native {
            return Err("the layers' caches differ in element type".into());
        }
        plan.fusion.native = native;
        for a in attrs {
            put_bytes(&mut node, NODE_ATTRIBUTE, &a);
        }
        emitted.push(node);
        plan.replace.insert(layer.out_node, emitted);
        plan.fusion.layers += 1;
        plan.fusion.shared += usize::from(shared);
        plan.fusion.windowed += usize::from(window.is_some());
        plan.fusion.window = plan.fusion.window.max(window);
    }
    plan.inputs.push(int32_input(SEQLENS, &["batch_size"]));
    plan.inputs.push(int32_input(TOTAL, &[]));
    if spec.windows.iter().any(Option::is_some) {
        plan.inputs
            .push(int32_input(SEQLENS_LOCAL, &["batch_size"]));
        plan.inputs.push(int32_input(TOTAL_LOCAL, &[]));
    }
    sweep(nodes, &mut plan, inputs, outputs)?;
    Ok(plan)
}

/// Drops every node whose outputs nothing live reads, and graph inputs nothing reads any more
/// (a declared `attention_mask`), after the replacements.
fn sweep(
    nodes: &[NodeInfo],
    plan: &mut Plan,
    inputs: &[GraphInput],
    outputs: &[String],
) -> Result<(), String> {
    // The node list after the edits: (original index, inputs, outputs).
    let mut list: Vec<(usize, Vec<String>, Vec<String>)> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        if plan.drop.contains(&i) {
            continue;
        }
        match plan.replace.get(&i) {
            Some(new) => {
                for b in new {
                    let info = super::node_info(b).map_err(|e| e.0)?;
                    list.push((i, info.inputs, info.outputs));
                }
            }
            None => list.push((i, n.inputs.clone(), n.outputs.clone())),
        }
    }
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (j, (_, _, outs)) in list.iter().enumerate() {
        for o in outs {
            producer.insert(o.as_str(), j);
        }
    }
    let mut live = vec![false; list.len()];
    let added: Vec<String> = plan.fusion.aliases.iter().map(|a| a.0.clone()).collect();
    let mut stack: Vec<&str> = outputs.iter().chain(&added).map(String::as_str).collect();
    let mut read: HashSet<&str> = HashSet::new();
    while let Some(name) = stack.pop() {
        read.insert(name);
        if let Some(&j) = producer.get(name) {
            if !live[j] {
                live[j] = true;
                stack.extend(
                    list[j]
                        .1
                        .iter()
                        .map(String::as_str)
                        .filter(|s| !s.is_empty()),
                );
            }
        }
    }
    for (j, (i, _, _)) in list.iter().enumerate() {
        if !live[j] && !plan.replace.contains_key(i) {
            plan.drop.insert(*i);
        }
    }
    for input in inputs {
        if !read.contains(input.name.as_str()) && input.name == "attention_mask" {
            plan.drop_inputs.insert(input.name.clone());
        }
    }
    Ok(())
}

/// Scalar float constants of a graph (initializers and `Constant` nodes), by name: what an
/// attention's score scale is read from.
pub(super) fn scalar_floats(body: &[u8]) -> Result<HashMap<String, f32>, RewriteError> {
    let mut out = HashMap::new();
    for f in fields(body) {
        let f = f?;
        match (f.num, f.wire) {
            (GRAPH_INITIALIZER, WIRE_LEN) => {
                if let Some((name, v)) = scalar_tensor(f.body)? {
                    out.insert(name, v);
                }
            }
            (GRAPH_NODE, WIRE_LEN) => {
                let info = super::node_info(f.body)?;
                if info.op != "Constant" || info.outputs.len() != 1 {
                    continue;
                }
                for n in fields(f.body) {
                    let n = n?;
                    if n.num != NODE_ATTRIBUTE || n.wire != WIRE_LEN {
                        continue;
                    }
                    for a in fields(n.body) {
                        let a = a?;
                        if a.num == ATTR_T && a.wire == WIRE_LEN {
                            if let Some((_, v)) = scalar_tensor(a.body)? {
                                out.insert(info.outputs[0].clone(), v);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// `(name, value)` of a TensorProto holding one float32.
fn scalar_tensor(body: &[u8]) -> Result<Option<(String, f32)>, RewriteError> {
    let (mut name, mut ty, mut count, mut value) = (String::new(), 0, 1u64, None);
    for t in fields(body) {
        let t = t?;
        match (t.num, t.wire) {
            (TENSOR_DIMS, WIRE_VARINT) => count *= varint_value(&t)?,
            (TENSOR_DIMS, WIRE_LEN) => {
                let mut p = 0;
                while p < t.body.len() {
                    count *= read_varint(t.body, &mut p)?;
                }
            }
            (TENSOR_DATA_TYPE, WIRE_VARINT) => ty = varint_value(&t)?,
            (TENSOR_NAME, WIRE_LEN) => name = text(t.body)?.to_string(),
            (TENSOR_RAW_DATA, WIRE_LEN) | (TENSOR_FLOAT_DATA, WIRE_LEN) if t.body.len() == 4 => {
                value = Some(f32::from_le_bytes([
                    t.body[0], t.body[1], t.body[2], t.body[3],
                ]));
            }
            (TENSOR_FLOAT_DATA, WIRE_I32) => {
                let b = &t.raw[t.raw.len() - 4..];
                value = Some(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
            _ => {}
        }
    }
    Ok(match (ty, count, value) {
        (TENSOR_FLOAT, 1, Some(v)) => Some((name, v)),
        _ => None,
    })
}
