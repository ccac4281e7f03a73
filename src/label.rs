//! Soft labels (`distill label`): the teacher's next-token distribution at every supervised
//! token of a trace file, teacher-forced through the batched engine, stored compactly beside
//! the traces for response distillation (`distill train --loss ce+kd`).
//!
//! Each trace is encoded exactly as `distill train` encodes it (same chat template, same
//! assistant-only mask), scored by the teacher, and at each supervised position the top-k
//! token ids with their log-probabilities are kept, plus the log of the mass outside them.
//! Values are *raw*: the model's own distribution at temperature 1, normalised over its whole
//! vocabulary, before any temperature, top-k or top-p of sampling. Training applies its own
//! temperature to them.
//!
//! # Files
//! - `labels.json`: what the labels are (teacher, k, vocabulary fingerprint, encoding, the trace
//!   file) and, once complete, their counts; written atomically.
//! - `labels.bin`: append-only records, one per trace:
//!   `b"DSL1"`, `u32` byte length of the rest, `u16` id length, the trace id, `u32` positions,
//!   8 bytes of SHA-256 of the target token ids, then per position the `k` token ids packed at
//!   `id_bits` bits each (byte-aligned per position), `k` log-probabilities and the log tail
//!   mass as `u16` in steps of 1/2048 nat (down to −32 nats). At `k = 64` and a vocabulary under
//!   65 536 tokens that is 258 bytes per token. A torn last record (a crash mid-write) is cut
//!   off on resume; a rerun labels only the traces not yet in the file.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::infer::{BatchConfig, Engine, InferError, ScoreRequest};
use crate::model::tokenizer::Vocabulary;
use crate::train::data::{ChatRenderer, Encoder, Sample};
use crate::train::kd::SoftRows;

/// The metadata file.
pub const META_FILE: &str = "labels.json";
/// The records file.
pub const DATA_FILE: &str = "labels.bin";
/// Format tag in [`LabelMeta::format`].
pub const FORMAT: &str = "distill-soft-labels/1";
const MAGIC: &[u8; 4] = b"DSL1";
/// Quantisation steps per nat of the stored log-probabilities.
pub const LOGPROB_SCALE: f32 = 2048.0;

