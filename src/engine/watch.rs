//! The no-progress watchdog for engine streams. An engine that took a request and then went
//! silent would hold nixctr forever: every stream (pull, load, upload, download, exec output)
//! is watched, and one that moves nothing for the stall interval fails with one error naming
//! the engine and the step. Exec output is the exception, handled by the guard: a build may
//! be quiet for long, so there silence only leads to a probe of the engine.
//!
//! The interval is `NIXCTR_STALL_TIMEOUT` (seconds, default 120), read once per process.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Result};
use futures::{Stream, StreamExt};

/// The environment variable that sets the stall interval.
pub(crate) const STALL_ENV: &str = "NIXCTR_STALL_TIMEOUT";
const DEFAULT_STALL: Duration = Duration::from_secs(120);
/// A week: past that, "never" is meant, and a stall would be missed.
const MAX_STALL_SECS: u64 = 7 * 24 * 3600;

/// The stall interval from the variable's value (`None`: unset).
pub(crate) fn parse_stall_timeout(value: Option<&str>) -> Result<Duration> {
    let Some(raw) = value else { return Ok(DEFAULT_STALL) };
    let text = raw.trim();
    if text.is_empty() {
        return Ok(DEFAULT_STALL);
    }
    match text.strip_suffix('s').unwrap_or(text).parse::<u64>() {
        Ok(secs) if (1..=MAX_STALL_SECS).contains(&secs) => Ok(Duration::from_secs(secs)),
        _ => Err(anyhow!(
            "{STALL_ENV}={raw:?} is not a number of seconds; fix: set it to a whole number from 1 to \
             {MAX_STALL_SECS} (default {}), or unset it",
            DEFAULT_STALL.as_secs()
        )),
    }
}

