//! Audio decoding, resampling and log-mel features.
//!
//! Media code knows nothing about models: this module owns turning client audio bytes (WAV, FLAC,
//! MP3, Ogg Vorbis) into a mono `f32` waveform, converting its sample rate, and computing the
//! log-mel spectrogram of Hugging Face's `Gemma3nAudioFeatureExtractor` from parameters that callers
//! read out of a model's `preprocessor_config.json`.
//!
//! Decoding follows `soundfile`'s conventions (integer PCM scaled by `1 / 2^(bits-1)`, 8-bit
//! unsigned centred on 128, float passed through) and downmixes by averaging channels, so a 16-bit
//! WAV decodes to exactly the waveform the reference pipeline feeds its feature extractor.
//!
//! The features reproduce the reference's arithmetic where it matters for agreement to ~1e-6: the
//! waveform, pre-emphasis and Hann window stay in `f32` like the reference's NumPy `float32`
//! arrays (the window's cosine even uses NumPy's own float32 algorithm), the filterbank, mel
//! projection and logarithm are `f64` like the reference's `float64` filter matrix. Only the FFT
//! differs: NumPy 2 runs it in `float32`, we run it in `f64`, which costs at most ~1e-6.

use std::borrow::Cow;
use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};
use rubato::audioadapter_buffers::direct::SequentialSlice;
use rubato::{Fft, FixedSync, Resampler, WindowFunction};
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

use crate::error::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("unsupported audio format ({0}); supported: WAV, FLAC, MP3, Ogg Vorbis")]
    Unsupported(String),
    #[error("the audio could not be decoded: {0}")]
    Corrupt(String),
    #[error("the audio lasts {seconds:.2} s or more; the limit is {max_seconds} s")]
    TooLong { seconds: f64, max_seconds: f64 },
    /// For callers that cap encoded sizes; [`decode`] itself takes no byte limit.
    #[error("the audio is {bytes} bytes; the limit is {max} bytes")]
    TooLarge { bytes: usize, max: usize },
    #[error("the audio is empty")]
    Empty,
    #[error("the audio could not be resampled: {0}")]
    Resample(String),
}

impl AudioError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Unsupported(_) | Self::Corrupt(_) => ErrorClass::Unprocessable,
            Self::TooLong { .. } | Self::Empty => ErrorClass::InvalidRequest,
            Self::TooLarge { .. } => ErrorClass::PayloadTooLarge,
            Self::Resample(_) => ErrorClass::Internal,
        }
    }
}

/// A decoded clip, downmixed to mono.
#[derive(Debug, Clone)]
pub struct DecodedAudio {
    /// Mono samples: the average of the channels of each frame.
    pub samples: Vec<f32>,
    pub sample_rate: u32,
    /// The channel count of the stream, before the downmix.
    pub channels: usize,
    /// The container as sniffed: "wav", "flac", "mp3" or "ogg".
    pub format: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Wav,
    Flac,
    Mp3,
    Ogg,
}

impl Container {
    fn name(self) -> &'static str {
        match self {
            Self::Wav => "wav",
            Self::Flac => "flac",
            Self::Mp3 => "mp3",
            Self::Ogg => "ogg",
        }
    }

    /// Accepts OpenAI's `input_audio.format` values, file extensions and MIME types.
    fn from_hint(hint: &str) -> Option<Self> {
        let h = hint.trim().to_ascii_lowercase();
        let h = h
            .strip_prefix("audio/")
            .unwrap_or(&h)
            .trim_start_matches('.');
        match h {
            "wav" | "wave" | "x-wav" | "vnd.wave" => Some(Self::Wav),
            "flac" | "x-flac" => Some(Self::Flac),
            "mp3" | "mpeg" | "mpga" | "mpeg3" | "x-mpeg-3" => Some(Self::Mp3),
            "ogg" | "oga" | "vorbis" => Some(Self::Ogg),
            _ => None,
        }
    }
}

/// Recognises the container from its first bytes.
fn sniff(bytes: &[u8]) -> Option<Container> {
    if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WAVE" {
        return Some(Container::Wav);
    }
    if bytes.starts_with(b"fLaC") {
        return Some(Container::Flac);
    }
    if bytes.starts_with(b"OggS") {
        return Some(Container::Ogg);
    }
    if bytes.len() >= 10 && bytes.starts_with(b"ID3") {
        // An ID3v2 tag may sit in front of FLAC too; look past it (syncsafe size, optional footer).
        let size = bytes[6..10]
            .iter()
            .fold(0usize, |acc, &b| (acc << 7) | usize::from(b & 0x7f));
        let footer = if bytes[5] & 0x10 != 0 { 10 } else { 0 };
        let rest = bytes.get(10 + size + footer..).unwrap_or(&[]);
        return Some(if rest.starts_with(b"fLaC") {
            Container::Flac
        } else {
            Container::Mp3
        });
    }
    if is_mp3_frame_header(bytes) {
        return Some(Container::Mp3);
    }
    None
}

/// An MPEG audio layer III frame header: 11-bit sync, a valid version, a valid bitrate and
/// sample-rate index. ADTS (AAC) shares the sync but has layer bits 00, so it does not match.
fn is_mp3_frame_header(b: &[u8]) -> bool {
    b.len() >= 4
        && b[0] == 0xff
        && b[1] & 0xe0 == 0xe0
        && (b[1] >> 3) & 0b11 != 0b01
        && (b[1] >> 1) & 0b11 == 0b01
        && b[2] >> 4 != 0b1111
        && (b[2] >> 2) & 0b11 != 0b11
}

