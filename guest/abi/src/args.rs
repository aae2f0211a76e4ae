//! The guest's argument string: `pages=N rounds=R seed=S write=P gen_rounds=E gen_write=Q
//! wait=0|1` and the disk workload's `disk=0|1 disk_blocks=B disk_batch=Q disk_bench=N`, parsed
//! the same way by the VMM (to reject bad arguments before boot) and by the guest.

/// Workload parameters. `Default` finishes in well under a second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadArgs {
    /// Workload pages, split evenly across the vCPUs.
    pub pages: u64,
    /// Rounds; in each round every page is written with probability `write_percent`%.
    pub rounds: u64,
    /// PRNG seed: the same seed gives the same memory and digest.
    pub seed: u64,
    /// Percentage (0–100) of pages written per round.
    pub write_percent: u64,
    /// Rounds after `rounds` whose writes mix in the VM's generation id, read when the vCPU
    /// reaches them: clones and forked children of one VM write different data from there on.
    pub gen_rounds: u64,
    /// Percentage of pages written per generation round (default: `write`).
    pub gen_write_percent: u64,
    /// Between `rounds` and `gen_rounds`, wait for a nonzero generation id: a warm template
    /// (its memory filled by the first rounds) to snapshot and clone.
    pub wait: bool,
    /// Run the disk workload on the first disk (see [`crate::disk`]).
    pub disk: bool,
    /// 4 KiB blocks at the start of the disk that the disk workload and benchmark use.
    pub disk_blocks: u64,
    /// Requests the guest puts in the queue before one notification (1 to 128).
    pub disk_batch: u64,
    /// After the workload, time this many 4 KiB requests of each benchmark phase (0: none).
    pub disk_bench: u64,
}

/// Most requests the guest's disk driver has in flight (its request slots).
pub const MAX_DISK_BATCH: u64 = 128;

impl Default for WorkloadArgs {
    fn default() -> Self {
        Self {
            pages: 1024,
            rounds: 8,
            seed: 1,
            write_percent: 50,
            gen_rounds: 0,
            gen_write_percent: 50,
            wait: false,
            disk: false,
            disk_blocks: 256,
            disk_batch: MAX_DISK_BATCH,
            disk_bench: 0,
        }
    }
}

impl WorkloadArgs {
    /// Whether the guest uses a disk at all.
    pub const fn uses_disk(&self) -> bool {
        self.disk || self.disk_bench > 0
    }
}

/// What is wrong with an argument string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgError<'a> {
    /// A word without `=`.
    NotKeyValue(&'a str),
    /// A key the guest does not know.
    UnknownKey(&'a str),
    /// A value that is not a decimal number in range.
    BadValue { key: &'a str, value: &'a str },
}

impl core::fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotKeyValue(word) => {
                write!(f, "guest argument `{word}` is not of the form key=value")
            }
            Self::UnknownKey(key) => write!(
                f,
                "unknown guest argument `{key}` (known: pages, rounds, seed, write, gen_rounds, gen_write, wait, disk, disk_blocks, disk_batch, disk_bench)"
            ),
            Self::BadValue { key, value } => match *key {
                "write" | "gen_write" => write!(
                    f,
                    "guest argument {key}={value}: expected a percentage 0-100"
                ),
                "pages" => write!(f, "guest argument pages={value}: expected a number >= 1"),
                "wait" | "disk" => write!(f, "guest argument {key}={value}: expected 0 or 1"),
                "disk_blocks" => {
                    write!(f, "guest argument disk_blocks={value}: expected a number >= 1")
                }
                "disk_batch" => write!(
                    f,
                    "guest argument disk_batch={value}: expected a number from 1 to {MAX_DISK_BATCH}"
                ),
                _ => write!(f, "guest argument {key}={value}: expected a decimal number"),
            },
        }
    }
}

