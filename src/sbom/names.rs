//! How a store path is named in an SBOM: name and version as `builtins.parseDrvName` splits
//! them, its `pkg:nix/…` package URL, its NAR hash as hex, and the time and serial the formats
//! ask for.

use anyhow::{bail, Result};
use base64::Engine as _;

/// nix's base-32 alphabet (no e, o, t, u).
const NIX32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// `(name, version)` as `builtins.parseDrvName` splits `s`: the version starts after the first
/// `-` that is followed by a character other than an ASCII letter; no such `-`: no version.
pub(crate) fn parse_drv_name(s: &str) -> (&str, &str) {
    let bytes = s.as_bytes();
    for i in 0..bytes.len() {
        if bytes[i] == b'-' && i + 1 < bytes.len() && !bytes[i + 1].is_ascii_alphabetic() {
            return (&s[..i], &s[i + 1..]);
        }
    }
    (s, "")
}

/// `HASH-NAME` of `/nix/store/HASH-NAME` → `NAME`.
pub(crate) fn store_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name,
        _ => base,
    }
}

/// The hash part of a store path (`HASH` of `/nix/store/HASH-NAME`).
pub(crate) fn store_hash(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split_once('-').map_or(base, |(hash, _)| hash)
}

/// `pkg:nix/NAME@VERSION`. The purl spec has no registered `nix` type yet; this follows the
/// proposal under review (package-url/purl-spec#877): the package name, and its version.
pub(crate) fn purl(name: &str, version: Option<&str>) -> String {
    let mut purl = format!("pkg:nix/{}", percent_encode(name));
    if let Some(version) = version.filter(|v| !v.is_empty()) {
        purl.push('@');
        purl.push_str(&percent_encode(version));
    }
    purl
}

/// Percent-encodes all but purl's unreserved characters.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The hex digest of a nix SHA-256 hash as nix prints it: `sha256-BASE64` (SRI),
/// `sha256:NIX32`, `sha256:HEX` or a bare NIX32 of 52 characters.
pub(crate) fn sha256_hex(hash: &str) -> Result<String> {
    let bytes = if let Some(b64) = hash.strip_prefix("sha256-") {
        base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| anyhow::anyhow!("{hash:?}: {e}"))?
    } else {
        let text = hash.strip_prefix("sha256:").unwrap_or(hash);
        match text.len() {
            64 => hex::decode(text).map_err(|e| anyhow::anyhow!("{hash:?}: {e}"))?,
            52 => nix32_decode(text)?,
            _ => bail!("{hash:?} is not a SHA-256 hash nix prints"),
        }
    };
    if bytes.len() != 32 {
        bail!("{hash:?} is not a SHA-256 hash ({} bytes)", bytes.len());
    }
    Ok(hex::encode(bytes))
}

/// nix's base-32: the last character holds the lowest bits of the first byte.
fn nix32_decode(text: &str) -> Result<Vec<u8>> {
    let size = text.len() * 5 / 8;
    let mut out = vec![0u8; size];
    for (k, c) in text.bytes().enumerate() {
        let Some(digit) = NIX32.iter().position(|&d| d == c) else {
            bail!("{text:?} is not nix base-32 ({:?})", c as char);
        };
        let n = text.len() - 1 - k;
        let (i, j) = (n * 5 / 8, n * 5 % 8);
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        if i + 1 < size {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            bail!("{text:?} is not nix base-32 of {size} bytes");
        }
    }
    Ok(out)
}

/// RFC 3339 UTC, to the second, of `secs` since the epoch.
pub(crate) fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rest = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// A version-4-shaped UUID made of `bytes` (random, or a digest for a reproducible document).
pub(crate) fn uuid(bytes: [u8; 16]) -> String {
    let mut b = bytes;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cases of nix's own tests of `DrvName` and `builtins.parseDrvName`, and the edges
    /// of its rule.
    #[test]
    fn names_split_as_parse_drv_name_does() {
        let cases = [
            ("hello-2.12.1", ("hello", "2.12.1")),
            ("nix-0.25pre1234", ("nix", "0.25pre1234")),
            ("foo-bar-1.0", ("foo-bar", "1.0")),
            ("python3.11-requests-2.31.0", ("python3.11-requests", "2.31.0")),
            ("novers", ("novers", "")),
            ("busybox-1.35.0", ("busybox", "1.35.0")),
            ("glibc-2.39-52-bin", ("glibc", "2.39-52-bin")),
            ("foo-1a", ("foo", "1a")),
            ("a-", ("a-", "")),
            ("-1.0", ("", "1.0")),
            ("abc-_x", ("abc", "_x")),
            ("abc-Xyz-2", ("abc-Xyz", "2")),
            ("hello.tar.gz", ("hello.tar.gz", "")),
            ("", ("", "")),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_drv_name(input), expected, "{input:?}");
        }
    }

    #[test]
    fn store_names_and_hashes() {
        let path = "/nix/store/0a1b2c3d4e5f6g7h8i9j0k1l2m3n4p5q-hello-2.12.1";
        assert_eq!(store_name(path), "hello-2.12.1");
        assert_eq!(store_hash(path), "0a1b2c3d4e5f6g7h8i9j0k1l2m3n4p5q");
    }

    #[test]
    fn purls_encode_what_is_not_unreserved() {
        assert_eq!(purl("hello", Some("2.12.1")), "pkg:nix/hello@2.12.1");
        assert_eq!(purl("novers", Some("")), "pkg:nix/novers");
        assert_eq!(purl("g++", None), "pkg:nix/g%2B%2B");
        assert_eq!(purl("a b/c", Some("1:2")), "pkg:nix/a%20b%2Fc@1%3A2");
    }

    #[test]
    fn nar_hashes_become_hex() {
        // SHA-256 of "", as nix prints it in each form (`nix hash convert`).
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(sha256_hex("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=").unwrap(), hex);
        assert_eq!(sha256_hex("sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").unwrap(), hex);
        assert_eq!(sha256_hex(&format!("sha256:{hex}")).unwrap(), hex);
        assert!(sha256_hex("sha256:eeee").is_err());
        assert!(sha256_hex("sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7e").is_err(), "e is not nix32");
        assert!(sha256_hex("sha512-AAAA").is_err());
    }

    #[test]
    fn times_and_uuids_have_their_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_600_000), "2026-11-25T09:46:40Z");
        assert_eq!(uuid([0xff; 16]), "ffffffff-ffff-4fff-bfff-ffffffffffff");
    }
}
