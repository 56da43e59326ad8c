// The depth chart: cumulative amount by price, bids (green) stepping down to the left of the
// mid, asks (red) stepping up to its right, on a canvas sized to its box at the screen's pixel
// ratio. A level that is not final is hatched amber over its step. Plotting needs numbers, so
// prices and amounts become floats here, for drawing only; every figure shown as text is
// the exact decimal string.

const PAD = { left: 8, right: 56, top: 10, bottom: 22 };
/** Price range shown on each side of the mid, as a share of the mid, when the book is shallow. */
const MIN_HALF_RANGE = 0.02;

export class DepthChart {
  constructor(canvas, tip) {
    this.canvas = canvas;
    this.tip = tip;
    this.data = { bids: [], asks: [] };
    this.geometry = null;
    canvas.addEventListener("mousemove", (e) => this.hover(e));
    canvas.addEventListener("mouseleave", () => (this.tip.hidden = true));
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  /** bids/asks: [[price, amount, cumulative, final(bool|null)], ...] best first (strings). */
  update(bids, asks) {
    this.data = { bids, asks };
    this.draw();
  }

  colors() {
    const css = getComputedStyle(document.documentElement);
    const v = (name) => css.getPropertyValue(name).trim();
    return { buy: v("--buy"), sell: v("--sell"), prov: v("--prov"), line: v("--line"), muted: v("--muted"), text: v("--text") };
  }

  draw() {
    const { canvas } = this;
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return;
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const c = this.colors();
    const bids = this.data.bids.map(num);
    const asks = this.data.asks.map(num);
    ctx.font = "11px ui-monospace, 'DejaVu Sans Mono', monospace";
    if (!bids.length && !asks.length) {
      ctx.fillStyle = c.muted;
      ctx.textAlign = "center";
      ctx.fillText("empty book", w / 2, h / 2);
      this.geometry = null;
      return;
    }
    const bestBid = bids.length ? bids[0].price : null;
    const bestAsk = asks.length ? asks[0].price : null;
    const mid = bestBid !== null && bestAsk !== null ? (bestBid + bestAsk) / 2 : (bestBid ?? bestAsk);
    let lo = bids.length ? bids[bids.length - 1].price : mid;
    let hi = asks.length ? asks[asks.length - 1].price : mid;
    const half = Math.max(mid - lo, hi - mid, Math.abs(mid) * MIN_HALF_RANGE, 1e-9);
    lo = mid - half;
    hi = mid + half;
    const maxCum = Math.max(bids.length ? bids[bids.length - 1].cum : 0, asks.length ? asks[asks.length - 1].cum : 0) * 1.08;
    const x = (p) => PAD.left + ((p - lo) / (hi - lo)) * (w - PAD.left - PAD.right);
    const y = (q) => h - PAD.bottom - (q / maxCum) * (h - PAD.top - PAD.bottom);
    this.geometry = { lo, hi, maxCum, w, h, bids, asks };

    // grid and axes, at round numbers
    ctx.strokeStyle = c.line;
    ctx.fillStyle = c.muted;
    ctx.lineWidth = 1;
    ctx.textAlign = "left";
    for (const q of ticks(0, maxCum, 4)) {
      const yy = Math.round(y(q)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(PAD.left, yy);
      ctx.lineTo(w - PAD.right, yy);
      ctx.stroke();
      ctx.fillText(short(q), w - PAD.right + 4, yy + 4);
    }
    ctx.textAlign = "center";
    const labelRoom = 24; // half a label's width: keep the outermost ones inside the canvas
    for (const p of ticks(lo, hi, 6)) {
      const xx = x(p);
      if (xx < PAD.left + labelRoom || xx > w - PAD.right - labelRoom) continue;
      ctx.fillText(short(p), xx, h - 6);
    }

    this.side(ctx, bids, x, y, lo, c.buy, c.prov);
    this.side(ctx, asks, x, y, hi, c.sell, c.prov);

    // the mid
    ctx.strokeStyle = c.muted;
    ctx.setLineDash([3, 3]);
    ctx.beginPath();
    ctx.moveTo(Math.round(x(mid)) + 0.5, PAD.top);
    ctx.lineTo(Math.round(x(mid)) + 0.5, h - PAD.bottom);
    ctx.stroke();
    ctx.setLineDash([]);
  }

  /** One side as a step area from its best price outward to `edge`. */
  side(ctx, levels, x, y, edge, color, prov) {
    if (!levels.length) return;
    const pts = [];
    let prevCum = 0;
    for (const lv of levels) {
      pts.push([lv.price, prevCum], [lv.price, lv.cum]);
      prevCum = lv.cum;
    }
    pts.push([edge, prevCum]);
    ctx.beginPath();
    ctx.moveTo(x(levels[0].price), y(0));
    for (const [p, q] of pts) ctx.lineTo(x(p), y(q));
    ctx.lineTo(x(edge), y(0));
    ctx.closePath();
    ctx.globalAlpha = 0.18;
    ctx.fillStyle = color;
    ctx.fill();
    ctx.globalAlpha = 1;
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    ctx.moveTo(x(levels[0].price), y(0));
    for (const [p, q] of pts) ctx.lineTo(x(p), y(q));
    ctx.stroke();
    // provisional levels: hatch the band each adds, from its price to the next level's
    levels.forEach((lv, i) => {
      if (lv.final !== false) return;
      const next = i + 1 < levels.length ? levels[i + 1].price : edge;
      const x0 = Math.min(x(lv.price), x(next));
      const x1 = Math.max(x(lv.price), x(next));
      const y0 = y(lv.cum);
      const y1 = y(lv.cum - lv.amount);
      ctx.save();
      ctx.beginPath();
      ctx.rect(x0, y0, x1 - x0, y1 - y0);
      ctx.clip();
      ctx.strokeStyle = prov;
      ctx.globalAlpha = 0.6;
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (let k = x0 - (y1 - y0); k < x1; k += 5) {
        ctx.moveTo(k, y1);
        ctx.lineTo(k + (y1 - y0), y0);
      }
      ctx.stroke();
      ctx.restore();
    });
  }

  hover(e) {
    const g = this.geometry;
    if (!g) return;
    const rect = this.canvas.getBoundingClientRect();
    const px = e.clientX - rect.left;
    const price = g.lo + ((px - PAD.left) / (g.w - PAD.left - PAD.right)) * (g.hi - g.lo);
    const pick = (levels, reached) => {
      let hit = null;
      for (const lv of levels) if (reached(lv.price)) hit = lv;
      return hit;
    };
    const bid = pick(g.bids, (p) => p >= price);
    const ask = pick(g.asks, (p) => p <= price);
    const lv = bid || ask;
    if (!lv) {
      this.tip.hidden = true;
      return;
    }
    this.tip.hidden = false;
    this.tip.textContent = `${bid ? "bids" : "asks"} to ${lv.raw.price}: ${lv.raw.cum}${lv.final === false ? " (provisional)" : ""}`;
    this.tip.style.left = `${Math.min(px + 12, g.w - 170)}px`;
    this.tip.style.top = `${e.clientY - rect.top + 12}px`;
  }
}

function num([price, amount, cum, final]) {
  return { price: Number(price), amount: Number(amount), cum: Number(cum), final, raw: { price, cum } };
}

/** About `count` round values (1, 2 or 5 times a power of ten apart) between lo and hi. */
function ticks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / count;
  const pow = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * pow).find((s) => s >= raw) || 10 * pow;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function short(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e6) return `${(v / 1e6).toPrecision(3)}M`;
  if (a >= 1e3) return `${(v / 1e3).toPrecision(3)}k`;
  return Number(v.toPrecision(4)).toString();
}
