//! Media preprocessing against the reference processor's tensors on the goldens: `pixel_values` of
//! every golden image and `input_features` / `input_features_mask` of every golden clip; and the
//! log-mel front end with Gemma 4's options against transformers' `Gemma4AudioFeatureExtractor`.

mod common;

use common::{fixture_dir, goldens, npy, root};
use onnx_chat::models::gemma3n::MediaDecoder;
use onnx_chat::pipeline::audio::{self, MelConfig, MelExtractor};

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

/// The waveforms of `tools/fixtures/gemma4/mel_reference.py`: computed in f64, stored as f32.
fn reference_signal(signal: &str, n: usize) -> Vec<f32> {
    use std::f64::consts::PI;
    let t = |i: usize| i as f64 / 16000.0;
    match signal {
        "two_tone" => (0..n)
            .map(|i| {
                (0.5 * (2.0 * PI * 440.0 * t(i)).sin() + 0.25 * (2.0 * PI * 1234.5 * t(i)).sin())
                    as f32
            })
            .collect(),
        "chirp_noise" => (0..n)
            .map(|i| {
                let noise = ((i * 7919) % 1000) as f64 / 1000.0 - 0.5;
                (0.3 * (2.0 * PI * (200.0 * t(i) + 900.0 * t(i) * t(i))).sin() + 0.05 * noise)
                    as f32
            })
            .collect(),
        "wav" => {
            let bytes =
                std::fs::read(root().join("tests/fixtures/media/two_tone_16k_s16.wav")).unwrap();
            audio::decode(&bytes, Some("wav"), 30.0).unwrap().samples
        }
        other => panic!("unknown signal {other}"),
    }
}

/// The generic log-mel extractor with Gemma 4's options, configured as a family does it (its
/// defaults, then the `feature_extractor` object of the processor config), against transformers'
/// `Gemma4AudioFeatureExtractor` on the clips of `tools/fixtures/gemma4/mel_reference.py`
/// (tests/fixtures/audio_gemma4): the default extractor and one with pre-emphasis, per-bin
/// statistics, input scaling and 25 ms / 12.5 ms frames.
#[test]
fn gemma4_mel_matches_transformers() {
    let dir = root().join("tests/fixtures/audio_gemma4");
    let reference = common::read_json(&dir.join("reference.json"));
    let mut clips = 0;
    for (name, ext) in reference["extractors"].as_object().unwrap() {
        let fe = &ext["feature_extractor"];
        let cfg = MelConfig::from_preprocessor_config(fe, MelConfig::gemma4_extractor());
        let size = |key: &str| fe[key].as_u64().unwrap() as usize;
        assert_eq!(
            (
                cfg.frame_length,
                cfg.hop_length,
                cfg.fft_length,
                cfg.feature_size
            ),
            (
                size("frame_length"),
                size("hop_length"),
                size("fft_length"),
                size("feature_size")
            ),
            "{name}"
        );
        let bins = cfg.feature_size;
        let mel = MelExtractor::new(&cfg);
        for clip in ext["clips"].as_array().unwrap() {
            let label = format!("{name}/{}", clip["name"].as_str().unwrap());
            let n = clip["samples"].as_u64().unwrap() as usize;
            let samples = reference_signal(clip["signal"].as_str().unwrap(), n);
            assert_eq!(samples.len(), n, "{label}");
            let got = mel.extract(&samples);
            let want_mask: Vec<bool> = clip["mask"]
                .as_str()
                .unwrap()
                .chars()
                .map(|c| c == '1')
                .collect();
            assert_eq!(
                got.frames,
                clip["frames"].as_u64().unwrap() as usize,
                "{label}"
            );
            assert_eq!(got.mask, want_mask, "{label}");
            assert_eq!(cfg.frame_mask(n), want_mask, "{label}");
            let max_err = |got: &[f32], want: &[f32]| {
                assert_eq!(got.len(), want.len(), "{label}");
                got.iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max)
            };
            let (max, checked) = if let Some(file) = clip["features"].as_str() {
                let (shape, data, descr) = npy(&dir.join(file));
                assert_eq!(
                    (shape, descr.as_str()),
                    (vec![got.frames, bins], "<f4"),
                    "{label}"
                );
                let want: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                (max_err(&got.features, &want), want.len())
            } else if let Some(rows) = clip["rows"].as_object() {
                let mut max = 0f32;
                for (t, row) in rows {
                    let t: usize = t.parse().unwrap();
                    let want: Vec<f32> = row
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                        .collect();
                    max = max.max(max_err(&got.features[t * bins..(t + 1) * bins], &want));
                }
                let sum: f64 = got.features.iter().map(|&v| f64::from(v)).sum();
                let want_sum = clip["sum"].as_f64().unwrap();
                eprintln!("{label}: sum of all features {sum} (reference {want_sum})");
                // Per-value errors of ~5e-7 without a common sign: the sum of up to 4e5 values
                // moves by far less than their count times the tolerance (measured: 1.4e-6).
                assert!(
                    (sum - want_sum).abs() <= 1e-3,
                    "{label}: sum {sum} vs {want_sum}"
                );
                (max, rows.len() * bins)
            } else {
                assert_eq!(got.frames, 0, "{label}");
                (0.0, 0)
            };
            eprintln!(
                "{label}: {n} samples, {} frames ({} valid), {checked} values, max |Δ| {max:.2e}",
                got.frames,
                got.mask.iter().filter(|&&m| m).count()
            );
            // Stated tolerance, as for Gemma-3n's log-mels: 1e-5 (measured: 4.8e-7, one float32
            // ulp of the larger log-mels; NumPy runs the FFT in float32, we run it in f64).
            assert!(max <= 1e-5, "{label}: {max}");
            clips += 1;
        }
    }
    assert_eq!(clips, 8);
}
