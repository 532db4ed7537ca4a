//! The pure part of pinning: given a YAML file's text and the images just pushed, the new
//! text and what changed. The file is parsed (saphyr-parser, which gives each scalar's source
//! span) and only the spans of the scalars to change are replaced, in the quoting style they
//! had; everything else (comments, order, other images) stays byte for byte. Two shapes are
//! pinned: a kustomization's `images:` entries (`newTag`, `digest`) and `image:` strings of
//! plain manifests.

use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// An image as pushed: `repository` is `REGISTRY/NAMESPACE/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Image {
    pub repository: String,
    pub tag: String,
    /// `sha256:…`.
    pub digest: String,
}

/// One scalar changed (or added), for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    /// 1-based line of the value in the old text.
    pub line: usize,
    /// `newTag`, `digest` or `image`.
    pub field: String,
    pub repository: String,
    /// `None` when the key was added.
    pub old: Option<String>,
    pub new: String,
}

/// The file's new text and what changed; `changes` empty means the text is the old one.
#[derive(Debug)]
pub(crate) struct Pinned {
    pub text: String,
    pub changes: Vec<Change>,
}

/// Why a file cannot be pinned; `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct YamlError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} column {}: {}", self.line, self.column, self.message)
    }
}

impl std::error::Error for YamlError {}

/// Whether [`pin`] would change the file for one of `repositories` (whatever the tag and
/// digest); an error when it does not parse.
pub(crate) fn names_any(text: &str, repositories: &[String]) -> Result<bool, YamlError> {
    fn walk(node: &Node, repositories: &[String]) -> bool {
        match node {
            Node::Map(map) => map.pairs.iter().any(|(key, value)| match (key, value) {
                (Node::Scalar(k), Node::Scalar(v)) if k.value == "image" => {
                    repositories.iter().any(|r| *r == split_reference(&v.value).0)
                }
                (Node::Scalar(k), Node::Seq(entries)) if k.value == "images" => {
                    entries.iter().any(|e| matches!(e, Node::Map(m) if m.scalar("newName").or(m.scalar("name")).is_some_and(|n| repositories.contains(&n.value))))
                        || walk(value, repositories)
                }
                _ => walk(value, repositories),
            }),
            Node::Seq(items) => items.iter().any(|i| walk(i, repositories)),
            Node::Scalar(_) | Node::Alias => false,
        }
    }
    Ok(parse(text)?.iter().any(|d| walk(d, repositories)))
}

/// Pins `images` in `text`: kustomization entries whose repository (`newName`, else `name`)
/// is one of them get its tag as `newTag` and, when they have a `digest` or
/// `always_digest`, its digest; `image: REPOSITORY[:TAG][@DIGEST]` strings get the tag, and
/// the digest when they had one or `always_digest`.
pub(crate) fn pin(text: &str, images: &[Image], always_digest: bool) -> Result<Pinned, YamlError> {
    let documents = parse(text)?;
    let mut edits = Vec::new();
    let mut changes = Vec::new();
    for document in &documents {
        if let Node::Map(map) = document {
            if let Some(Node::Seq(entries)) = map.get("images") {
                for entry in entries {
                    if let Node::Map(entry) = entry {
                        pin_entry(text, entry, images, always_digest, &mut edits, &mut changes)?;
                    }
                }
            }
        }
        pin_image_strings(document, images, always_digest, &mut edits, &mut changes)?;
    }
    edits.sort_by_key(|e| e.start);
    let mut out = String::with_capacity(text.len() + 128);
    let mut at = 0;
    for edit in &edits {
        out.push_str(&text[at..edit.start]);
        out.push_str(&edit.text);
        at = edit.end;
    }
    out.push_str(&text[at..]);
    changes.sort_by_key(|c| c.line);
    Ok(Pinned { text: out, changes })
}

/// A replacement of `start..end` (empty for an insertion).
struct Edit {
    start: usize,
    end: usize,
    text: String,
}

