//! Progress requests: how a job continues, rather than restarts, when it moves to another worker.
//!
//! What the client has received is known exactly in one place only: whoever reads the job's frames
//! (the front end, or a program that published the job itself). So that reader answers for it. A job
//! names the subject where it does (`progress_to`); every worker that starts the job asks there first
//! ([`ProgressRequest`], core NATS request/reply) and gets a [`Progress`]:
//!
//! - `attempt`: the number this run must put in its frames. The reader hands out a new one with each
//!   answer and from then on drops frames of earlier attempts, so an attempt that is still running
//!   somewhere (a worker presumed dead that was only slow) can never splice its frames into the
//!   answer.
//! - `next_seq` and, per choice, the `token_ids` of the frames passed on: the new worker prefills the
//!   prompt plus those ids, replays them through the sampler (penalties, the counter-based RNG's
//!   step), the grammar, the stop-string, reasoning and tool-call parsers without sending anything,
//!   then samples on and numbers its frames from `next_seq`.
//! - `done`: the reader already has the final frame (the worker died between it and its
//!   acknowledgement): nothing is run again.
//!
//! No answer because nobody subscribes (the client went away) means nobody waits for the job: the
//! worker drops it. A job without `progress_to` runs from the start on every attempt, as before.

use serde::{Deserialize, Serialize};

/// A worker asking where a job stands, before running it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRequest {
    pub job_id: String,
    /// The asking worker (for logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
}

/// The reader's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The attempt number the asking worker's frames must carry (1 for the first run).
    pub attempt: u32,
    /// The `seq` of the first frame the reader does not have yet.
    #[serde(default)]
    pub next_seq: u64,
    /// Per choice with frames passed on: the ids those frames carried, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<ChoiceProgress>,
    /// The reader has the job's final frame; do not run it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub done: bool,
}

/// What one choice's frames delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChoiceProgress {
    pub index: u32,
    pub token_ids: Vec<u32>,
    /// The choice's closing frame (its tool calls, or text held back as a possible call, sent after
    /// the generation ended; it carries no ids) was passed on: do not send it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closed: bool,
}

impl Progress {
    /// The delivered ids of choice `index` (empty when none).
    pub fn tokens(&self, index: u32) -> &[u32] {
        self.choices
            .iter()
            .find(|c| c.index == index)
            .map_or(&[][..], |c| &c.token_ids)
    }

    pub fn closed(&self, index: u32) -> bool {
        self.choices.iter().any(|c| c.index == index && c.closed)
    }

    /// Ids delivered over all choices.
    pub fn delivered(&self) -> usize {
        self.choices.iter().map(|c| c.token_ids.len()).sum()
    }
}
