//! Which nixctr run a container belongs to. Every container carries the labels
//! [`LABEL_HOST`](super::LABEL_HOST) and [`LABEL_PID`](super::LABEL_PID); while that run's
//! process is alive on this machine, its container is in use.

use std::collections::HashMap;

use super::{LABEL_HOST, LABEL_PID};

/// This machine's name, for [`LABEL_HOST`].
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// Why a container is still in use, when it is: its run is alive here, or ran elsewhere.
pub(crate) fn live_owner(labels: &HashMap<String, String>, here: &str) -> Option<String> {
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
