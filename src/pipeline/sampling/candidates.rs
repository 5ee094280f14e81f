//! The candidate tokens of one draw, produced in descending order (scaled logit descending,
//! ties by lowest id) without sorting the vocabulary. With top-k, a heap keeps the best k in a
//! single pass. Without it, the normaliser is summed in one pass and candidates are then
//! extracted and sorted band by band (bands of scaled logit below the best) only as far as
//! top-p, min-p or the draw look; for a peaked distribution that is one pass and a few dozen
//! tokens instead of sorting 262,400.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One candidate: `w` is its scaled logit until the order is fixed, then its unnormalised
/// probability `exp(scaled - best)`, so the best token weighs exactly 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Cand {
    pub id: u32,
    pub w: f64,
}

/// Descending `w`, ties by lowest id: the order the draw walks in. Sorting happens on scaled
/// logits (exact), never on rounded exponentials.
fn by_w_desc(a: &Cand, b: &Cand) -> Ordering {
    b.w.total_cmp(&a.w).then(a.id.cmp(&b.id))
}

/// Heap entry ordered so that the heap's top is the worst candidate kept so far.
struct Worst(Cand);

impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        by_w_desc(&self.0, &other.0)
    }
}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Worst {}

/// Lower edges of the bands, in scaled logit relative to the best (the first band reaches up to
/// 0). The first band holds every token within a factor e^3 of the best one's probability.
const BAND_EDGES: [f64; 6] = [-3.0, -6.0, -10.0, -16.0, -24.0, f64::NEG_INFINITY];

/// Up to this k, top-k keeps a heap (most tokens cost one comparison); above it, selecting over
/// all candidates is cheaper.
const HEAP_TOP_K_MAX: usize = 4096;

/// The candidates of one draw, handed out in descending order by [`Draw::get`].
pub(super) struct Draw<'a> {
    logits: &'a [f32],
    inv_t: f64,
    max: f64,
    floor: f64,
    next_band: usize,
    sorted: &'a mut Vec<Cand>,
    /// Sum of all candidates' weights (softmax normaliser relative to the best token).
    pub z: f64,
}

impl<'a> Draw<'a> {
    /// Scales `logits` by `inv_t` (1 / temperature) and prepares the candidates, keeping only
    /// the best `top_k` when `0 < top_k < vocab`. `None` if no logit is above -inf (or NaN).
    pub fn new(
        buf: &'a mut Vec<Cand>,
        logits: &'a [f32],
        inv_t: f64,
        top_k: usize,
    ) -> Option<Self> {
        buf.clear();
        let mut max = f64::NEG_INFINITY;
        for &l in logits {
            let s = f64::from(l) * inv_t;
            if s > max {
                max = s;
            }
        }
        let floor = weight_floor(max, logits.len())?;
        let mut draw = Draw {
            logits,
            inv_t,
            max,
            floor,
            next_band: 0,
            sorted: buf,
            z: 0.0,
        };
        if top_k > 0 && top_k < logits.len() {
            draw.select_top_k(top_k);
            for c in draw.sorted.iter_mut() {
                c.w = exp_nonpositive(relative(c.w, max));
                draw.z += c.w;
            }
            draw.next_band = BAND_EDGES.len();
        } else {
            draw.z = weight_sum(logits, inv_t, max, floor);
        }
        Some(draw)
    }

    /// The `i`-th candidate in descending order, if there are that many.
    pub fn get(&mut self, i: usize) -> Option<Cand> {
        while self.sorted.len() <= i && self.next_band < BAND_EDGES.len() {
            self.extract_band();
        }
        self.sorted.get(i).copied()
    }

    fn select_top_k(&mut self, k: usize) {
        if k <= HEAP_TOP_K_MAX {
            let mut heap = BinaryHeap::with_capacity(k + 1);
            // The weakest kept logit, cached: most tokens are rejected by this one comparison.
            // Ids arrive in increasing order, so an equal logit never displaces.
            let mut bar = f64::NEG_INFINITY;
            for c in scaled(self.logits, self.inv_t, self.floor) {
                if heap.len() < k {
                    heap.push(Worst(c));
                } else if c.w > bar {
                    if let Some(mut worst) = heap.peek_mut() {
                        *worst = Worst(c);
                    }
                } else {
                    continue;
                }
                if heap.len() == k {
                    bar = heap.peek().map_or(f64::NEG_INFINITY, |w| w.0.w);
                }
            }
            self.sorted.extend(heap.into_iter().map(|w| w.0));
        } else {
            self.sorted
                .extend(scaled(self.logits, self.inv_t, self.floor));
            if self.sorted.len() > k {
                self.sorted.select_nth_unstable_by(k - 1, by_w_desc);
                self.sorted.truncate(k);
            }
        }
        self.sorted.sort_unstable_by(by_w_desc);
    }

    /// Appends the next band, sorted. Every scaled logit in it is below every earlier one.
    fn extract_band(&mut self) {
        let b = self.next_band;
        self.next_band += 1;
        let lo = BAND_EDGES.get(b).copied().unwrap_or(f64::NEG_INFINITY);
        let hi = if b == 0 {
            f64::INFINITY
        } else {
            BAND_EDGES[b - 1]
        };
        let max = self.max;
        let start = self.sorted.len();
        self.sorted
            .extend(scaled(self.logits, self.inv_t, self.floor).filter(|c| {
                let d = relative(c.w, max);
                lo <= d && d < hi
            }));
        let new = &mut self.sorted[start..];
        new.sort_unstable_by(by_w_desc);
        for c in new {
            c.w = exp_nonpositive(relative(c.w, max));
        }
    }
}