/// Errors of labelling and of reading labels.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The label files are not what they should be.
    #[error("{path}: {msg}")]
    Format {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The labels do not fit what they are used with.
    #[error("soft labels {dir}: {msg}")]
    Mismatch {
        /// The label directory.
        dir: PathBuf,
        /// What does not fit.
        msg: String,
    },
    /// The traces could not be read.
    #[error(transparent)]
    Traces(#[from] crate::trace::TraceFileError),
    /// Encoding a trace failed.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// Loading the teacher failed.
    #[error(transparent)]
    Infer(#[from] InferError),
    /// Running the teacher failed.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LabelError + '_ {
    move |source| LabelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a label directory holds (`labels.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelMeta {
    /// [`FORMAT`].
    pub format: String,
    /// The teacher (model path, and adapter when one was applied).
    pub teacher: String,
    /// Top entries kept per position.
    pub k: usize,
    /// Temperature of the stored distribution (always 1: raw).
    pub temperature: f64,
    /// `raw`: the model's own distribution, before sampling's temperature, top-k or top-p.
    pub values: String,
    /// Rows of the teacher's output projection (ids are below it).
    pub vocab_rows: usize,
    /// Bits per stored token id.
    pub id_bits: u32,
    /// The teacher's vocabulary, checked against the student's before training.
    pub vocabulary: Vocabulary,
    /// The trace file labelled.
    pub traces: PathBuf,
    /// Chat template override used to encode the traces (else the teacher's own).
    pub chat_template: Option<PathBuf>,
    /// Longest sample scored, in tokens.
    pub max_len: usize,
    /// Traces labelled (set when complete).
    pub records: usize,
    /// Positions labelled (set when complete).
    pub positions: usize,
    /// Bytes of `labels.bin` per labelled position (set when complete).
    pub bytes_per_token: f64,
    /// Whether every labellable trace of the file is labelled.
    pub complete: bool,
}

impl LabelMeta {
    /// The meta of a labelling job not yet run: counts at zero.
    fn new(
        teacher: String,
        k: usize,
        values: &str,
        vocab_rows: usize,
        vocabulary: Vocabulary,
        cfg: &LabelConfig,
    ) -> Self {
        Self {
            format: FORMAT.into(),
            teacher,
            k,
            temperature: 1.0,
            values: values.into(),
            vocab_rows,
            id_bits: id_bits(vocab_rows + 1), // one spare code for padding
            vocabulary,
            traces: cfg.traces.clone(),
            chat_template: cfg.chat_template.clone(),
            max_len: cfg.max_len,
            records: 0,
            positions: 0,
            bytes_per_token: 0.0,
            complete: false,
        }
    }

    /// Bytes of one position.
    fn position_bytes(&self) -> usize {
        (self.k * self.id_bits as usize).div_ceil(8) + 2 * self.k + 2
    }

    /// Whether two metas describe the same labelling (counts aside).
    fn same_job(&self, other: &LabelMeta) -> bool {
        self.format == other.format
            && self.teacher == other.teacher
            && self.values == other.values
            && self.k == other.k
            && self.vocab_rows == other.vocab_rows
            && self.vocabulary == other.vocabulary
            && self.chat_template == other.chat_template
            && self.max_len == other.max_len
    }
}

/// Bits needed for ids below `rows`.
pub fn id_bits(rows: usize) -> u32 {
    (usize::BITS - rows.saturating_sub(1).leading_zeros()).max(1)
}

fn quantise(lp: f32) -> u16 {
    if lp.is_nan() {
        return u16::MAX;
    }
    (-lp * LOGPROB_SCALE)
        .round()
        .clamp(0.0, f32::from(u16::MAX)) as u16
}

fn dequantise(q: u16) -> f32 {
    -f32::from(q) / LOGPROB_SCALE
}

/// 8 bytes of SHA-256 over the target ids: ties a record to the exact tokens it labels.
pub fn targets_hash(targets: &[u32]) -> [u8; 8] {
    let mut h = Sha256::new();
    for t in targets {
        h.update(t.to_le_bytes());
    }
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// The supervised target ids of a sample, in order (as `collate` lays them out).
pub fn sample_targets(s: &Sample) -> Vec<u32> {
    (1..s.len())
        .filter(|&p| s.mask[p])
        .map(|p| s.ids[p])
        .collect()
}

/// The trace encoded as `distill train` encodes it, when it can be labelled or measured: it
/// has an answer, fits in `max_len` tokens and supervises at least one token.
pub fn encode_supervised(
    encoder: &Encoder,
    t: &crate::trace::Trace,
    max_len: usize,
) -> Result<Option<Sample>, crate::train::TrainError> {
    let Some(msgs) = Encoder::trace_messages(t) else {
        return Ok(None);
    };
    let (s, _) = encoder.encode(&msgs, &t.id)?;
    Ok((s.len() <= max_len && s.n_supervised() > 0).then_some(s))
}

/// One position to store: top entries and the log of the mass outside them.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelPosition {
    /// `(token id, log-probability)`, most likely first.
    pub top: Vec<(u32, f32)>,
    /// `ln(1 − Σ p(top))`.
    pub log_tail: f32,
}

/// Encodes one record.
fn encode_record(
    meta: &LabelMeta,
    id: &str,
    targets: &[u32],
    positions: &[LabelPosition],
) -> Vec<u8> {
    let per = meta.position_bytes();
    let id_bytes = id.as_bytes();
    let body_len = 2 + id_bytes.len() + 4 + 8 + positions.len() * per;
    let mut out = Vec::with_capacity(8 + body_len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&(id_bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(id_bytes);
    out.extend_from_slice(&(positions.len() as u32).to_le_bytes());
    out.extend_from_slice(&targets_hash(targets));
    let bits = meta.id_bits;
    for pos in positions {
        let mut acc: u64 = 0;
        let mut n: u32 = 0;
        let mut packed = Vec::with_capacity(per);
        for i in 0..meta.k {
            let id = pos
                .top
                .get(i)
                .map_or((1u64 << bits) - 1, |e| u64::from(e.0));
            acc |= id << n;
            n += bits;
            while n >= 8 {
                packed.push(acc as u8);
                acc >>= 8;
                n -= 8;
            }
        }
        if n > 0 {
            packed.push(acc as u8);
        }
        out.extend_from_slice(&packed);
        for i in 0..meta.k {
            let lp = pos.top.get(i).map_or(f32::NEG_INFINITY, |e| e.1);
            out.extend_from_slice(&quantise(lp).to_le_bytes());
        }
        out.extend_from_slice(&quantise(pos.log_tail).to_le_bytes());
    }
    out
}

/// A parsed record: where its positions are in the data.
#[derive(Debug, Clone)]
struct RecordIndex {
    offset: usize,
    positions: usize,
    hash: [u8; 8],
}

/// Scans `data`: the records in it and the length of the valid prefix (a torn tail is not
/// part of it).
fn scan(
    data: &[u8],
    meta: &LabelMeta,
    path: &Path,
) -> Result<(HashMap<String, RecordIndex>, usize), LabelError> {
    let per = meta.position_bytes();
    let mut index = HashMap::new();
    let mut at = 0;
    while at + 8 <= data.len() {
        if &data[at..at + 4] != MAGIC {
            return Err(LabelError::Format {
                path: path.to_path_buf(),
                msg: format!("byte {at}: not a record (bad magic); the file is damaged"),
            });
        }
        let len =
            u32::from_le_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]) as usize;
        let start = at + 8;
        if start + len > data.len() {
            break; // torn
        }
        let body = &data[start..start + len];
        let bad = |msg: &str| LabelError::Format {
            path: path.to_path_buf(),
            msg: format!("record at byte {at}: {msg}"),
        };
        if body.len() < 2 {
            return Err(bad("too short"));
        }
        let id_len = u16::from_le_bytes([body[0], body[1]]) as usize;
        if body.len() < 2 + id_len + 12 {
            return Err(bad("too short for its id"));
        }
        let id =
            std::str::from_utf8(&body[2..2 + id_len]).map_err(|_| bad("trace id is not UTF-8"))?;
        let p = 2 + id_len;
        let positions =
            u32::from_le_bytes([body[p], body[p + 1], body[p + 2], body[p + 3]]) as usize;
        let mut hash = [0u8; 8];
        hash.copy_from_slice(&body[p + 4..p + 12]);
        if body.len() != p + 12 + positions * per {
            return Err(bad(&format!(
                "{positions} positions of {per} bytes do not fill its {len} bytes (labels written \
                 with another k or vocabulary?)"
            )));
        }
        index.insert(
            id.to_string(),
            RecordIndex {
                offset: start + p + 12,
                positions,
                hash,
            },
        );
        at = start + len;
    }
    Ok((index, at))
}

/// Soft labels read back for training and evaluation.
#[derive(Debug)]
pub struct SoftLabels {
    dir: PathBuf,
    meta: LabelMeta,
    data: Vec<u8>,
    index: HashMap<String, RecordIndex>,
}

/// Reads `labels.json` of `dir`.
pub fn read_meta(dir: &Path) -> Result<LabelMeta, LabelError> {
    let path = dir.join(META_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let meta: LabelMeta = serde_json::from_str(&text).map_err(|e| LabelError::Format {
        path: path.clone(),
        msg: format!("line {}, column {}: {e}", e.line(), e.column()),
    })?;
    if meta.format != FORMAT {
        return Err(LabelError::Format {
            path,
            msg: format!("field `format` is {:?}, expected {FORMAT:?}", meta.format),
        });
    }
    Ok(meta)
}

impl SoftLabels {
    /// Opens a label directory written by [`label`].
    pub fn open(dir: &Path) -> Result<Self, LabelError> {
        let meta = read_meta(dir)?;
        let path = dir.join(DATA_FILE);
        let data = std::fs::read(&path).map_err(io(&path))?;
        let (index, valid) = scan(&data, &meta, &path)?;
        if valid != data.len() {
            tracing::warn!(
                "{}: {} bytes of a torn last record ignored (rerun `distill label` to finish it)",
                path.display(),
                data.len() - valid
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            data,
            index,
        })
    }

    /// What the labels are.
    pub fn meta(&self) -> &LabelMeta {
        &self.meta
    }

    /// Number of labelled traces.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no trace is labelled.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn mismatch(&self, msg: String) -> LabelError {
        LabelError::Mismatch {
            dir: self.dir.clone(),
            msg,
        }
    }

    /// Refuses a student whose vocabulary differs from the teacher's, saying what differs.
    pub fn check_vocabulary(
        &self,
        student: &Vocabulary,
        student_rows: usize,
    ) -> Result<(), LabelError> {
        if let Some(d) = self.meta.vocabulary.difference(student, None) {
            return Err(self.mismatch(format!(
                "the teacher's vocabulary is not the student's: {d}; distillation needs one \
                 tokenizer (label with a teacher of the student's family)"
            )));
        }
        if self.meta.vocab_rows > student_rows {
            // Ids above the student's rows can only be padding: the vocabularies agree.
            tracing::info!(
                "teacher has {} output rows, the student {}: padding rows ignored",
                self.meta.vocab_rows,
                student_rows
            );
        }
        Ok(())
    }

    /// Appends the labels of sample `s` (its supervised positions, in order) to `rows`,
    /// checking they were made for exactly these target tokens.
    pub fn append_rows(
        &self,
        s: &Sample,
        rows: &mut SoftRows,
        vocab: usize,
    ) -> Result<(), LabelError> {
        let targets = sample_targets(s);
        let Some(rec) = self.index.get(&s.trace_id) else {
            return Err(self.mismatch(format!(
                "no labels for trace `{}` ({} of the labelled file {} are present); were they \
                 made from another trace file? Run `distill label` on this one",
                s.trace_id,
                self.index.len(),
                self.meta.traces.display()
            )));
        };
        if rec.positions != targets.len() || rec.hash != targets_hash(&targets) {
            return Err(self.mismatch(format!(
                "trace `{}`: the labels cover {} tokens{}, the student's encoding has {} \
                 supervised tokens; labels made with another chat template, tokenizer or \
                 trace text",
                s.trace_id,
                rec.positions,
                if rec.positions == targets.len() {
                    " (different ones)"
                } else {
                    ""
                },
                targets.len()
            )));
        }
        let m = &self.meta;
        let per = m.position_bytes();
        let id_bytes = (m.k * m.id_bits as usize).div_ceil(8);
        let pad_id = (1u64 << m.id_bits) - 1;
        for i in 0..rec.positions {
            let p = &self.data[rec.offset + i * per..rec.offset + (i + 1) * per];
            let (mut acc, mut n, mut byte) = (0u64, 0u32, 0usize);
            let mut entries = Vec::with_capacity(m.k);
            for j in 0..m.k {
                while n < m.id_bits {
                    acc |= u64::from(p[byte]) << n;
                    byte += 1;
                    n += 8;
                }
                let id = acc & pad_id;
                acc >>= m.id_bits;
                n -= m.id_bits;
                let q = u16::from_le_bytes([p[id_bytes + 2 * j], p[id_bytes + 2 * j + 1]]);
                if id != pad_id || m.id_bits == 32 {
                    if id as usize >= vocab {
                        return Err(self.mismatch(format!(
                            "trace `{}` position {i}: token id {id} is outside the student's \
                             {vocab} rows",
                            s.trace_id
                        )));
                    }
                    entries.push((id as u32, dequantise(q)));
                }
            }
            let t = u16::from_le_bytes([p[per - 2], p[per - 1]]);
            rows.push(entries, Some(dequantise(t)));
        }
        Ok(())
    }
}

/// What to label.
#[derive(Debug, Clone)]
pub struct LabelConfig {
    /// Teacher: Hugging Face directory or GGUF file.
    pub model: PathBuf,
    /// LoRA adapter applied to the teacher.
    pub adapter: Option<PathBuf>,
    /// Trace file.
    pub traces: PathBuf,
    /// Output directory.
    pub out_dir: PathBuf,
    /// Top entries per position.
    pub top_k: usize,
    /// Chat template replacing the teacher's (use the student's training template).
    pub chat_template: Option<PathBuf>,
    /// End-of-turn token, as for `distill train`.
    pub eot_token: Option<String>,
    /// Longest sample in tokens, as for `distill train`: longer traces are skipped.
    pub max_len: usize,
    /// Engine batch settings.
    pub batch: BatchConfig,
    /// No progress bar.
    pub quiet: bool,
}

/// What [`label`] did.
#[derive(Debug, Clone, Serialize)]
pub struct LabelSummary {
    /// Traces in the file.
    pub traces: usize,
    /// Labelled in this run.
    pub labelled: usize,
    /// Already labelled by an earlier run.
    pub resumed: usize,
    /// Failed traces (no answer) and those longer than `max_len`, skipped.
    pub skipped: usize,
    /// Traces whose stored tokens do not match their encoding (from stored logprobs only),
    /// skipped.
    pub unaligned: usize,
    /// Positions labelled in all.
    pub positions: usize,
    /// Bytes of `labels.bin` per position.
    pub bytes_per_token: f64,
    /// Teacher tokens scored per second in this run.
    pub tokens_per_s: f64,
    /// Mean probability mass the top-k leave outside (this run's positions).
    pub mean_tail_mass: f64,
}

/// Labels every trace of `cfg.traces` not yet in `cfg.out_dir`, appending records as groups
/// of traces finish.
pub fn label(cfg: &LabelConfig) -> Result<LabelSummary, LabelError> {
    if cfg.top_k == 0 {
        return Err(LabelError::Mismatch {
            dir: cfg.out_dir.clone(),
            msg: "--top-k must be at least 1".into(),
        });
    }
    let mut engine = Engine::load(&cfg.model, cfg.adapter.as_deref())?;
    let tokenizer = engine.tokenizer().clone();
    let renderer = ChatRenderer::new(tokenizer.clone(), cfg.chat_template.as_deref())?;
    if let Some(t) = renderer.override_template() {
        engine.set_chat_template(t.to_string());
    }
    let encoder = Encoder::new(renderer, cfg.eot_token.as_deref())?;
    let rows = engine.weights().dims().vocab;
    let k = cfg.top_k.min(rows);
    let teacher = match &cfg.adapter {
        Some(a) => format!("{} + {}", cfg.model.display(), a.display()),
        None => cfg.model.display().to_string(),
    };
    let meta = LabelMeta::new(teacher, k, "raw", rows, tokenizer.fingerprint(), cfg);
    let mut writer = LabelWriter::open(&cfg.out_dir, meta)?;
    let done = writer.done.clone();
    let traces = crate::trace::read_traces(&cfg.traces)?;
    let mut todo = Vec::new();
    let mut skipped = 0;
    let mut seen = HashSet::new();
    for t in &traces {
        if !seen.insert(t.id.clone()) {
            return Err(LabelError::Format {
                path: cfg.traces.clone(),
                msg: format!("trace id `{}` appears twice; labels are keyed by id", t.id),
            });
        }
        if done.contains(&t.id) {
            continue;
        }
        match encode_supervised(&encoder, t, cfg.max_len)? {
            Some(s) => todo.push(s),
            None => skipped += 1,
        }
    }
    let resumed = done.len();
    let total_tokens: usize = todo.iter().map(Sample::len).sum();
    let bar = if cfg.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        crate::progress::bar(total_tokens as u64, "tokens")
    };
    let t0 = std::time::Instant::now();
    let (mut positions, mut tail_sum) = (0usize, 0f64);
    // Groups of traces keep the engine's batch full while records reach the disk steadily.
    let group = cfg.batch.max_seqs.max(1) * 2;
    for chunk in todo.chunks(group) {
        let requests = chunk
            .iter()
            .map(|s| ScoreRequest {
                tokens: s.ids.clone(),
                top_k: k,
            })
            .collect();
        let scored = engine.score(requests, &[], cfg.batch)?;
        let mut buf = Vec::new();
        for (s, sc) in chunk.iter().zip(scored) {
            if let Some(e) = sc.error {
                return Err(LabelError::Mismatch {
                    dir: cfg.out_dir.clone(),
                    msg: format!("trace `{}` could not be scored: {e}", s.trace_id),
                });
            }
            let mut pos = Vec::new();
            for p in 1..s.len() {
                if !s.mask[p] {
                    continue;
                }
                let sp = &sc.positions[p - 1];
                let tail = sp.tail_mass();
                tail_sum += f64::from(tail);
                pos.push(LabelPosition {
                    top: sp.top.clone(),
                    log_tail: tail.ln(),
                });
            }
            positions += pos.len();
            buf.extend(encode_record(
                &writer.meta,
                &s.trace_id,
                &sample_targets(s),
                &pos,
            ));
            bar.inc(s.len() as u64);
        }
        writer.append(&buf)?;
    }
    bar.finish_and_clear();
    let elapsed = t0.elapsed().as_secs_f64();
    let meta = writer.finish()?;
    Ok(LabelSummary {
        traces: traces.len(),
        labelled: todo.len(),
        resumed,
        skipped,
        unaligned: 0,
        positions: meta.positions,
        bytes_per_token: meta.bytes_per_token,
        tokens_per_s: total_tokens as f64 / elapsed.max(1e-9),
        mean_tail_mass: tail_sum / positions.max(1) as f64,
    })
}

/// The label directory being written: its meta, the records file opened for appending after
/// a torn tail was cut off, and the traces already labelled.
struct LabelWriter {
    dir: PathBuf,
    meta: LabelMeta,
    file: std::fs::File,
    done: HashSet<String>,
}

impl LabelWriter {
    /// Opens (or starts) `dir` for `meta`; labels of another job there are an error.
    fn open(dir: &Path, meta: LabelMeta) -> Result<Self, LabelError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let meta_path = dir.join(META_FILE);
        let data_path = dir.join(DATA_FILE);
        let mut done = HashSet::new();
        if meta_path.is_file() {
            let old = read_meta(dir)?;
            if !old.same_job(&meta) {
                return Err(LabelError::Mismatch {
                    dir: dir.to_path_buf(),
                    msg: format!(
                        "holds labels of another job (teacher {}, k {}, values {}, template \
                         {:?}); use another --out or remove it",
                        old.teacher, old.k, old.values, old.chat_template
                    ),
                });
            }
            if data_path.is_file() {
                let data = std::fs::read(&data_path).map_err(io(&data_path))?;
                let (index, valid) = scan(&data, &meta, &data_path)?;
                if valid != data.len() {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&data_path)
                        .map_err(io(&data_path))?;
                    f.set_len(valid as u64).map_err(io(&data_path))?;
                }
                done = index.into_keys().collect();
            }
        }
        write_meta(&meta_path, &meta)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&data_path)
            .map_err(io(&data_path))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            file,
            done,
        })
    }

    /// Appends whole records and flushes them.
    fn append(&mut self, records: &[u8]) -> Result<(), LabelError> {
        let path = self.dir.join(DATA_FILE);
        self.file.write_all(records).map_err(io(&path))?;
        self.file.flush().map_err(io(&path))
    }

    /// Syncs the records and writes the final meta with the counts over the whole file.
    fn finish(self) -> Result<LabelMeta, LabelError> {
        let path = self.dir.join(DATA_FILE);
        self.file.sync_all().map_err(io(&path))?;
        let labels = SoftLabels::open(&self.dir)?;
        let positions: usize = labels.index.values().map(|r| r.positions).sum();
        let meta = LabelMeta {
            records: labels.len(),
            positions,
            bytes_per_token: labels.data.len() as f64 / positions.max(1) as f64,
            complete: true,
            ..self.meta
        };
        write_meta(&self.dir.join(META_FILE), &meta)?;
        Ok(meta)
    }
}

/// The tokenizer (and chat template) of a model path, without loading its weights.
fn load_tokenizer(model: &Path) -> Result<crate::model::tokenizer::ChatTokenizer, LabelError> {
    use crate::model::tokenizer::ChatTokenizer;
    if model.is_dir() {
        return Ok(ChatTokenizer::from_hf_dir(model)?);
    }
    let mut f = std::fs::File::open(model).map_err(io(model))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).map_err(|e| {
        LabelError::Format {
            path: model.to_path_buf(),
            msg: format!("not a GGUF file or model directory: {e}"),
        }
    })?;
    Ok(ChatTokenizer::from_gguf(
        &content,
        &model.display().to_string(),
    )?)
}

/// Token text as an OpenAI-compatible server returns it → token id: each id's own decoding,
/// or vLLM's `token_id:N` (`--return-tokens-as-token-ids`). Texts that several ids decode to
/// (partial UTF-8 bytes, say) map to none: which id the teacher meant is unknown.
fn token_lookup(tok: &crate::model::tokenizer::ChatTokenizer) -> impl Fn(&str) -> Option<u32> {
    let n = tok.vocabulary().len();
    let mut map: HashMap<String, Option<u32>> = HashMap::with_capacity(n);
    for id in 0..n as u32 {
        if let Ok(text) = tok.decode(&[id], false) {
            map.entry(text)
                .and_modify(|e| *e = None)
                .or_insert(Some(id));
        }
    }
    move |text: &str| match text.strip_prefix("token_id:") {
        Some(id) => id.parse().ok().filter(|&i: &u32| (i as usize) < n),
        None => map.get(text).copied().flatten(),
    }
}

/// Labels from the log-probabilities stored in the traces (`distill generate --logprobs K`),
/// for teachers that cannot be run here (a hosted endpoint): no forward pass, generated tokens
/// only. `cfg.model` names the model whose tokenizer maps the returned token texts to ids (the
/// student: the teacher must share its vocabulary). Each trace's generated tokens must be the
/// start of its supervised tokens as the student encodes it; the positions after them (the
/// end-of-turn token the server does not return) get the target as a hard label. Values are
/// whatever the endpoint returned: the model's raw distribution for distill's own engine,
/// before or after temperature for others depending on the server (`values` says which is
/// known).
pub fn label_from_trace_logprobs(cfg: &LabelConfig) -> Result<LabelSummary, LabelError> {
    let tokenizer = load_tokenizer(&cfg.model)?;
    let renderer = ChatRenderer::new(tokenizer.clone(), cfg.chat_template.as_deref())?;
    let encoder = Encoder::new(renderer, cfg.eot_token.as_deref())?;
    let traces = crate::trace::read_traces(&cfg.traces)?;
    let with_lp: Vec<&crate::trace::Trace> = traces
        .iter()
        .filter(|t| t.logprobs.as_ref().is_some_and(|l| !l.is_empty()))
        .collect();
    let Some(first) = with_lp.first() else {
        return Err(LabelError::Mismatch {
            dir: cfg.out_dir.clone(),
            msg: format!(
                "no trace in {} has log-probabilities; generate with --logprobs K",
                cfg.traces.display()
            ),
        });
    };
    let k = with_lp
        .iter()
        .flat_map(|t| t.logprobs.iter().flatten())
        .map(|e| e.top.len())
        .max()
        .unwrap_or(0)
        .clamp(1, cfg.top_k.max(1));
    // distill's engine reports the model's own distribution (it records `model_logprob`).
    let raw = with_lp
        .iter()
        .flat_map(|t| t.logprobs.iter().flatten())
        .all(|e| e.model_logprob.is_some());
    let rows = tokenizer.vocabulary().len();
    let meta = LabelMeta::new(
        format!("{} (stored log-probabilities)", first.teacher.model),
        k,
        if raw { "raw" } else { "endpoint" },
        rows,
        tokenizer.fingerprint(),
        cfg,
    );
    let mut writer = LabelWriter::open(&cfg.out_dir, meta)?;
    let resumed = writer.done.len();
    let lookup = token_lookup(&tokenizer);
    let (mut labelled, mut skipped, mut unaligned) = (0, 0, 0);
    let (mut tail_sum, mut soft_positions) = (0f64, 0usize);
    let mut buf = Vec::new();
    for t in &traces {
        if writer.done.contains(&t.id) {
            continue;
        }
        let Some(lps) = t.logprobs.as_ref() else {
            skipped += 1;
            continue;
        };
        let Some(s) = encode_supervised(&encoder, t, cfg.max_len)? else {
            skipped += 1;
            continue;
        };
        let targets = sample_targets(&s);
        // Every generated token's id, the stop token (which some servers return and the
        // template may render differently) allowed to be unknown.
        let mut generated: Vec<Option<u32>> = lps.iter().map(|e| lookup(&e.token)).collect();
        let fits = |g: &[Option<u32>]| {
            g.len() <= targets.len() && g.iter().zip(&targets).all(|(a, b)| *a == Some(*b))
        };
        if !fits(&generated) && generated.len() > 1 {
            generated.pop();
        }
        if !fits(&generated) {
            unaligned += 1;
            continue;
        }
        let mut pos = Vec::with_capacity(targets.len());
        for (i, &target) in targets.iter().enumerate() {
            match lps.get(i).filter(|_| i < generated.len()) {
                Some(e) => {
                    let mut top: Vec<(u32, f32)> = Vec::with_capacity(e.top.len());
                    for (text, lp) in &e.top {
                        if let Some(id) = lookup(text) {
                            if !top.iter().any(|(x, _)| *x == id) {
                                top.push((id, *lp));
                            }
                        }
                    }
                    if top.is_empty() {
                        top.push((target, e.model_logprob.unwrap_or(e.logprob)));
                    }
                    top.sort_by(|a, b| b.1.total_cmp(&a.1));
                    top.truncate(k);
                    let inside: f64 = top.iter().map(|(_, lp)| f64::from(*lp).exp()).sum();
                    let tail = (1.0 - inside).max(0.0);
                    tail_sum += tail;
                    soft_positions += 1;
                    pos.push(LabelPosition {
                        top,
                        log_tail: (tail as f32).ln(),
                    });
                }
                None => pos.push(LabelPosition {
                    top: vec![(target, 0.0)],
                    log_tail: f32::NEG_INFINITY,
                }),
            }
        }
        buf.extend(encode_record(&writer.meta, &t.id, &targets, &pos));
        labelled += 1;
        if buf.len() > 1 << 20 {
            writer.append(&buf)?;
            buf.clear();
        }
    }
    writer.append(&buf)?;
    if labelled == 0 && resumed == 0 {
        return Err(LabelError::Mismatch {
            dir: cfg.out_dir.clone(),
            msg: format!(
                "none of the {} traces with log-probabilities matches its encoding by {} \
                 ({unaligned} unaligned, {skipped} skipped): the teacher's tokenizer is not \
                 this model's, or the chat template renders the answer differently",
                with_lp.len(),
                cfg.model.display()
            ),
        });
    }
    let meta = writer.finish()?;
    Ok(LabelSummary {
        traces: traces.len(),
        labelled,
        resumed,
        skipped,
        unaligned,
        positions: meta.positions,
        bytes_per_token: meta.bytes_per_token,
        tokens_per_s: 0.0,
        mean_tail_mass: tail_sum / soft_positions.max(1) as f64,
    })
}

fn write_meta(path: &Path, meta: &LabelMeta) -> Result<(), LabelError> {
    let text = serde_json::to_string_pretty(meta).map_err(|e| LabelError::Format {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    crate::trace::write_atomically(path, text.as_bytes()).map_err(|e| LabelError::Format {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(k: usize, rows: usize) -> LabelMeta {
        LabelMeta {
            format: FORMAT.into(),
            teacher: "t".into(),
            k,
            temperature: 1.0,
            values: "raw".into(),
            vocab_rows: rows,
            id_bits: id_bits(rows + 1),
            vocabulary: Vocabulary::of(&["a".into()], None, None),
            traces: "x.jsonl".into(),
            chat_template: None,
            max_len: 100,
            records: 0,
            positions: 0,
            bytes_per_token: 0.0,
            complete: false,
        }
    }

    #[test]
    fn id_bits_cover_the_vocabulary() {
        assert_eq!(id_bits(49152 + 1), 16);
        assert_eq!(id_bits(65536), 16);
        assert_eq!(id_bits(65537), 17);
        assert_eq!(id_bits(151936 + 1), 18);
    }

    #[test]
    fn records_round_trip_within_quantisation() -> Result<(), LabelError> {
        for rows in [100usize, 49152, 151936] {
            let m = meta(3, rows);
            let pos = vec![
                LabelPosition {
                    top: vec![(rows as u32 - 1, -0.1), (0, -2.5), (17, -40.0)],
                    log_tail: -3.0,
                },
                LabelPosition {
                    top: vec![(5, -0.01)],
                    log_tail: -5.0,
                },
            ];
            let sample = Sample {
                ids: vec![1, 2, 3, 4],
                mask: vec![false, false, true, true],
                trace_id: "tr-1".into(),
            };
            let bytes = encode_record(&m, "tr-1", &sample_targets(&sample), &pos);
            // Torn copies are not records; the whole one is.
            let (idx, valid) = scan(&bytes[..bytes.len() - 1], &m, Path::new("x"))?;
            assert!(idx.is_empty() && valid == 0);
            let (index, valid) = scan(&bytes, &m, Path::new("x"))?;
            assert_eq!(valid, bytes.len());
            let labels = SoftLabels {
                dir: "d".into(),
                meta: m.clone(),
                data: bytes,
                index,
            };
            let mut out = SoftRows::new(3);
            labels.append_rows(&sample, &mut out, rows)?;
            assert_eq!(out.len(), 2);
            let (ids, lps) = out.row(0);
            assert_eq!(ids, &[rows as u32 - 1, 0, 17]);
            assert!((lps[0] + 0.1).abs() < 1.0 / 4096.0 && (lps[1] + 2.5).abs() < 1.0 / 4096.0);
            assert!((lps[2] + 32.0).abs() < 1e-3, "clamped at -32 nats");
            assert!((out.log_tail[0] + 3.0).abs() < 1.0 / 4096.0);
            let (ids, _) = out.row(1);
            assert_eq!(ids, &[5, SoftRows::PAD, SoftRows::PAD]);
            // Another target sequence is refused.
            let other = Sample {
                ids: vec![1, 2, 3, 9],
                ..sample.clone()
            };
            let err = labels
                .append_rows(&other, &mut out, rows)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("tr-1") && err.contains("different ones"),
                "{err}"
            );
            // An unknown trace is refused.
            let other = Sample {
                trace_id: "nope".into(),
                ..sample
            };
            let err = labels
                .append_rows(&other, &mut out, rows)
                .unwrap_err()
                .to_string();
            assert!(err.contains("no labels for trace `nope`"), "{err}");
        }
        Ok(())
    }

    #[test]
    fn bytes_per_token_at_k64() {
        assert_eq!(meta(64, 49152).position_bytes(), 64 * 2 + 128 + 2);
        assert!(meta(64, 151936).position_bytes() <= 300);
    }
}
