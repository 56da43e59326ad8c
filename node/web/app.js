// crdtbook's web view: one market's book, depth, trades, my orders and fills, an order form,
// and the node's peers and finality, kept live over the node's WebSocket (specs/http-api.md).
//
// Everything another party chose (peer addresses, client order ids, error messages) is put in
// the page as text (textContent), never parsed as HTML. The token is kept in sessionStorage
// only: it leaves with the tab.

import { APPLIED, BookState, GAP, atLeast, cost, decimals, finalKeys, levelKey, spreadMid } from "./book.js";
import { DepthChart } from "./depth.js";

/** Where the bearer token is kept for this tab. */
const TOKEN_KEY = "crdtbook.token";
/** Levels per side in the ladder: what fits beside the chart without scrolling. */
const LADDER_DEPTH = 14;
/** Levels per side the depth chart draws (the book stream follows up to 500). */
const CHART_DEPTH = 100;
/** Trades and my fills kept on screen (the streams' snapshots send at most about this many). */
const TRADES_KEEP = 100;
/** Reconnect backoff: first try soon, then double up to a ceiling so a down node is not hammered. */
const RECONNECT_MIN_MS = 300;
const RECONNECT_MAX_MS = 5000;
/** The final book is read over REST at most this often while the book or finality changes. */
const FINAL_BOOK_EVERY_MS = 500;
/** How long a toast stays. */
const TOAST_MS = 6000;

const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  markets: [],
  symbol: null,
  market: null,
  book: new BookState(),
  finalBids: new Set(),
  finalAsks: new Set(),
  witnessed: null,
  trades: new Map(),
  orders: new Map(),
  fills: new Map(),
  status: null,
  ws: null,
  live: false,
  backoff: RECONNECT_MIN_MS,
  authed: false,
  renderQueued: false,
  finalTimer: null,
  finalLast: 0,
};

let chart = null;

// ------------------------------------------------------------------------------- helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "title") node.title = v;
    else if (k.startsWith("data-") || k.startsWith("aria-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child);
  return node;
}

function timeOf(ms) {
  if (typeof ms !== "number") return "-";
  const d = new Date(ms);
  return d.toISOString().slice(11, 23); // HH:MM:SS.mmm, UTC, as the CLI shows times
}

function toast(text, kind = "") {
  const t = el("div", { class: `toast ${kind}`, text });
  $("toasts").append(t);
  setTimeout(() => t.remove(), TOAST_MS);
}

/** The finality cell of a trade, fill or order row: final, provisional, or never (no witnesses). */
function stateCell(final) {
  if (state.witnessed === false) return el("td", { class: "state muted", text: "never final", title: "this market has no witnesses: its fills are never final" });
  if (final === true) return el("td", { class: "state", text: "✓ final", title: "final: no order can change this any more" });
  return el("td", { class: "state", text: "◌ provisional", title: "provisional: an order that sorts earlier can still change this until the witnesses acknowledge it" });
}

function rowClass(final) {
  if (state.witnessed === false) return "";
  return final === true ? "final" : "provisional";
}

// ---------------------------------------------------------------------------------- REST

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(`/api/v1${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try {
    data = await res.json();
  } catch {
    data = null;
  }
  if (!res.ok) {
    const err = data && data.error ? data.error : {};
    if (res.status === 401) lockPrivate(true);
    throw new ApiError(res.status, err.code || String(res.status), err.message || res.statusText);
  }
  return data;
}

const q = (params) => new URLSearchParams(params).toString();

// --------------------------------------------------------------------------------- token

function loadToken() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    // out of the address bar (and so of history, bookmarks and screenshots)
    history.replaceState(null, "", location.pathname + location.search);
  }
  state.token = sessionStorage.getItem(TOKEN_KEY) || null;
}

function lockedText() {
  return state.token ? "token refused: give the node's token (token button)" : "token needed";
}

function lockPrivate(locked) {
  state.privateLocked = locked;
  $("locked").hidden = !locked;
  $("submit").disabled = locked;
  $("cancel-all").disabled = locked;
  $("token-button").textContent = state.token && !locked ? "token ✓" : "token";
}

function openTokenDialog() {
  $("token-input").value = state.token || "";
  $("token-dialog").showModal();
  $("token-input").focus();
}

function setToken(token) {
  state.token = token || null;
  if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
  else sessionStorage.removeItem(TOKEN_KEY);
  state.authed = false;
  state.orders.clear();
  state.fills.clear();
  lockPrivate(!state.token);
  renderMine();
  // a new connection authenticates and subscribes afresh
  if (state.ws) state.ws.close();
}

// ------------------------------------------------------------------------------ WebSocket

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg));
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws`);
  state.ws = ws;
  setConn("connecting");
  ws.onopen = () => {
    state.backoff = RECONNECT_MIN_MS;
    setConn("live");
    if (state.token) send({ op: "auth", token: state.token });
    subscribeAll();
  };
  ws.onmessage = (ev) => {
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    handle(msg);
  };
  ws.onclose = () => {
    if (state.ws !== ws) return;
    setConn("down");
    state.authed = false;
    const wait = state.backoff;
    state.backoff = Math.min(state.backoff * 2, RECONNECT_MAX_MS);
    setTimeout(() => {
      if (state.ws === ws) connect();
    }, wait);
  };
}

