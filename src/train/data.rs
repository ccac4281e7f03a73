//! Training data: traces → chat template → token ids with an assistant-only loss mask.
//!
//! The assistant span is found by rendering the conversation twice: the prompt with
//! `add_generation_prompt = true` and the full conversation with the answer. The full render
//! must start with the prompt render; everything tokenised after the prompt tokens is
//! supervised, up to and including the template's end-of-turn token (the sample is cut right
//! after it, so the last supervised token is always the end-of-turn / EOS token). Masks are
//! explicit per-token flags, never derived from the pad id, so a tokenizer whose pad token
//! equals EOS still learns to stop.
//!
//! Batches are built from a deterministic plan (seed + epoch): samples are shuffled, then
//! either sorted by length within windows (length buckets, little padding) or packed several
//! per row with attention blocked between them ([`Packing::from_segments`]).

use super::TrainError;
use crate::model::tokenizer::{ChatMessage, ChatTokenizer};
use crate::model::Packing;
use crate::trace::Trace;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::Path;

/// Label value of unsupervised positions in [`Sample::labels`] (the PyTorch convention).
pub const IGNORE_INDEX: i64 = -100;

/// Tokens that end an assistant turn in common chat templates.
pub const KNOWN_END_OF_TURN: [&str; 8] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<｜end▁of▁sentence｜>",
];

/// Salt mixed into the seed for the validation split, so it does not depend on epoch order.
const VAL_SALT: u64 = 0x05ee_d0f7_a11d_a7a0;
/// Salt mixed into the seed for the per-epoch data order.
const EPOCH_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

/// One tokenised conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Token ids of the rendered conversation, ending with the end-of-turn token.
    pub ids: Vec<u32>,
    /// `mask[i]` is true when `ids[i]` is a training target (predicted from position `i-1`).
    /// `mask[0]` is always false.
    pub mask: Vec<bool>,
    /// Id of the trace it came from (for error messages and the preflight print).
    pub trace_id: String,
}

impl Sample {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the sample has no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of supervised target tokens.
    pub fn n_supervised(&self) -> usize {
        self.mask.iter().skip(1).filter(|m| **m).count()
    }

    /// Labels in the `transformers` convention: the token id where supervised, otherwise
    /// [`IGNORE_INDEX`] (not shifted: `labels[i]` is the target for the logits at `i-1`).
    pub fn labels(&self) -> Vec<i64> {
        self.ids
            .iter()
            .zip(&self.mask)
            .enumerate()
            .map(|(i, (id, m))| {
                if *m && i > 0 {
                    i64::from(*id)
                } else {
                    IGNORE_INDEX
                }
            })
            .collect()
    }
}

/// Renders chat templates: the tokenizer's own, or an override read from a file (rendered
/// with the same settings as the tokenizer: `trim_blocks`, `lstrip_blocks`, Python methods).
#[derive(Debug, Clone)]
pub struct ChatRenderer {
    tokenizer: ChatTokenizer,
    template: Option<(String, String)>,
}

impl ChatRenderer {
    /// Uses `tokenizer`'s template, or the file `template` when given.
    pub fn new(tokenizer: ChatTokenizer, template: Option<&Path>) -> Result<Self, TrainError> {
        let template = match template {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| TrainError::io(p, e))?;
                let r = Self {
                    tokenizer: tokenizer.clone(),
                    template: Some((text, p.display().to_string())),
                };
                // Compile once now so a syntax error names the file before the model loads.
                let env = r.environment();
                if let Some((t, origin)) = &r.template {
                    env.template_from_str(t)
                        .map_err(|e| TrainError::Data(format!("chat template {origin}: {e}")))?;
                }
                r.template
            }
            None => None,
        };
        Ok(Self {
            tokenizer,
            template,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.tokenizer
    }

    /// The override template text, if one was given.
    pub fn override_template(&self) -> Option<&str> {
        self.template.as_ref().map(|(t, _)| t.as_str())
    }

    fn environment(&self) -> minijinja::Environment<'static> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<minijinja::Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env
    }

    /// Renders `messages`, with the assistant header appended when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TrainError> {
        let Some((template, origin)) = &self.template else {
            return Ok(self
                .tokenizer
                .apply_chat_template(messages, add_generation_prompt)?);
        };
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.tokenizer.bos_token().unwrap_or_default(),
            eos_token => self.tokenizer.eos_token().unwrap_or_default(),
        };
        self.environment()
            .render_str(template, ctx)
            .map_err(|e| TrainError::Data(format!("chat template {origin}: {e}")))
    }
}

