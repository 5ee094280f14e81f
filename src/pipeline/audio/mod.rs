//! Audio decoding, resampling and log-mel features.
//!
//! Media code knows nothing about models: this module owns turning client audio bytes (WAV, FLAC,
//! MP3, Ogg Vorbis) into a mono `f32` waveform and converting its sample rate ([`decode()`],
//! [`resample`], in `decode.rs`), and computing log-mel spectrograms the way Hugging Face's
//! USM-style feature extractors do ([`MelExtractor`], in `mel.rs`), from a [`MelConfig`] that a
//! model family builds from its own defaults and its `preprocessor_config.json`.
//!
//! [`AudioError`] is the one error type of both stages and [`AudioError::class`] their one
//! classification.

mod decode;
mod mel;

pub use decode::{decode, resample, DecodedAudio, MAX_SAMPLE_RATE};
pub use mel::{
    htk_mel_filter_bank, log_mel, FrameValidity, HannWindow, LogFloor, MelConfig, MelExtractor,
    MelFeatures, MelSettingError, MelSettingProblem, TimePadding,
};

use crate::error::ErrorClass;

/// Why a clip could not be decoded or resampled.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("unsupported audio format ({0}); supported: WAV, FLAC, MP3, Ogg Vorbis")]
    Unsupported(String),
    #[error("the audio could not be decoded: {0}")]
    Corrupt(String),
    #[error("the audio lasts {seconds:.2} s or more; the limit is {max_seconds} s")]
    TooLong { seconds: f64, max_seconds: f64 },
    /// For callers that cap encoded sizes; [`decode()`] itself takes no byte limit.
    #[error("the audio is {bytes} bytes; the limit is {max} bytes")]
    TooLarge { bytes: usize, max: usize },
    #[error("the audio is empty")]
    Empty,
    #[error("the audio could not be resampled: {0}")]
    Resample(String),
}

impl AudioError {
    /// The wire class of the error: the one place audio failures are classified. Media the server
    /// cannot read is the request's fault (400, as for images); a clip over the byte cap is 413.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Unsupported(_) | Self::Corrupt(_) | Self::TooLong { .. } | Self::Empty => {
                ErrorClass::InvalidRequest
            }
            Self::TooLarge { .. } => ErrorClass::PayloadTooLarge,
            Self::Resample(_) => ErrorClass::Internal,
        }
    }
}

/// Helpers shared by the tests of the submodules: fixture paths, a `.npy` reader, WAV writing and
/// the fixtures' two-tone signal.
#[cfg(test)]
mod testutil {
    use std::path::{Path, PathBuf};

    pub(super) fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    #[derive(Debug)]
    pub(super) enum Npy {
        F32(Vec<usize>, Vec<f32>),
        Bool(Vec<bool>),
    }

