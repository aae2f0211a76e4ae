//! GNU `getopt_long` as qemu-img uses it: permuted arguments, clustered short options, `--name=value`,
//! unambiguous prefixes of long options, and glibc's exact error lines.
//!
//! Hand-written rather than clap because a drop-in qemu-img must accept and refuse exactly what
//! glibc's parser does and say so in glibc's words (`option '--o' is ambiguous; possibilities: …`).

/// One option a command accepts; short and long spellings of the same option share a `key`.
#[derive(Debug, Clone, Copy)]
pub struct OptSpec {
    /// The short letter (`'f'`), if any.
    pub short: Option<char>,
    /// Long names, in the order of qemu-img's table (ambiguity messages list them in this order).
    pub long: &'static [&'static str],
    pub takes_value: bool,
    /// What the caller matches on.
    pub key: &'static str,
}

impl OptSpec {
    /// An option without a value.
    pub const fn flag(
        short: Option<char>,
        long: &'static [&'static str],
        key: &'static str,
    ) -> Self {
        OptSpec {
            short,
            long,
            takes_value: false,
            key,
        }
    }

    /// An option with a value.
    pub const fn value(
        short: Option<char>,
        long: &'static [&'static str],
        key: &'static str,
    ) -> Self {
        OptSpec {
            short,
            long,
            takes_value: true,
            key,
        }
    }
}

/// Options several commands share, under qemu-img's spellings.
pub const HELP: OptSpec = OptSpec::flag(Some('h'), &["help"], "help");
pub const FORMAT: OptSpec = OptSpec::value(Some('f'), &["format"], "format");
pub const OUTPUT: OptSpec = OptSpec::value(None, &["output"], "output");
pub const OBJECT: OptSpec = OptSpec::value(None, &["object"], "object");
pub const IMAGE_OPTS: OptSpec = OptSpec::flag(None, &["image-opts"], "image-opts");
pub const FORCE_SHARE: OptSpec = OptSpec::flag(Some('U'), &["force-share"], "force-share");
pub const QUIET: OptSpec = OptSpec::flag(Some('q'), &["quiet"], "quiet");

/// A parsed command line: options in the order given, then the operands.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub options: Vec<(&'static str, Option<String>)>,
    pub operands: Vec<String>,
}

impl Parsed {
    /// The value of the last occurrence of `key` (getopt users overwrite on repeat).
    pub fn last(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_deref().unwrap_or(""))
    }

    pub fn has(&self, key: &str) -> bool {
        self.options.iter().any(|(k, _)| *k == key)
    }

    /// Every value given for `key`, in order.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.options
            .iter()
            .filter(|(k, _)| *k == key)
            .filter_map(|(_, v)| v.as_deref())
            .collect()
    }
}

/// Parses `args` (without the program and command name) against `specs`. The error is glibc's
/// message without the `argv[0]: ` prefix.
pub fn parse(args: &[String], specs: &[OptSpec]) -> Result<Parsed, String> {
    let mut parsed = Parsed::default();
    let mut index = 0;
    while index < args.len() {
        let arg = &args[index];
        index += 1;
        if arg == "--" {
            parsed.operands.extend(args[index..].iter().cloned());
            break;
        }
        if let Some(body) = arg.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((name, value)) => (name, Some(value.to_string())),
                None => (body, None),
            };
            let spec = find_long(name, specs)?;
            let long_name = spec_long_name(spec, name);
            let value = match (spec.takes_value, inline) {
                (false, Some(_)) => {
                    return Err(format!("option '--{long_name}' doesn't allow an argument"))
                }
                (false, None) => None,
                (true, Some(value)) => Some(value),
                (true, None) => match args.get(index) {
                    Some(value) => {
                        index += 1;
                        Some(value.clone())
                    }
                    None => return Err(format!("option '--{long_name}' requires an argument")),
                },
            };
            parsed.options.push((spec.key, value));
            continue;
        }
        let Some(cluster) = arg.strip_prefix('-').filter(|rest| !rest.is_empty()) else {
            parsed.operands.push(arg.clone());
            continue;
        };
        for (at, letter) in cluster.char_indices() {
            let Some(spec) = specs.iter().find(|s| s.short == Some(letter)) else {
                return Err(format!("invalid option -- '{letter}'"));
            };
            if !spec.takes_value {
                parsed.options.push((spec.key, None));
                continue;
            }
            let rest = &cluster[at + letter.len_utf8()..];
            let value = if !rest.is_empty() {
                rest.to_string()
            } else if let Some(value) = args.get(index) {
                index += 1;
                value.clone()
            } else {
                return Err(format!("option requires an argument -- '{letter}'"));
            };
            parsed.options.push((spec.key, Some(value)));
            break;
        }
    }
    Ok(parsed)
}