/// `(id, logit * inv_t)` for every logit at or above `floor` (NaN never is).
fn scaled(logits: &[f32], inv_t: f64, floor: f64) -> impl Iterator<Item = Cand> + '_ {
    logits.iter().enumerate().filter_map(move |(i, &l)| {
        let s = f64::from(l) * inv_t;
        (s >= floor).then_some(Cand {
            id: u32::try_from(i).ok()?,
            w: s,
        })
    })
}

/// Scaled logits below the returned floor are left out. A token this far below the best weighs
/// < e^-40 / vocab; all of them together are below half an ulp of the normaliser (>= 1) and
/// below the draw's 2^-53 resolution, so leaving them out changes no result beyond float noise.
/// An infinite best logit makes every finite one weightless. `None`: nothing above -inf.
fn weight_floor(max: f64, vocab: usize) -> Option<f64> {
    if max == f64::INFINITY {
        Some(f64::INFINITY)
    } else if max > f64::NEG_INFINITY {
        Some(max - 40.0 - (vocab.max(1) as f64).ln())
    } else {
        None
    }
}

/// The softmax normaliser (relative to the best token) over all logits at or above `floor`.
/// Branch-free with four partial sums so that the compiler can vectorise the exponentials;
/// the summation order is fixed, so the result is still the same on every platform.
fn weight_sum(logits: &[f32], inv_t: f64, max: f64, floor: f64) -> f64 {
    if max == f64::INFINITY {
        return logits
            .iter()
            .filter(|&&l| f64::from(l) * inv_t >= floor)
            .count() as f64;
    }
    let weight = |l: f32| {
        let s = f64::from(l) * inv_t;
        let w = exp_nonpositive(s - max);
        if s >= floor {
            w
        } else {
            0.0
        }
    };
    let mut acc = [0.0f64; 4];
    let mut chunks = logits.chunks_exact(4);
    for chunk in &mut chunks {
        for (a, &l) in acc.iter_mut().zip(chunk) {
            *a += weight(l);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&l| weight(l)).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// `s - max`; infinite logits (which alone pass the floor when `max` is infinite) share the
/// mass equally.
fn relative(s: f64, max: f64) -> f64 {
    if max == f64::INFINITY {
        0.0
    } else {
        s - max
    }
}

/// `exp(x)` for `x <= 0`, within a few ulp of the exact value and bit-identical on every
/// platform (plain IEEE arithmetic, no libm): the draw must not depend on the C library, and
/// this is several times faster than libm's `exp` over a 262,400-token vocabulary.
pub(super) fn exp_nonpositive(x: f64) -> f64 {
    const LOG2_E: f64 = std::f64::consts::LOG2_E;
    // fdlibm's split of ln 2 (its bit patterns): `k * LN2_HI` is exact for |k| < 2^20.
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    // Adding 1.5 * 2^52 rounds to the nearest integer.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    // 1/n! for the Taylor series; the 13th-degree remainder is < 5e-18 on |r| <= ln2 / 2.
    const INV_FACT: [f64; 14] = {
        let mut c = [1.0; 14];
        let mut n = 1;
        while n < 14 {
            c[n] = c[n - 1] / n as f64;
            n += 1;
        }
        c
    };
    // Below -708 the result is subnormal or zero; no caller goes near it (the floor is ~-63).
    let x = x.clamp(-708.0, 0.0);
    let t = x * LOG2_E + ROUND;
    let k = t - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = INV_FACT[13];
    for c in INV_FACT[..13].iter().rev() {
        p = p * r + c;
    }
    // `t`'s low mantissa bits hold `k` in two's complement; adding the exponent bias and
    // shifting the rest out gives 2^k for k in [-1022, 0] with integer ops only (vectorisable).
    let scale = f64::from_bits(t.to_bits().wrapping_add(1023) << 52);
    p * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_closely() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -(i as f64) * 0.000_35; // 0 down to -70
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 1e-15, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert!(exp_nonpositive(-1e9) >= 0.0);
    }

    fn all(logits: &[f32], top_k: usize) -> Vec<Cand> {
        let mut buf = Vec::new();
        let mut d = Draw::new(&mut buf, logits, 1.0, top_k).unwrap();
        (0..).map_while(|i| d.get(i)).collect()
    }

    #[test]
    fn bands_and_heap_agree_with_a_full_sort() {
        let n = 6000;
        let logits: Vec<f32> = (0..n).map(|i| ((i * 7919) % 601) as f32 / 20.0).collect();
        let mut want: Vec<Cand> = (0..n)
            .map(|i| Cand {
                id: i as u32,
                w: f64::from(logits[i]),
            })
            .collect();
        want.sort_by(by_w_desc);
        let got = all(&logits, 0);
        let ids = |v: &[Cand]| v.iter().map(|c| c.id).collect::<Vec<_>>();
        // 30 - 40 - ln(6000) < 0: every token is above the floor.
        assert_eq!(ids(&got), ids(&want));
        assert!(got.windows(2).all(|w| w[0].w >= w[1].w));
        assert_eq!(ids(&all(&logits, 100)), ids(&want[..100]));
        // Heap below HEAP_TOP_K_MAX, selection above it.
        assert_eq!(ids(&all(&logits, 5000)), ids(&want[..5000]));
        assert_eq!(got[0].w, 1.0);
    }

    #[test]
    fn nothing_finite_means_no_draw() {
        let mut buf = Vec::new();
        assert!(Draw::new(&mut buf, &[], 1.0, 0).is_none());
        assert!(Draw::new(&mut buf, &[f32::NAN, f32::NEG_INFINITY], 1.0, 0).is_none());
        let c = all(&[1.0, f32::INFINITY, f32::NAN, f32::INFINITY], 0);
        assert_eq!(c, vec![Cand { id: 1, w: 1.0 }, Cand { id: 3, w: 1.0 }]);
    }
}
