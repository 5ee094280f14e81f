//! Container sniffing, decoding to a mono `f32` waveform, and sample-rate conversion.
//!
//! Decoding follows `soundfile`'s conventions (integer PCM scaled by `1 / 2^(bits-1)`, 8-bit
//! unsigned centred on 128, float passed through) and downmixes by averaging channels, so a 16-bit
//! WAV decodes to exactly the waveform a Python reference pipeline feeds its feature extractor.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};

use rubato::audioadapter_buffers::direct::SequentialSlice;
use rubato::{Fft, FixedSync, Resampler, WindowFunction};
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

use super::AudioError;

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

#[cfg(test)]
mod tests {
    use super::super::testutil::{fixtures, max_abs_diff, two_tone, wav_bytes, WavFormat};
    use super::*;
    use crate::error::ErrorClass;

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
}
