// 5. A task: its summary, its events live (server-sent events read with fetch, resumed with
// Last-Event-ID), its result or error, a human-in-the-loop form, Cancel, and its graph.

import { ApiError, getJSON, getText, path, postEmpty, postJSON, query, streamSse } from './api.js';
import { clearGraph, drawGraph } from './graph.js';
import { ago, badge, clear, formatTime, h, isAbort, json, link, replace, routeOf, showError, sleep } from './ui.js';

const ENDED = new Set(['succeeded', 'failed', 'cancelled']);
const TERMINAL_EVENTS = new Set(['result', 'error', 'cancelled']);

// The test (and anyone curious) can reach the live page's stream through this.
const debug = (window.__deploydConsole = window.__deploydConsole || {});

// What an event asks of a human, or null: llama-index's InputRequiredEvent (by its qualified
// name, or a value with a `prefix`), as the workflow serializer writes it.
export function inputRequest(data) {
  if (!data || typeof data !== 'object' || Array.isArray(data)) return null;
  const name = String(data.qualified_name || '');
  let value = data.__is_pydantic || 'value' in data ? data.value : data;
  let wrapped = false;
  if (value && typeof value === 'object' && value._data && typeof value._data === 'object') {
    value = value._data;
    wrapped = true;
  }
  const hasPrefix = value && typeof value === 'object' && !Array.isArray(value) && 'prefix' in value;
  if (!name.includes('InputRequiredEvent') && !hasPrefix) return null;
  return { name, value: value || {}, wrapped, prefix: value && typeof value.prefix === 'string' ? value.prefix : '' };
}

// The answer llama_deploy's client sends (`HumanResponseEvent`), shaped like the question: the
// same module (`llama_index.core.workflow.events` or `workflows.events`), `_data` when the
// question had it.
export function humanResponse(question, response) {
  let qualified = 'llama_index.core.workflow.events.HumanResponseEvent';
  if (question.name.includes('InputRequiredEvent')) {
    qualified = question.name.replace('InputRequiredEvent', 'HumanResponseEvent');
  }
  const value = question.wrapped ? { _data: response } : response;
  return { __is_pydantic: true, value, qualified_name: qualified };
}

function eventName(data) {
  if (data && typeof data === 'object' && !Array.isArray(data) && typeof data.qualified_name === 'string') {
    const parts = data.qualified_name.split('.');
    return parts[parts.length - 1];
  }
  return '';
}

function eventBody(data) {
  if (data && typeof data === 'object' && !Array.isArray(data) && data.__is_pydantic && 'value' in data) {
    return data.value;
  }
  return data;
}

