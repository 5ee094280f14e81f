//! Log-mel spectrograms as Hugging Face's USM-style audio feature extractors compute them
//! (`Gemma3nAudioFeatureExtractor`, `Gemma4AudioFeatureExtractor`): optional left padding,
//! framing with a `frame_length + 1` window, optional pre-emphasis, periodic Hann window,
//! `|rfft|`, an HTK mel filter bank, a floored logarithm, optional per-bin normalisation and a
//! per-frame validity mask. Every difference between those extractors is a [`MelConfig`] option;
//! the values belong to the model families, which read them from their own defaults and the
//! model's `preprocessor_config.json` ([`MelConfig::from_preprocessor_config`]).
//!
//! The features reproduce the reference's arithmetic where it matters for agreement to ~1e-6: the
//! waveform, pre-emphasis and Hann window stay in `f32` like the reference's NumPy `float32`
//! arrays (a float32-computed window even uses NumPy's own float32 cosine), the filterbank, mel
//! projection and logarithm are `f64` like the reference's `float64` filter matrix. Only the FFT
//! differs: NumPy 2 runs it in `float32`, we run it in `f64`, which costs at most ~1e-6.

use std::borrow::Cow;
use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

/// How the periodic Hann window `0.5 - 0.5·cos(2π·i/n)` is computed; the extractors differ in the
/// last bit of most values, which matters for log-mels near the floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HannWindow {
    /// In `float32` with NumPy's float32 cosine: `0.5 * (1 - np.cos(2π * np.arange(n, dtype=f32) / n))`
    /// (Gemma-3n).
    Float32,
    /// In `float64`, then rounded to `float32`: `np.hanning(n + 1)[:-1].astype(f32)`, transformers'
    /// `window_function(n)` (Gemma 4).
    Float64,
}

/// How `mel_floor` keeps the logarithm finite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFloor {
    /// `ln(max(mel, mel_floor))` (Gemma-3n).
    Max,
    /// `ln(mel + mel_floor)` (Gemma 4).
    Add,
}

/// Zeros prepended to the waveform before framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimePadding {
    /// None: the first frame starts at the first sample (Gemma-3n).
    None,
    /// `frame_length / 2` zeros, so the first frame is centred on the first sample: the
    /// "semicausal" time padding of the reference STFT (Gemma 4).
    Semicausal,
}

/// Which frames the mask marks valid. Positions count on the left-padded signal, where the real
/// samples (after truncation, before the right padding) occupy `[pad_left, pad_left + real_len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameValidity {
    /// Frame `i` is valid when its first sample, `i·hop`, is real: `attention_mask[::hop][:frames]`
    /// (Gemma-3n).
    FirstSample,
    /// Frame `i` is valid when the last sample of its `frame_length + 1` window,
    /// `i·hop + frame_length`, is real (Gemma 4).
    LastSample,
}

/// Parameters of the log-mel front end. The numeric fields are named as the Hugging Face
/// extractors name them in `preprocessor_config.json`; the enums and `zero_invalid_frames` are
/// behaviours of the extractor classes, which no config file states, so they always come from the
/// family's base config.
#[derive(Debug, Clone)]
pub struct MelConfig {
    /// Expected input rate in Hz; the extractor does not resample.
    pub sampling_rate: u32,
    /// Number of mel bins.
    pub feature_size: usize,
    /// Window length in samples; frames are cut `frame_length + 1` samples long.
    pub frame_length: usize,
    /// Frame step in samples.
    pub hop_length: usize,
    /// FFT size; `fft_length / 2 + 1` frequency bins. The extractor uses this value as is.
    pub fft_length: usize,
    /// Only for [`MelConfig::from_preprocessor_config`], which sets `fft_length` to the next power
    /// of two of `frame_length`, doubled when this is set, as the reference's constructor does;
    /// a config file's own `fft_overdrive` overrides it.
    pub fft_overdrive: bool,
    /// Lower edge of the mel filter bank in Hz.
    pub min_frequency: f32,
    /// Upper edge of the mel filter bank in Hz.
    pub max_frequency: f32,
    /// Pre-emphasis coefficient; 0 disables it (a frame is then its first `frame_length` samples).
    pub preemphasis: f32,
    /// HTK flavour: the first sample of a frame is scaled by `1 - preemphasis`.
    pub preemphasis_htk_flavor: bool,
    /// How the Hann window's values are rounded.
    pub window: HannWindow,
    /// Floor of the mel energies before the logarithm; see `log_floor`.
    pub mel_floor: f32,
    /// How `mel_floor` applies.
    pub log_floor: LogFloor,
    /// Factor the waveform is multiplied by before anything else.
    pub input_scale_factor: f32,
    /// Subtracted from each bin's log-mel, when present (`feature_size` values).
    pub per_bin_mean: Option<Vec<f32>>,
    /// Divides each bin's log-mel after the mean, when present (`feature_size` values).
    pub per_bin_stddev: Option<Vec<f32>>,
    /// Zero-pad the waveform on the right to a multiple of this many samples (0 or 1: no
    /// padding).
    pub pad_to_multiple_of: usize,
    /// Longer waveforms are truncated to this many samples, rounded up to a multiple of
    /// `pad_to_multiple_of` as transformers' `SequenceFeatureExtractor` does (0: no limit).
    pub max_length: usize,
    /// Zeros prepended before framing (after truncation and right padding); frames are counted on
    /// the left-padded signal.
    pub time_padding: TimePadding,
    /// Which frames the mask marks valid.
    pub frame_validity: FrameValidity,
    /// Set the features of invalid frames to 0 (the reference multiplies them by the mask).
    pub zero_invalid_frames: bool,
}

/// A feature-extractor setting [`MelConfig::from_extractor_settings`] cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("feature extractor setting {key:?} {problem}")]
pub struct MelSettingError {
    pub key: &'static str,
    pub problem: MelSettingProblem,
}

/// What is wrong with a [`MelSettingError`]'s key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MelSettingProblem {
    #[error("is not stated")]
    Missing,
    #[error("is invalid: {0}")]
    Invalid(String),
}

impl MelConfig {
    /// The log-mel settings of transformers' `Gemma3nAudioFeatureExtractor()`: 16 kHz, 128 bins,
    /// 32 ms frames (512 samples) every 10 ms (160), `fft_overdrive` (FFT of 1024), 125–7600 Hz,
    /// pre-emphasis 0.97 in the HTK flavour, a float32 Hann window, `ln(max(mel, 1e-5))`, no left
    /// padding, a frame valid when its first sample is real, padded to a multiple of 128 samples and
    /// truncated at 480000 (30 s). A family reads its snapshot's `preprocessor_config.json` over
    /// these ([`MelConfig::from_preprocessor_config`]).
    pub fn gemma3n_extractor() -> Self {
        Self {
            sampling_rate: 16_000,
            feature_size: 128,
            frame_length: 512,
            hop_length: 160,
            fft_length: 1024,
            fft_overdrive: true,
            min_frequency: 125.0,
            max_frequency: 7600.0,
            preemphasis: 0.97,
            preemphasis_htk_flavor: true,
            window: HannWindow::Float32,
            mel_floor: 1e-5,
            log_floor: LogFloor::Max,
            input_scale_factor: 1.0,
            per_bin_mean: None,
            per_bin_stddev: None,
            pad_to_multiple_of: 128,
            max_length: 480_000,
            time_padding: TimePadding::None,
            frame_validity: FrameValidity::FirstSample,
            zero_invalid_frames: false,
        }
    }

