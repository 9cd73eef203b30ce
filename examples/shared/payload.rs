//! The request bodies both benchmarks send (`bench`, `rewrite_cost`).

use bytes::Bytes;

/// The 1 KiB batch of the `small` scenarios: three events.
pub fn small() -> Bytes {
    payload(3, 1024)
}

/// The 256 KiB batch of `large-c16`: 1,077 events.
pub fn large() -> Bytes {
    payload(1077, 256 * 1024)
}

/// A JSON batch of `events` telemetry events shaped as the shared harness's payloads (eight
/// members and a nested object each), padded to `size` bytes; each event holds an `email` and an
/// `ip` for the rules to remove.
fn payload(events: usize, size: usize) -> Bytes {
    let mut items = Vec::with_capacity(events);
    for i in 0..events {
        items.push(format!(
            r#"{{"event":"{}","ts":{},"session_id":"{:032x}","user_id":"u-{:08}","device_id":"{:016x}","ip":"10.{}.{}.{}","email":"user{}@example.invalid","props":{{"screen":"s{}","ms":{},"ok":{}}}}}"#,
            ["app_open", "page_view", "purchase"][i % 3],
            1_767_225_600_000u64 + 137 * i as u64,
            (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834),
            i * 7919 % 100_000_000,
            (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
            i % 250,
            i / 250 % 250,
            i % 7 + 1,
            i * 31 % 1_000_000,
            i % 30,
            i * 17 % 5000,
            i % 2 == 0
        ));
    }
    let mut body = format!(
        r#"{{"schema":"telemetry.v1","app":{{"name":"bench","version":"1.2.3"}},"events":[{}],"pad":""}}"#,
        items.join(",")
    );
    let short = size.saturating_sub(body.len());
    body.insert_str(body.len() - 2, &"x".repeat(short));
    Bytes::from(body)
}
