//! Load-time rewrites of an ONNX graph, done on the protobuf wire format: only node records are
//! decoded; everything else (weights embedded in the file included) is copied through as bytes.
//!
//! - **MatMulNBits accuracy level** ([`GraphEdits::accuracy_level`]): sets `accuracy_level` on every
//!   `com.microsoft.MatMulNBits` node. The q4 exports leave it unset, which makes ONNX Runtime
//!   dequantize the 4-bit weights and compute in fp32; 4 quantizes activations to int8 per block and
//!   uses integer dot products (VNNI/AMX where the CPU has them), much faster, slightly different numbers.
//! - **Last-position logits** ([`GraphEdits::last_logits`]): puts a `Slice` to the last position
//!   (axis -2) in front of the MatMul that produces the decoder's logits, so a prompt of P tokens computes
//!   and allocates `[1, 1, vocab]` instead of `[1, P, vocab]` (real Gemma-3n: 262k vocabulary). The
//!   last row's numbers are those of the full computation. The path from that MatMul to the output may
//!   only pass through element-wise ops (soft-capping, casts, int8 rescaling); otherwise the rewrite is
//!   not applied and the reason is reported.
//! - **Attention mask** ([`GraphEdits::attention_mask`]): a decoder exported without an
//!   `attention_mask` input (Gemma-3n as exported) builds its causal and sliding-window masks from
//!   shapes alone: `Where(cond, 0, -big)` with `cond` computed from `Range`s over the past length (a
//!   `Shape` of a `past_key_values.*` input), never from input data. The rewrite declares an
//!   `attention_mask` input (int64 `[batch, past + new]`, 1 = a real position) and ANDs
//!   `Reshape(Cast(mask, bool), [0, 1, 1, -1])` into every such `cond`, so the rows of a batch can
//!   hold left-padded sequences of different lengths. With a mask of ones the graph computes exactly
//!   what it did before. When no such `Where` is found the rewrite is not applied and the reason is
//!   reported (the caller then does not batch).

use std::collections::{BTreeMap, HashMap};

mod attention;
mod external_data;
mod wire;

pub use attention::{
    AttentionKernel, AttentionSpec, Fusion, SEQLENS, SEQLENS_LOCAL, TOTAL, TOTAL_LOCAL,
};

pub use external_data::{external_data_folder, external_data_locations, ExternalDataFolder};
use external_data::{externalize_tensor, relocate_sparse, relocate_tensor};
use wire::*;

/// What to change in a graph.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GraphEdits {
    /// `accuracy_level` for every MatMulNBits node (`None` = leave as exported).
    pub accuracy_level: Option<i64>,
    /// Name of the logits output to reduce to its last position (`None` = leave).
    pub last_logits: Option<String>,
    /// Name of the attention-mask input to add when the graph has none (`None` = leave).
    pub attention_mask: Option<String>,
    /// External-data `location`s to rename (old → new), from [`external_data_folder`]: a hub
    /// snapshot's links resolved to the files they point at.
    pub relocate: BTreeMap<String, String>,
    /// Fuse each layer's attention into `GroupQueryAttention` ([`attention`]); when it applies, the
    /// attention-mask edit is not needed and not made.
    pub attention: Option<AttentionSpec>,
    /// Which operator the fused layers run.
    pub attention_kernel: AttentionKernel,
    /// The graph's own file, as a `location` relative to the external-data folder: inline
    /// initializers of [`EXTERNALIZE_MIN_BYTES`] or more become external data read from that file at
    /// their offsets, so that ONNX Runtime copies each weight once instead of three times (the
    /// protobuf's copy, the tensor, and the bytes handed over). Needs the model bytes to be the whole
    /// file (a memory map of it).
    pub externalize: Option<String>,
}

/// Inline initializers from this size (a page) up are read from the file as external data
/// ([`GraphEdits::externalize`]); smaller ones stay in the protobuf.
pub const EXTERNALIZE_MIN_BYTES: usize = 4096;

impl GraphEdits {
    pub fn is_empty(&self) -> bool {
        self.externalize.is_none()
            && self.accuracy_level.is_none()
            && self.last_logits.is_none()
            && self.attention_mask.is_none()
            && self.relocate.is_empty()
            && self.attention.is_none()
    }
}

/// What a rewrite did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RewriteReport {
    /// MatMulNBits nodes whose accuracy level was set (subgraphs included).
    pub matmulnbits: usize,
    /// The level they were set to.
    pub accuracy_level: Option<i64>,
    /// The op type of the node the last-position slice was put in front of.
    pub last_logits_before: Option<String>,
    /// Why the last-position rewrite was not applied, when it was asked for.
    pub last_logits_skipped: Option<String>,
    /// `DynamicQuantizeLinear` nodes seen (subgraphs included): activations quantized with a scale
    /// computed over the whole tensor of a run, so a position's numbers depend on what else ran with
    /// it (how a prompt is split, which sequences share a batch).
    pub dynamic_quantize: usize,
    /// Mask `Where` nodes the added attention mask was combined with (0 = not added).
    pub attention_mask_added: usize,
    /// Why the attention mask was not added, when it was asked for.
    pub attention_mask_skipped: Option<String>,
    /// The graph already declares the attention-mask input.
    pub attention_mask_declared: bool,
    /// Tensors whose external-data location was renamed ([`GraphEdits::relocate`]).
    pub external_data_relocated: usize,
    /// Inline initializers turned into external data of the graph's own file
    /// ([`GraphEdits::externalize`]), and their bytes.
    pub externalized: usize,
    pub externalized_bytes: u64,
    /// What the attention fusion did, when it applied.
    pub attention: Option<Fusion>,
    /// Why the attention fusion was not applied, when it was asked for.
    pub attention_skipped: Option<String>,
}

impl RewriteReport {
    pub fn changed(&self) -> bool {
        self.matmulnbits > 0
            || self.last_logits_before.is_some()
            || self.attention_mask_added > 0
            || self.external_data_relocated > 0
            || self.externalized > 0
            || self.attention.is_some()
    }

    /// Whether the graph takes an attention mask (declared, or added by the rewrite).
    pub fn has_attention_mask(&self) -> bool {
        self.attention_mask_declared || self.attention_mask_added > 0
    }

