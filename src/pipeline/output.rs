//! One generated sequence's text path, id by id: incremental detokenization ([`super::detok`]), the
//! reasoning split when the model declares markers ([`super::reasoning`]), then stop strings
//! ([`super::stop`]); out come answer and reasoning text ready to send.
//!
//! Stop strings match all generated text in order, reasoning and answer alike: the text a client
//! receives as `reasoning_content` and `content` together (without a split, exactly the text as
//! detokenized; with one, less the label the split strips). The split runs first, so the stop
//! matcher holds back text of either channel; a [`ChannelQueue`] tells which channel each byte it
//! releases came from. At a marker the detokenizer releases its held-back bytes
//! ([`IncrementalDecoder::settle`]), so no character of one channel comes out with the other.

use tokenizers::Tokenizer;

use super::detok::{DetokError, IncrementalDecoder};
use super::reasoning::{Channel, ChannelQueue, ReasoningMarkers, ReasoningSplitter, Routed};
use super::stop::{StopMatcher, StopOutcome};

/// What a step released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputStep {
    /// Text safe to send now (possibly empty while text is held back).
    Continue(Routed),
    /// A stop string matched: the text before it; the sequence is over.
    Stopped(Routed),
}

/// The text state of one sequence (one choice).
#[derive(Debug, Clone)]
pub struct OutputText {
    detok: IncrementalDecoder,
    /// Special ids written as their own text instead of skipped.
    kept: Vec<u32>,
    split: Option<ReasoningSplitter>,
    channels: ChannelQueue,
    stop: StopMatcher,
    /// The stop string that ended the sequence, once one has.
    matched: Option<String>,
}

impl OutputText {
    /// For a sequence after `prompt` (whose ids decide whether it starts inside a reasoning block),
    /// stopping at `stops`, split at `reasoning`'s markers when given. Special tokens are skipped.
    pub fn new(stops: Vec<String>, reasoning: Option<ReasoningMarkers>, prompt: &[u32]) -> Self {
        Self {
            detok: IncrementalDecoder::new(true),
            kept: Vec::new(),
            split: reasoning.map(|m| ReasoningSplitter::new(m, prompt)),
            channels: ChannelQueue::default(),
            stop: StopMatcher::new(stops),
            matched: None,
        }
    }

    /// Writes the special ids `kept` as their token text (e.g. a template's tool-call markers, for the
    /// call parser) instead of skipping them.
    pub fn keeping(mut self, kept: Vec<u32>) -> Self {
        self.kept = kept;
        self
    }

    /// Generated ids counted as reasoning so far (0 without a split).
    pub fn reasoning_tokens(&self) -> usize {
        self.split
            .as_ref()
            .map_or(0, ReasoningSplitter::reasoning_tokens)
    }

