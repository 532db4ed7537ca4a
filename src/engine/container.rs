//! [`ContainerGuard`]: the one value that owns a container nixctr created. Removing it is the
//! guard's job: `remove()` on the normal path, `Drop` as the backstop for errors, panics and
//! Ctrl-C (the interrupted command's future is dropped, and the guard with it).

use std::collections::{HashMap, VecDeque};
use std::io::Write;

use anyhow::{Context, Result};
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::watch::Watch;
use super::{engine_err, engine_error_text, timed, Engine, LABEL, LABEL_HOST, LABEL_PID, LABEL_ROLE};
use crate::progress::Progress;

/// What to run: the image, what the container is for, volumes to mount.
pub(crate) struct ContainerSpec {
    pub(crate) image: String,
    /// `build` or `version`: shows in `docker ps` labels, for people and for `nixctr gc`.
    pub(crate) role: &'static str,
    /// (volume name, mount point)
    pub(crate) volumes: Vec<(String, String)>,
    pub(crate) env: Vec<String>,
    /// `HostConfig.NetworkMode` (`bridge`, `host`, `none`); `None`: the engine's default.
    pub(crate) network: Option<String>,
}

/// What happens to an exec's stderr while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutputMode {
    /// Copied to our stderr as it comes (nix's build log).
    Live,
    /// Kept only (the tail is still returned).
    Captured,
}

pub(crate) struct ExecOutput {
    pub(crate) exit_code: i64,
    pub(crate) stdout: String,
    /// The last lines of stderr, for error messages.
    pub(crate) stderr_tail: Vec<String>,
}

const STDERR_TAIL_LINES: usize = 25;
/// Who runs an exec (the image's user unless said) and where its stdout goes (collected
/// unless a sink takes it as it comes).
#[derive(Default)]
struct Run<'a> {
    user: Option<&'a str>,
    sink: Option<&'a tokio::sync::mpsc::Sender<std::io::Result<Bytes>>>,
}

/// How long the engine may take to record an exec's exit code once its output has ended.
const EXIT_CODE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// The most a probe of a quiet exec waits for the engine (less when the stall interval is).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub(crate) struct ContainerGuard {
    engine: Engine,
    id: String,
    removed: bool,
    progress: Progress,
}

impl ContainerGuard {
    /// Creates and starts a container that idles until removed; work runs in it through
    /// exec. It is never privileged and runs as the image's own user.
    pub(crate) async fn start(engine: &Engine, spec: ContainerSpec, progress: &Progress) -> Result<ContainerGuard> {
        let labels = HashMap::from([
            (LABEL.to_string(), "true".to_string()),
            (LABEL_ROLE.to_string(), spec.role.to_string()),
            (LABEL_PID.to_string(), std::process::id().to_string()),
            (LABEL_HOST.to_string(), super::hostname()),
        ]);
        let mounts = spec
            .volumes
            .iter()
            .map(|(name, target)| Mount {
                typ: Some(MountType::VOLUME),
                source: Some(name.clone()),
                target: Some(target.clone()),
                ..Default::default()
            })
            .collect::<Vec<_>>();
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: Some(vec!["sleep".to_string()]),
            cmd: Some(vec!["2147483647".to_string()]),
            env: Some(spec.env.clone()),
            labels: Some(labels),
            // `sleep` as PID 1 ignores SIGTERM: stopping it any other way waits for a timeout.
            stop_signal: Some("SIGKILL".to_string()),
            network_disabled: None,
            host_config: Some(HostConfig {
                mounts: (!mounts.is_empty()).then_some(mounts),
                privileged: Some(false),
                network_mode: spec.network.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!("nixctr-{}-{}-{}", spec.role, std::process::id(), unique_suffix());
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = timed("a container create", engine.client().create_container(Some(options), body))
            .await?
            .map_err(engine_err)
            .with_context(|| format!("cannot create a container from {}", spec.image))?;
        let guard =
            ContainerGuard { engine: engine.clone(), id: created.id, removed: false, progress: progress.clone() };
        let start =
            engine.client().start_container(&guard.id, None::<bollard::query_parameters::StartContainerOptions>);
        timed("a container start", start)
            .await?
            .map_err(engine_err)
            .with_context(|| format!("cannot start a container from {}", spec.image))?;
        Ok(guard)
    }

    /// The address of the engine the container runs on.
    pub(crate) fn engine_address(&self) -> &str {
        self.engine.address()
    }

    /// Streams a tar archive into the container, unpacked at `/`.
    pub(crate) async fn upload<S>(&self, tar: S) -> Result<()>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let options = UploadToContainerOptionsBuilder::default().path("/").build();
        let watch = self.engine.watch("uploading into the container");
        let upload = self.engine.client().upload_to_container(
            &self.id,
            Some(options),
            bollard::body_try_stream(watch.body(tar)),
        );
        watch.run(upload).await?.map_err(engine_err).context("cannot upload the project into the container")
    }

    /// A tar stream of `path` in the container. A symlink comes back as a symlink, so
    /// callers pass resolved paths.
    pub(crate) fn download(&self, path: &str) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        let options = DownloadFromContainerOptionsBuilder::default().path(path).build();
        let watch = self.engine.watch(format!("copying {path} out of the container"));
        let path = path.to_string();
        let chunks = self.engine.client().download_from_container(&self.id, Some(options)).map(move |chunk| {
            chunk.map_err(|e| {
                std::io::Error::other(format!("cannot copy {path} out of the container: {}", engine_error_text(&e)))
            })
        });
        watch.stream(chunks)
    }

