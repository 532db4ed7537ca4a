//! `nixctr gc`: removes the containers that killed runs left behind. A container belongs to
//! a run (labels `dev.nixctr.host` and `dev.nixctr.pid`); while that run's process is alive
//! on this machine its container is in use and stays. Store volumes are the cache, not
//! leftovers: `nixctr cache rm` removes those.

use std::collections::HashMap;

use anyhow::Result;

use crate::cli::GcArgs;
use crate::engine::{self, Engine, LABEL_HOST, LABEL_PID};
use crate::progress::Progress;
use crate::settings::Settings;

pub async fn run(settings: &Settings, args: GcArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let engine = Engine::connect(settings.engine.as_deref(), &progress).await?;
    let here = engine::hostname();
    let mut removed = 0;
    for (id, labels) in engine.labelled_containers().await? {
        if !args.all {
            if let Some(owner) = live_owner(&labels, &here) {
                progress.info(format!("kept container {} ({owner}; --all removes it anyway)", short(&id)));
                continue;
            }
        }
        engine.remove_container(&id).await?;
        progress.debug(format!("removed container {}", short(&id)));
        removed += 1;
    }
    progress.info(format!("removed {removed} container{}", if removed == 1 { "" } else { "s" }));
    Ok(())
}

/// Why a container is still in use, when it is: its run is alive here, or ran elsewhere.
fn live_owner(labels: &HashMap<String, String>, here: &str) -> Option<String> {
    let host = labels.get(LABEL_HOST)?;
    let pid: i32 = labels.get(LABEL_PID)?.parse().ok()?;
    if host != here {
        return Some(format!("made by nixctr run {pid} on {host}"));
    }
    is_nixctr_alive(pid).then(|| format!("nixctr run {pid} is still going"))
}

/// Whether `pid` is a live nixctr process (a reused PID running something else is not).
fn is_nixctr_alive(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| {
            let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(argv0).ends_with("nixctr")
        })
        .unwrap_or(false)
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dead_local_runs_are_leftovers() {
        let labels = |host: &str, pid: &str| {
            HashMap::from([(LABEL_HOST.to_string(), host.to_string()), (LABEL_PID.to_string(), pid.to_string())])
        };
        // PID 1 is alive but is not nixctr; a PID far above pid_max is not alive.
        assert_eq!(live_owner(&labels("here", "1"), "here"), None);
        assert_eq!(live_owner(&labels("here", "999999999"), "here"), None);
        assert!(live_owner(&labels("elsewhere", "5"), "here").unwrap().contains("elsewhere"));
        assert_eq!(live_owner(&HashMap::new(), "here"), None);
    }
}
