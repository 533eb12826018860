//! The shadow-read report as one HTML page: inline CSS, no script, every value escaped.

use std::fmt::Write;

use crate::admin_api::shadow::{Answer, Example, Fingerprint, Plans, Report, Verdict};

type Row = Vec<Option<String>>;

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#f3f3f3}.verdict{font-size:2em;font-weight:bold;padding:.3em .6em;display:inline-block}\
.clean{background:#d9f2d9}.insufficient{background:#fff3cd}.regressed{background:#ffe0b3}.diverged{background:#f8d7d7}\
tr.differs td{background:#ffb3b3;font-weight:bold}.null{color:#999;font-style:italic}\
.sides{display:flex;gap:2em;align-items:flex-start}.sides>div{flex:1;min-width:0;overflow-x:auto}\
pre{background:#f7f7f7;padding:.6em;white-space:pre-wrap}.error{color:#a00}section{border-top:1px solid #ccc;margin-top:2em}";

/// One HTML page, no external assets.
pub fn render_html(report: &Report) -> String {
    let mut h = String::new();
    let verdict = match report.verdict {
        Verdict::Clean => "clean",
        Verdict::Insufficient => "insufficient",
        Verdict::Regressed => "regressed",
        Verdict::Diverged => "diverged",
    };
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>switchyard shadow reads</title>\
         <style>{STYLE}</style></head><body><h1>switchyard shadow reads</h1>\
         <p class=\"verdict {verdict}\">{}</p>\
         <p class=\"thresholds\">Thresholds: min_samples {}, max_p95_ratio {} · {} reads compared</p>",
        verdict.to_uppercase(),
        report.thresholds.min_samples,
        report.thresholds.max_p95_ratio,
        report.compared()
    );
    let w = &report.window;
    h.push_str("<h2>Window</h2><table class=\"window\"><tr><th>start</th><th>samples</th><th>dropped</th><th>not_comparable</th><th>not_a_read</th><th>failed</th><th>divergences</th><th>in_flight</th><th>unstable</th></tr>");
    let _ = write!(
        h,
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
        escape(&w.start), w.samples, w.dropped, w.not_comparable, w.not_a_read, w.failed,
        w.divergences, w.in_flight, w.unstable
    );
    h.push_str("<h2>Proxies</h2><ul class=\"proxies\">");
    for proxy in &report.proxies {
        let _ = write!(h, "<li>{}</li>", escape(proxy));
    }
    h.push_str("</ul>");
    let _ = write!(h, "<h2>Fingerprints ({})</h2>", report.fingerprints.len());
    h.push_str("<table class=\"fingerprints\"><tr><th>fingerprint</th><th>query</th><th>calls</th><th>divergences</th><th>in_flight</th><th>unstable</th><th>not_comparable</th><th>regressed</th><th>old p50</th><th>old p95</th><th>old p99</th><th>new p50</th><th>new p95</th><th>new p99</th><th>p95_ratio</th></tr>");
    for f in &report.fingerprints {
        fingerprint_row(&mut h, f);
    }
    h.push_str("</table>");
    for f in &report.fingerprints {
        if f.example.is_none() && f.plans.is_none() {
            continue;
        }
        let _ = write!(
            h,
            "<section id=\"f-{id}\"><h2>{id}</h2><pre class=\"query\">{}</pre>",
            escape(&f.query),
            id = escape(&f.fingerprint)
        );
        if let Some(example) = &f.example {
            example_html(&mut h, example);
        }
        if let Some(plans) = &f.plans {
            plans_html(&mut h, plans);
        }
        h.push_str("</section>");
    }
    h.push_str("</body></html>\n");
    h
}

fn fingerprint_row(h: &mut String, f: &Fingerprint) {
    let class = if f.divergences > 0 {
        " class=\"diverged\""
    } else if f.regressed {
        " class=\"regressed\""
    } else {
        ""
    };
    let id = escape(&f.fingerprint);
    let name = if f.example.is_some() || f.plans.is_some() {
        format!("<a href=\"#f-{id}\">{id}</a>")
    } else {
        id
    };
    let (old, new) = (&f.latency.old, &f.latency.new);
    let ratio = f
        .latency
        .p95_ratio
        .map_or("–".to_string(), |r| r.to_string());
    let _ = write!(
        h,
        "<tr{class}><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
         <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{ratio}</td></tr>",
        escape(&f.query), f.calls, f.divergences, f.in_flight, f.unstable, f.not_comparable,
        if f.regressed { "yes" } else { "no" },
        old.p50, old.p95, old.p99, new.p50, new.p95, new.p99
    );
}

fn example_html(h: &mut String, e: &Example) {
    let _ = write!(
        h,
        "<h3>A divergent instance</h3><pre class=\"statement\">{}</pre><p class=\"reason\">{}</p>",
        escape(&e.statement),
        escape(&e.reason)
    );
    if !e.parameters.is_empty() {
        h.push_str("<ol class=\"parameters\">");
        for p in &e.parameters {
            let _ = write!(h, "<li>{}</li>", value(p));
        }
        h.push_str("</ol>");
    }
    h.push_str("<div class=\"sides\"><div><h4>old (source)</h4>");
    answer_html(h, "old", &e.old, &e.only_old);
    h.push_str("</div><div><h4>new (target)</h4>");
    answer_html(h, "new", &e.new, &e.only_new);
    h.push_str("</div></div>");
    for (side, rows) in [("old", &e.only_old), ("new", &e.only_new)] {
        let _ = write!(
            h,
            "<h4>Only in the {side} answer ({})</h4><table class=\"only {side}\">",
            rows.len()
        );
        for row in rows.iter() {
            row_html(h, "", row);
        }
        h.push_str("</table>");
    }
}

/// `side`'s answer; its rows that are in `only` (as a multiset) get `class="differs"`.
fn answer_html(h: &mut String, side: &str, answer: &Answer, only: &[Row]) {
    let _ = write!(h, "<table class=\"answer {side}\"><tr>");
    for c in &answer.columns {
        let _ = write!(h, "<th>{} ({})</th>", escape(&c.name), escape(&c.type_name));
    }
    h.push_str("</tr>");
    if let Some(error) = &answer.error {
        let _ = write!(
            h,
            "<tr class=\"error\"><td colspan=\"{}\">ERROR {}: {}</td></tr>",
            answer.columns.len().max(1),
            escape(&error.code),
            escape(&error.message)
        );
    } else {
        let mut unmatched: Vec<&Row> = only.iter().collect();
        for row in &answer.rows {
            let differs = match unmatched.iter().position(|o| *o == row) {
                Some(i) => {
                    unmatched.swap_remove(i);
                    " class=\"differs\""
                }
                None => "",
            };
            row_html(h, differs, row);
        }
    }
    h.push_str("</table>");
    let _ = write!(
        h,
        "<p class=\"count\">{} · {} rows{}</p>",
        escape(answer.command.as_deref().unwrap_or("no command tag")),
        answer.row_count,
        if answer.row_count > answer.rows.len() as u64 {
            format!(" (the first {} shown)", answer.rows.len())
        } else {
            String::new()
        }
    );
}

fn row_html(h: &mut String, class: &str, row: &Row) {
    let _ = write!(h, "<tr{class}>");
    for v in row {
        let _ = write!(h, "<td>{}</td>", value(v));
    }
    h.push_str("</tr>");
}

fn plans_html(h: &mut String, plans: &Plans) {
    let _ = write!(
        h,
        "<h3>EXPLAIN</h3><div class=\"sides\"><div><h4>old (source)</h4><pre class=\"plan old\">{}</pre></div>\
         <div><h4>new (target)</h4><pre class=\"plan new\">{}</pre></div></div>",
        escape(&plans.old),
        escape(&plans.new)
    );
}

fn value(v: &Option<String>) -> String {
    match v {
        None => "<span class=\"null\">NULL</span>".into(),
        Some(text) => escape(text),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin_api::shadow::*;
    use std::time::Duration;

    fn s(text: &str) -> Option<String> {
        Some(text.into())
    }

    fn fingerprint(name: &str, query: &str, divergences: u64) -> Fingerprint {
        let mut histograms = Histograms::default();
        for _ in 0..10 {
            histograms.old.record(Duration::from_millis(1));
            histograms.new.record(Duration::from_millis(3));
        }
        Fingerprint {
            fingerprint: name.into(),
            query: query.into(),
            calls: 10,
            divergences,
            in_flight: 0,
            unstable: 0,
            not_comparable: 0,
            regressed: false,
            latency: Latency::default(),
            example: None,
            plans: None,
            histograms,
        }
    }

    fn report() -> Report {
        let column = |name: &str, type_name: &str| Column {
            name: name.into(),
            type_name: type_name.into(),
        };
        let answer = |rows: Vec<Row>| Answer {
            columns: vec![column("id", "integer"), column("name", "text")],
            row_count: rows.len() as u64,
            rows,
            command: s("SELECT 3"),
            error: None,
        };
        let mut diverged = fingerprint(
            "ab12",
            "SELECT * FROM t WHERE note = '<script>' AND id > $1",
            1,
        );
        diverged.example = Some(Example {
            statement: "SELECT * FROM t WHERE note = '<script>' AND id > 0".into(),
            parameters: vec![s("0"), None],
            reason: "rows differ".into(),
            old: answer(vec![
                vec![s("1"), s("a")],
                vec![s("2"), s("b")],
                vec![s("3"), None],
            ]),
            new: answer(vec![
                vec![s("1"), s("a")],
                vec![s("2"), s("B & C")],
                vec![s("3"), None],
            ]),
            only_old: vec![vec![s("2"), s("b")]],
            only_new: vec![vec![s("2"), s("B & C")]],
        });
        diverged.plans = Some(Plans {
            old: "Seq Scan on t  (cost=0.00..1.00 rows=3)".into(),
            new: "Index Scan using t_pkey on t".into(),
        });
        let mut failed = fingerprint("cd34", "SELECT * FROM x", 1);
        failed.example = Some(Example {
            statement: "SELECT * FROM x".into(),
            parameters: vec![],
            reason: "an error on one side".into(),
            old: answer(vec![]),
            new: Answer {
                error: Some(AnswerError {
                    code: "42P01".into(),
                    message: "relation \"x\" does not exist".into(),
                }),
                ..Answer::default()
            },
            only_old: vec![],
            only_new: vec![],
        });
        let window = Window {
            start: "2026-12-07T10:00:00Z".into(),
            samples: 30,
            ..Window::default()
        };
        let thresholds = Thresholds {
            min_samples: 5,
            max_p95_ratio: 2.0,
        };
        let mut report = Report::judged(
            thresholds,
            window,
            vec![fingerprint("ef56", "SELECT 1", 0), diverged, failed],
        );
        report.proxies = vec!["http://127.0.0.1:6433".into()];
        report
    }

    /// The first `<table class="{class}">` of `html`, up to its end.
    fn table<'a>(html: &'a str, class: &str) -> &'a str {
        let start = html
            .find(&format!("<table class=\"{class}\">"))
            .unwrap_or_else(|| panic!("no table {class}"));
        let end = start + html[start..].find("</table>").expect("table end");
        &html[start..end]
    }

    #[test]
    fn renders_the_tables_escaped() {
        let html = render_html(&report());
        assert!(html.contains("<title>switchyard shadow reads</title>"));
        assert!(html.contains("<p class=\"verdict diverged\">DIVERGED</p>"));
        assert!(html.contains("min_samples 5, max_p95_ratio 2"));
        assert!(table(&html, "window").contains("<td>2026-12-07T10:00:00Z</td><td>30</td>"));
        assert!(html.contains("<li>http://127.0.0.1:6433</li>"));
        let fingerprints = table(&html, "fingerprints");
        assert_eq!(
            fingerprints.matches("<tr").count(),
            4,
            "a header and 3 rows"
        );
        assert!(fingerprints.contains("<a href=\"#f-ab12\">ab12</a>"));
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("note = &#39;&lt;script&gt;&#39; AND id &gt; $1"));
        assert!(html.contains("<th>id (integer)</th><th>name (text)</th>"));
        assert!(html.contains("<li><span class=\"null\">NULL</span></li>"));
        assert!(html
            .contains("<td colspan=\"1\">ERROR 42P01: relation &quot;x&quot; does not exist</td>"));
        assert!(
            html.contains("<pre class=\"plan old\">Seq Scan on t  (cost=0.00..1.00 rows=3)</pre>")
        );
        assert!(html.contains("<pre class=\"plan new\">Index Scan using t_pkey on t</pre>"));
        assert!(
            !html.contains("<section id=\"f-ef56\">"),
            "nothing to show for it"
        );
    }

    #[test]
    fn marks_the_rows_that_differ() {
        let html = render_html(&report());
        let old = table(&html, "answer old");
        assert!(
            old.contains("<tr class=\"differs\"><td>2</td><td>b</td></tr>"),
            "{old}"
        );
        assert!(old.contains("<tr><td>1</td><td>a</td></tr>"));
        assert!(old.contains("<tr><td>3</td><td><span class=\"null\">NULL</span></td></tr>"));
        assert_eq!(old.matches("differs").count(), 1);
        let new = table(&html, "answer new");
        assert!(
            new.contains("<tr class=\"differs\"><td>2</td><td>B &amp; C</td></tr>"),
            "{new}"
        );
        assert_eq!(new.matches("differs").count(), 1);
        assert!(table(&html, "only old").contains("<tr><td>2</td><td>b</td></tr>"));
        assert!(table(&html, "only new").contains("<tr><td>2</td><td>B &amp; C</td></tr>"));
    }
}
