// The operator's page: polls /ui/api/state, draws the selected result and its correspondences,
// sends reviews, thresholds and rollbacks. Plain JavaScript, no library, nothing from elsewhere.
'use strict';

const S = {
  seq: 0, results: [], queue: [], current: null, follow: true, gen: null, writable: false,
  threshold: null, tab: 'live', pick: null, thr: null,
  token: sessionStorage.getItem('spade-token') || '',
  operator: localStorage.getItem('spade-operator') || '',
};
const $ = (id) => document.getElementById(id);
const fmt = (x, n = 3) => (x === null || x === undefined || Number.isNaN(x)) ? '–' : Number(x).toFixed(n);
const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
const MAX_KEPT = 50;

function toast(text, kind = 'info') {
  const t = $('toast');
  t.textContent = text;
  t.className = 'show ' + kind;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.className = ''; }, kind === 'error' ? 8000 : 4000);
}

async function getJSON(path) {
  const r = await fetch(path, { cache: 'no-store' });
  if (!r.ok) throw new Error(`${path}: ${r.status}`);
  return r.json();
}

async function post(path, body) {
  const headers = { 'Content-Type': 'application/json' };
  if (S.token) headers.Authorization = 'Bearer ' + S.token;
  if (S.operator) headers['X-Operator'] = S.operator;
  const r = await fetch(path, { method: 'POST', headers, body: JSON.stringify(body) });
  let data = {};
  try { data = await r.json(); } catch (e) { /* an empty answer */ }
  if (r.ok) refresh();
  else {
    toast(`${r.status}: ${data.error || 'refused'}`, 'error');
    if (r.status === 409 && data.gallery_generation !== undefined) S.gen = data.gallery_generation;
  }
  return { ok: r.ok, status: r.status, data };
}

const images = new Map(); // a result's pictures never change: each is fetched once (the last 64 kept)
function loadImage(src) {
  if (images.has(src)) return images.get(src);
  const p = new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => resolve(im);
    im.onerror = () => { images.delete(src); reject(new Error('image ' + src)); };
    im.src = src;
  });
  images.set(src, p);
  if (images.size > 64) images.delete(images.keys().next().value);
  return p;
}

// --- polling ------------------------------------------------------------------------------------
async function poll() {
  await refresh();
  setTimeout(poll, 1000);
}

async function refresh() {
  try {
    const st = await getJSON('/ui/api/state?after=' + S.seq);
    $('status').textContent = st.status === 'ready' ? `gen ${st.gallery_generation} · ready` : st.status;
    $('status').className = 'pill ' + (st.status === 'ready' ? 'ok' : 'bad');
    S.gen = st.gallery_generation;
    S.threshold = st.threshold;
    S.writable = st.writable;
    document.body.classList.toggle('readonly', !st.writable);
    if (st.results.length) {
      const known = new Map(S.results.map((r) => [r.id, r]));
      st.results.forEach((r) => known.set(r.id, r));
      S.results = [...known.values()].sort((a, b) => a.seq - b.seq).slice(-MAX_KEPT);
      S.seq = st.seq;
      renderRecent();
      if (S.follow) select(S.results[S.results.length - 1]);
    }
    S.queue = st.queue;
    // a review elsewhere: reflect it on results shown here
    const reviewed = new Map(st.queue.map((r) => [r.id, r]));
    S.results.forEach((r) => { if (r.queued && !reviewed.has(r.id)) r.queued = false; });
    $('queue-count').textContent = st.queue.length;
    if (S.tab === 'review') renderQueue();
    if (S.current) updateScore(S.current);
  } catch (e) {
    $('status').textContent = 'offline';
    $('status').className = 'pill bad';
  }
}

// --- live view ------------------------------------------------------------------------------------
function renderRecent() {
  const box = $('recent');
  box.innerHTML = '';
  [...S.results].reverse().forEach((r) => {
    const b = document.createElement('button');
    b.className = 'thumb ' + (r.verdict === 'NOT_OK' ? 'bad' : r.verdict === 'OK' ? 'ok' : '');
    b.dataset.id = r.id;
    b.innerHTML = `<img alt="" src="/ui/api/results/${r.id}/input.png"><span>${esc(r.verdict || '?')} ${fmt(r.score, 2)}</span>`;
    b.onclick = () => { setFollow(false); select(r); };
    if (S.current && S.current.id === r.id) b.classList.add('sel');
    box.appendChild(b);
  });
}

