// The customer's maintenance page. Talks only to this router's JSON API;
// every text from the API is inserted with textContent (never as HTML).
"use strict";

const state = { csrf: null, poll: null, pending: null, terminals: [], down: false, downSince: 0, tunnelUp: false, open: null };

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c) e.append(c);
  return e;
}

async function api(method, path, body) {
  const opts = { method, credentials: "same-origin", headers: {} };
  if (state.csrf && method !== "GET") opts.headers["X-CSRF-Token"] = state.csrf;
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, opts);
  } catch (_) {
    // The router's agent does not answer (restarting, or the network is gone).
    return { ok: false, status: 0, data: null };
  }
  let data = null;
  try { data = await resp.json(); } catch (_) { /* empty body */ }
  if (resp.status === 401 && path !== "/api/login" && path !== "/api/session") {
    showLogin(state.csrf
      ? "You were logged out: the router restarted or your session ended. Please log in again."
      : null);
  }
  return { ok: resp.ok, status: resp.status, data };
}

function show(id, text) {
  const e = $(id);
  if (text) { e.textContent = text; e.hidden = false; } else { e.hidden = true; e.textContent = ""; }
}

// How the maintenance connection travels, in words (udp, tls, tls_proxy).
function transportText(t) {
  if (t === "udp") return "Connection to the maintenance center: direct (UDP).";
  if (t === "tls") return "Connection to the maintenance center: over HTTPS (TLS on port 443), because this network blocks the direct way.";
  if (t === "tls_proxy") return "Connection to the maintenance center: over HTTPS through your network's web proxy.";
  return null;
}

function showLogin(reason) {
  state.csrf = null;
  if (state.poll) { clearInterval(state.poll); state.poll = null; }
  show("login-reason", reason || null);
  $("main").hidden = true;
  $("login").hidden = false;
  $("password").focus();
}

function showMain(info) {
  state.csrf = info.csrf_token;
  $("site-name").textContent = info.site_name || "";
  $("login").hidden = true;
  $("main").hidden = false;
  refresh();
  if (!state.poll) state.poll = setInterval(refresh, 2000);
}

const STATE_TEXT = {
  waiting: "Waiting for a technician",
  in_progress: "A technician is working",
  ended: "Finished by the technician",
  revoked: "Ended by you",
  expired: "Time is up",
};

const URGENCY_TEXT = {
  low: "whenever convenient", normal: "today", high: "as soon as possible", emergency: "work has stopped",
};

function time(ms) {
  return new Date(ms).toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
}

function stateText(r) {
  if (r.state === "ended" && !r.started_at) return "Declined by the maintenance center";
  return STATE_TEXT[r.state] || r.state;
}

// A time of today as HH:MM (24 hours, the way it is said on the phone).
function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
}

// Whether a technician can reach a terminal now, in words: only when the
// router has set up its address and the connection to the center is up.
function accessText(r, t) {
  if (t.active && state.tunnelUp) return "A technician can connect";
  if (t.active) return "Ready here; waiting for the connection to the maintenance center";
  // The router refused it: say why, instead of "being set up" for ever.
  if (t.state === "refused" && t.reason) return t.reason;
  if (!t.address) return "Not possible: no computer of this name was found on your network";
  return "Being set up\u2026";
}

function accessClass(t) {
  if (t.active) return "active yes";
  if (t.state === "refused" || !t.address) return "active refused";
  return "active";
}

function renderRequest(r) {
  const box = el("div", { class: "request", "data-request-id": String(r.id) });
  box.append(
    el("p", { class: "number-label", text: "Your request number (please quote it on the phone):" }),
    el("p", { class: "acceptance-number", text: r.acceptance_number }),
    el("span", { class: "request-state state " + r.state, text: stateText(r) }),
  );
  if (r.state === "in_progress" && r.started_at) {
    box.append(el("p", { class: "working", text:
      (r.technician ? r.technician : "A technician") + " is working since " + clock(r.started_at) + "." }));
  }
  const table = el("table", { class: "terminals" });
  table.append(el("tr", {},
    el("th", { text: "Computer" }),
    el("th", { text: "Its address here" }),
    el("th", { text: "Address for the technician" }),
    el("th", { text: "Technician access" })));
  for (const t of r.local) {
    const row = el("tr", { "data-terminal": t.name });
    row.append(
      el("td", { class: "terminal-name", "data-label": "Computer", text: t.name }),
      el("td", { class: "muted", "data-label": "Its address here", text: t.address || "not found" }),
      el("td", { class: "nat-address", "data-label": "Address for the technician", text: t.nat_address || "-" }),
      el("td", { class: accessClass(t), "data-label": "Technician access", "data-state": t.state || "",
        text: accessText(r, t) }));
    table.append(row);
  }
  box.append(table);
  box.append(el("p", { class: "muted", text:
    "Asked by " + r.requester_name + " on " + time(r.received_at) +
    " (" + (URGENCY_TEXT[r.urgency] || r.urgency) + "). Access ends by itself at " + time(r.expires_at) + "." }));
  const end = el("button", { type: "button", class: "danger end-access", id: "end-access-" + r.id,
                             text: "End access now" });
  end.disabled = state.down;
  end.addEventListener("click", () => revoke(r, end));
  box.append(el("div", { class: "actions" }, end));
  return box;
}

