// The search page: plain DOM, no framework, no build step, nothing loaded from elsewhere.
// Text from the index (ids, paths) is always set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { flipTimer: null, frames: [], frame: 0, current: null, image: null, seq: 0 };

async function api(path, options) {
  const r = await fetch(path, Object.assign({ headers: { Accept: "application/json" } }, options || {}));
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

// Times as the command line prints them: m:ss.s
function clock(t) {
  if (t === null || t === undefined || !isFinite(t)) return "?";
  const m = Math.floor(t / 60);
  const s = t - 60 * m;
  return `${m}:${s.toFixed(1).padStart(4, "0")}`;
}

function rangeLabel(start, end) {
  return `${clock(start)}–${clock(end)}`;
}

function button(cls, text, title, onClick) {
  const b = el("button", cls, text);
  b.type = "button";
  if (title) b.title = title;
  b.addEventListener("click", (ev) => { ev.stopPropagation(); onClick(); });
  return b;
}

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
    const tools = el("div", "tools");
    const range = el("span", "range", r.start !== null && r.start !== undefined ? rangeLabel(r.start, r.end) : "");
    range.dataset.start = String(r.start);
    range.dataset.end = String(r.end);
    tools.append(range);
    tools.append(button("like", "more like this", "moments similar to this one",
      () => go(r.segment ? { like: r.video_id, start: r.start } : { like: r.video_id })));
    tools.append(button("only", "in this video", "search this video only", () => {
      const q = $("q").value.trim();
      if (q) go({ q, video_id: r.video_id });
    }));
    if (r.clip) {
      const a = el("a", "clip", "clip");
      a.href = r.clip;
      a.download = "";
      a.title = "download this moment as an MP4";
      a.addEventListener("click", (ev) => ev.stopPropagation());
      tools.append(a);
    }
    meta.append(tools);
    card.append(strip, meta);
    if (r.moments && r.moments.length) {
      const more = el("div", "moments");
      for (const m of r.moments) {
        more.append(button("moment", rangeLabel(m.start, m.end), `score ${fmtScore(m.score)}`,
          () => openViewer({ ...r, start: m.start, end: m.end, score: m.score })));
      }
      card.append(more);
    }
    card.addEventListener("click", () => openViewer(r));
    grid.append(card);
  });
}

function showScope(p) {
  const scope = $("scope");
  if (p.get("video_id")) {
    $("scope-label").textContent = `in ${p.get("video_id")}`;
    scope.hidden = false;
  } else {
    scope.hidden = true;
  }
}

async function run() {
  const p = new URLSearchParams(location.hash.slice(1));
  const k = p.get("k") || $("k").value;
  $("k").value = k;
  showScope(p);
  const seq = ++state.seq;  // a slower answer to an earlier search is not shown over this one
  try {
    let body;
    if (p.get("like")) {
      const at = p.get("start") !== null ? ` at ${clock(Number(p.get("start")))}` : "";
      setStatus(`videos like ${p.get("like")}${at} …`);
      const start = p.get("start") !== null ? `&start=${encodeURIComponent(p.get("start"))}` : "";
      body = await api(`/api/similar?video_id=${encodeURIComponent(p.get("like"))}&k=${k}${start}`);
      setStatus(`${body.results.length} videos like ${body.video_id}${at} · ${body.took_ms.toFixed(1)} ms`);
    } else if (p.get("q")) {
      $("q").value = p.get("q");
      setStatus("searching …");
      const only = p.get("video_id") ? `&video_id=${encodeURIComponent(p.get("video_id"))}` : "";
      body = await api(`/api/search?q=${encodeURIComponent(p.get("q"))}&k=${k}${only}`);
      const qb = body.qb_norm && body.qb_norm.applied ? " · QB-Norm scores" : "";
      setStatus(`${body.results.length} results · ${body.took_ms.toFixed(1)} ms${qb}`);
    } else {
      if (!state.image) { $("results").replaceChildren(); setStatus(""); }
      return;
    }
    if (seq === state.seq) render(body.results);
  } catch (e) {
    if (seq !== state.seq) return;
    $("results").replaceChildren();
    setStatus(e.message, true);
  }
}

// ---------------------------------------------------------------- image queries (POST /api/search)
function uploadName(file) {
  // the name the query calls the upload by: letters, digits, dot, dash, underscore and spaces only
  const clean = (file.name || "").replace(/[^\p{L}\p{N}._ -]/gu, "_").trim();
  return clean || "image";
}

