//! The four Gemma-3n graphs and how one sequence runs through them (model_interface.md §1.2, §1.8).
//!
//! Prefill: `embed_tokens(input_ids)` → scatter `vision_encoder` / `audio_encoder` rows into
//! `inputs_embeds` at the soft-token positions → `decoder_model_merged` with an empty cache. Decode:
//! one id through `embed_tokens`, then the decoder with the cache. Every input is fed by name and cast to
//! the element type the receiving session declares; optional decoder inputs are fed only when declared.

use std::borrow::Cow;

use ort::value::DynValue;

use super::config::Gemma3nConfig;
use crate::engine::kv::{KvCache, KvLayout};
use crate::engine::session::{ElemType, GraphSession, SessionOptions};
use crate::engine::tensor::{self, FloatData};
use crate::engine::EngineError;
use crate::error::{ClassifiedError, ErrorClass};
use crate::models::catalog::Component;
use crate::models::encoder_cache::EncoderCache;
use crate::models::resolve::ResolvedModel;
use crate::models::{ChatModel, ModelError, PreparedInput};

const IMAGE_OUT: &str = "image_features";
const AUDIO_OUT: &str = "audio_features";

/// Loaded sessions plus what was learnt about them at load time.
pub struct Gemma3nModel {
    embed: GraphSession,
    decoder: GraphSession,
    vision: Option<GraphSession>,
    audio: Option<GraphSession>,
    kv: KvLayout,
    cfg: Gemma3nConfig,
    ids_type: ElemType,
    embeds_type: ElemType,
    ple_type: ElemType,
    /// Apply `tanh(x/cap)·cap` on the host: set when the warm-up run shows the graph does not.
    host_softcap: Option<f32>,
    cache: EncoderCache,
}

/// One sequence: its cache and the next position.
pub struct Gemma3nSeq {
    cache: KvCache,
}

type Inputs<'v> = crate::engine::kv::Feeds<'v>;

impl Gemma3nModel {
    pub fn load(
        model: &ResolvedModel,
        cfg: Gemma3nConfig,
        opts: &SessionOptions,
        cache: EncoderCache,
    ) -> Result<Self, ModelError> {
        let load = |c: Component| super::super::load_graph(model, c, opts);
        let missing = |c: Component| ModelError::Config(format!("no {c} graph"));
        let embed = load(Component::EmbedTokens)?.ok_or_else(|| missing(Component::EmbedTokens))?;
        let decoder = load(Component::DecoderModelMerged)?
            .ok_or_else(|| missing(Component::DecoderModelMerged))?;
        let vision = load(Component::VisionEncoder)?;
        let audio = load(Component::AudioEncoder)?;

        embed.require(&["input_ids"], &["inputs_embeds", "per_layer_inputs"])?;
        decoder.require(
            &["inputs_embeds", "per_layer_inputs", "position_ids"],
            &["logits"],
        )?;
        if let Some(v) = &vision {
            v.require(&["pixel_values"], &[IMAGE_OUT])?;
        }
        if let Some(a) = &audio {
            a.require(&["input_features", "input_features_mask"], &[AUDIO_OUT])?;
        }
        // The prompt expands each image/clip to a fixed number of soft tokens: the encoders must agree.
        for (graph, out, want, what) in [
            (&vision, IMAGE_OUT, cfg.image_seq_length, "image_seq_length"),
            (&audio, AUDIO_OUT, cfg.audio_seq_length, "audio_seq_length"),
        ] {
            if let Some(Some(n)) = graph
                .as_ref()
                .and_then(|g| g.output(out))
                .and_then(|o| o.dims.get(1).copied())
            {
                if n as usize != want {
                    return Err(ModelError::Config(format!(
                        "{out} has {n} rows per item but the processor's {what} is {want}"
                    )));
                }
            }
        }
        let kv = KvLayout::from_decoder(&decoder)?;
        let ids_type = embed.input_type("input_ids")?;
        if !matches!(ids_type, ElemType::I64 | ElemType::I32) {
            return Err(EngineError::Interface {
                component: embed.component.clone(),
                path: embed.path.clone(),
                message: format!("input_ids is {ids_type}, expected int64 or int32"),
            }
            .into());
        }
        let embeds_type = decoder.input_type("inputs_embeds")?;
        let ple_type = decoder.input_type("per_layer_inputs")?;
        if let Some(Some(h)) = decoder
            .input("inputs_embeds")
            .and_then(|i| i.dims.last().copied())
        {
            if h as usize != cfg.hidden_size {
                return Err(ModelError::Config(format!(
                    "decoder inputs_embeds width {h} differs from config.json hidden_size {}",
                    cfg.hidden_size
                )));
            }
        }
        tracing::info!(
            kv_tensors = kv.slots.len(),
            kv_dtype = %kv.dtype().map(|d| d.name()).unwrap_or_default(),
            embeds = %embeds_type,
            vision = vision.is_some(),
            audio = audio.is_some(),
            "gemma3n graphs loaded"
        );
        let mut m = Self {
            embed,
            decoder,
            vision,
            audio,
            kv,
            cfg,
            ids_type,
            embeds_type,
            ple_type,
            host_softcap: None,
            cache,
        };
        m.check_softcap()?;
        Ok(m)
    }

