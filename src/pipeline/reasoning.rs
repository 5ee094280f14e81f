//! The reasoning split: a model that thinks before it answers writes its thoughts between two special
//! tokens (Gemma 4: `<|channel>thought\n…<channel|>`; DeepSeek-R1/Qwen3 style: `<think>…</think>`).
//! The detokenizer skips special tokens, so without a split the thoughts and the answer would run
//! together in one text. [`ReasoningSplitter`] follows the generated ids of one sequence and routes
//! each detokenized piece to the reasoning or to the answer (content), the way vLLM's reasoning
//! parsers fill `reasoning_content`; [`ChannelQueue`] remembers which channel each byte came from
//! while a later stage (stop-string matching) holds text back, so what that stage releases can be
//! split again.
//!
//! Rules, all at the token level (nothing here knows a model):
//! - A sequence starts in the reasoning channel when the prompt's last marker is an unclosed `start`
//!   (templates that open the thinking block in the generation prompt); else in content.
//! - `start` enters reasoning, `end` leaves it; the marker ids themselves add no text (they must be
//!   special tokens the detokenizer skips). Text released at a marker id (held-back bytes) belongs
//!   to the channel before the marker. A `start` inside reasoning and an `end` outside it change
//!   nothing.
//! - The `label` (Gemma 4: `thought\n`) is stripped from the start of each reasoning block, also when
//!   it arrives split over several pieces: text is buffered while what arrived is a prefix of the
//!   label, and released unchanged once it diverges (vLLM's `Gemma4ReasoningParser` does the same).
//!   A block that the prompt opened *and continued* (ids after its `start`) is taken to carry its
//!   label in the prompt already: nothing is stripped there.
//! - Content is passed on exactly as detokenized: whatever follows `end`, leading whitespace included
//!   (vLLM's streaming output; its non-streaming parser also trims nothing after the marker).
//! - Reasoning tokens are the ids from the `start` marker to the `end` marker, both included (for a
//!   block the prompt opened: from the first generated id); a block cut off by the end of generation
//!   counts up to its last id.

use std::collections::VecDeque;

/// The special ids that open and close a model's reasoning block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReasoningMarkers {
    /// Opens a reasoning block (Gemma 4: `<|channel>`).
    pub start: u32,
    /// Closes it (Gemma 4: `<channel|>`).
    pub end: u32,
    /// Text stripped from the start of each block's reasoning (Gemma 4: `thought\n`); may be empty.
    pub label: String,
}

impl ReasoningMarkers {
    /// Whether `id` is one of the two markers.
    pub fn is_marker(&self, id: u32) -> bool {
        id == self.start || id == self.end
    }

    /// Whether a sequence after `prompt` starts inside a reasoning block: the prompt's last marker is
    /// `start`.
    pub fn opened_by(&self, prompt: &[u32]) -> bool {
        prompt.iter().rev().find(|&&id| self.is_marker(id)) == Some(&self.start)
    }
}

/// Where a piece of generated text goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The model's thoughts (`reasoning_content`).
    Reasoning,
    /// The answer (`content`).
    Content,
}

/// Text split by channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routed {
    pub reasoning: String,
    pub content: String,
}

/// The split state of one generated sequence (one choice).
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    markers: ReasoningMarkers,
    in_reasoning: bool,
    /// Reasoning text of the current block while it may still be the label (`None`: decided).
    label_buf: Option<String>,
    reasoning_tokens: usize,
}

impl ReasoningSplitter {
    /// The state after `prompt` (its ids decide the starting channel).
    pub fn new(markers: ReasoningMarkers, prompt: &[u32]) -> Self {
        let in_reasoning = markers.opened_by(prompt);
        // A block the prompt opened with `start` as its last id still expects its label.
        let label_pending = in_reasoning && prompt.last() == Some(&markers.start);
        let mut s = Self {
            markers,
            in_reasoning,
            label_buf: None,
            reasoning_tokens: 0,
        };
        if label_pending {
            s.open_label();
        }
        s
    }

