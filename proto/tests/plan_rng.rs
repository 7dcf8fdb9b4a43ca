//! The plan generator's contract, pinned by values computed outside this crate.
//!
//! The SplitMix64 values are the published ones. The others were computed with an
//! independent Python transcription of the algorithm text in `proto/src/plan/rng.rs`
//! (arbitrary-precision integers masked to 64 bits), not by running this code. A failure
//! here means the generator changed: every plan, and every cache keyed on a plan, changes
//! with it.

use proptest::prelude::*;
use proto::plan::rng::{mix64, stream_key, PlanRng, Purpose, GAMMA, RNG_VERSION};

#[test]
fn version_is_one() {
    assert_eq!(RNG_VERSION, 1);
}

/// Key 0 is plain SplitMix64 seeded with 0 (Vigna's reference `splitmix64.c`).
#[test]
fn key_zero_is_splitmix64_seed_zero() {
    let mut rng = PlanRng::from_key(0);
    assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
    assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    assert_eq!(rng.next_u64(), 0x06c4_5d18_8009_454f);
    assert_eq!(rng.draws(), 3);
}

/// The widely published SplitMix64 sequence for seed 1234567.
#[test]
fn key_1234567_is_splitmix64_seed_1234567() {
    let mut rng = PlanRng::from_key(1_234_567);
    let got: Vec<u64> = (0..5).map(|_| rng.next_u64()).collect();
    assert_eq!(
        got,
        [
            6_457_827_717_110_365_317,
            3_203_168_211_198_807_973,
            9_817_491_932_198_370_423,
            4_593_380_528_125_082_431,
            16_408_922_859_458_223_821,
        ]
    );
}

#[test]
fn mix_of_gamma_is_first_output() {
    assert_eq!(mix64(GAMMA), 0xe220_a839_7b1d_cdaf);
    assert_eq!(mix64(0), 0);
}

#[test]
fn stream_keys_match_reference() {
    assert_eq!(
        stream_key(0, Purpose::EpochOrder, 0, 0),
        0xdb69_4844_e053_7d8f
    );
    assert_eq!(
        stream_key(42, Purpose::CropPlan, 3, 139),
        0x580d_5723_7707_7de0
    );
    assert_eq!(
        stream_key(u64::MAX, Purpose::CropPlan, u64::from(u32::MAX), u64::MAX),
        0x08c7_eea2_67ff_f868
    );
    let mut rng = PlanRng::new(42, Purpose::CropPlan, 3, 139);
    assert_eq!(rng.key(), 0x580d_5723_7707_7de0);
    assert_eq!(rng.next_u64(), 0x58b6_17d8_c621_bea7);
    assert_eq!(rng.next_u64(), 0xda0a_1cfa_ee4f_67d1);
    assert_eq!(rng.next_u64(), 0x8b92_1c32_8b34_b970);
}

#[test]
fn below_matches_reference() {
    let mut rng = PlanRng::from_key(0);
    let got: Vec<u64> = (0..10).map(|_| rng.below(10)).collect();
    assert_eq!(got, [5, 0, 9, 4, 7, 0, 3, 0, 9, 0]);
}

/// n = 2^63 + 1 rejects almost half of all draws (2^64 mod n = 2^63 - 1): this pins
/// the rejection rule itself, including how many draws it consumes.
#[test]
fn below_rejection_matches_reference() {
    let mut rng = PlanRng::from_key(0);
    let n = (1u64 << 63) + 1;
    let got: Vec<u64> = (0..4).map(|_| rng.below(n)).collect();
    assert_eq!(
        got,
        [
            7_070_836_379_803_831_726,
            8_686_239_339_925_766_635,
            5_009_149_828_745_571_131,
            8_338_494_477_124_284_581,
        ]
    );
    assert_eq!(rng.draws(), 10);
}

#[test]
fn shuffle_matches_reference() {
    let mut rng = PlanRng::from_key(0);
    let mut items: Vec<u32> = (0..10).collect();
    rng.shuffle(&mut items);
    assert_eq!(items, [6, 3, 2, 9, 8, 1, 4, 7, 0, 5]);
    assert_eq!(
        rng.draws(),
        9,
        "one draw per i in 9..=1 (no rejection for small n)"
    );
}

#[test]
fn shuffle_of_short_slices_draws_nothing() {
    let mut rng = PlanRng::from_key(7);
    let mut empty: [u8; 0] = [];
    rng.shuffle(&mut empty);
    let mut one = [9];
    rng.shuffle(&mut one);
    assert_eq!(one, [9]);
    assert_eq!(rng.draws(), 0);
}

#[test]
#[should_panic(expected = "empty range")]
fn below_zero_panics() {
    PlanRng::from_key(0).below(0);
}

/// A coarse uniformity check: 60,000 draws of below(6) land within 5 % of 10,000 each.
#[test]
fn below_is_roughly_uniform() {
    let mut rng = PlanRng::new(1, Purpose::CropPlan, 0, 0);
    let mut counts = [0u32; 6];
    for _ in 0..60_000 {
        counts[rng.below(6) as usize] += 1;
    }
    for c in counts {
        assert!((9_500..=10_500).contains(&c), "{counts:?}");
    }
}

proptest! {
    /// Output i depends only on (key, i): a stream can be entered at any counter.
    #[test]
    fn draws_are_counter_based(key in any::<u64>(), skip in 0u64..50) {
        let mut rng = PlanRng::from_key(key);
        for _ in 0..skip {
            rng.next_u64();
        }
        prop_assert_eq!(rng.next_u64(), PlanRng::at(key, skip + 1));
    }

    #[test]
    fn below_stays_in_range(key in any::<u64>(), n in 1u64..=u64::MAX) {
        let mut rng = PlanRng::from_key(key);
        for _ in 0..8 {
            prop_assert!(rng.below(n) < n);
        }
    }

    #[test]
    fn shuffle_is_a_permutation(key in any::<u64>(), len in 0usize..300) {
        let mut items: Vec<usize> = (0..len).collect();
        PlanRng::from_key(key).shuffle(&mut items);
        items.sort_unstable();
        prop_assert_eq!(items, (0..len).collect::<Vec<_>>());
    }

    /// Keys differ when any one word differs (each absorption step is a bijection).
    #[test]
    fn keys_separate_every_word(seed in any::<u64>(), epoch in any::<u64>(), id in any::<u64>(), d in 1u64..=u64::MAX) {
        let base = stream_key(seed, Purpose::CropPlan, epoch, id);
        prop_assert_ne!(base, stream_key(seed ^ d, Purpose::CropPlan, epoch, id));
        prop_assert_ne!(base, stream_key(seed, Purpose::CropPlan, epoch ^ d, id));
        prop_assert_ne!(base, stream_key(seed, Purpose::CropPlan, epoch, id ^ d));
        prop_assert_ne!(base, stream_key(seed, Purpose::EpochOrder, epoch, id));
    }
}
