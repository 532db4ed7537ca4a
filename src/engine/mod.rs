//! The engine: the only module that talks to Docker or Podman (through bollard).
//!
//! It finds an engine that answers, negotiates the API version (Docker 20.10's 1.41 up to
//! current, Podman's Docker-compatible service), pulls images, manages the nix store volumes,
//! loads archives, and owns every container nixctr creates through [`ContainerGuard`].
//! Everything nixctr creates carries the label [`LABEL`], so `nixctr gc` can find leftovers.

pub(crate) mod address;
mod container;
mod image;
mod runs;
mod transport;
mod watch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bollard::query_parameters::{
    ImportImageOptionsBuilder, ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;

pub(crate) use address::EngineAddress;
pub(crate) use container::{ContainerGuard, ContainerSpec, OutputMode};
pub(crate) use image::same as same_platform;
pub(crate) use runs::{hostname, live_owner};
use transport::Transport;
pub(crate) use watch::is_stall;
use watch::Watch;

use crate::progress::Progress;

/// When to pull the nix image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PullPolicy {
    /// Only when the engine does not have it.
    Missing,
    Always,
    /// Never; a missing image is an error.
    Never,
}

/// The label on everything nixctr creates.
pub(crate) const LABEL: &str = "dev.nixctr";
/// The label naming what a store volume belongs to (the nix image's ID).
pub(crate) const LABEL_IMAGE: &str = "dev.nixctr.image";
/// The label saying what a resource is for (`store`, `build`, `version`).
pub(crate) const LABEL_ROLE: &str = "dev.nixctr.role";

/// The label naming the nixctr process that made a container.
pub(crate) const LABEL_PID: &str = "dev.nixctr.pid";

/// The label naming the machine the nixctr process ran on (its PID means nothing elsewhere).
pub(crate) const LABEL_HOST: &str = "dev.nixctr.host";

/// What to do about an engine that is not there: the end of such messages, and `doctor`'s fix.
pub(crate) const START_HINT: &str = "start one (Docker: `sudo systemctl start docker` or `dockerd &`; Podman: \
     `podman system service --time=0 unix:///run/podman/podman.sock &`), or name it with --engine URL, --context NAME \
     or DOCKER_HOST";

/// Long: a cold nix build streams its log through one request for many minutes.
const REQUEST_TIMEOUT_SECS: u64 = 24 * 3600;
/// For requests that answer at once from a healthy engine (inspect, create, remove, list).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// The most of an engine's JSON answer nixctr reads (a container list of thousands fits).
const ANSWER_LIMIT: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Docker,
    Podman,
}

/// A connected engine.
#[derive(Clone)]
pub(crate) struct Engine {
    docker: Docker,
    /// The address it was reached at (`unix:///var/run/docker.sock`, `ssh://…`), for messages.
    address: String,
    /// How it is reached; shared by the clones, so an ssh tunnel lives while any clone does
    /// (a [`ContainerGuard`]'s cleanup thread included).
    transport: Arc<Transport>,
    flavor: Flavor,
    api_version: bollard::ClientVersion,
    /// How long a stream may make no progress (see [`watch`]).
    stall: Duration,
}

impl Engine {
    /// Connects to `explicit` when given (resolved by `settings`: `--engine`, `--context`,
    /// `DOCKER_HOST`, `DOCKER_CONTEXT`, `currentContext`, `CONTAINER_CONNECTION`/`CONTAINER_HOST`,
    /// nixctr.toml), else to the first of the usual sockets that answers. `-v` says which and why.
    pub(crate) async fn connect(explicit: Option<&EngineAddress>, progress: &Progress) -> Result<Engine> {
        watch::stall_timeout()?;
        if let Some(address) = explicit {
            progress.debug(format!("engine: {} from {}", address.url, address.why));
            let engine = Self::connect_to(address, progress).await.map_err(|e| {
                let reason = format!("{e:#}");
                let absent = address.url.starts_with("unix://") || reason.contains("Connection refused");
                let hint = if absent && !address.url.starts_with("ssh://") {
                    format!("\n  {START_HINT}")
                } else {
                    String::new()
                };
                anyhow!("cannot reach the engine at {}: {reason}{hint}", address.described())
            })?;
            progress.debug(format!("engine: {} at {} (API {})", engine.flavor_name(), address.url, engine.api_version));
            return Ok(engine);
        }
        progress.debug(
            "engine: none named (--engine, --context, DOCKER_HOST, DOCKER_CONTEXT, currentContext, \
             CONTAINER_CONNECTION, CONTAINER_HOST, nixctr.toml): trying the usual sockets",
        );
        let mut tried = Vec::new();
        for url in default_candidates() {
            let address = EngineAddress::new(url.clone(), "the usual sockets");
            match Self::connect_to(&address, progress).await {
                Ok(engine) => {
                    progress.debug(format!("engine: {} at {} (API {})", engine.flavor_name(), url, engine.api_version));
                    return Ok(engine);
                }
                Err(e) => tried.push(format!("{url} ({})", first_line(&format!("{e:#}")))),
            }
        }
        bail!("no Docker or Podman engine answered; tried:\n    {}\n  {START_HINT}", tried.join("\n    "))
    }

