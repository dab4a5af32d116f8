// The console's pages in headless Chromium, each loaded --loads times from navigation until its
// data is on screen; prints {"pages": [{"name", "median", "max", "loads": [ms…]}]} on stdout.
// `cargo xtask bench console` runs it (through run-bench.sh) against a deployd it filled:
//
//   node bench.mjs --base http://127.0.0.1:PORT --deployment NAME --task ID --session ID [--loads 5]
//       [--service parked (the tasks page filtered by it)] [--logs-service echo]
//
// With DEPLOYD_TOKEN set, the token goes into the tab's sessionStorage first, as the token form
// would put it.

import { launchBrowser } from './harness.js';

function options(argv) {
  const out = { loads: 5, service: 'parked', 'logs-service': 'echo' };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    out[key] = argv[i + 1];
  }
  for (const need of ['base', 'deployment', 'task', 'session']) {
    if (!out[need]) throw new Error(`--${need} is missing`);
  }
  out.loads = Number(out.loads) || 5;
  return out;
}

const opts = options(process.argv.slice(2));
const d = encodeURIComponent(opts.deployment);
// What shows a page's data, as selectors (the page's CSP allows no eval, so the condition is
// data for one function): every group must hold; `any` holds when one of its selectors matches,
// `every` when there are `of` elements and each has a `has` inside.
const rows = (row, none) => ({ any: [`[data-testid="${row}"]`, `[data-testid="${none}"]:not([hidden])`] });
const revisions = { any: ['[data-testid="revisions-table"]', '[data-testid="revisions-empty"]'] };
const services = { any: ['[data-testid="deployment-services"] [data-testid="service-row"]'] };

const PAGES = [
  ['deployments', '/deployments', [{ every: { of: '[data-testid="deployment-card"]', has: '[data-testid="services-table"]' } }]],
  ['deployment', `/deployments/${d}`, [services, { any: ['#run-service option'] }, revisions]],
  ['tasks', `/deployments/${d}/tasks`, [rows('task-row', 'tasks-empty')]],
  ['tasks, queued', `/deployments/${d}/tasks?status=queued`, [rows('task-row', 'tasks-empty')]],
  [
    'tasks, one service',
    `/deployments/${d}/tasks?service=${encodeURIComponent(opts.service)}`,
    [rows('task-row', 'tasks-empty')],
  ],
  [
    'task',
    `/deployments/${d}/tasks/${encodeURIComponent(opts.task)}`,
    [{ any: ['[data-testid="task-status"][data-status]'] }, { any: ['[data-testid="task-outcome"] .outcome'] }],
  ],
  ['sessions', `/deployments/${d}/sessions`, [rows('session-row', 'sessions-empty')]],
  ['revisions', `/deployments/${d}/revisions`, [services, revisions]],
  [
    'logs',
    `/deployments/${d}/services/${encodeURIComponent(opts['logs-service'])}/logs`,
    [{ any: ['[data-testid="logs-output"][data-lines]:not([data-lines="0"])'] }],
  ],
];

// In the page: once the data shows (or an error does, which fails the benchmark at once), the
// time since the navigation began (performance.now() counts from the page's time origin).
function shown(groups) {
  if (document.querySelector('main .error')) return performance.now();
  const ready = groups.every((g) => {
    if (g.any) return g.any.some((sel) => document.querySelector(sel));
    const all = [...document.querySelectorAll(g.every.of)];
    return all.length > 0 && all.every((el) => el.querySelector(g.every.has));
  });
  return ready ? performance.now() : false;
}

const browser = await launchBrowser();
let failed = false;
try {
  const page = browser.context.pages()[0] || (await browser.context.newPage());
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  if (process.env.DEPLOYD_TOKEN) {
    await page.goto(`${opts.base}/console/`);
    await page.evaluate((t) => sessionStorage.setItem('deployd.console.token', t), process.env.DEPLOYD_TOKEN);
  }
  const results = [];
  for (const [name, route, groups] of PAGES) {
    const loads = [];
    for (let n = 0; n < opts.loads; n++) {
      // A full navigation each time, from a small page of the same origin (from about:blank,
      // Chromium would start a new renderer process and time that too).
      await page.goto(`${opts.base}/status/`);
      await page.goto(`${opts.base}/console/#${route}`, { waitUntil: 'commit' });
      const at = await page.waitForFunction(shown, groups, { polling: 'raf', timeout: 30_000 }).catch(async (err) => {
        const shown = await page.locator('main').innerText().catch(() => '');
        throw new Error(`page ${name} (${route}) showed no data: ${err.message}\n${shown.slice(0, 800)}`);
      });
      const error = await page.$('main .error');
      if (error) throw new Error(`page ${name} (${route}) shows an error: ${await error.innerText()}`);
      loads.push(Math.round((await at.jsonValue()) * 10) / 10);
    }
    const sorted = [...loads].sort((a, b) => a - b);
    results.push({ name, route, median: sorted[Math.floor(sorted.length / 2)], max: sorted[sorted.length - 1], loads });
    console.error(`bench: ${name}: ${loads.join(', ')} ms`);
  }
  if (errors.length) throw new Error(`uncaught errors in the page: ${errors.join('; ')}`);
  process.stdout.write(`${JSON.stringify({ pages: results })}\n`);
} catch (err) {
  failed = true;
  console.error(`bench: ${err.stack || err.message}`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
