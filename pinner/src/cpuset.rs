//! Sets of CPU ids in the kernel's list syntax ("0-3,8,10-11").

use std::fmt;

/// A bitset holding only the words from the first set one: CPU n is bit
/// n%64 of word n/64, stored at `words[n/64 - base]`. Kept canonical (no
/// zero word at either end, base 0 when empty) so equal sets compare equal,
/// and a set of one high CPU is one word.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct CpuSet {
    base: usize,
    words: Vec<u64>,
}

/// Ids above this are refused: no host has them, and a typo like "0-99999999"
/// must not allocate a giant set.
pub const MAX_CPU_ID: u32 = 65_535;

impl CpuSet {
    pub fn new() -> CpuSet {
        CpuSet::default()
    }

    /// Parses "0-3,8"; whitespace and NUL padding (seen in real sysfs files)
    /// are ignored; "" is the empty set.
    pub fn parse(text: &str) -> Result<CpuSet, String> {
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
                return Err(format!("range \"{part}\" runs backwards"));
            }
            for cpu in lo..=hi {
                set.insert(cpu);
            }
        }
        Ok(set)
    }

    /// Word `i` (absolute index), zero outside the stored span.
    fn word(&self, i: usize) -> u64 {
        i.checked_sub(self.base)
            .and_then(|j| self.words.get(j))
            .copied()
            .unwrap_or(0)
    }

    fn end(&self) -> usize {
        self.base + self.words.len()
    }

    /// Builds the canonical form of words starting at `base`.
    fn from_words(base: usize, mut words: Vec<u64>) -> CpuSet {
        while words.last() == Some(&0) {
            words.pop();
        }
        let lead = words.iter().take_while(|w| **w == 0).count();
        if lead == words.len() {
            return CpuSet::new();
        }
        words.drain(..lead);
        CpuSet {
            base: base + lead,
            words,
        }
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
    pub fn contains(&self, cpu: u32) -> bool {
        self.word(cpu as usize / 64) & (1 << (cpu % 64)) != 0
    }
    pub fn insert(&mut self, cpu: u32) {
        let w = cpu as usize / 64;
        if self.words.is_empty() {
            self.base = w;
            self.words.push(0);
        } else if w < self.base {
            self.words
                .splice(0..0, std::iter::repeat_n(0, self.base - w));
            self.base = w;
        } else if w >= self.end() {
            self.words.resize(w - self.base + 1, 0);
        }
        self.words[w - self.base] |= 1 << (cpu % 64);
    }
    pub fn remove(&mut self, cpu: u32) {
        let w = cpu as usize / 64;
        if w >= self.base && w < self.end() {
            self.words[w - self.base] &= !(1 << (cpu % 64));
            if self.words[0] == 0 || self.words.last() == Some(&0) {
                *self = CpuSet::from_words(self.base, std::mem::take(&mut self.words));
            }
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let base = self.base;
        self.words.iter().enumerate().flat_map(move |(i, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros();
                rest &= rest - 1;
                Some(((base + i) * 64) as u32 + bit)
            })
        })
    }
    pub fn first(&self) -> Option<u32> {
        self.iter().next()
    }
    pub fn union(&self, other: &CpuSet) -> CpuSet {
        if other.is_empty() {
            return self.clone();
        }
        if self.is_empty() {
            return other.clone();
        }
        let (lo, hi) = (self.base.min(other.base), self.end().max(other.end()));
        CpuSet {
            base: lo,
            words: (lo..hi).map(|i| self.word(i) | other.word(i)).collect(),
        }
    }
    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        let words = (self.base..self.end())
            .map(|i| self.word(i) & !other.word(i))
            .collect();
        CpuSet::from_words(self.base, words)
    }
    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        let (lo, hi) = (self.base.max(other.base), self.end().min(other.end()));
        if lo >= hi {
            return CpuSet::new();
        }
        CpuSet::from_words(lo, (lo..hi).map(|i| self.word(i) & other.word(i)).collect())
    }
    /// |self ∩ other| without building the intersection.
    pub fn overlap(&self, other: &CpuSet) -> usize {
        let (lo, hi) = (self.base.max(other.base), self.end().min(other.end()));
        (lo..hi)
            .map(|i| (self.word(i) & other.word(i)).count_ones() as usize)
            .sum()
    }
    pub fn is_subset(&self, other: &CpuSet) -> bool {
        (self.base..self.end()).all(|i| self.word(i) & !other.word(i) == 0)
    }
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
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

fn parse_id(text: &str) -> Result<u32, String> {
    let id: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("\"{}\" is not a CPU number", text.trim()))?;
    if id > MAX_CPU_ID {
        return Err(format!("CPU {id} is beyond the supported {MAX_CPU_ID}"));
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
    fn parses_and_formats_kernel_lists() {
        let set = CpuSet::parse("0-3, 8,10-11\n\0\0").unwrap();
        assert_eq!(set.to_vec(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(set.to_string(), "0-3,8,10-11");
        assert_eq!(CpuSet::parse("").unwrap(), CpuSet::new());
        assert_eq!(CpuSet::parse("5").unwrap().to_string(), "5");
    }

    #[test]
    fn rejects_bad_lists_with_reason() {
        assert!(CpuSet::parse("3-1").unwrap_err().contains("backwards"));
        assert!(CpuSet::parse("a").unwrap_err().contains("not a CPU number"));
        assert!(CpuSet::parse("0-99999999").unwrap_err().contains("beyond"));
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
    fn cpumap_sets_one_bit_per_cpu() {
        let set = CpuSet::parse("0,9,15").unwrap();
        assert_eq!(set.to_cpumap(16), vec![0b0000_0001, 0b1000_0010]);
        assert_eq!(CpuSet::parse("1").unwrap().to_cpumap(2), vec![0b10]);
    }
}
