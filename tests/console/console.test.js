// deployd's web console in headless Chromium, against a real deployd with the quickstart and
// the python-workflow example: the deployments page, running a task and watching its events, a
// human in the loop, cancelling a long task, the tasks list, logs, sessions, the Rust graph
// service's graph drawn with Mermaid (with a task's run over it), and a rollback after a failed
// reload. Screenshots go to docs/console/.
//
// Run it with tests/console/run-tests.sh (DEPLOYD_BIN names the binary,
// DEPLOYD_GRAPH_SERVICE_BIN the example graph service; DEPLOYD_CONSOLE_DIR, when set, makes
// deployd serve the console's files from that folder).

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { CONSOLE_DIR, Deployd, REPO, SCREENSHOTS, graphServiceBinary, launchBrowser, sleep } from './harness.js';

const QUICKSTART = path.join(REPO, 'examples/quickstart/deployment.yaml');
const PYTHON_WORKFLOW = path.join(REPO, 'examples/python-workflow/deployment.yml');
const STEP = { timeout: 120_000 };

const tid = (id) => `[data-testid="${id}"]`;

let server;
let browser;
let page;
let failed = false;
const pageErrors = [];
// What the browser said about the page's Content-Security-Policy (Mermaid must run under it).
const cspViolations = [];
const timings = [];

async function screenshot(name) {
  fs.mkdirSync(SCREENSHOTS, { recursive: true });
  // Let the last poll land and the layout settle.
  await sleep(300);
  await page.screenshot({ path: path.join(SCREENSHOTS, name), fullPage: true, animations: 'disabled' });
}

// Goes to a console route (the part after `#`).
async function open(route) {
  const url = `${server.url}/console/#${route}`;
  if (page.url().startsWith(`${server.url}/console`)) {
    await page.evaluate((r) => {
      location.hash = r;
    }, route);
  } else {
    await page.goto(url);
  }
  await page.waitForFunction((r) => location.hash === `#${r}`, route);
}

// The attribute values of every element matching `selector`.
function attrs(selector, name) {
  return page.$$eval(selector, (els, n) => els.map((e) => e.getAttribute(n)), name);
}

async function runFromDeploymentPage(deployment, service, input) {
  await open(`/deployments/${deployment}`);
  await page.locator(`${tid('run-service')} option[value="${service}"]`).waitFor({ state: 'attached' });
  await page.selectOption(tid('run-service'), service);
  await page.fill(tid('run-input'), input);
  await page.click(tid('run-submit'));
  await page.waitForFunction(
    (d) => new RegExp(`^#/deployments/${d}/tasks/[^/]+$`).test(location.hash),
    deployment,
  );
  const taskId = decodeURIComponent(page.url().split('/tasks/')[1]);
  await page.locator(tid('task-id')).waitFor();
  return taskId;
}

async function timed(name, fn) {
  const start = Date.now();
  try {
    await fn();
  } catch (err) {
    failed = true;
    if (page) {
      const shot = path.join(os.tmpdir(), `deployd-console-failure-${name.replace(/\W+/g, '-')}.png`);
      await page.screenshot({ path: shot, fullPage: true }).catch(() => {});
      console.log(`screenshot of the failure: ${shot}`);
    }
    if (server) console.log(`--- deployd's log (last lines) ---\n${server.logTail(40)}`);
    throw err;
  } finally {
    timings.push([name, Date.now() - start]);
  }
}

// The names of the graph's states in a drawn diagram (`within` the graph's container) that
// carry each of the run's classes: {visited: [...], current: [...], failed: [...]}, sorted, with
// the fill each class shows.
function runClasses(within) {
  return page.$$eval(`${within} [data-testid="graph-svg"] svg g.node`, (nodes) => {
    const out = { visited: [], current: [], failed: [], fills: {} };
    for (const node of nodes) {
      for (const name of ['visited', 'current', 'failed']) {
        if (!node.classList.contains(name)) continue;
        out[name].push(node.textContent.trim());
        const shape = node.querySelector('rect, path, polygon');
        if (shape) out.fills[name] = getComputedStyle(shape).fill;
      }
    }
    for (const name of ['visited', 'current', 'failed']) out[name].sort();
    return out;
  });
}

