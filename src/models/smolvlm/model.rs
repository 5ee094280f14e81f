//! The three SmolVLM graphs and how one sequence runs through them (model_interface.md §2.3, §2.5).
//!
//! Prefill: `embed_tokens(input_ids)`; the vision encoder once for every frame of the request's images
//! not in the encoder cache (`pixel_values [1, frames, 3, H, W]` padded to the largest frame, with a bool
//! `pixel_attention_mask` true on real pixels); its rows replace, in order, the embeddings at the `<image>`
//! positions; then `decoder_model_merged` with an empty cache. Decode: one id through `embed_tokens`, then
//! the decoder with the cache. The decoder always gets the full `attention_mask` (ones over past + new
//! positions; the model card's one-column mask on decode steps is a known bug) and 0-based `position_ids`.
//! Inputs are fed by name, cast to the element type each session declares; optional decoder inputs only
//! when declared; any other declared input fails the load (the text half is the shared
//! [`TextDecoder`]).

use std::borrow::Cow;

use super::config::SmolVlmConfig;
use crate::engine::batch::BatchKv;
use crate::engine::kv::{KvCache, KvLayout};
use crate::engine::session::{ElemType, GraphSession, SessionOptions};
use crate::engine::tensor;
use crate::engine::EngineError;
use crate::error::{ClassifiedError, ErrorClass};
use crate::models::catalog::Component;
use crate::models::decoder::{interface, only_known_inputs, Inputs, TextDecoder};
use crate::models::encoder_cache::EncoderCache;
use crate::models::encoders::{no_encoder, split_rows};
use crate::models::resolve::ResolvedModel;
use crate::models::{
    image_cache_keys, media_positions, Batching, ChatModel, ImageInput, MediaRows, ModelError,
    PreparedInput,
};

const FAMILY: &str = "SmolVLM";
const IMAGE_OUT: &str = "image_features";

/// Loaded sessions plus what was learnt about them at load time.
pub struct SmolVlmModel {
    text: TextDecoder,
    vision: Option<Vision>,
    cfg: SmolVlmConfig,
    cache: EncoderCache,
}

struct Vision {
    session: GraphSession,
    /// `pixel_values` is `[batch, frames, 3, H, W]` (the SmolVLM export) rather than `[frames, 3, H, W]`.
    batched: bool,
    pixel_type: ElemType,
    /// Element type of `pixel_attention_mask` when the graph takes one.
    mask_type: Option<ElemType>,
}

impl SmolVlmModel {
    /// Loads and checks the graphs; `tile` is the frame side the image processor produces.
    pub fn load(
        model: &ResolvedModel,
        cfg: SmolVlmConfig,
        tile: usize,
        opts: &SessionOptions,
        cache: EncoderCache,
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
            .map(|v| Self::check_vision(v, &cfg, tile))
            .transpose()?;
        tracing::info!(
            kv_tensors = text.kv_layout().slots.len(),
            kv_dtype = %text.kv_layout().dtype().map(|d| d.name()).unwrap_or_default(),
            embeds = %text.embeds_type(),
            vision = vision.is_some(),
            image_seq_len = cfg.image_seq_len,
            "smolvlm graphs loaded"
        );
        Ok(Self {
            text,
            vision,
            cfg,
            cache,
        })
    }

    fn check_vision(
        v: GraphSession,
        cfg: &SmolVlmConfig,
        tile: usize,
    ) -> Result<Vision, ModelError> {
        v.require(&["pixel_values"], &[IMAGE_OUT])?;
        only_known_inputs(&v, &["pixel_values", "pixel_attention_mask"], FAMILY)?;
        let pv = v.input("pixel_values").map(|i| (i.dtype, i.dims.clone()));
        let Some((pixel_type, dims)) = pv else {
            return Err(interface(&v, "no pixel_values input".into()));
        };
        if !pixel_type.is_float() {
            return Err(interface(
                &v,
                format!("pixel_values is {pixel_type}, expected a float type"),
            ));
        }
        let batched = match dims.len() {
            5 => true,
            4 => false,
            n => {
                return Err(interface(
                    &v,
                    format!("pixel_values has rank {n}; expected [batch, frames, 3, H, W] or [frames, 3, H, W]"),
                ))
            }
        };
        for d in dims.iter().rev().take(2).flatten() {
            if *d as usize != tile {
                return Err(interface(
                    &v,
                    format!(
                        "pixel_values takes {d}-pixel frames; preprocessor_config.json max_image_size.longest_edge is {tile}"
                    ),
                ));
            }
        }
        let mask_type = match v.input("pixel_attention_mask").map(|i| i.dtype) {
            None => None,
            Some(t @ (ElemType::Bool | ElemType::I64)) => Some(t),
            Some(t) => {
                return Err(interface(
                    &v,
                    format!("pixel_attention_mask is {t}, expected bool or int64"),
                ))
            }
        };
        if let Some(out) = v.output(IMAGE_OUT) {
            if let Some(Some(h)) = out.dims.last() {
                if *h as usize != cfg.hidden_size {
                    return Err(interface(
                        &v,
                        format!(
                            "{IMAGE_OUT} rows have width {h}; config.json text_config.hidden_size is {}",
                            cfg.hidden_size
                        ),
                    ));
                }
            }
            if out.dims.len() == 3 {
                if let Some(n) = out.dims[1] {
                    if n as usize != cfg.image_seq_len {
                        return Err(interface(
                            &v,
                            format!(
                                "{IMAGE_OUT} has {n} rows per frame but the processor's image_seq_len is {}",
                                cfg.image_seq_len
                            ),
                        ));
                    }
                }
            }
        }
        Ok(Vision {
            session: v,
            batched,
            pixel_type,
            mask_type,
        })
    }

