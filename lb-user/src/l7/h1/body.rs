//! HTTP/1 body framing (RFC 9112 §6, §7): how long a message body is, and a chunked-coding
//! walker that validates every size line, chunk end and trailer line of the bytes it is fed, so
//! the code that forwards a chunked body verbatim is the code that checked it. Iterative and
//! bounded: any input costs O(bytes) time and O(1) memory.
use thiserror::Error;

/// How a message body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked coding, ended by the last chunk and its trailer section.
    Chunked,
    /// Everything until the sender closes (responses only).
    Close,
}

/// Why a chunked body is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ChunkError {
    #[error("invalid chunk size line")]
    Size,
    #[error("chunk size too large")]
    Overflow,
    #[error("invalid chunk extension")]
    Extension,
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    #[error("invalid trailer field")]
    Trailer,
    #[error("trailer section too large")]
    TrailerTooLarge,
}

/// At most this many bytes in one chunk-size line (extensions included): nobody needs more,
/// and a line that never ends must not cost unbounded time to refuse.
const MAX_SIZE_LINE: u32 = 4096;
/// At most 16 hex digits: a size fits in 64 bits.
const MAX_SIZE_DIGITS: u8 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a size (`digits` so far).
    Size { digits: u8 },
    /// Whitespace after the size: only `;` may follow (BWS before an extension).
    SizeWs,
    /// Inside chunk extensions, until CR.
    Ext,
    /// CR of a size line seen, LF expected.
    SizeLf,
    /// Passing chunk data: this many bytes left.
    Data(u64),
    /// Chunk data done: CR expected.
    DataCr,
    /// LF after chunk data expected.
    DataLf,
    /// Start of a trailer line, or CR of the empty line that ends the body.
    TrailerStart,
    /// Inside a trailer field's name (before `:`).
    TrailerName,
    /// Inside a trailer field's value, until CR.
    TrailerValue,
    /// LF after a trailer line expected.
    TrailerLf,
    /// LF of the final empty line expected.
    FinalLf,
    /// The body is over; nothing more belongs to it.
    Done,
}

/// Walks a chunked body as it arrives.
#[derive(Debug, Clone)]
pub struct Chunked {
    state: State,
    size: u64,
    /// Bytes of the current size line.
    line: u32,
    /// Bytes of the trailer section so far.
    trailers: u32,
    max_trailers: u32,
    /// Chunk data bytes seen (the body's decoded length).
    pub data: u64,
}

impl Chunked {
    /// A walker whose trailer section may hold `max_trailers` bytes.
    pub fn new(max_trailers: usize) -> Self {
        Self {
            state: State::Size { digits: 0 },
            size: 0,
            line: 0,
            trailers: 0,
            max_trailers: u32::try_from(max_trailers).unwrap_or(u32::MAX),
            data: 0,
        }
    }

    /// True once the last chunk and the trailer section have been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Walks `input`; returns how many of its bytes belong to the body (all of them until the
    /// body ends; what follows is the next message's).
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, ChunkError> {
        self.feed_data(input, |_| {})
    }