function quotePart(text) {
  return '"' + text.replace(/\\/g, "\\\\").replace(/"/g, '\\"') + '"';
}

function setImage(file) {
  if (!file) return;
  if (!/^image\//.test(file.type || "")) {
    setStatus(`${file.name || "that file"} is not an image`, true);
    return;
  }
  state.image = { file, name: uploadName(file) };
  $("image-name").textContent = state.image.name;
  $("image-name").title = file.name;
  $("image-chip").hidden = false;
  const reader = new FileReader();  // a data: URL: the page's policy allows no blob: images
  reader.onload = () => { if (state.image && state.image.file === file) $("image-preview").src = reader.result; };
  reader.readAsDataURL(file);
  searchImage();
}

function clearImage() {
  state.image = null;
  $("image-chip").hidden = true;
  $("image-preview").removeAttribute("src");
  $("image-file").value = "";
}

async function searchImage() {
  const img = state.image;
  if (!img) return;
  const text = $("q").value.trim();
  const form = new FormData();
  form.append("image", img.file, img.name);
  form.append("k", $("k").value);
  if (text) form.append("q", `${text} + ${quotePart("image:" + img.name)}`);  // text (or arithmetic) + image
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  const seq = ++state.seq;
  setStatus("searching with the image …");
  try {
    const body = await api("/api/search", { method: "POST", body: form });
    if (seq !== state.seq) return;
    const what = text ? `${text} + image ${img.name}` : `image ${img.name}`;
    setStatus(`${body.results.length} results for ${what} · ${body.took_ms.toFixed(1)} ms`);
    render(body.results);
  } catch (e) {
    if (seq !== state.seq) return;
    $("results").replaceChildren();
    setStatus(e.message, true);
  }
}

function hasFiles(ev) {
  return ev.dataTransfer && Array.from(ev.dataTransfer.types || []).includes("Files");
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

// The moment's range on the player's timeline, and where playback is.
function drawTimeline() {
  const player = $("player");
  const r = state.current;
  const d = player.duration;
  if (!r || !isFinite(d) || d <= 0) return;
  const start = Math.max(0, r.start || 0);
  const end = Math.min(d, r.end === null || r.end === undefined ? d : r.end);
  $("tl-range").style.left = `${(100 * start) / d}%`;
  $("tl-range").style.width = `${(100 * Math.max(0, end - start)) / d}%`;
  $("tl-now").style.left = `${(100 * player.currentTime) / d}%`;
}

async function openViewer(r) {
  state.current = r;
  const where = r.start !== null && r.start !== undefined ? `  ${rangeLabel(r.start, r.end)}` : "";
  $("viewer-title").textContent = `${r.video_id}${where}  (${fmtScore(r.score)})`;
  const player = $("player");
  stopFlip();
  $("viewer").hidden = false;
  if (r.video) {
    $("flip").hidden = true;
    player.hidden = false;
    $("timeline").hidden = false;
    delete player.dataset.startedAt;
    player.addEventListener("loadedmetadata", () => {
      // the server answers Range requests, so the jump to the moment fetches only what it needs
      player.addEventListener("seeked", () => {
        player.dataset.startedAt = String(player.currentTime);
        drawTimeline();
        player.play().catch(() => {});
      }, { once: true });
      player.currentTime = Math.max(0, r.start || 0);
    }, { once: true });
    player.src = r.video;
  } else if (r.frames) {
    player.hidden = true;
    $("timeline").hidden = true;
    $("flip").hidden = false;
    try {
      const body = await api(r.frames);
      state.frames = body.frames;
      $("flip-pos").max = String(Math.max(0, body.frames.length - 1));
      const step = body.count / Math.max(1, body.frames.length);
      showFrame(body.fps && r.start ? Math.floor((r.start * body.fps) / step) : 0);
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
    if (state.image) { searchImage(); return; }
    const q = $("q").value.trim();
    if (q) go({ q });
  });
  $("k").addEventListener("change", () => {
    if (location.hash) go(Object.fromEntries(new URLSearchParams(location.hash.slice(1))));
    else if (state.image) searchImage();
  });
  $("image-file").addEventListener("change", (ev) => setImage(ev.target.files[0]));
  $("image-clear").addEventListener("click", () => { clearImage(); $("results").replaceChildren(); setStatus(""); });
  let dragDepth = 0;  // dragenter/dragleave fire for every element crossed
  document.addEventListener("dragenter", (ev) => {
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    dragDepth += 1;
    $("dropzone").hidden = false;
  });
  document.addEventListener("dragover", (ev) => { if (hasFiles(ev)) ev.preventDefault(); });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) $("dropzone").hidden = true;
  });
  document.addEventListener("drop", (ev) => {
    ev.preventDefault();  // the browser would otherwise open the file and leave the page
    dragDepth = 0;
    $("dropzone").hidden = true;
    const file = ev.dataTransfer && ev.dataTransfer.files && ev.dataTransfer.files[0];
    if (file) setImage(file);
  });
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer").addEventListener("click", (ev) => { if (ev.target === $("viewer")) closeViewer(); });
  $("viewer-like").addEventListener("click", () => {
    const r = state.current;
    closeViewer();
    if (r) go(r.segment ? { like: r.video_id, start: r.start } : { like: r.video_id });
  });
  $("player").addEventListener("timeupdate", drawTimeline);
  $("timeline").addEventListener("click", (ev) => {
    const player = $("player");
    const box = $("timeline").getBoundingClientRect();
    if (isFinite(player.duration)) player.currentTime = ((ev.clientX - box.left) / box.width) * player.duration;
  });
  $("scope-clear").addEventListener("click", () => {
    const p = Object.fromEntries(new URLSearchParams(location.hash.slice(1)));
    delete p.video_id;
    go(p);
  });
  $("flip-play").addEventListener("click", () => (state.flipTimer ? stopFlip() : playFlip()));
  $("flip-pos").addEventListener("input", (ev) => { stopFlip(); showFrame(Number(ev.target.value)); });
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeViewer(); });
  window.addEventListener("hashchange", run);
  api("/api/health")
    .then((h) => { $("info").textContent = `${h.videos} videos · model ${String(h.model).slice(0, 12)}`; })
    .catch((e) => { $("info").textContent = e.message; });
  run();
});