    pub fn config(&self) -> &SmolVlmConfig {
        &self.cfg
    }

    /// Image features for `images`, in order (one `Vec` per image): cached ones from the encoder
    /// cache, the rest from one `vision_encoder` run over all their frames.
    fn encode_images(&mut self, images: &[&ImageInput]) -> Result<Vec<Vec<f32>>, ModelError> {
        let Some(vision) = self.vision.as_mut() else {
            return Err(no_encoder("vision", "images"));
        };
        let (hidden, per_frame) = (self.cfg.hidden_size, self.cfg.image_seq_len);
        self.cache.get_or_encode(
            images,
            |i| i.key,
            |missing| {
                let rows = run_vision(vision, missing)?;
                let counts: Vec<usize> = missing.iter().map(|i| i.frames * per_frame).collect();
                split_rows(rows, &counts, hidden, "vision")
            },
        )
    }

    /// The `<image>` positions of every image of a prompt, in order (64 per frame).
    fn image_positions(&self, input: &PreparedInput) -> Result<Vec<Vec<usize>>, ModelError> {
        let rows: Vec<usize> = input
            .images
            .iter()
            .map(|i| i.frames * self.cfg.image_seq_len)
            .collect();
        media_positions(&input.ids, self.cfg.image_token_id, &rows, "image")
    }
}

/// One vision-encoder run over the frames of `images`, padded to the largest frame; returns the rows
/// flattened.
fn run_vision(vision: &mut Vision, images: &[&ImageInput]) -> Result<Vec<f32>, ModelError> {
    let frames: usize = images.iter().map(|i| i.frames).sum();
    let (h, w) = images
        .iter()
        .fold((0, 0), |(h, w), i| (h.max(i.shape[1]), w.max(i.shape[2])));
    let mut pixels = vec![0f32; frames * 3 * h * w];
    let mut mask = vec![false; frames * h * w];
    let mut f = 0;
    for img in images {
        let [c, ih, iw] = img.shape;
        if c != 3 || ih == 0 || iw == 0 || img.pixel_values.len() != img.frames * c * ih * iw {
            return Err(ModelError::Request(ClassifiedError::new(
                ErrorClass::Internal,
                format!(
                    "an image has {} pixel values for {} frames of {:?}",
                    img.pixel_values.len(),
                    img.frames,
                    img.shape
                ),
            )));
        }
        for frame in img.pixel_values.chunks_exact(c * ih * iw) {
            for ch in 0..c {
                for y in 0..ih {
                    let src = &frame[(ch * ih + y) * iw..(ch * ih + y + 1) * iw];
                    let dst = ((f * 3 + ch) * h + y) * w;
                    pixels[dst..dst + iw].copy_from_slice(src);
                }
            }
            for y in 0..ih {
                let dst = (f * h + y) * w;
                mask[dst..dst + iw].fill(true);
            }
            f += 1;
        }
    }
    let (n, h, w) = (frames as i64, h as i64, w as i64);
    let (pshape, mshape) = if vision.batched {
        (vec![1, n, 3, h, w], vec![1, n, h, w])
    } else {
        (vec![n, 3, h, w], vec![n, h, w])
    };
    let mut inputs: Inputs = vec![(
        Cow::Borrowed("pixel_values"),
        tensor::float_value(vision.pixel_type, &pshape, pixels)?.into(),
    )];
    match vision.mask_type {
        Some(ElemType::I64) => inputs.push((
            Cow::Borrowed("pixel_attention_mask"),
            tensor::i64_value(&mshape, mask.into_iter().map(i64::from).collect())?.into(),
        )),
        Some(_) => inputs.push((
            Cow::Borrowed("pixel_attention_mask"),
            tensor::bool_value(&mshape, mask)?.into(),
        )),
        None => {}
    }
    let component = vision.session.component.clone();
    let mut out = vision
        .session
        .session
        .run(inputs)
        .map_err(|e| EngineError::run(&component, e))?;
    let v = out
        .remove(IMAGE_OUT)
        .ok_or_else(|| EngineError::run(&component, format!("no {IMAGE_OUT} output")))?;
    Ok(tensor::extract_floats(&v)?.0.to_f32_vec())
}

impl ChatModel for SmolVlmModel {
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