    /// The log-mel settings of transformers' `Gemma4AudioFeatureExtractor()`: 16 kHz, 128 HTK mel bins 0–8000 Hz, 20 ms frames (320) every
    /// 10 ms (160), FFT 512, Hann in float64, no pre-emphasis, `ln(mel + 1e-3)`, semicausal padding, a frame valid
    /// when its window ends on real audio, invalid frames zeroed, pad to a multiple of 128, at most 30 s.
    pub fn gemma4_extractor() -> Self {
        Self {
            sampling_rate: 16_000,
            feature_size: 128,
            frame_length: 320,
            hop_length: 160,
            fft_length: 512,
            fft_overdrive: false,
            min_frequency: 0.0,
            max_frequency: 8000.0,
            preemphasis: 0.0,
            preemphasis_htk_flavor: true,
            window: HannWindow::Float64,
            mel_floor: 1e-3,
            log_floor: LogFloor::Add,
            input_scale_factor: 1.0,
            per_bin_mean: None,
            per_bin_stddev: None,
            pad_to_multiple_of: 128,
            max_length: 480_000,
            time_padding: TimePadding::Semicausal,
            frame_validity: FrameValidity::LastSample,
            zero_invalid_frames: true,
        }
    }

    /// Reads `preprocessor_config.json` values over `base`, the family's defaults, the way the HF
    /// extractor interprets them on load. `frame_length_ms` / `hop_length_ms` win over the sample
    /// counts `to_dict()` also saves, and `fft_length` is recomputed from the frame length and
    /// `fft_overdrive` (the file's, else the base's) rather than read, because transformers'
    /// `__init__` does the same. A nested `feature_extractor` object (transformers 5
    /// `processor_config.json`) is read if present. Per-bin statistics may be flat or nested (the
    /// `[1, 1, feature_size]` arrays `to_dict()` saves); `null` removes them. Missing or invalid
    /// values keep the base's; so does everything a config file does not state (the enums,
    /// `zero_invalid_frames`).
    pub fn from_preprocessor_config(v: &serde_json::Value, base: MelConfig) -> Self {
        let v = match v.get("feature_extractor") {
            Some(fe) if fe.is_object() => fe,
            _ => v,
        };
        let base_ms = |samples: usize| samples as f64 * 1000.0 / f64::from(base.sampling_rate);
        let (frame_ms, hop_ms) = (base_ms(base.frame_length), base_ms(base.hop_length));
        let mut c = base;
        let num = |key: &str| v.get(key).and_then(json_number);
        let count = |key: &str| {
            num(key)
                .filter(|x| x.is_finite() && *x >= 0.0 && x.fract() == 0.0)
                .map(|x| x as usize)
        };
        let flag = |key: &str| v.get(key).and_then(serde_json::Value::as_bool);

        if let Some(sr) = count("sampling_rate").filter(|&sr| sr > 0 && sr <= u32::MAX as usize) {
            c.sampling_rate = sr as u32;
        }
        if let Some(n) = count("feature_size").filter(|&n| n > 0) {
            c.feature_size = n;
        }
        let samples_of_ms = |ms: f64| (f64::from(c.sampling_rate) * ms / 1000.0).round();
        // The class's milliseconds at the file's rate when neither is stated, as its `__init__` does.
        let frame = num("frame_length_ms")
            .map(samples_of_ms)
            .or_else(|| num("frame_length"))
            .or(Some(samples_of_ms(frame_ms)));
        if let Some(f) = frame.filter(|f| f.is_finite() && *f >= 1.0) {
            c.frame_length = f as usize;
        }
        let hop = num("hop_length_ms")
            .map(samples_of_ms)
            .or_else(|| num("hop_length"))
            .or(Some(samples_of_ms(hop_ms)));
        if let Some(h) = hop.filter(|h| h.is_finite() && *h >= 1.0) {
            c.hop_length = h as usize;
        }
        if let Some(overdrive) = flag("fft_overdrive") {
            c.fft_overdrive = overdrive;
        }
        c.fft_length = c.frame_length.next_power_of_two() * if c.fft_overdrive { 2 } else { 1 };
        let real = |key: &str, field: &mut f32| {
            if let Some(x) = num(key).filter(|x| x.is_finite()) {
                *field = x as f32;
            }
        };
        real("min_frequency", &mut c.min_frequency);
        real("max_frequency", &mut c.max_frequency);
        real("preemphasis", &mut c.preemphasis);
        real("mel_floor", &mut c.mel_floor);
        real("input_scale_factor", &mut c.input_scale_factor);
        if let Some(htk) = flag("preemphasis_htk_flavor") {
            c.preemphasis_htk_flavor = htk;
        }
        let feature_size = c.feature_size;
        let per_bin = |key: &str, field: &mut Option<Vec<f32>>| match v.get(key) {
            None => {}
            Some(serde_json::Value::Null) => *field = None,
            Some(value) => {
                let mut values = Vec::new();
                flatten_numbers(value, &mut values);
                if values.len() == feature_size {
                    *field = Some(values);
                } else {
                    tracing::warn!(
                        key,
                        len = values.len(),
                        feature_size,
                        "ignoring per-bin statistics of the wrong length"
                    );
                }
            }
        };
        per_bin("per_bin_mean", &mut c.per_bin_mean);
        per_bin("per_bin_stddev", &mut c.per_bin_stddev);
        if let Some(m) = count("pad_to_multiple_of") {
            c.pad_to_multiple_of = m;
        }
        if let Some(m) = count("max_length") {
            c.max_length = m;
        }
        c
    }

