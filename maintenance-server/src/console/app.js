// vpnnat technician console. Plain JavaScript, no build step, no CDN.
// Live updates: a long-poll on /api/v1/events (answered as soon as anything
// a technician can see changes). State-changing calls carry the session's
// CSRF token in X-CSRF-Token; the session itself is an HttpOnly cookie.
// All data is inserted as text (textContent), never as HTML.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const CSRF_KEY = 'vpnnat.csrf';
  let csrf = sessionStorage.getItem(CSRF_KEY);
  let version = 0;
  let pollGen = 0;
  let events = null;
  let seen = null; // request ids already shown (null before the first render)
  let auditOldest = null;
  // Closed requests older than the live feed's newest ones, paged on demand
  // (the feed always carries every open request).
  let olderClosed = [];
  let olderClosedDone = false;
  const CLOSED_PAGE = 100;
  let activeTab = 'requests';

  const STATE_LABEL = {
    waiting: 'waiting', in_progress: 'in progress', ended: 'ended', revoked: 'revoked', expired: 'expired',
  };

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || ('HTTP ' + status));
      this.status = status;
      this.body = body;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (method !== 'GET' && csrf) headers['X-CSRF-Token'] = csrf;
    const r = await fetch(path, {
      method, headers, credentials: 'same-origin', cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await r.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = { message: text }; }
    }
    if (!r.ok) throw new ApiError(r.status, data);
    return data;
  }

  const sleep = (ms) => new Promise((res) => setTimeout(res, ms));

  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (k === 'class') e.className = v;
        else if (k === 'dataset') Object.assign(e.dataset, v);
        else if (k === 'text') e.textContent = v;
        else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
        else e.setAttribute(k, v);
      }
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function pad(n) { return String(n).padStart(2, '0'); }
  function fmtTime(ms) {
    if (ms === null || ms === undefined) return '';
    const d = new Date(ms);
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' +
      pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }

  let toastTimer = null;
  function toast(msg, bad) {
    const t = $('toast');
    t.textContent = msg;
    t.className = bad ? 'toast bad' : 'toast';
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, bad ? 6000 : 2500);
  }

  function setLive(on) {
    const l = $('live');
    l.className = on ? 'live on' : 'live off';
    $('live-text').textContent = on ? 'live' : 'reconnecting';
  }

  // ---------------------------------------------------------------- views

  function showLogin(message) {
    pollGen++;
    csrf = null;
    sessionStorage.removeItem(CSRF_KEY);
    $('app-view').hidden = true;
    $('session').hidden = true;
    $('login-view').hidden = false;
    const err = $('login-error');
    err.textContent = message || '';
    err.hidden = !message;
    $('login-password').value = '';
    $('login-name').focus();
  }

  function showApp(name) {
    $('login-view').hidden = true;
    $('app-view').hidden = false;
    $('session').hidden = false;
    $('who').textContent = name;
    version = 0;
    events = null;
    seen = null;
    olderClosed = [];
    olderClosedDone = false;
    const gen = ++pollGen;
    pollLoop(gen);
  }

  async function pollLoop(gen) {
    let delay = 500;
    while (gen === pollGen) {
      try {
        const ev = await api('GET', '/api/v1/events?after=' + version + '&wait_ms=25000');
        if (gen !== pollGen) return;
        setLive(true);
        delay = 500;
        if (!events || ev.version !== version) {
          version = ev.version;
          events = ev;
          render();
          if (activeTab === 'audit') loadAudit(true);
        }
      } catch (e) {
        if (gen !== pollGen) return;
        if (e.status === 401) { showLogin('Your session ended. Please sign in again.'); return; }
        setLive(false);
        await sleep(delay);
        delay = Math.min(delay * 2, 5000);
      }
    }
  }

  // ---------------------------------------------------------------- rendering

  function matchesFilter(r) {
    const st = $('filter-state').value;
    if (st === 'open' && !(r.state === 'waiting' || r.state === 'in_progress')) return false;
    if (st && st !== 'open' && r.state !== st) return false;
    const q = $('filter-text').value.trim().toLowerCase();
    if (!q) return true;
    const hay = [r.acceptance_number, r.site_name, r.requester_name, r.phone, r.content, r.global_address || '',
      ...r.terminals.map((t) => t.name + ' ' + (t.nat_address || ''))].join(' ').toLowerCase();
    return hay.includes(q);
  }

  function requestRow(r, fresh) {
    const nat = el('td', { class: 'nat mono' });
    for (const t of r.terminals) {
      nat.append(el('div', null, t.nat_address || '—', ' ', el('span', { class: 't', text: t.name })));
    }
    const actions = el('td', { class: 'actions' });
    if (r.state === 'waiting') {
      actions.append(el('button', { type: 'button', class: 'act start', dataset: { id: r.id }, onclick: () => act(r, 'start') }, 'Start'));
    }
    if (r.state === 'waiting' || r.state === 'in_progress') {
      actions.append(el('button', { type: 'button', class: 'act end', dataset: { id: r.id }, onclick: () => act(r, 'end') }, 'End'));
    }
    return el('tr', { class: fresh ? 'fresh' : '', dataset: { id: r.id, state: r.state } },
      el('td', { class: 'mono', text: r.acceptance_number }),
      el('td', { text: r.site_name, title: 'site ' + r.site_id }),
      el('td', { class: 'mono', text: r.global_address || '' }),
      el('td', { text: r.requester_name }),
      el('td', null, el('span', { class: 'lv-' + r.level, text: r.level })),
      el('td', { class: 'mono', text: r.phone }),
      el('td', null, el('span', { class: 'ur-' + r.urgency, text: r.urgency })),
      el('td', { class: 'content', text: r.content }),
      el('td', { class: 'mono', text: fmtTime(r.received_at), title: r.expires_at ? 'expires ' + fmtTime(r.expires_at) : '' }),
      nat,
      el('td', { class: 'state' }, el('span', { class: 'pill st-' + r.state, text: STATE_LABEL[r.state] || r.state })),
      actions);
  }

  function isOpen(r) { return r.state === 'waiting' || r.state === 'in_progress'; }

  // The feed's requests, then the paged older closed ones it does not carry.
  function allRequests() {
    const ids = new Set(events.requests.map((r) => r.id));
    return events.requests.concat(olderClosed.filter((r) => !ids.has(r.id)));
  }

  async function loadOlderClosed() {
    if (!events) return;
    const closed = allRequests().filter((r) => !isOpen(r));
    const oldest = closed.length ? Math.min(...closed.map((r) => r.id)) : null;
    const q = oldest === null ? '' : '&before=' + oldest;
    try {
      const page = await api('GET', '/api/v1/requests?state=closed&limit=' + CLOSED_PAGE + q);
      olderClosed = olderClosed.concat(page);
      olderClosedDone = page.length < CLOSED_PAGE;
      render();
    } catch (e) {
      if (e.status === 401) { showLogin('Your session ended. Please sign in again.'); return; }
      toast('Could not load older requests: ' + e.message, true);
    }
  }

  function render() {
    if (!events) return;
    const reqs = allRequests();
    const tbody = document.querySelector('#requests tbody');
    const rows = [];
    const firstTime = seen === null;
    if (firstTime) seen = new Set();
    for (const r of reqs) {
      const fresh = !firstTime && !seen.has(r.id);
      seen.add(r.id);
      if (matchesFilter(r)) rows.push(requestRow(r, fresh));
    }
    tbody.replaceChildren(...rows);
    $('requests-empty').hidden = rows.length > 0;
    $('requests-hint').textContent = rows.length + ' of ' + reqs.length + ' shown';
    // The feed carries the newest CLOSED_PAGE closed requests; fewer means there are no older ones.
    $('requests-more').hidden = olderClosedDone ||
      events.requests.filter((r) => !isOpen(r)).length < CLOSED_PAGE;

    const open = reqs.filter((r) => r.state === 'waiting' || r.state === 'in_progress');
    $('count-waiting').textContent = reqs.filter((r) => r.state === 'waiting').length;
    $('count-progress').textContent = reqs.filter((r) => r.state === 'in_progress').length;
    const addrs = new Set();
    for (const r of open) for (const t of r.terminals) if (t.nat_address) addrs.add(t.nat_address);
    $('count-addresses').textContent = addrs.size;
    const dayAgo = Date.now() - 86400000;
    const recent = events.failures.filter((f) => f.received_at >= dayAgo).length;
    $('count-failures').textContent = recent;
    const badge = $('failures-badge');
    badge.textContent = recent;
    badge.hidden = recent === 0;

    const byId = new Map(reqs.map((r) => [r.id, r]));
    const ftbody = document.querySelector('#failures tbody');
    ftbody.replaceChildren(...events.failures.map((f) => {
      const req = f.request_id ? byId.get(f.request_id) : null;
      return el('tr', { dataset: { id: f.id } },
        el('td', { class: 'mono', text: fmtTime(f.received_at) }),
        el('td', { text: f.site_name }),
        el('td', { class: 'mono', text: f.code }),
        el('td', { class: 'mono', text: f.terminal || '' }),
        el('td', { class: 'content', text: f.detail }),
        el('td', { class: 'mono', text: req ? req.acceptance_number : (f.request_id ? '#' + f.request_id : '') }));
    }));
    $('failures-empty').hidden = events.failures.length > 0;
  }

  async function act(r, what) {
    const buttons = document.querySelectorAll('button.act[data-id="' + r.id + '"]');
    buttons.forEach((b) => { b.disabled = true; });
    try {
      const view = await api('POST', '/api/v1/requests/' + r.id + '/' + what);
      if (events) {
        events.requests = events.requests.map((x) => (x.id === view.id ? view : x));
        render();
      }
      toast((what === 'start' ? 'Started ' : 'Ended ') + view.acceptance_number);
    } catch (e) {
      if (e.status === 401) { showLogin('Your session ended. Please sign in again.'); return; }
      toast('Could not ' + what + ' ' + r.acceptance_number + ': ' + e.message, true);
      buttons.forEach((b) => { b.disabled = false; });
    }
  }

  async function loadAudit(reset) {
    try {
      const q = reset || auditOldest === null ? '' : '&before=' + auditOldest;
      const entries = await api('GET', '/api/v1/audit?limit=100' + q);
      const tbody = document.querySelector('#audit tbody');
      const rows = entries.map((a) => el('tr', null,
        el('td', { class: 'mono muted', text: a.id }),
        el('td', { class: 'mono', text: fmtTime(a.at) }),
        el('td', { class: 'mono', text: a.actor }),
        el('td', { class: 'mono', text: a.action }),
        el('td', { class: 'mono', text: a.object }),
        el('td', { class: 'content', text: a.detail })));
      if (reset) tbody.replaceChildren(...rows); else tbody.append(...rows);
      if (entries.length) auditOldest = entries[entries.length - 1].id;
      $('audit-more').hidden = entries.length < 100;
    } catch (e) {
      if (e.status === 401) { showLogin('Your session ended. Please sign in again.'); return; }
      toast('Could not load the audit log: ' + e.message, true);
    }
  }

  function selectTab(name) {
    activeTab = name;
    for (const t of document.querySelectorAll('.tab')) t.classList.toggle('active', t.dataset.tab === name);
    for (const p of ['requests', 'failures', 'audit']) $('panel-' + p).hidden = p !== name;
    if (name === 'audit') loadAudit(true);
  }

  // ---------------------------------------------------------------- wiring

  document.addEventListener('DOMContentLoaded', async () => {
    $('login-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const btn = $('login-submit');
      btn.disabled = true;
      $('login-error').hidden = true;
      try {
        const r = await api('POST', '/api/v1/login', {
          name: $('login-name').value.trim(),
          password: $('login-password').value,
        });
        csrf = r.csrf_token;
        sessionStorage.setItem(CSRF_KEY, csrf);
        $('login-password').value = '';
        showApp(r.name);
      } catch (e) {
        const msg = e.status === 401 ? 'Wrong name or password.'
          : e.status === 429 ? 'Too many failed sign-ins. Wait a minute and try again.'
            : 'Sign-in failed: ' + e.message;
        const err = $('login-error');
        err.textContent = msg;
        err.hidden = false;
      } finally {
        btn.disabled = false;
      }
    });
    $('logout').addEventListener('click', async () => {
      try { await api('POST', '/api/v1/logout'); } catch (_) { /* the session is gone either way */ }
      showLogin('');
    });
    for (const t of document.querySelectorAll('.tab')) t.addEventListener('click', () => selectTab(t.dataset.tab));
    $('filter-state').addEventListener('change', render);
    $('filter-text').addEventListener('input', render);
    $('audit-refresh').addEventListener('click', () => loadAudit(true));
    $('audit-more').addEventListener('click', () => loadAudit(false));
    $('requests-more').addEventListener('click', loadOlderClosed);

    if (!csrf) { showLogin(''); return; }
    try {
      const me = await api('GET', '/api/v1/me');
      showApp(me.name);
    } catch (_) {
      showLogin('');
    }
  });
})();
