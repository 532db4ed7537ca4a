//! Image references as push takes them: `host[:port]/path:tag`, always naming the registry.

use std::fmt;

use anyhow::{bail, Result};

// pub: used by tests/it/push.rs
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host` or `host:port`, as written.
    registry: String,
    /// Repository path inside the registry (`team/app`).
    repository: String,
    tag: String,
}

impl Reference {
    /// Parses `host[:port]/path[:tag]`; the tag defaults to `latest`.
    pub fn parse(s: &str) -> Result<Reference> {
        let hint = "write host[:port]/path:tag, e.g. localhost:5000/team/app:1.0";
        if s.contains('@') {
            bail!("image reference {s:?} has a digest; push needs a tag ({hint})");
        }
        let Some((registry, rest)) = s.split_once('/') else {
            bail!("image reference {s:?} does not name a registry ({hint})");
        };
        if !looks_like_host(registry) {
            bail!("image reference {s:?} does not start with a registry host ({registry:?} has no '.' or ':' and is not localhost; {hint})");
        }
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((repo, tag)) => (repo, tag),
            None => (rest, "latest"),
        };
        if repository.is_empty() {
            bail!("image reference {s:?} has no repository path ({hint})");
        }
        for part in repository.split('/') {
            if !valid_path_component(part) {
                bail!(
                    "image reference {s:?}: repository path component {part:?} is invalid (lowercase letters, digits, and '.', '_', '-' between them)"
                );
            }
        }
        if !valid_tag(tag) {
            bail!("image reference {s:?}: tag {tag:?} is invalid (letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-')");
        }
        Ok(Reference { registry: registry.to_string(), repository: repository.to_string(), tag: tag.to_string() })
    }

    /// `host` or `host:port`, as the user wrote it (and as auth files key it).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub(crate) fn repository(&self) -> &str {
        &self.repository
    }

    pub(crate) fn tag(&self) -> &str {
        &self.tag
    }

    /// The same repository under another tag.
    pub fn with_tag(&self, tag: &str) -> Result<Reference> {
        if !valid_tag(tag) {
            bail!("tag {tag:?} is invalid (letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-')");
        }
        Ok(Reference { tag: tag.to_string(), ..self.clone() })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.registry, self.repository, self.tag)
    }
}

/// The host to send requests to: Docker Hub's API lives elsewhere than its name.
pub(crate) fn api_host(registry: &str) -> &str {
    match registry {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    }
}

/// A repository path (`team/app`) as a reference may name it.
pub(crate) fn valid_repository(s: &str) -> bool {
    s.split('/').all(valid_path_component)
}

/// The host without the port, brackets stripped (`[::1]:5000` -> `::1`).
pub(crate) fn host_only(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

fn looks_like_host(s: &str) -> bool {
    !s.is_empty()
        && (s.contains('.') || s.contains(':') || s == "localhost")
        && s.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
}

fn valid_path_component(s: &str) -> bool {
    let bytes = s.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && alnum(bytes[0])
        && alnum(bytes[bytes.len() - 1])
        && bytes.iter().all(|&b| alnum(b) || b == b'.' || b == b'_' || b == b'-')
}

fn valid_tag(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port_path_tag() {
        let r = Reference::parse("127.0.0.1:5000/team/app:v1.2-nix").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(host_only(r.registry()), "127.0.0.1");
        assert_eq!(r.repository(), "team/app");
        assert_eq!(r.tag(), "v1.2-nix");
        assert_eq!(r.to_string(), "127.0.0.1:5000/team/app:v1.2-nix");
        assert_eq!(Reference::parse("localhost/app").unwrap().tag(), "latest");
        assert_eq!(host_only(Reference::parse("[::1]:5000/app:x").unwrap().registry()), "::1");
        assert_eq!(api_host(Reference::parse("docker.io/library/x:1").unwrap().registry()), "registry-1.docker.io");
        assert!(valid_repository("team/app") && !valid_repository("team//app") && !valid_repository("a?b"));
        assert_eq!(r.with_tag("v1-nix").unwrap().to_string(), "127.0.0.1:5000/team/app:v1-nix");
        assert!(r.with_tag("-x").unwrap_err().to_string().contains("\"-x\""));
    }

    #[test]
    fn rejects_what_does_not_parse() {
        for (bad, says) in [
            ("app:1", "does not name a registry"),
            ("team/app:1", "registry host"),
            ("localhost:5000/App:1", "invalid"),
            ("localhost:5000/app:-x", "tag"),
            ("localhost:5000/app@sha256:00", "digest"),
            ("localhost:5000/:x", "no repository"),
            ("localhost:5000/a//b:x", "invalid"),
        ] {
            let err = Reference::parse(bad).unwrap_err().to_string();
            assert!(err.contains(says) && err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }
}
