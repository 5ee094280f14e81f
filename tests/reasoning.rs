//! The reasoning split in the generation loop, without a model: a scripted [`ChatModel`] whose logits
//! pick a fixed id sequence, decoded by the tiny Gemma-3n tokenizer with two of its special ids
//! (`<start_of_turn>` 105, `<end_of_turn>` 106) standing in for a thinking model's markers. Checks what
//! the worker receives: reasoning and answer in separate delta fields, reasoning token counts, `n`
//! choices, `max_tokens` inside the reasoning, stop strings, and nothing new without markers; and a
//! generation continued from the ids an earlier attempt delivered sends exactly the rest.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use onnx_chat::engine::batch::BatchKv;
use onnx_chat::engine::kv::{KvCache, KvLayout};
use onnx_chat::engine::prefix_cache::PrefixCache;
use onnx_chat::engine::thread::{StepTask, TaskState};
use onnx_chat::models::generate::{BatchPolicy, GenEvent, GenParams, Generation, ModelEngine};
use onnx_chat::models::{Batching, ChatModel, MediaRows, ModelError, PreparedInput};
use onnx_chat::pipeline::reasoning::ReasoningMarkers;
use onnx_chat::pipeline::sampling::SamplingParams;
use onnx_chat::protocol::FinishReason;
use tokenizers::Tokenizer;

const START: u32 = 105;
const END: u32 = 106;
const EOS: u32 = 1;
const PROMPT: [u32; 2] = [2, 5];

/// Generates `script` (by position after the prompt), whatever it is fed.
struct Scripted {
    layout: KvLayout,
    script: Vec<u32>,
    vocab: usize,
}

