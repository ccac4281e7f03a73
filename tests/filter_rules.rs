//! Quality filters: rule files, built-in checks, dedup and decontamination.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use distill::filter::checks::{find_repetition, RepetitionParams};
use distill::filter::decontam::{DecontamParams, EvalIndex, TextSource};
use distill::filter::dedup::{
    dedup_batch, exact_key, DedupConfig, DedupVerdict, ExactDedup, MinHashParams, NearDupIndex,
};
use distill::filter::rules::{
    Field, Finding, RuleError, RuleInput, RuleSet, DEFAULT_RULES_PATH, DEFAULT_RULES_TOML,
};

fn default_rules() -> RuleSet {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_RULES_PATH);
    RuleSet::load_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn completion(text: &str) -> RuleInput<'_> {
    RuleInput {
        completion: text,
        finish_reason: Some("stop"),
        completion_tokens: Some(200),
        ..RuleInput::default()
    }
}

fn fired(findings: &[Finding]) -> Vec<&str> {
    findings.iter().map(|f| f.rule_id.as_str()).collect()
}

fn fires(rules: &RuleSet, id: &str, input: &RuleInput<'_>) -> Option<Finding> {
    rules
        .get(id)
        .unwrap_or_else(|| panic!("default rules lack `{id}`"))
        .evaluate(input)
}

/// A long, step-by-step solution with many similar sentences but no loop.
fn long_math_solution() -> String {
    let mut s = String::from(
        "We need the total cost of the items bought over the month. Let the running total be T.\n",
    );
    let mut total = 0u64;
    for day in 1..=150u64 {
        let price = (day * 37) % 91 + 3;
        let qty = (day * 13) % 7 + 1;
        total += price * qty;
        s.push_str(&format!(
            "Day {day}: she buys {qty} items at {price} dollars each, costing {} dollars, so T = {total}.\n",
            price * qty
        ));
    }
    s.push_str(&format!("Therefore the total is \\boxed{{{total}}}.\n"));
    s
}

fn write_temp(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap_or_else(|e| panic!("{e}"));
    path
}

// ---------------------------------------------------------------------------------------------
// Rule files
// ---------------------------------------------------------------------------------------------

#[test]
fn default_rule_file_loads_and_every_rule_has_examples() {
    let rules = default_rules();
    let embedded = RuleSet::builtin_default().unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<&str> = rules.rules().iter().map(|r| r.id()).collect();
    let embedded_ids: Vec<&str> = embedded.rules().iter().map(|r| r.id()).collect();
    assert_eq!(ids, embedded_ids);
    for expected in [
        "truncated",
        "think_well_formed",
        "final_answer",
        "refusal",
        "repetition",
        "mixed_script",
        "length",
    ] {
        assert!(ids.contains(&expected), "missing default rule {expected}");
    }

    // Loading checks the examples; make sure none of the rules relies on having none.
    let doc: toml::Table = toml::from_str(DEFAULT_RULES_TOML).unwrap_or_else(|e| panic!("{e}"));
    let list = doc
        .get("rule")
        .and_then(|r| r.as_array())
        .unwrap_or_else(|| panic!("no rules"));
    for rule in list {
        let id = rule.get("id").and_then(|v| v.as_str()).unwrap_or("?");
        let examples = rule
            .get("examples")
            .unwrap_or_else(|| panic!("{id}: no examples"));
        for key in ["match", "no_match"] {
            let n = examples
                .get(key)
                .and_then(|v| v.as_array())
                .map_or(0, Vec::len);
            assert!(n > 0, "rule {id} has no `{key}` examples");
        }
    }
}

#[test]
fn a_clean_trace_passes_every_default_rule() {
    let rules = default_rules();
    let text = "<think>48 / 2 = 24 clips in May, and 48 + 24 = 72 in total.</think>\n\
                Natalia sold 48 clips in April and 24 in May, so the answer is \\boxed{72}.";
    let findings = rules.evaluate(&completion(text));
    assert!(findings.is_empty(), "{findings:?}");
}

