//! How nix is asked and what of its output nixctr reads. Text scraped from nix's stderr is a
//! contract nobody signed, so every reading of it lives here, each with a test holding the
//! wording of the nix versions seen (2.18 to 2.33).

/// The stock image enables neither; every `nix` call gets them.
pub(crate) fn nix_cmd(args: &[&str]) -> Vec<String> {
    let mut cmd = strings(&["nix", "--extra-experimental-features", "nix-command flakes"]);
    cmd.extend(strings(args));
    cmd
}

pub(crate) fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The `/nix/store/…` lines of a command's output.
pub(crate) fn store_paths(stdout: &str) -> Vec<String> {
    stdout.lines().map(str::trim).filter(|l| l.starts_with("/nix/store/")).map(str::to_string).collect()
}

/// The derivation of a build failure line: `error: builder for '/nix/store/….drv' failed …`
/// (2.18–2.29) or `error: Cannot build '/nix/store/….drv'.` (2.30 on).
pub(crate) fn failed_builder(line: &str) -> Option<&str> {
    let line = line.trim_start();
    let rest = line.strip_prefix("error: builder for '").or_else(|| line.strip_prefix("error: Cannot build '"))?;
    let (drv, _) = rest.split_once('\'')?;
    drv.ends_with(".drv").then_some(drv)
}

/// A derivation nix started building: `building '/nix/store/….drv'...`.
pub(crate) fn is_building(line: &str) -> bool {
    line.starts_with("building '/nix/store/")
}

/// `(drv, machine)` of a line saying nix started building a derivation: `building '….drv'...`
/// here (`None`), or `building '….drv' on 'ssh-ng://…'...` on a remote builder (2.18 on).
pub(crate) fn built_on(line: &str) -> Option<(&str, Option<&str>)> {
    let rest = line.strip_prefix("building '")?;
    let (drv, rest) = rest.split_once('\'')?;
    if !drv.starts_with("/nix/store/") {
        return None;
    }
    let on = rest.strip_prefix(" on '").and_then(|r| r.split_once('\'')).map(|(m, _)| m);
    Some((drv, on))
}

/// Why nix could not use a remote builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BuilderTrouble {
    /// No answer: connection refused, timed out, no such host.
    Unreachable,
    /// It refused the ssh identity.
    KeyRefused,
    /// Its host key is not in known_hosts.
    UnknownHostKey,
    /// Its host key differs from the one in known_hosts.
    ChangedHostKey,
    Other,
}

/// The builder nix gave up on, and why, from its `cannot build on 'URI': …` line (build-remote,
/// 2.18 to 2.26); ssh's own words are in the lines just `before` it (`ssh: connect to host …:
/// Connection refused`, `…: Permission denied (publickey).`, `Host key verification failed.`).
pub(crate) fn builder_trouble<'a>(line: &'a str, before: &[String]) -> Option<(&'a str, BuilderTrouble)> {
    let rest = line.trim_start().trim_start_matches("error: ").strip_prefix("cannot build on '")?;
    let (uri, said) = rest.split_once('\'')?;
    let ssh = before.iter().rev().take(24).take_while(|l| {
        !l.starts_with("building '") && !l.contains("cannot build on '") && !l.contains("will be built")
    });
    let all = std::iter::once(said.to_string()).chain(ssh.cloned()).collect::<Vec<_>>().join("\n");
    let trouble = ssh_trouble(&all);
    Some((uri, trouble))
}