function subscribeAll() {
  if (!state.symbol) return;
  const book = { op: "subscribe", channel: "book", symbol: state.symbol };
  // resume: the node sends the deltas since the last u we applied when it still holds them
  if (state.book.u !== null) book.since = state.book.u;
  send(book);
  send({ op: "subscribe", channel: "trades", symbol: state.symbol });
  send({ op: "subscribe", channel: "status" });
  if (state.token) send({ op: "subscribe", channel: "private", symbol: state.symbol });
}

function setConn(what) {
  state.live = what === "live";
  $("conn").className = `conn ${what === "live" ? "live" : what === "down" ? "down" : ""}`;
  $("conn-text").textContent = what === "live" ? "live" : what === "down" ? "disconnected: reconnecting; what is shown may be out of date" : "connecting";
  // Dimmed while down: the book, the final marks and the witnesses' state are as last heard.
  document.body.classList.toggle("stale", what === "down");
}

function handle(msg) {
  if (msg.error) {
    const req = msg.request || {};
    if (msg.error.code === "unauthorized") {
      lockPrivate(true);
      toast(`token refused: ${msg.error.message}`, "error");
    } else {
      toast(`${req.channel || "server"}: ${msg.error.message}`, "error");
    }
    return;
  }
  if (msg.op === "auth" && msg.ok) {
    state.authed = true;
    lockPrivate(false);
    return;
  }
  if (msg.op) return; // "subscribed"/"unsubscribed" acknowledgements carry no data

  if (msg.channel === "status") return onStatus(msg);
  if (msg.symbol !== state.symbol) return; // a late message of a market we left
  if (msg.channel === "book") return onBook(msg);
  if (msg.channel === "trades") return onTrades(msg);
  if (msg.channel === "private") return onPrivate(msg);
}

// ---------------------------------------------------------------------------------- book

function onBook(msg) {
  const result = state.book.apply(msg);
  if (result === GAP) {
    // a message went missing: ask again from the last u we have (a snapshot if none)
    const again = { op: "subscribe", channel: "book", symbol: state.symbol };
    if (state.book.u !== null) again.since = state.book.u;
    send(again);
    return;
  }
  if (result === APPLIED) {
    scheduleFinalBook();
    queueRender();
  }
}

function scheduleFinalBook() {
  if (state.witnessed === false || state.finalTimer) return;
  const wait = Math.max(0, state.finalLast + FINAL_BOOK_EVERY_MS - Date.now());
  state.finalTimer = setTimeout(refreshFinalBook, wait);
}

