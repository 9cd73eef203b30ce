//! The report page: one HTML file with its style and charts inline (SVG drawn here), a
//! Content-Security-Policy that lets it load nothing, every value from the log escaped by the
//! template (maud). It prints on A4 and reads without colour: each decision has a pattern too.

use maud::{html, Markup, PreEscaped, DOCTYPE};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{NodeReport, Tally, Window, CHARTED};
use crate::audit::verify::Verdict;

/// Nothing may be loaded: no script, font, image or stylesheet from anywhere; the inline style
/// is the page's own.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'";

const STYLE: &str = r#"
body { font: 14px/1.45 system-ui, sans-serif; color: #1a1a1a; margin: 2em auto; max-width: 60em; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 2px solid #333; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-bottom: .3em; } table { border-collapse: collapse; margin: .5em 0 1em; width: 100%; }
th, td { border: 1px solid #bbb; padding: .25em .5em; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; } code { font-size: .92em; word-break: break-all; }
.intact { font-weight: bold; } .broken { font-weight: bold; text-decoration: underline; background: #fdd; }
.muted { color: #555; } .legend span { margin-right: 1.2em; white-space: nowrap; }
.legend svg { vertical-align: middle; border: 1px solid #555; } svg.chart { width: 100%; height: auto; }
section { margin-bottom: 1.5em; }
@media print { @page { size: A4; margin: 14mm; } body { font-size: 9.5pt; max-width: none; margin: 0; }
  section, tr, svg { break-inside: avoid; } h2 { break-after: avoid; } }
"#;

/// Fill and pattern of each charted decision: distinct in grey print as in colour.
const LOOKS: [(&str, &str); CHARTED.len()] = [
    ("#7fb77e", ""),
    ("#f0c75e", "M0,8 L8,0"),
    ("#c0392b", "M0,0 L8,8 M0,8 L8,0"),
    ("#7fa7d4", "M4,0 L4,8"),
    ("#8e44ad", "M0,4 L8,4"),
    ("#555555", "M0,2 L8,2 M0,6 L8,6"),
    ("#e59866", "M0,0 L8,8"),
    ("#d5dbdb", "M2,0 L2,8 M6,0 L6,8"),
];

pub(super) fn render(nodes: &[NodeReport], tally: &Tally, window: Window) -> String {
    let period = match (&tally.first, &tally.last) {
        (Some((_, f)), Some((_, l))) => format!("{f} to {l}"),
        _ => "no records".into(),
    };
    let generated = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    let window_text = match (window.since, window.until) {
        (None, None) => String::new(),
        (s, u) => format!(
            " (records from {} to {})",
            s.and_then(|t| t.format(&Rfc3339).ok())
                .unwrap_or_else(|| "the first".into()),
            u.and_then(|t| t.format(&Rfc3339).ok())
                .unwrap_or_else(|| "the last".into())
        ),
    };
    let all_intact = nodes.iter().all(|n| {
        matches!(n.chain.verdict, Verdict::Intact { .. }) && n.chain.witness_problems.is_empty()
    });
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="Content-Security-Policy" content=(CSP);
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "consent-proxy audit report" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "consent-proxy audit report" }
                p.muted {
                    "Period: " (period) (window_text) ". " (tally.records) " records from "
                    (nodes.len()) " node(s). Generated " (generated) "."
                }
                p id="overall" class=(if all_intact { "intact" } else { "broken" }) {
                    @if all_intact { "Every chain is intact." }
                    @else { "At least one chain is BROKEN or misses a witnessed head: see below." }
                }
                (verdicts(nodes))
                (timeline(tally))
                (features(tally))
                (unclassified(tally))
                (errors(tally))
                (tunnels(tally))
                footer.muted {
                    p { "The log holds names, paths and selectors, never a value, query string, header value or body: neither does this report." }
                }
            }
        }
    };
    page.into_string()
}

fn verdicts(nodes: &[NodeReport]) -> Markup {
    html! {
        section id="verdict" {
            h2 { "Verdict per node" }
            table {
                tr { th { "node" } th { "chain" } th.n { "records" } th { "period" } th { "witness" } th { "repaired crashes and recoveries" } }
                @for n in nodes {
                    @let node = n.chain.node.as_deref().unwrap_or("(unknown)");
                    @let (class, verdict, records) = match &n.chain.verdict {
                        Verdict::Intact { records, files, first_seq } => (
                            "intact",
                            format!("intact: {records} record(s) in {files} file(s), from seq {first_seq}"),
                            *records,
                        ),
                        Verdict::Broken { file, line, seq, reason, intact } => (
                            "broken",
                            format!(
                                "BROKEN at {} line {line}{}: {reason}; {intact} record(s) before it intact, the rest not verified and not counted here",
                                file.display(),
                                seq.map(|s| format!(" (seq {s})")).unwrap_or_default()
                            ),
                            *intact,
                        ),
                    };
                    tr.node data-node=(node) data-verdict=(class) {
                        td { (node) br; span.muted { code { (n.chain.path.display()) } } }
                        td class=(class) { (verdict)
                            @if let Some(bytes) = n.chain.torn_tail { br; "ends in an incomplete record of " (bytes) " bytes (a crash the proxy repairs at its next start)" }
                        }
                        td.n { (records) }
                        td { (n.first.as_deref().unwrap_or("-")) br; (n.last.as_deref().unwrap_or("-")) }
                        td {
                            @if n.chain.witness_problems.is_empty() { "held (or none given)" }
                            @else { @for p in &n.chain.witness_problems { span.broken { (p) } br; } }
                        }
                        td {
                            @if n.chain.recoveries.is_empty() { "none" }
                            @else { @for r in &n.chain.recoveries { (r) br; } }
                        }
                    }
                }
            }
            @for n in nodes {
                @if let Some((policy, consent)) = &n.in_force {
                    p.muted { (n.chain.node.as_deref().unwrap_or("(unknown)")) ": policy " code { (policy) } ", consent " code { (consent) } " in force at the end." }
                }
            }
        }
    }
}

fn timeline(tally: &Tally) -> Markup {
    html! {
        section id="timeline" {
            h2 { "Consent timeline" }
            p.muted { "Every policy or consent that came into force: at start (what was granted, denied and withheld), and each change of the policy file or of Mattermost's config.json (the reason names which, and what changed)." }
            table {
                tr { th { "time" } th { "node" } th { "what came into force, and why" } th { "consent hash" } }
                @for c in &tally.timeline {
                    tr.change {
                        td { (c.time) } td { (c.node) } td { (c.reason) }
                        td { code title=(c.consent) { (short(&c.consent)) } br; span.muted { "policy " code title=(c.policy) { (short(&c.policy)) } } }
                    }
                }
            }
            @if tally.timeline_more > 0 { p.muted { "… and " (tally.timeline_more) " more changes." } }
        }
    }
}

fn features(tally: &Tally) -> Markup {
    html! {
        section id="features" {
            h2 { "Decisions per feature" }
            p.legend {
                @for (i, d) in CHARTED.iter().enumerate() { span { (swatch(i)) " " (d) } }
            }
            @for (feature, counts) in &tally.decisions {
                section.feature data-feature=(feature) {
                    h3 { @if feature == "-" { "(no feature: the proxy's own records, tunnels of hosts of no feature)" } @else { (feature) } }
                    @if let Some(series) = tally.over_time.get(feature) { (chart(series, tally.bucket)) }
                    table {
                        tr { th { "decision" } th.n { "records" } }
                        @for (decision, n) in counts {
                            tr { td { (decision) } td.n.count data-feature=(feature) data-decision=(decision) { (n) } }
                        }
                    }
                    @if let Some(sel) = tally.selectors.get(feature) {
                        h4 { "Removed or replaced most often" }
                        table {
                            tr { th { "selector" } th.n { "records" } }
                            @for (s, n) in sel.top(10) { tr { td { code { (s) } } td.n { (n) } } }
                        }
                    }
                    @if let Some(blocked) = tally.blocked.get(feature) {
                        h4 { "Destinations refused most often" }
                        table {
                            tr { th { "host and path" } th.n { "records" } }
                            @for (s, n) in blocked.top(10) { tr { td { code { (s) } } td.n { (n) } } }
                            @if blocked.others > 0 { tr { td.muted { "(others)" } td.n { (blocked.others) } } }
                        }
                    }
                }
            }
        }
    }
}

fn unclassified(tally: &Tally) -> Markup {
    html! {
        @if !tally.unclassified.is_empty() {
            section id="unclassified" {
                h2 { "What the pack does not know" }
                p.muted { "Names requests carried that no rule or known list of their feature names (the records' unclassified)." }
                table {
                    tr { th { "feature" } th { "name" } th.n { "records" } }
                    @for (feature, names) in &tally.unclassified {
                        @for (name, n) in names.top(20) { tr { td { (feature) } td { code { (name) } } td.n { (n) } } }
                    }
                }
            }
        }
    }
}

fn errors(tally: &Tally) -> Markup {
    html! {
        section id="errors" {
            h2 { "Errors" }
            @if tally.errors.by.is_empty() { p { "No error records." } }
            @else {
                table {
                    tr { th { "reason" } th.n { "records" } }
                    @for (reason, n) in tally.errors.top(15) { tr { td { (reason) } td.n { (n) } } }
                }
            }
        }
    }
}

fn tunnels(tally: &Tally) -> Markup {
    html! {
        section id="tunnels" {
            h2 { "What left unread: tunnelled destinations" }
            p.muted { "Hosts of no feature, passed through without decryption: the proxy saw their names and byte counts only." }
            @if tally.tunnels.is_empty() { p { "No tunnels." } }
            @else {
                table {
                    tr { th { "destination" } th.n { "tunnels" } th.n { "bytes from clients" } th.n { "bytes to clients" } }
                    @for (dest, (n, up, down)) in &tally.tunnels {
                        tr.tunnel { td { code { (dest) } } td.n { (n) } td.n { (up) } td.n { (down) } }
                    }
                }
            }
        }
    }
}

/// A hash as a table shows it: its first 12 hex digits (the whole in the cell's title).
fn short(hash: &str) -> String {
    let hex = hash.strip_prefix("sha256:").unwrap_or(hash);
    format!("{}…", hex.get(..12).unwrap_or(hex))
}

/// A small square filled as decision `i` is charted.
fn swatch(i: usize) -> Markup {
    html! {
        svg width="14" height="14" viewBox="0 0 8 8" role="img" aria-label=(CHARTED[i]) {
            (fill_defs(&format!("s{i}"), i))
            rect width="8" height="8" fill=(format!("url(#s{i})")) {}
        }
    }
}

/// The pattern of decision `i`, as `id`: its colour, and its lines for print.
fn fill_defs(id: &str, i: usize) -> Markup {
    let (colour, lines) = LOOKS[i];
    html! {
        defs {
            pattern id=(id) patternUnits="userSpaceOnUse" width="8" height="8" {
                rect width="8" height="8" fill=(colour) {}
                @if !lines.is_empty() { path d=(lines) stroke="#000" stroke-width="1" {} }
            }
        }
    }
}

/// Decisions over time, stacked, one bar a bucket (merged to at most 120 bars).
fn chart(series: &std::collections::BTreeMap<i64, [u64; CHARTED.len()]>, bucket: i64) -> Markup {
    let (Some(first), Some(last)) = (series.keys().next(), series.keys().next_back()) else {
        return html! {};
    };
    let span = last - first + bucket;
    let width = (span / 120 + bucket) / bucket * bucket;
    let mut bars: std::collections::BTreeMap<i64, [u64; CHARTED.len()]> = Default::default();
    for (start, counts) in series {
        let slot = bars.entry((start - first) / width).or_default();
        for (s, c) in slot.iter_mut().zip(counts) {
            *s += c;
        }
    }
    let n_bars = ((span + width - 1) / width).max(1);
    let max = bars
        .values()
        .map(|c| c.iter().sum::<u64>())
        .max()
        .unwrap_or(1)
        .max(1);
    let (w, h, left, bottom) = (800.0, 180.0, 56.0, 22.0);
    let plot_w = w - left - 8.0;
    let plot_h = h - bottom - 8.0;
    // At least 24 slots: a log of a few minutes draws narrow bars, not one wall.
    let slots = n_bars.max(24);
    let bar_w = plot_w / slots as f64;
    let label = |t: i64| {
        OffsetDateTime::from_unix_timestamp(t)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default()
    };
    let id = format!("c{first}{}", series.len());
    html! {
        svg.chart viewBox=(format!("0 0 {w} {h}")) role="img" aria-label="decisions over time, stacked by decision" {
            @for i in 0..CHARTED.len() { (fill_defs(&format!("{id}-{i}"), i)) }
            line x1=(left) y1=(8.0) x2=(left) y2=(8.0 + plot_h) stroke="#333" {}
            line x1=(left) y1=(8.0 + plot_h) x2=(w - 8.0) y2=(8.0 + plot_h) stroke="#333" {}
            text x=(left - 4.0) y=(14.0) text-anchor="end" font-size="11" { (max) }
            text x=(left - 4.0) y=(8.0 + plot_h) text-anchor="end" font-size="11" { "0" }
            text x=(left) y=(h - 6.0) font-size="11" { (label(*first)) }
            text x=(w - 8.0) y=(h - 6.0) text-anchor="end" font-size="11" { (label(first + slots * width)) }
            @for (slot, counts) in &bars {
                @let x = left + *slot as f64 * bar_w;
                @let mut y = 8.0 + plot_h;
                @for (i, c) in counts.iter().enumerate() {
                    @if *c > 0 {
                        @let bh = plot_h * *c as f64 / max as f64;
                        @let top = { y -= bh; y };
                        rect x=(format!("{x:.2}")) y=(format!("{top:.2}")) width=(format!("{:.2}", (bar_w - 1.0).max(0.5))) height=(format!("{bh:.2}"))
                            fill=(format!("url(#{id}-{i})")) stroke="#222" stroke-width="0.3" {
                            title { (CHARTED[i]) ": " (c) }
                        }
                    }
                }
            }
        }
    }
}
