//! One manifest file → typed objects and the problems found.
//!
//! The file is split into documents at `---` lines before parsing, so a
//! syntax error in one document loses only that document, and every problem
//! gets a line number in the file. A `kind: List` document contributes its
//! `items`. Each document is parsed twice: once untyped to find its kind,
//! then into the kind's type straight from the text, so the decoder's errors
//! carry lines (items of a List carry none: they are decoded from the
//! untyped value).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_norway::Value;

use super::meta::{DEFAULT_NAMESPACE, ObjectKey, ObjectMeta};
use super::{Kind, ManifestError, ManifestProblem, Pod, Service, WorkloadEntry, WorkloadGroup};

/// The API group of Istio's networking kinds.
const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";

/// A typed object of one of the kinds a config directory may hold.
// A config directory holds a handful of objects: boxing the larger
// variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    WorkloadGroup(WorkloadGroup),
    WorkloadEntry(WorkloadEntry),
    Service(Service),
    Pod(Pod),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::WorkloadGroup(_) => Kind::WorkloadGroup,
            Object::WorkloadEntry(_) => Kind::WorkloadEntry,
            Object::Service(_) => Kind::Service,
            Object::Pod(_) => Kind::Pod,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::WorkloadGroup(o) => &o.metadata,
            Object::WorkloadEntry(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
        }
    }

    /// Sets the namespace to [`DEFAULT_NAMESPACE`] if the manifest has none,
    /// as the API server does when an object is applied.
    pub fn default_namespace(&mut self) {
        let meta = self.metadata_mut();
        if meta.namespace.as_deref().is_none_or(str::is_empty) {
            meta.namespace = Some(DEFAULT_NAMESPACE.into());
        }
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::WorkloadGroup(o) => &mut o.metadata,
            Object::WorkloadEntry(o) => &mut o.metadata,
            Object::Service(o) => &mut o.metadata,
            Object::Pod(o) => &mut o.metadata,
        }
    }

    pub fn key(&self) -> ObjectKey {
        self.metadata().key()
    }

    fn validate(&self) -> Result<(), ManifestProblem> {
        match self {
            Object::WorkloadGroup(o) => o.validate(),
            Object::WorkloadEntry(o) => o.validate(),
            Object::Service(o) => o.validate(),
            Object::Pod(o) => o.validate(),
        }
    }
}

/// Where an object was defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    /// 1-based index among the file's non-empty documents.
    pub document: usize,
    /// 0-based index in a `List`'s items.
    pub item: Option<usize>,
    /// 1-based line of the document's first line.
    pub line: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file.display(), self.document)?;
        if let Some(item) = self.item {
            write!(f, " items[{item}]")?;
        }
        Ok(())
    }
}

/// One `---`-separated document of a file.
#[derive(Debug, PartialEq)]
struct Document {
    /// 1-based, counting only documents with content.
    index: usize,
    /// 1-based line in the file where `text` starts.
    first_line: usize,
    text: String,
}

/// Splits YAML text at document markers (`---` at the start of a line,
/// alone or followed by a space; `...` ends a document). Documents holding
/// only blank lines and comments are dropped.
fn split_documents(text: &str) -> Vec<Document> {
    let mut documents = Vec::new();
    let mut current = String::new();
    let mut first_line = 1;
    let flush = |current: &mut String, first_line: usize, documents: &mut Vec<Document>| {
        let has_content = current.lines().any(|l| {
            let t = l.trim_start();
            !t.is_empty() && !t.starts_with('#') && !t.starts_with('%')
        });
        if has_content {
            documents.push(Document {
                index: documents.len() + 1,
                first_line,
                text: std::mem::take(current),
            });
        }
        current.clear();
    };
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let line_no = i + 1;
        let body = line.trim_end_matches(['\n', '\r']);
        let is_marker = |m: &str| {
            body.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        if is_marker("---") {
            flush(&mut current, first_line, &mut documents);
            let rest = &line[3..];
            if !rest.trim().is_empty() {
                // Content after the marker (`--- {a: 1}`) belongs to the new
                // document; keep its column.
                first_line = line_no;
                current.push_str("   ");
                current.push_str(rest);
            }
        } else if is_marker("...") {
            flush(&mut current, first_line, &mut documents);
        } else {
            if current.is_empty() {
                first_line = line_no;
            }
            current.push_str(line);
        }
    }
    flush(&mut current, first_line, &mut documents);
    documents
}

