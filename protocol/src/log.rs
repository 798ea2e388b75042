//! The log-line conventions the agent and the supervisor share.
//!
//! `tracing` fields hold numbers, booleans and text, not maps or lists: such a field is recorded as JSON
//! text ([`json_text`]), and a subscriber that knows (the supervisor's, the order service's) writes it
//! back as the nested object or array. [`event_if!`] logs one event at one of two levels, for lines whose
//! level depends on what happened (a failed sub-step warns) or on the mode (signal mode narrates at DEBUG).

/// `value` as JSON text, for a log field that holds a map or a list: `counts = %json_text(&counts)`.
pub fn json_text(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// `event_if!(cond, info, warn, fields…, "message")`: the event at the first level when `cond`
/// holds, else at the second (tracing's levels are fixed per call site, so this is two call sites).
#[macro_export]
macro_rules! event_if {
    ($cond:expr, $yes:ident, $no:ident, $($arg:tt)+) => {
        if $cond {
            tracing::$yes!($($arg)+)
        } else {
            tracing::$no!($($arg)+)
        }
    };
}

/// One event's fields in the order they were given, each a typed JSON value: integers and floats are
/// numbers, booleans booleans, a field whose text is a JSON object or array ([`json_text`]) is that
/// value, and everything else (the message included) is a string.
#[derive(Debug, Default)]
pub struct Fields(pub Vec<(&'static str, serde_json::Value)>);

impl Fields {
    /// Takes the `message` field out (empty if there is none).
    pub fn take_message(&mut self) -> String {
        match self.0.iter().position(|(k, _)| *k == "message") {
            Some(i) => match self.0.remove(i).1 {
                serde_json::Value::String(s) => s,
                v => v.to_string(),
            },
            None => String::new(),
        }
    }

    /// The fields as one JSON object, in order.
    pub fn to_json_object(&self) -> String {
        let mut line = String::from("{");
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push_str(&serde_json::Value::from(*k).to_string());
            line.push(':');
            line.push_str(&v.to_string());
        }
        line.push('}');
        line
    }

    fn push(&mut self, field: &tracing::field::Field, value: serde_json::Value) {
        self.0.push((field.name(), value));
    }

    fn text(&mut self, field: &tracing::field::Field, text: String) {
        let value = if field.name() == "message" {
            serde_json::Value::String(text)
        } else {
            nested(text)
        };
        self.push(field, value);
    }
}

/// `text` as the JSON object or array it spells, or else as a string.
fn nested(text: String) -> serde_json::Value {
    use serde_json::Value;
    if (text.starts_with('{') || text.starts_with('['))
        && let Ok(v @ (Value::Object(_) | Value::Array(_))) = serde_json::from_str(&text)
    {
        return v;
    }
    Value::String(text)
}

impl tracing::field::Visit for Fields {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.push(field, value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.push(field, value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.push(field, value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.push(field, value.into());
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.text(field, value.to_owned());
    }

    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.push(field, value.to_string().into());
    }

    // `%x` (Display) fields and the message arrive here.
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.text(field, format!("{value:?}"));
    }
}
