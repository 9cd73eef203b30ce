//! Crash recovery at start (DESIGN §9): a log whose last line is incomplete (the process or the
//! machine died mid-write) has that fragment moved to `<path>.torn-<UTC time>` (0600, on the
//! disk before the log is cut), and ends at its last whole record. The writer then continues
//! the chain with a `recovered` record naming the fragment's length, SHA-256 and file. Nothing
//! is deleted: the fragment is evidence too.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use super::record::sha256;

/// A fragment moved aside.
#[derive(Debug)]
pub(super) struct Torn {
    pub(super) len: u64,
    pub(super) sha256: String,
    pub(super) file: PathBuf,
}

/// How a `recovered` record names a fragment moved aside: `crash recovery: … ({len} bytes,
/// {sha256}), moved to {file}; …`, read back by [`check_fragment`].
const MOVED_TO: &str = ", moved to ";
const CONTINUES: &str = "; the chain continues from seq ";

impl Torn {
    /// The `recovered` record's reason for this fragment.
    pub(super) fn reason(&self, seq: u64) -> String {
        format!(
            "crash recovery: the log ended in an incomplete record ({} bytes, {}){MOVED_TO}{}{CONTINUES}{seq}",
            self.len,
            self.sha256,
            self.file.display()
        )
    }
}

/// For a `recovered` record's reason that names a fragment moved aside at start: whether the
/// fragment is still there, where it was written or beside `log` (a copied folder), with the
/// bytes the record names. `None` for other reasons.
pub(super) fn check_fragment(reason: &str, log: &Path) -> Option<String> {
    let rest = reason.strip_prefix("crash recovery: ")?;
    let (counted, rest) = rest.split_once(" bytes, ")?;
    let len: u64 = counted.rsplit('(').next()?.parse().ok()?;
    let (hash, rest) = rest.split_once(')')?;
    let file = rest.strip_prefix(MOVED_TO)?.split(CONTINUES).next()?;
    let named = PathBuf::from(file);
    let beside = log.with_file_name(named.file_name()?);
    let Some(found) = [named, beside].into_iter().find(|p| p.is_file()) else {
        return Some(format!("its fragment {file} is not found beside the log"));
    };
    Some(match std::fs::read(&found) {
        Ok(bytes) if bytes.len() as u64 == len && sha256(&bytes) == hash => {
            format!("its fragment {} is kept, unchanged", found.display())
        }
        Ok(_) => format!(
            "its fragment {} differs from what was moved aside",
            found.display()
        ),
        Err(e) => format!("its fragment {} cannot be read: {e}", found.display()),
    })
}

/// Backwards from the end, this much at a time, looking for the last newline.
const STEP: u64 = 64 * 1024;

/// If `file` (the log at `path`) does not end with a newline, move what follows its last
/// newline to a fragment file and cut the log there.
pub(super) fn cut_torn_tail(file: &mut File, path: &Path) -> io::Result<Option<Torn>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 || read_at(file, len - 1, 1)? == b"\n" {
        return Ok(None);
    }
    // The last newline, searched backwards: the fragment starts after it (or at 0).
    let mut end = len;
    let cut = loop {
        let start = end.saturating_sub(STEP);
        let chunk = read_at(file, start, end - start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            break start + i as u64 + 1;
        }
        if start == 0 {
            break 0;
        }
        end = start;
    };
    let fragment = read_at(file, cut, len - cut)?;
    let torn_path = fragment_path(path);
    let mut torn = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&torn_path)?;
    torn.write_all(&fragment)?;
    torn.sync_all()?;
    if let Some(dir) = torn_path.parent().and_then(|d| File::open(d).ok()) {
        let _ = dir.sync_all();
    }
    file.set_len(cut)?;
    file.sync_data()?;
    Ok(Some(Torn {
        len: fragment.len() as u64,
        sha256: sha256(&fragment),
        file: torn_path,
    }))
}

/// `<path>.torn-<UTC time>`, a name not yet taken.
fn fragment_path(path: &Path) -> PathBuf {
    let now = OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    (1..)
        .map(|n| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".torn-{stamp}"));
            if n > 1 {
                name.push(format!("-{n}"));
            }
            PathBuf::from(name)
        })
        .find(|p| !p.exists())
        .unwrap_or_else(|| path.with_extension("torn"))
}

/// Whether a file name is a fragment moved aside (not a log of its own).
pub(super) fn is_fragment(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().contains(".torn-"))
}

fn read_at(file: &mut File, at: u64, len: u64) -> io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(at))?;
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(len).read_to_end(&mut buf)?;
    Ok(buf)
}

/// The last non-empty line of a file that ends with a newline (read from its last 1 MiB).
pub(super) fn last_line(file: &mut File) -> io::Result<Option<String>> {
    let len = file.seek(SeekFrom::End(0))?;
    let start = len.saturating_sub(1 << 20);
    let tail = read_at(file, start, len - start)?;
    let tail = String::from_utf8_lossy(&tail);
    Ok(tail
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::to_string))
}
