// SPDX-License-Identifier: EUPL-1.2
//! Python's text forms that files and prompts must match byte for byte: a
//! float as `repr` writes it, and a string as `json.dumps` writes it. Chat
//! templates' `tojson` ([`crate::chat`]) and the config.json that `convert`
//! writes ([`crate::convert`]) both use them.

use std::fmt::Write as _;

/// A float as Python's `repr` writes it: shortest round-trip digits,
/// positional for decimal exponents from -4 to 15 (`1.0`, `0.0001`),
/// scientific beyond (`1e+16`, `1e-05`); `NaN`, `Infinity` and `-Infinity`
/// as `json.dumps` writes them.
pub(crate) fn float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` prints the same shortest digits: `1.2345e-6`, `1e16`.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let n = i32::try_from(digits.len()).unwrap_or(i32::MAX);
    let body = if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = usize::try_from(exp + 1).unwrap_or(0);
            if n <= exp + 1 {
                format!("{digits}{}.0", "0".repeat(int_len - digits.len()))
            } else {
                format!("{}.{}", &digits[..int_len], &digits[int_len..])
            }
        } else {
            format!("0.{}{digits}", "0".repeat(usize::try_from(-exp - 1).unwrap_or(0)))
        }
    } else {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{exp_sign}{:02}", exp.unsigned_abs())
    };
    format!("{sign}{body}")
}

/// `s` as a JSON string the way Python's `json.dumps` writes it: `"`, `\`
/// and the control characters escaped (`\n`, `\r`, `\t`, `\b`, `\f` by name,
/// the rest as `\u00XX`) and, with `ensure_ascii`, everything outside
/// printable ASCII as `\uXXXX` (UTF-16 surrogate pairs beyond the BMP).
pub(crate) fn json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 || ensure_ascii && !(' '..='~').contains(&c) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_written_as_python_repr_writes_them() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e-6, "1e-06"),
            (10000.0, "10000.0"),
            (1_000_000.0, "1000000.0"),
            (123_456_789.0, "123456789.0"),
            (0.02, "0.02"),
            (0.0001, "0.0001"),
            (0.00012, "0.00012"),
            (0.00001, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (1.25e-7, "1.25e-07"),
            (1e15, "1000000000000000.0"),
            (1234567890123456.0, "1234567890123456.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1.25e20, "1.25e+20"),
            (123.456, "123.456"),
            (3.0e-120, "3e-120"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (0.3333333333333333, "0.3333333333333333"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
            (f64::NAN, "NaN"),
        ];
        for (f, want) in cases {
            assert_eq!(float(f), want, "{f:e}");
        }
    }

    #[test]
    fn strings_are_escaped_as_json_dumps_escapes_them() {
        let s = "x\u{e9}\u{1f600}\"\\\n\u{7f}\u{1}\t";
        let mut ascii = String::new();
        json_string(&mut ascii, s, true);
        assert_eq!(ascii, "\"x\\u00e9\\ud83d\\ude00\\\"\\\\\\n\\u007f\\u0001\\t\"");
        // Without ensure_ascii only the quote, the backslash and control
        // characters are escaped (DEL is not a control character to json).
        let mut raw = String::new();
        json_string(&mut raw, s, false);
        assert_eq!(raw, "\"x\u{e9}\u{1f600}\\\"\\\\\\n\u{7f}\\u0001\\t\"");
    }
}
