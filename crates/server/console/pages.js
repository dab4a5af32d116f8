// The console's pages but the task's (task.js): deployments, a deployment, logs, tasks,
// sessions, revisions. Each page is `(root, ctx)`; `ctx.signal` aborts when it is left.

import { ApiError, getJSON, getText, path, postEmpty, postJSON, query, streamLines } from './api.js';
import { drawGraph } from './graph.js';
import {
  ago,
  badge,
  clear,
  errorBox,
  formatTime,
  h,
  isAbort,
  isBusy,
  json,
  link,
  longText,
  notice,
  poll,
  replace,
  routeOf,
  servicesTable,
  short,
  showError,
} from './ui.js';

const PAGE_SIZE = 50;
// Deployments shown at once: each card reads its deployment's state (one request each), so a
// page of them loads in a few rounds of a browser's six connections.
const DEPLOYMENTS_PAGE = 20;
const BUSY_POLL_MS = 1000;
const IDLE_POLL_MS = 5000;
// The list polls each shown deployment this often while nothing moves (20 of them: 2 requests
// a second).
const LIST_IDLE_POLL_MS = 10000;

// A list read newest first a page at a time (`tasks/search`, `sessions/search`): the first page
// into `body`, and "Older" (`older`) appends the page after `next`. Loads the first page and
// returns the loader (`load()` reloads from the newest).
function pageNewestFirst({ url, items, row, body, empty, count, older, refresh, error, signal }) {
  let next = null;
  let shown = 0;
  async function load(before) {
    older.disabled = true;
    refresh.disabled = true;
    try {
      const page = await getJSON(url(before), { signal });
      showError(error, null);
      if (!before) {
        clear(body);
        shown = 0;
      }
      const got = items(page) || [];
      for (const item of got) body.appendChild(row(item));
      shown += got.length;
      next = page.next || null;
      older.hidden = !next;
      empty.hidden = shown > 0;
      count.textContent = `${shown} shown${next ? ', more older' : ''}`;
    } catch (err) {
      if (!isAbort(err)) showError(error, err);
    } finally {
      older.disabled = false;
      refresh.disabled = false;
    }
  }
  older.addEventListener('click', () => next && load(next));
  refresh.addEventListener('click', () => load());
  load();
  return load;
}

function errorSlot(testid = 'error') {
  const slot = h('div', { class: 'error-slot', hidden: true });
  slot.dataset.errorTestid = testid;
  return slot;
}

// ---------------------------------------------------------------------------------------------
// 1. Deployments: names from GET /deployments/, shown 50 to a page (with a filter); only the
// deployments on the page are fetched, at most 6 at a time, every second while one deploys.