function setFollow(on) {
  S.follow = on;
  const b = $('follow');
  b.setAttribute('aria-pressed', String(on));
  b.textContent = on ? 'Following live' : 'Follow live';
  if (on && S.results.length) select(S.results[S.results.length - 1]);
}

function updateScore(r) {
  const thr = r.threshold;
  const top = Math.max(r.score, thr || 0) * 1.5 || 1;
  $('score-fill').style.width = Math.min(100, (100 * r.score) / top) + '%';
  $('score-fill').className = r.verdict === 'NOT_OK' ? 'bad' : 'ok';
  $('threshold-mark').style.left = thr ? Math.min(100, (100 * thr) / top) + '%' : '-10px';
  $('score-text').textContent = `score ${fmt(r.score)} · threshold ${fmt(thr)}`;
}

async function select(r) {
  if (!r) return;
  const same = S.current && S.current.id === r.id;
  S.current = r;
  document.querySelectorAll('#recent .thumb').forEach((b) => b.classList.toggle('sel', b.dataset.id === r.id));
  $('banner').className = 'banner ' + (r.verdict === 'NOT_OK' ? 'bad' : r.verdict === 'OK' ? 'ok' : 'none');
  $('banner').dataset.id = r.id;
  $('verdict').textContent = r.verdict === 'NOT_OK' ? 'NOT OK' : (r.verdict || 'no threshold');
  $('result-name').textContent = `${r.image || ''} · ${new Date(r.time * 1000).toLocaleTimeString()}`;
  updateScore(r);
  if (same) return;
  const nb = $('neighbors');
  nb.innerHTML = '';
  (r.neighbors || []).forEach((name, i) => {
    const id = r.neighbor_ids[i];
    const d = document.createElement('div');
    d.className = 'thumb';
    d.innerHTML = `${id >= 0 ? `<img alt="" src="/ui/api/results/${r.id}/gallery/${id}.png">` : ''}<span>${esc(name)}<br>d ${fmt(r.neighbor_distances[i])}</span>`;
    nb.appendChild(d);
  });
  const w = r.worst_pixel || { row: 0, col: 0 };
  S.pick = { row: w.row, col: w.col };
  await drawPart();
  await showPixel(w.row, w.col);
}

async function drawPart() {
  const r = S.current;
  if (!r) return;
  const c = $('part');
  const im = await loadImage(`/ui/api/results/${r.id}/${$('show-heat').checked ? 'heat' : 'input'}.png`);
  if (S.current !== r) return;
  const g = c.getContext('2d');
  g.imageSmoothingEnabled = false;
  g.drawImage(im, 0, 0, c.width, c.height);
  if (S.pick) marker(g, S.pick.row, S.pick.col, r.size, c);
}

function marker(g, row, col, size, c) {
  const k = c.width / size;
  const x = (col + 0.5) * k, y = (row + 0.5) * k;
  g.lineWidth = 4;
  g.strokeStyle = '#000';
  g.beginPath(); g.arc(x, y, 14, 0, 2 * Math.PI); g.stroke();
  g.lineWidth = 2;
  g.strokeStyle = '#3f3';
  g.beginPath(); g.arc(x, y, 14, 0, 2 * Math.PI); g.stroke();
}

async function showPixel(row, col) {
  const r = S.current;
  const p = await getJSON(`/ui/api/results/${r.id}/pixel?row=${row}&col=${col}`);
  if (S.current !== r) return;
  S.pick = { row, col };
  await drawPart();
  const c = $('match');
  const im = await loadImage(`/ui/api/results/${r.id}/gallery/${p.matched_id}.png`);
  const g = c.getContext('2d');
  g.drawImage(im, 0, 0, c.width, c.height);
  marker(g, p.matched_row - 0.5, p.matched_col - 0.5, r.size, c);
  const over = p.pixel_threshold && p.distance > p.pixel_threshold;
  const info = $('match-info');
  info.innerHTML = `Pixel (${row}, ${col}) matched <b>${esc(p.matched_image)}</b> at (${fmt(p.matched_row, 1)}, ${fmt(p.matched_col, 1)}); ` +
    `distance <b class="${over ? 'bad' : 'ok'}">${fmt(p.distance, 4)}</b> (pixel threshold ${fmt(p.pixel_threshold, 4)})`;
  Object.assign(info.dataset, {
    row, col, matchedImage: p.matched_image, matchedRow: p.matched_row, matchedCol: p.matched_col, distance: p.distance,
  });
}