/// Parses a manifest file's text: the objects (as written: a missing
/// namespace stays unset, see [`Object::default_namespace`]) and a problem
/// for every document or item that is not one.
pub fn parse_manifests(file: &Path, text: &str) -> (Vec<(Object, Source)>, Vec<ManifestError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for doc in split_documents(text) {
        let error =
            |item: Option<usize>, line: Option<usize>, problem: ManifestProblem| ManifestError {
                file: file.to_path_buf(),
                document: Some(doc.index),
                item,
                line,
                problem,
            };
        let source = |item: Option<usize>| Source {
            file: file.to_path_buf(),
            document: doc.index,
            item,
            line: doc.first_line,
        };
        let value: Value = match serde_norway::from_str(&doc.text) {
            Ok(value) => value,
            Err(e) => {
                let (message, line) = located(&e, doc.first_line);
                errors.push(error(None, line, ManifestProblem::Yaml(message)));
                continue;
            }
        };
        match type_of(&value) {
            Err(problem) => errors.push(error(None, Some(doc.first_line), problem)),
            Ok(None) => {
                // `kind: List`: each item on its own.
                let Some(items) = value.get("items") else {
                    errors.push(error(
                        None,
                        Some(doc.first_line),
                        ManifestProblem::MissingField("items"),
                    ));
                    continue;
                };
                let Value::Sequence(items) = items else {
                    errors.push(error(
                        None,
                        Some(doc.first_line),
                        ManifestProblem::NotAnObject("a List's items must be a sequence".into()),
                    ));
                    continue;
                };
                for (i, item) in items.iter().enumerate() {
                    let decoded = type_of(item).and_then(|kind| match kind {
                        Some(kind) => decode_value(kind, item.clone()),
                        None => Err(ManifestProblem::NotAnObject("a List inside a List".into())),
                    });
                    match decoded {
                        Ok(object) => objects.push((object, source(Some(i)))),
                        Err(problem) => errors.push(error(Some(i), None, problem)),
                    }
                }
            }
            Ok(Some(kind)) => match decode_text(kind, &doc.text, doc.first_line) {
                Ok(object) => objects.push((object, source(None))),
                Err((problem, line)) => {
                    errors.push(error(None, line.or(Some(doc.first_line)), problem));
                }
            },
        }
    }
    (objects, errors)
}

/// The kind of a parsed document: `Some(kind)`, or `None` for a `List`.
fn type_of(value: &Value) -> Result<Option<Kind>, ManifestProblem> {
    let Value::Mapping(map) = value else {
        return Err(ManifestProblem::NotAnObject(
            "expected a mapping with apiVersion, kind and metadata".into(),
        ));
    };
    let field = |name: &'static str| match map.get(name) {
        None | Some(Value::Null) => Err(ManifestProblem::MissingField(name)),
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(_) => Err(ManifestProblem::field(name, "must be a string")),
    };
    let api_version = field("apiVersion")?;
    let kind = field("kind")?;
    let group = match api_version.split_once('/') {
        Some((group, _)) => group,
        None => "",
    };
    match (group, kind) {
        (ISTIO_NETWORKING_GROUP, "WorkloadGroup") => Ok(Some(Kind::WorkloadGroup)),
        (ISTIO_NETWORKING_GROUP, "WorkloadEntry") => Ok(Some(Kind::WorkloadEntry)),
        ("", "Service") => Ok(Some(Kind::Service)),
        ("", "Pod") => Ok(Some(Kind::Pod)),
        ("", "List") => Ok(None),
        _ => Err(ManifestProblem::UnknownKind {
            api_version: api_version.into(),
            kind: kind.into(),
        }),
    }
}

/// Decodes a document's text as `kind`; problems carry the file line.
fn decode_text(
    kind: Kind,
    text: &str,
    first_line: usize,
) -> Result<Object, (ManifestProblem, Option<usize>)> {
    fn typed<T: DeserializeOwned>(
        text: &str,
        first_line: usize,
    ) -> Result<T, (ManifestProblem, Option<usize>)> {
        serde_norway::from_str(text).map_err(|e| {
            let (message, line) = located(&e, first_line);
            (ManifestProblem::Decode(message), line)
        })
    }
    let object = match kind {
        Kind::WorkloadGroup => Object::WorkloadGroup(typed(text, first_line)?),
        Kind::WorkloadEntry => Object::WorkloadEntry(typed(text, first_line)?),
        Kind::Service => Object::Service(typed(text, first_line)?),
        Kind::Pod => Object::Pod(typed(text, first_line)?),
    };
    finish(object).map_err(|problem| (problem, None))
}

