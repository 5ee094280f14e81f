//! Cost of constrained decoding (`make bench-grammar`; not run by CI).
//!
//! ```text
//! cargo bench --bench grammar -- [--vocab tokenizer.json]... [--model DIR --quant Q] [--steps 200]
//! ```
//!
//! 1. **Mask cost per step** on each `--vocab` (a `tokenizer.json`): for each grammar, a walk of
//!    `--steps` tokens picked at random among the allowed ones; timed is what the engine adds to a
//!    step: computing the mask, applying it to a logits row of the vocabulary's width, committing
//!    the token. Median and p90 in microseconds.
//! 2. **Side by side on a model** (`--model`): the same prompt decoded `--tokens` tokens without
//!    and with a JSON schema (`ignore_eos`, greedy), alternating, `--repeats` times; the median
//!    decode milliseconds per token of each, and their ratio.
//!
//! Prints one table.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use onnx_chat::models::generate::GenEvent;
use onnx_chat::models::loaded::{LoadOptions, LoadedModel};
use onnx_chat::models::tools::job_grammar;
use onnx_chat::pipeline::grammar::{Grammar, Vocab};
use onnx_chat::protocol::{
    ChatMessage, Job, ResponseFormat, Role, SamplingOverrides, ToolChoice, ToolSpec,
};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn schema() -> Value {
    json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 16}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
          "required": ["city", "zip"], "additionalProperties": false}},
      "required": ["name", "age", "tags", "address"], "additionalProperties": false})
}

fn grammars() -> Vec<(&'static str, Grammar)> {
    let tools = Job {
        tools: vec![
            ToolSpec {
                name: "get_weather".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}),
            },
            ToolSpec {
                name: "search".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["query"]}),
            },
        ],
        tool_choice: Some(ToolChoice::Required),
        ..Job::default()
    };
    vec![
        (
            "json_object",
            Grammar::JsonSchema(json!({"type": "object"})),
        ),
        ("json_schema (nested)", Grammar::JsonSchema(schema())),
        (
            "tool calls (required)",
            job_grammar(&tools, false)
                .expect("tools")
                .expect("a grammar"),
        ),
    ]
}

/// xorshift64*, for a reproducible walk.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }
}

/// Microseconds per step (mask + apply + commit) over a random walk of at most `steps` tokens.
fn walk(v: &Vocab, g: &Grammar, steps: usize, seed: u64) -> Vec<f64> {
    let mut c = v.constraint(g).expect("grammar compiles");
    let mut rng = Rng(seed | 1);
    let mut times = Vec::new();
    let mut logits = vec![0f32; v.size()];
    for _ in 0..steps {
        logits.fill(0.0);
        let t = Instant::now();
        c.apply(&mut logits).expect("mask");
        let dt = t.elapsed();
        let allowed: Vec<u32> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, _)| i as u32)
            .collect();
        // Prefer not to end: a walk that stops at once times nothing.
        let choices: Vec<u32> = allowed.iter().copied().filter(|&t| t > 2).collect();
        let pick = if choices.is_empty() {
            &allowed
        } else {
            &choices
        };
        if pick.is_empty() {
            break;
        }
        let tok = pick[rng.below(pick.len())];
        let t2 = Instant::now();
        c.commit(tok).expect("commit");
        times.push((dt + t2.elapsed()).as_secs_f64() * 1e6);
        if c.is_stopped() {
            break;
        }
    }
    times
}

/// Decode milliseconds per token of one greedy generation of `tokens` tokens.
fn decode_ms(model: &LoadedModel, constrained: bool, tokens: u32) -> f64 {
    let job = Job {
        job_id: uuid::Uuid::new_v4().to_string(),
        model: model.info.name.clone(),
        messages: vec![ChatMessage::text(Role::User, "Describe a person as JSON.")],
        sampling: SamplingOverrides {
            temperature: Some(0.0),
            seed: Some(1),
            ..Default::default()
        },
        max_tokens: Some(tokens),
        ignore_eos: true,
        response_format: constrained.then(|| ResponseFormat::JsonSchema {
            // Unbounded strings: the walk never ends before `tokens`.
            schema: json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}),
            name: None,
        }),
        ..Job::default()
    };
    let prepared = model.prepare(&job).expect("prepare");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    model
        .start(prepared, tx, Arc::new(AtomicBool::new(false)))
        .expect("start");
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            GenEvent::Done {
                choices, decode_ms, ..
            } => {
                let n = choices.first().map_or(1, |c| c.1).max(2);
                return decode_ms / (n - 1) as f64;
            }
            GenEvent::Error(e) => panic!("generation failed: {}", e.message),
            _ => {}
        }
    }
    panic!("no Done event")
}

