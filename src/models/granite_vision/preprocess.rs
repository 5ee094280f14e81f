//! Granite Vision image preprocessing: transformers' `LlavaNextImageProcessorPil` ("anyres") wired from
//! the generic stages of [`crate::pipeline::image`] with the image processor's settings (where they are
//! read from: [`crate::models::processor_config`]), and
//! the layout of an image's features after the vision encoder (`LlavaNextModel.pack_image_features`).
//!
//! 1. The best grid resolution among `image_grid_pinpoints` (`select_best_resolution`: the most of the
//!    image kept, then the least wasted area).
//! 2. The image resized (aspect kept, `get_patch_output_size`) into that resolution, pasted centred on
//!    a black canvas of it (value 0 before rescaling), cut into tiles row-major.
//! 3. The whole image resized to `size` in front of them: the base tile.
//! 4. Each frame resized to `size` (a no-op for tiles of that size), centre-cropped to `crop_size`,
//!    rescaled, normalised, channel-first.
//!
//! Every resize is Pillow's (the `resample` filter) on 8-bit pixels, as the reference does.
//!
//! Features: the base tile's rows first, then the tile grid laid out spatially, cut to the image's
//! aspect ratio (`unpad_image`), with the `image_newline` row after each feature row. The number of
//! `<image>` tokens an image takes is that count (`LlavaNextProcessor._get_number_of_features`).

use std::path::Path;

use ::image::RgbImage;

use super::config::{pinpoints, GraniteVisionConfig};
use crate::error::{ClassifiedError, ErrorClass};
use crate::models::encoder_cache::media_key;
use crate::models::media::{decode_image, media_bytes, MediaLimits};
use crate::models::processor_config::{Part, ProcessorFiles, Settings};
use crate::models::{ImageInput, ModelError};
use crate::pipeline::image::{self, Filter};
use crate::protocol::MediaSource;

/// transformers' `select_best_resolution` over `pinpoints` ((height, width)) for an image of
/// `height` × `width`: the most effective pixels, then the least waste. Python float arithmetic.
pub fn best_resolution(height: u32, width: u32, pinpoints: &[(u32, u32)]) -> (u32, u32) {
    let (oh, ow) = (height.max(1) as f64, width.max(1) as f64);
    let mut best = pinpoints[0];
    let (mut best_eff, mut best_waste) = (0f64, f64::INFINITY);
    for &(h, w) in pinpoints {
        let scale = (w as f64 / ow).min(h as f64 / oh);
        let eff = ((ow * scale).trunc() * (oh * scale).trunc()).min(ow * oh);
        let waste = w as f64 * h as f64 - eff;
        if eff > best_eff || (eff == best_eff && waste < best_waste) {
            (best, best_eff, best_waste) = ((h, w), eff, waste);
        }
    }
    best
}

/// transformers' `get_patch_output_size`: (height, width) of the image resized into `target` with its
/// aspect ratio kept.
pub fn patch_output_size(height: u32, width: u32, target: (u32, u32)) -> (u32, u32) {
    let (oh, ow) = (height.max(1) as f64, width.max(1) as f64);
    let (th, tw) = target;
    let (sw, sh) = (tw as f64 / ow, th as f64 / oh);
    if sw < sh {
        (((oh * sw).ceil() as u32).min(th), tw)
    } else {
        (th, ((ow * sh).ceil() as u32).min(tw))
    }
}

/// Python's `int(round(x, 7))` for the non-negative values of the unpadding arithmetic.
fn round7_int(x: f64) -> i64 {
    ((x * 1e7).round() as i64).div_euclid(10_000_000)
}

/// Where an image's features go: the grid of tiles and the part of it kept after unpadding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureLayout {
    /// Tile rows and columns of the grid (the base tile not counted).
    pub rows: usize,
    pub cols: usize,
    /// Feature rows and columns kept, and how many were cut from the top and from the left.
    pub height: usize,
    pub width: usize,
    pub top: usize,
    pub left: usize,
    /// Features per tile side.
    pub side: usize,
}

impl FeatureLayout {
    /// The layout of an image of `height` × `width` whose best resolution is `best`
    /// (`unpad_image` / `_get_unpadded_features`).
    pub fn new(height: u32, width: u32, best: (u32, u32), tile: usize, side: usize) -> Self {
        let (rows, cols) = (best.0 as usize / tile, best.1 as usize / tile);
        let (ch, cw) = ((rows * side) as i64, (cols * side) as i64);
        let (oh, ow) = (height.max(1) as f64, width.max(1) as f64);
        let (mut h, mut w, mut top, mut left) = (ch, cw, 0, 0);
        if ow / oh > cw as f64 / ch as f64 {
            let new = round7_int(oh * (cw as f64 / ow));
            top = (ch - new).div_euclid(2);
            h = ch - 2 * top;
        } else {
            let new = round7_int(ow * (ch as f64 / oh));
            left = (cw - new).div_euclid(2);
            w = cw - 2 * left;
        }
        Self {
            rows,
            cols,
            height: h.max(0) as usize,
            width: w.max(0) as usize,
            top: top.max(0) as usize,
            left: left.max(0) as usize,
            side,
        }
    }

