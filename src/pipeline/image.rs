//! Image decoding and the pixel transforms of Hugging Face image processors, bit-exact with Pillow.
//!
//! Media code knows nothing about models: callers pass sizes, filters and scales read from a model's
//! `preprocessor_config.json`. Decoding checks the byte cap, then the pixel cap from the header before
//! any pixel is decoded (decompression bombs), then converts to RGB the way PIL's `convert("RGB")`
//! does: alpha is dropped, not composited, and grey is replicated.
//!
//! Resizing reimplements Pillow's 8-bit separable convolution (`Resample.c`): the same kernel support
//! scaled by the downscale factor, coefficients normalised per output pixel and rounded to 22-bit fixed
//! point, horizontal pass then vertical pass, round-half-up and clip to 8 bits. The tiny test models
//! flip tokens on one-level pixel differences, so "close" is not enough.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};

#[derive(Debug, Clone)]
pub struct ImageLimits {
    /// Largest encoded image accepted, in bytes.
    pub max_bytes: usize,
    /// Largest decoded image accepted, in pixels (width × height), checked from the header.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1024 * 1024,
            max_pixels: 40_000_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image is {bytes} bytes; the limit is {max} bytes")]
    TooLarge { bytes: usize, max: usize },
    #[error("the image is {width}x{height} pixels; the limit is {max} pixels")]
    TooManyPixels { width: u32, height: u32, max: u64 },
    #[error("unsupported image format ({0}); supported: PNG, JPEG, WebP, GIF, BMP")]
    Unsupported(String),
    #[error("the image could not be decoded: {0}")]
    Corrupt(String),
}

/// Resampling filters of Pillow (`PIL.Image.Resampling`), by the numbers HF configs store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// 2
    Bilinear,
    /// 3
    Bicubic,
    /// 1
    Lanczos,
}

impl Filter {
    pub fn from_pil(code: u64) -> Option<Self> {
        match code {
            1 => Some(Self::Lanczos),
            2 => Some(Self::Bilinear),
            3 => Some(Self::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if x < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Decodes PNG, JPEG, WebP, GIF (first frame) or BMP to 8-bit RGB.
pub fn decode_rgb(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, ImageError> {
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooLarge {
            bytes: bytes.len(),
            max: limits.max_bytes,
        });
    }
    let format = image::guess_format(bytes)
        .map_err(|_| ImageError::Unsupported("unrecognised bytes".into()))?;
    if !matches!(
        format,
        ImageFormat::Png
            | ImageFormat::Jpeg
            | ImageFormat::WebP
            | ImageFormat::Gif
            | ImageFormat::Bmp
    ) {
        return Err(ImageError::Unsupported(format!("{format:?}")));
    }
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt("the image has no pixels".into()));
    }
    if width as u64 * height as u64 > limits.max_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            max: limits.max_pixels,
        });
    }
    if format == ImageFormat::Jpeg {
        return decode_jpeg(bytes);
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut l = image::Limits::default();
    l.max_image_width = Some(width);
    l.max_image_height = Some(height);
    // Room for the largest decode buffer (16-bit RGBA) of an image within the pixel cap.
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(l);
    let img = reader
        .decode()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    Ok(to_rgb_like_pil(img))
}

