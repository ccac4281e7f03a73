//! The HTML report: one self-contained file with server-drawn SVG charts and a trace browser.
//!
//! Self-contained means no network at all (no CDN, fonts or images), so a report can be mailed,
//! archived with the run, or opened on an air-gapped machine. A Content-Security-Policy meta tag
//! enforces that. Trace text is hostile by assumption (teachers write `</script>` and `<img
//! onerror>` as happily as anything else): the traces travel as JSON in a
//! `<script type="application/json">` block with every character that could close the tag or
//! start markup escaped, and the page script inserts trace text only through `textContent`.

use std::fmt::Write;
use std::path::Path;

use serde::Serialize;

use super::summary::pct;
use super::{percentile, AuditError, AuditRun, Side, TraceView};

const CSS: &str = include_str!("report.css");
const JS: &str = include_str!("report.js");

/// Reason codes drawn in the top-reasons chart; the full list is in the table and the filter.
const CHART_REASONS: usize = 15;
/// Bins of the completion-length histogram.
const LENGTH_BINS: u64 = 20;

/// Escapes text for HTML/XML element content and double-quoted attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Serialises `value` for embedding inside a `<script>` element. `<`, `>` and `&` become JSON
/// `\u` escapes so no string can form `</script>` or `<!--`; U+2028/U+2029 are escaped because
/// some JavaScript parsers treat them as line terminators. All of these can only occur inside
/// JSON strings, where the escapes decode back to the same text.
pub(crate) fn json_for_script<T: Serialize>(value: &T) -> Result<String, serde_json::Error> {
    let raw = serde_json::to_string(value)?;
    let mut out = String::with_capacity(raw.len() + raw.len() / 16);
    for c in raw.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Cuts a chart label so the label column keeps its width; the full text goes in a tooltip.
fn short(label: &str, max: usize) -> String {
    if label.chars().count() <= max {
        label.to_string()
    } else {
        let mut s: String = label.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

/// A horizontal bar chart: one row per item, label on the left, count at the bar's end.
fn hbar_chart(title: &str, items: &[(String, u64)], class: &str) -> String {
    const W: u64 = 640;
    const LABEL_W: u64 = 190;
    const ROW: u64 = 22;
    let bar_w = W - LABEL_W - 70;
    let max = items.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let h = ROW * items.len() as u64 + 8;
    let mut s = format!(
        r#"<svg class="chart" role="img" aria-label="{}" viewBox="0 0 {W} {h}" width="{W}" height="{h}"><title>{}</title>"#,
        esc(title),
        esc(title)
    );
    for (i, (label, v)) in items.iter().enumerate() {
        let y = 4 + ROW * i as u64;
        let w = if *v == 0 { 0 } else { (v * bar_w / max).max(1) };
        let _ = write!(
            s,
            r#"<g><title>{}: {v}</title><text x="{}" y="{}" text-anchor="end" class="label">{}</text><rect class="{class}" x="{LABEL_W}" y="{}" width="{w}" height="{}"/><text x="{}" y="{}" class="value">{v}</text></g>"#,
            esc(label),
            LABEL_W - 6,
            y + 15,
            esc(&short(label, 28)),
            y + 3,
            ROW - 6,
            LABEL_W + w + 4,
            y + 15,
        );
    }
    s.push_str("</svg>");
    s
}

/// The funnel: per stage, a bar for the traces remaining after it and, stacked to its right, a
/// red segment for the traces it removed, so both the level and each stage's cut are visible.
fn funnel_chart(run: &AuditRun) -> String {
    const W: u64 = 640;
    const LABEL_W: u64 = 110;
    const ROW: u64 = 22;
    let bar_w = W - LABEL_W - 120;
    let max = run
        .funnel
        .iter()
        .map(|f| f.remaining + f.removed)
        .max()
        .unwrap_or(0)
        .max(run.input)
        .max(1);
    let h = ROW * run.funnel.len() as u64 + 8;
    let title = "Traces remaining (green) and removed (red) at each stage";
    let mut s = format!(
        r#"<svg class="chart" role="img" aria-label="{title}" viewBox="0 0 {W} {h}" width="{W}" height="{h}"><title>{title}</title>"#
    );
    for (i, f) in run.funnel.iter().enumerate() {
        let y = 4 + ROW * i as u64;
        let scale = |v: u64| if v == 0 { 0 } else { (v * bar_w / max).max(1) };
        let (wk, wr) = (scale(f.remaining), scale(f.removed));
        let _ = write!(
            s,
            r#"<g><title>{}: {} removed, {} remaining</title><text x="{}" y="{}" text-anchor="end" class="label">{}</text><rect class="bar-kept" x="{LABEL_W}" y="{}" width="{wk}" height="{}"/><rect class="bar-rejected" x="{}" y="{}" width="{wr}" height="{}"/><text x="{}" y="{}" class="value">{} (−{})</text></g>"#,
            esc(&f.stage),
            f.removed,
            f.remaining,
            LABEL_W - 6,
            y + 15,
            esc(&short(&f.stage, 16)),
            y + 3,
            ROW - 6,
            LABEL_W + wk,
            y + 3,
            ROW - 6,
            LABEL_W + wk + wr + 4,
            y + 15,
            f.remaining,
            f.removed,
        );
    }
    s.push_str("</svg>");
    s
}

/// One series of a vertical bar chart.
struct Series<'a> {
    name: &'a str,
    class: &'a str,
    values: Vec<u64>,
}

/// A vertical (grouped) bar chart with category labels under the bars and a legend when there
/// is more than one series.
fn vbar_chart(title: &str, labels: &[String], series: &[Series<'_>]) -> String {
    const W: u64 = 640;
    const H: u64 = 220;
    const TOP: u64 = 24;
    const BOTTOM: u64 = 40;
    const LEFT: u64 = 40;
    let plot_h = H - TOP - BOTTOM;
    let n = labels.len().max(1) as u64;
    let group_w = (W - LEFT - 10) / n;
    let k = series.len().max(1) as u64;
    let bar_w = (group_w.saturating_sub(4) / k).max(1);
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut s = format!(
        r#"<svg class="chart" role="img" aria-label="{}" viewBox="0 0 {W} {H}" width="{W}" height="{H}"><title>{}</title>"#,
        esc(title),
        esc(title)
    );
    let _ = write!(
        s,
        r#"<line class="axis" x1="{LEFT}" y1="{}" x2="{}" y2="{}"/><text class="value" x="{}" y="{}" text-anchor="end">{max}</text><text class="value" x="{}" y="{}" text-anchor="end">0</text>"#,
        TOP + plot_h,
        W - 10,
        TOP + plot_h,
        LEFT - 4,
        TOP + 4,
        LEFT - 4,
        TOP + plot_h,
    );
    let label_every = (labels.len() as u64).div_ceil(10).max(1);
    for (i, label) in labels.iter().enumerate() {
        let x0 = LEFT + group_w * i as u64 + 2;
        for (j, ser) in series.iter().enumerate() {
            let v = ser.values.get(i).copied().unwrap_or(0);
            let bh = if v == 0 { 0 } else { (v * plot_h / max).max(1) };
            let _ = write!(
                s,
                r#"<rect class="{}" x="{}" y="{}" width="{bar_w}" height="{bh}"><title>{}, {}: {v}</title></rect>"#,
                ser.class,
                x0 + bar_w * j as u64,
                TOP + plot_h - bh,
                esc(ser.name),
                esc(label),
            );
        }
        if (i as u64).is_multiple_of(label_every) {
            let _ = write!(
                s,
                r#"<text class="label" x="{}" y="{}" text-anchor="middle">{}</text>"#,
                x0 + group_w / 2,
                TOP + plot_h + 16,
                esc(label)
            );
        }
    }
    if series.len() > 1 {
        let mut x = LEFT;
        for ser in series {
            let _ = write!(
                s,
                r#"<rect class="{}" x="{x}" y="4" width="12" height="12"/><text class="label" x="{}" y="15">{}</text>"#,
                ser.class,
                x + 16,
                esc(ser.name)
            );
            x += 110;
        }
    }
    s.push_str("</svg>");
    s
}

/// Histogram bins over `[0, max]` of both sides' completion lengths, as labels and per-side
/// counts.
fn length_bins(run: &AuditRun) -> (Vec<String>, Vec<u64>, Vec<u64>) {
    let max = run
        .kept
        .completion_tokens
        .last()
        .copied()
        .max(run.rejected.completion_tokens.last().copied())
        .unwrap_or(0);
    let width = (max + 1).div_ceil(LENGTH_BINS).max(1);
    let bins = (max / width + 1) as usize;
    let count = |v: &[u64]| {
        let mut c = vec![0u64; bins];
        for t in v {
            if let Some(slot) = c.get_mut((t / width) as usize) {
                *slot += 1;
            }
        }
        c
    };
    let labels = (0..bins as u64).map(|i| (i * width).to_string()).collect();
    (
        labels,
        count(&run.kept.completion_tokens),
        count(&run.rejected.completion_tokens),
    )
}

/// Data handed to the page script.
#[derive(Serialize)]
struct PageData<'a> {
    kept_total: u64,
    rejected_total: u64,
    reason_codes: Vec<&'a str>,
    traces: &'a [TraceView],
}

fn table(out: &mut String, caption: &str, header: &[&str], rows: &[Vec<String>]) {
    let _ = write!(
        out,
        "<table class=\"nums\"><caption>{}</caption><thead><tr>",
        esc(caption)
    );
    for h in header {
        let _ = write!(out, "<th scope=\"col\">{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for (i, cell) in row.iter().enumerate() {
            if i == 0 {
                let _ = write!(out, "<th scope=\"row\">{}</th>", esc(cell));
            } else {
                let _ = write!(out, "<td>{}</td>", esc(cell));
            }
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
}

fn num(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// The section `distill run` adds: held-out accuracy of the base and the student with 95%
/// intervals and their paired comparison, and the student's training loss curve (inline SVG).
fn outcome_section(v: &serde_json::Value) -> String {
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN);
    let mut o = String::from(
        r#"<section aria-labelledby="h-outcome"><h2 id="h-outcome">Student: held-out accuracy and training loss</h2><table><tr><th>model</th><th>pass@1</th><th>95% interval</th><th>problems</th><th></th></tr>"#,
    );
    for label in ["base", "student"] {
        let a = &v[label];
        if a.is_null() {
            continue;
        }
        let p = f(&a["pass@1"]);
        let _ = write!(
            o,
            r#"<tr><td>{label}</td><td>{:.1}%</td><td>[{:.1}, {:.1}]</td><td>{}</td><td><div style="background:#36c;height:12px;width:{:.0}px"></div></td></tr>"#,
            100.0 * p,
            100.0 * f(&a["pass@1_ci95"][0]),
            100.0 * f(&a["pass@1_ci95"][1]),
            a["n_problems"].as_u64().unwrap_or(0),
            (300.0 * p).max(0.0)
        );
    }
    o.push_str("</table>");
    let c = &v["compare"];
    if !c.is_null() {
        let _ = write!(
            o,
            "<p>Change: {:+.1} points, 95% interval [{:+.1}, {:+.1}], paired p = {:.4}; {} problems won, {} lost.</p>",
            100.0 * f(&c["delta"]),
            100.0 * f(&c["ci95"][0]),
            100.0 * f(&c["ci95"][1]),
            f(&c["p_value"]),
            c["wins"].as_u64().unwrap_or(0),
            c["losses"].as_u64().unwrap_or(0)
        );
    }
    let loss: Vec<(f64, f64)> = v["loss"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    if loss.len() > 1 {
        let (w, h, pad) = (560.0, 200.0, 24.0);
        let (x0, x1) = (loss[0].0, loss[loss.len() - 1].0.max(loss[0].0 + 1.0));
        let ymax = loss.iter().map(|p| p.1).fold(f64::MIN, f64::max);
        let ymin = loss.iter().map(|p| p.1).fold(f64::MAX, f64::min).min(0.0);
        let pts: Vec<String> = loss
            .iter()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    pad + (x - x0) / (x1 - x0) * (w - 2.0 * pad),
                    h - pad - (y - ymin) / (ymax - ymin).max(1e-9) * (h - 2.0 * pad)
                )
            })
            .collect();
        let _ = write!(
            o,
            r#"<p>Training loss {ymax:.3} → {:.3} over {} logged steps.</p><svg width="{w}" height="{h}" role="img" aria-label="training loss curve"><polyline fill="none" stroke="seagreen" stroke-width="2" points="{}"/></svg>"#,
            loss[loss.len() - 1].1,
            loss.len(),
            pts.join(" ")
        );
    }
    if let Some(rows) = v["deploy"].as_array() {
        o.push_str(r#"<h3>Deployment: teacher and student, f32 and quantized</h3><table><tr><th>model</th><th>pass@1</th><th>95% interval</th><th>decode tok/s, 1 seq</th><th>decode tok/s, 32 seqs</th><th>time to first token</th><th>size</th><th>peak RSS</th></tr>"#);
        for r in rows {
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{:.1}%</td><td>[{:.1}, {:.1}]</td><td>{:.1}</td><td>{:.1}</td><td>{:.0} ms</td><td>{:.1} MB</td><td>{:.0} MB</td></tr>",
                esc(r["label"].as_str().unwrap_or("")),
                100.0 * f(&r["pass_at_1"]),
                100.0 * f(&r["ci95"][0]),
                100.0 * f(&r["ci95"][1]),
                f(&r["decode_tok_s"][0]),
                f(&r["decode_tok_s"][1]),
                1000.0 * f(&r["ttft_s"]),
                f(&r["bytes"]) / 1e6,
                f(&r["peak_rss_mb"])
            );
        }
        o.push_str("</table>");
    }
    o.push_str("</section>\n");
    o
}

/// Renders the report page as a string (see [`write_html`]).
pub fn render_html(run: &AuditRun) -> Result<String, serde_json::Error> {
    let mut o = String::with_capacity(64 * 1024);
    let dir = run.dir.display().to_string();
    let _ = write!(
        o,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>distill audit: {}</title>
<style>{CSS}</style></head>
<body>
<div id="errors" role="alert"></div>
<header><h1>Filter audit</h1><p class="path">{}</p></header>
<main>
"#,
        esc(&dir),
        esc(&dir)
    );

    if let Some(v) = &run.outcome {
        o.push_str(&outcome_section(v));
    }

    // Counts.
    let (kept, rejected) = (run.kept.count, run.rejected.count);
    let _ = write!(
        o,
        r#"<section aria-labelledby="h-counts"><h2 id="h-counts">Counts</h2><dl class="counts">
<div><dt>input</dt><dd id="count-input">{}</dd></div>
<div><dt>kept</dt><dd id="count-kept">{kept}</dd><dd class="pct">{}</dd></div>
<div><dt>rejected</dt><dd id="count-rejected">{rejected}</dd><dd class="pct">{}</dd></div>"#,
        run.input,
        pct(kept, run.input),
        pct(rejected, run.input)
    );
    if let Some(w) = run.summary.as_ref().and_then(|s| s.wall_seconds) {
        let _ = write!(o, "<div><dt>filter wall time</dt><dd>{w:.1} s</dd></div>");
    }
    o.push_str("</dl>");
    if kept == 0 {
        if let Some((code, n)) = run.top_reason() {
            let _ = write!(
                o,
                r#"<p class="hint">Nothing was kept. The most frequent reason is <code>{}</code> ({n} of {rejected} rejected traces).</p>"#,
                esc(code)
            );
        }
    }
    if !run.warnings.is_empty() {
        o.push_str(r#"<ul class="warnings">"#);
        for w in &run.warnings {
            let _ = write!(o, "<li>{}</li>", esc(w));
        }
        o.push_str("</ul>");
    }
    o.push_str("</section>\n");

    // Funnel.
    let _ = write!(
        o,
        r#"<section aria-labelledby="h-funnel"><h2 id="h-funnel">Funnel{}</h2><div class="pair">{}"#,
        if run.funnel_derived {
            " (rebuilt from trace reasons)"
        } else {
            ""
        },
        funnel_chart(run)
    );
    let rows: Vec<Vec<String>> = run
        .funnel
        .iter()
        .map(|f| {
            vec![
                f.stage.clone(),
                f.removed.to_string(),
                f.remaining.to_string(),
                pct(f.remaining, run.input),
            ]
        })
        .collect();
    table(
        &mut o,
        "Funnel",
        &["stage", "removed", "remaining", "% of input"],
        &rows,
    );
    o.push_str("</div></section>\n");

    // Reasons.
    let _ = write!(
        o,
        r#"<section aria-labelledby="h-reasons"><h2 id="h-reasons">Reasons</h2>"#
    );
    if run.reason_counts.is_empty() {
        o.push_str("<p>No trace carries a reason.</p>");
    } else {
        let top: Vec<(String, u64)> = run
            .reason_counts
            .iter()
            .take(CHART_REASONS)
            .cloned()
            .collect();
        o.push_str("<div class=\"pair\">");
        o.push_str(&hbar_chart(
            "Most frequent reason codes",
            &top,
            "bar-rejected",
        ));
        let rows: Vec<Vec<String>> = run
            .reason_counts
            .iter()
            .map(|(c, n)| vec![c.clone(), n.to_string()])
            .collect();
        table(&mut o, "All reason codes", &["reason", "count"], &rows);
        o.push_str("</div>");
    }
    o.push_str("</section>\n");

    // Lengths.
    let (labels, kept_bins, rejected_bins) = length_bins(run);
    let _ = write!(
        o,
        r#"<section aria-labelledby="h-lengths"><h2 id="h-lengths">Completion length (tokens)</h2><div class="pair">{}"#,
        vbar_chart(
            "Completion length histogram, kept vs rejected",
            &labels,
            &[
                Series {
                    name: "kept",
                    class: "bar-kept",
                    values: kept_bins
                },
                Series {
                    name: "rejected",
                    class: "bar-rejected",
                    values: rejected_bins
                },
            ],
        )
    );
    let rows: Vec<Vec<String>> = [Side::Kept, Side::Rejected]
        .into_iter()
        .map(|side| {
            let s = run.side(side);
            let t = &s.completion_tokens;
            vec![
                side.as_str().to_string(),
                t.len().to_string(),
                num(t.first().copied()),
                num(percentile(t, 0.5)),
                num(percentile(t, 0.9)),
                num(t.last().copied()),
                s.missing_tokens.to_string(),
            ]
        })
        .collect();
    table(
        &mut o,
        "Completion tokens",
        &["", "n", "min", "median", "p90", "max", "no usage"],
        &rows,
    );
    o.push_str("</div></section>\n");

    // Pass rate.
    let buckets = run.pass_rate_buckets();
    let _ = write!(
        o,
        r#"<section aria-labelledby="h-pass"><h2 id="h-pass">Pass rate per problem</h2><p>{} problems with a check result.</p><div class="pair">{}"#,
        run.problems.len(),
        vbar_chart(
            "Problems by pass rate",
            &buckets
                .iter()
                .map(|(l, _)| l.to_string())
                .collect::<Vec<_>>(),
            &[Series {
                name: "problems",
                class: "bar-neutral",
                values: buckets.iter().map(|(_, n)| *n).collect(),
            }],
        )
    );
    let rows: Vec<Vec<String>> = buckets
        .iter()
        .map(|(l, n)| vec![l.to_string(), n.to_string()])
        .collect();
    table(
        &mut o,
        "Problems by pass rate",
        &["pass rate", "problems"],
        &rows,
    );
    o.push_str("</div></section>\n");

    // Trace browser (filled by the script).
    let (shown_kept, shown_rejected) = (run.shown(Side::Kept), run.shown(Side::Rejected));
    let _ = write!(
        o,
        r#"<section aria-labelledby="h-traces"><h2 id="h-traces">Traces</h2>
<p>The browser holds {shown_kept} of {kept} kept and {shown_rejected} of {rejected} rejected traces{}.</p>
<form id="filters" role="search" onsubmit="return false">
<label for="f-side">Side</label> <select id="f-side"><option value="">all</option><option value="kept">kept</option><option value="rejected">rejected</option></select>
<label for="f-reason">Reason</label> <select id="f-reason"><option value="">any</option><option value="-">(no reason)</option></select>
<label for="f-q">Search</label> <input id="f-q" type="search" placeholder="id, problem, text">
</form>
<p id="shown" aria-live="polite">Showing <span id="shown-count">0</span> of <span id="shown-total">0</span> traces.</p>
<div class="browser"><div class="list"><table id="traces"><caption class="sr-only">Traces</caption><thead><tr><th scope="col">id</th><th scope="col">problem</th><th scope="col">side</th><th scope="col">reasons</th><th scope="col">tokens</th></tr></thead><tbody id="rows"></tbody></table></div>
<article id="detail" aria-live="polite"><p class="muted">Select a trace to read it.</p></article></div>
</section>
</main>
"#,
        if shown_kept < kept as usize || shown_rejected < rejected as usize {
            " (the first ones of each file; statistics above cover all)"
        } else {
            ""
        }
    );

    let data = PageData {
        kept_total: kept,
        rejected_total: rejected,
        reason_codes: run.reason_counts.iter().map(|(c, _)| c.as_str()).collect(),
        traces: &run.traces,
    };
    let _ = write!(
        o,
        "<script type=\"application/json\" id=\"data\">{}</script>\n<script>{JS}</script>\n</body></html>\n",
        json_for_script(&data)?
    );
    Ok(o)
}

/// Writes the self-contained HTML report for `run` to `out`. The file is written to a
/// temporary name next to `out` and renamed, so a reader never sees half a report.
pub fn write_html(run: &AuditRun, out: &Path) -> Result<(), AuditError> {
    let page = render_html(run).map_err(|e| AuditError::Io {
        path: out.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    let io = |source| AuditError::Io {
        path: out.to_path_buf(),
        source,
    };
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, page).map_err(io)?;
    std::fs::rename(&tmp, out).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_json_cannot_close_the_tag() {
        let v = serde_json::json!({"t": "</script><!-- & \u{2028}\u{2029} <img>"});
        let s = json_for_script(&v).unwrap();
        for bad in ["<", ">", "&", "\u{2028}", "\u{2029}"] {
            assert!(!s.contains(bad), "{bad:?} left in {s}");
        }
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn the_outcome_shows_the_deployment_table_escaped() {
        let v = serde_json::json!({
            "deploy": [
                {"label": "student <q8_0>", "pass_at_1": 0.25, "ci95": [0.2, 0.3],
                 "decode_tok_s": [12.5, 230.0], "ttft_s": 0.05, "bytes": 144_800_000u64,
                 "peak_rss_mb": 700.0}
            ]
        });
        let html = outcome_section(&v);
        assert!(html.contains("Deployment: teacher and student"), "{html}");
        assert!(html.contains("<td>student &lt;q8_0&gt;</td><td>25.0%</td><td>[20.0, 30.0]</td><td>12.5</td><td>230.0</td><td>50 ms</td><td>144.8 MB</td><td>700 MB</td>"), "{html}");
    }

    #[test]
    fn escape_covers_markup() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
