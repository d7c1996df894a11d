//! Sets of CPU ids in the kernel's list syntax ("0-3,8,10-11").

use std::collections::BTreeSet;
use std::fmt;

#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CpuSet(BTreeSet<u32>);

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
        let mut set = BTreeSet::new();
        if text.is_empty() {
            return Ok(CpuSet(set));
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
            set.extend(lo..=hi);
        }
        Ok(CpuSet(set))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }
    pub fn insert(&mut self, cpu: u32) {
        self.0.insert(cpu);
    }
    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.0.is_subset(&other.0)
    }
    pub fn remove(&mut self, cpu: u32) {
        self.0.remove(&cpu);
    }
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }
    pub fn first(&self) -> Option<u32> {
        self.0.first().copied()
    }
    pub fn union(&self, other: &CpuSet) -> CpuSet {
        CpuSet(self.0.union(&other.0).copied().collect())
    }
    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        CpuSet(self.0.difference(&other.0).copied().collect())
    }
    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        CpuSet(self.0.intersection(&other.0).copied().collect())
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
        CpuSet(iter.into_iter().collect())
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
    fn cpumap_sets_one_bit_per_cpu() {
        let set = CpuSet::parse("0,9,15").unwrap();
        assert_eq!(set.to_cpumap(16), vec![0b0000_0001, 0b1000_0010]);
        assert_eq!(CpuSet::parse("1").unwrap().to_cpumap(2), vec![0b10]);
    }
}
