//! qemu-img's `-o key=value,…` option lists (QEMU's QemuOpts): parsing with its escaping and
//! type checks, the `Formatting …` line, and `-o help`.

use qcow::{parse_size, ParseSizeError};

/// The type of an option's value, which decides how it is checked and printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    Bool,
    Number,
    Size,
}

/// One option a format or the file protocol accepts.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Printed in the `Formatting` line when the option is not given.
    pub default: Option<&'static str>,
}

const fn desc(name: &'static str, kind: Kind, help: &'static str) -> Desc {
    Desc {
        name,
        kind,
        help,
        default: None,
    }
}

const fn with_default(
    name: &'static str,
    kind: Kind,
    help: &'static str,
    default: &'static str,
) -> Desc {
    Desc {
        name,
        kind,
        help,
        default: Some(default),
    }
}

/// qcow2's create options, in qemu-img's order (the `Formatting` line follows it).
pub const QCOW2_OPTS: &[Desc] = &[
    desc(
        "encryption",
        Kind::Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    desc(
        "encrypt.format",
        Kind::Str,
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    desc(
        "encrypt.key-secret",
        Kind::Str,
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    desc(
        "encrypt.cipher-alg",
        Kind::Str,
        "Name of encryption cipher algorithm",
    ),
    desc(
        "encrypt.cipher-mode",
        Kind::Str,
        "Name of encryption cipher mode",
    ),
    desc(
        "encrypt.ivgen-alg",
        Kind::Str,
        "Name of IV generator algorithm",
    ),
    desc(
        "encrypt.ivgen-hash-alg",
        Kind::Str,
        "Name of IV generator hash algorithm",
    ),
    desc(
        "encrypt.hash-alg",
        Kind::Str,
        "Name of encryption hash algorithm",
    ),
    desc(
        "encrypt.iter-time",
        Kind::Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    with_default("cluster_size", Kind::Size, "qcow2 cluster size", "65536"),
    with_default("extended_l2", Kind::Bool, "Extended L2 tables", "off"),
    desc(
        "preallocation",
        Kind::Str,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    with_default(
        "compression_type",
        Kind::Str,
        "Compression method used for image cluster compression",
        "zlib",
    ),
    desc("size", Kind::Size, "Virtual disk size"),
    desc(
        "compat",
        Kind::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    desc("backing_file", Kind::Str, "File name of a base image"),
    desc("backing_fmt", Kind::Str, "Image format of the base image"),
    desc("data_file", Kind::Str, "File name of an external data file"),
    desc(
        "data_file_raw",
        Kind::Bool,
        "The external data file must stay valid as a raw image",
    ),
    with_default(
        "lazy_refcounts",
        Kind::Bool,
        "Postpone refcount updates",
        "off",
    ),
    with_default(
        "refcount_bits",
        Kind::Number,
        "Width of a reference count entry in bits",
        "16",
    ),
];

/// raw's own create options.
pub const RAW_OPTS: &[Desc] = &[desc("size", Kind::Size, "Virtual disk size")];

/// The file protocol's create options (appended after the format's; duplicates are dropped).
pub const FILE_OPTS: &[Desc] = &[
    desc("size", Kind::Size, "Virtual disk size"),
    desc(
        "nocow",
        Kind::Bool,
        "Turn off copy-on-write (valid only on btrfs)",
    ),
    desc(
        "preallocation",
        Kind::Str,
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
    desc(
        "extent_size_hint",
        Kind::Size,
        "Extent size hint for the image file, 0 to disable",
    ),
];

/// A format's options followed by the protocol's, without repeating a name (QEMU's
/// `qemu_opts_append`).
pub fn merged(format: &[Desc], protocol: &[Desc]) -> Vec<Desc> {
    let mut list: Vec<Desc> = format.to_vec();
    for d in protocol {
        if !list.iter().any(|have| have.name == d.name) {
            list.push(*d);
        }
    }
    list
}

/// A parsed value, kept as given (the `Formatting` line prints strings and booleans verbatim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    pub text: String,
    /// For numbers and sizes: the parsed value.
    pub number: Option<u64>,
}

/// The options set so far, in the order given (a later setting of a name wins).
#[derive(Debug, Clone, Default)]
pub struct Opts {
    pub list: Vec<Desc>,
    set: Vec<(&'static str, Value)>,
}

/// qemu-img's message for an option list that does not parse.
pub type OptError = String;

impl Opts {
    pub fn new(list: Vec<Desc>) -> Opts {
        Opts {
            list,
            set: Vec::new(),
        }
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.set
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).map(|v| v.text.as_str())
    }

    /// A boolean option, its default when unset.
    pub fn get_bool(&self, name: &str) -> bool {
        let text = self
            .get_str(name)
            .or_else(|| self.desc(name).and_then(|d| d.default));
        matches!(text, Some("on" | "yes" | "true" | "y"))
    }

    /// A number or size option, its default when unset.
    pub fn get_number(&self, name: &str) -> Option<u64> {
        match self.get(name) {
            Some(value) => value.number,
            None => self
                .desc(name)
                .and_then(|d| d.default)
                .and_then(|text| text.parse().ok()),
        }
    }

    fn desc(&self, name: &str) -> Option<&Desc> {
        self.list.iter().find(|d| d.name == name)
    }

    /// Sets `name` (which must be in the list) to `text`, checking it like QEMU.
    pub fn set(&mut self, name: &str, text: &str) -> Result<(), OptError> {
        let Some(desc) = self.desc(name).copied() else {
            return Err(format!("Invalid parameter '{name}'"));
        };
        let number = match desc.kind {
            Kind::Str => None,
            Kind::Bool => {
                if !matches!(
                    text,
                    "on" | "off" | "yes" | "no" | "true" | "false" | "y" | "n"
                ) {
                    return Err(format!("Parameter '{name}' expects 'on' or 'off'"));
                }
                None
            }
            Kind::Number => Some(parse_number(name, text)?),
            Kind::Size => Some(parse_size(text).map_err(|e| match e {
                ParseSizeError::OutOfRange(_) => {
                    format!("Value '{text}' is out of range for parameter '{name}'")
                }
                ParseSizeError::Invalid(_) => format!(
                    "Parameter '{name}' expects a non-negative number below 2^64\n\
                     Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                     and exabytes, respectively."
                ),
            })?),
        };
        self.set.push((
            desc.name,
            Value {
                text: text.to_string(),
                number,
            },
        ));
        Ok(())
    }

    /// Parses a `-o` list: `key=value` pairs split at single commas (`,,` is a comma inside a
    /// value), `key` alone meaning `key=on` and `nokey` meaning `key=off`; `id=` is ignored.
    pub fn parse(&mut self, text: &str) -> Result<(), OptError> {
        for (name, value, _) in split_list(text) {
            if name == "id" {
                continue;
            }
            self.set(&name, &value)?;
        }
        Ok(())
    }

    /// The options after `fmt=… ` in `Formatting '…', fmt=… …`: every option that is set or has a
    /// default, in list order; numbers as signed 64-bit values, strings with commas doubled.
    pub fn print(&self) -> String {
        let mut parts = Vec::new();
        for desc in &self.list {
            let value = self.get(desc.name);
            let text = match (value, desc.default) {
                (Some(value), _) => match (desc.kind, value.number) {
                    (Kind::Number | Kind::Size, Some(n)) => (n as i64).to_string(),
                    (Kind::Str, _) => value.text.replace(',', ",,"),
                    _ => value.text.clone(),
                },
                (None, Some(default)) => default.to_string(),
                (None, None) => continue,
            };
            parts.push(format!("{}={text}", desc.name));
        }
        parts.join(" ")
    }
}

/// QemuOpts' number parser: `strtoull` with base 0 (decimal, `0x` hex, `0` octal; negative
/// numbers wrap), no trailing characters.
fn parse_number(name: &str, text: &str) -> Result<u64, OptError> {
    let bad = || format!("Parameter '{name}' expects a number");
    let trimmed = text.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (negative, unsigned) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    let (radix, digits) = if let Some(hex) = unsigned
        .strip_prefix("0x")
        .or_else(|| unsigned.strip_prefix("0X"))
    {
        (16, hex)
    } else if unsigned.len() > 1 && unsigned.starts_with('0') {
        (8, &unsigned[1..])
    } else {
        (10, unsigned)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    let value = u64::from_str_radix(digits, radix)
        .map_err(|_| format!("Value '{text}' is too large for parameter '{name}'"))?;
    Ok(if negative {
        value.wrapping_neg()
    } else {
        value
    })
}

/// Splits an option list into (name, value, given as a bare flag) the way QEMU's
/// `get_opt_name_value` does.
fn split_list(text: &str) -> Vec<(String, String, bool)> {
    let mut pairs = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let name_end = rest.find(['=', ',']).unwrap_or(rest.len());
        let name = &rest[..name_end];
        if rest[name_end..].starts_with('=') {
            let (value, after) = take_value(&rest[name_end + 1..]);
            pairs.push((name.to_string(), value, false));
            rest = after;
        } else {
            // A flag: `nokey` turns `key` off, anything else turns it on.
            match name.strip_prefix("no") {
                Some(key) => pairs.push((key.to_string(), "off".to_string(), true)),
                None => pairs.push((name.to_string(), "on".to_string(), true)),
            }
            rest = &rest[name_end..];
        }
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    pairs
}

/// A value up to the first single comma; `,,` stands for one comma.
fn take_value(text: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if c == ',' {
            if matches!(chars.peek(), Some((_, ','))) {
                chars.next();
                value.push(',');
                continue;
            }
            return (value, &text[at..]);
        }
        value.push(c);
    }
    (value, "")
}

/// qemu-img's check of a `-o` argument before anything else: not empty, not starting with a comma,
/// and not ending in an odd number of commas.
pub fn is_valid_list(text: &str) -> bool {
    if text.is_empty() || text.starts_with(',') {
        return false;
    }
    let trailing = text.len() - text.trim_end_matches(',').len();
    trailing % 2 == 0
}

/// True when a list asks for help (`help` or `?` as a bare name).
pub fn wants_help(text: &str) -> bool {
    split_list(text)
        .iter()
        .any(|(name, _, flag)| *flag && (name == "help" || name == "?"))
}

/// `-o help`: the options sorted by name, then (without a file name) qemu-img's note about the
/// protocol level.
pub fn help_text(header: &str, list: &[Desc], with_protocol_note: bool) -> String {
    let mut sorted: Vec<&Desc> = list.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(b.name));
    let mut out = format!("{header}\n");
    for d in sorted {
        let kind = match d.kind {
            Kind::Str => "str",
            Kind::Bool => "bool (on/off)",
            Kind::Number => "num",
            Kind::Size => "size",
        };
        let left = format!("{}=<{kind}>", d.name);
        out += &format!("  {left:<22} - {}\n", d.help);
    }
    if with_protocol_note {
        out += "\nThe protocol level may support further options.\n\
                Specify the target filename to include those options.\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2() -> Opts {
        Opts::new(merged(QCOW2_OPTS, FILE_OPTS))
    }

    #[test]
    fn lists_split_like_qemu() {
        assert_eq!(
            split_list("a=1,,2,nofoo,bar,,c="),
            vec![
                ("a".to_string(), "1,2".to_string(), false),
                ("foo".to_string(), "off".to_string(), true),
                ("bar".to_string(), "on".to_string(), true),
                (String::new(), "on".to_string(), true),
                ("c".to_string(), String::new(), false),
            ]
        );
        assert!(is_valid_list("a=1,,"));
        assert!(!is_valid_list("a=1,"));
        assert!(!is_valid_list(",a"));
        assert!(wants_help("cluster_size=4k,help"));
        assert!(wants_help("?"));
        assert!(!wants_help("help=on"));
    }

    #[test]
    fn formatting_line_follows_qemu_order() {
        let mut opts = qcow2();
        opts.parse("refcount_bits=010,cluster_size=0x1000,preallocation=full,extent_size_hint=1M")
            .unwrap();
        opts.set("size", "1000b").unwrap();
        assert_eq!(
            opts.print(),
            "cluster_size=4096 extended_l2=off preallocation=full compression_type=zlib \
             size=1000 lazy_refcounts=off refcount_bits=8 extent_size_hint=1048576"
        );
    }

    #[test]
    fn values_are_checked_like_qemu() {
        let mut opts = qcow2();
        assert_eq!(opts.set("foo", "1").unwrap_err(), "Invalid parameter 'foo'");
        assert_eq!(
            opts.set("lazy_refcounts", "ON").unwrap_err(),
            "Parameter 'lazy_refcounts' expects 'on' or 'off'"
        );
        assert_eq!(
            opts.set("refcount_bits", "16 ").unwrap_err(),
            "Parameter 'refcount_bits' expects a number"
        );
        assert_eq!(
            opts.set("refcount_bits", "99999999999999999999")
                .unwrap_err(),
            "Value '99999999999999999999' is too large for parameter 'refcount_bits'"
        );
        assert_eq!(
            opts.set("size", "-1").unwrap_err(),
            "Value '-1' is out of range for parameter 'size'"
        );
        opts.set("refcount_bits", "-1").unwrap();
        assert_eq!(opts.get_number("refcount_bits"), Some(u64::MAX));
    }
}
