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
  const seq = ++state.seq;  // a slower answer to an earlier search is not shown over this one
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
