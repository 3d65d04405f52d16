// rlxf labeling: the labeler's page and the owner's page (docs/labeling.md).
// All text from the server is written with textContent, never as HTML.
"use strict";

const state = { csrf: null, item: null, me: null, refresh: null };
const $ = (id) => document.getElementById(id);

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function say(message) { $("status").textContent = message || ""; }

async function api(method, path, body) {
  const headers = {};
  if (method === "POST") {
    headers["Content-Type"] = "application/json";
    if (state.csrf) headers["X-CSRF-Token"] = state.csrf;
  }
  const response = await fetch(path, { method, headers, credentials: "same-origin",
                                       body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error((data.error && data.error.message) || response.statusText);
    error.status = response.status;
    throw error;
  }
  return data;
}

function showLogin() {
  $("login").hidden = false;
  for (const id of ["work", "owner", "done"]) if ($(id)) $(id).hidden = true;
  for (const id of ["undo", "logout"]) if ($(id)) $(id).hidden = true;
  $("token").focus();
}

async function start() {
  $("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const me = await api("POST", "/api/login", { token: $("token").value.trim() });
      $("token").value = "";
      await enter(me);
    } catch (error) { say(error.message); }
  });
  $("logout").addEventListener("click", async () => {
    try { await api("POST", "/api/logout", {}); } catch (error) { /* the session is gone either way */ }
    state.csrf = null;
    showLogin();
  });
  if (document.body.dataset.page === "label") {
    $("undo").addEventListener("click", undo);
    $("save-edit").addEventListener("click", () => send({ edit: $("edit").value }));
    document.addEventListener("keydown", onKey);
  }
  try { await enter(await api("GET", "/api/me")); } catch (error) { showLogin(); }
}

async function enter(me) {
  state.me = me;
  state.csrf = me.csrf;
  $("login").hidden = true;
  $("logout").hidden = false;
  $("who").textContent = me.name + " (" + me.role + ")";
  say("");
  if (document.body.dataset.page === "owner") {
    if (!state.refresh) state.refresh = setInterval(() => { if (state.csrf) showOwner(); }, 15000);
    return showOwner();
  }
  $("undo").hidden = false;
  await loadNext();
}

async function loadNext() {
  try { render(await api("GET", "/api/next")); } catch (error) { fail(error); }
}

function fail(error) {
  if (error.status === 401) { showLogin(); say("please log in again"); } else { say(error.message); }
}

function progressText(progress) {
  return progress ? progress.done + " labelled, " + progress.remaining + " open" : "";
}

function render(item) {
  $("progress").textContent = progressText(item.progress);
  if (item.id === null) {
    state.item = null;
    $("work").hidden = true;
    $("done").hidden = false;
    return;
  }
  state.item = item;
  $("done").hidden = true;
  $("work").hidden = false;
  $("condition").hidden = !item.condition;
  $("condition").textContent = item.condition ? "Condition: " + item.condition : "";
  $("prompt").textContent = item.prompt;
  $("reason").value = "";
  const list = $("completions");
  list.replaceChildren();
  item.completions.forEach((text, index) => {
    const card = el("div", null, { class: "completion", "data-index": String(index) });
    card.append(el("h3", item.kind === "compare" ? "Completion " + (index + 1) : "Completion"));
    card.append(el("pre", text, { class: "text completion-text" }));
    if (item.kind === "compare") {
      const button = el("button", "This one is better (" + (index + 1) + ")", { type: "button" });
      button.addEventListener("click", () => send({ choice: index }));
      card.append(button);
    }
    list.append(card);
  });
  renderActions(item);
}

