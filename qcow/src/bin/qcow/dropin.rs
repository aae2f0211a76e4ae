//! The commands that behave exactly like qemu-img's (`create`, `info`, `check`, `map`): parsed
//! with glibc's option rules and reporting errors in qemu-img's words.

use std::process::ExitCode;

use crate::getopt::{self, OptSpec, Parsed};
use crate::prog::Fail;
use crate::{check_cmd, create_cmd, info, map_cmd};

/// Runs `args[1]` if it is one of these commands (or there is no command at all); `None` hands
/// the command line to the other commands' parser. `is_other_command` tells whether that parser
/// knows a name, so that unknown names get qemu-img's message.
pub fn dispatch(args: &[String], is_other_command: impl Fn(&str) -> bool) -> Option<ExitCode> {
    let Some(command) = args.get(1) else {
        return Some(Fail::Usage("Not enough arguments".into()).print(None));
    };
    let rest = &args[2..];
    let result = match command.as_str() {
        "create" => create_cmd::run(rest),
        "info" => info::run(rest),
        "check" => check_cmd::run(rest),
        "map" => map_cmd::run(rest),
        name if name.starts_with('-') || is_other_command(name) => return None,
        name => {
            return Some(Fail::Usage(format!("Command not found: {name}")).print(None));
        }
    };
    Some(match result {
        Ok(code) => ExitCode::from(code),
        Err(fail) => fail.print(Some(command)),
    })
}

/// Parses a command's arguments; `None` when `-h`/`--help` asked for the usage (printed).
pub fn parse_args(args: &[String], specs: &[OptSpec], usage: &str) -> Result<Option<Parsed>, Fail> {
    let parsed = getopt::parse(args, specs).map_err(Fail::Getopt)?;
    if parsed.has("help") {
        println!("{usage}");
        return Ok(None);
    }
    Ok(Some(parsed))
}
