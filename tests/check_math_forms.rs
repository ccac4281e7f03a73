//! One test per answer form that reasoning models write, each asserting exact verdicts for
//! equal pairs and for near-miss pairs that must stay unequal (so a checker that accepts
//! everything fails every test here).

use distill::check::math::{check, MathOptions, Verdict};

use Verdict::{Correct, Incorrect, UnparseablePred};

fn assert_verdicts(cases: &[(&str, &str, Verdict)]) {
    let mut wrong = Vec::new();
    for &(gold, pred, want) in cases {
        let out = check(gold, pred, &MathOptions::default());
        if out.verdict != want {
            wrong.push(format!(
                "gold {gold:?} pred {pred:?}: want {want:?}, got {:?} ({:?}, {:?} vs {:?})",
                out.verdict, out.rule, out.gold_normal, out.pred_normal
            ));
        }
    }
    let negatives = cases.iter().filter(|c| c.2 != Correct).count();
    assert!(negatives >= 3, "each form needs unequal pairs too");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn relations_and_inequalities() {
    assert_verdicts(&[
        (
            "$x >= 5$",
            r"Therefore $x \geq 5$ is the solution.",
            Correct,
        ),
        ("$x < 3$", r"We find that $x \lt 3$.", Correct),
        (r"$x \leq 2$", "Thus $x <= 2$ is our answer.", Correct),
        ("$x > 5$", r"Therefore $x \gt 5$ is the solution.", Correct),
        ("$x != 3$", r"We find that $x \neq 3$.", Correct),
        (r"x \ne 3", "x != 3", Correct),
        ("x < 1", "-x > -1", Correct),
        (r"x \le 1", r"-x \ge -1", Correct),
        (r"2x \le 6", r"x \le 3", Correct),
        ("(0,1)", "0 < f(x) < 1", Correct),
        ("-793 < a < 10", "(-793, 10)", Correct),
        (
            r"1 \leq |z| \leq \frac32",
            r"z \in \left[-\frac{3}{2}, -1\right] \cup \left[1, \frac{3}{2}\right]",
            Correct,
        ),
        (r"[-2, 7]", r"-2 \le x \le 7", Correct),
        ("x >= 5", "x > 5", Incorrect),
        ("x < 1", "-x < -1", Incorrect),
        ("x < 1", "x > 1", Incorrect),
        ("(0,1)", r"0 < x \le 1", Incorrect),
        (r"1 \leq |z| \leq 2", "[1, 2]", Incorrect),
        (r"x \neq 3", "x = 3", Incorrect),
        ("-793 < a < 10", "(-793, 11)", Incorrect),
        (
            r"(-\infty, -2) \cup (2, \infty)",
            r"\boxed{x < -2 \text{ or } x > 2}",
            Correct,
        ),
        (
            r"(-\infty, -2) \cup (2, \infty)",
            r"\boxed{|x| > 2}",
            Correct,
        ),
        (r"(-3, 3)", r"\boxed{|x| < 3}", Correct),
        (r"(2, \infty)", r"\boxed{|x| > 2}", Incorrect),
        (r"[-3, 3]", r"\boxed{|x| < 3}", Incorrect),
        (
            r"(-\infty, -2) \cup (2, \infty)",
            r"\boxed{x < -2 \text{ or } x > 3}",
            Incorrect,
        ),
    ]);
}

#[test]
fn matrices_and_vectors() {
    let m = r"\begin{pmatrix}1 & 2 \\ 3 & 4\end{pmatrix}";
    assert_verdicts(&[
        (m, r"\begin{bmatrix}1 & 2 \\ 3 & 4\end{bmatrix}", Correct),
        (
            m,
            r"Special matrix: $ \left[\begin{array}{cc}1 & 2 \\3 & 4\end{array}\right] $",
            Correct,
        ),
        (
            r"\begin{pmatrix} \frac{1}{2} & \sqrt{2} \\ \sin(0) & 1 \end{pmatrix}",
            r"\begin{pmatrix} 0.5 & \sqrt 2 \\ 0 & 1 \\ \end{pmatrix}",
            Correct,
        ),
        (r"\begin{pmatrix} 1 \\ -2 \end{pmatrix}", "(1, -2)", Correct),
        (
            r"\begin{pmatrix}6 & 8 \\ 10 & 12\end{pmatrix}",
            r"The sum is $\begin{pmatrix}1 & 2 \\ 3 & 4\end{pmatrix} + \begin{pmatrix}5 & 6 \\ 7 & 8\end{pmatrix}$",
            Correct,
        ),
        (m, r"\begin{pmatrix}1 & 3 \\ 2 & 4\end{pmatrix}", Incorrect),
        (m, r"\begin{pmatrix}1 & 2 & 3 & 4\end{pmatrix}", Incorrect),
        (m, r"\begin{pmatrix}1 & 2 \\ 3 & 5\end{pmatrix}", Incorrect),
        (m, "10", Incorrect),
        (
            r"\begin{pmatrix} 1 \\ -2 \end{pmatrix}",
            "(-2, 1)",
            Incorrect,
        ),
    ]);
}

#[test]
fn several_final_answers() {
    assert_verdicts(&[
        ("1, 2", r"\boxed{1}, \boxed{2}", Correct),
        (
            "$$(2, 2), (6, 2)$$",
            r"$$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}$$",
            Correct,
        ),
        (
            r"\(\boxed{1}\) and \(\boxed{-2}\).",
            r"$\boxed{-2,1}$.",
            Correct,
        ),
        (
            "$$(5, 8), (8, 5)$$",
            r"$$\boxed{(x, y) = (5, 8) \quad \text{and} \quad (8, 5)}$$",
            Correct,
        ),
        ("3, 5", r"So $x = \boxed{3}$ or $x = \boxed{5}$.", Correct),
        (
            "$${1,2,3}$$",
            r"\boxed{1} and \boxed{2} and \boxed{3}",
            Correct,
        ),
        (
            "5",
            r"First we get \boxed{3}. Checking the cases again shows the count is \boxed{5}",
            Correct,
        ),
        ("-2", r"\boxed{-2} \text{ and } \boxed{-2}", Correct),
        ("2, 3", "The solutions are $x = 2$ and $x = 3$.", Correct),
        ("2, 3", "The answer is $2$ and $3$.", Correct),
        ("2, 3", "The answer is $2$ and $4$.", Incorrect),
        ("3", "We get $x = 2$. Then $x = 3$.", Correct),
        (
            r"$\{1\pm\sqrt{5},-2\}$",
            r"\boxed{\{-2, 1-\sqrt5, 1+\sqrt 5\}}",
            Correct,
        ),
        (
            r"$\{1\pm\sqrt{5},-2\}$",
            r"\boxed{\{-2, 1+\sqrt 5\}}",
            Incorrect,
        ),
        ("1, 2", r"\boxed{1}, \boxed{3}", Incorrect),
        ("1, 2", r"\boxed{1} no no no no no \boxed{2}", Incorrect),
        ("1, 2, 3", r"\boxed{1} and \boxed{2}", Incorrect),
        (
            "$$(2, 2), (6, 2)$$",
            r"$$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(2, 6)}$$",
            Incorrect,
        ),
    ]);
}

#[test]
fn labelled_answers() {
    assert_verdicts(&[
        ("$(p,q)=(3,2)$", "$(3,2)$", Correct),
        ("45, 2", "k = 45, n = 2", Correct),
        ("$p=5,q=2;p=7,q=2$", "$(5,2),(7,2)$", Correct),
        ("$AB=4,CD=5$", r"$\boxed{4, 5}$", Correct),
        ("$$|AB|=1$$", "$$1$$", Correct),
        ("$$f(x)=1$$", "$$1$$", Correct),
        ("$V_{1}:V_{2}=11:21$", "$11:21$", Correct),
        ("$x = 11$", "$x = 5+5+1 = 7 =11$", Correct),
        ("$1/3$", r"$x=1/3\approx0.33$", Correct),
        (
            r"\frac{NO}{BO}=\frac{1}{\sqrt{6}}",
            r"\frac{\sqrt{6}}{6}",
            Correct,
        ),
        (
            r"f^{-1}(x) = \frac{x-3}{2}",
            r"\boxed{\frac{x-3}{2}}",
            Correct,
        ),
        ("f'(x) = 2x", r"\boxed{2x}", Correct),
        ("f'(x) = 2x", r"\boxed{x^2}", Incorrect),
        ("$(p,q)=(3,2)$", "$(2,3)$", Incorrect),
        ("$2x + z = 1$", "$1$", Incorrect),
        ("$V_{1}:V_{2}=11:21$", "$21:11$", Incorrect),
        ("$x = 12$", "$x = 5+5+1 = 7 =11$", Incorrect),
        ("$p=5,q=2;p=7,q=2$", "$(5,2),(7,3)$", Incorrect),
        ("k = 45, n = 2", "k = 2, n = 45", Incorrect),
        ("$AB=4,CD=5$", r"$\boxed{4, 6}$", Incorrect),
    ]);
}

#[test]
fn equations_up_to_rearrangement_and_factor() {
    assert_verdicts(&[
        ("$2x+4y-3=0$", r"$y=-\frac{1}{2}x+\frac{3}{4}$", Correct),
        ("$x^2/4 + y^2/3 = 1$", "$x^2/16 + y^2/12 = 1/4$", Correct),
        ("$34x+45y-20z+100=0$", "$-34x-45y+20z-100=0$", Correct),
        ("y = 2x + 1", "2x - y + 1 = 0", Correct),
        ("$z = 1 + 1 = 2$", "$z = 3+3 = 2$", Correct),
        ("$2x+4y-3=0$", r"$y=-\frac{1}{2}x+\frac{3}{2}$", Incorrect),
        ("$x^2/4 + y^2/3 = 1$", "$x^2/3 + y^2/4 = 1$", Incorrect),
        ("y = 2x + 1", "y = 2x - 1", Incorrect),
        ("x + y + z = 1", "x + y - z = 1", Incorrect),
    ]);
}

#[test]
fn number_formats() {
    assert_verdicts(&[
        ("11111100", r"11,\! 111,\! 100", Correct),
        (
            r"\boxed{11111111100}",
            r"is $\boxed{11,\! 111,\! 111,\! 100}$",
            Correct,
        ),
        ("1000", "1 000", Correct),
        ("1000", "1\u{2009}000", Correct),
        ("32349", "32{,}349", Correct),
        ("1000", r"1\,000", Correct),
        ("1000.99", "1000,99", Correct),
        ("0.111", "0,111", Correct),
        ("1222", "1,222", Correct),
        ("1000.99", "$1,000.99", Correct),
        ("2.74", "Soucis : 2,74 € a..", Correct),
        (
            "1000.99",
            "the number is not 10 which is 1,000.99€",
            Correct,
        ),
        ("25", "25 dollars", Correct),
        ("1000", "€1000", Correct),
        ("12.5", "The total is £12.50.", Correct),
        ("60", r"\boxed{60 \text{ km/h}}", Correct),
        ("60", r"\boxed{70 \text{ km/h}}", Incorrect),
        ("$204_5$", r"The answer is $\boxed{204_{5}}$.", Correct),
        ("$204_5$", r"\boxed{54}", Correct),
        ("$204_5$", r"\boxed{204}", Incorrect),
        ("1.222", "1,222", Incorrect),
        ("1000", "1 001", Incorrect),
        ("1000.99", "1000,98", Incorrect),
        ("2", "AZYUK2A", UnparseablePred),
    ]);
}

#[test]
fn answers_in_long_completions() {
    let ramble = "We set up the problem carefully.\n\nThen we check each case in turn, \
                  and the count follows from the cases above.\n\n";
    let n34 = format!("{ramble}Final Answer: The largest $n$ is 34.");
    let volume = format!(
        "{ramble}So the volume is $5 \\times 6 \\times 4 = 120$. Final Answer: The volume of \
         $ABCDEFGH$ is 120. I hope it is correct."
    );
    let pair = format!(
        "{ramble}So, the ordered pair $(x, y)$ that solves the system is $(7, 6)$. <|im_start|>user"
    );
    let restated = format!(
        "{ramble}The interest is $0.05 \\cdot 10,200 \\cdot \\frac{{1}}{{2}} = \\boxed{{255}}$ so \
         the total is $10,200 + 255 = 10,455$. Final Answer: The final answer is $10,455$. I hope \
         it is correct."
    );
    let relation = format!("{ramble}Therefore $x \\geq 5$ is the solution.");
    let last_line = format!("{ramble}The solution is −2 ≤ x ≤ 7.");
    let restated_box = format!(
        "{ramble}$\\boxed{{\\frac{{1}}{{2}}}}$.\n\nWait, let me double check: the answer is indeed \
         $\\frac{{1}}{{2}}$."
    );
    assert_verdicts(&[
        ("34", &n34, Correct),
        ("120", &volume, Correct),
        ("$(7,6)$", &pair, Correct),
        ("10455", &restated, Correct),
        ("x >= 5", &relation, Correct),
        ("35", &n34, Incorrect),
        ("$(6,7)$", &pair, Incorrect),
        ("255", &restated, Incorrect),
        ("x > 5", &relation, Incorrect),
        ("[-2, 7]", &last_line, Correct),
        ("5", r"\boxed{\text{The answer is } 5}", Correct),
        ("6", r"\boxed{\text{The answer is } 5}", Incorrect),
        (
            r"\frac{1}{2}",
            r"\boxed{\frac{1}{2} \text{ or } 0.5}",
            Correct,
        ),
        (
            r"\frac{1}{3}",
            r"\boxed{\frac{1}{2} \text{ or } 0.5}",
            Incorrect,
        ),
        ("[-2, 6]", &last_line, Incorrect),
        (r"\frac{1}{2}", &restated_box, Correct),
        (r"\frac{1}{3}", &restated_box, Incorrect),
    ]);
}

#[test]
fn dataset_oddities() {
    assert_verdicts(&[
        (r"\\frac{1}{2}", "0.5", Correct),
        (
            r"$\\left(\\frac{1}{5},\\frac{1}{6}\\right)$",
            r"Thus, $(p,q) = \boxed{\left( \frac{1}{5}, \frac{1}{6} \right)}.$",
            Correct,
        ),
        (
            r"\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}",
            r"\begin{pmatrix}1 & 2 \\ 3 & 4\end{pmatrix}",
            Correct,
        ),
        ("$12:00$", "$12:00$", Correct),
        (r"\text{even}", "Even", Correct),
        (r"\\frac{1}{2}", "0.25", Incorrect),
        (
            r"$\\left(\\frac{1}{5},\\frac{1}{6}\\right)$",
            r"$\left(\frac{1}{6},\frac{1}{5}\right)$",
            Incorrect,
        ),
        ("$12:00$", "$1:00$", Incorrect),
        (r"\text{even}", "odd", Incorrect),
    ]);
}

#[test]
fn pathological_answer_forms_return_quickly() {
    use std::time::{Duration, Instant};
    let opts = MathOptions {
        budget_ms: 200,
        ..MathOptions::default()
    };
    let m = r"\begin{pmatrix}1 & 1 \\ 1 & 0\end{pmatrix}";
    let cases = [
        ("1".to_string(), "\\boxed{".repeat(20_000)),
        (
            "1".to_string(),
            format!("\\boxed{{1}} {}", "\\boxed{1".repeat(5_000)),
        ),
        ("1, 2".to_string(), "\\boxed{1}, ".repeat(3_000)),
        (m.to_string(), vec![m; 60].join(" ")),
        ("x".to_string(), vec!["x"; 400].join(" = ")),
        ("1".to_string(), "$1$ and ".repeat(5_000)),
        ("1".to_string(), "$$ ".repeat(10_000)),
        ("(0,1)".to_string(), format!("0 < {} < 1", "|".repeat(500))),
    ];
    for (gold, pred) in &cases {
        let start = Instant::now();
        let out = check(gold, pred, &opts);
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(1_500),
            "{} took {took:?}: {:?}",
            &pred[..40.min(pred.len())],
            out.verdict
        );
    }
}
