//! HTTP to one registry host: scheme choice, authentication, timeouts, retries.
//!
//! Requests go through [`Client::send`], which attaches the current credentials,
//! answers a 401 by authenticating once (a bearer token that expired mid-push, or that does
//! not cover a repository the session has since touched, is fetched again), and retries
//! connection failures, 408, 429 and 5xx a bounded number of times. Requests carrying blob
//! bytes go through [`Client::send_upload`] instead, which sends once: `upload.rs` asks the
//! registry where a cut-off upload stands rather than sending it all again. The endpoints
//! themselves are in `api.rs` and `upload.rs`.

use std::collections::BTreeSet;
use std::error::Error as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::header::{HeaderMap, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::auth::{parse_challenge, Challenge, Credentials};
use super::Target;
use crate::progress::Progress;

/// Attempts per request, with a backoff of 0.25 s doubling in between (about 4 s in all).
const ATTEMPTS: u32 = 5;
/// A registry that does not take the connection by then is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest a registry may stay silent: before its answer, and between chunks of a body
/// (in either direction). Long, because committing a big blob to object storage is slow.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);
/// The most of an error answer's body read: distribution error bodies are a few hundred
/// bytes, and a hostile or broken server may send without end.
const ERROR_BODY_LIMIT: usize = 64 << 10;
/// The most of a token server's answer read: tokens are JWTs of a few KiB.
const TOKEN_BODY_LIMIT: usize = 1 << 20;
/// Timed-out attempts per request: a registry that hung once is likely to hang again, and
/// each wait is long.
const TIMEOUT_ATTEMPTS: u32 = 2;

pub(crate) struct Client {
    /// For requests with small bodies: a read timeout covers them from start to answer.
    http: reqwest::Client,
    /// For streamed uploads, whose sending may take longer than any fixed timeout: watched
    /// by an [`Activity`] instead.
    upload_http: reqwest::Client,
    /// `https://host:port` or `http://host:port`.
    base: String,
    registry: String,
    creds: Option<Credentials>,
    notes: Vec<String>,
    /// The `Authorization` value sent with every request, once known. Held while a token is
    /// fetched, so concurrent pushes fetch one after another and the last token covers all.
    authorization: Mutex<Option<String>>,
    /// Token scopes asked for, so a renewed token covers every repository the session touches.
    scopes: std::sync::Mutex<BTreeSet<String>>,
    progress: Progress,
}

/// A response that is not what the caller wanted; callers inspect `status` and `code`.
#[derive(Debug, thiserror::Error)]
#[error("registry {registry} answered {status} to {what}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
pub(crate) struct Rejected {
    pub registry: String,
    pub status: StatusCode,
    pub what: String,
    /// The first `errors[].code` of a distribution error body (`MANIFEST_INVALID`).
    pub code: Option<String>,
    pub detail: Option<String>,
}

/// When a streamed upload last made progress; a stall longer than [`ANSWER_TIMEOUT`] fails it.
#[derive(Clone)]
pub(crate) struct Activity {
    // tokio's clock, so tests can pause it.
    start: tokio::time::Instant,
    /// Milliseconds from `start` to the last chunk sent.
    last: Arc<AtomicU64>,
}

impl Activity {
    pub fn new() -> Activity {
        Activity { start: tokio::time::Instant::now(), last: Arc::default() }
    }

    pub fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing has happened for `limit`.
    async fn stalled(&self, limit: Duration) {
        loop {
            let idle = self.start.elapsed().saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)));
            if idle >= limit {
                return;
            }
            tokio::time::sleep(limit - idle).await;
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorItem>,
}

#[derive(Deserialize)]
struct ErrorItem {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// What became of an upload request: the registry's answer, or the request cut off
/// (connection dropped, no progress): the caller asks the registry where the upload stands.
pub(crate) enum Sent {
    Answer(Response),
    Cut(anyhow::Error),
}

/// Why an attempt got no answer.
enum Failure {
    Http(reqwest::Error),
    Stalled,
}

fn http_client(target: &Target, certs: &[reqwest::Certificate], read_timeout: bool) -> Result<reqwest::Client> {
    crate::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!("nixctr/", env!("CARGO_PKG_VERSION")));
    if read_timeout {
        builder = builder.read_timeout(ANSWER_TIMEOUT);
    }
    if !certs.is_empty() {
        builder = builder.tls_certs_merge(certs.to_vec());
    }
    if target.insecure {
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    builder.build().context("cannot set up the HTTP client")
}

impl Client {
    /// Picks https or (where allowed) http by asking `/v2/`, and logs in when the registry
    /// asks for it, so bad credentials show before any work is done.
    pub async fn connect(target: &Target, progress: &Progress) -> Result<Client> {
        let mut client = Client::new(target, progress)?;
        client.pick_scheme(&target.api_host, target.plain_http_allowed).await?;
        client.login().await?;
        Ok(client)
    }

