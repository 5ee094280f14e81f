//! SmolVLM image preprocessing: the Idefics3 image processor (transformers' `Idefics3ImageProcessorPil`)
//! wired from the generic stages of [`crate::pipeline::image`] with the model's image processor settings
//! (model_interface.md §2.4; where they are read from: [`crate::models::processor_config`]).
//!
//! 1. Resize so the longest edge is `size.longest_edge` (aspect kept, the other side rounded up to even,
//!    capped at 4096).
//! 2. With `do_image_splitting`: resize up to multiples of the tile (`max_image_size.longest_edge`), crop
//!    the tiles row-major, and append the whole image resized to one tile as the last ("global") frame;
//!    an image of exactly one tile is not split. Without: resize to one tile, one frame.
//! 3. Rescale, normalise, channel-first.
//!
//! Every resize is Pillow's (LANCZOS by default) on 8-bit pixels, one after the other, as the reference
//! does. Padding frames to a common size happens where frames of several images are batched
//! ([`super::model`]); within one image every frame has the same size.

use std::path::Path;

use ::image::RgbImage;

use crate::error::ClassifiedError;
use crate::models::encoder_cache::media_key;
use crate::models::media::{decode_image, media_bytes, MediaLimits};
use crate::models::processor_config::{Part, ProcessorFiles, Settings};
use crate::models::{ImageInput, ModelError};
use crate::pipeline::image::{self, Filter};
use crate::protocol::MediaSource;

/// transformers' `MAX_IMAGE_SIZE`: no side exceeds this after the first resize.
const MAX_IMAGE_SIZE: u32 = 4096;

/// Step 1's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResizeTo {
    LongestEdge(u32),
    Exact { width: u32, height: u32 },
}

/// The image-processor settings of an Idefics3 / SmolVLM snapshot.
#[derive(Debug, Clone)]
pub struct SplitProcessing {
    resize: Option<ResizeTo>,
    filter: Filter,
    split: bool,
    /// Tile side (`max_image_size.longest_edge`).
    pub tile: u32,
    rescale: Option<f64>,
    normalize: Option<([f32; 3], [f32; 3])>,
}

/// One preprocessed image and how the prompt expands it.
#[derive(Debug, Clone)]
pub struct SplitImage {
    pub input: ImageInput,
    /// Tile rows and columns; both 0 when the image is one frame (not split).
    pub rows: usize,
    pub cols: usize,
}

impl SplitProcessing {
    /// Reads `Idefics3ImageProcessor`'s settings, each required (`size` and `max_image_size` only
    /// where the switch that uses them is on).
    pub fn from_settings(s: &Settings) -> Result<Self, ModelError> {
        let resize = if s.flag("do_resize")? {
            let size = s.size("size")?;
            Some(match (size.longest_edge, size.height, size.width) {
                (Some(l), _, _) => ResizeTo::LongestEdge(l),
                (None, Some(height), Some(width)) => ResizeTo::Exact { width, height },
                _ => return Err(s.invalid("size", "expected longest_edge, or height and width")),
            })
        } else {
            None
        };
        // Frames are one tile when not split, so the tile side is needed either way.
        let tile = s
            .size("max_image_size")?
            .longest_edge
            .ok_or_else(|| s.invalid("max_image_size", "expected longest_edge"))?;
        Ok(Self {
            resize,
            filter: s.resample()?,
            split: s.flag("do_image_splitting")?,
            tile,
            rescale: s.rescale()?,
            normalize: s.normalize()?,
        })
    }

    /// Tile rows and columns of an image of this size (0 × 0: one frame), without touching pixels.
    pub fn layout(&self, width: u32, height: u32) -> (usize, usize) {
        let (w, h) = match self.resize {
            None => (width, height),
            Some(ResizeTo::LongestEdge(l)) => longest_edge_size(width, height, l),
            Some(ResizeTo::Exact { width, height }) => (width, height),
        };
        let t = self.tile;
        if !self.split {
            return (0, 0);
        }
        let (w, h) = tile_multiple_size(w, h, t);
        if h <= t && w <= t {
            (0, 0)
        } else {
            ((h / t) as usize, (w / t) as usize)
        }
    }