#[test]
fn load_dir_reads_all_files_in_name_order() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let rule = |id: &str| {
        format!(
            "[[rule]]\nid = \"{id}\"\ndescription = \"d\"\npattern = \"x\"\naction = \"reject_if_match\"\n"
        )
    };
    write_temp(dir.path(), "b.toml", &rule("second"));
    write_temp(dir.path(), "a.toml", &rule("first"));
    write_temp(dir.path(), "notes.txt", "not a rule file");
    let set = RuleSet::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<&str> = set.rules().iter().map(|r| r.id()).collect();
    assert_eq!(ids, ["first", "second"]);

    write_temp(dir.path(), "c.toml", &rule("first"));
    let err = RuleSet::load_dir(dir.path()).expect_err("duplicate id");
    assert!(err.to_string().contains("duplicate rule id"), "{err}");
    assert_eq!(err.rule(), Some("first"));
    assert!(err.file().ends_with("c.toml"));
}

#[test]
fn bad_regex_error_names_file_line_and_rule() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = write_temp(
        dir.path(),
        "bad_regex.toml",
        r#"# a comment
[[rule]]
id = "fine"
description = "ok"
pattern = 'ok'
action = "reject_if_match"

[[rule]]
id = "broken"
description = "unclosed group"
action = "reject_if_match"
pattern = '(abc'
"#,
    );
    let err = RuleSet::load_file(&path).expect_err("bad regex must fail");
    assert!(matches!(err, RuleError::Regex { .. }), "{err:?}");
    assert_eq!(err.file(), path.as_path());
    assert_eq!(err.line(), Some(12));
    assert_eq!(err.rule(), Some("broken"));
    let msg = err.to_string();
    assert!(msg.contains("bad_regex.toml:12:"), "{msg}");
    assert!(msg.contains("`broken`"), "{msg}");
}

#[test]
fn failing_example_error_names_file_line_and_rule() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = write_temp(
        dir.path(),
        "bad_example.toml",
        r#"[[rule]]
id = "needs_answer"
description = "must say the answer"
action = "require_match"
pattern = '(?i)the answer is'
examples.match = [
    "The answer is 4.",
    "I give up.",
]
"#,
    );
    let err = RuleSet::load_file(&path).expect_err("failing example must fail");
    assert!(matches!(err, RuleError::Example { .. }), "{err:?}");
    assert_eq!(err.line(), Some(8));
    assert_eq!(err.rule(), Some("needs_answer"));
    let msg = err.to_string();
    assert!(msg.contains("bad_example.toml:8:"), "{msg}");
    assert!(msg.contains("I give up."), "{msg}");

    // Built-in kinds check their examples with the built-in evaluator.
    let path = write_temp(
        dir.path(),
        "bad_builtin.toml",
        r#"[[rule]]
id = "trunc"
description = "d"
kind = "truncated"
examples.no_match = [{ completion = "abc", finish_reason = "length" }]
"#,
    );
    let err = RuleSet::load_file(&path).expect_err("failing built-in example must fail");
    assert_eq!((err.line(), err.rule()), (Some(5), Some("trunc")), "{err}");
}