/// JPEG through libjpeg (the mozjpeg build of libjpeg-turbo, whose decoder Pillow also uses): the same
/// integer IDCT, upsampling and colour conversion, so pixels are bit-identical to Pillow's. CMYK
/// images are converted with Pillow's formula, Adobe-inverted ones first un-inverted as Pillow does.
/// libjpeg reports corrupt data by unwinding; that is caught and returned as an error.
fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    let inverted = has_adobe_marker(bytes);
    let result = std::panic::catch_unwind(|| -> std::io::Result<RgbImage> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        let (w, h) = (d.width() as u32, d.height() as u32);
        let rgb: Vec<u8> = match d.image()? {
            mozjpeg::decompress::Format::RGB(mut img) => {
                let px = img.read_scanlines::<u8>()?;
                img.finish()?;
                px
            }
            mozjpeg::decompress::Format::Gray(mut img) => {
                let px = img.read_scanlines::<u8>()?;
                img.finish()?;
                px.iter().flat_map(|&g| [g, g, g]).collect()
            }
            mozjpeg::decompress::Format::CMYK(mut img) => {
                let px = img.read_scanlines::<u8>()?;
                img.finish()?;
                px.chunks_exact(4)
                    .flat_map(|c| {
                        let c = if inverted {
                            [255 - c[0], 255 - c[1], 255 - c[2], 255 - c[3]]
                        } else {
                            [c[0], c[1], c[2], c[3]]
                        };
                        cmyk_to_rgb(c)
                    })
                    .collect()
            }
        };
        RgbImage::from_raw(w, h, rgb).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "truncated pixel data")
        })
    });
    match result {
        Ok(Ok(img)) => Ok(img),
        Ok(Err(e)) => Err(ImageError::Corrupt(e.to_string())),
        Err(p) => Err(ImageError::Corrupt(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "invalid JPEG data".into()),
        )),
    }
}

/// Pillow's `cmyk2rgb`: `255 − k` scaled by each ink, with its rounding.
fn cmyk_to_rgb(c: [u8; 4]) -> [u8; 3] {
    let nk = 255 - c[3] as i32;
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let ch = |x: u8| (nk - muldiv255(x as i32, nk)).clamp(0, 255) as u8;
    [ch(c[0]), ch(c[1]), ch(c[2])]
}

/// Whether the JPEG has an Adobe APP14 segment (its CMYK data are stored inverted).
fn has_adobe_marker(bytes: &[u8]) -> bool {
    let mut i = 2;
    while i + 4 <= bytes.len() && bytes[i] == 0xFF {
        let marker = bytes[i + 1];
        if marker == 0xDA || marker == 0xD9 {
            break; // start of scan: no more header segments
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        if marker == 0xEE && bytes.get(i + 4..i + 9) == Some(b"Adobe".as_slice()) {
            return true;
        }
        i += 2 + len;
    }
    false
}

/// transformers' `convert_to_rgb`: an image with an alpha channel (or a transparency key, which the
/// decoders expand to alpha) is composited onto white with Pillow's `alpha_composite` arithmetic;
/// anything else is converted as Pillow's `convert("RGB")` does (grey replicated, 16-bit scaled).
fn to_rgb_like_pil(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(i) => i,
        other if other.color().has_alpha() => {
            let rgba = other.to_rgba8();
            let (w, h) = rgba.dimensions();
            let mut out = Vec::with_capacity((w * h * 3) as usize);
            for p in rgba.pixels() {
                let [r, g, b, a] = p.0;
                out.extend_from_slice(&[over_white(r, a), over_white(g, a), over_white(b, a)]);
            }
            RgbImage::from_raw(w, h, out).expect("buffer size matches")
        }
        other => other.to_rgb8(),
    }
}

/// One channel of Pillow's `ImagingAlphaComposite` with an opaque white destination: 7 extra bits of
/// precision, divisions by 255 done as `((x >> 8) + x) >> 8` with rounding.
fn over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    const PRECISION_BITS: u32 = 7;
    let (c, a) = (c as u32, a as u32);
    // With an opaque destination `outa255` is 255·255, so coef1 = a·2^7 exactly.
    let coef1 = a << PRECISION_BITS;
    let coef2 = (255 << PRECISION_BITS) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    (((tmp >> 8) + tmp) >> 8 >> PRECISION_BITS) as u8
}

