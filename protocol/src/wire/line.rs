//! Reading newline-framed lines from a socket with a hard length limit.
//!
//! A peer that sends an endless line must not make us buffer it: past the limit the reader stops
//! keeping bytes, skips to the next `\n`, and reports `line_too_long` once, so the connection
//! stays usable. All state lives in the reader, so its futures are cancel-safe in `select!`.

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use super::MAX_LINE;
use super::error::{ErrorCode, WireError};
use super::request::Request;

/// Splits a byte stream into lines of at most `limit` bytes (the `\n` excluded).
#[derive(Debug)]
pub struct LineReader<R> {
    inner: R,
    limit: usize,
    buf: Vec<u8>,
    /// Bytes of the current over-long line seen so far; `None` when not discarding.
    discarding: Option<usize>,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    /// A reader with the protocol's limit, [`MAX_LINE`].
    pub fn new(inner: R) -> LineReader<R> {
        LineReader::with_limit(inner, MAX_LINE)
    }

    /// A reader with another limit (a client reading replies allows far longer lines).
    pub fn with_limit(inner: R, limit: usize) -> LineReader<R> {
        LineReader {
            inner,
            limit,
            buf: Vec::new(),
            discarding: None,
        }
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The next line without its `\n` (a `\r` is kept; [`Request::parse`] strips it).
    ///
    /// `Ok(None)` at end of stream. An unterminated last line is returned as a line, so
    /// `printf status | socat - UNIX-CONNECT:…` gets an answer. An over-long line yields
    /// `Some(Err(line_too_long))` once its `\n` (or the end of stream) arrives.
    pub async fn next_line(&mut self) -> io::Result<Option<Result<Vec<u8>, WireError>>> {
        loop {
            let available = self.inner.fill_buf().await?;
            if available.is_empty() {
                if let Some(seen) = self.discarding.take() {
                    return Ok(Some(Err(self.too_long(seen))));
                }
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(Ok(std::mem::take(&mut self.buf))));
            }
            let newline = available.iter().position(|b| *b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            match self.discarding.as_mut() {
                Some(seen) => *seen += chunk.len(),
                None if self.buf.len() + chunk.len() > self.limit => {
                    self.discarding = Some(self.buf.len() + chunk.len());
                    self.buf = Vec::new();
                }
                None => self.buf.extend_from_slice(chunk),
            }
            let consumed = chunk.len() + usize::from(newline.is_some());
            self.inner.consume(consumed);
            if newline.is_some() {
                if let Some(seen) = self.discarding.take() {
                    return Ok(Some(Err(self.too_long(seen))));
                }
                return Ok(Some(Ok(std::mem::take(&mut self.buf))));
            }
        }
    }

    /// The next non-blank line, parsed. Blank lines (only spaces, tabs, a `\r`) get no reply, so
    /// a person typing into `socat` can press enter.
    pub async fn next_request(&mut self) -> io::Result<Option<Result<Request, WireError>>> {
        loop {
            match self.next_line().await? {
                None => return Ok(None),
                Some(Err(e)) => return Ok(Some(Err(e))),
                Some(Ok(line)) if is_blank(&line) => continue,
                Some(Ok(line)) => return Ok(Some(Request::parse(&line))),
            }
        }
    }

    /// Waits until there is input to read (`true`) or the peer closed its side (`false`).
    /// Consumes nothing: used to notice a vanished peer while a long request is in progress.
    pub async fn wait_readable(&mut self) -> io::Result<bool> {
        if !self.buf.is_empty() || self.discarding.is_some() {
            return Ok(true);
        }
        Ok(!self.inner.fill_buf().await?.is_empty())
    }

    /// The wrapped reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    fn too_long(&self, seen: usize) -> WireError {
        WireError::new(
            ErrorCode::LineTooLong,
            format!(
                "request line is {seen} bytes, the limit is {}: the line was discarded; send shorter requests",
                self.limit
            ),
        )
    }
}

/// Whether a line is empty or only spaces, tabs and a `\r`.
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r'))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], limit: usize) -> Vec<Result<Vec<u8>, ErrorCode>> {
        let mut reader =
            LineReader::with_limit(tokio::io::BufReader::with_capacity(3, input), limit);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap() {
            out.push(line.map_err(|e| e.code));
        }
        out
    }

    #[tokio::test]
    async fn splits_limits_and_recovers() {
        let got = lines(b"ab\n\nabcdefgh\nxyz", 5).await;
        assert_eq!(
            got,
            vec![
                Ok(b"ab".to_vec()),
                Ok(vec![]),
                Err(ErrorCode::LineTooLong),
                Ok(b"xyz".to_vec())
            ]
        );
        assert_eq!(lines(b"abcde\n", 5).await, vec![Ok(b"abcde".to_vec())]);
        assert_eq!(lines(b"abcdef", 5).await, vec![Err(ErrorCode::LineTooLong)]);
        assert_eq!(lines(b"", 5).await, vec![]);
    }

    #[tokio::test]
    async fn next_request_skips_blank_lines() {
        let input: &[u8] = b"\r\n  \t\nstatus\n";
        let mut reader = LineReader::new(tokio::io::BufReader::new(input));
        let r = reader.next_request().await.unwrap().unwrap().unwrap();
        assert_eq!(r.verb(), "status");
        assert!(reader.next_request().await.unwrap().is_none());
    }
}