    /// [`Chunked::feed`], handing each run of chunk data to `on_data` (to remove the coding).
    pub fn feed_data(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            if let State::Data(left) = self.state {
                // Bulk: chunk data is not looked at.
                let n = left.min((input.len() - i) as u64);
                on_data(&input[i..i + n as usize]);
                i += n as usize;
                self.state = if n == left { State::DataCr } else { State::Data(left - n) };
                continue;
            }
            if self.state == State::Done {
                break;
            }
            self.byte(input[i])?;
            i += 1;
        }
        Ok(i)
    }

    fn byte(&mut self, b: u8) -> Result<(), ChunkError> {
        match self.state {
            State::Size { digits } => {
                self.line += 1;
                if let Some(v) = hex(b) {
                    if digits == MAX_SIZE_DIGITS {
                        return Err(ChunkError::Overflow);
                    }
                    self.size = (self.size << 4) | u64::from(v);
                    self.state = State::Size { digits: digits + 1 };
                    return Ok(());
                }
                if digits == 0 {
                    return Err(ChunkError::Size);
                }
                self.state = match b {
                    b'\r' => State::SizeLf,
                    b';' => State::Ext,
                    b' ' | b'\t' => State::SizeWs,
                    _ => return Err(ChunkError::Size),
                };
            }
            State::SizeWs => {
                self.line += 1;
                self.state = match b {
                    b' ' | b'\t' => State::SizeWs,
                    b';' => State::Ext,
                    _ => return Err(ChunkError::Size),
                };
            }
            State::Ext => {
                self.line += 1;
                if self.line > MAX_SIZE_LINE {
                    return Err(ChunkError::Extension);
                }
                match b {
                    b'\r' => self.state = State::SizeLf,
                    // Visible ASCII, space and tab; control bytes (a bare LF among them) and
                    // obs-text are how parsers are made to disagree.
                    b'\t' | b' '..=b'~' => {}
                    _ => return Err(ChunkError::Extension),
                }
            }
            State::SizeLf => {
                if b != b'\n' {
                    return Err(ChunkError::Size);
                }
                self.line = 0;
                self.state = if self.size == 0 {
                    State::TrailerStart
                } else {
                    self.data = self.data.saturating_add(self.size);
                    State::Data(std::mem::take(&mut self.size))
                };
            }
            State::Data(_) | State::Done => unreachable!("handled by feed"),
            State::DataCr => {
                if b != b'\r' {
                    return Err(ChunkError::DataEnd);
                }
                self.state = State::DataLf;
            }
            State::DataLf => {
                if b != b'\n' {
                    return Err(ChunkError::DataEnd);
                }
                self.state = State::Size { digits: 0 };
            }
            State::TrailerStart => {
                self.count_trailer()?;
                self.state = match b {
                    b'\r' => State::FinalLf,
                    _ if is_tchar(b) => State::TrailerName,
                    _ => return Err(ChunkError::Trailer),
                };
            }
            State::TrailerName => {
                self.count_trailer()?;
                self.state = match b {
                    b':' => State::TrailerValue,
                    _ if is_tchar(b) => State::TrailerName,
                    _ => return Err(ChunkError::Trailer),
                };
            }
            State::TrailerValue => {
                self.count_trailer()?;
                match b {
                    b'\r' => self.state = State::TrailerLf,
                    b'\t' | b' '..=b'~' | 0x80.. => {}
                    _ => return Err(ChunkError::Trailer),
                }
            }
            State::TrailerLf => {
                self.count_trailer()?;
                if b != b'\n' {
                    return Err(ChunkError::Trailer);
                }
                self.state = State::TrailerStart;
            }
            State::FinalLf => {
                if b != b'\n' {
                    return Err(ChunkError::Trailer);
                }
                self.state = State::Done;
            }
        }
        Ok(())
    }

    fn count_trailer(&mut self) -> Result<(), ChunkError> {
        self.trailers += 1;
        if self.trailers > self.max_trailers {
            return Err(ChunkError::TrailerTooLarge);
        }
        Ok(())
    }
}

/// The value of one hex digit.
pub(crate) fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 9110 §5.6.2 token characters.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(input: &[u8]) -> Result<(usize, bool, u64), ChunkError> {
        let mut c = Chunked::new(1024);
        let n = c.feed(input)?;
        Ok((n, c.is_done(), c.data))
    }

    #[test]
    fn valid_bodies_end_where_they_end() {
        let body = b"5;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /";
        assert_eq!(walk(body), Ok((body.len() - 5, true, 5)));
        assert_eq!(walk(b"A\r\n0123456789\r\n0\r\n\r\n"), Ok((20, true, 10)));
        assert_eq!(walk(b"5 ;x\r\nhello\r\n0\r\n\r\n"), Ok((18, true, 5)));
    }

    #[test]
    fn byte_at_a_time_agrees_with_whole() {
        let body = b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nA: b\r\nC: d\r\n\r\n";
        let mut c = Chunked::new(1024);
        let mut total = 0;
        for b in body.iter() {
            total += c.feed(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(total, body.len());
        assert!(c.is_done());
        assert_eq!(c.data, 19);
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"5;\x01\r\nhello\r\n",
            b"fffffffffffffffff\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"5 x\r\n",
            b"\r\n",
            b"0\r\nbad header\r\n\r\n",
            b"0\r\nA: b\nC: d\r\n\r\n",
            b"0\r\n\r\r",
        ] {
            assert!(walk(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn endless_lines_are_bounded() {
        let mut ext = b"1;".to_vec();
        ext.extend(std::iter::repeat_n(b'a', 5000));
        assert_eq!(walk(&ext), Err(ChunkError::Extension));
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            trailers.extend_from_slice(b"a:\r\n");
        }
        assert_eq!(walk(&trailers), Err(ChunkError::TrailerTooLarge));
    }
}