    /// Tiles the encoder sees: the base tile plus the grid.
    pub fn tiles(&self) -> usize {
        1 + self.rows * self.cols
    }

    /// `<image>` tokens (= packed feature rows): the base tile, the kept grid, one newline per row.
    pub fn tokens(&self) -> usize {
        self.side * self.side + self.height * (self.width + 1)
    }

    /// The packed rows: for each, the encoder row it copies (tile-major, `side²` rows per tile), or
    /// `None` for the newline row.
    pub fn rows_in_order(&self) -> impl Iterator<Item = Option<usize>> + '_ {
        let per_tile = self.side * self.side;
        let base = (0..per_tile).map(Some);
        let grid = (0..self.height).flat_map(move |y| {
            (0..=self.width).map(move |x| {
                (x < self.width).then(|| {
                    let (gy, gx) = (y + self.top, x + self.left);
                    let tile = 1 + (gy / self.side) * self.cols + gx / self.side;
                    tile * per_tile + (gy % self.side) * self.side + gx % self.side
                })
            })
        });
        base.chain(grid)
    }
}

/// Packs one image's encoder output (`features`: `tiles × side² × hidden`, tile-major) with
/// `newline` into its `<image>` rows.
pub fn pack(
    layout: &FeatureLayout,
    features: &[f32],
    newline: &[f32],
    hidden: usize,
) -> Result<Vec<f32>, ModelError> {
    let want = layout.tiles() * layout.side * layout.side * hidden;
    if features.len() != want || newline.len() != hidden {
        return Err(ModelError::Request(ClassifiedError::new(
            ErrorClass::Internal,
            format!(
                "packing {} feature values and a {}-wide newline; the layout needs {want} and {hidden}",
                features.len(),
                newline.len()
            ),
        )));
    }
    let mut out = Vec::with_capacity(layout.tokens() * hidden);
    for row in layout.rows_in_order() {
        match row {
            Some(r) => out.extend_from_slice(&features[r * hidden..(r + 1) * hidden]),
            None => out.extend_from_slice(newline),
        }
    }
    Ok(out)
}

/// The image-processor settings of a LLaVA-NeXT snapshot.
#[derive(Debug, Clone)]
pub struct AnyresProcessing {
    pinpoints: Vec<(u32, u32)>,
    /// Side of the grid tiles (`crop_size.height`, else `size`).
    patch: u32,
    /// (height, width) every frame is resized to; `None` without `do_resize`.
    resize: Option<(u32, u32)>,
    /// Base-tile size (height, width): `size` as a square for `shortest_edge`.
    base: (u32, u32),
    crop: Option<(u32, u32)>,
    filter: Filter,
    rescale: Option<f64>,
    normalize: Option<([f32; 3], [f32; 3])>,
    /// Feature rows per tile side.
    side: usize,
}

