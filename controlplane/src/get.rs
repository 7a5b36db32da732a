//! `meshvm-controlplane get workloadentries`: the WorkloadEntries of a state
//! directory (and a config directory) printed as `kubectl get
//! workloadentries` prints them, so what the stand-in registered can be
//! compared with what istiod would show:
//!
//! - a table `NAME AGE ADDRESS` (the CRD's printer columns; `-A` adds
//!   `NAMESPACE` first; `-o wide` adds nothing, as for the CRD);
//! - `-o yaml` / `-o json`: a `kind: List` of the entries (one entry by
//!   name: the entry itself), keys in alphabetical order as kubectl writes
//!   unstructured objects.
//!
//! It reads the directories, not a running control plane: connection
//! annotations the registry keeps in memory for config directory entries
//! are not shown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::meta::parse_rfc3339;
use crate::config::{ConfigError, ConfigSnapshot, WorkloadEntry, load_dir};
use crate::registry::{WorkloadEntryStore, list_entries};

/// Names `get` accepts for WorkloadEntries (kubectl's plural, singular,
/// short name, and the fully qualified forms).
pub const WORKLOAD_ENTRY_RESOURCES: &[&str] = &[
    "workloadentries",
    "workloadentry",
    "we",
    "workloadentries.networking.istio.io",
    "workloadentry.networking.istio.io",
    "we.networking.istio.io",
];

/// The resource's qualified name, as kubectl names it in errors.
const QUALIFIED_RESOURCE: &str = "workloadentries.networking.istio.io";

/// How to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Table,
    Wide,
    Yaml,
    Json,
}

impl FromStr for OutputFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wide" => Ok(OutputFormat::Wide),
            "yaml" => Ok(OutputFormat::Yaml),
            "json" => Ok(OutputFormat::Json),
            _ => Err(format!(
                "unable to match a printer suitable for the output format {s:?}, allowed formats are: json, wide, yaml"
            )),
        }
    }
}

/// Which namespaces to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Namespace(String),
    AllNamespaces,
}

/// What to get.
#[derive(Debug, Clone)]
pub struct GetRequest {
    /// As typed: one of [`WORKLOAD_ENTRY_RESOURCES`].
    pub resource: String,
    /// Entries by name; empty: every entry in scope.
    pub names: Vec<String>,
    pub scope: Scope,
    pub format: OutputFormat,
    /// The registry's state directory.
    pub state_dir: PathBuf,
    /// The config directory, whose WorkloadEntries are listed too.
    pub config_dir: Option<PathBuf>,
}

/// What to print, and whether everything asked for was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Printed {
    pub stdout: String,
    /// Warnings, "No resources found", not-found errors.
    pub stderr: String,
    pub success: bool,
}

/// Why nothing could be listed.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error(
        "the server doesn't have a resource type {0:?} (this control plane serves workloadentries)"
    )]
    UnknownResource(String),
    #[error("--state-dir {}: {error}", path.display())]
    StateDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Config(ConfigError),
    #[error("a resource cannot be retrieved by name across all namespaces")]
    NamesWithAllNamespaces,
}

from_error!(ConfigError => GetError::Config);