    /// As [`MelConfig::from_preprocessor_config`], for a snapshot's saved settings: every key the
    /// extractor saves (transformers' `to_dict` writes every attribute) must be stated and valid, since a
    /// value taken from `base` instead would be a guess. `frame_length_ms` / `hop_length_ms` may stand
    /// for the sample counts; `pad_to_multiple_of` and `max_length` are call arguments of the reference,
    /// never saved, so they stay the base's unless stated. The error names the key.
    pub fn from_extractor_settings(
        v: &serde_json::Value,
        base: MelConfig,
    ) -> Result<Self, MelSettingError> {
        use serde_json::Value;
        let missing = |key: &'static str| MelSettingError {
            key,
            problem: MelSettingProblem::Missing,
        };
        let invalid = |key: &'static str, why: &str| MelSettingError {
            key,
            problem: MelSettingProblem::Invalid(why.to_string()),
        };
        let stated = |key: &'static str| match v.get(key) {
            None | Some(Value::Null) => Err(missing(key)),
            Some(x) => Ok(x),
        };
        let positive = |key: &'static str| {
            stated(key)?
                .as_u64()
                .filter(|&x| x > 0 && x <= u32::MAX as u64)
                .map(|x| x as usize)
                .ok_or_else(|| invalid(key, "expected a positive integer"))
        };
        let real = |key: &'static str| {
            json_number(stated(key)?)
                .filter(|x| x.is_finite())
                .ok_or_else(|| invalid(key, "expected a number"))
        };
        let flag = |key: &'static str| {
            stated(key)?
                .as_bool()
                .ok_or_else(|| invalid(key, "expected true or false"))
        };
        let sampling_rate = positive("sampling_rate")?;
        let feature_size = positive("feature_size")?;
        // transformers' extractors compute the sample counts from the milliseconds (their `__init__`
        // argument, else the class default, which `to_dict` does not save) and ignore the saved counts;
        // a saved count that disagrees would be served differently here, so it is refused.
        for (ms, samples, base_samples) in [
            ("frame_length_ms", "frame_length", base.frame_length),
            ("hop_length_ms", "hop_length", base.hop_length),
        ] {
            let millis = match v.get(ms) {
                Some(x) if !x.is_null() => {
                    let m = real(ms)?;
                    if m <= 0.0 {
                        return Err(invalid(ms, "expected a positive number"));
                    }
                    m
                }
                _ => base_samples as f64 * 1000.0 / f64::from(base.sampling_rate),
            };
            let derived = (sampling_rate as f64 * millis / 1000.0).round() as usize;
            match v.get(samples) {
                None | Some(Value::Null) => {}
                Some(_) => {
                    let saved = positive(samples)?;
                    if saved != derived {
                        return Err(invalid(
                            samples,
                            &format!(
                                "transformers ignores the saved count and uses {derived} \
                                 ({millis} ms at {sampling_rate} Hz); a file that disagrees was not \
                                 written by it"
                            ),
                        ));
                    }
                }
            }
        }
        // Settings the front end implements one value of: another stated value is refused, not ignored.
        for (key, only) in [("dither", 0.0), ("padding_value", 0.0)] {
            if let Some(x) = v.get(key).filter(|x| !x.is_null()) {
                if json_number(x) != Some(only) {
                    return Err(invalid(
                        key,
                        &format!("only {only} is supported (the reference adds no noise and pads with zeros)"),
                    ));
                }
            }
        }
        flag("fft_overdrive")?;
        flag("preemphasis_htk_flavor")?;
        for key in [
            "min_frequency",
            "max_frequency",
            "preemphasis",
            "mel_floor",
            "input_scale_factor",
        ] {
            real(key)?;
        }
        for key in ["per_bin_mean", "per_bin_stddev"] {
            match v.get(key) {
                None => return Err(missing(key)),
                Some(Value::Null) => {}
                Some(x) => {
                    let mut values = Vec::new();
                    flatten_numbers(x, &mut values);
                    if values.len() != feature_size {
                        return Err(invalid(key, "expected feature_size numbers or null"));
                    }
                }
            }
        }
        for key in ["pad_to_multiple_of", "max_length"] {
            if let Some(x) = v.get(key).filter(|x| !x.is_null()) {
                if x.as_u64().is_none() {
                    return Err(invalid(key, "expected a non-negative integer"));
                }
            }
        }
        Ok(Self::from_preprocessor_config(v, base))
    }

    /// Zeros prepended before framing.
    pub fn pad_left(&self) -> usize {
        match self.time_padding {
            TimePadding::None => 0,
            TimePadding::Semicausal => self.frame_length.max(1) / 2,
        }
    }

    /// Samples of a `num_samples` clip that are kept (the truncation to `max_length`).
    fn real_len(&self, num_samples: usize) -> usize {
        if self.max_length == 0 {
            return num_samples;
        }
        let limit = if self.pad_to_multiple_of > 1 {
            self.max_length.div_ceil(self.pad_to_multiple_of) * self.pad_to_multiple_of
        } else {
            self.max_length
        };
        num_samples.min(limit)
    }

    /// Number of frames for `num_samples` input samples: with `padded` the length after
    /// truncation and right padding, `(padded + pad_left - (frame_length + 1)) / hop + 1`, or 0
    /// when that window does not fit once.
    pub fn num_frames(&self, num_samples: usize) -> usize {
        let len = self.real_len(num_samples);
        let padded = if self.pad_to_multiple_of > 1 {
            len.div_ceil(self.pad_to_multiple_of) * self.pad_to_multiple_of
        } else {
            len
        };
        let window = self.frame_length.max(1) + 1;
        let total = padded + self.pad_left();
        if total >= window {
            (total - window) / self.hop_length.max(1) + 1
        } else {
            0
        }
    }

    /// The validity mask of the `num_frames(num_samples)` frames, by `frame_validity`, without
    /// computing any feature (a family counts its audio tokens from it).
    pub fn frame_mask(&self, num_samples: usize) -> Vec<bool> {
        let (pad_left, real_len) = (self.pad_left(), self.real_len(num_samples));
        let offset = match self.frame_validity {
            FrameValidity::FirstSample => 0,
            FrameValidity::LastSample => self.frame_length.max(1),
        };
        (0..self.num_frames(num_samples))
            .map(|i| {
                let at = i * self.hop_length.max(1) + offset;
                at >= pad_left && at < pad_left + real_len
            })
            .collect()
    }

    /// Number of valid frames of a `num_samples` clip.
    pub fn num_valid_frames(&self, num_samples: usize) -> usize {
        self.frame_mask(num_samples).iter().filter(|&&m| m).count()
    }
}

/// A number, or a one-element list of one (NumPy 0-d arrays such as `mel_floor` are saved either way).
fn json_number(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Array(a) if a.len() == 1 => a[0].as_f64(),
        v => v.as_f64(),
    }
}

/// The numbers of a possibly nested JSON array, in order; anything else is skipped.
fn flatten_numbers(v: &serde_json::Value, out: &mut Vec<f32>) {
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| flatten_numbers(x, out)),
        v => out.extend(v.as_f64().map(|x| x as f32)),
    }
}

/// The `f64` whose shortest decimal is that of `x`: the value the reference's Python float had
/// before it was stored in an `f32` field (`1e-5f32` → `1e-5`, not `9.99999974738e-6`).
fn decimal_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// Log-mel features of one clip: `[frames, feature_size]` row-major.
#[derive(Debug, Clone)]
pub struct MelFeatures {
    pub features: Vec<f32>,
    pub frames: usize,
    /// Per frame, whether it is valid by the config's [`FrameValidity`]
    /// ([`MelConfig::frame_mask`]).
    pub mask: Vec<bool>,
}

