//! The termination message: a one-screen story of the shutdown that kubelet shows in `kubectl describe pod`.
//!
//! Kubelet reads at most 4096 bytes of it, so the renderer keeps under that by shortening detail columns
//! and, as a last resort, dropping rows from the middle (never the header, the hung step or the total).

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use crate::state::{Outcome, Status, StepRecord, Trigger};

/// Kubelet's limit for the termination message.
pub const LIMIT: usize = 4096;

/// Everything the message says.
#[derive(Debug)]
pub struct Summary<'a> {
    pub code: i32,
    pub reason: &'a str,
    /// Why the stop began; `None` when the app exited by itself.
    pub trigger: Option<&'a Trigger>,
    pub status: &'a Status,
    pub window_ms: u64,
    pub total_ms: Option<u64>,
}

pub fn render(s: &Summary<'_>) -> String {
    // Wide enough for a whole note; narrowed only when kubelet's limit requires it.
    let mut detail_width = 240;
    loop {
        let text = render_with(s, detail_width, usize::MAX);
        if text.len() < LIMIT {
            return text;
        }
        if detail_width > 20 {
            detail_width /= 2;
            continue;
        }
        // Keep the first rows and the last few; the count of dropped rows is printed.
        let text = render_with(s, detail_width, 12);
        if text.len() < LIMIT {
            return text;
        }
        return cut_at_char(text, LIMIT - 1);
    }
}

fn render_with(s: &Summary<'_>, detail_width: usize, max_rows: usize) -> String {
    let st = s.status;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "quiesce: exit code {} - {}",
        s.code,
        escape_controls(s.reason)
    );
    let trigger = s
        .trigger
        .map(|t| t.to_string())
        .unwrap_or_else(|| "none (the app exited by itself)".into());
    let _ = writeln!(
        out,
        "mode: {}   stop requested by: {}   window: {}",
        st.mode,
        trigger,
        secs(s.window_ms)
    );
    if !st.steps.is_empty() {
        render_rows(&mut out, &st.steps, detail_width, max_rows);
    }
    if let Some(total) = s.total_ms {
        let _ = writeln!(out, "total: {}", secs(total));
    }
    out
}

/// The step table: every row when they fit, else the first ones and the last four with a count between.
fn render_rows(out: &mut String, rows: &[StepRecord], detail_width: usize, max_rows: usize) {
    let _ = writeln!(
        out,
        "{:>2}  {:<20} {:<8} {:>8} {:>8}  detail",
        "#", "step", "outcome", "start", "took"
    );
    let (head, tail, dropped) = if rows.len() > max_rows {
        let tail = 4.min(max_rows);
        (max_rows - tail, tail, rows.len() - max_rows)
    } else {
        (rows.len(), 0, 0)
    };
    for r in &rows[..head] {
        render_row(out, r, detail_width);
    }
    if dropped > 0 {
        let _ = writeln!(
            out,
            "    ... {dropped} rows left out to fit kubelet's 4096-byte limit ..."
        );
    }
    for r in &rows[rows.len() - tail..] {
        render_row(out, r, detail_width);
    }
}

fn render_row(out: &mut String, r: &StepRecord, detail_width: usize) {
    let num = if r.number == 0 {
        "-".to_string()
    } else {
        r.number.to_string()
    };
    // Counts first: they are short and the part an operator compares; the note may be cut.
    let mut detail: String = r
        .counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    if !r.detail.is_empty() {
        if !detail.is_empty() {
            detail.push_str("; ");
        }
        detail.push_str(&r.detail);
    }
    // The app's text is data: a newline must not forge a row, nor an escape sequence reach a terminal.
    let mut detail = escape_controls(&detail);
    if detail.chars().count() > detail_width {
        detail = detail
            .chars()
            .take(detail_width.saturating_sub(1))
            .collect::<String>()
            + "…";
    }
    let mark = if matches!(
        r.outcome,
        Outcome::Timeout | Outcome::Error | Outcome::Unknown
    ) {
        " <-"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "{num:>2}  {:<20} {:<8} {:>8} {:>8}  {detail}{mark}",
        r.name,
        r.outcome.as_str(),
        secs(r.started_ms),
        secs(r.duration_ms)
    );
}

/// Control characters (newlines, ESC, the C1 range) written as `\n`, `\u{1b}`…, everything else kept.
pub fn escape_controls(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().collect()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `text` cut to at most `max` bytes, at a character boundary: an app's note may hold any UTF-8.
fn cut_at_char(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut at = max;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
    }
    text
}

fn secs(ms: u64) -> String {
    format!("{}.{:03}s", ms / 1000, ms % 1000)
}

/// The termination-log file, opened at start-up and kept open: at the end of a stop the descriptor is
/// already there even if the process has run out of them (EMFILE), and the path is judged once, before the
/// app runs. Opened `O_NOFOLLOW | O_NONBLOCK`: a symlink there is refused (as root it would redirect the
/// write to its target), and so is a FIFO or anything else that is not a regular file (a FIFO would block
/// PID 1 in `open` forever).
#[derive(Debug)]
pub struct Sink {
    path: std::path::PathBuf,
    file: std::fs::File,
}

