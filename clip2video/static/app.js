// The search page: plain DOM, no framework, no build step, nothing loaded from elsewhere.
// Text from the index (ids, paths) is always set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { flipTimer: null, frames: [], frame: 0, current: null };

async function api(path) {
  const r = await fetch(path, { headers: { Accept: "application/json" } });
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) throw new Error((body && body.error) || `HTTP ${r.status}`);
  return body;
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// QB-Norm's normalised scores are small positive numbers: keep their significant digits
const fmtScore = (s) => (Math.abs(s) >= 1 ? s.toFixed(3) : s.toPrecision(3));

function render(results) {
  const grid = $("results");
  grid.replaceChildren();
  results.forEach((r, i) => {
    const card = el("article", "result");
    card.dataset.videoId = r.video_id;
    const strip = el("div", "strip");
    if (r.thumbnails.length === 0) strip.append(el("span", "none", "no thumbnail"));
    for (const url of r.thumbnails) {
      const img = el("img", "thumb");
      img.src = url;
      img.alt = r.video_id;
      img.loading = i < 12 ? "eager" : "lazy";
      strip.append(img);
    }
    const meta = el("div", "meta");
    const vid = el("span", "vid", r.video_id);
    vid.title = r.video_id;
    meta.append(el("span", "rank", `${i + 1}.`), vid, el("span", "score", fmtScore(r.score)));
    const like = el("button", "like", "more like this");
    like.type = "button";
    like.title = "videos similar to this one";
    like.addEventListener("click", (ev) => { ev.stopPropagation(); go({ like: r.video_id }); });
    meta.append(like);
    card.append(strip, meta);
    card.addEventListener("click", () => openViewer(r));
    grid.append(card);
  });
}

async function run() {
  const p = new URLSearchParams(location.hash.slice(1));
  const k = p.get("k") || $("k").value;
  $("k").value = k;
  try {
    let body;
    if (p.get("like")) {
      setStatus(`videos like ${p.get("like")} …`);
      body = await api(`/api/similar?video_id=${encodeURIComponent(p.get("like"))}&k=${k}`);
      setStatus(`${body.results.length} videos like ${body.video_id} · ${body.took_ms.toFixed(1)} ms`);
    } else if (p.get("q")) {
      $("q").value = p.get("q");
      setStatus("searching …");
      body = await api(`/api/search?q=${encodeURIComponent(p.get("q"))}&k=${k}`);
      const qb = body.qb_norm && body.qb_norm.applied ? " · QB-Norm scores" : "";
      setStatus(`${body.results.length} results · ${body.took_ms.toFixed(1)} ms${qb}`);
    } else {
      $("results").replaceChildren();
      setStatus("");
      return;
    }
    render(body.results);
  } catch (e) {
    $("results").replaceChildren();
    setStatus(e.message, true);
  }
}

function go(params) {
  params.k = $("k").value;
  const h = "#" + new URLSearchParams(params).toString();
  if (location.hash === h) run(); else location.hash = h;  // hashchange runs the search
}

function stopFlip() {
  if (state.flipTimer) clearInterval(state.flipTimer);
  state.flipTimer = null;
  $("flip-play").textContent = "play";
}

function showFrame(i) {
  if (!state.frames.length) return;
  state.frame = (i + state.frames.length) % state.frames.length;
  $("flip-img").src = state.frames[state.frame];
  $("flip-pos").value = String(state.frame);
  $("flip-count").textContent = `${state.frame + 1} / ${state.frames.length}`;
}

function playFlip() {
  stopFlip();
  state.flipTimer = setInterval(() => showFrame(state.frame + 1), 250);
  $("flip-play").textContent = "pause";
}

async function openViewer(r) {
  state.current = r;
  $("viewer-title").textContent = `${r.video_id}  (${fmtScore(r.score)})`;
  const player = $("player");
  stopFlip();
  $("viewer").hidden = false;
  if (r.video) {
    $("flip").hidden = true;
    player.hidden = false;
    player.src = r.video;  // the server answers Range requests, so seeking works
    player.play().catch(() => {});
  } else if (r.frames) {
    player.hidden = true;
    $("flip").hidden = false;
    try {
      const body = await api(r.frames);
      state.frames = body.frames;
      $("flip-pos").max = String(Math.max(0, body.frames.length - 1));
      showFrame(0);
      playFlip();
    } catch (e) {
      $("flip-count").textContent = e.message;
    }
  }
}

function closeViewer() {
  const player = $("player");
  player.pause();
  player.removeAttribute("src");
  player.load();
  stopFlip();
  $("viewer").hidden = true;
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = $("q").value.trim();
    if (q) go({ q });
  });
  $("k").addEventListener("change", () => { if (location.hash) go(Object.fromEntries(new URLSearchParams(location.hash.slice(1)))); });
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer").addEventListener("click", (ev) => { if (ev.target === $("viewer")) closeViewer(); });
  $("viewer-like").addEventListener("click", () => { const r = state.current; closeViewer(); if (r) go({ like: r.video_id }); });
  $("flip-play").addEventListener("click", () => (state.flipTimer ? stopFlip() : playFlip()));
  $("flip-pos").addEventListener("input", (ev) => { stopFlip(); showFrame(Number(ev.target.value)); });
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeViewer(); });
  window.addEventListener("hashchange", run);
  api("/api/health")
    .then((h) => { $("info").textContent = `${h.videos} videos · model ${String(h.model).slice(0, 12)}`; })
    .catch((e) => { $("info").textContent = e.message; });
  run();
});
