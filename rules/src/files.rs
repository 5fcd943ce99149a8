//! Rules as files (`iotpipe dev --rules-dir DIR`): every `NAME.rhai` in the directory is a rule
//! with id `NAME`, applying to all of its owner's devices. The directory is re-read while the
//! process runs, so editing, adding or deleting a file takes effect without a restart; a file that
//! does not compile is reported with `file:line:column` and the rule's previous version stays.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tracing::{info, warn};

use crate::engine::{Rule, RuleEngine, Selector};
use crate::sandbox::RuleError;

/// Keeps a [`RuleEngine`] in step with a directory of `.rhai` files.
pub struct RuleDir {
    dir: PathBuf,
    owner: String,
    cooldown_ms: i64,
    seen: HashMap<String, SystemTime>,
}

/// A rule file that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// Why (compile errors carry line and column).
    pub error: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.error)
    }
}

impl RuleDir {
    /// Rules in `dir`, owned by `owner`, with `cooldown_ms` each.
    pub fn new(dir: &Path, owner: &str, cooldown_ms: i64) -> Self {
        Self {
            dir: dir.to_owned(),
            owner: owner.to_owned(),
            cooldown_ms,
            seen: HashMap::new(),
        }
    }

    /// Loads what changed since the last call into `engine`; returns the files that failed.
    pub fn sync(&mut self, engine: &RuleEngine) -> Vec<FileError> {
        let mut errors = Vec::new();
        let mut present = HashMap::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(FileError {
                    path: self.dir.clone(),
                    error: format!(" cannot read rules directory: {e}"),
                });
                return errors;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("rhai") {
                continue;
            }
            let Some(id) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            present.insert(id.clone(), modified);
            if self.seen.get(&id) == Some(&modified) {
                continue;
            }
            let script = match std::fs::read_to_string(&path) {
                Ok(s) => s,
                Err(e) => {
                    errors.push(FileError {
                        path,
                        error: format!(" {e}"),
                    });
                    continue;
                }
            };
            let rule = Rule {
                id: id.clone(),
                name: id.clone(),
                owner: self.owner.clone(),
                selector: Selector::All,
                script,
                cooldown_ms: self.cooldown_ms,
                enabled: true,
            };
            match engine.upsert(rule) {
                Ok(()) => info!(rule = %id, file = %path.display(), "Rule loaded."),
                Err(e) => {
                    let error = match &e {
                        RuleError::Compile {
                            line,
                            column,
                            message,
                        } => format!("{line}:{column}: {message}"),
                        other => format!(" {other}"),
                    };
                    warn!(file = %path.display(), error = %error, "Rule does not compile; keeping the previous version.");
                    errors.push(FileError { path, error });
                }
            }
            // Remember the version even when it failed, so the error is reported once per edit.
            self.seen.insert(id, modified);
        }
        let gone: Vec<String> = self
            .seen
            .keys()
            .filter(|id| !present.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            engine.remove(&id);
            self.seen.remove(&id);
            info!(rule = %id, "Rule removed.");
        }
        errors
    }
}
