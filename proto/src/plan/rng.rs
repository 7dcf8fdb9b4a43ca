//! The plan generator: a small counter-based generator built on SplitMix64, owned by
//! this crate so that no dependency update can ever change a plan.
//!
//! Every deterministic plan (epoch order, crop plan) draws from a [`PlanRng`] keyed by
//! `(seed, purpose, epoch, id)`. A teacher pool and trainers on other machines must
//! draw *the same bits*, so the algorithm below is part of the contract, versioned by
//! [`RNG_VERSION`]. Everything is wrapping `u64` arithmetic: no floating point, no
//! platform-dependent widths.
//!
//! # The algorithm (version 1)
//!
//! Constants: `GAMMA = 0x9E3779B97F4A7C15`, `C1 = 0xBF58476D1CE4E5B9`,
//! `C2 = 0x94D049BB133111EB`. All arithmetic is modulo 2⁶⁴.
//!
//! - **mix** (SplitMix64's output function, Stafford's "Mix13"):
//!   `z = (z ^ (z >> 30)) * C1; z = (z ^ (z >> 27)) * C2; return z ^ (z >> 31)`.
//! - **draw i of stream `key`** (i = 1, 2, 3, ...): `mix(key + i * GAMMA)`. This is exactly
//!   the i-th output of SplitMix64 seeded with `key` (for key 0 the published first outputs
//!   0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4, 0x06c45d188009454f), and each output is a pure
//!   function of `(key, i)`, so a stream can be entered at any counter.
//! - **stream key** of `(seed, purpose, epoch, id)`: `k = seed`, then for each word `w` of
//!   `[purpose, epoch, id]` in that order, `k = mix((k ^ w) + GAMMA)` (the first SplitMix64
//!   output for seed `k ^ w`). Each step is a bijection of `k` for fixed `w` and of `w` for
//!   fixed `k`, so streams that differ in one word never share a key.
//! - **purpose tags** are 8 ASCII bytes read big-endian ([`Purpose::tag`]).
//! - **`below(n)`**, unbiased in `[0, n)` for `n ≥ 1`: with `r = 2⁶⁴ mod n`, draw `x` until
//!   `x ≥ r`, return `x mod n`. The accepted range `[r, 2⁶⁴)` holds a whole number of
//!   copies of every residue. (Rejection happens with probability `r / 2⁶⁴ < n / 2⁶⁴`,
//!   i.e. practically never for the sizes used here, but it is part of the definition.)
//! - **`shuffle(a)`** (Fisher–Yates, Durstenfeld's descending form): for `i` from
//!   `len − 1` down to `1`: `j = below(i + 1)`, swap `a[i]` and `a[j]`.
//!
//! Draws are consumed strictly in program order, so "layout, then shuffle" in the crop
//! plan means: draw 1 (and any rejections) picks the layout, the following ones shuffle.

/// Version of the algorithm above. Any change to it, to a purpose tag, or to how a plan
/// consumes draws changes plans and must bump [`super::PLAN_VERSION`]; caches record it.
pub const RNG_VERSION: u32 = 1;

/// SplitMix64's increment (2⁶⁴ / φ, odd).
pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
const C1: u64 = 0xBF58_476D_1CE4_E5B9;
const C2: u64 = 0x94D0_49BB_1331_11EB;

/// SplitMix64's output function: a bijection on `u64` with good avalanche.
#[inline]
pub const fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(C1);
    let z = (z ^ (z >> 27)).wrapping_mul(C2);
    z ^ (z >> 31)
}

/// What a stream is for. Distinct purposes never share a stream, even for equal
/// `(seed, epoch, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// The permutation of sample indices of one epoch (`id` = number of samples).
    EpochOrder,
    /// The crop layout and kept cells of one image in one epoch (`id` = image id).
    CropPlan,
    /// The pixels of one synthetic image (`epoch` = 0, `id` = image id); demo data only.
    SyntheticImage,
}