export function deploymentsPage(root, ctx) {
  ctx.setTitle('Deployments');
  const q = ctx.query;
  let filterText = q.get('q') || '';
  let page = Math.max(0, Number(q.get('page') || 0) | 0);
  let names = [];
  const cards = new Map(); // name → {el, body, due, inFlight, last}

  const filter = h('input', {
    type: 'search',
    placeholder: 'Filter by name',
    value: filterText,
    testid: 'deployments-filter',
    'aria-label': 'Filter deployments by name',
  });
  const count = h('span', { class: 'muted', testid: 'deployments-count' });
  const prev = h('button', { type: 'button', testid: 'deployments-prev' }, '← Previous');
  const next = h('button', { type: 'button', testid: 'deployments-next' }, 'Next →');
  const pageLabel = h('span', { class: 'muted', testid: 'deployments-page' });
  const listError = errorSlot();
  const list = h('div', { class: 'cards', testid: 'deployments-list' });
  const empty = notice('No deployments yet. Deploy one with `deployd deploy FILE`.', 'deployments-empty');
  empty.hidden = true;

  root.append(
    h('div', { class: 'toolbar' }, filter, count, h('span', { class: 'spacer' }), prev, pageLabel, next),
    listError,
    empty,
    list,
  );

  function filtered() {
    const f = filterText.trim().toLowerCase();
    return f ? names.filter((n) => n.toLowerCase().includes(f)) : names;
  }

  function syncUrl() {
    const params = query({ q: filterText || undefined, page: page || undefined });
    history.replaceState(null, '', `#/deployments${params}`);
  }

  function render() {
    const all = filtered();
    const pages = Math.max(1, Math.ceil(all.length / DEPLOYMENTS_PAGE));
    if (page >= pages) page = pages - 1;
    const visible = all.slice(page * DEPLOYMENTS_PAGE, page * DEPLOYMENTS_PAGE + DEPLOYMENTS_PAGE);
    count.textContent =
      all.length === names.length ? `${names.length} deployments` : `${all.length} of ${names.length} deployments`;
    pageLabel.textContent = `page ${page + 1} of ${pages}`;
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
    empty.hidden = names.length > 0;
    const keep = new Set(visible);
    for (const name of [...cards.keys()]) {
      if (!keep.has(name)) {
        cards.get(name).el.remove();
        cards.delete(name);
      }
    }
    visible.forEach((name, i) => {
      let card = cards.get(name);
      if (!card) card = makeCard(name);
      if (list.children[i] !== card.el) list.insertBefore(card.el, list.children[i] || null);
    });
    pump();
  }

  function makeCard(name) {
    const body = h('div', { class: 'card-body' }, h('span', { class: 'muted' }, 'loading…'));
    const badges = h('span', { class: 'card-badges' });
    const el = h(
      'section',
      { class: 'card', testid: 'deployment-card', dataset: { name } },
      h(
        'header',
        { class: 'card-head' },
        link(routeOf('deployments', name), name, { testid: 'deployment-link', class: 'card-title' }),
        badges,
        h('span', { class: 'spacer' }),
        link(routeOf('deployments', name, 'tasks'), 'tasks'),
        link(routeOf('deployments', name, 'sessions'), 'sessions'),
        link(routeOf('deployments', name, 'revisions'), 'revisions'),
      ),
      body,
    );
    const card = { el, body, badges, due: 0, inFlight: false, last: null };
    cards.set(name, card);
    return card;
  }

  async function refreshCard(name, card) {
    card.inFlight = true;
    try {
      const status = await getJSON(path('deployments', name), { signal: ctx.signal });
      const text = JSON.stringify(status);
      if (text !== card.last) {
        card.last = text;
        replace(
          card.badges,
          status.deploying ? badge('deploying', 'deployment-deploying') : null,
          h('span', { class: 'muted small' }, status.message_queue || ''),
        );
        replace(card.body, servicesTable(status, { links: true }));
      }
      card.el.dataset.busy = String(isBusy(status));
      card.due = Date.now() + (isBusy(status) ? BUSY_POLL_MS : LIST_IDLE_POLL_MS);
    } catch (err) {
      if (isAbort(err)) return;
      card.last = null;
      if (err instanceof ApiError && err.status === 404) {
        replace(card.body, notice('This deployment is gone.'));
        card.due = Number.POSITIVE_INFINITY;
      } else {
        replace(card.body, errorBox(err));
        card.due = Date.now() + IDLE_POLL_MS;
      }
    } finally {
      card.inFlight = false;
    }
  }

  // Fetches the due cards of the page, at most 6 requests at a time.
  function pump() {
    if (ctx.signal.aborted) return;
    const now = Date.now();
    let running = [...cards.values()].filter((c) => c.inFlight).length;
    for (const [name, card] of cards) {
      if (running >= 6) break;
      if (!card.inFlight && card.due <= now) {
        running++;
        refreshCard(name, card).then(pump);
      }
    }
  }
  const ticker = setInterval(pump, 250);
  ctx.signal.addEventListener('abort', () => clearInterval(ticker), { once: true });

  async function loadNames() {
    try {
      const list = await getJSON('/deployments/', { signal: ctx.signal });
      names = list.map((d) => d.name).sort((a, b) => a.localeCompare(b));
      showError(listError, null);
      render();
    } catch (err) {
      if (!isAbort(err)) showError(listError, err);
    }
  }

  filter.addEventListener('input', () => {
    filterText = filter.value;
    page = 0;
    syncUrl();
    render();
  });
  prev.addEventListener('click', () => {
    page = Math.max(0, page - 1);
    syncUrl();
    render();
  });
  next.addEventListener('click', () => {
    page += 1;
    syncUrl();
    render();
  });

  poll(ctx.signal, loadNames, () => 10000);
}

// ---------------------------------------------------------------------------------------------
// 2. A deployment: its services (polled), the graphs of its graph services, the run form, its
// latest revisions.

