//! Weighted Maglev lookup tables (Eisenbud et al., NSDI 2016).
//!
//! Each backend walks its own permutation of the table, derived from its identity only, so the
//! table changes little when other backends come or go. Weights set how many turns a backend
//! takes per round: a backend of weight w claims w/max_weight slots per round on average.

/// Something the table can hold: a stable identity (for the permutation) and a weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<T> {
    pub value: T,
    /// Hash of the backend's identity (address and port), independent of its position.
    pub identity: u64,
    pub weight: u32,
}

/// Whether `n` is a prime, for validating table sizes.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= n as u64 {
        if (n as u64).is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// 64-bit FNV-1a, stable across releases and platforms (the table must be too).
pub fn identity_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Builds a table of `size` slots (a prime). Returns `None` when no entry has a weight.
pub fn build<T: Copy>(entries: &[Entry<T>], size: u32) -> Option<Vec<T>> {
    debug_assert!(is_prime(size), "Maglev table sizes must be prime");
    let max_weight = entries.iter().map(|e| e.weight).max().filter(|w| *w > 0)? as u64;
    let size64 = size as u64;
    let permutations: Vec<(u64, u64)> = entries
        .iter()
        .map(|e| {
            let offset = e.identity % size64;
            let skip = (e.identity.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15) % (size64 - 1) + 1;
            (offset, skip)
        })
        .collect();

    let mut table: Vec<Option<T>> = vec![None; size as usize];
    let mut next = vec![0u64; entries.len()];
    let mut credit = vec![0u64; entries.len()];
    let mut filled = 0u32;
    while filled < size {
        for (i, entry) in entries.iter().enumerate() {
            credit[i] += entry.weight as u64;
            while credit[i] >= max_weight && filled < size {
                credit[i] -= max_weight;
                let (offset, skip) = permutations[i];
                let slot = loop {
                    let candidate = ((offset + next[i] * skip) % size64) as usize;
                    next[i] += 1;
                    if table[candidate].is_none() {
                        break candidate;
                    }
                };
                table[slot] = Some(entry.value);
                filled += 1;
            }
        }
    }
    Some(
        table
            .into_iter()
            .map(|slot| slot.expect("every slot is filled"))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(weights: &[u32]) -> Vec<Entry<u32>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Entry {
                value: i as u32,
                identity: identity_hash(&(i as u32).to_be_bytes()),
                weight: *w,
            })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        table.iter().for_each(|v| counts[*v as usize] += 1);
        counts
    }

    #[test]
    fn equal_backends_are_balanced_within_five_percent() {
        let size = 65_537;
        let table = build(&entries(&[1; 100]), size).unwrap();
        let counts = shares(&table, 100);
        let mean = size as f64 / 100.0;
        let busiest = *counts.iter().max().unwrap() as f64;
        assert!(busiest <= 1.05 * mean, "busiest {busiest} vs mean {mean}");
    }

    #[test]
    fn removing_one_backend_moves_few_other_slots() {
        let size = 65_537;
        let n = 50;
        let all = entries(&vec![1; n]);
        let before = build(&all, size).unwrap();
        let removed = 17u32;
        let rest: Vec<_> = all.iter().copied().filter(|e| e.value != removed).collect();
        let after = build(&rest, size).unwrap();
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != removed && b != a)
            .count();
        let bound = (1.0 / n as f64 + 0.02) * size as f64;
        assert!((moved as f64) <= bound, "moved {moved} > {bound}");
    }

    #[test]
    fn weights_are_honoured_within_two_percent() {
        let size = 65_537;
        let weights = [70, 30, 5, 0];
        let table = build(&entries(&weights), size).unwrap();
        let counts = shares(&table, weights.len());
        let total: u32 = weights.iter().sum();
        for (i, w) in weights.iter().enumerate() {
            let expected = *w as f64 / total as f64;
            let got = counts[i] as f64 / size as f64;
            assert!(
                (got - expected).abs() <= 0.02,
                "backend {i}: {got} vs {expected}"
            );
        }
        assert_eq!(counts[3], 0, "weight 0 gets no slot");
    }

    #[test]
    fn all_zero_weights_build_no_table() {
        assert!(build(&entries(&[0, 0]), 13).is_none());
        assert!(build::<u32>(&[], 13).is_none());
    }

    #[test]
    fn primes() {
        assert!(is_prime(65_537) && is_prime(4099) && is_prime(2));
        assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0));
    }
}