/// This process's stall interval, read from the environment once.
pub(crate) fn stall_timeout() -> Result<Duration> {
    static VALUE: OnceLock<Result<Duration, String>> = OnceLock::new();
    VALUE
        .get_or_init(|| {
            let value = std::env::var_os(STALL_ENV).map(|v| v.to_string_lossy().into_owned());
            parse_stall_timeout(value.as_deref()).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// An engine stream that stopped moving.
#[derive(Debug, thiserror::Error)]
#[error("engine {engine} stopped answering while {step} (no progress for {}s)", .limit.as_secs())]
pub(crate) struct Stalled {
    engine: String,
    step: String,
    limit: Duration,
}

/// Whether `e` is (or was caused by) a stall.
pub(crate) fn is_stall(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Stalled>().is_some()
        || e.chain().any(|c| {
            c.is::<Stalled>()
                || c.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .is_some_and(|inner| inner.is::<Stalled>())
        })
}

/// The watchdog of one step: anything that moves (a chunk sent, an item received) touches it.
/// Clones share the clock.
#[derive(Clone)]
pub(crate) struct Watch {
    engine: String,
    step: String,
    limit: Duration,
    // tokio's clock, so tests can pause it.
    start: tokio::time::Instant,
    /// Milliseconds from `start` to the last progress.
    last: Arc<AtomicU64>,
}

impl Watch {
    pub(crate) fn new(engine: &str, step: impl Into<String>, limit: Duration) -> Watch {
        Watch {
            engine: engine.to_string(),
            step: step.into(),
            limit,
            start: tokio::time::Instant::now(),
            last: Arc::default(),
        }
    }

    pub(crate) fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub(crate) fn limit(&self) -> Duration {
        self.limit
    }

    /// The error for this step.
    pub(crate) fn stalled(&self) -> Stalled {
        Stalled { engine: self.engine.clone(), step: self.step.clone(), limit: self.limit }
    }

    /// Resolves once nothing has moved for the limit.
    pub(crate) async fn idle(&self) {
        loop {
            let idle = self.start.elapsed().saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)));
            if idle >= self.limit {
                return;
            }
            tokio::time::sleep(self.limit - idle).await;
        }
    }

    /// `work`, failing once nothing has moved for the limit (a request body being taken moves,
    /// through [`Watch::body`]).
    pub(crate) async fn run<F: Future>(&self, work: F) -> Result<F::Output, Stalled> {
        tokio::select! {
            biased;
            out = work => Ok(out),
            () = self.idle() => Err(self.stalled()),
        }
    }

    /// The next item of `stream`, or the stall.
    pub(crate) async fn next<S: Stream + Unpin>(&self, stream: &mut S) -> Result<Option<S::Item>, Stalled> {
        let item = self.run(stream.next()).await?;
        self.touch();
        Ok(item)
    }

    /// `body` (sent to the engine), touching the watch whenever the engine takes a chunk.
    pub(crate) fn body<S: Stream + Send + 'static>(&self, body: S) -> impl Stream<Item = S::Item> + Send + 'static {
        let watch = self.clone();
        body.inspect(move |_| watch.touch())
    }

    /// [`Watch::body`] for a body whose producer has a watchdog of its own (a program in
    /// the container): while the engine waits for the next chunk, that wait is not the
    /// engine's stall, so the watch is kept fresh; only the engine's answer is watched.
    pub(crate) fn producer_body<S>(&self, body: S) -> impl Stream<Item = S::Item> + Send + 'static
    where
        S: Stream + Send + Unpin + 'static,
        S::Item: Send,
    {
        let watch = self.clone();
        futures::stream::unfold(body, move |mut body| {
            let watch = watch.clone();
            async move {
                loop {
                    tokio::select! {
                        item = body.next() => {
                            watch.touch();
                            return item.map(|item| (item, body));
                        }
                        () = tokio::time::sleep(watch.limit / 2) => watch.touch(),
                    }
                }
            }
        })
    }

    /// `stream` (from the engine), ending with an error once it stalls.
    pub(crate) fn stream<T, S>(self, stream: S) -> impl Stream<Item = std::io::Result<T>> + Send + 'static
    where
        T: Send + 'static,
        S: Stream<Item = std::io::Result<T>> + Send + Unpin + 'static,
    {
        futures::stream::unfold(Some((self, stream)), |state| async move {
            let (watch, mut stream) = state?;
            match watch.next(&mut stream).await {
                Ok(Some(item)) => Some((item, Some((watch, stream)))),
                Ok(None) => None,
                Err(stalled) => Some((Err(std::io::Error::other(stalled)), None)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stall_interval_defaults_to_two_minutes() {
        assert_eq!(parse_stall_timeout(None).unwrap(), Duration::from_secs(120));
        assert_eq!(parse_stall_timeout(Some(" ")).unwrap(), Duration::from_secs(120));
    }

    #[test]
    fn the_stall_interval_is_whole_seconds() {
        assert_eq!(parse_stall_timeout(Some("5")).unwrap(), Duration::from_secs(5));
        assert_eq!(parse_stall_timeout(Some("300s")).unwrap(), Duration::from_secs(300));
        assert_eq!(parse_stall_timeout(Some(" 7 ")).unwrap(), Duration::from_secs(7));
    }

    #[test]
    fn a_bad_stall_interval_is_named_with_the_fix() {
        for bad in ["0", "-3", "1.5", "abc", "5m", "604801", "99999999999999999999"] {
            let e = parse_stall_timeout(Some(bad)).unwrap_err().to_string();
            assert!(e.starts_with(&format!("NIXCTR_STALL_TIMEOUT={bad:?} is not a number of seconds")), "{e}");
            assert!(e.contains("fix: set it to a whole number from 1 to 604800"), "{e}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_stalls_and_a_moving_one_does_not() {
        let watch = Watch::new("unix:///e.sock", "pulling x", Duration::from_secs(10));
        // Items every 9 s: never 10 s without progress.
        let mut moving = Box::pin(futures::stream::iter(0..3).then(|i| async move {
            tokio::time::sleep(Duration::from_secs(9)).await;
            i
        }));
        let mut got = Vec::new();
        while let Some(i) = watch.next(&mut moving).await.unwrap() {
            got.push(i);
        }
        assert_eq!(got, [0, 1, 2]);
        let mut silent = futures::stream::pending::<u8>();
        let e = watch.next(&mut silent).await.unwrap_err();
        assert_eq!(e.to_string(), "engine unix:///e.sock stopped answering while pulling x (no progress for 10s)");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_being_taken_is_progress() {
        let watch = Watch::new("unix:///e.sock", "loading a", Duration::from_secs(10));
        let body = watch.body(futures::stream::iter(0..4).then(|i| async move {
            tokio::time::sleep(Duration::from_secs(6)).await;
            i
        }));
        // The answer comes when the body has been taken (24 s), with no item before it.
        let sent = watch.run(body.collect::<Vec<_>>()).await.unwrap();
        assert_eq!(sent, [0, 1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_download_ends_with_the_stall_as_its_error() {
        let watch = Watch::new("tcp://h:1", "copying /x out of the container", Duration::from_secs(3));
        let stream = futures::stream::iter([Ok::<_, std::io::Error>(1u8)]).chain(futures::stream::pending());
        let items: Vec<_> = watch.stream(Box::pin(stream)).collect().await;
        assert_eq!(items.len(), 2);
        let e = anyhow::Error::new(items.into_iter().nth(1).unwrap().unwrap_err());
        assert!(is_stall(&e));
        assert!(e.to_string().contains("stopped answering while copying /x out of the container"), "{e}");
    }
}