    /// Connects to one address and checks that it answers.
    pub(crate) async fn connect_to(address: &EngineAddress, progress: &Progress) -> Result<Engine> {
        let transport = Arc::new(Transport::open(address, progress).await?);
        Self::over(transport, &address.url).await
    }

    /// A new connection over the same transport (an ssh tunnel is shared, not reopened), for
    /// a thread with a runtime of its own.
    pub(crate) async fn reconnect(&self) -> Result<Engine> {
        Self::over(self.transport.clone(), &self.address).await
    }

    async fn over(transport: Arc<Transport>, address: &str) -> Result<Engine> {
        let docker = transport.client(REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION).map(with_tar_content_type)?;
        let answered = match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
            Err(_) => Err(format!("no answer within {}s", PING_TIMEOUT.as_secs())),
            Ok(Err(e)) => Err(transport::error_chain(&e).trim().to_string()),
            Ok(Ok(_)) => Ok(()),
        };
        if let Err(e) = answered {
            let address = EngineAddress::new(address, "");
            bail!("{}", transport.explain(&address, &e));
        }
        let docker =
            timed("the API version", docker.negotiate_version()).await?.context("cannot negotiate the API version")?;
        let version =
            timed("the version request", docker.version()).await?.context("cannot read the engine's version")?;
        let is_podman = version.components.iter().flatten().any(|c| c.name.to_ascii_lowercase().contains("podman"));
        let api_version = docker.client_version();
        Ok(Engine {
            docker,
            address: address.to_string(),
            transport,
            flavor: if is_podman { Flavor::Podman } else { Flavor::Docker },
            api_version,
            stall: watch::stall_timeout()?,
        })
    }

    /// A client with a connection pool of its own, speaking the negotiated API version: a
    /// probe on it does not queue behind (or reuse) a connection that stopped answering.
    fn fresh_client(&self, timeout: Duration) -> Result<Docker> {
        self.transport.client(timeout.as_secs().max(1), &self.api_version)
    }

    /// The watchdog of one streaming step.
    fn watch(&self, step: impl Into<String>) -> Watch {
        Watch::new(&self.address, step, self.stall)
    }

    /// The address it was reached at, for messages and reports.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    pub(crate) fn is_podman(&self) -> bool {
        self.flavor == Flavor::Podman
    }

    pub(crate) fn flavor_name(&self) -> &'static str {
        match self.flavor {
            Flavor::Docker => "Docker",
            Flavor::Podman => "Podman",
        }
    }

    pub(crate) fn client(&self) -> &Docker {
        &self.docker
    }

    /// The engine's own version, and the API version nixctr speaks with it (negotiated: the
    /// lower of bollard's and the engine's).
    pub(crate) async fn versions(&self) -> Result<(String, String)> {
        let version =
            timed("the version request", self.docker.version()).await?.context("cannot read the engine's version")?;
        Ok((version.version.unwrap_or_else(|| "(unknown)".to_string()), self.api_version.to_string()))
    }

    /// The CPUs the engine's machine has (2 when it does not say).
    pub(crate) async fn cpus(&self) -> usize {
        match timed("an info request", self.docker.info()).await {
            Ok(Ok(info)) => info.ncpu.and_then(|n| usize::try_from(n).ok()).filter(|&n| n > 0).unwrap_or(2),
            _ => 2,
        }
    }

    /// Creates the store volume for `image_id` if it is missing, and returns its name.
    /// The volume is tied to the image: a store made from another image would hide this
    /// image's own nix.
    pub(crate) async fn store_volume(&self, image_id: &str) -> Result<String> {
        let short: String = image_id.trim_start_matches("sha256:").chars().take(12).collect();
        let name = format!("nixctr-store-{short}");
        let labels = HashMap::from([
            (LABEL.to_string(), "true".to_string()),
            (LABEL_ROLE.to_string(), "store".to_string()),
            (LABEL_IMAGE.to_string(), image_id.to_string()),
        ]);
        let request = bollard::models::VolumeCreateRequest {
            name: Some(name.clone()),
            labels: Some(labels),
            ..Default::default()
        };
        match timed("a volume inspect", self.docker.inspect_volume(&name)).await? {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {
                // Creating a volume that a concurrent run just created returns it (Docker) or
                // fails with a conflict (Podman): both mean it exists now.
                if let Err(e) = timed("a volume create", self.docker.create_volume(request)).await? {
                    if !is_conflict(&e) {
                        return Err(engine_err(e)).context(format!("cannot create volume {name}"));
                    }
                }
            }
            Err(e) => return Err(engine_err(e)).context(format!("cannot inspect volume {name}")),
        }
        Ok(name)
    }

    /// The store volumes: (name, image ID it belongs to).
    pub(crate) async fn store_volumes(&self) -> Result<Vec<(String, String)>> {
        let filters = HashMap::from([("label", vec![format!("{LABEL_ROLE}=store")])]);
        let options = ListVolumesOptionsBuilder::default().filters(&filters).build();
        let list = timed("a volume list", self.docker.list_volumes(Some(options)))
            .await?
            .map_err(engine_err)
            .context("cannot list volumes")?;
        let mut volumes: Vec<(String, String)> = list
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| {
                let image = v.labels.get(LABEL_IMAGE).cloned().unwrap_or_default();
                (v.name, image)
            })
            .collect();
        volumes.sort();
        Ok(volumes)
    }

    pub(crate) async fn remove_volume(&self, name: &str) -> Result<()> {
        let options = RemoveVolumeOptionsBuilder::default().force(true).build();
        timed("a volume removal", self.docker.remove_volume(name, Some(options)))
            .await?
            .map_err(engine_err)
            .with_context(|| format!("cannot remove volume {name} (is a nixctr run using it?)"))
    }

    /// The containers labelled [`LABEL`], running or not: (ID, labels).
    ///
    /// Read untyped: Podman reports states such as `stopped` that bollard's state enum
    /// rejects, which would fail the whole list.
    pub(crate) async fn labelled_containers(&self) -> Result<Vec<(String, HashMap<String, String>)>> {
        // filters={"label":["dev.nixctr"]}, URL-encoded
        let list = self
            .get_json("/containers/json?all=1&filters=%7B%22label%22%3A%5B%22dev.nixctr%22%5D%7D")
            .await
            .context("cannot list containers")?;
        let mut found = Vec::new();
        for c in list.as_array().into_iter().flatten() {
            let Some(id) = c["Id"].as_str() else { continue };
            let labels = c["Labels"]
                .as_object()
                .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
                .unwrap_or_default();
            found.push((id.to_string(), labels));
        }
        Ok(found)
    }

    /// A GET of `path` (query included) answered as JSON, for answers bollard has no type for
    /// (Podman's manifest list) or a type too strict for (Podman's container states).
    ///
    /// bollard has no untyped request, so this borrows a GET of its own that answers raw bytes
    /// (an image export) and points it at `path` on its way out: the request still goes
    /// through bollard's transport (unix, tcp, TLS, the ssh tunnel), its status handling and
    /// its timeout.
    async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let target: http::uri::PathAndQuery = format!("/v{}{path}", self.api_version)
            .parse()
            .map_err(|e| anyhow!("bad engine API path {path:?}: {e}"))?;
        let docker = self.docker.clone().with_request_modifier(move |mut request| {
            let mut parts = request.uri().clone().into_parts();
            parts.path_and_query = Some(target.clone());
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
            request
        });
        let read = async {
            let mut body = Box::pin(docker.export_image("nixctr-untyped-get"));
            let mut answer = Vec::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(engine_err)?;
                if answer.len() + chunk.len() > ANSWER_LIMIT {
                    bail!("the engine's answer to GET {path} is larger than {} MiB", ANSWER_LIMIT >> 20);
                }
                answer.extend_from_slice(&chunk);
            }
            serde_json::from_slice(&answer).map_err(|e| anyhow!("the engine's answer to GET {path} is not JSON: {e}"))
        };
        timed(&format!("GET {path}"), read).await?
    }

    pub(crate) async fn remove_container(&self, id: &str) -> Result<()> {
        let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
        match timed("a container removal", self.docker.remove_container(id, Some(options))).await? {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // Another remover (a guard's backstop, a concurrent gc) got there first: wait for
            // it, so that a container this returned for is gone.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, message })
                if message.contains("already in progress") =>
            {
                for _ in 0..300 {
                    match timed("a container inspect", self.docker.inspect_container(id, None)).await? {
                        Err(e) if is_not_found(&e) => return Ok(()),
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                bail!("container {id} is still being removed after 30s")
            }
            Err(e) => Err(engine_err(e)).with_context(|| format!("cannot remove container {id}")),
        }
    }

    /// Loads a docker-archive (plain or gzip) into the engine, streaming the file, and
    /// returns the names of the images it loaded. A gzip archive is unpacked on the way:
    /// Podman 4 cannot load a compressed docker-archive, and Docker takes either.
    pub(crate) async fn load_archive(&self, path: &Path) -> Result<Vec<String>> {
        let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let shown = path.display().to_string();
        let (body, reader) = crate::pipe::spawn_writer(move |out| {
            use std::io::{Read, Seek};
            let mut magic = [0u8; 2];
            let gzip = file.read(&mut magic)? == 2 && magic == [0x1f, 0x8b];
            file.rewind()?;
            let file = std::io::BufReader::with_capacity(256 * 1024, file);
            if gzip {
                std::io::copy(&mut flate2::read::MultiGzDecoder::new(file), out)
                    .with_context(|| format!("cannot unpack {shown}"))?;
            } else {
                std::io::copy(&mut { file }, out).with_context(|| format!("cannot read {shown}"))?;
            }
            Ok(())
        });
        // Not quiet: Docker reports progress while it registers the layers, which the
        // watchdog takes as a sign of life.
        let options = ImportImageOptionsBuilder::default().quiet(false).build();
        let watch = self.watch(format!("loading {}", path.display()));
        let stream = self.docker.import_image_stream(options, watch.body(body), None);
        let loaded = collect_loaded(stream, path, &watch).await;
        let read = reader.await.map_err(|e| anyhow!("the archive reader failed: {e}"))?;
        match (loaded, read) {
            // The reader stopped because the engine did: the engine's failure is the news.
            (Err(e), Err(r)) if crate::pipe::receiver_stopped(&r) => Err(e),
            (_, Err(r)) => Err(r),
            (loaded, Ok(())) => loaded,
        }
    }
}

impl Engine {
    /// Loads an uncompressed docker-archive as it comes from `body` (a stream program's
    /// output, `shown` in messages), and returns the names of the images it loaded. A body
    /// that ends in an error fails the request, so the engine loads nothing of it. `body` has
    /// a watchdog of its own: the time it takes to make its next bytes is not this one's.
    pub(crate) async fn load_stream<S>(&self, body: S, shown: &str) -> Result<Vec<String>>
    where
        S: futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Unpin + 'static,
    {
        let options = ImportImageOptionsBuilder::default().quiet(false).build();
        let watch = self.watch(format!("loading {shown}"));
        let stream = self.docker.import_image_stream(options, watch.producer_body(body), None);
        collect_loaded(stream, Path::new(shown), &watch).await
    }
}

async fn collect_loaded(
    stream: impl futures::Stream<Item = Result<bollard::models::BuildInfo, bollard::errors::Error>>,
    path: &Path,
    watch: &Watch,
) -> Result<Vec<String>> {
    let mut stream = std::pin::pin!(stream);
    let mut loaded = Vec::new();
    while let Some(item) = watch.next(&mut stream).await? {
        let info =
            item.map_err(engine_err).with_context(|| format!("cannot load {} into the engine", path.display()))?;
        // Docker says "Loaded image: NAME" (or "Loaded image ID: …"); Podman says
        // "Loaded image: NAME" or "Loaded image(s): NAME,…".
        for text in [info.stream.as_deref(), info.status.as_deref()].into_iter().flatten() {
            for line in text.lines() {
                if let Some((_, names)) = line.split_once(": ") {
                    if line.starts_with("Loaded image") {
                        loaded.extend(names.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()));
                    }
                }
            }
        }
    }
    if loaded.is_empty() {
        bail!("the engine loaded {} but named no image", path.display());
    }
    Ok(loaded)
}

