//! Atomic writes: nothing is ever left half-written where a reader looks.
//!
//! - [`write_atomic`]: a file is written to a temporary sibling, then renamed over the target.
//! - [`Staging`]: a directory (a pruned checkpoint, a fixture, a benchmark report) is built in a
//!   staging directory beside its destination and renamed into place by [`Staging::commit`];
//!   dropped uncommitted, it removes itself and any parent directories it created.
//! - [`remove_stale_staging`]: a run killed with `SIGKILL` cannot clean up. Staging names record
//!   their owner — `.{name}.diep-staging.{pid}.{start}.{seq}`, with the process id and the
//!   process's start time (clock ticks since boot, from `/proc/self/stat`) — so a later run on
//!   the same destination can tell a live owner from a dead one (a recycled process id has
//!   another start time) and remove what the dead one left. Staging directories of older
//!   versions, `.{name}.tmp-{pid}[-{seq}]`, are recognised by process id alone.
//!
//! Errors are [`std::io::Error`]s whose message names the path concerned.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The marker between a destination's name and its owner in staging names.
const MARK: &str = ".diep-staging.";

fn with_path(path: &Path, what: &str) -> impl FnOnce(io::Error) -> io::Error {
    let path = path.display().to_string();
    let what = what.to_string();
    move |e| io::Error::new(e.kind(), format!("{what} {path}: {e}"))
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn file_name(path: &Path) -> io::Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{} has no file name", path.display())))
}

/// This process's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`), or
/// `None` where `/proc` does not exist.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The unique suffix of this process's temporary names: `{pid}.{start}.{seq}`.
fn owner_tag() -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let pid = std::process::id();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{pid}.{}.{seq}", start_time(pid).unwrap_or(0))
}

/// Writes `contents` to `path` atomically: a temporary sibling, then a rename. Creates the
/// parent directory if needed.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = parent_of(path);
    std::fs::create_dir_all(&dir).map_err(with_path(&dir, "creating"))?;
    let tmp = dir.join(format!(".{}{MARK}{}", file_name(path)?, owner_tag()));
    if let Err(e) = std::fs::write(&tmp, contents) {
        let _ = std::fs::remove_file(&tmp);
        return Err(with_path(&tmp, "writing")(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        with_path(path, "renaming a temporary file onto")(e)
    })
}

/// A directory being built beside its destination; see the [module docs](self).
#[derive(Debug)]
pub struct Staging {
    path: PathBuf,
    /// Ancestors of the destination this staging created, deepest first (removed again when
    /// dropped uncommitted).
    created: Vec<PathBuf>,
    committed: bool,
}

/// Why [`Staging::commit`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum CommitError {
    /// The destination exists and `force` was not given.
    Exists(PathBuf),
    /// Removing the old destination or renaming failed.
    Io(io::Error),
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommitError::Exists(p) => write!(f, "{} already exists (use --force to replace it)", p.display()),
            CommitError::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for CommitError {}

impl Staging {
    /// Creates an empty staging directory beside `dest` (creating `dest`'s parents if needed).
    pub fn create(dest: &Path) -> io::Result<Self> {
        let name = file_name(dest)?;
        let parent = parent_of(dest);
        let mut created = Vec::new();
        let mut p = parent.as_path();
        while std::fs::symlink_metadata(p).is_err() {
            created.push(p.to_path_buf());
            match p.parent() {
                Some(q) if !q.as_os_str().is_empty() => p = q,
                _ => break,
            }
        }
        std::fs::create_dir_all(&parent).map_err(with_path(&parent, "creating"))?;
        let staging = Staging { path: parent.join(format!(".{name}{MARK}{}", owner_tag())), created, committed: false };
        std::fs::create_dir(&staging.path).map_err(with_path(&staging.path, "creating"))?;
        Ok(staging)
    }

    /// The staging directory, to write into.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the staging directory to `dest`. An existing `dest` is an error unless `force`,
    /// which removes it first.
    pub fn commit(mut self, dest: &Path, force: bool) -> Result<(), CommitError> {
        if let Ok(meta) = std::fs::symlink_metadata(dest) {
            if !force {
                return Err(CommitError::Exists(dest.to_path_buf()));
            }
            let removed = if meta.is_dir() { std::fs::remove_dir_all(dest) } else { std::fs::remove_file(dest) };
            removed.map_err(with_path(dest, "removing")).map_err(CommitError::Io)?;
        }
        std::fs::rename(&self.path, dest)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("moving {} into place at {}: {e}", self.path.display(), dest.display()),
                )
            })
            .map_err(CommitError::Io)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
            for dir in &self.created {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// A staging directory (or temporary file) left by a process that no longer runs, removed by
/// [`remove_stale_staging`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleStaging {
    /// What was removed.
    pub path: PathBuf,
    /// The process that had created it.
    pub pid: u32,
}