#[derive(Debug)]
struct Scalar {
    value: String,
    style: ScalarStyle,
    /// Byte range in the text, quotes included.
    start: usize,
    end: usize,
    line: usize,
    column: usize,
}

#[derive(Debug)]
struct Map {
    pairs: Vec<(Node, Node)>,
    /// `{…}` rather than indented lines.
    flow: bool,
}

impl Map {
    fn get(&self, key: &str) -> Option<&Node> {
        self.pairs.iter().find(|(k, _)| matches!(k, Node::Scalar(s) if s.value == key)).map(|(_, v)| v)
    }

    fn scalar(&self, key: &str) -> Option<&Scalar> {
        match self.get(key) {
            Some(Node::Scalar(s)) => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug)]
enum Node {
    Scalar(Scalar),
    Seq(Vec<Node>),
    Map(Map),
    Alias,
}

/// A kustomization `images:` entry.
fn pin_entry(
    text: &str,
    entry: &Map,
    images: &[Image],
    always_digest: bool,
    edits: &mut Vec<Edit>,
    changes: &mut Vec<Change>,
) -> Result<(), YamlError> {
    let Some(name) = entry.scalar("newName").or(entry.scalar("name")) else {
        return Ok(());
    };
    let Some(image) = images.iter().find(|i| i.repository == name.value) else {
        return Ok(());
    };
    let mut change = |scalar: Option<&Scalar>, field: &str, new: &str| -> Result<Option<Edit>, YamlError> {
        match scalar {
            Some(s) if s.value == new => Ok(None),
            Some(s) => {
                changes.push(Change {
                    line: s.line,
                    field: field.to_string(),
                    repository: image.repository.clone(),
                    old: Some(s.value.clone()),
                    new: new.to_string(),
                });
                Ok(Some(Edit { start: s.start, end: s.end, text: render(s, new)? }))
            }
            None => Ok(None),
        }
    };
    let tag = entry.scalar("newTag");
    let digest = entry.scalar("digest");
    edits.extend(change(tag, "newTag", &image.tag)?);
    edits.extend(change(digest, "digest", &image.digest)?);
    // Keys the entry lacks go on new lines after the last value, indented as its keys are.
    let mut added = Vec::new();
    if tag.is_none() {
        added.push(("newTag", image.tag.as_str()));
    }
    if digest.is_none() && always_digest {
        added.push(("digest", image.digest.as_str()));
    }
    if added.is_empty() {
        return Ok(());
    }
    let last = entry.pairs.iter().filter_map(|(_, v)| end_of(v)).max_by_key(|s| s.end);
    let first_key = entry.pairs.first().and_then(|(k, _)| if let Node::Scalar(k) = k { Some(k) } else { None });
    let (Some(last), Some(first_key)) = (last, first_key) else {
        return Ok(());
    };
    let mut insert = String::new();
    let at = if entry.flow {
        for (key, value) in &added {
            insert.push_str(&format!(", {key}: {}", plain_or_quoted(value)));
        }
        last.end
    } else {
        let indent = " ".repeat(first_key.column);
        for (key, value) in &added {
            insert.push_str(&format!("\n{indent}{key}: {}", plain_or_quoted(value)));
        }
        text[last.end..].find('\n').map_or(text.len(), |n| last.end + n)
    };
    for (key, value) in added {
        changes.push(Change {
            line: last.line,
            field: key.to_string(),
            repository: image.repository.clone(),
            old: None,
            new: value.to_string(),
        });
    }
    edits.push(Edit { start: at, end: at, text: insert });
    Ok(())
}

/// The scalar a value ends with (a flat entry's values are scalars).
fn end_of(node: &Node) -> Option<&Scalar> {
    match node {
        Node::Scalar(s) => Some(s),
        _ => None,
    }
}

/// Every `image: REF` anywhere in the document.
fn pin_image_strings(
    node: &Node,
    images: &[Image],
    always_digest: bool,
    edits: &mut Vec<Edit>,
    changes: &mut Vec<Change>,
) -> Result<(), YamlError> {
    match node {
        Node::Map(map) => {
            for (key, value) in &map.pairs {
                if let (Node::Scalar(k), Node::Scalar(v)) = (key, value) {
                    if k.value == "image" {
                        if let Some(new) = repin_reference(&v.value, images, always_digest) {
                            let image = split_reference(&v.value).0.to_string();
                            changes.push(Change {
                                line: v.line,
                                field: "image".to_string(),
                                repository: image,
                                old: Some(v.value.clone()),
                                new: new.clone(),
                            });
                            edits.push(Edit { start: v.start, end: v.end, text: render(v, &new)? });
                        }
                        continue;
                    }
                }
                pin_image_strings(value, images, always_digest, edits, changes)?;
            }
        }
        Node::Seq(items) => {
            for item in items {
                pin_image_strings(item, images, always_digest, edits, changes)?;
            }
        }
        Node::Scalar(_) | Node::Alias => {}
    }
    Ok(())
}

/// `REPOSITORY[:TAG][@DIGEST]` as (repository, tag, digest).
fn split_reference(reference: &str) -> (&str, Option<&str>, Option<&str>) {
    let (name, digest) = match reference.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (reference, None),
    };
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[slash..].rfind(':') {
        Some(colon) => (&name[..slash + colon], Some(&name[slash + colon + 1..]), digest),
        None => (name, None, digest),
    }
}

