//! The committed tiny model: every graph loads with ort and has the interface model_interface.md
//! describes; `inspect` lists it; a missing ONNX Runtime library is one clear error, not a panic.

mod common;

use std::process::Command;

use common::{fixture_dir, init_ort};
use onnx_chat::engine::kv::KvLayout;
use onnx_chat::engine::session::{ElemType, GraphSession, SessionOptions};

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
    let opts = SessionOptions { intra_threads: 1 };
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
