//! Multiple-choice tasks: lm-evaluation-harness's zero-shot templates over local JSONL files
//! in each HuggingFace dataset's own schema, and a generic format.
//!
//! Every template reproduces the task's YAML in lm-eval 0.4.x (`doc_to_text`,
//! `doc_to_choice`, `doc_to_target`, the `description` of MMLU subjects, hellaswag's
//! `process_docs` and winogrande's partial scoring); `fixtures/eval/templates.json`, written
//! by lm-eval itself (`scripts/gen_lm_eval_goldens.py`), is the test reference.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

use crate::EvalError;

/// A task's document format and template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskFormat {
    /// `{"context": str, "choices": [str], "gold": int}`; continuation `" " + choice`.
    Generic,
    /// SuperGLUE BoolQ: `passage`, `question`, `label` (0 = no, 1 = yes).
    Boolq,
    /// GLUE RTE: `sentence1`, `sentence2`, `label` (0 = entailment = "True").
    Rte,
    /// OpenBookQA: `question_stem`, `choices.{text,label}`, `answerKey`.
    Openbookqa,
    /// ARC-Easy: `question`, `choices.{text,label}`, `answerKey`.
    ArcEasy,
    /// ARC-Challenge: as ARC-Easy.
    ArcChallenge,
    /// HellaSwag: `activity_label`, `ctx_a`, `ctx_b`, `endings`, `label`.
    Hellaswag,
    /// WinoGrande: `sentence` with one `_`, `option1`, `option2`, `answer` ("1" or "2").
    Winogrande,
    /// PIQA: `goal`, `sol1`, `sol2`, `label`.
    Piqa,
    /// MMLU: `question`, `choices` (4), `answer`; the description names the subject, from
    /// the task name (`mmlu_<subject>`) or else each document's `subject` field.
    Mmlu {
        /// The subject with underscores, when the task name gives it.
        subject: Option<String>,
    },
}

impl TaskFormat {
    /// The format a task name implies: lm-eval's task names (`boolq`, `rte`, `openbookqa`,
    /// `arc_easy`, `arc_challenge`, `hellaswag`, `winogrande`, `piqa`, `mmlu`,
    /// `mmlu_<subject>`) and `generic`.
    pub fn from_task_name(name: &str) -> Option<Self> {
        Some(match name {
            "generic" => Self::Generic,
            "boolq" => Self::Boolq,
            "rte" => Self::Rte,
            "openbookqa" => Self::Openbookqa,
            "arc_easy" => Self::ArcEasy,
            "arc_challenge" => Self::ArcChallenge,
            "hellaswag" => Self::Hellaswag,
            "winogrande" => Self::Winogrande,
            "piqa" => Self::Piqa,
            "mmlu" => Self::Mmlu { subject: None },
            n => match n.strip_prefix("mmlu_") {
                Some(s) if !s.is_empty() => Self::Mmlu { subject: Some(s.to_owned()) },
                _ => return None,
            },
        })
    }

    /// The formats' names, for help texts and errors.
    pub const NAMES: &'static str =
        "generic, boolq, rte, openbookqa, arc_easy, arc_challenge, hellaswag, winogrande, piqa, mmlu, mmlu_<subject>";
}

impl FromStr for TaskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::from_task_name(s).ok_or_else(|| format!("unknown task format `{s}` (known: {})", Self::NAMES))
    }
}

/// One multiple-choice document, ready to score.
#[derive(Debug, Clone, PartialEq)]
pub struct McDoc {
    /// The `(context, continuation)` requests, one per choice.
    pub requests: Vec<(String, String)>,
    /// The choice strings lm-eval's `acc_norm` divides by (their length in characters).
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub gold: usize,
}

/// lm-eval's `target_delimiter`.
const DELIM: &str = " ";

struct Doc<'a> {
    value: &'a Value,
    path: &'a Path,
    line: usize,
}