    pub fn config(&self) -> &Gemma3nConfig {
        &self.cfg
    }

    pub fn has_vision(&self) -> bool {
        self.vision.is_some()
    }

    pub fn has_audio(&self) -> bool {
        self.audio.is_some()
    }

    /// A one-token warm-up run. Logits beyond ±cap mean the graph does not soft-cap: do it on the host.
    fn check_softcap(&mut self) -> Result<(), ModelError> {
        let Some(cap) = self.cfg.final_logit_softcapping else {
            return Ok(());
        };
        let bos = self.cfg.bos_token_id.unwrap_or(2);
        let input = PreparedInput {
            ids: vec![bos],
            ..Default::default()
        };
        let (_, logits) = self.prefill(&input)?;
        let max = logits.iter().fold(0f32, |m, x| m.max(x.abs()));
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

    fn ids_value(&self, ids: &[u32]) -> Result<DynValue, EngineError> {
        let shape = [1, ids.len() as i64];
        match self.ids_type {
            ElemType::I32 => Ok(ort::value::Tensor::from_array((
                shape.to_vec(),
                ids.iter().map(|&i| i as i32).collect::<Vec<_>>(),
            ))
            .map_err(tensor::tensor_err)?
            .into_dyn()),
            _ => tensor::i64_value(&shape, ids.iter().map(|&i| i as i64).collect()),
        }
    }

    /// `embed_tokens(ids)` → (inputs_embeds, per_layer_inputs) as ORT values.
    fn embed(&mut self, ids: &[u32]) -> Result<(DynValue, DynValue), EngineError> {
        let inputs: Inputs = vec![(Cow::Borrowed("input_ids"), self.ids_value(ids)?.into())];
        let mut out = self
            .embed
            .session
            .run(inputs)
            .map_err(|e| EngineError::run("embed_tokens", e))?;
        let e = out
            .remove("inputs_embeds")
            .ok_or_else(|| EngineError::run("embed_tokens", "no inputs_embeds output"))?;
        let p = out
            .remove("per_layer_inputs")
            .ok_or_else(|| EngineError::run("embed_tokens", "no per_layer_inputs output"))?;
        Ok((e, p))
    }

    /// Runs an encoder once for all items and returns its rows (`[n_items · tokens, hidden]`) flattened.
    fn encode(
        session: &mut GraphSession,
        inputs: Inputs,
        out_name: &str,
    ) -> Result<FloatData, EngineError> {
        let component = session.component.clone();
        let mut out = session
            .session
            .run(inputs)
            .map_err(|e| EngineError::run(&component, e))?;
        let v = out
            .remove(out_name)
            .ok_or_else(|| EngineError::run(&component, format!("no {out_name} output")))?;
        Ok(tensor::extract_floats(&v)?.0)
    }

    /// Image features for every image of the request, in order: cached ones from the encoder cache,
    /// the rest from one batched `vision_encoder` run.
    fn encode_images(&mut self, input: &PreparedInput) -> Result<FloatData, ModelError> {
        let Some(vision) = self.vision.as_mut() else {
            return Err(ModelError::Request(ClassifiedError::invalid(
                "messages",
                "this model has no vision encoder, so it cannot take images",
            )));
        };
        let mut per_image: Vec<Option<Vec<f32>>> = input
            .images
            .iter()
            .map(|img| self.cache.get(&img.key).map(|f| f.to_f32_vec()))
            .collect();
        let missing: Vec<usize> = (0..per_image.len())
            .filter(|&i| per_image[i].is_none())
            .collect();
        if !missing.is_empty() {
            let [c, h, w] = input.images[missing[0]].shape;
            if missing.iter().any(|&i| input.images[i].shape != [c, h, w]) {
                return Err(ModelError::Config(
                    "images of different preprocessed sizes".into(),
                ));
            }
            let mut data = Vec::with_capacity(missing.len() * c * h * w);
            for &i in &missing {
                data.extend_from_slice(&input.images[i].pixel_values);
            }
            let ty = vision.input_type("pixel_values")?;
            let shape = [missing.len() as i64, c as i64, h as i64, w as i64];
            let pv = tensor::float_value(ty, &shape, data)?;
            let rows = Self::encode(
                vision,
                vec![(Cow::Borrowed("pixel_values"), pv.into())],
                IMAGE_OUT,
            )?
            .to_f32_vec();
            let each = rows.len() / missing.len();
            for (k, &i) in missing.iter().enumerate() {
                let feats = rows[k * each..(k + 1) * each].to_vec();
                self.cache
                    .put(input.images[i].key, FloatData::F32(feats.clone()));
                per_image[i] = Some(feats);
            }
        }
        Ok(FloatData::F32(
            per_image.into_iter().flatten().flatten().collect(),
        ))
    }

    /// Audio features for every clip, in order; one `audio_encoder` run per uncached clip (clips differ
    /// in length, and the graph takes one clip at a time).
    fn encode_audio(&mut self, input: &PreparedInput) -> Result<FloatData, ModelError> {
        let Some(audio) = self.audio.as_mut() else {
            return Err(ModelError::Request(ClassifiedError::invalid(
                "messages",
                "this model has no audio encoder, so it cannot take audio",
            )));
        };
        let ty = audio.input_type("input_features")?;
        let mut rows = Vec::new();
        for clip in &input.audio {
            if let Some(hit) = self.cache.get(&clip.key) {
                rows.extend(hit.to_f32_vec());
                continue;
            }
            let shape = [1, clip.frames as i64, clip.mel_bins as i64];
            let feats = tensor::float_value(ty, &shape, clip.features.clone())?;
            let mask = tensor::bool_value(&[1, clip.frames as i64], clip.mask.clone())?;
            let out = Self::encode(
                audio,
                vec![
                    (Cow::Borrowed("input_features"), feats.into()),
                    (Cow::Borrowed("input_features_mask"), mask.into()),
                ],
                AUDIO_OUT,
            )?
            .to_f32_vec();
            let n = out.len() / self.cfg.hidden_size.max(1);
            if n != self.cfg.audio_seq_length {
                return Err(ModelError::Config(format!(
                    "audio_encoder returned {n} rows for a clip; the prompt expands each clip to {} audio soft tokens (processor audio_seq_length)",
                    self.cfg.audio_seq_length
                )));
            }
            self.cache.put(clip.key, FloatData::F32(out.clone()));
            rows.extend(out);
        }
        Ok(FloatData::F32(rows))
    }

    /// Scatters encoder rows into `inputs_embeds` at every position holding `token`.
    fn scatter(
        embeds: &mut FloatData,
        ids: &[u32],
        token: u32,
        hidden: usize,
        rows: &FloatData,
        what: &str,
    ) -> Result<(), ModelError> {
        let positions: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == token)
            .map(|(i, _)| i)
            .collect();
        if rows.len() != positions.len() * hidden {
            return Err(ModelError::Request(ClassifiedError::new(
                ErrorClass::Internal,
                format!(
                    "the {what} encoder returned {} rows for {} {what} soft tokens in the prompt",
                    rows.len() / hidden.max(1),
                    positions.len()
                ),
            )));
        }
        embeds.scatter_rows(hidden, &positions, rows)?;
        Ok(())
    }

