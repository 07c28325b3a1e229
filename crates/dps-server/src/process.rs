//! What this process may use and has used: its open-file limit, raised at startup, and its CPU
//! time, for `/metrics` and the bench.
//!
//! Every connection is a file descriptor, so a listener allowed 16,384 connections needs as many,
//! while systemd starts a service with a soft limit of 1,024 (and a hard one of 524,288) and a
//! login shell often has 1,024 too. Past the limit `accept` fails and devices are turned away
//! however high `max_connections` is.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors for what is not a device connection: the database files and connections, the
/// connections to hubs and webhooks, the log.
pub const HEADROOM: u64 = 1024;

/// Raises the soft limit of open files to the hard limit, as far as the process may, and returns
/// the limit now in force (`None`: unlimited). Warns when it is below `connections` (what the
/// listeners may hold at once) plus [`HEADROOM`], and says what to change.
pub fn raise_open_files(connections: u64) -> Option<u64> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let limit = match (current, maximum) {
        (Some(soft), hard) if hard.is_none_or(|hard| hard > soft) => {
            match setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: hard,
                    maximum: hard,
                },
            ) {
                Ok(()) => hard,
                Err(err) => {
                    tracing::debug!(%err, soft, "the open-file limit could not be raised");
                    Some(soft)
                }
            }
        }
        (soft, _) => soft,
    };
    let needed = connections.saturating_add(HEADROOM);
    match limit {
        Some(limit) if limit < needed => tracing::warn!(
            limit,
            connections,
            "this process may open at most {limit} files, and its listeners accept up to {connections} connections (a file each) with {HEADROOM} files more for the rest: raise LimitNOFILE in the systemd unit (or `ulimit -n`), or lower max_connections"
        ),
        _ => tracing::debug!(?limit, "open-file limit"),
    }
    limit
}

/// The CPU time this process has used, user and system, in seconds; `None` where /proc does not
/// tell (not Linux).
pub fn cpu_seconds() -> Option<f64> {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| cpu_seconds_of_stat(&stat))
}

/// utime + stime of a /proc/PID/stat line, in seconds: fields 14 and 15, counted after the command
/// name (which may hold spaces and parentheses), in Linux's USER_HZ of 100 ticks a second.
fn cpu_seconds_of_stat(stat: &str) -> Option<f64> {
    const USER_HZ: f64 = 100.0;
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    // After the name come the state (field 3) and ten more fields before utime (field 14).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    #[allow(clippy::cast_precision_loss)]
    Some((utime + stime) as f64 / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        let stat = "1234 (opendps (a) b) S 1 1234 1234 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 8 0";
        assert_eq!(cpu_seconds_of_stat(stat), Some(3.0));
        assert_eq!(cpu_seconds_of_stat("1234 (opendps) S 1"), None);
        let own = std::fs::read_to_string("/proc/self/stat").expect("Linux");
        assert!(cpu_seconds_of_stat(&own).is_some_and(|s| s >= 0.0));
        assert!(cpu_seconds().is_some_and(|s| s >= 0.0));
    }

    /// The soft limit is raised to the hard one (each test runs in a process of its own).
    #[test]
    fn the_soft_limit_goes_up_to_the_hard_one() {
        let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
        if let (Some(soft), Some(hard)) = (current, maximum)
            && soft == hard
        {
            // Nothing to raise: lower the soft limit first, as a fresh service would find it.
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(soft.min(512)),
                    maximum: Some(hard),
                },
            )
            .expect("lowering the soft limit");
        }
        let raised = raise_open_files(0);
        assert_eq!(raised, maximum);
        assert_eq!(getrlimit(Resource::Nofile).current, maximum);
    }
}
