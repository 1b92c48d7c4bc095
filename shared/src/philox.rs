//! Philox4x32-10, the counter-based random generator behind every random choice in the sample stream.
//!
//! A counter-based generator maps (key, counter) to random words with no hidden state, so the clone
//! permutation of cell `c`, clone `k` can be computed on any machine, in any order, by any build, without
//! replaying earlier draws. This is the generator of Salmon et al., "Parallel random numbers: as easy as
//! 1, 2, 3" (SC'11), with 10 rounds; `tests::known_answers` pins the published known-answer vectors.
//!
//! Every use in cellfleet builds its counter as `[i, a, b, domain]`: `i` counts 4-word blocks within one
//! stream, `a`/`b` identify the object (cell, clone, epoch...) and `domain` separates the purposes, so two
//! purposes can never draw the same words. The key is the run seed split into two 32-bit halves.

const MULTIPLIER_0: u32 = 0xD251_1F53;
const MULTIPLIER_1: u32 = 0xCD9E_8D57;
const WEYL_0: u32 = 0x9E37_79B9;
const WEYL_1: u32 = 0xBB67_AE85;

/// One Philox4x32-10 evaluation.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(WEYL_0);
            k[1] = k[1].wrapping_add(WEYL_1);
        }
        let p0 = u64::from(MULTIPLIER_0) * u64::from(c[0]);
        let p1 = u64::from(MULTIPLIER_1) * u64::from(c[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Purposes that draw from Philox; each gets its own counter word so streams never overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Domain {
    /// Gene-token order of one clone of one cell: `a` = cell, `b` = clone.
    ClonePermutation = 1,
    /// Masked-position choice of one sample in one epoch: `a` = cell, `b` = epoch << 8 | clone.
    Mask = 2,
    /// Order of (block, clone) units in one epoch: `a` = epoch, `b` = 0.
    UnitOrder = 3,
    /// Order of samples inside one shuffle window: `a` = epoch, `b` = window.
    WindowOrder = 4,
    /// Synthetic-corpus generation: `a` = synthetic cell, `b` = 0.
    Synth = 5,
    /// Train / held-out assignment of one cell: `a` = cell, `b` = 0.
    Split = 6,
    /// Unexpressed genes sampled into one sample's expressed-layout sequence in one epoch: `a` = cell,
    /// `b` = epoch << 8 | clone.
    UnexpressedSample = 7,
    /// Order of the length-sorted global batches inside one bucket window: `a` = epoch, `b` = window.
    BucketOrder = 8,
    /// An MCMC steering chain's proposals and acceptances: `a` = target, `b` = the cell's low 32 bits
    /// (the chain and the cell's high bits are mixed into the key).
    Steer = 9,
}

/// A stream of random words for one (seed, domain, a, b).
#[derive(Debug, Clone)]
pub struct PhiloxStream {
    key: [u32; 2],
    counter: [u32; 4],
    buffer: [u32; 4],
    used: usize,
}

impl PhiloxStream {
    pub fn new(seed: u64, domain: Domain, a: u32, b: u32) -> Self {
        Self {
            key: [seed as u32, (seed >> 32) as u32],
            counter: [0, a, b, domain as u32],
            buffer: [0; 4],
            used: 4,
        }
    }

    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            self.buffer = philox4x32_10(self.counter, self.key);
            self.counter[0] = self.counter[0].wrapping_add(1);
            self.used = 0;
        }
        let word = self.buffer[self.used];
        self.used += 1;
        word
    }

    /// Uniform integer in `0..bound` (Lemire's multiply-shift with rejection, so exactly uniform).
    #[inline]
    pub fn below(&mut self, bound: u32) -> u32 {
        debug_assert!(bound > 0);
        let mut product = u64::from(self.next_u32()) * u64::from(bound);
        let mut low = product as u32;
        if low < bound {
            let threshold = bound.wrapping_neg() % bound;
            while low < threshold {
                product = u64::from(self.next_u32()) * u64::from(bound);
                low = product as u32;
            }
        }
        (product >> 32) as u32
    }

    /// Uniform float in [0, 1) with 53 bits of precision.
    #[inline]
    pub fn unit_f64(&mut self) -> f64 {
        let hi = u64::from(self.next_u32() >> 5);
        let lo = u64::from(self.next_u32() >> 6);
        ((hi << 26) | lo) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Fisher-Yates shuffle from the last element down (Durstenfeld), one `below` per element.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u32 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// The per-sample generator of the hot path: wyrand (Wang Yi's 64-bit multiply-xorshift generator) with
/// its 64-bit state taken from one Philox evaluation at counter `[0, a, b, domain]`. Keying stays
/// counter-based (any sample's stream is computed directly from its ids), while the 4,096 draws of one
/// clone permutation cost one multiply each instead of a 10-round Philox block per four words.
#[derive(Debug, Clone)]
pub struct SampleRng {
    state: u64,
    spare: Option<u32>,
}

impl SampleRng {
    pub fn new(seed: u64, domain: Domain, a: u32, b: u32) -> Self {
        let words = philox4x32_10([0, a, b, domain as u32], [seed as u32, (seed >> 32) as u32]);
        Self {
            state: u64::from(words[0]) | u64::from(words[1]) << 32,
            spare: None,
        }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0xa076_1d64_78bd_642f);
        let product = u128::from(self.state) * u128::from(self.state ^ 0xe703_7ed1_a0b4_28db);
        ((product >> 64) as u64) ^ (product as u64)
    }

    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if let Some(word) = self.spare.take() {
            return word;
        }
        let word = self.next_u64();
        self.spare = Some((word >> 32) as u32);
        word as u32
    }

    /// Uniform integer in `0..bound` (Lemire's multiply-shift with rejection).
    #[inline]
    pub fn below(&mut self, bound: u32) -> u32 {
        let mut product = u64::from(self.next_u32()) * u64::from(bound);
        if (product as u32) < bound {
            let threshold = bound.wrapping_neg() % bound;
            while (product as u32) < threshold {
                product = u64::from(self.next_u32()) * u64::from(bound);
            }
        }
        (product >> 32) as u32
    }

    /// Fisher-Yates shuffle from the last element down: element i swaps with `below(i + 1)`, for at most
    /// 65,536 items (a vocabulary). Gives the same permutation as calling `below` in a loop on this
    /// generator; afterwards the generator is spent (it may have drawn words it did not use).
    ///
    /// Faster than that loop: words are generated 512 at a time (independent multiplications that
    /// pipeline), all swap partners are computed before any swap (`u16`, so items and partners stay in
    /// L1), and the memory-bound swap loop runs on its own.
    pub fn shuffle<T>(&mut self, items: &mut [T], partners: &mut Vec<u16>) {
        let n = items.len();
        assert!(
            n <= 1 << 16,
            "SampleRng::shuffle handles at most 65,536 items, got {n}"
        );
        if n < 2 {
            return;
        }
        partners.clear();
        let mut words = [0u32; 512];
        let (mut at, mut available) = (0, 0);
        if let Some(spare) = self.spare.take() {
            words[0] = spare;
            available = 1;
        }
        for i in (1..n).rev() {
            let bound = i as u32 + 1;
            loop {
                if at == available {
                    for pair in words.chunks_exact_mut(2) {
                        let w = self.next_u64();
                        pair[0] = w as u32;
                        pair[1] = (w >> 32) as u32;
                    }
                    (at, available) = (0, words.len());
                }
                let product = u64::from(words[at]) * u64::from(bound);
                at += 1;
                // Lemire's rejection: the division runs only in the rare case low < bound.
                if (product as u32) >= bound || (product as u32) >= bound.wrapping_neg() % bound {
                    partners.push((product >> 32) as u16);
                    break;
                }
            }
        }
        for (i, &j) in (1..n).rev().zip(partners.iter()) {
            debug_assert!(usize::from(j) <= i);
            items.swap(i, usize::from(j));
        }
    }

    /// Fills `words` with the next 64-bit outputs.
    pub fn fill_u64(&mut self, words: &mut [u64]) {
        for w in words {
            *w = self.next_u64();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors published with the Random123 library (kat_vectors, philox4x32_10).
    #[test]
    fn known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn sample_rng_shuffle_equals_the_plain_fisher_yates_loop() {
        // 3,000 shuffles of 4,096 meet a rejected draw several times (about 0.2% of shuffles each).
        let cases = [0usize, 1, 2, 3, 17]
            .into_iter()
            .map(|n| (n, 1))
            .chain((0..3000).map(|c| (4096, c)));
        for (n, cell) in cases {
            let mut fast: Vec<u32> = (0..n as u32).collect();
            let mut plain = fast.clone();
            SampleRng::new(3, Domain::ClonePermutation, cell, 1)
                .shuffle(&mut fast, &mut Vec::new());
            let mut rng = SampleRng::new(3, Domain::ClonePermutation, cell, 1);
            for i in (1..n).rev() {
                let j = rng.below(i as u32 + 1) as usize;
                plain.swap(i, j);
            }
            assert_eq!(fast, plain, "n = {n}");
        }
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut stream = PhiloxStream::new(7, Domain::Synth, 0, 0);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let v = stream.below(10);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn shuffle_is_a_permutation_and_depends_on_the_key() {
        let mut a: Vec<u32> = (0..100).collect();
        let mut b = a.clone();
        PhiloxStream::new(1, Domain::ClonePermutation, 5, 0).shuffle(&mut a);
        PhiloxStream::new(1, Domain::ClonePermutation, 5, 1).shuffle(&mut b);
        assert_ne!(a, b);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }
}