/// Decodes a `List` item as `kind`.
fn decode_value(kind: Kind, value: Value) -> Result<Object, ManifestProblem> {
    fn typed<T: DeserializeOwned>(value: Value) -> Result<T, ManifestProblem> {
        serde_norway::from_value(value).map_err(|e| ManifestProblem::Decode(e.to_string()))
    }
    let object = match kind {
        Kind::WorkloadGroup => Object::WorkloadGroup(typed(value)?),
        Kind::WorkloadEntry => Object::WorkloadEntry(typed(value)?),
        Kind::Service => Object::Service(typed(value)?),
        Kind::Pod => Object::Pod(typed(value)?),
    };
    finish(object)
}

/// Validates a decoded object.
fn finish(object: Object) -> Result<Object, ManifestProblem> {
    object.validate()?;
    Ok(object)
}

/// A YAML error's message and its line in the file.
fn located(e: &serde_norway::Error, first_line: usize) -> (String, Option<usize>) {
    // The parser's " at line L column C" positions count from the start of
    // the document; the file line of the error's location replaces them.
    let message = without_positions(&e.to_string());
    match e.location() {
        Some(loc) => (
            format!("{message} (column {})", loc.column()),
            Some(first_line + loc.line() - 1),
        ),
        None => (message, None),
    }
}

