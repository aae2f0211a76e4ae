//! `qcow snapshot`: qemu-img snapshot's `-l`, `-c`, `-a` and `-d`, with its messages and exit codes.

use std::path::Path;

use anyhow::{bail, Result};
use qcow::{Disk, NewSnapshot, OpenOptions, Snapshot};

use crate::disk::parse_format;
use crate::human_size;
use crate::info::utc_date;

/// What `qcow snapshot` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

impl Action {
    /// The one action of `-l`/`-c`/`-a`/`-d` (`-l` when none is given).
    pub fn from_flags(
        list: bool,
        create: Option<String>,
        apply: Option<String>,
        delete: Option<String>,
    ) -> Result<Action> {
        let given = usize::from(list)
            + usize::from(create.is_some())
            + usize::from(apply.is_some())
            + usize::from(delete.is_some());
        if given > 1 {
            bail!("Cannot mix '-l', '-a', '-c', '-d'\nTry 'qcow snapshot --help' for more info");
        }
        Ok(match (create, apply, delete) {
            (Some(name), _, _) => Action::Create(name),
            (_, Some(name), _) => Action::Apply(name),
            (_, _, Some(name)) => Action::Delete(name),
            _ => Action::List,
        })
    }
}

pub fn snapshot(action: Action, format: Option<&str>, file: &Path) -> Result<u8> {
    let read_only = action == Action::List;
    let options = OpenOptions {
        read_only,
        no_backing: true,
        ..OpenOptions::default()
    };
    let format = parse_format(format)?;
    let disk = Disk::open(file, format, &options)
        .map_err(|e| anyhow::anyhow!("Could not open '{}': {}", file.display(), e.qemu_text()))?;
    let mut image = match disk {
        Disk::Qcow2(image) => image,
        Disk::Raw(_) => {
            // Raw files have no snapshots: nothing to list, and no way to make one.
            return match action {
                Action::List => Ok(0),
                Action::Create(name) => {
                    bail!("Could not create snapshot '{name}': Operation not supported")
                }
                Action::Apply(name) => bail!(
                    "Could not apply snapshot '{name}': Failed to load snapshot: Operation not supported"
                ),
                Action::Delete(name) => {
                    bail!("Could not delete snapshot '{name}': snapshot not found")
                }
            };
        }
    };
    match action {
        Action::List => {
            print_list(image.snapshots());
            Ok(0)
        }
        Action::Create(name) => {
            let new = NewSnapshot {
                name: name.clone(),
                icount: Some(0),
                ..NewSnapshot::default()
            };
            image
                .create_snapshot(&new)
                .and_then(|_| image.close())
                .map_err(|e| {
                    anyhow::anyhow!("Could not create snapshot '{name}': {}", e.qemu_text())
                })?;
            Ok(0)
        }
        Action::Apply(name) => {
            let Some(index) = image.find_snapshot(&name) else {
                bail!("Could not apply snapshot '{name}': Failed to load snapshot: No such file or directory");
            };
            image
                .apply_snapshot(index)
                .and_then(|()| image.close())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "Could not apply snapshot '{name}': Failed to load snapshot: {e}"
                    )
                })?;
            Ok(0)
        }
        Action::Delete(name) => {
            let Some(index) = image.snapshot_by_name(&name) else {
                bail!("Could not delete snapshot '{name}': snapshot not found");
            };
            image
                .delete_snapshot(index)
                .and_then(|()| image.close())
                .map_err(|e| anyhow::anyhow!("Could not delete snapshot '{name}': {e}"))?;
            Ok(0)
        }
    }
}

/// qemu-img's snapshot table (`snapshot -l`, and `info`'s "Snapshot list:").
pub fn print_list(snapshots: &[Snapshot]) {
    if snapshots.is_empty() {
        return;
    }
    println!("Snapshot list:");
    println!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for s in snapshots {
        println!("{}", list_row(s));
    }
}

fn list_row(s: &Snapshot) -> String {
    format_row(
        &s.id,
        &s.name,
        s.vm_state_size,
        s.date_sec,
        s.vm_clock_nsec,
        s.icount,
    )
}

/// One line of qemu-img's snapshot table (also `info`'s).
pub fn format_row(
    id: &str,
    name: &str,
    vm_state_size: u64,
    date_sec: u32,
    vm_clock_nsec: u64,
    icount: Option<u64>,
) -> String {
    let clock_sec = vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        clock_sec / 3600,
        (clock_sec / 60) % 60,
        clock_sec % 60,
        (vm_clock_nsec % 1_000_000_000) / 1_000_000
    );
    // qemu-img prints "--" when icount was not recorded.
    let icount = icount.map_or_else(|| "--".to_string(), |i| i.to_string());
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        id,
        name,
        human_size(vm_state_size),
        utc_date(u64::from(date_sec)),
        clock,
        icount
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_action_at_a_time() {
        assert_eq!(
            Action::from_flags(false, None, None, None).unwrap(),
            Action::List
        );
        assert_eq!(
            Action::from_flags(false, Some("a".into()), None, None).unwrap(),
            Action::Create("a".into())
        );
        assert!(Action::from_flags(true, Some("a".into()), None, None).is_err());
        assert!(Action::from_flags(false, None, Some("a".into()), Some("b".into())).is_err());
    }

    #[test]
    fn rows_match_qemu_img() {
        let snapshot = Snapshot {
            l1_table_offset: 0,
            l1_size: 0,
            id: "1".into(),
            name: "first".into(),
            date_sec: 1_796_091_824,
            date_nsec: 0,
            vm_clock_nsec: 3_723_004_000_000,
            vm_state_size: 0,
            disk_size: Some(1 << 20),
            icount: Some(0),
            unknown_extra: Vec::new(),
        };
        assert_eq!(
            list_row(&snapshot),
            "1       first                 0 B 2026-12-01 02:23:44  0001:02:03.004          0"
        );
    }
}