impl ChatModel for Scripted {
    fn kv_layout(&self) -> &KvLayout {
        &self.layout
    }
    fn split_exact(&self) -> bool {
        true
    }
    fn cache_keys(&self, input: &PreparedInput) -> Result<Vec<u64>, ModelError> {
        Ok(input.ids.iter().map(|&t| t as u64).collect())
    }
    fn encode_media(&mut self, _: &PreparedInput, _: usize) -> Result<MediaRows, ModelError> {
        Ok(MediaRows::default())
    }
    fn forward(
        &mut self,
        ids: &[u32],
        _: Option<&MediaRows>,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, ModelError> {
        cache.len += ids.len();
        let next = self.script[cache.len - PROMPT.len()];
        let mut logits = vec![0.0; self.vocab];
        logits[next as usize] = 10.0;
        Ok(logits)
    }
    fn batching(&self) -> Batching {
        Batching::Unsupported("scripted".into())
    }
    fn forward_rows(&mut self, _: &[u32], _: &mut BatchKv) -> Result<Vec<Vec<f32>>, ModelError> {
        unreachable!("the scripted model does not batch")
    }
}

fn tokenizer() -> Arc<Tokenizer> {
    let path = common::fixture_dir().join("tokenizer.json");
    Arc::new(Tokenizer::from_file(path).unwrap())
}

fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

/// What one generation sent: per choice (reasoning, answer), the `Done` choices and reasoning tokens.
struct Outcome {
    texts: Vec<(String, String)>,
    choices: Vec<(FinishReason, usize)>,
    reasoning_tokens: usize,
    /// Every delta in order: (choice, reasoning, answer, ids).
    deltas: Vec<(usize, String, String, Vec<u32>)>,
    /// Answer text replayed (not sent) per choice.
    replayed: Vec<String>,
}

fn generate(
    script: &[u32],
    n: usize,
    max_new_tokens: usize,
    stop: &[&str],
    reasoning: Option<ReasoningMarkers>,
) -> Outcome {
    generate_from(script, n, max_new_tokens, stop, reasoning, Vec::new())
}

/// As [`generate`], continuing each choice from the ids in `resume`.
fn generate_from(
    script: &[u32],
    n: usize,
    max_new_tokens: usize,
    stop: &[&str],
    reasoning: Option<ReasoningMarkers>,
    resume: Vec<Vec<u32>>,
) -> Outcome {
    let tok = tokenizer();
    let model = Scripted {
        layout: KvLayout {
            slots: vec![],
            fused: None,
        },
        script: script.to_vec(),
        vocab: tok.get_vocab_size(true),
    };
    let mut engine = ModelEngine::with_batching(
        model,
        PrefixCache::new(0, Arc::default()),
        512,
        false,
        BatchPolicy {
            max_rows: 1,
            allow_inexact: false,
        },
    );
    let params = GenParams {
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        max_new_tokens,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        eos_ids: vec![EOS],
        n,
        cache_scope: String::new(),
        conversation: None,
        constraint: None,
        logprobs: None,
        logit_bias: vec![],
        vocab: None,
        reasoning,
        kept_specials: Vec::new(),
        resume,
    };
    let input = PreparedInput {
        ids: PROMPT.to_vec(),
        ..PreparedInput::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut task = Generation::new(input, params, tok, tx, Arc::new(AtomicBool::new(false)));
    while let TaskState::Continue = task.step(&mut engine) {}
    let mut texts = vec![(String::new(), String::new()); n];
    let mut deltas = Vec::new();
    let mut replayed = vec![String::new(); n];
    while let Ok(ev) = rx.try_recv() {
        match ev {
            GenEvent::Delta {
                index,
                text,
                reasoning,
                token_ids,
                ..
            } => {
                texts[index].0 += &reasoning;
                texts[index].1 += &text;
                deltas.push((index, reasoning, text, token_ids));
            }
            GenEvent::Replayed { index, text } => replayed[index] += &text,
            GenEvent::Done {
                choices,
                reasoning_tokens,
                ..
            } => {
                return Outcome {
                    texts,
                    choices,
                    reasoning_tokens,
                    deltas,
                    replayed,
                }
            }
            GenEvent::Error(e) => panic!("generation failed: {}", e.message),
        }
    }
    panic!("no Done event")
}

fn markers() -> Option<ReasoningMarkers> {
    Some(ReasoningMarkers {
        start: START,
        end: END,
        label: "thought\n".into(),
    })
}

/// `<start>thought\n{reasoning}<end>{answer}<eos>`, and how many of its ids are reasoning.
fn thinking_script(tok: &Tokenizer, reasoning: &str, answer: &str) -> (Vec<u32>, usize) {
    let block = [
        &[START][..],
        &ids(tok, "thought\n"),
        &ids(tok, reasoning),
        &[END],
    ]
    .concat();
    let n = block.len();
    ([&block[..], &ids(tok, answer), &[EOS]].concat(), n)
}

#[test]
fn deltas_carry_reasoning_apart_for_every_choice() {
    let tok = tokenizer();
    let (script, block) = thinking_script(&tok, "plan it", " ok then");
    let out = generate(&script, 2, 100, &[], markers());
    for (reasoning, answer) in &out.texts {
        assert_eq!(reasoning, "plan it");
        // The answer keeps its leading space, as generated.
        assert_eq!(answer, " ok then");
    }
    assert_eq!(out.choices, vec![(FinishReason::Stop, script.len()); 2]);
    assert_eq!(out.reasoning_tokens, 2 * block);
}

#[test]
fn without_markers_nothing_changes() {
    let tok = tokenizer();
    let (script, _) = thinking_script(&tok, "plan it", " ok then");
    let out = generate(&script, 1, 100, &[], None);
    let (reasoning, answer) = &out.texts[0];
    assert_eq!(reasoning, "");
    assert_eq!(answer, &tok.decode(&script, true).unwrap());
    assert_eq!(answer, "thought\nplan it ok then");
    assert_eq!(out.reasoning_tokens, 0);
}

#[test]
fn max_tokens_inside_the_reasoning_leaves_no_answer() {
    let tok = tokenizer();
    let (script, block) = thinking_script(&tok, "a long plan", " ok");
    let out = generate(&script, 1, block - 1, &[], markers());
    assert_eq!(out.texts[0], ("a long plan".to_string(), String::new()));
    assert_eq!(out.choices, vec![(FinishReason::Length, block - 1)]);
    assert_eq!(out.reasoning_tokens, block - 1);
}

#[test]
fn stop_strings_match_reasoning_and_answer() {
    let tok = tokenizer();
    let (script, _) = thinking_script(&tok, "plan it", " ok then");
    let out = generate(&script, 1, 100, &[" then"], markers());
    assert_eq!(out.texts[0], ("plan it".to_string(), " ok".to_string()));
    assert_eq!(out.choices[0].0, FinishReason::Stop);
    let out = generate(&script, 1, 100, &["it"], markers());
    assert_eq!(out.texts[0], ("plan ".to_string(), String::new()));
}

/// Cut after every delta of an uninterrupted run (choices cut at different points): the continued
/// run, given the ids those deltas carried, sends exactly the deltas that came after, and ends the
/// same way with the same counts — through reasoning markers, held-back stop-string prefixes and the
/// token limit.
#[test]
fn a_continued_generation_sends_exactly_the_rest() {
    let tok = tokenizer();
    let (script, _) = thinking_script(&tok, "plan it out", " ok then, fine");
    for (stop, max) in [
        (vec![], 100),
        (vec![" fine"], 100),
        (vec![], script.len() - 2),
    ] {
        let full = generate(&script, 2, max, &stop, markers());
        for cut in 0..=full.deltas.len() {
            // Choice 0 has the deltas before `cut`; choice 1 one fewer of its own.
            let mut resume = vec![Vec::new(); 2];
            let mut rest = Vec::new();
            let mut seen1 = 0;
            let ones = full.deltas.iter().filter(|d| d.0 == 1).count();
            let cut1 = (cut * ones / full.deltas.len().max(1)).saturating_sub(1);
            for (j, d) in full.deltas.iter().enumerate() {
                let delivered = match d.0 {
                    0 => j < cut,
                    _ => {
                        seen1 += 1;
                        seen1 <= cut1
                    }
                };
                if delivered {
                    resume[d.0].extend_from_slice(&d.3);
                } else {
                    rest.push(d.clone());
                }
            }
            let cont = generate_from(&script, 2, max, &stop, markers(), resume.clone());
            let sort = |mut v: Vec<(usize, String, String, Vec<u32>)>| {
                v.sort_by_key(|d| d.0);
                v
            };
            assert_eq!(
                sort(cont.deltas.clone()),
                sort(rest),
                "stop {stop:?}, max {max}, cut {cut}: resumed from {resume:?}"
            );
            assert_eq!(cont.choices, full.choices, "cut {cut}");
            assert_eq!(cont.reasoning_tokens, full.reasoning_tokens, "cut {cut}");
            for i in 0..2 {
                let before: String = full
                    .deltas
                    .iter()
                    .filter(|d| d.0 == i)
                    .map(|d| d.2.clone())
                    .collect::<String>();
                let again = format!("{}{}", cont.replayed[i], cont.texts[i].1);
                assert_eq!(
                    again, before,
                    "choice {i}, cut {cut}: replayed + sent = the answer"
                );
            }
        }
    }
}