/// Triangular filters on the HTK mel scale (`2595·log10(1 + f/700)`) without area normalisation,
/// as `create_fb_matrix` builds them: `[n_freqs, n_mels]` row-major, bin `k` at
/// `k · sample_rate / fft_length` Hz.
pub fn htk_mel_filter_bank(
    n_freqs: usize,
    f_min: f64,
    f_max: f64,
    n_mels: usize,
    sample_rate: u32,
    fft_length: usize,
) -> Vec<f64> {
    // The reference builds the bin frequencies in float32.
    let bin_hz = (f64::from(sample_rate) / fft_length as f64) as f32;
    let hz_to_mel = |f: f64| 2595.0 * (1.0 + f / 700.0).log10();
    let (m_min, m_max) = (hz_to_mel(f_min), hz_to_mel(f_max));
    // np.linspace: start + i·step, with the last point set to stop exactly.
    let step = (m_max - m_min) / (n_mels + 1) as f64;
    let f_pts: Vec<f64> = (0..n_mels + 2)
        .map(|i| {
            if i == n_mels + 1 {
                m_max
            } else {
                i as f64 * step + m_min
            }
        })
        .map(|m| 700.0 * (10f64.powf(m / 2595.0) - 1.0))
        .collect();
    let mut fb = vec![0.0; n_freqs * n_mels];
    for k in 0..n_freqs {
        let freq = f64::from(k as f32 * bin_hz);
        for m in 0..n_mels {
            let down = -(f_pts[m] - freq) / (f_pts[m + 1] - f_pts[m]);
            let up = (f_pts[m + 2] - freq) / (f_pts[m + 2] - f_pts[m + 1]);
            fb[k * n_mels + m] = down.min(up).max(0.0);
        }
    }
    fb
}

/// `np.cos` on a `float32` array as NumPy ≥ 2 computes it on FMA hardware (x86-64-v3, AVX-512,
/// AArch64): a Cody-Waite reduction by π/2 and minimax polynomials for sine and cosine, fused
/// multiply-adds throughout, up to 1.5 ulp from the true value.
///
/// Why not `f64::cos` rounded: the reference window then differs in 37 of 512 values by one ulp,
/// and that ~6e-8 relative noise in every frame leaks into the quiet high bins, moving log-mels
/// near `mel_floor` by up to 9e-3. With NumPy's arithmetic they agree to 1e-6.
fn numpy_cos_f32(x: f32) -> f32 {
    // NumPy falls back to the C library where the three-part reduction loses accuracy.
    // 71476.06f32 is exactly NumPy's 71476.0625f.
    if x.is_nan() || x.abs() > 71_476.06 {
        return f64::from(x).cos() as f32;
    }
    let two_over_pi = f32::from_bits(0x3f22_f983); // 0x1.45f306p-1
    let rint_magic = f32::from_bits(0x4b40_0000); // 0x1.8p23: adding it rounds to an integer
                                                  // NumPy's build contracts this multiply and add into one FMA; unfused, the product for
                                                  // x = 5π/4 rounds to exactly 2.5 and picks the other quadrant (a 1-ulp different result).
    let quadrant = x.mul_add(two_over_pi, rint_magic) - rint_magic;
    // -π/2 split in three parts: 0x1.921fb0p0, 0x1.5110b4p-22, 0x1.846988p-48.
    let mut r = quadrant.mul_add(f32::from_bits(0xbfc9_0fd8), x);
    r = quadrant.mul_add(f32::from_bits(0xb4a8_885a), r);
    r = quadrant.mul_add(f32::from_bits(0xa7c2_34c4), r);
    let r2 = r * r;
    let cos = [0x3d2a_aa9e, 0xbf00_0000, 0x3f80_0000] // 0x1.55553cp-5, -0.5, 1
        .iter()
        .fold(
            f32::from_bits(0x37cc_730b).mul_add(r2, f32::from_bits(0xbab6_036e)),
            |acc, &c| acc.mul_add(r2, f32::from_bits(c)),
        ); // from 0x1.98e616p-16, -0x1.6c06dcp-10
    let sin_poly = [0x3c08_88cd, 0xbe2a_aaab] // 0x1.11119ap-7, -0x1.555556p-3
        .iter()
        .fold(
            f32::from_bits(0x363e_9dde).mul_add(r2, f32::from_bits(0xb950_35dd)),
            |acc, &c| acc.mul_add(r2, f32::from_bits(c)),
        ); // from 0x1.7d3bbcp-19, -0x1.a06bbap-13
    let sin = (sin_poly * r2).mul_add(r, r);
    // cos(x) = ±sin or ±cos of the reduced argument, by quadrant + 1.
    let k = quadrant as i32 + 1;
    let v = if k & 1 == 0 { sin } else { cos };
    if k & 2 == 2 {
        0.0 - v
    } else {
        v
    }
}

/// The periodic Hann window of `n` samples, rounded as `flavour` says.
fn hann_window(n: usize, flavour: HannWindow) -> Vec<f32> {
    match flavour {
        HannWindow::Float32 => {
            let two_pi = (2.0 * std::f64::consts::PI) as f32;
            (0..n)
                .map(|i| 0.5f32 * (1.0f32 - numpy_cos_f32(two_pi * i as f32 / n as f32)))
                .collect()
        }
        // np.hanning(m) = 0.5 + 0.5·cos(π·k / (m − 1)) for k = 1 − m, 3 − m, …, m − 1; with
        // m = n + 1 and the last point dropped, k = 2i − n.
        HannWindow::Float64 => (0..n)
            .map(|i| {
                let k = 2.0 * i as f64 - n as f64;
                (0.5 + 0.5 * (std::f64::consts::PI * k / n as f64).cos()) as f32
            })
            .collect(),
    }
}

/// The log-mel front end with its window, filterbank and FFT plan built once per [`MelConfig`].
/// `Send + Sync`: share one per model.
pub struct MelExtractor {
    cfg: MelConfig,
    window: Vec<f32>,
    /// Per mel bin: the first FFT bin with a nonzero weight and the weights from there. The
    /// triangles cover a few bins each, so this is ~100× fewer multiplies than the dense matrix.
    filters: Vec<(usize, Vec<f64>)>,
    fft: Arc<dyn RealToComplex<f64>>,
    preemph_first: f32,
    mel_floor: f64,
    mean: Option<Vec<f64>>,
    stddev: Option<Vec<f64>>,
}

