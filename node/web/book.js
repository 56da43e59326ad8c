// The order book a page follows over the WebSocket's book channel (specs/http-api.md): a
// snapshot, then deltas each carrying the sequence number of the message before it (`pu`), so a
// missed message is seen at once and the page asks again from the last `u` it has (Binance's
// U/u/pu rule). Prices and amounts stay exact decimal strings; sums use big.js.

import Big from "./vendor/big.js/big.mjs";

/** What applying a message did. */
export const APPLIED = "applied";
/** A delta that does not follow the last message: resubscribe with `since` = `book.u`. */
export const GAP = "gap";
/** A message older than what the book already has (a resend after a resubscribe): ignored. */
export const STALE = "stale";

/** Exact comparison of two decimal strings. */
export function cmp(a, b) {
  return new Big(a).cmp(new Big(b));
}

/** A decimal string as its canonical form ("1.50" -> "1.5"), to compare levels by value. */
export function canon(value) {
  try {
    return new Big(value).toString();
  } catch {
    return String(value);
  }
}

export function isZero(value) {
  try {
    return new Big(value).eq(0);
  } catch {
    return false;
  }
}

/** The exact sum of decimal strings, as a string. */
export function sum(values) {
  let total = new Big(0);
  for (const v of values) total = total.plus(v);
  return total.toString();
}

export class BookState {
  constructor() {
    this.reset();
  }

  reset() {
    /** price (canonical string) -> [price as sent, amount as sent] */
    this.bids = new Map();
    this.asks = new Map();
    /** The last sequence number applied, or null before the first snapshot. */
    this.u = null;
  }

  /** Apply one book message; returns APPLIED, GAP or STALE. */
  apply(msg) {
    if (msg.type === "snapshot") {
      this.bids = levelMap(msg.bids);
      this.asks = levelMap(msg.asks);
      this.u = msg.u;
      return APPLIED;
    }
    if (this.u === null) return GAP;
    if (msg.pu !== this.u) {
      return typeof msg.u === "number" && msg.u <= this.u ? STALE : GAP;
    }
    applyLevels(this.bids, msg.bids);
    applyLevels(this.asks, msg.asks);
    this.u = msg.u;
    return APPLIED;
  }

  /** The side's levels best first: [[price, amount, cumulative], ...], at most `limit`. */
  levels(side, limit = Infinity) {
    const map = side === "bids" ? this.bids : this.asks;
    const sorted = [...map.values()].sort((x, y) => (side === "bids" ? cmp(y[0], x[0]) : cmp(x[0], y[0])));
    const out = [];
    let total = new Big(0);
    for (const [price, amount] of sorted.slice(0, limit)) {
      total = total.plus(amount);
      out.push([price, amount, total.toString()]);
    }
    return out;
  }

  best(side) {
    const levels = this.levels(side, 1);
    return levels.length ? levels[0][0] : null;
  }
}

function levelMap(levels) {
  const map = new Map();
  for (const [price, amount] of levels || []) {
    if (!isZero(amount)) map.set(canon(price), [price, amount]);
  }
  return map;
}

function applyLevels(map, levels) {
  for (const [price, amount] of levels || []) {
    if (isZero(amount)) map.delete(canon(price));
    else map.set(canon(price), [price, amount]);
  }
}

/** The set of "price|amount" keys of a final book side, to tell final levels from provisional. */
export function finalKeys(levels) {
  return new Set((levels || []).map(([p, a]) => `${canon(p)}|${canon(a)}`));
}

export function levelKey(price, amount) {
  return `${canon(price)}|${canon(amount)}`;
}

/** The spread and mid of two best prices (decimal strings), or nulls. */
export function spreadMid(bestBid, bestAsk) {
  if (bestBid === null || bestAsk === null) return { spread: null, mid: null };
  const bid = new Big(bestBid);
  const ask = new Big(bestAsk);
  return { spread: ask.minus(bid).toString(), mid: bid.plus(ask).div(2).toString() };
}

/** How many decimals a decimal string has once canonical ("0.010" -> 2, "5" -> 0). */
export function decimals(value) {
  const text = canon(value);
  const dot = text.indexOf(".");
  return dot < 0 ? 0 : text.length - dot - 1;
}

/** A decimal string shown with at least `dp` decimals (a market's precision), never rounded. */
export function atLeast(value, dp) {
  try {
    return new Big(value).toFixed(Math.max(dp, decimals(value)));
  } catch {
    return String(value);
  }
}

/** price * amount, exactly. */
export function cost(price, amount) {
  try {
    return new Big(price).times(amount).toString();
  } catch {
    return "";
  }
}
