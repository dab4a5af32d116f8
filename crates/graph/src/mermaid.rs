//! Mermaid `stateDiagram-v2` diagrams of a graph ([`graph`]) and of a run over it ([`run`]),
//! in the layout of pydantic_graph's `mermaid_code`.

use std::collections::HashSet;
use std::fmt::Write as _;

use crate::node::{EdgeTarget, Graph, GraphSpec};
use crate::snapshot::{Kind, Snapshot, Status};

/// What to draw.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// A title above the diagram.
    pub title: Option<&'a str>,
    /// The nodes drawn as entered from the start; by default the nodes no edge leads to (or
    /// the first node).
    pub start: &'a [&'a str],
    /// Nodes to highlight (class `highlighted`).
    pub highlight: &'a [&'a str],
    /// Whether to label edges.
    pub edge_labels: bool,
    /// Whether to add each node's doc comment as a note.
    pub notes: bool,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            title: None,
            start: &[],
            highlight: &[],
            edge_labels: true,
            notes: true,
        }
    }
}

/// The fill of highlighted nodes (pydantic_graph's default).
pub const HIGHLIGHT_CSS: &str = "fill:#fdff32";
/// The fill of nodes a run went through.
pub const VISITED_CSS: &str = "fill:#c8e6c9";
/// The fill of the node a run is at.
pub const CURRENT_CSS: &str = "fill:#fdff32";
/// The fill of a node that failed.
pub const FAILED_CSS: &str = "fill:#ffcdd2";

/// The diagram of graph `G`.
pub fn graph<G: Graph>(options: &Options<'_>) -> String {
    let spec = G::spec();
    let mut out = render(&spec, options);
    if !options.highlight.is_empty() {
        classes(&mut out, "highlighted", HIGHLIGHT_CSS, options.highlight);
    }
    out
}

/// The diagram of graph `G` with a run's history drawn over it: nodes it went through
/// (`visited`), the one it is at (`current`: next to run, running or waiting for an answer) and
/// the ones whose last try failed (`failed`).
pub fn run<G: Graph>(history: &[Snapshot]) -> String {
    let spec = G::spec();
    let start: Vec<&str> = history
        .first()
        .filter(|s| s.kind == Kind::Node)
        .map(|s| s.node_id.as_ref())
        .into_iter()
        .collect();
    let mut out = render(
        &spec,
        &Options {
            start: &start,
            ..Options::default()
        },
    );
    let mut current: Vec<&str> = Vec::new();
    let mut failed: Vec<&str> = Vec::new();
    if let Some(last) = history.last()
        && last.kind == Kind::Node
    {
        match last.status {
            Status::Error => failed.push(&last.node_id),
            Status::Success | Status::Skipped => {}
            _ => current.push(&last.node_id),
        }
    }
    let mut visited: Vec<&str> = Vec::new();
    for s in history {
        let id = s.node_id.as_ref();
        if s.kind == Kind::Node
            && s.status == Status::Success
            && !visited.contains(&id)
            && !current.contains(&id)
            && !failed.contains(&id)
        {
            visited.push(id);
        }
    }
    classes(&mut out, "visited", VISITED_CSS, &visited);
    classes(&mut out, "current", CURRENT_CSS, &current);
    classes(&mut out, "failed", FAILED_CSS, &failed);
    out
}

fn render(spec: &GraphSpec, options: &Options<'_>) -> String {
    let mut out = String::new();
    if let Some(title) = options.title {
        let _ = writeln!(out, "---\ntitle: {title}\n---");
    }
    out.push_str("stateDiagram-v2\n");
    let start: Vec<&str> = if options.start.is_empty() {
        default_start(spec)
    } else {
        options.start.to_vec()
    };
    for node in &spec.nodes {
        if start.contains(&node.id) {
            let _ = writeln!(out, "  [*] --> {}", node.id);
        }
        for edge in &node.edges {
            let to = match edge.to {
                EdgeTarget::Node(id) => id,
                EdgeTarget::End => "[*]",
            };
            let _ = write!(out, "  {} --> {to}", node.id);
            match edge.label {
                Some(label) if options.edge_labels => {
                    let _ = writeln!(out, ": {label}");
                }
                _ => out.push('\n'),
            }
        }
        let doc: Vec<&str> = node
            .doc
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if options.notes && !doc.is_empty() {
            let _ = writeln!(out, "  note right of {}", node.id);
            for line in doc {
                let _ = writeln!(out, "    {line}");
            }
            out.push_str("  end note\n");
        }
    }
    out
}

fn default_start(spec: &GraphSpec) -> Vec<&'static str> {
    let targets: HashSet<&str> = spec
        .nodes
        .iter()
        .flat_map(|n| &n.edges)
        .filter_map(|e| match e.to {
            EdgeTarget::Node(id) => Some(id),
            EdgeTarget::End => None,
        })
        .collect();
    let roots: Vec<&'static str> = spec
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|id| !targets.contains(id))
        .collect();
    if roots.is_empty() {
        spec.nodes.first().map(|n| n.id).into_iter().collect()
    } else {
        roots
    }
}

fn classes(out: &mut String, class: &str, css: &str, ids: &[&str]) {
    if ids.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nclassDef {class} {css}");
    for id in ids {
        let _ = writeln!(out, "class {id} {class}");
    }
}