async function refreshFinalBook() {
  state.finalLast = Date.now();
  const symbol = state.symbol;
  try {
    const ob = await api("GET", `/orderbook?${q({ symbol, limit: CHART_DEPTH })}`);
    if (symbol !== state.symbol) return;
    state.witnessed = ob.witnessed;
    state.finalBids = finalKeys(ob.final ? ob.final.bids : []);
    state.finalAsks = finalKeys(ob.final ? ob.final.asks : []);
    queueRender();
  } catch (err) {
    if (err.status !== 401) console.warn("final book", err);
  } finally {
    state.finalTimer = null;
  }
}

function queueRender() {
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(() => {
    state.renderQueued = false;
    renderBook();
  });
}

function levelFinal(side, price, amount) {
  if (state.witnessed !== true) return null;
  return (side === "bids" ? state.finalBids : state.finalAsks).has(levelKey(price, amount));
}

function myPrices(side) {
  const set = new Set();
  for (const o of state.orders.values()) {
    if (o.status === "open" && o.side === side) set.add(levelKey(o.price, "0"));
  }
  return set;
}

function renderBook() {
  // totals, spread and mid at the market's precision, like the prices and amounts the node sends
  const precision = (state.market && state.market.precision) || {};
  const amountDp = precision.amount ? decimals(precision.amount) : 0;
  const priceDp = precision.price ? decimals(precision.price) : 0;
  const shape = (side) =>
    state.book.levels(side, CHART_DEPTH).map(([p, a, c]) => [p, a, atLeast(c, amountDp), levelFinal(side, p, a)]);
  const bids = shape("bids");
  const asks = shape("asks");
  const shownBids = bids.slice(0, LADDER_DEPTH);
  const shownAsks = asks.slice(0, LADDER_DEPTH);
  const maxCum = Math.max(
    shownBids.length ? Number(shownBids[shownBids.length - 1][2]) : 0,
    shownAsks.length ? Number(shownAsks[shownAsks.length - 1][2]) : 0,
  );
  const mineBuy = myPrices("buy");
  const mineSell = myPrices("sell");
  const row = (side, [price, amount, cum, final]) => {
    const cls = ["level"];
    if (final === true) cls.push("final");
    if (final === false) cls.push("provisional");
    if ((side === "bids" ? mineBuy : mineSell).has(levelKey(price, "0"))) cls.push("mine");
    const bar = el("div", { class: "bar" });
    bar.style.width = `${maxCum ? (Number(cum) / maxCum) * 100 : 0}%`;
    const mark =
      final === true
        ? el("span", { class: "mark", text: "✓", title: "final level: the final book has it, same size" })
        : final === false
          ? el("span", { class: "mark", text: "◌", title: "provisional level: not yet acknowledged by the witnesses" })
          : el("span", { class: "mark" });
    const div = el(
      "div",
      { class: cls.join(" "), "data-price": price, "data-side": side },
      bar,
      el("span", { class: "price", text: price }),
      el("span", { text: amount }),
      el("span", { class: "muted", text: cum }),
      mark,
    );
    div.addEventListener("click", () => {
      document.querySelector('#order-form [name="price"]').value = price;
      updateCost();
    });
    return div;
  };
  $("asks").replaceChildren(...shownAsks.map((lv) => row("asks", lv)).reverse());
  $("bids").replaceChildren(...shownBids.map((lv) => row("bids", lv)));
  const bestBid = bids.length ? bids[0][0] : null;
  const bestAsk = asks.length ? asks[0][0] : null;
  const sm = spreadMid(bestBid, bestAsk);
  const spread = sm.spread === null ? null : atLeast(sm.spread, priceDp);
  const mid = sm.mid === null ? null : atLeast(sm.mid, priceDp);
  const midline = $("midline");
  if (mid !== null) {
    midline.replaceChildren(el("b", { text: mid }), el("span", { text: `spread ${spread}` }));
  } else {
    midline.replaceChildren(el("span", { text: !bids.length && !asks.length ? "empty book" : `one-sided: no ${bids.length ? "asks" : "bids"}` }));
  }
  $("best-bid").textContent = bestBid ?? "-";
  $("best-ask").textContent = bestAsk ?? "-";
  $("spread").textContent = spread ?? "-";
  $("book-seq").textContent = state.book.u === null ? "" : `u ${state.book.u}`;
  const note = $("book-note");
  if (state.witnessed === false) note.textContent = "no witnesses: fills here are never final";
  else if (state.witnessed === true) {
    const all = [...shownBids, ...shownAsks];
    const prov = all.filter((lv) => lv[3] === false).length;
    note.textContent = prov ? `${prov} of ${all.length} levels provisional (◌)` : all.length ? "every level shown is final (✓)" : "";
  } else note.textContent = "";
  chart.update(bids, asks);
}