    /// One line for logs and `inspect`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.matmulnbits > 0 {
            parts.push(format!(
                "accuracy_level set on {} MatMulNBits",
                self.matmulnbits
            ));
        }
        if let Some(op) = &self.last_logits_before {
            parts.push(format!(
                "logits of the last position only (Slice before {op})"
            ));
        }
        if let Some(why) = &self.last_logits_skipped {
            parts.push(format!("last-position logits not applied: {why}"));
        }
        if self.attention_mask_added > 0 {
            parts.push(format!(
                "attention_mask input added (combined with {} mask Where node(s))",
                self.attention_mask_added
            ));
        }
        if let Some(why) = &self.attention_mask_skipped {
            parts.push(format!("attention_mask not added: {why}"));
        }
        if let Some(f) = &self.attention {
            parts.push(format!(
                "attention fused into {} in {} layers ({} sliding-window, {} reading another layer's cache)",
                if f.native {
                    "onnx_chat.CachedAttention"
                } else {
                    "GroupQueryAttention"
                },
                f.layers,
                f.windowed,
                f.shared
            ));
        }
        if let Some(why) = &self.attention_skipped {
            parts.push(format!("attention not fused: {why}"));
        }
        if self.externalized > 0 {
            parts.push(format!(
                "{} weight(s) ({} MiB) read from the file in place",
                self.externalized,
                self.externalized_bytes >> 20
            ));
        }
        if self.external_data_relocated > 0 {
            parts.push(format!(
                "external data of {} tensor(s) read through the snapshot's links",
                self.external_data_relocated
            ));
        }
        parts.join("; ")
    }
}

/// A rewritten model: the protobuf is `bytes[offset..]`.
pub struct Rewritten {
    pub bytes: Vec<u8>,
    pub offset: usize,
    pub report: RewriteReport,
}

impl Rewritten {
    pub fn model(&self) -> &[u8] {
        &self.bytes[self.offset..]
    }
}

/// Malformed protobuf (or an ONNX file this rewriter does not understand).
#[derive(Debug, thiserror::Error)]
#[error("cannot rewrite the ONNX graph: {0}")]
pub struct RewriteError(String);

fn err<T>(m: impl Into<String>) -> Result<T, RewriteError> {
    Err(RewriteError(m.into()))
}

/// Applies `edits` to a serialized `ModelProto`. Returns `None` when nothing had to change (the
/// report still says why a requested last-position rewrite was skipped).
pub fn rewrite_model(
    model: &[u8],
    edits: &GraphEdits,
) -> Result<(Option<Rewritten>, RewriteReport), RewriteError> {
    let mut report = RewriteReport::default();
    // Room in front for the graph's tag and length, written once the graph's size is known; the other
    // ModelProto fields follow the graph (field order does not matter to protobuf).
    const GAP: usize = 16;
    let mut out = Vec::with_capacity(model.len() + GAP + 4096);
    out.resize(GAP, 0);
    let mut rest = Vec::new();
    let mut graphs = 0;
    for f in fields(model) {
        let f = f?;
        if f.num == MODEL_GRAPH && f.wire == WIRE_LEN {
            graphs += 1;
            if graphs > 1 {
                return err("more than one graph in the model");
            }
            rewrite_graph(
                f.body,
                edits,
                true,
                model.as_ptr() as usize,
                &mut report,
                &mut out,
            )?;
        } else {
            rest.extend_from_slice(f.raw);
        }
    }
    if graphs == 0 {
        return err("the model has no graph");
    }
    if report.matmulnbits > 0 {
        report.accuracy_level = edits.accuracy_level;
    }
    if !report.changed() {
        return Ok((None, report));
    }
    if let Some(f) = &report.attention {
        let domain = if f.native {
            crate::engine::attention::DOMAIN
        } else {
            "com.microsoft"
        };
        if !imports_domain(&rest, domain)? {
            let mut opset = Vec::new();
            put_bytes(&mut opset, OPSET_DOMAIN, domain.as_bytes());
            put_uint(&mut opset, OPSET_VERSION, 1);
            put_bytes(&mut rest, MODEL_OPSET_IMPORT, &opset);
        }
    }
    let len = out.len() - GAP;
    let mut head = Vec::with_capacity(GAP);
    put_tag(&mut head, MODEL_GRAPH, WIRE_LEN);
    put_varint(&mut head, len as u64);
    let offset = GAP - head.len();
    out[offset..GAP].copy_from_slice(&head);
    out.extend_from_slice(&rest);
    Ok((
        Some(Rewritten {
            bytes: out,
            offset,
            report: report.clone(),
        }),
        report,
    ))
}