    /// The image's frames (8-bit, before rescaling) and its tile rows and columns.
    pub fn frames(&self, img: &RgbImage) -> (Vec<RgbImage>, usize, usize) {
        let mut img = match self.resize {
            None => img.clone(),
            Some(to) => {
                let (w, h) = match to {
                    ResizeTo::LongestEdge(l) => longest_edge_size(img.width(), img.height(), l),
                    ResizeTo::Exact { width, height } => (width, height),
                };
                image::resize(img, w, h, self.filter)
            }
        };
        let t = self.tile;
        if !self.split {
            return (vec![image::resize(&img, t, t, self.filter)], 0, 0);
        }
        let (w, h) = tile_multiple_size(img.width(), img.height(), t);
        img = image::resize(&img, w, h, self.filter);
        if h <= t && w <= t {
            return (vec![img], 0, 0);
        }
        // Whole tiles only (after the resize above the sides are multiples of the tile).
        let (rows, cols) = ((h / t) as usize, (w / t) as usize);
        let mut frames = Vec::with_capacity(rows * cols + 1);
        for r in 0..rows as u32 {
            for c in 0..cols as u32 {
                frames.push(::image::imageops::crop_imm(&img, c * t, r * t, t, t).to_image());
            }
        }
        frames.push(image::resize(&img, t, t, self.filter));
        (frames, rows, cols)
    }

    /// Frames, rescaled and normalised, channel-first, one after the other.
    pub fn process(&self, img: &RgbImage) -> (Vec<f32>, usize, [usize; 3], usize, usize) {
        let (frames, rows, cols) = self.frames(img);
        let (w, h) = frames
            .first()
            .map(|f| (f.width() as usize, f.height() as usize))
            .unwrap_or((0, 0));
        let mut pixels = Vec::with_capacity(frames.len() * 3 * w * h);
        for f in &frames {
            pixels.extend(image::to_chw(
                f,
                self.rescale.unwrap_or(1.0),
                self.normalize,
            ));
        }
        (pixels, frames.len(), [3, h, w], rows, cols)
    }
}

/// transformers' `_resize_output_size_rescale_to_max_len` then `_scale_below_upper_bound(4096)`, as
/// (width, height): the longest side becomes `max_len`, the other keeps the aspect ratio (truncated, then
/// rounded up to even). Computed in f64 like Python.
pub fn longest_edge_size(width: u32, height: u32, max_len: u32) -> (u32, u32) {
    let (w0, h0) = (width.max(1) as f64, height.max(1) as f64);
    let aspect = w0 / h0;
    let (mut w, mut h);
    if w0 >= h0 {
        w = max_len as f64;
        h = (w / aspect).trunc();
        if h % 2.0 != 0.0 {
            h += 1.0;
        }
    } else {
        h = max_len as f64;
        w = (h * aspect).trunc();
        if w % 2.0 != 0.0 {
            w += 1.0;
        }
    }
    h = h.max(1.0);
    w = w.max(1.0);
    let aspect = w / h;
    let cap = MAX_IMAGE_SIZE as f64;
    if w >= h && w > cap {
        w = cap;
        h = (w / aspect).trunc();
    } else if h > w && h > cap {
        h = cap;
        w = (h * aspect).trunc();
    }
    (w.max(1.0) as u32, h.max(1.0) as u32)
}

/// transformers' `resize_for_vision_encoder`: the longer side up to a multiple of `tile`, the other from the
/// aspect ratio, then up to a multiple of `tile` too.
pub fn tile_multiple_size(width: u32, height: u32, tile: u32) -> (u32, u32) {
    let (w0, h0, t) = (
        width.max(1) as f64,
        height.max(1) as f64,
        tile.max(1) as f64,
    );
    let aspect = w0 / h0;
    let (w, h) = if w0 >= h0 {
        let w = (w0 / t).ceil() * t;
        let h = (w / aspect).trunc();
        (w, (h / t).ceil() * t)
    } else {
        let h = (h0 / t).ceil() * t;
        let w = (h * aspect).trunc();
        ((w / t).ceil() * t, h)
    };
    // A side that truncates to 0 would make the reference fail; one tile is the closest valid size.
    (w.max(t) as u32, h.max(t) as u32)
}

