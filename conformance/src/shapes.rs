//! What a valid reply looks like, verb by verb (PROTOCOL.md sections 5.1–5.4). Each check
//! returns the first problem as text naming the field, so a failed rule says exactly what is
//! wrong. Unknown fields are accepted everywhere (section 3: readers must ignore them).

use quiesce_protocol::wire::StepVerb;
use serde_json::{Map, Value};

use crate::conn::short;

type Checked<T = ()> = Result<T, String>;

/// The five step verbs, in order, as on the wire.
pub fn verbs() -> Vec<&'static str> {
    StepVerb::ALL.iter().map(|v| v.as_str()).collect()
}

/// The eight sub-step names, in order.
pub fn substeps() -> Vec<&'static str> {
    StepVerb::ALL
        .iter()
        .flat_map(|v| v.substeps().iter().map(|s| s.as_str()))
        .collect()
}

fn field<'a>(v: &'a Value, key: &str) -> Checked<&'a Value> {
    v.get(key)
        .ok_or_else(|| format!("no `{key}` in {}", short(v)))
}

fn string<'a>(v: &'a Value, key: &str) -> Checked<&'a str> {
    field(v, key)?
        .as_str()
        .ok_or_else(|| format!("`{key}` is not a string in {}", short(v)))
}

fn strings(v: &Value, key: &str) -> Checked<Vec<String>> {
    let items = field(v, key)?
        .as_array()
        .ok_or_else(|| format!("`{key}` is not an array in {}", short(v)))?;
    items
        .iter()
        .map(|i| {
            i.as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("`{key}` holds a non-string in {}", short(v)))
        })
        .collect()
}

fn number(v: &Value, key: &str) -> Checked<f64> {
    field(v, key)?
        .as_f64()
        .filter(|n| *n >= 0.0)
        .ok_or_else(|| format!("`{key}` is not a non-negative number in {}", short(v)))
}

fn object<'a>(v: &'a Value, key: &str) -> Checked<&'a Map<String, Value>> {
    field(v, key)?
        .as_object()
        .ok_or_else(|| format!("`{key}` is not an object in {}", short(v)))
}

fn require(cond: bool, problem: impl FnOnce() -> String) -> Checked {
    if cond { Ok(()) } else { Err(problem()) }
}

/// What `hello` told about the app.
#[derive(Debug, Clone)]
pub struct Hello {
    pub app: String,
    pub pid: u64,
    pub registered: Vec<String>,
    /// The optional extensions it takes (section 5.5); empty when `extensions` is absent or not
    /// an array of strings (the rule `hello-extensions` reports that).
    pub extensions: Vec<String>,
}

impl Hello {
    /// Whether the app listed `extension`, e.g. `traceparent`.
    pub fn takes(&self, extension: &str) -> bool {
        self.extensions.iter().any(|e| e == extension)
    }
}

/// `hello`'s optional `extensions` (sections 5.1, 5.5): `None` when absent, else its strings;
/// an error when it is present but not an array of strings.
pub fn extensions(v: &Value) -> Checked<Option<Vec<String>>> {
    match v.get("extensions") {
        None => Ok(None),
        Some(_) => strings(v, "extensions").map(Some),
    }
}

/// A `hello` reply with `role`.
pub fn hello(v: &Value, role: &str) -> Checked<Hello> {
    require(v["ok"] == true, || format!("refused: {}", short(v)))?;
    require(v["protocol"] == 1, || {
        format!("`protocol` is not 1 in {}", short(v))
    })?;
    let app = string(v, "app")?;
    require(!app.is_empty(), || "`app` is empty".to_owned())?;
    let pid = field(v, "pid")?
        .as_u64()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("`pid` is not a positive integer in {}", short(v)))?;
    require(v["role"] == role, || {
        format!("`role` should be `{role}` in {}", short(v))
    })?;
    require(strings(v, "steps")? == verbs(), || {
        format!("`steps` should be {:?} in {}", verbs(), short(v))
    })?;
    let registered = strings(v, "registered")?;
    let order = substeps();
    let positions: Option<Vec<usize>> = registered
        .iter()
        .map(|r| order.iter().position(|s| s == r))
        .collect();
    let positions = positions.ok_or_else(|| {
        format!("`registered` names something that is not a sub-step: {registered:?}")
    })?;
    require(positions.windows(2).all(|w| w[0] < w[1]), || {
        format!("`registered` is not in sub-step order (or repeats one): {registered:?}")
    })?;
    strings(v, "services")?;
    Ok(Hello {
        app: app.to_owned(),
        pid,
        registered,
        extensions: extensions(v).ok().flatten().unwrap_or_default(),
    })
}

/// What `status` should show: per verb its state and, once done, its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub phase: &'static str,
    /// `None` once `close` has finished.
    pub next_step: Option<&'static str>,
    /// Per verb: `pending`, or `done` with its outcome.
    pub steps: Vec<(&'static str, Option<String>)>,
}

impl Progress {
    /// The first `done` verbs finished with `outcomes`.
    pub fn after(outcomes: &[String]) -> Progress {
        let verbs = verbs();
        let done = outcomes.len();
        let phase = match done {
            0 => "serving",
            5 => "closed",
            _ => "stopping",
        };
        let steps = verbs
            .iter()
            .enumerate()
            .map(|(i, _)| {
                if i < done {
                    ("done", Some(outcomes[i].clone()))
                } else {
                    ("pending", None)
                }
            })
            .collect();
        Progress {
            phase,
            next_step: verbs.get(done).copied(),
            steps,
        }
    }
}