/// Reads the directories and prints what `request` asks for, with ages
/// relative to `now`.
pub fn get(request: &GetRequest, now: SystemTime) -> Result<Printed, GetError> {
    if !WORKLOAD_ENTRY_RESOURCES.contains(&request.resource.as_str()) {
        return Err(GetError::UnknownResource(request.resource.clone()));
    }
    if !request.names.is_empty() && request.scope == Scope::AllNamespaces {
        return Err(GetError::NamesWithAllNamespaces);
    }
    let mut stderr = String::new();
    let config = match &request.config_dir {
        Some(dir) => load_dir(dir)?,
        None => ConfigSnapshot::default(),
    };
    for error in &config.errors {
        let _ = writeln!(stderr, "warning: {error}");
    }
    let state_error = |error| GetError::StateDir {
        path: request.state_dir.clone(),
        error,
    };
    std::fs::metadata(&request.state_dir).map_err(state_error)?;
    let stored = WorkloadEntryStore::new(&request.state_dir)
        .load()
        .map_err(state_error)?;
    for error in stored.malformed.values() {
        let _ = writeln!(stderr, "warning: {error}");
    }
    let all = list_entries(&config, &stored.entries);
    let in_scope: Vec<&WorkloadEntry> = all
        .iter()
        .filter(|e| match &request.scope {
            Scope::Namespace(ns) => e.metadata.namespace() == ns,
            Scope::AllNamespaces => true,
        })
        .collect();
    let mut success = true;
    let selected: Vec<&WorkloadEntry> = if request.names.is_empty() {
        in_scope
    } else {
        let by_name: BTreeMap<&str, &WorkloadEntry> = in_scope
            .iter()
            .map(|e| (e.metadata.name.as_str(), *e))
            .collect();
        let mut found = Vec::new();
        for name in &request.names {
            match by_name.get(name.as_str()) {
                Some(entry) => found.push(*entry),
                None => {
                    success = false;
                    let _ = writeln!(
                        stderr,
                        "Error from server (NotFound): {QUALIFIED_RESOURCE} {name:?} not found"
                    );
                }
            }
        }
        found
    };
    let stdout = match request.format {
        OutputFormat::Table | OutputFormat::Wide => {
            if selected.is_empty() && request.names.is_empty() {
                let _ = match &request.scope {
                    Scope::Namespace(ns) => {
                        writeln!(stderr, "No resources found in {ns} namespace.")
                    }
                    Scope::AllNamespaces => writeln!(stderr, "No resources found"),
                };
                String::new()
            } else if selected.is_empty() {
                String::new()
            } else {
                table(&selected, request.scope == Scope::AllNamespaces, now)
            }
        }
        OutputFormat::Yaml | OutputFormat::Json => {
            let value = if request.names.len() == 1 {
                match selected.first() {
                    Some(entry) => serde_json::to_value(entry).expect("serializable"),
                    None => serde_json::Value::Null,
                }
            } else {
                serde_json::to_value(List::new(&selected)).expect("serializable")
            };
            match (&value, request.format) {
                (serde_json::Value::Null, _) => String::new(),
                (_, OutputFormat::Yaml) => crate::yaml::json_to_string(&value),
                _ => json_pretty(&value),
            }
        }
    };
    Ok(Printed {
        stdout,
        stderr,
        success,
    })
}

/// kubectl's `kind: List` wrapper.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct List<'a> {
    api_version: &'static str,
    items: &'a [&'a WorkloadEntry],
    kind: &'static str,
    metadata: ListMeta,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    resource_version: &'static str,
}

impl<'a> List<'a> {
    fn new(items: &'a [&'a WorkloadEntry]) -> Self {
        Self {
            api_version: "v1",
            items,
            kind: "List",
            metadata: ListMeta {
                resource_version: "",
            },
        }
    }
}

/// JSON as kubectl writes it: 4-space indentation, a final newline.
fn json_pretty(value: &serde_json::Value) -> String {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    value.serialize(&mut serializer).expect("serializable");
    let mut text = String::from_utf8(out).expect("JSON is UTF-8");
    text.push('\n');
    text
}

