//! The text half every `embed_tokens` + `decoder_model_merged` family shares (HOUSE.md move 2): loading
//! and checking the two graphs by their input/output names, embedding ids, and one decoder run over a
//! KV cache (one sequence or a decode batch) with the full attention mask and 0-based positions.
//!
//! Gemma-style per-layer inputs ride along when the graphs have them: `embed_tokens` then also returns
//! `per_layer_inputs`, which the decoder takes unchanged (media rows replace `inputs_embeds` only). A
//! final logit soft-cap the config asks for is checked with a one-token warm-up and applied on the host
//! when the graph does not apply it.
//!
//! A family keeps what is its own (encoders, where their rows go) and calls [`TextDecoder`] for the
//! rest. Inputs are fed by name and cast to the element type each session declares; optional decoder
//! inputs only when declared; any other declared input fails the load with the expected and found
//! names.

use std::borrow::Cow;

use ort::value::DynValue;

use crate::engine::batch::BatchKv;
use crate::engine::kv::{self, KvCache, KvLayout, KvState, PAST_PREFIX};
use crate::engine::rewrite::{AttentionSpec, SEQLENS, SEQLENS_LOCAL, TOTAL, TOTAL_LOCAL};
use crate::engine::session::{AttentionMode, ElemType, GraphSession, IoSpec, SessionOptions};
use crate::engine::tensor;
use crate::engine::EngineError;
use crate::models::catalog::Component;
use crate::models::resolve::ResolvedModel;
use crate::models::{with_media_rows, Batching, MediaRows, ModelError};

/// Feeds of one `Session::run`.
pub type Inputs<'v> = crate::engine::kv::Feeds<'v>;

/// Decoder inputs the driver feeds (besides `past_key_values.*`).
pub const DECODER_INPUTS: &[&str] = &[
    "inputs_embeds",
    "per_layer_inputs",
    "attention_mask",
    "position_ids",
    "num_logits_to_keep",
    "use_cache_branch",
];

/// Gemma's per-layer embeddings: an `embed_tokens` output the decoder takes as an input.
const PLE: &str = "per_layer_inputs";

/// `embed_tokens`' outputs for some ids.
pub struct Embedded {
    /// `inputs_embeds [rows, n, hidden]` (media rows are written into it).
    pub embeds: DynValue,
    /// `per_layer_inputs`, for graphs that have them.
    pub ple: Option<DynValue>,
}

/// A load-time interface error of graph `g`.
pub fn interface(g: &GraphSession, message: String) -> ModelError {
    EngineError::Interface {
        component: g.component.clone(),
        path: g.path.clone(),
        message,
    }
    .into()
}

/// Fails when `g` declares an input that `family`'s driver would not feed.
pub fn only_known_inputs(g: &GraphSession, known: &[&str], family: &str) -> Result<(), ModelError> {
    let unknown: Vec<&str> = g
        .inputs
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| !known.contains(n) && !n.starts_with(PAST_PREFIX))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    let past = if g.component == Component::DecoderModelMerged.file_stem() {
        " and past_key_values.*"
    } else {
        ""
    };
    Err(interface(
        g,
        format!(
            "inputs {unknown:?} are not fed by the {family} driver; expected only {known:?}{past}; the graph declares {:?}",
            g.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>()
        ),
    ))
}

/// The integer type of input `name` (int64 or int32), `None` when the graph has no such input.
pub fn int_type(g: &GraphSession, name: &str) -> Result<Option<ElemType>, ModelError> {
    match g.input(name).map(|i| i.dtype) {
        None => Ok(None),
        Some(t @ (ElemType::I64 | ElemType::I32)) => Ok(Some(t)),
        Some(t) => Err(interface(
            g,
            format!("{name} is {t}, expected int64 or int32"),
        )),
    }
}

/// An integer tensor of element type `ty` (int32 or int64).
pub fn int_value(ty: ElemType, shape: &[i64], data: Vec<i64>) -> Result<DynValue, EngineError> {
    match ty {
        ElemType::I32 => Ok(ort::value::Tensor::from_array((
            shape.to_vec(),
            data.into_iter().map(|v| v as i32).collect::<Vec<_>>(),
        ))
        .map_err(tensor::tensor_err)?
        .into_dyn()),
        _ => tensor::i64_value(shape, data),
    }
}

