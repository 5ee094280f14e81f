//! Hostile and broken media through HTTP: each gets a clear 4xx naming the item, and the server keeps
//! serving. Also the original server's top-level `images` field, and the non-16 kHz audio paths.

mod common;

use base64::Engine;
use common::{goldens, model, root, Server};
use serde_json::{json, Value};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn media(name: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures/media").join(name)).unwrap()
}

fn image_request(data_url: String) -> Value {
    json!({"model": "tiny-gemma3n", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "What is it?"}]}]})
}

fn audio_request(bytes: &[u8], format: &str) -> Value {
    json!({"model": "tiny-gemma3n", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": b64(bytes), "format": format}},
        {"type": "text", "text": "What is it?"}]}]})
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A PNG whose header claims 30000×30000 pixels (a decompression bomb), with a few bytes of data.
fn png_bomb() -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&30000u32.to_be_bytes());
    ihdr.extend_from_slice(&30000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A mono 8 kHz 8-bit WAV of `seconds` of a tone.
fn wav_u8(seconds: f64) -> Vec<u8> {
    let n = (8000.0 * seconds) as u32;
    let mut w = b"RIFF".to_vec();
    w.extend_from_slice(&(36 + n).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&8000u32.to_le_bytes());
    w.extend_from_slice(&8000u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&8u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&n.to_le_bytes());
    w.extend((0..n).map(|i| (128.0 + 100.0 * (i as f64 * 0.1).sin()) as u8));
    w
}

async fn expect_4xx(s: &Server, body: &Value, status: u16, needle: &str) {
    let (st, r) = s.chat(body).await;
    assert_eq!(st, status, "{r}");
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    assert!(
        r["error"]["param"]
            .as_str()
            .unwrap_or_default()
            .starts_with("messages"),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_images_get_clear_errors() {
    let s = Server::start(vec![model("FP32")]).await;
    expect_4xx(
        &s,
        &image_request("data:image/png;base64,@@not-base64@@".into()),
        400,
        "image 0 is not valid base64",
    )
    .await;
    let png = media("formula_320x240.png");
    let truncated = format!("data:image/png;base64,{}", b64(&png[..png.len() / 2]));
    expect_4xx(&s, &image_request(truncated), 400, "image 0").await;
    let bomb = format!("data:image/png;base64,{}", b64(&png_bomb()));
    expect_4xx(&s, &image_request(bomb), 413, "30000x30000").await;
    expect_4xx(
        &s,
        &image_request(format!("data:image/png;base64,{}", b64(b"hello world"))),
        400,
        "unsupported image format",
    )
    .await;
    // The second image of a request is the one named.
    let mut two = image_request(format!("data:image/png;base64,{}", b64(&png)));
    two["messages"][0]["content"]
        .as_array_mut()
        .unwrap()
        .insert(
            1,
            json!({"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/AAAA"}}),
        );
    expect_4xx(&s, &two, 400, "image 1").await;
    // Nine images with the default limit of eight.
    let parts: Vec<Value> = (0..9)
        .map(|_| json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", b64(&png))}}))
        .collect();
    let nine = json!({"model": "tiny-gemma3n", "messages": [{"role": "user", "content": parts}]});
    expect_4xx(&s, &nine, 400, "at most 8 images").await;
    // GIF, CMYK JPEG, grayscale, progressive JPEG, RGBA PNG and BMP are all fine.
    for (name, mime) in [
        ("palette_64x48.gif", "gif"),
        ("cmyk_64x48.jpg", "jpeg"),
        ("gray_48x32.jpg", "jpeg"),
        ("progressive_80x60.jpg", "jpeg"),
        ("alpha_32x32.png", "png"),
        ("stripes_40x30.bmp", "bmp"),
    ] {
        let (st, r) = s
            .chat(&image_request(format!(
                "data:image/{mime};base64,{}",
                b64(&media(name))
            )))
            .await;
        assert_eq!(st, 200, "{name}: {r}");
    }
    // Still serving.
    let (st, _) = s.chat(&goldens()[0].request).await;
    assert_eq!(st, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_audio_gets_clear_errors() {
    let s = Server::start(vec![model("FP32")]).await;
    let wav = media("two_tone_16k_s16.wav");
    expect_4xx(
        &s,
        &audio_request(&wav[..wav.len() / 2], "wav"),
        400,
        "audio clip 0",
    )
    .await;
    let mp3 = media("two_tone_16k.mp3");
    let mut garbled = mp3.clone();
    let mid = garbled.len() / 2;
    for (i, b) in garbled[mid..mid + 400].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    expect_4xx(&s, &audio_request(&garbled, "mp3"), 400, "audio clip 0").await;
    expect_4xx(
        &s,
        &audio_request(&wav_u8(600.0), "wav"),
        400,
        "the limit is 30 s",
    )
    .await;
    let noise: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    expect_4xx(&s, &audio_request(&noise, "wav"), 400, "audio clip 0").await;
    let (st, _) = s.chat(&goldens()[0].request).await;
    assert_eq!(st, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn images_field_gives_the_same_answer_as_image_url() {
    let s = Server::start(vec![model("FP32")]).await;
    let g = goldens()
        .into_iter()
        .find(|g| g.name == "image_one")
        .unwrap();
    let (ids, text, _) = g.generated("FP32").unwrap();
    // The original server's form: text-only message plus a top-level base64 `images` list.
    let content = g.request["messages"][0]["content"].as_array().unwrap();
    let url = content.iter().find(|p| p["type"] == "image_url").unwrap()["image_url"]["url"]
        .as_str()
        .unwrap();
    let question = content.iter().find(|p| p["type"] == "text").unwrap()["text"].clone();
    let body = json!({"model": "tiny-gemma3n", "temperature": 0, "max_tokens": ids.len(), "return_token_ids": true,
        "images": [url.split_once(',').unwrap().1], "messages": [{"role": "user", "content": question}]});
    let (st, r) = s.chat(&body).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["message"]["content"], text);
    assert_eq!(r["choices"][0]["token_ids"], json!(ids));
    s.shutdown().await;
}

#[test]
fn resampled_audio_is_close_to_native_16k() {
    // The 44.1 kHz stereo float WAV and the MP3 go through resampling / lossy decoding; their features
    // are compared with features of the same signal generated at 16 kHz.
    use onnx_chat::pipeline::audio::{self, MelConfig, MelExtractor};
    let mel = MelExtractor::new(&MelConfig::gemma3n_extractor());
    let d = audio::decode(&media("tones_44k1_stereo_f32.wav"), Some("wav"), 30.0).unwrap();
    assert_eq!((d.sample_rate, d.channels), (44100, 2));
    let resampled = audio::resample(&d.samples, 44100, 16000).unwrap();
    let n = resampled.len();
    let native: Vec<f32> = (0..n)
        .map(|i| {
            let t = i as f64 / 16000.0;
            ((0.4 * (2.0 * std::f64::consts::PI * 660.0 * t).sin()
                + 0.3 * (2.0 * std::f64::consts::PI * 990.0 * t).sin())
                / 2.0) as f32
        })
        .collect();
    let (a, b) = (mel.extract(&resampled), mel.extract(&native));
    // Skip two frames at each end (resampler edges). Log-mel differences are large only where the
    // energy is near the floor; where the signal is (bins within 40 dB of the frame's peak), they
    // are small.
    let (fa, fb) = (
        &a.features[128 * 2..a.features.len() - 128 * 2],
        &b.features[128 * 2..b.features.len() - 128 * 2],
    );
    let mut diffs: Vec<f32> = Vec::new();
    for (ra, rb) in fa.chunks(128).zip(fb.chunks(128)) {
        let peak = rb.iter().cloned().fold(f32::MIN, f32::max);
        for (x, y) in ra.iter().zip(rb) {
            if *y > peak - 100f32.ln() {
                diffs.push((x - y).abs());
            }
        }
    }
    diffs.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    let max = *diffs.last().unwrap();
    eprintln!(
        "44.1 kHz stereo → 16 kHz: {} bins, mean |Δ log-mel| {mean:.2e}, max {max:.2e}",
        diffs.len()
    );
    assert!(mean < 1e-2 && max < 5e-2, "mean {mean}, max {max}");

    // MP3 is lossy and its encoder delays the signal, so frames do not line up with the WAV's: compare
    // the time-averaged log-mel of the bins that carry the two tones.
    let mp3 = audio::decode(&media("two_tone_16k.mp3"), Some("mp3"), 30.0).unwrap();
    let wav = audio::decode(&media("two_tone_16k_s16.wav"), Some("wav"), 30.0).unwrap();
    let avg = |f: &onnx_chat::pipeline::audio::MelFeatures| -> Vec<f32> {
        let rows: Vec<&[f32]> = f
            .features
            .chunks(128)
            .skip(10)
            .take(f.frames.saturating_sub(20))
            .collect();
        (0..128)
            .map(|k| rows.iter().map(|r| r[k]).sum::<f32>() / rows.len() as f32)
            .collect()
    };
    let (am, aw) = (
        avg(&mel.extract(&mp3.samples)),
        avg(&mel.extract(&wav.samples)),
    );
    let peak = aw.iter().cloned().fold(f32::MIN, f32::max);
    let strong: Vec<f32> = (0..128)
        .filter(|&k| aw[k] > peak - 100f32.ln())
        .map(|k| (am[k] - aw[k]).abs())
        .collect();
    let max = strong.iter().cloned().fold(0f32, f32::max);
    eprintln!(
        "MP3 vs WAV: {} strong bins, max |Δ mean log-mel| {max:.2e}",
        strong.len()
    );
    // Measured 0.18 (about 20% in magnitude): MP3 at 16 kHz is coarsely quantized; the tones survive.
    assert!(!strong.is_empty() && max < 0.25, "{max}");
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_images_are_off_by_default_and_guarded() {
    use onnx_chat::frontend::{media::RemoteMediaConfig, FrontendConfig};
    use warp::Filter;
    // A local "remote" server: the image, and a redirect to a host that is not allowed.
    let png = media("formula_320x240.png");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let img = warp::path!("img.png").map(move || {
        warp::http::Response::builder()
            .header("content-type", "image/png")
            .body(png.clone())
            .unwrap()
    });
    let redirect = warp::path!("redirect").map(move || {
        warp::http::Response::builder()
            .status(302)
            .header("location", format!("http://localhost:{port}/img.png"))
            .body(Vec::new())
            .unwrap()
    });
    tokio::spawn(warp::serve(img.or(redirect)).incoming(listener).run());
    let url = |path: &str| format!("http://127.0.0.1:{port}/{path}");
    let g = goldens()
        .into_iter()
        .find(|g| g.name == "image_one")
        .unwrap();
    let (_, text, _) = g.generated("FP32").unwrap();
    let with_url = |u: String| {
        let mut b = g.request.clone();
        for p in b["messages"][0]["content"].as_array_mut().unwrap() {
            if p["type"] == "image_url" {
                p["image_url"]["url"] = json!(u);
            }
        }
        b
    };

    let off = Server::start(vec![model("FP32")]).await;
    expect_4xx(&off, &with_url(url("img.png")), 400, "--allow-remote-media").await;
    off.shutdown().await;

    let public_only = FrontendConfig {
        remote_media: Some(RemoteMediaConfig::default()),
        ..Default::default()
    };
    let s = Server::start_with(vec![model("FP32")], public_only).await;
    let (st, r) = s.chat(&with_url(url("img.png"))).await;
    assert_eq!(st, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("non-public address 127.0.0.1"),
        "{r}"
    );
    assert_eq!(r["error"]["param"], "messages[0].content[0].image_url.url");
    s.shutdown().await;

    let allowed = FrontendConfig {
        remote_media: Some(RemoteMediaConfig {
            allow_hosts: vec!["127.0.0.1".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let s = Server::start_with(vec![model("FP32")], allowed).await;
    let (st, r) = s.chat(&with_url(url("img.png"))).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        r["choices"][0]["message"]["content"], text,
        "same answer as the data URL"
    );
    let (st, r) = s.chat(&with_url(url("redirect"))).await;
    assert_eq!(st, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not on this server's allow-list"),
        "{r}"
    );
    s.shutdown().await;

    let tiny_cap = FrontendConfig {
        remote_media: Some(RemoteMediaConfig {
            allow_hosts: vec!["127.0.0.1".into()],
            max_bytes: 100,
            ..Default::default()
        }),
        ..Default::default()
    };
    let s = Server::start_with(vec![model("FP32")], tiny_cap).await;
    let (st, r) = s.chat(&with_url(url("img.png"))).await;
    assert_eq!(st, 413, "{r}");
    s.shutdown().await;
}