/// The usual places an engine listens, in the order tried.
pub(crate) fn default_candidates() -> Vec<String> {
    let mut paths: Vec<PathBuf> = vec![PathBuf::from("/var/run/docker.sock")];
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR") {
        let runtime = PathBuf::from(runtime);
        paths.push(runtime.join("docker.sock"));
        paths.push(runtime.join("podman/podman.sock"));
    }
    paths.push(PathBuf::from("/run/podman/podman.sock"));
    if let Some(home) = dirs::home_dir() {
        paths.push(home.join(".docker/run/docker.sock"));
        paths.push(home.join(".colima/default/docker.sock"));
        paths.push(home.join(".colima/docker.sock"));
        paths.push(home.join(".orbstack/run/docker.sock"));
        paths.push(home.join(".rd/docker.sock"));
    }
    let mut seen = Vec::new();
    for p in paths {
        let url = format!("unix://{}", p.display());
        if !seen.contains(&url) {
            seen.push(url);
        }
    }
    seen
}

/// bollard labels an image load `application/json`; Podman only takes `application/x-tar`
/// (which Docker takes too).
fn with_tar_content_type(docker: Docker) -> Docker {
    docker.with_request_modifier(|mut request| {
        if request.uri().path().ends_with("/images/load") {
            request
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-tar"));
        }
        request
    })
}

