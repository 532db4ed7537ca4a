//! What became of each container of a run: one record per container, the same shape for
//! build and publish, as a summary table on stderr or one JSON object a line on stdout.

use serde::Serialize;

use crate::progress::{human_bytes, Progress};
use crate::registry::UploadStats;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    Built,
    Pushed,
    Failed,
    Skipped,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Record {
    pub name: String,
    /// The platform of a build for one of several platforms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    pub version: Option<String>,
    pub status: Status,
    /// The first of `tags` (what a single-tag run always said).
    pub tag: Option<String>,
    /// Every tag of a publish.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    pub digest: Option<String>,
    pub archive: Option<String>,
    pub error: Option<String>,
    pub seconds: f64,
    /// Bytes of the archive (build) or uploaded (publish).
    pub bytes: Option<u64>,
    pub pushed_bytes: Option<u64>,
    pub skipped_layers: Option<usize>,
    /// Blob bytes sent (publish), those sent again or refused included, and the requests
    /// that carried them.
    pub sent_bytes: Option<u64>,
    pub requests: Option<u64>,
    /// Whether some blob went up in chunks, and the chunk size.
    pub chunked: Option<bool>,
    pub chunk_size: Option<u64>,
    /// Uploads taken up again where they were cut off, and uploads started again from the start.
    pub resumes: Option<u32>,
    pub restarts: Option<u32>,
    /// The engine that built it, when several took part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// For a multi-platform image: each platform's image digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platforms: Option<std::collections::BTreeMap<String, String>>,
    /// The files `--pin` changed for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<Vec<String>>,
    /// With remote builders: each builder's URI and the derivations of its closure built there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub builders: Option<std::collections::BTreeMap<String, usize>>,
    /// What publish attached to the image (signature, provenance, SBOM), now or before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attached: Option<Vec<String>>,
}

impl Record {
    pub(crate) fn new(name: &str, status: Status) -> Record {
        Record {
            name: name.to_string(),
            platform: None,
            version: None,
            status,
            tag: None,
            tags: None,
            reference: None,
            digest: None,
            archive: None,
            error: None,
            seconds: 0.0,
            bytes: None,
            pushed_bytes: None,
            skipped_layers: None,
            sent_bytes: None,
            requests: None,
            chunked: None,
            chunk_size: None,
            resumes: None,
            restarts: None,
            platforms: None,
            engine: None,
            pinned: None,
            builders: None,
            attached: None,
        }
    }

    pub(crate) fn failed(name: &str, error: impl Into<String>, seconds: f64) -> Record {
        Record { error: Some(error.into()), seconds, ..Record::new(name, Status::Failed) }
    }

    /// What a push's uploads took.
    pub(crate) fn set_uploads(&mut self, uploads: &UploadStats) {
        self.sent_bytes = Some(uploads.sent_bytes);
        self.requests = Some(uploads.requests);
        self.chunked = Some(uploads.chunk_size.is_some());
        self.chunk_size = uploads.chunk_size;
        self.resumes = Some(uploads.resumes);
        self.restarts = Some(uploads.restarts);
    }

    /// `12.0 MiB in 4 requests, in chunks of 8.0 MiB, 1 resumed`; empty unless something was sent.
    fn uploads(&self) -> String {
        match (self.sent_bytes, self.requests) {
            (Some(sent_bytes), Some(requests)) if requests > 0 => UploadStats {
                sent_bytes,
                requests,
                chunk_size: self.chunk_size,
                resumes: self.resumes.unwrap_or(0),
                restarts: self.restarts.unwrap_or(0),
            }
            .describe(),
            _ => String::new(),
        }
    }
}

/// Each failure's error (shown even with `-q`), then the table.
pub(crate) fn summary(records: &[Record], progress: &Progress) {
    for r in records.iter().filter(|r| r.status == Status::Failed) {
        progress.error(format!("{}: {}", r.name, r.error.as_deref().unwrap_or("failed")));
    }
    for line in table(records) {
        progress.info(line);
    }
}

