//! `qcow io`: qemu-io's `read`, `write`, `discard` and `flush` commands.

use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::human_size;
use qcow::Disk;

/// One parsed qemu-io command.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        pattern: Option<u8>,
        offset: u64,
        len: u64,
        quiet: bool,
    },
    Write {
        pattern: u8,
        zero: bool,
        unmap: bool,
        offset: u64,
        len: u64,
        quiet: bool,
    },
    Discard {
        offset: u64,
        len: u64,
        quiet: bool,
    },
    Flush,
}

fn parse_number(text: &str) -> Result<u64> {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).with_context(|| format!("invalid number '{text}'"));
    }
    qcow::parse_size(text).map_err(anyhow::Error::msg)
}

fn parse_pattern(text: &str) -> Result<u8> {
    let value = parse_number(text)?;
    u8::try_from(value).with_context(|| format!("pattern {text} does not fit in a byte"))
}

/// Parses qemu-io's command syntax, e.g. `write -P 0xab 0 4k`.
pub fn parse(line: &str) -> Result<Command> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&name, rest)) = words.split_first() else {
        bail!("empty command");
    };
    let mut pattern = None;
    let mut zero = false;
    let mut unmap = false;
    let mut quiet = false;
    let mut positional = Vec::new();
    let mut args = rest.iter();
    while let Some(&arg) = args.next() {
        match arg {
            "-P" => {
                let value = args
                    .next()
                    .with_context(|| format!("{name}: -P needs a pattern"))?;
                pattern = Some(parse_pattern(value)?);
            }
            "-z" if name == "write" => zero = true,
            "-q" => quiet = true,
            "-u" if name == "write" => unmap = true,
            "-v" | "-C" | "-f" | "-w" => {}
            _ if arg.starts_with('-')
                && arg.len() > 1
                && !arg[1..].starts_with(|c: char| c.is_ascii_digit()) =>
            {
                bail!("{name}: unsupported option '{arg}'")
            }
            _ => positional
                .push(parse_number(arg).with_context(|| format!("{name}: bad argument '{arg}'"))?),
        }
    }
    let range = |positional: &[u64]| -> Result<(u64, u64)> {
        match positional {
            [offset, len] => Ok((*offset, *len)),
            _ => bail!("{name}: expected OFFSET LENGTH"),
        }
    };
    Ok(match name {
        "read" => {
            let (offset, len) = range(&positional)?;
            Command::Read {
                pattern,
                offset,
                len,
                quiet,
            }
        }
        "write" => {
            let (offset, len) = range(&positional)?;
            if zero && pattern.is_some() {
                bail!("write: -P and -z cannot be specified at the same time");
            }
            if unmap && !zero {
                bail!("write: -u requires -z");
            }
            Command::Write {
                pattern: pattern.unwrap_or(0xcd),
                zero,
                unmap,
                offset,
                len,
                quiet,
            }
        }
        "discard" => {
            let (offset, len) = range(&positional)?;
            Command::Discard { offset, len, quiet }
        }
        "flush" => Command::Flush,
        other => bail!("unknown command '{other}' (supported: read, write, discard, flush)"),
    })
}

fn report(verb: &str, len: u64, offset: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    println!("{verb} {len}/{len} bytes at offset {offset}");
    let rate = if secs > 0.0 { len as f64 / secs } else { 0.0 };
    let ops = if secs > 0.0 { 1.0 / secs } else { 0.0 };
    println!(
        "{}, 1 ops; {:05.2} sec ({}/sec and {:.4} ops/sec)",
        human_size(len),
        secs,
        human_rate(rate),
        ops
    );
}

fn human_rate(bytes_per_sec: f64) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes_per_sec;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.3} {}", units[unit])
}

/// Runs one command; the error says what failed.
pub fn run(disk: &mut Disk, command: &Command) -> Result<()> {
    let started = Instant::now();
    match *command {
        Command::Read {
            pattern,
            offset,
            len,
            quiet,
        } => {
            let mut buf = vec![0u8; len as usize];
            disk.read_at(&mut buf, offset).context("read failed")?;
            let mismatch = pattern.and_then(|p| buf.iter().position(|&b| b != p));
            if let Some(at) = mismatch {
                println!("Pattern verification failed at offset {offset}, {len} bytes");
                bail!(
                    "pattern verification failed at offset {offset}, {len} bytes (first mismatch at offset {}: {:#04x})",
                    offset + at as u64,
                    buf[at]
                );
            }
            if !quiet {
                report("read", len, offset, started);
            }
        }
        Command::Write {
            pattern,
            zero,
            unmap,
            offset,
            len,
            quiet,
        } => {
            if zero {
                disk.write_zeroes(offset, len, unmap)
                    .context("write failed")?;
            } else {
                disk.write_at(&vec![pattern; len as usize], offset)
                    .context("write failed")?;
            }
            if !quiet {
                report("wrote", len, offset, started);
            }
        }
        Command::Discard { offset, len, quiet } => {
            disk.discard(offset, len).context("discard failed")?;
            if !quiet {
                report("discard", len, offset, started);
            }
        }
        Command::Flush => disk.flush().context("flush failed")?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_io_syntax() {
        assert_eq!(
            parse("write -P 0xab 0 4k").unwrap(),
            Command::Write {
                pattern: 0xab,
                zero: false,
                unmap: false,
                offset: 0,
                len: 4096,
                quiet: false
            }
        );
        assert_eq!(
            parse("write -z 1M 64k").unwrap(),
            Command::Write {
                pattern: 0xcd,
                zero: true,
                unmap: false,
                offset: 1 << 20,
                len: 65536,
                quiet: false
            }
        );
        assert_eq!(
            parse("read -q -P 17 512 512").unwrap(),
            Command::Read {
                pattern: Some(17),
                offset: 512,
                len: 512,
                quiet: true
            }
        );
        assert_eq!(parse("flush").unwrap(), Command::Flush);
        assert!(parse("read 0").is_err());
        assert!(parse("frobnicate 0 1").is_err());
        assert!(parse("write -P 300 0 1").is_err());
    }
}
