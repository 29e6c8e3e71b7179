//! Typed access to `config.json` fields, with errors that name the file and the field.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{CheckpointError, Result};

/// Typed access to config fields with errors that name the file and the field.
pub(crate) struct Fields<'a> {
    /// The config object.
    pub(crate) map: &'a Map<String, Value>,
    /// The file it was read from, for error messages.
    pub(crate) path: &'a Path,
}

impl Fields<'_> {
    pub(crate) fn missing(&self, field: &str) -> CheckpointError {
        CheckpointError::MissingField { path: self.path.to_path_buf(), field: field.into() }
    }

    pub(crate) fn invalid(&self, field: &str, reason: String) -> CheckpointError {
        CheckpointError::InvalidField { path: self.path.to_path_buf(), field: field.into(), reason }
    }

    pub(crate) fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// `layer_types`, one entry per layer, each `marked` (→ true) or `"full_attention"`
    /// (→ false): gpt-oss's `sliding_attention`, Llama 4's `chunked_attention`, Qwen3-Next's
    /// `linear_attention`. `None` when absent.
    pub(crate) fn opt_layer_types(&self, num_layers: usize, marked: &str) -> Result<Option<Vec<bool>>> {
        const FIELD: &str = "layer_types";
        let items = match self.get(FIELD) {
            None => return Ok(None),
            Some(Value::Array(items)) => items,
            Some(v) => return Err(self.invalid(FIELD, format!("expected a list, found {v}"))),
        };
        if items.len() != num_layers {
            return Err(self.invalid(FIELD, format!("has {} entries for {num_layers} layers", items.len())));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v.as_str() {
                Some(t) if t == marked => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(self.invalid(FIELD, format!("entry {i} is {v}; expected \"{marked}\" or \"full_attention\""))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub(crate) fn req_str(&self, field: &str) -> Result<String> {
        self.opt_str(field)?.ok_or_else(|| self.missing(field))
    }

    pub(crate) fn opt_str(&self, field: &str) -> Result<Option<String>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.invalid(field, format!("expected a string, found {v}"))),
        }
    }

    pub(crate) fn req_usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?.ok_or_else(|| self.missing(field))
    }

    pub(crate) fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => as_usize(v)
                .map(Some)
                .ok_or_else(|| self.invalid(field, format!("expected a non-negative integer, found {v}"))),
        }
    }

    pub(crate) fn opt_usize_list(&self, field: &str) -> Result<Option<Vec<usize>>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(as_usize)
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| self.invalid(field, "expected a list of non-negative integers".into())),
            Some(v) => Err(self.invalid(field, format!("expected a list, found {v}"))),
        }
    }

    pub(crate) fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.invalid(field, format!("expected a number, found {v}"))),
        }
    }

    pub(crate) fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.invalid(field, format!("expected true or false, found {v}"))),
        }
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    if let Some(u) = v.as_u64() {
        return usize::try_from(u).ok();
    }
    // Some writers store integers as floats (e.g. 8.0).
    v.as_f64().filter(|x| *x >= 0.0 && x.fract() == 0.0 && *x < 2f64.powi(53)).map(|x| x as usize)
}
