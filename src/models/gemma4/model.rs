//! The four Gemma 4 graphs and how one sequence runs through them (docs/gemma4.md §2).
//!
//! A decoder step over positions `past ..`: `embed_tokens` on the ids with the image/audio/video soft tokens
//! sent as `<pad>` (as transformers embeds them; the graph's own mapping, if it has one, agrees) → the
//! encoder rows replace `inputs_embeds` at the soft-token positions (`per_layer_inputs` stay `<pad>`'s) → the
//! shared [`TextDecoder`] (per-layer inputs, attention mask, soft-cap check). Images: one `vision_encoder`
//! run for the images of a request not in the encoder cache (`pixel_values [n, max_patches, patch_dim]`,
//! `pixel_position_ids [n, max_patches, 2]`), which returns only the rows of real soft tokens, every
//! image's in order. Audio: one `audio_encoder` run per uncached clip, which returns the rows of its valid
//! soft tokens.

use std::borrow::Cow;

use super::config::Gemma4Config;
use super::preprocess::{audio_soft_tokens, ImageProcessing};
use crate::engine::batch::BatchKv;
use crate::engine::kv::{KvCache, KvLayout};
use crate::engine::session::{ElemType, GraphSession, SessionOptions};
use crate::engine::tensor;
use crate::models::catalog::Component;
use crate::models::decoder::{interface, only_known_inputs, width, Inputs, TextDecoder};
use crate::models::encoder_cache::EncoderCache;
use crate::models::encoders::{media_cache_keys, mismatch, no_encoder, split_rows, ClipEncoder};
use crate::models::resolve::ResolvedModel;
use crate::models::{
    media_positions, AudioInput, Batching, ChatModel, ImageInput, MediaRows, ModelError, PatchGrid,
    PreparedInput,
};

const FAMILY: &str = "Gemma 4";
const IMAGE_OUT: &str = "image_features";
const PIXELS: &str = "pixel_values";
const POSITIONS: &str = "pixel_position_ids";

/// Per media item, its soft-token positions.
type ItemPositions = Vec<Vec<usize>>;

struct Vision {
    session: GraphSession,
    pixel_type: ElemType,
}

/// Loaded sessions plus what was learnt about them at load time.
pub struct Gemma4Model {
    text: TextDecoder,
    vision: Option<Vision>,
    audio: Option<ClipEncoder>,
    cfg: Gemma4Config,
    cache: EncoderCache,
}

impl Gemma4Model {
    pub fn load(
        model: &ResolvedModel,
        cfg: Gemma4Config,
        opts: &SessionOptions,
        cache: EncoderCache,
        images: &ImageProcessing,
    ) -> Result<Self, ModelError> {
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
                "Gemma 4 graphs without per_layer_inputs (embed_tokens output, decoder input)"
                    .into(),
            ));
        }
        let vision = super::super::load_graph(model, Component::VisionEncoder, opts)?
            .map(|v| check_vision(v, &cfg, images))
            .transpose()?;
        let audio = super::super::load_graph(model, Component::AudioEncoder, opts)?
            .map(|a| ClipEncoder::new(a, cfg.hidden_size, FAMILY))
            .transpose()?;
        // The soft tokens' rows come from the encoders; embed_tokens gets them as <pad>.
        text.embed_ids_as(cfg.soft_token_ids(), cfg.pad_token_id);
        if let Some(cap) = cfg.final_logit_softcapping {
            text.check_softcap(cap, cfg.bos_token_id.unwrap_or(2))?;
        }
        tracing::info!(
            kv_tensors = text.kv_layout().slots.len(),
            kv_dtype = %text.kv_layout().dtype().map(|d| d.name()).unwrap_or_default(),
            embeds = %text.embeds_type(),
            attention_mask = text.decoder_has_input("attention_mask"),
            vision = vision.is_some(),
            audio = audio.is_some(),
            "gemma4 graphs loaded"
        );
        Ok(Self {
            text,
            vision,
            audio,
            cfg,
            cache,
        })
    }

    pub fn config(&self) -> &Gemma4Config {
        &self.cfg
    }

    /// Image rows for `images`, in order: cached ones from the encoder cache, the rest from one
    /// `vision_encoder` run.
    fn encode_images(&mut self, images: &[&ImageInput]) -> Result<Vec<Vec<f32>>, ModelError> {
        let Some(vision) = self.vision.as_mut() else {
            return Err(no_encoder("vision", "images"));
        };
        let hidden = self.cfg.hidden_size;
        self.cache.get_or_encode(
            images,
            |i| i.key,
            |missing| {
                let rows = run_vision(vision, missing)?;
                let counts: Vec<usize> = missing.iter().map(|i| soft_tokens(i)).collect();
                split_rows(rows, &counts, hidden, "vision")
            },
        )
    }

    /// Audio rows for `clips`, in order; one `audio_encoder` run per uncached clip, giving the rows of
    /// its valid soft tokens.
    fn encode_audio(&mut self, clips: &[&AudioInput]) -> Result<Vec<Vec<f32>>, ModelError> {
        let Some(audio) = self.audio.as_mut() else {
            return Err(no_encoder("audio", "audio"));
        };
        audio.encode(&mut self.cache, clips, self.cfg.hidden_size, |c| {
            audio_soft_tokens(&c.mask)
        })
    }

    /// The soft-token positions of every image and every clip of a prompt, in order.
    fn media_positions(
        &self,
        input: &PreparedInput,
    ) -> Result<(ItemPositions, ItemPositions), ModelError> {
        let image_rows: Vec<usize> = input.images.iter().map(soft_tokens).collect();
        let audio_rows: Vec<usize> = input
            .audio
            .iter()
            .map(|a| audio_soft_tokens(&a.mask))
            .collect();
        Ok((
            media_positions(&input.ids, self.cfg.image_token_id, &image_rows, "image")?,
            media_positions(&input.ids, self.cfg.audio_token_id, &audio_rows, "audio")?,
        ))
    }
}

