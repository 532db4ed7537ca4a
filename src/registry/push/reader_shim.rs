//! TEMPORARY SHIM (stream branch), to be replaced at merge by the push engineer's
//! `PushSession::push_reader`, which hashes and compresses layers as they stream. This one
//! spools the stream to a temporary file and pushes that with `push_to`, so that `publish`
//! of a streamed image works, and is tested, meanwhile.

use std::io::{Read, Write};

use anyhow::{Context, Result};

use super::{Destination, PushOutcome, PushSession};
use crate::progress::Progress;

impl PushSession {
    /// Pushes the uncompressed docker-archive `reader` yields (entries in any order) to
    /// `destination`. A reader that fails pushes nothing.
    pub async fn push_reader(
        &self,
        reader: Box<dyn Read + Send>,
        destination: &Destination,
        progress: &Progress,
    ) -> Result<PushOutcome> {
        let spool = tempfile::Builder::new()
            .prefix("nixctr-stream-")
            .suffix(".tar")
            .tempfile()
            .context("cannot create a temporary file for the image stream (is TMPDIR writable?)")?;
        let file = spool.reopen()?;
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut reader = reader;
            let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
            std::io::copy(&mut reader, &mut writer).context("cannot read the image stream")?;
            writer.flush()?;
            Ok(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("reading the image stream stopped: {e}"))??;
        self.push_to(spool.path(), destination, progress).await
    }
}
