//! Where this process stands in a multi-process run, read from the variables torchrun sets
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; Slurm
//! users export the same from `srun`), and the timeouts of the distributed layer
//! (`NOPAD_RENDEZVOUS_TIMEOUT`, `NOPAD_NCCL_TIMEOUT`).
//!
//! Every reader takes the lookup as a closure, so tests never touch the process environment;
//! the `from_env` forms pass `std::env`.

use std::time::Duration;

use super::DistError;

/// The variables a launcher sets for each worker, in the order [`World`]'s fields read them.
pub const WORLD_VARS: [&str; 6] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
];

/// The variable that sets the rendezvous timeout, in seconds (default 300).
pub const RENDEZVOUS_TIMEOUT_VAR: &str = "NOPAD_RENDEZVOUS_TIMEOUT";
/// The variable that sets the NCCL setup and collective timeout, in seconds (default 60).
pub const NCCL_TIMEOUT_VAR: &str = "NOPAD_NCCL_TIMEOUT";

/// This process's place in a multi-process run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    /// Global rank, `0..world_size` (`RANK`).
    pub rank: usize,
    /// Number of processes in the run (`WORLD_SIZE`).
    pub world_size: usize,
    /// Rank on this host, `0..local_world_size` (`LOCAL_RANK`): the GPU this process uses.
    pub local_rank: usize,
    /// Processes on this host (`LOCAL_WORLD_SIZE`).
    pub local_world_size: usize,
    /// Host of rank 0's rendezvous (`MASTER_ADDR`).
    pub master_addr: String,
    /// Port of rank 0's rendezvous (`MASTER_PORT`).
    pub master_port: u16,
}

impl World {
    /// The world of this process from its environment: `None` when `WORLD_SIZE` is unset (a
    /// plain single-process run), else every variable of [`WORLD_VARS`] checked.
    pub fn from_env() -> Result<Option<World>, DistError> {
        World::from_lookup(env_lookup)
    }

    /// As [`World::from_env`], reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<World>, DistError> {
        if get("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        let number = |var: &'static str| -> Result<usize, DistError> {
            let value = required(&get, var)?;
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| DistError::env(var, &value, "is not a whole number"))
        };
        let world_size = number("WORLD_SIZE")?;
        let rank = number("RANK")?;
        let local_rank = number("LOCAL_RANK")?;
        let local_world_size = number("LOCAL_WORLD_SIZE")?;
        let master_addr = required(&get, "MASTER_ADDR")?.trim().to_string();
        let port = required(&get, "MASTER_PORT")?;
        let master_port = port
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| DistError::env("MASTER_PORT", &port, "is not a port (1 to 65535)"))?;
        let world = World {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
        };
        world.check()?;
        Ok(Some(world))
    }

    /// The checks that tie the variables together.
    fn check(&self) -> Result<(), DistError> {
        let bad = |msg: String| Err(DistError::Environment(msg));
        if self.world_size == 0 {
            return bad("WORLD_SIZE=0: a run has at least one process".into());
        }
        if self.rank >= self.world_size {
            return bad(format!(
                "RANK={} is not below WORLD_SIZE={} (ranks count from 0)",
                self.rank, self.world_size
            ));
        }
        if self.local_world_size == 0 || self.local_world_size > self.world_size {
            return bad(format!(
                "LOCAL_WORLD_SIZE={} must be between 1 and WORLD_SIZE={}",
                self.local_world_size, self.world_size
            ));
        }
        if self.local_rank >= self.local_world_size {
            return bad(format!(
                "LOCAL_RANK={} is not below LOCAL_WORLD_SIZE={} (local ranks count from 0)",
                self.local_rank, self.local_world_size
            ));
        }
        if self.master_addr.is_empty() {
            return bad("MASTER_ADDR is empty: set it to rank 0's host name or address".into());
        }
        Ok(())
    }

    /// Whether this process is rank 0 (the one that prints, logs and writes checkpoints).
    pub fn is_first(&self) -> bool {
        self.rank == 0
    }

    /// `MASTER_ADDR:MASTER_PORT` as a socket address string (IPv6 addresses in brackets).
    pub fn master(&self) -> String {
        host_port(&self.master_addr, self.master_port)
    }
}