export function taskPage(root, ctx) {
  const [name, taskId] = ctx.params;
  ctx.setTitle(`Task ${taskId}`, [
    ['Deployments', '/deployments'],
    [name, routeOf('deployments', name)],
    ['Tasks', routeOf('deployments', name, 'tasks')],
  ]);

  // The summary.
  const statusCell = h('span', { testid: 'task-status' }, badge('loading'));
  const serviceCell = h('span', { class: 'mono', testid: 'task-service' });
  const sessionCell = h('span', { class: 'mono', testid: 'task-session' });
  const attemptCell = h('span', { testid: 'task-attempt' });
  const createdCell = h('span', {});
  const updatedCell = h('span', {});
  const inputPre = h('pre', { class: 'json', testid: 'task-input' });
  const summaryError = h('div', { hidden: true });
  summaryError.dataset.errorTestid = 'task-summary-error';
  const cancel = h('button', { type: 'button', class: 'danger', testid: 'task-cancel', hidden: true }, 'Cancel task');
  const cancelError = h('div', { hidden: true });
  cancelError.dataset.errorTestid = 'cancel-error';

  // The stream.
  const streamState = h('span', { class: 'stream-state', testid: 'stream-state' }, 'connecting…');
  const streamError = h('div', { hidden: true });
  streamError.dataset.errorTestid = 'stream-error';
  const eventsBody = h('tbody', { testid: 'events-body' });
  const noEvents = h('div', { class: 'muted', testid: 'events-empty' }, 'No events yet.');
  const outcome = h('div', { testid: 'task-outcome' });
  const hitl = h('div', { testid: 'hitl-slot' });
  const graph = h('div', { testid: 'graph-slot' });

  root.append(
    h(
      'section',
      { class: 'task-head' },
      h(
        'dl',
        { class: 'facts' },
        h('dt', {}, 'task'),
        h('dd', { class: 'mono', testid: 'task-id' }, taskId),
        h('dt', {}, 'status'),
        h('dd', {}, statusCell, ' ', cancel),
        h('dt', {}, 'service'),
        h('dd', {}, serviceCell),
        h('dt', {}, 'session'),
        h('dd', {}, sessionCell),
        h('dt', {}, 'attempt'),
        h('dd', {}, attemptCell),
        h('dt', {}, 'created'),
        h('dd', {}, createdCell),
        h('dt', {}, 'updated'),
        h('dd', {}, updatedCell),
      ),
      h('div', { class: 'task-input' }, h('h3', {}, 'Input'), inputPre),
    ),
    summaryError,
    cancelError,
    hitl,
    graph,
    h(
      'section',
      {},
      h('h2', {}, 'Events ', streamState),
      streamError,
      h(
        'table',
        { class: 'grid events', testid: 'events-table' },
        h('thead', {}, h('tr', {}, ['seq', 'type', 'attempt', 'event', 'data'].map((t) => h('th', {}, t)))),
        eventsBody,
      ),
      noEvents,
    ),
    h('section', {}, h('h2', {}, 'Outcome'), outcome),
  );
  replace(outcome, h('span', { class: 'muted', testid: 'task-pending' }, 'The task has not ended yet.'));

  let summary = null;
  let ended = false; // a terminal event arrived
  let lastId = null; // the last SSE id seen
  let duplicates = 0;
  let connections = 0;
  let connection = null; // the current stream's AbortController
  let question = null; // the open InputRequiredEvent
  const seen = [];

  // --- Summary -------------------------------------------------------------------------------
  function showSummary(t) {
    summary = t;
    replace(statusCell, badge(t.status, 'task-status-badge'));
    statusCell.dataset.status = t.status;
    serviceCell.textContent = t.service || '';
    replace(
      sessionCell,
      t.session_id ? link(routeOf('deployments', name, 'sessions'), t.session_id, { testid: 'task-session-link' }) : '—',
    );
    attemptCell.textContent = String(t.attempt ?? '');
    createdCell.textContent = `${formatTime(t.created_at)} (${ago(t.created_at)})`;
    updatedCell.textContent = `${formatTime(t.updated_at)} (${ago(t.updated_at)})`;
    inputPre.textContent = json(t.input);
    cancel.hidden = ENDED.has(t.status);
    if (ENDED.has(t.status)) {
      if (!ended) {
        question = null;
        clear(hitl);
      }
      renderOutcomeFromSummary(t);
      if (!graphLoadedAtEnd) loadGraph(true);
    }
    if (!graphTried) loadGraph(false);
  }

  async function loadSummary() {
    try {
      const t = await getJSON(path('deployments', name, 'tasks', taskId), { signal: ctx.signal });
      showError(summaryError, null);
      showSummary(t);
      return t;
    } catch (err) {
      if (!isAbort(err)) showError(summaryError, err);
      return null;
    }
  }

  // Polls the summary every 2 s until the task ended (queued → running shows no event).
  (async () => {
    while (!ctx.signal.aborted) {
      const t = await loadSummary();
      if (t && ENDED.has(t.status)) break;
      if (!t && ended) break;
      await sleep(2000, ctx.signal);
    }
  })();

  cancel.addEventListener('click', async () => {
    cancel.disabled = true;
    showError(cancelError, null);
    try {
      const t = await postEmpty(path('deployments', name, 'tasks', taskId, 'cancel'), { signal: ctx.signal });
      if (t && typeof t === 'object' && t.task_id) showSummary(t);
      else await loadSummary();
    } catch (err) {
      if (isAbort(err)) return;
      showError(cancelError, err);
      await loadSummary();
    } finally {
      cancel.disabled = false;
    }
  });

  // --- Outcome -------------------------------------------------------------------------------
  let outcomeFromStream = false;
  function renderOutcome(type, data) {
    outcomeFromStream = true;
    if (type === 'result') {
      replace(
        outcome,
        h('div', { class: 'outcome good' }, h('h3', {}, 'Result'), h('pre', { class: 'json', testid: 'task-result' }, typeof data === 'string' ? data : json(data))),
      );
    } else if (type === 'error') {
      replace(
        outcome,
        h('div', { class: 'outcome bad' }, h('h3', {}, 'Error'), h('pre', { class: 'json', testid: 'task-error' }, typeof data === 'string' ? data : json(data))),
      );
    } else if (type === 'cancelled') {
      replace(
        outcome,
        h(
          'div',
          { class: 'outcome neutral', testid: 'task-cancelled' },
          h('h3', {}, 'Cancelled'),
          data !== null && data !== undefined && data !== '' ? h('pre', { class: 'json' }, typeof data === 'string' ? data : json(data)) : null,
        ),
      );
    }
  }

  function renderOutcomeFromSummary(t) {
    if (outcomeFromStream) return;
    if (t.status === 'succeeded') renderOutcome('result', t.result);
    else if (t.status === 'failed') renderOutcome('error', t.error);
    else if (t.status === 'cancelled') renderOutcome('cancelled', t.error);
    outcomeFromStream = false;
  }

  // --- Human in the loop --------------------------------------------------------------------
  function showQuestion(q, seq) {
    question = { ...q, seq };
    const text = h('input', { type: 'text', testid: 'hitl-input', id: 'hitl-input', autocomplete: 'off' });
    const asJson = h('input', { type: 'checkbox', testid: 'hitl-json' });
    const send = h('button', { type: 'submit', class: 'primary', testid: 'hitl-send' }, 'Send');
    const error = h('div', { hidden: true });
    error.dataset.errorTestid = 'hitl-error';
    const form = h(
      'form',
      { class: 'form hitl', testid: 'hitl-form', dataset: { seq: String(seq) } },
      h('h2', {}, 'The task asks'),
      h('label', { for: 'hitl-input', class: 'prompt', testid: 'hitl-prompt' }, q.prefix || 'An answer is required.'),
      q.value && q.value.request !== undefined ? h('pre', { class: 'json', testid: 'hitl-request' }, json(q.value.request)) : null,
      h('div', { class: 'row inline' }, text, send),
      h('label', { class: 'check small' }, asJson, ' send the text as a JSON value (instead of {"response": text})'),
      error,
    );
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      showError(error, null);
      let response = { response: text.value };
      if (asJson.checked) {
        try {
          response = JSON.parse(text.value);
        } catch (err) {
          showError(error, `Not JSON: ${err.message}`);
          return;
        }
      }
      const event = humanResponse(q, response);
      const body = { event_obj_str: JSON.stringify(event) };
      const service = summary?.service;
      if (service) body.service_id = service;
      send.disabled = true;
      try {
        await postJSON(
          path('deployments', name, 'tasks', taskId, 'events') + query({ session_id: summary?.session_id }),
          body,
          { signal: ctx.signal },
        );
        question = null;
        replace(
          hitl,
          h(
            'div',
            { class: 'form hitl answered', testid: 'hitl-answered' },
            h('h2', {}, 'The task asked'),
            h('div', { class: 'prompt', testid: 'hitl-prompt' }, q.prefix || 'An answer is required.'),
            h('div', {}, 'Answered: ', h('b', { testid: 'hitl-answer' }, text.value)),
          ),
        );
      } catch (err) {
        if (!isAbort(err)) showError(error, err);
      } finally {
        send.disabled = false;
      }
    });
    replace(hitl, form);
    text.focus();
  }

  // --- Graph (graph services) ---------------------------------------------------------------
  // The service's graph with the task's run drawn over it (GET …/graph?task_id=), as a diagram;
  // fetched when the summary comes, again after the graph's steps (their events name a `node`)
  // and at the task's end. 404/409 (no graph, no run yet, the service not ready): nothing shown.
  let graphTried = false;
  let graphLoadedAtEnd = false;
  let graphShown = false;
  let graphRequests = 0;
  let graphTimer = null;
  const graphBody = h('div', { class: 'graph', testid: 'graph-view' });
  const graphSection = h(
    'section',
    { testid: 'graph-section' },
    h('h2', {}, 'Graph ', h('span', { class: 'muted small' }, 'the task’s run over the service’s graph')),
    graphBody,
  );
  async function loadGraph(atEnd) {
    if (!summary?.service) return;
    graphTried = true;
    if (atEnd) graphLoadedAtEnd = true;
    const mine = ++graphRequests;
    try {
      const text = await getText(
        path('deployments', name, 'services', summary.service, 'graph') + query({ task_id: taskId }),
        { signal: ctx.signal },
      );
      if (mine !== graphRequests || ctx.signal.aborted) return;
      if (!graphShown) {
        graphShown = true;
        clearGraph(graphBody);
        replace(graph, graphSection);
      }
      await drawGraph(graphBody, text);
    } catch (err) {
      if (isAbort(err) || mine !== graphRequests) return;
      // No graph for this service (or no run yet): nothing to show.
      if (err instanceof ApiError && (err.status === 404 || err.status === 409)) {
        if (!graphShown) clear(graph);
        return;
      }
      graphShown = false;
      replace(graph, h('section', {}, h('h2', {}, 'Graph'), h('div', { class: 'error', testid: 'graph-error' }, err.message)));
    }
  }
  // After a step of the graph (a burst of events), the run drawn again.
  function graphStepSeen() {
    if (graphTimer || ctx.signal.aborted) return;
    graphTimer = setTimeout(() => {
      graphTimer = null;
      if (!ctx.signal.aborted) loadGraph(false);
    }, 500);
  }
  ctx.signal.addEventListener('abort', () => clearTimeout(graphTimer), { once: true });

  // --- Events --------------------------------------------------------------------------------
  function onEvent(ev) {
    const id = Number(ev.id);
    if (lastId !== null && Number.isFinite(id) && id <= lastId) {
      duplicates++;
      eventsBody.dataset.duplicates = String(duplicates);
      return;
    }
    if (Number.isFinite(id)) lastId = id;
    let line;
    try {
      line = JSON.parse(ev.data);
    } catch {
      line = { seq: id, type: ev.event, data: ev.data };
    }
    const type = ev.event || line.type;
    const data = line.data;
    seen.push(id);
    noEvents.hidden = true;
    const evName = type === 'event' ? eventName(data) : '';
    const body = type === 'event' ? eventBody(data) : data;
    eventsBody.appendChild(
      h(
        'tr',
        { testid: 'event-row', dataset: { seq: String(line.seq ?? id), type, name: evName }, class: `ev-${type}` },
        h('td', { class: 'num mono' }, String(line.seq ?? id)),
        h('td', {}, h('span', { class: `evtype evtype-${type}` }, type)),
        h('td', { class: 'num' }, String(line.attempt ?? '')),
        h('td', { class: 'mono small' }, evName),
        h('td', {}, h('pre', { class: 'json compact' }, typeof body === 'string' ? body : json(body, 0))),
      ),
    );
    eventsBody.dataset.count = String(seen.length);
    eventsBody.dataset.lastSeq = String(lastId ?? '');
    if (type === 'event') {
      const q = inputRequest(data);
      if (q && !ended && !(summary && ENDED.has(summary.status))) showQuestion(q, id);
      // A graph service's step ({"node": …, "step": …}), or a question of one.
      const node = data && typeof data === 'object' ? data.node ?? data.value?.node : undefined;
      if (!ended && (graphShown || typeof node === 'string')) graphStepSeen();
    }
    if (TERMINAL_EVENTS.has(type)) {
      ended = true;
      if (question || hitl.querySelector('form')) clear(hitl);
      question = null;
      cancel.hidden = true;
      renderOutcome(type, data);
      loadSummary();
      loadGraph(true);
    }
  }

  function setStreamState(text, key) {
    streamState.textContent = text;
    streamState.dataset.state = key;
  }

  async function follow() {
    let failures = 0;
    while (!ctx.signal.aborted && !ended) {
      const mine = new AbortController();
      connection = mine;
      const stop = () => mine.abort();
      ctx.signal.addEventListener('abort', stop, { once: true });
      connections++;
      streamState.dataset.connections = String(connections);
      setStreamState(failures ? `reconnecting (after ${lastId ?? 'the start'})…` : 'connecting…', 'connecting');
      try {
        await streamSse(
          path('deployments', name, 'tasks', taskId, 'events'),
          (ev) => {
            failures = 0;
            if (streamState.dataset.state !== 'live') setStreamState('live', 'live');
            onEvent(ev);
            // The stream ends after its terminal event; don't wait for the server to close.
            if (ended) mine.abort();
          },
          { signal: mine.signal, lastEventId: lastId },
        );
        showError(streamError, null);
        if (ended) break;
        // The server ended the stream before the task's end: resume after the last id.
        failures++;
      } catch (err) {
        if (ctx.signal.aborted) break;
        if (ended) break;
        if (!(mine.signal.aborted || isAbort(err))) {
          if (err instanceof ApiError && err.status >= 400 && err.status < 500 && err.status !== 429 && err.status !== 408) {
            showError(streamError, err);
            setStreamState('failed', 'failed');
            return;
          }
          showError(streamError, err);
        }
        failures++;
      } finally {
        ctx.signal.removeEventListener('abort', stop);
      }
      if (ctx.signal.aborted || ended) break;
      setStreamState(`reconnecting (after ${lastId ?? 'the start'})…`, 'reconnecting');
      await sleep(Math.min(250 * 2 ** Math.min(failures, 6), 10000), ctx.signal);
    }
    if (ended) {
      setStreamState('ended', 'ended');
      showError(streamError, null);
    }
  }

  debug.task = {
    taskId,
    // Drops the current connection as a network failure would: the page reconnects with
    // Last-Event-ID.
    dropStream() {
      connection?.abort();
    },
    get lastEventId() {
      return lastId;
    },
    get connections() {
      return connections;
    },
    get duplicates() {
      return duplicates;
    },
  };
  ctx.signal.addEventListener('abort', () => {
    if (debug.task?.taskId === taskId) delete debug.task;
  });

  follow();
}
