//! Next-token selection from the last position's logits: repetition penalty (transformers),
//! presence/frequency penalties (OpenAI), then either greedy argmax or seeded sampling with
//! temperature, top-k, top-p and min-p applied in transformers' order. The randomness is in-house
//! and counter-based (`rng`): token `k` of a sequence draws `uniform(seed, k)`, so a seed reproduces
//! the same tokens on every platform and release, and a sequence continued elsewhere after `k`
//! tokens ([`Sampler::record`]) samples on exactly as it would have; nothing here depends on hash
//! or thread order.
//!
//! This runs once per generated token over a 262,400-entry vocabulary, so the vocabulary is
//! never sorted as a whole (see `candidates`): top-k keeps a heap of the best k, and otherwise
//! candidates are sorted lazily in probability bands, only as far as top-p, min-p or the draw
//! actually look. The result is the same as sorting everything.

use std::collections::{HashMap, HashSet};

mod candidates;
mod rng;

use candidates::{Cand, Draw};

/// How the next token is chosen. Out-of-range values degrade to "off" instead of failing:
/// `temperature <= 0` (or NaN) is greedy, `top_p >= 1` and `min_p <= 0` disable those filters,
/// a non-positive or non-finite `repetition_penalty` counts as 1.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 0 = off.
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    /// OpenAI's defaults: plain sampling at temperature 1, no filters, no penalties.
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// Chooses next tokens for one sequence and remembers what it chose, for the penalties.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    /// Tokens chosen (or recorded) so far: the next draw's counter.
    step: u64,
    /// Distinct prompt and generated ids: the repetition penalty's domain.
    seen: HashSet<u32>,
    /// Generated ids only: the presence/frequency penalties' domain.
    counts: HashMap<u32, u32>,
    /// Reused across calls so the candidate buffer is not reallocated per token.
    cands: Vec<Cand>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt_ids: &[u32]) -> Self {
        Sampler {
            step: 0,
            params,
            seen: prompt_ids.iter().copied().collect(),
            counts: HashMap::new(),
            cands: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// `logits`: the last position's logits (vocab-sized); they are modified by the penalties.
    /// Applies penalties, then greedy (temperature 0) or sampling, and records the result.
    /// Empty or all-NaN logits yield id 0 rather than a panic.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let t = self.params.temperature;
        let id = if t > 0.0 {
            self.draw(logits, 1.0 / f64::from(t))
        } else {
            greedy(logits)
        };
        self.record(id);
        id
    }

    /// Counts `id` as chosen without sampling it: a continued sequence replays the tokens it
    /// already has, so its penalties and its next draw are those of an uninterrupted run.
    pub fn record(&mut self, id: u32) {
        self.seen.insert(id);
        *self.counts.entry(id).or_insert(0) += 1;
        self.step += 1;
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let rp = self.params.repetition_penalty;
        if rp.is_finite() && rp > 0.0 && rp != 1.0 {
            for &id in &self.seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for (&id, &n) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= presence + frequency * n as f32;
                }
            }
        }
    }

    /// Temperature (`inv_t` = 1 / temperature), top-k, top-p, min-p, then one uniform draw
    /// walked over the kept candidates in descending order.
    fn draw(&mut self, logits: &[f32], inv_t: f64) -> u32 {
        let top_k = self.params.top_k as usize;
        let Some(mut cands) = Draw::new(&mut self.cands, logits, inv_t, top_k) else {
            return greedy(logits);
        };
        let z = cands.z;

        // top-p and min-p both keep a prefix of the descending order; find its length.
        let top_p = f64::from(self.params.top_p);
        let min_p = f64::from(self.params.min_p);
        let (mut kept, mut mass) = (usize::MAX, z);
        if top_p < 1.0 || min_p > 0.0 {
            let mut above = 0.0;
            let mut i = 0;
            while let Some(c) = cands.get(i) {
                // transformers drops a token when the mass strictly below it is <= 1 - top_p,
                // i.e. when the mass above it is >= top_p; min-p is relative to the best
                // token, whose weight is 1. The best token always stays.
                if i > 0 && (above >= top_p * z || c.w < min_p) {
                    break;
                }
                above += c.w;
                i += 1;
            }
            (kept, mass) = (i, above);
        }

        // The draw of this step, whatever was drawn (or not) before.
        let target = rng::uniform_at(self.params.seed, self.step) * mass;
        let mut cum = 0.0;
        let mut last = None;
        for i in 0..kept {
            let Some(c) = cands.get(i) else { break };
            cum += c.w;
            if cum > target {
                return c.id;
            }
            last = Some(c.id);
        }
        // Rounding left `cum` a hair short of `target`: the last kept token ends the walk.
        last.unwrap_or_else(|| greedy(logits))
    }
}

