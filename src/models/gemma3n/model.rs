//! The four Gemma-3n graphs and how one sequence runs through them (model_interface.md §1.2, §1.8).
//!
//! A decoder step over positions `past ..`: `embed_tokens(input_ids)` → scatter `vision_encoder` /
//! `audio_encoder` rows into `inputs_embeds` at the soft-token positions it holds →
//! `decoder_model_merged` with the cache. The prompt takes one or more such steps (chunked prefill,
//! after a reused prefix), each generated id one. Every input is fed by name and cast to
//! the element type the receiving session declares; optional decoder inputs are fed only when declared.

use std::borrow::Cow;

use ort::value::DynValue;

use super::config::Gemma3nConfig;
use crate::engine::batch::BatchKv;
use crate::engine::kv::{self, KvCache, KvLayout, KvState};
use crate::engine::session::{ElemType, GraphSession, SessionOptions};
use crate::engine::tensor::{self, FloatData};
use crate::engine::EngineError;
use crate::error::ClassifiedError;
use crate::models::catalog::Component;
use crate::models::encoder_cache::{EncoderCache, MediaKey};
use crate::models::resolve::ResolvedModel;
use crate::models::{
    cache_keys, media_positions, with_media_rows, AudioInput, Batching, ChatModel, ImageInput,
    MediaRows, ModelError, PreparedInput,
};

const IMAGE_OUT: &str = "image_features";