function deploymentNav(name, current) {
  const item = (key, route, text) =>
    link(route, text, { testid: `nav-${key}`, class: key === current ? 'tab current' : 'tab' });
  return h(
    'nav',
    { class: 'tabs' },
    item('overview', routeOf('deployments', name), 'Overview'),
    item('tasks', routeOf('deployments', name, 'tasks'), 'Tasks'),
    item('sessions', routeOf('deployments', name, 'sessions'), 'Sessions'),
    item('revisions', routeOf('deployments', name, 'revisions'), 'Revisions'),
  );
}

// Polls GET /deployments/{name}: every second while it moves, every 5 s otherwise. Calls
// `onStatus(status)` when it changed, `onError(err)` on failure.
function watchDeployment(ctx, name, onStatus, onError) {
  let last = null;
  poll(
    ctx.signal,
    async () => {
      try {
        const status = await getJSON(path('deployments', name), { signal: ctx.signal });
        const text = JSON.stringify(status);
        onError(null);
        if (text !== last) {
          last = text;
          onStatus(status);
        }
        return isBusy(status);
      } catch (err) {
        if (!isAbort(err)) onError(err);
        return false;
      }
    },
    (busy) => (busy === true ? BUSY_POLL_MS : IDLE_POLL_MS),
  );
  return {
    refresh() {
      last = null;
    },
  };
}

export function deploymentPage(root, ctx) {
  const name = ctx.params[0];
  ctx.setTitle(name, [['Deployments', '/deployments']]);
  const meta = h('div', { class: 'meta', testid: 'deployment-meta' });
  const statusError = errorSlot('deployment-error');
  const services = h('div', { testid: 'deployment-services' }, h('span', { class: 'muted' }, 'loading…'));

  // The run form.
  const serviceSelect = h('select', { testid: 'run-service', id: 'run-service' });
  const sessionInput = h('input', {
    type: 'text',
    id: 'run-session',
    testid: 'run-session',
    placeholder: 'new session',
    class: 'mono',
  });
  const input = h('textarea', {
    id: 'run-input',
    testid: 'run-input',
    rows: 5,
    class: 'mono',
    spellcheck: 'false',
  });
  input.value = '{}';
  const submit = h('button', { type: 'submit', class: 'primary', testid: 'run-submit' }, 'Run task');
  const runError = errorSlot('run-error');
  const form = h(
    'form',
    { class: 'form', testid: 'run-form' },
    h('div', { class: 'row' }, h('label', { for: 'run-service' }, 'Service'), serviceSelect),
    h('div', { class: 'row' }, h('label', { for: 'run-session' }, 'Session (optional)'), sessionInput),
    h('div', { class: 'row' }, h('label', { for: 'run-input' }, 'Input (a JSON object: the workflow’s keyword arguments)'), input),
    h('div', { class: 'row' }, submit),
    runError,
  );
  let formReady = false;

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    showError(runError, null);
    let value;
    try {
      value = input.value.trim() === '' ? {} : JSON.parse(input.value);
    } catch (err) {
      showError(runError, `The input is not JSON: ${err.message}`);
      return;
    }
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      showError(runError, 'The input must be a JSON object (the workflow runs as run(**input)).');
      return;
    }
    submit.disabled = true;
    try {
      const created = await postJSON(
        path('deployments', name, 'tasks', 'create') + query({ session_id: sessionInput.value.trim() }),
        { input: JSON.stringify(value), service_id: serviceSelect.value },
        { signal: ctx.signal },
      );
      if (!created || !created.task_id) throw new Error(`The server answered no task id: ${json(created, 0)}`);
      location.hash = routeOf('deployments', name, 'tasks', created.task_id);
    } catch (err) {
      if (!isAbort(err)) showError(runError, err);
    } finally {
      submit.disabled = false;
    }
  });

  const revisions = h('div', { testid: 'deployment-revisions' });

  // The graph of each graph service: asked of each service when it is first seen ready (one
  // request; a service without a graph answers 404 and shows nothing), in the services' order.
  const graphList = h('div', { class: 'graphs', testid: 'deployment-graphs' });
  const graphsSection = h('section', { hidden: true }, h('h2', {}, 'Graphs'), graphList);
  const graphsAsked = new Set();
  async function loadServiceGraph(service) {
    graphsAsked.add(service);
    const body = h('div', { class: 'graph' });
    const card = h(
      'div',
      { class: 'service-graph', testid: 'service-graph', dataset: { service }, hidden: true },
      h('h3', { class: 'mono' }, service),
      body,
    );
    graphList.appendChild(card);
    let text;
    try {
      text = await getText(path('deployments', name, 'services', service, 'graph'), { signal: ctx.signal });
    } catch (err) {
      card.remove();
      // No graph (404): never asked again on this page; another failure: asked at the next
      // change of the deployment's status.
      if (!(err instanceof ApiError && err.status === 404)) graphsAsked.delete(service);
      return;
    }
    if (ctx.signal.aborted) return;
    card.hidden = false;
    graphsSection.hidden = false;
    await drawGraph(body, text);
  }

  root.append(
    deploymentNav(name, 'overview'),
    statusError,
    meta,
    h('section', {}, h('h2', {}, 'Services'), services),
    h('section', {}, h('h2', {}, 'Run a task'), form),
    graphsSection,
    h(
      'section',
      {},
      h('h2', {}, 'Latest revisions ', link(routeOf('deployments', name, 'revisions'), 'all revisions', { class: 'small' })),
      revisions,
    ),
  );

  const watch = watchDeployment(
    ctx,
    name,
    (status) => {
      replace(
        meta,
        h('span', {}, 'default service ', h('b', { class: 'mono' }, status.default_service)),
        h('span', {}, 'queue ', status.message_queue || '—'),
        status.deploying ? badge('deploying', 'deployment-deploying') : null,
      );
      replace(services, servicesTable(status, { links: true }));
      for (const s of status.services || []) {
        if (s.phase === 'ready' && !graphsAsked.has(s.id)) loadServiceGraph(s.id);
      }
      if (!formReady) {
        formReady = true;
        for (const s of status.services) {
          serviceSelect.appendChild(
            h('option', { value: s.id, selected: s.id === status.default_service }, s.id),
          );
        }
      }
    },
    (err) => showError(statusError, err),
  );

  revisionsView(revisions, ctx, name, { limit: 5, onDeployed: () => watch.refresh() });
}