/// Argmax with ties broken by the lowest id and NaN treated as -inf (id 0 if nothing is larger
/// than -inf), so greedy decoding equals transformers' `argmax`.
pub fn greedy(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    u32::try_from(best).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed,
            ..SamplingParams::default()
        }
    }

    fn draws(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p.clone(), &[]);
        (0..n).map(|_| s.sample(&mut logits.to_vec())).collect()
    }

    /// A deterministic, bumpy 1,000-token distribution.
    fn bumpy() -> Vec<f32> {
        (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect()
    }

    #[test]
    fn greedy_ties_nan_and_empty() {
        assert_eq!(greedy(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(greedy(&[f32::NAN, 0.5, f32::NAN, 0.5]), 1);
        assert_eq!(greedy(&[f32::NAN, f32::NEG_INFINITY]), 0);
        assert_eq!(greedy(&[]), 0);
        let mut s = Sampler::new(params(0.0, 1), &[]);
        assert_eq!(s.sample(&mut [0.0, 7.0, 7.0]), 1);
        assert_eq!(Sampler::new(params(0.7, 1), &[]).sample(&mut []), 0);
        assert_eq!(
            Sampler::new(params(0.7, 1), &[]).sample(&mut [f32::NAN; 3]),
            0
        );
    }

    #[test]
    fn seeds_are_reproducible_and_distinct() {
        let logits = bumpy();
        let a = draws(&params(1.5, 42), &logits, 50);
        assert_eq!(a, draws(&params(1.5, 42), &logits, 50));
        assert_ne!(a, draws(&params(1.5, 43), &logits, 50));
    }

    #[test]
    fn degenerate_filters_equal_greedy() {
        let logits = bumpy();
        let want = greedy(&logits);
        let cases = [
            SamplingParams {
                top_k: 1,
                ..params(2.0, 5)
            },
            SamplingParams {
                top_p: 1e-6,
                ..params(2.0, 5)
            },
            SamplingParams {
                top_p: 0.0,
                ..params(2.0, 5)
            },
            SamplingParams {
                min_p: 1.0,
                ..params(2.0, 5)
            },
        ];
        for p in cases {
            assert!(draws(&p, &logits, 30).iter().all(|&id| id == want), "{p:?}");
        }
    }

    #[test]
    fn hot_temperature_stays_in_top_k() {
        let logits = bumpy();
        let mut top: Vec<u32> = (0..1000).collect();
        top.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        let p = SamplingParams {
            top_k: 5,
            ..params(1e6, 9)
        };
        let got = draws(&p, &logits, 500);
        assert!(got.iter().all(|id| top[..5].contains(id)));
        assert!(
            top[..5].iter().all(|id| got.contains(id)),
            "all five get drawn"
        );
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities 0.5, 0.3, 0.2: top_p 0.7 keeps the first two (0.5 < 0.7 <= 0.8).
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let p = SamplingParams {
            top_p: 0.7,
            ..params(1.0, 3)
        };
        let got = draws(&p, &logits, 2000);
        assert!(!got.contains(&2) && got.contains(&0) && got.contains(&1));
    }

    #[test]
    fn repetition_penalty_moves_argmax() {
        let mut logits = [2.0, 1.5, -1.0, -1.2];
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0, 0)
        };
        // Prompt ids 0 and 2: 2.0 -> 1.0 (divided), -1.0 -> -2.0 (multiplied).
        assert_eq!(Sampler::new(p.clone(), &[0, 2, 0]).sample(&mut logits), 1);
        assert_eq!(logits, [1.0, 1.5, -2.0, -1.2]);
        // Generated ids count too, once each however often they repeat.
        let mut s = Sampler::new(p, &[]);
        assert_eq!(s.sample(&mut [3.0, 2.0]), 0);
        assert_eq!(s.sample(&mut [3.0, 2.0]), 1); // 1.5 < 2.0
        assert_eq!(s.sample(&mut [3.0, 2.0]), 0); // 1.5 > 1.0
    }

    #[test]
    fn presence_and_frequency_penalties() {
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..params(0.0, 0)
        };
        // Prompt tokens are not penalised by these.
        let mut s = Sampler::new(p, &[0]);
        assert_eq!(s.sample(&mut [1.0, 0.0]), 0);
        let mut logits = [1.0, 0.0];
        assert_eq!(s.sample(&mut logits), 0); // 1.0 - 0.5 - 0.25 = 0.25
        assert_eq!(logits, [0.25, 0.0]);
        let mut logits = [1.0, 0.3];
        assert_eq!(s.sample(&mut logits), 1); // 1.0 - 0.5 - 2 * 0.25 = 0.0 < 0.3
        assert_eq!(logits, [0.0, 0.3]);
    }

    #[test]
    fn frequencies_match_softmax() {
        let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let n = 20_000;
        let mut hist = [0usize; 5];
        for id in draws(&params(1.0, 2024), &logits, n) {
            hist[id as usize] += 1;
        }
        for (i, &l) in logits.iter().enumerate() {
            let want = f64::from(l).exp() / z;
            let got = hist[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.02, "token {i}: {got} vs {want}");
        }
    }

    /// The same pipeline written the obvious way: sort the whole vocabulary, then filter.
    fn reference(logits: &[f32], p: &SamplingParams, step: u64) -> u32 {
        let inv_t = 1.0 / f64::from(p.temperature);
        let s: Vec<f64> = logits.iter().map(|&l| f64::from(l) * inv_t).collect();
        let max = s.iter().copied().fold(f64::MIN, f64::max);
        let w = |i: usize| candidates::exp_nonpositive(s[i] - max);
        let z: f64 = (0..s.len()).map(w).sum();
        let mut order: Vec<usize> = (0..s.len()).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        let (mut kept, mut above) = (order.len(), 0.0);
        for (rank, &i) in order.iter().enumerate() {
            if rank > 0 && (above >= f64::from(p.top_p) * z || w(i) < f64::from(p.min_p)) {
                kept = rank;
                break;
            }
            above += w(i);
        }
        let target = rng::uniform_at(p.seed, step) * above;
        let mut cum = 0.0;
        for &i in &order[..kept] {
            cum += w(i);
            if cum > target {
                return i as u32;
            }
        }
        order[kept - 1] as u32
    }

    #[test]
    fn lazy_bands_equal_a_full_sort() {
        // 97 distinct values over 1,500 ids: many ties, several bands.
        let logits: Vec<f32> = (0..1500).map(|i| ((i * 31) % 97) as f32 / 8.0).collect();
        for (top_p, min_p) in [(1.0, 0.0), (0.9, 0.0), (0.999_999, 0.0), (1.0, 0.001)] {
            let p = SamplingParams {
                top_p,
                min_p,
                ..params(1.0, 77)
            };
            let want: Vec<u32> = (0..150).map(|k| reference(&logits, &p, k)).collect();
            assert_eq!(draws(&p, &logits, 150), want, "top_p {top_p} min_p {min_p}");
        }
    }

    #[test]
    fn a_sequence_continued_from_its_tokens_samples_on_unchanged() {
        let logits: Vec<f32> = (0..300).map(|i| ((i * 37) % 101) as f32 / 20.0).collect();
        let p = SamplingParams {
            presence_penalty: 0.4,
            frequency_penalty: 0.3,
            repetition_penalty: 1.2,
            top_p: 0.95,
            ..params(0.9, 5)
        };
        let whole = draws(&p, &logits, 60);
        for k in [0, 1, 17, 59] {
            let mut s = Sampler::new(p.clone(), &[]);
            for &id in &whole[..k] {
                s.record(id);
            }
            let rest: Vec<u32> = (k..60).map(|_| s.sample(&mut logits.clone())).collect();
            assert_eq!(rest, whole[k..], "continued after {k}");
        }
    }

    #[test]
    fn top_k_ties_keep_lowest_ids() {
        let logits = [1.0, 2.0, 2.0, 2.0, 0.0];
        let p = SamplingParams {
            top_k: 2,
            ..params(1.0, 11)
        };
        let got = draws(&p, &logits, 300);
        assert!(got.iter().all(|&id| id == 1 || id == 2));
    }

    #[test]
    fn infinities_do_not_break_sampling() {
        let logits = [0.0, f32::INFINITY, 5.0, f32::INFINITY];
        let got = draws(&params(1.0, 1), &logits, 200);
        assert!(got.iter().all(|&id| id == 1 || id == 3));
        assert!(got.contains(&1) && got.contains(&3));
    }
}