/// What ssh's words (OpenSSH 9 and 10, as nix passes them on) say went wrong.
pub(crate) fn ssh_trouble(all: &str) -> BuilderTrouble {
    let has = |words: &[&str]| words.iter().any(|w| all.contains(w));
    if has(&["REMOTE HOST IDENTIFICATION HAS CHANGED", "has changed and you have requested strict"]) {
        BuilderTrouble::ChangedHostKey
    } else if has(&["Host key verification failed", "host key is known for"]) {
        BuilderTrouble::UnknownHostKey
    } else if has(&["Permission denied", "Too many authentication failures"]) {
        BuilderTrouble::KeyRefused
    } else if has(&[
        "Connection refused",
        "timed out",
        "Could not resolve hostname",
        "No route to host",
        "Network is unreachable",
        "Connection closed by",
        "Connection reset",
    ]) {
        BuilderTrouble::Unreachable
    } else {
        BuilderTrouble::Other
    }
}

/// `(version, trusted)` of `nix store info --json` (2.26: `{"trusted":1,"url":"ssh-ng://","version":"2.26.3"}`).
pub(crate) fn store_info(stdout: &str) -> (Option<String>, Option<bool>) {
    let Ok(info) = serde_json::from_str::<serde_json::Value>(stdout.trim()) else { return (None, None) };
    let trusted = info["trusted"].as_u64().map(|t| t == 1).or(info["trusted"].as_bool());
    (info["version"].as_str().map(str::to_string), trusted)
}

/// nix found no machine for a derivation: `Failed to find a machine for remote build!` (2.18
/// to 2.26), then `required (system, features): (aarch64-linux, [])`: the system wanted.
pub(crate) fn no_machine_for(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix("required (system, features): (")?;
    rest.split_once(',').map(|(system, _)| system.trim())
}

/// `(path, url)` of nix's `copying path '…' from '…'...` line (a substitution).
pub(crate) fn copied_from(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim_start().strip_prefix("copying path '")?;
    let (path, rest) = rest.split_once('\'')?;
    let rest = rest.strip_prefix(" from '")?;
    let (url, _) = rest.split_once('\'')?;
    Some((path, url))
}

/// The path of `nix copy --to`'s `copying path '…' to '…'...` line (an upload).
pub(crate) fn copied_to(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix("copying path '")?;
    let (path, rest) = rest.split_once('\'')?;
    rest.starts_with(" to '").then_some(path)
}

/// `0.01 MiB download` of nix's `these N paths will be fetched (0.01 MiB download, …)` line.
pub(crate) fn fetch_size(line: &str) -> Option<String> {
    let rest = line.split_once("will be fetched (")?.1;
    let (size, _) = rest.split_once(',')?;
    Some(size.trim().to_string())
}

/// How nix said a cache refused or failed it, for the warnings after a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheTrouble {
    /// A substitute not signed by a trusted key.
    Unsigned,
    /// Not a binary cache (a wrong URL, or a login page).
    NotACache,
    /// It did not answer, or refused the login.
    Unreachable,
}

/// What a line of nix's log says about the cache at `url`, if anything.
pub(crate) fn cache_trouble(line: &str, url: &str) -> Option<CacheTrouble> {
    if !line.contains(url) {
        return None;
    }
    if line.contains("not signed by any of the keys") {
        Some(CacheTrouble::Unsigned)
    } else if line.contains("does not appear to be a binary cache") {
        Some(CacheTrouble::NotACache)
    } else if line.starts_with("warning: unable to download") || line.contains("HTTP error 401") {
        Some(CacheTrouble::Unreachable)
    } else {
        None
    }
}

/// `nix path-info` on a path the store lacks: `path '…' is not valid` (all versions seen).
pub(crate) fn says_not_valid(tail: &[String]) -> bool {
    tail.iter().any(|l| l.contains("is not valid"))
}

/// nix's error about a store, with what it likely means.
pub(crate) fn store_hint(tail: &[String]) -> String {
    let mut text = error_excerpt(tail);
    let all = tail.join("\n");
    if all.contains("does not appear to be a binary cache") || all.contains("401") {
        text.push_str(
            "\n  (it did not answer as a binary cache: a wrong URL, or a login is needed or wrong: --netrc FILE)",
        );
    } else if [
        "Couldn't connect",
        "Could not connect",
        "Failed to connect",
        "Connection refused",
        "Connection reset",
        "resolve host",
        "Timeout",
        "timed out",
    ]
    .iter()
    .any(|s| all.contains(s))
    {
        text.push_str("\n  (it does not answer: is it up, and can the build container reach it? --network host)");
    } else if all.contains("don't know how to open") {
        text.push_str("\n  (nix does not understand this store URL)");
    }
    text
}

