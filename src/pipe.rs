//! Bytes written on a blocking thread (tar building, gunzip) and read as an async stream by
//! a request body, with a small bounded buffer between them so memory stays flat.

use std::io::Write;

use anyhow::Result;
use bytes::Bytes;
use futures::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const CHUNK: usize = 256 * 1024;
/// Chunks in flight: bounds the buffer at ~2 MiB.
const DEPTH: usize = 8;

/// Runs `produce` on a blocking thread, writing into the returned stream. The handle gives
/// the producer's own result: when the consumer fails, the producer's error (if any) is
/// the real cause.
pub(crate) fn spawn_writer<T, F>(
    produce: F,
) -> (impl Stream<Item = std::io::Result<Bytes>> + Send + 'static, JoinHandle<Result<T>>)
where
    T: Send + 'static,
    F: FnOnce(&mut dyn Write) -> Result<T> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(DEPTH);
    let handle = tokio::task::spawn_blocking(move || {
        let mut writer = ChannelWriter { tx: tx.clone(), buf: Vec::with_capacity(CHUNK) };
        let result = produce(&mut writer).and_then(|value| {
            writer.flush()?;
            Ok(value)
        });
        if let Err(e) = &result {
            // Fail the body so the receiver does not take half a stream as whole.
            let _ = tx.blocking_send(Err(std::io::Error::other(format!("{e:#}"))));
        }
        result
    });
    (futures::stream::poll_fn(move |cx| rx.poll_recv(cx)), handle)
}

/// Whether a producer failed only because the consumer stopped taking its bytes (the
/// consumer's own error is then the one to report).
pub(crate) fn receiver_stopped(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// A `Write` that hands full chunks to the async side; blocks while the reader is behind.
struct ChannelWriter {
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the receiving side stopped reading"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn bytes_arrive_in_order_and_errors_reach_both_sides() {
        let (stream, handle) = spawn_writer(|w| {
            for i in 0..1000u32 {
                w.write_all(&i.to_le_bytes().repeat(100))?;
            }
            Ok(7)
        });
        let chunks: Vec<_> = stream.collect().await;
        let all: Vec<u8> = chunks.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
        assert_eq!(all.len(), 1000 * 400);
        assert_eq!(&all[400..404], &1u32.to_le_bytes());
        assert_eq!(handle.await.unwrap().unwrap(), 7);

        let (stream, handle) = spawn_writer::<(), _>(|w| {
            w.write_all(b"half")?;
            anyhow::bail!("disk on fire")
        });
        let chunks: Vec<_> = stream.collect().await;
        assert!(chunks.last().unwrap().as_ref().is_err());
        assert!(handle.await.unwrap().is_err());
    }
}
