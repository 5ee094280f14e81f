//! Parity with the reference implementation on the committed tiny Gemma-3n: for every golden and every
//! quantization, the prompt (rendered template, expanded text, ids) and the greedy generation through
//! HTTP must equal what transformers (FP32) or the Python onnxruntime loop (FP16, QUANTIZED, Q4_MIXED,
//! Q4) produced: token ids exactly, text exactly.

mod common;

use common::{goldens, model, Golden, Server};
use onnx_chat::models::gemma3n::Gemma3nPrompter;
use serde_json::Value;

fn request_messages(g: &Golden) -> Vec<onnx_chat::protocol::ChatMessage> {
    let valid = onnx_chat::openai::validate(&g.request, &Default::default()).unwrap();
    valid.messages
}

#[test]
fn prompts_match_the_reference_processor() {
    let m = model("FP32");
    for g in goldens() {
        let p = m.prompt(&request_messages(&g)).unwrap();
        assert_eq!(
            p.rendered,
            g.expected["rendered_prompt"].as_str().unwrap(),
            "{}: rendered",
            g.name
        );
        assert_eq!(
            p.expanded,
            g.expected["expanded_prompt"].as_str().unwrap(),
            "{}: expanded",
            g.name
        );
        assert_eq!(p.ids, g.prompt_ids(), "{}: prompt ids", g.name);
    }
    // The template sees OpenAI parts as HF items, in order.
    let g = goldens()
        .into_iter()
        .find(|g| g.name == "image_audio")
        .unwrap();
    let items = Gemma3nPrompter::template_messages(&request_messages(&g));
    let types: Vec<&str> = items[0]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["image", "audio", "text"]);
}

async fn check_quant(quant: &str, kinds: &[&str]) {
    let server = Server::start(vec![model(quant)]).await;
    let mut checked = 0;
    for g in goldens()
        .into_iter()
        .filter(|g| kinds.contains(&g.kind.as_str()))
    {
        let Some((ids, text, finish)) = g.expected_for(quant) else {
            continue;
        };
        let mut body = g.request.clone();
        body["return_token_ids"] = Value::Bool(true);
        let (status, resp) = server.chat(&body).await;
        assert_eq!(status, 200, "{quant} {}: {resp}", g.name);
        let choice = &resp["choices"][0];
        let got_ids: Vec<u32> = choice["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(got_ids, ids, "{quant} {}: token ids", g.name);
        assert_eq!(
            choice["message"]["content"].as_str().unwrap(),
            text,
            "{quant} {}: text",
            g.name
        );
        assert_eq!(
            choice["finish_reason"].as_str().unwrap(),
            finish,
            "{quant} {}: finish_reason",
            g.name
        );
        assert_eq!(
            resp["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
            g.prompt_ids().len()
        );
        assert_eq!(
            resp["usage"]["completion_tokens"].as_u64().unwrap() as usize,
            ids.len()
        );
        checked += 1;
    }
    assert!(checked > 0, "no goldens for {quant} {kinds:?}");
    server.shutdown().await;
}

const TEXT: &[&str] = &["text"];

#[tokio::test(flavor = "multi_thread")]
async fn text_parity_fp32_against_transformers() {
    check_quant("FP32", TEXT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn text_parity_fp16() {
    check_quant("FP16", TEXT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn text_parity_quantized() {
    check_quant("QUANTIZED", TEXT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn text_parity_q4_mixed() {
    check_quant("Q4_MIXED", TEXT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn text_parity_q4() {
    check_quant("Q4", TEXT).await;
}

const MEDIA: &[&str] = &["image", "audio", "mixed", "image_audio"];

#[tokio::test(flavor = "multi_thread")]
async fn media_parity_fp32_against_transformers() {
    check_quant("FP32", MEDIA).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn media_parity_fp16() {
    check_quant("FP16", MEDIA).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn media_parity_quantized() {
    check_quant("QUANTIZED", MEDIA).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn media_parity_q4_mixed() {
    check_quant("Q4_MIXED", MEDIA).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn media_parity_q4() {
    check_quant("Q4", MEDIA).await;
}