impl Purpose {
    /// The tag word absorbed into the stream key: 8 ASCII bytes, big-endian.
    pub const fn tag(self) -> u64 {
        match self {
            // b"EPOCHORD"
            Purpose::EpochOrder => 0x4550_4F43_484F_5244,
            // b"CROPPLAN"
            Purpose::CropPlan => 0x4352_4F50_504C_414E,
            // b"SYNTHIMG"
            Purpose::SyntheticImage => 0x5359_4E54_4849_4D47,
        }
    }
}

/// The key of the stream for `(seed, purpose, epoch, id)` (see the module doc).
pub const fn stream_key(seed: u64, purpose: Purpose, epoch: u64, id: u64) -> u64 {
    let words = [purpose.tag(), epoch, id];
    let mut k = seed;
    let mut i = 0;
    while i < words.len() {
        k = mix64((k ^ words[i]).wrapping_add(GAMMA));
        i += 1;
    }
    k
}

/// `2⁶⁴ mod n` (`n ≥ 1`), computed without 128-bit arithmetic as `(2⁶⁴ − n) mod n`:
/// the draws below it are rejected by [`PlanRng::below`].
const fn biased_zone(n: u64) -> u64 {
    n.wrapping_neg() % n
}

/// A counter-based stream: output `i` (1-based) is `mix64(key + i·GAMMA)`.
///
/// The state is just `(key, counter)`; there is nothing hidden to save or restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRng {
    key: u64,
    counter: u64,
}

impl PlanRng {
    /// The stream with this key, before its first draw. Key 0 is plain SplitMix64
    /// seeded with 0.
    pub const fn from_key(key: u64) -> Self {
        Self { key, counter: 0 }
    }

    /// The stream for `(seed, purpose, epoch, id)`.
    pub const fn new(seed: u64, purpose: Purpose, epoch: u64, id: u64) -> Self {
        Self::from_key(stream_key(seed, purpose, epoch, id))
    }

    /// The stream's key.
    pub const fn key(&self) -> u64 {
        self.key
    }

    /// How many `u64`s have been drawn so far.
    pub const fn draws(&self) -> u64 {
        self.counter
    }

    /// Output `index` (1-based) of the stream `key`, without any state.
    #[inline]
    pub const fn at(key: u64, index: u64) -> u64 {
        mix64(key.wrapping_add(index.wrapping_mul(GAMMA)))
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.counter = self.counter.wrapping_add(1);
        Self::at(self.key, self.counter)
    }

    /// A uniform integer in `[0, n)`, by rejection (no modulo bias).
    ///
    /// # Panics
    /// If `n == 0` (an empty range has no element to return). Plans only call it with
    /// a non-empty range.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "PlanRng::below(0): empty range");
        let reject_under = biased_zone(n);
        loop {
            let x = self.next_u64();
            if x >= reject_under {
                return x % n;
            }
        }
    }

    /// Fisher–Yates shuffle in place (descending `i`, `j = below(i + 1)`).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            // usize -> u64 is lossless on every supported target; the result is <= i.
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_spell_their_names() {
        assert_eq!(Purpose::EpochOrder.tag().to_be_bytes(), *b"EPOCHORD");
        assert_eq!(Purpose::CropPlan.tag().to_be_bytes(), *b"CROPPLAN");
    }

    #[test]
    fn below_rejects_the_biased_zone() {
        // n = 3: 2^64 mod 3 = 1, so only x = 0 is rejected.
        assert_eq!(biased_zone(3), 1);
        // Powers of two never reject.
        assert_eq!(biased_zone(1), 0);
        assert_eq!(biased_zone(8), 0);
        assert_eq!(biased_zone(1 << 63), 0);
        // n = 2^63 + 1: 2^64 = 2n - 2, so 2^64 mod n = n - 2 = 2^63 - 1.
        assert_eq!(biased_zone((1 << 63) + 1), (1 << 63) - 1);
        // n = 10: 2^64 = 18446744073709551616 ends in 6.
        assert_eq!(biased_zone(10), 6);
    }
}