/// Per output pixel: first input index, and fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    /// Fixed-point weights: 32-bit like Pillow's 8-bit path, so sums vectorize as 32-bit lanes.
    weights: Vec<i32>,
    ksize: usize,
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `in_size` → `out_size`.
fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; the operands here are >= -0.5 so that equals floor for xmin >= 0.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(n) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = v * (1u64 << PRECISION_BITS) as f64 + if v < 0.0 { -0.5 } else { 0.5 };
            weights[xx * ksize + x] = fixed as i32;
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        bounds,
        weights,
        ksize,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The horizontal pass: `src` (`w0` × `h` RGB) to `w1` columns.
fn resample_horizontal(src: &[u8], w0: usize, h: usize, w1: usize, filter: Filter) -> Vec<u8> {
    // Pillow accumulates in 32-bit ints (255 × Σ|w| × 2^22 stays below 2^31 for its filters); wrapping
    // adds keep its arithmetic for any input rather than panic.
    let rounding = 1i32 << (PRECISION_BITS - 1);
    let c = coeffs(w0, w1, filter);
    let mut out = vec![0u8; w1 * h * 3];
    for y in 0..h {
        let row = &src[y * w0 * 3..(y + 1) * w0 * 3];
        for xx in 0..w1 {
            let (xmin, n) = c.bounds[xx];
            let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
            let mut acc = [rounding; 3];
            for (i, &kw) in k.iter().enumerate() {
                let p = (xmin + i) * 3;
                acc[0] = acc[0].wrapping_add((row[p] as i32).wrapping_mul(kw));
                acc[1] = acc[1].wrapping_add((row[p + 1] as i32).wrapping_mul(kw));
                acc[2] = acc[2].wrapping_add((row[p + 2] as i32).wrapping_mul(kw));
            }
            let o = (y * w1 + xx) * 3;
            out[o] = clip8(acc[0]);
            out[o + 1] = clip8(acc[1]);
            out[o + 2] = clip8(acc[2]);
        }
    }
    out
}

/// The vertical pass: `src` (`w` × `h0` RGB) to `h1` rows.
fn resample_vertical(src: &[u8], w: usize, h0: usize, h1: usize, filter: Filter) -> Vec<u8> {
    let rounding = 1i32 << (PRECISION_BITS - 1);
    let c = coeffs(h0, h1, filter);
    let stride = w * 3;
    let mut out = vec![0u8; stride * h1];
    // Row by row (whole input rows times one weight each): the same integer sums as Pillow's per-pixel
    // loop, in an order that reads memory contiguously.
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, n) = c.bounds[yy];
        let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
        acc.fill(rounding);
        for (row, &kw) in src[ymin * stride..].chunks_exact(stride).zip(k) {
            for (a, &p) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add((p as i32).wrapping_mul(kw));
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Whether Pillow (since 11.1) runs the vertical pass first: when the height shrinks by more than
/// twice what the width shrinks by. The two orders round the intermediate image differently.
fn vertical_first(w0: usize, h0: usize, w1: usize, h1: usize) -> bool {
    let dh = h0 as i64 - h1 as i64;
    dh > 0 && dh > (w0 as i64 - w1 as i64) * 2
}

/// Resizes like Pillow's `Image.resize((width, height), resample=filter)` on an RGB image (Pillow
/// 13: two separable passes, skipped where a side keeps its size, in [`vertical_first`]'s order).
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let (w1, h1) = (width as usize, height as usize);
    if w1 == 0 || h1 == 0 {
        return RgbImage::new(width, height);
    }
    let src = img.as_raw();
    let out = match (w1 != w0, h1 != h0) {
        (false, false) => src.to_vec(),
        (true, false) => resample_horizontal(src, w0, h0, w1, filter),
        (false, true) => resample_vertical(src, w0, h0, h1, filter),
        (true, true) if vertical_first(w0, h0, w1, h1) => {
            let v = resample_vertical(src, w0, h0, h1, filter);
            resample_horizontal(&v, w0, h1, w1, filter)
        }
        (true, true) => {
            let h = resample_horizontal(src, w0, h0, w1, filter);
            resample_vertical(&h, w1, h0, h1, filter)
        }
    };
    RgbImage::from_raw(width, height, out).expect("buffer size matches")
}