#[test]
fn unknown_keys_and_misplaced_parameters_are_errors() {
    let src = "[[rule]]\nid = \"r\"\ndescription = \"d\"\npattern = \"x\"\naction = \"reject_if_match\"\nexampels.match = [\"x\"]\n";
    let err = RuleSet::from_toml_str(src, "f.toml").expect_err("unknown key");
    assert!(matches!(err, RuleError::Parse { .. }), "{err:?}");
    assert_eq!((err.line(), err.rule()), (Some(6), Some("r")), "{err}");
    assert!(err.to_string().contains("exampels"), "{err}");

    let src = "[[rule]]\nid = \"r\"\ndescription = \"d\"\nkind = \"truncated\"\naction = \"reject_if_match\"\n";
    let err = RuleSet::from_toml_str(src, "f.toml").expect_err("action on a built-in");
    assert_eq!((err.line(), err.rule()), (Some(5), Some("r")), "{err}");

    let src = "[[rule]]\nid = \"r\"\ndescription = \"d\"\nkind = \"truncated\"\nexamples.match = [\n  { completion = \"a\", finish_reasn = \"length\" },\n]\n";
    let err = RuleSet::from_toml_str(src, "f.toml").expect_err("misspelt example key");
    assert_eq!((err.line(), err.rule()), (Some(6), Some("r")), "{err}");
    assert!(err.to_string().contains("finish_reasn"), "{err}");

    let src = "[[rule]]\nid = \"r\"\ndescription = \"d\"\nkind = \"no_such_kind\"\n";
    let err = RuleSet::from_toml_str(src, "f.toml").expect_err("unknown kind");
    assert_eq!(err.line(), Some(4), "{err}");
}

#[test]
fn regex_finding_reports_span_and_text() {
    let rules = default_rules();
    let text = "Sure. I'm sorry, but I can't help with that.";
    let f = fires(&rules, "refusal", &completion(text)).unwrap_or_else(|| panic!("refusal"));
    assert_eq!(f.field, Field::Completion);
    let span = f.evidence.span.clone().unwrap_or_else(|| panic!("span"));
    assert_eq!(&text[span], f.evidence.text);
    assert!(f.evidence.text.starts_with("I'm sorry, but I can"));
}

// ---------------------------------------------------------------------------------------------
// Built-in checks through the default rules
// ---------------------------------------------------------------------------------------------

#[test]
fn refusal_rule() {
    let rules = default_rules();
    for t in [
        "I'm sorry, but I can't assist with that.",
        "As an AI language model, I cannot solve homework.",
        "I cannot help with that request.",
    ] {
        assert!(fires(&rules, "refusal", &completion(t)).is_some(), "{t}");
    }
    for t in [
        "The answer is \\boxed{5}.",
        "I'm sorry for the confusion above; recomputing, 3 + 4 = 7.",
    ] {
        assert!(fires(&rules, "refusal", &completion(t)).is_none(), "{t}");
    }
}

#[test]
fn think_well_formed_rule() {
    let rules = default_rules();
    let bad = [
        ("<think>I need to add 2 and 2", "never closed"),
        (
            "<think>a</think>\n<think>b</think> The answer is 4.",
            "more than one block",
        ),
        ("</think> The answer is 4. <think>", "before the opening"),
        ("<think>a <think>b</think> c</think>", "nested"),
    ];
    for (text, why) in bad {
        let f = fires(&rules, "think_well_formed", &completion(text))
            .unwrap_or_else(|| panic!("should fire: {text}"));
        assert!(f.evidence.note.contains(why), "{text}: {}", f.evidence.note);
        assert!(f.evidence.text.contains("think>"), "{f:?}");
    }
    for text in ["<think>2+2=4</think> The answer is 4.", "The answer is 4."] {
        assert!(fires(&rules, "think_well_formed", &completion(text)).is_none());
    }
}

#[test]
fn final_answer_rule() {
    let rules = default_rules();
    assert!(fires(&rules, "final_answer", &completion("so x = \\boxed{3}")).is_none());
    assert!(fires(&rules, "final_answer", &completion("3 + 4 = 7\n#### 7")).is_none());
    let f = fires(
        &rules,
        "final_answer",
        &completion("Let me think about it more"),
    )
    .unwrap_or_else(|| panic!("no answer must fire"));
    assert!(f.evidence.note.contains("not found"));
}

