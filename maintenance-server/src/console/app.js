// vpnnat technician console. Plain JavaScript, no build step, no CDN.
// Live updates: a long-poll on /api/v1/events (answered as soon as anything
// a technician can see changes). State-changing calls carry the session's
// CSRF token in X-CSRF-Token; the session itself is an HttpOnly cookie that
// every tab of the browser shares, so the token is kept in localStorage,
// shared by the tabs too (a sign-in in one tab replaces the session of all).
// All data is inserted as text (textContent), never as HTML.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const CSRF_KEY = 'vpnnat.csrf';
  const NAME_KEY = 'vpnnat.name';
  const TITLE = 'vpnnat · Maintenance console';
  let csrf = localStorage.getItem(CSRF_KEY);
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
  let live = false;
  // Requests that closed while this console watched them: kept in the list,
  // marked, until the technician dismisses them (id → note).
  const flagged = new Map();
  // Requests this console itself is ending (not announced as events).
  const mine = new Set();
  // Problem descriptions shown in full.
  const expanded = new Set();
  // NAT addresses seen while a request was open (id → [[terminal, address]]).
  const natSeen = new Map();

  const STATE_LABEL = {
    waiting: 'waiting', in_progress: 'in progress', ended: 'ended', revoked: 'ended by the customer', expired: 'expired',
  };
  const URGENCY_RANK = { emergency: 0, high: 1, normal: 2, low: 3 };
  const FAILURE_LABEL = {
    lan_link_down: 'LAN link down',
    terminal_unreachable: 'Terminal not answering',
    tunnel_down: 'Tunnel to the gateway down',
    other: 'Other problem',
  };
  const ACTION_LABEL = {
    'request.create': 'request received',
    'request.start': 'started the work',
    'request.end': 'ended the work',
    'request.revoke': 'customer ended access',
    'request.expire': 'request expired',
    'technician.login': 'signed in',
    'technician.logout': 'signed out',
    'technician.login_failed': 'failed sign-in',
    'failure.report': 'failure reported',
    'failure.acknowledge': 'acknowledged a failure report',
  };

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || (status ? 'HTTP ' + status : 'the server cannot be reached'));
      this.status = status;
      this.body = body;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (method !== 'GET' && csrf) headers['X-CSRF-Token'] = csrf;
    let r;
    try {
      r = await fetch(path, {
        method, headers, credentials: 'same-origin', cache: 'no-store',
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (_) {
      throw new ApiError(0, null);
    }
    const text = await r.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = { message: text }; }
    }
    if (!r.ok) throw new ApiError(r.status, data);
    return data;
  }

  // The server is down or unreachable (as opposed to refusing the call).
  function unreachable(e) { return e.status === 0 || e.status === 502 || e.status === 503 || e.status === 504; }

  // A refused credential: the session ended, or another tab signed in and
  // replaced it (then this tab's CSRF token is stale). Either way: sign in again.
  function sessionLost(e) {
    if (e.status === 401) {
      showLogin('Your session ended. Please sign in again.');
      return true;
    }
    if (e.status === 403) {
      showLogin('Your sign-in changed in another window or ended. Please sign in again.');
      return true;
    }
    return false;
  }

  const sleep = (ms) => new Promise((res) => setTimeout(res, ms));

  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null) continue;
        if (k === 'class') e.className = v;
        else if (k === 'dataset') Object.assign(e.dataset, v);
        else if (k === 'text') e.textContent = v;
        else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
        else e.setAttribute(k, v);
      }
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  // A table cell whose content is one block (the phone layout puts the
  // column's name beside it).
  function cell(props, ...children) {
    return el('td', props, el('div', { class: 'v' }, ...children));
  }

  function pad(n) { return String(n).padStart(2, '0'); }
  function fmtTime(ms) {
    if (ms === null || ms === undefined) return '';
    const d = new Date(ms);
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' +
      pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }
  function fmtClock(ms) {
    const d = new Date(ms);
    return pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }
  function fmtAge(ms) {
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return 'just now';
    const m = Math.round(s / 60);
    if (m < 60) return m + ' min ago';
    const h = Math.floor(m / 60);
    if (h < 48) return h + ' h ' + (m % 60) + ' min ago';
    return Math.floor(h / 24) + ' days ago';
  }

  // ---------------------------------------------------------------- notices

  // A toast; `sticky` ones stay until dismissed (`key` dismisses the
  // matching row mark too).
  function toast(msg, opts) {
    const o = opts || {};
    const box = $('toasts');
    if (o.key) {
      const old = box.querySelector('[data-key="' + o.key + '"]');
      if (old) old.remove();
    }
    const t = el('div', { class: 'toast' + (o.bad ? ' bad' : '') + (o.sticky ? ' sticky' : ''), dataset: o.key ? { key: o.key } : undefined },
      el('span', { class: 'msg', text: msg }));
    const close = () => {
      t.remove();
      if (o.onDismiss) o.onDismiss();
    };
    t.append(el('button', { type: 'button', class: 'dismiss', 'aria-label': 'Dismiss notice', onclick: close }, '×'));
    box.append(t);
    while (box.children.length > 5) box.firstElementChild.remove();
    if (!o.sticky) setTimeout(() => t.remove(), o.bad ? 8000 : 4000);
  }

  function setLive(on) {
    live = on;
    const l = $('live');
    l.className = on ? 'live on' : 'live off';
    $('live-text').textContent = on ? 'live' : 'offline';
    const banner = $('stale');
    if (on) {
      banner.hidden = true;
      document.body.classList.remove('is-stale');
    } else if (banner.hidden) {
      $('stale-since').textContent = 'since ' + fmtClock(Date.now());
      banner.hidden = false;
      document.body.classList.add('is-stale');
    }
    for (const b of document.querySelectorAll('button.act')) b.disabled = !on;
  }

  // ---------------------------------------------------------------- views

  function showLogin(message) {
    pollGen++;
    csrf = null;
    localStorage.removeItem(CSRF_KEY);
    localStorage.removeItem(NAME_KEY);
    closeDialogs();
    $('app-view').hidden = true;
    $('session').hidden = true;
    $('login-view').hidden = false;
    document.title = TITLE;
    const note = $('login-notice');
    note.textContent = message || '';
    note.hidden = !message;
    setLoginError('');
    $('login-password').value = '';
    $('login-name').focus();
  }

  function setLoginError(msg) {
    const err = $('login-error');
    err.textContent = msg;
    err.hidden = !msg;
    for (const id of ['login-name', 'login-password']) {
      if (msg) $(id).setAttribute('aria-invalid', 'true'); else $(id).removeAttribute('aria-invalid');
    }
  }

  function showApp(name) {
    $('login-view').hidden = true;
    $('app-view').hidden = false;
    $('session').hidden = false;
    $('who').textContent = name;
    $('team').hidden = true;
    // The team decides which sites the feed holds; the server scopes them.
    api('GET', '/api/v1/me').then((me) => {
      $('team').textContent = me.team ? 'team ' + me.team : '';
      $('team').hidden = !me.team;
    }).catch(() => {});
    version = 0;
    events = null;
    seen = null;
    olderClosed = [];
    olderClosedDone = false;
    flagged.clear();
    const gen = ++pollGen;
    pollLoop(gen);
  }

  async function pollLoop(gen) {
    let delay = 500;
    while (gen === pollGen) {
      try {
        // After an outage the first call returns at once, so the console
        // shows that it is live again without waiting for a change.
        const wait = live ? 25000 : 0;
        const ev = await api('GET', '/api/v1/events?after=' + version + '&wait_ms=' + wait);
        if (gen !== pollGen) return;
        if (!live) setLive(true);
        delay = 500;
        if (!events || ev.version !== version) {
          version = ev.version;
          const before = events;
          events = ev;
          announce(before, ev);
          render();
          if (activeTab === 'audit') loadAudit(true);
        }
      } catch (e) {
        if (gen !== pollGen) return;
        if (sessionLost(e)) return;
        if (live || $('stale').hidden) setLive(false);
        await sleep(delay);
        delay = Math.min(delay * 2, 4000);
      }
    }
  }

  // Desktop notifications (the browser's Notification API): offered with a
  // button, since browsers ask for permission only after a user gesture.
  // Each carries a tag per request or report, so that several open tabs
  // show it once.
  function notificationsAvailable() { return 'Notification' in window; }
  function showNotifyButton() {
    $('notify-on').hidden = !notificationsAvailable() || Notification.permission !== 'default';
  }
  function desktop(title, body, tag, requestId) {
    if (!notificationsAvailable() || Notification.permission !== 'granted') return;
    try {
      const n = new Notification(title, { body, tag });
      n.onclick = () => {
        window.focus();
        if (requestId !== undefined) openDetail(requestId, null);
        n.close();
      };
    } catch (e) {
      // Some browsers allow notifications only from a service worker; the
      // in-page notice is shown all the same.
    }
  }

  // What changed between two feeds that a technician must notice.
  function announce(before, now) {
    for (const r of now.requests) {
      if (isOpen(r)) natSeen.set(r.id, r.terminals.filter((t) => t.nat_address).map((t) => [t.name, t.nat_address]));
    }
    if (!before) return;
    const prev = new Map(before.requests.map((r) => [r.id, r]));
    for (const r of now.requests) {
      const p = prev.get(r.id);
      const label = r.acceptance_number + ' (' + r.site_name + ')';
      if (!p) {
        if (isOpen(r)) {
          toast('New request ' + label + ', ' + r.urgency);
          desktop('New request ' + r.acceptance_number,
            r.site_name + ', ' + r.urgency + ': ' + r.content.slice(0, 120), 'vpnnat-request-' + r.id, r.id);
        }
        continue;
      }
      if (isOpen(r) && r.expiry_warned_at && !p.expiry_warned_at) {
        const msg = 'Request ' + label + ' expires at ' + fmtClock(r.expires_at);
        toast(msg, { sticky: true, key: 'x' + r.id });
        desktop('Request ' + r.acceptance_number + ' expires soon',
          r.site_name + ': access ends at ' + fmtClock(r.expires_at), 'vpnnat-expiring-' + r.id, r.id);
      }
      if (!isOpen(p) || isOpen(r)) continue;
      if (mine.has(r.id)) { mine.delete(r.id); continue; }
      const note = r.state === 'revoked' ? 'The customer ended access'
        : r.state === 'expired' ? 'The request expired'
          : 'Ended by another technician';
      flagged.set(r.id, note);
      toast(note + ': ' + label, { sticky: true, key: 'r' + r.id, onDismiss: () => dismiss(r.id) });
    }
    const known = new Set(before.failures.map((f) => f.id));
    for (const f of now.failures) {
      if (f.acknowledged_at) {
        // Taken on (here or by someone else): its notice has done its job.
        const t = document.querySelector('#toasts [data-key="f' + f.id + '"]');
        if (t) t.remove();
        continue;
      }
      if (known.has(f.id)) continue;
      toast('Failure report from ' + f.site_name + ': ' + (FAILURE_LABEL[f.code] || f.code),
        { sticky: true, bad: true, key: 'f' + f.id });
      desktop('Failure report from ' + f.site_name, (FAILURE_LABEL[f.code] || f.code) + (f.detail ? ': ' + f.detail.slice(0, 120) : ''),
        'vpnnat-failure-' + f.id, f.request_id === null || f.request_id === undefined ? undefined : f.request_id);
    }
  }

  function dismiss(id) {
    flagged.delete(id);
    const t = document.querySelector('#toasts [data-key="r' + id + '"]');
    if (t) t.remove();
    render();
  }

  // ---------------------------------------------------------------- rendering

  function matchesFilter(r) {
    if (flagged.has(r.id)) return true;
    const st = $('filter-state').value;
    if (st === 'open' && !isOpen(r)) return false;
    if (st && st !== 'open' && r.state !== st) return false;
    const q = $('filter-text').value.trim().toLowerCase();
    if (!q) return true;
    const hay = [r.acceptance_number, r.site_name, r.requester_name, r.phone, r.content, r.global_address || '',
      ...r.terminals.map((t) => t.name + ' ' + (t.nat_address || ''))].join(' ').toLowerCase();
    return hay.includes(q);
  }

  function sortRequests(list) {
    const by = $('sort').value;
    return list.slice().sort((a, b) => {
      if (by === 'newest') return b.id - a.id;
      // Open before closed; open ones by urgency, then the longest waiting first.
      const oa = isOpen(a) ? 0 : 1;
      const ob = isOpen(b) ? 0 : 1;
      if (oa !== ob) return oa - ob;
      if (oa === 1) return b.id - a.id;
      const ua = URGENCY_RANK[a.urgency] ?? 9;
      const ub = URGENCY_RANK[b.urgency] ?? 9;
      if (ua !== ub) return ua - ub;
      return a.received_at - b.received_at || a.id - b.id;
    });
  }

  // The NAT addresses of a request: its own while open, the ones seen
  // while it was open after its end.
  function natList(r) {
    if (isOpen(r)) return r.terminals.map((t) => [t.name, t.nat_address]);
    const old = new Map(natSeen.get(r.id) || []);
    return r.terminals.map((t) => [t.name, t.nat_address || old.get(t.name) || null]);
  }

  function actionButtons(r, inDetail) {
    const out = [];
    const dis = live ? undefined : 'disabled';
    const k = (what) => r.id + ':' + what + (inDetail ? ':d' : '');
    if (!inDetail) {
      out.push(el('button', { type: 'button', class: 'ghost small details', dataset: { id: r.id, key: k('details') },
        'aria-label': 'Details of ' + r.acceptance_number, onclick: (ev) => openDetail(r.id, ev.currentTarget) }, 'Details'));
    }
    if (r.state === 'waiting') {
      out.push(el('button', { type: 'button', class: 'act start', disabled: dis, dataset: { id: r.id, key: k('start') },
        'aria-label': 'Start ' + r.acceptance_number, onclick: () => act(r, 'start', inDetail) }, 'Start'));
      out.push(el('button', { type: 'button', class: 'act end decline', disabled: dis, dataset: { id: r.id, key: k('end') },
        'aria-label': 'Decline ' + r.acceptance_number, onclick: () => act(r, 'end', inDetail) }, 'Decline'));
    }
    if (r.state === 'in_progress') {
      out.push(el('button', { type: 'button', class: 'act end', disabled: dis, dataset: { id: r.id, key: k('end') },
        'aria-label': 'End ' + r.acceptance_number, onclick: () => act(r, 'end', inDetail) }, 'End'));
    }
    if (!inDetail && flagged.has(r.id)) {
      out.push(el('button', { type: 'button', class: 'ghost small dismiss-row', dataset: { id: r.id, key: k('dismiss') },
        'aria-label': 'Dismiss ' + r.acceptance_number, onclick: () => dismiss(r.id) }, 'Dismiss'));
    }
    return out;
  }

  function tags(r) {
    const t = [];
    if (r.tunnel) t.push(el('span', { class: 'tag', text: r.tunnel === 'ipsec' ? 'IPsec' : 'WireGuard' }));
    if (r.transport) t.push(el('span', { class: 'tag', text: r.transport === 'udp' ? 'UDP' : r.transport === 'tls_proxy' ? 'TLS via proxy' : 'TLS' }));
    if (isOpen(r) && r.expiry_warned_at) t.push(el('span', { class: 'tag expiring', text: 'expires ' + fmtClock(r.expires_at) }));
    return t;
  }

  function contentCell(text, key) {
    const long = text.length > 140 || text.split('\n').length > 3;
    const open = expanded.has(key);
    const body = el('div', { class: 'text' + (long && !open ? ' clamp' : ''), text });
    const td = cell({ class: 'content', 'data-label': 'Problem' }, body);
    if (long) {
      td.firstChild.append(el('button', { type: 'button', class: 'link more-text', 'aria-expanded': open ? 'true' : 'false', dataset: { key: key + ':more' },
        onclick: () => { if (expanded.has(key)) expanded.delete(key); else expanded.add(key); render(); } },
      open ? 'Show less' : 'Show all'));
    }
    return td;
  }

  function requestRow(r, fresh) {
    const nat = cell({ class: 'nat', 'data-label': 'Terminals' });
    for (const [name, addr] of natList(r)) {
      nat.firstChild.append(el('div', null, el('span', { class: 't', text: name }), ' ', el('span', { class: 'mono', text: addr || '—' })));
    }
    const flag = flagged.get(r.id);
    const cls = [fresh ? 'fresh' : '', flag ? 'flagged' : '', 'ur-row-' + r.urgency].join(' ').trim();
    return el('tr', { class: cls, dataset: { id: r.id, state: r.state } },
      cell({ class: 'req', 'data-label': 'Request' },
        el('div', { class: 'mono strong', text: r.acceptance_number }),
        el('div', null, el('span', { class: 'ur ur-' + r.urgency, text: r.urgency })),
        el('div', { class: 'muted small', title: fmtTime(r.received_at), text: 'received ' + fmtAge(r.received_at) })),
      cell({ class: 'site', 'data-label': 'Site' },
        el('div', { text: r.site_name }),
        el('div', { class: 'mono muted small', text: r.global_address || '' }),
        ...tags(r)),
      cell({ class: 'requester', 'data-label': 'Requester' },
        el('div', { text: r.requester_name }),
        el('div', { class: 'muted small' }, el('span', { class: 'lv-' + r.level, text: r.level }), ' · ',
          el('a', { href: 'tel:' + r.phone.replace(/[^+0-9]/g, ''), class: 'mono', text: r.phone }))),
      contentCell(r.content, 'c' + r.id),
      nat,
      cell({ class: 'state', 'data-label': 'State' },
        el('span', { class: 'pill st-' + r.state, text: STATE_LABEL[r.state] || r.state }),
        r.state === 'in_progress' && r.technician && r.started_at
          ? el('div', { class: 'muted small', text: r.technician + ' since ' + fmtClock(r.started_at).slice(0, 5) }) : null,
        flag ? el('div', { class: 'flag-note', text: flag }) : null),
      el('td', { class: 'actions' }, ...actionButtons(r, false)));
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
      if (sessionLost(e)) return;
      toast('Could not load older requests: ' + e.message, { bad: true });
    }
  }

  // Re-rendering replaces the rows: keep the keyboard focus on the same control.
  function focusKey() {
    const a = document.activeElement;
    return a && a.dataset ? a.dataset.key : undefined;
  }
  function restoreFocus(key) {
    if (!key) return;
    const a = document.activeElement;
    if (a && a.dataset && a.dataset.key === key) return;
    const e = document.querySelector('[data-key="' + key + '"]');
    if (e) e.focus();
  }

  function render() {
    if (!events) return;
    const fk = focusKey();
    const reqs = allRequests();
    const tbody = document.querySelector('#requests tbody');
    const rows = [];
    const firstTime = seen === null;
    if (firstTime) seen = new Set();
    for (const r of sortRequests(reqs)) {
      const fresh = !firstTime && !seen.has(r.id);
      seen.add(r.id);
      if (matchesFilter(r)) rows.push(requestRow(r, fresh));
    }
    tbody.replaceChildren(...rows);
    renderSites();
    $('requests-empty').hidden = rows.length > 0;
    $('requests-hint').textContent = rows.length + ' of ' + reqs.length + ' shown';
    // The feed carries the newest CLOSED_PAGE closed requests; fewer means there are no older ones.
    $('requests-more').hidden = olderClosedDone ||
      events.requests.filter((r) => !isOpen(r)).length < CLOSED_PAGE;

    const open = reqs.filter(isOpen);
    const waiting = reqs.filter((r) => r.state === 'waiting').length;
    $('count-waiting').textContent = waiting;
    $('count-progress').textContent = reqs.filter((r) => r.state === 'in_progress').length;
    document.title = waiting > 0 ? '(' + waiting + ' waiting) ' + TITLE : TITLE;
    const addrs = new Set();
    for (const r of open) for (const t of r.terminals) if (t.nat_address) addrs.add(t.nat_address);
    $('count-addresses').textContent = addrs.size;
    const dayAgo = Date.now() - 86400000;
    const recent = events.failures.filter((f) => f.received_at >= dayAgo).length;
    $('count-failures').textContent = recent;
    // The badge counts what nobody has acknowledged yet.
    const unseen = events.failures.filter((f) => !f.acknowledged_at).length;
    const badge = $('failures-badge');
    badge.textContent = unseen;
    badge.hidden = unseen === 0;

    const byId = new Map(reqs.map((r) => [r.id, r]));
    const ftbody = document.querySelector('#failures tbody');
    const show = $('failures-filter').value;
    const shown = events.failures.filter((f) => show === '' || (show === 'acknowledged') === !!f.acknowledged_at);
    ftbody.replaceChildren(...shown.map((f) => {
      const req = f.request_id ? byId.get(f.request_id) : null;
      const reqCell = cell({ class: 'req', 'data-label': 'Request' });
      if (req) {
        reqCell.firstChild.append(el('span', { class: 'mono', text: req.acceptance_number }), ' ',
          el('span', { class: 'pill st-' + req.state, text: STATE_LABEL[req.state] || req.state }));
      } else {
        reqCell.firstChild.append(el('span', { class: 'muted', text: f.request_id ? 'request ' + f.request_id : 'none opened' }));
      }
      const acked = !!f.acknowledged_at;
      return el('tr', { class: acked ? 'acknowledged' : 'unacknowledged', dataset: { id: f.id } },
        cell({ class: 'mono', 'data-label': 'Received' }, fmtTime(f.received_at)),
        cell({ 'data-label': 'Site' }, f.site_name),
        cell({ class: 'what', 'data-label': 'What failed' }, el('span', { class: 'code-' + f.code, text: FAILURE_LABEL[f.code] || f.code }),
          f.terminal ? el('div', { class: 'muted small', text: 'terminal ' + f.terminal }) : null,
          acked ? el('div', { class: 'ack-note', title: fmtTime(f.acknowledged_at),
            text: 'Acknowledged by ' + (f.acknowledged_by || 'a technician') + ' at ' + fmtClock(f.acknowledged_at) })
            : el('div', { class: 'new-note', text: 'Not acknowledged yet' })),
        cell({ class: 'content', 'data-label': 'Detail' }, el('div', { class: 'text', text: f.detail })),
        reqCell,
        el('td', { class: 'actions' },
          acked ? null : el('button', { type: 'button', class: 'act ack', disabled: live ? undefined : 'disabled',
            dataset: { key: 'f' + f.id + ':ack' }, 'aria-label': 'Acknowledge the failure report from ' + f.site_name + ' (' + fmtTime(f.received_at) + ')',
            onclick: (ev) => acknowledge(f, ev.currentTarget) }, 'Acknowledge'),
          req ? el('button', { type: 'button', class: 'ghost small details', dataset: { key: 'f' + f.id + ':details' },
            onclick: (ev) => openDetail(req.id, ev.currentTarget) }, 'Request details') : null));
    }));
    $('failures-empty').hidden = shown.length > 0;
    $('failures-hint').textContent = shown.length + ' of ' + events.failures.length + ' shown';
    if (!$('detail').hidden && $('detail').open) renderDetail();
    refreshAuditSites(reqs);
    restoreFocus(fk);
  }

  // ---------------------------------------------------------------- actions

  function confirmEnd(r) {
    const dlg = $('confirm');
    const decline = r.state === 'waiting';
    $('confirm-title').textContent = decline ? 'Decline this request?' : 'End the maintenance?';
    $('confirm-text').textContent = (decline
      ? 'Request ' + r.acceptance_number + ' from ' + r.requester_name + ' (' + r.site_name + ') has not been started. ' +
        'Declining closes it; its NAT addresses return to the pool.'
      : 'Access to the terminals of ' + r.site_name + ' (request ' + r.acceptance_number + ') ends now; ' +
        'its NAT addresses return to the pool.');
    $('confirm-ok').textContent = decline ? 'Decline' : 'End access';
    return new Promise((resolve) => {
      const done = (ok) => {
        $('confirm-ok').onclick = null;
        $('confirm-cancel').onclick = null;
        dlg.onclose = null;
        if (dlg.open) dlg.close();
        resolve(ok);
      };
      $('confirm-ok').onclick = () => done(true);
      $('confirm-cancel').onclick = () => done(false);
      dlg.onclose = () => done(false);
      dlg.showModal();
      $('confirm-cancel').focus();
    });
  }

  async function act(r, what, inDetail) {
    if (!live) return;
    const key = r.id + ':' + what + (inDetail ? ':d' : '');
    if (what === 'end' && !(await confirmEnd(r))) {
      restoreFocus(key);
      return;
    }
    const buttons = document.querySelectorAll('button.act[data-id="' + r.id + '"]');
    buttons.forEach((b) => { b.disabled = true; });
    if (what === 'end') mine.add(r.id);
    try {
      const view = await api('POST', '/api/v1/requests/' + r.id + '/' + what);
      if (events) {
        events.requests = events.requests.map((x) => (x.id === view.id ? view : x));
        if (what === 'end') flagged.set(view.id, view.started_at ? 'Ended by you' : 'Declined by you');
        render();
      }
      toast((what === 'start' ? 'Started ' : view.started_at ? 'Ended ' : 'Declined ') + view.acceptance_number);
      // Focus stays with the request: End after Start, Details after End.
      const next = what === 'start' ? view.id + ':end' : view.id + ':details';
      restoreFocus(inDetail ? (what === 'start' ? view.id + ':end:d' : 'detail-close') : next);
      if (inDetail && what === 'end') $('detail-close').focus();
    } catch (e) {
      mine.delete(r.id);
      if (sessionLost(e)) return;
      if (unreachable(e)) {
        setLive(false);
        toast('The server cannot be reached. Try again when the console is live.', { bad: true });
      } else {
        toast('Could not ' + (what === 'start' ? 'start ' : 'end ') + r.acceptance_number + ': ' + e.message, { bad: true });
      }
      buttons.forEach((b) => { b.disabled = !live; });
      restoreFocus(key);
    }
  }

  // A failure report seen and taken on. The focus moves to the next
  // report still to acknowledge (the row may leave the filtered list).
  async function acknowledge(f, button) {
    if (!live) return;
    button.disabled = true;
    try {
      const view = await api('POST', '/api/v1/failures/' + f.id + '/acknowledge');
      if (events) {
        events.failures = events.failures.map((x) => (x.id === view.id ? view : x));
        const t = document.querySelector('#toasts [data-key="f' + view.id + '"]');
        if (t) t.remove();
        render();
      }
      toast('Acknowledged the failure report from ' + view.site_name);
      const next = document.querySelector('#failures button.ack:not([disabled])');
      if (next) next.focus(); else $('failures-filter').focus();
    } catch (e) {
      if (sessionLost(e)) return;
      if (unreachable(e)) {
        setLive(false);
        toast('The server cannot be reached. Try again when the console is live.', { bad: true });
        return;
      }
      // 409: another technician was quicker; the feed brings their name.
      toast('Could not acknowledge: ' + e.message, { bad: true });
      button.disabled = !live;
    }
  }

  // ---------------------------------------------------------------- detail

  let detailId = null;
  let detailOpener = null;
  let detailTimeline = null;

  async function openDetail(id, opener) {
    detailId = id;
    detailOpener = opener || null;
    detailTimeline = null;
    renderDetail();
    const dlg = $('detail');
    if (!dlg.open) dlg.showModal();
    $('detail-close').focus();
    try {
      detailTimeline = await api('GET', '/api/v1/audit?limit=100&object=request:' + id);
      if (detailId === id) renderDetail();
    } catch (e) {
      if (sessionLost(e)) return;
      detailTimeline = [];
      if (detailId === id) renderDetail();
    }
  }

  // The NAT addresses the request got, from its "request received" entry
  // ("terminal=address" pairs) when the request no longer holds them.
  function natFromTimeline(r) {
    const got = new Map();
    for (const a of detailTimeline || []) {
      if (a.action !== 'request.create') continue;
      for (const part of a.detail.split(' ')) {
        const i = part.indexOf('=');
        if (i > 0) got.set(part.slice(0, i), part.slice(i + 1));
      }
    }
    return natList(r).map(([n, addr]) => [n, addr || got.get(n) || null]);
  }

  function who(actor, label) {
    if (label) return label;
    const i = actor.indexOf(':');
    if (i < 0) return actor;
    const kind = actor.slice(0, i);
    const rest = actor.slice(i + 1);
    if (kind === 'technician') return rest;
    if (kind === 'client') return 'from ' + rest;
    return kind + ' ' + rest;
  }

  function renderDetail() {
    if (detailId === null || !events) return;
    const r = allRequests().find((x) => x.id === detailId);
    const body = $('detail-body');
    if (!r) {
      body.replaceChildren(el('p', { text: 'This request is no longer in the list.' }));
      return;
    }
    $('detail-title').textContent = 'Request ' + r.acceptance_number;
    const fk = focusKey();
    const facts = el('dl', { class: 'facts' },
      el('dt', null, 'State'), el('dd', null, el('span', { class: 'pill st-' + r.state, text: STATE_LABEL[r.state] || r.state })),
      el('dt', null, 'Urgency'), el('dd', null, el('span', { class: 'ur ur-' + r.urgency, text: r.urgency })),
      el('dt', null, 'Site'), el('dd', null, r.site_name, ' ', el('span', { class: 'mono muted', text: r.global_address || '' }), ' ', ...tags(r)),
      el('dt', null, 'Requester'), el('dd', null, r.requester_name + ' (' + r.level + ')'),
      el('dt', null, 'Phone'), el('dd', null, el('a', { href: 'tel:' + r.phone.replace(/[^+0-9]/g, ''), class: 'mono', text: r.phone })),
      el('dt', null, 'Problem'), el('dd', { class: 'full-text', text: r.content }));
    const nat = el('ul', { class: 'nat-list' });
    for (const [n, addr] of natFromTimeline(r)) {
      nat.append(el('li', null, el('span', { class: 't', text: n }), ' ', el('span', { class: 'mono', text: addr || '—' }),
        !isOpen(r) && addr ? el('span', { class: 'muted small', text: ' (held until the end)' }) : null));
    }
    const tl = el('ol', { class: 'timeline', id: 'detail-timeline' });
    const items = [];
    const fromLog = (detailTimeline || []).slice().sort((a, b) => a.id - b.id);
    if (fromLog.length) {
      for (const a of fromLog) {
        items.push([a.at, (ACTION_LABEL[a.action] || a.action) + ' — ' + who(a.actor, a.actor_label), a.action]);
      }
    } else {
      items.push([r.received_at, 'request received', 'request.create']);
      if (r.started_at) items.push([r.started_at, 'started the work', 'request.start']);
      if (r.ended_at) items.push([r.ended_at, STATE_LABEL[r.state], 'request.end']);
    }
    if (isOpen(r)) items.push([r.expires_at, 'expires by itself unless ended before', 'expiry']);
    for (const [at, text, kind] of items) {
      tl.append(el('li', { class: 'tl-' + kind.replace('.', '-') }, el('time', { class: 'mono', text: fmtTime(at) }), ' ', text));
    }
    if (detailTimeline === null) tl.append(el('li', { class: 'muted', text: 'loading the history…' }));
    const actions = el('div', { class: 'dlg-actions' }, ...actionButtons(r, true));
    body.replaceChildren(facts,
      el('h3', null, 'Terminals and NAT addresses'), nat,
      el('h3', null, 'Timeline'), tl, actions);
    restoreFocus(fk);
  }

  function closeDialogs() {
    for (const id of ['detail', 'confirm']) if ($(id).open) $(id).close();
  }

  // ---------------------------------------------------------------- audit

  let auditSites = new Map();
  function refreshAuditSites(reqs) {
    let changed = false;
    for (const r of reqs) {
      if (!auditSites.has(r.site_id)) { auditSites.set(r.site_id, r.site_name); changed = true; }
    }
    if (!changed) return;
    const sel = $('audit-site');
    const cur = sel.value;
    sel.replaceChildren(el('option', { value: '' }, 'all'),
      ...[...auditSites.entries()].sort((a, b) => a[1].localeCompare(b[1]))
        .map(([id, name]) => el('option', { value: String(id) }, name)));
    sel.value = cur;
  }

  function auditQuery() {
    const p = new URLSearchParams();
    p.set('limit', '100');
    if ($('audit-site').value) p.set('site', $('audit-site').value);
    const tech = $('audit-tech').value.trim();
    if (tech) p.set('actor', 'technician:' + tech);
    const kind = $('audit-kind').value;
    if (kind && kind !== '*') p.set('kind', kind);
    const since = $('audit-since').value;
    if (since) p.set('since', String(Date.now() - Number(since)));
    return p;
  }

  async function loadAudit(reset) {
    try {
      const p = auditQuery();
      if (!reset && auditOldest !== null) p.set('before', String(auditOldest));
      const entries = await api('GET', '/api/v1/audit?' + p.toString());
      // "All but sign-ins": the technicians' own sign-ins and -outs would flood the list.
      const hide = $('audit-kind').value === ''
        ? (a) => a.action === 'technician.login' || a.action === 'technician.logout' : () => false;
      const tbody = document.querySelector('#audit tbody');
      const rows = entries.filter((a) => !hide(a)).map((a) => el('tr', { dataset: { id: a.id, action: a.action } },
        cell({ class: 'mono', 'data-label': 'Time' }, fmtTime(a.at)),
        cell({ 'data-label': 'Who' }, who(a.actor, a.actor_label)),
        cell({ 'data-label': 'What', title: a.action }, ACTION_LABEL[a.action] || a.action),
        cell({ 'data-label': 'On' }, a.object === a.actor ? '' : who(a.object, a.object_label)),
        cell({ class: 'content', 'data-label': 'Detail' }, el('div', { class: 'text', text: a.detail }))));
      if (reset) tbody.replaceChildren(...rows); else tbody.append(...rows);
      if (entries.length) auditOldest = entries[entries.length - 1].id;
      else if (reset) auditOldest = null;
      $('audit-more').hidden = entries.length < 100;
      $('audit-empty').hidden = tbody.children.length > 0;
    } catch (e) {
      if (sessionLost(e)) return;
      if (!unreachable(e)) toast('Could not load the audit log: ' + e.message, { bad: true });
    }
  }

  // ---------------------------------------------------------------- tabs

  const TABS = ['requests', 'failures', 'audit', 'sites'];
  function selectTab(name, focus) {
    activeTab = name;
    for (const t of document.querySelectorAll('.tab')) {
      const on = t.dataset.tab === name;
      t.classList.toggle('active', on);
      t.setAttribute('aria-selected', on ? 'true' : 'false');
      t.tabIndex = on ? 0 : -1;
      if (on && focus) t.focus();
    }
    for (const p of TABS) $('panel-' + p).hidden = p !== name;
    if (name === 'audit') loadAudit(true);
  }

  function tabKeys(ev) {
    const i = TABS.indexOf(activeTab);
    let j = null;
    if (ev.key === 'ArrowRight') j = (i + 1) % TABS.length;
    else if (ev.key === 'ArrowLeft') j = (i + TABS.length - 1) % TABS.length;
    else if (ev.key === 'Home') j = 0;
    else if (ev.key === 'End') j = TABS.length - 1;
    if (j === null) return;
    ev.preventDefault();
    selectTab(TABS[j], true);
  }

  // ------------------------------------------- sites without an agent

  // Their routers are standard WireGuard devices: a technician opens their
  // requests on the customer's behalf (naming each terminal's LAN address)
  // and shows the rendered router configuration, with QR codes.

  function renderSites() {
    const sites = (events && events.agentless_sites) || [];
    const rows = sites.map((s) => el('tr', null,
      el('td', { 'data-label': 'Site' }, s.name, ' ', el('span', { class: 'mono muted', text: '#' + s.site_id })),
      el('td', { 'data-label': 'Gateway', class: 'mono', text: s.gateway_id ? String(s.gateway_id) : '—' }),
      el('td', { class: 'actions' },
        el('button', { type: 'button', class: 'primary', 'data-site': s.site_id, onclick: (ev) => openSiteRequest(s, ev.currentTarget) }, 'Open a request'),
        ' ',
        el('button', { type: 'button', class: 'ghost', 'data-site-config': s.site_id, onclick: (ev) => openSiteConfig(s, ev.currentTarget) }, 'Router configuration'))));
    document.querySelector('#sites tbody').replaceChildren(...rows);
    $('sites-empty').hidden = rows.length > 0;
  }

  function siteDialog(title, opener, ...content) {
    detailId = null;
    detailOpener = opener || null;
    $('detail-title').textContent = title;
    $('detail-body').replaceChildren(...content);
    const dlg = $('detail');
    if (!dlg.open) dlg.showModal();
  }

  function terminalRow(n) {
    return el('div', { class: 'terminal-row' },
      el('label', null, 'Terminal name ', el('input', { name: 'terminal-name', required: 'required', maxlength: '63', placeholder: 'pc-' + n })),
      el('label', null, 'LAN address ', el('input', { name: 'terminal-address', required: 'required', maxlength: '15', class: 'mono', placeholder: '192.168.1.' + (9 + n) })));
  }

  function openSiteRequest(site, opener) {
    const err = el('p', { class: 'error', role: 'alert', hidden: 'hidden' });
    const terms = el('div', { class: 'terminals' }, terminalRow(1));
    const select = (name, options, chosen) => el('select', { name },
      ...options.map(([v, label]) => el('option', v === chosen ? { value: v, selected: 'selected' } : { value: v }, label)));
    const form = el('form', { class: 'site-request', novalidate: 'novalidate' },
      el('label', null, 'Requester ', el('input', { name: 'requester', required: 'required', maxlength: '100' })),
      el('label', null, 'Level ', select('level', [['general', 'general'], ['administrator', 'administrator']], 'general')),
      el('label', null, 'Urgency ', select('urgency', [['low', 'low'], ['normal', 'normal'], ['high', 'high'], ['emergency', 'emergency']], 'normal')),
      el('label', null, 'Phone ', el('input', { name: 'phone', type: 'tel', maxlength: '40' })),
      el('label', null, 'Problem ', el('textarea', { name: 'content', maxlength: '4000', rows: '3' })),
      terms,
      el('button', { type: 'button', class: 'ghost', onclick: () => terms.append(terminalRow(terms.children.length + 1)) }, 'Add a terminal'),
      err,
      el('button', { type: 'submit', class: 'primary' }, 'Open the request'));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const f = form.elements;
      const names = [...form.querySelectorAll('input[name="terminal-name"]')];
      const addrs = [...form.querySelectorAll('input[name="terminal-address"]')];
      const body = {
        requester_name: f.requester.value.trim(),
        level: f.level.value,
        urgency: f.urgency.value,
        phone: f.phone.value.trim(),
        content: f.content.value,
        terminals: names.map((n, i) => ({ name: n.value.trim(), lan_address: addrs[i].value.trim() }))
          .filter((t) => t.name || t.lan_address),
      };
      err.hidden = true;
      try {
        const view = await api('POST', '/api/v1/sites/' + site.site_id + '/requests', body);
        $('detail').close();
        toast('Opened ' + view.acceptance_number + ' for ' + site.name + ': ' +
          view.terminals.map((t) => t.name + ' = ' + t.nat_address).join(', ') +
          '. Apply the router configuration again.');
      } catch (e) {
        if (sessionLost(e)) return;
        err.textContent = e.message;
        err.hidden = false;
      }
    });
    siteDialog('Open a request for ' + site.name, opener,
      el('p', { class: 'hint', text: 'The customer phoned in. Their router has no agent: name each terminal with its address on the customer\'s LAN.' }),
      form);
    focusFirst(form);
  }

  function focusFirst(form) {
    const first = form.querySelector('input');
    if (first) first.focus();
  }

  // The QR code as an SVG element, keeping only the shapes the encoder
  // draws (no script, no link, no style can come through).
  function qrImage(svgText) {
    const doc = new DOMParser().parseFromString(svgText, 'image/svg+xml');
    const svg = doc.documentElement;
    if (!svg || svg.localName !== 'svg') return null;
    const NS = 'http://www.w3.org/2000/svg';
    const out = document.createElementNS(NS, 'svg');
    for (const a of ['viewBox', 'width', 'height', 'shape-rendering']) {
      if (svg.hasAttribute(a)) out.setAttribute(a, svg.getAttribute(a));
    }
    for (const node of svg.querySelectorAll('rect, path')) {
      const copy = document.createElementNS(NS, node.localName);
      for (const a of ['x', 'y', 'width', 'height', 'd', 'fill']) {
        if (node.hasAttribute(a)) copy.setAttribute(a, node.getAttribute(a));
      }
      out.append(copy);
    }
    out.setAttribute('role', 'img');
    out.setAttribute('class', 'qr');
    return out;
  }

  async function openSiteConfig(site, opener) {
    siteDialog('Router configuration of ' + site.name, opener, el('p', { text: 'Loading…' }));
    try {
      const c = await api('GET', '/api/v1/sites/' + site.site_id + '/wireguard');
      const parts = [
        el('p', { text: c.instructions }),
        el('p', null, 'Router public key: ', el('span', { class: 'mono', text: c.public_key })),
      ];
      if (c.mappings.length) {
        parts.push(el('ul', { class: 'nat-list' }, ...c.mappings.map((m) =>
          el('li', null, el('span', { class: 't', text: m.terminal }), ' ', el('span', { class: 'mono', text: m.nat_address + ' → ' + m.lan_address })))));
      }
      for (const f of c.files) {
        const qr = f.qr_svg ? qrImage(f.qr_svg) : null;
        if (qr) qr.setAttribute('aria-label', 'QR code of ' + f.name);
        parts.push(el('section', { class: 'router-file' },
          el('h3', { text: f.name }),
          qr,
          el('pre', { class: 'mono', tabindex: '0', 'aria-label': f.name, text: f.content })));
      }
      if ($('detail').open && $('detail-title').textContent === 'Router configuration of ' + site.name) {
        $('detail-body').replaceChildren(...parts);
      }
    } catch (e) {
      if (sessionLost(e)) return;
      $('detail-body').replaceChildren(el('p', { class: 'error', role: 'alert', text: 'Could not load it: ' + e.message }));
    }
  }

  // ---------------------------------------------------------------- wiring

  document.addEventListener('DOMContentLoaded', async () => {
    $('login-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const name = $('login-name').value.trim();
      const password = $('login-password').value;
      if (!name || !password) {
        setLoginError(!name ? 'Enter your name.' : 'Enter your password.');
        $(!name ? 'login-name' : 'login-password').focus();
        return;
      }
      const btn = $('login-submit');
      btn.disabled = true;
      setLoginError('');
      try {
        const r = await api('POST', '/api/v1/login', { name, password });
        csrf = r.csrf_token;
        localStorage.setItem(CSRF_KEY, csrf);
        localStorage.setItem(NAME_KEY, r.name);
        $('login-password').value = '';
        $('login-notice').hidden = true;
        showApp(r.name);
      } catch (e) {
        const msg = e.status === 401 ? 'Wrong name or password.'
          : e.status === 429 ? 'Too many failed sign-ins. Wait a minute and try again.'
            : unreachable(e) ? 'The server cannot be reached. Try again in a moment.'
              : 'Sign-in failed: ' + e.message;
        setLoginError(msg);
        $('login-password').value = '';
        $('login-password').focus();
      } finally {
        btn.disabled = false;
      }
    });
    showNotifyButton();
    $('notify-on').addEventListener('click', async () => {
      try { await Notification.requestPermission(); } catch (e) { /* refused */ }
      showNotifyButton();
      if (Notification.permission === 'granted') toast('Desktop notifications are on.');
      else if (Notification.permission === 'denied') toast('Notifications are blocked in this browser\'s site settings.');
    });
    $('logout').addEventListener('click', async () => {
      try { await api('POST', '/api/v1/logout'); } catch (_) { /* the session is gone either way */ }
      showLogin('');
    });
    // Another tab signed in (new token: take it) or out (token gone).
    window.addEventListener('storage', (ev) => {
      if (ev.key !== CSRF_KEY) return;
      if (ev.newValue) {
        csrf = ev.newValue;
        const name = localStorage.getItem(NAME_KEY) || '';
        if ($('app-view').hidden) showApp(name); else $('who').textContent = name;
      } else if (!$('app-view').hidden) {
        showLogin('You signed out in another window.');
      }
    });
    for (const t of document.querySelectorAll('.tab')) {
      t.addEventListener('click', () => selectTab(t.dataset.tab, false));
      t.addEventListener('keydown', tabKeys);
    }
    // The page keeps room for the notices below its content (see style.css).
    new MutationObserver(() => {
      const box = $('toasts');
      const h = box.children.length ? box.offsetHeight + 16 : 0;
      document.documentElement.style.setProperty('--toasts-h', h + 'px');
    }).observe($('toasts'), { childList: true });
    $('filter-state').addEventListener('change', render);
    $('failures-filter').addEventListener('change', render);
    $('sort').addEventListener('change', render);
    $('filter-text').addEventListener('input', render);
    $('audit-filters').addEventListener('submit', (ev) => { ev.preventDefault(); loadAudit(true); });
    for (const id of ['audit-site', 'audit-kind', 'audit-since']) $(id).addEventListener('change', () => loadAudit(true));
    $('audit-more').addEventListener('click', () => loadAudit(false));
    $('requests-more').addEventListener('click', loadOlderClosed);
    $('detail-close').addEventListener('click', () => $('detail').close());
    $('detail').addEventListener('close', () => {
      detailId = null;
      if (detailOpener && document.contains(detailOpener)) detailOpener.focus();
      else if (detailOpener && detailOpener.dataset.key) restoreFocus(detailOpener.dataset.key);
    });
    // The relative ages ("5 min ago") move on.
    setInterval(() => { if (events && !document.querySelector('dialog[open]')) render(); }, 30000);

    if (!csrf) { showLogin(''); return; }
    try {
      const me = await api('GET', '/api/v1/me');
      showApp(me.name);
    } catch (e) {
      showLogin(e.status === 401 ? 'Your session ended. Please sign in again.' : '');
    }
  });
})();
