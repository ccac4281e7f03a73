//! Embedded teacher: mistral.rs running in this process.
//!
//! `--model` may be a local GGUF file, a local directory (holding one `.gguf`, or a Hugging Face
//! checkout with `config.json` and safetensors), or a Hugging Face hub id (with `--model-file`
//! naming the GGUF inside it, or safetensors otherwise). Local files are opened without any hub
//! access: the tokenizer and chat template come from the GGUF's own metadata.
//!
//! Facts of mistral.rs 0.8.1 this module absorbs:
//! - there is no per-request seed (one engine RNG for all requests): traces say
//!   `seed_honoured: false`;
//! - logprobs are log10 and taken after temperature and top-p: they are converted to nats here;
//! - temperature 0 takes an argmax path whose logprobs are not probabilities, so greedy decoding
//!   is requested as top-k = 1 at temperature 1 instead.

use std::path::{Path, PathBuf};
use std::time::Instant;

use async_trait::async_trait;
use mistralrs::{
    GgufModelBuilder, Model, RequestBuilder, SamplingParams, StopTokens, TextMessageRole,
    TextModelBuilder, TokenSource,
};
use sha2::{Digest, Sha256};

use super::{GenFailure, GenOutput, GenRequest, Teacher};
use crate::trace::{FinishReason, TeacherInfo, TokenLogprob, TraceError, Usage};

/// How to load the embedded teacher.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// GGUF file, model directory, or hub id.
    pub model: String,
    /// GGUF file name inside a directory or hub repository.
    pub model_file: Option<String>,
    /// Hub revision (branch, tag or commit).
    pub revision: Option<String>,
    /// Most sequences the engine batches together.
    pub max_num_seqs: usize,
    /// Run on the CPU even when built with an accelerator feature.
    pub force_cpu: bool,
    /// Chat template (a Jinja file path or literal) replacing the model's own.
    pub chat_template: Option<String>,
}

/// Errors loading the embedded teacher.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A local directory has no usable model files.
    #[error("--model {path}: {message}")]
    BadPath {
        /// Path given.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model file could not be read for hashing.
    #[error("{path}: {source}")]
    Io {
        /// File at fault.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// mistral.rs failed to load the model.
    #[error("loading {model} with mistral.rs: {message}")]
    Load {
        /// Model given.
        model: String,
        /// The engine's message.
        message: String,
    },
}

/// Where the weights come from, resolved from `--model` and `--model-file`.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A GGUF file on disk: its directory and file name.
    LocalGguf {
        /// Directory holding the file.
        dir: PathBuf,
        /// File name.
        file: String,
    },
    /// A Hugging Face style directory with `config.json` and safetensors.
    LocalSafetensors(PathBuf),
    /// A GGUF file in a hub repository.
    HubGguf {
        /// Repository id.
        repo: String,
        /// File name in the repository.
        file: String,
    },
    /// A safetensors hub repository.
    HubSafetensors(String),
}

impl ModelSource {
    /// Resolves what the user passed. Existing paths are always local; anything else is a hub id.
    pub fn resolve(model: &str, model_file: Option<&str>) -> Result<Self, LocalError> {
        let path = Path::new(model);
        if path.is_file() {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
            return Ok(ModelSource::LocalGguf {
                dir: dir.map_or_else(|| PathBuf::from("."), Path::to_path_buf),
                file: file_name(path),
            });
        }
        if path.is_dir() {
            if let Some(f) = model_file {
                if !path.join(f).is_file() {
                    return Err(LocalError::BadPath {
                        path: path.to_path_buf(),
                        message: format!("--model-file {f} does not exist in this directory"),
                    });
                }
                return Ok(ModelSource::LocalGguf {
                    dir: path.to_path_buf(),
                    file: f.to_string(),
                });
            }
            let ggufs: Vec<String> = std::fs::read_dir(path)
                .map_err(|source| LocalError::Io {
                    path: path.to_path_buf(),
                    source,
                })?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".gguf"))
                .collect();
            return match ggufs.as_slice() {
                [one] => Ok(ModelSource::LocalGguf {
                    dir: path.to_path_buf(),
                    file: one.clone(),
                }),
                [] if path.join("config.json").is_file() => {
                    Ok(ModelSource::LocalSafetensors(path.to_path_buf()))
                }
                [] => Err(LocalError::BadPath {
                    path: path.to_path_buf(),
                    message: "no .gguf file and no config.json in this directory".into(),
                }),
                many => Err(LocalError::BadPath {
                    path: path.to_path_buf(),
                    message: format!(
                        "several .gguf files ({}); choose one with --model-file",
                        many.join(", ")
                    ),
                }),
            };
        }
        if model.starts_with('.') || model.starts_with('/') || model.ends_with(".gguf") {
            return Err(LocalError::BadPath {
                path: path.to_path_buf(),
                message: "no such file or directory".into(),
            });
        }
        Ok(match model_file {
            Some(f) => ModelSource::HubGguf {
                repo: model.to_string(),
                file: f.to_string(),
            },
            None => ModelSource::HubSafetensors(model.to_string()),
        })
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// SHA-256 of a file, streamed (model files are large).
pub fn sha256_file(path: &Path) -> Result<String, LocalError> {
    let io = |source| LocalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io)?;
    Ok(hex::encode(h.finalize()))
}

