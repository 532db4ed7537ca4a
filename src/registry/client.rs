//! HTTP to one registry: scheme choice, authentication, retries.
//!
//! Every request goes through [`Client::send`], which attaches the current credentials,
//! answers a 401 by authenticating once (a bearer token that expired mid-push is fetched
//! again), and retries connection failures, 408, 429 and 5xx a bounded number of times.

use std::collections::BTreeSet;
use std::error::Error as _;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::header::{HeaderMap, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::auth::{parse_challenge, Challenge, Credentials};
use super::PushOptions;

/// Attempts per request, with a backoff of 0.25 s doubling in between (about 4 s in all).
const ATTEMPTS: u32 = 5;

pub struct Client {
    http: reqwest::Client,
    /// `https://host:port` or `http://host:port`.
    base: String,
    registry: String,
    creds: Option<Credentials>,
    notes: Vec<String>,
    /// The `Authorization` value sent with every request, once known.
    authorization: Mutex<Option<String>>,
    /// Token scopes asked for, so a renewed token covers every repository the push touches.
    scopes: std::sync::Mutex<BTreeSet<String>>,
    verbose: bool,
}

/// A response that is not what the caller wanted; callers inspect `status` and `code`.
#[derive(Debug, thiserror::Error)]
#[error("registry {registry} answered {status} to {what}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
pub struct Rejected {
    pub registry: String,
    pub status: StatusCode,
    pub what: String,
    /// The first `errors[].code` of a distribution error body (`MANIFEST_INVALID`).
    pub code: Option<String>,
    pub detail: Option<String>,
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

impl Client {
    /// Picks https or (where allowed) http by asking `/v2/`, and logs in when the registry
    /// asks for it, so bad credentials show before any work is done.
    pub async fn connect(opts: &PushOptions, api_host: &str, repository: &str) -> Result<Client> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(300))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("nixctr/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &opts.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read --ca-cert {}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|_| anyhow!("--ca-cert {}: not a PEM certificate file", ca.display()))?;
            if certs.is_empty() {
                bail!("--ca-cert {}: no certificate in the file (give a PEM file)", ca.display());
            }
            builder = builder.tls_certs_merge(certs);
        }
        if opts.insecure {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let http = builder.build().context("cannot set up the HTTP client")?;
        let mut client = Client {
            http,
            base: format!("https://{api_host}"),
            registry: opts.registry.clone(),
            creds: opts.credentials.clone(),
            notes: opts.credential_notes.clone(),
            authorization: Mutex::new(None),
            scopes: std::sync::Mutex::new(BTreeSet::from([format!("repository:{repository}:pull,push")])),
            verbose: opts.verbose,
        };
        client.pick_scheme(api_host, opts.plain_http_allowed).await?;
        let answer = client.send("GET /v2/", |http, base| http.get(format!("{base}/v2/"))).await?;
        if !answer.status().is_success() {
            return Err(client.rejected(answer, "GET /v2/ (is this a registry?)").await.into());
        }
        Ok(client)
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
                    root_cause(&tls_error)
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
                    root_cause(&tls_error)
                );
            }
            last = Some(tls_error);
        }
        let err = last.map(|e| root_cause(&e)).unwrap_or_default();
        bail!("cannot reach registry {}: {err} (is it running, and is the address right?)", self.registry)
    }

    /// `host[:port]` as the user named it.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn add_scope(&self, scope: String) {
        if let Ok(mut scopes) = self.scopes.lock() {
            scopes.insert(scope);
        }
    }

    /// Sends a request built by `make` (called again for every attempt, so bodies are fresh).
    pub async fn send(&self, what: &str, make: impl Fn(&reqwest::Client, &str) -> RequestBuilder) -> Result<Response> {
        let mut attempt = 0;
        let mut authenticated = false;
        loop {
            let mut request = make(&self.http, &self.base);
            if let Some(value) = self.authorization.lock().await.clone() {
                request = request.header(AUTHORIZATION, value);
            }
            let outcome = request.send().await;
            let retry_reason = match outcome {
                Err(e) => {
                    if attempt + 1 >= ATTEMPTS || !is_transient(&e) {
                        let cause = self.redact(&root_cause(&e));
                        bail!("{what} to registry {} failed: {cause} (is it still running?)", self.registry);
                    }
                    self.redact(&root_cause(&e))
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
            if self.verbose {
                eprintln!("{what}: {retry_reason}; retrying");
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
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
        match challenge {
            None | Some(Challenge::Basic) => {
                let Some(creds) = &self.creds else {
                    return Err(self.unauthorized("login"));
                };
                *self.authorization.lock().await = Some(creds.basic_header());
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
                    .map_err(|e| anyhow!("cannot get a token from {realm}: {}", self.redact(&root_cause(&e))))?;
                if answer.status() == StatusCode::UNAUTHORIZED || answer.status() == StatusCode::FORBIDDEN {
                    return Err(self.unauthorized(&format!("token request to {realm}")));
                }
                if !answer.status().is_success() {
                    return Err(self.rejected(answer, &format!("token request to {realm}")).await.into());
                }
                let token: TokenAnswer = answer
                    .json()
                    .await
                    .map_err(|_| anyhow!("token server {realm} answered something that is not a token"))?;
                let token = token
                    .token
                    .or(token.access_token)
                    .ok_or_else(|| anyhow!("token server {realm} answered without a token"))?;
                *self.authorization.lock().await = Some(format!("Bearer {token}"));
            }
        }
        Ok(())
    }

    /// Turns an unwanted answer into a [`Rejected`] error, reading the distribution error body.
    pub async fn rejected(&self, response: Response, what: &str) -> Rejected {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
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

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250 << attempt.min(6))
}

fn is_transient(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || e.is_request() || e.is_body() || e.is_decode()
}

/// Refused, unreachable, timed out, unknown host: worth another try, unlike a TLS mismatch.
fn is_network_failure(e: &reqwest::Error) -> bool {
    if e.is_timeout() {
        return true;
    }
    let text = format!("{e:?}").to_ascii_lowercase();
    ["refused", "unreachable", "timed out", "reset", "dns", "lookup", "resolve", "broken pipe"]
        .iter()
        .any(|w| text.contains(w))
}

fn is_certificate_failure(e: &reqwest::Error) -> bool {
    format!("{e:?}").to_ascii_lowercase().contains("certificate")
}

/// The innermost cause of a reqwest error ("connection refused"), which says the most.
pub fn root_cause(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message = s.to_string();
        source = s.source();
    }
    message
}