    /// The decoder on `embeds`/`ple` at positions `cache.len ..`; returns the last position's logits.
    fn run_decoder(
        &mut self,
        embeds: DynValue,
        ple: DynValue,
        n: usize,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, ModelError> {
        let start = cache.len as i64;
        let embeds = tensor::cast_value(embeds, self.embeds_type)?;
        let ple = tensor::cast_value(ple, self.ple_type)?;
        let positions = tensor::i64_value(&[1, n as i64], (start..start + n as i64).collect())?;
        let mut inputs: Inputs = Vec::with_capacity(6 + self.kv.slots.len());
        inputs.push((Cow::Borrowed("inputs_embeds"), embeds.into()));
        inputs.push((Cow::Borrowed("per_layer_inputs"), ple.into()));
        inputs.push((Cow::Borrowed("position_ids"), positions.into()));
        if self.decoder.has_input("attention_mask") {
            let total = cache.len + n;
            inputs.push((
                Cow::Borrowed("attention_mask"),
                tensor::i64_value(&[1, total as i64], vec![1; total])?.into(),
            ));
        }
        self.kv.push_feeds(&self.decoder, cache, &mut inputs)?;
        let vocab = self.cfg.vocab_size;
        let mut out = self
            .decoder
            .session
            .run(inputs)
            .map_err(|e| EngineError::run("decoder_model_merged", e))?;
        let mut logits = {
            let l = out
                .get("logits")
                .ok_or_else(|| EngineError::run("decoder_model_merged", "no logits output"))?;
            tensor::last_row_f32(l, vocab)?
        };
        cache.update(&self.kv, &mut out, n)?;
        drop(out);
        if let Some(cap) = self.host_softcap {
            for x in logits.iter_mut() {
                *x = (*x / cap).tanh() * cap;
            }
        }
        Ok(logits)
    }
}

impl ChatModel for Gemma3nModel {
    type Seq = Gemma3nSeq;

