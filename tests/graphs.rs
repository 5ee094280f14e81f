//! The committed tiny model: every graph loads with ort and has the interface model_interface.md
//! describes; `inspect` lists it; a missing ONNX Runtime library is one clear error, not a panic.

mod common;

use std::process::Command;

use common::{fixture_dir, init_ort};
use onnx_chat::engine::kv::KvLayout;
use onnx_chat::engine::session::{ElemType, GraphSession, SessionOptions};
use ort::value::DynValue;

const COMPONENTS: &[&str] = &[
    "embed_tokens",
    "vision_encoder",
    "audio_encoder",
    "decoder_model_merged",
];
const SUFFIXES: &[&str] = &["", "_fp16", "_quantized", "_q4"];

fn io(s: &GraphSession, input: bool) -> Vec<(String, ElemType)> {
    let list = if input { &s.inputs } else { &s.outputs };
    list.iter().map(|i| (i.name.clone(), i.dtype)).collect()
}

#[test]
fn all_sixteen_graphs_load_with_the_documented_interface() {
    init_ort();
    let opts = SessionOptions {
        intra_threads: 1,
        ..Default::default()
    };
    for c in COMPONENTS {
        for sfx in SUFFIXES {
            let path = fixture_dir().join("onnx").join(format!("{c}{sfx}.onnx"));
            let s = GraphSession::load(c, &path, &opts)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // fp16 graphs take and return float16; every other variant float32.
            let f = if *sfx == "_fp16" {
                ElemType::F16
            } else {
                ElemType::F32
            };
            let (ins, outs) = (io(&s, true), io(&s, false));
            match *c {
                "embed_tokens" => {
                    assert_eq!(ins, vec![("input_ids".into(), ElemType::I64)], "{c}{sfx}");
                    assert_eq!(
                        outs,
                        vec![("inputs_embeds".into(), f), ("per_layer_inputs".into(), f)],
                        "{c}{sfx}"
                    );
                }
                "vision_encoder" => {
                    assert_eq!(ins, vec![("pixel_values".into(), f)], "{c}{sfx}");
                    assert_eq!(outs, vec![("image_features".into(), f)], "{c}{sfx}");
                    assert_eq!(s.inputs[0].dims[1..], [Some(3), Some(768), Some(768)]);
                }
                "audio_encoder" => {
                    assert_eq!(
                        ins,
                        vec![
                            ("input_features".into(), f),
                            ("input_features_mask".into(), ElemType::Bool)
                        ],
                        "{c}{sfx}"
                    );
                    assert_eq!(outs, vec![("audio_features".into(), f)], "{c}{sfx}");
                    assert_eq!(
                        s.outputs[0].dims[1],
                        Some(188),
                        "padded to 188 rows inside the graph"
                    );
                }
                "decoder_model_merged" => {
                    assert_eq!(
                        ins[..3].iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
                        ["inputs_embeds", "per_layer_inputs", "position_ids"]
                    );
                    assert_eq!(ins[0].1, f);
                    assert_eq!(ins[2].1, ElemType::I64);
                    assert_eq!(outs[0], ("logits".into(), f));
                    let kv = KvLayout::from_decoder(&s).unwrap();
                    // Only the cache-owning layers (4 layers − 2 KV-shared) have past/present tensors.
                    assert_eq!(kv.slots.len(), 4, "{c}{sfx}");
                    assert!(kv
                        .slots
                        .iter()
                        .all(|k| k.dtype == f && k.empty_shape == vec![1, 1, 0, 32]));
                    assert_eq!(kv.slots[0].present, "present.0.key");
                }
                _ => unreachable!(),
            }
        }
    }
}