    /// Copies one regular file out of the container into `dest`, streaming. The engine sends
    /// a tar; this reads its headers itself so nothing waits on a blocking thread.
    pub(crate) async fn copy_file_out<W>(&self, path: &str, dest: &mut W) -> Result<u64>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut reader = tokio_util::io::StreamReader::new(Box::pin(self.download(path)));
        let failed = |e: std::io::Error| copy_error(e, path);
        let mut block = [0u8; 512];
        loop {
            reader.read_exact(&mut block).await.map_err(failed)?;
            if block.iter().all(|&b| b == 0) {
                anyhow::bail!("{path} in the container is not a file");
            }
            let header = tar::Header::from_byte_slice(&block);
            let size = header.entry_size().with_context(|| format!("bad tar header copying {path}"))?;
            match header.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let copied = tokio::io::copy(&mut (&mut reader).take(size), dest).await.map_err(failed)?;
                    if copied != size {
                        anyhow::bail!("copying {path} out of the container stopped after {copied} of {size} bytes");
                    }
                    dest.flush().await?;
                    return Ok(size);
                }
                // PAX and GNU long-name records describe the next entry: skip their data.
                tar::EntryType::XHeader
                | tar::EntryType::XGlobalHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink => {
                    let padded = size.div_ceil(512) * 512;
                    tokio::io::copy(&mut (&mut reader).take(padded), &mut tokio::io::sink()).await.map_err(failed)?;
                }
                other => anyhow::bail!("{path} in the container is not a regular file ({other:?})"),
            }
        }
    }

    /// The permission bits of the regular file at `path` (read from the first header of
    /// the engine's tar of it; the rest is not fetched), or `None` when it is something else.
    pub(crate) async fn file_mode(&self, path: &str) -> Result<Option<u32>> {
        use tokio::io::AsyncReadExt;
        let mut reader = tokio_util::io::StreamReader::new(Box::pin(self.download(path)));
        let mut block = [0u8; 512];
        loop {
            reader.read_exact(&mut block).await.map_err(|e| copy_error(e, path))?;
            let header = tar::Header::from_byte_slice(&block);
            let size = header.entry_size().with_context(|| format!("bad tar header reading {path}"))?;
            match header.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    return Ok(Some(header.mode().with_context(|| format!("bad tar header reading {path}"))?))
                }
                tar::EntryType::XHeader
                | tar::EntryType::XGlobalHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink => {
                    let padded = size.div_ceil(512) * 512;
                    let mut skip = (&mut reader).take(padded);
                    tokio::io::copy(&mut skip, &mut tokio::io::sink()).await.map_err(|e| copy_error(e, path))?;
                }
                _ => return Ok(None),
            }
        }
    }

    /// Runs `cmd` in the container and waits for it. stdout is collected; stderr is shown
    /// live or kept, per `mode`. The exit code comes from the engine, not from the end of
    /// the output stream.
    pub(crate) async fn exec(
        &self,
        cmd: &[String],
        env: &[String],
        workdir: Option<&str>,
        mode: OutputMode,
    ) -> Result<ExecOutput> {
        self.exec_keeping(cmd, env, workdir, mode, STDERR_TAIL_LINES).await
    }

    /// [`ContainerGuard::exec`], keeping the last `keep` lines of stderr.
    pub(crate) async fn exec_keeping(
        &self,
        cmd: &[String],
        env: &[String],
        workdir: Option<&str>,
        mode: OutputMode,
        keep: usize,
    ) -> Result<ExecOutput> {
        self.exec_into(cmd, env, workdir, mode, keep, Run::default()).await
    }

    /// [`ContainerGuard::exec`] as `user` (`UID:GID`), its stdout sent into `stdout` chunk by
    /// chunk as it comes (waiting while the receiver is behind) instead of collected. The
    /// receiver closing is an error: the process is left to the container's removal.
    pub(crate) async fn exec_streaming(
        &self,
        cmd: &[String],
        user: &str,
        workdir: Option<&str>,
        stdout: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    ) -> Result<ExecOutput> {
        let run = Run { user: Some(user), sink: Some(stdout) };
        self.exec_into(cmd, &[], workdir, OutputMode::Captured, STDERR_TAIL_LINES, run).await
    }

    async fn exec_into(
        &self,
        cmd: &[String],
        env: &[String],
        workdir: Option<&str>,
        mode: OutputMode,
        keep: usize,
        Run { user, sink }: Run<'_>,
    ) -> Result<ExecOutput> {
        let docker = self.engine.client();
        let options = CreateExecOptions::<String> {
            cmd: Some(cmd.to_vec()),
            env: Some(env.to_vec()),
            working_dir: workdir.map(str::to_string),
            user: user.map(str::to_string),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let what = cmd.first().cloned().unwrap_or_default();
        let created = timed("an exec create", docker.create_exec(&self.id, options))
            .await?
            .map_err(engine_err)
            .with_context(|| format!("cannot run {what} in the container"))?;
        let start =
            docker.start_exec(&created.id, Some(StartExecOptions { detach: false, tty: false, output_capacity: None }));
        let started = timed("an exec start", start)
            .await?
            .map_err(engine_err)
            .with_context(|| format!("cannot run {what} in the container"))?;
        let mut stdout = Vec::new();
        let mut tail = LineTail::new(keep);
        if let StartExecResults::Attached { mut output, .. } = started {
            let mut err = std::io::stderr();
            let watch = self.engine.watch(format!("running {what} in the container"));
            let mut ended = false;
            loop {
                let item = tokio::select! {
                    biased;
                    item = output.next() => item,
                    () = watch.idle() => {
                        self.quiet_exec(&created.id, &watch, &mut ended).await?;
                        continue;
                    }
                };
                let Some(item) = item else { break };
                watch.touch();
                let item = item.map_err(engine_err).with_context(|| format!("lost the output of {what}"))?;
                match item {
                    bollard::container::LogOutput::StdOut { message } => match sink {
                        Some(sink) => {
                            if sink.send(Ok(message)).await.is_err() {
                                anyhow::bail!("the reader of the output of {what} stopped");
                            }
                            // A reader that took its time is not the exec stalling.
                            watch.touch();
                        }
                        None => stdout.extend_from_slice(&message),
                    },
                    bollard::container::LogOutput::StdErr { message } => {
                        if mode == OutputMode::Live {
                            let _ = err.write_all(&message);
                        }
                        tail.push(&message);
                    }
                    _ => {}
                }
            }
        }
        // The stream can end a moment before the engine records the exit code.
        let mut delay = std::time::Duration::from_millis(5);
        let deadline = std::time::Instant::now() + EXIT_CODE_WAIT;
        let exit_code = loop {
            let info = timed("an exec inspect", docker.inspect_exec(&created.id))
                .await?
                .map_err(engine_err)
                .with_context(|| format!("cannot read the exit code of {what}"))?;
            match (info.running, info.exit_code) {
                (Some(true), _) | (_, None) => {
                    if std::time::Instant::now() > deadline {
                        anyhow::bail!(
                            "{what} ended its output, but the engine reported no exit code within {} s",
                            EXIT_CODE_WAIT.as_secs()
                        );
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_millis(200));
                }
                (_, Some(code)) => break code,
            }
        };
        Ok(ExecOutput { exit_code, stdout: String::from_utf8_lossy(&stdout).into_owned(), stderr_tail: tail.finish() })
    }

    /// The output of exec `id` has been quiet for the stall interval: a build thinking, or a
    /// stream that stopped? The engine, asked on a fresh connection, tells: no answer is a
    /// stall; a process that still runs is waited for; one that ended gets one more interval
    /// for its output to drain.
    async fn quiet_exec(&self, id: &str, watch: &Watch, ended_before: &mut bool) -> Result<()> {
        let limit = watch.limit().min(PROBE_TIMEOUT);
        let probe = async { self.engine.fresh_client(limit)?.inspect_exec(id).await.map_err(engine_err) };
        let running = match tokio::time::timeout(limit, probe).await {
            Err(_) => return Err(watch.stalled().into()),
            Ok(Err(e)) => return Err(e.context(watch.stalled())),
            Ok(Ok(info)) => info.running == Some(true),
        };
        if !running && *ended_before {
            return Err(watch.stalled().into());
        }
        self.progress.debug(format!(
            "engine: no output for {}s; the engine answers, the process {}",
            watch.limit().as_secs(),
            if running { "still runs: waiting" } else { "ended: waiting for the rest of its output" }
        ));
        *ended_before = !running;
        watch.touch();
        Ok(())
    }

    /// Removes the container (killing what runs in it). Errors are reported: the caller
    /// has finished its work and would rather know.
    pub(crate) async fn remove(mut self) -> Result<()> {
        self.removed = true;
        self.engine.remove_container(&self.id).await
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        // The runtime this guard was made on may be stopping (Ctrl-C), so the removal gets a
        // thread and a connection of its own.
        // The thread holds a clone of the engine, so its transport (an ssh tunnel) stays up
        // until the removal is done.
        let engine = self.engine.clone();
        let id = self.id.clone();
        let progress = self.progress.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async {
                let removed = match engine.reconnect().await {
                    Ok(engine) => engine.remove_container(&id).await,
                    Err(e) => Err(e.context(format!("cannot remove container {id}"))),
                };
                if let Err(e) = removed {
                    progress.warn(format!("{e:#} (`nixctr gc` removes it later)"));
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A failed copy out of the container; a stall is its own message.
fn copy_error(e: std::io::Error, path: &str) -> anyhow::Error {
    if e.get_ref().is_some_and(|inner| inner.is::<super::watch::Stalled>()) {
        return anyhow::Error::new(e);
    }
    anyhow::Error::new(e).context(format!("cannot copy {path} out of the container"))
}

fn unique_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{nanos:08x}")
}

/// The last `max` lines of a byte stream.
struct LineTail {
    max: usize,
    lines: VecDeque<String>,
    partial: Vec<u8>,
}

impl LineTail {
    fn new(max: usize) -> LineTail {
        LineTail { max, lines: VecDeque::new(), partial: Vec::new() }
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial).trim_end().to_string();
                self.partial.clear();
                self.lines.push_back(line);
                if self.lines.len() > self.max {
                    self.lines.pop_front();
                }
            } else {
                self.partial.push(b);
            }
        }
    }

    fn finish(mut self) -> Vec<String> {
        if !self.partial.is_empty() {
            self.push(b"\n");
        }
        self.lines.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines_across_chunks() {
        let mut t = LineTail::new(2);
        t.push(b"one\ntw");
        t.push(b"o\nthree");
        assert_eq!(t.finish(), vec!["two", "three"]);
    }
}