/// The last dimension of an input or output, when static.
pub fn width(io: Option<&IoSpec>) -> Option<usize> {
    io.and_then(|i| i.dims.last().copied().flatten())
        .map(|d| d as usize)
}

/// `embed_tokens` and `decoder_model_merged` of one model, checked at load time.
pub struct TextDecoder {
    embed: GraphSession,
    decoder: GraphSession,
    kv: KvLayout,
    ids_type: ElemType,
    embeds_type: ElemType,
    /// The decoder's `per_layer_inputs` type, when both graphs have per-layer inputs.
    ple_type: Option<ElemType>,
    vocab: usize,
    hidden: usize,
    /// Apply `tanh(x/cap)·cap` on the host: set when the warm-up run shows the graph does not.
    host_softcap: Option<f32>,
    /// Ids `embed_tokens` gets as another id (a family's media soft tokens as `<pad>`).
    embed_as: Option<(Vec<u32>, u32)>,
}

impl TextDecoder {
    /// Loads both graphs and checks them against `hidden` (`text_config.hidden_size`); the vocabulary
    /// is the logits' width, or `vocab` where the graph leaves it dynamic.
    pub fn load(
        model: &ResolvedModel,
        opts: &SessionOptions,
        hidden: usize,
        vocab: usize,
        family: &str,
        attention: Result<AttentionSpec, String>,
    ) -> Result<Self, ModelError> {
        let attention = match attention {
            Ok(a) => Some(a),
            Err(why) => {
                if opts.attention_mode != AttentionMode::Unfused {
                    tracing::info!("attention not fused: config.json: {why}");
                }
                None
            }
        };
        let load = |c: Component, opts: &SessionOptions| {
            super::load_graph(model, c, opts)?
                .ok_or_else(|| ModelError::Config(format!("no {c} graph")))
        };
        let embed = load(Component::EmbedTokens, opts)?;
        let fuse = attention.is_some() && opts.attention_mode != AttentionMode::Unfused;
        let mut fused_opts = opts.clone();
        fused_opts.attention = attention;
        let mut unfused_opts = opts.clone();
        unfused_opts.attention = None;
        if !fuse {
            let decoder = load(Component::DecoderModelMerged, &unfused_opts)?;
            return Self::assemble(embed, decoder, hidden, vocab, family);
        }
        if opts.attention_mode == AttentionMode::Fused {
            let decoder = load(Component::DecoderModelMerged, &fused_opts)?;
            return Self::assemble(embed, decoder, hidden, vocab, family);
        }
        // The load-time check: the probe through the graph as exported, then through the fused one
        // (one decoder in memory at a time). Both run the exported arithmetic (fp32 4-bit matrix
        // products): with int8 activations (`--matmul-accuracy-level 4`) the fused kernel's other
        // summation order flips roundings, which a deep random model amplifies into logits as far
        // apart as a wrong rewrite's; the served graph then gets the level.
        // Level 0 (fp32 compute, as exported) rather than none, so that the rewrite counts the
        // 4-bit nodes the served level would change.
        let mut check = unfused_opts.clone();
        check.matmul_accuracy_level = opts.matmul_accuracy_level.map(|_| 0);
        let decoder = load(Component::DecoderModelMerged, &check)?;
        let mut plain = Self::assemble(embed, decoder, hidden, vocab, family)?;
        // Whether the check's sessions are the ones to serve: no level asked for, level 0 asked
        // for, or no 4-bit node for a level to change.
        let served_as_checked = matches!(opts.matmul_accuracy_level, None | Some(0))
            || plain.decoder.rewrite.matmulnbits == 0;
        let reload = |text: Self, opts: &SessionOptions| -> Result<Self, ModelError> {
            let embed = text.embed;
            drop(text.decoder);
            let decoder = load(Component::DecoderModelMerged, opts)?;
            Self::assemble(embed, decoder, hidden, vocab, family)
        };
        if !plain.split_exact() {
            tracing::info!("attention not fused: the decoder quantizes activations dynamically (a _quantized export), whose per-run int8 scales the fused kernel's other summation order can move, so it stays as exported and exact (`--attention fused` fuses it anyway)");
            return if served_as_checked {
                Ok(plain)
            } else {
                reload(plain, &unfused_opts)
            };
        }
        let reference = plain.probe()?;
        check.attention = fused_opts.attention.clone();
        let fused = reload(plain, &check)?;
        if fused.kv.fused.is_none() {
            // Not recognised (the rewrite said why): the graph as exported.
            return reload(fused, &unfused_opts);
        }
        let mut fused = fused;
        let got = fused.probe()?;
        match compare_probe(&reference, &got) {
            Ok(diff) => {
                tracing::info!(
                    max_logit_difference = diff,
                    "fused attention checked against the graph as exported"
                );
                if served_as_checked {
                    Ok(fused)
                } else {
                    reload(fused, &fused_opts)
                }
            }
            Err(why) => {
                tracing::warn!(
                    "fused attention differs from the graph as exported ({why}); keeping the graph as exported"
                );
                reload(fused, &unfused_opts)
            }
        }
    }