function renderActions(item) {
  const actions = $("actions");
  actions.replaceChildren();
  const add = (label, payload) => {
    const button = el("button", label, { type: "button" });
    button.addEventListener("click", () => send(payload));
    actions.append(button);
  };
  $("edit-box").hidden = item.kind !== "edit";
  let keys = "z undo · r reason";
  if (item.kind === "compare") {
    add("Tie (t)", { choice: "tie" });
    add("Both bad (b)", { choice: "both_bad" });
    keys = "1.." + item.completions.length + " pick the better completion · t tie · b both bad · " + keys;
  } else if (item.kind === "rate" && item.scale === "thumbs") {
    add("👍 Good (↑ or y)", { rating: 1 });
    add("👎 Bad (↓ or n)", { rating: 0 });
    keys = "↑/y good · ↓/n bad · " + keys;
  } else if (item.kind === "rate") {
    for (let r = 1; r <= 7; r++) add(String(r), { rating: r });
    keys = "1..7 rate (7 best) · " + keys;
  } else {
    $("edit").value = item.completions[0];
    keys = "Ctrl+Enter save the edit · Esc leave the text box · " + keys;
  }
  $("keys").textContent = keys;
}

let busy = false;
async function send(answer) {
  if (!state.item || busy) return;
  busy = true;
  const body = Object.assign({ id: state.item.id }, answer);
  const reason = $("reason").value.trim();
  if (reason) body.reason = reason;
  try {
    await api("POST", "/api/label", body);
    say("saved");
    await loadNext();  // render() shows the new progress together with the next item
  } catch (error) { fail(error); } finally { busy = false; }
}

async function undo() {
  if (busy) return;
  busy = true;
  try { render(await api("POST", "/api/undo", {})); say("undone: label it again"); }
  catch (error) { fail(error); } finally { busy = false; }
}

function onKey(event) {
  const typing = ["INPUT", "TEXTAREA"].includes(document.activeElement.tagName);
  if (typing) {
    if (event.key === "Escape") document.activeElement.blur();
    if (event.key === "Enter" && event.ctrlKey && document.activeElement.id === "edit") send({ edit: $("edit").value });
    if (event.key === "Enter" && document.activeElement.id === "reason") document.activeElement.blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const item = state.item;
  if (event.key === "z") return undo();
  if (!item) return;
  if (event.key === "r") { event.preventDefault(); $("reason").focus(); return; }
  const digit = /^[1-9]$/.test(event.key) ? Number(event.key) : null;
  if (item.kind === "compare") {
    if (digit !== null && digit <= item.completions.length) send({ choice: digit - 1 });
    else if (event.key === "t") send({ choice: "tie" });
    else if (event.key === "b") send({ choice: "both_bad" });
  } else if (item.kind === "rate" && item.scale === "thumbs") {
    if (event.key === "ArrowUp" || event.key === "y") { event.preventDefault(); send({ rating: 1 }); }
    else if (event.key === "ArrowDown" || event.key === "n") { event.preventDefault(); send({ rating: 0 }); }
  } else if (item.kind === "rate") {
    if (digit !== null && digit <= 7) send({ rating: digit });
  } else if (event.key === "e") { event.preventDefault(); $("edit").focus(); }
}

function cell(row, text) { row.append(el("td", text === null || text === undefined ? "–" : text)); }

function fixed(x, digits) { return x === null || x === undefined ? null : Number(x).toFixed(digits); }

async function showOwner() {
  $("owner").hidden = false;
  let stats;
  try { stats = await api("GET", "/api/owner/stats"); } catch (error) { return fail(error); }
  const queues = $("queues").querySelector("tbody");
  const labelers = $("labelers").querySelector("tbody");
  queues.replaceChildren();
  labelers.replaceChildren();
  for (const q of stats.queues) {
    const row = el("tr");
    cell(row, q.queue); cell(row, q.kind + (q.scale ? " " + q.scale : "")); cell(row, q.items);
    cell(row, q.complete); cell(row, q.labels);
    cell(row, q.alpha === null ? null : fixed(q.alpha, 3) + " (" + q.alpha_metric + ")"); cell(row, q.alpha_items);
    queues.append(row);
    for (const who of q.labelers) {
      const line = el("tr");
      cell(line, q.queue); cell(line, who.name); cell(line, who.labels);
      cell(line, fixed(who.median_seconds, 1)); cell(line, fixed(who.labels_per_hour, 0));
      labelers.append(line);
    }
  }
  const downloads = $("downloads");
  downloads.replaceChildren();
  for (const format of ["pairs", "kto", "sft", "labels", "csv"]) {
    downloads.append(el("a", format, { href: "/api/owner/export?format=" + format, download: "" }), " ");
  }
}

document.addEventListener("DOMContentLoaded", start);