/// The part of nix's stderr worth repeating in an error: from the first `error:` line on,
/// with the few lines a failing builder printed just before it; else the last lines.
pub(crate) fn error_excerpt(tail: &[String]) -> String {
    const CONTEXT: usize = 5;
    let start = match tail.iter().position(|l| l.trim_start().starts_with("error:")) {
        Some(first) => {
            // Builder output sits between nix's last `building '…'` line and the error.
            let floor = tail[..first].iter().rposition(|l| l.starts_with("building '")).map_or(0, |i| i + 1);
            first.saturating_sub(CONTEXT).max(floor)
        }
        None => 0,
    };
    let lines: Vec<&str> = tail[start..].iter().map(String::as_str).filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "    (nix printed nothing on stderr)".to_string();
    }
    lines.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_builders_are_read_in_every_wording() {
        // 2.18 to 2.29 (2.26 is the test image's).
        let old = "error: builder for '/nix/store/nr5w-broken-build-step.drv' failed with exit code 1";
        assert_eq!(failed_builder(old), Some("/nix/store/nr5w-broken-build-step.drv"));
        // 2.18 ended the line with a semicolon when it showed the log.
        let semi = "error: builder for '/nix/store/nr5w-step.drv' failed with exit code 2;";
        assert_eq!(failed_builder(semi), Some("/nix/store/nr5w-step.drv"));
        // 2.30 on.
        let new = "error: Cannot build '/nix/store/nr5w-step.drv'.";
        assert_eq!(failed_builder(new), Some("/nix/store/nr5w-step.drv"));
        assert_eq!(failed_builder("error: 1 dependencies of derivation '/nix/store/x.drv' failed to build"), None);
        assert_eq!(store_paths("warning: x\n/nix/store/a.drv\n"), vec!["/nix/store/a.drv"]);
    }

    #[test]
    fn copied_lines_are_read() {
        let line = "copying path '/nix/store/abc-x' from 'http://127.0.0.1:5081/t'...";
        assert_eq!(copied_from(line), Some(("/nix/store/abc-x", "http://127.0.0.1:5081/t")));
        assert_eq!(copied_from("copying path '/nix/store/abc-x' to 'http://c'..."), None);
        assert_eq!(copied_to("copying path '/nix/store/abc-x' to 'http://c'..."), Some("/nix/store/abc-x"));
        assert_eq!(copied_to(line), None);
        let fetched = "these 3 paths will be fetched (0.05 MiB download, 0.20 MiB unpacked):";
        assert_eq!(fetch_size(fetched).as_deref(), Some("0.05 MiB download"));
    }

    #[test]
    fn cache_trouble_is_read_in_every_wording() {
        let url = "http://127.0.0.1:5081/t";
        let unsigned = "warning: substitute for '/nix/store/x' from 'http://127.0.0.1:5081/t' is not signed by any of the keys in 'trusted-public-keys'";
        assert_eq!(cache_trouble(unsigned, url), Some(CacheTrouble::Unsigned));
        // 2.26: "ignoring substitute for '…' from '…', as it's not signed by any of the keys …"
        let ignoring = "warning: ignoring substitute for '/nix/store/x' from 'http://127.0.0.1:5081/t', as it's not signed by any of the keys in 'trusted-public-keys'";
        assert_eq!(cache_trouble(ignoring, url), Some(CacheTrouble::Unsigned));
        let not_cache = "warning: 'http://127.0.0.1:5081/t' does not appear to be a binary cache";
        assert_eq!(cache_trouble(not_cache, url), Some(CacheTrouble::NotACache));
        let down =
            "warning: unable to download 'http://127.0.0.1:5081/t/nix-cache-info': Couldn't connect to server (7)";
        assert_eq!(cache_trouble(down, url), Some(CacheTrouble::Unreachable));
        assert_eq!(cache_trouble(down, "http://other"), None);
    }

    #[test]
    fn excerpt_holds_the_builder_output_and_every_error() {
        let tail: Vec<String> = [
            "these 2 derivations will be built:",
            "building '/nix/store/x-step.drv'...",
            "step: this fails on purpose",
            "error: builder for '/nix/store/x-step.drv' failed with exit code 1",
            "error: 1 dependencies of derivation failed to build",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let excerpt = error_excerpt(&tail);
        assert!(excerpt.starts_with("    step: this fails on purpose\n"), "{excerpt}");
        assert!(excerpt.ends_with("failed to build"), "{excerpt}");
        assert_eq!(error_excerpt(&[]), "    (nix printed nothing on stderr)");
    }
    #[test]
    fn remote_builds_are_read() {
        // 2.26: the remote build's line, then the builder's own echo of it.
        let remote = "building '/nix/store/mh3r-x.drv' on 'ssh-ng://root@nixctr-builder-0'...";
        assert_eq!(built_on(remote), Some(("/nix/store/mh3r-x.drv", Some("ssh-ng://root@nixctr-builder-0"))));
        assert_eq!(built_on("building '/nix/store/mh3r-x.drv'..."), Some(("/nix/store/mh3r-x.drv", None)));
        assert_eq!(built_on("copying path '/nix/store/zr2k-x' from 'ssh-ng://'..."), None);
        let info = r#"{"trusted":1,"url":"ssh-ng://","version":"2.26.3"}"#;
        assert_eq!(store_info(info), (Some("2.26.3".to_string()), Some(true)));
        assert_eq!(store_info(r#"{"trusted":0,"url":"ssh-ng://"}"#), (None, Some(false)));
        assert_eq!(store_info("not json"), (None, None));
        let missing = "required (system, features): (aarch64-linux, [])";
        assert_eq!(no_machine_for(missing), Some("aarch64-linux"));
    }

    #[test]
    fn builder_trouble_is_read_from_ssh_and_nix() {
        let cannot = "cannot build on 'ssh-ng://root@nixctr-builder-0': error: failed to start SSH connection to 'root@nixctr-builder-0'";
        let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let case = |before: &[&str]| builder_trouble(cannot, &lines(before)).map(|(_, t)| t);
        // OpenSSH 10.0 in nix 2.26's build hook, as the test builders answer.
        assert_eq!(
            case(&["ssh: connect to host 127.0.0.1 port 2399: Connection refused"]),
            Some(BuilderTrouble::Unreachable)
        );
        assert_eq!(case(&["root@127.0.0.1: Permission denied (publickey)."]), Some(BuilderTrouble::KeyRefused));
        let unknown = [
            "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.",
            "Host key verification failed.",
        ];
        assert_eq!(case(&unknown), Some(BuilderTrouble::UnknownHostKey));
        let changed = [
            "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@",
            "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @",
            "Host key for [127.0.0.1]:2222 has changed and you have requested strict checking.",
            "Host key verification failed.",
        ];
        assert_eq!(case(&changed), Some(BuilderTrouble::ChangedHostKey));
        // ssh's words before an earlier builder's line are not this one's.
        assert_eq!(
            case(&["root@h: Permission denied (publickey).", "building '/nix/store/a.drv'..."]),
            Some(BuilderTrouble::Other)
        );
        assert_eq!(builder_trouble(cannot, &[]).map(|(u, _)| u), Some("ssh-ng://root@nixctr-builder-0"));
        assert_eq!(builder_trouble("building '/nix/store/a.drv'...", &[]), None);
    }
}