/// Per media item, its soft-token positions.
type ItemPositions = Vec<Vec<usize>>;
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
        let mut cache = self.kv.empty()?;
        let logits = self.forward(&[bos], None, &mut cache)?;
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

    fn ids_value(&self, rows: usize, ids: &[u32]) -> Result<DynValue, EngineError> {
        let shape = [rows as i64, (ids.len() / rows.max(1)) as i64];
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

    /// `embed_tokens(ids)` for `rows` rows of `ids.len() / rows` ids → (inputs_embeds,
    /// per_layer_inputs) as ORT values.
    fn embed(&mut self, rows: usize, ids: &[u32]) -> Result<(DynValue, DynValue), EngineError> {
        let inputs: Inputs = vec![(
            Cow::Borrowed("input_ids"),
            self.ids_value(rows, ids)?.into(),
        )];
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

    /// Image features for `images`, in order: cached ones from the encoder cache, the rest from one
    /// batched `vision_encoder` run.
    fn encode_images(&mut self, images: &[&ImageInput]) -> Result<Vec<Vec<f32>>, ModelError> {
        let Some(vision) = self.vision.as_mut() else {
            return Err(ModelError::Request(ClassifiedError::invalid(
                "messages",
                "this model has no vision encoder, so it cannot take images",
            )));
        };
        let mut per_image: Vec<Option<Vec<f32>>> = images
            .iter()
            .map(|img| self.cache.get(&img.key).map(|f| f.to_f32_vec()))
            .collect();
        let missing: Vec<usize> = (0..per_image.len())
            .filter(|&i| per_image[i].is_none())
            .collect();
        if !missing.is_empty() {
            let [c, h, w] = images[missing[0]].shape;
            if missing.iter().any(|&i| images[i].shape != [c, h, w]) {
                return Err(ModelError::Config(
                    "images of different preprocessed sizes".into(),
                ));
            }
            let mut data = Vec::with_capacity(missing.len() * c * h * w);
            for &i in &missing {
                data.extend_from_slice(&images[i].pixel_values);
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
                self.cache.put(images[i].key, FloatData::F32(feats.clone()));
                per_image[i] = Some(feats);
            }
        }
        Ok(per_image.into_iter().flatten().collect())
    }

    /// Audio features for `clips`, in order; one `audio_encoder` run per uncached clip (clips differ
    /// in length, and the graph takes one clip at a time).
    fn encode_audio(&mut self, clips: &[&AudioInput]) -> Result<Vec<Vec<f32>>, ModelError> {
        let Some(audio) = self.audio.as_mut() else {
            return Err(ModelError::Request(ClassifiedError::invalid(
                "messages",
                "this model has no audio encoder, so it cannot take audio",
            )));
        };
        let ty = audio.input_type("input_features")?;
        let mut out_rows = Vec::with_capacity(clips.len());
        for clip in clips {
            if let Some(hit) = self.cache.get(&clip.key) {
                out_rows.push(hit.to_f32_vec());
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
            out_rows.push(out);
        }
        Ok(out_rows)
    }

    /// The soft-token positions of every image and every clip of a prompt, in order.
    fn media_positions(
        &self,
        input: &PreparedInput,
    ) -> Result<(ItemPositions, ItemPositions), ModelError> {
        let images = media_positions(
            &input.ids,
            self.cfg.image_token_id,
            &vec![self.cfg.image_seq_length; input.images.len()],
            "image",
        )?;
        let audio = media_positions(
            &input.ids,
            self.cfg.audio_token_id,
            &vec![self.cfg.audio_seq_length; input.audio.len()],
            "audio",
        )?;
        Ok((images, audio))
    }

    /// The decoder on `embeds`/`ple` (`n` new positions per row of `cache`); returns each row's last
    /// position's logits.
    fn run_decoder(
        &mut self,
        embeds: DynValue,
        ple: DynValue,
        n: usize,
        cache: &mut impl KvState,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let rows = cache.row_lens().len();
        let embeds = tensor::cast_value(embeds, self.embeds_type)?;
        let ple = tensor::cast_value(ple, self.ple_type)?;
        let positions = tensor::i64_value(&[rows as i64, n as i64], cache.positions(n))?;
        let mut inputs: Inputs = Vec::with_capacity(6 + self.kv.slots.len());
        inputs.push((Cow::Borrowed("inputs_embeds"), embeds.into()));
        inputs.push((Cow::Borrowed("per_layer_inputs"), ple.into()));
        inputs.push((Cow::Borrowed("position_ids"), positions.into()));
        if self.decoder.has_input("attention_mask") {
            let total = cache.width() + n;
            inputs.push((
                Cow::Borrowed("attention_mask"),
                tensor::i64_value(&[rows as i64, total as i64], cache.attention_mask(n))?.into(),
            ));
        } else if rows > 1 {
            return Err(internal_batching());
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
            if rows == 1 {
                vec![tensor::last_row_f32(l, vocab)?]
            } else {
                tensor::last_rows_f32(l, rows, vocab)?
            }
        };
        kv::update(cache, &self.kv, &mut out, n)?;
        drop(out);
        if let Some(cap) = self.host_softcap {
            for x in logits.iter_mut().flatten() {
                *x = (*x / cap).tanh() * cap;
            }
        }
        Ok(logits)
    }
}

fn internal_batching() -> ModelError {
    ModelError::Config("a batched decoder run on a graph without attention_mask".into())
}

impl ChatModel for Gemma3nModel {
    fn kv_layout(&self) -> &KvLayout {
        &self.kv
    }

    fn split_exact(&self) -> bool {
        self.decoder.rewrite.dynamic_quantize == 0
    }

    fn cache_keys(&self, input: &PreparedInput) -> Result<Vec<u64>, ModelError> {
        let (images, audio) = self.media_positions(input)?;
        let media: Vec<(&[usize], &MediaKey)> = images
            .iter()
            .zip(&input.images)
            .map(|(p, i)| (p.as_slice(), &i.key))
            .chain(
                audio
                    .iter()
                    .zip(&input.audio)
                    .map(|(p, a)| (p.as_slice(), &a.key)),
            )
            .collect();
        Ok(cache_keys(&input.ids, &media))
    }

    fn encode_media(
        &mut self,
        input: &PreparedInput,
        from: usize,
    ) -> Result<MediaRows, ModelError> {
        let (image_pos, audio_pos) = self.media_positions(input)?;
        let mut rows = MediaRows::default();
        rows.add_needed(image_pos, &input.images, from, |i| self.encode_images(i))?;
        rows.add_needed(audio_pos, &input.audio, from, |a| self.encode_audio(a))?;
        Ok(rows)
    }

    fn batching(&self) -> Batching {
        Batching::from_report(&self.decoder.rewrite)
    }

    fn forward(
        &mut self,
        ids: &[u32],
        media: Option<&MediaRows>,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, ModelError> {
        let (embeds, ple) = self.embed(1, ids)?;
        let soft = [self.cfg.image_token_id, self.cfg.audio_token_id];
        let embeds = with_media_rows(embeds, ids, &soft, media, self.cfg.hidden_size, cache.len)?;
        let mut rows = self.run_decoder(embeds, ple, ids.len(), cache)?;
        Ok(rows.swap_remove(0))
    }

    fn forward_rows(
        &mut self,
        ids: &[u32],
        batch: &mut BatchKv,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let (embeds, ple) = self.embed(ids.len(), ids)?;
        self.run_decoder(embeds, ple, 1, batch)
    }
}
