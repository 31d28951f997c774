//! Byte sizes on the command line (`512M`, `4G`, `2MiB`, `1GiB`, `4096`) and page sizes.

use std::fmt;
use std::str::FromStr;

use migrate_core::Backing;

/// A size in bytes, parsed with binary multipliers (`K` = 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub usize);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_size(s).map(Size)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

/// Parses `N[K|M|G|T][i][B]` (case-insensitive, binary multipliers).
pub fn parse_size(input: &str) -> Result<usize, String> {
    let s = input.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "invalid size {input:?}: expected a number with an optional K, M, G or T suffix (e.g. 512M, 1GiB, 4096)"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {input:?}: number too large"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "invalid size {input:?}: unknown unit {suffix:?} (expected K, M, G, T, KiB, MiB, GiB, TiB or nothing)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| format!("invalid size {input:?}: too large"))
}

/// `1073741824` → `1GiB`, `3145728` → `3MiB`, `1000` → `1000B`.
pub fn format_size(v: usize) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if v >= 1 << shift && v.is_multiple_of(1 << shift) {
            return format!("{}{unit}", v >> shift);
        }
    }
    format!("{v}B")
}

/// Host page size of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB anonymous pages.
    Small,
    /// 2 MiB hugetlb pages.
    Huge,
    /// 2 MiB transparent huge pages.
    Thp,
}

impl FromStr for PageSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "4k" | "4kib" | "4096" => Ok(PageSize::Small),
            "2m" | "2mib" | "hugetlb" => Ok(PageSize::Huge),
            "thp" => Ok(PageSize::Thp),
            o => Err(format!(
                "unknown page size {o:?} (expected 4k, 2m (hugetlb) or thp)"
            )),
        }
    }
}

impl PageSize {
    pub fn backing(self) -> Backing {
        match self {
            PageSize::Small => Backing::Anonymous,
            PageSize::Huge => Backing::HugeTlb,
            PageSize::Thp => Backing::TransparentHuge,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PageSize::Small => "4k",
            PageSize::Huge => "2m",
            PageSize::Thp => "thp",
        }
    }

    pub fn bytes(self) -> usize {
        self.backing().host_page_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("3mb"), Ok(3 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size(" 8M "), Ok(8 << 20));
        assert_eq!(parse_size("100B"), Ok(100));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "M", "12Q", "1.5G", "-1", "4 G", "0x10", "G4"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("invalid size"), "{bad:?}: {e}");
        }
        assert!(parse_size("12Q").unwrap_err().contains("unknown unit"));
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("20000000T").unwrap_err().contains("too large"));
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(1 << 30), "1GiB");
        assert_eq!(format_size(3 << 20), "3MiB");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(1536 << 10), "1536KiB");
        assert_eq!(Size(32 << 20).to_string(), "32MiB");
    }

    #[test]
    fn page_sizes() {
        assert_eq!(
            "4k".parse::<PageSize>().unwrap().backing(),
            Backing::Anonymous
        );
        assert_eq!(
            "2m".parse::<PageSize>().unwrap().backing(),
            Backing::HugeTlb
        );
        assert_eq!(
            "THP".parse::<PageSize>().unwrap().backing(),
            Backing::TransparentHuge
        );
        assert_eq!("2m".parse::<PageSize>().unwrap().bytes(), 2 << 20);
        assert!("8k".parse::<PageSize>().is_err());
    }
}
