//! Constrained decoding: each step, the logits of tokens the grammar does not allow next are set
//! to -inf before sampling, so the answer always matches the grammar (a JSON schema, or a Lark
//! grammar such as the tool-call one). The grammar engine is llguidance (the one vLLM and
//! llama.cpp use); this module gives it our tokenizer's view of the vocabulary and keeps its API
//! out of the rest of the server.
//!
//! The vocabulary is read from the tokenizer's own JSON (llguidance's reading of `tokenizer.json`:
//! byte-level BPE or SentencePiece with byte fallback); special tokens get llguidance's marker
//! byte, so no grammar text can produce them. End-of-sequence ids are allowed exactly where the
//! grammar may end. llguidance's `toktrie_hf_tokenizers` would do the same through a second copy
//! of `tokenizers` (it pins 0.21, we use 0.22), so we implement its small `TokenizerEnv` trait over
//! our tokenizer instead.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{
    ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv,
};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use tokenizers::Tokenizer;

/// What a constraint is written in.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON Schema (`{"type": "object"}` for any object). Unless the schema sets llguidance's
    /// `x-guidance` options, the JSON is compact: `", "` between items, `": "` after keys, no
    /// other whitespace.
    JsonSchema(Value),
    /// llguidance's Lark dialect (may embed schemas with `%json {…}`).
    Lark(String),
}

/// The JSON layout every schema gets unless it says otherwise: one fixed way to write each value,
/// so a bounded schema always ends within a bounded number of tokens.
pub fn json_layout() -> Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

impl Grammar {
    /// Text matching a regular expression (the whole answer).
    pub fn regex(pattern: &str) -> Self {
        Grammar::Lark(format!("start: /{}/", pattern.replace('/', "\\/")))
    }

    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Value::Object(o) = &mut schema {
                    o.entry("x-guidance").or_insert_with(json_layout);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
        }
    }

    /// Compiles the grammar against a one-byte-per-token vocabulary: the schema or grammar errors
    /// a front end can report before any worker sees the request.
    pub fn check(&self) -> Result<(), String> {
        static FACTORY: OnceLock<Result<ParserFactory, String>> = OnceLock::new();
        let factory = FACTORY
            .get_or_init(|| {
                let mut f = ParserFactory::new_simple(&ApproximateTokEnv::single_byte_env())
                    .map_err(|e| e.to_string())?;
                f.quiet();
                Ok(f)
            })
            .as_ref()
            .map_err(Clone::clone)?;
        compile(factory, self).map(|_| ())
    }
}

fn compile(factory: &ParserFactory, grammar: &Grammar) -> Result<Matcher, String> {
    let parser = guarded(|| {
        factory
            .create_parser(grammar.top_level())
            .map_err(|e| e.to_string())
    })?;
    let m = Matcher::new(Ok(parser));
    match m.get_error() {
        Some(e) => Err(e),
        None => Ok(m),
    }
}

/// llguidance reports errors as values, but a panic in it must not take the engine thread down.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the grammar engine panicked".into())),
    }
}

/// The tokenizer as llguidance sees it: every id's bytes in a trie.
struct Env {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Only used by llguidance for forced tokens and prompt healing (neither of which we ask for):
    /// the model's tokenizer where it round-trips, the trie's greedy split otherwise.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// A model's vocabulary for constrained decoding and for token bytes (logprobs). Built once per
/// model; cheap to share.
#[derive(Clone)]
pub struct Vocab {
    factory: Arc<ParserFactory>,
    env: TokEnv,
    eos: Vec<u32>,
}

impl std::fmt::Debug for Vocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vocab")
            .field("size", &self.env.tok_trie().vocab_size())
            .field("eos", &self.eos)
            .finish()
    }
}

impl Vocab {
    /// `n_vocab`: the logits' width (ids past the tokenizer's are never allowed); `eos`: the ids
    /// that end a sequence (the first is llguidance's end-of-sequence id).
    pub fn new(tokenizer: Arc<Tokenizer>, eos: &[u32], n_vocab: usize) -> Result<Self, String> {
        let json: Value =
            serde_json::from_str(&tokenizer.to_string(false).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        let mut words = guarded(|| {
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())
        })
        .map_err(|e| format!("cannot read the vocabulary for constrained decoding: {e}"))?;
        if words.len() > n_vocab {
            return Err(format!(
                "the tokenizer has {} ids but the model's logits only {n_vocab}",
                words.len()
            ));
        }
        // Ids the tokenizer does not define (embedding rows past its vocabulary): unreachable
        // special placeholders.
        for (id, w) in words.iter_mut().enumerate() {
            if w.is_empty() {
                *w = placeholder(id);
            }
        }
        while words.len() < n_vocab {
            words.push(placeholder(words.len()));
        }
        let &first = eos
            .first()
            .ok_or("constrained decoding needs an end-of-sequence id")?;
        if let Some(bad) = eos.iter().find(|&&e| e as usize >= n_vocab) {
            return Err(format!("end-of-sequence id {bad} is past the vocabulary"));
        }
        let info = TokRxInfo::new(n_vocab as u32, first);
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(eos);
        }
        let env: TokEnv = Arc::new(Env { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            env,
            eos: eos.to_vec(),
        })
    }

    pub fn size(&self) -> usize {
        self.env.tok_trie().vocab_size()
    }

    /// The bytes a token stands for (a special token: its name).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let trie = self.env.tok_trie();
        if id as usize >= trie.vocab_size() {
            return Vec::new();
        }
        let b = trie.token(id);
        match b.first() {
            Some(&TokTrie::SPECIAL_TOKEN_MARKER) => b[1..].to_vec(),
            _ => b.to_vec(),
        }
    }

    /// A fresh constraint at the start of the answer.
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint, String> {
        Ok(Constraint {
            matcher: compile(&self.factory, grammar)?,
            eos: self.eos.clone(),
            mask: None,
        })
    }
}