    /// A client that has not spoken to the registry yet: `reach` and `login` do, one step each
    /// (`doctor` reports them apart).
    pub(super) fn new(target: &Target, progress: &Progress) -> Result<Client> {
        let mut certs = Vec::new();
        if let Some(ca) = &target.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read --ca-cert {}", ca.display()))?;
            certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|_| anyhow!("--ca-cert {}: not a PEM certificate file", ca.display()))?;
            if certs.is_empty() {
                bail!("--ca-cert {}: no certificate in the file (give a PEM file)", ca.display());
            }
        }
        Ok(Client {
            http: http_client(target, &certs, true)?,
            upload_http: http_client(target, &certs, false)?,
            base: format!("https://{}", target.api_host),
            registry: target.registry.clone(),
            creds: target.credentials.clone(),
            notes: target.credential_notes.clone(),
            authorization: Mutex::new(None),
            scopes: std::sync::Mutex::default(),
            progress: progress.clone(),
        })
    }

    /// Picks https or (where allowed) plain http, and returns the base URL picked.
    pub(super) async fn reach(&mut self, target: &Target) -> Result<&str> {
        self.pick_scheme(&target.api_host, target.plain_http_allowed).await?;
        Ok(&self.base)
    }

    /// `GET /v2/` without credentials: the status, and the `WWW-Authenticate` challenge of a 401.
    pub(super) async fn anonymous_v2(&self) -> Result<(StatusCode, Option<Challenge>)> {
        let answer = self
            .http
            .get(format!("{}/v2/", self.base))
            .send()
            .await
            .map_err(|e| self.failed("GET /v2/", &Failure::Http(e)))?;
        let challenge = answer
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(parse_challenge)
            .max_by_key(|c| matches!(c, Challenge::Bearer { .. }));
        Ok((answer.status(), challenge))
    }

    /// `GET /v2/`, logging in (a token fetch, or Basic) when the registry asks, so bad
    /// credentials show before any work is done.
    pub(super) async fn login(&self) -> Result<()> {
        let answer = self.send("GET /v2/", |http, base| http.get(format!("{base}/v2/"))).await?;
        if !answer.status().is_success() {
            return Err(self.rejected(answer, "GET /v2/ (is this a registry?)").await.into());
        }
        Ok(())
    }

    async fn pick_scheme(&mut self, api_host: &str, http_allowed: bool) -> Result<()> {
        let https = format!("https://{api_host}");
        let plain = format!("http://{api_host}");
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt - 1)).await;
            }
            let tls_error = match self.http.get(format!("{https}/v2/")).send().await {
                Ok(_) => {
                    self.base = https;
                    return Ok(());
                }
                Err(e) => e,
            };
            // A certificate complaint means the server speaks TLS: plain http is no way out.
            if is_certificate_failure(&tls_error) {
                bail!(
                    "cannot reach registry {} over https: {} (pass --ca-cert FILE for a private CA, or --insecure to skip the check)",
                    self.registry,
                    describe(&tls_error)
                );
            }
            if http_allowed {
                match self.http.get(format!("{plain}/v2/")).send().await {
                    Ok(_) => {
                        self.base = plain;
                        return Ok(());
                    }
                    Err(e) => {
                        last = Some(if tls_error.is_connect() && !e.is_connect() { tls_error } else { e });
                        continue;
                    }
                }
            }
            if !is_network_failure(&tls_error) {
                bail!(
                    "cannot reach registry {} over https: {} (a registry on plain http needs --insecure, or insecure-registries in nixctr.toml)",
                    self.registry,
                    describe(&tls_error)
                );
            }
            last = Some(tls_error);
        }
        let err = last.map(|e| describe(&e)).unwrap_or_default();
        bail!("cannot reach registry {}: {err} (is it running, and is the address right?)", self.registry)
    }

    /// A line for `-v`.
    pub fn debug(&self, line: String) {
        self.progress.debug(line);
    }

    /// `host[:port]` as the user named it.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Asks for `scope` in every token from now on (`repository:team/app:pull,push`).
    pub fn add_scope(&self, scope: String) {
        if let Ok(mut scopes) = self.scopes.lock() {
            scopes.insert(scope);
        }
    }

    /// Sends a request built by `make` (called again for every attempt, so bodies are fresh).
    pub async fn send(&self, what: &str, make: impl Fn(&reqwest::Client, &str) -> RequestBuilder) -> Result<Response> {
        self.send_with(what, make).await
    }

    /// Sends an upload request once: a request that carried part of a blob is not simply sent
    /// again (the registry may have kept part of it), so a cut-off request is [`Sent::Cut`]
    /// and any answer is the caller's. A 401 is answered by authenticating and sending anew.
    pub async fn send_upload(
        &self,
        what: &str,
        activity: &Activity,
        make: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Sent> {
        let mut authenticated = false;
        loop {
            let mut request = make(&self.upload_http);
            if let Some(value) = self.authorization.lock().await.clone() {
                request = request.header(AUTHORIZATION, value);
            }
            activity.touch();
            let outcome = tokio::select! {
                outcome = request.send() => outcome.map_err(Failure::Http),
                () = activity.stalled(ANSWER_TIMEOUT) => Err(Failure::Stalled),
            };
            match outcome {
                Err(Failure::Http(e)) if !is_transient(&e) => return Err(self.failed(what, &Failure::Http(e))),
                Err(failure) => return Ok(Sent::Cut(self.failed(what, &failure))),
                Ok(answer) if answer.status() == StatusCode::UNAUTHORIZED && !authenticated => {
                    authenticated = true;
                    self.authenticate(answer.headers()).await?;
                }
                Ok(answer) if answer.status() == StatusCode::UNAUTHORIZED => return Err(self.unauthorized(what)),
                Ok(answer) => return Ok(Sent::Answer(answer)),
            }
        }
    }

    async fn send_with(&self, what: &str, make: impl Fn(&reqwest::Client, &str) -> RequestBuilder) -> Result<Response> {
        let mut attempt = 0;
        let mut timeouts = 0;
        let mut authenticated = false;
        loop {
            let mut request = make(&self.http, &self.base);
            if let Some(value) = self.authorization.lock().await.clone() {
                request = request.header(AUTHORIZATION, value);
            }
            let outcome = request.send().await.map_err(Failure::Http);
            let retry_reason = match outcome {
                Err(failure) => {
                    let (timed_out, transient) = match &failure {
                        Failure::Http(e) => (e.is_timeout(), is_transient(e)),
                        Failure::Stalled => (true, true),
                    };
                    timeouts += u32::from(timed_out);
                    if attempt + 1 >= ATTEMPTS || !transient || timeouts >= TIMEOUT_ATTEMPTS {
                        return Err(self.failed(what, &failure));
                    }
                    match &failure {
                        Failure::Http(e) => self.redact(&describe(e)),
                        Failure::Stalled => format!("no progress for {} s", ANSWER_TIMEOUT.as_secs()),
                    }
                }
                Ok(response) => {
                    let status = response.status();
                    if status == StatusCode::UNAUTHORIZED && !authenticated {
                        authenticated = true;
                        self.authenticate(response.headers()).await?;
                        continue;
                    }
                    if status == StatusCode::UNAUTHORIZED {
                        return Err(self.unauthorized(what));
                    }
                    let transient = status == StatusCode::REQUEST_TIMEOUT
                        || status == StatusCode::TOO_MANY_REQUESTS
                        || status.is_server_error();
                    if !transient || attempt + 1 >= ATTEMPTS {
                        return Ok(response);
                    }
                    status.to_string()
                }
            };
            self.progress.debug(format!("{what}: {retry_reason}; retrying"));
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
        }
    }

    fn failed(&self, what: &str, failure: &Failure) -> anyhow::Error {
        match failure {
            Failure::Http(e) if e.is_timeout() && !e.is_connect() => anyhow!(
                "registry {} did not answer {what} within {} s (is it overloaded or stuck?)",
                self.registry,
                ANSWER_TIMEOUT.as_secs()
            ),
            Failure::Stalled => anyhow!(
                "registry {} took no data for {what} within {} s (is it overloaded or stuck?)",
                self.registry,
                ANSWER_TIMEOUT.as_secs()
            ),
            Failure::Http(e) => {
                let cause = self.redact(&describe(e));
                anyhow!("{what} to registry {} failed: {cause} (is it still running?)", self.registry)
            }
        }
    }

    fn unauthorized(&self, what: &str) -> anyhow::Error {
        match &self.creds {
            Some(c) => anyhow!(
                "registry {} rejected the credentials of user {:?} from {} (401 Unauthorized on {what}; check the user name and password)",
                self.registry,
                c.username,
                c.source
            ),
            None => {
                let passed_over: String = self.notes.iter().map(|n| format!("; passed over: {n}")).collect();
                anyhow!(
                    "registry {} requires credentials (401 Unauthorized on {what}; log in with `podman login` or `docker login`, \
                     pass --username with --password-stdin, or set NIXCTR_REGISTRY_USERNAME and NIXCTR_REGISTRY_PASSWORD){passed_over}",
                    self.registry
                )
            }
        }
    }

    /// Answers a 401's challenge: Basic sends the credentials, Bearer fetches a token.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<()> {
        let challenge = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(parse_challenge)
            .max_by_key(|c| matches!(c, Challenge::Bearer { .. }));
        let mut authorization = self.authorization.lock().await;
        match challenge {
            None | Some(Challenge::Basic) => {
                let Some(creds) = &self.creds else {
                    return Err(self.unauthorized("login"));
                };
                *authorization = Some(creds.basic_header());
            }
            Some(Challenge::Bearer { realm, service, scope }) => {
                if let Some(scope) = scope {
                    self.add_scope(scope);
                }
                let scopes: Vec<String> = self.scopes.lock().map(|s| s.iter().cloned().collect()).unwrap_or_default();
                let mut query: Vec<(&str, &str)> = scopes.iter().map(|s| ("scope", s.as_str())).collect();
                if let Some(service) = &service {
                    query.push(("service", service));
                }
                let mut request = self.http.get(&realm).query(&query);
                if let Some(creds) = &self.creds {
                    request = request.header(AUTHORIZATION, creds.basic_header());
                }
                let answer = request
                    .send()
                    .await
                    .map_err(|e| anyhow!("cannot get a token from {realm}: {}", self.redact(&describe(&e))))?;
                if answer.status() == StatusCode::UNAUTHORIZED || answer.status() == StatusCode::FORBIDDEN {
                    return Err(self.unauthorized(&format!("token request to {realm}")));
                }
                if !answer.status().is_success() {
                    return Err(self.rejected(answer, &format!("token request to {realm}")).await.into());
                }
                let body = read_limited(answer, TOKEN_BODY_LIMIT)
                    .await
                    .map_err(|e| anyhow!("cannot read the token from {realm}: {}", self.redact(&describe(&e))))?;
                let token: TokenAnswer = serde_json::from_slice(&body.bytes).map_err(|_| {
                    let cut =
                        if body.cut { format!(" (more than {} KiB)", TOKEN_BODY_LIMIT >> 10) } else { String::new() };
                    anyhow!("token server {realm} answered something that is not a token{cut}")
                })?;
                let token = token
                    .token
                    .or(token.access_token)
                    .ok_or_else(|| anyhow!("token server {realm} answered without a token"))?;
                *authorization = Some(format!("Bearer {token}"));
            }
        }
        Ok(())
    }

    /// Turns an unwanted answer into a [`Rejected`] error, reading the distribution error body.
    pub async fn rejected(&self, response: Response, what: &str) -> Rejected {
        let status = response.status();
        let body = read_limited(response, ERROR_BODY_LIMIT).await.map(|b| b.bytes).unwrap_or_default();
        let body = String::from_utf8_lossy(&body);
        let (code, detail) = match serde_json::from_str::<ErrorBody>(&body) {
            Ok(parsed) if !parsed.errors.is_empty() => {
                let first = &parsed.errors[0];
                (Some(first.code.clone()), Some(format!("{}: {}", first.code, first.message)))
            }
            _ => {
                let text: String = body.trim().chars().take(300).collect();
                (None, (!text.is_empty()).then_some(text))
            }
        };
        Rejected {
            registry: self.registry.clone(),
            status,
            what: what.to_string(),
            code,
            detail: detail.map(|d| self.redact(&d)),
        }
    }

    fn redact(&self, text: &str) -> String {
        match &self.creds {
            Some(c) => c.redact(text),
            None => text.to_string(),
        }
    }

    /// Absolute URL for a `Location` header, which may be relative.
    pub fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}{}", self.base, location)
        }
    }
}

