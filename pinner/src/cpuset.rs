//! Sets of CPU ids in the kernel's list syntax ("0-3,8,10-11").

use std::fmt;

/// A bitset: CPU n is bit n%64 of word n/64. Trailing zero words are
/// trimmed, so equal sets have equal representations.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct CpuSet(Vec<u64>);

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

    fn trimmed(mut words: Vec<u64>) -> CpuSet {
        while words.last() == Some(&0) {
            words.pop();
        }
        CpuSet(words)
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn contains(&self, cpu: u32) -> bool {
        self.0
            .get(cpu as usize / 64)
            .is_some_and(|w| w & (1 << (cpu % 64)) != 0)
    }
    pub fn insert(&mut self, cpu: u32) {
        let word = cpu as usize / 64;
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << (cpu % 64);
    }
    pub fn remove(&mut self, cpu: u32) {
        if let Some(w) = self.0.get_mut(cpu as usize / 64) {
            *w &= !(1 << (cpu % 64));
            while self.0.last() == Some(&0) {
                self.0.pop();
            }
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().enumerate().flat_map(|(i, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros();
                rest &= rest - 1;
                Some(i as u32 * 64 + bit)
            })
        })
    }
    pub fn first(&self) -> Option<u32> {
        self.iter().next()
    }
    pub fn union(&self, other: &CpuSet) -> CpuSet {
        let (long, short) = if self.0.len() >= other.0.len() {
            (self, other)
        } else {
            (other, self)
        };
        let mut words = long.0.clone();
        for (w, o) in words.iter_mut().zip(&short.0) {
            *w |= o;
        }
        CpuSet(words)
    }
    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        let words = self
            .0
            .iter()
            .enumerate()
            .map(|(i, w)| w & !other.0.get(i).copied().unwrap_or(0))
            .collect();
        CpuSet::trimmed(words)
    }
    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        CpuSet::trimmed(self.0.iter().zip(&other.0).map(|(a, b)| a & b).collect())
    }
    /// |self ∩ other| without building the intersection.
    pub fn overlap(&self, other: &CpuSet) -> usize {
        self.0
            .iter()
            .zip(&other.0)
            .map(|(a, b)| (a & b).count_ones() as usize)
            .sum()
    }
    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.0
            .iter()
            .enumerate()
            .all(|(i, w)| w & !other.0.get(i).copied().unwrap_or(0) == 0)
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
