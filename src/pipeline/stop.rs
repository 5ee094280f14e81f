//! Stop strings, matched on the decoded text rather than on ids, because a stop string can
//! straddle tokens (`"\n\nUser:"` may arrive as `"\n"`, `"\nUs"`, `"er:"`). Text that could be
//! the beginning of a stop string is held back until it either completes the stop (and is
//! dropped with everything after it) or turns out not to (and is released).
//!
//! When several stop strings match, the one whose match *ends* first wins (ties: the longer
//! one), which is the stop a character-by-character stream would hit first. That makes the
//! outcome independent of how the text was split into pushes, so streamed and non-streamed
//! responses agree.

/// What a push produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// No stop yet; `emit` is safe to send (possibly empty while text is held back).
    Continue { emit: String },
    /// A stop string matched: `emit` is the text before it, `matched` the stop string. The stop
    /// string itself and anything after it are never emitted.
    Stopped { emit: String, matched: String },
}

/// Stop-string state for one generated sequence.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Received but not yet emitted: a suffix that is a proper prefix of some stop string.
    pending: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has matched; later pushes emit nothing.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds newly decoded text; returns what can be emitted now, or the stop.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome::Continue {
                emit: String::new(),
            };
        }
        self.pending.push_str(text);
        if let Some((start, stop)) = self.first_match() {
            let matched = self.stops[stop].clone();
            let mut emit = std::mem::take(&mut self.pending);
            emit.truncate(start);
            self.stopped = true;
            return StopOutcome::Stopped { emit, matched };
        }
        let keep = self.held_back_len();
        let rest = self.pending.split_off(self.pending.len() - keep);
        StopOutcome::Continue {
            emit: std::mem::replace(&mut self.pending, rest),
        }
    }

    /// End of generation: the held-back text (empty after a stop).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// `(byte offset, stop index)` of the match that ends first in `pending`, ties to the one
    /// starting first. Matches never span text already emitted: that text held no stop prefix.
    fn first_match(&self) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize, usize)> = None; // (end, start, stop)
        for (i, stop) in self.stops.iter().enumerate() {
            // The leftmost occurrence of a string is also the one that ends first.
            if let Some(start) = self.pending.find(stop.as_str()) {
                let end = start + stop.len();
                if best.is_none_or(|(e, s, _)| (end, start) < (e, s)) {
                    best = Some((end, start, i));
                }
            }
        }
        best.map(|(_, start, stop)| (start, stop))
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper prefix of some stop
    /// string; always a char boundary because the prefixes are cut at char boundaries.
    fn held_back_len(&self) -> usize {
        let mut keep = 0;
        for stop in &self.stops {
            let longest = (stop.len() - 1).min(self.pending.len());
            for len in (keep + 1..=longest).rev() {
                if stop.is_char_boundary(len) && self.pending.ends_with(&stop[..len]) {
                    keep = len;
                    break;
                }
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    fn cont(s: &str) -> StopOutcome {
        StopOutcome::Continue { emit: s.into() }
    }

    fn stopped(emit: &str, matched: &str) -> StopOutcome {
        StopOutcome::Stopped {
            emit: emit.into(),
            matched: matched.into(),
        }
    }

    #[test]
    fn stop_split_across_three_pushes() {
        let mut m = matcher(&["<END>"]);
        assert_eq!(m.push("Hello <E"), cont("Hello "));
        assert_eq!(m.push("N"), cont(""));
        assert_eq!(m.push("D> trailing"), stopped("", "<END>"));
        assert!(m.is_stopped());
        assert_eq!(m.push("more"), cont(""));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn a_stop_that_is_a_prefix_of_another() {
        let mut m = matcher(&["abc", "ab"]);
        assert_eq!(m.push("xa"), cont("x"));
        assert_eq!(m.push("bc"), stopped("", "ab"));
        // Same text in one push, same answer.
        assert_eq!(matcher(&["abc", "ab"]).push("xabc"), stopped("x", "ab"));
        // A match that ends first beats one that starts first.
        assert_eq!(matcher(&["abcd", "bc"]).push("abcd"), stopped("a", "bc"));
        // Same end: the longer one.
        assert_eq!(matcher(&["bc", "abc"]).push("abc"), stopped("", "abc"));
    }

    #[test]
    fn no_false_holdback_after_a_mismatch() {
        let mut m = matcher(&["abc"]);
        assert_eq!(m.push("ab"), cont(""));
        assert_eq!(m.push("x"), cont("abx"));
        assert_eq!(m.push("aab"), cont("a"));
        assert_eq!(m.push("d"), cont("abd"));
        assert_eq!(m.push("ab"), cont(""));
        assert_eq!(m.finish(), "ab");
    }

    #[test]
    fn unicode_boundaries() {
        let mut m = matcher(&["→", "é!"]);
        assert_eq!(m.push("café"), cont("caf"));
        assert_eq!(m.push("?"), cont("é?"));
        assert_eq!(m.push("a→b"), stopped("a", "→"));
        let mut m = matcher(&["🙂🙂"]);
        assert_eq!(m.push("x🙂"), cont("x"));
        assert_eq!(m.push("y"), cont("🙂y"));
    }

    #[test]
    fn empty_stops_are_ignored() {
        let mut m = StopMatcher::new(vec![String::new()]);
        assert_eq!(m.push("abc"), cont("abc"));
        assert_eq!(m.finish(), "");
    }

    /// Emitted text and the stop for `text` delivered in pieces of the given sizes (in chars).
    fn run(
        stops: &[&str],
        text: &str,
        sizes: &mut impl FnMut() -> usize,
    ) -> (String, Option<String>) {
        let mut m = matcher(stops);
        let chars: Vec<char> = text.chars().collect();
        let (mut out, mut i) = (String::new(), 0);
        while i < chars.len() {
            let n = sizes().clamp(1, chars.len() - i);
            let piece: String = chars[i..i + n].iter().collect();
            i += n;
            match m.push(&piece) {
                StopOutcome::Continue { emit } => out.push_str(&emit),
                StopOutcome::Stopped { emit, matched } => return (out + &emit, Some(matched)),
            }
        }
        (out + &m.finish(), None)
    }

    #[test]
    fn outcome_does_not_depend_on_chunking() {
        let stops = ["ab", "bab", "é<", "<<é"];
        let alphabet: Vec<char> = "ab<é ".chars().collect();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for _ in 0..500 {
            let len = 1 + next(12);
            let text: String = (0..len).map(|_| alphabet[next(alphabet.len())]).collect();
            let by_char = run(&stops, &text, &mut || 1);
            let chunked = run(&stops, &text, &mut || 1 + next(4));
            assert_eq!(by_char, chunked, "{text:?}");
            let whole = run(&stops, &text, &mut || usize::MAX);
            assert_eq!(by_char, whole, "{text:?}");
            if by_char.1.is_none() {
                assert_eq!(by_char.0, text);
            }
        }
    }
}
