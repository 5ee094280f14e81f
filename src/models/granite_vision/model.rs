//! The three Granite Vision graphs (tools/export/granite_vision.py) and how one sequence runs through
//! them.
//!
//! Prefill: `embed_tokens(input_ids)`; the vision encoder once over the tiles of every image of the
//! request not in the encoder cache (`pixel_values [tiles, 3, 384, 384]`: each image's base tile, then
//! its grid), giving `image_features [tiles, 729, hidden]` and `image_newline [hidden]`; each image's
//! rows packed ([`super::preprocess::pack`]: unpadded to its aspect ratio, a newline row after each
//! feature row) replace, in order, the embeddings at its `<image>` positions; then the decoder (the
//! shared [`TextDecoder`]; Granite's multipliers are inside the graph). The packed rows are what the
//! encoder cache keeps.

use std::borrow::Cow;

use super::config::GraniteVisionConfig;
use super::preprocess::{pack, AnyresProcessing, FeatureLayout};
use crate::engine::batch::BatchKv;
use crate::engine::kv::{KvCache, KvLayout};
use crate::engine::session::{ElemType, GraphSession, SessionOptions};
use crate::engine::tensor;
use crate::engine::EngineError;
use crate::error::{ClassifiedError, ErrorClass};
use crate::models::catalog::Component;
use crate::models::decoder::{interface, only_known_inputs, width, Inputs, TextDecoder};
use crate::models::encoder_cache::EncoderCache;
use crate::models::encoders::{mismatch, no_encoder};
use crate::models::resolve::ResolvedModel;
use crate::models::{
    image_cache_keys, media_positions, Batching, ChatModel, ImageInput, MediaRows, ModelError,
    PreparedInput,
};

const FAMILY: &str = "Granite Vision";
const FEATURES: &str = "image_features";
const NEWLINE: &str = "image_newline";

struct Vision {
    session: GraphSession,
    pixel_type: ElemType,
}

/// Loaded sessions plus what was learnt about them at load time.
pub struct GraniteVisionModel {
    text: TextDecoder,
    vision: Option<Vision>,
    cfg: GraniteVisionConfig,
    /// The image processor's settings: each image's layout from its size.
    processing: AnyresProcessing,
    cache: EncoderCache,
}

impl GraniteVisionModel {
    pub fn load(
        model: &ResolvedModel,
        cfg: GraniteVisionConfig,
        opts: &SessionOptions,
        cache: EncoderCache,
        processing: AnyresProcessing,
    ) -> Result<Self, ModelError> {
        let text = TextDecoder::load(
            model,
            opts,
            cfg.hidden_size,
            cfg.vocab_size,
            FAMILY,
            cfg.attention.clone(),
        )?;
        let vision = super::super::load_graph(model, Component::VisionEncoder, opts)?
            .map(|v| Self::check_vision(v, &cfg))
            .transpose()?;
        tracing::info!(
            kv_tensors = text.kv_layout().slots.len(),
            embeds = %text.embeds_type(),
            vision = vision.is_some(),
            tile = cfg.tile,
            "granite vision graphs loaded"
        );
        Ok(Self {
            text,
            vision,
            cfg,
            processing,
            cache,
        })
    }

    fn check_vision(v: GraphSession, cfg: &GraniteVisionConfig) -> Result<Vision, ModelError> {
        v.require(&["pixel_values"], &[FEATURES, NEWLINE])?;
        only_known_inputs(&v, &["pixel_values"], FAMILY)?;
        let Some(pv) = v.input("pixel_values") else {
            return Err(interface(&v, "no pixel_values input".into()));
        };
        let pixel_type = pv.dtype;
        if !pixel_type.is_float() || pv.dims.len() != 4 {
            return Err(interface(
                &v,
                format!(
                    "pixel_values is {pixel_type} of rank {}; expected float [tiles, 3, {t}, {t}]",
                    pv.dims.len(),
                    t = cfg.tile
                ),
            ));
        }
        if let Some(d) = pv.dims[2..]
            .iter()
            .flatten()
            .find(|&&d| d as usize != cfg.tile)
        {
            return Err(interface(
                &v,
                format!(
                    "pixel_values takes {d}-pixel tiles; config.json vision_config.image_size is {}",
                    cfg.tile
                ),
            ));
        }
        for name in [FEATURES, NEWLINE] {
            if let Some(h) = width(v.output(name)).filter(|&h| h != cfg.hidden_size) {
                return Err(interface(
                    &v,
                    format!(
                        "{name} has width {h}; config.json text_config.hidden_size is {}",
                        cfg.hidden_size
                    ),
                ));
            }
        }
        if let Some(Some(n)) = v.output(FEATURES).and_then(|o| o.dims.get(1)) {
            if *n as usize != cfg.features_per_tile() {
                return Err(interface(
                    &v,
                    format!(
                        "{FEATURES} has {n} rows per tile; (image_size / patch_size)² is {}",
                        cfg.features_per_tile()
                    ),
                ));
            }
        }
        Ok(Vision {
            session: v,
            pixel_type,
        })
    }