/// Why an encoded sample needed help, counted in [`DataStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeNotes {
    /// The template emitted no end-of-turn token after the answer; EOS was appended.
    pub eos_appended: bool,
    /// The last prompt token merged with the first answer token when tokenised together; the
    /// merged token is supervised.
    pub boundary_merged: bool,
}

/// Turns conversations into masked samples.
#[derive(Debug, Clone)]
pub struct Encoder {
    renderer: ChatRenderer,
    end_of_turn: Vec<u32>,
    eos: Option<u32>,
}

impl Encoder {
    /// `eot_token` adds a template-specific end-of-turn token to the EOS token and the
    /// well-known ones ([`KNOWN_END_OF_TURN`]) found in the vocabulary.
    pub fn new(renderer: ChatRenderer, eot_token: Option<&str>) -> Result<Self, TrainError> {
        let tok = renderer.tokenizer();
        let eos = tok.eos_token().and_then(|t| tok.token_id(t));
        let mut end_of_turn: Vec<u32> = KNOWN_END_OF_TURN
            .iter()
            .filter_map(|t| tok.token_id(t))
            .chain(eos)
            .collect();
        if let Some(t) = eot_token {
            let id = tok.token_id(t).ok_or_else(|| TrainError::Config {
                field: "eot_token".into(),
                msg: format!("`{t}` is not in the tokenizer's vocabulary"),
            })?;
            end_of_turn.push(id);
        }
        end_of_turn.sort_unstable();
        end_of_turn.dedup();
        Ok(Self {
            renderer,
            end_of_turn,
            eos,
        })
    }

    /// Token ids accepted as the end of the assistant turn.
    pub fn end_of_turn_ids(&self) -> &[u32] {
        &self.end_of_turn
    }

    /// The renderer.
    pub fn renderer(&self) -> &ChatRenderer {
        &self.renderer
    }

    /// Encodes a conversation whose last message is the assistant answer to learn.
    pub fn encode(
        &self,
        messages: &[ChatMessage],
        trace_id: &str,
    ) -> Result<(Sample, EncodeNotes), TrainError> {
        let Some((last, prompt_msgs)) = messages.split_last() else {
            return Err(TrainError::Data(format!("trace {trace_id}: no messages")));
        };
        if last.role != "assistant" {
            return Err(TrainError::Data(format!(
                "trace {trace_id}: last message has role `{}`, expected `assistant`",
                last.role
            )));
        }
        let prompt = self.renderer.render(prompt_msgs, true)?;
        let full = self.renderer.render(messages, false)?;
        if !full.starts_with(&prompt) {
            let at = prompt
                .char_indices()
                .zip(full.chars())
                .find(|((_, a), b)| a != b)
                .map(|((i, _), _)| i)
                .unwrap_or(prompt.len().min(full.len()));
            let around =
                |s: &str| -> String { s.chars().skip(at.saturating_sub(20)).take(60).collect() };
            return Err(TrainError::Data(format!(
                "trace {trace_id}: the chat template renders the conversation with the answer \
                 differently from the prompt with add_generation_prompt=true (they diverge at \
                 byte {at}: prompt {:?} vs full {:?}), so the assistant span cannot be located; \
                 pass a compatible template with `chat_template`",
                around(&prompt),
                around(&full)
            )));
        }
        let tok = self.renderer.tokenizer();
        let p_ids = tok.encode(&prompt, false)?;
        let mut ids = tok.encode(&full, false)?;
        let start = p_ids
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .max(1);
        let mut notes = EncodeNotes {
            boundary_merged: start < p_ids.len(),
            ..Default::default()
        };
        if start >= ids.len() {
            return Err(TrainError::Data(format!(
                "trace {trace_id}: the answer renders to no tokens after the prompt"
            )));
        }
        match (start..ids.len())
            .rev()
            .find(|&i| self.end_of_turn.contains(&ids[i]))
        {
            Some(end) => ids.truncate(end + 1),
            None => match self.eos {
                Some(eos) => {
                    ids.push(eos);
                    notes.eos_appended = true;
                }
                None => {
                    return Err(TrainError::Data(format!(
                        "trace {trace_id}: the template emits no end-of-turn token after the \
                         answer and the tokenizer has no EOS token; set `eot_token`"
                    )))
                }
            },
        }
        let mask = (0..ids.len()).map(|i| i >= start).collect();
        Ok((
            Sample {
                ids,
                mask,
                trace_id: trace_id.to_string(),
            },
            notes,
        ))
    }