impl Doc<'_> {
    fn err(&self, reason: impl std::fmt::Display) -> EvalError {
        EvalError::Input { path: self.path.into(), reason: format!("line {}: {reason}", self.line) }
    }
    fn field(&self, name: &str) -> Result<&Value, EvalError> {
        let mut v = self.value;
        for part in name.split('.') {
            v = v.get(part).ok_or_else(|| self.err(format!("missing field `{name}`")))?;
        }
        Ok(v)
    }
    fn str(&self, name: &str) -> Result<String, EvalError> {
        // Jinja renders numbers and strings alike.
        match self.field(name)? {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            _ => Err(self.err(format!("field `{name}` must be a string"))),
        }
    }
    fn strings(&self, name: &str) -> Result<Vec<String>, EvalError> {
        let arr = self.field(name)?.as_array().ok_or_else(|| self.err(format!("field `{name}` must be a list")))?;
        arr.iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| self.err(format!("field `{name}` must hold strings"))))
            .collect()
    }
    fn index(&self, name: &str) -> Result<usize, EvalError> {
        match self.field(name)? {
            Value::Number(n) => n.as_u64().map(|x| x as usize),
            Value::String(s) => s.trim().parse().ok(),
            Value::Bool(b) => Some(*b as usize),
            _ => None,
        }
        .ok_or_else(|| self.err(format!("field `{name}` must be a non-negative integer")))
    }
    fn label_index(&self, labels: &[String], key: &str) -> Result<usize, EvalError> {
        labels
            .iter()
            .position(|l| l == key)
            .ok_or_else(|| self.err(format!("`answerKey` {key:?} is not one of `choices.label` {labels:?}")))
    }
}

fn same_context(context: String, choices: &[String]) -> Vec<(String, String)> {
    choices.iter().map(|c| (context.clone(), format!("{DELIM}{c}"))).collect()
}

/// Python's `str.capitalize()`: the first character upper-cased, the rest lower-cased.
fn py_capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars.flat_map(char::to_lowercase)).collect(),
        None => String::new(),
    }
}

