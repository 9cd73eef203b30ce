//! Deciding, pure: which feature a destination belongs to and what the admin consents to
//! ([`policy`]), the plans made from it for a client, a connection and a request ([`plan`]),
//! and the vocabulary of what was decided and why ([`outcome`]). No sockets, files or clocks:
//! the listeners in `serve` execute these plans and `explain` prints them, so the dry run
//! cannot drift from what the proxy does.

pub mod outcome;
pub mod path;
pub mod plan;
pub mod policy;

pub use outcome::{Decision, Reason, Refusal};
