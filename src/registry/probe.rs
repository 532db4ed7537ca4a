//! What `nixctr doctor` asks a registry, one step at a time, each step's outcome kept apart:
//! which credentials were found, whether the registry is reached, what `/v2/` answers without
//! them, and whether the login it asks for (a token fetch, or Basic) is accepted. The same
//! client as a push, so what passes here passes there.

use anyhow::{anyhow, Result};
use reqwest::StatusCode;

use super::auth::Challenge;
use super::client::Client;
use super::RegistryConfig;
use crate::progress::Progress;

/// The outcome of each step; a step after one that failed is `None` (not tried).
pub(crate) struct Probe {
    /// `user "NAME" from SOURCE` (never the secret); `None`: anonymous.
    pub(crate) credentials: Result<Option<String>>,
    /// Where it answered (`https://host:port`, or `http://` where allowed).
    pub(crate) reach: Option<Result<String>>,
    /// What `GET /v2/` answers without credentials.
    pub(crate) api: Option<Result<String>>,
    /// The login `/v2/` asks for; `None` also when it asks for none.
    pub(crate) login: Option<Result<String>>,
}

impl RegistryConfig {
    /// Asks `registry` (`host[:port]`) what a push would, step by step.
    pub(crate) async fn probe(&self, registry: &str, progress: &Progress) -> Probe {
        let mut probe = Probe { credentials: Ok(None), reach: None, api: None, login: None };
        let target = match self.target(registry) {
            Ok(target) => target,
            Err(e) => {
                probe.credentials = Err(e);
                return probe;
            }
        };
        probe.credentials = Ok(target.credentials.as_ref().map(|c| format!("user {:?} from {}", c.username, c.source)));
        let mut client = match Client::new(&target, progress) {
            Ok(client) => client,
            Err(e) => {
                probe.reach = Some(Err(e));
                return probe;
            }
        };
        match client.reach(&target).await {
            Ok(base) => probe.reach = Some(Ok(format!("{registry} answers at {base}"))),
            Err(e) => {
                probe.reach = Some(Err(e));
                return probe;
            }
        }
        let (status, challenge) = match client.anonymous_v2().await {
            Ok(answer) => answer,
            Err(e) => {
                probe.api = Some(Err(e));
                return probe;
            }
        };
        if status.is_success() {
            probe.api = Some(Ok(format!("answers {status} without a login")));
            return probe;
        }
        if status != StatusCode::UNAUTHORIZED {
            probe.api = Some(Err(anyhow!("registry {registry} answered {status} to GET /v2/ (is this a registry?)")));
            return probe;
        }
        let (asks, how) = match &challenge {
            Some(Challenge::Bearer { realm, .. }) => (format!("a token from {realm}"), "a token fetch"),
            Some(Challenge::Basic) | None => ("a Basic login".to_string(), "Basic"),
        };
        probe.api = Some(Ok(format!("answers {status}, asking for {asks}")));
        probe.login = Some(match client.login().await {
            Ok(()) => Ok(match &target.credentials {
                Some(c) => format!("the credentials of user {:?} from {} are accepted ({how})", c.username, c.source),
                None => format!("an anonymous login is accepted ({how})"),
            }),
            Err(e) => Err(e),
        });
        probe
    }
}