fn main() -> anyhow::Result<()> {
    let mut vocabs: Vec<PathBuf> = Vec::new();
    let (mut model_dir, mut quant) = (None::<PathBuf>, "Q4_MIXED".to_string());
    let (mut steps, mut tokens, mut repeats) = (200usize, 48u32, 5usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--vocab" => vocabs.extend(args.next().map(PathBuf::from)),
            "--model" => model_dir = args.next().map(PathBuf::from),
            "--quant" => quant = args.next().unwrap_or(quant),
            "--steps" => steps = args.next().and_then(|s| s.parse().ok()).unwrap_or(steps),
            "--tokens" => tokens = args.next().and_then(|s| s.parse().ok()).unwrap_or(tokens),
            "--repeats" => repeats = args.next().and_then(|s| s.parse().ok()).unwrap_or(repeats),
            _ => {}
        }
    }
    if vocabs.is_empty() {
        vocabs.push(PathBuf::from("tests/fixtures/tiny-gemma3n/tokenizer.json"));
    }
    println!("| vocabulary | ids | grammar | steps | median µs/step | p90 µs/step |");
    println!("|---|---:|---|---:|---:|---:|");
    for path in &vocabs {
        let tok = Arc::new(Tokenizer::from_file(path).map_err(|e| anyhow::anyhow!("{e}"))?);
        let n = tok.get_vocab_size(true);
        let eos = tok
            .token_to_id("<eos>")
            .or_else(|| tok.token_to_id("<|endoftext|>"))
            .unwrap_or(0);
        let t = Instant::now();
        let v = Vocab::new(tok, &[eos], n).map_err(|e| anyhow::anyhow!(e))?;
        let build = t.elapsed().as_secs_f64();
        for (name, g) in grammars() {
            let mut times = Vec::new();
            for seed in 0..5 {
                times.extend(walk(&v, &g, steps, 0x9E37_79B9 + seed));
            }
            println!(
                "| {} (built in {build:.2} s) | {n} | {name} | {} | {:.0} | {:.0} |",
                path.display(),
                times.len(),
                quantile(times.clone(), 0.5),
                quantile(times, 0.9),
            );
        }
    }
    if let Some(dir) = model_dir {
        onnx_chat::engine::runtime::init(None)?;
        let spec =
            onnx_chat::models::resolve::ModelSpec::parse(dir.to_str().unwrap(), Some(&quant))?;
        let hub = onnx_chat::models::hub::HubConfig::from_vars(|_| None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let resolved = rt.block_on(onnx_chat::models::resolve::resolve(&spec, None, &hub))?;
        let opts = LoadOptions {
            kv_cache_bytes: 0,
            ..LoadOptions::default()
        };
        let model = LoadedModel::load(&resolved, &opts)?;
        decode_ms(&model, false, 4);
        let (mut free, mut masked) = (Vec::new(), Vec::new());
        for _ in 0..repeats {
            free.push(decode_ms(&model, false, tokens));
            masked.push(decode_ms(&model, true, tokens));
        }
        let (f, m) = (quantile(free, 0.5), quantile(masked, 0.5));
        println!();
        println!("| model | tokens | free ms/token | json_schema ms/token | ratio |");
        println!("|---|---:|---:|---:|---:|");
        println!(
            "| {} {quant} | {tokens} | {f:.2} | {m:.2} | {:.3} |",
            dir.display(),
            m / f
        );
    }
    Ok(())
}
