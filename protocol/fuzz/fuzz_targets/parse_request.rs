//! Fuzzes the request parser: it must never panic, must answer every input with a request or a
//! grammar-level error code, and a request it accepts must render to a line that parses back to
//! the same request and validates (or is refused) without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use quiesce_protocol::wire::{AgentCommand, ErrorCode, Request};

fuzz_target!(|data: &[u8]| {
    match Request::parse(data) {
        Ok(request) => {
            let rendered = request.render();
            let again = Request::parse(rendered.as_bytes());
            assert_eq!(again.as_ref(), Ok(&request), "render/parse round trip");
            match AgentCommand::from_request(&request) {
                Ok(command) => {
                    assert_eq!(AgentCommand::from_request(&command.to_request()), Ok(command));
                }
                Err(refusal) => {
                    assert!(refusal.render_reply().ends_with('\n'));
                }
            }
        }
        Err(error) => {
            assert!(matches!(
                error.code,
                ErrorCode::BadRequest | ErrorCode::InvalidUtf8 | ErrorCode::LineTooLong
            ));
            assert!(!error.message.is_empty());
        }
    }
});
