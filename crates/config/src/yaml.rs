//! The YAML text as a tree in which every node knows where it was written.
//!
//! Built from the events of `saphyr-parser`, so a problem found after parsing still points at
//! its line and column, in block and flow style alike; files of the plain shape most deployment
//! files have are read by [`crate::fast`] instead, to the same tree, a few times faster. Anchors and aliases are expanded (with a
//! bound on the expansion), merge keys (`<<`) are applied, and a key written twice is reported.
//! No collection may hold more than [`MAX_ENTRIES`] entries, merged ones included; duplicate
//! and merged keys are found with hash sets, so building the tree is linear in its size.
//! Scalars keep their text: what a scalar means (a string, a number, a boolean) is decided by
//! the field that reads it, so `name: 2024` is a name and `port: "8080"` is a port.

use std::borrow::Cow;
use std::collections::hash_map::Entry as HashEntry;
use std::collections::{HashMap, HashSet};

use saphyr_parser::{Event, Parser, ScalarStyle, Span as RawSpan};

use crate::MAX_ENTRIES;

/// Where a node was written: 1-based line and column (in characters) of its first and last
/// character (the end is exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Span {
    pub(crate) line: usize,
    pub(crate) column: usize,
    pub(crate) end_line: usize,
    pub(crate) end_column: usize,
}

impl Span {
    fn from_raw(span: RawSpan) -> Self {
        Self {
            line: span.start.line(),
            column: span.start.col() + 1,
            end_line: span.end.line(),
            end_column: span.end.col() + 1,
        }
    }

    /// How many characters the span covers on its first line, when it ends there.
    pub(crate) fn width(&self) -> Option<usize> {
        (self.end_line == self.line && self.end_column > self.column)
            .then(|| self.end_column - self.column)
    }
}

/// A node of the tree.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node<'t> {
    pub(crate) value: Value<'t>,
    pub(crate) span: Span,
}

/// What a node holds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value<'t> {
    Scalar(Scalar<'t>),
    Seq(Vec<Node<'t>>),
    Map(Vec<Entry<'t>>),
}

/// A scalar as written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scalar<'t> {
    pub(crate) text: Cow<'t, str>,
    /// Written without quotes (nor `|`, `>`, nor a `!!str` tag): may read as null, a boolean
    /// or a number.
    pub(crate) plain: bool,
}

/// One `key: value` of a mapping.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry<'t> {
    pub(crate) key: Cow<'t, str>,
    pub(crate) key_span: Span,
    /// The key was written without quotes (only a plain `<<` is a merge key).
    pub(crate) plain_key: bool,
    pub(crate) value: Node<'t>,
}

impl Node<'_> {
    /// A plain scalar that reads as null (`~`, `null`, or nothing at all).
    pub(crate) fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar(s) if s.plain && is_null_text(&s.text))
    }

    /// What the node is, for messages ("a mapping", "a list", ...).
    pub(crate) fn describe(&self) -> String {
        match &self.value {
            Value::Map(_) => "a mapping".to_owned(),
            Value::Seq(_) => "a list".to_owned(),
            Value::Scalar(s) if s.plain && is_null_text(&s.text) => "nothing".to_owned(),
            Value::Scalar(s) => {
                let mut text: String = s.text.chars().take(40).collect();
                if text.len() < s.text.len() {
                    text.push('…');
                }
                format!("`{}`", text.replace('\n', "\\n"))
            }
        }
    }

    fn count(&self) -> usize {
        match &self.value {
            Value::Scalar(_) => 1,
            Value::Seq(items) => 1 + items.iter().map(Node::count).sum::<usize>(),
            Value::Map(entries) => 1 + entries.iter().map(|e| e.value.count()).sum::<usize>(),
        }
    }
}

pub(crate) fn is_null_text(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

/// A problem found while reading the YAML itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) span: Span,
    /// The key path of the node the problem is in (`services.echo`), when known.
    pub(crate) path: String,
    pub(crate) message: String,
    /// Set for problems that do not stop the tree from being built (a key written twice).
    pub(crate) recoverable: bool,
}

/// Deeper nesting than this is refused: no deployment file needs it, and it bounds recursion.
pub(crate) const MAX_DEPTH: usize = 64;
/// Aliases may not expand the tree beyond this many nodes ("billion laughs"); keys count.
pub(crate) const MAX_NODES: usize = 1_000_000;

