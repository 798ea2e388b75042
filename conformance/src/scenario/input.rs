//! Bad input (PROTOCOL.md sections 3, 3.1, 5, 7 and 8), sent as raw bytes on connections that
//! are not the driver. Each case runs on its own connection and ends with a `status` that must
//! be the very next reply: so a refusal too many (an answered blank line) or a connection closed
//! on bad input is caught by the case that caused it, and does not spill into the next one.

use std::time::Duration;

use crate::conn::Conn;
use crate::scenario::Ctx;

/// What a case sends.
#[derive(Debug)]
pub enum Payload {
    /// Each line (ending in `\n`) gets one reply.
    Each(&'static [&'static [u8]]),
    /// One line of `len` bytes (not counting its final `\n`): `head`, then `fill` bytes, then
    /// `tail` (which ends in `\n`).
    Long {
        head: &'static [u8],
        fill: u8,
        len: usize,
        tail: &'static [u8],
    },
}

/// What each reply must be.
#[derive(Debug)]
pub enum Expect {
    /// `ok:false` with this code.
    Refused(&'static str),
    /// `ok:true` carrying this field.
    Answered(&'static str),
}

/// One bad-input rule.
#[derive(Debug)]
pub struct Case {
    pub id: &'static str,
    pub section: &'static str,
    pub title: &'static str,
    pub send: Payload,
    pub expect: Expect,
}

use Expect::{Answered, Refused};
use Payload::Long;

/// `Payload::Each` from byte-string literals of any length.
macro_rules! each {
    ($($line:expr),* $(,)?) => {
        Payload::Each(&[$($line as &[u8]),*])
    };
}

const fn case(
    id: &'static str,
    section: &'static str,
    title: &'static str,
    send: Payload,
    expect: Expect,
) -> Case {
    Case {
        id,
        section,
        title,
        send,
        expect,
    }
}

/// The cases, in report order.
pub const CASES: &[Case] = &[
    case(
        "unknown-verb",
        "7",
        "an unknown verb is `unknown_verb`, whatever its arguments",
        each![b"reboot\n", b"reboot now=1\n", b"x9-\n"],
        Refused("unknown_verb"),
    ),
    case(
        "malformed-verb",
        "3.1",
        "a malformed verb is `bad_request` before it is unknown",
        each![
            b"Status\n",
            b"Reboot now\n",
            b"st_atus\n",
            b"status\xC2\xA0\n"
        ],
        Refused("bad_request"),
    ),
    case(
        "missing-equals",
        "7",
        "an argument without `=` is `bad_request`",
        each![b"status verbose\n"],
        Refused("bad_request"),
    ),
    case(
        "duplicate-key",
        "3",
        "a key given twice is `bad_request`",
        each![b"hello role=driver role=observer\n"],
        Refused("bad_request"),
    ),
    case(
        "empty-value",
        "3",
        "an empty value is `bad_request`",
        each![b"status pad=\n"],
        Refused("bad_request"),
    ),
    case(
        "malformed-key",
        "3",
        "a malformed key is `bad_request`",
        each![b"status Pad=1\n", b"status pa-d=1\n", b"status =1\n"],
        Refused("bad_request"),
    ),
    case(
        "unknown-argument",
        "7",
        "an argument the verb does not take is `bad_argument`",
        each![
            b"status verbose=1\n",
            b"health x=1\n",
            b"status budgets_ms=1000\n",
            b"drain deadline_ms=5000 verbose=1\n"
        ],
        Refused("bad_argument"),
    ),
    case(
        "bad-role",
        "5.1",
        "a `role` other than driver/observer is `bad_argument` (also non-ASCII)",
        each![
            b"hello role=admin\n",
            b"hello role=driv\xC3\xA9r\n",
            b"hello role=Driver\n"
        ],
        Refused("bad_argument"),
    ),
    case(
        "unsupported-version",
        "5.1",
        "a whole-number `version` other than 1 is `unsupported_version`",
        each![
            b"hello version=2\n",
            b"hello version=0\n",
            b"hello version=99999999999999999999\n"
        ],
        Refused("unsupported_version"),
    ),
    case(
        "bad-version",
        "5.1",
        "a `version` that is not a whole number is `bad_argument`",
        each![
            b"hello version=abc\n",
            b"hello version=+1\n",
            b"hello version=1.0\n",
            b"hello version=-1\n"
        ],
        Refused("bad_argument"),
    ),
    case(
        "version-leading-zeros",
        "5.1",
        "`hello version=01` is version 1",
        each![b"hello version=01\n", b"hello role=observer version=1\n"],
        Answered("protocol"),
    ),
    case(
        "role-before-version",
        "3.1",
        "`role` is checked before `version`",
        each![b"hello role=admin version=2\n"],
        Refused("bad_argument"),
    ),
    case(
        "bad-deadline",
        "6.2",
        "a `deadline_ms` that is 0, signed, not whole, or above 2^64-1 is `bad_argument`",
        each![
            b"drain deadline_ms=0\n",
            b"drain deadline_ms=5s\n",
            b"drain deadline_ms=+5000\n",
            b"drain deadline_ms=1_000\n",
            b"drain deadline_ms=18446744073709551616\n",
            b"drain deadline_ms=\xEF\xBC\x95\n",
            b"close deadline_ms=0000\n"
        ],
        Refused("bad_argument"),
    ),
    case(
        "missing-deadline",
        "7",
        "a step verb without `deadline_ms` is `missing_argument`",
        each![b"drain\n", b"close budgets_ms=1,2,3\n"],
        Refused("missing_argument"),
    ),
    case(
        "unknown-before-missing",
        "3.1",
        "an argument the verb does not take is refused before a missing one",
        each![b"drain verbose=1\n"],
        Refused("bad_argument"),
    ),
    case(
        "bad-budgets-observer",
        "3.1",
        "bad `budgets_ms` is `bad_argument` before `not_driver`",
        each![
            b"drain deadline_ms=5000 budgets_ms=+1,2\n",
            b"drain deadline_ms=5000 budgets_ms=1000\n",
            b"stop-cron deadline_ms=5000 budgets_ms=1,2\n",
            b"close deadline_ms=5000 budgets_ms=1,0,1\n"
        ],
        Refused("bad_argument"),
    ),
    case(
        "not-driver",
        "7",
        "a valid step verb from an observer is `not_driver` (leading zeros, 2^64-1 parse)",
        each![
            b"drain deadline_ms=5000\n",
            b"drain deadline_ms=05000\n",
            b"stop-cron deadline_ms=18446744073709551615\n",
            b"close deadline_ms=1 budgets_ms=1,1,1\n"
        ],
        Refused("not_driver"),
    ),
    case(
        "invalid-utf8",
        "7",
        "a line that is not UTF-8 is `invalid_utf8`",
        each![
            b"stat\xFFus\n",
            b"status pad=\xC3\x28\n",
            b"status pad=\xED\xA0\x80\n",
            b"status pad=\xC0\xAF\n"
        ],
        Refused("invalid_utf8"),
    ),
    case(
        "control-characters",
        "3",
        "C0, DEL and C1 control characters are `bad_request`",
        each![
            b"status\x00\n",
            b"status pad=a\x07b\n",
            b"status pad=\x7F\n",
            b"status pad=\xC2\x85\n",
            b"sta\rtus\n",
            b"status\x1b[A\n"
        ],
        Refused("bad_request"),
    ),
    case(
        "utf8-before-control",
        "3.1",
        "UTF-8 is checked before control characters",
        each![b"status pad=\x01\xFF\n"],
        Refused("invalid_utf8"),
    ),
    case(
        "whitespace",
        "3",
        "SP and HTAB separate tokens; a final CR is stripped",
        each![
            b"status\r\n",
            b"\t status \t\n",
            b" \thello\t role=observer \r\n"
        ],
        Answered("ok"),
    ),
    case(
        "longest-line",
        "3",
        "a line of exactly 4096 bytes is parsed (`bad_argument` here), not refused as too long",
        Long {
            head: b"status pad=",
            fill: b'a',
            len: 4096,
            tail: b"\n",
        },
        Refused("bad_argument"),
    ),
    case(
        "line-too-long",
        "3",
        "a line of 4097 bytes is `line_too_long`; the connection stays usable",
        Long {
            head: b"status pad=",
            fill: b'a',
            len: 4097,
            tail: b"\n",
        },
        Refused("line_too_long"),
    ),
    case(
        "cr-counts",
        "3",
        "a `\\r` before the `\\n` counts towards the 4096 bytes",
        Long {
            head: b"status pad=",
            fill: b'a',
            len: 4097,
            tail: b"\r\n",
        },
        Refused("line_too_long"),
    ),
    case(
        "length-first",
        "3.1",
        "the length is checked before UTF-8 and control characters",
        Long {
            head: b"stat\xFFus pad=\x01",
            fill: b'a',
            len: 5000,
            tail: b"\n",
        },
        Refused("line_too_long"),
    ),
    case(
        "huge-line",
        "3",
        "a 1 MiB line is `line_too_long` (the app does not buffer it)",
        Long {
            head: b"status pad=",
            fill: b'a',
            len: 1 << 20,
            tail: b"\n",
        },
        Refused("line_too_long"),
    ),
];

fn payloads(send: &Payload) -> Vec<Vec<u8>> {
    match send {
        Payload::Each(lines) => lines.iter().map(|l| l.to_vec()).collect(),
        Long {
            head,
            fill,
            len,
            tail,
        } => {
            let fill_len = len + 1 - head.len() - tail.len();
            let mut line = head.to_vec();
            line.resize(head.len() + fill_len, *fill);
            line.extend_from_slice(tail);
            vec![line]
        }
    }
}

/// The `status` that ends every case: it must be the next reply.
pub fn sync(conn: &mut Conn) -> Result<(), String> {
    let v = conn
        .request("status\n")
        .map_err(|e| format!("the connection is not usable afterwards: {e}"))?;
    if v["ok"] == true && v.get("phase").is_some() {
        Ok(())
    } else {
        Err(format!(
            "the next reply should have answered `status`, got {}",
            crate::conn::short(&v)
        ))
    }
}

fn run_case(ctx: &Ctx, app: &crate::process::App, case: &Case) -> Result<(), String> {
    let mut conn = ctx.connect(app)?;
    for line in payloads(&case.send) {
        match case.expect {
            Refused(code) => conn.refused(&line, code).map(|_| ())?,
            Answered(key) => {
                conn.send(&line)?;
                let v = conn
                    .reply()
                    .map_err(|e| format!("`{}`: {e}", crate::conn::show(&line)))?;
                conn.refusal_shape(&v);
                if v["ok"] != true || v.get(key).is_none() {
                    return Err(format!(
                        "`{}` should be answered, got {}",
                        crate::conn::show(&line),
                        crate::conn::short(&v)
                    ));
                }
            }
        }
    }
    sync(&mut conn)
}

/// Runs the table; returns whether every case's connection stayed usable.
pub fn run_cases(ctx: &mut Ctx, app: &crate::process::App) -> Result<(), String> {
    let mut broken = Vec::new();
    for case in CASES {
        let result = run_case(ctx, app, case);
        if let Err(e) = &result
            && e.contains("not usable")
        {
            broken.push(case.id);
        }
        ctx.report.check(case.id, result);
    }
    match broken.is_empty() {
        true => Ok(()),
        false => Err(format!("after {}", broken.join(", "))),
    }
}

/// Blank lines, a last line without `\n`, and pipelining (section 3).
pub fn run_framing(ctx: &mut Ctx, app: &crate::process::App) -> Result<(), String> {
    let blank = (|| {
        let mut conn = ctx.connect(app)?;
        conn.send(b"\n   \n\t\n\r\n \t\r\n")?;
        conn.silent_for(Duration::from_millis(200))
            .map_err(|e| format!("a blank line was answered: {e}"))?;
        sync(&mut conn)
    })();
    ctx.report.check("blank-lines", blank);
    let last = (|| {
        let mut conn = ctx.connect(app)?;
        conn.send(b"status")?;
        conn.shutdown_write()?;
        let v = conn
            .reply()
            .map_err(|e| format!("`status` without `\\n`, then shutdown: {e}"))?;
        if v["ok"] == true && v.get("phase").is_some() {
            Ok(())
        } else {
            Err(format!("got {}", crate::conn::short(&v)))
        }
    })();
    ctx.report.check("last-line-without-lf", last);
    let pipelined = (|| {
        let mut conn = ctx.connect(app)?;
        conn.send(b"hello\nstatus\nhealth\nreboot\nstatus\n")?;
        for key in ["protocol", "phase", "healthy", "error", "phase"] {
            let v = conn.reply()?;
            if v.get(key).is_none() {
                return Err(format!(
                    "replies out of order: expected one with `{key}`, got {}",
                    crate::conn::short(&v)
                ));
            }
        }
        Ok(())
    })();
    ctx.report.check("pipelining", pipelined);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_have_their_length() {
        for case in CASES {
            if let Long { len, .. } = case.send {
                let line = &payloads(&case.send)[0];
                assert_eq!(line.len(), len + 1, "{}", case.id);
                assert_eq!(line.last(), Some(&b'\n'));
            }
        }
    }
}