    /// Logits of a fixed probe: 24 ids in two prompt chunks, then two greedy steps.
    fn probe(&mut self) -> Result<Vec<Vec<f32>>, ModelError> {
        let vocab = self.vocab.max(2) as u64;
        let ids: Vec<u32> = (1..=24u64)
            .map(|i| ((i * 7919) % (vocab - 1) + 1) as u32)
            .collect();
        let mut cache = self.kv.empty()?;
        let mut out = Vec::new();
        for chunk in [&ids[..16], &ids[16..]] {
            out.push(self.forward(chunk, &[], None, &mut cache)?);
        }
        for _ in 0..2 {
            let next = argmax(out.last().map(Vec::as_slice).unwrap_or(&[]));
            out.push(self.forward(&[next], &[], None, &mut cache)?);
        }
        Ok(out)
    }

    /// Checks the two graphs' graph names and I/O, and builds the driver.
    fn assemble(
        embed: GraphSession,
        decoder: GraphSession,
        hidden: usize,
        vocab: usize,
        family: &str,
    ) -> Result<Self, ModelError> {
        embed.require(&["input_ids"], &["inputs_embeds"])?;
        only_known_inputs(&embed, &["input_ids"], family)?;
        decoder.require(&["inputs_embeds"], &["logits"])?;
        let mut known = DECODER_INPUTS.to_vec();
        if decoder.rewrite.attention.is_some() {
            known.extend([SEQLENS, TOTAL, SEQLENS_LOCAL, TOTAL_LOCAL]);
        }
        only_known_inputs(&decoder, &known, family)?;
        int_type(&decoder, "attention_mask")?;
        int_type(&decoder, "position_ids")?;
        let ids_type = int_type(&embed, "input_ids")?.unwrap_or(ElemType::I64);
        let embeds_type = decoder.input_type("inputs_embeds")?;
        if !embeds_type.is_float() {
            return Err(interface(
                &decoder,
                format!("inputs_embeds is {embeds_type}, expected a float type"),
            ));
        }
        for (g, io) in [
            (&embed, embed.output("inputs_embeds")),
            (&decoder, decoder.input("inputs_embeds")),
        ] {
            if let Some(h) = width(io).filter(|&h| h != hidden) {
                return Err(interface(
                    g,
                    format!(
                        "inputs_embeds has width {h}; config.json text_config.hidden_size is {hidden}"
                    ),
                ));
            }
        }
        let ple_type = match (embed.output(PLE).is_some(), decoder.input(PLE)) {
            (false, None) => None,
            (true, Some(i)) if i.dtype.is_float() => Some(i.dtype),
            (true, Some(i)) => {
                return Err(interface(
                    &decoder,
                    format!("{PLE} is {}, expected a float type", i.dtype),
                ))
            }
            (true, None) => {
                return Err(interface(
                    &decoder,
                    format!("embed_tokens returns {PLE} but the decoder takes no such input"),
                ))
            }
            (false, Some(_)) => {
                return Err(interface(
                    &embed,
                    format!("the decoder takes {PLE} but embed_tokens returns no such output"),
                ))
            }
        };
        let vocab = width(decoder.output("logits")).unwrap_or(vocab);
        let kv = KvLayout::from_decoder(&decoder)?;
        if kv.slots.is_empty() {
            return Err(interface(
                &decoder,
                "the decoder declares no past_key_values.* inputs (a merged decoder with a cache is expected)"
                    .into(),
            ));
        }
        Ok(Self {
            embed,
            decoder,
            kv,
            ids_type,
            embeds_type,
            ple_type,
            vocab,
            hidden,
            host_softcap: None,
            embed_as: None,
        })
    }

