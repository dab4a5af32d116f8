//! A fast reader for the plain shape most deployment files have, giving the same tree (spans
//! included) as the full YAML parser.
//!
//! It reads block mappings and sequences, plain and quoted scalars written on one line, flow
//! collections written on one line, and comments. On anything else (anchors, tags, block or
//! multi-line scalars, escapes, tabs, documents markers, a key written twice, a syntax error...)
//! it gives up and returns `None`, and the full parser reads the file: this reader never reports
//! a problem, so it cannot report one differently. A differential test checks that both give
//! the same tree wherever this one succeeds. It gives up too where the full parser would refuse
//! the tree for its size (more than [`MAX_NODES`] nodes, a collection of more than
//! [`MAX_ENTRIES`] entries), so that it is the full parser that reports it.
//!
//! Everything here is linear in the size of the text: columns on a line with non-ASCII text are
//! counted from the last column counted on that line, not from the start of the line.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;

use crate::MAX_ENTRIES;
use crate::yaml::{Entry, MAX_DEPTH, MAX_NODES, Node, Scalar, Span, Value};

/// One line with content (blank and comment-only lines are left out).
#[derive(Clone, Copy)]
struct Line {
    /// 1-based line number.
    number: usize,
    /// Byte offset of the line's first character in the text.
    start: usize,
    /// Byte offset of the end of the line (before `\n`).
    end: usize,
    /// Byte offset where the content read next begins (after the indentation, or after `- `).
    at: usize,
    /// The column (0-based, in characters) of `at`: the indentation of what is read next.
    indent: usize,
    /// The line is ASCII, so columns are byte offsets.
    ascii: bool,
}

struct Reader<'t> {
    text: &'t str,
    lines: Vec<Line>,
    next: usize,
    depth: usize,
    /// Nodes read so far, keys included (as the full parser counts them).
    nodes: Cell<usize>,
    /// The last column counted on a non-ASCII line: (the line's start, byte offset, column).
    cursor: Cell<(usize, usize, usize)>,
}

/// Reads `text` when it has the plain shape; `None` means: use the full parser.
pub(crate) fn parse(text: &str) -> Option<Node<'_>> {
    if text.starts_with('\u{feff}') || text.contains(['\t', '\r']) {
        return None;
    }
    let mut lines = Vec::with_capacity(text.len() / 16);
    let mut start = 0;
    for (index, raw) in text.split('\n').enumerate() {
        let end = start + raw.len();
        let trimmed = raw.trim_start_matches(' ');
        let indent = raw.len() - trimmed.len();
        if raw.starts_with("---") || raw.starts_with("...") || raw.starts_with('%') {
            return None;
        }
        let printable = if raw.is_ascii() {
            !raw.bytes().any(|b| b < 0x20 || b == 0x7f)
        } else {
            !raw.chars().any(|c| {
                c.is_control()
                    || matches!(
                        c,
                        '\u{feff}' | '\u{fffe}' | '\u{ffff}' | '\u{2028}' | '\u{2029}'
                    )
            })
        };
        if !printable {
            return None;
        }
        if !trimmed.is_empty() && !trimmed.starts_with('#') {
            lines.push(Line {
                number: index + 1,
                start,
                end,
                at: start + indent,
                indent,
                ascii: raw.is_ascii(),
            });
        }
        start = end + 1;
    }
    let first = *lines.first()?;
    if first.indent != 0 {
        return None;
    }
    let mut reader = Reader {
        text,
        lines,
        next: 0,
        depth: 0,
        nodes: Cell::new(1),
        cursor: Cell::new((usize::MAX, 0, 0)),
    };
    let root = reader.block(0)?;
    if !matches!(root.value, Value::Map(_)) || reader.next != reader.lines.len() {
        return None;
    }
    Some(root)
}

fn is_space_or_end(byte: Option<u8>) -> bool {
    matches!(byte, None | Some(b' '))
}

impl<'t> Reader<'t> {
    fn line(&self) -> Option<Line> {
        self.lines.get(self.next).copied()
    }

