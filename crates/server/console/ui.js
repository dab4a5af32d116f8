// DOM helpers and the pieces several pages share. Text goes in with textContent only.

// h('a', {href: '#/x', testid: 'link', class: 'c', onclick: fn}, 'text', child, …)
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'testid') el.dataset.testid = value;
    else if (key === 'class') el.className = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (key === 'value') el.value = value;
    else if (key === 'checked' || key === 'disabled' || key === 'selected' || key === 'hidden') {
      el[key] = Boolean(value);
    } else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function replace(el, ...children) {
  clear(el);
  append(el, children);
  return el;
}

// Link inside the console (hash routes).
export function link(route, text, attrs = {}) {
  return h('a', { href: `#${route}`, ...attrs }, text);
}

export function routeOf(...parts) {
  return '/' + parts.map((p) => encodeURIComponent(p)).join('/');
}

const GOOD = new Set(['ready', 'succeeded', 'deployed', 'done', 'healthy']);
const BUSY = new Set(['starting', 'running', 'deploying', 'pending', 'queued', 'waiting', 'restarting']);
const BAD = new Set(['failed', 'error', 'unhealthy']);

export function badge(state, testid) {
  const text = state === undefined || state === null ? 'unknown' : String(state);
  let kind = 'neutral';
  if (GOOD.has(text)) kind = 'good';
  else if (BAD.has(text)) kind = 'bad';
  else if (text === 'restarting') kind = 'warn';
  else if (BUSY.has(text)) kind = 'busy';
  return h('span', { class: `badge badge-${kind}`, testid, dataset: { state: text } }, text);
}

export function formatTime(ms) {
  if (ms === undefined || ms === null) return '';
  const d = new Date(Number(ms));
  if (Number.isNaN(d.getTime())) return String(ms);
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
  );
}

