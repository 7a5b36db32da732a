//! Image references (`registry[:port]/repo[:tag][@sha256:…]`), parsed by
//! hand into oci-spec's [`Reference`].
//!
//! oci-spec parses with a regular expression whose compilation costs ~40 ms
//! of CPU once per process: most of a cached `pull-wasm`, and the agent's
//! first WasmPlugin. The grammar is small (distribution/reference), so it
//! is written out here; the tests check it against oci-spec's parser.

use oci_client::Reference;

const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
const MAX_NAME: usize = 255;

/// Parses `text` as Docker and the distribution project do: a first path
/// component with a `.`, a `:` or a capital letter, or `localhost`, is the
/// registry (else
/// Docker Hub, where one-component names live under `library/`); no tag and
/// no digest means `:latest`. Only sha256 digests are accepted, the one
/// algorithm Istio checks.
pub fn parse(text: &str) -> Result<Reference, String> {
    let (name_and_tag, digest) = match text.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (text, None),
    };
    if let Some(digest) = digest {
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("digest `{digest}` is not sha256:<hex>"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!(
                "digest `{digest}` is not sha256 and 64 lowercase hex digits"
            ));
        }
    }
    let (name, tag) = match name_and_tag.rfind(':') {
        Some(i) if !name_and_tag[i + 1..].contains('/') => {
            (&name_and_tag[..i], Some(&name_and_tag[i + 1..]))
        }
        _ => (name_and_tag, None),
    };
    if let Some(tag) = tag {
        check_tag(tag)?;
    }
    if name.is_empty() {
        return Err("no repository name".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!("the name is longer than {MAX_NAME} characters"));
    }
    let (registry, repository) = split_registry(name);
    check_registry(&registry)?;
    check_repository(&repository)?;
    Ok(match (tag, digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.into(), digest.into())
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.into()),
        (Some(tag), None) => Reference::with_tag(registry, repository, tag.into()),
        (None, None) => Reference::with_tag(registry, repository, "latest".into()),
    })
}

fn split_registry(name: &str) -> (String, String) {
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.')
                || first.contains(':')
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => (DOCKER_HUB.to_string(), name.to_string()),
    };
    let registry = if registry == DOCKER_HUB_LEGACY {
        DOCKER_HUB.to_string()
    } else {
        registry
    };
    let repository = if registry == DOCKER_HUB && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository
    };
    (registry, repository)
}

/// `host[:port]`, the host being DNS labels or a bracketed IPv6 address.
fn check_registry(registry: &str) -> Result<(), String> {
    let bad = || format!("`{registry}` is not a registry host[:port]");
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or_else(bad)?;
        v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        match after {
            "" => ("", None),
            p => ("", Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    if !registry.starts_with('[') {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !host.split('.').all(label_ok) {
            return Err(bad());
        }
    }
    Ok(())
}

/// Path components of lowercase letters and digits, joined inside by `.`,
/// `_`, `__` or runs of `-`.
fn check_repository(repository: &str) -> Result<(), String> {
    let bad = |why: &str| format!("repository `{repository}`: {why}");
    for component in repository.split('/') {
        if component.is_empty() {
            return Err(bad("an empty path component"));
        }
        let bytes = component.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return Err(bad(
                "components start and end with a lowercase letter or digit",
            ));
        }
        let mut i = 0;
        while i < bytes.len() {
            if alnum(bytes[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && !alnum(bytes[i]) {
                i += 1;
            }
            let separator = &component[start..i];
            let ok = separator == "."
                || separator == "_"
                || separator == "__"
                || separator.bytes().all(|b| b == b'-');
            if !ok {
                return Err(bad("only lowercase letters, digits and . _ __ - inside"));
            }
        }
    }
    Ok(())
}

/// Up to 128 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
fn check_tag(tag: &str) -> Result<(), String> {
    let valid = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !tag.starts_with(['.', '-']);
    if valid {
        Ok(())
    } else {
        Err(format!("tag `{tag}` is not valid"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same answers as oci-spec's regex-based parser.
    #[test]
    fn agrees_with_oci_spec() {
        let hex = "ab".repeat(32);
        let cases = [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "index.docker.io/library/busybox:1".into(),
            "docker.io/istio/proxyv2:1.23.0".into(),
            "ghcr.io/istio-ecosystem/wasm-extensions/basic_auth:1.12.0".into(),
            "127.0.0.1:5000/meshvm/filter:0.1.0".into(),
            "localhost/meshvm/filter".into(),
            "localhost:5000/a/b/c:v1".into(),
            format!("registry.example/f@sha256:{hex}"),
            format!("registry.example:443/f:v2@sha256:{hex}"),
            "registry.example/a-b/c--d/e__f/g.h:Tag_1.x-y".into(),
            "my-registry.example.com/team/filter".into(),
            "test.com:5000".into(),
            "foo_bar.com:8080".into(),
        ];
        for text in &cases {
            let ours = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let theirs: Reference = text
                .parse()
                .unwrap_or_else(|e| panic!("oci-spec {text}: {e}"));
            assert_eq!(
                (
                    ours.registry(),
                    ours.repository(),
                    ours.tag(),
                    ours.digest()
                ),
                (
                    theirs.registry(),
                    theirs.repository(),
                    theirs.tag(),
                    theirs.digest()
                ),
                "{text}"
            );
            assert_eq!(ours.whole(), theirs.whole(), "{text}");
        }
        // Where oci-spec differs from distribution/reference (Go), Go's
        // answer: a capitalised first component is a registry host
        // (oci-spec makes it an invalid Docker Hub repository), and IPv6
        // registries are accepted.
        let upper = parse("UPPER/case").unwrap();
        assert_eq!((upper.registry(), upper.repository()), ("UPPER", "case"));
        let v6 = parse("[::1]:5000/meshvm/filter:v1").unwrap();
        assert_eq!(
            (v6.registry(), v6.repository()),
            ("[::1]:5000", "meshvm/filter")
        );
        let bad = [
            "",
            "[::1/x",
            "[nothost]:5000/x",
            ":tag",
            "registry.example/Upper",
            "registry.example/a//b",
            "registry.example/-a",
            "registry.example/a-",
            "registry.example/a...b",
            "registry.example/f:",
            "registry.example/f:.tag",
            "registry.example/f@sha256:abc",
            "registry.example/f@md5:abc",
            "Bad Name/x",
            "registry.example:port/f",
        ];
        for text in bad {
            assert!(parse(text).is_err(), "{text} parsed");
            if !text.starts_with('[') {
                assert!(text.parse::<Reference>().is_err(), "oci-spec parsed {text}");
            }
        }
    }
}