enum Frame<'t> {
    Seq {
        span: Span,
        anchor: usize,
        items: Vec<Node<'t>>,
    },
    Map {
        span: Span,
        anchor: usize,
        entries: Vec<Entry<'t>>,
        /// The key read (text, place, plain), waiting for its value; `None` inside when the
        /// key was refused.
        key: Option<Option<(Cow<'t, str>, Span, bool)>>,
    },
}

struct Builder<'t> {
    stack: Vec<Frame<'t>>,
    anchors: HashMap<usize, Node<'t>>,
    root: Option<Node<'t>>,
    documents: usize,
    nodes: usize,
    problems: Vec<Problem>,
}

/// Reads `text` into a tree; `Ok(None)` for a file without content. Problems that do not stop
/// the reading are returned beside the tree.
pub(crate) fn parse(text: &str) -> (Result<Option<Node<'_>>, Problem>, Vec<Problem>) {
    match crate::fast::parse(text) {
        Some(root) => (Ok(Some(root)), Vec::new()),
        None => parse_full(text),
    }
}

/// Like [`parse`], always with the full YAML parser.
pub(crate) fn parse_full(text: &str) -> (Result<Option<Node<'_>>, Problem>, Vec<Problem>) {
    let mut builder = Builder {
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        documents: 0,
        nodes: 0,
        problems: Vec::new(),
    };
    let result = builder.run(text).map_err(|mut problem| {
        if problem.path.is_empty() {
            problem.path = builder.path();
        }
        problem
    });
    let root = builder.root.take();
    (result.map(|()| root), builder.problems)
}

impl<'t> Builder<'t> {
    /// The key path of the node being built.
    fn path(&self) -> String {
        path_of(&self.stack)
    }

    /// The key path of the collection being built (the innermost frame).
    fn collection_path(&self) -> String {
        path_of(&self.stack[..self.stack.len().saturating_sub(1)])
    }

    fn run(&mut self, text: &'t str) -> Result<(), Problem> {
        let mut parser = Parser::new_from_str(text);
        while let Some(next) = parser.next_event() {
            let (event, raw_span) = next.map_err(|err| {
                let marker = err.marker();
                let at = Span {
                    line: marker.line(),
                    column: marker.col() + 1,
                    end_line: marker.line(),
                    end_column: marker.col() + 1,
                };
                Problem {
                    span: at,
                    path: String::new(),
                    message: err.info().to_owned(),
                    recoverable: false,
                }
            })?;
            let span = Span::from_raw(raw_span);
            match event {
                Event::StreamStart | Event::Nothing | Event::DocumentEnd => {}
                Event::StreamEnd => break,
                Event::DocumentStart(_) => {
                    self.documents += 1;
                    if self.documents > 1 {
                        return Err(fatal(
                            span,
                            "a deployment file holds one YAML document; found a second",
                        ));
                    }
                }
                Event::Alias(id) => {
                    let Some(target) = self.anchors.get(&id) else {
                        return Err(fatal(span, "this alias names no anchor"));
                    };
                    self.nodes += target.count();
                    if self.nodes > MAX_NODES {
                        return Err(fatal(span, "aliases expand to too many nodes"));
                    }
                    let mut node = target.clone();
                    node.span = span;
                    self.complete(node, 0)?;
                }
                Event::Scalar(text, style, anchor, tag) => {
                    let mut plain = style == ScalarStyle::Plain;
                    if let Some(tag) = tag {
                        match (tag.is_yaml_core_schema(), tag.suffix.as_str()) {
                            (true, "str") => plain = false,
                            (true, "null" | "bool" | "int" | "float") => {}
                            _ => {
                                return Err(fatal(
                                    span,
                                    &format!("the tag `{tag}` is not supported here"),
                                ));
                            }
                        }
                    }
                    self.count_node(span)?;
                    let node = Node {
                        value: Value::Scalar(Scalar { text, plain }),
                        span,
                    };
                    self.complete(node, anchor)?;
                }
                Event::SequenceStart(anchor, tag) => {
                    check_collection_tag(tag.as_deref(), "seq", span)?;
                    self.open(
                        Frame::Seq {
                            span,
                            anchor,
                            items: Vec::new(),
                        },
                        span,
                    )?;
                }
                Event::MappingStart(anchor, tag) => {
                    check_collection_tag(tag.as_deref(), "map", span)?;
                    self.open(
                        Frame::Map {
                            span,
                            anchor,
                            entries: Vec::new(),
                            key: None,
                        },
                        span,
                    )?;
                }
                Event::SequenceEnd | Event::MappingEnd => {
                    let Some(frame) = self.stack.pop() else {
                        return Err(fatal(span, "unbalanced YAML collection"));
                    };
                    let (node, anchor) = match frame {
                        Frame::Seq {
                            span: start,
                            anchor,
                            items,
                        } => (
                            Node {
                                value: Value::Seq(items),
                                span: start,
                            },
                            anchor,
                        ),
                        Frame::Map {
                            span: start,
                            anchor,
                            entries,
                            ..
                        } => {
                            let entries = self.finish_map(entries, start)?;
                            (
                                Node {
                                    value: Value::Map(entries),
                                    span: start,
                                },
                                anchor,
                            )
                        }
                    };
                    self.complete(node, anchor)?;
                }
            }
        }
        Ok(())
    }

