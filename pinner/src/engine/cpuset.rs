//! Sets of CPU ids in the kernel's list syntax ("0-3,8,10-11").

use std::fmt;

/// 64 CPUs starting at `index * 64`; never stored with `bits == 0`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
struct Block {
    index: u32,
    bits: u64,
}

/// Blocks held without a heap allocation: a core's pair of SMT threads
/// (Linux numbers them a socket's worth of ids apart, so 0 and 1024 on a
/// 2,048-CPU host) or a node's two id ranges. Placement builds a set per
/// vCPU, so this is what keeps planning a large host cheap.
const INLINE: usize = 2;

/// A set of CPU ids: the non-empty 64-CPU blocks only, sorted by index, so
/// a set costs its number of occupied blocks however far apart its CPUs are.
/// Up to `INLINE` blocks live in `inline`; more move to `spill` (then
/// `inline_len` is 0). Equality and hashing see only the blocks.
#[derive(Clone, Default)]
pub struct CpuSet {
    inline: [Block; INLINE],
    inline_len: u8,
    spill: Vec<Block>,
}

/// Ids above this are refused: no host has them, and a typo like "0-99999999"
/// must not allocate a giant set.
pub const MAX_CPU_ID: u32 = 65_535;

/// Why a CPU list does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    #[error("range \"{0}\" runs backwards")]
    Backwards(String),
    #[error("\"{0}\" is not a CPU number")]
    NotANumber(String),
    #[error("CPU {0} is beyond the supported {MAX_CPU_ID}")]
    TooHigh(u32),
}

impl CpuSet {
    pub fn new() -> CpuSet {
        CpuSet::default()
    }

