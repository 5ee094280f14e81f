//! Media preprocessing timings for `make bench` (tools/bench/bench.py runs it and puts the numbers in its
//! table): the library's own [`MediaDecoder`] entry points, as the worker calls them, on encoded bytes.
//!
//! - image: `image_bytes` = decode (JPEG/PNG/…) + RGB + bilinear resize to 768×768 + `[3,768,768]` f32 tensor;
//! - audio: `audio_bytes` = decode (WAV/FLAC/…) + resample to 16 kHz + log-mel features.
//!
//! ```text
//! cargo bench --bench media -- --model-dir DIR --image FILE... --audio FILE... [--repeats 20]
//! ```
//!
//! Prints one JSON object: per file, the median and minimum milliseconds over `--repeats` timed calls
//! (after two untimed ones), and the output's shape (image) or frame count (audio).

use std::path::PathBuf;
use std::time::Instant;

use onnx_chat::models::gemma3n::{MediaDecoder, MediaLimits};
use serde_json::{json, Value};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn time_it(repeats: usize, mut f: impl FnMut()) -> Value {
    f();
    f();
    let ms: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
    json!({"median_ms": median(ms), "min_ms": min, "repeats": repeats})
}

fn main() -> anyhow::Result<()> {
    let mut model_dir = PathBuf::from("tests/fixtures/tiny-gemma3n");
    let (mut images, mut audio) = (Vec::new(), Vec::new());
    let mut repeats = 20usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model-dir" => model_dir = args.next().map(PathBuf::from).unwrap_or(model_dir),
            "--image" => images.extend(args.next().map(PathBuf::from)),
            "--audio" => audio.extend(args.next().map(PathBuf::from)),
            "--repeats" => repeats = args.next().and_then(|s| s.parse().ok()).unwrap_or(repeats),
            // `cargo bench` appends --bench; libtest-style filters are not used here
            _ => {}
        }
    }
    let media = MediaDecoder::new(&model_dir, MediaLimits::default())?;
    let mut out_images = serde_json::Map::new();
    for p in &images {
        let bytes = std::fs::read(p)?;
        let first = media.image_bytes(0, &bytes)?;
        let mut r = time_it(repeats, || {
            std::hint::black_box(media.image_bytes(0, &bytes).expect("image"));
        });
        r["shape"] = json!(first.shape);
        out_images.insert(p.display().to_string(), r);
    }
    let mut out_audio = serde_json::Map::new();
    for p in &audio {
        let bytes = std::fs::read(p)?;
        let fmt = p.extension().and_then(|e| e.to_str()).map(str::to_string);
        let first = media.audio_bytes(0, &bytes, fmt.as_deref())?;
        let mut r = time_it(repeats, || {
            std::hint::black_box(media.audio_bytes(0, &bytes, fmt.as_deref()).expect("audio"));
        });
        r["frames"] = json!(first.frames);
        out_audio.insert(p.display().to_string(), r);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{}",
        json!({"images": out_images, "audio": out_audio, "cores": threads})
    );
    Ok(())
}