impl std::fmt::Debug for MelExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelExtractor")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl MelExtractor {
    /// Nonsensical sizes are clamped rather than rejected (a hop of 0 becomes 1, an FFT shorter
    /// than the frame grows to it) so extraction can never panic.
    pub fn new(cfg: &MelConfig) -> Self {
        let mut cfg = cfg.clone();
        cfg.frame_length = cfg.frame_length.max(1);
        cfg.hop_length = cfg.hop_length.max(1);
        cfg.fft_length = cfg.fft_length.max(cfg.frame_length);
        let window = hann_window(cfg.frame_length, cfg.window);
        let n_freqs = cfg.fft_length / 2 + 1;
        let dense = htk_mel_filter_bank(
            n_freqs,
            decimal_f64(cfg.min_frequency),
            decimal_f64(cfg.max_frequency),
            cfg.feature_size,
            cfg.sampling_rate,
            cfg.fft_length,
        );
        let filters = (0..cfg.feature_size)
            .map(|m| {
                let column: Vec<f64> = (0..n_freqs)
                    .map(|k| dense[k * cfg.feature_size + m])
                    .collect();
                match (
                    column.iter().position(|&w| w != 0.0),
                    column.iter().rposition(|&w| w != 0.0),
                ) {
                    (Some(first), Some(last)) => (first, column[first..=last].to_vec()),
                    _ => (0, Vec::new()),
                }
            })
            .collect();
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(cfg.fft_length);
        let stats = |v: &Option<Vec<f32>>| {
            v.as_ref()
                .filter(|v| v.len() == cfg.feature_size)
                .map(|v| v.iter().map(|&x| decimal_f64(x)).collect())
        };
        Self {
            window,
            filters,
            fft,
            preemph_first: (1.0 - decimal_f64(cfg.preemphasis)) as f32,
            mel_floor: decimal_f64(cfg.mel_floor),
            mean: stats(&cfg.per_bin_mean),
            stddev: stats(&cfg.per_bin_stddev),
            cfg,
        }
    }

    pub fn config(&self) -> &MelConfig {
        &self.cfg
    }

    /// Number of frames for `num_samples` input samples ([`MelConfig::num_frames`]).
    pub fn num_frames(&self, num_samples: usize) -> usize {
        self.cfg.num_frames(num_samples)
    }

    /// The reference extractor on one clip (mono, at `sampling_rate`), as configured.
    pub fn extract(&self, samples: &[f32]) -> MelFeatures {
        let cfg = &self.cfg;
        let real = &samples[..cfg.real_len(samples.len())];
        let pad_left = cfg.pad_left();
        // The left-padded waveform; the right padding is read as zeros past its end.
        let wave: Cow<[f32]> = if pad_left == 0 && cfg.input_scale_factor == 1.0 {
            Cow::Borrowed(real)
        } else {
            let mut w = vec![0.0f32; pad_left];
            w.extend(real.iter().map(|&v| v * cfg.input_scale_factor));
            Cow::Owned(w)
        };
        let frames = cfg.num_frames(samples.len());
        let mask = cfg.frame_mask(samples.len());
        let n_mels = cfg.feature_size;
        let fl = cfg.frame_length;
        let mut features = Vec::with_capacity(frames * n_mels);
        // The frame reads frame_length + 1 samples: pre-emphasis looks one sample back, and the
        // reference unfolds with that size (its last sample goes unused in the HTK flavour).
        let mut frame = vec![0.0f32; fl + 1];
        let mut input = self.fft.make_input_vec();
        let mut spectrum: Vec<Complex<f64>> = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut magnitude = vec![0.0f64; spectrum.len()];
        let p = cfg.preemphasis;
        for (t, &valid) in mask.iter().enumerate() {
            if cfg.zero_invalid_frames && !valid {
                features.resize(features.len() + n_mels, 0.0);
                continue;
            }
            let start = t * cfg.hop_length;
            let avail = wave.len().saturating_sub(start).min(fl + 1);
            if avail > 0 {
                frame[..avail].copy_from_slice(&wave[start..start + avail]);
            }
            frame[avail..].fill(0.0);
            for (j, x) in input[..fl].iter_mut().enumerate() {
                // float32 arithmetic, term by term as NumPy evaluates it.
                let y = if p > 0.0 {
                    if cfg.preemphasis_htk_flavor {
                        if j == 0 {
                            frame[0] * self.preemph_first
                        } else {
                            frame[j] - p * frame[j - 1]
                        }
                    } else {
                        frame[j + 1] - p * frame[j]
                    }
                } else {
                    frame[j]
                };
                *x = f64::from(y * self.window[j]);
            }
            input[fl..].fill(0.0);
            // Cannot fail: every buffer comes from this plan.
            if self
                .fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .is_err()
            {
                spectrum.fill(Complex::new(0.0, 0.0));
            }
            for (m, c) in magnitude.iter_mut().zip(&spectrum) {
                // Not `norm()`: hypot's overflow care costs most of the extraction time, and f64
                // cannot overflow on audio.
                *m = (c.re * c.re + c.im * c.im).sqrt();
            }
            for (bin, (first, weights)) in self.filters.iter().enumerate() {
                let mel: f64 = magnitude[*first..first + weights.len()]
                    .iter()
                    .zip(weights)
                    .map(|(a, w)| a * w)
                    .sum();
                let mut v = match cfg.log_floor {
                    LogFloor::Max => mel.max(self.mel_floor),
                    LogFloor::Add => mel + self.mel_floor,
                }
                .ln();
                if let Some(mean) = &self.mean {
                    v -= mean[bin];
                }
                if let Some(std) = &self.stddev {
                    v /= std[bin];
                }
                features.push(v as f32);
            }
        }
        MelFeatures {
            features,
            frames,
            mask,
        }
    }
}