    /// Parses "0-3,8"; whitespace and NUL padding (seen in real sysfs files)
    /// are ignored; "" is the empty set.
    pub fn parse(text: &str) -> Result<CpuSet, CpuListError> {
        let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        let mut set = CpuSet::new();
        if text.is_empty() {
            return Ok(set);
        }
        for part in text.split(',') {
            let part = part.trim();
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (parse_id(a)?, parse_id(b)?),
                None => {
                    let id = parse_id(part)?;
                    (id, id)
                }
            };
            if lo > hi {
                return Err(CpuListError::Backwards(part.to_string()));
            }
            for cpu in lo..=hi {
                set.insert(cpu);
            }
        }
        Ok(set)
    }

    fn blocks(&self) -> &[Block] {
        if self.spill.is_empty() {
            &self.inline[..usize::from(self.inline_len)]
        } else {
            &self.spill
        }
    }

    fn blocks_mut(&mut self) -> &mut [Block] {
        if self.spill.is_empty() {
            &mut self.inline[..usize::from(self.inline_len)]
        } else {
            &mut self.spill
        }
    }

    /// Puts `block` at position `at` of the blocks (keeping them sorted is
    /// the caller's part), moving them to the heap when `inline` is full.
    fn insert_block(&mut self, at: usize, block: Block) {
        let len = usize::from(self.inline_len);
        if !self.spill.is_empty() {
            self.spill.insert(at, block);
        } else if len < INLINE {
            self.inline.copy_within(at..len, at + 1);
            self.inline[at] = block;
            self.inline_len += 1;
        } else {
            let mut spill = Vec::with_capacity(INLINE * 2);
            spill.extend_from_slice(&self.inline[..at]);
            spill.push(block);
            spill.extend_from_slice(&self.inline[at..]);
            self.spill = spill;
            self.inline_len = 0;
        }
    }

    /// Appends a block above every block held; empty blocks are skipped.
    fn push_block(&mut self, block: Block) {
        if block.bits != 0 {
            self.insert_block(self.blocks().len(), block);
        }
    }

    /// Where the block holding `cpu` is (Ok) or would go (Err).
    fn find(&self, cpu: u32) -> Result<usize, usize> {
        self.blocks().binary_search_by_key(&(cpu / 64), |b| b.index)
    }

    pub fn len(&self) -> usize {
        self.blocks()
            .iter()
            .map(|b| b.bits.count_ones() as usize)
            .sum()
    }
    pub fn is_empty(&self) -> bool {
        self.blocks().is_empty()
    }
    pub fn contains(&self, cpu: u32) -> bool {
        self.find(cpu)
            .is_ok_and(|i| self.blocks()[i].bits & (1 << (cpu % 64)) != 0)
    }
    pub fn insert(&mut self, cpu: u32) {
        let bit = 1 << (cpu % 64);
        // Ascending inserts (parsing, collecting) land in or after the last block.
        let at = match self.blocks().last() {
            Some(last) if last.index == cpu / 64 => Ok(self.blocks().len() - 1),
            Some(last) if last.index < cpu / 64 => Err(self.blocks().len()),
            _ => self.find(cpu),
        };
        match at {
            Ok(i) => self.blocks_mut()[i].bits |= bit,
            Err(i) => self.insert_block(
                i,
                Block {
                    index: cpu / 64,
                    bits: bit,
                },
            ),
        }
    }
    pub fn remove(&mut self, cpu: u32) {
        let Ok(i) = self.find(cpu) else { return };
        let block = &mut self.blocks_mut()[i];
        block.bits &= !(1 << (cpu % 64));
        if block.bits == 0 {
            if self.spill.is_empty() {
                let len = usize::from(self.inline_len);
                self.inline.copy_within(i + 1..len, i);
                self.inline_len -= 1;
            } else {
                self.spill.remove(i);
            }
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.blocks().iter().flat_map(|&Block { index, bits }| {
            let mut rest = bits;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros();
                rest &= rest - 1;
                Some(index * 64 + bit)
            })
        })
    }
    pub fn first(&self) -> Option<u32> {
        self.iter().next()
    }

    /// Walks both sets' blocks in index order, combining those with the same
    /// index and keeping a side's lone blocks where asked.
    fn merge(
        &self,
        other: &CpuSet,
        keep_mine: bool,
        keep_theirs: bool,
        both: impl Fn(u64, u64) -> u64,
    ) -> CpuSet {
        let (a, b) = (self.blocks(), other.blocks());
        let (mut i, mut j) = (0, 0);
        let mut out = CpuSet::new();
        while i < a.len() && j < b.len() {
            match a[i].index.cmp(&b[j].index) {
                std::cmp::Ordering::Less => {
                    if keep_mine {
                        out.push_block(a[i]);
                    }
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    if keep_theirs {
                        out.push_block(b[j]);
                    }
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    out.push_block(Block {
                        index: a[i].index,
                        bits: both(a[i].bits, b[j].bits),
                    });
                    i += 1;
                    j += 1;
                }
            }
        }
        let rest = match (keep_mine, keep_theirs) {
            (true, _) if i < a.len() => &a[i..],
            (_, true) if j < b.len() => &b[j..],
            _ => &[],
        };
        for &block in rest {
            out.push_block(block);
        }
        out
    }

    pub fn union(&self, other: &CpuSet) -> CpuSet {
        self.merge(other, true, true, |x, y| x | y)
    }
    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        self.merge(other, true, false, |x, y| x & !y)
    }
    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        self.merge(other, false, false, |x, y| x & y)
    }
    /// |self ∩ other| without building the intersection.
    pub fn overlap(&self, other: &CpuSet) -> usize {
        let (a, b) = (self.blocks(), other.blocks());
        let (mut i, mut j, mut count) = (0, 0, 0);
        while i < a.len() && j < b.len() {
            match a[i].index.cmp(&b[j].index) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    count += (a[i].bits & b[j].bits).count_ones() as usize;
                    i += 1;
                    j += 1;
                }
            }
        }
        count
    }
    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.overlap(other) == self.len()
    }
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }

    /// The kernel's hex CPU mask (`/proc/irq/default_smp_affinity`,
    /// irqbalance's IRQBALANCE_BANNED_CPUS): 32-bit words, most significant
    /// first, separated by commas. None when it is not one.
    pub fn from_hex_mask(text: &str) -> Option<CpuSet> {
        let mut set = CpuSet::new();
        for (index, word) in text.trim().rsplit(',').enumerate() {
            let word = word.trim();
            if word.is_empty() || word.len() > 8 {
                return None;
            }
            let bits = u32::from_str_radix(word, 16).ok()?;
            for bit in (0..32).filter(|b| bits & (1 << b) != 0) {
                set.insert(index as u32 * 32 + bit);
            }
        }
        Some(set)
    }

    /// As the kernel prints a mask: every word 8 digits ("00000003").
    pub fn to_hex_mask(&self) -> String {
        let words = self.iter().max().map_or(1, |last| last as usize / 32 + 1);
        let mut bits = vec![0u32; words];
        for cpu in self.iter() {
            bits[cpu as usize / 32] |= 1 << (cpu % 32);
        }
        bits.iter()
            .rev()
            .map(|w| format!("{w:08x}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// libvirt's cpumap: one bit per CPU, CPU 0 in the lowest bit of byte 0.
    pub fn to_cpumap(&self, host_cpus: u32) -> Vec<u8> {
        let mut map = vec![0u8; (host_cpus as usize).div_ceil(8).max(1)];
        for cpu in self.iter() {
            let byte = cpu as usize / 8;
            if byte < map.len() {
                map[byte] |= 1 << (cpu % 8);
            }
        }
        map
    }
}

impl PartialEq for CpuSet {
    fn eq(&self, other: &Self) -> bool {
        self.blocks() == other.blocks()
    }
}

impl Eq for CpuSet {}

impl std::hash::Hash for CpuSet {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.blocks().hash(state);
    }
}

/// Ordered like the sorted lists of their CPUs.
impl Ord for CpuSet {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.iter().cmp(other.iter())
    }
}