/// Soft tokens an image becomes (0 for an image that did not come from this family's processor).
fn soft_tokens(img: &ImageInput) -> usize {
    img.patches.as_ref().map_or(0, |p| p.soft_tokens)
}

/// One vision-encoder run over `images` (all padded to the same number of patch rows).
fn run_vision(vision: &mut Vision, images: &[&ImageInput]) -> Result<Vec<f32>, ModelError> {
    fn grid(img: &ImageInput) -> Result<&PatchGrid, ModelError> {
        img.patches
            .as_ref()
            .ok_or_else(|| mismatch("an image without patch rows".into()))
    }
    let first = grid(images[0])?;
    let (rows, dim) = (first.positions.len(), first.patch_dim);
    let mut pixels = Vec::with_capacity(images.len() * rows * dim);
    let mut positions = Vec::with_capacity(images.len() * rows * 2);
    for img in images {
        let g = grid(img)?;
        if g.positions.len() != rows || g.patch_dim != dim || img.pixel_values.len() != rows * dim {
            return Err(mismatch(format!(
                "images of {} and {} patch rows of {} and {} values in one batch",
                rows,
                g.positions.len(),
                dim,
                g.patch_dim
            )));
        }
        pixels.extend_from_slice(&img.pixel_values);
        positions.extend(g.positions.iter().flatten());
    }
    let n = images.len() as i64;
    let inputs: Inputs = vec![
        (
            Cow::Borrowed(PIXELS),
            tensor::float_value(vision.pixel_type, &[n, rows as i64, dim as i64], pixels)?.into(),
        ),
        (
            Cow::Borrowed(POSITIONS),
            tensor::i64_value(&[n, rows as i64, 2], positions)?.into(),
        ),
    ];
    Ok(vision.session.run_output(inputs, IMAGE_OUT)?.to_f32_vec())
}

/// The vision encoder's interface against the config and the image processor.
fn check_vision(
    v: GraphSession,
    cfg: &Gemma4Config,
    images: &ImageProcessing,
) -> Result<Vision, ModelError> {
    v.require(&[PIXELS, POSITIONS], &[IMAGE_OUT])?;
    only_known_inputs(&v, &[PIXELS, POSITIONS], FAMILY)?;
    let Some(pv) = v.input(PIXELS) else {
        return Err(interface(&v, format!("no {PIXELS} input")));
    };
    let pixel_type = pv.dtype;
    let want = [images.max_patches(), images.patch_dim()];
    if !pixel_type.is_float() || pv.dims.len() != 3 {
        return Err(interface(
            &v,
            format!(
                "{PIXELS} is {pixel_type} of rank {}; expected float [images, {}, {}]",
                pv.dims.len(),
                want[0],
                want[1]
            ),
        ));
    }
    for (axis, what) in [
        (1, "patch rows (max_soft_tokens · pooling_kernel_size²)"),
        (2, "values per patch (patch_size² · 3)"),
    ] {
        if let Some(d) = pv.dims[axis].filter(|&d| d as usize != want[axis - 1]) {
            return Err(interface(
                &v,
                format!(
                    "{PIXELS} takes {d} {what}; the image processor gives {}",
                    want[axis - 1]
                ),
            ));
        }
    }
    if let Some(h) = width(v.output(IMAGE_OUT)).filter(|&h| h != cfg.hidden_size) {
        return Err(interface(
            &v,
            format!(
                "{IMAGE_OUT} has width {h}; config.json text_config.hidden_size is {}",
                cfg.hidden_size
            ),
        ));
    }
    Ok(Vision {
        session: v,
        pixel_type,
    })
}

impl ChatModel for Gemma4Model {
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
