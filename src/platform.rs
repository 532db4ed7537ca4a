//! Platforms as OCI names them (`linux/amd64`, `linux/arm64`, `linux/arm/v7`), parsed from what
//! people and engines write (`x86_64`, `aarch64`), and what nix calls them (`aarch64-linux`).

use std::fmt;

use anyhow::{bail, Result};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub(crate) struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// `OS/ARCH[/VARIANT]`; the architecture's other common names are accepted.
    pub(crate) fn parse(text: &str) -> Result<Platform> {
        let parts: Vec<&str> = text.trim().split('/').collect();
        let valid = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let (os, arch, variant) = match parts.as_slice() {
            [os, arch] if valid(os) && valid(arch) => (*os, *arch, None),
            [os, arch, variant] if valid(os) && valid(arch) && valid(variant) => (*os, *arch, Some(*variant)),
            _ => bail!("platform {text:?} is not OS/ARCH[/VARIANT] (e.g. linux/amd64, linux/arm64, linux/arm/v7)"),
        };
        Ok(Platform::new(os, arch, variant))
    }

    /// A comma-separated list (`linux/amd64,linux/arm64`), without repeats.
    pub(crate) fn parse_list(text: &str) -> Result<Vec<Platform>> {
        let mut platforms: Vec<Platform> = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let platform = Platform::parse(part)?;
            if platforms.contains(&platform) {
                bail!("platform {platform} is named twice in {text:?}");
            }
            platforms.push(platform);
        }
        if platforms.is_empty() {
            bail!("no platform in {text:?} (e.g. linux/amd64)");
        }
        Ok(platforms)
    }

    /// From the names engines and image configs use (`x86_64` for `amd64`, `aarch64` for
    /// `arm64`); arm64's `v8` variant is the default and dropped, as Docker does.
    pub(crate) fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        let os = os.to_ascii_lowercase();
        let (architecture, variant) = match (architecture.to_ascii_lowercase().as_str(), variant) {
            ("x86_64" | "x86-64" | "amd64", _) => ("amd64".to_string(), None),
            ("aarch64" | "arm64", Some("v8") | None) => ("arm64".to_string(), None),
            ("aarch64" | "arm64", Some(v)) => ("arm64".to_string(), Some(v.to_string())),
            ("armhf" | "armv7l", _) => ("arm".to_string(), Some("v7".to_string())),
            ("i386" | "i686" | "x86", _) => ("386".to_string(), None),
            (other, v) => (other.to_string(), v.map(str::to_string)),
        };
        Platform { os, architecture, variant }
    }

    /// Whether the OS and architecture are ones images are made for (Go's names, which OCI
    /// uses), so that a typo such as `linux/amd46` is caught where it is written.
    pub(crate) fn is_known(&self) -> bool {
        const OSES: &[&str] = &[
            "aix",
            "android",
            "darwin",
            "dragonfly",
            "freebsd",
            "illumos",
            "ios",
            "js",
            "linux",
            "netbsd",
            "openbsd",
            "plan9",
            "solaris",
            "wasip1",
            "windows",
        ];
        const ARCHITECTURES: &[&str] = &[
            "386", "amd64", "arm", "arm64", "loong64", "mips", "mipsle", "mips64", "mips64le", "ppc64", "ppc64le",
            "riscv64", "s390x", "wasm",
        ];
        OSES.contains(&self.os.as_str()) && ARCHITECTURES.contains(&self.architecture.as_str())
    }

    /// What nix calls it (`aarch64-linux`), for the platforms nix builds for.
    pub(crate) fn nix_system(&self) -> Option<String> {
        let arch = match (self.architecture.as_str(), self.variant.as_deref()) {
            ("amd64", _) => "x86_64",
            ("arm64", _) => "aarch64",
            ("386", _) => "i686",
            ("arm", Some("v7")) => "armv7l",
            ("arm", Some("v6")) => "armv6l",
            ("riscv64", _) => "riscv64",
            ("ppc64le", _) => "powerpc64le",
            ("s390x", _) => "s390x",
            _ => return None,
        };
        Some(format!("{arch}-{}", self.os))
    }

    /// For file names: `amd64`, `arm64`, `arm-v7`.
    pub(crate) fn suffix(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}-{v}", self.architecture),
            None => self.architecture.clone(),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_normalise() {
        assert_eq!(Platform::parse("linux/arm64").unwrap().to_string(), "linux/arm64");
        assert_eq!(Platform::parse("linux/aarch64").unwrap().to_string(), "linux/arm64");
        assert_eq!(Platform::parse("linux/arm64/v8").unwrap().to_string(), "linux/arm64");
        assert_eq!(Platform::parse("Linux/x86_64").unwrap().to_string(), "linux/amd64");
        assert_eq!(Platform::parse("linux/arm/v7").unwrap().suffix(), "arm-v7");
        for bad in ["linux", "linux/", "/amd64", "linux/amd64/v1/x", "linux/am d64", ""] {
            let err = Platform::parse(bad).unwrap_err().to_string();
            assert!(err.contains("OS/ARCH"), "{bad}: {err}");
        }
    }

    #[test]
    fn known_platforms_are_told_from_typos() {
        for known in ["linux/amd64", "linux/aarch64", "linux/arm/v7", "linux/riscv64", "windows/amd64"] {
            assert!(Platform::parse(known).unwrap().is_known(), "{known}");
        }
        for unknown in ["linux/potato", "linux/amd46", "linx/amd64"] {
            assert!(!Platform::parse(unknown).unwrap().is_known(), "{unknown}");
        }
    }

    #[test]
    fn lists_refuse_repeats() {
        let list = Platform::parse_list("linux/amd64, linux/arm64").unwrap();
        assert_eq!(list.len(), 2);
        assert!(Platform::parse_list("linux/amd64,linux/x86_64").unwrap_err().to_string().contains("twice"));
        assert!(Platform::parse_list(",").is_err());
    }
}