/// Sniffs the container from the bytes (RIFF/WAVE, fLaC, OggS, ID3 or MPEG frame sync) — the
/// `format_hint` (from the client) is only used when sniffing is inconclusive — and decodes all of it
/// with symphonia to mono f32 (average of channels). WAV 8/16/24/32-bit int and 32/64-bit float;
/// FLAC; MP3; Ogg Vorbis. Any sample rate / channel count. Never panics on any input. Stops decoding
/// and returns `TooLong` as soon as the decoded duration exceeds `max_seconds` (so a huge file is
/// not fully decoded); pass `f64::INFINITY` for no limit.
pub fn decode(
    bytes: &[u8],
    format_hint: Option<&str>,
    max_seconds: f64,
) -> Result<DecodedAudio, AudioError> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    let container = match (sniff(bytes), format_hint) {
        (Some(c), _) => c,
        (None, Some(hint)) => {
            Container::from_hint(hint).ok_or_else(|| AudioError::Unsupported(hint.to_string()))?
        }
        (None, None) => return Err(AudioError::Unsupported("unrecognised bytes".into())),
    };
    // Decoders of third-party crates are the one place malformed input could still reach a panic
    // (an index or an arithmetic overflow); the request fails, the worker stays up.
    catch_unwind(AssertUnwindSafe(|| {
        decode_container(bytes, container, max_seconds)
    }))
    .unwrap_or_else(|_| {
        Err(AudioError::Corrupt(format!(
            "the {} decoder failed",
            container.name()
        )))
    })
}

fn decode_container(
    bytes: &[u8],
    container: Container,
    max_seconds: f64,
) -> Result<DecodedAudio, AudioError> {
    let corrupt = |e: SymphoniaError| match e {
        SymphoniaError::Unsupported(what) => {
            AudioError::Unsupported(format!("{}: {what}", container.name()))
        }
        e => AudioError::Corrupt(format!("{}: {e}", container.name())),
    };
    let mss = MediaSourceStream::new(Box::new(Cursor::new(bytes)), Default::default());
    let mut reader = symphonia::default::get_probe()
        .probe(
            &Hint::new(),
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(|e| match e {
            // The bytes looked like a known container, so symphonia failing to find one is damage.
            SymphoniaError::Unsupported(_) => {
                AudioError::Corrupt(format!("{}: no valid stream found", container.name()))
            }
            e => corrupt(e),
        })?;
    let track = reader
        .default_track(TrackType::Audio)
        .ok_or_else(|| AudioError::Corrupt(format!("{}: no audio track", container.name())))?;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| {
            AudioError::Corrupt(format!("{}: no audio codec parameters", container.name()))
        })?
        .clone();
    let track_id = track.id;
    // WAV and FLAC state their exact length, and so does an MP3 with a LAME/Xing info header (it
    // carries the encoder delay too); other MP3 and Vorbis lengths are estimates.
    let declared_frames = match container {
        Container::Wav | Container::Flac => track.num_frames,
        Container::Mp3 if track.delay.is_some() => track.num_frames,
        _ => None,
    };
    let too_long = |seconds: f64| AudioError::TooLong {
        seconds,
        max_seconds,
    };
    // Refuse a long clip from its header before decoding anything.
    if let (Some(frames), Some(rate)) = (track.num_frames, params.sample_rate) {
        let seconds = frames as f64 / f64::from(rate.max(1));
        if seconds > max_seconds {
            return Err(too_long(seconds));
        }
    }
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(corrupt)?;

    let mut samples: Vec<f32> = Vec::new();
    let mut interleaved: Vec<f32> = Vec::new();
    let mut spec: Option<(u32, usize)> = None;
    let mut bad_packets = 0usize;
    loop {
        let packet = match reader.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            // The data ends inside a packet: an upload cut short. Players shrug this off; a model
            // would silently hear less than the client sent, so it is refused.
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(AudioError::Corrupt(format!(
                    "{}: the data is truncated",
                    container.name()
                )))
            }
            Err(e) => return Err(corrupt(e)),
        };
        if packet.track_id != track_id {
            continue;
        }
        let buf = match decoder.decode(&packet) {
            Ok(buf) => buf,
            // A damaged packet (a bad MP3 frame): counted, and the clip refused below.
            Err(SymphoniaError::DecodeError(_)) => {
                bad_packets += 1;
                continue;
            }
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(AudioError::Corrupt(format!(
                    "{}: the data is truncated",
                    container.name()
                )))
            }
            Err(e) => return Err(corrupt(e)),
        };
        let rate = buf.spec().rate();
        let channels = buf.spec().channels().count();
        if rate == 0 || channels == 0 {
            return Err(AudioError::Corrupt(format!(
                "{}: zero sample rate or channels",
                container.name()
            )));
        }
        match spec {
            None => spec = Some((rate, channels)),
            Some(s) if s != (rate, channels) => {
                return Err(AudioError::Corrupt(format!(
                    "{}: the stream changes format midway",
                    container.name()
                )))
            }
            Some(_) => {}
        }
        buf.copy_to_vec_interleaved::<f32>(&mut interleaved);
        downmix_into(&interleaved, channels, &mut samples);
        let seconds = samples.len() as f64 / f64::from(rate);
        if seconds > max_seconds {
            return Err(too_long(seconds));
        }
    }
    if bad_packets > 0 && !samples.is_empty() {
        return Err(AudioError::Corrupt(format!(
            "{}: {bad_packets} damaged packets (the data is corrupt in the middle)",
            container.name()
        )));
    }
    // A container that declares its length (WAV, FLAC) but holds less data was cut short.
    if let (Some(declared), Some((rate, _))) = (declared_frames, spec) {
        let got = samples.len() as u64;
        if got < declared {
            return Err(AudioError::Corrupt(format!(
                "{}: damaged or truncated: the header declares {:.2} s, the data holds {:.2} s",
                container.name(),
                declared as f64 / f64::from(rate),
                got as f64 / f64::from(rate)
            )));
        }
    }
    match spec {
        Some((sample_rate, channels)) if !samples.is_empty() => Ok(DecodedAudio {
            samples,
            sample_rate,
            channels,
            format: container.name(),
        }),
        _ if bad_packets > 0 => Err(AudioError::Corrupt(format!(
            "{}: none of {bad_packets} packets could be decoded",
            container.name()
        ))),
        _ => Err(AudioError::Empty),
    }
}