// Waits until the diagram in `within` marks exactly these states (sorted names).
async function waitRunClasses(within, want) {
  let last = null;
  try {
    await page.waitForFunction(
      ([sel, w]) => {
        const names = (cls) =>
          [...document.querySelectorAll(`${sel} [data-testid="graph-svg"] svg g.node.${cls}`)]
            .map((n) => n.textContent.trim())
            .sort()
            .join(',');
        return ['visited', 'current', 'failed'].every((c) => names(c) === (w[c] || []).join(','));
      },
      [within, want],
      { timeout: 30_000 },
    );
  } catch (err) {
    last = await runClasses(within).catch(() => null);
    throw new Error(`the diagram never marked ${JSON.stringify(want)} (last: ${JSON.stringify(last)}): ${err.message}`);
  }
  return runClasses(within);
}

// deployd with both examples deployed and ready, and the browser.
async function setUp() {
  const start = Date.now();
  // Checked first: the graph test needs it, and a missing binary should fail at once.
  graphServiceBinary();
  server = await Deployd.start();
  console.log(`deployd on ${server.url}, data in ${server.dataDir}`);
  for (const file of [QUICKSTART, PYTHON_WORKFLOW]) {
    const { status, body } = await server.deploy(file);
    assert.equal(status, 200, `deploying ${file}: ${JSON.stringify(body)}`);
  }
  await server.waitReady('quickstart', 120_000);
  // The first time, uv builds the workflows' virtualenv (llama-index): minutes.
  await server.waitReady('python-workflow', 12 * 60_000);
  timings.push(['start deployd and deploy both examples', Date.now() - start]);
  browser = await launchBrowser();
  page = browser.context.pages()[0] || (await browser.context.newPage());
  page.on('pageerror', (err) => pageErrors.push(err.message));
  page.on('console', (msg) => {
    if (/Content[- ]Security[- ]Policy|Refused to (load|execute|apply|evaluate)/i.test(msg.text())) {
      cspViolations.push(msg.text());
    }
  });
}

