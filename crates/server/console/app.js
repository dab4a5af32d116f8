// deployd's console: a hash router over the pages, the token form, the header.

import { getJSON, getToken, setAuthHandler, setToken } from './api.js';
import {
  deploymentPage,
  deploymentsPage,
  logsPage,
  revisionsPage,
  sessionsPage,
  tasksPage,
} from './pages.js';
import { taskPage } from './task.js';
import { errorBox, h, link, replace } from './ui.js';

const routes = [
  [/^\/?$/, deploymentsPage],
  [/^\/deployments\/?$/, deploymentsPage],
  [/^\/deployments\/([^/]+)\/?$/, deploymentPage],
  [/^\/deployments\/([^/]+)\/services\/([^/]+)\/logs\/?$/, logsPage],
  [/^\/deployments\/([^/]+)\/tasks\/?$/, tasksPage],
  [/^\/deployments\/([^/]+)\/tasks\/([^/]+)\/?$/, taskPage],
  [/^\/deployments\/([^/]+)\/sessions\/?$/, sessionsPage],
  [/^\/deployments\/([^/]+)\/revisions\/?$/, revisionsPage],
];

const main = document.getElementById('main');
const crumbs = document.getElementById('crumbs');
let current = null; // the AbortController of the page shown

function parseHash() {
  let hash = location.hash.replace(/^#/, '');
  if (!hash.startsWith('/')) hash = `/${hash}`;
  const q = hash.indexOf('?');
  const route = q >= 0 ? hash.slice(0, q) : hash;
  const query = new URLSearchParams(q >= 0 ? hash.slice(q + 1) : '');
  return { route, query };
}

function render() {
  current?.abort();
  const controller = new AbortController();
  current = controller;
  const { route, query } = parseHash();
  const root = h('div', { class: 'page' });
  replace(main, root);
  for (const [pattern, page] of routes) {
    const match = route.match(pattern);
    if (!match) continue;
    let params;
    try {
      params = match.slice(1).map((p) => decodeURIComponent(p));
    } catch {
      params = match.slice(1);
    }
    const ctx = {
      signal: controller.signal,
      params,
      query,
      setTitle(title, trail = []) {
        document.title = `${title} · deployd`;
        replace(
          crumbs,
          trail.map(([text, to]) => [link(to, text), h('span', { class: 'sep' }, ' › ')]),
          h('span', { testid: 'page-title' }, title),
        );
      },
    };
    try {
      page(root, ctx);
    } catch (err) {
      root.append(errorBox(err));
    }
    return;
  }
  document.title = 'Not found · deployd';
  replace(crumbs, h('span', { testid: 'page-title' }, 'Not found'));
  root.append(errorBox(`No page at ${route}.`, 'not-found'), link('/deployments', 'All deployments'));
}

// The token form: shown on a 401, resolves once a token is entered; Cancel leaves the token
// unset and the request fails with the server's message.
const overlay = document.getElementById('token-overlay');
const tokenForm = document.getElementById('token-form');
const tokenInput = document.getElementById('token-input');
const tokenMessage = document.getElementById('token-message');
const tokenCancel = document.getElementById('token-cancel');

setAuthHandler(
  (message) =>
    new Promise((resolve, reject) => {
      tokenMessage.textContent = getToken()
        ? `The token was refused (${message}). Enter another.`
        : `deployd asks for a token (${message}).`;
      tokenInput.value = '';
      overlay.hidden = false;
      tokenInput.focus();
      const done = () => {
        overlay.hidden = true;
        tokenForm.removeEventListener('submit', onSubmit);
        tokenCancel.removeEventListener('click', onCancel);
      };
      const onSubmit = (e) => {
        e.preventDefault();
        const token = tokenInput.value.trim();
        if (!token) return;
        setToken(token);
        done();
        updateTokenButton();
        resolve();
      };
      const onCancel = () => {
        done();
        const err = new Error(`401: ${message}`);
        err.status = 401;
        reject(err);
      };
      tokenForm.addEventListener('submit', onSubmit);
      tokenCancel.addEventListener('click', onCancel);
    }),
);

const tokenButton = document.getElementById('token-forget');
function updateTokenButton() {
  tokenButton.hidden = !getToken();
}
tokenButton.addEventListener('click', () => {
  setToken('');
  updateTokenButton();
  render();
});
updateTokenButton();

// The header: the server's name and version (GET /), its health (GET /status/).
async function header() {
  const server = document.getElementById('server');
  try {
    const root = await getJSON('/');
    server.textContent = `${root.name || 'deployd'} ${root.version || ''}`.trim();
  } catch (err) {
    server.textContent = `GET / failed: ${err.message}`;
  }
  const health = document.getElementById('health');
  const check = async () => {
    try {
      const status = await getJSON('/status/');
      health.textContent = status.status;
      health.className = `badge ${status.status === 'Healthy' ? 'badge-good' : 'badge-bad'}`;
    } catch (err) {
      health.textContent = 'unreachable';
      health.className = 'badge badge-bad';
      health.title = err.message;
    }
  };
  await check();
  setInterval(check, 15000);
}

window.addEventListener('hashchange', render);
if (!location.hash) history.replaceState(null, '', '#/deployments');
render();
header();