    /// The chat messages a trace trains on: its prompt messages plus the assistant answer
    /// ([`Trace::assistant_text`], which keeps any `<think>` block). `None` for failed traces.
    pub fn trace_messages(trace: &Trace) -> Option<Vec<ChatMessage>> {
        if !trace.is_ok() {
            return None;
        }
        let answer = trace.assistant_text()?;
        let mut msgs: Vec<ChatMessage> = trace
            .messages
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
            .collect();
        msgs.push(ChatMessage::new("assistant", answer));
        Some(msgs)
    }

    /// The sample text with supervised spans in `[[...]]`, for the preflight print.
    pub fn show(&self, sample: &Sample) -> Result<String, TrainError> {
        let tok = self.renderer.tokenizer();
        let mut out = String::new();
        let mut i = 0;
        while i < sample.ids.len() {
            let sup = sample.mask[i];
            let j = (i..sample.ids.len())
                .find(|&j| sample.mask[j] != sup)
                .unwrap_or(sample.ids.len());
            let text = tok.decode(&sample.ids[i..j], false)?;
            if sup {
                out.push_str(&format!("[[{text}]]"));
            } else {
                out.push_str(&text);
            }
            i = j;
        }
        Ok(out)
    }
}

/// Counts of what happened to the traces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataStats {
    /// Records in the trace file.
    pub traces: usize,
    /// Failed or empty traces skipped.
    pub skipped_failed: usize,
    /// Samples longer than `max_len`, dropped.
    pub dropped_too_long: usize,
    /// Samples where EOS had to be appended (template without end-of-turn token).
    pub eos_appended: usize,
    /// Samples whose prompt/answer token boundary merged.
    pub boundary_merged: usize,
    /// Training samples.
    pub train: usize,
    /// Validation samples.
    pub val: usize,
    /// Tokens in the training split.
    pub train_tokens: usize,
    /// Supervised tokens in the training split.
    pub train_supervised: usize,
}

/// The encoded training and validation splits.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Training samples.
    pub train: Vec<Sample>,
    /// Held-out samples.
    pub val: Vec<Sample>,
    /// What was kept and dropped.
    pub stats: DataStats,
}

/// How many of `n` samples to hold out.
pub fn val_size(n: usize, fraction: f64, count: Option<usize>) -> usize {
    count
        .unwrap_or_else(|| (n as f64 * fraction).round() as usize)
        .min(n)
}

/// Encodes `traces` (skipping failed ones, dropping those over `max_len` tokens) and splits
/// off a seeded validation set.
pub fn build_dataset(
    traces: &[Trace],
    encoder: &Encoder,
    max_len: usize,
    val_fraction: f64,
    val_count: Option<usize>,
    seed: u64,
) -> Result<Dataset, TrainError> {
    let mut stats = DataStats {
        traces: traces.len(),
        ..Default::default()
    };
    let mut samples = Vec::new();
    for t in traces {
        let Some(msgs) = Encoder::trace_messages(t) else {
            stats.skipped_failed += 1;
            continue;
        };
        let (s, notes) = encoder.encode(&msgs, &t.id)?;
        stats.eos_appended += usize::from(notes.eos_appended);
        stats.boundary_merged += usize::from(notes.boundary_merged);
        if s.len() > max_len {
            stats.dropped_too_long += 1;
            continue;
        }
        samples.push(s);
    }
    let n_val = val_size(samples.len(), val_fraction, val_count);
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ VAL_SALT));
    let mut is_val = vec![false; samples.len()];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (s, v) in samples.into_iter().zip(is_val) {
        if v {
            val.push(s);
        } else {
            train.push(s);
        }
    }
    if train.is_empty() {
        return Err(TrainError::Data(format!(
            "no training samples: {} traces, {} failed, {} longer than max_len {max_len}, {} held \
             out for validation",
            stats.traces, stats.skipped_failed, stats.dropped_too_long, n_val
        )));
    }
    stats.train = train.len();
    stats.val = val.len();
    stats.train_tokens = train.iter().map(Sample::len).sum();
    stats.train_supervised = train.iter().map(Sample::n_supervised).sum();
    Ok(Dataset { train, val, stats })
}