// -------------------------------------------------------------------------------- trades

// Newest first by the fill's index, its place in the market's order: a trade the node loaded
// from its store at start has no timestamp (null), and sorting by time put the newest trade
// last and made an older one "last price" after a restart.
function sortByTime(map) {
  const index = (t) => (t.info && typeof t.info.index === "number" ? t.info.index : -1);
  return [...map.values()].sort((a, b) => index(b) - index(a) || (b.timestamp ?? 0) - (a.timestamp ?? 0));
}

function applyFills(map, msg, list) {
  const fresh = new Set();
  if (msg.type === "snapshot") map.clear();
  for (const t of list || []) {
    if (msg.type !== "snapshot" && !map.has(t.id)) fresh.add(t.id);
    map.set(t.id, t);
  }
  for (const id of msg.revoked || []) map.delete(id);
  for (const id of msg.became_final || []) {
    const t = map.get(id);
    if (t) map.set(id, { ...t, final: true, ...finalTime(msg, id) });
  }
  const sorted = sortByTime(map);
  for (const t of sorted.slice(TRADES_KEEP)) map.delete(t.id);
  return fresh;
}

// A trade's time once final is its witnessed time (http-api.md "Values"): the message names the
// trades that became final; their times come with it where the node gives them.
function finalTime(msg, id) {
  const times = msg.final_times || {};
  const ms = times[id];
  return typeof ms === "number" ? { timestamp: ms, datetime: new Date(ms).toISOString() } : {};
}

function onTrades(msg) {
  const fresh = applyFills(state.trades, msg, msg.trades);
  if ((msg.revoked || []).length) {
    const n = msg.revoked.length;
    $("trades-note").textContent = `${n} provisional trade${n === 1 ? "" : "s"} revoked: an earlier-sorting order changed the matching`;
    toast($("trades-note").textContent, "warn");
  }
  renderTrades(fresh);
}

function renderTrades(fresh = new Set()) {
  const rows = sortByTime(state.trades).map((t) =>
    el(
      "tr",
      { class: [rowClass(t.final), fresh.has(t.id) ? "fresh" : ""].join(" "), "data-id": t.id, title: t.datetime || "" },
      el("td", { class: "muted", text: timeOf(t.timestamp) }),
      el("td", { class: `num ${t.side === "buy" ? "buy" : "sell"}`, text: t.price }),
      el("td", { class: "num", text: t.amount }),
      stateCell(t.final),
    ),
  );
  $("trades").replaceChildren(...(rows.length ? rows : [emptyRow(4, "no trades yet")]));
  const last = sortByTime(state.trades)[0];
  $("last-price").textContent = last ? last.price : "-";
  $("last-price").className = last ? (last.side === "buy" ? "buy" : "sell") : "";
}

function emptyRow(span, text) {
  return el("tr", { class: "empty" }, el("td", { colSpan: span, text }));
}

// ------------------------------------------------------------------------ my orders/fills

