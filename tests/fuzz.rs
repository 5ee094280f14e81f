//! Bounded-time fuzzing in the normal test suite: hostile request JSON, image bytes, audio bytes,
//! chat-template content, and the text path behind SSE (detokenization + stop strings). Each target
//! runs for `FUZZ_SECONDS` (default 2) with a fixed seed plus `FUZZ_SEED`, mutating real inputs
//! (golden requests, fixture media) and generating random ones. Any panic fails the test.
//!
//! Longer run: `FUZZ_SECONDS=600 cargo test --release --test fuzz -- --nocapture --test-threads=1`.

mod common;

use std::time::{Duration, Instant};

use common::{fixture_dir, goldens, model, root};
use onnx_chat::protocol::{ChatMessage, ContentPart, Role};
use serde_json::{json, Value};

struct Rng(u64);

impl Rng {
    fn new(salt: u64) -> Self {
        let seed = std::env::var("FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0u64);
        Self((seed ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn budget() -> Duration {
    Duration::from_secs_f64(
        std::env::var("FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2.0),
    )
}

/// Runs `f` on generated inputs until the time budget is spent; returns how many ran.
fn run(name: &str, salt: u64, mut f: impl FnMut(&mut Rng)) -> usize {
    let mut rng = Rng::new(salt);
    let (t0, budget) = (Instant::now(), budget());
    let mut n = 0;
    while t0.elapsed() < budget || n < 50 {
        f(&mut rng);
        n += 1;
    }
    eprintln!("fuzz {name}: {n} inputs, 0 panics");
    n
}

/// Byte-level mutations: flips, overwrites, inserts, deletes, truncation, splices of known tokens.
fn mutate(rng: &mut Rng, input: &[u8], dictionary: &[&[u8]]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let len = 1 + rng.below(16);
                let extra = rng.bytes(len);
                v.splice(i..i, extra);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                let j = (i + 1 + rng.below(32)).min(v.len());
                v.drain(i..j);
            }
            4 => v.truncate(rng.below(v.len() + 1)),
            5 if !dictionary.is_empty() => {
                let i = rng.below(v.len() + 1);
                let w = dictionary[rng.below(dictionary.len())];
                v.splice(i..i, w.iter().copied());
            }
            _ => {
                // Set a 32-bit field to an extreme value (sizes, counts, dimensions).
                if v.len() >= 4 {
                    let i = rng.below(v.len() - 3);
                    let x = [0u32, 1, 0x7FFF_FFFF, 0xFFFF_FFFF, 30000][rng.below(5)];
                    v[i..i + 4].copy_from_slice(&x.to_be_bytes());
                }
            }
        }
    }
    v
}

fn random_json(rng: &mut Rng, depth: usize) -> Value {
    const KEYS: &[&str] = &[
        "model",
        "messages",
        "role",
        "content",
        "type",
        "text",
        "image_url",
        "url",
        "input_audio",
        "data",
        "format",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "stream",
        "stream_options",
        "include_usage",
        "n",
        "images",
        "tools",
        "response_format",
        "logprobs",
        "ignore_eos",
    ];
    const STRINGS: &[&str] = &[
        "user",
        "system",
        "assistant",
        "tool",
        "text",
        "image_url",
        "input_audio",
        "tiny-gemma3n",
        "data:image/png;base64,AAAA",
        "http://127.0.0.1/x",
        "",
        "\u{0}",
        "{{ raise_exception('x') }}",
        "<start_of_turn>",
        "<image_soft_token>",
        "wav",
        "🙂",
        "\n\n",
    ];
    match rng.below(if depth > 4 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 1),
        2 => json!([0i64, 1, -1, 2, 4, 1 << 40, -(1i64 << 62), 5000][rng.below(8)]),
        3 => json!([0.0, 0.5, 1.0, 2.0, -0.0, 1e308, -1e-9, 3.5][rng.below(8)]),
        4 => json!(STRINGS[rng.below(STRINGS.len())]),
        5 | 6 => Value::Array(
            (0..rng.below(5))
                .map(|_| random_json(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..rng.below(6) {
                m.insert(
                    KEYS[rng.below(KEYS.len())].to_string(),
                    random_json(rng, depth + 1),
                );
            }
            Value::Object(m)
        }
    }
}

#[test]
fn fuzz_request_validation() {
    let seeds: Vec<Vec<u8>> = goldens()
        .iter()
        .map(|g| serde_json::to_vec(&g.request).unwrap())
        .collect();
    let dict: &[&[u8]] = &[
        b"\"",
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"null",
        b"1e999",
        b"-1",
        b"\\u0000",
        b"\"messages\"",
    ];
    run("request JSON (structured)", 1, |rng| {
        let v = random_json(rng, 0);
        let _ = onnx_chat::openai::validate(&v, &Default::default());
    });
    run("request JSON (mutated goldens)", 2, |rng| {
        let k = rng.below(seeds.len());
        let bytes = mutate(rng, &seeds[k], dict);
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            if let Ok(req) = onnx_chat::openai::validate(&v, &Default::default()) {
                let _ = req.remote_media();
            }
        }
    });
}

#[test]
fn fuzz_image_decoding() {
    use onnx_chat::pipeline::image::{decode_rgb, resize, Filter, ImageLimits};
    let dir = root().join("tests/fixtures/media");
    let seeds: Vec<Vec<u8>> = [
        "formula_320x240.png",
        "rings_200x150.jpg",
        "checker_96x128.webp",
        "palette_64x48.gif",
        "stripes_40x30.bmp",
        "cmyk_64x48.jpg",
        "progressive_80x60.jpg",
        "alpha_32x32.png",
    ]
    .iter()
    .map(|f| std::fs::read(dir.join(f)).unwrap())
    .collect();
    let limits = ImageLimits {
        max_bytes: 1 << 20,
        max_pixels: 4_000_000,
    };
    let dict: &[&[u8]] = &[
        b"IHDR",
        b"IDAT",
        b"IEND",
        b"\xff\xd8",
        b"\xff\xc0",
        b"\xff\xda",
        b"RIFF",
        b"VP8 ",
        b"GIF89a",
        b"BM",
    ];
    run("image decoding", 3, |rng| {
        let k = rng.below(seeds.len());
        let bytes = mutate(rng, &seeds[k], dict);
        if let Ok(img) = decode_rgb(&bytes, &limits) {
            let (w, h) = (1 + rng.below(64) as u32, 1 + rng.below(64) as u32);
            let f = [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos][rng.below(3)];
            let r = resize(&img, w, h, f);
            assert_eq!((r.width(), r.height()), (w, h));
        }
    });
}

#[test]
fn fuzz_audio_decoding() {
    use onnx_chat::pipeline::audio::{decode, MelConfig, MelExtractor};
    let dir = root().join("tests/fixtures/media");
    let seeds: Vec<Vec<u8>> = [
        "two_tone_16k_s16.wav",
        "tones_44k1_stereo_f32.wav",
        "sweep_16k.flac",
        "two_tone_16k.mp3",
    ]
    .iter()
    .map(|f| std::fs::read(dir.join(f)).unwrap())
    .collect();
    let mel = MelExtractor::new(&MelConfig::gemma3n_extractor());
    let dict: &[&[u8]] = &[
        b"RIFF",
        b"WAVE",
        b"fmt ",
        b"data",
        b"fLaC",
        b"OggS",
        b"ID3",
        b"\xff\xfb",
        b"Xing",
        b"Info",
    ];
    run("audio decoding", 4, |rng| {
        let k = rng.below(seeds.len());
        let bytes = mutate(rng, &seeds[k], dict);
        let hint = [None, Some("wav"), Some("mp3"), Some("flac"), Some("ogg")][rng.below(5)];
        if let Ok(d) = decode(&bytes, hint, 5.0) {
            let _ = mel.extract(&d.samples[..d.samples.len().min(16000)]);
        }
    });
    run("log-mel on odd samples", 5, |rng| {
        let n = rng.below(3000);
        let samples: Vec<f32> = (0..n)
            .map(|_| {
                [
                    0.0,
                    1.0,
                    -1.0,
                    f32::NAN,
                    f32::INFINITY,
                    1e30,
                    (rng.next() as f32) / u64::MAX as f32,
                ][rng.below(7)]
            })
            .collect();
        let f = mel.extract(&samples);
        assert_eq!(f.features.len(), f.frames * 128);
    });
}

#[test]
fn fuzz_chat_template_content() {
    let m = model("FP32");
    let pieces = [
        "{{",
        "}}",
        "{%",
        "%}",
        "<start_of_turn>",
        "<end_of_turn>",
        "<image_soft_token>",
        "<audio_soft_token>",
        "<bos>",
        "\u{0}",
        "\u{FFFD}",
        "🙂",
        "  ",
        "\n",
        "é",
        "raise_exception",
        "' + '",
        "\\",
        "<unused3>",
    ];
    run("chat template content", 6, |rng| {
        let messages: Vec<ChatMessage> = (0..1 + rng.below(5))
            .map(|_| {
                let role = [Role::System, Role::User, Role::Assistant][rng.below(3)];
                let text: String = (0..rng.below(12))
                    .map(|_| pieces[rng.below(pieces.len())])
                    .collect();
                let mut content = vec![ContentPart::Text { text }];
                if rng.below(4) == 0 {
                    content.push(ContentPart::Text {
                        text: String::new(),
                    });
                }
                ChatMessage {
                    role,
                    content,
                    tool_calls: vec![],
                    tool_call_id: None,
                }
            })
            .collect();
        if let Ok(p) = m.prompt(&messages) {
            assert_eq!(p.ids.first(), Some(&2), "exactly one BOS starts the prompt");
        }
    });
}

#[test]
fn fuzz_streamed_text_equals_the_full_decode() {
    use onnx_chat::pipeline::detok::IncrementalDecoder;
    use onnx_chat::pipeline::stop::{StopMatcher, StopOutcome};
    let tok = tokenizers::Tokenizer::from_file(fixture_dir().join("tokenizer.json")).unwrap();
    run("detok + stop strings (SSE text)", 7, |rng| {
        let ids: Vec<u32> = (0..rng.below(40)).map(|_| rng.below(528) as u32).collect();
        let full = tok.decode(&ids, true).unwrap();
        let stop = if rng.below(2) == 0 || full.is_empty() {
            String::from("\u{1}never")
        } else {
            let chars: Vec<char> = full.chars().collect();
            let i = rng.below(chars.len());
            chars[i..(i + 1 + rng.below(3)).min(chars.len())]
                .iter()
                .collect()
        };
        let mut detok = IncrementalDecoder::new(true);
        let mut matcher = StopMatcher::new(vec![stop.clone()]);
        let mut streamed = String::new();
        let mut stopped = false;
        for &id in &ids {
            let piece = detok.push(&tok, id).unwrap();
            match matcher.push(&piece) {
                StopOutcome::Continue { emit } => streamed.push_str(&emit),
                StopOutcome::Stopped { emit, .. } => {
                    streamed.push_str(&emit);
                    stopped = true;
                    break;
                }
            }
        }
        if !stopped {
            match matcher.push(&detok.flush(&tok).unwrap()) {
                StopOutcome::Continue { emit } => {
                    streamed.push_str(&emit);
                    streamed.push_str(&matcher.finish());
                }
                StopOutcome::Stopped { emit, .. } => streamed.push_str(&emit),
            }
        }
        let expected = match full.find(&stop) {
            Some(i) => &full[..i],
            None => &full[..],
        };
        assert_eq!(streamed, expected, "ids {ids:?} stop {stop:?}");
        // What goes on the wire: one JSON line per SSE event, whatever the text holds.
        let line =
            serde_json::to_string(&json!({"choices": [{"delta": {"content": streamed}}]})).unwrap();
        assert!(!line.contains('\n') && !line.contains('\r'));
        let back: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["choices"][0]["delta"]["content"], streamed.as_str());
    });
}