/// `text` without its " at line L column C" parts.
fn without_positions(text: &str) -> String {
    const MARK: &str = " at line ";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(MARK) {
        out.push_str(&rest[..i]);
        let after = &rest[i + MARK.len()..];
        let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let line_len = digits(after);
        match after[line_len..].strip_prefix(" column ") {
            Some(column) if line_len > 0 && digits(column) > 0 => {
                rest = &column[digits(column)..];
            }
            _ => {
                out.push_str(MARK);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<(Object, Source)>, Vec<ManifestError>) {
        parse_manifests(Path::new("mesh/app.yaml"), text)
    }

    #[test]
    fn splits_documents_and_keeps_lines() {
        let docs =
            split_documents("# header\n---\na: 1\n---\n\n# only a comment\n---\nb: 2\n...\n");
        assert_eq!(
            docs,
            [
                Document {
                    index: 1,
                    first_line: 3,
                    text: "a: 1\n".into()
                },
                Document {
                    index: 2,
                    first_line: 8,
                    text: "b: 2\n".into()
                },
            ]
        );
        assert_eq!(split_documents("a: 1").len(), 1);
        assert_eq!(split_documents("a: '---'\n----\n").len(), 1);
        let inline = split_documents("--- {a: 1}\n");
        assert_eq!(
            (inline[0].first_line, inline[0].text.as_str()),
            (1, "    {a: 1}\n")
        );
    }

    #[test]
    fn positions_are_removed_from_messages() {
        assert_eq!(
            without_positions(
                "did not find expected ',' or '}' at line 6 column 5, while parsing a flow mapping at line 5 column 11"
            ),
            "did not find expected ',' or '}', while parsing a flow mapping"
        );
        assert_eq!(without_positions("seen at line x"), "seen at line x");
    }

    #[test]
    fn every_kind_and_lists() {
        let (objects, errors) = parse(
            "apiVersion: networking.istio.io/v1beta1
kind: WorkloadGroup
metadata: {name: wg, namespace: vm-ns}
spec: {template: {serviceAccount: sa, ports: {http: 9080}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: WorkloadEntry
metadata: {name: we, labels: {app: a}}
spec: {address: 10.0.0.1, labels: {app: a}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: svc}
  spec:
    selector: {app: a}
    clusterIP: 10.96.0.10
    ports: [{name: http, port: 80, targetPort: 9080}]
- apiVersion: v1
  kind: Pod
  metadata: {name: pod, labels: {app: a}}
  spec: {serviceAccount: old-sa}
  status: {podIP: 10.244.0.5}
",
        );
        assert_eq!(errors, []);
        let kinds: Vec<_> = objects
            .iter()
            .map(|(o, s)| (o.kind(), o.key().to_string(), s.document, s.item))
            .collect();
        assert_eq!(
            kinds,
            [
                (Kind::WorkloadGroup, "vm-ns/wg".to_string(), 1, None),
                (Kind::WorkloadEntry, "default/we".to_string(), 2, None),
                (Kind::Service, "default/svc".to_string(), 3, Some(0)),
                (Kind::Pod, "default/pod".to_string(), 3, Some(1)),
            ]
        );
        let Object::Pod(pod) = &objects[3].0 else {
            unreachable!()
        };
        assert_eq!(pod.service_account(), "old-sa");
        assert_eq!(pod.ip(), Some("10.244.0.5".parse().unwrap()));
    }

    #[test]
    fn problems_name_document_line_and_cause() {
        let text = "apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata:
  namespace: vm-ns
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: wg}
spec:
  template:
    ports:
      http: web
---
kind: Service
metadata: {name: s}
---
apiVersion: v1
kind: Service
metadata: {name: s
---
apiVersion: v1
kind: Service
metadata: {name: ok}
";
        let (objects, errors) = parse(text);
        assert_eq!(objects.len(), 1, "the good document is kept");
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            messages[0].starts_with("mesh/app.yaml: document 1, line 1: unknown kind `Deployment`"),
            "{messages:?}"
        );
        assert_eq!(
            messages[1],
            "mesh/app.yaml: document 2, line 5: metadata.name is missing"
        );
        assert!(
            messages[2].starts_with(
                "mesh/app.yaml: document 3, line 16: spec.template.ports.http: invalid type: string \"web\""
            ),
            "{messages:?}"
        );
        assert_eq!(
            messages[3],
            "mesh/app.yaml: document 4, line 18: `apiVersion` is missing"
        );
        assert!(
            messages[4].starts_with("mesh/app.yaml: document 5, line ")
                && messages[4].contains("not valid YAML"),
            "{messages:?}"
        );
        assert_eq!(errors.len(), 5);
    }

    #[test]
    fn list_items_and_wrong_versions() {
        let (objects, errors) = parse(
            "apiVersion: v1
kind: List
items:
- apiVersion: v2
  kind: Pod
  metadata: {name: p}
- 42
- apiVersion: networking.istio.io/v2
  kind: WorkloadEntry
  metadata: {name: we}
  spec: {address: 10.0.0.1}
",
        );
        assert!(objects.is_empty());
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "mesh/app.yaml: document 1, items[0]: apiVersion `v2` of a Pod is not one of [\"v1\"]",
                "mesh/app.yaml: document 1, items[1]: not a Kubernetes object: expected a mapping with apiVersion, kind and metadata",
                "mesh/app.yaml: document 1, items[2]: apiVersion `networking.istio.io/v2` of a WorkloadEntry is not one of [\"networking.istio.io/v1\", \"networking.istio.io/v1beta1\", \"networking.istio.io/v1alpha3\"]",
            ]
        );
    }

    #[test]
    fn field_checks() {
        for (text, want) in [
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}, {port: 81}]}\n",
                "spec.ports[0].name: required when the Service has several ports",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: 0}]}\n",
                "spec.ports[0].targetPort: 0 is not a port",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: \"9080\"}]}\n",
                "neither a port number nor a port name",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 70000}]}\n",
                "spec.ports[0].port: invalid value: integer `70000`",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: ten}\n",
                "spec.clusterIP: `ten` is not an IP address",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.0.0}\n",
                "status.podIP: `10.0.0` is not an IP address",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: Bad_NS}\n",
                "metadata.namespace: `Bad_NS` is not a Kubernetes namespace name",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: we}\nspec: {ports: {http: 80}}\n",
                "spec.address: must be set",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: we}\nspec: {address: 1.2.3.4, adress: x}\n",
                "unknown field `adress`",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: we}\nspec: {address: 1.2.3.4, ports: {http: 0}}\n",
                "spec.ports.http: 0 is not a port",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: Upper}\n",
                "metadata.name: `Upper` is not a valid name",
            ),
        ] {
            let (objects, errors) = parse(text);
            assert!(objects.is_empty(), "{text}");
            assert_eq!(errors.len(), 1, "{text}");
            assert!(
                errors[0].to_string().contains(want),
                "{want}: {}",
                errors[0]
            );
        }
    }
}