fn table(records: &[Record]) -> Vec<String> {
    let rows: Vec<[String; 6]> = records
        .iter()
        .map(|r| {
            let status = match r.status {
                Status::Built => "built",
                Status::Pushed => "pushed",
                Status::Failed => "failed",
                Status::Skipped => "skipped",
            };
            let detail = match (&r.digest, r.bytes, &r.error) {
                (Some(digest), _, _) => digest.chars().take(19).collect(),
                (None, Some(bytes), _) => human_bytes(bytes),
                (None, None, Some(error)) if r.status == Status::Skipped => error.clone(),
                _ => String::new(),
            };
            // A build for one of several platforms, or on one of several engines, says which.
            let mut name = r.name.clone();
            if let Some(platform) = &r.platform {
                name = format!("{name} ({platform})");
            }
            if let Some(engine) = &r.engine {
                name = format!("{name} @ {engine}");
            }
            [
                name,
                r.version.clone().unwrap_or_default(),
                status.to_string(),
                detail,
                format!("{:.1}s", r.seconds),
                r.uploads(),
            ]
        })
        .collect();
    let header = ["NAME", "VERSION", "RESULT", "SIZE/DIGEST", "TIME", "SENT"].map(String::from);
    let widths: Vec<usize> =
        (0..6).map(|c| rows.iter().chain([&header]).map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    std::iter::once(&header)
        .chain(&rows)
        .map(|row| {
            let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}

/// The exit status of a run: an error naming the failures when any container failed.
pub(crate) fn outcome(records: &[Record]) -> anyhow::Result<()> {
    let failed: Vec<&str> = records.iter().filter(|r| r.status == Status::Failed).map(|r| r.name.as_str()).collect();
    match failed.len() {
        0 => Ok(()),
        n => anyhow::bail!(
            "{n} of {} container{} failed: {}",
            records.len(),
            if records.len() == 1 { "" } else { "s" },
            failed.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lines_up() {
        let mut built = Record::new("ntfy", Status::Built);
        built.version = Some("2.17.0".into());
        built.bytes = Some(2048);
        built.seconds = 3.25;
        let failed = Record::failed("broken-build", "nix said no", 1.0);
        let mut elsewhere = Record::new("web", Status::Built);
        elsewhere.platform = Some("linux/arm64".into());
        elsewhere.engine = Some("tcp://b:2376".into());
        let mut pushed = Record::new("app", Status::Pushed);
        pushed.digest = Some(format!("sha256:{}", "ab".repeat(32)));
        pushed.set_uploads(&UploadStats {
            sent_bytes: 12 << 20,
            requests: 4,
            chunk_size: Some(4 << 20),
            resumes: 1,
            restarts: 0,
        });
        let lines = table(&[built, failed, elsewhere, pushed]);
        assert_eq!(lines[0], "NAME                              VERSION  RESULT  SIZE/DIGEST          TIME  SENT");
        assert_eq!(lines[1], "ntfy                              2.17.0   built   2.0 KiB              3.2s");
        assert_eq!(lines[2], "broken-build                               failed                       1.0s");
        assert_eq!(lines[3], "web (linux/arm64) @ tcp://b:2376           built                        0.0s");
        assert_eq!(
            lines[4],
            "app                                        pushed  sha256:abababababab  0.0s  12.0 MiB in 4 requests, in chunks of 4.0 MiB, 1 resumed"
        );
    }

    #[test]
    fn any_failure_fails_the_run() {
        assert!(outcome(&[Record::new("a", Status::Built), Record::new("b", Status::Skipped)]).is_ok());
        let err = outcome(&[Record::new("a", Status::Built), Record::failed("b", "x", 0.0)]).unwrap_err();
        assert_eq!(err.to_string(), "1 of 2 containers failed: b");
    }
}
