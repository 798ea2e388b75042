//! Properties of the parser, renderer and line reader over generated input.

use proptest::prelude::*;
use quiesce_protocol::wire::{
    AgentCommand, ErrorCode, LineReader, MAX_LINE, Request, StepVerb, TraceParent, WireError,
};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}

/// The codes the grammar alone can produce; anything verb-specific comes later.
const PARSER_CODES: [ErrorCode; 3] = [
    ErrorCode::BadRequest,
    ErrorCode::InvalidUtf8,
    ErrorCode::LineTooLong,
];

fn verb() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("hello".to_owned()),
        Just("status".to_owned()),
        Just("drain".to_owned()),
        "[a-z][a-z0-9-]{0,20}",
    ]
}

fn args() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::btree_map(
        "[a-z_]{1,12}",
        "[!-~&&[^=]][!-~\u{a0}-\u{10ffff}]{0,16}",
        0..6,
    )
    .prop_map(|m| m.into_iter().collect())
}

/// Bytes that look like requests often enough to reach deep into the parser.
fn line_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        "[a-z =_\\-0-9\t\r]{0,80}".prop_map(String::into_bytes),
        (verb(), args()).prop_map(|(v, a)| {
            let mut line = v;
            for (k, val) in a {
                line.push_str(&format!(" {k}={val}"));
            }
            line.into_bytes()
        }),
        proptest::collection::vec(any::<u8>(), MAX_LINE - 2..MAX_LINE + 3),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Never panics; every input gets a request or a parser error code with a message, and a
    /// parsed request re-renders to a line that parses to the same request.
    #[test]
    fn parser_always_answers(line in line_like()) {
        match Request::parse(&line) {
            Ok(request) => {
                let rendered = request.render();
                prop_assert!(rendered.len() <= line.len());
                prop_assert_eq!(Request::parse(rendered.as_bytes()), Ok(request.clone()));
                // Verb validation also always answers, with a reply that renders.
                match AgentCommand::from_request(&request) {
                    Ok(command) => {
                        let again = AgentCommand::from_request(&command.to_request());
                        prop_assert_eq!(again, Ok(command));
                    }
                    Err(e) => {
                        prop_assert!(!e.message.is_empty());
                        prop_assert!(e.render_reply().ends_with('\n'));
                    }
                }
            }
            Err(WireError { code, message, .. }) => {
                prop_assert!(PARSER_CODES.contains(&code), "unexpected {code} for {line:?}");
                prop_assert!(!message.is_empty());
            }
        }
    }

    /// Rendering a valid request and parsing it gives the request back.
    #[test]
    fn render_then_parse_round_trips(verb in verb(), args in args()) {
        let mut request = Request::new(verb);
        for (k, v) in &args {
            request = request.with_arg(k.clone(), v.clone());
        }
        let line = request.render();
        prop_assert_eq!(Request::parse(line.as_bytes()), Ok(request.clone()));
        prop_assert_eq!(Request::parse(format!("{line}\r\n").as_bytes()), Ok(request));
    }

    /// Step commands survive the trip through the wire for any deadline (from 1 ms), with or without
    /// per-sub-step budgets.
    #[test]
    fn step_commands_round_trip(
        index in 0usize..5,
        ms in 1u64..,
        budgets in proptest::option::of(proptest::collection::vec(1u64.., 3)),
        traced in proptest::option::of(proptest::collection::vec((1u128.., 1u64..), 3)),
    ) {
        let verb = StepVerb::from_index(index).unwrap();
        let budgets = budgets.map(|b| {
            b[..verb.substeps().len()]
                .iter()
                .map(|ms| std::time::Duration::from_millis(*ms))
                .collect()
        });
        let traceparents = traced.map(|t| {
            t[..verb.substeps().len()]
                .iter()
                .map(|(trace, span)| TraceParent::sampled(trace.to_be_bytes(), span.to_be_bytes()))
                .collect()
        });
        let command = AgentCommand::Step {
            verb,
            deadline: std::time::Duration::from_millis(ms),
            budgets,
            traceparents,
        };
        let line = command.to_request().render();
        let parsed = Request::parse(line.as_bytes()).unwrap();
        prop_assert_eq!(AgentCommand::from_request(&parsed), Ok(command));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// However the input is chunked, the reader yields what a plain split on `\n` predicts:
    /// lines up to the limit, one `line_too_long` per longer line, nothing lost after it.
    #[test]
    fn line_reader_matches_a_simple_model(
        input in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'a'), any::<u8>()], 0..400),
        capacity in 1usize..40,
        limit in 1usize..30,
    ) {
        let got = runtime().block_on(async {
            let reader = tokio::io::BufReader::with_capacity(capacity, input.as_slice());
            let mut lines = LineReader::with_limit(reader, limit);
            let mut out = Vec::new();
            while let Some(line) = lines.next_line().await.unwrap() {
                out.push(line.map_err(|e| e.code));
            }
            out
        });
        let mut expected = Vec::new();
        let mut pieces: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
        if input.last() == Some(&b'\n') || input.is_empty() {
            pieces.pop();
        }
        for piece in pieces {
            expected.push(if piece.len() > limit { Err(ErrorCode::LineTooLong) } else { Ok(piece.to_vec()) });
        }
        prop_assert_eq!(got, expected);
    }
}
