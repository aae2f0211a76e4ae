//! Sizes as QEMU reads them (`qemu_strtosz`): decimal or `0x` hex, an optional fraction, an
//! optional binary suffix (`b`, `k`, `M`, `G`, `T`, `P`, `E`, any case), rounded half up to bytes.

/// Why a size did not parse. The two cases get different messages from qemu-img, so callers need
/// to tell them apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSizeError {
    #[error("invalid size '{0}': expected a number with an optional k, M, G, T, P or E suffix")]
    Invalid(String),
    #[error("size '{0}' is out of range (negative, or 16 EiB or more)")]
    OutOfRange(String),
}

/// Parses `text` exactly like QEMU's `qemu_strtosz`, which qemu-img uses for every size argument
/// and `-o` size option: `4096`, `64k`, `1.5G`, `0x10000`, ` 4M` (leading blanks are skipped) are
/// sizes; `1.5` (a fraction needs a suffix), `0x10k` (hex takes no suffix), `4M ` and `-1` are not.
pub fn parse_size(text: &str) -> Result<u64, ParseSizeError> {
    let invalid = || ParseSizeError::Invalid(text.to_string());
    let range = || ParseSizeError::OutOfRange(text.to_string());
    let (integer, rest) = leading_uint(text);
    let (mut value, mut rest) = match integer {
        Some(Ok(value)) => (value, rest),
        // A negative number is out of range if nothing follows it, invalid otherwise.
        Some(Err(Overflow::Negative | Overflow::TooLarge)) if !rest.is_empty() => {
            return Err(invalid())
        }
        Some(Err(_)) => return Err(range()),
        None => (0, text),
    };
    let mut fraction_bits = 0u64;
    if integer == Some(Ok(0)) && rest.starts_with(['x', 'X']) {
        // Hex: no fraction and no suffix.
        let hex = text.trim_start_matches(is_space);
        let hex = hex.strip_prefix('+').unwrap_or(hex);
        let digits = &hex[2..];
        let end = digits
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(digits.len());
        if end == 0 {
            // strtoull reads just the "0" and stops at the 'x'.
            return Err(invalid());
        }
        value = u64::from_str_radix(&digits[..end], 16).map_err(|_| range())?;
        if end != digits.len() {
            return Err(invalid());
        }
        return Ok(value);
    }
    if rest.starts_with('.') || (integer.is_none() && text.contains('.')) {
        let (fraction, after) = leading_fraction(rest, integer.is_some()).ok_or_else(invalid)?;
        rest = after;
        if fraction >= 1.0 {
            value = value.checked_add(1).ok_or_else(range)?;
        } else {
            // 64-bit fixed point, as QEMU keeps it.
            fraction_bits = (fraction * 2f64.powi(64)) as u64;
        }
    } else if integer.is_none() {
        return Err(invalid());
    }
    let mut chars = rest.chars();
    let multiplier = match chars.next().and_then(suffix_shift) {
        Some(shift) => {
            rest = chars.as_str();
            1u64 << shift
        }
        None => 1,
    };
    if !rest.is_empty() {
        return Err(invalid());
    }
    if multiplier == 1 {
        return if fraction_bits == 0 {
            Ok(value)
        } else {
            // A fraction of a byte needs a suffix.
            Err(invalid())
        };
    }
    let scaled_fraction = u128::from(fraction_bits) * u128::from(multiplier);
    let round_half_up = (scaled_fraction as u64) >> 63;
    let total = u128::from(value) * u128::from(multiplier)
        + (scaled_fraction >> 64)
        + u128::from(round_half_up);
    u64::try_from(total).map_err(|_| range())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overflow {
    Negative,
    TooLarge,
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// `strtoull(text, 10)` plus QEMU's refusal of negative numbers: `None` when no digits were read,
/// with the unread rest.
fn leading_uint(text: &str) -> (Option<Result<u64, Overflow>>, &str) {
    let trimmed = text.trim_start_matches(is_space);
    let (negative, unsigned) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    let end = unsigned
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(unsigned.len());
    if end == 0 {
        return (None, text);
    }
    let rest = &unsigned[end..];
    if negative {
        return (Some(Err(Overflow::Negative)), rest);
    }
    match unsigned[..end].parse::<u64>() {
        Ok(value) => (Some(Ok(value)), rest),
        Err(_) => (Some(Err(Overflow::TooLarge)), rest),
    }
}

/// The fraction `strtod` reads from `rest` (which starts at the '.' after an integer part, or is
/// the whole input when there was none); an exponent is never read since 'e' is the exabyte suffix.
fn leading_fraction(rest: &str, had_integer: bool) -> Option<(f64, &str)> {
    if had_integer && !rest[1..].starts_with(|c: char| c.is_ascii_digit()) {
        // "1." or "1.k": no fractional digits.
        return Some((0.0, &rest[1..]));
    }
    let trimmed = rest.trim_start_matches(is_space);
    let (negative, unsigned) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    let int_end = unsigned
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(unsigned.len());
    let mut end = int_end;
    if unsigned[end..].starts_with('.') {
        end += 1;
        end += unsigned[end..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(unsigned.len() - end);
    }
    let digits = &unsigned[..end];
    if !digits.chars().any(|c| c.is_ascii_digit()) || negative {
        return None;
    }
    let mut value: f64 = format!("0{digits}").parse().ok()?;
    if value == 0.0 && digits.chars().any(|c| ('1'..='9').contains(&c)) {
        // strtod underflow: QEMU keeps the smallest non-zero fraction.
        value = 2f64.powi(-64);
    }
    Some((value, &unsigned[end..]))
}

fn suffix_shift(c: char) -> Option<u32> {
    Some(match c.to_ascii_uppercase() {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        'P' => 50,
        'E' => 60,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_qemu_img_accepts() {
        let cases: &[(&str, u64)] = &[
            ("4096", 4096),
            ("4k", 4096),
            ("64K", 65536),
            ("1M", 1 << 20),
            ("10G", 10 << 30),
            ("2T", 2 << 40),
            ("1.5G", 3 << 29),
            ("512b", 512),
            ("1B", 1),
            ("0x10000", 65536),
            ("0X10", 16),
            (" 4M", 4 << 20),
            ("+5", 5),
            ("+.5k", 512),
            (".5M", 512 << 10),
            ("1.k", 1024),
            ("1.", 1),
            ("010", 10),
            ("1.0000001M", 1 << 20),
            ("1.999999999999999999999k", 2048),
            ("0.0000000000000000000001k", 0),
            ("1.5e", 1_729_382_256_910_270_464),
            ("1e", 1 << 60),
        ];
        for &(text, want) in cases {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn refuses_what_qemu_img_refuses() {
        let invalid = [
            "", "k", ".", ".k", "1.5", "1.5b", "0x10k", "0x", "0x1.5", "1e3", "4M ", "5 ", "1K5",
            "- 1", "-x", "-1.5k", "-.5k", "inf", "1.inf", "1.5x", "12x",
        ];
        for text in invalid {
            assert_eq!(
                parse_size(text),
                Err(ParseSizeError::Invalid(text.into())),
                "{text}"
            );
        }
        for text in [
            "-1",
            "-0",
            "16E",
            "0xffffffffffffffffff",
            "18446744073709551616",
        ] {
            assert_eq!(
                parse_size(text),
                Err(ParseSizeError::OutOfRange(text.into())),
                "{text}"
            );
        }
    }
}
