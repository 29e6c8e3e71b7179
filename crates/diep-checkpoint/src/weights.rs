//! Memory-mapped safetensors weights, single-file or sharded.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::{CheckpointError, Result};

/// The file name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The file name of a sharded checkpoint's index.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8 + header length).
    data_start: usize,
}

#[derive(Clone)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The weights of a model directory: every tensor of every shard, memory-mapped, addressed
/// by its exact on-disk name.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
}

/// A borrowed view of one tensor in a [`Checkpoint`].
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    /// The tensor name, as on disk.
    pub name: &'a str,
    /// The file it lives in.
    pub path: &'a Path,
    /// Its dtype on disk.
    pub dtype: Dtype,
    /// Its shape on disk.
    pub shape: &'a [usize],
    /// Its raw little-endian bytes (memory-mapped).
    pub bytes: &'a [u8],
    /// The mapping the bytes live in and their offset there (for [`TensorRef::release`]).
    map: &'a Mmap,
    offset: usize,
}

impl TensorRef<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Decodes to f32 (from f32, f16 or bf16), then [releases](TensorRef::release) the mapped
    /// pages: the caller holds its own copy, so streaming a checkpoint tensor by tensor keeps
    /// only the tensors in use resident, not every page read so far.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let out = decode_to_f32(self.bytes, self.dtype).ok_or_else(|| CheckpointError::UnsupportedDtype {
            name: self.name.to_string(),
            path: self.path.to_path_buf(),
            dtype: self.dtype,
        })?;
        self.release();
        Ok(out)
    }

    /// Drops this tensor's pages from the process's memory (`madvise(MADV_DONTNEED)` on the
    /// pages that lie wholly inside the tensor). The mapping stays valid: reading `bytes`
    /// again faults the pages back in from the file (usually still in the page cache). A no-op
    /// where the call is unsupported.
    pub fn release(&self) {
        const PAGE: usize = 4096;
        let start = self.offset.div_ceil(PAGE) * PAGE;
        let end = (self.offset + self.bytes.len()) / PAGE * PAGE;
        if end > start {
            // SAFETY: the mapping is a read-only, private mapping of a file this process does
            // not write; MADV_DONTNEED only discards the process's copies of its pages, which
            // later reads fault back in unchanged from the file. No reference observes a change.
            #[allow(unsafe_code)]
            let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    /// Checks the shape against what the config implies.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(CheckpointError::ShapeMismatch {
                name: self.name.to_string(),
                path: self.path.to_path_buf(),
                expected: expected.to_vec(),
                found: self.shape.to_vec(),
            });
        }
        Ok(())
    }
}

/// Decodes little-endian f32, f16 or bf16 bytes to f32; `None` for other dtypes.
pub fn decode_to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => return None,
    })
}

impl Checkpoint {
    /// Opens the weights of a model directory: `model.safetensors.index.json` (sharded) if
    /// present, else `model.safetensors`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index = dir.join(SHARD_INDEX);
        if index.is_file() {
            return Self::open_sharded(&dir, &index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_files(&dir, vec![single], None);
        }
        Err(CheckpointError::NoWeights { dir })
    }