/// The embedded mistral.rs teacher.
pub struct LocalTeacher {
    model: Model,
    info: TeacherInfo,
}

impl LocalTeacher {
    /// Loads the model. Local files never touch the network; hub ids use the cached HF token.
    pub async fn load(cfg: &LocalConfig) -> Result<Self, LocalError> {
        let source = ModelSource::resolve(&cfg.model, cfg.model_file.as_deref())?;
        let load_err = |e: anyhow::Error| LocalError::Load {
            model: cfg.model.clone(),
            message: format!("{e:#}"),
        };
        let mut file_sha256 = None;
        // GgufModelBuilder and TextModelBuilder share these setters but no trait.
        macro_rules! build {
            ($builder:expr, $token:expr, $hub:expr) => {{
                let mut b = $builder
                    .with_token_source($token)
                    .with_max_num_seqs(cfg.max_num_seqs);
                if let (true, Some(r)) = ($hub, &cfg.revision) {
                    b = b.with_hf_revision(r);
                }
                if cfg.force_cpu {
                    b = b.with_force_cpu();
                }
                if let Some(t) = &cfg.chat_template {
                    b = b.with_chat_template(t);
                }
                b.build().await.map_err(load_err)?
            }};
        }
        let model = match &source {
            ModelSource::LocalGguf { dir, file } => {
                let p = dir.join(file);
                file_sha256 = Some(
                    tokio::task::spawn_blocking(move || sha256_file(&p))
                        .await
                        .map_err(|e| LocalError::Load {
                            model: cfg.model.clone(),
                            message: e.to_string(),
                        })??,
                );
                let b = GgufModelBuilder::new(dir.to_string_lossy(), vec![file.clone()]);
                build!(b, TokenSource::None, false)
            }
            ModelSource::HubGguf { repo, file } => {
                let b = GgufModelBuilder::new(repo, vec![file.clone()]);
                build!(b, TokenSource::CacheToken, true)
            }
            ModelSource::LocalSafetensors(dir) => {
                build!(
                    TextModelBuilder::new(dir.to_string_lossy()),
                    TokenSource::None,
                    false
                )
            }
            ModelSource::HubSafetensors(repo) => {
                build!(TextModelBuilder::new(repo), TokenSource::CacheToken, true)
            }
        };
        Ok(LocalTeacher {
            model,
            info: TeacherInfo {
                backend: "local".into(),
                model: cfg.model.clone(),
                file_sha256,
                revision: cfg.revision.clone(),
                engine: Some("mistralrs".into()),
                adapter_sha256: None,
                license: None,
            },
        })
    }

    /// The engine, for callers that need lower-level access (benchmarks).
    pub fn engine(&self) -> &Model {
        &self.model
    }
}

/// Maps our sampling settings onto the engine's, steering around its temperature-0 path.
pub fn sampling_params(s: &crate::trace::Sampling) -> SamplingParams {
    let greedy = s.temperature <= 1e-7;
    SamplingParams {
        temperature: Some(if greedy { 1.0 } else { s.temperature }),
        top_k: greedy.then_some(1),
        top_p: (!greedy && s.top_p < 1.0).then_some(s.top_p),
        max_len: Some(s.max_tokens as usize),
        stop_toks: (!s.stop.is_empty()).then(|| StopTokens::Seqs(s.stop.clone())),
        top_n_logprobs: s.top_logprobs as usize,
        n_choices: 1,
        ..SamplingParams::neutral()
    }
}