impl WorkloadArgs {
    /// Parses space-separated `key=value` words over the defaults.
    pub fn parse(text: &str) -> Result<Self, ArgError<'_>> {
        let mut args = Self::default();
        let mut gen_write = None;
        for word in text.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').ok_or(ArgError::NotKeyValue(word))?;
            let bad = ArgError::BadValue { key, value };
            let number: u64 = match key {
                "pages" | "rounds" | "seed" | "write" | "gen_rounds" | "gen_write" | "wait"
                | "disk" | "disk_blocks" | "disk_batch" | "disk_bench" => {
                    value.parse().map_err(|_| bad)?
                }
                _ => return Err(ArgError::UnknownKey(key)),
            };
            match key {
                "pages" if number == 0 => return Err(bad),
                "pages" => args.pages = number,
                "rounds" => args.rounds = number,
                "seed" => args.seed = number,
                "gen_rounds" => args.gen_rounds = number,
                "wait" if number > 1 => return Err(bad),
                "wait" => args.wait = number == 1,
                "disk" if number > 1 => return Err(bad),
                "disk" => args.disk = number == 1,
                "disk_blocks" if number == 0 => return Err(bad),
                "disk_blocks" => args.disk_blocks = number,
                "disk_batch" if number == 0 || number > MAX_DISK_BATCH => return Err(bad),
                "disk_batch" => args.disk_batch = number,
                "disk_bench" => args.disk_bench = number,
                _ if number > 100 => return Err(bad),
                "gen_write" => gen_write = Some(number),
                _ => args.write_percent = number,
            }
        }
        args.gen_write_percent = gen_write.unwrap_or(args.write_percent);
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_over_defaults() {
        assert_eq!(WorkloadArgs::parse("").unwrap(), WorkloadArgs::default());
        let args = WorkloadArgs::parse(" pages=7  seed=99 write=100 rounds=0").unwrap();
        assert_eq!(
            args,
            WorkloadArgs {
                pages: 7,
                rounds: 0,
                seed: 99,
                write_percent: 100,
                gen_write_percent: 100,
                ..WorkloadArgs::default()
            }
        );
        let template = WorkloadArgs::parse("gen_rounds=3 wait=1").unwrap();
        assert_eq!((template.gen_rounds, template.wait), (3, true));
        assert!(!template.uses_disk());
        let disk = WorkloadArgs::parse("disk=1 disk_blocks=64 disk_batch=8").unwrap();
        assert_eq!(
            (disk.disk, disk.disk_blocks, disk.disk_batch),
            (true, 64, 8)
        );
        assert!(WorkloadArgs::parse("disk_bench=100").unwrap().uses_disk());
        let template = WorkloadArgs::parse("gen_rounds=3 wait=1 write=7").unwrap();
        assert_eq!(
            (
                template.gen_rounds,
                template.wait,
                template.gen_write_percent
            ),
            (3, true, 7)
        );
        let template = WorkloadArgs::parse("gen_write=2 write=100").unwrap();
        assert_eq!(
            (template.write_percent, template.gen_write_percent),
            (100, 2)
        );
    }

    #[test]
    fn rejects_bad_words() {
        assert_eq!(
            WorkloadArgs::parse("pages"),
            Err(ArgError::NotKeyValue("pages"))
        );
        assert_eq!(
            WorkloadArgs::parse("speed=1"),
            Err(ArgError::UnknownKey("speed"))
        );
        assert_eq!(
            WorkloadArgs::parse("write=101"),
            Err(ArgError::BadValue {
                key: "write",
                value: "101"
            })
        );
        assert_eq!(
            WorkloadArgs::parse("pages=0"),
            Err(ArgError::BadValue {
                key: "pages",
                value: "0"
            })
        );
        assert_eq!(
            WorkloadArgs::parse("wait=2"),
            Err(ArgError::BadValue {
                key: "wait",
                value: "2"
            })
        );
        for bad in ["disk=2", "disk_blocks=0", "disk_batch=0", "disk_batch=129"] {
            assert!(WorkloadArgs::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            WorkloadArgs::parse("disk_batch=200"),
            Err(ArgError::BadValue {
                key: "disk_batch",
                value: "200"
            })
        );
        assert_eq!(
            WorkloadArgs::parse("seed=-1"),
            Err(ArgError::BadValue {
                key: "seed",
                value: "-1"
            })
        );
    }
}