/// The first bytes of a body, streamed: never more than `limit` are held, and the rest is
/// not read at all (the connection is dropped rather than drained).
struct Limited {
    bytes: Vec<u8>,
    /// Whether the body went on past `limit`.
    cut: bool,
}

async fn read_limited(mut response: Response, limit: usize) -> reqwest::Result<Limited> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - bytes.len();
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            return Ok(Limited { bytes, cut: true });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Limited { bytes, cut: false })
}

pub(super) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250 << attempt.min(6))
}

fn is_transient(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || e.is_request() || e.is_body() || e.is_decode()
}

/// The `std::io::Error`s under a reqwest error, outermost first. An `io::Error`'s `source`
/// skips the error it wraps (that error's own source comes next), so wrapped ones are
/// reached through `get_ref`.
fn io_errors(e: &reqwest::Error) -> Vec<&std::io::Error> {
    let mut found = Vec::new();
    let mut next = e.source();
    while let Some(err) = next {
        let mut inner = err.downcast_ref::<std::io::Error>();
        while let Some(io) = inner {
            found.push(io);
            inner = io.get_ref().and_then(|e| e.downcast_ref::<std::io::Error>());
        }
        next = err.source();
    }
    found
}

/// rustls reports a failed handshake as an `InvalidData` I/O error: the server spoke
/// something other than acceptable TLS (a bad certificate, or plain http).
fn tls_failure(e: &reqwest::Error) -> Option<&std::io::Error> {
    io_errors(e).into_iter().find(|io| io.kind() == std::io::ErrorKind::InvalidData)
}