impl AnyresProcessing {
    /// Reads `LlavaNextImageProcessor`'s settings, each required (`rescale_factor` and the mean and
    /// deviation only when their switch is on). Fails unless the frames come out as the encoder's tiles
    /// and the pinpoints are the model's (`config.json`'s, which the packing uses).
    pub fn from_settings(s: &Settings, cfg: &GraniteVisionConfig) -> Result<Self, ModelError> {
        let size = s.size("size")?;
        // As the reference: `size` as (height, width), else a square of its shortest edge.
        let square = match (size.height, size.width, size.shortest_edge) {
            (Some(h), Some(w), _) => (h, w),
            (_, _, Some(e)) => (e, e),
            _ => return Err(s.invalid("size", "expected height and width, or shortest_edge")),
        };
        let crop_size = s.size("crop_size")?;
        let (Some(ch), Some(cw)) = (crop_size.height, crop_size.width) else {
            return Err(s.invalid("crop_size", "expected height and width"));
        };
        // The grid tiles are `crop_size.height` pixels, as the reference's `patch_size`.
        let patch = ch;
        let pinpoints = pinpoints(
            Some(s.require("image_grid_pinpoints")?),
            patch as usize,
            &s.origin().to_string(),
        )?;
        if pinpoints != cfg.pinpoints {
            return Err(s.invalid(
                "image_grid_pinpoints",
                "config.json image_grid_pinpoints (which the features are packed by) differ",
            ));
        }
        // The tiles are the image resized into the best resolution and centre-padded to it; without
        // `do_pad` the reference resizes to fill it instead, which is not implemented.
        if !s.flag("do_pad")? {
            return Err(s.invalid(
                "do_pad",
                "only true is implemented (resize, then centre-pad to the best resolution)",
            ));
        }
        let p = Self {
            pinpoints,
            patch,
            resize: s.flag("do_resize")?.then_some(square),
            base: square,
            crop: s.flag("do_center_crop")?.then_some((ch, cw)),
            filter: s.resample()?,
            rescale: s.rescale()?,
            normalize: s.normalize()?,
            side: cfg.side,
        };
        let frame = p.frame_size((p.patch, p.patch));
        if frame != (cfg.tile as u32, cfg.tile as u32) || p.frame_size(p.base) != frame {
            return Err(ModelError::Config(format!(
                "the image processor's settings ({}) make {}x{} frames (size {square:?}, crop_size {:?}); the vision tower takes {}x{} tiles",
                s.origin(),
                frame.1,
                frame.0,
                (ch, cw),
                cfg.tile,
                cfg.tile
            )));
        }
        Ok(p)
    }

    /// (height, width) of a frame of `from` after the per-frame resize and crop.
    fn frame_size(&self, from: (u32, u32)) -> (u32, u32) {
        let sized = self.resize.unwrap_or(from);
        match self.crop {
            Some((h, w)) if h <= sized.0 && w <= sized.1 => (h, w),
            Some(_) => (0, 0),
            None => sized,
        }
    }

    /// The feature layout of an image of this size, without touching pixels.
    pub fn layout(&self, height: u32, width: u32) -> FeatureLayout {
        let best = best_resolution(height, width, &self.pinpoints);
        FeatureLayout::new(height, width, best, self.patch as usize, self.side)
    }

    /// The image's frames (8-bit, before rescaling): the base tile, then the grid row-major.
    pub fn frames(&self, img: &RgbImage) -> Vec<RgbImage> {
        let best = best_resolution(img.height(), img.width(), &self.pinpoints);
        let (nh, nw) = patch_output_size(img.height(), img.width(), best);
        let resized = image::resize(img, nw, nh, self.filter);
        let mut canvas = RgbImage::new(best.1, best.0);
        let (x0, y0) = ((best.1 - nw) / 2, (best.0 - nh) / 2);
        ::image::imageops::replace(&mut canvas, &resized, x0 as i64, y0 as i64);
        let t = self.patch;
        let mut frames = vec![image::resize(img, self.base.1, self.base.0, self.filter)];
        for r in 0..best.0 / t {
            for c in 0..best.1 / t {
                frames.push(::image::imageops::crop_imm(&canvas, c * t, r * t, t, t).to_image());
            }
        }
        frames
            .into_iter()
            .map(|f| {
                let f = match self.resize {
                    Some((h, w)) => image::resize(&f, w, h, self.filter),
                    None => f,
                };
                match self.crop {
                    Some((h, w)) if (f.height(), f.width()) != (h, w) => {
                        let (top, left) = ((f.height() - h) / 2, (f.width() - w) / 2);
                        ::image::imageops::crop_imm(&f, left, top, w, h).to_image()
                    }
                    _ => f,
                }
            })
            .collect()
    }

    /// Frames rescaled and normalised, channel-first, one after the other.
    pub fn process(&self, img: &RgbImage) -> (Vec<f32>, usize, [usize; 3]) {
        let frames = self.frames(img);
        let (w, h) = (frames[0].width() as usize, frames[0].height() as usize);
        let mut pixels = Vec::with_capacity(frames.len() * 3 * w * h);
        for f in &frames {
            pixels.extend(image::to_chw(
                f,
                self.rescale.unwrap_or(1.0),
                self.normalize,
            ));
        }
        (pixels, frames.len(), [3, h, w])
    }
}

/// One preprocessed image and its feature layout.
#[derive(Debug, Clone)]
pub struct AnyresImage {
    pub input: ImageInput,
    pub layout: FeatureLayout,
}

/// Turns job images into encoder inputs and their layouts.
pub struct GraniteVisionMedia {
    processing: AnyresProcessing,
    limits: MediaLimits,
}

impl GraniteVisionMedia {
    pub fn new(
        dir: &Path,
        cfg: &GraniteVisionConfig,
        limits: MediaLimits,
    ) -> Result<Self, ModelError> {
        // transformers 5 nests the image processor in processor_config.json; hub files are flat.
        let settings = ProcessorFiles::load(dir)?.part(Part::ImageProcessor)?;
        Ok(Self {
            processing: AnyresProcessing::from_settings(&settings, cfg)?,
            limits,
        })
    }

