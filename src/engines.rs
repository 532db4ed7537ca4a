//! The engines one run builds on: those named (`--engine` repeated, `engines` in nixctr.toml),
//! over which the selected containers are spread, and per platform the one
//! `[platform-engines]` names, so each platform builds natively where it can. nixctr grows no
//! scheduler of its own: the longest builds (by the last time each took) go first, each to the
//! engine with the least work so far; with no times known that is round robin.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;

use crate::engine::{Engine, EngineAddress};
use crate::platform::Platform;
use crate::progress::Progress;

/// The engines a run may use, resolved from flags, environment and nixctr.toml.
#[derive(Debug, Clone, Default)]
pub(crate) struct EngineChoice {
    /// The engine of commands that use one; `None`: probe the usual sockets.
    pub(crate) first: Option<EngineAddress>,
    /// Every engine named; builds spread over them when there are several.
    pub(crate) all: Vec<EngineAddress>,
    /// `[platform-engines]`: platform (normalised, `linux/arm64`) -> the engine that builds it.
    pub(crate) by_platform: BTreeMap<String, EngineAddress>,
}

/// Connected engines; `general` is empty when every platform asked for has an engine of its own.
pub(crate) struct Engines {
    general: Vec<Engine>,
    by_platform: Vec<(Platform, Engine)>,
}

/// Which engine builds a target: an index into the general engines or the platform ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pick {
    General(usize),
    Platform(usize),
}

impl Engines {
    /// Connects what a build for `platforms` (empty: the engines' own) needs.
    pub(crate) async fn connect(choice: &EngineChoice, platforms: &[Platform], progress: &Progress) -> Result<Engines> {
        let mut by_platform = Vec::new();
        for platform in platforms {
            if let Some(address) = choice.by_platform.get(&platform.to_string()) {
                progress.debug(format!("engine for {platform}: {} ([platform-engines])", address.url));
                by_platform.push((platform.clone(), Engine::connect(Some(address), progress).await?));
            }
        }
        let needs_general = platforms.is_empty() || platforms.len() > by_platform.len();
        let general = if needs_general { Engines::named(choice, progress).await? } else { Vec::new() };
        Ok(Engines { general, by_platform })
    }

    /// Every engine named (`--engine` repeated, `engines` in nixctr.toml), at once; else the
    /// one the address precedence finds.
    pub(crate) async fn named(choice: &EngineChoice, progress: &Progress) -> Result<Vec<Engine>> {
        if choice.all.len() > 1 {
            let connecting = choice.all.iter().map(|a| Engine::connect(Some(a), progress));
            futures::future::try_join_all(connecting).await
        } else {
            Ok(vec![Engine::connect(choice.first.as_ref(), progress).await?])
        }
    }

    pub(crate) fn get(&self, pick: Pick) -> &Engine {
        match pick {
            Pick::General(i) => &self.general[i],
            Pick::Platform(i) => &self.by_platform[i].1,
        }
    }

    /// More than one engine takes part.
    pub(crate) fn several(&self) -> bool {
        self.general.len() + self.by_platform.len() > 1
    }

    /// The engine whose address is `address`.
    pub(crate) fn by_address(&self, address: &str) -> Option<&Engine> {
        self.general.iter().chain(self.by_platform.iter().map(|(_, e)| e)).find(|e| e.address() == address)
    }

    /// An engine for each (name, platform), in order: the platform's own engine when it has
    /// one, else the general engines, longest build first onto the least loaded.
    pub(crate) fn assign(&self, targets: &[(&str, Option<&Platform>)]) -> Vec<Pick> {
        let times = BuildTimes::load();
        let mut picks: Vec<Option<Pick>> = targets
            .iter()
            .map(|(_, platform)| {
                let own = platform.and_then(|p| self.by_platform.iter().position(|(q, _)| q == p));
                own.map(Pick::Platform)
            })
            .collect();
        let known: Vec<f64> = targets.iter().filter_map(|(n, _)| times.get(n)).collect();
        let typical = if known.is_empty() { 1.0 } else { known.iter().sum::<f64>() / known.len() as f64 };
        let mut order: Vec<usize> = (0..targets.len()).filter(|&i| picks[i].is_none()).collect();
        // Stable: equal (unknown) times keep the selection's order, which makes round robin.
        order.sort_by(|&a, &b| {
            let (ta, tb) = (times.get(targets[a].0).unwrap_or(typical), times.get(targets[b].0).unwrap_or(typical));
            tb.total_cmp(&ta)
        });
        let mut load = vec![0.0f64; self.general.len().max(1)];
        for i in order {
            let least = (0..load.len()).min_by(|&a, &b| load[a].total_cmp(&load[b])).unwrap_or(0);
            load[least] += times.get(targets[i].0).unwrap_or(typical);
            picks[i] = Some(Pick::General(least));
        }
        picks.into_iter().map(|p| p.unwrap_or(Pick::General(0))).collect()
    }
}

/// How long each container's last build took, in `~/.cache/nixctr/build-times.json`. A file
/// that does not parse is ignored (it is only a hint for spreading builds).
pub(crate) struct BuildTimes {
    path: Option<PathBuf>,
    seconds: BTreeMap<String, f64>,
}

impl BuildTimes {
    pub(crate) fn load() -> BuildTimes {
        let path = dirs::cache_dir().map(|d| d.join("nixctr").join("build-times.json"));
        let seconds = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|bytes| serde_json::from_slice::<BTreeMap<String, f64>>(&bytes).ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, s)| s.is_finite() && *s >= 0.0)
            .collect();
        BuildTimes { path, seconds }
    }

    fn get(&self, name: &str) -> Option<f64> {
        self.seconds.get(name).copied()
    }

    /// Records what this run measured; a failure to save is no failure of the build.
    pub(crate) fn record(mut self, measured: impl IntoIterator<Item = (String, f64)>) {
        self.seconds.extend(measured);
        let Some(path) = &self.path else { return };
        if let (Some(dir), Ok(json)) = (path.parent(), serde_json::to_vec_pretty(&self.seconds)) {
            let _ = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(path, json));
        }
    }
}