/// Refused, unreachable, timed out, reset, unknown host: worth another try, unlike a TLS
/// mismatch (a plain http server answering the TLS hello).
fn is_network_failure(e: &reqwest::Error) -> bool {
    e.is_timeout() || (e.is_connect() && tls_failure(e).is_none())
}

/// A TLS handshake that failed on the server's certificate. rustls's error type is not a
/// dependency of nixctr, so below the typed `InvalidData` check its message has to say it.
fn is_certificate_failure(e: &reqwest::Error) -> bool {
    tls_failure(e).is_some_and(|io| io.to_string().to_ascii_lowercase().contains("certificate"))
}

/// What went wrong, in a few words: the timeout that ran out, or the innermost cause
/// ("connection refused"), which says the most.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        let (what, limit) =
            if e.is_connect() { ("no connection", CONNECT_TIMEOUT) } else { ("no answer", ANSWER_TIMEOUT) };
        return format!("{what} within {} s", limit.as_secs());
    }
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message = s.to_string();
        source = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    // Paused time: the clock moves only when every task waits, so this cannot flake.
    #[tokio::test(start_paused = true)]
    async fn activity_stalls_only_when_idle() {
        let activity = Activity::new();
        let limit = Duration::from_millis(150);
        let toucher = {
            let activity = activity.clone();
            async move {
                for _ in 0..4 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    activity.touch();
                }
            }
        };
        let started = tokio::time::Instant::now();
        tokio::join!(toucher, activity.stalled(limit));
        // Touched until 200 ms, so the stall ends at 200 + 150 ms.
        assert_eq!(started.elapsed().as_millis(), 350);
    }

    /// An endless body: what a hostile server could send as an error or a token.
    fn endless() -> Response {
        let chunk = bytes::Bytes::from(vec![b'x'; 10_000]);
        let stream = futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
        Response::from(http::Response::new(reqwest::Body::wrap_stream(stream)))
    }

    #[tokio::test]
    async fn bodies_are_read_only_up_to_a_limit() {
        let body = read_limited(endless(), ERROR_BODY_LIMIT).await.unwrap();
        assert!(body.cut);
        assert_eq!(body.bytes.len(), ERROR_BODY_LIMIT);
        let short = Response::from(http::Response::new(reqwest::Body::from("{\"errors\": []}")));
        let body = read_limited(short, ERROR_BODY_LIMIT).await.unwrap();
        assert!(!body.cut);
        assert_eq!(body.bytes, b"{\"errors\": []}");
    }

    #[tokio::test]
    async fn refused_connections_are_network_failures_not_tls() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        crate::tls::install_crypto_provider();
        let e = reqwest::Client::new().get(format!("https://127.0.0.1:{port}/v2/")).send().await.unwrap_err();
        assert!(is_network_failure(&e) && !is_certificate_failure(&e), "{e:?}");
        assert!(!describe(&e).is_empty());
    }
}