    fn prefill(&mut self, input: &PreparedInput) -> Result<(Gemma3nSeq, Vec<f32>), ModelError> {
        if input.ids.is_empty() {
            return Err(ModelError::Request(ClassifiedError::invalid(
                "messages",
                "the prompt is empty",
            )));
        }
        let (mut embeds, ple) = self.embed(&input.ids)?;
        if !input.images.is_empty() || !input.audio.is_empty() {
            let (mut host, shape) = tensor::extract_floats(&embeds)?;
            let hidden = self.cfg.hidden_size;
            if !input.images.is_empty() {
                let rows = self.encode_images(input)?;
                Self::scatter(
                    &mut host,
                    &input.ids,
                    self.cfg.image_token_id,
                    hidden,
                    &rows,
                    "image",
                )?;
            }
            if !input.audio.is_empty() {
                let rows = self.encode_audio(input)?;
                Self::scatter(
                    &mut host,
                    &input.ids,
                    self.cfg.audio_token_id,
                    hidden,
                    &rows,
                    "audio",
                )?;
            }
            embeds = host.into_value(&shape)?;
        }
        let mut seq = Gemma3nSeq {
            cache: self.kv.empty()?,
        };
        let logits = self.run_decoder(embeds, ple, input.ids.len(), &mut seq.cache)?;
        Ok((seq, logits))
    }

    fn decode(&mut self, seq: &mut Gemma3nSeq, token: u32) -> Result<Vec<f32>, ModelError> {
        let (embeds, ple) = self.embed(&[token])?;
        self.run_decoder(embeds, ple, 1, &mut seq.cache)
    }
}
