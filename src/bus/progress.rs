//! The reader's side of progress requests ([`crate::protocol::Progress`]): it follows the frames it
//! passes on and answers workers from them. Both buses put every job's frame stream through one.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::protocol::{ChoiceProgress, Frame, FrameBody, Progress};

/// What a job's reader has passed on, and which attempt may send.
#[derive(Debug, Default)]
pub struct Tracker {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The attempt number handed out last (0: none yet).
    granted: u32,
    /// The highest attempt seen in a frame.
    seen: u32,
    next_seq: u64,
    choices: BTreeMap<u32, ChoiceProgress>,
    done: bool,
}

impl Tracker {
    /// Whether `frame` goes on to the reader: not when an attempt handed out later exists (the
    /// sender was superseded) or its `seq` was already passed on (a restarted attempt of a job
    /// without progress requests); a frame past a gap goes on, for the reader to report the gap.
    pub fn admit(&self, frame: &Frame) -> bool {
        let mut s = self.state.lock().expect("tracker lock");
        if frame.attempt < s.granted {
            return false;
        }
        s.seen = s.seen.max(frame.attempt);
        if frame.seq < s.next_seq {
            return false;
        }
        if frame.seq > s.next_seq {
            return true;
        }
        s.next_seq += 1;
        match &frame.body {
            FrameBody::Delta {
                token_ids, index, ..
            } => {
                let c = s.choices.entry(*index).or_insert_with(|| ChoiceProgress {
                    index: *index,
                    ..ChoiceProgress::default()
                });
                if token_ids.is_empty() {
                    // Generation frames always carry ids; a frame without is a choice's closing one.
                    c.closed = true;
                } else {
                    c.token_ids.extend_from_slice(token_ids);
                }
            }
            FrameBody::Done(_) | FrameBody::Error { .. } => s.done = true,
        }
        true
    }

    /// Answers a progress request: hands out the next attempt number (frames of earlier ones are
    /// dropped from now on) with what was passed on so far.
    pub fn grant(&self) -> Progress {
        let mut s = self.state.lock().expect("tracker lock");
        s.granted = s.granted.max(s.seen) + 1;
        Progress {
            attempt: s.granted,
            next_seq: s.next_seq,
            choices: s.choices.values().cloned().collect(),
            done: s.done,
        }
    }

    /// The `seq` the next frame passed on must have.
    pub fn next_seq(&self) -> u64 {
        self.state.lock().expect("tracker lock").next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(seq: u64, attempt: u32, index: u32, ids: &[u32]) -> Frame {
        Frame {
            job_id: "j".into(),
            seq,
            attempt,
            body: FrameBody::Delta {
                text: String::new(),
                reasoning: String::new(),
                token_ids: ids.to_vec(),
                index,
                logprobs: vec![],
                tool_calls: vec![],
            },
        }
    }

    #[test]
    fn grants_fence_earlier_attempts_and_report_what_passed() {
        let t = Tracker::default();
        let first = t.grant();
        assert_eq!((first.attempt, first.next_seq), (1, 0));
        assert!(t.admit(&delta(0, 1, 0, &[5, 6])));
        assert!(t.admit(&delta(1, 1, 1, &[7])));
        assert!(!t.admit(&delta(1, 1, 1, &[7])), "a repeated seq");
        let second = t.grant();
        assert_eq!(second.attempt, 2);
        assert_eq!(second.next_seq, 2);
        assert_eq!(second.tokens(0), &[5, 6]);
        assert_eq!(second.tokens(1), &[7]);
        assert!(!t.admit(&delta(2, 1, 0, &[8])), "the superseded attempt");
        assert!(t.admit(&delta(2, 2, 0, &[9])));
        assert!(t.admit(&delta(3, 2, 0, &[])));
        let third = t.grant();
        assert_eq!(third.tokens(0), &[5, 6, 9]);
        assert!(third.closed(0) && !third.closed(1));
        assert!(!third.done);
        assert!(
            t.admit(&delta(9, 3, 0, &[1])),
            "a gap goes on to be reported"
        );
    }

    #[test]
    fn frames_without_grants_keep_the_old_rules() {
        let t = Tracker::default();
        assert!(t.admit(&delta(0, 1, 0, &[1])));
        assert!(!t.admit(&delta(0, 2, 0, &[1])), "a regenerated seq");
        assert!(t.admit(&delta(1, 2, 0, &[2])));
        assert_eq!(t.grant().attempt, 3);
    }
}