/// A `status` reply showing `expect`, from `app`.
pub fn status(v: &Value, app: &str, expect: &Progress) -> Checked {
    require(v["ok"] == true, || format!("refused: {}", short(v)))?;
    require(string(v, "app")? == app, || {
        format!("`app` differs from hello's `{app}`: {}", short(v))
    })?;
    require(v["phase"] == expect.phase, || {
        format!("`phase` should be `{}`: {}", expect.phase, short(v))
    })?;
    let next = match expect.next_step {
        Some(verb) => Value::from(verb),
        None => Value::Null,
    };
    require(field(v, "next_step")? == &next, || {
        format!("`next_step` should be {next}: {}", short(v))
    })?;
    let steps = field(v, "steps")?
        .as_array()
        .ok_or_else(|| format!("`steps` is not an array: {}", short(v)))?;
    require(steps.len() == 5, || {
        format!("`steps` should list the five verbs: {}", short(v))
    })?;
    for ((step, verb), (state, outcome)) in steps.iter().zip(verbs()).zip(&expect.steps) {
        require(step["verb"] == verb, || {
            format!("`steps` should list {verb} here: {}", short(step))
        })?;
        require(step["state"] == *state, || {
            format!("{verb} should be `{state}`: {}", short(step))
        })?;
        if let Some(outcome) = outcome {
            require(step["outcome"] == outcome.as_str(), || {
                format!(
                    "{verb} should be done with outcome `{outcome}`: {}",
                    short(step)
                )
            })?;
            number(step, "duration_ms")?;
        }
    }
    field(v, "components").map(|_| ())
}

/// The parts of a `status` reply a refused request must not change.
pub fn state_of(v: &Value) -> Value {
    serde_json::json!({ "phase": v["phase"], "next_step": v["next_step"], "steps": v["steps"] })
}

/// A `health` reply.
pub fn health(v: &Value) -> Checked {
    require(v["ok"] == true, || format!("refused: {}", short(v)))?;
    let healthy = field(v, "healthy")?
        .as_bool()
        .ok_or_else(|| format!("`healthy` is not a boolean: {}", short(v)))?;
    let checks = field(v, "checks")?
        .as_array()
        .ok_or_else(|| format!("`checks` is not an array: {}", short(v)))?;
    let mut all_required_up = true;
    for check in checks {
        string(check, "name")?;
        let required = field(check, "required")?
            .as_bool()
            .ok_or_else(|| format!("`required` is not a boolean: {}", short(check)))?;
        let up = field(check, "up")?
            .as_bool()
            .ok_or_else(|| format!("`up` is not a boolean: {}", short(check)))?;
        number(check, "latency_ms")?;
        if !up {
            string(check, "error")?;
        }
        all_required_up &= up || !required;
    }
    require(healthy == all_required_up, || {
        format!(
            "`healthy` is {healthy} but the required checks say {all_required_up}: {}",
            short(v)
        )
    })
}

fn rank(outcome: &str) -> Option<u8> {
    match outcome {
        "ok" => Some(0),
        "timeout" => Some(1),
        "error" => Some(2),
        _ => None,
    }
}

/// One sub-step entry of a step reply; returns its outcome's rank.
fn substep(s: &Value, name: &str, registered: &[String]) -> Checked<u8> {
    require(s["name"] == name, || {
        format!("sub-step `{name}` expected here: {}", short(s))
    })?;
    let outcome = string(s, "outcome")?;
    let rank = rank(outcome).ok_or_else(|| format!("unknown outcome `{outcome}`: {}", short(s)))?;
    number(s, "duration_ms")?;
    object(s, "counts")?;
    if rank > 0 {
        string(s, "message")?;
    }
    if !registered.iter().any(|r| r == name) {
        require(
            outcome == "ok" && s.get("note").is_some_and(Value::is_string),
            || {
                format!(
                    "`{name}` has no handler: it should be `ok` with a `note`: {}",
                    short(s)
                )
            },
        )?;
    }
    Ok(rank)
}

/// A step verb's reply (section 5.4); returns its outcome.
pub fn step(v: &Value, verb: StepVerb, registered: &[String]) -> Checked<String> {
    require(v["ok"] == true, || format!("refused: {}", short(v)))?;
    require(v["step"] == verb.as_str(), || {
        format!("`step` should be `{verb}`: {}", short(v))
    })?;
    let outcome = string(v, "outcome")?.to_owned();
    let rank =
        rank(&outcome).ok_or_else(|| format!("unknown outcome `{outcome}`: {}", short(v)))?;
    number(v, "duration_ms")?;
    let counts = object(v, "counts")?;
    let subs = field(v, "substeps")?
        .as_array()
        .ok_or_else(|| format!("`substeps` is not an array: {}", short(v)))?;
    let names: Vec<&str> = verb.substeps().iter().map(|s| s.as_str()).collect();
    require(subs.len() == names.len(), || {
        format!("`substeps` should be {names:?}: {}", short(v))
    })?;
    let mut worst = 0;
    let mut sums: Map<String, Value> = Map::new();
    for (s, name) in subs.iter().zip(&names) {
        worst = worst.max(substep(s, name, registered)?);
        for (key, n) in object(s, "counts")? {
            let n = n
                .as_u64()
                .ok_or_else(|| format!("count `{key}` is not a whole number: {}", short(s)))?;
            let sum = sums.get(key).and_then(Value::as_u64).unwrap_or(0) + n;
            sums.insert(key.clone(), Value::from(sum));
        }
    }
    require(rank == worst, || {
        format!(
            "`outcome` `{outcome}` is not the worst of its sub-steps': {}",
            short(v)
        )
    })?;
    require(*counts == sums, || {
        format!(
            "`counts` should be the sub-steps' counts summed ({}): {}",
            Value::Object(sums.clone()),
            short(v)
        )
    })?;
    if rank > 0 {
        string(v, "message")?;
    }
    Ok(outcome)
}
