// SPDX-License-Identifier: EUPL-1.2
//! What the launcher does with a rank's standard output and error: each pipe is read in chunks
//! by a thread of its own, echoed as it comes when asked (rank 0's stderr: a server's log), and
//! only its last bytes are kept, for error reports and [`super::RankOutput`]. A job that runs for
//! weeks and logs every request therefore holds a fixed amount per rank, and a rank that writes
//! one endless line is read chunk by chunk, never as a whole line.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

/// How much of each rank's stdout and of its stderr a job keeps by default (the last bytes).
pub const DEFAULT_OUTPUT_TAIL: usize = 64 * 1024;

/// The most read from a pipe at once.
const CHUNK: usize = 8 * 1024;

/// The last `cap` bytes written to a stream, and how many came before them.
#[derive(Debug)]
pub(super) struct Tail {
    bytes: VecDeque<u8>,
    cap: usize,
    dropped: u64,
}

impl Tail {
    pub(super) fn new(cap: usize) -> Tail {
        Tail { bytes: VecDeque::with_capacity(cap.min(CHUNK)), cap, dropped: 0 }
    }

    pub(super) fn push(&mut self, chunk: &[u8]) {
        let keep = &chunk[chunk.len().saturating_sub(self.cap)..];
        self.dropped += (chunk.len() - keep.len()) as u64;
        let over = (self.bytes.len() + keep.len()).saturating_sub(self.cap);
        self.bytes.drain(..over);
        self.dropped += over as u64;
        self.bytes.extend(keep);
    }

    /// The kept bytes as text (invalid UTF-8 replaced); a character cut by the limit is left out.
    pub(super) fn text(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        let mut bytes = Vec::with_capacity(self.bytes.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        let start =
            if self.dropped > 0 { bytes.iter().take(3).take_while(|b| (**b & 0xC0) == 0x80).count() } else { 0 };
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// How many bytes came before the kept ones.
    #[cfg(test)]
    pub(super) fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// A [`Tail`] that a pipe's thread fills and the job reads.
pub(super) type SharedTail = Arc<Mutex<Tail>>;

pub(super) fn shared(cap: usize) -> SharedTail {
    Arc::new(Mutex::new(Tail::new(cap)))
}

pub(super) fn text_of(tail: &SharedTail) -> String {
    tail.lock().unwrap_or_else(PoisonError::into_inner).text()
}

/// Reads `pipe` to its end on a thread of its own, into `tail` (and onto this process's stderr
/// when `echo`), then sends `rank` on `closed`.
pub(super) fn pump(
    rank: usize,
    mut pipe: impl Read + Send + 'static,
    tail: SharedTail,
    echo: bool,
    closed: mpsc::Sender<usize>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if echo {
                        // Best effort: our own stderr may be closed.
                        let _ = std::io::stderr().write_all(&buf[..n]);
                    }
                    tail.lock().unwrap_or_else(PoisonError::into_inner).push(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = closed.send(rank);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_keeps_the_last_bytes() {
        let mut t = Tail::new(8);
        t.push(b"abc");
        assert_eq!((t.text().as_str(), t.dropped()), ("abc", 0));
        t.push(b"defghij");
        assert_eq!((t.text().as_str(), t.dropped()), ("cdefghij", 2));
        t.push(&[b'x'; 100]);
        assert_eq!((t.text(), t.dropped()), ("x".repeat(8), 102));
        t.push(b"");
        assert_eq!(t.text(), "x".repeat(8));
    }

    #[test]
    fn a_character_cut_by_the_limit_is_left_out() {
        let mut t = Tail::new(4);
        t.push("aé€".as_bytes()); // 1 + 2 + 3 bytes: a and the first byte of é fall out
        assert_eq!(t.text(), "€");
        let mut whole = Tail::new(6);
        whole.push("aé€".as_bytes());
        assert_eq!(whole.text(), "aé€");
        let mut zero = Tail::new(0);
        zero.push(b"anything");
        assert_eq!((zero.text().as_str(), zero.dropped()), ("", 8));
    }
}