/// Whether the process that wrote `tag` (`{pid}.{start}.{seq}`, or an older `{pid}[-{seq}]`)
/// is gone. `None` where that cannot be told (no `/proc`): then nothing is removed.
fn owner_gone(tag: &str) -> Option<(u32, bool)> {
    let (pid, start) = match tag.split('.').collect::<Vec<_>>()[..] {
        [pid, start, _seq] => (pid.parse::<u32>().ok()?, Some(start.parse::<u64>().ok()?)),
        _ => (tag.split('-').next()?.parse::<u32>().ok()?, None),
    };
    std::fs::metadata("/proc/self/stat").ok()?;
    let gone = match (start_time(pid), start) {
        (None, _) => true,
        (Some(now), Some(then)) => then != 0 && now != then,
        (Some(_), None) => false,
    };
    Some((pid, gone))
}

/// Removes the staging directories and temporary files of `dest` whose owning process has
/// exited (killed runs), and returns what was removed. Those of running processes, this one
/// included, are left alone. Where process liveness cannot be checked (no `/proc`), nothing is
/// removed.
pub fn remove_stale_staging(dest: &Path) -> io::Result<Vec<StaleStaging>> {
    let name = file_name(dest)?;
    let parent = parent_of(dest);
    let entries = match std::fs::read_dir(&parent) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(with_path(&parent, "listing")(e)),
    };
    let (new_prefix, old_prefix) = (format!(".{name}{MARK}"), format!(".{name}.tmp-"));
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(with_path(&parent, "listing"))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(tag) = file.strip_prefix(&new_prefix).or_else(|| file.strip_prefix(&old_prefix)) else { continue };
        let Some((pid, true)) = owner_gone(tag) else { continue };
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(with_path(&path, "inspecting"))?;
        let result = if meta.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        result.map_err(with_path(&path, "removing the stale"))?;
        removed.push(StaleStaging { path, pid });
    }
    removed.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_file_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/out.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> =
            std::fs::read_dir(dir.path().join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["out.json"]);
    }

    #[test]
    fn staging_commits_or_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a/b/out");
        {
            let s = Staging::create(&dest).unwrap();
            std::fs::write(s.path().join("x"), b"1").unwrap();
            // Dropped uncommitted: the staging and the parents it created are gone.
        }
        assert!(!dir.path().join("a").exists());
        let s = Staging::create(&dest).unwrap();
        std::fs::write(s.path().join("x"), b"1").unwrap();
        s.commit(&dest, false).unwrap();
        assert_eq!(std::fs::read(dest.join("x")).unwrap(), b"1");
        let s = Staging::create(&dest).unwrap();
        assert!(matches!(s.commit(&dest, false), Err(CommitError::Exists(_))));
        let s = Staging::create(&dest).unwrap();
        s.commit(&dest, true).unwrap();
        assert!(!dest.join("x").exists());
        assert_eq!(std::fs::read_dir(dir.path().join("a/b")).unwrap().count(), 1);
    }

    #[test]
    fn stale_staging_of_dead_processes_is_removed() {
        if start_time(std::process::id()).is_none() {
            return; // no /proc: liveness cannot be told, nothing is removed (documented)
        }
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        // A live owner: this process's own staging is kept.
        let mine = Staging::create(&dest).unwrap();
        // A dead owner: a process that ran and exited.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = dir.path().join(format!(".out{MARK}{dead}.12345.0"));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("model.safetensors"), b"partial").unwrap();
        // An older version's name, and a recycled pid: our pid with another start time.
        let old = dir.path().join(format!(".out.tmp-{dead}-0"));
        std::fs::create_dir(&old).unwrap();
        let recycled = dir.path().join(format!(".out{MARK}{}.1.0", std::process::id()));
        std::fs::create_dir(&recycled).unwrap();
        // Someone else's destination is not touched.
        let other = dir.path().join(format!(".other{MARK}{dead}.12345.0"));
        std::fs::create_dir(&other).unwrap();
        let removed = remove_stale_staging(&dest).unwrap();
        let mut expect = vec![stale.clone(), old.clone(), recycled.clone()];
        expect.sort();
        assert_eq!(removed.iter().map(|r| r.path.clone()).collect::<Vec<_>>(), expect);
        assert!(mine.path().exists() && other.exists() && !stale.exists() && !old.exists());
    }
}
