//! Log-probabilities of the model's own next-token distribution: the log-softmax of the raw
//! logits, before temperature, penalties, logit biases and grammar masks (what the model thinks,
//! not what the sampler was allowed to pick from; vLLM's default `logprobs_mode` too).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// `log Σ exp(l)` over finite logits (−inf when none is finite).
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let m = f64::from(max);
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| (f64::from(l) - m).exp())
        .sum();
    m + sum.ln()
}

#[derive(PartialEq)]
struct Entry(f32, u32);

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed (a min-heap on the logit), ties: the higher id is "smaller", so the lowest id stays.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .0
            .total_cmp(&self.0)
            .then_with(|| self.1.cmp(&other.1))
    }
}

/// The `k` most likely ids and their log-probabilities, most likely first (ties: lower id first).
pub fn top(logits: &[f32], lse: f64, k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut heap = BinaryHeap::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if heap.len() < k {
            heap.push(Entry(l, i as u32));
        } else if let Some(min) = heap.peek() {
            if l > min.0 {
                heap.pop();
                heap.push(Entry(l, i as u32));
            }
        }
    }
    let mut v: Vec<(u32, f32)> = heap
        .into_iter()
        .map(|Entry(l, i)| (i, (f64::from(l) - lse) as f32))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// The log-probability of `id`.
pub fn of(logits: &[f32], lse: f64, id: u32) -> f32 {
    logits
        .get(id as usize)
        .map_or(f32::NEG_INFINITY, |&l| (f64::from(l) - lse) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_direct_softmax() {
        let l = [1.0f32, 3.0, 2.0, 3.0, f32::NEG_INFINITY];
        let lse = log_sum_exp(&l);
        let z: f64 = l.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((lse - z.ln()).abs() < 1e-12);
        let t = top(&l, lse, 3);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!((t[0].1 - (3.0 - z.ln()) as f32).abs() < 1e-6);
        let p: f64 = (0..5).map(|i| f64::from(of(&l, lse, i)).exp()).sum();
        assert!((p - 1.0).abs() < 1e-6);
        assert_eq!(of(&l, lse, 4), f32::NEG_INFINITY);
        assert!(top(&l, lse, 0).is_empty());
        assert_eq!(top(&l, lse, 10).len(), 5);
    }
}
