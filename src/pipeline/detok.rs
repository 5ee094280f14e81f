//! Incremental detokenization for streaming: turns generated ids into text deltas whose
//! concatenation equals the non-streamed decode of the same ids.
//!
//! Decoding token by token is wrong in three ways: decoders treat a sequence's first token
//! specially (leading-space rules); byte-fallback pieces (`<0xE2>`) only form a character
//! together; and tokenizers' `ByteFallback` decoder turns a whole run of byte pieces into one
//! U+FFFD per byte as soon as the run is not valid UTF-8, so a later byte can rewrite a
//! character decoded earlier. Hence each step
//! - only considers ids up to the start of a trailing run of byte pieces (ids the decode skips,
//!   such as special tokens under `skip_special_tokens`, do not end a run), because until the
//!   run ends its text may still change;
//! - decodes a short window starting a little before the new text (`ids[prefix_offset..]`) and
//!   subtracts the decode of the part already emitted (`ids[prefix_offset..read_offset]`);
//! - holds the delta back while it ends in U+FFFD (an incomplete UTF-8 sequence).
//!
//! [`IncrementalDecoder::flush`] settles the rest against the full decode. Should a decoder
//! rewrite text in some other way, the step emits nothing and flush still restores the
//! invariant as long as what was streamed is a prefix of the full decode; otherwise streamed
//! text cannot be taken back, a warning is logged and flush returns the window's remainder.

use tokenizers::Tokenizer;

/// The tokenizer failed to decode (e.g. an id outside its vocabulary).
#[derive(Debug, thiserror::Error)]
pub enum DetokError {
    #[error("cannot decode generated tokens: {0}")]
    Decode(String),
}

/// Streaming decoder state for one generated sequence (prompt ids are not part of it).
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the decode window: a little context before the text not yet emitted.
    prefix_offset: usize,
    /// End of what has been emitted (in ids).
    read_offset: usize,
    /// Everything emitted so far, to settle against the full decode at flush.
    emitted: String,
}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        IncrementalDecoder {
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            emitted: String::new(),
        }
    }

    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Adds one generated id and returns the newly completed text (often empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, DetokError> {
        self.ids.push(id);
        let stable = self.stable_len(tokenizer);
        if stable <= self.read_offset {
            return Ok(String::new());
        }
        match self.window_delta(tokenizer, stable)? {
            Some(delta) if !delta.is_empty() && !delta.ends_with('\u{FFFD}') => {
                self.prefix_offset = self.read_offset;
                self.read_offset = stable;
                self.emitted.push_str(&delta);
                Ok(delta)
            }
            _ => Ok(String::new()),
        }
    }

    /// Releases the text held back so far (a trailing run of byte pieces), as if the sequence ended
    /// here, for a caller that knows a stretch of text ends at the last id (a reasoning marker).
    /// The decode window keeps its context, so the text after it keeps its leading-space rules. A
    /// character whose bytes straddle the boundary comes out as U+FFFD on each side; [`Self::flush`]
    /// then sees the difference and logs it.
    pub fn settle(&mut self, tokenizer: &Tokenizer) -> Result<String, DetokError> {
        let end = self.ids.len();
        if end <= self.read_offset {
            return Ok(String::new());
        }
        match self.window_delta(tokenizer, end)? {
            Some(delta) if !delta.is_empty() => {
                self.prefix_offset = self.read_offset;
                self.read_offset = end;
                self.emitted.push_str(&delta);
                Ok(delta)
            }
            _ => Ok(String::new()),
        }
    }

    /// Returns whatever is still held back (including a U+FFFD that never completed), so that
    /// all `push` results plus this equal `tokenizer.decode(all ids, skip_special_tokens)`.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, DetokError> {
        let full = self.decode(tokenizer, &self.ids)?;
        let rest = match full.strip_prefix(self.emitted.as_str()) {
            Some(rest) => rest.to_owned(),
            None => {
                tracing::warn!(
                    emitted = %self.emitted,
                    full = %full,
                    "streamed text is not a prefix of the full decode; streamed deltas differ"
                );
                self.window_delta(tokenizer, self.ids.len())?
                    .unwrap_or_default()
            }
        };
        self.emitted.push_str(&rest);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(rest)
    }

    /// How many leading ids have text that later ids cannot change: all of them, unless the
    /// sequence ends in a run of byte pieces (possibly interleaved with ids the decode skips).
    fn stable_len(&self, tokenizer: &Tokenizer) -> usize {
        let mut start = self.ids.len();
        let mut open_run = false;
        while let Some(&id) = start.checked_sub(1).and_then(|i| self.ids.get(i)) {
            match tokenizer.id_to_token(id) {
                Some(token) if is_byte_piece(&token) => open_run = true,
                Some(token) if !self.skipped(tokenizer, &token) => break,
                // Unknown ids and skipped special tokens vanish before the decoder.
                _ => {}
            }
            start -= 1;
        }
        if open_run {
            start
        } else {
            self.ids.len()
        }
    }

    fn skipped(&self, tokenizer: &Tokenizer, token: &str) -> bool {
        self.skip_special_tokens && tokenizer.get_added_vocabulary().is_special_token(token)
    }

    /// Text that `ids[prefix_offset..end]` adds beyond what was emitted; `None` if its decode
    /// does not extend the emitted part's decode.
    fn window_delta(
        &self,
        tokenizer: &Tokenizer,
        end: usize,
    ) -> Result<Option<String>, DetokError> {
        let (prefix, read) = (self.prefix_offset, self.read_offset);
        let before = self.decode(tokenizer, self.ids.get(prefix..read).unwrap_or_default())?;
        let after = self.decode(tokenizer, self.ids.get(prefix..end).unwrap_or_default())?;
        Ok(after.strip_prefix(before.as_str()).map(str::to_owned))
    }

    fn decode(&self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, DetokError> {
        if ids.is_empty() {
            return Ok(String::new());
        }
        tokenizer
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| DetokError::Decode(e.to_string()))
    }
}

