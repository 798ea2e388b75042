//! The value types of the configuration and their parsers, shared by the flag, env and TOML layers.

use std::str::FromStr;
use std::time::Duration;

use clap::ValueEnum;
use serde::{Deserialize, Deserializer};
use tracing::level_filters::LevelFilter;

use crate::signals::Sig;

/// A human duration (`5s`, `250ms`, `1m30s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| format!("invalid duration '{s}' ({e}): write a number with a unit, such as 5s, 250ms or 1m30s"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Sig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Sig::parse(s)
    }
}

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Sig::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a stop that the supervisor started, and the app finished in time, reports as the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopExitCode {
    /// Exit 0 even if the app died of the stop signal (kubectl shows "Completed", not "Error").
    Zero,
    /// Keep 128+N, exactly as tini does.
    Signal,
}

/// Where forwarded signals go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardTo {
    Child,
    Group,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Human,
}

/// A log level (`error`, `warn`, `info`, `debug`, `trace`, `off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level(pub LevelFilter);

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim().parse::<LevelFilter>().map(Level).map_err(|_| {
            format!("invalid log level '{s}': use error, warn, info, debug, trace or off")
        })
    }
}

impl<'de> Deserialize<'de> for Level {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
