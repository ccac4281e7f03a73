//! Fixture- and table-driven tests of the math answer checker through its
//! public API.

use std::time::{Duration, Instant};

use distill::check::math::{
    check, check_batch, check_until, ExtractMethod, LastNumberFallback, MathCheck, MathOptions,
    Rule, Verdict,
};

fn run(gold: &str, pred: &str) -> MathCheck {
    check(gold, pred, &MathOptions::default())
}

fn assert_equal(gold: &str, pred: &str) {
    let out = run(gold, pred);
    assert_eq!(
        out.verdict,
        Verdict::Correct,
        "{gold:?} vs {pred:?}: {out:?}"
    );
}

fn assert_not_equal(gold: &str, pred: &str) {
    let out = run(gold, pred);
    assert_ne!(
        out.verdict,
        Verdict::Correct,
        "{gold:?} vs {pred:?}: {out:?}"
    );
}

/// Checks a pair in both directions, since either side may be the gold.
fn both_ways(a: &str, b: &str, equal: bool) {
    for (gold, pred) in [(a, b), (b, a)] {
        if equal {
            assert_equal(gold, pred);
        } else {
            assert_not_equal(gold, pred);
        }
    }
}

#[derive(serde::Deserialize)]
struct Row {
    id: String,
    gold: String,
    pred: String,
    equal: bool,
}

fn fixture_rows() -> Vec<Row> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gsm8k_answer_pairs.jsonl"
    );
    let text = std::fs::read_to_string(path).expect("fixture file is readable");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("fixture row is valid JSON"))
        .collect()
}

#[test]
fn gsm8k_dev_set_scores_100_percent() {
    let rows = fixture_rows();
    assert_eq!(rows.len(), 207);
    let pairs: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.gold.clone(), r.pred.clone()))
        .collect();
    let results = check_batch(&pairs, &MathOptions::default());
    let failures: Vec<String> = rows
        .iter()
        .zip(&results)
        .filter(|(row, out)| (out.verdict == Verdict::Correct) != row.equal)
        .map(|(row, out)| format!("{} expected {} got {:?}", row.id, row.equal, out))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn batch_preserves_input_order() {
    let rows: Vec<(String, String)> = (0..200)
        .map(|i| {
            (
                i.to_string(),
                format!("The answer is {}.", if i % 3 == 0 { i + 1 } else { i }),
            )
        })
        .collect();
    let results = check_batch(&rows, &MathOptions::default());
    for (i, out) in results.iter().enumerate() {
        assert_eq!(out.verdict == Verdict::Correct, i % 3 != 0, "row {i}");
        assert_eq!(out.gold_normal.as_deref(), Some(i.to_string().as_str()));
    }
}

// Regressions modelled on Math-Verify issues.

#[test]
fn issue_14_distinct_factorial_reciprocals_differ() {
    both_ways("\\frac{1}{2004!}", "\\frac{1}{2006!}", false);
    both_ways("1/2004!", "1/2006!", false);
    both_ways("1/2004!", "\\frac{1}{2004!}", true);
    both_ways("2006!/2004!", "2006 \\cdot 2005", true);
    let out = run("1/2004!", "1/2006!");
    assert_eq!(out.rule, Rule::RationalEqual);
}