function onPrivate(msg) {
  if (msg.type === "snapshot") state.orders.clear();
  for (const o of msg.orders || []) state.orders.set(o.id, o);
  const fresh = applyFills(state.fills, msg, msg.fills);
  const revoked = (msg.revoked || []).length;
  if (revoked) {
    // Provisional fills of mine that no longer exist: said, not dropped silently.
    toast(`${revoked} provisional fill${revoked === 1 ? "" : "s"} of yours revoked: an earlier-sorting order changed the matching`, "warn");
    for (const id of msg.revoked) {
      for (const mark of document.querySelectorAll("#order-result [data-fill-id]")) {
        if (mark.dataset.fillId === id) mark.replaceWith(el("span", { class: "prov", text: "✗ revoked" }));
      }
    }
  }
  for (const id of fresh) {
    const f = state.fills.get(id);
    if (f) toast(`${provisionalMark(f.final)}filled: ${f.side} ${f.amount} @ ${f.price}${f.takerOrMaker ? ` as ${f.takerOrMaker}` : ""}`);
  }
  for (const id of msg.became_final || []) {
    // the last order's outcome, shown under the form, follows its fills to final too
    for (const mark of document.querySelectorAll("#order-result [data-fill-id]")) {
      if (mark.dataset.fillId === id) mark.replaceWith(finalSpan(true));
    }
  }
  renderMine(fresh);
  queueRender(); // my price marks on the ladder
}

function renderMine(freshFills = new Set()) {
  const open = [...state.orders.values()]
    .filter((o) => o.status === "open")
    .sort((a, b) => (b.timestamp ?? 0) - (a.timestamp ?? 0));
  const orderRows = open.map((o) => {
    const cancel = el("button", { type: "button", class: "ghost danger small-btn", text: "cancel", "data-testid": "cancel", "aria-label": `cancel ${o.side} order ${o.id.slice(0, 12)} at ${o.price}` });
    cancel.addEventListener("click", () => cancelOrder(o, cancel));
    return el(
      "tr",
      { class: rowClass(o.final), "data-id": o.id, title: `order ${o.id}` },
      el("td", { class: "muted", text: timeOf(o.timestamp) }),
      el("td", { class: o.side === "buy" ? "buy" : "sell", text: o.side }),
      el("td", { class: "num", text: o.price ?? "-" }),
      el("td", { class: "num", text: o.amount }),
      el("td", { class: "num", text: o.filled }),
      el("td", { text: o.timeInForce || "" }),
      el("td", { class: "muted", text: o.clientOrderId || "" }),
      stateCell(o.final),
      el("td", {}, cancel),
    );
  });
  // (A token the node refused locks them too: "no open orders" then said what was not known.)
  const locked = !state.token || state.privateLocked === true;
  $("open-orders").replaceChildren(...(orderRows.length ? orderRows : [emptyRow(9, locked ? lockedText() : "no open orders")]));
  $("open-count").textContent = String(open.length);
  const fillRows = sortByTime(state.fills).map((f) =>
    el(
      "tr",
      { class: [rowClass(f.final), freshFills.has(f.id) ? "fresh" : ""].join(" "), "data-id": f.id },
      el("td", { class: "muted", text: timeOf(f.timestamp) }),
      el("td", { class: f.side === "buy" ? "buy" : "sell", text: `${f.side}${f.takerOrMaker ? ` (${f.takerOrMaker})` : ""}` }),
      el("td", { class: "num", text: f.price }),
      el("td", { class: "num", text: f.amount }),
      el("td", { class: "num", text: f.cost }),
      el("td", { class: "muted", text: (f.order || "").slice(0, 12), title: f.order || "" }),
      stateCell(f.final),
    ),
  );
  $("my-fills").replaceChildren(...(fillRows.length ? fillRows : [emptyRow(7, locked ? lockedText() : "no fills of mine yet")]));
  $("fills-count").textContent = String(state.fills.size);
}