// ---------------------------------------------------------------------------------------------
// 7. Revisions: GET /deployments/{name}/revisions, newest first; a Rollback per revision.

function revisionsView(container, ctx, name, { limit = 0, onDeployed } = {}) {
  const status = h('div', { class: 'rollback-status', testid: 'rollback-status', hidden: true });
  const rollbackError = errorSlot('rollback-error');
  const listError = errorSlot('revisions-error');
  const table = h('div', {}, h('span', { class: 'muted' }, 'loading…'));
  let busy = false;
  container.append(status, rollbackError, listError, table);

  async function load() {
    try {
      const revisions = await getJSON(path('deployments', name, 'revisions'), { signal: ctx.signal });
      showError(listError, null);
      render(limit ? revisions.slice(0, limit) : revisions, revisions);
    } catch (err) {
      if (isAbort(err)) return;
      showError(listError, err);
      clear(table);
    }
  }

  function render(shown, all) {
    if (!all.length) {
      replace(table, notice('No revisions recorded.', 'revisions-empty'));
      return;
    }
    // The newest revision is the deployment's file now (a failed reload's too, while the old
    // instances serve on): every other one can be rolled back to.
    const latest = all[0];
    const body = h('tbody');
    for (const r of shown) {
      const isLatest = latest && r.revision === latest.revision;
      const actions = h('td', { class: 'actions' });
      const showButton = () => {
        if (isLatest) {
          replace(actions, h('span', { class: 'muted small', testid: 'revision-latest' }, 'latest'));
          return;
        }
        replace(
          actions,
          h(
            'button',
            {
              type: 'button',
              testid: 'rollback-button',
              dataset: { revision: String(r.revision) },
              disabled: busy,
              onclick: () => confirm(),
            },
            'Rollback',
          ),
        );
      };
      const confirm = () => {
        replace(
          actions,
          h('span', { class: 'small' }, `Roll back to revision ${r.revision}? `),
          h(
            'button',
            {
              type: 'button',
              class: 'danger',
              testid: 'rollback-confirm',
              dataset: { revision: String(r.revision) },
              onclick: () => rollback(r.revision),
            },
            'Confirm',
          ),
          ' ',
          h('button', { type: 'button', testid: 'rollback-cancel', onclick: showButton }, 'Cancel'),
        );
      };
      showButton();
      const sources = Object.entries(r.sources || {});
      const fileRow = h(
        'tr',
        { class: 'detail', hidden: true, testid: 'revision-file-row' },
        h('td', { colspan: '8' }),
      );
      const fileToggle = h(
        'button',
        { type: 'button', class: 'small', testid: 'revision-file-toggle', title: 'Show the deployment file of this revision' },
        'file',
      );
      fileToggle.addEventListener('click', async () => {
        if (!fileRow.hidden) {
          fileRow.hidden = true;
          return;
        }
        fileRow.hidden = false;
        const cell = fileRow.firstChild;
        replace(cell, h('span', { class: 'muted' }, 'loading…'));
        try {
          const full = await getJSON(path('deployments', name, 'revisions', String(r.revision)), { signal: ctx.signal });
          replace(cell, h('pre', { class: 'json', testid: 'revision-file' }, full.spec ?? ''));
        } catch (err) {
          if (!isAbort(err)) replace(cell, errorBox(err));
        }
      });
      body.appendChild(
        h(
          'tr',
          {
            testid: 'revision-row',
            dataset: { revision: String(r.revision), outcome: r.outcome, kind: r.kind },
            class: isLatest ? 'current' : '',
          },
          h('td', { class: 'num mono nowrap' }, String(r.revision), ' ', fileToggle),
          h('td', { class: 'nowrap', title: ago(r.created_at) }, formatTime(r.created_at)),
          h(
            'td',
            {},
            r.kind,
            r.rollback_of !== null && r.rollback_of !== undefined ? ` of ${r.rollback_of}` : '',
          ),
          h('td', {}, r.by || h('span', { class: 'muted' }, '—')),
          h('td', {}, badge(r.outcome, 'revision-outcome')),
          h('td', { class: 'small revision-error' }, r.error ? longText(r.error, { testid: 'revision-error', class: 'text-bad' }) : ''),
          h(
            'td',
            { class: 'small' },
            sources.length
              ? h(
                  'ul',
                  { class: 'plain' },
                  sources.map(([svc, src]) =>
                    h(
                      'li',
                      { class: 'mono', title: `${src.digest || ''}${src.commit ? ` @ ${src.commit}` : ''}` },
                      `${svc}: ${(src.digest || '').replace(/^sha256:/, '').slice(0, 12)}`,
                      src.commit ? ` @ ${src.commit.slice(0, 10)}` : '',
                    ),
                  ),
                )
              : '',
          ),
          actions,
        ),
      );
      body.appendChild(fileRow);
    }
    replace(
      table,
      h(
        'table',
        { class: 'grid', testid: 'revisions-table' },
        h(
          'thead',
          {},
          h(
            'tr',
            {},
            ['revision', 'created', 'kind', 'by', 'outcome', 'error', 'sources', ''].map((t) => h('th', {}, t)),
          ),
        ),
        body,
      ),
    );
  }

  async function rollback(revision) {
    busy = true;
    for (const b of container.querySelectorAll('[data-testid="rollback-button"], [data-testid="rollback-confirm"]')) {
      b.disabled = true;
    }
    showError(rollbackError, null);
    status.hidden = false;
    status.dataset.state = 'running';
    status.textContent = `Rolling back to revision ${revision}… (answers once that version serves)`;
    onDeployed?.();
    try {
      await postEmpty(path('deployments', name, 'rollback') + query({ revision }), { signal: ctx.signal });
      status.dataset.state = 'done';
      status.textContent = `Rolled back to revision ${revision}: it serves.`;
    } catch (err) {
      if (isAbort(err)) return;
      status.hidden = true;
      status.dataset.state = 'failed';
      showError(rollbackError, err);
    } finally {
      busy = false;
      onDeployed?.();
      await load();
    }
  }

  load();
  return { load };
}