export function ago(ms) {
  if (!ms) return '';
  const s = Math.round((Date.now() - Number(ms)) / 1000);
  if (s < 0) return 'just now';
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

export function json(value, indent = 2) {
  if (value === undefined) return '';
  try {
    return JSON.stringify(value, null, indent);
  } catch {
    return String(value);
  }
}

export function short(text, max = 80) {
  const s = typeof text === 'string' ? text : json(text, 0);
  if (s.length <= max) return s;
  return s.slice(0, max - 1) + '…';
}

// An error box; `error` is an ApiError, an Error or text.
export function errorBox(error, testid = 'error') {
  const text = error && error.message ? error.message : String(error);
  return h('div', { class: 'error', role: 'alert', testid }, text);
}

export function notice(text, testid) {
  return h('div', { class: 'notice', testid }, text);
}

// Sets an element to show an error (or nothing when `error` is null).
export function showError(slot, error) {
  if (!error) {
    clear(slot);
    slot.hidden = true;
    return;
  }
  slot.hidden = false;
  replace(slot, errorBox(error, slot.dataset.errorTestid || 'error'));
}

// The deploy pipeline's stages, in order.
export const STAGES = ['sync', 'prepare', 'launch', 'ready', 'switch'];

// A service's latest deploy as a row of steps: done, running/waiting, failed.
export function stageSteps(stage) {
  if (!stage) return h('span', { class: 'muted', testid: 'service-stage', dataset: { state: 'none' } }, '—');
  const index = STAGES.indexOf(stage.stage);
  const wrap = h('span', {
    class: 'stages',
    testid: 'service-stage',
    dataset: { stage: stage.stage, state: stage.state },
    title: `${stage.stage}: ${stage.state}${stage.error ? ` — ${stage.error}` : ''}`,
  });
  STAGES.forEach((name, i) => {
    let state = 'todo';
    if (index < 0) state = 'todo';
    else if (i < index) state = 'done';
    else if (i === index) state = stage.state;
    else if (stage.state === 'done') state = 'skipped';
    wrap.appendChild(h('span', { class: `step step-${state}` }, name));
  });
  if (index < 0) wrap.appendChild(h('span', { class: 'step' }, `${stage.stage}: ${stage.state}`));
  if (stage.error) wrap.appendChild(longText(stage.error, { class: 'stage-error', testid: 'stage-error' }));
  return wrap;
}

// A text of several lines: its first line, the rest behind a click.
export function longText(text, attrs = {}) {
  const [first, ...rest] = String(text).split('\n');
  if (!rest.length) return h('div', attrs, first);
  return h('details', attrs, h('summary', {}, first), h('pre', { class: 'stage-error-more' }, rest.join('\n')));
}

export function stageDone(stage) {
  return !stage || stage.state === 'done' || stage.state === 'failed';
}

// Whether a deployment is still moving (deploy under way, a stage not done, a service
// starting): then pages poll it every second.
export function isBusy(status) {
  if (!status) return false;
  if (status.deploying) return true;
  for (const s of status.services || []) {
    if (!stageDone(s.stage)) return true;
    if (['starting', 'restarting', 'pending'].includes(s.phase)) return true;
  }
  return false;
}

function replicasCell(service) {
  const replicas = service.replicas || [];
  if (!replicas.length) {
    return h(
      'span',
      { class: 'replica' },
      service.pid ? `pid ${service.pid}` : 'no process',
      service.port ? ` · :${service.port}` : '',
    );
  }
  return h(
    'ul',
    { class: 'replicas' },
    replicas.map((r, i) =>
      h(
        'li',
        { testid: 'replica', dataset: { replica: String(i) } },
        `#${i} `,
        badge(r.phase),
        ` ${r.pid ? `pid ${r.pid}` : 'no process'}`,
        r.port ? ` · :${r.port}` : '',
        r.restarts ? ` · ${r.restarts} restarts` : '',
        r.last_exit ? h('div', { class: 'muted small' }, r.last_exit) : null,
      ),
    ),
  );
}

// The services of a deployment as a table; `links` adds logs/tasks links per service.
export function servicesTable(status, { links = false } = {}) {
  const services = [...(status.services || [])];
  if (status.ui) services.push(status.ui);
  const table = h(
    'table',
    { class: 'grid services', testid: 'services-table' },
    h(
      'thead',
      {},
      h(
        'tr',
        {},
        h('th', {}, 'service'),
        h('th', {}, 'phase'),
        h('th', {}, 'deploy'),
        h('th', {}, 'instances'),
        h('th', {}, 'restarts'),
        h('th', {}, 'last exit'),
        links ? h('th', {}, '') : null,
      ),
    ),
  );
  const body = h('tbody');
  for (const s of services) {
    const isDefault = s.id === status.default_service;
    body.appendChild(
      h(
        'tr',
        { testid: 'service-row', dataset: { service: s.id, phase: s.phase } },
        h('td', { class: 'mono' }, s.id, isDefault ? h('span', { class: 'muted small' }, ' (default)') : null),
        h('td', {}, badge(s.phase, 'service-phase')),
        h('td', {}, stageSteps(s.stage)),
        h('td', {}, replicasCell(s)),
        h('td', { class: 'num' }, String(s.restarts ?? 0)),
        h('td', { class: 'small' }, s.last_exit || ''),
        links
          ? h(
              'td',
              { class: 'actions' },
              s.id === '@ui'
                ? null
                : [
                    link(routeOf('deployments', status.name, 'services', s.id, 'logs'), 'logs', {
                      testid: 'service-logs-link',
                    }),
                    ' ',
                    link(`${routeOf('deployments', status.name, 'tasks')}?service=${encodeURIComponent(s.id)}`, 'tasks', {
                      testid: 'service-tasks-link',
                    }),
                  ],
            )
          : null,
      ),
    );
  }
  table.appendChild(body);
  return table;
}

// Runs `fn` now and again after `delay(result)` ms until the signal aborts; never overlaps.
export function poll(signal, fn, delay) {
  let timer = null;
  const tick = async () => {
    if (signal.aborted) return;
    let result;
    try {
      result = await fn();
    } catch (err) {
      result = err;
    }
    if (signal.aborted) return;
    timer = setTimeout(tick, delay(result));
  };
  signal.addEventListener('abort', () => clearTimeout(timer), { once: true });
  tick();
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener(
      'abort',
      () => {
        clearTimeout(timer);
        resolve();
      },
      { once: true },
    );
  });
}

export function isAbort(err) {
  return err && (err.name === 'AbortError' || err.code === 20);
}
