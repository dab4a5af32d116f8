// The graphs of graph services (`deployd_graph`), drawn as diagrams with Mermaid.
//
// Mermaid 11.17.2: mermaid.min.js is dist/mermaid.min.js of npm's mermaid@11.17.2 (one IIFE
// file that defines the global `mermaid`), mermaid.LICENSE.txt its license (MIT). It is loaded
// here only when a graph is to be drawn, once. It runs under the page's CSP (it needs no eval;
// the <style> it puts in each SVG needs style-src 'unsafe-inline', which the page allows).

import { clear, h, replace } from './ui.js';

export const MERMAID_VERSION = '11.17.2';
const MERMAID_SRC = '/console/mermaid.min.js';

let loading = null; // the promise of the initialized `mermaid`
let renders = 0;

// Loads mermaid.min.js (a <script> added once) and initializes it; a failed load is tried again
// at the next graph.
export function loadMermaid() {
  if (loading) return loading;
  loading = new Promise((resolve, reject) => {
    if (window.mermaid) {
      resolve(window.mermaid);
      return;
    }
    const script = document.createElement('script');
    script.src = MERMAID_SRC;
    script.async = true;
    script.dataset.testid = 'mermaid-script';
    script.addEventListener('load', () => {
      if (window.mermaid && typeof window.mermaid.render === 'function') resolve(window.mermaid);
      else reject(new Error(`${MERMAID_SRC} loaded but defined no \`mermaid\``));
    });
    script.addEventListener('error', () => {
      script.remove();
      reject(new Error(`cannot load ${MERMAID_SRC}`));
    });
    document.head.appendChild(script);
  }).then((mermaid) => {
    mermaid.initialize({
      startOnLoad: false,
      securityLevel: 'strict',
      theme: 'neutral',
      // A text Mermaid cannot parse throws; no error diagram is drawn in the page.
      suppressErrorRendering: true,
    });
    return mermaid;
  });
  loading.catch(() => {
    loading = null;
  });
  return loading;
}

// What the classes of a run mean (`crates/graph/src/mermaid.rs`).
const CLASS_LABELS = {
  visited: 'went through',
  current: 'is at (next, running or waiting for an answer)',
  failed: 'failed',
  highlighted: 'highlighted',
};

// The `classDef NAME fill:…` lines of a diagram: [{name, fill}].
export function diagramClasses(text) {
  const found = [];
  for (const match of String(text).matchAll(/^\s*classDef\s+([\w-]+)\s+(.*)$/gm)) {
    const fill = /(?:^|[;,\s])fill:\s*(#[0-9a-fA-F]{3,8}|[a-zA-Z]+)\b/.exec(match[2]);
    found.push({ name: match[1], fill: fill ? fill[1] : '' });
  }
  return found;
}

function legend(text) {
  const classes = diagramClasses(text);
  if (!classes.length) return null;
  return h(
    'div',
    { class: 'graph-legend small', testid: 'graph-legend' },
    classes.map(({ name, fill }) => {
      const swatch = h('span', { class: 'graph-swatch' });
      // Set through the CSSOM: no inline style attribute.
      if (fill) swatch.style.backgroundColor = fill;
      return h('span', { class: 'graph-legend-item', dataset: { class: name } }, swatch, CLASS_LABELS[name] || name);
    }),
  );
}

function source(text, open) {
  return h(
    'details',
    { class: 'graph-source', testid: 'graph-source', open },
    h('summary', {}, 'Mermaid source'),
    h('pre', { class: 'mermaid-text', testid: 'graph' }, text),
  );
}

// What each slot shows: {draw (the latest call's number), text, failure ('load' or 'render')}.
const slots = new WeakMap();

// Draws the Mermaid `text` into `slot`: the SVG (in `[data-testid=graph-svg]`), a legend of the
// run's classes, and the text under "Mermaid source". When Mermaid cannot be loaded or cannot
// draw it: the error and the text. The slot's `data-state` says `drawing`, `drawn` or `failed`.
// Drawing the same text again changes nothing (unless Mermaid could not be loaded the last
// time); of overlapping calls, the last one wins.
export async function drawGraph(slot, text) {
  const last = slots.get(slot);
  if (last && last.text === text && last.failure !== 'load') return;
  const draw = ++renders;
  slots.set(slot, { draw, text, failure: null });
  if (!slot.firstChild) {
    replace(slot, h('div', { class: 'muted', testid: 'graph-drawing' }, 'drawing the graph…'));
  }
  if (!slot.dataset.state) slot.dataset.state = 'drawing';
  const id = `deployd-graph-${draw}`;
  let svg;
  let error = null;
  let failure = 'load';
  try {
    const mermaid = await loadMermaid();
    failure = 'render';
    ({ svg } = await mermaid.render(id, text));
  } catch (err) {
    error = err;
    // What Mermaid may leave in the page after a failure.
    document.getElementById(id)?.remove();
    document.getElementById(`d${id}`)?.remove();
  }
  const now = slots.get(slot);
  if (!now || now.draw !== draw) return;
  if (error) {
    now.failure = failure;
    const message = error && error.message ? error.message : String(error);
    replace(
      slot,
      h('div', { class: 'error', role: 'alert', testid: 'graph-render-error' }, `The graph could not be drawn: ${message}`),
      source(text, true),
    );
    slot.dataset.state = 'failed';
    return;
  }
  const figure = h('div', { class: 'graph-svg', testid: 'graph-svg' });
  // Mermaid's SVG, sanitized by Mermaid (securityLevel 'strict'); a script in it would not run.
  const template = document.createElement('template');
  template.innerHTML = svg;
  figure.appendChild(template.content);
  replace(slot, figure, legend(text), source(text, false));
  slot.dataset.state = 'drawn';
}

// Forgets what `slot` showed, and empties it.
export function clearGraph(slot) {
  slots.delete(slot);
  delete slot.dataset.state;
  clear(slot);
}