impl PartialOrd for CpuSet {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

fn parse_id(text: &str) -> Result<u32, CpuListError> {
    let text = text.trim();
    let id: u32 = text
        .parse()
        .map_err(|_| CpuListError::NotANumber(text.to_string()))?;
    if id > MAX_CPU_ID {
        return Err(CpuListError::TooHigh(id));
    }
    Ok(id)
}

impl FromIterator<u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut set = CpuSet::new();
        for cpu in iter {
            set.insert(cpu);
        }
        set
    }
}

/// Kernel list syntax, ranges folded: "0-3,8".
impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cpus = self.iter().peekable();
        let mut first = true;
        while let Some(lo) = cpus.next() {
            let mut hi = lo;
            while cpus.peek() == Some(&(hi + 1)) {
                hi = cpus.next().unwrap_or(hi);
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_kernel_hex_masks() {
        let set = |s: &str| CpuSet::parse(s).unwrap();
        assert_eq!(set("0-1").to_hex_mask(), "00000003");
        assert_eq!(set("4,7").to_hex_mask(), "00000090");
        assert_eq!(set("0,32-33").to_hex_mask(), "00000003,00000001");
        assert_eq!(CpuSet::new().to_hex_mask(), "00000000");
        for text in ["ff", "00000003,00000001", "0"] {
            let mask = CpuSet::from_hex_mask(text).unwrap();
            assert_eq!(CpuSet::from_hex_mask(&mask.to_hex_mask()), Some(mask));
        }
        assert_eq!(CpuSet::from_hex_mask("f\n"), Some(set("0-3")));
        for bad in ["", "xyz", "1,,2", "123456789"] {
            assert_eq!(CpuSet::from_hex_mask(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parses_and_formats_kernel_lists() {
        let set = CpuSet::parse("0-3, 8,10-11\n\0\0").unwrap();
        assert_eq!(set.to_vec(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(set.to_string(), "0-3,8,10-11");
        assert_eq!(CpuSet::parse("").unwrap(), CpuSet::new());
        assert_eq!(CpuSet::parse("5").unwrap().to_string(), "5");
    }

    #[test]
    fn rejects_bad_lists_with_reason() {
        assert!(CpuSet::parse("3-1")
            .unwrap_err()
            .to_string()
            .contains("backwards"));
        assert!(CpuSet::parse("a")
            .unwrap_err()
            .to_string()
            .contains("not a CPU number"));
        assert!(CpuSet::parse("0-99999999")
            .unwrap_err()
            .to_string()
            .contains("beyond"));
        assert!(CpuSet::parse("1,,2").is_err());
    }

    #[test]
    fn set_algebra_keeps_a_canonical_form() {
        let a = CpuSet::parse("1,64,130").unwrap();
        let b = CpuSet::parse("130").unwrap();
        assert_eq!(
            a.difference(&CpuSet::parse("130").unwrap()),
            CpuSet::parse("1,64").unwrap()
        );
        assert_eq!(
            a.intersection(&CpuSet::parse("1").unwrap()),
            CpuSet::parse("1").unwrap()
        );
        assert_eq!(b.union(&CpuSet::parse("1").unwrap()).to_string(), "1,130");
        assert_eq!(a.overlap(&CpuSet::parse("64-200").unwrap()), 2);
        assert!(b.is_subset(&a) && !a.is_subset(&b));
        let mut c = CpuSet::parse("200").unwrap();
        c.remove(200);
        assert_eq!(c, CpuSet::new(), "emptied sets equal the empty set");
        assert!(
            CpuSet::parse("0,5").unwrap() < CpuSet::parse("1").unwrap(),
            "ordered like sorted lists"
        );
        assert_eq!(a.len(), 3);
        assert_eq!(a.first(), Some(1));
    }

    #[test]
    fn far_apart_cpus_take_a_block_each_and_compare_by_content() {
        // A core's SMT pair on a 2,048-CPU host: two blocks, held inline.
        let pair: CpuSet = [1024, 0].into_iter().collect();
        assert_eq!(pair.blocks().len(), 2);
        assert!(pair.spill.is_empty(), "two blocks stay inline");
        assert_eq!(pair.to_string(), "0,1024");
        // A third block moves to the heap; removing it again gives an equal
        // set (and hash) whichever storage holds it.
        let mut three = pair.clone();
        three.insert(4000);
        assert_eq!(three.spill.len(), 3);
        three.remove(4000);
        assert_eq!(three, pair);
        let hash = |s: &CpuSet| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            s.hash(&mut h);
            h.finish()
        };
        assert_eq!(hash(&three), hash(&pair));
        assert_eq!(
            CpuSet::parse("0-65535").unwrap().len(),
            65_536,
            "the largest set is a block per 64 CPUs"
        );
    }

    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// Ids clustered in a few far-apart blocks, so sets of every storage
    /// (empty, inline, spilled) and every overlap between them come up.
    fn ids() -> impl Strategy<Value = BTreeSet<u32>> {
        proptest::collection::btree_set(
            (0u32..6, 0u32..70).prop_map(|(block, off)| block * 1000 + off),
            0..40,
        )
    }

    proptest! {
        #[test]
        fn behaves_like_a_sorted_set_of_ids(a in ids(), b in ids(), probe in 0u32..6100) {
            let (x, y): (CpuSet, CpuSet) = (a.iter().copied().collect(), b.iter().copied().collect());
            let of = |s: &CpuSet| s.iter().collect::<BTreeSet<u32>>();
            prop_assert_eq!(of(&x), a.clone());
            prop_assert_eq!(x.len(), a.len());
            prop_assert_eq!(x.is_empty(), a.is_empty());
            prop_assert_eq!(x.first(), a.first().copied());
            prop_assert_eq!(x.contains(probe), a.contains(&probe));
            prop_assert_eq!(of(&x.union(&y)), a.union(&b).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(of(&x.intersection(&y)), a.intersection(&b).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(of(&x.difference(&y)), a.difference(&b).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(x.overlap(&y), a.intersection(&b).count());
            prop_assert_eq!(x.is_subset(&y), a.is_subset(&b));
            prop_assert_eq!(x == y, a == b);
            prop_assert_eq!(x.cmp(&y), a.iter().cmp(b.iter()));
            prop_assert_eq!(CpuSet::parse(&x.to_string()).unwrap(), x.clone());
            // Built in another order and through removals: the same set.
            let mut z: CpuSet = a.iter().rev().copied().chain(b.iter().copied()).collect();
            for cpu in b.difference(&a) {
                z.remove(*cpu);
            }
            z.remove(probe);
            let mut expected = a.clone();
            expected.remove(&probe);
            prop_assert_eq!(of(&z), expected.clone());
            let mut w: CpuSet = expected.iter().copied().collect();
            prop_assert_eq!(&z, &w);
            w.insert(probe);
            z.insert(probe);
            prop_assert_eq!(z, w);
        }
    }

    #[test]
    fn cpumap_sets_one_bit_per_cpu() {
        let set = CpuSet::parse("0,9,15").unwrap();
        assert_eq!(set.to_cpumap(16), vec![0b0000_0001, 0b1000_0010]);
        assert_eq!(CpuSet::parse("1").unwrap().to_cpumap(2), vec![0b10]);
    }
}