function renderHistory(list) {
  const ul = $("history");
  ul.replaceChildren();
  for (const r of list) {
    ul.append(el("li", { "data-request-id": String(r.id) },
      el("strong", { text: r.acceptance_number }),
      document.createTextNode(" \u2014 " + stateText(r) + ", " + time(r.received_at))));
  }
  $("history-card").hidden = list.length === 0;
}

function renderTerminals(terminals) {
  const key = JSON.stringify(terminals.map((t) => t.name));
  if (key === state.terminalsKey) return;
  state.terminalsKey = key;
  const box = $("terminal-list");
  const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  box.replaceChildren();
  for (const t of terminals) {
    const input = el("input", { type: "checkbox", name: "terminal", value: t.name, id: "terminal-" + t.name });
    input.checked = checked.has(t.name);
    const label = el("label", { for: "terminal-" + t.name }, input,
      el("span", { text: t.description ? t.description + " (" + t.name + ")" : t.name }),
      t.address ? el("span", { class: "addr", text: t.address }) : null);
    box.append(label);
  }
  if (terminals.length === 0) {
    box.append(el("p", { class: "muted", text: "No computers are configured; type a name or address below." }));
  }
}

// The LAN's computers as this router found them: a checkbox per host
// (its value is the MAC address; the router binds it to a terminal name,
// and only that name goes to the maintenance center), the customer's own
// name for it, and when it was last seen.
function renderDiscovered(d) {
  const box = $("discovered-list");
  $("discovered").hidden = !d.enabled;
  $("sweep").hidden = !d.sweep;
  if (d.sweeping) $("sweep-status").textContent = "Searching\u2026";
  else if ($("sweep-status").textContent === "Searching\u2026") $("sweep-status").textContent = "";
  // Never re-render under the customer's hands (a name being typed).
  if (box.querySelector(".rename-form:not([hidden])")) return;
  const key = JSON.stringify(d.hosts.map((h) => [h.mac, h.name, h.address, h.last_seen]));
  if (key === state.discoveredKey) return;
  state.discoveredKey = key;
  const checked = new Set([...box.querySelectorAll("input.pick:checked")].map((i) => i.value));
  box.replaceChildren();
  for (const h of d.hosts) {
    const id = "host-" + h.mac.replaceAll(":", "");
    const input = el("input", { type: "checkbox", class: "pick", value: h.mac, id });
    input.checked = checked.has(h.mac);
    const name = h.name || "Unnamed computer";
    const label = el("label", { for: id }, input,
      el("span", { class: "host-name", text: name }),
      el("span", { class: "meta", text: h.address + " \u00b7 " + h.mac + " \u00b7 seen " + time(h.last_seen) }));
    const rename = el("button", { type: "button", class: "small rename", "aria-label": "Rename " + name, text: "Rename" });
    const field = el("input", { class: "rename-input", maxlength: "63", "aria-label": "New name for " + h.address });
    field.value = h.custom_name || "";
    const save = el("button", { type: "button", class: "small primary save-name", text: "Save name" });
    // Not a <form>: it sits inside the request form.
    const form = el("div", { class: "rename-form" }, field, save);
    form.hidden = true;
    rename.addEventListener("click", () => { form.hidden = false; field.focus(); });
    const store = async () => {
      const r = await api("POST", "/api/discovery/hosts/" + encodeURIComponent(h.mac) + "/name", { name: field.value });
      if (!r.ok) { $("sweep-status").textContent = (r.data && r.data.message) || "The name was not saved."; return; }
      form.hidden = true;
      state.discoveredKey = null;
      await refreshDiscovered();
    };
    save.addEventListener("click", store);
    field.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); store(); } });
    box.append(el("div", { class: "host", "data-mac": h.mac }, label, rename, form));
  }
  if (d.hosts.length === 0) {
    box.append(el("p", { class: "muted", text: "No computers found yet. Press \u201cSearch the network\u201d, or type a name or address below." }));
  }
}

async function refreshDiscovered() {
  const r = await api("GET", "/api/discovery");
  if (r.ok) renderDiscovered(r.data);
}