function cellAt(ev) {
  const r = S.current;
  const box = $('part').getBoundingClientRect();
  const row = Math.min(r.size - 1, Math.max(0, Math.floor(((ev.clientY - box.top) / box.height) * r.size)));
  const col = Math.min(r.size - 1, Math.max(0, Math.floor(((ev.clientX - box.left) / box.width) * r.size)));
  return { row, col };
}

function onPartClick(ev) {
  if (!S.current) return;
  const { row, col } = cellAt(ev);
  setFollow(false);
  showPixel(row, col);
}

// with a mouse, hovering explains too: one pixel query at a time, the latest position wins
const hover = { busy: false, next: null };
async function onPartHover(ev) {
  if (ev.pointerType !== 'mouse' || !S.current) return;
  hover.next = cellAt(ev);
  if (hover.busy) return;
  hover.busy = true;
  while (hover.next) {
    const { row, col } = hover.next;
    hover.next = null;
    if (!S.pick || S.pick.row !== row || S.pick.col !== col) await showPixel(row, col).catch(() => null);
  }
  hover.busy = false;
}

// --- review ---------------------------------------------------------------------------------------
function renderQueue() {
  const box = $('queue');
  const ids = S.queue.map((r) => r.id).join();
  if (box.dataset.ids === ids) return; // unchanged: keep what the operator is typing
  box.dataset.ids = ids;
  box.innerHTML = S.queue.length ? '' : '<p class="big">Nothing to review.</p>';
  S.queue.slice().reverse().forEach((r) => {
    const card = document.createElement('div');
    card.className = 'card ' + (r.verdict === 'NOT_OK' ? 'bad' : 'ok');
    card.dataset.id = r.id;
    card.innerHTML = `<img alt="" src="/ui/api/results/${r.id}/heat.png">
      <div class="card-body"><div class="big">${esc((r.verdict || "").replace("_", " "))} · ${fmt(r.score)} / ${fmt(r.threshold)}</div>
      <div>${esc(r.image)} · ${new Date(r.time * 1000).toLocaleTimeString()}</div>
      <input type="text" class="note" maxlength="500" placeholder="note (optional)">
      <div class="actions"><button class="good">Good part</button><button class="defect">Defect confirmed</button>
      <button class="explain small">Explain</button></div></div>`;
    card.querySelector('.good').onclick = () => review(r, 'good', card);
    card.querySelector('.defect').onclick = () => review(r, 'defect', card);
    card.querySelector('.explain').onclick = () => { setFollow(false); showTab('live'); select(r); };
    box.appendChild(card);
  });
}

async function review(r, decision, card) {
  card.querySelectorAll('button').forEach((b) => { b.disabled = true; });
  const note = card.querySelector('.note').value;
  const res = await post(`/ui/api/results/${r.id}/review`, { decision, note, generation: S.gen });
  if (res.ok) {
    if (res.data.gallery_generation !== undefined) S.gen = res.data.gallery_generation;
    toast(decision === 'good'
      ? `Added to the gallery (generation ${res.data.gallery_generation}, ${res.data.gallery_images} images); in use now`
      : 'Defect confirmed', 'ok');
    S.queue = S.queue.filter((q) => q.id !== r.id);
    $('queue-count').textContent = S.queue.length;
    renderQueue();
  } else {
    card.querySelectorAll('button').forEach((b) => { b.disabled = false; });
  }
}

// --- threshold --------------------------------------------------------------------------------------
async function loadThresholds() {
  const t = await getJSON('/ui/api/thresholds');
  S.thr = t;
  const all = [...t.heldout_normal, ...t.reviewed_good, ...t.reviewed_defect, t.threshold || 0];
  const hi = Math.max(...all, 1e-6) * 1.2;
  const rg = $('thr-range');
  rg.max = hi;
  rg.step = hi / 1000;
  rg.value = t.threshold ?? hi / 2;
  $('thr-value').value = fmt(t.threshold, 4);
  drawHist();
}

function proposed() { return Number($('thr-value').value); }

