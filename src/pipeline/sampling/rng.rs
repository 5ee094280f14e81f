//! The sampler's random numbers: xoshiro256** (Blackman & Vigna) seeded through SplitMix64, as
//! its authors recommend. Written here rather than taken from `rand` so that a seed keeps
//! producing the same tokens across platforms and dependency upgrades.

/// xoshiro256** state; never all zero.
#[derive(Debug, Clone)]
pub(super) struct Xoshiro256 {
    s: [u64; 4],
}

pub(super) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Xoshiro256 {
    pub(super) fn seeded(seed: u64) -> Self {
        // SplitMix64's output is a bijection of its counter, so four outputs are never all zero.
        let mut sm = seed;
        let s = [(); 4].map(|_| splitmix64(&mut sm));
        Xoshiro256 { s }
    }

    pub(super) fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub(super) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_value() {
        // First SplitMix64 output for seed 0, from the reference implementation.
        assert_eq!(splitmix64(&mut 0), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn xoshiro_is_deterministic_and_uniform_enough() {
        let a: Vec<u64> = {
            let mut r = Xoshiro256::seeded(7);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let mut r = Xoshiro256::seeded(7);
        assert_eq!(a, (0..8).map(|_| r.next_u64()).collect::<Vec<_>>());
        let mean = (0..10_000).map(|_| r.next_f64()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        assert!((0..10_000).all(|_| (0.0..1.0).contains(&r.next_f64())));
    }
}