#[test]
fn truncated_rule() {
    let rules = default_rules();
    let input = RuleInput {
        completion: "<think>We have 3 apples and",
        finish_reason: Some("length"),
        ..RuleInput::default()
    };
    let f = fires(&rules, "truncated", &input).unwrap_or_else(|| panic!("truncated"));
    assert!(f.evidence.note.contains("length"));
    assert_eq!(f.evidence.text, "<think>We have 3 apples and");
    assert!(fires(&rules, "truncated", &completion("done")).is_none());
    let no_reason = RuleInput {
        completion: "done",
        ..RuleInput::default()
    };
    assert!(fires(&rules, "truncated", &no_reason).is_none());
}

#[test]
fn length_rule_uses_usage_or_estimate() {
    let rules = default_rules();
    let short = RuleInput {
        completion: "It is 4, because two plus two is four.",
        completion_tokens: Some(5),
        ..RuleInput::default()
    };
    let f = fires(&rules, "length", &short).unwrap_or_else(|| panic!("too short"));
    assert!(
        f.evidence.note.contains("usage.completion_tokens"),
        "{}",
        f.evidence.note
    );
    assert!(
        f.evidence.note.contains("min_tokens = 16"),
        "{}",
        f.evidence.note
    );

    let estimated = RuleInput {
        completion: "Four.",
        ..RuleInput::default()
    };
    let f = fires(&rules, "length", &estimated).unwrap_or_else(|| panic!("too short"));
    assert!(f.evidence.note.contains("estimated"), "{}", f.evidence.note);

    let long = RuleInput {
        completion: "x",
        completion_tokens: Some(50_000),
        ..RuleInput::default()
    };
    let f = fires(&rules, "length", &long).unwrap_or_else(|| panic!("too long"));
    assert!(
        f.evidence.note.contains("max_tokens"),
        "{}",
        f.evidence.note
    );

    let solution = long_math_solution();
    assert!(fires(&rules, "length", &completion(&solution)).is_none());
}

#[test]
fn mixed_script_rule() {
    let rules = default_rules();
    let text =
        "First we add the numbers: 3 + 4 = 7. 然后我们 multiply by 2 to get 14. The answer is 14.";
    let f = fires(&rules, "mixed_script", &completion(text)).unwrap_or_else(|| panic!("cjk"));
    assert_eq!(f.evidence.text, "然后我们");
    assert!(f.evidence.note.contains("han"), "{}", f.evidence.note);

    let cyr = "The triangle has sides 3, 4 and 5, поэтому its area is 6.";
    assert!(fires(&rules, "mixed_script", &completion(cyr)).is_some());

    let garbage = "The answer is \u{FFFD}\u{FFFD}.";
    let f = fires(&rules, "mixed_script", &completion(garbage)).unwrap_or_else(|| panic!("fffd"));
    assert!(f.evidence.note.contains("U+FFFD"));

    let maths =
        "Let α, β ∈ ℝ with α + β = π. Then sin α = sin β, so the answer is 0. Café résumé naïve.";
    assert!(fires(&rules, "mixed_script", &completion(maths)).is_none());
    let solution = long_math_solution();
    assert!(fires(&rules, "mixed_script", &completion(&solution)).is_none());
}

#[test]
fn repetition_catches_a_looping_paragraph() {
    let rules = default_rules();
    let paragraph = "Hmm, wait. Let me check the second case again: if x is 3 then y must be 5, \
                     because the sum of x and y is 8 and their difference is 2. ";
    let text = format!(
        "We solve the system x + y = 8, x - y = 2 by substitution. {}",
        paragraph.repeat(8)
    );
    let f = fires(&rules, "repetition", &completion(&text)).unwrap_or_else(|| panic!("loop"));
    let span = f.evidence.span.clone().unwrap_or_else(|| panic!("span"));
    assert!(
        text[span.clone()].starts_with("Hmm, wait."),
        "{}",
        &text[span.clone()]
    );
    assert!(
        span.end > text.len() - paragraph.len(),
        "the span should reach the last copy"
    );
    assert!(f.evidence.note.contains("occurs"), "{}", f.evidence.note);

    // A paragraph written out twice is caught by coverage, not by count.
    let twice = format!("{paragraph}{paragraph}");
    assert!(fires(&rules, "repetition", &completion(&twice)).is_some());
}