    /// The rest of the current line from `at`.
    fn rest(&self, line: Line) -> &'t str {
        &self.text[line.at..line.end]
    }

    /// 1-based column of byte offset `pos` on `line`.
    fn column(&self, line: Line, pos: usize) -> usize {
        if line.ascii {
            return pos - line.start + 1;
        }
        // Columns are asked for left to right: count from the last one.
        let (start, from, column) = match self.cursor.get() {
            (start, from, column) if start == line.start && from <= pos => (start, from, column),
            _ => (line.start, line.start, 1),
        };
        let column = column + self.text[from..pos].chars().count();
        self.cursor.set((start, pos, column));
        column
    }

    /// Counts `nodes` more nodes; `None` past [`MAX_NODES`].
    fn count(&self, nodes: usize) -> Option<()> {
        let total = self.nodes.get() + nodes;
        self.nodes.set(total);
        (total <= MAX_NODES).then_some(())
    }

    fn span(&self, line: Line, from: usize, to: usize) -> Span {
        let column = self.column(line, from);
        let end_column = if line.ascii {
            column + (to - from)
        } else {
            column + self.text[from..to].chars().count()
        };
        Span {
            line: line.number,
            column,
            end_line: line.number,
            end_column,
        }
    }

    fn point(&self, line: Line, pos: usize) -> Span {
        self.span(line, pos, pos)
    }

    /// A block node whose first line is the current one, indented `indent` columns.
    fn block(&mut self, indent: usize) -> Option<Node<'t>> {
        self.depth += 1;
        if self.depth >= MAX_DEPTH {
            return None;
        }
        let line = self.line()?;
        if line.indent != indent {
            return None;
        }
        let node = if is_item(self.rest(line)) {
            self.sequence(indent, false)
        } else {
            self.mapping(indent)
        };
        self.depth -= 1;
        node
    }

    /// A block sequence of items `- …` at `indent`; `indentless` when it is the value of a key
    /// written at the same indentation.
    fn sequence(&mut self, indent: usize, indentless: bool) -> Option<Node<'t>> {
        let mut items = Vec::new();
        let mut span = None;
        while let Some(line) = self.line() {
            if line.indent < indent {
                break;
            }
            let rest = self.rest(line);
            if indentless && line.indent == indent && !is_item(rest) {
                break;
            }
            if line.indent > indent || !is_item(rest) {
                return None;
            }
            let after_dash = line.at + 1;
            let content = after_dash + (rest[1..].len() - rest[1..].trim_start_matches(' ').len());
            let content_line = Line {
                at: content,
                indent: self.column(line, content) - 1,
                ..line
            };
            let empty = content == line.end || self.text[content..].starts_with('#');
            if span.is_none() {
                span = Some(if indentless {
                    if empty {
                        return None;
                    }
                    self.point(line, content)
                } else {
                    self.point(line, line.at)
                });
            }
            if items.len() == MAX_ENTRIES {
                return None;
            }
            self.count(1)?;
            if empty {
                self.next += 1;
                match self.line() {
                    Some(next) if next.indent > indent => {
                        let child = next.indent;
                        items.push(self.block(child)?);
                    }
                    _ => items.push(null(self.point(line, line.end))),
                }
                continue;
            }
            let rest = &self.text[content..line.end];
            if is_item(rest)
                || rest.starts_with(['?', ':']) && is_space_or_end(rest.as_bytes().get(1).copied())
            {
                return None;
            }
            if key_end(rest).is_some() {
                // `- key: value`: a mapping whose first entry is on this line.
                self.lines[self.next] = content_line;
                let child = content_line.indent;
                items.push(self.block(child)?);
            } else {
                items.push(self.inline(content_line)?);
                self.next += 1;
                if self.line().is_some_and(|next| next.indent > indent) {
                    return None;
                }
            }
        }
        Some(Node {
            value: Value::Seq(items),
            span: span?,
        })
    }

    /// A block mapping of `key: value` lines at `indent`.
    fn mapping(&mut self, indent: usize) -> Option<Node<'t>> {
        let first = self.line()?;
        let span = self.point(first, first.at);
        let mut entries: Vec<Entry<'t>> = Vec::new();
        while let Some(line) = self.line() {
            if line.indent < indent {
                break;
            }
            if line.indent > indent {
                return None;
            }
            if entries.len() == MAX_ENTRIES {
                return None;
            }
            self.count(2)?;
            let rest = self.rest(line);
            let (key, key_span, plain_key, colon) = self.key(line, rest)?;
            let after = colon + 1;
            let value_text = &self.text[after..line.end];
            let trimmed = value_text.trim_start_matches(' ');
            if trimmed.is_empty() || trimmed.starts_with('#') {
                if !trimmed.is_empty() && !value_text.starts_with(' ') {
                    return None;
                }
                self.next += 1;
                let value = match self.line() {
                    Some(next) if next.indent > indent => self.block(next.indent)?,
                    Some(next) if next.indent == indent && is_item(self.rest(next)) => {
                        self.depth += 1;
                        if self.depth >= MAX_DEPTH {
                            return None;
                        }
                        let node = self.sequence(indent, true)?;
                        self.depth -= 1;
                        node
                    }
                    _ => null(self.point(line, colon)),
                };
                entries.push(Entry {
                    key,
                    key_span,
                    plain_key,
                    value,
                });
                continue;
            }
            if !value_text.starts_with(' ') {
                return None;
            }
            let at = after + (value_text.len() - trimmed.len());
            let value_line = Line {
                at,
                indent: self.column(line, at) - 1,
                ..line
            };
            let value = self.inline(value_line)?;
            entries.push(Entry {
                key,
                key_span,
                plain_key,
                value,
            });
            self.next += 1;
            if self.line().is_some_and(|next| next.indent > indent) {
                return None;
            }
        }
        if has_duplicates_or_merges(&entries) {
            return None;
        }
        Some(Node {
            value: Value::Map(entries),
            span,
        })
    }

    /// The key at the start of `rest`: its text, span, plainness and the offset of its `:`.
    fn key(&self, line: Line, rest: &'t str) -> Option<(Cow<'t, str>, Span, bool, usize)> {
        let first = *rest.as_bytes().first()?;
        if first == b'"' || first == b'\'' {
            let (text, len) = quoted(rest)?;
            if key_end(rest)? != len {
                return None;
            }
            let end = line.at + len;
            return Some((text, self.span(line, line.at, end), false, end));
        }
        if is_indicator(first) {
            return None;
        }
        let colon = key_end(rest)?;
        let text = &rest[..colon];
        if text.ends_with(' ') || text.contains(" #") {
            return None;
        }
        Some((
            Cow::Borrowed(text),
            self.span(line, line.at, line.at + colon),
            true,
            line.at + colon,
        ))
    }

    /// A scalar or flow collection written on the rest of `line`, followed by nothing but a
    /// comment.
    fn inline(&mut self, line: Line) -> Option<Node<'t>> {
        let rest = self.rest(line);
        let first = *rest.as_bytes().first()?;
        let (node, len) = match first {
            b'"' | b'\'' => {
                let (text, len) = quoted(rest)?;
                // Like the full parser, the span runs over the spaces and the comment after a
                // quoted scalar, to the end of the line.
                let tail = rest[len..].trim_start_matches(' ');
                let end = if tail.is_empty() || tail.starts_with('#') {
                    line.end
                } else {
                    line.at + len
                };
                let node = Node {
                    value: Value::Scalar(Scalar { text, plain: false }),
                    span: self.span(line, line.at, end),
                };
                (node, len)
            }
            b'[' | b'{' => {
                let mut flow = Flow {
                    reader: self,
                    line,
                    pos: line.at,
                    depth: 0,
                };
                let node = flow.node()?;
                (node, flow.pos - line.at)
            }
            _ if !plain_may_start(rest.as_bytes(), false) => return None,
            _ => {
                let len = plain_end(rest)?;
                let node = Node {
                    value: Value::Scalar(Scalar {
                        text: Cow::Borrowed(&rest[..len]),
                        plain: true,
                    }),
                    span: self.span(line, line.at, line.at + len),
                };
                (node, len)
            }
        };
        let tail = &rest[len..];
        let tail_trimmed = tail.trim_start_matches(' ');
        if !(tail_trimmed.is_empty() || tail_trimmed.starts_with('#') && tail.starts_with(' ')) {
            return None;
        }
        Some(node)
    }
}