function drawHist() {
  const t = S.thr;
  if (!t) return;
  const c = $('hist'), g = c.getContext('2d');
  const all = [...t.heldout_normal, ...t.reviewed_good, ...t.reviewed_defect, t.threshold || 0, proposed() || 0].filter((x) => x > 0);
  const hi = Math.max(...all, 1e-6) * 1.2, lo = Math.min(...all, hi) / 1.2;
  // scores that span orders of magnitude (a far-off part beside normal ones) on a log axis
  const log = hi / lo > 100;
  const pos = (x) => (log ? (Math.log(Math.max(x, lo)) - Math.log(lo)) / (Math.log(hi) - Math.log(lo)) : x / hi);
  const bins = 40, W = c.width, H = c.height - 24;
  g.clearRect(0, 0, c.width, c.height);
  const sets = [[t.heldout_normal, '#3b7dd8'], [t.reviewed_good, '#2a9d3a'], [t.reviewed_defect, '#d62828']];
  const counts = sets.map(([xs]) => {
    const h = new Array(bins).fill(0);
    xs.forEach((x) => { h[Math.max(0, Math.min(bins - 1, Math.floor(pos(x) * bins)))] += 1; });
    return h;
  });
  const top = Math.max(1, ...counts.flat());
  const bw = W / bins;
  counts.forEach((h, k) => {
    g.fillStyle = sets[k][1];
    h.forEach((n, i) => { if (n) g.fillRect(i * bw + k * (bw / 3), H - (n / top) * (H - 10), bw / 3 - 1, (n / top) * (H - 10)); });
  });
  const line = (x, color) => { g.strokeStyle = color; g.lineWidth = 4; g.beginPath(); g.moveTo(pos(x) * W, 0); g.lineTo(pos(x) * W, H); g.stroke(); };
  if (t.threshold) line(t.threshold, '#000');
  if (proposed() > 0) line(proposed(), '#f28c00');
  g.fillStyle = '#000';
  g.font = '18px sans-serif';
  g.fillText(fmt(log ? lo : 0, 2) + (log ? '  (log scale)' : ''), 2, c.height - 4);
  const right = fmt(hi, 2);
  g.fillText(right, W - g.measureText(right).width - 2, c.height - 4);
  const thr = proposed();
  const normal = [...t.heldout_normal, ...t.reviewed_good];
  const fr = normal.length ? normal.filter((x) => x > thr).length / normal.length : null;
  const miss = t.reviewed_defect.length ? t.reviewed_defect.filter((x) => x <= thr).length / t.reviewed_defect.length : null;
  const pct = (x, n) => (x === null ? '– (none yet)' : `${(100 * x).toFixed(1)} % of ${n}`);
  $('thr-rates').innerHTML = `At ${fmt(thr, 4)}: false rejects <b>${pct(fr, normal.length)}</b> normal · misses <b>${pct(miss, t.reviewed_defect.length)}</b> confirmed defects`;
}

async function applyThreshold() {
  const thr = proposed();
  const res = await post('/ui/api/threshold', { threshold: thr, generation: S.gen });
  if (res.ok) {
    S.gen = res.data.gallery_generation;
    toast(`Threshold ${fmt(res.data.threshold, 4)} in use (generation ${res.data.gallery_generation})`, 'ok');
    loadThresholds();
  }
}

// --- history ------------------------------------------------------------------------------------------
async function loadHistory() {
  const h = await getJSON('/ui/api/history');
  S.gen = h.gallery_generation;
  $('gen-now').textContent = `(now ${h.gallery_generation})`;
  const tb = $('gen-table').querySelector('tbody');
  tb.innerHTML = '';
  [...h.generations].reverse().forEach((e) => {
    const tr = document.createElement('tr');
    const keep = h.restorable.includes(e.previous) && e.previous !== h.gallery_generation;
    tr.innerHTML = `<td>${e.generation}</td><td>${esc(describe(e))}</td><td>${esc(e.time)}</td><td>${esc(e.client)}</td><td></td>`;
    if (keep) {
      const b = document.createElement('button');
      b.className = 'small';
      b.textContent = `Restore ${e.previous}`;
      b.onclick = () => rollback(e.previous);
      tr.lastChild.appendChild(b);
    }
    tb.appendChild(tr);
  });
  const ab = $('audit-table').querySelector('tbody');
  ab.innerHTML = '';
  [...h.audit].reverse().forEach((a) => {
    const { time, action, client, ...rest } = a;
    const tr = document.createElement('tr');
    tr.innerHTML = `<td>${esc(time)}</td><td>${esc(action)}</td><td>${esc(client && client.address)} ${esc(client && client.operator)}</td><td>${esc(JSON.stringify(rest))}</td>`;
    ab.appendChild(tr);
  });
}