    /// Adds generated id `id` (not an end-of-sequence id: those end the sequence unseen).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<OutputStep, DetokError> {
        let mut piece = self.detok.push(tokenizer, id)?;
        if self.kept.contains(&id) {
            // The detokenizer skipped it: release what it holds back, then the token's own text.
            piece.push_str(&self.detok.settle(tokenizer)?);
            piece.push_str(&tokenizer.id_to_token(id).unwrap_or_default());
        }
        let routed = match &mut self.split {
            Some(split) => {
                if split.is_marker(id) {
                    // Held-back bytes end the channel the marker closes.
                    piece.push_str(&self.detok.settle(tokenizer)?);
                }
                split.push(id, &piece)
            }
            None => (Channel::Content, piece),
        };
        let text = self.channels.push(routed);
        Ok(self.stop_step(&text))
    }

    /// End of the sequence (end id, `max_tokens`, a finished grammar): what is still held back.
    /// `Stopped` when a stop string completes in it. Not needed after `Stopped`.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<OutputStep, DetokError> {
        let rest = self.detok.flush(tokenizer)?;
        let text = match &mut self.split {
            Some(split) => {
                let mut text = self.channels.push(split.text(&rest));
                text.push_str(&self.channels.push(split.finish()));
                text
            }
            None => self.channels.push((Channel::Content, rest)),
        };
        Ok(match self.stop_step(&text) {
            OutputStep::Continue(mut routed) => {
                let held = self.stop.finish();
                let more = self.channels.take(&held);
                routed.content.push_str(&more.content);
                routed.reasoning.push_str(&more.reasoning);
                OutputStep::Continue(routed)
            }
            stopped => stopped,
        })
    }

    fn stop_step(&mut self, text: &str) -> OutputStep {
        match self.stop.push(text) {
            StopOutcome::Continue { emit } => OutputStep::Continue(self.channels.take(&emit)),
            StopOutcome::Stopped { emit, matched } => {
                self.matched = Some(matched);
                OutputStep::Stopped(self.channels.take(&emit))
            }
        }
    }

    /// The stop string that ended the sequence (`None`: it has not stopped at one).
    pub fn matched_stop(&self) -> Option<&str> {
        self.matched.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-gemma3n/tokenizer.json"
    );
    /// Stand-in markers: the fixture's `<start_of_turn>` and `<end_of_turn>` (special tokens).
    const START: u32 = 105;
    const END: u32 = 106;

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_file(FIXTURE).expect("fixture tokenizer loads")
    }

    fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, false).unwrap().get_ids().to_vec()
    }

    fn markers(label: &str) -> Option<ReasoningMarkers> {
        Some(ReasoningMarkers {
            start: START,
            end: END,
            label: label.into(),
        })
    }

    /// Feeds `generated` id by id, then finishes (unless stopped); returns everything released as
    /// (reasoning, content, stopped), plus each step's release.
    fn run(
        out: &mut OutputText,
        tok: &Tokenizer,
        generated: &[u32],
    ) -> (String, String, bool, Vec<Routed>) {
        let mut steps = Vec::new();
        let mut stopped = false;
        for &id in generated {
            match out.push(tok, id).unwrap() {
                OutputStep::Continue(r) => steps.push(r),
                OutputStep::Stopped(r) => {
                    steps.push(r);
                    stopped = true;
                    break;
                }
            }
        }
        if !stopped {
            match out.finish(tok).unwrap() {
                OutputStep::Continue(r) => steps.push(r),
                OutputStep::Stopped(r) => {
                    steps.push(r);
                    stopped = true;
                }
            }
        }
        let reasoning = steps.iter().map(|r| r.reasoning.as_str()).collect();
        let content = steps.iter().map(|r| r.content.as_str()).collect();
        (reasoning, content, stopped, steps)
    }

    /// `thought\n` + reasoning between the markers, then the answer.
    fn thinking(tok: &Tokenizer, reasoning: &str, answer: &str) -> Vec<u32> {
        [
            &[START][..],
            &ids(tok, "thought\n"),
            &ids(tok, reasoning),
            &[END],
            &ids(tok, answer),
        ]
        .concat()
    }

    #[test]
    fn reasoning_and_answer_come_apart() {
        let tok = tokenizer();
        let generated = thinking(&tok, "I think so", " Yes it is");
        let mut out = OutputText::new(vec![], markers("thought\n"), &[2]);
        let (r, c, stopped, steps) = run(&mut out, &tok, &generated);
        assert_eq!(
            (r.as_str(), c.as_str(), stopped),
            ("I think so", " Yes it is", false)
        );
        // Streamed: no step mixes the two, and the markers add no text.
        assert!(steps
            .iter()
            .all(|s| s.reasoning.is_empty() || s.content.is_empty()));
        let n_reasoning = 1 + ids(&tok, "thought\n").len() + ids(&tok, "I think so").len() + 1;
        assert_eq!(out.reasoning_tokens(), n_reasoning);
        // Without markers the same ids are one text, as the detokenizer gives it.
        let mut plain = OutputText::new(vec![], None, &[2]);
        let (r, c, _, _) = run(&mut plain, &tok, &generated);
        assert_eq!(r, "");
        assert_eq!(c, tok.decode(&generated, true).unwrap());
        assert_eq!(plain.reasoning_tokens(), 0);
    }

    #[test]
    fn a_byte_run_before_a_marker_stays_in_its_channel() {
        let tok = tokenizer();
        // Reasoning ending in "✓" spelled as byte pieces: the detokenizer would hold it until the
        // next text id, which is already the answer.
        let byte = |b: u8| 109 + u32::from(b);
        let mut generated = vec![START];
        generated.extend(ids(&tok, "ok"));
        generated.extend("✓".bytes().map(byte));
        generated.push(END);
        generated.extend(ids(&tok, "done"));
        let mut out = OutputText::new(vec![], markers(""), &[]);
        let (r, c, _, _) = run(&mut out, &tok, &generated);
        assert_eq!((r.as_str(), c.as_str()), ("ok✓", "done"));
    }

    #[test]
    fn stop_strings_see_reasoning_and_answer() {
        let tok = tokenizer();
        let generated = thinking(&tok, "one two three", "four five");
        // A stop in the reasoning ends the sequence there: no answer.
        let mut out = OutputText::new(vec!["two".into()], markers("thought\n"), &[]);
        let (r, c, stopped, _) = run(&mut out, &tok, &generated);
        assert_eq!((r.as_str(), c.as_str(), stopped), ("one ", "", true));
        // A stop spanning the end of reasoning and the start of the answer matches the text the
        // client gets, in order; what came before it is released to its own channel.
        let mut out = OutputText::new(vec!["threefour".into()], markers("thought\n"), &[]);
        let (r, c, stopped, _) = run(&mut out, &tok, &generated);
        assert_eq!((r.as_str(), c.as_str(), stopped), ("one two ", "", true));
        // A stop in the answer.
        let mut out = OutputText::new(vec!["five".into()], markers("thought\n"), &[]);
        assert_eq!(out.matched_stop(), None);
        let (r, c, stopped, _) = run(&mut out, &tok, &generated);
        assert_eq!(out.matched_stop(), Some("five"));
        assert_eq!(
            (r.as_str(), c.as_str(), stopped),
            ("one two three", "four ", true)
        );
        // Held-back text of both channels comes out apart.
        let mut out = OutputText::new(vec!["threex".into()], markers("thought\n"), &[]);
        let (r, c, stopped, _) = run(&mut out, &tok, &generated);
        assert_eq!(
            (r.as_str(), c.as_str(), stopped),
            ("one two three", "four five", false)
        );
    }

    #[test]
    fn ending_inside_reasoning_and_starting_there() {
        let tok = tokenizer();
        // max_tokens inside the block: reasoning only.
        let generated = [&[START][..], &ids(&tok, "thought\nstill going")].concat();
        let mut out = OutputText::new(vec![], markers("thought\n"), &[]);
        let (r, c, _, _) = run(&mut out, &tok, &generated);
        assert_eq!((r.as_str(), c.as_str()), ("still going", ""));
        assert_eq!(out.reasoning_tokens(), generated.len());
        // The prompt opened the block: the first generated text is reasoning.
        let generated = [&ids(&tok, "plan")[..], &[END], &ids(&tok, "go")].concat();
        let mut out = OutputText::new(vec![], markers("thought\n"), &[2, START]);
        let (r, c, _, _) = run(&mut out, &tok, &generated);
        assert_eq!((r.as_str(), c.as_str()), ("plan", "go"));
        assert_eq!(
            out.reasoning_tokens(),
            generated.len() - ids(&tok, "go").len()
        );
    }

    #[test]
    fn choices_keep_their_own_state() {
        let tok = tokenizer();
        let a_ids = thinking(&tok, "alpha", "A");
        let b_ids = [&ids(&tok, "B")[..], &[START], &ids(&tok, "thought\nbeta")].concat();
        let mut a = OutputText::new(vec![], markers("thought\n"), &[2]);
        let mut b = a.clone();
        // Interleaved, as the decode batch feeds them.
        let (mut ra, mut rb) = (Routed::default(), Routed::default());
        for k in 0..a_ids.len().max(b_ids.len()) {
            for (out, ids, acc) in [(&mut a, &a_ids, &mut ra), (&mut b, &b_ids, &mut rb)] {
                if let Some(&id) = ids.get(k) {
                    let OutputStep::Continue(r) = out.push(&tok, id).unwrap() else {
                        panic!("no stop strings")
                    };
                    acc.reasoning += &r.reasoning;
                    acc.content += &r.content;
                }
            }
        }
        for (out, acc) in [(&mut a, &mut ra), (&mut b, &mut rb)] {
            let OutputStep::Continue(r) = out.finish(&tok).unwrap() else {
                panic!("no stop strings")
            };
            acc.reasoning += &r.reasoning;
            acc.content += &r.content;
        }
        assert_eq!((ra.reasoning.as_str(), ra.content.as_str()), ("alpha", "A"));
        assert_eq!((rb.reasoning.as_str(), rb.content.as_str()), ("beta", "B"));
    }
}