/// `host:port`, with an IPv6 address in brackets.
pub(super) fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The process environment as a lookup (a value that is not UTF-8 is passed on lossily, so the
/// error about it shows what was there).
pub(super) fn env_lookup(var: &str) -> Option<String> {
    std::env::var_os(var).map(|v| v.to_string_lossy().into_owned())
}

fn required(get: &impl Fn(&str) -> Option<String>, var: &'static str) -> Result<String, DistError> {
    get(var).ok_or_else(|| {
        DistError::Environment(format!(
            "WORLD_SIZE is set but {var} is not: a multi-process run needs all of {} (torchrun \
             sets them; with srun, export them)",
            WORLD_VARS.join(", ")
        ))
    })
}

/// A timeout in seconds from `var` (a positive number, fractions allowed), or `default` when
/// the variable is unset.
pub(super) fn timeout_from(
    get: impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: Duration,
) -> Result<Duration, DistError> {
    let Some(value) = get(var) else {
        return Ok(default);
    };
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| DistError::env(var, &value, "is not a positive number of seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    const FULL: [(&str, &str); 6] = [
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node-0"),
        ("MASTER_PORT", "29500"),
    ];

    /// FULL with `var` set to `value` (or removed when `value` is None).
    fn with(var: &str, value: Option<&'static str>) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = FULL.iter().copied().filter(|(n, _)| *n != var).collect();
        if let Some(value) = value {
            let name = FULL.iter().find(|(n, _)| *n == var).map_or("?", |(n, _)| n);
            v.push((name, value));
        }
        v
    }

    fn error(vars: &[(&str, &str)]) -> String {
        World::from_lookup(lookup(vars)).unwrap_err().to_string()
    }

    #[test]
    fn no_world_size_is_a_single_process_run() {
        assert_eq!(World::from_lookup(lookup(&[("RANK", "0")])).unwrap(), None);
    }

    #[test]
    fn a_full_environment_gives_the_world() {
        let w = World::from_lookup(lookup(&FULL)).unwrap().unwrap();
        assert_eq!(
            w,
            World {
                rank: 3,
                world_size: 8,
                local_rank: 1,
                local_world_size: 2,
                master_addr: "node-0".into(),
                master_port: 29500,
            }
        );
        assert_eq!(w.master(), "node-0:29500");
        assert!(!w.is_first());
        assert_eq!(host_port("::1", 7), "[::1]:7");
    }

    #[test]
    fn a_missing_variable_is_named() {
        for var in WORLD_VARS.iter().filter(|v| **v != "WORLD_SIZE") {
            let e = error(&with(var, None));
            assert!(e.contains(&format!("{var} is not")), "{var}: {e}");
        }
    }

    #[test]
    fn a_malformed_value_is_named_with_the_value() {
        for (var, value) in [
            ("RANK", "two"),
            ("WORLD_SIZE", "-1"),
            ("LOCAL_RANK", ""),
            ("MASTER_PORT", "0"),
            ("MASTER_PORT", "70000"),
        ] {
            let e = error(&with(var, Some(value)));
            assert!(e.contains(&format!("{var}={value:?}")), "{var}: {e}");
        }
    }

    #[test]
    fn inconsistent_values_are_refused() {
        for (var, value, says) in [
            ("RANK", "8", "RANK=8 is not below WORLD_SIZE=8"),
            ("LOCAL_RANK", "2", "LOCAL_RANK=2 is not below"),
            ("LOCAL_WORLD_SIZE", "9", "LOCAL_WORLD_SIZE=9 must be"),
            ("WORLD_SIZE", "0", "WORLD_SIZE=0"),
            ("MASTER_ADDR", " ", "MASTER_ADDR is empty"),
        ] {
            crate::dist::assert_says(&error(&with(var, Some(value))), &[says]);
        }
    }

    #[test]
    fn timeouts_default_parse_and_refuse_nonsense() {
        let d = Duration::from_secs(300);
        let t = |v: &'static str| timeout_from(lookup(&[("T", v)]), "NOPAD_T", d);
        assert_eq!(timeout_from(lookup(&[]), "NOPAD_T", d).unwrap(), d);
        let t2 = |v: &'static str| timeout_from(lookup(&[("NOPAD_T", v)]), "NOPAD_T", d);
        assert_eq!(t("5").unwrap(), d, "another variable is not read");
        assert_eq!(t2("2.5").unwrap(), Duration::from_millis(2500));
        for bad in ["0", "-3", "soon", "inf", "NaN"] {
            let e = t2(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("NOPAD_T={bad:?}")), "{bad}: {e}");
        }
    }
}