async function cancelOrder(order, button) {
  button.disabled = true;
  try {
    const o = await api("DELETE", `/orders/${encodeURIComponent(order.id)}?${q({ symbol: state.symbol })}`);
    state.orders.set(o.id, o);
    const info = o.info || {};
    const filled = Number(o.filled) > 0 ? `; ${o.filled} had filled` : "";
    const said = info.effective
      ? `cancelled ${o.side} order ${o.id.slice(0, 12)} @ ${o.price}${filled}`
      : `nothing to cancel: ${o.side} order ${o.id.slice(0, 12)} is already ${o.status}${filled}`;
    toast(`${provisionalMark(info.cancel_final)}${said}`, info.effective ? "" : "warn");
    renderMine();
    queueRender();
  } catch (err) {
    toast(`cancel failed: ${err.message}`, "error");
    button.disabled = false;
  }
}

async function cancelAll() {
  try {
    const res = await api("DELETE", `/orders?${q({ symbol: state.symbol })}`);
    const n = (res.cancelled || []).length;
    for (const id of res.cancelled || []) {
      const o = state.orders.get(id);
      if (o) state.orders.set(id, { ...o, status: "canceled" });
    }
    // (Not final until the witnesses acknowledge the op: an order sorting earlier can still fill them.)
    toast(`${provisionalMark(false)}cancel-all: ${n} order${n === 1 ? "" : "s"} cancelled in one op`);
    renderMine();
  } catch (err) {
    toast(`cancel-all failed: ${err.message}`, "error");
  }
}

// ---------------------------------------------------------------------------- order form

function formValues() {
  const form = $("order-form");
  const data = new FormData(form);
  return Object.fromEntries(data.entries());
}

function updateForm() {
  const v = formValues();
  const isMarket = v.type === "market";
  document.querySelector(".price-field").hidden = isMarket;
  document.querySelector(".band-field").hidden = !isMarket;
  $("order-form").querySelector('[name="timeInForce"]').disabled = isMarket;
  const submit = $("submit");
  const base = state.market ? state.market.base : "";
  submit.textContent = `${v.side === "sell" ? "Sell" : "Buy"} ${base}${isMarket ? " at market" : ""}`;
  submit.className = `submit ${v.side === "buy" ? "buy-bg" : "sell-bg"}`;
  updateCost();
}

function updateCost() {
  const v = formValues();
  const quote = state.market ? state.market.quote : "";
  const c = v.type === "limit" && v.price && v.amount ? cost(v.price, v.amount) : "";
  $("order-cost").textContent = c ? `${v.side === "buy" ? "cost" : "proceeds"} ${c} ${quote}` : " ";
}

async function submitOrder(ev) {
  ev.preventDefault();
  const v = formValues();
  const body = { symbol: state.symbol, type: v.type, side: v.side, amount: v.amount.trim() };
  if (v.type === "limit") {
    body.price = v.price.trim();
    body.timeInForce = v.timeInForce;
    if (v.timeInForce === "PO") body.postOnly = true;
  } else if (v.band && v.band.trim()) {
    body.band = v.band.trim();
  }
  if (v.clientOrderId && v.clientOrderId.trim()) body.clientOrderId = v.clientOrderId.trim();
  if (v.selfTradePrevention) body.selfTradePrevention = v.selfTradePrevention;
  const out = $("order-result");
  out.className = "result small";
  out.textContent = "sending…";
  $("submit").disabled = true;
  try {
    const res = await api("POST", "/orders", body);
    showResult(res);
    state.orders.set(res.id, res);
    renderMine();
    queueRender();
  } catch (err) {
    out.className = "result small error";
    if (err instanceof ApiError) {
      out.textContent = `refused: ${err.message} [${err.code}]`;
      if (err.status === 401) openTokenDialog();
    } else {
      // The request may have reached the node: placing it again could make two orders.
      out.textContent = `no answer from the node (${err.message}): the order may have been placed all the same; check the open orders before you submit again`;
    }
  } finally {
    $("submit").disabled = !state.token;
  }
}