#[test]
fn issue_14_factorials_beyond_the_cap_do_not_hang() {
    let start = Instant::now();
    let out = run("(10^{9})!", "(10^{9}+1)!");
    assert_ne!(out.verdict, Verdict::Correct);
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn issue_60_sign_and_magnitude_are_not_ignored() {
    both_ways("\\frac{1}{2}", "-\\frac{1}{2}", false);
    both_ways("48", "-48", false);
    both_ways("\\sqrt{2}", "-\\sqrt{2}", false);
    both_ways("1000", "100", false);
    both_ways("0.5", "5", false);
    both_ways("10^{-3}", "10^{3}", false);
    assert_not_equal("48", "The answer is -48.");
}

#[test]
fn issue_26_fraction_vs_decimal() {
    both_ways("\\dfrac{3}{4}", "0.75", true);
    both_ways("\\frac34", "0.75", true);
    both_ways("\\tfrac{1}{8}", ".125", true);
}

#[test]
fn issue_26_assignment_vs_value() {
    both_ways("x=5", "5", true);
    both_ways("x = 5", "x=5", true);
    both_ways("x = 5", "6", false);
}

#[test]
fn issue_37_sets_are_unordered() {
    both_ways("\\{1,2\\}", "\\{2,1\\}", true);
    both_ways("\\left\\{ 3, 1, 2 \\right\\}", "\\{1,2,3\\}", true);
    both_ways("\\{1,2\\}", "\\{1,3\\}", false);
}

#[test]
fn issue_37_percent_and_currency() {
    both_ways("10\\%", "10", true);
    both_ways("\\$1,000", "1000", true);
    both_ways("\\$1{,}000.00", "1000", true);
}

#[test]
fn issue_69_choice_letters() {
    both_ways("\\text{B}", "(B)", true);
    both_ways("\\textbf{(B)}", "B", true);
    both_ways("(B)", "(C)", false);
    assert_equal("C", "The answer is (C).");
}

#[test]
fn issue_69_equivalent_radicals_and_pi() {
    both_ways("\\sqrt{8}", "2\\sqrt{2}", true);
    both_ways("\\frac{\\pi}{2}", "\\pi/2", true);
    both_ways("\\sqrt{12}", "3\\sqrt{2}", false);
}

// A broad table of equal / not-equal pairs, each checked in both directions.
const TABLE: &[(&str, &str, bool)] = &[
    // integers, decimals, fractions
    ("72", "72.0", true),
    ("72", "72.5", false),
    ("-3", "−3", true),
    ("0.5", "\\frac{1}{2}", true),
    ("0.5", "1/2", true),
    ("\\frac{2}{4}", "\\frac{1}{2}", true),
    ("\\frac{1}{3}", "0.33", true),
    ("\\frac{1}{3}", "0.333", true),
    ("\\frac{1}{3}", "0.3", false),
    ("\\frac{2}{3}", "0.67", true),
    ("\\frac{2}{3}", "0.66", false),
    ("0.755", "0.76", false),
    ("1.5", "\\frac{3}{2}", true),
    ("-\\frac{3}{2}", "\\frac{-3}{2}", true),
    ("\\frac{3}{-2}", "-1.5", true),
    ("\\frac{3}{2}", "\\frac{2}{3}", false),
    // thousands, money, percent, units, degrees
    ("1000000", "1,000,000", true),
    ("1000", "1\\,000", true),
    ("1000", "1{,}000", true),
    ("1000", "1,001", false),
    ("1260", "\\$1,260", true),
    ("25", "25\\%", true),
    ("0.25", "25\\%", true),
    ("25", "2.5\\%", false),
    ("90", "90^\\circ", true),
    ("90", "90^{\\circ}", true),
    ("90", "90°", true),
    ("45", "45 degrees", true),
    ("12", "12 \\text{ cm}", true),
    ("12", "12 \\text{ cm}^2", true),
    ("5", "5 \\text{ hours}", true),
    ("7", "7 meters", true),
    ("7", "8 meters", false),
    // scientific notation
    ("1500", "1.5e3", true),
    ("1500", "1.5 \\times 10^{3}", true),
    ("1500", "1.5 \\times 10^{4}", false),
    ("0.0015", "1.5e-3", true),
    // mixed numbers
    ("\\frac{5}{2}", "2\\frac{1}{2}", true),
    ("2.5", "2 1/2", true),
    ("-\\frac{5}{2}", "-2\\frac{1}{2}", true),
    ("\\frac{5}{2}", "2\\frac{1}{3}", false),
    // expressions and implicit multiplication
    ("2\\pi", "2 \\cdot \\pi", true),
    ("2\\pi", "\\pi", false),
    ("6.28", "2\\pi", true),
    ("3\\sqrt{2}", "\\sqrt{18}", true),
    ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}", true),
    ("\\sqrt[3]{27}", "3", true),
    ("\\sqrt[3]{16}", "2\\sqrt[3]{2}", true),
    ("2^{10}", "1024", true),
    ("2^{10}", "1023", false),
    ("\\binom{6}{2}", "15", true),
    ("5!", "120", true),
    ("e^2", "e \\cdot e", true),
    ("\\frac{\\sqrt{3}}{2}", "\\sin(\\pi/3)", true),
    ("\\log_2 8", "3", true),
    ("1+\\sqrt{5}", "1-\\sqrt{5}", false),
    // symbolic expressions
    ("x^2+2x+1", "(x+1)^2", true),
    ("x^2-1", "(x-1)(x+1)", true),
    ("x^2+1", "(x+1)^2", false),
    ("2x", "x+x", true),
    ("\\frac{a}{b}", "a/b", true),
    ("\\frac{a}{b}", "b/a", false),
    ("y = 2x + 3", "2x+3", true),
    // sets, tuples, intervals
    ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}", true),
    ("\\{1, 2\\}", "\\{1, 2, 3\\}", false),
    ("(1, 2)", "(1, 2)", true),
    ("(1, 2)", "(2, 1)", false),
    ("(1,2,3)", "(1, 2, 3)", true),
    ("[1, 2)", "[1, 2)", true),
    ("[1, 2)", "(1, 2]", false),
    ("[1, 2]", "[1, 2)", false),
    ("(-\\infty, 3]", "(-\\infty, 3]", true),
    ("(-\\infty, 3]", "(-\\infty, 3)", false),
    ("(-\\infty, 3]", "(\\infty, 3]", false),
    ("(0, 1) \\cup (2, 3)", "(2,3) \\cup (0,1)", true),
    ("\\{(1,2), (3,4)\\}", "\\{(3,4), (1,2)\\}", true),
    ("1, 2", "2, 1", true),
    ("\\{\\frac12, 2\\}", "\\{0.5, 2\\}", true),
    ("\\emptyset", "\\{\\}", true),
    // relations
    ("x > 3", "3 < x", true),
    ("x \\ge 3", "3 \\le x", true),
    ("x > 3", "x \\ge 3", false),
    ("x > 3", "(3, \\infty)", true),
    ("x \\le 3", "(-\\infty, 3]", true),
    ("x = 3", "3 = x", true),
    ("x \\in [1, 2]", "[1, 2]", true),
    // multiple choice
    ("A", "(A)", true),
    ("(D)", "\\text{(D)}", true),
    ("A", "B", false),
    ("E", "\\textbf{(E)}", true),
    ("(A)", "\\textbf{(A) } 12", true),
    ("(B)", "\\textbf{(A) } 12", false),
    ("3, 5", "x = 3 \\text{ or } x = 5", true),
    ("3, 5", "x = 3 \\text{ or } x = 6", false),
    // text answers
    ("\\text{Monday}", "Monday", true),
    ("\\text{Monday}", "Tuesday", false),
    ("\\text{yes}", "\\text{Yes}", true),
];