    /// Whether `id` is a marker (the caller releases held-back text before feeding it).
    pub fn is_marker(&self, id: u32) -> bool {
        self.markers.is_marker(id)
    }

    /// Whether the sequence is inside a reasoning block now.
    pub fn in_reasoning(&self) -> bool {
        self.in_reasoning
    }

    /// Generated ids counted as reasoning so far (see the module notes).
    pub fn reasoning_tokens(&self) -> usize {
        self.reasoning_tokens
    }

    /// Feeds generated id `id` and the text the detokenizer released with it; returns where that
    /// text goes (reasoning text minus the label; empty while the label is undecided).
    pub fn push(&mut self, id: u32, text: &str) -> (Channel, String) {
        if self.in_reasoning {
            self.reasoning_tokens += 1;
            let mut out = self.reasoning_text(text);
            if id == self.markers.end {
                out.push_str(&self.release_label());
                self.in_reasoning = false;
            }
            (Channel::Reasoning, out)
        } else {
            if id == self.markers.start {
                self.reasoning_tokens += 1;
                self.in_reasoning = true;
                self.open_label();
            }
            (Channel::Content, text.to_owned())
        }
    }

    /// Routes text that comes with no new id (the detokenizer's flush at the end).
    pub fn text(&mut self, text: &str) -> (Channel, String) {
        if self.in_reasoning {
            (Channel::Reasoning, self.reasoning_text(text))
        } else {
            (Channel::Content, text.to_owned())
        }
    }

    /// End of generation: the reasoning still buffered as a possible label (a block cut off inside
    /// it), else empty.
    pub fn finish(&mut self) -> (Channel, String) {
        (Channel::Reasoning, self.release_label())
    }

    fn open_label(&mut self) {
        self.label_buf = (!self.markers.label.is_empty()).then(String::new);
    }

    fn release_label(&mut self) -> String {
        self.label_buf.take().unwrap_or_default()
    }

    /// Reasoning text with the label stripped from the block's start.
    fn reasoning_text(&mut self, text: &str) -> String {
        let Some(buf) = &mut self.label_buf else {
            return text.to_owned();
        };
        buf.push_str(text);
        let label = self.markers.label.as_str();
        if label.starts_with(buf.as_str()) {
            if buf.len() == label.len() {
                self.label_buf = None;
            }
            return String::new();
        }
        let buf = self.label_buf.take().unwrap_or_default();
        match buf.strip_prefix(self.markers.label.as_str()) {
            Some(rest) => rest.to_owned(),
            None => buf, // diverged: it was never the label
        }
    }
}

/// Which channel each byte of text held by a later stage came from: text goes in tagged, comes out
/// as the same bytes in the same order, split back into reasoning and content.
#[derive(Debug, Clone, Default)]
pub struct ChannelQueue {
    /// Channel and length in bytes of each stretch not yet taken, oldest first.
    spans: VecDeque<(Channel, usize)>,
}

impl ChannelQueue {
    /// Records `text` as coming from `channel`; returns it, for the next stage.
    pub fn push(&mut self, (channel, text): (Channel, String)) -> String {
        if !text.is_empty() {
            match self.spans.back_mut() {
                Some((c, n)) if *c == channel => *n += text.len(),
                _ => self.spans.push_back((channel, text.len())),
            }
        }
        text
    }