    fn count_node(&mut self, span: Span) -> Result<(), Problem> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(fatal(span, "the file has too many nodes"));
        }
        Ok(())
    }

    fn open(&mut self, frame: Frame<'t>, span: Span) -> Result<(), Problem> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(fatal(
                span,
                &format!("the file nests deeper than {MAX_DEPTH} levels"),
            ));
        }
        self.count_node(span)?;
        self.stack.push(frame);
        Ok(())
    }

    /// Places a finished node in its parent (or as the root).
    fn complete(&mut self, node: Node<'t>, anchor: usize) -> Result<(), Problem> {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_some() {
                    return Err(fatal(
                        node.span,
                        "a deployment file holds one YAML document; found a second",
                    ));
                }
                self.root = Some(node);
            }
            Some(Frame::Seq { items, span, .. }) => {
                if items.len() == MAX_ENTRIES {
                    return Err(too_many(*span, self.collection_path(), "list"));
                }
                items.push(node);
            }
            Some(Frame::Map {
                entries, key, span, ..
            }) => match key.take() {
                None => match node.value {
                    Value::Scalar(scalar) => {
                        *key = Some(Some((scalar.text, node.span, scalar.plain)));
                    }
                    _ => {
                        *key = Some(None);
                        let path = self.path();
                        self.problems.push(Problem {
                            span: node.span,
                            path,
                            message: "a key must be a plain string, not a list or a mapping"
                                .to_owned(),
                            recoverable: false,
                        });
                    }
                },
                Some(Some((name, key_span, plain_key))) => {
                    if entries.len() == MAX_ENTRIES {
                        let span = *span;
                        return Err(too_many(span, self.collection_path(), "mapping"));
                    }
                    entries.push(Entry {
                        key: name,
                        key_span,
                        plain_key,
                        value: node,
                    });
                }
                Some(None) => {}
            },
        }
        Ok(())
    }

    /// Applies merge keys and reports keys written twice (the first one is kept).
    fn finish_map(
        &mut self,
        entries: Vec<Entry<'t>>,
        span: Span,
    ) -> Result<Vec<Entry<'t>>, Problem> {
        // For each entry, the index of an earlier entry with the same key.
        let earlier: Vec<Option<usize>> = if entries.len() <= 16 {
            (0..entries.len())
                .map(|i| (0..i).find(|&j| entries[j].key == entries[i].key))
                .collect()
        } else {
            let mut seen: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
            entries
                .iter()
                .enumerate()
                .map(|(i, entry)| match seen.entry(&entry.key) {
                    HashEntry::Occupied(first) => Some(*first.get()),
                    HashEntry::Vacant(slot) => {
                        slot.insert(i);
                        None
                    }
                })
                .collect()
        };
        let mut duplicates = Vec::new();
        for (i, first) in earlier.iter().enumerate() {
            if let Some(first) = first {
                duplicates.push((i, entries[*first].key_span.line));
            }
        }
        for (i, first_line) in duplicates {
            let entry = &entries[i];
            let mut path = self.path();
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&entry.key);
            let problem = Problem {
                span: entry.key_span,
                path,
                message: format!(
                    "`{}` is written twice (first on line {first_line})",
                    entry.key
                ),
                recoverable: true,
            };
            self.problems.push(problem);
        }
        let mut out: Vec<Entry<'t>> = Vec::with_capacity(entries.len());
        let mut merged: Vec<Entry<'t>> = Vec::new();
        for (entry, earlier) in entries.into_iter().zip(earlier) {
            if earlier.is_some() {
                continue;
            }
            if entry.plain_key && entry.key == "<<" {
                match entry.value.value {
                    Value::Map(more) => merged.extend(more),
                    Value::Seq(maps) => {
                        for map in maps {
                            match map.value {
                                Value::Map(more) => merged.extend(more),
                                _ => return Err(fatal(map.span, "`<<` merges mappings only")),
                            }
                        }
                    }
                    _ => {
                        return Err(fatal(
                            entry.value.span,
                            "`<<` merges a mapping or a list of mappings",
                        ));
                    }
                }
                continue;
            }
            out.push(entry);
        }
        // Merged keys never override keys written in the mapping itself; the first merged wins.
        if !merged.is_empty() {
            let mut keys: HashSet<Cow<'t, str>> = out.iter().map(|e| e.key.clone()).collect();
            for entry in merged {
                if keys.insert(entry.key.clone()) {
                    out.push(entry);
                }
            }
            if out.len() > MAX_ENTRIES {
                return Err(too_many(span, self.path(), "mapping"));
            }
        }
        Ok(out)
    }
}