#[test]
fn table_of_pairs() {
    assert!(TABLE.len() >= 80);
    for &(a, b, equal) in TABLE {
        both_ways(a, b, equal);
    }
}

#[test]
fn extraction_forms() {
    let cases = [
        ("so it is \\boxed{\\frac{1}{2}}.", "0.5"),
        (
            "first \\boxed{3} then \\boxed{\\{1, \\{2\\}\\}}",
            "\\{1, \\{2\\}\\}",
        ),
        ("\\fbox{42}", "42"),
        ("work\n#### 1,260", "1260"),
        ("So the answer is 17.", "17"),
        (
            "Final Answer: The final answer is $-\\frac{3}{4}$. I hope it is correct.",
            "-0.75",
        ),
        ("Final answer: 9", "9"),
        ("blah blah\n\n**Final answer: 27**", "27"),
        ("lots of work giving **31** total", "31"),
        ("Q: x?\nA: 60", "60"),
        ("no marker, ends with 12 cookies", "12"),
    ];
    for (pred, gold) in cases {
        assert_equal(gold, pred);
    }
}

#[test]
fn evidence_byte_range_matches_completion() {
    let pred = "We compute 3+4.\n#### 7";
    let out = run("7", pred);
    let span = out.pred_span.expect("span is recorded");
    assert_eq!(span.method, ExtractMethod::Hashes);
    assert_eq!(&pred[span.start..span.end], "7");
    assert_eq!(out.rule, Rule::StringEqual);
}

#[test]
fn last_number_fallback_is_configurable() {
    let pred = "She buys 3 and then 4 more, 7 in total";
    assert_equal("7", pred);
    let never = MathOptions {
        fallback: LastNumberFallback::Never,
        ..MathOptions::default()
    };
    assert_eq!(check("7", pred, &never).verdict, Verdict::UnparseablePred);
    let always = MathOptions {
        fallback: LastNumberFallback::Always,
        ..MathOptions::default()
    };
    assert_eq!(
        check("x+7", "we get x+7", &always).verdict,
        Verdict::Incorrect
    );
}

#[test]
fn unparseable_sides_are_reported() {
    assert_eq!(run("\\frac{1}{", "5").verdict, Verdict::UnparseableGold);
    assert_eq!(
        run("5", "The answer is \\frac{1}{.").verdict,
        Verdict::UnparseablePred
    );
}