export function revisionsPage(root, ctx) {
  const name = ctx.params[0];
  ctx.setTitle('Revisions', [
    ['Deployments', '/deployments'],
    [name, routeOf('deployments', name)],
  ]);
  const services = h('div', { testid: 'deployment-services' }, h('span', { class: 'muted' }, 'loading…'));
  const statusError = errorSlot('deployment-error');
  const revisions = h('div', {});
  root.append(
    deploymentNav(name, 'revisions'),
    statusError,
    h('section', {}, h('h2', {}, 'Services'), services),
    h('section', {}, h('h2', {}, 'Revisions'), revisions),
  );
  const watch = watchDeployment(
    ctx,
    name,
    (status) => replace(services, servicesTable(status, { links: true })),
    (err) => showError(statusError, err),
  );
  revisionsView(revisions, ctx, name, { onDeployed: () => watch.refresh() });
}

// ---------------------------------------------------------------------------------------------
// 3. A service's logs: the last lines, then each new one (fetch's streaming reader).

const MAX_LOG_LINES = 10000;

export function logsPage(root, ctx) {
  const [name, service] = ctx.params;
  ctx.setTitle(`Logs of ${service}`, [
    ['Deployments', '/deployments'],
    [name, routeOf('deployments', name)],
  ]);
  const tail = h('input', { type: 'number', min: 0, max: 10000, value: '200', testid: 'logs-tail', id: 'logs-tail' });
  const follow = h('input', { type: 'checkbox', checked: true, testid: 'logs-follow', id: 'logs-follow' });
  const replica = h('select', { testid: 'logs-replica', id: 'logs-replica', hidden: true });
  const replicaLabel = h('label', { for: 'logs-replica', hidden: true }, 'replica');
  const start = h('button', { type: 'button', class: 'primary', testid: 'logs-start' }, 'Start');
  const stop = h('button', { type: 'button', testid: 'logs-stop' }, 'Stop');
  const clearButton = h('button', { type: 'button', testid: 'logs-clear' }, 'Clear');
  const state = h('span', { class: 'stream-state', testid: 'logs-state' });
  const error = errorSlot('logs-error');
  const output = h('pre', { class: 'logs', testid: 'logs-output', tabindex: '0' });
  root.append(
    h(
      'div',
      { class: 'toolbar' },
      h('label', { for: 'logs-tail' }, 'last lines'),
      tail,
      h('label', { class: 'check' }, follow, ' follow'),
      replicaLabel,
      replica,
      start,
      stop,
      clearButton,
      h('span', { class: 'spacer' }),
      state,
    ),
    error,
    output,
  );

  let lines = [];
  let pending = [];
  let frame = 0;
  let controller = null;

  function setState(text, key) {
    state.textContent = text;
    state.dataset.state = key;
    start.disabled = key === 'following' || key === 'connecting';
    stop.disabled = !(key === 'following' || key === 'connecting');
  }

  function flush() {
    frame = 0;
    if (!pending.length) return;
    const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 40;
    lines.push(...pending);
    if (lines.length > MAX_LOG_LINES) {
      lines = lines.slice(lines.length - MAX_LOG_LINES);
      output.textContent = lines.join('\n') + '\n';
    } else {
      output.appendChild(document.createTextNode(pending.join('\n') + '\n'));
    }
    pending = [];
    output.dataset.lines = String(lines.length);
    if (atBottom) output.scrollTop = output.scrollHeight;
  }

  function onLine(line) {
    pending.push(line);
    if (!frame) frame = requestAnimationFrame(flush);
  }

  async function run() {
    controller?.abort();
    const mine = new AbortController();
    controller = mine;
    const abort = () => mine.abort();
    ctx.signal.addEventListener('abort', abort, { once: true });
    lines = [];
    pending = [];
    clear(output);
    output.dataset.lines = '0';
    showError(error, null);
    const following = follow.checked;
    setState('connecting…', 'connecting');
    const params = { tail: tail.value || 0, follow: following ? 'true' : undefined };
    if (!replica.hidden && replica.value) params.replica = replica.value;
    try {
      const streaming = streamLines(path('deployments', name, 'services', service, 'logs') + query(params), onLine, {
        signal: mine.signal,
      });
      if (following) setState('following', 'following');
      await streaming;
      flush();
      if (controller === mine) {
        if (mine.signal.aborted) setState('stopped', 'stopped');
        else setState(following ? 'the stream ended' : 'loaded', 'ended');
      }
    } catch (err) {
      flush();
      if (isAbort(err) || mine.signal.aborted) {
        if (controller === mine) setState('stopped', 'stopped');
      } else {
        showError(error, err);
        setState('failed', 'failed');
      }
    } finally {
      ctx.signal.removeEventListener('abort', abort);
    }
  }

  start.addEventListener('click', run);
  stop.addEventListener('click', () => {
    controller?.abort();
    setState('stopped', 'stopped');
  });
  clearButton.addEventListener('click', () => {
    lines = [];
    clear(output);
    output.dataset.lines = '0';
  });
  ctx.signal.addEventListener('abort', () => controller?.abort(), { once: true });

  // Replicas: a select when the service has more than one.
  getJSON(path('deployments', name), { signal: ctx.signal })
    .then((status) => {
      const svc = status.services.find((s) => s.id === service);
      if (svc && svc.replicas && svc.replicas.length > 1) {
        svc.replicas.forEach((_, i) => replica.appendChild(h('option', { value: String(i) }, `#${i}`)));
        replica.hidden = false;
        replicaLabel.hidden = false;
        replica.addEventListener('change', run);
      }
    })
    .catch((err) => {
      if (!isAbort(err)) showError(error, err);
    });
  run();
}