    pub fn config(&self) -> &GraniteVisionConfig {
        &self.cfg
    }

    /// Packed rows for `images`, in order (one `Vec` per image): cached ones from the encoder cache,
    /// the rest from one `vision_encoder` run over all their tiles.
    pub fn encode_images(&mut self, images: &[&ImageInput]) -> Result<Vec<Vec<f32>>, ModelError> {
        let Some(vision) = self.vision.as_mut() else {
            return Err(no_encoder("vision", "images"));
        };
        let (hidden, tile) = (self.cfg.hidden_size, self.cfg.tile);
        let per_tile = self.cfg.features_per_tile() * hidden;
        let processing = &self.processing;
        self.cache.get_or_encode(images, |i| i.key, |missing| {
            let (features, newline) = run_vision(vision, missing, tile)?;
            let tiles: usize = missing.iter().map(|i| i.frames).sum();
            if features.len() != tiles * per_tile {
                return Err(mismatch(format!(
                    "the vision encoder returned {} values for {tiles} tiles; expected {} rows of {hidden} per tile",
                    features.len(),
                    per_tile / hidden.max(1)
                )));
            }
            let mut at = 0;
            missing
                .iter()
                .map(|img| {
                    let n = img.frames * per_tile;
                    let layout = processing.layout(img.size[0] as u32, img.size[1] as u32);
                    let packed = pack(&layout, &features[at..at + n], &newline, hidden);
                    at += n;
                    packed
                })
                .collect()
        })
    }

    fn layout(&self, img: &ImageInput) -> FeatureLayout {
        self.processing
            .layout(img.size[0] as u32, img.size[1] as u32)
    }

    /// The `<image>` positions of every image of a prompt, in order.
    fn image_positions(&self, input: &PreparedInput) -> Result<Vec<Vec<usize>>, ModelError> {
        let rows = input
            .images
            .iter()
            .map(|i| self.layout(i).tokens())
            .collect::<Vec<_>>();
        media_positions(&input.ids, self.cfg.image_token_id, &rows, "image")
    }
}

/// One vision-encoder run over the tiles of `images`; returns the feature rows (flattened) and the
/// newline vector.
fn run_vision(
    vision: &mut Vision,
    images: &[&ImageInput],
    tile: usize,
) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
    let tiles: usize = images.iter().map(|i| i.frames).sum();
    let mut pixels = Vec::with_capacity(tiles * 3 * tile * tile);
    for img in images {
        if img.shape != [3, tile, tile] || img.pixel_values.len() != img.frames * 3 * tile * tile {
            return Err(ModelError::Request(ClassifiedError::new(
                ErrorClass::Internal,
                format!(
                    "an image has {} pixel values for {} tiles of {:?}; the encoder takes [3, {tile}, {tile}]",
                    img.pixel_values.len(),
                    img.frames,
                    img.shape
                ),
            )));
        }
        pixels.extend_from_slice(&img.pixel_values);
    }
    let shape = [tiles as i64, 3, tile as i64, tile as i64];
    let inputs: Inputs = vec![(
        Cow::Borrowed("pixel_values"),
        tensor::float_value(vision.pixel_type, &shape, pixels)?.into(),
    )];
    let component = vision.session.component.clone();
    let mut out = vision
        .session
        .session
        .run(inputs)
        .map_err(|e| EngineError::run(&component, e))?;
    let mut take = |name: &str| -> Result<Vec<f32>, ModelError> {
        let v = out
            .remove(name)
            .ok_or_else(|| EngineError::run(&component, format!("no {name} output")))?;
        Ok(tensor::extract_floats(&v)?.0.to_f32_vec())
    };
    Ok((take(FEATURES)?, take(NEWLINE)?))
}

impl ChatModel for GraniteVisionModel {
    fn kv_layout(&self) -> &KvLayout {
        self.text.kv_layout()
    }

    fn split_exact(&self) -> bool {
        self.text.split_exact()
    }

    fn cache_keys(&self, input: &PreparedInput) -> Result<Vec<u64>, ModelError> {
        let positions = self.image_positions(input)?;
        Ok(image_cache_keys(&input.ids, &positions, &input.images))
    }

    fn encode_media(
        &mut self,
        input: &PreparedInput,
        from: usize,
    ) -> Result<MediaRows, ModelError> {
        let positions = self.image_positions(input)?;
        let mut rows = MediaRows::default();
        rows.add_needed(positions, &input.images, from, |i| self.encode_images(i))?;
        Ok(rows)
    }

    fn forward(
        &mut self,
        ids: &[u32],
        media: Option<&MediaRows>,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, ModelError> {
        let soft = [self.cfg.image_token_id];
        self.text.forward(ids, &soft, media, cache)
    }

    fn batching(&self) -> Batching {
        self.text.batching()
    }

    fn forward_rows(
        &mut self,
        ids: &[u32],
        batch: &mut BatchKv,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.text.forward_rows(ids, batch)
    }
}
