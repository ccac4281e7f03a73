//! The terminal summary: what a user sees right after `distill audit`, before opening the HTML.

use std::fmt::Write;

use super::{percentile, AuditRun, Side};

/// How many reason codes the terminal summary lists.
const TOP_REASONS: usize = 10;

/// Formats `n` as a percentage of `total` with one decimal (`-` when `total` is 0).
pub(crate) fn pct(n: u64, total: u64) -> String {
    if total == 0 {
        "-".to_string()
    } else {
        format!("{:.1}%", n as f64 * 100.0 / total as f64)
    }
}

/// Renders rows as a left-aligned first column and right-aligned others, so numbers line up.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let all = std::iter::once(header.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .chain(rows.iter().cloned());
    for row in all {
        let mut line = String::from("  ");
        for (i, cell) in row.iter().enumerate().take(cols) {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i == 0 {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str("  ");
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn num(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Formats the run for a terminal: counts, the funnel, top reasons, pass rate per problem and
/// completion lengths, plus a hint when nothing was kept. Plain text without colour codes so it
/// can be pasted into issues and logs.
pub fn terminal_summary(run: &AuditRun) -> String {
    let mut out = String::new();
    let (kept, rejected) = (run.kept.count, run.rejected.count);
    let _ = writeln!(out, "Filter run: {}", run.dir.display());
    let _ = writeln!(
        out,
        "input {}  kept {} ({})  rejected {} ({})",
        run.input,
        kept,
        pct(kept, run.input),
        rejected,
        pct(rejected, run.input)
    );
    if let Some(w) = run.summary.as_ref().and_then(|s| s.wall_seconds) {
        let _ = writeln!(out, "filter wall time {w:.1} s");
    }

    let _ = writeln!(
        out,
        "\nFunnel{}",
        if run.funnel_derived {
            " (rebuilt from trace reasons)"
        } else {
            ""
        }
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
    out.push_str(&table(
        &["stage", "removed", "remaining", "% of input"],
        &rows,
    ));

    let _ = writeln!(out, "\nTop reasons");
    if run.reason_counts.is_empty() {
        let _ = writeln!(out, "  (none)");
    } else {
        let rows: Vec<Vec<String>> = run
            .reason_counts
            .iter()
            .take(TOP_REASONS)
            .map(|(code, n)| vec![code.clone(), n.to_string()])
            .collect();
        out.push_str(&table(&["reason", "count"], &rows));
        if run.reason_counts.len() > TOP_REASONS {
            let _ = writeln!(
                out,
                "  ... and {} more codes",
                run.reason_counts.len() - TOP_REASONS
            );
        }
    }

    let _ = writeln!(
        out,
        "\nPass rate per problem ({} problems with a check result)",
        run.problems.len()
    );
    let rows: Vec<Vec<String>> = run
        .pass_rate_buckets()
        .into_iter()
        .map(|(label, n)| vec![label.to_string(), n.to_string()])
        .collect();
    out.push_str(&table(&["pass rate", "problems"], &rows));

    let _ = writeln!(out, "\nCompletion length (tokens)");
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
    out.push_str(&table(
        &["", "n", "min", "median", "p90", "max", "no usage"],
        &rows,
    ));

    if !run.warnings.is_empty() {
        let _ = writeln!(out, "\nWarnings");
        for w in &run.warnings {
            let _ = writeln!(out, "  - {w}");
        }
    }

    if kept == 0 {
        match run.top_reason() {
            Some((code, n)) => {
                let _ = writeln!(
                    out,
                    "\nhint: nothing was kept; the most frequent reason is {code} ({n} of {rejected} rejected traces)"
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "\nhint: nothing was kept and no rejected trace carries a reason; check the input"
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_numbers_right() {
        let t = table(
            &["stage", "n"],
            &[
                vec!["input".into(), "5".into()],
                vec!["rules".into(), "120".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "  stage    n");
        assert_eq!(lines[1], "  input    5");
        assert_eq!(lines[2], "  rules  120");
    }

    #[test]
    fn pct_handles_zero_total() {
        assert_eq!(pct(1, 0), "-");
        assert_eq!(pct(1, 3), "33.3%");
    }
}
