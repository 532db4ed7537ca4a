//! `nixctr pin REF@DIGEST --pin GLOB`: what `publish --pin` does after a push, for an image
//! already pushed. The files changed on stdout, one a line (or, with `--json`, one object);
//! each value changed on stderr.

use anyhow::{bail, Result};
use serde::Serialize;

use crate::cli::PinCommandArgs;
use crate::exit::Usage;
use crate::output;
use crate::pin::Image;
use crate::progress::Progress;
use crate::publish;
use crate::registry::Reference;
use crate::settings::Settings;

#[derive(Serialize)]
struct Pinned<'a> {
    #[serde(rename = "ref")]
    reference: String,
    digest: &'a str,
    pinned: Vec<&'a str>,
    commits: &'a [String],
}

pub(crate) async fn run(settings: &Settings, args: PinCommandArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let image = parse_image(&args.reference)?;
    let Some(request) = super::pin_request(settings, &args.pin, std::slice::from_ref(&image.repository), &progress)?
    else {
        return Err(Usage("name the files to pin: --pin PATH|GLOB (or `pin` in nixctr.toml)".to_string()).into());
    };
    let outcome = crate::pin::pin(&request, std::slice::from_ref(&image))?;
    publish::report_pins(&outcome, &progress);
    let files: Vec<&str> = outcome.changed.iter().map(|f| f.shown.as_str()).collect();
    if args.json {
        let reference = format!("{}:{}", image.repository, image.tag);
        let json = Pinned { reference, digest: &image.digest, pinned: files, commits: &outcome.commits };
        output::line(serde_json::to_string(&json)?)?;
    } else {
        for file in files {
            output::line(file)?;
        }
    }
    Ok(())
}

/// `REGISTRY/NAMESPACE/NAME:TAG@sha256:…`, the tag and the digest both required.
fn parse_image(text: &str) -> Result<Image> {
    let hint = "write REGISTRY/NAMESPACE/NAME:TAG@sha256:…, as publish prints it";
    let Some((name, digest)) = text.split_once('@') else {
        bail!("{text:?} has no digest ({hint})");
    };
    let hex = digest.strip_prefix("sha256:").unwrap_or("");
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
        bail!("{text:?}: digest {digest:?} is not sha256: and 64 lowercase hex digits ({hint})");
    }
    if !name.rsplit('/').next().is_some_and(|last| last.contains(':')) {
        bail!("{text:?} has no tag ({hint})");
    }
    let reference = Reference::parse(name)?;
    Ok(Image {
        repository: format!("{}/{}", reference.registry(), reference.repository()),
        tag: reference.tag().to_string(),
        digest: digest.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_reference_needs_its_tag_and_digest() {
        let image = parse_image(&format!("127.0.0.1:5000/team/ntfy:v1@{DIGEST}")).unwrap();
        assert_eq!(image.repository, "127.0.0.1:5000/team/ntfy");
        assert_eq!(image.tag, "v1");
        assert_eq!(image.digest, DIGEST);
        for (bad, says) in [
            ("127.0.0.1:5000/team/ntfy:v1".to_string(), "has no digest"),
            (format!("127.0.0.1:5000/team/ntfy@{DIGEST}"), "has no tag"),
            ("127.0.0.1:5000/team/ntfy:v1@sha256:abc".to_string(), "is not sha256:"),
            (format!("ntfy:v1@{DIGEST}"), "does not name a registry"),
        ] {
            let err = format!("{:#}", parse_image(&bad).unwrap_err());
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