/// `re.sub("\\[.*?\\]", "", text)`: removes each `[...]` that does not span a line break.
fn remove_brackets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let close = after.find(']').filter(|&c| !after[..c].contains('\n'));
        match close {
            Some(c) => {
                out.push_str(&rest[..open]);
                rest = &after[c + 1..];
            }
            None => {
                out.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// lm-eval's hellaswag `preprocess`.
pub fn hellaswag_preprocess(text: &str) -> String {
    let text = text.trim_matches(crate::tokenize::is_python_whitespace);
    let text = text.replace(" [title]", ". ");
    let text = remove_brackets(&text);
    text.replace("  ", " ")
}

fn mmlu_description(subject: &str) -> String {
    format!("The following are multiple choice questions (with answers) about {}.\n\n", subject.replace('_', " "))
}

impl TaskFormat {
    /// Renders one document (a parsed JSON line) into requests, choices and gold.
    fn render(&self, d: &Doc<'_>) -> Result<McDoc, EvalError> {
        let doc = match self {
            Self::Generic => {
                let choices = d.strings("choices")?;
                McDoc { requests: same_context(d.str("context")?, &choices), gold: d.index("gold")?, choices }
            }
            Self::Boolq => {
                let ctx = format!("{}\nQuestion: {}?\nAnswer:", d.str("passage")?, d.str("question")?);
                let choices = vec!["no".to_owned(), "yes".to_owned()];
                McDoc { requests: same_context(ctx, &choices), gold: d.index("label")?, choices }
            }
            Self::Rte => {
                let ctx = format!("{}\nQuestion: {} True or False?\nAnswer:", d.str("sentence1")?, d.str("sentence2")?);
                let choices = vec!["True".to_owned(), "False".to_owned()];
                McDoc { requests: same_context(ctx, &choices), gold: d.index("label")?, choices }
            }
            Self::Openbookqa => {
                let choices = d.strings("choices.text")?;
                let labels = d.strings("choices.label")?;
                let key = d.str("answerKey")?;
                let gold = d.label_index(&labels, key.trim_start_matches(crate::tokenize::is_python_whitespace))?;
                McDoc { requests: same_context(d.str("question_stem")?, &choices), gold, choices }
            }
            Self::ArcEasy | Self::ArcChallenge => {
                let choices = d.strings("choices.text")?;
                let labels = d.strings("choices.label")?;
                let gold = d.label_index(&labels, &d.str("answerKey")?)?;
                let ctx = format!("Question: {}\nAnswer:", d.str("question")?);
                McDoc { requests: same_context(ctx, &choices), gold, choices }
            }
            Self::Hellaswag => {
                let ctx = format!("{} {}", d.str("ctx_a")?, py_capitalize(&d.str("ctx_b")?));
                let query = hellaswag_preprocess(&format!("{}: {ctx}", d.str("activity_label")?));
                let choices: Vec<String> = d.strings("endings")?.iter().map(|e| hellaswag_preprocess(e)).collect();
                McDoc { requests: same_context(query, &choices), gold: d.index("label")?, choices }
            }
            Self::Winogrande => {
                let sentence = d.str("sentence")?;
                let blank = sentence.find('_').ok_or_else(|| d.err("`sentence` has no `_` blank"))?;
                let target = sentence[blank + 1..].trim_matches(crate::tokenize::is_python_whitespace).to_owned();
                let choices: Vec<String> = [d.str("option1")?, d.str("option2")?]
                    .iter()
                    .map(|o| format!("{}{o}", &sentence[..blank]))
                    .collect();
                let gold = match d.str("answer")?.as_str() {
                    "1" => 0,
                    "2" => 1,
                    a => return Err(d.err(format!("`answer` must be \"1\" or \"2\", not {a:?}"))),
                };
                let requests = choices.iter().map(|c| (c.clone(), format!("{DELIM}{target}"))).collect();
                McDoc { requests, choices, gold }
            }
            Self::Piqa => {
                let choices = vec![d.str("sol1")?, d.str("sol2")?];
                let ctx = format!("Question: {}\nAnswer:", d.str("goal")?);
                McDoc { requests: same_context(ctx, &choices), gold: d.index("label")?, choices }
            }
            Self::Mmlu { subject } => {
                let subject = match subject {
                    Some(s) => s.clone(),
                    None => d.str("subject").map_err(|_| {
                        d.err("MMLU documents need a `subject` field, or name the task `mmlu_<subject>`")
                    })?,
                };
                let c = d.strings("choices")?;
                if c.len() != 4 {
                    return Err(d.err(format!("MMLU `choices` must have 4 entries, not {}", c.len())));
                }
                let question = d.str("question")?;
                let ctx = format!(
                    "{}{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
                    mmlu_description(&subject),
                    question.trim_matches(crate::tokenize::is_python_whitespace),
                    c[0],
                    c[1],
                    c[2],
                    c[3]
                );
                let choices: Vec<String> = ["A", "B", "C", "D"].map(str::to_owned).to_vec();
                McDoc { requests: same_context(ctx, &choices), gold: d.index("answer")?, choices }
            }
        };
        if doc.choices.is_empty() {
            return Err(d.err("the document has no choices"));
        }
        if doc.gold >= doc.choices.len() {
            return Err(d.err(format!("gold index {} is out of range for {} choices", doc.gold, doc.choices.len())));
        }
        Ok(doc)
    }
}

/// Reads a JSONL task file (one document per line; blank lines are skipped) and renders every
/// document with `format`. Errors name the file, the line and the field.
pub fn load_task(path: impl AsRef<Path>, format: &TaskFormat) -> Result<Vec<McDoc>, EvalError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io { path: PathBuf::from(path), source })?;
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| EvalError::Input {
            path: path.into(),
            reason: format!("line {}: invalid JSON: {e}", i + 1),
        })?;
        docs.push(format.render(&Doc { value: &value, path, line: i + 1 })?);
    }
    if docs.is_empty() {
        return Err(EvalError::Input { path: path.into(), reason: "no documents".into() });
    }
    Ok(docs)
}