    /// Opens one safetensors file on its own (e.g. a file of reference tensors).
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::open_files(&dir, vec![path.to_path_buf()], None)
    }

    fn open_sharded(dir: &Path, index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index)
            .map_err(|source| CheckpointError::Io { path: index.to_path_buf(), source })?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|source| CheckpointError::Json { path: index.to_path_buf(), source })?;
        let bad = |reason: String| CheckpointError::ShardIndex { path: index.to_path_buf(), reason };
        let map = value
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("missing object `weight_map`".into()))?;
        let mut files: Vec<String> = Vec::new();
        let mut expected: HashMap<String, String> = HashMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| bad(format!("`weight_map.{name}` must be a file name")))?;
            if !is_plain_relative(file) {
                return Err(bad(format!("`weight_map.{name}` names `{file}`, which is outside the model directory")));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
            expected.insert(name.clone(), file.to_string());
        }
        files.sort();
        let paths = files.iter().map(|f| dir.join(f)).collect();
        let ckpt = Self::open_files(dir, paths, Some(index))?;
        // Every tensor must be where the index says it is.
        for (name, file) in &expected {
            match ckpt.entries.get(name) {
                None => {
                    return Err(CheckpointError::MissingTensor { name: name.clone(), location: dir.join(file) });
                }
                Some(e) if ckpt.shards[e.shard].path != dir.join(file) => {
                    return Err(bad(format!(
                        "`{name}` is listed in {file} but stored in {}",
                        ckpt.shards[e.shard].path.display()
                    )));
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = ckpt.entries.keys().find(|n| !expected.contains_key(*n)) {
            return Err(bad(format!("tensor `{extra}` is stored in a shard but not listed in `weight_map`")));
        }
        Ok(ckpt)
    }

    fn open_files(dir: &Path, paths: Vec<PathBuf>, index: Option<&Path>) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut entries = BTreeMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let file = File::open(&path).map_err(|source| CheckpointError::Io { path: path.clone(), source })?;
            // SAFETY: the file is opened read-only and mapped privately; like every
            // safetensors reader we assume it is not truncated by another process while mapped.
            #[allow(unsafe_code)]
            let mmap =
                unsafe { Mmap::map(&file) }.map_err(|source| CheckpointError::Io { path: path.clone(), source })?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| CheckpointError::Safetensors { path: path.clone(), reason: describe(&e, mmap.len()) })?;
            for (name, info) in metadata.tensors() {
                if let Some(prev) = entries.get(&name).map(|e: &Entry| e.shard) {
                    let prev_path: &Path = &shards.get(prev).map(|s: &Shard| s.path.clone()).unwrap_or_default();
                    return Err(CheckpointError::ShardIndex {
                        path: index.unwrap_or(&path).to_path_buf(),
                        reason: format!(
                            "tensor `{name}` is stored twice: in {} and {}",
                            prev_path.display(),
                            path.display()
                        ),
                    });
                }
                entries.insert(
                    name,
                    Entry {
                        shard: i,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: info.data_offsets.0,
                        end: info.data_offsets.1,
                    },
                );
            }
            shards.push(Shard { path, mmap, data_start: 8 + header_len });
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, entries })
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The tensors under `prefix`, renamed without it (a multimodal wrapper's text model,
    /// [`ModelConfig::tensor_prefix`](crate::ModelConfig::tensor_prefix)); an empty prefix keeps
    /// everything.
    pub fn text_view(mut self, prefix: &str) -> Self {
        if !prefix.is_empty() {
            self.entries = std::mem::take(&mut self.entries)
                .into_iter()
                .filter_map(|(k, e)| k.strip_prefix(prefix).map(|s| (s.to_string(), e)))
                .collect();
        }
        self
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The files holding the weights.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// A tensor by its exact on-disk name.
    pub fn get(&self, name: &str) -> Result<TensorRef<'_>> {
        let (key, e) = self.entries.get_key_value(name).ok_or_else(|| CheckpointError::MissingTensor {
            name: name.to_string(),
            location: if self.shards.len() == 1 { self.shards[0].path.clone() } else { self.dir.clone() },
        })?;
        let shard = &self.shards[e.shard];
        Ok(TensorRef {
            name: key,
            path: &shard.path,
            dtype: e.dtype,
            shape: &e.shape,
            bytes: &shard.mmap[shard.data_start + e.start..shard.data_start + e.end],
            map: &shard.mmap,
            offset: shard.data_start + e.start,
        })
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> usize {
        self.entries.values().map(|e| e.end - e.start).sum()
    }

    /// The dtype most tensors are stored in (by bytes), e.g. to report "bf16 checkpoint".
    pub fn dominant_dtype(&self) -> Option<Dtype> {
        let mut by: BTreeMap<Dtype, usize> = BTreeMap::new();
        for e in self.entries.values() {
            *by.entry(e.dtype).or_default() += e.end - e.start;
        }
        by.into_iter().max_by_key(|(_, b)| *b).map(|(d, _)| d)
    }
}

/// A shard path must be a plain file name (or relative path) that stays inside the directory.
fn is_plain_relative(file: &str) -> bool {
    let p = Path::new(file);
    !file.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

fn describe(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("file is {file_len} bytes, too short for the 8-byte header length"),
        E::InvalidHeaderLength => {
            format!("header length runs beyond the end of the file ({file_len} bytes)")
        }
        E::MetadataIncompleteBuffer => format!(
            "tensor data does not end where the file ends ({file_len} bytes): the file is truncated or has trailing bytes"
        ),
        E::HeaderTooLarge => "header is larger than 100 MB".to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn decodes_all_float_dtypes() {
        let vals = [1.5f32, -2.25, 0.0, 3.0e-3];
        assert_eq!(decode_to_f32(&f32_bytes(&vals), Dtype::F32).unwrap(), vals);
        let h: Vec<u8> = vals.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
        let b: Vec<u8> = vals.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
        for (bytes, dt, tol) in [(h, Dtype::F16, 1e-3), (b, Dtype::BF16, 1e-2)] {
            let out = decode_to_f32(&bytes, dt).unwrap();
            for (a, e) in out.iter().zip(vals) {
                assert!((a - e).abs() <= tol * e.abs().max(1e-3), "{dt:?}: {a} vs {e}");
            }
        }
        assert!(decode_to_f32(&[0u8; 4], Dtype::I32).is_none());
    }

    #[test]
    fn single_and_sharded() {
        let dir = tempfile::tempdir().unwrap();
        write_st(&dir.path().join("a.safetensors"), &[("x", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0]))]);
        write_st(&dir.path().join("b.safetensors"), &[("y", Dtype::F32, vec![1, 1], f32_bytes(&[3.0]))]);
        std::fs::write(
            dir.path().join(SHARD_INDEX),
            r#"{"metadata":{},"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#,
        )
        .unwrap();
        let c = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(c.names().collect::<Vec<_>>(), vec!["x", "y"]);
        assert_eq!(c.get("y").unwrap().to_f32().unwrap(), vec![3.0]);
        assert_eq!(c.get("x").unwrap().shape, &[2]);
        let err = c.get("z").err().unwrap().to_string();
        assert!(err.contains("`z`"), "{err}");
        let err = c.get("y").unwrap().expect_shape(&[2]).unwrap_err().to_string();
        assert!(err.contains("b.safetensors") && err.contains("`y`"), "{err}");
    }

    #[test]
    fn index_outside_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SHARD_INDEX), r#"{"weight_map":{"x":"../evil.safetensors"}}"#).unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("outside the model directory") && err.contains(SHARD_INDEX), "{err}");
        std::fs::write(dir.path().join(SHARD_INDEX), r#"{"weight_map":{"x":"/etc/passwd"}}"#).unwrap();
        assert!(Checkpoint::open(dir.path()).is_err());
    }

    #[test]
    fn truncated_and_bad_header_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        write_st(&path, &[("x", Dtype::F32, vec![4], f32_bytes(&[1.0, 2.0, 3.0, 4.0]))]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");

        let mut f = File::create(&path).unwrap();
        f.write_all(&(1_000_000u64).to_le_bytes()).unwrap();
        f.write_all(b"{}").unwrap();
        drop(f);
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("beyond the end of the file"), "{err}");

        std::fs::write(&path, [1u8, 2]).unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("too short"), "{err}");
    }

    #[test]
    fn no_weights() {
        let dir = tempfile::tempdir().unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("no weights found"), "{err}");
    }
}
