//! Media preprocessing against the reference processor's tensors on the goldens: `pixel_values` of
//! every golden image and `input_features` / `input_features_mask` of every golden clip.

mod common;

use common::{fixture_dir, goldens, root};
use onnx_chat::models::gemma3n::MediaDecoder;

fn decoder() -> MediaDecoder {
    MediaDecoder::new(&fixture_dir(), Default::default()).unwrap()
}

/// The golden pixel values are stored as an 8-bit PNG: value = png / 255.
fn golden_pixels(path: &std::path::Path) -> Vec<f32> {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0f32; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * w * h + i] = (p.0[c] as f64 / 255.0) as f32;
        }
    }
    out
}

#[test]
fn pixel_values_match_the_reference_processor() {
    let d = decoder();
    let mut report = Vec::new();
    for g in goldens() {
        let media = g.expected["media"].as_array().unwrap();
        for (n, m) in media.iter().filter(|m| m["kind"] == "image").enumerate() {
            let bytes = std::fs::read(
                root()
                    .join("tests/fixtures")
                    .join(m["file"].as_str().unwrap()),
            )
            .unwrap();
            let got = d.image_bytes(n, &bytes).unwrap();
            let want = golden_pixels(&g.dir.join(m["pixel_values"].as_str().unwrap()));
            assert_eq!(got.shape, [3, 768, 768]);
            let max = got
                .pixel_values
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let differing = got
                .pixel_values
                .iter()
                .zip(&want)
                .filter(|(a, b)| a != b)
                .count();
            report.push(format!(
                "{} {}: max |Δ| {max:.2e}, {differing} values differ",
                g.name, m["file"]
            ));
            eprintln!("{}", report.last().unwrap());
            // Decoding (libjpeg for JPEG) and Pillow's resize are reproduced bit for bit: tolerance 0.
            assert_eq!(differing, 0, "{}", report.last().unwrap());
        }
    }
    assert!(!report.is_empty());
}

/// A minimal `.npy` reader for the goldens: little-endian f32 or bool, C order.
fn npy(path: &std::path::Path) -> (Vec<usize>, Vec<u8>, String) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY");
    let (hlen, start) = if b[6] == 1 {
        (u16::from_le_bytes([b[8], b[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
    };
    let header = std::str::from_utf8(&b[start..start + hlen])
        .unwrap()
        .to_string();
    let descr = header
        .split("'descr':")
        .nth(1)
        .unwrap()
        .split('\'')
        .nth(1)
        .unwrap()
        .to_string();
    let shape_txt = header.split("'shape':").nth(1).unwrap();
    let shape_txt = &shape_txt[shape_txt.find('(').unwrap() + 1..shape_txt.find(')').unwrap()];
    let shape = shape_txt
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    (shape, b[start + hlen..].to_vec(), descr)
}

#[test]
fn audio_features_match_the_reference_extractor() {
    let d = decoder();
    let mut clips = 0;
    for g in goldens() {
        let media = g.expected["media"].as_array().unwrap();
        for (n, m) in media.iter().filter(|m| m["kind"] == "audio").enumerate() {
            let bytes = std::fs::read(
                root()
                    .join("tests/fixtures")
                    .join(m["file"].as_str().unwrap()),
            )
            .unwrap();
            let got = d.audio_bytes(n, &bytes, m["format"].as_str()).unwrap();
            let (shape, data, descr) = npy(&g.dir.join(m["input_features"].as_str().unwrap()));
            assert_eq!(descr, "<f4");
            assert_eq!(shape, vec![got.frames, got.mel_bins]);
            let want: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let max = got
                .features
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!(
                "{} {}: {} frames, max |Δ| {max:.2e}",
                g.name, m["file"], got.frames
            );
            // Stated tolerance for log-mel features: 1e-5 (measured: 9.5e-7).
            assert!(max <= 1e-5, "{max}");
            let (_, mask, descr) = npy(&g.dir.join(m["input_features_mask"].as_str().unwrap()));
            assert_eq!(descr, "|b1");
            assert_eq!(got.mask, mask.iter().map(|&b| b != 0).collect::<Vec<_>>());
            clips += 1;
        }
    }
    assert_eq!(clips, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_media_reuse_the_encoder_cache() {
    use onnx_chat::models::loaded::{LoadOptions, LoadedModel};
    use std::sync::atomic::Ordering;
    common::init_ort();
    let mut opts = LoadOptions::default();
    opts.session.intra_threads = 1;
    // Without the prefix cache: with it, the second round reuses the whole prompt's KV and needs no
    // encoder at all (tests/prefix_cache.rs).
    opts.kv_cache_bytes = 0;
    let m =
        std::sync::Arc::new(LoadedModel::load(&common::resolve_fixture("FP32"), &opts).unwrap());
    let stats = m.cache_stats.clone();
    let s = common::Server::start(vec![m]).await;
    let g = goldens()
        .into_iter()
        .find(|g| g.name == "image_audio")
        .unwrap();
    let (ids, text, _) = g.generated("FP32").unwrap();
    for round in 0..2 {
        let (status, r) = s.chat(&g.request).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["choices"][0]["message"]["content"], text, "round {round}");
        assert_eq!(r["usage"]["completion_tokens"], ids.len());
    }
    // First round: image and clip miss; second round: both hit and give the same answer.
    assert_eq!(stats.misses.load(Ordering::Relaxed), 2);
    assert_eq!(stats.hits.load(Ordering::Relaxed), 2);
    s.shutdown().await;
}

#[test]
fn every_image_decodes_exactly_like_pillow() {
    use sha2::{Digest, Sha256};
    let manifest = common::read_json(&root().join("tests/fixtures/media/manifest.json"));
    let limits = onnx_chat::pipeline::image::ImageLimits::default();
    let mut n = 0;
    for (name, info) in manifest["files"].as_object().unwrap() {
        let Some(want) = info["rgb_sha256"].as_str() else {
            continue;
        };
        let bytes = std::fs::read(root().join("tests/fixtures/media").join(name)).unwrap();
        let rgb = onnx_chat::pipeline::image::decode_rgb(&bytes, &limits)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            (rgb.width() as u64, rgb.height() as u64),
            (
                info["width"].as_u64().unwrap(),
                info["height"].as_u64().unwrap()
            )
        );
        let got: String = Sha256::digest(rgb.as_raw())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            got, want,
            "{name} ({}) decodes differently from Pillow's convert(\"RGB\")",
            info["mode"]
        );
        n += 1;
    }
    // PNG, JPEG (baseline, progressive, grayscale, CMYK), WebP, GIF, BMP, RGBA PNG.
    assert_eq!(n, 9);
}