#[async_trait]
impl Teacher for LocalTeacher {
    fn info(&self) -> &TeacherInfo {
        &self.info
    }

    fn seed_honoured(&self) -> Option<bool> {
        Some(false)
    }

    async fn generate(&self, req: &GenRequest) -> Result<GenOutput, GenFailure> {
        let mut rb = RequestBuilder::new();
        for m in &req.messages {
            let role = match m.role.as_str() {
                "system" => TextMessageRole::System,
                "assistant" => TextMessageRole::Assistant,
                _ => TextMessageRole::User,
            };
            rb = rb.add_message(role, &m.content);
        }
        rb = rb
            .set_sampling(sampling_params(&req.sampling))
            .return_logprobs(req.sampling.top_logprobs > 0);
        let t = Instant::now();
        let resp = self
            .model
            .send_chat_request(rb)
            .await
            .map_err(|e| GenFailure {
                error: TraceError {
                    kind: "engine".into(),
                    message: e.to_string(),
                },
                attempts: 1,
                endpoint: None,
                fatal: false,
            })?;
        tracing::trace!(elapsed_ms = t.elapsed().as_millis() as u64, "local sample");
        let Some(choice) = resp.choices.into_iter().next() else {
            return Err(GenFailure {
                error: TraceError {
                    kind: "engine".into(),
                    message: "engine returned no choices".into(),
                },
                attempts: 1,
                endpoint: None,
                fatal: false,
            });
        };
        let ln10 = std::f32::consts::LN_10;
        let logprobs = choice.logprobs.and_then(|l| l.content).map(|entries| {
            entries
                .into_iter()
                .map(|e| TokenLogprob {
                    token: e.token,
                    logprob: e.logprob * ln10,
                    top: e
                        .top_logprobs
                        .into_iter()
                        .map(|t| {
                            let text = t.bytes.unwrap_or_else(|| t.token.to_string());
                            (text, t.logprob * ln10)
                        })
                        .collect(),
                    model_logprob: None,
                })
                .collect::<Vec<_>>()
        });
        Ok(GenOutput {
            completion: choice.message.content.unwrap_or_default(),
            reasoning_field: choice
                .message
                .reasoning_content
                .filter(|r| !r.trim().is_empty()),
            finish_reason: FinishReason::parse(&choice.finish_reason),
            usage: Usage {
                prompt_tokens: resp.usage.prompt_tokens as u64,
                completion_tokens: resp.usage.completion_tokens as u64,
            },
            logprobs,
            attempts: 1,
            endpoint: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_resolve_from_paths_and_hub_ids() {
        let dir = tempfile::tempdir().unwrap();
        let g = dir.path().join("m.gguf");
        std::fs::write(&g, b"x").unwrap();
        assert_eq!(
            ModelSource::resolve(g.to_str().unwrap(), None).unwrap(),
            ModelSource::LocalGguf {
                dir: dir.path().to_path_buf(),
                file: "m.gguf".into()
            }
        );
        assert!(matches!(
            ModelSource::resolve(dir.path().to_str().unwrap(), None).unwrap(),
            ModelSource::LocalGguf { .. }
        ));
        std::fs::write(dir.path().join("n.gguf"), b"x").unwrap();
        let e = ModelSource::resolve(dir.path().to_str().unwrap(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--model-file"), "{e}");
        assert_eq!(
            ModelSource::resolve("Qwen/Qwen2.5-0.5B-Instruct", None).unwrap(),
            ModelSource::HubSafetensors("Qwen/Qwen2.5-0.5B-Instruct".into())
        );
        assert!(matches!(
            ModelSource::resolve("org/repo-GGUF", Some("q4.gguf")).unwrap(),
            ModelSource::HubGguf { .. }
        ));
        assert!(ModelSource::resolve("./missing.gguf", None).is_err());
    }

    #[test]
    fn greedy_avoids_the_temperature_zero_path() {
        let s = crate::trace::Sampling {
            temperature: 0.0,
            top_p: 1.0,
            max_tokens: 8,
            stop: vec![],
            seed: None,
            seed_honoured: None,
            top_logprobs: 0,
        };
        let p = sampling_params(&s);
        assert_eq!(p.temperature, Some(1.0));
        assert_eq!(p.top_k, Some(1));
    }
}