/// The new reference for an `image:` string naming one of the images, if it changes.
fn repin_reference(reference: &str, images: &[Image], always_digest: bool) -> Option<String> {
    let (repository, _, digest) = split_reference(reference);
    let image = images.iter().find(|i| i.repository == repository)?;
    let mut new = format!("{}:{}", image.repository, image.tag);
    if digest.is_some() || always_digest {
        new = format!("{new}@{}", image.digest);
    }
    (new != reference).then_some(new)
}

/// `value` written in the style the old scalar had.
fn render(old: &Scalar, value: &str) -> Result<String, YamlError> {
    match old.style {
        ScalarStyle::Plain => Ok(plain_or_quoted(value)),
        ScalarStyle::SingleQuoted => Ok(format!("'{}'", value.replace('\'', "''"))),
        ScalarStyle::DoubleQuoted => Ok(double_quoted(value)),
        ScalarStyle::Literal | ScalarStyle::Folded => Err(YamlError {
            line: old.line,
            column: old.column + 1,
            message: format!("{:?} is a block scalar (| or >): write it as a plain or quoted string", old.value),
        }),
    }
}

fn double_quoted(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Plain when a YAML reader would read it back as this same string; quoted otherwise (a tag
/// `1.10` written plain would be read as the number 1.1).
fn plain_or_quoted(value: &str) -> String {
    let reads_as_other = value.parse::<f64>().is_ok()
        || value.starts_with("0x")
        || value.starts_with("0o")
        || matches!(
            value.to_ascii_lowercase().as_str(),
            "" | "~" | "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | ".inf" | ".nan"
        );
    let special = value.starts_with(|c: char| "-?:,[]{}#&*!|>'\"%@` ".contains(c))
        || value.ends_with(' ')
        || value.contains(": ")
        || value.contains(" #")
        || value.contains(['\n', '\t', '\\']);
    if reads_as_other || special {
        double_quoted(value)
    } else {
        value.to_string()
    }
}

/// The documents of the text as trees of nodes with byte spans.
fn parse(text: &str) -> Result<Vec<Node>, YamlError> {
    let index = CharIndex::new(text);
    let mut events = Vec::new();
    for event in Parser::new_from_str(text) {
        match event {
            Ok(event) => events.push(event),
            Err(e) => {
                return Err(YamlError {
                    line: e.marker().line(),
                    column: e.marker().col() + 1,
                    message: e.info().to_string(),
                })
            }
        }
    }
    let mut events = events.into_iter().peekable();
    let mut documents = Vec::new();
    while let Some((event, span)) = events.next() {
        if let Event::DocumentStart(_) = event {
            if let Some(next) = events.next() {
                if !matches!(next.0, Event::DocumentEnd) {
                    documents.push(node(next, &mut events, &index, text));
                }
            }
        }
        let _ = span;
    }
    Ok(documents)
}

fn node<'a>(
    (event, span): (Event<'a>, Span),
    events: &mut impl Iterator<Item = (Event<'a>, Span)>,
    index: &CharIndex,
    text: &str,
) -> Node {
    match event {
        Event::Scalar(value, style, _, _) => {
            let start = index.byte(&span.start);
            // A quoted scalar's span may run on over a comment after it: its end is found here.
            let end = quoted_end(text, start, style).unwrap_or_else(|| index.byte(&span.end));
            Node::Scalar(Scalar {
                value: value.into_owned(),
                style,
                start,
                end,
                line: span.start.line(),
                column: span.start.col(),
            })
        }
        Event::SequenceStart(..) => {
            let mut items = Vec::new();
            while let Some(next) = events.next() {
                if matches!(next.0, Event::SequenceEnd) {
                    break;
                }
                items.push(node(next, events, index, text));
            }
            Node::Seq(items)
        }
        Event::MappingStart(..) => {
            let flow = text[index.byte(&span.start)..].starts_with('{');
            let mut pairs = Vec::new();
            while let Some(next) = events.next() {
                if matches!(next.0, Event::MappingEnd) {
                    break;
                }
                let key = node(next, events, index, text);
                let Some(next) = events.next() else { break };
                pairs.push((key, node(next, events, index, text)));
            }
            Node::Map(Map { pairs, flow })
        }
        _ => Node::Alias,
    }
}

/// The byte after the closing quote of the quoted scalar starting at `start`.
fn quoted_end(text: &str, start: usize, style: ScalarStyle) -> Option<usize> {
    let rest = text.get(start..)?;
    let mut chars = rest.char_indices();
    match style {
        ScalarStyle::SingleQuoted => {
            chars.next().filter(|(_, c)| *c == '\'')?;
            let bytes = rest.as_bytes();
            let mut i = 1;
            while i < bytes.len() {
                if bytes[i] == b'\'' {
                    if bytes.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    return Some(start + i + 1);
                }
                i += 1;
            }
            None
        }
        ScalarStyle::DoubleQuoted => {
            chars.next().filter(|(_, c)| *c == '"')?;
            let mut escaped = false;
            for (i, c) in chars {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => return Some(start + i + 1),
                    _ => {}
                }
            }
            None
        }
        _ => None,
    }
}

/// The parser's positions are in characters; edits need bytes. Its character index drifts
/// after a comment with multibyte characters, so the line and column are what is used.
struct CharIndex<'t> {
    text: &'t str,
    /// Byte offset of each line's start.
    lines: Vec<usize>,
}

impl<'t> CharIndex<'t> {
    fn new(text: &'t str) -> CharIndex<'t> {
        let lines = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        CharIndex { text, lines }
    }

    fn byte(&self, marker: &saphyr_parser::Marker) -> usize {
        let Some(&start) = self.lines.get(marker.line().saturating_sub(1)) else {
            return self.text.len();
        };
        let line = &self.text[start..];
        start + line.char_indices().nth(marker.col()).map_or(line.len(), |(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPO: &str = "registry.example.net:5000/blumeops/ntfy";
    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn ntfy() -> Image {
        Image { repository: REPO.to_string(), tag: "v2.18.0-abc1234-nix".to_string(), digest: DIGEST.to_string() }
    }

    fn pinned(text: &str, always_digest: bool) -> Pinned {
        pin(text, &[ntfy()], always_digest).unwrap()
    }

    /// The lines that differ, old and new, for asserting that nothing else moved.
    fn diff(old: &str, new: &str) -> Vec<(String, String)> {
        assert_eq!(old.lines().count(), new.lines().count(), "lines added or removed:\n{new}");
        old.lines().zip(new.lines()).filter(|(a, b)| a != b).map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    const KUSTOMIZATION: &str = "\
# ntfy, pinned by CI
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - deployment.yaml   # the app
images:
  - name: registry.example.net:5000/blumeops/ntfy
    newTag: v2.17.0-cd57814-nix  # bumped by nixctr
  - name: docker.io/library/redis
    newTag: \"7.2\"
  - name: ghcr.io/blumeops/ntfy
    newTag: v1
";

    #[test]
    fn a_kustomization_entry_gets_the_new_tag_and_nothing_else_moves() {
        let out = pinned(KUSTOMIZATION, false);
        assert_eq!(
            diff(KUSTOMIZATION, &out.text),
            [(
                "    newTag: v2.17.0-cd57814-nix  # bumped by nixctr".to_string(),
                "    newTag: v2.18.0-abc1234-nix  # bumped by nixctr".to_string()
            )]
        );
        assert_eq!(
            out.changes,
            [Change {
                line: 8,
                field: "newTag".to_string(),
                repository: REPO.to_string(),
                old: Some("v2.17.0-cd57814-nix".to_string()),
                new: "v2.18.0-abc1234-nix".to_string(),
            }]
        );
    }

    #[test]
    fn pinning_twice_changes_nothing_the_second_time() {
        let once = pinned(KUSTOMIZATION, true);
        let twice = pinned(&once.text, true);
        assert_eq!(twice.text, once.text);
        assert!(twice.changes.is_empty());
    }

    #[test]
    fn an_existing_digest_is_replaced_in_its_quoting_style() {
        let text =
            "images:\n- name: registry.example.net:5000/blumeops/ntfy\n  newTag: 'v1'\n  digest: \"sha256:00\"\n";
        let out = pinned(text, false);
        assert_eq!(
            out.text,
            format!(
                "images:\n- name: registry.example.net:5000/blumeops/ntfy\n  newTag: 'v2.18.0-abc1234-nix'\n  digest: \"{DIGEST}\"\n"
            )
        );
        assert_eq!(out.changes.len(), 2);
    }

    #[test]
    fn pin_digest_adds_a_digest_line_indented_like_the_entry() {
        let out = pinned(KUSTOMIZATION, true);
        let expected = KUSTOMIZATION.replace(
            "    newTag: v2.17.0-cd57814-nix  # bumped by nixctr\n",
            &format!("    newTag: v2.18.0-abc1234-nix  # bumped by nixctr\n    digest: {DIGEST}\n"),
        );
        assert_eq!(out.text, expected);
        assert_eq!(out.changes.iter().filter(|c| c.old.is_none()).count(), 1);
    }

    #[test]
    fn a_missing_new_tag_is_added_after_the_name() {
        let text = "images:\n  - name: registry.example.net:5000/blumeops/ntfy\n  - name: other\n";
        let out = pinned(text, false);
        assert_eq!(
            out.text,
            "images:\n  - name: registry.example.net:5000/blumeops/ntfy\n    newTag: v2.18.0-abc1234-nix\n  - name: other\n"
        );
    }

    #[test]
    fn flow_entries_are_edited_in_place() {
        let text = "images: [{name: registry.example.net:5000/blumeops/ntfy, newTag: v1}, {name: x, newTag: v1}]\n";
        let out = pinned(text, true);
        assert_eq!(
            out.text,
            format!(
                "images: [{{name: registry.example.net:5000/blumeops/ntfy, newTag: v2.18.0-abc1234-nix, digest: {DIGEST}}}, {{name: x, newTag: v1}}]\n"
            )
        );
    }

    #[test]
    fn new_name_is_the_repository_an_entry_deploys() {
        let text = "images:\n- name: ntfy\n  newName: registry.example.net:5000/blumeops/ntfy\n  newTag: v1\n\
                    - name: registry.example.net:5000/blumeops/ntfy\n  newName: ghcr.io/elsewhere/ntfy\n  newTag: v1\n";
        let out = pinned(text, false);
        assert_eq!(diff(text, &out.text), [("  newTag: v1".to_string(), "  newTag: v2.18.0-abc1234-nix".to_string())]);
        assert_eq!(out.changes[0].line, 4);
    }

    #[test]
    fn another_registry_with_the_same_name_and_other_images_are_left_alone() {
        let text = "images:\n- name: ghcr.io/blumeops/ntfy\n  newTag: v1\n- name: docker.io/library/redis\n  newTag: v1\n\
                    ---\nspec:\n  containers:\n  - image: ghcr.io/blumeops/ntfy:v1\n  - image: registry.example.net:5000/blumeops/ntfy2:v1\n";
        let out = pinned(text, true);
        assert_eq!(out.text, text);
        assert!(out.changes.is_empty());
    }

    #[test]
    fn plain_manifest_image_strings_keep_or_gain_their_digest() {
        let text = "\
apiVersion: apps/v1
kind: Deployment
spec:
  template:
    spec:
      initContainers:
        - name: init
          image: \"registry.example.net:5000/blumeops/ntfy:v1@sha256:00\"
      containers:
        - name: app
          image: registry.example.net:5000/blumeops/ntfy:v1 # the app
        - name: cache
          image: docker.io/library/redis:7.2
";
        let out = pinned(text, false);
        assert_eq!(
            diff(text, &out.text),
            [
                (
                    "          image: \"registry.example.net:5000/blumeops/ntfy:v1@sha256:00\"".to_string(),
                    format!("          image: \"{REPO}:v2.18.0-abc1234-nix@{DIGEST}\"")
                ),
                (
                    "          image: registry.example.net:5000/blumeops/ntfy:v1 # the app".to_string(),
                    format!("          image: {REPO}:v2.18.0-abc1234-nix # the app")
                ),
            ]
        );
        let with_digest = pinned(text, true);
        assert!(with_digest.text.contains(&format!("image: {REPO}:v2.18.0-abc1234-nix@{DIGEST} # the app")));
        assert_eq!(with_digest.changes.iter().map(|c| c.line).collect::<Vec<_>>(), [8, 11]);
    }

    #[test]
    fn an_image_without_a_tag_gains_one() {
        let out = pinned(&format!("image: {REPO}\n"), false);
        assert_eq!(out.text, format!("image: {REPO}:v2.18.0-abc1234-nix\n"));
    }

    #[test]
    fn references_split_at_the_last_colon_after_the_last_slash() {
        assert_eq!(split_reference("h:5000/a/b"), ("h:5000/a/b", None, None));
        assert_eq!(split_reference("h:5000/a/b:t"), ("h:5000/a/b", Some("t"), None));
        assert_eq!(split_reference("h:5000/a/b:t@sha256:x"), ("h:5000/a/b", Some("t"), Some("sha256:x")));
        assert_eq!(split_reference("h/a/b@sha256:x"), ("h/a/b", None, Some("sha256:x")));
    }

    #[test]
    fn a_tag_that_reads_as_a_number_is_quoted_when_written_plain() {
        let image = Image { tag: "1.10".to_string(), ..ntfy() };
        let text = format!("images:\n- name: {REPO}\n  newTag: v1\n");
        let out = pin(&text, &[image], false).unwrap();
        assert!(out.text.contains("  newTag: \"1.10\"\n"), "{}", out.text);
        assert_eq!(plain_or_quoted("v1.10"), "v1.10");
        assert_eq!(plain_or_quoted("true"), "\"true\"");
        assert_eq!(plain_or_quoted(DIGEST), DIGEST);
    }

    #[test]
    fn several_images_and_documents_in_one_file() {
        let other = Image { repository: "registry.example.net:5000/blumeops/web".to_string(), ..ntfy() };
        let text = format!(
            "---\nimages:\n- name: {REPO}\n  newTag: v1\n---\n# web\nimages:\n- name: {}\n  newTag: v1\n",
            other.repository
        );
        let out = pin(&text, &[ntfy(), other], false).unwrap();
        assert_eq!(out.changes.len(), 2);
        assert_eq!(out.text, text.replace("newTag: v1", "newTag: v2.18.0-abc1234-nix"));
    }

    #[test]
    fn text_with_multibyte_characters_is_cut_at_the_right_bytes() {
        let text = format!("# ntfy — notifications ✓\nimages:\n- name: {REPO} # ünïcode\n  newTag: 'v1' # é\n");
        let out = pinned(&text, false);
        assert_eq!(out.text, text.replace("'v1'", "'v2.18.0-abc1234-nix'"));
    }

    #[test]
    fn quoted_scalars_end_at_their_closing_quote_before_a_comment() {
        let text = format!("images:\n- name: \"{REPO}\" # \"x\"\n  newTag: 'it''s' # 'y'\n  digest: \"a\\\"b\" # c\n");
        let out = pinned(&text, false);
        let expected = text
            .replace("'it''s' # 'y'", "'v2.18.0-abc1234-nix' # 'y'")
            .replace("\"a\\\"b\" # c", &format!("\"{DIGEST}\" # c"));
        assert_eq!(out.text, expected);
    }

    #[test]
    fn a_block_scalar_is_refused_with_its_line() {
        let text = format!("images:\n- name: {REPO}\n  newTag: |\n    v1\n");
        let err = pin(&text, &[ntfy()], false).unwrap_err();
        // The line its text starts on.
        assert_eq!(err.line, 4);
        assert!(err.message.contains("block scalar"), "{err}");
    }

    #[test]
    fn names_any_finds_the_entries_and_image_strings_pin_would_change() {
        let ours = [REPO.to_string()];
        assert!(names_any(KUSTOMIZATION, &ours).unwrap());
        assert!(names_any(&format!("spec:\n  containers:\n  - image: '{REPO}:v1@sha256:00'\n"), &ours).unwrap());
        assert!(!names_any(KUSTOMIZATION, &["ghcr.io/x/ntfy".to_string()]).unwrap());
        assert!(!names_any("images:\n- name: docker.io/library/redis\n", &ours).unwrap());
    }

    #[test]
    fn bad_yaml_is_an_error_naming_the_line() {
        let text = "images:\n- name: a\n  newTag: [v1\nresources: x\n";
        let err = names_any(text, &[]).unwrap_err();
        assert!(err.line >= 3, "{err}");
        let err = pin("a: b\n  c: d\n", &[ntfy()], false).unwrap_err();
        assert_eq!(err.line, 2, "{err}");
        assert!(err.to_string().starts_with("line 2 column"), "{err}");
    }

    #[test]
    fn empty_files_and_other_shapes_pin_nothing() {
        for text in
            ["", "# only a comment\n", "---\n...\n", "- a\n- b\n", "images: none\n", "images:\n- just-a-string\n"]
        {
            let out = pinned(text, true);
            assert_eq!(out.text, text);
            assert!(out.changes.is_empty());
        }
    }

    #[test]
    fn anchors_and_aliases_do_not_confuse_the_walk() {
        let text = format!("base: &b {{name: {REPO}, newTag: v1}}\nimages:\n- *b\n- name: {REPO}\n  newTag: v1\n");
        let out = pinned(&text, false);
        assert_eq!(out.changes.len(), 1);
        assert_eq!(out.changes[0].line, 5);
    }
}