function showResult(res) {
  const out = $("order-result");
  const fills = res.fills || [];
  const lines = [];
  const head = el("div", {}, el("span", { class: "muted", text: "order " }), el("span", { class: "sel", text: res.id }));
  lines.push(head);
  const verb = res.side === "buy" ? "bought" : "sold";
  let outcome;
  if (res.status === "open" && res.filled && Number(res.filled) > 0) outcome = `partly filled: ${verb} ${res.filled}, ${res.remaining} rests at ${res.price}`;
  else if (res.status === "open") outcome = `resting: ${res.remaining} @ ${res.price} is on the book`;
  else if (res.status === "closed") outcome = `filled: ${verb} ${res.filled} in ${fills.length} fill${fills.length === 1 ? "" : "s"}`;
  else outcome = `${res.status}${res.info && res.info.reason ? `: ${String(res.info.reason).replaceAll("_", " ")}` : ""}${Number(res.filled) > 0 ? ` (${verb} ${res.filled} first)` : ""}`;
  lines.push(el("div", { text: `${provisionalMark(res.final)}${outcome}` }));
  for (const f of fills) {
    const mark = finalSpan(f.final);
    mark.dataset.fillId = f.id;
    lines.push(el("div", {}, el("span", { text: `  fill ${f.amount} @ ${f.price} ` }), mark));
  }
  for (const x of res.expired || []) {
    lines.push(el("div", { class: "prov", text: `  expired by self-trade prevention: own ${x.side} order ${x.id} (${x.amount} @ ${x.price}, ${x.filled} had filled)` }));
  }
  out.replaceChildren(...lines);
}

// "provisional: " before an outcome that can still change (as the CLI says it); nothing once final,
// nor in a market without witnesses, whose page says once that nothing there is ever final.
function provisionalMark(final) {
  return final === false && state.witnessed !== false ? "provisional: " : "";
}

function finalSpan(final) {
  if (state.witnessed === false) return el("span", { class: "muted", text: "(never final)" });
  return final ? el("span", { class: "fin", text: "✓ final" }) : el("span", { class: "prov", text: "◌ provisional" });
}

// ------------------------------------------------------------------------ status / network

function onStatus(st) {
  state.status = st;
  $("node-id").textContent = st.peer_id || "-";
  $("node-addrs").replaceChildren(...(st.addrs || []).map((a) => el("div", { text: a })));
  const peers = st.peers || [];
  $("peer-count").textContent = String(peers.length);
  $("peers").replaceChildren(
    ...(peers.length
      ? peers.map((p) => el("li", {}, el("span", { text: p.peer_id }), ...(p.addrs && p.addrs.length ? [el("span", { class: "addr", text: p.addrs[0] })] : [])))
      : [el("li", { class: "muted", text: "no peers connected" })]),
  );
  const m = (st.markets || []).find((x) => x.name === state.symbol);
  if (!m) return;
  const before = state.witnessed;
  if (typeof m.witnessed === "boolean") state.witnessed = m.witnessed;
  const word = { final: "final", pending: "pending", stalled: "stalled", none: "never final" }[m.finality] || m.finality || "-";
  const badge = $("finality-badge");
  badge.textContent = word;
  badge.className = `badge ${m.finality || ""}`;
  const why = {
    final: "everything is acknowledged by the witnesses",
    pending: "waiting on heartbeats that are due",
    stalled: `stalled: a witness is silent while something waits${(m.stalled_on || []).length ? ` (${m.stalled_on.map((k) => k.slice(0, 12)).join(", ")})` : ""}`,
    none: "this market has no witnesses: its fills are never final",
  }[m.finality];
  $("finality-text").textContent = why || "-";
  $("frontier").textContent =
    state.witnessed ? `${m.frontier ?? "-"} (epoch ${m.epoch ?? "-"}; ${m.final_fills ?? "?"} of ${m.fills ?? "?"} fills final)` : "-";
  const ws = m.witnesses || [];
  const stalled = new Set(m.stalled_on || []);
  $("witnesses").replaceChildren(
    ...(ws.length
      ? ws.map((w) => {
          const tags = [];
          if (w.me) tags.push(el("span", { class: "tag me", text: "this node" }));
          if (w.current === false) tags.push(el("span", { class: "tag", text: "removed" }));
          if (w.forked) tags.push(el("span", { class: "tag stalled", text: "forked" }));
          if (stalled.has(w.key)) tags.push(el("span", { class: "tag stalled", text: `stalled${w.silent_s != null ? ` ${Number(w.silent_s).toFixed(1)}s` : ""}` }));
          else if (w.silent_s != null) tags.push(el("span", { class: "tag", text: `beat ${Number(w.silent_s).toFixed(1)}s ago` }));
          return el("li", {}, el("span", { text: w.key }), ...tags);
        })
      : [el("li", { class: "muted", text: "none: fills here are never final" })]),
  );
  if (before !== state.witnessed) {
    renderTrades();
    renderMine();
  }
  if (m.frontier !== state.lastFrontier) {
    state.lastFrontier = m.frontier;
    scheduleFinalBook();
  }
}

