//! What a sequence's next decoder run feeds during its prompt: the prefill policy of the owner thread.
//!
//! A prompt runs in chunks of at most `chunk` positions, each its own owner-thread step, so the
//! other sequences' decode steps run between them (the thread advances its tasks round-robin, one
//! step each). Chunks are balanced — 1 100 positions with a chunk of 512 run as 367 + 367 + 366 —
//! so no step is left with a sliver. Decoders whose numbers depend on how a run is split (dynamic
//! activation quantization) take the prompt in one piece unless inexact splitting is allowed.

/// How prompts are split into prefill steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillPolicy {
    /// Most prompt positions one step feeds (≥ 1).
    pub chunk: usize,
    /// Split (and reuse prefixes) even where the decoder's arithmetic is not split-invariant.
    pub allow_inexact: bool,
}

impl PrefillPolicy {
    pub fn new(chunk: usize, allow_inexact: bool) -> Self {
        Self {
            chunk: chunk.max(1),
            allow_inexact,
        }
    }

    /// Whether prompts may be split and prefixes reused on a decoder (`exact`: split-invariant).
    pub fn splits(&self, exact: bool) -> bool {
        self.allow_inexact || exact
    }

    /// Positions the next prefill step feeds, out of `rest` still to feed.
    pub fn next_chunk(&self, rest: usize, exact: bool) -> usize {
        if !self.splits(exact) || rest == 0 {
            return rest;
        }
        let steps = rest.div_ceil(self.chunk);
        rest.div_ceil(steps)
    }
}

#[cfg(test)]
mod tests {
    use super::PrefillPolicy;

    /// The chunk sizes a whole prompt of `n` positions runs in.
    fn plan(p: PrefillPolicy, n: usize, exact: bool) -> Vec<usize> {
        let mut rest = n;
        let mut out = Vec::new();
        while rest > 0 {
            let c = p.next_chunk(rest, exact);
            out.push(c);
            rest -= c;
        }
        out
    }

    #[test]
    fn chunks_are_balanced_and_bounded() {
        let p = PrefillPolicy::new(512, false);
        assert_eq!(plan(p, 1100, true), vec![367, 367, 366]);
        assert_eq!(plan(p, 512, true), vec![512]);
        assert_eq!(plan(p, 513, true), vec![257, 256]);
        assert_eq!(plan(p, 1, true), vec![1]);
        assert_eq!(plan(PrefillPolicy::new(0, false), 3, true), vec![1, 1, 1]);
        for n in 1..2000 {
            let c = plan(PrefillPolicy::new(64, false), n, true);
            assert_eq!(c.iter().sum::<usize>(), n);
            assert!(c.iter().all(|&x| x <= 64));
            assert!(c.iter().max().unwrap() - c.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn inexact_decoders_take_the_prompt_whole_unless_allowed() {
        assert_eq!(plan(PrefillPolicy::new(8, false), 20, false), vec![20]);
        assert_eq!(plan(PrefillPolicy::new(8, true), 20, false), vec![7, 7, 6]);
        assert!(!PrefillPolicy::new(8, false).splits(false));
    }
}
