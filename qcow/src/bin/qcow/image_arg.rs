//! Image arguments as qemu-img takes them — a path, `file:PATH`, `json:{…}` or (`--image-opts`) a
//! `key=value` list — and qemu-img's `Could not open '…': …` messages when opening fails.

use std::path::{Path, PathBuf};

use qcow::error::strerror;
use qcow::{Error as LibError, Format};
use serde_json::Value;

use crate::prog::Fail;

/// What an image argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The argument as given: the name in `Could not open '…'`.
    pub arg: String,
    /// The file's path.
    pub path: PathBuf,
    /// The format (`driver`), if the argument or `-f` names one.
    pub format: Option<String>,
    /// `"backing": null`: do not open a backing file.
    pub no_backing: bool,
    /// `data-file.filename`: the external data file to use instead of the one the image names.
    pub data_file: Option<PathBuf>,
}

impl ImageSpec {
    /// The file name qemu-img prints for the image (`image:` lines, `filename` keys).
    pub fn filename(&self) -> String {
        self.path.display().to_string()
    }
}

/// Parses a plain image argument (with `-f FORMAT` if given).
pub fn parse(arg: &str, format: Option<&str>) -> Result<ImageSpec, Fail> {
    let could_not_open = |why: String| Fail::Report(format!("Could not open '{arg}': {why}"));
    if let Some(json) = arg.strip_prefix("json:") {
        let value: Value = serde_json::from_str(json).map_err(|e| {
            could_not_open(format!(
                "Could not parse the JSON options: {}",
                json_error(&e)
            ))
        })?;
        let Value::Object(map) = value else {
            return Err(could_not_open("Invalid JSON object given".into()));
        };
        let mut flat = Vec::new();
        flatten("", &Value::Object(map), &mut flat);
        let mut spec = from_options(arg, &flat).map_err(could_not_open)?;
        if spec.format.is_none() {
            spec.format = format.map(str::to_string);
        }
        return Ok(spec);
    }
    let path = strip_file_prefix(arg).map_err(could_not_open)?;
    Ok(ImageSpec {
        arg: arg.to_string(),
        path,
        format: format.map(str::to_string),
        no_backing: false,
        data_file: None,
    })
}

/// Parses an `--image-opts` argument: `driver=qcow2,file.filename=a.qcow2`.
pub fn parse_image_opts(arg: &str) -> Result<ImageSpec, Fail> {
    let mut flat = Vec::new();
    for item in split_commas(arg) {
        match item.split_once('=') {
            Some((key, value)) => flat.push((key.to_string(), Value::String(value.to_string()))),
            None => flat.push(("file".to_string(), Value::String(item.clone()))),
        }
    }
    let display = match flat.iter().find(|(k, _)| k == "file.filename") {
        Some((_, Value::String(name))) => name.clone(),
        _ => arg.to_string(),
    };
    from_options(arg, &flat)
        .map_err(|why| Fail::Report(format!("Could not open '{display}': {why}")))
}

/// `a,,b` is one item `a,b`.
fn split_commas(text: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(last) = items.last_mut() {
                    last.push(',');
                }
            } else {
                items.push(String::new());
            }
        } else if let Some(last) = items.last_mut() {
            last.push(c);
        }
    }
    items.into_iter().filter(|s| !s.is_empty()).collect()
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&name, inner, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

/// Options every block node accepts that change nothing for this tool.
const HARMLESS_OPTIONS: &[&str] = &[
    "node-name",
    "read-only",
    "auto-read-only",
    "force-share",
    "discard",
    "detect-zeroes",
    "cache.direct",
    "cache.no-flush",
    "file.driver",
    "file.node-name",
    "file.read-only",
    "file.aio",
    "file.locking",
    "data-file.driver",
    "data-file.node-name",
    "data-file.read-only",
    "data-file.aio",
    "data-file.locking",
];