/// The `<0xHH>` spelling that tokenizers' `ByteFallback` decoder turns into a raw byte.
fn is_byte_piece(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && token[3..5].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-gemma3n/tokenizer.json"
    );

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_file(FIXTURE).expect("fixture tokenizer loads")
    }

    /// The fixture's byte-fallback piece for one byte.
    fn byte_id(b: u8) -> u32 {
        109 + u32::from(b)
    }

    fn stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> (Vec<String>, String) {
        let mut d = IncrementalDecoder::new(skip);
        let deltas = ids.iter().map(|&id| d.push(tok, id).unwrap()).collect();
        (deltas, d.flush(tok).unwrap())
    }

    fn piece(tok: &Tokenizer, text: &str) -> u32 {
        tok.token_to_id(text)
            .expect("piece in the fixture vocabulary")
    }

    #[test]
    fn byte_runs_are_held_until_they_end() {
        let tok = tokenizer();
        let mut ids = vec![piece(&tok, "a")];
        ids.extend("✓".bytes().map(byte_id));
        ids.push(piece(&tok, "b"));
        let (deltas, rest) = stream(&tok, &ids, true);
        assert_eq!(deltas, ["a", "", "", "", "✓b"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn a_later_byte_may_spoil_a_whole_run() {
        // "é" then a stray continuation byte: the decoder turns all three bytes into U+FFFD,
        // so "é" must never have been streamed.
        let tok = tokenizer();
        let ids: Vec<u32> = [0xC3, 0xA9, 0x80].map(byte_id).into();
        let (deltas, rest) = stream(&tok, &ids, true);
        assert_eq!(deltas.concat(), "");
        assert_eq!(rest, "\u{FFFD}\u{FFFD}\u{FFFD}");
        assert_eq!(rest, tok.decode(&ids, true).unwrap());
    }

    #[test]
    fn an_unfinished_character_comes_out_at_flush() {
        let tok = tokenizer();
        let ids = [piece(&tok, "x"), byte_id(0xF0), byte_id(0x9F)];
        let (deltas, rest) = stream(&tok, &ids, true);
        assert_eq!(deltas, ["x", "", ""]);
        assert_eq!(format!("x{rest}"), tok.decode(&ids, true).unwrap());
        assert!(rest.contains('\u{FFFD}'));
    }

    #[test]
    fn special_tokens_follow_skip_special_tokens() {
        let tok = tokenizer();
        let text = tok.encode("hi there", false).unwrap().get_ids().to_vec();
        let ids: Vec<u32> = [&text[..], &[106, 1]].concat();
        for skip in [true, false] {
            let (deltas, rest) = stream(&tok, &ids, skip);
            assert_eq!(deltas.concat() + &rest, tok.decode(&ids, skip).unwrap());
        }
        let (deltas, _) = stream(&tok, &ids, true);
        assert_eq!(deltas.concat(), "hi there");
    }

    /// Deterministic id soup: text pieces, newlines, special and unused tokens, byte-fallback
    /// runs that spell multi-byte characters, and stray (invalid) bytes.
    fn random_ids(seed: u64) -> Vec<u32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move |n: u32| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % u64::from(n)) as u32
        };
        let chars = ["é", "✓", "🙂", "中文", "ü"];
        let mut ids = Vec::new();
        let len = 1 + next(40);
        while (ids.len() as u32) < len {
            match next(10) {
                0..=3 => ids.push(365 + next(145)),
                4 => ids.push(107 + next(2)),
                5 => ids
                    .push([0, 1, 2, 3, 105, 106, 510, 511, 512, 513, 520, 521][next(12) as usize]),
                6 | 7 => {
                    let c = chars[next(chars.len() as u32) as usize];
                    ids.extend(c.bytes().map(byte_id));
                }
                _ => ids.push(109 + next(256)),
            }
        }
        ids
    }

    #[test]
    fn deltas_concatenate_to_the_full_decode() {
        let tok = tokenizer();
        for seed in 0..1000 {
            let ids = random_ids(seed);
            for skip in [true, false] {
                let (deltas, rest) = stream(&tok, &ids, skip);
                let full = tok.decode(&ids, skip).unwrap();
                assert_eq!(
                    deltas.concat() + &rest,
                    full,
                    "seed {seed} skip {skip} ids {ids:?}"
                );
                // Nothing is streamed that ends in an incomplete character.
                assert!(
                    deltas.iter().all(|d| !d.ends_with('\u{FFFD}')),
                    "seed {seed}"
                );
            }
        }
    }

    #[test]
    fn settle_releases_a_byte_run_before_a_special_token() {
        // "a✓" as bytes, then a special token (a reasoning marker), then "b": without settling,
        // "✓" would only come out with "b".
        let tok = tokenizer();
        let mut d = IncrementalDecoder::new(true);
        assert_eq!(d.push(&tok, piece(&tok, "a")).unwrap(), "a");
        for b in "✓".bytes() {
            assert_eq!(d.push(&tok, byte_id(b)).unwrap(), "");
        }
        assert_eq!(d.push(&tok, 106).unwrap(), "");
        assert_eq!(d.settle(&tok).unwrap(), "✓");
        assert_eq!(d.settle(&tok).unwrap(), "");
        assert_eq!(d.push(&tok, piece(&tok, "b")).unwrap(), "b");
        assert_eq!(d.flush(&tok).unwrap(), "");
        // Nothing held: nothing to settle, and the deltas still add up to the full decode.
        let text = tok.encode("hi there", false).unwrap().get_ids().to_vec();
        let mut d = IncrementalDecoder::new(true);
        let mut out = String::new();
        for &id in &text[..1] {
            out += &d.push(&tok, id).unwrap();
        }
        out += &d.push(&tok, 105).unwrap();
        out += &d.settle(&tok).unwrap();
        for &id in &text[1..] {
            out += &d.push(&tok, id).unwrap();
        }
        out += &d.flush(&tok).unwrap();
        let ids: Vec<u32> = [&text[..1], &[105], &text[1..]].concat();
        assert_eq!(out, tok.decode(&ids, true).unwrap());
    }

    #[test]
    fn flush_is_idempotent_and_bad_ids_are_errors() {
        let tok = tokenizer();
        let mut d = IncrementalDecoder::new(true);
        assert_eq!(d.flush(&tok).unwrap(), "");
        assert_eq!(d.push(&tok, piece(&tok, "q")).unwrap(), "q");
        assert_eq!(d.flush(&tok).unwrap(), "");
        assert_eq!(d.flush(&tok).unwrap(), "");
        assert_eq!(d.ids(), [piece(&tok, "q")]);
        // An id past the vocabulary either decodes to nothing or errors, but never panics.
        let _ = IncrementalDecoder::new(true).push(&tok, u32::MAX);
    }
}