/// Whether a model's fields (`rest`: everything but the graph) import operator set `domain`.
fn imports_domain(rest: &[u8], domain: &str) -> Result<bool, RewriteError> {
    for f in fields(rest) {
        let f = f?;
        if f.num != MODEL_OPSET_IMPORT || f.wire != WIRE_LEN {
            continue;
        }
        for o in fields(f.body) {
            let o = o?;
            if o.num == OPSET_DOMAIN && o.wire == WIRE_LEN && o.body == domain.as_bytes() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// The parts of a node the rewrites look at.
struct NodeInfo {
    op: String,
    domain: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// Integer attributes (`i` as one value, `ints`), by name.
    ints: Vec<(String, Vec<i64>)>,
    /// Whether an attribute holds a subgraph (If/Loop/Scan).
    has_subgraph: bool,
}

impl NodeInfo {
    fn ints(&self, name: &str) -> Option<&[i64]> {
        self.ints
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

fn node_info(body: &[u8]) -> Result<NodeInfo, RewriteError> {
    let mut n = NodeInfo {
        op: String::new(),
        domain: String::new(),
        inputs: Vec::new(),
        outputs: Vec::new(),
        ints: Vec::new(),
        has_subgraph: false,
    };
    for f in fields(body) {
        let f = f?;
        match (f.num, f.wire) {
            (NODE_OP_TYPE, WIRE_LEN) => n.op = text(f.body)?.to_string(),
            (NODE_DOMAIN, WIRE_LEN) => n.domain = text(f.body)?.to_string(),
            (NODE_INPUT, WIRE_LEN) => n.inputs.push(text(f.body)?.to_string()),
            (NODE_OUTPUT, WIRE_LEN) => n.outputs.push(text(f.body)?.to_string()),
            (NODE_ATTRIBUTE, WIRE_LEN) => {
                let (mut name, mut values) = (String::new(), Vec::new());
                for a in fields(f.body) {
                    let a = a?;
                    match (a.num, a.wire) {
                        (ATTR_NAME, WIRE_LEN) => name = text(a.body)?.to_string(),
                        (ATTR_I | ATTR_INTS, WIRE_VARINT) => values.push(varint_value(&a)? as i64),
                        (ATTR_INTS, WIRE_LEN) => {
                            let mut p = 0;
                            while p < a.body.len() {
                                values.push(read_varint(a.body, &mut p)? as i64);
                            }
                        }
                        (ATTR_G | ATTR_GRAPHS, WIRE_LEN) => n.has_subgraph = true,
                        _ => {}
                    }
                }
                if !values.is_empty() {
                    n.ints.push((name, values));
                }
            }
            _ => {}
        }
    }
    Ok(n)
}

const MATMULS: [&str; 4] = ["MatMul", "MatMulNBits", "MatMulInteger", "FusedMatMul"];
/// Ops that keep the position axis where it is, element by element.
const ELEMENTWISE: [&str; 9] = [
    "Cast", "Tanh", "Identity", "Mul", "Div", "Add", "Sub", "Softcap", "Neg",
];

/// The index of the MatMul whose output flows to `logits` through element-wise ops only, or why not.
fn find_lm_head(nodes: &[NodeInfo], logits: &str) -> Result<usize, String> {
    let producer: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let Some(&first) = producer.get(logits) else {
        return Err(format!("no node produces {logits:?} in the main graph"));
    };
    let mut stack = vec![first];
    let mut seen = std::collections::HashSet::new();
    let mut found: Option<usize> = None;
    while let Some(i) = stack.pop() {
        if !seen.insert(i) || seen.len() > 64 {
            continue;
        }
        let n = &nodes[i];
        let is_onnx = n.domain.is_empty() || n.domain == "ai.onnx";
        let is_ms = n.domain == "com.microsoft";
        if MATMULS.contains(&n.op.as_str()) && (is_onnx || is_ms) {
            if found.is_some_and(|f| f != i) {
                return Err("more than one MatMul feeds the logits".into());
            }
            found = Some(i);
            continue;
        }
        if !(ELEMENTWISE.contains(&n.op.as_str()) && is_onnx) {
            // Off the path to the lm_head (e.g. the int8 scale computation): fine if it is not what
            // produces the logits themselves.
            if i == first {
                return Err(format!("the logits come from a {} node", n.op));
            }
            continue;
        }
        for inp in &n.inputs {
            if let Some(&p) = producer.get(inp.as_str()) {
                stack.push(p);
            }
        }
    }
    found.ok_or_else(|| "no MatMul found above the logits".into())
}

/// The mask `Where` nodes of a graph without an attention-mask input: `Where(cond, …)` whose `cond`
/// is computed from shapes only (every graph input reached is read through a `Shape` node), with a
/// `Range` above it and the past length (`Shape` of a `past_key_values.*` input) among its sources.
fn find_mask_wheres(nodes: &[NodeInfo], graph_inputs: &[String]) -> Result<Vec<usize>, String> {
    let producer: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let is_input = |name: &str| graph_inputs.iter().any(|i| i == name);
    let mut found = Vec::new();
    'wheres: for (w, node) in nodes.iter().enumerate() {
        if node.op != "Where" || !(node.domain.is_empty() || node.domain == "ai.onnx") {
            continue;
        }
        let Some(cond) = node.inputs.first() else {
            continue;
        };
        let (mut range, mut past_len) = (false, false);
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![cond.as_str()];
        while let Some(name) = stack.pop() {
            if is_input(name) {
                continue 'wheres; // data flows into the condition: not a shape-only mask
            }
            let Some(&i) = producer.get(name) else {
                continue; // an initializer
            };
            if !seen.insert(i) {
                continue;
            }
            if seen.len() > 2000 {
                continue 'wheres;
            }
            let n = &nodes[i];
            match n.op.as_str() {
                "Shape" => {
                    let src = n.inputs.first().map(String::as_str).unwrap_or("");
                    past_len |= src.starts_with(super::kv::PAST_PREFIX) && is_input(src);
                    continue; // a shape, not data
                }
                "Range" => range = true,
                _ => {}
            }
            stack.extend(
                n.inputs
                    .iter()
                    .map(String::as_str)
                    .filter(|s| !s.is_empty()),
            );
        }
        if range && past_len {
            found.push(w);
        }
    }
    if found.is_empty() {
        return Err("no shape-only mask (Where over a Range of the past length) found".into());
    }
    Ok(found)
}

/// Rewrites one `GraphProto` body into `out` (as the body of a length-delimited field: the caller
/// writes the tag and length). Subgraphs of If/Loop/Scan get the accuracy level too.
fn rewrite_graph(
    body: &[u8],
    edits: &GraphEdits,
    top: bool,
    base: usize,
    report: &mut RewriteReport,
    out: &mut Vec<u8>,
) -> Result<(), RewriteError> {
    let mut lm_head = None;
    let mut mask_wheres: Vec<usize> = Vec::new();
    let mut mask_name = None;
    let mut fused: Option<attention::Plan> = None;
    if top
        && (edits.last_logits.is_some()
            || edits.attention_mask.is_some()
            || edits.attention.is_some())
    {
        let mut nodes = Vec::new();
        let mut inputs = Vec::new();
        let mut outputs = Vec::new();
        for f in fields(body) {
            let f = f?;
            if f.num == GRAPH_NODE && f.wire == WIRE_LEN {
                nodes.push(node_info(f.body)?);
            } else if f.num == GRAPH_INPUT && f.wire == WIRE_LEN {
                inputs.push(attention::graph_input(f.body)?);
            } else if f.num == GRAPH_OUTPUT && f.wire == WIRE_LEN {
                outputs.push(attention::graph_input(f.body)?.name);
            }
        }
        if let Some(spec) = &edits.attention {
            let scalars = attention::scalar_floats(body)?;
            match attention::plan(
                &nodes,
                &inputs,
                &outputs,
                &scalars,
                spec,
                edits.attention_kernel,
            ) {
                Ok(p) => fused = Some(p),
                Err(why) => report.attention_skipped = Some(why),
            }
        }
        let inputs: Vec<String> = inputs.into_iter().map(|i| i.name).collect();
        if let Some(mask) = edits.attention_mask.as_deref().filter(|_| fused.is_none()) {
            if inputs.iter().any(|i| i == mask) {
                report.attention_mask_declared = true;
            } else {
                match find_mask_wheres(&nodes, &inputs) {
                    Ok(w) => {
                        mask_wheres = w;
                        mask_name = Some(mask);
                    }
                    Err(why) => report.attention_mask_skipped = Some(why),
                }
            }
        }
        if let Some(logits) = edits.last_logits.as_deref() {
            match find_lm_head(&nodes, logits) {
                Ok(i) => lm_head = Some((i, nodes.swap_remove(i))),
                Err(why) => report.last_logits_skipped = Some(why),
            }
        }
    }
    let mask_b11t = mask_name.map(|m| format!("onnx_chat/attention_mask/{m}/b11t"));
    let mut index = 0usize;
    for f in fields(body) {
        let f = f?;
        if !(f.num == GRAPH_NODE && f.wire == WIRE_LEN) {
            if let (Some(p), GRAPH_INPUT, WIRE_LEN) = (&fused, f.num, f.wire) {
                if p.drop_inputs
                    .contains(&attention::graph_input(f.body)?.name)
                {
                    continue;
                }
            }
            if let (Some(location), GRAPH_INITIALIZER, WIRE_LEN) =
                (&edits.externalize, f.num, f.wire)
            {
                if let Some(t) = externalize_tensor(f.body, base, location, EXTERNALIZE_MIN_BYTES)?
                {
                    put_bytes(out, f.num, &t);
                    report.externalized += 1;
                    report.externalized_bytes += (f.body.len() - t.len()) as u64;
                    continue;
                }
            }
            let moved = match (f.num, f.wire) {
                _ if edits.relocate.is_empty() => None,
                (GRAPH_INITIALIZER, WIRE_LEN) => relocate_tensor(f.body, &edits.relocate)?,
                (GRAPH_SPARSE_INITIALIZER, WIRE_LEN) => relocate_sparse(f.body, &edits.relocate)?,
                _ => None,
            };
            match moved {
                Some(t) => {
                    put_bytes(out, f.num, &t);
                    report.external_data_relocated += 1;
                }
                None => out.extend_from_slice(f.raw),
            }
            continue;
        }
        if let (0, Some(mask), Some(b11t)) = (index, mask_name, mask_b11t.as_deref()) {
            insert_mask_prelude(out, mask, b11t);
        }
        if let Some(p) = &fused {
            if let Some(new) = p.replace.get(&index) {
                for n in new {
                    put_bytes(out, GRAPH_NODE, n);
                }
            }
            if p.replace.contains_key(&index) || p.drop.contains(&index) {
                if lm_head.as_ref().is_some_and(|(i, _)| *i == index) {
                    return err("the attention fusion replaced the logits' MatMul");
                }
                index += 1;
                continue;
            }
        }
        let mut node = rewrite_node(f.body, edits, base, report)?;
        if let Some((i, info)) = &lm_head {
            if *i == index {
                let sliced = insert_last_slice(out, &info.inputs[0]);
                node = Some(replace_first_input(
                    node.as_deref().unwrap_or(f.body),
                    &sliced,
                )?);
                report.last_logits_before = Some(info.op.clone());
            }
        }
        if let (true, Some(b11t)) = (mask_wheres.contains(&index), mask_b11t.as_deref()) {
            let cond = node_info(node.as_deref().unwrap_or(f.body))?.inputs[0].clone();
            let combined = format!("onnx_chat/attention_mask/{index}/cond");
            put_bytes(
                out,
                GRAPH_NODE,
                &make_node("And", &[&cond, b11t], &combined, &[]),
            );
            node = Some(replace_first_input(
                node.as_deref().unwrap_or(f.body),
                &combined,
            )?);
            report.attention_mask_added += 1;
        }
        match node {
            Some(n) => put_bytes(out, GRAPH_NODE, &n),
            None => out.extend_from_slice(f.raw),
        }
        index += 1;
    }
    if let Some(mask) = mask_name {
        put_bytes(out, GRAPH_INPUT, &int64_input(mask));
    }
    if let Some(p) = fused {
        for i in &p.inputs {
            put_bytes(out, GRAPH_INPUT, i);
        }
        for o in &p.outputs {
            put_bytes(out, GRAPH_OUTPUT, o);
        }
        report.attention = Some(p.fusion);
    }
    Ok(())
}

/// A node record: `op(inputs) -> output`, named after its output, with attribute records `attrs`.
fn make_node(op: &str, inputs: &[&str], output: &str, attrs: &[Vec<u8>]) -> Vec<u8> {
    let mut node = Vec::new();
    for i in inputs {
        put_bytes(&mut node, NODE_INPUT, i.as_bytes());
    }
    put_bytes(&mut node, NODE_OUTPUT, output.as_bytes());
    put_bytes(&mut node, NODE_NAME, output.as_bytes());
    put_bytes(&mut node, NODE_OP_TYPE, op.as_bytes());
    for a in attrs {
        put_bytes(&mut node, NODE_ATTRIBUTE, a);
    }
    node
}

/// `Constant` node holding a 1-D int64 tensor.
fn int64_constant(out: &mut Vec<u8>, name: &str, values: &[i64]) {
    put_bytes(out, GRAPH_NODE, &int64_constant_node(name, values));
}

/// The record of a `Constant` node holding a 1-D int64 tensor.
fn int64_constant_node(name: &str, values: &[i64]) -> Vec<u8> {
    let mut tensor = Vec::new();
    put_uint(&mut tensor, TENSOR_DIMS, values.len() as u64);
    put_uint(&mut tensor, TENSOR_DATA_TYPE, TENSOR_INT64);
    let mut packed = Vec::new();
    for &v in values {
        put_varint(&mut packed, v as u64);
    }
    put_bytes(&mut tensor, TENSOR_INT64_DATA, &packed);
    let mut attr = Vec::new();
    put_bytes(&mut attr, ATTR_NAME, b"value");
    put_bytes(&mut attr, ATTR_T, &tensor);
    put_uint(&mut attr, ATTR_TYPE, ATTR_TYPE_TENSOR);
    make_node("Constant", &[], name, &[attr])
}

/// `b11t = Reshape(Cast(mask, bool), [0, 1, 1, -1])`: `[batch, total]` → `[batch, 1, 1, total]`,
/// broadcastable against `[batch | 1, heads | 1, new, total]` mask conditions.
fn insert_mask_prelude(out: &mut Vec<u8>, mask: &str, b11t: &str) {
    let prefix = format!("onnx_chat/attention_mask/{mask}");
    let shape = format!("{prefix}/shape");
    let as_bool = format!("{prefix}/bool");
    int64_constant(out, &shape, &[0, 1, 1, -1]);
    let mut to = Vec::new();
    put_bytes(&mut to, ATTR_NAME, b"to");
    put_uint(&mut to, ATTR_I, TENSOR_BOOL);
    put_uint(&mut to, ATTR_TYPE, ATTR_TYPE_INT);
    put_bytes(
        out,
        GRAPH_NODE,
        &make_node("Cast", &[mask], &as_bool, &[to]),
    );
    put_bytes(
        out,
        GRAPH_NODE,
        &make_node("Reshape", &[&as_bool, &shape], b11t, &[]),
    );
}

/// A graph input declaration: int64 `[batch_size, total_sequence_length]`.
fn int64_input(name: &str) -> Vec<u8> {
    tensor_input(name, TENSOR_INT64, &["batch_size", "total_sequence_length"])
}

/// A graph input declaration (`ValueInfoProto`): element type `elem`, the given symbolic dims
/// (none = a scalar).
fn tensor_input(name: &str, elem: u64, dims: &[&str]) -> Vec<u8> {
    let mut shape = Vec::new();
    for dim in dims {
        let mut d = Vec::new();
        put_bytes(&mut d, DIM_PARAM, dim.as_bytes());
        put_bytes(&mut shape, SHAPE_DIM, &d);
    }
    let mut tensor = Vec::new();
    put_uint(&mut tensor, TYPE_TENSOR_ELEM, elem);
    put_bytes(&mut tensor, TYPE_TENSOR_SHAPE, &shape);
    let mut ty = Vec::new();
    put_bytes(&mut ty, TYPE_TENSOR, &tensor);
    let mut v = Vec::new();
    put_bytes(&mut v, VALUE_INFO_NAME, name.as_bytes());
    put_bytes(&mut v, VALUE_INFO_TYPE, &ty);
    v
}

/// Writes Constant nodes for starts/ends/axes and `Slice(x, -1, MAX, -2)`; returns the sliced name.
fn insert_last_slice(out: &mut Vec<u8>, x: &str) -> String {
    let prefix = format!("onnx_chat/last_position/{x}");
    let sliced = format!("{prefix}/sliced");
    let mut names = Vec::new();
    for (what, v) in [("starts", -1i64), ("ends", i64::MAX), ("axes", -2)] {
        let name = format!("{prefix}/{what}");
        int64_constant(out, &name, &[v]);
        names.push(name);
    }
    let inputs: Vec<&str> = std::iter::once(x)
        .chain(names.iter().map(String::as_str))
        .collect();
    put_bytes(out, GRAPH_NODE, &make_node("Slice", &inputs, &sliced, &[]));
    sliced
}

fn replace_first_input(node: &[u8], name: &str) -> Result<Vec<u8>, RewriteError> {
    let mut out = Vec::with_capacity(node.len() + name.len());
    let mut first = true;
    for f in fields(node) {
        let f = f?;
        if first && f.num == NODE_INPUT && f.wire == WIRE_LEN {
            put_bytes(&mut out, NODE_INPUT, name.as_bytes());
            first = false;
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    Ok(out)
}

/// A node with its edits applied, or `None` when it stays as it is.
fn rewrite_node(
    body: &[u8],
    edits: &GraphEdits,
    base: usize,
    report: &mut RewriteReport,
) -> Result<Option<Vec<u8>>, RewriteError> {
    let (mut op, mut domain, mut subgraphs, mut tensors) = ("", "", false, false);
    let tensor_attr = |n: u32| {
        !edits.relocate.is_empty()
            && matches!(
                n,
                ATTR_T | ATTR_TENSORS | ATTR_SPARSE_TENSOR | ATTR_SPARSE_TENSORS
            )
    };
    for f in fields(body) {
        let f = f?;
        match (f.num, f.wire) {
            (NODE_OP_TYPE, WIRE_LEN) => op = text(f.body)?,
            (NODE_DOMAIN, WIRE_LEN) => domain = text(f.body)?,
            (NODE_ATTRIBUTE, WIRE_LEN) => {
                for a in fields(f.body) {
                    let a = a?;
                    subgraphs |= matches!(a.num, ATTR_G | ATTR_GRAPHS) && a.wire == WIRE_LEN;
                    tensors |= tensor_attr(a.num) && a.wire == WIRE_LEN;
                }
            }
            _ => {}
        }
    }
    if op == "DynamicQuantizeLinear" {
        report.dynamic_quantize += 1;
    }
    let level = edits
        .accuracy_level
        .filter(|_| op == "MatMulNBits" && domain == "com.microsoft");
    if level.is_none() && !subgraphs && !tensors {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(body.len() + 32);
    for f in fields(body) {
        let f = f?;
        if f.num != NODE_ATTRIBUTE || f.wire != WIRE_LEN {
            out.extend_from_slice(f.raw);
            continue;
        }
        let mut name = "";
        let mut has_graph = false;
        for a in fields(f.body) {
            let a = a?;
            match (a.num, a.wire) {
                (ATTR_NAME, WIRE_LEN) => name = text(a.body)?,
                (ATTR_G | ATTR_GRAPHS, WIRE_LEN) => has_graph = true,
                (n, WIRE_LEN) if tensor_attr(n) => has_graph = true,
                _ => {}
            }
        }
        if level.is_some() && name == "accuracy_level" {
            continue;
        }
        if !has_graph {
            out.extend_from_slice(f.raw);
            continue;
        }
        let mut attr = Vec::with_capacity(f.body.len());
        for a in fields(f.body) {
            let a = a?;
            let moved = match (a.num, a.wire) {
                (ATTR_G | ATTR_GRAPHS, WIRE_LEN) => {
                    let mut g = Vec::with_capacity(a.body.len());
                    rewrite_graph(a.body, edits, false, base, report, &mut g)?;
                    Some(g)
                }
                (ATTR_T | ATTR_TENSORS, WIRE_LEN) if tensor_attr(a.num) => {
                    relocate_tensor(a.body, &edits.relocate)?
                }
                (ATTR_SPARSE_TENSOR | ATTR_SPARSE_TENSORS, WIRE_LEN) if tensor_attr(a.num) => {
                    relocate_sparse(a.body, &edits.relocate)?
                }
                _ => None,
            };
            match moved {
                Some(m) => {
                    if !matches!(a.num, ATTR_G | ATTR_GRAPHS) {
                        report.external_data_relocated += 1;
                    }
                    put_bytes(&mut attr, a.num, &m);
                }
                None => attr.extend_from_slice(a.raw),
            }
        }
        put_bytes(&mut out, NODE_ATTRIBUTE, &attr);
    }
    if let Some(level) = level {
        let mut attr = Vec::new();
        put_bytes(&mut attr, ATTR_NAME, b"accuracy_level");
        put_uint(&mut attr, ATTR_I, level as u64);
        put_uint(&mut attr, ATTR_TYPE, ATTR_TYPE_INT);
        put_bytes(&mut out, NODE_ATTRIBUTE, &attr);
        report.matmulnbits += 1;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(
        op: &str,
        domain: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: &[Vec<u8>],
    ) -> Vec<u8> {
        let mut n = Vec::new();
        for i in inputs {
            put_bytes(&mut n, NODE_INPUT, i.as_bytes());
        }
        for o in outputs {
            put_bytes(&mut n, NODE_OUTPUT, o.as_bytes());
        }
        put_bytes(&mut n, NODE_OP_TYPE, op.as_bytes());
        if !domain.is_empty() {
            put_bytes(&mut n, NODE_DOMAIN, domain.as_bytes());
        }
        for a in attrs {
            put_bytes(&mut n, NODE_ATTRIBUTE, a);
        }
        n
    }

    fn int_attr(name: &str, v: i64) -> Vec<u8> {
        let mut a = Vec::new();
        put_bytes(&mut a, ATTR_NAME, name.as_bytes());
        put_uint(&mut a, ATTR_I, v as u64);
        put_uint(&mut a, ATTR_TYPE, ATTR_TYPE_INT);
        a
    }

    fn model(nodes: &[Vec<u8>]) -> Vec<u8> {
        let mut g = Vec::new();
        for n in nodes {
            put_bytes(&mut g, GRAPH_NODE, n);
        }
        put_bytes(&mut g, 2, b"graph");
        let mut m = Vec::new();
        put_uint(&mut m, 1, 8);
        put_bytes(&mut m, MODEL_GRAPH, &g);
        put_bytes(&mut m, 2, b"producer");
        m
    }

    /// The bodies of the graph's fields numbered `num` (nodes, inputs, …).
    fn graph_fields(m: &[u8], num: u32) -> Vec<&[u8]> {
        let g = fields(m)
            .map(Result::unwrap)
            .find(|f| f.num == MODEL_GRAPH)
            .unwrap();
        fields(g.body)
            .map(Result::unwrap)
            .filter(|f| f.num == num)
            .map(|f| f.body)
            .collect()
    }

    fn graph_nodes(m: &[u8]) -> Vec<NodeInfo> {
        graph_fields(m, GRAPH_NODE)
            .into_iter()
            .map(|b| node_info(b).unwrap())
            .collect()
    }

    fn attr_ints(m: &[u8], op: &str, name: &str) -> Vec<i64> {
        let g = fields(m)
            .map(Result::unwrap)
            .find(|f| f.num == MODEL_GRAPH)
            .unwrap();
        let mut v = Vec::new();
        for n in fields(g.body).map(Result::unwrap) {
            if n.num != GRAPH_NODE || node_info(n.body).unwrap().op != op {
                continue;
            }
            for a in fields(n.body).map(Result::unwrap) {
                if a.num != NODE_ATTRIBUTE {
                    continue;
                }
                let fs: Vec<_> = fields(a.body).map(Result::unwrap).collect();
                if fs
                    .iter()
                    .any(|f| f.num == ATTR_NAME && f.body == name.as_bytes())
                {
                    let raw = fs.iter().find(|f| f.num == ATTR_I).unwrap().raw;
                    let mut p = 0;
                    read_varint(raw, &mut p).unwrap();
                    v.push(read_varint(raw, &mut p).unwrap() as i64);
                }
            }
        }
        v
    }

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut p = 0;
            assert_eq!(read_varint(&b, &mut p).unwrap(), v);
            assert_eq!(p, b.len());
        }
        assert!(read_varint(&[0x80, 0x80], &mut 0).is_err());
    }

    #[test]
    fn accuracy_level_is_set_once_and_other_fields_survive() {
        let m = model(&[
            node(
                "MatMulNBits",
                "com.microsoft",
                &["x", "w", "s"],
                &["y"],
                &[int_attr("K", 64), int_attr("accuracy_level", 0)],
            ),
            node(
                "MatMulNBits",
                "com.microsoft",
                &["y", "w2", "s2"],
                &["z"],
                &[],
            ),
            node("MatMul", "", &["z", "w3"], &["logits"], &[]),
        ]);
        let edits = GraphEdits {
            accuracy_level: Some(4),
            ..Default::default()
        };
        let (r, report) = rewrite_model(&m, &edits).unwrap();
        let r = r.unwrap();
        assert_eq!(report.matmulnbits, 2);
        assert_eq!(
            attr_ints(r.model(), "MatMulNBits", "accuracy_level"),
            [4, 4]
        );
        assert_eq!(attr_ints(r.model(), "MatMulNBits", "K"), [64]);
        let nodes = graph_nodes(r.model());
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[2].op, "MatMul");
        // the model's other fields are still there
        let nums: Vec<u32> = fields(r.model()).map(|f| f.unwrap().num).collect();
        assert_eq!(nums, [7, 1, 2]);
    }

    fn tensor(name: &str, raw: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        put_uint(&mut t, TENSOR_DIMS, raw.len() as u64);
        put_uint(&mut t, TENSOR_DATA_TYPE, 2); // uint8
        put_bytes(&mut t, TENSOR_NAME, name.as_bytes());
        put_bytes(&mut t, TENSOR_RAW_DATA, raw);
        t
    }

    /// (key, value) of a tensor's external-data entries, and whether it still has raw_data.
    fn external_entries(t: &[u8]) -> (Vec<(String, String)>, bool, Option<u64>) {
        let (mut entries, mut raw, mut loc) = (Vec::new(), false, None);
        for f in fields(t).map(Result::unwrap) {
            match f.num {
                TENSOR_RAW_DATA => raw = true,
                TENSOR_DATA_LOCATION => loc = Some(varint_value(&f).unwrap()),
                TENSOR_EXTERNAL_DATA => {
                    let kv: Vec<_> = fields(f.body).map(Result::unwrap).collect();
                    entries.push((
                        text(kv[0].body).unwrap().to_string(),
                        text(kv[1].body).unwrap().to_string(),
                    ));
                }
                _ => {}
            }
        }
        (entries, raw, loc)
    }

    #[test]
    fn inline_weights_become_external_data_of_the_same_file() {
        let big: Vec<u8> = (0..EXTERNALIZE_MIN_BYTES + 3).map(|i| i as u8).collect();
        let mut g = Vec::new();
        put_bytes(
            &mut g,
            GRAPH_NODE,
            &node("MatMul", "", &["x", "w"], &["y"], &[]),
        );
        put_bytes(&mut g, GRAPH_INITIALIZER, &tensor("w", &big));
        put_bytes(&mut g, GRAPH_INITIALIZER, &tensor("small", &[1, 2, 3]));
        let mut m = Vec::new();
        put_uint(&mut m, 1, 8);
        put_bytes(&mut m, MODEL_GRAPH, &g);
        let edits = GraphEdits {
            externalize: Some("onnx/model.onnx".into()),
            ..Default::default()
        };
        let (r, report) = rewrite_model(&m, &edits).unwrap();
        let r = r.expect("rewritten");
        assert_eq!(report.externalized, 1);
        assert!(report.externalized_bytes >= big.len() as u64 - 100);
        assert!(r.model().len() < 1024, "the weight stayed in the graph");
        let inits = graph_fields(r.model(), GRAPH_INITIALIZER);
        assert_eq!(inits.len(), 2);
        let (entries, raw, loc) = external_entries(inits[0]);
        assert!(!raw);
        assert_eq!(loc, Some(TENSOR_LOCATION_EXTERNAL));
        assert_eq!(entries[0], ("location".into(), "onnx/model.onnx".into()));
        assert_eq!(entries[2], ("length".into(), big.len().to_string()));
        // The offset points at the weight's bytes in the original file.
        let offset: usize = entries[1].1.parse().unwrap();
        assert_eq!(&m[offset..offset + big.len()], &big[..]);
        // Name, dims and type kept; the small tensor untouched.
        assert_eq!(
            text(
                fields(inits[0])
                    .map(Result::unwrap)
                    .find(|f| f.num == TENSOR_NAME)
                    .unwrap()
                    .body
            )
            .unwrap(),
            "w"
        );
        assert_eq!(inits[1], &tensor("small", &[1, 2, 3])[..]);
        // A tensor already external is left alone, and nothing to move gives no rewrite.
        let (again, report) = rewrite_model(r.model(), &edits).unwrap();
        assert!(again.is_none());
        assert_eq!(report.externalized, 0);
    }

    #[test]
    fn nothing_to_change_gives_none() {
        let m = model(&[node("MatMul", "", &["z", "w3"], &["out"], &[])]);
        let edits = GraphEdits {
            accuracy_level: Some(4),
            last_logits: Some("logits".into()),
            ..Default::default()
        };
        let (r, report) = rewrite_model(&m, &edits).unwrap();
        assert!(r.is_none());
        assert!(report
            .last_logits_skipped
            .unwrap()
            .contains("no node produces"));
    }

    #[test]
    fn last_logits_slice_goes_in_front_of_the_lm_head_through_softcap_and_int8_rescale() {
        let m = model(&[
            node(
                "DynamicQuantizeLinear",
                "",
                &["h"],
                &["hq", "hs", "hz"],
                &[],
            ),
            node("MatMulInteger", "", &["hq", "w", "hz", "wz"], &["acc"], &[]),
            node("Cast", "", &["acc"], &["accf"], &[]),
            node("Mul", "", &["hs", "ws"], &["scale"], &[]),
            node("Mul", "", &["accf", "scale"], &["raw"], &[]),
            node("Div", "", &["raw", "cap"], &["d"], &[]),
            node("Tanh", "", &["d"], &["t"], &[]),
            node("Mul", "", &["t", "cap"], &["logits"], &[]),
        ]);
        let edits = GraphEdits {
            last_logits: Some("logits".into()),
            ..Default::default()
        };
        let (r, report) = rewrite_model(&m, &edits).unwrap();
        assert_eq!(report.last_logits_before.as_deref(), Some("MatMulInteger"));
        let nodes = graph_nodes(r.unwrap().model());
        let ops: Vec<&str> = nodes.iter().map(|n| n.op.as_str()).collect();
        assert_eq!(
            ops,
            [
                "DynamicQuantizeLinear",
                "Constant",
                "Constant",
                "Constant",
                "Slice",
                "MatMulInteger",
                "Cast",
                "Mul",
                "Mul",
                "Div",
                "Tanh",
                "Mul"
            ]
        );
        assert_eq!(nodes[4].inputs[0], "hq");
        assert_eq!(nodes[5].inputs[0], nodes[4].outputs[0]);
        assert_eq!(nodes[5].inputs[1..], ["w", "hz", "wz"]);
    }

    #[test]
    fn last_logits_refuses_paths_that_are_not_element_wise() {
        let m = model(&[
            node("MatMul", "", &["h", "w"], &["y"], &[]),
            node("Transpose", "", &["y"], &["logits"], &[]),
        ]);
        let edits = GraphEdits {
            last_logits: Some("logits".into()),
            ..Default::default()
        };
        let (r, report) = rewrite_model(&m, &edits).unwrap();
        assert!(r.is_none());
        assert!(report.last_logits_skipped.unwrap().contains("Transpose"));
    }

    #[test]
    fn subgraphs_get_the_accuracy_level() {
        let mut inner = Vec::new();
        put_bytes(
            &mut inner,
            GRAPH_NODE,
            &node("MatMulNBits", "com.microsoft", &["a"], &["b"], &[]),
        );
        let mut attr = Vec::new();
        put_bytes(&mut attr, ATTR_NAME, b"then_branch");
        put_bytes(&mut attr, ATTR_G, &inner);
        put_uint(&mut attr, ATTR_TYPE, 5);
        let m = model(&[node("If", "", &["c"], &["o"], &[attr])]);
        let edits = GraphEdits {
            accuracy_level: Some(4),
            ..Default::default()
        };
        let (_, report) = rewrite_model(&m, &edits).unwrap();
        assert_eq!(report.matmulnbits, 1);
    }

    fn graph_with_inputs(nodes: &[Vec<u8>], inputs: &[&str]) -> Vec<u8> {
        let mut g = Vec::new();
        for n in nodes {
            put_bytes(&mut g, GRAPH_NODE, n);
        }
        for i in inputs {
            put_bytes(&mut g, GRAPH_INPUT, &int64_input(i));
        }
        let mut m = Vec::new();
        put_bytes(&mut m, MODEL_GRAPH, &g);
        m
    }

    fn graph_inputs(m: &[u8]) -> Vec<String> {
        graph_fields(m, GRAPH_INPUT)
            .into_iter()
            .map(|b| {
                let name = fields(b)
                    .map(Result::unwrap)
                    .find(|v| v.num == VALUE_INFO_NAME)
                    .unwrap();
                text(name.body).unwrap().to_string()
            })
            .collect()
    }

    /// Gemma-3n's mask as exported: `Where(LessOrEqual(Range(0, past + S), cache_position), 0, -big)`
    /// from shapes only; the rewrite declares `attention_mask` and ANDs it into the condition.
    #[test]
    fn attention_mask_is_added_to_a_shape_only_causal_mask() {
        let nodes = [
            node(
                "Shape",
                "",
                &["past_key_values.0.key"],
                &["past_shape"],
                &[],
            ),
            node("Gather", "", &["past_shape", "two"], &["past_len"], &[]),
            node("Range", "", &["zero", "past_len", "one"], &["kv_idx"], &[]),
            node("LessOrEqual", "", &["kv_idx", "q_idx"], &["le"], &[]),
            node("Where", "", &["le", "zeros", "min"], &["mask"], &[]),
            node("Add", "", &["scores", "mask"], &["masked"], &[]),
            // data flows into this condition: not a mask
            node("Greater", "", &["inputs_embeds", "zero"], &["gt"], &[]),
            node(
                "Where",
                "",
                &["gt", "inputs_embeds", "zero"],
                &["relu"],
                &[],
            ),
        ];
        let m = graph_with_inputs(&nodes, &["inputs_embeds", "past_key_values.0.key"]);
        let edits = GraphEdits {
            attention_mask: Some("attention_mask".into()),
            ..Default::default()
        };
        let (r, report) = rewrite_model(&m, &edits).unwrap();
        assert_eq!(report.attention_mask_added, 1, "{report:?}");
        assert!(report.has_attention_mask());
        let r = r.unwrap();
        assert_eq!(
            graph_inputs(r.model()),
            ["inputs_embeds", "past_key_values.0.key", "attention_mask"]
        );
        let nodes = graph_nodes(r.model());
        let ops: Vec<&str> = nodes.iter().map(|n| n.op.as_str()).collect();
        assert_eq!(
            ops,
            [
                "Constant",
                "Cast",
                "Reshape",
                "Shape",
                "Gather",
                "Range",
                "LessOrEqual",
                "And",
                "Where",
                "Add",
                "Greater",
                "Where"
            ]
        );
        assert_eq!(nodes[1].inputs, ["attention_mask"]);
        assert_eq!(nodes[7].inputs, ["le", nodes[2].outputs[0].as_str()]);
        assert_eq!(nodes[8].inputs[0], nodes[7].outputs[0]);
        assert_eq!(nodes[11].inputs[0], "gt", "the data Where is left alone");
        // A graph that already declares it is left as it is.
        let m = graph_with_inputs(
            &graph_fields(&m, GRAPH_NODE)
                .iter()
                .map(|b| b.to_vec())
                .collect::<Vec<_>>(),
            &["attention_mask", "past_key_values.0.key"],
        );
        let (r, report) = rewrite_model(&m, &edits).unwrap();
        assert!(r.is_none() && report.attention_mask_declared && report.has_attention_mask());
    }

    /// No shape-only mask (here: the mask comes from a data input): nothing is added, and the report
    /// says why, so the caller does not batch.
    #[test]
    fn attention_mask_is_not_added_where_the_mask_is_not_recognised() {
        let nodes = [
            node("Range", "", &["zero", "n", "one"], &["idx"], &[]),
            node("Less", "", &["idx", "position_ids"], &["lt"], &[]),
            node("Where", "", &["lt", "zeros", "min"], &["mask"], &[]),
        ];
        let m = graph_with_inputs(&nodes, &["position_ids", "past_key_values.0.key"]);
        let edits = GraphEdits {
            attention_mask: Some("attention_mask".into()),
            ..Default::default()
        };
        let (r, report) = rewrite_model(&m, &edits).unwrap();
        assert!(r.is_none());
        assert!(!report.has_attention_mask());
        assert!(report
            .attention_mask_skipped
            .as_deref()
            .unwrap()
            .contains("no shape-only mask"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let edits = GraphEdits {
            accuracy_level: Some(4),
            last_logits: Some("logits".into()),
            ..Default::default()
        };
        for bad in [&b"\x3a\xff\xff\xff\xff\x0f"[..], b"\x07", b"", b"\x08"] {
            assert!(rewrite_model(bad, &edits).is_err(), "{bad:?}");
        }
    }

    fn tiny_gemma3n_decoder() -> Vec<u8> {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-gemma3n/onnx/decoder_model_merged.onnx"
        );
        std::fs::read(p).expect("the tiny Gemma-3n fixture")
    }

    fn attention_edits(windows: Vec<Option<usize>>) -> GraphEdits {
        GraphEdits {
            attention: Some(AttentionSpec {
                num_heads: 2,
                windows,
            }),
            attention_mask: Some("attention_mask".into()),
            ..Default::default()
        }
    }

    #[test]
    fn gemma3n_attention_is_fused_layer_by_layer() {
        for (kernel, op, domain) in [
            (AttentionKernel::Ort, "GroupQueryAttention", "com.microsoft"),
            (
                AttentionKernel::Native,
                crate::engine::attention::OP,
                crate::engine::attention::DOMAIN,
            ),
        ] {
            let edits = GraphEdits {
                attention_kernel: kernel,
                ..attention_edits(vec![Some(16), None, Some(16), None])
            };
            fused_layer_by_layer(&edits, op, domain);
        }
    }

    fn fused_layer_by_layer(edits: &GraphEdits, op: &str, domain: &str) {
        let (out, report) = rewrite_model(&tiny_gemma3n_decoder(), edits).unwrap();
        let f = report.attention.clone().expect("fused");
        assert_eq!((f.layers, f.shared, f.windowed), (4, 2, 2));
        assert_eq!(f.window, Some(16));
        assert_eq!(
            f.local_pasts,
            ["past_key_values.0.key", "past_key_values.0.value"]
        );
        // The KV-shared layers (2, 3) write into the buffers of layers 0 and 1.
        assert_eq!(f.aliases.len(), 4);
        assert_eq!(f.aliases[0].1, "past_key_values.0.key");
        assert_eq!(f.aliases[3].1, "past_key_values.1.value");
        // No mask edit: the fused kernel takes lengths.
        assert_eq!(report.attention_mask_added, 0);
        let out = out.unwrap();
        let nodes = graph_nodes(out.model());
        let count = |op: &str| nodes.iter().filter(|n| n.op == op).count();
        assert_eq!(count(op), 4);
        assert_eq!(f.native, op != "GroupQueryAttention");
        assert_eq!(
            (count("Softmax"), count("Where")),
            (0, 0),
            "masks and softmax dropped"
        );
        let gqa: Vec<_> = nodes.iter().filter(|n| n.op == op).collect();
        assert_eq!(gqa[0].domain, domain);
        assert_eq!(gqa[0].ints("local_window_size"), Some(&[16][..]));
        assert_eq!(gqa[1].ints("local_window_size"), None);
        assert_eq!(gqa[0].inputs[5], SEQLENS_LOCAL);
        assert_eq!(gqa[1].inputs[5], SEQLENS);
        assert_eq!(gqa[1].outputs[1], "present.1.key");
        let inputs = graph_inputs(out.model());
        for i in [SEQLENS, TOTAL, SEQLENS_LOCAL, TOTAL_LOCAL] {
            assert!(inputs.iter().any(|n| n == i), "{i} declared");
        }
        assert!(imports_domain(out.model(), domain).unwrap());
    }

    #[test]
    fn attention_not_recognised_keeps_the_graph_and_says_why() {
        // A config that disagrees with the graph on the layer count.
        let (out, report) =
            rewrite_model(&tiny_gemma3n_decoder(), &attention_edits(vec![None; 3])).unwrap();
        assert!(report.attention.is_none());
        let why = report.attention_skipped.clone().unwrap();
        assert!(why.contains("4 Softmax nodes for 3 layers"), "{why}");
        // The mask edit still applies, as before.
        assert!(report.attention_mask_added > 0);
        let nodes = graph_nodes(out.unwrap().model());
        assert!(nodes.iter().all(|n| n.op != "GroupQueryAttention"));
        // A KV-shared layer whose window differs from its source's is refused, not half-fused.
        let (_, report) = rewrite_model(
            &tiny_gemma3n_decoder(),
            &attention_edits(vec![Some(16), None, None, None]),
        )
        .unwrap();
        let why = report.attention_skipped.unwrap();
        assert!(why.contains("whose window differs"), "{why}");
    }
}