    /// Whether the graphs carry per-layer inputs.
    pub fn has_ple(&self) -> bool {
        self.ple_type.is_some()
    }

    /// Whether the decoder declares `name` as an input.
    pub fn decoder_has_input(&self, name: &str) -> bool {
        self.decoder.has_input(name)
    }

    /// A one-token warm-up run on `probe` (an id, e.g. BOS): logits beyond ±`cap` mean the graph does
    /// not soft-cap (transformers caps in the model's `forward`, after the graph an export may stop
    /// at); later runs then cap on the host.
    pub fn check_softcap(&mut self, cap: f32, probe: u32) -> Result<(), ModelError> {
        let mut cache = self.kv.empty()?;
        let e = self.embed(1, &[probe])?;
        let logits = self.run(e, 1, &mut cache)?;
        let max = logits.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        if max > cap * 1.0001 {
            tracing::info!(
                cap,
                max_logit = max,
                "the decoder does not soft-cap its logits; capping on the host"
            );
            self.host_softcap = Some(cap);
        }
        Ok(())
    }

    pub fn kv_layout(&self) -> &KvLayout {
        &self.kv
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn embeds_type(&self) -> ElemType {
        self.embeds_type
    }

    /// Whether a prompt's numbers are the same however it is split into runs (no dynamic
    /// activation quantization in the decoder).
    pub fn split_exact(&self) -> bool {
        self.decoder.rewrite.dynamic_quantize == 0
    }

    pub fn batching(&self) -> Batching {
        Batching::from_report(&self.decoder.rewrite)
    }

    /// From now on `embed_tokens` gets each of `ids` as `as_id` (their rows come from encoders).
    pub fn embed_ids_as(&mut self, ids: Vec<u32>, as_id: u32) {
        self.embed_as = Some((ids, as_id));
    }

    /// `embed_tokens` over `rows` rows of `ids.len() / rows` ids.
    pub fn embed(&mut self, rows: usize, ids: &[u32]) -> Result<Embedded, EngineError> {
        let lookup = |t: u32| match &self.embed_as {
            Some((from, to)) if from.contains(&t) => *to,
            _ => t,
        };
        let ids = int_value(
            self.ids_type,
            &[rows as i64, (ids.len() / rows.max(1)) as i64],
            ids.iter().map(|&i| lookup(i) as i64).collect(),
        )?;
        let inputs: Inputs = vec![(Cow::Borrowed("input_ids"), ids.into())];
        let mut out = self
            .embed
            .session
            .run(inputs)
            .map_err(|e| EngineError::run("embed_tokens", e))?;
        let embeds = out
            .remove("inputs_embeds")
            .ok_or_else(|| EngineError::run("embed_tokens", "no inputs_embeds output"))?;
        let ple = match self.ple_type {
            Some(_) => Some(
                out.remove(PLE)
                    .ok_or_else(|| EngineError::run("embed_tokens", format!("no {PLE} output")))?,
            ),
            None => None,
        };
        Ok(Embedded { embeds, ple })
    }

    /// The decoder on `input` (`n` new positions per row of `cache`); returns each row's last
    /// position's logits.
    pub fn run(
        &mut self,
        input: Embedded,
        n: usize,
        cache: &mut impl KvState,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        if self.kv.fused.is_some() {
            return self.run_fused(input, n, cache);
        }
        let rows = cache.row_lens().len();
        let total = cache.width() + n;
        let embeds = tensor::cast_value(input.embeds, self.embeds_type)?;
        let mut inputs: Inputs = Vec::with_capacity(6 + self.kv.slots.len());
        inputs.push((Cow::Borrowed("inputs_embeds"), embeds.into()));
        match (self.ple_type, input.ple) {
            (Some(ty), Some(ple)) => {
                inputs.push((Cow::Borrowed(PLE), tensor::cast_value(ple, ty)?.into()))
            }
            (None, _) => {}
            (Some(_), None) => {
                return Err(ModelError::Config(format!(
                    "a decoder run without the {PLE} the graph takes"
                )))
            }
        }
        if let Some(ty) = int_type(&self.decoder, "attention_mask")? {
            inputs.push((
                Cow::Borrowed("attention_mask"),
                int_value(ty, &[rows as i64, total as i64], cache.attention_mask(n))?.into(),
            ));
        } else if rows > 1 {
            return Err(ModelError::Config(
                "a batched decoder run on a graph without attention_mask".into(),
            ));
        }
        if let Some(ty) = int_type(&self.decoder, "position_ids")? {
            inputs.push((
                Cow::Borrowed("position_ids"),
                int_value(ty, &[rows as i64, n as i64], cache.positions(n))?.into(),
            ));
        }
        self.kv.push_feeds(&self.decoder, cache, &mut inputs)?;
        let mut out = self
            .decoder
            .session
            .run(inputs)
            .map_err(|e| EngineError::run("decoder_model_merged", e))?;
        let mut logits = {
            let l = out
                .get("logits")
                .ok_or_else(|| EngineError::run("decoder_model_merged", "no logits output"))?;
            if rows == 1 {
                vec![tensor::last_row_f32(l, self.vocab)?]
            } else {
                tensor::last_rows_f32(l, rows, self.vocab)?
            }
        };
        kv::update(cache, &self.kv, &mut out, n)?;
        drop(out);
        self.soft_cap(&mut logits);
        Ok(logits)
    }

    fn soft_cap(&self, logits: &mut [Vec<f32>]) {
        if let Some(cap) = self.host_softcap {
            for x in logits.iter_mut().flatten() {
                *x = (*x / cap).tanh() * cap;
            }
        }
    }

    /// [`Self::run`] on a fused decoder ([`kv::FusedKv`]): each cache buffer is bound as both its
    /// `past_key_values.*` input and its `present.*` output (and the KV-shared layers' outputs), so
    /// the new positions are written after each row's own and nothing is copied.
    fn run_fused(
        &mut self,
        input: Embedded,
        n: usize,
        cache: &mut impl KvState,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let fused = self.kv.fused.clone().unwrap_or_default();
        cache.reserve(&self.kv, n)?;
        let lens = cache.row_lens();
        let rows = lens.len();
        let run_err = |e: ort::Error| EngineError::run("decoder_model_merged", e);
        let mut binding = self.decoder.session.create_binding().map_err(run_err)?;
        let embeds = tensor::cast_value(input.embeds, self.embeds_type)?;
        binding
            .bind_input("inputs_embeds", &embeds)
            .map_err(run_err)?;
        match (self.ple_type, input.ple) {
            (Some(ty), Some(ple)) => binding
                .bind_input(PLE, &tensor::cast_value(ple, ty)?)
                .map_err(run_err)?,
            (None, _) => {}
            (Some(_), None) => {
                return Err(ModelError::Config(format!(
                    "a decoder run without the {PLE} the graph takes"
                )))
            }
        }
        if let Some(ty) = int_type(&self.decoder, "position_ids")? {
            let p = int_value(ty, &[rows as i64, n as i64], cache.positions(n))?;
            binding.bind_input("position_ids", &p).map_err(run_err)?;
        }
        let local = cache.local_lens();
        let mut groups = vec![(SEQLENS, TOTAL, lens)];
        if fused.local_inputs {
            groups.push((SEQLENS_LOCAL, TOTAL_LOCAL, local));
        }
        for (s, t, held) in groups {
            let seqlens: Vec<i32> = held.iter().map(|&l| (l + n - 1) as i32).collect();
            let total = held.iter().max().copied().unwrap_or(0) + n;
            binding
                .bind_input(s, &tensor::i32_value(&[rows as i64], seqlens)?)
                .map_err(run_err)?;
            binding
                .bind_input(t, &tensor::i32_value(&[], vec![total as i32])?)
                .map_err(run_err)?;
        }
        let values = cache.values_mut();
        for (slot, v) in self.kv.slots.iter().zip(values.iter_mut()) {
            binding.bind_input(&slot.past, &*v).map_err(run_err)?;
            binding
                .bind_output(&slot.present, &mut *v)
                .map_err(run_err)?;
        }
        for (name, i) in &fused.aliases {
            binding
                .bind_output(name, &mut values[*i])
                .map_err(run_err)?;
        }
        let cpu = ort::memory::MemoryInfo::new(
            ort::memory::AllocationDevice::CPU,
            0,
            ort::memory::AllocatorType::Device,
            ort::memory::MemoryType::Default,
        )
        .map_err(run_err)?;
        binding
            .bind_output_to_device("logits", &cpu)
            .map_err(run_err)?;
        let out = self
            .decoder
            .session
            .run_binding(&binding)
            .map_err(run_err)?;
        let mut logits = {
            let l = out
                .get("logits")
                .ok_or_else(|| EngineError::run("decoder_model_merged", "no logits output"))?;
            if rows == 1 {
                vec![tensor::last_row_f32(l, self.vocab)?]
            } else {
                tensor::last_rows_f32(l, rows, self.vocab)?
            }
        };
        drop(out);
        drop(binding);
        cache.advance_in_place(n);
        self.soft_cap(&mut logits);
        Ok(logits)
    }

    /// `ids` of one sequence (a prompt chunk or a generated id) at the end of `cache`, with `media`'s
    /// rows written at the positions holding one of `soft_tokens`; returns the last position's logits.
    pub fn forward(
        &mut self,
        ids: &[u32],
        soft_tokens: &[u32],
        media: Option<&MediaRows>,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, ModelError> {
        let mut input = self.embed(1, ids)?;
        input.embeds = with_media_rows(
            input.embeds,
            ids,
            soft_tokens,
            media,
            self.hidden,
            cache.len,
        )?;
        let mut rows = self.run(input, ids.len(), cache)?;
        Ok(rows.swap_remove(0))
    }

    /// One batched decode step: row r gets the generated id `ids[r]`.
    pub fn forward_rows(
        &mut self,
        ids: &[u32],
        batch: &mut BatchKv,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let input = self.embed(ids.len(), ids)?;
        self.run(input, 1, batch)
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0 as u32
}

/// Whether two probes agree: the same greedy id at every step, logits within 2% of their range
/// (fused attention sums in another order; int8 activation quantization can round a value across a
/// step). Returns the largest difference.
fn compare_probe(want: &[Vec<f32>], got: &[Vec<f32>]) -> Result<f32, String> {
    if want.len() != got.len() {
        return Err(format!("{} steps against {}", got.len(), want.len()));
    }
    let mut worst = 0f32;
    for (step, (w, g)) in want.iter().zip(got).enumerate() {
        if w.len() != g.len() {
            return Err(format!(
                "step {step}: {} logits against {}",
                g.len(),
                w.len()
            ));
        }
        let scale = w.iter().fold(1f32, |m, x| m.max(x.abs()));
        let diff = w.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        if !diff.is_finite() || diff > 0.02 * scale {
            return Err(format!(
                "step {step}: logits differ by up to {diff} (largest logit {scale})"
            ));
        }
        if argmax(w) != argmax(g) {
            return Err(format!(
                "step {step}: greedy id {} against {}",
                argmax(g),
                argmax(w)
            ));
        }
        worst = worst.max(diff);
    }
    Ok(worst)
}
