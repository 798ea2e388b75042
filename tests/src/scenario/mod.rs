//! The scenarios: a pod under load terminated as kubelet does (with or without a fault), and a
//! rolling update of two pods. Each returns an outcome with everything measured; the tests
//! assert on it and its `markdown` renders the figures for docs/RELIABILITY.md.
//!
//! After a terminated pod is gone, a successor pod (what the Deployment starts in its place)
//! consumes the payment messages still queued and relays the outbox rows still unsent; only
//! then are the zero-loss checks made, since "nothing lost" means "nothing lost for good".
//!
//! | concern | file |
//! |---|---|
//! | one pod under load terminated, [`Scenario`] and [`Outcome`] | `termination.rs` |
//! | the faults: set up, acting during the termination, undone | `fault.rs` |
//! | what the pod, the endpoints and the prober showed | `observed.rs` |
//! | the rolling update, [`RollingOutcome`] | `rolling.rs` |
//! | shared set-up: start a pod, the traffic, the catch-up checks | `setup.rs` |
//! | the figures as Markdown, [`save_report`] | `figures.rs` |

use std::time::Duration;

mod fault;
mod figures;
mod observed;
mod rolling;
mod setup;
mod termination;

pub use fault::Fault;
pub use figures::save_report;
pub use rolling::{RollingOutcome, rolling_update};
pub use termination::{Outcome, Scenario, terminate_under_load};

/// The endpoints' propagation delay (EndpointSlice controller → kube-proxy / resolver).
pub const PROPAGATION: Duration = Duration::from_secs(1);
/// How long a pod may take to start and become Ready.
pub const START_WITHIN: Duration = Duration::from_secs(90);
/// How long the successor may take to catch up (queue and outbox).
pub const CATCH_UP_WITHIN: Duration = Duration::from_secs(90);
