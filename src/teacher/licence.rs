//! The teacher's licence: read from the model, carried into every trace, checked for terms
//! that restrict training on the model's outputs.
//!
//! Not all models can be distilled: some licences make a model trained on their outputs a
//! derivative bound by the same terms (Gemma), attach conditions (Llama), or forbid using the
//! outputs to build competing models (several hosted APIs). The tool cannot decide what is
//! allowed, but it can make sure the user sees the terms before spending hours on a dataset,
//! and that the licence travels with the data and the student.

use std::path::Path;

/// The licence named by a model: GGUF `general.license`, or a Hugging Face directory's
/// `config.json` (`license`) or model card front matter (`license:` in `README.md`).
pub fn detect(model: &Path) -> Option<String> {
    if model.is_file() {
        let mut f = std::fs::File::open(model).ok()?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).ok()?;
        let v = content.metadata.get("general.license")?;
        return v.to_string().ok().cloned();
    }
    if model.is_dir() {
        if let Ok(text) = std::fs::read_to_string(model.join("config.json")) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(l) = v.get("license").and_then(|l| l.as_str()) {
                    return Some(l.to_string());
                }
            }
        }
        if let Ok(card) = std::fs::read_to_string(model.join("README.md")) {
            let mut lines = card.lines();
            if lines.next().map(str::trim) == Some("---") {
                for l in lines.take_while(|l| l.trim() != "---") {
                    if let Some(rest) = l.trim().strip_prefix("license:") {
                        let lic = rest.trim().trim_matches('"').to_string();
                        if !lic.is_empty() {
                            return Some(lic);
                        }
                    }
                }
            }
        }
    }
    None
}

/// What a licence says about training on the model's outputs, when it says something; `None`
/// for licences known to be permissive or not recognised.
pub fn restriction(licence: &str) -> Option<&'static str> {
    let l = licence.to_ascii_lowercase();
    if l.contains("gemma") {
        Some("Gemma's terms treat a model trained on Gemma's outputs as a Model Derivative, bound by the Gemma Terms of Use and its prohibited-use policy")
    } else if l.contains("llama") {
        Some("Llama licences attach conditions to models trained on Llama outputs (naming, attribution, acceptable-use policy; some versions restrict improving other models)")
    } else if l.contains("qwen") || l.contains("tongyi") {
        Some("the Qwen licence attaches conditions to derivative models (attribution, use-scale limits)")
    } else if l.contains("openai") || l.contains("anthropic") || l.contains("api terms") {
        Some("the provider's terms forbid using outputs to develop competing models")
    } else if l.contains("nc") && (l.contains("cc-by") || l.contains("cc by")) {
        Some("a non-commercial licence: the traces and the student inherit the restriction")
    } else if l.contains("other") || l.contains("proprietary") {
        Some("a custom licence: read its terms on training with model outputs")
    } else {
        None
    }
}

/// Prints the licence line at the start of a run that uses the teacher's outputs.
pub fn announce(licence: Option<&str>) {
    match licence {
        Some(l) => match restriction(l) {
            Some(why) => eprintln!(
                "distill: warning: teacher licence `{l}`: {why}. It is recorded in every trace and in the student's model card."
            ),
            None => eprintln!("distill: teacher licence `{l}` (recorded in every trace)"),
        },
        None => eprintln!(
            "distill: the teacher names no licence; pass --teacher-license to record it (some licences forbid training on model outputs)"
        ),
    }
}

/// A teacher whose identity carries its licence (the licence is part of what produced a trace).
pub struct Licensed {
    inner: std::sync::Arc<dyn super::Teacher>,
    info: crate::trace::TeacherInfo,
}

impl Licensed {
    /// Wraps `inner`, recording `licence` in its identity.
    pub fn new(inner: std::sync::Arc<dyn super::Teacher>, licence: Option<String>) -> Self {
        let mut info = inner.info().clone();
        info.license = licence;
        Self { inner, info }
    }
}

#[async_trait::async_trait]
impl super::Teacher for Licensed {
    fn info(&self) -> &crate::trace::TeacherInfo {
        &self.info
    }

    fn seed_honoured(&self) -> Option<bool> {
        self.inner.seed_honoured()
    }