#[test]
fn inspect_lists_four_components_by_four_variants() {
    let out = Command::new(env!("CARGO_BIN_EXE_onnx-chat"))
        .args(["inspect", fixture_dir().to_str().unwrap(), "--threads", "1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("graphs (16):"), "{text}");
    for c in COMPONENTS {
        assert!(text.contains(&format!("\n{c}: ")), "{c} missing:\n{text}");
    }
    assert!(
        text.contains("embed_tokens: fp32, fp16, q4, quantized"),
        "{text}"
    );
    // Default quantization Q4_MIXED picks the original server's file set, external data included.
    assert!(text.contains("quantization Q4_MIXED"), "{text}");
    assert!(text.contains("onnx/decoder_model_merged_q4.onnx"), "{text}");
    assert!(
        text.contains("(+ embed_tokens_quantized.onnx_data, embed_tokens_quantized.onnx_data_1)"),
        "{text}"
    );
    assert!(text.contains("in  input_features_mask"), "{text}");
    assert!(text.contains("bool"), "{text}");
    assert!(
        text.contains("[batch_size, 1, past_sequence_length, 32]"),
        "{text}"
    );
    // JSON form for tools.
    let out = Command::new(env!("CARGO_BIN_EXE_onnx-chat"))
        .args([
            "inspect",
            fixture_dir().to_str().unwrap(),
            "--quant",
            "FP16",
            "--selected-only",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["graphs"].as_array().unwrap().len(), 4);
    assert_eq!(v["model"]["plan"]["quant"], "FP16");
}

#[test]
fn missing_onnxruntime_is_one_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_onnx-chat"))
        .args(["inspect", fixture_dir().to_str().unwrap()])
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a clean exit, not a panic (101): {err}"
    );
    assert!(
        err.contains("could not load the ONNX Runtime library"),
        "{err}"
    );
    assert!(
        err.contains("/nonexistent/libonnxruntime.so"),
        "names what was tried: {err}"
    );
    assert!(err.contains("make setup"), "names the fix: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Runs a Gemma-3n decoder once on `n` positions with an empty cache; returns `logits`' shape and values.
fn decoder_logits(s: &mut GraphSession, n: usize) -> (Vec<i64>, Vec<f32>) {
    use ort::session::SessionInputValue;
    use ort::value::Tensor;
    use std::borrow::Cow;
    let kv = KvLayout::from_decoder(s).unwrap();
    let cache = kv.empty().unwrap();
    let hidden = s.input("inputs_embeds").unwrap().dims[2].unwrap();
    let ple = s.input("per_layer_inputs").unwrap().dims.clone();
    let (layers, ple_dim) = (ple[2].unwrap(), ple[3].unwrap());
    let n = n as i64;
    // Deterministic, varied inputs, so that every position matters.
    let wave =
        |len: i64, k: f32| -> Vec<f32> { (0..len).map(|i| (i as f32 * k).sin() * 0.5).collect() };
    let embeds: DynValue = Tensor::from_array((vec![1, n, hidden], wave(n * hidden, 0.37)))
        .unwrap()
        .into_dyn();
    let ple: DynValue = Tensor::from_array((
        vec![1, n, layers, ple_dim],
        wave(n * layers * ple_dim, 0.11),
    ))
    .unwrap()
    .into_dyn();
    let pos: DynValue = Tensor::from_array((vec![1, n], (0..n).collect::<Vec<i64>>()))
        .unwrap()
        .into_dyn();
    let mut feed: Vec<(Cow<'static, str>, SessionInputValue)> = vec![
        (Cow::Borrowed("inputs_embeds"), embeds.into()),
        (Cow::Borrowed("per_layer_inputs"), ple.into()),
        (Cow::Borrowed("position_ids"), pos.into()),
    ];
    kv.push_feeds(s, &cache, &mut feed).unwrap();
    let out = s.session.run(feed).unwrap();
    let (shape, data) = out["logits"].try_extract_tensor::<f32>().unwrap();
    (shape.to_vec(), data.to_vec())
}

#[test]
fn load_time_rewrites_keep_the_last_logits_and_set_the_accuracy_level() {
    init_ort();
    let base = SessionOptions {
        intra_threads: 1,
        last_logits: false,
        add_attention_mask: false,
        ..Default::default()
    };
    let last = SessionOptions {
        last_logits: true,
        ..base.clone()
    };
    let n = 9;
    // fp32 (external data: the rewritten graph loads from memory and still finds its .onnx_data),
    // int8 (the slice goes after DynamicQuantizeLinear) and q4.
    for sfx in ["", "_quantized", "_q4"] {
        let path = fixture_dir()
            .join("onnx")
            .join(format!("decoder_model_merged{sfx}.onnx"));
        let mut full =
            GraphSession::load_decoder("decoder_model_merged", &path, &base, "logits").unwrap();
        assert!(!full.rewrite.changed());
        let mut cut =
            GraphSession::load_decoder("decoder_model_merged", &path, &last, "logits").unwrap();
        assert!(
            cut.rewrite.last_logits_before.is_some(),
            "{sfx}: {:?}",
            cut.rewrite
        );
        // By default the decoders also get an attention_mask (Gemma-3n's two mask Wheres).
        let masked = SessionOptions {
            add_attention_mask: true,
            ..last.clone()
        };
        let m =
            GraphSession::load_decoder("decoder_model_merged", &path, &masked, "logits").unwrap();
        assert_eq!(m.rewrite.attention_mask_added, 2, "{sfx}: {:?}", m.rewrite);
        assert!(m.has_input("attention_mask"), "{sfx}");
        let (fs, fl) = decoder_logits(&mut full, n);
        let (cs, cl) = decoder_logits(&mut cut, n);
        let vocab = *fs.last().unwrap() as usize;
        assert_eq!(fs, [1, n as i64, vocab as i64], "{sfx}");
        assert_eq!(
            cs,
            [1, 1, vocab as i64],
            "{sfx}: only the last position is computed"
        );
        let tail = &fl[fl.len() - vocab..];
        let diff = tail
            .iter()
            .zip(&cl)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-4, "{sfx}: last-position logits differ by {diff}");
    }
    // accuracy_level=4 on the q4 decoder: every MatMulNBits node, and the logits move a little.
    let path = fixture_dir()
        .join("onnx")
        .join("decoder_model_merged_q4.onnx");
    let int8 = SessionOptions {
        matmul_accuracy_level: Some(4),
        ..last.clone()
    };
    let mut a = GraphSession::load_decoder("decoder_model_merged", &path, &last, "logits").unwrap();
    let mut b = GraphSession::load_decoder("decoder_model_merged", &path, &int8, "logits").unwrap();
    assert_eq!(a.rewrite.matmulnbits, 0);
    assert!(b.rewrite.matmulnbits > 0, "{:?}", b.rewrite);
    let (_, la) = decoder_logits(&mut a, n);
    let (_, lb) = decoder_logits(&mut b, n);
    let diff = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        diff > 0.0 && diff < 1.0,
        "int8 compute moved the logits by {diff}"
    );
}