/// Turns job images into encoder inputs and their tile layouts.
pub struct SmolVlmMedia {
    processing: SplitProcessing,
    limits: MediaLimits,
}

impl SmolVlmMedia {
    /// The image processor's settings of snapshot `dir`, found where transformers looks
    /// ([`ProcessorFiles`]: `processor_config.json` `image_processor`, else `preprocessor_config.json`).
    pub fn new(dir: &Path, limits: MediaLimits) -> Result<Self, ModelError> {
        let settings = ProcessorFiles::load(dir)?.part(Part::ImageProcessor)?;
        Ok(Self {
            processing: SplitProcessing::from_settings(&settings)?,
            limits,
        })
    }

    pub fn processing(&self) -> &SplitProcessing {
        &self.processing
    }

    /// The tile layout of image number `index` (decoded, not resized).
    pub fn layout(
        &self,
        index: usize,
        source: &MediaSource,
    ) -> Result<(usize, usize), ClassifiedError> {
        let bytes = media_bytes("image", index, source, self.limits.image.max_bytes)?;
        let rgb = decode_image(index, &bytes, &self.limits.image)?;
        Ok(self.processing.layout(rgb.width(), rgb.height()))
    }

    /// Decodes and preprocesses image number `index` of the request.
    pub fn image(&self, index: usize, source: &MediaSource) -> Result<SplitImage, ClassifiedError> {
        let bytes = media_bytes("image", index, source, self.limits.image.max_bytes)?;
        self.image_bytes(index, &bytes)
    }