    async fn generate(
        &self,
        req: &super::GenRequest,
    ) -> Result<super::GenOutput, super::GenFailure> {
        self.inner.generate(req).await
    }
}

/// Writes `README.md`, the student's model card, into `dir`: the teachers and their licences as
/// recorded in the training traces, with what each licence says about training on outputs.
/// `distill merge` copies it beside the merged weights, so the terms travel with the student.
pub fn write_model_card(dir: &Path, traces: &Path) -> std::io::Result<()> {
    let text = std::fs::read_to_string(traces)?;
    let mut teachers: std::collections::BTreeMap<String, Option<String>> = Default::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let t = &v["teacher"];
        if let Some(model) = t["model"].as_str() {
            let lic = t["license"].as_str().map(str::to_string);
            teachers.entry(model.to_string()).or_insert(lic);
        }
    }
    let mut card = String::from("---\nlibrary_name: peft\ntags: [distill, distillation, lora]\n");
    let licences: Vec<&str> = teachers.values().flatten().map(String::as_str).collect();
    if let [one] = licences.as_slice() {
        card.push_str(&format!("license: {one}\n"));
    }
    card.push_str("---\n\n# Distilled student\n\n");
    card.push_str(&format!(
        "LoRA adapter trained by distill {} on traces from `{}`.\n\n## Teachers and their licences\n\n",
        env!("CARGO_PKG_VERSION"),
        traces.display()
    ));
    if teachers.is_empty() {
        card.push_str("The training traces name no teacher.\n");
    }
    for (model, lic) in &teachers {
        match lic {
            Some(l) => {
                card.push_str(&format!("- `{model}`: licence `{l}`"));
                if let Some(why) = restriction(l) {
                    card.push_str(&format!(". {why}"));
                }
                card.push('\n');
            }
            None => card.push_str(&format!(
                "- `{model}`: no licence recorded; check its terms on training with model outputs\n"
            )),
        }
    }
    std::fs::write(dir.join("README.md"), card)
}

/// Adds to the model card in `dir` the teacher whose distribution or hidden states the
/// student was trained on (response and feature distillation), with its licence: a student
/// distilled from a model's soft labels is trained on that model's outputs as surely as one
/// trained on its traces.
pub fn add_distillation_teacher(dir: &Path, teacher: &Path, how: &str) -> std::io::Result<()> {
    let path = dir.join("README.md");
    let mut card = std::fs::read_to_string(&path).unwrap_or_default();
    card.push_str(&format!(
        "\n## Distilled from\n\n- `{}` ({how})",
        teacher.display()
    ));
    match detect(teacher) {
        Some(l) => {
            card.push_str(&format!(": licence `{l}`"));
            if let Some(why) = restriction(&l) {
                card.push_str(&format!(". {why}"));
            }
            card.push('\n');
        }
        None => {
            card.push_str(": no licence found; check its terms on training with model outputs\n")
        }
    }
    std::fs::write(path, card)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restrictive_licences_are_recognised() {
        assert!(restriction("gemma").is_some());
        assert!(restriction("llama3.2").is_some());
        assert!(restriction("cc-by-nc-4.0").is_some());
        assert!(restriction("apache-2.0").is_none());
        assert!(restriction("mit").is_none());
    }

    #[test]
    fn model_card_front_matter() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("README.md"),
            "---\nlibrary_name: transformers\nlicense: apache-2.0\n---\n# Model\n",
        )
        .unwrap();
        assert_eq!(detect(d.path()).as_deref(), Some("apache-2.0"));
    }

    #[test]
    fn model_card_carries_the_teachers_licence() {
        let d = tempfile::tempdir().unwrap();
        let traces = d.path().join("kept.jsonl");
        std::fs::write(
            &traces,
            "{\"teacher\": {\"model\": \"g.gguf\", \"license\": \"gemma\"}}\nnot json\n",
        )
        .unwrap();
        write_model_card(d.path(), &traces).unwrap();
        let card = std::fs::read_to_string(d.path().join("README.md")).unwrap();
        assert!(card.contains("license: gemma"), "{card}");
        assert!(card.contains("Model Derivative"), "{card}");
    }
}