/// Builds a spec from flattened block options.
fn from_options(arg: &str, options: &[(String, Value)]) -> Result<ImageSpec, String> {
    let mut spec = ImageSpec {
        arg: arg.to_string(),
        path: PathBuf::new(),
        format: None,
        no_backing: false,
        data_file: None,
    };
    let mut filename = None;
    for (key, value) in options {
        let text = match value {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        match key.as_str() {
            "driver" => spec.format = text,
            "file.filename" | "filename" => filename = text,
            "file" => {
                let name = text.unwrap_or_default();
                return Err(format!(
                    "Cannot find device='{name}' nor node-name='{name}'"
                ));
            }
            "backing" if value.is_null() => spec.no_backing = true,
            "data-file.filename" => spec.data_file = text.map(PathBuf::from),
            "data-file" => {
                let name = text.unwrap_or_default();
                return Err(format!(
                    "Cannot find device='{name}' nor node-name='{name}'"
                ));
            }
            key if HARMLESS_OPTIONS.contains(&key) => {}
            other => {
                let driver = spec.format.clone().unwrap_or_else(|| "qcow2".into());
                return Err(format!(
                    "Block format '{driver}' does not support the option '{other}'"
                ));
            }
        }
    }
    match filename {
        Some(name) => spec.path = PathBuf::from(name),
        None => return Err("A block device must be specified for \"file\"".into()),
    }
    Ok(spec)
}

/// serde_json's message in the words QEMU's JSON parser uses for the common cases.
fn json_error(error: &serde_json::Error) -> String {
    if error.is_eof() {
        "JSON parse error, premature EOI".into()
    } else {
        format!("JSON parse error, {error}")
    }
}

/// `file:PATH` is PATH; any other `PROTOCOL:` prefix (before the first `/`) is a protocol this
/// tool does not speak.
pub fn strip_file_prefix(arg: &str) -> Result<PathBuf, String> {
    if let Some(rest) = arg.strip_prefix("file:") {
        return Ok(PathBuf::from(rest));
    }
    if let Some((protocol, _)) = arg.split_once(':') {
        if !protocol.contains('/') && !protocol.is_empty() {
            return Err(match protocol {
                "nbd" | "nbd+unix" | "nbd+tcp" | "http" | "https" | "ftp" | "ftps" | "ssh"
                | "iscsi" | "nfs" | "gluster" | "rbd" => format!(
                    "Protocol '{protocol}' is not supported by this tool (local files only)"
                ),
                other => format!("Unknown protocol '{other}'"),
            });
        }
    }
    Ok(PathBuf::from(arg))
}

/// QOM types qemu-img accepts on its command line (`--object TYPE,id=ID,...`).
const OBJECT_TYPES: &[&str] = &[
    "secret",
    "secret_keyring",
    "iothread",
    "throttle-group",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-creds-x509",
    "tls-cipher-suites",
    "authz-simple",
    "authz-list",
    "authz-listfile",
    "authz-pam",
];

/// `--object` arguments: checked like qemu-img's first steps (a known type and an id; a secret
/// needs its data), then ignored — this tool needs no secrets or other objects.
pub fn check_objects(objects: &[&str]) -> Result<(), Fail> {
    for object in objects {
        let items = split_commas(object);
        let mut kind = None;
        let has = |key: &str| items.iter().any(|i| i.starts_with(&format!("{key}=")));
        for (position, item) in items.iter().enumerate() {
            match item.split_once('=') {
                Some(("qom-type", value)) => kind = Some(value.to_string()),
                None if position == 0 => kind = Some(item.clone()),
                _ => {}
            }
        }
        let Some(kind) = kind else {
            return Err(Fail::Report("Parameter 'qom-type' is missing".into()));
        };
        if !OBJECT_TYPES.contains(&kind.as_str()) {
            return Err(Fail::Report(format!(
                "Parameter 'qom-type' does not accept value '{kind}'"
            )));
        }
        if !has("id") {
            return Err(Fail::Report("Parameter 'id' is missing".into()));
        }
        if kind == "secret" && !has("file") && !has("data") {
            return Err(Fail::Report(
                "Either 'file' or 'data' must be provided".into(),
            ));
        }
    }
    Ok(())
}

/// The format of an image: as given, or probed like qemu-img (qcow2 magic, else raw).
pub fn resolve_format(spec: &ImageSpec) -> Result<Format, Fail> {
    let fail = |why: String| Fail::Report(format!("Could not open '{}': {why}", spec.arg));
    check_regular(spec).map_err(fail)?;
    match spec.format.as_deref() {
        Some("qcow2") => Ok(Format::Qcow2),
        Some("raw") => Ok(Format::Raw),
        Some(other) => Err(fail(unsupported_driver(other))),
        None => Format::probe(&spec.path).map_err(|e| fail(e.qemu_text())),
    }
}

/// qemu-img's reason for a format it does not know, or one this tool does not read.
pub fn unsupported_driver(name: &str) -> String {
    match name {
        "bochs" | "cloop" | "dmg" | "luks" | "parallels" | "qcow" | "qed" | "vdi" | "vhdx"
        | "vmdk" | "vpc" | "vvfat" => {
            format!("Format '{name}' is not supported by this tool (qcow2 and raw only)")
        }
        other => format!("Unknown driver '{other}'"),
    }
}

/// The file layer's checks: it must exist and not be a directory.
fn check_regular(spec: &ImageSpec) -> Result<(), String> {
    let path = &spec.path;
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(format!(
            "'file' driver requires '{}' to be a regular file",
            path.display()
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "Could not open '{}': {}",
            path.display(),
            strerror(&e)
        )),
    }
}

/// `Could not open 'ARG': REASON` for an image that failed to open.
pub fn open_error_text(arg: &str, error: &LibError) -> String {
    format!("Could not open '{arg}': {}", error.qemu_text())
}

/// Opens a backing file (and its own chain) as `create` does, read-only, to learn its size.
pub fn open_chain_for_create(path: &Path, format: Option<&str>) -> Result<qcow::Disk, LibError> {
    let format = match format {
        Some(name) => Some(name.parse::<Format>()?),
        None => None,
    };
    let options = qcow::OpenOptions {
        read_only: true,
        ..qcow::OpenOptions::default()
    };
    qcow::Disk::open(path, format, &options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_image_opts_name_the_file() {
        let spec = parse(
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a.q"}}"#,
            None,
        )
        .unwrap();
        assert_eq!(spec.path, PathBuf::from("a.q"));
        assert_eq!(spec.format.as_deref(), Some("qcow2"));
        let spec = parse_image_opts("driver=raw,file.filename=b,,c").unwrap();
        assert_eq!(spec.path, PathBuf::from("b,c"));
        assert_eq!(spec.format.as_deref(), Some("raw"));
        assert_eq!(parse("file:x.q", None).unwrap().path, PathBuf::from("x.q"));
    }

    #[test]
    fn bad_arguments_get_qemu_img_messages() {
        let err = |arg: &str| match parse(arg, None) {
            Err(Fail::Report(text)) => text,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            err(r#"json:{"driver":"qcow2""#),
            r#"Could not open 'json:{"driver":"qcow2"': Could not parse the JSON options: JSON parse error, premature EOI"#
        );
        assert_eq!(
            err("json:[]"),
            "Could not open 'json:[]': Invalid JSON object given"
        );
        assert_eq!(
            err("foo:bar"),
            "Could not open 'foo:bar': Unknown protocol 'foo'"
        );
    }
}