function describe(e) {
  const d = e.detail || {};
  if (e.action === 'add') return `good part added (${d.added || '?'})`;
  if (e.action === 'threshold') return `threshold ${fmt(d.from, 4)} → ${fmt(d.to, 4)}`;
  if (e.action === 'rollback') return `back to generation ${d.to}`;
  return `${e.action} ${JSON.stringify(d)}`;
}

async function rollback(to) {
  const res = await post('/ui/api/rollback', { to, generation: S.gen });
  if (res.ok) {
    S.gen = res.data.gallery_generation;
    toast(`Gallery restored (generation ${res.data.gallery_generation}, threshold ${fmt(res.data.threshold, 4)}); in use now`, 'ok');
  }
  loadHistory();
}

// --- health ---------------------------------------------------------------------------------------------
async function loadHealth() {
  const h = await getJSON('/ui/api/health');
  const rows = [
    ['Status', h.status], ['Model', h.model], ['Backbone', h.backbone], ['Gallery', h.gallery],
    ['Gallery images', h.gallery_images], ['Gallery generation', h.gallery_generation],
    ['Service generation', h.generation], ['Scorer', h.scorer], ['Device', h.device],
    ['Image threshold', fmt(h.thresholds && h.thresholds.image, 4)],
    ['Queue', `${h.queue_depth} / ${h.queue_capacity}`],
    ['Latency p50 / p90 / p99 (ms)', ['p50', 'p90', 'p99'].map((k) => fmt(h.latency_ms[k], 1)).join(' / ')],
    ['Worker per image p50 / p99 (ms)', ['p50', 'p99'].map((k) => fmt(h.worker_busy_ms[k], 1)).join(' / ')],
    ['Results kept', `${h.results_kept} (${h.results_kept_mib} MiB)`], ['Changes allowed', h.writable ? 'yes' : 'no (read-only)'],
    ['Up', `${h.uptime_s} s`],
  ];
  $('health-list').innerHTML = rows.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v ?? '–')}</dd>`).join('');
}

// --- tabs and settings -----------------------------------------------------------------------------
function showTab(name) {
  S.tab = name;
  document.querySelectorAll('#tabs button').forEach((b) => b.setAttribute('aria-selected', String(b.dataset.tab === name)));
  document.querySelectorAll('section.tab').forEach((s) => { s.hidden = s.id !== name; });
  if (name === 'review') { $('queue').dataset.ids = ''; renderQueue(); }
  if (name === 'threshold') loadThresholds();
  if (name === 'history') loadHistory();
  if (name === 'health') loadHealth();
}

function init() {
  document.querySelectorAll('#tabs button').forEach((b) => { b.onclick = () => showTab(b.dataset.tab); });
  $('part').addEventListener('click', onPartClick);
  $('part').addEventListener('pointermove', onPartHover);
  $('show-heat').onchange = drawPart;
  $('follow').onclick = () => setFollow(!S.follow);
  $('thr-range').oninput = () => { $('thr-value').value = Number($('thr-range').value).toFixed(4); drawHist(); };
  $('thr-value').oninput = () => {
    const v = Number($('thr-value').value);
    if (v > Number($('thr-range').max)) $('thr-range').max = v * 1.2;
    $('thr-range').value = v;
    drawHist();
  };
  $('thr-apply').onclick = applyThreshold;
  $('undo').onclick = () => rollback(null);
  const dlg = $('settings');
  $('settings-open').onclick = () => { $('token').value = S.token; $('operator').value = S.operator; dlg.showModal(); };
  $('settings-cancel').onclick = () => dlg.close();
  $('settings-save').onclick = () => {
    S.token = $('token').value.trim();
    S.operator = $('operator').value.trim();
    sessionStorage.setItem('spade-token', S.token);
    localStorage.setItem('spade-operator', S.operator);
    dlg.close();
    toast('Saved', 'ok');
  };
  setInterval(() => { if (S.tab === 'health') loadHealth(); }, 2000);
  poll();
}

document.addEventListener('DOMContentLoaded', init);
