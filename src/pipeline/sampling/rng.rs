//! The sampler's random numbers, counter-based: the draw for step `k` of the stream seeded `s` is
//! SplitMix64's `k`-th output for seed `s` (Steele, Lea & Flood; the state is just a counter, so any
//! output is computed directly). A step's draw depends on nothing but (seed, step): an answer that
//! moves to another worker after `k` tokens draws for token `k` exactly what it would have drawn
//! without the move, and the choices of `n > 1` each have a stream of their own (their seeds come
//! from [`crate::models::generate::choice_seed`]). Written here rather than taken from `rand` so
//! that a seed keeps producing the same tokens across platforms and dependency upgrades.

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Output `step` (from 0) of SplitMix64 seeded with `seed`.
pub(super) fn bits_at(seed: u64, step: u64) -> u64 {
    mix(seed.wrapping_add(step.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// Uniform in [0, 1) with 53 random bits: the draw of `step` for `seed`.
pub(super) fn uniform_at(seed: u64, step: u64) -> f64 {
    (bits_at(seed, step) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 as a stream, the reference the counter form must equal.
    fn stream(mut state: u64, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| {
                state = state.wrapping_add(GAMMA);
                mix(state)
            })
            .collect()
    }

    #[test]
    fn equals_the_splitmix_stream_and_its_reference_value() {
        // First SplitMix64 output for seed 0, from the reference implementation.
        assert_eq!(bits_at(0, 0), 0xE220_A839_7B1D_CDAF);
        for seed in [0, 7, u64::MAX] {
            let want = stream(seed, 64);
            let got: Vec<u64> = (0..64).map(|k| bits_at(seed, k)).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn uniform_enough() {
        let mean = (0..10_000).map(|k| uniform_at(7, k)).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        assert!((0..10_000).all(|k| (0.0..1.0).contains(&uniform_at(9, k))));
    }
}