    pub fn processing(&self) -> &AnyresProcessing {
        &self.processing
    }

    /// The feature layout of image number `index` (decoded, not resized).
    pub fn layout(
        &self,
        index: usize,
        source: &MediaSource,
    ) -> Result<FeatureLayout, ClassifiedError> {
        let bytes = media_bytes("image", index, source, self.limits.image.max_bytes)?;
        let rgb = decode_image(index, &bytes, &self.limits.image)?;
        Ok(self.processing.layout(rgb.height(), rgb.width()))
    }

    /// Decodes and preprocesses image number `index` of the request.
    pub fn image(
        &self,
        index: usize,
        source: &MediaSource,
    ) -> Result<AnyresImage, ClassifiedError> {
        let bytes = media_bytes("image", index, source, self.limits.image.max_bytes)?;
        self.image_bytes(index, &bytes)
    }

    pub fn image_bytes(&self, index: usize, bytes: &[u8]) -> Result<AnyresImage, ClassifiedError> {
        let rgb = decode_image(index, bytes, &self.limits.image)?;
        let layout = self.processing.layout(rgb.height(), rgb.width());
        let (pixel_values, frames, shape) = self.processing.process(&rgb);
        Ok(AnyresImage {
            input: ImageInput {
                key: media_key("image", bytes),
                pixel_values,
                frames,
                shape,
                size: [rgb.height() as usize, rgb.width() as usize],
                patches: None,
            },
            layout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_pinpoints() -> Vec<(u32, u32)> {
        let mut p: Vec<(u32, u32)> = (1..=10).map(|k| (384, 384 * k)).collect();
        p.extend((1..=5).map(|k| (768, 384 * k)));
        p.extend((1..=3).map(|k| (1152, 384 * k)));
        p.extend([(1536, 384), (1536, 768), (1920, 384), (1920, 768)]);
        p.extend((6..=10).map(|k| (384 * k, 384)));
        p
    }

    #[test]
    fn resolution_and_unpadding_follow_the_reference_arithmetic() {
        let p = real_pinpoints();
        // Worked through transformers' select_best_resolution / unpad_image by hand.
        assert_eq!(best_resolution(200, 500, &p), (384, 768));
        assert_eq!(best_resolution(640, 260, &p), (768, 384));
        assert_eq!(best_resolution(80, 80, &p), (384, 384));
        assert_eq!(patch_output_size(200, 500, (384, 768)), (308, 768)); // ceil(200 * 768 / 500)
        assert_eq!(patch_output_size(640, 260, (768, 384)), (768, 312)); // ceil(260 * 768 / 640)
        let wide = FeatureLayout::new(200, 500, (384, 768), 384, 27);
        // 200 * 54 / 500 = 21.6 -> int(round(21.6, 7)) = 21, cut (27 - 21) // 2 = 3 from each side.
        assert_eq!(
            (wide.height, wide.width, wide.top, wide.left),
            (21, 54, 3, 0)
        );
        assert_eq!(wide.tokens(), 729 + 21 * 55);
        let tall = FeatureLayout::new(640, 260, (768, 384), 384, 27);
        assert_eq!(
            (tall.height, tall.width, tall.top, tall.left),
            (54, 21, 0, 3)
        );
        let square = FeatureLayout::new(80, 80, (384, 384), 384, 27);
        assert_eq!(
            (square.height, square.width, square.tokens()),
            (27, 27, 729 + 27 * 28)
        );
        // An exact 26.999999999 is 27 after round(., 7), not 26.
        assert_eq!(round7_int(26.999_999_999_9), 27);
        assert_eq!(round7_int(21.6), 21);
    }

    #[test]
    fn packing_puts_the_base_first_and_a_newline_after_each_row() {
        // 2 tiles side by side of side 2, kept 1 row x 4 columns from the second feature row.
        let l = FeatureLayout {
            rows: 1,
            cols: 2,
            height: 1,
            width: 4,
            top: 1,
            left: 0,
            side: 2,
        };
        let order: Vec<Option<usize>> = l.rows_in_order().collect();
        // base 0..4, then grid row 1: tile 1 (rows 4..8) cells (1,0),(1,1), tile 2 (8..12) (1,0),(1,1)
        assert_eq!(
            order,
            vec![
                Some(0),
                Some(1),
                Some(2),
                Some(3),
                Some(6),
                Some(7),
                Some(10),
                Some(11),
                None
            ]
        );
        let feats: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let packed = pack(&l, &feats, &[-1.0], 1).unwrap();
        assert_eq!(packed, vec![0., 1., 2., 3., 6., 7., 10., 11., -1.]);
        assert!(pack(&l, &feats[..11], &[-1.0], 1).is_err());
    }

    fn tiny_cfg(tile: usize, side: usize, pinpoints: Vec<(u32, u32)>) -> GraniteVisionConfig {
        GraniteVisionConfig {
            attention: Err("test".into()),
            image_token_id: 1,
            tile,
            side,
            pinpoints,
            hidden_size: 8,
            vocab_size: 16,
            context_length: 64,
            eos_token_ids: vec![0],
        }
    }

    /// The committed fixture's flat image processor settings.
    fn fixture_flat() -> serde_json::Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-granite-vision/preprocessor_config.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// Flat only, nested only (as transformers 5 saves it: 448-pixel tiles, other mean and filter),
    /// both (the nested entry wins whole), neither (the first key is named with both files).
    #[test]
    fn reads_either_layout_with_transformers_precedence() {
        use crate::models::processor_config::{PREPROCESSOR_CONFIG, PROCESSOR_CONFIG};
        use serde_json::json;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, v: &serde_json::Value| {
            std::fs::write(dir.path().join(name), v.to_string()).unwrap()
        };
        let cfg384 = tiny_cfg(384, 27, real_pinpoints());
        let load = |cfg: &GraniteVisionConfig| {
            GraniteVisionMedia::new(dir.path(), cfg, MediaLimits::default())
                .map(|m| m.processing().clone())
        };
        let e = load(&cfg384).err().unwrap().to_string();
        assert!(
            e.contains("\"size\"")
                && e.contains(PREPROCESSOR_CONFIG)
                && e.contains("processor_config.json \"image_processor\""),
            "{e}"
        );
        write(PREPROCESSOR_CONFIG, &fixture_flat());
        let p = load(&cfg384).unwrap();
        assert_eq!(
            (p.patch, p.filter, p.normalize),
            (384, Filter::Bicubic, Some(([0.5; 3], [0.5; 3])))
        );

        let pins448 = vec![(448, 448), (448, 896), (896, 448)];
        let nested = json!({
            "crop_size": {"height": 448, "width": 448}, "do_center_crop": true, "do_convert_rgb": true,
            "do_normalize": true, "do_pad": true, "do_rescale": true, "do_resize": true,
            "image_grid_pinpoints": [[448, 448], [448, 896], [896, 448]],
            "image_mean": [0.1, 0.2, 0.3], "image_processor_type": "LlavaNextImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 2,
            "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 448}
        });
        write(
            PROCESSOR_CONFIG,
            &json!({"patch_size": 16, "image_processor": nested}),
        );
        let cfg448 = tiny_cfg(448, 28, pins448.clone());
        let p = load(&cfg448).unwrap();
        assert_eq!(
            (p.patch, p.base, p.filter),
            (448, (448, 448), Filter::Bilinear)
        );
        assert_eq!(p.pinpoints, pins448);
        assert_eq!(
            p.normalize,
            Some(([0.1, 0.2, 0.3], [0.268_629_54, 0.261_302_6, 0.275_777_1]))
        );
        // The flat file still there is not read, not even for a key the nested entry leaves out.
        let mut partial = nested.clone();
        partial.as_object_mut().unwrap().remove("resample");
        write(PROCESSOR_CONFIG, &json!({"image_processor": partial}));
        let e = load(&cfg448).err().unwrap().to_string();
        assert!(
            e.contains("\"resample\"")
                && e.contains("read from processor_config.json \"image_processor\""),
            "{e}"
        );
        // Nested only.
        std::fs::remove_file(dir.path().join(PREPROCESSOR_CONFIG)).unwrap();
        write(PROCESSOR_CONFIG, &json!({"image_processor": nested}));
        assert_eq!(load(&cfg448).unwrap().patch, 448);
        // The model's pinpoints and tile must be the processor's.
        assert!(load(&tiny_cfg(448, 28, vec![(448, 448)]))
            .err()
            .unwrap()
            .to_string()
            .contains("image_grid_pinpoints"));
        assert!(load(&tiny_cfg(384, 27, pins448)).is_err());
        // Resizing without padding is another tiling: refused, not ignored.
        let mut unpadded = nested.clone();
        unpadded["do_pad"] = json!(false);
        write(PROCESSOR_CONFIG, &json!({"image_processor": unpadded}));
        let e = load(&cfg448).err().unwrap().to_string();
        assert!(e.contains("\"do_pad\""), "{e}");
    }
}