/// The table, laid out as kubectl's tab writer does: each column as wide as
/// its widest cell plus 3 spaces (at least 6), the last one unpadded.
fn table(entries: &[&WorkloadEntry], with_namespace: bool, now: SystemTime) -> String {
    let mut rows: Vec<Vec<String>> = Vec::with_capacity(entries.len() + 1);
    let mut header = vec!["NAME", "AGE", "ADDRESS"];
    if with_namespace {
        header.insert(0, "NAMESPACE");
    }
    rows.push(header.into_iter().map(String::from).collect());
    for entry in entries {
        let mut row = vec![
            entry.metadata.name.clone(),
            age(entry, now),
            entry.spec.address.clone(),
        ];
        if with_namespace {
            row.insert(0, entry.metadata.namespace().to_string());
        }
        rows.push(row);
    }
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            let widest = rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0);
            (widest + 3).max(6)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == columns {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn age(entry: &WorkloadEntry, now: SystemTime) -> String {
    let Some(created) = entry
        .metadata
        .creation_timestamp
        .as_deref()
        .and_then(parse_rfc3339)
    else {
        return "<unknown>".into();
    };
    match now.duration_since(created) {
        Ok(elapsed) => human_duration(elapsed),
        // Up to two seconds in the future is clock skew: "0s".
        Err(e) if e.duration() < Duration::from_secs(2) => "0s".into(),
        Err(_) => "<invalid>".into(),
    }
}

/// kubectl's `HumanDuration`: two units of precision while they matter.
pub fn human_duration(d: Duration) -> String {
    let seconds = d.as_secs();
    let minutes = seconds / 60;
    let hours = seconds / 3600;
    let days = hours / 24;
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        match seconds % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        }
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        }
    } else if hours < 24 * 365 * 2 {
        format!("{days}d")
    } else if hours < 24 * 365 * 8 {
        match days % 365 {
            0 => format!("{}y", days / 365),
            dy => format!("{}y{dy}d", days / 365),
        }
    } else {
        format!("{}y", days / 365)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_kubectl() {
        for (secs, want) in [
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (125, "2m5s"),
            (600, "10m"),
            (179 * 60, "179m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 60, "3h1m"),
            (47 * 3600, "47h"),
            (2 * 86400 + 3600, "2d1h"),
            (3 * 86400, "3d"),
            (100 * 86400, "100d"),
            (3 * 365 * 86400 + 86400, "3y1d"),
            (9 * 365 * 86400, "9y"),
        ] {
            assert_eq!(human_duration(Duration::from_secs(secs)), want, "{secs}");
        }
    }

    fn entry(ns: &str, name: &str, address: &str, created: Option<&str>) -> WorkloadEntry {
        let created = created
            .map(|c| format!("  creationTimestamp: \"{c}\"\n"))
            .unwrap_or_default();
        serde_norway::from_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\n{created}spec:\n  address: {address}\n"
        ))
        .unwrap()
    }

    #[test]
    fn table_layout() {
        let now = parse_rfc3339("2024-05-01T10:05:00Z").unwrap();
        let a = entry(
            "vm-ns",
            "ratings-vm-10.0.0.12-vm-network",
            "10.0.0.12",
            Some("2024-05-01T10:00:00Z"),
        );
        let b = entry("default", "db", "10.0.0.7", None);
        assert_eq!(
            table(&[&a], false, now),
            "NAME                              AGE   ADDRESS\nratings-vm-10.0.0.12-vm-network   5m    10.0.0.12\n"
        );
        assert_eq!(
            table(&[&b, &a], true, now),
            "NAMESPACE   NAME                              AGE         ADDRESS\n\
             default     db                                <unknown>   10.0.0.7\n\
             vm-ns       ratings-vm-10.0.0.12-vm-network   5m          10.0.0.12\n"
        );
    }

    #[test]
    fn output_formats() {
        assert_eq!("yaml".parse(), Ok(OutputFormat::Yaml));
        assert!(
            "xml"
                .parse::<OutputFormat>()
                .unwrap_err()
                .contains("allowed formats")
        );
        let e = entry("vm-ns", "a", "10.0.0.1", None);
        let list = serde_json::to_value(List::new(&[&e])).unwrap();
        assert_eq!(
            crate::yaml::json_to_string(&list),
            "apiVersion: v1\nitems:\n- apiVersion: networking.istio.io/v1\n  kind: WorkloadEntry\n  metadata:\n    name: a\n    namespace: vm-ns\n  spec:\n    address: 10.0.0.1\nkind: List\nmetadata:\n  resourceVersion: \"\"\n"
        );
        assert!(
            json_pretty(&list)
                .starts_with("{\n    \"apiVersion\": \"v1\",\n    \"items\": [\n        {\n")
        );
    }
}
