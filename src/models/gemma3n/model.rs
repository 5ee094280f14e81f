//! The four Gemma-3n graphs and how one sequence runs through them (model_interface.md §1.2, §1.8).
//!
//! A decoder step over positions `past ..`: `embed_tokens(input_ids)` → scatter `vision_encoder` /
//! `audio_encoder` rows into `inputs_embeds` at the soft-token positions it holds →
//! `decoder_model_merged` with the cache (the shared [`TextDecoder`], which carries the per-layer
//! inputs and checks the soft-cap). The prompt takes one or more such steps (chunked prefill, after a
//! reused prefix), each generated id one. Every input is fed by name and cast to the element type the
//! receiving session declares.

use std::borrow::Cow;

use super::config::Gemma3nConfig;
use crate::engine::batch::BatchKv;
use crate::engine::kv::{KvCache, KvLayout};
use crate::engine::session::{GraphSession, SessionOptions};
use crate::engine::tensor;
use crate::models::catalog::Component;
use crate::models::decoder::TextDecoder;
use crate::models::encoder_cache::EncoderCache;
use crate::models::encoders::{media_cache_keys, no_encoder, split_rows, ClipEncoder, AUDIO_OUT};
use crate::models::resolve::ResolvedModel;
use crate::models::{
    media_positions, AudioInput, Batching, ChatModel, ImageInput, MediaRows, ModelError,
    PreparedInput,
};

const IMAGE_OUT: &str = "image_features";

/// Per media item, its soft-token positions.
type ItemPositions = Vec<Vec<usize>>;

/// Loaded sessions plus what was learnt about them at load time.
pub struct Gemma3nModel {
    /// `embed_tokens` + `decoder_model_merged` (per-layer inputs, soft-cap check): the shared driver.
    text: TextDecoder,
    vision: Option<GraphSession>,
    audio: Option<ClipEncoder>,
    cfg: Gemma3nConfig,
    cache: EncoderCache,
}

const FAMILY: &str = "Gemma-3n";

impl Gemma3nModel {
    pub fn load(
        model: &ResolvedModel,
        cfg: Gemma3nConfig,
        opts: &SessionOptions,
        cache: EncoderCache,
    ) -> Result<Self, ModelError> {
        let load = |c: Component| super::super::load_graph(model, c, opts);
        let mut text = TextDecoder::load(
            model,
            opts,
            cfg.hidden_size,
            cfg.vocab_size,
            FAMILY,
            cfg.attention.clone(),
        )?;
        if !text.has_ple() {
            return Err(ModelError::Config(
                "Gemma-3n graphs without per_layer_inputs (embed_tokens output, decoder input)"
                    .into(),
            ));
        }
        let vision = load(Component::VisionEncoder)?;
        let audio = load(Component::AudioEncoder)?;
        if let Some(v) = &vision {
            v.require(&["pixel_values"], &[IMAGE_OUT])?;
        }
        let audio = audio
            .map(|a| ClipEncoder::new(a, cfg.hidden_size, FAMILY))
            .transpose()?;
        // The prompt expands each image/clip to a fixed number of soft tokens: the encoders must agree.
        for (graph, out, want, what) in [
            (
                vision.as_ref(),
                IMAGE_OUT,
                cfg.image_seq_length,
                "image_seq_length",
            ),
            (
                audio.as_ref().map(ClipEncoder::session),
                AUDIO_OUT,
                cfg.audio_seq_length,
                "audio_seq_length",
            ),
        ] {
            if let Some(Some(n)) = graph
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
        if let Some(cap) = cfg.final_logit_softcapping {
            text.check_softcap(cap, cfg.bos_token_id.unwrap_or(2))?;
        }
        tracing::info!(
            kv_tensors = text.kv_layout().slots.len(),
            kv_dtype = %text.kv_layout().dtype().map(|d| d.name()).unwrap_or_default(),
            embeds = %text.embeds_type(),
            vision = vision.is_some(),
            audio = audio.is_some(),
            "gemma3n graphs loaded"
        );
        Ok(Self {
            text,
            vision,
            audio,
            cfg,
            cache,
        })
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

    /// Image features for `images`, in order: cached ones from the encoder cache, the rest from one
    /// batched `vision_encoder` run.
    fn encode_images(&mut self, images: &[&ImageInput]) -> Result<Vec<Vec<f32>>, ModelError> {
        let Some(vision) = self.vision.as_mut() else {
            return Err(no_encoder("vision", "images"));
        };
        let (hidden, per_image) = (self.cfg.hidden_size, self.cfg.image_seq_length);
        self.cache.get_or_encode(
            images,
            |i| i.key,
            |missing| {
                let [c, h, w] = missing[0].shape;
                if missing.iter().any(|i| i.shape != [c, h, w]) {
                    return Err(ModelError::Config(
                        "images of different preprocessed sizes".into(),
                    ));
                }
                let mut data = Vec::with_capacity(missing.len() * c * h * w);
                for img in missing {
                    data.extend_from_slice(&img.pixel_values);
                }
                let ty = vision.input_type("pixel_values")?;
                let shape = [missing.len() as i64, c as i64, h as i64, w as i64];
                let pv = tensor::float_value(ty, &shape, data)?;
                let rows = vision
                    .run_output(vec![(Cow::Borrowed("pixel_values"), pv.into())], IMAGE_OUT)?
                    .to_f32_vec();
                split_rows(rows, &vec![per_image; missing.len()], hidden, "vision")
            },
        )
    }

    /// Audio features for `clips`, in order; one `audio_encoder` run per uncached clip (clips differ
    /// in length, and the graph takes one clip at a time), each padded to `audio_seq_length` rows.
    fn encode_audio(&mut self, clips: &[&AudioInput]) -> Result<Vec<Vec<f32>>, ModelError> {
        let Some(audio) = self.audio.as_mut() else {
            return Err(no_encoder("audio", "audio"));
        };
        let n = self.cfg.audio_seq_length;
        audio.encode(&mut self.cache, clips, self.cfg.hidden_size, |_| n)
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
}

impl ChatModel for Gemma3nModel {
    fn kv_layout(&self) -> &KvLayout {
        self.text.kv_layout()
    }

    fn split_exact(&self) -> bool {
        self.text.split_exact()
    }

    fn cache_keys(&self, input: &PreparedInput) -> Result<Vec<u64>, ModelError> {
        let (images, audio) = self.media_positions(input)?;
        Ok(media_cache_keys(
            &input.ids,
            &images,
            &input.images,
            &audio,
            &input.audio,
        ))
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
        self.text.batching()
    }

    fn forward(
        &mut self,
        ids: &[u32],
        media: Option<&MediaRows>,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, ModelError> {
        let soft = [self.cfg.image_token_id, self.cfg.audio_token_id];
        self.text.forward(ids, &soft, media, cache)
    }

    fn forward_rows(
        &mut self,
        ids: &[u32],
        batch: &mut BatchKv,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.text.forward_rows(ids, batch)
    }
}