impl Sink {
    /// `None` when the file's directory does not exist (running outside Kubernetes creates nothing).
    pub fn open(path: &Path) -> Result<Option<Sink>, String> {
        use std::os::unix::fs::OpenOptionsExt;
        match path.parent() {
            Some(dir) if dir.as_os_str().is_empty() || dir.is_dir() => {}
            _ => return Ok(None),
        }
        let why = |e: io::Error| match e.raw_os_error() {
            Some(libc::ELOOP) => {
                "it is a symbolic link; point termination_log at a file of its own".into()
            }
            Some(libc::ENXIO) => "it is a FIFO; point termination_log at a regular file".into(),
            _ => e.to_string(),
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(why)?;
        let meta = file.metadata().map_err(|e| e.to_string())?;
        if !meta.file_type().is_file() {
            return Err("it is not a regular file; point termination_log at a regular file".into());
        }
        Ok(Some(Sink {
            path: path.to_path_buf(),
            file,
        }))
    }

    /// Replaces the file's content with `text`.
    pub fn write(&mut self, text: &str) -> io::Result<()> {
        use std::io::{Seek, Write};
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(text.as_bytes())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Shared;

    fn record(n: u8, name: &str, outcome: Outcome, detail: &str) -> StepRecord {
        StepRecord {
            number: n,
            name: name.into(),
            outcome,
            started_ms: 1234,
            duration_ms: 5,
            counts: [("acked".to_string(), 3u64)].into(),
            detail: detail.into(),
        }
    }

    #[test]
    fn names_each_step_and_marks_the_hung_one() {
        let shared = Shared::new(crate::config::Mode::Control);
        shared.record(record(1, "health-not-serving", Outcome::Ok, ""));
        shared.record(record(
            5,
            "stop-consumer",
            Outcome::Timeout,
            "deadline 5s passed",
        ));
        let st = shared.lock();
        let text = render(&Summary {
            code: 0,
            reason: "stopped",
            trigger: None,
            status: &st,
            window_ms: 28_000,
            total_ms: Some(7000),
        });
        assert!(
            text.starts_with("quiesce: exit code 0 - stopped\n"),
            "{text}"
        );
        assert!(text.contains(" 5  stop-consumer        timeout    1.234s   0.005s  acked=3; deadline 5s passed <-"), "{text}");
        assert!(text.contains("total: 7.000s"));
    }

    #[test]
    fn stays_under_kubelets_limit() {
        let shared = Shared::new(crate::config::Mode::Control);
        for i in 0..200 {
            shared.record(record(
                i as u8 % 9 + 1,
                "stop-consumer",
                Outcome::Ok,
                &"x".repeat(300),
            ));
        }
        let st = shared.lock();
        let text = render(&Summary {
            code: 137,
            reason: "killed",
            trigger: None,
            status: &st,
            window_ms: 1,
            total_ms: Some(1),
        });
        assert!(text.len() < LIMIT, "{}", text.len());
        assert!(text.contains("rows left out"));
        assert!(text.contains("total: 0.001s"));
    }

    #[test]
    fn multi_byte_notes_are_cut_at_a_character_boundary() {
        // Rows wide enough that even the shortest form is over the limit: the last resort cuts the text.
        // `é` is two bytes, so an odd byte limit falls inside one unless the cut looks for a boundary.
        let shared = Shared::new(crate::config::Mode::Control);
        for n in 1..=9 {
            let mut r = record(n, "stop-consumer", Outcome::Error, "");
            r.counts = (0..40)
                .map(|i| (format!("{}{i}", "é".repeat(10)), 1))
                .collect();
            shared.record(r);
        }
        let st = shared.lock();
        let reason = "é".repeat(3000);
        let text = render(&Summary {
            code: 10,
            reason: &reason,
            trigger: None,
            status: &st,
            window_ms: 1,
            total_ms: Some(1),
        });
        assert!(text.len() < LIMIT, "{}", text.len());
        assert!(text.starts_with("quiesce: exit code 10 - é"));
    }

    #[test]
    fn app_text_cannot_forge_rows_or_reach_a_terminal() {
        let shared = Shared::new(crate::config::Mode::Control);
        shared.record(record(
            9,
            "close-db",
            Outcome::Error,
            "boom\n 9  close-db             ok  \u{1b}]0;owned\u{7}\u{1b}[2J",
        ));
        let st = shared.lock();
        let text = render(&Summary {
            code: 1,
            reason: "stopped\nforged",
            trigger: None,
            status: &st,
            window_ms: 1,
            total_ms: Some(1),
        });
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        let rows: Vec<&str> = text.lines().filter(|l| l.contains("close-db")).collect();
        assert_eq!(rows.len(), 1, "{text}");
        assert!(rows[0].contains("boom\\n"), "{text}");
        assert!(
            text.starts_with("quiesce: exit code 1 - stopped\\nforged\n"),
            "{text}"
        );
    }

    #[test]
    fn writes_only_when_the_directory_exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("termination-log");
        std::fs::write(&p, "an older, longer message").expect("old");
        let mut sink = Sink::open(&p).expect("open").expect("directory exists");
        sink.write("hello").expect("write");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "hello");
        let missing = dir.path().join("nope/termination-log");
        assert!(Sink::open(&missing).expect("no error").is_none());
        assert!(!missing.exists());
    }

    #[test]
    fn refuses_a_symlink_a_fifo_and_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("precious");
        std::fs::write(&target, "keep").expect("target");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let err = Sink::open(&link).expect_err("symlink");
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.expect("mkfifo").success());
        // Returns at once (a blocking open would wait for a reader forever).
        let err = Sink::open(&fifo).expect_err("fifo");
        assert!(err.contains("FIFO"), "{err}");
        let err = Sink::open(dir.path()).expect_err("directory");
        assert!(!err.is_empty());
    }
}
