//! How long a prompt can be before anything expensive runs on it.
//!
//! A 30 MB message to a model with a 4 096-token context used to be rendered and tokenized in full
//! (seconds of CPU, gigabytes of token offsets) before the context-length check refused it. Two
//! bounds refuse it cheaply instead:
//!
//! - [`max_text_bytes_per_token`]: no token of the vocabulary covers more bytes of text than this, so
//!   a prompt of `B` bytes has at least `B / max` tokens. Computed once from the tokenizer, and only
//!   where its normalizer and added tokens cannot swallow text (otherwise `None`: no byte bound).
//!   The front end gets it in heartbeats and refuses from the byte count alone.
//! - [`tokens_at_least`]: tokenizes in slices and stops as soon as the count is certainly over the
//!   limit, so the work done on a prompt that cannot fit is bounded by the limit, not by its length.

use serde_json::Value;
use tokenizers::Tokenizer;

/// The most bytes of input text one token can stand for, or `None` when the tokenizer can make one
/// token of arbitrarily much text (an unknown-token fusion, a normalizer that strips, added tokens
/// that absorb the whitespace around them).
pub fn max_text_bytes_per_token(tokenizer: &Tokenizer) -> Option<u32> {
    let json: Value = serde_json::from_str(&tokenizer.to_string(false).ok()?).ok()?;
    bound_of(&json)
}

fn bound_of(json: &Value) -> Option<u32> {
    let model = json.get("model")?;
    let kind = model.get("type").and_then(Value::as_str)?;
    let byte_level = pre_tokenizer_is_byte_level(json.get("pre_tokenizer"));
    match kind {
        // Unknown pieces fused into one token can be any length, unless nothing is ever unknown
        // (byte fallback, or byte-level pre-tokenization that maps every byte into the alphabet).
        "BPE" => {
            let fuse = model.get("fuse_unk").and_then(Value::as_bool) == Some(true);
            let fallback = model.get("byte_fallback").and_then(Value::as_bool) == Some(true);
            if fuse && !fallback && !byte_level {
                return None;
            }
        }
        "WordLevel" | "WordPiece" => {}
        _ => return None, // Unigram fuses unknown characters
    }
    let shrink = normalizer_shrink(json.get("normalizer"))?;
    let mut longest = 0usize;
    match model.get("vocab") {
        Some(Value::Object(v)) => longest = v.keys().map(String::len).max().unwrap_or(0),
        Some(Value::Array(v)) => {
            for e in v {
                if let Some(s) = e.get(0).and_then(Value::as_str) {
                    longest = longest.max(s.len());
                }
            }
        }
        _ => return None,
    }
    for t in json
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let strips = ["lstrip", "rstrip"]
            .iter()
            .any(|k| t.get(k).and_then(Value::as_bool) == Some(true));
        if strips {
            return None; // it takes any run of whitespace with it
        }
        let content = t.get("content").and_then(Value::as_str).unwrap_or("");
        longest = longest.max(content.len());
    }
    // A vocabulary string is never shorter than the text it matches (SentencePiece's `▁` is 3
    // bytes for a 1-byte space, byte-level BPE spells each byte with 1–2), except where the
    // normalizer shortened the text first.
    u32::try_from(longest.checked_mul(shrink)?)
        .ok()
        .filter(|&b| b > 0)
}

fn pre_tokenizer_is_byte_level(p: Option<&Value>) -> bool {
    let Some(p) = p else { return false };
    match p.get("type").and_then(Value::as_str) {
        Some("ByteLevel") => true,
        Some("Sequence") => p
            .get("pretokenizers")
            .and_then(Value::as_array)
            .is_some_and(|v| v.iter().any(|x| pre_tokenizer_is_byte_level(Some(x)))),
        _ => false,
    }
}

/// How many bytes of input the normalizer can turn into one byte (`None`: unbounded).
fn normalizer_shrink(n: Option<&Value>) -> Option<usize> {
    let Some(n) = n.filter(|n| !n.is_null()) else {
        return Some(1);
    };
    match n.get("type").and_then(Value::as_str)? {
        "Prepend" | "Lowercase" => Some(1),
        // Compatibility forms map a 4-byte character to one byte at most ("𝐀" → "A").
        "NFC" | "NFD" | "NFKC" | "NFKD" | "Nmt" | "Precompiled" => Some(4),
        "Replace" => {
            let pattern = n
                .get("pattern")
                .and_then(|p| p.get("String"))
                .and_then(Value::as_str)?;
            let content = n.get("content").and_then(Value::as_str)?;
            if content.is_empty() {
                return None;
            }
            Some(pattern.len().div_ceil(content.len()).max(1))
        }
        "Sequence" => {
            let mut total = 1usize;
            for x in n.get("normalizers").and_then(Value::as_array)? {
                total = total.checked_mul(normalizer_shrink(Some(x))?)?;
            }
            Some(total)
        }
        // Strip, StripAccents, BertNormalizer (drops control characters) and anything unknown can
        // delete text.
        _ => None,
    }
}