/// The key path of the node built in the innermost of `frames`.
fn path_of(frames: &[Frame<'_>]) -> String {
    let mut out = String::new();
    for frame in frames {
        match frame {
            Frame::Seq { items, .. } => {
                out.push_str(&format!("[{}]", items.len()));
            }
            Frame::Map {
                key: Some(Some((key, _, _))),
                ..
            } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Frame::Map { .. } => {}
        }
    }
    out
}

fn check_collection_tag(
    tag: Option<&saphyr_parser::Tag>,
    core: &str,
    span: Span,
) -> Result<(), Problem> {
    match tag {
        None => Ok(()),
        Some(tag) if tag.is_yaml_core_schema() && tag.suffix == core => Ok(()),
        Some(tag) => Err(fatal(
            span,
            &format!("the tag `{tag}` is not supported here"),
        )),
    }
}

/// A collection with more than [`MAX_ENTRIES`] entries, at `path`.
fn too_many(span: Span, path: String, what: &str) -> Problem {
    let entries = if what == "list" { "items" } else { "entries" };
    Problem {
        span,
        path,
        message: format!(
            "this {what} has more than {MAX_ENTRIES} {entries}; the most accepted is {MAX_ENTRIES}"
        ),
        recoverable: false,
    }
}

fn fatal(span: Span, message: &str) -> Problem {
    Problem {
        span,
        path: String::new(),
        message: message.to_owned(),
        recoverable: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(text: &str) -> Node<'_> {
        let (result, problems) = parse(text);
        assert!(problems.is_empty(), "{problems:?}");
        result.unwrap().unwrap()
    }

    fn map<'a>(node: &'a Node<'a>) -> &'a [Entry<'a>] {
        match &node.value {
            Value::Map(entries) => entries,
            other => panic!("not a map: {other:?}"),
        }
    }

    #[test]
    fn spans_in_block_and_flow_style() {
        let root = tree("name: x\nservices: {a: {port: 80}}\n");
        let entries = map(&root);
        assert_eq!(
            (entries[0].key_span.line, entries[0].key_span.column),
            (1, 1)
        );
        assert_eq!(
            (entries[0].value.span.line, entries[0].value.span.column),
            (1, 7)
        );
        let a = &map(&entries[1].value)[0];
        assert_eq!((a.key_span.line, a.key_span.column), (2, 12));
        let port = &map(&a.value)[0];
        assert_eq!((port.value.span.line, port.value.span.column), (2, 22));
        assert_eq!(port.value.span.width(), Some(2));
    }

    #[test]
    fn aliases_and_merge_keys() {
        let root = tree("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  y: 3\n");
        let c = &map(&root)[1].value;
        let keys: Vec<&str> = map(c).iter().map(|e| &*e.key).collect();
        assert_eq!(keys, ["y", "x"]);
    }

    #[test]
    fn duplicate_keys_are_reported() {
        let (result, problems) = parse("a: 1\nb: 2\na: 3\n");
        assert_eq!(map(&result.unwrap().unwrap()).len(), 2);
        assert_eq!(problems.len(), 1);
        assert_eq!(
            problems[0].message,
            "`a` is written twice (first on line 1)"
        );
        assert_eq!(problems[0].span.line, 3);
    }

    #[test]
    fn limits() {
        let deep = "[".repeat(200);
        assert!(parse(&deep).0.is_err());
        let mut laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n".to_owned();
        for i in 0..8 {
            let prev = if i == 0 {
                "a".to_owned()
            } else {
                format!("l{}", i - 1)
            };
            laughs.push_str(&format!(
                "l{i}: &l{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        assert!(parse(&laughs).0.is_err());
        assert_eq!(parse("").0, Ok(None));
        assert!(parse("a: 1\n---\nb: 2\n").0.is_err());
    }
}