/// Channel-first float32 pixels: `x · rescale` computed in f64 as numpy does, then
/// `(x − mean) / std` in f32 when normalisation is on.
pub fn to_chw(img: &RgbImage, rescale: f64, normalize: Option<([f32; 3], [f32; 3])>) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    let mut out = vec![0f32; 3 * w * h];
    for c in 0..3 {
        let plane = &mut out[c * w * h..(c + 1) * w * h];
        for (i, v) in plane.iter_mut().enumerate() {
            let x = (raw[i * 3 + c] as f64 * rescale) as f32;
            *v = match normalize {
                Some((mean, std)) => (x - mean[c]) / std[c],
                None => x,
            };
        }
    }
    out
}

/// The image as a sequence of `patch × patch` squares (SigLIP2 / Gemma 4 "patchify"): the squares in
/// row-major grid order, each square's values in (row, column, channel) order, `x · rescale` (in f64 as
/// numpy does) then `(x − mean) / std` when normalisation is on, followed by zero rows up to
/// `max_rows` rows. Returns the values and each row's `(x, y)` grid position, `(−1, −1)` for the
/// padding rows. The image's sides must be multiples of `patch` (the rest is cut off) and it must
/// have at most `max_rows` squares.
pub fn to_patches(
    img: &RgbImage,
    patch: usize,
    rescale: f64,
    normalize: Option<([f32; 3], [f32; 3])>,
    max_rows: usize,
) -> (Vec<f32>, Vec<[i64; 2]>) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (cols, rows) = (w / patch.max(1), h / patch.max(1));
    let dim = patch * patch * 3;
    let n = (rows * cols).min(max_rows);
    let raw = img.as_raw();
    let mut values = vec![0f32; max_rows * dim];
    let mut positions = vec![[-1i64, -1]; max_rows];
    for (k, (py, px)) in (0..rows)
        .flat_map(|y| (0..cols).map(move |x| (y, x)))
        .take(n)
        .enumerate()
    {
        positions[k] = [px as i64, py as i64];
        let out = &mut values[k * dim..(k + 1) * dim];
        for dy in 0..patch {
            let src = ((py * patch + dy) * w + px * patch) * 3;
            for (j, &v) in raw[src..src + patch * 3].iter().enumerate() {
                let x = (v as f64 * rescale) as f32;
                out[dy * patch * 3 + j] = match normalize {
                    Some((mean, std)) => (x - mean[j % 3]) / std[j % 3],
                    None => x,
                };
            }
        }
    }
    (values, positions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 255 / (w - 1)) as u8,
                (y * 255 / (h - 1)) as u8,
                ((x + y) % 256) as u8,
            ])
        })
    }

    #[test]
    fn patches_in_grid_order_then_padding() {
        let img = gradient(4, 6); // 2 x 3 squares of 2 x 2
        let (v, pos) = to_patches(&img, 2, 1.0, None, 8);
        assert_eq!(v.len(), 8 * 12);
        assert_eq!(
            pos,
            vec![
                [0, 0],
                [1, 0],
                [0, 1],
                [1, 1],
                [0, 2],
                [1, 2],
                [-1, -1],
                [-1, -1]
            ]
        );
        // Square (x 1, y 2): rows 4..6, columns 2..4, values (dy, dx, c).
        let px = |x: u32, y: u32| img.get_pixel(x, y).0.map(f32::from);
        let want: Vec<f32> = [px(2, 4), px(3, 4), px(2, 5), px(3, 5)].concat();
        assert_eq!(&v[5 * 12..6 * 12], &want[..]);
        assert!(v[6 * 12..].iter().all(|&x| x == 0.0));
        let (v, _) = to_patches(&img, 2, 0.5, Some(([1.0; 3], [2.0; 3])), 6);
        assert_eq!(v[0], (px(0, 0)[0] * 0.5 - 1.0) / 2.0);
    }

    #[test]
    fn identity_and_constant() {
        let img = gradient(17, 9);
        assert_eq!(resize(&img, 17, 9, Filter::Bilinear), img);
        let flat = RgbImage::from_pixel(13, 7, image::Rgb([200, 10, 77]));
        for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            let r = resize(&flat, 31, 5, f);
            assert!(r.pixels().all(|p| p.0 == [200, 10, 77]), "{f:?}");
        }
    }

    fn checksums(img: &RgbImage) -> (i64, i64) {
        let raw = img.as_raw();
        let sum = raw.iter().map(|&v| v as i64).sum();
        let weighted = raw.iter().enumerate().fold(0i64, |acc, (i, &v)| {
            (acc + (v as i64 * i as i64) % 1_000_000_007) % 1_000_000_007
        });
        (sum, weighted)
    }

    #[test]
    fn pillow_reference_values() {
        // Values from Pillow 13.0.0: Image.fromarray(gradient).resize(size, filter).
        let small = gradient(8, 4);
        for (f, first, last, sum) in [
            (Filter::Bilinear, [40, 0, 1], [214, 255, 9], 3898),
            (Filter::Bicubic, [32, 0, 1], [222, 255, 9], 3893),
            (Filter::Lanczos, [29, 0, 1], [225, 255, 9], 3893),
        ] {
            let r = resize(&small, 3, 5, f);
            assert_eq!(r.get_pixel(0, 0).0, first, "{f:?}");
            assert_eq!(r.get_pixel(2, 4).0, last, "{f:?}");
            assert_eq!(checksums(&r).0, sum, "{f:?}");
        }
        let big = gradient(640, 480);
        for (f, up, down) in [
            (
                Filter::Bilinear,
                (225394525, 467471110),
                (1414240, 758495353),
            ),
            (
                Filter::Bicubic,
                (225394592, 546260961),
                (1413584, 756811188),
            ),
            (
                Filter::Lanczos,
                (225394576, 667507670),
                (1414253, 759517498),
            ),
        ] {
            assert_eq!(checksums(&resize(&big, 768, 768, f)), up, "{f:?} up");
            assert_eq!(checksums(&resize(&big, 100, 37, f)), down, "{f:?} down");
        }
        // Taller than wide, shrinking in height and growing in width: Pillow runs the vertical pass
        // first (its rounding differs from horizontal-first in 491 / 2051 / 3613 values here).
        let tall = gradient(260, 640);
        assert!(vertical_first(260, 640, 384, 384));
        for (f, want) in [
            (Filter::Bilinear, (56226876, 664772541)),
            (Filter::Bicubic, (56227253, 737437300)),
            (Filter::Lanczos, (56227256, 740159026)),
        ] {
            assert_eq!(checksums(&resize(&tall, 384, 384, f)), want, "{f:?} tall");
        }
    }

    #[test]
    fn limits_are_checked_before_decoding() {
        let mut png = Vec::new();
        gradient(64, 64)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let small = ImageLimits {
            max_bytes: 10,
            max_pixels: 1 << 30,
        };
        assert!(matches!(
            decode_rgb(&png, &small),
            Err(ImageError::TooLarge { .. })
        ));
        let few = ImageLimits {
            max_bytes: 1 << 30,
            max_pixels: 100,
        };
        assert!(matches!(
            decode_rgb(&png, &few),
            Err(ImageError::TooManyPixels { .. })
        ));
        assert_eq!(
            decode_rgb(&png, &ImageLimits::default()).unwrap(),
            gradient(64, 64)
        );
        assert!(matches!(
            decode_rgb(b"hello", &ImageLimits::default()),
            Err(ImageError::Unsupported(_))
        ));
        assert!(decode_rgb(&png[..png.len() / 2], &ImageLimits::default()).is_err());
    }
}
