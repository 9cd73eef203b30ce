//! End-to-end tests: the proxy in-process, fake HTTPS upstreams that record what they receive,
//! real clients (curl over HTTP/1.1 and HTTP/2, Go's net/http). One test binary, several modules.

mod bad_input;
mod bypass;
mod cli;
mod clients;
mod contrib;
mod crash;
mod fleet;
mod harness;
mod mattermost;
mod raw_h2;
mod receiver_view;
mod reload;
mod report;
mod today;