/// The fewest tokens `text_bytes` bytes of text can become.
pub fn min_tokens(text_bytes: usize, max_bytes_per_token: u32) -> usize {
    text_bytes.div_ceil(max_bytes_per_token.max(1) as usize)
}

/// Bytes tokenized at a time by [`tokens_at_least`].
const SLICE_BYTES: usize = 16 * 1024;
/// Tokens one cut between slices can add to a count (a token split in two, a pre-token rejoined).
const SLACK_PER_CUT: usize = 4;

/// A count of `text`'s tokens that is certainly not above the true one, found by tokenizing it a
/// slice at a time (cut after whitespace) and stopping once it passes `limit`. Each cut between
/// slices can change the count by a few tokens; that slack is taken off. The work is bounded by the
/// limit: at most `limit` tokens' worth of slices (plus the slack) is tokenized, whatever the length.
pub fn tokens_at_least(tokenizer: &Tokenizer, text: &str, limit: usize) -> usize {
    let mut count = 0usize;
    let mut cuts = 0usize;
    let mut rest = text;
    loop {
        let slice = head(rest, SLICE_BYTES);
        rest = &rest[slice.len()..];
        match tokenizer.encode(slice, false) {
            Ok(e) => count += e.len(),
            Err(_) => return 0,
        }
        let sure = count.saturating_sub(cuts * SLACK_PER_CUT);
        if rest.is_empty() || sure > limit {
            return sure;
        }
        cuts += 1;
    }
}

/// At most `max` bytes from the start of `s`, ending after a whitespace character where there is
/// one in the second half (so words are not cut), else at a character boundary.
fn head(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let cut = s[..end]
        .rfind(char::is_whitespace)
        .filter(|&i| i >= end / 2)
        .map(|i| i + s[i..].chars().next().map_or(1, char::len_utf8));
    &s[..cut.unwrap_or(end)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bounds_follow_the_vocabulary_and_refuse_text_swallowers() {
        let base = json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "▁hello": 1}, "merges": [], "byte_fallback": true, "fuse_unk": true},
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            "added_tokens": [{"content": "<start_of_turn>", "lstrip": false, "rstrip": false}],
        });
        assert_eq!(bound_of(&base), Some(15));
        let mut strip = base.clone();
        strip["added_tokens"][0]["rstrip"] = json!(true);
        assert_eq!(bound_of(&strip), None);
        let mut fused = base.clone();
        fused["model"]["byte_fallback"] = json!(false);
        assert_eq!(bound_of(&fused), None);
        let mut nfkc = base.clone();
        nfkc["normalizer"] = json!({"type": "NFKC"});
        assert_eq!(bound_of(&nfkc), Some(60));
        let mut stripping = base.clone();
        stripping["normalizer"] = json!({"type": "Sequence", "normalizers": [{"type": "Strip"}]});
        assert_eq!(bound_of(&stripping), None);
        let mut unigram = base;
        unigram["model"]["type"] = json!("Unigram");
        assert_eq!(bound_of(&unigram), None);
    }

    #[test]
    fn slices_end_after_whitespace_and_on_char_boundaries() {
        let s = "ab cd ef";
        assert_eq!(head(s, 7), "ab cd ");
        assert_eq!(head("ééééé", 3), "é");
        assert_eq!(head("abcdefgh", 3), "abc");
        let mut total = String::new();
        let mut rest = "x y zzzz ü w";
        while !rest.is_empty() {
            let h = head(rest, 4);
            assert!(!h.is_empty());
            total.push_str(h);
            rest = &rest[h.len()..];
        }
        assert_eq!(total, "x y zzzz ü w");
    }

    #[test]
    fn min_tokens_rounds_up() {
        assert_eq!(min_tokens(0, 18), 0);
        assert_eq!(min_tokens(19, 18), 2);
        assert_eq!(min_tokens(5, 0), 5);
    }
}