#[test]
fn repetition_ignores_a_normal_long_solution() {
    let rules = default_rules();
    let solution = long_math_solution();
    assert!(solution.split_whitespace().count() > 2000);
    assert!(fires(&rules, "repetition", &completion(&solution)).is_none());
    assert!(
        rules.evaluate(&completion(&solution)).is_empty(),
        "{:?}",
        fired(&rules.evaluate(&completion(&solution)))
    );
}

#[test]
fn repetition_is_fast_on_200_kb() {
    let params = RepetitionParams {
        max_coverage: Some(0.5),
        ..RepetitionParams::default()
    };
    let mut normal = long_math_solution();
    while normal.len() < 200_000 {
        let n = normal.len();
        normal.push_str(&format!(
            "Extra line {n}: the partial sum {} is carried forward.\n",
            n * 7
        ));
    }
    let looping = "the same words again and again forever ".repeat(200_000 / 39 + 1);
    for text in [&normal, &looping] {
        let start = Instant::now();
        let hit = find_repetition(text, &params);
        let took = start.elapsed();
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert_eq!(hit.is_some(), std::ptr::eq(text, &looping));
    }
    let rules = default_rules();
    let start = Instant::now();
    let findings = rules.evaluate(&completion(&looping));
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(fired(&findings).contains(&"repetition"));
}

// ---------------------------------------------------------------------------------------------
// Dedup
// ---------------------------------------------------------------------------------------------

const PASSAGE: &str = "Janet has twelve apples and buys five more at the market on Monday. \
    She gives three apples to her neighbour and eats two of them during the afternoon walk. \
    On Tuesday she buys twice as many apples as she has left, and then she bakes a pie \
    that needs six apples. To count what remains we first compute twelve plus five, which \
    is seventeen, then subtract the three given away and the two eaten, leaving twelve. \
    Doubling the purchase on Tuesday adds twenty four apples for a total of thirty six. \
    The pie uses six, so Janet finishes the week with thirty apples in her kitchen basket.";

const TRAINS: &str = "A train leaves the station at nine in the morning travelling at sixty \
    kilometres per hour, and a second train leaves an hour later at eighty kilometres per \
    hour on a parallel track. We want to know when the second train catches up with the \
    first one, so we compare the distances covered as functions of time since nine.";

#[test]
fn exact_dedup_ignores_case_space_and_punctuation() {
    let mut d = ExactDedup::new();
    assert_eq!(d.check_and_insert("a", "The answer is 4."), None);
    assert_eq!(
        d.check_and_insert("b", "the   ANSWER is 4"),
        Some("a".to_string())
    );
    assert_eq!(d.check_and_insert("c", "The answer is 5."), None);
    assert_eq!(
        d.check_and_insert("d", "the answer, is: 5!"),
        Some("c".to_string())
    );
    assert_eq!(exact_key("x y"), exact_key("X\n\ty"));
}

#[test]
fn near_dup_catches_paraphrase_not_unrelated() {
    let params = MinHashParams::with_threshold(0.7).unwrap_or_else(|e| panic!("{e}"));
    let mut index = NearDupIndex::new(params).unwrap_or_else(|e| panic!("{e}"));
    let paraphrase = PASSAGE
        .replace("neighbour", "friend")
        .replace("kitchen basket", "fruit bowl")
        .replace("Monday", "Sunday");
    let unrelated = TRAINS;
    assert!(index.check_and_insert("orig", PASSAGE).is_none());
    assert!(index.check_and_insert("other", unrelated).is_none());
    let hit = index
        .check_and_insert("para", &paraphrase)
        .unwrap_or_else(|| panic!("paraphrase should be a near-duplicate"));
    assert_eq!(hit.of, "orig");
    assert!(
        hit.similarity >= 0.7 && hit.similarity < 1.0,
        "{}",
        hit.similarity
    );
    assert_eq!(index.len(), 2);
}