// ------------------------------------------------------------------------------- markets

function selectMarket(symbol) {
  if (state.symbol && state.symbol !== symbol) {
    for (const channel of ["book", "trades", "private"]) send({ op: "unsubscribe", channel, symbol: state.symbol });
  }
  state.symbol = symbol;
  state.market = state.markets.find((m) => m.symbol === symbol) || null;
  state.book.reset();
  state.trades.clear();
  state.orders.clear();
  state.fills.clear();
  state.witnessed = state.market && state.market.info ? state.market.info.witnessed : null;
  state.finalBids = new Set();
  state.finalAsks = new Set();
  state.lastFrontier = undefined;
  const url = new URL(location.href);
  url.searchParams.set("symbol", symbol);
  history.replaceState(null, "", url.pathname + url.search);
  document.title = `${symbol} · crdtbook`;
  updateForm();
  renderBook();
  renderTrades();
  renderMine();
  scheduleFinalBook();
  subscribeAll();
}

async function loadMarkets() {
  const markets = await api("GET", "/markets");
  state.markets = markets;
  const select = $("market");
  select.replaceChildren(...markets.map((m) => el("option", { value: m.symbol, text: m.symbol })));
  const wanted = new URLSearchParams(location.search).get("symbol");
  const pick = markets.find((m) => m.symbol === wanted) ? wanted : markets.length ? markets[0].symbol : null;
  if (wanted && pick !== wanted) {
    // A link to a market this node does not follow: say so rather than show another silently.
    toast(`this node does not follow ${wanted}${pick ? `; showing ${pick}` : ""}`, "warn");
  }
  if (pick) {
    select.value = pick;
    selectMarket(pick);
  }
}

// ---------------------------------------------------------------------------------- start

function wire() {
  chart = new DepthChart($("depth"), $("chart-tip"));
  $("market").addEventListener("change", (e) => selectMarket(e.target.value));
  $("order-form").addEventListener("submit", submitOrder);
  $("order-form").addEventListener("input", updateCost);
  $("order-form").addEventListener("change", updateForm);
  $("cancel-all").addEventListener("click", cancelAll);
  $("token-button").addEventListener("click", openTokenDialog);
  $("locked-token").addEventListener("click", openTokenDialog);
  $("token-forget").addEventListener("click", () => {
    setToken(null);
    $("token-dialog").close();
  });
  $("token-dialog").addEventListener("close", () => {
    if ($("token-dialog").returnValue === "save") setToken($("token-input").value.trim());
  });
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
      for (const body of document.querySelectorAll(".tab-body")) body.hidden = body.dataset.body !== tab.dataset.tab;
    });
  }
}

async function start() {
  loadToken();
  wire();
  lockPrivate(!state.token);
  renderMine();
  try {
    await loadMarkets();
  } catch (err) {
    toast(`cannot read the node's markets: ${err.message}`, "error");
  }
  connect();
}

start();