/// glibc's lookup: an exact name wins; otherwise a unique prefix, or several prefixes that all
/// mean the same option.
fn find_long<'a>(name: &str, specs: &'a [OptSpec]) -> Result<&'a OptSpec, String> {
    let mut matches: Vec<(&'a OptSpec, &'static str)> = Vec::new();
    for spec in specs {
        for &long in spec.long {
            if long == name {
                return Ok(spec);
            }
            if long.starts_with(name) {
                matches.push((spec, long));
            }
        }
    }
    let Some(&(first, _)) = matches.first() else {
        return Err(format!("unrecognized option '--{name}'"));
    };
    let same = |spec: &OptSpec| spec.key == first.key && spec.takes_value == first.takes_value;
    if matches.iter().all(|(spec, _)| same(spec)) {
        return Ok(first);
    }
    let possibilities: String = matches
        .iter()
        .enumerate()
        .filter(|(i, (spec, _))| *i == 0 || !same(spec))
        .map(|(_, (_, long))| format!(" '--{long}'"))
        .collect();
    Err(format!(
        "option '--{name}' is ambiguous; possibilities:{possibilities}"
    ))
}

/// The full long name a (possibly abbreviated) `name` stands for, as glibc prints it.
fn spec_long_name(spec: &OptSpec, name: &str) -> &'static str {
    spec.long
        .iter()
        .find(|long| long.starts_with(name))
        .copied()
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[OptSpec] = &[
        HELP,
        FORMAT,
        OUTPUT,
        OptSpec::flag(Some('b'), &["backing-chain", "backing"], "chain"),
        OBJECT,
        OptSpec::flag(Some('U'), &["force-share"], "share"),
    ];

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn permutes_and_clusters_like_glibc() {
        let parsed = parse(
            &args(&["a.img", "-Uf", "qcow2", "--out=json", "--back"]),
            SPECS,
        )
        .unwrap();
        assert_eq!(parsed.operands, vec!["a.img"]);
        assert_eq!(
            parsed.options,
            vec![
                ("share", None),
                ("format", Some("qcow2".into())),
                ("output", Some("json".into())),
                ("chain", None),
            ]
        );
        let parsed = parse(&args(&["-fraw", "--", "-x"]), SPECS).unwrap();
        assert_eq!(parsed.last("format"), Some("raw"));
        assert_eq!(parsed.operands, vec!["-x"]);
    }

    #[test]
    fn errors_use_glibc_wording() {
        let err = |list: &[&str]| parse(&args(list), SPECS).unwrap_err();
        assert_eq!(err(&["-z"]), "invalid option -- 'z'");
        assert_eq!(err(&["-f"]), "option requires an argument -- 'f'");
        assert_eq!(err(&["--bogus"]), "unrecognized option '--bogus'");
        assert_eq!(err(&["--output"]), "option '--output' requires an argument");
        assert_eq!(
            err(&["--backing-chain=1"]),
            "option '--backing-chain' doesn't allow an argument"
        );
        assert_eq!(
            err(&["--o", "x"]),
            "option '--o' is ambiguous; possibilities: '--output' '--object'"
        );
    }
}