fn placeholder(id: usize) -> Vec<u8> {
    let mut name = format!(".<[{id}]>").into_bytes();
    name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
    name
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
    eos: Vec<u32>,
    /// The mask of the last [`Self::apply`].
    mask: Option<SimpleVob>,
}

impl Clone for Constraint {
    /// Independent state (for `n` choices of one prompt); compiled lexer caches stay shared.
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.clone(),
            eos: self.eos.clone(),
            mask: None,
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    /// Sets the logits of every token the grammar does not allow next to -inf (end-of-sequence
    /// ids only where the grammar may end).
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let mask = guarded(|| self.matcher.compute_mask().map_err(|e| e.to_string()))?;
        if mask.is_zero() {
            return Err(self
                .matcher
                .get_error()
                .unwrap_or_else(|| "the grammar allows no next token".into()));
        }
        let words = mask.as_slice();
        for (w, chunk) in words.iter().zip(logits.chunks_mut(32)) {
            match *w {
                u32::MAX => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                bits => {
                    for (j, l) in chunk.iter_mut().enumerate() {
                        if bits & (1 << j) == 0 {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        // Logits past the vocabulary (none when the widths agree).
        let covered = words.len() * 32;
        if logits.len() > covered {
            logits[covered..].fill(f32::NEG_INFINITY);
        }
        let eos_ok = self.eos.first().is_some_and(|&e| mask.is_allowed(e));
        for &e in &self.eos {
            if let Some(l) = logits.get_mut(e as usize) {
                if !eos_ok {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        self.mask = Some(mask);
        Ok(())
    }

    /// Whether the last mask allowed `token`.
    pub fn allowed(&self, token: u32) -> bool {
        match &self.mask {
            None => true,
            Some(m) if self.eos.contains(&token) => {
                self.eos.first().is_some_and(|&e| m.is_allowed(e))
            }
            Some(m) => (token as usize) < m.len() && m.is_allowed(token),
        }
    }

    /// Advances past `token` (an end-of-sequence id ends the answer and changes nothing).
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        self.mask = None;
        if self.eos.contains(&token) {
            return Ok(());
        }
        guarded(|| self.matcher.consume_token(token).map_err(|e| e.to_string()))
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Vocab {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gemma3n");
        let t = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        Vocab::new(Arc::new(t), &[1, 106], 528).unwrap()
    }

    /// Greedy over a grammar with all logits equal: the lowest allowed id each step.
    fn run(v: &Vocab, g: &Grammar, steps: usize) -> (String, bool) {
        let mut c = v.constraint(g).unwrap();
        let mut out = Vec::new();
        for _ in 0..steps {
            let mut logits: Vec<f32> = (0..v.size()).map(|i| -(i as f32) * 1e-3).collect();
            c.apply(&mut logits).unwrap();
            let t = crate::pipeline::sampling::greedy(&logits);
            assert!(c.allowed(t));
            if t == 1 || t == 106 {
                return (String::from_utf8_lossy(&out).into(), true);
            }
            out.extend(v.token_bytes(t));
            c.commit(t).unwrap();
            if c.is_stopped() {
                return (String::from_utf8_lossy(&out).into(), true);
            }
        }
        (String::from_utf8_lossy(&out).into(), false)
    }

    #[test]
    fn schema_constrains_and_ends_with_eos() {
        let v = vocab();
        let g = Grammar::JsonSchema(serde_json::json!({
            "type": "object",
            "properties": {"a": {"type": "string", "enum": ["x", "yy"]}, "b": {"type": "boolean"}},
            "required": ["a", "b"], "additionalProperties": false
        }));
        let (text, ended) = run(&v, &g, 64);
        assert!(ended, "{text}");
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert!(parsed["a"] == "x" || parsed["a"] == "yy", "{text}");
        assert!(parsed["b"].is_boolean());
        assert!(text.contains("\": "), "compact layout with a space: {text}");
    }

    #[test]
    fn eos_is_masked_until_the_grammar_may_end() {
        let v = vocab();
        let mut c = v
            .constraint(&Grammar::JsonSchema(serde_json::json!({"type": "object"})))
            .unwrap();
        let mut logits = vec![0.0; 528];
        c.apply(&mut logits).unwrap();
        assert_eq!(logits[1], f32::NEG_INFINITY);
        assert_eq!(logits[106], f32::NEG_INFINITY);
        assert!(!c.allowed(1));
        // (Of ids with equal bytes, the trie keeps one.)
        assert!((0..528u32).any(|t| v.token_bytes(t) == b"{" && c.allowed(t)));
    }

    #[test]
    fn bad_schemas_and_grammars_are_reported() {
        assert!(Grammar::JsonSchema(serde_json::json!({"type": "object"}))
            .check()
            .is_ok());
        let e = Grammar::JsonSchema(serde_json::json!({"type": "no-such-type"}))
            .check()
            .unwrap_err();
        assert!(!e.is_empty());
        assert!(Grammar::Lark("start: %json {".into()).check().is_err());
    }

    #[test]
    fn special_tokens_keep_their_names_as_bytes() {
        let v = vocab();
        assert_eq!(v.token_bytes(106), b"<end_of_turn>");
        assert_eq!(v.token_bytes(109 + 0x41), b"A");
    }
}