    /// A minimal `.npy` reader: format v1–v3, `<f4` or `|b1`, C order.
    pub(super) fn read_npy(path: &Path) -> Npy {
        let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&b[..6], b"\x93NUMPY", "{}", path.display());
        let (header_len, start) = match b[6] {
            1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
            _ => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        };
        let header = std::str::from_utf8(&b[start..start + header_len]).unwrap();
        assert!(header.contains("'fortran_order': False"), "{header}");
        let shape_text = header
            .split("'shape': (")
            .nth(1)
            .unwrap()
            .split(')')
            .next()
            .unwrap();
        let shape: Vec<usize> = shape_text
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse().unwrap())
            .collect();
        let data = &b[start + header_len..];
        let n: usize = shape.iter().product();
        if header.contains("'descr': '<f4'") {
            let v = data[..n * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Npy::F32(shape, v)
        } else if header.contains("'descr': '|b1'") {
            Npy::Bool(data[..n].iter().map(|&x| x != 0).collect())
        } else {
            panic!("unsupported npy dtype: {header}")
        }
    }

    #[derive(Clone, Copy)]
    pub(super) enum WavFormat {
        U8,
        S16,
        S24,
        S32,
        F32,
        F64,
    }

    /// A canonical RIFF/WAVE file of interleaved `samples`, each already in the target's range
    /// (integers as integer values, floats as floats).
    pub(super) fn wav_bytes(
        format: WavFormat,
        rate: u32,
        channels: u16,
        samples: &[f64],
    ) -> Vec<u8> {
        let (bits, tag): (u16, u16) = match format {
            WavFormat::U8 => (8, 1),
            WavFormat::S16 => (16, 1),
            WavFormat::S24 => (24, 1),
            WavFormat::S32 => (32, 1),
            WavFormat::F32 => (32, 3),
            WavFormat::F64 => (64, 3),
        };
        let mut data = Vec::new();
        for &s in samples {
            match format {
                WavFormat::U8 => data.push(s as u8),
                WavFormat::S16 => data.extend((s as i16).to_le_bytes()),
                WavFormat::S24 => data.extend(&(s as i32).to_le_bytes()[..3]),
                WavFormat::S32 => data.extend((s as i32).to_le_bytes()),
                WavFormat::F32 => data.extend((s as f32).to_le_bytes()),
                WavFormat::F64 => data.extend(s.to_le_bytes()),
            }
        }
        let block = channels * bits / 8;
        let mut w = Vec::new();
        w.extend(b"RIFF");
        w.extend((36 + data.len() as u32).to_le_bytes());
        w.extend(b"WAVEfmt ");
        w.extend(16u32.to_le_bytes());
        w.extend(tag.to_le_bytes());
        w.extend(channels.to_le_bytes());
        w.extend(rate.to_le_bytes());
        w.extend((rate * u32::from(block)).to_le_bytes());
        w.extend(block.to_le_bytes());
        w.extend(bits.to_le_bytes());
        w.extend(b"data");
        w.extend((data.len() as u32).to_le_bytes());
        w.extend(data);
        w
    }

    /// The fixture's two-tone signal, computed in f64 and stored as f32 like NumPy's `astype`.
    pub(super) fn two_tone(rate: u32, seconds: f64) -> Vec<f32> {
        let n = (f64::from(rate) * seconds).round() as usize;
        (0..n)
            .map(|i| {
                let t = i as f64 / f64::from(rate);
                (0.5 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()
                    + 0.25 * (2.0 * std::f64::consts::PI * 1234.5 * t).sin()) as f32
            })
            .collect()
    }

    pub(super) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::testutil::*;
    use super::*;

    // ------------------------------------------------------------------ goldens

    /// Every audio clip of the goldens produced with transformers (`tools/fixtures/make_goldens.py`):
    /// the decoded waveform and the features must match what the reference computed.
    #[test]
    fn goldens_match_the_reference() {
        let root = fixtures();
        let mut clips = 0;
        let mut cases: Vec<PathBuf> = std::fs::read_dir(root.join("goldens"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        cases.sort();
        let extractor = MelExtractor::new(&MelConfig::from_preprocessor_config(
            &serde_json::from_slice(
                &std::fs::read(root.join("tiny-gemma3n/preprocessor_config.json")).unwrap(),
            )
            .unwrap(),
            MelConfig::gemma3n_extractor(),
        ));
        for case in cases {
            let Ok(text) = std::fs::read(case.join("expected.json")) else {
                continue;
            };
            let expected: serde_json::Value = serde_json::from_slice(&text).unwrap();
            let Some(media) = expected.get("media").and_then(|m| m.as_array()) else {
                continue;
            };
            for m in media.iter().filter(|m| m["kind"] == "audio") {
                let file = m["file"].as_str().unwrap();
                let bytes = std::fs::read(root.join(file)).unwrap();
                let decoded = decode(&bytes, m["format"].as_str(), 30.0).unwrap();
                let Npy::F32(_, wave) = read_npy(&case.join(m["waveform"].as_str().unwrap()))
                else {
                    panic!("waveform dtype")
                };
                let Npy::F32(shape, want) =
                    read_npy(&case.join(m["input_features"].as_str().unwrap()))
                else {
                    panic!("features dtype")
                };
                let Npy::Bool(want_mask) =
                    read_npy(&case.join(m["input_features_mask"].as_str().unwrap()))
                else {
                    panic!("mask dtype")
                };
                assert_eq!(decoded.sample_rate, 16000, "{file}");
                let wave_err = max_abs_diff(&decoded.samples, &wave);
                let f = extractor.extract(&decoded.samples);
                assert_eq!(vec![f.frames, 128], shape, "{file}");
                let feat_err = max_abs_diff(&f.features, &want);
                // Features of the reference's own waveform isolate the extractor from the decoder.
                let feat_err_ref_wave = max_abs_diff(&extractor.extract(&wave).features, &want);
                eprintln!(
                    "{}: {file}: waveform max abs err {wave_err:e}; features max abs err {feat_err:e} \
                     ({feat_err_ref_wave:e} on the reference waveform)",
                    case.file_name().unwrap().to_string_lossy()
                );
                assert!(wave_err <= 1e-6, "{file}: {wave_err}");
                assert!(
                    feat_err <= 1e-5 && feat_err_ref_wave <= 1e-5,
                    "{file}: {feat_err} {feat_err_ref_wave}"
                );
                assert_eq!(f.mask, want_mask, "{file}");
                clips += 1;
            }
        }
        eprintln!("{clips} golden audio clips checked");
        assert!(clips > 0, "no golden has an audio clip");
    }

    /// `cargo test --release -- --ignored mel_timing --nocapture`
    #[test]
    #[ignore = "timing, run in release"]
    fn mel_timing() {
        let x = two_tone(16000, 30.0);
        let ex = MelExtractor::new(&MelConfig::gemma3n_extractor());
        let t = std::time::Instant::now();
        let f = ex.extract(&x);
        let first = t.elapsed();
        let t = std::time::Instant::now();
        let runs = 10;
        for _ in 0..runs {
            std::hint::black_box(ex.extract(std::hint::black_box(&x)));
        }
        eprintln!(
            "log-mel of 30 s ({} frames): first {first:?}, mean {:?}",
            f.frames,
            t.elapsed() / runs
        );
        let x44 = two_tone(44100, 30.0);
        let t = std::time::Instant::now();
        let y = resample(&x44, 44100, 16000).unwrap();
        eprintln!(
            "resample 30 s 44.1k -> 16k ({} samples): {:?}",
            y.len(),
            t.elapsed()
        );
        let wav = wav_bytes(WavFormat::S16, 16000, 1, &vec![1000.0; 480_000]);
        let t = std::time::Instant::now();
        decode(&wav, None, 30.0).unwrap();
        eprintln!("decode 30 s of 16-bit WAV: {:?}", t.elapsed());
    }
}