// ---------------------------------------------------------------------------------------------
// 4. Tasks: GET …/tasks/search, newest first, filtered by status and service, paged by `next`.

export const TASK_STATUSES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];

export function taskRow(name, t) {
  return h(
    'tr',
    { testid: 'task-row', dataset: { taskId: t.task_id, status: t.status, service: t.service } },
    h('td', { class: 'mono' }, link(routeOf('deployments', name, 'tasks', t.task_id), t.task_id, { testid: 'task-link' })),
    h('td', { class: 'mono' }, t.service),
    h('td', {}, badge(t.status, 'task-row-status')),
    h('td', { class: 'num' }, String(t.attempt ?? '')),
    h('td', { class: 'nowrap', title: formatTime(t.created_at) }, ago(t.created_at)),
    h('td', { class: 'nowrap', title: formatTime(t.updated_at) }, ago(t.updated_at)),
    h('td', { class: 'mono small' }, t.session_id ? short(t.session_id, 14) : ''),
    h('td', { class: 'mono small', title: json(t.input, 0) }, short(t.input, 60)),
    h(
      'td',
      { class: 'mono small' },
      t.error
        ? h('span', { class: 'text-bad', title: t.error }, short(t.error, 60))
        : t.result !== null && t.result !== undefined
          ? h('span', { title: json(t.result, 0) }, short(t.result, 60))
          : '',
    ),
  );
}

