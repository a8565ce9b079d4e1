//! Bulk wakes kept beside the embedded store: one directory, `bulk-jobs`,
//! in the data directory, with for each job `<id>.json` (its definition
//! and last checkpoint, replaced atomically) and, for a selection by ids,
//! `<id>.ids` (one id per line, written once). One gateway runs every
//! job, in one walk over all partitions: the file keeps that walk's
//! checkpoint.
//!
//! A file is replaced by writing a temporary file, syncing it, renaming it
//! over the old one and syncing the directory, so a crash leaves the old
//! checkpoint or the new one. A file that cannot be read at start is set
//! aside as `<name>.damaged` and named in the log; it never stops the
//! gateway from starting.

use crate::core::bulk::{BookError, Checkpoint, JobBook, JobDef, StoredJob};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The directory under the data directory.
pub const JOBS_DIR: &str = "bulk-jobs";
/// The name of a job's one walk.
const WALK: &str = "main";

/// One job file: the definition and the last checkpoint.
#[derive(serde::Serialize, serde::Deserialize)]
struct JobFile {
    def: JobDef,
    checkpoint: Option<Checkpoint>,
}

/// Bulk wakes kept as files in a directory.
pub struct FileJobBook {
    dir: PathBuf,
    /// Serialises writers: the definition is read back to write a
    /// checkpoint beside it.
    lock: parking_lot::Mutex<()>,
}

fn err(what: &str, path: &Path, e: impl std::fmt::Display) -> BookError {
    BookError(format!("cannot {what} {}: {e}", path.display()))
}