describe('the console', { timeout: 40 * 60_000 }, () => {
  before(
    async () => {
      try {
        await setUp();
      } catch (err) {
        failed = true;
        throw err;
      }
    },
    { timeout: 15 * 60_000 },
  );

  after(
    async () => {
      for (const [name, ms] of timings) console.log(`${(ms / 1000).toFixed(1)} s  ${name}`);
      if (browser) await browser.close();
      if (server) await server.stop({ keepLog: failed });
    },
    { timeout: 60_000 },
  );

  test('deployd serves the console files, without a token', STEP, () =>
    timed('files', async () => {
      const files = fs.readdirSync(CONSOLE_DIR).filter((f) => !f.startsWith('.'));
      assert.ok(files.includes('index.html') && files.includes('app.js') && files.includes('style.css'), `${files}`);
      const types = { html: 'text/html', js: 'text/javascript', css: 'text/css' };
      const stale = [];
      for (const [route, file] of [
        ['/console', 'index.html'],
        ['/console/', 'index.html'],
        ...files.map((f) => [`/console/${f}`, f]),
      ]) {
        const res = await fetch(`${server.url}${route}`, { signal: AbortSignal.timeout(10_000) });
        const body = Buffer.from(await res.arrayBuffer());
        assert.equal(res.status, 200, `GET ${route}: ${res.status} ${body}`);
        const type = types[file.split('.').pop()];
        const served = res.headers.get('content-type') || '';
        if (type) assert.ok(served.startsWith(type), `${route}: ${served}`);
        if (!body.equals(fs.readFileSync(path.join(CONSOLE_DIR, file)))) stale.push(file);
      }
      assert.deepEqual(
        stale,
        [],
        `deployd serves other files than crates/server/console/ holds (${stale.join(', ')}): the binary ` +
          'embeds an older console; rebuild it, or run with DEPLOYD_CONSOLE_DIR=crates/server/console',
      );
      const missing = await server.api('GET', '/console/no-such-file.js', { token: null });
      assert.equal(missing.status, 404);
      // The API needs the token: the console will ask for it.
      const refused = await server.api('GET', '/deployments/', { token: null });
      assert.equal(refused.status, 401);
    }));

  test('the deployments page asks for the token, then shows both deployments ready', STEP, () =>
    timed('deployments', async () => {
      await page.goto(`${server.url}/console`);
      await page.locator(tid('token-overlay')).waitFor({ state: 'visible' });
      await page.fill(tid('token-input'), 'a-wrong-token-of-enough-length');
      await page.click(tid('token-submit'));
      // A wrong token: asked again, saying so.
      await page.waitForFunction(
        (sel) => {
          const overlay = document.querySelector(sel);
          return overlay && !overlay.hidden && /refused/.test(overlay.textContent);
        },
        tid('token-overlay'),
      );
      await page.fill(tid('token-input'), server.token);
      await page.click(tid('token-submit'));
      await page.locator(tid('token-overlay')).waitFor({ state: 'hidden' });

      const card = (name) => `${tid('deployment-card')}[data-name="${name}"]`;
      const ready = (name, n) =>
        page.waitForFunction(
          ([sel, count]) =>
            document.querySelectorAll(`${sel} [data-testid="service-row"][data-phase="ready"]`).length === count &&
            document.querySelectorAll(`${sel} [data-testid="service-stage"][data-state="done"]`).length === count,
          [card(name), n],
        );
      await ready('quickstart', 1);
      await ready('python-workflow', 4);
      assert.deepEqual(await attrs(tid('deployment-card'), 'data-name'), ['python-workflow', 'quickstart']);
      assert.deepEqual(await attrs(`${card('python-workflow')} ${tid('service-row')}`, 'data-service'), [
        'echo_workflow',
        'counter_workflow',
        'approval_workflow',
        'slow_workflow',
      ]);
      // Each service shows its process.
      const instances = await page.locator(`${card('quickstart')} ${tid('service-row')}`).innerText();
      assert.match(instances, /pid \d+ · :\d+/);
      // The filter narrows the list.
      await page.fill(tid('deployments-filter'), 'quick');
      await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 1, tid('deployment-card'));
      await page.fill(tid('deployments-filter'), '');
      await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 2, tid('deployment-card'));
      await screenshot('deployments.png');
    }));

  test('a task run from the page streams its events, then its result', STEP, () =>
    timed('task events', async () => {
      await page.click(`${tid('deployment-card')}[data-name="quickstart"] ${tid('deployment-link')}`);
      await page.waitForFunction(() => location.hash === '#/deployments/quickstart');
      const taskId = await runFromDeploymentPage('quickstart', 'echo', '{"message": "hi"}');
      await page.locator(`${tid('event-row')}[data-type="result"]`).waitFor();
      assert.deepEqual(await attrs(tid('event-row'), 'data-type'), ['event', 'event', 'result']);
      assert.deepEqual(await attrs(tid('event-row'), 'data-seq'), ['1', '2', '3']);
      const events = await page.locator(tid('events-table')).innerText();
      assert.match(events, /"step":"received"/);
      assert.match(events, /"step":"echoing"/);
      assert.equal((await page.locator(tid('task-result')).innerText()).trim(), 'Message received: hi');
      await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.status === 'succeeded', tid('task-status'));
      await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.state === 'ended', tid('stream-state'));
      assert.equal((await page.locator(tid('task-service')).innerText()).trim(), 'echo');
      assert.match(await page.locator(tid('task-input')).innerText(), /"message": "hi"/);
      assert.equal(await page.locator(tid('task-cancel')).isVisible(), false);
      const { body } = await server.api('GET', `/deployments/quickstart/tasks/${taskId}`);
      assert.equal(body.status, 'succeeded');
      await screenshot('task-events.png');
    }));

  test('a human in the loop: the page shows the question, sends the answer, shows the result', STEP, () =>
    timed('human in the loop', async () => {
      const taskId = await runFromDeploymentPage('python-workflow', 'approval_workflow', '{"item": "the release"}');
      await page.locator(tid('hitl-form')).waitFor();
      assert.equal((await page.locator(tid('hitl-prompt')).innerText()).trim(), 'approve the release?');
      await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.status === 'running', tid('task-status'));
      await page.fill(tid('hitl-input'), 'yes, ship it');
      await page.click(tid('hitl-send'));
      await page.locator(tid('task-result')).waitFor();
      assert.equal((await page.locator(tid('task-result')).innerText()).trim(), 'human said: yes, ship it');
      assert.equal((await page.locator(tid('hitl-answer')).innerText()).trim(), 'yes, ship it');
      await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.status === 'succeeded', tid('task-status'));
      const names = await attrs(tid('event-row'), 'data-name');
      assert.equal(names[0], 'InputRequiredEvent', `${names}`);
      const { body } = await server.api('GET', `/deployments/python-workflow/tasks/${taskId}`);
      assert.equal(body.result, 'human said: yes, ship it');
      await screenshot('human-in-the-loop.png');
    }));

  test('a long task: its stream resumes after a dropped connection, then Cancel ends it', STEP, () =>
    timed('cancel', async () => {
      const taskId = await runFromDeploymentPage('python-workflow', 'slow_workflow', '{"seconds": 60}');
      await page.waitForFunction((sel) => document.querySelectorAll(sel).length >= 3, tid('event-row'), {
        timeout: 60_000,
      });
      await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.status === 'running', tid('task-status'));
      // The connection drops: the page reconnects with Last-Event-ID, nothing missed, nothing twice.
      const before = await page.locator(tid('event-row')).count();
      await page.evaluate(() => window.__deploydConsole.task.dropStream());
      await page.waitForFunction(
        ([sel, n]) => window.__deploydConsole.task.connections >= 2 && document.querySelectorAll(sel).length >= n + 2,
        [tid('event-row'), before],
        { timeout: 30_000 },
      );
      assert.equal(await page.evaluate(() => window.__deploydConsole.task.duplicates), 0);
      const seqs = (await attrs(tid('event-row'), 'data-seq')).map(Number);
      assert.deepEqual(seqs, seqs.map((_, i) => i + 1), `${seqs}`);
      assert.ok((await page.locator(tid('events-table')).innerText()).includes('"message":"3 of 60"'));

      await page.click(tid('task-cancel'));
      await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.status === 'cancelled', tid('task-status'));
      await page.locator(`${tid('event-row')}[data-type="cancelled"]`).waitFor();
      await page.locator(tid('task-cancelled')).waitFor();
      await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.state === 'ended', tid('stream-state'));
      assert.equal(await page.locator(tid('task-cancel')).isVisible(), false);
      // The stream ended: no event comes after the cancel.
      const count = await page.locator(tid('event-row')).count();
      const types = await attrs(tid('event-row'), 'data-type');
      assert.equal(types[types.length - 1], 'cancelled', `${types}`);
      await sleep(2500);
      assert.equal(await page.locator(tid('event-row')).count(), count);

      const summary = await server.api('GET', `/deployments/python-workflow/tasks/${taskId}`);
      assert.equal(summary.body.status, 'cancelled');
      const again = await server.api('POST', `/deployments/python-workflow/tasks/${taskId}/cancel`);
      assert.equal(again.status, 409, JSON.stringify(again.body));
      assert.ok(again.body.detail, JSON.stringify(again.body));
      await screenshot('cancelled.png');
      // The service itself goes on serving.
      await server.waitReady('python-workflow', 30_000);
    }));

  test('the tasks page: newest first, filtered by status and service, paged with Older', STEP, () =>
    timed('tasks', async () => {
      const all = await server.api('GET', '/deployments/python-workflow/tasks/search?limit=1000');
      assert.equal(all.status, 200, JSON.stringify(all.body));
      const ids = all.body.tasks.map((t) => t.task_id);
      assert.ok(ids.length >= 2, `${ids}`);

      await open('/deployments/python-workflow/tasks');
      await page.waitForFunction(([sel, n]) => document.querySelectorAll(sel).length === n, [tid('task-row'), ids.length]);
      assert.deepEqual(await attrs(tid('task-row'), 'data-task-id'), ids);
      assert.equal(await page.locator(tid('tasks-older')).isVisible(), false);

      await page.selectOption(tid('tasks-status'), 'cancelled');
      await page.waitForFunction(() => location.hash.includes('status=cancelled'));
      await page.waitForFunction(
        (sel) => {
          const rows = [...document.querySelectorAll(sel)];
          return rows.length >= 1 && rows.every((r) => r.dataset.status === 'cancelled');
        },
        tid('task-row'),
      );
      assert.deepEqual(await attrs(tid('task-row'), 'data-service'), ['slow_workflow']);

      await open('/deployments/python-workflow/tasks?service=approval_workflow');
      await page.waitForFunction(
        (sel) => {
          const rows = [...document.querySelectorAll(sel)];
          return rows.length >= 1 && rows.every((r) => r.dataset.service === 'approval_workflow');
        },
        tid('task-row'),
      );

      // One task to a page: Older brings the next, until there is none.
      await open('/deployments/python-workflow/tasks?limit=1');
      await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 1, tid('task-row'));
      for (let n = 2; n <= ids.length; n++) {
        await page.locator(tid('tasks-older')).waitFor({ state: 'visible' });
        await page.click(tid('tasks-older'));
        await page.waitForFunction(([sel, k]) => document.querySelectorAll(sel).length === k, [tid('task-row'), n]);
      }
      assert.deepEqual(await attrs(tid('task-row'), 'data-task-id'), ids);
      // A full last page has a `next` whose page is empty: Older then disappears.
      await page.waitForFunction(
        ([sel, k]) => {
          const older = document.querySelector('[data-testid="tasks-older"]');
          if (older && !older.hidden && !older.disabled) older.click();
          return older && older.hidden && document.querySelectorAll(sel).length === k;
        },
        [tid('task-row'), ids.length],
      );
    }));

  test('the logs page shows the last lines, appends new ones, and stops', STEP, () =>
    timed('logs', async () => {
      await open('/deployments/quickstart/services/echo/logs');
      await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.state === 'following', tid('logs-state'));
      await page.waitForFunction((sel) => /POST \/tasks/.test(document.querySelector(sel)?.textContent || ''), tid('logs-output'));
      const lines = Number(await page.locator(tid('logs-output')).getAttribute('data-lines'));
      const run = await server.api('POST', '/deployments/quickstart/tasks/run', {
        json: { input: JSON.stringify({ message: 'logged' }) },
      });
      assert.equal(run.status, 200, JSON.stringify(run.body));
      await page.waitForFunction(
        ([sel, n]) => Number(document.querySelector(sel)?.dataset.lines) > n,
        [tid('logs-output'), lines],
        { timeout: 15_000 },
      );
      await page.click(tid('logs-stop'));
      await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.state === 'stopped', tid('logs-state'));
    }));

  test('the sessions page lists sessions newest first, with their tasks, paged with Older', STEP, () =>
    timed('sessions', async () => {
      const all = await server.api('GET', '/deployments/python-workflow/sessions/search?limit=1000');
      assert.equal(all.status, 200, JSON.stringify(all.body));
      const ids = all.body.sessions.map((s) => s.session_id);
      assert.ok(ids.length >= 2, `${ids}`);
      await open('/deployments/python-workflow/sessions');
      await page.waitForFunction(([sel, n]) => document.querySelectorAll(sel).length === n, [tid('session-row'), ids.length]);
      assert.deepEqual(await attrs(tid('session-row'), 'data-session-id'), ids);
      const withTasks = all.body.sessions.find((s) => s.task_ids.length > 0);
      const row = page.locator(`${tid('session-row')}[data-session-id="${withTasks.session_id}"]`);
      await row.locator(tid('session-tasks-toggle')).click();
      await row.locator(`${tid('session-tasks')} li .badge`).first().waitFor();
      assert.match(await row.locator(tid('session-tasks')).innerText(), new RegExp(withTasks.task_ids[0]));

      await open('/deployments/python-workflow/sessions?limit=1');
      await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 1, tid('session-row'));
      await page.click(tid('sessions-older'));
      await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 2, tid('session-row'));
      assert.deepEqual(await attrs(tid('session-row'), 'data-session-id'), ids.slice(0, 2));
    }));

  test('a graph service: its graph drawn on the deployment page, then the run of a task over it, a human answering', STEP, () =>
    timed('graph', async () => {
      // The example's binary as the service's command (as the graph scenario deploys it); the
      // service keeps its runs in a SQLite file of its data folder.
      const dir = fs.mkdtempSync(path.join(server.root, 'graphs-'));
      const file = path.join(dir, 'graphs.yaml');
      fs.writeFileSync(
        file,
        `name: graphs\nservices:\n  planner:\n    name: Trip planner\n    command: ${JSON.stringify(graphServiceBinary())}\n`,
      );
      const deployed = await server.deploy(file);
      assert.equal(deployed.status, 200, JSON.stringify(deployed.body));
      await server.waitReady('graphs', 60_000);
      const text = await server.api('GET', '/deployments/graphs/services/planner/graph');
      assert.equal(text.status, 200, JSON.stringify(text.body));
      assert.match(text.body, /^stateDiagram-v2/m);
      const nodes = ['Book', 'Draft', 'Research', 'Review'];

      // Mermaid is loaded only for a graph: none was drawn yet (the other services have none).
      assert.equal(await page.locator('script[src*="mermaid"]').count(), 0);
      // The deployment page draws the graph, without a run.
      await open('/deployments/graphs');
      const planner = `${tid('service-graph')}[data-service="planner"]`;
      await page.locator(`${planner} ${tid('graph-svg')} svg`).waitFor();
      const drawn = await page.locator(`${planner} ${tid('graph-svg')}`).innerText();
      for (const node of nodes) assert.match(drawn, new RegExp(`\\b${node}\\b`), drawn);
      assert.match(drawn, /approved/, 'the edges are labelled');
      assert.match(drawn, /Asks a human to approve the draft\./, 'the nodes have their notes');
      assert.deepEqual(await runClasses(planner), { visited: [], current: [], failed: [], fills: {} });
      assert.equal(await page.locator(`${planner} ${tid('graph-legend')}`).count(), 0);
      // The Mermaid text, under its <details>.
      assert.equal(await page.locator(`${planner} ${tid('graph-source')}`).getAttribute('open'), null);
      assert.equal(await page.locator(`${planner} ${tid('graph')}`).textContent(), text.body);

      // A task: it stops at the review, which asks a human; the diagram shows where it is.
      const taskId = await runFromDeploymentPage('graphs', 'planner', '{"city": "Lisbon", "nights": 2}');
      await page.locator(tid('hitl-form')).waitFor();
      assert.match(await page.locator(tid('hitl-request')).innerText(), /day 2 in Lisbon/);
      const view = tid('graph-view');
      const waiting = await waitRunClasses(view, { visited: ['Draft', 'Research'], current: ['Review'] });
      assert.equal(waiting.fills.visited, 'rgb(200, 230, 201)', JSON.stringify(waiting));
      assert.equal(waiting.fills.current, 'rgb(253, 255, 50)', JSON.stringify(waiting));
      assert.match(await page.locator(tid('graph-legend')).innerText(), /went through[\s\S]*is at/);
      await screenshot('graph.png');

      // The answer, from the form, as a JSON value: the task books the trip.
      await page.check(tid('hitl-json'));
      await page.fill(tid('hitl-input'), '{"approve": true}');
      await page.click(tid('hitl-send'));
      await page.locator(tid('task-result')).waitFor();
      assert.equal((await page.locator(tid('task-result')).innerText()).trim(), 'booked 2 nights in Lisbon');
      await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.status === 'succeeded', tid('task-status'));

      // At the end, every state it went through is marked, as the service's text says.
      const done = await waitRunClasses(view, { visited: nodes });
      assert.equal(done.fills.visited, 'rgb(200, 230, 201)', JSON.stringify(done));
      const run = await server.api('GET', `/deployments/graphs/services/planner/graph?task_id=${taskId}`);
      assert.equal(run.status, 200, JSON.stringify(run.body));
      for (const node of nodes) assert.match(run.body, new RegExp(`^class ${node} visited$`, 'm'), run.body);
      await page.waitForFunction(
        ([sel, want]) => document.querySelector(sel)?.textContent === want,
        [`${view} ${tid('graph')}`, run.body],
      );
      const svgText = await page.locator(`${view} ${tid('graph-svg')}`).innerText();
      for (const node of nodes) assert.match(svgText, new RegExp(`\\b${node}\\b`), svgText);
      // Mermaid was loaded once, for all the diagrams drawn.
      assert.deepEqual(
        await page.$$eval('script[src]', (scripts) => scripts.map((s) => new URL(s.src).pathname).filter((p) => p.includes('mermaid'))),
        ['/console/mermaid.min.js'],
      );

      // A text Mermaid cannot draw: the error and the text, never a blank.
      const broken = 'stateDiagram-v2\n  Research --> --> Draft\n';
      const failedDraw = await page.evaluate(async (t) => {
        const { drawGraph } = await import('/console/graph.js');
        const slot = document.createElement('div');
        document.body.appendChild(slot);
        try {
          await drawGraph(slot, t);
          return {
            state: slot.dataset.state,
            error: slot.querySelector('[data-testid="graph-render-error"]')?.textContent,
            source: slot.querySelector('[data-testid="graph"]')?.textContent,
            open: slot.querySelector('[data-testid="graph-source"]')?.open,
            svg: slot.querySelectorAll('svg').length,
          };
        } finally {
          slot.remove();
        }
      }, broken);
      assert.equal(failedDraw.state, 'failed', JSON.stringify(failedDraw));
      assert.match(failedDraw.error, /^The graph could not be drawn: \S/, JSON.stringify(failedDraw));
      assert.deepEqual([failedDraw.source, failedDraw.open, failedDraw.svg], [broken, true, 0]);
      // Mermaid leaves nothing of the failed draw in the page.
      assert.equal(await page.locator('body > [id^="ddeployd-graph-"], body > svg[id^="deployd-graph-"]').count(), 0);

      // A service without a graph shows none (its graph request answers 404).
      const asked = page.waitForResponse((r) => new URL(r.url()).pathname === '/deployments/quickstart/services/echo/graph');
      await open('/deployments/quickstart');
      assert.equal((await asked).status(), 404);
      await page.locator(`${tid('service-row')}[data-service="echo"]`).waitFor();
      await sleep(300);
      assert.equal(await page.locator(tid('service-graph')).count(), 0);
      assert.equal(await page.locator(`${tid('deployment-graphs')}`).isVisible(), false);
      assert.deepEqual(cspViolations, []);
    }));

  test('a failed reload, then a rollback from the revisions page; a task runs again', { timeout: 240_000 }, () =>
    timed('revisions', async () => {
      // A reload whose command cannot start fails; the old version serves on.
      const good = fs.readFileSync(QUICKSTART, 'utf8');
      const broken = good.replace('command: python3 echo.py', 'command: python3 missing.py');
      assert.notEqual(broken, good);
      const reload = await server.deploy(QUICKSTART, { reload: true, text: broken, wait: true });
      assert.ok(reload.status >= 400, `the broken reload answered ${reload.status}: ${JSON.stringify(reload.body)}`);
      assert.match(reload.body.detail, /echo/);
      const still = await server.api('POST', '/deployments/quickstart/tasks/run', {
        json: { input: JSON.stringify({ message: 'still' }) },
      });
      assert.deepEqual([still.status, still.body], [200, 'Message received: still']);

      const revisions = (await server.api('GET', '/deployments/quickstart/revisions')).body;
      assert.equal(revisions[0].outcome, 'failed', JSON.stringify(revisions));
      const target = revisions.find((r) => r.outcome === 'deployed');
      assert.ok(target, JSON.stringify(revisions));

      await open('/deployments/quickstart/revisions');
      await page.waitForFunction(([sel, n]) => document.querySelectorAll(sel).length === n, [tid('revision-row'), revisions.length]);
      const first = page.locator(tid('revision-row')).first();
      assert.equal(await first.getAttribute('data-outcome'), 'failed');
      assert.match(await first.locator(tid('revision-error')).innerText(), /echo/);
      // The file of the failed revision is the broken one.
      await first.locator(tid('revision-file-toggle')).click();
      await page.locator(tid('revision-file')).waitFor();
      assert.match(await page.locator(tid('revision-file')).innerText(), /missing\.py/);

      const row = page.locator(`${tid('revision-row')}[data-revision="${target.revision}"]`);
      await row.locator(tid('rollback-button')).click();
      await row.locator(tid('rollback-confirm')).click();
      await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.state === 'done', tid('rollback-status'), {
        timeout: 120_000,
      });
      await page.waitForFunction(
        ([sel, n]) => {
          const top = document.querySelector(sel);
          return (
            document.querySelectorAll(sel).length === n + 1 &&
            top.dataset.kind === 'rollback' &&
            top.dataset.outcome === 'deployed'
          );
        },
        [tid('revision-row'), revisions.length],
      );
      assert.match(await page.locator(tid('revision-row')).first().innerText(), new RegExp(`rollback of ${target.revision}`));
      await page.waitForFunction(
        (sel) =>
          document.querySelector(`${sel} [data-testid="service-row"][data-service="echo"]`)?.dataset.phase === 'ready' &&
          document.querySelector(`${sel} [data-testid="service-stage"]`)?.dataset.state === 'done',
        tid('deployment-services'),
      );
      await screenshot('revisions.png');

      // A task runs again, from the page.
      await runFromDeploymentPage('quickstart', 'echo', '{"message": "after the rollback"}');
      await page.locator(tid('task-result')).waitFor();
      assert.equal((await page.locator(tid('task-result')).innerText()).trim(), 'Message received: after the rollback');

      // A rollback that fails (to the broken revision) shows the server's error; the good
      // version serves on.
      const broke = revisions[0].revision;
      await open('/deployments/quickstart/revisions');
      const brokenRow = page.locator(`${tid('revision-row')}[data-revision="${broke}"]`);
      await brokenRow.locator(tid('rollback-button')).click();
      await brokenRow.locator(tid('rollback-confirm')).click();
      await page.locator(tid('rollback-error')).waitFor({ timeout: 120_000 });
      assert.match(await page.locator(tid('rollback-error')).innerText(), /\d{3}: .*echo/s);
      const after = await server.api('POST', '/deployments/quickstart/tasks/run', {
        json: { input: JSON.stringify({ message: 'served' }) },
      });
      assert.deepEqual([after.status, after.body], [200, 'Message received: served']);
    }));

  test('without a token configured, the console never asks for one', STEP, () =>
    timed('no token', async () => {
      const bare = await Deployd.start({ withToken: false });
      const tab = await browser.context.newPage();
      tab.on('pageerror', (err) => pageErrors.push(err.message));
      try {
        await tab.goto(`${bare.url}/console/`);
        await tab.locator(tid('deployments-empty')).waitFor({ state: 'visible' });
        await tab.locator(tid('health')).filter({ hasText: 'Healthy' }).waitFor();
        assert.equal(await tab.locator(tid('token-overlay')).isVisible(), false);
        assert.equal(await tab.locator(tid('token-forget')).isVisible(), false);
      } finally {
        await tab.close();
        await bare.stop();
      }
    }));

  test('no uncaught error in the page, nothing refused by its Content-Security-Policy', () => {
    assert.deepEqual(pageErrors, []);
    assert.deepEqual(cspViolations, []);
  });
});