/// The reference extractor on one clip (mono input at `sampling_rate`): scale by
/// `input_scale_factor`, truncate to `max_length`, zero-pad on the right to a multiple of
/// `pad_to_multiple_of` and on the left by [`MelConfig::pad_left`], frame with window
/// `frame_length + 1` and `hop_length`, pre-emphasis (if any), periodic Hann, `|rfft(fft_length)|`,
/// HTK mel filterbank, floored logarithm, optional per-bin normalisation, the validity mask and
/// (if configured) zeroed invalid frames. Builds a [`MelExtractor`] per call; keep one to reuse
/// its plan and filterbank.
pub fn log_mel(samples: &[f32], cfg: &MelConfig) -> MelFeatures {
    MelExtractor::new(cfg).extract(samples)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{fixtures, two_tone};
    use super::*;

    // ------------------------------------------------------------------ features

    #[test]
    fn htk_filter_bank_matches_the_reference_shape() {
        let fb = htk_mel_filter_bank(513, 125.0, 7600.0, 128, 16000, 1024);
        assert_eq!(fb.len(), 513 * 128);
        assert!(fb.iter().all(|&w| (0.0..=1.0).contains(&w)));
        // Values from transformers' create_fb_matrix: total weight, support of three filters,
        // the peaks of the first and last, and where the bank starts and ends.
        let total: f64 = fb.iter().sum();
        assert!((total - 473.200_609_215_847_75).abs() < 1e-9, "{total}");
        let col = |m: usize| -> Vec<f64> { (0..513).map(|k| fb[k * 128 + m]).collect() };
        let support = |m: usize| col(m).iter().filter(|&&w| w > 0.0).count();
        assert_eq!((support(0), support(64), support(127)), (1, 6, 19));
        assert!((col(0)[9] - 0.952_024_472_288_285_8).abs() < 1e-12);
        assert_eq!(col(0).iter().position(|&w| w > 0.0), Some(9));
        assert_eq!(col(127).iter().rposition(|&w| w > 0.0), Some(486));
        // No bin outside 125–7600 Hz carries weight: bin 7 is 109 Hz, bin 487 is 7609 Hz.
        assert!((0..128).all(|m| fb[7 * 128 + m] == 0.0 && fb[487 * 128 + m] == 0.0));
        // Every filter peaks at the bin nearest its centre frequency and has some weight.
        assert!((0..128).all(|m| col(m).iter().any(|&w| w > 0.0)));
    }

    #[test]
    fn frame_count_follows_the_padded_length() {
        let ex = MelExtractor::new(&MelConfig::gemma3n_extractor());
        for (n, frames) in [
            (0, 0),
            (100, 0),
            (512, 0),
            (513, 1),
            (640, 1),
            (1000, 4),
            (40000, 248),
            (480_000, 2997),
            (485_000, 2997),
        ] {
            assert_eq!(ex.num_frames(n), frames, "{n}");
            let padded = if n == 0 {
                0
            } else {
                n.min(480_000).div_ceil(128) * 128
            };
            let formula = if padded >= 513 {
                (padded - 513) / 160 + 1
            } else {
                0
            };
            assert_eq!(frames, formula);
            let f = ex.extract(&vec![0.1; n]);
            assert_eq!(
                (f.frames, f.features.len(), f.mask.len()),
                (frames, frames * 128, frames)
            );
        }
        let silent = ex.extract(&[0.0; 2000]);
        assert!(silent.features.iter().all(|&v| v == (1e-5f64).ln() as f32));
    }

    #[test]
    fn hann_window_is_numpys_float32_window() {
        // transformers' `Gemma3nAudioFeatureExtractor().window` under NumPy 2.4 (x86-64-v3): the sum
        // of its 512 bit patterns, and values where a correctly rounded cosine would differ.
        let ex = MelExtractor::new(&MelConfig::gemma3n_extractor());
        let bits: u64 = ex.window.iter().map(|w| u64::from(w.to_bits())).sum();
        assert_eq!(bits, 535_751_417_374);
        for (i, b) in [
            (3, 0x39b1_a000),
            (35, 0x3d3a_0620),
            (37, 0x3d4f_83c8),
            (58, 0x3df8_9e3c),
            (71, 0x3e36_5bb8),
            (76, 0x3e4f_0082),
        ] {
            assert_eq!(ex.window[i].to_bits(), b, "window[{i}]");
        }
        assert_eq!(ex.window[0], 0.0);
        assert_eq!(ex.window[256], 1.0);
        assert_eq!(numpy_cos_f32(0.0), 1.0);
        assert!((numpy_cos_f32(1e6) - (1e6f64).cos() as f32).abs() < 1e-6);
        assert!(numpy_cos_f32(f32::NAN).is_nan());
    }

    /// The reference numbers come from transformers 5.x `Gemma3nAudioFeatureExtractor()` (NumPy
    /// 2.4) on the same f32 samples; see `two_tone`.
    #[test]
    fn two_tone_matches_transformers() {
        let f = log_mel(&two_tone(16000, 2.5), &MelConfig::gemma3n_extractor());
        assert_eq!(f.frames, 248);
        assert!(f.mask.iter().all(|&m| m));
        let at = |t: usize, m: usize| f64::from(f.features[t * 128 + m]);
        let expected = [
            (0, 0, -5.738_049_983_978_271_5),
            (0, 1, -6.559_336_185_455_322),
            (0, 2, -5.364_820_480_346_68),
            (0, 3, -6.149_789_810_180_664),
            (100, 64, -7.205_103_397_369_385),
            (100, 47, 3.307_199_001_312_256),
            (10, 20, -0.304_707_169_532_775_9),
            (247, 127, -2.613_258_361_816_406_2),
        ];
        for (t, m, v) in expected {
            assert!(
                (at(t, m) - v).abs() < 1e-4,
                "[{t}][{m}] {} vs {v}",
                at(t, m)
            );
        }
        let sum: f64 = f.features.iter().map(|&v| f64::from(v)).sum();
        assert!((sum - -215_565.919_136_703).abs() < 1e-2, "{sum}");
    }

    #[test]
    fn padding_frames_are_masked() {
        let cfg = MelConfig {
            pad_to_multiple_of: 4096,
            ..MelConfig::gemma3n_extractor()
        };
        let f = log_mel(&two_tone(16000, 1000.0 / 16000.0), &cfg);
        assert_eq!(f.frames, 23);
        assert_eq!(f.mask, (0..23).map(|t| t < 7).collect::<Vec<_>>());
        let sum: f64 = f.features.iter().map(|&v| f64::from(v)).sum();
        assert!((sum - -27_413.604_149_074_06).abs() < 1e-2, "{sum}");
        assert!((f64::from(f.features[3 * 128 + 10]) - -3.536_246_776_580_810_5).abs() < 1e-4);
        assert!((f64::from(f.features[20 * 128 + 50]) - -11.512_925_148_010_254).abs() < 1e-4);
    }

    #[test]
    fn other_settings_match_transformers() {
        let x = two_tone(16000, 0.5);
        let cfg = MelConfig {
            preemphasis_htk_flavor: false,
            input_scale_factor: 2.0,
            per_bin_mean: Some((0..128).map(|i| 0.01 * i as f32).collect()),
            per_bin_stddev: Some((0..128).map(|i| 1.0 + 0.005 * i as f32).collect()),
            mel_floor: 1e-3,
            ..MelConfig::gemma3n_extractor()
        };
        let f = log_mel(&x, &cfg);
        assert_eq!(f.frames, 48);
        let sum: f64 = f.features.iter().map(|&v| f64::from(v)).sum();
        assert!((sum - -24_106.690_245_911_48).abs() < 1e-2, "{sum}");
        assert!((f64::from(f.features[5 * 128 + 7]) - -4.075_158_119_201_66).abs() < 1e-4);
        assert!((f64::from(f.features[40 * 128 + 100]) - -5.271_836_757_659_912).abs() < 1e-4);

        let json = serde_json::json!({
            "preemphasis": 0.0, "frame_length_ms": 25.0, "hop_length_ms": 12.5, "fft_overdrive": false,
            "feature_size": 80, "min_frequency": 60.0, "max_frequency": 7000.0,
        });
        let cfg = MelConfig::from_preprocessor_config(&json, MelConfig::gemma3n_extractor());
        assert_eq!(
            (
                cfg.frame_length,
                cfg.hop_length,
                cfg.fft_length,
                cfg.feature_size
            ),
            (400, 200, 512, 80)
        );
        let f = log_mel(&x, &cfg);
        assert_eq!(f.frames, 39);
        let sum: f64 = f.features.iter().map(|&v| f64::from(v)).sum();
        assert!((sum - -16_551.313_447_490_335).abs() < 1e-2, "{sum}");
        assert!((f64::from(f.features[5 * 80 + 7]) - -2.393_312_692_642_212).abs() < 1e-4);
        assert!((f64::from(f.features[20 * 80 + 79]) - -11.512_925_148_010_254).abs() < 1e-4);
    }

    #[test]
    fn reads_preprocessor_config() {
        let path = fixtures().join("tiny-gemma3n/preprocessor_config.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let cfg = MelConfig::from_preprocessor_config(&v, MelConfig::gemma3n_extractor());
        let d = MelConfig::gemma3n_extractor();
        assert_eq!(format!("{cfg:?}"), format!("{d:?}"));

        let custom = serde_json::json!({
            "feature_extractor": {
                "sampling_rate": 8000, "feature_size": 64, "frame_length": 256, "hop_length": 80,
                "fft_length": 4096, "mel_floor": [0.001], "preemphasis_htk_flavor": false,
                "per_bin_mean": vec![0.5; 64], "per_bin_stddev": vec![2.0; 3],
                "pad_to_multiple_of": 64, "max_length": 80000,
            }
        });
        let c = MelConfig::from_preprocessor_config(&custom, MelConfig::gemma3n_extractor());
        assert_eq!(
            (
                c.sampling_rate,
                c.feature_size,
                c.frame_length,
                c.hop_length,
                c.fft_length
            ),
            (8000, 64, 256, 80, 512)
        );
        assert_eq!(
            (
                c.mel_floor,
                c.preemphasis_htk_flavor,
                c.pad_to_multiple_of,
                c.max_length
            ),
            (0.001, false, 64, 80000)
        );
        assert_eq!(c.per_bin_mean, Some(vec![0.5; 64]));
        assert_eq!(c.per_bin_stddev, None, "wrong length is ignored");
        // Bad values keep the defaults.
        let bad = serde_json::json!({"hop_length": 0, "feature_size": -3, "sampling_rate": "fast"});
        let c = MelConfig::from_preprocessor_config(&bad, MelConfig::gemma3n_extractor());
        assert_eq!(
            (c.hop_length, c.feature_size, c.sampling_rate),
            (160, 128, 16000)
        );
    }

    #[test]
    fn degenerate_configs_do_not_panic() {
        let cfg = MelConfig {
            hop_length: 0,
            frame_length: 0,
            fft_length: 0,
            pad_to_multiple_of: 0,
            max_length: 0,
            ..MelConfig::gemma3n_extractor()
        };
        let f = log_mel(&[0.5; 300], &cfg);
        assert_eq!(f.features.len(), f.frames * 128);
        let cfg = MelConfig {
            feature_size: 0,
            ..MelConfig::gemma3n_extractor()
        };
        assert!(log_mel(&[0.5; 3000], &cfg).features.is_empty());
    }

    // ------------------------------------------------------------------ Gemma 4 options

    #[test]
    fn semicausal_frames_and_last_sample_masks() {
        // (samples, frames, valid frames) of transformers' `Gemma4AudioFeatureExtractor()` on a
        // one-clip batch; it gives no frame below 161 samples.
        let cfg = MelConfig::gemma4_extractor();
        assert_eq!(cfg.pad_left(), 160);
        let ex = MelExtractor::new(&cfg);
        for (n, frames, valid) in [
            (0, 0, 0),
            (1, 0, 0),
            (100, 0, 0),
            (161, 1, 1),
            (162, 1, 1),
            (288, 2, 1),
            (289, 2, 1),
            (800, 5, 4),
            (7001, 43, 43),
            (8000, 50, 49),
            (480_000, 2999, 2999),
            (500_000, 2999, 2999),
        ] {
            let mask = cfg.frame_mask(n);
            assert_eq!(
                (cfg.num_frames(n), mask.len(), cfg.num_valid_frames(n)),
                (frames, frames, valid),
                "{n}"
            );
            assert!(
                mask[..valid].iter().all(|&m| m),
                "{n}: valid frames come first"
            );
            let padded = n.min(480_000).div_ceil(128) * 128;
            let formula = (padded + 160).checked_sub(321).map_or(0, |d| d / 160 + 1);
            assert_eq!(frames, formula, "{n}");
            let f = ex.extract(&vec![0.1; n]);
            assert_eq!((f.frames, f.features.len()), (frames, frames * 128), "{n}");
            assert_eq!(f.mask, mask, "{n}");
            for (t, row) in f.features.chunks(128).enumerate() {
                if mask[t] {
                    assert!(row.iter().any(|&v| v != 0.0), "{n}: frame {t}");
                } else {
                    assert!(row.iter().all(|&v| v == 0.0), "{n}: frame {t}");
                }
            }
        }
        // With the first-sample rule on the left-padded signal, frames starting in the left
        // padding are invalid; without zeroing, invalid frames keep their features.
        let first = MelConfig {
            frame_validity: FrameValidity::FirstSample,
            zero_invalid_frames: false,
            ..MelConfig::gemma4_extractor()
        };
        assert_eq!(first.frame_mask(800), vec![false, true, true, true, true]);
        let f = log_mel(&two_tone(16000, 0.05), &first);
        assert!(f.features[..128].iter().all(|&v| v != 0.0));
    }

    #[test]
    fn additive_floor_on_silence() {
        let f = log_mel(&[0.0; 2000], &MelConfig::gemma4_extractor());
        assert_eq!(f.mask.iter().filter(|&&m| m).count(), 12);
        for (t, row) in f.features.chunks(128).enumerate() {
            let want = if f.mask[t] {
                (1e-3f64).ln() as f32
            } else {
                0.0
            };
            assert!(row.iter().all(|&v| v == want), "frame {t}");
        }
        // ln(mel + floor) ≥ ln(max(mel, floor)), equal only where mel is 0.
        let x = two_tone(16000, 0.1);
        let add = log_mel(&x, &MelConfig::gemma4_extractor());
        let max = log_mel(
            &x,
            &MelConfig {
                log_floor: LogFloor::Max,
                ..MelConfig::gemma4_extractor()
            },
        );
        assert!(add.features.iter().zip(&max.features).all(|(a, m)| a >= m));
        assert!(add.features.iter().zip(&max.features).any(|(a, m)| a > m));
    }

    #[test]
    fn truncation_rounds_max_length_up_to_the_padding_multiple() {
        // transformers' `SequenceFeatureExtractor._truncate`: max_length 1000 with
        // pad_to_multiple_of 128 keeps 1024 samples. A hop of 170 lets the last frame reach them.
        let cfg = MelConfig {
            max_length: 1000,
            hop_length: 170,
            ..MelConfig::gemma3n_extractor()
        };
        let x = two_tone(16000, 0.3);
        let f = log_mel(&x, &cfg);
        assert_eq!((f.frames, cfg.num_frames(x.len())), (4, 4));
        assert_eq!(f.features, log_mel(&x[..1024], &cfg).features);
        assert_ne!(f.features, log_mel(&x[..1000], &cfg).features);
    }

    #[test]
    fn base_config_supplies_what_the_file_does_not_state() {
        use serde_json::json;
        let g4 = MelConfig::gemma4_extractor();
        let read = |v: serde_json::Value, base: &MelConfig| {
            MelConfig::from_preprocessor_config(&v, base.clone())
        };
        // A null or empty config gives the base back.
        let c = read(serde_json::Value::Null, &g4);
        assert_eq!(format!("{c:?}"), format!("{g4:?}"));
        // fft_overdrive defaults to the base's; a file's own flag wins. The left padding follows
        // the frame length.
        let c = read(json!({"frame_length_ms": 25.0}), &g4);
        assert_eq!(
            (c.frame_length, c.fft_length, c.pad_left()),
            (400, 512, 200)
        );
        assert_eq!(read(json!({"fft_overdrive": true}), &g4).fft_length, 1024);
        let c = read(
            json!({"frame_length": 320}),
            &MelConfig::gemma3n_extractor(),
        );
        assert_eq!(c.fft_length, 1024);
        // Behaviours that no file states stay the base's.
        let c = read(json!({"feature_size": 64, "mel_floor": 0.01}), &g4);
        assert_eq!(
            (
                c.window,
                c.log_floor,
                c.time_padding,
                c.frame_validity,
                c.zero_invalid_frames
            ),
            (
                HannWindow::Float64,
                LogFloor::Add,
                TimePadding::Semicausal,
                FrameValidity::LastSample,
                true
            )
        );
        // Per-bin statistics: nested as `to_dict()` saves them; null removes them; absent or of
        // the wrong length, the base's stay.
        let stats = MelConfig {
            per_bin_mean: Some(vec![1.0; 128]),
            per_bin_stddev: Some(vec![2.0; 128]),
            ..g4.clone()
        };
        let halves: Vec<f64> = (0..128).map(|i| f64::from(i) * 0.5).collect();
        let c = read(
            json!({"per_bin_mean": [[halves]], "per_bin_stddev": null}),
            &stats,
        );
        let want: Vec<f32> = (0..128u8).map(|i| f32::from(i) * 0.5).collect();
        assert_eq!((c.per_bin_mean, c.per_bin_stddev), (Some(want), None));
        let c = read(json!({"per_bin_mean": [1.0, 2.0]}), &stats);
        assert_eq!(
            (c.per_bin_mean, c.per_bin_stddev),
            (stats.per_bin_mean.clone(), stats.per_bin_stddev.clone())
        );
    }

    /// The window and filter bank of transformers' `Gemma4AudioFeatureExtractor`, default and
    /// custom, as `tools/fixtures/gemma4/mel_reference.py` recorded them. (The features
    /// themselves are compared in tests/media.rs.)
    #[test]
    fn gemma4_window_and_filters_match_transformers() {
        let path = fixtures().join("audio_gemma4/reference.json");
        let reference: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let extractors = reference["extractors"].as_object().unwrap();
        assert_eq!(extractors.len(), 2);
        for (name, ext) in extractors {
            let cfg = MelConfig::from_preprocessor_config(
                &ext["feature_extractor"],
                MelConfig::gemma4_extractor(),
            );
            let ex = MelExtractor::new(&cfg);
            let want: Vec<f32> = ext["window"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(ex.window, want, "{name}: window");
            // The float32-computed window of Gemma-3n would not do.
            let other = hann_window(cfg.frame_length, HannWindow::Float32);
            let differing = other.iter().zip(&want).filter(|(a, b)| a != b).count();
            eprintln!(
                "{name}: the float32 window differs in {differing} of {}",
                want.len()
            );
            assert!(differing > 0);

            let fb = &ext["mel_filters"];
            let ints = |key: &str| -> Vec<i64> {
                fb[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect()
            };
            let shape = ints("shape");
            let (n_freqs, n_mels) = (shape[0] as usize, shape[1] as usize);
            assert_eq!(
                (n_freqs, n_mels),
                (cfg.fft_length / 2 + 1, cfg.feature_size)
            );
            let dense = htk_mel_filter_bank(
                n_freqs,
                decimal_f64(cfg.min_frequency),
                decimal_f64(cfg.max_frequency),
                n_mels,
                cfg.sampling_rate,
                cfg.fft_length,
            );
            let col =
                |m: usize| -> Vec<f64> { (0..n_freqs).map(|k| dense[k * n_mels + m]).collect() };
            let nonzero = |c: &[f64], last: bool| -> i64 {
                let found = if last {
                    c.iter().rposition(|&w| w != 0.0)
                } else {
                    c.iter().position(|&w| w != 0.0)
                };
                found.map_or(-1, |k| k as i64)
            };
            let (first, last) = (ints("first_nonzero"), ints("last_nonzero"));
            let mut worst = 0.0f64;
            for (m, want) in fb["column_sums"].as_array().unwrap().iter().enumerate() {
                let c = col(m);
                assert_eq!(
                    (nonzero(&c, false), nonzero(&c, true)),
                    (first[m], last[m]),
                    "{name}: filter {m}"
                );
                let sum: f64 = c.iter().sum();
                worst = worst.max((sum - want.as_f64().unwrap()).abs());
            }
            eprintln!("{name}: filter column sums, max abs err {worst:e}");
            assert!(worst <= 1e-12, "{name}: {worst}");
        }
    }

    /// The strict reader follows transformers where a saved file could mislead it: sample counts come
    /// from the milliseconds (a saved count that disagrees is refused), and `dither` / `padding_value`
    /// other than the implemented 0 are refused rather than ignored.
    #[test]
    fn extractor_settings_refuse_what_transformers_would_read_otherwise() {
        let path = fixtures().join("tiny-gemma3n/preprocessor_config.json");
        let saved: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let read = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = saved.clone();
            edit(&mut v);
            MelConfig::from_extractor_settings(&v, MelConfig::gemma3n_extractor())
        };
        let c = read(&|_| {}).unwrap();
        assert_eq!((c.frame_length, c.hop_length), (512, 160));
        let e = read(&|v| v["frame_length"] = 400.into()).unwrap_err();
        assert_eq!(e.key, "frame_length");
        assert!(e.to_string().contains("uses 512"), "{e}");
        let e = read(&|v| v["hop_length"] = 100.into()).unwrap_err();
        assert_eq!(e.key, "hop_length");
        // Another rate without saved counts: the class's 32 / 10 ms at that rate.
        let c = read(&|v| {
            v["sampling_rate"] = 8000.into();
            let o = v.as_object_mut().unwrap();
            o.remove("frame_length");
            o.remove("hop_length");
        })
        .unwrap();
        assert_eq!((c.frame_length, c.hop_length), (256, 80));
        // Stated milliseconds decide, and the saved counts must agree with them.
        let c = read(&|v| {
            v["frame_length_ms"] = 25.0.into();
            v["frame_length"] = 400.into();
        })
        .unwrap();
        assert_eq!(c.frame_length, 400);
        for (key, value) in [("dither", 0.1), ("padding_value", -1.0)] {
            let e = read(&|v| v[key] = value.into()).unwrap_err();
            assert_eq!(e.key, key);
        }
    }
}