function taskTable(rows) {
  return h(
    'table',
    { class: 'grid', testid: 'tasks-table' },
    h(
      'thead',
      {},
      h(
        'tr',
        {},
        ['task', 'service', 'status', 'attempt', 'created', 'updated', 'session', 'input', 'result / error'].map((t) =>
          h('th', {}, t),
        ),
      ),
    ),
    rows,
  );
}

export function tasksPage(root, ctx) {
  const name = ctx.params[0];
  ctx.setTitle('Tasks', [
    ['Deployments', '/deployments'],
    [name, routeOf('deployments', name)],
  ]);
  const status = ctx.query.get('status') || '';
  const service = ctx.query.get('service') || '';
  const limit = Math.min(1000, Math.max(1, Number(ctx.query.get('limit')) || PAGE_SIZE));
  const statusSelect = h(
    'select',
    { testid: 'tasks-status', id: 'tasks-status' },
    h('option', { value: '' }, 'any status'),
    TASK_STATUSES.map((s) => h('option', { value: s, selected: s === status }, s)),
  );
  const serviceSelect = h(
    'select',
    { testid: 'tasks-service', id: 'tasks-service' },
    h('option', { value: '' }, 'any service'),
    service ? h('option', { value: service, selected: true }, service) : null,
  );
  const refresh = h('button', { type: 'button', testid: 'tasks-refresh' }, 'Refresh');
  const older = h('button', { type: 'button', testid: 'tasks-older', hidden: true }, 'Older');
  const error = errorSlot('tasks-error');
  const body = h('tbody', { testid: 'tasks-body' });
  const empty = notice('No tasks match.', 'tasks-empty');
  empty.hidden = true;
  const count = h('span', { class: 'muted', testid: 'tasks-count' });
  root.append(
    deploymentNav(name, 'tasks'),
    h(
      'div',
      { class: 'toolbar' },
      h('label', { for: 'tasks-status' }, 'status'),
      statusSelect,
      h('label', { for: 'tasks-service' }, 'service'),
      serviceSelect,
      refresh,
      h('span', { class: 'spacer' }),
      count,
    ),
    error,
    taskTable(body),
    empty,
    h('div', { class: 'toolbar' }, older),
  );

  const applyFilters = () => {
    location.hash =
      routeOf('deployments', name, 'tasks') +
      query({ status: statusSelect.value, service: serviceSelect.value, limit: limit === PAGE_SIZE ? undefined : limit });
  };
  statusSelect.addEventListener('change', applyFilters);
  serviceSelect.addEventListener('change', applyFilters);

  getJSON(path('deployments', name), { signal: ctx.signal })
    .then((st) => {
      for (const s of st.services) {
        if (s.id !== service) serviceSelect.appendChild(h('option', { value: s.id }, s.id));
      }
    })
    .catch((err) => {
      if (!isAbort(err)) showError(error, err);
    });

  pageNewestFirst({
    url: (before) => path('deployments', name, 'tasks', 'search') + query({ status, service, limit, before }),
    items: (page) => page.tasks,
    row: (t) => taskRow(name, t),
    body, empty, count, older, refresh, error, signal: ctx.signal,
  });
}

