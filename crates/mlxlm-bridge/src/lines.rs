// SPDX-License-Identifier: EUPL-1.2
//! Reading newline-terminated lines with a size limit.

use std::io::{self, BufRead, ErrorKind};

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// One line without its `\n` (and without a `\r` before it). A last line without `\n` at the
    /// end of the input also counts.
    Complete(Vec<u8>),
    /// The input ended before any byte of a new line.
    Eof,
    /// The line grew past the limit before its end; reading stopped there, mid-line.
    TooLong,
}

/// Reads one line of at most `max` bytes (not counting the line ending).
///
/// # Errors
///
/// The reader's errors, except [`ErrorKind::Interrupted`], which is retried.
pub(crate) fn read_line(reader: &mut impl BufRead, max: usize) -> io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let chunk = match reader.fill_buf() {
            Ok(chunk) => chunk,
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if chunk.is_empty() {
            return Ok(if line.is_empty() { Line::Eof } else { finish(line, max) });
        }
        let (take, used, complete) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, i + 1, true),
            None => (chunk.len(), chunk.len(), false),
        };
        // One byte of slack for a `\r` before the `\n`; `finish` applies the exact limit.
        if line.len().saturating_add(take) > max.saturating_add(1) {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&chunk[..take]);
        reader.consume(used);
        if complete {
            return Ok(finish(line, max));
        }
    }
}

fn finish(mut line: Vec<u8>, max: usize) -> Line {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if line.len() > max { Line::TooLong } else { Line::Complete(line) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Read};

    fn all(input: &[u8], max: usize, capacity: usize) -> Vec<Line> {
        let mut reader = BufReader::with_capacity(capacity, input);
        let mut out = Vec::new();
        loop {
            let line = read_line(&mut reader, max).unwrap();
            let end = matches!(line, Line::Eof | Line::TooLong);
            out.push(line);
            if end {
                return out;
            }
        }
    }

    fn l(s: &str) -> Line {
        Line::Complete(s.as_bytes().to_vec())
    }

    #[test]
    fn splits_lines_strips_cr_and_keeps_an_unterminated_last_line() {
        for capacity in [1, 2, 3, 64] {
            assert_eq!(all(b"ab\r\n\ncd\nef", 10, capacity), [l("ab"), l(""), l("cd"), l("ef"), Line::Eof]);
            assert_eq!(all(b"", 10, capacity), [Line::Eof]);
        }
    }

    #[test]
    fn limit_is_exclusive_of_the_line_ending() {
        for capacity in [1, 4, 64] {
            assert_eq!(all(b"abcd\nabcd\r\n", 4, capacity), [l("abcd"), l("abcd"), Line::Eof]);
            assert_eq!(all(b"abcde\n", 4, capacity), [Line::TooLong]);
            assert_eq!(all(b"abcde", 4, capacity), [Line::TooLong]);
            assert_eq!(all(b"ok\nabcdefgh", 4, capacity), [l("ok"), Line::TooLong]);
        }
    }

    #[test]
    fn errors_other_than_interrupted_are_returned() {
        struct Flaky(u8);
        impl Read for Flaky {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.0 += 1;
                match self.0 {
                    1 => Err(io::Error::new(ErrorKind::Interrupted, "again")),
                    2 => {
                        buf[..2].copy_from_slice(b"x\n");
                        Ok(2)
                    }
                    _ => Err(io::Error::other("broken")),
                }
            }
        }
        let mut reader = BufReader::new(Flaky(0));
        assert_eq!(read_line(&mut reader, 8).unwrap(), l("x"));
        assert_eq!(read_line(&mut reader, 8).unwrap_err().to_string(), "broken");
    }
}