/// Appends the per-frame channel average. The sum runs in `f32` in channel order and is divided by
/// the count, which for stereo is exactly NumPy's `float32` `mean(axis=1)`. Non-finite samples
/// (possible only in float files) become silence so they cannot poison the features.
fn downmix_into(interleaved: &[f32], channels: usize, out: &mut Vec<f32>) {
    let clean = |v: f32| if v.is_finite() { v } else { 0.0 };
    if channels == 1 {
        out.extend(interleaved.iter().map(|&v| clean(v)));
        return;
    }
    let n = channels as f32;
    out.extend(
        interleaved
            .chunks_exact(channels)
            .map(|frame| frame.iter().fold(0.0f32, |acc, &v| acc + clean(v)) / n),
    );
}

/// Highest sample rate [`resample`] accepts (8 × 192 kHz); its FFT sizes grow with the rates.
pub const MAX_SAMPLE_RATE: u32 = 1_536_000;

/// High-quality resampling to `to_rate`; identity (a bit-exact copy) when the rates are equal.
/// The output has `round(len * to / from)` samples and is aligned with the input.
///
/// Uses rubato's synchronous FFT resampler (a windowed-sinc low-pass applied in the frequency
/// domain; Blackman-Harris² window, cutoff ≥ 0.98 of the lower Nyquist frequency with FFTs of
/// about 2048 frames). Both FFT sizes are kept even so the resampler's delay is a whole number
/// of frames on both sides and trimming it leaves no fractional-sample shift: a sine resampled
/// 44.1/48/22.05 → 16 kHz matches the sine generated at 16 kHz to ~1e-6 RMS. (rubato's
/// asynchronous sinc resampler truncates a fractional delay, leaving up to a one-sample shift,
/// and is ~8× slower.)
pub fn resample(samples: &[f32], from_rate: u32, to_rate: u32) -> Result<Vec<f32>, AudioError> {
    let valid = 1..=MAX_SAMPLE_RATE;
    if !valid.contains(&from_rate) || !valid.contains(&to_rate) {
        return Err(AudioError::Resample(format!(
            "sample rates must be 1..={MAX_SAMPLE_RATE} Hz, got {from_rate} -> {to_rate}"
        )));
    }
    if from_rate == to_rate {
        return Ok(samples.to_vec());
    }
    if samples.is_empty() {
        return Ok(Vec::new());
    }
    let (from, to) = (from_rate as usize, to_rate as usize);
    let out_len =
        usize::try_from((samples.len() as u128 * to as u128 + from as u128 / 2) / from as u128)
            .map_err(|_| AudioError::Resample("output too long".into()))?;
    // The FFT sizes are fft_chunks × (rate / gcd): an even count, large enough that the bigger
    // side is about 2048 frames.
    let g = gcd(from, to);
    let (min_in, min_out) = (from / g, to / g);
    let fft_chunks = 2048usize.div_ceil(min_in.max(min_out)).next_multiple_of(2);
    let run = || -> Result<Vec<f32>, AudioError> {
        let err = |e: &dyn std::fmt::Display| AudioError::Resample(e.to_string());
        let mut resampler = Fft::<f32>::new_custom(
            from,
            to,
            fft_chunks * min_in,
            1,
            1,
            WindowFunction::BlackmanHarris2,
            FixedSync::Both,
        )
        .map_err(|e| err(&e))?;
        let input = SequentialSlice::new(samples, 1, samples.len()).map_err(|e| err(&e))?;
        let mut out = resampler
            .process_all(&input, samples.len(), None)
            .map_err(|e| err(&e))?
            .take_data();
        // process_all yields ceil(len · ratio) frames; the contract is the rounded length.
        out.resize(out_len, 0.0);
        Ok(out)
    };
    catch_unwind(AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err(AudioError::Resample("the resampler failed".into())))
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Parameters of the log-mel front end, named as `Gemma3nAudioFeatureExtractor` names them.
#[derive(Debug, Clone)]
pub struct MelConfig {
    /// Expected input rate in Hz; the extractor does not resample.
    pub sampling_rate: u32,
    /// Number of mel bins.
    pub feature_size: usize,
    /// Window length in samples (32 ms).
    pub frame_length: usize,
    /// Frame step in samples (10 ms).
    pub hop_length: usize,
    /// FFT size; `fft_length / 2 + 1` frequency bins.
    pub fft_length: usize,
    pub min_frequency: f32,
    pub max_frequency: f32,
    /// Pre-emphasis coefficient; 0 disables it.
    pub preemphasis: f32,
    /// HTK flavour: the first sample of a frame is scaled by `1 - preemphasis`.
    pub preemphasis_htk_flavor: bool,
    pub mel_floor: f32,
    pub input_scale_factor: f32,
    pub per_bin_mean: Option<Vec<f32>>,
    pub per_bin_stddev: Option<Vec<f32>>,
    /// Zero-pad the waveform to a multiple of this many samples (0 or 1: no padding).
    pub pad_to_multiple_of: usize,
    /// Longer waveforms are truncated to this many samples (0: no limit).
    pub max_length: usize,
}

impl MelConfig {
    /// Gemma3nAudioFeatureExtractor defaults (16 kHz, 128 bins, 32 ms frames → 512, 10 ms hop → 160,
    /// fft_overdrive → 1024, 125–7600 Hz, preemphasis 0.97 HTK flavour, mel_floor 1e-5, pad to
    /// multiple of 128, max_length 480000).
    pub fn gemma3n_default() -> Self {
        Self {
            sampling_rate: 16_000,
            feature_size: 128,
            frame_length: 512,
            hop_length: 160,
            fft_length: 1024,
            min_frequency: 125.0,
            max_frequency: 7600.0,
            preemphasis: 0.97,
            preemphasis_htk_flavor: true,
            mel_floor: 1e-5,
            input_scale_factor: 1.0,
            per_bin_mean: None,
            per_bin_stddev: None,
            pad_to_multiple_of: 128,
            max_length: 480_000,
        }
    }

    /// Reads `preprocessor_config.json` values over the defaults, the way the HF extractor
    /// interprets them on load. `frame_length_ms` / `hop_length_ms` win over the sample counts
    /// `to_dict()` also saves, and `fft_length` is recomputed from the frame length and
    /// `fft_overdrive` rather than read, because transformers' `__init__` does the same. A nested
    /// `feature_extractor` object (transformers 5 `processor_config.json`) is read if present.
    /// Missing or invalid values keep their defaults.
    pub fn from_preprocessor_config(v: &serde_json::Value) -> Self {
        let v = match v.get("feature_extractor") {
            Some(fe) if fe.is_object() => fe,
            _ => v,
        };
        let mut c = Self::gemma3n_default();
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
        let frame = num("frame_length_ms")
            .map(samples_of_ms)
            .or_else(|| num("frame_length"));
        if let Some(f) = frame.filter(|f| f.is_finite() && *f >= 1.0) {
            c.frame_length = f as usize;
        }
        let hop = num("hop_length_ms")
            .map(samples_of_ms)
            .or_else(|| num("hop_length"));
        if let Some(h) = hop.filter(|h| h.is_finite() && *h >= 1.0) {
            c.hop_length = h as usize;
        }
        let overdrive = flag("fft_overdrive").unwrap_or(true);
        c.fft_length = c.frame_length.next_power_of_two() * if overdrive { 2 } else { 1 };
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
        let per_bin = |key: &str| -> Option<Vec<f32>> {
            let values: Vec<f32> = v
                .get(key)?
                .as_array()?
                .iter()
                .filter_map(json_number)
                .map(|x| x as f32)
                .collect();
            if values.len() == c.feature_size {
                Some(values)
            } else {
                tracing::warn!(
                    key,
                    len = values.len(),
                    feature_size = c.feature_size,
                    "ignoring per-bin statistics of the wrong length"
                );
                None
            }
        };
        c.per_bin_mean = per_bin("per_bin_mean");
        c.per_bin_stddev = per_bin("per_bin_stddev");
        if let Some(m) = count("pad_to_multiple_of") {
            c.pad_to_multiple_of = m;
        }
        if let Some(m) = count("max_length") {
            c.max_length = m;
        }
        c
    }
}

/// A number, or a one-element list of one (NumPy 0-d arrays such as `mel_floor` are saved either way).
fn json_number(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Array(a) if a.len() == 1 => a[0].as_f64(),
        v => v.as_f64(),
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
    /// True for frames that start on a real sample, false for frames that start in the padding.
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
        let n = cfg.frame_length;
        // Periodic Hann computed in float32 as the reference does: 0.5·(1 − cos(2π·i/n)).
        let two_pi = (2.0 * std::f64::consts::PI) as f32;
        let window = (0..n)
            .map(|i| 0.5f32 * (1.0f32 - numpy_cos_f32(two_pi * i as f32 / n as f32)))
            .collect();
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

    /// Number of frames for `num_samples` input samples, after truncation and padding.
    pub fn num_frames(&self, num_samples: usize) -> usize {
        let cfg = &self.cfg;
        let len = if cfg.max_length > 0 {
            num_samples.min(cfg.max_length)
        } else {
            num_samples
        };
        let padded = if cfg.pad_to_multiple_of > 1 {
            len.div_ceil(cfg.pad_to_multiple_of) * cfg.pad_to_multiple_of
        } else {
            len
        };
        let window = cfg.frame_length + 1;
        if padded >= window {
            (padded - window) / cfg.hop_length + 1
        } else {
            0
        }
    }

    /// Exactly the HF `Gemma3nAudioFeatureExtractor` on one clip (mono, at `sampling_rate`).
    pub fn extract(&self, samples: &[f32]) -> MelFeatures {
        let cfg = &self.cfg;
        let real_len = if cfg.max_length > 0 {
            samples.len().min(cfg.max_length)
        } else {
            samples.len()
        };
        let mut wave = Cow::Borrowed(&samples[..real_len]);
        if cfg.input_scale_factor != 1.0 {
            wave = Cow::Owned(wave.iter().map(|&v| v * cfg.input_scale_factor).collect());
        }
        let frames = self.num_frames(samples.len());
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
        for t in 0..frames {
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
                let mut v = mel.max(self.mel_floor).ln();
                if let Some(mean) = &self.mean {
                    v -= mean[bin];
                }
                if let Some(std) = &self.stddev {
                    v /= std[bin];
                }
                features.push(v as f32);
            }
        }
        // attention_mask[::hop][:frames]: a frame is valid when its first sample is real.
        let mask = (0..frames).map(|t| t * cfg.hop_length < real_len).collect();
        MelFeatures {
            features,
            frames,
            mask,
        }
    }
}

