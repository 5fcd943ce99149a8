//! Rules as files (`iotpipe dev --rules-dir DIR`): every `NAME.rhai` in the directory is a rule
//! with id `NAME`, applying to all of its owner's devices unless a header says otherwise. Header
//! lines at the top (`// @key value`): `@name`, `@owner`, `@severity`, `@devices a,b`,
//! `@glob plant-*`, `@cooldown 5m`, `@webhook URL [SECRET]` (repeatable), `@disabled`. The directory is re-read while the
//! process runs, so editing, adding or deleting a file takes effect without a restart; a file that
//! does not compile is reported with `file:line:column` and the rule's previous version stays.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::engine::{Rule, RuleEngine, Selector, Webhook};
use crate::sandbox::RuleError;

/// Keeps a [`RuleEngine`] in step with a directory of `.rhai` files.
pub struct RuleDir {
    dir: PathBuf,
    owner: String,
    cooldown_ms: i64,
    seen: HashMap<String, String>,
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

    fn rule_from_file(&self, id: &str, script: String) -> Result<Rule, String> {
        let mut rule = Rule {
            id: id.to_owned(),
            name: id.to_owned(),
            owner: self.owner.clone(),
            selector: Selector::All,
            cooldown_ms: self.cooldown_ms,
            ..Rule::default()
        };
        for (n, line) in script.lines().enumerate() {
            let Some(d) = line.trim().strip_prefix("// @") else {
                if line.trim().is_empty() || line.trim().starts_with("//") {
                    continue;
                }
                break;
            };
            let (key, value) = d.split_once(char::is_whitespace).unwrap_or((d, ""));
            let value = value.trim();
            let at = n + 1;
            match key {
                "name" => value.clone_into(&mut rule.name),
                "owner" => value.clone_into(&mut rule.owner),
                "severity" => value.clone_into(&mut rule.severity),
                "devices" => {
                    rule.selector = Selector::Devices(
                        value
                            .split(',')
                            .map(|d| d.trim().to_owned())
                            .filter(|d| !d.is_empty())
                            .collect(),
                    );
                }
                "glob" => rule.selector = Selector::Glob(value.to_owned()),
                "cooldown" => {
                    let d = humantime::parse_duration(value)
                        .map_err(|e| format!("{at}:1: @cooldown `{value}`: {e}"))?;
                    rule.cooldown_ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                }
                "webhook" => {
                    let mut parts = value.split_whitespace();
                    let url = parts.next().unwrap_or_default().to_owned();
                    let secret = parts.next().unwrap_or_default().to_owned();
                    rule.notify.push(Webhook { url, secret });
                }
                "disabled" => rule.enabled = false,
                other => return Err(format!("{at}:1: unknown header `@{other}`")),
            }
        }
        rule.script = script;
        rule.validate().map_err(|e| format!("1:1: {e}"))?;
        Ok(rule)
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
            // Compared by content, not modification time: two edits within one second of
            // file-system time are both seen.
            present.insert(id.clone(), ());
            if self.seen.get(&id) == Some(&script) {
                continue;
            }
            self.seen.insert(id.clone(), script.clone());
            let rule = match self.rule_from_file(&id, script) {
                Ok(r) => r,
                Err(error) => {
                    warn!(file = %path.display(), error = %error, "Bad rule header; keeping the previous version.");
                    errors.push(FileError { path, error });
                    continue;
                }
            };
            match engine.upsert(rule) {
                Ok(_) => info!(rule = %id, file = %path.display(), "Rule file loaded."),
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn headers_set_the_rule_and_the_script_is_kept_whole() {
        let dir = RuleDir::new(Path::new("."), "local", 0);
        let script = "// @name Hot boiler\n// @owner alice\n// @severity critical\n// @devices b-1, b-2\n// @cooldown 5m\n// @webhook http://127.0.0.1:9/hook s3cret\nif metrics.t > 90 { alert(\"hot\") }\n";
        let r = dir.rule_from_file("boiler", script.to_owned()).unwrap();
        assert_eq!(r.name, "Hot boiler");
        assert_eq!(r.owner, "alice");
        assert_eq!(r.severity, "critical");
        assert_eq!(
            r.selector,
            Selector::Devices(vec!["b-1".into(), "b-2".into()])
        );
        assert_eq!(r.cooldown_ms, 300_000);
        assert_eq!(r.notify.len(), 1);
        assert_eq!(r.notify[0].secret, "s3cret");
        assert_eq!(r.script, script);
        let err = dir
            .rule_from_file("x", "// @colour red\nclear()".into())
            .unwrap_err();
        assert!(err.starts_with("1:1: unknown header"), "{err}");
    }
}