/// A flow collection on one line.
struct Flow<'r, 't> {
    reader: &'r Reader<'t>,
    line: Line,
    pos: usize,
    depth: usize,
}

impl<'t> Flow<'_, 't> {
    fn peek(&self) -> Option<u8> {
        if self.pos < self.line.end {
            self.reader.text.as_bytes().get(self.pos).copied()
        } else {
            None
        }
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.pos += 1;
        }
    }

    fn node(&mut self) -> Option<Node<'t>> {
        self.depth += 1;
        if self.reader.depth + self.depth >= MAX_DEPTH {
            return None;
        }
        let node = match self.peek()? {
            b'[' => {
                let span = self.reader.span(self.line, self.pos, self.pos + 1);
                self.pos += 1;
                let mut items = Vec::new();
                self.skip_spaces();
                if self.peek() == Some(b']') {
                    self.pos += 1;
                } else {
                    loop {
                        if items.len() == MAX_ENTRIES {
                            return None;
                        }
                        self.reader.count(1)?;
                        self.skip_spaces();
                        items.push(self.node()?);
                        self.skip_spaces();
                        match self.peek()? {
                            b',' => self.pos += 1,
                            b']' => {
                                self.pos += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
                Node {
                    value: Value::Seq(items),
                    span,
                }
            }
            b'{' => {
                let span = self.reader.span(self.line, self.pos, self.pos + 1);
                self.pos += 1;
                let mut entries = Vec::new();
                self.skip_spaces();
                if self.peek() == Some(b'}') {
                    self.pos += 1;
                } else {
                    loop {
                        if entries.len() == MAX_ENTRIES {
                            return None;
                        }
                        self.reader.count(2)?;
                        self.skip_spaces();
                        let key = self.scalar()?;
                        let Value::Scalar(Scalar {
                            text: key_text,
                            plain,
                        }) = key.value
                        else {
                            return None;
                        };
                        if self.peek() != Some(b':') {
                            return None;
                        }
                        self.pos += 1;
                        if self.peek() != Some(b' ') {
                            return None;
                        }
                        self.skip_spaces();
                        let value = self.node()?;
                        entries.push(Entry {
                            key: key_text,
                            key_span: key.span,
                            plain_key: plain,
                            value,
                        });
                        self.skip_spaces();
                        match self.peek()? {
                            b',' => self.pos += 1,
                            b'}' => {
                                self.pos += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
                if has_duplicates_or_merges(&entries) {
                    return None;
                }
                Node {
                    value: Value::Map(entries),
                    span,
                }
            }
            _ => self.scalar()?,
        };
        self.depth -= 1;
        Some(node)
    }

    /// A quoted scalar, or a plain one ending before `,`, `]`, `}`, `: ` or ` #`.
    fn scalar(&mut self) -> Option<Node<'t>> {
        let text = self.reader.text;
        let rest = &text[self.pos..self.line.end];
        let first = *rest.as_bytes().first()?;
        let (value, len) = if first == b'"' || first == b'\'' {
            let (value, len) = quoted(rest)?;
            // The full parser's span runs over the spaces after a quoted scalar.
            let spaces = rest[len..].len() - rest[len..].trim_start_matches(' ').len();
            let span = self
                .reader
                .span(self.line, self.pos, self.pos + len + spaces);
            self.pos += len;
            return Some(Node {
                value: Value::Scalar(Scalar {
                    text: value,
                    plain: false,
                }),
                span,
            });
        } else {
            if !plain_may_start(rest.as_bytes(), true) {
                return None;
            }
            let bytes = rest.as_bytes();
            let mut end = 0;
            while end < bytes.len() {
                match bytes[end] {
                    b',' | b'[' | b']' | b'{' | b'}' => break,
                    b':' if matches!(
                        bytes.get(end + 1),
                        None | Some(b' ' | b',' | b'[' | b']' | b'{' | b'}')
                    ) =>
                    {
                        break;
                    }
                    b'#' if end > 0 && bytes[end - 1] == b' ' => return None,
                    _ => end += 1,
                }
            }
            let len = rest[..end].trim_end_matches(' ').len();
            if len == 0 {
                return None;
            }
            (
                Scalar {
                    text: Cow::Borrowed(&rest[..len]),
                    plain: true,
                },
                len,
            )
        };
        let span = self.reader.span(self.line, self.pos, self.pos + len);
        self.pos += len;
        Some(Node {
            value: Value::Scalar(value),
            span,
        })
    }
}

fn null(span: Span) -> Node<'static> {
    Node {
        value: Value::Scalar(Scalar {
            text: Cow::Borrowed(""),
            plain: true,
        }),
        span,
    }
}

/// `- item` or a lone `-`.
fn is_item(rest: &str) -> bool {
    rest.starts_with('-') && is_space_or_end(rest.as_bytes().get(1).copied())
}

/// Characters that cannot start a plain scalar (or that this reader leaves to the parser).
fn is_indicator(byte: u8) -> bool {
    matches!(
        byte,
        b'-' | b'?'
            | b':'
            | b','
            | b'['
            | b']'
            | b'{'
            | b'}'
            | b'#'
            | b'&'
            | b'*'
            | b'!'
            | b'|'
            | b'>'
            | b'\''
            | b'"'
            | b'%'
            | b'@'
            | b'`'
    )
}

/// Whether a plain scalar may start at `bytes`: not with an indicator, except `-` followed by
/// a character that continues it (`-1`, `--port`).
fn plain_may_start(bytes: &[u8], flow: bool) -> bool {
    match bytes {
        [] => false,
        [b'-', next, ..] => {
            let ends_flow_item = flow && matches!(next, b',' | b'[' | b']' | b'{' | b'}');
            *next != b' ' && !ends_flow_item
        }
        [first, ..] => !is_indicator(*first),
    }
}

/// The offset of the `:` ending a plain key at the start of `rest` (`key: value` or `key:`),
/// when the line is a key line; `None` when a comment comes first or there is no such `:`.
fn key_end(rest: &str) -> Option<usize> {
    let bytes = rest.as_bytes();
    if bytes.first().is_some_and(|b| *b == b'"' || *b == b'\'') {
        let (_, len) = quoted(rest)?;
        return (bytes.get(len) == Some(&b':') && is_space_or_end(bytes.get(len + 1).copied()))
            .then_some(len);
    }
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b':' if is_space_or_end(bytes.get(i + 1).copied()) => return Some(i),
            b'#' if i > 0 && bytes[i - 1] == b' ' => return None,
            _ => i += 1,
        }
    }
    None
}

/// The length of a plain scalar at the start of `rest` (block context), up to a comment or the
/// end of the line; `None` for text the full parser must judge (`: ` inside).
fn plain_end(rest: &str) -> Option<usize> {
    let bytes = rest.as_bytes();
    let mut end = bytes.len();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b':' if is_space_or_end(bytes.get(i + 1).copied()) => return None,
            b'#' if i > 0 && bytes[i - 1] == b' ' => {
                end = i;
                break;
            }
            _ => i += 1,
        }
    }
    let len = rest[..end].trim_end_matches(' ').len();
    (len > 0).then_some(len)
}