/// Exactly the HF Gemma3nAudioFeatureExtractor on one clip (16 kHz mono input): truncate to
/// `max_length`, zero-pad to a multiple of `pad_to_multiple_of`, frame with window `frame_length+1`
/// and `hop_length` (no centering), HTK pre-emphasis, periodic Hann, `|rfft(fft_length)|`, HTK mel
/// filterbank, `ln(max(mel, mel_floor))`, optional per-bin normalisation. Builds a [`MelExtractor`]
/// per call; keep one to reuse its plan and filterbank.
pub fn log_mel(samples: &[f32], cfg: &MelConfig) -> MelFeatures {
    MelExtractor::new(cfg).extract(samples)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    // ------------------------------------------------------------------ helpers

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    /// Deterministic xorshift64* bytes for the fuzz-ish tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[derive(Debug)]
    enum Npy {
        F32(Vec<usize>, Vec<f32>),
        Bool(Vec<bool>),
    }

    /// A minimal `.npy` reader: format v1–v3, `<f4` or `|b1`, C order.
    fn read_npy(path: &Path) -> Npy {
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
    enum WavFormat {
        U8,
        S16,
        S24,
        S32,
        F32,
        F64,
    }

    /// A canonical RIFF/WAVE file of interleaved `samples`, each already in the target's range
    /// (integers as integer values, floats as floats).
    fn wav_bytes(format: WavFormat, rate: u32, channels: u16, samples: &[f64]) -> Vec<u8> {
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
    fn two_tone(rate: u32, seconds: f64) -> Vec<f32> {
        let n = (f64::from(rate) * seconds).round() as usize;
        (0..n)
            .map(|i| {
                let t = i as f64 / f64::from(rate);
                (0.5 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()
                    + 0.25 * (2.0 * std::f64::consts::PI * 1234.5 * t).sin()) as f32
            })
            .collect()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn rms_diff(a: &[f32], b: &[f32]) -> f64 {
        let n = a.len().min(b.len());
        (a[..n]
            .iter()
            .zip(&b[..n])
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum::<f64>()
            / n as f64)
            .sqrt()
    }

    fn allowed_error(e: &AudioError) -> bool {
        matches!(
            e,
            AudioError::Unsupported(_) | AudioError::Corrupt(_) | AudioError::Empty
        )
    }

    // ------------------------------------------------------------------ decoding

    #[test]
    fn sniffs_containers_and_uses_the_hint_only_when_inconclusive() {
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt "), Some(Container::Wav));
        assert_eq!(sniff(b"fLaC\0\0\0\x22"), Some(Container::Flac));
        assert_eq!(sniff(b"OggS\0\x02"), Some(Container::Ogg));
        assert_eq!(sniff(b"ID3\x04\0\0\0\0\0\x00rest"), Some(Container::Mp3));
        assert_eq!(sniff(b"ID3\x04\0\0\0\0\0\x02..fLaC"), Some(Container::Flac));
        assert_eq!(sniff(&[0xff, 0xfb, 0x90, 0x64]), Some(Container::Mp3));
        // ADTS AAC shares the sync word but not the layer bits.
        assert_eq!(sniff(&[0xff, 0xf1, 0x50, 0x80]), None);
        assert_eq!(sniff(b"RIFF\0\0\0\0AVI "), None);
        assert_eq!(Container::from_hint("audio/x-wav"), Some(Container::Wav));
        assert_eq!(Container::from_hint("MP3"), Some(Container::Mp3));
        assert_eq!(Container::from_hint(".flac"), Some(Container::Flac));
        assert_eq!(Container::from_hint("aac"), None);
        assert!(matches!(
            decode(b"not audio at all", Some("aac"), 30.0),
            Err(AudioError::Unsupported(_))
        ));
        assert!(matches!(
            decode(b"not audio at all", None, 30.0),
            Err(AudioError::Unsupported(_))
        ));
        // The hint is ignored when the bytes say otherwise.
        let wav = wav_bytes(WavFormat::S16, 8000, 1, &[0.0, 16384.0, -32768.0]);
        let d = decode(&wav, Some("mp3"), 30.0).unwrap();
        assert_eq!(
            (d.format, d.samples.as_slice()),
            ("wav", &[0.0, 0.5, -1.0][..])
        );
    }

    #[test]
    fn decodes_every_wav_sample_format_like_soundfile() {
        // (format, stored integer/float values, expected f32 after soundfile-style scaling)
        let ints = [-3.0, -1.0, 0.0, 1.0, 7.0];
        let cases: Vec<(WavFormat, Vec<f64>, Vec<f32>)> = vec![
            (
                WavFormat::U8,
                vec![0.0, 64.0, 128.0, 200.0, 255.0],
                vec![-1.0, -0.5, 0.0, 72.0 / 128.0, 127.0 / 128.0],
            ),
            (
                WavFormat::S16,
                vec![-32768.0, -1.0, 0.0, 12345.0, 32767.0],
                vec![
                    -1.0,
                    -1.0 / 32768.0,
                    0.0,
                    12345.0 / 32768.0,
                    32767.0 / 32768.0,
                ],
            ),
            (
                WavFormat::S24,
                vec![-8_388_608.0, -1.0, 0.0, 4_000_000.0, 8_388_607.0],
                vec![
                    -1.0,
                    -1.0 / 8_388_608.0,
                    0.0,
                    (4_000_000.0f64 / 8_388_608.0) as f32,
                    (8_388_607.0f64 / 8_388_608.0) as f32,
                ],
            ),
            (
                WavFormat::S32,
                ints.iter().map(|x| x * 100_000_000.0).collect(),
                ints.iter()
                    .map(|x| (x * 100_000_000.0 / 2_147_483_648.0) as f32)
                    .collect(),
            ),
            (
                WavFormat::F32,
                vec![-0.75, 0.1, 0.0, 0.3, 1.5],
                vec![-0.75, 0.1, 0.0, 0.3, 1.5],
            ),
            (
                WavFormat::F64,
                vec![-0.75, 0.1, 0.0, 0.3, 1.5],
                vec![-0.75, 0.1, 0.0, 0.3, 1.5],
            ),
        ];
        for (format, stored, expected) in cases {
            for rate in [8000, 22050, 48000] {
                let d = decode(&wav_bytes(format, rate, 1, &stored), None, 30.0).unwrap();
                assert_eq!((d.sample_rate, d.channels, d.format), (rate, 1, "wav"));
                assert_eq!(d.samples, expected);
            }
        }
    }

    #[test]
    fn downmixes_by_averaging_channels() {
        let stereo = [0.5, -0.25, 1.0, 1.0, -1.0, 0.0];
        let d = decode(&wav_bytes(WavFormat::F32, 44100, 2, &stereo), None, 30.0).unwrap();
        assert_eq!(
            (d.channels, d.samples.as_slice()),
            (2, &[0.125f32, 1.0, -0.5][..])
        );
        let six: Vec<f64> = (0..12).map(|i| f64::from(i) * 1000.0).collect();
        let d = decode(&wav_bytes(WavFormat::S16, 16000, 6, &six), None, 30.0).unwrap();
        assert_eq!(d.channels, 6);
        assert_eq!(d.samples, vec![2500.0 / 32768.0, 8500.0 / 32768.0]);
        // Non-finite float samples become silence.
        let d = decode(
            &wav_bytes(WavFormat::F32, 16000, 1, &[f64::NAN, f64::INFINITY, 0.5]),
            None,
            30.0,
        )
        .unwrap();
        assert_eq!(d.samples, vec![0.0, 0.0, 0.5]);
    }

    #[test]
    fn empty_and_silent_inputs() {
        assert!(matches!(decode(&[], None, 30.0), Err(AudioError::Empty)));
        assert!(matches!(
            decode(&[], Some("wav"), 30.0),
            Err(AudioError::Empty)
        ));
        let no_frames = wav_bytes(WavFormat::S16, 16000, 1, &[]);
        assert!(matches!(
            decode(&no_frames, None, 30.0),
            Err(AudioError::Empty)
        ));
    }

    #[test]
    fn too_long_is_refused_early() {
        let forty_seconds = vec![0.0; 16000 * 40];
        let wav = wav_bytes(WavFormat::S16, 16000, 1, &forty_seconds);
        match decode(&wav, None, 30.0) {
            Err(AudioError::TooLong {
                seconds,
                max_seconds,
            }) => {
                assert_eq!(max_seconds, 30.0);
                assert!((seconds - 40.0).abs() < 1e-9, "{seconds}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(decode(&wav, None, 40.0).unwrap().samples.len(), 16000 * 40);
        assert_eq!(
            decode(&wav, None, f64::INFINITY).unwrap().samples.len(),
            16000 * 40
        );
        let e = decode(&wav, None, 30.0).unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidRequest);
    }

    #[test]
    fn random_and_damaged_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let hints = [
            None,
            Some("wav"),
            Some("mp3"),
            Some("flac"),
            Some("ogg"),
            Some("m4a"),
        ];
        for i in 0..200 {
            let len = (rng.next() % 4096) as usize;
            let bytes = rng.bytes(len);
            for hint in hints {
                if let Err(e) = decode(&bytes, hint, 30.0) {
                    assert!(allowed_error(&e), "random input {i}: {e:?}");
                }
            }
        }
        // Valid headers followed by garbage, truncations and bit flips of every fixture file.
        let mut corpora: Vec<Vec<u8>> = vec![wav_bytes(WavFormat::S24, 16000, 2, &[1000.0; 2000])];
        for name in [
            "two_tone_16k_s16.wav",
            "tones_44k1_stereo_f32.wav",
            "sweep_16k.flac",
            "two_tone_16k.mp3",
        ] {
            corpora.push(std::fs::read(fixtures().join("media").join(name)).unwrap());
        }
        for magic in [
            &b"RIFF\x10\0\0\0WAVEfmt "[..],
            b"fLaC",
            b"OggS",
            b"ID3\x03\0\0\0\0\0\0",
            &[0xff, 0xfb, 0x90, 0x64],
        ] {
            for _ in 0..20 {
                let mut bytes = magic.to_vec();
                let len = (rng.next() % 2048) as usize;
                bytes.extend(rng.bytes(len));
                if let Err(e) = decode(&bytes, None, 30.0) {
                    assert!(allowed_error(&e), "{e:?}");
                }
            }
        }
        for file in &corpora {
            let mut cuts: Vec<usize> = (0..64.min(file.len())).collect();
            cuts.extend((0..40).map(|_| (rng.next() as usize) % file.len()));
            for cut in cuts {
                if let Err(e) = decode(&file[..cut], None, 30.0) {
                    assert!(allowed_error(&e), "cut at {cut}: {e:?}");
                }
            }
            for _ in 0..40 {
                let mut damaged = file.clone();
                for _ in 0..1 + rng.next() % 8 {
                    let at = (rng.next() as usize) % damaged.len();
                    damaged[at] ^= 1 << (rng.next() % 8);
                }
                if let Err(e) = decode(&damaged, None, 30.0) {
                    assert!(
                        allowed_error(&e) || matches!(e, AudioError::TooLong { .. }),
                        "{e:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn decodes_the_fixture_media() {
        let media = fixtures().join("media");
        let read = |name: &str| std::fs::read(media.join(name)).unwrap();

        // 16-bit WAV: exactly round(32767·x) / 32768.
        let d = decode(&read("two_tone_16k_s16.wav"), Some("wav"), 30.0).unwrap();
        assert_eq!((d.format, d.sample_rate, d.channels), ("wav", 16000, 1));
        let expected: Vec<f32> = two_tone(16000, 2.5)
            .iter()
            .map(|&x| (f64::from(x) * 32767.0).round() as f32 / 32768.0)
            .collect();
        let err = max_abs_diff(&d.samples, &expected);
        assert!(err <= 1.0 / 32768.0 + 1e-9, "{err}");

        // FLAC: the chirp round(32767·0.6·sin(2π(200t + 400t²))·env) / 32768, bit-exact.
        let d = decode(&read("sweep_16k.flac"), None, 30.0).unwrap();
        assert_eq!(
            (d.format, d.sample_rate, d.channels, d.samples.len()),
            ("flac", 16000, 1, 32000)
        );
        let chirp: Vec<f32> = (0..32000)
            .map(|i| {
                let t = f64::from(i) / 16000.0;
                let env = (10.0 * t).min(10.0 * (2.0 - t)).min(1.0);
                let x =
                    0.6 * (2.0 * std::f64::consts::PI * (200.0 * t + 400.0 * t * t)).sin() * env;
                (x.clamp(-1.0, 1.0) * 32767.0).round_ties_even() as f32 / 32768.0
            })
            .collect();
        let err = max_abs_diff(&d.samples, &chirp);
        eprintln!("flac vs formula: max abs err {err:e}");
        assert!(err <= 1.0 / 32768.0 + 1e-9, "{err}");

        // Float stereo at 44.1 kHz: the average of L = 0.4 sin(2π660t) and R = 0.3 sin(2π990t).
        let d = decode(&read("tones_44k1_stereo_f32.wav"), None, 30.0).unwrap();
        assert_eq!(
            (d.format, d.sample_rate, d.channels, d.samples.len()),
            ("wav", 44100, 2, 11025)
        );
        let tone = |rate: u32, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    let t = i as f64 / f64::from(rate);
                    let l = (0.4 * (2.0 * std::f64::consts::PI * 660.0 * t).sin()) as f32;
                    let r = (0.3 * (2.0 * std::f64::consts::PI * 990.0 * t).sin()) as f32;
                    (l + r) / 2.0
                })
                .collect()
        };
        let err = max_abs_diff(&d.samples, &tone(44100, 11025));
        assert!(err <= 1e-6, "{err}");
        // Resampled to 16 kHz it matches the same tones generated at 16 kHz.
        let resampled = resample(&d.samples, 44100, 16000).unwrap();
        assert_eq!(resampled.len(), 4000);
        let skip = 200;
        let rms = rms_diff(
            &resampled[skip..4000 - skip],
            &tone(16000, 4000)[skip..4000 - skip],
        );
        eprintln!("44.1k stereo -> 16k: rms err {rms:e}");
        assert!(rms < 1e-4, "{rms}");

        // MP3 (lossy): the right length and the two-tone signal within coding noise.
        let d = decode(&read("two_tone_16k.mp3"), None, 30.0).unwrap();
        assert_eq!((d.format, d.sample_rate, d.channels), ("mp3", 16000, 1));
        let seconds = d.samples.len() as f64 / 16000.0;
        eprintln!("mp3: {} samples = {seconds} s", d.samples.len());
        assert!((seconds - 1.5).abs() <= 0.05, "{seconds}");
        let reference = two_tone(16000, 1.5);
        let rms = rms_diff(&d.samples[1600..22400], &reference[1600..22400]);
        eprintln!("mp3 vs formula: rms err {rms:e}");
        assert!(rms < 0.02, "{rms}");
        assert!(matches!(
            decode(&read("two_tone_16k.mp3"), None, 1.0),
            Err(AudioError::TooLong { .. })
        ));
    }

    /// Whatever audio `make_media.py` writes (an Ogg Vorbis file, if one is added, is covered here
    /// too): the rate, channel count and length that soundfile reported in the manifest.
    #[test]
    fn every_audio_file_in_the_media_manifest_decodes() {
        let media = fixtures().join("media");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(media.join("manifest.json")).unwrap()).unwrap();
        let mut checked = 0;
        for (name, info) in manifest["files"].as_object().unwrap() {
            let Some(rate) = info.get("samplerate").and_then(|v| v.as_u64()) else {
                continue;
            };
            let d = decode(&std::fs::read(media.join(name)).unwrap(), None, 30.0).unwrap();
            let frames = info["frames"].as_u64().unwrap() as usize;
            assert_eq!(u64::from(d.sample_rate), rate, "{name}");
            assert_eq!(
                d.channels as u64,
                info["channels"].as_u64().unwrap(),
                "{name}"
            );
            let lossy = matches!(
                info["subtype"].as_str(),
                Some("MPEG_LAYER_III" | "VORBIS" | "OPUS")
            );
            let slack = if lossy { rate as usize / 20 } else { 0 };
            assert!(
                d.samples.len().abs_diff(frames) <= slack,
                "{name}: {} vs {frames}",
                d.samples.len()
            );
            let extension = name.rsplit('.').next().unwrap();
            assert_eq!(
                d.format,
                if extension == "oga" { "ogg" } else { extension },
                "{name}"
            );
            checked += 1;
        }
        assert!(checked >= 4, "{checked}");
    }

    // ------------------------------------------------------------------ resampling

    #[test]
    fn resample_identity_is_bit_exact_and_lengths_round() {
        let x: Vec<f32> = (0..1001)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        assert_eq!(resample(&x, 16000, 16000).unwrap(), x);
        assert_eq!(resample(&[], 44100, 16000).unwrap(), Vec::<f32>::new());
        for (n, from, to) in [
            (1001, 44100, 16000),
            (441, 44100, 16000),
            (10, 8000, 16000),
            (3, 48000, 16000),
            (1, 48000, 16000),
        ] {
            let expected = ((n as u64 * to + from / 2) / from) as usize;
            assert_eq!(
                resample(&x[..n], from as u32, to as u32).unwrap().len(),
                expected,
                "{n} {from} {to}"
            );
        }
        assert!(matches!(
            resample(&x, 0, 16000),
            Err(AudioError::Resample(_))
        ));
        assert!(matches!(
            resample(&x, 16000, MAX_SAMPLE_RATE + 1),
            Err(AudioError::Resample(_))
        ));
        assert_eq!(resample(&x[..30], 1, 16000).unwrap().len(), 480_000);
    }

    #[test]
    fn resample_keeps_frequency_and_amplitude() {
        let sine = |rate: u32, n: usize, f: f64, a: f64| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    (a * (2.0 * std::f64::consts::PI * f * i as f64 / f64::from(rate)).sin()) as f32
                })
                .collect()
        };
        let cases = [
            (44100u32, 1000.0, 1.0),
            (44100, 7500.0, 0.3),
            (48000, 7000.0, 0.5),
            (22050, 5000.0, 0.7),
            (8000, 1000.0, 1.0),
            (11025, 3000.0, 0.4),
        ];
        for (from, freq, seconds) in cases {
            let n = (f64::from(from) * seconds) as usize;
            let out = resample(&sine(from, n, freq, 0.8), from, 16000).unwrap();
            let reference = sine(16000, out.len(), freq, 0.8);
            // The ends see the zero padding outside the clip.
            let skip = 300;
            let rms = rms_diff(
                &out[skip..out.len() - skip],
                &reference[skip..out.len() - skip],
            );
            eprintln!("{from} -> 16000, {freq} Hz sine: rms err {rms:e}");
            assert!(rms < 1e-4, "{from} {freq}: {rms}");
        }
        // Above the new Nyquist frequency a tone is removed, not aliased.
        let out = resample(&sine(48000, 48000, 12000.0, 0.8), 48000, 16000).unwrap();
        let level = (out[512..out.len() - 512]
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            / (out.len() - 1024) as f64)
            .sqrt();
        assert!(level < 1e-3, "{level}");
    }

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
        let ex = MelExtractor::new(&MelConfig::gemma3n_default());
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
        let ex = MelExtractor::new(&MelConfig::gemma3n_default());
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
        let f = log_mel(&two_tone(16000, 2.5), &MelConfig::gemma3n_default());
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
            ..MelConfig::gemma3n_default()
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
            ..MelConfig::gemma3n_default()
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
        let cfg = MelConfig::from_preprocessor_config(&json);
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
        let cfg = MelConfig::from_preprocessor_config(&v);
        let d = MelConfig::gemma3n_default();
        assert_eq!(format!("{cfg:?}"), format!("{d:?}"));

        let custom = serde_json::json!({
            "feature_extractor": {
                "sampling_rate": 8000, "feature_size": 64, "frame_length": 256, "hop_length": 80,
                "fft_length": 4096, "mel_floor": [0.001], "preemphasis_htk_flavor": false,
                "per_bin_mean": vec![0.5; 64], "per_bin_stddev": vec![2.0; 3],
                "pad_to_multiple_of": 64, "max_length": 80000,
            }
        });
        let c = MelConfig::from_preprocessor_config(&custom);
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
        let c = MelConfig::from_preprocessor_config(&bad);
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
            ..MelConfig::gemma3n_default()
        };
        let f = log_mel(&[0.5; 300], &cfg);
        assert_eq!(f.features.len(), f.frames * 128);
        let cfg = MelConfig {
            feature_size: 0,
            ..MelConfig::gemma3n_default()
        };
        assert!(log_mel(&[0.5; 3000], &cfg).features.is_empty());
    }

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
        let ex = MelExtractor::new(&MelConfig::gemma3n_default());
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