async function sweep() {
  const r = await api("POST", "/api/discovery/sweep");
  $("sweep-status").textContent = r.ok ? "Searching\u2026"
    : ((r.data && r.data.message) || "The network cannot be searched right now.");
  if (r.ok) setTimeout(refreshDiscovered, 3000);
}

async function refresh() {
  const r = await api("GET", "/api/overview");
  if (r.status === 0) { agentDown(true); return; }
  if (!r.ok) return;
  agentDown(false);
  const o = r.data;
  state.tunnelUp = o.tunnel_state === "up";
  noticeEnded(o.requests);
  $("site-name").textContent = o.site_name;
  if (o.standalone) {
    show("connection", "This router runs without a maintenance center: requests cannot be sent from here.");
  } else if (!o.server_connected) {
    show("connection", "The maintenance center cannot be reached at the moment. Access you already allowed still ends on time.");
  } else {
    show("connection", null);
  }
  show("problem", o.problem ? "The maintenance center says: " + o.problem : null);
  show(
    "tunnel",
    o.tunnel_state === "down"
      ? "The connection to the maintenance center is down" + (o.tunnel_note ? ": " + o.tunnel_note : "") +
        ". Technicians cannot reach your computers until it is back."
      : null,
  );
  show("transport", transportText(o.transport));
  $("failure-requests").checked = !!o.failure_requests;
  renderTerminals(o.terminals);
  // After the overview answered: a restarted router's 401 is told once,
  // with its reason, by the overview's call.
  refreshDiscovered();
  const open = o.requests.filter((q) => q.state === "waiting" || q.state === "in_progress");
  const closed = o.requests.filter((q) => !(q.state === "waiting" || q.state === "in_progress"));
  const box = $("open-requests");
  box.replaceChildren(...open.map(renderRequest));
  $("current").hidden = open.length === 0;
  renderHistory(closed);
}

// The agent stopped answering: say so, keep what is shown, disable the buttons.
function agentDown(down) {
  if (down && !state.down) state.downSince = Date.now();
  state.down = down;
  show("agent-down", down
    ? "This router does not answer since " + clock(state.downSince) +
      " (it may be restarting). What you see may be out of date; the buttons work again once it answers."
    : null);
  $("submit-request").disabled = down;
  for (const b of document.querySelectorAll(".end-access")) b.disabled = down;
}

// A request the technician ended (or the center declined) since the last look.
function noticeEnded(requests) {
  const open = new Set();
  for (const q of requests) {
    if (q.state === "waiting" || q.state === "in_progress") { open.add(q.id); continue; }
    if (!state.open || !state.open.has(q.id)) continue;
    if (q.state === "ended") {
      show("notice", q.started_at
        ? (q.technician || "The technician") + " finished the work on request " + q.acceptance_number +
          " at " + clock(q.ended_at) + ". Access to your computers has ended."
        : "Request " + q.acceptance_number + " was declined by the maintenance center at " + clock(q.ended_at) +
          ". Please call your service provider if you still need help.");
    } else if (q.state === "expired") {
      show("notice", "The time for request " + q.acceptance_number + " ran out at " + clock(q.ended_at) +
        ". Access to your computers has ended.");
    }
  }
  state.open = open;
}

function chosenTerminals() {
  const ticked = [...document.querySelectorAll("#terminal-list input:checked, #discovered-list input.pick:checked")]
    .map((i) => i.value);
  const typed = $("other_terminals").value.split(",").map((s) => s.trim()).filter((s) => s.length > 0);
  return ticked.concat(typed);
}

function formBody() {
  return {
    requester_name: $("requester_name").value,
    level: $("level").value,
    urgency: $("urgency").value,
    phone: $("phone").value,
    content: $("content").value,
    terminals: chosenTerminals(),
  };
}

const FIELD_IDS = { requester_name: "requester_name", phone: "phone", content: "content",
                    terminals: "other_terminals", level: "level", urgency: "urgency" };
const ERROR_IDS = { requester_name: "err-requester_name", phone: "err-phone", content: "err-content",
                    terminals: "err-terminals" };

// A server message in plain words: without its "field: " prefix, and the
// refusal of an address outside the LAN explained.
function plain(field, message) {
  let m = message || "";
  if (field && m.startsWith(field + ": ")) m = m.slice(field.length + 2);
  const lan = /^(.*?) resolves to ([0-9.]+), which is not an allowed LAN address/.exec(m);
  if (lan) {
    return lan[1] + " (" + lan[2] + ") is not on your local network, so it cannot be opened for a technician. " +
      "Check the name or address.";
  }
  return m.charAt(0).toUpperCase() + m.slice(1);
}

function fieldError(field, msg) {
  const id = ERROR_IDS[field];
  if (!id) return false;
  show(id, msg);
  const input = $(FIELD_IDS[field]);
  if (msg) input.setAttribute("aria-invalid", "true"); else input.removeAttribute("aria-invalid");
  return true;
}