/// A quoted scalar at the start of `rest`: its text and its length with the quotes. Double
/// quotes with a backslash are left to the full parser.
fn quoted(rest: &str) -> Option<(Cow<'_, str>, usize)> {
    let quote = *rest.as_bytes().first()?;
    let body = &rest[1..];
    if quote == b'"' {
        let close = body.find(['"', '\\'])?;
        if body.as_bytes()[close] == b'\\' {
            return None;
        }
        return Some((Cow::Borrowed(&body[..close]), close + 2));
    }
    let mut text: Option<String> = None;
    let mut from = 0;
    loop {
        let close = from + body[from..].find('\'')?;
        if body.as_bytes().get(close + 1) == Some(&b'\'') {
            let owned = text.get_or_insert_with(String::new);
            owned.push_str(&body[from..=close]);
            from = close + 2;
            continue;
        }
        return Some(match text {
            Some(mut owned) => {
                owned.push_str(&body[from..close]);
                (Cow::Owned(owned), close + 2)
            }
            None => (Cow::Borrowed(&body[..close]), close + 2),
        });
    }
}

/// A key written twice and merge keys are left to the full parser, which reports and applies
/// them.
fn has_duplicates_or_merges(entries: &[Entry<'_>]) -> bool {
    if entries.iter().any(|e| e.plain_key && e.key == "<<") {
        return true;
    }
    if entries.len() <= 16 {
        return (1..entries.len()).any(|i| (0..i).any(|j| entries[j].key == entries[i].key));
    }
    let mut seen: HashMap<&str, ()> = HashMap::with_capacity(entries.len());
    entries.iter().any(|e| seen.insert(&e.key, ()).is_some())
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;
    use std::path::Path;

    use super::*;
    use crate::yaml::parse_full;

    /// Where the fast reader gives a tree, the full parser gives the same, spans included.
    fn same_as_full(text: &str) -> bool {
        let Some(fast) = parse(text) else {
            return false;
        };
        let (full, problems) = parse_full(text);
        assert!(
            problems.is_empty(),
            "{text:?}: the full parser found {problems:?}"
        );
        assert_eq!(full, Ok(Some(fast)), "{text:?}");
        true
    }

    #[test]
    fn edge_cases() {
        let read = [
            "a: 1\n",
            "name: x  # c\nempty:\nq: \"a b\"  \ns: 'it''s'\n",
            "a:\n  - \n  -  # x\n  -\nd:\n- x\n- y\ne: z\n",
            "s:\n  - k: v\n    k2: v2\n  -\n    n: 1\n",
            "f: [a, \"b\", {c: d}, [], {}]   # t\nk: [http://a.b:8/c, -1, --x]\n",
            "h: x:y\ni: -1\nj: x # y\nm: a#b\n\"q k\": v\n'p': w\n",
            "é: ü\nname: héllo wörld # ç\nl: [é, ü]\n",
            "a:\n    b:\n        c: 1\n    d: [1]\n",
            "x-a: 1\n<<a: 2\n",
            // Columns of non-ASCII lines, counted on from the last one asked for.
            "f: {é: ü, ä: [ö, ß], x: 'ç', y: \"é\", z: {ü: ö}}\n",
            "s:\n- é: ü\n  ö: [ä, {ß: é}]\n- ü  # ö\n-   'ä' # é\n",
        ];
        for text in read {
            assert!(same_as_full(text), "not read by the fast reader: {text:?}");
        }
        let left_to_the_parser = [
            "a: &x 1\nb: *x\n",
            "a: !!str 1\n",
            "a: |\n  text\n",
            "a: b\n  c\n",
            "a: \"x\\ny\"\n",
            "a:\tb\n",
            "a: 1\r\n",
            "---\na: 1\n",
            "a: 1\na: 2\n",
            "a: [1,\n  2]\n",
            "- a\n",
            "a: b: c\n",
            "<<: {a: 1}\n",
            "? a\n: b\n",
            "a: 'open\n",
            "",
            "# only a comment\n",
            "  a: 1\n",
            "a: [1, ]\n",
            "a: {b}\n",
            "a: `x`\n",
            "a:\n- \n",
        ];
        for text in left_to_the_parser {
            assert!(parse(text).is_none(), "read by the fast reader: {text:?}");
        }
    }

    #[test]
    fn corpus_files() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/config");
        let mut read = 0;
        for kind in ["valid", "broken"] {
            for entry in std::fs::read_dir(root.join(kind)).unwrap() {
                let path = entry.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap();
                if same_as_full(&text) {
                    read += 1;
                }
            }
        }
        assert!(read >= 40, "the fast reader read only {read} corpus files");
    }

    /// Random block documents in many styles.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
            words[self.below(words.len())]
        }

        fn scalar(&mut self) -> String {
            const WORDS: &[&str] = &[
                "x",
                "a b",
                "-1",
                "--port",
                "8080",
                "http://h:8/p",
                "a:b",
                "a#b",
                "é",
                "ü ö",
                "'q'",
                "\"d\"",
                "'it''s'",
                "\"\"",
                "''",
                "true",
                "~",
                "x-y",
                "a/b",
                "{a: b}",
                "[1, 2]",
                "[]",
                "{}",
                "[a, {b: c}]",
                "x  # c",
                "'q'  # c",
                "[\"a\"  , 'b' ]",
                "{'k': [x, -2]}",
                "[http://a:1/b, c]",
            ];
            const HOSTILE: &[&str] = &[
                "@x",
                "-",
                "?x",
                ":x",
                "a: b",
                "x:",
                "[a, ]",
                "'open",
                "%x",
                "!t x",
                "&a x",
                "*a",
                "|",
                ">",
                "\"a\\nb\"",
            ];
            if self.below(10) == 0 {
                self.pick(HOSTILE).to_owned()
            } else {
                self.pick(WORDS).to_owned()
            }
        }

        fn key(&mut self, used: &mut Vec<&'static str>) -> String {
            const KEYS: &[&str] = &[
                "a", "b", "name", "my key", "x-y", "k_2", "é", "\"q k\"", "'s k'", "a:b", "1", "c",
                "d", "e",
            ];
            if self.below(40) == 0 {
                return ["-k", "<<", "a"][self.below(3)].to_owned();
            }
            let key = self.pick(KEYS);
            if used.contains(&key) {
                return format!("{key}{}", used.len());
            }
            used.push(key);
            key.to_owned()
        }

        fn comment(&mut self) -> &'static str {
            ["", "", "", "  # c", " #", "   "][self.below(6)]
        }

        fn map(&mut self, indent: usize, depth: usize, out: &mut String) {
            let step = [2, 4][self.below(2)];
            let mut used = Vec::new();
            for _ in 0..1 + self.below(4) {
                if self.below(8) == 0 {
                    let _ = writeln!(out, "{}# note", " ".repeat(self.below(indent + 2)));
                }
                let key = self.key(&mut used);
                let _ = write!(out, "{}{key}:", " ".repeat(indent));
                self.value(indent, step, depth, out);
            }
        }

        fn value(&mut self, indent: usize, step: usize, depth: usize, out: &mut String) {
            match if depth == 0 { 0 } else { self.below(5) } {
                0 | 1 => {
                    let scalar = self.scalar();
                    let comment = self.comment();
                    let _ = writeln!(out, " {scalar}{comment}");
                }
                2 => {
                    let comment = self.comment();
                    let _ = writeln!(out, "{comment}");
                    if self.below(6) > 0 {
                        self.map(indent + step, depth - 1, out);
                    }
                }
                _ => {
                    let comment = self.comment();
                    let _ = writeln!(out, "{comment}");
                    let item_indent = if self.below(3) == 0 {
                        indent
                    } else {
                        indent + step
                    };
                    self.sequence(item_indent, depth - 1, out);
                }
            }
        }

        fn sequence(&mut self, indent: usize, depth: usize, out: &mut String) {
            for _ in 0..1 + self.below(3) {
                let pad = " ".repeat(indent);
                match self.below(4) {
                    0 => {
                        let _ = writeln!(out, "{pad}-{}", self.comment());
                        if self.below(2) == 0 && depth > 0 {
                            self.map(indent + 2, depth - 1, out);
                        }
                    }
                    1 if depth > 0 => {
                        // `- key: value` and more keys under it.
                        let mut inner = String::new();
                        self.map(indent + 2, depth - 1, &mut inner);
                        let trimmed = inner.trim_start_matches(' ');
                        let _ = write!(out, "{pad}- {trimmed}");
                    }
                    _ => {
                        let scalar = self.scalar();
                        let _ = writeln!(out, "{pad}- {scalar}{}", self.comment());
                    }
                }
            }
        }
    }

    /// Token soups: mostly not YAML, sometimes YAML of odd shapes; wherever the fast reader
    /// reads one, the full parser must agree.
    #[test]
    fn token_soups() {
        const TOKENS: &[&str] = &[
            "a", "b", "k", ":", ": ", " ", "  ", "\n", "\n  ", "\n    ", "- ", "-", "[", "]", "{",
            "}", ", ", ",", "'", "\"", "#", " #", "x y", "é", "1", "-1", "http://h", "?", "*", "&",
            "!", "|", ">", "@", "%", "`", "''", "\\", ":x", "a:b", "---", "...",
        ];
        let mut read = 0;
        for seed in 0..20_000 {
            let mut generator = Gen(seed);
            let mut text = String::from("k: ");
            for _ in 0..generator.below(24) {
                text.push_str(generator.pick(TOKENS));
            }
            text.push('\n');
            if same_as_full(&text) {
                read += 1;
            }
        }
        assert!(read > 100, "the fast reader read only {read} soups");
    }

    #[test]
    fn generated_documents() {
        let mut read = 0;
        let cases = 20_000;
        for seed in 0..cases {
            let mut generator = Gen(seed);
            let mut text = String::new();
            generator.map(0, 3, &mut text);
            if same_as_full(&text) {
                read += 1;
            }
        }
        assert!(
            read > cases / 3,
            "the fast reader read only {read} of {cases}"
        );
    }
}