/// A batch plan: batches of rows of sample indices (one sample per row unless packing).
pub type BatchPlan = Vec<Vec<Vec<usize>>>;

/// The seeded order of one epoch. Without packing: shuffle, sort by length within windows of
/// `bucket_window` batches, cut into batches of `batch_size`, shuffle the batches. With
/// packing: shuffle, then first-fit-decreasing into rows of `max_len` tokens within each
/// window, `batch_size` rows per batch, batches shuffled.
pub fn plan_epoch(
    lengths: &[usize],
    batch_size: usize,
    max_len: usize,
    packing: bool,
    bucket_window: usize,
    seed: u64,
    epoch: usize,
) -> BatchPlan {
    let mut rng = StdRng::seed_from_u64(seed ^ EPOCH_SALT.wrapping_mul(epoch as u64 + 1));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let window = (bucket_window * batch_size).max(1);
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for chunk in order.chunks(window) {
        let mut chunk = chunk.to_vec();
        chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        if packing {
            let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
            for i in chunk {
                match bins
                    .iter_mut()
                    .find(|(used, _)| used + lengths[i] <= max_len)
                {
                    Some((used, items)) => {
                        *used += lengths[i];
                        items.push(i);
                    }
                    None => bins.push((lengths[i], vec![i])),
                }
            }
            rows.extend(bins.into_iter().map(|(_, items)| items));
        } else {
            rows.extend(chunk.into_iter().map(|i| vec![i]));
        }
    }
    let mut batches: BatchPlan = rows.chunks(batch_size).map(<[_]>::to_vec).collect();
    batches.shuffle(&mut rng);
    batches
}

/// Plan of consecutive evaluation batches (sorted by length, no shuffling).
pub fn plan_eval(lengths: &[usize], batch_size: usize) -> BatchPlan {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    order
        .chunks(batch_size)
        .map(|c| c.iter().map(|&i| vec![i]).collect())
        .collect()
}

/// Number of supervised targets in a planned batch (no tensors built).
pub fn plan_supervised(samples: &[Sample], batch: &[Vec<usize>]) -> usize {
    batch
        .iter()
        .flatten()
        .map(|&i| samples.get(i).map(Sample::n_supervised).unwrap_or(0))
        .sum()
}

/// Tensors of one micro-batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(rows, seq)` u32 token ids (padding uses `pad_id`).
    pub input_ids: Tensor,
    /// Positions and attention mask (samples in a row do not see each other; padding is its
    /// own segment).
    pub packing: Packing,
    /// u32 indices into the flattened `rows * seq` positions whose next token is supervised.
    pub target_rows: Tensor,
    /// u32 target token ids, aligned with `target_rows`.
    pub targets: Tensor,
    /// Real (non-padding) tokens in the batch.
    pub n_tokens: usize,
    /// Supervised targets in the batch.
    pub n_supervised: usize,
    /// The teacher's top-k at each target, aligned with `targets` (response distillation).
    pub soft: Option<super::kd::SoftRows>,
    /// The teacher's states to match at the positions of `target_rows` (feature
    /// distillation).
    pub features: Vec<FeatureTarget>,
}