/// Job ids are made by the gateway; anything else is never a file name.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl FileJobBook {
    /// The book in `data_dir`, creating its directory.
    pub fn open(data_dir: &Path) -> Result<FileJobBook, BookError> {
        let dir = data_dir.join(JOBS_DIR);
        fs::create_dir_all(&dir).map_err(|e| err("create", &dir, e))?;
        Ok(FileJobBook {
            dir,
            lock: parking_lot::Mutex::new(()),
        })
    }

    fn path(&self, id: &str, ext: &str) -> Result<PathBuf, BookError> {
        if !valid_id(id) {
            return Err(BookError(format!("{id:?} is not a job id")));
        }
        Ok(self.dir.join(format!("{id}.{ext}")))
    }

    /// Writes `bytes` to `path` durably and atomically.
    fn replace(&self, path: &Path, bytes: &[u8]) -> Result<(), BookError> {
        let tmp = path.with_extension("tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| err("create", &tmp, e))?;
        f.write_all(bytes).map_err(|e| err("write", &tmp, e))?;
        f.sync_data().map_err(|e| err("sync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| err("rename into place", path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err("sync", &self.dir, e))
    }

    fn write(&self, path: &Path, file: &JobFile) -> Result<(), BookError> {
        let bytes = serde_json::to_vec(file).map_err(|e| err("encode", path, e))?;
        self.replace(path, &bytes)
    }

    fn read(path: &Path) -> Result<JobFile, String> {
        let bytes = fs::read(path).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    }

    fn set_aside(path: &Path, why: &str) {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".damaged");
        tracing::error!(file = %path.display(), reason = why, "a bulk wake's file cannot be read; it is set aside and the job is not resumed");
        if let Err(e) = fs::rename(path, &aside) {
            tracing::error!(file = %path.display(), error = %e, "cannot set the file aside");
        }
    }
}

impl JobBook for FileJobBook {
    fn create(&self, def: &JobDef, ids: &[String]) -> Result<(), BookError> {
        let _w = self.lock.lock();
        if !ids.is_empty() {
            let mut text = String::with_capacity(ids.iter().map(|i| i.len() + 1).sum());
            for id in ids {
                text.push_str(id);
                text.push('\n');
            }
            self.replace(&self.path(&def.id, "ids")?, text.as_bytes())?;
        }
        let file = JobFile {
            def: def.clone(),
            checkpoint: None,
        };
        self.write(&self.path(&def.id, "json")?, &file)
    }

    fn checkpoint(&self, id: &str, _walk: &str, checkpoint: &Checkpoint) -> Result<(), BookError> {
        let _w = self.lock.lock();
        let path = self.path(id, "json")?;
        let mut file = Self::read(&path).map_err(|e| err("read", &path, e))?;
        file.checkpoint = Some(checkpoint.clone());
        self.write(&path, &file)
    }

    fn load(&self) -> Result<Vec<StoredJob>, BookError> {
        let _w = self.lock.lock();
        let mut jobs = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(|e| err("read", &self.dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| err("read", &self.dir, e))?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("tmp") => {
                    // A replacement cut off by a crash: the old file stands.
                    let _ = fs::remove_file(&path);
                    continue;
                }
                Some("json") => {}
                _ => continue,
            }
            let file = match Self::read(&path) {
                Ok(f) => f,
                Err(why) => {
                    Self::set_aside(&path, &why);
                    continue;
                }
            };
            if file.def.selection == crate::core::bulk::SelectionDef::Ids {
                let ids_path = self.path(&file.def.id, "ids")?;
                if let Err(e) = fs::metadata(&ids_path) {
                    Self::set_aside(&path, &format!("{}: {e}", ids_path.display()));
                    continue;
                }
            }
            jobs.push(StoredJob {
                cancelled: file.checkpoint.as_ref().is_some_and(|c| c.cancelled),
                walks: file
                    .checkpoint
                    .map(|c| vec![(WALK.to_owned(), c)])
                    .unwrap_or_default(),
                def: file.def,
            });
        }
        Ok(jobs)
    }

    fn ids(&self, id: &str) -> Result<Vec<String>, BookError> {
        let path = self.path(id, "ids")?;
        let text = fs::read_to_string(&path).map_err(|e| err("read", &path, e))?;
        Ok(text.lines().map(str::to_owned).collect())
    }

    fn forget(&self, id: &str) -> Result<(), BookError> {
        let _w = self.lock.lock();
        for ext in ["json", "ids"] {
            let path = self.path(id, ext)?;
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err("remove", &path, e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::bulk::{Counts, SelectionDef};

    fn def(id: &str, selection: SelectionDef) -> JobDef {
        JobDef {
            id: id.into(),
            created_at: "2026-12-04T00:00:00+00:00".into(),
            selection,
            rate_per_second: Some(10),
            include_dead: false,
            expected_total: 3,
        }
    }

    #[test]
    fn jobs_read_back_with_their_ids_and_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let book = FileJobBook::open(dir.path()).unwrap();
        let ids: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        book.create(&def("j1", SelectionDef::Ids), &ids).unwrap();
        book.create(&def("j2", SelectionDef::All), &[]).unwrap();
        let cp = Checkpoint {
            selected: 2,
            counts: Counts {
                received: 2,
                ..Counts::default()
            },
            done: vec![(0, 4)],
            ..Checkpoint::default()
        };
        book.checkpoint("j2", WALK, &cp).unwrap();
        let book = FileJobBook::open(dir.path()).unwrap();
        let mut jobs = book.load().unwrap();
        jobs.sort_by(|a, b| a.def.id.cmp(&b.def.id));
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].def, def("j1", SelectionDef::Ids));
        assert_eq!(book.ids("j1").unwrap(), ids);
        assert_eq!(jobs[0].walks, vec![]);
        assert_eq!(jobs[1].walks, vec![(WALK.to_owned(), cp)]);
        book.forget("j1").unwrap();
        book.forget("j1").unwrap();
        assert_eq!(book.load().unwrap().len(), 1);
    }

    #[test]
    fn a_damaged_file_is_set_aside_and_the_rest_load() {
        let dir = tempfile::tempdir().unwrap();
        let book = FileJobBook::open(dir.path()).unwrap();
        book.create(&def("j1", SelectionDef::All), &[]).unwrap();
        book.create(&def("j2", SelectionDef::All), &[]).unwrap();
        let jobs_dir = dir.path().join(JOBS_DIR);
        fs::write(jobs_dir.join("j2.json"), b"{\"def\": {\"id\"").unwrap();
        fs::write(jobs_dir.join("j3.tmp"), b"half").unwrap();
        let jobs = book.load().unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].def.id, "j1");
        assert!(jobs_dir.join("j2.json.damaged").exists());
        assert!(!jobs_dir.join("j3.tmp").exists());
    }

    #[test]
    fn ids_that_are_not_job_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let book = FileJobBook::open(dir.path()).unwrap();
        assert!(book.forget("../x").is_err());
        assert!(book
            .checkpoint("a/b", WALK, &Checkpoint::default())
            .is_err());
    }
}