    pub fn image_bytes(&self, index: usize, bytes: &[u8]) -> Result<SplitImage, ClassifiedError> {
        let rgb = decode_image(index, bytes, &self.limits.image)?;
        let (pixel_values, frames, shape, rows, cols) = self.processing.process(&rgb);
        Ok(SplitImage {
            input: ImageInput {
                key: media_key("image", bytes),
                pixel_values,
                frames,
                shape,
                size: [rgb.height() as usize, rgb.width() as usize],
                patches: None,
            },
            rows,
            cols,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn sizes_follow_the_reference_arithmetic() {
        // Values from transformers' Idefics3 helpers (Python floats, int() truncation).
        assert_eq!(longest_edge_size(96, 64, 2048), (2048, 1366)); // 1365.33 -> 1365 -> even
        assert_eq!(longest_edge_size(60, 100, 2048), (1228, 2048)); // 1228.8 -> 1228
        assert_eq!(longest_edge_size(2500, 1000, 2048), (2048, 820)); // 819.2 -> 819 -> 820
        assert_eq!(longest_edge_size(80, 80, 2048), (2048, 2048));
        assert_eq!(longest_edge_size(1, 5000, 2048), (1, 2048)); // 0 -> max(0, 1)
        assert_eq!(longest_edge_size(100, 10, 8192), (4096, 410)); // capped at 4096
        assert_eq!(tile_multiple_size(2048, 1366, 512), (2048, 1536));
        assert_eq!(tile_multiple_size(1228, 2048, 512), (1536, 2048));
        assert_eq!(tile_multiple_size(2048, 820, 512), (2048, 1024));
        assert_eq!(tile_multiple_size(1, 2048, 512), (512, 2048));
        assert_eq!(tile_multiple_size(512, 512, 512), (512, 512));
    }

    /// The committed fixture's image processor settings with `patch` applied.
    fn settings(patch: Value) -> Settings {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-smolvlm/preprocessor_config.json");
        let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        for (k, x) in patch.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        Settings::flat_for_test(Part::ImageProcessor, v)
    }

    fn processing(split: bool) -> SplitProcessing {
        SplitProcessing::from_settings(&settings(serde_json::json!({
            "do_image_splitting": split, "size": {"longest_edge": 96}, "max_image_size": {"longest_edge": 32},
        })))
        .unwrap()
    }

    #[test]
    fn tiles_row_major_then_the_global_frame() {
        let img = RgbImage::from_fn(30, 20, |x, y| {
            ::image::Rgb([(x * 8) as u8, (y * 12) as u8, 7])
        });
        // 30x20 -> 96x64 -> multiples of 32: 96x64 -> 2 rows x 3 cols + global
        let (frames, rows, cols) = processing(true).frames(&img);
        assert_eq!((rows, cols, frames.len()), (2, 3, 7));
        let big = image::resize(
            &image::resize(&img, 96, 64, Filter::Lanczos),
            96,
            64,
            Filter::Lanczos,
        );
        assert_eq!(
            frames[4],
            ::image::imageops::crop_imm(&big, 32, 32, 32, 32).to_image()
        );
        assert_eq!(frames[6], image::resize(&big, 32, 32, Filter::Lanczos));
        assert_eq!(processing(true).layout(30, 20), (2, 3));
        assert_eq!(processing(true).layout(8, 8), (3, 3));
        assert_eq!(processing(false).layout(30, 20), (0, 0));
        let (pixels, n, shape, r, c) = processing(false).process(&img);
        assert_eq!((n, shape, r, c), (1, [3, 32, 32], 0, 0));
        assert_eq!(pixels.len(), 3 * 32 * 32);
        assert!(pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn config_errors_are_reported() {
        let bad = |v: Value| {
            SplitProcessing::from_settings(&settings(v))
                .unwrap_err()
                .to_string()
        };
        assert!(bad(serde_json::json!({"resample": 9})).contains("resample"));
        assert!(bad(serde_json::json!({"size": {"shortest_edge": 3}})).contains("longest_edge"));
        assert!(bad(serde_json::json!({"max_image_size": {}})).contains("max_image_size"));
        assert!(bad(serde_json::json!({"image_std": [0.5, 0, 0.5]})).contains("image_std"));
        assert!(bad(serde_json::json!({"image_mean": "x"})).contains("image_mean"));
        // Settings in neither file: the key and both files are named.
        for key in [
            "do_resize",
            "size",
            "max_image_size",
            "resample",
            "do_image_splitting",
            "rescale_factor",
        ] {
            let mut unset = serde_json::Map::new();
            unset.insert(key.to_string(), Value::Null);
            let e = bad(Value::Object(unset));
            assert!(
                e.contains(&format!("\"{key}\""))
                    && e.contains("preprocessor_config.json")
                    && e.contains("processor_config.json \"image_processor\""),
                "{e}"
            );
        }
        // A switch that is off does not need its values.
        let p = SplitProcessing::from_settings(&settings(serde_json::json!({
            "do_normalize": false, "image_mean": null, "image_std": null,
            "do_resize": false, "size": null,
        })))
        .unwrap();
        assert_eq!((p.normalize, p.resize), (None, None));
    }

    /// Flat only, nested only, both (nested wins): the snapshot loader.
    #[test]
    fn reads_either_layout() {
        use crate::models::processor_config::{PREPROCESSOR_CONFIG, PROCESSOR_CONFIG};
        let dir = tempfile::tempdir().unwrap();
        let fixture = settings(serde_json::json!({})).to_value();
        let write =
            |name: &str, v: &Value| std::fs::write(dir.path().join(name), v.to_string()).unwrap();
        let tile = |dir: &std::path::Path| {
            SmolVlmMedia::new(dir, MediaLimits::default()).map(|m| m.processing().tile)
        };
        let e = tile(dir.path()).unwrap_err().to_string();
        assert!(e.contains("\"do_resize\""), "{e}");
        write(PREPROCESSOR_CONFIG, &fixture);
        assert_eq!(tile(dir.path()).unwrap(), 512);
        let mut nested = fixture.clone();
        nested["max_image_size"] = serde_json::json!({"longest_edge": 384});
        write(
            PROCESSOR_CONFIG,
            &serde_json::json!({"image_seq_len": 64, "image_processor": nested}),
        );
        assert_eq!(tile(dir.path()).unwrap(), 384);
        std::fs::remove_file(dir.path().join(PREPROCESSOR_CONFIG)).unwrap();
        assert_eq!(tile(dir.path()).unwrap(), 384);
    }
}