/// The teacher's hidden states for one student layer of a batch.
#[derive(Debug, Clone)]
pub struct FeatureTarget {
    /// The student's decoder layer (0-based).
    pub layer: usize,
    /// `(n_supervised, teacher hidden)` states of the paired teacher layer.
    pub teacher: Tensor,
    /// `(teacher hidden, student hidden)` map applied to the student's states first, when the
    /// widths differ.
    pub projection: Option<Tensor>,
}

/// Builds the tensors of one planned batch. Padding tokens form their own segment so that no
/// attention row is fully masked.
pub fn collate(
    samples: &[Sample],
    batch: &[Vec<usize>],
    pad_id: u32,
    device: &Device,
) -> Result<Batch, TrainError> {
    let get = |i: usize| {
        samples.get(i).ok_or_else(|| {
            TrainError::Data(format!("batch refers to sample {i} of {}", samples.len()))
        })
    };
    let mut seq = 0;
    for row in batch {
        let mut n = 0;
        for &i in row {
            n += get(i)?.len();
        }
        seq = seq.max(n);
    }
    if batch.is_empty() || seq == 0 {
        return Err(TrainError::Data("empty batch".into()));
    }
    let mut ids = Vec::with_capacity(batch.len() * seq);
    let mut segments = Vec::with_capacity(batch.len());
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    let mut n_tokens = 0;
    for (r, row) in batch.iter().enumerate() {
        let mut seg = Vec::with_capacity(seq);
        for (k, &i) in row.iter().enumerate() {
            let s = get(i)?;
            let offset = seg.len();
            for p in 1..s.len() {
                if s.mask[p] {
                    rows.push((r * seq + offset + p - 1) as u32);
                    targets.push(s.ids[p]);
                }
            }
            ids.extend_from_slice(&s.ids);
            seg.extend(std::iter::repeat_n(k as u32, s.len()));
            n_tokens += s.len();
        }
        let pad = seq - seg.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        seg.extend(std::iter::repeat_n(u32::MAX, pad));
        segments.push(seg);
    }
    let n_supervised = rows.len();
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (batch.len(), seq), device)?,
        packing: Packing::from_segments(&segments, None, device)?,
        target_rows: Tensor::from_vec(rows, n_supervised, device)?,
        targets: Tensor::from_vec(targets, n_supervised, device)?,
        n_tokens,
        n_supervised,
        soft: None,
        features: Vec::new(),
    })
}

/// What the preflight found (printed before training starts).
#[derive(Debug, Clone)]
pub struct Preflight {
    /// One rendered sample with its supervised spans in `[[...]]`.
    pub example: String,
    /// Samples whose last supervised token is an end-of-turn token.
    pub eos_supervised: usize,
    /// Batches checked.
    pub batches: usize,
}

/// Refuses to train when a planned batch has no supervised token or when no sample supervises
/// an end-of-turn token (the student would never learn to stop).
pub fn preflight(
    encoder: &Encoder,
    samples: &[Sample],
    plan: &BatchPlan,
) -> Result<Preflight, TrainError> {
    for (b, batch) in plan.iter().enumerate() {
        if plan_supervised(samples, batch) == 0 {
            let ids: Vec<&str> = batch
                .iter()
                .flatten()
                .filter_map(|&i| samples.get(i).map(|s| s.trace_id.as_str()))
                .collect();
            return Err(TrainError::Preflight(format!(
                "batch {b} would have zero supervised tokens (traces {ids:?}); the loss would be \
                 undefined. Check the chat template and the assistant answers"
            )));
        }
    }
    let eot = encoder.end_of_turn_ids();
    let eos_supervised = samples
        .iter()
        .filter(|s| {
            s.ids
                .iter()
                .zip(&s.mask)
                .rev()
                .find(|(_, m)| **m)
                .is_some_and(|(id, _)| eot.contains(id))
        })
        .count();
    if eos_supervised == 0 {
        return Err(TrainError::Preflight(format!(
            "no sample supervises an end-of-turn token (accepted ids {eot:?}); the student would \
             never learn to stop. Set `eot_token` or fix the chat template"
        )));
    }
    let example = match samples.first() {
        Some(s) => encoder.show(s)?,
        None => String::new(),
    };
    Ok(Preflight {
        example,
        eos_supervised,
        batches: plan.len(),
    })
}