fn corpus() -> Vec<(String, String)> {
    let mut docs = Vec::new();
    for i in 0..300 {
        let text = match i % 5 {
            0 => PASSAGE.replace("twelve apples", &format!("{} apples", i)),
            1 => format!(
                "Problem {i}: {}",
                long_math_solution().lines().nth(i % 100 + 1).unwrap_or("")
            ),
            2 if i % 2 == 0 => TRAINS.to_uppercase(),
            2 => TRAINS.replace(',', " ;"),
            3 => format!("{i} {} {}", i * 31, i * 17 % 13),
            _ => format!("unique document {i}: {}", "word ".repeat(i % 7 + 1)),
        };
        docs.push((format!("doc-{i}"), text));
    }
    docs
}

#[test]
fn dedup_batch_is_deterministic_across_runs_and_threads() {
    let docs = corpus();
    let config = DedupConfig {
        exact: true,
        near: Some(MinHashParams::with_threshold(0.7).unwrap_or_else(|e| panic!("{e}"))),
    };
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
            .install(|| dedup_batch(&docs, &config).unwrap_or_else(|e| panic!("{e}")))
    };
    let one = run(1);
    assert_eq!(one, run(1));
    assert_eq!(one, run(4));
    // Copies point at kept documents only, and at the earliest one.
    assert!(one[0].is_unique());
    assert_eq!(one[2], DedupVerdict::Unique);
    assert_eq!(
        one[7],
        DedupVerdict::Exact {
            of: "doc-2".to_string()
        }
    );
    match &one[5] {
        DedupVerdict::Near { of, similarity } => {
            assert_eq!(of, "doc-0");
            assert!(*similarity >= 0.7);
        }
        other => panic!("doc-5 should be a near-duplicate of doc-0, got {other:?}"),
    }
    for v in &one {
        if let DedupVerdict::Exact { of } | DedupVerdict::Near { of, .. } = v {
            let i: usize = of.trim_start_matches("doc-").parse().unwrap_or(usize::MAX);
            assert!(one[i].is_unique(), "{of} is not a kept document");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decontamination
// ---------------------------------------------------------------------------------------------

const EVAL_Q: &str = "Natalia sold clips to 48 of her friends in April, and then she sold half as \
    many clips in May. How many clips did Natalia sell altogether in April and May?";

#[test]
fn decontam_flags_a_shared_13_gram() {
    let index = EvalIndex::build(
        DecontamParams::default(),
        [("gsm8k-test-0", EVAL_Q), ("gsm8k-test-1", "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // 13 consecutive words of the eval question, differently cased and punctuated.
    let prompt = "Solve this: NATALIA sold clips to 48 of her friends in April; and then she sold \
                  some pencils. Show your work.";
    let hit = index
        .find(prompt)
        .unwrap_or_else(|| panic!("13-gram should match"));
    assert_eq!(hit.eval_id, "gsm8k-test-0");
    assert_eq!(
        hit.ngram,
        "natalia sold clips to 48 of her friends in april and then she"
    );
    assert_eq!(&prompt[hit.span.clone()], hit.text);
    assert!(
        hit.text.starts_with("NATALIA") && hit.text.ends_with("she"),
        "{}",
        hit.text
    );

    let via_trace = index
        .check_trace("What is 2 + 2?", Some(prompt))
        .unwrap_or_else(|| panic!("completion should match"));
    assert_eq!(via_trace.source, TextSource::Completion);
}

#[test]
fn decontam_ignores_12_shared_words() {
    let index = EvalIndex::build(DecontamParams::default(), [("q", EVAL_Q)])
        .unwrap_or_else(|e| panic!("{e}"));
    let prompt = "Solve this: Natalia sold clips to 48 of her friends in April and then, \
                  unrelated, went home.";
    assert!(index.find(prompt).is_none());
    assert!(index.check_trace(prompt, None).is_none());
    assert_eq!(index.num_items(), 1);
}