function clearFieldErrors() {
  for (const f of Object.keys(ERROR_IDS)) fieldError(f, null);
}

function showError(r) {
  if (r.status === 0) {
    show("request-error", "This router does not answer. Please try again in a moment.");
    return;
  }
  const field = r.data && r.data.field;
  const msg = plain(field, (r.data && r.data.message) || ("Something went wrong (HTTP " + r.status + ")."));
  if (field && fieldError(field, msg)) {
    $(FIELD_IDS[field]).focus();
    return;
  }
  show("request-error", msg);
  if (field && FIELD_IDS[field]) $(FIELD_IDS[field]).focus();
}

function busy(on) {
  $("submit-request").disabled = on;
  $("send-anyway").disabled = on;
}

async function submitRequest(ev) {
  ev.preventDefault();
  show("request-error", null);
  show("notice", null);
  $("check-warning").hidden = true;
  clearFieldErrors();
  const body = formBody();
  if (!body.requester_name.trim()) { fieldError("requester_name", "Please enter your name."); $("requester_name").focus(); return; }
  if (!body.phone.trim()) { fieldError("phone", "Please enter a phone number."); $("phone").focus(); return; }
  if (body.terminals.length === 0) {
    fieldError("terminals", "Please choose at least one computer, or type its name or address here.");
    $("other_terminals").focus();
    return;
  }
  busy(true);
  try {
    const c = await api("POST", "/api/check", { terminals: body.terminals });
    if (!c.ok) { showError(c); return; }
    const silent = c.data.terminals.filter((t) => !t.answers);
    if (silent.length > 0) {
      state.pending = body;
      $("check-warning-text").textContent = silent.map((t) =>
        t.name + " (" + t.address + ") does not answer on the local network right now. " +
        "Please make sure it is switched on and connected.").join("\n") +
        "\nSend the request anyway?";
      $("check-warning").hidden = false;
      $("send-anyway").focus();
      return;
    }
    await send(body);
  } finally {
    busy(false);
  }
}

async function send(body) {
  busy(true);
  try {
    const r = await api("POST", "/api/requests", body);
    if (!r.ok) { showError(r); return; }
    const req = r.data.request;
    show("notice", "Thank you. Your request number is " + req.acceptance_number +
      ". A technician will contact you at " + req.phone + ".");
    $("request-form").reset();
    $("content").value = "";
    await refresh();
    $("current").scrollIntoView({ behavior: "smooth" });
  } finally {
    busy(false);
  }
}

async function revoke(r, button) {
  button.disabled = true;
  button.textContent = "Ending access\u2026";
  const res = await api("POST", "/api/requests/" + r.id + "/revoke");
  if (res.ok) {
    show("notice", (res.data && res.data.message) ||
      "Access for request " + r.acceptance_number + " has ended. The technician cannot reach your computers any more.");
  } else {
    show("notice", null);
    show("connection", (res.data && res.data.message) || "Could not end access (HTTP " + res.status + ").");
  }
  await refresh();
}

async function login(ev) {
  ev.preventDefault();
  show("login-error", null);
  const r = await api("POST", "/api/login", { password: $("password").value });
  if (r.ok) {
    $("password").value = "";
    $("password").removeAttribute("aria-invalid");
    show("login-reason", null);
    showMain(r.data);
  } else {
    show("login-error", r.status === 0 ? "This router does not answer. Please try again in a moment."
      : (r.data && r.data.message) || "Login failed.");
    $("password").setAttribute("aria-invalid", "true");
    $("password").focus();
  }
}

async function logout() {
  await api("POST", "/api/logout");
  showLogin();
}

document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", login);
  // An error goes away as soon as its field is changed.
  for (const [field, id] of Object.entries(FIELD_IDS)) {
    if (ERROR_IDS[field]) $(id).addEventListener("input", () => fieldError(field, null));
  }
  $("terminal-list").addEventListener("change", () => fieldError("terminals", null));
  $("discovered-list").addEventListener("change", () => fieldError("terminals", null));
  $("sweep").addEventListener("click", sweep);
  $("request-form").addEventListener("submit", submitRequest);
  $("send-anyway").addEventListener("click", async () => {
    $("check-warning").hidden = true;
    if (state.pending) { const b = state.pending; state.pending = null; await send(b); }
  });
  $("send-cancel").addEventListener("click", () => { $("check-warning").hidden = true; state.pending = null; });
  $("logout").addEventListener("click", logout);
  $("failure-requests").addEventListener("change", async (e) => {
    const r = await api("POST", "/api/preferences", { failure_requests: e.target.checked });
    if (!r.ok) e.target.checked = !e.target.checked;
  });
  const s = await api("GET", "/api/session");
  if (s.ok) showMain(s.data); else showLogin();
});