#[test]
fn pathological_inputs_return_quickly() {
    let opts = MathOptions {
        budget_ms: 200,
        ..MathOptions::default()
    };
    let cases = [
        ("2^{10^{9}}", "2^{10^{9}}+1"),
        ("2^{2^{2^{2^{2^{2}}}}}", "3"),
        ("(2^{100000})!", "1"),
        ("10000!", "9999!"),
        ("\\binom{100000}{50000}", "1"),
    ];
    for (gold, pred) in cases {
        let start = Instant::now();
        let out = check(gold, pred, &opts);
        assert_ne!(out.verdict, Verdict::Correct, "{gold} vs {pred}");
        assert!(
            start.elapsed() < Duration::from_millis(1_500),
            "{gold} took {:?}",
            start.elapsed()
        );
    }
    let long = format!("{} The answer is 7.", "word 12 <<1+1=2>> ".repeat(5_000));
    let start = Instant::now();
    assert_eq!(check("7", &long, &opts).verdict, Verdict::Correct);
    assert!(start.elapsed() < Duration::from_millis(1_500));
    assert_equal("-5", "所以 the answer is −5。");
    let deep = format!("{}1{}", "(".repeat(5_000), ")".repeat(5_000));
    let start = Instant::now();
    let out = check("2", &deep, &opts);
    assert_ne!(out.verdict, Verdict::Correct);
    assert!(start.elapsed() < Duration::from_millis(1_500));
}

#[test]
fn timeout_verdict_when_deadline_passes() {
    let out = check_until("2^{10}", "1024", &MathOptions::default(), Instant::now());
    assert_eq!(out.verdict, Verdict::Timeout);
    let opts = MathOptions {
        budget_ms: 0,
        ..MathOptions::default()
    };
    assert_eq!(check("1/3", "0.33", &opts).verdict, Verdict::Timeout);
}

#[test]
fn outcome_serializes_with_snake_case() {
    let out = run("\\frac{1}{2}", "The answer is $0.5$.");
    let json = serde_json::to_value(&out).expect("serializable");
    assert_eq!(json["verdict"], "correct");
    assert_eq!(json["rule"], "rational_equal");
    assert_eq!(json["pred_span"]["method"], "answer_phrase");
    assert_eq!(json["pred_normal"], "0.5");
}

#[test]
fn unit_phrases_after_pi_are_dropped() {
    both_ways("100\\pi \\text{ square units}", "100\\pi", true);
    both_ways("4\\pi \\text{ cm}^2", "4\\pi", true);
    both_ways("100\\pi \\text{ square units}", "10\\pi", false);
}

#[test]
fn plus_minus_stands_for_both_solutions() {
    both_ways("1 \\pm \\sqrt{2}", "1+\\sqrt{2}, 1-\\sqrt{2}", true);
    both_ways("1 \\pm \\sqrt{2}", "1-\\sqrt{2}, 1+\\sqrt{2}", true);
    both_ways("x = 2 \\pm 3", "x = 5, x = -1", true);
    both_ways("\\pm 3", "3, -3", true);
    both_ways("1 \\pm \\sqrt{2}", "1+\\sqrt{2}", false);
    both_ways("1 \\pm \\sqrt{2}", "1 \\pm \\sqrt{3}", false);
}

#[test]
fn repeating_decimals_are_exact_fractions() {
    both_ways("0.\\overline{3}", "\\frac{1}{3}", true);
    both_ways("0.1\\overline{6}", "\\frac{1}{6}", true);
    both_ways("1.2\\overline{3}", "37/30", true);
    both_ways("0.\\overline{142857}", "1/7", true);
    both_ways("-0.\\overline{3}", "-\\frac{1}{3}", true);
    both_ways("0.\\overline{3}", "0.3", false);
    both_ways("0.\\overline{6}", "\\frac{1}{3}", false);
    let out = run("\\frac{1}{3}", "0.\\overline{3}");
    assert_eq!(out.rule, Rule::RationalEqual);
}

#[test]
fn a_one_element_set_equals_its_element() {
    both_ways("\\{2\\}", "2", true);
    both_ways("\\{\\frac{1}{2}\\}", "0.5", true);
    both_ways("\\{2\\}", "3", false);
    both_ways("\\{2, 3\\}", "2", false);
    both_ways("\\{2\\}", "(2, 3)", false);
}