pub(crate) fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
}

fn is_conflict(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 409 | 500, message } if message.contains("exist"))
}

/// An engine failure as an error carrying the engine's own message.
pub(crate) fn engine_err(e: bollard::errors::Error) -> anyhow::Error {
    anyhow!("{}", engine_error_text(&e))
}

/// The engine's own message, without bollard's wrapping.
pub(crate) fn engine_error_text(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, message } => {
            format!("{} (HTTP {status_code})", message.trim())
        }
        bollard::errors::Error::DockerStreamError { error } => error.trim().to_string(),
        other => other.to_string(),
    }
}

/// `call` with the deadline every short engine request gets; the error names it.
pub(crate) async fn timed<F: std::future::Future>(what: &str, call: F) -> Result<F::Output> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| anyhow!("the engine did not answer {what} within {} s", CALL_TIMEOUT.as_secs()))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// `registry:5000/a/b:tag` -> (`registry:5000/a/b`, `tag`); a digest or no tag -> `latest`
/// only when neither is given.
pub(crate) fn split_image_tag(image: &str) -> (&str, &str) {
    if let Some((name, digest)) = image.split_once('@') {
        return (name, digest);
    }
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_tags_split_at_the_last_colon_after_the_last_slash() {
        assert_eq!(split_image_tag("nixos/nix:2.33.3"), ("nixos/nix", "2.33.3"));
        assert_eq!(split_image_tag("localhost:5000/nixos/nix"), ("localhost:5000/nixos/nix", "latest"));
        assert_eq!(split_image_tag("localhost:5000/nix:1"), ("localhost:5000/nix", "1"));
    }

    #[test]
    fn candidates_start_with_the_docker_socket_and_hold_podman() {
        let c = default_candidates();
        assert_eq!(c[0], "unix:///var/run/docker.sock");
        assert!(c.iter().any(|a| a == "unix:///run/podman/podman.sock"));
    }
}