    /// Splits `text`, the next bytes the later stage released (a prefix of what was pushed and not
    /// yet taken), by the channels they came from. Bytes past the recorded ones count as content.
    pub fn take(&mut self, text: &str) -> Routed {
        let mut out = Routed::default();
        let mut rest = text;
        while !rest.is_empty() {
            let Some((channel, len)) = self.spans.front_mut() else {
                out.content.push_str(rest);
                break;
            };
            let n = (*len).min(rest.len());
            let (head, tail) = rest.split_at(n);
            match channel {
                Channel::Reasoning => out.reasoning.push_str(head),
                Channel::Content => out.content.push_str(head),
            }
            *len -= n;
            if *len == 0 {
                self.spans.pop_front();
            }
            rest = tail;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: u32 = 100;
    const END: u32 = 101;
    const TEXT: u32 = 7;

    fn markers(label: &str) -> ReasoningMarkers {
        ReasoningMarkers {
            start: START,
            end: END,
            label: label.into(),
        }
    }

    /// Feeds (id, text) pairs, then finishes; returns (reasoning, content, reasoning tokens).
    fn run(label: &str, prompt: &[u32], steps: &[(u32, &str)]) -> (String, String, usize) {
        let mut s = ReasoningSplitter::new(markers(label), prompt);
        let mut out = Routed::default();
        let mut add = |(c, t): (Channel, String)| match c {
            Channel::Reasoning => out.reasoning.push_str(&t),
            Channel::Content => out.content.push_str(&t),
        };
        for &(id, text) in steps {
            add(s.push(id, text));
        }
        add(s.finish());
        (out.reasoning, out.content, s.reasoning_tokens())
    }

    #[test]
    fn thoughts_then_answer() {
        let (r, c, n) = run(
            "thought\n",
            &[1, 2],
            &[
                (START, ""),
                (TEXT, "thought\n"),
                (TEXT, "Let me see."),
                (END, ""),
                (TEXT, " The answer"),
                (TEXT, " is 4."),
            ],
        );
        assert_eq!(r, "Let me see.");
        // Content keeps its leading whitespace as generated.
        assert_eq!(c, " The answer is 4.");
        assert_eq!(n, 4, "start, two text ids, end");
    }

    #[test]
    fn the_label_is_stripped_when_split_over_pieces() {
        let steps = [
            (START, ""),
            (TEXT, "tho"),
            (TEXT, "ught"),
            (TEXT, "\nHm"),
            (TEXT, "m."),
            (END, ""),
            (TEXT, "Yes"),
        ];
        assert_eq!(
            run("thought\n", &[], &steps),
            ("Hmm.".into(), "Yes".into(), 6)
        );
        // The whole label and more in one piece.
        let steps = [
            (START, ""),
            (TEXT, "thought\nHmm."),
            (END, ""),
            (TEXT, "Yes"),
        ];
        assert_eq!(run("thought\n", &[], &steps).0, "Hmm.");
        // Exactly the label, then the reasoning.
        let steps = [(START, ""), (TEXT, "thought\n"), (TEXT, "Hmm."), (END, "")];
        assert_eq!(run("thought\n", &[], &steps).0, "Hmm.");
    }

    #[test]
    fn a_diverging_label_is_released_unchanged() {
        let steps = [
            (START, ""),
            (TEXT, "tho"),
            (TEXT, "se"),
            (END, ""),
            (TEXT, "x"),
        ];
        assert_eq!(run("thought\n", &[], &steps).0, "those");
        // A block that ends inside the label keeps what it had.
        let steps = [(START, ""), (TEXT, "thought"), (END, ""), (TEXT, "x")];
        assert_eq!(
            run("thought\n", &[], &steps),
            ("thought".into(), "x".into(), 3)
        );
        // No label: nothing is buffered.
        let steps = [(START, ""), (TEXT, "thought\n")];
        assert_eq!(run("", &[], &steps).0, "thought\n");
    }

    #[test]
    fn text_released_at_a_marker_belongs_before_it() {
        // Held-back bytes come out with the marker id: they end the channel the marker leaves.
        let steps = [
            (TEXT, "Hi "),
            (START, "🙂"),
            (TEXT, "thought\nhmm"),
            (END, "✓"),
            (TEXT, "ok"),
        ];
        assert_eq!(
            run("thought\n", &[], &steps),
            ("hmm✓".into(), "Hi 🙂ok".into(), 3)
        );
    }

    #[test]
    fn generation_ending_inside_reasoning_leaves_no_content() {
        let steps = [(START, ""), (TEXT, "thought\n"), (TEXT, "still thinking")];
        assert_eq!(
            run("thought\n", &[], &steps),
            ("still thinking".into(), String::new(), 3)
        );
        // Cut off while the label was still possible: the buffered text is reasoning.
        let steps = [(START, ""), (TEXT, "thou")];
        assert_eq!(run("thought\n", &[], &steps).0, "thou");
    }

    #[test]
    fn the_prompt_decides_the_starting_channel() {
        // The prompt opened a block (its last marker is start): generation starts in reasoning,
        // and the label is expected when start is the prompt's last id.
        let steps = [(TEXT, "thought\nplan"), (END, ""), (TEXT, "answer")];
        assert_eq!(
            run("thought\n", &[1, END, START], &steps),
            ("plan".into(), "answer".into(), 2)
        );
        // Opened and continued in the prompt: the label was there; nothing is stripped.
        let steps = [(TEXT, "thought\nplan"), (END, "")];
        assert_eq!(
            run("thought\n", &[1, START, TEXT], &steps).0,
            "thought\nplan"
        );
        // A closed block (thinking off: the template writes an empty one) or none: content.
        let steps = [(TEXT, "answer")];
        for prompt in [&[1, START, TEXT, END][..], &[1, 2][..], &[][..]] {
            assert_eq!(
                run("thought\n", prompt, &steps),
                (String::new(), "answer".into(), 0)
            );
        }
        let m = markers("");
        assert!(m.opened_by(&[START]));
        assert!(!m.opened_by(&[START, END, TEXT]));
    }

    #[test]
    fn stray_markers_change_nothing() {
        let steps = [
            (END, ""),
            (TEXT, "a"),
            (START, ""),
            (START, ""),
            (TEXT, "b"),
            (END, ""),
            (TEXT, "c"),
        ];
        assert_eq!(run("", &[], &steps), ("b".into(), "ac".into(), 4));
    }

    #[test]
    fn choices_split_independently() {
        // Two choices from one prompt: each has its own state.
        let prompt = [1, START];
        let mut a = ReasoningSplitter::new(markers("thought\n"), &prompt);
        let mut b = a.clone();
        assert_eq!(a.push(TEXT, "thought\n"), (Channel::Reasoning, "".into()));
        assert_eq!(a.push(END, ""), (Channel::Reasoning, "".into()));
        assert_eq!(b.push(TEXT, "tho"), (Channel::Reasoning, "".into()));
        assert_eq!(a.push(TEXT, "A"), (Channel::Content, "A".into()));
        assert_eq!(
            b.push(TEXT, "rough"),
            (Channel::Reasoning, "thorough".into())
        );
        assert!(!a.in_reasoning() && b.in_reasoning());
        assert_eq!((a.reasoning_tokens(), b.reasoning_tokens()), (2, 2));
    }

    #[test]
    fn the_queue_splits_released_text_by_channel() {
        let mut q = ChannelQueue::default();
        let mut all = String::new();
        for piece in [
            (Channel::Reasoning, "think"),
            (Channel::Reasoning, "ing"),
            (Channel::Content, ""),
            (Channel::Content, "é!"),
        ] {
            all.push_str(&q.push((piece.0, piece.1.to_owned())));
        }
        assert_eq!(all, "thinkingé!");
        // Released in pieces that cut across the channels.
        let r = q.take("thin");
        assert_eq!((r.reasoning.as_str(), r.content.as_str()), ("thin", ""));
        let r = q.take("kingé");
        assert_eq!((r.reasoning.as_str(), r.content.as_str()), ("king", "é"));
        let r = q.take("!");
        assert_eq!((r.reasoning.as_str(), r.content.as_str()), ("", "!"));
        assert_eq!(q.take(""), Routed::default());
    }
}