// ---------------------------------------------------------------------------------------------
// 6. Sessions: GET …/sessions/search, newest first, 50 to a page ("Older" for the next); each
// session's tasks on demand (GET …/tasks/{id}).

export function sessionsPage(root, ctx) {
  const name = ctx.params[0];
  ctx.setTitle('Sessions', [
    ['Deployments', '/deployments'],
    [name, routeOf('deployments', name)],
  ]);
  const error = errorSlot('sessions-error');
  const create = h('button', { type: 'button', testid: 'session-create' }, 'New session');
  const refresh = h('button', { type: 'button', testid: 'sessions-refresh' }, 'Refresh');
  const older = h('button', { type: 'button', testid: 'sessions-older', hidden: true }, 'Older');
  const count = h('span', { class: 'muted', testid: 'sessions-count' });
  const body = h('tbody', { testid: 'sessions-body' });
  const empty = notice('No sessions.', 'sessions-empty');
  empty.hidden = true;
  const limit = Math.min(1000, Math.max(1, Number(ctx.query.get('limit')) || PAGE_SIZE));
  root.append(
    deploymentNav(name, 'sessions'),
    h('div', { class: 'toolbar' }, create, refresh, h('span', { class: 'spacer' }), count),
    error,
    h(
      'table',
      { class: 'grid', testid: 'sessions-table' },
      h('thead', {}, h('tr', {}, ['session', 'tasks', 'state', 'its tasks, newest first'].map((t) => h('th', {}, t)))),
      body,
    ),
    empty,
    h('div', { class: 'toolbar' }, older),
  );

  function sessionRow(s) {
    const tasksCell = h('td', {});
    const ids = s.task_ids || [];
    const toggle = h(
      'button',
      { type: 'button', class: 'small', testid: 'session-tasks-toggle' },
      ids.length === 1 ? '1 task' : `${ids.length} tasks`,
    );
    toggle.disabled = ids.length === 0;
    let open = false;
    toggle.addEventListener('click', () => {
      open = !open;
      if (open) showSessionTasks(tasksCell, s);
      else clear(tasksCell);
    });
    return h(
      'tr',
      { testid: 'session-row', dataset: { sessionId: s.session_id } },
      h('td', { class: 'mono nowrap' }, s.session_id),
      h('td', {}, toggle),
      h('td', { class: 'mono small', title: json(s.state, 0) }, short(s.state, 80)),
      tasksCell,
    );
  }

  async function showSessionTasks(cell, session) {
    const ids = [...session.task_ids].reverse();
    const shownIds = ids.slice(0, 20);
    const ul = h('ul', { class: 'plain', testid: 'session-tasks' });
    replace(cell, ul, ids.length > 20 ? h('div', { class: 'muted small' }, `and ${ids.length - 20} older`) : null);
    const items = shownIds.map((id) => {
      const li = h('li', { class: 'mono small' }, link(routeOf('deployments', name, 'tasks', id), id), ' ');
      ul.appendChild(li);
      return [id, li];
    });
    // Their statuses, four at a time.
    let i = 0;
    const worker = async () => {
      while (i < items.length && !ctx.signal.aborted) {
        const [id, li] = items[i++];
        try {
          const t = await getJSON(path('deployments', name, 'tasks', id), { signal: ctx.signal });
          li.append(badge(t.status), ` ${t.service} · ${ago(t.created_at)}`);
        } catch (err) {
          if (!isAbort(err)) li.append(h('span', { class: 'text-bad' }, err.message));
        }
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
  }

  const load = pageNewestFirst({
    url: (before) => path('deployments', name, 'sessions', 'search') + query({ limit, before }),
    items: (page) => page.sessions,
    row: sessionRow,
    body, empty, count, older, refresh, error, signal: ctx.signal,
  });
  create.addEventListener('click', async () => {
    create.disabled = true;
    try {
      await postEmpty(path('deployments', name, 'sessions', 'create'), { signal: ctx.signal });
      await load();
    } catch (err) {
      if (!isAbort(err)) showError(error, err);
    } finally {
      create.disabled = false;
    }
  });
}
